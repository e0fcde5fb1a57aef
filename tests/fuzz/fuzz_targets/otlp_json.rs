//! libFuzzer entry point for [`tailgate_fuzz::otlp_json`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tailgate_fuzz::otlp_json(data));
