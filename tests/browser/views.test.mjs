// The view a person sees, shares or exports is the current setup's: a link with a GPU and a strategy keeps both,
// a snapshot read and a predicted snapshot asked for at once each come out whole, a comparison made with an
// earlier setup's estimate says so, and the plots exported while a deep model's update is still drawing are the
// current setup's. See: audit 3.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, setUp, openPage, setField, settled, cliPeakBytes } from './helpers.mjs';

const PORT = 8861;
const WIDGET_PORT = 8862;
const BLOG_PORT = 8863;
const env = setUp({ port: PORT, widgetPort: WIDGET_PORT, blogPort: BLOG_PORT, blog: { title: 'Block 256', body:
  '<vram-fit id="w" state="family=llama&amp;n_layer=4&amp;n_head=8&amp;n_kv_head=2&amp;n_embd=256&amp;intermediate_size=512&amp;vocab_size=1000&amp;block_size=256&amp;batch_size=2&amp;precision=bf16-amp&amp;optimizer=adamw&amp;compile=0&amp;gpu=rtx-4070"></vram-fit>'
  + '<vram-fit id="qlora-compiled" preset="llama-3.2-1b" gpu="rtx-4090" finetune="qlora" compile="true"></vram-fit>'
  + '<vram-fit id="lora-compiled" preset="gpt2-medium" gpu="rtx-4090" finetune="full" compile="true"></vram-fit>'
  + '<vram-fit id="partial-state" preset="llama-3.1-8b" state="parallel=fsdp&amp;gpus=8"></vram-fit>'
  + '<vram-fit id="state-alone" state="batch_size=4&amp;compile=0"></vram-fit>'
  + '<vram-fit id="bad-state" preset="llama-3.1-8b" state="precision=fp8"></vram-fit>'
  + '<vram-fit id="bad-preset" preset="llama-4"></vram-fit><vram-fit id="bad-gpu" gpu="rtx-9090"></vram-fit>'
  + '<vram-fit id="bad-config" config="{&quot;model&quot;: {}}"></vram-fit>'
  + '<vram-fit id="one-gpu" preset="llama-3.2-1b" gpu="rtx-4090" show="parallel,gpus,offload"></vram-fit>' } });

const peak = (page) => page.getAttribute('#peak-allocated', 'data-bytes').then(Number);
const param = (page, k) => new URL(page.url()).searchParams.get(k);

// The nanogpt-30m-b1 reference run, whose snapshot is committed.
const QUERY = 'family=gpt2&n_layer=6&n_head=6&n_embd=384&block_size=512&vocab_size=50304&bias=0&dropout=0'
  + '&batch_size=1&seq_len=512&precision=fp16-amp&optimizer=adamw-fused&attention=sdpa&compile=0&checkpointing=0'
  + '&grad_accum_steps=1&grad_clip=1';
const SNAPSHOT = join(ROOT, 'tests/data/stub-cuda/snapshots/nanogpt-30m-b1.pickle.gz');

test('a link with a GPU preset and a strategy reloads with both, and choosing another GPU keeps the strategy', async () => {
  const link = `${QUERY}&parallel=ddp&gpus=4&bucket_cap_mb=10&gpu=rtx-4070`;
  const { page, errors } = await openPage(env.context, `${env.server.url}?${link}`);
  const flags = ['--preset', 'nanogpt-30m', '--no-compile', '--batch-size', '1', '--grad-clip', '1', '--parallel', 'ddp',
    '--gpus', '4', '--bucket-cap-mb', '10'];
  // Before the fix the link's GPU reset the GPUs group to one GPU: the page estimated one GPU without a word.
  assert.equal(await page.inputValue('#parallel'), 'ddp');
  assert.equal(await page.inputValue('#gpus'), '4');
  assert.equal(await page.inputValue('#bucket_cap_mb'), '10');
  assert.equal(param(page, 'parallel'), 'ddp');
  assert.equal(await peak(page), cliPeakBytes([...flags, '--gpu', 'rtx-4070']));
  await page.selectOption('#gpu', 'h100-80');
  assert.equal(await page.inputValue('#parallel'), 'ddp');
  assert.equal(param(page, 'gpus'), '4');
  assert.equal(param(page, 'gpu'), 'h100-80');
  assert.equal(await peak(page), cliPeakBytes([...flags, '--gpu', 'h100-80']));
  assert.match(await page.textContent('#scope'), /per GPU/);
  assert.deepEqual(errors, []);
  await page.close();
});

