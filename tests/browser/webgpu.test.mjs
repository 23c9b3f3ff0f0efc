// WebGPU: with --enable-unsafe-webgpu headless Chromium offers a SwiftShader adapter, whose info the page shows;
// without it there is no adapter, and the page says so plainly. Neither is an error.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { serve, launch, openPage } from './helpers.mjs';

test('with a WebGPU adapter the page shows its info and limits, and preselects no GPU it cannot name', async () => {
  const server = await serve(8762);
  const context = await launch(['--enable-unsafe-webgpu']);
  try {
    const { page, errors } = await openPage(context, server.url);
    await page.waitForSelector('#webgpu dl', { timeout: 15000 });
    assert.equal(await page.getAttribute('#webgpu', 'data-adapter'), 'swiftshader');
    const text = await page.textContent('#webgpu');
    assert.match(text, /maxBufferSize/);
    assert.match(text, /browsers do not expose/i);
    assert.equal(await page.inputValue('#gpu'), 'rtx-4070');
    assert.deepEqual(errors.filter((e) => !/adapter/i.test(e)), []);
  } finally {
    await context.close();
    server.close();
  }
});

test('without WebGPU the page explains and carries on', async () => {
  const server = await serve(8763);
  const context = await launch();
  try {
    const { page } = await openPage(context, server.url);
    await page.waitForFunction(() => document.getElementById('webgpu').textContent.length > 0);
    assert.match(await page.textContent('#webgpu'), /normal/);
    assert.match(await page.textContent('#peak-allocated'), /GiB$/);
  } finally {
    await context.close();
    server.close();
  }
});
