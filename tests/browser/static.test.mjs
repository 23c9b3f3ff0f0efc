// The page's scripts never turn text into markup or code: no innerHTML, outerHTML, insertAdjacentHTML,
// document.write, eval or new Function anywhere in www/ (user-controlled text reaches the DOM through textContent).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from './helpers.mjs';

function scripts(dir) {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    if (statSync(p).isDirectory()) return f === 'pkg' ? [] : scripts(p);
    return /\.(m?js|html)$/.test(f) ? [p] : [];
  });
}

test('no script in www/ parses text as markup or code', () => {
  const files = scripts(join(ROOT, 'www'));
  assert.ok(files.some((f) => f.endsWith('main.js')) && files.some((f) => f.endsWith('embed.js')));
  const forbidden = /\.innerHTML\b|\.outerHTML\b|insertAdjacentHTML|document\.write|\beval\s*\(|new\s+Function\b|setAttribute\(\s*['"]on/;
  for (const f of files) {
    const text = readFileSync(f, 'utf8');
    assert.doesNotMatch(text, forbidden, f);
    if (f.endsWith('.html')) assert.doesNotMatch(text, /<script(?![^>]*\bsrc=)[^>]*>/, `${f}: inline script`);
  }
});
