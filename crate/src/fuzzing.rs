//! Entry points shared by the fuzz targets (`fuzz/`) and the seed-corpus smoke test (`tests/fuzz_corpus.rs`):
//! each takes raw bytes and must return without panicking, whatever they hold.

use crate::allocator::AllocatorConfig;
use crate::input;
use crate::model::{DeviceConfig, Family, ModelConfig, Setup, TrainConfig};
use crate::parallel::{Dtype, Strategy};
use crate::policy::{Attention, Optimizer, Precision};

/// Reads bytes as a sequence of fields, padding with zeros when they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let n = self.0.len().min(8);
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        // Small values are the interesting ones: the first byte picks a scale.
        match b[0] % 4 {
            0 => u64::from(b[1]),
            1 => u64::from(u16::from_le_bytes([b[1], b[2]])),
            2 => u64::from(u32::from_le_bytes([b[1], b[2], b[3], b[4]])),
            _ => u64::from_le_bytes(b),
        }
    }

    fn byte(&mut self) -> u8 {
        let v = self.0.first().copied().unwrap_or(0);
        self.0 = self.0.get(1..).unwrap_or(&[]);
        v
    }

    fn f64(&mut self) -> f64 {
        f64::from_bits(self.u64())
    }
}

/// Builds a setup from bytes and estimates it; the result (Ok or Err) is checked for internal consistency.
pub fn estimate_from_bytes(data: &[u8]) {
    let setup = setup_from_bytes(data);
    if let Ok(r) = crate::estimate(&setup) {
        assert_eq!(
            r.components.total(),
            r.peak_allocated_bytes,
            "components must add up"
        );
        assert!(r.peak_reserved_bytes >= r.peak_allocated_bytes);
    }
}

/// The setup `estimate_from_bytes` builds from these bytes (to reproduce a fuzzer's finding).
pub fn setup_from_bytes(data: &[u8]) -> Setup {
    let mut b = Bytes(data);
    let flags = b.byte();
    let mut setup = Setup {
        model: ModelConfig {
            family: if flags & 1 == 0 {
                Family::Gpt2
            } else {
                Family::Llama
            },
            n_layer: b.u64() % 64,
            n_head: b.u64(),
            n_kv_head: b.u64(),
            n_embd: b.u64(),
            block_size: b.u64(),
            vocab_size: b.u64(),
            bias: flags & 2 != 0,
            dropout: if flags & 4 != 0 { b.f64() } else { 0.0 },
            intermediate_size: b.u64(),
            tie_embeddings: flags & 8 != 0,
            ..ModelConfig::default()
        },
        train: TrainConfig {
            batch_size: b.u64(),
            seq_len: b.u64(),
            precision: [
                Precision::Fp32,
                Precision::Fp16Amp,
                Precision::Bf16Amp,
                Precision::Bf16,
            ][usize::from(b.byte() % 4)],
            optimizer: [
                Optimizer::AdamW,
                Optimizer::AdamWFused,
                Optimizer::Sgd,
                Optimizer::SgdMomentum,
            ][usize::from(b.byte() % 4)],
            attention: if flags & 16 != 0 {
                Attention::Manual
            } else {
                Attention::Sdpa
            },
            checkpointing: flags & 32 != 0,
            grad_accum_steps: b.u64(),
            grad_clip: if flags & 64 != 0 { b.f64() } else { 1.0 },
            zero_grad_set_to_none: flags & 128 == 0,
            compile: b.byte() % 2 == 1,
            alloc_conf: AllocatorConfig::default(),
            lora: None,
            base_dtype: None,
            quantization: None,
            parallel: Default::default(),
        },
        device: {
            let sm = u32::from(b.byte());
            DeviceConfig::new(sm, b.u64())
        },
    };
    // PYTORCH_CUDA_ALLOC_CONF from the bytes after the device (earlier corpus entries keep their meaning).
    let alloc = b.byte();
    let c = &mut setup.train.alloc_conf;
    c.expandable_segments = alloc & 1 != 0;
    if alloc & 2 != 0 {
        c.max_split_size = Some(b.u64());
    }
    if alloc & 4 != 0 {
        c.garbage_collection_threshold = Some(b.f64());
    }
    // Hugging Face families and the sliding window from the bytes after that.
    let hf = b.byte();
    if setup.model.family != Family::Gpt2 {
        setup.model.family = [
            Family::Llama,
            Family::Mistral,
            Family::Qwen2,
            Family::Qwen3,
            Family::Gemma,
            Family::Gemma2,
            Family::Gemma3,
            Family::Olmo2,
        ][usize::from(hf % 8)];
    }
    if hf & 4 != 0 {
        setup.model.sliding_window = b.u64();
    }
    if hf & 8 != 0 {
        setup.model.head_dim = b.u64();
    }
    // The families after those (packed projections, parallel residual, mixtures of experts) from one more byte,
    // with their fields (earlier corpus entries, which end before it, keep their meaning).
    let more = b.byte();
    if setup.model.family != Family::Gpt2 && more & 1 != 0 {
        setup.model.family = [
            Family::Phi3,
            Family::GptNeox,
            Family::Mixtral,
            Family::Qwen2Moe,
            Family::Olmoe,
        ][usize::from((more >> 1) % 5)];
        let m = &mut setup.model;
        m.rotary_dims = if more & 16 != 0 { b.u64() } else { 0 };
        m.parallel_residual = more & 32 != 0;
        if m.family.is_moe() {
            m.n_experts = b.u64();
            m.experts_per_token = b.u64();
            m.shared_expert_size = if more & 64 != 0 { b.u64() } else { 0 };
            m.norm_topk_prob = more & 128 != 0;
            m.router_aux_loss = m.shared_expert_size % 2 == 1;
        }
    }
    // More than one GPU from the byte after that, with its fields (earlier entries keep their meaning).
    let par = b.byte();
    if par & 3 != 0 {
        let p = &mut setup.train.parallel;
        p.strategy = [Strategy::Ddp, Strategy::Fsdp, Strategy::Single][usize::from(par & 3) - 1];
        p.gpus = b.u64();
        p.tp = if par & 4 != 0 { b.u64() } else { 1 };
        p.bucket_cap_mb = (par & 8 != 0).then(|| b.u64());
        p.gradient_as_bucket_view = par & 16 != 0;
        p.reshard_after_forward = par & 32 == 0;
        p.offload = par & 64 != 0;
        if par & 128 != 0 {
            let d = b.byte();
            let dtype = |x: u8| {
                [
                    None,
                    Some(Dtype::Fp32),
                    Some(Dtype::Bf16),
                    Some(Dtype::Fp16),
                ][usize::from(x % 4)]
            };
            p.param_dtype = dtype(d);
            p.reduce_dtype = dtype(d >> 2);
        }
    }
    setup
}

