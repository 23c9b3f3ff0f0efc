#!/usr/bin/env python3
"""Builds the stub CUDA libraries of the stub-cuda method (PyTorch's real caching allocator on a GPU that does not
exist) with the system C compiler, and checks that every symbol torch imports from them is exported.

    build.py OUT_DIR          (OUT_DIR gets libcuda.so.1, libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
                               libnvidia-ml.so.1 and a libcuda.so link for Triton's launcher)

The hand-written functions are in driver.c, cudart.c, cublas.c and nvml.c. Every other function gets a weak
default that returns 0 (cudaSuccess, CUDA_SUCCESS, CUBLAS_STATUS_SUCCESS, NVML_SUCCESS), named after:
  * the real library's exports (`nm -D --defined-only`) for the runtime and cuBLAS, which the torch wheel ships,
    under the real library's symbol version (torch imports `cudaMalloc@libcudart.so.13`);
  * cuda.h's declarations, plus every driver and NVML name the torch and Triton binaries mention, for libcuda and
    NVML, which come with the GPU driver and are looked up by name at run time (dlsym, cudaGetDriverEntryPoint).
The check: for each stub soname, every symbol any shared object of the environment imports from it (with its
version) must be exported by the stub; every driver/NVML name torch or Triton looks up must be there too.
Only this measurement needs it; vramfit never does.
"""
import glob
import hashlib
import importlib.util
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SITE = os.path.dirname(os.path.dirname(importlib.util.find_spec("torch").origin))
CU = os.path.join(SITE, "nvidia", "cu13")
INCLUDE = os.path.join(CU, "include")
# cuda_runtime_api.h includes crt/host_defines.h, which the runtime wheel leaves out and Triton's wheel ships.
INCLUDES = ["-I", INCLUDE, "-I", os.path.join(SITE, "triton", "backends", "nvidia", "include")]

# soname -> (hand-written source, extra cflags, real library whose exports are mirrored, or None)
LIBS = {
    "libcuda.so.1": ("driver.c", [], None),
    "libcudart.so.13": ("cudart.c", [], "libcudart.so.13"),
    "libcublas.so.13": ("cublas.c", [], "libcublas.so.13"),
    "libcublasLt.so.13": ("cublas.c", ["-DSTUB_LT"], "libcublasLt.so.13"),
    "libnvidia-ml.so.1": ("nvml.c", [], None),
}


