#!/usr/bin/env python3
"""The founding case as its owner ran nanoGPT's train.py (6 x 384, block 512, batch 16, vocab 50304, fp16 autocast,
fused AdamW, torch.compile, gradient accumulation 4, an RTX 4070 = sm_89), with and without the evaluation that
train.py runs before its first step (`estimate_loss()` at iteration 0: `model.eval()`, `torch.no_grad()`, forward
with targets under autocast on eval batches of both splits), on the stub-cuda method (PyTorch's own caching
allocator, see measure_stub.py). Three training steps follow, as in measure.py's nanoGPT loop.

Usage:  seed_run_eval.py OUT.json        (each variant in its own process; about 2 minutes each on 2 cores)
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# estimate_loss's eval_iters is 200 in train.py; every evaluation batch allocates the same, so two per split
# leave the allocator as two hundred would.
EVAL_ITERS = 2


def child(eval_iters):
    import types
    import stub_cuda
    stub_cuda.preload(stub_cuda.build(os.path.join(ROOT, ".venv-measure", "stub-cuda")))
    os.environ.update(VRAMFIT_REAL_CUDA="1", VRAMFIT_NO_TRACKER="1")
    import torch
    import measure
    torch.backends.cuda.enable_cudnn_sdp(False)
    m = dict(n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=50304, bias=False, dropout=0.0)
    with torch.device("cuda"):
        model = measure.GPT(m, "sdpa", False, types.SimpleNamespace(set_sub=lambda s: None))
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=True)
    model = torch.compile(model)
    ctx = lambda: torch.autocast("cuda", dtype=torch.float16)  # noqa: E731
    B, T, V, accum = 16, 512, 50304, 4

    def get_batch():
        return torch.randint(V, (B, T), device="cuda"), torch.randint(V, (B, T), device="cuda")

    X, Y = get_batch()
    if eval_iters:
        with torch.no_grad():
            model.eval()
            for _split in ("train", "val"):
                for _ in range(eval_iters):
                    Xe, Ye = get_batch()
                    with ctx():
                        logits, loss = model(Xe, Ye)
                    loss.item()
            model.train()
    after_eval = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    steps = []
    for step in (1, 2, 3):
        for _ in range(accum):
            with ctx():
                logits, loss = model(X, Y)
                loss = loss / accum
            X, Y = get_batch()
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        steps.append({"step": step, "max_allocated": torch.cuda.max_memory_allocated(),
                      "max_reserved": torch.cuda.max_memory_reserved()})
    import triton
    return {"eval_iters_per_split": eval_iters, "after_eval": after_eval, "steps": steps,
            "peak_allocated_bytes": steps[-1]["max_allocated"], "peak_reserved_bytes": steps[-1]["max_reserved"],
            "torch_version": torch.__version__, "triton_version": triton.__version__,
            "device": torch.cuda.get_device_properties(0).name}


def main():
    if sys.argv[1] == "--child":
        print("VRAMFIT-RECORD " + json.dumps(child(int(sys.argv[2]))), flush=True)
        return
    runs = []
    for n in (0, EVAL_ITERS):
        env = dict(os.environ, VRAMFIT_STUB_CC="8.9", PYTHONPATH=HERE)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(n)], env=env,
                           capture_output=True, text=True, check=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("VRAMFIT-RECORD ")][-1]
        runs.append(json.loads(line[len("VRAMFIT-RECORD "):]))
        print(n, runs[-1]["peak_allocated_bytes"] / 2**20, runs[-1]["peak_reserved_bytes"] / 2**20, flush=True)
    json.dump({"method": "stub-cuda", "script": "scripts/measure/seed_run_eval.py", "runs": runs},
              open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
