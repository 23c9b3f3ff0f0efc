//! Inductor's memory-ordering pass (`reorder_for_peak_memory`, torch/_inductor/memory.py, torch 2.15), on a
//! graph given as data: which order a compiled graph's kernels run in (issue 10).
//!
//! After fusion, Inductor estimates the peak of a graph's buffers for the scheduler's own order and for three
//! topological sorts of it, least peak memory first (LPMF), breadth first (BFS) and depth first (DFS), and
//! keeps the order with the lowest estimate (its own on a tie, then in that order). The estimate is its own,
//! not the caching allocator's: buffers at their exact byte sizes, the graph's freeable inputs live from the
//! start until their last reader, each buffer made by its node and freed after its last reader, outputs never
//! freed. This module is that pass over a `Graph` (its nodes in the scheduler's own order), written from the
//! behaviour it documents and checked, order for order and byte for byte, against the graphs Inductor weighed
//! in reference runs (tests/data/stub-cuda/inductor-graphs/, recorded by scripts/measure/inductor_graphs.py;
//! crate/tests/reorder.rs). Inductor's `size_threshold_for_succ_based_strategy` is 0 by default, which turns
//! LPMF's alternative selection off; it is not modelled.
//!
//! Nothing here allocates through the simulation: the executors do not describe their graphs as kernels yet, so
//! the estimate still follows the scheduler's own order (tests/data/stub-cuda/README.md says where Inductor kept
//! another one).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A buffer of a compiled graph: one a node makes, or a graph input the graph may free (its saved tensors and
/// tangents; parameters are never freeable and not listed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Buffer {
    /// Bytes made when its node runs (0 for an input, which is live from the start, and for the parts of a
    /// multi-output node, whose node allocates them all).
    pub size_alloc: u64,
    /// Bytes released after its last reader (0 for a buffer that is a mutated view of another).
    pub size_free: u64,
    /// The nodes whose reads keep it alive (indices into `Graph::nodes`).
    pub users: Vec<usize>,
    /// A graph input (live from the start).
    pub input: bool,
    /// A graph output: never freed inside the graph.
    pub output: bool,
}

/// A scheduler node (a fused kernel or an extern call) of a compiled graph.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// Bytes its outputs allocate.
    pub size: u64,
    /// The buffers it makes (indices into `Graph::buffers`).
    pub outputs: Vec<usize>,
    /// The nodes it must follow and precede (the ordering edges; indices into `Graph::nodes`).
    pub preds: Vec<usize>,
    pub succs: Vec<usize>,
    /// The buffers whose lifetime its reads extend (indices into `Graph::buffers`).
    pub reads: Vec<usize>,
    /// The nodes its unmet dependencies name, in the order the scheduler lists them (DFS visits through these).
    pub deps: Vec<usize>,
}

/// A compiled graph as Inductor's memory pass sees it; `nodes` in the scheduler's own order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub buffers: Vec<Buffer>,
}

/// The orders the pass weighs, in the order it prefers them on a tie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Own,
    Lpmf,
    Bfs,
    Dfs,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::Own, Method::Lpmf, Method::Bfs, Method::Dfs];

    pub fn name(self) -> &'static str {
        match self {
            Method::Own => "own",
            Method::Lpmf => "lpmf",
            Method::Bfs => "bfs",
            Method::Dfs => "dfs",
        }
    }
}

/// What the pass decided: each candidate's order and estimated peak (in `Method::ALL`'s order), and the one kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub orders: [Vec<usize>; 4],
    pub peaks: [u64; 4],
    pub kept: Method,
}

impl Decision {
    pub fn kept_order(&self) -> &[usize] {
        &self.orders[self.kept as usize]
    }
}

impl Graph {
    /// The estimated peak of running the nodes in `order` (a permutation of the node indices): the highest sum,
    /// at any node, of the freeable inputs not yet past their last reader and the buffers made and not yet past
    /// theirs. A buffer nobody reads dies after its own node.
    pub fn peak(&self, order: &[usize]) -> u64 {
        let mut step = vec![usize::MAX; self.nodes.len()];
        for (s, &n) in order.iter().enumerate() {
            step[n] = s;
        }
        // The step after which a buffer is freed (None: never), from its last reader in this order.
        let last_use = |b: &Buffer| b.users.iter().map(|&u| step[u]).max();
        // delta[s]: bytes made at step s and released before step s (freed after step s - 1).
        let mut made = vec![0u64; order.len() + 1];
        let mut freed = vec![0u64; order.len() + 1];
        for b in self.buffers.iter().filter(|b| b.input) {
            made[0] += b.size_free;
            if let (false, Some(end)) = (b.output, last_use(b)) {
                freed[end + 1] += b.size_free;
            }
        }
        for (s, &n) in order.iter().enumerate() {
            for &o in &self.nodes[n].outputs {
                let b = &self.buffers[o];
                made[s] += b.size_alloc;
                if !b.output {
                    let end = last_use(b).unwrap_or(s);
                    freed[end + 1] += b.size_free;
                }
            }
        }
        let (mut live, mut peak) = (0i128, 0i128);
        for s in 0..=order.len() {
            live += made[s] as i128 - freed[s] as i128;
            peak = peak.max(live);
        }
        peak.max(0) as u64
    }

