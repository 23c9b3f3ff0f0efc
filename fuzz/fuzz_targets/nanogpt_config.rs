//! The nanoGPT config reader on any text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vramfit::fuzzing::nanogpt_config(data);
});
