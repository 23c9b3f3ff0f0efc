// The Hugging Face families on the page (issue 12): mistral, qwen2, ..., phi3 and gpt_neox beside llama in the
// family list, their fields (KV heads, MLP width, tied embeddings, sliding window, rotary dims, parallel residual)
// shown for the families that have them, in the URL, their limits as one message, and every estimate equal to the
// native CLI's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setUp, openPage, setField, cliPeakBytes } from './helpers.mjs';

const PORT = 8801;
const WIDGET_PORT = 8802;
const BLOG_PORT = 8803;

const env = setUp({ port: PORT, widgetPort: WIDGET_PORT, blogPort: BLOG_PORT, blog: { title: 'Qwen', body: `<vram-fit id="qwen" preset="qwen2.5-0.5b" gpu="rtx-4070" show="sliding_window,seq_len" plot="none"></vram-fit>`
    + `<vram-fit id="pythia" preset="pythia-160m" gpu="rtx-4070" show="rotary_dims,parallel_residual" plot="none"></vram-fit>`
    + `<vram-fit id="olmoe" preset="olmoe-1b-7b" gpu="h100-80" show="n_experts,experts_per_token" plot="none"></vram-fit>` } });

const peak = async (page) => Number(await page.getAttribute('#peak-allocated', 'data-bytes'));
const shown = async (page, id) => page.evaluate((i) => !document.getElementById(i).closest('.field').hidden, id);

test('the qwen2 preset estimates as the CLI does, with the Hugging Face fields shown', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'qwen2.5-0.5b');
  await page.waitForFunction(() => document.getElementById('family').value === 'qwen2');
  for (const id of ['n_kv_head', 'intermediate_size', 'tie_embeddings', 'sliding_window']) {
    assert.ok(await shown(page, id), `${id} is shown for qwen2`);
  }
  assert.ok(!(await shown(page, 'bias')), 'gpt2\'s bias checkbox is hidden');
  // nanoGPT's dropout: a Hugging Face family's non-zero dropout is refused, so the box is not offered.
  assert.ok(!(await shown(page, 'dropout')), 'nanoGPT\'s dropout box is hidden');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'qwen2');
  const gpu = ['--gpu', 'rtx-4070'];
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'qwen2.5-0.5b', ...gpu]));
  assert.deepEqual(errors, []);
  await page.close();
});

test('a mistral with a sliding window: in the URL, Llama\'s estimate below it, its explicit mask at it', async () => {
  const query = 'family=mistral&n_layer=2&n_head=8&n_kv_head=2&n_embd=512&intermediate_size=1024&vocab_size=32000'
    + '&block_size=4096&tie_embeddings=0&sliding_window=1024&batch_size=2&seq_len=512&compile=0';
  const { page, errors } = await openPage(env.context, `${env.server.url}?${query}`);
  assert.equal(await page.inputValue('#family'), 'mistral');
  assert.equal(await page.inputValue('#sliding_window'), '1024');
  const args = ['--family', 'mistral', '--n-layer', '2', '--n-head', '8', '--n-kv-head', '2', '--n-embd', '512',
    '--intermediate-size', '1024', '--vocab-size', '32000', '--block-size', '4096', '--no-tie-embeddings',
    '--sliding-window', '1024', '--batch-size', '2', '--seq-len', '512', '--no-compile',
    '--gpu', 'rtx-4070'];
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
  // Under torch.compile too (Inductor's wrapper read from mistral-512-win128-bf16amp-compiled), as the CLI says.
  await page.check('#compile');
  await page.dispatchEvent('#compile', 'change');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('compile') === '1');
  const compiled = at.map((a) => (a === '--no-compile' ? '--compile' : a));
  await page.waitForFunction((p) => Number(document.getElementById('peak-allocated').dataset.bytes) === p, cliPeakBytes(compiled));
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget shows the sliding window as a knob, and its cost once the sequence reaches it', async () => {
  const page = await env.context.newPage();
  await page.goto(env.blogServer.url);
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
  const { page, errors } = await openPage(env.context, `${env.server.url}?${query}`);
  assert.equal(await page.inputValue('#family'), 'qwen3');
  assert.equal(await page.inputValue('#head_dim'), '128');
  assert.ok(await shown(page, 'head_dim'));
  const args = ['--family', 'qwen3', '--n-layer', '2', '--n-head', '8', '--n-kv-head', '4', '--n-embd', '512',
    '--head-dim', '128', '--intermediate-size', '1536', '--vocab-size', '32000', '--block-size', '1024',
    '--tie-embeddings', '--batch-size', '2', '--seq-len', '512', '--no-compile',
    '--gpu', 'rtx-4070'];
  assert.equal(await peak(page), cliPeakBytes(args));
  // A head size of its own changes the estimate (queries 8 x 128 = 1024 wide on a 512 stream).
  assert.notEqual(await peak(page), cliPeakBytes(args.map((a) => (a === '128' ? '64' : a))));
  assert.deepEqual(errors, []);
  await page.close();
});

