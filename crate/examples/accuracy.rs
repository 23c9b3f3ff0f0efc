//! Writes docs/ACCURACY.md: every measured config in tests/data (eager) and tests/data/compiled (torch.compile)
//! against the estimate, with per-component differences and, for compiled configs, the eager estimate beside. Run by `scripts/accuracy`; `scripts/test` checks the committed file is current.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vramfit::input::setup_from_value;
use vramfit::report::fmt_bytes;
use vramfit::sim::Category;

#[path = "../tests/support/records.rs"]
mod records;
use records::{
    ParallelRow, Row, FINETUNE_NOT_MODELLED, PARALLEL_ALLOCATED_TOLERANCE, PARALLEL_RESERVED_KNOWN,
    STUB_ALLOCATED_TOLERANCE, STUB_RESERVED_TOLERANCE,
};

fn mib(b: i64) -> String {
    format!("{:.2}", b as f64 / (1 << 20) as f64)
}

/// One data directory's tables.
struct Tables {
    rows: String,
    comps: String,
    /// Compiled only: the same setup's eager estimate beside the compiled one.
    versus: String,
    errs: Vec<f64>,
    methods: std::collections::BTreeSet<String>,
    torch: std::collections::BTreeSet<String>,
}

fn tables(dir: &PathBuf) -> Tables {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("tests/data")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut rows = String::new();
    let mut comps = String::new();
    let mut versus = String::new();
    let mut errs = Vec::new();
    let mut methods = std::collections::BTreeSet::new();
    let mut torch = std::collections::BTreeSet::new();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
    {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for rec in v["records"].as_array().unwrap() {
            let name = rec["name"].as_str().unwrap();
            let setup = setup_from_value(&rec["setup"]).unwrap();
            let r = vramfit::estimate(&setup).unwrap();
            let meas = &rec["measured"];
            let measured = meas["peak_allocated_bytes"].as_u64().unwrap();
            // The fake-cuda method sums the live tensors' sizes, no allocator: the estimate's live tensors at
            // their highest, and when that was.
            assert_eq!(rec["method"], "fake-cuda", "{name}");
            let sim = vramfit::step::simulate(&setup).unwrap();
            let tensors = sim.tensor_peak();
            let predicted = tensors.bytes;
            let e = (predicted as f64 - measured as f64) / measured as f64;
            errs.push(e.abs());
            methods.insert(rec["method"].as_str().unwrap().to_string());
            torch.insert(rec["torch_version"].as_str().unwrap().to_string());
            let t = &setup.train;
            let m = &setup.model;
            if t.compile {
                let mut eager = setup.clone();
                eager.train.compile = false;
                let e = vramfit::estimate(&eager).unwrap();
                let saved = e.peak_allocated_bytes as i64 - r.peak_allocated_bytes as i64;
                writeln!(
                    versus,
                    "| {name} | {} | {} | {} ({:.0}%) | {} |",
                    fmt_bytes(e.peak_allocated_bytes),
                    fmt_bytes(r.peak_allocated_bytes),
                    fmt_bytes(saved.unsigned_abs()),
                    saved as f64 / e.peak_allocated_bytes as f64 * 100.0,
                    if saved >= 0 { "saves" } else { "costs" }
                )
                .unwrap();
            }
            writeln!(
                rows,
                "| {name} | {} {}x{} v{} | b{} t{} {} {} {}{}{}{}{} | {} | {} | {:+.4}% | {} | {} ({}) |",
                m.family.name(),
                m.n_layer,
                m.n_embd,
                m.vocab_size,
                t.batch_size,
                t.seq_len,
                t.precision.name(),
                t.optimizer.name(),
                t.attention.name(),
                if m.dropout > 0.0 { format!(" drop{}", m.dropout) } else { String::new() },
                if t.checkpointing { " ckpt" } else { "" },
                if t.grad_accum_steps > 1 {
                    format!(" accum{}", t.grad_accum_steps)
                } else {
                    String::new()
                },
                if t.zero_grad_set_to_none { "" } else { " keep-grads" },
                fmt_bytes(measured),
                fmt_bytes(predicted),
                e * 100.0,
                meas["peak_phase"].as_str().unwrap(),
                tensors.phase.label(),
                tensors.op
            )
            .unwrap();
            // Per-component: the measurement labels weights, optimizer state and hidden (kernel) allocations;
            // everything else (grads, activations, logits, temporaries, autocast copies) is "the rest".
            let at = meas["at_peak"].as_object().unwrap();
            let sum = |f: &dyn Fn(&str) -> bool| -> i64 {
                at.iter()
                    .filter(|(k, _)| f(k))
                    .map(|(_, v)| v.as_i64().unwrap())
                    .sum()
            };
            let mw = sum(&|k| k == "weights");
            let mo = sum(&|k| k == "optimizer");
            let mh = sum(&|k| k.starts_with("hidden:"));
            let mr = measured as i64 - mw - mo - mh;
            let c = &tensors.by_category;
            let pw = c[Category::Weights.index()] as i64;
            let po = c[Category::Optimizer.index()] as i64;
            let ph = c[Category::Workspace.index()] as i64;
            let pr = predicted as i64 - pw - po - ph;
            writeln!(
                comps,
                "| {name} | {} / {} | {} / {} | {} / {} | {} / {} |",
                mib(mw),
                mib(pw - mw),
                mib(mo),
                mib(po - mo),
                mib(mh),
                mib(ph - mh),
                mib(mr),
                mib(pr - mr)
            )
            .unwrap();
        }
    }
    errs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Tables {
        rows,
        comps,
        versus,
        errs,
        methods,
        torch,
    }
}

