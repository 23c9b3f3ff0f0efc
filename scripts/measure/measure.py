#!/usr/bin/env python3
"""Measure the peak GPU memory of real PyTorch training steps, for vramfit's reference data.

Two methods, written into every record:
  * "cuda":      a real GPU: torch.cuda.max_memory_allocated / max_memory_reserved and NVML after three steps.
  * "fake-cuda": no GPU: the whole run (model build, three training steps) happens on FakeTensorMode tensors on
                 device "cuda", so every op takes its CUDA code path (autocast lists, fused dropout, SDPA backend,
                 foreach/fused optimizers) while no memory is touched. A TorchDispatchMode sees every new storage
                 (rounded up to 512 B as the CUDA caching allocator does) and a weakref finalizer sees it freed.
                 Allocations that CUDA kernels make internally (which fake kernels never make) are added as
                 explicit "hidden" allocations, each named below with its source.

Usage:  measure.py CASES.json OUT.json [--only NAME] [--eager-only]     (see scripts/measure/cases.py for the case list)

A case's model is nanoGPT's GPT ({"family": "gpt2", ...}), HF Llama from vramfit's own keys ({"family": "llama",
...}), or any decoder Hugging Face builds from its config.json ({"hf": {"model_type": ..., ...}}: build_hf,
cases-hf.json). VRAMFIT_TRACE=FILE writes every allocation and free of the run (phase, op, bytes, live bytes).

Only this script needs PyTorch; vramfit and its tests never do.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import weakref

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------------------------------------------
# Without a GPU: preload a stub for the CUDA runtime queries made by the autograd engine (see cuda_stub.c).
def ensure_stub():
    if os.environ.get("VRAMFIT_STUB_LOADED") or os.environ.get("VRAMFIT_REAL_CUDA"):
        return
    import importlib.util
    site = os.path.dirname(os.path.dirname(importlib.util.find_spec("torch").origin))
    includes = [os.path.join(site, "nvidia", "cu13", "include"),
                os.path.join(site, "triton", "backends", "nvidia", "include")]
    out_dir = tempfile.mkdtemp(prefix="vramfit-stub-")
    lib = os.path.join(out_dir, "libcuda.so.1")
    cmd = ["gcc", "-shared", "-fPIC", "-O1", *[f"-I{i}" for i in includes], "-Wl,-soname,libcuda.so.1",
           "-o", lib, os.path.join(HERE, "cuda_stub.c")]
    subprocess.run(cmd, check=True)
    # Triton (torch.compile) links its launcher utilities against libcuda.so found through this variable.
    os.symlink(lib, os.path.join(out_dir, "libcuda.so"))
    env = dict(os.environ, LD_PRELOAD=lib, LD_LIBRARY_PATH=out_dir + ":" + os.environ.get("LD_LIBRARY_PATH", ""),
               VRAMFIT_STUB_LOADED="1", TRITON_LIBCUDA_PATH=out_dir)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    ensure_stub()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

FAKE = not os.environ.get("VRAMFIT_REAL_CUDA")
# The stub-cuda method (stub_cuda.py, measure_stub.py) runs the program as people run it: no dispatch mode.
TRACK = FAKE or not os.environ.get("VRAMFIT_NO_TRACKER")
# Called with the step number after each optimizer step's zero_grad (measure_stub.py reads PyTorch's counters).
STEP_HOOK = [None]
ROUND = 512  # CUDA caching allocator: every block is a multiple of 512 B (kMinBlockSize)

# cuBLAS workspace: PyTorch 2.15 takes it from the caching allocator inside each GEMM, after the GEMM's output
# exists, and returns it when the GEMM is done (it persists only with TORCH_CUBLAS_WORKSPACE_CACHE=1). Sizes from
# the stub-cuda method's memory snapshots (as crate/src/run/tensors.rs, cublas_workspace_bytes): 32 MiB on sm_90,
# 8 MiB + 128 KiB on sm_89.
def cublas_workspace_bytes():
    return 32 << 20 if torch.cuda.get_device_capability()[0] >= 9 else (8 << 20) + (128 << 10)


# cuBLASLt workspace: an `addmm` that ATen sends through cuBLASLt (addmm_out_cuda_impl's Lt path) takes
# CUBLASLT_WORKSPACE_SIZE, 1024 KiB by default on every architecture, from the caching allocator instead of the cuBLAS
# workspace, and returns it when the GEMM is done, as the cuBLAS one. Which addmm takes it, found with the stub-cuda
# method (PyTorch's own allocator, torch 2.15, sm_80, sm_89 and sm_90 alike; scripts/measure/probe_blas_workspace.py,
# tests/data/stub-cuda/blas_workspace.json): a bias (1-D, or 2-D with one row) with beta 1, in fp32, fp16 or bf16;
# a 2-D matrix in fp16 or bf16, whatever beta; never in place (`addmm_`, `out=self`), never with a non-contiguous
# self, never a 2-D matrix in fp32. Every other GEMM takes the cuBLAS workspace.
CUBLASLT_WORKSPACE_BYTES = 1 << 20


def takes_cublaslt(args, kwargs):
    """Whether an aten.addmm call runs through cuBLASLt (see CUBLASLT_WORKSPACE_BYTES)."""
    self_, mat1, mat2 = args[:3]
    beta = kwargs.get("beta", args[3] if len(args) > 3 else 1)
    out = kwargs.get("out")
    if out is not None and out.untyped_storage()._cdata == self_.untyped_storage()._cdata:
        return False  # result is self: in place (addmm_ is its own op, `addmm_`, and takes cuBLAS's)
    if min(*mat1.shape, *mat2.shape) <= 1 or not self_.is_contiguous():
        return False
    dtype = mat1.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    bias = self_.dim() == 1 or (self_.dim() == 2 and self_.shape[0] == 1)
    if bias:
        return beta == 1 and self_.shape[-1] == mat2.shape[1]
    return self_.dim() == 2 and dtype in (torch.float16, torch.bfloat16)


TRACE = [] if os.environ.get("VRAMFIT_TRACE") else None
_labels = {}


def id_label(key):
    return _labels.setdefault(key, len(_labels))


def rup(n, m=ROUND):
    return 0 if n == 0 else (n + m - 1) // m * m


# --------------------------------------------------------------------------------------------------------------
# The self-check: a hook on FakeTensor's constructor sees every CUDA storage the program's FakeTensorMode creates,
# independently of the tracker (whose view is the dispatch of ops while it is an active mode). A storage that dies,
# or is still alive at the end, without the tracker having seen it is memory the figures would miss: the run fails.
CREATED = {}  # id(storage) -> [where it was created, seen by the tracker]
IN_OP = threading.local()  # depth of ops the tracker is running, per thread (the autograd engine has its own)
WATCH = {"mode": None, "created": 0, "unseen": []}


def watch_storages(mode, tracker):
    from torch._subclasses.fake_tensor import FakeTensor
    WATCH.update(mode=mode, tracker=tracker, created=0, inside_ops={}, unseen=[])
    CREATED.clear()
    if "new" in WATCH:
        return
    WATCH["new"] = orig = FakeTensor.__new__

    def gone(key):
        rec = CREATED.pop(key, None)
        if rec is not None and not rec[1]:
            if rec[2]:
                WATCH["inside_ops"][rec[2]] = WATCH["inside_ops"].get(rec[2], 0) + 1
            else:
                WATCH["unseen"].append(rec[0])

    def new(cls, fake_mode, elem, device, *args, **kwargs):
        t = orig(cls, fake_mode, elem, device, *args, **kwargs)
        if fake_mode is WATCH["mode"] and not WATCH.get("synth") and t.device.type == "cuda":
            st = t.untyped_storage()
            key = id(st)
            if st.nbytes() and key not in CREATED:
                # Made while an op the tracker dispatched runs (`inside`): its output, tracked when the op returns,
                # or a temporary of the op's fake implementation (e.g. the meta tensor of uniform_'s
                # decomposition), which a CUDA kernel never allocates. Made anywhere else: out of the tracker's view.
                inside = getattr(IN_OP, "name", None) if getattr(IN_OP, "depth", 0) else None
                WATCH["created"] += 1
                where = f"{WATCH['tracker'].phase}: {st.nbytes()} B, shape {tuple(t.shape)} {t.dtype}"
                if os.environ.get("VRAMFIT_SELF_CHECK_STACKS"):
                    import traceback
                    where += "\n" + "".join(traceback.format_stack(limit=12))
                CREATED[key] = [where, False, inside]
                weakref.finalize(st, gone, key)
        return t

    FakeTensor.__new__ = new
    # FakeTensorMode's dispatch cache builds a throwaway output to validate a new cache entry: not the program's.
    from torch._subclasses.fake_tensor import FakeTensorMode
    info = FakeTensorMode._get_output_info_for_cache_entry

    def output_info(self, *args, **kwargs):
        WATCH["synth"] = True
        try:
            return info(self, *args, **kwargs)
        finally:
            WATCH["synth"] = False

    FakeTensorMode._get_output_info_for_cache_entry = output_info


def self_check():
    """The storages created outside the tracker's view (none, or the run fails), and how many were created."""
    unseen = WATCH["unseen"] + [rec[0] for rec in CREATED.values() if not rec[1] and not rec[2]]
    if unseen:
        raise SystemExit(f"self-check failed: {len(unseen)} of {WATCH['created']} CUDA storages were created "
                         "outside the tracker's view:\n  " + "\n  ".join(unseen[:20]))
    internal = dict(WATCH["inside_ops"])
    for rec in CREATED.values():
        if not rec[1] and rec[2]:
            internal[rec[2]] = internal.get(rec[2], 0) + 1
    return {"cuda_storages": WATCH["created"], "tracked": WATCH["created"] - sum(internal.values()),
            "outside_the_tracker": 0, "fake_implementation_temporaries_by_op": dict(sorted(internal.items()))}


