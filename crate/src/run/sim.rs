//! The allocation timeline of one run: every tensor PyTorch's CUDA caching allocator hands out, in order, with
//! the moment it is freed. `torch.cuda.max_memory_allocated()` is the peak of the allocator's own counter, the
//! blocks handed out at their size (`Sim::peak`); `live_bytes`, the tensors alone, peaks at or below it
//! (`Sim::tensor_peak`).
//!
//! Every block the caching allocator returns is a multiple of 512 bytes (`kMinBlockSize` in
//! c10/cuda/CUDACachingAllocator.cpp), and a zero-byte tensor takes no block; `alloc` rounds the same way.
//! Every allocation and free also goes to a model of the caching allocator itself (`allocator`), whose segments
//! are the reserved memory (`torch.cuda.max_memory_reserved()`).

use crate::allocator::{AllocatorConfig, CachingAllocator, Stream};
use crate::reorder;

/// What a live byte is for. The report's components are these, summed at the peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Category {
    /// Parameters and registered buffers, in their storage dtype (under LoRA: the frozen base, less what the
    /// next two name).
    Weights,
    /// A bitsandbytes base's quantized Linear weights with their quantization state (`Params4bit`'s packed
    /// 4-bit weight and absmax, `Int8Params`' int8 weight and row scales): frozen, never given a `.grad`.
    QuantizedWeights,
    /// What peft adds and trains: each adapted Linear's LoRA A and B, and `modules_to_save`'s trained copies.
    Adapters,
    /// Autocast's low-precision copies of the weights, cached for the forward and saved for backward.
    WeightCopies,
    /// `.grad` of every parameter.
    Grads,
    /// Optimizer state (AdamW exp_avg / exp_avg_sq / step, SGD momentum buffers).
    Optimizer,
    /// Tensors saved for backward (and the batch itself), per block and in the embedding.
    Activations,
    /// LM-head output, its casts, log-softmax, and their gradients: everything B x T x vocab.
    Logits,
    /// Short-lived buffers: activation gradients, op outputs not saved, foreach temporaries.
    Temporary,
    /// Scratch the CUDA libraries allocate through PyTorch: cuBLAS workspaces, attention-backward scratch.
    Workspace,
}

pub const N_CATEGORIES: usize = 10;

