#![cfg(not(target_arch = "wasm32"))]
//! `vramfit compare --snapshot` and `vramfit estimate --format snapshot`, driven as a person would (issue 15).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn snapshot(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/stub-cuda/snapshots")
        .join(name)
        .display()
        .to_string()
}

/// Runs vramfit; returns (exit code, stdout bytes, stderr).
fn vramfit(args: &[&str]) -> (i32, Vec<u8>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vramfit"))
        .args(args)
        .output()
        .expect("vramfit runs");
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The setup of the `tiny-1layer-fp32-sgd` case (scripts/measure/cases.json) as flags.
const TINY: [&str; 21] = [
    "--family",
    "gpt2",
    "--n-layer",
    "1",
    "--n-head",
    "4",
    "--n-embd",
    "64",
    "--block-size",
    "64",
    "--vocab-size",
    "65",
    "--no-bias",
    "--batch-size",
    "1",
    "--precision",
    "fp32",
    "--optimizer",
    "sgd",
    "--no-compile",
    "--no-checkpointing",
];

#[test]
fn compare_json_gives_both_peaks_and_the_difference() {
    let path = snapshot("tiny-1layer-fp32-sgd.pickle.gz");
    let mut args = vec!["compare", "--snapshot", &path, "--format", "json"];
    args.extend(TINY);
    let (code, out, err) = vramfit(&args);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_slice(&out).unwrap();
    // The record's counters (tests/data/stub-cuda/measured.json), to the byte.
    assert_eq!(v["measured_peak_allocated_bytes"], 34_236_928);
    assert_eq!(v["measured_peak_reserved_bytes"], 35_651_584);
    let (code, est, _) = vramfit(&[&["estimate", "--format", "json"][..], &TINY].concat());
    assert_eq!(code, 0);
    let est: Value = serde_json::from_slice(&est).unwrap();
    assert_eq!(
        v["predicted_peak_allocated_bytes"],
        est["peak_allocated_bytes"]
    );
    assert_eq!(
        v["predicted_peak_reserved_bytes"],
        est["peak_reserved_bytes"]
    );
    let d = v["allocated_difference_percent"].as_f64().unwrap();
    assert!(d.abs() < 1.0, "{d}");
    let blocks = v["measured"]["blocks_at_peak"].as_array().unwrap();
    assert_eq!(blocks[0]["component"], "workspace", "{}", blocks[0]);
}

#[test]
fn compare_table_shows_the_difference_and_the_blocks() {
    let path = snapshot("nanogpt-30m-b1.pickle.gz");
    let (code, out, err) = vramfit(&["compare", "--snapshot", &path, "--batch-size", "1"]);
    assert_eq!(code, 0, "{err}");
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("peak allocated"), "{text}");
    assert!(text.contains("difference"), "{text}");
    assert!(text.contains("optimizer step and state"), "{text}");
    assert!(text.contains("cross_entropy (functional.py:"), "{text}");
    // The audit: one block was "1 blocks". Each origin's count agrees with its noun.
    let origins: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("by what their frames say"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(origins.iter().any(|l| l.ends_with("  1 block")), "{text}");
    for l in &origins {
        let words: Vec<&str> = l.split_whitespace().collect();
        let n: u64 = words[words.len() - 2].parse().unwrap();
        assert_eq!(
            words[words.len() - 1],
            if n == 1 { "block" } else { "blocks" },
            "{l}"
        );
    }
}

/// The audit: a one-layer model's largest item read "1 blocks x 433 MiB saved per block".
#[test]
fn one_block_is_one_block() {
    let (code, out, err) = vramfit(&[
        "estimate",
        "--n-layer",
        "1",
        "--batch-size",
        "64",
        "--vocab-size",
        "65",
        "--no-compile",
    ]);
    assert_eq!(code, 0, "{err}");
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("The largest item at the peak is activations (434 MiB): 1 block x 433 MiB saved per block"),
        "{text}"
    );
}

#[test]
fn bad_snapshots_exit_2_with_one_message() {
    let dir = std::env::temp_dir().join(format!("vramfit-cli-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let full = std::fs::read(snapshot("tiny-1layer-fp32-sgd.pickle.gz")).unwrap();
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "truncated.pickle.gz",
            full[..full.len() / 2].to_vec(),
            "truncated",
        ),
        (
            "text.pickle",
            b"not a pickle at all".to_vec(),
            "not a pickle",
        ),
        // pickle.dumps([1, 2]) with protocol 4.
        (
            "list.pickle",
            vec![0x80, 4, b']', b'(', b'K', 1, b'K', 2, b'e', b'.'],
            "holds a list",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let (code, _, err) = vramfit(&["compare", "--snapshot", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(
            err.contains(expected) && err.lines().count() == 1,
            "{name}: {err}"
        );
        assert!(!err.contains("panicked"));
    }
    let (code, _, err) = vramfit(&["compare"]);
    assert_eq!(code, 2);
    assert!(err.contains("--snapshot FILE"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn estimate_writes_a_snapshot_the_reader_reads_back() {
    let (code, out, err) = vramfit(&[&["estimate", "--format", "snapshot"][..], &TINY].concat());
    assert_eq!(code, 0, "{err}");
    assert_eq!(&out[..2], &[0x80, 4], "a protocol-4 pickle");
    let m = vramfit::snapshot::read_snapshot(&out).unwrap();
    let (_, est, _) = vramfit(&[&["estimate", "--format", "json"][..], &TINY].concat());
    let est: Value = serde_json::from_slice(&est).unwrap();
    assert_eq!(m.peak_reserved_bytes, est["peak_reserved_bytes"]);
    assert!(m.peak_allocated_bytes >= est["peak_allocated_bytes"].as_u64().unwrap());
}