test('a llama with Hugging Face eager attention (attention manual) estimates as the CLI does', async () => {
  const query = 'family=llama&n_layer=2&n_head=8&n_kv_head=2&n_embd=512&intermediate_size=1408&vocab_size=32000'
    + '&block_size=2048&tie_embeddings=0&batch_size=2&seq_len=512&attention=manual&compile=0';
  const { page, errors } = await openPage(env.context, `${env.server.url}?${query}`);
  assert.equal(await page.inputValue('#attention'), 'manual');
  const args = ['--family', 'llama', '--n-layer', '2', '--n-head', '8', '--n-kv-head', '2', '--n-embd', '512',
    '--intermediate-size', '1408', '--vocab-size', '32000', '--block-size', '2048', '--no-tie-embeddings',
    '--batch-size', '2', '--seq-len', '512', '--attention', 'manual', '--no-compile',
    '--gpu', 'rtx-4070'];
  const manual = await peak(page);
  assert.equal(manual, cliPeakBytes(args));
  // The T x T scores it keeps cost more than SDPA.
  assert.ok(manual > cliPeakBytes(args.map((a) => (a === 'manual' ? 'sdpa' : a))));
  assert.deepEqual(errors, []);
  await page.close();
});

test('the Gemma-2-2B preset trains with eager attention and estimates as the CLI does', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'gemma-2-2b');
  await page.waitForFunction(() => document.getElementById('family').value === 'gemma2');
  assert.equal(await page.inputValue('#attention'), 'manual');
  assert.equal(await page.inputValue('#head_dim'), '256');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'gemma2');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'gemma-2-2b', '--gpu', 'rtx-4070']));
  // SDPA cannot soft-cap: one message, next to the attention field.
  await page.selectOption('#attention', 'sdpa');
  await page.waitForFunction(() => document.getElementById('global-error').textContent.includes('soft-caps'));
  assert.deepEqual(errors, []);
  await page.close();
});

test('the Gemma-3-1B preset: its window, head size and estimate as the CLI gives them', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'gemma-3-1b');
  await page.waitForFunction(() => document.getElementById('family').value === 'gemma3');
  assert.equal(await page.inputValue('#sliding_window'), '512');
  assert.equal(await page.inputValue('#head_dim'), '256');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'gemma3');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'gemma-3-1b', '--gpu', 'rtx-4070']));
  assert.deepEqual(errors, []);
  await page.close();
});

