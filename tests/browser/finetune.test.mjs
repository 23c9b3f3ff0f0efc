// Fine-tuning on the page and in the widget (issue 13): LoRA (rank, alpha, dropout, target modules, modules to
// save), the frozen base's dtype, a bitsandbytes base and the memory-saving optimizers, each in the URL, and
// every estimate equal to the native CLI's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { ROOT, setUp, waitRender, openPage, setField, cliEstimate, cliPeakBytes } from './helpers.mjs';

const PORT = 8811;
const WIDGET_PORT = 8812;
const BLOG_PORT = 8813;

const env = setUp({ port: PORT, widgetPort: WIDGET_PORT, blogPort: BLOG_PORT, blog: { title: 'LoRA', body: '<vram-fit id="lora" preset="llama-3.2-1b" gpu="rtx-4070" show="lora,lora_r,optimizer,quantization" plot="none"></vram-fit>'
    + '<vram-fit id="recipes" preset="llama-3.1-8b" gpu="rtx-4090" show="batch_size" plot="finetune"></vram-fit>'
    + '<vram-fit id="qlora" preset="llama-3.1-8b" gpu="rtx-4070" finetune="qlora" plot="none"></vram-fit>'
    + '<vram-fit id="dora" preset="llama-3.1-8b" finetune="dora" plot="none"></vram-fit>'
    + '<vram-fit id="mixtral" preset="mixtral-8x7b" gpu="h100-80" finetune="lora" plot="none"></vram-fit>' } });

const peak = async (page) => Number(await page.getAttribute('#peak-allocated', 'data-bytes'));
const param = (page, k) => page.evaluate((key) => new URLSearchParams(location.search).get(key), k);
const GPU = ['--gpu', 'rtx-4070'];

const check = (page, id) => waitRender(page, async () => {
  await page.check(`#${id}`);
  await page.dispatchEvent(`#${id}`, 'change');
}, 3000);
const select = (page, id, value) => waitRender(page, () => page.selectOption(`#${id}`, value), 3000);

test('LoRA on a llama preset: each knob in the URL and the estimate the CLI\'s', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  // nanoGPT's default: LoRA is not offered for gpt2.
  assert.ok(await page.evaluate(() => document.getElementById('finetune').hidden), 'no fine-tuning for gpt2');
  // TinyLlama: a Llama with an untied head (a trainable copy of a tied one was not measured).
  await page.selectOption('#preset', 'tinyllama-1.1b');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'llama');
  assert.ok(!(await page.evaluate(() => document.getElementById('finetune').hidden)), 'fine-tuning for llama');
  assert.equal(await param(page, 'lora'), '0');
  const full = await peak(page);
  assert.equal(full, cliPeakBytes(['--preset', 'tinyllama-1.1b', ...GPU]));

  // The form's defaults: r 16, alpha 32, dropout 0.05, all-linear.
  await check(page, 'lora');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('lora') === '1');
  assert.equal(await param(page, 'lora_r'), '16');
  assert.equal(await param(page, 'lora_target_modules'), 'all-linear');
  const lora = ['--preset', 'tinyllama-1.1b', '--lora', 'r=16,alpha=32,dropout=0.05,targets=all-linear', ...GPU];
  assert.equal(await peak(page), cliPeakBytes(lora));
  assert.ok(await peak(page) < full, 'a frozen base needs less than full fine-tuning');

  await select(page, 'base_dtype', 'bf16');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('base_dtype') === 'bf16');
  assert.equal(await peak(page), cliPeakBytes([...lora, '--base-dtype', 'bf16']));

  await select(page, 'optimizer', 'adamw8bit');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('optimizer') === 'adamw8bit');
  assert.equal(await peak(page), cliPeakBytes([...lora, '--base-dtype', 'bf16', '--optimizer', 'adamw8bit']));

  await setField(page, 'lora_target_modules', 'q_proj,v_proj');
  await setField(page, 'lora_modules_to_save', 'lm_head');
  await setField(page, 'lora_r', '64');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('lora_r') === '64');
  const qv = ['--preset', 'tinyllama-1.1b', '--lora', 'r=64,alpha=32,dropout=0.05,targets=q_proj+v_proj,save=lm_head',
    '--base-dtype', 'bf16', '--optimizer', 'adamw8bit', ...GPU];
  const now = await peak(page);
  assert.equal(now, cliPeakBytes(qv));

  // QLoRA: a 4-bit NF4 base with double quantization.
  await select(page, 'quantization', 'nf4');
  await check(page, 'double_quant');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('double_quant') === '1');
  assert.equal(new URLSearchParams(new URL(page.url()).search).get('quantization'), 'nf4');
  const qlora = await peak(page);
  assert.equal(qlora, cliPeakBytes([...qv, '--quantization', 'nf4', '--double-quant']));
  assert.match(await page.textContent('#notes'), /4-bit NF4 with double quantization/);

  // The link reproduces the view.
  const again = await openPage(env.context, page.url());
  assert.equal(await again.page.inputValue('#lora_target_modules'), 'q_proj,v_proj');
  assert.equal(await again.page.inputValue('#lora_modules_to_save'), 'lm_head');
  assert.ok(await again.page.isChecked('#lora'));
  assert.equal(await again.page.inputValue('#quantization'), 'nf4');
  assert.equal(await peak(again.page), qlora);
  await again.page.close();

  // Another preset resets the switch.
  await page.selectOption('#preset', 'qwen2.5-0.5b');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'qwen2');
  assert.ok(!(await page.isChecked('#lora')));
  assert.equal(await param(page, 'base_dtype'), null);
  assert.deepEqual(errors, []);
  await page.close();
});

