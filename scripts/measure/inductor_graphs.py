#!/usr/bin/env python3
"""Records the graphs Inductor's memory-ordering pass weighs, as data (issue 10: the order of a compiled graph).

After fusion, Inductor's scheduler hands its nodes to `torch._inductor.memory.reorder_for_peak_memory`, which
estimates the graph's peak for the nodes' own order and for three topological sorts (LPMF, BFS, DFS) and keeps
the lowest. This module wraps that function in a measuring process (`measure_stub.py --child` with
VRAMFIT_INDUCTOR_GRAPHS=DIR set; the Inductor cache must be cold, or nothing is compiled) and writes, for each
graph it sees, one JSON file DIR/NNN.json:

  nodes    in the scheduler's own order: name, size (bytes its outputs allocate), outputs (buffer names),
           preds / succs (node indices: the ordering edges), reads (buffer names whose lifetime it extends),
           dfs_deps (node indices reached through its unmet dependencies, as the DFS visits them)
  buffers  name, size_alloc, size_free, users (node indices that extend its life), input (a graph input the
           graph may free), output (a graph output, never freed)
  estimates  Inductor's own peak estimate of each candidate order ("own", "lpmf", "bfs", "dfs")
  orders   each candidate's order (node indices); kept: the order the pass returned (its index list and name)

Everything is read from Inductor's own planning data after the pass has run (its `mpi_node` / `mpi_buffer`
fields) and the estimates recomputed with Inductor's own functions, so the file is what Inductor decided from.
vramfit's `reorder` module (crate/src/run/reorder.rs) is checked against these files.
"""
import json
import os


def install(out_dir):
    import torch._inductor.memory as mem

    original = mem.reorder_for_peak_memory
    os.makedirs(out_dir, exist_ok=True)
    count = [0]

    def wrapped(nodes, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs, *args, **kwargs):
        own = list(nodes)
        kept = original(nodes, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs, *args, **kwargs)
        try:
            record(mem, own, kept, name_to_buf, graph_inputs, graph_outputs, out_dir, count)
        except Exception as e:  # a record that cannot be written must not change the program measured
            print("VRAMFIT-INDUCTOR-GRAPH-ERROR %r" % (e,), flush=True)
        return kept

    mem.reorder_for_peak_memory = wrapped


def record(mem, own, kept, name_to_buf, graph_inputs, graph_outputs, out_dir, count):
    index = {n: i for i, n in enumerate(own)}
    freeable = mem.get_freeable_input_buf(own, graph_inputs)
    bufs = {}
    for name, b in freeable.items():
        bufs[name] = dict(name=name, size_alloc=b.mpi_buffer.size_free, size_free=b.mpi_buffer.size_free,
                          users=sorted(index[s] for s in b.mpi_buffer.succ_nodes), input=True,
                          output=name in graph_outputs)
    for n in own:
        for b in n.get_outputs():
            bufs[b.get_name()] = dict(name=b.get_name(), size_alloc=b.mpi_buffer.size_alloc,
                                      size_free=b.mpi_buffer.size_free,
                                      users=sorted(index[s] for s in b.mpi_buffer.succ_nodes if s in index),
                                      input=False, output=b.get_name() in graph_outputs)
    name_to_node = {}
    for n in own:
        for name in n.get_buffer_names():
            name_to_node[name] = n
    nodes = []
    for n in own:
        m = n.mpi_node
        dfs = [index[name_to_node[d.name]] for d in n.unmet_dependencies if d.name in name_to_node]
        nodes.append(dict(name=n.get_name(), size=m.size, outputs=[b.get_name() for b in n.get_outputs()],
                          preds=sorted(index[p] for p in m.pred_nodes), succs=sorted(index[s] for s in m.succ_nodes),
                          reads=[b.get_name() for b in m.pred_buffers], dfs_deps=dfs))
    orders = {"own": own,
              "lpmf": mem.topological_sort_lpmf(own, freeable, name_to_buf, graph_outputs),
              "bfs": mem.topological_sort_bfs(own),
              "dfs": mem.topological_sort_dfs(own)}
    estimates = {k: mem.estimate_peak_memory(o, freeable, graph_outputs)[0] for k, o in orders.items()}
    kept_idx = [index[n] for n in kept]
    kept_name = next((k for k in ("own", "lpmf", "bfs", "dfs") if [index[n] for n in orders[k]] == kept_idx), "?")
    import torch
    out = dict(torch_version=torch.__version__, nodes=nodes, buffers=list(bufs.values()), estimates=estimates,
               orders={k: [index[n] for n in o] for k, o in orders.items()}, kept=kept_name, kept_order=kept_idx)
    path = os.path.join(out_dir, "%03d.json" % count[0])
    count[0] += 1
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