test('a link with a block size and no sequence length trains on whole blocks, as the widget and the CLI do', async () => {
  const link = 'family=llama&n_layer=4&n_head=8&n_kv_head=2&n_embd=256&intermediate_size=512&vocab_size=1000'
    + '&block_size=256&batch_size=2&precision=bf16-amp&optimizer=adamw&compile=0&gpu=rtx-4070';
  const { page } = await openPage(env.context, `${env.server.url}?${link}`);
  assert.equal(await page.textContent('#global-error'), '');
  const cli = cliPeakBytes(['--family', 'llama', '--n-layer', '4', '--n-head', '8', '--n-kv-head', '2', '--n-embd', '256',
    '--intermediate-size', '512', '--vocab-size', '1000', '--block-size', '256', '--batch-size', '2',
    '--precision', 'bf16-amp', '--optimizer', 'adamw', '--no-compile', '--gpu', 'rtx-4070', '--grad-clip', '1',
    '--dropout', '0', '--no-tie-embeddings']);
  assert.equal(await peak(page), cli);
  const blog = await env.context.newPage();
  await blog.goto(env.blogServer.url);
  await blog.waitForFunction(() => document.getElementById('w')?.dataset.status === 'ok', undefined, { timeout: 20000 });
  assert.equal(Number(await blog.evaluate(() => document.getElementById('w').dataset.peakBytes)), cli);
  await blog.close();
  await page.close();
});

test('a predicted snapshot asked for while a file is read: one download, and the read finishes', async () => {
  const { page, errors } = await openPage(env.context, `${env.server.url}?${QUERY}`);
  const downloads = [];
  page.on('download', (d) => downloads.push(d));
  const read = page.waitForFunction(() => Number(document.body.dataset.snapshotsRead || 0) > 0, undefined, { timeout: 30000 });
  // The file chosen and the button pressed in one task: the read has not started when the download is asked for.
  await page.evaluate((b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], 'nanogpt-30m-b1.pickle.gz'));
    const input = document.getElementById('snapshot-file');
    input.files = data.files;
    input.dispatchEvent(new Event('change', { bubbles: true }));
    document.getElementById('export-snapshot').click();
  }, readFileSync(SNAPSHOT).toString('base64'));
  await read;
  for (let i = 0; i < 50 && downloads.length < 1; i += 1) await page.waitForTimeout(100);
  await page.waitForTimeout(500);
  // Before the fix the read's progress messages went to the download: four files, none a snapshot, the read never
  // done.
  assert.equal(downloads.length, 1);
  const bytes = readFileSync(await downloads[0].path());
  assert.deepEqual([...bytes.subarray(0, 2)], [0x80, 4]);
  assert.equal(await page.isHidden('#snapshot-result'), false);
  assert.equal(await page.textContent('#snap-measured-allocated'), '742 MiB');
  assert.equal(await page.textContent('#snapshot-error'), '');
  assert.deepEqual(errors, []);
  await page.close();
});

test('a snapshot compared with an earlier setup says so, and compares again with this one', async () => {
  const { page } = await openPage(env.context, `${env.server.url}?${QUERY}`);
  let reads = 0;
  const drop = async (act) => {
    reads += 1;
    await act();
    await page.waitForFunction((n) => Number(document.body.dataset.snapshotsRead || 0) >= n, reads, { timeout: 30000 });
  };
  await drop(() => page.setInputFiles('#snapshot-file', SNAPSHOT));
  const predicted = await page.textContent('#snap-predicted-allocated');
  assert.equal(predicted, await page.textContent('#peak-allocated'));
  assert.equal(await page.isHidden('#snapshot-stale'), true);
  await setField(page, 'batch_size', 8);
  assert.notEqual(await page.textContent('#peak-allocated'), predicted);
  // The comparison is the earlier setup's: said, and its estimate greyed.
  assert.equal(await page.isHidden('#snapshot-stale'), false);
  assert.equal(await page.getAttribute('#snapshot-result', 'data-stale'), '');
  await drop(() => page.click('#snapshot-again'));
  assert.equal(await page.textContent('#snap-predicted-allocated'), await page.textContent('#peak-allocated'));
  assert.equal(await page.isHidden('#snapshot-stale'), true);
  assert.equal(await page.getAttribute('#snapshot-result', 'data-stale'), null);
  await page.close();
});

