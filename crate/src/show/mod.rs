//! What a person sees: the report, sweeps and the fit map, the advice, the plots, a measured snapshot beside the
//! estimate (`compare`), the predicted timeline as a snapshot (`trace`), the page's figures for one setup with
//! their estimates shared (`page`, `estimates`), and the page's boundary.

pub mod advice;
pub mod compare;
pub mod estimates;
pub mod gpus;
pub mod methods;
pub mod page;
pub mod plot;
pub mod report;
pub mod sweep;
pub mod trace;
#[cfg(all(target_arch = "wasm32", not(feature = "snapshot-module")))]
pub mod wasm;
#[cfg(all(target_arch = "wasm32", feature = "snapshot-module"))]
pub mod wasm_snapshot;
