// vramfit's page: DOM work only. The form's state is a URL query string; Rust (pkg/vramfit.js) validates it,
// estimates, formats every number and draws the plots. Nothing here computes a byte.
import init, * as vf from './pkg/entry.js';

const $ = (id) => document.getElementById(id);
const KNOBS = ['family', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'intermediate_size', 'vocab_size', 'block_size',
  'bias', 'tie_embeddings', 'head_dim', 'sliding_window', 'rotary_dims', 'parallel_residual', 'n_experts',
  'experts_per_token', 'shared_expert_size', 'norm_topk_prob', 'router_aux_loss', 'dropout', 'batch_size', 'seq_len', 'precision', 'optimizer', 'attention',
  'compile', 'checkpointing', 'grad_accum_steps', 'grad_clip', 'zero_grad_set_to_none', 'alloc_conf', 'lora', 'lora_r',
  'lora_alpha', 'lora_dropout', 'lora_target_modules', 'lora_modules_to_save', 'base_dtype', 'quantization',
  'double_quant', 'memory_gib', 'compute_capability', 'sms'];
// Fields some families have: index.html's `data-families` on each field's box lists them ("hf": every family
// but gpt2). The others' fields are hidden and left out of the query.
function fieldFamilies(k) {
  const box = $(k).closest('[data-families]');
  return box ? box.dataset.families.split(' ') : null;
}
function fieldApplies(k, family) {
  const fams = fieldFamilies(k);
  return !fams || fams.includes(family) || (fams.includes('hf') && family !== 'gpt2');
}
// Fields that must hold a value: one left empty is sent empty, so that the core names it
// ("train.batch_size (\"\") must be a number") instead of the page estimating a default nobody sees (an empty batch
// size was batch 12, an empty memory 80 GiB). The other fields' empty box says its default (the placeholder).
const NEED_VALUE = ['n_layer', 'n_head', 'n_embd', 'intermediate_size', 'vocab_size', 'block_size', 'dropout', 'batch_size',
  'grad_accum_steps', 'grad_clip', 'n_experts', 'experts_per_token', 'memory_gib', 'compute_capability'];
// Model fields a setup may leave out (their default is 0, or off).
const OPTIONAL_MODEL_KNOBS = ['bias', 'head_dim', 'sliding_window', 'rotary_dims', 'parallel_residual', 'n_experts',
  'experts_per_token', 'shared_expert_size', 'norm_topk_prob', 'router_aux_loss'];
// More than one GPU (`train.parallel`): the strategy select is `parallel`; each other field's box says in
// `data-strategies` which strategies have it. One GPU leaves them all out of the query.
const PARALLEL_KNOBS = ['gpus', 'tp', 'sequence_parallel', 'reshard_after_forward', 'param_dtype', 'reduce_dtype', 'offload', 'bucket_cap_mb',
  'gradient_as_bucket_view', 'static_graph', 'init_on_device'];
// Their values on one GPU (and for a query that has no `parallel`): PyTorch's defaults, 8 GPUs when one is chosen.
const PARALLEL_DEFAULTS = { parallel: 'single', gpus: '8', tp: '1', sequence_parallel: false, reshard_after_forward: true, param_dtype: '', reduce_dtype: '',
  offload: false, bucket_cap_mb: '', gradient_as_bucket_view: false, static_graph: false, init_on_device: false };
const DEFAULT_PRESET = 'nanogpt-30m';
const DEFAULT_GPU = 'rtx-4070';
// The device's fields: they follow the GPU select, and nothing but the GPU (or a person typing) changes them.
const DEVICE_KEYS = ['memory_gib', 'compute_capability', 'sms'];

let lastGood = null; // the last query that estimated without error
let lastEstimate = null; // its estimate (the predicted peaks a dropped snapshot is compared with)
let userChoseGpu = false; // for WebGPU's guess, which never overrides a person's choice
const gpuDetails = new Map(); // GPU preset id -> "46 SMs, compute capability 8.9"

function dark() {
  return window.matchMedia('(prefers-color-scheme: dark)').matches;
}

function el(tag, text, attrs = {}) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function strategyApplies(k, strategy) {
  const box = $(k).closest('[data-strategies]');
  return !box || box.dataset.strategies.split(' ').includes(strategy);
}

function showStrategy() {
  const strategy = $('parallel').value;
  document.querySelectorAll('[data-strategies]').forEach((e) => {
    e.hidden = !strategyApplies(e.querySelector('input, select').id, strategy);
  });
}

function setField(k, v) {
  const input = $(k);
  if (input.type === 'checkbox') input.checked = v === true || v === '1' || v === 'true';
  else input.value = String(v);
}

// ---- form <-> query ------------------------------------------------------------------------------------------
function formQuery() {
  const p = new URLSearchParams();
  const family = $('family').value;
  for (const k of KNOBS) {
    if (!fieldApplies(k, family)) continue;
    const input = $(k);
    if (input.type === 'checkbox') p.set(k, input.checked ? '1' : '0');
    else if (input.value !== '' || NEED_VALUE.includes(k)) p.set(k, input.value);
  }
  const strategy = $('parallel').value;
  // One GPU has no `parallel` keys; tensor parallelism alone is strategy single with its tp (GPUs: tp).
  if (strategy !== 'single' || !['', '1'].includes($('tp').value)) {
    p.set('parallel', strategy);
    for (const k of PARALLEL_KNOBS) {
      if (!strategyApplies(k, strategy)) continue;
      const input = $(k);
      if (input.type === 'checkbox') p.set(k, input.checked ? '1' : '0');
      else if (input.value !== '') p.set(k, input.value);
    }
  }
  const gpu = $('gpu').value;
  if (gpu && gpu !== 'custom') p.set('gpu', gpu);
  return p.toString();
}

