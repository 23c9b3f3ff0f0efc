//! A refactoring check: one line per setup with a digest of every allocator event the estimate makes (each run
//! of frees hashed as a set, since their order moves no byte), the event count and the peak. Setups: every
//! reference record in tests/data and every model preset crossed with precision, compile, checkpointing,
//! accumulation, dropout, attention, optimizer, GPU and zero_grad variants. Run it before and after a change that
//! must move no byte, and compare the outputs:
//!
//!     cargo run --release --example digest > before.txt     (then again after the change; diff them)
//!
//! With DUMP=NAME it prints the events of the first setup whose name contains NAME instead.
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use vramfit::input::setup_from_value;
use vramfit::model::Setup;
use vramfit::policy::{Attention, Optimizer, Precision};

fn digest(s: &Setup) -> String {
    match vramfit::step::simulate_recording(s, true) {
        Err(e) => format!("error {e}"),
        Ok(sim) => {
            let mut h = DefaultHasher::new();
            // Runs of frees hash as a multiset with the state after the run (their order moves nothing).
            let mut run: Vec<i64> = Vec::new();
            let mut last = (0u64, 0u64);
            for e in sim.events() {
                if e.bytes < 0 {
                    run.push(e.bytes);
                    last = (e.live_bytes, e.reserved_bytes);
                    continue;
                }
                if !run.is_empty() {
                    run.sort();
                    (&run, last).hash(&mut h);
                    run.clear();
                }
                (&e.phase, e.op, e.bytes, e.live_bytes, e.reserved_bytes).hash(&mut h);
            }
            run.sort();
            (&run, last).hash(&mut h);
            sim.step_peaks().hash(&mut h);
            let p = sim.peak();
            format!(
                "{:016x} {} {} {}",
                h.finish(),
                sim.events().len(),
                p.bytes,
                p.phase.label()
            )
        }
    }
}

fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/");
    let mut setups: Vec<(String, Setup)> = Vec::new();
    for f in [
        "measured.json",
        "compiled/measured.json",
        "stub-cuda/measured.json",
        "stub-cuda/compiled.json",
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{root}{f}")).unwrap()).unwrap();
        for r in v["records"].as_array().unwrap() {
            let s = setup_from_value(&r["setup"]).unwrap();
            setups.push((format!("{f}:{}", r["name"]), s));
        }
    }
    for p in vramfit::presets::MODEL_PRESETS {
        let base = (p.setup)();
        for prec in [
            Precision::Fp32,
            Precision::Fp16Amp,
            Precision::Bf16Amp,
            Precision::Bf16,
        ] {
            for compile in [false, true] {
                for ckpt in [false, true] {
                    for (accum, drop, manual, opt, sm, keep) in [
                        (1, 0.0, false, Optimizer::AdamWFused, 90, false),
                        (2, 0.1, true, Optimizer::AdamW, 80, true),
                        (3, 0.0, false, Optimizer::SgdMomentum, 89, false),
                        (1, 0.2, false, Optimizer::Sgd, 86, false),
                    ] {
                        let mut s = base.clone();
                        s.model.n_layer = s.model.n_layer.min(3);
                        s.train.batch_size = 2;
                        s.train.seq_len = s.train.seq_len.min(256);
                        s.train.precision = prec;
                        s.train.compile = compile;
                        s.train.checkpointing = ckpt;
                        s.train.grad_accum_steps = accum;
                        s.model.dropout = drop;
                        if manual {
                            s.train.attention = Attention::Manual;
                        }
                        s.train.optimizer = opt;
                        s.device.sm = sm;
                        s.train.zero_grad_set_to_none = !keep;
                        setups.push((
                            format!("{} {prec:?} c{compile} k{ckpt} a{accum} d{drop} m{manual} {opt:?} sm{sm} keep{keep}", p.id),
                            s,
                        ));
                    }
                }
            }
        }
    }
    if let Ok(want) = std::env::var("DUMP") {
        for (name, s) in &setups {
            if name.contains(&want) {
                let sim = vramfit::step::simulate_recording(s, true).unwrap();
                for e in sim.events() {
                    println!(
                        "{} {} {} {} {}",
                        e.phase, e.op, e.bytes, e.live_bytes, e.reserved_bytes
                    );
                }
                return;
            }
        }
    }
    for (name, s) in setups {
        println!("{name}\t{}", digest(&s));
    }
}
