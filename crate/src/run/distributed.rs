//! What a data-parallel wrapper adds to one GPU's step, on rank 0 (the rank that holds the most): DDP's gradient
//! buckets, and FSDP2's sharded state with the per-block all-gathers and reduce-scatters. Every size and moment
//! here is read from tests/data/parallel (PyTorch 2.15's own allocator on the stub GPU with a fake process group;
//! its README gives each buffer with the op that allocates it).
//!
//! Collectives themselves allocate nothing in PyTorch's counters (NCCL's buffers and communicators are its own
//! `cudaMalloc`s, outside `max_memory_allocated()` and not modelled).
//!
//! Streams (`_fsdp_collectives.py`, `_fsdp_param_group.py`): FSDP2 allocates an all-gather's inputs and flat output
//! on the all-gather copy-in stream (`ALL_GATHER_COPY_IN`) and a reduce-scatter's output, with the sharded
//! gradients' casts, on the reduce-scatter stream (`REDUCE_SCATTER`); the unsharded parameters (copy-out), the
//! reduce-scatter input and everything else are the default stream's. The caching allocator keeps a pool per
//! stream, so these buffers take segments of their own (llama-fsdp-w8's snapshot: 78 MiB on the copy-in stream,
//! 20 MiB on the reduce-scatter stream, 588 MiB on the default one; the model gives the same). FSDP2 calls no
//! `record_stream`: it bounds cross-stream reuse by holding references until an event (the forward's all-gather
//! output until the next unshard, the reduce-scatter input until the next post-backward), and those holds are
//! modelled as frees at the moments the references go. Not modelled: HSDP's all-reduce stream (no HSDP here).

use crate::allocator::Stream;
use crate::model::Setup;
use crate::parallel::{Parallel, Strategy};
use crate::sim::Category::{self, Activations, Grads, Logits, Temporary, Weights};
use crate::sim::{block_bytes, Tensor};
use crate::tensors::Ctx;

/// `torch.nn.parallel.DistributedDataParallel`'s `broadcast_bucket_size`, 250 MiB (`int(250 * 1024 * 1024)` in
/// its constructor): `_sync_module_states` flattens the parameters into groups of up to this size for the
/// broadcast from rank 0 (`_broadcast_coalesced`), one transient buffer at a time.
pub const DDP_BROADCAST_BUCKET_BYTES: u64 = 250 << 20;

/// `torch.distributed._DEFAULT_FIRST_BUCKET_BYTES`: with `bucket_cap_mb` left at its default, the rebuilt
/// buckets' first one closes at 1 MiB (the records' `first_bucket_bytes`).
pub const DDP_FIRST_BUCKET_BYTES: u64 = 1 << 20;

/// FSDP2's all-gather copy-in stream (`FSDPCommContext.all_gather_copy_in_stream`, the first of the four streams
/// its `lazy_init` creates: copy-in, all-gather, reduce-scatter, all-reduce). An all-gather issued from a pre-forward
/// or pre-backward (`get_all_gather_streams`, implicit prefetching) makes its inputs' copies and its flat output
/// here (`foreach_all_gather`). The all-gather stream itself allocates nothing (the collective writes the output
/// in place), nor does the all-reduce stream without HSDP (not modelled).
pub const ALL_GATHER_COPY_IN: Stream = Stream::nth(1);

/// FSDP2's reduce-scatter stream (`FSDPCommContext.reduce_scatter_stream`, the third): the reduce-scatter output
/// and what `foreach_reduce` makes of it (the sharded gradients' casts) are allocated here.
pub const REDUCE_SCATTER: Stream = Stream::nth(3);

/// DDP's default `bucket_cap_mb`, 25 (the records' `bucket_cap_bytes` 26,214,400).
pub const DDP_DEFAULT_BUCKET_CAP_MB: u64 = 25;

/// The buckets DDP's reducer rebuilds after the first iteration, in bytes, from the parameters' bytes in the
/// order their gradients became ready in the first synchronised backward: a bucket closes after the parameter
/// that takes it to its cap (so buckets overshoot the cap, and a parameter larger than the cap is a bucket of its
/// own); the first bucket's cap is 1 MiB when `bucket_cap_mb` is the default (`_DEFAULT_FIRST_BUCKET_BYTES`).
/// Measured: gpt-ddp-w2 2,360,832 / 26,357,760 / 25,165,824; gpt-ddp-w8-bucket5; llama-ddp-w2.
pub fn ddp_bucket_bytes(ready: &[u64], bucket_cap_mb: Option<u64>) -> Vec<u64> {
    let cap = bucket_cap_mb.unwrap_or(DDP_DEFAULT_BUCKET_CAP_MB) << 20;
    let mut limit = if bucket_cap_mb.is_none() {
        DDP_FIRST_BUCKET_BYTES
    } else {
        cap
    };
    let mut out = Vec::new();
    let mut open = 0;
    for &b in ready {
        open += b;
        if open >= limit {
            out.push(open);
            open = 0;
            limit = cap;
        }
    }
    if open > 0 {
        out.push(open);
    }
    out
}

/// The buckets `broadcast_coalesced` flattens `states` into (`compute_bucket_assignment_by_size` with one limit,
/// `limit`): tensors of one dtype (`states`' second field, bytes per element) fill a bucket of their own, which
/// closes once it reaches the limit (so it overshoots it), the open ones close at the end, and the buckets go in
/// the order of their first tensor. Returns each bucket's bytes. llama-lora-ddp-w2's snapshot: the bf16 base
/// (56,763,392 B) and the fp32 adapters (2,367,488 B and two fp32 rotary buffers) flattened at once, both alive
/// until the broadcast ends.
pub fn broadcast_buckets(states: &[(u64, u64)], limit: u64) -> Vec<u64> {
    // (first tensor's index, bytes) of closed buckets; open ones per dtype.
    let mut closed: Vec<(usize, u64)> = Vec::new();
    let mut open: Vec<(u64, usize, u64)> = Vec::new();
    for (i, &(bytes, dtype)) in states.iter().enumerate() {
        let k = match open.iter().position(|o| o.0 == dtype) {
            Some(k) => k,
            None => {
                open.push((dtype, i, 0));
                open.len() - 1
            }
        };
        if open[k].2 == 0 {
            open[k].1 = i;
        }
        open[k].2 += bytes;
        if open[k].2 >= limit {
            closed.push((open[k].1, open[k].2));
            open[k].2 = 0;
        }
    }
    closed.extend(open.iter().filter(|o| o.2 > 0).map(|o| (o.1, o.2)));
    closed.sort_by_key(|c| c.0);
    closed.into_iter().map(|c| c.1).collect()
}

/// The parameters' bytes (`params`, in the order the model makes them) in the order their gradients landed
/// (`landed`: each gradient's block, as the simulation allocated it): each landed gradient is matched to the
/// parameter of its size nearest the end of the list (the backward makes them ready roughly in reverse), and
/// parameters no gradient matched follow in reverse order.
fn ready_order(params: &[u64], landed: &[u64]) -> Vec<u64> {
    let mut used = vec![false; params.len()];
    let mut out = Vec::with_capacity(params.len());
    for &l in landed {
        if let Some(i) = (0..params.len())
            .rev()
            .find(|&i| !used[i] && block_bytes(params[i]) == l)
        {
            used[i] = true;
            out.push(params[i]);
        }
    }
    out.extend(
        (0..params.len())
            .rev()
            .filter(|&i| !used[i])
            .map(|i| params[i]),
    );
    out
}