fn summary(t: &Tables, within: f64) -> String {
    let errs = &t.errs;
    let median = errs[errs.len() / 2] * 100.0;
    let max = errs.last().copied().unwrap_or(0.0) * 100.0;
    let n_within = errs.iter().filter(|e| **e <= within).count();
    format!(
        "{} configs, methods: {}; PyTorch {}. Within {}%: {}/{}. Median |error| {:.4}%, max |error| {:.4}%.\n",
        errs.len(),
        t.methods.iter().cloned().collect::<Vec<_>>().join(", "),
        t.torch.iter().cloned().collect::<Vec<_>>().join(", "),
        within * 100.0,
        n_within,
        errs.len(),
        median,
        max
    )
}

/// The founding case as its user ran it (compiled, gradient accumulation 4, RTX 4070): the predicted nvidia-smi
/// figure against the 4,464 MiB they saw (issues 6 and 11), with the CUDA-context figure spelled out.
fn founding_on_the_device() -> String {
    use vramfit::report::{cuda_context_bytes, CUDA_CONTEXT_BYTES_RANGE};
    let mut s = vramfit::presets::founding();
    s.train.grad_accum_steps = 4;
    let r = vramfit::estimate(&s).unwrap();
    let mib = |b: u64| format!("{:.0} MiB", b as f64 / (1 << 20) as f64);
    let seen: u64 = 4464 << 20;
    let err = (r.device_total_bytes as f64 - seen as f64) / seen as f64 * 100.0;
    let implied = seen.saturating_sub(r.peak_reserved_bytes);
    format!(
        "\n## The founding case on its GPU (nvidia-smi)\n\n\
nanoGPT 6 x 384, block 512, batch 16, vocab 50304, fp16 autocast, fused AdamW, `torch.compile`, gradient\n\
accumulation 4, on an RTX 4070 (sm_89: cuBLAS workspace 8 MiB + 128 KiB per GEMM). Its user saw about 4,464 MiB\n\
for the process in nvidia-smi.\n\n\
| | predicted |\n|---|---|\n\
| peak allocated | {} |\n| peak reserved (caching-allocator model) | {} |\n\
| CUDA context (GeForce-class figure) | {} (published figures span {} to {}) |\n\
| on the device (reserved + context) | {} ({:+.1}% against 4,464 MiB) |\n\n\
The CUDA context is not measured by this project: {} is the published figure for an RTX 3090 under CUDA 12.8 with\n\
lazy loading (see `cuda_context_bytes` in `crate/src/describe/model.rs` for the sources); the observation leaves {} above\n\
the modelled reserved memory for it. A GPU session settles it (`VRAMFIT_REAL_CUDA=1 scripts/measure/run` records\n\
NVML's figure beside `max_memory_reserved()`).\n\n\
nanoGPT's `train.py` also evaluates before its first step (`estimate_loss()` at iteration 0, compiled, under\n\
`torch.no_grad()`). PyTorch's own allocator then holds 4,188 MiB for this run instead of 4,048 MiB\n\
(`tests/data/stub-cuda/seed-run-eval.json`, `scripts/measure/seed_run_eval.py`): with the published 256 MiB context\n\
that is 4,444 MiB, 0.4% under what its user saw. The estimate does not model that evaluation pass yet.\n",
        mib(r.peak_allocated_bytes),
        mib(r.peak_reserved_bytes),
        mib(cuda_context_bytes(89)),
        mib(CUDA_CONTEXT_BYTES_RANGE.0),
        mib(CUDA_CONTEXT_BYTES_RANGE.1),
        mib(r.device_total_bytes),
        err,
        mib(cuda_context_bytes(89)),
        mib(implied)
    )
}

