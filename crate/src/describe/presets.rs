//! Named starting points: models as nanoGPT trains them or as their published config.json gives them, and GPUs
//! by their memory. Data only.

use crate::input;
use crate::model::{DeviceConfig, Family, ModelConfig, Setup, TrainConfig};
use crate::policy::Precision;

/// A model preset: an id for URLs and attributes, a label for people, and the setup.
pub struct ModelPreset {
    pub id: &'static str,
    pub label: &'static str,
    pub setup: fn() -> Setup,
}

/// nanoGPT's GPT trained at full context with bf16 autocast and fused AdamW (train.py's choices on a recent GPU).
fn gpt2(n_layer: u64, n_head: u64, n_embd: u64, block: u64, vocab: u64, bias: bool) -> Setup {
    Setup {
        model: ModelConfig::nanogpt(n_layer, n_head, n_embd, block, vocab, bias, 0.0),
        // nanoGPT's train.py compiles the model by default (`compile = True`).
        train: TrainConfig {
            compile: true,
            ..TrainConfig::defaults(input::DEFAULT_BATCH_SIZE, block)
        },
        device: DeviceConfig::default(),
    }
}

fn with_batch(mut s: Setup, batch: u64) -> Setup {
    s.train.batch_size = batch;
    s
}

/// A Llama-style model's published config.json dims.
struct LlamaDims {
    n_layer: u64,
    n_head: u64,
    n_kv: u64,
    n_embd: u64,
    inter: u64,
    vocab: u64,
    max_pos: u64,
    tie: bool,
}

/// A Hugging Face model of `family` trained at `seq` tokens, batch 1, bf16 autocast, fused AdamW.
fn hf(family: Family, d: LlamaDims, seq: u64) -> Setup {
    let model = ModelConfig {
        family,
        n_layer: d.n_layer,
        n_head: d.n_head,
        n_kv_head: d.n_kv,
        n_embd: d.n_embd,
        block_size: d.max_pos,
        vocab_size: d.vocab,
        bias: false,
        dropout: 0.0,
        intermediate_size: d.inter,
        tie_embeddings: d.tie,
        ..ModelConfig::default()
    };
    let mut s = input::hf_setup(model);
    s.train.seq_len = seq;
    s
}

/// The founding case: nanoGPT, 6 layers x 384, block 512, batch 16, vocab 50304, fp16 autocast, fused AdamW,
/// compiled (train.py's default), on a 12 GB RTX 4070 (sm_89).
pub fn founding() -> Setup {
    let mut s = with_batch(gpt2(6, 6, 384, 512, 50304, false), 16);
    s.train.precision = Precision::Fp16Amp;
    s.device = gpu("rtx-4070").map_or(DeviceConfig::new(89, 0), GpuPreset::device);
    s
}

