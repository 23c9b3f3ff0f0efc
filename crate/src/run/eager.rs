//! One micro-step in eager mode for any model `arch::Arch` describes: forward block by block, the loss,
//! backward block by block, with non-reentrant activation checkpointing per block.
//!
//! A block is `x = x + attn(norm_1(x)); x = x + mlp(norm_2(x))`. Each part of it (norm, attention, MLP, the
//! embeddings, the head and its loss) is walked here from the description, built from the per-op functions of
//! `tensors`, which say what each op allocates, saves and frees. The two attention layouts are nanoGPT's
//! `CausalSelfAttention` (one fused QKV Linear whose views SDPA saves, or the manual T x T path) and Hugging Face's
//! `LlamaAttention` (separate q/k/v Linears, rotary on q and k, grouped-query SDPA); the two MLPs are GELU and
//! SwiGLU.

use crate::arch::{Core, Loss, Mlp, Norm, Positions, Program, Qkv, RotaryCat};
use crate::distributed;
use crate::finetune::Role;
use crate::sim::Category::{self, Activations, Grads, Logits, Temporary};
use crate::sim::Tensor;
use crate::tensors::{self as ops, Ctx, LinearSaved, NormSaved, SdpaSaved};

// ---------------------------------------------------------------------------------------------------------
// Saved state

/// The manual attention path's saved tensors.
struct ManualSaved {
    q: Tensor,
    kt: Tensor,
    mask: Tensor,
    softmax: Tensor,
    /// (dropout output if saved, mask).
    dropout: Option<(Option<Tensor>, Tensor)>,
    att_cast: Option<Tensor>,
    v: Tensor,
}

enum CoreSaved {
    Sdpa(SdpaSaved),
    Manual(ManualSaved),
}

/// What the attention keeps for its backward. The variants differ in size, but every block's state is boxed
/// (`BlockState::Saved`), so the enum is never moved around by value in bulk.
#[allow(clippy::large_enum_variant)]
enum AttnSaved {
    /// One QKV Linear, q/k/v views of its output.
    Fused {
        c_attn: LinearSaved,
        /// The fused QKV output, when the kernel saves views of it (SDPA).
        qkv: Option<Tensor>,
        core: CoreSaved,
        /// The attention output as the output projection saw it (manual: the contiguous copy).
        y: Option<Tensor>,
        c_proj: LinearSaved,
        drop: Option<Tensor>,
    },
    /// Separate q/k/v Linears with rotary q and k.
    Separate(SeparateSaved),
}

struct SeparateSaved {
    /// q's Linear, or the packed q/k/v Linear (then `k` and `v` are None and `v_out` is its output).
    q: LinearSaved,
    k: Option<LinearSaved>,
    v: Option<LinearSaved>,
    /// Qwen3's head-wise norms of q and k.
    q_norm: Option<QkNorm>,
    k_norm: Option<QkNorm>,
    v_out: Tensor,
    /// q and k as SDPA saved them (autocast's casts of the rotated fp32 q and k, or the rotated tensors).
    q_att: Tensor,
    k_att: Tensor,
    /// A sliding window the sequence reaches: transformers passes SDPA an explicit mask, so it repeats K and V
    /// itself (v's repeat is saved) and aten makes the mask additive (saved); memory-efficient kernel.
    window: Option<Windowed>,
    core: SeparateCore,
    /// The contiguous copy of a head-major SDPA output that o_proj read and saved (`RotaryCat::Each`/`Both`).
    y_copy: Option<Tensor>,
    o: LinearSaved,
}

struct Windowed {
    v_rep: Option<Tensor>,
    /// K and V reach the kernel at all heads (copies, or views with one KV head).
    repeated: bool,
    bias: Tensor,
}

/// The kernel of a Hugging Face attention: SDPA, `attn_implementation="eager"` (`Core::Manual`) or
/// `"flash_attention_2"` (`Arch::flash_attn`).
enum SeparateCore {
    Sdpa(SdpaSaved),
    Eager(HfEager),
    /// The flash-attn package's `FlashAttnFunc` (HF's `flash_attention_2`).
    Flash(ops::FlashSaved),
}

/// What HF's `eager_attention_forward` keeps: q and k as the first matmul saved them, the fp32 softmax, its
/// 2-byte copy for the second matmul, v as that matmul saved it, and the contiguous output o_proj reads.
struct HfEager {
    q_m: Tensor,
    k_m: Tensor,
    /// Gemma 2's soft-capped scores: tanh's output.
    softcap: Option<Tensor>,
    softmax: Tensor,
    attn_lp: Option<Tensor>,
    v_m: Tensor,
    y: Tensor,
}

impl AttnSaved {
    /// Bytes per element of the branch's output: its output projection's (a 2-byte SDPA output through a 4-bit
    /// base's Linear stays 2-byte).
    fn out_bytes(&self) -> u64 {
        match self {
            AttnSaved::Fused { c_proj, .. } => c_proj.out_bytes,
            AttnSaved::Separate(s) => s.o.out_bytes,
        }
    }

    /// Whether a Linear reading the norm's output holds it (they agree but under LoRA, where an adapter may).
    fn holds_input(&self) -> bool {
        match self {
            AttnSaved::Fused { c_attn, .. } => c_attn.holds_input(),
            AttnSaved::Separate(s) => [Some(&s.q), s.k.as_ref(), s.v.as_ref()]
                .into_iter()
                .flatten()
                .any(LinearSaved::holds_input),
        }
    }
}

/// What the MLP keeps for its backward.
pub(crate) enum MlpSaved {
    Gelu {
        fc: LinearSaved,
        h: Tensor,
        g: Tensor,
        proj: LinearSaved,
        drop: Option<Tensor>,
    },
    SwiGlu {
        gate: LinearSaved,
        gate_out: Tensor,
        silu: Tensor,
        up: LinearSaved,
        up_out: Tensor,
        prod: Tensor,
        down: LinearSaved,
    },
    /// A mixture of experts (`moe`).
    Moe(Box<crate::moe::MoeSaved>),
    /// SwiGLU (or GeGLU) with one `gate_up_proj`: its output holds both halves.
    Packed {
        gate_up: LinearSaved,
        gu: Tensor,
        act: Tensor,
        prod: Tensor,
        down: LinearSaved,
    },
}

impl MlpSaved {
    /// Bytes per element of the branch's output: its down projection's (fp32 from a 4-bit base's Linear on an
    /// fp32 product), or the matmul dtype `p` for a mixture of experts.
    fn out_bytes(&self, p: u64) -> u64 {
        match self {
            MlpSaved::Gelu { proj, .. } => proj.out_bytes,
            MlpSaved::SwiGlu { down, .. } | MlpSaved::Packed { down, .. } => down.out_bytes,
            MlpSaved::Moe(_) => p,
        }
    }

    /// As `AttnSaved::holds_input`.
    pub(crate) fn holds_input(&self) -> bool {
        match self {
            MlpSaved::Gelu { fc, .. } => fc.holds_input(),
            MlpSaved::SwiGlu { gate, up, .. } => gate.holds_input() || up.holds_input(),
            MlpSaved::Packed { gate_up, .. } => gate_up.holds_input(),
            MlpSaved::Moe(m) => m.holds_input(),
        }
    }

    /// Frees what the MLP saved and returns its Linears in the order they ran (for their autocast casts).
    pub(crate) fn release(&self, cx: &mut Ctx) -> Vec<&LinearSaved> {
        let mut linears: Vec<&LinearSaved> = Vec::new();
        match self {
            MlpSaved::Gelu {
                fc,
                h,
                g,
                proj,
                drop,
                ..
            } => {
                cx.sim.free_all(&[*h, *g]);
                if let Some(t) = drop {
                    cx.free(*t);
                }
                linears.extend([fc, proj]);
            }
            MlpSaved::SwiGlu {
                gate,
                gate_out,
                silu,
                up,
                up_out,
                prod,
                down,
            } => {
                cx.sim.free_all(&[*gate_out, *silu, *up_out, *prod]);
                linears.extend([gate, up, down]);
            }
            MlpSaved::Packed {
                gate_up,
                gu,
                act,
                prod,
                down,
            } => {
                cx.sim.free_all(&[*gu, *act, *prod]);
                linears.extend([gate_up, down]);
            }
            MlpSaved::Moe(m) => linears.extend(m.release(cx)),
        }
        linears
    }
}

/// Gemma 2's norm on a branch's output: what it saved, and the branch output when the norm saved it itself
/// (an fp32 branch; a 2-byte one is copied to fp32 and dies).
struct PostNorm {
    saved: NormSaved,
    input: Option<Tensor>,
    /// Bytes per element of the branch output, and so of the norm's output and input gradient.
    bytes: u64,
}

struct BlockSaved {
    post1: Option<PostNorm>,
    post2: Option<PostNorm>,
    x_in: Tensor,
    norm1: NormSaved,
    norm1_out: Option<Tensor>,
    attn: AttnSaved,
    /// The stream after the attention's add (None with a parallel residual, whose branches both read `x_in`).
    x_mid: Option<Tensor>,
    norm2: NormSaved,
    norm2_out: Option<Tensor>,
    mlp: MlpSaved,
}

/// A block after the forward: everything it saved, or (checkpointed) only its input.
enum BlockState {
    Saved(Box<BlockSaved>),
    Checkpointed(Tensor),
}

/// What the forward leaves for the loop and the backward.
pub struct Forward {
    blocks: Vec<BlockState>,
    idx: Tensor,
    /// Learned positions: the `arange` of positions.
    pos: Option<Tensor>,
    /// Rotary: cos and sin.
    cos_sin: Option<[Tensor; 2]>,
    /// HF eager attention's masks, when checkpointed blocks still need them.
    masks: Vec<Tensor>,
    /// Gemma 2's soft-capped logits: tanh's output.
    logit_tanh: Option<Tensor>,
    emb_drop: Option<Tensor>,
    x_last: Tensor,
    norm_f: NormSaved,
    norm_f_out: Option<Tensor>,
    lm_head: LinearSaved,
    /// The logits, when the program keeps them bound after the forward (nanoGPT's loop, until the next forward
    /// returns).
    pub logits: Option<Tensor>,
    /// The logits the loop keeps bound until its backward is done (sequence parallel's loss is the loop's).
    bound_logits: Option<Tensor>,
    log_softmax: Option<Tensor>,
    /// Sequence parallel: what `loss_parallel`'s cross-entropy saved (in place of `log_softmax`, `nll_input`).
    parallel_loss: Option<Box<distributed::LossParallel>>,
    /// Cross-entropy under autocast: nll_loss's fp32 copy of its input.
    nll_input: Option<Tensor>,
    /// The targets the loss holds: the batch's (nanoGPT), or the shifted copy of the labels (HF).
    targets: Tensor,
    /// The router auxiliary loss's saved softmax per MoE layer.
    aux_softmax: Vec<Tensor>,
}

// ---------------------------------------------------------------------------------------------------------
// Small parts

/// The batch on the device: inputs and targets, int64 B x T each (nanoGPT's `get_batch`, HF's input_ids and
/// labels).
pub fn get_batch(cx: &mut Ctx) -> (Tensor, Tensor) {
    let x = cx.alloc(cx.n * 8, Activations, "get_batch");
    let y = cx.alloc(cx.n * 8, Activations, "get_batch");
    (x, y)
}

/// `nn.Dropout` on `y` when the model has dropout: the output replaces `y`, the mask is saved.
fn dropout_on(
    cx: &mut Ctx,
    y: Tensor,
    elems: u64,
    bytes: u64,
    cat: Category,
) -> (Tensor, Option<Tensor>) {
    if !cx.arch.dropout {
        return (y, None);
    }
    let (out, mask) = ops::dropout_fwd(cx, elems, bytes, cat);
    cx.free(y);
    (out, Some(mask))
}

fn norm_fwd(cx: &mut Ctx) -> (Tensor, NormSaved) {
    match cx.arch.norm {
        Norm::LayerNorm { .. } => ops::layer_norm_fwd(cx),
        Norm::RmsNorm => ops::rms_norm_fwd(cx),
        Norm::GemmaRmsNorm => ops::gemma_rms_norm_fwd(cx),
        Norm::Olmo2RmsNorm => {
            let (n, c, r) = (cx.ns, cx.m.n_embd, cx.r);
            ops::fp32_rms_norm_fwd(cx, n, c, r, false)
        }
    }
}

/// A norm's backward; `input` is its saved input when the norm holds the last reference to it (a parallel
/// residual's second norm shares it with the first, which frees it).
///
/// `into`: the residual gradient the input's buffer already holds (a block's norm; not the final norm, whose
/// input gradient starts the residual gradient), which the input's gradients are added into in place
/// (`ops::grad_add_into`). Returns the input's gradient (`into` itself when given).
fn norm_bwd(
    cx: &mut Ctx,
    grad_out: Tensor,
    saved: NormSaved,
    input: Option<Tensor>,
    into: Option<Tensor>,
) -> Tensor {
    let dims = (cx.ns, cx.m.n_embd, cx.r);
    match cx.arch.norm {
        Norm::LayerNorm { bias } => ops::layer_norm_bwd(cx, grad_out, saved, input, bias, into),
        // Gemma's backward runs the same statistics' backward as Llama's (fake-cuda trace of a gemma bf16-amp
        // case: the same N x C fp32 temporaries, a [C] more for `1 + weight`).
        Norm::RmsNorm | Norm::GemmaRmsNorm => {
            // Sequence parallel's norms run on DTensors (`SequenceParallel` makes their input one).
            let buffer = ops::InputBuffer {
                holds: into,
                dtensor: cx.sp,
            };
            ops::rms_norm_bwd_on(cx, grad_out, saved, input, dims, buffer)
        }
        Norm::Olmo2RmsNorm => {
            let g = ops::olmo2_rms_norm_bwd(cx, grad_out, true, saved, input, dims);
            match into {
                Some(acc) => ops::grad_add_into(cx, acc, g),
                None => g,
            }
        }
    }
}