// `keepParallel`: a model (a preset, a pasted config) keeps the GPUs group as it is, as it keeps the GPU; any
// other query says the whole setup, so one without `parallel` is one GPU.
function applyQuery(query, keepParallel = false) {
  const p = new URLSearchParams(query);
  for (const k of KNOBS) {
    if (!p.has(k)) continue;
    const input = $(k);
    if (input.type === 'checkbox') input.checked = p.get(k) === '1' || p.get(k) === 'true';
    else input.value = p.get(k);
  }
  if (p.has('parallel') || !keepParallel) {
    for (const [k, v] of Object.entries(PARALLEL_DEFAULTS)) setField(k, p.has(k) ? p.get(k) : v);
    // The ZeRO names (and the records' `fsdp2`) are FSDP2 in the select: zero3 reshards after forward, zero2
    // does not (`parallel::Strategy::parse`).
    const zero = { zero3: true, zero2: false, fsdp2: null }[p.get('parallel')];
    if (zero !== undefined) {
      $('parallel').value = 'fsdp';
      if (zero !== null && !p.has('reshard_after_forward')) $('reshard_after_forward').checked = zero;
    }
  }
  if (p.has('gpu')) $('gpu').value = p.get('gpu');
  showFamily();
  showStrategy();
  syncSlider();
}

// Back or forward to one of the page's own URLs: the view it was. Those URLs leave out an empty field
// (PYTORCH_CUDA_ALLOC_CONF, the modules to save, a base quantized with none, the SM count, ...) and name no GPU
// preset for a device typed in: a field of the URL's family that it leaves out is emptied, and a URL without a
// GPU is a custom device, before the URL's values are applied. (Left as they were, the newer entry's values
// stayed in the form: back from a 4-bit base estimated the 4-bit base again, and wrote it into the older entry.)
function applyHistory(query) {
  const p = new URLSearchParams(query);
  const family = p.get('family') || $('family').value;
  for (const k of KNOBS) {
    if (p.has(k) || !fieldApplies(k, family) || $(k).type === 'checkbox') continue;
    $(k).value = '';
  }
  if (!p.has('gpu')) $('gpu').value = 'custom';
  applyQuery(query);
}

// A model (a preset or a pasted config) keeps the GPU: a preset's own device and a pasted setup's "device" are
// left out, so the selected GPU, or the memory and compute capability typed in, stay what the estimate uses.
// See: issue 12 (RTX 4070 selected, Llama-2-7B chosen: the list said RTX 4070, the estimate used 80 GiB).
function applyModel(query) {
  const p = new URLSearchParams(query);
  for (const k of [...DEVICE_KEYS, 'gpu']) p.delete(k);
  clearOptionalModel(p);
  applyQuery(p.toString(), true);
}

// LoRA ticked with the dropout box as the page starts it: the dropout of `vramfit --finetune lora` for this model
// (0 where peft's ParamWrapper adapts the fused experts, Mixtral's and OLMoE's, which takes no dropout; the box's
// 0.05 otherwise), so that ticking LoRA on those models estimates instead of naming the dropout as an error.
function recipeDropout() {
  const box = $('lora_dropout');
  if (box.value !== box.defaultValue) return;
  try {
    const form = new URLSearchParams(formQuery());
    form.set('lora', '0'); // the recipe's own adapters, not the boxes'
    const recipe = new URLSearchParams(vf.finetune_query(form.toString(), 'lora'));
    if (recipe.has('lora_dropout')) box.value = String(Number(recipe.get('lora_dropout')));
  } catch { /* a model LoRA is not modelled for: its message comes with the estimate */ }
}

// A model (a preset, a pasted config, a link naming its family) also replaces the optional fields of the
// families: one its query leaves out takes its default, so Gemma 3's window or Pythia's rotary dims do not stay
// behind for the next model (the core's `input::query_over` drops the same fields).
function clearOptionalModel(p) {
  for (const k of OPTIONAL_MODEL_KNOBS) {
    if (p.has(k)) continue;
    if ($(k).type === 'checkbox') $(k).checked = false;
    else $(k).value = '';
  }
}

function showGpuDetail() {
  $('gpu-detail').textContent = gpuDetails.get($('gpu').value) || '';
}

function showFamily() {
  const family = $('family').value;
  document.querySelectorAll('[data-families]').forEach((e) => {
    e.hidden = !fieldApplies(e.querySelector('input, select').id, family);
  });
}

// The batch slider moves in powers of two; the number field holds any value.
function syncSlider() {
  const b = Number.parseInt($('batch_size').value, 10);
  if (Number.isFinite(b) && b > 0) $('batch_slider').value = String(Math.round(Math.log2(b)));
}

// ---- errors next to their field -----------------------------------------------------------------------------
// The form field a core message is about: it starts with the field ("train.batch_size (0) must be at least 1";
// "train.lora.r (0) ..." is the field lora_r; "train.parallel.mixed_precision.param_dtype" is param_dtype and
// "train.parallel.strategy" the strategy select, `parallel`).
function errorField(message) {
  const m = /^(?:not modelled: )?(?:model|train|device)\.([a-z_]+)((?:\.[a-z_]+)*)/.exec(message);
  if (!m) return null;
  const rest = m[2].split('.').filter(Boolean);
  let id;
  if (m[1] === 'parallel') id = rest.length === 0 || rest[rest.length - 1] === 'strategy' ? 'parallel' : rest[rest.length - 1];
  else id = rest.length ? `${m[1]}_${rest[0]}` : m[1];
  return document.querySelector(`.field-error[data-for="${id}"]`) ? id : null;
}

