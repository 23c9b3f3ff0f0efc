// PYTORCH_CUDA_ALLOC_CONF as a knob (issue 10, item 5): the page's field, its place in the URL, its messages, the
// widget's alloc-conf attribute and the "expandable segments" advice, each checked against the native CLI.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setUp, openPage, canvasPixels, setField, cliEstimate, waitRender } from './helpers.mjs';

const PAGE_PORT = 8781;
const WIDGET_PORT = 8782;
const BLOG_PORT = 8783;
// The page's default view: the founding nanoGPT case on an RTX 4070.
const GPU = ['--compute-capability', '8.9', '--gpu-memory-gib', '12'];

const reservedOf = async (page) => Number(await page.getAttribute('#peak-reserved', 'data-bytes'));

const env = setUp({ port: PAGE_PORT, widgetPort: WIDGET_PORT, blogPort: BLOG_PORT, blog: { title: 'Fragmentation', body: `<vram-fit id="plain" preset="nanogpt-30m" gpu="rtx-4070" show="alloc_conf,batch_size" plot="none"></vram-fit>
<vram-fit id="expandable" preset="nanogpt-30m" gpu="rtx-4070" alloc-conf="expandable_segments:True" show="alloc_conf,batch_size" plot="none"></vram-fit>
<vram-fit id="refused" preset="nanogpt-30m" alloc-conf="max_split_size_mb:8" plot="none"></vram-fit>` } });

test('the page knob changes the reserved figure as the CLI does and goes into the URL', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  assert.equal(await page.inputValue('#alloc_conf'), '', 'PyTorch defaults: the field is empty');
  assert.ok(!new URL(page.url()).searchParams.has('alloc_conf'), 'an empty knob stays out of the URL');
  const plain = cliEstimate(GPU);
  assert.equal(await reservedOf(page), plain.peak_reserved_bytes);
  const allocated = await page.getAttribute('#peak-allocated', 'data-bytes');
  await setField(page, 'alloc_conf', 'expandable_segments:True');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('alloc_conf') === 'expandable_segments:True');
  const expandable = cliEstimate([...GPU, '--alloc-conf', 'expandable_segments:True']);
  assert.ok(expandable.peak_reserved_bytes < plain.peak_reserved_bytes, 'expandable segments reserve less here');
  assert.equal(await reservedOf(page), expandable.peak_reserved_bytes);
  // The same tensors; peak allocated counts the allocator's blocks, which expandable segments place otherwise.
  assert.equal(allocated, String(plain.peak_allocated_bytes));
  assert.equal(expandable.peak_tensor_bytes, plain.peak_tensor_bytes, 'the same tensors');
  assert.equal(await page.getAttribute('#peak-allocated', 'data-bytes'), String(expandable.peak_allocated_bytes));
  // The link reproduces the view; back goes to PyTorch's defaults and empties the field.
  const { page: copy } = await openPage(env.context, page.url());
  assert.equal(await copy.inputValue('#alloc_conf'), 'expandable_segments:True');
  assert.equal(await reservedOf(copy), expandable.peak_reserved_bytes);
  await copy.close();
  // Back from a later change keeps the knob (the URL holds it).
  await page.selectOption('#precision', 'bf16-amp');
  await page.waitForFunction(() => location.search.includes('precision=bf16-amp'));
  await page.goBack();
  await page.waitForFunction(() => document.getElementById('precision').value === 'fp16-amp');
  assert.equal(await page.inputValue('#alloc_conf'), 'expandable_segments:True');
  assert.equal(await reservedOf(page), expandable.peak_reserved_bytes);
  assert.deepEqual(errors, []);
  await page.close();
});

test('a value PyTorch refuses shows its message next to the field and keeps the last good view', async () => {
  const { page } = await openPage(env.context, env.server.url);
  await setField(page, 'alloc_conf', 'max_split_size_mb:256');
  await page.waitForFunction(() => location.search.includes('alloc_conf=max_split_size_mb'));
  const reserved = await page.textContent('#peak-reserved');
  const url = page.url();
  const plot = await canvasPixels(page, 'plot-batch');
  await setField(page, 'alloc_conf', 'max_split_size_mb:16');
  assert.equal(await page.textContent('.field-error[data-for="alloc_conf"]'),
    'train.alloc_conf ("max_split_size_mb:16") max_split_size_mb (16) must be at least 20: PyTorch\'s minimum, the 20 MiB segments the large pool shares');
  assert.equal(await page.getAttribute('#alloc_conf', 'aria-invalid'), 'true');
  assert.equal(await page.textContent('#peak-reserved'), reserved);
  assert.equal((await canvasPixels(page, 'plot-batch')).hash, plot.hash);
  assert.equal(page.url(), url, 'the URL keeps the last good state');
  await setField(page, 'alloc_conf', 'expandible_segments:True');
  assert.match(await page.textContent('.field-error[data-for="alloc_conf"]'), /has an unknown option "expandible_segments"/);
  await setField(page, 'alloc_conf', '');
  assert.equal(await page.textContent('.field-error[data-for="alloc_conf"]'), '');
  assert.equal(await page.getAttribute('#alloc_conf', 'aria-invalid'), null);
  // A bad value in a link is reported against the field too.
  const { page: linked } = await openPage(env.context, `${env.server.url}?alloc_conf=expandable_segments%3Ayes`);
  assert.match(await linked.textContent('.field-error[data-for="alloc_conf"]'), /train\.alloc_conf \("expandable_segments:yes"\) expandable_segments must be True or False/);
  await linked.close();
  await page.close();
});

