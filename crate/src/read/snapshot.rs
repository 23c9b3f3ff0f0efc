//! PyTorch memory snapshots (`torch.cuda.memory._dump_snapshot()`, a pickle, often gzip'd) read back into what
//! PyTorch's own counters said: the peak of `memory_allocated()` and `memory_reserved()` over the recorded
//! history, the timeline of both, and the blocks live at the allocated peak with the frames that allocated them.
//!
//! A device trace records each `alloc` with the size *requested*, but the counters count the *block*: the request
//! rounded up to 512 bytes, or the whole free block it was cut from when the rest was too small to split off (the
//! caching allocator's `should_split`: under 512 bytes left in the small pool, 1 MiB or less in the large one).
//! So the reader replays where each block sits: every segment (`segment_alloc`, `segment_free`, and the
//! `segments` list for the state at the dump) and every block in it, by address; a block's size is what lies
//! between its address and the next block or the segment's end when it is not split. The counter drops at
//! `free_requested` (PyTorch's `free`), the block leaves its segment at `free_completed`.
//!
//! Nothing is run: the pickle reader (`pickle`) builds plain data only. The reader never panics.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::allocator::round_size;
use crate::error::Error;
use crate::read::pickle::{Id, Pickle};
use crate::sim::Category;

/// The largest file read (compressed or not) and the largest pickle a gzip'd file may inflate to.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;
/// Points of the returned timeline at most (the highest values of each stretch of events are kept).
pub const MAX_TIMELINE_POINTS: usize = 2000;
/// Blocks listed at the peak, largest first.
pub const N_BLOCKS_LISTED: usize = 20;
/// Frames kept per block.
pub const N_FRAMES: usize = 3;

/// Requests up to this size go to the small pool (`kSmallSize`).
const SMALL_SIZE: u64 = 1 << 20;
/// The smallest block (`kMinBlockSize`).
const MIN_BLOCK_SIZE: u64 = 512;

/// One stack frame of an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frame {
    pub name: String,
    pub filename: String,
    pub line: i64,
}

/// A block live at the measured peak.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LiveBlock {
    /// The block's size (what `memory_allocated()` counts).
    pub bytes: u64,
    /// The size the caller asked for.
    pub requested_bytes: u64,
    /// vramfit's component, when the frames say which (`None`: they do not).
    #[serde(serialize_with = "category_name")]
    pub component: Option<Category>,
    /// What the frames say, in words ("optimizer state", "backward", ...).
    pub origin: &'static str,
    /// The innermost Python frames (else the innermost named native ones).
    pub frames: Vec<Frame>,
}

fn category_name<S: serde::Serializer>(c: &Option<Category>, s: S) -> Result<S::Ok, S::Error> {
    match c {
        Some(c) => s.serialize_str(component_name(*c)),
        None => s.serialize_none(),
    }
}

/// The report's name of a component ("weights", "optimizer", ...).
pub fn component_name(c: Category) -> &'static str {
    match c {
        Category::Weights => "weights",
        Category::QuantizedWeights => "quantized weights",
        Category::Adapters => "adapters",
        Category::WeightCopies => "weight copies",
        Category::Grads => "grads",
        Category::Optimizer => "optimizer",
        Category::Activations => "activations",
        Category::Logits => "logits",
        Category::Temporary => "temporary",
        Category::Workspace => "workspace",
    }
}

/// The blocks live at the peak of one origin, summed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OriginTotal {
    pub origin: &'static str,
    #[serde(serialize_with = "category_name")]
    pub component: Option<Category>,
    pub bytes: u64,
    pub n_blocks: u64,
}

/// One point of the measured timeline: the highest values over a stretch of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Point {
    /// The stretch's last event (index in the device trace).
    pub event: u64,
    pub allocated_bytes: u64,
    pub reserved_bytes: u64,
}

