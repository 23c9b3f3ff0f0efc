//! The one boundary with JavaScript. Everything crosses as a URL query string (the page's form state and its
//! URL are the same string) or as plain JS objects built with `serde_wasm_bindgen`. Every number a person sees
//! is formatted here; the page does no arithmetic.
//!
//! TypeScript view of what JS sees:
//! ```text
//! presets(): {models: {id, label}[], gpus: {id, label, memory_gib, compute_capability, sms, detail}[]}
//! preset_query(id: string): string                         // throws Error(message); the preset's own device
//! gpu_query(id: string): string                            // "memory_gib=..&compute_capability=.."
//! gpu_of_query(query: string): string | undefined          // the GPU preset with the query's device, if one
//! normalize_query(query: string): {query, extra: [key, value][]}   // validated, every knob spelled out
//! estimate(query: string): Estimate                         // see EstimateDto
//! advice(query: string): {suggestions: {id, change, saving, total, fits, query}[], largest_batch, largest_block}
//! draw_sweep(canvas, query, axis: "batch_size"|"block_size", dark: bool, scale: number): void
//! draw_fit_map(canvas, query, dark, scale): {batches: number[], blocks: number[]}
//! draw_timeline(canvas, query, dark, scale): void
//! draw_gpus(canvas, query, dark, scale): GpuPlan             // see GpuPlanDto; draws memory per GPU against GPUs
//! finetune_methods(query): Methods                          // see MethodsDto: full, LoRA, QLoRA side by side
//! finetune_query(query, method: "full"|"lora"|"qlora"): string   // the setup as that recipe (Method::apply)
//! sweep_csv(query, axis): string;  sweep_json(query, axis): string
//! import_config(text: string): {query, notes: string[], kind: "nanogpt"|"hf"|"setup"}
//! identify_gpu(description: string): string | undefined     // a GPU preset id, only when unambiguous
//! bench_estimate(query, n): number; bench_fit_map(query, n): number   // for scripts/bench-web
//! ```
//! The memory-snapshot reader and writer are a module of their own (`wasm_snapshot`), loaded when a file is
//! dropped or a predicted snapshot asked for, so that the first load does not carry them.

use plotters::prelude::IntoDrawingArea;
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind,
    FontTransform,
};
use plotters_canvas::CanvasBackend;
use serde::Serialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::CanvasRenderingContext2d;
use web_sys::HtmlCanvasElement;

use crate::advice;
use crate::gpus;
use crate::input::{self, setup_from_query, setup_to_query};
use crate::methods;
use crate::page::Page;
use crate::plot;
use crate::presets;
use crate::report::{fmt_bytes, fmt_memory, fmt_within};
use crate::sweep::{self, Axis};
use crate::Setup;

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn to_js<T: Serialize>(v: &T) -> Result<JsValue, JsError> {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(js_err)
}

fn setup_of(query: &str) -> Result<Setup, JsError> {
    let mut extra = Vec::new();
    let s = setup_from_query(query, &mut extra).map_err(js_err)?;
    s.validate().map_err(js_err)?;
    Ok(s)
}

thread_local! {
    /// The view of the last query asked about, with the estimates made for it: one redraw asks for the estimate,
    /// the advice, both sweeps, the fit map and the timeline of one query in separate calls, and they share
    /// their estimates (`page`). A new query starts afresh.
    static PAGE: std::cell::RefCell<Option<Held>> = const { std::cell::RefCell::new(None) };
}

/// A query's view, out of `PAGE` while a call uses it (`Held::of`, then `keep`): a panic aborts the call, and
/// then leaves no view behind rather than one still borrowed.
struct Held {
    query: String,
    page: Page,
}

impl Held {
    /// The held view if it is `query`'s, else a new one.
    fn of(query: &str) -> Result<Held, JsError> {
        match PAGE.with(|p| p.borrow_mut().take()) {
            Some(held) if held.query == query => Ok(held),
            _ => Ok(Held {
                query: query.to_string(),
                page: Page::new(setup_of(query)?),
            }),
        }
    }

    fn keep(self) {
        PAGE.with(|p| *p.borrow_mut() = Some(self));
    }
}

#[derive(Serialize)]
struct PresetDto {
    id: &'static str,
    label: &'static str,
}

