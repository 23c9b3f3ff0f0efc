//! What is being trained and how: the setup a person describes, its validation and its parameter count.

use crate::allocator::AllocatorConfig;
use crate::error::Error;
use crate::finetune::{BaseDtype, LoraConfig, Quantization};
use crate::parallel::Parallel;
use crate::policy::{Attention, Optimizer, Precision};

/// Decoder-only architectures vramfit models op by op: each is a description (`arch::Arch::of`), walked by one
/// eager and one compiled executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// nanoGPT's GPT: learned positions, tied LM head, pre-LN LayerNorm blocks, fused QKV, GELU MLP (4x).
    Gpt2,
    /// Hugging Face `LlamaForCausalLM`: RMSNorm, rotary, grouped-query attention, SwiGLU MLP.
    Llama,
    /// Hugging Face `MistralForCausalLM`: Llama's layers with sliding-window attention (`sliding_window`).
    Mistral,
    /// Hugging Face `Qwen2ForCausalLM`: Llama's layers with biases on the q, k and v projections.
    Qwen2,
    /// Hugging Face `Qwen3ForCausalLM`: Llama's layers with an RMSNorm on each head of q and k, and a head size
    /// of its own (`head_dim`).
    Qwen3,
    /// Hugging Face `GemmaForCausalLM`: Llama's layers with the embeddings scaled by sqrt(hidden_size), an
    /// RMSNorm computed in fp32 with a `1 + weight` scale, a GELU-gated MLP (GeGLU) and a head size of its own.
    Gemma,
    /// Hugging Face `Gemma2ForCausalLM`: Gemma's layers with a norm after each branch as well as before it,
    /// eager attention with soft-capped scores, and soft-capped logits.
    Gemma2,
    /// Hugging Face `Gemma3ForCausalLM` (`model_type` gemma3_text): Gemma 2's four norms a layer, Gemma-style
    /// RMSNorms on each head of q and k, SDPA, and five sliding-window layers for every global one, each kind with
    /// its rotary table.
    Gemma3,
    /// Hugging Face `Olmo2ForCausalLM`: Llama's layers with the norms after each branch instead of before it, and
    /// RMSNorms over the whole q and k projections.
    Olmo2,
    /// Hugging Face `Phi3ForCausalLM`: Llama's layers with one packed q/k/v projection (`qkv_proj`), one packed
    /// gate/up projection (`gate_up_proj`) and rotary through the partial-rotary concatenation
    /// (`partial_rotary_factor`, `rotary_dims`).
    Phi3,
    /// Hugging Face `GPTNeoXForCausalLM` (Pythia): LayerNorms with biases, one packed q/k/v projection laid out per
    /// head (`query_key_value`), rotary on part of each head (`rotary_pct`), a GELU MLP with biases, and the
    /// attention and MLP branches read the same input when `use_parallel_residual` (`parallel_residual`).
    GptNeox,
    /// Hugging Face `MixtralForCausalLM`: Mistral's layers with a mixture of SwiGLU experts in place of the MLP
    /// (`num_local_experts`, `num_experts_per_tok`), routed in fp32 and renormalised over the chosen experts.
    Mixtral,
    /// Hugging Face `Qwen2MoeForCausalLM`: Qwen2's layers with a mixture of experts (`num_experts`,
    /// `moe_intermediate_size`) beside a gated shared expert (`shared_expert_intermediate_size`).
    Qwen2Moe,
    /// Hugging Face `OlmoeForCausalLM`: Llama's layers with RMSNorms over the whole q and k projections and a
    /// mixture of experts.
    Olmoe,
}

impl Family {
    pub const NAMES: &'static [&'static str] = &[
        "gpt2",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "olmo2",
        "phi3",
        "gpt_neox",
        "mixtral",
        "qwen2_moe",
        "olmoe",
    ];

    pub fn parse(s: &str) -> Result<Family, Error> {
        match s {
            "gpt2" => Ok(Family::Gpt2),
            "llama" => Ok(Family::Llama),
            "mistral" => Ok(Family::Mistral),
            "qwen2" => Ok(Family::Qwen2),
            "qwen3" => Ok(Family::Qwen3),
            "gemma" => Ok(Family::Gemma),
            "gemma2" => Ok(Family::Gemma2),
            "gemma3" => Ok(Family::Gemma3),
            "olmo2" => Ok(Family::Olmo2),
            "phi3" => Ok(Family::Phi3),
            "gpt_neox" => Ok(Family::GptNeox),
            "mixtral" => Ok(Family::Mixtral),
            "qwen2_moe" => Ok(Family::Qwen2Moe),
            "olmoe" => Ok(Family::Olmoe),
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
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Olmo2 => "olmo2",
            Family::Phi3 => "phi3",
            Family::GptNeox => "gpt_neox",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Olmoe => "olmoe",
        }
    }

    /// A Hugging Face model (rotary, grouped-query heads, `intermediate_size`): every family but nanoGPT's.
    pub fn is_hf(self) -> bool {
        self != Family::Gpt2
    }

    /// A mixture-of-experts family.
    pub fn is_moe(self) -> bool {
        matches!(self, Family::Mixtral | Family::Qwen2Moe | Family::Olmoe)
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
    /// Attention head size when the config gives one that is not `n_embd / n_head` (HF `head_dim`); 0 otherwise.
    pub head_dim: u64,
    /// Sliding-window attention span in tokens (Mistral's `sliding_window`; Qwen2's when `use_sliding_window`);
    /// 0 for full causal attention.
    pub sliding_window: u64,
    /// Rotary dimensions per head when only part of each head is rotated (Phi-3's `partial_rotary_factor`,
    /// GPT-NeoX's `rotary_pct`, times the head size); 0: the whole head.
    pub rotary_dims: u64,
    /// The attention and the MLP both read the layer's input and their outputs are added to it together
    /// (GPT-NeoX's `use_parallel_residual`); otherwise the MLP reads the stream after the attention's add.
    pub parallel_residual: bool,
    /// Experts in each layer's mixture (`num_local_experts`, `num_experts`); 0: a dense MLP. Each expert is a SwiGLU
    /// MLP of width `intermediate_size` (Qwen2-MoE's `moe_intermediate_size`).
    pub n_experts: u64,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub experts_per_token: u64,
    /// Qwen2-MoE's shared expert width (`shared_expert_intermediate_size`); 0: none.
    pub shared_expert_size: u64,
    /// The routing weights are renormalised over the chosen experts (`norm_topk_prob`; Mixtral always does).
    pub norm_topk_prob: bool,
    /// The router's auxiliary load-balancing loss is trained (`output_router_logits`; off by default).
    pub router_aux_loss: bool,
}

