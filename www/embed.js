// <vram-fit>: vramfit as a custom element for documentation and blog posts.
//   <script type="module" src="https://HOST/embed.js"></script>
//   <vram-fit preset="nanogpt-30m" gpu="rtx-4070" show="batch_size,precision" plot="batch"></vram-fit>
// Attributes: preset | config (setup JSON), state (the main page's URL query, read over the preset or config as
// the page reads its links over its default case: what it names replaces the source's), gpu (a GPU preset id; without
// one, the source's own device, shown as the GPU preset that has it), compile (true|false:
// torch.compile on or off over what the source says), finetune (full|lora|qlora: the recipe `vramfit
// --finetune` names, over the source), alloc-conf (PYTORCH_CUDA_ALLOC_CONF, e.g.
// "expandable_segments:True"), show (knobs to offer, by URL key: batch_size, precision, optimizer, lora, lora_r,
// lora_target_modules, base_dtype, quantization, parallel, gpus, offload, ...), lock, plot
// (batch|block|fitmap|timeline|gpus|finetune|none: finetune is a table of full fine-tuning, LoRA and QLoRA), theme (light|dark|auto).
// A value the widget does not have (a knob in show or lock, a plot, a theme) is its message, naming the values it
// takes. The element's data-status says how it went: "ok", "partial" (the figures drawn, the plot or table not:
// its message says why) or "error" (the message alone, or over greyed earlier figures). Everything renders in a shadow root; every number comes from the wasm estimator,
// loaded once from this script's own origin and shared by every widget on the page.

const ESTIMATOR = new URL('./pkg/entry.js', import.meta.url).href;
const PAGE = new URL('./', import.meta.url).href;
let ready = null;
function estimator() {
  ready ||= import(ESTIMATOR).then(async (m) => { await m.default(); return m; });
  return ready;
}

const KNOBS = {
  batch_size: ['Batch size', 'number'], seq_len: ['Sequence length', 'number'], block_size: ['Block size', 'number'],
  n_layer: ['Layers', 'number'], n_embd: ['Width', 'number'], n_head: ['Heads', 'number'], vocab_size: ['Vocabulary', 'number'],
  precision: ['Precision', ['fp32', 'fp16-amp', 'bf16-amp', 'bf16']],
  optimizer: ['Optimizer', ['adamw', 'adamw-fused', 'sgd', 'sgd-momentum', 'adamw8bit', 'paged-adamw8bit', 'adafactor',
    'lion', 'lion8bit']],
  attention: ['Attention', ['sdpa', 'manual', 'flash_attention_2']], checkpointing: ['Checkpointing', 'checkbox'],
  grad_accum_steps: ['Grad accumulation', 'number'], dropout: ['Dropout', 'number'], gpu: ['GPU', 'gpu'],
  sms: ['SMs', 'number'],
  zero_grad_set_to_none: ['zero_grad(set_to_none)', 'checkbox'], compile: ['torch.compile', 'checkbox'],
  alloc_conf: ['PYTORCH_CUDA_ALLOC_CONF', 'text'], sliding_window: ['Sliding window', 'number'],
  head_dim: ['Head size', 'number'], rotary_dims: ['Rotary dims per head', 'number'],
  parallel_residual: ['Parallel residual', 'checkbox'], n_experts: ['Experts', 'number'],
  experts_per_token: ['Experts per token', 'number'], shared_expert_size: ['Shared expert width', 'number'],
  norm_topk_prob: ['Renormalise top-k', 'checkbox'], router_aux_loss: ['Router aux loss', 'checkbox'],
  lora: ['LoRA', 'checkbox'], lora_r: ['LoRA rank', 'number'], lora_alpha: ['LoRA alpha', 'number'],
  lora_dropout: ['LoRA dropout', 'number'], lora_target_modules: ['LoRA targets', 'text'],
  lora_modules_to_save: ['Modules to save', 'text'], base_dtype: ['Base dtype', ['', 'fp32', 'bf16', 'fp16']],
  quantization: ['Quantized base', ['', 'nf4', 'fp4', 'int8']], double_quant: ['Double quant', 'checkbox'],
  parallel: ['Strategy', ['single', 'ddp', 'fsdp', 'zero2', 'zero3']], gpus: ['GPUs', 'number'],
  reshard_after_forward: ['Reshard after forward', 'checkbox'], param_dtype: ['FSDP param_dtype', ['', 'bf16', 'fp32']],
  reduce_dtype: ['FSDP reduce_dtype', ['', 'fp32', 'bf16']], offload: ['CPU offload', 'checkbox'],
  bucket_cap_mb: ['bucket_cap_mb', 'number'], gradient_as_bucket_view: ['gradient_as_bucket_view', 'checkbox'],
  static_graph: ['static_graph', 'checkbox'], tp: ['Tensor parallel', 'number'],
  init_on_device: ['Built on each GPU first (tp alone)', 'checkbox'],
  sequence_parallel: ['Sequence parallel', 'checkbox'],
};
// `train.parallel`'s keys besides the strategy (`parallel`): none on one GPU; a new strategy keeps only the GPUs.
const PARALLEL_KEYS = ['gpus', 'tp', 'sequence_parallel', 'reshard_after_forward', 'param_dtype', 'reduce_dtype', 'offload', 'bucket_cap_mb',
  'gradient_as_bucket_view', 'static_graph', 'init_on_device'];