function clearErrors() {
  document.querySelectorAll('.field-error').forEach((e) => { e.textContent = ''; });
  document.querySelectorAll('[aria-invalid]').forEach((e) => e.removeAttribute('aria-invalid'));
}

function showError(message) {
  clearErrors();
  // Rust's messages start with the field they are about ("train.batch_size (0) must be at least 1").
  const id = errorField(message);
  if (id) {
    document.querySelector(`.field-error[data-for="${id}"]`).textContent = message;
    $(id).setAttribute('aria-invalid', 'true');
  } else {
    $('global-error').textContent = message;
  }
}

// A problem with the link itself: shown next to its field (or on top), without clearing other messages.
function showLinkError(message) {
  const id = errorField(message);
  const slot = id && document.querySelector(`.field-error[data-for="${id}"]`);
  (slot || $('global-error')).textContent = `In the link: ${message}`;
}

// ---- rendering ------------------------------------------------------------------------------------------------
function sizeCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const r = canvas.getBoundingClientRect();
  const w = Math.max(320, Math.round(r.width));
  const h = Math.round(w * 0.5);
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  canvas.style.height = `${h}px`;
  return dpr;
}

function renderEstimate(e) {
  $('peak-allocated').textContent = e.peak_allocated;
  $('peak-allocated').dataset.bytes = String(e.peak_allocated_bytes);
  $('peak-reserved').textContent = e.peak_reserved;
  $('peak-reserved').dataset.bytes = String(e.peak_reserved_bytes);
  $('device-total').textContent = e.device_total;
  $('device-range').textContent = `range ${e.device_range}`;
  $('verdict').textContent = e.verdict ? `${e.verdict} in ${e.gpu_memory}` : 'choose a GPU';
  $('verdict').className = e.fits === true ? 'fits' : (e.fits === false ? 'over' : '');
  $('headroom').textContent = e.headroom;
  $('scope').textContent = e.scope ? `Every figure is ${e.scope}; the batch is per GPU.` : '';
  $('scope').hidden = !e.scope;
  $('sentence').textContent = e.sentence;
  $('peak-phase').textContent = e.peak_phase;
  $('peak-op').textContent = e.peak_op;
  $('n-params').textContent = e.n_params;
  $('per-block').textContent = e.per_block;
  const bar = $('bar');
  bar.replaceChildren(...e.components.map((c) => {
    const seg = el('span', '', { title: `${c.name}: ${c.text}`, class: `seg seg-${c.name.replace(' ', '-')}` });
    seg.style.width = c.width;
    return seg;
  }));
  const body = $('components').tBodies[0];
  body.replaceChildren(...e.components.map((c) => {
    const tr = el('tr');
    const name = el('th', '', { scope: 'row' });
    name.append(el('span', '', { class: `swatch seg-${c.name.replace(' ', '-')}` }), document.createTextNode(c.name));
    tr.append(name, el('td', c.text), el('td', c.what));
    return tr;
  }));
  $('notes').replaceChildren(...e.notes.map((n) => el('li', n)));
  // Eager and compiled side by side (absent where compile is not modelled); the current mode is marked.
  $('compare').hidden = !e.compare;
  if (e.compare) {
    $('compare-eager').textContent = e.compare.eager;
    $('compare-compiled').textContent = e.compare.compiled;
    $('compare-sentence').textContent = e.compare.sentence;
    $('compare-eager-box').classList.toggle('current', e.compare.current === 'eager');
    $('compare-compiled-box').classList.toggle('current', e.compare.current === 'compiled');
  }
}

function renderAdvice(a) {
  $('largest-batch').textContent = a.largest_batch;
  $('largest-block').textContent = a.largest_block;
  $('advice').replaceChildren(...a.suggestions.map((s) => {
    const li = el('li');
    li.append(el('span', `${s.change}: saves ${s.saving} (total ${s.total}${s.fits ? ', fits' : ''}). `));
    li.append(applyButton(s.query));
    return li;
  }));
  if (a.suggestions.length === 0) $('advice').append(el('li', 'Nothing here lowers the peak further.'));
}

// The four plots of a setup, each a function that draws one.
// Each canvas says which query it shows (`data-query`), so that an export takes only the current setup's plots.
function plotSteps(query) {
  const isDark = dark();
  const drawn = (id, draw) => () => {
    delete $(id).dataset.query;
    draw($(id));
    $(id).dataset.query = query;
  };
  return [
    drawn('plot-batch', (c) => vf.draw_sweep(c, query, 'batch_size', isDark, sizeCanvas(c))),
    drawn('plot-block', (c) => vf.draw_sweep(c, query, 'block_size', isDark, sizeCanvas(c))),
    drawn('plot-fitmap', (c) => vf.draw_fit_map(c, query, isDark, sizeCanvas(c))),
    drawn('plot-timeline', (c) => vf.draw_timeline(c, query, isDark, sizeCanvas(c))),
  ];
}

function drawPlots(query) {
  for (const draw of plotSteps(query)) draw();
  if ($('gpus-section').open) drawGpus(query);
}

