#!/usr/bin/env python3
"""Fine-tuning (issue 13): LoRA and QLoRA as peft and bitsandbytes apply them, measured for vramfit's reference data.

Usage:  measure_finetune.py CASES.json OUT.json [--only N1,N2] [--method stub-cuda|fake-cuda] [--snapshots DIR]
                            [--trace DIR] [--redo]
        measure_finetune.py --probe OUT.json        (what autograd keeps per Linear kind: see probe())

Each case (scripts/measure/cases-finetune.json) is a Hugging Face decoder built from config.json fields
(measure.py's build_hf: AutoConfig.for_model, AutoModelForCausalLM.from_config) with the base in its dtype, wrapped
by peft.get_peft_model with the case's LoraConfig, and trained with the plain Hugging Face loop of the HF cases
(three steps of model(input_ids, labels).loss, autocast as the case says, GradScaler for fp16-amp, gradient
clipping at 1.0, zero_grad(set_to_none=True)), the optimizer over the trainable parameters only.

Methods (each record names its own):
  * "stub-cuda" (the reference, default): PyTorch's real CUDA code and caching allocator on the stub GPU of
    stub_cuda.py / stubs/ (tests/data/stub-cuda/README.md), no dispatch mode; PyTorch's own counters after each
    step (max_memory_allocated, max_memory_reserved, memory_stats' segments), as measure_stub.py records them.
    bitsandbytes' CUDA library (libbitsandbytes_cuda132.so) links the stub runtime and cuBLAS: its kernels are
    no-ops and everything it allocates goes through PyTorch, so 4-bit/8-bit weights, their quantization state and
    8-bit optimizer state are measured, not derived. Paged optimizers' state (parameters of >= 1e5 elements) is
    CUDA managed memory, outside PyTorch's counters: stubs/bnb_extra.c hands it out from host mappings and counts
    it (`managed_bytes` in the record).
    A mixture of experts' grouped GEMMs in fp32 (a quantized base leaves the fused experts unquantized and
    prepare_model_for_kbit_training casts them to fp32) take aten's fallback, which reads the per-expert offsets
    to the host: answered as measure_stub.py answers them (its moe_offsets_readback, the record's
    `moe_offsets_readback`), else every expert would read as empty and run no GEMM.
  * "fake-cuda" (cross-check, NOT WORKING YET): measure.py's method (FakeTensorMode on device cuda, its
    dispatch-mode tracker with 512-byte blocks and its hidden allocations); bitsandbytes would run through its
    torch.library fake registrations. It fails in get_peft_model: peft moves each new adapter with Module.to, which
    swaps fake parameters in place (torch.utils.swap_tensors), and swap_tensors refuses a tensor with a weak
    reference ("Cannot swap t1 because it has weakref associated with it"). --trace DIR would write every
    allocation and free of each case.

Case fields: "model": {"hf": {...config.json...}}; "train": batch_size, seq_len, precision ("fp32", "bf16-amp",
"fp16-amp", or "bf16": everything bf16, adapters included, the model cast after peft wrapped it), base_dtype
("fp32", "bf16", "fp16"; default fp32, bf16 for precision bf16 and for quantized bases), optimizer ("adamw",
"adamw8bit", "paged_adamw8bit", "paged_adamw", "adafactor", "lion", "lion8bit", "sgd", "sgd-momentum"),
checkpointing; "lora": LoraConfig's fields; "quant" (optional): {"bits": 4, "quant_type": "nf4"|"fp4",
"double_quant": bool, "compute_dtype": "bf16"} or {"bits": 8, "threshold": 6.0}.
Quantized bases are built as transformers' bitsandbytes loading leaves them: every nn.Linear of the decoder (not
the output head) replaced by bnb.nn.Linear4bit / Linear8bitLt holding the bf16 weight, moved to the device (which
quantizes it), marked is_loaded_in_4bit / is_loaded_in_8bit as transformers' quantizer marks a loaded model (peft
reads the flags: checkpointing in prepare_model_for_kbit_training, its bnb LoRA layers in get_peft_model), then
peft.prepare_model_for_kbit_training (norms, embeddings and head upcast to fp32; checkpointing with use_reentrant
False and input gradients when the case asks) before get_peft_model.
Only this script needs PyTorch, peft and bitsandbytes; vramfit and its tests never do.
"""
import json
import os
import subprocess
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STUB_CACHE = os.path.join(ROOT, ".venv-measure", "stub-cuda")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_managed_stub():
    """stubs/bnb_extra.c -> a library defining cudaMallocManaged (see there); built once per source version."""
    import hashlib
    src = os.path.join(HERE, "stubs", "bnb_extra.c")
    tag = hashlib.sha256(open(src, "rb").read()).hexdigest()[:12]
    out = os.path.join(STUB_CACHE, "bnb-extra-" + tag, "libvramfit_bnb_extra.so")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", out, src], check=True)
    return out