#[derive(Serialize)]
struct GpuDto {
    id: &'static str,
    label: &'static str,
    memory_gib: f64,
    compute_capability: f64,
    /// Streaming multiprocessors (AMD: compute units); absent where the preset stands for several chips.
    sms: Option<u32>,
    /// For people: "46 SMs, compute capability 8.9".
    detail: String,
}

fn gpu_detail(g: &presets::GpuPreset) -> String {
    let units = match g.sms {
        Some(n) => format!("{n} {}", g.vendor.sm_name()),
        None => format!("{} vary by chip", g.vendor.sm_name()),
    };
    let cc = g.sm as f64 / 10.0;
    if g.vendor.has_compute_capability() {
        format!("{units}, compute capability {cc:.1}")
    } else {
        format!("{units}; compute capability {cc:.1} stands in for its kernels")
    }
}

#[derive(Serialize)]
struct PresetsDto {
    models: Vec<PresetDto>,
    gpus: Vec<GpuDto>,
}

#[wasm_bindgen]
pub fn presets() -> Result<JsValue, JsError> {
    to_js(&PresetsDto {
        models: presets::MODEL_PRESETS
            .iter()
            .map(|p| PresetDto {
                id: p.id,
                label: p.label,
            })
            .collect(),
        gpus: presets::GPU_PRESETS
            .iter()
            .map(|g| GpuDto {
                id: g.id,
                label: g.label,
                memory_gib: g.memory_bytes as f64 / (1u64 << 30) as f64,
                compute_capability: g.sm as f64 / 10.0,
                sms: g.sms,
                detail: gpu_detail(g),
            })
            .collect(),
    })
}

/// The preset's setup as a query, with the preset's own device (an RTX 4070 for nanogpt-30m, an 80 GiB sm_90
/// device for the others), for a view that has no GPU yet. A view that has one keeps it: the page applies only
/// the model and training keys, the widget its `gpu`.
#[wasm_bindgen]
pub fn preset_query(id: &str) -> Result<String, JsError> {
    let s =
        presets::model_preset(id).ok_or_else(|| JsError::new(&format!("unknown preset {id:?}")))?;
    Ok(setup_to_query(&s))
}

#[wasm_bindgen]
pub fn gpu_query(id: &str) -> Result<String, JsError> {
    let g = presets::gpu(id).ok_or_else(|| JsError::new(&format!("unknown GPU {id:?}")))?;
    Ok(format!(
        "memory_gib={}&compute_capability={}&sms={}",
        g.memory_bytes as f64 / (1u64 << 30) as f64,
        g.sm as f64 / 10.0,
        g.device().sms
    ))
}

/// The GPU preset whose memory and compute capability the query's device has, when exactly one has them (see
/// `presets::gpu_with`), and its SM count; nothing for a query that does not read.
#[wasm_bindgen]
pub fn gpu_of_query(query: &str) -> Option<String> {
    let s = setup_from_query(query, &mut Vec::new()).ok()?;
    presets::gpu_with(s.device.memory_bytes, s.device.sm)
        .filter(|g| g.device().sms == s.device.sms)
        .map(|g| g.id.to_string())
}

/// The model preset whose values the query holds (its model and training; the GPU and the GPUs group are the
/// page's own: `presets::preset_with`), for the page's preset box; nothing for a query that does not read or
/// is no preset's.
#[wasm_bindgen]
pub fn preset_of_query(query: &str) -> Option<String> {
    let s = setup_from_query(query, &mut Vec::new()).ok()?;
    presets::preset_with(&s).map(str::to_string)
}

#[derive(Serialize)]
struct NormalizedDto {
    query: String,
    extra: Vec<(String, String)>,
}

#[wasm_bindgen]
pub fn normalize_query(query: &str) -> Result<JsValue, JsError> {
    let mut extra = Vec::new();
    let s = setup_from_query(query, &mut extra).map_err(js_err)?;
    s.validate().map_err(js_err)?;
    to_js(&NormalizedDto {
        query: setup_to_query(&s),
        extra,
    })
}

/// A link's query read over a base query, as the page reads its links over the case it starts from and the
/// widget its `state` over its source (`input::query_over`).
#[wasm_bindgen]
pub fn query_over(base: &str, link: &str) -> String {
    input::query_over(base, link)
}

