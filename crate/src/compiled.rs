//! nanoGPT's GPT under `torch.compile` (Inductor, PyTorch 2.15): one micro-step as the generated wrapper code
//! allocates and frees its buffers.
//!
//! AOTAutograd traces forward and backward into one joint graph and its min-cut partitioner decides what the
//! forward saves; Inductor fuses element-wise chains (GELU, dropout, residual adds, LayerNorm, the loss) into
//! Triton kernels whose intermediates never exist, and the wrapper frees each buffer after its last reader.
//! Everything here was read from allocation traces of `scripts/measure/measure.py` in compile mode
//! (`VRAMFIT_TRACE=file`, sizes chosen so that every shape has a distinct byte count), for autocast fp16/bf16,
//! fp32 and pure bf16, SDPA and manual attention, with and without dropout and bias.
//!
//! What the partitioned forward saves, per block (`p` bytes of a matmul output, `r` bytes of the residual):
//! the residual stream before the block and between its branches (`r`: fp32 under autocast, since the adds
//! promote), ln_1's and ln_2's outputs (`p`: the fused LayerNorm kernel writes the matmul dtype directly, so no
//! fp32 norm output and no separate cast exist), the fused QKV output, the attention output with its logsumexp
//! and RNG state, the MLP's fc output and GELU output (`p`), one fp32 per-row statistic per norm, the dropout
//! masks as bool, and, under autocast, every 2-byte weight cast (the backward's matmuls read them). Eager
//! autograd saves the same and more (fp32 norm outputs, their 2-byte casts); the difference is what compile
//! buys in the blocks. The larger gain is the loss: the LM head's backward is one fused kernel that computes
//! softmax - one_hot from the saved fp16 logits and two per-row statistics, so no log-softmax and no fp32 copy
//! of the logits are ever saved.
//!
//! What it does not follow is Inductor's scheduler: where it hands a dead buffer to a new one (`# reuse`) the
//! model frees and allocates, and it converts each fp16 weight gradient to fp32 as soon as it is made, where
//! Inductor sometimes converts them all at the end of the graph. Checked against 33 compiled configs in
//! `tests/data/compiled/` (docs/ACCURACY.md): all within 1.2%, most within 0.01%.

use crate::policy::Attention;
use crate::sim::Category::{Activations, Grads, Logits, Temporary, WeightCopies};
use crate::sim::Tensor;
use crate::tensors::{self as ops, Ctx, SdpaSaved};

/// Vocabulary columns of the B x T x vocab buffers. Inductor pads some of them to 16-element rows when the
/// vocabulary is not a multiple of 16, and which depends on its layout choices (measured: V = 65 pads the fp16
/// logits to 80 columns, V = 50257 pads the fp32 loss gradient to 50272, V = 1000 pads none). The model pads all
/// three, an upper bound of 15 columns per row that stays under 0.1% of the peak in every measured config.
fn padded_vocab(v: u64) -> u64 {
    v.div_ceil(16) * 16
}

/// One Linear's weight as the compiled matmul reads it: a 2-byte cast under autocast (saved for backward),
/// the parameter itself otherwise.
fn weight_cast(cx: &mut Ctx, elems: u64) -> Option<Tensor> {
    cx.prec
        .autocast()
        .then(|| cx.alloc(elems * 2, WeightCopies, "_to_copy"))
}

enum Attn {
    Sdpa(SdpaSaved, Tensor),
    /// Manual path: q, k, v copies, the probabilities (B x H x T x T) with the softmax's two per-row
    /// statistics, the scores as well under autocast or with dropout, the dropout mask, and the contiguous output.
    Manual {
        qkv: [Tensor; 3],
        scores: Option<Tensor>,
        probs: Tensor,
        stats: [Tensor; 2],
        mask: Option<Tensor>,
        y: Tensor,
    },
}

struct Block {
    x_in: Tensor,
    stats: [Tensor; 2],
    ln1: Tensor,
    w_attn: Option<Tensor>,
    attn: Attn,
    w_proj: Option<Tensor>,
    x_mid: Tensor,
    masks: [Option<Tensor>; 2],
    ln2: Tensor,
    w_fc: Option<Tensor>,
    h: Tensor,
    w_mlp: Option<Tensor>,
    g: Tensor,
}

