//! What a person sees: the report, sweeps and the fit map, the advice, the plots, and the page's boundary.

pub mod advice;
pub mod plot;
pub mod report;
pub mod sweep;
#[cfg(target_arch = "wasm32")]
pub mod wasm;
