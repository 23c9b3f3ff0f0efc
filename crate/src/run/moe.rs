//! The eager mixture-of-experts block (`arch::Mlp::Moe`) as transformers 5 runs it by default on CUDA
//! (`grouped_mm` experts): what each op allocates, saves and frees, forward and backward, in the order read from the
//! fake-cuda traces of mixtral-, qwen2moe- and olmoe- cases (tests/data/hf/README.md, "What the eager MoE block
//! allocates, in order", whose step numbers the comments cite).
//!
//! N = tokens, C = width, I = expert width, E = experts, k = experts per token, S = N k token-expert pairs.
//! Dtypes: X the block input (the norm's output, the stream's dtype), R the router's matmul dtype (autocast's),
//! W the experts' (`_grouped_mm` is not autocast: the parameters' dtype), P the routing scores' (fp32 for Mixtral,
//! R otherwise), Q the weighted expert outputs' (the wider of W and P).

use crate::arch::Moe;
use crate::eager::{swiglu_bwd, swiglu_fwd, MlpSaved};
use crate::finetune::Role;
use crate::sim::Category::{Activations, Grads, Temporary};
use crate::sim::Tensor;
use crate::tensors::{self as ops, Ctx, LinearSaved, Weight};

/// How one fused expert parameter (`gate_up_proj` [E, 2I, C] or `down_proj` [E, C, I]) takes part in the step.
enum Experts {
    /// Trained (full fine-tuning): its dense gradient goes to `.grad`.
    Trained,
    /// Frozen (a LoRA model's base without an adapter on it): no gradient, so `_grouped_mm` saves only the weight
    /// (for its input's gradient), not its input.
    Frozen,
    /// Adapted by peft's `ParamWrapper` (`Wrapped`).
    Wrapped(Wrapped),
}

impl Experts {
    /// Whether the parameter (or what stands for it) needs a gradient, so that `_grouped_mm` saves its input.
    fn trained(&self) -> bool {
        !matches!(self, Experts::Frozen)
    }
}

/// peft 0.21.2's `ParamWrapper` on a fused expert parameter W [E, out, in], one adapter (tests/data/finetune/
/// README.md, mixtures of experts; stub-cuda snapshot of mixtral-lora-r8-all-bf16amp). `_activate_lora` takes the
/// factors (`get_delta_factors`): lhs = B [out, E r] viewed [E, out, r] (a permutation) and rhs = A [E r, in]
/// viewed [E, r, in], each `.to(W's dtype)` (a copy when the adapters are fp32 and W is not), and registers
/// `_LoraFactorsProxy`: `baddbmm(W, lhs, rhs, alpha=scaling)` with autocast off, in W's dtype.
/// `register_parametrization` (unsafe False) evaluates it once to check its shape and dtype; the forward, under
/// `parametrize.cached()`, evaluates it again when the experts first read the parameter: a merged weight of W's
/// size, which `_grouped_mm` saves for its backward (the merged weight needs a gradient). Each `baddbmm` copies
/// the permuted lhs contiguous and takes cuBLAS's workspace.
struct Wrapped {
    /// Elements of A ([E r, in]) and B ([out, E r]), and of W.
    a: u64,
    b: u64,
    w: u64,
    /// The factors' `.to(W's dtype)` copies, saved by `baddbmm` (lhs for rhs's gradient and back).
    lhs: Option<Tensor>,
    rhs: Option<Tensor>,
    /// The merged weight, once the experts read it.
    merged: Option<Tensor>,
}

impl Wrapped {
    /// `_activate_lora` on entering the ParamWrapper: the factors' casts, and the registration's check
    /// (`baddbmm` into a merged weight, freed with its lhs copy).
    fn activate(cx: &mut Ctx, (a, b, w): (u64, u64, u64)) -> Wrapped {
        let wb = cx.pb;
        let cast = cx.ab != wb;
        let lhs = cast.then(|| cx.alloc(b * wb, Activations, "_to_copy"));
        let rhs = cast.then(|| cx.alloc(a * wb, Activations, "_to_copy"));
        let check = cx.alloc(w * wb, Temporary, "baddbmm");
        let copy = cx.alloc(b * wb, Temporary, "baddbmm");
        cx.matmul_workspace();
        cx.sim.free_all(&[copy, check]);
        Wrapped {
            a,
            b,
            w,
            lhs,
            rhs,
            merged: None,
        }
    }

    /// The experts read the parameter: the cached parametrization evaluates `baddbmm` again.
    fn merge(&mut self, cx: &mut Ctx) {
        let wb = cx.pb;
        let merged = cx.alloc(self.w * wb, Activations, "baddbmm");
        let copy = cx.alloc(self.b * wb, Temporary, "baddbmm");
        cx.matmul_workspace();
        cx.free(copy);
        self.merged = Some(merged);
    }