// The PNGs downloaded after `act`, by name, as data URLs, once `count` have come (or a few seconds have passed).
async function pngs(page, act, count) {
  const got = [];
  const on = (d) => got.push(d);
  page.on('download', on);
  await act();
  for (let i = 0; i < 50 && got.length < count; i += 1) await page.waitForTimeout(100);
  await page.waitForTimeout(300);
  page.off('download', on);
  const out = {};
  for (const d of got) out[d.suggestedFilename()] = `data:image/png;base64,${readFileSync(await d.path()).toString('base64')}`;
  return out;
}

test('plots exported while a deep model is still drawing are its plots, and a plot of another setup is left out', async () => {
  const { page } = await openPage(env.context, `${env.server.url}?`);
  await page.selectOption('#preset', 'mistral-7b');
  // Mistral-7B at batch 3 on an RTX 4070: deferred (32 layers), and it does not fit (the GPU plan is drawn).
  const files = await pngs(page, () => page.evaluate(() => {
    document.getElementById('batch_size').value = '3';
    document.getElementById('batch_size').dispatchEvent(new Event('change', { bubbles: true }));
    document.getElementById('export-png').click();
  }), 5);
  await settled(page);
  assert.deepEqual(Object.keys(files).sort(), ['vramfit-batch.png', 'vramfit-block.png', 'vramfit-fitmap.png',
    'vramfit-gpus.png', 'vramfit-timeline.png']);
  for (const id of ['batch', 'block', 'fitmap', 'timeline', 'gpus']) {
    const now = await page.evaluate((c) => document.getElementById(c).toDataURL('image/png'), `plot-${id}`);
    assert.ok(files[`vramfit-${id}.png`] === now, `${id}: the exported plot is the one drawn for batch 3`);
  }
  // nanoGPT fits the RTX 4070: its GPU plan is not drawn, and Mistral's is not exported as its.
  await page.selectOption('#preset', 'nanogpt-30m');
  const small = await pngs(page, () => page.click('#export-png'), 4);
  assert.deepEqual(Object.keys(small).sort(), ['vramfit-batch.png', 'vramfit-block.png', 'vramfit-fitmap.png',
    'vramfit-timeline.png']);
  await page.close();
});

test('back and forward restore a field the newer view had set and the older URL leaves out', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'llama-3.2-1b');
  await page.check('#lora');
  const lora = await peak(page);
  const url = page.url();
  await page.selectOption('#quantization', 'nf4');
  await page.selectOption('#base_dtype', 'bf16');
  const qlora = await peak(page);
  assert.notEqual(qlora, lora);
  await page.goBack();
  await page.waitForFunction(() => document.getElementById('base_dtype').value === '');
  assert.equal(await page.inputValue('#quantization'), 'nf4');
  await page.goBack();
  await page.waitForFunction(() => !location.search.includes('quantization'));
  // Before the fix the form kept the 4-bit base the older URL leaves out: it estimated QLoRA again and wrote
  // quantization=nf4 into the older entry.
  assert.equal(await page.inputValue('#quantization'), '');
  assert.equal(page.url(), url);
  assert.equal(await peak(page), lora);
  await page.goForward();
  await page.goForward();
  await page.waitForFunction(() => document.getElementById('base_dtype').value === 'bf16');
  assert.equal(await page.inputValue('#quantization'), 'nf4');
  assert.equal(await peak(page), qlora);
  assert.deepEqual(errors, []);
  await page.close();
});

