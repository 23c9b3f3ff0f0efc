// End-to-end tests of the page in real headless Chromium (Debian's), driven by playwright-core.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { setUp, openPage, canvasPixels, setField, cliPeakBytes, waitRender, settled, ARTIFACTS } from './helpers.mjs';

const PORT = 8761;

const env = setUp({ port: PORT });

test('the page loads with the default nanoGPT case and its total matches the native estimator', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  const text = await page.textContent('#peak-allocated');
  assert.match(text, /^\d+(\.\d+)? GiB$/);
  const bytes = Number(await page.getAttribute('#peak-allocated', 'data-bytes'));
  // The default: nanoGPT 6x384, block 512, batch 16, vocab 50304, fp16-amp, fused AdamW, on an RTX 4070 (sm_89).
  assert.equal(bytes, cliPeakBytes(['--compute-capability', '8.9', '--gpu-memory-gib', '12']));
  assert.equal(await page.inputValue('#n_embd'), '384');
  assert.equal(await page.isVisible('#n_kv_head'), false, 'llama-only fields are hidden for gpt2');
  const formRight = await page.evaluate(() => document.getElementById('form').getBoundingClientRect().right);
  const resultsLeft = await page.evaluate(() => document.getElementById('results').getBoundingClientRect().left);
  const widest = await page.evaluate(() => Math.max(...[...document.querySelectorAll('#form select, #form textarea, #form input')].map((e) => e.getBoundingClientRect().right)));
  assert.ok(widest <= formRight + 1 && formRight <= resultsLeft, 'the form stays in its column');
  assert.match(await page.textContent('#sentence'), /largest item at the peak is logits/);
  assert.match(await page.textContent('#verdict'), /fits in 11\.99 GiB/);
  for (const id of ['plot-batch', 'plot-block', 'plot-fitmap', 'plot-timeline']) {
    const px = await canvasPixels(page, id);
    assert.ok(px.drawn > 5000, `${id} has ${px.drawn} drawn pixels`);
  }
  await page.screenshot({ path: join(ARTIFACTS, 'page.png'), fullPage: true });
  assert.deepEqual(errors, []);
  await page.close();
});

test('eager and compiled side by side; the compile toggle switches the estimate', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  const gpu = ['--compute-capability', '8.9', '--gpu-memory-gib', '12'];
  // The default case is compiled, as nanoGPT's train.py runs it.
  assert.equal(await page.isChecked('#compile'), true);
  assert.equal(await page.isVisible('#compare'), true);
  assert.match(await page.getAttribute('#compare-compiled-box', 'class'), /current/);
  const sentence = await page.textContent('#compare-sentence');
  assert.match(sentence, /^torch\.compile saves [\d.]+ GiB here \(eager [\d.]+ GiB -> compiled [\d.]+ GiB\), mostly in the logits/);
  assert.equal(await page.textContent('#compare-compiled'), await page.textContent('#peak-allocated'));
  await page.uncheck('#compile');
  await page.waitForFunction(() => !new URLSearchParams(location.search).has('compile') || new URLSearchParams(location.search).get('compile') === '0');
  const eager = Number(await page.getAttribute('#peak-allocated', 'data-bytes'));
  assert.equal(eager, cliPeakBytes(['--no-compile', ...gpu]));
  assert.equal(await page.textContent('#compare-eager'), await page.textContent('#peak-allocated'));
  assert.match(await page.getAttribute('#compare-eager-box', 'class'), /current/);
  assert.equal(await page.textContent('#compare-sentence'), sentence, 'the comparison does not depend on the mode');
  // "How to make it fit" offers compile when it is off, and applying it gives the compiled total.
  const advice = await page.textContent('#advice');
  assert.match(advice, /torch\.compile\(model\)/);
  // A Hugging Face preset is eager (as a plain HF loop runs it), with its compiled figure beside.
  await page.selectOption('#preset', 'tinyllama-1.1b');
  await page.waitForFunction(() => document.getElementById('family').value === 'llama');
  assert.equal(await page.isChecked('#compile'), false);
  assert.equal(await page.isVisible('#compare'), true);
  assert.match(await page.getAttribute('#compare-eager-box', 'class'), /current/);
  // With checkpointing, compile is modelled too (each block recomputed in the backward graph): the comparison
  // stays, and turning compile on gives its compiled figure.
  const eagerNoCkpt = await page.textContent('#peak-allocated');
  await page.check('#checkpointing');
  await page.waitForFunction((t) => document.getElementById('peak-allocated').textContent !== t, eagerNoCkpt);
  assert.equal(await page.isVisible('#compare'), true);
  const compiledCkpt = await page.textContent('#compare-compiled');
  await page.check('#compile');
  await page.waitForFunction(() => /current/.test(document.getElementById('compare-compiled-box').className));
  assert.equal(await page.textContent('#peak-allocated'), compiledCkpt);
  assert.deepEqual(errors, []);
  await page.close();
});

