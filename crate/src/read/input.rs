//! Readers for what people paste: the setup JSON, a nanoGPT `config/*.py` file, a Hugging Face `config.json`.
//! Each returns a `Setup` (not yet validated) or an error naming the field, value or line.

use crate::error::Error;
use crate::finetune::{BaseDtype, LoraConfig, Method, Quantization, Targets};
use crate::model::{
    alloc_conf_string, parse_alloc_conf, DeviceConfig, Family, ModelConfig, Setup, TrainConfig,
};
use crate::parallel::{Dtype, Parallel, Strategy};
use crate::policy::{Attention, Optimizer, Precision};
use serde_json::{Map, Value};

pub use crate::model::{
    DEFAULT_BATCH_SIZE, DEFAULT_GRAD_CLIP, DEFAULT_OPTIMIZER, DEFAULT_PRECISION,
};

/// The setup JSON's model fields every family has.
const MODEL_FIELDS: &[&str] = &[
    "family",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "vocab_size",
    "bias",
    "dropout",
    "head_dim",
];
/// The model fields of the Hugging Face families only (gpt2 refuses each by name).
const HF_FIELDS: &[&str] = &[
    "n_kv_head",
    "intermediate_size",
    "tie_embeddings",
    "sliding_window",
    "rotary_dims",
    "parallel_residual",
    "n_experts",
    "experts_per_token",
    "shared_expert_size",
    "norm_topk_prob",
    "router_aux_loss",
];
const TRAIN_FIELDS: &[&str] = &[
    "batch_size",
    "seq_len",
    "precision",
    "optimizer",
    "attention",
    "checkpointing",
    "grad_accum_steps",
    "grad_clip",
    "zero_grad_set_to_none",
    "compile",
    "alloc_conf",
    "lora",
    "base_dtype",
    "quantization",
    "double_quant",
    "parallel",
    "finetune",
];
/// `train.finetune`'s fields: a recipe by name (`finetune::Method`) and what it lets one change.
const FINETUNE_FIELDS: &[&str] = &[
    "method",
    "r",
    "alpha",
    "dropout",
    "targets",
    "modules_to_save",
    "base_dtype",
    "quant",
    "double_quant",
];
/// `train.parallel`'s fields: PyTorch's argument names (`mixed_precision` is FSDP2's `mp_policy`).
const PARALLEL_FIELDS: &[&str] = &[
    "strategy",
    "gpus",
    "tp",
    "sequence_parallel",
    "bucket_cap_mb",
    "gradient_as_bucket_view",
    "static_graph",
    "reshard_after_forward",
    "mixed_precision",
    "offload",
    "init_on_device",
];
const LORA_FIELDS: &[&str] = &["r", "alpha", "dropout", "target_modules", "modules_to_save"];
const DEVICE_FIELDS: &[&str] = &["compute_capability", "memory_gib", "sms"];

fn object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, Error> {
    v.as_object()
        .ok_or_else(|| Error::invalid(field, v, "must be a JSON object"))
}

fn reject_unknown(obj: &Map<String, Value>, prefix: &str, known: &[&str]) -> Result<(), Error> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(Error::UnknownField {
            field: format!("{prefix}{k}"),
        }),
        None => Ok(()),
    }
}

/// A non-negative integer field; 0 passes here and is rejected by validation with the field's own message.
fn get_u64(obj: &Map<String, Value>, prefix: &str, key: &str) -> Result<Option<u64>, Error> {
    let field = format!("{prefix}{key}");
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else if n.as_i64().is_some() {
                Err(Error::invalid(&field, n, "must be at least 1"))
            } else if n
                .as_f64()
                .is_some_and(|f| f >= 0.0 && f.fract() == 0.0 && f < 1.8e19)
            {
                Ok(Some(n.as_f64().unwrap_or(0.0) as u64))
            } else if n.as_f64().is_some_and(|f| f >= 1.8e19) {
                Err(Error::TooLarge {
                    what: format!("{field} ({n})"),
                })
            } else {
                Err(Error::invalid(&field, n, "must be a whole number"))
            }
        }
        Some(v) => Err(Error::invalid(&field, v, "must be a whole number")),
    }
}

fn get_f64(obj: &Map<String, Value>, prefix: &str, key: &str) -> Result<Option<f64>, Error> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => Err(Error::invalid(
            &format!("{prefix}{key}"),
            v,
            "must be a number",
        )),
    }
}

fn get_bool(obj: &Map<String, Value>, prefix: &str, key: &str) -> Result<Option<bool>, Error> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(Error::invalid(
            &format!("{prefix}{key}"),
            v,
            "must be true or false",
        )),
    }
}

fn get_str<'a>(
    obj: &'a Map<String, Value>,
    prefix: &str,
    key: &str,
) -> Result<Option<&'a str>, Error> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(Error::invalid(
            &format!("{prefix}{key}"),
            v,
            "must be a string",
        )),
    }
}

fn required(v: Option<u64>, field: &str) -> Result<u64, Error> {
    v.ok_or_else(|| Error::Missing {
        field: field.to_string(),
    })
}

/// Reads the setup JSON (`{"model": {...}, "train": {...}, "device": {...}}`).
///
/// # Errors
/// Malformed JSON (with its line), unknown or missing fields, values of the wrong type.
pub fn setup_from_json(text: &str) -> Result<Setup, Error> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::Parse {
        source: "setup JSON".into(),
        line: Some(e.line()),
        message: e.to_string(),
    })?;
    setup_from_value(&v)
}

/// As `setup_from_json`, from a parsed value.
///
/// # Errors
/// As `setup_from_json`.
pub fn setup_from_value(v: &Value) -> Result<Setup, Error> {
    let top = object(v, "setup")?;
    reject_unknown(top, "", &["model", "train", "device"])?;
    let m = object(
        top.get("model").ok_or(Error::Missing {
            field: "model".into(),
        })?,
        "model",
    )?;
    let empty = Map::new();
    let t = match top.get("train") {
        Some(t) => object(t, "train")?,
        None => &empty,
    };
    reject_unknown(t, "train.", TRAIN_FIELDS)?;
    // `"model": {"hf": {...config.json...}}`: a Hugging Face config as it is published.
    let model = match m.get("hf") {
        Some(hf) => {
            reject_unknown(m, "model.", &["hf"])?;
            hf_config_object(object(hf, "model.hf")?)?.0
        }
        None => model_fields(m)?,
    };
    let expanded;
    let t = match t.get("finetune") {
        None | Some(Value::Null) => t,
        Some(f) => {
            expanded = finetune_recipe(t, object(f, "train.finetune")?, &model)?;
            &expanded
        }
    };
    let block_size = model.block_size;
    let train = TrainConfig {
        batch_size: get_u64(t, "train.", "batch_size")?.unwrap_or(DEFAULT_BATCH_SIZE),
        seq_len: get_u64(t, "train.", "seq_len")?.unwrap_or(block_size),
        precision: match get_str(t, "train.", "precision")? {
            Some(s) => Precision::parse(s)?,
            None => DEFAULT_PRECISION,
        },
        optimizer: match get_str(t, "train.", "optimizer")? {
            Some(s) => Optimizer::parse(s)?,
            None => DEFAULT_OPTIMIZER,
        },
        attention: match get_str(t, "train.", "attention")? {
            Some(s) => Attention::parse(s)?,
            None => Attention::Sdpa,
        },
        checkpointing: get_bool(t, "train.", "checkpointing")?.unwrap_or(false),
        grad_accum_steps: get_u64(t, "train.", "grad_accum_steps")?.unwrap_or(1),
        grad_clip: get_f64(t, "train.", "grad_clip")?.unwrap_or(DEFAULT_GRAD_CLIP),
        zero_grad_set_to_none: get_bool(t, "train.", "zero_grad_set_to_none")?.unwrap_or(true),
        compile: get_bool(t, "train.", "compile")?.unwrap_or(false),
        // PYTORCH_CUDA_ALLOC_CONF as the environment variable is written.
        alloc_conf: parse_alloc_conf(get_str(t, "train.", "alloc_conf")?.unwrap_or(""))?,
        lora: match t.get("lora") {
            None | Some(Value::Null) => None,
            Some(l) => Some(lora_fields(object(l, "train.lora")?)?),
        },
        base_dtype: match get_str(t, "train.", "base_dtype")? {
            Some(s) => Some(BaseDtype::parse(s)?),
            None => None,
        },
        quantization: match get_str(t, "train.", "quantization")? {
            None if get_bool(t, "train.", "double_quant")? == Some(true) => {
                return Err(Error::invalid(
                    "train.double_quant",
                    true,
                    "needs train.quantization \"nf4\" or \"fp4\"",
                ))
            }
            Some(s) => Some(Quantization::parse(
                s,
                get_bool(t, "train.", "double_quant")?.unwrap_or(false),
            )?),
            None => None,
        },
        parallel: match t.get("parallel") {
            None | Some(Value::Null) => Parallel::single(),
            Some(p) => parallel_fields(object(p, "train.parallel")?)?,
        },
    };
    let device = match top.get("device") {
        None => DeviceConfig::default(),
        Some(d) => {
            let d = object(d, "device")?;
            reject_unknown(d, "device.", DEVICE_FIELDS)?;
            let mut dev = DeviceConfig::default();
            if let Some(cc) = get_f64(d, "device.", "compute_capability")? {
                if !(3.0..=20.0).contains(&cc) {
                    return Err(Error::invalid(
                        "device.compute_capability",
                        cc,
                        "must be between 3.0 and 20.0",
                    ));
                }
                dev.sm = (cc * 10.0).round() as u32;
            }
            if let Some(gib) = get_f64(d, "device.", "memory_gib")? {
                if !(gib > 0.0 && gib < 1.0e6) {
                    return Err(Error::invalid(
                        "device.memory_gib",
                        gib,
                        if gib > 0.0 {
                            "must be less than 1000000 GiB"
                        } else {
                            "must be a positive number of GiB"
                        },
                    ));
                }
                dev.memory_bytes = (gib * (1u64 << 30) as f64) as u64;
            }
            // Without a count: the GPU preset with this memory and capability, if one alone has them, else
            // `model::default_sms` (the reference measurements' device at that capability).
            dev.sms = match get_f64(d, "device.", "sms")? {
                Some(n) if n.fract() == 0.0 && (1.0..=100_000.0).contains(&n) => n as u32,
                Some(n) => {
                    return Err(Error::invalid(
                        "device.sms",
                        n,
                        "must be a whole number of SMs from 1 to 100000",
                    ))
                }
                None => crate::presets::gpu_with(dev.memory_bytes, dev.sm)
                    .map_or(crate::model::default_sms(dev.sm), |g| g.device().sms),
            };
            dev
        }
    };
    Ok(Setup {
        model,
        train,
        device,
    })
}

/// `train.finetune` (`FINETUNE_FIELDS`) written out as the fields it stands for, over `train` without it:
/// `train.lora` (the recipe's r 16, alpha 32, dropout 0.05 (0 on Mixtral and OLMoE: `Method::adapters_for`), every
/// Linear, unless given), `train.base_dtype`
/// (LoRA: the precision's 2-byte dtype, `Method::lora_base_dtype`), and for QLoRA `train.quantization` (nf4),
/// `train.double_quant` (on for 4-bit), `train.precision` bf16-amp and `train.checkpointing` on. What `train`
/// itself sets (not null) (`lora`, `base_dtype`, `quantization`, `double_quant`, `precision`, `checkpointing`) wins over
/// the recipe, so the command line's `--finetune` can be followed by `--lora` or `--no-checkpointing`.
fn finetune_recipe(
    t: &Map<String, Value>,
    f: &Map<String, Value>,
    model: &ModelConfig,
) -> Result<Map<String, Value>, Error> {
    const P: &str = "train.finetune.";
    reject_unknown(f, P, FINETUNE_FIELDS)?;
    let method = match get_str(f, P, "method")? {
        Some(m) => Method::parse(m, "train.finetune.method")?,
        None => {
            return Err(Error::Missing {
                field: "train.finetune.method".into(),
            })
        }
    };
    let mut out = t.clone();
    out.remove("finetune");
    // A field `train` sets wins; a null one (the command line's way of clearing it) does not.
    let mut set = |key: &str, v: Value| {
        if out.get(key).is_none_or(Value::is_null) {
            out.insert(key.to_string(), v);
        }
    };
    if method == Method::Full {
        if let Some(k) = f.keys().find(|k| *k != "method") {
            return Err(Error::invalid(
                &format!("{P}{k}"),
                &f[k],
                "applies to method \"lora\" or \"qlora\", not \"full\"",
            ));
        }
        set("lora", Value::Null);
        return Ok(out);
    }
    let recipe = Method::adapters_for(model);
    let r = get_u64(f, P, "r")?.unwrap_or(recipe.r);
    if r == 0 {
        return Err(Error::invalid("train.finetune.r", r, "must be at least 1"));
    }
    let dropout = get_f64(f, P, "dropout")?.unwrap_or(recipe.dropout);
    if !(0.0..1.0).contains(&dropout) {
        return Err(Error::invalid(
            "train.finetune.dropout",
            dropout,
            "must be in [0, 1)",
        ));
    }
    let mut lora = lora_to_value(&recipe);
    lora["r"] = r.into();
    lora["alpha"] = get_f64(f, P, "alpha")?.unwrap_or(2.0 * r as f64).into();
    lora["dropout"] = dropout.into();
    if let Some(v) = f.get("targets").filter(|v| !v.is_null()) {
        Targets::parse(names(v, "train.finetune.targets")?)?;
        lora["target_modules"] = v.clone();
    }
    if let Some(v) = f.get("modules_to_save").filter(|v| !v.is_null()) {
        lora["modules_to_save"] = v.clone();
    }
    set("lora", lora);
    let base = get_str(f, P, "base_dtype")?;
    let quant = get_str(f, P, "quant")?;
    let double_quant = get_bool(f, P, "double_quant")?;
    if method == Method::Lora {
        if let Some((k, v)) = [
            ("quant", quant.map(Value::from)),
            ("double_quant", double_quant.map(Value::from)),
        ]
        .into_iter()
        .find_map(|(k, v)| v.map(|v| (k, v)))
        {
            return Err(Error::invalid(
                &format!("{P}{k}"),
                v,
                "applies to method \"qlora\" (a quantized base), not \"lora\"",
            ));
        }
        let precision = match get_str(t, "train.", "precision")? {
            Some(s) => Precision::parse(s)?,
            None => DEFAULT_PRECISION,
        };
        if let Some(d) = base
            .map(String::from)
            .or(Method::lora_base_dtype(precision).map(|d| d.name().to_string()))
        {
            set("base_dtype", d.into());
        }
        return Ok(out);
    }
    let quant = quant.unwrap_or(Method::QLORA_QUANT.name());
    set("quantization", quant.into());
    set(
        "double_quant",
        double_quant.unwrap_or(quant != "int8").into(),
    );
    if let Some(d) = base {
        set("base_dtype", d.into());
    }
    set("precision", Method::QLORA_PRECISION.name().into());
    set("checkpointing", true.into());
    Ok(out)
}