impl Category {
    pub const ALL: [Category; N_CATEGORIES] = [
        Category::Weights,
        Category::QuantizedWeights,
        Category::Adapters,
        Category::WeightCopies,
        Category::Grads,
        Category::Optimizer,
        Category::Activations,
        Category::Logits,
        Category::Temporary,
        Category::Workspace,
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The caching allocator's rounding: 512-byte blocks, nothing for an empty tensor.
#[inline]
pub fn block_bytes(n_bytes: u64) -> u64 {
    n_bytes.div_ceil(512) * 512
}

/// What `cudaMalloc` can reserve on a device of `device_memory_bytes` (0: unknown, unlimited) once the CUDA
/// context and libraries have taken `cuda_context_bytes` outside PyTorch's allocator.
pub fn allocator_capacity(device_memory_bytes: u64, cuda_context_bytes: u64) -> u64 {
    if device_memory_bytes == 0 {
        u64::MAX
    } else {
        device_memory_bytes.saturating_sub(cuda_context_bytes)
    }
}

/// A handle to one allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tensor(usize);

#[derive(Debug, Clone)]
struct Slot {
    bytes: u64,
    category: Category,
    live: bool,
    /// Held by a reference outside the owners that free it (`Sim::hold`): a free waits for `release_hold`.
    held: bool,
    /// Freed by its owner while held: `release_hold` frees it.
    let_go: bool,
    /// The caching allocator's caller id of the block this tensor lives in: its own index, or, for a buffer
    /// Inductor's wrapper handed a dead one to (`# reuse`), that buffer's block.
    block: u32,
    /// Allocated in the compiled graph under way (`Sim::begin_graph`) and not yet freed there.
    pending: bool,
    /// Freed in the compiled graph under way, not yet replayed.
    doomed: bool,
    /// The bytes asked for and the elements' width (`alloc_typed`): Inductor's reuse key.
    key: (u64, u64),
}

/// Where in the step an allocation happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// 1-based training step.
    pub step: u32,
    /// "forward", "loss", "backward", "optimizer".
    pub stage: &'static str,
    /// Block index for forward/backward inside the transformer stack, if any.
    pub layer: Option<u32>,
}

impl Phase {
    pub fn label(&self) -> String {
        match self.layer {
            Some(l) => format!("step {} {} (block {})", self.step, self.stage, l),
            None => format!("step {} {}", self.step, self.stage),
        }
    }
}

/// The allocated bytes of a run at their highest point, with what they were for.
#[derive(Debug, Clone)]
pub struct Peak {
    pub bytes: u64,
    /// The live tensors at that moment, by what they are for.
    pub by_category: [u64; N_CATEGORIES],
    /// What the caching allocator counts beyond those tensors at that moment: a large-pool block is split only
    /// when more than 1 MiB would be left (`kSmallSize`), so a tensor served from a larger cached block holds
    /// the whole block (`CachingAllocator`'s `allocated_bytes`). `bytes` is the tensors plus this.
    pub block_remainder_bytes: u64,
    pub phase: Phase,
    /// The op whose allocation made the peak (PyTorch's name for it).
    pub op: &'static str,
}

/// One point of the memory timeline: the highest live bytes within a stage of a step.
#[derive(Debug, Clone)]
pub struct TimelinePoint {
    pub step: u32,
    pub stage: &'static str,
    pub peak_bytes: u64,
    pub end_bytes: u64,
}

/// The allocator's view of a run.
#[derive(Debug, Clone)]
pub struct Sim {
    slots: Vec<Slot>,
    live_bytes: u64,
    by_category: [u64; N_CATEGORIES],
    phase: Phase,
    /// The peak of the caching allocator's `allocated_bytes` counter (while it is replayed).
    peak: Peak,
    /// The peak of `live_bytes`.
    tensor_peak: Peak,
    step_peaks: Vec<u64>,
    timeline: Vec<TimelinePoint>,
    /// The caching allocator serving every allocation, by slot index: its segments are the reserved memory.
    allocator: CachingAllocator,
    /// Whether allocations go to `allocator` (not for runs read only for their live bytes).
    replay: bool,
    /// Reserved memory past which the allocator is no longer replayed (`stop_replay_above`).
    replay_limit: u64,
    /// The stream allocations are made on (`torch.cuda.stream(...)`'s current stream; `set_stream`).
    stream: Stream,
    /// Every allocation and free, when recording (for comparing with a measured trace).
    events: Option<Vec<Event>>,
    /// The compiled graph under way, whose allocations wait for its memory plan (`begin_graph`).
    graph: Option<Graph>,
    /// Allocations made now are an extern kernel's own outputs, which the wrapper never plans (`set_extern`).
    extern_outputs: bool,
    /// Buffers whose last reader is a fused kernel not yet made (`free_after_next_kernel`).
    read_by_next_kernel: Vec<Tensor>,
    /// The order Inductor's memory-ordering pass kept for each described compiled graph (`described`).
    orders: Vec<reorder::Method>,
}

/// One compiled graph's allocations and frees, held back until the graph ends (`Sim::begin_graph`).
#[derive(Debug, Clone)]
struct Graph {
    /// The first tensor index allocated in the graph: older tensors are its inputs.
    first: usize,
    /// Inputs the graph wrote over in place (`adopt`): its own buffers from then on.
    adopted: Vec<u32>,
    ops: Vec<GraphOp>,
    /// Inputs Inductor never counts as freeable (`fixed_input`).
    fixed: Vec<u32>,
    /// Every kernel was described (`kernel`, `described`): Inductor's memory-ordering pass decides the order.
    described: bool,
}

#[derive(Debug, Clone)]
enum GraphOp {
    /// An allocation: the bytes the buffer asks for and its elements' width (Inductor's reuse key), whether the
    /// wrapper allocates it
    /// (`AllocateLine`; not an extern kernel's own output).
    Alloc {
        id: u32,
        key: (u64, u64),
        op: &'static str,
        planned: bool,
    },
    Free(u32),
    Scratch {
        n_bytes: u64,
        category: Category,
        op: &'static str,
    },
    Stage(u32, &'static str),
    Layer(Option<u32>),
    /// A buffer Inductor's scheduler counts for the kernel under way though its code never allocates it (an
    /// intermediate fused into the kernel, `Sim::phantom`): part of the memory-ordering pass's estimate only.
    Phantom(u64),
    /// A kernel (a scheduler node) starts: the allocations up to the next one are its outputs; it reads `reads`
    /// and whatever is freed after it; it may write its output over input `over` in place (`Sim::kernel`).
    Kernel {
        reads: Vec<u32>,
        over: Option<u32>,
        writes: Option<u32>,
    },
}

/// One allocator event: bytes > 0 allocates, < 0 frees.
#[derive(Debug, Clone)]
pub struct Event {
    /// The tensor allocated or freed (its `Tensor` index; the caching allocator's caller id).
    pub id: u32,
    pub category: Category,
    pub phase: String,
    pub op: &'static str,
    pub bytes: i64,
    pub live_bytes: u64,
    /// The caching allocator's reserved bytes after the event.
    pub reserved_bytes: u64,
}

impl Sim {
    /// A timeline whose allocations go to a caching allocator configured as `allocator`, on a device where
    /// `cudaMalloc` can reserve `capacity_bytes` (`u64::MAX`: unlimited).
    pub fn new(allocator: AllocatorConfig, capacity_bytes: u64) -> Sim {
        let phase = Phase {
            step: 0,
            stage: "init",
            layer: None,
        };
        let peak = Peak {
            bytes: 0,
            by_category: [0; N_CATEGORIES],
            block_remainder_bytes: 0,
            phase: phase.clone(),
            op: "",
        };
        Sim {
            slots: Vec::with_capacity(4096),
            live_bytes: 0,
            by_category: [0; N_CATEGORIES],
            tensor_peak: peak.clone(),
            peak,
            phase,
            step_peaks: Vec::new(),
            timeline: Vec::new(),
            allocator: CachingAllocator::new(allocator, capacity_bytes),
            replay: true,
            replay_limit: u64::MAX,
            stream: Stream::DEFAULT,
            events: None,
            graph: None,
            extern_outputs: false,
            read_by_next_kernel: Vec::new(),
            orders: Vec::new(),
        }
    }

    /// A timeline that only counts live bytes, without replaying the caching allocator (a quarter of the
    /// cost): for runs read only for what is live, such as the per-block activations.
    pub fn counting_only() -> Sim {
        Sim {
            replay: false,
            ..Sim::new(AllocatorConfig::default(), u64::MAX)
        }
    }

    /// Enters a stage of a step; the timeline gets one point per stage.
    pub fn stage(&mut self, step: u32, stage: &'static str) {
        if let Some(g) = self.graph.as_mut() {
            g.ops.push(GraphOp::Stage(step, stage));
            return;
        }
        self.phase = Phase {
            step,
            stage,
            layer: None,
        };
        self.timeline.push(TimelinePoint {
            step,
            stage,
            peak_bytes: self.live_bytes,
            end_bytes: self.live_bytes,
        });
    }

    /// Enters another stage of the step under way (the loss, then the backward through the blocks).
    pub fn next_stage(&mut self, stage: &'static str) {
        self.stage(self.phase.step, stage);
    }

    pub fn layer(&mut self, layer: Option<u32>) {
        if let Some(g) = self.graph.as_mut() {
            g.ops.push(GraphOp::Layer(layer));
            return;
        }
        self.phase.layer = layer;
    }

    /// Makes `stream` the current stream (`with torch.cuda.stream(stream):`): the allocations that follow take
    /// their blocks from its pool. Returns the stream that was current, for the caller to put back.
    pub fn set_stream(&mut self, stream: Stream) -> Stream {
        std::mem::replace(&mut self.stream, stream)
    }

    /// Allocates `n_bytes` (rounded to the allocator's block size) for `op`, on the current stream.
    #[inline]
    pub fn alloc(&mut self, n_bytes: u64, category: Category, op: &'static str) -> Tensor {
        self.alloc_typed(n_bytes, 0, category, op)
    }

