// What a person types wrong, on the page and in the widget (found by an audit of both as a person fine-tuning a
// model would use them): an empty box is named instead of estimated as a default nobody sees, figures that are no
// longer the form's are greyed, and a widget that never estimated shows its message without empty figures or plot.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setUp, openPage, setField, canvasPixels } from './helpers.mjs';

const PORT = 8851;
const WIDGET_PORT = 8852;
const BLOG_PORT = 8853;

const env = setUp({
  port: PORT,
  widgetPort: WIDGET_PORT,
  blogPort: BLOG_PORT,
  blog: {
    title: 'Fine-tuning on a 24 GB card',
    body: `<vram-fit id="gpt2-qlora" preset="gpt2" gpu="rtx-4090" finetune="qlora" show="batch_size,precision" plot="batch"></vram-fit>
<vram-fit id="llama" preset="llama-3.2-1b" gpu="rtx-4090" show="batch_size,precision" plot="batch"></vram-fit>`,
  },
});

const fieldError = (page, id) => page.textContent(`.field-error[data-for="${id}"]`);

// An empty batch size estimated batch 12 (train's default) and an empty memory 80 GiB ("fits in 80.0 GiB" on a
// custom GPU whose box was empty), with no word about either.
test('an empty box that needs a value is named next to it, not estimated as a default', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  const before = await page.getAttribute('#peak-allocated', 'data-bytes');
  await setField(page, 'batch_size', '');
  assert.equal(await fieldError(page, 'batch_size'), 'train.batch_size ("") must be a number');
  assert.equal(await page.getAttribute('#peak-allocated', 'data-bytes'), before, 'no estimate of another batch');
  await setField(page, 'batch_size', '16');
  assert.equal(await fieldError(page, 'batch_size'), '');
  await setField(page, 'memory_gib', '');
  assert.equal(await fieldError(page, 'memory_gib'), 'device.memory_gib ("") must be a number');
  assert.match(await page.textContent('#verdict'), /in 11\.99 GiB$/, 'the verdict is not made against 80 GiB');
  // Boxes whose empty value means a default say which, and still estimate.
  await setField(page, 'memory_gib', '12');
  assert.equal(await page.getAttribute('#seq_len', 'placeholder'), '= block size');
  await setField(page, 'seq_len', '');
  assert.equal(await fieldError(page, 'seq_len'), '');
  assert.equal(await page.textContent('#global-error'), '');
  assert.deepEqual(errors, []);
  await page.close();
});

// With an error in the form the page kept the last good figures as they were ("fits in 12.0 GiB", "16 x 512
// tokens" beside "train.batch_size (0) must be at least 1"), as if they were the form's.
test('figures that are no longer the form\'s are marked stale until the error is fixed', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  assert.equal(await page.getAttribute('#results', 'data-stale'), null);
  await setField(page, 'batch_size', '0');
  assert.equal(await fieldError(page, 'batch_size'), 'train.batch_size (0) must be at least 1');
  assert.equal(await page.getAttribute('#results', 'data-stale'), 'true');
  const opacity = (sel) => page.evaluate((s) => Number(getComputedStyle(document.querySelector(s)).opacity), sel);
  assert.ok(await opacity('#results .totals') < 0.5, 'the totals are greyed');
  assert.equal(await opacity('#global-error'), 1);
  await setField(page, 'batch_size', '8');
  assert.equal(await page.getAttribute('#results', 'data-stale'), null);
  assert.equal(await opacity('#results .totals'), 1);
  assert.deepEqual(errors, []);
  await page.close();
});

async function widget(page, id) {
  return page.evaluate((wid) => {
    const w = document.getElementById(wid);
    const r = w.shadowRoot;
    const visible = (e) => !!e && e.getClientRects().length > 0;
    return {
      status: w.dataset.status,
      heading: r.querySelector('.title').textContent,
      error: r.querySelector('.error').textContent,
      totals: visible(r.querySelector('.totals')),
      canvas: visible(r.querySelector('canvas')),
      stale: r.querySelector('.root').classList.contains('stale'),
      inputs: r.querySelectorAll('input, select').length,
    };
  }, id);
}

// finetune="qlora" on nanoGPT's GPT: the recipe reads, the estimate does not; the widget showed its inputs, empty
// totals and a blank plot under the message.
test('a widget whose setup cannot be estimated shows its message, no empty figures or plot', async () => {
  const page = await env.context.newPage();
  await page.goto(env.blogServer.url);
  await page.waitForFunction(() => ['gpt2-qlora', 'llama'].every((id) => document.getElementById(id)?.dataset.status));
  const w = await widget(page, 'gpt2-qlora');
  assert.equal(w.status, 'error');
  assert.match(w.error, /^not modelled: train\.lora on gpt2/);
  assert.equal(w.heading, 'vramfit could not estimate this setup');
  assert.equal(w.totals, false);
  assert.equal(w.canvas, false);
  assert.equal(w.inputs, 2, 'the inputs stay, to change the setup');
  // A widget that estimated once greys its figures while an input holds an error, and clears them when fixed.
  await page.locator('#llama [name=batch_size]').fill('0');
  await page.waitForFunction(() => document.getElementById('llama').dataset.status === 'error');
  let l = await widget(page, 'llama');
  assert.equal(l.error, 'train.batch_size (0) must be at least 1');
  assert.ok(l.stale && l.totals && l.canvas, 'the last figures stay, greyed');
  await page.locator('#llama [name=batch_size]').fill('2');
  await page.waitForFunction(() => document.getElementById('llama').dataset.status === 'ok');
  l = await widget(page, 'llama');
  assert.equal(l.stale, false);
  assert.ok((await page.evaluate(() => {
    const c = document.getElementById('llama').shadowRoot.querySelector('canvas');
    return c.width * c.height;
  })) > 0);
  await page.close();
});

// The page's plots keep being drawn under an error (not blank), greyed with the rest.
test('plots are not blanked by an error', async () => {
  const { page } = await openPage(env.context, env.server.url);
  await setField(page, 'n_head', '7');
  assert.equal(await fieldError(page, 'n_embd'), 'model.n_embd (384) must be divisible by model.n_head (7)');
  assert.ok((await canvasPixels(page, 'plot-batch')).drawn > 5000);
  await page.close();
});

// A setup JSON pasted with a device of its own: the page keeps the GPU selected (issue 12) and now says so; the
// pasted device was dropped without a word.
test('a pasted setup\'s own device is said to be left out', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.fill('#paste', '{"model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 100}, "device": {"memory_gib": 8}}');
  await page.click('#paste-load');
  await page.waitForFunction(() => document.getElementById('n_layer').value === '2');
  assert.match(await page.textContent('#import-notes'), /^the pasted setup's "device" is not used here: the GPU selected above stays/);
  assert.match(await page.textContent('#verdict'), /in 11\.99 GiB$/);
  assert.deepEqual(errors, []);
  await page.close();
});