#[derive(Serialize)]
struct ComponentDto {
    name: &'static str,
    what: &'static str,
    bytes: u64,
    text: String,
    /// Width in the stacked bar, as a CSS percentage ("12.3%").
    width: String,
}

#[derive(Serialize)]
struct StageDto {
    label: String,
    text: String,
}

#[derive(Serialize)]
struct EstimateDto {
    n_params: String,
    peak_allocated: String,
    peak_allocated_bytes: u64,
    peak_reserved: String,
    peak_reserved_bytes: u64,
    device_total: String,
    device_range: String,
    gpu_memory: String,
    /// "fits", "does not fit" or "" (no GPU memory given).
    verdict: String,
    fits: Option<bool>,
    headroom: String,
    peak_phase: String,
    peak_op: &'static str,
    sentence: String,
    per_block: String,
    /// "" on one GPU; else what every figure is, e.g. "per GPU: rank 0 of 8, FSDP2 (ZeRO-3)".
    scope: String,
    components: Vec<ComponentDto>,
    timeline: Vec<StageDto>,
    notes: Vec<String>,
    /// Eager and compiled side by side; absent where the other mode is not modelled.
    compare: Option<CompareDto>,
}

#[derive(Serialize)]
struct CompareDto {
    eager: String,
    compiled: String,
    /// Which of the two the setup is.
    current: &'static str,
    sentence: String,
}

#[wasm_bindgen]
pub fn estimate(query: &str) -> Result<JsValue, JsError> {
    let mut held = Held::of(query)?;
    let p = &mut held.page;
    let got = p
        .estimate()
        .and_then(|r| Ok((p.compile_comparison(&r)?, r)));
    let s = p.setup().clone();
    held.keep();
    let (compare, r) = got.map_err(js_err)?;
    let total = r.peak_allocated_bytes.max(1);
    let components = r
        .components
        .items_for_setup(&s)
        .into_iter()
        .filter(|(_, b, _)| *b > 0)
        .map(|(name, bytes, what)| ComponentDto {
            name,
            what,
            bytes,
            text: fmt_bytes(bytes),
            width: format!("{:.2}%", bytes as f64 * 100.0 / total as f64),
        })
        .collect();
    let mem = s.device.memory_bytes;
    let (verdict, headroom) = match r.verdict() {
        Some((verdict, margin)) => (verdict.to_string(), margin),
        None => (String::new(), String::new()),
    };
    to_js(&EstimateDto {
        n_params: format!("{:.1}M parameters", r.n_params as f64 / 1e6),
        peak_allocated: fmt_bytes(r.peak_allocated_bytes),
        peak_allocated_bytes: r.peak_allocated_bytes,
        peak_reserved: fmt_bytes(r.peak_reserved_bytes),
        peak_reserved_bytes: r.peak_reserved_bytes,
        device_total: fmt_within(r.device_total_bytes, r.device_memory_bytes),
        device_range: format!(
            "{} to {}",
            fmt_bytes(r.device_total_range_bytes.0),
            fmt_bytes(r.device_total_range_bytes.1)
        ),
        gpu_memory: if mem > 0 {
            fmt_memory(mem)
        } else {
            String::new()
        },
        verdict,
        fits: r.fits,
        headroom,
        peak_phase: r.peak_phase.clone(),
        peak_op: r.peak_op,
        sentence: r.largest_item_sentence(&s),
        per_block: fmt_bytes(r.activations_per_block_bytes),
        scope: scope(&s),
        components,
        timeline: r
            .timeline
            .iter()
            .map(|t| StageDto {
                label: format!("step {} {}", t.step, t.stage),
                text: fmt_bytes(t.peak_bytes),
            })
            .collect(),
        notes: r.notes.clone(),
        compare: compare.map(|c| CompareDto {
            eager: fmt_bytes(c.eager_peak_bytes),
            compiled: fmt_bytes(c.compiled_peak_bytes),
            current: if s.train.compile { "compiled" } else { "eager" },
            sentence: c.sentence,
        }),
    })
}

