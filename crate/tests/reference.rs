#![cfg(not(target_arch = "wasm32"))]
//! Reference tests: every measured training run in `tests/data/*.json` (eager) and
//! `tests/data/compiled/*.json` (torch.compile) against the estimate.
//!
//! Tolerances: eager (issue 2) every config within 5% of the measured peak allocated, the median within 2%;
//! compiled (issue 6) every config within 8%.

use std::path::PathBuf;

use serde_json::Value;
use vramfit::input::setup_from_value;

const TOLERANCE: f64 = 0.05;
const MEDIAN_TOLERANCE: f64 = 0.02;
/// Records made by the fake-CUDA method replay the very allocations the estimator models (op outputs rounded to
/// 512 B, plus the same stated kernel scratch), so any difference above this is a modelling regression.
const REPLAY_TOLERANCE: f64 = 0.001;
const COMPILED_TOLERANCE: f64 = 0.08;
/// Compiled fake-CUDA records replay Inductor's wrapper; the compiled model follows its buffer plan block by block
/// but not Inductor's scheduler: not every `# reuse` of a buffer, nor when each fp16 weight gradient is converted
/// to fp32 (`tiny-vocab-grads-amp-compiled`: 1.2% high). So it is held to a looser regression bound than the eager
/// op-by-op model; configs whose peak is the loss or the saved activations agree to 0.1%.
const COMPILED_REPLAY_TOLERANCE: f64 = 0.02;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

struct Row {
    name: String,
    method: String,
    measured: u64,
    predicted: u64,
    measured_phase: String,
    predicted_phase: String,
}

fn rows(dir: PathBuf) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("tests/data exists")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
    {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for rec in v["records"].as_array().expect("records") {
            let setup =
                setup_from_value(&rec["setup"]).unwrap_or_else(|e| panic!("{}: {e}", rec["name"]));
            let report =
                vramfit::estimate(&setup).unwrap_or_else(|e| panic!("{}: {e}", rec["name"]));
            rows.push(Row {
                name: rec["name"].as_str().unwrap().to_string(),
                method: rec["method"].as_str().unwrap().to_string(),
                measured: rec["measured"]["peak_allocated_bytes"].as_u64().unwrap(),
                predicted: report.peak_allocated_bytes,
                measured_phase: format!(
                    "{} ({})",
                    rec["measured"]["peak_phase"].as_str().unwrap(),
                    rec["measured"]["peak_op"].as_str().unwrap()
                ),
                predicted_phase: format!("{} ({})", report.peak_phase, report.peak_op),
            });
        }
    }
    rows
}

fn error(r: &Row) -> f64 {
    (r.predicted as f64 - r.measured as f64) / r.measured as f64
}

/// The rows as a table, each flagged when over its tolerance (`fake` for fake-cuda records, `gpu` otherwise);
/// returns the table and how many are over.
fn judge(rows: &[Row], fake: f64, gpu: f64) -> (String, usize) {
    let mut table = String::new();
    let mut bad = 0;
    for r in rows {
        let e = error(r);
        let limit = if r.method == "fake-cuda" { fake } else { gpu };
        let flag = if e.abs() > limit {
            bad += 1;
            "  <-- over tolerance"
        } else {
            ""
        };
        table += &format!(
            "{:36} {:>9} {:>14} {:>14} {:>+7.3}%  measured at {} / predicted at {}{flag}\n",
            r.name,
            r.method,
            r.measured,
            r.predicted,
            e * 100.0,
            r.measured_phase,
            r.predicted_phase
        );
    }
    (table, bad)
}

#[test]
fn every_measured_config_is_within_tolerance() {
    let rows = rows(data_dir());
    assert!(rows.iter().all(|r| !r.name.ends_with("-compiled")));
    assert!(
        rows.len() >= 40,
        "expected at least 40 measured configs, found {}",
        rows.len()
    );
    let (table, bad) = judge(&rows, REPLAY_TOLERANCE, TOLERANCE);
    let mut errs: Vec<f64> = rows.iter().map(|r| error(r).abs()).collect();
    errs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = errs[errs.len() / 2];
    println!("{table}median |error| {:.3}%", median * 100.0);
    assert!(
        bad == 0,
        "{bad} configs over tolerance ({}% for GPU records, {}% for fake-cuda):\n{table}",
        TOLERANCE * 100.0,
        REPLAY_TOLERANCE * 100.0
    );
    assert!(
        median <= MEDIAN_TOLERANCE,
        "median |error| {:.3}% over {}%\n{table}",
        median * 100.0,
        MEDIAN_TOLERANCE * 100.0
    );
}

#[test]
fn every_compiled_config_is_within_tolerance() {
    let rows = rows(data_dir().join("compiled"));
    assert!(
        rows.len() >= 15,
        "expected at least 15 compiled configs, found {}",
        rows.len()
    );
    let (table, bad) = judge(&rows, COMPILED_REPLAY_TOLERANCE, COMPILED_TOLERANCE);
    println!("{table}");
    assert!(
        bad == 0,
        "{bad} compiled configs over tolerance ({}% for GPU records, {}% for fake-cuda):\n{table}",
        COMPILED_TOLERANCE * 100.0,
        COMPILED_REPLAY_TOLERANCE * 100.0
    );
}