# --------------------------------------------------------------------------------------------------------------
# The memory tracker.
class Tracker(TorchDispatchMode):
    MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "addmv", "mv"}

    @classmethod
    def ignore_compile_internals(cls):
        # torch.compile: Dynamo, AOTAutograd and Inductor run with this mode off (their fake tensors are not the
        # program's memory) and the compiled artifacts run with it on; everything else of the step (eager ops,
        # the autograd engine between graphs, the optimizer) is seen as it happens.
        return True

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.phase = "init"
        self.peak_phase = "init"
        self.peak_op = ""
        self.records = {}  # id(storage) -> [bytes, phase, op]
        self.peak_snapshot = {}
        self.step_peaks = {}
        self.hidden = []
        self.enabled = True

    def _alloc(self, key, nbytes, op):
        self.records[key] = [nbytes, self.phase, op]
        self.live += nbytes
        if TRACE is not None:
            TRACE.append((self.phase, op, nbytes, self.live, id_label(key)))
        step = self.phase.split(":")[0]
        self.step_peaks[step] = max(self.step_peaks.get(step, 0), self.live)
        if self.live > self.peak:
            self.peak = self.live
            self.peak_phase = self.phase
            self.peak_op = op
            self.peak_snapshot = {k: list(v) for k, v in self.records.items()}

    def _free(self, key):
        rec = self.records.pop(key, None)
        if rec is not None:
            self.live -= rec[0]
            if TRACE is not None:
                TRACE.append((self.phase, "free " + rec[2] + " from " + rec[1], -rec[0], self.live, id_label(key)))

    def hidden_alloc(self, name, nbytes, transient):
        """An allocation a CUDA kernel makes internally; fake kernels never make it."""
        key = ("hidden", len(self.hidden))
        self.hidden.append({"name": name, "bytes": rup(nbytes), "transient": transient, "phase": self.phase})
        self._alloc(key, rup(nbytes), name)
        if transient:
            self._free(key)

    def track(self, t, op):
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            return
        st = t.untyped_storage()
        key = id(st)
        seen = CREATED.get(key)
        if seen is not None:
            seen[1] = True
        if key in self.records:
            return
        nbytes = rup(st.nbytes())
        if nbytes == 0:
            return
        self._alloc(key, nbytes, op)
        weakref.finalize(st, self._free, key)

    # torch.compile with checkpointing and dropout: the compiled graphs run SDPA's random kernel under a saved
    # generator state, so that the backward's recompute draws the forward's numbers
    # (`graphsafe_run_with_rng_state(op, *args, rng_state=...)`, a higher-order operator). It allocates nothing
    # itself; its outputs are the op's. The op goes through the tracker like any other; the generator state is
    # set around it as PyTorch's CUDA implementation does, and skipped on fake tensors as PyTorch's own fake
    # implementation does (torch/_prims/rng_prims.py), which changes no allocation.
    supports_higher_order_operators = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            if func.name() != "graphsafe_run_with_rng_state":
                return NotImplemented
            op, *rest = args
            kwargs = dict(kwargs)
            rng_state = kwargs.pop("rng_state", None)
            if FAKE or rng_state is None:
                return self.__torch_dispatch__(op, types, tuple(rest), kwargs)
            gen = torch.cuda.default_generators[rng_state.device.index]
            saved = gen.graphsafe_get_state()
            gen.graphsafe_set_state(rng_state)
            try:
                return self.__torch_dispatch__(op, types, tuple(rest), kwargs)
            finally:
                gen.graphsafe_set_state(saved)
        name = func.overloadpacket.__name__
        if self.enabled:
            self.before_kernel(name, args)
        IN_OP.depth, outer = getattr(IN_OP, "depth", 0) + 1, getattr(IN_OP, "name", None)
        IN_OP.name = name
        try:
            out = func(*args, **kwargs)
        finally:
            IN_OP.depth, IN_OP.name = IN_OP.depth - 1, outer
        if self.enabled:
            for t in tree_flatten(out)[0]:
                self.track(t, name)
            if name == "addmm" and takes_cublaslt(args, kwargs):
                self.hidden_alloc("cublaslt_workspace", CUBLASLT_WORKSPACE_BYTES, transient=True)
            elif name in self.MATMULS:
                self.hidden_alloc("cublas_workspace", cublas_workspace_bytes(), transient=True)
        return out

    def before_kernel(self, name, args):
        # Scratch that CUDA kernels allocate inside their own implementation (at::empty in C++), alive only for
        # the kernel's duration.
        if name == "_scaled_dot_product_flash_attention_backward":
            # FlashAttention-2 mha_bwd: dq_accum fp32 [B, round128(T), H, round32(hs)] and softmax_d fp32
            # [B, H, round128(T)] (aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp).
            q = args[1]
            b, h, t, d = q.shape
            t128 = (t + 127) // 128 * 128
            d32 = (d + 31) // 32 * 32
            self.hidden_alloc("flash_bwd_dq_accum", b * t128 * h * d32 * 4 + b * h * t128 * 4, transient=True)
        elif name == "_efficient_attention_backward":
            # mem-efficient attention backward: delta fp32 [B, H, T] (attention_backward.cu); grad_q accumulates
            # in fp32 scratch [B, T, H, hs] when the inputs are not fp32.
            q = args[1]
            b, t, h, d = q.shape
            extra = 0 if q.dtype == torch.float32 else b * t * h * d * 4
            self.hidden_alloc("efficient_bwd_delta", b * h * t * 4 + extra, transient=True)
            k, v = args[2], args[3]
            if k.shape[2] != h:
                # Grouped-query K/V: the gradients of K and V are computed for every query head into scratch
                # [B, T, H, hs] each, then summed over each group into the K/V-sized gradients (stub-cuda memory
                # snapshot of qwen3-256-hd64-untied-fp32-sgd: two full-head buffers beside the outputs).
                self.hidden_alloc("efficient_bwd_gqa_dkv", b * t * h * (k.shape[3] + v.shape[3]) * k.element_size(),
                                  transient=True)
        elif name == "embedding_dense_backward":
            # embedding_dense_backward_cuda sorts the indices: sorted_indices and orig_indices (int64 each).
            idx = args[1]
            self.hidden_alloc("embedding_bwd_sort", 2 * idx.numel() * 8, transient=True)


