//! Replays an allocation sequence through vramfit's caching allocator model (`allocator::CachingAllocator`,
//! PyTorch's default configuration) and prints where it takes new segments and its peaks: to tell, for a reserved
//! figure the estimate misses, whether the allocator or the order of allocations is at fault, and which change of
//! order moves it.
//!
//!     scripts/measure/snapshot_events.py MEASURED.pickle.gz seq.events    (a memory snapshot, or the model's own)
//!     cargo run --release --example replay < seq.events                   (then edit the order, and again)
//!
//! One line per event: `a ID BYTES [LABEL]` allocates BYTES (as requested; the allocator rounds them) for ID,
//! `f ID [LABEL]` frees ID's block. `snapshot_events.py` labels each allocation with the Inductor wrapper line or
//! the vramfit op that asked.
use std::io::BufRead;
use vramfit::allocator::{AllocatorConfig, CachingAllocator};

fn main() {
    // No capacity of its own: the sequence replayed is one that ran.
    let mut a = CachingAllocator::new(AllocatorConfig::default(), 1 << 50);
    let mut n_segments = 0;
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.expect("readable input");
        let f: Vec<&str> = line.split_whitespace().collect();
        let id = |k: usize| -> u32 { f[k].parse().expect("an allocation id") };
        match f.first() {
            Some(&"a") => {
                let bytes: u64 = f[2].parse().expect("a size in bytes");
                let before = a.reserved_bytes();
                a.malloc(id(1), bytes).expect("no capacity to run out of");
                if a.reserved_bytes() > before {
                    n_segments += 1;
                    println!(
                        "segment {n_segments} at line {}: {bytes} B asked ({}), reserved {}",
                        i + 1,
                        f.get(3).unwrap_or(&"-"),
                        a.reserved_bytes()
                    );
                }
            }
            Some(&"f") => a.free(id(1)),
            _ => {}
        }
    }
    println!(
        "peak allocated {} B, peak reserved {} B",
        a.peak_allocated_bytes(),
        a.peak_reserved_bytes()
    );
}
