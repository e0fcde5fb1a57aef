//! libFuzzer entry point for [`tailgate_fuzz::json_lines`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tailgate_fuzz::json_lines(data));