pub const MODEL_PRESETS: &[ModelPreset] = &[
    ModelPreset {
        id: "nanogpt-30m",
        label: "nanoGPT 30M (6x384, block 512, batch 16, fp16) on RTX 4070",
        setup: founding,
    },
    ModelPreset {
        id: "shakespeare-char",
        label: "nanoGPT shakespeare-char (6x384, block 256, batch 64, vocab 65)",
        setup: || {
            let mut s = with_batch(gpt2(6, 6, 384, 256, 65, false), 64);
            s.model.dropout = 0.2;
            s
        },
    },
    ModelPreset {
        id: "gpt2",
        label: "GPT-2 small 124M (nanoGPT, block 1024, batch 12)",
        setup: || with_batch(gpt2(12, 12, 768, 1024, 50304, false), 12),
    },
    ModelPreset {
        id: "gpt2-medium",
        label: "GPT-2 medium 350M (block 1024, batch 4)",
        setup: || with_batch(gpt2(24, 16, 1024, 1024, 50257, true), 4),
    },
    ModelPreset {
        id: "gpt2-large",
        label: "GPT-2 large 774M (block 1024, batch 2)",
        setup: || with_batch(gpt2(36, 20, 1280, 1024, 50257, true), 2),
    },
    ModelPreset {
        id: "gpt2-xl",
        label: "GPT-2 XL 1.5B (block 1024, batch 1)",
        setup: || with_batch(gpt2(48, 25, 1600, 1024, 50257, true), 1),
    },
    ModelPreset {
        id: "tinyllama-1.1b",
        label: "TinyLlama-1.1B (22x2048, GQA 32/4, seq 2048)",
        setup: || {
            hf(
                Family::Llama,
                LlamaDims {
                    n_layer: 22,
                    n_head: 32,
                    n_kv: 4,
                    n_embd: 2048,
                    inter: 5632,
                    vocab: 32000,
                    max_pos: 2048,
                    tie: false,
                },
                2048,
            )
        },
    },
    ModelPreset {
        id: "llama-3.2-1b",
        label: "Llama-3.2-1B (16x2048, GQA 32/8, vocab 128256, tied, seq 2048)",
        setup: || {
            hf(
                Family::Llama,
                LlamaDims {
                    n_layer: 16,
                    n_head: 32,
                    n_kv: 8,
                    n_embd: 2048,
                    inter: 8192,
                    vocab: 128256,
                    max_pos: 131072,
                    tie: true,
                },
                2048,
            )
        },
    },
    ModelPreset {
        id: "llama-2-7b",
        label: "Llama-2-7B (32x4096, seq 4096)",
        setup: || {
            hf(
                Family::Llama,
                LlamaDims {
                    n_layer: 32,
                    n_head: 32,
                    n_kv: 32,
                    n_embd: 4096,
                    inter: 11008,
                    vocab: 32000,
                    max_pos: 4096,
                    tie: false,
                },
                4096,
            )
        },
    },
    ModelPreset {
        id: "mistral-7b",
        label: "Mistral-7B v0.2 (32x4096, GQA 32/8, no sliding window, seq 4096)",
        setup: || {
            hf(
                Family::Mistral,
                LlamaDims {
                    n_layer: 32,
                    n_head: 32,
                    n_kv: 8,
                    n_embd: 4096,
                    inter: 14336,
                    vocab: 32000,
                    max_pos: 32768,
                    tie: false,
                },
                4096,
            )
        },
    },
    ModelPreset {
        id: "qwen2.5-0.5b",
        label: "Qwen2.5-0.5B (24x896, GQA 14/2, vocab 151936, tied, seq 2048)",
        setup: || {
            hf(
                Family::Qwen2,
                LlamaDims {
                    n_layer: 24,
                    n_head: 14,
                    n_kv: 2,
                    n_embd: 896,
                    inter: 4864,
                    vocab: 151936,
                    max_pos: 32768,
                    tie: true,
                },
                2048,
            )
        },
    },
    ModelPreset {
        id: "llama-3.1-8b",
        label: "Llama-3.1-8B (32x4096, GQA 32/8, vocab 128256, seq 2048)",
        setup: || {
            hf(
                Family::Llama,
                LlamaDims {
                    n_layer: 32,
                    n_head: 32,
                    n_kv: 8,
                    n_embd: 4096,
                    inter: 14336,
                    vocab: 128256,
                    max_pos: 131072,
                    tie: false,
                },
                2048,
            )
        },
    },
    ModelPreset {
        id: "llama-3.1-70b",
        label: "Llama-3.1-70B (80x8192, GQA 64/8, vocab 128256, seq 2048)",
        setup: || {
            hf(
                Family::Llama,
                LlamaDims {
                    n_layer: 80,
                    n_head: 64,
                    n_kv: 8,
                    n_embd: 8192,
                    inter: 28672,
                    vocab: 128256,
                    max_pos: 131072,
                    tie: false,
                },
                2048,
            )
        },
    },
    ModelPreset {
        id: "qwen2.5-1.5b",
        label: "Qwen2.5-1.5B (28x1536, GQA 12/2, vocab 151936, tied, seq 2048)",
        setup: || {
            hf(
                Family::Qwen2,
                LlamaDims {
                    n_layer: 28,
                    n_head: 12,
                    n_kv: 2,
                    n_embd: 1536,
                    inter: 8960,
                    vocab: 151936,
                    max_pos: 32768,
                    tie: true,
                },
                2048,
            )
        },
    },
    ModelPreset {
        id: "qwen2.5-7b",
        label: "Qwen2.5-7B (28x3584, GQA 28/4, vocab 152064, seq 2048)",
        setup: || {
            hf(
                Family::Qwen2,
                LlamaDims {
                    n_layer: 28,
                    n_head: 28,
                    n_kv: 4,
                    n_embd: 3584,
                    inter: 18944,
                    vocab: 152064,
                    max_pos: 32768,
                    tie: false,
                },
                2048,
            )
        },
    },
    ModelPreset {
        id: "gemma-2-2b",
        label:
            "Gemma-2-2B (26x2304, GQA 8/4, head 256, vocab 256000, tied, eager attention, seq 2048)",
        setup: || {
            let mut s = hf(
                Family::Gemma2,
                LlamaDims {
                    n_layer: 26,
                    n_head: 8,
                    n_kv: 4,
                    n_embd: 2304,
                    inter: 9216,
                    vocab: 256000,
                    max_pos: 8192,
                    tie: true,
                },
                2048,
            );
            s.model.head_dim = 256;
            s
        },
    },
    ModelPreset {
        id: "gemma-3-1b",
        label: "Gemma-3-1B (26x1152, MQA 4/1, head 256, vocab 262144, tied, window 512, seq 2048)",
        setup: || {
            let mut s = hf(
                Family::Gemma3,
                LlamaDims {
                    n_layer: 26,
                    n_head: 4,
                    n_kv: 1,
                    n_embd: 1152,
                    inter: 6912,
                    vocab: 262144,
                    max_pos: 32768,
                    tie: true,
                },
                2048,
            );
            s.model.head_dim = 256;
            s.model.sliding_window = 512;
            s
        },
    },
    ModelPreset {
        id: "phi-3-mini",
        label: "Phi-3-mini-4k (32x3072, 32 heads, packed q/k/v and gate/up, vocab 32064, window 2047, seq 2048)",
        setup: || {
            let mut s = hf(
                Family::Phi3,
                LlamaDims {
                    n_layer: 32,
                    n_head: 32,
                    n_kv: 32,
                    n_embd: 3072,
                    inter: 8192,
                    vocab: 32064,
                    max_pos: 4096,
                    tie: false,
                },
                2048,
            );
            // Phi-3-mini-4k-instruct's config.json: "sliding_window": 2047, which a 2,048-token sequence reaches.
            s.model.sliding_window = 2047;
            s
        },
    },
    ModelPreset {
        id: "mixtral-8x7b",
        label: "Mixtral-8x7B (32x4096, GQA 32/8, 8 experts of 14336, 2 per token, vocab 32000, seq 2048)",
        setup: || {
            let mut s = hf(
                Family::Mixtral,
                LlamaDims {
                    n_layer: 32,
                    n_head: 32,
                    n_kv: 8,
                    n_embd: 4096,
                    inter: 14336,
                    vocab: 32000,
                    max_pos: 32768,
                    tie: false,
                },
                2048,
            );
            (s.model.n_experts, s.model.experts_per_token) = (8, 2);
            s
        },
    },
    ModelPreset {
        id: "olmoe-1b-7b",
        label: "OLMoE-1B-7B (16x2048, 16 heads, 64 experts of 1024, 8 per token, vocab 50304, seq 2048)",
        setup: || {
            let mut s = hf(
                Family::Olmoe,
                LlamaDims {
                    n_layer: 16,
                    n_head: 16,
                    n_kv: 16,
                    n_embd: 2048,
                    inter: 1024,
                    vocab: 50304,
                    max_pos: 4096,
                    tie: false,
                },
                2048,
            );
            (s.model.n_experts, s.model.experts_per_token) = (64, 8);
            s
        },
    },
    ModelPreset {
        id: "pythia-160m",
        label: "Pythia-160M (GPT-NeoX, 12x768, 12 heads, rotary 16 of 64, parallel residual, seq 2048)",
        setup: || pythia(12, 12, 768),
    },
    ModelPreset {
        id: "pythia-1b",
        label: "Pythia-1B (GPT-NeoX, 16x2048, 8 heads, rotary 64 of 256, parallel residual, seq 2048)",
        setup: || pythia(16, 8, 2048),
    },
];