# --------------------------------------------------------------------------------------------------------------
# The child: one case in its own process.
def child(case, method, snapshot_path, trace_path):
    import ctypes
    managed = None
    if method == "stub-cuda":
        import stub_cuda
        managed = ctypes.CDLL(build_managed_stub(), mode=ctypes.RTLD_GLOBAL)  # before the stubs: its symbols win
        for f in ("vramfit_managed_bytes", "vramfit_managed_peak", "vramfit_managed_count"):
            getattr(managed, f).restype = ctypes.c_size_t
        stub_cuda.preload(stub_cuda.build(STUB_CACHE))
        os.environ["VRAMFIT_REAL_CUDA"] = "1"
        os.environ["VRAMFIT_NO_TRACKER"] = "1"
        if case["train"].get("attention") == "flash_attention_2":
            # HF's flash_attention_2: the flash-attn package, its CUDA extension replaced (fake_flash_attn.py)
            import fake_flash_attn
            case["_flash_attn_version"] = fake_flash_attn.install()
    elif trace_path:
        os.environ["VRAMFIT_TRACE"] = trace_path
    import torch
    import measure
    import transformers
    import peft
    import accelerate
    import bitsandbytes as bnb
    readback = None
    if method == "stub-cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
        import transformers.masking_utils as mu
        mu.find_packed_sequence_indices = lambda *a, **k: None
        # A mixture of experts' grouped GEMMs in any dtype but bf16 (a quantized base's experts, fp32 after
        # prepare_model_for_kbit_training) read their per-expert offsets to the host: answered as a GPU answers
        # them under the forced routing, as measure_stub.py does (its moe_offsets_readback).
        import measure_stub
        readback = measure_stub.moe_offsets_readback(torch, measure)
    steps = []

    def after_step(step, tracker):
        if readback is not None:
            readback.clear()
        if method == "stub-cuda":
            steps.append({"step": step, **stub_cuda.step_stats(torch),
                          **({"managed_bytes_after": managed.vramfit_managed_bytes()} if managed else {})})
        else:
            steps.append({"step": step, "peak_allocated_bytes": tracker.step_peaks.get(f"step{step}", 0),
                          "allocated_bytes_after": tracker.live})

    if snapshot_path:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    out = run_case(case, method, after_step, torch, measure, peft, bnb)
    if snapshot_path:
        torch.cuda.memory._dump_snapshot(snapshot_path)
        torch.cuda.memory._record_memory_history(enabled=None)
    if trace_path and measure.TRACE is not None:
        with open(trace_path, "w") as f:
            for ev in measure.TRACE:
                f.write("%-22s %-70s %+12d %12d #%d\n" % ev)
    measured = {"peak_allocated_bytes": max(s["peak_allocated_bytes"] for s in steps)}
    if method == "stub-cuda":
        st = torch.cuda.memory_stats()
        measured.update(peak_reserved_bytes=max(s["peak_reserved_bytes"] for s in steps),
                        peak_segments=max(s["peak_segments"] for s in steps),
                        num_alloc_retries=st.get("num_alloc_retries", 0), num_ooms=st.get("num_ooms", 0),
                        managed_bytes=managed.vramfit_managed_peak(),
                        managed_allocations=managed.vramfit_managed_count())
    else:
        measured.update(peak_phase=out.pop("peak_phase"), peak_op=out.pop("peak_op"),
                        at_peak=out.pop("at_peak"), hidden_allocations=out.pop("hidden_allocations"))
    measured["allocated_bytes_before_step1"] = out.pop("allocated_before")
    measured["steps"] = steps
    cc = torch.cuda.get_device_capability()
    props = torch.cuda.get_device_properties(0)
    return {
        "measured": measured,
        "method": method,
        "torch_version": torch.__version__,
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bnb.__version__, "accelerate": accelerate.__version__,
                     **({"flash_attn": case["_flash_attn_version"]} if "_flash_attn_version" in case else {})},
        **({"derived": __import__("fake_flash_attn").DERIVED,
            "flash_attn_calls": dict(__import__("fake_flash_attn").CALLS)} if "_flash_attn_version" in case else {}),
        "device": {"name": props.name, "compute_capability": f"{cc[0]}.{cc[1]}",
                   "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory}
        if method == "stub-cuda" else "simulated sm_%d%d CUDA device, cuBLAS workspace %d KiB per GEMM"
        % (*cc, measure.cublas_workspace_bytes() // 1024),
        "sdpa_backends": "cuDNN attention off (not stubbable): flash, else memory-efficient, else math",
        **({"moe_offsets_readback": readback.record()} if readback is not None and readback.calls else {}),
        **out,
    }


def quantize_linears(model, q, torch, bnb):
    """Every nn.Linear of the decoder but the output head -> bnb Linear4bit / Linear8bitLt holding its weight (on the
    host), as transformers' bitsandbytes integration does (lm_head is left out there too). Moved to the device later,
    which quantizes."""
    head = model.get_output_embeddings()
    names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not head]
    for name in names:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        old = getattr(parent, name.rsplit(".", 1)[-1])
        bias = old.bias is not None
        if q["bits"] == 4:
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=bias,
                                    compute_dtype=getattr(torch, DTYPES[q.get("compute_dtype", "bf16")]),
                                    compress_statistics=q.get("double_quant", False),
                                    quant_type=q.get("quant_type", "nf4"), device="cpu")
            new.weight = bnb.nn.Params4bit(old.weight.data.to("cpu"), requires_grad=False,
                                           compress_statistics=q.get("double_quant", False),
                                           quant_type=q.get("quant_type", "nf4"), module=new)
        else:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=bias, has_fp16_weights=False,
                                      threshold=q.get("threshold", 6.0), device="cpu")
            new.weight = bnb.nn.Int8Params(old.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
        if bias:
            new.bias = torch.nn.Parameter(old.bias.data.to("cpu"), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], new)
    return len(names)