/// A list of names, or one name (`"all-linear"`), as peft takes `target_modules` and `modules_to_save`.
fn names<'a>(v: &'a Value, field: &str) -> Result<Vec<&'a str>, Error> {
    match v {
        Value::String(s) => Ok(vec![s.as_str()]),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| Error::invalid(field, x, "must be a module name (a string)"))
            })
            .collect(),
        _ => Err(Error::invalid(
            field,
            v,
            "must be a module name or a list of them",
        )),
    }
}

/// `train.lora` (`LORA_FIELDS`), with peft's `LoraConfig` defaults for what it leaves out: r 8, alpha 8,
/// dropout 0, and for these families `target_modules` q_proj and v_proj (peft's
/// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
fn lora_fields(l: &Map<String, Value>) -> Result<LoraConfig, Error> {
    reject_unknown(l, "train.lora.", LORA_FIELDS)?;
    let r = get_u64(l, "train.lora.", "r")?.unwrap_or(8);
    let mut c = LoraConfig {
        r,
        alpha: get_f64(l, "train.lora.", "alpha")?.unwrap_or(8.0),
        dropout: get_f64(l, "train.lora.", "dropout")?.unwrap_or(0.0),
        targets: match l.get("target_modules") {
            None | Some(Value::Null) => Targets::parse(["q_proj", "v_proj"])?,
            Some(v) => Targets::parse(names(v, "train.lora.target_modules")?)?,
        },
        save_head: false,
        save_embed: false,
    };
    if let Some(v) = l.get("modules_to_save").filter(|v| !v.is_null()) {
        c.set_modules_to_save(names(v, "train.lora.modules_to_save")?)?;
    }
    Ok(c)
}

/// `train.lora` as the setup JSON writes it.
pub fn lora_to_value(l: &LoraConfig) -> Value {
    let targets = l.targets.names();
    serde_json::json!({
        "r": l.r, "alpha": l.alpha, "dropout": l.dropout,
        "target_modules": if targets == ["all-linear"] { Value::from("all-linear") } else { Value::from(targets) },
        "modules_to_save": l.modules_to_save(),
    })
}

/// The setup JSON's own model fields (`MODEL_FIELDS`, `HF_FIELDS`).
/// `train.parallel` (`PARALLEL_FIELDS`): a strategy's fields under another strategy are refused by
/// `Parallel::validate`, each naming itself.
fn parallel_fields(p: &Map<String, Value>) -> Result<Parallel, Error> {
    const PRE: &str = "train.parallel.";
    reject_unknown(p, PRE, PARALLEL_FIELDS)?;
    let (strategy, zero_reshard) =
        Strategy::parse(get_str(p, PRE, "strategy")?.ok_or(Error::Missing {
            field: "train.parallel.strategy".into(),
        })?)?;
    let reshard = get_bool(p, PRE, "reshard_after_forward")?;
    if let (Some(z), Some(r)) = (zero_reshard, reshard) {
        if z != r {
            return Err(Error::invalid(
                "train.parallel.reshard_after_forward",
                r,
                format!(
                    "contradicts train.parallel.strategy {:?}, which means reshard_after_forward {z}",
                    get_str(p, PRE, "strategy")?.unwrap_or("")
                ),
            ));
        }
    }
    // Without `gpus`, the job is one copy: `tp` GPUs (1 without tensor parallelism).
    let tp = get_u64(p, PRE, "tp")?.unwrap_or(1);
    let mut out = Parallel::new(strategy, get_u64(p, PRE, "gpus")?.unwrap_or(tp));
    out.tp = tp;
    out.sequence_parallel = get_bool(p, PRE, "sequence_parallel")?.unwrap_or(false);
    out.bucket_cap_mb = get_u64(p, PRE, "bucket_cap_mb")?;
    out.gradient_as_bucket_view = get_bool(p, PRE, "gradient_as_bucket_view")?.unwrap_or(false);
    out.static_graph = get_bool(p, PRE, "static_graph")?.unwrap_or(false);
    out.reshard_after_forward = reshard.or(zero_reshard).unwrap_or(true);
    out.offload = get_bool(p, PRE, "offload")?.unwrap_or(false);
    out.init_on_device = get_bool(p, PRE, "init_on_device")?.unwrap_or(false);
    if let Some(mp) = p.get("mixed_precision").filter(|v| !v.is_null()) {
        let mp = object(mp, "train.parallel.mixed_precision")?;
        let pre = "train.parallel.mixed_precision.";
        reject_unknown(mp, pre, &["param_dtype", "reduce_dtype"])?;
        let dtype = |k: &str| -> Result<Option<Dtype>, Error> {
            get_str(mp, pre, k)?
                .map(|s| Dtype::parse(&format!("{pre}{k}"), s))
                .transpose()
        };
        out.param_dtype = dtype("param_dtype")?;
        out.reduce_dtype = dtype("reduce_dtype")?;
    }
    Ok(out)
}

/// `train.parallel` as `parallel_fields` reads it: the strategy, the GPUs and what differs from PyTorch's
/// defaults (FSDP's `reshard_after_forward` always); `None` for one plain GPU (the setup JSON then has no
/// `parallel`, as before it existed).
fn parallel_to_value(p: &Parallel) -> Option<Value> {
    if *p == Parallel::single() {
        return None;
    }
    let mut v = serde_json::json!({"strategy": p.strategy.name(), "gpus": p.gpus});
    if p.tp != 1 {
        v["tp"] = p.tp.into();
    }
    if p.sequence_parallel {
        v["sequence_parallel"] = true.into();
    }
    if let Some(mb) = p.bucket_cap_mb {
        v["bucket_cap_mb"] = mb.into();
    }
    if p.gradient_as_bucket_view {
        v["gradient_as_bucket_view"] = true.into();
    }
    if p.static_graph {
        v["static_graph"] = true.into();
    }
    if p.init_on_device {
        v["init_on_device"] = true.into();
    }
    if p.strategy == Strategy::Fsdp || !p.reshard_after_forward {
        v["reshard_after_forward"] = p.reshard_after_forward.into();
    }
    if p.param_dtype.is_some() || p.reduce_dtype.is_some() {
        let mut mp = serde_json::json!({});
        if let Some(d) = p.param_dtype {
            mp["param_dtype"] = d.name().into();
        }
        if let Some(d) = p.reduce_dtype {
            mp["reduce_dtype"] = d.name().into();
        }
        v["mixed_precision"] = mp;
    }
    if p.offload {
        v["offload"] = true.into();
    }
    Some(v)
}

/// The setup JSON's own model fields (`MODEL_FIELDS`).
fn model_fields(m: &Map<String, Value>) -> Result<ModelConfig, Error> {
    if let Some(k) = m
        .keys()
        .find(|k| !MODEL_FIELDS.contains(&k.as_str()) && !HF_FIELDS.contains(&k.as_str()))
    {
        return Err(Error::UnknownField {
            field: format!("model.{k}"),
        });
    }
    let family = Family::parse(get_str(m, "model.", "family")?.ok_or(Error::Missing {
        field: "model.family".into(),
    })?)?;
    let n_head = required(get_u64(m, "model.", "n_head")?, "model.n_head")?;
    let n_embd = required(get_u64(m, "model.", "n_embd")?, "model.n_embd")?;
    let block_size = required(get_u64(m, "model.", "block_size")?, "model.block_size")?;
    let (n_kv_head, intermediate_size, tie) = match family {
        Family::Gpt2 => {
            for &k in HF_FIELDS {
                if m.contains_key(k) {
                    return Err(Error::invalid(
                        &format!("model.{k}"),
                        &m[k],
                        "is a Hugging Face field; gpt2 has none",
                    ));
                }
            }
            (n_head, n_embd.saturating_mul(4), true)
        }
        hf => {
            if m.contains_key("bias") && hf != Family::GptNeox {
                return Err(Error::invalid(
                    "model.bias",
                    &m["bias"],
                    format!(
                        "is a gpt2 and gpt_neox field; {} has its own biases (qwen2: q, k and v; the others: none)",
                        hf.name()
                    ),
                ));
            }
            (
                get_u64(m, "model.", "n_kv_head")?.unwrap_or(n_head),
                required(
                    get_u64(m, "model.", "intermediate_size")?,
                    "model.intermediate_size",
                )?,
                get_bool(m, "model.", "tie_embeddings")?.unwrap_or(false),
            )
        }
    };
    let neox = family == Family::GptNeox;
    let head_dim = get_u64(m, "model.", "head_dim")?.unwrap_or(0);
    Ok(ModelConfig {
        family,
        n_layer: required(get_u64(m, "model.", "n_layer")?, "model.n_layer")?,
        n_head,
        n_kv_head,
        n_embd,
        block_size,
        vocab_size: required(get_u64(m, "model.", "vocab_size")?, "model.vocab_size")?,
        // GPT-NeoX's `attention_bias` defaults to true, as its rotary to a quarter of each head and its residual
        // to parallel branches (`GPTNeoXConfig`: rotary_pct 0.25, use_parallel_residual True).
        bias: get_bool(m, "model.", "bias")?.unwrap_or(neox),
        dropout: get_f64(m, "model.", "dropout")?.unwrap_or(0.0),
        intermediate_size,
        tie_embeddings: tie,
        head_dim,
        sliding_window: get_u64(m, "model.", "sliding_window")?.unwrap_or(0),
        rotary_dims: match get_u64(m, "model.", "rotary_dims")? {
            Some(d) => d,
            None if neox => neox_rotary_dims(head_dim, n_embd, n_head, 0.25),
            None => 0,
        },
        parallel_residual: get_bool(m, "model.", "parallel_residual")?.unwrap_or(neox),
        n_experts: get_u64(m, "model.", "n_experts")?.unwrap_or(0),
        experts_per_token: get_u64(m, "model.", "experts_per_token")?.unwrap_or(0),
        shared_expert_size: get_u64(m, "model.", "shared_expert_size")?.unwrap_or(0),
        norm_topk_prob: get_bool(m, "model.", "norm_topk_prob")?.unwrap_or(false),
        router_aux_loss: get_bool(m, "model.", "router_aux_loss")?.unwrap_or(false),
    })
}

/// The setup JSON for a setup (the inverse of `setup_from_value`).
pub fn setup_to_value(s: &Setup) -> Value {
    let m = &s.model;
    let mut model = serde_json::json!({
        "family": m.family.name(), "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd,
        "block_size": m.block_size, "vocab_size": m.vocab_size, "dropout": m.dropout,
    });
    if m.family == Family::Gpt2 {
        model["bias"] = Value::Bool(m.bias);
    } else {
        model["n_kv_head"] = m.n_kv_head.into();
        model["intermediate_size"] = m.intermediate_size.into();
        model["tie_embeddings"] = Value::Bool(m.tie_embeddings);
        if m.head_dim > 0 {
            model["head_dim"] = m.head_dim.into();
        }
        if m.sliding_window > 0 {
            model["sliding_window"] = m.sliding_window.into();
        }
        if m.rotary_dims > 0 {
            model["rotary_dims"] = m.rotary_dims.into();
        }
        if m.family == Family::GptNeox {
            model["bias"] = Value::Bool(m.bias);
            model["parallel_residual"] = Value::Bool(m.parallel_residual);
        }
        if m.family.is_moe() {
            model["n_experts"] = m.n_experts.into();
            model["experts_per_token"] = m.experts_per_token.into();
        }
        if m.shared_expert_size > 0 {
            model["shared_expert_size"] = m.shared_expert_size.into();
        }
        if m.norm_topk_prob {
            model["norm_topk_prob"] = Value::Bool(true);
        }
        if m.router_aux_loss {
            model["router_aux_loss"] = Value::Bool(true);
        }
    }
    let t = &s.train;
    let mut v = serde_json::json!({
        "model": model,
        "train": {"batch_size": t.batch_size, "seq_len": t.seq_len, "precision": t.precision.name(),
                  "optimizer": t.optimizer.name(), "attention": t.attention.name(),
                  "checkpointing": t.checkpointing, "grad_accum_steps": t.grad_accum_steps, "grad_clip": t.grad_clip,
                  "zero_grad_set_to_none": t.zero_grad_set_to_none, "compile": t.compile,
                  "alloc_conf": alloc_conf_string(&t.alloc_conf)},
        "device": {"compute_capability": s.device.sm as f64 / 10.0,
                   "memory_gib": s.device.memory_bytes as f64 / (1u64 << 30) as f64,
                   "sms": s.device.sms},
    });
    if let Some(l) = &t.lora {
        v["train"]["lora"] = lora_to_value(l);
    }
    if let Some(d) = t.base_dtype {
        v["train"]["base_dtype"] = d.name().into();
    }
    if let Some(q) = t.quantization {
        v["train"]["quantization"] = q.name().into();
        v["train"]["double_quant"] = q.double_quant().into();
    }
    if let Some(p) = parallel_to_value(&t.parallel) {
        v["train"]["parallel"] = p;
    }
    v
}

// ---------------------------------------------------------------------------------------------------------
// nanoGPT config files.

/// A value in a nanoGPT config file.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    None,
}

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    pub key: &'static str,
    pub value: String,
    pub source: String,
}

/// A nanoGPT config read into a setup, with where each value came from and notes (e.g. compile).
#[derive(Debug, Clone)]
pub struct NanoGptImport {
    pub setup: Setup,
    pub provenance: Vec<Provenance>,
    pub notes: Vec<String>,
}

