// The GPU a person chose is the device, whatever model they pick next: on the page (presets, links) and in the
// widget. See: issue 12, item 4 (RTX 4070 selected, Llama-2-7B chosen: the list said "RTX 4070 12 GB" while the
// estimate used 80 GiB and compute capability 9.0). Also the GPU presets issue 12 added, with their SM counts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setUp, openPage, cliPeakBytes, cliEstimate, setField } from './helpers.mjs';

const PAGE_PORT = 8791;
const BLOG_PORT = 8792;

const TINY = '{"model": {"family": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 65}, "device": {"memory_gib": 13, "compute_capability": 8.9}}';

// One layer of one 256-wide head at batch 2 x 2048 in bf16: 64 row blocks, which flash attention's forward splits
// on 132 SMs (fp32 accumulators) and not on 8, so reserved memory moves (crate/tests/cli.rs has the same case).
const SPLIT_QUERY = 'family=gpt2&n_layer=1&n_head=1&n_embd=256&block_size=2048&seq_len=2048&batch_size=2&vocab_size=65&precision=bf16&compile=0';
const SPLIT_ARGS = ['--preset', 'nanogpt-30m', '--n-layer', '1', '--n-head', '1', '--n-embd', '256', '--block-size', '2048',
  '--batch-size', '2', '--vocab-size', '65', '--precision', 'bf16', '--no-compile'];

const env = setUp({ port: PAGE_PORT, blogPort: BLOG_PORT, blog: { title: 'GPUs', body: `<vram-fit id="own" preset="nanogpt-30m" show="gpu,batch_size" plot="none"></vram-fit>
<vram-fit id="seven" preset="llama-2-7b" gpu="rtx-4070" show="gpu" plot="none"></vram-fit>
<vram-fit id="cfg" config='${TINY}' show="gpu" plot="none"></vram-fit>
<vram-fit id="sm" state="${SPLIT_QUERY}&memory_gib=12&compute_capability=8.9&sms=8" show="gpu,sms" plot="none"></vram-fit>` } });

const value = (page, id) => page.inputValue(`#${id}`);
const selectedLabel = (page) => page.$eval('#gpu', (s) => s.selectedOptions[0]?.textContent);
const urlParam = (page, key) => page.evaluate((k) => new URLSearchParams(location.search).get(k), key);
const peak = async (page) => Number(await page.getAttribute('#peak-allocated', 'data-bytes'));

/** Everything the page says about the device is the RTX 4070's, with Llama-2-7B loaded. */
async function assertLlama7bOnRtx4070(page) {
  assert.equal(await value(page, 'family'), 'llama');
  assert.equal(await value(page, 'n_embd'), '4096');
  assert.equal(await value(page, 'gpu'), 'rtx-4070');
  assert.equal(await selectedLabel(page), 'RTX 4070 12 GB');
  assert.equal(await value(page, 'memory_gib'), '11.994140625');
  assert.equal(await value(page, 'compute_capability'), '8.9');
  assert.equal(await page.textContent('#verdict'), 'does not fit in 11.99 GiB');
  assert.equal(await page.textContent('#gpu-detail'), '46 SMs, compute capability 8.9');
  assert.equal(await urlParam(page, 'gpu'), 'rtx-4070');
  assert.equal(await urlParam(page, 'memory_gib'), '11.994140625');
  assert.equal(await urlParam(page, 'compute_capability'), '8.9');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'llama-2-7b', '--gpu', 'rtx-4070']));
}

test('RTX 4070 selected, then Llama-2-7B: the GPU list, the memory and the verdict all stay the RTX 4070', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  // A person picks another card, then the RTX 4070, then the model.
  await page.selectOption('#gpu', 'rtx-4090');
  await page.waitForFunction(() => document.getElementById('memory_gib').value === '23.98828125');
  await page.selectOption('#gpu', 'rtx-4070');
  await page.waitForFunction(() => document.getElementById('memory_gib').value === '11.994140625');
  await page.selectOption('#preset', 'llama-2-7b');
  await page.waitForFunction(() => document.getElementById('family').value === 'llama');
  await assertLlama7bOnRtx4070(page);
  // Back and forward through history keep the pair too.
  await page.goBack();
  await page.waitForFunction(() => document.getElementById('family').value === 'gpt2');
  await page.goForward();
  await page.waitForFunction(() => document.getElementById('family').value === 'llama');
  await assertLlama7bOnRtx4070(page);
  assert.deepEqual(errors, []);
  await page.close();
});