/// DDP's state on the device.
pub struct Ddp {
    buckets: Vec<Tensor>,
    /// Each parameter's bytes, in the order the model makes them.
    params: Vec<u64>,
    bucket_cap_mb: Option<u64>,
    /// The rebuilt buckets' sizes (`ddp_bucket_bytes`), once the first synchronised backward has shown the
    /// order gradients become ready in; made at the next forward.
    rebuilt: Option<Vec<u64>>,
    rebuild_pending: bool,
    gradient_as_bucket_view: bool,
    /// `static_graph=True` before its first backward: the forward's outputs go through `_DDPSink`, which clones
    /// them; that backward enqueues the delayed all-reduce and sets `_static_graph_delay_allreduce_enqueued`,
    /// after which outputs pass unchanged.
    sink_pending: bool,
}

impl Ddp {
    /// The wrapper's constructor on a model already on the device. `states` are the bytes and the dtype's bytes
    /// per element of every parameter, frozen or not, in the order the model makes them: `_sync_module_states`
    /// broadcasts them from rank 0 (`broadcast_coalesced`), flattened into buckets
    /// ([`broadcast_buckets`]), at most two in flight (its `max_in_flight`): a bucket's flat copy is made when
    /// its broadcast starts and let go when the broadcast two buckets later starts, or at the end. Then the
    /// reducer allocates its gradient buckets over `trained` (the bytes of each parameter that requires a
    /// gradient: a LoRA model's adapters only). The first assignment has no cap (`find_unused_parameters=False`
    /// or `static_graph`: `compute_bucket_size_limits`), so one flat bucket per dtype holds every trained
    /// parameter (records' `bucket_sizes`: 53,884,416 B, the GPT's whole fp32 parameters; 2,367,488 B,
    /// llama-lora-ddp-w2's fp32 adapters).
    pub fn build(cx: &mut Ctx, states: &[(u64, u64)], trained: &[u64], p: &Parallel) -> Ddp {
        let mut in_flight: std::collections::VecDeque<Tensor> = std::collections::VecDeque::new();
        for bytes in broadcast_buckets(states, DDP_BROADCAST_BUCKET_BYTES) {
            if in_flight.len() >= 2 {
                if let Some(t) = in_flight.pop_front() {
                    cx.free(t);
                }
            }
            in_flight.push_back(cx.alloc(bytes, Temporary, "flatten_dense_tensors"));
        }
        for t in in_flight {
            cx.free(t);
        }
        let total: u64 = trained.iter().sum();
        let bucket = cx.alloc(total, Grads, "ddp_bucket");
        Ddp {
            buckets: vec![bucket],
            params: trained.to_vec(),
            bucket_cap_mb: p.bucket_cap_mb,
            rebuilt: None,
            // static_graph keeps the first assignment (records: has_rebuilt_buckets 0 after three steps).
            rebuild_pending: !p.static_graph,
            gradient_as_bucket_view: p.gradient_as_bucket_view,
            sink_pending: p.static_graph,
        }
    }

    /// Whether this forward's outputs are cloned by `_DDPSink` (`Ctx::ddp_sink_clone`). The first backward
    /// after it, with gradient sync or not (`_DDPSink.backward` does not look), ends it: `backward_done`.
    pub fn sink_clones(&self) -> bool {
        self.sink_pending
    }

    /// A backward through `_DDPSink` ran: later forwards' outputs are not cloned.
    pub fn backward_done(&mut self) {
        self.sink_pending = false;
    }

    /// DDP's forward after a synchronised backward: the reducer rebuilds its buckets once (`_rebuild_buckets`),
    /// dropping the old ones before making the new (`initialize_buckets` clears them first).
    pub fn pre_forward(&mut self, cx: &mut Ctx, step: u32) {
        if step < 2 || !self.rebuild_pending {
            return;
        }
        if let Some(sizes) = self.rebuilt.take() {
            self.rebuild_pending = false;
            let old = std::mem::take(&mut self.buckets);
            cx.sim.free_all(&old);
            self.buckets = sizes
                .iter()
                .map(|&b| cx.alloc(b, Grads, "ddp_bucket"))
                .collect();
        }
    }

    /// The end of a backward that synchronised: with `gradient_as_bucket_view` each `.grad` the step created is
    /// replaced by its view into the bucket once copied there, and autograd's tensor is freed; later micro-steps
    /// accumulate into the views. The model frees them at the end of the backward, where the reducer frees each
    /// as its gradient is ready (the measured peaks, at the loss, do not tell the two apart: gpt-ddp-w2-gav is
    /// 1.1 MiB under gpt-ddp-w2). Without it the gradients stay tensors of their own: nothing changes here.
    pub fn post_backward(&mut self, cx: &mut Ctx) {
        if self.rebuild_pending && self.rebuilt.is_none() {
            let landed: Vec<u64> = cx.grads.iter().map(|&t| cx.sim.bytes_of(t)).collect();
            let ready = ready_order(&self.params, &landed);
            self.rebuilt = Some(ddp_bucket_bytes(&ready, self.bucket_cap_mb));
        }
        if self.gradient_as_bucket_view {
            let grads = std::mem::take(&mut cx.grads);
            cx.sim.free_all(&grads);
        }
    }
}

/// One parameter of a `fully_shard` group, as FSDP2 holds it on rank 0.
#[derive(Debug, Clone, Copy)]
struct Shard {
    /// The padded shard, in elements: the parameter's rows chunked over the GPUs, rounded up (`ceil(rows / W) *
    /// cols`: rank 0 holds the largest chunk, `torch.chunk`).
    elems: u64,
    /// Bytes per element of the sharded parameter (its own dtype) and of the gathered one (`param_dtype`, else
    /// its own).
    own: u64,
    gather: u64,
    /// Rows of the shard (`ceil(rows / W)`), for an optimizer that factors a matrix.
    rows: u64,
    matrix: bool,
    /// The parameter requires a gradient. A frozen one (LoRA's base) is gathered with the others but has no
    /// gradient: FSDP2's post-backward reduce-scatters only the parameters that got one
    /// (`_take_unsharded_grads_to_reduce`), and a group without any reduces nothing.
    trained: bool,
}

/// One `fully_shard` group: a block, or the root (the parameters outside the blocks).
struct Group {
    shards: Vec<Shard>,
    /// The gathered parameters, while unsharded (one tensor per parameter).
    unsharded: Vec<Tensor>,
    /// The all-gather output of a prefetch, until the group's own pre-backward copies it out.
    prefetched: Option<Tensor>,
    /// Unsharded gradients kept through micro-steps without gradient sync.
    kept_grads: Vec<Tensor>,
}

impl Group {
    /// Bytes of this rank's gathered shards: the all-gather's input. A group of mixed dtypes (LoRA's bf16 base
    /// with fp32 adapters) is all-gathered as bytes (`_get_all_gather_input_metadatas` picks `uint8`), each
    /// parameter in its own dtype: the same bytes.
    fn gather_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.elems * s.gather).sum()
    }

    /// Elements of the shards that get a gradient (the reduce-scatter's output).
    fn trained_elems(&self) -> u64 {
        self.shards
            .iter()
            .filter(|s| s.trained)
            .map(|s| s.elems)
            .sum()
    }
}