/// A Pythia model (EleutherAI's config.json files): GPT-NeoX with `rotary_pct` 0.25, parallel residual,
/// attention biases, MLP 4x, vocab 50304, untied, 2,048 positions.
fn pythia(n_layer: u64, n_head: u64, n_embd: u64) -> Setup {
    let mut s = hf(
        Family::GptNeox,
        LlamaDims {
            n_layer,
            n_head,
            n_kv: n_head,
            n_embd,
            inter: 4 * n_embd,
            vocab: 50304,
            max_pos: 2048,
            tie: false,
        },
        2048,
    );
    s.model.rotary_dims = n_embd / n_head / 4;
    s.model.parallel_residual = true;
    s.model.bias = true;
    s
}

/// The preset ids, for error messages listing the allowed values (kept equal to `MODEL_PRESETS` by a test).
pub const MODEL_IDS: &[&str] = &[
    "nanogpt-30m",
    "shakespeare-char",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "tinyllama-1.1b",
    "llama-3.2-1b",
    "llama-2-7b",
    "mistral-7b",
    "qwen2.5-0.5b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "qwen2.5-1.5b",
    "qwen2.5-7b",
    "gemma-2-2b",
    "gemma-3-1b",
    "phi-3-mini",
    "mixtral-8x7b",
    "olmoe-1b-7b",
    "pythia-160m",
    "pythia-1b",
];

pub fn model_preset(id: &str) -> Option<Setup> {
    MODEL_PRESETS
        .iter()
        .find(|p| p.id == id)
        .map(|p| (p.setup)())
}

/// A GPU preset: an id for URLs, the CLI and attributes, a label for people (the memory as sold), and what the
/// estimate needs to know of the device. Every figure names its source beside it.
pub struct GpuPreset {
    pub id: &'static str,
    pub label: &'static str,
    /// Device memory in bytes as the driver reports its total (NVML, what nvidia-smi shows, from which the CUDA
    /// context is then taken): the published NVML figure where there is one (the `NVML_MIB_*` constants), else the
    /// label's "N GB" read as N GiB, which the HBM parts' drivers report to within 0.6% (a B200 179.1 GiB).
    pub memory_bytes: u64,
    /// Compute capability x 10, for kernel choices (flash attention needs sm_80). AMD and Apple parts take an
    /// NVIDIA generation with the same kernels available as a stand-in (see each entry).
    pub sm: u32,
    /// Streaming multiprocessors (for AMD: compute units) of the device PyTorch sees, from the vendor's figures;
    /// `None` where the preset stands for several chips (the estimate then takes `model::default_sms`).
    pub sms: Option<u32>,
    pub vendor: Vendor,
}

impl GpuPreset {
    /// The device as the estimate sees it: memory, compute capability and SM count.
    pub fn device(&self) -> DeviceConfig {
        DeviceConfig {
            sm: self.sm,
            memory_bytes: self.memory_bytes,
            sms: self
                .sms
                .unwrap_or_else(|| crate::model::default_sms(self.sm)),
        }
    }
}

/// Who makes a GPU: what its `sms` count and whether its `sm` is its own compute capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Nvidia,
    /// ROCm builds of PyTorch run CUDA code through HIP; `sm` is a stand-in.
    Amd,
    /// PyTorch's MPS backend; `sm` is a stand-in.
    Apple,
}

impl Vendor {
    /// What `GpuPreset::sms` counts, in the plural.
    pub fn sm_name(self) -> &'static str {
        match self {
            Vendor::Nvidia => "SMs",
            Vendor::Amd => "compute units",
            Vendor::Apple => "GPU cores",
        }
    }

    /// Whether `GpuPreset::sm` is the part's own compute capability rather than a stand-in.
    pub fn has_compute_capability(self) -> bool {
        self == Vendor::Nvidia
    }
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