test('the default RTX 4070, never touched, is kept by a preset as well; so is any other GPU', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  assert.equal(await value(page, 'gpu'), 'rtx-4070');
  await page.selectOption('#preset', 'llama-2-7b');
  await page.waitForFunction(() => document.getElementById('family').value === 'llama');
  await assertLlama7bOnRtx4070(page);
  await page.selectOption('#gpu', 'h100-nvl');
  await page.waitForFunction(() => document.getElementById('memory_gib').value === '93.583984375');
  await page.selectOption('#preset', 'gpt2');
  await page.waitForFunction(() => document.getElementById('family').value === 'gpt2');
  assert.equal(await value(page, 'gpu'), 'h100-nvl');
  assert.equal(await value(page, 'memory_gib'), '93.583984375');
  assert.equal(await value(page, 'compute_capability'), '9');
  assert.match(await page.textContent('#verdict'), / in 93\.58 GiB$/);
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'gpt2', '--gpu', 'h100-nvl']));
  // A typed memory is kept the same way.
  await page.fill('#memory_gib', '20');
  await page.dispatchEvent('#memory_gib', 'input');
  await page.waitForFunction(() => document.getElementById('gpu').value === 'custom');
  await page.selectOption('#preset', 'tinyllama-1.1b');
  await page.waitForFunction(() => document.getElementById('family').value === 'llama');
  assert.equal(await value(page, 'memory_gib'), '20');
  assert.equal(await value(page, 'gpu'), 'custom');
  assert.match(await page.textContent('#verdict'), / in 20\.0 GiB$/);
  assert.equal(await page.textContent('#gpu-detail'), '');
  assert.deepEqual(errors, []);
  await page.close();
});

test('a link\'s GPU is the device, even where an older link also holds another memory', async () => {
  const { page, errors } = await openPage(env.context, `${env.server.url}?gpu=rtx-4070&memory_gib=80&compute_capability=9`);
  assert.equal(await value(page, 'gpu'), 'rtx-4070');
  assert.equal(await value(page, 'memory_gib'), '11.994140625');
  assert.equal(await value(page, 'compute_capability'), '8.9');
  assert.match(await page.textContent('#verdict'), / in 11\.99 GiB$/);
  await page.close();
  const second = await openPage(env.context, `${env.server.url}?gpu=rtx-5090`);
  // The RTX 5090 as its driver reports it (32,607 MiB; presets.rs names the source), shown cut, never rounded up.
  assert.equal(await value(second.page, 'memory_gib'), '31.8427734375');
  assert.match(await second.page.textContent('#verdict'), / in 31\.84 GiB$/);
  assert.equal(await value(second.page, 'compute_capability'), '12');
  assert.equal(await second.page.textContent('#gpu-detail'), '170 SMs, compute capability 12.0');
  assert.deepEqual([...errors, ...second.errors], []);
  await second.page.close();
});