/// FSDP2's state on the device for the run.
pub struct Fsdp {
    gpus: u64,
    /// Blocks 0..n_layer, then the root.
    groups: Vec<Group>,
    /// Bytes per element of the unsharded gradients autograd makes (the trained parameters' `param_dtype`, else
    /// their own) and of the reduce-scatter (`reduce_dtype`, else the gradients').
    grad_bytes: u64,
    reduce_bytes: u64,
    reshard_after_forward: bool,
    offload: bool,
    /// Whether this micro-step's backward reduce-scatters (`set_requires_gradient_sync`).
    pub sync: bool,
    /// Where the current block's unsharded gradients begin in `cx.grads`.
    mark: usize,
    /// The last reduce-scatter input, held until the next group's post-backward.
    rs_input: Option<Tensor>,
    /// Sharded gradients (reduce-scatter outputs, or their casts), until `zero_grad`.
    pub sharded_grads: Vec<Tensor>,
    /// Whether sharded gradients exist (a later reduce-scatter adds into them).
    have_sharded_grads: bool,
    /// The last forward all-gather's output, kept until the next group's all-gather is issued
    /// (`FSDPCommContext.all_gather_state`, so that the next copy-in cannot write into it while it is read).
    held_output: Option<Tensor>,
}

/// A parameter before sharding: (elements, is a matrix, rows, bytes per element of its own dtype and of its
/// compute dtype, trained).
type Whole = (u64, bool, u64, u64, u64, bool);

/// The parameters as `fully_shard` groups them (each block, then the root). `own` and `compute` are the bytes
/// per element of the model's parameters as stored and as the step computes in them (`param_dtype`). Under
/// LoRA the model's parameters are the frozen base (in the base's dtype) and each block also holds its
/// adapters (peft's `lora_A` / `lora_B` are submodules of the block's Linears), trained, in the adapters' dtype
/// (`adapter_own`, `cx.ab` computed).
fn groups_of(cx: &Ctx, setup: &Setup, own: u64, adapter_own: u64) -> Vec<Vec<Whole>> {
    let m = &setup.model;
    let shapes = cx.arch.param_shapes(m);
    let mut zero = m.clone();
    zero.n_layer = 0;
    let n_root = cx.arch.param_shapes(&zero).len();
    let n_block = (shapes.len() - n_root) / m.n_layer.max(1) as usize;
    let trained = cx.lora.is_none();
    let whole = |s: &(u64, bool, u64)| (s.0, s.1, s.2, own, cx.pb, trained);
    let adapters = cx
        .lora
        .map(|l| crate::finetune::adapter_shapes(m, l))
        .unwrap_or_default();
    let per_layer = adapters.len() / m.n_layer.max(1) as usize;
    // The blocks follow the embeddings; the final norm and an untied head follow the blocks.
    let n_before = usize::from(cx.arch.positions == crate::arch::Positions::Learned) + 1;
    let mut out: Vec<Vec<Whole>> = (0..m.n_layer as usize)
        .map(|l| {
            shapes[n_before + l * n_block..n_before + (l + 1) * n_block]
                .iter()
                .map(whole)
                .chain(
                    adapters[l * per_layer..(l + 1) * per_layer]
                        .iter()
                        .map(|&(rows, cols)| (rows * cols, true, rows, adapter_own, cx.ab, true)),
                )
                .collect()
        })
        .collect();
    let blocks_end = n_before + m.n_layer as usize * n_block;
    out.push(
        shapes[..n_before]
            .iter()
            .chain(&shapes[blocks_end..])
            .map(whole)
            .collect(),
    );
    out
}

impl Fsdp {
    /// `fully_shard` on each block, then the root, on the meta device, then `to_empty`: each parameter's padded
    /// shard is allocated on the device in its own dtype (`own`: the model's parameters'; under LoRA the frozen
    /// base's, and `adapter_own` the adapters'), none with CPU offload (they live on the host).
    pub fn build(cx: &mut Ctx, setup: &Setup, own: u64, adapter_own: u64) -> Fsdp {
        let p = &setup.train.parallel;
        // FSDP shards over the data-parallel GPUs; with tensor parallelism each holds a tensor-parallel piece.
        let w = p.dp();
        let groups: Vec<Group> = groups_of(cx, setup, own, adapter_own)
            .into_iter()
            .map(|params| Group {
                shards: params
                    .iter()
                    .map(|&(elems, matrix, rows, own, gather, trained)| Shard {
                        elems: rows.div_ceil(w) * (elems / rows.max(1)),
                        own,
                        gather,
                        rows: rows.div_ceil(w),
                        matrix,
                        trained,
                    })
                    .collect(),
                unsharded: Vec::new(),
                prefetched: None,
                kept_grads: Vec::new(),
            })
            .collect();
        let grad_bytes = if cx.lora.is_some() { cx.ab } else { cx.pb };
        let f = Fsdp {
            gpus: w,
            groups,
            grad_bytes,
            reduce_bytes: p.reduce_dtype.map_or(grad_bytes, |d| d.bytes()),
            reshard_after_forward: p.reshard_after_forward,
            offload: p.offload,
            sync: true,
            mark: 0,
            rs_input: None,
            sharded_grads: Vec::new(),
            have_sharded_grads: false,
            held_output: None,
        };
        if !p.offload {
            f.allocate_shards(cx);
        }
        f
    }

    /// `to_empty` on the sharded model: each parameter's padded shard in its own dtype, in the order
    /// `nn.Module._apply` visits them (a module's children before its own parameters: the model's parameter
    /// order, the embeddings first, the blocks, then the final norm and head). A head tied to the embedding is the
    /// same parameter met again from `lm_head`: its shard is made a second time and the first one freed
    /// (gpt-fsdp-w2's snapshot: wte's 12,582,912-byte shard first, a second one after ln_f's, the first freed).
    fn allocate_shards(&self, cx: &mut Ctx) {
        let mut first = None;
        for s in self.shards_in_model_order(cx) {
            let t = cx.alloc(s.elems * s.own, Weights, "parameter (shard)");
            first.get_or_insert(t);
        }
        if let (Some(t), true) = (first, cx.arch.tied_head) {
            let bytes = cx.sim.bytes_of(t);
            cx.alloc(bytes, Weights, "parameter (shard)");
            cx.free(t);
        }
    }

