#![cfg(not(target_arch = "wasm32"))]
//! The command line given what a person types wrong or mixes up: each case gives one message naming the field or
//! flag and its value, and exit status 2 (never a panic); and the table says whether the step fits.
//! Found by an audit of the command line as a person fine-tuning or pre-training a model would use it.

use std::path::PathBuf;

#[path = "support/cli.rs"]
mod cli;
use cli::{error_of, vramfit};

/// A file with `text` in a directory of this test run's own.
fn file(name: &str, text: &str) -> String {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("vramfit-cli-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const LLAMA: &str = r#"{"model": {"family": "llama", "n_layer": 2, "n_head": 4, "n_embd": 256, "block_size": 128,
    "vocab_size": 1000, "intermediate_size": 512}}"#;

/// A setup JSON whose top level or a section is not an object, given with the flags that write into it, panicked
/// in serde_json's indexing ("cannot access key "model" in JSON array").
#[test]
fn a_setup_json_of_the_wrong_shape_is_named_with_any_flag() {
    for (name, text, flags, message) in [
        (
            "array.json",
            "[1, 2]",
            &[][..],
            "error: setup ([1,2]) must be a JSON object",
        ),
        (
            "string.json",
            "\"x\"",
            &["--batch-size", "4"][..],
            "error: setup (\"x\") must be a JSON object",
        ),
        (
            "train.json",
            r#"{"train": 5}"#,
            &["--batch-size", "4"][..],
            "error: train (5) must be a JSON object",
        ),
        (
            "model.json",
            r#"{"model": 5}"#,
            &["--family", "llama"][..],
            "error: model (5) must be a JSON object",
        ),
        (
            "device.json",
            r#"{"device": 7}"#,
            &["--gpu", "rtx-4090"][..],
            "error: device (7) must be a JSON object",
        ),
        (
            "parallel.json",
            r#"{"train": {"parallel": 3}}"#,
            &["--gpus", "2"][..],
            "error: train.parallel (3) must be a JSON object",
        ),
    ] {
        let path = file(name, text);
        let mut args = vec!["estimate", "--config", &path];
        args.extend(flags);
        assert_eq!(error_of(&args), message, "{name} {flags:?}");
    }
}

/// A model flag the family does not have was dropped without a word (`--n-experts 8` on Llama, `--sliding-window`
/// on nanoGPT's GPT: the same estimate as without it); the setup JSON's own such fields too. Now the core's message
/// names it, as it does for the page.
#[test]
fn a_model_flag_the_family_does_not_have_is_refused_by_name() {
    assert_eq!(
        error_of(&["estimate", "--preset", "llama-3.2-1b", "--n-experts", "8"]),
        "error: model.n_experts (8) is a field of the mixture-of-experts families (mixtral, qwen2_moe, olmoe); \
         llama has a dense MLP"
    );
    assert_eq!(
        error_of(&["estimate", "--preset", "llama-3.2-1b", "--rotary-dims", "16"]),
        "error: model.rotary_dims (16) is a field of phi3 and gpt_neox (partial rotary); llama rotates whole heads"
    );
    assert_eq!(
        error_of(&["estimate", "--preset", "llama-3.2-1b", "--parallel-residual"]),
        "error: model.parallel_residual (true) is a field of gpt_neox; llama adds its branches in turn"
    );
    assert!(
        error_of(&["estimate", "--preset", "llama-3.2-1b", "--bias"]).starts_with(
            "error: model.bias (true) is a gpt2 and gpt_neox field; llama has its own biases"
        )
    );
    assert_eq!(
        error_of(&["estimate", "--sliding-window", "100"]),
        "error: model.sliding_window (100) is a Hugging Face field; gpt2 has none"
    );
    assert_eq!(
        error_of(&["estimate", "--intermediate-size", "1000"]),
        "error: model.intermediate_size (1000) is a Hugging Face field; gpt2 has none"
    );
    let path = file(
        "llama-experts.json",
        &LLAMA.replace(
            "\"intermediate_size\": 512",
            "\"intermediate_size\": 512, \"n_experts\": 8",
        ),
    );
    assert!(error_of(&["estimate", "--config", &path])
        .starts_with("error: model.n_experts (8) is a field"));
    // A family switched by flag still drops the source's own fields of other families: nanoGPT's bias under
    // --family llama, Pythia's parallel residual under --family llama.
    let (code, _, err) = vramfit(&[
        "estimate",
        "--family",
        "llama",
        "--intermediate-size",
        "1536",
        "--no-compile",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = vramfit(&[
        "estimate",
        "--preset",
        "pythia-160m",
        "--family",
        "llama",
        "--intermediate-size",
        "3072",
    ]);
    assert_eq!(code, 0, "{err}");
}

/// A setup JSON whose model is a config.json (`"model": {"hf": {...}}`) refused every model flag as
/// `unknown field "model.n_layer"`; the flag now changes the config's model as it does any other source's.
#[test]
fn model_flags_change_a_setup_json_holding_a_config_json() {
    let hf = r#"{"model": {"hf": {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": 1000, "intermediate_size": 512, "max_position_embeddings": 256}}}"#;
    let path = file("hf-setup.json", hf);
    let (code, out, err) = vramfit(&["estimate", "--config", &path, "--n-layer", "4"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("vramfit estimate: llama with 4 layers, 256 wide"),
        "{out}"
    );
    let (code, out, err) = vramfit(&["estimate", "--config", &path, "--family", "mistral"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("vramfit estimate: mistral with 2 layers"),
        "{out}"
    );
}

/// Messages that named the wrong thing: a memory far too large called "not positive", a sweep's --from past its
/// --to reported as "--values (0)", and a multi-GPU flag without a strategy as a missing JSON field.
#[test]
fn messages_name_the_flag_and_what_is_wrong_with_it() {
    assert_eq!(
        error_of(&["estimate", "--gpu-memory-gib", "1e30"]),
        "error: device.memory_gib (1000000000000000000000000000000) must be less than 1000000 GiB"
    );
    assert_eq!(
        error_of(&["estimate", "--gpu-memory-gib", "-5"]),
        "error: device.memory_gib (-5) must be a positive number of GiB"
    );
    assert_eq!(
        error_of(&["sweep", "--axis", "batch_size", "--from", "10", "--to", "1"]),
        "error: --from (10) must be at most --to (1)"
    );
    assert_eq!(
        error_of(&["sweep", "--axis", "batch_size", "--from", "0", "--to", "4"]),
        "error: --from (0) must be at least 1"
    );
    assert_eq!(
        error_of(&["estimate", "--gpus", "4"]),
        "error: command line: --gpus needs --parallel ddp|fsdp (or --tp N)"
    );
    assert_eq!(
        error_of(&["estimate", "--offload"]),
        "error: command line: --offload needs --parallel ddp|fsdp (or --tp N)"
    );
    // The audit: a sweep's axis was "sweep axis (\"depth\")", naming no flag, and a list with an empty entry named
    // the empty entry alone ("--values () must be whole numbers").
    assert_eq!(
        error_of(&["sweep", "--axis", "depth"]),
        "error: --axis (\"depth\") is not one of: batch_size, block_size"
    );
    for values in ["1,,4", "1,x", "", "1.5"] {
        assert_eq!(
            error_of(&["sweep", "--axis", "batch_size", "--values", values]),
            format!("error: --values ({values}) must be whole numbers, comma-separated")
        );
    }
}

/// The table said how much the step needs but never whether that fits the GPU given (the JSON's `fits`): Llama-2-7B
/// on an RTX 4090 printed 122 GiB and no verdict.
#[test]
fn the_table_says_whether_the_step_fits_the_gpu() {
    let (code, out, err) = vramfit(&["estimate", "--preset", "llama-2-7b", "--gpu", "rtx-4090"]);
    assert_eq!(code, 0, "{err}");
    let (_, json, _) = vramfit(&[
        "estimate",
        "--preset",
        "llama-2-7b",
        "--gpu",
        "rtx-4090",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["fits"], false);
    let over =
        v["device_total_bytes"].as_u64().unwrap() - v["device_memory_bytes"].as_u64().unwrap();
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("GPU memory"))
        .expect(&out);
    assert_eq!(
        line,
        format!(
            "  GPU memory       23.98 GiB  does not fit: {} over",
            vramfit::report::fmt_bytes(over)
        )
    );
    // The default case on an RTX 4070 (12,282 MiB): fits, with the margin the page shows.
    let (_, out, _) = vramfit(&["estimate", "--gpu", "rtx-4070"]);
    let (_, json, _) = vramfit(&["estimate", "--gpu", "rtx-4070", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let spare =
        v["device_memory_bytes"].as_u64().unwrap() - v["device_total_bytes"].as_u64().unwrap();
    assert!(
        out.contains(&format!(
            "  GPU memory       11.99 GiB  fits: {} to spare\n",
            vramfit::report::fmt_memory(spare)
        )),
        "{out}"
    );
}

/// A config.json's `attention_bias` or `mlp_bias` on a Llama was dropped without a word (the same estimate as
/// without the biases), and one without `model_type` was read as Llama without saying so.
#[test]
fn config_json_fields_vramfit_does_not_model_are_named() {
    let llama = r#""hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000,
        "intermediate_size": 512, "max_position_embeddings": 256"#;
    let path = file(
        "attention-bias.json",
        &format!(r#"{{"model_type": "llama", {llama}, "attention_bias": true}}"#),
    );
    assert_eq!(
        error_of(&["estimate", "--hf", &path]),
        "error: not modelled: llama with attention_bias (true): biases on the attention Linears"
    );
    let path = file(
        "mlp-bias.json",
        &format!(r#"{{"model_type": "olmo2", {llama}, "mlp_bias": true}}"#),
    );
    assert_eq!(
        error_of(&["estimate", "--hf", &path]),
        "error: not modelled: olmo2 with mlp_bias (true): biases on the MLP Linears"
    );
    // Written out false, as Llama 3's config.json has them: read as before.
    let path = file(
        "no-bias.json",
        &format!(
            r#"{{"model_type": "llama", {llama}, "attention_bias": false, "mlp_bias": false}}"#
        ),
    );
    let (code, out, err) = vramfit(&["estimate", "--hf", &path]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("config.json gives no model_type"), "{out}");
    let path = file("no-type.json", &format!("{{{llama}}}"));
    let (code, out, err) = vramfit(&["estimate", "--hf", &path]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("vramfit estimate: llama with 2 layers"),
        "{out}"
    );
    assert!(
        out.contains("  note: config.json gives no model_type: read as llama\n"),
        "{out}"
    );
}

/// The audit: a config.json's `hidden_act` was checked for phi3 and gpt_neox only, so TinyLlama with "gelu_new"
/// (a chain of Python ops, each saving tensors) was estimated as SiLU. Refused by name with the values accepted;
/// the accepted ones estimate what SiLU does (one op saving only its input).
#[test]
fn an_activation_vramfit_does_not_model_is_refused_by_name() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let tiny = std::fs::read_to_string(dir.join("tinyllama_config.json")).unwrap();
    assert!(tiny.contains("\"hidden_act\": \"silu\""));
    let as_silu = vramfit(&[
        "estimate",
        "--hf",
        &file("silu.json", &tiny),
        "--format",
        "json",
    ]);
    assert_eq!(as_silu.0, 0, "{}", as_silu.2);
    let peak = |out: &str| {
        serde_json::from_str::<serde_json::Value>(out).unwrap()["peak_allocated_bytes"].as_u64()
    };
    for act in ["gelu", "gelu_pytorch_tanh", "swish"] {
        let text = tiny.replace("\"silu\"", &format!("\"{act}\""));
        let (code, out, err) = vramfit(&[
            "estimate",
            "--hf",
            &file("act.json", &text),
            "--format",
            "json",
        ]);
        assert_eq!(code, 0, "{act}: {err}");
        assert_eq!(peak(&out), peak(&as_silu.1), "{act}");
    }
    let text = tiny.replace("\"silu\"", "\"gelu_new\"");
    assert_eq!(
        error_of(&["estimate", "--hf", &file("gelu_new.json", &text)]),
        "error: not modelled: llama with hidden_act \"gelu_new\": the activations vramfit models are silu, swish, \
         gelu, gelu_pytorch_tanh (one op that saves only its input)"
    );
}

/// The JSON report of a command that succeeds.
fn json_of(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = vramfit(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// `--link` reads a link to the page as the page reads it: the default case with what the link names changed
/// (so `?batch_size=4&compile=0` is `--batch-size 4 --no-compile`), its `gpu` the device; the whole address or
/// only the query; a link the page wrote for a preset on a GPU is that preset on that GPU. A GPU the page does
/// not have, or a second source, is one message.
#[test]
fn a_link_to_the_page_is_read_as_the_page_reads_it() {
    let peak = |args: &[&str]| json_of(args)["peak_allocated_bytes"].as_u64().unwrap();
    let flags = peak(&[
        "estimate",
        "--batch-size",
        "4",
        "--no-compile",
        "--gpu",
        "rtx-4090",
        "--format",
        "json",
    ]);
    for link in [
        "https://vramfit.example/?batch_size=4&compile=0&gpu=rtx-4090#results",
        "batch_size=4&compile=0&gpu=rtx-4090",
    ] {
        assert_eq!(
            peak(&["estimate", "--link", link, "--format", "json"]),
            flags,
            "{link}"
        );
    }
    let setup = vramfit::presets::model_preset("phi-3-mini").unwrap();
    let link = format!(
        "https://vramfit.example/?{}&gpu=h100-80",
        vramfit::input::setup_to_query(&setup)
    );
    let linked = json_of(&["estimate", "--link", &link, "--format", "json"]);
    let preset = json_of(&[
        "estimate",
        "--preset",
        "phi-3-mini",
        "--gpu",
        "h100-80",
        "--format",
        "json",
    ]);
    assert_eq!(
        linked["peak_allocated_bytes"],
        preset["peak_allocated_bytes"]
    );
    assert_eq!(linked["peak_reserved_bytes"], preset["peak_reserved_bytes"]);
    assert!(linked["peak_allocated_bytes"].as_u64().unwrap() > flags);
    // Flags after the link change it, as they change any source.
    assert_eq!(
        peak(&[
            "estimate",
            "--link",
            "compile=0&gpu=rtx-4090",
            "--batch-size",
            "4",
            "--format",
            "json"
        ]),
        flags
    );
    assert!(
        error_of(&["estimate", "--link", "gpu=rtx-9090"]).starts_with("error: gpu (\"rtx-9090\")"),
        "{}",
        error_of(&["estimate", "--link", "gpu=rtx-9090"])
    );
    assert_eq!(
        error_of(&["estimate", "--link", "batch_size=4", "--preset", "gpt2"]),
        "error: command line: give at most one of --config, --nanogpt, --hf, --preset, --link"
    );
}

/// The audit: `vramfit estimate --axis batch_size --values 1,2` (and strategies, finetune and compare) took the
/// sweep's options and ignored them, printing one estimate with exit status 0; `--snapshot` outside compare was
/// "unknown". Each is now refused by name, saying which command has it.
#[test]
fn another_commands_option_is_refused_by_name() {
    for cmd in ["estimate", "strategies", "finetune", "compare"] {
        for (flag, value) in [
            ("--axis", "batch_size"),
            ("--values", "1,2"),
            ("--from", "2"),
            ("--to", "8"),
        ] {
            assert_eq!(
                error_of(&[cmd, flag, value]),
                format!(
                    "error: command line: {flag} is an option of vramfit sweep, not of {cmd} (see vramfit {cmd} --help)"
                )
            );
        }
    }
    for cmd in ["estimate", "sweep", "strategies", "finetune"] {
        assert_eq!(
            error_of(&[cmd, "--snapshot", "snap.pickle"]),
            format!(
                "error: command line: --snapshot is an option of vramfit compare, not of {cmd} (see vramfit {cmd} --help)"
            )
        );
    }
    // Their own commands still take them.
    let (code, _, err) = vramfit(&["sweep", "--axis", "batch_size", "--from", "2", "--to", "8"]);
    assert_eq!(code, 0, "{err}");
}

/// The audit: a config.json given to --config was "unknown field \"architectures\"" and a setup JSON given to --hf
/// "missing required field \"hidden_size\"", naming neither the file nor the flag it needed.
#[test]
fn a_file_given_to_the_wrong_flag_is_named_with_the_flag_it_needs() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let hf = dir.join("tinyllama_config.json").display().to_string();
    let setup = dir.join("founding.json").display().to_string();
    assert_eq!(
        error_of(&["estimate", "--config", &hf]),
        format!(
            "error: --config ({hf}) is a Hugging Face config.json (model_type \"llama\"): give it with --hf"
        )
    );
    assert_eq!(
        error_of(&["estimate", "--hf", &setup]),
        format!(
            "error: --hf ({setup}) is a setup JSON ({{\"model\": ...}}): give it with --config"
        )
    );
    // Each with its own flag estimates.
    for (flag, path) in [("--hf", &hf), ("--config", &setup)] {
        let (code, _, err) = vramfit(&["estimate", flag, path]);
        assert_eq!(code, 0, "{flag}: {err}");
    }
}

/// The audit: a widget's link (`embed.html?preset=llama-3.1-8b&gpu=rtx-4090`) given to --link estimated the page's
/// default case, the nanoGPT model, on that GPU with exit status 0: the page's links never set a preset and the page
/// ignores the key. The CLI now says so and names the flag that does.
#[test]
fn a_link_naming_a_preset_is_refused_with_the_flag_that_sets_one() {
    for link in [
        "https://YOUR-SITE/embed.html?preset=llama-3.1-8b&gpu=rtx-4090&plot=batch",
        "preset=llama-3.1-8b",
    ] {
        assert_eq!(
            error_of(&["estimate", "--link", link]),
            "error: --link (preset=llama-3.1-8b) names the widget's preset, which a link to the page does not \
             set: give --preset llama-3.1-8b"
        );
    }
    // The widget's other keys say nothing about the setup and are passed over, as the page passes over them.
    let (code, _, err) = vramfit(&["estimate", "--link", "batch_size=4&plot=batch&theme=dark"]);
    assert_eq!(code, 0, "{err}");
}

/// The audit: a file that cannot be read or parsed was named by its path alone ("/no/such.json: No such file or
/// directory"), or, given to --hf, as "config.json"; each message now starts with the flag and the path.
#[test]
fn a_file_that_cannot_be_read_is_named_with_its_flag() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let py = dir.join("shakespeare_char.py").display().to_string();
    let json = dir.join("tinyllama_config.json").display().to_string();
    for flag in ["--config", "--nanogpt", "--hf"] {
        assert_eq!(
            error_of(&["estimate", flag, "/no/such/file"]),
            format!("error: {flag} /no/such/file: No such file or directory (os error 2)")
        );
    }
    assert_eq!(
        error_of(&["compare", "--snapshot", "/no/such/file"]),
        "error: --snapshot /no/such/file: No such file or directory (os error 2)"
    );
    for (flag, path) in [("--config", &py), ("--hf", &py), ("--nanogpt", &json)] {
        let e = error_of(&["estimate", flag, path]);
        assert!(
            e.starts_with(&format!("error: {flag} {path}, line 1: ")),
            "{e}"
        );
    }
    let bad = file("bad.pickle", "xx");
    let e = error_of(&["compare", "--snapshot", &bad]);
    assert!(
        e.starts_with(&format!(
            "error: --snapshot {bad}: not a readable PyTorch memory snapshot"
        )),
        "{e}"
    );
}
