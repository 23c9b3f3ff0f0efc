//! Hugging Face `LlamaForCausalLM` (transformers 5, `attn_implementation="sdpa"`), one micro-step.
//!
//! Each decoder layer is `x = x + o_proj(sdpa(rope(q_proj(h)), rope(k_proj(h)), v_proj(h)))` with
//! `h = input_layernorm(x)`, then `x = x + down_proj(silu(gate_proj(h2)) * up_proj(h2))` with
//! `h2 = post_attention_layernorm(x)`. Rotary cos/sin are computed once per forward in fp32 (cast to the
//! stream's dtype). With no padding mask, transformers passes `is_causal=True` and `enable_gqa=True` to SDPA.
//! The loss is computed inside the model: `logits.float()`, labels padded and shifted (`clone`),
//! `cross_entropy` in fp32.

use crate::sim::Category::{Activations, Grads, Logits, Temporary};
use crate::sim::Tensor;
use crate::tensors::{self as ops, Ctx, LinearSaved, NormSaved, SdpaSaved};

struct LayerSaved {
    x_in: Tensor,
    rms1: NormSaved,
    h: Option<Tensor>,
    q: LinearSaved,
    k: LinearSaved,
    v: LinearSaved,
    v_out: Tensor,
    /// q and k as SDPA saved them (autocast's casts of the rotated fp32 q and k, or the rotated tensors).
    q_att: Tensor,
    k_att: Tensor,
    /// K/V repeated to all heads for the memory-efficient kernel, which has no GQA support.
    kv_repeat: Option<(Tensor, Tensor)>,
    sdpa: SdpaSaved,
    o: LinearSaved,
    x_mid: Tensor,
    rms2: NormSaved,
    h2: Option<Tensor>,
    gate: LinearSaved,
    gate_out: Tensor,
    silu: Tensor,
    up: LinearSaved,
    up_out: Tensor,
    prod: Tensor,
    down: LinearSaved,
}

pub struct Forward {
    layers: Vec<Option<LayerSaved>>,
    /// Inputs of checkpointed layers (their saved tensors are recomputed in backward).
    ckpt_inputs: Vec<Tensor>,
    input_ids: Tensor,
    cos_sin: [Tensor; 2],
    x_last: Tensor,
    rmsf: NormSaved,
    hf: Option<Tensor>,
    lm_head: LinearSaved,
    log_softmax: Tensor,
    labels: Tensor,
}

/// Parameter tensors of LlamaForCausalLM as (elements, is_matrix).
pub fn param_tensors(cx: &Ctx) -> Vec<(u64, bool)> {
    let m = cx.m;
    let c = m.n_embd;
    let kv = m.kv_dim();
    let i = m.intermediate_size;
    let mut v = vec![(m.vocab_size * c, true)];
    for _ in 0..m.n_layer {
        v.extend([(c * c, true), (kv * c, true), (kv * c, true), (c * c, true)]);
        v.extend([(i * c, true), (i * c, true), (c * i, true)]);
        v.extend([(c, false), (c, false)]);
    }
    v.push((c, false));
    if !m.tie_embeddings {
        v.push((m.vocab_size * c, true));
    }
    v
}

/// In a bf16 model, RMSNorm's `hidden.to(float32)` is a real copy and it is the copy that `pow` and the
/// multiply save: the bf16 residual stream itself is saved by nothing and dies when Python lets go of it.
fn stream_unsaved(cx: &Ctx) -> bool {
    cx.r == 2
}

/// Bytes of the rotated q or k: `q * cos` with an fp32 cos promotes a 2-byte q to fp32 under autocast.
fn rope_bytes(cx: &Ctx) -> u64 {
    cx.p.max(cx.r)
}

