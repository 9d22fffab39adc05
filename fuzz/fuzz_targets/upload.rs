#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fedpref_fuzz::upload(data));
