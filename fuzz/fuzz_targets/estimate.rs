//! The estimator on setups built from raw bytes: every field, every enum, valid or not.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vramfit::fuzzing::estimate_from_bytes(data);
});
