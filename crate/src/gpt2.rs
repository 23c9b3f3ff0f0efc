//! nanoGPT's GPT, one micro-step: forward block by block, the loss, backward block by block.
//!
//! Each block is `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))` with a fused QKV Linear, SDPA (or the manual
//! T x T path), a GELU MLP of width 4C and dropout after the embeddings, on the attention probabilities and on
//! both residual branches when dropout > 0. The LM head is tied to the token embedding; the loss is
//! `F.cross_entropy(logits.view(-1, V), targets.view(-1))` inside the model.

use crate::policy::Attention;
use crate::sim::Category::{self, Activations, Grads, Logits, Temporary};
use crate::sim::Tensor;
use crate::tensors::{self as ops, Ctx, LinearSaved, NormSaved, SdpaSaved};

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

enum AttnSaved {
    Sdpa(SdpaSaved),
    Manual(ManualSaved),
}

struct BlockSaved {
    x_in: Tensor,
    ln1: NormSaved,
    ln1_out: Option<Tensor>,
    c_attn: LinearSaved,
    qkv: Option<Tensor>,
    attn: AttnSaved,
    /// The attention output as c_proj saw it (manual: the contiguous copy; sdpa: the kernel output).
    y: Option<Tensor>,
    c_proj: LinearSaved,
    drop1: Option<Tensor>,
    x_mid: Tensor,
    ln2: NormSaved,
    ln2_out: Option<Tensor>,
    c_fc: LinearSaved,
    h: Tensor,
    g: Tensor,
    mlp_proj: LinearSaved,
    drop2: Option<Tensor>,
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
    pos: Tensor,
    emb_drop: Option<Tensor>,
    x_last: Tensor,
    ln_f: NormSaved,
    ln_f_out: Option<Tensor>,
    lm_head: LinearSaved,
    /// The logits: nanoGPT's loop keeps them bound until the next forward returns.
    pub logits: Tensor,
    log_softmax: Tensor,
    nll_input: Option<Tensor>,
    targets: Tensor,
}

/// The batch as nanoGPT's `get_batch` puts it on the device: X and Y, int64 B x T each.
pub fn get_batch(cx: &mut Ctx) -> (Tensor, Tensor) {
    let x = cx.alloc(cx.n * 8, Activations, "get_batch");
    let y = cx.alloc(cx.n * 8, Activations, "get_batch");
    (x, y)
}

/// `bias` buffers of the manual attention path: `torch.tril(torch.ones(block, block))` per block, in the
/// model's dtype (registered only when flash attention is not used).
pub fn buffers_bytes(cx: &Ctx, attention: Attention) -> Vec<u64> {
    match attention {
        Attention::Manual => vec![cx.m.block_size * cx.m.block_size * cx.pb; cx.m.n_layer as usize],
        Attention::Sdpa => vec![],
    }
}

/// Parameter tensors of nanoGPT's GPT (tied LM head counted once), as (elements, is_matrix).
pub fn param_tensors(cx: &Ctx) -> Vec<(u64, bool)> {
    let m = cx.m;
    let c = m.n_embd;
    let bias = m.bias;
    // LayerNorm: weight (+ bias); Linear: out x in weight (+ out bias).
    let norm =
        |v: &mut Vec<(u64, bool)>| v.extend(std::iter::repeat_n((c, false), 1 + usize::from(bias)));
    let linear = |v: &mut Vec<(u64, bool)>, out_f: u64, in_f: u64| {
        v.push((out_f * in_f, true));
        if bias {
            v.push((out_f, false));
        }
    };
    let mut v = vec![(m.vocab_size * c, true), (m.block_size * c, true)];
    for _ in 0..m.n_layer {
        norm(&mut v);
        linear(&mut v, 3 * c, c);
        linear(&mut v, c, c);
        norm(&mut v);
        linear(&mut v, 4 * c, c);
        linear(&mut v, c, 4 * c);
    }
    norm(&mut v);
    v
}

fn dropout_on(
    cx: &mut Ctx,
    y: Tensor,
    elems: u64,
    bytes: u64,
    cat: Category,
) -> (Tensor, Option<Tensor>) {
    if !cx.dropout {
        return (y, None);
    }
    let (out, mask) = ops::dropout_fwd(cx, elems, bytes, cat);
    cx.free(y);
    (out, Some(mask))
}

