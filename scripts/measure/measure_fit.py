#!/usr/bin/env python3
"""The least device memory on which a case runs, found with PyTorch's own caching allocator on the stub GPU.

Usage:  measure_fit.py CASES.json OUT.json --only N1,N2,...
        (cases of measure_stub.py's files, or of measure_finetune.py's: those with "lora" run through it)

"Does it fit?" is decided where the caching allocator runs out: when cudaMalloc fails, PyTorch releases every
cached block it can and tries again (`num_alloc_retries`), and only then raises torch.OutOfMemoryError. So a run
can fit on less memory than the peak it reserves on a large device. For each case (a case of measure_stub.py's
files, found by name) this script runs measure_stub.py's child (the case's three steps, in its own process) on stub
devices of the case's compute capability and SM count whose memory is exactly what cudaMalloc may take (the stub's
`VRAMFIT_STUB_MEM_MIB`; no CUDA context is taken from it), and bisects, in whole MiB, to the least memory on which
the three steps run without an out-of-memory error: between the case's peak allocated (below which nothing runs)
and its peak reserved on an 80 GiB (or the case's) device (where it always runs). Segments are whole multiples of
2 MiB, so the bisection stops at 2 MiB. A probe that fails otherwise than with torch.OutOfMemoryError stops the
case.

Each record: the case's setup, `unlimited` (its peaks without a limit), `least_mib` (the least memory that ran)
with that run's counters (peaks, `num_alloc_retries`), `most_failing_mib` (the most that raised OutOfMemoryError),
and every probe. vramfit's tests compare them with the allocator model's own least capacity
(crate/tests/reference.rs, `least_memory_that_fits`).
Only this script needs PyTorch; vramfit and its tests never do.
"""
import json
import os
import subprocess
import sys

import measure_stub  # this folder; imports nothing heavy (torch only in its child)

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1 << 20


def probe(case, mem_mib):
    """Runs the case on a device of `mem_mib` MiB (None: the stub's default for its capability). Returns
    ("ran", record), ("oom", None) or raises on another failure."""
    env = measure_stub.case_env(case, mem_mib)
    if "lora" in case:  # a fine-tuning case (cases-finetune*.json): measure_finetune.py's child, method stub-cuda
        cmd = [os.path.join(HERE, "measure_finetune.py"), "--child", json.dumps(case), "stub-cuda", "", ""]
    else:
        cmd = [os.path.join(HERE, "measure_stub.py"), "--child", json.dumps(case), ""]
    p = subprocess.run([sys.executable] + cmd, env=env, capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("VRAMFIT-RECORD ")]
    if p.returncode == 0 and lines:
        return "ran", json.loads(lines[-1][len("VRAMFIT-RECORD "):])
    if "OutOfMemoryError" in p.stderr:
        return "oom", None
    raise SystemExit(f"{case['name']} at {mem_mib} MiB failed (exit {p.returncode}):\n{p.stderr[-3000:]}")


def counters(rec):
    m = rec["measured"]
    return {k: m[k] for k in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_segments", "num_alloc_retries",
                              "num_ooms", "num_device_alloc") if k in m}


def measure(case):
    outcome, rec = probe(case, None)
    if outcome != "ran":
        raise SystemExit(f"{case['name']}: does not run on its default device")
    unlimited = counters(rec)
    lo = unlimited["peak_allocated_bytes"] // MIB - 1                       # fails: less than it allocates
    hi = -(-unlimited["peak_reserved_bytes"] // MIB)                         # runs: all it ever reserves
    probes = [{"mib": None, "outcome": "ran"}]
    at_hi = None
    while hi - lo > 2:
        mid = (lo + hi) // 2
        outcome, rec = probe(case, mid)
        probes.append({"mib": mid, "outcome": outcome})
        print(f"  {case['name']}: {mid} MiB {outcome}", flush=True)
        if outcome == "ran":
            hi, at_hi = mid, rec
        else:
            lo = mid
    if at_hi is None:  # the bisection never ran below the unlimited peak: run there to record the counters
        outcome, at_hi = probe(case, hi)
        probes.append({"mib": hi, "outcome": outcome})
        assert outcome == "ran", case["name"]
    return {
        "name": case["name"],
        "setup": {k: case[k] for k in ("model", "train", "device", "lora", "quant") if k in case},
        "method": "stub-cuda",
        "torch_version": at_hi["torch_version"],
        "versions": at_hi.get("versions", {}),
        "device": {k: v for k, v in at_hi["device"].items() if k != "memory_bytes"},
        "unlimited": unlimited,
        "least_mib": hi,
        "most_failing_mib": lo,
        "at_least": counters(at_hi),
        "probes": probes,
        "what": "device memory in MiB that cudaMalloc may take (no CUDA context): the least on which the case's "
                "three steps run under PyTorch's caching allocator, and the most on which one raises "
                "torch.OutOfMemoryError (measure_fit.py)",
    }


def main():
    args = sys.argv[1:]
    cases = json.load(open(args[0]))
    out_path = args[1]
    only = args[args.index("--only") + 1].split(",") if "--only" in args else [c["name"] for c in cases]
    by_name = {c["name"]: c for c in cases}
    results = json.load(open(out_path)) if os.path.exists(out_path) else {"records": []}
    for name in only:
        if name not in by_name:
            continue
        case = by_name[name]
        if case["train"].get("compile"):
            raise SystemExit(f"{name}: compiled cases are not bisected (each probe would compile)")
        rec = measure(case)
        results["records"] = [r for r in results["records"] if r["name"] != name] + [rec]
        with open(out_path, "w") as f:
            f.write(json.dumps(results, indent=1) + "\n")
        u = rec["unlimited"]
        print(f"{name:40s} least {rec['least_mib']} MiB (fails at {rec['most_failing_mib']}); unlimited: "
              f"allocated {u['peak_allocated_bytes'] / MIB:.2f} reserved {u['peak_reserved_bytes'] / MIB:.2f} MiB; "
              f"retries at least {rec['at_least']['num_alloc_retries']}", flush=True)


if __name__ == "__main__":
    main()