/// Keys that change memory; an expression the reader cannot evaluate is an error only for these.
const NANOGPT_MEMORY_KEYS: &[&str] = &[
    "batch_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "bias",
    "dtype",
    "gradient_accumulation_steps",
    "grad_clip",
    "dataset",
    "init_from",
    "compile",
];

/// nanoGPT train.py's defaults for the keys that change memory.
fn nanogpt_default(key: &str) -> PyValue {
    match key {
        "batch_size" => PyValue::Int(12),
        "block_size" => PyValue::Int(1024),
        "n_layer" => PyValue::Int(12),
        "n_head" => PyValue::Int(12),
        "n_embd" => PyValue::Int(768),
        "dropout" => PyValue::Float(0.0),
        "bias" => PyValue::Bool(false),
        "dtype" => PyValue::Str("bfloat16".into()),
        "gradient_accumulation_steps" => PyValue::Int(40),
        "grad_clip" => PyValue::Float(1.0),
        "dataset" => PyValue::Str("openwebtext".into()),
        "init_from" => PyValue::Str("scratch".into()),
        "compile" => PyValue::Bool(true),
        _ => PyValue::None,
    }
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    src: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(PyValue),
    Str(String),
    Name(String),
    Op(&'static str),
}

impl<'a> Lexer<'a> {
    fn tokens(src: &'a str, line: usize) -> Result<Vec<Tok>, String> {
        let mut lx = Lexer {
            chars: src.chars().collect(),
            pos: 0,
            line,
            src,
        };
        let _ = (lx.line, lx.src);
        let mut out = Vec::new();
        while lx.pos < lx.chars.len() {
            let c = lx.chars[lx.pos];
            if c.is_whitespace() {
                lx.pos += 1;
            } else if c == '#' {
                break;
            } else if c.is_ascii_digit() || (c == '.' && lx.peek_digit(1)) {
                out.push(Tok::Num(lx.number()?));
            } else if c == '\'' || c == '"' {
                out.push(Tok::Str(lx.string(c)?));
            } else if c.is_alphabetic() || c == '_' {
                let start = lx.pos;
                while lx.pos < lx.chars.len()
                    && (lx.chars[lx.pos].is_alphanumeric() || lx.chars[lx.pos] == '_')
                {
                    lx.pos += 1;
                }
                out.push(Tok::Name(lx.chars[start..lx.pos].iter().collect()));
            } else {
                let two: String = lx.chars[lx.pos..(lx.pos + 2).min(lx.chars.len())]
                    .iter()
                    .collect();
                let op = match two.as_str() {
                    "**" => Some("**"),
                    "//" => Some("//"),
                    _ => None,
                };
                if let Some(op) = op {
                    out.push(Tok::Op(op));
                    lx.pos += 2;
                } else {
                    let op = match c {
                        '+' => "+",
                        '-' => "-",
                        '*' => "*",
                        '/' => "/",
                        '%' => "%",
                        '(' => "(",
                        ')' => ")",
                        '.' => ".",
                        ',' => ",",
                        '[' => "[",
                        ']' => "]",
                        _ => return Err(format!("unexpected character {c:?}")),
                    };
                    out.push(Tok::Op(op));
                    lx.pos += 1;
                }
            }
        }
        Ok(out)
    }

    fn peek_digit(&self, off: usize) -> bool {
        self.chars
            .get(self.pos + off)
            .is_some_and(|c| c.is_ascii_digit())
    }

    fn number(&mut self) -> Result<PyValue, String> {
        let start = self.pos;
        while self.pos < self.chars.len()
            && (self.chars[self.pos].is_ascii_alphanumeric()
                || self.chars[self.pos] == '.'
                || self.chars[self.pos] == '_')
        {
            if matches!(self.chars[self.pos], 'e' | 'E')
                && matches!(self.chars.get(self.pos + 1), Some('-') | Some('+'))
            {
                self.pos += 1;
            }
            self.pos += 1;
        }
        let s: String = self.chars[start..self.pos]
            .iter()
            .filter(|c| **c != '_')
            .collect();
        if let Ok(i) = s.parse::<i64>() {
            return Ok(PyValue::Int(i));
        }
        s.parse::<f64>()
            .map(PyValue::Float)
            .map_err(|_| format!("not a number: {s}"))
    }

    fn string(&mut self, quote: char) -> Result<String, String> {
        self.pos += 1;
        let start = self.pos;
        while self.pos < self.chars.len() && self.chars[self.pos] != quote {
            self.pos += 1;
        }
        if self.pos >= self.chars.len() {
            return Err("unterminated string".into());
        }
        let s = self.chars[start..self.pos].iter().collect();
        self.pos += 1;
        Ok(s)
    }
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    env: &'a std::collections::HashMap<String, PyValue>,
}

impl Parser<'_> {
    fn expr(&mut self) -> Result<PyValue, String> {
        let mut lhs = self.term()?;
        while let Some(Tok::Op(op @ ("+" | "-"))) = self.toks.get(self.pos).cloned() {
            self.pos += 1;
            let rhs = self.term()?;
            lhs = arith(&lhs, op, &rhs)?;
        }
        Ok(lhs)
    }

    fn term(&mut self) -> Result<PyValue, String> {
        let mut lhs = self.unary()?;
        while let Some(Tok::Op(op @ ("*" | "/" | "//" | "%"))) = self.toks.get(self.pos).cloned() {
            self.pos += 1;
            let rhs = self.unary()?;
            lhs = arith(&lhs, op, &rhs)?;
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> Result<PyValue, String> {
        if let Some(Tok::Op("-")) = self.toks.get(self.pos) {
            self.pos += 1;
            let v = self.unary()?;
            return arith(&PyValue::Int(0), "-", &v);
        }
        if let Some(Tok::Op("+")) = self.toks.get(self.pos) {
            self.pos += 1;
            return self.unary();
        }
        self.power()
    }

    fn power(&mut self) -> Result<PyValue, String> {
        let base = self.atom()?;
        if let Some(Tok::Op("**")) = self.toks.get(self.pos) {
            self.pos += 1;
            let exp = self.unary()?;
            return arith(&base, "**", &exp);
        }
        Ok(base)
    }

    fn atom(&mut self) -> Result<PyValue, String> {
        let tok = self
            .toks
            .get(self.pos)
            .cloned()
            .ok_or("expression ends early")?;
        self.pos += 1;
        match tok {
            Tok::Num(v) => Ok(v),
            Tok::Str(s) => Ok(PyValue::Str(s)),
            Tok::Name(n) => match n.as_str() {
                "True" => Ok(PyValue::Bool(true)),
                "False" => Ok(PyValue::Bool(false)),
                "None" => Ok(PyValue::None),
                _ => {
                    if let Some(Tok::Op("(")) = self.toks.get(self.pos) {
                        return Err(format!("cannot evaluate a call to {n}()"));
                    }
                    self.env
                        .get(&n)
                        .cloned()
                        .ok_or_else(|| format!("unknown name {n}"))
                }
            },
            Tok::Op("(") => {
                let v = self.expr()?;
                match self.toks.get(self.pos) {
                    Some(Tok::Op(")")) => {
                        self.pos += 1;
                        Ok(v)
                    }
                    _ => Err("missing )".into()),
                }
            }
            Tok::Op(op) => Err(format!("unexpected {op}")),
        }
    }
}

fn as_f64(v: &PyValue) -> Option<f64> {
    match v {
        PyValue::Int(i) => Some(*i as f64),
        PyValue::Float(f) => Some(*f),
        PyValue::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

fn arith(a: &PyValue, op: &str, b: &PyValue) -> Result<PyValue, String> {
    if let (PyValue::Int(x), PyValue::Int(y)) = (a, b) {
        let r = match op {
            "+" => x.checked_add(*y),
            "-" => x.checked_sub(*y),
            "*" => x.checked_mul(*y),
            "//" if *y != 0 => Some(x.div_euclid(*y)),
            "%" if *y != 0 => Some(x.rem_euclid(*y)),
            "**" if (0..64).contains(y) => x.checked_pow(*y as u32),
            "/" if *y != 0 => return Ok(PyValue::Float(*x as f64 / *y as f64)),
            _ => None,
        };
        return r
            .map(PyValue::Int)
            .ok_or_else(|| format!("cannot evaluate {x} {op} {y}"));
    }
    if let (PyValue::Str(x), "+", PyValue::Str(y)) = (a, op, b) {
        return Ok(PyValue::Str(format!("{x}{y}")));
    }
    let (x, y) = (
        as_f64(a).ok_or("not a number")?,
        as_f64(b).ok_or("not a number")?,
    );
    let r = match op {
        "+" => x + y,
        "-" => x - y,
        "*" => x * y,
        "/" => x / y,
        "//" => (x / y).floor(),
        "%" => x.rem_euclid(y),
        "**" => x.powf(y),
        _ => return Err(format!("unknown operator {op}")),
    };
    if r.is_finite() {
        Ok(PyValue::Float(r))
    } else {
        Err(format!("{x} {op} {y} is not finite"))
    }
}

/// GPT-2 checkpoints nanoGPT can start from (`init_from`): (n_layer, n_head, n_embd); vocab 50257, block
/// 1024, bias on (nanoGPT model.py `from_pretrained`).
fn gpt2_checkpoint(name: &str) -> Option<(u64, u64, u64)> {
    match name {
        "gpt2" => Some((12, 12, 768)),
        "gpt2-medium" => Some((24, 16, 1024)),
        "gpt2-large" => Some((36, 20, 1280)),
        "gpt2-xl" => Some((48, 25, 1600)),
        _ => None,
    }
}

/// Character-level datasets with their own vocabulary (their meta.pkl): shakespeare_char has 65 characters.
fn dataset_vocab(name: &str) -> Option<u64> {
    match name {
        "shakespeare_char" => Some(65),
        _ => None,
    }
}

/// Reads a nanoGPT `config/*.py` file as train.py's configurator does (plain assignments executed in order)
/// and fills every memory-relevant key it does not set with train.py's default.
///
/// # Errors
/// A line that is not an assignment, import or comment; an expression that cannot be evaluated for a key
/// that changes memory (with its line number); values of the wrong type.
pub fn nanogpt_config(text: &str) -> Result<NanoGptImport, Error> {
    let src = "nanoGPT config";
    let mut env: std::collections::HashMap<String, PyValue> = std::collections::HashMap::new();
    let mut set_at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut n_assignments = 0;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with("import ")
            || line.starts_with("from ")
        {
            continue;
        }
        let Some(eq) = find_assignment(line) else {
            return Err(Error::Parse {
                source: src.into(),
                line: Some(line_no),
                message: format!("not an assignment, import or comment: {line:?}; is this a nanoGPT config file?"),
            });
        };
        let name = line[..eq].trim();
        if !name.chars().all(|c| c.is_alphanumeric() || c == '_')
            || name.is_empty()
            || name.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(Error::Parse {
                source: src.into(),
                line: Some(line_no),
                message: format!("cannot assign to {name:?}"),
            });
        }
        n_assignments += 1;
        let expr = &line[eq + 1..];
        let value = Lexer::tokens(expr, line_no).and_then(|toks| {
            let mut p = Parser {
                toks,
                pos: 0,
                env: &env,
            };
            let v = p.expr()?;
            if p.pos != p.toks.len() {
                return Err("unexpected text after the expression".into());
            }
            Ok(v)
        });
        match value {
            Ok(v) => {
                env.insert(name.to_string(), v);
                set_at.insert(name.to_string(), line_no);
            }
            Err(msg) if NANOGPT_MEMORY_KEYS.contains(&name) => {
                return Err(Error::Parse {
                    source: src.into(),
                    line: Some(line_no),
                    message: format!("cannot evaluate {name} = {}: {msg}", expr.trim()),
                });
            }
            Err(_) => {
                env.remove(name);
            }
        }
    }
    if n_assignments == 0 {
        return Err(Error::Parse {
            source: src.into(),
            line: None,
            message: "no assignments found; is this a nanoGPT config file?".into(),
        });
    }
    let mut provenance = Vec::new();
    let mut get = |key: &'static str| -> PyValue {
        match env.get(key) {
            Some(v) => {
                provenance.push(Provenance {
                    key,
                    value: py_display(v),
                    source: format!("config line {}", set_at[key]),
                });
                v.clone()
            }
            None => {
                let v = nanogpt_default(key);
                provenance.push(Provenance {
                    key,
                    value: py_display(&v),
                    source: "train.py default".into(),
                });
                v
            }
        }
    };
    let int = |key: &str, v: &PyValue| -> Result<u64, Error> {
        match v {
            PyValue::Int(i) if *i >= 0 => Ok(*i as u64),
            PyValue::Int(i) => Err(Error::invalid(key, i, "must be at least 1")),
            PyValue::Float(f) if f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19 => Ok(*f as u64),
            other => Err(Error::invalid(
                key,
                py_display(other),
                "must be a whole number",
            )),
        }
    };
    let float = |key: &str, v: &PyValue| -> Result<f64, Error> {
        as_f64(v).ok_or_else(|| Error::invalid(key, py_display(v), "must be a number"))
    };
    let batch_size = int("batch_size", &get("batch_size"))?;
    let mut block_size = int("block_size", &get("block_size"))?;
    let mut n_layer = int("n_layer", &get("n_layer"))?;
    let mut n_head = int("n_head", &get("n_head"))?;
    let mut n_embd = int("n_embd", &get("n_embd"))?;
    let dropout = float("dropout", &get("dropout"))?;
    let mut bias = match get("bias") {
        PyValue::Bool(b) => b,
        other => {
            return Err(Error::invalid(
                "bias",
                py_display(&other),
                "must be True or False",
            ))
        }
    };
    let precision = match get("dtype") {
        PyValue::Str(s) => match s.as_str() {
            "float32" => Precision::Fp32,
            "bfloat16" => Precision::Bf16Amp,
            "float16" => Precision::Fp16Amp,
            _ => {
                return Err(Error::UnknownValue {
                    field: "dtype".into(),
                    value: s,
                    allowed: &["float32", "bfloat16", "float16"],
                })
            }
        },
        other => {
            return Err(Error::invalid(
                "dtype",
                py_display(&other),
                "must be a string",
            ))
        }
    };
    let grad_accum_steps = int(
        "gradient_accumulation_steps",
        &get("gradient_accumulation_steps"),
    )?;
    let grad_clip = float("grad_clip", &get("grad_clip"))?;
    let dataset = match get("dataset") {
        PyValue::Str(s) => s,
        other => {
            return Err(Error::invalid(
                "dataset",
                py_display(&other),
                "must be a string",
            ))
        }
    };
    let init_from = match get("init_from") {
        PyValue::Str(s) => s,
        other => {
            return Err(Error::invalid(
                "init_from",
                py_display(&other),
                "must be a string",
            ))
        }
    };
    let compile = matches!(get("compile"), PyValue::Bool(true));
    let mut notes = Vec::new();
    let mut vocab_size = 50304;
    let mut vocab_source =
        "train.py: meta_vocab_size unknown, 50304 (GPT-2's 50257 padded to a multiple of 64)"
            .to_string();
    if let Some(v) = dataset_vocab(&dataset) {
        vocab_size = v;
        vocab_source = format!("dataset {dataset} (its meta.pkl vocabulary)");
    }
    if let Some((l, h, c)) = gpt2_checkpoint(&init_from) {
        n_layer = l;
        n_head = h;
        n_embd = c;
        bias = true;
        vocab_size = 50257;
        vocab_source = format!("checkpoint {init_from}");
        // train.py crops the checkpoint's 1024 positions to a smaller configured block_size.
        block_size = block_size.min(1024);
        notes.push(format!(
            "init_from = {init_from:?}: n_layer {l}, n_head {h}, n_embd {c}, vocab 50257, bias on"
        ));
    } else if init_from != "scratch" {
        notes.push(format!(
            "init_from = {init_from:?}: dims taken from the config as for a fresh model"
        ));
    }
    provenance.push(Provenance {
        key: "vocab_size",
        value: vocab_size.to_string(),
        source: vocab_source,
    });
    let setup = Setup {
        model: ModelConfig::nanogpt(
            n_layer, n_head, n_embd, block_size, vocab_size, bias, dropout,
        ),
        train: TrainConfig {
            batch_size,
            seq_len: block_size,
            precision,
            optimizer: Optimizer::AdamWFused,
            attention: Attention::Sdpa,
            checkpointing: false,
            grad_accum_steps,
            grad_clip,
            // train.py: optimizer.zero_grad(set_to_none=True)
            zero_grad_set_to_none: true,
            // train.py: `if compile: model = torch.compile(model)`
            compile,
            // PYTORCH_CUDA_ALLOC_CONF is the environment's, not the config file's.
            alloc_conf: Default::default(),
            lora: None,
            base_dtype: None,
            quantization: None,
            parallel: Default::default(),
        },
        device: DeviceConfig::default(),
    };
    notes.push("optimizer: nanoGPT builds fused AdamW on CUDA; attention: flash (SDPA)".into());
    Ok(NanoGptImport {
        setup,
        provenance,
        notes,
    })
}

/// The `=` of a top-level assignment (not `==`, `<=`, `>=`, `!=`), outside strings.
fn find_assignment(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    let mut quote: Option<u8> = None;
    for i in 0..b.len() {
        match quote {
            Some(q) if b[i] == q => quote = None,
            Some(_) => {}
            None if b[i] == b'\'' || b[i] == b'"' => quote = Some(b[i]),
            None if b[i] == b'#' => return None,
            None if b[i] == b'=' => {
                let prev = if i > 0 { b[i - 1] } else { b' ' };
                let next = b.get(i + 1).copied().unwrap_or(b' ');
                if next != b'=' && !matches!(prev, b'=' | b'<' | b'>' | b'!') {
                    return Some(i);
                }
            }
            None => {}
        }
    }
    None
}

fn py_display(v: &PyValue) -> String {
    match v {
        PyValue::Int(i) => i.to_string(),
        PyValue::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.1}"),
        PyValue::Float(f) => f.to_string(),
        PyValue::Str(s) => format!("'{s}'"),
        PyValue::Bool(true) => "True".into(),
        PyValue::Bool(false) => "False".into(),
        PyValue::None => "None".into(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Hugging Face config.json.

/// Reads a Hugging Face `config.json` of a family vramfit models (llama, mistral, qwen2, qwen3, gemma) into a
/// model config.
///
/// # Errors
/// Malformed JSON, a missing dimension, or a `model_type` vramfit does not model (named in the message).
pub fn hf_config(text: &str) -> Result<(ModelConfig, Vec<String>), Error> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::Parse {
        source: "config.json".into(),
        line: Some(e.line()),
        message: e.to_string(),
    })?;
    hf_config_object(object(&v, "config.json")?)
}

/// The `hidden_act` (`hidden_activation`) values a config.json may give: the names transformers' ACT2FN maps to
/// `torch.nn.functional.silu` ("silu", and "swish" through `nn.SiLU`) or `torch.nn.functional.gelu` ("gelu", and
/// "gelu_pytorch_tanh" with `approximate="tanh"`), each of which saves only its input for the backward.
pub const HIDDEN_ACTS: &[&str] = &["silu", "swish", "gelu", "gelu_pytorch_tanh"];

/// `hf_config` on a parsed config.json (also the setup JSON's `"model": {"hf": ...}`).
///
/// # Errors
/// As `hf_config`.
pub fn hf_config_object(o: &Map<String, Value>) -> Result<(ModelConfig, Vec<String>), Error> {
    let mut notes = Vec::new();
    let model_type = match get_str(o, "", "model_type")? {
        Some(t) => t,
        None => {
            notes.push("config.json gives no model_type: read as llama".to_string());
            "llama"
        }
    };
    let family = match model_type {
        "llama" => Family::Llama,
        "mistral" => Family::Mistral,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "gemma" => Family::Gemma,
        "gemma2" => Family::Gemma2,
        "gemma3_text" => Family::Gemma3,
        "olmo2" => Family::Olmo2,
        "phi3" => Family::Phi3,
        "gpt_neox" => Family::GptNeox,
        "mixtral" => Family::Mixtral,
        "qwen2_moe" => Family::Qwen2Moe,
        "olmoe" => Family::Olmoe,
        // Hugging Face's GPT-2 is nanoGPT's network (nanoGPT loads its weights): say where vramfit has it.
        "gpt2" => {
            return Err(Error::invalid(
                "model_type",
                "\"gpt2\"",
                "is read as nanoGPT's GPT, not from a config.json: paste a nanoGPT config/*.py, pick the gpt2 \
                 preset, or give the family gpt2 with its sizes (--family gpt2)",
            ))
        }
        // A multimodal checkpoint's language model is its `text_config`.
        other if o.get("text_config").is_some_and(Value::is_object) => {
            return Err(Error::invalid(
                "model_type",
                format!("{other:?}"),
                "is a multimodal model: paste its text_config (the language model) instead",
            ))
        }
        other => {
            return Err(Error::UnknownValue {
                field: "model_type".into(),
                value: other.into(),
                allowed: &[
                    "llama",
                    "mistral",
                    "qwen2",
                    "qwen3",
                    "gemma",
                    "gemma2",
                    "gemma3_text",
                    "olmo2",
                    "phi3",
                    "gpt_neox",
                    "mixtral",
                    "qwen2_moe",
                    "olmoe",
                ],
            })
        }
    };
    // Biases transformers adds to the attention's or the MLP's Linears where the config asks: vramfit's description
    // of these families has none there (GPT-NeoX's are its own fields), and they were not measured.
    if family != Family::GptNeox {
        for (key, on) in [("attention_bias", "attention"), ("mlp_bias", "MLP")] {
            if get_bool(o, "", key)? == Some(true) {
                return Err(Error::NotModelled {
                    what: format!("{model_type} with {key} (true): biases on the {on} Linears"),
                });
            }
        }
    }
    let hidden = required(get_u64(o, "", "hidden_size")?, "hidden_size")?;
    let n_head = required(
        get_u64(o, "", "num_attention_heads")?,
        "num_attention_heads",
    )?;
    // Qwen3 and Gemma give a head size of their own (q_dim = heads x head_dim, not hidden_size); kept only when
    // it differs from hidden_size / heads. Without one, transformers 5.24's config classes default it: 256 for
    // Gemma, Gemma 2 and Gemma 3 (GemmaConfig.head_dim and its successors), 128 for Qwen3 (Qwen3Config.head_dim);
    // the Llama-shaped others compute hidden_size / heads.
    let default_head_dim = match family {
        Family::Gemma | Family::Gemma2 | Family::Gemma3 => Some(256),
        Family::Qwen3 => Some(128),
        _ => None,
    };
    let given = match o.get("head_dim") {
        None | Some(Value::Null) => None,
        Some(_) => get_u64(o, "", "head_dim")?,
    };
    let head_dim = match given.or(default_head_dim) {
        Some(hd) if n_head == 0 || hd.checked_mul(n_head) != Some(hidden) => hd,
        _ => 0,
    };
    // Mistral: `sliding_window` (null in later versions: full attention). Qwen2: only with `use_sliding_window`,
    // and then on the layers from `max_window_layers` on.
    let window = |key: &str| -> Result<u64, Error> {
        Ok(match o.get(key) {
            None | Some(Value::Null) => 0,
            Some(_) => get_u64(o, "", key)?.unwrap_or(0),
        })
    };
    let sliding_window = match family {
        Family::Mistral | Family::Phi3 | Family::Mixtral => window("sliding_window")?,
        // Gemma 3: five sliding layers for every global one (`sliding_window_pattern` 6; `Arch::layer_slides`).
        Family::Gemma3 => {
            if get_u64(o, "", "sliding_window_pattern")?.is_some_and(|p| p != 6) {
                return Err(Error::NotModelled {
                    what: "gemma3_text with a sliding_window_pattern other than 6".into(),
                });
            }
            window("sliding_window")?
        }
        Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe
            if get_bool(o, "", "use_sliding_window")?.unwrap_or(false) =>
        {
            let layers = get_u64(o, "", "num_hidden_layers")?.unwrap_or(0);
            if get_u64(o, "", "max_window_layers")?.is_some_and(|l| l < layers) {
                return Err(Error::NotModelled {
                    what: "qwen2 with use_sliding_window on some layers only (max_window_layers)"
                        .into(),
                });
            }
            window("sliding_window")?
        }
        _ => 0,
    };
    if family == Family::Gemma2 {
        notes.push(
            "gemma2: eager attention (soft-capped scores), every other layer with a sliding window, which costs \
             what a full layer costs there"
                .into(),
        );
    }
    if sliding_window > 0 {
        notes.push(format!(
            "{model_type}: sliding window of {sliding_window} tokens: sequences shorter than it attend as full \
             causal attention does"
        ));
    }
    // The MLP's activation: `hidden_act` (Gemma 2 and 3 read `hidden_activation` instead, and ignore the other),
    // which transformers' ACT2FN turns into a module. The executors model it as one op whose autograd node saves
    // only its input and whose output has its input's shape and dtype (the gated MLP's `silu` or `gelu`, the
    // GELU MLP's `gelu`, in eager.rs and compiled.rs): the names accepted are the ones ACT2FN maps to such an op.
    // In PyTorch's derivatives.yaml `silu` and `gelu` (either `approximate`) differentiate from `self` alone, and
    // neither is on autocast's fp32 list. Every other name is refused: `relu` saves its result instead, and the
    // Python formulas (`gelu_new`, `gelu_fast`, `quick_gelu`, ...) are chains of ops that each save tensors.
    let act_field = match family {
        Family::Gemma2 | Family::Gemma3 => "hidden_activation",
        _ => "hidden_act",
    };
    if let Some(a) = get_str(o, "", act_field)? {
        // The family's own op, which the estimate names in its timeline (Gemma's config maps its legacy "gelu"
        // to the tanh approximation).
        let own = match family {
            Family::GptNeox => &["gelu"][..],
            Family::Gemma | Family::Gemma2 | Family::Gemma3 => &["gelu_pytorch_tanh", "gelu"][..],
            _ => &["silu", "swish"][..],
        };
        if !HIDDEN_ACTS.contains(&a) {
            return Err(Error::NotModelled {
                what: format!(
                    "{model_type} with {act_field} {a:?}: the activations vramfit models are {} (one op that \
                     saves only its input)",
                    HIDDEN_ACTS.join(", ")
                ),
            });
        }
        if !own.contains(&a) {
            notes.push(format!(
                "{model_type}: {act_field} {a:?} saves only its input, as the {} the estimate names does, so \
                 the memory is the same",
                own[0]
            ));
        }
    }
    // Partial rotary: Phi-3's `partial_rotary_factor` (default 1), GPT-NeoX's `rotary_pct` (default 0.25), or
    // transformers 5's `rope_parameters.partial_rotary_factor`; HF takes `int(head_size * factor)` dimensions.
    let factor = match o.get("rope_parameters") {
        Some(Value::Object(rp)) => get_f64(rp, "rope_parameters.", "partial_rotary_factor")?,
        _ => None,
    };
    let factor = match family {
        Family::GptNeox => get_f64(o, "", "rotary_pct")?.or(factor).unwrap_or(0.25),
        Family::Phi3 => get_f64(o, "", "partial_rotary_factor")?
            .or(factor)
            .unwrap_or(1.0),
        _ => 1.0,
    };
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(Error::invalid(
            if family == Family::GptNeox {
                "rotary_pct"
            } else {
                "partial_rotary_factor"
            },
            factor,
            "must be in (0, 1]",
        ));
    }
    let rotary_dims = neox_rotary_dims(head_dim, hidden, n_head, factor);
    let neox = family == Family::GptNeox;
    let moe = hf_moe(o, family)?;
    let m = ModelConfig {
        family,
        n_layer: required(get_u64(o, "", "num_hidden_layers")?, "num_hidden_layers")?,
        n_head,
        n_kv_head: get_u64(o, "", "num_key_value_heads")?.unwrap_or(n_head),
        n_embd: hidden,
        block_size: get_u64(o, "", "max_position_embeddings")?.unwrap_or(2048),
        vocab_size: required(get_u64(o, "", "vocab_size")?, "vocab_size")?,
        bias: neox && get_bool(o, "", "attention_bias")?.unwrap_or(true),
        dropout: get_f64(o, "", "attention_dropout")?.unwrap_or(0.0),
        // Qwen2-MoE's experts have their own width (`moe_intermediate_size`, default 1408 in
        // `Qwen2MoeConfig`); its `intermediate_size` is for dense layers, which it has none of by default.
        intermediate_size: if family == Family::Qwen2Moe {
            get_u64(o, "", "moe_intermediate_size")?.unwrap_or(1408)
        } else {
            required(get_u64(o, "", "intermediate_size")?, "intermediate_size")?
        },
        // Gemma ties its head unless the config says otherwise (`GemmaConfig(tie_word_embeddings=True)`).
        tie_embeddings: get_bool(o, "", "tie_word_embeddings")?.unwrap_or(matches!(
            family,
            Family::Gemma | Family::Gemma2 | Family::Gemma3
        )),
        head_dim,
        sliding_window,
        rotary_dims,
        parallel_residual: neox && get_bool(o, "", "use_parallel_residual")?.unwrap_or(true),
        n_experts: moe.0,
        experts_per_token: moe.1,
        shared_expert_size: moe.2,
        norm_topk_prob: moe.3,
        router_aux_loss: moe.4,
    };
    if m.n_experts > 0 {
        notes.push(format!(
            "{model_type}: {} experts, {} per token, routing assumed balanced (with transformers' default \
             grouped_mm experts no allocation depends on it: measured)",
            m.n_experts, m.experts_per_token
        ));
    }
    Ok((m, notes))
}