/// nanoGPT's non-flash attention: `att = (q @ k^T) * scale`, `masked_fill(bias == 0, -inf)`, `softmax`,
/// dropout, `att @ v`, then `transpose(1, 2).contiguous()`. `matmul` on the non-contiguous head views copies
/// q, k^T and v (`clone`, saved by `bmm`). Under autocast softmax (fp32 list) runs with `half_to_float` and
/// returns fp32 directly, dropout runs on the fp32 probabilities, and the second `bmm` saves a 2-byte cast of
/// them, so the fp32 dropout output dies with the attention call. Without autocast the dropout output is what
/// `bmm` saves.
fn manual_fwd(cx: &mut Ctx) -> (AttnSaved, Tensor, Option<Tensor>) {
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
    let dropout = cx.dropout.then(|| ops::dropout_fwd(cx, s, sb, Activations));
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
    (AttnSaved::Manual(saved), y, dead_at_return)
}

/// Backward of `manual_fwd`, given the gradient of the contiguous output; returns the gradient of qkv (`cat`).
fn manual_bwd(cx: &mut Ctx, gy: Tensor, saved: ManualSaved) -> Tensor {
    let nc = cx.n * cx.m.n_embd;
    let s = ops::manual_scores_elems(cx);
    let p = cx.p;
    let sb = if cx.prec.autocast() { 4 } else { p };
    // view/transpose backward of the contiguous copy, then att @ v: grad of v and of att.
    let g = cx.alloc(nc * p, Temporary, "clone");
    cx.free(gy);
    let gv = cx.alloc(nc * p, Temporary, "bmm");
    cx.matmul_workspace();
    let mut g_att = cx.alloc(s * p, Temporary, "bmm");
    cx.matmul_workspace();
    cx.free(g);
    cx.free(saved.v);
    if let Some(c) = saved.att_cast {
        cx.free(c);
        let wide = cx.alloc(s * 4, Temporary, "_to_copy");
        cx.free(g_att);
        g_att = wide;
    }
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
    let g_scaled = cx.alloc(s * p, Temporary, "mul");
    cx.free(g_fill);
    let gq = cx.alloc(nc * p, Temporary, "bmm");
    cx.matmul_workspace();
    let gk = cx.alloc(nc * p, Temporary, "bmm");
    cx.matmul_workspace();
    cx.free(g_scaled);
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

fn block_fwd(cx: &mut Ctx, x_in: Tensor, attention: Attention) -> (BlockSaved, Tensor) {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let bias = cx.m.bias;
    let (r, p) = (cx.r, cx.p);
    let (ln1_out, ln1) = ops::layer_norm_fwd(cx);
    let (qkv, c_attn) = ops::linear_fwd(cx, r, c, 3 * c, bias, Activations);
    // SDPA saves q, k, v (views of the fused QKV output); the manual path copies them instead, so the fused
    // output (and, under autocast, the unsaved fp32 dropout output) die when the attention call returns.
    let (attn, y, qkv_kept, dead_at_return) = match attention {
        Attention::Sdpa => (AttnSaved::Sdpa(ops::sdpa_fwd(cx)), None, Some(qkv), None),
        Attention::Manual => {
            let (a, y, dead) = manual_fwd(cx);
            (a, Some(y), None, dead)
        }
    };
    let (a, c_proj) = ops::linear_fwd(cx, p, c, c, bias, Temporary);
    let (a, drop1) = dropout_on(cx, a, nc, p, Temporary);
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
        release_attention(cx, &attn);
        if let Some(t) = y {
            cx.free(t);
        }
    }
    // ln_1's output is held by the attention call until it returns; under autocast nothing saves it.
    let ln1_out = ops::keep_if_saved(cx, ln1_out, &c_attn);
    let x_mid = cx.alloc(nc * r, Activations, "add");
    cx.free(a);
    let (ln2_out, ln2) = ops::layer_norm_fwd(cx);
    let (h, c_fc) = ops::linear_fwd(cx, r, c, 4 * c, bias, Activations);
    let g = cx.alloc(4 * nc * p, Activations, "gelu");
    cx.drop_unsaved(h);
    let (o, mlp_proj) = ops::linear_fwd(cx, p, 4 * c, c, bias, Temporary);
    let (o, drop2) = dropout_on(cx, o, nc, p, Temporary);
    cx.drop_unsaved(g);
    let ln2_out = ops::keep_if_saved(cx, ln2_out, &c_fc);
    let x_out = cx.alloc(nc * r, Activations, "add");
    cx.free(o);
    // Unsaved, the residual after attention dies once the block returns.
    cx.drop_unsaved(x_mid);
    let saved = BlockSaved {
        x_in,
        ln1,
        ln1_out,
        c_attn,
        qkv: qkv_kept,
        attn,
        y,
        c_proj,
        drop1,
        x_mid,
        ln2,
        ln2_out,
        c_fc,
        h,
        g,
        mlp_proj,
        drop2,
    };
    (saved, x_out)
}