test('a bad LoRA field is named next to it', async () => {
  const { page, errors } = await openPage(env.context, `${env.server.url}?${new URLSearchParams({
    family: 'llama', n_layer: '2', n_head: '4', n_kv_head: '2', n_embd: '256', intermediate_size: '512',
    vocab_size: '1000', block_size: '128', seq_len: '128', batch_size: '2', precision: 'bf16-amp', lora: '1', lora_r: '8',
  })}`);
  assert.ok(await page.isChecked('#lora'));
  await setField(page, 'lora_r', '0');
  await page.waitForFunction(() => document.querySelector('.field-error[data-for="lora_r"]').textContent !== '');
  assert.match(await page.textContent('.field-error[data-for="lora_r"]'), /^train\.lora\.r \(0\) must be between 1 and model\.n_embd \(256\)/);
  assert.equal(await page.getAttribute('#lora_r', 'aria-invalid'), 'true');
  await setField(page, 'lora_r', '8');
  await setField(page, 'lora_target_modules', 'lm_head');
  await page.waitForFunction(() => document.querySelector('.field-error[data-for="lora_target_modules"]').textContent !== '');
  assert.match(await page.textContent('.field-error[data-for="lora_target_modules"]'), /is not a Linear of a Hugging Face decoder layer/);
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget takes LoRA and the optimizers as knobs', async () => {
  const page = await env.context.newPage();
  await page.goto(env.blogServer.url);
  const peakOf = () => page.evaluate(() => Number(document.getElementById('lora').dataset.peakBytes));
  await page.waitForFunction(() => Number(document.getElementById('lora').dataset.peakBytes) > 0);
  const base = ['--preset', 'llama-3.2-1b', '--gpu', 'rtx-4070'];
  assert.equal(await peakOf(), cliPeakBytes(base));
  const change = async (name, set) => {
    const first = await peakOf();
    await page.evaluate(([n, v]) => {
      const input = document.getElementById('lora').shadowRoot.querySelector(`[name=${n}]`);
      if (input.type === 'checkbox') input.checked = v; else input.value = v;
      input.dispatchEvent(new Event('change'));
    }, [name, set]);
    await page.waitForFunction((f) => Number(document.getElementById('lora').dataset.peakBytes) !== f, first);
  };
  // peft's defaults for what the state leaves out: r 8, q_proj and v_proj.
  await change('lora', true);
  assert.equal(await peakOf(), cliPeakBytes([...base, '--lora', 'r=8']));
  await change('lora_r', '32');
  assert.equal(await peakOf(), cliPeakBytes([...base, '--lora', 'r=32']));
  await change('optimizer', 'lion8bit');
  assert.equal(await peakOf(), cliPeakBytes([...base, '--lora', 'r=32', '--optimizer', 'lion8bit']));
  await page.close();
});