test('typing a value is one history entry: back returns to the view before it', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  const before = await peak(page);
  const entries = await page.evaluate(() => history.length);
  // A person types "24" key by key (a frame or more between keys: each updates the view), then leaves the field.
  await page.click('#batch_size');
  await page.keyboard.press('Control+A');
  await page.keyboard.type('24', { delay: 60 });
  await page.waitForTimeout(100);
  await page.keyboard.press('Tab');
  await settled(page);
  assert.equal(param(page, 'batch_size'), '24');
  const typed = await peak(page);
  assert.equal(await page.evaluate(() => history.length), entries + 1);
  await page.goBack();
  // Before the fix each keystroke's update replaced the entry before the typing: back stayed on batch 24.
  await page.waitForFunction(() => document.getElementById('batch_size').value === '16');
  assert.equal(param(page, 'batch_size'), '16');
  assert.equal(await peak(page), before);
  await page.goForward();
  await page.waitForFunction(() => document.getElementById('batch_size').value === '24');
  assert.equal(await peak(page), typed);
  // A select's change is one entry too (its input event does not add another).
  await page.selectOption('#precision', 'bf16-amp');
  assert.equal(await page.evaluate(() => history.length), entries + 2);
  assert.deepEqual(errors, []);
  await page.close();
});

test('while the form holds an error the exports refuse, saying why, instead of writing the earlier setup', async () => {
  const { page, errors } = await openPage(env.context, `${env.server.url}?${QUERY}`);
  let downloads = 0;
  page.on('download', () => { downloads += 1; });
  await setField(page, 'batch_size', 0);
  assert.equal(await page.getAttribute('#results', 'data-stale'), 'true');
  for (const id of ['export-csv', 'export-json', 'export-png', 'export-snapshot']) {
    await page.click(`#${id}`);
    assert.match(await page.textContent('#export-status'), /Fix the marked field first/, id);
  }
  await page.waitForTimeout(1000);
  // Before the fix each wrote the greyed batch-1 setup's files as if they were the form's.
  assert.equal(downloads, 0);
  // A snapshot dropped now is not compared with the greyed estimate either.
  await page.setInputFiles('#snapshot-file', SNAPSHOT);
  assert.equal(await page.textContent('#snapshot-error'), 'Fix the setup above first: the snapshot is compared with its estimate.');
  assert.equal(await page.isHidden('#snapshot-result'), true);
  await setField(page, 'batch_size', 2);
  assert.equal(await page.textContent('#export-status'), '');
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#export-csv')]);
  const csv = readFileSync(await download.path(), 'utf8').split('\n');
  const row = csv.find((l) => l.startsWith('2,'));
  assert.equal(Number(row.split(',')[1]), await peak(page));
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget applies its finetune recipe before its compile attribute, as the CLI its --finetune before --compile', async () => {
  const blog = await env.context.newPage();
  await blog.goto(env.blogServer.url);
  const status = (id) => blog.evaluate((i) => document.getElementById(i)?.dataset.status, id);
  await blog.waitForFunction(() => ['qlora-compiled', 'lora-compiled'].every((i) => document.getElementById(i)?.dataset.status),
    undefined, { timeout: 20000 });
  // Before the fix the recipe turned compile off without a word: an eager QLoRA estimate where the host asked for
  // torch.compile, which the CLI refuses.
  assert.equal(await status('qlora-compiled'), 'error');
  const message = await blog.evaluate(() => document.getElementById('qlora-compiled').shadowRoot.querySelector('.error').textContent);
  assert.throws(() => cliPeakBytes(['--preset', 'llama-3.2-1b', '--gpu', 'rtx-4090', '--finetune', 'qlora', '--compile']));
  assert.match(message, /train\.lora with torch\.compile/);
  // A recipe torch.compile is modelled for: compiled, as the CLI's.
  assert.equal(await status('lora-compiled'), 'ok');
  assert.equal(Number(await blog.evaluate(() => document.getElementById('lora-compiled').dataset.peakBytes)),
    cliPeakBytes(['--preset', 'gpt2-medium', '--gpu', 'rtx-4090', '--finetune', 'full', '--compile']));
  await blog.close();
});