    /// `alloc` of a buffer of `width`-byte elements (0: not said). In a compiled graph the width stands for the
    /// dtype of Inductor's reuse key (`plan_reuse`).
    #[inline]
    pub fn alloc_typed(
        &mut self,
        n_bytes: u64,
        width: u64,
        category: Category,
        op: &'static str,
    ) -> Tensor {
        let bytes = block_bytes(n_bytes);
        let id = self.slots.len() as u32;
        let in_graph = self.graph.is_some();
        self.slots.push(Slot {
            bytes,
            category,
            live: !in_graph,
            held: false,
            let_go: false,
            block: id,
            pending: in_graph,
            doomed: false,
            key: (n_bytes, width),
        });
        if let Some(g) = self.graph.as_mut() {
            g.ops.push(GraphOp::Alloc {
                id,
                key: (n_bytes, width),
                op,
                planned: !self.extern_outputs,
            });
        } else {
            self.account_alloc(id, bytes, category, op);
        }
        Tensor(id as usize)
    }

    /// A compiled graph's allocation replayed (`end_graph`): slot `id` becomes live in a new block, or in the
    /// block of `reused` (a dead buffer the wrapper hands it).
    fn commit_alloc(&mut self, id: u32, reused: Option<u32>, op: &'static str) {
        let slot = &mut self.slots[id as usize];
        slot.live = true;
        slot.pending = false;
        let (bytes, category) = (slot.bytes, slot.category);
        if let Some(old) = reused {
            // The block passes from the dead buffer to the new one: nothing is allocated or freed.
            let old_slot = &mut self.slots[old as usize];
            old_slot.live = false;
            let (block, old_category) = (old_slot.block, old_slot.category);
            self.slots[id as usize].block = block;
            self.by_category[old_category.index()] -= bytes;
            self.by_category[category.index()] += bytes;
            return;
        }
        self.account_alloc(id, bytes, category, op);
    }

    /// Live slot `id` (`bytes` of `category`) in a block of its own: the counters, the caching allocator, the
    /// step's and the stage's peaks, the event. Inline: the path of every allocation outside a compiled graph.
    #[inline]
    fn account_alloc(&mut self, id: u32, bytes: u64, category: Category, op: &'static str) {
        self.live_bytes += bytes;
        self.by_category[category.index()] += bytes;
        // Past the capacity the allocator keeps going (counting the OOM), so the run shows how far it overshoots.
        if self.replay && bytes > 0 {
            self.allocator.malloc_overcommitting(id, bytes, self.stream);
            self.check_replay_limit();
        }
        let step = self.phase.step as usize;
        if self.step_peaks.len() <= step {
            self.step_peaks.resize(step + 1, 0);
        }
        self.step_peaks[step] = self.step_peaks[step].max(self.live_bytes);
        if let Some(point) = self.timeline.last_mut() {
            point.peak_bytes = point.peak_bytes.max(self.live_bytes);
            point.end_bytes = self.live_bytes;
        }
        if let Some(ev) = self.events.as_mut() {
            ev.push(Event {
                id,
                category,
                phase: self.phase.label(),
                op,
                bytes: bytes as i64,
                live_bytes: self.live_bytes,
                reserved_bytes: self.allocator.reserved_bytes(),
            });
        }
        if self.live_bytes > self.tensor_peak.bytes {
            self.tensor_peak = Peak {
                bytes: self.live_bytes,
                by_category: self.by_category,
                block_remainder_bytes: 0,
                phase: self.phase.clone(),
                op,
            };
        }
        // The counter only rises on an allocation, so a new peak of it is this one's (or, for `scratch`, that of
        // the scratch block the allocator has just served and taken back: this tensor is its stand-in). It holds
        // every live tensor, but for a request larger than any device, which the allocator refuses outright.
        let counted = self.allocator.peak_allocated_bytes().max(self.live_bytes);
        if counted > self.peak.bytes {
            self.peak = Peak {
                bytes: counted,
                by_category: self.by_category,
                block_remainder_bytes: counted.saturating_sub(self.live_bytes),
                phase: self.phase.clone(),
                op,
            };
        }
    }

    /// Allocates and frees at once: scratch a kernel uses only while it runs. The allocator takes it in one call
    /// (`CachingAllocator::scratch_overcommitting`), which skips the split and merge a cached block would see.
    pub fn scratch(&mut self, n_bytes: u64, category: Category, op: &'static str) {
        if let Some(g) = self.graph.as_mut() {
            g.ops.push(GraphOp::Scratch {
                n_bytes,
                category,
                op,
            });
            return;
        }
        let replay = self.replay;
        let bytes = block_bytes(n_bytes);
        if replay && bytes > 0 {
            self.allocator
                .scratch_overcommitting(self.slots.len() as u32, bytes, self.stream);
        }
        self.replay = false;
        let t = self.alloc(n_bytes, category, op);
        self.free(t);
        self.replay = replay;
        if replay {
            self.check_replay_limit();
        }
    }

    /// A compiled graph starts: Inductor's generated wrapper runs it, and its memory planning
    /// (`PythonWrapperCodegen.memory_plan_reuse` in torch/_inductor/codegen/wrapper.py, on by default as
    /// `config.allow_buffer_reuse`) decides which buffers are really freed. Until `end_graph` the graph's
    /// allocations and frees are held back; there they are planned (`plan_reuse`) and replayed.
    pub fn begin_graph(&mut self) {
        debug_assert!(self.graph.is_none(), "graphs do not nest");
        self.graph = Some(Graph {
            first: self.slots.len(),
            adopted: Vec::new(),
            ops: Vec::new(),
            fixed: Vec::new(),
            described: false,
        });
    }

    /// The kernel under way (`kernel`) has an intermediate of `bytes` that Inductor's scheduler realizes as a
    /// buffer of its own, nobody else reads and its code never allocates: it counts in the memory-ordering pass's
    /// estimate, not in memory.
    pub fn phantom(&mut self, bytes: u64) {
        if let Some(g) = self.graph.as_mut() {
            g.ops.push(GraphOp::Phantom(bytes));
        }
    }

    /// The compiled graph under way runs a new kernel (one of Inductor's scheduler nodes): the allocations that
    /// follow, until the next kernel, are its outputs; it reads `reads` and, last, whatever is freed after it.
    /// `over`: an input it writes its output over in place when it is that input's last reader (Inductor's
    /// in-place reuse, `codegen_inplace_reuse`: a pointwise kernel whose output matches the input's size).
    pub fn kernel(&mut self, reads: &[Option<Tensor>], over: Option<Tensor>) {
        self.push_kernel(reads, over, None);
    }