/// What the compiled forward leaves: the saved tensors, and the logits it returns (also saved: the fused loss
/// backward reads them).
pub struct Forward {
    blocks: Vec<Block>,
    idx: Tensor,
    targets: Tensor,
    pos: Option<Tensor>,
    emb_mask: Option<Tensor>,
    x_last: Tensor,
    ln_f: Tensor,
    ln_f_stat: Tensor,
    wte_cast: Option<Tensor>,
    pub logits: Tensor,
    ce_stats: [Tensor; 2],
    loss: Tensor,
}

fn mask(cx: &mut Ctx, elems: u64) -> Option<Tensor> {
    // Dropout under Inductor: Philox random numbers in the kernel, the keep-mask saved as bool (1 byte).
    cx.dropout
        .then(|| cx.alloc(elems, Activations, "native_dropout"))
}

fn block_fwd(
    cx: &mut Ctx,
    x_in: Tensor,
    attention: Attention,
    last: bool,
    deferred: &mut Vec<Tensor>,
) -> Block {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    let stat1 = cx.alloc(cx.n * 4, Activations, "layer_norm rstd");
    let ln1 = cx.alloc(nc * p, Activations, "layer_norm");
    let w_attn = weight_cast(cx, 3 * c * c);
    cx.matmul_workspace(false);
    let qkv = cx.alloc(3 * nc * p, Activations, "mm");
    let attn = match attention {
        Attention::Sdpa => Attn::Sdpa(ops::sdpa_fwd(cx), qkv),
        Attention::Manual => {
            let s = ops::manual_scores_elems(cx);
            let q = cx.alloc(nc * p, Activations, "clone");
            let k = cx.alloc(nc * p, Activations, "clone");
            // One T x T buffer is saved (the probabilities) in fp32 and pure bf16 without dropout; under autocast
            // or with dropout the partitioner keeps the scores too (measured: two per block, plus the mask).
            let scores =
                (cx.prec.autocast() || cx.dropout).then(|| cx.alloc(s * p, Activations, "bmm"));
            let bht = cx.b * cx.m.n_head * cx.t * 4;
            let stats = [
                cx.alloc(bht, Activations, "softmax max"),
                cx.alloc(bht, Activations, "softmax sum"),
            ];
            let probs = cx.alloc(s * p, Activations, "softmax");
            let mask = mask(cx, s);
            let v = cx.alloc(nc * p, Activations, "clone");
            // The fused QKV output is read by the three copies only: released (or handed to a later buffer as
            // `# reuse`) once they are made.
            cx.free(qkv);
            let y = cx.alloc(nc * p, Activations, "bmm");
            Attn::Manual {
                qkv: [q, k, v],
                scores,
                probs,
                stats,
                mask,
                y,
            }
        }
    };
    let w_proj = weight_cast(cx, c * c);
    // c_proj's output, read by the fused residual-add kernel. Without dropout the wrapper releases it at the
    // end of the forward; with dropout it hands the buffer on to the next block (`# reuse`), so it is free for
    // the rest of the forward (measured: only the last block's is released at the end).
    let proj = cx.alloc(nc * p, Temporary, "mm");
    let x_mid = cx.alloc(nc * r, Activations, "add");
    let mask1 = mask(cx, nc);
    if cx.dropout && !last {
        cx.free(proj);
    } else {
        deferred.push(proj);
    }
    let ln2 = cx.alloc(nc * p, Activations, "layer_norm");
    let stat2 = cx.alloc(cx.n * 4, Activations, "layer_norm rstd");
    let w_fc = weight_cast(cx, 4 * c * c);
    let h = cx.alloc(4 * nc * p, Activations, "mm");
    let w_mlp = weight_cast(cx, 4 * c * c);
    let g = cx.alloc(4 * nc * p, Activations, "gelu");
    let mask2 = mask(cx, nc);
    Block {
        x_in,
        stats: [stat1, stat2],
        ln1,
        w_attn,
        attn,
        w_proj,
        x_mid,
        masks: [mask1, mask2],
        ln2,
        w_fc,
        h,
        w_mlp,
        g,
    }
}

