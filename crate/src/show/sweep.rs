//! Memory over a range of batch sizes or block sizes, the fit map over both, and the largest value that fits a
//! device: data only (`plot` draws it).

use crate::error::Error;
use crate::estimates::Estimates;
use crate::model::Setup;
use crate::report::Components;
use serde::Serialize;

/// Which knob a sweep varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    BatchSize,
    /// `block_size` and the sequence length together (training at full context).
    BlockSize,
}

impl Axis {
    pub fn parse(s: &str) -> Result<Axis, Error> {
        match s {
            "batch_size" | "batch" => Ok(Axis::BatchSize),
            "block_size" | "block" => Ok(Axis::BlockSize),
            _ => Err(Error::UnknownValue {
                field: "sweep axis".into(),
                value: s.into(),
                allowed: &["batch_size", "block_size"],
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Axis::BatchSize => "batch_size",
            Axis::BlockSize => "block_size",
        }
    }

    /// The largest value the model takes on this axis: under torch.compile with activation checkpointing a
    /// sliding-window model is estimated only below its window (`Setup::validate`), so a block sweep stops there.
    pub fn limit(self, setup: &Setup) -> u64 {
        match (self, setup.model.sliding_window) {
            (Axis::BlockSize, w) if w > 0 && setup.train.compile && setup.train.checkpointing => {
                w - 1
            }
            _ => u64::MAX,
        }
    }

    pub fn apply(self, setup: &Setup, value: u64) -> Setup {
        let mut s = setup.clone();
        match self {
            Axis::BatchSize => s.train.batch_size = value,
            Axis::BlockSize => {
                s.model.block_size = value;
                s.train.seq_len = value;
            }
        }
        s
    }
}

/// One point of a sweep.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    pub value: u64,
    pub peak_allocated_bytes: u64,
    pub peak_reserved_bytes: u64,
    pub device_total_bytes: u64,
    pub components: Components,
}

/// The six bands a sweep is plotted and exported in, in bytes: weights with a quantized base's weights, LoRA's
/// adapters and autocast's weight copies, grads,
/// optimizer state, activations, logits, temporaries with workspaces and the allocator's block remainders.
pub fn bands(c: &Components) -> [u64; 6] {
    [
        c.weights_bytes + c.quantized_weights_bytes + c.adapters_bytes + c.weight_copies_bytes,
        c.grads_bytes,
        c.optimizer_bytes,
        c.activations_bytes,
        c.logits_bytes,
        c.temporary_bytes + c.workspace_bytes + c.block_remainders_bytes,
    ]
}

/// Which (batch, block) pairs fit: `fits[j][i]` for `blocks[j]`, `batches[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitMap {
    pub batches: Vec<u64>,
    pub blocks: Vec<u64>,
    pub fits: Vec<Vec<bool>>,
}

/// Estimates the setup at each value of `axis`.
///
/// # Errors
/// The first value whose setup is invalid, with the value named.
pub fn sweep(setup: &Setup, axis: Axis, values: &[u64]) -> Result<Vec<Point>, Error> {
    sweep_with(&mut Estimates::new(), setup, axis, values)
}

/// [`sweep`], its estimates shared through `known`.
///
/// # Errors
/// As [`sweep`].
pub fn sweep_with(
    known: &mut Estimates,
    setup: &Setup,
    axis: Axis,
    values: &[u64],
) -> Result<Vec<Point>, Error> {
    values
        .iter()
        .map(|&v| {
            let r = known.report(&axis.apply(setup, v))?;
            Ok(Point {
                value: v,
                peak_allocated_bytes: r.peak_allocated_bytes,
                peak_reserved_bytes: r.peak_reserved_bytes,
                device_total_bytes: r.device_total_bytes,
                components: r.components.clone(),
            })
        })
        .collect()
}

/// Powers of two from `lo` to `hi` inclusive (the usual way people step batch and block sizes).
pub fn powers_of_two(lo: u64, hi: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut x = lo.max(1).next_power_of_two();
    while x <= hi {
        v.push(x);
        match x.checked_mul(2) {
            Some(n) => x = n,
            None => break,
        }
    }
    v
}

/// The largest value of `axis` (up to `limit`) whose predicted device total fits `budget_bytes`, by bisection
/// (memory grows with both knobs). `None` when even 1 does not fit.
///
/// # Errors
/// An invalid setup.
pub fn largest_fitting(
    setup: &Setup,
    axis: Axis,
    budget_bytes: u64,
    limit: u64,
) -> Result<Option<u64>, Error> {
    largest_fitting_with(&mut Estimates::new(), setup, axis, budget_bytes, limit)
}

/// [`largest_fitting`], its estimates shared through `known`.
///
/// # Errors
/// As [`largest_fitting`].
pub fn largest_fitting_with(
    known: &mut Estimates,
    setup: &Setup,
    axis: Axis,
    budget_bytes: u64,
    limit: u64,
) -> Result<Option<u64>, Error> {
    // `crate::fits`: the same verdict as the estimate's device total (tested on every preset), without the
    // per-block figures, and stopping a run once it is over the budget.
    largest_in(limit.min(axis.limit(setup)).max(1), |v| {
        known.fits(&axis.apply(setup, v), budget_bytes)
    })
}

