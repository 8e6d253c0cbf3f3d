//! The outbox and its uploader in-process, against the simulator over real
//! HTTP and a real SQLite file, with a clock the test can move (a simulated
//! day passes in an instant).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use ehc_agent::agent::outbox::uploader::{self, UploaderSettings};
use ehc_agent::agent::outbox::{Kind, NewRow, Outbox};
use ehc_agent::clock;
use ehc_agent::platform::client::new_request_id;
use ehc_agent::sim::{SimConfig, SimServer};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::common::*;
use crate::daemon::until_sim;

struct Rig {
    sim: SimServer,
    outbox: Outbox,
    offset: Arc<AtomicI64>,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn new(cfg: SimConfig, secret: &str) -> Rig {
        let sim = sim_with(cfg).await;
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("outbox.sqlite")).unwrap();
        let mut s = settings(&sim, None);
        s.secret = ehc_agent::config::Secret::new(secret);
        let client = ehc_agent::platform::Client::new(s).unwrap();
        let offset = Arc::new(AtomicI64::new(0));
        let o2 = offset.clone();
        let cancel = CancellationToken::new();
        tokio::spawn(uploader::run(
            outbox.clone(),
            client,
            UploaderSettings {
                batch: 10,
                concurrency: 4,
                retention_days: 7,
                clock: Arc::new(move || clock::now_unix() + o2.load(Ordering::SeqCst)),
            },
            cancel.clone(),
        ));
        Rig {
            sim,
            outbox,
            offset,
            cancel,
            _dir: dir,
        }
    }

    fn now(&self) -> i64 {
        clock::now_unix() + self.offset.load(Ordering::SeqCst)
    }

    fn row(&self, created_at: i64) -> NewRow {
        let qr = self.sim.with_state(|s| s.static_code(0)).unwrap();
        let mut req = report(&qr);
        req["time"] = json!(clock::platform_time(created_at, clock::BEIJING));
        NewRow {
            request_id: new_request_id(),
            kind: Kind::Report,
            scan_id: "S".into(),
            payload: req.to_string(),
            created_at,
            wait_until: None,
        }
    }

    async fn record(&self, n: usize) {
        let rows: Vec<_> = (0..n).map(|_| self.row(self.now())).collect();
        assert!(self.outbox.record(rows).await);
    }

    async fn drained(&self) {
        let mut changed = self.sim.subscribe();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            self.outbox.settle().await;
            let c = self.outbox.counts().await.unwrap();
            if c.pending == 0 && c.waiting == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not drained: {c:?} {:?}",
                self.outbox.status()
            );
            let _ = tokio::time::timeout(std::time::Duration::from_millis(200), changed.changed())
                .await;
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_outage_then_everything_drains() {
    let rig = Rig::new(SimConfig::default(), SECRET).await;
    set_faults(&rig.sim, json!({"outage": {"mode": "reset"}})).await;
    // A day's backlog: rows a day old, backed off for an hour...
    let day_ago = rig.now() - 86_400;
    let old: Vec<_> = (0..20).map(|_| rig.row(day_ago)).collect();
    rig.outbox.record(old).await;
    rig.outbox
        .with_store(move |s| s.make_all_due(day_ago))
        .await
        .unwrap();
    // ...and today's uses, failing against the outage.
    rig.record(10).await;
    // Every row tried once and backed off (waiting on the uploader's passes).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let rows = loop {
        let rows = rig
            .outbox
            .with_store(|s| s.list(ehc_agent::agent::outbox::State::Pending, 100))
            .await
            .unwrap();
        if rows.iter().all(|r| r.attempts >= 1) {
            break rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every row was tried: {:?}",
            rig.outbox.status()
        );
        rig.outbox
            .next_pass(std::time::Duration::from_secs(1))
            .await;
    };
    assert_eq!(rows.len(), 30);
    assert!(rows.iter().all(|r| r.sent_at.is_none()));
    assert!(
        rig.outbox
            .wait_status(std::time::Duration::from_secs(30), |s| s
                .consecutive_failures
                >= 30)
            .await
    );
    let now = rig.now();
    assert!(
        rows.iter()
            .any(|r| r.created_at == day_ago && r.next_attempt_at > now + 60),
        "day-old rows back off long"
    );

    // The platform is back: one new use goes through and brings the
    // backlog with it, without waiting out the backoffs.
    set_faults(&rig.sim, json!({})).await;
    rig.record(1).await;
    rig.drained().await;
    let st = state(&rig.sim).await;
    assert_eq!(st["uniqueReports"], 31);
    assert!(
        rig.outbox
            .wait_status(std::time::Duration::from_secs(30), |s| s
                .consecutive_failures
                == 0)
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_uploads_until_the_next_beijing_day() {
    let rig = Rig::new(
        SimConfig {
            daily_cap: Some(5),
            ..SimConfig::default()
        },
        SECRET,
    )
    .await;
    rig.record(6).await;
    assert!(
        rig.outbox
            .wait_status(std::time::Duration::from_secs(30), |s| s
                .rate_limited_until
                .is_some())
            .await,
        "10034 holds uploads"
    );
    let until = rig
        .outbox
        .status()
        .rate_limited_until
        .unwrap_or_else(|| panic!("not held: {:?}", rig.outbox.status()));
    assert_eq!(until, clock::next_midnight(rig.now(), clock::BEIJING));
    let attempts = |st: &serde_json::Value| {
        st["calls"]["reportHISData"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>()
    };
    let before = attempts(&state(&rig.sim).await);
    // New uses during the hold are recorded, not sent.
    rig.record(2).await;
    rig.outbox.settle().await;
    assert_eq!(
        attempts(&state(&rig.sim).await),
        before,
        "no call while held"
    );
    assert_eq!(rig.outbox.counts().await.unwrap().pending, 3);
    // The next Beijing day, on both clocks.
    let jump = until - rig.now() + 1;
    rig.offset.fetch_add(jump, Ordering::SeqCst);
    control(&rig.sim, "POST", "/_sim/clock", json!({"advanceS": jump})).await;
    rig.drained().await;
    assert_eq!(state(&rig.sim).await["uniqueReports"], 8);
    assert_eq!(rig.outbox.status().rate_limited_until, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_stops_uploads_and_keeps_every_row() {
    let rig = Rig::new(SimConfig::default(), "not-the-secret").await;
    rig.record(3).await;
    assert!(
        rig.outbox
            .wait_status(std::time::Duration::from_secs(30), |s| s.stopped.is_some())
            .await
    );
    let status = rig.outbox.status();
    let stopped = status.stopped.expect("uploads stopped");
    assert!(stopped.contains("21006"), "{stopped}");
    let c = rig.outbox.counts().await.unwrap();
    assert_eq!(
        (c.pending, c.held, c.sent),
        (3, 0, 0),
        "every row kept, none parked"
    );
    let tries = calls(&rig.sim, "getAppToken", "21006").await;
    rig.record(2).await;
    rig.outbox.settle().await;
    assert_eq!(
        calls(&rig.sim, "getAppToken", "21006").await,
        tries,
        "stopped means stopped"
    );
    assert_eq!(rig.outbox.counts().await.unwrap().pending, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_parks_the_row_until_retried() {
    let rig = Rig::new(SimConfig::default(), SECRET).await;
    set_faults(
        &rig.sim,
        json!({"force": {"code": 10042, "count": 1, "api": "reportHISData"}}),
    )
    .await;
    rig.record(1).await;
    until_sim(&rig.sim, "the forced 10042", |s| {
        s["calls"]["reportHISData"]["10042"] == 1
    })
    .await;
    assert!(
        rig.outbox
            .wait_status(std::time::Duration::from_secs(30), |s| s.failed_attempts
                >= 1)
            .await
    );
    let held = rig
        .outbox
        .with_store(|s| s.list(ehc_agent::agent::outbox::State::Held, 10))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].last_code, Some(10042));
    let now = rig.now();
    assert_eq!(
        rig.outbox
            .with_store(move |s| s.retry_held(None, now))
            .await
            .unwrap(),
        1
    );
    rig.drained().await;
    assert_eq!(state(&rig.sim).await["uniqueReports"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_are_retried_and_counted_once() {
    let rig = Rig::new(
        SimConfig {
            seed: Some(7),
            ..SimConfig::default()
        },
        SECRET,
    )
    .await;
    set_faults(
        &rig.sim,
        json!({"api": {"reportHISData": {"lost_answer_rate": 0.3}}}),
    )
    .await;
    rig.record(20).await;
    rig.drained().await;
    let st = state(&rig.sim).await;
    assert_eq!(st["uniqueReports"], 20);
    // Every lost answer was retried with the same requestId and recognised
    // by the platform as a duplicate (10054): one retry per lost answer, no
    // more, and the seeded rolls did lose some.
    let lost = calls(&rig.sim, "reportHISData", "lost_answer").await;
    assert!(lost > 0, "the seeded 30% loss lost nothing: {st}");
    assert_eq!(st["duplicates"], lost, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_spills_to_memory_and_writes_when_space_returns() {
    let rig = Rig::new(SimConfig::default(), SECRET).await;
    rig.record(1).await;
    rig.drained().await;
    let pages = rig.outbox.with_store(|s| s.set_max_pages(1)).await.unwrap();
    assert!(
        pages > 1,
        "the limit cannot go below the file's size: it stays full"
    );
    let big = |r: &Rig| {
        let mut row = r.row(r.now());
        row.payload = row
            .payload
            .replace("\"内科\"", &format!("\"{}\"", "科".repeat(3000)));
        row
    };
    assert!(
        !rig.outbox.record(vec![big(&rig)]).await,
        "the disk refused"
    );
    assert_eq!(rig.outbox.spilled(), 1);
    assert!(rig.outbox.status().disk_fault.is_some());
    // Space returns.
    rig.outbox
        .with_store(|s| s.set_max_pages(1 << 30))
        .await
        .unwrap();
    assert!(rig.outbox.record(vec![rig.row(rig.now())]).await);
    assert_eq!(rig.outbox.spilled(), 0);
    assert!(rig.outbox.status().disk_fault.is_none());
    let c = rig.outbox.counts().await.unwrap();
    assert_eq!(
        c.pending + c.sent,
        3,
        "the spilled use and the new one are both in the file: {c:?}"
    );
}

/// `use_wait_s` end to end on a moved clock: a waiting default use is not
/// uploaded before its deadline, not even by a flush or a recovery; HIS's
/// `use` before the deadline replaces it; after the deadline the default is
/// reported and a late `use` adds nothing. Before: 8 of 11 cards were
/// reported twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_wait_deadline_holds_and_each_card_is_reported_once() {
    use ehc_agent::agent::outbox::Replaced;
    let rig = Rig::new(SimConfig::default(), SECRET).await;
    let waiting = |scan: &str| NewRow {
        scan_id: scan.into(),
        wait_until: Some(rig.now() + 20),
        ..rig.row(rig.now())
    };
    assert!(rig.outbox.record(vec![waiting("A"), waiting("B")]).await);
    // A flush (and the recovery after an outage) makes pending rows due:
    // not waiting ones.
    let now = rig.now();
    rig.outbox
        .with_store(move |s| s.make_all_due(now))
        .await
        .unwrap();
    rig.offset.store(19, Ordering::SeqCst);
    rig.outbox.settle().await;
    assert_eq!(
        state(&rig.sim).await["uniqueReports"],
        0,
        "nothing before the deadline"
    );
    // HIS's use for A within the wait replaces A's default.
    let mut his_use = rig.row(rig.now());
    his_use.scan_id = "A".into();
    assert_eq!(
        rig.outbox.record_replacing("A".into(), vec![his_use]).await,
        Replaced::Committed(1)
    );
    // B's deadline passes: its default is reported.
    rig.offset.store(21, Ordering::SeqCst);
    rig.drained().await;
    assert_eq!(state(&rig.sim).await["uniqueReports"], 2);
    // HIS's late use for B adds nothing.
    let mut late = rig.row(rig.now());
    late.scan_id = "B".into();
    assert_eq!(
        rig.outbox.record_replacing("B".into(), vec![late]).await,
        Replaced::Committed(0)
    );
    rig.drained().await;
    let c = rig.outbox.counts().await.unwrap();
    assert_eq!((c.sent, c.pending, c.waiting), (2, 0, 0), "{c:?}");
    assert_eq!(
        state(&rig.sim).await["uniqueReports"],
        2,
        "one report per card"
    );
}
