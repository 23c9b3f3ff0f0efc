#!/usr/bin/env python3
"""Multi-GPU memory per GPU (issue 14): DDP, FSDP2, tensor parallel and TP x FSDP, measured in one process per case
with a fake process group, for vramfit's reference data (tests/data/parallel/README.md).

Usage:  measure_parallel.py CASES.json OUT.json [--only N1,N2] [--method stub-cuda|fake-cuda] [--snapshots DIR]
                            [--redo]

One process per case. The process is rank `train.rank` (default 0) of a world of `parallel.world_size` GPUs:
`torch.distributed.init_process_group("fake", store=FakeStore(), rank=r, world_size=W)`
(torch.testing._internal.distributed.fake_pg). The fake backend's collectives do nothing and return at once; every
buffer they read or write is allocated by the caller (FSDP2's all-gather output and reduce-scatter input/output, DDP's
bucket buffers, DTensor's redistribute outputs) through PyTorch's allocator, exactly as with NCCL. NCCL's own
internal buffers (cudaMalloc'd by NCCL, outside PyTorch's counters) are not measured here or by PyTorch on a GPU.

Methods (each record names its own):
  * "stub-cuda" (the reference, default): PyTorch's real CUDA code and caching allocator on the stub GPU of
    stub_cuda.py / stubs/ (tests/data/stub-cuda/README.md), no dispatch mode; PyTorch's own counters after each
    step (max_memory_allocated, max_memory_reserved, memory_stats' segments), as measure_stub.py records them.
    Streams are real allocator streams (FSDP2's all-gather copy-in, all-gather and reduce-scatter streams get their
    own per-stream block pools); events and stream queries always report "complete" (the stub GPU is infinitely
    fast: a block freed with a pending cross-stream use is reusable as soon as the CPU frees it).
    Two additions, both in this script:
      - SHADOW_C (below), loaded before the stubs so its cudaMemcpy/cudaMemcpyAsync win: small host-to-device
        copies (<= 64 KiB) are remembered per device address and come back on a device-to-host read (the stub
        otherwise returns zeros). DDP's bucket rebuild after the first iteration sends the new bucket indices through
        the device (Reducer::sync_bucket_indices: to the device, broadcast, back to the host); with zeros it would
        build no bucket. No allocation changes.
      - DDP's constructor check that every rank has the same parameters (_verify_param_shape_across_processes)
        all-gathers metadata and compares it; on the fake group the other ranks' rows are never written, so the
        check is skipped (a few hundred bytes, before training). DDP gets a Python communication hook doing what
        the default C++ hook does (bucket.div_(W), all_reduce in place, the bucket as result) because the fake
        backend's future carries no value: no allocation differs.
  * "fake-cuda" (cross-check): measure.py's FakeTensorMode on device cuda with torch.distributed._tools'
    FSDPMemTracker (FSDP2 cases) or MemTracker (others) as PyTorch's own FSDP memory-tracker tests run them; see
    the README for what ran.

Case fields: "model": measure.py's nanoGPT GPT ({"family": "gpt2", n_layer, n_head, n_embd, vocab_size, block_size,
bias, dropout}) or Llama ({"family": "llama", ... n_kv_head, intermediate_size, tie_embeddings}); "train":
batch_size (per GPU), seq_len, precision ("fp32" or "bf16-amp"; FSDP2 with mp_policy runs without autocast, FSDP2
under "bf16-amp" autocasts fp32 parameters),
grad_accum_steps, rank, checkpointing, base_dtype ("fp32" | "bf16": the dtype the model is built in); "lora"
(optional, Llama only): peft's LoraConfig fields (r, lora_alpha, lora_dropout, target_modules), applied with
peft.get_peft_model after the model is built (on the meta device for FSDP2) and before DDP / fully_shard, as
measure_finetune.py does (fp32 adapters; AdamW over the trainable parameters); FSDP2 shards each of the PeftModel's
decoder layers (frozen base and adapters in one group), then the PeftModel;
"parallel": {"strategy": "ddp" | "fsdp2" | "tp" | "tp-fsdp2", "world_size": W, ...}:
  ddp:   bucket_cap_mb (None = default 25 with a 1 MiB first bucket), gradient_as_bucket_view, static_graph,
         accumulation as the family's loop does it (gpt2: nanoGPT's model.require_backward_grad_sync = last
         micro-step; llama: `with model.no_sync()` for all but the last micro-step).
  fsdp2: fully_shard on every block, then on the root; reshard_after_forward (True/False), mp_policy
         {"param_dtype": "bf16", "reduce_dtype": "fp32"}, cpu_offload (CPUOffloadPolicy). Model built on the meta
         device, then to_empty (as torchtitan does). Accumulation: set_requires_gradient_sync(False) but last.
  tp:    Llama only (nanoGPT's fused c_attn splits by the full width). tp_size = W; plan "basic": q/k/v/gate/up
         ColwiseParallel, o/down RowwiseParallel, embedding, norms and head plain (replicated); plan "sp": sequence
         parallel as torchtitan does it (norms SequenceParallel, embedding RowwiseParallel to Shard(1), o/down
         RowwiseParallel to Shard(1), attention/MLP inputs all-gathered, head ColwiseParallel to Shard(-1) with
         loss_parallel()).
  tp-fsdp2: a 2-D mesh (dp, tp) = (W / tp_size, tp_size): the TP plan on the tp mesh, then fully_shard per block
         and root on the dp mesh.
Optimizer: AdamW(foreach=True), nanoGPT's two groups for gpt2; for TP the DTensor and plain parameters in separate
groups (foreach/fused refuse a mix) and clip_grad_norm_ applied per group. Gradient clipping 1.0.
Only this script needs PyTorch; vramfit and its tests never do.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STUB_CACHE = os.path.join(ROOT, ".venv-measure", "stub-cuda")

SHADOW_C = r"""
/* vramfit measure_parallel.py: host-to-device copies of up to 64 KiB remembered, returned by device-to-host reads;
 * pinned host allocations reported as pinned by cudaPointerGetAttributes (DDP's static graph asserts it). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef int cudaError_t; typedef void *cudaStream_t;
#define MAXN 4096
#define MAXB 65536
struct ent { uintptr_t a; size_t n; unsigned char *d; };
static struct ent E[MAXN]; static int ne, nextv;
static pthread_mutex_t L = PTHREAD_MUTEX_INITIALIZER;
static int (*isdev)(const void *);
static int dev(const void *p) {
  if (!isdev) isdev = (int (*)(const void *))dlsym(RTLD_DEFAULT, "stub_is_device_ptr");
  return isdev(p);
}
static void drop(uintptr_t a, size_t n) {
  for (int i = 0; i < ne; i++)
    if (E[i].d && E[i].a < a + n && a < E[i].a + E[i].n) { free(E[i].d); E[i].d = 0; }
}
static void put(uintptr_t a, const void *src, size_t n) {
  drop(a, n);
  if (n > MAXB) return;
  int i; for (i = 0; i < ne; i++) if (!E[i].d) break;
  if (i == ne) { if (ne < MAXN) ne++; else { i = nextv; nextv = (nextv + 1) % MAXN; free(E[i].d); } }
  E[i].a = a; E[i].n = n; E[i].d = malloc(n); memcpy(E[i].d, src, n);
}
static const unsigned char *get(uintptr_t a, size_t n) {
  for (int i = 0; i < ne; i++)
    if (E[i].d && E[i].a <= a && a + n <= E[i].a + E[i].n) return E[i].d + (a - E[i].a);
  return 0;
}
static void copy(void *dst, const void *src, size_t n) {
  if (!dst || !n) return;
  int dd = dev(dst), sd = dev(src);
  pthread_mutex_lock(&L);
  if (!dd && !sd) memmove(dst, src, n);
  else if (dd && !sd) put((uintptr_t)dst, src, n);
  else if (!dd && sd) { const unsigned char *s = get((uintptr_t)src, n); if (s) memcpy(dst, s, n); else memset(dst, 0, n); }
  else {
    const unsigned char *s = get((uintptr_t)src, n);
    if (s) { unsigned char *t = malloc(n); memcpy(t, s, n); put((uintptr_t)dst, t, n); free(t); }
    else drop((uintptr_t)dst, n);
  }
  pthread_mutex_unlock(&L);
}
/* Pinned host memory: ordinary host memory, remembered so that cudaPointerGetAttributes calls it cudaMemoryTypeHost. */
#define MAXP 65536
static uintptr_t PA[MAXP]; static size_t PN[MAXP]; static int np_;
cudaError_t cudaHostAlloc(void **p, size_t size, unsigned int flags) {
  (void)flags; *p = NULL;
  if (posix_memalign(p, 4096, size ? size : 1)) return 2;
  pthread_mutex_lock(&L);
  int i; for (i = 0; i < np_; i++) if (!PA[i]) break;
  if (i == np_ && np_ < MAXP) np_++;
  if (i < MAXP) { PA[i] = (uintptr_t)*p; PN[i] = size; }
  pthread_mutex_unlock(&L);
  return 0;
}
cudaError_t cudaMallocHost(void **p, size_t size) { return cudaHostAlloc(p, size, 0); }
cudaError_t cudaFreeHost(void *p) {
  pthread_mutex_lock(&L);
  for (int i = 0; i < np_; i++) if (PA[i] == (uintptr_t)p) PA[i] = 0;
  pthread_mutex_unlock(&L);
  free(p); return 0;
}
struct ptr_attr { int type; int device; void *devicePointer; void *hostPointer; };
cudaError_t cudaPointerGetAttributes(struct ptr_attr *a, const void *p) {
  memset(a, 0, sizeof *a);
  if (dev(p)) { a->type = 2; a->devicePointer = (void *)p; return 0; }
  int pinned = 0;
  pthread_mutex_lock(&L);
  for (int i = 0; i < np_; i++) if (PA[i] && PA[i] <= (uintptr_t)p && (uintptr_t)p < PA[i] + PN[i]) pinned = 1;
  pthread_mutex_unlock(&L);
  if (pinned) { a->type = 1; a->hostPointer = (void *)p; a->devicePointer = (void *)p; }
  else { a->device = -2; a->hostPointer = (void *)p; }
  return 0;
}
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, int k) { (void)k; copy(d, s, n); return 0; }
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, int k, cudaStream_t st) {
  (void)k; (void)st; copy(d, s, n); return 0;
}
"""


def build_shadow():
    import hashlib
    tag = hashlib.sha256(SHADOW_C.encode()).hexdigest()[:12]
    out = os.path.join(STUB_CACHE, "parallel-shadow-" + tag, "libvramfit_shadow.so")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        src = out[:-3] + ".c"
        open(src, "w").write(SHADOW_C)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", out, src, "-ldl"], check=True)
    return out


MIB = 1 << 20
MESHES = {}  # fake-cuda: meshes built before the fake mode


# --------------------------------------------------------------------------------------------------------------
# The child: one case in its own process.
def child(case, method, snapshot_path):
    import ctypes
    if method == "stub-cuda":
        import stub_cuda
        ctypes.CDLL(build_shadow(), mode=ctypes.RTLD_GLOBAL)  # before the stubs: its cudaMemcpy wins
        stub_cuda.preload(stub_cuda.build(STUB_CACHE))
        os.environ["VRAMFIT_REAL_CUDA"] = "1"
        os.environ["VRAMFIT_NO_TRACKER"] = "1"
    else:
        # Fake tensors, but the stub-cuda libraries underneath (measure.py's small cuda_stub.c has no events,
        # which FSDP2's streams need): nothing is allocated on the stub device, the runtime answers the queries.
        import stub_cuda
        ctypes.CDLL(build_shadow(), mode=ctypes.RTLD_GLOBAL)
        stub_cuda.preload(stub_cuda.build(STUB_CACHE))
        os.environ["VRAMFIT_STUB_LOADED"] = "1"
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import measure
    import transformers
    torch.backends.cuda.enable_cudnn_sdp(False)
    import transformers.masking_utils as mu
    mu.find_packed_sequence_indices = lambda *a, **k: None
    if method == "fake-cuda":
        mu.is_tracing = lambda *a, **k: False

    par, tr = case["parallel"], case["train"]
    W, rank = par["world_size"], tr.get("rank", 0)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=W)
    torch.cuda.set_device(0)

    steps = []
    fake_ctx = None
    if method == "fake-cuda":
        # DeviceMesh reads a tensor back when it is built: build the meshes before the fake mode.
        from torch.distributed.device_mesh import init_device_mesh
        tp = par.get("tp_size", W)
        MESHES["1d"] = init_device_mesh("cuda", (W,))
        if par["strategy"] == "tp-fsdp2":
            MESHES["2d"] = init_device_mesh("cuda", (W // tp, tp), mesh_dim_names=("dp", "tp"))
        from torch._subclasses.fake_tensor import FakeTensorMode
        fake_ctx = FakeTensorMode(allow_non_fake_inputs=True)
        fake_ctx.__enter__()
        import torch.nn.functional as F
        F.scaled_dot_product_attention = measure.sdpa_as_cuda
        torch.amp.GradScaler._maybe_opt_step = lambda self, opt, st, *a, **k: opt.step(*a, **k)

    def after_step(step, extra):
        if method == "stub-cuda":
            steps.append({"step": step, **stub_cuda.step_stats(torch), **extra})
        else:
            steps.append({"step": step, **extra})

    if snapshot_path and method == "stub-cuda":
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    out = run_case(case, method, after_step, torch, measure)
    if snapshot_path and method == "stub-cuda":
        torch.cuda.memory._dump_snapshot(snapshot_path)
        torch.cuda.memory._record_memory_history(enabled=None)
    measured = {}
    if method == "stub-cuda":
        st = torch.cuda.memory_stats()
        measured.update(peak_allocated_bytes=max(s["peak_allocated_bytes"] for s in steps),
                        peak_reserved_bytes=max(s["peak_reserved_bytes"] for s in steps),
                        peak_segments=max(s["peak_segments"] for s in steps),
                        num_alloc_retries=st.get("num_alloc_retries", 0), num_ooms=st.get("num_ooms", 0))
    else:
        measured.update(peak_allocated_bytes=out.pop("tracker_peak_bytes"))
    measured["allocated_bytes_before_step1"] = out.pop("allocated_before")
    measured["steps"] = steps
    if fake_ctx is not None:
        fake_ctx.__exit__(None, None, None)
    cc = torch.cuda.get_device_capability()
    rec = {
        "measured": measured,
        "method": method,
        "torch_version": torch.__version__,
        "versions": {"transformers": transformers.__version__},
        "process_group": "fake backend (torch.testing._internal.distributed.fake_pg.FakeStore), one process, "
                         "rank %d of %d" % (rank, W),
        "sdpa_backends": "cuDNN attention off (not stubbable): flash, else memory-efficient, else math",
        **out,
    }
    if method == "stub-cuda":
        props = torch.cuda.get_device_properties(0)
        rec["device"] = {"name": props.name, "compute_capability": f"{cc[0]}.{cc[1]}",
                         "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory}
    dist.destroy_process_group()
    return rec


def local(t, torch):
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def nbytes(ts, torch):
    """Bytes of the distinct storages behind tensors (DTensors by their local shard)."""
    seen, total = set(), 0
    for t in ts:
        if t is None:
            continue
        s = local(t, torch).untyped_storage()
        if s.data_ptr() in seen or s.device.type != "cuda":
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def tp_plan(plan, torch):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)
    if plan == "basic":
        layer = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                 "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                 "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                 "mlp.down_proj": RowwiseParallel()}
        return layer, {}
    # Sequence parallel (torchtitan's Llama plan). The residual stream stays a DTensor sharded on the sequence
    # (use_local_output=False) so Hugging Face's shapes (position ids from inputs_embeds.shape) are the global ones.
    layer = {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
             "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                             desired_input_kwarg_layouts={"hidden_states": Replicate()}),
             "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
             "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
             "self_attn.v_proj": ColwiseParallel(),
             "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
             "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
             "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
    root = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                  use_local_output=False),
            "model.norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)}
    return layer, root


def run_case(case, method, after_step, torch, measure):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    m, tr, par = case["model"], case["train"], case["parallel"]
    family, strategy, W = m["family"], par["strategy"], par["world_size"]
    B, T = tr["batch_size"], tr["seq_len"]
    accum = tr.get("grad_accum_steps", 1)
    precision = tr.get("precision", "fp32")
    fake = method == "fake-cuda"

    class NoTracker:
        compiled = False

        def set_sub(self, s):
            pass

    lc = case.get("lora")
    base_dtype = tr.get("base_dtype", "fp32")

    def build(device):
        # The base in its dtype (fine-tuning: measure_finetune.py's convention), then peft's adapters on it.
        old = torch.get_default_dtype()
        torch.set_default_dtype({"fp32": torch.float32, "bf16": torch.bfloat16}[base_dtype])
        with torch.device(device):
            if family == "gpt2":
                model = measure.GPT(m, tr.get("attention", "sdpa"), tr.get("checkpointing", False), NoTracker())
            else:
                model = measure.build_llama(m, tr.get("checkpointing", False), NoTracker())
        torch.set_default_dtype(old)
        if lc:
            import peft
            assert family == "llama", "LoRA cases are Hugging Face models"
            model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lc))
        return model

    def blocks_of(model):
        if family == "gpt2":
            return model.h
        return (model.base_model.model if lc else model).model.layers

    if not fake:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    info = {"strategy": strategy, "world_size": W, "rank": tr.get("rank", 0)}
    tp_mesh = dp_mesh = None
    if strategy in ("tp", "tp-fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        assert family == "llama", "TP plans are written for Llama's module names"
        tp = par.get("tp_size", W)
        if strategy == "tp":
            mesh = MESHES.get("1d") or init_device_mesh("cuda", (tp,), mesh_dim_names=("tp",))
            tp_mesh = mesh
        else:
            mesh = MESHES.get("2d") or init_device_mesh("cuda", (W // tp, tp), mesh_dim_names=("dp", "tp"))
            tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
        info.update(tp_size=tp, dp_size=W // tp, tp_plan=par.get("plan", "basic"))

    n_params_full = None
    ddp = None
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        import torch.nn.parallel.distributed as ddp_mod
        model = build("cuda")
        n_params_full = sum(p.numel() for p in model.parameters())
        ddp_mod._verify_param_shape_across_processes = lambda *a, **k: None
        kw = dict(device_ids=[0], gradient_as_bucket_view=par.get("gradient_as_bucket_view", False),
                  static_graph=par.get("static_graph", False))
        if par.get("bucket_cap_mb") is not None:
            kw["bucket_cap_mb"] = par["bucket_cap_mb"]
        ddp = DDP(model, **kw)

        def hook(state, bucket):
            buf = bucket.buffer()
            buf.div_(W)
            dist.all_reduce(buf)
            f = torch.futures.Future()
            f.set_result(buf)
            return f
        ddp.register_comm_hook(None, hook)
        info.update({k: kw[k] for k in ("gradient_as_bucket_view", "static_graph")},
                    bucket_cap_mb=par.get("bucket_cap_mb"),
                    first_bucket_bytes=int(dist._DEFAULT_FIRST_BUCKET_BYTES) if par.get("bucket_cap_mb") is None
                    else None, comm_hook="python: bucket.div_(W); all_reduce in place (as the default C++ hook)")
        runner = ddp
    elif strategy == "tp":
        from torch.distributed.tensor.parallel import parallelize_module
        model = build("cuda")
        n_params_full = sum(p.numel() for p in model.parameters())
        layer_plan, root_plan = tp_plan(par.get("plan", "basic"), torch)
        for layer in model.model.layers:
            parallelize_module(layer, tp_mesh, layer_plan)
        if root_plan:
            parallelize_module(model, tp_mesh, root_plan)
        runner = model
    else:  # fsdp2, tp-fsdp2
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        model = build("meta")
        n_params_full = sum(p.numel() for p in model.parameters())
        if strategy == "tp-fsdp2":
            from torch.distributed.tensor.parallel import parallelize_module
            layer_plan, root_plan = tp_plan(par.get("plan", "basic"), torch)
            for layer in model.model.layers:
                parallelize_module(layer, tp_mesh, layer_plan)
            if root_plan:
                parallelize_module(model, tp_mesh, root_plan)
        kw = {"reshard_after_forward": par.get("reshard_after_forward", True)}
        if dp_mesh is not None:
            kw["mesh"] = dp_mesh
        elif "1d" in MESHES:
            kw["mesh"] = MESHES["1d"]
        mp = par.get("mp_policy")
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}
        if mp:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dt[mp.get("param_dtype")],
                                                   reduce_dtype=dt[mp.get("reduce_dtype")])
        if par.get("cpu_offload"):
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
        for b in blocks_of(model):
            fully_shard(b, **kw)
        fully_shard(model, **kw)
        model.to_empty(device="cpu" if par.get("cpu_offload") else "cuda")
        info.update(reshard_after_forward=kw["reshard_after_forward"], mp_policy=mp,
                    cpu_offload=bool(par.get("cpu_offload")), fully_shard="each block, then the root")
        runner = model

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    wd = 0.1
    if family == "gpt2":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": params, "weight_decay": 0.0}]
    # foreach and clip_grad_norm_ refuse a mix of DTensor and plain tensors, or of DTensors on different meshes
    # (TP x FSDP: the TP-sharded Linears live on the 2-D mesh, the rest on the dp mesh): split each group.
    split = []
    for g in groups:
        by_mesh = {}
        for p in g["params"]:
            key = str(p.device_mesh) if isinstance(p, DTensor) else "plain"
            by_mesh.setdefault(key, []).append(p)
        split += [dict(g, params=x) for x in by_mesh.values()]
    groups = split
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), foreach=True)

    # Per-GPU sizes of what the strategy holds, from the tensors themselves.
    local_param_bytes = nbytes(params, torch)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    info["params"] = {"total": n_params_full, "local_numel": sum(local(p, torch).numel() for p in params),
                      "local_bytes": local_param_bytes,
                      "frozen_local_numel": sum(local(p, torch).numel() for p in frozen),
                      "frozen_local_bytes": nbytes(frozen, torch),
                      "dtensor_params": sum(isinstance(p, DTensor) for p in params),
                      "plain_params": sum(not isinstance(p, DTensor) for p in params)}
    if strategy == "tp" or strategy == "tp-fsdp2":
        info["tp_shards"] = {n: [list(p.shape), list(local(p, torch).shape), str(getattr(p, "placements", ""))]
                             for n, p in model.named_parameters() if ".layers.0." in n or "layers" not in n}

    amp_dtype = {"bf16-amp": torch.bfloat16, "fp16-amp": torch.float16}.get(precision)

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else torch.autocast("cuda", enabled=False)

    vocab = m["vocab_size"]

    def get_batch():
        return (torch.randint(vocab, (B, T), device="cuda"), torch.randint(vocab, (B, T), device="cuda"))

    sp = par.get("plan") == "sp"

    def forward_loss(x, y):
        if family == "gpt2":
            logits, loss = runner(x, y)
            return logits, loss
        if sp:  # the head's output sharded on the vocabulary: loss_parallel (around the backward too)
            logits = runner(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            return logits, loss
        return None, runner(input_ids=x, labels=y).loss

    fmt = None
    if fake and strategy in ("fsdp2", "tp-fsdp2"):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        fmt = FSDPMemTracker(model, opt)
    elif fake:
        from torch.distributed._tools.mem_tracker import MemTracker
        fmt = MemTracker()
        fmt.track_external(model, opt)
    if fmt is not None:
        fmt.__enter__()
    allocated_before = torch.cuda.memory_allocated() if not fake else None

    def grad_bytes():
        return nbytes([p.grad for p in params], torch)

    def state_bytes():
        return nbytes([v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)], torch)

    X, Y = get_batch()
    logits = loss = None
    for step in (1, 2, 3):
        for micro in range(accum):
            last = micro == accum - 1
            ctx = None
            if strategy == "ddp" and accum > 1:
                if family == "gpt2":  # nanoGPT train.py
                    ddp.require_backward_grad_sync = last
                elif not last:
                    ctx = ddp.no_sync()
            if strategy in ("fsdp2", "tp-fsdp2") and accum > 1:
                model.set_requires_gradient_sync(last)
            if sp:
                from torch.distributed.tensor.parallel import loss_parallel
                ctx = loss_parallel()
            if ctx is not None:
                ctx.__enter__()
            with autocast():
                logits, loss = forward_loss(X, Y)
                loss = loss / accum
            X, Y = get_batch()
            loss.backward()
            if ctx is not None:
                ctx.__exit__(None, None, None)
            if family != "gpt2":
                del loss, logits
                loss = logits = None
        gb = grad_bytes()
        for g in opt.param_groups:
            torch.nn.utils.clip_grad_norm_(g["params"], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step(step, {"grad_bytes_before_zero_grad": gb, "optimizer_state_bytes": state_bytes()})
        if fmt is not None and hasattr(fmt, "reset_mod_stats"):
            fmt.reset_mod_stats()  # FSDPMemTracker refuses a second iteration otherwise

    if fmt is not None:
        fmt.__exit__(None, None, None)
    if strategy in ("fsdp2", "tp-fsdp2"):
        info["fsdp_groups"] = fsdp_groups(model, torch)  # after step 1: dtypes are set at FSDP's lazy init
    out = {"parallel": info, "allocated_before": allocated_before}
    if lc:
        import peft
        out["lora"] = {"config": lc, "base_dtype": base_dtype, "peft": peft.__version__,
                       "lora_layers": sum(1 for mod in model.modules() if isinstance(mod, peft.tuners.lora.LoraLayer)),
                       "trainable_dtypes": sorted({str(p.dtype) for p in params}),
                       "frozen_dtypes": sorted({str(p.dtype) for p in frozen})}
    if ddp is not None:
        ld = ddp._get_ddp_logging_data()
        info["ddp_logging"] = {k: ld.get(k) for k in ("bucket_sizes", "rebuilt_bucket_sizes", "has_rebuilt_buckets",
                                                      "bucket_cap_bytes", "rebuilt_per_bucket_param_indices")
                               if k in ld}
    if fmt is not None:
        out["tracker_peak_bytes"] = tracker_peak(fmt, torch)
        out["mem_tracker"] = tracker_breakdown(fmt)
    return out


def fsdp_groups(model, torch):
    """Per fully_shard call: the parameters' unsharded and (padded) sharded sizes as FSDP2 holds them."""
    from torch.distributed.fsdp import FSDPModule
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, FSDPModule):
            continue
        st = mod._get_fsdp_state()
        pg = st._fsdp_param_group
        if pg is None:
            continue
        fps = pg.fsdp_params
        trained = [fp for fp in fps if fp.sharded_param.requires_grad]
        out.append({"module": name or "<root>", "n_params": len(fps), "n_trainable": len(trained),
                    "trainable_padded_sharded_numel": sum(fp.padded_sharded_param_size.numel() for fp in trained),
                    "orig_dtypes": sorted({str(fp.orig_dtype) for fp in fps}),
                    "unsharded_numel": sum(fp._orig_size.numel() for fp in fps),
                    "padded_sharded_numel": sum(fp.padded_sharded_param_size.numel() for fp in fps),
                    "sharded_numel": sum(fp._sharded_param_data.numel() for fp in fps)
                    if all(hasattr(fp, "_sharded_param_data") for fp in fps) else None,
                    "param_dtype": str(getattr(fps[0], "param_dtype", None) or fps[0].orig_dtype),
                    "reduce_dtype": str(getattr(fps[0], "reduce_dtype", None) or fps[0].orig_dtype)})
    return out


