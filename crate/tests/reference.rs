#![cfg(not(target_arch = "wasm32"))]
//! Reference tests: every measured training run in `tests/data/*.json` (eager) and
//! `tests/data/compiled/*.json` (torch.compile) against the estimate.
//!
//! Tolerances: eager (issue 2) every config within 5% of the measured peak allocated, the median within 2%;
//! compiled (issue 6) every config within 8%.

use std::path::PathBuf;

use serde_json::Value;
use vramfit::input::setup_from_value;

#[path = "support/records.rs"]
mod records;
use records::{
    FINETUNE_NOT_MODELLED, PARALLEL_ALLOCATED_TOLERANCE, PARALLEL_NOT_MODELLED,
    PARALLEL_RESERVED_KNOWN, STUB_ALLOCATED_TOLERANCE, STUB_RESERVED_TOLERANCE,
};

const TOLERANCE: f64 = 0.05;
const MEDIAN_TOLERANCE: f64 = 0.02;
/// Records made by the fake-CUDA method replay the very allocations the estimator models (op outputs rounded to
/// 512 B, plus the same stated kernel scratch), so any difference above this is a modelling regression.
const REPLAY_TOLERANCE: f64 = 0.001;
const COMPILED_TOLERANCE: f64 = 0.08;
/// Compiled fake-CUDA records replay Inductor's wrapper (with Inductor's default passes, the whole step tracked:
/// issue 11); the compiled model follows its buffer plan block by block but not Inductor's scheduler: not every
/// `# reuse` of a buffer, nor when each fp16 weight gradient is converted to fp32. Issue 11 holds every record to
/// 2%, the eager model's standard; configs whose peak is the loss or the saved activations agree to 0.1%.
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
    /// Bytes a fake-cuda record may hold above the estimate for a known artefact of fake tensors: under
    /// autocast the autograd engine sums the tied embedding's two gradients out of place on fake tensors and in
    /// place on a real run (stub-cuda method), one V x C fp32 buffer. 0 elsewhere.
    fake_only: u64,
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
            let (predicted, predicted_phase) = predicted_by_method(rec, &setup, &report);
            rows.push(Row {
                name: rec["name"].as_str().unwrap().to_string(),
                method: rec["method"].as_str().unwrap().to_string(),
                measured: rec["measured"]["peak_allocated_bytes"].as_u64().unwrap(),
                predicted,
                measured_phase: format!(
                    "{} ({})",
                    rec["measured"]["peak_phase"].as_str().unwrap(),
                    rec["measured"]["peak_op"].as_str().unwrap()
                ),
                predicted_phase,
                fake_only: if rec["method"] == "fake-cuda"
                    && rec["measured"]["peak_op"] == "add"
                    && setup.model.tie_embeddings
                    && setup.train.precision.autocast()
                    && !setup.train.compile
                {
                    setup.model.vocab_size * setup.model.n_embd * 4
                } else {
                    0
                },
            });
        }
    }
    rows
}

