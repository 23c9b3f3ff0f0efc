// Issue 15: a PyTorch memory snapshot dropped on the page shows its measured peaks beside the estimate, with the
// difference and the blocks at the peak; the reader is a module of its own, loaded only then, in a worker; bad
// files each get one message and the page stays usable; the predicted timeline downloads as a snapshot.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, readFileSync, openSync, ftruncateSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { serve, launch, openPage, setField, ROOT } from './helpers.mjs';

// The nanogpt-30m-b1 reference run (scripts/measure/cases.json), as the page's query and as CLI flags.
const QUERY = 'family=gpt2&n_layer=6&n_head=6&n_embd=384&block_size=512&vocab_size=50304&bias=0&dropout=0'
  + '&batch_size=1&seq_len=512&precision=fp16-amp&optimizer=adamw-fused&attention=sdpa&compile=0&checkpointing=0'
  + '&grad_accum_steps=1&grad_clip=1&compute_capability=9.0&memory_gib=80&sms=132';
const FLAGS = ['--family', 'gpt2', '--n-layer', '6', '--n-head', '6', '--n-embd', '384', '--block-size', '512',
  '--vocab-size', '50304', '--no-bias', '--batch-size', '1', '--precision', 'fp16-amp', '--optimizer', 'adamw-fused',
  '--no-compile', '--no-checkpointing', '--grad-clip', '1'];
const SNAPSHOT = join(ROOT, 'tests/data/stub-cuda/snapshots/nanogpt-30m-b1.pickle.gz');
const CLI = join(ROOT, 'target/release/vramfit');

let server;
let context;
before(async () => { server = await serve(8766); context = await launch(); });
after(async () => { await context?.close(); server?.close(); });

async function drop(page, path) {
  const before = await page.evaluate(() => Number(document.body.dataset.snapshotsRead || 0));
  await page.setInputFiles('#snapshot-file', path);
  await page.waitForFunction((b) => Number(document.body.dataset.snapshotsRead || 0) > b, before, { timeout: 30000 });
}

test('a reference run\'s snapshot shows its measured peak beside the estimate, with the difference and the blocks', async () => {
  const { page, requests, errors } = await openPage(context, `${server.url}?${QUERY}`);
  assert.ok(!requests.some((u) => u.includes('snapshot')), 'the first load does not fetch the snapshot module');
  await drop(page, SNAPSHOT);
  assert.equal(await page.textContent('#snapshot-error'), '');
  const cli = JSON.parse(String(execFileSync(CLI, ['compare', '--snapshot', SNAPSHOT, '--format', 'json', ...FLAGS])));
  assert.equal(cli.measured_peak_allocated_bytes, 778411520, 'the record\'s max_memory_allocated');
  const page_est = await page.getAttribute('#peak-allocated', 'data-bytes');
  assert.equal(Number(page_est), cli.predicted_peak_allocated_bytes, 'the page estimates the same setup');
  const d = cli.allocated_difference_percent;
  assert.equal(await page.textContent('#snap-allocated-difference'), `${d > 0 ? '+' : ''}${d.toFixed(2)}%`);
  assert.equal(await page.textContent('#snap-measured-allocated'), '742 MiB');
  assert.equal(await page.textContent('#snap-measured-reserved'), '842 MiB');
  assert.equal(await page.textContent('#snap-predicted-reserved'), await page.textContent('#peak-reserved'));
  const origins = await page.textContent('#snapshot-origins');
  assert.ok(origins.includes('optimizer step and state') && origins.includes('loss and logits'), origins);
  const blocks = await page.locator('#snapshot-blocks tbody tr').count();
  assert.ok(blocks >= 10, `${blocks} blocks listed`);
  assert.ok((await page.textContent('#snapshot-blocks')).includes('cross_entropy (functional.py:'));
  assert.ok(requests.some((u) => u.includes('snapshot_bg.')), 'the snapshot module was loaded on the drop');
  assert.ok(requests.every((u) => u.startsWith(server.url) || u.startsWith('blob:') || u.startsWith('data:')), 'no request leaves the origin');
  assert.deepEqual(errors, []);
  await page.close();
});

test('bad files each get one message and the page stays usable', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'vramfit-snapshots-'));
  const gz = readFileSync(SNAPSHOT);
  const files = {
    'truncated.pickle.gz': [gz.subarray(0, gz.length >> 1), 'truncated'],
    'notes.txt': [Buffer.from('these are not the bytes you are looking for'), 'not a pickle'],
    'list.pickle': [Buffer.from([0x80, 4, 0x5d, 0x28, 0x4b, 1, 0x4b, 2, 0x65, 0x2e]), 'holds a list'],
    // {"segments": []}: a snapshot of a PyTorch before device traces.
    'old.pickle': [Buffer.concat([Buffer.from([0x80, 4, 0x7d, 0x28, 0x8c, 8]), Buffer.from('segments'), Buffer.from([0x5d, 0x75, 0x2e])]), 'no device traces'],
    // pickle that would run os.system: refused, nothing run.
    'evil.pickle': [Buffer.from('\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.', 'latin1'), 'nothing is run'],
  };
  const { page, errors } = await openPage(context, `${server.url}?${QUERY}`);
  for (const [name, [bytes, expected]] of Object.entries(files)) {
    const path = join(dir, name);
    writeFileSync(path, bytes);
    await drop(page, path);
    const message = await page.textContent('#snapshot-error');
    assert.ok(message.startsWith(`${name}: `) && message.includes(expected), `${name}: ${message}`);
    assert.equal(message.split('\n').length, 1);
    assert.equal(await page.isHidden('#snapshot-result'), true);
  }
  // A huge file (sparse: 1.5 GiB that take no disk) is refused before it is read.
  const huge = join(dir, 'huge.pickle');
  const fd = openSync(huge, 'w');
  ftruncateSync(fd, 3 * 2 ** 29);
  closeSync(fd);
  await drop(page, huge);
  const message = await page.textContent('#snapshot-error');
  assert.ok(message.includes('1.50 GiB') && message.includes('max_entries'), message);
  // The page still estimates, and a good file still reads after the bad ones.
  const before = await page.textContent('#peak-allocated');
  await setField(page, 'batch_size', 2);
  assert.notEqual(await page.textContent('#peak-allocated'), before);
  await setField(page, 'batch_size', 1);
  await drop(page, SNAPSHOT);
  assert.equal(await page.textContent('#snapshot-error'), '');
  assert.equal(await page.textContent('#snap-measured-allocated'), '742 MiB');
  assert.deepEqual(errors, []);
  await page.close();
});

test('the predicted timeline downloads as a snapshot the reader reads back', async () => {
  const { page } = await openPage(context, `${server.url}?${QUERY}`);
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#export-snapshot')]);
  const path = join(mkdtempSync(join(tmpdir(), 'vramfit-predicted-')), 'predicted.pickle');
  await download.saveAs(path);
  const bytes = readFileSync(path);
  assert.deepEqual([...bytes.subarray(0, 2)], [0x80, 4]);
  // Read back by the CLI's reader: the modelled allocator's peaks, the page's reserved among them.
  const back = JSON.parse(String(execFileSync(CLI, ['compare', '--snapshot', path, '--format', 'json', ...FLAGS])));
  assert.equal(back.measured_peak_reserved_bytes, Number(await page.getAttribute('#peak-reserved', 'data-bytes')));
  assert.ok(back.measured_peak_allocated_bytes >= Number(await page.getAttribute('#peak-allocated', 'data-bytes')));
  assert.ok(back.measured.n_events > 1000, `${back.measured.n_events} events`);
  await page.close();
});