/// What a snapshot says about one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    pub device: u64,
    /// The peak of `torch.cuda.memory_allocated()` over the recorded history.
    pub peak_allocated_bytes: u64,
    /// The peak of `torch.cuda.memory_reserved()` over the recorded history.
    pub peak_reserved_bytes: u64,
    /// Allocated and reserved before the first recorded event (0 when the history began with the program).
    pub initial_allocated_bytes: u64,
    pub initial_reserved_bytes: u64,
    pub n_events: u64,
    /// The event at which the allocated peak was reached.
    pub peak_event: u64,
    /// Allocated and reserved over the run (at most `MAX_TIMELINE_POINTS`).
    pub timeline: Vec<Point>,
    /// Blocks live at the peak, largest first (at most `N_BLOCKS_LISTED`).
    pub blocks_at_peak: Vec<LiveBlock>,
    /// All blocks live at the peak, summed by origin, largest first.
    pub by_origin: Vec<OriginTotal>,
    pub n_blocks_at_peak: u64,
    /// Whether block sizes are exact; with expandable segments they are the rounded requests.
    pub expandable_segments: bool,
}

fn snapshot_error(message: impl Into<String>) -> Error {
    Error::Parse {
        source: "snapshot".to_string(),
        line: None,
        message: message.into(),
    }
}