/// `q * cos + rotate_half(q) * sin` on `width` features: mul, neg (half), cat, mul, add. Each multiply saves
/// only cos or sin; q itself is not saved.
fn rope_fwd(cx: &mut Ctx, width: u64) -> Tensor {
    let rb = rope_bytes(cx);
    let m1 = cx.alloc(cx.n * width * rb, Temporary, "mul");
    let neg = cx.alloc(cx.n * width / 2 * cx.p, Temporary, "neg");
    let cat = cx.alloc(cx.n * width * cx.p, Temporary, "cat");
    cx.free(neg);
    let m2 = cx.alloc(cx.n * width * rb, Temporary, "mul");
    cx.free(cat);
    let out = cx.alloc(cx.n * width * rb, Activations, "add");
    cx.free(m1);
    cx.free(m2);
    out
}

/// Backward of `rope_fwd`: both products' gradients, rotate_half's (slice/neg/cat), summed, then cast back to
/// the projection output's dtype.
fn rope_bwd(cx: &mut Ctx, g: Tensor, width: u64) -> Tensor {
    let rb = rope_bytes(cx);
    let g1 = cx.alloc(cx.n * width * rb, Temporary, "mul");
    let g2 = cx.alloc(cx.n * width * rb, Temporary, "mul");
    cx.free(g);
    let g_rot = cx.alloc(cx.n * width * rb, Temporary, "cat");
    cx.free(g2);
    let sum = ops::grad_sum(cx, g1, g_rot, cx.n * width * rb);
    if rb != cx.p {
        let lp = cx.alloc(cx.n * width * cx.p, Temporary, "_to_copy");
        cx.free(sum);
        lp
    } else {
        sum
    }
}

fn layer_fwd(cx: &mut Ctx, x_in: Tensor) -> (LayerSaved, Tensor) {
    let c = cx.m.n_embd;
    let kv = cx.m.kv_dim();
    let i = cx.m.intermediate_size;
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    let (h, rms1) = ops::rms_norm_fwd(cx);
    let (q_out, q) = ops::linear_fwd(cx, r, c, c, false, Temporary);
    let (k_out, k) = ops::linear_fwd(cx, r, c, kv, false, Temporary);
    let (v_out, v) = ops::linear_fwd(cx, r, c, kv, false, Activations);
    let q_rot = rope_fwd(cx, c);
    let k_rot = rope_fwd(cx, kv);
    cx.free(q_out);
    cx.free(k_out);
    // SDPA is on autocast's lower-precision list: the fp32 rotated q and k are cast (and the casts saved). The
    // autocast wrapper's casts are arguments of one C++ call, evaluated last to first: k's cast comes before q's
    // (stub-cuda snapshots of llama-3.2-1b-tied and llama-ckpt-1024).
    let (q_att, k_att) = if rope_bytes(cx) != p {
        let ka = cx.alloc(cx.n * kv * p, Activations, "_to_copy");
        let qa = cx.alloc(nc * p, Activations, "_to_copy");
        (qa, ka)
    } else {
        (q_rot, k_rot)
    };
    let kv_repeat = (cx.backend == crate::policy::SdpaBackend::Efficient && kv != c).then(|| {
        let kr = cx.alloc(nc * p, Activations, "repeat_interleave");
        let vr = cx.alloc(nc * p, Activations, "repeat_interleave");
        (kr, vr)
    });
    let sdpa = ops::sdpa_fwd(cx);
    // Unsaved (checkpointed forward), the inputs SDPA made for itself die with it; what the attention call holds
    // (its output, the rotated q and k, v) dies when it returns (stub-cuda snapshot of llama-ckpt-1024).
    if q_att != q_rot {
        cx.drop_unsaved(q_att);
        cx.drop_unsaved(k_att);
    }
    if let Some((a, b)) = kv_repeat {
        cx.drop_unsaved(a);
        cx.drop_unsaved(b);
    }
    let (o_out, o) = ops::linear_fwd(cx, p, c, c, false, Temporary);
    if q_att != q_rot {
        cx.free(q_rot);
        cx.free(k_rot);
    }
    for t in [sdpa.out, q_att, k_att, v_out] {
        cx.drop_unsaved(t);
    }
    let h = ops::keep_if_saved(cx, h, &q);
    let x_mid = cx.alloc(nc * r, Activations, "add");
    cx.free(o_out);
    let (h2, rms2) = ops::rms_norm_fwd(cx);
    let (gate_out, gate) = ops::linear_fwd(cx, r, c, i, false, Activations);
    let silu = cx.alloc(cx.n * i * p, Activations, "silu");
    cx.drop_unsaved(gate_out);
    let (up_out, up) = ops::linear_fwd(cx, r, c, i, false, Activations);
    let prod = cx.alloc(cx.n * i * p, Activations, "mul");
    cx.drop_unsaved(silu);
    cx.drop_unsaved(up_out);
    let (d_out, down) = ops::linear_fwd(cx, p, i, c, false, Temporary);
    cx.drop_unsaved(prod);
    let h2 = ops::keep_if_saved(cx, h2, &gate);
    let x_out = cx.alloc(nc * r, Activations, "add");
    cx.free(d_out);
    if stream_unsaved(cx) || !cx.saving {
        cx.free(x_mid);
    }
    let saved = LayerSaved {
        x_in,
        rms1,
        h,
        q,
        k,
        v,
        v_out,
        q_att,
        k_att,
        kv_repeat,
        sdpa,
        o,
        x_mid,
        rms2,
        h2,
        gate,
        gate_out,
        silu,
        up,
        up_out,
        prod,
        down,
    };
    (saved, x_out)
}

