//! What a decoder is made of, as data: the description the executors walk (`eager`, and `compiled` under
//! `torch.compile`). A family is a description, not code: nanoGPT's GPT and Hugging Face's Llama differ here in
//! a handful of fields, and each field's effect on memory lives in one place of the executor.
//!
//! Every field names a choice the model's source code makes (nanoGPT's `model.py`, transformers'
//! `modeling_llama.py`) or the training program makes around it (nanoGPT's `train.py`, a plain Hugging Face loop).

use crate::model::{Family, ModelConfig};
use crate::policy::Attention;

/// Where token positions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// A learned `block_size x C` embedding added to the token embedding (`wpe`), then dropout (nanoGPT).
    Learned,
    /// Rotary embeddings applied to q and k in every layer; cos and sin computed once per forward in fp32 and
    /// cast to the stream's dtype (HF `LlamaRotaryEmbedding`).
    Rotary,
}

/// The normalisation layers (every norm of the model is of this kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// `F.layer_norm` (`native_layer_norm`, one fused op), with or without a bias. Saves its input.
    LayerNorm { bias: bool },
    /// HF `LlamaRMSNorm` in PyTorch ops: fp32 `pow`, `mean`, `rsqrt`, `x * rsqrt`, `weight * normed.to(dtype)`.
    /// Saves its fp32 view of the input, so a 2-byte residual stream itself is saved by nothing.
    RmsNorm,
    /// HF `GemmaRMSNorm`: the same statistics on `x.float()`, then `normed * (1 + weight.float())` in fp32 and
    /// `.type_as(x)`: it saves the fp32 normalised x (where Llama's saves its cast back).
    GemmaRmsNorm,
    /// HF `Olmo2RMSNorm`: Llama's statistics, then `(weight * normed).to(input dtype)` (the fp32 normalised x
    /// saved).
    Olmo2RmsNorm,
}

/// How the attention's inputs are projected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qkv {
    /// One `C -> 3C` Linear whose output is split into q, k, v views (nanoGPT's `c_attn`).
    Fused,
    /// Separate q, k and v Linears (`q_proj`, `k_proj`, `v_proj`), k and v of `kv_dim` (grouped-query).
    Separate,
    /// One Linear to q, k and v one after the other (`q_dim + 2 kv_dim` features, Phi-3's `qkv_proj`), sliced into
    /// q, k and v views: the output stays whole while SDPA holds the v view, and the backward places the three
    /// gradients into its width with `slice_backward`, summing as it goes.
    PackedSlices,
    /// One Linear to `[q_h, k_h, v_h]` per head (GPT-NeoX's `query_key_value`), viewed as heads and chunked: the
    /// output stays whole as above, and the backward concatenates the three gradients per head (`cat`) and copies
    /// them back to token-major order (`clone`).
    PackedHeads,
}

/// How rotary embeddings are applied to q and k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryCat {
    /// `q * cos + rotate_half(q) * sin` on the whole head (Llama): the result keeps q's token-major layout.
    Whole,
    /// On the first `rotary_dims` of each head, then `cat([rotated, rest], -1)` (Phi-3: q's concatenation
    /// before k's rotation): the concatenation makes a new full-width q and k in the rotary dtype, head-major, so
    /// SDPA's output is head-major too and `transpose(1, 2).contiguous()` copies it.
    Each,
    /// As `Each`, with q and k both rotated before either is concatenated (GPT-NeoX's `apply_rotary_pos_emb`).
    Both,
}

/// Where each layer creates its norms' parameters, relative to its attention and MLP (the order of the
/// parameters on the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormParams {
    /// nanoGPT's Block: ln_1, attn, ln_2, mlp.
    Interleaved,
    /// Hugging Face's decoder layers: attn, mlp, then the norms.
    After,
    /// GPT-NeoX's layer: both norms, then attention and MLP.
    Before,
}