/// What the figures are for, beyond one GPU.
fn scope(s: &Setup) -> String {
    let p = &s.train.parallel;
    if p.is_single() {
        return String::new();
    }
    let mut name = match (p.strategy, p.zero_name()) {
        (_, Some(z)) => format!(
            "FSDP2 ({z}{})",
            if p.offload { ", CPU offload" } else { "" }
        ),
        (crate::parallel::Strategy::Ddp, _) => "DDP".to_string(),
        _ => String::new(),
    };
    if let Some(t) = p.tp_name() {
        name = if name.is_empty() {
            t
        } else {
            format!("{name}, {t}")
        };
    }
    format!("per GPU: rank 0 of {}, {name}", p.gpus)
}

#[derive(Serialize)]
struct SuggestionDto {
    id: &'static str,
    change: String,
    saving: String,
    total: String,
    fits: bool,
    query: String,
}

#[derive(Serialize)]
struct AdviceDto {
    suggestions: Vec<SuggestionDto>,
    largest_batch: String,
    largest_block: String,
}

#[wasm_bindgen]
pub fn advice(query: &str) -> Result<JsValue, JsError> {
    let mut held = Held::of(query)?;
    let p = &mut held.page;
    let got = p
        .suggestions()
        .and_then(|sug| Ok((sug, p.largest_that_fit()?)));
    let memory_bytes = p.setup().device.memory_bytes;
    held.keep();
    let (sug, (batch, block)) = got.map_err(js_err)?;
    let say = |v: Option<u64>, tried: u64| advice::largest_text(v, tried, memory_bytes);
    to_js(&AdviceDto {
        suggestions: sug
            .into_iter()
            .map(|x| SuggestionDto {
                id: x.id,
                change: x.change,
                saving: fmt_bytes(x.saving_bytes),
                total: fmt_bytes(x.device_total_bytes),
                fits: x.fits,
                query: setup_to_query(&x.setup),
            })
            .collect(),
        largest_batch: say(batch, advice::LARGEST_BATCH_TRIED),
        largest_block: say(block, advice::LARGEST_BLOCK_TRIED),
    })
}

#[derive(Serialize)]
struct MethodRowDto {
    /// "full", "lora", "qlora".
    id: &'static str,
    label: &'static str,
    /// The recipe in a few words (`methods::recipe_detail`): its rank and base.
    detail: String,
    /// Why the recipe is not estimated; the other fields are then empty.
    error: String,
    peak_allocated: String,
    device_total: String,
    trainable: String,
    /// "fits", "does not fit" or "" without a GPU.
    verdict: String,
    largest_batch: String,
    /// The recipe's setup, to apply.
    query: String,
    current: bool,
}

#[derive(Serialize)]
struct MethodsDto {
    rows: Vec<MethodRowDto>,
    advice: String,
    /// The advised setup ("" where nothing changes).
    advised_query: String,
}

/// `query`'s setup turned into a fine-tuning recipe (`finetune::Method::apply`): the widget's `finetune`
/// attribute.
#[wasm_bindgen]
pub fn finetune_query(query: &str, method: &str) -> Result<String, JsError> {
    let m = crate::finetune::Method::parse(method, "finetune").map_err(js_err)?;
    Ok(setup_to_query(&m.apply(&setup_of(query)?)))
}

/// Full fine-tuning, LoRA and QLoRA side by side (`methods::compare`) with the advice.
#[wasm_bindgen]
pub fn finetune_methods(query: &str) -> Result<JsValue, JsError> {
    let mut held = Held::of(query)?;
    let got = held.page.methods();
    let current = crate::finetune::Method::of(held.page.setup());
    let memory_bytes = held.page.setup().device.memory_bytes;
    held.keep();
    let m = got.map_err(js_err)?;
    let rows = m
        .rows
        .iter()
        .map(|r| {
            let ok = r.error.is_none();
            let text = |b: u64| {
                if ok {
                    fmt_within(b, memory_bytes)
                } else {
                    String::new()
                }
            };
            MethodRowDto {
                id: r.method.name(),
                label: methods::label(r.method),
                detail: methods::recipe_detail(&r.setup),
                error: r.error.clone().unwrap_or_default(),
                peak_allocated: text(r.peak_allocated_bytes),
                device_total: text(r.device_total_bytes),
                trainable: format!("{:.1}M", r.trainable_params as f64 / 1e6),
                verdict: match r.fits {
                    Some(true) => "fits".into(),
                    Some(false) => "does not fit".into(),
                    None => String::new(),
                },
                largest_batch: match (ok, memory_bytes, r.largest_batch) {
                    (false, ..) => String::new(),
                    (_, 0, _) => "choose a GPU".into(),
                    (_, _, Some(b)) if b >= methods::MAX_BATCH_SEARCHED => format!("{b} or more"),
                    (_, _, Some(b)) => b.to_string(),
                    (_, _, None) => "none: even 1 does not fit".into(),
                },
                query: setup_to_query(&r.setup),
                current: r.method == current,
            }
        })
        .collect();
    to_js(&MethodsDto {
        rows,
        advice: m.advice,
        advised_query: m.advised.as_ref().map(setup_to_query).unwrap_or_default(),
    })
}