// Total memory as NVML reports it (nvidia-smi), for the parts whose figure is published: Modal's table "Why does an
// NVIDIA H100 80GB card offer 85.52 GB?" (thundergolfer.com/blog/nvidia-gpu-memory-capacity): H200 143,771 MiB,
// H100 80 GB 81,559 MiB, A10 23,028 MiB, L40S 46,068 MiB, L4 23,034 MiB (ECC on for the GDDR parts), T4
// 15,360 MiB (A100 80 and 40 GB: 81,920 and 40,960 MiB, exactly 80 and 40 GiB).
const NVML_MIB_H200: u64 = 143_771;
const NVML_MIB_H100_80: u64 = 81_559;
const NVML_MIB_A10: u64 = 23_028;
const NVML_MIB_L40S: u64 = 46_068;
const NVML_MIB_L4: u64 = 23_034;
const NVML_MIB_T4: u64 = 15_360;
// GeForce RTX 5090: 32,607 MiB (31.84 GiB), the total nvidia-smi prints for it ("... / 32607MiB") in every public
// log of one found (several machines and drivers, Linux and WSL2); NVIDIA publishes no NVML figure for it.
const NVML_MIB_RTX_5090: u64 = 32_607;
// The same, read from nvidia-smi's total ("... / 12282MiB") in public logs of each card (several machines, Linux
// and Windows, agreeing): the Ada GeForce cards keep a few MiB of their GDDR6(X) (RTX 4070 12,282 MiB, RTX 4080
// 16,376, RTX 4090 24,564, RTX 4060 Ti 16 GB 16,380), as do the RTX A6000 (49,140), the H100 NVL (95,830) and the
// B200 (183,359). The Ampere GeForce cards report their whole memory (RTX 3060 12,288, RTX 3080 10,240, RTX 3090
// 24,576 MiB). The V100's logs disagree by driver (16,160 or 16,384 MiB; 32,510 or 32,768), so it keeps its
// data sheet's figure.
const NVML_MIB_RTX_4070: u64 = 12_282;
const NVML_MIB_RTX_4080: u64 = 16_376;
const NVML_MIB_RTX_4090: u64 = 24_564;
const NVML_MIB_RTX_4060_TI_16: u64 = 16_380;
const NVML_MIB_RTX_A6000: u64 = 49_140;
const NVML_MIB_H100_NVL: u64 = 95_830;
const NVML_MIB_B200: u64 = 183_359;