// Selects whose empty choice means "leave the key out" (the core has no empty value for them).
const OMIT_EMPTY = ['param_dtype', 'reduce_dtype'];
const DEFAULT_SHOW = 'batch_size,seq_len,precision,gpu';
const PLOTS = ['batch', 'block', 'fitmap', 'timeline', 'gpus', 'finetune', 'none'];
const THEMES = ['light', 'dark', 'auto'];
// A comma-separated attribute's entries (show, lock), blanks dropped.
const entries = (value) => (value || '').split(',').map((s) => s.trim()).filter(Boolean);
const DEVICE_KEYS = ['memory_gib', 'compute_capability', 'sms'];

const CSS = `
.root { all: initial; display: block; box-sizing: border-box; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg); background: var(--bg); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; max-width: 760px; }
.root * { box-sizing: border-box; font: inherit; color: inherit; letter-spacing: normal; text-transform: none; }
.light { --bg: #fff; --fg: #1e1e24; --muted: #5b5d6b; --line: #dedee6; --card: #f6f7fa; --fits: #1f7a45; --over: #b8202d; --accent: #426ec8; }
.dark { --bg: #181a20; --fg: #e2e4eb; --muted: #a3a6b4; --line: #3a3e4a; --card: #22252d; --fits: #46be78; --over: #ff6b74; --accent: #6e96f0; }
.title { font-weight: 600; margin: 0 0 8px; }
.inputs { display: flex; flex-wrap: wrap; gap: 8px 14px; margin-bottom: 10px; }
label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
input, select { margin-top: 2px; padding: 3px 6px; border: 1px solid var(--line); border-radius: 6px; background: var(--card); color: var(--fg); width: 9em; }
input[type=checkbox] { width: auto; }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 1px; }
.totals { display: flex; flex-wrap: wrap; gap: 8px; }
.totals div { background: var(--card); border-radius: 8px; padding: 6px 10px; display: flex; flex-direction: column; }
.totals span { font-size: 12px; color: var(--muted); }
.totals strong { font-size: 18px; font-weight: 700; }
.fits { color: var(--fits); } .over { color: var(--over); }
.bar { display: flex; height: 12px; border-radius: 6px; overflow: hidden; margin: 10px 0 6px; border: 1px solid var(--line); }
.bar span { display: block; height: 100%; }
.s-weights, .s-weight-copies, .s-4-bit-weights, .s-int8-weights, .s-quantized-weights { background: #426ec8; } .s-adapters { background: #426ec866; } .s-grads { background: #785abe; } .s-optimizer { background: #e69628; }
.s-activations { background: #28a096; } .s-logits { background: #dc5078; } .s-temporary, .s-workspace { background: #9696a0; } .s-block-remainders { background: #9696a080; }
.sentence { margin: 4px 0 8px; }
canvas { width: 100%; display: block; border: 1px solid var(--line); border-radius: 8px; }
[hidden] { display: none !important; }
/* The figures of the last setup that could be estimated while the inputs hold an error: greyed. */
.stale .totals, .stale .bar, .stale .sentence, .stale canvas, .stale .methods { opacity: 0.35; filter: grayscale(1); }
.error { color: var(--over); margin: 6px 0; }
.error:empty { display: none; }
.methods { border-collapse: collapse; width: 100%; font-size: 13px; margin: 4px 0; }
.methods th, .methods td { text-align: left; padding: 2px 6px; border-bottom: 1px solid var(--line); }
.foot { font-size: 12px; color: var(--muted); margin-top: 6px; }
a { color: var(--accent); }
`;

