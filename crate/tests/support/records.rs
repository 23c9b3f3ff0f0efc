//! The fine-tuning and multi-GPU records (`tests/data/finetune/stub-cuda.json`, `tests/data/parallel/stub-cuda.json`)
//! read as setups and estimated, with the standards they are held to and the known exceptions. Shared by the
//! reference test (`crate/tests/reference.rs`) and the generator of `docs/ACCURACY.md` (`crate/examples/accuracy.rs`),
//! which both include this file with `#[path]`, so the document shows what the test checks.

use std::path::Path;

use serde_json::Value;
use vramfit::input::setup_from_value;

/// Issue 10's standard for the stub-cuda method (PyTorch's own caching allocator on a stubbed device): peak
/// allocated within 2% and peak reserved within 3% of PyTorch's counters, on every record.
pub const STUB_ALLOCATED_TOLERANCE: f64 = 0.02;
pub const STUB_RESERVED_TOLERANCE: f64 = 0.03;

/// Fine-tuning records vramfit refuses (`Error::NotModelled` or an unknown value), with the reason in the
/// table the test prints: none.
pub const FINETUNE_NOT_MODELLED: &[&str] = &[];

/// The multi-GPU records (`tests/data/parallel/stub-cuda.json`, rank 0 of DDP, FSDP2, tensor parallelism and TP
/// x FSDP2 on PyTorch's own allocator with a fake process group) are held to issue 10's standard (issue 14 asked
/// for 5%): peak allocated within 2% on every record. Reserved is held to the stub standard (`STUB_RESERVED_TOLERANCE`) on every record but the
/// known ones: under FSDP2 too, since the allocator model keeps a pool per stream (the all-gather copy-in and
/// reduce-scatter streams' buffers in segments of their own, as on PyTorch's allocator).
pub const PARALLEL_ALLOCATED_TOLERANCE: f64 = STUB_ALLOCATED_TOLERANCE;

/// Multi-GPU records vramfit refuses (`Error::NotModelled`), by name. llama-lora-fsdp-w8-mp is LoRA under FSDP2's
/// MixedPrecisionPolicy (no autocast, a bf16 base with fp32 adapters gathered in bf16): measured to show that
/// autocast holds as much for LoRA (351.96 MiB, against 354.89 MiB for llama-lora-fsdp-w8 under autocast), which
/// is why the GPU plan keeps LoRA under autocast.
pub const PARALLEL_NOT_MODELLED: &[&str] = &["llama-lora-fsdp-w8-mp"];

/// DDP and tensor-parallel records whose reserved memory is not within the stub standard (3%), with what is
/// known.
pub const PARALLEL_RESERVED_KNOWN: &[(&str, &str)] = &[];

/// One record against its estimate.
pub struct Row {
    pub name: String,
    pub measured_allocated: u64,
    pub predicted_allocated: u64,
    pub measured_reserved: u64,
    pub predicted_reserved: u64,
    /// The estimate's peak: its phase and op.
    pub peak_phase: String,
    pub peak_op: String,
}

impl Row {
    /// The relative errors of the estimate: (allocated, reserved).
    pub fn errors(&self) -> (f64, f64) {
        let rel = |p: u64, m: u64| (p as f64 - m as f64) / m as f64;
        (
            rel(self.predicted_allocated, self.measured_allocated),
            rel(self.predicted_reserved, self.measured_reserved),
        )
    }
}

/// The records of a measured file, each checked to be made by the stub-cuda method.
fn stub_records(path: &Path) -> Vec<Value> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let recs = v["records"].as_array().expect("records").clone();
    for rec in &recs {
        assert_eq!(rec["method"], "stub-cuda", "{}", rec["name"]);
    }
    recs
}

/// A record's measured figures beside a report's.
fn row(name: &str, measured: &Value, report: &vramfit::report::Report) -> Row {
    Row {
        name: name.to_string(),
        measured_allocated: measured["peak_allocated_bytes"].as_u64().unwrap(),
        predicted_allocated: report.peak_allocated_bytes,
        measured_reserved: measured["peak_reserved_bytes"].as_u64().unwrap(),
        predicted_reserved: report.peak_reserved_bytes,
        peak_phase: report.peak_phase.to_string(),
        peak_op: report.peak_op.to_string(),
    }
}