// SM counts: NVIDIA's GeForce and RTX spec pages list CUDA cores, not SMs; Ampere (GA10x), Ada and Blackwell
// (GB20x) SMs hold 128 FP32 CUDA cores each, Turing and Volta SMs 64 (the architecture whitepapers), so the SM
// count is the core count divided by that. Where a whitepaper states the SMs of the very product, it is named.
pub const GPU_PRESETS: &[GpuPreset] = &[
    GpuPreset {
        id: "rtx-3060",
        label: "RTX 3060 12 GB",
        memory_bytes: 12 * GIB,
        sm: 86,
        // GeForce RTX 3060 spec page: 3,584 CUDA cores / 128 = 28 SMs.
        sms: Some(28),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "rtx-3080",
        label: "RTX 3080 10 GB",
        // GeForce RTX 3080 spec page: 10 GB GDDR6X (a 12 GB model came later; this is the 10 GB one).
        memory_bytes: 10 * GIB,
        // CUDA GPUs list (developer.nvidia.com/cuda-gpus): GeForce RTX 3080, 8.6.
        sm: 86,
        // NVIDIA Ampere GA102 GPU Architecture whitepaper: RTX 3080, 68 SMs (8,704 CUDA cores).
        sms: Some(68),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "rtx-3090",
        label: "RTX 3090 24 GB",
        memory_bytes: 24 * GIB,
        sm: 86,
        // NVIDIA Ampere GA102 GPU Architecture whitepaper: RTX 3090, 82 SMs (10,496 CUDA cores).
        sms: Some(82),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "rtx-4060-ti-16",
        label: "RTX 4060 Ti 16 GB",
        // GeForce RTX 4060 Ti spec page: 16 GB or 8 GB GDDR6; this is the 16 GB one, of which the driver reports
        // 15.99 GiB (`NVML_MIB_RTX_4060_TI_16`).
        memory_bytes: NVML_MIB_RTX_4060_TI_16 * MIB,
        // CUDA GPUs list: GeForce RTX 4060 Ti, 8.9.
        sm: 89,
        // GeForce RTX 4060 Ti spec page: 4,352 CUDA cores / 128 = 34 SMs.
        sms: Some(34),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "rtx-4070",
        label: "RTX 4070 12 GB",
        memory_bytes: NVML_MIB_RTX_4070 * MIB,
        sm: 89,
        // GeForce RTX 4070 spec page: 5,888 CUDA cores / 128 = 46 SMs.
        sms: Some(46),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "rtx-4080",
        label: "RTX 4080 16 GB",
        memory_bytes: NVML_MIB_RTX_4080 * MIB,
        sm: 89,
        // NVIDIA Ada GPU Architecture whitepaper: RTX 4080 (16 GB), 76 SMs (9,728 CUDA cores).
        sms: Some(76),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "rtx-4090",
        label: "RTX 4090 24 GB",
        memory_bytes: NVML_MIB_RTX_4090 * MIB,
        sm: 89,
        // NVIDIA Ada GPU Architecture whitepaper: RTX 4090, 128 SMs (16,384 CUDA cores).
        sms: Some(128),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "rtx-5090",
        label: "RTX 5090 32 GB",
        // GeForce RTX 5090 spec page: 32 GB GDDR7, of which the driver reports 31.84 GiB (`NVML_MIB_RTX_5090`).
        memory_bytes: NVML_MIB_RTX_5090 * MIB,
        // CUDA GPUs list: GeForce RTX 5090, 12.0.
        sm: 120,
        // NVIDIA RTX Blackwell GPU Architecture whitepaper: RTX 5090, 170 SMs (21,760 CUDA cores).
        sms: Some(170),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "a10",
        label: "A10 24 GB",
        memory_bytes: NVML_MIB_A10 * MIB,
        sm: 86,
        // NVIDIA A10 data sheet: 72 RT cores, one per SM: 72 SMs (9,216 CUDA cores / 128).
        sms: Some(72),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "rtx-a6000",
        label: "RTX A6000 48 GB",
        // NVIDIA RTX A6000 data sheet: 48 GB GDDR6 with ECC (ECC off by default on this workstation card).
        memory_bytes: NVML_MIB_RTX_A6000 * MIB,
        // CUDA GPUs list: NVIDIA RTX A6000, 8.6.
        sm: 86,
        // NVIDIA RTX A6000 data sheet: 10,752 CUDA cores / 128 = 84 SMs (84 RT cores).
        sms: Some(84),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "l4",
        label: "L4 24 GB",
        memory_bytes: NVML_MIB_L4 * MIB,
        sm: 89,
        // 58 SMs (7,424 CUDA cores / 128): the NVIDIA L4 data sheet gives no SM or core count; this is CUDA's
        // multi_processor_count on an L4 as Inductor's traces record it (cc 89).
        sms: Some(58),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "l40s",
        label: "L40S 48 GB",
        // NVIDIA L40S data sheet: 48 GB GDDR6 with ECC (on by default: the driver then reports 44.99 GiB).
        memory_bytes: NVML_MIB_L40S * MIB,
        // CUDA GPUs list: NVIDIA L40S, 8.9.
        sm: 89,
        // NVIDIA L40S data sheet: 18,176 CUDA cores / 128 = 142 SMs (142 RT cores).
        sms: Some(142),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "t4",
        label: "T4 16 GB",
        memory_bytes: NVML_MIB_T4 * MIB,
        sm: 75,
        // NVIDIA T4 data sheet: 2,560 CUDA cores / 64 (Turing) = 40 SMs (320 Tensor Cores, 8 per SM).
        sms: Some(40),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "v100-16",
        label: "V100 16 GB",
        memory_bytes: 16 * GIB,
        sm: 70,
        // NVIDIA V100 data sheet: 5,120 CUDA cores / 64 (Volta) = 80 SMs, as the Volta whitepaper states.
        sms: Some(80),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "v100-32",
        label: "V100 32 GB",
        memory_bytes: 32 * GIB,
        sm: 70,
        // As the 16 GB V100: 80 SMs.
        sms: Some(80),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "a100-40",
        label: "A100 40 GB",
        memory_bytes: 40 * GIB,
        sm: 80,
        // NVIDIA A100 Tensor Core GPU Architecture whitepaper: A100, 108 SMs.
        sms: Some(108),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "a100-80",
        label: "A100 80 GB",
        memory_bytes: 80 * GIB,
        sm: 80,
        // As the 40 GB A100: 108 SMs (the 80 GB A100 data sheet changes memory only).
        sms: Some(108),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "h100-80",
        label: "H100 80 GB",
        memory_bytes: NVML_MIB_H100_80 * MIB,
        sm: 90,
        // NVIDIA H100 Tensor Core GPU Architecture whitepaper: H100 SXM5, 132 SMs (the H100 PCIe card, also 80 GB,
        // has 114).
        sms: Some(132),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "h100-nvl",
        label: "H100 NVL 94 GB",
        // NVIDIA H100 data sheet: H100 NVL, 94 GB HBM3 (per GPU; a pair is sold bridged as 188 GB), of which the
        // driver reports 93.58 GiB (`NVML_MIB_H100_NVL`).
        memory_bytes: NVML_MIB_H100_NVL * MIB,
        // CUDA GPUs list: NVIDIA H100, 9.0.
        sm: 90,
        // 132 SMs (16,896 CUDA cores / 128): NVIDIA's data sheets give no SM count for the NVL; the March 2023 H100
        // data sheet gave a bridged NVL pair twice the SXM5's FP64 and FP32 peaks, the SXM5's 132 SMs each
        // (the NVL is the same GH100 configuration with its sixth HBM3 stack enabled).
        sms: Some(132),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "h200-141",
        label: "H200 141 GB",
        memory_bytes: NVML_MIB_H200 * MIB,
        sm: 90,
        // NVIDIA H200 data sheet: the H100 SXM5's compute (same peaks) with more memory: 132 SMs.
        sms: Some(132),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "b200",
        label: "B200 180 GB",
        // NVIDIA DGX B200 data sheet: 1,440 GB total GPU memory for 8 B200s = 180 GB each, of which the driver
        // reports 179.06 GiB (`NVML_MIB_B200`; the B200 was first announced with 192 GB).
        memory_bytes: NVML_MIB_B200 * MIB,
        // CUDA GPUs list: NVIDIA B200, 10.0.
        sm: 100,
        // 148 SMs (74 on each of its two dies): no NVIDIA data sheet lists B200 SMs; this is CUDA's
        // multi_processor_count on a B200, as Inductor's traces record it (cc 100).
        sms: Some(148),
        vendor: Vendor::Nvidia,
    },
    GpuPreset {
        id: "mi250",
        label: "MI250 GCD 64 GB (2 per card)",
        // AMD Instinct MI250 data sheet: 128 GB HBM2e on two graphics compute dies (GCDs), 64 GB each. ROCm and
        // PyTorch see each GCD as a device of its own (torch.cuda.device_count() is 2 per MI250), and one
        // training process uses one GCD: this preset is one GCD.
        memory_bytes: 64 * GIB,
        // A stand-in, as for the MI300X: the NVIDIA generation an AMD part is matched with (CDNA 2 with the A100,
        // sm_80: bf16, flash attention through AOTriton), datacenter class for the context.
        sm: 80,
        // AMD Instinct MI250 data sheet: 208 compute units per card; AMD's MI250 microarchitecture page
        // (rocm.docs.amd.com): 104 active CUs per GCD.
        sms: Some(104),
        vendor: Vendor::Amd,
    },
    GpuPreset {
        id: "mi300x",
        label: "MI300X 192 GB",
        memory_bytes: 192 * GIB,
        sm: 90,
        // AMD Instinct MI300X data sheet: 304 compute units (one device to PyTorch).
        sms: Some(304),
        vendor: Vendor::Amd,
    },
    GpuPreset {
        id: "apple-m-16",
        label: "Apple M-series, 16 GB unified memory",
        memory_bytes: 16 * GIB,
        sm: 80,
        // Apple M-series chips have from 7 to 80 GPU cores: no one figure.
        sms: None,
        vendor: Vendor::Apple,
    },
    GpuPreset {
        id: "apple-m-32",
        label: "Apple M-series, 32 GB unified memory",
        memory_bytes: 32 * GIB,
        sm: 80,
        sms: None,
        vendor: Vendor::Apple,
    },
    GpuPreset {
        id: "apple-m-64",
        label: "Apple M-series, 64 GB unified memory",
        memory_bytes: 64 * GIB,
        sm: 80,
        sms: None,
        vendor: Vendor::Apple,
    },
    GpuPreset {
        id: "apple-m-128",
        label: "Apple M-series, 128 GB unified memory",
        memory_bytes: 128 * GIB,
        sm: 80,
        sms: None,
        vendor: Vendor::Apple,
    },
];

