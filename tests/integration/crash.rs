//! No use is ever lost: the real daemon under a stream of scans is killed
//! with SIGKILL at random moments and restarted in the same directory; in the
//! end every card any HIS client received has its use in the simulator's
//! reports exactly once (de-duplicated by requestId), and every report
//! belongs to a scan that was made.
//!
//! Each scan is a freshly minted dynamic code, so its text identifies it in
//! both the HIS events and the reports.

use std::collections::{HashMap, HashSet};

use rand::Rng as _;
use serde_json::json;

use crate::common::*;
use crate::daemon::*;

/// Kill/restart cycles: `EHC_CRASH_CYCLES` or 20.
fn cycles() -> usize {
    std::env::var("EHC_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_use() {
    let sim = sim().await;
    // Some answers are lost after processing, so retries of already
    // received reports happen too (they must come back as 10054, not twice).
    set_faults(
        &sim,
        json!({"api": {"reportHISData": {"lost_answer_rate": 0.2}}}),
    )
    .await;
    let mut rng = rand::rng();
    let mut made: HashSet<String> = HashSet::new();
    let mut delivered: HashSet<String> = HashSet::new();
    let mut dir = Some(tempfile::tempdir().unwrap());
    let n = cycles();
    for cycle in 0..n {
        let mut d = Daemon::start_in(dir.take().unwrap(), &sim, Options::default()).await;
        let mut his = HisClient::unix(&d).await;
        let scans = rng.random_range(1..=6);
        let kill_after = rng.random_range(0..=scans);
        for _ in 0..scans {
            let code = mint(&sim, rng.random_range(0..4), Some(3600)).await;
            made.insert(code.clone());
            d.scan(&code);
        }
        // Kill once `kill_after` cards have reached HIS: anywhere between
        // "nothing delivered yet" and "all delivered, uploads under way".
        let mut seen = 0;
        while seen < kill_after {
            let m = his.next_of(&["card", "scanFailed"]).await;
            assert_eq!(m["type"], "card", "cycle {cycle}: {m}");
            delivered.insert(m["qrCodeText"].as_str().unwrap().to_owned());
            seen += 1;
        }
        dir = Some(d.kill());
        // What the agent wrote before it died is still in the socket: HIS
        // received it.
        while let Some(m) = his.next().await {
            if m["type"] == "card" {
                delivered.insert(m["qrCodeText"].as_str().unwrap().to_owned());
            }
        }
    }
    // A last run drains everything.
    set_faults(&sim, json!({})).await;
    let d = Daemon::start_in(dir.take().unwrap(), &sim, Options::default()).await;
    let outbox = d.path().join("outbox.sqlite");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let c = ehc_agent::agent::outbox::Store::open(&outbox)
            .unwrap()
            .counts()
            .unwrap();
        if c.pending == 0 && c.waiting == 0 {
            assert_eq!(c.held, 0, "nothing is held: {c:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox did not drain: {c:?}"
        );
        let mut changed = sim.subscribe();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), changed.changed()).await;
    }
    let st = state(&sim).await;
    let mut per_text: HashMap<String, usize> = HashMap::new();
    let mut ids = HashSet::new();
    for r in st["reports"].as_array().unwrap() {
        if ids.insert(r["requestId"].as_str().unwrap().to_owned()) {
            *per_text
                .entry(r["qrCodeText"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    for text in &delivered {
        assert_eq!(
            per_text.get(text),
            Some(&1),
            "a card HIS received must be reported exactly once"
        );
    }
    for text in per_text.keys() {
        assert!(
            made.contains(text),
            "a report for a scan that was never made"
        );
    }
    let undelivered_reported = per_text.keys().filter(|t| !delivered.contains(*t)).count();
    eprintln!(
        "crash test: {n} kills, {} scans made, {} delivered to HIS, {} reported, {} reported without HIS having seen them (committed just before a kill), {} duplicate answers (10054)",
        made.len(),
        delivered.len(),
        per_text.len(),
        undelivered_reported,
        st["duplicates"]
    );
    // Committed-but-not-delivered uses come only from the scan in flight at
    // a kill (one scanner resolves one scan at a time): at most one per kill.
    assert!(
        undelivered_reported <= n,
        "{undelivered_reported} uses committed without delivery in {n} kills"
    );
    let (status, log, _) = d.stop();
    assert!(status.success(), "{log}");
}

/// The platform has a report, the agent is killed before it hears so: after
/// the restart the row goes again with the same requestId, the platform
/// answers 10054 and the row is done. One report, one duplicate, nothing
/// lost: the path the kill loop above can only hope to hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_platform_received_a_report() {
    let sim = sim().await;
    set_faults(
        &sim,
        json!({"api": {"reportHISData": {"lost_answer_rate": 1.0}}}),
    )
    .await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    his.next_of(&["card"]).await;
    until_sim(&sim, "the report received, its answer lost", |s| {
        s["uniqueReports"] == 1
    })
    .await;
    let dir = d.kill();
    // Retries before the kill also got lost answers (10054s nobody heard).
    let before = state(&sim).await["duplicates"].as_u64().unwrap();
    set_faults(&sim, json!({})).await;
    let d = Daemon::start_in(dir, &sim, Options::default()).await;
    let st = until_sim(&sim, "the row resent and recognised", |s| {
        s["duplicates"].as_u64().is_some_and(|n| n > before)
    })
    .await;
    assert_eq!(st["uniqueReports"], 1, "{st}");
    let store = ehc_agent::agent::outbox::Store::open(&d.path().join("outbox.sqlite")).unwrap();
    let mut tries = 0;
    loop {
        let c = store.counts().unwrap();
        if c.sent == 1 {
            assert_eq!((c.pending, c.held), (0, 0), "{c:?}");
            break;
        }
        tries += 1;
        assert!(tries < 200, "the row never became sent: {c:?}");
        let mut changed = sim.subscribe();
        let _ =
            tokio::time::timeout(std::time::Duration::from_millis(100), changed.changed()).await;
    }
}