/// Frees everything a layer saved except its input (a checkpointed forward keeps only the input).
fn release_layer(cx: &mut Ctx, s: LayerSaved) {
    cx.sim.free_some(&s.rms1.stats);
    cx.sim.free_some(&s.rms1.own);
    cx.sim.free_some(&s.rms2.stats);
    cx.sim.free_some(&s.rms2.own);
    for t in [s.h, s.h2].into_iter().flatten() {
        cx.free(t);
    }
    for l in [&s.q, &s.k, &s.v, &s.o, &s.gate, &s.up, &s.down] {
        if let Some(t) = l.input_cast {
            cx.free(t);
        }
        // Weight casts stay in autocast's cache (weights are leaves) until autocast exits.
        if let Some(t) = l.weight_cast {
            cx.autocast_cache.push(t);
        }
    }
    if let Some((a, b)) = s.kv_repeat {
        cx.sim.free_all(&[a, b]);
    }
    cx.sim.free_all(&[
        s.v_out,
        s.q_att,
        s.k_att,
        s.sdpa.out,
        s.sdpa.lse,
        s.sdpa.rng[0],
        s.sdpa.rng[1],
    ]);
    cx.sim
        .free_all(&[s.x_mid, s.gate_out, s.silu, s.up_out, s.prod]);
}

