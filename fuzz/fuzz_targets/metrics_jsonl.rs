#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| moescope::fuzz::metrics_jsonl(data));