// Reads one attribute's value with `read`; its error names the attribute, since the core's message names only
// the setup's field ("missing required field \"model.family\"" from a state that is not a whole setup).
function from(name, read) {
  try { return read(); } catch (err) { throw new Error(`the ${name} attribute: ${err.message}`); }
}

let sheet = null;
function styles() {
  if (!sheet) { sheet = new CSSStyleSheet(); sheet.replaceSync(CSS); }
  return sheet;
}

function el(tag, text, attrs = {}) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

class VramFit extends HTMLElement {
  static get observedAttributes() { return ['preset', 'config', 'state', 'gpu', 'compile', 'finetune', 'alloc-conf', 'show', 'lock', 'plot', 'theme']; }

  constructor() {
    super();
    this.attachShadow({ mode: 'open' }).adoptedStyleSheets = [styles()];
    this.root = el('div', undefined, { class: 'root light', part: 'root' });
    this.shadowRoot.append(this.root);
    this.params = null;
    this.scheduled = false;
    this.chosenGpu = ''; // the GPU a person picked in this widget: a new preset or config keeps it
    this.ownDevice = []; // the source's own device, for "as configured"
  }

  connectedCallback() { this.schedule(true); }

  attributeChangedCallback(name) {
    // The host naming a GPU (or a whole state) replaces the person's pick; a new model keeps it.
    if (name === 'gpu' || name === 'state') this.chosenGpu = '';
    if (this.isConnected) this.schedule(true);
  }

  schedule(rebuild) {
    this.rebuild ||= rebuild;
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(() => { this.scheduled = false; this.render(); });
  }

  async render() {
    let vf;
    try { vf = await estimator(); } catch (err) {
      this.root.replaceChildren(el('p', `vramfit could not load its estimator from ${ESTIMATOR}: ${err.message}`, { class: 'error' }));
      return;
    }
    this.vf = vf;
    if (this.rebuild) {
      this.rebuild = false;
      const err = this.initialState(vf);
      this.build(vf);
      if (err) {
        // Nothing to show but the problem: no empty inputs, no empty plot.
        this.error.textContent = err;
        this.heading.textContent = 'vramfit could not read this widget\'s settings';
        this.root.replaceChildren(this.heading, this.error);
        this.dataset.status = 'error';
        return;
      }
    }
    this.update();
  }

  // The widget's state is a URL query string, as on the main page.
  initialState(vf) {
    try {
      // A knob, plot or theme the widget does not have is said, never dropped (a blank widget, or one without
      // the plot asked for, would look like vramfit's doing).
      for (const name of ['show', 'lock']) {
        const unknown = entries(this.getAttribute(name)).filter((k) => !Object.hasOwn(KNOBS, k));
        if (unknown.length) {
          throw new Error(`the ${name} attribute ("${this.getAttribute(name)}") names ${unknown.map((k) => `"${k}"`).join(', ')}, `
            + `which the widget does not have; its knobs are ${Object.keys(KNOBS).join(', ')}`);
        }
      }
      for (const [name, allowed] of [['plot', PLOTS], ['theme', THEMES]]) {
        const value = (this.getAttribute(name) || '').trim();
        if (value && !allowed.includes(value)) {
          throw new Error(`the ${name} attribute ("${this.getAttribute(name)}") must be one of ${allowed.join(', ')}`);
        }
      }
      // The source (a config, else a preset, else the page's default case), then the state over it as the page
      // reads its links: `preset="llama-3.1-8b" state="parallel=fsdp&gpus=8"` is that model on eight GPUs, a
      // state alone the page's default case with what it names changed, a whole link of the page itself.
      let stateGpu = '';
      const config = this.getAttribute('config');
      const state = this.getAttribute('state');
      let q = config
        ? from('config', () => vf.import_config(config).query)
        : from('preset', () => vf.preset_query(this.getAttribute('preset') || 'nanogpt-30m'));
      if (state !== null) {
        const n = from('state', () => vf.normalize_query(vf.query_over(q, state)));
        q = n.query;
        stateGpu = (n.extra.find(([k]) => k === 'gpu') || [])[1] || '';
      }
      this.params = new URLSearchParams(q);
      // The recipe first, then the knobs over it, as the CLI applies --finetune before its other flags: compile
      // "true" with a LoRA recipe is the core's "not modelled" message, as `--finetune qlora --compile` is, not
      // the recipe's eager run (the recipe turned it off without a word).
      const finetune = this.getAttribute('finetune');
      if (finetune !== null) this.params = new URLSearchParams(vf.finetune_query(this.params.toString(), finetune.trim()));
      const compile = this.getAttribute('compile');
      if (compile !== null) {
        const on = new Map([['true', '1'], ['', '1'], ['false', '0']]).get(compile.trim().toLowerCase());
        if (on === undefined) throw new Error(`the compile attribute ("${compile}") must be true or false`);
        this.params.set('compile', on);
      }
      const allocConf = this.getAttribute('alloc-conf');
      if (allocConf !== null) {
        // Checked here (by the core) so that a value PyTorch refuses is the widget's message, not a guess.
        this.params.set('alloc_conf', allocConf);
        this.params = new URLSearchParams(vf.normalize_query(this.params.toString()).query);
      }
      // The GPU: the person's pick, else the gpu attribute, else the state's; a model source (preset, config)
      // never replaces it. Without one the source's own device stands, named when one GPU preset has it.
      this.ownDevice = DEVICE_KEYS.map((k) => [k, this.params.get(k)]);
      const gpu = this.chosenGpu || this.getAttribute('gpu') || stateGpu;
      if (gpu) {
        for (const [k, v] of new URLSearchParams(from(this.getAttribute('gpu') ? 'gpu' : 'state', () => vf.gpu_query(gpu)))) this.params.set(k, v);
        this.params.set('gpu', gpu);
      } else {
        this.params.delete('gpu');
        const own = vf.gpu_of_query(this.params.toString());
        if (own) this.params.set('gpu', own);
      }
      return '';
    } catch (err) {
      this.params = null;
      return `vramfit: ${err.message}`;
    }
  }