def make_optimizer(name, params, torch, bnb):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=2e-4, foreach=True)
    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=2e-4)
    if name == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    if name == "paged_adamw":
        return bnb.optim.PagedAdamW(params, lr=2e-4)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=1e-2, foreach=True)
    if name == "lion":
        return bnb.optim.Lion(params, lr=1e-4)
    if name == "lion8bit":
        return bnb.optim.Lion8bit(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, foreach=True)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    raise ValueError(name)


def param_summary(model, torch):
    """Trainable and frozen parameters: counts (a 4-bit weight counts its logical elements) and bytes by dtype."""
    out = {"trainable": 0, "total": 0, "trainable_bytes": {}, "frozen_bytes": {}, "quantized_weights": {}}
    for n, p in model.named_parameters():
        cls = type(p).__name__
        logical = p.numel()
        if cls == "Params4bit" and getattr(p, "quant_state", None) is not None:
            logical = p.quant_state.shape.numel()
        out["total"] += logical
        key = "trainable_bytes" if p.requires_grad else "frozen_bytes"
        dt = str(p.dtype).replace("torch.", "")
        out[key][dt] = out[key].get(dt, 0) + p.numel() * p.element_size()
        if p.requires_grad:
            out["trainable"] += logical
        if cls in ("Params4bit", "Int8Params"):
            q = out["quantized_weights"].setdefault(cls, {"count": 0, "elements": 0, "storage_bytes": 0})
            q["count"] += 1
            q["elements"] += logical
            q["storage_bytes"] += p.numel() * p.element_size()
    return out


