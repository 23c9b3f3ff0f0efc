//! The vramfit command line: `vramfit estimate`, `vramfit sweep` and `vramfit compare` (a PyTorch memory
//! snapshot beside the estimate) over the same core as the web page, and `vramfit gpus`, the GPU presets.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

/// `writeln!` into a String (cannot fail).
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

use serde_json::{json, Value};
use vramfit::input::{hf_config, nanogpt_config, setup_from_value, setup_to_value};
use vramfit::model::alloc_conf_string;
use vramfit::parallel::Strategy;
use vramfit::report::{fmt_bytes, fmt_memory, fmt_within};
use vramfit::sweep::{powers_of_two, sweep, Axis};
use vramfit::{estimate, Error, Setup};

/// One subcommand: its name, its usage line, what it does, and the options of its own (each with its default);
/// the commands that estimate a setup also take `SOURCE_HELP`, `KNOBS_HELP` and `PARALLEL_HELP`. `vramfit --help`
/// and `vramfit COMMAND --help` are both written from these, so each text is in one place.
struct Command {
    name: &'static str,
    usage: &'static str,
    about: &'static str,
    /// Its own options, one text each (shared ones, such as `FORMAT_TABLE_JSON`, by name).
    options: &'static [&'static str],
    takes_setup: bool,
}

/// The formats of the commands that print a table or JSON.
const FORMAT_TABLE_JSON: &str =
    "  --format table|json  table (the default): for people; json: the same figures as JSON, sizes in bytes
";

