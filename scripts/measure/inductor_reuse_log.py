#!/usr/bin/env python3
"""Logs what Inductor's memory planning decides for one case, run as measure_stub.py runs it (the stub CUDA
libraries, PyTorch's real allocator): for each compiled graph, its estimate of the graph's memory at every
scheduler node (torch/_inductor/memory.py estimate_peak_memory, with each node's output buffers), and every
buffer reuse the wrapper's planner weighs (codegen/wrapper.py AllocateLine.should_reuse_buffer: the dead buffer,
the new one, the size, both nodes, the estimated peak between them, the graph's estimated peak, the answer).
This is what the model's `Sim::begin_graph` / `plan_reuse` replays (crate/src/run/sim.rs).

Usage:  inductor_reuse_log.py CASES.json NAME OUT.log

Inductor's caches are turned off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1), so the graphs are compiled, and planned,
in this process; the case's own figures are not a record (a cold run autotunes), only the log is.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    cases_path, name, out_path = sys.argv[1:]
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    os.environ.setdefault("VRAMFIT_STUB_CC", "9.0")
    sys.path.insert(0, HERE)
    import measure_stub
    import stub_cuda
    stub_cuda.preload(stub_cuda.build(measure_stub.STUB_CACHE))
    from torch._inductor.codegen import wrapper
    from torch._inductor.memory import estimate_peak_memory, get_freeable_input_buf
    from torch._inductor.virtualized import V
    from torch.utils._ordered_set import OrderedSet

    out = open(out_path, "w")
    init = wrapper.EfficientPeakEstimate.__init__

    def logged_init(self):
        init(self)
        nodes = V.graph.scheduler.nodes
        inputs = get_freeable_input_buf(nodes, OrderedSet(V.graph.graph_inputs.keys()))
        peak, memory = estimate_peak_memory(nodes, inputs, OrderedSet(V.graph.get_output_names()))
        print("GRAPH", id(self), peak, len(nodes), file=out)
        for i, node in enumerate(nodes):
            bufs = [(b.get_name(), b.mpi_buffer.size_alloc) for b in node.get_outputs()]
            print("NODE", i, memory[i], bufs, file=out)
        print("FREEABLE_INPUTS", sorted((k, v.mpi_buffer.size_free) for k, v in inputs.items()), file=out)

    should_reuse = wrapper.AllocateLine.should_reuse_buffer

    def logged_should_reuse(self, free_line, size):
        answer = should_reuse(self, free_line, size)
        estimate = self.wrapper.estimate_peak
        adjacent = free_line.scheduler_node_index + 1 == self.scheduler_node_index
        between = None if adjacent else estimate.peak_between(free_line, self)
        print("REUSE", id(estimate), self.node.get_name(), free_line.node.get_name(), size,
              free_line.scheduler_node_index, self.scheduler_node_index, between, estimate.overall_peak_memory,
              answer, file=out)
        return answer

    wrapper.EfficientPeakEstimate.__init__ = logged_init
    wrapper.AllocateLine.should_reuse_buffer = logged_should_reuse
    case = next(c for c in json.load(open(cases_path)) if c["name"] == name)
    measure_stub.child(case, None)
    out.close()
    print("wrote", out_path)


if __name__ == "__main__":
    main()