    /// Tensors the ParamWrapper keeps to the backward.
    fn tensors(&self) -> [Option<Tensor>; 3] {
        [self.lhs, self.rhs, self.merged]
    }

    /// `BaddbmmBackward0` from the merged weight's gradient `gw` (dense, W's dtype): lhs's gradient (`bmm` with
    /// rhs, then `* alpha`), rhs's (`bmm` with a contiguous copy of lhs transposed, then `* alpha`), each
    /// `bmm` with cuBLAS's workspace; then `gw` and the saved factors go. Returns the two scaled gradients (lhs's,
    /// rhs's), which reach the adapters later (`land`).
    fn backward(self, cx: &mut Ctx, gw: Tensor) -> [Tensor; 2] {
        let wb = cx.pb;
        let g = cx.alloc(self.b * wb, Temporary, "bmm");
        cx.matmul_workspace();
        let g_lhs = cx.alloc(self.b * wb, Temporary, "mul");
        cx.free(g);
        let g = cx.alloc(self.a * wb, Temporary, "bmm");
        let copy = cx.alloc(self.b * wb, Temporary, "bmm");
        cx.matmul_workspace();
        cx.free(copy);
        let g_rhs = cx.alloc(self.a * wb, Temporary, "mul");
        cx.free(g);
        cx.free(gw);
        cx.sim.free_some(&[self.lhs, self.rhs]);
        [g_lhs, g_rhs]
    }
}

/// The gradients of a ParamWrapper's factors reaching its adapters: A's (`ToCopyBackward0` to the adapters' dtype
/// when the factor was a copy; the view back to A's shape keeps it contiguous, so AccumulateGrad takes it), then
/// B's (cast likewise, and the permutation's non-contiguous gradient copied to B's layout). Snapshot of
/// mixtral-lora-r8-all-bf16amp: after the gathers' backward, gate_up's before down's.
fn land(cx: &mut Ctx, [g_lhs, g_rhs]: [Tensor; 2], (a, b): (u64, u64)) {
    let (wb, ab) = (cx.pb, cx.ab);
    let cat = if cx.have_grads { Temporary } else { Grads };
    let ga = if ab != wb {
        let t = cx.alloc(a * ab, cat, "_to_copy");
        cx.free(g_rhs);
        t
    } else {
        g_rhs
    };
    expert_grad(cx, ga);
    let gb = if ab != wb {
        let t = cx.alloc(b * ab, Temporary, "_to_copy");
        cx.free(g_lhs);
        t
    } else {
        g_lhs
    };
    let gb2 = cx.alloc(b * ab, cat, "clone");
    cx.free(gb);
    expert_grad(cx, gb2);
}

/// peft's `ParamWrapper` on the router's weight [E, C] (one expert: `_LoraParameterProxy`): `get_delta_weight`
/// under the forward's autocast (`B @ A` on autocast's casts of the fp32 adapters, `* scaling`, `.to(W's
/// dtype)`), the registration's check `W + delta` (freed), and the cached `W + delta` the router's Linear reads
/// and saves; the delta goes when the ParamWrapper exits, after the routing. The merged weight needs a gradient,
/// so the router's `mm` saves its input. All E x C or smaller (64 KiB for Mixtral 8x7B's 8 x 4096 in bf16).
struct RouterAdapter {
    /// Autocast's copies of A [r, C] and B [E, r], saved by `B @ A`.
    casts: Option<[Tensor; 2]>,
    /// Bytes per element of `B @ A`.
    pd: u64,
    merged: Tensor,
}

/// What the MoE block keeps for its backward.
pub struct MoeSaved {
    moe: Moe,
    router: LinearSaved,
    router_adapter: Option<RouterAdapter>,
    gate_up_w: Experts,
    down_w: Experts,
    /// The router's fp32 softmax and top-k indices.
    softmax: Tensor,
    topk_idx: Tensor,
    /// The renormalisation's `sum` and autograd's `clone` of the top-k values.
    renorm: Option<[Tensor; 2]>,
    /// The sort's permutation, its `// k` (each pair's token), the inverse permutation.
    perm: Tensor,
    token_of: Tensor,
    inverse: Tensor,
    /// The pairs' inputs [S, C] and scores [S], the expert offsets [E].
    x_pairs: Tensor,
    scores_pairs: Tensor,
    offsets: Tensor,
    /// The grouped GEMMs' outputs and the SwiGLU between them.
    gate_up: Tensor,
    act: Tensor,
    prod: Tensor,
    down: Tensor,
    shared: Option<Shared>,
}

/// Qwen2-MoE's shared expert and its gate.
struct Shared {
    mlp: MlpSaved,
    gate: LinearSaved,
    /// The shared expert's output (saved by the gate's `mul`) and the gate's sigmoid.
    out: Tensor,
    sigmoid: Tensor,
}