    /// A kernel (as `kernel`) that writes its result into `target`, a buffer of the graph, in place: later
    /// readers of `target` follow it.
    pub fn kernel_writing(&mut self, reads: &[Option<Tensor>], target: Tensor) {
        self.push_kernel(reads, None, Some(target));
    }

    fn push_kernel(
        &mut self,
        reads: &[Option<Tensor>],
        over: Option<Tensor>,
        writes: Option<Tensor>,
    ) {
        if let Some(g) = self.graph.as_mut() {
            g.ops.push(GraphOp::Kernel {
                reads: reads.iter().flatten().map(|t| t.0 as u32).collect(),
                over: over.map(|t| t.0 as u32),
                writes: writes.map(|t| t.0 as u32),
            });
        }
    }

    /// `t`, read by the graph under way, is an input Inductor never counts as freeable (the forward's own inputs
    /// and the tangents: `is_nonfreeable_buffers`); it is still freed after its last reader.
    pub fn fixed_input(&mut self, t: Tensor) {
        if let Some(g) = self.graph.as_mut() {
            g.fixed.push(t.0 as u32);
        }
    }

    /// Every kernel of the graph under way has been described (`kernel`): at its end Inductor's memory-ordering
    /// pass (`reorder`) decides the order it runs in.
    pub fn described(&mut self) {
        if let Some(g) = self.graph.as_mut() {
            g.described = true;
        }
    }

    /// The graph under way writes a kernel's output over input `t`, which dies there (a saved tensor donated to
    /// the backward, `codegen_inplace_reuse`): the buffer is the graph's from then on, and pooled when it dies.
    pub fn adopt(&mut self, t: Tensor) {
        if let Some(g) = self.graph.as_mut() {
            g.adopted.push(t.0 as u32);
        }
    }

    /// Allocations from now on are (`true`) or are not an extern kernel's own outputs: a fallback op such as
    /// SDPA's allocates its outputs itself (`MultiOutput`, no `AllocateLine`), so the wrapper never hands them a
    /// dead buffer, though once dead they can be handed on.
    pub fn set_extern(&mut self, extern_outputs: bool) {
        self.extern_outputs = extern_outputs;
    }

    /// `t`'s last reader is the next fused kernel (a residual add fused with the next norm): it dies once that
    /// kernel's outputs are allocated (`next_kernel_made`), so none of them can take its block.
    pub fn free_after_next_kernel(&mut self, t: Tensor) {
        self.read_by_next_kernel.push(t);
    }

    /// The fused kernel of `free_after_next_kernel` has its outputs: what it read last dies.
    pub fn next_kernel_made(&mut self) {
        for t in std::mem::take(&mut self.read_by_next_kernel) {
            self.free(t);
        }
    }

    /// The compiled graph has returned: its buffers' reuse is planned and everything it did is replayed, a
    /// reused buffer's free and its successor's allocation becoming one block passed on.
    pub fn end_graph(&mut self) {
        self.next_kernel_made();
        let Some(mut g) = self.graph.take() else {
            return;
        };
        if g.described {
            if let Some((kept, new)) = reordered(&g, |id| self.slots[id as usize].key.0) {
                self.orders.push(kept);
                if let Some((ops, adopted)) = new {
                    g.ops = ops;
                    g.adopted.extend(adopted);
                }
            }
        }
        let reuse = plan_reuse(&g, |id| {
            let slot = &self.slots[id as usize];
            (slot.bytes, slot.key)
        });
        for op in g.ops {
            match op {
                GraphOp::Alloc { id, op, .. } => {
                    let old = reuse.of(id, g.first);
                    self.commit_alloc(id, old, op);
                }
                GraphOp::Free(id) => {
                    if !reuse.handed_on(id, g.first) {
                        self.free(Tensor(id as usize));
                    } else {
                        self.slots[id as usize].doomed = false;
                    }
                }
                GraphOp::Scratch {
                    n_bytes,
                    category,
                    op,
                } => self.scratch(n_bytes, category, op),
                GraphOp::Stage(step, stage) => self.stage(step, stage),
                GraphOp::Layer(layer) => self.layer(layer),
                GraphOp::Kernel { .. } | GraphOp::Phantom(_) => {}
            }
        }
    }

    /// Stops replaying the caching allocator once its peak reserved memory passes `reserved_bytes`: for a run
    /// that only asks whether it stays within that much, the answer is then known (no), and the rest of the run
    /// only counts live bytes. The allocator's figures stay as they were at that moment.
    pub fn stop_replay_above(&mut self, reserved_bytes: u64) {
        self.replay_limit = reserved_bytes;
        self.check_replay_limit();
    }

    #[inline]
    fn check_replay_limit(&mut self) {
        if self.allocator.peak_reserved_bytes() > self.replay_limit {
            self.replay = false;
        }
    }

    /// Frees a tensor. Freeing twice is a no-op, so callers can release "if still held" safely. A held tensor
    /// (`hold`) is only marked let go: its memory returns at `release_hold`.
    #[inline]
    pub fn free(&mut self, t: Tensor) {
        let slot = &mut self.slots[t.0];
        if self.graph.is_some() {
            if slot.pending || (slot.live && !slot.doomed) {
                slot.pending = false;
                slot.doomed = true;
                if let Some(g) = self.graph.as_mut() {
                    g.ops.push(GraphOp::Free(t.0 as u32));
                }
            }
            return;
        }
        if slot.held {
            slot.let_go = true;
            return;
        }
        if slot.live {
            slot.live = false;
            self.live_bytes -= slot.bytes;
            self.by_category[slot.category.index()] -= slot.bytes;
            slot.doomed = false;
            let block = slot.block;
            if self.replay {
                self.allocator.free(block);
            }
            if let Some(ev) = self.events.as_mut() {
                ev.push(Event {
                    id: block,
                    category: slot.category,
                    phase: self.phase.label(),
                    op: "free",
                    bytes: -(slot.bytes as i64),
                    live_bytes: self.live_bytes,
                    reserved_bytes: self.allocator.reserved_bytes(),
                });
            }
            if let Some(point) = self.timeline.last_mut() {
                point.end_bytes = self.live_bytes;
            }
        }
    }