// `report::fmt_bytes`: powers of two, three significant digits.
function fmtBytes(b) {
  for (const [unit, size] of [['GiB', 2 ** 30], ['MiB', 2 ** 20], ['KiB', 2 ** 10]]) {
    if (b >= size) {
      const v = b / size;
      return `${v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)} ${unit}`;
    }
  }
  return `${b} B`;
}

function cliFinetune(args) {
  const out = execFileSync(join(ROOT, 'target', 'release', 'vramfit'), ['finetune', '--format', 'json', ...args]);
  return JSON.parse(String(out));
}

test('full fine-tuning, LoRA and QLoRA side by side: the CLI\'s figures, the advice applied, the 4-bit weights named', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'llama-3.1-8b');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('n_layer') === '32');
  await select(page, 'gpu', 'rtx-4090');
  await setField(page, 'batch_size', '1');
  await setField(page, 'seq_len', '2048');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('seq_len') === '2048');
  // Full fine-tuning does not fit a 24 GB card: the comparison is made without opening its section.
  await page.waitForFunction(() => document.querySelectorAll('#methods tbody tr').length === 3);
  const cli = cliFinetune(['--preset', 'llama-3.1-8b', '--gpu', 'rtx-4090', '--batch-size', '1', '--seq-len', '2048']);
  const rows = await page.$$eval('#methods tbody tr', (trs) => trs.map((tr) => ({
    id: tr.dataset.method, current: tr.getAttribute('aria-current') === 'true',
    cells: [...tr.querySelectorAll('td')].map((td) => td.textContent),
  })));
  assert.deepEqual(rows.map((r) => r.id), ['full', 'lora', 'qlora']);
  assert.ok(rows[0].current && !rows[2].current);
  for (const [i, r] of rows.entries()) {
    const c = cli.methods[i];
    assert.equal(r.cells[2], c.fits ? 'fits' : 'does not fit', r.id);
    assert.equal(r.cells[3], c.largest_batch === null ? 'none: even 1 does not fit' : String(c.largest_batch), r.id);
  }
  assert.equal(await page.textContent('#methods-advice'), `${cli.advice} Apply`);
  // The advice joins "How to make it fit"; applying it gives the CLI's QLoRA.
  const item = page.locator('#advice li[data-id="methods"]');
  assert.match(await item.textContent(), /^QLoRA fits in 23\.98 GiB at batch 1/);
  await waitRender(page, () => item.locator('button').click());
  assert.equal(await param(page, 'quantization'), 'nf4');
  assert.equal(await param(page, 'checkpointing'), '1');
  const qlora = ['--preset', 'llama-3.1-8b', '--gpu', 'rtx-4090', '--batch-size', '1', '--seq-len', '2048', '--finetune', 'qlora'];
  assert.equal(await peak(page), cliPeakBytes(qlora));
  // The breakdown names the 4-bit weights and the adapters, each the CLI's.
  const est = cliEstimate(qlora);
  const names = await page.$$eval('#components tbody th', (ths) => ths.map((th) => th.textContent));
  assert.ok(names.includes('4-bit weights') && names.includes('adapters'), names.join(', '));
  const bytesOf = async (name) => page.$$eval('#components tbody tr', (trs, n) =>
    trs.find((tr) => tr.querySelector('th').textContent === n).querySelector('td').textContent, name);
  assert.equal(await bytesOf('4-bit weights'), fmtBytes(est.components.quantized_weights_bytes));
  assert.equal(await bytesOf('adapters'), fmtBytes(est.components.adapters_bytes));
  // Now the current row is QLoRA's, with no button.
  await page.waitForFunction(() => document.querySelector('#methods tr[data-method="qlora"]')?.getAttribute('aria-current') === 'true');
  assert.equal(await page.locator('#methods tr[data-method="qlora"] button').count(), 0);
  // On a 12 GB card nothing fits at batch 1: the advice is QLoRA with the CLI's longest sequence, and applies.
  await select(page, 'gpu', 'rtx-4070');
  const small = cliFinetune(['--preset', 'llama-3.1-8b', '--gpu', 'rtx-4070', '--batch-size', '1', '--seq-len', '2048']);
  const seq = small.advised_setup.train.seq_len;
  assert.ok(seq < 2048, String(seq));
  await page.waitForFunction(() => document.querySelector('#advice li[data-id="methods"]'));
  assert.equal(await page.textContent('#advice li[data-id="methods"] span'), `${small.advice} `);
  await waitRender(page, () => page.locator('#advice li[data-id="methods"] button').click());
  assert.equal(await param(page, 'seq_len'), String(seq));
  assert.match(await page.textContent('#verdict'), /^fits in /);
  assert.deepEqual(errors, []);
  await page.close();
});

