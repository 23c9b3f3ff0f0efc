#!/usr/bin/env python3
"""Writes the allocation sequence of a memory snapshot as plain lines, for `cargo run --release --example replay`,
which replays it through vramfit's caching allocator model.

Usage:  snapshot_events.py SNAPSHOT [SNAPSHOT.events]

SNAPSHOT: `torch.cuda.memory._dump_snapshot()` output (`measure_stub.py --snapshots`, gzip'd or not) or the
model's own (`vramfit estimate --format snapshot`). One line per event of the device trace with the most events:
`a ID BYTES WHERE` at an `alloc` (BYTES as requested; the replay rounds as the allocator does), `f ID WHERE` at
its `free_completed`. IDs number the allocations from 1. WHERE says who asked: the innermost Python frame
(`FILE.py:LINE`: in a compiled step, the line of Inductor's generated wrapper), else vramfit's op (a model
snapshot), else `-`. Segment events are left out (the replay makes its own). Plain pickle: the snapshot holds
plain data.

With the events in a file, a hypothesis about the order can be tried by editing it (moving a wrapper line's
allocation, dropping a buffer) and replaying again: tests/data/stub-cuda/README.md, `tiny-vocab-grads-amp-compiled`.
"""
import gzip
import os
import pickle
import sys


def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return pickle.loads(raw)


def where(event):
    frames = event.get("frames") or []
    for f in frames:
        name = f.get("filename", "")
        if name.endswith(".py"):
            return f"{os.path.basename(name)}:{f.get('line')}"
    for f in frames:
        if f.get("filename", "").startswith("vramfit"):
            return (f.get("name") or "-").replace(" ", "_")
    return "-"


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    snap = load(sys.argv[1])
    trace = max(snap["device_traces"], key=len)
    out = open(sys.argv[2], "w") if len(sys.argv) == 3 else sys.stdout
    ids = {}
    n = 0
    for e in trace:
        if e["action"] == "alloc":
            n += 1
            ids[e["addr"]] = n
            print("a", n, e["size"], where(e), file=out)
        elif e["action"] == "free_completed" and e["addr"] in ids:
            print("f", ids.pop(e["addr"]), where(e), file=out)


if __name__ == "__main__":
    main()
