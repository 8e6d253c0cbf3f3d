//! Inputs the fuzzers found (and seeds of the same kinds), replayed by every
//! `cargo test`: `fuzz/regressions/<target>/*`. Each must be handled without
//! a panic, as in the fuzz target of the same name.

use std::time::{Duration, Instant};

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no inputs for {target}");
    v
}

#[test]
fn replay_every_target() {
    for (_, data) in inputs("code") {
        let _ = ehc_agent::code::classify(&String::from_utf8_lossy(&data));
    }
    for (_, data) in inputs("framing") {
        for t in [
            ehc_agent::config::Terminator::Cr,
            ehc_agent::config::Terminator::Lf,
            ehc_agent::config::Terminator::Crlf,
            ehc_agent::config::Terminator::None,
        ] {
            let mut f =
                ehc_agent::agent::scanner::framing::Framer::new(t, 64, Duration::from_millis(5));
            let _ = f.push(&data, Instant::now());
            let _ = f.idle(Instant::now());
        }
    }
    for (_, data) in inputs("keymap") {
        let mut d = ehc_agent::agent::scanner::keymap::Decoder::new(true);
        for c in data.chunks(8) {
            let _ = d.report(c);
        }
    }
    for (_, data) in inputs("hidpos") {
        for l in [
            ehc_agent::agent::scanner::hidpos::Layout::Honeywell,
            ehc_agent::agent::scanner::hidpos::Layout::Newland,
        ] {
            let mut a = ehc_agent::agent::scanner::hidpos::Assembler::new(l, 200);
            let _ = a.report(&data);
            let _ = a.idle();
        }
    }
    for (_, data) in inputs("his_message") {
        let _ = ehc_agent::agent::his::protocol::parse_in(&data);
    }
    for (_, data) in inputs("platform_response") {
        use ehc_agent::platform::api::*;
        let _ = parse_response::<GetHealthCardByQrCode>(&data);
        let _ = parse_response::<VerifyQrCode>(&data);
        let _ = parse_response::<ReportHisData>(&data);
        let mut sim = ehc_agent::sim::state::SimState::new(ehc_agent::sim::SimConfig::default());
        assert_ne!(sim.answer("reportHISData", &data, 1_800_000_000).code, 0);
    }
    for (name, data) in inputs("config") {
        let r = ehc_agent::config::parse(
            &String::from_utf8_lossy(&data),
            std::path::Path::new("/nonexistent"),
            &Default::default(),
        );
        assert!(r.is_err(), "{name} should be refused");
    }
}