    /// Every parameter's shard in the order the model makes them (`model.parameters()`: the root's embeddings,
    /// the blocks', then the root's final norm and head).
    fn shards_in_model_order<'a>(&'a self, cx: &Ctx) -> impl Iterator<Item = &'a Shard> {
        let root = &self.groups[self.root()];
        let n_before = usize::from(cx.arch.positions == crate::arch::Positions::Learned) + 1;
        let (before, after) = root.shards.split_at(n_before.min(root.shards.len()));
        before
            .iter()
            .chain(self.groups[..self.root()].iter().flat_map(|g| &g.shards))
            .chain(after)
    }

    /// The trained parameters' shards, in the order the model makes them (`model.parameters()`: the blocks'
    /// before the root's final norm and head, the embeddings first), for the optimizer state (`zeros_like` of
    /// the local shard) as (elements, is a matrix, bytes per element, rows); none with CPU offload (the
    /// optimizer steps on the host).
    pub fn optimizer_params(&self, cx: &Ctx) -> Vec<(u64, bool, u64, u64)> {
        if self.offload {
            return Vec::new();
        }
        self.shards_in_model_order(cx)
            .filter(|s| s.trained)
            .map(|s| (s.elems, s.matrix, s.own, s.rows))
            .collect()
    }

    fn root(&self) -> usize {
        self.groups.len() - 1
    }

    /// The all-gather's start (`foreach_all_gather`), on the copy-in stream: this rank's shards as the
    /// all-gather reads them (`_get_param_all_gather_inputs`), then the flat output for every rank's (W x S_g),
    /// into which they are copied; the inputs go once the copy is issued. A shard already on the device in its
    /// gathered dtype is read where it is (no copy, as in the fp32 records: one allocation per all-gather on the
    /// stream); shards cast to `param_dtype` go through one flat buffer (the foreach-copy fast path, S_g in
    /// `param_dtype`); with CPU offload each shard is copied to the device first (`.to(device)`), then cast.
    fn all_gather(&mut self, cx: &mut Ctx, g: usize) -> Tensor {
        let before = cx.sim.set_stream(ALL_GATHER_COPY_IN);
        let mut inputs = Vec::new();
        if self.offload {
            for sh in &self.groups[g].shards {
                let on_device = cx.alloc(sh.elems * sh.own, Temporary, "_to_copy");
                if sh.gather != sh.own {
                    inputs.push(cx.alloc(sh.elems * sh.gather, Temporary, "_to_copy"));
                    cx.free(on_device);
                } else {
                    inputs.push(on_device);
                }
            }
        } else {
            let cast: u64 = self.groups[g]
                .shards
                .iter()
                .filter(|sh| sh.gather != sh.own)
                .map(|sh| sh.elems * sh.gather)
                .sum();
            if cast > 0 {
                inputs.push(cx.alloc(cast, Temporary, "all_gather_copy_in"));
            }
        }
        let out = cx.alloc(
            self.gpus * self.groups[g].gather_bytes(),
            Weights,
            "all_gather",
        );
        cx.sim.free_all(&inputs);
        cx.sim.set_stream(before);
        out
    }

    /// Unshards group `g` (`wait_for_unshard`): one tensor per parameter, its padded full size in
    /// `param_dtype`, on the default stream, into which the flat output is copied (`split_with_sizes_copy`);
    /// then the output is freed. In the forward (`forward`) the output is kept instead until the next group's
    /// unshard has issued its all-gather, and that one lets the previous output go before its copy-out
    /// (`AllGatherState`, `release_all_gather_state_for_comm_reuse`): two outputs are alive at once on the
    /// copy-in stream (llama-fsdp-w8's snapshot: the root's 64 MiB output is freed after block 0's 11.1 MiB one
    /// is allocated, in a 12 MiB segment of its own beside the root's 66 MiB one).
    fn unshard(&mut self, cx: &mut Ctx, g: usize, forward: bool) {
        if !self.groups[g].unsharded.is_empty() {
            return;
        }
        let out = match self.groups[g].prefetched.take() {
            Some(t) => t,
            None => self.all_gather(cx, g),
        };
        if forward {
            self.release_held_output(cx);
        }
        let w = self.gpus;
        let params: Vec<Tensor> = self.groups[g]
            .shards
            .iter()
            .map(|s| cx.alloc(w * s.elems * s.gather, Weights, "split_with_sizes_copy"))
            .collect();
        self.groups[g].unsharded = params;
        if forward {
            self.held_output = Some(out);
        } else {
            cx.free(out);
        }
    }

    /// Lets the all-gather output kept from the forward go (the next forward unshard, or the root's
    /// post-forward: "the last FSDP state flush[es] the reference").
    fn release_held_output(&mut self, cx: &mut Ctx) {
        if let Some(t) = self.held_output.take() {
            cx.free(t);
        }
    }

    fn reshard(&mut self, cx: &mut Ctx, g: usize) {
        let params = std::mem::take(&mut self.groups[g].unsharded);
        cx.sim.free_all(&params);
    }

    /// Backward prefetch: the next group's all-gather is issued while this one computes.
    fn prefetch(&mut self, cx: &mut Ctx, g: usize) {
        if self.groups[g].unsharded.is_empty() && self.groups[g].prefetched.is_none() {
            let out = self.all_gather(cx, g);
            self.groups[g].prefetched = Some(out);
        }
    }

    /// The group's post-backward: without gradient sync its unsharded gradients stay; with it they are copied
    /// into the reduce-scatter input (W x S_g in `reduce_dtype`, after the previous group's input is let go)
    /// and freed, and the reduce-scatter output (S_g in `reduce_dtype`) becomes the sharded gradients (views when
    /// the dtypes agree; else cast per parameter; added into earlier ones; or copied to the host with offload).
    /// S_g counts the parameters with a gradient only: a group whose parameters are all frozen (LoRA's root)
    /// reduces nothing and leaves the previous input where it is. The parameters are resharded either way.
    fn post_backward(&mut self, cx: &mut Ctx, g: usize, grads: Vec<Tensor>) {
        self.reshard(cx, g);
        if !self.sync {
            if self.upcasts_kept_grads() {
                // `FSDPParam.to_accumulated_grad_if_needed`: with a reduce dtype other than the gradients', each
                // unsharded gradient is kept upcast to it (`unsharded_accumulated_grad`) and `.grad` let go; a
                // later micro-step's new gradient is added into it and freed (llama-fsdp-w8-mp-accum2: +109.6 MiB
                // over one micro-step, the fp32 size of every parameter).
                for t in grads {
                    let bytes = cx.sim.bytes_of(t) / self.grad_bytes * self.reduce_bytes;
                    let up = cx.alloc(bytes, Grads, "_to_copy");
                    cx.free(t);
                    self.groups[g].kept_grads.push(up);
                }
            } else {
                self.groups[g].kept_grads.extend(grads);
            }
            return;
        }
        let mut grads = grads;
        grads.append(&mut self.groups[g].kept_grads);
        let s = self.groups[g].trained_elems();
        if s == 0 {
            cx.sim.free_all(&grads);
            return;
        }
        if let Some(t) = self.rs_input.take() {
            cx.free(t);
        }
        let input = cx.alloc(
            self.gpus * s * self.reduce_bytes,
            Temporary,
            "reduce_scatter_input",
        );
        cx.sim.free_all(&grads);
        self.rs_input = Some(input);
        let before = cx.sim.set_stream(REDUCE_SCATTER);
        let out = cx.alloc(s * self.reduce_bytes, Grads, "reduce_scatter");
        if self.offload || self.have_sharded_grads {
            cx.free(out);
        } else {
            self.sharded_grads_of(cx, g, out);
        }
        cx.sim.set_stream(before);
    }

    /// The sharded gradients made of the reduce-scatter output `out` (`_cast_and_view_sharded_grads`, on the
    /// reduce-scatter stream): the trained parameters in runs of one dtype, each run a view of the output, or one
    /// flat cast of it where the parameters' dtype is not the reduce dtype. When the casts outweigh the views the
    /// uncast runs are copied too (`copy_uncast`), so that the output can go; otherwise the views keep it.
    fn sharded_grads_of(&mut self, cx: &mut Ctx, g: usize, out: Tensor) {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for sh in self.groups[g].shards.iter().filter(|sh| sh.trained) {
            match runs.last_mut() {
                Some(run) if run.0 == sh.own => run.1 += sh.elems,
                _ => runs.push((sh.own, sh.elems)),
            }
        }
        let total: u64 = runs.iter().map(|r| r.1).sum();
        let cast: u64 = runs
            .iter()
            .filter(|r| r.0 != self.reduce_bytes)
            .map(|r| r.1)
            .sum();
        let copy_uncast = cast > total - cast;
        let mut viewed = false;
        for &(own, elems) in &runs {
            if own != self.reduce_bytes {
                let t = cx.alloc(elems * own, Grads, "_to_copy");
                self.sharded_grads.push(t);
            } else if copy_uncast {
                let t = cx.alloc(elems * own, Grads, "clone");
                self.sharded_grads.push(t);
            } else {
                viewed = true;
            }
        }
        if viewed {
            self.sharded_grads.push(out);
        } else {
            cx.free(out);
        }
    }

    /// Whether gradients kept without sync are upcast to the reduce dtype (else they stay `.grad` and later
    /// micro-steps add into them in place).
    fn upcasts_kept_grads(&self) -> bool {
        self.reduce_bytes != self.grad_bytes
    }

    /// Whether `.grad` of the unsharded parameters is still there for the next micro-step to add into: only
    /// after a backward without sync that kept them as they are.
    pub fn unsharded_grads_kept(&self) -> bool {
        !self.sync && !self.upcasts_kept_grads()
    }

    /// The end of a micro-step's backward.
    fn end_backward(&mut self) {
        if self.sync {
            self.have_sharded_grads = true;
        }
    }

    /// `zero_grad(set_to_none=True)` freed the sharded gradients.
    pub fn grads_released(&mut self) {
        self.have_sharded_grads = false;
    }
}