# --------------------------------------------------------------------------------------------------------------
# SDPA: on fake tensors F.scaled_dot_product_attention always takes the math path. Choose the backend as CUDA
# would: PyTorch's own priority order and its can_use_* checks, then call that backend's aten op.
_orig_sdpa = F.scaled_dot_product_attention


def sdpa_as_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    from torch.backends.cuda import SDPAParams, can_use_flash_attention, can_use_efficient_attention
    if torch.is_autocast_enabled("cuda"):
        # scaled_dot_product_attention is on autocast's lower-precision list: its floating inputs are cast first
        # (a real copy for each fp32 input, e.g. HF Llama's rotated q and k, which the fp32 cos/sin promote).
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = (x.to(dt) if x.is_floating_point() else x for x in (q, k, v))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dt)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        # at::scaled_dot_product_attention (attention.cpp, convert_boolean_attn_mask) turns a boolean mask into an
        # additive one in the query's dtype before any backend runs. What it allocates (stub-cuda memory snapshot,
        # torch 2.15): a 0-dim 0.0 and a 0-dim -inf in that dtype (where's scalar operand, made on the device),
        # then the additive mask at the mask's full broadcast shape (a batch-expanded 1 x 1 x T x S mask becomes
        # B x 1 x T x S); the two scalars are freed when it is made. Hugging Face passes a boolean mask when it
        # cannot use is_causal (a sliding window no longer than the sequence).
        zero = torch.scalar_tensor(0.0, dtype=q.dtype, device=attn_mask.device)
        neg_inf = torch.scalar_tensor(-math.inf, dtype=q.dtype, device=attn_mask.device)
        attn_mask = torch.where(attn_mask, zero, neg_inf)
        del zero, neg_inf
    params = SDPAParams(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa)
    order = [torch._C._SDPBackend(b) for b in torch._C._get_sdp_priority_order()]
    for backend in order:
        if backend == torch._C._SDPBackend.FLASH_ATTENTION and can_use_flash_attention(params):
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                     scale=scale)
            return out[0]
        if backend == torch._C._SDPBackend.EFFICIENT_ATTENTION and can_use_efficient_attention(params):
            # Grouped-query K/V go in as they are: torch 2.15's memory-efficient kernel takes fewer K/V heads
            # (stub-cuda memory snapshot of qwen3-256-hd64-untied-fp32-sgd: the call allocates its output,
            # logsumexp and the two philox scalars only, no repeat of K or V; its backward, below).
            if attn_mask is not None:
                # attention.cpp, preprocess_mask: the kernel needs every stride but the last a multiple of 8
                # elements and a dense last dim; otherwise pad_bias copies the mask with its last dim padded to a
                # multiple of 8 (and slices the view back). Then it is expanded to B x H x T x S (a view).
                if attn_mask.stride(-1) != 1 or any(st % 8 for st in attn_mask.stride()[:-1]):
                    n = attn_mask.shape[-1]
                    attn_mask = F.pad(attn_mask, (0, 8 - n % 8))[..., :n]
                attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, True, dropout_p,
                                                                         is_causal, scale=scale)
            return out[0]
        if backend == torch._C._SDPBackend.MATH:
            break
    return _orig_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa)