/// The attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Core {
    /// `F.scaled_dot_product_attention(is_causal=True)`: a fused kernel chosen by PyTorch (`policy::sdpa_backend`).
    Sdpa,
    /// The attention written out in PyTorch ops: nanoGPT's non-flash path (`q @ k^T`, scale, causal
    /// `masked_fill`, softmax, dropout, `@ v`), or Hugging Face's `attn_implementation="eager"` (`q @ k^T`,
    /// scale, `+ causal_mask`, fp32 softmax, `@ v`).
    Manual,
}

/// The MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    /// `proj(gelu(fc(x)))` of width `intermediate_size`, then dropout (nanoGPT's `MLP`).
    Gelu,
    /// `down(silu(gate(x)) * up(x))` of width `intermediate_size` (HF `LlamaMLP`, SwiGLU).
    SwiGlu,
    /// `down(gelu_tanh(gate(x)) * up(x))` (HF `GemmaMLP`, GeGLU): SwiGLU's tensors, GELU's op.
    GeGlu,
    /// A mixture of SwiGLU experts (`n_experts`, `experts_per_token` in `ModelConfig`) as transformers 5 runs it
    /// by default (`grouped_mm`): a router Linear, fp32 softmax and top-k, the token-expert pairs sorted by expert
    /// and gathered, two grouped GEMMs in the expert weights' dtype, the weighted outputs scattered back and summed
    /// (tests/data/hf/README.md, "What the eager MoE block allocates"). Routing is assumed balanced; with
    /// `grouped_mm` no allocation depends on it (measured: imbalanced routing moves no byte).
    Moe(Moe),
}

/// What a mixture-of-experts block does beyond the routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moe {
    /// The routing weights stay the fp32 top-k values (Mixtral), rather than a cast back to the router's dtype
    /// (Qwen2-MoE, OLMoE): under pure bf16 the weighted expert outputs are then fp32.
    pub scores_fp32: bool,
    /// The top-k values are renormalised (`sum`, and autograd's `clone` before the in-place `div_`).
    pub renorm: bool,
    /// Qwen2-MoE's shared expert (a SwiGLU MLP of `shared_expert_size`) and its sigmoid gate (a C -> 1 Linear).
    pub shared_expert: bool,
    /// The router's auxiliary (load-balancing) loss is added to the loss (`output_router_logits`): each layer's
    /// router logits live to the end of the loss, which takes their softmax again.
    pub aux_loss: bool,
}

/// The loss as the model's forward computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// nanoGPT: `F.cross_entropy(logits.view(-1, V), targets.view(-1))` on the logits as they are.
    CrossEntropy,
    /// HF `ForCausalLMLoss`: `logits.float()`, labels padded and shifted (`clone`), `cross_entropy` in fp32.
    HfCausalLm,
}

/// The training program around the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// nanoGPT's `train.py`: the next batch is fetched while the step's graph is alive, `logits` stays bound
    /// until the next forward returns, AdamW has a decay group (matrices) and a no-decay group.
    NanoGpt,
    /// A plain Hugging Face loop: `model(input_ids, labels=labels).loss.backward()`, the batch fetched inside the
    /// loop, one optimizer group.
    HfLoop,
}