/// A mixture-of-experts config's (experts, experts per token, shared expert width, norm_topk_prob, the router's
/// auxiliary loss), with
/// transformers' defaults where the file is silent (`MixtralConfig`: 8 experts, 2 per token; `Qwen2MoeConfig`: 60,
/// 4, shared 5632; `OlmoeConfig`: 64, 8); what vramfit does not model is refused by name. Zeros for dense families.
fn hf_moe(o: &Map<String, Value>, family: Family) -> Result<(u64, u64, u64, bool, bool), Error> {
    let (experts_key, experts, per_token) = match family {
        Family::Mixtral => ("num_local_experts", 8, 2),
        Family::Qwen2Moe => ("num_experts", 60, 4),
        Family::Olmoe => ("num_experts", 64, 8),
        _ => return Ok((0, 0, 0, false, false)),
    };
    let refuse = |what: String| Err(Error::NotModelled { what });
    if get_f64(o, "", "router_jitter_noise")?.is_some_and(|j| j != 0.0) {
        return refuse(
            "mixtral with router_jitter_noise (random noise on the router's input)".into(),
        );
    }
    if family == Family::Qwen2Moe {
        let sparse_step = get_u64(o, "", "decoder_sparse_step")?.unwrap_or(1);
        let dense_layers =
            matches!(o.get("mlp_only_layers"), Some(Value::Array(a)) if !a.is_empty());
        if sparse_step != 1 || dense_layers {
            return refuse(
                "qwen2_moe with dense layers among the sparse ones (decoder_sparse_step, mlp_only_layers)".into(),
            );
        }
    }
    if family == Family::Olmoe && !matches!(o.get("clip_qkv"), None | Some(Value::Null)) {
        return refuse("olmoe with clip_qkv (q, k and v clamped after the projections)".into());
    }
    Ok((
        get_u64(o, "", experts_key)?.unwrap_or(experts),
        get_u64(o, "", "num_experts_per_tok")?.unwrap_or(per_token),
        if family == Family::Qwen2Moe {
            get_u64(o, "", "shared_expert_intermediate_size")?.unwrap_or(5632)
        } else {
            0
        },
        family != Family::Mixtral && get_bool(o, "", "norm_topk_prob")?.unwrap_or(false),
        get_bool(o, "", "output_router_logits")?.unwrap_or(false),
    ))
}

