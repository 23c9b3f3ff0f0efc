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

/// Trained at `seq` tokens, batch 1, bf16 autocast, fused AdamW.
fn llama(d: LlamaDims, seq: u64) -> Setup {
    let model = ModelConfig {
        family: Family::Llama,
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
    s.device = DeviceConfig {
        sm: 89,
        memory_bytes: gpu_memory_bytes("rtx-4070").unwrap_or(0),
    };
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
            llama(
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
            llama(
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
            llama(
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
        label: "Mistral-7B (32x4096, GQA 32/8, seq 4096)",
        setup: || {
            llama(
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
            llama(
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
];

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
];

pub fn model_preset(id: &str) -> Option<Setup> {
    MODEL_PRESETS
        .iter()
        .find(|p| p.id == id)
        .map(|p| (p.setup)())
}

/// A GPU preset: memory as marketed (GB = 10^9 bytes for NVIDIA/AMD cards as sold; see `memory_bytes`).
pub struct GpuPreset {
    pub id: &'static str,
    pub label: &'static str,
    /// Device memory in bytes as the driver reports total memory (binary GiB for datacenter parts).
    pub memory_bytes: u64,
    /// Compute capability x 10, for kernel choices (flash attention needs sm_80).
    pub sm: u32,
}

const GIB: u64 = 1 << 30;

pub const GPU_PRESETS: &[GpuPreset] = &[
    GpuPreset {
        id: "rtx-3060",
        label: "RTX 3060 12 GB",
        memory_bytes: 12 * GIB,
        sm: 86,
    },
    GpuPreset {
        id: "rtx-3090",
        label: "RTX 3090 24 GB",
        memory_bytes: 24 * GIB,
        sm: 86,
    },
    GpuPreset {
        id: "rtx-4070",
        label: "RTX 4070 12 GB",
        memory_bytes: 12 * GIB,
        sm: 89,
    },
    GpuPreset {
        id: "rtx-4080",
        label: "RTX 4080 16 GB",
        memory_bytes: 16 * GIB,
        sm: 89,
    },
    GpuPreset {
        id: "rtx-4090",
        label: "RTX 4090 24 GB",
        memory_bytes: 24 * GIB,
        sm: 89,
    },
    GpuPreset {
        id: "a10",
        label: "A10 24 GB",
        memory_bytes: 24 * GIB,
        sm: 86,
    },
    GpuPreset {
        id: "l4",
        label: "L4 24 GB",
        memory_bytes: 24 * GIB,
        sm: 89,
    },
    GpuPreset {
        id: "t4",
        label: "T4 16 GB",
        memory_bytes: 16 * GIB,
        sm: 75,
    },
    GpuPreset {
        id: "v100-16",
        label: "V100 16 GB",
        memory_bytes: 16 * GIB,
        sm: 70,
    },
    GpuPreset {
        id: "v100-32",
        label: "V100 32 GB",
        memory_bytes: 32 * GIB,
        sm: 70,
    },
    GpuPreset {
        id: "a100-40",
        label: "A100 40 GB",
        memory_bytes: 40 * GIB,
        sm: 80,
    },
    GpuPreset {
        id: "a100-80",
        label: "A100 80 GB",
        memory_bytes: 80 * GIB,
        sm: 80,
    },
    GpuPreset {
        id: "h100-80",
        label: "H100 80 GB",
        memory_bytes: 80 * GIB,
        sm: 90,
    },
    GpuPreset {
        id: "h200-141",
        label: "H200 141 GB",
        memory_bytes: 141 * GIB,
        sm: 90,
    },
    GpuPreset {
        id: "mi300x",
        label: "MI300X 192 GB",
        memory_bytes: 192 * GIB,
        sm: 90,
    },
    GpuPreset {
        id: "apple-m-16",
        label: "Apple M-series, 16 GB unified memory",
        memory_bytes: 16 * GIB,
        sm: 80,
    },
    GpuPreset {
        id: "apple-m-32",
        label: "Apple M-series, 32 GB unified memory",
        memory_bytes: 32 * GIB,
        sm: 80,
    },
    GpuPreset {
        id: "apple-m-64",
        label: "Apple M-series, 64 GB unified memory",
        memory_bytes: 64 * GIB,
        sm: 80,
    },
    GpuPreset {
        id: "apple-m-128",
        label: "Apple M-series, 128 GB unified memory",
        memory_bytes: 128 * GIB,
        sm: 80,
    },
];

/// The GPU ids (kept equal to `GPU_PRESETS` by a test).
pub const GPU_IDS: &[&str] = &[
    "rtx-3060",
    "rtx-3090",
    "rtx-4070",
    "rtx-4080",
    "rtx-4090",
    "a10",
    "l4",
    "t4",
    "v100-16",
    "v100-32",
    "a100-40",
    "a100-80",
    "h100-80",
    "h200-141",
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // Llama-2-7B: 6,738,415,616; Mistral-7B: 7,241,732,096; Qwen2.5-0.5B (without q/k/v biases, which are
        // 24 x (896 + 2 x 128) = 27,648 of its 494,032,768): 494,005,120.
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
            494_032_768 - 27_648
        );
        assert_eq!(
            model_preset("llama-3.2-1b").unwrap().model.n_params(),
            1_235_814_400
        );
    }
}

/// The GPU preset a WebGPU adapter description names, when exactly one preset matches ("NVIDIA GeForce RTX 4070"
/// -> rtx-4070). Cards sold with several memory sizes (A100, V100, Apple M-series) are not guessed.
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
    } else if has("h100") {
        "h100-80"
    } else if has("h200") {
        "h200-141"
    } else if has("mi300x") {
        "mi300x"
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
    }
}
