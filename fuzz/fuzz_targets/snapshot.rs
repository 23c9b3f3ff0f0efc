//! The PyTorch memory-snapshot reader (gzip, the plain-data pickle reader, the trace replay) on any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vramfit::fuzzing::snapshot(data);
});
