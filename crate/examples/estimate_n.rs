//! Runs `estimate_peak` N times for one setup: `founding` or a model preset id. For instruction counts (the
//! comparison to trust on a shared machine): run it under `valgrind --tool=callgrind` with two counts and
//! divide the difference of the totals by the difference of the counts. With N = 0 it prints the setup as the
//! page's query string instead (for measuring the page's wasm on the same setup).
//!
//!     cargo run --release --example estimate_n -- llama-3.1-70b 3
fn main() {
    let mut args = std::env::args().skip(1);
    let id = args.next().unwrap_or_else(|| "founding".into());
    let n: u32 = args.next().map_or(1, |n| n.parse().expect("a count"));
    let s = if id == "founding" {
        vramfit::presets::founding()
    } else {
        vramfit::presets::model_preset(&id).expect("a preset id")
    };
    if n == 0 {
        println!("{}", vramfit::input::setup_to_query(&s));
        return;
    }
    let mut last = 0;
    for _ in 0..n {
        last = std::hint::black_box(vramfit::estimate_peak(std::hint::black_box(&s)))
            .unwrap()
            .device_total_bytes;
    }
    println!("{last}");
}