/// The GPU ids (kept equal to `GPU_PRESETS` by a test).
pub const GPU_IDS: &[&str] = &[
    "rtx-3060",
    "rtx-3080",
    "rtx-3090",
    "rtx-4060-ti-16",
    "rtx-4070",
    "rtx-4080",
    "rtx-4090",
    "rtx-5090",
    "a10",
    "rtx-a6000",
    "l4",
    "l40s",
    "t4",
    "v100-16",
    "v100-32",
    "a100-40",
    "a100-80",
    "h100-80",
    "h100-nvl",
    "h200-141",
    "b200",
    "mi250",
    "mi300x",
    "apple-m-16",
    "apple-m-32",
    "apple-m-64",
    "apple-m-128",
];

pub fn gpu_memory_bytes(id: &str) -> Option<u64> {
    GPU_PRESETS
        .iter()
        .find(|g| g.id == id)
        .map(|g| g.memory_bytes)
}

pub fn gpu(id: &str) -> Option<&'static GpuPreset> {
    GPU_PRESETS.iter().find(|g| g.id == id)
}

/// The GPU preset with exactly this memory and compute capability, when only one has them (12,282 MiB and sm_89:
/// rtx-4070; 24 GiB and sm_86: rtx-3090, the A10 reporting 23,028 MiB). For showing which GPU a setup that names
/// no GPU is on, and for the SM count of a device given without one.
pub fn gpu_with(memory_bytes: u64, sm: u32) -> Option<&'static GpuPreset> {
    let mut matching = GPU_PRESETS
        .iter()
        .filter(|g| g.memory_bytes == memory_bytes && g.sm == sm);
    let first = matching.next()?;
    matching.next().is_none().then_some(first)
}

