//! What is being trained and how: the setup a person describes, its validation and its parameter count.

use crate::error::Error;
use crate::policy::{Attention, Optimizer, Precision};

/// Decoder-only architectures vramfit models op by op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// nanoGPT's GPT: learned positions, tied LM head, pre-LN LayerNorm blocks, fused QKV, GELU MLP (4x).
    Gpt2,
    /// Hugging Face `LlamaForCausalLM`: RMSNorm, rotary, grouped-query attention, SwiGLU MLP.
    Llama,
}

impl Family {
    pub const NAMES: &'static [&'static str] = &["gpt2", "llama"];

    pub fn parse(s: &str) -> Result<Family, Error> {
        match s {
            "gpt2" => Ok(Family::Gpt2),
            "llama" => Ok(Family::Llama),
            _ => Err(Error::UnknownValue {
                field: "model.family".into(),
                value: s.into(),
                allowed: Self::NAMES,
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
        }
    }
}

/// The model's dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub n_layer: u64,
    pub n_head: u64,
    /// Key/value heads (llama); equal to `n_head` for gpt2.
    pub n_kv_head: u64,
    pub n_embd: u64,
    pub block_size: u64,
    pub vocab_size: u64,
    /// Biases in Linear and LayerNorm (gpt2).
    pub bias: bool,
    pub dropout: f64,
    /// MLP hidden width: 4 x n_embd for gpt2, `intermediate_size` for llama.
    pub intermediate_size: u64,
    /// LM head shares the token embedding (always for gpt2).
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// nanoGPT's GPT: what its architecture fixes (one KV head per head, MLP 4 x n_embd, tied LM head) around
    /// the dims a config chooses.
    pub fn nanogpt(
        n_layer: u64,
        n_head: u64,
        n_embd: u64,
        block_size: u64,
        vocab_size: u64,
        bias: bool,
        dropout: f64,
    ) -> ModelConfig {
        ModelConfig {
            family: Family::Gpt2,
            n_layer,
            n_head,
            n_kv_head: n_head,
            n_embd,
            block_size,
            vocab_size,
            bias,
            dropout,
            // Saturating: a config's n_embd is unchecked here; validation rejects what would not fit.
            intermediate_size: n_embd.saturating_mul(4),
            tie_embeddings: true,
        }
    }

    pub fn head_dim(&self) -> u64 {
        self.n_embd / self.n_head
    }

    pub fn kv_dim(&self) -> u64 {
        self.head_dim() * self.n_kv_head
    }

    /// Parameters in one transformer block.
    pub fn block_params(&self) -> u64 {
        let c = self.n_embd;
        match self.family {
            Family::Gpt2 => {
                let b = u64::from(self.bias);
                // ln_1, ln_2: weight (+ bias); c_attn 3C x C (+3C); attn c_proj C x C (+C);
                // c_fc 4C x C (+4C); mlp c_proj C x 4C (+C).
                2 * (c + b * c)
                    + (3 * c * c + b * 3 * c)
                    + (c * c + b * c)
                    + (4 * c * c + b * 4 * c)
                    + (4 * c * c + b * c)
            }
            Family::Llama => {
                let kv = self.kv_dim();
                let i = self.intermediate_size;
                // input/post-attention RMSNorm weights; q, k, v, o projections; gate, up, down (no biases).
                2 * c + c * c + 2 * kv * c + c * c + 3 * i * c
            }
        }
    }

    /// Every parameter, each counted once (a tied LM head is the embedding).
    pub fn n_params(&self) -> u64 {
        let c = self.n_embd;
        let embeddings = match self.family {
            Family::Gpt2 => self.vocab_size * c + self.block_size * c,
            Family::Llama => self.vocab_size * c,
        };
        let final_norm = match self.family {
            Family::Gpt2 => c + u64::from(self.bias) * c,
            Family::Llama => c,
        };
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * c
        };
        embeddings + self.n_layer * self.block_params() + final_norm + head
    }
}