/// A decoder, as the executors need it. The dimensions stay in `ModelConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    pub positions: Positions,
    pub norm: Norm,
    pub qkv: Qkv,
    pub core: Core,
    /// The SDPA-shaped core runs the flash-attn package's `FlashAttnFunc` (HF's `flash_attention_2`) instead of
    /// `F.scaled_dot_product_attention`: its own outputs, saved tensors and backward scratch
    /// (`tensors::flash_attn_fwd`, `flash_attn_bwd`), the sliding window inside the kernel (no mask).
    pub flash_attn: bool,
    /// An RMSNorm over each head of q and of k, before rotary (Qwen3's `q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// The token embeddings are multiplied by sqrt(hidden_size) (Gemma's normalizer): a second N x C tensor.
    pub embed_scale: bool,
    /// A norm on each branch's output before the residual add, besides the one before the branch (Gemma 2's
    /// `post_attention_layernorm` and `post_feedforward_layernorm`).
    pub post_norms: bool,
    /// Eager attention soft-caps its scores (`tanh(scores / cap) * cap`, Gemma 2's `attn_logit_softcapping`).
    pub attn_softcap: bool,
    /// The logits are soft-capped the same way before the loss (`final_logit_softcapping`).
    pub logit_softcap: bool,
    /// The model builds a sliding-window mask beside the causal one every forward (Gemma 2's alternating layers);
    /// for eager attention its layers cost what full layers cost.
    pub sliding_mask: bool,
    /// Every `n`th layer attends globally, the others through the sliding window (Gemma 3: 6); 0: every layer
    /// through the window, if the model has one.
    pub global_every: u64,
    /// A second rotary table for the sliding layers (Gemma 3's local base frequency).
    pub dual_rope: bool,
    /// A norm before each branch (every family but OLMo 2, whose branches read the residual stream itself).
    pub pre_norms: bool,
    /// The q and k norms span the whole projection (OLMo 2) rather than each head (Qwen 3, Gemma 3).
    pub qk_norm_full: bool,
    /// Rotary runs in fp32 whatever the dtype and casts q and k back to theirs (OLMo 2's
    /// `apply_rotary_pos_emb`: `q_embed.to(q_type)`), so SDPA gets them in their own dtype.
    pub rope_fp32: bool,
    /// Biases in the q, k and v projections (nanoGPT's fused `c_attn` with `bias`; Qwen2's q/k/v_proj).
    pub qkv_bias: bool,
    /// A bias in the attention's output projection.
    pub linear_bias: bool,
    /// Biases in the MLP's Linears.
    pub mlp_bias: bool,
    pub mlp: Mlp,
    /// SwiGLU's gate and up projections are one Linear (`gate_up_proj`, 2 x `intermediate_size`) whose output is
    /// chunked: it stays whole while either half is saved, and its gradient is their `cat` (Phi-3).
    pub packed_gate_up: bool,
    pub rotary_cat: RotaryCat,
    /// Both branches read the layer's input and are added to it together (GPT-NeoX's parallel residual):
    /// `x + (mlp(norm_2(x)) + attn(norm_1(x)))`.
    pub parallel_residual: bool,
    pub norm_params: NormParams,
    /// The attention creates its output projection before its input projection (Phi-3's `o_proj`, then
    /// `qkv_proj`).
    pub o_first: bool,
    /// Dropout after the embeddings, on the attention probabilities (manual core) and on both residual branches
    /// (nanoGPT's `nn.Dropout` modules, active when dropout > 0).
    pub dropout: bool,
    /// The LM head shares the token embedding's weight.
    pub tied_head: bool,
    pub loss: Loss,
    pub program: Program,
}

