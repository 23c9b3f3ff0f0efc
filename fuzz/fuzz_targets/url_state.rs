//! The URL-state parser on any query string, estimating whatever parses.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vramfit::fuzzing::url_state(data);
});
