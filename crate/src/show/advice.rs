//! "How to make it fit": each change a person can make, estimated by the core, with what it saves; and the
//! largest batch and block that fit the device.

use crate::error::Error;
use crate::estimates::Estimates;
use crate::model::{alloc_conf_string, Setup};
use crate::policy::{Attention, Optimizer, Precision};
use crate::report::{fmt_bytes, Report};
use crate::sweep::{largest_fitting_with, Axis};
use serde::Serialize;

/// One suggested change and its effect.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Suggestion {
    /// Short id: "checkpointing", "bf16-amp", "fused-adamw", "smaller-batch", "sdpa", "expandable-segments".
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
    suggestions_with(&mut Estimates::new(), setup)
}

/// [`suggestions`], their estimates shared through `known`. Only the peaks and the device total of each are
/// read, never the per-block figure (which a setup that simulates always has).
///
/// # Errors
/// As [`suggestions`].
pub fn suggestions_with(known: &mut Estimates, setup: &Setup) -> Result<Vec<Suggestion>, Error> {
    let base = known.report(setup)?;
    let (base_allocated, base_reserved, base_total) = (
        base.peak_allocated_bytes,
        base.peak_reserved_bytes,
        base.device_total_bytes,
    );
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
    if !t.compile {
        let mut s = setup.clone();
        s.train.compile = true;
        candidates.push((
            "compile",
            "compile the model: model = torch.compile(model) (fused loss, fewer saved tensors)"
                .into(),
            s,
        ));
    }
    // Fragmentation: the caching allocator holds much more than is live at the peak. Expandable segments map
    // pages into one growing segment per pool instead of caching whole segments of fixed sizes.
    let fragmentation = base_reserved.saturating_sub(base_allocated);
    if !t.alloc_conf.expandable_segments
        && fragmentation >= fragmentation_worth_advice(base_allocated)
    {
        let mut s = setup.clone();
        s.train.alloc_conf.expandable_segments = true;
        candidates.push((
            "expandable-segments",
            format!(
                "set PYTORCH_CUDA_ALLOC_CONF={} (the caching allocator holds {} more than is allocated at the \
                 peak)",
                alloc_conf_string(&s.train.alloc_conf),
                fmt_bytes(fragmentation)
            ),
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
    // Fine-tuning: peft's LoRA (r 16 on every Linear, `finetune::Method::Lora`) freezes the base, loaded in the
    // precision's 2-byte dtype: no gradient and no optimizer state for it. Families, precisions or compile LoRA
    // is not modelled for are refused by the estimate and not offered. QLoRA is in `methods`' comparison.
    if t.lora.is_none() {
        let s = crate::finetune::Method::Lora.apply(setup);
        let base = s.train.base_dtype.map_or("fp32", |d| d.name());
        candidates.push((
            "lora",
            format!(
                "fine-tune with LoRA (peft, r 16 on every Linear): the base frozen in {base}, no gradients or \
                 optimizer state for it"
            ),
            s,
        ));
    }
    let mut out = Vec::new();
    for (id, change, s) in candidates {
        let Ok(r) = known.report(&s) else { continue };
        // Savings under 1 MiB (e.g. GradScaler's two scalars) are not worth a suggestion.
        if r.device_total_bytes + (1 << 20) <= base_total {
            out.push(Suggestion {
                id,
                change,
                peak_allocated_bytes: r.peak_allocated_bytes,
                device_total_bytes: r.device_total_bytes,
                saving_bytes: base_total - r.device_total_bytes,
                fits: budget > 0 && r.device_total_bytes <= budget,
                setup: s,
            });
        }
    }
    crate::report::sort_descending(&mut out, |s| s.saving_bytes);
    Ok(out)
}

/// Reserved memory above allocated at the peak from which fragmentation is worth a suggestion: a twentieth of
/// what is allocated, and at least one 20 MiB large-pool segment.
fn fragmentation_worth_advice(peak_allocated_bytes: u64) -> u64 {
    (peak_allocated_bytes / 20).max(crate::allocator::LARGE_BUFFER)
}

/// The same setup estimated eager and under `torch.compile`, side by side.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompileComparison {
    pub eager_peak_bytes: u64,
    pub compiled_peak_bytes: u64,
    /// The component where compiling saves most (eager minus compiled, each at its own peak), and how much.
    pub largest_saving: (&'static str, i64),
    /// One sentence for the page, e.g. "torch.compile saves 2.30 GiB here (5.65 GiB -> 3.35 GiB), mostly in the
    /// logits (1.15 GiB)."
    pub sentence: String,
}

/// Eager vs compiled for the setup, given its own estimate (`current`, from [`crate::estimate`]): only the other
/// mode is estimated. `None` where the other mode is not modelled.
///
/// # Errors
/// An invalid setup.
pub fn compile_comparison(
    setup: &Setup,
    current: &Report,
) -> Result<Option<CompileComparison>, Error> {
    compile_comparison_with(&mut Estimates::new(), setup, current)
}

/// [`compile_comparison`], the other mode's estimate shared through `known`.
///
/// # Errors
/// As [`compile_comparison`].
pub fn compile_comparison_with(
    known: &mut Estimates,
    setup: &Setup,
    current: &Report,
) -> Result<Option<CompileComparison>, Error> {
    let mut other = setup.clone();
    other.train.compile = !setup.train.compile;
    let other = match known.report(&other) {
        Ok(r) => r,
        Err(Error::NotModelled { .. }) if !setup.train.compile => return Ok(None),
        Err(e) => return Err(e),
    };
    let (e, c) = if setup.train.compile {
        (other, current)
    } else {
        (current, other)
    };
    let ce = c.components.items();
    // One pass: each component's saving and the largest (a sort or collect here would each be one more
    // generic instantiated in the wasm).
    let mut largest_saving = ("weights", i64::MIN);
    // And the component that grows most (compiled minus eager), which a peak in another phase can make large: a
    // compiled Llama's peak in the backward holds its .grad, the eager one's at the loss did not yet.
    let mut largest_growth = ("weights", 0_i64);
    for (name, bytes, _) in e.components.items() {
        let compiled_bytes = ce.iter().find(|x| x.0 == name).map_or(0, |x| x.1);
        let saving = bytes as i64 - compiled_bytes as i64;
        if saving > largest_saving.1 {
            largest_saving = (name, saving);
        }
        if -saving > largest_growth.1 {
            largest_growth = (name, -saving);
        }
    }
    let diff = e.peak_allocated_bytes as i64 - c.peak_allocated_bytes as i64;
    let both = format!(
        "eager {} -> compiled {}",
        fmt_bytes(e.peak_allocated_bytes),
        fmt_bytes(c.peak_allocated_bytes)
    );
    // "Mostly in" the largest saving only where nothing else grows by more than a tenth of the total: Llama-3.1-8B
    // was "saves 1.79 GiB here, mostly in the activations (14.8 GiB)", its grads 29.9 GiB larger unsaid.
    let sentence = if diff > 0 && largest_growth.1 <= diff / 10 {
        format!(
            "torch.compile saves {} here ({both}), mostly in the {} ({}).",
            fmt_bytes(diff as u64),
            largest_saving.0,
            fmt_bytes(largest_saving.1.unsigned_abs())
        )
    } else if diff > 0 {
        format!(
            "torch.compile saves {} here ({both}): at the two peaks, {} less in the {} and {} more in the {}.",
            fmt_bytes(diff as u64),
            fmt_bytes(largest_saving.1.unsigned_abs()),
            largest_saving.0,
            fmt_bytes(largest_growth.1.unsigned_abs()),
            largest_growth.0
        )
    } else {
        format!("torch.compile does not lower the peak here ({both}).")
    };
    Ok(Some(CompileComparison {
        eager_peak_bytes: e.peak_allocated_bytes,
        compiled_peak_bytes: c.peak_allocated_bytes,
        largest_saving,
        sentence,
    }))
}

/// The largest batch [`largest_that_fit`] tries (as `methods` does); a batch found there may not be the largest
/// that fits.
pub const LARGEST_BATCH_TRIED: u64 = crate::methods::MAX_BATCH_SEARCHED;
/// The largest block size [`largest_that_fit`] tries.
pub const LARGEST_BLOCK_TRIED: u64 = 131_072;

/// A largest value that fits as a person reads it: "12"; "4096 or more" where the search stopped at its limit
/// (`tried`), since more may fit; "none: even 1 does not fit"; "choose a GPU to see this" without a memory.
pub fn largest_text(value: Option<u64>, tried: u64, memory_bytes: u64) -> String {
    match (value, memory_bytes) {
        (_, 0) => "choose a GPU to see this".to_string(),
        (Some(v), _) if v >= tried => format!("{v} or more (the search stops there)"),
        (Some(v), _) => v.to_string(),
        (None, _) => "none: even 1 does not fit".to_string(),
    }
}

/// The largest batch size (up to 4096) and block size (up to 131072, powers of two steps not required) whose
/// predicted device total fits the device memory; `None` where even 1 does not fit or no memory is given.
///
/// # Errors
/// An invalid setup.
pub fn largest_that_fit(setup: &Setup) -> Result<(Option<u64>, Option<u64>), Error> {
    largest_that_fit_with(&mut Estimates::new(), setup)
}

/// [`largest_that_fit`], its estimates shared through `known`.
///
/// # Errors
/// As [`largest_that_fit`].
pub fn largest_that_fit_with(
    known: &mut Estimates,
    setup: &Setup,
) -> Result<(Option<u64>, Option<u64>), Error> {
    let budget = setup.device.memory_bytes;
    if budget == 0 {
        return Ok((None, None));
    }
    let batch = largest_fitting_with(known, setup, Axis::BatchSize, budget, LARGEST_BATCH_TRIED)?;
    let block = largest_fitting_with(known, setup, Axis::BlockSize, budget, LARGEST_BLOCK_TRIED)?;
    Ok((batch, block))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    /// Full fine-tuning of a Llama: LoRA is offered with what it saves: at least the base's AdamW state (8 bytes
    /// per parameter, alive at every steady-state peak; the base is loaded in bf16, so there is no fp32 weight
    /// and no autocast copy of it to set against that); nanoGPT's gpt2, which LoRA is not modelled for, is not offered
    /// it, nor is a setup that already has it.
    /// Shakespeare-char on an MI300X (192 GiB) fits every batch tried: the page said "Largest batch that fits:
    /// 4096", the search's limit, as if 4097 did not.
    #[test]
    fn a_largest_batch_at_the_search_limit_says_more_may_fit() {
        let mut s = presets::model_preset("shakespeare-char").unwrap();
        s.device = presets::gpu("mi300x").unwrap().device();
        let (batch, _) = largest_that_fit(&s).unwrap();
        assert_eq!(batch, Some(LARGEST_BATCH_TRIED));
        let mem = s.device.memory_bytes;
        assert_eq!(
            largest_text(batch, LARGEST_BATCH_TRIED, mem),
            "4096 or more (the search stops there)"
        );
        assert_eq!(largest_text(Some(49), LARGEST_BATCH_TRIED, mem), "49");
        assert_eq!(
            largest_text(None, LARGEST_BATCH_TRIED, mem),
            "none: even 1 does not fit"
        );
        assert_eq!(
            largest_text(Some(49), LARGEST_BATCH_TRIED, 0),
            "choose a GPU to see this"
        );
    }

    #[test]
    fn lora_is_suggested_where_it_is_modelled() {
        let s = presets::model_preset("llama-3.2-1b").unwrap();
        let n = s.model.n_params();
        let sug = suggestions(&s).unwrap();
        let lora = sug.iter().find(|x| x.id == "lora").expect("LoRA suggested");
        assert!(
            lora.saving_bytes > 6 * n,
            "{} for {n} parameters",
            lora.saving_bytes
        );
        assert_eq!(lora.setup.train.lora.as_ref().map(|l| l.r), Some(16));
        assert_eq!(
            lora.setup.train.base_dtype,
            Some(crate::finetune::BaseDtype::Bf16)
        );
        assert!(suggestions(&lora.setup)
            .unwrap()
            .iter()
            .all(|x| x.id != "lora"));
        assert!(suggestions(&presets::founding())
            .unwrap()
            .iter()
            .all(|x| x.id != "lora"));
    }

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
        // The founding case is compiled; run eager, compiling is suggested: it drops the log-softmax and the
        // fp32 copy of the logits (eager 12 bytes per logit at the peak, compiled 8: fp16 logits + fp32 loss
        // gradient + its fp16 copy).
        assert!(s.train.compile && sug.iter().all(|x| x.id != "compile"));
        let mut eager = s.clone();
        eager.train.compile = false;
        let sug = suggestions(&eager).unwrap();
        let compile = sug
            .iter()
            .find(|x| x.id == "compile")
            .expect("compile suggested");
        assert!(compile.saving_bytes > 1 << 30, "{}", compile.saving_bytes);
    }

    /// The founding case on a 12 GiB RTX 4070: the compiled step's caching allocator holds hundreds of MiB more
    /// than is live at the peak, and expandable segments give most of it back; the eager step's pattern does not
    /// gain from them, so nothing is suggested there. Once set, it is not suggested again.
    #[test]
    fn expandable_segments_are_suggested_where_they_save() {
        let mut s = presets::founding();
        let gpu = presets::gpu("rtx-4070").unwrap();
        s.device = gpu.device();
        let base = crate::estimate(&s).unwrap();
        assert!(
            base.peak_reserved_bytes - base.peak_allocated_bytes > base.peak_allocated_bytes / 20
        );
        let sug = suggestions(&s).unwrap();
        let x = sug
            .iter()
            .find(|x| x.id == "expandable-segments")
            .expect("expandable segments suggested");
        let mut with = s.clone();
        with.train.alloc_conf.expandable_segments = true;
        let r = crate::estimate(&with).unwrap();
        assert_eq!(x.setup, with);
        assert_eq!(
            x.saving_bytes,
            base.device_total_bytes - r.device_total_bytes
        );
        assert!(x.saving_bytes > 100 << 20, "{}", x.saving_bytes);
        assert!(
            x.change
                .starts_with("set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the caching allocator holds "),
            "{}",
            x.change
        );
        // Other knobs already set are kept in the suggested variable.
        let mut split = s.clone();
        split.train.alloc_conf.max_split_size = Some(512 << 20);
        if let Some(x) = suggestions(&split)
            .unwrap()
            .into_iter()
            .find(|x| x.id == "expandable-segments")
        {
            assert!(x.change.starts_with(
                "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True,max_split_size_mb:512 "
            ));
        }
        assert!(suggestions(&with)
            .unwrap()
            .iter()
            .all(|x| x.id != "expandable-segments"));
        let mut eager = s.clone();
        eager.train.compile = false;
        let mut eager_with = eager.clone();
        eager_with.train.alloc_conf.expandable_segments = true;
        assert!(
            crate::estimate(&eager_with).unwrap().device_total_bytes
                >= crate::estimate(&eager).unwrap().device_total_bytes
        );
        assert!(suggestions(&eager)
            .unwrap()
            .iter()
            .all(|x| x.id != "expandable-segments"));
    }

    #[test]
    fn compile_comparison_names_the_logits_for_the_founding_case() {
        let s = presets::founding();
        let compare = |s: &Setup| compile_comparison(s, &crate::estimate(s).unwrap()).unwrap();
        let c = compare(&s).unwrap();
        assert_eq!(
            c.compiled_peak_bytes,
            crate::estimate(&s).unwrap().peak_allocated_bytes
        );
        let mut eager = s.clone();
        eager.train.compile = false;
        assert_eq!(
            c.eager_peak_bytes,
            crate::estimate(&eager).unwrap().peak_allocated_bytes
        );
        assert_eq!(compare(&eager).unwrap(), c);
        assert!(c.compiled_peak_bytes < c.eager_peak_bytes);
        // The B x T x vocab buffers: eager holds fp16 logits, fp16 log-softmax, nll_loss's fp32 copy and its fp32
        // gradient (12 B per logit); compiled holds 6 B per logit: the fp16 logits, the zeros the autograd engine
        // makes for their unused gradient and the fused loss's fp16 gradient (issue 11: with Inductor's pattern
        // passes on there is no fp32 one). 6 B x 8192 x 50304 = 2.30 GiB.
        let n_logits = 16 * 512 * 50304_i64;
        assert_eq!(c.largest_saving.0, "logits");
        // Compiled also keeps the fused loss's two fp32 per-row statistics (2 x 8192 x 4 B) in the logits.
        assert_eq!(c.largest_saving.1, 6 * n_logits - 2 * 8192 * 4);
        // No other component saves as much.
        let (e, k) = (
            crate::estimate(&eager).unwrap().components,
            crate::estimate(&s).unwrap().components,
        );
        let others = [
            e.weights_bytes as i64 - k.weights_bytes as i64,
            e.activations_bytes as i64 - k.activations_bytes as i64,
            e.weight_copies_bytes as i64 - k.weight_copies_bytes as i64,
            e.temporary_bytes as i64 - k.temporary_bytes as i64,
        ];
        assert!(others.iter().all(|x| *x < c.largest_saving.1), "{others:?}");
        assert!(
            c.sentence.starts_with("torch.compile saves"),
            "{}",
            c.sentence
        );
        assert!(
            c.sentence.contains("mostly in the logits"),
            "{}",
            c.sentence
        );
        // With checkpointing too (compiled, each block is recomputed in the backward graph), both families.
        let mut l = s.clone();
        l.model = presets::model_preset("tinyllama-1.1b").unwrap().model;
        l.train.seq_len = 512;
        l.train.compile = false;
        assert!(compare(&l).is_some());
        l.train.checkpointing = true;
        assert!(compare(&l).is_some());
        let mut g = s.clone();
        g.train.checkpointing = true;
        assert!(compare(&g).is_some());
    }

    /// The audit: Llama-3.1-8B's comparison said "torch.compile saves 1.79 GiB here (eager 121 GiB -> compiled
    /// 120 GiB), mostly in the activations (14.8 GiB)": eager peaks at the loss with 14.8 GiB of saved activations,
    /// compiled in the backward with 29.9 GiB of .grad, so no 14.8 GiB saving makes up 1.79. Where a component
    /// grows by more than a tenth of the total saving, the sentence names both changes.
    #[test]
    fn compile_comparison_names_what_grows_where_the_peaks_differ() {
        let s = presets::model_preset("llama-3.1-8b").unwrap();
        assert!(!s.train.compile);
        let (e, c) = {
            let mut c = s.clone();
            c.train.compile = true;
            (crate::estimate(&s).unwrap(), crate::estimate(&c).unwrap())
        };
        let cmp = compile_comparison(&s, &e).unwrap().unwrap();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        // Eager's activations at its peak, none of them at compiled's; compiled's .grad, none at eager's.
        let activations = e.components.activations_bytes - c.components.activations_bytes;
        let grads = c.components.grads_bytes - e.components.grads_bytes;
        assert!(
            gib(activations) > 14.0 && gib(grads) > 29.0,
            "{activations} {grads}"
        );
        assert_eq!(cmp.largest_saving, ("activations", activations as i64));
        assert_eq!(
            cmp.sentence,
            format!(
                "torch.compile saves {} here (eager {} -> compiled {}): at the two peaks, {} less in the \
                 activations and {} more in the grads.",
                fmt_bytes(e.peak_allocated_bytes - c.peak_allocated_bytes),
                fmt_bytes(e.peak_allocated_bytes),
                fmt_bytes(c.peak_allocated_bytes),
                fmt_bytes(activations),
                fmt_bytes(grads)
            )
        );
        // Every preset: "mostly in" only where its figure is within the saving and what grows is small beside it.
        for id in presets::MODEL_IDS {
            let s = presets::model_preset(id).unwrap();
            let Ok(r) = crate::estimate(&s) else { continue };
            let Some(cmp) = compile_comparison(&s, &r).unwrap() else {
                continue;
            };
            let diff = cmp.eager_peak_bytes as i64 - cmp.compiled_peak_bytes as i64;
            if cmp.sentence.contains("mostly in") {
                assert!(
                    cmp.largest_saving.1 <= diff + diff / 10,
                    "{id}: {}",
                    cmp.sentence
                );
            }
        }
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