/// The model preset whose model and training a setup holds: the device and the GPUs group (`train.parallel`)
/// aside, since choosing a preset keeps the GPU and the strategy chosen. For the page's preset box, which names
/// the preset a link's values are (the first, should two presets ever hold the same values).
pub fn preset_with(s: &Setup) -> Option<&'static str> {
    MODEL_PRESETS
        .iter()
        .find(|p| {
            let mut own = (p.setup)();
            own.train.parallel = s.train.parallel.clone();
            own.model == s.model && own.train == s.train
        })
        .map(|p| p.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit: a reloaded link showed the preset box as "custom" though its values were a preset's. Each
    /// preset's values, through the URL and back, name that preset (with any GPU and strategy), and a value
    /// changed names none.
    #[test]
    fn a_presets_values_name_it_through_the_url() {
        use crate::input::{setup_from_query, setup_to_query};
        for p in MODEL_PRESETS {
            let mut s = setup_from_query(&setup_to_query(&(p.setup)()), &mut Vec::new())
                .unwrap_or_else(|e| panic!("{}: {e}", p.id));
            assert_eq!(preset_with(&s), Some(p.id));
            s.device = gpu("h100-80").map(|g| g.device()).unwrap();
            s.train.parallel.gpus = 8;
            assert_eq!(preset_with(&s), Some(p.id), "{}: another GPU", p.id);
            s.train.batch_size += 1;
            assert_eq!(preset_with(&s), None, "{}: another batch size", p.id);
            s.train.batch_size -= 1;
            s.model.n_layer += 1;
            assert_eq!(preset_with(&s), None, "{}: another depth", p.id);
        }
    }

    #[test]
    fn every_model_preset_is_valid_and_estimates() {
        for p in MODEL_PRESETS {
            let s = (p.setup)();
            s.validate().unwrap_or_else(|e| panic!("{}: {e}", p.id));
        }
        assert_eq!(
            model_preset("nanogpt-30m").map(|s| s.train.batch_size),
            Some(16)
        );
        assert!(model_preset("nope").is_none());
    }

    #[test]
    fn id_lists_match_the_presets() {
        let models: Vec<&str> = MODEL_PRESETS.iter().map(|p| p.id).collect();
        assert_eq!(models, MODEL_IDS);
        let gpus: Vec<&str> = GPU_PRESETS.iter().map(|g| g.id).collect();
        assert_eq!(gpus, GPU_IDS);
    }

    #[test]
    fn published_parameter_counts() {
        // Llama-2-7B: 6,738,415,616; Mistral-7B: 7,241,732,096; Qwen2.5-0.5B: 494,032,768 (with its q/k/v
        // biases, 24 x (896 + 2 x 128) = 27,648).
        assert_eq!(
            model_preset("llama-2-7b").unwrap().model.n_params(),
            6_738_415_616
        );
        assert_eq!(
            model_preset("mistral-7b").unwrap().model.n_params(),
            7_241_732_096
        );
        assert_eq!(
            model_preset("qwen2.5-0.5b").unwrap().model.n_params(),
            494_032_768
        );
        assert_eq!(
            model_preset("llama-3.2-1b").unwrap().model.n_params(),
            1_235_814_400
        );
        // Published: Llama-3.1-8B 8,030,261,248; Llama-3.1-70B 70,553,706,496; Qwen2.5-1.5B 1,543,714,304;
        // Qwen2.5-7B 7,615,616,512; Gemma-2-2B 2,614,341,888; Gemma-3-1B 999,885,952; Phi-3-mini 3,821,079,552;
        // Pythia-160M 162,322,944 and Pythia-1B 1,011,781,632 (the Pythia paper's totals); Mixtral-8x7B
        // 46,702,792,704; OLMoE-1B-7B 6,919,161,856 (their model cards).
        for (id, n) in [
            ("llama-3.1-8b", 8_030_261_248),
            ("llama-3.1-70b", 70_553_706_496),
            ("qwen2.5-1.5b", 1_543_714_304),
            ("qwen2.5-7b", 7_615_616_512),
            ("gemma-2-2b", 2_614_341_888),
            ("gemma-3-1b", 999_885_952),
            ("phi-3-mini", 3_821_079_552),
            ("pythia-160m", 162_322_944),
            ("mixtral-8x7b", 46_702_792_704),
            ("olmoe-1b-7b", 6_919_161_856),
            ("pythia-1b", 1_011_781_632),
        ] {
            assert_eq!(model_preset(id).unwrap().model.n_params(), n, "{id}");
        }
    }
}

/// The GPU preset a WebGPU adapter description names, when exactly one preset matches ("NVIDIA GeForce RTX 4070"
/// -> rtx-4070). Cards sold with several memory sizes (A100, V100, RTX 3080, RTX 4060 Ti, Apple M-series) are not
/// guessed; neither is the MI250X (not the MI250: 110 CUs per GCD).
pub fn identify_gpu(description: &str) -> Option<&'static str> {
    let d = description.to_ascii_lowercase();
    let words: Vec<&str> = d
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let has = |w: &str| words.contains(&w);
    let rtx = |n: &str| {
        has("rtx") && has(n) && !has("ti") && !has("super") && !has("laptop") && !has("mobile")
    };
    let id = if rtx("3060") {
        "rtx-3060"
    } else if rtx("3090") {
        "rtx-3090"
    } else if rtx("4070") {
        "rtx-4070"
    } else if rtx("4080") {
        "rtx-4080"
    } else if rtx("4090") {
        "rtx-4090"
    } else if rtx("5090") {
        "rtx-5090"
    } else if has("rtx") && has("a6000") {
        "rtx-a6000"
    } else if has("h100") && has("nvl") {
        "h100-nvl"
    } else if has("h100") {
        "h100-80"
    } else if has("h200") {
        "h200-141"
    } else if has("b200") {
        "b200"
    } else if has("mi250") && !has("mi250x") {
        "mi250"
    } else if has("mi300x") {
        "mi300x"
    } else if has("l40s") {
        "l40s"
    } else if has("l4") {
        "l4"
    } else if has("t4") {
        "t4"
    } else if has("a10") {
        "a10"
    } else {
        return None;
    };
    Some(id)
}

#[cfg(test)]
mod identify_tests {
    use super::identify_gpu;