test('changing the batch size changes the total and the plots; the GPU line moves with the GPU', async () => {
  const { page } = await openPage(env.context, env.server.url);
  const total = await page.textContent('#peak-allocated');
  const plot = await canvasPixels(page, 'plot-batch');
  await setField(page, 'batch_size', 8);
  assert.notEqual(await page.textContent('#peak-allocated'), total);
  assert.notEqual((await canvasPixels(page, 'plot-batch')).hash, plot.hash);
  const bytes8 = Number(await page.getAttribute('#peak-allocated', 'data-bytes'));
  assert.equal(bytes8, cliPeakBytes(['--batch-size', '8', '--compute-capability', '8.9', '--gpu-memory-gib', '12']));

  const before = await canvasPixels(page, 'plot-batch');
  await page.selectOption('#gpu', 'rtx-4090');
  await page.waitForFunction(() => document.getElementById('memory_gib').value === '23.98828125');
  assert.notEqual((await canvasPixels(page, 'plot-batch')).hash, before.hash);
  assert.match(await page.textContent('#verdict'), /23\.98 GiB/);
  await page.close();
});

test('bad input shows a message next to the field and keeps the last good view', async () => {
  const { page } = await openPage(env.context, env.server.url);
  const total = await page.textContent('#peak-allocated');
  const plot = await canvasPixels(page, 'plot-batch');
  await setField(page, 'n_head', 7);
  assert.equal(await page.textContent('.field-error[data-for="n_embd"]'), 'model.n_embd (384) must be divisible by model.n_head (7)');
  assert.equal(await page.getAttribute('#n_embd', 'aria-invalid'), 'true');
  assert.equal(await page.textContent('#peak-allocated'), total);
  assert.equal((await canvasPixels(page, 'plot-batch')).hash, plot.hash);
  await setField(page, 'batch_size', 0);
  await setField(page, 'n_head', 6);
  assert.equal(await page.textContent('.field-error[data-for="batch_size"]'), 'train.batch_size (0) must be at least 1');
  await setField(page, 'batch_size', 16);
  assert.equal(await page.textContent('#global-error'), '');
  assert.equal(await page.textContent('#peak-allocated'), total);
  await page.close();
});

test('the URL holds every input: a link reproduces the view, back and forward work', async () => {
  const { page } = await openPage(env.context, env.server.url);
  await setField(page, 'batch_size', 4);
  await page.selectOption('#precision', 'bf16-amp');
  await page.waitForFunction(() => location.search.includes('precision=bf16-amp'));
  const url = page.url();
  const total = await page.textContent('#peak-allocated');
  const bytes = await page.getAttribute('#peak-allocated', 'data-bytes');
  const { page: copy } = await openPage(env.context, url);
  assert.equal(await copy.inputValue('#batch_size'), '4');
  assert.equal(await copy.inputValue('#precision'), 'bf16-amp');
  assert.equal(await copy.textContent('#peak-allocated'), total);
  await copy.close();
  await page.goBack();
  await page.waitForFunction(() => document.getElementById('precision').value === 'fp16-amp');
  // fp16 autocast adds GradScaler's scale and growth tracker: 1 KiB more than bf16.
  assert.equal(Number(await page.getAttribute('#peak-allocated', 'data-bytes')), Number(bytes) + 1024);
  await page.goForward();
  await page.waitForFunction(() => document.getElementById('precision').value === 'bf16-amp');
  assert.equal(await page.getAttribute('#peak-allocated', 'data-bytes'), bytes);
  await page.close();
});

