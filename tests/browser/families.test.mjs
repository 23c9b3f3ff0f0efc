// The Hugging Face families on the page (issue 12): mistral and qwen2 beside llama in the family list, their
// fields (KV heads, MLP width, tied embeddings, sliding window) shown for each, the sliding window in the URL,
// its limit as one message, and every estimate equal to the native CLI's.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { serve, serveBlogPost, launch, openPage, setField, cliPeakBytes } from './helpers.mjs';

const PORT = 8801;
const WIDGET_PORT = 8802;
const BLOG_PORT = 8803;
let server;
let widgetServer;
let blogServer;
let context;

before(async () => {
  server = await serve(PORT);
  widgetServer = await serve(WIDGET_PORT);
  blogServer = await serveBlogPost(BLOG_PORT, 'Qwen', `http://127.0.0.1:${WIDGET_PORT}/`, `<vram-fit id="qwen" preset="qwen2.5-0.5b" gpu="rtx-4070" show="sliding_window,seq_len" plot="none"></vram-fit>`);
  context = await launch();
});

after(async () => {
  await context?.close();
  server?.close();
  widgetServer?.close();
  blogServer?.close();
});

const peak = async (page) => Number(await page.getAttribute('#peak-allocated', 'data-bytes'));
const shown = async (page, id) => page.evaluate((i) => !document.getElementById(i).closest('.field').hidden, id);

test('the qwen2 preset estimates as the CLI does, with the Hugging Face fields shown', async () => {
  const { page, errors } = await openPage(context, server.url);
  await page.selectOption('#preset', 'qwen2.5-0.5b');
  await page.waitForFunction(() => document.getElementById('family').value === 'qwen2');
  for (const id of ['n_kv_head', 'intermediate_size', 'tie_embeddings', 'sliding_window']) {
    assert.ok(await shown(page, id), `${id} is shown for qwen2`);
  }
  assert.ok(!(await shown(page, 'bias')), 'gpt2\'s bias checkbox is hidden');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'qwen2');
  const gpu = ['--compute-capability', '8.9', '--gpu-memory-gib', '12'];
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'qwen2.5-0.5b', ...gpu]));
  assert.deepEqual(errors, []);
  await page.close();
});

test('a mistral with a sliding window: in the URL, Llama\'s estimate below it, its explicit mask at it', async () => {
  const query = 'family=mistral&n_layer=2&n_head=8&n_kv_head=2&n_embd=512&intermediate_size=1024&vocab_size=32000'
    + '&block_size=4096&tie_embeddings=0&sliding_window=1024&batch_size=2&seq_len=512&compile=0';
  const { page, errors } = await openPage(context, `${server.url}?${query}`);
  assert.equal(await page.inputValue('#family'), 'mistral');
  assert.equal(await page.inputValue('#sliding_window'), '1024');
  const args = ['--family', 'mistral', '--n-layer', '2', '--n-head', '8', '--n-kv-head', '2', '--n-embd', '512',
    '--intermediate-size', '1024', '--vocab-size', '32000', '--block-size', '4096', '--no-tie-embeddings',
    '--sliding-window', '1024', '--batch-size', '2', '--seq-len', '512', '--no-compile',
    '--compute-capability', '9.0', '--gpu-memory-gib', '80'];
  const below = await peak(page);
  assert.equal(below, cliPeakBytes(args));
  // Below the window, Mistral attends as Llama does.
  const llama = args.map((a) => (a === 'mistral' ? 'llama' : a)).filter((a, i, all) => a !== '--sliding-window' && all[i - 1] !== '--sliding-window');
  assert.equal(below, cliPeakBytes(llama));
  // At the window transformers passes an explicit mask: memory-efficient attention, K/V repeated; more memory
  // than the same model without a window.
  await setField(page, 'seq_len', '2048');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('seq_len') === '2048');
  const at = args.slice();
  at[at.indexOf('--seq-len') + 1] = '2048';
  assert.equal(await peak(page), cliPeakBytes(at));
  const noWindow = llama.slice();
  noWindow[noWindow.indexOf('--seq-len') + 1] = '2048';
  assert.ok(await peak(page) > cliPeakBytes(noWindow));
  // Under torch.compile it is not traced yet: one message.
  await page.check('#compile');
  await page.dispatchEvent('#compile', 'change');
  await page.waitForFunction(() => document.getElementById('global-error').textContent.includes('sliding_window'));
  assert.match(await page.textContent('#global-error'), /train\.seq_len \(2048\) at or past model\.sliding_window \(1024\)/);
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget shows the sliding window as a knob, and its cost once the sequence reaches it', async () => {
  const page = await context.newPage();
  await page.goto(blogServer.url);
  const peakOf = () => page.evaluate(() => Number(document.getElementById('qwen').dataset.peakBytes));
  await page.waitForFunction(() => Number(document.getElementById('qwen').dataset.peakBytes) > 0);
  assert.equal(await peakOf(), cliPeakBytes(['--preset', 'qwen2.5-0.5b', '--gpu', 'rtx-4070']));
  const set = (name, value) => page.evaluate(([n, v]) => {
    const input = document.getElementById('qwen').shadowRoot.querySelector(`input[name=${n}]`);
    input.value = v;
    input.dispatchEvent(new Event('input'));
  }, [name, value]);
  const full = await peakOf();
  await set('sliding_window', '1024');
  await page.waitForFunction((f) => Number(document.getElementById('qwen').dataset.peakBytes) !== f, full);
  assert.equal(await peakOf(), cliPeakBytes(['--preset', 'qwen2.5-0.5b', '--gpu', 'rtx-4070', '--sliding-window', '1024']));
  assert.ok(await peakOf() > full, 'the window reached: an explicit mask and repeated K/V');
  await set('seq_len', '1000');
  await page.waitForFunction((f) => Number(document.getElementById('qwen').dataset.peakBytes) < f, full);
  assert.equal(await peakOf(), cliPeakBytes(['--preset', 'qwen2.5-0.5b', '--gpu', 'rtx-4070', '--sliding-window', '1024', '--seq-len', '1000']));
  await page.close();
});

