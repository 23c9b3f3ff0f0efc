//! A refactoring check at full depth, beside `digest` (which cuts models to 3 layers): one line per setup with a
//! digest of every allocator event and traced block (addresses included), and one of every figure the page shows
//! (the estimate, the comparison, the advice, the largest batch and block that fit, both sweeps, the fit map),
//! for every model preset on three GPUs with compile, checkpointing and expandable segments toggled. Run it
//! before and after a change that must move no byte, and compare the outputs:
//!
//!     cargo run --release --example page_digest > before.txt     (then again after the change; diff them)
//!
//! The page's figures come from one `Page` (as the page asks for them); with PLAIN=1, from the functions of
//! `advice` and `sweep` asked one by one. Both print the same.
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use vramfit::model::Setup;
use vramfit::sweep::{self, Axis};

fn events(s: &Setup) -> String {
    match vramfit::step::simulate_recording(s, true) {
        Err(e) => format!("error {e}"),
        Ok(sim) => {
            let mut h = DefaultHasher::new();
            for e in sim.events() {
                (
                    e.id,
                    &e.phase,
                    e.op,
                    e.bytes,
                    e.live_bytes,
                    e.reserved_bytes,
                )
                    .hash(&mut h);
            }
            for t in sim.allocator().trace() {
                (format!("{:?}", t.action), t.addr, t.size, t.id).hash(&mut h);
            }
            format!("{:016x} {}", h.finish(), sim.events().len())
        }
    }
}

/// The page's figures, one line each, from the functions asked one by one.
fn plain(s: &Setup) -> Vec<String> {
    let r = vramfit::estimate(s);
    let mut out = vec![format!("{r:?}")];
    let Ok(r) = r else { return out };
    out.push(format!("{:?}", vramfit::advice::compile_comparison(s, &r)));
    out.push(format!("{:?}", vramfit::advice::suggestions(s)));
    out.push(format!("{:?}", vramfit::advice::largest_that_fit(s)));
    for axis in [Axis::BatchSize, Axis::BlockSize] {
        let mut values = vramfit::page::sweep_values(s, axis);
        if axis == Axis::BatchSize && !values.contains(&s.train.batch_size) {
            values.push(s.train.batch_size);
            values.sort_unstable();
        }
        out.push(format!("{:?}", sweep::sweep(s, axis, &values)));
    }
    let (batches, blocks) = vramfit::page::fit_map_axes(s);
    let budget = match s.device.memory_bytes {
        0 => u64::MAX,
        m => m,
    };
    out.push(format!(
        "{:?}",
        sweep::fit_map(s, &batches, &blocks, budget)
    ));
    out
}

/// The same lines from one `Page`, in the page's order.
fn page(s: &Setup) -> Vec<String> {
    let mut p = vramfit::page::Page::new(s.clone());
    let r = p.estimate();
    let mut out = vec![format!("{r:?}")];
    let Ok(r) = r else { return out };
    out.push(format!("{:?}", p.compile_comparison(&r)));
    out.push(format!("{:?}", p.suggestions()));
    out.push(format!("{:?}", p.largest_that_fit()));
    out.push(format!("{:?}", p.sweep(Axis::BatchSize)));
    out.push(format!("{:?}", p.sweep(Axis::BlockSize)));
    out.push(format!("{:?}", p.fit_map()));
    out
}

fn main() {
    let figures = if std::env::var("PLAIN").is_ok() {
        plain
    } else {
        page
    };
    for p in vramfit::presets::MODEL_PRESETS {
        for gpu in ["rtx-4070", "h100-80", "a100-80"] {
            for variant in ["", "compile", "checkpointing", "expandable"] {
                let mut s = (p.setup)();
                let g = vramfit::presets::gpu(gpu).expect("a GPU preset");
                (s.device.memory_bytes, s.device.sm) = (g.memory_bytes, g.sm);
                match variant {
                    "compile" => s.train.compile = !s.train.compile,
                    "checkpointing" => s.train.checkpointing = !s.train.checkpointing,
                    "expandable" => s.train.alloc_conf.expandable_segments = true,
                    _ => {}
                }
                let mut h = DefaultHasher::new();
                figures(&s).hash(&mut h);
                println!(
                    "{} {gpu} {variant}\tevents {}\tfigures {:016x}",
                    p.id,
                    events(&s),
                    h.finish()
                );
            }
        }
    }
}