# --------------------------------------------------------------------------------------------------------------
# torch.compile without a GPU: Inductor compiles for the stub's compute capability and its generated wrapper runs on
# fake CUDA tensors. Inductor's settings are its defaults (pattern passes, joint-graph constant folding, pad_mm
# included), except what cannot run without a GPU, each a no-op for memory:
#   * Triton kernels compile (ptxas needs no GPU) but never run: the autotuner's run/precompile do nothing.
#   * The wrapper's helpers that touch raw memory (empty_strided_cuda, reinterpret_tensor, alignment and
#     stride asserts) become their fake-tensor equivalents, so every buffer the wrapper allocates is a fake
#     storage the tracker sees, and every `del bufN` / `bufM = bufN  # reuse` is replayed as written.
#   * The backward graph is compiled with the forward (AOTAutograd's force_non_lazy_backward_lowering), while
#     Dynamo has every mode off: the same graph, compiled earlier.
#   * The tracker says `ignore_compile_internals`: Dynamo, AOTAutograd and Inductor trace with it off and the
#     compiled graphs run with it on, as does everything between them (the autograd engine included).
#   * cuDNN attention is disabled so that the fake backend chooser follows CUDA's priority (flash first).
def prepare_fake_inductor(tracker):
    import torch._inductor.config as ic
    import torch._functorch.config as fc
    import torch._C._dynamo.guards as guards
    from torch._inductor.runtime import triton_heuristics as th
    ic.compile_threads = 1
    ic.force_disable_caches = True  # every run compiles under the settings above, never from an earlier cache
    fc.force_non_lazy_backward_lowering = True
    th.CachingAutotuner.run = lambda self, *a, **k: None
    th.CachingAutotuner.precompile = lambda self, *a, **k: None
    guards._empty_strided_cuda = lambda size, stride, dtype: torch.empty_strided(size, stride, dtype=dtype,
                                                                                  device="cuda")
    guards._reinterpret_tensor = lambda t, size, stride, offset=0: torch.as_strided(t, size, stride,
                                                                                    t.storage_offset() + offset)
    guards.copy_if_misaligned = lambda t: t
    guards.assert_size_stride = lambda *a, **k: None
    guards.assert_alignment = lambda *a, **k: None
    torch.backends.cuda.enable_cudnn_sdp(False)
    # pad_mm pads a matmul whose sizes are not multiples of 8 (2-byte) or 4 (fp32) elements only when it is
    # compute-bound and a benchmark on the GPU (on random tensors it makes real) finds the padded one more than
    # 10% faster. Without a GPU that decision (pad_mm._should_pad, whose only other answers are "no") answers
    # "not padded", as a benchmark with equal times would. Each record counts the matmuls decided this way
    # ("pad_mm_decisions"); only vocabulary or widths off those multiples can have any.
    import torch._inductor.fx_passes.pad_mm as pm
    PAD_MM["decisions"] = 0

    def should_pad(*args, **kwargs):
        PAD_MM["decisions"] += 1
        return False

    pm._should_pad = should_pad
    # The pattern passes' initialisation traces its patterns under a FakeTensorMode of its own, but one example
    # input is `torch.tensor(2.0, device="cuda")` (fuse_attention.py), which copies a real host scalar to the
    # device below every mode (and a constant-valued fake would be moved by a real copy too). Under a
    # FakeTensorMode, make a fake CUDA tensor of the same shape and dtype; no value is read from it.
    if "tensor" not in _ORIG:
        _ORIG["tensor"] = torch.tensor

        def tensor(data, *args, device=None, requires_grad=False, **kwargs):
            fake_mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
            if fake_mode is None or device is None or torch.device(device).type != "cuda":
                return _ORIG["tensor"](data, *args, device=device, requires_grad=requires_grad, **kwargs)
            host = _ORIG["tensor"](data, *args, **kwargs)
            return torch.empty(host.shape, dtype=host.dtype, device=device, requires_grad=requires_grad)

        torch.tensor = tensor
    # Joint-graph constant folding finds tensors of one uniform value by running the ops of constant subgraphs
    # on real one-element tensors (UniformValueConstantFolder._deduce_value). It reads only their values, and
    # the `full` it puts in their place takes its device from the graph: run those one-element ops on the host.
    if "deduce" not in _ORIG:
        import torch._inductor.fx_passes.joint_graph as jg
        _ORIG["deduce"] = jg.UniformValueConstantFolder._deduce_value

        def deduce(self, node):
            with OnHost():
                return _ORIG["deduce"](self, node)

        jg.UniformValueConstantFolder._deduce_value = deduce


_ORIG = {}
PAD_MM = {"decisions": 0}


