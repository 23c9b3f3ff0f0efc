//! The JavaScript boundary, in a real browser (wasm-bindgen-test in headless Chromium): good input round-trips,
//! bad input throws an Error carrying the core's message.
#![cfg(target_arch = "wasm32")]

use wasm_bindgen::JsValue;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn get(v: &JsValue, key: &str) -> JsValue {
    js_sys::Reflect::get(v, &JsValue::from_str(key)).unwrap()
}

fn message(e: JsValue) -> String {
    get(&e, "message").as_string().unwrap()
}

/// Calls an export that returns `Result<_, JsError>` and gives back the thrown Error's message.
macro_rules! check_err {
    ($call:expr, $expected:expr) => {{
        let err = $call.err().expect("an error");
        assert_eq!(message(JsValue::from(err)), $expected);
    }};
}

#[wasm_bindgen_test]
fn preset_query_estimates_the_founding_case() {
    let q = vramfit::wasm::preset_query("nanogpt-30m").unwrap();
    assert!(
        q.contains("n_embd=384") && q.contains("batch_size=16"),
        "{q}"
    );
    let est = vramfit::wasm::estimate(&q).unwrap();
    let bytes = get(&est, "peak_allocated_bytes").as_f64().unwrap() as u64;
    let setup = vramfit::presets::founding();
    assert_eq!(
        bytes,
        vramfit::estimate(&setup).unwrap().peak_allocated_bytes
    );
    assert_eq!(get(&est, "verdict").as_string().unwrap(), "fits");
}

#[wasm_bindgen_test]
fn normalize_query_spells_out_every_knob_and_keeps_page_keys() {
    let n = vramfit::wasm::normalize_query(
        "family=gpt2&n_layer=2&n_head=2&n_embd=64&block_size=64&vocab_size=65&gpu=t4",
    )
    .unwrap();
    let q = get(&n, "query").as_string().unwrap();
    assert!(
        q.contains("precision=bf16-amp") && q.contains("seq_len=64"),
        "{q}"
    );
    let extra = js_sys::Array::from(&get(&n, "extra"));
    assert_eq!(extra.length(), 1);
}

#[wasm_bindgen_test]
fn bad_input_throws_the_core_message() {
    check_err!(
        vramfit::wasm::estimate(
            "family=gpt2&n_layer=0&n_head=6&n_embd=384&block_size=64&vocab_size=65"
        ),
        "model.n_layer (0) must be at least 1"
    );
    check_err!(
        vramfit::wasm::estimate("family=gpt2&n_layer=NaN"),
        "model.n_layer (\"NaN\") must be a number"
    );
    check_err!(
        vramfit::wasm::estimate("family=gpt2&n_layer=Infinity"),
        "model.n_layer (\"Infinity\") must be a number"
    );
    check_err!(
        vramfit::wasm::preset_query("nope"),
        "unknown preset \"nope\""
    );
    check_err!(vramfit::wasm::import_config("def f():\n  pass\n"), "nanoGPT config, line 1: not an assignment, import or comment: \"def f():\"; is this a nanoGPT config file?");
}

/// PYTORCH_CUDA_ALLOC_CONF crosses as `alloc_conf=` in the query: normalized to PyTorch's spelling, read from a
/// pasted setup JSON, and a value PyTorch refuses throws the core's message.
#[wasm_bindgen_test]
fn alloc_conf_crosses_in_the_query() {
    let base = "family=gpt2&n_layer=2&n_head=2&n_embd=64&block_size=64&vocab_size=65";
    let n = vramfit::wasm::normalize_query(&format!(
        "{base}&alloc_conf=garbage_collection_threshold%3A0.8%2C%20expandable_segments%3ATrue"
    ))
    .unwrap();
    let q = get(&n, "query").as_string().unwrap();
    assert!(
        q.contains("&alloc_conf=expandable_segments%3ATrue%2Cgarbage_collection_threshold%3A0.8&"),
        "{q}"
    );
    let r = vramfit::wasm::import_config(
        r#"{"model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 65}, "train": {"alloc_conf": "max_split_size_mb:256"}}"#,
    )
    .unwrap();
    assert!(get(&r, "query")
        .as_string()
        .unwrap()
        .contains("alloc_conf=max_split_size_mb%3A256"));
    check_err!(
        vramfit::wasm::estimate(&format!("{base}&alloc_conf=expandable_segments%3A1")),
        "train.alloc_conf (\"expandable_segments:1\") expandable_segments must be True or False, not \"1\""
    );
}

