//! The predicted allocation timeline written as a PyTorch memory snapshot (the dict
//! `torch.cuda.memory._snapshot()` returns, pickled), so that PyTorch's own viewer (`torch.cuda._memory_viz`,
//! pytorch.org/memory_viz) draws vramfit's prediction as it draws a measured run.
//!
//! Every block and segment event comes from the modelled caching allocator (`allocator`'s trace) with the
//! address it chose; each block's one frame names the op that allocates it, the component and the phase (the
//! viewer shows it as the block's stack). Timestamps are event numbers: the model has no clock. `segments` is
//! the allocator's state after the run.

use std::collections::{BTreeMap, HashMap};

use crate::allocator::{TraceAction, TraceEntry};
use crate::error::Error;
use crate::model::Setup;
use crate::pickle::{encode, Py};
use crate::sim::Category;
use crate::snapshot::component_name;

/// The snapshot of the setup's predicted run, pickled (protocol 4, not compressed).
///
/// # Errors
/// As `estimate`.
pub fn predicted_snapshot(setup: &Setup) -> Result<Vec<u8>, Error> {
    setup.validate()?;
    let sim = crate::step::simulate_recording(setup, true)?;
    // Who each caller id is: the op, the component and the phase of its allocation, and the bytes it asked for
    // (what a real trace records as `size`; the block can be larger).
    let mut who: HashMap<u32, (&'static str, Category, &str, u64)> = HashMap::new();
    for e in sim.events() {
        if e.bytes > 0 {
            who.insert(e.id, (e.op, e.category, e.phase.as_str(), e.bytes as u64));
        }
    }
    let requested = |id: u32, block: u64| who.get(&id).map_or(block, |w| w.3.min(block));
    let frames_of = |id: u32| -> Py {
        let Some(&(op, category, phase, _)) = who.get(&id) else {
            return Py::List(vec![]);
        };
        Py::List(vec![Py::dict([
            ("name", Py::str(op)),
            (
                "filename",
                Py::Str(format!("vramfit: {} ({phase})", component_name(category))),
            ),
            ("line", Py::Int(0)),
        ])])
    };
    let mut trace = Vec::new();
    // The state after the run, for `segments`: segment address -> (size, expandable); block address -> (size,
    // caller id).
    let mut segments: BTreeMap<u64, (u64, u8)> = BTreeMap::new();
    let mut blocks: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
    let expandable = setup.train.alloc_conf.expandable_segments;
    let entry = |action: &str, t: &TraceEntry, size: u64, time: usize, frames: Py| {
        Py::dict([
            ("action", Py::str(action)),
            ("addr", Py::Int(t.addr as i64)),
            ("size", Py::Int(size as i64)),
            ("stream", Py::Int(i64::from(t.stream.number()))),
            ("time_us", Py::Int(time as i64)),
            ("compile_context", Py::str("N/A")),
            ("user_metadata", Py::str("")),
            ("pool_id", Py::Tuple(vec![Py::Int(0), Py::Int(0)])),
            ("frames", frames),
        ])
    };
    for (i, t) in sim.allocator().trace().iter().enumerate() {
        match t.action {
            TraceAction::SegmentAlloc | TraceAction::SegmentMap => {
                let name = if t.action == TraceAction::SegmentAlloc {
                    "segment_alloc"
                } else {
                    "segment_map"
                };
                trace.push(entry(name, t, t.size, i, Py::List(vec![])));
                segments.insert(t.addr, (t.size, t.stream.number()));
            }
            TraceAction::SegmentFree | TraceAction::SegmentUnmap => {
                let name = if t.action == TraceAction::SegmentFree {
                    "segment_free"
                } else {
                    "segment_unmap"
                };
                trace.push(entry(name, t, t.size, i, Py::List(vec![])));
                segments.remove(&t.addr);
            }
            TraceAction::Alloc => {
                let size = requested(t.id, t.size);
                trace.push(entry("alloc", t, size, i, frames_of(t.id)));
                blocks.insert(t.addr, (t.size, t.id));
            }
            TraceAction::Free => {
                let size = requested(t.id, t.size);
                trace.push(entry("free_requested", t, size, i, frames_of(t.id)));
                trace.push(entry("free_completed", t, size, i, frames_of(t.id)));
                blocks.remove(&t.addr);
            }
        }
    }
    let mut segment_list = Vec::new();
    if !expandable {
        for (&addr, &(size, stream)) in &segments {
            let end = addr.saturating_add(size);
            let mut list = Vec::new();
            let (mut at, mut allocated) = (addr, 0u64);
            for (&b, &(n, id)) in blocks.range(addr..end) {
                if b > at {
                    list.push(block(at, b - at, 0, Py::List(vec![])));
                }
                list.push(block(b, n, requested(id, n), frames_of(id)));
                allocated += n;
                at = b + n;
            }
            if at < end {
                list.push(block(at, end - at, 0, Py::List(vec![])));
            }
            segment_list.push(Py::dict([
                ("device", Py::Int(0)),
                ("address", Py::Int(addr as i64)),
                ("total_size", Py::Int(size as i64)),
                ("allocated_size", Py::Int(allocated as i64)),
                ("active_size", Py::Int(allocated as i64)),
                ("requested_size", Py::Int(allocated as i64)),
                ("stream", Py::Int(i64::from(stream))),
                (
                    "segment_type",
                    Py::str(if size <= 2 << 20 { "small" } else { "large" }),
                ),
                ("segment_pool_id", Py::Tuple(vec![Py::Int(0), Py::Int(0)])),
                ("is_expandable", Py::Bool(false)),
                ("frames", Py::List(vec![])),
                ("blocks", Py::List(list)),
            ]));
        }
    }
    let snapshot = Py::dict([
        ("segments", Py::List(segment_list)),
        ("device_traces", Py::List(vec![Py::List(trace)])),
        (
            "allocator_settings",
            Py::dict([(
                "expandable_segments",
                Py::Bool(setup.train.alloc_conf.expandable_segments),
            )]),
        ),
        ("external_annotations", Py::List(vec![])),
    ]);
    Ok(encode(&snapshot))
}

/// A block of `segments`: allocated when something requested bytes of it, else free.
fn block(addr: u64, size: u64, requested: u64, frames: Py) -> Py {
    let state = if requested > 0 {
        "active_allocated"
    } else {
        "inactive"
    };
    Py::dict([
        ("address", Py::Int(addr as i64)),
        ("size", Py::Int(size as i64)),
        ("requested_size", Py::Int(requested as i64)),
        ("state", Py::str(state)),
        ("frames", frames),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer read back by the reader: the modelled caching allocator's own counters (which count whole
    /// blocks, as PyTorch's do) and the estimate's peaks, allocated and reserved.
    #[test]
    fn the_predicted_snapshot_reads_back_to_the_modelled_counters() {
        let setup = crate::input::setup_from_json(
            r#"{"model": {"family": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128,
                "vocab_size": 1000, "bias": false},
                "train": {"batch_size": 2, "precision": "fp16-amp", "optimizer": "adamw"}}"#,
        )
        .unwrap();
        let report = crate::estimate(&setup).unwrap();
        let m = crate::snapshot::read_snapshot(&predicted_snapshot(&setup).unwrap()).unwrap();
        let sim = crate::step::simulate(&setup).unwrap();
        assert_eq!(
            m.peak_allocated_bytes,
            sim.allocator().peak_allocated_bytes()
        );
        // Peak allocated is the allocator's counter: the snapshot's blocks say the same.
        assert_eq!(m.peak_allocated_bytes, report.peak_allocated_bytes);
        assert_eq!(m.peak_reserved_bytes, report.peak_reserved_bytes);
        assert_eq!(m.initial_allocated_bytes, 0);
        // The frames name vramfit's components, which the reader does not classify: the listed blocks carry them.
        assert!(m.blocks_at_peak[0].frames[0]
            .filename
            .starts_with("vramfit: "));
    }
}