/// Bytes of the block's dtypes: (X, R, W, P, Q).
fn dtypes(cx: &Ctx, moe: Moe) -> (u64, u64, u64, u64, u64) {
    let (x, r, w) = (cx.r, cx.p, cx.pb);
    let p = if moe.scores_fp32 { 4 } else { r };
    (x, r, w, p, w.max(p))
}

/// `aten::_grouped_mm`'s own allocations beside its output: with bf16 operands a CUTLASS grouped GEMM takes a
/// 60 E-byte argument buffer and a 67,584-byte workspace (stub-cuda snapshots of `_grouped_mm` alone, E = 4..64);
/// in any other dtype the fallback runs one cuBLAS GEMM per expert with tokens, each taking the cuBLAS workspace
/// and returning it (the stub-cuda records see them: `measure_stub.py` answers the fallback's host read of the
/// offsets with the forced routing's; fake kernels never run the loop). One workspace stands for them all.
fn grouped_mm_internals(cx: &mut Ctx, w: u64) {
    if w == 2 {
        let args = cx.alloc(60 * cx.m.n_experts, Temporary, "_grouped_mm");
        let ws = cx.alloc(67_584, Temporary, "_grouped_mm");
        cx.sim.free_all(&[ws, args]);
    } else {
        cx.matmul_workspace();
    }
}

/// An expert weight's gradient, dense whatever the routing, in the parameters' dtype: AccumulateGrad steals it
/// into `.grad` on a step's first micro-step and adds it in place after.
fn expert_grad(cx: &mut Ctx, g: Tensor) {
    if cx.have_grads {
        cx.free(g);
    } else {
        cx.grads.push(g);
    }
}

/// The MoE block on the norm's output `input`: (Qwen2-MoE: the shared expert), the router, the experts, (the
/// shared expert's gate and the sum). Returns what it saved and the block's output.
pub fn moe_fwd(cx: &mut Ctx, moe: Moe, input: Tensor) -> (MoeSaved, Tensor) {
    let (saved, out) = moe_fwd_until(cx, moe, input, false);
    (
        saved,
        out.expect("a forward that does not stop returns its output"),
    )
}

/// Whether a checkpointed block's recompute stops inside its MoE block (`moe_fwd_stopped`): under LoRA, without
/// a shared expert (whose gate saves tensors after the experts). Measured with LoRA (the stub-cuda snapshot of
/// mixtral-lora-r8-all-v256-bf16amp-ckpt); full fine-tuning's checkpointed MoE records were matched without it
/// and are left as they were.
pub fn recompute_stops(cx: &Ctx, moe: Moe) -> bool {
    cx.recompute_stop && cx.lora.is_some() && !moe.shared_expert
}

/// `moe_fwd` in a checkpointed block's recompute that stops at the block's last saved tensor (non-reentrant
/// checkpointing raises once every saved tensor is repacked): the scatter's `index` saves the inverse
/// permutation before it runs, so the unsorted outputs, the sum and the residual add are never made; the
/// unwinding frees the block's temporaries (the sort buffers, the weighted outputs, the router logits and top-k
/// values). Snapshot of mixtral-lora-r8-all-v256-bf16amp-ckpt.
pub fn moe_fwd_stopped(cx: &mut Ctx, moe: Moe, input: Tensor) -> MoeSaved {
    moe_fwd_until(cx, moe, input, true).0
}

