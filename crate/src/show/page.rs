//! The page's figures for one setup: the estimate and the eager-vs-compiled comparison, the advice with the
//! largest batch and block that fit, the two sweeps and the fit map over the values the page plots, the GPU
//! plan and full fine-tuning vs LoRA vs QLoRA. They ask
//! for the same setups many times over (the current one in the estimate, the advice, both sweeps and the
//! timeline; the sweeps' points again as the fit map's cells and the bisections' steps), so they share one
//! [`Estimates`]: each setup is simulated once, and every figure is the one the functions of `advice` and
//! `sweep` give on their own.

use crate::advice::{self, CompileComparison, Suggestion};
use crate::error::Error;
use crate::estimates::Estimates;
use crate::gpus::{self, Plan};
use crate::methods::{self, Methods};
use crate::model::Setup;
use crate::report::Report;
use crate::sweep::{self, Axis, FitMap, Point};

/// One setup's view (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Page {
    setup: Setup,
    known: Estimates,
}

impl Page {
    /// The view of `setup`; nothing is estimated until asked for.
    pub fn new(setup: Setup) -> Page {
        Page {
            setup,
            known: Estimates::new(),
        }
    }

    pub fn setup(&self) -> &Setup {
        &self.setup
    }

    /// [`crate::estimate`].
    ///
    /// # Errors
    /// As [`crate::estimate`].
    pub fn estimate(&mut self) -> Result<Report, Error> {
        self.known.estimate(&self.setup)
    }

    /// [`advice::compile_comparison`], given the estimate.
    ///
    /// # Errors
    /// As [`advice::compile_comparison`].
    pub fn compile_comparison(
        &mut self,
        current: &Report,
    ) -> Result<Option<CompileComparison>, Error> {
        advice::compile_comparison_with(&mut self.known, &self.setup, current)
    }

    /// [`gpus::plan`]: how many GPUs, with which strategy.
    ///
    /// # Errors
    /// As [`gpus::plan`].
    pub fn gpu_plan(&mut self) -> Result<Plan, Error> {
        gpus::plan_with(&mut self.known, &self.setup)
    }

    /// [`methods::compare`]: full fine-tuning, LoRA and QLoRA side by side.
    ///
    /// # Errors
    /// As [`methods::compare`].
    pub fn methods(&mut self) -> Result<Methods, Error> {
        methods::compare_with(&mut self.known, &self.setup)
    }

    /// [`advice::suggestions`].
    ///
    /// # Errors
    /// As [`advice::suggestions`].
    pub fn suggestions(&mut self) -> Result<Vec<Suggestion>, Error> {
        advice::suggestions_with(&mut self.known, &self.setup)
    }

    /// [`advice::largest_that_fit`].
    ///
    /// # Errors
    /// As [`advice::largest_that_fit`].
    pub fn largest_that_fit(&mut self) -> Result<(Option<u64>, Option<u64>), Error> {
        advice::largest_that_fit_with(&mut self.known, &self.setup)
    }

    /// The sweep the page plots along `axis` (`sweep_values`, with the current value).
    ///
    /// # Errors
    /// As [`sweep::sweep`].
    pub fn sweep(&mut self, axis: Axis) -> Result<Vec<Point>, Error> {
        let s = &self.setup;
        let mut values = sweep_values(s, axis);
        if axis == Axis::BatchSize && !values.contains(&s.train.batch_size) {
            values.push(s.train.batch_size);
            values.sort_unstable();
        }
        sweep::sweep_with(&mut self.known, s, axis, &values)
    }

    /// The fit map the page draws (`fit_map_axes`), within the device's memory (any total without one).
    ///
    /// # Errors
    /// As [`sweep::fit_map`].
    pub fn fit_map(&mut self) -> Result<FitMap, Error> {
        let s = &self.setup;
        let (batches, blocks) = fit_map_axes(s);
        let budget = if s.device.memory_bytes > 0 {
            s.device.memory_bytes
        } else {
            u64::MAX
        };
        sweep::fit_map_with(&mut self.known, s, &batches, &blocks, budget)
    }
}

