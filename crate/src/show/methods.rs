//! Full fine-tuning, LoRA and QLoRA side by side for one model on one GPU (issue 13): each recipe
//! (`finetune::Method::apply`) estimated at the setup's batch, whether it fits, the largest batch that fits, and
//! the advice: which of them to run. The preference is the order people trade quality and speed for memory:
//! full fine-tuning where it fits, else LoRA (a frozen 2-byte base), else QLoRA (a 4-bit base, checkpointed,
//! slower), each at the setup's batch; where none fits that batch, the recipe with the largest batch that fits.

use crate::error::Error;
use crate::estimates::Estimates;
use crate::finetune::{trainable_params, Method};
use crate::model::Setup;
use crate::report::{fmt_memory, fmt_within};
use crate::sweep::{largest_fitting_with, largest_in, Axis};

/// The largest batch searched for each recipe (the advice's limit for the batch, `advice::largest_that_fit`).
pub const MAX_BATCH_SEARCHED: u64 = 4096;

/// One recipe's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub method: Method,
    /// The setup turned into this recipe.
    pub setup: Setup,
    /// Why it is not estimated (a family LoRA is not modelled for, a precision QLoRA was not measured under).
    pub error: Option<String>,
    pub peak_allocated_bytes: u64,
    /// Reserved plus the CUDA context: what the verdict compares with the GPU's memory.
    pub device_total_bytes: u64,
    /// Parameters with a gradient and optimizer state.
    pub trainable_params: u64,
    /// At the setup's batch; `None` without a GPU's memory.
    pub fits: Option<bool>,
    /// The largest batch that fits (up to [`MAX_BATCH_SEARCHED`]); `None` where batch 1 does not, or without a
    /// GPU's memory.
    pub largest_batch: Option<u64>,
}

/// The three recipes and the advice.
#[derive(Debug, Clone, PartialEq)]
pub struct Methods {
    pub rows: Vec<Row>,
    /// Which recipe to run, and why, in one sentence.
    pub advice: String,
    /// The advised setup where it differs from the current one.
    pub advised: Option<Setup>,
}

/// The three recipes for `setup` (see the module's documentation).
///
/// # Errors
/// None of a recipe's own (those are its row's `error`); only an invalid `setup`.
pub fn compare(setup: &Setup) -> Result<Methods, Error> {
    compare_with(&mut Estimates::new(), setup)
}

/// [`compare`], its estimates shared through `known`.
///
/// # Errors
/// As [`compare`].
pub fn compare_with(known: &mut Estimates, setup: &Setup) -> Result<Methods, Error> {
    setup.validate()?;
    let budget = setup.device.memory_bytes;
    let mut rows = Vec::new();
    for method in Method::ALL {
        let s = method.apply(setup);
        let trainable = match &s.train.lora {
            Some(l) => trainable_params(&s.model, l),
            None => s.model.n_params(),
        };
        let mut row = Row {
            method,
            setup: s.clone(),
            error: None,
            peak_allocated_bytes: 0,
            device_total_bytes: 0,
            trainable_params: trainable,
            fits: None,
            largest_batch: None,
        };
        match known.report(&s) {
            Err(e) => row.error = Some(e.to_string()),
            Ok(r) => {
                row.peak_allocated_bytes = r.peak_allocated_bytes;
                row.device_total_bytes = r.device_total_bytes;
                if budget > 0 {
                    row.fits = r.fits;
                    row.largest_batch = largest_fitting_with(
                        known,
                        &s,
                        Axis::BatchSize,
                        budget,
                        MAX_BATCH_SEARCHED,
                    )?;
                }
            }
        }
        rows.push(row);
    }
    let (advice, advised) = advise(known, setup, &rows)?;
    Ok(Methods {
        rows,
        advice,
        advised,
    })
}