/// How it is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub batch_size: u64,
    pub seq_len: u64,
    pub precision: Precision,
    pub optimizer: Optimizer,
    pub attention: Attention,
    pub checkpointing: bool,
    pub grad_accum_steps: u64,
    /// 0 turns clipping off, as in nanoGPT's train.py.
    pub grad_clip: f64,
    /// `optimizer.zero_grad(set_to_none=True)` (PyTorch's default) frees `.grad` after each step; false keeps it
    /// allocated and zeroes it in place, so the next backward accumulates into it.
    pub zero_grad_set_to_none: bool,
    /// `torch.compile(model)` (Inductor): the step as the compiled graphs allocate it.
    pub compile: bool,
}

/// Defaults for training fields a setup leaves out: nanoGPT train.py's on a bf16-capable GPU, except gradient
/// accumulation, which defaults to 1 rather than train.py's 40.
pub const DEFAULT_BATCH_SIZE: u64 = 12;
pub const DEFAULT_PRECISION: Precision = Precision::Bf16Amp;
pub const DEFAULT_OPTIMIZER: Optimizer = Optimizer::AdamWFused;
pub const DEFAULT_GRAD_CLIP: f64 = 1.0;

impl TrainConfig {
    /// Training at `seq_len` tokens with the defaults above, SDPA, no checkpointing, no accumulation.
    pub fn defaults(batch_size: u64, seq_len: u64) -> TrainConfig {
        TrainConfig {
            batch_size,
            seq_len,
            precision: DEFAULT_PRECISION,
            optimizer: DEFAULT_OPTIMIZER,
            attention: Attention::Sdpa,
            checkpointing: false,
            grad_accum_steps: 1,
            grad_clip: DEFAULT_GRAD_CLIP,
            zero_grad_set_to_none: true,
            compile: false,
        }
    }
}

/// The GPU the step runs on, as far as it changes what PyTorch allocates.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    /// Compute capability major x 10 + minor (sm_90 -> 90).
    pub sm: u32,
    /// Memory of the device, for "does it fit"; 0 when not given.
    pub memory_bytes: u64,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        // The reference data was produced for an sm_90 (H100-class) device.
        DeviceConfig {
            sm: 90,
            memory_bytes: 80 * (1 << 30),
        }
    }
}

/// Everything `estimate` needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub device: DeviceConfig,
}

/// The estimate simulates every block; no trained decoder has more than a few hundred.
pub const MAX_LAYERS: u64 = 1000;

/// Any byte count must stay far below this, so that every sum the simulation makes fits in a u64.
pub const MAX_BYTES: u64 = 1 << 56;

