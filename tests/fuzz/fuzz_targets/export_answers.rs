//! libFuzzer entry point for [`tailgate_fuzz::export_answers`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tailgate_fuzz::export_answers(data));
