"""Reserved memory per CUDA stream at the peak, from the memory snapshots measure_parallel.py writes.

Usage:  stream_segments.py SNAPSHOT_DIR OUT.json

SNAPSHOT_DIR holds `<case>.pickle` files from `measure_parallel.py CASES.json OUT.json --snapshots SNAPSHOT_DIR`
(torch.cuda.memory._dump_snapshot after the run, history recorded from before the model is built). For each one,
the device trace's segment events (`segment_alloc`, `segment_free`, each with the stream it was allocated on) are
replayed; at the first moment their sum is highest (`torch.cuda.max_memory_reserved()`), the segments alive are
grouped by stream. Streams are named by the order in which they first allocate: the default stream (id 0) is
`default`; under FSDP2 the first other stream is the all-gather copy-in stream (the root's pre-forward all-gather)
and the second the reduce-scatter stream (the first post-backward); a third would be HSDP's all-reduce stream.
Only the standard library is used (pickle reads the snapshot's plain data).
"""

import json
import os
import pickle
import sys

ROLES = ["default", "all_gather_copy_in", "reduce_scatter", "all_reduce"]


def per_stream(path):
    with open(path, "rb") as f:
        snap = pickle.load(f)
    trace = snap["device_traces"][0]
    role = {0: "default"}
    alive = {}
    total = peak = 0
    at_peak = {}
    for e in trace:
        stream = e.get("stream", 0)
        if e["action"] in ("alloc", "segment_alloc") and stream not in role:
            role[stream] = ROLES[len(role)]
        if e["action"] == "segment_alloc":
            alive[e["addr"]] = (role[stream], e["size"])
            total += e["size"]
        elif e["action"] == "segment_free":
            total -= alive.pop(e["addr"])[1]
        else:
            continue
        if total > peak:
            peak, at_peak = total, dict(alive)
    streams = {}
    for name, size in at_peak.values():
        s = streams.setdefault(name, {"reserved_bytes": 0, "segments": []})
        s["reserved_bytes"] += size
        s["segments"].append(size)
    for s in streams.values():
        s["segments"].sort(reverse=True)
    return peak, streams


def main():
    snap_dir, out = sys.argv[1], sys.argv[2]
    import torch  # only for the version the snapshots were made with

    records = []
    for file in sorted(os.listdir(snap_dir)):
        if not file.endswith(".pickle") or file.endswith(".model.pickle"):
            continue
        peak, streams = per_stream(os.path.join(snap_dir, file))
        records.append({"name": file[: -len(".pickle")], "peak_reserved_bytes": peak, "streams": streams})
    doc = {
        "method": "stub-cuda",
        "source": "scripts/measure/measure_parallel.py --snapshots, read by scripts/measure/stream_segments.py",
        "torch": torch.__version__,
        "records": records,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main()