fn layer_bwd(cx: &mut Ctx, g_out: Tensor, s: LayerSaved) -> Tensor {
    let c = cx.m.n_embd;
    let kv = cx.m.kv_dim();
    let i = cx.m.intermediate_size;
    let nc = cx.n * c;
    let (r, p) = (cx.r, cx.p);
    // MLP. The residual path holds g_out until the norm's gradient is summed into it.
    let g_prod = ops::linear_bwd(cx, g_out, r, false, s.down, Some(s.prod));
    let g_silu = cx.alloc(cx.n * i * p, Temporary, "mul");
    let g_up = cx.alloc(cx.n * i * p, Temporary, "mul");
    cx.free(g_prod);
    cx.free(s.up_out);
    let h2_for_up = s.h2;
    let g_h2a = ops::linear_bwd(cx, g_up, p, true, s.up, None);
    cx.free(s.silu);
    let g_gate = cx.alloc(cx.n * i * p, Temporary, "silu_backward");
    cx.free(g_silu);
    cx.free(s.gate_out);
    let g_h2b = ops::linear_bwd(cx, g_gate, p, true, s.gate, h2_for_up);
    let g_h2 = ops::grad_sum(cx, g_h2a, g_h2b, nc * r);
    let g_x2 = ops::rms_norm_bwd(cx, g_h2, s.rms2, s.x_mid);
    let g_mid = ops::grad_sum(cx, g_out, g_x2, nc * r);
    // Attention.
    let g_att = ops::linear_bwd(cx, g_mid, r, false, s.o, None);
    let (dq, dk, dv) = ops::sdpa_bwd(cx);
    cx.free(g_att);
    cx.sim.free_all(&[
        s.q_att,
        s.k_att,
        s.v_out,
        s.sdpa.out,
        s.sdpa.lse,
        s.sdpa.rng[0],
        s.sdpa.rng[1],
    ]);
    let (dk, dv) = match s.kv_repeat {
        Some((kr, vr)) => {
            // repeat_interleave's backward sums the repeated heads back to the KV heads.
            cx.sim.free_all(&[kr, vr]);
            let dk2 = cx.alloc(cx.n * kv * p, Temporary, "sum");
            let dv2 = cx.alloc(cx.n * kv * p, Temporary, "sum");
            cx.sim.free_all(&[dk, dv]);
            (dk2, dv2)
        }
        None => (dk, dv),
    };
    let rb = rope_bytes(cx);
    let (dq, dk) = if rb != p {
        // ToCopyBackward of SDPA's input casts: back to fp32.
        let dq32 = cx.alloc(nc * 4, Temporary, "_to_copy");
        cx.free(dq);
        let dk32 = cx.alloc(cx.n * kv * 4, Temporary, "_to_copy");
        cx.free(dk);
        (dq32, dk32)
    } else {
        (dq, dk)
    };
    let gk = rope_bwd(cx, dk, kv);
    let gq = rope_bwd(cx, dq, c);
    let h = s.h;
    let g_hv = ops::linear_bwd(cx, dv, p, true, s.v, None);
    let g_hk = ops::linear_bwd(cx, gk, p, true, s.k, None);
    let acc = ops::grad_sum(cx, g_hv, g_hk, nc * r);
    let g_hq = ops::linear_bwd(cx, gq, p, true, s.q, h);
    let g_h = ops::grad_sum(cx, acc, g_hq, nc * r);
    let g_x1 = ops::rms_norm_bwd(cx, g_h, s.rms1, s.x_in);
    ops::grad_sum(cx, g_mid, g_x1, nc * r)
}

/// The batch for one micro-step: input_ids and labels, int64 B x T each.
pub fn get_batch(cx: &mut Ctx) -> (Tensor, Tensor) {
    let x = cx.alloc(cx.n * 8, Activations, "get_batch");
    let y = cx.alloc(cx.n * 8, Activations, "get_batch");
    (x, y)
}

