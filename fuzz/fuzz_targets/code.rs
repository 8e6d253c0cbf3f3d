//! QR code classification never panics, and a classified code is trimmed
//! and bounded.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(s) = ehc_agent::code::classify(&text) {
        assert!(!s.text.is_empty() && s.text.len() <= ehc_agent::code::MAX_CODE_LEN);
        assert_eq!(s.text.trim(), s.text);
    }
});