def sh(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def exports(path):
    """(name, is_function) for each defined dynamic symbol of a shared object, without its version."""
    out = []
    for line in sh("nm", "-D", "--defined-only", path).splitlines():
        parts = line.split()
        # type A: the version node itself, not a symbol
        if len(parts) >= 3 and parts[1] != "A":
            name = parts[2].split("@")[0]
            out.append((name, parts[1] in "TtWi"))
    return out


def shared_objects():
    """Every shared object the measurement may load: torch, Triton, the NVIDIA wheels, other extension modules."""
    seen = set()
    for pattern in ("**/*.so", "**/*.so.*"):
        for p in glob.glob(os.path.join(SITE, pattern), recursive=True):
            if os.path.isfile(p) and not os.path.islink(p):
                seen.add(p)
    replaced = {os.path.join(CU, "lib", s) for s in LIBS}
    return sorted(seen - replaced)


def imports_by_version(objs):
    """version node -> names imported with that version, over the objects that need a stubbed library."""
    by_version = {}
    for o in objs:
        if not set(needed(o)) & set(LIBS):
            continue
        try:
            text = sh("nm", "-D", "--undefined-only", o)
        except subprocess.CalledProcessError:
            continue
        for m in re.finditer(r"U (\w+)@([\w.\-]+)", text):
            by_version.setdefault(m.group(2), set()).add(m.group(1))
    return by_version


_needed = {}


def needed(o):
    if o in _needed:
        return _needed[o]
    try:
        _needed[o] = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", sh("readelf", "-d", o))
    except subprocess.CalledProcessError:
        _needed[o] = []
    return _needed[o]


def unversioned_imports_of(objs, soname):
    names = set()
    for o in objs:
        if soname in needed(o):
            names |= {m.group(1) for m in re.finditer(r"U (\w+)\s*$", sh("nm", "-D", "--undefined-only", o), re.M)}
    return names


def mentioned(objs):
    """Driver (`cu...`) and NVML (`nvml...`) names that appear as strings in torch's CUDA libraries and Triton's
    (functions looked up by name with dlsym or cudaGetDriverEntryPoint), read in one pass over the binaries."""
    names = set()
    for o in objs:
        base = os.path.basename(o)
        if not (base.startswith(("libc10_cuda", "libtorch_cuda", "libtorch_python", "libcaffe2_nvrtc"))
                or "triton" in o):
            continue
        names |= {m.decode() for m in re.findall(rb"\b(?:cu|nvml)[A-Z][A-Za-z0-9_]+\b", open(o, "rb").read())}
    return names


_driver_api = []


def driver_api_names():
    """Every function cuda.h declares (after its _v2 renaming macros), and the plain names those macros rename."""
    if _driver_api:
        return _driver_api[0]
    pre = sh("gcc", "-E", *INCLUDES, os.path.join(INCLUDE, "cuda.h"))
    names = set(re.findall(r"CUresult\s+(cu\w+)\s*\(", pre))
    raw = open(os.path.join(INCLUDE, "cuda.h")).read()
    names |= set(re.findall(r"#define\s+(cu[A-Z]\w*)\s+cu\w+", raw))
    _driver_api.append(names)
    return names


def handwritten(src, cflags):
    """Functions a hand-written source defines (from its compiled object), so defaults skip them."""
    obj = os.path.join(OUT, os.path.basename(src) + "".join(cflags) + ".o")
    subprocess.run(["gcc", "-c", "-fPIC", "-O1", "-Wall", *INCLUDES, "-I", HERE, *cflags, "-o", obj,
                    os.path.join(HERE, src)], check=True)
    return obj, {l.split()[2] for l in sh("nm", "--defined-only", "-g", obj).splitlines() if len(l.split()) >= 3}


def build(soname, names_fn, names_data):
    src, cflags, _ = LIBS[soname]
    obj, defined = handwritten(src, cflags)
    defaults = os.path.join(OUT, soname + ".defaults.c")
    with open(defaults, "w") as f:
        f.write("/* generated by build.py: weak defaults that report success */\n")
        for n in sorted(names_fn - defined):
            f.write(f"__attribute__((weak)) int {n}(void) {{ return 0; }}\n")
        for n in sorted(names_data - defined):
            f.write(f"__attribute__((weak)) char {n}[64];\n")
    version = []
    if LIBS[soname][2]:  # the runtime and cuBLAS version their symbols with their soname; the driver does not
        vs = os.path.join(OUT, soname + ".map")
        with open(vs, "w") as f:
            f.write(f"{soname} {{ global: *; }};\n")
        version = [f"-Wl,--version-script={vs}"]
    link = ["-L", OUT, "-l:libcuda.so.1"] if soname != "libcuda.so.1" else []
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", os.path.join(OUT, soname), f"-Wl,-soname,{soname}",
                    *version, obj, defaults, *link, "-ldl", "-lpthread"], check=True)


def main():
    objs = shared_objects()
    by_version = imports_by_version(objs)
    names = mentioned(objs)
    # A driver name counts when cuda.h declares it or it is a versioned entry point (cuFoo_v2) cuda.h renames to.
    driver_lookups = {n for n in names if n.startswith("cu") and (n in driver_api_names() or re.search(r"_v\d$", n))}
    nvml_lookups = {n for n in names if n.startswith("nvml")}
    cuda_imports = unversioned_imports_of(objs, "libcuda.so.1")
    for soname, (_, _, real) in LIBS.items():
        if real:
            ex = exports(os.path.join(CU, "lib", real))
            fns = {n for n, is_fn in ex if is_fn}
            data = {n for n, is_fn in ex if not is_fn}
        elif soname == "libcuda.so.1":
            fns, data = driver_api_names() | driver_lookups | cuda_imports, set()
        else:
            fns, data = nvml_lookups, set()
        build(soname, fns, data)
    # Triton links its launcher against "libcuda.so" in the directory TRITON_LIBCUDA_PATH names.
    link = os.path.join(OUT, "libcuda.so")
    if not os.path.lexists(link):
        os.symlink("libcuda.so.1", link)

    missing = []
    for soname in LIBS:
        got = {n for n, _ in exports(os.path.join(OUT, soname))}
        need = set(by_version.get(soname, ()))
        if soname == "libcuda.so.1":
            need |= cuda_imports | driver_lookups
        if soname == "libnvidia-ml.so.1":
            need |= nvml_lookups
        missing += [f"{soname}: {n}" for n in sorted(need - got)]
        print(f"{soname}: {len(got)} exported, {len(need)} imported or looked up by torch/Triton, all present"
              if not need - got else f"{soname}: MISSING {len(need - got)}")
    if missing:
        sys.exit("stub libraries lack symbols torch imports:\n  " + "\n  ".join(missing))


def digest():
    h = hashlib.sha256()
    for name in sorted(os.listdir(HERE)):
        if name.endswith((".c", ".h", ".py")):
            h.update(name.encode() + open(os.path.join(HERE, name), "rb").read())
    h.update(SITE.encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    OUT = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)
    main()