/// plotters-canvas with text measured by the canvas itself (`measureText`). plotters' own web font measurement
/// inserts a `<span style=...>` into the page, which the page's Content-Security-Policy forbids (and which
/// costs a layout per label).
struct Canvas {
    inner: CanvasBackend,
    context: CanvasRenderingContext2d,
}

type DrawResult<E> = Result<(), DrawingErrorKind<E>>;

impl DrawingBackend for Canvas {
    type ErrorType = <CanvasBackend as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> DrawResult<Self::ErrorType> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> DrawResult<Self::ErrorType> {
        self.inner.present()
    }
    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_path(path, style)
    }
    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.fill_polygon(vert, style)
    }
    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> DrawResult<Self::ErrorType> {
        self.inner.draw_text(text, style, pos)
    }
    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        self.context.set_font(&format!(
            "{} {}px {}",
            style.style().as_str(),
            style.size(),
            style.family().as_str()
        ));
        let width = self
            .context
            .measure_text(text)
            .map(|m| m.width())
            .unwrap_or(style.size() * 0.6 * text.len() as f64);
        let (w, h) = (width.ceil() as u32, style.size().ceil() as u32);
        Ok(match style.transform() {
            FontTransform::Rotate90 | FontTransform::Rotate270 => (h, w),
            _ => (w, h),
        })
    }
}

fn canvas_root(
    canvas: HtmlCanvasElement,
) -> Result<plotters::drawing::DrawingArea<Canvas, plotters::coord::Shift>, JsError> {
    let no_context = || JsError::new("canvas has no 2D context");
    let context = canvas
        .get_context("2d")
        .ok()
        .flatten()
        .and_then(|c| c.dyn_into::<CanvasRenderingContext2d>().ok())
        .ok_or_else(no_context)?;
    let inner = CanvasBackend::with_canvas_object(canvas).ok_or_else(no_context)?;
    Ok(Canvas { inner, context }.into_drawing_area())
}

fn theme(dark: bool) -> &'static plot::Theme {
    if dark {
        &plot::DARK
    } else {
        &plot::LIGHT
    }
}

/// The query's setup and its sweep along `axis` as the page plots it (the query's errors first, then the
/// axis's).
fn sweep_points(query: &str, axis: &str) -> Result<(Setup, Axis, Vec<sweep::Point>), JsError> {
    let mut held = Held::of(query)?;
    let got = Axis::parse(axis).and_then(|axis| Ok((axis, held.page.sweep(axis)?)));
    let s = held.page.setup().clone();
    held.keep();
    let (axis, points) = got.map_err(js_err)?;
    Ok((s, axis, points))
}

#[wasm_bindgen]
pub fn draw_sweep(
    canvas: HtmlCanvasElement,
    query: &str,
    axis: &str,
    dark: bool,
    scale: f64,
) -> Result<(), JsError> {
    let (s, axis, points) = sweep_points(query, axis)?;
    let current = match axis {
        Axis::BatchSize => s.train.batch_size,
        Axis::BlockSize => s.model.block_size,
    };
    let cap = (s.device.memory_bytes > 0).then_some(s.device.memory_bytes);
    let root = canvas_root(canvas)?;
    plot::draw_sweep(
        &root,
        axis,
        &points,
        cap,
        current,
        theme(dark),
        scale.clamp(0.5, 4.0),
    )
    .map_err(js_err)
}