// The hooks FSDP2 runs around each block (`cx.sim.layer` marks them in the executors) and around the root's
// forward and backward; each is nothing without FSDP.

/// Before block `l`'s forward: unshard it.
pub fn pre_forward(cx: &mut Ctx, l: u64) {
    if let Some(mut f) = cx.fsdp.take() {
        f.unshard(cx, l as usize, true);
        cx.fsdp = Some(f);
    }
}

/// After block `l`'s forward: reshard it with `reshard_after_forward`.
pub fn post_forward(cx: &mut Ctx, l: u64) {
    if let Some(mut f) = cx.fsdp.take() {
        if f.reshard_after_forward {
            f.reshard(cx, l as usize);
        }
        cx.fsdp = Some(f);
    }
}

/// Before block `l`'s backward (and its recompute, when checkpointed): unshard it, unless kept from the forward
/// or prefetched, and prefetch the block before it.
pub fn pre_backward(cx: &mut Ctx, l: u64) {
    if let Some(mut f) = cx.fsdp.take() {
        f.unshard(cx, l as usize, false);
        if l > 0 {
            f.prefetch(cx, l as usize - 1);
        }
        f.mark = cx.grads.len();
        cx.fsdp = Some(f);
    }
}

/// After block `l`'s backward: the gradients it made go to its post-backward.
pub fn post_backward(cx: &mut Ctx, l: u64) {
    if let Some(mut f) = cx.fsdp.take() {
        let grads = cx.grads.split_off(f.mark.min(cx.grads.len()));
        f.post_backward(cx, l as usize, grads);
        cx.fsdp = Some(f);
    }
}

/// The root's pre-forward (the model's call): unshard the root's parameters.
pub fn root_pre_forward(cx: &mut Ctx) {
    if let Some(mut f) = cx.fsdp.take() {
        let root = f.root();
        f.unshard(cx, root, true);
        cx.fsdp = Some(f);
    }
}

/// The model's call returns: the root reshards with `reshard_after_forward` (given to the root as well), then
/// lets the last all-gather output kept for overlap go.
pub fn root_post_forward(cx: &mut Ctx) {
    if let Some(mut f) = cx.fsdp.take() {
        if f.reshard_after_forward {
            let root = f.root();
            f.reshard(cx, root);
        }
        f.release_held_output(cx);
        cx.fsdp = Some(f);
    }
}

/// The backward starts from the root's outputs: the root is unsharded again and the last block prefetched.
pub fn root_pre_backward(cx: &mut Ctx) {
    if let Some(mut f) = cx.fsdp.take() {
        let root = f.root();
        f.unshard(cx, root, false);
        if root > 0 {
            f.prefetch(cx, root - 1);
        }
        cx.fsdp = Some(f);
    }
}

/// The end of the backward (`_root_post_backward_final_callback`): the root's post-backward with the gradients
/// left (the head's, the final norm's, the embeddings'), then its reduce-scatter input is let go.
pub fn root_post_backward(cx: &mut Ctx) {
    if let Some(mut f) = cx.fsdp.take() {
        let grads = std::mem::take(&mut cx.grads);
        let root = f.root();
        f.post_backward(cx, root, grads);
        if let Some(t) = f.rs_input.take() {
            cx.free(t);
        }
        f.release_held_output(cx);
        f.end_backward();
        cx.fsdp = Some(f);
    }
}

// Tensor parallelism: what DTensor allocates around one GPU's share of each layer (tests/data/parallel/README.md,
// "What tensor parallelism allocates"; the op orders from the stub-cuda snapshots of llama-tp2, llama-tp2-sp and
// llama-tp2-sp-fsdp2-mp). The executors walk `Parallel::tp_local`'s model, whose Linears are already one GPU's
// shards; these hooks add the redistributions between them, and are nothing without tensor parallelism.
// Collectives are functional (`_functional_collectives`): each returns a new tensor and its input is let go;
// on the sequence dimension (1, after the batch) the gathered chunks are laid out again by a `cat`.

/// An all-gather on the sequence: the flat output of every GPU's shard (`all_gather_into_tensor`), re-laid along
/// the sequence (`cat`), the flat one freed. `shard` is one GPU's bytes.
fn all_gather_seq(cx: &mut Ctx, shard: u64, category: Category) -> Tensor {
    let full = shard * cx.tp;
    let flat = cx.alloc(full, category, "all_gather_into_tensor");
    let out = cx.alloc(full, category, "cat");
    cx.free(flat);
    out
}

/// A reduce-scatter on the sequence of `input` (`full` bytes): the chunks re-laid for the collective (`cat`),
/// then this GPU's shard (`reduce_scatter_tensor`); the copy and the input are let go.
fn reduce_scatter_seq(cx: &mut Ctx, input: Tensor, full: u64, category: Category) -> Tensor {
    let laid = cx.alloc(full, Temporary, "cat");
    let out = cx.alloc(full / cx.tp, category, "reduce_scatter_tensor");
    cx.free(laid);
    cx.free(input);
    out
}

/// An all-reduce of a `Partial` tensor to `Replicate`: a new tensor of the same size (`all_reduce`), the partial
/// one let go.
fn all_reduce(cx: &mut Ctx, input: Tensor, category: Category) -> Tensor {
    let out = cx.alloc(cx.sim.bytes_of(input), category, "all_reduce");
    cx.free(input);
    out
}

/// What the colwise Linears of a branch (or, under sequence parallel, the head) read: under sequence parallel the
/// norm's sequence shard all-gathered (`PrepareModuleInput` to `Replicate`; the LM head's `ColwiseParallel` from
/// `Shard(1)`), a new N x C tensor in the norm's dtype, with the shard the module holds until it returns;
/// otherwise the norm's output itself.
pub fn tp_gather_input(cx: &mut Ctx, norm_out: Tensor) -> (Tensor, Option<Tensor>) {
    if !cx.sp {
        return (norm_out, None);
    }
    let shard = cx.ns * cx.m.n_embd * cx.r;
    (all_gather_seq(cx, shard, Activations), Some(norm_out))
}