test('pasted nanoGPT and Hugging Face configs fill the form', async () => {
  const { page } = await openPage(env.context, env.server.url);
  await page.fill('#paste', "# shakespeare\ndataset = 'shakespeare_char'\nbatch_size = 64\nblock_size = 256\nn_layer = 6\nn_head = 6\nn_embd = 384\ndropout = 0.2\n");
  await page.click('#paste-load');
  await page.waitForFunction(() => document.getElementById('vocab_size').value === '65');
  assert.equal(await page.inputValue('#batch_size'), '64');
  assert.equal(await page.inputValue('#dropout'), '0.2');
  assert.match(await page.textContent('#import-notes'), /dtype = 'bfloat16' \(train.py default\)/);
  await page.fill('#paste', JSON.stringify({ model_type: 'llama', hidden_size: 2048, intermediate_size: 5632,
    num_attention_heads: 32, num_hidden_layers: 22, num_key_value_heads: 4, vocab_size: 32000, max_position_embeddings: 2048 }));
  await page.click('#paste-load');
  await page.waitForFunction(() => document.getElementById('family').value === 'llama');
  assert.equal(await page.inputValue('#n_kv_head'), '4');
  assert.equal(await page.isVisible('#n_kv_head'), true);
  await page.fill('#paste', 'def not_a_config(): pass');
  await page.click('#paste-load');
  assert.match(await page.textContent('#paste-error'), /line 1: not an assignment/);
  await page.close();
});

test('every request the page makes stays on its own origin', async () => {
  const { page, requests } = await openPage(env.context, env.server.url);
  await page.waitForTimeout(300);
  assert.ok(requests.length >= 4);
  const foreign = requests.filter((r) => !r.startsWith(env.server.url));
  assert.deepEqual(foreign, []);
  await page.close();
});

test('after one visit the page reloads offline from the service worker', async () => {
  const { page } = await openPage(env.context, env.server.url);
  await page.evaluate(async () => { await navigator.serviceWorker.ready; });
  await page.reload();
  await page.waitForSelector('body[data-ready=true]');
  await env.context.setOffline(true);
  const response = await page.reload();
  assert.ok(response.fromServiceWorker(), 'served by the service worker');
  await page.waitForSelector('body[data-ready=true]', { timeout: 20000 });
  assert.match(await page.textContent('#peak-allocated'), /GiB$/);
  await env.context.setOffline(false);
  await page.close();
});

// The audit: a reloaded link showed the preset box as "custom" though the page held a preset's values unchanged.
test('a reloaded link names its preset while the values are the preset\'s, and "custom" once one departs', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  const preset = () => page.inputValue('#preset');
  const reload = async () => {
    await page.reload();
    await page.waitForSelector('body[data-ready=true]', { timeout: 20000 });
  };
  assert.equal(await preset(), 'nanogpt-30m');
  await reload();
  assert.equal(await preset(), 'nanogpt-30m', 'the default case, reloaded');
  // Every preset, chosen and then reloaded from its URL, is still named.
  const ids = await page.$$eval('#preset option', (os) => os.map((o) => o.value).filter(Boolean));
  assert.ok(ids.length >= 20, `${ids}`);
  for (const id of ids) {
    await waitRender(page, () => page.selectOption('#preset', id));
    assert.equal(await preset(), id, `${id} chosen`);
    await reload();
    assert.equal(await preset(), id, `${id} reloaded from ${await page.evaluate(() => location.search)}`);
  }
  // Another GPU keeps the preset's values (a preset keeps the GPU chosen).
  await waitRender(page, () => page.selectOption('#preset', 'llama-3.2-1b'));
  await waitRender(page, () => page.selectOption('#gpu', 'h100-80'));
  await reload();
  assert.equal(await preset(), 'llama-3.2-1b');
  assert.equal(await page.inputValue('#gpu'), 'h100-80');
  // A value that departs from the preset's is "custom", reloaded too; the preset's value back names it again.
  const layers = await page.inputValue('#n_layer');
  await setField(page, 'n_layer', Number(layers) + 1);
  assert.equal(await preset(), '');
  assert.equal(await page.textContent('#preset option:checked'), 'custom (your values)');
  await reload();
  assert.equal(await preset(), '');
  await setField(page, 'n_layer', layers);
  assert.equal(await preset(), 'llama-3.2-1b');
  await setField(page, 'batch_size', 3);
  assert.equal(await preset(), '', 'the batch size is part of the preset');
  assert.deepEqual(errors, []);
  await page.close();
});

