#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moescope::fuzz::hf_index_json(data));