    /// Least peak memory first: a greedy topological order. Among the nodes whose predecessors have all run, it
    /// takes one whose outputs fit under the highest live memory so far (the gap) if any does, the one that
    /// leaves the least live memory after it (its outputs less what it lets go); otherwise the one that makes the
    /// least; ties go to the earlier node of the own order.
    pub fn lpmf(&self) -> Vec<usize> {
        let n = self.nodes.len();
        let mut indegree: Vec<usize> = self.nodes.iter().map(|x| x.preds.len()).collect();
        // Readers still to run, with one more for an output (which is never freed).
        let mut outdegree: Vec<usize> = self
            .buffers
            .iter()
            .map(|b| b.users.len() + b.output as usize)
            .collect();
        let mut live: u64 = self
            .buffers
            .iter()
            .filter(|b| b.input)
            .map(|b| b.size_free)
            .sum();
        let outputs: u64 = self
            .buffers
            .iter()
            .filter(|b| b.output)
            .map(|b| b.size_free)
            .sum();
        let mut max = live.max(outputs);
        // What running a node lets go: the buffers it is the last reader of, and its outputs nobody reads.
        let mut to_free = vec![0u64; n];
        for (i, node) in self.nodes.iter().enumerate() {
            for &b in &node.reads {
                if outdegree[b] == 1 {
                    to_free[i] += self.buffers[b].size_free;
                }
            }
            for &b in &node.outputs {
                if outdegree[b] == 0 {
                    to_free[i] += self.buffers[b].size_free;
                }
            }
        }
        let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while !ready.is_empty() {
            let gap = max - live;
            let key = |i: usize| {
                let size = self.nodes[i].size;
                (
                    if size > gap { size } else { 0 },
                    size as i128 - to_free[i] as i128,
                    i,
                )
            };
            let (at, &pick) = ready
                .iter()
                .enumerate()
                .min_by_key(|&(_, &i)| key(i))
                .expect("ready is not empty");
            ready.swap_remove(at);
            order.push(pick);
            live += self.nodes[pick].size;
            max = max.max(live);
            live = live.saturating_sub(to_free[pick]);
            for &s in &self.nodes[pick].succs {
                indegree[s] = indegree[s].saturating_sub(1);
                if indegree[s] == 0 {
                    ready.push(s);
                }
            }
            for &b in &self.nodes[pick].reads {
                outdegree[b] = outdegree[b].saturating_sub(1);
                if outdegree[b] == 1 {
                    // One reader left: running it will let the buffer go.
                    for &u in &self.buffers[b].users {
                        to_free[u] += self.buffers[b].size_free;
                    }
                }
            }
        }
        order
    }

    /// Breadth first: among the ready nodes, the one whose predecessors ran earliest (the sorted list of their
    /// places in the order so far, compared as lists), ties to the earlier node of the own order.
    pub fn bfs(&self) -> Vec<usize> {
        let n = self.nodes.len();
        let mut indegree: Vec<usize> = self.nodes.iter().map(|x| x.preds.len()).collect();
        let mut place = vec![0usize; n];
        let mut heap = BinaryHeap::new();
        for i in (0..n).filter(|&i| indegree[i] == 0) {
            heap.push(Reverse((Vec::new(), i)));
        }
        let mut order = Vec::with_capacity(n);
        while let Some(Reverse((_, pick))) = heap.pop() {
            place[pick] = order.len();
            order.push(pick);
            for &s in &self.nodes[pick].succs {
                indegree[s] = indegree[s].saturating_sub(1);
                if indegree[s] == 0 {
                    let mut ran: Vec<usize> =
                        self.nodes[s].preds.iter().map(|&p| place[p]).collect();
                    ran.sort_unstable();
                    ran.dedup();
                    heap.push(Reverse((ran, s)));
                }
            }
        }
        order
    }

    /// Depth first: the nodes visited from the smallest footprint up (its outputs and every buffer it reads),
    /// each after its dependencies, visited the same way.
    pub fn dfs(&self) -> Vec<usize> {
        let n = self.nodes.len();
        let footprint: Vec<u64> = self
            .nodes
            .iter()
            .map(|x| {
                x.size
                    + x.reads
                        .iter()
                        .map(|&b| self.buffers[b].size_free)
                        .sum::<u64>()
            })
            .collect();
        let by_footprint = |v: &mut Vec<usize>| v.sort_by_key(|&i| (footprint[i], i));
        let mut roots: Vec<usize> = (0..n).collect();
        by_footprint(&mut roots);
        let mut seen = vec![false; n];
        let mut order = Vec::with_capacity(n);
        // An explicit stack of (node, its dependencies in visiting order, how many visited).
        let mut stack: Vec<(usize, Vec<usize>, usize)> = Vec::new();
        for root in roots {
            if seen[root] {
                continue;
            }
            seen[root] = true;
            let mut deps = self.nodes[root].deps.clone();
            by_footprint(&mut deps);
            stack.push((root, deps, 0));
            while let Some((node, deps, next)) = stack.last_mut() {
                if let Some(&d) = deps.get(*next) {
                    *next += 1;
                    if !seen[d] {
                        seen[d] = true;
                        let mut dd = self.nodes[d].deps.clone();
                        by_footprint(&mut dd);
                        stack.push((d, dd, 0));
                    }
                } else {
                    order.push(*node);
                    stack.pop();
                }
            }
        }
        order
    }

