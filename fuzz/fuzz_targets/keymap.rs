//! Keyboard reports and evdev events in any order decode without panicking.
#![no_main]
use ehc_agent::agent::scanner::keymap::{to_bytes, Decoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::new(data.first().is_some_and(|b| b & 1 == 1));
    let mut out = Vec::new();
    for chunk in data.chunks(8) {
        out.extend(d.report(chunk));
        if chunk.len() >= 3 {
            out.extend(d.evdev_key(u16::from_le_bytes([chunk[0], chunk[1]]), i32::from(chunk[2] % 3)));
        }
    }
    let text = to_bytes(&out);
    assert!(std::str::from_utf8(&text).is_ok());
});
