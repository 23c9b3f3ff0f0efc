//! Inductor's memory-ordering pass (`vramfit::reorder`) against the graphs Inductor weighed in reference runs
//! (tests/data/stub-cuda/inductor-graphs/, scripts/measure/inductor_graphs.py): for every compiled graph, each
//! candidate order node for node, each estimated peak to the byte, and the order kept.

use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use vramfit::reorder::{Buffer, Graph, Method, Node};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/stub-cuda/inductor-graphs")
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// A recorded graph as `reorder::Graph`: buffers by name turned into indices.
fn graph(g: &Value) -> Graph {
    let bufs = g["buffers"].as_array().unwrap();
    let by_name: HashMap<&str, usize> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| (b["name"].as_str().unwrap(), i))
        .collect();
    let names = |v: &Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| by_name[n.as_str().unwrap()])
            .collect()
    };
    Graph {
        buffers: bufs
            .iter()
            .map(|b| Buffer {
                size_alloc: b["size_alloc"].as_u64().unwrap(),
                size_free: b["size_free"].as_u64().unwrap(),
                users: indices(&b["users"]),
                input: b["input"].as_bool().unwrap(),
                output: b["output"].as_bool().unwrap(),
            })
            .collect(),
        nodes: g["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| Node {
                size: n["size"].as_u64().unwrap(),
                outputs: names(&n["outputs"]),
                preds: indices(&n["preds"]),
                succs: indices(&n["succs"]),
                reads: names(&n["reads"]),
                deps: indices(&n["dfs_deps"]),
            })
            .collect(),
    }
}

#[test]
fn every_recorded_graph_is_ordered_and_weighed_as_inductor_did() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 17, "{} recorded cases", files.len());
    let (mut graphs, mut reordered, mut failures) = (0, 0, Vec::new());
    for f in &files {
        let rec: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let case = rec["case"].as_str().unwrap();
        for (k, g) in rec["graphs"].as_array().unwrap().iter().enumerate() {
            graphs += 1;
            let d = graph(g).reorder();
            for (m, method) in Method::ALL.iter().enumerate() {
                let (order, peak) = (
                    indices(&g["orders"][method.name()]),
                    g["estimates"][method.name()].as_u64().unwrap(),
                );
                if d.orders[m] != order || d.peaks[m] != peak {
                    failures.push(format!(
                        "{case} graph {k} {}: peak {} (Inductor {peak}), order {}",
                        method.name(),
                        d.peaks[m],
                        if d.orders[m] == order {
                            "same"
                        } else {
                            "differs"
                        }
                    ));
                }
            }
            let kept = g["kept"].as_str().unwrap();
            if d.kept.name() != kept || d.kept_order() != indices(&g["kept_order"]).as_slice() {
                failures.push(format!(
                    "{case} graph {k}: kept {} (Inductor {kept})",
                    d.kept.name()
                ));
            }
            reordered += (kept != "own") as usize;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The records include graphs where Inductor kept another order than its own (LPMF and BFS backward graphs).
    assert!(
        graphs >= 20 && reordered >= 3,
        "{graphs} graphs, {reordered} reordered"
    );
}

/// The reference case named `name` as a setup (its entry in scripts/measure/cases*.json).
fn case_setup(name: &str) -> vramfit::Setup {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/measure");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let file = p.file_name().unwrap().to_str().unwrap().to_string();
        if !(file.starts_with("cases") && file.ends_with(".json")) {
            continue;
        }
        let cases: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        for c in cases.as_array().unwrap() {
            if c["name"] == name {
                let mut c = c.clone();
                c.as_object_mut().unwrap().remove("name");
                return vramfit::input::setup_from_json(&c.to_string()).unwrap();
            }
        }
    }
    panic!("no case {name}")
}

/// Where the compiled executor describes a backward graph kernel by kernel (nanoGPT's blocks), the order it
/// keeps for it is the one Inductor kept for that case's backward graph: its own, LPMF or BFS.
#[test]
fn the_described_backward_graphs_keep_the_order_inductor_kept() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let (mut described, mut kept_other, mut failures) = (0, 0, Vec::new());
    for f in &files {
        let rec: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        let case = rec["case"].as_str().unwrap();
        let backward = rec["graphs"].as_array().unwrap().last().unwrap();
        let inductor = backward["kept"].as_str().unwrap();
        let sim = vramfit::step::simulate(&case_setup(case)).unwrap();
        let orders = sim.graph_orders();
        if orders.is_empty() {
            continue;
        }
        described += 1;
        kept_other += (inductor != "own") as usize;
        if orders.iter().any(|m| m.name() != inductor) {
            failures.push(format!("{case}: {orders:?}, Inductor kept {inductor}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        described >= 6 && kept_other >= 2,
        "{described} described, {kept_other} reordered"
    );
}