/// The gradient entering a residual branch: the residual's own gradient (shared with the skip path, so not
/// owned), or, with dropout on the branch, `native_dropout_backward` of it, after the engine cast the fp32
/// residual gradient to the branch output's dtype. Returns (gradient, its bytes per element, owned).
fn branch_grad(cx: &mut Ctx, g_residual: Tensor, mask: Option<Tensor>) -> (Tensor, u64, bool) {
    let nc = cx.ns * cx.m.n_embd;
    let (r, p) = (cx.r, cx.p);
    match mask {
        Some(mask) if r != p => {
            let g = cx.alloc(nc * p, Temporary, "_to_copy");
            (ops::dropout_bwd(cx, g, true, nc, p, mask), p, true)
        }
        Some(mask) => (
            ops::dropout_bwd(cx, g_residual, false, nc, p, mask),
            p,
            true,
        ),
        None => (g_residual, r, false),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Attention

/// nanoGPT's non-flash attention: `att = (q @ k^T) * scale`, `masked_fill(bias == 0, -inf)`, `softmax`,
/// dropout, `att @ v`, then `transpose(1, 2).contiguous()`. `matmul` on the non-contiguous head views copies
/// q, k^T and v (`clone`, saved by `bmm`). Under autocast softmax (fp32 list) runs with `half_to_float` and
/// returns fp32 directly, dropout runs on the fp32 probabilities, and the second `bmm` saves a 2-byte cast of
/// them, so the fp32 dropout output dies with the attention call. Without autocast the dropout output is what
/// `bmm` saves.
fn manual_fwd(cx: &mut Ctx) -> (CoreSaved, Tensor, Option<Tensor>) {
    let nc = cx.n * cx.m.n_embd;
    let s = ops::manual_scores_elems(cx);
    let p = cx.p;
    let q = cx.alloc(nc * p, Activations, "clone");
    let kt = cx.alloc(nc * p, Activations, "clone");
    let scores = cx.alloc(s * p, Temporary, "bmm");
    cx.matmul_workspace();
    let scaled = cx.alloc(s * p, Temporary, "mul");
    cx.free(scores);
    let mask = cx.alloc(cx.t * cx.t, Activations, "eq");
    let filled = cx.alloc(s * p, Temporary, "masked_fill");
    cx.free(scaled);
    let sb = if cx.prec.autocast() { 4 } else { p };
    let softmax = cx.alloc(s * sb, Activations, "_softmax");
    cx.free(filled);
    let dropout = cx
        .arch
        .dropout
        .then(|| ops::dropout_fwd(cx, s, sb, Activations));
    let att_cast = cx
        .prec
        .autocast()
        .then(|| cx.alloc(s * 2, Activations, "_to_copy"));
    // Under autocast nothing saves the fp32 dropout output: it is freed when the attention call returns.
    let dead_at_return = match (dropout, att_cast) {
        (Some((out, _)), Some(_)) => Some(out),
        _ => None,
    };
    let v = cx.alloc(nc * p, Activations, "clone");
    let out = cx.alloc(nc * p, Temporary, "bmm");
    cx.matmul_workspace();
    let y = cx.alloc(nc * p, Activations, "clone");
    cx.free(out);
    let saved = ManualSaved {
        q,
        kt,
        mask,
        softmax,
        dropout: dropout.map(|(o, m)| (dead_at_return.is_none().then_some(o), m)),
        att_cast,
        v,
    };
    (CoreSaved::Manual(saved), y, dead_at_return)
}

/// The backward both hand-written attentions (nanoGPT's and Hugging Face's eager one) begin with: the
/// transpose's backward as a contiguous copy of the output's gradient (`clone`, `out_elems` long), then
/// `att @ v`'s two gradients (`bmm`s: of v, `out_elems`, and of the weights, one score matrix), freeing the
/// copy and the saved v. Where autocast saved the weights in 2 bytes (`att_cast`), that copy is freed and
/// their gradient widened back to fp32 (`_to_copy`). Returns (grad of v, grad of the weights).
fn att_v_bwd(
    cx: &mut Ctx,
    g_y: Tensor,
    out_elems: u64,
    v: Tensor,
    att_cast: Option<Tensor>,
) -> (Tensor, Tensor) {
    let (p, s) = (cx.p, ops::manual_scores_elems(cx));
    let g = cx.alloc(out_elems * p, Temporary, "clone");
    cx.free(g_y);
    let g_v = cx.alloc(out_elems * p, Temporary, "bmm");
    cx.matmul_workspace();
    let mut g_att = cx.alloc(s * p, Temporary, "bmm");
    cx.matmul_workspace();
    cx.free(g);
    cx.free(v);
    if let Some(c) = att_cast {
        cx.free(c);
        let wide = cx.alloc(s * 4, Temporary, "_to_copy");
        cx.free(g_att);
        g_att = wide;
    }
    (g_v, g_att)
}

/// The backward both hand-written attentions end with: the scaling's (`mul`, one score matrix, freeing the
/// incoming gradient), then `q @ k^T`'s two gradients (`bmm`s, `qk_elems` each), freeing the scaled one.
/// Returns (grad of q, grad of k).
fn qk_bwd(cx: &mut Ctx, g_scores: Tensor, qk_elems: u64) -> (Tensor, Tensor) {
    let (p, s) = (cx.p, ops::manual_scores_elems(cx));
    let g_scaled = cx.alloc(s * p, Temporary, "mul");
    cx.free(g_scores);
    let g_q = cx.alloc(qk_elems * p, Temporary, "bmm");
    cx.matmul_workspace();
    let g_k = cx.alloc(qk_elems * p, Temporary, "bmm");
    cx.matmul_workspace();
    cx.free(g_scaled);
    (g_q, g_k)
}

/// Backward of `manual_fwd`, given the gradient of the contiguous output; returns the gradient of qkv (`cat`).
fn manual_bwd(cx: &mut Ctx, gy: Tensor, saved: ManualSaved) -> Tensor {
    let nc = cx.n * cx.m.n_embd;
    let s = ops::manual_scores_elems(cx);
    let p = cx.p;
    let sb = if cx.prec.autocast() { 4 } else { p };
    let (gv, mut g_att) = att_v_bwd(cx, gy, nc, saved.v, saved.att_cast);
    if let Some((out, mask)) = saved.dropout {
        if let Some(out) = out {
            cx.free(out);
        }
        g_att = ops::dropout_bwd(cx, g_att, true, s, sb, mask);
    }
    // softmax backward returns the gradient in the input's dtype (2 bytes under autocast).
    let g_soft = cx.alloc(s * p, Temporary, "_softmax_backward_data");
    cx.free(g_att);
    cx.free(saved.softmax);
    let g_fill = cx.alloc(s * p, Temporary, "masked_fill");
    cx.free(g_soft);
    cx.free(saved.mask);
    let (gq, gk) = qk_bwd(cx, g_fill, nc);
    cx.free(saved.kt);
    cx.free(saved.q);
    let gq2 = cx.alloc(nc * p, Temporary, "clone");
    cx.free(gq);
    let gk2 = cx.alloc(nc * p, Temporary, "clone");
    cx.free(gk);
    let cat = cx.alloc(3 * nc * p, Temporary, "cat");
    cx.sim.free_all(&[gk2, gv, gq2]);
    cat
}

/// Frees what the attention kernel saved for its backward.
fn release_core(cx: &mut Ctx, core: &CoreSaved) {
    match core {
        CoreSaved::Sdpa(a) => {
            cx.sim.free_all(&a.tensors());
        }
        CoreSaved::Manual(a) => {
            cx.sim.free_all(&[a.q, a.kt, a.mask, a.softmax, a.v]);
            if let Some((o, m)) = a.dropout {
                cx.free(m);
                if let Some(o) = o {
                    cx.free(o);
                }
            }
            if let Some(c) = a.att_cast {
                cx.free(c);
            }
        }
    }
}

/// Bytes of the rotated q or k: `q * cos` with an fp32 cos promotes a 2-byte q to fp32 under autocast.
fn rope_bytes(cx: &Ctx) -> u64 {
    if cx.arch.rope_fp32 {
        4
    } else {
        cx.p.max(cx.r)
    }
}

/// `q * cos + rotate_half(q) * sin` on `width` features of `in_bytes`: mul, neg (half), cat (rotate_half in the
/// input's dtype), mul, add. Each multiply saves only cos or sin; q itself is not saved.
fn rope_fwd(cx: &mut Ctx, width: u64, in_bytes: u64) -> Tensor {
    let rb = rope_bytes(cx);
    let m1 = cx.alloc(cx.n * width * rb, Temporary, "mul");
    let neg = cx.alloc(cx.n * width / 2 * in_bytes, Temporary, "neg");
    let cat = cx.alloc(cx.n * width * in_bytes, Temporary, "cat");
    cx.free(neg);
    let m2 = cx.alloc(cx.n * width * rb, Temporary, "mul");
    cx.free(cat);
    let out = cx.alloc(cx.n * width * rb, Activations, "add");
    cx.free(m1);
    cx.free(m2);
    out
}

/// Backward of `rope_fwd` as the engine runs it (stub-cuda snapshots of llama-tiny-fp32-mha and
/// llama-tiny-bf16amp-gqa): `rotate_half(q) * sin`'s gradient (cast back to q's dtype when an fp32 sin promoted
/// the product), rotate_half's (`neg` of one half, each half placed into a zeros tensor of q's shape by
/// `slice_backward`, the second added into the first in place), then `q * cos`'s (cast likewise), which is added
/// into the same buffer in place once the incoming gradient is released. With `rope_fp32` q was cast to fp32
/// first: the whole backward runs in fp32 and the sum is cast back to the input's dtype (`in_bytes`) at the end.
fn rope_bwd(cx: &mut Ctx, g: Tensor, width: u64, in_bytes: u64) -> Tensor {
    let rb = rope_bytes(cx);
    // The dtype rotate_half and the products' gradients come back in: q's own, or fp32 after `rope_fp32`'s cast.
    let qb = if cx.arch.rope_fp32 { rb } else { in_bytes };
    let full = cx.n * width * qb;
    let product_grad = |cx: &mut Ctx| {
        let g = cx.alloc(cx.n * width * rb, Temporary, "mul");
        if rb != qb {
            let cast = cx.alloc(full, Temporary, "_to_copy");
            cx.free(g);
            cast
        } else {
            g
        }
    };
    let g_sin = product_grad(cx);
    let neg = cx.alloc(cx.n * width / 2 * qb, Temporary, "neg");
    let placed = cx.alloc(full, Temporary, "slice_backward");
    cx.free(neg);
    let placed_other = cx.alloc(full, Temporary, "slice_backward");
    cx.free(g_sin);
    let acc = ops::grad_add_into(cx, placed, placed_other);
    let g_cos = product_grad(cx);
    cx.free(g);
    let sum = ops::grad_add_into(cx, acc, g_cos);
    if qb != in_bytes {
        let lp = cx.alloc(cx.n * width * in_bytes, Temporary, "_to_copy");
        cx.free(sum);
        lp
    } else {
        sum
    }
}

/// Rotary on q (`qd` features) and k (`kv`) read in `in_bytes`: on whole heads, or on the first
/// `rotary_dims` of each head followed by the concatenation with the rest (`RotaryCat`), which makes full-width
/// q and k in the rotary dtype (fake-cuda traces of phi3-512-untied-bf16amp and neox-512-bf16amp: `cat`,
/// N x width x 4 under autocast, the rotated part freed).
fn rotary_fwd(cx: &mut Ctx, qd: u64, kv: u64, in_bytes: u64) -> (Tensor, Tensor) {
    let part = |cx: &Ctx, width: u64| width / cx.m.head_dim() * cx.m.rotary_dims();
    let cat = |cx: &mut Ctx, rotated: Tensor, width: u64| {
        let out = cx.alloc(cx.n * width * rope_bytes(cx), Activations, "cat");
        cx.free(rotated);
        out
    };
    match cx.arch.rotary_cat {
        RotaryCat::Whole => (rope_fwd(cx, qd, in_bytes), rope_fwd(cx, kv, in_bytes)),
        RotaryCat::Each => {
            let q = rope_fwd(cx, part(cx, qd), in_bytes);
            let q = cat(cx, q, qd);
            let k = rope_fwd(cx, part(cx, kv), in_bytes);
            (q, cat(cx, k, kv))
        }
        RotaryCat::Both => {
            let q = rope_fwd(cx, part(cx, qd), in_bytes);
            let k = rope_fwd(cx, part(cx, kv), in_bytes);
            let q = cat(cx, q, qd);
            (q, cat(cx, k, kv))
        }
    }
}

/// Backward of `rotary_fwd` for q or k (`g`: the gradient of the rotated full-width tensor): the whole-head
/// rotary's, or, after a concatenation, its backward: the rest's gradient slice cast to the input's dtype
/// (`_to_copy`), the rotary backward on the rotated slice, both placed into the head's width
/// (`slice_backward`) and summed in place; the result is head-major, so `view` to the projection's token-major
/// layout copies it (`clone`; traces as in `rotary_fwd`).
fn rotary_bwd(cx: &mut Ctx, g: Tensor, width: u64, in_bytes: u64) -> Tensor {
    if cx.arch.rotary_cat == RotaryCat::Whole {
        return rope_bwd(cx, g, width, in_bytes);
    }
    let full = cx.n * width * in_bytes;
    let rot = width / cx.m.head_dim() * cx.m.rotary_dims();
    let rest = (rot < width && rope_bytes(cx) != in_bytes)
        .then(|| cx.alloc(cx.n * (width - rot) * in_bytes, Temporary, "_to_copy"));
    let g_rot = rope_bwd(cx, g, rot, in_bytes);
    let placed = cx.alloc(full, Temporary, "slice_backward");
    let placed_rest = (rot < width).then(|| cx.alloc(full, Temporary, "slice_backward"));
    // The input buffer holds the first placed gradient alone: the second is added into it in place
    // (`ops::grad_add_into`; stub-cuda snapshot of neox-256-fp32-sgd: no N x C `add` between q's or k's two
    // `slice_backward`s).
    cx.sim.free_some(&[placed_rest, Some(g_rot), rest]);
    placed
}

/// The head-major gradient of q or k back in the projection's token-major layout, where the packed q/k/v
/// slices place them one by one (`Qkv::PackedSlices`, after a rotary concatenation).
fn token_major(cx: &mut Ctx, g: Tensor, width: u64, bytes: u64) -> Tensor {
    if cx.arch.rotary_cat == RotaryCat::Whole || cx.arch.qkv != Qkv::PackedSlices {
        return g;
    }
    let c = cx.alloc(cx.n * width * bytes, Temporary, "clone");
    cx.free(g);
    c
}

/// The gradient of a packed q/k/v projection's output from q's, k's and v's (`Qkv::PackedSlices`: each placed
/// into the packed width with `slice_backward` and summed, v's first, as the engine reaches them: fake-cuda trace
/// of phi3-512-untied-bf16amp; `Qkv::PackedHeads`: concatenated per head, then copied to token-major order:
/// trace of neox-512-bf16amp).
fn packed_qkv_bwd(cx: &mut Ctx, gq: Tensor, gk: Tensor, gv: Tensor, bytes: u64) -> Tensor {
    let width = cx.m.q_dim() + 2 * cx.m.kv_dim();
    let full = cx.n * width * bytes;
    if cx.arch.qkv == Qkv::PackedHeads {
        let cat = cx.alloc(full, Temporary, "cat");
        cx.sim.free_all(&[gk, gq, gv]);
        let c = cx.alloc(full, Temporary, "clone");
        cx.free(cat);
        return c;
    }
    let sv = cx.alloc(full, Temporary, "slice_backward");
    cx.free(gv);
    let sk = cx.alloc(full, Temporary, "slice_backward");
    cx.free(gk);
    let acc = ops::grad_sum(cx, sv, sk, full);
    let sq = cx.alloc(full, Temporary, "slice_backward");
    cx.free(gq);
    ops::grad_sum(cx, acc, sq, full)
}

/// A head-wise RMSNorm of q or k (Qwen3): what it saved, its input (kept when saved), its output.
struct QkNorm {
    saved: NormSaved,
    input: Tensor,
    /// Bytes per element of the projection output it read.
    in_bytes: u64,
    out: Tensor,
    out_bytes: u64,
}

/// The head-wise RMSNorm on a projection's output (`width` = heads x head_dim, `p` bytes per element: the
/// matmul dtype, or fp32 from a 4-bit base's Linear on the fp32 stream).
fn qk_norm_fwd(cx: &mut Ctx, input: Tensor, width: u64, p: u64) -> QkNorm {
    let (rows, cols) = qk_norm_shape(cx, width);
    // Gemma 3's are GemmaRMSNorms and OLMo 2's its own: fp32 inside, the output back in the projection's dtype.
    let gemma = cx.arch.norm == Norm::GemmaRmsNorm;
    let fp32_inside = gemma || cx.arch.norm == Norm::Olmo2RmsNorm;
    let (out, saved) = if fp32_inside {
        ops::fp32_rms_norm_fwd(cx, rows, cols, p, gemma)
    } else {
        ops::rms_norm_fwd_on(cx, rows, cols, p)
    };
    // A 2-byte input was copied to fp32 (and the copy saved): the projection output itself dies here.
    if p == 2 {
        cx.free(input);
    }
    QkNorm {
        saved,
        input,
        in_bytes: p,
        out,
        out_bytes: if fp32_inside { p } else { p.max(cx.pb) },
    }
}

fn qk_norm_bwd(cx: &mut Ctx, g: Tensor, n: QkNorm, width: u64) -> Tensor {
    let (rows, cols) = qk_norm_shape(cx, width);
    let dims = (rows, cols, n.in_bytes);
    if cx.arch.norm == Norm::Olmo2RmsNorm {
        ops::olmo2_rms_norm_bwd(cx, g, true, n.saved, Some(n.input), dims)
    } else {
        ops::rms_norm_bwd_on(cx, g, n.saved, Some(n.input), dims, Default::default())
    }
}

/// Rows and width of a q or k norm: a row per head (Qwen 3, Gemma 3), or per token (OLMo 2).
fn qk_norm_shape(cx: &Ctx, width: u64) -> (u64, u64) {
    if cx.arch.qk_norm_full {
        (cx.n, width)
    } else {
        let hd = cx.m.head_dim();
        (cx.n * width / hd, hd)
    }
}

/// HF's `eager_attention_forward` on the rotated q and k (`rope_bytes`) and v (matmul dtype): `repeat_kv` for
/// grouped-query heads (a copy of k in its dtype, and of v), `q @ k^T` (autocast casts both to 2 bytes; `bmm`
/// needs a contiguous q, so q is copied, and k too when it was not repeated), `* scaling`, `+ causal_mask`
/// (promoted to the mask's dtype, the stream's), `softmax(dtype=float32)` (saved), its 2-byte copy for the second
/// matmul (autocast's cast, or `.to(query.dtype)` in pure bf16; saved), `@ v` (v made contiguous, saved), then
/// `transpose(1, 2).contiguous()` (saved by o_proj). Order from the fake-cuda traces of llama-manual-512-gqa
/// (bf16-amp) and llama-manual-256 (fp32).
fn hf_eager_fwd(cx: &mut Ctx, q_rot: Tensor, k_rot: Tensor, v_out: Tensor) -> (HfEager, Tensor) {
    let (qd, kv) = (cx.m.q_dim(), cx.m.kv_dim());
    let (n, p, rb) = (cx.n, cx.p, rope_bytes(cx));
    let s = ops::manual_scores_elems(cx);
    let gqa = kv != qd;
    let _ = (q_rot, k_rot, v_out);
    let k_rep = gqa.then(|| cx.alloc(n * qd * rb, Temporary, "clone"));
    let v_rep = gqa.then(|| cx.alloc(n * qd * p, Activations, "clone"));
    let (q_m, k_m) = if cx.prec.autocast() {
        let q_c = cx.alloc(n * qd * p, Temporary, "_to_copy");
        let k_c = cx.alloc(n * qd * p, Activations, "_to_copy");
        let q_m = cx.alloc(n * qd * p, Activations, "clone");
        let k_m = if gqa {
            k_c
        } else {
            let k_m = cx.alloc(n * qd * p, Activations, "clone");
            cx.free(k_c);
            k_m
        };
        let scores = cx.alloc(s * p, Temporary, "bmm");
        cx.matmul_workspace();
        cx.free(q_c);
        (q_m, (k_m, scores))
    } else {
        let q_m = cx.alloc(n * qd * rb, Activations, "clone");
        let k_m = match k_rep {
            Some(k) => k,
            None => cx.alloc(n * qd * rb, Activations, "clone"),
        };
        let scores = cx.alloc(s * p, Temporary, "bmm");
        cx.matmul_workspace();
        (q_m, (k_m, scores))
    };
    let (k_m, scores) = k_m;
    let mut scaled = cx.alloc(s * p, Temporary, "mul");
    cx.free(scores);
    // Gemma 2: `tanh(scores / cap) * cap`; tanh's output is saved (trace of gemma2-512-hd256-win256-bf16amp).
    let softcap = cx.arch.attn_softcap.then(|| {
        let d = cx.alloc(s * p, Temporary, "div");
        cx.free(scaled);
        let t = cx.alloc(s * p, Activations, "tanh");
        cx.free(d);
        scaled = cx.alloc(s * p, Temporary, "mul");
        t
    });
    let masked = cx.alloc(s * p.max(cx.r), Temporary, "add");
    cx.free(scaled);
    let softmax = cx.alloc(s * 4, Activations, "_softmax");
    cx.free(masked);
    let attn_lp = (cx.prec.autocast() || rb != 4).then(|| cx.alloc(s * p, Activations, "_to_copy"));
    let v_m = match v_rep {
        Some(v) => v,
        None => cx.alloc(n * qd * p, Activations, "clone"),
    };
    let out = cx.alloc(n * qd * p, Temporary, "bmm");
    cx.matmul_workspace();
    let y = cx.alloc(n * qd * p, Activations, "clone");
    cx.free(out);
    // The fp32 repeat of k under autocast: its 2-byte cast is what the matmul saved.
    if cx.prec.autocast() {
        if let Some(k) = k_rep {
            cx.free(k);
        }
    }
    let e = HfEager {
        q_m,
        k_m,
        softcap,
        softmax,
        attn_lp,
        v_m,
        y,
    };
    (e, y)
}

/// Backward of `hf_eager_fwd` from the gradient of the contiguous output: the copy's and the transpose's
/// backward (a contiguous gradient), the second matmul's two gradients, back to fp32 for the softmax backward,
/// back to the scores' dtype, the scaling, the first matmul's two gradients, autocast's casts back to fp32 and
/// `repeat_kv`'s sums over the repeated heads. Returns (dq, dk, dv) in the dtypes rotary and v_proj produced.
fn hf_eager_bwd(cx: &mut Ctx, g_y: Tensor, e: HfEager) -> (Tensor, Tensor, Tensor) {
    let (qd, kv) = (cx.m.q_dim(), cx.m.kv_dim());
    let (n, p, rb) = (cx.n, cx.p, rope_bytes(cx));
    let s = ops::manual_scores_elems(cx);
    let (g_v, g_attn) = att_v_bwd(cx, g_y, n * qd, e.v_m, e.attn_lp);
    let g_soft = cx.alloc(s * 4, Temporary, "_softmax_backward_data");
    cx.free(g_attn);
    cx.free(e.softmax);
    let g_masked = if p.max(cx.r) != p {
        let lp = cx.alloc(s * p, Temporary, "_to_copy");
        cx.free(g_soft);
        lp
    } else {
        g_soft
    };
    let mut g_masked = g_masked;
    if let Some(t) = e.softcap {
        // * cap, tanh's backward (from its saved output), / cap.
        for op in ["mul", "tanh_backward", "div"] {
            let g = cx.alloc(s * p, Temporary, op);
            cx.free(g_masked);
            if op == "tanh_backward" {
                cx.free(t);
            }
            g_masked = g;
        }
    }
    let (g_q, g_k) = qk_bwd(cx, g_masked, n * qd);
    cx.sim.free_all(&[e.k_m, e.q_m]);
    let (dq, dk_full) = if cx.prec.autocast() {
        let dq = cx.alloc(n * qd * rb, Temporary, "_to_copy");
        cx.free(g_q);
        let dk = cx.alloc(n * qd * rb, Temporary, "_to_copy");
        cx.free(g_k);
        (dq, dk)
    } else {
        (g_q, g_k)
    };
    if kv == qd {
        return (dq, dk_full, g_v);
    }
    let dv = cx.alloc(n * kv * p, Temporary, "sum");
    cx.free(g_v);
    let dk = cx.alloc(n * kv * rb, Temporary, "sum");
    cx.free(dk_full);
    (dq, dk, dv)
}

/// Whether a sliding window is within reach of the sequence: transformers 5 then builds an explicit mask
/// (`masking_utils._ignore_causal_mask_sdpa`: kv_length >= window).
fn windowed(cx: &Ctx) -> bool {
    window_reached(cx) && cx.sliding_layer
}

/// Whether the sequence reaches the model's sliding window (some layer then gets an explicit mask).
fn window_reached(cx: &Ctx) -> bool {
    cx.m.sliding_window > 0 && cx.t >= cx.m.sliding_window
}

/// The SDPA kernel: PyTorch's choice (`policy::sdpa_backend`), but memory-efficient with an explicit mask,
/// which flash does not take.
fn sdpa_backend_of(cx: &Ctx, masked: bool) -> crate::policy::SdpaBackend {
    if masked {
        crate::policy::SdpaBackend::Efficient
    } else {
        cx.backend
    }
}

/// The attention branch on `input` (the first norm's output, or the stream itself without pre-norms), through the
/// output projection (and the residual dropout): returns what it saved and the branch output.
fn attn_fwd(cx: &mut Ctx, input: Tensor) -> (AttnSaved, Tensor) {
    match cx.arch.qkv {
        Qkv::Fused => fused_attn_fwd(cx),
        Qkv::Separate | Qkv::PackedSlices | Qkv::PackedHeads => separate_attn_fwd(cx, input),
    }
}

fn fused_attn_fwd(cx: &mut Ctx) -> (AttnSaved, Tensor) {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let bias = cx.arch.linear_bias;
    let (r, p) = (cx.r, cx.p);
    let (qkv, c_attn) = ops::linear_fwd(cx, r, c, 3 * c, cx.arch.qkv_bias, Activations);
    // SDPA saves q, k, v (views of the fused QKV output); the manual path copies them instead, so the fused
    // output (and, under autocast, the unsaved fp32 dropout output) die when the attention call returns.
    let (core, y, qkv_kept, dead_at_return) = match cx.arch.core {
        Core::Sdpa => (CoreSaved::Sdpa(ops::sdpa_fwd(cx)), None, Some(qkv), None),
        Core::Manual => {
            let (a, y, dead) = manual_fwd(cx);
            (a, Some(y), None, dead)
        }
    };
    let (a, c_proj) = ops::linear_fwd(cx, p, c, c, bias, Temporary);
    let (a, drop) = dropout_on(cx, a, nc, p, Temporary);
    if qkv_kept.is_none() {
        cx.free(qkv);
    }
    if let Some(t) = dead_at_return {
        cx.free(t);
    }
    if !cx.saving {
        // Unsaved (checkpointed forward), what attention would keep dies when the attention call returns (stub-cuda
        // snapshot of gpt2-xl-ckpt-adamw: the fused QKV output, then SDPA's output, right after c_proj).
        cx.free(qkv);
        release_core(cx, &core);
        if let Some(t) = y {
            cx.free(t);
        }
    }
    let saved = AttnSaved::Fused {
        c_attn,
        qkv: qkv_kept,
        core,
        y,
        c_proj,
        drop,
    };
    (saved, a)
}

fn separate_attn_fwd(cx: &mut Ctx, input: Tensor) -> (AttnSaved, Tensor) {
    let c = cx.m.n_embd;
    let (qd, kv) = (cx.m.q_dim(), cx.m.kv_dim());
    let r = branch_in_bytes(cx);
    let qkv_bias = cx.arch.qkv_bias;
    // A packed q/k/v projection (Phi-3, GPT-NeoX): one output whose q, k and v are views; it stays whole while
    // SDPA holds the v view (fake-cuda traces of phi3-512-untied-bf16amp and neox-512-bf16amp).
    let packed = cx.arch.qkv != Qkv::Separate;
    // Under LoRA it is a frozen base Linear with its own adapter (`Role::Qkv`); rotary reads q and k in its
    // output's dtype (fp32 from a 4-bit base's Linear on the fp32 stream).
    if packed {
        let width = qd + 2 * kv;
        let role = if cx.arch.qkv == Qkv::PackedHeads {
            Role::QueryKeyValue
        } else {
            Role::Qkv
        };
        let (qkv_out, qkv) = ops::proj_fwd(cx, role, (input, r), (c, width), qkv_bias, Activations);
        let (q_rot, k_rot) = rotary_fwd(cx, qd, kv, qkv.out_bytes);
        let rot = (q_rot, k_rot, rope_bytes(cx));
        return attn_core_fwd(cx, (qkv, None, None), None, qkv_out, rot);
    }
    let (q_out, q) = ops::proj_fwd(cx, Role::Q, (input, r), (c, qd), qkv_bias, Temporary);
    // Qwen3: each projection goes through its head-wise RMSNorm right away (q's before k's projection); rotary
    // then reads the norm's output, in the wider of the weight's and the projection's dtype (fp32 under
    // autocast: fake-cuda trace of a qwen3 bf16-amp case), and the projection output dies with the norm unless
    // the norm saved it (an fp32 projection).
    let q_norm = cx
        .arch
        .qk_norm
        .then(|| qk_norm_fwd(cx, q_out, qd, q.out_bytes));
    let (k_out, k) = ops::proj_fwd(cx, Role::K, (input, r), (c, kv), qkv_bias, Temporary);
    let k_norm = cx
        .arch
        .qk_norm
        .then(|| qk_norm_fwd(cx, k_out, kv, k.out_bytes));
    let (v_out, v) = ops::proj_fwd(cx, Role::V, (input, r), (c, kv), qkv_bias, Activations);
    // Without norms rotary reads the projections' outputs in their dtype (fp32 from a 4-bit base's Linear on
    // the fp32 stream).
    let (q_in, k_in, in_bytes) = match (&q_norm, &k_norm) {
        (Some(qn), Some(kn)) => (qn.out, kn.out, qn.out_bytes),
        _ => (q_out, k_out, q.out_bytes),
    };
    let (mut q_rot, mut k_rot) = rotary_fwd(cx, qd, kv, in_bytes);
    // OLMo 2: back to q's and k's dtype before the kernel (stub-cuda snapshot of olmo2-768-tied-bf16: q's cast,
    // k's cast, then the fp32 rotated q and k freed).
    if cx.arch.rope_fp32 && rope_bytes(cx) != in_bytes {
        let qb = cx.alloc(cx.n * qd * in_bytes, Activations, "_to_copy");
        let kb = cx.alloc(cx.n * kv * in_bytes, Activations, "_to_copy");
        cx.sim.free_all(&[q_rot, k_rot]);
        (q_rot, k_rot) = (qb, kb);
    }
    cx.free(q_in);
    cx.free(k_in);
    // q and k reach the kernel in rotary's dtype, or after OLMo 2's cast back in the norms' output dtype.
    let rot_bytes = if cx.arch.rope_fp32 {
        in_bytes
    } else {
        rope_bytes(cx)
    };
    attn_core_fwd(
        cx,
        (q, Some(k), Some(v)),
        Some((q_norm, k_norm)),
        v_out,
        (q_rot, k_rot, rot_bytes),
    )
}

/// Bytes per element of what a branch's first Linears read: the stream's, or a LayerNorm's fp32 output on a
/// 2-byte stream under autocast (`ops::layer_norm_widens`).
fn branch_in_bytes(cx: &Ctx) -> u64 {
    if cx.arch.pre_norms
        && matches!(cx.arch.norm, Norm::LayerNorm { .. })
        && ops::layer_norm_widens(cx)
    {
        4
    } else {
        cx.r
    }
}

/// The attention's output projection by peft's name for it: GPT-NeoX's `dense`, else `o_proj`.
fn o_role(cx: &Ctx) -> Role {
    if cx.arch.qkv == Qkv::PackedHeads {
        Role::Dense
    } else {
        Role::O
    }
}

/// The attention from the rotated q and k (`rot_bytes` per element) and v's projection output (`v_out`) through
/// o_proj: HF's eager attention or SDPA (with an explicit sliding-window mask when the sequence reaches the
/// window).
fn attn_core_fwd(
    cx: &mut Ctx,
    (q, k, v): (LinearSaved, Option<LinearSaved>, Option<LinearSaved>),
    qk_norms: Option<(Option<QkNorm>, Option<QkNorm>)>,
    v_out: Tensor,
    (q_rot, k_rot, rot_bytes): (Tensor, Tensor, u64),
) -> (AttnSaved, Tensor) {
    let c = cx.m.n_embd;
    let (qd, kv) = (cx.m.q_dim(), cx.m.kv_dim());
    let p = cx.p;
    let bias = cx.arch.linear_bias;
    let (q_norm, k_norm) = qk_norms.unwrap_or((None, None));
    if cx.arch.core == Core::Manual {
        let (e, y) = hf_eager_fwd(cx, q_rot, k_rot, v_out);
        let (o_out, o) = ops::proj_fwd(cx, o_role(cx), (y, p), (qd, c), bias, Temporary);
        // The rotated q and k and v_proj's output: the matmuls saved copies of them. The contiguous output is
        // saved by o_proj only, unless it is frozen (LoRA's base).
        cx.sim.free_all(&[q_rot, k_rot, v_out]);
        if !o.holds_input() {
            cx.free(y);
        }
        for t in [e.q_m, e.k_m, e.softmax, e.v_m, y]
            .into_iter()
            .chain(e.softcap)
        {
            cx.drop_unsaved(t);
        }
        if let Some(t) = e.attn_lp {
            cx.drop_unsaved(t);
        }
        let saved = SeparateSaved {
            q,
            k,
            v,
            q_norm,
            k_norm,
            v_out,
            q_att: q_rot,
            k_att: k_rot,
            window: None,
            core: SeparateCore::Eager(e),
            y_copy: None,
            o,
        };
        return (AttnSaved::Separate(saved), o_out);
    }
    // A sliding window the sequence reaches (transformers 5: kv_length >= window): an explicit mask, so
    // `repeat_kv` copies k (in its dtype, temporary) and v (saved) to all heads, and aten turns the bool mask
    // into an additive one in q's dtype, [B, 1, T, T], saved by the memory-efficient kernel (fake-cuda trace of
    // mistral-512-win128-bf16amp).
    // flash-attn takes the window as a kernel argument (`window_size`): no mask, no repeat.
    let masked = windowed(cx) && !cx.arch.flash_attn;
    let repeat = masked && kv != qd;
    // With one KV head `repeat_kv`'s reshape of the expanded k and v is a view: no copies, and v_proj's output
    // is what the kernel saves (fake-cuda trace of gemma3-512-hd256-win256-bf16amp), but k's cast is full size.
    let copies = repeat && cx.m.n_kv_head > 1;
    let k_rep = copies.then(|| cx.alloc(cx.n * qd * rope_bytes(cx), Temporary, "clone"));
    let v_rep = copies.then(|| cx.alloc(cx.n * qd * p, Activations, "clone"));
    let kw = if repeat { qd } else { kv };
    // Autocast casts q and k for the kernel when they reach it wider than the matmul dtype (OLMo 2's fp32
    // projections on a 4-bit base's fp32 stream too: stub-cuda snapshot of olmo2-int8-r16-all-nodrop).
    let (q_att, k_att) = if rot_bytes != p && cx.arch.flash_attn {
        // flash_attention_2 under autocast: the rotated q and k are fp32 and flash-attn's op is not on
        // autocast's list; transformers' `fa_peft_integration_check` casts q, then k (v is already 2-byte)
        // to the autocast dtype, and FlashAttnFunc saves the casts.
        let qa = cx.alloc(cx.n * qd * p, Activations, "_to_copy");
        let ka = cx.alloc(cx.n * kw * p, Activations, "_to_copy");
        (qa, ka)
    } else if rot_bytes != p {
        let ka = cx.alloc(cx.n * kw * p, Activations, "_to_copy");
        let qa = cx.alloc(cx.n * qd * p, Activations, "_to_copy");
        (qa, ka)
    } else {
        (q_rot, k_rep.unwrap_or(k_rot))
    };
    let window = masked.then(|| {
        let scalars = [
            cx.alloc(4, Temporary, "scalar_tensor"),
            cx.alloc(4, Temporary, "scalar_tensor"),
        ];
        let bias = cx.alloc(cx.b * cx.t * cx.t * p, Activations, "where");
        cx.sim.free_all(&scalars);
        Windowed {
            v_rep,
            repeated: repeat,
            bias,
        }
    });
    // Grouped-query K/V otherwise reach the kernel unrepeated: transformers passes `enable_gqa=True` and PyTorch
    // 2.15's flash and memory-efficient kernels take K/V at their own head count (stub-cuda records
    // qwen2-256-untied-fp32-sgd and qwen3-256-hd64-untied-fp32-sgd, memory-efficient in fp32: exact).
    // v from a 4-bit base's Linear on the fp32 stream is fp32: autocast casts it for the kernel, which saves the
    // cast; the fp32 output lives until the attention module returns.
    // A packed projection's v is a view of its output, in that output's dtype.
    let v_bytes = v.as_ref().unwrap_or(&q).out_bytes;
    let v_cast = (v_bytes != p).then(|| cx.alloc(cx.n * kv * p, Activations, "_to_copy"));
    let (core, core_out) = if cx.arch.flash_attn {
        let f = ops::flash_attn_fwd(cx);
        let out = f.out;
        (SeparateCore::Flash(f), out)
    } else {
        let sdpa = ops::sdpa_fwd_with(cx, sdpa_backend_of(cx, masked));
        let out = sdpa.out;
        (SeparateCore::Sdpa(sdpa), out)
    };
    // `repeat_kv`'s copies die when transformers' attention function returns, before o_proj; the rotated k and
    // v_proj's output are the attention module's locals and live until it returns, after o_proj (stub-cuda
    // snapshot of phi3-768-tied-win256-bf16: the packed q/k/v output and the rotated k freed after o_proj's
    // cuBLAS workspace).
    let mut module_locals = Vec::new();
    if let Some(k) = k_rep {
        if k != k_att {
            cx.free(k);
        }
        module_locals.push(k_rot);
    }
    if let Some(w) = &window {
        if w.v_rep.is_some() {
            module_locals.push(v_out);
        }
        for t in [Some(w.bias), w.v_rep].into_iter().flatten() {
            cx.drop_unsaved(t);
        }
    }
    // Unsaved (checkpointed forward), the inputs SDPA made for itself die with it; what the attention call holds
    // (its output, the rotated q and k, v) dies when it returns (stub-cuda snapshot of llama-ckpt-1024).
    if q_att != q_rot {
        cx.drop_unsaved(q_att);
        cx.drop_unsaved(k_att);
    }
    // After a rotary concatenation q reached SDPA head-major. The flash kernel makes its output like q
    // (`empty_like`), head-major, so `transpose(1, 2).contiguous()` copies it and o_proj saves the copy; the
    // memory-efficient kernel allocates its output token-major ([B, T, H, D]) whatever q's layout, so the
    // transpose back is already contiguous (stub-cuda snapshots of neox-256-fp32-sgd and
    // phi3-256-gqa-rot75-fp32-sgd: no copy).
    let head_major_out = match &core {
        SeparateCore::Sdpa(_) => sdpa_backend_of(cx, masked) == crate::policy::SdpaBackend::Flash,
        _ => true,
    };
    let y_copy = (cx.arch.rotary_cat != RotaryCat::Whole && head_major_out)
        .then(|| cx.alloc(cx.n * qd * p, Activations, "clone"));
    let o_in = y_copy.unwrap_or(core_out);
    let (o_out, o) = ops::proj_fwd(cx, o_role(cx), (o_in, p), (qd, c), bias, Temporary);
    // The contiguous copy is the attention module's local: it goes when the module returns unless o_proj saved
    // it (a frozen o_proj does not: stub-cuda snapshots of phi3-lora-r16-all-bf16amp and
    // neox-lora-r16-all-bf16amp, `sdpa_attention.py`'s copy freed at the attention's return in every block).
    let y_copy = y_copy.and_then(|y| ops::keep_if_saved(cx, y, &o));
    cx.sim.free_all(&module_locals);
    if q_att != q_rot {
        cx.free(q_rot);
        cx.free(k_rot);
    }
    let v_out = match v_cast {
        Some(cast) => {
            cx.free(v_out);
            cast
        }
        None => v_out,
    };
    for t in [core_out, q_att, k_att, v_out].into_iter().chain(y_copy) {
        cx.drop_unsaved(t);
    }
    let saved = SeparateSaved {
        q,
        k,
        v,
        q_norm,
        k_norm,
        v_out,
        q_att,
        k_att,
        window,
        core,
        y_copy,
        o,
    };
    (AttnSaved::Separate(saved), o_out)
}

/// The gradient a branch starts from when the block hands it one (a post-norm's, or a parallel residual's
/// shared cast): (gradient, bytes per element, whether the branch frees it).
type Given = Option<(Tensor, u64, bool)>;

/// Backward of the attention branch from the residual gradient `g_mid` (which the skip path still holds) to the
/// first norm's output; `norm_out` is that output when the input Linear did not save a cast of its own.
fn attn_bwd(
    cx: &mut Ctx,
    g_mid: Tensor,
    a: AttnSaved,
    norm_out: Option<Tensor>,
    given: Given,
) -> Tensor {
    let nc = cx.n * cx.m.n_embd;
    let p = cx.p;
    match a {
        AttnSaved::Fused {
            c_attn,
            qkv,
            core,
            y,
            c_proj,
            drop,
        } => {
            let (g_branch, g_bytes, owned) = match given {
                Some(g) => g,
                None => branch_grad(cx, g_mid, drop),
            };
            let gy = ops::linear_bwd(cx, g_branch, g_bytes, owned, c_proj, y);
            let g_qkv = match core {
                CoreSaved::Sdpa(a) => {
                    let (dq, dk, dv) = ops::sdpa_bwd(cx);
                    cx.free(gy);
                    if let Some(qkv) = qkv {
                        cx.free(qkv);
                    }
                    cx.sim.free_all(&[a.lse, a.out, a.rng[0], a.rng[1]]);
                    let cat = cx.alloc(3 * nc * p, Temporary, "cat");
                    cx.sim.free_all(&[dq, dk, dv]);
                    cat
                }
                CoreSaved::Manual(a) => manual_bwd(cx, gy, a),
            };
            ops::linear_bwd(cx, g_qkv, p, true, c_attn, norm_out)
        }
        AttnSaved::Separate(s) => {
            let (qd, kv) = (cx.m.q_dim(), cx.m.kv_dim());
            let r = cx.r;
            let q_out_bytes = s.q.out_bytes;
            let (g_branch, g_bytes, owned) = match given {
                Some(g) => g,
                None => branch_grad(cx, g_mid, None),
            };
            let (dq, dk, dv, cast_back) = match s.core {
                SeparateCore::Sdpa(sdpa) => {
                    let g_att = ops::linear_bwd(cx, g_branch, g_bytes, owned, s.o, s.y_copy);
                    let masked = s.window.is_some();
                    let repeated = s.window.as_ref().is_some_and(|w| w.repeated);
                    let kw = if repeated { qd } else { kv };
                    let (dq, dk, mut dv) = ops::sdpa_bwd_with(cx, sdpa_backend_of(cx, masked), kw);
                    // ToCopyBackward of v's cast (an fp32 v from a 4-bit base): back to fp32.
                    let vb = s.v.as_ref().unwrap_or(&s.q).out_bytes;
                    if vb != p {
                        let wide = cx.alloc(cx.n * kv * vb, Temporary, "_to_copy");
                        cx.free(dv);
                        dv = wide;
                    }
                    cx.free(g_att);
                    cx.sim.free_all(&[s.q_att, s.k_att, s.v_out]);
                    cx.sim.free_all(&sdpa.tensors());
                    if let Some(w) = &s.window {
                        cx.sim.free_some(&[w.v_rep, Some(w.bias)]);
                    }
                    let (dq, dk) = if rope_bytes(cx) != p {
                        // ToCopyBackward of SDPA's input casts: back to fp32.
                        let dq32 = cx.alloc(cx.n * qd * 4, Temporary, "_to_copy");
                        cx.free(dq);
                        let dk32 = cx.alloc(cx.n * kw * 4, Temporary, "_to_copy");
                        cx.free(dk);
                        (dq32, dk32)
                    } else {
                        (dq, dk)
                    };
                    // repeat_kv's backward: the repeated heads summed back to the KV heads.
                    let (dk, dv) = if repeated {
                        let dv2 = cx.alloc(cx.n * kv * p, Temporary, "sum");
                        cx.free(dv);
                        let dk2 = cx.alloc(cx.n * kv * rope_bytes(cx), Temporary, "sum");
                        cx.free(dk);
                        (dk2, dv2)
                    } else {
                        (dk, dv)
                    };
                    (dq, dk, dv, false)
                }
                SeparateCore::Flash(f) => {
                    let g_att = ops::linear_bwd(cx, g_branch, g_bytes, owned, s.o, s.y_copy);
                    let (dq, dk, dv) = ops::flash_attn_bwd(cx);
                    cx.free(g_att);
                    cx.sim.free_all(&[s.q_att, s.k_att, s.v_out]);
                    cx.sim.free_all(&f.tensors());
                    // ToCopyBackward of transformers' casts of q and k: back to fp32; k's cast was made last,
                    // so the engine runs its backward first.
                    let (dq, dk) = if rope_bytes(cx) != p {
                        let dk32 = cx.alloc(cx.n * kv * 4, Temporary, "_to_copy");
                        cx.free(dk);
                        let dq32 = cx.alloc(cx.n * qd * 4, Temporary, "_to_copy");
                        cx.free(dq);
                        (dq32, dk32)
                    } else {
                        (dq, dk)
                    };
                    (dq, dk, dv, false)
                }
                SeparateCore::Eager(e) => {
                    let y = e.y;
                    let g_y = ops::linear_bwd(cx, g_branch, g_bytes, owned, s.o, Some(y));
                    let (dq, dk, dv) = hf_eager_bwd(cx, g_y, e);
                    (dq, dk, dv, false)
                }
            };
            let (dq, dk) = if cast_back && rope_bytes(cx) != p {
                // ToCopyBackward of SDPA's input casts: back to fp32.
                let dq32 = cx.alloc(cx.n * qd * 4, Temporary, "_to_copy");
                cx.free(dq);
                let dk32 = cx.alloc(cx.n * kv * 4, Temporary, "_to_copy");
                cx.free(dk);
                (dq32, dk32)
            } else {
                (dq, dk)
            };
            let in_bytes = s.q_norm.as_ref().map_or(q_out_bytes, |n| n.out_bytes);
            // The gradients reach the projections in their outputs' dtypes (rotary's input dtype without norms,
            // the norms' input dtype with them).
            let qk_bytes = s.q_norm.as_ref().map_or(in_bytes, |n| n.in_bytes);
            let gk = rotary_bwd(cx, dk, kv, in_bytes);
            let gq = rotary_bwd(cx, dq, qd, in_bytes);
            let (Some(k), Some(v)) = (s.k, s.v) else {
                // One packed projection: the three gradients assembled into its output's, one backward.
                let gk = token_major(cx, gk, kv, in_bytes);
                let gq = token_major(cx, gq, qd, in_bytes);
                let g_qkv = packed_qkv_bwd(cx, gq, gk, dv, q_out_bytes);
                return ops::linear_bwd(cx, g_qkv, q_out_bytes, true, s.q, norm_out);
            };
            // Qwen3: back through the head-wise norms (k's first, as the engine reaches it), to the
            // projections' dtype.
            let gk = match s.k_norm {
                Some(n) => qk_norm_bwd(cx, gk, n, kv),
                None => gk,
            };
            let gq = match s.q_norm {
                Some(n) => qk_norm_bwd(cx, gq, n, qd),
                None => gq,
            };
            let v_bytes = v.out_bytes;
            // v's input gradient reaches the norm output's buffer first.
            let v_fresh = v.input_grad_fresh();
            let g_hv = ops::linear_bwd(cx, dv, v_bytes, true, v, None);
            let g_hv = distributed::tp_colwise_input_grad(cx, g_hv);
            let g_hk = ops::linear_bwd(cx, gk, qk_bytes, true, k, None);
            let g_hk = distributed::tp_colwise_input_grad(cx, g_hk);
            let acc = distributed::tp_grad_sum(cx, (g_hv, v_fresh), g_hk, nc * r);
            let g_hq = ops::linear_bwd(cx, gq, qk_bytes, true, s.q, norm_out);
            let g_hq = distributed::tp_colwise_input_grad(cx, g_hq);
            distributed::tp_grad_sum(cx, (acc, true), g_hq, nc * r)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// MLP

/// The MLP branch on the second norm's output, through the down projection (and the residual dropout).
/// The MLP branch on `input` (the second norm's output, or the stream itself without pre-norms).
fn mlp_fwd(cx: &mut Ctx, input: Tensor) -> (MlpSaved, Tensor) {
    let c = cx.m.n_embd;
    let i = cx.m.intermediate_size;
    let r = cx.r;
    let bias = cx.arch.mlp_bias;
    match cx.arch.mlp {
        Mlp::Gelu => {
            // GPT-NeoX's `dense_h_to_4h` and `dense_4h_to_h` (peft's names; frozen with adapters under LoRA):
            // GELU in the first one's output dtype (fp32 from a 4-bit base's Linear on the fp32 stream), kept only
            // if the second one holds it.
            let rb = branch_in_bytes(cx);
            let (h, fc) =
                ops::proj_fwd(cx, Role::DenseHTo4h, (input, rb), (c, i), bias, Activations);
            let hb = fc.out_bytes;
            let g = cx.alloc(cx.n * i * hb, Activations, "gelu");
            // GELU saves its input only when it needs a gradient (not before the first adapter of a LoRA model's
            // first block, whose MLP reads the block input beside the attention: GPT-NeoX's parallel residual).
            if cx.role_input_grad(Role::Dense4hToH) {
                cx.drop_unsaved(h);
            } else {
                cx.free(h);
            }
            let (o, proj) = ops::proj_fwd(cx, Role::Dense4hToH, (g, hb), (i, c), bias, Temporary);
            let ob = proj.out_bytes;
            let (o, drop) = dropout_on(cx, o, cx.n * c, ob, Temporary);
            ops::keep_if_saved(cx, g, &proj);
            let saved = MlpSaved::Gelu {
                fc,
                h,
                g,
                proj,
                drop,
            };
            (saved, o)
        }
        Mlp::SwiGlu | Mlp::GeGlu => {
            if cx.arch.packed_gate_up {
                // Phi-3's `gate_up_proj`: one output chunked into gate and up; the activation saves the gate
                // half and the product the up half, so it stays whole (fake-cuda trace of
                // phi3-512-untied-bf16amp). Under LoRA both are frozen base Linears with their adapters; the
                // activation and the product are in gate_up's output dtype (fp32 from a 4-bit base's Linear on
                // the fp32 stream), and the product is kept only if down_proj holds it.
                let (gu, gate_up) =
                    ops::proj_fwd(cx, Role::GateUp, (input, r), (c, 2 * i), bias, Activations);
                let gb = gate_up.out_bytes;
                let a = cx.alloc(cx.n * i * gb, Activations, act_name(cx));
                let prod = cx.alloc(cx.n * i * gb, Activations, "mul");
                cx.drop_unsaved(a);
                let (d_out, down) =
                    ops::proj_fwd(cx, Role::Down, (prod, gb), (i, c), bias, Temporary);
                ops::keep_if_saved(cx, prod, &down);
                // `gate`, a chunk of the packed output, is `Phi3MLP.forward`'s local until it returns: unsaved,
                // the output dies after down_proj (stub-cuda snapshot of phi3-qlora-nf4-dq-r16-all-ckpt: the
                // product's free, then gate_up's fp32 output's, after down_proj's adapter).
                cx.drop_unsaved(gu);
                let saved = MlpSaved::Packed {
                    gate_up,
                    gu,
                    act: a,
                    prod,
                    down,
                };
                return (saved, d_out);
            }
            swiglu_fwd(cx, input, i, bias)
        }
        Mlp::Moe(moe) => {
            let (saved, out) = crate::moe::moe_fwd(cx, moe, input);
            (MlpSaved::Moe(Box::new(saved)), out)
        }
    }
}

/// SwiGLU (or GeGLU) of width `i` on the norm's output `input`: `down(act(gate(x)) * up(x))` (Llama's MLP, also
/// Qwen2-MoE's shared expert).
pub(crate) fn swiglu_fwd(cx: &mut Ctx, input: Tensor, i: u64, bias: bool) -> (MlpSaved, Tensor) {
    let c = cx.m.n_embd;
    let head = swiglu_head_fwd(cx, input, i, bias);
    let (prod, pb) = (head.prod, head.prod_bytes);
    let (d_out, down) = ops::proj_fwd(cx, Role::Down, (prod, pb), (i, c), bias, Temporary);
    // Saved by the down projection only, unless it is frozen (LoRA's base; its adapter keeps a copy).
    ops::keep_if_saved(cx, prod, &down);
    (head.with_down(down), d_out)
}

/// `swiglu_fwd` in a checkpointed block's recompute, which stops once the down projection has saved its
/// inputs, before its matmul (`Ctx::recompute_stop`): no output.
fn swiglu_fwd_stopped(cx: &mut Ctx, input: Tensor, i: u64, bias: bool) -> MlpSaved {
    let c = cx.m.n_embd;
    let head = swiglu_head_fwd(cx, input, i, bias);
    let down = ops::linear_fwd_packed(cx, head.prod_bytes, i, c, bias);
    head.with_down(down)
}

/// SwiGLU up to the down projection's input: the gate and up projections, the activation and the product.
struct SwiGluHead {
    gate: LinearSaved,
    gate_out: Tensor,
    silu: Tensor,
    up: LinearSaved,
    up_out: Tensor,
    prod: Tensor,
    prod_bytes: u64,
}

impl SwiGluHead {
    fn with_down(self, down: LinearSaved) -> MlpSaved {
        MlpSaved::SwiGlu {
            gate: self.gate,
            gate_out: self.gate_out,
            silu: self.silu,
            up: self.up,
            up_out: self.up_out,
            prod: self.prod,
            down,
        }
    }
}

fn swiglu_head_fwd(cx: &mut Ctx, input: Tensor, i: u64, bias: bool) -> SwiGluHead {
    let (c, r) = (cx.m.n_embd, cx.r);
    // The activation and the product in the projections' output dtype (fp32 from a 4-bit base's Linears on the
    // fp32 stream: the QLoRA snapshot's SiLU is fp32).
    let (gate_out, gate) = ops::proj_fwd(cx, Role::Gate, (input, r), (c, i), bias, Activations);
    let gb = gate.out_bytes;
    let silu = cx.alloc(cx.n * i * gb, Activations, act_name(cx));
    cx.drop_unsaved(gate_out);
    let (up_out, up) = ops::proj_fwd(cx, Role::Up, (input, r), (c, i), bias, Activations);
    let prod_bytes = gb.max(up.out_bytes);
    let prod = cx.alloc(cx.n * i * prod_bytes, Activations, "mul");
    cx.drop_unsaved(silu);
    cx.drop_unsaved(up_out);
    SwiGluHead {
        gate,
        gate_out,
        silu,
        up,
        up_out,
        prod,
        prod_bytes,
    }
}

/// Backward of `swiglu_fwd` (width `i`) from the gradient of its output `(gradient, bytes, owned)` to its input
/// (`norm_out`: the input, when the gate Linear saved no cast of it).
pub(crate) fn swiglu_bwd(
    cx: &mut Ctx,
    (g_branch, g_bytes, owned): (Tensor, u64, bool),
    s: MlpSaved,
    norm_out: Option<Tensor>,
    i: u64,
) -> Tensor {
    let MlpSaved::SwiGlu {
        gate,
        gate_out,
        silu,
        up,
        up_out,
        prod,
        down,
    } = s
    else {
        // Only `swiglu_fwd`'s state reaches here.
        return g_branch;
    };
    let (nc, r) = (cx.n * cx.m.n_embd, cx.r);
    let (gb, ub) = (gate.out_bytes, up.out_bytes);
    // up's input gradient reaches the norm output's buffer first.
    let up_fresh = up.input_grad_fresh();
    let g_prod = ops::linear_bwd(cx, g_branch, g_bytes, owned, down, Some(prod));
    let g_silu = cx.alloc(cx.n * i * gb, Temporary, "mul");
    let g_up = cx.alloc(cx.n * i * ub, Temporary, "mul");
    cx.free(g_prod);
    // The product saved the activation (`self`) and up's output (`other`), nothing else the activation: both go
    // when its backward is done, in that order (stub-cuda snapshots of llama-tiny-fp32-mha and
    // llama-3.2-1b-tied: two N x I frees before up's backward).
    cx.free(silu);
    cx.free(up_out);
    let g_a = ops::linear_bwd(cx, g_up, ub, true, up, None);
    let g_a = distributed::tp_colwise_input_grad(cx, g_a);
    let g_gate = cx.alloc(cx.n * i * gb, Temporary, act_bwd_name(cx));
    cx.free(g_silu);
    cx.free(gate_out);
    let g_b = ops::linear_bwd(cx, g_gate, gb, true, gate, norm_out);
    let g_b = distributed::tp_colwise_input_grad(cx, g_b);
    distributed::tp_grad_sum(cx, (g_a, up_fresh), g_b, nc * r)
}

/// Backward of the MLP branch from the residual gradient `g_out` (held by the skip path) to the second norm's
/// output.
fn mlp_bwd(
    cx: &mut Ctx,
    g_out: Tensor,
    s: MlpSaved,
    norm_out: Option<Tensor>,
    given: Given,
) -> Tensor {
    let i = cx.m.intermediate_size;
    match s {
        MlpSaved::Gelu {
            fc,
            h,
            g,
            proj,
            drop,
        } => {
            let (g_branch, g_bytes, owned) = match given {
                Some(g) => g,
                None => branch_grad(cx, g_out, drop),
            };
            let hb = fc.out_bytes;
            let gh_in = ops::linear_bwd(cx, g_branch, g_bytes, owned, proj, Some(g));
            let gh = cx.alloc(cx.n * i * hb, Temporary, "gelu_backward");
            cx.free(gh_in);
            cx.free(h);
            ops::linear_bwd(cx, gh, hb, true, fc, norm_out)
        }
        s @ MlpSaved::SwiGlu { .. } => {
            let g = match given {
                Some(g) => g,
                None => branch_grad(cx, g_out, None),
            };
            swiglu_bwd(cx, g, s, norm_out, i)
        }
        // The MoE block's output is in the experts' dtype: the residual gradient reaches it as it is.
        MlpSaved::Moe(s) => {
            let g = given.unwrap_or((g_out, cx.r, false));
            crate::moe::moe_bwd(cx, g, *s, norm_out)
        }
        // The product's two gradients, the activation's backward, then chunk's backward concatenates the halves'
        // gradients into one for `gate_up_proj` (fake-cuda trace of phi3-512-untied-bf16amp).
        MlpSaved::Packed {
            gate_up,
            gu,
            act,
            prod,
            down,
        } => {
            let (g_branch, g_bytes, owned) = match given {
                Some(g) => g,
                None => branch_grad(cx, g_out, None),
            };
            let gb = gate_up.out_bytes;
            let g_prod = ops::linear_bwd(cx, g_branch, g_bytes, owned, down, Some(prod));
            let g_act = cx.alloc(cx.n * i * gb, Temporary, "mul");
            let g_up = cx.alloc(cx.n * i * gb, Temporary, "mul");
            cx.free(g_prod);
            cx.free(act);
            let g_gate = cx.alloc(cx.n * i * gb, Temporary, act_bwd_name(cx));
            cx.free(g_act);
            cx.free(gu);
            let g_gu = cx.alloc(cx.n * 2 * i * gb, Temporary, "cat");
            cx.free(g_gate);
            cx.free(g_up);
            ops::linear_bwd(cx, g_gu, gb, true, gate_up, norm_out)
        }
    }
}

/// The gated MLP's activation op.
fn act_name(cx: &Ctx) -> &'static str {
    if cx.arch.mlp == Mlp::GeGlu {
        "gelu"
    } else {
        "silu"
    }
}

/// The gated MLP's activation backward op.
pub(crate) fn act_bwd_name(cx: &Ctx) -> &'static str {
    if cx.arch.mlp == Mlp::GeGlu {
        "gelu_backward"
    } else {
        "silu_backward"
    }
}

// ---------------------------------------------------------------------------------------------------------
// Blocks

/// Gemma 2's norm on a branch output (the matmul dtype): `GemmaRMSNorm`, whose output takes the input's dtype.
/// Returns the normed output (or the branch output itself without post-norms) and what it saved.
fn post_norm_fwd(cx: &mut Ctx, branch: Tensor, bytes: u64) -> (Tensor, Option<PostNorm>) {
    if !cx.arch.post_norms {
        return (branch, None);
    }
    let (n, c) = (cx.ns, cx.m.n_embd);
    let one_plus = cx.arch.norm == Norm::GemmaRmsNorm;
    let (out, saved) = ops::fp32_rms_norm_fwd(cx, n, c, bytes, one_plus);
    // A 2-byte branch output was copied to fp32 (saved): it dies here (fake-cuda trace of a gemma2 bf16-amp
    // case: o_proj's output freed right after the norm's cast back).
    let input = if bytes == 2 {
        cx.free(branch);
        None
    } else {
        cx.drop_unsaved(branch);
        Some(branch)
    };
    (
        out,
        Some(PostNorm {
            saved,
            input,
            bytes,
        }),
    )
}

/// Backward of `post_norm_fwd` from the residual gradient (held by the skip path): the gradient cast to the
/// norm output's dtype, then the norm's backward to the branch output's. Returns (gradient, its bytes).
fn post_norm_bwd(cx: &mut Ctx, g_residual: Tensor, n: PostNorm) -> (Tensor, u64) {
    let (nc, p, r) = (cx.ns * cx.m.n_embd, n.bytes, cx.r);
    // The residual gradient in the norm output's dtype: a cast of our own, or the residual's gradient itself,
    // which the skip path still holds (not released here).
    let (g, owned) = if r != p {
        (cx.alloc(nc * p, Temporary, "_to_copy"), true)
    } else {
        (g_residual, false)
    };
    // A 2-byte input's fp32 copy is in the norm's own saved tensors.
    let dims = (cx.ns, cx.m.n_embd, p);
    let gi = if cx.arch.norm == Norm::Olmo2RmsNorm {
        ops::olmo2_rms_norm_bwd(cx, g, owned, n.saved, n.input, dims)
    } else {
        ops::rms_norm_bwd_keeping(cx, g, owned, n.saved, n.input, dims)
    };
    (gi, p)
}

/// What a branch reads: its pre-norm's output, or, without pre-norms (OLMo 2), the residual stream itself.
fn branch_input(cx: &mut Ctx, stream: Tensor) -> (Tensor, NormSaved) {
    if cx.arch.pre_norms {
        norm_fwd(cx)
    } else {
        (stream, NormSaved::none())
    }
}

/// The branch input once the branch's first Linear ran: a norm's output is held by the branch call until it
/// returns, and under autocast nothing saves it (`keep_if_saved`); the residual stream (no pre-norms) lives on,
/// saved by the Linears unless they saved casts of it.
fn branch_input_kept(cx: &mut Ctx, input: Tensor, holds: bool) -> Option<Tensor> {
    if cx.arch.pre_norms {
        ops::keep_if(cx, input, holds)
    } else {
        holds.then_some(input)
    }
}

/// One block's forward: what it saved, and its output (none when a recompute stopped before it,
/// `Ctx::recompute_stop`).
fn block_fwd(cx: &mut Ctx, x_in: Tensor) -> (BlockSaved, Option<Tensor>) {
    let nc = cx.ns * cx.m.n_embd;
    let r = cx.r;
    let pre = cx.arch.pre_norms;
    // The first block of a LoRA model whose input needs no gradient (`block_input_grad`): the first norm's weight
    // is frozen too, so autograd records nothing there and the norm's fp32 copy and statistics die in its forward
    // (stub-cuda snapshot of llama-lora-fsdp-w8: block 0's `hidden_states.to(float32)` copy is freed at the next
    // line's rebinding; block 1's is held).
    let saving = cx.saving;
    cx.saving = saving && cx.block_input_grad;
    let (norm1_out, norm1) = branch_input(cx, x_in);
    cx.saving = saving;
    // Tensor parallelism: the Linears read the norm's output all-gathered under sequence parallel; the shard
    // goes when the branch returns.
    let (norm1_out, shard1) = distributed::tp_gather_input(cx, norm1_out);
    let (attn, a) = attn_fwd(cx, norm1_out);
    let norm1_out = branch_input_kept(cx, norm1_out, attn.holds_input());
    cx.sim.free_some(&[shard1]);
    let a = distributed::tp_branch_output(cx, a);
    if cx.arch.parallel_residual {
        // GPT-NeoX: the second norm reads the layer input too; `mlp_out + attn_out` in the branches' dtype, then
        // `+ x` in the stream's (fake-cuda trace of neox-512-bf16amp: 2 MiB bf16, then 4 MiB fp32).
        // As the first norm: nothing upstream needs a gradient in the first block of a LoRA model.
        cx.saving = saving && cx.block_input_grad;
        let (norm2_out, norm2) = branch_input(cx, x_in);
        cx.saving = saving;
        let (mlp, o) = mlp_fwd(cx, norm2_out);
        let norm2_out = branch_input_kept(cx, norm2_out, mlp.holds_input());
        let branches = cx.alloc(nc * cx.p, Temporary, "add");
        let x_out = cx.alloc(nc * r, Activations, "add");
        cx.sim.free_all(&[branches, a, o]);
        let saved = BlockSaved {
            post1: None,
            post2: None,
            x_in,
            norm1,
            norm1_out,
            attn,
            x_mid: None,
            norm2,
            norm2_out,
            mlp,
        };
        return (saved, Some(x_out));
    }
    let (a, post1) = post_norm_fwd(cx, a, attn.out_bytes());
    let x_mid = cx.alloc(nc * r, Activations, "add");
    cx.free(a);
    // Unsaved by the Linears, the block input (without pre-norms, the stream itself) goes, but not in a
    // checkpointed block (its first forward, `saving` off, or its recompute): the checkpoint holds its input
    // until the block's backward is done (stub-cuda snapshot of olmo2-qlora-nf4-dq-r16-all-ckpt: every block's
    // input live at the loss).
    let checkpointed = !cx.saving || cx.recompute_stop;
    if !pre && norm1_out.is_none() && !cx.first_block && !checkpointed {
        cx.free(x_in);
    }
    let (norm2_out, norm2) = branch_input(cx, x_mid);
    let (norm2_out, shard2) = distributed::tp_gather_input(cx, norm2_out);
    // A recompute stops at the down projection when it is the block's last op to save a tensor (a plain
    // Linear, no norm after the branch).
    let stops = cx.recompute_stop
        && matches!(cx.arch.mlp, Mlp::SwiGlu | Mlp::GeGlu)
        && !cx.arch.packed_gate_up
        && !cx.arch.post_norms
        && cx.lora.is_none();
    let moe_stops = match cx.arch.mlp {
        Mlp::Moe(moe) => crate::moe::recompute_stops(cx, moe) && !cx.arch.post_norms,
        _ => false,
    };
    let (mlp, o) = if stops {
        let i = cx.m.intermediate_size;
        (swiglu_fwd_stopped(cx, norm2_out, i, cx.arch.mlp_bias), None)
    } else if let (true, Mlp::Moe(moe)) = (moe_stops, cx.arch.mlp) {
        let saved = crate::moe::moe_fwd_stopped(cx, moe, norm2_out);
        (MlpSaved::Moe(Box::new(saved)), None)
    } else {
        let (mlp, o) = mlp_fwd(cx, norm2_out);
        (mlp, Some(o))
    };
    let norm2_out = branch_input_kept(cx, norm2_out, mlp.holds_input());
    cx.sim.free_some(&[shard2]);
    let (x_out, post2) = match o {
        Some(o) => {
            let o = distributed::tp_branch_output(cx, o);
            let (o, post2) = post_norm_fwd(cx, o, mlp.out_bytes(cx.p));
            let x_out = cx.alloc(nc * r, Activations, "add");
            cx.free(o);
            (Some(x_out), post2)
        }
        None => (None, None),
    };
    // The residual after attention dies once the block returns unless the second norm (or, without pre-norms,
    // the MLP's Linears) saved it.
    let x_mid_saved = if pre {
        cx.arch.norm_saves_input(r)
    } else {
        norm2_out.is_some()
    };
    if !x_mid_saved || !cx.saving {
        cx.free(x_mid);
    }
    let saved = BlockSaved {
        post1,
        post2,
        x_in,
        norm1,
        norm1_out,
        attn,
        x_mid: Some(x_mid),
        norm2,
        norm2_out,
        mlp,
    };
    (saved, x_out)
}

fn block_bwd(cx: &mut Ctx, g_out: Tensor, s: BlockSaved) -> Tensor {
    if cx.arch.parallel_residual {
        return parallel_block_bwd(cx, g_out, s);
    }
    // MLP branch. The residual path keeps g_out alive until the norm's gradient is summed into it.
    let post = s
        .post2
        .map(|n| post_norm_bwd(cx, g_out, n))
        .map(|(g, bytes)| (g, bytes, true));
    let post = distributed::tp_branch_grad(cx, g_out, post);
    let g_n2 = mlp_bwd(cx, g_out, s.mlp, s.norm2_out, post);
    let g_n2 = distributed::tp_input_grad(cx, g_n2);
    // The skip path's gradient reached the residual's buffer first and is the buffer's alone once the branch
    // has run: the norm's input gradients (or, without pre-norms, the branch's) are added into it in place.
    let g_mid = if cx.arch.pre_norms {
        norm_bwd(cx, g_n2, s.norm2, s.x_mid, Some(g_out))
    } else {
        ops::grad_add_into(cx, g_out, g_n2)
    };
    let post = s
        .post1
        .map(|n| post_norm_bwd(cx, g_mid, n))
        .map(|(g, bytes)| (g, bytes, true));
    let post = distributed::tp_branch_grad(cx, g_mid, post);
    let g_n1 = attn_bwd(cx, g_mid, s.attn, s.norm1_out, post);
    let g_n1 = distributed::tp_input_grad(cx, g_n1);
    if cx.arch.pre_norms {
        norm_bwd(cx, g_n1, s.norm1, Some(s.x_in), Some(g_mid))
    } else {
        ops::grad_add_into(cx, g_mid, g_n1)
    }
}

/// Backward of a parallel-residual block (`mlp_out + attn_out + x_in`, HF GPT-NeoX): the engine casts the
/// residual gradient once to the branches' dtype (the sum `mlp_out + attn_out` is one node; fp32 branches share
/// the residual gradient itself); the MLP branch runs first (created last), then the attention branch and the
/// first norm, whose backward frees the layer input both norms saved.
///
/// The norms' input gradients land in `x_in`'s input buffer, which already holds the residual gradient
/// (`InputBuffer::accumulate`, see `ops::grad_accumulate`). With a cast, the buffer holds that gradient alone
/// (the branches read the cast): both norms' gradients are added into it in place, no `add` (stub-cuda snapshot
/// of preset-pythia-1b-b4-t2048-fp16amp: in every block the norms' input gradients are freed as they arrive, one
/// N x C fp32 block carrying the residual gradient). Without one, the attention branch's buffer still holds the
/// same tensor when the MLP norm's gradient arrives: summed out of place, and the attention norm's gradient is
/// added into that sum in place.
fn parallel_block_bwd(cx: &mut Ctx, g_out: Tensor, s: BlockSaved) -> Tensor {
    let nc = cx.ns * cx.m.n_embd;
    let (r, p) = (cx.r, cx.p);
    let cast = (r != p).then(|| cx.alloc(nc * p, Temporary, "_to_copy"));
    let (g_branch, g_bytes) = cast.map_or((g_out, r), |c| (c, p));
    let g_n2 = mlp_bwd(
        cx,
        g_out,
        s.mlp,
        s.norm2_out,
        Some((g_branch, g_bytes, false)),
    );
    let acc = if cast.is_some() {
        norm_bwd(cx, g_n2, s.norm2, None, Some(g_out))
    } else {
        // `old_var + var`: the residual gradient stays with the attention branch, which frees it.
        let g_x2 = norm_bwd(cx, g_n2, s.norm2, None, None);
        let sum = cx.alloc(nc * r, Temporary, "add");
        cx.free(g_x2);
        sum
    };
    let g_n1 = attn_bwd(
        cx,
        acc,
        s.attn,
        s.norm1_out,
        Some((g_branch, g_bytes, true)),
    );
    norm_bwd(cx, g_n1, s.norm1, Some(s.x_in), Some(acc))
}

/// Frees what a block saved, but its input (non-reentrant checkpointing's first forward already let go of
/// nearly all of it; see `Ctx::saving`). Weight casts stay in autocast's cache (weights are leaves) until
/// autocast exits, in the order the Linears ran.
fn release_block(cx: &mut Ctx, s: BlockSaved) {
    for n in [&s.norm1, &s.norm2] {
        cx.sim.free_some(&n.stats);
        cx.sim.free_some(&n.own);
    }
    for n in [&s.post1, &s.post2].into_iter().flatten() {
        cx.sim.free_some(&n.saved.stats);
        cx.sim.free_some(&n.saved.own);
        cx.sim.free_some(&[n.input]);
    }
    for t in [s.norm1_out, s.norm2_out].into_iter().flatten() {
        cx.free(t);
    }
    let mut linears: Vec<&LinearSaved> = Vec::new();
    match &s.attn {
        AttnSaved::Fused {
            c_attn,
            qkv,
            core,
            y,
            c_proj,
            drop,
        } => {
            for t in [*qkv, *y, *drop].into_iter().flatten() {
                cx.free(t);
            }
            release_core(cx, core);
            linears.extend([c_attn, c_proj]);
        }
        AttnSaved::Separate(a) => {
            for n in [&a.q_norm, &a.k_norm].into_iter().flatten() {
                cx.sim.free_some(&n.saved.stats);
                cx.sim.free_some(&n.saved.own);
                cx.free(n.input);
            }
            cx.sim.free_all(&[a.v_out, a.q_att, a.k_att]);
            cx.sim.free_some(&[a.y_copy]);
            if let Some(w) = &a.window {
                cx.sim.free_some(&[w.v_rep, Some(w.bias)]);
            }
            match &a.core {
                SeparateCore::Sdpa(sd) => cx.sim.free_all(&sd.tensors()),
                SeparateCore::Flash(f) => cx.sim.free_all(&f.tensors()),
                SeparateCore::Eager(e) => {
                    cx.sim.free_all(&[e.q_m, e.k_m, e.softmax, e.v_m, e.y]);
                    cx.sim.free_some(&[e.softcap]);
                    cx.sim.free_some(&[e.attn_lp]);
                }
            }
            linears.push(&a.q);
            linears.extend(a.k.iter().chain(a.v.iter()));
            linears.push(&a.o);
        }
    }
    linears.extend(s.mlp.release(cx));
    cx.sim.free_some(&[s.x_mid]);
    for l in linears.iter().flat_map(|l| l.parts()) {
        cx.sim.free_some(&l.adapter_tensors());
        if let Some(t) = l.input_cast {
            cx.free(t);
        }
        if let Some(t) = l.weight_cast {
            cx.autocast_cache.push(t);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The micro-step

/// Forward and loss of one micro-step. `idx` and `targets` are the batch tensors; the loss holds `targets`
/// (nanoGPT) or a shifted copy of them (HF, whose loop frees its own after the backward).
pub fn forward(cx: &mut Ctx, idx: Tensor, targets: Tensor, checkpointing: bool) -> Forward {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    // The residual stream's elements (a sequence shard of them under sequence parallel).
    let ncs = cx.ns * c;
    let pb = cx.pb;
    let (x0, pos, cos_sin) = match cx.arch.positions {
        Positions::Learned => {
            let pos = cx.alloc(cx.t * 8, Activations, "arange");
            let tok = cx.alloc(nc * pb, Temporary, "embedding");
            let pos_emb = cx.alloc(cx.t * c * pb, Temporary, "embedding");
            let x0 = cx.alloc(nc * pb, Activations, "add");
            cx.free(tok);
            cx.free(pos_emb);
            (x0, Some(pos), None)
        }
        Positions::Rotary => {
            // The tables span the rotated dimensions of a head (all of it but for partial rotary).
            let hs = cx.m.rotary_dims();
            // Sequence parallel: the lookup in this GPU's vocabulary rows, reduce-scattered to its sequence shard.
            let begun = distributed::tp_embedding_begin(cx);
            let x0 = cx.alloc(nc * pb, Activations, "embedding");
            let mut x0 = distributed::tp_embedding_end(cx, x0, begun);
            if cx.arch.embed_scale {
                // `hidden_states * normalizer` (a constant tensor): a new N x C, the embedding's output dies.
                let scaled = cx.alloc(ncs * pb, Activations, "mul");
                cx.free(x0);
                x0 = scaled;
            }
            // inv_freq @ positions in fp32, cat, cos / sin (times attention_scaling), cast to the stream dtype.
            let freqs = cx.alloc(cx.t * hs / 2 * 4, Temporary, "mul");
            let emb = cx.alloc(cx.t * hs * 4, Temporary, "cat");
            let cos = cx.alloc(cx.t * hs * cx.r, Activations, "mul");
            let sin = cx.alloc(cx.t * hs * cx.r, Activations, "mul");
            cx.sim.free_all(&[freqs, emb]);
            // Gemma 3: the sliding layers' own table (local base frequency), the same sizes.
            if cx.arch.dual_rope {
                let freqs = cx.alloc(cx.t * hs / 2 * 4, Temporary, "mul");
                let emb = cx.alloc(cx.t * hs * 4, Temporary, "cat");
                let cos2 = cx.alloc(cx.t * hs * cx.r, Activations, "mul");
                let sin2 = cx.alloc(cx.t * hs * cx.r, Activations, "mul");
                cx.sim.free_all(&[freqs, emb]);
                cx.rope_tables.extend([cos2, sin2]);
            }
            (x0, None, Some([cos, sin]))
        }
    };
    // HF eager attention: the causal mask, built once per forward from a T x T bool, [B, 1, T, T] in the
    // embeddings' dtype (`masking_utils.eager_mask`). A checkpointed block's recompute needs it again, so then it
    // lives until the backward is done.
    // Gemma 2 builds a sliding-window mask beside it, the same size (its window only changes values).
    let n_masks = 1 + usize::from(cx.arch.sliding_mask);
    let masks: Vec<Tensor> = if cx.arch.positions != Positions::Rotary {
        Vec::new()
    } else if cx.arch.core == Core::Manual {
        (0..n_masks)
            .map(|_| {
                let le = cx.alloc(cx.t * cx.t, Temporary, "le");
                let m = cx.alloc(cx.b * cx.t * cx.t * pb, Activations, "where");
                cx.free(le);
                m
            })
            .collect()
    } else if window_reached(cx) && !cx.arch.flash_attn {
        // SDPA with a sliding window the sequence reaches: the bool [1, 1, T, T] mask, kept through the forward
        // (fake-cuda trace of mistral-512-win128-bf16amp).
        vec![cx.alloc(cx.t * cx.t, Activations, "bitwise_and")]
    } else {
        Vec::new()
    };
    let (mut x, emb_drop) = dropout_on(cx, x0, ncs, pb, Activations);
    // Whether something in each block saves its input: the first norm, or without pre-norms (OLMo 2) the
    // branch's Linears when they saved no cast of it. The final norm saves the last block's output by its own rule.
    // A LayerNorm on autocast's fp32 cast of a 2-byte stream saves the cast, not the stream.
    let widened = matches!(cx.arch.norm, Norm::LayerNorm { .. }) && ops::layer_norm_widens(cx);
    let final_saves = cx.arch.norm_saves_input(cx.r) && !widened;
    let stream_saved = if cx.arch.pre_norms {
        final_saves
    } else {
        !cx.prec.autocast()
    };
    let mut blocks = Vec::new();
    // The embedding's output needs a gradient when the embedding is trained, or when checkpointing made it need
    // one (`enable_input_require_grads`); under LoRA every later block's input does (the first block's adapters
    // feed the stream).
    let embedding_grad =
        !cx.base_frozen() || cx.lora.is_some_and(|l| l.save_embed) || checkpointing;
    // The embeddings' output stays bound (`inputs_embeds` in the model's forward) until the forward returns, then
    // lives on only if the first block saved it: its first norm does when the stream is saved at all and the norm
    // is in the graph, which it is not when the block input needs no gradient (frozen norm weight: autograd
    // records nothing). Without pre-norms the first block's adapters read the stream itself. Stub-cuda snapshots of
    // mixtral-int8-r8-all-v256, llama-int8-r16-all-bf16amp and mistral-qlora-fp4-dq-r16-all: the embedding's
    // output is freed when `MixtralModel.forward` (`LlamaModel`, `MistralModel`) returns, after the final norm.
    let x0_saved = stream_saved && (embedding_grad || !cx.arch.pre_norms);
    for l in 0..cx.m.n_layer {
        cx.sim.layer(Some(l as u32));
        cx.block_input_grad = l > 0 || embedding_grad;
        cx.saving = !checkpointing;
        cx.sliding_layer = cx.arch.layer_slides(l);
        cx.first_block = l == 0;
        crate::distributed::pre_forward(cx, l);
        let (saved, x_out) = block_fwd(cx, x);
        crate::distributed::post_forward(cx, l);
        cx.saving = true;
        blocks.push(if checkpointing {
            // Non-reentrant checkpointing (`use_reentrant=False`): the forward ran as usual, keeping only the
            // block input; the backward recomputes the block (same allocations) and then runs its backward.
            let x_in = saved.x_in;
            release_block(cx, saved);
            BlockState::Checkpointed(x_in)
        } else {
            // `x = block(x)` lets go of the block input when nothing saved it (the first block's input stays
            // bound to the embeddings' output until the forward returns).
            if !stream_saved && l > 0 {
                cx.free(saved.x_in);
            }
            BlockState::Saved(Box::new(saved))
        });
        // The forward is no recompute: every block returns its output.
        if let Some(x_out) = x_out {
            x = x_out;
        }
    }
    cx.sim.layer(None);
    let masks = if checkpointing {
        masks
    } else {
        cx.sim.free_all(&masks);
        Vec::new()
    };
    let (norm_f_out, norm_f) = norm_fwd(cx);
    // The last block's output dies at `hidden_states = self.norm(hidden_states)` unless the final norm saved it:
    // a non-reentrant checkpoint holds only its block's inputs, never its output, and a norm on a 2-byte stream
    // saves its fp32 copy (stub-cuda snapshots of llama-lora-r16-all-bf16amp-ckpt and
    // mixtral-lora-r8-all-bf16amp-ckpt: the last decoder layer's residual add freed at that line). The snapshot of
    // the full fine-tuning mistral-sdpa-768-nowin-ckpt-bf16 shows the same, but full fine-tuning's checkpointed
    // estimates are left as they were for now (tests/data/finetune/README.md).
    if !final_saves && (!checkpointing || cx.base_frozen()) {
        cx.free(x);
    }
    if !checkpointing && !x0_saved {
        cx.free(x0);
    }
    cx.sim.next_stage("loss");
    let v = cx.m.vocab_size;
    let nv = cx.n * v;
    // Sequence parallel: the head reads the final norm's output all-gathered; the model returns its sharded
    // logits there, letting go of the shard and (unless the head saved it) the gathered input.
    let (norm_f_out, norm_f_shard) = distributed::tp_gather_input(cx, norm_f_out);
    let (mut logits, lm_head) = head_fwd(cx, c, v);
    let head_input_kept = norm_f_shard.map(|shard| {
        let kept = ops::keep_if_saved(cx, norm_f_out, &lm_head);
        cx.free(shard);
        kept
    });
    if cx.sp {
        // The model's call returns before the loss (the loop's): under FSDP the root reshards here, and its
        // post-forward after the loss (`step`) finds nothing left to free.
        distributed::root_post_forward(cx);
    }
    // Gemma 2: `tanh(logits / cap) * cap` in the logits' dtype; tanh's output is saved.
    let logit_tanh = cx.arch.logit_softcap.then(|| {
        let d = cx.alloc(nv * cx.p, Logits, "div");
        cx.free(logits);
        let t = cx.alloc(nv * cx.p, Logits, "tanh");
        cx.free(d);
        logits = cx.alloc(nv * cx.p, Logits, "mul");
        t
    });
    // Sequence parallel: the loop's `F.cross_entropy` under `loss_parallel()` on the vocabulary-sharded logits,
    // which the loop keeps bound until the backward is done (measure_parallel.py).
    let parallel_loss = cx
        .sp
        .then(|| Box::new(distributed::loss_parallel_fwd(cx, nv)));
    let (log_softmax, nll_input, targets) = match cx.arch.loss {
        _ if cx.sp => (None, None, distributed::loss_parallel_targets(cx)),
        // Under autocast (PyTorch 2.15) log_softmax runs in the logits' 2-byte dtype and nll_loss (autocast fp32
        // list) gets an fp32 copy of its input, which it saves.
        Loss::CrossEntropy => {
            let log_softmax = cx.alloc(nv * cx.p, Logits, "_log_softmax");
            let nll_input = cx
                .prec
                .autocast()
                .then(|| cx.alloc(nv * 4, Logits, "_to_copy"));
            (Some(log_softmax), nll_input, targets)
        }
        Loss::HfCausalLm => {
            let upcast = (cx.p != 4).then(|| cx.alloc(nv * 4, Logits, "_to_copy"));
            let pad = cx.alloc(cx.b * (cx.t + 1) * 8, Temporary, "constant_pad_nd");
            let labels = cx.alloc(cx.n * 8, Activations, "clone");
            let log_softmax = cx.alloc(nv * 4, Logits, "_log_softmax");
            if let Some(u) = upcast {
                cx.free(u);
            }
            cx.free(pad);
            (Some(log_softmax), None, labels)
        }
    };
    // Mixtures of experts with `output_router_logits`: transformers' `load_balancing_loss_func` after the
    // cross-entropy, per MoE layer: the softmax of its router logits in fp32 (saved), top-k, the experts' counts
    // (`_to_copy` of the ids to int32, `histc`); the top-k and the logits die at the loss's end (fake-cuda trace of
    // mixtral-256-e8top2-aux-fp16amp; its 512-byte scalar arithmetic is left out).
    let router_logits = std::mem::take(&mut cx.router_logits);
    let (e, k) = (cx.m.n_experts, cx.m.experts_per_token);
    let mut aux_softmax = Vec::new();
    let mut aux_topk = Vec::new();
    for _ in &router_logits {
        aux_softmax.push(cx.alloc(cx.n * e * 4, Activations, "_softmax"));
        aux_topk.push(cx.alloc(cx.n * k * 4, Temporary, "topk"));
        aux_topk.push(cx.alloc(cx.n * k * 8, Temporary, "topk"));
        let ids = cx.alloc(cx.n * k * 4, Temporary, "_to_copy");
        let histc = cx.alloc(e * 4, Temporary, "histc");
        cx.sim.free_all(&[ids, histc]);
    }
    cx.sim.free_all(&aux_topk);
    let norm_f_out = match head_input_kept {
        Some(kept) => kept,
        None => ops::keep_if_saved(cx, norm_f_out, &lm_head),
    };
    // DDP with `static_graph=True`, until its first backward (`_static_graph_delay_allreduce_enqueued`): the
    // wrapper's `_post_forward` passes the model's outputs through `_DDPSink`, whose forward clones every output
    // tensor (`_ddp_sink_clone`, True by default): a new logits tensor while the model's is alive, then the model's
    // is let go (gpt-ddp-w2-static's snapshot: a 64 MiB `clone` under `_DDPSink.forward` after the loss, the
    // logits' free after it; the loss's 512-byte clone too, not modelled as the loss itself is not). The loss was
    // computed from the model's logits inside the forward, so nothing it saved changes.
    if cx.ddp_sink_clone {
        let bytes = cx.sim.bytes_of(logits);
        let clone = cx.alloc(bytes, Logits, "clone");
        cx.free(logits);
        logits = clone;
    }
    let (logits, bound_logits) = match cx.arch.program {
        _ if cx.sp => (None, Some(logits)),
        Program::NanoGpt => (Some(logits), None),
        Program::HfLoop => {
            cx.free(logits);
            (None, None)
        }
    };
    cx.sim.free_all(&router_logits);
    Forward {
        blocks,
        idx,
        pos,
        cos_sin,
        masks,
        logit_tanh,
        emb_drop,
        x_last: x,
        norm_f,
        norm_f_out,
        lm_head,
        logits,
        bound_logits,
        log_softmax,
        parallel_loss,
        nll_input,
        targets,
        aux_softmax,
    }
}

/// The LM head: trained, or under LoRA frozen unless `modules_to_save` holds `lm_head` (then its trainable copy
/// in the base dtype runs, and saves its input).
fn head_fwd(cx: &mut Ctx, c: u64, v: u64) -> (Tensor, LinearSaved) {
    let Some(lora) = cx.lora else {
        return ops::linear_fwd(cx, cx.r, c, v, false, Logits);
    };
    let w = ops::Weight {
        bytes: cx.pb,
        trainable: lora.save_head,
    };
    ops::linear_fwd_as(cx, cx.r, c, v, false, Logits, w)
}

/// Backward of one micro-step, from the loss to the embeddings.
pub fn backward(cx: &mut Ctx, f: Forward) {
    let bound_logits = f.bound_logits;
    // The auxiliary loss's backward runs first (created last): its softmax backward per MoE layer, in the router
    // logits' dtype, held until that layer's router backward.
    for &s in &f.aux_softmax {
        let g = cx.alloc(
            cx.n * cx.m.n_experts * cx.p,
            Temporary,
            "_softmax_backward_data",
        );
        cx.aux_grads.push(g);
        cx.free(s);
    }
    let v = cx.m.vocab_size;
    let nv = cx.n * v;
    let c = cx.m.n_embd;
    let r = cx.r;
    let g_logits = if let Some(l) = f.parallel_loss {
        distributed::loss_parallel_bwd(cx, nv, *l, f.targets)
    } else {
        match cx.arch.loss {
            Loss::CrossEntropy => {
                // nll_loss_backward: a dense gradient the size of its input (fp32 under autocast), then its input and
                // the targets are released.
                let nll_bytes = if cx.prec.autocast() { 4 } else { cx.p };
                let g_nll = cx.alloc(nv * nll_bytes, Logits, "nll_loss_backward");
                if let Some(t) = f.nll_input {
                    cx.free(t);
                }
                cx.free(f.targets);
                let g_ls_in = if cx.prec.autocast() {
                    let g = cx.alloc(nv * cx.p, Logits, "_to_copy");
                    cx.free(g_nll);
                    g
                } else {
                    g_nll
                };
                let g_logits = cx.alloc(nv * cx.p, Logits, "_log_softmax_backward_data");
                cx.free(g_ls_in);
                cx.sim.free_some(&[f.log_softmax]);
                g_logits
            }
            Loss::HfCausalLm => {
                let g_nll = cx.alloc(nv * 4, Logits, "nll_loss_backward");
                cx.free(f.targets);
                let g_ls = cx.alloc(nv * 4, Logits, "_log_softmax_backward_data");
                cx.free(g_nll);
                cx.sim.free_some(&[f.log_softmax]);
                if cx.p != 4 {
                    let g = cx.alloc(nv * cx.p, Logits, "_to_copy");
                    cx.free(g_ls);
                    g
                } else {
                    g_ls
                }
            }
        }
    };
    // Gemma 2's soft-capped logits: * cap, tanh's backward (from its saved output), / cap.
    let mut g_logits = g_logits;
    if let Some(t) = f.logit_tanh {
        for op in ["mul", "tanh_backward", "div"] {
            let g = cx.alloc(nv * cx.p, Logits, op);
            cx.free(g_logits);
            if op == "tanh_backward" {
                cx.free(t);
            }
            g_logits = g;
        }
    }
    let head_had_grads = cx.have_grads;
    let g_norm_f = ops::linear_bwd(cx, g_logits, cx.p, true, f.lm_head, f.norm_f_out);
    let g_norm_f = distributed::tp_head_input_grad(cx, g_norm_f);
    // A tied head's first gradient of the step went to `.grad` last; take it back to meet the embedding's.
    let head_grad = if head_had_grads || !cx.arch.tied_head || cx.base_frozen() {
        None
    } else {
        cx.grads.pop()
    };
    let mut g = norm_bwd(cx, g_norm_f, f.norm_f, Some(f.x_last), None);
    cx.sim.next_stage("backward");
    for (l, s) in f.blocks.into_iter().enumerate().rev() {
        cx.sim.layer(Some(l as u32));
        cx.sliding_layer = cx.arch.layer_slides(l as u64);
        crate::distributed::pre_backward(cx, l as u64);
        let mut checkpointed_input = None;
        let s = match s {
            BlockState::Saved(s) => *s,
            BlockState::Checkpointed(x_in) => {
                checkpointed_input = Some(x_in);
                // Recompute: the block's forward again under the autocast state of the forward (checkpoint
                // restores it, and its exit clears the cast cache); its output is discarded, and with it the
                // recompute's graph and what its nodes held (`graph_holds`). Checkpointing made every block's
                // input need a gradient.
                cx.block_input_grad = true;
                let outer = std::mem::take(&mut cx.graph_holds);
                cx.recompute_stop = true;
                // A MoE block whose recompute stops inside it: its first backward steps need no saved tensor
                // and run before the recompute (`moe::moe_bwd_head`).
                if let Mlp::Moe(moe) = cx.arch.mlp {
                    if crate::moe::recompute_stops(cx, moe) && !cx.arch.post_norms {
                        cx.moe_grad_head =
                            Some(crate::moe::moe_bwd_head(cx, moe, (g, cx.r, false)));
                    }
                }
                let (saved, x_out) = block_fwd(cx, x_in);
                cx.recompute_stop = false;
                cx.sim.free_some(&[x_out]);
                let recomputed = std::mem::replace(&mut cx.graph_holds, outer);
                for t in recomputed {
                    cx.sim.release_hold(t);
                }
                // The recompute's router logits are part of its discarded output.
                let recomputed = std::mem::take(&mut cx.router_logits);
                cx.sim.free_all(&recomputed);
                cx.clear_autocast_cache();
                saved
            }
        };
        g = block_bwd(cx, g, s);
        // The checkpoint's hold on the block input ends with the block's backward (a pre-norm's backward has
        // already let go of it as the norm's saved input).
        if let Some(x_in) = checkpointed_input.take() {
            cx.free(x_in);
        }
        crate::distributed::post_backward(cx, l as u64);
    }
    cx.sim.layer(None);
    if let Some(cs) = f.cos_sin {
        cx.sim.free_all(&cs);
    }
    let tables = std::mem::take(&mut cx.rope_tables);
    cx.sim.free_all(&tables);
    cx.sim.free_all(&f.masks);
    let g = match f.emb_drop {
        Some(mask) => ops::dropout_bwd(cx, g, true, cx.ns * c, r, mask),
        None => g,
    };
    let g = distributed::tp_embedding_grad(cx, g);
    if let Some(pos) = f.pos {
        // tok + pos: the position gradient is summed over the batch, then both embeddings' dense backward.
        let g_pos = cx.alloc(cx.t * c * r, Temporary, "sum");
        let wpe = ops::embedding_bwd(cx, cx.t, cx.m.block_size);
        cx.free(g_pos);
        cx.free(pos);
        if cx.have_grads {
            cx.free(wpe);
        } else {
            cx.grads.push(wpe);
        }
    }
    if cx.base_frozen() && !cx.lora.is_some_and(|l| l.save_embed) {
        // LoRA's frozen embedding: no dense gradient. The stream's gradient (the embedding output's, when
        // checkpointing's `enable_input_require_grads` made it require one) dies with the graph.
        cx.free(g);
        cx.free(f.idx);
        cx.release_graph_holds();
        cx.sim.free_some(&[bound_logits]);
        return;
    }
    // Sequence parallel without FSDP: the vocabulary-sharded embedding's backward runs on the all-gathered
    // gradient and the replicated ids, and DTensor's strategy for `embedding_dense_backward` gives a Replicate
    // gradient of the whole table (num_weights V, fp32: stub-cuda snapshots of llama-tp4-sp and llama-tp2-sp,
    // 33,554,432 B at both tp), which the optimizer shards as it reads it (`step::optimizer_stage`).
    let rows = if cx.sp && cx.fsdp.is_none() {
        v * cx.tp
    } else {
        v
    };
    let dense = ops::embedding_bwd(cx, cx.n, rows);
    cx.free(g);
    cx.free(f.idx);
    match head_grad {
        // The tied weight's two gradients (the LM head's, then the embedding's) meet in the autograd engine's
        // input buffer. Under autocast the head's arrives as the fresh fp32 output of the weight cast's backward,
        // and the buffer adds the embedding's into it in place (`InputBuffer::accumulate`): no new buffer, as the
        // stub-cuda method (PyTorch's own engine and allocator) shows; fake tensors add out of place there, so
        // fake-cuda records differ. Without autocast the head's gradient is mm's transposed output and the sum
        // is out of place (a new V x C buffer; stub-cuda `wide-2048-fp32`).
        Some(head) if cx.prec.autocast() => {
            cx.free(dense);
            cx.grads.push(head);
        }
        Some(head) => {
            let summed = cx.alloc(v * c * cx.pb, Grads, "add");
            cx.free(head);
            cx.free(dense);
            cx.grads.push(summed);
        }
        // A later micro-step of nanoGPT's tied model: `.grad` exists; AccumulateGrad adds the sum out of place
        // and swaps. (The HF loop's tied model is modelled without that sum: llama-keep-grads-bf16amp, whose
        // peak is elsewhere; which of the two PyTorch does is not yet settled by a measurement.)
        None if cx.arch.tied_head && cx.arch.program == Program::NanoGpt => {
            let summed = cx.alloc(v * c * cx.pb, Temporary, "add");
            cx.free(dense);
            cx.free(summed);
        }
        None if cx.have_grads => cx.free(dense),
        None => cx.grads.push(dense),
    }
    // The loop's `del loss, logits` once the backward is done (8-bit Linears' held inputs with them).
    cx.release_graph_holds();
    cx.sim.free_some(&[bound_logits]);
}

#[cfg(test)]
mod tests {
    /// The attention output's `transpose(1, 2).contiguous()` after a rotary concatenation (HF GPT-NeoX): a copy
    /// o_proj saves when the flash kernel made the output like the head-major q (bf16 autocast on sm_90), none
    /// when the memory-efficient kernel made it token-major (fp32: stub-cuda snapshots of neox-256-fp32-sgd and
    /// phi3-256-gqa-rot75-fp32-sgd).
    #[test]
    fn attention_output_is_copied_only_when_the_kernel_made_it_head_major() {
        let copies = |precision: &str, bytes: i64| -> usize {
            let json = serde_json::json!({"model": {"hf": {"model_type": "gpt_neox", "hidden_size": 256,
                "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 4,
                "vocab_size": 1024, "max_position_embeddings": 256, "rotary_pct": 0.25,
                "use_parallel_residual": true, "tie_word_embeddings": false}},
                "train": {"batch_size": 2, "seq_len": 128, "precision": precision, "attention": "sdpa"},
                "device": {"compute_capability": 9.0}});
            let s = crate::input::setup_from_value(&json).unwrap();
            let sim = crate::step::simulate_recording(&s, true).unwrap();
            sim.events()
                .iter()
                .filter(|e| {
                    e.op == "clone"
                        && e.bytes == 2 * 128 * 256 * bytes
                        && e.phase.starts_with("step 1 forward (block")
                })
                .count()
        };
        assert_eq!(copies("bf16-amp", 2), 3);
        assert_eq!(copies("fp32", 4), 0);
    }

    /// A parallel-residual block's norms add their input gradients into the residual gradient `x_in`'s buffer
    /// holds (`parallel_block_bwd`): under autocast the buffer holds it alone, so no block's backward makes an
    /// N x C `add` (stub-cuda snapshot of preset-pythia-1b-b4-t2048-fp16amp); in fp32 the attention branch still
    /// holds it when the MLP norm's gradient lands, so each block sums once out of place, as the stub-cuda
    /// snapshot of neox-256-fp32-sgd shows (one `InputBuffer::add` a block; the partial rotary's placed halves
    /// are summed in place).
    #[test]
    fn parallel_residual_sums_the_norm_gradients_as_the_input_buffer_does() {
        let adds = |precision: &str| -> usize {
            let json = serde_json::json!({"model": {"hf": {"model_type": "gpt_neox", "hidden_size": 256,
                "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 4,
                "vocab_size": 1024, "max_position_embeddings": 256, "rotary_pct": 0.25,
                "use_parallel_residual": true, "tie_word_embeddings": false}},
                "train": {"batch_size": 2, "seq_len": 128, "precision": precision, "attention": "sdpa"}});
            let s = crate::input::setup_from_value(&json).unwrap();
            let sim = crate::step::simulate_recording(&s, true).unwrap();
            let nc = 2 * 128 * 256 * 4;
            sim.events()
                .iter()
                .filter(|e| {
                    e.op == "add" && e.bytes == nc && e.phase.starts_with("step 1 backward (block")
                })
                .count()
        };
        assert_eq!(adds("fp16-amp"), 0);
        assert_eq!(adds("fp32"), 3);
    }
}