/// Rotary dimensions per head for a rotated fraction `factor` of it, as transformers takes them
/// (`int(head_size * factor)`); 0 (the whole head) when that is all of it. `head_dim` 0: `n_embd / n_head`.
fn neox_rotary_dims(head_dim: u64, n_embd: u64, n_head: u64, factor: f64) -> u64 {
    let hd = if head_dim > 0 {
        head_dim
    } else {
        n_embd.checked_div(n_head).unwrap_or(0)
    };
    if !(0.0..1.0).contains(&factor) {
        return 0;
    }
    // In [0, hd): the float-to-int cast cannot overflow.
    (hd as f64 * factor) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit: `hidden_act` was checked for phi3 and gpt_neox only, so a Llama with "gelu_new" (a chain of
    /// Python ops with tensors of its own) was estimated as if it were SiLU. Every family now takes the names that
    /// are one op saving only its input (silu, swish, gelu, gelu_pytorch_tanh) and refuses the rest by name;
    /// Gemma 2 and 3 read `hidden_activation` (transformers ignores their `hidden_act`).
    #[test]
    fn every_family_checks_its_activation() {
        let config = |model_type: &str, extra: &str| {
            format!(
                r#"{{"model_type": "{model_type}", "hidden_size": 256, "intermediate_size": 512,
                "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000,
                "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2,
                "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512{extra}}}"#
            )
        };
        let types = [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo2",
            "olmoe",
            "phi3",
            "gpt_neox",
        ];
        for t in types {
            let field = if matches!(t, "gemma2" | "gemma3_text") {
                "hidden_activation"
            } else {
                "hidden_act"
            };
            let (plain, _) = hf_config(&config(t, "")).unwrap_or_else(|e| panic!("{t}: {e}"));
            for act in HIDDEN_ACTS {
                let (m, _) = hf_config(&config(t, &format!(r#", "{field}": "{act}""#)))
                    .unwrap_or_else(|e| panic!("{t} with {act}: {e}"));
                assert_eq!(m, plain, "{t} with {act}: the same model");
            }
            for act in ["gelu_new", "relu", "gelu_fast", "quick_gelu", "tanh"] {
                let e = hf_config(&config(t, &format!(r#", "{field}": "{act}""#)))
                    .unwrap_err()
                    .to_string();
                assert_eq!(
                    e,
                    format!(
                        "not modelled: {t} with {field} \"{act}\": the activations vramfit models are silu, \
                         swish, gelu, gelu_pytorch_tanh (one op that saves only its input)"
                    ),
                    "{t}"
                );
            }
        }
        // The field transformers does not read for the family is not checked.
        assert!(hf_config(&config("gemma2", r#", "hidden_act": "gelu_new""#)).is_ok());
        // A value that is not the family's own op is said in a note (the timeline names the family's).
        let (_, notes) = hf_config(&config("llama", r#", "hidden_act": "gelu""#)).unwrap();
        assert!(
            notes.iter().any(|n| n
                == "llama: hidden_act \"gelu\" saves only its input, as the silu the estimate names does, so \
                    the memory is the same"),
            "{notes:?}"
        );
        let (_, notes) = hf_config(&config("llama", r#", "hidden_act": "silu""#)).unwrap();
        assert!(!notes.iter().any(|n| n.contains("hidden_act")), "{notes:?}");
    }

    const FOUNDING: &str = r#"{"model": {"family": "gpt2", "n_layer": 6, "n_head": 6, "n_embd": 384,
        "block_size": 512, "vocab_size": 50304, "bias": false, "dropout": 0.0},
        "train": {"batch_size": 16, "seq_len": 512, "precision": "fp16-amp", "optimizer": "adamw-fused",
        "attention": "sdpa", "checkpointing": false, "grad_accum_steps": 1, "grad_clip": 1.0}}"#;

    /// A setup JSON pasted on the page with a device of its own: the page keeps its GPU (issue 12), and the pasted
    /// device was dropped without a word ("fits in 12.0 GiB" under a pasted 8 GiB device).
    #[test]
    fn a_pasted_setups_device_is_said_to_be_left_out() {
        let with = r#"{"model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64,
            "vocab_size": 100}, "device": {"memory_gib": 8}}"#;
        let (s, notes, kind) = import_any(with).unwrap();
        assert_eq!(kind, "setup");
        assert_eq!(s.device.memory_bytes, 8 << 30);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].starts_with("the pasted setup's \"device\" is not used here"));
        let without = r#"{"model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64,
            "vocab_size": 100}}"#;
        assert_eq!(import_any(without).unwrap().1, Vec::<String>::new());
    }

    #[test]
    fn reads_the_issue_example_and_round_trips() {
        let s = setup_from_json(FOUNDING).unwrap();
        assert_eq!(s.model.n_embd, 384);
        assert_eq!(s.train.precision, Precision::Fp16Amp);
        let back = setup_from_value(&setup_to_value(&s)).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn finetune_names_a_recipe_and_writes_out_as_its_fields() {
        let model = serde_json::json!({"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2,
            "n_embd": 256, "block_size": 128, "vocab_size": 1000, "intermediate_size": 512});
        let with =
            |train: Value| setup_from_value(&serde_json::json!({"model": model, "train": train}));
        // LoRA: the recipe's adapters over a base in the precision's 2-byte dtype.
        let lora = with(serde_json::json!({"finetune": {"method": "lora"}})).unwrap();
        let long = with(
            serde_json::json!({"base_dtype": "bf16", "lora": {"r": 16, "alpha": 32,
            "dropout": 0.05, "target_modules": "all-linear"}}),
        )
        .unwrap();
        assert_eq!(lora, long);
        let fp16 = with(
            serde_json::json!({"precision": "fp16-amp", "finetune": {"method": "lora", "r": 8,
            "targets": ["q_proj", "v_proj"]}}),
        )
        .unwrap();
        assert_eq!(fp16.train.base_dtype, Some(BaseDtype::Fp16));
        let l = fp16.train.lora.as_ref().unwrap();
        assert_eq!(
            (l.r, l.alpha, l.targets.names()),
            (8, 16.0, vec!["q_proj", "v_proj"])
        );
        // QLoRA: NF4 with double quantization, bf16 autocast, checkpointing; int8 has no double quantization.
        let q = with(serde_json::json!({"precision": "fp32", "finetune": {"method": "qlora"}}))
            .unwrap();
        assert_eq!(
            q.train.quantization,
            Some(Quantization::Nf4 { double_quant: true })
        );
        assert_eq!(
            q.train.precision,
            Precision::Fp32,
            "train's own precision wins over the recipe"
        );
        let q =
            with(serde_json::json!({"finetune": {"method": "qlora", "quant": "int8"}})).unwrap();
        assert_eq!(q.train.quantization, Some(Quantization::Int8));
        assert!(q.train.checkpointing);
        let no_ckpt =
            with(serde_json::json!({"checkpointing": false, "finetune": {"method": "qlora"}}))
                .unwrap();
        assert!(!no_ckpt.train.checkpointing);
        // Full: nothing frozen; it takes no adapter field.
        let full = with(serde_json::json!({"finetune": {"method": "full"}})).unwrap();
        assert_eq!(full, with(serde_json::json!({})).unwrap());
        // Each mistake names its field.
        let err = |train: Value| with(train).unwrap_err().to_string();
        assert_eq!(
            err(serde_json::json!({"finetune": {"method": "full", "r": 8}})),
            "train.finetune.r (8) applies to method \"lora\" or \"qlora\", not \"full\""
        );
        assert_eq!(
            err(serde_json::json!({"finetune": {"method": "lora", "quant": "nf4"}})),
            "train.finetune.quant (\"nf4\") applies to method \"qlora\" (a quantized base), not \"lora\""
        );
        assert_eq!(
            err(serde_json::json!({"finetune": {"method": "dora"}})),
            "train.finetune.method (\"dora\") is not one of: full, lora, qlora"
        );
        assert_eq!(
            err(serde_json::json!({"finetune": {"r": 8}})),
            "missing required field \"train.finetune.method\""
        );
        assert_eq!(
            err(serde_json::json!({"finetune": {"method": "lora", "rank": 8}})),
            "unknown field \"train.finetune.rank\""
        );
        assert_eq!(
            err(serde_json::json!({"finetune": {"method": "lora", "r": 0}})),
            "train.finetune.r (0) must be at least 1"
        );
        assert_eq!(
            err(serde_json::json!({"finetune": {"method": "qlora", "quant": "nf3"}})),
            "train.quantization (\"nf3\") is not one of: nf4, fp4, int8"
        );
    }

    #[test]
    fn lora_fields_round_trip_and_take_peft_defaults() {
        let v = serde_json::json!({"model": {"family": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2,
            "n_embd": 256, "block_size": 128, "vocab_size": 1000, "intermediate_size": 512},
            "train": {"lora": {"r": 16, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
                      "base_dtype": "bf16"}});
        let s = setup_from_value(&v).unwrap();
        let l = s.train.lora.as_ref().unwrap();
        assert_eq!((l.r, l.alpha, l.dropout), (16, 8.0, 0.0));
        assert!(l.save_head && !l.save_embed);
        assert_eq!(s.train.base_dtype, Some(BaseDtype::Bf16));
        assert_eq!(setup_from_value(&setup_to_value(&s)).unwrap(), s);
        let mut bad = v.clone();
        bad["train"]["lora"]["rank"] = 8.into();
        assert_eq!(
            setup_from_value(&bad).unwrap_err().to_string(),
            "unknown field \"train.lora.rank\""
        );
        bad = v.clone();
        bad["train"]["double_quant"] = true.into();
        assert!(setup_from_value(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("train.double_quant (true) needs train.quantization"));
    }

    #[test]
    fn missing_training_fields_take_defaults() {
        let s = setup_from_json(
            r#"{"model": {"family": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8,
            "block_size": 16, "vocab_size": 10}}"#,
        )
        .unwrap();
        assert_eq!(s.train.batch_size, DEFAULT_BATCH_SIZE);
        assert_eq!(s.train.seq_len, 16);
        assert_eq!(s.train.optimizer, Optimizer::AdamWFused);
    }

    #[test]
    fn errors_name_field_and_value() {
        let with = |field: &str, value: &str| {
            let mut v: Value = serde_json::from_str(FOUNDING).unwrap();
            v["model"][field] = serde_json::from_str(value).unwrap();
            setup_from_value(&v).unwrap_err().to_string()
        };
        assert_eq!(
            with("n_layer", "-1"),
            "model.n_layer (-1) must be at least 1"
        );
        assert_eq!(with("n_layers", "1"), "unknown field \"model.n_layers\"");
        assert_eq!(
            with("n_layer", "2.5"),
            "model.n_layer (2.5) must be a whole number"
        );
        assert_eq!(
            with("family", "\"bert\""),
            "model.family (\"bert\") is not one of: gpt2, llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, olmo2, \
             phi3, gpt_neox, mixtral, qwen2_moe, olmoe"
        );
        assert_eq!(with("bias", "1"), "model.bias (1) must be true or false");
        let e = setup_from_json("{\"model\": \n{").unwrap_err().to_string();
        assert!(e.starts_with("setup JSON, line 2:"), "{e}");
    }

    #[test]
    fn nanogpt_shakespeare_char_config() {
        let text = "# train a miniature character-level shakespeare model\nout_dir = 'out-shakespeare-char'\n\
            eval_interval = 250 # keep frequent\nwandb_log = False\ndataset = 'shakespeare_char'\n\
            gradient_accumulation_steps = 1\nbatch_size = 64\nblock_size = 256\nn_layer = 6\nn_head = 6\n\
            n_embd = 384\ndropout = 0.2\nlearning_rate = 1e-3\nmax_iters = 5000\nlr_decay_iters = 5000 # make equal to max_iters usually\n\
            min_lr = 1e-4\nbeta2 = 0.99\nwarmup_iters = 100\n";
        let imp = nanogpt_config(text).unwrap();
        let s = imp.setup;
        assert_eq!(
            (
                s.model.vocab_size,
                s.model.n_layer,
                s.model.block_size,
                s.train.batch_size
            ),
            (65, 6, 256, 64)
        );
        assert_eq!(s.model.dropout, 0.2);
        assert!(imp
            .provenance
            .iter()
            .any(|p| p.key == "dtype" && p.source == "train.py default"));
        // train.py compiles by default; the config does not say otherwise.
        assert!(s.train.compile);
        assert!(imp
            .provenance
            .iter()
            .any(|p| p.key == "compile" && p.source == "train.py default"));
        let eager = nanogpt_config("compile = False\n").unwrap();
        assert!(!eager.setup.train.compile);
    }

    #[test]
    fn nanogpt_arithmetic_checkpoints_and_errors() {
        let imp = nanogpt_config("import time\ninit_from = 'gpt2-xl'\nbatch_size = 1\ngradient_accumulation_steps = 5 * 8\nwandb_run_name = 'ft-' + str(time.time())\n").unwrap();
        assert_eq!(
            (
                imp.setup.model.n_layer,
                imp.setup.model.n_embd,
                imp.setup.model.vocab_size
            ),
            (48, 1600, 50257)
        );
        assert!(imp.setup.model.bias);
        assert_eq!(imp.setup.train.grad_accum_steps, 40);
        let e = nanogpt_config("n_layer = 6\nn_embd = int(os.environ['W'])\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "nanoGPT config, line 2: cannot evaluate n_embd = int(os.environ['W']): cannot evaluate a call to int()");
        let e = nanogpt_config("{\"model\": 1}").unwrap_err().to_string();
        assert!(
            e.starts_with("nanoGPT config, line 1: not an assignment"),
            "{e}"
        );
    }

    #[test]
    fn hf_tinyllama_config() {
        let text = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 5632,
            "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 22, "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "vocab_size": 32000}"#;
        let (m, _) = hf_config(text).unwrap();
        assert_eq!(m.n_params(), 1_100_048_384);
    }

    /// Mistral-7B-v0.1's and Qwen2.5-0.5B's config.json (abridged to the fields read): the family, the sliding
    /// window, the biases in the parameter count, and the sliding window's limit.
    #[test]
    fn hf_mistral_and_qwen2_configs() {
        let mistral = r#"{"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "sliding_window": 4096,
            "tie_word_embeddings": false, "vocab_size": 32000}"#;
        let (m, notes) = hf_config(mistral).unwrap();
        assert_eq!((m.family, m.sliding_window), (Family::Mistral, 4096));
        assert_eq!(m.n_params(), 7_241_732_096);
        assert!(notes[0].contains("4096"), "{notes:?}");
        let mut s = hf_setup(m);
        assert_eq!(s.train.seq_len, 2048);
        s.validate().unwrap();
        s.train.seq_len = 4096;
        s.model.block_size = 32768;
        // At the window: an explicit mask, estimated in eager mode and under torch.compile (more than without
        // the window), refused under torch.compile with checkpointing, with the reason.
        let with_window = crate::estimate(&s).unwrap().peak_allocated_bytes;
        let mut full = s.clone();
        full.model.sliding_window = 0;
        assert!(with_window > crate::estimate(&full).unwrap().peak_allocated_bytes);
        s.train.compile = true;
        full.train.compile = true;
        let with_window = crate::estimate(&s).unwrap().peak_allocated_bytes;
        assert!(with_window > crate::estimate(&full).unwrap().peak_allocated_bytes);
        s.train.checkpointing = true;
        let e = crate::estimate(&s).unwrap_err().to_string();
        assert!(e.contains("model.sliding_window (4096)"), "{e}");
        (s.train.compile, s.train.checkpointing) = (false, false);
        // The window survives the URL state.
        s.train.seq_len = 2048;
        let q = setup_to_query(&s);
        assert!(
            q.contains("family=mistral") && q.contains("sliding_window=4096"),
            "{q}"
        );
        assert_eq!(setup_from_query(&q, &mut Vec::new()).unwrap(), s);
        // v0.2 and later: no window.
        let (m, _) = hf_config(&mistral.replace("4096,\n", "null,\n")).unwrap();
        assert_eq!(m.sliding_window, 0);

        let qwen = r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
            "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
            "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "sliding_window": 32768,
            "tie_word_embeddings": true, "use_sliding_window": false, "vocab_size": 151936}"#;
        let (q, _) = hf_config(qwen).unwrap();
        assert_eq!((q.family, q.sliding_window), (Family::Qwen2, 0));
        assert_eq!(q.n_params(), 494_032_768);
        // Round trip through the setup JSON and the URL query.
        let s = hf_setup(q);
        assert_eq!(setup_from_value(&setup_to_value(&s)).unwrap(), s);
        // Qwen3-0.6B's config.json (abridged): a head size of its own (16 x 128 = 2048 queries on a 1024 stream),
        // q/k norms, and its published 596,049,920 parameters (751,632,384 with the untied count of the tied
        // embedding).
        let qwen3 = r#"{"architectures": ["Qwen3ForCausalLM"], "head_dim": 128, "hidden_size": 1024,
            "intermediate_size": 3072, "max_position_embeddings": 40960, "model_type": "qwen3",
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
            "tie_word_embeddings": true, "use_sliding_window": false, "vocab_size": 151936}"#;
        let (q3, _) = hf_config(qwen3).unwrap();
        assert_eq!(
            (q3.family, q3.head_dim(), q3.q_dim()),
            (Family::Qwen3, 128, 2048)
        );
        assert_eq!(q3.n_params(), 596_049_920);
        // Hugging Face's GPT-2 and multimodal checkpoints: one message saying where vramfit has them.
        let e = hf_config(r#"{"model_type": "gpt2", "n_layer": 12, "n_embd": 768}"#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("model_type (\"gpt2\") is read as nanoGPT's GPT"),
            "{e}"
        );
        let e =
            hf_config(r#"{"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}"#)
                .unwrap_err();
        assert!(e.to_string().contains("paste its text_config"), "{e}");
        let e = hf_config(r#"{"model_type": "bert"}"#).unwrap_err();
        assert!(matches!(e, Error::UnknownValue { .. }), "{e}");
        // Without head_dim, transformers' Qwen3Config and GemmaConfig (and Gemma 2's and 3's) give their own default
        // (128; 256), not hidden_size / heads (64 here; 128 for the Gemma below).
        let no_head_dim = qwen3.replace(r#""head_dim": 128, "#, "");
        let (q3d, _) = hf_config(&no_head_dim).unwrap();
        assert_eq!((q3d.head_dim(), q3d.q_dim()), (128, 2048));
        for model_type in ["gemma", "gemma2", "gemma3_text"] {
            let g = format!(
                r#"{{"model_type": "{model_type}", "hidden_size": 1024, "intermediate_size": 4096,
                "num_attention_heads": 8, "num_hidden_layers": 2, "num_key_value_heads": 1, "vocab_size": 1000}}"#
            );
            let (m, _) = hf_config(&g).unwrap();
            assert_eq!((m.head_dim(), m.q_dim()), (256, 2048), "{model_type}");
        }
        // Gemma-2B's config.json (abridged): MQA with head_dim 256, tied by default; its published 2,506,172,416.
        let gemma = r#"{"architectures": ["GemmaForCausalLM"], "head_dim": 256, "hidden_act": "gelu",
            "hidden_size": 2048, "intermediate_size": 16384, "max_position_embeddings": 8192,
            "model_type": "gemma", "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
            "vocab_size": 256000}"#;
        let (g, _) = hf_config(gemma).unwrap();
        assert_eq!(
            (g.family, g.head_dim(), g.tie_embeddings),
            (Family::Gemma, 256, true)
        );
        assert_eq!(g.n_params(), 2_506_172_416);
        // Gemma-2-2B's config.json (abridged): four norms a layer; its published 2,614,341,888; eager attention.
        let gemma2 = r#"{"architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_size": 2304, "intermediate_size": 9216,
            "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
            "num_hidden_layers": 26, "num_key_value_heads": 4, "sliding_window": 4096, "vocab_size": 256000}"#;
        let (g2, _) = hf_config(gemma2).unwrap();
        assert_eq!((g2.family, g2.sliding_window), (Family::Gemma2, 0));
        assert_eq!(g2.n_params(), 2_614_341_888);
        assert_eq!(hf_setup(g2).train.attention, Attention::Manual);
        // OLMo-2-0425-1B's config.json (abridged): no pre-norms, full-width q/k norms; its published
        // 1,484,916,736 parameters.
        let olmo2 = r#"{"architectures": ["Olmo2ForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
            "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 16,
            "num_hidden_layers": 16, "num_key_value_heads": 16, "tie_word_embeddings": false,
            "vocab_size": 100352}"#;
        let (o2, _) = hf_config(olmo2).unwrap();
        assert_eq!(o2.family, Family::Olmo2);
        assert_eq!(o2.n_params(), 1_484_916_736);
        // Phi-3-mini-4k-instruct's config.json (abridged): packed projections; its published 3,821,079,552.
        let phi3 = r#"{"architectures": ["Phi3ForCausalLM"], "hidden_act": "silu", "hidden_size": 3072,
            "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "phi3",
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "sliding_window": 2047,
            "tie_word_embeddings": false, "vocab_size": 32064}"#;
        let (p3, _) = hf_config(phi3).unwrap();
        assert_eq!(
            (p3.family, p3.sliding_window, p3.rotary_dims),
            (Family::Phi3, 2047, 0)
        );
        assert_eq!(p3.n_params(), 3_821_079_552);
        // Pythia-160M and 1B (GPT-NeoX): a quarter of each head rotated, parallel residual, biases; the Pythia
        // paper's 162,322,944 and 1,011,781,632 parameters.
        let pythia = |hidden: u64, layers: u64, heads: u64| {
            format!(
                r#"{{"architectures": ["GPTNeoXForCausalLM"], "hidden_act": "gelu", "hidden_size": {hidden},
                "intermediate_size": {}, "max_position_embeddings": 2048, "model_type": "gpt_neox",
                "num_attention_heads": {heads}, "num_hidden_layers": {layers}, "rotary_pct": 0.25,
                "use_parallel_residual": true, "vocab_size": 50304}}"#,
                4 * hidden
            )
        };
        let (p160, _) = hf_config(&pythia(768, 12, 12)).unwrap();
        assert_eq!((p160.family, p160.rotary_dims), (Family::GptNeox, 16));
        assert!(p160.parallel_residual && p160.bias && !p160.tie_embeddings);
        assert_eq!(p160.n_params(), 162_322_944);
        let (p1b, _) = hf_config(&pythia(2048, 16, 8)).unwrap();
        assert_eq!((p1b.rotary_dims, p1b.n_params()), (64, 1_011_781_632));
        let e = hf_config(&pythia(768, 12, 12).replace("\"gelu\"", "\"gelu_new\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt_neox with hidden_act \"gelu_new\""), "{e}");
        let e = hf_config(&pythia(768, 12, 12).replace("0.25", "0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rotary_pct (0) must be in (0, 1]"), "{e}");
        // Mixtral-8x7B's config.json (abridged): 8 experts, 2 per token; its published 46,702,792,704.
        let mixtral = r#"{"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
            "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
            "output_router_logits": false, "router_aux_loss_coef": 0.02, "sliding_window": null,
            "tie_word_embeddings": false, "vocab_size": 32000}"#;
        let (mx, notes) = hf_config(mixtral).unwrap();
        assert_eq!(
            (mx.family, mx.n_experts, mx.experts_per_token),
            (Family::Mixtral, 8, 2)
        );
        assert_eq!(mx.n_params(), 46_702_792_704);
        assert!(
            notes.iter().any(|n| n.contains("routing assumed balanced")),
            "{notes:?}"
        );
        // With its auxiliary loss trained.
        assert!(!mx.router_aux_loss);
        let (mx, _) = hf_config(&mixtral.replace(
            "\"output_router_logits\": false",
            "\"output_router_logits\": true",
        ))
        .unwrap();
        assert!(mx.router_aux_loss);
        // Qwen1.5-MoE-A2.7B (qwen2_moe): 60 experts of 1408, 4 per token, a shared expert of 5632 with its gate,
        // q/k/v biases; its published 14,315,784,192.
        let qmoe = r#"{"architectures": ["Qwen2MoeForCausalLM"], "decoder_sparse_step": 1, "hidden_size": 2048,
            "intermediate_size": 5632, "max_position_embeddings": 8192, "model_type": "qwen2_moe",
            "moe_intermediate_size": 1408, "norm_topk_prob": false, "num_attention_heads": 16, "num_experts": 60,
            "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
            "shared_expert_intermediate_size": 5632, "tie_word_embeddings": false, "use_sliding_window": false,
            "vocab_size": 151936}"#;
        let (q, _) = hf_config(qmoe).unwrap();
        assert_eq!(
            (q.intermediate_size, q.shared_expert_size, q.n_experts),
            (1408, 5632, 60)
        );
        assert_eq!(q.n_params(), 14_315_784_192);
        let e =
            hf_config(&qmoe.replace("\"decoder_sparse_step\": 1", "\"decoder_sparse_step\": 2"))
                .unwrap_err()
                .to_string();
        assert!(e.contains("decoder_sparse_step"), "{e}");
        let e = hf_config(r#"{"model_type": "bert", "hidden_size": 8}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "model_type (\"bert\") is not one of: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, olmo2, \
                 phi3, gpt_neox, mixtral, qwen2_moe, olmoe"
            ),
            "{e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// URL state: the whole setup as a query string, so that a link reproduces a view.