test('Pythia (gpt_neox): rotary dims, parallel residual and biases on the form, in the URL and as the CLI', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'pythia-160m');
  await page.waitForFunction(() => document.getElementById('family').value === 'gpt_neox');
  assert.equal(await page.inputValue('#rotary_dims'), '16');
  assert.ok(await page.isChecked('#parallel_residual'));
  assert.ok(await page.isChecked('#bias'));
  for (const id of ['rotary_dims', 'parallel_residual', 'bias', 'n_kv_head']) assert.ok(await shown(page, id), id);
  await page.waitForFunction(() => new URLSearchParams(location.search).get('parallel_residual') === '1');
  const gpu = ['--gpu', 'rtx-4070'];
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'pythia-160m', ...gpu]));
  // Sequential branches: the CLI's --no-parallel-residual, and a different timeline.
  const parallel = await peak(page);
  await page.uncheck('#parallel_residual');
  await page.dispatchEvent('#parallel_residual', 'change');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('parallel_residual') === '0');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'pythia-160m', '--no-parallel-residual', ...gpu]));
  assert.notEqual(await peak(page), parallel);
  // An odd rotary width: one message naming the field.
  await setField(page, 'rotary_dims', '15');
  await page.waitForFunction(() => document.body.textContent.includes('model.rotary_dims (15)'));
  assert.deepEqual(errors, []);
  await page.close();
});

test('Phi-3-mini after Pythia: the packed family, without Pythia\'s rotary dims left behind', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'pythia-1b');
  await page.waitForFunction(() => document.getElementById('rotary_dims').value === '64');
  await page.selectOption('#preset', 'phi-3-mini');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'phi3');
  assert.equal(await page.inputValue('#rotary_dims'), '');
  assert.ok(await shown(page, 'rotary_dims'));
  assert.ok(!(await shown(page, 'parallel_residual')));
  assert.ok(!(await shown(page, 'bias')));
  assert.equal(await page.inputValue('#sliding_window'), '2047');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'phi-3-mini', '--gpu', 'rtx-4070']));
  // And Gemma 3's window does not stay behind for Llama.
  await page.selectOption('#preset', 'gemma-3-1b');
  await page.waitForFunction(() => document.getElementById('sliding_window').value === '512');
  await page.selectOption('#preset', 'llama-2-7b');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'llama');
  assert.equal(await page.inputValue('#sliding_window'), '');
  assert.equal(await page.inputValue('#head_dim'), '');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'llama-2-7b', '--gpu', 'rtx-4070']));
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget takes rotary dims and the parallel residual as knobs', async () => {
  const page = await env.context.newPage();
  await page.goto(env.blogServer.url);
  const peakOf = () => page.evaluate(() => Number(document.getElementById('pythia').dataset.peakBytes));
  await page.waitForFunction(() => Number(document.getElementById('pythia').dataset.peakBytes) > 0);
  const base = ['--preset', 'pythia-160m', '--gpu', 'rtx-4070'];
  assert.equal(await peakOf(), cliPeakBytes(base));
  const first = await peakOf();
  await page.evaluate(() => {
    const input = document.getElementById('pythia').shadowRoot.querySelector('input[name=parallel_residual]');
    input.checked = false;
    input.dispatchEvent(new Event('change'));
  });
  await page.waitForFunction((f) => Number(document.getElementById('pythia').dataset.peakBytes) !== f, first);
  assert.equal(await peakOf(), cliPeakBytes([...base, '--no-parallel-residual']));
  const sequential = await peakOf();
  await page.evaluate(() => {
    const input = document.getElementById('pythia').shadowRoot.querySelector('input[name=rotary_dims]');
    input.value = '64';
    input.dispatchEvent(new Event('input'));
  });
  await page.waitForFunction((f) => Number(document.getElementById('pythia').dataset.peakBytes) !== f, sequential);
  assert.equal(await peakOf(), cliPeakBytes([...base, '--no-parallel-residual', '--rotary-dims', '64']));
  await page.close();
});