/// The largest value in `1..=hi` for which `fits` holds, given that it holds up to some value and not past it
/// (memory grows with the value); `None` where it fails at 1. By bisection.
///
/// # Errors
/// The first error `fits` returns.
pub fn largest_in(
    hi: u64,
    mut fits: impl FnMut(u64) -> Result<bool, Error>,
) -> Result<Option<u64>, Error> {
    if !fits(1)? {
        return Ok(None);
    }
    let (mut lo, mut hi) = (1u64, hi.max(1));
    if fits(hi)? {
        return Ok(Some(hi));
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

/// Which (batch, block) pairs fit `budget_bytes` of device memory (predicted device total). Memory grows with
/// both knobs, so with both axes ascending the boundary is a staircase: walking the rows in order, each row's
/// last fitting batch is at or before the previous row's, which takes about `batches + blocks` estimates rather
/// than `batches x blocks` (a 64 x 64 map in about 130). Unsorted axes are bisected row by row instead.
///
/// # Errors
/// An invalid setup for some pair (e.g. a block size the model cannot take), naming the value.
pub fn fit_map(
    setup: &Setup,
    batches: &[u64],
    blocks: &[u64],
    budget_bytes: u64,
) -> Result<FitMap, Error> {
    fit_map_with(&mut Estimates::new(), setup, batches, blocks, budget_bytes)
}

/// [`fit_map`], its estimates shared through `known`.
///
/// # Errors
/// As [`fit_map`].
pub fn fit_map_with(
    known: &mut Estimates,
    setup: &Setup,
    batches: &[u64],
    blocks: &[u64],
    budget_bytes: u64,
) -> Result<FitMap, Error> {
    let sorted = |v: &[u64]| v.windows(2).all(|w| w[0] < w[1]);
    let staircase = sorted(batches) && sorted(blocks);
    let mut fits = Vec::with_capacity(blocks.len());
    // Number of fitting batches in the previous row (all of them before the first row).
    let mut n_fit = batches.len();
    for &block in blocks {
        let row_setup = Axis::BlockSize.apply(setup, block);
        let mut fits_at = |i: usize| -> Result<bool, Error> {
            known.fits(&Axis::BatchSize.apply(&row_setup, batches[i]), budget_bytes)
        };
        if staircase {
            while n_fit > 0 && !fits_at(n_fit - 1)? {
                n_fit -= 1;
            }
        } else {
            let (mut lo, mut hi) = (0usize, batches.len());
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if fits_at(mid)? {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            n_fit = lo;
        }
        fits.push((0..batches.len()).map(|i| i < n_fit).collect());
    }
    Ok(FitMap {
        batches: batches.to_vec(),
        blocks: blocks.to_vec(),
        fits,
    })
}

/// A sweep as CSV: the value, the peaks and the six plotted bands, in bytes (weights with autocast's weight
/// copies, temporaries with workspaces, as the plots band them).
pub fn to_csv(axis: Axis, points: &[Point]) -> String {
    let mut out = format!(
        "{},peak_allocated_bytes,peak_reserved_bytes,device_total_bytes,weights_and_copies_bytes,grads_bytes,optimizer_bytes,activations_bytes,logits_bytes,temporary_workspace_and_remainders_bytes\n",
        axis.name()
    );
    for p in points {
        let b = bands(&p.components);
        out += &format!(
            "{},{},{},{},{},{},{},{},{},{}\n",
            p.value,
            p.peak_allocated_bytes,
            p.peak_reserved_bytes,
            p.device_total_bytes,
            b[0],
            b[1],
            b[2],
            b[3],
            b[4],
            b[5]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    /// Under torch.compile with activation checkpointing a sliding-window model is estimated below its window
    /// only: the largest block that fits stops there (eager mode goes on, and so does compile without
    /// checkpointing).
    #[test]
    fn block_axis_stops_below_a_sliding_window() {
        let mut s = presets::model_preset("mistral-7b").unwrap();
        s.model.n_layer = 2;
        s.model.sliding_window = 1024;
        s.train.seq_len = 512;
        s.train.compile = true;
        s.train.checkpointing = false;
        assert_eq!(Axis::BlockSize.limit(&s), u64::MAX);
        assert!(crate::estimate(&Axis::BlockSize.apply(&s, 1024)).is_ok());
        s.train.checkpointing = true;
        assert_eq!(Axis::BlockSize.limit(&s), 1023);
        assert_eq!(Axis::BatchSize.limit(&s), u64::MAX);
        let huge = u64::MAX / 4;
        assert_eq!(
            largest_fitting(&s, Axis::BlockSize, huge, 131_072).unwrap(),
            Some(1023)
        );
        assert!(crate::estimate(&Axis::BlockSize.apply(&s, 1024)).is_err());
        s.train.compile = false;
        assert_eq!(Axis::BlockSize.limit(&s), u64::MAX);
        assert!(crate::estimate(&Axis::BlockSize.apply(&s, 1024)).is_ok());
    }

    #[test]
    fn fit_map_matches_estimating_every_cell() {
        let s = presets::founding();
        let batches = [1, 2, 4, 8, 16, 32, 64];
        let blocks = [64, 128, 256, 512, 1024, 2048];
        let budget = s.device.memory_bytes;
        let map = fit_map(&s, &batches, &blocks, budget).unwrap();
        for (j, &block) in blocks.iter().enumerate() {
            for (i, &batch) in batches.iter().enumerate() {
                let one = Axis::BatchSize.apply(&Axis::BlockSize.apply(&s, block), batch);
                let fits = crate::estimate(&one).unwrap().device_total_bytes <= budget;
                assert_eq!(map.fits[j][i], fits, "batch {batch} block {block}");
            }
        }
        assert!(
            map.fits[0][0] && !map.fits[5][6],
            "both kinds of cell occur"
        );
        // Unsorted axes take the bisection path and agree.
        let rev: Vec<u64> = blocks.iter().rev().copied().collect();
        let map2 = fit_map(&s, &batches, &rev, budget).unwrap();
        let mut rows = map2.fits.clone();
        rows.reverse();
        assert_eq!(rows, map.fits);
    }
}
