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
use crate::sim::Category::{Activations, Grads, Temporary};
use crate::sim::Tensor;
use crate::tensors::{self as ops, Ctx, LinearSaved};

/// What the MoE block keeps for its backward.
pub struct MoeSaved {
    moe: Moe,
    router: LinearSaved,
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
    let (n, c, i) = (cx.n, cx.m.n_embd, cx.m.intermediate_size);
    let (e, k) = (cx.m.n_experts, cx.m.experts_per_token);
    let s = n * k;
    let (x, r, w, p, q) = dtypes(cx, moe);
    // Qwen2-MoE runs its shared expert first: Llama's MLP of its own width on the same input.
    let shared = moe
        .shared_expert
        .then(|| swiglu_fwd(cx, input, cx.m.shared_expert_size, false));
    // Router (steps 1-6): the Linear (autocast's casts saved), the logits to fp32, softmax and top-k.
    let (logits, router) = ops::linear_fwd(cx, x, c, e, false, Temporary);
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
    // Experts (steps 7-18): sort the pairs by expert, gather their inputs and scores, offsets per expert.
    let sorted = cx.alloc(s * 8, Temporary, "sort");
    let perm = cx.alloc(s * 8, Activations, "sort");
    let token_of = cx.alloc(s * 8, Activations, "floor_divide");
    let x_pairs = cx.alloc(s * c * x, Activations, "index");
    let scores_pairs = cx.alloc(s * p, Activations, "index");
    let ids32 = cx.alloc(s * 4, Temporary, "_to_copy");
    let histc = cx.alloc(e * 4, Temporary, "histc");
    let offsets = cx.alloc(e * 4, Activations, "cumsum");
    let gate_up = cx.alloc(s * 2 * i * w, Activations, "_grouped_mm");
    grouped_mm_internals(cx, w);
    cx.drop_unsaved(x_pairs);
    let act = cx.alloc(s * i * w, Activations, "silu");
    let prod = cx.alloc(s * i * w, Activations, "mul");
    cx.drop_unsaved(gate_up);
    cx.drop_unsaved(act);
    let down = cx.alloc(s * c * w, Activations, "_grouped_mm");
    grouped_mm_internals(cx, w);
    cx.drop_unsaved(prod);
    cx.drop_unsaved(offsets);
    let weighted = cx.alloc(s * c * q, Temporary, "mul");
    cx.drop_unsaved(down);
    cx.drop_unsaved(scores_pairs);
    let inverse = cx.alloc(s * 8, Activations, "empty_like");
    let arange = cx.alloc(s * 8, Temporary, "arange");
    cx.free(arange);
    let unsorted = cx.alloc(s * c * q, Temporary, "index");
    cx.free(weighted);
    let mut out = cx.alloc(n * c * q, Temporary, "sum");
    // Step 19: what the block held to its end. With the auxiliary loss the model returns the router logits: they
    // live to the end of the loss.
    cx.sim.free_all(&[sorted, ids32, histc, unsorted, scores]);
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
        let (g, gate) = ops::linear_fwd(cx, x, c, 1, false, Temporary);
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
    let saved = MoeSaved {
        moe,
        router,
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
        shared,
    };
    (saved, out)
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
    // `index` backward (zeros, `index_put`).
    let mut g_q = g;
    let mut g_owned = owned;
    if g_bytes != q {
        g_q = cx.alloc(n * c * q, Temporary, "_to_copy");
        if owned {
            cx.free(g);
        }
        g_owned = true;
    }
    // `index_backward` writes the gradient into its `new_zeros` in place (`index_put_` with accumulate: no
    // buffer of its own; stub-cuda snapshot of mixtral-256-v1k-e8top4-i1024-bf16amp, step 1, block 1: the clone
    // and the zeros are the only [S, C] buffers). Its sort of the indices takes a few [S] int64 buffers and CUB's
    // scratch, all under 1 MiB and freed at once (small pool; not modelled).
    let expanded = (k >= 2).then(|| cx.alloc(s * c * q, Temporary, "clone"));
    let g_weighted = cx.alloc(s * c * q, Temporary, "new_zeros");
    cx.sim.free_some(&[expanded, Some(sv.inverse)]);
    if g_owned {
        cx.free(g_q);
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
    // Step 5: down's grouped GEMM backward: the dense weight gradient, then the input gradient.
    let grad_cat = if cx.have_grads { Temporary } else { Grads };
    let gw_down = cx.alloc(e * c * i * w, grad_cat, "_grouped_mm");
    grouped_mm_internals(cx, w);
    let g_prod = cx.alloc(s * i * w, Temporary, "_grouped_mm");
    grouped_mm_internals(cx, w);
    expert_grad(cx, gw_down);
    cx.sim.free_all(&[g_down, sv.prod]);
    // Step 6: SwiGLU's backward, the halves' gradients concatenated for gate_up.
    let g_act = cx.alloc(s * i * w, Temporary, "mul");
    let g_up = cx.alloc(s * i * w, Temporary, "mul");
    cx.sim.free_all(&[g_prod, sv.act]);
    let g_gate = cx.alloc(s * i * w, Temporary, crate::eager::act_bwd_name(cx));
    cx.sim.free_all(&[g_act, sv.gate_up]);
    let g_gate_up = cx.alloc(s * 2 * i * w, Temporary, "cat");
    cx.sim.free_all(&[g_gate, g_up]);
    // Step 7: gate_up's grouped GEMM backward.
    let gw_gate_up = cx.alloc(e * 2 * i * c * w, grad_cat, "_grouped_mm");
    grouped_mm_internals(cx, w);
    let g_x_pairs = cx.alloc(s * c * w, Temporary, "_grouped_mm");
    grouped_mm_internals(cx, w);
    expert_grad(cx, gw_gate_up);
    cx.sim.free_all(&[g_gate_up, sv.offsets, sv.x_pairs]);
    // Step 8: the scores' gather backward (in place into its zeros, as step 3).
    let g_topk = cx.alloc(s * p, Temporary, "new_zeros");
    cx.sim.free_all(&[g_scores, sv.perm]);
    // Step 9: the inputs' gather backward, the k copies of each token summed (in place into its zeros).
    let g_x_experts = cx.alloc(n * c * x, Temporary, "new_zeros");
    cx.sim.free_all(&[g_x_pairs, sv.token_of]);
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