/// The bytes of a pickle, inflated if they are gzip'd.
///
/// # Errors
/// `Parse` for a broken gzip stream, `TooLarge` past `MAX_SNAPSHOT_BYTES`.
pub fn unwrap_gzip(data: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, Error> {
    if data.len() as u64 > MAX_SNAPSHOT_BYTES {
        return Err(too_large(data.len() as u64));
    }
    if data.len() < 2 || data[0] != 0x1f || data[1] != 0x8b {
        return Ok(std::borrow::Cow::Borrowed(data));
    }
    let bad = |what: &str| snapshot_error(format!("the gzip stream is broken ({what})"));
    if data.len() < 18 {
        return Err(bad("it ends inside its header: truncated"));
    }
    if data[2] != 8 {
        return Err(bad("not deflate"));
    }
    let flags = data[3];
    let mut pos = 10usize;
    if flags & 4 != 0 {
        let n = usize::from(u16::from_le_bytes([
            data[pos],
            data.get(pos + 1).copied().unwrap_or(0),
        ]));
        pos = pos.saturating_add(2 + n);
    }
    for bit in [8u8, 16] {
        if flags & bit != 0 {
            let rest = data.get(pos..).unwrap_or(&[]);
            let nul = rest
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(|| bad("an unterminated name: truncated"))?;
            pos += nul + 1;
        }
    }
    if flags & 2 != 0 {
        pos = pos.saturating_add(2);
    }
    let body = data
        .get(pos..)
        .ok_or_else(|| bad("it ends inside its header: truncated"))?;
    let out = miniz_oxide::inflate::decompress_to_vec_with_limit(body, MAX_SNAPSHOT_BYTES as usize)
        .map_err(|e| match e.status {
            miniz_oxide::inflate::TINFLStatus::HasMoreOutput => too_large(MAX_SNAPSHOT_BYTES + 1),
            miniz_oxide::inflate::TINFLStatus::FailedCannotMakeProgress => {
                bad("it ends before its last block: truncated")
            }
            _ => bad("corrupt data"),
        })?;
    Ok(std::borrow::Cow::Owned(out))
}

fn too_large(n: u64) -> Error {
    Error::TooLarge {
        what: format!(
            "a snapshot of {} MiB (or more) is past the {} MiB this reader takes; record fewer entries \
             (`_record_memory_history(max_entries=...)`)",
            n >> 20,
            MAX_SNAPSHOT_BYTES >> 20
        ),
    }
}

/// Reads a snapshot file (a pickle, gzip'd or not) and measures the device with the highest allocated peak.
///
/// # Errors
/// `Parse` with one plain message for a file that is not a snapshot, is truncated, holds anything but plain data,
/// or has no device trace (PyTorch before 2.1, or no `_record_memory_history()`); `TooLarge` past
/// `MAX_SNAPSHOT_BYTES`.
pub fn read_snapshot(data: &[u8]) -> Result<Measured, Error> {
    let bytes = unwrap_gzip(data)?;
    let pickle = Pickle::decode(&bytes).map_err(|e| match e {
        Error::Parse { message, .. } => {
            snapshot_error(format!("not a readable PyTorch memory snapshot: {message}"))
        }
        e => e,
    })?;
    measure(&pickle)
}

/// `read_snapshot` on a decoded pickle.
///
/// # Errors
/// As `read_snapshot`.
pub fn measure(p: &Pickle) -> Result<Measured, Error> {
    let root = p.root();
    let Some(segments) = p.field(root, "segments") else {
        return Err(snapshot_error(format!(
            "the pickle holds a {}, not a PyTorch memory snapshot (a dict with \"segments\" and \"device_traces\")",
            if p.type_name(root) == "dict" {
                "dict without \"segments\""
            } else {
                p.type_name(root)
            }
        )));
    };
    let Some(traces) = p.field(root, "device_traces").and_then(|t| p.items(t)) else {
        return Err(snapshot_error(
            "this snapshot has no device traces (PyTorch before 2.1, or a snapshot taken without \
             torch.cuda.memory._record_memory_history()): its timeline and peak cannot be known",
        ));
    };
    let segments = p
        .items(segments)
        .ok_or_else(|| snapshot_error("\"segments\" is not a list"))?;
    let max_split_size = p
        .field(root, "allocator_settings")
        .and_then(|s| p.field(s, "max_split_size"))
        .and_then(|v| p.int(v))
        .filter(|&v| v > 0)
        .map_or(u64::MAX, |v| v as u64);
    let mut best: Option<Measured> = None;
    for (device, &trace) in traces.iter().enumerate() {
        let events = p
            .items(trace)
            .ok_or_else(|| snapshot_error(format!("device_traces[{device}] is not a list")))?;
        if events.is_empty() {
            continue;
        }
        let m = measure_device(p, device as u64, events, segments, max_split_size)?;
        if best
            .as_ref()
            .is_none_or(|b| m.peak_allocated_bytes > b.peak_allocated_bytes)
        {
            best = Some(m);
        }
    }
    best.ok_or_else(|| {
        snapshot_error(
            "this snapshot's device traces are empty: it was taken without \
             torch.cuda.memory._record_memory_history() running, so it has no timeline",
        )
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Alloc,
    FreeRequested,
    FreeCompleted,
    SegmentAlloc,
    SegmentFree,
    Other,
}

struct Event {
    action: Action,
    addr: u64,
    size: u64,
    id: Id,
}

fn u64_field(p: &Pickle, id: Id, key: &str) -> Option<u64> {
    p.field(id, key)
        .and_then(|v| p.int(v))
        .and_then(|v| u64::try_from(v).ok())
}

/// The device's events, and whether any segment is expandable.
fn events_of(p: &Pickle, device: u64, items: &[Id]) -> Result<Vec<Event>, Error> {
    let mut out = Vec::with_capacity(items.len());
    for (i, &e) in items.iter().enumerate() {
        let action = p.field(e, "action").and_then(|a| p.str(a)).ok_or_else(|| {
            snapshot_error(format!(
                "device_traces[{device}][{i}] has no \"action\": not a trace entry"
            ))
        })?;
        let action = match action {
            "alloc" => Action::Alloc,
            "free_requested" => Action::FreeRequested,
            "free_completed" => Action::FreeCompleted,
            "segment_alloc" | "segment_map" => Action::SegmentAlloc,
            "segment_free" | "segment_unmap" => Action::SegmentFree,
            _ => Action::Other,
        };
        let (addr, size) = if action == Action::Other {
            (0, 0)
        } else {
            let addr = u64_field(p, e, "addr");
            let size = u64_field(p, e, "size");
            match (addr, size) {
                (Some(a), Some(s)) => (a, s),
                _ => {
                    return Err(snapshot_error(format!(
                        "device_traces[{device}][{i}] has no integer \"addr\" and \"size\""
                    )))
                }
            }
        };
        out.push(Event {
            action,
            addr,
            size,
            id: e,
        });
    }
    Ok(out)
}

/// Where blocks sit: segments and blocks by address.
#[derive(Default)]
struct Layout {
    segments: BTreeMap<u64, u64>,
    blocks: BTreeMap<u64, u64>,
}

impl Layout {
    /// The size of the block an allocation of `requested` bytes at `addr` gets.
    fn block_size(&self, addr: u64, requested: u64, max_split_size: u64) -> u64 {
        let rounded = round_size(requested);
        let Some((&start, &len)) = self.segments.range(..=addr).next_back() else {
            return rounded;
        };
        let seg_end = start.saturating_add(len);
        if addr >= seg_end {
            return rounded;
        }
        let next = self
            .blocks
            .range(addr.saturating_add(1)..)
            .next()
            .map_or(seg_end, |(&a, _)| a.min(seg_end));
        let region = next - addr;
        if region <= rounded {
            return rounded;
        }
        let remaining = region - rounded;
        let split = if rounded <= SMALL_SIZE {
            remaining >= MIN_BLOCK_SIZE
        } else {
            rounded < max_split_size && remaining > SMALL_SIZE
        };
        if split {
            rounded
        } else {
            region
        }
    }
}

fn measure_device(
    p: &Pickle,
    device: u64,
    items: &[Id],
    segments: &[Id],
    max_split_size: u64,
) -> Result<Measured, Error> {
    let events = events_of(p, device, items)?;
    // The state at the dump, from `segments`.
    let mut layout = Layout::default();
    let mut live: HashMap<u64, u64> = HashMap::new();
    let mut expandable = false;
    for &s in segments {
        if u64_field(p, s, "device").is_some_and(|d| d != device) {
            continue;
        }
        let (Some(addr), Some(size)) = (u64_field(p, s, "address"), u64_field(p, s, "total_size"))
        else {
            continue;
        };
        expandable |= p
            .field(s, "is_expandable")
            .and_then(|v| p.int(v))
            .is_some_and(|v| v != 0);
        layout.segments.insert(addr, size);
        for &b in p.field(s, "blocks").and_then(|b| p.items(b)).unwrap_or(&[]) {
            let state = p.field(b, "state").and_then(|v| p.str(v)).unwrap_or("");
            if let (Some(a), Some(n)) = (u64_field(p, b, "address"), u64_field(p, b, "size")) {
                if state.starts_with("active") {
                    layout.blocks.insert(a, n);
                }
                if state == "active_allocated" {
                    live.insert(a, n);
                }
            }
        }
    }
    // Back through the trace to the state before its first event.
    for e in events.iter().rev() {
        match e.action {
            Action::Alloc => {
                layout.blocks.remove(&e.addr);
                live.remove(&e.addr);
            }
            Action::FreeRequested => {
                live.insert(e.addr, round_size(e.size));
            }
            Action::FreeCompleted => {
                layout.blocks.insert(e.addr, round_size(e.size));
            }
            Action::SegmentAlloc => {
                layout.segments.remove(&e.addr);
            }
            Action::SegmentFree => {
                layout.segments.insert(e.addr, e.size);
            }
            Action::Other => {}
        }
    }
    let initial_allocated: u64 = live.values().sum();
    let initial_reserved: u64 = layout.segments.values().sum();
    // Forward: each block's size, the counters, their peaks.
    let mut allocated = initial_allocated;
    let mut reserved = initial_reserved;
    let (mut peak_allocated, mut peak_reserved, mut peak_event) = (allocated, reserved, 0usize);
    let mut block_sizes = vec![0u64; events.len()];
    let mut series: Vec<(u64, u64)> = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        match e.action {
            Action::Alloc => {
                let size = if expandable {
                    round_size(e.size)
                } else {
                    layout.block_size(e.addr, e.size, max_split_size)
                };
                block_sizes[i] = size;
                layout.blocks.insert(e.addr, size);
                live.insert(e.addr, size);
                allocated = allocated.saturating_add(size);
            }
            Action::FreeRequested => {
                let size = live.remove(&e.addr).unwrap_or_else(|| round_size(e.size));
                allocated = allocated.saturating_sub(size);
            }
            Action::FreeCompleted => {
                layout.blocks.remove(&e.addr);
            }
            Action::SegmentAlloc => {
                layout.segments.insert(e.addr, e.size);
                reserved = reserved.saturating_add(e.size);
            }
            Action::SegmentFree => {
                layout.segments.remove(&e.addr);
                reserved = reserved.saturating_sub(e.size);
            }
            Action::Other => {}
        }
        if allocated > peak_allocated {
            peak_allocated = allocated;
            peak_event = i;
        }
        peak_reserved = peak_reserved.max(reserved);
        series.push((allocated, reserved));
    }
    // Again to the peak, keeping which event allocated each live block.
    let mut at_peak: HashMap<u64, usize> = HashMap::new();
    if peak_allocated > initial_allocated {
        for (i, e) in events.iter().enumerate().take(peak_event + 1) {
            match e.action {
                Action::Alloc => {
                    at_peak.insert(e.addr, i);
                }
                Action::FreeRequested => {
                    at_peak.remove(&e.addr);
                }
                _ => {}
            }
        }
    }
    // Largest first; among equals, the earlier allocation first.
    let mut order: Vec<usize> = at_peak.into_values().collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(block_sizes[i]), i));
    let mut blocks: Vec<LiveBlock> = order
        .into_iter()
        .map(|i| {
            let frames = frames_of(p, events[i].id);
            let (component, origin) = classify(&frames);
            LiveBlock {
                bytes: block_sizes[i],
                requested_bytes: events[i].size,
                component,
                origin,
                frames: top_frames(&frames),
            }
        })
        .collect();
    let mut by_origin: Vec<OriginTotal> = Vec::new();
    for b in &blocks {
        match by_origin.iter_mut().find(|o| o.origin == b.origin) {
            Some(o) => {
                o.bytes += b.bytes;
                o.n_blocks += 1;
            }
            None => by_origin.push(OriginTotal {
                origin: b.origin,
                component: b.component,
                bytes: b.bytes,
                n_blocks: 1,
            }),
        }
    }
    by_origin.sort_by_key(|b| std::cmp::Reverse(b.bytes));
    let n_blocks_at_peak = blocks.len() as u64;
    blocks.truncate(N_BLOCKS_LISTED);
    Ok(Measured {
        device,
        peak_allocated_bytes: peak_allocated,
        peak_reserved_bytes: peak_reserved,
        initial_allocated_bytes: initial_allocated,
        initial_reserved_bytes: initial_reserved,
        n_events: events.len() as u64,
        peak_event: peak_event as u64,
        timeline: downsample(&series),
        blocks_at_peak: blocks,
        by_origin,
        n_blocks_at_peak,
        expandable_segments: expandable,
    })
}