test('where the allocator fragments, the advice suggests expandable segments with what they save', async () => {
  const { page } = await openPage(env.context, env.server.url);
  const plain = cliEstimate(GPU);
  const expandable = cliEstimate([...GPU, '--alloc-conf', 'expandable_segments:True']);
  // The default case: the compiled step's reserved memory is well above what it allocates.
  assert.ok(plain.peak_reserved_bytes - plain.peak_allocated_bytes > plain.peak_allocated_bytes / 20);
  const item = page.locator('#advice li', { hasText: 'PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True' });
  assert.equal(await item.count(), 1);
  const saving = plain.device_total_bytes - expandable.device_total_bytes;
  assert.ok(saving > 1 << 20, `saves ${saving} B`);
  assert.match(await item.textContent(), /: saves [\d.]+ MiB \(total /);
  await waitRender(page, () => item.locator('button').click());
  await page.waitForFunction(() => document.getElementById('alloc_conf').value === 'expandable_segments:True');
  assert.equal(await reservedOf(page), expandable.peak_reserved_bytes);
  assert.equal(new URL(page.url()).searchParams.get('alloc_conf'), 'expandable_segments:True');
  // Once set, it is not suggested again.
  assert.equal(await page.locator('#advice li', { hasText: 'PYTORCH_CUDA_ALLOC_CONF' }).count(), 0);
  // Back to the link without the knob: the field empties (PyTorch's defaults) and the figure returns.
  await page.goBack();
  await page.waitForFunction(() => document.getElementById('alloc_conf').value === '');
  assert.equal(await reservedOf(page), plain.peak_reserved_bytes);
  await page.goForward();
  await page.waitForFunction(() => document.getElementById('alloc_conf').value === 'expandable_segments:True');
  // Where it would not save anything (the eager step here), it is not suggested either.
  await page.fill('#alloc_conf', '');
  await page.uncheck('#compile');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('compile') === '0' && !location.search.includes('alloc_conf'));
  const eager = cliEstimate([...GPU, '--no-compile']);
  const eagerExpandable = cliEstimate([...GPU, '--no-compile', '--alloc-conf', 'expandable_segments:True']);
  assert.ok(eagerExpandable.device_total_bytes >= eager.device_total_bytes, 'no saving for the eager case');
  assert.equal(await page.locator('#advice li', { hasText: 'PYTORCH_CUDA_ALLOC_CONF' }).count(), 0);
  await page.close();
});

test('the widget takes an alloc-conf attribute and an alloc_conf knob; a refused value is its message', async () => {
  const page = await env.context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`http://localhost:${BLOG_PORT}/index.html`);
  await page.waitForFunction(() => ['plain', 'expandable', 'refused'].every((id) => document.getElementById(id).dataset.status), null, { timeout: 20000 });
  const text = (id) => page.evaluate((i) => document.getElementById(i).shadowRoot.textContent, id);
  const field = (id) => page.evaluate((i) => document.getElementById(i).shadowRoot.querySelector('input[name=alloc_conf]').value, id);
  assert.equal(await field('plain'), '');
  assert.equal(await field('expandable'), 'expandable_segments:True');
  // "On the device" is reserved plus the CUDA context: it follows the allocator's knobs.
  const onDevice = (t) => /On the device([\d.]+ [KMG]iB)/.exec(t)[1];
  const plainText = await text('plain');
  assert.notEqual(onDevice(await text('expandable')), onDevice(plainText));
  // Typing the knob into the plain widget gives the same figure as the attribute.
  await page.evaluate(() => {
    const input = document.getElementById('plain').shadowRoot.querySelector('input[name=alloc_conf]');
    input.value = 'expandable_segments:True';
    input.dispatchEvent(new Event('input'));
  });
  assert.equal(onDevice(await text('plain')), onDevice(await text('expandable')));
  assert.equal(await page.evaluate(() => document.getElementById('refused').dataset.status), 'error');
  assert.match(await text('refused'), /train\.alloc_conf \("max_split_size_mb:8"\) max_split_size_mb \(8\) must be at least 20/);
  // Changing the attribute re-renders.
  await page.evaluate(() => document.getElementById('refused').setAttribute('alloc-conf', 'max_split_size_mb:64'));
  await page.waitForFunction(() => document.getElementById('refused').dataset.status === 'ok');
  assert.deepEqual(errors, []);
  await page.close();
});
