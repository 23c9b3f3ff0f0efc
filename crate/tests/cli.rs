#![cfg(not(target_arch = "wasm32"))]
//! The command line, driven as a person would: real files, real flags, exit statuses and messages.

use serde_json::Value;
use std::path::PathBuf;

#[path = "support/cli.rs"]
mod cli;
use cli::{error_of, vramfit};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn json_of(args: &[&str]) -> Value {
    let (code, out, err) = vramfit(args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("JSON output")
}

#[test]
fn estimate_json_has_the_documented_fields_and_adds_up() {
    let v = json_of(&[
        "estimate",
        "--config",
        &fixture("founding.json"),
        "--format",
        "json",
    ]);
    for key in [
        "n_params",
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "device_total_bytes",
        "peak_phase",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    let c = &v["components"];
    let sum: u64 = c
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(sum, v["peak_allocated_bytes"].as_u64().unwrap());
    // 30,135,168 parameters: wte 50304x384 + wpe 512x384 + 6 x 1,769,472 + ln_f 384.
    assert_eq!(v["n_params"], 30_135_168);
    // Every parameter tensor here is a whole number of 512-byte blocks.
    assert_eq!(c["weights_bytes"], 30_135_168 * 4);
    assert!(v["peak_reserved_bytes"].as_u64() >= v["peak_allocated_bytes"].as_u64());
}

#[test]
fn default_run_is_the_founding_case_and_flags_override() {
    let a = json_of(&["estimate", "--format", "json"]);
    let b = json_of(&[
        "estimate",
        "--config",
        &fixture("founding.json"),
        "--format",
        "json",
    ]);
    assert_eq!(a["peak_allocated_bytes"], b["peak_allocated_bytes"]);
    let c = json_of(&["estimate", "--batch-size", "8", "--format", "json"]);
    assert!(c["peak_allocated_bytes"].as_u64() < a["peak_allocated_bytes"].as_u64());
    assert_eq!(c["setup"]["train"]["batch_size"], 8);
}

#[test]
fn compile_flag_switches_the_model_and_the_table_compares_both() {
    let compiled = json_of(&["estimate", "--format", "json"]);
    let eager = json_of(&["estimate", "--no-compile", "--format", "json"]);
    assert_eq!(compiled["setup"]["train"]["compile"], true);
    assert_eq!(eager["setup"]["train"]["compile"], false);
    let (c, e) = (
        compiled["peak_allocated_bytes"].as_u64().unwrap(),
        eager["peak_allocated_bytes"].as_u64().unwrap(),
    );
    // Eager holds 12 bytes per logit at its peak, compiled 6 (the logits, the zeros the autograd engine makes for
    // their unused gradient, the fused loss's fp16 gradient: issue 11): 6 x 16 x 512 x 50304 B apart, less the
    // fused loss's per-row statistics and what else differs (blocks, casts) - at least 2.2 GiB.
    assert!(e - c > 2_200 << 20, "eager {e} compiled {c}");
    let (code, out, _) = vramfit(&["estimate", "--no-compile"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("torch.compile saves 2.30 GiB here (eager 5.66 GiB -> compiled 3.36 GiB), mostly in the logits"),
        "{out}"
    );
    assert!(out.contains("note: eager mode"), "{out}");
    let (_, out, _) = vramfit(&["estimate"]);
    assert!(out.contains(", torch.compile,"), "{out}");
    // Llama compiles too (HF's loss upcasts the logits, but its fused loss gradient is in the logits' dtype).
    let llama = json_of(&[
        "estimate",
        "--preset",
        "tinyllama-1.1b",
        "--compile",
        "--format",
        "json",
    ]);
    let llama_eager = json_of(&["estimate", "--preset", "tinyllama-1.1b", "--format", "json"]);
    assert!(
        llama["peak_allocated_bytes"].as_u64() < llama_eager["peak_allocated_bytes"].as_u64(),
        "{llama} vs {llama_eager}"
    );
    // With checkpointing too (issue 11): the compiled step saves only each layer's input, so 22 layers of
    // TinyLlama hold far less than without it.
    let ckpt = json_of(&[
        "estimate",
        "--preset",
        "tinyllama-1.1b",
        "--compile",
        "--checkpointing",
        "--format",
        "json",
    ]);
    assert_eq!(ckpt["setup"]["train"]["checkpointing"], true);
    assert_eq!(ckpt["setup"]["train"]["compile"], true);
    assert!(
        ckpt["peak_allocated_bytes"].as_u64() < llama["peak_allocated_bytes"].as_u64(),
        "{ckpt} vs {llama}"
    );
}

#[test]
fn table_output_names_the_peak_and_the_largest_item() {
    let (code, out, _) = vramfit(&["estimate"]);
    assert_eq!(code, 0);
    assert!(out.contains("peak allocated"), "{out}");
    assert!(
        out.contains("The largest item at the peak is logits"),
        "{out}"
    );
    assert!(out.contains("16 x 512 tokens x 50304 vocab"), "{out}");
}

#[test]
fn nanogpt_config_files_fill_defaults_and_say_where_values_came_from() {
    let v = json_of(&[
        "estimate",
        "--nanogpt",
        &fixture("shakespeare_char.py"),
        "--format",
        "json",
    ]);
    assert_eq!(v["setup"]["model"]["vocab_size"], 65);
    assert_eq!(v["setup"]["train"]["batch_size"], 64);
    assert_eq!(v["setup"]["train"]["precision"], "bf16-amp");
    let notes: Vec<String> = v["source_notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n == "dtype = 'bfloat16' (train.py default)"),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n == "batch_size = 64 (config line 15)"),
        "{notes:?}"
    );
    // train.py compiles unless the config says otherwise: the estimate is the compiled step.
    assert!(
        notes
            .iter()
            .any(|n| n == "compile = True (train.py default)"),
        "{notes:?}"
    );
    assert_eq!(v["setup"]["train"]["compile"], true);

    let v = json_of(&[
        "estimate",
        "--nanogpt",
        &fixture("gpt2_124m.py"),
        "--format",
        "json",
    ]);
    assert_eq!(v["setup"]["train"]["grad_accum_steps"], 40);
    // train.py defaults to bias = False: 124,475,904 - 102,144 biases.
    assert_eq!(v["n_params"], 124_373_760);

    let v = json_of(&[
        "estimate",
        "--nanogpt",
        &fixture("finetune_xl.py"),
        "--format",
        "json",
    ]);
    assert_eq!(v["setup"]["model"]["n_layer"], 48);
    assert_eq!(v["setup"]["model"]["vocab_size"], 50257);
    assert_eq!(v["setup"]["model"]["bias"], true);
}

#[test]
fn hf_config_json_reads_a_llama() {
    let v = json_of(&[
        "estimate",
        "--hf",
        &fixture("tinyllama_config.json"),
        "--format",
        "json",
    ]);
    assert_eq!(v["n_params"], 1_100_048_384u64);
    assert_eq!(v["setup"]["model"]["family"], "llama");
}

/// Qwen2.5-0.5B's config.json: the qwen2 family, its q/k/v biases in the published parameter count, and the
/// same estimate as the preset; a model type vramfit does not model is one message and exit 2.
#[test]
fn hf_config_json_reads_a_qwen2_and_names_an_unknown_model_type() {
    let v = json_of(&[
        "estimate",
        "--hf",
        &fixture("qwen2.5-0.5b_config.json"),
        "--format",
        "json",
    ]);
    assert_eq!(v["n_params"], 494_032_768u64);
    assert_eq!(v["setup"]["model"]["family"], "qwen2");
    let preset = json_of(&["estimate", "--preset", "qwen2.5-0.5b", "--format", "json"]);
    assert_eq!(v["peak_allocated_bytes"], preset["peak_allocated_bytes"]);
    let dir = std::env::temp_dir().join(format!("vramfit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"model_type": "bert", "hidden_size": 768, "num_attention_heads": 12}"#,
    )
    .unwrap();
    assert_eq!(
        error_of(&["estimate", "--hf", config.to_str().unwrap()]),
        "error: model_type (\"bert\") is not one of: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, olmo2, \
         phi3, gpt_neox, mixtral, qwen2_moe, olmoe"
    );
    // A field the family needs and the file lacks is named.
    std::fs::write(
        &config,
        r#"{"model_type": "gpt_neox", "hidden_size": 768, "num_attention_heads": 12}"#,
    )
    .unwrap();
    assert_eq!(
        error_of(&["estimate", "--hf", config.to_str().unwrap()]),
        "error: missing required field \"num_hidden_layers\""
    );
}

#[test]
fn bad_input_exits_2_with_one_clear_message() {
    assert_eq!(
        error_of(&["estimate", "--batch-size", "0"]),
        "error: train.batch_size (0) must be at least 1"
    );
    assert_eq!(
        error_of(&["estimate", "--batch-size", "-3"]),
        "error: train.batch_size (-3) must be at least 1"
    );
    assert_eq!(
        error_of(&["estimate", "--n-head", "7"]),
        "error: model.n_embd (384) must be divisible by model.n_head (7)"
    );
    assert_eq!(
        error_of(&["estimate", "--seq-len", "1024"]),
        "error: train.seq_len (1024) is longer than model.block_size (512)"
    );
    assert_eq!(
        error_of(&[
            "estimate",
            "--family",
            "llama",
            "--intermediate-size",
            "1024",
            "--n-kv-head",
            "4"
        ]),
        "error: model.n_head (6) must be divisible by model.n_kv_head (4)"
    );
    assert_eq!(
        error_of(&["estimate", "--precision", "fp8"]),
        "error: train.precision (\"fp8\") is not one of: fp32, fp16-amp, bf16-amp, bf16"
    );
    assert!(
        error_of(&["estimate", "--vocab-size", "100000000000000000"])
            .starts_with("error: too large to estimate")
    );
    assert!(
        error_of(&["estimate", "--nanogpt", &fixture("bad_not_nanogpt.py")])
            .contains("line 1: not an assignment")
    );
    assert!(
        error_of(&["estimate", "--config", &fixture("shakespeare_char.py")]).contains("line 1")
    );
    assert!(error_of(&["estimate", "--frobnicate"]).contains("unknown option \"--frobnicate\""));
}

#[test]
fn unknown_field_in_the_setup_json_is_named() {
    let dir = std::env::temp_dir().join(format!("vramfit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("setup.json");
    std::fs::write(&path, r#"{"model": {"family": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8, "vocab_size": 8, "colour": "red"}}"#).unwrap();
    assert_eq!(
        error_of(&["estimate", "--config", path.to_str().unwrap()]),
        "error: unknown field \"model.colour\""
    );
}

#[test]
fn sweep_prints_csv_that_grows_with_batch() {
    let (code, out, err) = vramfit(&["sweep", "--axis", "batch_size", "--values", "1,2,4,8"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5);
    assert!(lines[0].starts_with("batch_size,peak_allocated_bytes"));
    let peaks: Vec<u64> = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(peaks.windows(2).all(|w| w[0] < w[1]), "{peaks:?}");
    let v = json_of(&[
        "sweep",
        "--axis",
        "block_size",
        "--from",
        "64",
        "--to",
        "512",
        "--format",
        "json",
    ]);
    let values: Vec<u64> = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_u64().unwrap())
        .collect();
    assert_eq!(values, vec![64, 128, 256, 512]);
}

#[test]
fn presets_and_gpus_by_name_match_the_library() {
    for p in vramfit::presets::MODEL_PRESETS {
        let v = json_of(&["estimate", "--preset", p.id, "--format", "json"]);
        let expected = vramfit::estimate(&(p.setup)())
            .unwrap()
            .peak_allocated_bytes;
        assert_eq!(v["peak_allocated_bytes"], expected, "{}", p.id);
    }
    for g in vramfit::presets::GPU_PRESETS {
        let v = json_of(&["estimate", "--gpu", g.id, "--format", "json"]);
        assert_eq!(v["device_memory_bytes"], g.memory_bytes, "{}", g.id);
    }
    assert!(error_of(&["estimate", "--preset", "gpt5"])
        .starts_with("error: --preset (\"gpt5\") is not one of: nanogpt-30m,"));
}

#[test]
fn keeping_grads_between_steps_costs_their_size() {
    let a = json_of(&["estimate", "--format", "json"]);
    let b = json_of(&["estimate", "--no-set-to-none", "--format", "json"]);
    // The founding case peaks in the loss backward of step 2: with set_to_none=False every .grad (fp32, one per
    // parameter tensor) is still allocated there.
    let grads = b["components"]["grads_bytes"].as_u64().unwrap();
    assert_eq!(grads, 30_135_168 * 4);
    assert_eq!(a["components"]["grads_bytes"], 0);
    assert!(
        b["peak_allocated_bytes"].as_u64().unwrap() > a["peak_allocated_bytes"].as_u64().unwrap()
    );
}

/// `--alloc-conf` takes PYTORCH_CUDA_ALLOC_CONF as PyTorch reads it; the table's header says it when it is not
/// the default, the JSON's setup carries it, and a value PyTorch refuses is refused with the field's name.
#[test]
fn alloc_conf_flag_sets_the_caching_allocator_knobs() {
    let (code, table, err) = vramfit(&["estimate", "--alloc-conf", "expandable_segments:True"]);
    assert_eq!(code, 0, "{err}");
    let header = table.lines().nth(1).unwrap();
    assert!(
        header.ends_with(", grad accumulation 1, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"),
        "{header}"
    );
    let (_, plain, _) = vramfit(&["estimate"]);
    assert!(!plain.contains("PYTORCH_CUDA_ALLOC_CONF"), "{plain}");
    // The founding case's compiled step fragments the default allocator; expandable segments reserve less for
    // the same allocations.
    let default = json_of(&["estimate", "--format", "json"]);
    let expandable = json_of(&[
        "estimate",
        "--alloc-conf",
        "expandable_segments:True",
        "--format",
        "json",
    ]);
    assert_eq!(
        expandable["peak_tensor_bytes"],
        default["peak_tensor_bytes"]
    );
    assert!(
        expandable["peak_reserved_bytes"].as_u64() < default["peak_reserved_bytes"].as_u64(),
        "{} vs {}",
        expandable["peak_reserved_bytes"],
        default["peak_reserved_bytes"]
    );
    let v = json_of(&[
        "estimate",
        "--alloc-conf",
        "max_split_size_mb:128, garbage_collection_threshold:0.8",
        "--format",
        "json",
    ]);
    assert_eq!(
        v["setup"]["train"]["alloc_conf"],
        "max_split_size_mb:128,garbage_collection_threshold:0.8"
    );
    assert_eq!(
        error_of(&["estimate", "--alloc-conf", "max_split_size_mb:16"]),
        "error: train.alloc_conf (\"max_split_size_mb:16\") max_split_size_mb (16) must be at least 20: \
         PyTorch's minimum, the 20 MiB segments the large pool shares"
    );
    assert!(
        error_of(&["estimate", "--alloc-conf", "expandable_segments:yes"])
            .contains("expandable_segments must be True or False")
    );
}

/// A model preset keeps the GPU given with it, whichever flag comes first: `--preset llama-2-7b --gpu rtx-4070`
/// is a 12 GiB sm_89 device, not the preset's own 80 GiB sm_90 one. See: issue 12, item 4.
#[test]
fn a_model_preset_keeps_the_gpu_given() {
    let rtx_4070 = vramfit::presets::gpu("rtx-4070").unwrap();
    let mut expected = vramfit::presets::model_preset("llama-2-7b").unwrap();
    expected.device = rtx_4070.device();
    let expected = vramfit::estimate(&expected).unwrap();
    for args in [
        ["--preset", "llama-2-7b", "--gpu", "rtx-4070"],
        ["--gpu", "rtx-4070", "--preset", "llama-2-7b"],
    ] {
        let v = json_of(&[&["estimate"], &args[..], &["--format", "json"]].concat());
        assert_eq!(v["device_memory_bytes"], 12_282u64 << 20, "{args:?}");
        assert_eq!(v["setup"]["device"]["compute_capability"], 8.9, "{args:?}");
        assert_eq!(
            v["setup"]["device"]["memory_gib"],
            12_282.0 / 1024.0,
            "{args:?}"
        );
        assert_eq!(v["setup"]["device"]["sms"], 46, "{args:?}");
        assert_eq!(
            v["peak_allocated_bytes"], expected.peak_allocated_bytes,
            "{args:?}"
        );
        assert_eq!(
            v["device_total_bytes"], expected.device_total_bytes,
            "{args:?}"
        );
        assert_eq!(
            v["fits"], false,
            "{args:?}: 7B parameters do not train in 12 GiB"
        );
    }
    // Without --gpu the preset's own device stands.
    let own = json_of(&["estimate", "--preset", "llama-2-7b", "--format", "json"]);
    assert_eq!(own["device_memory_bytes"], 80u64 << 30);
}

/// `vramfit gpus` lists every GPU preset with its memory, compute capability and SM (or CU) count.
#[test]
fn gpus_lists_every_preset_with_its_sm_count() {
    let (code, table, err) = vramfit(&["gpus"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), vramfit::presets::GPU_PRESETS.len());
    for (row, g) in rows.iter().zip(vramfit::presets::GPU_PRESETS) {
        assert!(row.starts_with(&format!("{} ", g.id)), "{row}");
        assert!(row.ends_with(g.label), "{row}");
    }
    let words = |id: &str| {
        let row = rows
            .iter()
            .find(|r| r.starts_with(&format!("{id} ")))
            .unwrap();
        row.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    assert_eq!(
        words("rtx-4070"),
        "rtx-4070 11.99 GiB 8.9 46 SMs RTX 4070 12 GB"
    );
    assert_eq!(
        words("mi250"),
        "mi250 64.0 GiB 8.0 (stand-in) 104 compute units MI250 GCD 64 GB (2 per card)"
    );
    let v = json_of(&["gpus", "--format", "json"]);
    let gpus = v["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), vramfit::presets::GPU_PRESETS.len());
    let b200 = gpus.iter().find(|g| g["id"] == "b200").unwrap();
    assert_eq!(b200["sms"], 148);
    assert_eq!(b200["compute_capability"], 10.0);
    assert_eq!(b200["memory_bytes"], 183_359u64 << 20);
    // The audit: memory rounded up ("45.0 GiB" for an L40S's 44.988 GiB); figures are cut, never above the
    // device's (46,068 MiB and the RTX 5090's 32,607 MiB as the driver reports them).
    assert_eq!(words("l40s"), "l40s 44.98 GiB 8.9 142 SMs L40S 48 GB");
    assert_eq!(
        words("rtx-5090"),
        "rtx-5090 31.84 GiB 12.0 170 SMs RTX 5090 32 GB"
    );
    assert_eq!(
        words("h200-141"),
        "h200-141 140.4 GiB 9.0 132 SMs H200 141 GB"
    );
    let (_, out, _) = vramfit(&["estimate", "--gpu", "l40s"]);
    assert!(
        out.contains("  GPU memory       44.98 GiB  fits: "),
        "{out}"
    );
    assert!(error_of(&["gpus", "--format", "csv"])
        .starts_with("error: --format (\"csv\") is not one of"));
    // --gpu refuses an unknown id, listing the presets.
    assert!(error_of(&["estimate", "--gpu", "rtx-9090"])
        .starts_with("error: --gpu (\"rtx-9090\") is not one of: rtx-3060, rtx-3080,"));
}

/// Issue 13's check: LoRA on a preset, from the command line. The frozen bf16 base with fp32 adapters needs far
/// less than training every parameter (no .grad, no AdamW state for 8B parameters), and the report says what is
/// trained.
#[test]
fn lora_on_a_preset_freezes_the_base() {
    let common = [
        "estimate",
        "--preset",
        "llama-3.1-8b",
        "--batch-size",
        "1",
        "--seq-len",
        "1024",
        "--format",
        "json",
    ];
    let full = json_of(&common);
    let lora_args: Vec<&str> = common
        .iter()
        .copied()
        .chain(["--lora", "r=16,targets=all-linear", "--base-dtype", "bf16"])
        .collect();
    let lora = json_of(&lora_args);
    let peak = |v: &Value| v["peak_allocated_bytes"].as_u64().unwrap();
    // Full fine-tune: fp32 weights, fp32 grads and two AdamW states, 16 bytes per parameter; LoRA: the bf16
    // base (2 bytes per parameter) and 41.9M fp32 adapters (4 bytes each), whose .grad and state are small.
    let n = full["n_params"].as_u64().unwrap();
    assert!(peak(&full) > 16 * n, "{}", peak(&full));
    assert!(peak(&lora) < peak(&full) / 4, "{}", peak(&lora));
    // The breakdown keeps the frozen base and the adapters apart: 512-byte blocks, 448 adapters.
    let weights = lora["components"]["weights_bytes"].as_u64().unwrap();
    assert!(
        weights >= 2 * n && weights < 2 * n + (64 << 20),
        "{weights}"
    );
    let adapters = lora["components"]["adapters_bytes"].as_u64().unwrap();
    assert!(
        (41_943_040 * 4..41_943_040 * 4 + 448 * 512).contains(&adapters),
        "{adapters}"
    );
    // The same run as a table (without `--format json`).
    let table_args: Vec<&str> = lora_args
        .iter()
        .copied()
        .filter(|a| *a != "--format" && *a != "json")
        .collect();
    let (code, table, err) = vramfit(&table_args);
    assert_eq!(code, 0, "{err}");
    assert!(
        table.contains("LoRA (peft): r=16 on all-linear; 41943040 trainable parameters"),
        "{table}"
    );
}

/// Issue 13's "done when": `vramfit estimate --preset llama-3.1-8b --lora r=16 --quantization nf4` gives a
/// breakdown with the 4-bit weights, the adapters, their optimizer state and the activations, each its own
/// component. Weights: the
/// 224 decoder Linears (6,979,321,856 elements) packed two to a byte with an fp32 absmax per 64 (0.5625 bytes
/// each), the embedding, head and norms in fp32 (prepare_model_for_kbit_training), and peft's fp32 adapters on
/// q_proj and v_proj (r 16: 6,815,744 parameters); AdamW's two fp32 states over the adapters only.
#[test]
fn qlora_on_the_8b_preset_keeps_4bit_weights() {
    let args = [
        "estimate",
        "--preset",
        "llama-3.1-8b",
        "--lora",
        "r=16",
        "--quantization",
        "nf4",
        "--format",
        "json",
    ];
    let v = json_of(&args);
    let c = &v["components"];
    let get = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k}: {c}"));
    let linears: u64 = 32 * 4096 * (4096 + 1024 + 1024 + 4096 + 3 * 14336);
    assert_eq!(linears, 6_979_321_856);
    let adapters: u64 = 32 * 16 * (4096 + 4096 + 4096 + 1024);
    assert_eq!(adapters, 6_815_744);
    let fp32 = (2 * 128_256 * 4096 + 65 * 4096) * 4;
    // Each in its own component: the 4-bit weights, the fp32 rest, the adapters (512-byte blocks).
    let packed = linears / 2 + linears / 64 * 4;
    let q = get("quantized_weights_bytes");
    assert!(q >= packed && q < packed + (1 << 20), "{q} for {packed}");
    let w = get("weights_bytes");
    assert!(w >= fp32 && w < fp32 + (16 << 20), "{w} for {fp32}");
    let a = get("adapters_bytes");
    assert!(a >= adapters * 4 && a < adapters * 4 + 128 * 512, "{a}");
    let state = get("optimizer_bytes");
    assert!(
        state >= 2 * 4 * adapters && state < 2 * 4 * adapters + (16 << 20),
        "{state}"
    );
    assert!(get("activations_bytes") > 0);
    // Far below the bf16 base's 2 bytes per Linear weight.
    assert!(q < linears, "{q}");
    let table: Vec<&str> = args[..7].to_vec();
    let (code, out, err) = vramfit(&table);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("4-bit NF4"), "{out}");
    for name in ["4-bit weights", "adapters", "optimizer", "activations"] {
        assert!(out.contains(&format!("\n    {name} ")), "{name}: {out}");
    }
}

/// `--preset phi-3-mini --finetune qlora` estimates (it was "not modelled" before Phi-3's packed Linears were):
/// peft's adapters on the four Linears of each of the 32 layers, `qkv_proj` (3072 -> 9216), `o_proj`,
/// `gate_up_proj` (3072 -> 16384) and `down_proj` (8192 -> 3072), r 16, fp32: 32 x 16 x 49,152 = 25,165,824
/// parameters; the same Linears packed two to a byte with a uint8 absmax per 64 (double quantization).
#[test]
fn qlora_on_phi_3_mini_adapts_the_packed_linears() {
    let args = [
        "estimate",
        "--preset",
        "phi-3-mini",
        "--finetune",
        "qlora",
        "--format",
        "json",
    ];
    let v = json_of(&args);
    let c = &v["components"];
    let get = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k}: {c}"));
    let adapters: u64 = 32 * 16 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072));
    assert_eq!(adapters, 25_165_824);
    assert_eq!(get("adapters_bytes"), adapters * 4);
    let linears: u64 = 32 * 3072 * (9216 + 3072 + 16384 + 8192);
    let packed = linears / 2 + linears / 64;
    let q = get("quantized_weights_bytes");
    assert!(q >= packed && q < packed + (2 << 20), "{q} for {packed}");
    let (code, out, err) = vramfit(&args[..5]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("LoRA (peft): r=16 on all-linear; 25165824 trainable parameters"),
        "{out}"
    );
    assert!(out.contains("4-bit NF4 with double quantization"), "{out}");
}

/// An 8-bit base (`--quantization int8`, bitsandbytes `Linear8bitLt`): one byte per decoder Linear weight plus
/// an fp32 scale per output row (`SCB`), the rest fp32 after prepare_model_for_kbit_training, peft's fp32
/// adapters; the table names the base. Row scales: 32 layers x (4096 + 1024 + 1024 + 4096 + 2 x 14336 + 4096).
#[test]
fn int8_base_on_the_8b_preset_keeps_one_byte_per_weight() {
    let args = [
        "estimate",
        "--preset",
        "llama-3.1-8b",
        "--lora",
        "r=16",
        "--quantization",
        "int8",
        "--format",
        "json",
    ];
    let v = json_of(&args);
    let c = &v["components"];
    let get = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k}: {c}"));
    let linears: u64 = 32 * 4096 * (4096 + 1024 + 1024 + 4096 + 3 * 14336);
    let rows: u64 = 32 * (4096 + 1024 + 1024 + 4096 + 2 * 14336 + 4096);
    assert_eq!(rows, 1_376_256);
    let adapters: u64 = 32 * 16 * (4096 + 4096 + 4096 + 1024);
    let fp32 = (2 * 128_256 * 4096 + 65 * 4096) * 4;
    let int8 = linears + rows * 4;
    let q = get("quantized_weights_bytes");
    assert!(q >= int8 && q < int8 + (1 << 20), "{q} for {int8}");
    let w = get("weights_bytes");
    assert!(w >= fp32 && w < fp32 + (16 << 20), "{w} for {fp32}");
    let a = get("adapters_bytes");
    assert!(a >= adapters * 4 && a < adapters * 4 + 128 * 512, "{a}");
    let (code, out, err) = vramfit(&args[..7]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("8-bit (LLM.int8)"), "{out}");
    assert!(out.contains("\n    int8 weights "), "{out}");
}

#[test]
fn lora_flags_name_what_is_wrong() {
    let e = error_of(&["estimate", "--preset", "llama-3.2-1b", "--lora", "r=0"]);
    assert!(
        e.contains("train.lora.r (0) must be between 1 and model.n_embd"),
        "{e}"
    );
    let e = error_of(&["estimate", "--preset", "llama-3.2-1b", "--lora", "rank=8"]);
    assert!(
        e.contains("--lora (\"rank=8\") has an unknown key \"rank\""),
        "{e}"
    );
    let e = error_of(&[
        "estimate",
        "--preset",
        "llama-3.2-1b",
        "--lora",
        "r=8,targets=qkv",
    ]);
    assert!(e.contains("train.lora.target_modules (\"qkv\")"), "{e}");
    let e = error_of(&["estimate", "--preset", "gpt2", "--lora", "r=8"]);
    assert!(e.contains("not modelled: train.lora on gpt2"), "{e}");
    let e = error_of(&[
        "estimate",
        "--preset",
        "llama-3.2-1b",
        "--lora",
        "r=8",
        "--quantization",
        "int8",
        "--precision",
        "fp32",
    ]);
    assert!(
        e.contains(
            "not modelled: train.quantization (int8) with train.precision (fp32): an 8-bit base is modelled \
             under bf16-amp or fp16-amp"
        ),
        "{e}"
    );
    let e = error_of(&[
        "estimate",
        "--preset",
        "llama-3.2-1b",
        "--quantization",
        "nf4",
    ]);
    assert!(
        e.contains("not modelled: train.quantization (nf4) without train.lora"),
        "{e}"
    );
    let e = error_of(&[
        "estimate",
        "--preset",
        "llama-3.2-1b",
        "--base-dtype",
        "bf16",
    ]);
    assert!(
        e.contains("train.base_dtype (bf16) without train.lora"),
        "{e}"
    );
}

/// Issue 14's "done when": the 70B preset sharded with FSDP2 over eight H100s, per GPU with its breakdown; the
/// same flags give the setup JSON's `train.parallel`, and sharding over more GPUs holds less per GPU.
#[test]
fn parallel_flags_give_the_per_gpu_peak() {
    let args = [
        "estimate",
        "--preset",
        "llama-3.1-70b",
        "--parallel",
        "fsdp",
        "--gpus",
        "8",
        "--gpu",
        "h100-80",
    ];
    let (code, out, err) = vramfit(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("FSDP2 fully_shard per block and on the root on 8 GPUs (ZeRO-3): every figure below is per GPU"),
        "{out}"
    );
    assert!(
        out.contains("at the peak:") && out.contains("optimizer"),
        "{out}"
    );
    let per_gpu = |gpus: &str, extra: &[&str]| -> u64 {
        let mut a = vec![
            "estimate",
            "--preset",
            "llama-3.1-8b",
            "--parallel",
            "fsdp",
            "--gpus",
            gpus,
            "--format",
            "json",
        ];
        a.extend(extra);
        json_of(&a)["peak_allocated_bytes"].as_u64().unwrap()
    };
    assert!(per_gpu("64", &[]) < per_gpu("8", &[]));
    // ZeRO-2 keeps the gathered blocks from the forward to the backward: more per GPU than ZeRO-3.
    assert!(per_gpu("8", &["--no-reshard-after-forward"]) > per_gpu("8", &[]));
    assert!(
        per_gpu(
            "8",
            &[
                "--precision",
                "fp32",
                "--param-dtype",
                "bf16",
                "--reduce-dtype",
                "fp32"
            ]
        ) < per_gpu("8", &["--precision", "fp32"])
    );
    assert_eq!(
        error_of(&["estimate", "--parallel", "zero1", "--gpus", "8"]),
        "error: not modelled: train.parallel.strategy \"zero1\" (optimizer state sharded alone: PyTorch's \
         ZeroRedundancyOptimizer over DDP); zero2 and zero3 are, as fsdp"
    );
    assert_eq!(
        error_of(&["estimate", "--parallel", "ddp", "--gpus", "8", "--offload"]),
        "error: train.parallel.offload (true) is a field of fsdp; the strategy is ddp"
    );
}

/// `vramfit strategies`: per strategy the memory per GPU on 1 to 64 GPUs and the fewest that fit; the advised
/// setup's flags give that figure through `estimate`, and one fewer GPU does not fit.
#[test]
fn strategies_finds_the_fewest_gpus_and_the_flags_reproduce_them() {
    let base = ["--preset", "llama-3.2-1b", "--gpu", "rtx-4070"];
    let v = json_of(&[&["strategies", "--format", "json"][..], &base].concat());
    let rows = v["strategies"].as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["ddp", "zero2", "zero3", "zero3-tp", "zero3-offload"]);
    let budget = v["gpu_memory_bytes"].as_u64().unwrap();
    assert!(v["one_gpu_device_total_bytes"].as_u64().unwrap() > budget);
    let z3 = &rows[2];
    let n = z3["fewest_gpus"].as_u64().unwrap();
    let total = z3["fewest_device_total_bytes"].as_u64().unwrap();
    assert!(total <= budget);
    let on = |gpus: u64| {
        let g = gpus.to_string();
        let args = [
            &["estimate", "--format", "json"][..],
            &base,
            &[
                "--precision",
                "fp32",
                "--parallel",
                "fsdp",
                "--gpus",
                &g,
                "--param-dtype",
                "bf16",
                "--reduce-dtype",
                "fp32",
            ],
        ]
        .concat();
        json_of(&args)["device_total_bytes"].as_u64().unwrap()
    };
    assert_eq!(on(n), total);
    assert!(on(n - 1) > budget, "{} GPUs fit too", n - 1);
    // The text: a row per strategy, the advice and the flags that give it.
    let (code, text, err) = vramfit(&[&["strategies"][..], &base].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(&format!(
            "The fewest 11.99 GiB GPUs that fit: {n} with FSDP2, ZeRO-3"
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "flags: --precision fp32 --parallel fsdp --gpus {n} --param-dtype bf16"
    )));
    assert_eq!(
        error_of(&["strategies", "--format", "csv"]),
        "error: --format (\"csv\") is not one of: table, json"
    );
}

/// `--finetune full|lora|qlora`: the recipes by name give the same setup as their flags spelled out (LoRA's base
/// in the precision's bf16, QLoRA's precision and checkpointing), a later flag changes the recipe, and an unknown
/// one names the three.
#[test]
fn finetune_names_the_usual_recipes() {
    let peak = |args: &[&str]| {
        json_of(
            &[
                &["estimate", "--format", "json", "--preset", "llama-3.2-1b"][..],
                args,
            ]
            .concat(),
        )["peak_allocated_bytes"]
            .as_u64()
            .unwrap()
    };
    let lora = ["--lora", "r=16,alpha=32,dropout=0.05,targets=all-linear"];
    assert_eq!(
        peak(&["--finetune", "lora"]),
        peak(&[&lora[..], &["--base-dtype", "bf16"]].concat())
    );
    assert_ne!(peak(&["--finetune", "lora"]), peak(&lora));
    let qlora = [
        &lora[..],
        &["--quantization", "nf4", "--double-quant", "--checkpointing"],
    ]
    .concat();
    assert_eq!(peak(&["--finetune", "qlora"]), peak(&qlora));
    // The source's own setting is replaced (fp32 given before the recipe), a later flag's kept.
    assert_eq!(
        peak(&["--precision", "fp32", "--finetune", "qlora"]),
        peak(&qlora)
    );
    assert_eq!(
        peak(&["--finetune", "qlora", "--no-checkpointing"]),
        peak(&[&qlora[..], &["--no-checkpointing"]].concat())
    );
    assert!(peak(&["--finetune", "qlora", "--no-checkpointing"]) > peak(&qlora));
    assert_eq!(
        peak(&["--finetune", "qlora", "--lora", "r=64"]),
        peak(&[
            "--lora",
            "r=64",
            "--quantization",
            "nf4",
            "--double-quant",
            "--checkpointing"
        ])
    );
    assert_eq!(peak(&["--finetune", "full"]), peak(&[]));
    assert!(peak(&["--finetune", "qlora"]) < peak(&["--finetune", "lora"]));
    assert_eq!(
        error_of(&["estimate", "--finetune", "dora"]),
        "error: --finetune (\"dora\") is not one of: full, lora, qlora"
    );
}

/// `vramfit finetune`: full fine-tuning, LoRA and QLoRA side by side, each row the estimate of its recipe by name
/// (`estimate --finetune M`), and the advice's flags give the advised setup.
#[test]
fn finetune_sets_the_three_recipes_side_by_side() {
    let base = [
        "--preset",
        "llama-3.1-8b",
        "--gpu",
        "rtx-4090",
        "--batch-size",
        "1",
        "--seq-len",
        "2048",
    ];
    let m = json_of(&[&["finetune", "--format", "json"][..], &base[..]].concat());
    let rows = m["methods"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for ((row, name), detail) in rows.iter().zip(["full", "lora", "qlora"]).zip([
        "every parameter",
        "r 16, bf16 base",
        "r 16, 4-bit NF4 with double quantization base, checkpointed",
    ]) {
        assert_eq!(row["method"], name);
        assert_eq!(row["detail"], detail);
        let e = json_of(
            &[
                &["estimate", "--format", "json", "--finetune", name][..],
                &base[..],
            ]
            .concat(),
        );
        assert_eq!(row["device_total_bytes"], e["device_total_bytes"], "{name}");
        assert_eq!(row["fits"], e["fits"], "{name}");
    }
    assert_eq!(rows[0]["fits"], false);
    assert_eq!(rows[2]["fits"], true);
    let largest = rows[2]["largest_batch"].as_u64().unwrap();
    assert!(largest >= 1);
    let at = |b: u64| {
        let b = b.to_string();
        json_of(
            &[
                &["estimate", "--format", "json", "--finetune", "qlora"][..],
                &base[..],
                &["--batch-size", &b][..],
            ]
            .concat(),
        )["fits"]
            .as_bool()
            .unwrap()
    };
    assert!(at(largest) && !at(largest + 1));
    let (code, text, err) = vramfit(&[&["finetune"][..], &base[..]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("QLoRA fits in 23.98 GiB at batch 1")
            && text.contains("   r 16, 4-bit NF4 with double quantization base, checkpointed\n"),
        "{text}"
    );
    assert!(
        text.contains("flags: --finetune qlora --batch-size 1\n"),
        "{text}"
    );
    // On a 12 GB card none fits at batch 1: QLoRA with a shorter sequence, and the flags that give it.
    let small = [&base[..2], &["--gpu", "rtx-4070"][..], &base[4..]].concat();
    let m = json_of(&[&["finetune", "--format", "json"][..], &small[..]].concat());
    let seq = m["advised_setup"]["train"]["seq_len"].as_u64().unwrap();
    assert!(seq < 2048, "{seq}");
    let (code, text, err) = vramfit(&[&["finetune"][..], &small[..]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(&format!(
            "flags: --finetune qlora --batch-size 1 --seq-len {seq}\n"
        )),
        "{text}"
    );
}

/// Issue 12: `--attention flash_attention_2` (Hugging Face's flash-attn package) reaches the estimate: the
/// setup the CLI echoes names it, its figure is the core's for that setup, and the setups it was not measured for
/// are refused by name.
#[test]
fn attention_flash_attention_2_is_an_attention_kind() {
    let config = fixture("llama-gqa-v2k.json");
    let args = |attention: &'static str| {
        vec![
            "estimate".to_string(),
            "--config".into(),
            config.clone(),
            "--attention".into(),
            attention.into(),
            "--format".into(),
            "json".into(),
        ]
    };
    let run = |a: Vec<String>| json_of(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let flash = run(args("flash_attention_2"));
    assert_eq!(flash["setup"]["train"]["attention"], "flash_attention_2");
    let setup = vramfit::input::setup_from_value(&flash["setup"]).unwrap();
    let core = vramfit::estimate(&setup).unwrap();
    assert_eq!(
        flash["peak_allocated_bytes"].as_u64(),
        Some(core.peak_allocated_bytes)
    );
    // One GPU, 4 layers: SDPA's RNG seed and offset are two 8-byte tensors, flash-attn's rng_state one of 16 B:
    // the one block saved by the block whose backward holds the peak is the difference.
    let sdpa = run(args("sdpa"));
    assert_eq!(
        sdpa["peak_allocated_bytes"].as_u64().unwrap() - core.peak_allocated_bytes,
        512
    );
    let (_, table, _) = vramfit(&[
        "estimate",
        "--config",
        &config,
        "--attention",
        "flash_attention_2",
    ]);
    assert!(table.contains("flash_attention_2 attention"), "{table}");
    assert!(
        table.contains(
            "flash_attention_2: flash-attn 2.8's tensors as its CUDA extension allocates them"
        ),
        "{table}"
    );
    let compiled = error_of(&[
        "estimate",
        "--config",
        &config,
        "--attention",
        "flash_attention_2",
        "--compile",
    ]);
    assert!(
        compiled.contains("\"flash_attention_2\" with train.compile"),
        "{compiled}"
    );
    let fp32 = error_of(&[
        "estimate",
        "--config",
        &config,
        "--attention",
        "flash_attention_2",
        "--precision",
        "fp32",
    ]);
    assert!(fp32.contains("fp16 and bf16 only"), "{fp32}");
    // LoRA was measured with it (tests/data/finetune/flash.json), a 4-bit base was not.
    let lora = ["--lora", "r=16", "--attention", "flash_attention_2"];
    let with_lora = json_of(
        &[
            &["estimate", "--config", &config, "--format", "json"][..],
            &lora,
        ]
        .concat(),
    );
    assert_eq!(
        with_lora["setup"]["train"]["attention"],
        "flash_attention_2"
    );
    let qlora = error_of(
        &[
            &["estimate", "--config", &config][..],
            &lora,
            &["--quantization", "nf4"],
        ]
        .concat(),
    );
    assert!(qlora.contains("with a quantized base"), "{qlora}");
    let unknown = error_of(&["estimate", "--attention", "flash_attention_3"]);
    assert!(unknown.contains("flash_attention_2"), "{unknown}");
}

/// The SM count (`--sms`, `device.sms`): a GPU preset gives its own, a memory or capability typed without one takes
/// the preset GPU that alone has them (12 GiB at 8.6: the RTX 3060's 28 SMs) or else the reference device of that
/// capability (80 GiB at 8.6: the RTX 3090's 82), and it changes what flash attention allocates: one layer of one
/// 256-wide head at batch 2 x 2048 in bf16 (on the founding case's RTX 4070) has 2 x 1 x 32 = 64 row blocks,
/// which 132 SMs split (fp32 accumulators in the forward) and 8 SMs do not; the accumulators land in the caching
/// allocator's segments otherwise, so reserved memory moves. The figures are the library's for the same setup.
#[test]
fn the_sm_count_follows_the_gpu_and_moves_flash_attention() {
    let sms = |args: &[&str]| {
        json_of(&[&["estimate"], args, &["--format", "json"]].concat())["setup"]["device"]["sms"]
            .clone()
    };
    assert_eq!(sms(&["--gpu", "h100-80"]), 132);
    assert_eq!(sms(&["--gpu", "h100-80", "--sms", "100"]), 100);
    assert_eq!(sms(&[]), 132, "no device given: the reference H100");
    assert_eq!(
        sms(&["--gpu-memory-gib", "12", "--compute-capability", "8.6"]),
        28,
        "12 GiB at 8.6: the RTX 3060"
    );
    assert_eq!(sms(&["--compute-capability", "8.6"]), 82, "80 GiB at 8.6");
    assert_eq!(
        sms(&["--gpu", "rtx-4070", "--compute-capability", "8.6"]),
        46,
        "the GPU's own count, as given"
    );
    let knobs = [
        "--preset",
        "nanogpt-30m",
        "--n-layer",
        "1",
        "--n-head",
        "1",
        "--n-embd",
        "256",
        "--block-size",
        "2048",
        "--batch-size",
        "2",
        "--vocab-size",
        "65",
        "--precision",
        "bf16",
        "--no-compile",
    ];
    let mut reserved = Vec::new();
    for n in [132u32, 8] {
        let v = json_of(
            &[
                &["estimate"],
                &knobs[..],
                &["--sms", &n.to_string(), "--format", "json"],
            ]
            .concat(),
        );
        let mut s = vramfit::input::setup_from_value(&v["setup"]).unwrap();
        assert_eq!(s.device.sms, n);
        let lib = vramfit::estimate(&s).unwrap();
        assert_eq!(v["peak_reserved_bytes"], lib.peak_reserved_bytes);
        s.device.sms = 132 + 8 - n;
        assert_ne!(
            vramfit::estimate(&s).unwrap().peak_reserved_bytes,
            lib.peak_reserved_bytes
        );
        reserved.push(lib.peak_reserved_bytes);
    }
    assert_ne!(reserved[0], reserved[1]);
    let e = error_of(&["estimate", "--sms", "0"]);
    assert!(
        e.contains("device.sms") && e.contains("whole number of SMs"),
        "{e}"
    );
    let e = error_of(&["estimate", "--init-on-device"]);
    assert!(
        e.contains("train.parallel.init_on_device (true) applies to tensor parallelism alone"),
        "{e}"
    );
    let e = error_of(&["estimate", "--sms", "2.5"]);
    assert!(e.contains("device.sms (2.5)"), "{e}");
}

/// The audit: every subcommand's --help printed the global help. Each prints its own usage now: the usage line,
/// what it does, its own options with their defaults, and the shared SOURCE, KNOBS and MORE THAN ONE GPU
/// sections where it estimates a setup; `vramfit --help` lists every command.
#[test]
fn each_command_has_its_own_help() {
    let usage_lines = [
        ("estimate", "  vramfit estimate [SOURCE] [KNOBS] [--format table|json|snapshot]\n"),
        ("compare", "  vramfit compare --snapshot FILE [SOURCE] [KNOBS] [--format table|json]\n"),
        ("sweep", "  vramfit sweep --axis batch_size|block_size [--values 1,2,4 | --from N --to M] [SOURCE] [KNOBS] [--format csv|json]\n"),
        ("strategies", "  vramfit strategies [SOURCE] [KNOBS] [--format table|json]\n"),
        ("finetune", "  vramfit finetune [SOURCE] [KNOBS] [--format table|json]\n"),
        ("gpus", "  vramfit gpus [--format table|json]\n"),
    ];
    let (code, overview, _) = vramfit(&["--help"]);
    assert_eq!(code, 0);
    for (_, line) in usage_lines {
        assert!(overview.contains(line), "{line} in {overview}");
    }
    assert!(overview.contains("`vramfit COMMAND --help` shows one command's usage"));
    assert!(overview.contains("\nKNOBS (override the source):\n"));
    assert_eq!(vramfit(&[]).1, overview);
    for (cmd, line) in usage_lines {
        let (code, help, err) = vramfit(&[cmd, "--help"]);
        assert_eq!((code, err.as_str()), (0, ""), "{cmd}");
        assert_ne!(help, overview, "{cmd}");
        assert!(help.contains(&format!("usage:\n{line}")), "{cmd}: {help}");
        for (other, other_line) in usage_lines {
            assert!(
                other == cmd || !help.contains(other_line),
                "{cmd}'s help holds {other}'s usage"
            );
        }
        assert!(help.contains("\nOPTIONS:\n  --"), "{cmd}: {help}");
        let shared = [
            "\nSOURCE (at most one;",
            "\nKNOBS (override the source):",
            "\nMORE THAN ONE GPU (",
        ];
        for section in shared {
            assert_eq!(help.contains(section), cmd != "gpus", "{cmd}: {section}");
        }
        // The same from `-h`, from `vramfit help CMD`, and with other flags around it, before any file is read.
        assert_eq!(vramfit(&[cmd, "-h"]).1, help, "{cmd}");
        assert_eq!(vramfit(&["help", cmd]).1, help, "{cmd}");
        assert_eq!(
            vramfit(&[cmd, "--config", "/no/such/file.json", "--help"]).1,
            help,
            "{cmd}"
        );
    }
    // Each command's own options, with their defaults.
    let help = |cmd: &str| vramfit(&[cmd, "--help"]).1;
    assert!(help("estimate").contains("table (the default): for people; json: the report as JSON"));
    assert!(help("estimate")
        .contains("snapshot: the\n                       predicted allocation timeline"));
    assert!(help("compare").contains("  --snapshot FILE      the snapshot (required)\n"));
    assert!(help("sweep").contains("  --axis batch_size|block_size   what varies (required)"));
    assert!(help("sweep")
        .contains("(defaults: 1, and four times the\n                       setup's own value)"));
    assert!(help("sweep").contains("  --format csv|json    csv (the default)"));
    assert!(help("strategies").contains("and the cheapest that fits"));
    assert!(help("finetune").contains("full fine-tuning, LoRA and QLoRA"));
    assert!(help("gpus").contains("  --format table|json  table (the default)"));
    assert!(error_of(&["help", "train"]).contains("unknown command \"train\""));
}

/// `n` with a comma between thousands, as the README writes MiB: 4334 -> "4,334".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The README quotes the command line: the founding case's table, the sweep's CSV, the one-line error and the
/// founding case on its RTX 4070 against nvidia-smi and PyTorch's own allocator. The audit found the last one
/// stale: 4,330 MiB and -3.0% where the CLI says 4,334 MiB (-2.9%), and "4,048 to 4,094 MiB" reserved by PyTorch's
/// allocator where the record (`tests/data/stub-cuda/compiled.json`, re-run and first run alike) holds 4,048.
#[test]
fn the_readme_quotes_what_the_command_line_prints() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    // The fenced blocks, each without its first line (the language tag).
    let blocks: Vec<&str> = readme
        .split("```")
        .skip(1)
        .step_by(2)
        .map(|b| b.split_once('\n').map_or("", |(_, rest)| rest))
        .collect();
    let block = |start: &str| {
        *blocks
            .iter()
            .find(|b| b.starts_with(start))
            .unwrap_or_else(|| panic!("no block starting {start:?} in README.md"))
    };

    // The founding case's table, as far as the README shows it.
    let (code, table, err) = vramfit(&["estimate"]);
    assert_eq!(code, 0, "{err}");
    let shown: Vec<&str> = block("vramfit estimate: gpt2").lines().collect();
    let printed: Vec<&str> = table.lines().take(shown.len()).collect();
    assert_eq!(shown, printed);

    // The sweep's CSV.
    let (code, csv, err) = vramfit(&["sweep", "--axis", "batch_size", "--values", "1,4,16,64"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(block("batch_size,peak_allocated_bytes"), csv);

    // The one-line error.
    let quoted = readme
        .lines()
        .skip_while(|l| l.trim() != "$ vramfit estimate --n-head 7")
        .nth(1)
        .expect("the README's error example");
    assert_eq!(quoted.trim(), error_of(&["estimate", "--n-head", "7"]));

    // The founding case as its owner ran it, against what nvidia-smi showed (4,464 MiB) and what PyTorch's own
    // allocator reserved on a stubbed RTX 4070, without and with train.py's evaluation before the first step.
    let args = ["estimate", "--grad-accum-steps", "4", "--gpu", "rtx-4070"];
    let (code, table, err) = vramfit(&args);
    assert_eq!(code, 0, "{err}");
    let figure = |label: &str| {
        let line = table
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap();
        let words: Vec<&str> = line[line.find(label).unwrap() + label.len()..]
            .split_whitespace()
            .take(2)
            .collect();
        words.join(" ")
    };
    let v = json_of(&[&args[..], &["--format", "json"]].concat());
    let device = v["device_total_bytes"].as_u64().unwrap();
    let seen = 4464u64 << 20;
    let record = |path: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(path)).unwrap()).unwrap()
    };
    let compiled = record("tests/data/stub-cuda/compiled.json");
    let measured = compiled["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "nanogpt-30m-founding-accum4-sm89-compiled")
        .unwrap();
    let mib = |r: &Value| r["peak_reserved_bytes"].as_u64().unwrap() >> 20;
    let (warm, cold) = (mib(&measured["measured"]), mib(&measured["first_run"]));
    let reserved = if warm == cold {
        format!("{} MiB", thousands(warm))
    } else {
        format!(
            "{} to {} MiB",
            thousands(warm.min(cold)),
            thousands(warm.max(cold))
        )
    };
    let eval = record("tests/data/stub-cuda/seed-run-eval.json");
    let with_eval = eval["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["eval_iters_per_split"].as_u64() > Some(0))
        .unwrap();
    let sentence = format!(
        "`vramfit estimate --grad-accum-steps 4 --gpu rtx-4070` says {} ({} MiB) on the device: {} reserved plus \
         the 256 MiB GeForce CUDA context; nvidia-smi showed 4,464 MiB ({:+.1}%). PyTorch's own allocator, run on a \
         stubbed RTX 4070, reserves {reserved} for that step ({} MiB after the evaluation",
        figure("on the device"),
        thousands(device >> 20),
        figure("peak reserved"),
        (device as f64 - seen as f64) / seen as f64 * 100.0,
        thousands(mib(with_eval)),
    );
    let flat = readme.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains(&sentence), "README.md should say: {sentence}");

    // Every command of "Other ways in" runs, its files standing in: the README's own setup JSON, the fixtures'
    // nanoGPT config and config.json.
    let setup = std::env::temp_dir().join(format!("vramfit-readme-{}.json", std::process::id()));
    std::fs::write(&setup, block("{\"model\"")).unwrap();
    let setup = setup.display().to_string();
    let files = [
        ("setup.json", setup.as_str()),
        (
            "config/train_shakespeare_char.py",
            &fixture("shakespeare_char.py"),
        ),
        ("config.json", &fixture("tinyllama_config.json")),
    ];
    let commands: Vec<&str> = readme
        .lines()
        .skip_while(|l| l.trim() != "Other ways in:")
        .skip(2)
        .take_while(|l| l.starts_with("    vramfit "))
        .collect();
    assert!(commands.len() >= 10, "{commands:?}");
    for line in commands {
        let command = line.split(" # ").next().unwrap().trim();
        // Words as the shell splits these: a single-quoted one is one word.
        let mut args: Vec<String> = Vec::new();
        for (i, part) in command.split('\'').enumerate() {
            if i % 2 == 1 {
                args.push(part.to_string());
            } else {
                args.extend(part.split_whitespace().map(str::to_string));
            }
        }
        let args: Vec<&str> = args[1..]
            .iter()
            .map(|a| files.iter().find(|f| f.0 == a).map_or(a.as_str(), |f| f.1))
            .collect();
        let (code, out, err) = vramfit(&args);
        assert_eq!(code, 0, "{command}: {err}");
        assert!(!out.is_empty(), "{command}");
    }
}

/// The audit of `vramfit estimate --help` against what the parser does: it said `--compile`'s default was off,
/// where the default case and the nanoGPT presets compile (as train.py does); it left out `--no-double-quant`
/// (accepted: QLoRA without double quantization), peft's default rank under `--lora`, and what base the LoRA recipe
/// loads under fp32. Each default the help states is checked here against the setup the CLI estimates.
#[test]
fn the_help_states_the_defaults_the_cli_applies() {
    let help = vramfit(&["estimate", "--help"]).1;
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let train = |args: &[&str]| {
        json_of(&[&["estimate"], args, &["--format", "json"]].concat())["setup"]["train"].clone()
    };
    let config = fixture("founding.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["train"].as_object_mut().unwrap().remove("compile");
    let no_compile = std::env::temp_dir().join(format!("vramfit-help-{}.json", std::process::id()));
    std::fs::write(&no_compile, v.to_string()).unwrap();
    let no_compile = no_compile.display().to_string();

    assert!(flat.contains(
        "--compile | --no-compile torch.compile(model); default: on for the default case and the nanoGPT presets \
         (as train.py runs them), off for --hf, the Hugging Face presets and a setup JSON without train.compile"
    ));
    assert_eq!(train(&[])["compile"], true);
    for preset in ["nanogpt-30m", "shakespeare-char", "gpt2", "gpt2-xl"] {
        assert_eq!(train(&["--preset", preset])["compile"], true, "{preset}");
    }
    for preset in ["tinyllama-1.1b", "llama-3.1-8b", "pythia-160m"] {
        assert_eq!(train(&["--preset", preset])["compile"], false, "{preset}");
    }
    assert_eq!(
        train(&["--hf", &fixture("tinyllama_config.json")])["compile"],
        false
    );
    assert_eq!(train(&["--config", &no_compile])["compile"], false);

    // flash_attention_2: the families it is modelled for (the help said "Hugging Face models"; gemma2, phi3 and
    // the others are refused).
    assert!(flat.contains(
        "flash_attention_2: the flash-attn package, for llama, mistral and qwen2, eager"
    ));
    for preset in ["tinyllama-1.1b", "mistral-7b", "qwen2.5-0.5b"] {
        let (code, _, err) = vramfit(&[
            "estimate",
            "--preset",
            preset,
            "--attention",
            "flash_attention_2",
        ]);
        assert_eq!(code, 0, "{preset}: {err}");
    }
    for preset in ["gemma-2-2b", "phi-3-mini", "pythia-160m", "olmoe-1b-7b"] {
        let e = error_of(&[
            "estimate",
            "--preset",
            preset,
            "--attention",
            "flash_attention_2",
        ]);
        assert!(
            e.contains("measured with llama, mistral and qwen2 only"),
            "{preset}: {e}"
        );
    }

    assert!(flat.contains("--double-quant | --no-double-quant"));
    let qlora = ["--preset", "tinyllama-1.1b", "--finetune", "qlora"];
    assert_eq!(train(&qlora)["double_quant"], true);
    assert_eq!(
        train(&[&qlora[..], &["--no-double-quant"]].concat())["double_quant"],
        false
    );

    assert!(flat.contains("peft's defaults: r 8, alpha 8, dropout 0, q_proj+v_proj"));
    let lora = train(&["--preset", "tinyllama-1.1b", "--lora", "dropout=0"])["lora"].clone();
    assert_eq!(
        (&lora["r"], &lora["alpha"], &lora["target_modules"]),
        (
            &Value::from(8),
            &Value::from(8.0),
            &serde_json::json!(["q_proj", "v_proj"])
        )
    );

    assert!(flat.contains(
        "over a base loaded in the precision's dtype (bf16 under bf16-amp, fp16 under fp16-amp, fp32 under fp32)"
    ));
    let lora = ["--preset", "tinyllama-1.1b", "--finetune", "lora"];
    for (precision, base) in [("bf16-amp", "bf16"), ("fp16-amp", "fp16")] {
        assert_eq!(
            train(&[&lora[..], &["--precision", precision]].concat())["base_dtype"],
            base
        );
    }
    // Under fp32 the base stays in the model's own fp32 (no base dtype set).
    assert_eq!(
        train(&[&lora[..], &["--precision", "fp32"]].concat())["base_dtype"],
        Value::Null
    );
}

/// The audit: under gradient accumulation the table's timeline printed each micro-step's stages with the same
/// label ("step 1 forward" twice under --grad-accum-steps 4: the first micro-step and the second, which stands for
/// the second to the fourth, as they repeat it). Each label is one stage now, numbered by micro-step, and the
/// figures are the report's.
#[test]
fn the_timeline_names_each_micro_step() {
    let args = ["estimate", "--grad-accum-steps", "4", "--gpu", "rtx-4070"];
    let (code, table, err) = vramfit(&args);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.contains("timeline (highest live bytes"))
        .skip(1)
        .take_while(|l| l.starts_with("    step "))
        .collect();
    // Each line: the label, then the figure and its unit.
    let labels: Vec<String> = lines
        .iter()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len() - 2].join(" ")
        })
        .collect();
    let v = json_of(&[&args[..], &["--format", "json"]].concat());
    let timeline = v["timeline"].as_array().unwrap();
    assert_eq!(lines.len(), timeline.len());
    let mut unique = labels.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), labels.len(), "{labels:?}");
    // Three steps of the first micro-step and the rest, four stages each, and the optimizer.
    assert_eq!(labels.len(), 3 * (2 * 4 + 1));
    assert_eq!(labels[0], "step 1 micro 1 forward");
    assert_eq!(labels[4], "step 1 micro 2-4 forward");
    assert_eq!(labels[8], "step 1 optimizer");
    assert_eq!(labels[15], "step 2 micro 2-4 loss backward");
    for (line, stage) in lines.iter().zip(timeline) {
        let bytes = stage["peak_bytes"].as_u64().unwrap();
        assert!(
            line.ends_with(&vramfit::report::fmt_bytes(bytes)),
            "{line} vs {bytes}"
        );
    }
}