/// Query keys and where they go in the setup JSON.
const QUERY_KEYS: &[(&str, &str, QueryKind)] = &[
    ("family", "model", QueryKind::Str),
    ("n_layer", "model", QueryKind::Num),
    ("n_head", "model", QueryKind::Num),
    ("n_kv_head", "model", QueryKind::Num),
    ("n_embd", "model", QueryKind::Num),
    ("block_size", "model", QueryKind::Num),
    ("vocab_size", "model", QueryKind::Num),
    ("bias", "model", QueryKind::Bool),
    ("dropout", "model", QueryKind::Num),
    ("intermediate_size", "model", QueryKind::Num),
    ("tie_embeddings", "model", QueryKind::Bool),
    ("head_dim", "model", QueryKind::Num),
    ("sliding_window", "model", QueryKind::Num),
    ("rotary_dims", "model", QueryKind::Num),
    ("parallel_residual", "model", QueryKind::Bool),
    ("n_experts", "model", QueryKind::Num),
    ("experts_per_token", "model", QueryKind::Num),
    ("shared_expert_size", "model", QueryKind::Num),
    ("norm_topk_prob", "model", QueryKind::Bool),
    ("router_aux_loss", "model", QueryKind::Bool),
    ("batch_size", "train", QueryKind::Num),
    ("seq_len", "train", QueryKind::Num),
    ("precision", "train", QueryKind::Str),
    ("optimizer", "train", QueryKind::Str),
    ("attention", "train", QueryKind::Str),
    ("checkpointing", "train", QueryKind::Bool),
    ("grad_accum_steps", "train", QueryKind::Num),
    ("grad_clip", "train", QueryKind::Num),
    ("zero_grad_set_to_none", "train", QueryKind::Bool),
    ("compile", "train", QueryKind::Bool),
    ("alloc_conf", "train", QueryKind::Str),
    // Fine-tuning: `lora=1` turns LoRA on (`lora=0` off, its fields then ignored: the page keeps them filled);
    // `lora_*` are `train.lora`'s fields (module lists comma-separated); the base's dtype and quantization are
    // empty for none.
    ("lora", "train", QueryKind::Lora),
    ("lora_r", LORA_SECTION, QueryKind::Num),
    ("lora_alpha", LORA_SECTION, QueryKind::Num),
    ("lora_dropout", LORA_SECTION, QueryKind::Num),
    ("lora_target_modules", LORA_SECTION, QueryKind::List),
    ("lora_modules_to_save", LORA_SECTION, QueryKind::List),
    ("base_dtype", "train", QueryKind::OptStr),
    ("quantization", "train", QueryKind::OptStr),
    ("double_quant", "train", QueryKind::Bool),
    ("memory_gib", "device", QueryKind::Num),
    ("compute_capability", "device", QueryKind::Num),
    ("sms", "device", QueryKind::Num),
];