// The GPU plan costs a few dozen estimates: made when its section is open, when the setup is on several GPUs,
// or when it does not fit one (then its advice joins "How to make it fit").
function gpusWanted(est) {
  return $('gpus-section').open || $('parallel').value !== 'single' || est.fits === false;
}

// Full fine-tuning, LoRA and QLoRA side by side: a few estimates and three bisections, made when the section is
// open, when the setup fine-tunes with LoRA, or when it does not fit (for the families LoRA is modelled for).
function methodsWanted(est) {
  return $('methods-section').open || $('lora').checked || (est.fits === false && !$('finetune').hidden);
}

function showMethods(query) {
  const m = vf.finetune_methods(query);
  $('methods-advice').replaceChildren(document.createTextNode(`${m.advice} `),
    ...(m.advised_query ? [applyButton(m.advised_query)] : []));
  $('methods').tBodies[0].replaceChildren(...m.rows.map((r) => {
    const tr = el('tr', undefined, { 'data-method': r.id, ...(r.current ? { 'aria-current': 'true' } : {}) });
    const label = r.label[0].toUpperCase() + r.label.slice(1);
    const th = el('th', r.current ? `${label} (this setup)` : label, { scope: 'row' });
    // Which recipe the row is (its rank and base): a QLoRA setup without double quantization and the recipe's own
    // QLoRA are two rows of one name.
    th.append(el('small', r.detail, { class: 'detail' }));
    tr.append(th);
    if (r.error) {
      tr.append(el('td', r.error, { colspan: '5' }));
      return tr;
    }
    const apply = el('td');
    if (!r.current) apply.append(applyButton(r.query, `Use ${r.label}`));
    tr.append(el('td', r.trainable), el('td', r.device_total), el('td', r.verdict, { class: r.verdict === 'fits' ? 'fits' : r.verdict ? 'over' : '' }),
      el('td', r.largest_batch), apply);
    return tr;
  }));
  adviseItem('methods', m.advice, m.advised_query);
}

function drawGpus(query) {
  delete $('plot-gpus').dataset.query;
  renderGpuPlan(vf.draw_gpus($('plot-gpus'), query, dark(), sizeCanvas($('plot-gpus'))));
  $('plot-gpus').dataset.query = query;
}

function applyButton(query, label = 'Apply') {
  const b = el('button', label, { type: 'button' });
  b.addEventListener('click', () => { applyQuery(query); update(true); });
  return b;
}

// A section's advice as the last item of "How to make it fit" (replacing its earlier one), where it changes the
// setup.
function adviseItem(id, advice, query) {
  $('advice').querySelector(`li[data-id="${id}"]`)?.remove();
  if (!query) return;
  const li = el('li', undefined, { 'data-id': id });
  li.append(el('span', `${advice} `), applyButton(query));
  $('advice').append(li);
}

// The fewest GPUs per strategy, and the advice: also the last item of "How to make it fit" when it changes
// the setup.
function renderGpuPlan(plan) {
  $('gpu-advice').replaceChildren(document.createTextNode(`${plan.advice} `),
    ...(plan.advised_query ? [applyButton(plan.advised_query)] : []));
  $('gpu-plan').tBodies[0].replaceChildren(...plan.rows.map((r) => {
    const tr = el('tr', undefined, { 'data-way': r.id });
    tr.append(el('th', r.label, { scope: 'row' }));
    if (r.error) {
      tr.append(el('td', r.error, { colspan: '3' }));
      return tr;
    }
    const per = r.host ? `${r.per_gpu}, and ${r.host} of pinned host memory` : r.per_gpu;
    tr.append(el('td', r.fewest || 'choose a GPU'), el('td', per));
    const apply = el('td');
    if (r.query) apply.append(applyButton(r.query, `Use ${r.fewest}`));
    tr.append(apply);
    return tr;
  }));
  $('gpu-notes').replaceChildren(...plan.notes.map((n) => el('li', n)));
  adviseItem('gpus', plan.advice, plan.advised_query);
}

// A panic in Rust aborts the call and reaches JS as a WebAssembly.RuntimeError, not an Error with the core's
// message: say plainly that it is an internal error, keep the last good view, and let the next input try again.
function isInternal(err) {
  return err instanceof WebAssembly.RuntimeError || err?.name === 'RuntimeError';
}

function showInternal(err) {
  let detail = '';
  try { detail = vf.last_panic(); } catch (_) { detail = ''; }
  clearErrors();
  $('global-error').textContent = `vramfit hit an internal error (${detail || err.message}). The last good view stays; changing an input tries again.`;
}