/// Forward with labels: the model's loss.
pub fn forward(cx: &mut Ctx, input_ids: Tensor, checkpointing: bool) -> Forward {
    let c = cx.m.n_embd;
    let nc = cx.n * c;
    let hs = cx.m.head_dim();
    let x0 = cx.alloc(nc * cx.pb, Activations, "embedding");
    // Rotary: inv_freq @ positions in fp32, cat, cos / sin (times attention_scaling), cast to the stream dtype.
    let freqs = cx.alloc(cx.t * hs / 2 * 4, Temporary, "mul");
    let emb = cx.alloc(cx.t * hs * 4, Temporary, "cat");
    let cos = cx.alloc(cx.t * hs * cx.r, Activations, "mul");
    let sin = cx.alloc(cx.t * hs * cx.r, Activations, "mul");
    cx.sim.free_all(&[freqs, emb]);
    let mut x = x0;
    let mut layers = Vec::new();
    let mut ckpt_inputs = Vec::new();
    for l in 0..cx.m.n_layer {
        cx.sim.layer(Some(l as u32));
        cx.saving = !checkpointing;
        let (saved, x_out) = layer_fwd(cx, x);
        cx.saving = true;
        if checkpointing {
            ckpt_inputs.push(saved.x_in);
            release_layer(cx, saved);
            layers.push(None);
        } else {
            // `hidden_states = decoder_layer(hidden_states)` lets go of the layer input (the embedding output
            // stays bound to `inputs_embeds` until the forward returns).
            if stream_unsaved(cx) && l > 0 {
                cx.free(saved.x_in);
            }
            layers.push(Some(saved));
        }
        x = x_out;
    }
    cx.sim.layer(None);
    let (hf, rmsf) = ops::rms_norm_fwd(cx);
    if stream_unsaved(cx) && !checkpointing {
        cx.free(x);
        cx.free(x0);
    }
    cx.sim.next_stage("loss");
    let v = cx.m.vocab_size;
    let nv = cx.n * v;
    let (logits, lm_head) = ops::linear_fwd(cx, cx.r, c, v, false, Logits);
    let upcast = (cx.p != 4).then(|| cx.alloc(nv * 4, Logits, "_to_copy"));
    let pad = cx.alloc(cx.b * (cx.t + 1) * 8, Temporary, "constant_pad_nd");
    let labels = cx.alloc(cx.n * 8, Activations, "clone");
    let log_softmax = cx.alloc(nv * 4, Logits, "_log_softmax");
    if let Some(u) = upcast {
        cx.free(u);
    }
    cx.free(pad);
    let hf = ops::keep_if_saved(cx, hf, &lm_head);
    cx.free(logits);
    Forward {
        layers,
        ckpt_inputs,
        input_ids,
        cos_sin: [cos, sin],
        x_last: x,
        rmsf,
        hf,
        lm_head,
        log_softmax,
        labels,
    }
}

pub fn backward(cx: &mut Ctx, f: Forward) {
    let nv = cx.n * cx.m.vocab_size;
    let g_nll = cx.alloc(nv * 4, Logits, "nll_loss_backward");
    cx.free(f.labels);
    let g_ls = cx.alloc(nv * 4, Logits, "_log_softmax_backward_data");
    cx.free(g_nll);
    cx.free(f.log_softmax);
    let g_logits = if cx.p != 4 {
        let g = cx.alloc(nv * cx.p, Logits, "_to_copy");
        cx.free(g_ls);
        g
    } else {
        g_ls
    };
    let had_grads = cx.have_grads;
    let g_hf = ops::linear_bwd(cx, g_logits, cx.p, true, f.lm_head, f.hf);
    let head_grad = if had_grads || !cx.m.tie_embeddings {
        None
    } else {
        cx.grads.pop()
    };
    let mut g = ops::rms_norm_bwd(cx, g_hf, f.rmsf, f.x_last);
    cx.sim.next_stage("backward");
    let mut inputs = f.ckpt_inputs.into_iter().rev();
    for (l, saved) in f.layers.into_iter().enumerate().rev() {
        cx.sim.layer(Some(l as u32));
        let s = match saved {
            Some(s) => s,
            None => {
                let x_in = inputs.next().expect("one input per checkpointed layer");
                let (s, x_out) = layer_fwd(cx, x_in);
                cx.free(x_out);
                cx.clear_autocast_cache();
                s
            }
        };
        g = layer_bwd(cx, g, s);
    }
    cx.sim.layer(None);
    cx.sim.free_all(&f.cos_sin);
    let dense = ops::embedding_bwd(cx, cx.n, cx.m.vocab_size);
    cx.free(g);
    cx.free(f.input_ids);
    match head_grad {
        // Tied head: under autocast the engine's input buffer adds the embedding's gradient into the head's in
        // place; without autocast out of place (see gpt2.rs).
        Some(head) if cx.prec.autocast() => {
            cx.free(dense);
            cx.grads.push(head);
        }
        Some(head) => {
            let summed = cx.alloc(cx.m.vocab_size * cx.m.n_embd * cx.pb, Grads, "add");
            cx.free(head);
            cx.free(dense);
            cx.grads.push(summed);
        }
        None if cx.have_grads => cx.free(dense),
        None => cx.grads.push(dense),
    }
}