pub fn nanogpt_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(imp) = input::nanogpt_config(text) {
            let _ = crate::estimate(&imp.setup);
        }
    }
}

pub fn hf_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = input::hf_config(text);
        if let Ok((setup, _, _)) = input::import_any(text) {
            let _ = crate::estimate(&setup);
        }
    }
}

pub fn url_state(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(setup) = input::setup_from_query(text, &mut Vec::new()) {
            let _ = crate::estimate(&setup);
            // What parses must round-trip.
            let again = input::setup_from_query(&input::setup_to_query(&setup), &mut Vec::new());
            assert_eq!(again.as_ref().ok(), Some(&setup), "URL state round trip");
        }
    }
}

/// The memory-snapshot reader (gzip, pickle, the trace replay) on any bytes: an `Error` or a consistent result.
pub fn snapshot(data: &[u8]) {
    if let Ok(m) = crate::snapshot::read_snapshot(data) {
        assert!(m.timeline.len() <= crate::snapshot::MAX_TIMELINE_POINTS);
        assert!(m.blocks_at_peak.len() as u64 <= m.n_blocks_at_peak);
        assert!(m.peak_allocated_bytes >= m.initial_allocated_bytes);
        assert!(m.peak_reserved_bytes >= m.initial_reserved_bytes);
        // A malformed trace (a block freed twice, an address allocated twice) may make the counters and the live
        // set disagree; what holds whatever the trace says: every live block is counted once, largest first.
        let n: u64 = m.by_origin.iter().map(|o| o.n_blocks).sum();
        assert_eq!(n, m.n_blocks_at_peak);
        assert!(m
            .blocks_at_peak
            .windows(2)
            .all(|w| w[0].bytes >= w[1].bytes));
    }
}