// One update: validate and estimate in Rust; on error keep the last good view and say what is wrong. The headline
// (the figures, the bar, the comparison) is drawn at once; what costs many more estimates (the advice with its
// bisections, the sweeps, the fit map, the timeline, the GPU plan, the methods) follows in `laterSteps`, some 20
// to 40 estimates. For a model of DEEP_LAYERS or more (an estimate's cost grows with the layers) those steps run one
// per task, so that the headline paints first and a newer input abandons the older update's remaining steps;
// otherwise they run at once, as one redraw. On this project's machine a whole update took 20-30 ms for the
// founding case (6 layers), 40 ms for GPT-2 (12), 90 ms for Llama-3.2-1B (16) and 0.35-0.4 s for Llama-3.1-70B
// (80; its headline 13-16 ms). `first`: the page's first view runs every step at once, so that it is whole when
// the page says it is ready.
const DEEP_LAYERS = 16;
let generation = 0;
// History: a change (a select, a checkbox, a field left) is a new entry (`push` true); the updates made while a
// person types in a field (`push` 'live', one a frame) share one entry, pushed at the first and replaced after,
// which the field's change then completes, so that back returns to the view before the typing. (Each
// keystroke's update used to replace the current entry: back after typing a batch size stayed on the new one.)
let typing = false; // the current entry was pushed by typing that no change has completed yet
function update(push, first = false) {
  const gen = ++generation;
  showGpuDetail();
  const query = formQuery();
  // The preset box names the preset whose values the form holds (a reloaded link's too), "custom" once one departs.
  $('preset').value = vf.preset_of_query(query) || '';
  let est;
  try {
    est = vf.estimate(query);
  } catch (err) {
    if (isInternal(err)) showInternal(err);
    else showError(err.message);
    // The figures below are the last setup that could be estimated, not the form's: greyed until it is fixed.
    $('results').dataset.stale = 'true';
    $('results').removeAttribute('aria-busy');
    return false;
  }
  clearErrors();
  delete $('results').dataset.stale;
  renderEstimate(est);
  lastEstimate = est;
  lastGood = query;
  markSnapshot();
  if (!$('embed-panel').hidden) renderSnippets();
  const url = `${location.pathname}?${query}`;
  if (push === 'live') {
    if (typing) history.replaceState(null, '', url);
    else history.pushState(null, '', url);
    typing = true;
  } else {
    if (push && !typing) history.pushState(null, '', url);
    else history.replaceState(null, '', url);
    typing = false;
  }
  const deep = Number(new URLSearchParams(query).get('n_layer')) >= DEEP_LAYERS;
  runLater(laterSteps(query, est), gen, !first && deep);
  return true;
}

// What one update draws after the headline, in order; each a function run once.
function laterSteps(query, est) {
  return [
    () => renderAdvice(vf.advice(query)),
    ...plotSteps(query),
    () => { if (gpusWanted(est)) drawGpus(query); },
    () => { if (methodsWanted(est)) showMethods(query); },
  ];
}

// Runs `steps` (at once, or one per task when `deferred`) until one fails, which is reported as before; then counts
// the render (`data-estimated`, which the browser tests wait on). While steps remain, #results is aria-busy (the
// parts still to come are dimmed by the style sheet).
let finishUpdate = () => {}; // runs what the last deferred update has left, at once
function runLater(steps, gen, deferred) {
  const step = (f) => {
    try {
      f();
      return true;
    } catch (err) {
      if (isInternal(err)) showInternal(err);
      else $('global-error').textContent = err.message;
      return false;
    }
  };
  const done = () => {
    $('results').removeAttribute('aria-busy');
    document.body.dataset.estimated = String(Number(document.body.dataset.estimated || 0) + 1);
  };
  if (!deferred) {
    steps.every(step);
    done();
    return;
  }
  $('results').setAttribute('aria-busy', 'true');
  let i = 0; // the next step; -1 once the render is counted
  // Runs up to `n` of the steps left, stopping at one that fails; once none is left, counts the render. Returns
  // whether steps remain. A newer update has taken over when `gen` is not the latest: it counts its own render.
  const run = (n) => {
    if (gen !== generation || i < 0) return false;
    for (; n > 0 && i < steps.length; n -= 1) if (!step(steps[i++])) i = steps.length;
    if (i < steps.length) return true;
    i = -1;
    done();
    return false;
  };
  const next = () => { if (run(1)) setTimeout(next, 0); };
  // An export (or anything else that needs the whole view) runs the steps left at once; the tasks already queued
  // then find nothing to do.
  finishUpdate = () => run(Infinity);
  // After the next frame, so that the headline is painted before the first step's estimates.
  requestAnimationFrame(() => setTimeout(next, 0));
}

// One live update a frame while a person types; none where an update has run since (a select's or a checkbox's
// change, whose input event comes with it).
let pending = false;
function scheduleUpdate() {
  if (pending) return;
  pending = true;
  const gen = generation;
  requestAnimationFrame(() => {
    pending = false;
    if (gen === generation) update('live');
  });
}

// ---- presets, GPU, WebGPU, paste ----------------------------------------------------------------------------
function fillSelects() {
  const p = vf.presets();
  $('preset').replaceChildren(el('option', 'custom (your values)', { value: '' }),
    ...p.models.map((m) => el('option', m.label, { value: m.id })));
  $('gpu').replaceChildren(...p.gpus.map((g) => el('option', g.label, { value: g.id })),
    el('option', 'custom (enter memory)', { value: 'custom' }));
  for (const g of p.gpus) gpuDetails.set(g.id, g.detail);
}

// A GPU is the device only: the strategy and the rest of the GPUs group stay (a link's parallel=ddp with its gpu,
// a person choosing another GPU for an FSDP setup).
function applyGpu(id) {
  if (id === 'custom') return;
  applyQuery(vf.gpu_query(id), true);
  $('gpu').value = id;
}