class OnHost(TorchDispatchMode):
    """Runs ops asked for on CUDA on the host instead (compile-time constants only; see prepare_fake_inductor)."""

    @staticmethod
    def host(x):
        if isinstance(x, torch.device) and x.type == "cuda":
            return torch.device("cpu")
        if isinstance(x, str) and x.startswith("cuda"):
            return "cpu"
        return x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        args = [self.host(a) for a in args]
        kwargs = {k: self.host(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# nanoGPT's GPT, re-implemented from its published architecture (learned positions, tied LM head, pre-LN,
# fused QKV, GELU MLP 4x, dropout at embeddings / attention / residuals).
class LayerNormB(nn.Module):
    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Attention(nn.Module):
    def __init__(self, m, attention):
        super().__init__()
        c = m["n_embd"]
        self.n_head = m["n_head"]
        self.c_attn = nn.Linear(c, 3 * c, bias=m["bias"])
        self.c_proj = nn.Linear(c, c, bias=m["bias"])
        self.attn_dropout = nn.Dropout(m["dropout"])
        self.resid_dropout = nn.Dropout(m["dropout"])
        self.p = m["dropout"]
        self.manual = attention == "manual"
        if self.manual:
            bs = m["block_size"]
            self.register_buffer("bias", torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        hs = c // self.n_head
        q = q.view(b, t, self.n_head, hs).transpose(1, 2)
        k = k.view(b, t, self.n_head, hs).transpose(1, 2)
        v = v.view(b, t, self.n_head, hs).transpose(1, 2)
        if self.manual:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.p if self.training else 0,
                                               is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, m):
        super().__init__()
        c = m["n_embd"]
        self.c_fc = nn.Linear(c, 4 * c, bias=m["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c, c, bias=m["bias"])
        self.dropout = nn.Dropout(m["dropout"])

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, m, attention):
        super().__init__()
        self.ln_1 = LayerNormB(m["n_embd"], m["bias"])
        self.attn = Attention(m, attention)
        self.ln_2 = LayerNormB(m["n_embd"], m["bias"])
        self.mlp = MLP(m)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, m, attention, checkpointing, tracker):
        super().__init__()
        self.tracker = tracker
        self.checkpointing = checkpointing
        self.wte = nn.Embedding(m["vocab_size"], m["n_embd"])
        self.wpe = nn.Embedding(m["block_size"], m["n_embd"])
        self.drop = nn.Dropout(m["dropout"])
        self.h = nn.ModuleList([Block(m, attention) for _ in range(m["n_layer"])])
        self.ln_f = LayerNormB(m["n_embd"], m["bias"])
        self.lm_head = nn.Linear(m["n_embd"], m["vocab_size"], bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            if self.checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.ln_f(x)
        self.tracker.set_sub("loss")
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def build_llama(m, checkpointing, tracker):
    from transformers import LlamaConfig, LlamaForCausalLM
    if FAKE:
        # transformers treats a FakeTensor as "tracing" and then builds an explicit B x 1 x T x T mask and repeats
        # K/V for GQA, where a real CUDA run (no padding, one sequence per row) passes is_causal=True to SDPA.
        # Tell it the truth about our inputs: not tracing, not packed.
        import transformers.masking_utils as mu
        mu.is_tracing = lambda *a, **k: False
        mu.find_packed_sequence_indices = lambda *a, **k: None
    cfg = LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["n_embd"], intermediate_size=m["intermediate_size"],
                      num_hidden_layers=m["n_layer"], num_attention_heads=m["n_head"],
                      num_key_value_heads=m["n_kv_head"], max_position_embeddings=m["block_size"],
                      tie_word_embeddings=m["tie_embeddings"], attention_dropout=m.get("dropout", 0.0),
                      use_cache=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not getattr(tracker, "compiled", False):
        # A Python hook inside a compiled model would break its graph: compiled runs go without the marker.
        model.lm_head.register_forward_pre_hook(lambda *a: tracker.set_sub("loss"))
    return model


# Any decoder Hugging Face builds from its config.json: a case's model is {"hf": {...config.json fields, with
# "model_type"...}}. The config is AutoConfig.for_model(model_type, **fields) with use_cache off; the model is
# AutoModelForCausalLM.from_config(cfg, attn_implementation=...), built directly on the device in the training
# dtype exactly as build_llama builds Llama (the dtype is passed to from_config, so a config.json's own
# "torch_dtype"/"dtype" does not decide it: the training precision does), with the same fake-tensor patches of
# masking_utils, gradient checkpointing the same way and the same loss-phase marker (on the output embedding,
# which gpt_neox calls embed_out). train.attention "sdpa" (default) is HF's sdpa attention; "manual" or "eager"
# is HF's eager attention (matmul, softmax in fp32, matmul); "flash_attention_2" is HF's flash_attention_2, the
# flash-attn package (stub-cuda method only: fake_flash_attn.py stands in for its CUDA extension).
# Config fields that say nothing about the model (PretrainedConfig's generic ones), left out of the record.
HF_CONFIG_NOISE = {"_name_or_path", "architectures", "chunk_size_feed_forward", "id2label", "label2id",
                   "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type", "return_dict",
                   "transformers_version"}


def hf_attn_implementation(attention):
    if attention == "flash_attention_2":
        return "flash_attention_2"
    return "eager" if attention in ("manual", "eager") else "sdpa"


def build_hf(fields, attention, checkpointing, tracker, moe_routing=None):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    if FAKE:
        # As build_llama: not tracing, not packed (see there).
        import transformers.masking_utils as mu
        mu.is_tracing = lambda *a, **k: False
        mu.find_packed_sequence_indices = lambda *a, **k: None
    fields = dict(fields)
    model_type = fields.pop("model_type")
    fields["use_cache"] = False
    cfg = AutoConfig.for_model(model_type, **fields)
    build_tensor = torch.tensor
    if FAKE:
        # Some models make a buffer from a host value: Gemma's embedding scale is
        # `nn.Buffer(torch.tensor(sqrt(hidden_size)))` under the device context, a real host-to-device copy below
        # every mode, which the no-GPU stub cannot do. Under FakeTensorMode such a tensor becomes a fake CUDA
        # tensor of the same shape and dtype (one 512 B block, as the real copy's); no value is read from it.
        def build_tensor(data, *args, device=None, requires_grad=False, **kwargs):
            import torch.utils._device as device_ctx  # the `with torch.device(...)` the model is built under
            dev = torch.device(device if device is not None else device_ctx.CURRENT_DEVICE or "cpu")
            if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None or dev.type != "cuda":
                return orig_tensor(data, *args, device=device, requires_grad=requires_grad, **kwargs)
            host = orig_tensor(data, *args, device="cpu", **kwargs)
            return torch.empty(host.shape, dtype=host.dtype, device=dev, requires_grad=requires_grad)
    orig_tensor, torch.tensor = torch.tensor, build_tensor
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=hf_attn_implementation(attention),
                                                 dtype=torch.get_default_dtype())
    finally:
        torch.tensor = orig_tensor
    moe_patch = patch_moe_routing(model, moe_routing)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not getattr(tracker, "compiled", False):
        model.get_output_embeddings().register_forward_pre_hook(lambda *a: tracker.set_sub("loss"))
    resolved = {k: v for k, v in model.config.to_dict().items() if k not in HF_CONFIG_NOISE}
    resolved["dtype"] = str(resolved.get("dtype")).replace("torch.", "")
    model.vramfit_hf = {"transformers_version": transformers.__version__,
                        "model_class": type(model).__name__,
                        "attn_implementation": model.config._attn_implementation,
                        **({"moe_routing": moe_patch} if moe_patch else {}),
                        "config": resolved}
    return model


# Mixture of experts (mixtral, qwen2_moe, olmoe): which experts a token goes to depends on the data, and on the
# stub-cuda device no kernel runs (the router's top-k indices are never computed; copies to the host read zeros).
# The routing is therefore forced. Each router (`*TopKRouter`, the same in the three families in transformers 5.24)
# runs as it is (its linear, fp32 softmax and top-k allocate as they do) and its top-k indices [N, k] are then
# overwritten in place. The overwrite goes through `.data`, so no device byte is allocated and autograd's saved
# copy of those indices (top-k's backward) is not version-bumped.
#   * balanced (the default): token-expert pair p (p = token * k + slot) -> expert p % n_experts; every expert gets
#     N * k / E pairs (the k experts of a token are distinct when k <= E).
#   * a case's `"moe_routing": {"busiest_expert_fraction": f}` (k/E <= f <= 1): expert 0 receives round(f * N) of
#     the N tokens, and the other S - round(f * N) token-expert pairs (S = N * k) are shared evenly by experts
#     1..E-1 (each gets floor(rest / (E-1)), the lowest-numbered rest % (E-1) one more). f = k/E is balanced, f = 1
#     sends every token to expert 0. Pairs are assigned by writing the expert ids in ascending order, each repeated
#     by its count, into the [k, N] transpose of the indices (slot j of token t is position j * N + t), which keeps
#     a token's k experts distinct because no expert gets more than N pairs. The ids are built on the host and
#     copied into the indices (a host-to-device copy_, no device allocation). Fake tensors carry no values and the
#     stub device computes none, so both methods measure the same bytes as balanced routing unless some allocation's
#     size is computed from the routing on the host (see tests/data/hf/README.md, "Routing imbalance").
# With transformers 5.24's default experts implementation on CUDA, `grouped_mm`, every one of the S pairs is
# gathered into one buffer sorted by expert, the grouped GEMMs take per-expert offsets (bf16: CUTLASS, on the
# device; other dtypes: `_grouped_mm_fallback` reads them to the host and runs one mm per non-empty expert, each
# taking the cuBLAS workspace on a GPU, which neither method sees) and the expert weights' gradients are dense;
# VRAMFIT_MOE_ROUTING=router (the router's own choice, no patch) measures the same bytes. Only the `eager` experts implementation (a Python loop over the experts hit, sized by
# `nonzero`/`where`) depends on the routing; it is not what a CUDA run uses by default, and on the stub device it
# would see no expert hit at all.
def moe_expert_counts(n_tokens, top_k, n_experts, busiest_expert_fraction):
    """Token-expert pairs per expert under `busiest_expert_fraction` (see above); sums to n_tokens * top_k."""
    f = float(busiest_expert_fraction)
    if not (top_k / n_experts - 1e-9 <= f <= 1.0):
        raise SystemExit(f"busiest_expert_fraction {f} is outside [top_k/n_experts, 1] = [{top_k / n_experts}, 1]")
    busiest = min(n_tokens, round(f * n_tokens))
    rest = n_tokens * top_k - busiest
    if n_experts == 1:
        return [busiest]
    base, extra = divmod(rest, n_experts - 1)
    counts = [busiest] + [base + (1 if e < extra else 0) for e in range(n_experts - 1)]
    assert max(counts) <= n_tokens and sum(counts) == n_tokens * top_k, counts
    return counts


# The forced routing's token-expert pairs per expert, by (pairs S, experts E), as each patched router last set them:
# what the expert offsets (the cumulative sum of these counts) hold on a GPU. measure_stub.py answers the host read
# of those offsets with them (aten's _grouped_mm fallback reads them back to run one GEMM per expert).
MOE_COUNTS = {}
MOE_BALANCED = [False]  # patch_moe_routing forced balanced routing (pair p to expert p % E)


def moe_counts(s, e):
    """The pairs per expert of the forced routing for S pairs over E experts, or None where unknown. Under
    torch.compile Dynamo applies the patched router's write to MOE_COUNTS after the compiled graph has run, so in
    the first forward the experts read their offsets before it: balanced routing's counts follow from (S, E)."""
    counts = MOE_COUNTS.get((s, e))
    if counts is None and MOE_BALANCED[0]:
        counts = balanced_counts(s, e)
    return counts


def balanced_counts(s, e):
    """Pair p to expert p % E: the pairs each expert gets."""
    return [s // e + (1 if i < s % e else 0) for i in range(e)]


def patch_moe_routing(model, moe_routing=None):
    if os.environ.get("VRAMFIT_MOE_ROUTING") == "router":
        return None
    routers = [mod for mod in model.modules()
               if type(mod).__name__.endswith("TopKRouter") and hasattr(mod, "num_experts") and hasattr(mod, "top_k")]
    if not routers:
        return None
    fraction = (moe_routing or {}).get("busiest_expert_fraction")
    unknown = set(moe_routing or {}) - {"busiest_expert_fraction"}
    if unknown:
        raise SystemExit(f"moe_routing: unknown fields {sorted(unknown)}")

    def balanced(router):
        route = router.forward

        def forward(hidden_states):
            logits, scores, indices = route(hidden_states)
            flat = indices.data.view(-1)
            torch.arange(flat.numel(), out=flat)
            flat.remainder_(router.num_experts)
            s, e = flat.numel(), router.num_experts
            MOE_COUNTS[(s, e)] = balanced_counts(s, e)
            return logits, scores, indices
        return forward

    counts_seen = {}

    def imbalanced(router):
        route = router.forward

        def forward(hidden_states):
            logits, scores, indices = route(hidden_states)
            n, k = indices.shape
            counts = moe_expert_counts(n, k, router.num_experts, fraction)
            counts_seen[f"tokens {n}, top_k {k}, experts {router.num_experts}"] = counts
            MOE_COUNTS[(n * k, router.num_experts)] = counts
            ids = torch.empty(n * k, dtype=indices.dtype, device="cpu")
            start = 0
            for e, c in enumerate(counts):
                ids[start:start + c].fill_(e)
                start += c
            # slot j of token t <- position j * n + t of the ascending id list
            indices.data.copy_(ids.view(k, n).t().contiguous())
            return logits, scores, indices
        return forward

    for router in routers:
        router.forward = (balanced if fraction is None else imbalanced)(router)
    MOE_BALANCED[0] = fraction is None
    if fraction is None:
        return {"routing": "balanced: token-expert pair p goes to expert p % n_experts (router patched)",
                "routers": len(routers), "experts_implementation": model.config._experts_implementation}
    return {"routing": f"imbalanced: expert 0 receives round({fraction} * tokens) of the tokens, the other "
                       "token-expert pairs are shared evenly by the other experts (router patched)",
            "busiest_expert_fraction": fraction,
            "pairs_per_expert": counts_seen,  # filled in by the first forward, before the record is written
            "routers": len(routers), "experts_implementation": model.config._experts_implementation}


# --------------------------------------------------------------------------------------------------------------
# One run: build, then three training steps as the family's loop runs them.
def run_case(case):
    m, tr = case["model"], case["train"]
    family = m["family"] if "family" in m else "hf"
    precision, opt_name = tr["precision"], tr["optimizer"]
    B, T = tr["batch_size"], tr.get("seq_len") or m.get("block_size") or m["hf"]["max_position_embeddings"]
    accum = tr.get("grad_accum_steps", 1)
    compiled = bool(tr.get("compile", False))
    grad_clip = tr.get("grad_clip", 1.0)
    tracker = Tracker()
    tracker.set_sub = lambda s: setattr(tracker, "phase", tracker.phase.split(":")[0] + ":" + s)

    ctxs = []
    if FAKE:
        from torch._subclasses.fake_tensor import FakeTensorMode
        fake = FakeTensorMode(allow_non_fake_inputs=False)
        fake.__enter__()
        ctxs.append(fake)
        watch_storages(fake, tracker)
        if compiled:
            # A fresh Dynamo cache for every case: cases share GPT.forward's code object, and Dynamo's
            # recompile limit would otherwise send later cases to eager mode.
            torch._dynamo.reset()
            prepare_fake_inductor(tracker)
        else:
            F.scaled_dot_product_attention = sdpa_as_cuda
        # Fake storages have no values: GradScaler's inf check reads one. Assume finite gradients.
        torch.amp.GradScaler._maybe_opt_step = lambda self, opt, st, *a, **k: opt.step(*a, **k)
    if not FAKE:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if TRACK:
        tracker.__enter__()
    dev = "cuda"
    # Built directly on the device, in its training dtype (pure bf16 builds in bf16 rather than converting).
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if precision == "bf16" else torch.float32)
    with torch.device(dev):
        if family == "gpt2":
            model = GPT(m, tr.get("attention", "sdpa"), tr.get("checkpointing", False), tracker)
        elif family == "hf":
            tracker.compiled = compiled
            model = build_hf(m["hf"], tr.get("attention", "sdpa"), tr.get("checkpointing", False), tracker,
                             case.get("moe_routing"))
            hf_info = model.vramfit_hf
        else:
            tracker.compiled = compiled
            model = build_llama(m, tr.get("checkpointing", False), tracker)
    torch.set_default_dtype(old_dtype)
    model.train()

    # Optimizer as each family's loop builds it. nanoGPT: two groups (weight decay for >=2-D params), fused when
    # asked; here foreach=True / fused=True are passed explicitly because the optimizer's own auto-choice looks
    # at type(p) and would take the per-parameter loop for fake tensors.
    params = [p for p in model.parameters() if p.requires_grad]
    # SGD: torch's defaults (no weight decay), in the same two groups.
    wd = 0.1 if opt_name.startswith("adamw") else 0.0
    if family == "gpt2":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": 0.0}]
    if opt_name == "adamw":
        opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), foreach=True)
    elif opt_name == "adamw-fused":
        opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=True)
    elif opt_name == "sgd":
        opt = torch.optim.SGD(groups, lr=1e-3, foreach=True)
    else:
        opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9, foreach=True)

    if compiled:
        # nanoGPT train.py: `model = torch.compile(model)` after building the optimizer. The loss-phase marker is
        # a Python call Dynamo would break the graph on: a plain no-op instead.
        import types
        model.tracker = types.SimpleNamespace(set_sub=lambda s: None)
        model = torch.compile(model)

    amp_dtype = {"fp16-amp": torch.float16, "bf16-amp": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=(precision == "fp16-amp"))

    def autocast():
        if amp_dtype is None:
            return torch.autocast("cuda", enabled=False)
        return torch.autocast("cuda", dtype=amp_dtype)

    vocab = m["vocab_size"] if family != "hf" else hf_info["config"]["vocab_size"]

    def get_batch():
        x = torch.randint(vocab, (B, T), device=dev)
        y = torch.randint(vocab, (B, T), device=dev)
        return x, y

    tracker.phase = "init"
    if family == "gpt2":
        # nanoGPT train.py: the next batch is fetched while the current step's graph is alive; `logits` and
        # `loss` stay bound from one micro-step (and step) to the next.
        X, Y = get_batch()
        logits = loss = None
        for step in (1, 2, 3):
            for micro in range(accum):
                tracker.phase = f"step{step}:forward"
                with autocast():
                    logits, loss = model(X, Y)
                with autocast():
                    loss = loss / accum
                X, Y = get_batch()
                tracker.phase = f"step{step}:backward"
                scaler.scale(loss).backward()
            tracker.phase = f"step{step}:optimizer"
            if grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=tr.get("zero_grad_set_to_none", True))
            if STEP_HOOK[0]:
                STEP_HOOK[0](step)
    else:
        for step in (1, 2, 3):
            for micro in range(accum):
                x, y = get_batch()
                tracker.phase = f"step{step}:forward"
                with autocast():
                    loss = model(input_ids=x, labels=y).loss
                with autocast():
                    loss = loss / accum
                tracker.phase = f"step{step}:backward"
                scaler.scale(loss).backward()
                del loss, x, y
            tracker.phase = f"step{step}:optimizer"
            if grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=tr.get("zero_grad_set_to_none", True))
            if STEP_HOOK[0]:
                STEP_HOOK[0](step)

    # Categorise the live storages at the peak.
    param_ids = {id(p.untyped_storage()) for p in model.parameters()}
    buffer_ids = {id(b.untyped_storage()) for b in model.buffers()}
    state_ids = set()
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                state_ids.add(id(v.untyped_storage()))
    cats = {}
    for key, (nbytes, phase, op) in tracker.peak_snapshot.items():
        if key in param_ids or key in buffer_ids:
            c = "weights"
        elif key in state_ids:
            c = "optimizer"
        elif isinstance(key, tuple):
            c = "hidden:" + op
        else:
            c = phase.split(":", 1)[-1] + ":" + op
        cats[c] = cats.get(c, 0) + nbytes
    if TRACK:
        tracker.__exit__(None, None, None)
    checked = self_check() if FAKE else None
    for c in reversed(ctxs):
        c.__exit__(None, None, None)
    F.scaled_dot_product_attention = _orig_sdpa
    n_params = sum(p.numel() for p in model.parameters())
    real = {}
    if not FAKE:
        torch.cuda.synchronize()
        real = {"tracker_peak_bytes": tracker.peak,
                "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(),
                "nvml_used_bytes": nvml_used_bytes()}
        tracker.peak = torch.cuda.max_memory_allocated()
    return {**real,
        "n_params": n_params,
        "peak_allocated_bytes": tracker.peak,
        "peak_phase": tracker.peak_phase,
        "peak_op": tracker.peak_op,
        "step_peaks": tracker.step_peaks,
        "at_peak": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "hidden_allocations": sorted({h["name"] for h in tracker.hidden}),
        **({"self_check": checked} if checked else {}),
        **({"pad_mm_decisions": PAD_MM["decisions"]} if compiled and FAKE else {}),
        # Popped into the record by main() and measure_stub.py: what Hugging Face built, as it resolved it.
        **({"hf": hf_info} if family == "hf" else {}),
    }


