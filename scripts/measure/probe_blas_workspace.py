"""Which GEMMs take which BLAS workspace from PyTorch's caching allocator, and whether it stays (method stub-cuda).

Each GEMM of the table below runs once on the stub device (stub_cuda.py: PyTorch's real CUDA code and caching
allocator) for each compute capability and dtype; the workspace is what the allocator held at the call's peak beyond
its inputs, output and what stays allocated after it. Every call's classification by measure.py's fake-cuda tracker
(`takes_cublaslt`) is checked against it. Writes tests/data/stub-cuda/blas_workspace.json.

usage: .venv-measure/bin/python scripts/measure/probe_blas_workspace.py [OUT.json]
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STUB_CACHE = os.path.join(ROOT, ".venv-measure", "stub-cuda")
CCS = ["8.0", "8.9", "9.0"]


def child():
    sys.path.insert(0, HERE)
    import stub_cuda
    stub_cuda.preload(stub_cuda.build(STUB_CACHE))
    import torch
    import measure
    dev = "cuda"
    rows = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.zeros(256, 512, device=dev, dtype=dt)
        w = torch.zeros(384, 512, device=dev, dtype=dt)
        b1 = torch.zeros(384, device=dev, dtype=dt)
        b2 = torch.zeros(256, 384, device=dev, dtype=dt)
        b2t = torch.zeros(384, 256, device=dev, dtype=dt).t()
        o = torch.empty(256, 384, device=dev, dtype=dt)
        g = torch.zeros(256, 384, device=dev, dtype=dt)
        wt = torch.zeros(512, 384, device=dev, dtype=dt)
        # (name, aten op name, args, kwargs): args as the tracker sees them.
        calls = [
            ("mm", "mm", (a, w.t()), {}),
            ("addmm, 1-D bias", "addmm", (b1, a, w.t()), {}),
            ("addmm, 1-D bias, beta 0.5", "addmm", (b1, a, w.t()), {"beta": 0.5}),
            ("addmm, 1 x N bias", "addmm", (b1.view(1, -1), a, w.t()), {}),
            ("addmm, 2-D self", "addmm", (b2, a, w.t()), {}),
            ("addmm, 2-D self, beta 0.5", "addmm", (b2, a, w.t()), {"beta": 0.5}),
            ("addmm, 2-D self, out= another buffer", "addmm", (b2, a, w.t()), {"out": o}),
            ("addmm, 2-D self, weight-gradient shape (a^T g + self)", "addmm", (wt, a.t(), g), {}),
            ("addmm, 2-D self not contiguous", "addmm", (b2t, a, w.t()), {}),
            ("addmm_ (in place)", "addmm_", (b2, a, w.t()), {}),
            ("bmm", "bmm", (a.view(2, 128, 512), w.t().expand(2, 512, 384)), {}),
            ("baddbmm", "baddbmm", (b2.view(2, 128, 384), a.view(2, 128, 512), w.t().expand(2, 512, 384)), {}),
            ("mv", "mv", (w, a[0]), {}),
            ("addmv", "addmv", (b1, w, a[0]), {}),
        ]
        for name, op, args, kwargs in calls:
            fn = getattr(torch.ops.aten, op)
            fn = fn.out if "out" in kwargs else fn.default
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn(*args, **kwargs)
            peak = torch.cuda.max_memory_allocated()
            after = torch.cuda.memory_allocated()
            del out
            kept = after - before if "out" not in kwargs and op != "addmm_" else 0
            workspace = peak - after
            lt = op == "addmm" and measure.takes_cublaslt(args, kwargs)
            expected = measure.CUBLASLT_WORKSPACE_BYTES if lt else measure.cublas_workspace_bytes()
            rows.append({"dtype": str(dt).removeprefix("torch."), "call": name, "op": op,
                         "workspace_bytes": workspace, "workspace_kept_bytes": after - before - kept,
                         "tracker_says": "cublaslt" if lt else "cublas", "tracker_bytes": expected})
    print(json.dumps({"compute_capability": "%d.%d" % torch.cuda.get_device_capability(), "rows": rows}))


def main():
    if os.environ.get("VRAMFIT_PROBE_CHILD"):
        return child()
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "tests/data/stub-cuda/blas_workspace.json")
    import torch
    devices = []
    for cc in CCS:
        env = dict(os.environ, VRAMFIT_PROBE_CHILD="1", VRAMFIT_STUB_CC=cc)
        res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, check=True)
        devices.append(json.loads(res.stdout.strip().splitlines()[-1]))
    bad = [(d["compute_capability"], r) for d in devices for r in d["rows"]
           if r["workspace_bytes"] != r["tracker_bytes"] or r["workspace_kept_bytes"] != 0]
    with open(out_path, "w") as f:
        json.dump({"method": "stub-cuda", "torch_version": torch.__version__,
                   "what": "the transient workspace each GEMM takes from PyTorch's caching allocator (peak of the "
                           "call less what stays allocated after it), beside what measure.py's fake-cuda tracker "
                           "charges for it; workspace_kept_bytes: workspace still allocated after the call",
                   "devices": devices}, f, indent=1)
    for cc, r in bad:
        print(f"sm {cc} {r['dtype']:9s} {r['call']:50s} measured {r['workspace_bytes']} tracker {r['tracker_bytes']}")
    print(f"wrote {out_path}: {sum(len(d['rows']) for d in devices)} calls, {len(bad)} the tracker gets wrong")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