async function queryWebGpu() {
  const box = $('webgpu');
  const say = (text) => box.replaceChildren(el('p', text));
  if (!('gpu' in navigator)) {
    say('This browser does not offer WebGPU, which is normal. Browsers never tell a page how much GPU memory there is: choose your GPU above.');
    return;
  }
  let adapter = null;
  try { adapter = await navigator.gpu.requestAdapter(); } catch (_) { adapter = null; }
  if (!adapter) {
    say('WebGPU is present but offered no adapter, which is normal (blocked or no GPU). Choose your GPU above.');
    return;
  }
  const info = adapter.info || {};
  const dl = el('dl');
  const row = (k, v) => { dl.append(el('dt', k), el('dd', v || '(not given)')); };
  row('vendor', info.vendor); row('architecture', info.architecture); row('device', info.device);
  row('description', info.description);
  row('maxBufferSize', vf.format_bytes(adapter.limits.maxBufferSize));
  row('maxStorageBufferBindingSize', vf.format_bytes(adapter.limits.maxStorageBufferBindingSize));
  const id = vf.identify_gpu(`${info.description || ''} ${info.device || ''}`);
  const note = id
    ? el('p', `WebGPU names this GPU; preset "${id}" was selected unless you chose one. The memory size still comes from the preset: browsers do not expose it.`)
    : el('p', 'WebGPU does not identify one GPU preset here. Browsers do not expose memory size: choose your GPU above.');
  box.replaceChildren(el('p', 'WebGPU adapter:'), dl, note);
  box.dataset.adapter = info.architecture || info.vendor || 'unknown';
  if (id && !userChoseGpu) { applyGpu(id); update(false); }
}

function loadText(text) {
  try {
    const r = vf.import_config(text);
    $('paste-error').textContent = '';
    applyModel(r.query);
    $('import-notes').replaceChildren(...r.notes.map((n) => el('li', n)));
    update(true);
  } catch (err) {
    $('paste-error').textContent = err.message;
  }
}

// ---- a measured snapshot beside the estimate ------------------------------------------------------------------
// The reader is a wasm module of its own, loaded in a worker when the first file comes (the page's first load does
// not carry it); the worker reads the file in chunks (the progress bar) and parses it off this thread, so the page
// stays usable however large the file. Every number shown is formatted in Rust.
let snapshotWorker = null;
// The worker's requests in flight, by id: each message back goes to its own request's handler, so that a
// predicted snapshot asked for while a file is read neither takes the read's progress for its bytes nor leaves
// the read unfinished. A handler returns true once its request is done.
const snapshotRequests = new Map();
let snapshotRequestId = 0;
let snapshotRead = 0; // the id of the latest read: an earlier read's messages are dropped

function worker() {
  if (!snapshotWorker) {
    snapshotWorker = new Worker(new URL('./snapshot-worker.js', import.meta.url), { type: 'module' });
    snapshotWorker.onmessage = (ev) => {
      const handle = snapshotRequests.get(ev.data.id);
      if (handle && handle(ev.data)) snapshotRequests.delete(ev.data.id);
    };
    // The worker could not start: every request in flight is told, and the next one starts a new worker.
    snapshotWorker.onerror = (ev) => {
      const message = ev.message || 'worker error';
      snapshotWorker = null;
      const waiting = [...snapshotRequests.values()];
      snapshotRequests.clear();
      for (const handle of waiting) handle({ workerError: message });
    };
  }
  return snapshotWorker;
}

// Posts `message` to the worker with a new id; `handle` receives every message back for it.
function askWorker(message, handle) {
  const id = ++snapshotRequestId;
  const w = worker();
  snapshotRequests.set(id, handle);
  w.postMessage({ id, ...message });
  return id;
}

// The predicted timeline as a PyTorch memory snapshot, written by the snapshot module in the worker.
function predictedSnapshot(query) {
  askWorker({ predictQuery: query }, (m) => {
    if (m.workerError) $('global-error').textContent = `The snapshot writer could not start (${m.workerError}).`;
    else if (m.error) $('global-error').textContent = m.error;
    else download('vramfit-predicted.pickle', new Blob([m.predicted], { type: 'application/octet-stream' }));
    return true;
  });
}

function renderSnapshot(r) {
  $('snap-measured-allocated').textContent = r.measured_allocated;
  $('snap-predicted-allocated').textContent = r.predicted_allocated;
  $('snap-allocated-difference').textContent = r.allocated_difference;
  $('snap-measured-reserved').textContent = r.measured_reserved;
  $('snap-predicted-reserved').textContent = r.predicted_reserved;
  $('snap-reserved-difference').textContent = r.reserved_difference;
  $('snapshot-summary').textContent = `${r.events} events recorded; the allocated peak is at event ${r.peak_event}.`;
  $('snapshot-origins').tBodies[0].replaceChildren(...r.by_origin.map((o) => {
    const tr = el('tr');
    tr.append(el('th', o.origin, { scope: 'row' }), el('td', o.bytes), el('td', String(o.n_blocks)));
    return tr;
  }));
  $('snapshot-blocks').tBodies[0].replaceChildren(...r.blocks.map((b) => {
    const tr = el('tr');
    tr.append(el('td', b.bytes), el('td', b.component ? `${b.origin} (${b.component})` : b.origin),
      el('td', b.frames || '(no frames recorded)'));
    return tr;
  }));
  $('snapshot-result').hidden = false;
}

// The file last read and the estimate it was compared with: a later setup's estimate marks that comparison as
// an earlier setup's (its "vramfit" column and difference), with a button that compares the file again.
let snapshotFile = null;
let snapshotCompared = null;