#[wasm_bindgen_test]
fn import_reads_nanogpt_and_hf_configs() {
    let r = vramfit::wasm::import_config(
        "dataset = 'shakespeare_char'\nbatch_size = 64\nblock_size = 256\n",
    )
    .unwrap();
    assert_eq!(get(&r, "kind").as_string().unwrap(), "nanogpt");
    assert!(get(&r, "query")
        .as_string()
        .unwrap()
        .contains("vocab_size=65"));
    let r = vramfit::wasm::import_config(r#"{"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}"#).unwrap();
    assert_eq!(get(&r, "kind").as_string().unwrap(), "hf");
    // An activation vramfit does not model is the core's message (the page's error box).
    check_err!(
        vramfit::wasm::import_config(r#"{"model_type": "qwen2", "hidden_act": "relu", "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1000}"#),
        "not modelled: qwen2 with hidden_act \"relu\": the activations vramfit models are silu, swish, gelu, \
         gelu_pytorch_tanh (one op that saves only its input)"
    );
}

/// The page's preset box: the preset whose values a query holds, on any GPU; none once a value departs or the
/// query does not read.
#[wasm_bindgen_test]
fn preset_of_query_names_the_preset_the_values_are() {
    use vramfit::wasm::{gpu_query, preset_of_query, preset_query};
    let q = preset_query("llama-3.2-1b").unwrap();
    assert_eq!(preset_of_query(&q).as_deref(), Some("llama-3.2-1b"));
    let model_and_training: Vec<&str> = q
        .split('&')
        .filter(|kv| {
            !["memory_gib=", "compute_capability=", "sms="]
                .iter()
                .any(|k| kv.starts_with(k))
        })
        .collect();
    let on_a_t4 = format!(
        "{}&{}&gpu=t4",
        model_and_training.join("&"),
        gpu_query("t4").unwrap()
    );
    assert_eq!(preset_of_query(&on_a_t4).as_deref(), Some("llama-3.2-1b"));
    assert_eq!(
        preset_of_query(&q.replace("batch_size=", "batch_size=1")),
        None
    );
    assert_eq!(preset_of_query("batch_size=zero"), None);
}

#[wasm_bindgen_test]
fn drawing_on_a_canvas_puts_pixels_on_it() {
    let doc = web_sys::window().unwrap().document().unwrap();
    let canvas: web_sys::HtmlCanvasElement =
        wasm_bindgen::JsCast::dyn_into(doc.create_element("canvas").unwrap()).unwrap();
    canvas.set_width(600);
    canvas.set_height(300);
    let q = vramfit::wasm::preset_query("nanogpt-30m").unwrap();
    vramfit::wasm::draw_sweep(canvas.clone(), &q, "batch_size", false, 1.0).unwrap();
    let ctx: web_sys::CanvasRenderingContext2d =
        wasm_bindgen::JsCast::dyn_into(canvas.get_context("2d").unwrap().unwrap()).unwrap();
    let data = ctx.get_image_data(0.0, 0.0, 600.0, 300.0).unwrap().data();
    let non_white = data
        .chunks(4)
        .filter(|p| p[0] < 250 || p[1] < 250 || p[2] < 250)
        .count();
    assert!(non_white > 10_000, "{non_white} drawn pixels");
    check_err!(
        vramfit::wasm::draw_sweep(canvas, &q, "depth", false, 1.0),
        "sweep axis (\"depth\") is not one of: batch_size, block_size"
    );
}

/// The GPU plan crosses as plain objects: a row per strategy with its fewest GPUs and a query that estimates to
/// the figure shown; a bad query throws the core's message.
#[wasm_bindgen_test]
fn gpu_plan_rows_carry_their_setup() {
    let doc = web_sys::window().unwrap().document().unwrap();
    let canvas: web_sys::HtmlCanvasElement =
        wasm_bindgen::JsCast::dyn_into(doc.create_element("canvas").unwrap()).unwrap();
    canvas.set_width(600);
    canvas.set_height(300);
    let q = format!(
        "{}&{}",
        vramfit::wasm::preset_query("llama-3.2-1b").unwrap(),
        vramfit::wasm::gpu_query("rtx-4070").unwrap()
    );
    let plan = vramfit::wasm::draw_gpus(canvas.clone(), &q, true, 1.0).unwrap();
    let rows = js_sys::Array::from(&get(&plan, "rows"));
    assert_eq!(rows.length(), 5);
    let z3 = rows.get(2);
    assert_eq!(get(&z3, "id").as_string().unwrap(), "zero3");
    let fewest = get(&z3, "fewest").as_string().unwrap();
    assert!(fewest.parse::<u64>().unwrap() > 1, "{fewest}");
    let e = vramfit::wasm::estimate(&get(&z3, "query").as_string().unwrap()).unwrap();
    assert_eq!(get(&e, "device_total"), get(&z3, "per_gpu"));
    assert!(get(&e, "scope")
        .as_string()
        .unwrap()
        .starts_with(&format!("per GPU: rank 0 of {fewest}, FSDP2 (ZeRO-3)")));
    assert!(get(&plan, "advice")
        .as_string()
        .unwrap()
        .starts_with("The fewest"));
    check_err!(
        vramfit::wasm::draw_gpus(
            canvas,
            &q.replace("batch_size=1&", "batch_size=0&"),
            false,
            1.0
        ),
        "train.batch_size (0) must be at least 1"
    );
}

/// Full fine-tuning, LoRA and QLoRA side by side across the boundary: each row's query is its recipe
/// (`finetune_query`), estimated to the row's figure; a wrong recipe name throws the core's message.
#[wasm_bindgen_test]
fn finetune_methods_rows_are_their_recipes() {
    let q = format!(
        "{}&{}",
        vramfit::wasm::preset_query("llama-3.2-1b").unwrap(),
        vramfit::wasm::gpu_query("rtx-4070").unwrap()
    );
    let m = vramfit::wasm::finetune_methods(&q).unwrap();
    let rows = js_sys::Array::from(&get(&m, "rows"));
    assert_eq!(rows.length(), 3);
    for (i, id) in ["full", "lora", "qlora"].into_iter().enumerate() {
        let r = rows.get(i as u32);
        assert_eq!(get(&r, "id").as_string().unwrap(), id);
        let query = get(&r, "query").as_string().unwrap();
        assert_eq!(query, vramfit::wasm::finetune_query(&q, id).unwrap());
        let e = vramfit::wasm::estimate(&query).unwrap();
        assert_eq!(get(&e, "device_total"), get(&r, "device_total"), "{id}");
    }
    assert!(get(&rows.get(0), "current").as_bool().unwrap());
    check_err!(
        vramfit::wasm::finetune_query(&q, "dora"),
        "finetune (\"dora\") is not one of: full, lora, qlora"
    );
}