/// The stub-cuda records of one file (PyTorch's own caching allocator): allocated and reserved, measured against
/// predicted; returns the table rows, the |errors| of allocated and of reserved.
fn stub_table(path: &Path) -> (String, Vec<f64>, Vec<f64>) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return (String::new(), Vec::new(), Vec::new());
    };
    let v: Value = serde_json::from_str(&text).unwrap();
    let (mut rows, mut ea, mut er) = (String::new(), Vec::new(), Vec::new());
    let mut unmodelled = Vec::new();
    for rec in v["records"].as_array().unwrap() {
        // `finetune_setup`: a fine-tuning record's LoraConfig moved into `train`; other setups unchanged.
        let Ok(r) =
            setup_from_value(&records::finetune_setup(rec)).and_then(|s| vramfit::estimate(&s))
        else {
            // A family or combination not modelled yet (hf.json): listed under the table.
            unmodelled.push(rec["name"].as_str().unwrap().to_string());
            continue;
        };
        let m = &rec["measured"];
        let (ma, mr) = (
            m["peak_allocated_bytes"].as_u64().unwrap(),
            m["peak_reserved_bytes"].as_u64().unwrap(),
        );
        // Compiled records are re-runs (Inductor's caches warm); the first run's reserved, for comparison.
        let first = rec["first_run"]["peak_reserved_bytes"]
            .as_i64()
            .map(mib)
            .unwrap_or_default();
        let a = (r.peak_allocated_bytes as f64 - ma as f64) / ma as f64;
        let e = (r.peak_reserved_bytes as f64 - mr as f64) / mr as f64;
        ea.push(a.abs());
        er.push(e.abs());
        writeln!(
            rows,
            "| {} | {} | {} | {} | {:+.2}% | {} | {} | {:+.2}% | {} | {first} |",
            rec["name"].as_str().unwrap(),
            rec["device"]["compute_capability"].as_str().unwrap_or(""),
            mib(ma as i64),
            mib(r.peak_allocated_bytes as i64),
            a * 100.0,
            mib(mr as i64),
            mib(r.peak_reserved_bytes as i64),
            e * 100.0,
            m["peak_segments"],
        )
        .unwrap();
    }
    if !unmodelled.is_empty() {
        writeln!(
            rows,
            "\nMeasured, not modelled yet ({}): {}.",
            unmodelled.len(),
            unmodelled.join(", ")
        )
        .unwrap();
    }
    (rows, ea, er)
}

/// How many of the |errors| are within the tolerance, their median and their maximum.
fn stats(v: &[f64], tol: f64) -> String {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let within = s.iter().filter(|e| **e <= tol).count();
    format!(
        "{within}/{} within {}%, {}",
        s.len(),
        tol * 100.0,
        median_max(&s)
    )
}

/// The median and the maximum of sorted |errors|.
fn median_max(sorted: &[f64]) -> String {
    format!(
        "median {:.2}%, max {:.2}%",
        sorted.get(sorted.len() / 2).copied().unwrap_or(0.0) * 100.0,
        sorted.last().copied().unwrap_or(0.0) * 100.0
    )
}