impl Setup {
    /// Checks every field and every relation between fields; the message names the field and the value.
    ///
    /// # Errors
    /// An [`Error`] naming the first problem found.
    pub fn validate(&self) -> Result<(), Error> {
        let m = &self.model;
        let t = &self.train;
        for (field, value) in [
            ("model.n_layer", m.n_layer),
            ("model.n_head", m.n_head),
            ("model.n_embd", m.n_embd),
            ("model.block_size", m.block_size),
            ("model.vocab_size", m.vocab_size),
            ("train.batch_size", t.batch_size),
            ("train.seq_len", t.seq_len),
            ("train.grad_accum_steps", t.grad_accum_steps),
        ] {
            if value == 0 {
                return Err(Error::invalid(field, value, "must be at least 1"));
            }
        }
        if m.n_layer > MAX_LAYERS {
            return Err(Error::invalid(
                "model.n_layer",
                m.n_layer,
                format!("must be at most {MAX_LAYERS}"),
            ));
        }
        if m.family == Family::Llama && t.attention == Attention::Manual {
            return Err(Error::NotModelled {
                what: "train.attention (\"manual\") is nanoGPT's path; llama trains with SDPA"
                    .to_string(),
            });
        }
        if m.family == Family::Llama {
            if m.n_kv_head == 0 {
                return Err(Error::invalid(
                    "model.n_kv_head",
                    m.n_kv_head,
                    "must be at least 1",
                ));
            }
            if m.intermediate_size == 0 {
                return Err(Error::invalid(
                    "model.intermediate_size",
                    m.intermediate_size,
                    "must be at least 1",
                ));
            }
        }
        if !m.n_embd.is_multiple_of(m.n_head) {
            return Err(Error::invalid(
                "model.n_embd",
                m.n_embd,
                format!("must be divisible by model.n_head ({})", m.n_head),
            ));
        }
        if !m.n_head.is_multiple_of(m.n_kv_head) {
            return Err(Error::invalid(
                "model.n_head",
                m.n_head,
                format!("must be divisible by model.n_kv_head ({})", m.n_kv_head),
            ));
        }
        if m.family == Family::Llama && !m.head_dim().is_multiple_of(2) {
            return Err(Error::invalid(
                "model.n_embd",
                m.n_embd,
                format!(
                    "/ n_head gives an odd head size ({}); rotary embeddings need an even one",
                    m.head_dim()
                ),
            ));
        }
        if t.seq_len > m.block_size {
            return Err(Error::invalid(
                "train.seq_len",
                t.seq_len,
                format!("is longer than model.block_size ({})", m.block_size),
            ));
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return Err(Error::invalid(
                "model.dropout",
                m.dropout,
                "must be in [0, 1)",
            ));
        }
        if m.family == Family::Llama && m.dropout != 0.0 {
            return Err(Error::NotModelled {
                what: format!(
                    "model.dropout ({}) for llama: HF Llama is measured with attention_dropout 0",
                    m.dropout
                ),
            });
        }
        if t.compile && t.checkpointing {
            return Err(Error::NotModelled {
                what: "train.compile (true) with train.checkpointing (true): Inductor's recompute under \
                       activation checkpointing is not measured"
                    .to_string(),
            });
        }
        if !t.grad_clip.is_finite() || t.grad_clip < 0.0 {
            return Err(Error::invalid(
                "train.grad_clip",
                t.grad_clip,
                "must be 0 (off) or a positive number",
            ));
        }
        self.check_size()
    }

    /// Rejects setups whose byte counts would not fit: every product below is taken with checked arithmetic,
    /// and every tensor the simulation sizes is a product of these factors, so once they pass, its plain
    /// arithmetic cannot wrap.
    fn check_size(&self) -> Result<(), Error> {
        let m = &self.model;
        let t = &self.train;
        let too_large = |what: &str| Error::TooLarge {
            what: what.to_string(),
        };
        let params =
            checked_params(m).ok_or_else(|| too_large("the parameter count overflows 64 bits"))?;
        // Weights, grads, two AdamW states, temporaries: at most 8 copies of 4 bytes.
        let param_bytes = params
            .checked_mul(32)
            .ok_or_else(|| too_large("parameter bytes overflow 64 bits"))?;
        let tokens = t
            .batch_size
            .checked_mul(t.seq_len)
            .ok_or_else(|| too_large("batch_size x seq_len"))?;
        let mlp = m
            .n_embd
            .checked_mul(4)
            .ok_or_else(|| too_large("4 x n_embd"))?;
        let scores = m
            .n_head
            .checked_mul(t.seq_len)
            .ok_or_else(|| too_large("n_head x seq_len"))?;
        let width = [mlp, m.intermediate_size, m.vocab_size]
            .into_iter()
            .max()
            .unwrap_or(0)
            .checked_add(scores)
            .and_then(|w| w.checked_add(128))
            .ok_or_else(|| too_large("layer width"))?;
        // Per token per layer: at most ~64 values of the widest size, 4 bytes each (a generous bound).
        let act_bytes = tokens
            .checked_mul(width)
            .and_then(|x| x.checked_mul(256))
            .and_then(|x| x.checked_mul(m.n_layer.max(1) + 8))
            .ok_or_else(|| too_large("activation bytes overflow 64 bits"))?;
        // nanoGPT's manual path registers a block_size x block_size mask per layer.
        let mask_bytes = if m.family == Family::Gpt2 && t.attention == Attention::Manual {
            m.block_size
                .checked_mul(m.block_size)
                .and_then(|x| x.checked_mul(4))
                .and_then(|x| x.checked_mul(m.n_layer))
                .ok_or_else(|| too_large("the attention mask buffers overflow 64 bits"))?
        } else {
            0
        };
        let total = param_bytes
            .checked_add(act_bytes)
            .and_then(|x| x.checked_add(mask_bytes))
            .ok_or_else(|| too_large("total bytes overflow 64 bits"))?;
        if total > MAX_BYTES {
            return Err(too_large(&format!(
                "the step needs on the order of {total} bytes, beyond any device"
            )));
        }
        Ok(())
    }
}