/// Compiled forward and loss. `idx` and `targets` are the batch (saved: the embedding and loss backward read
/// them).
pub fn forward(cx: &mut Ctx, idx: Tensor, targets: Tensor, attention: Attention) -> Forward {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let (r, p, pb) = (cx.r, cx.p, cx.pb);
    // The position embedding rows (T x C, parameter dtype) are saved when no dropout follows; the residual
    // stream starts as tok + pos in `r` bytes.
    let pos = (!cx.dropout).then(|| cx.alloc(cx.t * c * pb, Activations, "embedding"));
    let x0 = cx.alloc(nc * r, Activations, "add");
    let emb_mask = mask(cx, nc);
    let mut deferred = Vec::new();
    let mut blocks = Vec::new();
    let mut x = x0;
    for l in 0..cx.m.n_layer {
        cx.sim.layer(Some(l as u32));
        let b = block_fwd(cx, x, attention, l + 1 == cx.m.n_layer, &mut deferred);
        x = cx.alloc(nc * r, Activations, "add");
        blocks.push(b);
    }
    cx.sim.layer(None);
    let ln_f = cx.alloc(nc * p, Activations, "layer_norm");
    let ln_f_stat = cx.alloc(cx.n * 4, Activations, "layer_norm rstd");
    cx.sim.free_all(&deferred);
    let step = cx.sim.timeline().last().map_or(1, |t| t.step);
    cx.sim.stage(step, "loss");
    let v = padded_vocab(cx.m.vocab_size);
    let wte_cast = weight_cast(cx, cx.m.vocab_size * c);
    let logits = cx.alloc(cx.n * v * p, Logits, "mm");
    // The fused cross-entropy kernel keeps the per-row max and log-sum-exp (fp32 [N]) for its backward.
    let ce_stats = [
        cx.alloc(cx.n * 4, Logits, "amax"),
        cx.alloc(cx.n * 4, Logits, "logsumexp"),
    ];
    let loss = cx.alloc(4, Temporary, "loss");
    Forward {
        blocks,
        idx,
        targets,
        pos,
        emb_mask,
        x_last: x,
        ln_f,
        ln_f_stat,
        wte_cast,
        logits,
        ce_stats,
        loss,
    }
}

/// A parameter's gradient as the compiled backward returns it, in the parameter dtype. Under autocast the
/// weight-gradient matmul writes 2 bytes first and a pointwise kernel converts it. When that kernel runs is the
/// scheduler's choice: right after the matmul in most measured configs, all at the end of the graph in a small
/// one whose weight gradients outweigh its activations (`tiny-vocab-grads-amp`, where this model is ~1% high).
/// Converting at once is the choice that matched more of them. The first micro-step's gradients become `.grad`
/// (AccumulateGrad steals them); later micro-steps' are added in place once the backward graph has returned all
/// of them (`pending`).
fn param_grad(cx: &mut Ctx, elems: u64, low: bool, pending: &mut Vec<Tensor>) {
    let cat = if cx.have_grads { Temporary } else { Grads };
    let low = (low && cx.prec.autocast()).then(|| cx.alloc(elems * 2, Temporary, "mm"));
    let g = cx.alloc(elems * cx.pb, cat, "mm");
    if let Some(t) = low {
        cx.free(t);
    }
    if cx.have_grads {
        pending.push(g);
    } else {
        cx.grads.push(g);
    }
}

fn norm_grads(cx: &mut Ctx, pending: &mut Vec<Tensor>) {
    let c = cx.m.n_embd;
    for _ in 0..1 + u64::from(cx.m.bias) {
        param_grad(cx, c, false, pending);
    }
}

fn linear_grads(cx: &mut Ctx, out_f: u64, in_f: u64, pending: &mut Vec<Tensor>) {
    param_grad(cx, out_f * in_f, true, pending);
    if cx.m.bias {
        param_grad(cx, out_f, false, pending);
    }
}

/// The residual gradient in `r` bytes and, under autocast, the 2-byte copy the matmuls read.
struct ResidualGrad {
    wide: Tensor,
    low: Option<Tensor>,
}

