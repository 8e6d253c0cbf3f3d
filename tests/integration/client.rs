//! The platform client against the simulator over real HTTP: token single
//! flight, persistence across restarts, requestId reuse, and every kind of
//! failure classified.

use std::time::Duration;

use ehc_agent::platform::api::{GetHealthCardByQrCode, QrCodeReq, ReportHisData, ReportReq};
use ehc_agent::platform::{CallError, CallOptions, Class, Client};
use serde_json::json;

use crate::common::*;

fn qr_req(sim: &ehc_agent::sim::SimServer) -> QrCodeReq {
    QrCodeReq {
        qr_code_text: sim.with_state(|s| s.static_code(0)).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_21004_cause_one_get_app_token() {
    let sim = sim().await;
    let client = client(&sim);
    let req = qr_req(&sim);
    client
        .call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap();
    assert_eq!(calls(&sim, "getAppToken", "0").await, 1);
    // Another party revokes the token: every call now gets 21004. The
    // simulator answers after 200 ms, so all 20 calls are in flight with the
    // revoked token before the first refresh can complete, however the
    // machine schedules them.
    control(&sim, "POST", "/_sim/revoke", json!({})).await;
    set_faults(&sim, json!({"latency_ms": 200})).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, r) = (client.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            c.call::<GetHealthCardByQrCode>(&r, CallOptions::scan())
                .await
        }));
    }
    for t in tasks {
        let card = t.await.unwrap().expect("call succeeds after one refresh");
        assert_eq!(card.card.name, "测试甲");
    }
    assert_eq!(
        calls(&sim, "getAppToken", "0").await,
        2,
        "exactly one refresh for 20 failures"
    );
    assert_eq!(calls(&sim, "getHealthCardByQRCode", "21004").await, 20);
    assert_eq!(client.token().unwrap().generation, 2);
    // Each of the 20 was rejected with a token that had not expired: the
    // client counts them as revocations by another holder (status shows it).
    assert_eq!(
        client
            .stats()
            .revocations
            .load(std::sync::atomic::Ordering::Relaxed),
        20
    );
}

/// Regression: a 307 sent the appToken and QR texts to another host, and
/// its answers were taken as the platform's.
#[tokio::test]
async fn redirects_are_never_followed() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let sim = sim().await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let target = sim.base_url();
    let redirector = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let target = target.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let answer = format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}/elsewhere?token=x\r\nContent-Length: 0\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    let mut st = settings(&sim, None);
    st.base_url = format!("http://{addr}");
    let c = Client::new(st).unwrap();
    let e = c
        .call::<GetHealthCardByQrCode>(&qr_req(&sim), CallOptions::scan())
        .await
        .unwrap_err();
    assert!(
        matches!(e, CallError::Redirect { status: 307, .. }),
        "{e:?}"
    );
    assert_eq!(e.class(), Class::Configuration);
    let shown = e.to_string();
    assert!(
        shown.contains(&sim.base_url()) && !shown.contains("token=x"),
        "{shown}"
    );
    assert_eq!(
        state(&sim).await["calls"],
        json!({}),
        "nothing reached the other host"
    );
    redirector.abort();
}

/// Regression: `timeout_ms` bounded each step, not the call: a first scan
/// (getAppToken + call) took twice the setting. Both steps here take 800 ms
/// against a 1200 ms budget: the call must give up, not succeed late. The
/// refresh it started still lands, so the next call needs no getAppToken.
#[tokio::test]
async fn one_deadline_bounds_refresh_and_call() {
    let sim = sim().await;
    set_faults(&sim, json!({"latency_ms": 800})).await;
    let mut st = settings(&sim, None);
    st.scan_timeout = Duration::from_millis(1200);
    let c = Client::new(st).unwrap();
    let e = c
        .call::<GetHealthCardByQrCode>(&qr_req(&sim), CallOptions::scan())
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Timeout(1200)), "{e:?}");
    // The abandoned refresh finished on its own task.
    let mut tries = 0;
    while c.token().is_none() {
        tries += 1;
        assert!(tries < 100, "the refresh never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    set_faults(&sim, json!({})).await;
    c.call::<GetHealthCardByQrCode>(&qr_req(&sim), CallOptions::scan())
        .await
        .unwrap();
    assert_eq!(calls(&sim, "getAppToken", "0").await, 1);
}

#[tokio::test]
async fn restart_reuses_the_stored_token() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("state.sqlite");
    let req = qr_req(&sim);
    {
        let c = Client::new(settings(&sim, Some(state_path.clone()))).unwrap();
        c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
            .await
            .unwrap();
    }
    let c = Client::new(settings(&sim, Some(state_path.clone()))).unwrap();
    assert!(c.token().is_some(), "token loaded from the state file");
    c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap();
    assert_eq!(
        calls(&sim, "getAppToken", "0").await,
        1,
        "no new getAppToken after restart"
    );
    // A different app id does not pick up the stored token.
    let mut other = settings(&sim, Some(state_path));
    other.app_id = "another-app".into();
    assert!(Client::new(other).unwrap().token().is_none());
}