/// A fine-tuning record's setup as the setup JSON reads it: the record keeps peft's `LoraConfig` beside `train`
/// (`lora`: r, lora_alpha, lora_dropout, target_modules, modules_to_save) and bitsandbytes' quantization
/// (`quant`); the setup JSON has them under `train.lora` and `train.quantization`.
pub fn finetune_setup(rec: &Value) -> Value {
    let mut s = rec["setup"].clone();
    let setup = s.as_object_mut().unwrap();
    let lora = setup.remove("lora");
    let quant = setup.remove("quant");
    let train = setup["train"].as_object_mut().unwrap();
    if let Some(l) = lora {
        train.insert(
            "lora".into(),
            serde_json::json!({
                "r": l["r"], "alpha": l["lora_alpha"], "dropout": l["lora_dropout"],
                "target_modules": l["target_modules"], "modules_to_save": l["modules_to_save"],
            }),
        );
    }
    if let Some(q) = quant {
        let name = match q["bits"].as_u64() {
            Some(8) => "int8".to_string(),
            _ => q["quant_type"].as_str().unwrap().to_string(),
        };
        train.insert("quantization".into(), name.into());
        if q["double_quant"] == true {
            train.insert("double_quant".into(), true.into());
        }
    }
    s
}

/// The fine-tuning records (issue 13: LoRA, QLoRA, 8-bit bases and the optimizers people pick to save memory), in
/// file order: each record's name with its row, or the error with which vramfit refuses it.
pub fn finetune_rows(data_dir: &Path) -> Vec<(String, Result<Row, vramfit::Error>)> {
    stub_records(&data_dir.join("finetune/stub-cuda.json"))
        .iter()
        .map(|rec| {
            let name = rec["name"].as_str().unwrap();
            let report = setup_from_value(&finetune_setup(rec)).and_then(|s| vramfit::estimate(&s));
            (
                name.to_string(),
                report.map(|r| row(name, &rec["measured"], &r)),
            )
        })
        .collect()
}

/// A multi-GPU record's case (`scripts/measure/cases-parallel.json`) as a setup: measure_parallel.py's loop is
/// AdamW (foreach) with clipping at 1.0 around the family's own loop; its `parallel` arguments are PyTorch's, which
/// `train.parallel` takes under the same names (`world_size` is `gpus`, `tp_size` is `tp`, `mp_policy` is
/// `mixed_precision`, `cpu_offload` is `offload`; a TP plan alone runs without a data-parallel wrapper; plan
/// `sp` is `sequence_parallel`). The measured rank must be 0, the one the estimate is for, unless `rank` says
/// otherwise.
pub fn parallel_setup(case: &Value) -> (Value, u64) {
    let mut train = case["train"].clone();
    let rank = train["rank"].as_u64().unwrap_or(0);
    let t = train.as_object_mut().unwrap();
    t.remove("rank");
    t.insert("optimizer".into(), "adamw".into());
    t.insert("grad_clip".into(), 1.0.into());
    let p = &case["parallel"];
    let w = p["world_size"].as_u64().unwrap();
    let tp = p["tp_size"].as_u64().unwrap_or(1);
    let mut par = serde_json::json!({"gpus": w});
    let strategy = p["strategy"].as_str().unwrap();
    par["strategy"] = match strategy {
        "ddp" => "ddp",
        "fsdp2" | "tp-fsdp2" => "fsdp",
        "tp" => "single",
        other => panic!("unknown strategy {other}"),
    }
    .into();
    if strategy.starts_with("tp") {
        par["tp"] = (if strategy == "tp" { w } else { tp }).into();
        if p["plan"] == "sp" {
            par["sequence_parallel"] = true.into();
        }
    }
    // measure_parallel.py builds a tensor-parallel-alone model on the device (`build("cuda")`), then
    // parallelize_module shards it; FSDP2's cases build on the meta device.
    if strategy == "tp" {
        par["init_on_device"] = true.into();
    }
    for (from, to) in [
        ("bucket_cap_mb", "bucket_cap_mb"),
        ("gradient_as_bucket_view", "gradient_as_bucket_view"),
        ("static_graph", "static_graph"),
        ("reshard_after_forward", "reshard_after_forward"),
        ("mp_policy", "mixed_precision"),
        ("cpu_offload", "offload"),
    ] {
        if let Some(v) = p.get(from) {
            par[to] = v.clone();
        }
    }
    t.insert("parallel".into(), par);
    // peft's LoraConfig, as the fine-tuning records carry it (`finetune_setup`); `base_dtype` is the setup's own.
    if let Some(l) = case.get("lora") {
        t.insert(
            "lora".into(),
            serde_json::json!({"r": l["r"], "alpha": l["lora_alpha"], "dropout": l["lora_dropout"],
                               "target_modules": l["target_modules"]}),
        );
    }
    (
        serde_json::json!({"model": case["model"], "train": train}),
        rank,
    )
}