test('a qwen3 link with a head size of its own estimates as the CLI does', async () => {
  const query = 'family=qwen3&n_layer=2&n_head=8&n_kv_head=4&n_embd=512&head_dim=128&intermediate_size=1536'
    + '&vocab_size=32000&block_size=1024&tie_embeddings=1&batch_size=2&seq_len=512&compile=0';
  const { page, errors } = await openPage(context, `${server.url}?${query}`);
  assert.equal(await page.inputValue('#family'), 'qwen3');
  assert.equal(await page.inputValue('#head_dim'), '128');
  assert.ok(await shown(page, 'head_dim'));
  const args = ['--family', 'qwen3', '--n-layer', '2', '--n-head', '8', '--n-kv-head', '4', '--n-embd', '512',
    '--head-dim', '128', '--intermediate-size', '1536', '--vocab-size', '32000', '--block-size', '1024',
    '--tie-embeddings', '--batch-size', '2', '--seq-len', '512', '--no-compile',
    '--compute-capability', '9.0', '--gpu-memory-gib', '80'];
  assert.equal(await peak(page), cliPeakBytes(args));
  // A head size of its own changes the estimate (queries 8 x 128 = 1024 wide on a 512 stream).
  assert.notEqual(await peak(page), cliPeakBytes(args.map((a) => (a === '128' ? '64' : a))));
  assert.deepEqual(errors, []);
  await page.close();
});

test('a llama with Hugging Face eager attention (attention manual) estimates as the CLI does', async () => {
  const query = 'family=llama&n_layer=2&n_head=8&n_kv_head=2&n_embd=512&intermediate_size=1408&vocab_size=32000'
    + '&block_size=2048&tie_embeddings=0&batch_size=2&seq_len=512&attention=manual&compile=0';
  const { page, errors } = await openPage(context, `${server.url}?${query}`);
  assert.equal(await page.inputValue('#attention'), 'manual');
  const args = ['--family', 'llama', '--n-layer', '2', '--n-head', '8', '--n-kv-head', '2', '--n-embd', '512',
    '--intermediate-size', '1408', '--vocab-size', '32000', '--block-size', '2048', '--no-tie-embeddings',
    '--batch-size', '2', '--seq-len', '512', '--attention', 'manual', '--no-compile',
    '--compute-capability', '9.0', '--gpu-memory-gib', '80'];
  const manual = await peak(page);
  assert.equal(manual, cliPeakBytes(args));
  // The T x T scores it keeps cost more than SDPA.
  assert.ok(manual > cliPeakBytes(args.map((a) => (a === 'manual' ? 'sdpa' : a))));
  assert.deepEqual(errors, []);
  await page.close();
});

test('the Gemma-2-2B preset trains with eager attention and estimates as the CLI does', async () => {
  const { page, errors } = await openPage(context, server.url);
  await page.selectOption('#preset', 'gemma-2-2b');
  await page.waitForFunction(() => document.getElementById('family').value === 'gemma2');
  assert.equal(await page.inputValue('#attention'), 'manual');
  assert.equal(await page.inputValue('#head_dim'), '256');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'gemma2');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'gemma-2-2b', '--compute-capability', '8.9', '--gpu-memory-gib', '12']));
  // SDPA cannot soft-cap: one message, next to the attention field.
  await page.selectOption('#attention', 'sdpa');
  await page.waitForFunction(() => document.getElementById('global-error').textContent.includes('soft-caps'));
  assert.deepEqual(errors, []);
  await page.close();
});

test('the Gemma-3-1B preset: its window, head size and estimate as the CLI gives them', async () => {
  const { page, errors } = await openPage(context, server.url);
  await page.selectOption('#preset', 'gemma-3-1b');
  await page.waitForFunction(() => document.getElementById('family').value === 'gemma3');
  assert.equal(await page.inputValue('#sliding_window'), '512');
  assert.equal(await page.inputValue('#head_dim'), '256');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'gemma3');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'gemma-3-1b', '--compute-capability', '8.9', '--gpu-memory-gib', '12']));
  assert.deepEqual(errors, []);
  await page.close();
});
