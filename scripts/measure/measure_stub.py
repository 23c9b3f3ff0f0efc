#!/usr/bin/env python3
"""The stub-cuda method: each reference case run as people run it, with PyTorch's real CUDA code and its real
caching allocator, on a GPU that does not exist (stub_cuda.py, stubs/). The figures are PyTorch's own counters:
torch.cuda.max_memory_allocated(), max_memory_reserved() and memory_stats(), read after each of three steps.

Usage:  measure_stub.py CASES.json OUT.json [--only NAME] [--snapshots DIR] [--redo] [--rerun]

--rerun (compiled cases; eager cases run once): each case runs twice with an Inductor cache of its own, first
cold, then again with that cache warm; the record is the second run's, with the first run's peaks kept as
`first_run` (the first run of a script autotunes kernels on copies of their arguments; see
tests/data/stub-cuda/README.md).

Each case runs in its own process on a device with the case's compute capability (its "device" entry; sm_90
otherwise), that GPU's SM count and memory (stubs/driver.c). Models, inputs and the training loop are
measure.py's (nanoGPT's train.py loop, a plain Hugging Face loop; any Hugging Face decoder from its config.json,
{"model": {"hf": {...}}}, whose records also carry the class, attention implementation and resolved config), with
no dispatch mode or tracker in the way.
What the method changes in the program, and why each change moves no byte:
  * cuDNN attention is off (cuDNN cannot be stubbed: cudnnCreate needs the driver's private export table), so
    SDPA takes PyTorch's next choice, FlashAttention-2 (or memory-efficient attention where flash does not apply).
    On sm_90 a real run would pick cuDNN first: records say which backend they assume.
  * Values read back from the device are zeros. GradScaler therefore never skips a step (finite gradients, as in
    a healthy run), and Hugging Face's packed-sequence check, which reads position_ids back, is answered as a GPU
    answers it for the plain arange positions the loop passes (not packed) instead of as all-zero positions.
    One more read is answered as a GPU answers it: the per-expert offsets of a mixture-of-experts layer (the
    record's `moe_offsets_readback`). transformers' `grouped_mm` experts pass them to
    torch.nn.functional.grouped_mm, whose CUDA kernel for any dtype but bf16 (aten's `_grouped_mm_fallback`: the
    fp32 experts under autocast) reads them to the host and runs one mm per expert with tokens, each GEMM taking
    (and returning) the cuBLAS workspace; read as zeros, every expert looked empty and no GEMM ran. Under the
    forced routing (measure.py, patch_moe_routing) the offsets are known on the host: the cumulative sum of the
    pairs per expert the patch wrote. A wrapper around torch.nn.functional.grouped_mm hands that sum to the stub
    runtime for the offsets tensor's device address (stubs/cudart.c, stub_set_readback); the device-to-host copy
    of exactly that range then returns it, in the forward and in the backward's grouped GEMMs (the same saved
    tensor). Under torch.compile the experts run through transformers' custom ops instead
    (`transformers::grouped_mm_fallback` and its backward), which read the offsets with `offs.tolist()`: each op's
    CUDA kernel is re-registered behind one that answers that read the same way. The wrappers only call through
    (no allocation of their own); the table is cleared after each step.
  * Kernels do not run; autotuning sees every candidate take the same time (its allocations still happen).
Only this script needs PyTorch; vramfit and its tests never do.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STUB_CACHE = os.path.join(ROOT, ".venv-measure", "stub-cuda")


def child(case, snapshot_path):
    import stub_cuda
    stub_cuda.preload(stub_cuda.build(STUB_CACHE))
    os.environ["VRAMFIT_REAL_CUDA"] = "1"   # measure.py: real CUDA tensors, PyTorch's counters
    os.environ["VRAMFIT_NO_TRACKER"] = "1"  # measure.py: no dispatch mode
    flash = case["train"].get("attention") == "flash_attention_2"
    if flash:  # HF's flash_attention_2: the flash-attn package, its CUDA extension replaced (fake_flash_attn.py)
        import fake_flash_attn
        flash_version = fake_flash_attn.install()
    import torch
    import measure
    if os.environ.get("VRAMFIT_INDUCTOR_GRAPHS"):  # inductor_graphs.py: the graphs Inductor's ordering weighs
        import inductor_graphs
        inductor_graphs.install(os.environ["VRAMFIT_INDUCTOR_GRAPHS"])
    torch.backends.cuda.enable_cudnn_sdp(False)
    readback = moe_offsets_readback(torch, measure)
    try:
        import transformers.masking_utils as mu
        mu.find_packed_sequence_indices = lambda *a, **k: None
    except ImportError:
        pass
    steps = []

    def after_step(step):
        steps.append({"step": step, **stub_cuda.step_stats(torch)})
        readback.clear()

    measure.STEP_HOOK[0] = after_step
    if snapshot_path:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    out = measure.run_case(case)
    if snapshot_path:
        torch.cuda.memory._dump_snapshot(snapshot_path)
        torch.cuda.memory._record_memory_history(enabled=None)
    st = torch.cuda.memory_stats()
    import transformers
    import triton
    cc = torch.cuda.get_device_capability()
    props = torch.cuda.get_device_properties(0)
    hf = out.get("hf")
    if hf:
        hf = {k: v for k, v in hf.items() if k != "transformers_version"}  # in "versions"
    return {
        "measured": {
            "peak_allocated_bytes": max(s["peak_allocated_bytes"] for s in steps),
            "peak_reserved_bytes": max(s["peak_reserved_bytes"] for s in steps),
            "peak_segments": max(s["peak_segments"] for s in steps),
            "num_alloc_retries": st.get("num_alloc_retries", 0),
            "num_ooms": st.get("num_ooms", 0),
            "num_device_alloc": st.get("num_device_alloc", 0),
            "steps": steps,
            "n_params": out["n_params"],
        },
        "method": "stub-cuda",
        "torch_version": torch.__version__,
        "versions": {"transformers": transformers.__version__, "triton": triton.__version__,
                     **({"flash_attn": flash_version} if flash else {})},
        **({"derived": fake_flash_attn.DERIVED, "flash_attn_calls": dict(fake_flash_attn.CALLS)} if flash else {}),
        "device": {"name": props.name, "compute_capability": f"{cc[0]}.{cc[1]}",
                   "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory},
        "sdpa_backends": "cuDNN attention off (not stubbable): flash, else memory-efficient, else math",
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        # Hugging Face cases ({"hf": config.json}): the class, attention implementation and resolved config.
        **({"hf": hf} if hf else {}),
        **({"moe_offsets_readback": readback.record()} if readback.calls else {}),
    }


class moe_offsets_readback:
    """Wraps torch.nn.functional.grouped_mm so that the host read of its offsets returns what a GPU holds there
    under the forced routing (see the module's docstring)."""

    def __init__(self, torch, measure):
        import ctypes
        self.lib = ctypes.CDLL("libcudart.so.13")  # the stub, already loaded under that soname
        self.lib.stub_set_readback.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.lib.stub_readbacks_answered.restype = ctypes.c_long
        self.calls, self.set, self.unknown = 0, 0, set()
        self.op_calls = 0

        def answer(rows, offs):
            """Hands the stub the offsets a GPU holds at `offs` for `rows` pairs, as `offs`'s dtype."""
            if offs is None or offs.dim() != 1 or not offs.is_contiguous():
                return
            ctype = {torch.int32: ctypes.c_int32, torch.int64: ctypes.c_int64}.get(offs.dtype)
            if ctype is None:
                return
            counts = measure.moe_counts(rows, offs.numel())
            if counts is None:  # the router's own choice (VRAMFIT_MOE_ROUTING=router): unknown on the host
                self.unknown.add((rows, offs.numel()))
                return
            ends, total = [], 0
            for c in counts:
                total += c
                ends.append(total)
            host = (ctype * len(ends))(*ends)
            if self.lib.stub_set_readback(offs.data_ptr(), ctypes.sizeof(host), host) != 0:
                raise SystemExit("stub_set_readback: offsets too long or the table full")
            self.set += 1

        grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
        if grouped_mm is not None:
            def wrapped(mat_a, mat_b, *args, offs=None, **kwargs):
                self.calls += 1
                if offs is not None and offs.dtype == torch.int32:
                    answer(mat_a.shape[0], offs)
                return grouped_mm(mat_a, mat_b, *args, offs=offs, **kwargs)

            torch.nn.functional.grouped_mm = wrapped

        # Under torch.compile transformers runs fp32 experts through its custom ops
        # `transformers::grouped_mm_fallback` and `..._backward`, opaque to Inductor: each reads the offsets with
        # `offs.tolist()` (one device-to-host copy of the whole tensor) and runs one mm per non-empty expert. The
        # wrapper above never sees them (the compiled wrapper calls the op), so each op's CUDA kernel is
        # re-registered as the same function behind one that answers that read first. Nothing is allocated here.
        try:
            from transformers.integrations import moe as hf_moe
        except ImportError:
            return
        for name, impl in (("grouped_mm_fallback", getattr(hf_moe, "_grouped_mm_fallback", None)),
                           ("grouped_mm_fallback_backward", getattr(hf_moe, "_grouped_mm_fallback_bwd", None))):
            if impl is None or not hasattr(torch.ops.transformers, name):
                continue

            def kernel(input, weight, offs, *rest, _impl=impl):
                self.calls += 1
                self.op_calls += 1
                answer(input.shape[0], offs)
                return _impl(input, weight, offs, *rest)

            torch.library.register_kernel(f"transformers::{name}", "cuda", kernel)

    def clear(self):
        self.lib.stub_clear_readbacks()

    def record(self):
        return {"what": "the host read of each grouped GEMM's per-expert offsets returns the cumulative pairs per "
                        "expert of the forced routing, as a GPU's offsets hold (measure_stub.py, stubs/cudart.c)",
                "grouped_mm_calls": self.calls, "offsets_set": self.set,
                **({"custom_op_calls": self.op_calls} if self.op_calls else {}),
                "reads_answered": self.lib.stub_readbacks_answered(),
                **({"offsets_unknown": sorted(self.unknown)} if self.unknown else {})}


def case_env(case, mem_mib=None):
    """The environment of a case's child process: the stub simulates the GPU people train on at the case's
    compute capability (SMs, memory: stubs/driver.c, dev_defaults; sm_90 unless the case names one), with the
    case's SM count and memory where it names them, or `mem_mib` MiB (measure_fit.py's probes); and the case's
    train.alloc_conf as the variable PyTorch reads."""
    dev = case.get("device", {})
    env = {k: v for k, v in os.environ.items()
           if k not in ("VRAMFIT_STUB_SMS", "VRAMFIT_STUB_MEM_MIB", "PYTORCH_CUDA_ALLOC_CONF")}
    env.update(VRAMFIT_STUB_CC="%.1f" % dev.get("compute_capability", 9.0),
               PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if mem_mib is not None:
        env["VRAMFIT_STUB_MEM_MIB"] = str(mem_mib)
    elif "memory_gib" in dev:
        env["VRAMFIT_STUB_MEM_MIB"] = str(int(dev["memory_gib"] * 1024))
    if "sms" in dev:  # the estimate's device.sms
        env["VRAMFIT_STUB_SMS"] = str(dev["sms"])
    if case["train"].get("alloc_conf"):
        env["PYTORCH_CUDA_ALLOC_CONF"] = case["train"]["alloc_conf"]
    return env


def main():
    args = sys.argv[1:]
    if args and args[0] == "--child":
        case = json.loads(args[1])
        rec = child(case, args[2] if len(args) > 2 and args[2] else None)
        print("VRAMFIT-RECORD " + json.dumps(rec), flush=True)
        return
    cases = json.load(open(args[0]))
    out_path = args[1]
    only = args[args.index("--only") + 1] if "--only" in args else None
    snaps = args[args.index("--snapshots") + 1] if "--snapshots" in args else None
    redo = "--redo" in args
    rerun = "--rerun" in args
    results = json.load(open(out_path)) if os.path.exists(out_path) else {"records": []}
    done = {r["name"] for r in results["records"]}
    if only:  # in the order given
        by_name = {c["name"]: c for c in cases}
        cases = [by_name[n] for n in only.split(",") if n in by_name]
    for case in cases:
        if not only and not redo and case["name"] in done:
            continue
        env = case_env(case)
        snap = os.path.join(os.path.abspath(snaps), case["name"] + ".pickle") if snaps else ""
        if snaps:
            os.makedirs(snaps, exist_ok=True)
        first = None
        rerun = "--rerun" in args and bool(case["train"].get("compile"))  # eager cases run once
        runs = 2 if rerun else 1
        if rerun:
            env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="vramfit-inductor-")
        for i in range(runs):
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(case),
                                snap if i == runs - 1 else ""], env=env, capture_output=True, text=True)
            lines = [l for l in p.stdout.splitlines() if l.startswith("VRAMFIT-RECORD ")]
            if p.returncode != 0 or not lines:
                break
            if i < runs - 1:
                m = json.loads(lines[-1][len("VRAMFIT-RECORD "):])["measured"]
                first = {"note": "the case's first run, Inductor's caches cold (it compiles and autotunes)",
                         "peak_allocated_bytes": m["peak_allocated_bytes"],
                         "peak_reserved_bytes": m["peak_reserved_bytes"],
                         "steps": [{k: st[k] for k in ("step", "peak_allocated_bytes", "peak_reserved_bytes")}
                                   for st in m["steps"]]}
        if rerun:
            shutil.rmtree(env["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
        if p.returncode != 0 or not lines:
            print(f"{case['name']:40s} FAILED (exit {p.returncode})\n{p.stderr[-3000:]}", flush=True)
            continue
        rec = {"name": case["name"], "setup": {"model": case["model"], "train": case["train"],
                                               **({"device": case["device"]} if "device" in case else {})},
               **json.loads(lines[-1][len("VRAMFIT-RECORD "):])}
        if first:
            rec["inductor_caches"] = "warm: a re-run, Inductor's caches holding this case's graphs from its first run"
            rec["first_run"] = first
        if snap:
            subprocess.run(["gzip", "-9f", snap], check=True)
            rec["snapshot"] = os.path.relpath(snap + ".gz", os.path.dirname(os.path.abspath(out_path)))
        results["records"] = [r for r in results["records"] if r["name"] != case["name"]] + [rec]
        m = rec["measured"]
        print(f"{case['name']:40s} allocated {m['peak_allocated_bytes'] / 2**20:10.2f} MiB  reserved "
              f"{m['peak_reserved_bytes'] / 2**20:10.2f} MiB  segments {m['peak_segments']}", flush=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