fn stub_summary(ea: &[f64], er: &[f64]) -> String {
    format!(
        "allocated {}; reserved {}",
        stats(ea, STUB_ALLOCATED_TOLERANCE),
        stats(er, STUB_RESERVED_TOLERANCE)
    )
}

/// A row's figures as table cells: allocated measured, predicted, error; reserved measured, predicted, error
/// (MiB); `reserved_note` follows the reserved error; the predicted peak's phase and op.
fn row_cells(r: &Row, reserved_note: &str) -> String {
    let (ea, er) = r.errors();
    format!(
        "{} | {} | {:+.2}% | {} | {} | {:+.2}%{reserved_note} | {} ({})",
        mib(r.measured_allocated as i64),
        mib(r.predicted_allocated as i64),
        ea * 100.0,
        mib(r.measured_reserved as i64),
        mib(r.predicted_reserved as i64),
        er * 100.0,
        r.peak_phase,
        r.peak_op
    )
}

/// The fine-tuning records (issue 13): the summary line and the section.
fn finetune_section(rows: &[(String, Result<Row, vramfit::Error>)]) -> (String, String) {
    let (mut ea, mut er, mut table, mut refused) =
        (Vec::new(), Vec::new(), String::new(), String::new());
    for (name, row) in rows {
        match row {
            Ok(r) => {
                let (a, e) = r.errors();
                ea.push(a.abs());
                er.push(e.abs());
                writeln!(table, "| {name} | {} |", row_cells(r, "")).unwrap();
            }
            Err(e) => writeln!(refused, "- `{name}`: {e}").unwrap(),
        }
    }
    let summary = format!(
        "allocated {}; reserved {}",
        stats(&ea, STUB_ALLOCATED_TOLERANCE),
        stats(&er, STUB_RESERVED_TOLERANCE)
    );
    let mut out = format!(
        "\n## Fine-tuning: LoRA, QLoRA, 8-bit bases and optimizers (method `stub-cuda`)\n\n\
Records in `tests/data/finetune/stub-cuda.json` (issue 13): peft's LoRA on fp32, bf16 and fp16 bases, under fp32,\n\
autocast and pure bf16, with and without checkpointing; QLoRA on bitsandbytes' 4-bit bases (NF4, FP4, double\n\
quantization) and LoRA on its 8-bit bases (`Linear8bitLt`, no outlier columns: the stub's activations read as\n\
zeros); the optimizers people pick to save memory (torch's AdamW, Adafactor and SGD, bitsandbytes' 8-bit and paged\n\
AdamW, Lion and 8-bit Lion). Measured with PyTorch's own caching allocator on the stubbed sm_90 GPU, with\n\
transformers, peft and bitsandbytes running unchanged (bitsandbytes' kernels are no-ops, its buffers real\n\
allocations); paged optimizers' managed memory is outside PyTorch's counters and so outside these figures (see\n\
`tests/data/finetune/README.md`). Held to issue 10's standard: allocated within {}%, reserved within {}%, on every \
record.\n\n\
### {summary}\n\n\
| config | allocated measured (MiB) | predicted | error | reserved measured | predicted | error | predicted at (op) |\n\
|---|---|---|---|---|---|---|---|\n",
        STUB_ALLOCATED_TOLERANCE * 100.0,
        STUB_RESERVED_TOLERANCE * 100.0
    );
    out += &table;
    if refused.is_empty() {
        assert!(FINETUNE_NOT_MODELLED.is_empty());
        out += "\nEvery record is modelled; none is refused.\n";
    } else {
        writeln!(out, "\nRefused (not modelled yet):\n\n{refused}").unwrap();
    }
    (summary, out)
}

