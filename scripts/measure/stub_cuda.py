"""The stub-cuda method: PyTorch's real CUDA code, caching allocator included, on a GPU that does not exist.

`preload(dir)` must run before `import torch`: it loads the stub libraries built by stubs/build.py under the real
sonames with RTLD_GLOBAL, so that when torch's libraries ask for libcudart.so.13, libcublas.so.13, ... the dynamic
linker finds them already loaded (torch's RPATH would otherwise win over LD_LIBRARY_PATH). libcuda.so.1 and
libnvidia-ml.so.1 come with a GPU driver and are looked up by name; Triton links its launcher against the
libcuda.so that TRITON_LIBCUDA_PATH names.
"""
import ctypes
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["libcuda.so.1", "libnvidia-ml.so.1", "libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13"]


def build(cache_root):
    """Builds the stubs once per source version into cache_root/<digest>; returns that directory."""
    sys.path.insert(0, os.path.join(HERE, "stubs"))
    import build as b  # noqa: E402  (stubs/build.py)
    out = os.path.join(cache_root, b.digest())
    if not os.path.exists(os.path.join(out, "libcublas.so.13")):
        subprocess.run([sys.executable, os.path.join(HERE, "stubs", "build.py"), out], check=True)
    return out


def preload(stub_dir):
    for name in ORDER:
        ctypes.CDLL(os.path.join(stub_dir, name), mode=ctypes.RTLD_GLOBAL)
    os.environ["TRITON_LIBCUDA_PATH"] = stub_dir


def step_stats(torch):
    """PyTorch's allocator counters at the end of a training step (after a synchronize): the step's peaks, the
    most segments held, what stays allocated and reserved; then the peaks are reset for the next step."""
    torch.cuda.synchronize()
    st = torch.cuda.memory_stats()
    stats = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
             "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
             "peak_segments": st.get("segment.all.peak", 0),
             "allocated_bytes_after": torch.cuda.memory_allocated(),
             "reserved_bytes_after": torch.cuda.memory_reserved()}
    torch.cuda.reset_peak_memory_stats()
    return stats
