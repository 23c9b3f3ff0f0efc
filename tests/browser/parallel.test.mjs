// More than one GPU on the page and in the widget (issue 14): the GPUs group (strategy, GPU count and each
// strategy's own arguments, shown only under their strategy), every value in the URL, every estimate equal to the
// native CLI's, the per-GPU scope said, errors next to their field, and the plan: memory per GPU against the GPU
// count, the fewest GPUs that fit per strategy (equal to `vramfit strategies`) and the advice, with "apply".
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { ROOT, setUp, waitRender, openPage, setField, cliPeakBytes, cliEstimate, canvasPixels } from './helpers.mjs';

const PORT = 8821;
const WIDGET_PORT = 8822;
const BLOG_PORT = 8823;

const env = setUp({ port: PORT, widgetPort: WIDGET_PORT, blogPort: BLOG_PORT, blog: { title: 'FSDP', body: '<vram-fit id="fsdp" preset="llama-3.2-1b" gpu="rtx-4070" show="parallel,gpus,offload,checkpointing" plot="gpus"></vram-fit>' } });

const peak = async (page) => Number(await page.getAttribute('#peak-allocated', 'data-bytes'));
const reserved = async (page) => Number(await page.getAttribute('#peak-reserved', 'data-bytes'));
const param = (page, k) => page.evaluate((key) => new URLSearchParams(location.search).get(key), k);
const hidden = (page, id) => page.evaluate((i) => document.getElementById(i).closest('.field').hidden, id);

const select = (page, id, value) => waitRender(page, () => page.selectOption(`#${id}`, value));
const toggle = (page, id, on) => waitRender(page, async () => {
  if (on) await page.check(`#${id}`); else await page.uncheck(`#${id}`);
  await page.dispatchEvent(`#${id}`, 'change');
});

function cliStrategies(args) {
  const out = execFileSync(join(ROOT, 'target', 'release', 'vramfit'), ['strategies', '--format', 'json', ...args]);
  return JSON.parse(String(out));
}

