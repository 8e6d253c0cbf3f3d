//! HID POS reports of any shape and length: never a panic, never a code
//! over the limit.
#![no_main]
use ehc_agent::agent::scanner::hidpos::{Assembled, Assembler, Layout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for layout in [Layout::Honeywell, Layout::Newland] {
        let mut a = Assembler::new(layout, 200);
        let mut i = 0;
        while i < data.len() {
            let n = (data[i] as usize % 70).max(1);
            let end = (i + n).min(data.len());
            if let Some(Assembled::Code(c)) = a.report(&data[i..end]) {
                assert!(c.len() <= 200);
            }
            i = end;
        }
        if let Some(Assembled::Code(c)) = a.idle() {
            assert!(c.len() <= 200);
        }
    }
});