def quant_state_summary(model, torch):
    """One example of each quantized weight's storage: shapes and dtypes of what bitsandbytes keeps beside it."""
    for mod in model.modules():
        if not type(mod).__module__.startswith("bitsandbytes"):
            continue  # peft's wrappers forward .weight to the base layer
        w = getattr(mod, "weight", None)
        if type(w).__name__ == "Params4bit" and w.quant_state is not None:
            qs = w.quant_state
            d = {"module": type(mod).__name__, "logical_shape": list(qs.shape), "packed": [list(w.shape), str(w.dtype)],
                 "blocksize": qs.blocksize, "quant_type": qs.quant_type, "dtype": str(qs.dtype),
                 "absmax": [list(qs.absmax.shape), str(qs.absmax.dtype)], "code": [list(qs.code.shape)]}
            if qs.nested:
                d["nested"] = {"absmax": [list(qs.state2.absmax.shape), str(qs.state2.absmax.dtype)],
                               "blocksize": qs.state2.blocksize, "code": [list(qs.state2.code.shape)],
                               "offset": [list(qs.offset.shape), str(qs.offset.dtype), str(qs.offset.device)]}
            return d
        if type(w).__name__ == "Int8Params":
            scb = getattr(w, "SCB", None)
            return {"module": type(mod).__name__, "weight": [list(w.shape), str(w.dtype)],
                    "SCB": [list(scb.shape), str(scb.dtype)] if scb is not None else None,
                    "threshold": mod.state.threshold}
    return None


def optimizer_state_summary(opt, torch):
    """Optimizer state by key: tensors, elements and bytes on the device (and paged host-side managed tensors)."""
    out = {}
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                e = out.setdefault(k, {"tensors": 0, "bytes": 0, "dtypes": []})
                e["tensors"] += 1
                e["bytes"] += v.numel() * v.element_size()
                dt = str(v.dtype).replace("torch.", "") + ("/paged" if getattr(v, "is_paged", False) else "")
                if dt not in e["dtypes"]:
                    e["dtypes"].append(dt)
    return out