  build(vf) {
    const theme = (this.getAttribute('theme') || '').trim() || 'auto';
    const dark = theme === 'dark' || (theme === 'auto' && matchMedia('(prefers-color-scheme: dark)').matches);
    this.dark = dark;
    this.root.className = `root ${dark ? 'dark' : 'light'}`;
    // Every entry is a knob here: `initialState` refused the others.
    const show = entries(this.getAttribute('show') ?? DEFAULT_SHOW).filter((k) => Object.hasOwn(KNOBS, k));
    const lock = new Set(entries(this.getAttribute('lock')));
    this.inputs = el('div', undefined, { class: 'inputs' });
    for (const key of show) this.inputs.append(this.field(vf, key, lock.has(key)));
    this.error = el('p', '', { class: 'error', role: 'alert' });
    this.totals = el('div', undefined, { class: 'totals', 'aria-live': 'polite' });
    this.bar = el('div', undefined, { class: 'bar', role: 'img', 'aria-label': 'Components at the peak' });
    this.sentence = el('p', '', { class: 'sentence' });
    this.compare = el('p', '', { class: 'sentence compare' });
    this.plotKind = (this.getAttribute('plot') || '').trim() || 'batch';
    this.canvas = ['none', 'finetune'].includes(this.plotKind) ? null : el('canvas', undefined, { role: 'img', 'aria-label': `vramfit plot: ${this.plotKind}` });
    this.methods = this.plotKind === 'finetune' ? el('table', undefined, { class: 'methods' }) : null;
    const link = el('a', 'open in vramfit', { target: '_blank', rel: 'noopener' });
    this.link = link;
    const foot = el('p', undefined, { class: 'foot' });
    foot.append(document.createTextNode('Estimated op by op for PyTorch on CUDA · '), link);
    this.heading = el('p', '', { class: 'title' });
    this.estimated = false;
    this.root.replaceChildren(this.heading, this.inputs, this.error, this.totals, this.bar, this.sentence, this.compare, ...(this.canvas ? [this.canvas] : []),
      ...(this.methods ? [this.methods] : []), foot);
  }