/// The query keys that fill `train.lora` (named `lora_` + the field).
const LORA_SECTION: &str = "train.lora";

#[derive(Clone, Copy)]
enum QueryKind {
    Str,
    /// A string whose empty value means the field is not set (`base_dtype=`, `quantization=`).
    OptStr,
    Num,
    Bool,
    /// Comma-separated names (`lora_target_modules=q_proj,v_proj`), possibly none.
    List,
    /// `lora=1|0`: whether `train.lora` is set.
    Lora,
}

fn percent_decode(s: &str) -> Result<String, Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
                match byte {
                    Some(b) => out.push(b),
                    None => return Err(Error::invalid("URL", s, "has a malformed %-escape")),
                }
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| Error::invalid("URL", s, "is not UTF-8 after %-decoding"))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// URL parameters that belong to the page or the widget (which GPU preset is selected, the plot, ...), not to
/// the setup. Any other unknown key is an error.
pub const PAGE_KEYS: &[&str] = &[
    "gpu",
    "preset",
    "plot",
    "show",
    "lock",
    "theme",
    "__test_panic",
];

/// Reads a setup from a URL query (`?family=gpt2&n_layer=6&...`, with or without the `?`). Keys not given take
/// the same defaults as the setup JSON; `extra` receives the `PAGE_KEYS` untouched.
///
/// # Errors
/// An unknown key, a malformed escape or number, or any setup error, naming the key and value.
pub fn setup_from_query(query: &str, extra: &mut Vec<(String, String)>) -> Result<Setup, Error> {
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut v = serde_json::json!({"model": {}, "train": {}});
    // `train.lora`'s fields as they come, and the `lora` switch (absent: on when a `lora_` field is given).
    let mut lora = Map::new();
    let mut lora_on: Option<bool> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(k)?;
        let value = percent_decode(raw)?;
        if let Some((name, section, kind)) = QUERY_KEYS.iter().find(|(name, _, _)| *name == key) {
            let short = if *section == LORA_SECTION {
                &name["lora_".len()..]
            } else {
                name
            };
            if matches!(kind, QueryKind::OptStr) && value.is_empty() {
                continue;
            }
            let parsed = query_value(&format!("{section}.{short}"), *kind, value)?;
            if let QueryKind::Lora = kind {
                lora_on = parsed.as_bool();
            } else if *section == LORA_SECTION {
                lora.insert(short.to_string(), parsed);
            } else {
                if v.get(*section).is_none() {
                    v[*section] = serde_json::json!({});
                }
                v[*section][*name] = parsed;
            }
        } else if let Some((_, path, kind)) = PARALLEL_QUERY_KEYS.iter().find(|(n, _, _)| *n == key)
        {
            let parsed = query_value(&format!("train.parallel.{path}"), *kind, value)?;
            let mut at = &mut v["train"]["parallel"];
            for part in path.split('.') {
                if !at.is_object() {
                    *at = serde_json::json!({});
                }
                at = &mut at[part];
            }
            *at = parsed;
        } else if PAGE_KEYS.contains(&key.as_str()) {
            extra.push((key, value));
        } else {
            return Err(Error::UnknownField { field: key });
        }
    }
    if lora_on.unwrap_or(!lora.is_empty()) {
        v["train"]["lora"] = Value::Object(lora);
    }
    setup_from_value(&v)
}

/// The model fields a setup may leave out (absent: 0 or off): a query that names the family names the model, and
/// the base's values of these that it leaves out are dropped (`query_over`). The page clears the same fields
/// when it applies a model (www/main.js `OPTIONAL_MODEL_KNOBS`; a unit test ties the two).
pub const OPTIONAL_MODEL_KEYS: &[&str] = &[
    "bias",
    "head_dim",
    "sliding_window",
    "rotary_dims",
    "parallel_residual",
    "n_experts",
    "experts_per_token",
    "shared_expert_size",
    "norm_topk_prob",
    "router_aux_loss",
];

/// A link's query read over a base query, as the page reads its own links over the case it starts from: each
/// key the link gives replaces the base's (the link's pairs come last), the others keep the base's value. So
/// `batch_size=4` is the base at batch 4, and a link the page wrote (every field) is itself. Three keys say more
/// than their own value, as on the page:
/// - `family`: the link names the model, so the base's optional model fields (`OPTIONAL_MODEL_KEYS`) it leaves
///   out are dropped (a Phi-3 base's sliding window does not stay on a Llama link);
/// - `block_size` without `seq_len`: the run trains on whole blocks (the core's default), not on the base's
///   sequence length;
/// - a multi-GPU key (`parallel`, `gpus`, ...): the link says the whole multi-GPU group, so the base's others
///   are dropped.
///
/// Values are not read here (`setup_from_query` reads the result and names a bad one with the link's own text).
pub fn query_over(base: &str, link: &str) -> String {
    fn pairs(q: &str) -> Vec<(String, &str)> {
        q.strip_prefix('?')
            .unwrap_or(q)
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let k = p.split_once('=').map_or(p, |(k, _)| k);
                (percent_decode(k).unwrap_or_else(|_| k.to_string()), p)
            })
            .collect()
    }
    let is_parallel = |k: &str| PARALLEL_QUERY_KEYS.iter().any(|(n, _, _)| *n == k);
    let link = pairs(link);
    let names = |k: &str| link.iter().any(|(n, _)| n == k);
    let drop = |k: &str| {
        (names("family") && OPTIONAL_MODEL_KEYS.contains(&k))
            || (k == "seq_len" && names("block_size"))
            || (is_parallel(k) && link.iter().any(|(n, _)| is_parallel(n)))
    };
    // The base's pairs the link neither gives nor drops, then the link's, all of them in its order: a key it
    // gives twice is read as `setup_from_query` reads any query (the last one).
    pairs(base)
        .into_iter()
        .filter(|(k, _)| !names(k) && !drop(k))
        .chain(link.iter().cloned())
        .map(|(_, p)| p)
        .collect::<Vec<_>>()
        .join("&")
}

/// `train.parallel` in the URL: (query key, path under `train.parallel`, kind); absent on one GPU.
const PARALLEL_QUERY_KEYS: &[(&str, &str, QueryKind)] = &[
    ("parallel", "strategy", QueryKind::Str),
    ("gpus", "gpus", QueryKind::Num),
    ("tp", "tp", QueryKind::Num),
    ("sequence_parallel", "sequence_parallel", QueryKind::Bool),
    ("bucket_cap_mb", "bucket_cap_mb", QueryKind::Num),
    (
        "gradient_as_bucket_view",
        "gradient_as_bucket_view",
        QueryKind::Bool,
    ),
    ("static_graph", "static_graph", QueryKind::Bool),
    ("init_on_device", "init_on_device", QueryKind::Bool),
    (
        "reshard_after_forward",
        "reshard_after_forward",
        QueryKind::Bool,
    ),
    ("param_dtype", "mixed_precision.param_dtype", QueryKind::Str),
    (
        "reduce_dtype",
        "mixed_precision.reduce_dtype",
        QueryKind::Str,
    ),
    ("offload", "offload", QueryKind::Bool),
];

/// A query value as the setup JSON holds it; `field` names it in errors.
fn query_value(field: &str, kind: QueryKind, value: String) -> Result<Value, Error> {
    Ok(match kind {
        QueryKind::Str | QueryKind::OptStr => Value::String(value),
        QueryKind::List => Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(Value::from)
                .collect(),
        ),
        QueryKind::Bool | QueryKind::Lora => match value.as_str() {
            "1" | "true" => Value::Bool(true),
            "0" | "false" => Value::Bool(false),
            _ => {
                return Err(Error::invalid(
                    field,
                    format!("{value:?}"),
                    "must be 1 or 0",
                ))
            }
        },
        QueryKind::Num => value
            .parse::<u64>()
            .map(Value::from)
            .or_else(|_| value.parse::<i64>().map(Value::from))
            .or_else(|_| match value.parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(serde_json::json!(f)),
                _ => Err(()),
            })
            .map_err(|_| Error::invalid(field, format!("{value:?}"), "must be a number"))?,
    })
}

/// The URL query for a setup (without the `?`), every knob spelled out; `train.parallel`'s keys only beyond one
/// GPU, each only where the setup JSON writes it.
pub fn setup_to_query(s: &Setup) -> String {
    let v = setup_to_value(s);
    let mut query = String::new();
    let mut push = |name: &str, t: String| {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(name);
        query.push('=');
        query.push_str(&percent_encode(&t));
    };
    let lora = v["train"].get("lora");
    for (name, section, kind) in QUERY_KEYS {
        let x = if *section == LORA_SECTION {
            lora.and_then(|l| l.get(&name["lora_".len()..]))
        } else {
            v.get(*section).and_then(|o| o.get(*name))
        };
        let text = match (kind, x) {
            (QueryKind::Lora, _) => if lora.is_some() { "1" } else { "0" }.to_string(),
            // Spelled out empty, so that a preset's query resets them.
            (QueryKind::OptStr, None) => String::new(),
            (QueryKind::Bool, None) if *name == "double_quant" => "0".to_string(),
            (_, None) => continue,
            (kind, Some(x)) => query_text(*kind, x),
        };
        push(name, text);
    }
    if let Some(p) = v["train"].get("parallel") {
        for (name, path, kind) in PARALLEL_QUERY_KEYS {
            let x = path.split('.').try_fold(p, |at, part| at.get(part));
            if let Some(x) = x {
                push(name, query_text(*kind, x));
            }
        }
    }
    query
}