fn residual_grad(cx: &mut Ctx) -> ResidualGrad {
    let nc = cx.n * cx.m.n_embd;
    let wide = cx.alloc(nc * cx.r, Temporary, "layer_norm_backward");
    let low = (cx.r != cx.p).then(|| cx.alloc(nc * cx.p, Temporary, "_to_copy"));
    ResidualGrad { wide, low }
}

fn release_residual(cx: &mut Ctx, g: ResidualGrad) {
    cx.free(g.wide);
    if let Some(t) = g.low {
        cx.free(t);
    }
}

fn free_opt(cx: &mut Ctx, t: Option<Tensor>) {
    if let Some(t) = t {
        cx.free(t);
    }
}

fn block_bwd(
    cx: &mut Ctx,
    g_out: ResidualGrad,
    s: Block,
    pending: &mut Vec<Tensor>,
) -> ResidualGrad {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let p = cx.p;
    // MLP: c_proj's weight gradient reads the GELU output; the GELU backward is fused into one kernel that
    // writes the fc output's gradient; then c_fc's weight gradient and the input gradient of ln_2.
    linear_grads(cx, c, 4 * c, pending);
    cx.free(s.g);
    let g_h = cx.alloc(4 * nc * p, Temporary, "gelu_backward");
    free_opt(cx, s.w_mlp);
    cx.free(s.h);
    let g_mid = into_residual(
        cx,
        4 * c,
        g_h,
        [s.w_fc, Some(s.ln2), Some(s.stats[1]), Some(s.x_mid)],
        g_out,
        pending,
    );
    free_opt(cx, s.masks[1]);
    // Attention.
    linear_grads(cx, c, c, pending);
    let g_y = cx.alloc(nc * p, Temporary, "mm");
    free_opt(cx, s.w_proj);
    free_opt(cx, s.masks[0]);
    let g_qkv = match s.attn {
        Attn::Sdpa(a, qkv) => {
            let (dq, dk, dv) = ops::sdpa_bwd(cx);
            cx.free(g_y);
            cx.sim.free_all(&[a.out, a.lse, a.rng[0], a.rng[1], qkv]);
            let cat = cx.alloc(3 * nc * p, Temporary, "cat");
            cx.sim.free_all(&[dq, dk, dv]);
            cat
        }
        Attn::Manual {
            qkv,
            scores,
            probs,
            stats,
            mask,
            y,
        } => {
            let s_elems = ops::manual_scores_elems(cx);
            cx.free(y);
            let g_v = cx.alloc(nc * p, Temporary, "bmm");
            cx.free(g_y);
            // One fused kernel from the output's gradient to the scores' (bmm backward, dropout, softmax): a single
            // T x T transient, allocated once the saved scores are released (measured order).
            free_opt(cx, scores);
            let g_scores = cx.alloc(s_elems * p, Temporary, "softmax_backward");
            let g_q = cx.alloc(nc * p, Temporary, "bmm");
            let g_k = cx.alloc(nc * p, Temporary, "bmm");
            cx.free(g_scores);
            free_opt(cx, mask);
            cx.sim
                .free_all(&[probs, stats[0], stats[1], qkv[0], qkv[1], qkv[2]]);
            let cat = cx.alloc(3 * nc * p, Temporary, "cat");
            cx.sim.free_all(&[g_q, g_k, g_v]);
            cat
        }
    };
    into_residual(
        cx,
        3 * c,
        g_qkv,
        [s.w_attn, Some(s.ln1), Some(s.stats[0]), Some(s.x_in)],
        g_mid,
        pending,
    )
}

/// The end of a branch's backward: its first Linear (out_f x C) gives its weight gradient and the gradient of
/// the norm's output; the norm's backward, fused with the residual add, gives the new residual gradient. Frees
/// the Linear's incoming gradient, then `saved` (weight cast, norm output, norm statistic, norm input) and the
/// previous residual gradient.
fn into_residual(
    cx: &mut Ctx,
    out_f: u64,
    g_branch: Tensor,
    saved: [Option<Tensor>; 4],
    g_prev: ResidualGrad,
    pending: &mut Vec<Tensor>,
) -> ResidualGrad {
    let nc = cx.n * cx.m.n_embd;
    linear_grads(cx, out_f, cx.m.n_embd, pending);
    let g_norm = cx.alloc(nc * cx.p, Temporary, "mm");
    cx.free(g_branch);
    cx.sim.free_some(&saved[..2]);
    norm_grads(cx, pending);
    let g = residual_grad(cx);
    cx.free(g_norm);
    release_residual(cx, g_prev);
    cx.sim.free_some(&saved[2..]);
    g
}