  field(vf, key, locked) {
    const [label, kind] = KNOBS[key];
    const wrap = el('label', label);
    let input;
    if (kind === 'gpu') {
      input = el('select');
      // A device no GPU preset names (a config's own memory, say) is offered as it came.
      if (!this.params?.get('gpu')) input.append(el('option', 'as configured', { value: '' }));
      for (const g of vf.presets().gpus) input.append(el('option', g.label, { value: g.id }));
      input.value = this.params?.get('gpu') || '';
    } else if (Array.isArray(kind)) {
      input = el('select');
      for (const v of kind) input.append(el('option', v || 'none', { value: v }));
      input.value = this.params?.get(key) ?? (key === 'parallel' ? 'single' : '');
    } else if (kind === 'checkbox') {
      input = el('input', undefined, { type: 'checkbox' });
      // FSDP2 reshards after forward unless told otherwise (zero2 is the one that does not).
      const dflt = key === 'reshard_after_forward' && this.params?.get('parallel') !== 'zero2' ? '1' : '0';
      input.checked = (this.params?.get(key) ?? dflt) === '1';
    } else if (kind === 'text') {
      input = el('input', undefined, { type: 'text', spellcheck: 'false', autocapitalize: 'off' });
      input.value = this.params?.get(key) ?? '';
    } else {
      input = el('input', undefined, { type: 'number', min: '0', step: key.endsWith('dropout') ? '0.05' : '1' });
      input.value = this.params?.get(key) ?? '';
    }
    input.name = key;
    if (locked) input.disabled = true;
    input.addEventListener('change', () => this.onInput(key, input));
    input.addEventListener('input', () => { if (kind === 'number' || kind === 'text') this.onInput(key, input); });
    wrap.append(input);
    return wrap;
  }

  onInput(key, input) {
    if (!this.params) return;
    if (key === 'gpu') {
      this.chosenGpu = input.value;
      if (input.value) {
        for (const [k, v] of new URLSearchParams(this.vf.gpu_query(input.value))) this.params.set(k, v);
        this.params.set('gpu', input.value);
      } else {
        for (const [k, v] of this.ownDevice) if (v !== null) this.params.set(k, v);
        this.params.delete('gpu');
      }
    } else if (key === 'parallel') {
      const gpus = this.params.get('gpus') || '8';
      for (const k of ['parallel', ...PARALLEL_KEYS]) this.params.delete(k);
      if (input.value !== 'single') { this.params.set('parallel', input.value); this.params.set('gpus', gpus); }
      // The strategy's other fields show their new (default) values.
      this.build(this.vf);
    } else if (PARALLEL_KEYS.includes(key) && !this.params.has('parallel') && !['tp', 'sequence_parallel', 'init_on_device'].includes(key)) {
      // A multi-GPU field on one GPU: the strategy comes first (said once, next to the inputs, naming the field
      // and its value). The figures, still one GPU's without it, are greyed as no longer the inputs'.
      const value = input.type === 'checkbox' ? (input.checked ? 'on' : 'off') : `"${input.value}"`;
      this.error.textContent = `vramfit: ${key} (${value}) needs more than one GPU: choose a strategy (ddp or fsdp) first`;
      this.dataset.status = 'error';
      this.root.classList.toggle('stale', Boolean(this.estimated));
      return;
    } else if (input.type === 'checkbox') this.params.set(key, input.checked ? '1' : '0');
    else if (OMIT_EMPTY.includes(key) && input.value === '') this.params.delete(key);
    else {
      this.params.set(key, input.value);
      if (key === 'block_size') this.params.set('seq_len', input.value);
      // Another SM count is no longer the preset's device.
      if (key === 'sms') { this.params.delete('gpu'); this.chosenGpu = ''; }
    }
    // Tensor parallelism alone is strategy single with its tp.
    if (['tp', 'sequence_parallel', 'init_on_device'].includes(key) && !this.params.has('parallel')) this.params.set('parallel', 'single');
    this.update();
  }