/// A setup JSON value as the URL spells it.
fn query_text(kind: QueryKind, x: &Value) -> String {
    match (kind, x) {
        (QueryKind::Bool, Value::Bool(b)) => if *b { "1" } else { "0" }.to_string(),
        (QueryKind::List, Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        (_, Value::String(s)) => s.clone(),
        (_, other) => other.to_string(),
    }
}

#[cfg(test)]
mod query_tests {
    use super::*;

    fn read(q: &str) -> Result<Setup, Error> {
        setup_from_query(q, &mut Vec::new())
    }

    /// A partial link is the base with what it names changed: `batch_size=4` over the founding case is the
    /// founding case at batch 4 (not the setup JSON's defaults: batch 12, fp32, eager), and a whole link (a
    /// preset's query, every field) is itself over any base.
    #[test]
    fn a_link_is_read_over_its_base() {
        let founding = crate::presets::founding();
        let base = setup_to_query(&founding);
        let mut at_4 = founding.clone();
        at_4.train.batch_size = 4;
        assert_eq!(read(&query_over(&base, "batch_size=4")).unwrap(), at_4);
        assert_eq!(
            read(&query_over(&base, "?batch_size=4&compile=0")).unwrap(),
            {
                let mut s = at_4.clone();
                s.train.compile = false;
                s
            }
        );
        for id in ["llama-3.1-8b", "phi-3-mini", "mixtral-8x7b", "gpt2"] {
            let s = crate::presets::model_preset(id).unwrap();
            assert_eq!(
                read(&query_over(&base, &setup_to_query(&s))).unwrap(),
                s,
                "{id}"
            );
        }
        // A value the link gets wrong is named with the link's own text.
        assert_eq!(
            read(&query_over(&base, "precision=fp8"))
                .unwrap_err()
                .to_string(),
            "train.precision (\"fp8\") is not one of: fp32, fp16-amp, bf16-amp, bf16"
        );
    }

    /// The keys that say more than their value: a family drops the base's optional model fields (Phi-3-mini's
    /// 2047-token window is not carried onto a Llama link), a block size without a sequence length trains on
    /// whole blocks, and a multi-GPU key replaces the base's whole multi-GPU group.
    #[test]
    fn family_block_size_and_parallel_keys_replace_what_they_imply() {
        let phi3 = crate::presets::model_preset("phi-3-mini").unwrap();
        assert_eq!(phi3.model.sliding_window, 2047);
        let llama = crate::presets::model_preset("llama-3.1-8b").unwrap();
        let over = query_over(&setup_to_query(&phi3), &setup_to_query(&llama));
        assert!(!over.contains("sliding_window"), "{over}");
        assert_eq!(read(&over).unwrap(), llama);
        // Without `family` the window stays: the link changes the Phi-3 model's depth only.
        let deeper = read(&query_over(&setup_to_query(&phi3), "n_layer=2")).unwrap();
        assert_eq!(deeper.model.sliding_window, phi3.model.sliding_window);
        assert_eq!(deeper.model.n_layer, 2);

        let base =
            "family=gpt2&n_layer=2&n_head=2&n_embd=64&block_size=512&vocab_size=65&seq_len=512";
        assert_eq!(
            query_over(base, "block_size=128"),
            "family=gpt2&n_layer=2&n_head=2&n_embd=64&vocab_size=65&block_size=128"
        );
        assert_eq!(
            read(&query_over(base, "block_size=128"))
                .unwrap()
                .train
                .seq_len,
            128
        );
        assert_eq!(
            query_over(base, "block_size=128&seq_len=64"),
            "family=gpt2&n_layer=2&n_head=2&n_embd=64&vocab_size=65&block_size=128&seq_len=64"
        );

        let sharded = format!("{base}&parallel=fsdp&gpus=8&offload=1&reshard_after_forward=0");
        assert_eq!(
            query_over(&sharded, "parallel=ddp&gpus=4"),
            format!("{base}&parallel=ddp&gpus=4")
        );
        // A link without a multi-GPU key keeps the base's group.
        assert_eq!(
            query_over(&sharded, "batch_size=2"),
            format!("{sharded}&batch_size=2")
        );
    }

    /// The page clears the same optional model fields when it applies a model (www/main.js), so a link reads
    /// the same on the page, in the widget's `state` and in `query_over`.
    #[test]
    fn the_page_clears_the_same_optional_model_fields() {
        let js = include_str!("../../../www/main.js");
        let start = js
            .find("const OPTIONAL_MODEL_KNOBS = [")
            .expect("main.js lists OPTIONAL_MODEL_KNOBS");
        let list = &js[start..];
        let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
        let names: Vec<&str> = list
            .split(',')
            .map(|n| n.trim().trim_matches('\''))
            .filter(|n| !n.is_empty())
            .collect();
        assert_eq!(names, OPTIONAL_MODEL_KEYS);
    }

    /// `train.parallel` in the URL: PyTorch's argument names as keys (`parallel` for the strategy), absent on
    /// one GPU, and back.
    #[test]
    fn query_carries_the_parallel_setup() {
        let base = "family=gpt2&n_layer=2&n_head=2&n_embd=64&block_size=64&vocab_size=65";
        let s = setup_from_query(
            &format!(
                "{base}&parallel=zero2&gpus=8&param_dtype=bf16&reduce_dtype=fp32&precision=fp32"
            ),
            &mut Vec::new(),
        )
        .unwrap();
        let p = &s.train.parallel;
        assert_eq!(p.strategy, crate::parallel::Strategy::Fsdp);
        assert_eq!((p.gpus, p.reshard_after_forward), (8, false));
        assert_eq!(p.param_dtype, Some(crate::parallel::Dtype::Bf16));
        let q = setup_to_query(&s);
        assert!(
            q.ends_with(
                "&parallel=fsdp&gpus=8&reshard_after_forward=0&param_dtype=bf16&reduce_dtype=fp32"
            ),
            "{q}"
        );
        assert_eq!(setup_from_query(&q, &mut Vec::new()).unwrap(), s);
        let one = setup_from_query(base, &mut Vec::new()).unwrap();
        assert!(!setup_to_query(&one).contains("gpus="));
        // Tensor parallelism (with sequence parallel) under FSDP2: `tp` and `sequence_parallel`.
        let llama = "family=llama&n_layer=2&n_head=4&n_kv_head=2&n_embd=64&intermediate_size=128&block_size=64\
                     &vocab_size=64";
        let tp = setup_from_query(
            &format!("{llama}&parallel=fsdp&gpus=8&tp=2&sequence_parallel=1"),
            &mut Vec::new(),
        )
        .unwrap();
        let p = &tp.train.parallel;
        assert_eq!((p.gpus, p.tp, p.sequence_parallel, p.dp()), (8, 2, true, 4));
        let q = setup_to_query(&tp);
        assert!(
            q.ends_with("&parallel=fsdp&gpus=8&tp=2&sequence_parallel=1&reshard_after_forward=1"),
            "{q}"
        );
        assert_eq!(setup_from_query(&q, &mut Vec::new()).unwrap(), tp);
        assert_eq!(
            setup_from_query(&format!("{base}&parallel=ddp&gpus=two"), &mut Vec::new())
                .unwrap_err()
                .to_string(),
            "train.parallel.gpus (\"two\") must be a number"
        );
    }

    #[test]
    fn query_round_trips_every_preset() {
        for p in crate::presets::MODEL_PRESETS {
            let s = (p.setup)();
            let q = setup_to_query(&s);
            let mut extra = Vec::new();
            let back = setup_from_query(&q, &mut extra).unwrap_or_else(|e| panic!("{}: {e}", p.id));
            assert_eq!(back, s, "{}: {q}", p.id);
            assert!(extra.is_empty());
        }
    }

    /// PYTORCH_CUDA_ALLOC_CONF in the URL: `alloc_conf=` with the variable's text, %-encoded; spelled out (empty
    /// for PyTorch's defaults) so that a preset's query resets it.
    #[test]
    fn query_carries_the_allocator_configuration() {
        let base = "family=gpt2&n_layer=2&n_head=2&n_embd=64&block_size=64&vocab_size=65";
        let s = setup_from_query(
            &format!("{base}&alloc_conf=expandable_segments%3ATrue%2Cmax_split_size_mb%3A128"),
            &mut Vec::new(),
        )
        .unwrap();
        assert!(s.train.alloc_conf.expandable_segments);
        assert_eq!(s.train.alloc_conf.max_split_size, Some(128 << 20));
        let q = setup_to_query(&s);
        assert!(
            q.contains("&alloc_conf=expandable_segments%3ATrue%2Cmax_split_size_mb%3A128&"),
            "{q}"
        );
        assert_eq!(setup_from_query(&q, &mut Vec::new()).unwrap(), s);
        let plain = setup_from_query(base, &mut Vec::new()).unwrap();
        assert_eq!(plain.train.alloc_conf, Default::default());
        assert!(setup_to_query(&plain).contains("&alloc_conf=&"));
        assert_eq!(
            setup_from_query(&format!("{base}&alloc_conf=max_split_size_mb:4"), &mut Vec::new())
                .unwrap_err()
                .to_string(),
            "train.alloc_conf (\"max_split_size_mb:4\") max_split_size_mb (4) must be at least 20: PyTorch's \
             minimum, the 20 MiB segments the large pool shares"
        );
    }

    /// Fine-tuning in the URL: `lora=1` with `train.lora`'s fields as `lora_*` (module lists comma-separated),
    /// `base_dtype`, `quantization` and `double_quant`; `lora=0` drops the LoRA fields the page keeps filled.
    #[test]
    fn query_carries_lora_and_the_base() {
        let base = "family=llama&n_layer=2&n_head=4&n_kv_head=2&n_embd=256&intermediate_size=512&block_size=128\
                    &vocab_size=1000&precision=bf16-amp";
        let q = format!(
            "{base}&lora=1&lora_r=16&lora_alpha=32&lora_dropout=0.05&lora_target_modules=q_proj%2Cv_proj\
             &lora_modules_to_save=lm_head&base_dtype=bf16&quantization=nf4&double_quant=1"
        );
        let s = setup_from_query(&q, &mut Vec::new()).unwrap();
        let l = s.train.lora.as_ref().unwrap();
        assert_eq!((l.r, l.alpha, l.dropout), (16, 32.0, 0.05));
        assert_eq!(l.targets.names(), ["q_proj", "v_proj"]);
        assert!(l.save_head && !l.save_embed);
        assert_eq!(s.train.base_dtype, Some(BaseDtype::Bf16));
        assert_eq!(
            s.train.quantization,
            Some(crate::finetune::Quantization::Nf4 { double_quant: true })
        );
        let back = setup_to_query(&s);
        assert!(
            back.contains("&lora=1&lora_r=16&lora_alpha=32.0&lora_dropout=0.05\
                           &lora_target_modules=q_proj%2Cv_proj&lora_modules_to_save=lm_head&base_dtype=bf16\
                           &quantization=nf4&double_quant=1&"),
            "{back}"
        );
        assert_eq!(setup_from_query(&back, &mut Vec::new()).unwrap(), s);
        // peft's defaults for what the link leaves out; all-linear and no modules to save.
        let s = setup_from_query(
            &format!("{base}&lora=1&lora_target_modules=all-linear&lora_modules_to_save="),
            &mut Vec::new(),
        )
        .unwrap();
        let l = s.train.lora.as_ref().unwrap();
        assert_eq!((l.r, l.targets), (8, Targets::ALL_LINEAR));
        assert_eq!(
            setup_from_query(&setup_to_query(&s), &mut Vec::new()).unwrap(),
            s
        );
        // Off: the fields are ignored, and the query says so (a preset's query resets the page's switch).
        let off = setup_from_query(&format!("{base}&lora=0&lora_r=16"), &mut Vec::new()).unwrap();
        assert_eq!(off.train.lora, None);
        let q = setup_to_query(&off);
        assert!(
            q.contains("&lora=0&base_dtype=&quantization=&double_quant=0&")
                && !q.contains("lora_r"),
            "{q}"
        );
        assert_eq!(
            setup_from_query(&format!("{base}&lora=1&lora_r=x"), &mut Vec::new())
                .unwrap_err()
                .to_string(),
            "train.lora.r (\"x\") must be a number"
        );
        assert_eq!(
            setup_from_query(&format!("{base}&lora=1&lora_target_modules=lm_head"), &mut Vec::new())
                .unwrap_err()
                .to_string(),
            "train.lora.target_modules (\"lm_head\") is not a Linear of a Hugging Face decoder layer vramfit \
             adapts; use \"all-linear\" or some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, \
             qkv_proj, gate_up_proj, query_key_value, dense, dense_h_to_4h, dense_4h_to_h, gate, \
             shared_expert_gate"
        );
    }

    #[test]
    fn query_errors_name_the_key() {
        let e = setup_from_query("family=gpt2&%3Cimg%20src=x", &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert_eq!(e, "unknown field \"<img src\"");
        let mut extra = Vec::new();
        let e = setup_from_query("family=gpt2&n_layer=abc", &mut extra)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "model.n_layer (\"abc\") must be a number");
        let e = setup_from_query("family=%ZZ", &mut extra)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "URL (%ZZ) has a malformed %-escape");
        let s = setup_from_query(
            "?family=gpt2&n_layer=2&n_head=2&n_embd=64&block_size=64&vocab_size=65&gpu=t4",
            &mut extra,
        )
        .unwrap();
        assert_eq!(s.model.n_layer, 2);
        assert_eq!(extra, vec![("gpu".to_string(), "t4".to_string())]);
    }
}

/// Training defaults for a model read from a Hugging Face config.json: batch 1 at up to 2048 tokens, bf16
/// autocast, fused AdamW.
pub fn hf_setup(m: ModelConfig) -> Setup {
    let seq = m.block_size.min(2048);
    let mut train = TrainConfig::defaults(1, seq);
    // Gemma 2 soft-caps its attention scores: transformers runs it with eager attention.
    if m.family == Family::Gemma2 {
        train.attention = Attention::Manual;
    }
    Setup {
        model: m,
        train,
        device: DeviceConfig::default(),
    }
}

/// Reads whatever a person pastes: a setup JSON (has "model"), a Hugging Face config.json, or a nanoGPT
/// config file. Returns the setup, notes on where values came from, and which kind it was.
///
/// # Errors
/// The reader's error for the kind the text looks like.
pub fn import_any(text: &str) -> Result<(Setup, Vec<String>, &'static str), Error> {
    if text.trim_start().starts_with('{') {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Parse {
            source: "pasted JSON".into(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        if v.get("model").is_some() {
            // The page keeps the GPU selected when a model comes in (issue 12): a pasted setup's own device is
            // read, checked and left out, which the person is told.
            let notes = match v.get("device") {
                Some(d) if !d.is_null() => vec![
                    "the pasted setup's \"device\" is not used here: the GPU selected above stays (choose it, or \
                     type its memory, to estimate against another)"
                        .to_string(),
                ],
                _ => vec![],
            };
            return Ok((setup_from_value(&v)?, notes, "setup"));
        }
        let (m, notes) = hf_config(text)?;
        return Ok((hf_setup(m), notes, "hf"));
    }
    let imp = nanogpt_config(text)?;
    let mut notes: Vec<String> = imp
        .provenance
        .iter()
        .map(|p| format!("{} = {} ({})", p.key, p.value, p.source))
        .collect();
    notes.extend(imp.notes);
    Ok((imp.setup, notes, "nanogpt"))
}