/// One multi-GPU record against its estimate.
pub struct ParallelRow {
    pub row: Row,
    /// The record's strategy as measure_parallel.py names it: ddp, fsdp2, tp or tp-fsdp2.
    pub strategy: String,
    pub n_gpus: u64,
    /// The measured rank (the estimate is rank 0's, which holds the most).
    pub rank: u64,
}

/// The multi-GPU records (issue 14: DDP, FSDP2, tensor parallelism, TP x FSDP2, LoRA with DDP and FSDP2), in file
/// order, but those in `PARALLEL_NOT_MODELLED`, which must be refused (`Error::NotModelled`); every other one is
/// modelled (an estimate's error panics with the record's name).
pub fn parallel_rows(data_dir: &Path) -> Vec<ParallelRow> {
    let mut records = stub_records(&data_dir.join("parallel/stub-cuda.json"));
    // The presets at their published size (`scripts/measure/cases-parallel-presets.json`), held to the same
    // standard.
    records.extend(stub_records(&data_dir.join("parallel/presets.json")));
    records
        .iter()
        .filter_map(|rec| {
            let name = rec["name"].as_str().unwrap();
            let case = &rec["case"];
            let (setup, rank) = parallel_setup(case);
            let estimate = setup_from_value(&setup).and_then(|s| vramfit::estimate(&s));
            if PARALLEL_NOT_MODELLED.contains(&name) {
                match estimate {
                    Err(vramfit::Error::NotModelled { .. }) => return None,
                    other => panic!(
                        "{name} is listed as refused: {:?}",
                        other.map(|r| r.peak_allocated_bytes)
                    ),
                }
            }
            let report = estimate.unwrap_or_else(|e| panic!("{name}: {e}"));
            Some(ParallelRow {
                row: row(name, &rec["measured"], &report),
                strategy: case["parallel"]["strategy"].as_str().unwrap().to_string(),
                n_gpus: case["parallel"]["world_size"].as_u64().unwrap(),
                rank,
            })
        })
        .collect()
}

/// One record of `tests/data/stub-cuda/fit.json` (`scripts/measure/measure_fit.py`): the least memory `cudaMalloc`
/// may take (whole MiB) on which PyTorch's allocator ran the case, the most on which it raised
/// `torch.OutOfMemoryError`, and the least on which the allocator model serves every request.
pub struct FitRow {
    pub name: String,
    pub least_mib: u64,
    pub most_failing_mib: u64,
    /// The case's peak reserved on a device with room (MiB, rounded up).
    pub unlimited_reserved_mib: u64,
    pub model_least_mib: u64,
}

impl FitRow {
    /// The model's least memory against the measured one, relative.
    pub fn error(&self) -> f64 {
        (self.model_least_mib as f64 - self.least_mib as f64) / self.least_mib as f64
    }
}

/// Whether the allocator model serves every request of the setup's three steps when `cudaMalloc` may take `mib`
/// MiB: the device's memory is that plus its CUDA context, as the estimate takes it (`sim::allocator_capacity`).
fn model_runs_in(setup: &vramfit::model::Setup, mib: u64) -> bool {
    let mut s = setup.clone();
    s.device.memory_bytes = (mib << 20) + vramfit::model::cuda_context_bytes(s.device.sm);
    !vramfit::estimate_peak(&s).unwrap().oom
}

/// The least whole MiB in which the allocator model runs the setup, by bisection between `lo` (fails) and `hi`
/// (runs).
fn model_least_mib(setup: &vramfit::model::Setup, mut lo: u64, mut hi: u64) -> u64 {
    assert!(model_runs_in(setup, hi) && !model_runs_in(setup, lo));
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if model_runs_in(setup, mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// The records of `tests/data/stub-cuda/fit.json`, in file order, each with the allocator model's least memory.
pub fn fit_rows(data_dir: &Path) -> Vec<FitRow> {
    stub_records(&data_dir.join("stub-cuda/fit.json"))
        .iter()
        .map(|rec| {
            let name = rec["name"].as_str().unwrap().to_string();
            let setup =
                setup_from_value(&finetune_setup(rec)).unwrap_or_else(|e| panic!("{name}: {e}"));
            let least_mib = rec["least_mib"].as_u64().unwrap();
            let unlimited_reserved_mib = rec["unlimited"]["peak_reserved_bytes"]
                .as_u64()
                .unwrap()
                .div_ceil(1 << 20);
            let hi = 4 * unlimited_reserved_mib.max(least_mib) + 64;
            FitRow {
                model_least_mib: model_least_mib(&setup, 1, hi),
                least_mib,
                most_failing_mib: rec["most_failing_mib"].as_u64().unwrap(),
                unlimited_reserved_mib,
                name,
            }
        })
        .collect()
}
