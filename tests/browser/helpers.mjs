// Shared helpers for the browser tests: serve www/ with scripts/serve.py, launch Debian's Chromium through
// playwright-core, and read canvases back.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, isAbsolute } from 'node:path';
import { fileURLToPath } from 'node:url';
import { before, after } from 'node:test';
import { chromium } from 'playwright-core';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const ARTIFACTS = join(ROOT, 'target', 'browser');
mkdirSync(ARTIFACTS, { recursive: true });

const BASE_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'];

/** Serves `dir` (relative to the repository, or absolute) on 127.0.0.1:`port`; `plain` drops vramfit's headers
 * (CSP, CORS) to stand in for somebody else's site. Resolves when the server answers. */
export async function serve(port, dir = 'www', plain = false) {
  const args = [join(ROOT, 'scripts', 'serve.py'), '--port', String(port), '--dir', isAbsolute(dir) ? dir : join(ROOT, dir)];
  if (plain) args.push('--plain');
  const proc = spawn('python3', args,
    { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise((resolve, reject) => {
    proc.stdout.on('data', (d) => { if (String(d).includes('serving')) resolve(); });
    proc.on('exit', (code) => reject(new Error(`server exited with ${code}`)));
  });
  return { url: `http://127.0.0.1:${port}/`, close: () => proc.kill() };
}

/** Serves a stand-in blog post on somebody else's site (127.0.0.1:`port`, no vramfit headers): a page titled
 * `title` that loads the widget's embed.js from `widget` (a base URL) and holds `body` (its <vram-fit> tags). */
export async function serveBlogPost(port, title, widget, body) {
  const dir = mkdtempSync(join(tmpdir(), 'vramfit-blog-'));
  writeFileSync(join(dir, 'index.html'), `<!doctype html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>${title}</title>
<script type="module" src="${widget}embed.js"></script></head><body>
${body}
</body></html>`);
  return serve(port, dir, true);
}

/** Launches Chromium with a fresh profile; `extraArgs` e.g. ['--enable-unsafe-webgpu']. */
export async function launch(extraArgs = []) {
  const userDataDir = mkdtempSync(join(tmpdir(), 'vramfit-chromium-'));
  return chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    args: [...BASE_ARGS, ...extraArgs],
    viewport: { width: 1280, height: 1800 },
  });
}

/** Waits until the page's last update has drawn everything: a deep model's update draws its headline at once and
 * the rest (advice, plots, GPU plan, methods) in later tasks, with #results aria-busy meanwhile (www/main.js). */
export async function settled(page, timeout = 20000) {
  await page.waitForFunction(() => document.getElementById('results')?.getAttribute('aria-busy') !== 'true',
    undefined, { timeout });
}

// The page's actions that can start an update: each, on a page from `openPage`, returns once the update is drawn.
const ACTIONS = ['selectOption', 'check', 'uncheck', 'setChecked', 'click', 'dispatchEvent', 'goBack', 'goForward'];

/** Opens the page and waits until the estimator has rendered once. Records every request URL. The page's actions
 * (ACTIONS) wait for the update they start to be drawn whole (`settled`). */
export async function openPage(context, url) {
  const page = await context.newPage();
  for (const name of ACTIONS) {
    const act = page[name].bind(page);
    page[name] = async (...args) => {
      const result = await act(...args);
      await settled(page);
      return result;
    };
  }
  const requests = [];
  const errors = [];
  page.on('request', (r) => requests.push(r.url()));
  page.on('pageerror', (e) => errors.push(e.message));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  await page.goto(url);
  await page.waitForSelector('body[data-ready=true]', { timeout: 20000 });
  return { page, requests, errors };
}

/** A digest of a canvas' pixels and the count of non-background pixels. */
export async function canvasPixels(page, id) {
  return page.evaluate((cid) => {
    const c = document.getElementById(cid);
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let hash = 0;
    let drawn = 0;
    const [r0, g0, b0] = [d[0], d[1], d[2]];
    for (let i = 0; i < d.length; i += 4) {
      hash = (hash * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) >>> 0;
      if (Math.abs(d[i] - r0) + Math.abs(d[i + 1] - g0) + Math.abs(d[i + 2] - b0) > 30) drawn += 1;
    }
    return { hash, drawn, width: c.width, height: c.height };
  }, id);
}

/** Sets an input's value as a person would (fill + change) and waits for the next render. */
export async function setField(page, id, value) {
  const before = await page.evaluate(() => document.body.dataset.estimated);
  await page.fill(`#${id}`, String(value));
  await page.dispatchEvent(`#${id}`, 'change');
  await page.waitForFunction((b) => document.body.dataset.estimated !== b, before, { timeout: 3000 }).catch(() => {});
  await settled(page);
}

/** The native CLI's JSON estimate (allocated and reserved bytes, ...) for the same query. */
export function cliEstimate(args) {
  const out = execFileSync(join(ROOT, 'target', 'release', 'vramfit'), ['estimate', '--format', 'json', ...args]);
  return JSON.parse(String(out));
}

/** The native CLI's peak allocated bytes for the same query, for cross-checking the page. */
export function cliPeakBytes(args) {
  return cliEstimate(args).peak_allocated_bytes;
}

/** A test file's set-up, made before its first test and closed after its last (node:test's `before`/`after`):
 * the page served on `port`; with `blog` (`{ title, body }`: the post's `<vram-fit>` tags), the widget's
 * origin on `widgetPort` (the page's own origin when not given) and a stand-in blog post on `blogPort` that
 * loads embed.js from it; one Chromium. The returned object's `server`, `widgetServer`, `blogServer` and
 * `context` are set once `before` has run. */
export function setUp({ port, widgetPort, blogPort, blog }) {
  const env = {};
  before(async () => {
    env.server = await serve(port);
    if (blog) {
      if (widgetPort) env.widgetServer = await serve(widgetPort);
      env.blogServer = await serveBlogPost(blogPort, blog.title, `http://127.0.0.1:${widgetPort ?? port}/`, blog.body);
    }
    env.context = await launch();
  });
  after(async () => {
    await env.context?.close();
    env.server?.close();
    env.widgetServer?.close();
    env.blogServer?.close();
  });
  return env;
}

/** Runs `action` (a change a person makes) and waits for the page's next render. */
export async function waitRender(page, action, timeout = 10000) {
  const before = await page.evaluate(() => document.body.dataset.estimated);
  await action();
  await page.waitForFunction((b) => document.body.dataset.estimated !== b, before, { timeout }).catch(() => {});
  await settled(page);
}