/// A model with none of the optional architecture fields: full heads, no sliding window, whole-head rotary,
/// sequential branches, a dense MLP: constructors and literals name what they set and take the rest from here.
impl Default for ModelConfig {
    fn default() -> ModelConfig {
        ModelConfig {
            family: Family::Gpt2,
            n_layer: 0,
            n_head: 0,
            n_kv_head: 0,
            n_embd: 0,
            block_size: 0,
            vocab_size: 0,
            bias: false,
            dropout: 0.0,
            intermediate_size: 0,
            tie_embeddings: false,
            head_dim: 0,
            sliding_window: 0,
            rotary_dims: 0,
            parallel_residual: false,
            n_experts: 0,
            experts_per_token: 0,
            shared_expert_size: 0,
            norm_topk_prob: false,
            router_aux_loss: false,
        }
    }
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
            ..ModelConfig::default()
        }
    }

    /// Rotary dimensions per head: `rotary_dims`, or the whole head.
    pub fn rotary_dims(&self) -> u64 {
        if self.rotary_dims > 0 {
            self.rotary_dims
        } else {
            self.head_dim()
        }
    }

    /// Attention head size: `head_dim` when the config gives one, else `n_embd / n_head`.
    pub fn head_dim(&self) -> u64 {
        if self.head_dim > 0 {
            self.head_dim
        } else {
            self.n_embd / self.n_head
        }
    }

    /// Width of the queries and of the attention output: `n_head x head_dim` (`n_embd` unless the config gives
    /// a head size of its own, as Qwen3 and Gemma do).
    pub fn q_dim(&self) -> u64 {
        self.head_dim() * self.n_head
    }

    pub fn kv_dim(&self) -> u64 {
        self.head_dim() * self.n_kv_head
    }

    /// Parameters in one transformer block.
    pub fn block_params(&self) -> u64 {
        let arch = crate::arch::Arch::of(self, Attention::Sdpa);
        let mut one = self.clone();
        one.n_layer = 1;
        let with = arch.param_tensors(&one).iter().map(|p| p.0).sum::<u64>();
        one.n_layer = 0;
        with - arch.param_tensors(&one).iter().map(|p| p.0).sum::<u64>()
    }

    /// Every parameter, each counted once (a tied LM head is the embedding), as the model's constructor makes
    /// them (`arch::Arch::param_tensors`).
    pub fn n_params(&self) -> u64 {
        crate::arch::Arch::of(self, Attention::Sdpa)
            .param_tensors(self)
            .iter()
            .map(|p| p.0)
            .sum()
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
    /// `PYTORCH_CUDA_ALLOC_CONF`'s knobs for the caching allocator (`expandable_segments`, `max_split_size_mb`,
    /// `garbage_collection_threshold`); PyTorch's defaults unless set. Read with [`parse_alloc_conf`].
    pub alloc_conf: AllocatorConfig,
    /// LoRA as peft applies it (`finetune::LoraConfig`): the base frozen, adapters trained. None: every
    /// parameter trained.
    pub lora: Option<LoraConfig>,
    /// The dtype the frozen base is loaded in, with LoRA; None: the precision's own (fp32, or bf16 for pure bf16).
    pub base_dtype: Option<BaseDtype>,
    /// The base's Linears quantized by bitsandbytes (QLoRA, 8-bit bases); None: not quantized.
    pub quantization: Option<Quantization>,
    /// More than one GPU (`train.parallel`): DDP or FSDP2, per GPU; one GPU by default.
    pub parallel: Parallel,
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
            alloc_conf: AllocatorConfig::default(),
            lora: None,
            base_dtype: None,
            quantization: None,
            parallel: Parallel::single(),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// PYTORCH_CUDA_ALLOC_CONF

/// PyTorch's smallest `max_split_size_mb`, 20: the size of the large pool's shared segments (`kLargeBuffer`,
/// 20 MiB). `AcceleratorAllocatorConfig::parseMaxSplitSize` (c10/core/AllocatorConfig.cpp) rejects smaller
/// values with "max_split_size_mb too small, must be >= 20"; torch 2.15 accepts 20 itself.
pub const MIN_MAX_SPLIT_SIZE_MB: u64 = 20;

/// The largest `max_split_size_mb` accepted: 2^40 MiB (1 EiB) is beyond any device, and the byte count stays
/// far from `u64`'s limit. PyTorch clamps larger values to `SIZE_MAX` / 1 MiB; any value this large acts as
/// "unlimited" on every device.
pub const MAX_MAX_SPLIT_SIZE_MB: u64 = 1 << 40;

/// The `PYTORCH_CUDA_ALLOC_CONF` options vramfit models.
pub const ALLOC_CONF_OPTIONS: &[&str] = &[
    "expandable_segments",
    "max_split_size_mb",
    "garbage_collection_threshold",
];

/// Options PyTorch's allocator config knows that vramfit does not model (c10/core/AllocatorConfig.cpp and
/// c10/cuda/CUDAAllocatorConfig.cpp): named as such rather than as unknown.
const ALLOC_CONF_NOT_MODELLED: &[&str] = &[
    "max_non_split_rounding_mb",
    "roundup_power2_divisions",
    "backend",
    "release_lock_on_cudamalloc",
    "pinned_use_cuda_host_register",
    "pinned_num_register_threads",
    "pinned_use_background_threads",
    "pinned_reserve_segment_size_mb",
    "graph_capture_record_stream_reuse",
];

const MIB: u64 = 1 << 20;

/// Reads `PYTORCH_CUDA_ALLOC_CONF` as PyTorch writes it: `option:value` pairs separated by commas, spaces
/// ignored, a trailing comma allowed, a later value of an option replacing an earlier one; `""` is PyTorch's
/// defaults. The options are `expandable_segments` (`True` or `False`), `max_split_size_mb` (a whole number of
/// MiB, at least 20) and `garbage_collection_threshold` (strictly between 0 and 1).
///
/// # Errors
/// One [`Error`] naming `train.alloc_conf` and the whole text, saying which option or value is wrong: an
/// unknown option, one vramfit does not model, a missing or malformed value, or a value PyTorch refuses.
///
/// # Example
/// ```
/// let c = vramfit::model::parse_alloc_conf("expandable_segments:True,max_split_size_mb:128").unwrap();
/// assert!(c.expandable_segments);
/// assert_eq!(c.max_split_size, Some(128 << 20));
/// assert_eq!(vramfit::model::alloc_conf_string(&c), "expandable_segments:True,max_split_size_mb:128");
/// ```
pub fn parse_alloc_conf(text: &str) -> Result<AllocatorConfig, Error> {
    let bad = |reason: String| Error::invalid("train.alloc_conf", format!("{text:?}"), reason);
    // PyTorch's tokenizer drops spaces wherever they are.
    let compact: String = text.chars().filter(|c| *c != ' ').collect();
    let mut config = AllocatorConfig::default();
    if compact.is_empty() {
        return Ok(config);
    }
    let body = compact.strip_suffix(',').unwrap_or(&compact);
    for option in body.split(',') {
        if option.is_empty() {
            return Err(bad("has an empty option (two commas in a row)".into()));
        }
        let (key, value) = option.split_once(':').unwrap_or((option, ""));
        if !ALLOC_CONF_OPTIONS.contains(&key) {
            return Err(bad(if ALLOC_CONF_NOT_MODELLED.contains(&key) {
                format!(
                    "sets {key}, which vramfit does not model; it models {}",
                    ALLOC_CONF_OPTIONS.join(", ")
                )
            } else {
                format!(
                    "has an unknown option {key:?}; the options are {}",
                    ALLOC_CONF_OPTIONS.join(", ")
                )
            }));
        }
        if value.is_empty() {
            return Err(bad(format!("gives {key} no value (write {key}:VALUE)")));
        }
        if value.contains(':') {
            return Err(bad(format!("gives {key} more than one value ({value:?})")));
        }
        match key {
            "expandable_segments" => {
                config.expandable_segments = match value {
                    "True" => true,
                    "False" => false,
                    _ => {
                        return Err(bad(format!(
                            "expandable_segments must be True or False, not {value:?}"
                        )))
                    }
                }
            }
            "max_split_size_mb" => {
                let mb: u64 = value.parse().map_err(|_| {
                    bad(format!(
                        "max_split_size_mb must be a whole number of MiB, not {value:?}"
                    ))
                })?;
                config.max_split_size = Some(mb.min(MAX_MAX_SPLIT_SIZE_MB) * MIB);
            }
            _ => {
                // garbage_collection_threshold: checked below.
                config.garbage_collection_threshold =
                    Some(value.parse().map_err(|_| {
                        bad(format!(
                            "garbage_collection_threshold must be a number between 0 and 1, not {value:?}"
                        ))
                    })?);
            }
        }
    }
    check_alloc_conf(&config).map_err(bad)?;
    Ok(config)
}

/// `PYTORCH_CUDA_ALLOC_CONF` for a configuration, as [`parse_alloc_conf`] reads it: only what differs from
/// PyTorch's defaults, in the order expandable_segments, max_split_size_mb, garbage_collection_threshold; `""`
/// for the defaults. `set_per_process_memory_fraction` is not part of it.
pub fn alloc_conf_string(c: &AllocatorConfig) -> String {
    let mut parts = Vec::new();
    if c.expandable_segments {
        parts.push("expandable_segments:True".to_string());
    }
    if let Some(bytes) = c.max_split_size {
        parts.push(format!("max_split_size_mb:{}", bytes / MIB));
    }
    if let Some(t) = c.garbage_collection_threshold {
        parts.push(format!("garbage_collection_threshold:{t}"));
    }
    parts.join(",")
}

/// The ranges PyTorch enforces, for a configuration however it was made; the reason names the option.
fn check_alloc_conf(c: &AllocatorConfig) -> Result<(), String> {
    if let Some(bytes) = c.max_split_size {
        let mb = bytes / MIB;
        if bytes % MIB != 0 || mb > MAX_MAX_SPLIT_SIZE_MB {
            return Err(format!(
                "max_split_size_mb must be a whole number of MiB up to {MAX_MAX_SPLIT_SIZE_MB} (the size is {bytes} bytes)"
            ));
        }
        if mb < MIN_MAX_SPLIT_SIZE_MB {
            return Err(format!(
                "max_split_size_mb ({mb}) must be at least {MIN_MAX_SPLIT_SIZE_MB}: PyTorch's minimum, the 20 MiB \
                 segments the large pool shares"
            ));
        }
    }
    if let Some(t) = c.garbage_collection_threshold {
        // NaN fails too.
        if !(t > 0.0 && t < 1.0) {
            return Err(format!(
                "garbage_collection_threshold ({t}) must be between 0 and 1, both excluded, as PyTorch requires"
            ));
        }
    }
    if let Some(f) = c.memory_fraction {
        if !(f > 0.0 && f <= 1.0) {
            return Err(format!("memory_fraction ({f}) must be in (0, 1]"));
        }
    }
    Ok(())
}

/// Hugging Face's `flash_attention_2` (the flash-attn package) is modelled where it was measured
/// (`tests/data/stub-cuda/flash.json`, `tests/data/finetune/flash.json`): eager, one GPU, full training or LoRA
/// (no quantized base) of Llama, Mistral and Qwen2 in fp16/bf16, heads a multiple of 8 wide. Everything else is
/// refused by name.
fn check_flash_attention_2(s: &Setup) -> Result<(), Error> {
    let (m, t) = (&s.model, &s.train);
    let refuse = |what: String| {
        Err(Error::NotModelled {
            what: format!("train.attention \"flash_attention_2\" {what}"),
        })
    };
    if !matches!(m.family, Family::Llama | Family::Mistral | Family::Qwen2) {
        return refuse(format!(
            "with {} (measured with llama, mistral and qwen2 only)",
            m.family.name()
        ));
    }
    if t.precision == crate::policy::Precision::Fp32 {
        // flash_api.cpp: "FlashAttention only support fp16 and bf16 data type"; transformers casts fp32
        // inputs only under autocast.
        return refuse(
            "with train.precision \"fp32\" (flash-attn takes fp16 and bf16 only)".into(),
        );
    }
    if s.device.sm < 80 {
        return refuse(format!(
            "on compute capability {}.{} (flash-attn 2 needs sm_80 or newer)",
            s.device.sm / 10,
            s.device.sm % 10
        ));
    }
    if t.compile {
        return refuse("with train.compile (not measured under torch.compile)".into());
    }
    if !m.head_dim().is_multiple_of(8) {
        return refuse(format!(
            "with heads {} wide (FlashAttnFunc pads them to a multiple of 8: not modelled)",
            m.head_dim()
        ));
    }
    if !t.parallel.is_single() {
        return refuse("with train.parallel (measured on one GPU only)".into());
    }
    if t.quantization.is_some() {
        return refuse("with a quantized base (measured with full training and LoRA only)".into());
    }
    Ok(())
}

/// The GPU the step runs on, as far as it changes what PyTorch allocates.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    /// Compute capability major x 10 + minor (sm_90 -> 90).
    pub sm: u32,
    /// Memory of the device, for "does it fit"; 0 when not given.
    pub memory_bytes: u64,
    /// Streaming multiprocessors (`cudaDeviceProp::multiProcessorCount`): flash attention's forward splits the
    /// keys of a small grid across them, with fp32 accumulators (`tensors::flash_splitkv`).
    pub sms: u32,
}

