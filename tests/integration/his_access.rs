//! Who may talk to the agent's HIS listeners, and what a client that
//! misbehaves (or is only a probe) can take: regressions of the holes a
//! hostile local user found (issue "close the holes").

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::daemon::{until_sim, Daemon, HisClient, Options};
use crate::scan_path::{ws_connect, ws_connect_to};

/// A TCP client gets nothing but `hello` before it authenticates, and a
/// client that sends anything else first (or a wrong token) is closed.
/// Before: any local account read names and ID numbers and sent `bind`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clients_must_authenticate_before_anything() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let static0 = sim.with_state(|s| s.static_code(0)).unwrap();

    // Connected, silent: a card scanned now is not sent to it.
    let mut silent = HisClient::tcp_unauthenticated(&d).await;
    let mut good = HisClient::tcp(&d).await;
    d.scan(&static0);
    let card = good.next_of(&["card"]).await;
    assert_eq!(card["verified"], true);
    // The silent client is closed after the auth timeout with no card seen.
    let got = silent.next().await;
    assert!(
        got.as_ref().is_some_and(|m| m["type"] == "error"),
        "{got:?}"
    );
    assert_eq!(silent.next().await, None, "then closed");

    // `bind` before auth: refused and closed, nothing reaches the platform.
    let mut thief = HisClient::tcp_unauthenticated(&d).await;
    thief
        .send(&json!({"type": "bind", "scanId": card["scanId"], "patid": "EVIL"}))
        .await;
    let e = thief.next().await.unwrap();
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("authenticate first"),
        "{e}"
    );
    assert_eq!(thief.next().await, None);

    // A wrong token: refused and closed.
    let mut guesser = HisClient::tcp_unauthenticated(&d).await;
    guesser
        .send(&json!({"type": "auth", "token": "0000"}))
        .await;
    let e = guesser.next().await.unwrap();
    assert!(
        e["message"].as_str().unwrap().contains("wrong HIS token"),
        "{e}"
    );
    assert_eq!(guesser.next().await, None);

    // The platform never saw a bind.
    good.send(&json!({"type": "ping", "ref": 1})).await;
    assert_eq!(good.next_of(&["reply"]).await["ok"], true);
    let st = state(&sim).await;
    assert!(st["binds"].as_array().is_none_or(|b| b.is_empty()), "{st}");
    d.wait_log("HIS client refused: no valid auth", 3);
}

/// The published token is readable by the HIS group only: `nobody` cannot
/// read it, so cannot authenticate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_token_is_not_readable_by_others() {
    let sim = sim().await;
    let d = Daemon::start(&sim).await;
    let p = d.path().join("his.token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640, "his.token mode {mode:o}");
    let kept = d.path().join("his-token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&kept).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "his-token mode {mode:o}");
}

/// WebSocket: a client with no Origin is not waved through any more. The
/// token comes in the first message or the URL; a browser needs an allowed
/// Origin *and* the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_need_the_token_too() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let token = d.his_token();

    // No Origin, no token: hello, then closed on its first message.
    let mut bare = ws_connect(&d, None).await.unwrap();
    let hello = bare.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("\"auth\":\"token\""));
    bare.send(Message::text(r#"{"type":"ping"}"#))
        .await
        .unwrap();
    let e = bare.next().await.unwrap().unwrap();
    assert!(e.to_text().unwrap().contains("authenticate first"), "{e}");

    // A wrong token in the URL: 403 at the handshake.
    assert_eq!(
        ws_connect_to(&d, None, "/?token=nope").await.unwrap_err(),
        403
    );
    // An allowed browser Origin with a right token in the URL: served, and
    // gets the card.
    let mut page = ws_connect_to(
        &d,
        Some("https://his.example-hospital.cn"),
        &format!("/?token={token}"),
    )
    .await
    .unwrap();
    let _hello = page.next().await.unwrap().unwrap();
    d.scan(&sim.with_state(|s| s.static_code(1)).unwrap());
    loop {
        let m: Value =
            serde_json::from_str(page.next().await.unwrap().unwrap().to_text().unwrap()).unwrap();
        if m["type"] == "card" {
            break;
        }
    }
    // A foreign Origin with the right token: still 403.
    assert_eq!(
        ws_connect_to(
            &d,
            Some("https://evil.example.com"),
            &format!("/?token={token}")
        )
        .await
        .unwrap_err(),
        403
    );
}

/// Each listener admits `max_clients` connections; the next is told why and
/// closed, logged, and the Unix socket is unaffected. Before: 1100
/// connections from `nobody` exhausted the agent's descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_listener_are_capped() {
    let sim = sim().await;
    let d = Daemon::start_with(
        &sim,
        Options {
            his_extra: "max_clients = 3".into(),
            ..Options::default()
        },
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(HisClient::tcp_unauthenticated(&d).await);
    }
    let s = tokio::net::TcpStream::connect(&d.tcp).await.unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(s));
    let first = lines.next_line().await.unwrap().unwrap();
    assert!(first.contains("too many connections"), "{first}");
    assert_eq!(lines.next_line().await.unwrap(), None, "closed");
    d.wait_log("HIS connection refused: the listener has max_clients", 1);
    // The Unix socket has its own slots.
    let mut u = HisClient::unix(&d).await;
    u.send(&json!({"type": "ping", "ref": "u"})).await;
    assert_eq!(u.next_of(&["reply"]).await["ok"], true);
    // A slot freed is a slot again, once the agent has seen the close.
    drop(held.pop());
    d.wait_log("HIS client refused: no valid auth", 1);
    let mut again = None;
    for _ in 0..20 {
        let s = tokio::net::TcpStream::connect(&d.tcp).await.unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(s));
        let first = lines.next_line().await.unwrap().unwrap_or_default();
        if first.contains("\"hello\"") {
            again = Some(lines);
            break;
        }
        // The session's slot is given back just after its log line.
        tokio::task::yield_now().await;
    }
    assert!(again.is_some(), "the freed slot was never given out");
}