def run_case(case, method, after_step, torch, measure, peft, bnb):
    m, tr, lc, q = case["model"], case["train"], case["lora"], case.get("quant")
    precision, opt_name = tr["precision"], tr["optimizer"]
    B, T = tr["batch_size"], tr["seq_len"]
    ckpt = bool(tr.get("checkpointing", False))
    base_dtype = tr.get("base_dtype", "bf16" if (precision == "bf16" or q) else "fp32")
    fake = method == "fake-cuda"
    if fake:
        tracker = measure.Tracker()
        tracker.set_sub = lambda s: setattr(tracker, "phase", tracker.phase.split(":")[0] + ":" + s)
        tracker.compiled = False
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        mode.__enter__()
        measure.watch_storages(mode, tracker)
        measure.F.scaled_dot_product_attention = measure.sdpa_as_cuda
        torch.amp.GradScaler._maybe_opt_step = lambda self, opt, st, *a, **k: opt.step(*a, **k)
        tracker.__enter__()
    else:
        tracker = types.SimpleNamespace(compiled=False, set_sub=lambda s: None)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # The base in its dtype: on the device, or (quantized) on the host first, as a checkpoint is loaded.
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, DTYPES[base_dtype]))
    with torch.device("cpu" if q else "cuda"):
        model = measure.build_hf(m["hf"], tr.get("attention", "sdpa"), False, tracker)
    torch.set_default_dtype(old)
    hf_info = model.vramfit_hf
    n_quant = 0
    if q:
        n_quant = quantize_linears(model, q, torch, bnb)
        model = model.to("cuda")  # quantizes every Params4bit / Int8Params on the way
        # What transformers' bitsandbytes quantizer sets once the weights are loaded
        # (Bnb4BitHfQuantizer/Bnb8BitHfQuantizer._process_model_after_weight_loading). Two library paths read it:
        # prepare_model_for_kbit_training enables gradient checkpointing (and input gradients) only for a model
        # loaded in k-bit, and peft's LoRA dispatch wraps a bnb Linear in its own lora.bnb.Linear4bit /
        # Linear8bitLt (no cast of x to the adapters' dtype under autocast; 4-bit clones the base output) only
        # when the model says so, else in the generic lora.Linear. Before this line both ran the wrong path.
        setattr(model, "is_loaded_in_4bit" if q["bits"] == 4 else "is_loaded_in_8bit", True)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    elif ckpt:
        # transformers 5.24 also calls enable_input_require_grads() here (every input_ids model).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(task_type="CAUSAL_LM", **lc)
    model = peft.get_peft_model(model, lora)
    if precision == "bf16":
        model = model.to(torch.bfloat16)  # pure bf16: adapters too
    model.train()
    params_info = param_summary(model, torch)
    qinfo = quant_state_summary(model, torch) if q else None

    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(opt_name, params, torch, bnb)
    amp_dtype = {"fp16-amp": torch.float16, "bf16-amp": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=(precision == "fp16-amp"))
    vocab = hf_info["config"]["vocab_size"]

    def autocast():
        if amp_dtype is None:
            return torch.autocast("cuda", enabled=False)
        return torch.autocast("cuda", dtype=amp_dtype)

    allocated_before = tracker.live if fake else torch.cuda.memory_allocated()
    if not fake:
        torch.cuda.reset_peak_memory_stats()
    for step in (1, 2, 3):
        x = torch.randint(vocab, (B, T), device="cuda")
        y = torch.randint(vocab, (B, T), device="cuda")
        tracker.phase = f"step{step}:forward"
        with autocast():
            loss = model(input_ids=x, labels=y).loss
        tracker.phase = f"step{step}:backward"
        scaler.scale(loss).backward()
        del loss, x, y
        tracker.phase = f"step{step}:optimizer"
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        after_step(step, tracker)

    out = {"allocated_before": allocated_before}
    if fake:
        param_ids = {id(p.untyped_storage()) for p in model.parameters()}
        state_ids = {id(v.untyped_storage()) for st in opt.state.values() for v in st.values()
                     if isinstance(v, torch.Tensor)}
        cats = {}
        for key, (nbytes, phase, op) in tracker.peak_snapshot.items():
            c = ("weights" if key in param_ids else "optimizer" if key in state_ids else
                 "hidden:" + op if isinstance(key, tuple) else phase.split(":", 1)[-1] + ":" + op)
            cats[c] = cats.get(c, 0) + nbytes
        tracker.__exit__(None, None, None)
        out.update(peak_phase=tracker.peak_phase, peak_op=tracker.peak_op,
                   at_peak=dict(sorted(cats.items(), key=lambda kv: -kv[1])),
                   hidden_allocations=sorted({h["name"] for h in tracker.hidden}))
    lcd = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora.to_dict().items()}
    lcd = {k: v for k, v in lcd.items() if v not in (None, {}, []) or k in ("modules_to_save",)}
    base_layers = sum(1 for mod in model.modules() if isinstance(mod, peft.tuners.lora.LoraLayer))
    out.update({
        "params": params_info,
        "lora_config": json.loads(json.dumps(lcd, default=str)),
        "lora_layers": base_layers,
        "base_dtype": base_dtype,
        **({"quantized_linears": n_quant, "quant_state": qinfo} if q else {}),
        "optimizer": {"class": type(opt).__module__ + "." + type(opt).__name__,
                      "state": optimizer_state_summary(opt, torch)},
        "hf": {k: v for k, v in hf_info.items() if k != "transformers_version"},
    })
    return out