    /// The pass: every candidate order with its estimated peak, and the lowest kept (the earlier of
    /// `Method::ALL` on a tie).
    pub fn reorder(&self) -> Decision {
        let orders = [
            (0..self.nodes.len()).collect(),
            self.lpmf(),
            self.bfs(),
            self.dfs(),
        ];
        let peaks = [0, 1, 2, 3].map(|m| self.peak(&orders[m]));
        let mut kept = 0;
        for m in 1..4 {
            if peaks[m] < peaks[kept] {
                kept = m;
            }
        }
        Decision {
            orders,
            peaks,
            kept: Method::ALL[kept],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two independent chains from one input: a (makes 100, read by b) -> b (makes 10, output), and c (makes 50,
    /// read by d) -> d (makes 5, output). Counted by hand: the input (8 B, read by a and c) stays until its last
    /// reader.
    fn two_chains() -> Graph {
        let buf = |size: u64, users: Vec<usize>, input: bool, output: bool| Buffer {
            size_alloc: if input { 0 } else { size },
            size_free: size,
            users,
            input,
            output,
        };
        let node = |size, outputs, preds, succs, reads: Vec<usize>, deps| Node {
            size,
            outputs,
            preds,
            succs,
            reads,
            deps,
        };
        Graph {
            buffers: vec![
                buf(8, vec![0, 2], true, false), // 0: the input
                buf(100, vec![1], false, false), // 1: a's
                buf(10, vec![], false, true),    // 2: b's
                buf(50, vec![3], false, false),  // 3: c's
                buf(5, vec![], false, true),     // 4: d's
            ],
            nodes: vec![
                node(100, vec![1], vec![], vec![1], vec![0], vec![]),
                node(10, vec![2], vec![0], vec![], vec![1], vec![0]),
                node(50, vec![3], vec![], vec![3], vec![0], vec![]),
                node(5, vec![4], vec![2], vec![], vec![3], vec![2]),
            ],
        }
    }

    #[test]
    fn peak_counts_inputs_from_the_start_and_frees_after_the_last_reader() {
        let g = two_chains();
        // a c b d: a 8 + 100 = 108, c 158 (the input's last reader), b 158 - 8 + 10 = 160, d 160 - 100 + 5.
        assert_eq!(g.peak(&[0, 2, 1, 3]), 160);
        // a b c d: 108, 118, c 118 - 100 + 50 = 68, d 68 - 8 + 5.
        assert_eq!(g.peak(&[0, 1, 2, 3]), 118);
        // c d a b: 58, 63, a 63 - 50 + 100 = 113, b 113 - 8 + 10 = 115.
        assert_eq!(g.peak(&[2, 3, 0, 1]), 115);
    }

    #[test]
    fn the_pass_keeps_the_lowest_estimate_and_its_own_order_on_a_tie() {
        let g = two_chains();
        let d = g.reorder();
        // LPMF: live 8, the outputs 15, so the gap is 7; a (100) and c (50) are ready and both over it: c, the
        // smaller. Then d (lets c's 50 go) before a; then a, b.
        assert_eq!(d.orders[1], vec![2, 3, 0, 1]);
        // BFS: a and c ready with no predecessors: a (the earlier); then c (none) before b (a ran first).
        assert_eq!(d.orders[2], vec![0, 2, 1, 3]);
        // DFS by footprint (outputs and reads): d 55, c 58, a 108, b 110; d visits c first.
        assert_eq!(d.orders[3], vec![2, 3, 0, 1]);
        assert_eq!(d.peaks, [118, 115, 160, 115]);
        // LPMF and DFS tie at 115: the earlier method is kept.
        assert_eq!(d.kept, Method::Lpmf);
        assert_eq!(d.kept_order(), &[2, 3, 0, 1]);
        // Two equal chains (a and c make 50, b and d 5): own, LPMF and DFS all run a b c d or its mirror (63),
        // BFS interleaves them (a c b d: 108): the own order stays.
        let mut even = g.clone();
        for (n, b, size) in [(0, 1, 50), (1, 2, 5)] {
            even.nodes[n].size = size;
            even.buffers[b].size_alloc = size;
            even.buffers[b].size_free = size;
        }
        let d = even.reorder();
        assert_eq!(d.peaks, [63, 63, 108, 63]);
        assert_eq!(d.kept, Method::Own);
    }
}
