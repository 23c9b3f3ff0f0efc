//! "How to make it fit": each change a person can make, estimated by the core, with what it saves; and the
//! largest batch and block that fit the device.

use crate::error::Error;
use crate::model::Setup;
use crate::policy::{Attention, Optimizer, Precision};
use crate::sweep::{largest_fitting, Axis};
use serde::Serialize;

/// One suggested change and its effect.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Suggestion {
    /// Short id: "checkpointing", "bf16-amp", "fused-adamw", "smaller-batch", "sdpa".
    pub id: &'static str,
    /// What to change, in words.
    pub change: String,
    pub peak_allocated_bytes: u64,
    pub device_total_bytes: u64,
    /// Device total saved (current minus new); only positive savings are suggested.
    pub saving_bytes: u64,
    /// Whether the changed setup fits the device.
    pub fits: bool,
    /// The changed setup, for "apply".
    #[serde(skip)]
    pub setup: Setup,
}

/// Every applicable change that lowers the device total, largest saving first.
///
/// # Errors
/// An invalid setup.
pub fn suggestions(setup: &Setup) -> Result<Vec<Suggestion>, Error> {
    let base = crate::estimate(setup)?;
    let budget = setup.device.memory_bytes;
    let mut candidates: Vec<(&'static str, String, Setup)> = Vec::new();
    let t = &setup.train;
    if !t.checkpointing {
        let mut s = setup.clone();
        s.train.checkpointing = true;
        candidates.push((
            "checkpointing",
            "turn on activation checkpointing (recompute each block in backward)".into(),
            s,
        ));
    }
    if matches!(t.precision, Precision::Fp32 | Precision::Fp16Amp) && setup.device.sm >= 80 {
        let mut s = setup.clone();
        s.train.precision = Precision::Bf16Amp;
        let what = match t.precision {
            Precision::Fp32 => "train with bf16 autocast instead of fp32",
            _ => "use bf16 autocast instead of fp16 (no GradScaler)",
        };
        candidates.push(("bf16-amp", what.into(), s));
    }
    if t.precision != Precision::Bf16 {
        let mut s = setup.clone();
        s.train.precision = Precision::Bf16;
        candidates.push((
            "bf16",
            "keep weights, grads and optimizer state in bf16 (pure bf16 training)".into(),
            s,
        ));
    }
    if t.optimizer == Optimizer::AdamW {
        let mut s = setup.clone();
        s.train.optimizer = Optimizer::AdamWFused;
        candidates.push((
            "fused-adamw",
            "use fused AdamW (no foreach temporaries)".into(),
            s,
        ));
    }
    if t.batch_size >= 2 {
        let mut s = setup.clone();
        s.train.batch_size = t.batch_size / 2;
        s.train.grad_accum_steps = t.grad_accum_steps.saturating_mul(2);
        candidates.push((
            "smaller-batch",
            format!(
                "batch {} with {} gradient accumulation steps (same tokens per step)",
                s.train.batch_size, s.train.grad_accum_steps
            ),
            s,
        ));
    }
    if !t.zero_grad_set_to_none {
        let mut s = setup.clone();
        s.train.zero_grad_set_to_none = true;
        candidates.push((
            "set-to-none",
            "free .grad between steps: optimizer.zero_grad(set_to_none=True)".into(),
            s,
        ));
    }
    if t.attention == Attention::Manual {
        let mut s = setup.clone();
        s.train.attention = Attention::Sdpa;
        candidates.push((
            "sdpa",
            "use scaled_dot_product_attention (no T x T scores kept)".into(),
            s,
        ));
    }
    let mut out = Vec::new();
    for (id, change, s) in candidates {
        let Ok(r) = crate::estimate(&s) else { continue };
        // Savings under 1 MiB (e.g. GradScaler's two scalars) are not worth a suggestion.
        if r.device_total_bytes + (1 << 20) <= base.device_total_bytes {
            out.push(Suggestion {
                id,
                change,
                peak_allocated_bytes: r.peak_allocated_bytes,
                device_total_bytes: r.device_total_bytes,
                saving_bytes: base.device_total_bytes - r.device_total_bytes,
                fits: budget > 0 && r.device_total_bytes <= budget,
                setup: s,
            });
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.saving_bytes));
    Ok(out)
}

/// The largest batch size (up to 4096) and block size (up to 131072, powers of two steps not required) whose
/// predicted device total fits the device memory; `None` where even 1 does not fit or no memory is given.
///
/// # Errors
/// An invalid setup.
pub fn largest_that_fit(setup: &Setup) -> Result<(Option<u64>, Option<u64>), Error> {
    let budget = setup.device.memory_bytes;
    if budget == 0 {
        return Ok((None, None));
    }
    let batch = largest_fitting(setup, Axis::BatchSize, budget, 4096)?;
    let block = largest_fitting(setup, Axis::BlockSize, budget, 131_072)?;
    Ok((batch, block))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    #[test]
    fn founding_case_suggestions_are_real_savings() {
        let s = presets::founding();
        let base = crate::estimate(&s).unwrap();
        let sug = suggestions(&s).unwrap();
        assert!(!sug.is_empty());
        for x in &sug {
            assert_eq!(
                x.saving_bytes,
                base.device_total_bytes - x.device_total_bytes,
                "{}",
                x.id
            );
            assert!(x.saving_bytes > 0);
        }
        // Halving the batch halves the B x T x vocab buffers that dominate this case: the biggest saving.
        assert_eq!(sug[0].id, "smaller-batch");
    }

    #[test]
    fn largest_batch_that_fits_is_the_boundary() {
        let s = presets::founding();
        let (batch, block) = largest_that_fit(&s).unwrap();
        let b = batch.unwrap();
        let fits = |v: u64| {
            crate::estimate(&Axis::BatchSize.apply(&s, v))
                .unwrap()
                .device_total_bytes
                <= s.device.memory_bytes
        };
        assert!(fits(b) && !fits(b + 1), "batch {b}");
        assert!(block.is_some());
    }
}