/// At most `MAX_TIMELINE_POINTS` points, each the highest allocated and reserved of its stretch of events.
fn downsample(series: &[(u64, u64)]) -> Vec<Point> {
    let n = series.len();
    let per = n.div_ceil(MAX_TIMELINE_POINTS).max(1);
    series
        .chunks(per)
        .enumerate()
        .map(|(k, chunk)| Point {
            event: (k * per + chunk.len() - 1) as u64,
            allocated_bytes: chunk.iter().map(|c| c.0).max().unwrap_or(0),
            reserved_bytes: chunk.iter().map(|c| c.1).max().unwrap_or(0),
        })
        .collect()
}

fn frames_of(p: &Pickle, event: Id) -> Vec<Frame> {
    let Some(frames) = p.field(event, "frames").and_then(|f| p.items(f)) else {
        return Vec::new();
    };
    frames
        .iter()
        .map(|&f| Frame {
            name: p
                .field(f, "name")
                .and_then(|v| p.str(v))
                .unwrap_or("")
                .to_string(),
            filename: p
                .field(f, "filename")
                .and_then(|v| p.str(v))
                .unwrap_or("")
                .to_string(),
            line: p.field(f, "line").and_then(|v| p.int(v)).unwrap_or(0),
        })
        .collect()
}