impl Arch {
    /// The description of a model as its config gives it, with the attention kind the training asks for.
    pub fn of(m: &ModelConfig, attention: Attention) -> Arch {
        match m.family {
            Family::Gpt2 => Arch {
                positions: Positions::Learned,
                norm: Norm::LayerNorm { bias: m.bias },
                qkv: Qkv::Fused,
                core: match attention {
                    Attention::Sdpa | Attention::FlashAttention2 => Core::Sdpa,
                    Attention::Manual => Core::Manual,
                },
                flash_attn: attention == Attention::FlashAttention2,
                qk_norm: false,
                embed_scale: false,
                post_norms: false,
                attn_softcap: false,
                logit_softcap: false,
                sliding_mask: false,
                global_every: 0,
                dual_rope: false,
                pre_norms: true,
                qk_norm_full: false,
                rope_fp32: false,
                qkv_bias: m.bias,
                linear_bias: m.bias,
                mlp_bias: m.bias,
                mlp: Mlp::Gelu,
                packed_gate_up: false,
                rotary_cat: RotaryCat::Whole,
                parallel_residual: false,
                norm_params: NormParams::Interleaved,
                o_first: false,
                dropout: m.dropout > 0.0,
                tied_head: true,
                loss: Loss::CrossEntropy,
                program: Program::NanoGpt,
            },
            // Mistral's layers are Llama's; its sliding window changes nothing while the sequence is shorter
            // than the window (`Setup::validate` refuses longer ones). Qwen2 adds q/k/v biases (`Qwen2Attention`:
            // `bias=True` on q_proj, k_proj, v_proj, not on o_proj); Qwen3 an RMSNorm on every head of q and k
            // (`Qwen3Attention.q_norm`, `k_norm`, over head_dim) and no biases.
            // Gemma: scaled embeddings, its own RMSNorm, GeGLU (`GemmaForCausalLM`); Gemma 2 adds a norm after
            // each branch, soft-capped attention scores and logits, and a sliding-window mask.
            Family::Llama
            | Family::Mistral
            | Family::Qwen2
            | Family::Qwen3
            | Family::Gemma
            | Family::Gemma2
            | Family::Gemma3
            | Family::Olmo2
            | Family::Mixtral
            | Family::Qwen2Moe
            | Family::Olmoe => {
                let gemma = matches!(m.family, Family::Gemma | Family::Gemma2 | Family::Gemma3);
                let gemma2 = m.family == Family::Gemma2;
                let gemma3 = m.family == Family::Gemma3;
                let olmo2 = m.family == Family::Olmo2;
                // OLMoE: Llama's layers (pre-norms, Llama's rotary) with OLMo 2's whole-projection q/k norms.
                let olmoe = m.family == Family::Olmoe;
                Arch {
                    positions: Positions::Rotary,
                    norm: if gemma {
                        Norm::GemmaRmsNorm
                    } else if olmo2 {
                        Norm::Olmo2RmsNorm
                    } else {
                        Norm::RmsNorm
                    },
                    qkv: Qkv::Separate,
                    // `attention: manual` is transformers' `attn_implementation="eager"` for these.
                    core: match attention {
                        Attention::Sdpa | Attention::FlashAttention2 => Core::Sdpa,
                        Attention::Manual => Core::Manual,
                    },
                    flash_attn: attention == Attention::FlashAttention2,
                    qk_norm: m.family == Family::Qwen3 || gemma3 || olmo2 || olmoe,
                    embed_scale: gemma,
                    post_norms: gemma2 || gemma3 || olmo2,
                    attn_softcap: gemma2,
                    logit_softcap: gemma2,
                    sliding_mask: gemma2,
                    global_every: if gemma3 { 6 } else { 0 },
                    dual_rope: gemma3,
                    pre_norms: !olmo2,
                    qk_norm_full: olmo2 || olmoe,
                    rope_fp32: olmo2,
                    qkv_bias: matches!(m.family, Family::Qwen2 | Family::Qwen2Moe),
                    linear_bias: false,
                    mlp_bias: false,
                    mlp: if m.family.is_moe() {
                        Mlp::Moe(Moe {
                            scores_fp32: m.family == Family::Mixtral,
                            renorm: m.family == Family::Mixtral || m.norm_topk_prob,
                            shared_expert: m.shared_expert_size > 0,
                            aux_loss: m.router_aux_loss,
                        })
                    } else if gemma {
                        Mlp::GeGlu
                    } else {
                        Mlp::SwiGlu
                    },
                    packed_gate_up: false,
                    rotary_cat: RotaryCat::Whole,
                    parallel_residual: false,
                    norm_params: NormParams::After,
                    o_first: false,
                    dropout: false,
                    tied_head: m.tie_embeddings,
                    loss: Loss::HfCausalLm,
                    program: Program::HfLoop,
                }
            }
            // Phi-3: Llama's layers with the packed projections and rotary through the partial-rotary
            // concatenation (`modeling_phi3.py`), no biases.
            Family::Phi3 => Arch {
                qkv: Qkv::PackedSlices,
                packed_gate_up: true,
                rotary_cat: RotaryCat::Each,
                o_first: true,
                ..Arch::of(
                    &ModelConfig {
                        family: Family::Llama,
                        ..m.clone()
                    },
                    attention,
                )
            },
            // GPT-NeoX (`modeling_gpt_neox.py`): LayerNorms with biases, `query_key_value` and `dense` with
            // biases when `attention_bias` (`model.bias`), a GELU MLP whose Linears always have biases.
            Family::GptNeox => Arch {
                norm: Norm::LayerNorm { bias: true },
                qkv: Qkv::PackedHeads,
                qkv_bias: m.bias,
                linear_bias: m.bias,
                mlp_bias: true,
                mlp: Mlp::Gelu,
                rotary_cat: RotaryCat::Both,
                parallel_residual: m.parallel_residual,
                norm_params: NormParams::Before,
                ..Arch::of(
                    &ModelConfig {
                        family: Family::Llama,
                        ..m.clone()
                    },
                    attention,
                )
            },
        }
    }