/// A recipe's row in a few words, so that two rows of one name say how they differ (the QLoRA row of a setup
/// that quantizes without double quantization, and the recipe's own QLoRA, which double-quantizes): "every
/// parameter", "r 16, bf16 base", "r 16, 4-bit NF4 with double quantization base, checkpointed".
pub fn recipe_detail(s: &Setup) -> String {
    let Some(l) = &s.train.lora else {
        return "every parameter".into();
    };
    let base = match (s.train.quantization, s.train.base_dtype) {
        (Some(q), _) => q.describe(),
        (None, Some(d)) => d.name().to_string(),
        // `TrainConfig::base_dtype`: none is the precision's own parameter dtype.
        (None, None) if s.train.precision == crate::policy::Precision::Bf16 => "bf16".into(),
        (None, None) => "fp32".into(),
    };
    let checkpointed = if s.train.checkpointing {
        ", checkpointed"
    } else {
        ""
    };
    format!("r {}, {base} base{checkpointed}", l.r)
}

/// What people call each recipe in a sentence.
pub fn label(m: Method) -> &'static str {
    match m {
        Method::Full => "full fine-tuning",
        Method::Lora => "LoRA",
        Method::Qlora => "QLoRA",
    }
}

fn advise(
    known: &mut Estimates,
    setup: &Setup,
    rows: &[Row],
) -> Result<(String, Option<Setup>), Error> {
    let current = Method::of(setup);
    let batch = setup.train.batch_size;
    if setup.device.memory_bytes == 0 {
        return Ok(("Choose a GPU to see which of them fits.".into(), None));
    }
    let gpu = fmt_memory(setup.device.memory_bytes);
    let modelled: Vec<&Row> = rows.iter().filter(|r| r.error.is_none()).collect();
    if let Some(r) = modelled.iter().find(|r| r.fits == Some(true)) {
        let mut text = format!(
            "{} fits in {gpu} at batch {batch} ({} on the device{}).",
            capitalised(label(r.method)),
            fmt_within(r.device_total_bytes, setup.device.memory_bytes),
            r.largest_batch
                .map(|b| format!(", batch up to {b}"))
                .unwrap_or_default()
        );
        let others: Vec<String> = modelled
            .iter()
            .filter(|o| o.method != r.method && o.fits == Some(true))
            .map(|o| label(o.method).to_string())
            .collect();
        if !others.is_empty() {
            let verb = if others.len() == 1 { "does" } else { "do" };
            text.push_str(&format!(" So {verb} {}.", others.join(" and ")));
        }
        let advised = (r.method != current).then(|| r.setup.clone());
        return Ok((text, advised));
    }
    // None fits at this batch: the recipe with the largest batch that fits, at that batch.
    let best = modelled
        .iter()
        .filter_map(|r| r.largest_batch.map(|b| (r, b)))
        .max_by_key(|(_, b)| *b);
    Ok(match best {
        Some((r, b)) => {
            let mut s = r.setup.clone();
            s.train.batch_size = b;
            (
                format!(
                    "None of them fits in {gpu} at batch {batch}; {} does at batch {b}.",
                    label(r.method)
                ),
                Some(s),
            )
        }
        None if modelled.is_empty() => (
            "Fine-tuning recipes are not modelled for this setup (see each row).".into(),
            None,
        ),
        None => {
            let names = modelled
                .iter()
                .map(|r| label(r.method))
                .collect::<Vec<_>>()
                .join(", ");
            // The recipe that needs least, at batch 1 with the longest sequence that fits (bisection: memory
            // grows with the sequence).
            let least = modelled.iter().min_by_key(|r| r.device_total_bytes);
            match least.map(|r| longest_sequence_that_fits(known, &r.setup)).transpose()?.flatten() {
                Some(s) => (
                    format!(
                        "None of {names} fits in {gpu}, even at batch 1; {} does at batch 1 with sequences of up \
                         to {} tokens (of {}).",
                        label(Method::of(&s)),
                        s.train.seq_len,
                        setup.train.seq_len
                    ),
                    Some(s),
                ),
                None => (
                    format!(
                        "None of {names} fits in {gpu}, even at batch 1 with the shortest sequence: a larger GPU \
                         or several GPUs."
                    ),
                    None,
                ),
            }
        }
    })
}