fn is_python(f: &Frame) -> bool {
    f.filename.ends_with(".py")
}

/// The frames a person reads first: the innermost Python ones, else the innermost named native ones past the
/// allocator's own.
fn top_frames(frames: &[Frame]) -> Vec<Frame> {
    let python: Vec<Frame> = frames
        .iter()
        .filter(|f| is_python(f))
        .take(N_FRAMES)
        .cloned()
        .collect();
    if !python.is_empty() {
        return python;
    }
    const PLUMBING: [&str; 6] = [
        "??",
        "unwind",
        "CapturedTraceback",
        "empty_generic",
        "empty_strided_generic",
        "empty_cuda",
    ];
    frames
        .iter()
        .filter(|f| !f.name.is_empty() && !PLUMBING.iter().any(|p| f.name.contains(p)))
        .take(N_FRAMES)
        .cloned()
        .collect()
}

/// What the frames say a block is for, as vramfit's component where they say it plainly.
fn classify(frames: &[Frame]) -> (Option<Category>, &'static str) {
    let any = |pred: &dyn Fn(&Frame) -> bool| frames.iter().any(pred);
    if any(&|f| f.name.contains("BlasWorkspace") || f.name.contains("cublasLt")) {
        return (Some(Category::Workspace), "CUDA library workspace");
    }
    if any(&|f| f.filename.contains("torch/optim/")) {
        return (Some(Category::Optimizer), "optimizer step and state");
    }
    if any(&|f| {
        is_python(f) && (f.name == "__init__" || f.name == "_apply" || f.name == "reset_parameters")
    }) {
        return (Some(Category::Weights), "model construction (weights)");
    }
    if any(&|f| {
        ["cross_entropy", "log_softmax", "nll_loss", "lm_head"]
            .iter()
            .any(|k| f.name.contains(k))
    }) {
        return (Some(Category::Logits), "loss and logits");
    }
    if any(&|f| f.name.contains("AccumulateGrad")) {
        return (Some(Category::Grads), "gradient accumulation");
    }
    if any(&|f| {
        !is_python(f) && (f.name.contains("Backward") || f.name.contains("autograd::Engine"))
    }) {
        return (None, "backward (gradients and temporaries)");
    }
    if any(&|f| is_python(f) && f.name == "forward") {
        return (Some(Category::Activations), "forward (activations)");
    }
    (None, "other (the frames do not say)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::pickle::{encode, Py};

    fn event(action: &str, addr: u64, size: u64) -> Py {
        Py::dict([
            ("action", Py::str(action)),
            ("addr", Py::Int(addr as i64)),
            ("size", Py::Int(size as i64)),
            ("stream", Py::Int(0)),
            ("frames", Py::List(vec![])),
        ])
    }

    fn snapshot(events: Vec<Py>) -> Vec<u8> {
        encode(&Py::dict([
            ("segments", Py::List(vec![])),
            ("device_traces", Py::List(vec![Py::List(events)])),
        ]))
    }

    #[test]
    fn counts_blocks_not_requests() {
        // A 2 MiB small-pool segment; 1000 bytes take a 1024-byte block, then a request that leaves under 512
        // bytes of the segment takes the whole rest (PyTorch's should_split).
        let seg = 1 << 21;
        let rest = (2 << 20) - 1024;
        let data = snapshot(vec![
            event("segment_alloc", 0x1000_0000, seg),
            event("alloc", 0x1000_0000, 1000),
            event("alloc", 0x1000_0000 + 1024, rest - 100),
            event("free_requested", 0x1000_0000 + 1024, rest - 100),
            event("free_completed", 0x1000_0000 + 1024, rest - 100),
        ]);
        let m = read_snapshot(&data).unwrap();
        assert_eq!(m.peak_allocated_bytes, 1024 + rest);
        assert_eq!(m.peak_reserved_bytes, seg);
        assert_eq!(m.peak_event, 2);
        assert_eq!(m.n_blocks_at_peak, 2);
        assert_eq!(m.blocks_at_peak[0].bytes, rest);
        assert_eq!(m.blocks_at_peak[0].requested_bytes, rest - 100);
    }

    #[test]
    fn each_bad_file_gets_one_message() {
        let msg = |d: &[u8]| read_snapshot(d).unwrap_err().to_string();
        assert!(msg(b"hello").contains("not a pickle"));
        assert!(
            msg(&encode(&Py::List(vec![]))).contains("holds a list, not a PyTorch memory snapshot")
        );
        let old = encode(&Py::dict([("segments", Py::List(vec![]))]));
        assert!(msg(&old).contains("no device traces"));
        let empty = snapshot(vec![]);
        assert!(msg(&empty).contains("device traces are empty"));
        let full = snapshot(vec![event("alloc", 4096, 10)]);
        assert!(msg(&full[..full.len() / 2]).contains("truncated"));
        assert!(msg(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2]).contains("truncated"));
    }
}
