// The embed: a fixture blog post on one origin, the widget served from another. Two widgets with different
// presets, a hostile stylesheet, an iframe embed and a widget with a bad config.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { serve, launch, cliPeakBytes, ARTIFACTS } from './helpers.mjs';

const WIDGET_PORT = 8771;
const BLOG_PORT = 8772;
let widgetServer;
let blogServer;
let context;
let blogDir;

function blogHtml(widget) {
  return `<!doctype html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>Training a small GPT on a 12 GB card</title>
<style>
* { color: red; font: 30px serif; }
h1, h2 { text-transform: uppercase; letter-spacing: 4px; }
pre { background: #222; }
input, select, canvas, div, span, strong { border: 5px dashed green !important; }
</style>
<script type="module" src="${widget}embed.js"></script>
</head><body>
<article>
<h1>Training a small GPT on a 12 GB card</h1>
<p>Here is what the step costs. Drag the batch size.</p>
<vram-fit id="one" preset="nanogpt-30m" gpu="rtx-4070" show="batch_size,precision,gpu" plot="batch"></vram-fit>
<h2>The same for character-level Shakespeare</h2>
<pre><code>python train.py config/train_shakespeare_char.py</code></pre>
<vram-fit id="two" preset="shakespeare-char" gpu="t4" show="batch_size" lock="precision" plot="fitmap" theme="dark"></vram-fit>
<h2>Without torch.compile</h2>
<vram-fit id="eager" preset="nanogpt-30m" gpu="rtx-4070" compile="false" show="compile,batch_size" plot="none"></vram-fit>
<h2>A broken one</h2>
<vram-fit id="bad" config='{"model": {"family": "gpt2", "n_layer": 0, "n_head": 6, "n_embd": 384, "block_size": 64, "vocab_size": 65}}'></vram-fit>
<h2>As an iframe</h2>
<iframe id="frame" title="vramfit" src="${widget}embed.html?preset=gpt2&gpu=rtx-4090&plot=timeline" width="100%" height="300"></iframe>
<p>The end.</p>
</article>
</body></html>`;
}

before(async () => {
  widgetServer = await serve(WIDGET_PORT);
  blogDir = mkdtempSync(join(tmpdir(), 'vramfit-blog-'));
  // A different origin: the blog on localhost, the widget on 127.0.0.1.
  writeFileSync(join(blogDir, 'index.html'), blogHtml(`http://127.0.0.1:${WIDGET_PORT}/`));
  blogServer = await serve(BLOG_PORT, blogDir, true);
  context = await launch();
});

after(async () => {
  await context?.close();
  widgetServer?.close();
  blogServer?.close();
});

async function openBlog() {
  const page = await context.newPage();
  const requests = [];
  const errors = [];
  page.on('request', (r) => requests.push(r.url()));
  page.on('pageerror', (e) => errors.push(e.message));
  await page.addInitScript(() => {
    window.__heights = [];
    addEventListener('message', (e) => { if (e.data?.type === 'vramfit:height') window.__heights.push(e.data.height); });
  });
  await page.goto(`http://localhost:${BLOG_PORT}/index.html`);
  await page.waitForFunction(() => ['one', 'two', 'eager', 'bad'].every((id) => document.getElementById(id).dataset.status), null, { timeout: 20000 });
  return { page, requests, errors };
}

const peakOf = (page, id) => page.evaluate((i) => Number(document.getElementById(i).dataset.peakBytes), id);