/// Forward and loss of one micro-step. `idx` and `targets` are the batch tensors (held by autograd after).
pub fn forward(
    cx: &mut Ctx,
    idx: Tensor,
    targets: Tensor,
    attention: Attention,
    checkpointing: bool,
) -> Forward {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let pb = cx.pb;
    let pos = cx.alloc(cx.t * 8, Activations, "arange");
    let tok = cx.alloc(nc * pb, Temporary, "embedding");
    let pos_emb = cx.alloc(cx.t * c * pb, Temporary, "embedding");
    let x0 = cx.alloc(nc * pb, Activations, "add");
    cx.free(tok);
    cx.free(pos_emb);
    let (mut x, emb_drop) = dropout_on(cx, x0, nc, pb, Activations);
    let mut blocks = Vec::new();
    for l in 0..cx.m.n_layer {
        cx.sim.layer(Some(l as u32));
        cx.saving = !checkpointing;
        let (saved, x_out) = block_fwd(cx, x, attention);
        cx.saving = true;
        blocks.push(if checkpointing {
            checkpoint(cx, saved)
        } else {
            BlockState::Saved(Box::new(saved))
        });
        x = x_out;
    }
    cx.sim.layer(None);
    let (ln_f_out, ln_f) = ops::layer_norm_fwd(cx);
    cx.sim.next_stage("loss");
    let (logits, lm_head) = ops::linear_fwd(cx, cx.r, c, cx.m.vocab_size, false, Logits);
    let nv = cx.n * cx.m.vocab_size;
    // cross_entropy = log_softmax + nll_loss. Under autocast (PyTorch 2.15) log_softmax runs in the logits'
    // 2-byte dtype and nll_loss (autocast fp32 list) gets an fp32 copy of its input, which it saves.
    let log_softmax = cx.alloc(nv * cx.p, Logits, "_log_softmax");
    let nll_input = cx
        .prec
        .autocast()
        .then(|| cx.alloc(nv * 4, Logits, "_to_copy"));
    let ln_f_out = ops::keep_if_saved(cx, ln_f_out, &lm_head);
    Forward {
        blocks,
        idx,
        pos,
        emb_drop,
        x_last: x,
        ln_f,
        ln_f_out,
        lm_head,
        logits,
        log_softmax,
        nll_input,
        targets,
    }
}

/// Non-reentrant activation checkpointing of a block (`torch.utils.checkpoint(use_reentrant=False)`): the
/// forward ran as usual, then its saved tensors are dropped; only the block input is kept. The backward
/// recomputes the block (same allocations as the forward) and then runs its backward.
fn checkpoint(cx: &mut Ctx, saved: BlockSaved) -> BlockState {
    let x_in = saved.x_in;
    release_block(cx, saved);
    BlockState::Checkpointed(x_in)
}

