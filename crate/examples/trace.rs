//! Prints the simulated allocator events for a setup JSON file, one per line, in the same columns as
//! `VRAMFIT_TRACE` output of scripts/measure/measure.py, to compare the model with a measured trace.
//!
//! usage: cargo run --example trace -- setup.json

fn main() {
    let path = std::env::args().nth(1).expect("usage: trace SETUP.json");
    let text = std::fs::read_to_string(&path).expect("readable file");
    let setup = vramfit::input::setup_from_json(&text).unwrap_or_else(|e| panic!("{e}"));
    setup.validate().unwrap_or_else(|e| panic!("{e}"));
    let sim = vramfit::step::simulate_recording(&setup, true).unwrap_or_else(|e| panic!("{e}"));
    for e in sim.events() {
        println!(
            "{}\t{}\t{:+}\t{}\t{}",
            e.phase, e.op, e.bytes, e.live_bytes, e.reserved_bytes
        );
    }
    let a = sim.allocator().stats();
    eprintln!(
        "peak live {} allocator peak allocated {} peak reserved {}",
        sim.peak().bytes,
        a.allocated_bytes.peak,
        a.reserved_bytes.peak
    );
}