/// A monitoring probe that connects and leaves without a word does not take
/// the card held for HIS; the HIS that connects next and speaks gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_probe_does_not_steal_held_cards() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    d.wait_log("event held", 1);
    {
        let _probe = HisClient::unix(&d).await;
    }
    d.wait_log("HIS client disconnected", 1);
    let mut his = HisClient::unix(&d).await;
    his.send(&json!({"type": "ping", "ref": "p"})).await;
    assert_eq!(his.next().await.unwrap()["type"], "reply");
    let card = his.next().await.unwrap();
    assert_eq!(card["type"], "card", "{card}");
}

/// A client that shut down its sending side (`socat -u`, `nc -q`) still
/// gets cards. Before: it was dropped at EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_keeps_receiving() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let (mut his, mut w) = HisClient::unix_parts(&d).await;
    w.shutdown().await.unwrap();
    d.wait_log("HIS client closed its input", 1);
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    assert_eq!(his.next_of(&["card"]).await["verified"], true);
}

/// A client evicted for not reading is disconnected: once it reads again it
/// reaches the end of the stream. Before: it stayed connected, answered
/// pings, and never got another card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_client_is_disconnected() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut stuck = HisClient::unix(&d).await;
    // Texts that are not health card codes go to HIS as they are, without
    // the platform: big ones fill the socket buffer, then the queue.
    let big = "X".repeat(3000);
    for i in 0..400 {
        d.scan(&format!("{big}{i}"));
        if i % 50 == 49 && d.log().contains("HIS client is not reading") {
            break;
        }
    }
    d.wait_log("HIS client is not reading; disconnecting it", 1);
    let mut n = 0;
    while let Some(m) = stuck.next().await {
        assert_eq!(m["type"], "otherCode");
        n += 1;
    }
    assert!(
        n > 0,
        "it got what was written before the eviction, then EOF"
    );
}

/// At most MAX_USES_PER_SCAN `use`s per scan; each answered. Before: any
/// client could inflate the hospital's reports without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_per_scan_are_bounded() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    let card = his.next_of(&["card"]).await;
    let max = ehc_agent::agent::pipeline::MAX_USES_PER_SCAN;
    for i in 0..=max {
        his.send(&json!({"type": "use", "scanId": card["scanId"], "scene": "010105", "ref": i}))
            .await;
        let r = his.next_of(&["reply", "error"]).await;
        assert_eq!(r["ref"], i);
        if i < max {
            assert_eq!(r["type"], "reply", "{r}");
        } else {
            assert_eq!(r["type"], "error", "{r}");
            assert!(
                r["message"].as_str().unwrap().contains("already has"),
                "{r}"
            );
        }
    }
    // The default use and `max` uses from HIS: no more.
    let want = 1 + u64::from(max);
    until_sim(&sim, "every accepted use reported", |s| {
        s["uniqueReports"] == want
    })
    .await;
}