    /// A reference the tensor's owners do not see keeps it alive: a Python autograd Function that stores a tensor
    /// on its `ctx` instead of saving it for backward (bitsandbytes' `MatMul8bitLt` keeps its input in
    /// `ctx.tensors`) holds it until the graph node itself is freed, whatever autograd's saved-tensor rules and
    /// checkpointing's pack hooks do. Frees of a held tensor wait for `release_hold`.
    pub fn hold(&mut self, t: Tensor) {
        let slot = &mut self.slots[t.0];
        if slot.live {
            slot.held = true;
        }
    }

    /// The outside reference of `hold` goes (the graph node died): the tensor is freed if its owners let go of it
    /// meanwhile.
    pub fn release_hold(&mut self, t: Tensor) {
        let slot = &mut self.slots[t.0];
        if !slot.held {
            return;
        }
        slot.held = false;
        if slot.let_go {
            slot.let_go = false;
            self.free(t);
        }
    }

    pub fn free_all(&mut self, ts: &[Tensor]) {
        for &t in ts {
            self.free(t);
        }
    }

    pub fn free_some(&mut self, ts: &[Option<Tensor>]) {
        for t in ts.iter().flatten() {
            self.free(*t);
        }
    }

    pub fn bytes_of(&self, t: Tensor) -> u64 {
        self.slots[t.0].bytes
    }

    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Peak allocated as `torch.cuda.max_memory_allocated()` reports it: the caching allocator's counter at its
    /// highest, tensors and block remainders, when the allocator was replayed to the end; otherwise (a run that
    /// only counts live bytes, or stopped replaying, `stop_replay_above`) the live tensors at their highest.
    pub fn peak(&self) -> &Peak {
        if self.replay {
            &self.peak
        } else {
            &self.tensor_peak
        }
    }

    /// The live tensors at their highest (each rounded to the allocator's 512 bytes), without block remainders:
    /// what summing the sizes a run asks for measures.
    pub fn tensor_peak(&self) -> &Peak {
        &self.tensor_peak
    }

    /// The highest live bytes within each step (index 0: building the model).
    pub fn step_peaks(&self) -> &[u64] {
        &self.step_peaks
    }

    pub fn timeline(&self) -> &[TimelinePoint] {
        &self.timeline
    }

    /// Starts recording every allocation and free, and where the caching allocator puts each block.
    pub fn record_events(&mut self) {
        self.events = Some(Vec::new());
        self.allocator.record_trace();
    }

    pub fn events(&self) -> &[Event] {
        self.events.as_deref().unwrap_or(&[])
    }

    /// `torch.cuda.empty_cache()`: every cached segment no block is live in goes back to the device.
    pub fn empty_cache(&mut self) {
        if self.replay {
            self.allocator.empty_cache();
        }
    }

    /// The order Inductor's memory-ordering pass kept for each compiled graph described kernel by kernel
    /// (`described`), in the order the graphs ran.
    pub fn graph_orders(&self) -> &[reorder::Method] {
        &self.orders
    }

    /// The caching allocator's state after the run: reserved memory, segments, retries, OOMs.
    pub fn allocator(&self) -> &CachingAllocator {
        &self.allocator
    }