/// The multi-GPU records (issue 14): the summary line and the section.
fn parallel_section(rows: &[ParallelRow]) -> (String, String) {
    let (mut ea, mut er) = (Vec::new(), Vec::new());
    let mut table = String::new();
    for p in rows {
        let (a, e) = p.row.errors();
        ea.push(a.abs());
        er.push(e.abs());
        let known = PARALLEL_RESERVED_KNOWN
            .iter()
            .any(|(n, _)| *n == p.row.name);
        let note = if known { " (known, below)" } else { "" };
        writeln!(
            table,
            "| {} | {} | {} | {} | {} |",
            p.row.name,
            p.strategy,
            p.n_gpus,
            p.rank,
            row_cells(&p.row, note)
        )
        .unwrap();
    }
    let known = match PARALLEL_RESERVED_KNOWN.len() {
        0 => String::new(),
        n => format!(" ({n} known, below)"),
    };
    let summary = format!(
        "allocated {}; reserved {}{known}",
        stats(&ea, PARALLEL_ALLOCATED_TOLERANCE),
        stats(&er, STUB_RESERVED_TOLERANCE),
    );
    let mut out = format!(
        "\n## More than one GPU: DDP, FSDP2, tensor parallel, TP x FSDP2 (method `stub-cuda`)\n\n\
Records in `tests/data/parallel/stub-cuda.json` (issue 14) and, at the presets' published size (`preset-` records:\n\
Llama-3.1-8B under FSDP2 on 8 GPUs, Llama-3.2-1B under DDP on 4), `tests/data/parallel/presets.json`: nanoGPT's GPT and Hugging Face's Llama under\n\
`DistributedDataParallel` (buckets, `gradient_as_bucket_view`, `static_graph`, accumulation with and without sync),\n\
FSDP2's `fully_shard` (reshard after forward or not, `MixedPrecisionPolicy`, CPU offload, accumulation), tensor\n\
parallelism (plan basic and torchtitan's sequence parallel) and TP x FSDP2 on a (dp, tp) mesh. One process per case\n\
plays one rank on PyTorch's own caching allocator with a fake process group (its collectives write nothing, but\n\
every buffer they read or write is allocated by PyTorch as with NCCL); NCCL's own buffers and the CUDA context are\n\
not in these figures (see `tests/data/parallel/README.md`). Figures are per GPU, for the measured rank; the\n\
estimate is rank 0's, which holds the most. Issue 10's standard: allocated within {}% on every record; reserved\n\
within the stub standard ({}%). Under FSDP2 the all-gather buffers come from the pool of the all-gather copy-in\n\
stream and the reduce-scatter outputs from the reduce-scatter stream's, each with its own segments; the allocator\n\
model keeps a pool per stream as PyTorch's does.\n\n\
### {summary}\n\n\
| config | strategy | GPUs | rank | allocated measured (MiB) | predicted | error | reserved measured | predicted | error | predicted at (op) |\n\
|---|---|---|---|---|---|---|---|---|---|---|\n",
        PARALLEL_ALLOCATED_TOLERANCE * 100.0,
        STUB_RESERVED_TOLERANCE * 100.0
    );
    out += &table;
    if !PARALLEL_RESERVED_KNOWN.is_empty() {
        out += "\nKnown exceptions (reserved), with what is known:\n\n";
    }
    for (name, why) in PARALLEL_RESERVED_KNOWN {
        writeln!(out, "- `{name}`: {why}.").unwrap();
    }
    (summary, out)
}