fn checked_params(m: &ModelConfig) -> Option<u64> {
    let c = m.n_embd;
    let cc = c.checked_mul(c)?;
    let block = match m.family {
        Family::Gpt2 => cc.checked_mul(12)?.checked_add(c.checked_mul(13)?)?,
        Family::Llama => cc
            .checked_mul(2)?
            .checked_add(m.kv_dim().checked_mul(c)?.checked_mul(2)?)?
            .checked_add(m.intermediate_size.checked_mul(c)?.checked_mul(3)?)?
            .checked_add(c.checked_mul(2)?)?,
    };
    let emb = m
        .vocab_size
        .checked_add(m.block_size)?
        .checked_mul(c)?
        .checked_mul(2)?;
    block
        .checked_mul(m.n_layer)?
        .checked_add(emb)?
        .checked_add(c.checked_mul(2)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2_124m() -> ModelConfig {
        ModelConfig::nanogpt(12, 12, 768, 1024, 50304, true, 0.0)
    }

    #[test]
    fn gpt2_124m_parameter_count_matches_nanogpt() {
        // nanoGPT reports 124.44M without position embeddings for vocab 50304: 124,475,904 - 786,432 = 123,689,472
        // ... with them, wte 50304*768 + wpe 1024*768 + 12 blocks of 7,087,872 + ln_f 1,536.
        let m = gpt2_124m();
        assert_eq!(m.block_params(), 7_087_872);
        assert_eq!(m.n_params(), 38_633_472 + 786_432 + 12 * 7_087_872 + 1_536);
        assert_eq!(m.n_params(), 124_475_904);
    }

    /// Found by the `estimate` fuzz target (with debug assertions): a manual-attention model with a block size
    /// of 775M made the mask buffers' byte count wrap. See: fuzz/corpus/estimate/c1e6e118716349c610286d476401c8eea83fca9a
    #[test]
    fn huge_manual_attention_mask_is_too_large_not_a_wrap() {
        let mut s = crate::presets::founding();
        s.model.block_size = 775_173_236;
        s.train.seq_len = 52;
        s.train.attention = Attention::Manual;
        let e = s.validate().unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        // Without the mask it is only huge: the position embedding alone is 1.2 TB of weights.
        s.train.attention = Attention::Sdpa;
        let r = crate::estimate(&s).unwrap();
        assert!(r.components.weights_bytes > 1_190_000_000_000);
    }

    #[test]
    fn llama_parameter_count_matches_tinyllama() {
        // TinyLlama-1.1B config.json: 22 layers, 2048 wide, 32 heads, 4 KV heads, 5632 MLP, vocab 32000, untied:
        // 1,100,048,384 parameters.
        let m = ModelConfig {
            family: Family::Llama,
            n_layer: 22,
            n_head: 32,
            n_kv_head: 4,
            n_embd: 2048,
            block_size: 2048,
            vocab_size: 32000,
            bias: false,
            dropout: 0.0,
            intermediate_size: 5632,
            tie_embeddings: false,
        };
        assert_eq!(m.n_params(), 1_100_048_384);
    }
}
