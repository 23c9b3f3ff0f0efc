"""Checks that `vramfit estimate --format snapshot` writes what PyTorch's own snapshot tools read.

Usage:  check_snapshot_viz.py PREDICTED.pickle [MEASURED.pickle.gz]

Loads the file with pickle (the predicted snapshot holds plain data only) and runs torch.cuda._memory_viz's
readers on it: trace_plot and segment_plot (the HTML viewer pages), segments, memory and segsum (the
flame-graph and summary texts), and its text trace. Prints the peak it finds by replaying the trace the way the
viewer's "Active Memory Timeline" does (requested sizes) and the peak reserved, and fails on any exception.
With a measured snapshot as well, prints the same figures for it. Needs torch (the measurement venv), not CI.
"""
import sys

import torch.cuda._memory_viz as viz

from snapshot_events import load  # a snapshot, gzip'd or not (this folder is on sys.path when run as a script)


def peaks(snap):
    live = alloc = peak = reserved = peak_reserved = 0
    for e in snap["device_traces"][0]:
        a = e["action"]
        if a == "alloc":
            alloc += e["size"]
        elif a == "free_requested":
            alloc -= e["size"]
        elif a in ("segment_alloc", "segment_map"):
            reserved += e["size"]
        elif a in ("segment_free", "segment_unmap"):
            reserved -= e["size"]
        peak = max(peak, alloc)
        peak_reserved = max(peak_reserved, reserved)
    return peak, peak_reserved


def check(path):
    snap = load(path)
    html = viz.trace_plot(snap)
    assert "<html" in html.lower() or "<!doctype" in html.lower(), "trace_plot gave no page"
    seg_html = viz.segment_plot(snap)
    assert len(seg_html) > 1000
    flame = viz.segments(snap, format_flamegraph=lambda lines: lines)
    mem = viz.memory(snap, format_flamegraph=lambda lines: lines)
    summary = viz.segsum(snap)
    text = viz.trace(snap)
    assert text, "trace gave no text"
    n = len(snap["device_traces"][0])
    peak, peak_reserved = peaks(snap)
    print(f"{path}: {n} events, {len(snap['segments'])} segments; trace_plot {len(html)} B, segment_plot "
          f"{len(seg_html)} B, segments {len(flame)} B, memory {len(mem)} B, segsum {len(summary)} B, "
          f"trace {len(text)} B; peak (sizes as recorded) {peak} B, peak reserved {peak_reserved} B")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        check(p)