fn moe_fwd_until(cx: &mut Ctx, moe: Moe, input: Tensor, stop: bool) -> (MoeSaved, Option<Tensor>) {
    let (n, c, i) = (cx.n, cx.m.n_embd, cx.m.intermediate_size);
    let (e, k) = (cx.m.n_experts, cx.m.experts_per_token);
    let s = n * k;
    let (x, r, w, p, q) = dtypes(cx, moe);
    // Qwen2-MoE runs its shared expert first: Llama's MLP of its own width on the same input.
    let shared = moe
        .shared_expert
        .then(|| swiglu_fwd(cx, input, cx.m.shared_expert_size, false));
    // Under LoRA the base is frozen; peft's ParamWrapper may adapt the router's weight and the fused experts.
    let adapted = |cx: &Ctx, role: Role| {
        cx.lora.is_some_and(|l| l.targets.has(role)) && crate::finetune::param_wrapped(cx.m)
    };
    let frozen = cx.base_frozen();
    let rank = cx.lora.map_or(0, |l| l.r);
    let router_adapter = adapted(cx, Role::Router).then(|| {
        let ab = cx.ab;
        let casts = (cx.prec.autocast() && ab == 4).then(|| {
            [
                cx.alloc(rank * c * 2, Activations, "_to_copy"),
                cx.alloc(e * rank * 2, Activations, "_to_copy"),
            ]
        });
        let pd = if casts.is_some() { 2 } else { ab };
        let prod = cx.alloc(e * c * pd, Temporary, "mm");
        cx.matmul_workspace();
        let mut delta = cx.alloc(e * c * pd, Temporary, "mul");
        cx.free(prod);
        if pd != w {
            let t = cx.alloc(e * c * w, Temporary, "_to_copy");
            cx.free(delta);
            delta = t;
        }
        let check = cx.alloc(e * c * w, Temporary, "add");
        cx.free(check);
        let merged = cx.alloc(e * c * w, Activations, "add");
        (RouterAdapter { casts, pd, merged }, delta)
    });
    // Router (steps 1-6): the Linear (autocast's casts saved), the logits to fp32, softmax and top-k.
    let router_weight = Weight {
        bytes: w,
        trainable: !frozen || router_adapter.is_some(),
    };
    let (logits, mut router) = ops::linear_fwd_as(cx, x, c, e, false, Temporary, router_weight);
    // The merged weight's gradient goes back through the parametrization, not to a `.grad` (the Linear, trained,
    // saved its input).
    router.parametrized = router_adapter.is_some();
    let logits32 = (r != 4).then(|| cx.alloc(n * e * 4, Temporary, "_to_copy"));
    let softmax = cx.alloc(n * e * 4, Activations, "_softmax");
    cx.sim.free_some(&[logits32]);
    let values = cx.alloc(n * k * 4, Temporary, "topk");
    let topk_idx = cx.alloc(n * k * 8, Activations, "topk");
    let renorm = moe.renorm.then(|| {
        [
            cx.alloc(n * 4, Activations, "sum"),
            cx.alloc(n * k * 4, Activations, "clone"),
        ]
    });
    // Mixtral weighs with the fp32 values; the others cast them to the router's dtype, the values die.
    let scores = if !moe.scores_fp32 && r != 4 {
        let cast = cx.alloc(n * k * r, Temporary, "_to_copy");
        cx.free(values);
        cast
    } else {
        values
    };
    // The router's ParamWrapper exits: its delta goes.
    let router_adapter = router_adapter.map(|(ra, delta)| {
        cx.free(delta);
        ra
    });
    // The experts' ParamWrappers, nested: `down_proj`'s (the outer one) activates first, then `gate_up_proj`'s.
    let (wrap_gate_up, wrap_down) = (adapted(cx, Role::GateUp), adapted(cx, Role::Down));
    let mut down_w = if wrap_down {
        Experts::Wrapped(Wrapped::activate(
            cx,
            (e * rank * i, c * e * rank, e * c * i),
        ))
    } else if frozen {
        Experts::Frozen
    } else {
        Experts::Trained
    };
    let mut gate_up_w = if wrap_gate_up {
        Experts::Wrapped(Wrapped::activate(
            cx,
            (2 * e * rank * c, 2 * i * 2 * e * rank, e * 2 * i * c),
        ))
    } else if frozen {
        Experts::Frozen
    } else {
        Experts::Trained
    };
    // Experts (steps 7-18): sort the pairs by expert, gather their inputs and scores, offsets per expert.
    let sorted = cx.alloc(s * 8, Temporary, "sort");
    let perm = cx.alloc(s * 8, Activations, "sort");
    let token_of = cx.alloc(s * 8, Activations, "floor_divide");
    let x_pairs = cx.alloc(s * c * x, Activations, "index");
    let scores_pairs = cx.alloc(s * p, Activations, "index");
    let ids32 = cx.alloc(s * 4, Temporary, "_to_copy");
    let histc = cx.alloc(e * 4, Temporary, "histc");
    let offsets = cx.alloc(e * 4, Activations, "cumsum");
    if let Experts::Wrapped(wr) = &mut gate_up_w {
        wr.merge(cx);
    }
    let gate_up = cx.alloc(s * 2 * i * w, Activations, "_grouped_mm");
    grouped_mm_internals(cx, w);
    // A frozen weight's `_grouped_mm` saves no input: the gathered pairs go when the experts' forward returns
    // (stub-cuda snapshot of olmoe-lora-r16-qv-bf16amp).
    cx.drop_unsaved(x_pairs);
    let act = cx.alloc(s * i * w, Activations, "silu");
    let prod = cx.alloc(s * i * w, Activations, "mul");
    cx.drop_unsaved(gate_up);
    cx.drop_unsaved(act);
    if let Experts::Wrapped(wr) = &mut down_w {
        wr.merge(cx);
    }
    let down = cx.alloc(s * c * w, Activations, "_grouped_mm");
    grouped_mm_internals(cx, w);
    if down_w.trained() {
        cx.drop_unsaved(prod);
    } else {
        cx.free(prod);
    }
    cx.drop_unsaved(offsets);
    let weighted = cx.alloc(s * c * q, Temporary, "mul");
    cx.drop_unsaved(down);
    cx.drop_unsaved(scores_pairs);
    let inverse = cx.alloc(s * 8, Activations, "empty_like");
    let arange = cx.alloc(s * 8, Temporary, "arange");
    cx.free(arange);
    // What the block keeps (the shared expert's, Qwen2-MoE's, joins it below).
    let mut saved = MoeSaved {
        moe,
        router,
        router_adapter,
        gate_up_w,
        down_w,
        softmax,
        topk_idx,
        renorm,
        perm,
        token_of,
        inverse,
        x_pairs,
        scores_pairs,
        offsets,
        gate_up,
        act,
        prod,
        down,
        shared: None,
    };
    if stop {
        cx.sim
            .free_all(&[sorted, ids32, histc, weighted, logits, scores]);
        if !saved.gate_up_w.trained() {
            cx.free(x_pairs);
        }
        return (saved, None);
    }
    let unsorted = cx.alloc(s * c * q, Temporary, "index");
    cx.free(weighted);
    let mut out = cx.alloc(n * c * q, Temporary, "sum");
    // Step 19: what the block held to its end. With the auxiliary loss the model returns the router logits: they
    // live to the end of the loss.
    cx.sim.free_all(&[sorted, ids32, histc, unsorted, scores]);
    if !saved.gate_up_w.trained() {
        cx.free(x_pairs);
    }
    // The ParamWrappers exit (their proxies and `cached()`'s merged weights go unless saved).
    if !cx.saving {
        saved.free_wrappers(cx);
    }
    if moe.aux_loss {
        cx.router_logits.push(logits);
    } else {
        cx.free(logits);
    }
    if !cx.saving {
        cx.sim
            .free_all(&[perm, token_of, inverse, softmax, topk_idx]);
        cx.sim
            .free_some(&renorm.map_or([None, None], |[a, b]| [Some(a), Some(b)]));
    }
    // Qwen2-MoE: the shared expert's gate (C -> 1, sigmoid), its product with the shared output, the sum.
    let shared = shared.map(|(mlp, shared_out)| {
        let (g, gate) = ops::proj_fwd(
            cx,
            Role::SharedExpertGate,
            (input, x),
            (c, 1),
            false,
            Temporary,
        );
        let sigmoid = cx.alloc(n * r, Activations, "sigmoid");
        cx.free(g);
        let gated = cx.alloc(n * c * r, Temporary, "mul");
        let sum = cx.alloc(n * c * q.max(r), Temporary, "add");
        cx.sim.free_all(&[gated, out]);
        cx.drop_unsaved(shared_out);
        cx.drop_unsaved(sigmoid);
        out = sum;
        Shared {
            mlp,
            gate,
            out: shared_out,
            sigmoid,
        }
    });
    // Mixtral in pure bf16: fp32 scores make the output fp32, `.to` brings it back to the stream's dtype.
    let out_bytes = if shared.is_some() { q.max(r) } else { q };
    if out_bytes != x {
        let cast = cx.alloc(n * c * x, Temporary, "_to_copy");
        cx.free(out);
        out = cast;
    }
    saved.shared = shared;
    (saved, Some(out))
}