test('the GPUs group: each strategy\'s fields, the URL, the CLI\'s figures and errors at their field', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  // One GPU: no strategy fields, nothing of `parallel` in the URL, the GPU plan not made (it fits one GPU).
  assert.equal(await page.inputValue('#parallel'), 'single');
  for (const id of ['gpus', 'offload', 'bucket_cap_mb']) assert.ok(await hidden(page, id), id);
  assert.equal(await param(page, 'parallel'), null);
  assert.ok(await page.evaluate(() => document.getElementById('scope').hidden));
  assert.equal(await page.evaluate(() => document.querySelectorAll('#gpu-plan tbody tr').length), 0);

  // DDP and FSDP2 are not modelled under torch.compile (nanoGPT's default): the message says so.
  await select(page, 'parallel', 'ddp');
  assert.match(await page.textContent('#global-error'), /torch\.compile with train\.parallel\.strategy "ddp"/);
  await toggle(page, 'compile', false);
  assert.equal(await param(page, 'parallel'), 'ddp');
  assert.equal(await param(page, 'gpus'), '8');
  assert.equal(await param(page, 'gradient_as_bucket_view'), '0');
  assert.equal(await param(page, 'offload'), null, 'an FSDP field stays out of a DDP query');
  assert.ok(!(await hidden(page, 'bucket_cap_mb')) && await hidden(page, 'offload'));
  const base = ['--preset', 'nanogpt-30m', '--gpu', 'rtx-4070', '--no-compile'];
  assert.equal(await peak(page), cliPeakBytes([...base, '--parallel', 'ddp', '--gpus', '8']));
  assert.match(await page.textContent('#scope'), /per GPU: rank 0 of 8, DDP/);
  await toggle(page, 'gradient_as_bucket_view', true);
  await setField(page, 'bucket_cap_mb', 5);
  assert.equal(await param(page, 'bucket_cap_mb'), '5');
  assert.equal(await peak(page), cliPeakBytes([...base, '--parallel', 'ddp', '--gpus', '8', '--bucket-cap-mb', '5',
    '--gradient-as-bucket-view']));

  // FSDP2: its own fields, ZeRO-2 by unchecking reshard_after_forward, 64 GPUs, CPU offload.
  await select(page, 'parallel', 'fsdp');
  assert.ok(await hidden(page, 'bucket_cap_mb') && !(await hidden(page, 'offload')));
  assert.equal(await param(page, 'bucket_cap_mb'), null);
  await setField(page, 'gpus', 64);
  await toggle(page, 'reshard_after_forward', false);
  assert.equal(await param(page, 'reshard_after_forward'), '0');
  assert.equal(await peak(page), cliPeakBytes([...base, '--parallel', 'zero2', '--gpus', '64']));
  assert.match(await page.textContent('#scope'), /rank 0 of 64, FSDP2 \(ZeRO-2\)/);
  await toggle(page, 'reshard_after_forward', true);
  await toggle(page, 'offload', true);
  assert.equal(await peak(page), cliPeakBytes([...base, '--parallel', 'fsdp', '--gpus', '64', '--offload']));
  await toggle(page, 'offload', false);

  // Errors at their field: a GPU count of 0; FSDP2's bf16 policy under fp16 autocast (measured without autocast).
  await setField(page, 'gpus', 0);
  assert.equal(await page.textContent('.field-error[data-for="gpus"]'), 'train.parallel.gpus (0) must be from 1 to 1048576');
  await setField(page, 'gpus', 8);
  await select(page, 'param_dtype', 'bf16');
  assert.match(await page.textContent('.field-error[data-for="param_dtype"]'), /param_dtype \("bf16"\) under autocast/);
  await select(page, 'precision', 'fp32');
  assert.equal(await param(page, 'param_dtype'), 'bf16');
  assert.equal(await peak(page), cliPeakBytes([...base, '--precision', 'fp32', '--parallel', 'fsdp', '--gpus', '8',
    '--param-dtype', 'bf16']));

  // Back to one GPU: every parallel key leaves the URL.
  await select(page, 'parallel', 'single');
  assert.equal(await param(page, 'parallel'), null);
  assert.equal(await param(page, 'gpus'), null);
  assert.deepEqual(errors, []);
});

test('tensor parallelism: alone and under FSDP2, sequence parallel, each the CLI\'s', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await waitRender(page, () => page.selectOption('#preset', 'llama-3.2-1b'));
  const base = ['--preset', 'llama-3.2-1b', '--gpu', 'rtx-4070'];
  // tp 2 alone: strategy single, GPUs = tp.
  await setField(page, 'tp', 2);
  assert.equal(await param(page, 'parallel'), 'single');
  assert.equal(await param(page, 'tp'), '2');
  assert.equal(await param(page, 'gpus'), null);
  assert.equal(await peak(page), cliPeakBytes([...base, '--tp', '2']));
  assert.match(await page.textContent('#scope'), /rank 0 of 2, tensor parallel over 2 \(plan basic\)/);
  // Built whole on each GPU before parallelize_module shards it (pytorch/examples' way): the full parameters'
  // blocks stay cached, so reserved memory is the CLI's --init-on-device figure, not the meta-device default's.
  assert.equal(await hidden(page, 'init_on_device'), false);
  await toggle(page, 'init_on_device', true);
  assert.equal(await param(page, 'init_on_device'), '1');
  const onDevice = await reserved(page);
  assert.equal(onDevice, cliEstimate([...base, '--tp', '2', '--init-on-device']).peak_reserved_bytes);
  assert.notEqual(onDevice, cliEstimate([...base, '--tp', '2']).peak_reserved_bytes);
  await toggle(page, 'init_on_device', false);
  assert.equal(await reserved(page), cliEstimate([...base, '--tp', '2']).peak_reserved_bytes);
  await toggle(page, 'sequence_parallel', true);
  assert.equal(await peak(page), cliPeakBytes([...base, '--tp', '2', '--sequence-parallel']));
  // Under FSDP2 on 8 GPUs (data parallel 4 x tp 2), in fp32 with its bf16 policy.
  await select(page, 'precision', 'fp32');
  await select(page, 'parallel', 'fsdp');
  await setField(page, 'gpus', 8);
  assert.equal(await peak(page), cliPeakBytes([...base, '--precision', 'fp32', '--parallel', 'fsdp', '--gpus', '8',
    '--tp', '2', '--sequence-parallel']));
  // A degree that does not divide the heads: the message at the field.
  await setField(page, 'tp', 3);
  assert.match(await page.textContent('.field-error[data-for="tp"]'), /^train\.parallel\.tp \(3\)/);
  // Back to tp 1 and one GPU: no `parallel` in the URL.
  await setField(page, 'tp', 1);
  await select(page, 'parallel', 'single');
  assert.equal(await param(page, 'parallel'), null);
  assert.deepEqual(errors, []);
});