test('Phi-3-mini with QLoRA on the page: its packed Linears adapted, the CLI\'s figures', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'phi-3-mini');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'phi3');
  assert.ok(!(await page.evaluate(() => document.getElementById('finetune').hidden)), 'fine-tuning for phi3');
  await select(page, 'gpu', 'rtx-4090');
  await setField(page, 'batch_size', '1');
  await setField(page, 'seq_len', '2048');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('seq_len') === '2048');
  const base = ['--preset', 'phi-3-mini', '--gpu', 'rtx-4090', '--batch-size', '1', '--seq-len', '2048'];
  // The three recipes side by side, each estimated (none "not modelled"), each the CLI's.
  if (!(await page.evaluate(() => document.getElementById('methods-section').open))) {
    await page.click('#methods-section summary');
  }
  await page.waitForFunction(() => document.querySelectorAll('#methods tbody tr').length === 3);
  const cli = cliFinetune(base);
  const rows = await page.$$eval('#methods tbody tr', (trs) => trs.map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent)));
  for (const [i, cells] of rows.entries()) {
    const c = cli.methods[i];
    assert.equal(c.error ?? null, null, c.method);
    assert.doesNotMatch(cells.join(' '), /not modelled/);
    assert.equal(cells[2], c.fits ? 'fits' : 'does not fit', c.method);
    assert.equal(cells[3], c.largest_batch === null ? 'none: even 1 does not fit' : String(c.largest_batch), c.method);
  }
  // QLoRA applied from its row: 4-bit NF4 with double quantization, checkpointing, adapters on all-linear.
  await waitRender(page, () => page.locator('#methods tr[data-method="qlora"] button').click());
  assert.equal(await param(page, 'quantization'), 'nf4');
  assert.equal(await param(page, 'lora'), '1');
  assert.equal(await param(page, 'lora_target_modules'), 'all-linear');
  assert.equal(await param(page, 'checkpointing'), '1');
  const qlora = [...base, '--finetune', 'qlora'];
  assert.equal(await peak(page), cliPeakBytes(qlora));
  const est = cliEstimate(qlora);
  // 32 layers x r 16 x ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072)) fp32 adapters.
  assert.equal(est.components.adapters_bytes, 25165824 * 4);
  const bytesOf = async (name) => page.$$eval('#components tbody tr', (trs, n) =>
    trs.find((tr) => tr.querySelector('th').textContent === n).querySelector('td').textContent, name);
  assert.equal(await bytesOf('4-bit weights'), fmtBytes(est.components.quantized_weights_bytes));
  assert.equal(await bytesOf('adapters'), fmtBytes(est.components.adapters_bytes));
  assert.match(await page.textContent('#notes'), /25165824 trainable parameters/);
  // A Llama-style target names no Linear of a Phi-3 layer: the core's message beside the field.
  await setField(page, 'lora_target_modules', 'q_proj,v_proj');
  await page.waitForFunction(() => document.querySelector('.field-error[data-for="lora_target_modules"]').textContent !== '');
  assert.match(await page.textContent('.field-error[data-for="lora_target_modules"]'), /names no Linear of a phi3 layer, whose Linears are o_proj, qkv_proj, gate_up_proj, down_proj/);
  assert.deepEqual(errors, []);
  await page.close();
});