test('the GPU list holds the new presets, each with its memory and SM count', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  const ids = await page.$$eval('#gpu option', (os) => os.map((o) => o.value));
  for (const id of ['rtx-5090', 'rtx-4060-ti-16', 'rtx-3080', 'rtx-a6000', 'l40s', 'h100-nvl', 'b200', 'mi250']) {
    assert.ok(ids.includes(id), `${id} in ${ids}`);
  }
  const cases = [
    // The B200 (183,359 MiB), the RTX 4070 (12,282 MiB) and the H100 NVL (95,830 MiB) as nvidia-smi reports them.
    ['b200', '179.0615234375', '10', '148 SMs, compute capability 10.0', '179.0 GiB'],
    ['rtx-4070', '11.994140625', '8.9', '46 SMs, compute capability 8.9', '11.99 GiB'],
    ['h100-nvl', '93.583984375', '9', '132 SMs, compute capability 9.0', '93.58 GiB'],
    // The L40S as its driver reports it with ECC on (46,068 MiB; presets.rs names the source): 44.988 GiB, cut to
    // 44.98 GiB (the audit: it showed as 45.0 GiB, more than the device has).
    ['l40s', '44.98828125', '8.9', '142 SMs, compute capability 8.9', '44.98 GiB'],
    ['h200-141', '140.4013671875', '9', '132 SMs, compute capability 9.0', '140.4 GiB'],
    ['mi250', '64', '8', '104 compute units; compute capability 8.0 stands in for its kernels', '64.0 GiB'],
  ];
  for (const [id, gib, cc, detail, memory] of cases) {
    await page.selectOption('#gpu', id);
    await page.waitForFunction((g) => document.getElementById('memory_gib').value === g, gib);
    assert.equal(await value(page, 'compute_capability'), cc, id);
    assert.equal(await page.textContent('#gpu-detail'), detail, id);
    assert.ok((await page.textContent('#verdict')).endsWith(` in ${memory}`), id);
  }
  assert.match(await selectedLabel(page), /^MI250 .*64 GB/);
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget shows the GPU its estimate uses and keeps a GPU picked in it when the host changes the model', async () => {
  const page = await env.context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`http://localhost:${BLOG_PORT}/index.html`);
  await page.waitForFunction(() => ['own', 'seven', 'cfg'].every((id) => document.getElementById(id).dataset.status), null, { timeout: 20000 });
  const gpuOf = (id) => page.evaluate((i) => document.getElementById(i).shadowRoot.querySelector('select[name=gpu]').value, id);
  const textOf = (id) => page.evaluate((i) => document.getElementById(i).shadowRoot.textContent, id);
  const peakOf = (id) => page.evaluate((i) => Number(document.getElementById(i).dataset.peakBytes), id);
  const pick = (id, gpu) => page.evaluate(([i, g]) => {
    const s = document.getElementById(i).shadowRoot.querySelector('select[name=gpu]');
    s.value = g;
    s.dispatchEvent(new Event('change'));
  }, [id, gpu]);
  // No gpu attribute: the preset's own device (the RTX 4070 for nanogpt-30m), and the list says so.
  assert.equal(await gpuOf('own'), 'rtx-4070');
  assert.match(await textOf('own'), /fits in 11\.99 GiB/);
  // A preset with a gpu attribute: that GPU.
  assert.equal(await gpuOf('seven'), 'rtx-4070');
  assert.match(await textOf('seven'), /does not fit in 11\.99 GiB/);
  assert.equal(await peakOf('seven'), cliPeakBytes(['--preset', 'llama-2-7b', '--gpu', 'rtx-4070']));
  // A config's own device that no preset has: "as configured", and it can be chosen again.
  assert.equal(await gpuOf('cfg'), '');
  assert.match(await textOf('cfg'), /fits in 13\.0 GiB/);
  await pick('cfg', 'rtx-4090');
  await page.waitForFunction(() => /in 23\.98 GiB/.test(document.getElementById('cfg').shadowRoot.textContent));
  await pick('cfg', '');
  await page.waitForFunction(() => /in 13\.0 GiB/.test(document.getElementById('cfg').shadowRoot.textContent));
  // A person picks the RTX 4090 in a widget, then the host changes its model: the RTX 4090 stays.
  await pick('own', 'rtx-4090');
  await page.waitForFunction(() => /in 23\.98 GiB/.test(document.getElementById('own').shadowRoot.textContent));
  await page.evaluate(() => document.getElementById('own').setAttribute('preset', 'gpt2'));
  await page.waitForFunction((p) => Number(document.getElementById('own').dataset.peakBytes) === p,
    cliPeakBytes(['--preset', 'gpt2', '--gpu', 'rtx-4090']));
  assert.equal(await gpuOf('own'), 'rtx-4090');
  assert.match(await textOf('own'), /in 23\.98 GiB/);
  // The host naming a GPU replaces the pick.
  await page.evaluate(() => document.getElementById('own').setAttribute('gpu', 't4'));
  // (A T4 16 GB reports 15 GiB with ECC on: presets.rs names the source.)
  await page.waitForFunction(() => /in 15\.0 GiB/.test(document.getElementById('own').shadowRoot.textContent));
  assert.equal(await gpuOf('own'), 't4');
  // The widget's memory is cut, as the page's and the CLI's (an L40S's 44.988 GiB was "45.0 GiB").
  await page.evaluate(() => document.getElementById('own').setAttribute('gpu', 'l40s'));
  await page.waitForFunction(() => /fits in 44\.98 GiB/.test(document.getElementById('own').shadowRoot.textContent));
  assert.deepEqual(errors, []);
  await page.close();
});