# --------------------------------------------------------------------------------------------------------------
# --probe OUT.json: what autograd keeps for one Linear of each kind (frozen base, LoRA adapter, 4-bit and 8-bit
# bases), on the stub device. Each scenario runs one forward and backward of a layer on an input that needs a
# gradient (as inside a network): the tensors autograd saves (torch.autograd.graph.saved_tensors_hooks: shape,
# dtype, bytes, and whether each is the input, a parameter, the output or new), the grad_fn nodes, and PyTorch's
# counters: bytes kept alive by the graph after the forward (beyond the input and output), the forward's and the
# backward's peaks above what was live before each. bitsandbytes' MatMul4Bit keeps its packed weight as a ctx
# attribute (not save_for_backward): the hooks do not see it, the counters do (it is a parameter: no new byte).
PROBE = [
    # name, base ("linear", "nf4", "nf4-dq", "int8"), base dtype, adapter (None or (r, dropout, dtype)), autocast,
    # input dtype
    ("frozen-linear-bf16", "linear", "bf16", None, None, "bf16"),
    ("frozen-linear-fp32", "linear", "fp32", None, None, "fp32"),
    ("frozen-linear-fp32-autocast-bf16", "linear", "fp32", None, "bf16", "fp32"),
    ("frozen-linear-bf16-autocast-bf16-input-fp32", "linear", "bf16", None, "bf16", "fp32"),
    ("lora-r16-nodrop-bf16base-fp32adapter-autocast", "linear", "bf16", (16, 0.0, "fp32"), "bf16", "bf16"),
    ("lora-r16-drop05-bf16base-fp32adapter-autocast", "linear", "bf16", (16, 0.05, "fp32"), "bf16", "bf16"),
    ("lora-r16-nodrop-bf16base-fp32adapter-no-autocast", "linear", "bf16", (16, 0.0, "fp32"), None, "bf16"),
    ("lora-r16-drop05-pure-bf16", "linear", "bf16", (16, 0.05, "bf16"), None, "bf16"),
    ("lora-r16-nodrop-pure-bf16", "linear", "bf16", (16, 0.0, "bf16"), None, "bf16"),
    ("lora-r16-drop05-fp32", "linear", "fp32", (16, 0.05, "fp32"), None, "fp32"),
    ("lora-r16-drop05-fp16base-fp32adapter-autocast-fp16", "linear", "fp16", (16, 0.05, "fp32"), "fp16", "fp16"),
    ("frozen-nf4", "nf4", "bf16", None, "bf16", "bf16"),
    ("frozen-nf4-dq", "nf4-dq", "bf16", None, "bf16", "bf16"),
    ("frozen-nf4-dq-input-fp32", "nf4-dq", "bf16", None, "bf16", "fp32"),
    ("qlora-nf4-dq-r16-drop05", "nf4-dq", "bf16", (16, 0.05, "fp32"), "bf16", "bf16"),
    ("qlora-nf4-dq-r16-nodrop", "nf4-dq", "bf16", (16, 0.0, "fp32"), "bf16", "bf16"),
    ("frozen-int8", "int8", "bf16", None, "bf16", "bf16"),
    ("lora-int8-r16-drop05", "int8", "bf16", (16, 0.05, "fp32"), "bf16", "bf16"),
]