test('a link in ZeRO terms opens as FSDP2 with its arguments; back restores them', async () => {
  const q = 'preset=&family=llama&n_layer=4&n_head=8&n_kv_head=4&n_embd=512&intermediate_size=1376&vocab_size=16384'
    + '&block_size=256&batch_size=4&seq_len=256&precision=fp32&optimizer=adamw&compile=0&parallel=zero2&gpus=4';
  const { page, errors } = await openPage(env.context, `${env.server.url}?${q.replace('preset=&', '')}`);
  assert.equal(await page.inputValue('#parallel'), 'fsdp');
  assert.equal(await page.inputValue('#gpus'), '4');
  assert.ok(!(await page.isChecked('#reshard_after_forward')), 'zero2 is reshard_after_forward=False');
  assert.equal(await param(page, 'reshard_after_forward'), '0');
  await select(page, 'parallel', 'ddp');
  assert.equal(await param(page, 'parallel'), 'ddp');
  await waitRender(page, () => page.goBack());
  assert.equal(await page.inputValue('#parallel'), 'fsdp');
  assert.ok(!(await page.isChecked('#reshard_after_forward')));
  assert.ok(await hidden(page, 'bucket_cap_mb') && !(await hidden(page, 'offload')));
  assert.deepEqual(errors, []);
});

test('the GPU plan: a line per strategy, the fewest GPUs the CLI finds, the advice with apply', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  // Llama-3.2-1B with bf16 autocast does not fit an RTX 4070 (12 GB): the plan is made and advised.
  await waitRender(page, () => page.selectOption('#preset', 'llama-3.2-1b'));
  assert.equal(await page.textContent('#verdict'), 'does not fit in 11.99 GiB');
  const cli = cliStrategies(['--preset', 'llama-3.2-1b', '--gpu', 'rtx-4070']);
  const rows = await page.evaluate(() => [...document.querySelectorAll('#gpu-plan tbody tr')].map((tr) => ({
    way: tr.dataset.way, cells: [...tr.querySelectorAll('td')].map((td) => td.textContent) })));
  assert.deepEqual(rows.map((r) => r.way), cli.strategies.map((s) => s.id));
  for (const [i, s] of cli.strategies.entries()) {
    assert.equal(rows[i].cells[0], s.fewest_gpus === null ? 'none up to 4096' : String(s.fewest_gpus), s.id);
  }
  const advice = await page.textContent('#gpu-advice');
  assert.ok(advice.startsWith(cli.advice), `${advice} / ${cli.advice}`);
  assert.match(advice, /The fewest 11\.99 GiB GPUs that fit: \d+ with FSDP2, ZeRO-3/);
  // The same advice closes "How to make it fit"; its Apply sets the advised setup: the CLI's on it.
  const item = page.locator('#advice li[data-id="gpus"]');
  assert.equal(await item.count(), 1);
  await waitRender(page, () => item.locator('button').click());
  const z3 = cli.strategies.find((s) => s.id === 'zero3');
  assert.equal(await param(page, 'parallel'), 'fsdp');
  assert.equal(await param(page, 'gpus'), String(z3.fewest_gpus));
  assert.equal(await param(page, 'param_dtype'), 'bf16');
  assert.equal(await param(page, 'precision'), 'fp32');
  assert.equal(await page.textContent('#verdict'), 'fits in 11.99 GiB');
  assert.equal(await page.evaluate(() => document.getElementById('device-total').textContent),
    await page.evaluate(() => document.querySelector('#gpu-plan tr[data-way="zero3"] td:nth-child(3)').textContent));
  // Open: the plot is drawn; the offload row names its host memory.
  await page.evaluate(() => { document.getElementById('gpus-section').open = true; });
  await page.waitForFunction(() => document.getElementById('plot-gpus').width > 0);
  const px = await canvasPixels(page, 'plot-gpus');
  assert.ok(px.drawn > 2000, `GPU plot drawn (${px.drawn} pixels)`);
  assert.match(await page.textContent('#gpu-plan tr[data-way="zero3-offload"] td:nth-child(3)'), /GiB of pinned host memory/);
  // A QLoRA base (bitsandbytes 4-bit) on several GPUs is not modelled: each row says so.
  await select(page, 'parallel', 'single');
  await select(page, 'precision', 'bf16-amp');
  await toggle(page, 'lora', true);
  await select(page, 'quantization', 'nf4');
  const errs = await page.evaluate(() => [...document.querySelectorAll('#gpu-plan td[colspan]')].map((td) => td.textContent));
  assert.equal(errs.length, 5);
  for (const e of errs) assert.match(e, /^not modelled: train\.(lora or train\.)?quantization (\(nf4\) )?with train\.parallel\./);
  assert.deepEqual(errors, []);
});

