#!/usr/bin/env python3
"""The graphs Inductor's memory-ordering pass weighs for reference cases, recorded as data (inductor_graphs.py).

Usage:  measure_inductor_graphs.py CASES.json OUT_DIR --only NAME[,NAME...]

Each case runs once, in its own process as measure_stub.py runs it (the stub device of its compute capability),
with an empty Inductor cache of its own so that every graph is compiled there. OUT_DIR/NAME.json: the method,
the versions and each compiled graph in the order compiled (the forward first, then the backward), as
inductor_graphs.py writes them.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure_stub  # noqa: E402


def main():
    args = sys.argv[1:]
    cases = {c["name"]: c for c in json.load(open(args[0]))}
    out_dir = args[1]
    names = args[args.index("--only") + 1].split(",")
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        case = cases[name]
        env = measure_stub.case_env(case)
        tmp = tempfile.mkdtemp(prefix="vramfit-graphs-")
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "cache")
        env["VRAMFIT_INDUCTOR_GRAPHS"] = os.path.join(tmp, "graphs")
        p = subprocess.run([sys.executable, os.path.join(HERE, "measure_stub.py"), "--child", json.dumps(case), ""],
                           env=env, capture_output=True, text=True)
        graphs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(tmp, "graphs", "*.json")))]
        shutil.rmtree(tmp, ignore_errors=True)
        if p.returncode != 0 or not graphs or "VRAMFIT-INDUCTOR-GRAPH-ERROR" in p.stdout:
            print(name, "failed:", (p.stdout + p.stderr)[-2000:], file=sys.stderr)
            continue
        versions = {g.pop("torch_version") for g in graphs}
        rec = {"case": name, "method": "stub-cuda, Inductor's reorder_for_peak_memory recorded "
               "(scripts/measure/inductor_graphs.py), cold Inductor cache",
               "torch_version": versions.pop(), "graphs": graphs}
        with open(os.path.join(out_dir, name + ".json"), "w") as f:
            json.dump(rec, f, separators=(",", ":"))
            f.write("\n")
        print(name, [(len(g["nodes"]), g["kept"]) for g in graphs], flush=True)


if __name__ == "__main__":
    main()
