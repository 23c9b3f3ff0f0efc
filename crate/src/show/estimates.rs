//! Estimates of setups, each simulated once: what one view of the page asks for (the estimate and the
//! eager-vs-compiled comparison, the advice and its bisections, the two sweeps, the fit map, the timeline) names
//! the same setups again and again (the current one five times; the sweeps' points again as the fit map's
//! cells and the bisections' steps). Every answer is the one [`crate::estimate`], [`crate::estimate_peak`] and
//! [`crate::fits`] give; only the work is shared.

use crate::error::Error;
use crate::model::Setup;
use crate::report::Report;

/// The known figures of some setups (see the module's documentation).
#[derive(Debug, Clone, Default)]
pub struct Estimates {
    entries: Vec<(Setup, Known)>,
}

/// What is known of one setup.
#[derive(Debug, Clone, Default)]
struct Known {
    /// The whole run's report (without the per-block activations: 0 there), or why it has none.
    report: Option<Result<Report, Error>>,
    /// The activations one block saves (`Report::activations_per_block_bytes`), once asked for.
    per_block: Option<u64>,
    /// The most a run stopped early showed of the device total, which the whole run's can only pass.
    device_total_at_least: u64,
}

impl Estimates {
    pub fn new() -> Estimates {
        Estimates::default()
    }

    /// The entry of `setup`, made if there is none. The batch and block sizes, which tell most setups of one
    /// view apart, are compared first.
    fn known(&mut self, setup: &Setup) -> &mut Known {
        let same = |s: &Setup| {
            s.train.batch_size == setup.train.batch_size
                && s.model.block_size == setup.model.block_size
                && s == setup
        };
        let i = match self.entries.iter().position(|(s, _)| same(s)) {
            Some(i) => i,
            None => {
                self.entries.push((setup.clone(), Known::default()));
                self.entries.len() - 1
            }
        };
        &mut self.entries[i].1
    }

    /// The whole run's report, without the per-block activations (0): everything a sweep point, a suggestion
    /// or the comparison reads.
    ///
    /// # Errors
    /// As [`crate::estimate`].
    pub fn report(&mut self, setup: &Setup) -> Result<&Report, Error> {
        let known = self.known(setup);
        let report = known.report.get_or_insert_with(|| {
            setup.validate()?;
            let sim = crate::step::simulate(setup)?;
            Ok(Report::from_sim(setup, &sim, 0))
        });
        report.as_ref().map_err(Clone::clone)
    }

    /// [`crate::estimate`]: the report with the activations one block saves.
    ///
    /// # Errors
    /// As [`crate::estimate`].
    pub fn estimate(&mut self, setup: &Setup) -> Result<Report, Error> {
        let mut report = self.report(setup)?.clone();
        let known = self.known(setup);
        let per_block = match known.per_block {
            Some(b) => b,
            None => {
                let b = crate::activations_per_block(setup)?;
                known.per_block = Some(b);
                b
            }
        };
        report.activations_per_block_bytes = per_block;
        Ok(report)
    }

    /// [`crate::fits`]: whether the device total is within `budget_bytes`, from the report when there is one.
    /// A run that fits has run to its end: its report is kept. One that does not may have stopped early: the
    /// device total it showed answers later questions with smaller budgets.
    ///
    /// # Errors
    /// As [`crate::estimate`].
    pub fn fits(&mut self, setup: &Setup, budget_bytes: u64) -> Result<bool, Error> {
        let known = self.known(setup);
        match &known.report {
            Some(Ok(r)) => return Ok(r.device_total_bytes <= budget_bytes),
            Some(Err(e)) => return Err(e.clone()),
            None if known.device_total_at_least > budget_bytes => return Ok(false),
            None => {}
        }
        let run = || -> Result<_, Error> {
            setup.validate()?;
            let context = crate::report::cuda_context_bytes(setup.device.sm);
            let sim = crate::step::simulate_within(setup, budget_bytes.saturating_sub(context))?;
            let total = crate::report::Peaks::from_sim(&sim, setup.device.sm).device_total_bytes;
            Ok((sim, total))
        };
        match run() {
            Err(e) => {
                known.report = Some(Err(e.clone()));
                Err(e)
            }
            // Within the budget the run never stopped: it is the whole run.
            Ok((sim, total)) if total <= budget_bytes => {
                known.report = Some(Ok(Report::from_sim(setup, &sim, 0)));
                Ok(true)
            }
            Ok((_, total)) => {
                known.device_total_at_least = known.device_total_at_least.max(total);
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    /// Every answer is the one the functions on their own give, whichever is asked first: fits at budgets
    /// around the total (a run stopped early, then a smaller and a larger budget), the report after them, and
    /// fits again from the report; errors included.
    #[test]
    fn answers_are_the_plain_functions_whatever_the_order() {
        let mut llama = presets::model_preset("tinyllama-1.1b").unwrap();
        llama.model.n_layer = 3;
        let mut lora_gpt2 = presets::founding();
        lora_gpt2.train.lora = Some(crate::finetune::LoraConfig::with_rank(16));
        let mut too_large = presets::founding();
        too_large.model.block_size = 1 << 40;
        too_large.train.seq_len = 1 << 40;
        for s in [presets::founding(), llama, lora_gpt2, too_large] {
            let total = crate::estimate_peak(&s).map(|p| p.device_total_bytes);
            let mut known = Estimates::new();
            for budget in [total.clone().unwrap_or(0) / 2, 0, u64::MAX] {
                let want = total.clone().map(|t| t <= budget);
                assert_eq!(known.fits(&s, budget), want);
                assert_eq!(crate::fits(&s, budget), want);
            }
            assert_eq!(
                known.report(&s).cloned(),
                crate::estimate(&s).map(|mut r| {
                    r.activations_per_block_bytes = 0;
                    r
                })
            );
            assert_eq!(known.estimate(&s), crate::estimate(&s));
            if let Ok(t) = total {
                for budget in [t - 1, t, t + 1] {
                    assert_eq!(known.fits(&s, budget), Ok(t <= budget));
                }
            }
        }
    }

    /// A fit that holds has run to its end: its report is kept and equals the whole run's.
    #[test]
    fn a_run_that_fits_is_the_whole_run() {
        let s = presets::founding();
        let mut known = Estimates::new();
        assert_eq!(known.fits(&s, u64::MAX), Ok(true));
        assert!(matches!(known.known(&s).report, Some(Ok(_))));
        assert_eq!(known.estimate(&s), crate::estimate(&s));
    }
}