def tracker_peak(fmt, torch):
    snap = fmt.get_tracker_snapshot("peak")
    dev = [k for k in snap if isinstance(k, torch.device) and k.type == "cuda"]
    return snap[dev[0]]["Total"] if dev else None


def tracker_breakdown(fmt):
    import torch
    snap = fmt.get_tracker_snapshot("peak")
    out = {}
    for k, v in snap.items():
        if isinstance(k, torch.device) and k.type == "cuda":
            out = {str(c): int(b) for c, b in v.items()}
    return out


# --------------------------------------------------------------------------------------------------------------
def main():
    args = sys.argv[1:]
    if args and args[0] == "--child":
        case = json.loads(args[1])
        rec = child(case, args[2], args[3] if len(args) > 3 and args[3] else None)
        print("VRAMFIT-RECORD " + json.dumps(rec), flush=True)
        return
    cases = json.load(open(args[0]))
    out_path = args[1]
    only = args[args.index("--only") + 1].split(",") if "--only" in args else None
    method = args[args.index("--method") + 1] if "--method" in args else "stub-cuda"
    snaps = args[args.index("--snapshots") + 1] if "--snapshots" in args else None
    redo = "--redo" in args
    results = json.load(open(out_path)) if os.path.exists(out_path) else {"records": []}
    done = {r["name"] for r in results["records"]}
    todo = [c for c in cases if (only is None or c["name"] in only) and (redo or only or c["name"] not in done)]
    env = dict(os.environ, PYTHONPATH=HERE + ":" + os.environ.get("PYTHONPATH", ""))
    failures = []
    for c in todo:
        snap = os.path.join(snaps, c["name"] + ".pickle") if snaps else ""
        if snaps:
            os.makedirs(snaps, exist_ok=True)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(c), method, snap],
                           env=env, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("VRAMFIT-RECORD ")]
        if p.returncode != 0 or not line:
            err = [ln[:300] for ln in (p.stderr or p.stdout).strip().splitlines()[-3:]]
            print(f"{c['name']}: FAILED {' | '.join(err)}", flush=True)
            failures.append({"name": c["name"], "method": method, "error": " | ".join(err)})
            continue
        rec = {"name": c["name"], "case": c, **json.loads(line[0][len("VRAMFIT-RECORD "):])}
        results["records"] = [r for r in results["records"] if r["name"] != c["name"]] + [rec]
        order = {cc["name"]: i for i, cc in enumerate(cases)}
        results["records"].sort(key=lambda r: order.get(r["name"], 1 << 30))
        ms = rec["measured"]
        print("%-34s %-8s W=%-3d alloc %9.2f MiB  reserved %9s MiB" % (
            c["name"], c["parallel"]["strategy"], c["parallel"]["world_size"], ms["peak_allocated_bytes"] / MIB,
            "%.2f" % (ms["peak_reserved_bytes"] / MIB) if "peak_reserved_bytes" in ms else "-"), flush=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    if failures:
        results["failures"] = failures
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")


def stub_env_fake():
    """measure.py's LD_PRELOAD stub for the fake-cuda method (built as measure.py's ensure_stub builds it)."""
    import importlib.util
    site = os.path.dirname(os.path.dirname(importlib.util.find_spec("torch").origin))
    includes = [os.path.join(site, "nvidia", "cu13", "include"),
                os.path.join(site, "triton", "backends", "nvidia", "include")]
    out_dir = tempfile.mkdtemp(prefix="vramfit-stub-")
    lib = os.path.join(out_dir, "libcuda.so.1")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", *[f"-I{i}" for i in includes], "-Wl,-soname,libcuda.so.1",
                    "-o", lib, os.path.join(HERE, "cuda_stub.c")], check=True)
    return {"LD_PRELOAD": lib, "LD_LIBRARY_PATH": out_dir + ":" + os.environ.get("LD_LIBRARY_PATH", ""),
            "VRAMFIT_STUB_LOADED": "1"}


if __name__ == "__main__":
    main()