/// `setup` at batch 1 with the longest sequence (up to its own) that fits its device, if any does.
fn longest_sequence_that_fits(
    known: &mut Estimates,
    setup: &Setup,
) -> Result<Option<Setup>, Error> {
    let at = |t: u64| {
        let mut s = setup.clone();
        s.train.batch_size = 1;
        s.train.seq_len = t;
        s
    };
    let budget = setup.device.memory_bytes;
    Ok(largest_in(setup.train.seq_len, |t| known.fits(&at(t), budget))?.map(at))
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    fn on(model: &str, gpu: &str) -> Setup {
        let mut s = presets::model_preset(model).unwrap();
        let g = presets::GPU_PRESETS.iter().find(|g| g.id == gpu).unwrap();
        s.device = g.device();
        s
    }

    /// Llama-3.1-8B at batch 1 x 2048 on a 24 GB card: full fine-tuning (about 16 bytes per parameter) and LoRA
    /// over a bf16 base (16 GB of weights and autocast's copies) do not fit, QLoRA does; the advice names it and
    /// its largest batch. Each row is the plain estimate of its recipe, and the largest batch is the last that
    /// fits: one more does not.
    #[test]
    fn an_8b_model_on_a_24_gb_card_takes_qlora() {
        let mut s = on("llama-3.1-8b", "rtx-4090");
        s.train.batch_size = 1;
        s.train.seq_len = 2048;
        let m = compare(&s).unwrap();
        assert_eq!(
            m.rows.iter().map(|r| r.method).collect::<Vec<_>>(),
            Method::ALL.to_vec()
        );
        for r in &m.rows {
            let e = crate::estimate(&r.setup).unwrap();
            assert_eq!(r.device_total_bytes, e.device_total_bytes);
            assert_eq!(r.fits, e.fits);
        }
        let fits: Vec<_> = m.rows.iter().map(|r| r.fits).collect();
        assert_eq!(fits, [Some(false), Some(false), Some(true)]);
        let q = &m.rows[2];
        let b = q.largest_batch.unwrap();
        let at = |batch: u64| {
            let mut t = q.setup.clone();
            t.train.batch_size = batch;
            crate::estimate(&t).unwrap().fits
        };
        assert_eq!((at(b), at(b + 1)), (Some(true), Some(false)));
        assert!(
            m.advice.starts_with(&format!(
                "QLoRA fits in 23.98 GiB at batch 1 ({} on the device, batch up to {b}).",
                crate::report::fmt_within(q.device_total_bytes, s.device.memory_bytes)
            )),
            "{}",
            m.advice
        );
        assert_eq!(m.advised.as_ref(), Some(&q.setup));
        // Trainable parameters: every one for full fine-tuning, the adapters for the other two.
        assert_eq!(m.rows[0].trainable_params, s.model.n_params());
        assert_eq!(m.rows[1].trainable_params, m.rows[2].trainable_params);
        assert!(m.rows[1].trainable_params < s.model.n_params() / 100);
    }

    /// A small model fits every way: full fine-tuning is advised, LoRA and QLoRA named beside it; on a setup
    /// that is full fine-tuning already nothing changes. nanoGPT's GPT, which LoRA is not modelled for, gets the
    /// reason in its rows.
    #[test]
    fn a_small_model_keeps_full_fine_tuning_and_unmodelled_rows_say_why() {
        let mut s = on("llama-3.2-1b", "h100-80");
        s.train.batch_size = 1;
        s.train.seq_len = 512;
        let m = compare(&s).unwrap();
        assert!(m.rows.iter().all(|r| r.fits == Some(true)));
        assert!(
            m.advice.starts_with(&format!(
                "Full fine-tuning fits in {} at batch 1",
                fmt_memory(s.device.memory_bytes)
            )) && m.advice.ends_with("So do LoRA and QLoRA."),
            "{}",
            m.advice
        );
        assert_eq!(m.advised, None);
        let g = compare(&presets::founding()).unwrap();
        assert_eq!(g.rows[0].error, None);
        for r in &g.rows[1..] {
            assert!(
                r.error
                    .as_deref()
                    .unwrap_or("")
                    .contains("LoRA is modelled for"),
                "{:?}",
                r.error
            );
        }
    }

    /// The audit: the QLoRA row read 6.44 GiB on a QLoRA setup without double quantization and 6.40 GiB once
    /// another row was current, with nothing to say they were two recipes. Each row says its own.
    #[test]
    fn each_row_says_which_recipe_it_is() {
        let mut s = on("llama-3.2-1b", "rtx-4090");
        s.train.batch_size = 1;
        s.train.seq_len = 512;
        let q = Method::Qlora.apply(&s);
        let mut nf4 = q.clone();
        nf4.train.quantization = Some(crate::finetune::Quantization::Nf4 {
            double_quant: false,
        });
        let own = compare(&nf4).unwrap();
        let details: Vec<String> = own.rows.iter().map(|r| recipe_detail(&r.setup)).collect();
        assert_eq!(
            details,
            [
                "every parameter",
                "r 16, bf16 base, checkpointed",
                "r 16, 4-bit NF4 base, checkpointed"
            ]
        );
        // From the LoRA row, the QLoRA row is the recipe's own: double quantization, fewer bytes.
        let from_lora = compare(&Method::Lora.apply(&nf4)).unwrap();
        assert_eq!(
            recipe_detail(&from_lora.rows[2].setup),
            "r 16, 4-bit NF4 with double quantization base, checkpointed"
        );
        assert!(from_lora.rows[2].device_total_bytes < own.rows[2].device_total_bytes);
    }

    /// No recipe fits at the setup's batch: the advice is the recipe with the largest batch that fits, at it.
    #[test]
    fn where_none_fits_the_batch_the_largest_batch_is_advised() {
        let mut s = on("llama-3.1-8b", "rtx-4090");
        s.train.batch_size = 64;
        s.train.seq_len = 2048;
        let m = compare(&s).unwrap();
        assert!(m.rows.iter().all(|r| r.fits == Some(false)));
        let q = &m.rows[2];
        let b = q.largest_batch.unwrap();
        assert!(b < 64);
        assert_eq!(
            m.advice,
            format!("None of them fits in 23.98 GiB at batch 64; QLoRA does at batch {b}.")
        );
        assert_eq!(m.advised.as_ref().map(|a| a.train.batch_size), Some(b));
    }

    /// Llama-3.1-8B at batch 1 x 2048 on a 12 GB card: no recipe fits even at batch 1; the advice is the recipe
    /// that needs least (QLoRA) with the longest sequence that fits: that one fits, one token more does not.
    #[test]
    fn where_none_fits_batch_1_the_longest_sequence_is_advised() {
        let mut s = on("llama-3.1-8b", "rtx-4070");
        s.train.batch_size = 1;
        s.train.seq_len = 2048;
        let m = compare(&s).unwrap();
        assert!(m.rows.iter().all(|r| r.largest_batch.is_none()));
        let a = m.advised.expect("a shorter sequence is advised");
        assert_eq!(Method::of(&a), Method::Qlora);
        assert_eq!(a.train.batch_size, 1);
        let t = a.train.seq_len;
        assert!(t > 1 && t < 2048, "{t}");
        let fits = |t: u64| {
            let mut x = a.clone();
            x.train.seq_len = t;
            crate::estimate(&x).unwrap().fits
        };
        assert_eq!((fits(t), fits(t + 1)), (Some(true), Some(false)));
        assert_eq!(
            m.advice,
            format!(
                "None of full fine-tuning, LoRA, QLoRA fits in 11.99 GiB, even at batch 1; QLoRA does at batch 1 \
                 with sequences of up to {t} tokens (of 2048)."
            )
        );
    }
}