test('a deep model draws its headline at once and the rest after; a newer input abandons the older update', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  const plot = await canvasPixels(page, 'plot-batch');
  // One task: choose Llama-3.1-70B (on the RTX 4070 the page starts with). The figures are the preset's at once;
  // the advice and plots are still the last setup's, dimmed, and the render is not counted yet.
  const r = await page.evaluate(() => {
    const before = document.body.dataset.estimated;
    const advice = document.getElementById('advice').textContent;
    const select = document.getElementById('preset');
    select.value = 'llama-3.1-70b';
    select.dispatchEvent(new Event('change', { bubbles: true }));
    return {
      before,
      busy: document.getElementById('results').getAttribute('aria-busy'),
      bytes: Number(document.getElementById('peak-allocated').dataset.bytes),
      adviceKept: document.getElementById('advice').textContent === advice,
      estimated: document.body.dataset.estimated,
      opacity: getComputedStyle(document.getElementById('plot-batch')).opacity,
    };
  });
  assert.equal(r.busy, 'true');
  assert.equal(r.bytes, cliPeakBytes(['--preset', 'llama-3.1-70b', '--gpu', 'rtx-4070']));
  assert.ok(r.adviceKept, 'the advice is drawn after the headline');
  assert.equal(r.estimated, r.before, 'the render counts once it is whole');
  assert.equal(r.opacity, '0.5');
  await settled(page);
  assert.equal(await page.evaluate(() => document.body.dataset.estimated), String(Number(r.before) + 1));
  assert.notEqual((await canvasPixels(page, 'plot-batch')).hash, plot.hash);
  assert.match(await page.textContent('#largest-batch'), /none/);
  assert.equal(await page.evaluate(() => getComputedStyle(document.getElementById('plot-batch')).opacity), '1');
  // Two changes in one task: the first update's later steps never run (its render is never counted); the second's do.
  const before = await page.evaluate(() => {
    const before = document.body.dataset.estimated;
    const input = document.getElementById('batch_size');
    for (const v of ['2', '3']) {
      input.value = v;
      input.dispatchEvent(new Event('change', { bubbles: true }));
    }
    return before;
  });
  await settled(page);
  await page.waitForTimeout(300);
  assert.equal(await page.evaluate(() => document.body.dataset.estimated), String(Number(before) + 1));
  assert.equal(Number(await page.getAttribute('#peak-allocated', 'data-bytes')),
    cliPeakBytes(['--preset', 'llama-3.1-70b', '--gpu', 'rtx-4070', '--batch-size', '3']));
  // A shallower model (the founding case, 6 layers) is one redraw: everything is drawn within the change event.
  await page.selectOption('#preset', 'nanogpt-30m');
  const small = await page.evaluate(() => {
    const input = document.getElementById('batch_size');
    const before = document.body.dataset.estimated;
    input.value = '8';
    input.dispatchEvent(new Event('change', { bubbles: true }));
    return { busy: document.getElementById('results').getAttribute('aria-busy'), counted: document.body.dataset.estimated !== before };
  });
  assert.deepEqual(small, { busy: null, counted: true });
  assert.deepEqual(errors, []);
  await page.close();
});
