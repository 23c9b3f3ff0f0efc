//! The allocation timeline of one run: every tensor PyTorch's CUDA caching allocator hands out, in order, with
//! the moment it is freed. The peak of `live_bytes` over the run is what `torch.cuda.max_memory_allocated()`
//! reports.
//!
//! Every block the caching allocator returns is a multiple of 512 bytes (`kMinBlockSize` in
//! c10/cuda/CUDACachingAllocator.cpp), and a zero-byte tensor takes no block; `alloc` rounds the same way.
//! Every allocation and free also goes to a model of the caching allocator itself (`allocator`), whose segments
//! are the reserved memory (`torch.cuda.max_memory_reserved()`).

use crate::allocator::{AllocatorConfig, CachingAllocator, Stream};

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

/// The live bytes of a run at its highest point, with what they were for.
#[derive(Debug, Clone)]
pub struct Peak {
    pub bytes: u64,
    pub by_category: [u64; N_CATEGORIES],
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
    peak: Peak,
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
        Sim {
            slots: Vec::with_capacity(4096),
            live_bytes: 0,
            by_category: [0; N_CATEGORIES],
            peak: Peak {
                bytes: 0,
                by_category: [0; N_CATEGORIES],
                phase: phase.clone(),
                op: "",
            },
            phase,
            step_peaks: Vec::new(),
            timeline: Vec::new(),
            allocator: CachingAllocator::new(allocator, capacity_bytes),
            replay: true,
            replay_limit: u64::MAX,
            stream: Stream::DEFAULT,
            events: None,
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
        let bytes = block_bytes(n_bytes);
        let id = self.slots.len() as u32;
        self.slots.push(Slot {
            bytes,
            category,
            live: true,
            held: false,
            let_go: false,
        });
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
        if self.live_bytes > self.peak.bytes {
            self.peak = Peak {
                bytes: self.live_bytes,
                by_category: self.by_category,
                phase: self.phase.clone(),
                op,
            };
        }
        Tensor(self.slots.len() - 1)
    }

    /// Allocates and frees at once: scratch a kernel uses only while it runs. The allocator takes it in one call
    /// (`CachingAllocator::scratch_overcommitting`), which skips the split and merge a cached block would see.
    pub fn scratch(&mut self, n_bytes: u64, category: Category, op: &'static str) {
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
        if slot.held {
            slot.let_go = true;
            return;
        }
        if slot.live {
            slot.live = false;
            self.live_bytes -= slot.bytes;
            self.by_category[slot.category.index()] -= slot.bytes;
            if self.replay {
                self.allocator.free(t.0 as u32);
            }
            if let Some(ev) = self.events.as_mut() {
                ev.push(Event {
                    id: t.0 as u32,
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

    pub fn peak(&self) -> &Peak {
        &self.peak
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

    /// The caching allocator's state after the run: reserved memory, segments, retries, OOMs.
    pub fn allocator(&self) -> &CachingAllocator {
        &self.allocator
    }

    /// Live bytes of one category now.
    pub fn live_in(&self, category: Category) -> u64 {
        self.by_category[category.index()]
    }
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
}