/// The first steps of the MoE block's backward, which need no saved tensor: the gradient in Q (a cast when the
/// output was cast) and its expansion over the k slots (`clone`, k >= 2).
pub struct MoeGradHead {
    g_q: Tensor,
    g_owned: bool,
    expanded: Option<Tensor>,
}

/// `MoeGradHead` run before a checkpointed block's recompute: the autograd engine runs the nodes that need no
/// saved tensor first, and the recompute starts at the first unpack (the scatter's `index` backward needs the
/// inverse permutation), so the expanded gradient is alive through the recompute and the cast is already gone
/// (the stub-cuda snapshot of mixtral-lora-r8-all-v256-bf16amp-ckpt: the fp32 cast and the [S, C] clone before
/// the block's first recomputed norm, the cast freed). Under LoRA, as `recompute_stops`.
pub fn moe_bwd_head(cx: &mut Ctx, moe: Moe, g: (Tensor, u64, bool)) -> MoeGradHead {
    let mut head = grad_head(cx, moe, g);
    if head.g_owned {
        cx.free(head.g_q);
        head.g_owned = false;
    }
    head
}

fn grad_head(cx: &mut Ctx, moe: Moe, (g, g_bytes, owned): (Tensor, u64, bool)) -> MoeGradHead {
    let (n, c, k) = (cx.n, cx.m.n_embd, cx.m.experts_per_token);
    let (_, _, _, _, q) = dtypes(cx, moe);
    let (mut g_q, mut g_owned) = (g, owned);
    if g_bytes != q {
        g_q = cx.alloc(n * c * q, Temporary, "_to_copy");
        if owned {
            cx.free(g);
        }
        g_owned = true;
    }
    let expanded = (k >= 2).then(|| cx.alloc(n * k * c * q, Temporary, "clone"));
    MoeGradHead {
        g_q,
        g_owned,
        expanded,
    }
}

