//! Hostile platform responses are typed errors for every API; hostile
//! request bodies get an answer from the simulator.
#![no_main]
use ehc_agent::platform::api::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_response::<GetAppToken>(data);
    let _ = parse_response::<GetHealthCardByQrCode>(data);
    let _ = parse_response::<VerifyQrCode>(data);
    let _ = parse_response::<ReportHisData>(data);
    let _ = parse_response::<BindCardRelation>(data);
    let mut sim = ehc_agent::sim::state::SimState::new(ehc_agent::sim::SimConfig::default());
    let a = sim.answer("reportHISData", data, 1_800_000_000);
    assert_ne!(a.code, 0, "an unsigned body is never accepted");
});