    /// Whether layer `l` attends through the sliding window (all but every `global_every`th).
    pub fn layer_slides(&self, l: u64) -> bool {
        self.global_every == 0 || !(l + 1).is_multiple_of(self.global_every)
    }

    /// Whether the norms save their input. RMSNorm saves its fp32 view instead, which for a 2-byte stream
    /// (`residual_bytes` = 2) is a copy: the stream itself then dies when the forward lets go of it.
    pub fn norm_saves_input(&self, residual_bytes: u64) -> bool {
        match self.norm {
            Norm::LayerNorm { .. } => true,
            Norm::RmsNorm | Norm::GemmaRmsNorm | Norm::Olmo2RmsNorm => residual_bytes != 2,
        }
    }

    /// Parameter tensors in the order the model's constructor creates them (a tied head counted once), as
    /// (elements, is_matrix).
    pub fn param_tensors(&self, m: &ModelConfig) -> Vec<(u64, bool)> {
        self.param_shapes(m)
            .into_iter()
            .map(|(elems, matrix, _)| (elems, matrix))
            .collect()
    }

    /// `param_tensors` with each parameter's first dimension (its rows: what FSDP2 shards, `Shard(0)`), as
    /// (elements, is a matrix, rows).
    pub fn param_shapes(&self, m: &ModelConfig) -> Vec<(u64, bool, u64)> {
        self.param_list(m)
            .into_iter()
            .map(|(elems, matrix, rows, _)| (elems, matrix, rows))
            .collect()
    }

    /// For each parameter of `param_shapes`, whether it is the weight of an `nn.Linear` (what transformers'
    /// bitsandbytes loading replaces: `replace_with_bnb_linear` takes `type(module) is nn.Linear` only). A
    /// mixture of experts' router (`MixtralTopKRouter` and its kin hold a bare weight) and its fused experts
    /// (`gate_up_proj` [E, 2I, C], `down_proj` [E, C, I]: parameters of the experts module) are not: a 4-bit or
    /// 8-bit base leaves them in the loaded dtype, and `prepare_model_for_kbit_training` then casts them to fp32
    /// (tests/data/finetune/README.md, mixtures of experts).
    pub fn linear_weights(&self, m: &ModelConfig) -> Vec<bool> {
        self.param_list(m)
            .into_iter()
            .map(|(_, _, _, linear)| linear)
            .collect()
    }