#[derive(Serialize)]
struct FitMapDto {
    batches: Vec<u64>,
    blocks: Vec<u64>,
}

#[wasm_bindgen]
pub fn draw_fit_map(
    canvas: HtmlCanvasElement,
    query: &str,
    dark: bool,
    scale: f64,
) -> Result<JsValue, JsError> {
    let mut held = Held::of(query)?;
    let got = held.page.fit_map();
    let s = held.page.setup().clone();
    held.keep();
    let map = got.map_err(js_err)?;
    let root = canvas_root(canvas)?;
    plot::draw_fit_map(
        &root,
        &map,
        (s.train.batch_size, s.model.block_size),
        theme(dark),
        scale.clamp(0.5, 4.0),
    )
    .map_err(js_err)?;
    to_js(&FitMapDto {
        batches: map.batches,
        blocks: map.blocks,
    })
}

#[wasm_bindgen]
pub fn draw_timeline(
    canvas: HtmlCanvasElement,
    query: &str,
    dark: bool,
    scale: f64,
) -> Result<(), JsError> {
    let mut held = Held::of(query)?;
    let got = held.page.estimate();
    let s = held.page.setup().clone();
    held.keep();
    let r = got.map_err(js_err)?;
    let cap = (s.device.memory_bytes > 0).then_some(s.device.memory_bytes);
    let root = canvas_root(canvas)?;
    plot::draw_timeline(
        &root,
        &r.timeline,
        s.train.grad_accum_steps,
        cap,
        theme(dark),
        scale.clamp(0.5, 4.0),
    )
    .map_err(js_err)
}

#[derive(Serialize)]
struct GpuRowDto {
    id: &'static str,
    label: String,
    /// "12", or "none up to 4096", or "" (no GPU memory given, or not modelled: see `error`).
    fewest: String,
    /// On the device per GPU at the fewest, e.g. "71.2 GiB"; "" where none.
    per_gpu: String,
    /// Host memory each GPU's process pins under CPU offload, e.g. "526 GiB"; "" otherwise.
    host: String,
    /// The setup on the fewest GPUs, for "apply"; "" where none.
    query: String,
    /// Why the row has no figures, where it has none.
    error: String,
}

#[derive(Serialize)]
struct GpuPlanDto {
    rows: Vec<GpuRowDto>,
    /// The setup on one GPU, on the device ("" where not modelled).
    one_gpu: String,
    advice: String,
    /// The advised setup ("" where nothing is advised).
    advised_query: String,
    notes: Vec<String>,
}

/// Memory per GPU against the number of GPUs for each strategy (`gpus::plan`), drawn; returns the table of the
/// fewest GPUs that fit each and the advice.
#[wasm_bindgen]
pub fn draw_gpus(
    canvas: HtmlCanvasElement,
    query: &str,
    dark: bool,
    scale: f64,
) -> Result<JsValue, JsError> {
    let mut held = Held::of(query)?;
    let got = held.page.gpu_plan();
    let s = held.page.setup().clone();
    held.keep();
    let plan = got.map_err(js_err)?;
    let p = &s.train.parallel;
    let current = gpus::Way::of(p).and_then(|way| {
        plan.rows
            .iter()
            .find(|r| r.way == way)
            .and_then(|r| r.points.iter().find(|pt| pt.0 == p.gpus))
            .copied()
    });
    let root = canvas_root(canvas)?;
    plot::draw_gpus(&root, &plan, current, theme(dark), scale.clamp(0.5, 4.0)).map_err(js_err)?;
    let rows = plan
        .rows
        .iter()
        .map(|r| {
            let (fewest, per_gpu, host, query) = match (&r.fewest, plan.budget_bytes, &r.error) {
                (_, _, Some(_)) | (_, 0, _) => Default::default(),
                (Some(f), budget, _) => (
                    f.gpus.to_string(),
                    fmt_within(f.device_total_bytes, budget),
                    f.host_bytes.map(fmt_bytes).unwrap_or_default(),
                    setup_to_query(&f.setup),
                ),
                (None, ..) => (
                    format!("none up to {}", gpus::MAX_GPUS_SEARCHED),
                    String::new(),
                    String::new(),
                    String::new(),
                ),
            };
            GpuRowDto {
                id: r.way.id(),
                label: r.label.clone(),
                fewest,
                per_gpu,
                host,
                query,
                error: r.error.clone().unwrap_or_default(),
            }
        })
        .collect();
    to_js(&GpuPlanDto {
        rows,
        one_gpu: plan.one_gpu_bytes.map(fmt_bytes).unwrap_or_default(),
        advice: plan.advice,
        advised_query: plan
            .advised
            .as_ref()
            .map(setup_to_query)
            .unwrap_or_default(),
        notes: plan.notes,
    })
}

