//! The boundary of the snapshot module: a second wasm build of the crate (`--features snapshot-module`) that
//! holds only the memory-snapshot reader and writer, so that the page's first load does not carry them; the
//! page loads it in a worker when a file is dropped or a predicted snapshot is asked for (issue 15). It reads the bytes the page hands over (nothing leaves the browser) and
//! returns plain objects with every number formatted, as `wasm` does.
//!
//! TypeScript view of what JS sees:
//! ```text
//! read_snapshot(bytes: Uint8Array): Measured            // throws Error(one message) for a file it cannot read
//! compare_snapshot(bytes: Uint8Array, predicted_allocated_bytes: number, predicted_reserved_bytes: number):
//!     {measured_allocated, measured_reserved, predicted_allocated, predicted_reserved, allocated_difference,
//!      reserved_difference: string, blocks: {bytes, origin, component, frames: string}[],
//!      by_origin: {origin, bytes, n_blocks}[], events: number, peak_event: number, raw: Comparison}
//! check_snapshot_size(n_bytes: number): void            // throws Error(message) past what the reader takes
//! predicted_snapshot(query: string): Uint8Array         // the estimate's timeline as a snapshot (a pickle)
//! ```

use serde::Serialize;
use wasm_bindgen::prelude::*;

use crate::compare::Comparison;
use crate::report::fmt_bytes;
use crate::snapshot::{read_snapshot as read, Measured, MAX_SNAPSHOT_BYTES};

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn to_js<T: Serialize>(v: &T) -> Result<JsValue, JsError> {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(js_err)
}

#[derive(Serialize)]
struct BlockDto {
    bytes: String,
    origin: &'static str,
    component: &'static str,
    frames: String,
}

#[derive(Serialize)]
struct OriginDto {
    origin: &'static str,
    bytes: String,
    n_blocks: u64,
}

#[derive(Serialize)]
struct CompareDto {
    measured_allocated: String,
    measured_reserved: String,
    predicted_allocated: String,
    predicted_reserved: String,
    allocated_difference: String,
    reserved_difference: String,
    blocks: Vec<BlockDto>,
    by_origin: Vec<OriginDto>,
    events: u64,
    peak_event: u64,
    raw: Comparison,
}

/// The predicted allocation timeline as a PyTorch memory snapshot (`trace`), for the page's download button:
/// PyTorch's viewer (pytorch.org/memory_viz) draws it.
#[wasm_bindgen]
pub fn predicted_snapshot(query: &str) -> Result<Vec<u8>, JsError> {
    let setup = crate::input::setup_from_query(query, &mut Vec::new()).map_err(js_err)?;
    crate::trace::predicted_snapshot(&setup).map_err(js_err)
}

#[wasm_bindgen]
pub fn check_snapshot_size(n_bytes: f64) -> Result<(), JsError> {
    if n_bytes > MAX_SNAPSHOT_BYTES as f64 {
        return Err(js_err(format!(
            "this file is {}, past the {} a snapshot may have: record fewer entries \
             (torch.cuda.memory._record_memory_history(max_entries=...))",
            fmt_bytes(n_bytes as u64),
            fmt_bytes(MAX_SNAPSHOT_BYTES)
        )));
    }
    Ok(())
}

#[wasm_bindgen]
pub fn read_snapshot(bytes: &[u8]) -> Result<JsValue, JsError> {
    to_js(&read(bytes).map_err(js_err)?)
}

fn dto(m: Measured, predicted_allocated: u64, predicted_reserved: u64) -> CompareDto {
    let c = Comparison::from_peaks(m, predicted_allocated, predicted_reserved);
    let m = &c.measured;
    CompareDto {
        measured_allocated: fmt_bytes(c.measured_peak_allocated_bytes),
        measured_reserved: fmt_bytes(c.measured_peak_reserved_bytes),
        predicted_allocated: fmt_bytes(c.predicted_peak_allocated_bytes),
        predicted_reserved: fmt_bytes(c.predicted_peak_reserved_bytes),
        allocated_difference: Comparison::fmt_percent(c.allocated_difference_percent),
        reserved_difference: Comparison::fmt_percent(c.reserved_difference_percent),
        blocks: m
            .blocks_at_peak
            .iter()
            .map(|b| BlockDto {
                bytes: fmt_bytes(b.bytes),
                origin: b.origin,
                component: b.component.map_or("", crate::snapshot::component_name),
                frames: b
                    .frames
                    .iter()
                    .map(|f| {
                        let file = f.filename.rsplit('/').next().unwrap_or(&f.filename);
                        format!("{} ({file}:{})", f.name, f.line)
                    })
                    .collect::<Vec<_>>()
                    .join(" < "),
            })
            .collect(),
        by_origin: m
            .by_origin
            .iter()
            .map(|o| OriginDto {
                origin: o.origin,
                bytes: fmt_bytes(o.bytes),
                n_blocks: o.n_blocks,
            })
            .collect(),
        events: m.n_events,
        peak_event: m.peak_event,
        raw: c.clone(),
    }
}

#[wasm_bindgen]
pub fn compare_snapshot(
    bytes: &[u8],
    predicted_allocated_bytes: f64,
    predicted_reserved_bytes: f64,
) -> Result<JsValue, JsError> {
    let m = read(bytes).map_err(js_err)?;
    to_js(&dto(
        m,
        predicted_allocated_bytes as u64,
        predicted_reserved_bytes as u64,
    ))
}