  update() {
    if (!this.params) return;
    const vf = this.vf;
    const q = this.params.toString();
    let e;
    try { e = vf.estimate(q); } catch (err) {
      this.error.textContent = err.message;
      this.dataset.status = 'error';
      // Never estimated (a recipe the model does not have, say): the message and the inputs, no empty figures or
      // plot. Estimated before: those figures are greyed, since they are no longer the inputs'.
      if (!this.estimated) {
        this.heading.textContent = 'vramfit could not estimate this setup';
        this.showFigures(false);
      }
      this.root.classList.toggle('stale', Boolean(this.estimated));
      return;
    }
    this.estimated = true;
    this.showFigures(true);
    this.root.classList.remove('stale');
    this.error.textContent = '';
    this.heading.textContent = `${this.params.get('family')} · ${e.n_params} · batch ${this.params.get('batch_size')} × ${this.params.get('seq_len')} tokens`;
    const box = (label, value, cls = '') => { const d = el('div'); d.append(el('span', label), el('strong', value, { class: cls })); return d; };
    const verdict = e.verdict ? `${e.verdict} in ${e.gpu_memory}` : '';
    const per = e.scope ? ' per GPU' : '';
    this.totals.replaceChildren(box(`Peak allocated${per}`, e.peak_allocated), box(`On the device${per}`, e.device_total),
      ...(verdict ? [box('Verdict', verdict, e.fits ? 'fits' : 'over')] : []));
    this.bar.replaceChildren(...e.components.map((c) => {
      const s = el('span', '', { class: `s-${c.name.replace(' ', '-')}`, title: `${c.name}: ${c.text}` });
      s.style.width = c.width;
      return s;
    }));
    this.sentence.textContent = e.scope ? `${e.sentence} Every figure is ${e.scope}.` : e.sentence;
    this.compare.textContent = e.compare ? e.compare.sentence : '';
    this.compare.hidden = !e.compare;
    this.link.href = `${PAGE}?${q}`;
    // The figures stand even where the plot or the table cannot be drawn; its message says why, and the status
    // is "partial" (a host waiting for "ok" would otherwise take a widget without its plot for a whole one).
    const failed = [this.canvas && this.draw(q), this.methods && this.showMethods(q)].some(Boolean);
    this.dataset.status = failed ? 'partial' : 'ok';
    this.dataset.peakBytes = String(e.peak_allocated_bytes);
    this.dataset.reservedBytes = String(e.peak_reserved_bytes);
    this.dispatchEvent(new CustomEvent('vramfit:estimate', { detail: { peak_allocated_bytes: e.peak_allocated_bytes } }));
  }

  showFigures(on) {
    for (const e of [this.totals, this.bar, this.sentence, this.compare, this.canvas, this.methods]) if (e) e.hidden = !on;
  }

  // Full fine-tuning, LoRA and QLoRA on this GPU, with the advice under them in place of the eager/compiled line.
  // Returns the message where it cannot be made, else ''.
  showMethods(q) {
    try {
      const m = this.vf.finetune_methods(q);
      const head = el('tr');
      for (const h of ['Recipe', 'On the device', 'Largest batch']) head.append(el('th', h));
      this.methods.replaceChildren(head, ...m.rows.map((r) => {
        const tr = el('tr', undefined, { 'data-method': r.id });
        tr.append(el('th', r.label, { title: r.detail }));
        if (r.error) tr.append(el('td', 'not modelled', { title: r.error, colspan: '2' }));
        else tr.append(el('td', `${r.device_total} (${r.verdict || 'no GPU'})`, { class: r.verdict === 'fits' ? 'fits' : r.verdict ? 'over' : '' }), el('td', r.largest_batch));
        return tr;
      }));
      this.compare.textContent = m.advice;
      this.compare.hidden = false;
      this.dataset.methodsAdvice = m.advice;
      return '';
    } catch (err) {
      this.error.textContent = err.message;
      return err.message;
    }
  }

  // Draws the plot; returns the message where it cannot be drawn, else ''.
  draw(q) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(280, Math.round(this.canvas.getBoundingClientRect().width || 600));
    const h = Math.round(w * 0.5);
    this.canvas.width = Math.round(w * dpr);
    this.canvas.height = Math.round(h * dpr);
    this.canvas.style.height = `${h}px`;
    const vf = this.vf;
    try {
      if (this.plotKind === 'block') vf.draw_sweep(this.canvas, q, 'block_size', this.dark, dpr);
      else if (this.plotKind === 'fitmap') vf.draw_fit_map(this.canvas, q, this.dark, dpr);
      else if (this.plotKind === 'timeline') vf.draw_timeline(this.canvas, q, this.dark, dpr);
      else if (this.plotKind === 'gpus') {
        // The advice under the plot replaces the eager/compiled sentence, which the GPU plot's notes cover.
        const plan = vf.draw_gpus(this.canvas, q, this.dark, dpr);
        this.compare.textContent = plan.advice;
        this.compare.hidden = false;
        this.dataset.gpuAdvice = plan.advice;
      }
      else vf.draw_sweep(this.canvas, q, 'batch_size', this.dark, dpr);
      return '';
    } catch (err) {
      this.error.textContent = err.message;
      return err.message;
    }
  }
}

if (!customElements.get('vram-fit')) customElements.define('vram-fit', VramFit);