/// Compiled backward of one micro-step: the fused loss backward, the LM head, the blocks in reverse, the
/// embeddings. Returns when the whole backward graph has returned (one call: its outputs, the parameter
/// gradients, exist together before AccumulateGrad takes them).
pub fn backward(cx: &mut Ctx, f: Forward) {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let p = cx.p;
    let v = padded_vocab(cx.m.vocab_size);
    let mut pending = Vec::new();
    cx.matmul_workspace(true);
    // Loss backward: softmax - one_hot from the saved logits and statistics, written in fp32 (`r`: fp32 under
    // autocast and in fp32, bf16 in pure bf16), then its copy in the matmul dtype for the LM-head matmuls.
    let g_wide = cx.alloc(cx.n * v * cx.r, Logits, "fused cross-entropy backward");
    let g_logits = cx.alloc(
        cx.n * v * p,
        Logits,
        "fused cross-entropy backward (matmul-dtype copy)",
    );
    cx.sim
        .free_all(&[f.ce_stats[0], f.ce_stats[1], g_wide, f.targets]);
    // The tied weight's LM-head gradient (matmul dtype) waits for the embedding's, to be summed at the end. When
    // it is already in the parameter dtype (fp32, pure bf16) the sum lands in its buffer, which becomes `.grad`.
    let head_is_grad = p == cx.pb;
    let head_cat = match (head_is_grad, cx.have_grads) {
        (true, false) => Grads,
        _ => Temporary,
    };
    let g_head = cx.alloc(cx.m.vocab_size * c * p, head_cat, "mm");
    cx.free(f.ln_f);
    let g_lnf = cx.alloc(nc * p, Temporary, "mm");
    cx.free(g_logits);
    free_opt(cx, f.wte_cast);
    norm_grads(cx, &mut pending);
    let mut g = residual_grad(cx);
    cx.free(g_lnf);
    cx.free(f.ln_f_stat);
    cx.free(f.x_last);
    let step = cx.sim.timeline().last().map_or(1, |t| t.step);
    cx.sim.stage(step, "backward");
    for (l, b) in f.blocks.into_iter().enumerate().rev() {
        cx.sim.layer(Some(l as u32));
        g = block_bwd(cx, g, b, &mut pending);
    }
    cx.sim.layer(None);
    free_opt(cx, f.emb_mask);
    // Embeddings: the position gradient (summed over the batch), then the token rows' (below).
    let cat = if cx.have_grads { Temporary } else { Grads };
    let g_pos = cx.alloc(cx.t * c * cx.pb, Temporary, "sum");
    let wpe = cx.alloc(cx.m.block_size * c * cx.pb, cat, "embedding_dense_backward");
    cx.free(g_pos);
    free_opt(cx, f.pos);
    // The token rows' gradient is accumulated in fp32 whatever the dtype (measured: an fp32 V x C buffer in fp32,
    // autocast and pure bf16 alike), then added to the head's gradient: in place when that is in the parameter
    // dtype, else into a new buffer in the parameter dtype (autocast: fp16 head gradient, fp32 parameter).
    let dense = cx.alloc(
        cx.m.vocab_size * c * 4,
        Temporary,
        "embedding_dense_backward",
    );
    release_residual(cx, g);
    let wte = if head_is_grad {
        g_head
    } else {
        let sum = cx.alloc(cx.m.vocab_size * c * cx.pb, cat, "add");
        cx.free(g_head);
        sum
    };
    cx.sim.free_all(&[dense, f.idx, f.loss]);
    for t in [wpe, wte] {
        if cx.have_grads {
            pending.push(t);
        } else {
            cx.grads.push(t);
        }
    }
    // AccumulateGrad: later micro-steps add into `.grad` in place and drop the graph's outputs.
    cx.sim.free_all(&pending);
}