/// A branch's output (o_proj's, down_proj's: `RowwiseParallel`, a `Partial` sum of every GPU's): all-reduced to
/// the full N x C (plan basic), or reduce-scattered to this GPU's sequence shard (sequence parallel).
pub fn tp_branch_output(cx: &mut Ctx, out: Tensor) -> Tensor {
    if cx.tp == 1 {
        return out;
    }
    if cx.sp {
        let full = cx.n * cx.m.n_embd * cx.p;
        return reduce_scatter_seq(cx, out, full, Temporary);
    }
    all_reduce(cx, out, Temporary)
}

/// The gradient entering a branch from the residual stream, under sequence parallel: the backward of the
/// output's reduce-scatter is an all-gather, of the gradient in the branch output's dtype (the residual add's
/// backward casts it first, on the shard). `given` is what the block already hands the branch (a post-norm's
/// gradient); plan basic and one GPU keep it.
pub fn tp_branch_grad(
    cx: &mut Ctx,
    g_residual: Tensor,
    given: Option<(Tensor, u64, bool)>,
) -> Option<(Tensor, u64, bool)> {
    if !cx.sp {
        return given;
    }
    let (g, bytes, owned) = given.unwrap_or((g_residual, cx.r, false));
    let p = cx.p;
    let shard = cx.ns * cx.m.n_embd;
    let cast = (bytes != p).then(|| cx.alloc(shard * p, Temporary, "_to_copy"));
    if cast.is_some() && owned {
        cx.free(g);
    }
    let gathered = all_gather_seq(cx, shard * p, Temporary);
    match cast {
        Some(c) => cx.free(c),
        None if owned => cx.free(g),
        None => {}
    }
    Some((gathered, p, true))
}

/// Plan basic: the gradient of one colwise Linear's input (`ColwiseParallel`, input `Replicate`), `Partial` over
/// the GPUs, is all-reduced as it leaves the Linear (the backward of the input's redistribution): a new tensor of
/// its size, the partial one let go (stub-cuda snapshot of llama-tp4: per block, an fp32 all-reduce after each of
/// up's and gate's input gradients, then v's, k's and q's). Nothing under sequence parallel (its Linears read the
/// gathered input; `tp_input_grad` reduce-scatters the sum) or on one GPU.
pub fn tp_colwise_input_grad(cx: &mut Ctx, g: Tensor) -> Tensor {
    if cx.tp == 1 || cx.sp {
        return g;
    }
    all_reduce(cx, g, Temporary)
}

/// The sum of a branch input's gradients, `acc` so far (`acc_fresh`: a tensor the input buffer holds alone, see
/// `ops::grad_accumulate`) and `g` (`n_bytes` each): on one GPU as `ops::grad_accumulate`; under sequence
/// parallel a new tensor (`ops::grad_sum`); under plan basic the all-reduced gradients are fresh tensors nothing
/// else holds, so autograd's input buffer adds each later one into the first in place and lets it go (the
/// snapshot of llama-tp4: no `add` between the all-reduces, each freed after the next Linear's).
pub fn tp_grad_sum(
    cx: &mut Ctx,
    (acc, acc_fresh): (Tensor, bool),
    g: Tensor,
    n_bytes: u64,
) -> Tensor {
    if cx.tp == 1 {
        return crate::tensors::grad_accumulate(cx, (acc, acc_fresh), g, n_bytes);
    }
    if cx.sp {
        return crate::tensors::grad_sum(cx, acc, g, n_bytes);
    }
    cx.free(g);
    acc
}

/// The gradient of a branch's input (its colwise Linears', summed) under sequence parallel: reduce-scattered to
/// the stream's sequence shard (`PrepareModuleInput`'s backward). Plan basic all-reduced each Linear's already
/// (`tp_colwise_input_grad`); one GPU has nothing to do.
pub fn tp_input_grad(cx: &mut Ctx, g: Tensor) -> Tensor {
    if cx.tp == 1 || !cx.sp {
        return g;
    }
    tp_head_input_grad(cx, g)
}

/// The gradient of the LM head's input under sequence parallel (`ColwiseParallel` from `Shard(1)`): reduce-scattered
/// to the final norm's sequence shard. A replicated head (plan basic) has a gradient of its own on every GPU.
pub fn tp_head_input_grad(cx: &mut Ctx, g: Tensor) -> Tensor {
    if !cx.sp {
        return g;
    }
    let full = cx.n * cx.m.n_embd * cx.r;
    reduce_scatter_seq(cx, g, full, Temporary)
}

/// Sequence parallel's embedding (`RowwiseParallel` on the vocabulary, output `Shard(1)`), before the lookup:
/// the tokens outside this GPU's rows as a mask (`bitwise_or` of two comparisons, a byte a token) and the ids
/// shifted into its rows (`sub`, int64).
pub fn tp_embedding_begin(cx: &mut Ctx) -> Option<[Tensor; 2]> {
    cx.sp.then(|| {
        let mask = cx.alloc(cx.n, Temporary, "bitwise_or");
        let ids = cx.alloc(cx.n * 8, Temporary, "sub");
        [mask, ids]
    })
}

/// After the lookup (`out`, N x C, a `Partial` with the masked rows zeroed): the temporaries go and the output is
/// reduce-scattered to this GPU's sequence shard of the residual stream.
pub fn tp_embedding_end(cx: &mut Ctx, out: Tensor, begun: Option<[Tensor; 2]>) -> Tensor {
    let Some([mask, ids]) = begun else {
        return out;
    };
    cx.free(ids);
    cx.free(mask);
    let full = cx.n * cx.m.n_embd * cx.pb;
    reduce_scatter_seq(cx, out, full, Activations)
}

/// The embedding's gradient from the stream under sequence parallel: the reduce-scatter's backward, an
/// all-gather of the shard's gradient to N x C before the dense backward over this GPU's rows.
pub fn tp_embedding_grad(cx: &mut Ctx, g: Tensor) -> Tensor {
    if !cx.sp {
        return g;
    }
    let shard = cx.ns * cx.m.n_embd * cx.r;
    let out = all_gather_seq(cx, shard, Temporary);
    cx.free(g);
    out
}

/// What `loss_parallel()`'s cross-entropy keeps from its forward for the backward.
pub struct LossParallel {
    /// The log-probabilities in the logits' dtype.
    log_probs: Tensor,
    /// nll_loss's fp32 copy of them under autocast (nll_loss is on autocast's fp32 list).
    nll_input: Option<Tensor>,
}

/// `F.cross_entropy` under `loss_parallel()` on logits sharded on the vocabulary (`nv`: N x V/tp elements in
/// `cx.p`): its log-softmax works in fp32 (a copy of 2-byte logits), the max and the sum of exponentials
/// all-reduced over the GPUs ([N] fp32 each), `x - max`, `exp` (freed once summed), `- log(sum)`, the result cast
/// back to the logits' dtype (saved); then nll_loss, on an fp32 copy under autocast (saved). The masked targets
/// are the targets' own (`targets`, kept by the caller). Stub-cuda snapshots of llama-tp2-sp (bf16-amp) and
/// llama-tp2-sp-fsdp2-mp (bf16 without autocast).
pub fn loss_parallel_fwd(cx: &mut Ctx, nv: u64) -> LossParallel {
    let (n, p) = (cx.n, cx.p);
    let copy = (p != 4).then(|| cx.alloc(nv * 4, Logits, "_to_copy"));
    let amax = cx.alloc(n * 4, Temporary, "amax");
    let max = all_reduce(cx, amax, Temporary);
    let shifted = cx.alloc(nv * 4, Logits, "sub");
    let exp = cx.alloc(nv * 4, Logits, "exp");
    let sum = cx.alloc(n * 4, Temporary, "sum");
    cx.free(exp);
    let sum = all_reduce(cx, sum, Temporary);
    let log = cx.alloc(n * 4, Temporary, "log");
    cx.free(sum);
    let lp32 = cx.alloc(nv * 4, Logits, "sub");
    let log_probs = if p != 4 {
        let lp = cx.alloc(nv * p, Logits, "_to_copy");
        cx.free(lp32);
        lp
    } else {
        lp32
    };
    cx.sim.free_some(&[copy]);
    cx.sim.free_all(&[shifted, log, max]);
    let nll_input = cx
        .prec
        .autocast()
        .then(|| cx.alloc(nv * 4, Logits, "_to_copy"));
    LossParallel {
        log_probs,
        nll_input,
    }
}