/// The estimate's figure for what the record's method measures, with its moment. The fake-cuda method sums the
/// sizes of the tensors live (no allocator): the live tensors at their highest (`peak_tensor_bytes`). A real
/// allocator (stub-cuda, a GPU) counts whole blocks: peak allocated.
fn predicted_by_method(
    rec: &Value,
    setup: &vramfit::Setup,
    report: &vramfit::Report,
) -> (u64, String) {
    if rec["method"] == "fake-cuda" {
        let sim = vramfit::step::simulate(setup).unwrap();
        let t = sim.tensor_peak();
        assert_eq!(t.bytes, report.peak_tensor_bytes, "{}", rec["name"]);
        (t.bytes, format!("{} ({})", t.phase.label(), t.op))
    } else {
        (
            report.peak_allocated_bytes,
            format!("{} ({})", report.peak_phase, report.peak_op),
        )
    }
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
        // The fake-only buffer: the measured peak may exceed the estimate by at most that buffer.
        let artefact = r.fake_only > 0
            && r.measured >= r.predicted
            && r.measured - r.predicted <= r.fake_only + (r.measured as f64 * limit) as u64;
        let flag = if artefact {
            "  (fake tensors' out-of-place tied-gradient sum; in place on a real run)"
        } else if e.abs() > limit {
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
        rows.len() >= 60,
        "expected at least 60 compiled configs (issue 11), found {}",
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

/// Records whose allocated figure the estimate does not reach within the stub standard (2%), each with its cause;
/// each must still be within `ALLOCATED_KNOWN_TOLERANCE`, and its reserved figure is judged as any other's.
const ALLOCATED_KNOWN: &[(&str, &str)] = &[];
const ALLOCATED_KNOWN_TOLERANCE: f64 = 0.03;

/// Compiled records whose reserved memory the allocator model does not reach within 3%, each with what the
/// memory snapshots show (each must still be within 10%). Compiled records are re-runs with Inductor's caches
/// warm (see tests/data/stub-cuda/README.md).
const RESERVED_KNOWN: &[(&str, &str)] = &[];

/// The stub-cuda records (`tests/data/stub-cuda/*.json`): measured allocated and reserved against the estimate's.
fn stub_rows(file: &str) -> Vec<(String, [u64; 4])> {
    stub_rows_of(file, false).0
}

/// As `stub_rows`; with `allow_unmodelled`, records of models vramfit does not model yet (an unknown
/// `model_type`, a `NotModelled` combination) are returned by name with the reason instead of failing.
fn stub_rows_of(file: &str, allow_unmodelled: bool) -> (Vec<(String, [u64; 4])>, Vec<String>) {
    let path = data_dir().join("stub-cuda").join(file);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut unmodelled = Vec::new();
    let rows = v["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|rec| {
            assert_eq!(rec["method"], "stub-cuda", "{}", rec["name"]);
            let name = rec["name"].as_str().unwrap();
            // `finetune_setup`: peft's LoraConfig beside `train` (fine-tuning records) moved into it; the
            // same setup for every other record.
            let report =
                setup_from_value(&records::finetune_setup(rec)).and_then(|s| vramfit::estimate(&s));
            let report = match report {
                Ok(r) => r,
                Err(
                    e @ (vramfit::Error::UnknownValue { .. } | vramfit::Error::NotModelled { .. }),
                ) if allow_unmodelled => {
                    unmodelled.push(format!("{name}: {e}"));
                    return None;
                }
                Err(e) => panic!("{name}: {e}"),
            };
            let m = &rec["measured"];
            let allocated = m["peak_allocated_bytes"].as_u64().unwrap();
            Some((
                name.to_string(),
                [
                    allocated,
                    report.peak_allocated_bytes,
                    m["peak_reserved_bytes"].as_u64().unwrap(),
                    report.peak_reserved_bytes,
                ],
            ))
        })
        .collect();
    (rows, unmodelled)
}

/// Checks one stub-cuda file; returns the table and the errors over tolerance (allocated, reserved).
fn judge_stub(file: &str, min_records: usize) -> (String, usize, usize) {
    judge_stub_rows(stub_rows(file), file, min_records)
}

fn judge_stub_rows(
    rows: Vec<(String, [u64; 4])>,
    file: &str,
    min_records: usize,
) -> (String, usize, usize) {
    assert!(
        rows.len() >= min_records,
        "expected at least {min_records} stub-cuda records in {file}, found {}",
        rows.len()
    );
    let rel = |p: u64, m: u64| (p as f64 - m as f64) / m as f64;
    let (mut table, mut bad_a, mut bad_r) = (String::new(), 0, 0);
    for (name, [ma, pa, mr, pr]) in &rows {
        let (ea, er) = (rel(*pa, *ma), rel(*pr, *mr));
        let known = ALLOCATED_KNOWN.iter().find(|(n, _)| n == name);
        let over_a = match known {
            Some(_) => ea.abs() > ALLOCATED_KNOWN_TOLERANCE,
            None => ea.abs() > STUB_ALLOCATED_TOLERANCE,
        };
        let reserved_known = RESERVED_KNOWN.iter().find(|(n, _)| n == name);
        let over_r = match reserved_known {
            Some(_) => er.abs() > 0.10,
            None => er.abs() > STUB_RESERVED_TOLERANCE,
        };
        bad_a += over_a as usize;
        bad_r += over_r as usize;
        table += &format!(
            "{name:40} allocated {ma:>12} {pa:>12} {:>+7.2}%{}  reserved {mr:>12} {pr:>12} {:>+7.2}%{}{}\n",
            ea * 100.0,
            if over_a { " !" } else { "  " },
            er * 100.0,
            if over_r { " !" } else { "  " },
            known
                .map(|(_, why)| format!("  (allocated: {why})"))
                .or(reserved_known.map(|(_, why)| format!("  (reserved: {why})")))
                .unwrap_or_default(),
        );
    }
    (table, bad_a, bad_r)
}

/// No judged record may be over the stub tolerances (allocated or reserved); the table says which are.
fn assert_stub_tolerances(table: &str, bad_a: usize, bad_r: usize) {
    assert!(
        bad_a == 0 && bad_r == 0,
        "{bad_a} allocated over {}%, {bad_r} reserved over {}%:\n{table}",
        STUB_ALLOCATED_TOLERANCE * 100.0,
        STUB_RESERVED_TOLERANCE * 100.0
    );
}

#[test]
fn stub_cuda_eager_records_allocated_and_reserved() {
    let (table, bad_a, bad_r) = judge_stub("measured.json", 50);
    println!("{table}");
    assert_stub_tolerances(&table, bad_a, bad_r);
}

#[test]
fn stub_cuda_compiled_records_allocated_and_reserved() {
    let (table, bad_a, bad_r) = judge_stub("compiled.json", 60);
    println!("{table}");
    assert_stub_tolerances(&table, bad_a, bad_r);
}

/// The compiled records of `hf.json` that `Setup::validate` still refuses under torch.compile, each for the reason
/// its error gives (a family, an attention kind or a window not traced under Inductor yet).
///
/// (None since issue 12: `neox-512-bf16amp-compiled` is modelled, `compiled::neox_block_fwd`, and the three
/// mixture-of-experts records, `mixtral-256-e4top2-bf16amp-compiled`, `qwen2moe-256-e8top2-shared-gqa-bf16amp-compiled`
/// and `olmoe-256-e8top2-bf16amp-compiled`, `compiled::moe_fwd`.)
const HF_COMPILED_NOT_MODELLED: &[&str] = &[];

/// The Hugging Face families measured from their config.json (`tests/data/stub-cuda/hf.json`, built with
/// `AutoModelForCausalLM.from_config`): the families vramfit models are held to the same standard as the
/// reference records; the others are listed, and must be exactly the ones not modelled yet.
#[test]
fn stub_cuda_hf_family_records() {
    let (rows, unmodelled) = stub_rows_of("hf.json", true);
    let (table, bad_a, bad_r) = judge_stub_rows(rows, "hf.json", 5);
    println!("{table}\nnot modelled yet:\n{}", unmodelled.join("\n"));
    assert_stub_tolerances(&table, bad_a, bad_r);
    // The compiled records refused are exactly the listed ones.
    let mut refused: Vec<&str> = unmodelled
        .iter()
        .filter_map(|l| l.split(": ").next())
        .filter(|n| n.ends_with("-compiled"))
        .collect();
    refused.sort_unstable();
    let mut listed = HF_COMPILED_NOT_MODELLED.to_vec();
    listed.sort_unstable();
    assert_eq!(refused, listed, "compiled records refused vs listed");
    // Every record of a modelled family estimates, but HF's eager attention and a sliding window the
    // sequence reaches, which are refused with their reason.
    for line in &unmodelled {
        assert!(
            !line.contains("model_type (\"llama\")")
                && !line.contains("model_type (\"qwen2\")")
                && !line.contains("model_type (\"mistral\")")
                && !line.contains("model_type (\"qwen3\")")
                && !line.contains("model_type (\"gemma\")")
                && !line.contains("model_type (\"gemma2\")")
                && !line.contains("model_type (\"gemma3_text\")")
                && !line.contains("model_type (\"olmo2\")")
                && !line.contains("model_type (\"phi3\")")
                && !line.contains("model_type (\"gpt_neox\")")
                && !line.contains("model_type (\"mixtral\")")
                && !line.contains("model_type (\"qwen2_moe\")")
                && !line.contains("model_type (\"olmoe\")"),
            "{line}"
        );
    }
}

/// The ground truth of a mixture of experts ran its per-expert GEMMs: every stub-cuda record whose experts are not
/// bf16 (they then run through aten's `_grouped_mm` fallback eagerly, or transformers' custom op
/// `grouped_mm_fallback` under torch.compile, both of which read the offsets to the host and run one GEMM per
/// expert with tokens) had every offsets read answered with the forced routing's offsets
/// (`moe_offsets_readback`); read as the stub's zeros, no GEMM would have run and no cuBLAS workspace been taken.
/// Pure bf16 records run CUTLASS's grouped GEMM, which keeps the offsets on the device: nothing to answer.
#[test]
fn stub_cuda_moe_records_ran_their_expert_gemms() {
    let path = data_dir().join("stub-cuda").join("hf.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut checked = [0usize; 2]; // eager, compiled
    for rec in v["records"].as_array().expect("records") {
        let name = rec["name"].as_str().unwrap();
        let hf = &rec["setup"]["model"]["hf"];
        if hf.get("num_local_experts").is_none() && hf.get("num_experts").is_none() {
            continue;
        }
        let readback = &rec["moe_offsets_readback"];
        if rec["setup"]["train"]["precision"] == "bf16" {
            assert!(readback.is_null(), "{name}: bf16 experts read no offsets");
            continue;
        }
        let count = |k: &str| readback[k].as_u64().unwrap_or(0);
        assert!(
            count("offsets_set") > 0
                && count("offsets_set") == count("grouped_mm_calls")
                && count("reads_answered") >= count("offsets_set")
                && readback.get("offsets_unknown").is_none(),
            "{name}: {readback}"
        );
        let compiled = rec["setup"]["train"]["compile"] == true;
        if compiled {
            // Each custom op reads its offsets once (`offs.tolist()`).
            assert_eq!(
                count("custom_op_calls"),
                count("grouped_mm_calls"),
                "{name}"
            );
            assert_eq!(count("reads_answered"), count("offsets_set"), "{name}");
        }
        checked[usize::from(compiled)] += 1;
    }
    assert!(checked[0] >= 18 && checked[1] >= 3, "{checked:?}");
}

/// The models people pick, at their published size (`tests/data/stub-cuda/presets.json`: full training of
/// Llama-3.2-1B, Qwen2.5-0.5B, Gemma-2-2B, Phi-3-mini, Pythia-1B and OLMoE-1B-7B from their config.json; and
/// `tests/data/finetune/presets.json`: LoRA on Llama-3.1-8B and Mistral-7B, QLoRA on Qwen2.5-1.5B), measured with
/// PyTorch's own allocator on a stub GPU large enough to hold them: held to the stub standard like the small
/// records the model was read from.
#[test]
fn preset_scale_records() {
    for (file, min) in [("presets.json", 6), ("../finetune/presets.json", 3)] {
        let (rows, unmodelled) = stub_rows_of(file, false);
        assert!(unmodelled.is_empty());
        let (table, bad_a, bad_r) = judge_stub_rows(rows, file, min);
        println!("{table}");
        assert_stub_tolerances(&table, bad_a, bad_r);
    }
}

/// `PYTORCH_CUDA_ALLOC_CONF` (`tests/data/stub-cuda/alloc-conf.json`, cases in `scripts/measure/cases-alloc-conf.json`):
/// reference cases re-run with `expandable_segments:True` (eager and compiled) and `max_split_size_mb`, the
/// variable set for PyTorch's own allocator as the setup's `train.alloc_conf` sets it for the model. Held to the
/// stub standard.
#[test]
fn stub_cuda_alloc_conf_records() {
    let (table, bad_a, bad_r) = judge_stub("alloc-conf.json", 15);
    println!("{table}");
    assert_stub_tolerances(&table, bad_a, bad_r);
}

/// "Does it fit?" where PyTorch decides it (`tests/data/stub-cuda/fit.json`, `scripts/measure/measure_fit.py`):
/// for each case, the least device memory on which PyTorch's own caching allocator runs its three steps, the
/// release-and-retry path included, bisected to the MiB on the stub GPU, against the least capacity on which the
/// allocator model serves every request (`records::fit_rows`). Held to the reserved standard (3%): the verdict on
/// the page and in the CLI is this model's.
#[test]
fn least_memory_that_fits() {
    let rows = records::fit_rows(&data_dir());
    assert!(rows.len() >= 10, "{} records", rows.len());
    let (mut table, mut bad) = (String::new(), 0);
    for r in &rows {
        assert!(r.most_failing_mib < r.least_mib, "{}", r.name);
        let over = r.error().abs() > STUB_RESERVED_TOLERANCE;
        bad += usize::from(over);
        table += &format!(
            "{:45} least measured {:>7} MiB (fails at {:>7}; {:>7} reserved with room), model {:>7} MiB \
             {:>+7.2}%{}\n",
            r.name,
            r.least_mib,
            r.most_failing_mib,
            r.unlimited_reserved_mib,
            r.model_least_mib,
            r.error() * 100.0,
            if over { " !" } else { "" }
        );
    }
    println!("{table}");
    assert_eq!(bad, 0, "\n{table}");
}

/// Hugging Face's `attn_implementation="flash_attention_2"` (issue 12; `tests/data/stub-cuda/flash.json`): the
/// flash-attn package's Python and transformers run for real on the stub device, the CUDA extension replaced by
/// the allocations of flash_api.cpp (`scripts/measure/fake_flash_attn.py`). Held to the stub standard; the record
/// with heads not a multiple of 8 wide is refused by name (FlashAttnFunc's padding is not modelled).
const FLASH_NOT_MODELLED: &[&str] = &["llama-fa2-288-hd36-bf16amp"];

#[test]
fn stub_cuda_flash_attention_2_records() {
    let (rows, unmodelled) = stub_rows_of("flash.json", true);
    let (table, bad_a, bad_r) = judge_stub_rows(rows, "flash.json", 14);
    println!("{table}\nnot modelled:\n{}", unmodelled.join("\n"));
    let refused: Vec<&str> = unmodelled
        .iter()
        .filter_map(|l| l.split(": ").next())
        .collect();
    assert_eq!(refused, FLASH_NOT_MODELLED, "refused vs listed");
    assert!(unmodelled[0].contains("heads 36 wide"), "{}", unmodelled[0]);
    assert_stub_tolerances(&table, bad_a, bad_r);
}

/// peft's LoRA with `flash_attention_2` (`tests/data/finetune/flash.json`, measured by measure_finetune.py with the
/// same stand-in for flash-attn's extension; each an SDPA record of `finetune/stub-cuda.json` with the attention
/// switched): held to the stub standard.
#[test]
fn finetune_flash_attention_2_records() {
    let (rows, unmodelled) = stub_rows_of("../finetune/flash.json", false);
    assert!(unmodelled.is_empty());
    let (table, bad_a, bad_r) = judge_stub_rows(rows, "finetune/flash.json", 3);
    println!("{table}");
    assert_stub_tolerances(&table, bad_a, bad_r);
}

/// The fine-tuning records (`tests/data/finetune/stub-cuda.json`, issue 13): LoRA, QLoRA, 8-bit bases and the
/// optimizers people pick to save memory, measured with PyTorch's own allocator. Every record is held to issue
/// 10's standard (2% allocated, 3% reserved; issue 13 asked for 5%); those vramfit refuses are listed by name with the refusal, and must be exactly
/// `FINETUNE_NOT_MODELLED`.
#[test]
fn finetune_records_allocated_and_reserved() {
    let rows = records::finetune_rows(&data_dir());
    assert_eq!(rows.len(), 66);
    let (mut table, mut bad, mut refused) = (String::new(), 0, Vec::new());
    for (name, row) in &rows {
        let r = match row {
            Ok(r) => r,
            Err(e) => {
                refused.push(name.as_str());
                table += &format!("{name:50} refused: {e}\n");
                continue;
            }
        };
        let (ea, er) = r.errors();
        let over = ea.abs() > STUB_ALLOCATED_TOLERANCE || er.abs() > STUB_RESERVED_TOLERANCE;
        bad += usize::from(over);
        table += &format!(
            "{name:50} allocated {:>11} {:>11} {:>+7.2}%  reserved {:>11} {:>11} {:>+7.2}%{}\n",
            r.measured_allocated,
            r.predicted_allocated,
            ea * 100.0,
            r.measured_reserved,
            r.predicted_reserved,
            er * 100.0,
            if over { "  <-- over tolerance" } else { "" }
        );
    }
    println!("{table}");
    assert!(
        bad == 0,
        "{bad} fine-tuning records over 2% allocated or 3% reserved:\n{table}"
    );
    assert_eq!(refused, FINETUNE_NOT_MODELLED, "\n{table}");
}

/// Every multi-GPU record is modelled: allocated within 2% and reserved within 3% (the stub standard), FSDP2's
/// records included (the all-gather and reduce-scatter buffers in their streams' own pools), but the known ones.
#[test]
fn parallel_records_allocated() {
    let rows = records::parallel_rows(&data_dir());
    let (mut table, mut bad) = (String::new(), 0);
    for p in &rows {
        let (r, name, rank) = (&p.row, &p.row.name, p.rank);
        let (ea, er) = r.errors();
        // The estimate is rank 0's, which holds the most; another rank's record is held to the same tolerance.
        let over = ea.abs() > PARALLEL_ALLOCATED_TOLERANCE;
        let reserved_known = PARALLEL_RESERVED_KNOWN.iter().find(|(n, _)| n == name);
        let over_r = reserved_known.is_none() && er.abs() > STUB_RESERVED_TOLERANCE;
        bad += usize::from(over) + usize::from(over_r);
        table += &format!(
            "{name:30} {:8} {:>2} GPUs rank {rank:>2} allocated {:>11} {:>11} {:>+7.2}%{}  reserved {:>11} {:>11} {:>+7.2}%{}  \
             at {} ({}){}\n",
            p.strategy,
            p.n_gpus,
            r.measured_allocated,
            r.predicted_allocated,
            ea * 100.0,
            if over { " !" } else { "  " },
            r.measured_reserved,
            r.predicted_reserved,
            er * 100.0,
            if over_r { " !" } else { "  " },
            r.peak_phase,
            r.peak_op,
            reserved_known
                .map(|(_, why)| format!("  (reserved: {why})"))
                .unwrap_or_default(),
        );
    }
    println!("{table}");
    assert!(
        rows.len() >= 54,
        "expected the 54 modelled DDP, FSDP2, TP, TP x FSDP2 and LoRA records, found {}",
        rows.len()
    );
    assert!(
        bad == 0,
        "{bad} multi-GPU figures over {}% allocated or {}% reserved:\n{table}",
        PARALLEL_ALLOCATED_TOLERANCE * 100.0,
        STUB_RESERVED_TOLERANCE * 100.0
    );
}

/// FSDP2's streams keep segments of their own: at the modelled peak reserved, the segments of the all-gather
/// copy-in stream and of the reduce-scatter stream add up to what PyTorch's allocator held on each at its peak, for
/// every FSDP2 record vramfit models (`tests/data/parallel/streams.json`: the stub-cuda snapshots of the records
/// read by scripts/measure/stream_segments.py; llama-fsdp-w8 holds 78 MiB on the copy-in stream, the root's output
/// in a 66 MiB segment and a block's in a 12 MiB one, and 20 MiB on the reduce-scatter stream).
#[test]
fn fsdp2_streams_hold_their_own_segments() {
    use vramfit::allocator::{TraceAction, N_STREAMS};
    use vramfit::distributed::{ALL_GATHER_COPY_IN, REDUCE_SCATTER};
    let read = |file: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(data_dir().join(file)).unwrap()).unwrap()
    };
    let (records, streams) = (
        read("parallel/stub-cuda.json"),
        read("parallel/streams.json"),
    );
    let (mut table, mut bad, mut n) = (String::new(), 0, 0);
    for m in streams["records"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        if PARALLEL_NOT_MODELLED.contains(&name) {
            continue;
        }
        let rec = records["records"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name}: no record"));
        let measured_peak = rec["measured"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["peak_reserved_bytes"].as_u64().unwrap())
            .max()
            .unwrap();
        // The snapshot was taken from a run of the record's case: the same peak.
        assert_eq!(
            m["peak_reserved_bytes"].as_u64(),
            Some(measured_peak),
            "{name}"
        );
        let (setup, _) = records::parallel_setup(&rec["case"]);
        let setup = setup_from_value(&setup).unwrap();
        let sim = vramfit::step::simulate_recording(&setup, true).unwrap();
        // Reserved bytes per stream number, now and at the first peak of their sum.
        let mut now = [0u64; N_STREAMS];
        let (mut at_peak, mut peak) = (now, 0);
        for t in sim.allocator().trace() {
            let s = usize::from(t.stream.number());
            match t.action {
                TraceAction::SegmentAlloc => now[s] += t.size,
                TraceAction::SegmentFree => now[s] -= t.size,
                _ => continue,
            }
            if now.iter().sum::<u64>() > peak {
                (peak, at_peak) = (now.iter().sum(), now);
            }
        }
        assert_eq!(peak, sim.allocator().peak_reserved_bytes(), "{name}");
        let of = |role: &str| m["streams"][role]["reserved_bytes"].as_u64().unwrap_or(0);
        let got = |s: vramfit::allocator::Stream| at_peak[usize::from(s.number())];
        let (ci, rs) = (got(ALL_GATHER_COPY_IN), got(REDUCE_SCATTER));
        let ok = ci == of("all_gather_copy_in") && rs == of("reduce_scatter");
        bad += usize::from(!ok);
        n += 1;
        table += &format!(
            "{name:30} copy-in {:>10} {:>10}  reduce-scatter {:>10} {:>10}  default {:>11} {:>11}{}\n",
            of("all_gather_copy_in"),
            ci,
            of("reduce_scatter"),
            rs,
            of("default"),
            at_peak[0],
            if ok { "" } else { "  <-- differs" }
        );
    }
    println!("{table}");
    assert!(n >= 4, "expected the FSDP2 records' streams, found {n}");
    assert!(bad == 0, "{bad} records' stream segments differ:\n{table}");
}
