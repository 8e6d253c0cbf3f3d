//! Any line from an HIS client is parsed or refused, never a panic; a
//! refusal's reference is short.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(r) = ehc_agent::agent::his::protocol::parse_in(data) {
        assert!(r.reference.as_ref().is_none_or(|v| v.to_string().len() <= 128));
        let _ = r.into_out().to_line();
    }
});