def probe(out_path):
    import ctypes  # noqa: F401
    import stub_cuda
    stub_cuda.preload(stub_cuda.build(STUB_CACHE))
    import torch
    import peft
    import bitsandbytes as bnb
    B, T, K, N = 4, 512, 512, 1536
    dt = {k: getattr(torch, v) for k, v in DTYPES.items()}
    records = []
    for name, base, bdt, adapter, ac, xdt in PROBE:
        torch.manual_seed(0)
        lin = torch.nn.Linear(K, N, bias=False, dtype=dt[bdt])
        if base.startswith("nf4"):
            layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                      compress_statistics=base == "nf4-dq", device="cpu")
            layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=base == "nf4-dq", module=layer)
        elif base == "int8":
            layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=6.0, device="cpu")
            layer.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            layer = lin
        holder = torch.nn.Sequential()
        holder.add_module("proj", layer)
        holder = holder.to("cuda")
        for p in holder.parameters():
            p.requires_grad_(False)
        if base != "linear":  # as transformers' quantized loading marks the model (see run_case): peft's bnb layers
            setattr(holder, "is_loaded_in_8bit" if base == "int8" else "is_loaded_in_4bit", True)
        if adapter:
            r, drop, adt = adapter
            holder = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=drop,
                                                                 target_modules=["proj"]))
            if adt == "bf16":
                holder = holder.to(torch.bfloat16)
        holder.train()
        params = {p.untyped_storage().data_ptr() for p in holder.parameters()}
        x0 = torch.randn(B, T, K, device="cuda", dtype=dt[xdt], requires_grad=True)
        x = x0 * 1.0  # an input produced by an upstream op, needing a gradient
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        saved = []

        def pack(t):
            saved.append(t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cuda", dtype=dt[ac] if ac else torch.float32, enabled=bool(ac)):
                y = holder(x)
        fwd_peak = torch.cuda.max_memory_allocated() - before
        after = torch.cuda.memory_allocated()
        ystore = y.untyped_storage().data_ptr()
        out_bytes = (y.untyped_storage().nbytes() + 511) // 512 * 512
        kinds, seen = [], set()
        for t in saved:
            ptr = t.untyped_storage().data_ptr()
            kind = ("input" if ptr == x.untyped_storage().data_ptr() else "parameter" if ptr in params else
                    "output" if ptr == ystore else "new")
            if (ptr, tuple(t.shape), t.dtype) in seen:
                continue
            seen.add((ptr, tuple(t.shape), t.dtype))
            kinds.append({"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                          "bytes": t.untyped_storage().nbytes() if t.device.type == "cuda" else 0,
                          "device": t.device.type, "is": kind})
        nodes, stack, visited = [], [y.grad_fn], set()
        while stack:
            f = stack.pop()
            if f is None or f in visited:
                continue
            visited.add(f)
            nodes.append(type(f).__name__ if type(f).__name__ not in ("BackwardCFunction",) else str(f.name()))
            stack.extend(g for g, _ in f.next_functions)
        del saved
        g = torch.ones_like(y)
        torch.cuda.synchronize()
        before_bwd = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y.backward(g)
        torch.cuda.synchronize()
        bwd_peak = torch.cuda.max_memory_allocated() - before_bwd
        grads = {n: [list(p.grad.shape), str(p.grad.dtype).replace("torch.", "")]
                 for n, p in holder.named_parameters() if p.grad is not None}
        rec = {"name": name, "base": base, "base_dtype": bdt, "adapter": adapter, "autocast": ac, "input_dtype": xdt,
               "shape": {"B": B, "T": T, "in": K, "out": N},
               "output": [list(y.shape), str(y.dtype).replace("torch.", ""), out_bytes],
               "saved": kinds, "grad_fn_nodes": nodes,
               "kept_after_forward_bytes": after - before - out_bytes,
               "forward_peak_above_before_bytes": fwd_peak,
               "backward_peak_above_before_bytes": bwd_peak,
               "input_grad": [list(x0.grad.shape), str(x0.grad.dtype).replace("torch.", "")] if x0.grad is not None
               else None,
               "param_grads": grads}
        records.append(rec)
        print(f"{name:50s} kept {rec['kept_after_forward_bytes'] / 2**20:7.3f} MiB  fwd peak "
              f"{fwd_peak / 2**20:7.3f}  bwd peak {bwd_peak / 2**20:7.3f}  saved "
              + ", ".join(f"{k['is']}:{k['dtype']}{k['shape']}" for k in kinds), flush=True)
        del holder, x, x0, y, g, layer, lin
        torch.cuda.empty_cache()
    json.dump({"method": "stub-cuda", "torch_version": torch.__version__,
               "versions": {"peft": peft.__version__, "bitsandbytes": bnb.__version__},
               "note": "one Linear per scenario, input [B, T, in] needing a gradient; bytes are PyTorch's counters "
                       "(512-byte blocks) on the stub device",
               "records": records}, open(out_path, "w"), indent=1)


# --------------------------------------------------------------------------------------------------------------
def fake_env():
    """measure.py's no-GPU stub (cuda_stub.c) preloaded for the fake-cuda method, as measure.ensure_stub does."""
    import importlib.util
    site = os.path.dirname(os.path.dirname(importlib.util.find_spec("torch").origin))
    out_dir = tempfile.mkdtemp(prefix="vramfit-stub-")
    lib = os.path.join(out_dir, "libcuda.so.1")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-I" + os.path.join(site, "nvidia", "cu13", "include"),
                    "-I" + os.path.join(site, "triton", "backends", "nvidia", "include"), "-Wl,-soname,libcuda.so.1",
                    "-o", lib, os.path.join(HERE, "cuda_stub.c")], check=True)
    os.symlink(lib, os.path.join(out_dir, "libcuda.so"))
    return {"LD_PRELOAD": lib, "LD_LIBRARY_PATH": out_dir + ":" + os.environ.get("LD_LIBRARY_PATH", ""),
            "VRAMFIT_STUB_LOADED": "1", "TRITON_LIBCUDA_PATH": out_dir}