    #[test]
    fn identifies_only_unambiguous_cards() {
        assert_eq!(identify_gpu("NVIDIA GeForce RTX 4070"), Some("rtx-4070"));
        assert_eq!(identify_gpu("NVIDIA GeForce RTX 4070 Ti"), None);
        assert_eq!(identify_gpu("NVIDIA H100 80GB HBM3"), Some("h100-80"));
        assert_eq!(identify_gpu("NVIDIA A100-SXM4-40GB"), None);
        assert_eq!(identify_gpu("SwiftShader Device (Subzero)"), None);
        assert_eq!(identify_gpu("Apple M2 Max"), None);
        assert_eq!(identify_gpu("NVIDIA GeForce RTX 5090"), Some("rtx-5090"));
        assert_eq!(identify_gpu("NVIDIA GeForce RTX 5090 Laptop GPU"), None);
        assert_eq!(identify_gpu("NVIDIA GeForce RTX 4060 Ti"), None);
        assert_eq!(identify_gpu("NVIDIA GeForce RTX 3080"), None);
        assert_eq!(identify_gpu("NVIDIA RTX A6000"), Some("rtx-a6000"));
        assert_eq!(identify_gpu("NVIDIA RTX 6000 Ada Generation"), None);
        assert_eq!(identify_gpu("NVIDIA L40S"), Some("l40s"));
        assert_eq!(identify_gpu("NVIDIA L4"), Some("l4"));
        assert_eq!(identify_gpu("NVIDIA H100 NVL"), Some("h100-nvl"));
        assert_eq!(identify_gpu("NVIDIA B200"), Some("b200"));
        assert_eq!(identify_gpu("NVIDIA GB200"), None);
        assert_eq!(identify_gpu("AMD Instinct MI250"), Some("mi250"));
        assert_eq!(identify_gpu("AMD Instinct MI250X"), None);
    }
}

#[cfg(test)]
mod gpu_tests {
    use super::*;

    /// Every label names the memory as sold ("RTX 4070 12 GB"), and the preset holds what the driver reports of
    /// it: N GiB, or for the parts with a published NVML total at most N GiB and no less than what ECC leaves
    /// (1/16 of a GDDR part's memory holds its check bits), within 0.5%; every part that is one chip has its SM
    /// (or CU) count.
    #[test]
    fn labels_name_the_memory_and_single_chips_have_sm_counts() {
        for g in GPU_PRESETS {
            let words: Vec<&str> = g.label.split(' ').collect();
            let sold: u64 = words
                .windows(2)
                .find(|w| w[1] == "GB")
                .and_then(|w| w[0].parse().ok())
                .unwrap_or_else(|| panic!("{}: {:?} names its memory in GB", g.id, g.label));
            let m = g.memory_bytes as f64;
            let n = (sold * GIB) as f64;
            assert!(
                m <= n && m >= n * 15.0 / 16.0 * 0.995,
                "{}: {m} for {sold} GB",
                g.id
            );
            assert_eq!(g.sms.is_none(), g.id.starts_with("apple-"), "{}", g.id);
            assert!(g.sms.is_none_or(|n| (20..=400).contains(&n)), "{}", g.id);
            assert_eq!(
                gpu(g.id).map(|x| x.label),
                Some(g.label),
                "{}: ids are unique",
                g.id
            );
        }
        // Spot checks against the sources named in the table.
        let sms = |id: &str| gpu(id).and_then(|g| g.sms);
        assert_eq!(sms("rtx-4070"), Some(46));
        assert_eq!(sms("h100-80"), Some(132));
        assert_eq!(sms("b200"), Some(148));
        assert_eq!(sms("mi250"), Some(104));
        assert_eq!(gpu("mi250").map(|g| g.memory_bytes), Some(64 * GIB));
        assert_eq!(
            gpu("b200").map(|g| (g.sm, g.memory_bytes)),
            Some((100, 183_359 * MIB))
        );
        // nvidia-smi's totals: 12,282 MiB on an RTX 4070 (12 GB), 24,576 on an RTX 3090 (24 GB).
        assert_eq!(gpu("rtx-4070").map(|g| g.memory_bytes), Some(12_282 * MIB));
        assert_eq!(gpu("rtx-3090").map(|g| g.memory_bytes), Some(24 * GIB));
        assert_eq!(gpu("rtx-5090").map(|g| g.sm), Some(120));
    }

    #[test]
    fn a_device_names_its_gpu_only_when_one_preset_has_it() {
        let id = |gib: u64, sm: u32| gpu_with(gib * GIB, sm).map(|g| g.id);
        assert_eq!(
            gpu_with(NVML_MIB_RTX_4070 * MIB, 89).map(|g| g.id),
            Some("rtx-4070")
        );
        assert_eq!(id(12, 89), None, "not an RTX 4070's reported total");
        assert_eq!(
            gpu_with(NVML_MIB_H100_80 * MIB, 90).map(|g| g.id),
            Some("h100-80")
        );
        assert_eq!(id(80, 90), None, "not an H100's reported total");
        // 24 GiB at 8.6 is an RTX 3090: an A10 reports less (ECC on), which names it.
        assert_eq!(id(24, 86), Some("rtx-3090"));
        assert_eq!(gpu_with(NVML_MIB_A10 * MIB, 86).map(|g| g.id), Some("a10"));
        assert_eq!(
            id(16, 89),
            None,
            "neither an RTX 4080's nor an RTX 4060 Ti's total"
        );
        assert_eq!(
            gpu_with(NVML_MIB_RTX_4080 * MIB, 89).map(|g| g.id),
            Some("rtx-4080")
        );
        assert_eq!(id(13, 89), None);
        // The presets' own devices.
        assert_eq!(
            gpu_with(founding().device.memory_bytes, founding().device.sm).map(|g| g.id),
            Some("rtx-4070")
        );
    }
}
