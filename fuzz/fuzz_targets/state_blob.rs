#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| livemig::fuzz::state_blob(data));