test('two widgets render on a foreign page and compute their own totals', async () => {
  const { page, errors } = await openBlog();
  assert.equal(await peakOf(page, 'one'), cliPeakBytes(['--preset', 'nanogpt-30m']));
  assert.equal(await peakOf(page, 'two'), cliPeakBytes(['--preset', 'shakespeare-char', '--gpu', 't4']));
  const text = await page.evaluate(() => document.getElementById('one').shadowRoot.textContent);
  assert.match(text, /Peak allocated/);
  assert.match(text, /fits in 11\.99 GiB/);
  const drawn = await page.evaluate(() => {
    const c = document.getElementById('two').shadowRoot.querySelector('canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] !== d[0] || d[i + 1] !== d[1]) n += 1;
    return n;
  });
  assert.ok(drawn > 5000, `fit map drawn (${drawn} pixels)`);
  await page.screenshot({ path: join(ARTIFACTS, 'embed.png'), fullPage: true });
  assert.deepEqual(errors, []);
  await page.close();
});

test('changing one widget leaves the other alone', async () => {
  const { page } = await openBlog();
  const two = await peakOf(page, 'two');
  const one = await peakOf(page, 'one');
  await page.evaluate(() => {
    const input = document.getElementById('one').shadowRoot.querySelector('input[name=batch_size]');
    input.value = '4';
    input.dispatchEvent(new Event('input'));
  });
  assert.ok((await peakOf(page, 'one')) < one);
  assert.equal(await peakOf(page, 'two'), two);
  assert.equal(await page.evaluate(() => document.getElementById('two').shadowRoot.querySelectorAll('input').length), 1, 'show="batch_size"');
  await page.close();
});

test("the host page's hostile CSS changes nothing inside the widget", async () => {
  const { page } = await openBlog();
  const style = await page.evaluate(() => {
    const strong = document.getElementById('one').shadowRoot.querySelector('.totals strong');
    const input = document.getElementById('one').shadowRoot.querySelector('input');
    const cs = getComputedStyle(strong);
    return { color: cs.color, size: cs.fontSize, family: cs.fontFamily, border: getComputedStyle(input).borderTopStyle };
  });
  assert.notEqual(style.color, 'rgb(255, 0, 0)');
  assert.equal(style.size, '18px');
  assert.doesNotMatch(style.family, /^serif$/);
  assert.notEqual(style.border, 'dashed');
  // And the widget's styles do not leak out: the article keeps the host's look.
  assert.equal(await page.evaluate(() => getComputedStyle(document.querySelector('article p')).color), 'rgb(255, 0, 0)');
  await page.close();
});

test('the widget can be used with the keyboard alone', async () => {
  const { page } = await openBlog();
  const before = await peakOf(page, 'one');
  let focused = '';
  for (let i = 0; i < 10 && focused !== 'batch_size'; i++) {
    await page.keyboard.press('Tab');
    focused = await page.evaluate(() => document.getElementById('one').shadowRoot.activeElement?.name || '');
  }
  assert.equal(focused, 'batch_size');
  await page.keyboard.press('ArrowUp');
  assert.ok((await peakOf(page, 'one')) > before, 'ArrowUp raised the batch and the total');
  await page.close();
});

test('every request goes to the widget origin (besides the post itself)', async () => {
  const { page, requests } = await openBlog();
  await page.waitForTimeout(300);
  const others = requests.filter((r) => !r.startsWith(`http://127.0.0.1:${WIDGET_PORT}/`) && r !== `http://localhost:${BLOG_PORT}/index.html`);
  assert.deepEqual(others, []);
  await page.close();
});

test('the iframe embed renders and reports its height; a bad config shows a message, not a blank box', async () => {
  const { page } = await openBlog();
  // Chromium throttles rendering in a cross-origin iframe below the fold (no animation frames, no resize
  // observations), so the frame reports its height once a reader scrolls to it, as a person would.
  await page.locator('#frame').scrollIntoViewIfNeeded();
  await page.waitForFunction(() => window.__heights.some((h) => h > 200), null, { timeout: 60000 });
  const heights = await page.evaluate(() => window.__heights);
  assert.ok(heights.at(-1) > 200, `height ${heights.at(-1)}`);
  const frame = page.frame({ url: /embed\.html/ });
  await frame.waitForFunction(() => document.querySelector('vram-fit')?.dataset.status === 'ok');
  assert.match(await frame.evaluate(() => document.querySelector('vram-fit').shadowRoot.textContent), /Peak allocated/);
  const bad = await page.evaluate(() => document.getElementById('bad').shadowRoot.textContent);
  assert.match(bad, /model\.n_layer \(0\) must be at least 1/);
  await page.close();
});

test('attribute changes re-render, and payloads in widget attributes show as text and never run', async () => {
  const { page } = await openBlog();
  const before = await peakOf(page, 'two');
  await page.evaluate(() => document.getElementById('two').setAttribute('preset', 'gpt2'));
  await page.waitForFunction((b) => Number(document.getElementById('two').dataset.peakBytes) !== b, before);
  assert.equal(await peakOf(page, 'two'), cliPeakBytes(['--preset', 'gpt2', '--gpu', 't4']));
  const payload = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>';
  for (const attr of ['preset', 'config', 'state', 'gpu', 'compile', 'alloc-conf', 'show', 'lock', 'plot', 'theme']) {
    await page.evaluate(([a, p]) => {
      const w = document.createElement('vram-fit');
      w.id = `hostile-${a}`;
      w.setAttribute(a, p);
      document.body.append(w);
    }, [attr, payload]);
    await page.waitForFunction((a) => document.getElementById(`hostile-${a}`).dataset.status, attr);
    const inside = await page.evaluate((a) => {
      const root = document.getElementById(`hostile-${a}`).shadowRoot;
      return { imgs: root.querySelectorAll('img, script').length, text: root.textContent };
    }, attr);
    assert.equal(inside.imgs, 0, attr);
    // Every attribute's bad value is its message, the payload in it as text (show, lock, plot and theme too).
    assert.ok(inside.text.includes('<img src'), `${attr}: shown as text: ${inside.text.slice(0, 120)}`);
  }
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
  await page.close();
});

test('the compile attribute and knob switch a widget between eager and compiled', async () => {
  const { page, errors } = await openBlog();
  const compiled = cliPeakBytes(['--preset', 'nanogpt-30m']);
  const eager = cliPeakBytes(['--preset', 'nanogpt-30m', '--no-compile']);
  assert.ok(eager > compiled, `eager ${eager} vs compiled ${compiled}`);
  assert.equal(await peakOf(page, 'eager'), eager);
  const text = () => page.evaluate(() => document.getElementById('eager').shadowRoot.textContent);
  assert.match(await text(), /torch\.compile saves [\d.]+ GiB here .*mostly in the logits/);
  // The knob inside the widget turns compile back on.
  await page.evaluate(() => document.getElementById('eager').shadowRoot.querySelector('input[name=compile]').click());
  await page.waitForFunction((c) => Number(document.getElementById('eager').dataset.peakBytes) === c, compiled);
  // A bad attribute value is a message, not a guess.
  await page.evaluate(() => document.getElementById('eager').setAttribute('compile', 'constructor'));
  await page.waitForFunction(() => document.getElementById('eager').dataset.status === 'error');
  assert.match(await text(), /the compile attribute \("constructor"\) must be true or false/);
  assert.deepEqual(errors, []);
  await page.close();
});

// The audit: a show= or plot= value the widget does not have was dropped without a word (a widget without the
// knob or the plot asked for, or with none at all). Each is the widget's one message, naming the attribute, the
// value and the values it takes; the widget's known values keep working.
test('unknown show, lock, plot and theme values are said in the widget, with the values it takes', async () => {
  const { page, errors } = await openBlog();
  const knobs = 'batch_size, seq_len, block_size, n_layer, n_embd, n_head, vocab_size, precision, optimizer, attention, '
    + 'checkpointing, grad_accum_steps, dropout, gpu, sms, zero_grad_set_to_none, compile, alloc_conf, sliding_window, '
    + 'head_dim, rotary_dims, parallel_residual, n_experts, experts_per_token, shared_expert_size, norm_topk_prob, '
    + 'router_aux_loss, lora, lora_r, lora_alpha, lora_dropout, lora_target_modules, lora_modules_to_save, base_dtype, '
    + 'quantization, double_quant, parallel, gpus, reshard_after_forward, param_dtype, reduce_dtype, offload, '
    + 'bucket_cap_mb, gradient_as_bucket_view, static_graph, tp, init_on_device, sequence_parallel';
  const cases = [
    ['show', 'batch_size,batch_sise, colour', `vramfit: the show attribute ("batch_size,batch_sise, colour") names "batch_sise", "colour", which the widget does not have; its knobs are ${knobs}`],
    ['show', 'toString', `vramfit: the show attribute ("toString") names "toString", which the widget does not have; its knobs are ${knobs}`],
    ['lock', 'precison', `vramfit: the lock attribute ("precison") names "precison", which the widget does not have; its knobs are ${knobs}`],
    ['plot', 'histogram', 'vramfit: the plot attribute ("histogram") must be one of batch, block, fitmap, timeline, gpus, finetune, none'],
    ['plot', 'Batch', 'vramfit: the plot attribute ("Batch") must be one of batch, block, fitmap, timeline, gpus, finetune, none'],
    ['theme', 'blue', 'vramfit: the theme attribute ("blue") must be one of light, dark, auto'],
  ];
  for (const [i, [attr, value, message]] of cases.entries()) {
    const id = `unknown-${i}`;
    await page.evaluate(([wid, a, v]) => {
      const w = document.createElement('vram-fit');
      w.id = wid;
      for (const [k, x] of [['preset', 'nanogpt-30m'], ['gpu', 'rtx-4070'], ['show', 'batch_size'], [a, v]]) w.setAttribute(k, x);
      document.body.append(w);
    }, [id, attr, value]);
    await page.waitForFunction((wid) => document.getElementById(wid).dataset.status, id);
    const seen = await page.evaluate((wid) => {
      const w = document.getElementById(wid);
      const root = w.shadowRoot;
      return { status: w.dataset.status, title: root.querySelector('.title')?.textContent, error: root.querySelector('.error')?.textContent,
        inputs: root.querySelectorAll('input, select').length, canvases: root.querySelectorAll('canvas').length };
    }, id);
    assert.deepEqual(seen, { status: 'error', title: "vramfit could not read this widget's settings", error: message, inputs: 0, canvases: 0 }, `${attr}=${value}`);
    // The value put right, the widget estimates: its knobs, its plot.
    const good = { show: 'batch_size,precision', lock: 'precision', plot: 'timeline', theme: 'dark' }[attr];
    await page.evaluate(([wid, a, v]) => document.getElementById(wid).setAttribute(a, v), [id, attr, good]);
    await page.waitForFunction((wid) => document.getElementById(wid).dataset.status === 'ok', id);
    const fixed = await page.evaluate((wid) => {
      const root = document.getElementById(wid).shadowRoot;
      return { error: root.querySelector('.error').textContent, knobs: [...root.querySelectorAll('input, select')].map((e) => e.name),
        canvases: root.querySelectorAll('canvas').length };
    }, id);
    assert.equal(fixed.error, '', `${attr}=${good}`);
    assert.deepEqual(fixed.knobs, attr === 'show' ? ['batch_size', 'precision'] : ['batch_size'], `${attr}=${good}`);
    assert.equal(fixed.canvases, 1, `${attr}=${good}`);
    assert.equal(Number(await peakOf(page, id)), cliPeakBytes(['--preset', 'nanogpt-30m']), `${attr}=${good}`);
  }
  // Blank entries and surrounding spaces are no values: the knobs named are shown.
  await page.evaluate(() => {
    const w = document.createElement('vram-fit');
    w.id = 'spaced';
    for (const [k, x] of [['preset', 'nanogpt-30m'], ['show', ' batch_size, ,precision,'], ['plot', ' none ']]) w.setAttribute(k, x);
    document.body.append(w);
  });
  await page.waitForFunction(() => document.getElementById('spaced').dataset.status === 'ok');
  assert.deepEqual(await page.evaluate(() => [...document.getElementById('spaced').shadowRoot.querySelectorAll('input, select')].map((e) => e.name)),
    ['batch_size', 'precision']);
  assert.equal(await page.evaluate(() => document.getElementById('spaced').shadowRoot.querySelectorAll('canvas').length), 0);
  assert.deepEqual(errors, []);
  await page.close();
});