def nvml_used_bytes():
    """Device memory in use as nvidia-smi reports it (CUDA context + reserved + other processes)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.splitlines()[0]) * 2**20
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def main():
    args = sys.argv[1:]
    cases = json.load(open(args[0]))
    only = args[args.index("--only") + 1] if "--only" in args else None
    if "--eager-only" in args:  # cases-hf.json mixes both; its fake-cuda cross-check is eager
        cases = [c for c in cases if not c["train"].get("compile")]
    out_path = args[1]
    results = json.load(open(out_path)) if os.path.exists(out_path) else {"records": []}
    done = {r["name"] for r in results["records"]}
    for case in cases:
        if (only and case["name"] != only) or (not only and case["name"] in done):
            continue
        # The device a case names (its compute capability) is the one the stub simulates (VRAMFIT_STUB_CC):
        # sm_90 unless the case says otherwise.
        cc = case.get("device", {}).get("compute_capability", 9.0)
        if FAKE and torch.cuda.get_device_capability() != (int(cc), round(cc * 10) % 10):
            print(f"{case['name']:40s} skipped: it is for sm_{round(cc * 10)}, the stub simulates sm_%d%d (run it "
                  f"with VRAMFIT_STUB_CC={round(cc * 10)})" % torch.cuda.get_device_capability(), flush=True)
            continue
        measured = run_case(case)
        hf = measured.pop("hf", None)
        rec = {"name": case["name"], "setup": {"model": case["model"], "train": case["train"],
                                               **({"device": case["device"]} if "device" in case else {})},
               "measured": measured,
               "method": "fake-cuda" if FAKE else "cuda",
               "torch_version": torch.__version__,
               "device": "simulated sm_%d%d CUDA device, cuBLAS workspace %d KiB per GEMM"
               % (*torch.cuda.get_device_capability(), cublas_workspace_bytes() // 1024)
               if FAKE else torch.cuda.get_device_name()}
        if hf:
            rec["versions"] = {"transformers": hf.pop("transformers_version")}
            rec["hf"] = hf
        results["records"] = [r for r in results["records"] if r["name"] != case["name"]] + [rec]
        print(f"{case['name']:40s} peak {measured['peak_allocated_bytes'] / 2**20:10.2f} MiB at "
              f"{measured['peak_phase']} ({measured['peak_op']})", flush=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
        if TRACE is not None:
            with open(os.environ["VRAMFIT_TRACE"], "w") as f:
                for ev in TRACE:
                    f.write("%-22s %-70s %+12d %12d #%d\n" % ev)


if __name__ == "__main__":
    main()
