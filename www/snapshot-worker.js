// Reads a dropped PyTorch memory snapshot off the page's thread, or writes the predicted one: loads the snapshot
// module (pkg/snapshot/, a wasm build holding only the snapshot reader and writer) on first use, reads the file in chunks with progress, and hands back what
// Rust formatted. Nothing here computes a byte; the file never leaves the browser. Every message back carries the
// request's `id`, so that the page tells a read's progress from a predicted snapshot asked for meanwhile.
import init, * as snap from './pkg/snapshot/entry.js';

let ready = null;

self.onmessage = async (ev) => {
  const { id, file, predictedAllocated, predictedReserved, predictQuery } = ev.data;
  const reply = (m, transfer = []) => self.postMessage({ id, ...m }, transfer);
  try {
    ready ||= init();
    await ready;
    if (predictQuery !== undefined) {
      const bytes = snap.predicted_snapshot(predictQuery);
      reply({ predicted: bytes }, [bytes.buffer]);
      return;
    }
    // Refused before reading: the reader's limit, in Rust's words.
    snap.check_snapshot_size(file.size);
    const parts = [];
    let loaded = 0;
    const reader = file.stream().getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      parts.push(value);
      loaded += value.length;
      reply({ progress: loaded, total: file.size });
    }
    reply({ reading: true });
    const bytes = new Uint8Array(await new Blob(parts).arrayBuffer());
    const result = snap.compare_snapshot(bytes, predictedAllocated, predictedReserved);
    reply({ result });
  } catch (err) {
    const internal = err instanceof WebAssembly.RuntimeError;
    reply({ error: internal ? `the snapshot reader hit an internal error (${err.message})` : (err.message || String(err)) });
  }
};
