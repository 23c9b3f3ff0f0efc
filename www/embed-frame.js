// The iframe embed: embed.html?<the main page's URL state>&plot=..&show=..&lock=..&theme=.. renders one
// <vram-fit> from the URL and tells the parent page its height (postMessage), so hosts that forbid scripts in
// posts can still embed vramfit with a plain <iframe>.
import './embed.js';

const params = new URLSearchParams(location.search);
const widget = document.createElement('vram-fit');
for (const key of ['plot', 'show', 'lock', 'theme', 'preset', 'gpu']) {
  if (params.has(key)) { widget.setAttribute(key, params.get(key)); params.delete(key); }
}
if ([...params.keys()].length > 0) widget.setAttribute('state', params.toString());
document.body.style.margin = '0';
document.body.append(widget);

// Report the content height to the parent whenever it changes: on layout changes and after every render.
let last = 0;
function report() {
  const height = Math.ceil(document.body.getBoundingClientRect().height);
  if (height > 0 && height !== last && window.parent !== window) {
    last = height;
    window.parent.postMessage({ type: 'vramfit:height', height }, '*');
  }
}
new ResizeObserver(report).observe(document.body);
widget.addEventListener('vramfit:estimate', () => requestAnimationFrame(report));
window.addEventListener('load', report);