test('a widget\'s message names the attribute it could not read', async () => {
  const blog = await env.context.newPage();
  await blog.goto(env.blogServer.url);
  const ids = ['bad-state', 'bad-preset', 'bad-gpu', 'bad-config'];
  await blog.waitForFunction((all) => all.every((i) => document.getElementById(i)?.dataset.status), ids, { timeout: 20000 });
  const message = (id) => blog.evaluate((i) => document.getElementById(i).shadowRoot.querySelector('.error').textContent, id);
  for (const id of ids) assert.equal(await blog.evaluate((i) => document.getElementById(i).dataset.status, id), 'error', id);
  // Before the fix: "vramfit: train.precision ...", with nothing to say that the state attribute was at fault.
  assert.equal(await message('bad-state'),
    'vramfit: the state attribute: train.precision ("fp8") is not one of: fp32, fp16-amp, bf16-amp, bf16');
  assert.equal(await message('bad-preset'), 'vramfit: the preset attribute: unknown preset "llama-4"');
  assert.equal(await message('bad-gpu'), 'vramfit: the gpu attribute: unknown GPU "rtx-9090"');
  assert.match(await message('bad-config'), /^vramfit: the config attribute: /);
  await blog.close();
});

test('a widget\'s multi-GPU field set before a strategy names the field and greys the one-GPU figures', async () => {
  const blog = await env.context.newPage();
  await blog.goto(env.blogServer.url);
  await blog.waitForFunction(() => document.getElementById('one-gpu')?.dataset.status === 'ok', undefined, { timeout: 20000 });
  const state = () => blog.evaluate(() => {
    const w = document.getElementById('one-gpu');
    return [w.dataset.status, w.shadowRoot.querySelector('.error').textContent, w.shadowRoot.querySelector('.root').classList.contains('stale')];
  });
  await blog.evaluate(() => {
    const i = document.getElementById('one-gpu').shadowRoot.querySelector('input[name=gpus]');
    i.value = '4';
    i.dispatchEvent(new Event('input'));
  });
  // Before the fix: the one-GPU figures stood as the inputs' (not greyed) beside a field that said 4 GPUs.
  assert.deepEqual(await state(), ['error', 'vramfit: gpus ("4") needs more than one GPU: choose a strategy (ddp or fsdp) first', true]);
  await blog.evaluate(() => {
    const s = document.getElementById('one-gpu').shadowRoot.querySelector('select[name=parallel]');
    s.value = 'ddp';
    s.dispatchEvent(new Event('change'));
  });
  assert.deepEqual(await state(), ['ok', '', false]);
  await blog.close();
});

// A hand-written partial link means one setup everywhere: the page reads it over its default case, the widget's
// state over its preset (or config, else the page's default case), as `vramfit` reads its flags over its source.
// Before: the page estimated the default case at batch 4 under "In the link: missing required field
// "model.family"", and both widgets showed that message instead of an estimate.
test('a partial link is the default case with what it names changed, on the page and in the widget', async () => {
  const { page, errors } = await openPage(env.context, `${env.server.url}?batch_size=4&compile=0`);
  assert.equal(await page.textContent('#global-error'), '');
  // The page's default case is on an RTX 4070 (the CLI's default GPU is an H100): peak allocated counts the
  // allocator's blocks, whose placement follows each GPU's cuBLAS workspace.
  const atFour = cliPeakBytes(['--batch-size', '4', '--no-compile', '--gpu', 'rtx-4070']);
  assert.equal(await peak(page), atFour);
  assert.equal(await page.inputValue('#batch_size'), '4');
  assert.equal(await page.inputValue('#n_layer'), '6');
  assert.deepEqual(errors, []);
  await page.close();

  const blog = await env.context.newPage();
  await blog.goto(env.blogServer.url);
  const ids = ['state-alone', 'partial-state'];
  await blog.waitForFunction((all) => all.every((i) => document.getElementById(i)?.dataset.status), ids, { timeout: 20000 });
  const bytes = (id) => blog.evaluate((i) => Number(document.getElementById(i).dataset.peakBytes), id);
  for (const id of ids) assert.equal(await blog.evaluate((i) => document.getElementById(i).dataset.status, id), 'ok', id);
  assert.equal(await bytes('state-alone'), atFour);
  assert.equal(await bytes('partial-state'), cliPeakBytes(['--preset', 'llama-3.1-8b', '--parallel', 'fsdp', '--gpus', '8']));
  await blog.close();
});

