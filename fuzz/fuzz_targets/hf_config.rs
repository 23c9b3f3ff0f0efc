//! The Hugging Face config.json reader (and the paste-anything reader) on any text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vramfit::fuzzing::hf_config(data);
});