/// The masked targets `loss_parallel`'s nll_loss works on: the ids shifted into this GPU's vocabulary rows
/// (int64, one per token).
pub fn loss_parallel_targets(cx: &mut Ctx) -> Tensor {
    cx.alloc(cx.n * 8, Activations, "sub")
}

/// `loss_parallel`'s joint nll_loss and log-softmax backward, in the dtype nll_loss saw (fp32 under autocast, else
/// the logits'): the gradient buffer, `exp` of the saved log-probabilities, `+`, `*` (the gradient), then the
/// saved tensors go; under autocast the gradient is cast back to the logits' dtype. Returns the logits' gradient.
pub fn loss_parallel_bwd(cx: &mut Ctx, nv: u64, l: LossParallel, targets: Tensor) -> Tensor {
    let b = if l.nll_input.is_some() { 4 } else { cx.p };
    let grad = cx.alloc(nv * b, Logits, "empty_strided");
    let exp = cx.alloc(nv * b, Logits, "exp");
    let add = cx.alloc(nv * b, Logits, "add");
    cx.free(exp);
    let mut g = cx.alloc(nv * b, Logits, "mul");
    cx.free(add);
    cx.free(grad);
    cx.sim.free_some(&[l.nll_input]);
    cx.free(targets);
    if b != cx.p {
        let cast = cx.alloc(nv * cx.p, Logits, "_to_copy");
        cx.free(g);
        g = cast;
    }
    cx.free(l.log_probs);
    g
}

/// The setup the executors run: FSDP's `param_dtype` makes the step compute in it (no autocast), as pure bf16
/// does; under tensor parallelism the model is one GPU's share of it (`Parallel::tp_local`); everything else
/// as given.
pub fn compute_setup(setup: &Setup) -> Setup {
    let mut s = setup.clone();
    let p = &setup.train.parallel;
    s.train.precision = p.compute_precision(setup.train.precision);
    s.model = p.tp_local(&setup.model);
    s
}

/// Whether the setup runs under a wrapper that changes the step (not one GPU).
pub fn strategy(setup: &Setup) -> Strategy {
    setup.train.parallel.strategy
}

#[cfg(test)]
mod tests {
    use super::broadcast_buckets;

    /// `broadcast_coalesced`'s buckets: one per dtype, closed once at the limit (overshooting it), the rest at the
    /// end, in the order of their first tensor. llama-lora-ddp-w2 by hand: 56,763,392 B of bf16 base and
    /// 2,367,488 B of fp32 adapters, interleaved, make two buckets under 250 MiB.
    #[test]
    fn broadcast_buckets_are_per_dtype_in_first_tensor_order() {
        assert_eq!(
            broadcast_buckets(&[(56_763_392, 2), (2_367_488, 4)], 250 << 20),
            vec![56_763_392, 2_367_488]
        );
        // Limit 10: bf16 3 + 8 closes at 11 (first tensor 0); the fp32 bucket opened at index 1 (4 + 4) stays
        // open to the end; the last bf16 tensor (5) opens a new bucket at index 4.
        assert_eq!(
            broadcast_buckets(&[(3, 2), (4, 4), (8, 2), (4, 4), (5, 2)], 10),
            vec![11, 8, 5]
        );
        // One dtype under the limit: one bucket, the whole model (the DDP records' single flatten).
        assert_eq!(broadcast_buckets(&[(6, 4), (7, 4)], 250 << 20), vec![13]);
    }

    /// The rebuilt bucket sizes the records' reducer logged (`rebuilt_bucket_sizes`), from the order the
    /// simulated backward makes the gradients ready in: the buckets step 2 allocates.
    #[test]
    fn ddp_buckets_are_the_records() {
        let buckets = |json: serde_json::Value| -> Vec<i64> {
            let s = crate::input::setup_from_value(&json).unwrap();
            let sim = crate::step::simulate_recording(&s, true).unwrap();
            sim.events()
                .iter()
                .filter(|e| e.op == "ddp_bucket" && e.phase.starts_with("step 2"))
                .map(|e| e.bytes)
                .collect()
        };
        let gpt = |par: serde_json::Value| {
            serde_json::json!({"model": {"family": "gpt2", "n_layer": 4, "n_head": 6, "n_embd": 384,
                "vocab_size": 16384, "block_size": 256, "bias": false},
                "train": {"batch_size": 1, "seq_len": 64, "precision": "bf16-amp", "parallel": par}})
        };
        let blocks = |v: &[i64]| -> Vec<i64> { v.iter().map(|b| (b + 511) / 512 * 512).collect() };
        assert_eq!(
            buckets(gpt(serde_json::json!({"strategy": "ddp", "gpus": 2}))),
            blocks(&[2_360_832, 26_357_760, 25_165_824])
        );
        assert_eq!(
            buckets(gpt(
                serde_json::json!({"strategy": "ddp", "gpus": 8, "bucket_cap_mb": 5})
            )),
            blocks(&[5_311_488, 6_489_600, 7_080_960, 7_080_960, 27_921_408])
        );
        // static_graph keeps the first assignment: no rebuild.
        assert_eq!(
            buckets(gpt(
                serde_json::json!({"strategy": "ddp", "gpus": 2, "static_graph": true})
            )),
            Vec::<i64>::new()
        );
        let llama = serde_json::json!({"model": {"family": "llama", "n_layer": 4, "n_head": 8, "n_kv_head": 4,
            "n_embd": 512, "intermediate_size": 1376, "vocab_size": 16384, "block_size": 256,
            "tie_embeddings": false},
            "train": {"batch_size": 1, "seq_len": 64, "precision": "bf16-amp", "grad_accum_steps": 2,
                      "parallel": {"strategy": "ddp", "gpus": 2}}});
        assert_eq!(
            buckets(llama),
            blocks(&[33_554_432, 28_846_080, 51_126_272])
        );
    }