/// The stub-cuda tables of both files, each read and estimated once: (title, rows, |errors| allocated, reserved).
type StubTables = Vec<(&'static str, String, Vec<f64>, Vec<f64>)>;

fn stub_tables(dir: &Path) -> StubTables {
    [
        ("Eager", "measured.json"),
        ("torch.compile", "compiled.json"),
        (
            "PYTORCH_CUDA_ALLOC_CONF: expandable_segments, max_split_size_mb, garbage_collection_threshold \
(tests/data/stub-cuda/alloc-conf.json; \
cases in scripts/measure/cases-alloc-conf.json)",
            "alloc-conf.json",
        ),
        (
            "The presets at their published size: full training from each model's config.json \
(tests/data/stub-cuda/presets.json; cases in scripts/measure/cases-presets.json)",
            "presets.json",
        ),
        (
            "The presets at their published size: LoRA and QLoRA as peft and bitsandbytes apply them \
(tests/data/finetune/presets.json; cases in scripts/measure/cases-finetune-presets.json)",
            "../finetune/presets.json",
        ),
        (
            "Hugging Face families from config.json (eager and compiled)",
            "hf.json",
        ),
        (
            "Hugging Face attn_implementation=\"flash_attention_2\" (flash-attn 2.8.3.post2), with each case's SDPA \
twin (derived: flash-attn's Python and transformers run for real on the stub device; the CUDA extension replaced \
by allocations read from flash_api.cpp)",
            "flash.json",
        ),
        (
            "peft's LoRA with attn_implementation=\"flash_attention_2\" (tests/data/finetune/flash.json; derived: \
flash-attn's Python, transformers and peft run for real on the stub device; the CUDA extension replaced by \
allocations read from flash_api.cpp)",
            "../finetune/flash.json",
        ),
    ]
    .into_iter()
    .map(|(title, file)| {
        let (rows, ea, er) = stub_table(&dir.join("stub-cuda").join(file));
        (title, rows, ea, er)
    })
    .collect()
}

fn stub_section(tables: &StubTables) -> String {
    let mut out = String::from(
        "\n## PyTorch's own caching allocator (method `stub-cuda`)\n\n\
Records in `tests/data/stub-cuda/`: every reference case run as people run it, with PyTorch's real CUDA code and its\n\
real caching allocator on a GPU that does not exist (stub CUDA runtime, driver, cuBLAS and NVML libraries preloaded\n\
under the real sonames; kernels do nothing, memory is address space never touched; `scripts/measure/stub_cuda.py`,\n\
`scripts/measure/stubs/`, `scripts/measure/measure_stub.py`). The figures are PyTorch's own counters\n\
(`max_memory_allocated`, `max_memory_reserved`, `memory_stats`) over three steps, each case in its own process on a\n\
device with its compute capability, SM count and memory. Known limits: cuDNN attention is off (flash or\n\
memory-efficient attention instead), values read back are zeros (GradScaler never skips a step), autotuning sees\n\
equal timings. Issue 10's standard: allocated within 2%, reserved within 3%, on every record.\n\n\
Differences from the fake-cuda method, found with this one and now in the estimator: the cuBLAS workspace is taken\n\
from the allocator for each GEMM and returned after it (32 MiB on sm_90, 8 MiB + 128 KiB before; cuBLASLt's 1 MiB,\n\
on every architecture, for an `addmm` with a bias, or with a 2-D matrix in fp16 or bf16: 126 GEMMs probed in\n\
`tests/data/stub-cuda/blas_workspace.json`), so it counts only inside a GEMM; under autocast the tied embedding's two gradients are\n\
summed in place; a Linear's weight gradient comes before its input gradient; the reference runs build a tied head\n\
with its own weight and then free one of the two. Compiled records are re-runs, Inductor's caches warm: a script's\n\
first run of a new shape also autotunes kernels on copies of their arguments, which can leave the allocator holding\n\
more (the last column; not modelled, see `tests/data/stub-cuda/README.md`). Records outside the tolerances are\n\
listed with their cause in `crate/tests/reference.rs`.\n\n",
    );
    for (title, rows, ea, er) in tables {
        if rows.is_empty() {
            continue;
        }
        writeln!(out, "### {title}: {}\n", stub_summary(ea, er)).unwrap();
        out += "| config | sm | allocated measured (MiB) | predicted | error | reserved measured | predicted | error | segments | reserved, first run |\n|---|---|---|---|---|---|---|---|---|---|\n";
        out += rows;
        out += "\n";
    }
    out
}

/// "Does it fit?": the least memory each case of `tests/data/stub-cuda/fit.json` runs in, PyTorch's allocator
/// against the model's (`records::fit_rows`). Returns the summary line and the section.
fn fit_section(rows: &[records::FitRow]) -> (String, String) {
    let errors: Vec<f64> = rows.iter().map(|r| r.error().abs()).collect();
    let summary = format!(
        "the least memory a case runs in {}",
        stats(&errors, STUB_RESERVED_TOLERANCE)
    );
    let mut out = format!(
        "\n## Does it fit? The least memory a run needs (method `stub-cuda`)\n\n\
Records in `tests/data/stub-cuda/fit.json` (`scripts/measure/measure_fit.py`): for each case, the stub device's\n\
memory (what `cudaMalloc` may take, no CUDA context) bisected to the MiB to the least on which PyTorch's caching\n\
allocator runs the three steps, its release-and-retry path included, and the allocator model bisected the same\n\
way. The page's and the CLI's verdict is the model's: the device's memory less its CUDA context must hold it.\n\n\
### {summary}\n\n\
| config | least measured (MiB) | fails at | model's least | error | reserved with room |\n|---|---|---|---|---|---|\n"
    );
    for r in rows {
        writeln!(
            out,
            "| {} | {} | {} | {} | {:+.2}% | {} |",
            r.name,
            r.least_mib,
            r.most_failing_mib,
            r.model_least_mib,
            r.error() * 100.0,
            r.unlimited_reserved_mib
        )
        .unwrap();
    }
    (summary, out)
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data");
    let (finetune_summary, finetune) = finetune_section(&records::finetune_rows(&dir));
    let (fit_summary, fit) = fit_section(&records::fit_rows(&dir));
    let (parallel_summary, parallel) = parallel_section(&records::parallel_rows(&dir));
    let eager = tables(&dir);
    let compiled = tables(&dir.join("compiled"));
    let mut out = String::new();
    writeln!(out, "# Accuracy: predicted vs measured\n").unwrap();
    writeln!(
        out,
        "Generated by `scripts/accuracy` from `tests/data/*.json`, `tests/data/compiled/*.json`,\n\
`tests/data/stub-cuda/*.json`, `tests/data/finetune/*.json` and `tests/data/parallel/*.json`; do not edit by hand.\n"
    )
    .unwrap();
    out += "Against PyTorch's own caching allocator (method `stub-cuda`, the reference; tables at the end):\n\n";
    let stub = stub_tables(&dir);
    for (title, _, ea, er) in &stub {
        writeln!(out, "- {title}: {}", stub_summary(ea, er)).unwrap();
    }
    writeln!(
        out,
        "- Fine-tuning (LoRA, QLoRA, 8-bit bases and optimizers): {finetune_summary}"
    )
    .unwrap();
    writeln!(
        out,
        "- More than one GPU (DDP, FSDP2, tensor parallel, TP x FSDP2): {parallel_summary}"
    )
    .unwrap();
    writeln!(out, "- Does it fit: {fit_summary}").unwrap();
    out += "\nAgainst the fake-cuda replay (the op-by-op cross-check, which counts tensors, not the allocator's blocks: \
compared with the estimate's live tensors at their highest, `peak_tensor_bytes`):\n\n";
    writeln!(out, "- Eager: {}", summary(&eager, 0.05).trim_end()).unwrap();
    writeln!(
        out,
        "- torch.compile: {}\n",
        summary(&compiled, 0.08).trim_end()
    )
    .unwrap();
    out += "## What the numbers are\n\n\
The **measured** figure of the tables below is the highest sum of live tensors over three full training steps,\n\
each rounded to 512 B as PyTorch's CUDA caching allocator rounds it; `max_memory_allocated()` counts the allocator's\n\
blocks instead, which can be larger than the tensors in them (a cached block is split only when more than 1 MiB\n\
would be left), so these tables are compared with the estimate's live tensors at their highest (`peak_tensor_bytes`),\n\
and the stub-cuda tables, PyTorch's own allocator, with its peak allocated. Method `fake-cuda` (no GPU was available to this project yet): the real PyTorch 2.15\n\
dispatcher runs the whole training loop (CUDA autocast lists, SDPA backend choice, fused dropout, foreach and fused\n\
optimizers, the autograd engine's device thread) on `FakeTensorMode` tensors on device `cuda`; every new storage is\n\
counted, rounded up to 512 B, and freed when its last reference dies. Allocations that CUDA kernels make\n\
internally, which fake kernels never make, are added explicitly and identically in the harness and the estimator:\n\
the cuBLAS workspace of each GEMM (32 MiB on sm_90, 8 MiB + 128 KiB before) or, for an `addmm` that ATen sends\n\
through cuBLASLt (a bias in any dtype, a 2-D matrix in fp16 or bf16), cuBLASLt's 1 MiB instead, which GEMM takes\n\
which found with PyTorch's own allocator (`tests/data/stub-cuda/blas_workspace.json`), FlashAttention-2 backward's `dq_accum` and\n\
`softmax_d`, memory-efficient attention backward's `delta`, and embedding backward's index sort buffers.\n\
See `scripts/measure/measure.py`.\n\n\
Because the estimator follows the same op-by-op allocations, fake-cuda records agree to within a few KiB. That\n\
agreement shows the op model is complete for these configs; it does **not** show agreement with a physical GPU,\n\
whose kernels may allocate scratch not listed above. GPU records (method `cuda`) are judged at the issue's\n\
tolerance of 5% per config and 2% median; fake-cuda records at 0.1% (a regression check).\n\n\
The predicted phase is the estimator's label: `loss backward` is the part of backward from the loss to the\n\
final norm (`step2:backward` in the harness).\n\n";
    out += "## Live tensors at the peak\n\n| config | model | training | measured | predicted | error | measured at | predicted at (op) |\n|---|---|---|---|---|---|---|---|\n";
    out += &eager.rows;
    out += "\n## Per component at the peak (MiB): measured / predicted − measured\n\n\
The harness labels parameters and buffers (weights), optimizer state, and the hidden kernel allocations; the rest\n\
is grads, saved activations, logits and temporaries together.\n\n\
| config | weights | optimizer | workspace | rest |\n|---|---|---|---|---|\n";
    out += &eager.comps;
    out += "\n## torch.compile (Inductor)\n\n\
Records in `tests/data/compiled/`: nanoGPT's GPT and Hugging Face's LlamaForCausalLM under `torch.compile`, measured\n\
with the same fake-CUDA method; Inductor compiles for the stub's compute capability with its default settings (pattern\n\
passes on), its Triton kernels are built but never launched, and the generated wrapper's `call()` runs on fake CUDA\n\
tensors, so every buffer it allocates, reuses and frees is replayed, and so is everything between the compiled graphs\n\
(the autograd engine's zeros for the logits' unused gradient); a self-check fails a run when any CUDA storage escapes\n\
the tracker (see `prepare_fake_inductor` in `scripts/measure/measure.py` and `tests/data/compiled/README.md`). All\n\
records were re-measured so for issue 11; its changes to the model were read from traces of seven tiny variants, and\n\
the 20 configs added for it (from the seed run, accumulation 4 on sm_89, on) were held out. One re-measured record,\n\
`grads-dominate-accum3-fp16`, came out 6% low; its wrapper showed the early zero-fill of the embedding gradients when\n\
the sequence is shorter than the block, which the model now follows. The estimator's model of the compiled step is\n\
`crate/src/run/compiled.rs`. nanoGPT: the first 16 configs were read while writing it; the 11 after `nanogpt-30m-accum2`\n\
were measured afterwards and not used to write it (held out); the 6 after `gpt2-8layer-bias-fp16` were measured\n\
where the property tests pointed (they corrected the tied embedding's gradient sum and the manual path without\n\
autocast; `tiny-vocab-grads-amp` shows the model's largest error); the next 2 (train.py's defaults, GPT-2 large)\n\
were held out again. Llama: the first 2 were read while writing its part; of the 6 held out after them,\n\
`llama-8x1024-bf16` was 6% low and corrected the model (then, with the passes off, HF's loss gradient was fp32 in pure\n\
bf16; with them on it is in the logits' dtype); the last 2\n\
were held out again.\n\
Tolerance: 8% per config for GPU records (issue 6), 2% for fake-cuda (a regression check; see `reference.rs`).\n\n";
    out += "| config | model | training | measured | predicted | error | measured at | predicted at (op) |\n|---|---|---|---|---|---|---|---|\n";
    out += &compiled.rows;
    out += "\n### Per component at the peak (MiB): measured / predicted − measured\n\n\
| config | weights | optimizer | workspace | rest |\n|---|---|---|---|---|\n";
    out += &compiled.comps;
    out += "\n### Eager vs compiled, both predicted\n\n\
| config | eager | compiled | difference | |\n|---|---|---|---|---|\n";
    out += &compiled.versus;
    out += &stub_section(&stub);
    out += &finetune;
    out += &parallel;
    out += &fit;
    out += &founding_on_the_device();
    print!("{out}");
}