#[wasm_bindgen]
pub fn sweep_csv(query: &str, axis: &str) -> Result<String, JsError> {
    let (_, axis, points) = sweep_points(query, axis)?;
    Ok(sweep::to_csv(axis, &points))
}

#[wasm_bindgen]
pub fn sweep_json(query: &str, axis: &str) -> Result<String, JsError> {
    let (s, axis, points) = sweep_points(query, axis)?;
    serde_json::to_string_pretty(&serde_json::json!({"axis": axis.name(), "setup": input::setup_to_value(&s), "points": points}))
        .map_err(js_err)
}

#[derive(Serialize)]
struct ImportDto {
    query: String,
    notes: Vec<String>,
    kind: &'static str,
}

/// Reads pasted or dropped text: a setup JSON, a Hugging Face config.json, or a nanoGPT config file.
#[wasm_bindgen]
pub fn import_config(text: &str) -> Result<JsValue, JsError> {
    let (setup, notes, kind) = input::import_any(text).map_err(js_err)?;
    setup.validate().map_err(js_err)?;
    to_js(&ImportDto {
        query: setup_to_query(&setup),
        notes,
        kind,
    })
}

#[wasm_bindgen]
pub fn identify_gpu(description: &str) -> Option<String> {
    presets::identify_gpu(description).map(str::to_string)
}

/// Runs `estimate` n times (for scripts/bench-web); returns the last peak so the work is not optimised away.
#[wasm_bindgen]
pub fn bench_estimate(query: &str, n: u32) -> Result<f64, JsError> {
    let s = setup_of(query)?;
    let mut last = 0;
    for _ in 0..n {
        last = crate::estimate_peak(&s)
            .map_err(js_err)?
            .peak_allocated_bytes;
    }
    Ok(last as f64)
}

/// Builds a 64 x 64 fit map n times (batch 1..=64, block 64..=4096 in steps of 64).
#[wasm_bindgen]
pub fn bench_fit_map(query: &str, n: u32) -> Result<f64, JsError> {
    let mut s = setup_of(query)?;
    s.model.block_size = s.model.block_size.max(4096);
    let batches: Vec<u64> = (1..=64).collect();
    let blocks: Vec<u64> = (1..=64).map(|i| i * 64).collect();
    let mut fitting = 0;
    for _ in 0..n {
        let m =
            sweep::fit_map(&s, &batches, &blocks, s.device.memory_bytes.max(1)).map_err(js_err)?;
        fitting = m.fits.iter().flatten().filter(|f| **f).count();
    }
    Ok(fitting as f64)
}

/// Bytes for people (binary units), for numbers the page gets from the browser (WebGPU limits).
#[wasm_bindgen]
pub fn format_bytes(bytes: f64) -> String {
    if bytes.is_finite() && bytes >= 0.0 {
        fmt_bytes(bytes as u64)
    } else {
        "(not given)".to_string()
    }
}

/// The message of the last panic, kept by the panic hook. A panic aborts the call (the release build uses
/// `panic = "abort"`, so JS sees a `RuntimeError`); the page then asks for this message and shows it as an
/// internal error while keeping its last good view.
static LAST_PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = info.to_string();
        }
    }));
}

#[wasm_bindgen]
pub fn last_panic() -> String {
    LAST_PANIC.lock().map(|m| m.clone()).unwrap_or_default()
}

/// Test-only: panics on purpose so that the browser tests can check the page's internal-error path. No input a
/// person gives reaches it; the page calls it only for the `__test_panic` URL parameter.
#[wasm_bindgen]
pub fn __test_panic() {
    panic!("deliberate panic (test-only export)");
}