/// Frees what attention saved for its backward.
fn release_attention(cx: &mut Ctx, attn: &AttnSaved) {
    match attn {
        AttnSaved::Sdpa(a) => {
            cx.sim.free_all(&[a.out, a.lse, a.rng[0], a.rng[1]]);
        }
        AttnSaved::Manual(a) => {
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

/// Frees every tensor a block saved but its input (the checkpointed forward discards them).
fn release_block(cx: &mut Ctx, s: BlockSaved) {
    cx.sim.free_some(&s.ln1.stats);
    for t in [s.ln1_out, s.qkv, s.y, s.drop1, s.ln2_out, s.drop2]
        .into_iter()
        .flatten()
    {
        cx.free(t);
    }
    for l in [&s.c_attn, &s.c_proj, &s.c_fc, &s.mlp_proj] {
        if let Some(t) = l.input_cast {
            cx.free(t);
        }
        // Weight casts stay in autocast's cache (weights are leaves) until autocast exits.
        if let Some(t) = l.weight_cast {
            cx.autocast_cache.push(t);
        }
    }
    release_attention(cx, &s.attn);
    cx.sim.free_all(&[s.x_mid, s.h, s.g]);
    cx.sim.free_some(&s.ln2.stats);
}

/// The gradient entering a residual branch: the residual's own gradient (shared with the skip path, so not
/// owned), or, with dropout on the branch, `native_dropout_backward` of it, after the engine cast the fp32
/// residual gradient to the branch output's dtype. Returns (gradient, its bytes per element, owned).
fn branch_grad(cx: &mut Ctx, g_residual: Tensor, mask: Option<Tensor>) -> (Tensor, u64, bool) {
    let nc = cx.n * cx.m.n_embd;
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

fn block_bwd(cx: &mut Ctx, g_out: Tensor, s: BlockSaved) -> Tensor {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    let bias = cx.m.bias;
    // MLP branch. The residual path keeps g_out alive until ln_2's gradient is summed into it.
    let (g_branch, g_bytes, owned) = branch_grad(cx, g_out, s.drop2);
    let gh_in = ops::linear_bwd(cx, g_branch, g_bytes, owned, s.mlp_proj, Some(s.g));
    let gh = cx.alloc(4 * nc * p, Temporary, "gelu_backward");
    cx.free(gh_in);
    cx.free(s.h);
    let g_ln2 = ops::linear_bwd(cx, gh, p, true, s.c_fc, s.ln2_out);
    let g_x2 = ops::layer_norm_bwd(cx, g_ln2, s.ln2, s.x_mid, bias);
    let g_mid = ops::grad_sum(cx, g_out, g_x2, nc * r);
    // Attention branch.
    let (g_branch, g_bytes, owned) = branch_grad(cx, g_mid, s.drop1);
    let gy = ops::linear_bwd(cx, g_branch, g_bytes, owned, s.c_proj, s.y);
    let g_qkv = match s.attn {
        AttnSaved::Sdpa(a) => {
            let (dq, dk, dv) = ops::sdpa_bwd(cx);
            cx.free(gy);
            if let Some(qkv) = s.qkv {
                cx.free(qkv);
            }
            cx.sim.free_all(&[a.lse, a.out, a.rng[0], a.rng[1]]);
            let cat = cx.alloc(3 * nc * p, Temporary, "cat");
            cx.sim.free_all(&[dq, dk, dv]);
            cat
        }
        AttnSaved::Manual(a) => manual_bwd(cx, gy, a),
    };
    let g_ln1 = ops::linear_bwd(cx, g_qkv, p, true, s.c_attn, s.ln1_out);
    let g_x1 = ops::layer_norm_bwd(cx, g_ln1, s.ln1, s.x_in, bias);
    ops::grad_sum(cx, g_mid, g_x1, nc * r)
}

/// Backward of one micro-step, from the loss to the embeddings.
pub fn backward(cx: &mut Ctx, f: Forward, attention: Attention) {
    let nv = cx.n * cx.m.vocab_size;
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let r = cx.r;
    // nll_loss_backward: a dense gradient the size of its input (fp32 under autocast), then its input and the
    // targets are released.
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
    cx.free(f.log_softmax);
    let lm_had_grads = cx.have_grads;
    let g_lnf = ops::linear_bwd(cx, g_logits, cx.p, true, f.lm_head, f.ln_f_out);
    let wte_grad = if lm_had_grads { None } else { cx.grads.pop() };
    let mut g = ops::layer_norm_bwd(cx, g_lnf, f.ln_f, f.x_last, cx.m.bias);
    cx.sim.next_stage("backward");
    for (l, s) in f.blocks.into_iter().enumerate().rev() {
        cx.sim.layer(Some(l as u32));
        let s = match s {
            BlockState::Saved(s) => *s,
            BlockState::Checkpointed(x_in) => {
                // Recompute: the block's forward again under the autocast state of the forward (checkpoint
                // restores it, and its exit clears the cast cache); its output is discarded.
                let (saved, x_out) = block_fwd(cx, x_in, attention);
                cx.free(x_out);
                cx.clear_autocast_cache();
                saved
            }
        };
        g = block_bwd(cx, g, s);
    }
    cx.sim.layer(None);
    let g = match f.emb_drop {
        Some(mask) => ops::dropout_bwd(cx, g, true, nc, r, mask),
        None => g,
    };
    // tok + pos: the position gradient is summed over the batch, then both embeddings' dense backward.
    let g_pos = cx.alloc(cx.t * c * r, Temporary, "sum");
    let wpe = ops::embedding_bwd(cx, cx.t, cx.m.block_size);
    cx.free(g_pos);
    cx.free(f.pos);
    if cx.have_grads {
        cx.free(wpe);
    } else {
        cx.grads.push(wpe);
    }
    let dense = ops::embedding_bwd(cx, cx.n, cx.m.vocab_size);
    cx.free(g);
    cx.free(f.idx);
    match wte_grad {
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
            let summed = cx.alloc(cx.m.vocab_size * c * cx.pb, Grads, "add");
            cx.free(head);
            cx.free(dense);
            cx.grads.push(summed);
        }
        // A later micro-step: `.grad` exists; AccumulateGrad adds the sum out of place and swaps.
        None => {
            let summed = cx.alloc(cx.m.vocab_size * c * cx.pb, Temporary, "add");
            cx.free(dense);
            cx.free(summed);
        }
    }
}