/// Backward of `moe_fwd` from the gradient of its output `(gradient, bytes, owned)` to its input `norm_out` (the
/// input, when the first Linear saved no cast of it).
pub fn moe_bwd(
    cx: &mut Ctx,
    (g, g_bytes, owned): (Tensor, u64, bool),
    sv: MoeSaved,
    norm_out: Option<Tensor>,
) -> Tensor {
    let (n, c, i) = (cx.n, cx.m.n_embd, cx.m.intermediate_size);
    let (e, k) = (cx.m.n_experts, cx.m.experts_per_token);
    let s = n * k;
    let (x, r, w, p, q) = dtypes(cx, sv.moe);
    // Qwen2-MoE: the final add's branch in the router's dtype first: the gate's `mul`, its sigmoid and Linear.
    let mut sv = sv;
    let (shared_mlp, shared_grad, gate_in) = match sv.shared.take() {
        Some(sh) => {
            let g_r = (g_bytes != r).then(|| cx.alloc(n * c * r, Temporary, "_to_copy"));
            let g_sig_full = cx.alloc(n * c * r, Temporary, "mul");
            let g_out = cx.alloc(n * c * r, Temporary, "mul");
            cx.sim.free_some(&[g_r]);
            let g_sig = cx.alloc(n * r, Temporary, "sum");
            cx.sim.free_all(&[g_sig_full, sh.out]);
            let g_lin = cx.alloc(n * r, Temporary, "sigmoid_backward");
            cx.sim.free_all(&[g_sig, sh.sigmoid]);
            let g_gate_x = ops::linear_bwd(cx, g_lin, r, true, sh.gate, None);
            (Some(sh.mlp), Some(g_out), Some(g_gate_x))
        }
        None => (None, None, None),
    };
    // Steps 1-3: the gradient in Q (a cast when the output was cast), expanded over the k slots (`clone`, k >= 2),
    // `index` backward (zeros, `index_put`); the first two already run before a recompute (`moe_bwd_head`).
    let head = match cx.moe_grad_head.take() {
        Some(head) => head,
        None => grad_head(cx, sv.moe, (g, g_bytes, owned)),
    };
    // `index_backward` writes the gradient into its `new_zeros` in place (`index_put_` with accumulate: no
    // buffer of its own; stub-cuda snapshot of mixtral-256-v1k-e8top4-i1024-bf16amp, step 1, block 1: the clone
    // and the zeros are the only [S, C] buffers). Its sort of the indices takes a few [S] int64 buffers and CUB's
    // scratch, all under 1 MiB and freed at once (small pool; not modelled).
    let g_weighted = cx.alloc(s * c * q, Temporary, "new_zeros");
    cx.sim.free_some(&[head.expanded, Some(sv.inverse)]);
    if head.g_owned {
        cx.free(head.g_q);
    }
    // Step 4: `mul` backward: the scores' gradient (summed over C) and the experts' output gradient.
    let g_prod_scores = cx.alloc(s * c * q, Temporary, "mul");
    let mut g_down = cx.alloc(s * c * q, Temporary, "mul");
    if q != w {
        let cast = cx.alloc(s * c * w, Temporary, "_to_copy");
        cx.free(g_down);
        g_down = cast;
    }
    let mut g_scores = cx.alloc(s * q, Temporary, "sum");
    if p != q {
        let cast = cx.alloc(s * p, Temporary, "_to_copy");
        cx.free(g_scores);
        g_scores = cast;
    }
    cx.sim
        .free_all(&[g_prod_scores, g_weighted, sv.scores_pairs, sv.down]);
    // Step 5: down's grouped GEMM backward: the dense weight gradient (none for a frozen weight; a ParamWrapper's
    // merged weight's goes through `baddbmm`'s backward), then the input gradient.
    let grad_cat = if cx.have_grads { Temporary } else { Grads };
    let weight_grad = |cx: &mut Ctx, ex: &Experts, elems: u64| match ex {
        Experts::Trained => Some(cx.alloc(elems * w, grad_cat, "_grouped_mm")),
        Experts::Wrapped(_) => Some(cx.alloc(elems * w, Temporary, "_grouped_mm")),
        Experts::Frozen => None,
    };
    let gw_down = weight_grad(cx, &sv.down_w, e * c * i);
    if gw_down.is_some() {
        grouped_mm_internals(cx, w);
    }
    let g_prod = cx.alloc(s * i * w, Temporary, "_grouped_mm");
    grouped_mm_internals(cx, w);
    let down_w = std::mem::replace(&mut sv.down_w, Experts::Frozen);
    let mut pending = Vec::new();
    match (down_w, gw_down) {
        (Experts::Wrapped(wr), Some(gw)) => {
            cx.sim.free_some(&[Some(g_down), wr.merged, Some(sv.prod)]);
            let (a, b) = (wr.a, wr.b);
            pending.push((wr.backward(cx, gw), (a, b)));
        }
        (_, gw) => {
            if let Some(gw) = gw {
                expert_grad(cx, gw);
            }
            cx.sim.free_all(&[g_down, sv.prod]);
        }
    }
    // Step 6: SwiGLU's backward, the halves' gradients concatenated for gate_up.
    let g_act = cx.alloc(s * i * w, Temporary, "mul");
    let g_up = cx.alloc(s * i * w, Temporary, "mul");
    cx.sim.free_all(&[g_prod, sv.act]);
    let g_gate = cx.alloc(s * i * w, Temporary, crate::eager::act_bwd_name(cx));
    cx.sim.free_all(&[g_act, sv.gate_up]);
    let g_gate_up = cx.alloc(s * 2 * i * w, Temporary, "cat");
    cx.sim.free_all(&[g_gate, g_up]);
    // Step 7: gate_up's grouped GEMM backward.
    let gw_gate_up = weight_grad(cx, &sv.gate_up_w, e * 2 * i * c);
    if gw_gate_up.is_some() {
        grouped_mm_internals(cx, w);
    }
    let g_x_pairs = cx.alloc(s * c * w, Temporary, "_grouped_mm");
    grouped_mm_internals(cx, w);
    let gate_up_w = std::mem::replace(&mut sv.gate_up_w, Experts::Frozen);
    match (gate_up_w, gw_gate_up) {
        (Experts::Wrapped(wr), Some(gw)) => {
            cx.sim.free_some(&[
                Some(g_gate_up),
                wr.merged,
                Some(sv.offsets),
                Some(sv.x_pairs),
            ]);
            let (a, b) = (wr.a, wr.b);
            // gate_up's adapters reach `.grad` first (the snapshot's order).
            pending.insert(0, (wr.backward(cx, gw), (a, b)));
        }
        (_, gw) => {
            if let Some(gw) = gw {
                expert_grad(cx, gw);
            }
            cx.sim.free_all(&[g_gate_up, sv.offsets, sv.x_pairs]);
        }
    }
    // Step 8: the scores' gather backward (in place into its zeros, as step 3).
    let g_topk = cx.alloc(s * p, Temporary, "new_zeros");
    cx.sim.free_all(&[g_scores, sv.perm]);
    // Step 9: the inputs' gather backward, the k copies of each token summed (in place into its zeros).
    let g_x_experts = cx.alloc(n * c * x, Temporary, "new_zeros");
    cx.sim.free_all(&[g_x_pairs, sv.token_of]);
    for (grads, shape) in pending {
        land(cx, grads, shape);
    }
    // Step 10: back to fp32, the renormalisation's division backward, top-k's scatter, softmax's backward.
    let mut g_values = g_topk;
    if p != 4 {
        let cast = cx.alloc(n * k * 4, Temporary, "_to_copy");
        cx.free(g_values);
        g_values = cast;
    }
    if let Some([sum, clone]) = sv.renorm {
        let d1 = cx.alloc(n * k * 4, Temporary, "div");
        let d2 = cx.alloc(n * k * 4, Temporary, "div");
        let neg = cx.alloc(n * k * 4, Temporary, "neg");
        let mul = cx.alloc(n * k * 4, Temporary, "mul");
        cx.sim.free_all(&[neg, d2, d1]);
        let d3 = cx.alloc(n * k * 4, Temporary, "div");
        let g_sum = cx.alloc(n * 4, Temporary, "sum");
        cx.sim.free_all(&[mul, g_values, sum, clone]);
        let add = cx.alloc(n * k * 4, Temporary, "add");
        cx.sim.free_all(&[d3, g_sum]);
        g_values = add;
    }
    let zeros = cx.alloc(n * e * 4, Temporary, "new_zeros");
    let scattered = cx.alloc(n * e * 4, Temporary, "scatter");
    cx.sim.free_all(&[zeros, g_values, sv.topk_idx]);
    let mut g_logits = cx.alloc(n * e * 4, Temporary, "_softmax_backward_data");
    cx.sim.free_all(&[scattered, sv.softmax]);
    let mut g_logits_bytes = 4;
    // The auxiliary loss's gradient of the same logits meets this one in the logits' dtype (fake-cuda trace of
    // mixtral-256-e8top2-aux-fp16amp: `_to_copy`, then `add`).
    if sv.moe.aux_loss {
        if let Some(aux) = cx.aux_grads.pop() {
            let cast = (r != 4).then(|| cx.alloc(n * e * r, Temporary, "_to_copy"));
            if cast.is_some() {
                cx.free(g_logits);
            }
            let sum = cx.alloc(n * e * r, Temporary, "add");
            cx.free(aux);
            match cast {
                Some(c) => cx.free(c),
                None => cx.free(g_logits),
            }
            (g_logits, g_logits_bytes) = (sum, r);
        }
    }
    // Step 11: the router Linear (the last to read the input, but for Qwen2-MoE's shared expert).
    let router_input = if shared_mlp.is_some() { None } else { norm_out };
    let g_x_router = ops::linear_bwd(cx, g_logits, g_logits_bytes, true, sv.router, router_input);
    if let Some(ra) = sv.router_adapter.take() {
        router_adapter_bwd(cx, ra);
    }
    // Step 12: the input's gradients summed (the shared gate's and the shared expert's too).
    let mut g_x = ops::grad_sum(cx, g_x_experts, g_x_router, n * c * x);
    if let Some(g_gate_x) = gate_in {
        g_x = ops::grad_sum(cx, g_x, g_gate_x, n * c * x);
    }
    if let (Some(g_out), Some(mlp)) = (shared_grad, shared_mlp) {
        let width = cx.m.shared_expert_size;
        let g_shared = swiglu_bwd(cx, (g_out, r, true), mlp, norm_out, width);
        g_x = ops::grad_sum(cx, g_x, g_shared, n * c * x);
    }
    g_x
}