test('the widget: strategy and GPU count as attributes and inputs, the GPU plot and its advice', async () => {
  const page = await env.context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(env.blogServer.url);
  const w = page.locator('#fsdp');
  await page.waitForFunction(() => document.getElementById('fsdp').dataset.status === 'ok', null, { timeout: 20000 });
  const cli = cliStrategies(['--preset', 'llama-3.2-1b', '--gpu', 'rtx-4070']);
  assert.equal(await w.getAttribute('data-gpu-advice'), cli.advice);
  const root = (sel) => page.evaluateHandle((s) => document.getElementById('fsdp').shadowRoot.querySelector(s), sel);
  const peakOf = () => page.evaluate(() => Number(document.getElementById('fsdp').dataset.peakBytes));
  // A multi-GPU field before a strategy: one message.
  await page.evaluate(() => {
    const i = document.getElementById('fsdp').shadowRoot.querySelector('input[name=offload]');
    i.checked = true; i.dispatchEvent(new Event('change'));
  });
  assert.match(await page.evaluate(() => document.getElementById('fsdp').shadowRoot.querySelector('.error').textContent), /choose a strategy/);
  // FSDP2 on 8 GPUs, then offload: the CLI's peaks.
  await page.evaluate(() => {
    const s = document.getElementById('fsdp').shadowRoot.querySelector('select[name=parallel]');
    s.value = 'fsdp'; s.dispatchEvent(new Event('change'));
  });
  await page.waitForFunction(() => document.getElementById('fsdp').dataset.status === 'ok');
  const args = ['--preset', 'llama-3.2-1b', '--gpu', 'rtx-4070', '--parallel', 'fsdp', '--gpus', '8'];
  assert.equal(await peakOf(), cliPeakBytes(args));
  assert.match(await page.evaluate(() => document.getElementById('fsdp').shadowRoot.querySelector('.totals').textContent), /Peak allocated per GPU/);
  await page.evaluate(() => {
    const i = document.getElementById('fsdp').shadowRoot.querySelector('input[name=offload]');
    i.checked = true; i.dispatchEvent(new Event('change'));
  });
  assert.equal(await peakOf(), cliPeakBytes([...args, '--offload']));
  await root('canvas');
  assert.deepEqual(errors, []);
});