    /// The parameters as (elements, is a matrix, rows, is an `nn.Linear` weight), in the constructor's order.
    fn param_list(&self, m: &ModelConfig) -> Vec<(u64, bool, u64, bool)> {
        let c = m.n_embd;
        let (q, kv) = (m.q_dim(), m.kv_dim());
        let i = m.intermediate_size;
        let (qkv_bias, bias, mlp_bias) = (self.qkv_bias, self.linear_bias, self.mlp_bias);
        let norm_bias = matches!(self.norm, Norm::LayerNorm { bias: true });
        let norm = |v: &mut Vec<(u64, bool, u64, bool)>| {
            v.extend(std::iter::repeat_n(
                (c, false, c, false),
                1 + usize::from(norm_bias),
            ));
        };
        // Linear: out x in weight (+ out bias).
        let linear = |v: &mut Vec<(u64, bool, u64, bool)>, out_f: u64, in_f: u64, bias: bool| {
            v.push((out_f * in_f, true, out_f, true));
            if bias {
                v.push((out_f, false, out_f, false));
            }
        };
        let mut v = vec![(m.vocab_size * c, true, m.vocab_size, false)];
        if self.positions == Positions::Learned {
            v.push((m.block_size * c, true, m.block_size, false));
        }
        // HF's decoder layers: input_layernorm, post_attention_layernorm (and Gemma 2's pre_ and
        // post_feedforward_layernorm; OLMo 2 has the two post-norms only).
        let n_norms = 2 * (u64::from(self.pre_norms) + u64::from(self.post_norms)).max(1);
        for _ in 0..m.n_layer {
            let interleaved = self.norm_params == NormParams::Interleaved;
            if interleaved {
                norm(&mut v);
            }
            if self.norm_params == NormParams::Before {
                for _ in 0..n_norms {
                    norm(&mut v);
                }
            }
            if self.o_first {
                linear(&mut v, c, q, bias);
            }
            match self.qkv {
                Qkv::Fused => linear(&mut v, 3 * c, c, qkv_bias),
                Qkv::PackedSlices | Qkv::PackedHeads => linear(&mut v, q + 2 * kv, c, qkv_bias),
                Qkv::Separate => {
                    linear(&mut v, q, c, qkv_bias);
                    linear(&mut v, kv, c, qkv_bias);
                    linear(&mut v, kv, c, qkv_bias);
                }
            }
            if !self.o_first {
                linear(&mut v, c, q, bias);
            }
            if self.qk_norm {
                let (qn, kn) = if self.qk_norm_full {
                    (q, kv)
                } else {
                    (m.head_dim(), m.head_dim())
                };
                v.extend([(qn, false, qn, false), (kn, false, kn, false)]);
            }
            if interleaved {
                norm(&mut v);
            }
            match self.mlp {
                Mlp::Gelu => {
                    linear(&mut v, i, c, mlp_bias);
                    linear(&mut v, c, i, mlp_bias);
                }
                Mlp::Moe(moe) => {
                    // The router (`gate`, experts x C), then the experts' `gate_up_proj` [E, 2I, C] and
                    // `down_proj` [E, C, I] (init trace of mixtral-256-e4top2-bf16amp); Qwen2-MoE's shared expert
                    // (gate, up, down) and its C -> 1 gate.
                    let e = m.n_experts;
                    v.push((e * c, true, e, false));
                    v.push((e * 2 * i * c, true, e, false));
                    v.push((e * c * i, true, e, false));
                    if moe.shared_expert {
                        let s = m.shared_expert_size;
                        linear(&mut v, s, c, false);
                        linear(&mut v, s, c, false);
                        linear(&mut v, c, s, false);
                        linear(&mut v, 1, c, false);
                    }
                }
                Mlp::SwiGlu | Mlp::GeGlu if self.packed_gate_up => {
                    linear(&mut v, 2 * i, c, mlp_bias);
                    linear(&mut v, c, i, mlp_bias);
                }
                Mlp::SwiGlu | Mlp::GeGlu => {
                    linear(&mut v, i, c, mlp_bias);
                    linear(&mut v, i, c, mlp_bias);
                    linear(&mut v, c, i, mlp_bias);
                }
            }
            if self.norm_params == NormParams::After {
                for _ in 0..n_norms {
                    norm(&mut v);
                }
            }
        }
        norm(&mut v);
        if !self.tied_head {
            v.push((m.vocab_size * c, true, m.vocab_size, false));
        }
        v
    }

    /// Buffers registered on the device besides the parameters, in bytes at `param_bytes` per element: the
    /// manual path's causal mask of nanoGPT, `torch.tril(torch.ones(block, block))` per layer in the model's dtype
    /// (registered only when flash attention is not used).
    pub fn buffers_bytes(&self, m: &ModelConfig, param_bytes: u64) -> Vec<u64> {
        match (self.qkv, self.core) {
            (Qkv::Fused, Core::Manual) => {
                vec![m.block_size * m.block_size * param_bytes; m.n_layer as usize]
            }
            // Hugging Face models build their mask in each forward (`masking_utils`), no buffer.
            _ => vec![],
        }
    }
}