impl DeviceConfig {
    /// A device of compute capability `sm` (x 10) with `memory_bytes`, and the SM count of the GPU the reference
    /// measurements simulate at that capability (`default_sms`).
    pub fn new(sm: u32, memory_bytes: u64) -> Self {
        DeviceConfig {
            sm,
            memory_bytes,
            sms: default_sms(sm),
        }
    }
}

impl Default for DeviceConfig {
    fn default() -> Self {
        // The reference data was produced for an sm_90 (H100-class) device.
        DeviceConfig::new(90, 80 * (1 << 30))
    }
}

/// The SM count assumed where only the compute capability is given: that of the GPU the stub-cuda measurements
/// simulate at that capability (scripts/measure/stubs/driver.c, `dev_defaults`, from NVIDIA's data sheets): sm_80
/// an A100 (108 SMs), sm_86 an RTX 3090 (82), sm_89 an RTX 4070 (46), any other an H100 SXM (132). A GPU preset
/// gives its own count.
pub fn default_sms(sm: u32) -> u32 {
    match sm {
        80 => 108,
        86 => 82,
        89 => 46,
        _ => 132,
    }
}

/// CUDA context and libraries on the device, outside PyTorch's allocator: the part of `nvidia-smi`'s figure that
/// `max_memory_reserved()` does not see (driver structures, the per-SM local-memory reservation, kernel images
/// loaded lazily as kernels are first used: lazy loading is the default since CUDA 12.2 and what PyTorch's CUDA 13
/// wheels run under). Not measured by this project (no GPU has been lent to it); published figures for a process
/// after its first CUDA op, with lazy loading:
/// - 256 MiB, an RTX 3090 under torch 2.7.1 + CUDA 12.8, driver 610 (invoke-ai/InvokeAI issue 9413, 2026);
/// - "around 400MB" with CUDA >= 11.7 and lazy loading (PyTorch maintainer, pytorch/pytorch issue 109888, 2023;
///   "~300MB" in issue 107667);
/// - ~616 MiB on a datacenter GPU of an 8-GPU node (LMCache issue 4019, 2026).
///
/// The range spans them. GeForce-class parts (sm_86, sm_89, sm_120) take the RTX 3090's figure; datacenter parts
/// (sm_80, sm_90, sm_100: more SMs, so a larger local-memory reservation) the maintainer's 400 MB. A training step
/// loads more kernel images than a first op (cuBLAS, Triton): not counted, one reason the range is wide.
pub const CUDA_CONTEXT_BYTES_RANGE: (u64, u64) = (256 << 20, 616 << 20);
pub const CUDA_CONTEXT_BYTES_GEFORCE: u64 = 256 << 20;
pub const CUDA_CONTEXT_BYTES_DATACENTER: u64 = 400_000_000;

