// A link to the page that names the widget's `preset` (embed.html?preset=...): the page showed its default case,
// the nanoGPT model, without a word, as if the link had been read. It says so now, beside the estimate it shows,
// as `vramfit estimate --link` refuses such a link by name.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { openPage, setUp, cliPeakBytes } from './helpers.mjs';

const env = setUp({ port: 8941 });

const peak = (page) => page.evaluate(() => Number(document.getElementById('peak-allocated').dataset.bytes));

test('a link naming a preset says the page does not read it', async () => {
  const { page, errors } = await openPage(env.context, `${env.server.url}?preset=llama-3.1-8b&batch_size=4`);
  assert.equal(await page.textContent('#global-error'),
    'In the link: preset ("llama-3.1-8b") is the widget\'s key, which a link to the page does not set: choose the model in the Preset list');
  // The rest of the link is read over the default case, as before.
  assert.equal(await peak(page), cliPeakBytes(['--link', 'batch_size=4']));
  assert.equal(await page.inputValue('#n_layer'), '6');
  assert.deepEqual(errors, []);
  await page.close();
});

test('a link without one says nothing', async () => {
  const { page, errors } = await openPage(env.context, `${env.server.url}?batch_size=4&plot=batch`);
  assert.equal(await page.textContent('#global-error'), '');
  assert.deepEqual(errors, []);
  await page.close();
});