#[tokio::test]
async fn short_lived_tokens_are_used_for_most_of_their_life() {
    let cfg = ehc_agent::sim::SimConfig {
        token_ttl_s: 200, // a gateway's or a test platform's short token
        ..Default::default()
    };
    let sim = sim_with(cfg).await;
    let c = client(&sim);
    let req = qr_req(&sim);
    c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap();
    c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap();
    // Before: a 300 s margin made a 200 s token stale at once, and every
    // call fetched a new one.
    assert_eq!(calls(&sim, "getAppToken", "0").await, 1);
    assert_eq!(calls(&sim, "getHealthCardByQRCode", "21003").await, 0);
    // Ahead of expiry (here: the last fifth of its life) it is replaced.
    let t = c.token().unwrap();
    assert!(t.fresh_at(t.expires_at - 41) && !t.fresh_at(t.expires_at - 40));
}

#[tokio::test]
async fn token_rejected_again_right_after_refresh_is_not_a_loop() {
    let sim = sim().await;
    let c = client(&sim);
    let req = qr_req(&sim);
    c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap();
    // Every call for the next while is rejected: one refresh, then the error.
    set_faults(
        &sim,
        json!({"force": {"code": 21004, "count": 10, "api": "getHealthCardByQRCode"}}),
    )
    .await;
    let e = c
        .call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap_err();
    assert_eq!(e.class(), Class::Token);
    let e = c
        .call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap_err();
    assert!(
        matches!(e, CallError::TokenChurn { code: 21004, .. }),
        "{e:?}"
    );
    assert_eq!(
        calls(&sim, "getAppToken", "0").await,
        2,
        "one refresh, no loop"
    );
}

#[tokio::test]
async fn callers_request_id_is_kept_and_10054_reported() {
    let sim = sim().await;
    let c = client(&sim);
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let r: ReportReq = serde_json::from_value(report(&qr)).unwrap();
    let id = ehc_agent::platform::client::new_request_id();
    c.call::<ReportHisData>(&r, CallOptions::upload(&id))
        .await
        .unwrap();
    let e = c
        .call::<ReportHisData>(&r, CallOptions::upload(&id))
        .await
        .unwrap_err();
    assert_eq!(e.result_code(), Some(10054));
    let st = state(&sim).await;
    assert_eq!(st["reports"][0]["requestId"], id.as_str());
    // The token-refresh retry keeps the caller's requestId too.
    control(&sim, "POST", "/_sim/revoke", json!({})).await;
    let id2 = ehc_agent::platform::client::new_request_id();
    c.call::<ReportHisData>(&r, CallOptions::upload(&id2))
        .await
        .unwrap();
    assert_eq!(state(&sim).await["reports"][1]["requestId"], id2.as_str());
}

#[tokio::test]
async fn failures_are_classified() {
    let sim = sim().await;
    let c = client(&sim);
    let req = qr_req(&sim);
    c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap();
    let call = || c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan());

    set_faults(&sim, json!({"api": {"*": {"http_5xx_rate": 1.0}}})).await;
    let e = call().await.unwrap_err();
    assert!(
        matches!(e, CallError::Http(503)) && e.is_unavailable(),
        "{e:?}"
    );

    set_faults(&sim, json!({"body": {"kind": "not-json"}})).await;
    let e = call().await.unwrap_err();
    assert!(
        matches!(e, CallError::Response(_)) && e.class() == Class::Retry,
        "{e:?}"
    );

    set_faults(&sim, json!({"body": {"kind": "truncated"}})).await;
    assert!(matches!(call().await.unwrap_err(), CallError::Response(_)));

    set_faults(&sim, json!({"outage": {"mode": "reset"}})).await;
    let e = call().await.unwrap_err();
    assert!(
        matches!(e, CallError::Unreachable(_)) && e.is_unavailable(),
        "{e:?}"
    );

    set_faults(&sim, json!({"force": {"code": 10034, "count": 1}})).await;
    assert_eq!(call().await.unwrap_err().class(), Class::RateLimit);

    set_faults(&sim, json!({"force": {"code": -10019, "count": 1}})).await;
    assert_eq!(call().await.unwrap_err().class(), Class::Permanent);
    set_faults(&sim, json!({})).await;

    // Slow answers hit the scan-path timeout.
    set_faults(&sim, json!({"latency_ms": 2000})).await;
    let mut s = settings(&sim, None);
    s.scan_timeout = Duration::from_millis(300);
    let quick = Client::new(s).unwrap();
    let e = quick
        .call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap_err();
    assert!(matches!(e, CallError::Timeout(300)), "{e:?}");
    set_faults(&sim, json!({})).await;

    // A wrong secret is a configuration error, not something to retry.
    let mut s = settings(&sim, None);
    s.secret = ehc_agent::config::Secret::new("wrong");
    let e = Client::new(s)
        .unwrap()
        .call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap_err();
    assert_eq!(
        (e.result_code(), e.class()),
        (Some(21006), Class::Configuration)
    );

    // Nothing listening at all.
    let mut s = settings(&sim, None);
    s.base_url = "http://127.0.0.1:1".into();
    let e = Client::new(s)
        .unwrap()
        .call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
}

