#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fedpref_fuzz::admin_manifest(data));