/// The CUDA context for a GPU of compute capability `sm` (see `CUDA_CONTEXT_BYTES_RANGE`).
pub fn cuda_context_bytes(sm: u32) -> u64 {
    match sm {
        86 | 89 | 120 => CUDA_CONTEXT_BYTES_GEFORCE,
        _ => CUDA_CONTEXT_BYTES_DATACENTER,
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
        if t.attention == Attention::FlashAttention2 {
            check_flash_attention_2(self)?;
        }
        if m.family == Family::Gemma2 && t.attention != Attention::Manual {
            return Err(Error::NotModelled {
                what: "gemma2 with train.attention \"sdpa\": Gemma 2 soft-caps its attention scores, which SDPA \
                       cannot; it trains with attention \"manual\" (transformers' eager attention)"
                    .into(),
            });
        }
        if m.family == Family::GptNeox
            && t.compile
            && !(m.parallel_residual && t.precision.autocast() && !t.checkpointing)
        {
            return Err(Error::NotModelled {
                what: "torch.compile of gpt_neox is traced with parallel branches (use_parallel_residual) under \
                       autocast (fp16-amp, bf16-amp), without train.checkpointing; \
                       eager mode is modelled (train.compile false, --no-compile)"
                    .into(),
            });
        }
        // Compiled mixtures of experts are modelled from the wrappers of bf16-amp runs without checkpointing (fp32
        // expert weights through transformers' `grouped_mm_fallback`; `compiled::moe_fwd`). Pure bf16 weights take
        // `torch._grouped_mm` instead; fp32, fp16-amp and the auxiliary loss were not traced.
        if m.family.is_moe()
            && t.compile
            && (t.precision != Precision::Bf16Amp || t.checkpointing || m.router_aux_loss)
        {
            return Err(Error::NotModelled {
                what: format!(
                    "torch.compile of {} is traced under bf16-amp without train.checkpointing or \
                     model.router_aux_loss (the experts through transformers' grouped_mm_fallback); \
                     eager mode is modelled (train.compile false, --no-compile)",
                    m.family.name()
                ),
            });
        }
        if m.family == Family::Olmo2 && t.compile && t.checkpointing {
            return Err(Error::NotModelled {
                what: "torch.compile of olmo2 with train.checkpointing (its blocks without a norm before the \
                       branches are traced under Inductor without checkpointing only); \
                       eager mode is modelled (train.compile false, --no-compile)"
                    .into(),
            });
        }
        // Hugging Face's eager attention under torch.compile is traced for separate q/k/v projections without q/k
        // norms (Llama's, Gemma 2's layers), without activation checkpointing.
        if m.family.is_hf() && t.attention == Attention::Manual && t.compile {
            let arch = crate::arch::Arch::of(m, t.attention);
            let traced = arch.qkv == crate::arch::Qkv::Separate && !arch.qk_norm;
            if !traced || t.checkpointing {
                return Err(Error::NotModelled {
                    what: format!(
                        "torch.compile of {}'s eager attention (train.attention \"manual\"){}: not traced under \
                         Inductor yet; sdpa is",
                        m.family.name(),
                        if traced {
                            " with train.checkpointing"
                        } else {
                            ""
                        }
                    ),
                });
            }
        }
        if m.family.is_hf() {
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
        if m.head_dim == 0 && !m.n_embd.is_multiple_of(m.n_head) {
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
        if m.family.is_hf() && !m.head_dim().is_multiple_of(2) {
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
        if m.family.is_hf() && m.dropout != 0.0 {
            return Err(Error::NotModelled {
                what: format!(
                    "model.dropout ({}) for {}: Hugging Face models are measured with attention_dropout 0",
                    m.dropout,
                    m.family.name()
                ),
            });
        }
        // transformers 5 (`masking_utils._ignore_causal_mask_sdpa`) keeps SDPA's `is_causal=True` only while the
        // sequence is shorter than the window; from there on it passes an explicit mask (modelled in eager mode,
        // and under torch.compile without activation checkpointing, the combination measured).
        if m.sliding_window > 0 && t.seq_len >= m.sliding_window && t.compile && t.checkpointing {
            return Err(Error::NotModelled {
                what: format!(
                    "torch.compile with train.checkpointing and train.seq_len ({}) at or past \
                     model.sliding_window ({}): the explicit sliding-window mask in checkpointed compiled blocks \
                     is not traced under Inductor yet; eager is, and so are compiled runs without checkpointing",
                    t.seq_len, m.sliding_window
                ),
            });
        }
        if m.family == Family::Gpt2 && m.head_dim != 0 {
            return Err(Error::invalid(
                "model.head_dim",
                m.head_dim,
                "is a Hugging Face field; gpt2's head size is n_embd / n_head",
            ));
        }
        if m.rotary_dims != 0 && !matches!(m.family, Family::Phi3 | Family::GptNeox) {
            return Err(Error::invalid(
                "model.rotary_dims",
                m.rotary_dims,
                format!(
                    "is a field of phi3 and gpt_neox (partial rotary); {} rotates whole heads",
                    m.family.name()
                ),
            ));
        }
        if m.rotary_dims > m.head_dim() || !m.rotary_dims.is_multiple_of(2) {
            return Err(Error::invalid(
                "model.rotary_dims",
                m.rotary_dims,
                format!(
                    "must be even and at most the head size ({}); 0 rotates the whole head",
                    m.head_dim()
                ),
            ));
        }
        if m.family.is_moe() {
            if m.n_experts == 0 {
                return Err(Error::invalid(
                    "model.n_experts",
                    m.n_experts,
                    "must be at least 1",
                ));
            }
            if m.experts_per_token == 0 || m.experts_per_token > m.n_experts {
                return Err(Error::invalid(
                    "model.experts_per_token",
                    m.experts_per_token,
                    format!("must be from 1 to model.n_experts ({})", m.n_experts),
                ));
            }
        } else {
            for (field, v) in [
                ("model.n_experts", m.n_experts),
                ("model.experts_per_token", m.experts_per_token),
            ] {
                if v != 0 {
                    return Err(Error::invalid(
                        field,
                        v,
                        format!(
                            "is a field of the mixture-of-experts families (mixtral, qwen2_moe, olmoe); {} has a \
                             dense MLP",
                            m.family.name()
                        ),
                    ));
                }
            }
        }
        if m.router_aux_loss && !m.family.is_moe() {
            return Err(Error::invalid(
                "model.router_aux_loss",
                m.router_aux_loss,
                format!(
                    "is a field of the mixture-of-experts families; {} has no router",
                    m.family.name()
                ),
            ));
        }
        if m.shared_expert_size != 0 && m.family != Family::Qwen2Moe {
            return Err(Error::invalid(
                "model.shared_expert_size",
                m.shared_expert_size,
                format!(
                    "is a field of qwen2_moe; {} has no shared expert",
                    m.family.name()
                ),
            ));
        }
        if m.norm_topk_prob && !matches!(m.family, Family::Qwen2Moe | Family::Olmoe) {
            return Err(Error::invalid(
                "model.norm_topk_prob",
                m.norm_topk_prob,
                format!(
                    "is a field of qwen2_moe and olmoe (mixtral always renormalises); {} has none",
                    m.family.name()
                ),
            ));
        }
        if m.parallel_residual && m.family != Family::GptNeox {
            return Err(Error::invalid(
                "model.parallel_residual",
                m.parallel_residual,
                format!(
                    "is a field of gpt_neox; {} adds its branches in turn",
                    m.family.name()
                ),
            ));
        }
        if m.family == Family::Gpt2 && m.sliding_window != 0 {
            return Err(Error::invalid(
                "model.sliding_window",
                m.sliding_window,
                "is a Hugging Face field; gpt2 has none",
            ));
        }
        if !t.grad_clip.is_finite() || t.grad_clip < 0.0 {
            return Err(Error::invalid(
                "train.grad_clip",
                t.grad_clip,
                "must be 0 (off) or a positive number",
            ));
        }
        check_alloc_conf(&t.alloc_conf).map_err(|reason| {
            Error::invalid(
                "train.alloc_conf",
                format!("{:?}", alloc_conf_string(&t.alloc_conf)),
                reason,
            )
        })?;
        crate::finetune::check(self)?;
        t.parallel.validate(t.precision, t.compile)?;
        t.parallel.check_model(m, t)?;
        crate::finetune::check_parallel(self)?;
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
        let q_dim = m
            .head_dim()
            .checked_mul(m.n_head)
            .ok_or_else(|| too_large("head_dim x n_head"))?;
        // A mixture of experts holds k copies of each token: [N k, 2 I] for the experts' first GEMM.
        let experts = m
            .intermediate_size
            .checked_mul(2)
            .and_then(|x| x.checked_mul(m.experts_per_token.max(1)))
            .and_then(|x| x.checked_add(m.n_experts))
            .ok_or_else(|| too_large("experts_per_token x intermediate_size"))?;
        let width = [mlp, experts, m.shared_expert_size, m.vocab_size, q_dim]
            .into_iter()
            .max()
            .unwrap_or(0)
            .checked_add(scores)
            .and_then(|w| w.checked_add(128))
            .ok_or_else(|| too_large("layer width"))?;
        // Per token per layer: at most ~64 values of the widest size, 4 bytes each (a generous bound).
        // What a person changes to make it smaller, named in the messages below.
        let knobs = format!(
            "train.batch_size ({}) x train.seq_len ({}) tokens through model.n_layer ({}) layers",
            t.batch_size, t.seq_len, m.n_layer
        );
        let act_bytes = tokens
            .checked_mul(width)
            .and_then(|x| x.checked_mul(256))
            .and_then(|x| x.checked_mul(m.n_layer.max(1) + 8))
            .ok_or_else(|| too_large(&format!("the activations of {knobs} overflow 64 bits")))?;
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
        // FSDP gathers each parameter padded to a multiple of the GPU count: its rows rounded up, times the GPUs.
        if !t.parallel.is_single() {
            let arch = crate::arch::Arch::of(m, t.attention);
            let mut padded: u64 = 0;
            for (elems, _, rows) in arch.param_shapes(m) {
                let cols = elems / rows.max(1);
                padded = rows
                    .div_ceil(t.parallel.gpus)
                    .checked_mul(t.parallel.gpus)
                    .and_then(|r| r.checked_mul(cols))
                    .and_then(|e| e.checked_mul(32))
                    .and_then(|b| b.checked_add(padded))
                    .ok_or_else(|| too_large("the gathered parameters overflow 64 bits"))?;
            }
            if padded > MAX_BYTES {
                return Err(too_large(&format!(
                    "the gathered parameters need on the order of {:.1e} bytes ({params} parameters padded for \
                     train.parallel.gpus ({})), beyond any device",
                    padded as f64, t.parallel.gpus
                )));
            }
        }
        if total > MAX_BYTES {
            return Err(too_large(&format!(
                "the step needs on the order of {:.1e} bytes ({params} parameters; {knobs}), beyond any device",
                total as f64
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
        // Llama's layer (q and o of q_dim x C, k and v of kv_dim x C, three MLP matrices, two norms), with
        // Qwen2's q/k/v biases (q_dim + 2 kv_dim) counted as a bound from above.
        _ => {
            let q = m.head_dim().checked_mul(m.n_head)?;
            let kv = m.head_dim().checked_mul(m.n_kv_head)?;
            q.checked_mul(c)?
                .checked_mul(2)?
                .checked_add(kv.checked_mul(c)?.checked_mul(2)?)?
                .checked_add(
                    m.intermediate_size
                        .checked_mul(c)?
                        .checked_mul(3)?
                        .checked_mul(m.n_experts.max(1))?,
                )?
                // The MLP's biases (GPT-NeoX), the router (experts x C) and Qwen2-MoE's shared expert and gate.
                .checked_add(m.intermediate_size.checked_add(c)?)?
                .checked_add(m.n_experts.checked_mul(c)?)?
                .checked_add(m.shared_expert_size.checked_mul(c)?.checked_mul(3)?)?
                .checked_add(c)?
                .checked_add(c.checked_mul(2)?)?
                .checked_add(q.checked_add(kv.checked_mul(2)?)?)?
                // Qwen3's q and k norms (head_dim each), OLMo 2's (q_dim + kv_dim), Gemma 2's two more norms.
                .checked_add(m.head_dim().checked_mul(2)?)?
                .checked_add(q.checked_add(kv)?)?
                .checked_add(c.checked_mul(2)?)?
        }
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

    /// A batch too large to count, or too large for any device, is refused naming the knobs that make it so.
    #[test]
    fn too_large_names_batch_sequence_and_layers() {
        for batch in [1_000_000, 1_000_000_000_000] {
            let mut s = crate::presets::founding();
            s.train.batch_size = batch;
            let e = s.validate().unwrap_err();
            assert!(matches!(e, Error::TooLarge { .. }), "{e}");
            let text = e.to_string();
            assert!(
                text.contains(&format!("train.batch_size ({batch}) x train.seq_len (512)"))
                    && text.contains("model.n_layer (6)"),
                "{text}"
            );
        }
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

    /// torch.compile of GPT-NeoX is estimated as traced (parallel branches under autocast, no checkpointing) and
    /// refused otherwise, with what is traced named.
    #[test]
    fn compiled_gpt_neox_is_estimated_where_traced() {
        let mut s = crate::presets::model_preset("pythia-160m").expect("preset");
        s.train.compile = true;
        s.train.precision = Precision::Bf16Amp;
        s.train.checkpointing = false;
        assert!(crate::estimate(&s).is_ok());
        let refused = |s: &Setup| {
            let e = s.validate().unwrap_err();
            assert!(matches!(e, Error::NotModelled { .. }), "{e}");
            assert!(
                e.to_string()
                    .contains("torch.compile of gpt_neox is traced"),
                "{e}"
            );
        };
        let mut fp32 = s.clone();
        fp32.train.precision = Precision::Fp32;
        refused(&fp32);
        let mut ckpt = s.clone();
        ckpt.train.checkpointing = true;
        refused(&ckpt);
        let mut sequential = s.clone();
        sequential.model.parallel_residual = false;
        refused(&sequential);
    }

    /// torch.compile of the mixtures of experts is estimated as traced (bf16-amp, no checkpointing, no auxiliary
    /// loss) and refused otherwise, with what is traced named.
    #[test]
    fn compiled_moe_is_estimated_where_traced() {
        for id in ["mixtral-8x7b", "olmoe-1b-7b"] {
            let mut s = crate::presets::model_preset(id).expect("preset");
            s.train.compile = true;
            s.train.precision = Precision::Bf16Amp;
            s.train.checkpointing = false;
            s.model.router_aux_loss = false;
            assert!(crate::estimate(&s).is_ok(), "{id}");
            let refused = |s: &Setup| {
                let e = s.validate().unwrap_err();
                assert!(matches!(e, Error::NotModelled { .. }), "{e}");
                let family = s.model.family.name();
                assert!(
                    e.to_string().contains(&format!(
                        "torch.compile of {family} is traced under bf16-amp without train.checkpointing or \
                         model.router_aux_loss"
                    )),
                    "{e}"
                );
            };
            for precision in [Precision::Fp32, Precision::Fp16Amp, Precision::Bf16] {
                let mut other = s.clone();
                other.train.precision = precision;
                refused(&other);
            }
            let mut ckpt = s.clone();
            ckpt.train.checkpointing = true;
            refused(&ckpt);
            let mut aux = s.clone();
            aux.model.router_aux_loss = true;
            refused(&aux);
        }
    }

    /// The messages a person sees for PYTORCH_CUDA_ALLOC_CONF, one per kind of mistake.
    #[test]
    fn alloc_conf_errors_name_the_field_the_text_and_the_option() {
        let check = |text: &str, expect: &str| {
            let e = parse_alloc_conf(text).unwrap_err();
            assert!(matches!(e, Error::Invalid { .. }), "{text}: {e:?}");
            assert_eq!(e.to_string(), expect, "{text}");
        };
        check(
            "expandible_segments:True",
            "train.alloc_conf (\"expandible_segments:True\") has an unknown option \"expandible_segments\"; \
             the options are expandable_segments, max_split_size_mb, garbage_collection_threshold",
        );
        check(
            "roundup_power2_divisions:4",
            "train.alloc_conf (\"roundup_power2_divisions:4\") sets roundup_power2_divisions, which vramfit \
             does not model; it models expandable_segments, max_split_size_mb, garbage_collection_threshold",
        );
        check(
            "expandable_segments:true",
            "train.alloc_conf (\"expandable_segments:true\") expandable_segments must be True or False, not \"true\"",
        );
        check(
            "expandable_segments",
            "train.alloc_conf (\"expandable_segments\") gives expandable_segments no value \
             (write expandable_segments:VALUE)",
        );
        check(
            "max_split_size_mb:128:256",
            "train.alloc_conf (\"max_split_size_mb:128:256\") gives max_split_size_mb more than one value \
             (\"128:256\")",
        );
        check(
            "max_split_size_mb:12.5",
            "train.alloc_conf (\"max_split_size_mb:12.5\") max_split_size_mb must be a whole number of MiB, \
             not \"12.5\"",
        );
        check(
            "max_split_size_mb:19",
            "train.alloc_conf (\"max_split_size_mb:19\") max_split_size_mb (19) must be at least 20: PyTorch's \
             minimum, the 20 MiB segments the large pool shares",
        );
        check(
            "garbage_collection_threshold:1.0",
            "train.alloc_conf (\"garbage_collection_threshold:1.0\") garbage_collection_threshold (1) must be \
             between 0 and 1, both excluded, as PyTorch requires",
        );
        check(
            "garbage_collection_threshold:0",
            "train.alloc_conf (\"garbage_collection_threshold:0\") garbage_collection_threshold (0) must be \
             between 0 and 1, both excluded, as PyTorch requires",
        );
        check(
            "garbage_collection_threshold:NaN",
            "train.alloc_conf (\"garbage_collection_threshold:NaN\") garbage_collection_threshold (NaN) must be \
             between 0 and 1, both excluded, as PyTorch requires",
        );
        check(
            "garbage_collection_threshold:high",
            "train.alloc_conf (\"garbage_collection_threshold:high\") garbage_collection_threshold must be a \
             number between 0 and 1, not \"high\"",
        );
        check(
            "expandable_segments:True,,max_split_size_mb:128",
            "train.alloc_conf (\"expandable_segments:True,,max_split_size_mb:128\") has an empty option (two \
             commas in a row)",
        );
    }

    #[test]
    fn alloc_conf_reads_pytorch_syntax_and_defaults() {
        // Unset or empty: PyTorch's defaults.
        assert_eq!(parse_alloc_conf("").unwrap(), AllocatorConfig::default());
        assert_eq!(parse_alloc_conf("  ").unwrap(), AllocatorConfig::default());
        assert_eq!(
            TrainConfig::defaults(1, 64).alloc_conf,
            AllocatorConfig::default()
        );
        let c = parse_alloc_conf(
            "expandable_segments:True,max_split_size_mb:128,garbage_collection_threshold:0.8",
        )
        .unwrap();
        assert_eq!(
            c,
            AllocatorConfig {
                expandable_segments: true,
                max_split_size: Some(128 << 20),
                garbage_collection_threshold: Some(0.8),
                memory_fraction: None,
            }
        );
        // Spaces anywhere and a trailing comma, as PyTorch's tokenizer allows; a later value replaces an earlier.
        let c = parse_alloc_conf(
            " expandable_segments : True , expandable_segments:False, max_split_size_mb:20,",
        )
        .unwrap();
        assert!(!c.expandable_segments);
        // 20 is PyTorch's minimum, accepted (torch 2.15: "must be >= 20").
        assert_eq!(c.max_split_size, Some(20 << 20));
        // Values too large for any device act as "unlimited" and stay within u64.
        let c = parse_alloc_conf("max_split_size_mb:18446744073709551615").unwrap();
        assert_eq!(c.max_split_size, Some(MAX_MAX_SPLIT_SIZE_MB << 20));
    }

    #[test]
    fn alloc_conf_round_trips() {
        for text in [
            "",
            "expandable_segments:True",
            "max_split_size_mb:128",
            "garbage_collection_threshold:0.8",
            "expandable_segments:True,max_split_size_mb:512,garbage_collection_threshold:0.6",
            "max_split_size_mb:20,garbage_collection_threshold:0.000001",
        ] {
            let c = parse_alloc_conf(text).unwrap();
            assert_eq!(alloc_conf_string(&c), text);
            assert_eq!(
                parse_alloc_conf(&alloc_conf_string(&c)).unwrap(),
                c,
                "{text}"
            );
        }
        // What is spelled out is the canonical form: defaults dropped, PyTorch's order.
        let c = parse_alloc_conf("garbage_collection_threshold:0.5, expandable_segments:False")
            .unwrap();
        assert_eq!(alloc_conf_string(&c), "garbage_collection_threshold:0.5");
        // Through the setup JSON: a string, as the environment variable is written; left out, the defaults.
        let mut s = crate::presets::founding();
        s.train.alloc_conf = c;
        let v = crate::input::setup_to_value(&s);
        assert_eq!(v["train"]["alloc_conf"], "garbage_collection_threshold:0.5");
        assert_eq!(crate::input::setup_from_value(&v).unwrap(), s);
        let mut v = v;
        v["train"].as_object_mut().unwrap().remove("alloc_conf");
        assert_eq!(
            crate::input::setup_from_value(&v).unwrap().train.alloc_conf,
            AllocatorConfig::default()
        );
        v["train"]["alloc_conf"] = serde_json::json!(true);
        assert_eq!(
            crate::input::setup_from_value(&v).unwrap_err().to_string(),
            "train.alloc_conf (true) must be a string"
        );
    }

    /// A configuration built in code is held to PyTorch's ranges by `Setup::validate`.
    #[test]
    fn validate_checks_the_allocator_configuration() {
        let mut s = crate::presets::founding();
        s.train.alloc_conf.max_split_size = Some(8 << 20);
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "train.alloc_conf (\"max_split_size_mb:8\") max_split_size_mb (8) must be at least 20: PyTorch's \
             minimum, the 20 MiB segments the large pool shares"
        );
        s.train.alloc_conf.max_split_size = Some((64 << 20) + 1);
        assert!(s.validate().is_err());
        s.train.alloc_conf.max_split_size = None;
        s.train.alloc_conf.garbage_collection_threshold = Some(f64::INFINITY);
        assert!(s.validate().unwrap_err().to_string().starts_with(
            "train.alloc_conf (\"garbage_collection_threshold:inf\") garbage_collection_threshold (inf)"
        ));
        s.train.alloc_conf.garbage_collection_threshold = Some(0.5);
        s.validate().unwrap();
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
            ..ModelConfig::default()
        };
        assert_eq!(m.n_params(), 1_100_048_384);
        // Qwen2's layers are Llama's with q, k and v biases: Qwen2.5-1.5B's config.json (28 layers, 1536 wide, 12
        // heads, 2 KV heads, 8960 MLP, vocab 151936, tied) gives its published 1,543,714,304.
        let q = ModelConfig {
            family: Family::Qwen2,
            n_layer: 28,
            n_head: 12,
            n_kv_head: 2,
            n_embd: 1536,
            block_size: 32768,
            vocab_size: 151936,
            intermediate_size: 8960,
            tie_embeddings: true,
            ..m
        };
        assert_eq!(q.n_params(), 1_543_714_304);
    }
}
