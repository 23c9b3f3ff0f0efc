// Hostile input: script and markup payloads in every URL parameter and in pasted configs show as text and run
// nothing; a panic inside wasm becomes a visible internal error and the page stays usable.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { serve, launch, openPage, canvasPixels, setField } from './helpers.mjs';

const KEYS = ['family', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'intermediate_size', 'vocab_size', 'block_size',
  'bias', 'tie_embeddings', 'dropout', 'batch_size', 'seq_len', 'precision', 'optimizer', 'attention',
  'checkpointing', 'grad_accum_steps', 'grad_clip', 'zero_grad_set_to_none', 'alloc_conf', 'memory_gib', 'compute_capability', 'sms', 'gpu',
  'preset', 'plot'];
const PAYLOADS = ['<img src=x onerror="window.__pwned=1">', '"><script>window.__pwned=1</script>',
  "javascript:window.__pwned=1", '<svg onload="window.__pwned=1">'];

let server;
let context;
before(async () => { server = await serve(8764); context = await launch(); });
after(async () => { await context?.close(); server?.close(); });

test('payloads in every URL parameter are shown as text and never run', async () => {
  for (const payload of PAYLOADS) {
    for (const key of KEYS) {
      const page = await context.newPage();
      const url = `${server.url}?family=gpt2&n_layer=2&n_head=2&n_embd=64&block_size=64&vocab_size=65&${key}=${encodeURIComponent(payload)}`;
      await page.goto(url);
      await page.waitForSelector('body[data-ready=true]', { timeout: 20000 });
      assert.equal(await page.evaluate(() => window.__pwned), undefined, `${key}: ${payload}`);
      assert.equal(await page.locator('img[src=x], svg[onload], body script:not([src])').count(), 0, key);
      const shown = await page.evaluate(() => [...document.querySelectorAll('.field-error, #global-error')].map((e) => e.textContent).join(' '));
      if (!['gpu', 'preset', 'plot'].includes(key)) assert.ok(shown.includes(payload.slice(0, 12)), `${key}: message shows the payload as text: ${shown}`);
      await page.close();
    }
  }
});

test('payloads in pasted configs are shown as text and never run', async () => {
  const { page } = await openPage(context, server.url);
  for (const payload of PAYLOADS) {
    for (const text of [`n_layer = ${payload}`, `{"model": {"family": "${payload.replaceAll('"', '\\"')}"}}`, payload]) {
      await page.fill('#paste', text);
      await page.click('#paste-load');
      assert.equal(await page.evaluate(() => window.__pwned), undefined, text);
      assert.notEqual(await page.textContent('#paste-error'), '', text);
    }
  }
  assert.equal(await page.locator('img[src=x], svg[onload]').count(), 0);
  await page.close();
});

test('a panic inside wasm shows an internal error, keeps the last view and the page stays usable', async () => {
  const { page: first } = await openPage(context, server.url);
  const url = first.url();
  await first.close();
  const { page } = await openPage(context, `${url}&__test_panic=1`);
  await page.waitForFunction(() => document.getElementById('global-error').textContent.includes('internal error'));
  assert.match(await page.textContent('#global-error'), /deliberate panic/);
  const total = await page.textContent('#peak-allocated');
  assert.match(total, /GiB$/, 'the last good view stays');
  assert.ok((await canvasPixels(page, 'plot-batch')).drawn > 5000);
  await setField(page, 'batch_size', 8);
  assert.notEqual(await page.textContent('#peak-allocated'), total);
  assert.equal(await page.textContent('#global-error'), '');
  await page.close();
});