function readSnapshot(file) {
  if (!file) return;
  $('snapshot-error').textContent = '';
  // A form holding an error has no estimate of its own (the greyed one is an earlier setup's).
  if (!lastEstimate || $('results').dataset.stale) {
    $('snapshot-error').textContent = 'Fix the setup above first: the snapshot is compared with its estimate.';
    return;
  }
  const progress = $('snapshot-progress');
  progress.hidden = false;
  progress.removeAttribute('value');
  $('snapshot-status').textContent = `Reading ${file.name}…`;
  const compared = { allocated: lastEstimate.peak_allocated_bytes, reserved: lastEstimate.peak_reserved_bytes };
  const finish = () => {
    progress.hidden = true;
    document.body.dataset.snapshotsRead = String(Number(document.body.dataset.snapshotsRead || 0) + 1);
    return true;
  };
  const id = askWorker({ file, predictedAllocated: compared.allocated, predictedReserved: compared.reserved }, (m) => {
    if (id !== snapshotRead) return m.result !== undefined || m.error !== undefined || m.workerError !== undefined;
    if (m.workerError) {
      $('snapshot-error').textContent = `The snapshot reader could not start (${m.workerError}).`;
      $('snapshot-status').textContent = '';
      return finish();
    }
    if (m.progress !== undefined) {
      progress.max = m.total;
      progress.value = m.progress;
      return false;
    }
    if (m.reading) {
      progress.removeAttribute('value');
      $('snapshot-status').textContent = `Reading the trace of ${file.name}…`;
      return false;
    }
    $('snapshot-status').textContent = '';
    if (m.error) {
      $('snapshot-result').hidden = true;
      $('snapshot-error').textContent = `${file.name}: ${m.error}`;
      snapshotFile = null;
      snapshotCompared = null;
    } else {
      renderSnapshot(m.result);
      $('snapshot-status').textContent = `${file.name}: read.`;
      snapshotFile = file;
      snapshotCompared = compared;
      markSnapshot();
    }
    return finish();
  });
  snapshotRead = id;
}

// After an update: a comparison made with another setup's estimate says so, and offers to compare again.
function markSnapshot() {
  if (!snapshotCompared || !lastEstimate) return;
  const stale = snapshotCompared.allocated !== lastEstimate.peak_allocated_bytes
    || snapshotCompared.reserved !== lastEstimate.peak_reserved_bytes;
  $('snapshot-result').toggleAttribute('data-stale', stale);
  $('snapshot-stale').hidden = !stale;
}

