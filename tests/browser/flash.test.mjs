// Hugging Face's attn_implementation="flash_attention_2" (the flash-attn package; issue 12) on the page and in the
// widget: the attention select carries it into the URL, every estimate equals the native CLI's for that setting,
// and a combination it was not measured for is named next to the select.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setUp, waitRender, openPage, cliPeakBytes } from './helpers.mjs';

const PORT = 8841;
const WIDGET_PORT = 8842;
const BLOG_PORT = 8843;
const env = setUp({ port: PORT, widgetPort: WIDGET_PORT, blogPort: BLOG_PORT, blog: { title: 'flash-attn',
  body: '<vram-fit id="fa" preset="qwen2.5-0.5b" gpu="rtx-4090" show="attention,batch_size" plot="none"></vram-fit>' } });

const peak = async (page) => Number(await page.getAttribute('#peak-allocated', 'data-bytes'));

const select = (page, id, value) => waitRender(page, () => page.selectOption(`#${id}`, value));

test('the page\'s attention select takes flash_attention_2: in the URL, the CLI\'s estimate, refusals named', async () => {
  const { page, errors } = await openPage(env.context, env.server.url);
  await page.selectOption('#preset', 'qwen2.5-0.5b');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('family') === 'qwen2');
  await select(page, 'gpu', 'rtx-4090');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('gpu') === 'rtx-4090');
  const base = ['--preset', 'qwen2.5-0.5b', '--gpu', 'rtx-4090'];
  const sdpa = await peak(page);
  assert.equal(sdpa, cliPeakBytes(base));

  await select(page, 'attention', 'flash_attention_2');
  await page.waitForFunction(() => new URLSearchParams(location.search).get('attention') === 'flash_attention_2');
  const flash = await peak(page);
  assert.equal(flash, cliPeakBytes([...base, '--attention', 'flash_attention_2']));
  assert.notEqual(flash, sdpa, 'flash-attn saves other tensors than SDPA');

  // The link reproduces the view.
  const again = await openPage(env.context, page.url());
  assert.equal(await again.page.inputValue('#attention'), 'flash_attention_2');
  assert.equal(await peak(again.page), flash);
  await again.page.close();

  // torch.compile with flash-attn was not measured: refused, the message next to the attention select.
  await page.check('#compile');
  await page.dispatchEvent('#compile', 'change');
  await page.waitForFunction(() => document.querySelector('.field-error[data-for="attention"]').textContent !== '',
    undefined, { timeout: 10000 });
  assert.match(await page.textContent('.field-error[data-for="attention"]'),
    /train\.attention "flash_attention_2" with train\.compile/);
  assert.equal(await page.getAttribute('#attention', 'aria-invalid'), 'true');
  assert.deepEqual(errors, []);
  await page.close();
});

test('the widget offers flash_attention_2 as an attention knob', async () => {
  const page = await env.context.newPage();
  await page.goto(env.blogServer.url);
  const peakOf = () => page.evaluate(() => Number(document.getElementById('fa').dataset.peakBytes));
  await page.waitForFunction(() => Number(document.getElementById('fa').dataset.peakBytes) > 0);
  const base = ['--preset', 'qwen2.5-0.5b', '--gpu', 'rtx-4090'];
  const sdpa = await peakOf();
  assert.equal(sdpa, cliPeakBytes(base));
  const options = await page.evaluate(() => [...document.getElementById('fa').shadowRoot
    .querySelector('[name=attention]').options].map((o) => o.value));
  assert.deepEqual(options, ['sdpa', 'manual', 'flash_attention_2']);
  await page.evaluate(() => {
    const input = document.getElementById('fa').shadowRoot.querySelector('[name=attention]');
    input.value = 'flash_attention_2';
    input.dispatchEvent(new Event('change'));
  });
  await page.waitForFunction((f) => Number(document.getElementById('fa').dataset.peakBytes) !== f, sdpa);
  assert.equal(await peakOf(), cliPeakBytes([...base, '--attention', 'flash_attention_2']));
  await page.close();
});
