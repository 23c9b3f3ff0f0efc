//! The committed memory snapshots (`tests/data/stub-cuda/snapshots/`, recorded with PyTorch's own caching
//! allocator on the stub GPU) read back to their records' counters, to the byte: the peaks PyTorch's
//! `max_memory_allocated()` and `max_memory_reserved()` reported for the same run.

use std::path::PathBuf;

use vramfit::snapshot::read_snapshot;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/stub-cuda")
}

#[test]
fn committed_snapshots_give_their_records_peaks() {
    let text = std::fs::read_to_string(data().join("measured.json")).unwrap();
    let records: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut n_checked = 0;
    for r in records["records"].as_array().unwrap() {
        let Some(path) = r["snapshot"].as_str() else {
            continue;
        };
        let bytes = std::fs::read(data().join(path)).unwrap();
        let m = read_snapshot(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        let name = r["name"].as_str().unwrap();
        assert_eq!(
            m.peak_allocated_bytes,
            r["measured"]["peak_allocated_bytes"].as_u64().unwrap(),
            "{name}: allocated"
        );
        assert_eq!(
            m.peak_reserved_bytes,
            r["measured"]["peak_reserved_bytes"].as_u64().unwrap(),
            "{name}: reserved"
        );
        assert_eq!(
            m.initial_allocated_bytes, 0,
            "{name}: recorded from the start"
        );
        // The listed blocks at the peak are the largest ones, and all of them add up to the peak.
        let total: u64 = m.by_origin.iter().map(|o| o.bytes).sum();
        assert_eq!(total, m.peak_allocated_bytes, "{name}: blocks at the peak");
        assert!(m
            .blocks_at_peak
            .windows(2)
            .all(|w| w[0].bytes >= w[1].bytes));
        n_checked += 1;
    }
    assert_eq!(n_checked, 3);
}

#[test]
fn the_blocks_at_nanogpts_peak_say_what_they_are() {
    let bytes = std::fs::read(data().join("snapshots/nanogpt-30m-b1.pickle.gz")).unwrap();
    let m = read_snapshot(&bytes).unwrap();
    let origin = |o: &str| m.by_origin.iter().find(|t| t.origin == o).map(|t| t.bytes);
    // AdamW's exp_avg and exp_avg_sq of the 77 MB embedding, allocated in torch/optim/adam.py's _init_group.
    assert!(origin("optimizer step and state").unwrap() >= 2 * 77_266_944);
    assert!(origin("model construction (weights)").unwrap() >= 77_266_944);
    assert!(origin("loss and logits").unwrap() >= 103_022_592);
    let top = &m.blocks_at_peak[0];
    assert!(
        top.frames.iter().any(|f| f.name == "cross_entropy"),
        "{top:?}"
    );
}
