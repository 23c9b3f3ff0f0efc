//! vramfit: how many bytes of GPU memory one training step of a transformer needs, and what each byte is for.
//!
//! The estimate follows what PyTorch allocates op by op on CUDA (see `tensors`), runs the training loop as
//! nanoGPT's `train.py` or a plain Hugging Face loop does (see `step`), and reports the peak that
//! `torch.cuda.max_memory_allocated()` would show. It is checked against measurements in `tests/data/`.
//!
//! Reading order: `error`, `model` (setup types), `policy` (precision, optimizer, attention), `input` (JSON and
//! config-file readers), `allocator` (PyTorch's caching allocator), `sim` (the allocation timeline, which drives
//! it), `tensors` (per-op byte counts), `arch` (what a model is made of), `eager` / `compiled` (one micro-step
//! of any described model), `step` (the run), `report`, `sweep`.
//!
//! # Example
//! ```
//! let setup = vramfit::input::setup_from_json(r#"{"model": {"family": "gpt2", "n_layer": 6, "n_head": 6,
//!     "n_embd": 384, "block_size": 512, "vocab_size": 50304, "bias": false},
//!     "train": {"batch_size": 16, "precision": "fp16-amp", "optimizer": "adamw-fused"}}"#).unwrap();
//! let report = vramfit::estimate(&setup).unwrap();
//! assert!(report.peak_allocated_bytes > 5 << 30);
//! assert_eq!(report.components.total(), report.peak_allocated_bytes);
//! ```

// The files are grouped by role (ARCHITECTURE.md); every module keeps its path at the crate root.
pub mod describe;
pub mod error;
pub mod fuzzing;
pub mod read;
pub mod run;
pub mod show;

pub use describe::{arch, finetune, model, parallel, policy, presets};
pub use read::{input, pickle, snapshot};
pub use run::{allocator, compiled, distributed, eager, moe, reorder, sim, step, tensors};
#[cfg(all(target_arch = "wasm32", not(feature = "snapshot-module")))]
pub use show::wasm;
#[cfg(all(target_arch = "wasm32", feature = "snapshot-module"))]
pub use show::wasm_snapshot;
pub use show::{advice, compare, estimates, gpus, methods, page, plot, report, sweep, trace};

pub use error::Error;
pub use model::{DeviceConfig, Family, ModelConfig, Setup, TrainConfig};
pub use report::Report;

/// The one front door: validates the setup and estimates one training step's peak memory.
///
/// # Errors
/// An [`Error`] naming the field and value for invalid input, `TooLarge` when byte counts would overflow, and
/// `NotModelled` for combinations the op models do not cover.
pub fn estimate(setup: &Setup) -> Result<Report, Error> {
    setup.validate()?;
    let sim = step::simulate(setup)?;
    let per_block = activations_per_block(setup)?;
    Ok(Report::from_sim(setup, &sim, per_block))
}

/// The peak figures only (no per-block breakdown): what sweeps and fit maps need, the report's figures without
/// the report.
///
/// # Errors
/// As [`estimate`].
pub fn estimate_peak(setup: &Setup) -> Result<report::Peaks, Error> {
    setup.validate()?;
    let sim = step::simulate(setup)?;
    Ok(report::Peaks::from_sim(&sim, setup.device.sm))
}

/// Whether the setup fits `budget_bytes` of device memory: `estimate_peak(setup)?.device_total_bytes <=
/// budget_bytes`, answered sooner when it does not, since the run stops once reserved memory alone is past the
/// budget (what the fit map asks for each cell).
///
/// # Errors
/// As [`estimate`].
pub fn fits(setup: &Setup, budget_bytes: u64) -> Result<bool, Error> {
    setup.validate()?;
    let context = report::cuda_context_bytes(setup.device.sm);
    let sim = step::simulate_within(setup, budget_bytes.saturating_sub(context))?;
    Ok(report::Peaks::from_sim(&sim, setup.device.sm).device_total_bytes <= budget_bytes)
}

/// Activations saved by one block: the difference a second block makes to the live activations at the end of
/// the first forward.
pub(crate) fn activations_per_block(setup: &Setup) -> Result<u64, Error> {
    let at_end_of_forward = |n_layer: u64| -> Result<u64, Error> {
        let mut s = setup.clone();
        s.model.n_layer = n_layer;
        s.train.checkpointing = false;
        let sim = step::simulate_first_forward(&s)?;
        Ok(sim.live_in(sim::Category::Activations))
    };
    Ok(at_end_of_forward(2)?.saturating_sub(at_end_of_forward(1)?))
}