const COMMANDS: &[Command] = &[
    Command {
        name: "estimate",
        usage: "vramfit estimate [SOURCE] [KNOBS] [--format table|json|snapshot]",
        about: "\
the memory of one training step on the device: peak allocated and reserved, the total on the
device (CUDA context included) against the GPU's memory, what is live at the peak, and the
timeline",
        options: &["  --format table|json|snapshot
                       table (the default): for people; json: the report as JSON, sizes in bytes; snapshot: the
                       predicted allocation timeline as a PyTorch memory snapshot (a pickle for
                       `python -m torch.cuda._memory_viz trace_plot` or https://pytorch.org/memory_viz)
"],
        takes_setup: true,
    },
    Command {
        name: "compare",
        usage: "vramfit compare --snapshot FILE [SOURCE] [KNOBS] [--format table|json]",
        about: "\
a snapshot of your run (torch.cuda.memory._dump_snapshot(), gzip'd or not) beside the estimate
for the setup given: both peaks, the difference, the largest blocks at the peak",
        options: &[
            "  --snapshot FILE      the snapshot (required)\n",
            FORMAT_TABLE_JSON,
        ],
        takes_setup: true,
    },
    Command {
        name: "sweep",
        usage: "vramfit sweep --axis batch_size|block_size [--values 1,2,4 | --from N --to M] [SOURCE] [KNOBS] [--format csv|json]",
        about: "the estimate at each value of the batch size or the block size, one line each",
        options: &["  --axis batch_size|block_size   what varies (required); the rest of the setup stays
  --values 1,2,4       the values, whole numbers (1 to 4096 of them)
  --from N --to M      instead of --values: the powers of two from N to M (defaults: 1, and four times the
                       setup's own value)
  --format csv|json    csv (the default): one row per value; json: the points as JSON, sizes in bytes
"],
        takes_setup: true,
    },
    Command {
        name: "strategies",
        usage: "vramfit strategies [SOURCE] [KNOBS] [--format table|json]",
        about: "\
how many GPUs of the device's kind, and with which strategy: memory per GPU on 1 to 64 GPUs
under DDP, ZeRO-2, ZeRO-3, ZeRO-3 x tensor parallel and ZeRO-3 with CPU offload (FSDP2), the
fewest that fit each (searched up to 4096), and the cheapest that fits",
        options: &[FORMAT_TABLE_JSON],
        takes_setup: true,
    },
    Command {
        name: "finetune",
        usage: "vramfit finetune [SOURCE] [KNOBS] [--format table|json]",
        about: "\
full fine-tuning, LoRA and QLoRA (the --finetune recipes) side by side on the device: each
one's memory at the batch given, whether it fits, the largest batch that fits, and which to
run",
        options: &[FORMAT_TABLE_JSON],
        takes_setup: true,
    },
    Command {
        name: "gpus",
        usage: "vramfit gpus [--format table|json]",
        about: "\
the GPU presets --gpu takes: memory as the driver reports it (cut, never rounded up), compute
capability, SMs",
        options: &[FORMAT_TABLE_JSON],
        takes_setup: false,
    },
];

const HEADER: &str = "vramfit: GPU memory of one training step (PyTorch, CUDA), op by op\n";

const SOURCE_HELP: &str = "\
SOURCE (at most one; without one, the default nanoGPT case: 6 layers, 384 wide, block 512, batch 16,
vocab 50304, fp16-amp, fused AdamW, torch.compile):
  --config FILE        setup JSON: {\"model\": {...}, \"train\": {...}, \"device\": {...}}
  --nanogpt FILE       a nanoGPT config/*.py file (train.py defaults fill the rest)
  --hf FILE            a Hugging Face config.json (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text,
                       olmo2, phi3, gpt_neox, mixtral, qwen2_moe, olmoe)
  --preset ID          a named model (nanogpt-30m, shakespeare-char, gpt2, gpt2-medium, gpt2-large, gpt2-xl,
                       tinyllama-1.1b, llama-3.2-1b, llama-2-7b, mistral-7b, qwen2.5-0.5b, llama-3.1-8b,
                       llama-3.1-70b, qwen2.5-1.5b, qwen2.5-7b, gemma-2-2b, gemma-3-1b, phi-3-mini,
                       mixtral-8x7b, olmoe-1b-7b, pythia-160m, pythia-1b)
  --link URL           a link to the page (or its query, e.g. 'batch_size=4&compile=0'), read as the page
                       reads it: the default case with what the link names changed, its gpu as the device
";

const KNOBS_HELP: &str = "\
KNOBS (override the source):
  --family gpt2|llama|mistral|qwen2|qwen3|gemma|gemma2|gemma3|olmo2|phi3|gpt_neox|mixtral|qwen2_moe|olmoe
  --n-layer N  --n-head N  --n-kv-head N  --n-embd N  --block-size N  --vocab-size N
  --intermediate-size N  --bias | --no-bias  --tie-embeddings | --no-tie-embeddings  --head-dim N
  --sliding-window N  --dropout P
  --rotary-dims N      rotary dimensions per head (phi3, gpt_neox; 0: the whole head)
  --parallel-residual | --no-parallel-residual   (gpt_neox's use_parallel_residual)
  --n-experts N  --experts-per-token K   (mixtral, qwen2_moe, olmoe; intermediate-size is an expert's width)
  --shared-expert-size N                 (qwen2_moe's shared_expert_intermediate_size)
  --norm-topk-prob | --no-norm-topk-prob (qwen2_moe, olmoe)
  --router-aux-loss | --no-router-aux-loss (output_router_logits: the router's load-balancing loss)
  --batch-size N  --seq-len N  --precision fp32|fp16-amp|bf16-amp|bf16
  --optimizer adamw|adamw-fused|sgd|sgd-momentum|adamw8bit|paged-adamw8bit|adafactor|lion|lion8bit
  --attention sdpa|manual|flash_attention_2  (flash_attention_2: the flash-attn package, for llama,
                       mistral and qwen2, eager, fp16/bf16)
  --checkpointing | --no-checkpointing  --grad-accum-steps N  --grad-clip X
  --set-to-none | --no-set-to-none     (optimizer.zero_grad(set_to_none=...), default set_to_none)
  --compile | --no-compile             torch.compile(model); default: on for the default case and the nanoGPT
                       presets (as train.py runs them), off for --hf, the Hugging Face presets and a setup JSON
                       without train.compile; --nanogpt: the file's (train.py's True when it is unset)
  --alloc-conf TEXT    PYTORCH_CUDA_ALLOC_CONF as PyTorch reads it, e.g. expandable_segments:True or
                       max_split_size_mb:128,garbage_collection_threshold:0.8 (default: PyTorch's defaults)
  --lora SPEC          LoRA as peft applies it, e.g. r=16 or r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj,
                       save=lm_head (targets: all-linear or module names joined by +; peft's defaults: r 8,
                       alpha 8, dropout 0, q_proj+v_proj); the base is frozen. --no-lora trains every parameter
  --finetune full|lora|qlora    the usual recipes by name (the setup JSON's train.finetune.method): lora is
                       r=16,alpha=32,dropout=0.05,targets=all-linear over a base loaded in the precision's
                       dtype (bf16 under bf16-amp, fp16 under fp16-amp, fp32 under fp32); qlora the same over a
                       4-bit NF4 base with double quantization, bf16-amp and checkpointing on
                       (prepare_model_for_kbit_training's default); full trains every parameter. Later flags
                       (--lora, --base-dtype, ...) change the recipe. Mixtral, OLMoE: all-linear also adapts the
                       router (gate) and the fused experts (gate_up_proj, down_proj) through peft's ParamWrapper,
                       which takes no dropout (the recipe's is 0 there); a quantized base leaves those
                       unquantized, fp32
  --base-dtype fp32|bf16|fp16   the frozen base's dtype under LoRA (adapters stay fp32 under autocast)
  --quantization nf4|fp4|int8  --double-quant | --no-double-quant   a bitsandbytes base under LoRA (QLoRA:
                       4-bit Linears under bf16-amp; int8: LLM.int8 Linears under bf16-amp or fp16-amp; the
                       rest fp32 after prepare_model_for_kbit_training)
  --gpu ID             a GPU preset (rtx-4070, h100-80, ...: see vramfit gpus): its memory, compute
                       capability and SM count, whatever the SOURCE says (a preset or a config keeps the GPU
                       given)
  --gpu-memory-gib X  --compute-capability X.Y
  --sms N              streaming multiprocessors (flash attention splits the keys of a small grid across
                       them); default: the GPU preset with that memory and capability, else 108 at 8.0, 82 at
                       8.6, 46 at 8.9, 132 otherwise
";

const PARALLEL_HELP: &str = "\
MORE THAN ONE GPU (every figure is then per GPU, for rank 0; the batch is per GPU):
  --parallel ddp|fsdp|zero2|zero3|single
                       DistributedDataParallel, or FSDP2's fully_shard on each block and the root; zero3 is
                       fsdp, zero2 is fsdp with --no-reshard-after-forward (zero1 is not modelled)
  --gpus N             GPUs in the job (world_size)
  --tp N               tensor parallelism over N GPUs (DTensor: q/k/v/gate/up ColwiseParallel, o/down
                       RowwiseParallel, embedding, norms and head replicated; llama-shaped families): alone
                       (--gpus defaults to N) or with --parallel fsdp (FSDP2 over dp = gpus / N; ddp refused)
  --sequence-parallel | --no-sequence-parallel   with --tp: torchtitan's sequence parallel (norms on a
                       sequence shard, embedding and head sharded on the vocabulary, loss_parallel)
  --init-on-device     with --tp alone: the whole model is built on each GPU, then parallelize_module shards
                       it (pytorch/examples' tensor_parallelism); default: built on the meta device and
                       materialised as each GPU's shards (torchtitan)
  --bucket-cap-mb N  --gradient-as-bucket-view | --no-gradient-as-bucket-view  --static-graph   (ddp)
  --reshard-after-forward | --no-reshard-after-forward  --param-dtype bf16|fp32  --reduce-dtype bf16|fp32
  --offload | --no-offload                                                                      (fsdp)
";

/// Each line of `text` indented by `pad` spaces.
fn indented(text: &str, pad: usize) -> String {
    text.lines().map(|l| format!("{:pad$}{l}\n", "")).collect()
}

/// `vramfit --help`: every command with what it does, then the options they share.
fn usage() -> String {
    let mut out = format!("{HEADER}\nusage:\n");
    for c in COMMANDS {
        out += &indented(c.usage, 2);
        out += &indented(c.about, 16);
    }
    out += "\n`vramfit COMMAND --help` shows one command's usage with its options.\n\n";
    out += &format!("{SOURCE_HELP}\n{KNOBS_HELP}\n{PARALLEL_HELP}");
    out
}

/// `vramfit COMMAND --help`: what the command does, its usage and its options, with their defaults.
fn command_usage(c: &Command) -> String {
    let mut out = format!(
        "{HEADER}\nusage:\n{}\n{}\n\nOPTIONS:\n{}",
        indented(c.usage, 2),
        c.about,
        c.options.concat()
    );
    if c.takes_setup {
        out += &format!("\n{SOURCE_HELP}\n{KNOBS_HELP}\n{PARALLEL_HELP}");
    }
    out
}

/// `--lora r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj,save=lm_head` as the setup JSON's `train.lora`:
/// comma-separated `key=value` pairs; `targets` and `save` list module names joined by `+` (`targets=all-linear`).
fn lora_spec(spec: &str) -> Result<Value, Error> {
    let bad = |reason: String| Error::invalid("--lora", format!("{spec:?}"), reason);
    let mut o = serde_json::Map::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("has {part:?}, not key=value (r=16,alpha=32,...)")))?;
        let num = |v: &str| {
            v.parse::<f64>()
                .map(Value::from)
                .map_err(|_| bad(format!("{k} must be a number, not {v:?}")))
        };
        let list = |v: &str| Value::from(v.split('+').collect::<Vec<_>>());
        let (key, value) = match k {
            "r" => (
                "r",
                v.parse::<u64>()
                    .map(Value::from)
                    .map_err(|_| bad(format!("r must be a whole number, not {v:?}")))?,
            ),
            "alpha" => ("alpha", num(v)?),
            "dropout" => ("dropout", num(v)?),
            "targets" => ("target_modules", list(v)),
            "save" => ("modules_to_save", list(v)),
            _ => {
                return Err(bad(format!(
                    "has an unknown key {k:?}; the keys are r, alpha, dropout, targets, save"
                )))
            }
        };
        o.insert(key.into(), value);
    }
    Ok(Value::Object(o))
}

/// The default nanoGPT case (the one that started the project), compiled as train.py does by default.
fn default_setup() -> Value {
    json!({"model": {"family": "gpt2", "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 512,
                     "vocab_size": 50304, "bias": false, "dropout": 0.0},
           "train": {"batch_size": 16, "seq_len": 512, "precision": "fp16-amp", "optimizer": "adamw-fused",
                     "attention": "sdpa", "checkpointing": false, "grad_accum_steps": 1, "grad_clip": 1.0,
                     "compile": true}})
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EstimateFormat {
    Table,
    Json,
    Snapshot,
}

enum Cli {
    /// The overview, or one command's usage.
    Help(Option<&'static Command>),
    Gpus {
        json: bool,
    },
    Estimate {
        setup: Setup,
        format: EstimateFormat,
        notes: Vec<String>,
    },
    Compare {
        setup: Setup,
        json: bool,
        snapshot: Vec<u8>,
        path: String,
    },
    Sweep {
        setup: Setup,
        axis: Axis,
        values: Vec<u64>,
        json: bool,
    },
    Finetune {
        setup: Setup,
        json: bool,
    },
    Strategies {
        setup: Setup,
        json: bool,
    },
}

/// A file a flag names, as the text of its messages: "--config setup.json" (a missing file's message named the
/// path alone, not the flag).
fn source(flag: &str, path: &str) -> String {
    format!("{flag} {path}")
}

fn read(flag: &str, path: &str) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::Parse {
        source: source(flag, path),
        line: None,
        message: e.to_string(),
    })
}

/// A link to the page (its address, or only the query after `?`), read as the page reads it: over the page's
/// default case (the founding case, on the RTX 4070 the page starts with), with the link's GPU preset, if it
/// names one, as the device.
fn setup_of_link(text: &str) -> Result<Setup, Error> {
    let query = match text.split_once('?') {
        Some((_, q)) => q,
        None if text.contains("://") => "",
        None => text,
    };
    let query = query.split('#').next().unwrap_or_default();
    let base = vramfit::input::setup_to_query(&vramfit::presets::founding());
    let mut extra = Vec::new();
    let mut s =
        vramfit::input::setup_from_query(&vramfit::input::query_over(&base, query), &mut extra)?;
    // `preset` is the widget's key (embed.html?preset=gpt2&...), which the page's links never hold and the page
    // ignores: read as the page reads it, a widget's link was the default case, silently.
    if let Some((_, id)) = extra.iter().find(|(k, _)| k == "preset") {
        return Err(Error::invalid(
            "--link",
            format!("preset={id}"),
            format!("names the widget's preset, which a link to the page does not set: give --preset {id}"),
        ));
    }
    // The page takes a key's first value (`URLSearchParams.get`).
    if let Some((_, id)) = extra.iter().find(|(k, _)| k == "gpu") {
        let g = gpu_preset("gpu", id)?;
        s.device = g.device();
    }
    Ok(s)
}

/// The GPU preset `id`, or the message naming `field` (`--gpu`, a link's `gpu`) and the presets there are.
fn gpu_preset(field: &str, id: &str) -> Result<&'static vramfit::presets::GpuPreset, Error> {
    vramfit::presets::gpu(id).ok_or_else(|| Error::UnknownValue {
        field: field.into(),
        value: id.into(),
        allowed: vramfit::presets::GPU_IDS,
    })
}

/// A reader's parse error named by the flag and the file it came from (`--hf config.json`), not by the reader's
/// own name for its input.
fn parsed_in(e: Error, flag: &str, path: &str) -> Error {
    match e {
        Error::Parse { line, message, .. } => Error::Parse {
            source: source(flag, path),
            line,
            message,
        },
        other => other,
    }
}

/// A snapshot file's bytes, refused before reading when it is past what the reader takes.
fn read_snapshot_file(path: &str) -> Result<Vec<u8>, Error> {
    let io = |e: std::io::Error| Error::Parse {
        source: source("--snapshot", path),
        line: None,
        message: e.to_string(),
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > vramfit::snapshot::MAX_SNAPSHOT_BYTES {
        return Err(Error::TooLarge {
            what: format!(
                "{path} is {} MiB, past the {} MiB a snapshot may have",
                len >> 20,
                vramfit::snapshot::MAX_SNAPSHOT_BYTES >> 20
            ),
        });
    }
    std::fs::read(path).map_err(io)
}

fn usage_error(message: String) -> Error {
    Error::Parse {
        source: "command line".into(),
        line: None,
        message,
    }
}

/// The on/off flags: `--NAME` sets the field true, `--no-NAME` false (`--static-graph` has no `--no-` form: it
/// is off unless given). (flag name, section of the setup JSON or `parallel` for `train.parallel`, field).
const SWITCHES: &[(&str, &str, &str)] = &[
    ("bias", "model", "bias"),
    ("parallel-residual", "model", "parallel_residual"),
    ("router-aux-loss", "model", "router_aux_loss"),
    ("norm-topk-prob", "model", "norm_topk_prob"),
    ("tie-embeddings", "model", "tie_embeddings"),
    ("set-to-none", "train", "zero_grad_set_to_none"),
    ("compile", "train", "compile"),
    ("checkpointing", "train", "checkpointing"),
    ("double-quant", "train", "double_quant"),
    (
        "gradient-as-bucket-view",
        "parallel",
        "gradient_as_bucket_view",
    ),
    ("sequence-parallel", "parallel", "sequence_parallel"),
    ("reshard-after-forward", "parallel", "reshard_after_forward"),
    ("offload", "parallel", "offload"),
];

/// Parses a flag's number: the message names the flag.
fn number(flag: &str, v: &str) -> Result<Value, Error> {
    if let Ok(u) = v.parse::<i64>() {
        return Ok(u.into());
    }
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(json!(f)),
        _ => Err(Error::invalid(flag, v, "must be a number")),
    }
}

fn parse(args: &[String]) -> Result<Cli, Error> {
    let Some(cmd) = args.first() else {
        return Ok(Cli::Help(None));
    };
    let command = |name: &str| COMMANDS.iter().find(|c| c.name == name);
    if matches!(cmd.as_str(), "-h" | "--help" | "help") {
        // `vramfit help estimate` is `vramfit estimate --help`.
        return match args.get(1) {
            None => Ok(Cli::Help(None)),
            Some(name) => command(name).map(|c| Cli::Help(Some(c))).ok_or_else(|| {
                usage_error(format!(
                    "unknown command {name:?}; expected estimate, sweep, compare, strategies, finetune or gpus"
                ))
            }),
        };
    }
    // A command's --help anywhere among its flags is its usage, before any file a flag names is read.
    if let Some(c) = command(cmd) {
        if args[1..]
            .iter()
            .any(|a| matches!(a.as_str(), "-h" | "--help"))
        {
            return Ok(Cli::Help(Some(c)));
        }
    }
    if cmd == "gpus" {
        return parse_gpus(&args[1..]);
    }
    if !matches!(
        cmd.as_str(),
        "estimate" | "sweep" | "compare" | "strategies" | "finetune"
    ) {
        return Err(usage_error(format!(
            "unknown command {cmd:?}; expected estimate, sweep, compare, strategies, finetune or gpus (see --help)"
        )));
    }
    let mut snapshot: Option<(String, Vec<u8>)> = None;
    let mut base: Option<Value> = None;
    let mut notes = Vec::new();
    let mut overrides: Vec<(&str, &str, Value)> = Vec::new();
    // `train.parallel`'s fields (`mixed_precision`'s as "mixed_precision.KEY").
    let mut parallel: Vec<(&str, Value)> = Vec::new();
    let mut format = None;
    let (mut axis, mut values, mut from, mut to) = (None, None, None, None);
    let mut i = 1;
    let next = |i: &mut usize, flag: &str| -> Result<String, Error> {
        *i += 1;
        args.get(*i)
            .cloned()
            .ok_or_else(|| usage_error(format!("{flag} needs a value")))
    };
    while i < args.len() {
        let flag = args[i].as_str();
        let set_source = |v: Value, base: &mut Option<Value>| -> Result<(), Error> {
            if base.is_some() {
                return Err(usage_error(
                    "give at most one of --config, --nanogpt, --hf, --preset, --link".into(),
                ));
            }
            *base = Some(v);
            Ok(())
        };
        // A switch and its `--no-` form (`--compile` / `--no-compile`), from `SWITCHES`.
        let switch = flag.strip_prefix("--").and_then(|f| {
            let (name, on) = f.strip_prefix("no-").map_or((f, true), |n| (n, false));
            SWITCHES
                .iter()
                .find(|s| s.0 == name)
                .map(|s| (s.1, s.2, on))
        });
        match (flag, switch) {
            (_, Some(("parallel", key, on))) => parallel.push((key, Value::Bool(on))),
            (_, Some((section, key, on))) => overrides.push((section, key, Value::Bool(on))),
            _ => {}
        }
        if switch.is_some() {
            i += 1;
            continue;
        }
        match flag {
            "--config" => {
                let path = next(&mut i, flag)?;
                let text = read(flag, &path)?;
                let v: Value = serde_json::from_str(&text).map_err(|e| Error::Parse {
                    source: source(flag, &path),
                    line: Some(e.line()),
                    message: e.to_string(),
                })?;
                // A config.json given as a setup JSON was "unknown field \"architectures\"" (or whichever key
                // came first), naming neither the file nor the flag it needs.
                if v.get("model_type").is_some() && v.get("model").is_none() {
                    return Err(Error::invalid(
                        "--config",
                        &path,
                        format!(
                            "is a Hugging Face config.json (model_type {}): give it with --hf",
                            v["model_type"]
                        ),
                    ));
                }
                set_source(v, &mut base)?;
            }
            "--nanogpt" => {
                let path = next(&mut i, flag)?;
                let imp =
                    nanogpt_config(&read(flag, &path)?).map_err(|e| parsed_in(e, flag, &path))?;
                for p in &imp.provenance {
                    notes.push(format!("{} = {} ({})", p.key, p.value, p.source));
                }
                notes.extend(imp.notes);
                set_source(setup_to_value(&imp.setup), &mut base)?;
            }
            "--hf" => {
                let path = next(&mut i, flag)?;
                let text = read(flag, &path)?;
                // A setup JSON given as a config.json was "missing required field \"hidden_size\"".
                if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&text) {
                    if o.contains_key("model") && !o.contains_key("model_type") {
                        return Err(Error::invalid(
                            "--hf",
                            &path,
                            "is a setup JSON ({\"model\": ...}): give it with --config",
                        ));
                    }
                }
                let (m, hf_notes) = hf_config(&text).map_err(|e| parsed_in(e, flag, &path))?;
                notes.extend(hf_notes);
                let v = setup_to_value(&vramfit::input::hf_setup(m));
                set_source(v, &mut base)?;
            }
            "--link" => {
                let text = next(&mut i, flag)?;
                set_source(setup_to_value(&setup_of_link(&text)?), &mut base)?;
            }
            "--preset" => {
                let id = next(&mut i, flag)?;
                let setup =
                    vramfit::presets::model_preset(&id).ok_or_else(|| Error::UnknownValue {
                        field: "--preset".into(),
                        value: id.clone(),
                        allowed: vramfit::presets::MODEL_IDS,
                    })?;
                set_source(setup_to_value(&setup), &mut base)?;
            }
            "--gpu" => {
                let id = next(&mut i, flag)?;
                let g = gpu_preset(flag, &id)?;
                overrides.push((
                    "device",
                    "memory_gib",
                    json!(g.memory_bytes as f64 / (1u64 << 30) as f64),
                ));
                overrides.push(("device", "compute_capability", json!(g.sm as f64 / 10.0)));
                overrides.push(("device", "sms", json!(g.device().sms)));
            }
            "--format" => format = Some(next(&mut i, flag)?),
            // One command's own options are refused by the others by name (estimate took --axis and --values and
            // ignored them).
            "--axis" | "--values" | "--from" | "--to" if cmd != "sweep" => {
                return Err(usage_error(format!(
                    "{flag} is an option of vramfit sweep, not of {cmd} (see vramfit {cmd} --help)"
                )))
            }
            "--snapshot" if cmd != "compare" => {
                return Err(usage_error(format!(
                "{flag} is an option of vramfit compare, not of {cmd} (see vramfit {cmd} --help)"
            )))
            }
            "--snapshot" => {
                let path = next(&mut i, flag)?;
                snapshot = Some((path.clone(), read_snapshot_file(&path)?));
            }
            // The message names the flag (the core's names the sweep's axis, which the page passes).
            "--axis" => {
                axis = Some(Axis::parse(&next(&mut i, flag)?).map_err(|e| match e {
                    Error::UnknownValue { value, allowed, .. } => Error::UnknownValue {
                        field: "--axis".into(),
                        value,
                        allowed,
                    },
                    other => other,
                })?)
            }
            "--values" => {
                let text = next(&mut i, flag)?;
                let parsed: Result<Vec<u64>, Error> = text
                    .split(',')
                    .map(|s| {
                        s.trim().parse::<u64>().map_err(|_| {
                            Error::invalid(
                                "--values",
                                &text,
                                "must be whole numbers, comma-separated",
                            )
                        })
                    })
                    .collect();
                values = Some(parsed?);
            }
            "--from" => {
                from =
                    Some(next(&mut i, flag)?.parse::<u64>().map_err(|_| {
                        Error::invalid("--from", &args[i], "must be a whole number")
                    })?)
            }
            "--to" => {
                to = Some(
                    next(&mut i, flag)?
                        .parse::<u64>()
                        .map_err(|_| Error::invalid("--to", &args[i], "must be a whole number"))?,
                )
            }
            "--lora" => {
                let spec = next(&mut i, flag)?;
                overrides.push(("train", "lora", lora_spec(&spec)?));
            }
            "--no-lora" => overrides.push(("train", "lora", Value::Null)),
            // The usual recipes by name (issue 13): LoRA as the page sets it up (r 16, alpha 32, dropout 0.05, every
            // Linear), QLoRA the same over a 4-bit NF4 base with double quantization (the QLoRA paper's), full
            // fine-tuning every parameter trained.
            // The usual recipes by name (issue 13; `finetune::Method`, the setup JSON's `train.finetune`): the
            // source's own fine-tuning fields are cleared, so the recipe's apply unless a later flag sets them.
            "--finetune" => {
                let method = next(&mut i, flag)?;
                let m = vramfit::finetune::Method::parse(&method, "--finetune")?;
                let mut cleared = vec!["lora", "base_dtype", "quantization", "double_quant"];
                if m == vramfit::finetune::Method::Qlora {
                    cleared.extend(["precision", "checkpointing"]);
                }
                for key in cleared {
                    overrides.push(("train", key, Value::Null));
                }
                overrides.push(("train", "finetune", json!({ "method": m.name() })));
            }
            "--static-graph" => parallel.push(("static_graph", Value::Bool(true))),
            "--init-on-device" => parallel.push(("init_on_device", Value::Bool(true))),
            "--parallel" => parallel.push(("strategy", Value::String(next(&mut i, flag)?))),
            "--param-dtype" => parallel.push((
                "mixed_precision.param_dtype",
                Value::String(next(&mut i, flag)?),
            )),
            "--reduce-dtype" => parallel.push((
                "mixed_precision.reduce_dtype",
                Value::String(next(&mut i, flag)?),
            )),
            "--gpus" | "--tp" | "--bucket-cap-mb" => {
                let raw = next(&mut i, flag)?;
                let key = match flag {
                    "--gpus" => "gpus",
                    "--tp" => "tp",
                    _ => "bucket_cap_mb",
                };
                parallel.push((key, number(flag, &raw)?));
            }
            _ => {
                let (section, key, is_str) = match flag {
                    "--family" => ("model", "family", true),
                    "--n-layer" => ("model", "n_layer", false),
                    "--n-head" => ("model", "n_head", false),
                    "--n-kv-head" => ("model", "n_kv_head", false),
                    "--n-embd" => ("model", "n_embd", false),
                    "--block-size" => ("model", "block_size", false),
                    "--vocab-size" => ("model", "vocab_size", false),
                    "--intermediate-size" => ("model", "intermediate_size", false),
                    "--sliding-window" => ("model", "sliding_window", false),
                    "--head-dim" => ("model", "head_dim", false),
                    "--rotary-dims" => ("model", "rotary_dims", false),
                    "--n-experts" => ("model", "n_experts", false),
                    "--experts-per-token" => ("model", "experts_per_token", false),
                    "--shared-expert-size" => ("model", "shared_expert_size", false),
                    "--dropout" => ("model", "dropout", false),
                    "--batch-size" => ("train", "batch_size", false),
                    "--seq-len" => ("train", "seq_len", false),
                    "--precision" => ("train", "precision", true),
                    "--optimizer" => ("train", "optimizer", true),
                    "--attention" => ("train", "attention", true),
                    "--grad-accum-steps" => ("train", "grad_accum_steps", false),
                    "--grad-clip" => ("train", "grad_clip", false),
                    "--alloc-conf" => ("train", "alloc_conf", true),
                    "--base-dtype" => ("train", "base_dtype", true),
                    "--quantization" => ("train", "quantization", true),
                    "--gpu-memory-gib" => ("device", "memory_gib", false),
                    "--compute-capability" => ("device", "compute_capability", false),
                    "--sms" => ("device", "sms", false),
                    _ => return Err(usage_error(format!("unknown option {flag:?} (see --help)"))),
                };
                let raw = next(&mut i, flag)?;
                let v = if is_str {
                    Value::String(raw)
                } else {
                    number(flag, &raw)?
                };
                overrides.push((section, key, v));
            }
        }
        i += 1;
    }
    let mut v = base.unwrap_or_else(default_setup);
    let block_override = overrides.iter().any(|(_, k, _)| *k == "block_size");
    let seq_override = overrides.iter().any(|(_, k, _)| *k == "seq_len");
    // A new memory or capability without an SM count: the count follows them (`device.sms` left out).
    let device_override = overrides
        .iter()
        .any(|(s, k, _)| *s == "device" && *k != "sms");
    let sms_override = overrides.iter().any(|(_, k, _)| *k == "sms");
    // The flags below are written into the setup JSON: a file whose top level or section is not an object is
    // refused here with the reader's own message (serde_json's indexing would panic on it).
    check_shape(&v)?;
    if device_override && !sms_override {
        if let Some(d) = v.get_mut("device").and_then(Value::as_object_mut) {
            d.remove("sms");
        }
    }
    let model_flags = overrides
        .iter()
        .any(|(s, k, _)| *s == "model" && *k != "family");
    let family_flag = overrides
        .iter()
        .find(|(s, k, _)| *s == "model" && *k == "family")
        .and_then(|(_, _, f)| f.as_str().map(str::to_string));
    // A setup JSON whose model is a config.json (`"model": {"hf": {...}}`) takes model flags as its fields.
    if (model_flags || family_flag.is_some()) && v["model"].get("hf").is_some() {
        let hf = v["model"]["hf"].as_object().ok_or_else(|| {
            Error::invalid("model.hf", &v["model"]["hf"], "must be a JSON object")
        })?;
        let (m, hf_notes) = vramfit::input::hf_config_object(hf)?;
        notes.extend(hf_notes);
        v["model"] = setup_to_value(&vramfit::input::hf_setup(m))["model"].take();
    }
    // A family switched by flag drops the source's fields of the other families (a gpt2 source's bias under
    // --family llama). Only the source's: the flags are written after, so one that names a field the family does
    // not have is refused by name ("model.n_experts (8) is a field of the mixture-of-experts families").
    if let Some(family) = &family_flag {
        if let Some(m) = v["model"].as_object_mut() {
            for k in other_family_fields(family) {
                m.remove(k);
            }
        }
    }
    for (section, key, value) in overrides {
        if v.get(section).is_none() {
            v[section] = json!({});
        }
        v[section][key] = value;
    }
    if !parallel.is_empty() {
        if v.get("train").is_none() {
            v["train"] = json!({});
        }
        let p = &mut v["train"]["parallel"];
        if !p.is_object() {
            *p = json!({});
        }
        for (key, value) in parallel {
            match key.strip_prefix("mixed_precision.") {
                Some(k) => {
                    if !p["mixed_precision"].is_object() {
                        p["mixed_precision"] = json!({});
                    }
                    p["mixed_precision"][k] = value;
                }
                None => p[key] = value,
            }
        }
        // `--tp N` alone is tensor parallelism without a data-parallel wrapper (`--init-on-device` says how it is
        // built: alone, it is refused by name).
        if p.get("strategy").is_none()
            && (p.get("tp").is_some() || p.get("init_on_device").is_some())
        {
            p["strategy"] = json!("single");
        }
        // Any other of these flags with no strategy, in the flags or the source: the flag is named.
        if p.get("strategy").is_none() {
            let key = p
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_default();
            let key = if key == "mixed_precision" {
                "param_dtype or --reduce_dtype".to_string()
            } else {
                key
            };
            return Err(usage_error(format!(
                "--{} needs --parallel ddp|fsdp (or --tp N)",
                key.replace('_', "-")
            )));
        }
    }
    // A new block size without a sequence length trains at full context.
    if block_override && !seq_override {
        if let Some(t) = v.get_mut("train").and_then(Value::as_object_mut) {
            t.remove("seq_len");
        }
    }
    let setup = setup_from_value(&v)?;
    if cmd == "estimate" {
        let format = match format.as_deref() {
            None | Some("table") => EstimateFormat::Table,
            Some("json") => EstimateFormat::Json,
            Some("snapshot") => EstimateFormat::Snapshot,
            Some(f) => {
                return Err(Error::UnknownValue {
                    field: "--format".into(),
                    value: f.into(),
                    allowed: &["table", "json", "snapshot"],
                })
            }
        };
        return Ok(Cli::Estimate {
            setup,
            format,
            notes,
        });
    }
    if cmd == "strategies" {
        let json = wants_json(format.as_deref())?;
        return Ok(Cli::Strategies { setup, json });
    }
    if cmd == "finetune" {
        let json = wants_json(format.as_deref())?;
        return Ok(Cli::Finetune { setup, json });
    }
    if cmd == "compare" {
        let json = wants_json(format.as_deref())?;
        let (path, snapshot) = snapshot.ok_or_else(|| {
            usage_error("compare needs --snapshot FILE (torch.cuda.memory._dump_snapshot())".into())
        })?;
        return Ok(Cli::Compare {
            setup,
            json,
            snapshot,
            path,
        });
    }
    let axis = axis
        .ok_or_else(|| usage_error("sweep needs --axis batch_size or --axis block_size".into()))?;
    let values = match (values, from, to) {
        (Some(v), None, None) => v,
        (None, f, t) => {
            let here = match axis {
                Axis::BatchSize => setup.train.batch_size,
                Axis::BlockSize => setup.model.block_size,
            };
            let (from, to) = (f.unwrap_or(1), t.unwrap_or(here.saturating_mul(4)));
            if from == 0 {
                return Err(Error::invalid("--from", from, "must be at least 1"));
            }
            if from > to {
                return Err(Error::invalid(
                    "--from",
                    from,
                    format!("must be at most --to ({to})"),
                ));
            }
            powers_of_two(from, to)
        }
        _ => return Err(usage_error("give either --values or --from/--to".into())),
    };
    if values.is_empty() || values.len() > 4096 {
        return Err(Error::invalid(
            "--values",
            values.len(),
            "must list between 1 and 4096 values",
        ));
    }
    let json = match format.as_deref() {
        None | Some("csv") => false,
        Some("json") => true,
        Some(f) => {
            return Err(Error::UnknownValue {
                field: "--format".into(),
                value: f.into(),
                allowed: &["csv", "json"],
            })
        }
    };
    Ok(Cli::Sweep {
        setup,
        axis,
        values,
        json,
    })
}

/// The model fields a family does not have (of the others), which a family switched by flag drops from the
/// source.
fn other_family_fields(family: &str) -> Vec<&'static str> {
    const MOE: [&str; 5] = [
        "router_aux_loss",
        "n_experts",
        "experts_per_token",
        "shared_expert_size",
        "norm_topk_prob",
    ];
    let mut fields: Vec<&str> = match family {
        "gpt2" => vec![
            "n_kv_head",
            "intermediate_size",
            "tie_embeddings",
            "head_dim",
            "sliding_window",
            "rotary_dims",
            "parallel_residual",
        ],
        "gpt_neox" => vec![],
        "phi3" => vec!["bias", "parallel_residual"],
        _ => vec!["bias", "rotary_dims", "parallel_residual"],
    };
    match family {
        "mixtral" => fields.extend(&MOE[3..]),
        "olmoe" => fields.push(MOE[3]),
        "qwen2_moe" => {}
        _ => fields.extend(MOE),
    }
    fields
}

/// The setup JSON as the flags need it: an object whose `model`, `train`, `device` and `train.parallel`, where
/// present, are objects too.
fn check_shape(v: &Value) -> Result<(), Error> {
    let not_object = |field: &str, v: &Value| Error::invalid(field, v, "must be a JSON object");
    let top = v.as_object().ok_or_else(|| not_object("setup", v))?;
    for section in ["model", "train", "device"] {
        match top.get(section) {
            None | Some(Value::Object(_)) => {}
            Some(other) => return Err(not_object(section, other)),
        }
    }
    match v.get("train").and_then(|t| t.get("parallel")) {
        None | Some(Value::Object(_)) => Ok(()),
        Some(other) => Err(not_object("train.parallel", other)),
    }
}

/// `vramfit strategies` as text: per way, the memory per GPU at each plotted count and the fewest that fit.
fn strategies_table(setup: &Setup, plan: &vramfit::gpus::Plan) -> String {
    use vramfit::gpus::PLOTTED_GPUS;
    let m = &setup.model;
    let mut out = format!(
        "vramfit strategies: {} with {} layers, {} wide; batch {} x sequence {} per GPU, {}\n\
         on the device per GPU (rank 0), against {} of GPU memory\n\n",
        m.family.name(),
        m.n_layer,
        m.n_embd,
        setup.train.batch_size,
        setup.train.seq_len,
        setup.train.precision.name(),
        fmt_memory(plan.budget_bytes)
    );
    let mut head = format!("  {:56}", "GPUs");
    for w in PLOTTED_GPUS {
        head += &format!("{w:>10}");
    }
    out += &format!("{head}   fewest that fit\n");
    if let Some(t) = plan.one_gpu_bytes {
        out += &format!("  {:56}{:>10}\n", "one GPU, as given", fmt_bytes(t));
    }
    for r in &plan.rows {
        let mut line = format!("  {:56}", r.label);
        if let Some(e) = &r.error {
            out += &format!("{line}{e}\n");
            continue;
        }
        for w in PLOTTED_GPUS {
            match r.points.iter().find(|p| p.0 == w) {
                Some((_, t)) => line += &format!("{:>10}", fmt_bytes(*t)),
                None => line += &format!("{:>10}", "-"),
            }
        }
        let fewest = match (&r.fewest, plan.budget_bytes) {
            (_, 0) => "(no GPU memory given)".to_string(),
            (Some(f), budget) => {
                format!("{} ({})", f.gpus, fmt_within(f.device_total_bytes, budget))
            }
            (None, _) => format!("none up to {}", vramfit::gpus::MAX_GPUS_SEARCHED),
        };
        out += &format!("{line}   {fewest}\n");
    }
    out += &format!("\n  {}\n", plan.advice);
    if let Some(s) = &plan.advised {
        out += &format!("  {}\n", flags_of_parallel(s));
    }
    for n in &plan.notes {
        out += &format!("  note: {n}\n");
    }
    out
}

/// The flags that give `s`'s multi-GPU setup (and its precision), for the advice.
fn flags_of_parallel(s: &Setup) -> String {
    let p = &s.train.parallel;
    let mut f = format!(
        "flags: --precision {} --parallel {} --gpus {}",
        s.train.precision.name(),
        if p.strategy == Strategy::Fsdp && !p.reshard_after_forward {
            "zero2"
        } else {
            p.strategy.name()
        },
        p.gpus
    );
    if p.tp > 1 {
        f += &format!(" --tp {}", p.tp);
    }
    if p.sequence_parallel {
        f += " --sequence-parallel";
    }
    if let Some(d) = p.param_dtype {
        f += &format!(" --param-dtype {}", d.name());
    }
    if let Some(d) = p.reduce_dtype {
        f += &format!(" --reduce-dtype {}", d.name());
    }
    if p.offload {
        f += " --offload";
    }
    if !s.train.compile {
        f += " --no-compile";
    }
    f
}

fn strategies_json(plan: &vramfit::gpus::Plan) -> Value {
    let rows: Vec<Value> = plan
        .rows
        .iter()
        .map(|r| {
            json!({
                "id": r.way.id(),
                "label": r.label,
                "per_gpu_device_total_bytes": r.points.iter().map(|(w, t)| json!({"gpus": w, "bytes": t})).collect::<Vec<_>>(),
                "fewest_gpus": r.fewest.as_ref().map(|f| f.gpus),
                "fewest_device_total_bytes": r.fewest.as_ref().map(|f| f.device_total_bytes),
                "setup": r.fewest.as_ref().map(|f| setup_to_value(&f.setup)),
                "error": r.error,
            })
        })
        .collect();
    json!({
        "gpu_memory_bytes": plan.budget_bytes,
        "one_gpu_device_total_bytes": plan.one_gpu_bytes,
        "strategies": rows,
        "advice": plan.advice,
        "advised_setup": plan.advised.as_ref().map(setup_to_value),
        "notes": plan.notes,
    })
}

/// `vramfit finetune` as text: per recipe, its trained parameters, memory on the device, the verdict at the
/// batch given and the largest batch that fits; then the advice and the flags that give it.
fn methods_table(setup: &Setup, m: &vramfit::methods::Methods) -> String {
    let md = &setup.model;
    let mut out = format!(
        "vramfit finetune: {} with {} layers, {} wide; batch {} x sequence {}, against {} of GPU memory\n\n",
        md.family.name(),
        md.n_layer,
        md.n_embd,
        setup.train.batch_size,
        setup.train.seq_len,
        fmt_memory(setup.device.memory_bytes)
    );
    out += &format!(
        "  {:18}{:>12}{:>16}{:>16}{:>16}   {}\n",
        "recipe", "trained", "on the device", "at this batch", "largest batch", "which"
    );
    for r in &m.rows {
        let name = vramfit::methods::label(r.method);
        if let Some(e) = &r.error {
            out += &format!("  {name:18}{e}\n");
            continue;
        }
        let verdict = match r.fits {
            Some(true) => "fits",
            Some(false) => "does not fit",
            None => "-",
        };
        let largest = match (r.fits, r.largest_batch) {
            (None, _) => "-".to_string(),
            (_, Some(b)) if b >= vramfit::methods::MAX_BATCH_SEARCHED => format!("{b} or more"),
            (_, Some(b)) => b.to_string(),
            (_, None) => "none".to_string(),
        };
        out += &format!(
            "  {name:18}{:>12}{:>16}{verdict:>16}{largest:>16}   {}\n",
            format!("{:.1}M", r.trainable_params as f64 / 1e6),
            fmt_within(r.device_total_bytes, setup.device.memory_bytes),
            vramfit::methods::recipe_detail(&r.setup)
        );
    }
    out += &format!("\n  {}\n", m.advice);
    if let Some(s) = &m.advised {
        let method = vramfit::finetune::Method::of(s);
        out += &format!(
            "  flags: --finetune {} --batch-size {}",
            method.name(),
            s.train.batch_size
        );
        if s.train.seq_len != setup.train.seq_len {
            out += &format!(" --seq-len {}", s.train.seq_len);
        }
        // The setup's own adapters, where they are not the recipe's.
        if let Some(l) = s
            .train
            .lora
            .as_ref()
            .filter(|l| **l != vramfit::finetune::Method::adapters_for(&s.model))
        {
            let save = l.modules_to_save();
            out += &format!(
                " --lora r={},alpha={},dropout={},targets={}{}",
                l.r,
                l.alpha,
                l.dropout,
                l.targets.names().join("+"),
                if save.is_empty() {
                    String::new()
                } else {
                    format!(",save={}", save.join("+"))
                }
            );
        }
        out.push('\n');
    }
    out
}

fn methods_json(m: &vramfit::methods::Methods) -> Value {
    let rows: Vec<Value> = m
        .rows
        .iter()
        .map(|r| {
            json!({
                "method": r.method.name(),
                "detail": vramfit::methods::recipe_detail(&r.setup),
                "error": r.error,
                "trainable_params": r.trainable_params,
                "peak_allocated_bytes": r.error.is_none().then_some(r.peak_allocated_bytes),
                "device_total_bytes": r.error.is_none().then_some(r.device_total_bytes),
                "fits": r.fits,
                "largest_batch": r.largest_batch,
                "setup": setup_to_value(&r.setup),
            })
        })
        .collect();
    json!({
        "methods": rows,
        "advice": m.advice,
        "advised_setup": m.advised.as_ref().map(setup_to_value),
    })
}

/// `--format table|json` (table when absent): whether JSON was asked for.
fn wants_json(format: Option<&str>) -> Result<bool, Error> {
    match format {
        None | Some("table") => Ok(false),
        Some("json") => Ok(true),
        Some(f) => Err(Error::UnknownValue {
            field: "--format".into(),
            value: f.into(),
            allowed: &["table", "json"],
        }),
    }
}

/// `vramfit gpus [--format table|json]`.
fn parse_gpus(args: &[String]) -> Result<Cli, Error> {
    match args {
        [] => Ok(Cli::Gpus { json: false }),
        [flag, f] if flag == "--format" => Ok(Cli::Gpus {
            json: wants_json(Some(f))?,
        }),
        [other, ..] => Err(usage_error(format!(
            "gpus takes only --format table|json, not {other:?}"
        ))),
    }
}

/// The GPU presets, one a line: id, memory, compute capability (marked where it stands in for an AMD or Apple
/// part), SMs (AMD: compute units) and the label.
fn gpus_table() -> String {
    let mut out = String::new();
    outln!(
        out,
        "{:<16} {:>9}  {:<18}  {:<17}  label",
        "id",
        "memory",
        "compute capability",
        "SMs"
    );
    for g in vramfit::presets::GPU_PRESETS {
        let cc = format!(
            "{:.1}{}",
            g.sm as f64 / 10.0,
            if g.vendor.has_compute_capability() {
                ""
            } else {
                " (stand-in)"
            }
        );
        let sms = match g.sms {
            Some(n) => format!("{n} {}", g.vendor.sm_name()),
            None => "varies".to_string(),
        };
        outln!(
            out,
            "{:<16} {:>9}  {:<18}  {:<17}  {}",
            g.id,
            fmt_memory(g.memory_bytes),
            cc,
            sms,
            g.label
        );
    }
    out
}

fn gpus_json() -> Value {
    let gpus: Vec<Value> = vramfit::presets::GPU_PRESETS
        .iter()
        .map(|g| {
            json!({"id": g.id, "label": g.label, "memory_bytes": g.memory_bytes,
                   "compute_capability": g.sm as f64 / 10.0,
                   "compute_capability_is_stand_in": !g.vendor.has_compute_capability(),
                   "sms": g.sms, "sms_are": g.vendor.sm_name()})
        })
        .collect();
    json!({ "gpus": gpus })
}

fn table(setup: &Setup, r: &vramfit::Report, notes: &[String]) -> String {
    let mut out = String::new();
    let m = &setup.model;
    let t = &setup.train;
    outln!(
        out,
        "vramfit estimate: {} with {} layers, {} wide, {} heads, vocab {}: {:.1}M parameters",
        m.family.name(),
        m.n_layer,
        m.n_embd,
        m.n_head,
        m.vocab_size,
        r.n_params as f64 / 1e6
    );
    outln!(
        out,
        "batch {} x sequence {}, {}, {}, {} attention{}{}{}, grad accumulation {}{}",
        t.batch_size,
        t.seq_len,
        t.precision.name(),
        t.optimizer.name(),
        t.attention.name(),
        if m.dropout > 0.0 {
            format!(", dropout {}", m.dropout)
        } else {
            String::new()
        },
        if t.checkpointing {
            ", activation checkpointing"
        } else {
            ""
        },
        if t.compile { ", torch.compile" } else { "" },
        t.grad_accum_steps,
        match alloc_conf_string(&t.alloc_conf) {
            conf if conf.is_empty() => String::new(),
            conf => format!(", PYTORCH_CUDA_ALLOC_CONF={conf}"),
        }
    );
    let p = &t.parallel;
    if !p.is_single() {
        outln!(
            out,
            "{} on {} GPUs{}: every figure below is per GPU (rank 0)",
            match (p.strategy, p.tp_name()) {
                (Strategy::Ddp, _) => "DistributedDataParallel".to_string(),
                (Strategy::Fsdp, None) => "FSDP2 fully_shard per block and on the root".to_string(),
                (Strategy::Fsdp, Some(tp)) => format!(
                    "FSDP2 fully_shard per block and on the root (dp {}) with {tp}",
                    p.dp()
                ),
                (Strategy::Single, tp) => tp.unwrap_or_default(),
            },
            p.gpus,
            p.zero_name().map(|z| format!(" ({z})")).unwrap_or_default()
        );
    }
    out.push('\n');
    outln!(
        out,
        "  peak allocated  {:>10}  ({} B) at {}, op {}",
        fmt_bytes(r.peak_allocated_bytes),
        r.peak_allocated_bytes,
        r.peak_phase,
        r.peak_op
    );
    outln!(
        out,
        "  peak reserved   {:>10}  (modelled caching allocator)",
        fmt_bytes(r.peak_reserved_bytes)
    );
    outln!(
        out,
        "  on the device   {:>10}  (reserved + CUDA context; range {} to {})",
        fmt_within(r.device_total_bytes, r.device_memory_bytes),
        fmt_bytes(r.device_total_range_bytes.0),
        fmt_bytes(r.device_total_range_bytes.1)
    );
    if let Some((verdict, margin)) = r.verdict() {
        outln!(
            out,
            "  GPU memory      {:>10}  {verdict}: {margin}",
            fmt_memory(r.device_memory_bytes)
        );
    }
    out.push('\n');
    outln!(out, "  at the peak:");
    for (name, bytes, what) in r.components.items_for_setup(setup) {
        if bytes > 0 {
            outln!(out, "    {name:<16} {:>10}  {what}", fmt_bytes(bytes));
        }
    }
    outln!(
        out,
        "  activations saved per block: {}",
        fmt_bytes(r.activations_per_block_bytes)
    );
    out.push('\n');
    outln!(out, "  {}", r.largest_item_sentence(setup));
    if let Ok(Some(c)) = vramfit::advice::compile_comparison(setup, r) {
        outln!(out, "  {}", c.sentence);
    }
    out.push('\n');
    outln!(out, "  timeline (highest live bytes in each stage):");
    // Under gradient accumulation each micro-step's stages are numbered (`report::micro_steps`).
    let accumulating = setup.train.grad_accum_steps > 1;
    let micro = vramfit::report::micro_steps(&r.timeline, setup.train.grad_accum_steps);
    for (s, m) in r.timeline.iter().zip(micro) {
        let stage = match m {
            Some(m) => format!("micro {m} {}", s.stage),
            None => s.stage.to_string(),
        };
        outln!(
            out,
            "    step {} {:<w$} {:>10}",
            s.step,
            stage,
            fmt_bytes(s.peak_bytes),
            w = if accumulating { 22 } else { 14 }
        );
    }
    for n in r.notes.iter().chain(notes) {
        outln!(out, "  note: {n}");
    }
    out
}

/// The comparison as a table: both peaks with the difference, the measured blocks at the peak by origin, the
/// largest blocks with their top frames.
fn compare_table(path: &str, c: &vramfit::compare::Comparison) -> String {
    use vramfit::compare::Comparison;
    let mut out = String::new();
    let m = &c.measured;
    outln!(
        out,
        "vramfit compare: {path} (device {}, {} events) beside the estimate",
        m.device,
        m.n_events
    );
    out.push('\n');
    outln!(
        out,
        "  {:<15} {:>12} {:>12} {:>10}",
        "",
        "measured",
        "predicted",
        "difference"
    );
    for (what, measured, predicted, d) in [
        (
            "peak allocated",
            c.measured_peak_allocated_bytes,
            c.predicted_peak_allocated_bytes,
            c.allocated_difference_percent,
        ),
        (
            "peak reserved",
            c.measured_peak_reserved_bytes,
            c.predicted_peak_reserved_bytes,
            c.reserved_difference_percent,
        ),
    ] {
        outln!(
            out,
            "  {what:<15} {:>12} {:>12} {:>10}",
            fmt_bytes(measured),
            fmt_bytes(predicted),
            Comparison::fmt_percent(d)
        );
    }
    if m.initial_allocated_bytes > 0 || m.initial_reserved_bytes > 0 {
        outln!(
            out,
            "  (the history began with {} allocated and {} reserved already)",
            fmt_bytes(m.initial_allocated_bytes),
            fmt_bytes(m.initial_reserved_bytes)
        );
    }
    out.push('\n');
    outln!(
        out,
        "  measured at the peak (event {}), {} blocks, by what their frames say:",
        m.peak_event,
        m.n_blocks_at_peak
    );
    for o in &m.by_origin {
        outln!(
            out,
            "    {:<40} {:>10}  {} block{}",
            o.origin,
            fmt_bytes(o.bytes),
            o.n_blocks,
            if o.n_blocks == 1 { "" } else { "s" }
        );
    }
    out.push('\n');
    outln!(out, "  largest blocks at the peak:");
    for b in m.blocks_at_peak.iter().take(10) {
        let frames: Vec<String> = b
            .frames
            .iter()
            .map(|f| {
                let file = f.filename.rsplit('/').next().unwrap_or(&f.filename);
                format!("{} ({file}:{})", f.name, f.line)
            })
            .collect();
        outln!(
            out,
            "    {:>10}  {:<30}  {}",
            fmt_bytes(b.bytes),
            b.origin,
            if frames.is_empty() {
                "(no frames recorded)".to_string()
            } else {
                frames.join(" < ")
            }
        );
    }
    if m.expandable_segments {
        outln!(
            out,
            "  note: expandable segments: block sizes are the requests rounded to 512 bytes"
        );
    }
    out
}

fn run(args: &[String]) -> Result<Vec<u8>, Error> {
    let mut out = String::new();
    match parse(args)? {
        Cli::Help(None) => out.push_str(&usage()),
        Cli::Help(Some(c)) => out.push_str(&command_usage(c)),
        Cli::Gpus { json: false } => out.push_str(&gpus_table()),
        Cli::Gpus { json: true } => outln!(
            out,
            "{}",
            serde_json::to_string_pretty(&gpus_json()).unwrap_or_default()
        ),
        Cli::Estimate {
            setup,
            format: EstimateFormat::Snapshot,
            ..
        } => return vramfit::trace::predicted_snapshot(&setup),
        Cli::Compare {
            setup,
            json,
            snapshot,
            path,
        } => {
            let measured = vramfit::snapshot::read_snapshot(&snapshot).map_err(|e| match e {
                Error::Parse { message, .. } => Error::Parse {
                    source: source("--snapshot", &path),
                    line: None,
                    message,
                },
                e => e,
            })?;
            let r = estimate(&setup)?;
            let c = vramfit::compare::Comparison::new(measured, &r);
            if json {
                outln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&c).unwrap_or_default()
                );
            } else {
                out.push_str(&compare_table(&path, &c));
            }
        }
        Cli::Estimate {
            setup,
            format,
            notes,
        } => {
            let r = estimate(&setup)?;
            if format == EstimateFormat::Json {
                let mut v = serde_json::to_value(&r).map_err(|e| usage_error(e.to_string()))?;
                v["setup"] = setup_to_value(&setup);
                v["source_notes"] = json!(notes);
                outln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                );
            } else {
                out.push_str(&table(&setup, &r, &notes));
            }
        }
        Cli::Finetune { setup, json } => {
            let m = vramfit::methods::compare(&setup)?;
            if json {
                outln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&methods_json(&m)).unwrap_or_default()
                );
            } else {
                out.push_str(&methods_table(&setup, &m));
            }
        }
        Cli::Strategies { setup, json } => {
            let plan = vramfit::gpus::plan(&setup)?;
            if json {
                outln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&strategies_json(&plan)).unwrap_or_default()
                );
            } else {
                out.push_str(&strategies_table(&setup, &plan));
            }
        }
        Cli::Sweep {
            setup,
            axis,
            values,
            json,
        } => {
            let points = sweep(&setup, axis, &values)?;
            if json {
                outln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&json!({"axis": axis.name(), "points": points}))
                        .unwrap_or_default()
                );
            } else {
                out.push_str(&vramfit::sweep::to_csv(axis, &points));
            }
        }
    }
    Ok(out.into_bytes())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(bytes) => {
            // A closed pipe (`vramfit ... | head`) is not an error worth a message.
            let _ = std::io::stdout().write_all(&bytes);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