def main():
    args = sys.argv[1:]
    if args and args[0] == "--probe":
        sys.path.insert(0, HERE)
        return probe(args[1])
    if args and args[0] == "--child":
        rec = child(json.loads(args[1]), args[2], args[3] or None, args[4] or None)
        print("VRAMFIT-RECORD " + json.dumps(rec), flush=True)
        return
    cases = json.load(open(args[0]))
    out_path = args[1]
    only = args[args.index("--only") + 1] if "--only" in args else None
    method = args[args.index("--method") + 1] if "--method" in args else "stub-cuda"
    snaps = args[args.index("--snapshots") + 1] if "--snapshots" in args else None
    traces = args[args.index("--trace") + 1] if "--trace" in args else None
    redo = "--redo" in args
    results = json.load(open(out_path)) if os.path.exists(out_path) else {"records": []}
    done = {r["name"] for r in results["records"]}
    if only:
        by_name = {c["name"]: c for c in cases}
        cases = [by_name[n] for n in only.split(",") if n in by_name]
    env = {k: v for k, v in os.environ.items() if k not in ("VRAMFIT_STUB_SMS", "VRAMFIT_STUB_MEM_MIB")}
    env.update(VRAMFIT_STUB_CC="9.0", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if method == "fake-cuda":
        env.update(fake_env())
    for case in cases:
        if not only and not redo and case["name"] in done:
            continue
        snap = os.path.join(os.path.abspath(snaps), case["name"] + ".pickle") if snaps else ""
        trace = os.path.join(os.path.abspath(traces), case["name"] + ".trace") if traces else ""
        for d in (snaps, traces):
            if d:
                os.makedirs(d, exist_ok=True)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(case), method, snap,
                            trace], env=env, capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("VRAMFIT-RECORD ")]
        if p.returncode != 0 or not lines:
            print(f"{case['name']:44s} FAILED (exit {p.returncode})\n{p.stderr[-3000:]}", flush=True)
            continue
        rec = {"name": case["name"], "setup": {k: case[k] for k in ("model", "train", "lora", "quant") if k in case},
               **json.loads(lines[-1][len("VRAMFIT-RECORD "):])}
        if snap:
            subprocess.run(["gzip", "-9f", snap], check=True)
            rec["snapshot"] = os.path.relpath(snap + ".gz", os.path.dirname(os.path.abspath(out_path)))
        results["records"] = [r for r in results["records"] if r["name"] != case["name"]] + [rec]
        mm = rec["measured"]
        print(f"{case['name']:44s} allocated {mm['peak_allocated_bytes'] / 2**20:9.2f} MiB"
              + (f"  reserved {mm['peak_reserved_bytes'] / 2**20:9.2f} MiB  managed "
                 f"{mm['managed_bytes'] / 2**20:7.2f} MiB" if "peak_reserved_bytes" in mm else
                 f"  at {mm['peak_phase']} ({mm['peak_op']})"), flush=True)
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
