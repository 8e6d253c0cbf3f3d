//! Scanner framing: arbitrary bytes in arbitrary chunks, every terminator,
//! idle gaps; never a panic, never a scan over the limit.
#![no_main]
use std::time::{Duration, Instant};

use ehc_agent::config::Terminator;
use ehc_agent::agent::scanner::framing::{Event, Framer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let term = [Terminator::Cr, Terminator::Lf, Terminator::Crlf, Terminator::None][(sel & 3) as usize];
    let mut f = Framer::new(term, 64, Duration::from_millis(u64::from(sel >> 2)));
    let t0 = Instant::now();
    for (i, chunk) in rest.chunks(((sel >> 4) as usize).max(1)).enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 7);
        for ev in f.push(chunk, now).into_iter().chain(if i % 3 == 0 { f.idle(now) } else { vec![] }) {
            if let Event::Scan(s) = ev {
                assert!(s.len() <= 64);
            }
        }
    }
});