/// The router's ParamWrapper after the router's `mm` backward (which handed the merged weight's gradient on and
/// let it go, `LinearSaved::parametrized`): the merged weight goes, `* scaling`'s backward, `B @ A`'s (A's
/// gradient, then B's, each with cuBLAS's workspace), autocast's casts of A and B go, and the gradients reach
/// the fp32 adapters (B's cast first). Snapshot of mixtral-lora-r8-all-bf16amp.
fn router_adapter_bwd(cx: &mut Ctx, ra: RouterAdapter) {
    let (c, e) = (cx.m.n_embd, cx.m.n_experts);
    let rank = cx.lora.map_or(0, |l| l.r);
    cx.free(ra.merged);
    let g = cx.alloc(e * c * ra.pd, Temporary, "mul");
    let ga = cx.alloc(rank * c * ra.pd, Temporary, "mm");
    cx.matmul_workspace();
    let gb = cx.alloc(e * rank * ra.pd, Temporary, "mm");
    cx.matmul_workspace();
    cx.free(g);
    let cat = if cx.have_grads { Temporary } else { Grads };
    let (ga, gb) = match ra.casts {
        Some(casts) => {
            cx.sim.free_all(&casts);
            let gb32 = cx.alloc(e * rank * 4, cat, "_to_copy");
            cx.free(gb);
            let ga32 = cx.alloc(rank * c * 4, cat, "_to_copy");
            cx.free(ga);
            (ga32, gb32)
        }
        None => (ga, gb),
    };
    expert_grad(cx, gb);
    expert_grad(cx, ga);
}

