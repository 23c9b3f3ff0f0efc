#!/usr/bin/env python3
"""Which SDPA backend PyTorch's own chooser (`torch._fused_sdp_choice`, cuDNN attention enabled as by default)
picks for a causal training call on each GPU generation, asked on the stub-cuda device (the chooser reads the
device's compute capability and cuDNN's version; no kernel runs). Writes tests/data/stub-cuda/sdpa_choice.json.

Usage: sdpa_choice.py OUT.json        (runs itself once per compute capability)
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# The compute capabilities of vramfit's GPU presets: A100, RTX 30xx, RTX 40xx / L4, H100 / H200, B200, RTX 50xx.
CCS = ["8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]
NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}


def ask():
    sys.path.insert(0, HERE)
    import stub_cuda
    stub_cuda.preload(stub_cuda.build(os.path.join(ROOT, ".venv-measure", "stub-cuda")))
    import torch
    choice = {}
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for hs in (64, 128):
            q = torch.empty(2, 8, 256, hs, device="cuda", dtype=dt, requires_grad=True)
            c = int(torch._fused_sdp_choice(q, q, q, None, 0.0, True))
            choice[f"{str(dt).split('.')[1]}/head_dim {hs}"] = NAMES.get(c, str(c))
    cc = torch.cuda.get_device_capability()
    return {"compute_capability": f"{cc[0]}.{cc[1]}", "cudnn_version": torch.backends.cudnn.version(),
            "torch_version": torch.__version__, "choice": choice}


def main():
    if sys.argv[1:] == ["--ask"]:
        print(json.dumps(ask()))
        return
    rows = []
    for cc in CCS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--ask"], capture_output=True, text=True,
                             env=dict(os.environ, VRAMFIT_STUB_CC=cc), check=True).stdout
        rows.append(json.loads(out.splitlines()[-1]))
        print(rows[-1]["compute_capability"], rows[-1]["choice"], flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump({"method": "stub-cuda: torch._fused_sdp_choice, causal, requires_grad, B=2 H=8 T=256",
                   "records": rows}, f, indent=1)


if __name__ == "__main__":
    main()