test('the SM count: a GPU gives it, a person can type another, and it moves the estimate as the CLI\'s --sms does', async () => {
  const reserved = async (page) => Number(await page.getAttribute('#peak-reserved', 'data-bytes'));
  const cliReserved = (args) => cliEstimate(args).peak_reserved_bytes;
  const { page, errors } = await openPage(env.context, `${env.server.url}?${SPLIT_QUERY}`);
  assert.equal(await value(page, 'gpu'), 'rtx-4070');
  assert.equal(await value(page, 'sms'), '46');
  assert.equal(await reserved(page), cliReserved([...SPLIT_ARGS, '--sms', '46']));
  await setField(page, 'sms', '8');
  assert.equal(await value(page, 'gpu'), 'custom');
  assert.equal(await urlParam(page, 'sms'), '8');
  const eight = await reserved(page);
  assert.equal(eight, cliReserved([...SPLIT_ARGS, '--sms', '8']));
  await setField(page, 'sms', '132');
  assert.equal(await reserved(page), cliReserved([...SPLIT_ARGS, '--sms', '132']));
  assert.notEqual(await reserved(page), eight);
  await page.selectOption('#gpu', 'h100-80');
  await page.waitForFunction(() => document.getElementById('sms').value === '132');
  assert.equal(await urlParam(page, 'sms'), '132');
  // A count that is not one: named at the field.
  await setField(page, 'sms', '0');
  await page.waitForFunction(() => document.querySelector('.field-error[data-for="sms"]').textContent !== '');
  assert.match(await page.textContent('.field-error[data-for="sms"]'), /device\.sms \(0\) must be a whole number of SMs/);
  assert.deepEqual(errors, []);
  await page.close();
  // A link from before the field: the count the core takes for its device (80 GiB at 8.6: an RTX 3090's 82).
  const old = await openPage(env.context, `${env.server.url}?memory_gib=80&compute_capability=8.6`);
  assert.equal(await value(old.page, 'sms'), '82');
  assert.equal(await value(old.page, 'gpu'), 'custom');
  assert.deepEqual(old.errors, []);
  await old.page.close();
});

test('the widget takes the SM count from its state and its field', async () => {
  const page = await env.context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`http://localhost:${BLOG_PORT}/index.html`);
  await page.waitForFunction(() => document.getElementById('sm').dataset.status, null, { timeout: 20000 });
  const reservedOf = () => page.evaluate(() => Number(document.getElementById('sm').dataset.reservedBytes));
  const smsField = () => page.evaluate(() => document.getElementById('sm').shadowRoot.querySelector('input[name=sms]').value);
  assert.equal(await smsField(), '8');
  assert.equal(await reservedOf(), cliEstimate([...SPLIT_ARGS, '--sms', '8']).peak_reserved_bytes);
  await page.evaluate(() => {
    const i = document.getElementById('sm').shadowRoot.querySelector('input[name=sms]');
    i.value = '132';
    i.dispatchEvent(new Event('change'));
  });
  const expected = cliEstimate([...SPLIT_ARGS, '--sms', '132']).peak_reserved_bytes;
  await page.waitForFunction((r) => Number(document.getElementById('sm').dataset.reservedBytes) === r, expected);
  assert.deepEqual(errors, []);
  await page.close();
});