    /// `static_graph=True`: `_DDPSink` clones the model's outputs in the first forward only (gpt-ddp-w2-static's
    /// snapshot: the bf16 logits, 8 x 256 x 16384 x 2 = 67,108,864 B, cloned after the loss), then lets the
    /// model's go; the default DDP clones nothing.
    #[test]
    fn static_graph_clones_the_first_forwards_logits() {
        let clones = |static_graph: bool| -> Vec<(String, i64)> {
            let json = serde_json::json!({"model": {"family": "gpt2", "n_layer": 4, "n_head": 6, "n_embd": 384,
                "vocab_size": 16384, "block_size": 256, "bias": false},
                "train": {"batch_size": 8, "seq_len": 256, "precision": "bf16-amp",
                          "parallel": {"strategy": "ddp", "gpus": 2, "static_graph": static_graph}}});
            let s = crate::input::setup_from_value(&json).unwrap();
            let sim = crate::step::simulate_recording(&s, true).unwrap();
            sim.events()
                .iter()
                .filter(|e| e.op == "clone")
                .map(|e| (e.phase.clone(), e.bytes))
                .collect()
        };
        let c = clones(true);
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].0.starts_with("step 1 loss"), "{c:?}");
        assert_eq!(c[0].1, 8 * 256 * 16384 * 2);
        assert!(clones(false).is_empty());
    }

    /// Tensor parallelism alone builds the whole model, then shards it (`parallelize_module`): at tp 4 the
    /// Llama of the records (hidden 512, 8 / 4 heads of 64, intermediate 1376, 4 layers) allocates 2 x 4 layers
    /// rowwise weights' chunks (o_proj 512 x 128 and down_proj 512 x 344, fp32: 4 chunks each) and one shard per
    /// sharded parameter (q, k, v, o, gate, up, down: 7 a layer), and frees each full parameter.
    #[test]
    fn tensor_parallel_shards_the_whole_model_built_on_the_device() {
        let json = serde_json::json!({"model": {"family": "llama", "n_layer": 4, "n_head": 8, "n_kv_head": 4,
            "n_embd": 512, "intermediate_size": 1376, "vocab_size": 16384, "block_size": 256,
            "tie_embeddings": false},
            "train": {"batch_size": 4, "seq_len": 256, "precision": "bf16-amp",
                      "parallel": {"strategy": "single", "gpus": 4, "tp": 4,
                                   "init_on_device": true}}});
        let s = crate::input::setup_from_value(&json).unwrap();
        let sim = crate::step::simulate_recording(&s, true).unwrap();
        let init: Vec<_> = sim
            .events()
            .iter()
            .filter(|e| e.phase.starts_with("step 0"))
            .collect();
        let chunks: Vec<i64> = init
            .iter()
            .filter(|e| e.op == "clone" && e.bytes > 0)
            .map(|e| e.bytes)
            .collect();
        let o = 512 * 128 * 4;
        let down = 512 * 344 * 4;
        assert_eq!(chunks.len(), 4 * 2 * 4);
        assert_eq!(chunks[..4], [o; 4]);
        assert_eq!(chunks[4..8], [down; 4]);
        let shards = init.iter().filter(|e| e.op == "_shard_tensor").count();
        assert_eq!(shards, 4 * 7);
        // The full parameters are freed: q_proj's 512 x 512 fp32 among them.
        let full_freed = init.iter().filter(|e| e.bytes == -(512 * 512 * 4)).count();
        assert_eq!(full_freed, 4 * 2);
        // Plan basic's backward all-reduces each colwise Linear's input gradient (fp32, 4 x 256 x 512 x 4 B):
        // up's and gate's, then v's, k's and q's, five a block, each summed in place into the first (no `add`
        // among a branch's all-reduces).
        let block3: Vec<_> = sim
            .events()
            .iter()
            .filter(|e| e.phase == "step 1 backward (block 3)" && e.bytes > 0)
            .collect();
        let at: Vec<usize> = (0..block3.len())
            .filter(|&i| block3[i].op == "all_reduce")
            .collect();
        assert_eq!(at.len(), 5);
        assert!(at.iter().all(|&i| block3[i].bytes == 4 * 256 * 512 * 4));
        for (from, to) in [(at[0], at[1]), (at[2], at[4])] {
            assert!(block3[from..to].iter().all(|e| e.op != "add"));
        }
        // Built on the meta device (the default): only this GPU's shards are ever allocated.
        let mut meta = s.clone();
        meta.train.parallel.init_on_device = false;
        let sim = crate::step::simulate_recording(&meta, true).unwrap();
        let init: Vec<_> = sim
            .events()
            .iter()
            .filter(|e| e.phase.starts_with("step 0"))
            .collect();
        assert!(init.iter().all(|e| e.bytes > 0 && e.op != "_shard_tensor"));
        assert!(
            !init.iter().any(|e| e.bytes == 512 * 512 * 4),
            "no full q_proj"
        );
        assert!(
            init.iter().any(|e| e.bytes == 128 * 512 * 4),
            "q_proj's shard"
        );
    }

    /// Llama-3.1-70B over tp 8 on one node: built whole on each GPU its fp32 parameters (70.6B x 4 B, 263 GiB)
    /// pass through the GPU, so the peak is at init; built on the meta device the peak is a training step's
    /// (179 GiB: fp32 shards with a replicated 128256 x 8192 embedding and head, AdamW's state, activations),
    /// lower, and above an eighth of the weights.
    #[test]
    fn a_model_too_large_for_one_gpu_is_built_on_the_meta_device_by_default() {
        let mut s = crate::presets::model_preset("llama-3.1-70b").unwrap();
        s.train.parallel = crate::parallel::Parallel {
            gpus: 8,
            tp: 8,
            ..Default::default()
        };
        let meta = crate::estimate(&s).unwrap();
        s.train.parallel.init_on_device = true;
        let device = crate::estimate(&s).unwrap();
        assert_eq!(device.peak_phase, "step 0 init");
        assert!(device.peak_allocated_bytes >= 70_553_706_496 * 4);
        assert!(
            !meta.peak_phase.starts_with("step 0"),
            "{}",
            meta.peak_phase
        );
        assert!(meta.peak_allocated_bytes < device.peak_allocated_bytes);
        assert!(meta.peak_allocated_bytes > 70_553_706_496 * 4 / 8);
    }

    /// Sequence parallel alone: the embedding's gradient is the whole 16384 x 512 fp32 table (Replicate), and
    /// each AdamW (foreach) step shards it three times (one copy for `_foreach_lerp_`, two for `_foreach_addcmul_`) into
    /// this GPU's 4096 rows; under FSDP2 (TP x FSDP2) neither.
    #[test]
    fn sequence_parallel_embedding_gradient_is_replicated() {
        let run = |strategy: &str, gpus: u64| {
            let json = serde_json::json!({"model": {"family": "llama", "n_layer": 4, "n_head": 8,
                "n_kv_head": 4, "n_embd": 512, "intermediate_size": 1376, "vocab_size": 16384,
                "block_size": 256, "tie_embeddings": false},
                "train": {"batch_size": 4, "seq_len": 256, "precision": "bf16-amp", "optimizer": "adamw",
                          "parallel": {"strategy": strategy, "gpus": gpus, "tp": 4,
                                       "sequence_parallel": true}}});
            let s = crate::input::setup_from_value(&json).unwrap();
            let sim = crate::step::simulate_recording(&s, true).unwrap();
            let grads: Vec<i64> = sim
                .events()
                .iter()
                .filter(|e| e.op == "embedding_dense_backward" && e.phase.starts_with("step 1"))
                .map(|e| e.bytes)
                .collect();
            let copies: Vec<i64> = sim
                .events()
                .iter()
                .filter(|e| e.op == "_replicate_to_shard" && e.phase.starts_with("step 1"))
                .map(|e| e.bytes)
                .collect();
            (grads, copies)
        };
        let (grads, copies) = run("single", 4);
        assert_eq!(grads, [16384 * 512 * 4]);
        assert_eq!(copies, [4096 * 512 * 4; 3]);
        let (grads, copies) = run("fsdp", 8);
        assert_eq!(grads, [4096 * 512 * 4]);
        assert!(copies.is_empty());
    }
}