function wireSnapshot() {
  $('snapshot-again').addEventListener('click', () => readSnapshot(snapshotFile));
  $('snapshot-file').addEventListener('change', (ev) => readSnapshot(ev.target.files[0]));
  const drop = $('snapshot-drop');
  drop.addEventListener('dragover', (ev) => { ev.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (ev) => {
    ev.preventDefault();
    drop.classList.remove('over');
    readSnapshot(ev.dataTransfer.files[0]);
  });
}

// ---- exports --------------------------------------------------------------------------------------------------
function download(name, blob) {
  const a = el('a', '', { download: name });
  a.href = URL.createObjectURL(blob);
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// What an export writes: the setup shown, never the greyed figures of an earlier one while the form holds an
// error (said next to the buttons instead, until the next update).
function exportQuery() {
  $('export-status').textContent = '';
  if (lastGood && !$('results').dataset.stale) return lastGood;
  $('export-status').textContent = 'The form holds a value vramfit cannot estimate: the figures shown are an earlier setup\'s. Fix the marked field first.';
  return null;
}

// Runs one export; an error (an internal one included) is its message next to the buttons.
function exporting(f) {
  return () => {
    const query = exportQuery();
    if (!query) return;
    try { f(query); } catch (err) {
      $('export-status').textContent = isInternal(err) ? `vramfit hit an internal error (${err.message}).` : err.message;
    }
  };
}

function wireExports() {
  // The plots of the setup shown: a deep model's update still drawing finishes first, and a plot left from
  // another setup (the GPU plan of a setup that did not fit one GPU, say) is not exported as this one's.
  $('export-png').addEventListener('click', exporting((query) => {
    finishUpdate();
    for (const id of ['plot-batch', 'plot-block', 'plot-fitmap', 'plot-timeline', 'plot-gpus']) {
      if ($(id).dataset.query !== query) continue;
      $(id).toBlob((b) => b && download(`vramfit-${id.slice(5)}.png`, b), 'image/png');
    }
  }));
  $('export-csv').addEventListener('click', exporting((query) => {
    download('vramfit-batch-sweep.csv', new Blob([vf.sweep_csv(query, 'batch_size')], { type: 'text/csv' }));
  }));
  $('export-json').addEventListener('click', exporting((query) => {
    download('vramfit-batch-sweep.json', new Blob([vf.sweep_json(query, 'batch_size')], { type: 'application/json' }));
  }));
  $('export-snapshot').addEventListener('click', exporting((query) => predictedSnapshot(query)));
  $('copy-link').addEventListener('click', exporting(() => navigator.clipboard?.writeText(location.href)));
  $('embed-open').addEventListener('click', () => {
    const panel = $('embed-panel');
    panel.hidden = !panel.hidden;
    $('embed-open').setAttribute('aria-expanded', String(!panel.hidden));
    if (!panel.hidden) renderSnippets();
  });
  $('copy-element').addEventListener('click', () => navigator.clipboard?.writeText($('snippet-element').textContent));
  $('copy-iframe').addEventListener('click', () => navigator.clipboard?.writeText($('snippet-iframe').textContent));
}

// The two embed snippets for the current view (text only: they are shown, never parsed as HTML here).
function renderSnippets() {
  if (!lastGood) return;
  const base = new URL('./', location.href).href;
  const state = lastGood.replaceAll('&', '&amp;');
  $('snippet-element').textContent = `<script type="module" src="${base}embed.js"></script>\n<vram-fit state="${state}" plot="batch" show="batch_size,seq_len,precision,gpu"></vram-fit>`;
  $('snippet-iframe').textContent = `<iframe src="${base}embed.html?${state}&amp;plot=batch" title="vramfit" width="100%" height="640" style="border:0" loading="lazy"></iframe>`;
}

// ---- start ----------------------------------------------------------------------------------------------------
async function main() {
  await init();
  fillSelects();
  // The default case first; a link's values then replace what they name (`?batch_size=4` is the default case
  // at batch 4), as the widget reads its `state` (`vf.query_over`). The link is checked over the default case
  // before the form holds it, so a value a select cannot hold (an unknown precision, say) is still reported
  // with the link's own text.
  applyQuery(vf.preset_query(DEFAULT_PRESET));
  applyGpu(DEFAULT_GPU);
  const q = location.search.slice(1);
  const testPanic = new URLSearchParams(q).has('__test_panic');
  let linkError = '';
  if (q) {
    const p = new URLSearchParams(q);
    try { vf.normalize_query(vf.query_over(vf.preset_query(DEFAULT_PRESET), q)); } catch (err) { linkError = err.message; }
    // `preset` is the widget's key (embed.html?preset=...), which a link to the page does not set: the page showed
    // its default case without a word. It says so, as `vramfit estimate --link` does.
    if (!linkError && p.has('preset')) {
      linkError = `preset ("${p.get('preset')}") is the widget's key, which a link to the page does not set: choose the model in the Preset list`;
    }
    if (p.has('family')) clearOptionalModel(p);
    applyQuery(q);
    // A link's block size without a sequence length trains on whole blocks, as the widget and the CLI read it
    // (the core's default), not on the default preset's 512 tokens ("train.seq_len (512) is longer than
    // model.block_size (256)" for a link of block_size=256).
    if (p.has('block_size') && !p.has('seq_len')) $('seq_len').value = '';
    if (p.has('gpu')) {
      // The link's GPU is the device, as in the widget: its memory and compute capability, over any the link
      // also holds (links written before issue 12's fix could hold another GPU's).
      userChoseGpu = true;
      if (gpuDetails.has(p.get('gpu'))) applyGpu(p.get('gpu'));
      else $('gpu').value = 'custom';
    } else if (p.has('memory_gib')) $('gpu').value = 'custom';
    // A device given without its SM count (links from before the field): the count the core takes for it.
    if (!p.has('gpu') && !p.has('sms') && (p.has('memory_gib') || p.has('compute_capability'))) {
      const form = new URLSearchParams(formQuery());
      form.delete('sms');
      try { $('sms').value = new URLSearchParams(vf.normalize_query(form.toString()).query).get('sms') || ''; } catch { /* reported below */ }
    }
  }
  $('form').addEventListener('input', (ev) => {
    if (ev.target.id === 'paste') return;
    if (ev.target.id === 'batch_slider') $('batch_size').value = String(2 ** Number(ev.target.value));
    if (ev.target.id === 'batch_size') syncSlider();
    if (ev.target.id === 'family') showFamily();
    if (ev.target.id === 'parallel') showStrategy();
    if (DEVICE_KEYS.includes(ev.target.id)) $('gpu').value = 'custom';
    scheduleUpdate();
  });
  $('form').addEventListener('change', (ev) => {
    if (ev.target.id === 'paste') return;
    if (ev.target.id === 'preset' && ev.target.value) applyModel(vf.preset_query(ev.target.value));
    if (ev.target.id === 'gpu') { userChoseGpu = true; applyGpu(ev.target.value); }
    if (ev.target.id === 'lora' && ev.target.checked) recipeDropout();
    update(true);
  });
  $('form').addEventListener('submit', (ev) => ev.preventDefault());
  $('paste-load').addEventListener('click', () => loadText($('paste').value));
  $('paste').addEventListener('dragover', (ev) => ev.preventDefault());
  $('paste').addEventListener('drop', async (ev) => {
    ev.preventDefault();
    const file = ev.dataTransfer.files[0];
    if (file) { const text = await file.text(); $('paste').value = text; loadText(text); }
  });
  window.addEventListener('popstate', () => { applyHistory(location.search.slice(1)); update(false); });
  window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => lastGood && drawPlots(lastGood));
  let resizeTimer;
  window.addEventListener('resize', () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(() => lastGood && drawPlots(lastGood), 150); });
  $('gpus-section').addEventListener('toggle', () => { if ($('gpus-section').open && lastGood) drawGpus(lastGood); });
  $('methods-section').addEventListener('toggle', () => { if ($('methods-section').open && lastGood) showMethods(lastGood); });
  wireExports();
  wireSnapshot();
  $('load-status').hidden = true;
  $('app').hidden = false;
  if (!update(false, true)) $('global-error').textContent ||= 'The link holds values vramfit cannot estimate; fix the marked field.';
  if (linkError) showLinkError(linkError);
  performance.mark('vramfit-first-plot');
  // Test-only: the browser tests open ?__test_panic to check the internal-error path after a good first view.
  if (testPanic) {
    try { vf.__test_panic(); } catch (err) { if (isInternal(err)) showInternal(err); else throw err; }
  }
  document.body.dataset.ready = 'true';
  queryWebGpu();
  if ('serviceWorker' in navigator) navigator.serviceWorker.register('sw.js').catch(() => {});
}

main().catch((err) => {
  const s = $('load-status');
  s.hidden = false;
  s.textContent = `vramfit could not start: ${err.message || err}`;
  s.className = 'field-error';
});