    /// Live bytes of one category now.
    pub fn live_in(&self, category: Category) -> u64 {
        self.by_category[category.index()]
    }
}

/// One kernel of a described graph (`Sim::kernel`), as `reordered` moves it: what it reads, what it may write
/// over, its own operations (allocations, scratch, markers) and the frees that followed it, with their places.
struct Part {
    reads: Vec<u32>,
    over: Option<u32>,
    writes: Option<u32>,
    body: Vec<GraphOp>,
    frees: Vec<(usize, u32)>,
}

/// The order `reordered` kept, with the operations in it and the inputs written over in place (none when it is
/// the described order).
type Reordered = (reorder::Method, Option<(Vec<GraphOp>, Vec<u32>)>);

/// A described graph (`Sim::described`) in the order Inductor's memory-ordering pass keeps (`reorder`), when
/// that is not the order its kernels were described in: each kernel's operations in the new order, each buffer
/// freed after its last reader there (in the order the frees were described), an input a kernel writes over in
/// place freed just before that kernel's output (which then takes its block) when that kernel is its last
/// reader. Returns the order kept and, unless it is the described one, the operations and those inputs; `None`
/// where some allocation or free comes before the first kernel (not described). `asked(id)`: the bytes a buffer
/// asks for (Inductor's sizes are exact, not rounded).
fn reordered(g: &Graph, asked: impl Fn(u32) -> u64) -> Option<Reordered> {
    use std::collections::HashMap;
    let (mut prefix, mut pending, mut parts) = (Vec::new(), Vec::new(), Vec::<Part>::new());
    for (at, op) in g.ops.iter().enumerate() {
        match op {
            GraphOp::Kernel {
                reads,
                over,
                writes,
            } => parts.push(Part {
                reads: reads.clone(),
                over: *over,
                writes: *writes,
                body: std::mem::take(&mut pending),
                frees: Vec::new(),
            }),
            GraphOp::Stage(..) | GraphOp::Layer(_) => pending.push(op.clone()),
            GraphOp::Phantom(_) => parts.last_mut()?.body.push(op.clone()),
            GraphOp::Free(id) => parts.last_mut()?.frees.push((at, *id)),
            GraphOp::Alloc { .. } | GraphOp::Scratch { .. } => {
                let part = parts.last_mut()?;
                part.body.append(&mut pending);
                part.body.push(op.clone());
            }
        }
        if parts.is_empty() {
            prefix.append(&mut pending);
        }
    }
    // The buffers: each allocation (made by its kernel) and each input read.
    let mut index: HashMap<u32, usize> = HashMap::new();
    let mut ids: Vec<u32> = Vec::new();
    let mut graph = reorder::Graph::default();
    let buffer = |graph: &mut reorder::Graph,
                  (index, ids): (&mut HashMap<u32, usize>, &mut Vec<u32>),
                  id: u32,
                  input: bool|
     -> usize {
        *index.entry(id).or_insert_with(|| {
            ids.push(id);
            let fixed = input && g.fixed.contains(&id);
            let bytes = if fixed { 0 } else { asked(id) };
            graph.buffers.push(reorder::Buffer {
                size_alloc: if input { 0 } else { bytes },
                size_free: bytes,
                users: Vec::new(),
                input,
                output: true,
            });
            graph.buffers.len() - 1
        })
    };
    let mut made_by = HashMap::new();
    for (k, part) in parts.iter().enumerate() {
        let mut node = reorder::Node::default();
        for op in &part.body {
            if let GraphOp::Alloc { id, .. } = *op {
                let b = buffer(&mut graph, (&mut index, &mut ids), id, false);
                made_by.insert(b, k);
                node.size += graph.buffers[b].size_alloc;
                node.outputs.push(b);
            }
            if let GraphOp::Phantom(bytes) = *op {
                // Made and dead in the kernel: one more buffer of the estimate, no id of the graph's.
                ids.push(u32::MAX);
                graph.buffers.push(reorder::Buffer {
                    size_alloc: bytes,
                    size_free: bytes,
                    users: Vec::new(),
                    input: false,
                    output: false,
                });
                node.size += bytes;
                node.outputs.push(graph.buffers.len() - 1);
            }
        }
        graph.nodes.push(node);
    }
    // Each buffer's readers: the kernels that say they read it; a buffer freed that no kernel says it reads is
    // read last by the kernel it was freed after.
    let declared: std::collections::HashSet<u32> =
        parts.iter().flat_map(|p| p.reads.iter().copied()).collect();
    let mut writer: HashMap<usize, usize> = HashMap::new();
    for (k, part) in parts.iter().enumerate() {
        let frees = part
            .frees
            .iter()
            .map(|&(_, id)| id)
            .filter(|id| !declared.contains(id));
        let mut wrote = None;
        for id in part.reads.iter().copied().chain(part.writes).chain(frees) {
            let b = buffer(
                &mut graph,
                (&mut index, &mut ids),
                id,
                (id as usize) < g.first,
            );
            if Some(id) == part.writes {
                wrote = Some(b);
            }
            if graph.nodes[k].outputs.contains(&b) || graph.nodes[k].reads.contains(&b) {
                continue;
            }
            graph.nodes[k].reads.push(b);
            graph.buffers[b].users.push(k);
            if let Some(&j) = writer.get(&b).or(made_by.get(&b)) {
                graph.nodes[k].deps.push(j);
                graph.nodes[k].preds.push(j);
                graph.nodes[j].succs.push(k);
            }
        }
        if let Some(b) = wrote {
            writer.insert(b, k);
        }
    }
    // A buffer of the graph nobody frees is one of its outputs. Inductor frees every input after its last reader
    // (by name: it does not know the caller may hold one too, as nanoGPT's loop holds the logits), so the
    // estimate does; the replay frees only what the graph freed.
    // Each buffer the graph frees, with the place of its free among the described operations.
    let place: HashMap<u32, usize> = parts
        .iter()
        .flat_map(|p| p.frees.iter().map(|&(at, id)| (id, at)))
        .collect();
    for (b, &id) in ids.iter().enumerate() {
        if graph.buffers[b].input || place.contains_key(&id) {
            graph.buffers[b].output = false;
        }
    }
    for node in &mut graph.nodes {
        node.preds.sort_unstable();
        node.preds.dedup();
        node.succs.sort_unstable();
        node.succs.dedup();
    }
    let decision = graph.reorder();
    if decision.kept == reorder::Method::Own {
        return Some((decision.kept, None));
    }
    let order = decision.kept_order();
    let mut step = vec![0; parts.len()];
    for (s, &k) in order.iter().enumerate() {
        step[k] = s;
    }
    // Where each buffer dies: after its last reader in the new order, or after its kernel if nobody reads it.
    let dies_at: Vec<Option<usize>> = graph
        .buffers
        .iter()
        .enumerate()
        .map(|(b, buf)| {
            let last = buf.users.iter().map(|&u| step[u]).max();
            (!buf.output).then(|| last.or_else(|| made_by.get(&b).map(|&k| step[k])))?
        })
        .collect();
    let mut ops = prefix;
    let mut adopted = Vec::new();
    let mut dying: Vec<Vec<(usize, u32)>> = vec![Vec::new(); order.len()];
    for (b, at) in dies_at.iter().enumerate() {
        if let (Some(s), Some(&at)) = (*at, place.get(&ids[b])) {
            dying[s].push((at, ids[b]));
        }
    }
    for (s, &k) in order.iter().enumerate() {
        let part = &parts[k];
        let mut frees = std::mem::take(&mut dying[s]);
        frees.sort_unstable();
        // In place: the kernel is the last reader of the input it may write over.
        let over = part
            .over
            .filter(|x| (*x as usize) < g.first && frees.iter().any(|&(_, id)| id == *x));
        let mut body = part.body.clone();
        if let Some(x) = over {
            frees.retain(|&(_, id)| id != x);
            let first_alloc = body
                .iter()
                .position(|op| matches!(op, GraphOp::Alloc { .. }))
                .unwrap_or(body.len());
            body.insert(first_alloc, GraphOp::Free(x));
            adopted.push(x);
        }
        ops.extend(body);
        ops.extend(frees.into_iter().map(|(_, id)| GraphOp::Free(id)));
    }
    ops.extend(pending);
    Some((decision.kept, Some((ops, adopted))))
}

/// Which of a graph's allocations take a dead buffer's block (`of`: new tensor -> the dead one), and the
/// dead buffers so handed on (`handed_on`), whose free never happens. Indexed from the graph's first tensor
/// (`Graph::first`; `NONE`: a block of its own); an adopted input handed on is listed apart.
struct Reuse {
    of: Vec<u32>,
    handed_on: Vec<bool>,
    handed_on_inputs: Vec<u32>,
}

impl Reuse {
    const NONE: u32 = u32::MAX;

    fn of(&self, id: u32, first: usize) -> Option<u32> {
        let old = self.of.get(id as usize - first).copied();
        old.filter(|&old| old != Self::NONE)
    }