// A widget whose plot cannot be drawn (here: the browser gives no 2D context) keeps its figures, says why, and
// says "partial": before, its status said "ok" as if the plot were there.
test('a widget whose plot fails keeps its figures, names the failure and says partial', async () => {
  const blog = await env.context.newPage();
  await blog.addInitScript(() => { HTMLCanvasElement.prototype.getContext = () => null; });
  await blog.goto(env.blogServer.url);
  await blog.waitForFunction(() => document.getElementById('w')?.dataset.status, undefined, { timeout: 20000 });
  const [status, error, peakBytes] = await blog.evaluate(() => {
    const w = document.getElementById('w');
    return [w.dataset.status, w.shadowRoot.querySelector('.error').textContent, Number(w.dataset.peakBytes)];
  });
  assert.equal(status, 'partial');
  assert.match(error, /canvas/i);
  assert.ok(peakBytes > 0);
  await blog.close();
});

// Two rows of one name are two recipes: a QLoRA setup without double quantization, then the LoRA row chosen,
// showed its QLoRA row at 6.44 GiB and then at 6.40 GiB with nothing to say why. Each row now says its recipe.
test('each fine-tuning row says which recipe it is', async () => {
  const link = 'family=llama&n_layer=2&n_head=4&n_kv_head=2&n_embd=256&intermediate_size=512&vocab_size=1000'
    + '&block_size=256&batch_size=2&precision=bf16-amp&compile=0&checkpointing=1&lora=1&lora_r=16'
    + '&quantization=nf4&double_quant=0&gpu=rtx-4070';
  const { page, errors } = await openPage(env.context, `${env.server.url}?${link}`);
  const detail = (m) => page.textContent(`#methods tr[data-method=${m}] th small.detail`);
  await page.evaluate(() => { document.getElementById('methods-section').open = true; });
  await page.waitForSelector('#methods tr[data-method=qlora] th small.detail');
  assert.equal(await detail('full'), 'every parameter');
  assert.equal(await detail('qlora'), 'r 16, 4-bit NF4 base, checkpointed');
  assert.match(await page.textContent('#methods tr[data-method=qlora] th'), /^QLoRA \(this setup\)/);
  await page.click('#methods tr[data-method=lora] button');
  assert.equal(await page.inputValue('#quantization'), '');
  assert.equal(await detail('qlora'), 'r 16, 4-bit NF4 with double quantization base, checkpointed');
  assert.equal(await detail('lora'), 'r 16, bf16 base, checkpointed');
  assert.deepEqual(errors, []);
  await page.close();
});

// LoRA ticked on OLMoE: the page's 0.05 dropout was named as an error (peft's ParamWrapper on the fused experts
// takes none) until a person typed 0. It now takes the recipe's dropout for the model, as `--finetune lora`
// does, and estimates what the CLI estimates.
test('ticking LoRA on a mixture of experts takes the recipe\'s dropout and estimates', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'olmoe-1b-7b');
  await page.check('#lora');
  assert.equal(await page.inputValue('#lora_dropout'), '0');
  assert.equal(await page.textContent('.field-error[data-for="lora_dropout"]'), '');
  assert.equal(await peak(page), cliPeakBytes(['--preset', 'olmoe-1b-7b', '--gpu', 'rtx-4070',
    '--lora', 'r=16,alpha=32,dropout=0,targets=all-linear']));
  // On a dense model the box keeps its 0.05.
  await page.uncheck('#lora');
  await page.selectOption('#preset', 'llama-3.2-1b');
  await page.fill('#lora_dropout', '0.05');
  await page.check('#lora');
  assert.equal(await page.inputValue('#lora_dropout'), '0.05');
  assert.deepEqual(errors, []);
  await page.close();
});