/// The values a sweep plots: powers of two around the current value (at least 1..=64 for batch, 64..=4096
/// for block, up to 4x the current value).
pub fn sweep_values(s: &Setup, axis: Axis) -> Vec<u64> {
    match axis {
        Axis::BatchSize => sweep::powers_of_two(1, s.train.batch_size.saturating_mul(4).max(64)),
        Axis::BlockSize => {
            let mut v = sweep::powers_of_two(64, s.model.block_size.saturating_mul(4).max(4096));
            if !v.contains(&s.model.block_size) {
                v.push(s.model.block_size);
                v.sort_unstable();
            }
            v.retain(|&b| b <= axis.limit(s));
            // A block so long that a size passes what vramfit counts (`Error::TooLarge`: Llama-3.1-70B's 131072
            // times 4) is left out rather than failing the whole sweep: the plot stops at the longest it can say.
            v.retain(|&b| {
                !matches!(
                    axis.apply(s, b).validate(),
                    Err(crate::Error::TooLarge { .. })
                )
            });
            v
        }
    }
}

/// The batch and block values of the page's fit map: powers of two from 1 and from 64, reaching past the
/// current values.
pub fn fit_map_axes(s: &Setup) -> (Vec<u64>, Vec<u64>) {
    let mut blocks = sweep::powers_of_two(64, s.model.block_size.saturating_mul(4).max(4096));
    blocks.retain(|&b| b <= Axis::BlockSize.limit(s));
    // As the block sweep: past what vramfit counts, the map stops.
    blocks.retain(|&b| {
        !matches!(
            Axis::BlockSize.apply(s, b).validate(),
            Err(crate::Error::TooLarge { .. })
        )
    });
    (
        sweep::powers_of_two(1, s.train.batch_size.saturating_mul(4).max(64)),
        blocks,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    /// The page's figures, asked for in the page's order through one view, are those of `advice`, `sweep`,
    /// `gpus` and `methods` asked one by one: for the founding case, eager, on a GPU without memory, a Llama, and the 70B preset
    /// (whose block sweep stops where a size passes what vramfit counts).
    #[test]
    fn the_views_figures_are_the_plain_functions() {
        let mut eager = presets::founding();
        eager.train.compile = false;
        let mut no_gpu = presets::founding();
        no_gpu.device.memory_bytes = 0;
        let mut llama = presets::model_preset("llama-3.2-1b").unwrap();
        llama.model.n_layer = 2;
        let mut deep = presets::model_preset("llama-3.1-70b").unwrap();
        deep.model.n_layer = 2;
        for s in [presets::founding(), eager, no_gpu, llama, deep] {
            let mut page = Page::new(s.clone());
            let r = page.estimate();
            assert_eq!(r, crate::estimate(&s));
            let r = r.unwrap();
            assert_eq!(
                page.compile_comparison(&r),
                advice::compile_comparison(&s, &r)
            );
            assert_eq!(page.suggestions(), advice::suggestions(&s));
            assert_eq!(page.largest_that_fit(), advice::largest_that_fit(&s));
            for axis in [Axis::BatchSize, Axis::BlockSize] {
                let mut values = sweep_values(&s, axis);
                if axis == Axis::BatchSize && !values.contains(&s.train.batch_size) {
                    values.push(s.train.batch_size);
                    values.sort_unstable();
                }
                assert_eq!(page.sweep(axis), sweep::sweep(&s, axis, &values));
            }
            let (batches, blocks) = fit_map_axes(&s);
            let budget = match s.device.memory_bytes {
                0 => u64::MAX,
                m => m,
            };
            assert_eq!(
                page.fit_map(),
                sweep::fit_map(&s, &batches, &blocks, budget)
            );
            assert_eq!(page.gpu_plan(), gpus::plan(&s));
            assert_eq!(page.methods(), methods::compare(&s));
            assert_eq!(page.estimate(), crate::estimate(&s));
        }
    }

    /// Llama-3.1-70B's block of 131072: the block sweep and the fit map stop where a size passes what vramfit
    /// counts (four times the block is too large) instead of failing, and reach the block itself.
    #[test]
    fn block_axes_stop_at_what_vramfit_counts() {
        let s = crate::presets::model_preset("llama-3.1-70b").unwrap();
        let too_large = Axis::BlockSize.apply(&s, 4 * s.model.block_size).validate();
        assert!(
            matches!(too_large, Err(Error::TooLarge { .. })),
            "{too_large:?}"
        );
        let v = sweep_values(&s, Axis::BlockSize);
        assert!(v.contains(&s.model.block_size) && v.iter().all(|&b| b <= 2 * s.model.block_size));
        for b in &v {
            Axis::BlockSize.apply(&s, *b).validate().unwrap();
        }
        let (_, blocks) = fit_map_axes(&s);
        assert!(!blocks.is_empty() && blocks.iter().all(|b| v.contains(b)));
    }
}