/// The token is fetched and kept fresh in the background: the first call
/// (a patient's first scan after start) finds one and pays no getAppToken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_fetched_before_the_first_scan() {
    let sim = sim().await;
    let c = client(&sim);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(c.clone().keep_fresh(stop.clone()));
    crate::daemon::until_sim(&sim, "a token fetched with no call made", |s| {
        s["calls"]["getAppToken"]["0"] == 1
    })
    .await;
    c.call::<GetHealthCardByQrCode>(&qr_req(&sim), CallOptions::scan())
        .await
        .unwrap();
    assert_eq!(calls(&sim, "getAppToken", "0").await, 1);
    stop.cancel();
}

/// Twenty calls failing at once because the secret is wrong make one
/// getAppToken, not twenty: the callers queued behind a failed refresh get
/// its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_answers_everyone_who_waited_for_it() {
    let sim = sim().await;
    let mut st = settings(&sim, None);
    st.secret = ehc_agent::config::Secret::new("not-the-secret");
    let c = Client::new(st).unwrap();
    set_faults(&sim, json!({"latency_ms": 100})).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, r) = (c.clone(), qr_req(&sim));
        tasks.push(tokio::spawn(async move {
            c.call::<GetHealthCardByQrCode>(&r, CallOptions::scan())
                .await
        }));
    }
    for t in tasks {
        let e = t.await.unwrap().unwrap_err();
        assert_eq!(e.result_code(), Some(21006), "{e:?}");
    }
    assert_eq!(calls(&sim, "getAppToken", "21006").await, 1);
}

/// A client to `sim` through a [`dying_relay`] that has carried one scan
/// (its connection pooled), and the relay's `die` and connection count.
async fn client_over_relay(
    sim: &ehc_agent::sim::SimServer,
    death: Death,
) -> (
    Client,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let upstream = sim.base_url().trim_start_matches("http://").to_owned();
    let (addr, die, accepted) = dying_relay(upstream, death).await;
    let mut st = settings(sim, None);
    st.base_url = format!("http://{addr}");
    let c = Client::new(st).unwrap();
    c.call::<GetHealthCardByQrCode>(&qr_req(sim), CallOptions::scan())
        .await
        .unwrap();
    (c, die, accepted)
}

/// Regression: a gateway killed while the agent held a pooled connection to
/// it sent the next scan offline ("connection closed before message
/// completed") instead of trying again. The relay passes the first call,
/// then closes that connection when the next request arrives on it: the
/// call must still succeed, on a connection of its own.
#[tokio::test]
async fn a_pooled_connection_that_dies_under_a_request_is_not_the_end_of_the_call() {
    use std::sync::atomic::Ordering;
    let sim = sim().await;
    let (c, die, accepted) = client_over_relay(&sim, Death::Before).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");
    die.store(true, Ordering::SeqCst);
    let card = c
        .call::<GetHealthCardByQrCode>(&qr_req(&sim), CallOptions::scan())
        .await
        .expect("sent once more on a new connection");
    assert_eq!(card.card.name, "测试甲");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(calls(&sim, "getHealthCardByQRCode", "0").await, 2);
}

/// The platform answered, and the answer was lost with the connection (a
/// gateway killed mid-forward): the copy of a scan's query goes with a new
/// requestId (the old one would get 10054, and the scan would fail), while
/// an outbox row's copy keeps its own and 10054 tells it the row is done.
#[tokio::test]
async fn a_request_answered_then_lost_is_sent_again_with_the_right_request_id() {
    use std::sync::atomic::Ordering;
    let sim = sim().await;
    let (c, die, _) = client_over_relay(&sim, Death::After).await;
    die.store(true, Ordering::SeqCst);
    let card = c
        .call::<GetHealthCardByQrCode>(&qr_req(&sim), CallOptions::scan())
        .await
        .expect("a new requestId for the copy");
    assert_eq!(card.card.name, "测试甲");
    assert_eq!(calls(&sim, "getHealthCardByQRCode", "0").await, 3);

    // The outbox's call: its own requestId, kept.
    let (c, die, _) = client_over_relay(&sim, Death::After).await;
    die.store(true, Ordering::SeqCst);
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let r: ReportReq = serde_json::from_value(report(&qr)).unwrap();
    let id = ehc_agent::platform::client::new_request_id();
    let e = c
        .call::<ReportHisData>(&r, CallOptions::upload(&id))
        .await
        .unwrap_err();
    assert_eq!(e.result_code(), Some(10054), "{e:?}");
    let st = state(&sim).await;
    assert_eq!(st["uniqueReports"], 1, "one use, reported once: {st}");
    assert_eq!(st["reports"][0]["requestId"], id.as_str());
}