test('OLMoE-1B-7B: the experts on the form, in the URL and as the CLI', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'olmoe-1b-7b');
  await page.waitForFunction(() => document.getElementById('family').value === 'olmoe');
  assert.equal(await page.inputValue('#n_experts'), '64');
  assert.equal(await page.inputValue('#experts_per_token'), '8');
  for (const id of ['n_experts', 'experts_per_token', 'norm_topk_prob']) assert.ok(await shown(page, id), id);
  assert.ok(!(await shown(page, 'shared_expert_size')), 'only qwen2_moe has a shared expert');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('n_experts') === '64');
  const gpu = ['--gpu', 'rtx-4070'];
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'olmoe-1b-7b', ...gpu]));
  // More experts per token: more token-expert pairs, more memory, as the CLI says.
  const eight = await peak(page);
  await setField(page, 'experts_per_token', '16');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('experts_per_token') === '16');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'olmoe-1b-7b', '--experts-per-token', '16', ...gpu]));
  assert.ok(await peak(page) > eight);
  // More per token than there are experts: one message naming the field.
  await setField(page, 'experts_per_token', '65');
  await page.waitForFunction(() => document.body.textContent.includes('model.experts_per_token (65)'));
  assert.deepEqual(errors, []);
  await page.close();
});

test('a qwen2_moe link with a shared expert estimates as the CLI does', async () => {
  const query = 'family=qwen2_moe&n_layer=2&n_head=4&n_kv_head=2&n_embd=256&intermediate_size=256&vocab_size=8192'
    + '&block_size=4096&tie_embeddings=0&n_experts=8&experts_per_token=2&shared_expert_size=512&norm_topk_prob=1'
    + '&batch_size=4&seq_len=256&compile=0';
  const { page, errors } = await openPage(env.context, `${env.server.url}?${query}`);
  assert.equal(await page.inputValue('#shared_expert_size'), '512');
  assert.ok(await page.isChecked('#norm_topk_prob'));
  const args = ['--family', 'qwen2_moe', '--n-layer', '2', '--n-head', '4', '--n-kv-head', '2', '--n-embd', '256',
    '--intermediate-size', '256', '--vocab-size', '8192', '--block-size', '4096', '--no-tie-embeddings',
    '--n-experts', '8', '--experts-per-token', '2', '--shared-expert-size', '512', '--norm-topk-prob',
    '--batch-size', '4', '--seq-len', '256', '--no-compile', '--compute-capability', '9.0', '--gpu-memory-gib', '80'];
  assert.equal(await peak(page), cliPeakBytes(args));
  // The router's auxiliary loss keeps every layer's router logits to the end of the loss.
  const without = await peak(page);
  await page.check('#router_aux_loss');
  await page.dispatchEvent('#router_aux_loss', 'change');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('router_aux_loss') === '1');
  assert.equal(await peak(page), cliPeakBytes([...args, '--router-aux-loss']));
  assert.ok(await peak(page) >= without);
  // Under torch.compile with the auxiliary loss: one message (compiled MoE is traced without it).
  await page.check('#compile');
  await page.dispatchEvent('#compile', 'change');
  await page.waitForFunction(() => document.getElementById('global-error').textContent.includes('qwen2_moe'));
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget takes the experts as knobs', async () => {
  const page = await env.context.newPage();
  await page.goto(env.blogServer.url);
  const peakOf = () => page.evaluate(() => Number(document.getElementById('olmoe').dataset.peakBytes));
  await page.waitForFunction(() => Number(document.getElementById('olmoe').dataset.peakBytes) > 0);
  const base = ['--preset', 'olmoe-1b-7b', '--gpu', 'h100-80'];
  assert.equal(await peakOf(), cliPeakBytes(base));
  const first = await peakOf();
  await page.evaluate(() => {
    const input = document.getElementById('olmoe').shadowRoot.querySelector('input[name=n_experts]');
    input.value = '32';
    input.dispatchEvent(new Event('input'));
  });
  await page.waitForFunction((f) => Number(document.getElementById('olmoe').dataset.peakBytes) !== f, first);
  assert.equal(await peakOf(), cliPeakBytes([...base, '--n-experts', '32']));
  await page.close();
});