test('the comparison on nanoGPT\'s GPT says why LoRA and QLoRA are not estimated', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  assert.equal(await page.evaluate(() => document.querySelectorAll('#methods tbody tr').length), 0, 'not made unasked');
  await page.click('#methods-section summary');
  await page.waitForFunction(() => document.querySelectorAll('#methods tbody tr').length === 3);
  assert.match(await page.textContent('#methods tr[data-method="lora"] td'), /LoRA is modelled for Hugging Face families/);
  assert.match(await page.textContent('#methods-advice'), /^Full fine-tuning fits in/);
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget sets the three recipes side by side with plot="finetune"', async () => {
  const page = await env.context.newPage();
  await page.goto(env.blogServer.url);
  await page.waitForFunction(() => document.getElementById('recipes').dataset.methodsAdvice);
  const cli = cliFinetune(['--preset', 'llama-3.1-8b', '--gpu', 'rtx-4090']);
  assert.equal(await page.evaluate(() => document.getElementById('recipes').dataset.methodsAdvice), cli.advice);
  const rows = await page.evaluate(() => [...document.getElementById('recipes').shadowRoot
    .querySelectorAll('tr[data-method]')].map((tr) => [tr.dataset.method, tr.querySelectorAll('td')[1]?.textContent]));
  assert.deepEqual(rows, cli.methods.map((m) => [m.method, m.largest_batch === null ? 'none: even 1 does not fit' : String(m.largest_batch)]));
  assert.equal(await page.evaluate(() => document.getElementById('recipes').shadowRoot.querySelector('canvas')), null);
  await page.close();
});

test('the widget\'s finetune attribute is the CLI\'s --finetune; a wrong one is named', async () => {
  const page = await env.context.newPage();
  await page.goto(env.blogServer.url);
  await page.waitForFunction(() => Number(document.getElementById('qlora').dataset.peakBytes) > 0);
  assert.equal(await page.evaluate(() => Number(document.getElementById('qlora').dataset.peakBytes)),
    cliPeakBytes(['--preset', 'llama-3.1-8b', '--gpu', 'rtx-4070', '--finetune', 'qlora']));
  await page.waitForFunction(() => document.getElementById('dora').dataset.status === 'error');
  assert.equal(await page.evaluate(() => document.getElementById('dora').shadowRoot.querySelector('.error').textContent),
    'vramfit: finetune ("dora") is not one of: full, lora, qlora');
  await page.close();
});

test('OLMoE on the page: all-linear reaches the router and the experts, without dropout; the CLI\'s figures', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'olmoe-1b-7b');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'olmoe');
  assert.ok(!(await page.evaluate(() => document.getElementById('finetune').hidden)), 'fine-tuning for olmoe');
  // Ticking LoRA takes the recipe's dropout for OLMoE, 0 (main.js recipeDropout); a dropout typed with
  // all-linear: peft's ParamWrapper raises, and the core refuses it by the field.
  await check(page, 'lora');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('lora_dropout') === '0');
  await setField(page, 'lora_dropout', '0.05');
  await page.waitForFunction(() => document.querySelector('.field-error[data-for="lora_dropout"]').textContent !== '');
  assert.match(await page.textContent('.field-error[data-for="lora_dropout"]'),
    /must be 0 when the adapters reach olmoe's router or fused experts \(gate, gate_up_proj, down_proj/);
  await setField(page, 'lora_dropout', '0');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('lora_dropout') === '0');
  const lora = ['--preset', 'olmoe-1b-7b', '--lora', 'r=16,alpha=32,dropout=0,targets=all-linear', ...GPU];
  assert.equal(await peak(page), cliPeakBytes(lora));
  assert.equal(await page.textContent('.field-error[data-for="lora_dropout"]'), '');
  // QLoRA: the experts stay unquantized, fp32; the weights' row says so.
  await select(page, 'quantization', 'nf4');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('quantization') === 'nf4');
  assert.equal(await peak(page), cliPeakBytes([...lora, '--quantization', 'nf4']));
  assert.match(await page.textContent('#components'), /the router and fused experts \(no nn.Linear, so bitsandbytes leaves them unquantized\)/);
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget\'s finetune="lora" on Mixtral-8x7B is the CLI\'s', async () => {
  const page = await env.context.newPage();
  await page.goto(env.blogServer.url);
  await page.waitForFunction(() => Number(document.getElementById('mixtral').dataset.peakBytes) > 0);
  assert.equal(await page.evaluate(() => Number(document.getElementById('mixtral').dataset.peakBytes)),
    cliPeakBytes(['--preset', 'mixtral-8x7b', '--gpu', 'h100-80', '--finetune', 'lora']));
  await page.close();
});