impl MoeSaved {
    /// Whether a Linear reading the block's input holds it until its backward (the router; Qwen2-MoE's shared
    /// expert's gate and up projections and its gate): as `LinearSaved::holds_input`.
    pub fn holds_input(&self) -> bool {
        let shared = self
            .shared
            .as_ref()
            .is_some_and(|sh| sh.gate.holds_input() || sh.mlp.holds_input());
        self.router.holds_input() || shared
    }

    /// Frees what peft's ParamWrappers made for the block's forward: the experts' proxies and merged weights, the
    /// router adapter's merged weight (its casts go to autocast's cache, which holds them to the forward's end).
    fn free_wrappers(&self, cx: &mut Ctx) {
        for ex in [&self.gate_up_w, &self.down_w] {
            if let Experts::Wrapped(wr) = ex {
                cx.sim.free_some(&wr.tensors());
            }
        }
        if let Some(ra) = &self.router_adapter {
            cx.free(ra.merged);
            cx.autocast_cache.extend(ra.casts.iter().flatten());
        }
    }

    /// Frees what the block saved (a checkpointed block after its forward) and returns its Linears in the order
    /// they ran (for their autocast casts).
    pub fn release(&self, cx: &mut Ctx) -> Vec<&LinearSaved> {
        cx.sim.free_all(&[
            self.softmax,
            self.topk_idx,
            self.perm,
            self.token_of,
            self.inverse,
            self.x_pairs,
            self.scores_pairs,
            self.offsets,
            self.gate_up,
            self.act,
            self.prod,
            self.down,
        ]);
        if let Some([a, b]) = self.renorm {
            cx.sim.free_all(&[a, b]);
        }
        self.free_wrappers(cx);
        let mut linears = Vec::new();
        if let Some(sh) = &self.shared {
            cx.sim.free_all(&[sh.out, sh.sigmoid]);
            linears.extend(sh.mlp.release(cx));
        }
        linears.push(&self.router);
        if let Some(sh) = &self.shared {
            linears.push(&sh.gate);
        }
        linears
    }
}