    fn handed_on(&self, id: u32, first: usize) -> bool {
        match (id as usize).checked_sub(first) {
            Some(i) => self.handed_on.get(i).copied().unwrap_or(false),
            None => self.handed_on_inputs.binary_search(&id).is_ok(),
        }
    }
}

/// Inductor's buffer reuse (PyTorch 2.15, torch/_inductor/codegen/wrapper.py), over one graph's allocations and
/// frees in the wrapper's order:
/// - a buffer the graph allocated, once dead (`FreeIfNotReusedLine`), goes on a pool under its reuse key
///   (`buffer_reuse_key`: device, dtype, storage size, ...; here the bytes it asks for and its elements'
///   width); the graph's inputs are freed but never pooled (`codegen_free`: `InputBuffer` and `DonatedBuffer` get a plain `FreeLine`), unless
///   a kernel wrote over one in place (`adopt`);
/// - a later allocation the wrapper makes (`AllocateLine`) with that key takes the buffer last pooled under it
///   (`MemoryPlanningState.pop`: last freed first), so the dead buffer stays allocated until then and its free is
///   never emitted (`# reuse`);
/// - unless the two lines are not of adjacent scheduler nodes and holding the buffer that long would raise the
///   graph's estimated peak (`AllocateLine.should_reuse_buffer`: its size plus the estimated peak of the nodes
///   strictly between them, `EfficientPeakEstimate.peak_between`, must not pass the estimated peak of the whole
///   graph); then it stays pooled and the allocation is new. A reuse raises the estimate between the two by the
///   buffer's size (`update_peak_between`).
///
/// The estimate is the graph's live bytes at each scheduler node (torch/_inductor/memory.py
/// `estimate_peak_memory`: each buffer from the node that makes it through its last reader). Here each
/// allocation is one node and the frees that follow it belong to it; the live bytes are the graph's own
/// (inputs included until freed: a constant offset on both sides of the comparison), without the cuBLAS
/// scratch, which Inductor does not see.
fn plan_reuse(g: &Graph, slot_of: impl Fn(u32) -> (u64, (u64, u64))) -> Reuse {
    let bytes_of = |id| slot_of(id).0;
    // Live bytes at each node (node 0: the graph's entry, before any allocation).
    let mut mem: Vec<i64> = vec![0];
    let mut cur: i64 = 0;
    for op in &g.ops {
        match *op {
            GraphOp::Alloc { id, .. } => {
                cur += bytes_of(id) as i64;
                mem.push(cur);
            }
            GraphOp::Free(id) => cur -= bytes_of(id) as i64,
            _ => {}
        }
    }
    let overall = mem.iter().copied().max().unwrap_or(0);
    let mut adopted = g.adopted.clone();
    adopted.sort_unstable();
    // Few keys per graph: an ordered map costs less than hashing each key.
    let mut pool: std::collections::BTreeMap<(u64, u64), Vec<(usize, u32)>> = Default::default();
    let n_tensors = g
        .ops
        .iter()
        .filter_map(|op| match *op {
            GraphOp::Alloc { id, .. } => Some(id as usize + 1 - g.first),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut reuse = Reuse {
        of: vec![Reuse::NONE; n_tensors],
        handed_on: vec![false; n_tensors],
        handed_on_inputs: Vec::new(),
    };
    let mut node = 0usize;
    for op in &g.ops {
        match *op {
            GraphOp::Alloc {
                id, key, planned, ..
            } => {
                node += 1;
                if !planned {
                    continue;
                }
                let Some(&(k, old)) = pool.get(&key).and_then(|s| s.last()) else {
                    continue;
                };
                let size = bytes_of(id) as i64;
                let between = mem[k + 1..node].iter().copied().max();
                if k + 1 == node || size + between.unwrap_or(0) <= overall {
                    pool.get_mut(&key).map(Vec::pop);
                    reuse.of[id as usize - g.first] = old;
                    match (old as usize).checked_sub(g.first) {
                        Some(i) => reuse.handed_on[i] = true,
                        None => reuse.handed_on_inputs.push(old),
                    }
                    for m in &mut mem[k + 1..node] {
                        *m += size;
                    }
                }
            }
            GraphOp::Free(id) if (id as usize) >= g.first || adopted.binary_search(&id).is_ok() => {
                pool.entry(slot_of(id).1).or_default().push((node, id));
            }
            _ => {}
        }
    }
    reuse.handed_on_inputs.sort_unstable();
    reuse
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_512_byte_blocks() {
        assert_eq!(block_bytes(0), 0);
        assert_eq!(block_bytes(1), 512);
        assert_eq!(block_bytes(512), 512);
        assert_eq!(block_bytes(513), 1024);
    }

    #[test]
    fn peak_is_the_highest_live_total_with_its_breakdown() {
        let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
        sim.stage(1, "forward");
        let a = sim.alloc(1000, Category::Weights, "a");
        let b = sim.alloc(2048, Category::Activations, "b");
        sim.free(b);
        sim.free(b);
        let _c = sim.alloc(1024, Category::Temporary, "c");
        sim.free(a);
        assert_eq!(sim.peak().bytes, 1024 + 2048);
        assert_eq!(sim.peak().op, "b");
        assert_eq!(sim.peak().by_category[Category::Activations.index()], 2048);
        assert_eq!(sim.live_bytes(), 1024);
        assert_eq!(sim.timeline()[0].peak_bytes, 3072);
        assert_eq!(sim.timeline()[0].end_bytes, 1024);
    }

    /// Peak allocated is the allocator's counter: a 3 MiB tensor served from a cached 4 MiB block (1 MiB left,
    /// not over `kSmallSize`, so not split) counts 4 MiB, the remainder its own figure beside the tensors. A run
    /// that stops replaying the allocator reports the live tensors' peak instead.
    #[test]
    fn peak_allocated_counts_whole_blocks_and_the_tensors_peak_is_kept() {
        const MIB: u64 = 1 << 20;
        let run = |stop: bool| {
            let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
            sim.stage(1, "forward");
            // One 20 MiB segment: a at its start, x the rest; a's block stays a 4 MiB hole once freed.
            let a = sim.alloc(4 * MIB, Category::Activations, "a");
            let _x = sim.alloc(16 * MIB, Category::Weights, "x");
            sim.free(a);
            if stop {
                sim.stop_replay_above(0);
            }
            let _b = sim.alloc(3 * MIB, Category::Temporary, "b");
            let _c = sim.alloc(3 * MIB / 2, Category::Temporary, "c");
            sim
        };
        let sim = run(false);
        let p = sim.peak();
        assert_eq!(p.bytes, 16 * MIB + 4 * MIB + 3 * MIB / 2);
        assert_eq!(p.block_remainder_bytes, MIB);
        assert_eq!(
            p.by_category.iter().sum::<u64>() + p.block_remainder_bytes,
            p.bytes
        );
        assert_eq!(p.op, "c");
        assert_eq!(p.bytes, sim.allocator().peak_allocated_bytes());
        assert_eq!(sim.tensor_peak().bytes, 16 * MIB + 3 * MIB + 3 * MIB / 2);
        let stopped = run(true);
        assert_eq!(stopped.peak().bytes, 16 * MIB + 3 * MIB + 3 * MIB / 2);
        assert_eq!(stopped.peak().block_remainder_bytes, 0);
    }

    /// A held tensor outlives its owner's free until the hold goes; one its owner still holds outlives the hold.
    #[test]
    fn a_held_tensor_is_freed_by_the_later_of_its_owner_and_the_hold() {
        let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
        sim.stage(1, "forward");
        let a = sim.alloc(4096, Category::Activations, "a");
        let b = sim.alloc(1024, Category::Activations, "b");
        sim.hold(a);
        sim.hold(b);
        sim.free(a);
        assert_eq!(sim.live_bytes(), 4096 + 1024);
        sim.release_hold(a);
        sim.release_hold(b);
        assert_eq!(sim.live_bytes(), 1024);
        sim.free(b);
        sim.release_hold(b);
        assert_eq!(sim.live_bytes(), 0);
    }

    /// Inductor's buffer reuse within one compiled graph: a dead buffer is handed to the next allocation of the
    /// same bytes and width, last freed first, so its block is never freed; an input of the graph, an extern
    /// kernel's output slot, another width or another size gets a block of its own.
    #[test]
    fn a_graph_hands_dead_buffers_to_later_ones_of_the_same_key() {
        let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
        sim.stage(1, "forward");
        let input = sim.alloc_typed(4096, 4, Category::Activations, "input");
        sim.begin_graph();
        let a = sim.alloc_typed(4096, 4, Category::Activations, "a");
        let b = sim.alloc_typed(4096, 4, Category::Activations, "b");
        sim.free(input);
        sim.free(a);
        sim.free(b);
        // Last freed first: c takes b's block, d takes a's; the input's block is not pooled.
        let c = sim.alloc_typed(4096, 4, Category::Temporary, "c");
        let d = sim.alloc_typed(4096, 4, Category::Temporary, "d");
        let e = sim.alloc_typed(4096, 4, Category::Temporary, "e");
        // Freed, then asked for by an extern kernel's output and by a buffer of another width: both new.
        sim.free(c);
        sim.set_extern(true);
        let f = sim.alloc_typed(4096, 4, Category::Temporary, "f");
        sim.set_extern(false);
        let g = sim.alloc_typed(4096, 2, Category::Temporary, "g");
        sim.end_graph();
        assert_eq!(sim.slots[c.0].block, b.0 as u32);
        assert_eq!(sim.slots[d.0].block, a.0 as u32);
        assert_eq!(sim.slots[e.0].block, e.0 as u32);
        assert_eq!(sim.slots[f.0].block, f.0 as u32);
        assert_eq!(sim.slots[g.0].block, g.0 as u32);
        // Live at the graph's peak: a and b (input freed), then c, d on their blocks and e: 3 blocks, never 4
        // graph buffers at once; f and g come after c's block is back in the pool, unclaimed: freed.
        assert_eq!(sim.peak().bytes, 4 * 4096);
        assert_eq!(sim.live_bytes(), 4 * 4096);
        let s = sim.allocator().stats();
        assert_eq!(s.allocated_bytes.current, 4 * 4096);
        sim.free_all(&[d, e, f, g]);
        assert_eq!(sim.live_bytes(), 0);
        assert_eq!(sim.allocator().stats().allocated_bytes.current, 0);
    }

    /// A dead buffer is not held for a later allocation when holding it would raise the graph's estimated peak
    /// (`AllocateLine.should_reuse_buffer`), unless the two are adjacent nodes.
    #[test]
    fn a_reuse_that_would_raise_the_graphs_peak_is_not_made() {
        let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
        sim.stage(1, "forward");
        sim.begin_graph();
        let a = sim.alloc_typed(1 << 20, 4, Category::Activations, "a");
        sim.free(a);
        // The graph's peak (2 MiB) comes between a's death and the next 1 MiB buffer: holding a would make it 3.
        let big = sim.alloc_typed(2 << 20, 4, Category::Activations, "big");
        sim.free(big);
        let b = sim.alloc_typed(1 << 20, 4, Category::Activations, "b");
        // Adjacent: freed after b's node, asked for by the next one.
        sim.free(b);
        let c = sim.alloc_typed(1 << 20, 4, Category::Activations, "c");
        sim.end_graph();
        assert_eq!(sim.slots[b.0].block, b.0 as u32, "a not held past the peak");
        assert_eq!(
            sim.slots[c.0].block, b.0 as u32,
            "adjacent: always handed on"
        );
        assert_eq!(sim.peak().bytes, 2 << 20);
    }

    /// A described graph whose own order holds two big buffers at once: Inductor's LPMF runs the reader of the
    /// first before making the second, and the replay follows it (each buffer freed after its last reader there).
    #[test]
    fn a_described_graph_runs_in_the_order_inductor_keeps() {
        let run = |described: bool| {
            let mut sim = Sim::new(AllocatorConfig::default(), u64::MAX);
            sim.stage(1, "backward");
            let x = sim.alloc(512, Category::Activations, "x");
            sim.begin_graph();
            sim.kernel(&[Some(x)], None);
            let a = sim.alloc(4096, Category::Temporary, "a");
            sim.kernel(&[Some(x)], None);
            let b = sim.alloc(4096, Category::Temporary, "b");
            sim.free(x);
            sim.kernel(&[Some(a)], None);
            let _c = sim.alloc(512, Category::Grads, "c");
            sim.free(a);
            sim.kernel(&[Some(b)], None);
            let _d = sim.alloc(512, Category::Grads, "d");
            sim.free(b);
            if described {
                sim.described();
            }
            sim.end_graph();
            sim
        };
        let own = run(false);
        assert!(own.graph_orders().is_empty());
        // x, a and b together.
        assert_eq!(own.tensor_peak().bytes, 512 + 4096 + 4096);
        let lpmf = run(true);
        assert_eq!(lpmf.graph_orders(), &[reorder::Method::Lpmf]);
        // a, then c (a dies), then b (x dies), then d: never both big buffers.
        assert_eq!(lpmf.tensor_peak().bytes, 512 + 4096 + 512);
        assert_eq!(lpmf.live_bytes(), 512 + 512);
    }
}
