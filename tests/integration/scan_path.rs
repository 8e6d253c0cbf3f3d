//! The scan path end to end: the real daemon, the simulator over HTTP, scans
//! on the daemon's stdin scanner, HIS clients on the real Unix socket, TCP
//! and WebSocket.

use serde_json::{json, Value};

use crate::common::*;
use crate::daemon::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_code_gives_the_right_message() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    let mut tcp = HisClient::tcp(&d).await;

    let static0 = sim.with_state(|s| s.static_code(0)).unwrap();
    d.scan(&format!("  {static0}\r"));
    let m = his.next_of(&["card"]).await;
    assert_eq!(m["codeKind"], "static");
    assert_eq!(
        (
            m["verified"].as_bool(),
            m["offline"].as_bool(),
            m["recorded"].as_bool()
        ),
        (Some(true), Some(false), Some(true))
    );
    assert_eq!(m["qrCodeText"], static0.as_str(), "trimmed");
    assert_eq!(m["scanner"], "window");
    let card = &m["card"];
    for (k, v) in [
        ("name", "测试甲"),
        ("gender", "男"),
        ("nation", "汉族"),
        ("birthday", "1990-01-01"),
        ("idType", "01"),
        ("idNumber", "999999199001010011"),
        ("phone", "10000000001"),
    ] {
        assert_eq!(card[k], v, "{k} in {m}");
    }
    assert!(card["phid"].as_str().unwrap().starts_with("SIM"));
    assert_eq!(card["healthCardId"].as_str().unwrap(), &static0[..64]);
    // Every client gets every event.
    assert_eq!(tcp.next_of(&["card"]).await["scanId"], m["scanId"]);

    let dynamic = mint(&sim, 1, Some(300)).await;
    d.scan(&dynamic);
    let m = his.next_of(&["card", "scanFailed"]).await;
    assert_eq!(
        (m["type"].as_str(), m["codeKind"].as_str()),
        (Some("card"), Some("dynamic")),
        "{m}"
    );
    assert_eq!(m["card"]["name"], "测试乙");

    let expired = mint(&sim, 2, Some(0)).await;
    d.scan(&expired);
    let m = his.next_of(&["card", "scanFailed"]).await;
    assert_eq!(
        (
            m["type"].as_str(),
            m["reason"].as_str(),
            m["resultCode"].as_i64()
        ),
        (Some("scanFailed"), Some("codeExpired"), Some(10020)),
        "{m}"
    );

    d.scan(&format!("{}:1", "AB".repeat(32)));
    let m = his.next_of(&["card", "scanFailed"]).await;
    assert_eq!(
        (m["reason"].as_str(), m["resultCode"].as_i64()),
        (Some("cardNotFound"), Some(-10019)),
        "{m}"
    );

    d.scan("6901234567892");
    let m = his.next_of(&["otherCode"]).await;
    assert_eq!(m["text"], "6901234567892");

    // Two uses recorded (static, dynamic) reach the platform with the
    // terminal's defaults.
    let st = until_sim(&sim, "two reports", |s| s["uniqueReports"] == 2).await;
    let r = &st["reports"][0];
    assert_eq!(
        (
            r["scene"].as_str(),
            r["department"].as_str(),
            r["cardType"].as_str(),
            r["cardChannel"].as_str()
        ),
        (Some("010101"), Some("内科"), Some("11"), Some("0100"))
    );
    assert_eq!(st["verifications"][0]["terminalId"], "WIN-T");
    let (status, log, _) = d.stop();
    assert!(status.success(), "{log}");
    // The log never carries the synthetic identities.
    for secret in [
        "测试甲",
        "999999199001010011",
        "10000000001",
        static0.as_str(),
    ] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_down_static_passes_offline_dynamic_is_refused_use_still_recorded() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    let dynamic = mint(&sim, 1, Some(600)).await;
    set_faults(&sim, json!({"outage": {"mode": "reset"}})).await;

    let static0 = sim.with_state(|s| s.static_code(0)).unwrap();
    d.scan(&static0);
    let m = his.next_of(&["card", "scanFailed"]).await;
    assert_eq!(m["type"], "card", "{m}");
    assert_eq!(
        (
            m["verified"].as_bool(),
            m["offline"].as_bool(),
            m["recorded"].as_bool()
        ),
        (Some(false), Some(true), Some(true))
    );
    assert_eq!(
        m["card"],
        json!({"healthCardId": &static0[..64]}),
        "only the card id offline"
    );

    d.scan(&dynamic);
    let m = his.next_of(&["card", "scanFailed"]).await;
    assert_eq!(
        (m["type"].as_str(), m["reason"].as_str()),
        (Some("scanFailed"), Some("platformUnavailable")),
        "{m}"
    );

    // The platform comes back: the offline use is uploaded.
    set_faults(&sim, json!({})).await;
    let st = until_sim(&sim, "the offline use reported", |s| {
        s["uniqueReports"] == 1
    })
    .await;
    assert_eq!(st["reports"][0]["qrCodeText"], static0.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_and_bind_from_his_reach_the_platform() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::tcp(&d).await;
    let static0 = sim.with_state(|s| s.static_code(2)).unwrap();
    d.scan(&static0);
    let card = his.next_of(&["card"]).await;
    let scan_id = card["scanId"].as_str().unwrap().to_owned();

    his.send(&json!({"type": "use", "scanId": scan_id, "scene": "0101011", "department": "儿科", "ref": "7"})).await;
    assert_eq!(
        his.next_of(&["reply", "error"]).await,
        json!({"type": "reply", "ref": "7", "ok": true})
    );
    his.send(&json!({"type": "bind", "scanId": scan_id, "patid": "P100234", "ref": 8}))
        .await;
    assert_eq!(
        his.next_of(&["reply", "error"]).await,
        json!({"type": "reply", "ref": 8, "ok": true})
    );
    his.send(&json!({"type": "ping", "ref": "9"})).await;
    assert_eq!(his.next_of(&["reply", "error"]).await["ok"], true);
    his.send(&json!({"type": "use", "scanId": "S-NOPE", "ref": "10"}))
        .await;
    let e = his.next_of(&["reply", "error"]).await;
    assert_eq!(
        (e["type"].as_str(), e["ref"].as_str()),
        (Some("error"), Some("10"))
    );
    assert!(e["message"].as_str().unwrap().contains("unknown scanId"));

    let st = until_sim(&sim, "default use, HIS use and bind", |s| {
        s["uniqueReports"] == 2 && s["binds"].as_array().is_some_and(|b| b.len() == 1)
    })
    .await;
    let reports = st["reports"].as_array().unwrap();
    assert!(
        reports
            .iter()
            .any(|r| r["scene"] == "0101011" && r["department"] == "儿科"),
        "{reports:?}"
    );
    assert_eq!(st["binds"][0]["patid"], "P100234");
    assert_eq!(st["binds"][0]["qrCodeText"], static0.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_wait_replaces_the_default_use() {
    let sim = sim().await;
    let opts = Options {
        his_extra: "use_wait_s = 600".into(),
        ..Options::default()
    };
    let mut d = Daemon::start_with(&sim, opts).await;
    let mut his = HisClient::unix(&d).await;
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    let card = his.next_of(&["card"]).await;
    his.send(&json!({"type": "use", "scanId": card["scanId"], "scene": "010105", "ref": 1}))
        .await;
    assert_eq!(his.next_of(&["reply", "error"]).await["ok"], true);
    let st = until_sim(&sim, "HIS's use reported", |s| s["uniqueReports"] == 1).await;
    assert_eq!(
        st["reports"][0]["scene"], "010105",
        "HIS's use, not the waiting default"
    );
    // The waiting default was replaced: nothing else is pending in the outbox.
    let store = ehc_agent::agent::outbox::Store::open(&d.path().join("outbox.sqlite")).unwrap();
    let c = store.counts().unwrap();
    assert_eq!(
        (c.waiting, c.pending + c.sent),
        (0, 1),
        "one row: the default use was replaced, not added to; {c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_named_errors_and_others_keep_being_served() {
    let sim = sim().await;
    let mut d = Daemon::start(&sim).await;
    let mut good = HisClient::unix(&d).await;

    let mut c = HisClient::unix(&d).await;
    c.send_raw(b"{not json\n").await.unwrap();
    assert!(c.next().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
    c.send_raw(b"\x00\xff\xfe garbage \x01\n").await.unwrap();
    assert!(c.next().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("not UTF-8"));
    c.send(&json!({"type": "teleport", "ref": "x"})).await;
    let e = c.next().await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["ref"].as_str()),
        (Some("error"), Some("x"))
    );
    assert!(e["message"].as_str().unwrap().contains("unknown type"));
    // Still open after all that.
    c.send(&json!({"type": "ping", "ref": 1})).await;
    assert_eq!(c.next().await.unwrap()["type"], "reply");
    // A 1 MB line: named error, then closed.
    let mut big = vec![b'x'; 1 << 20];
    big.push(b'\n');
    let _ = c.send_raw(&big).await;
    let e = c.next().await.unwrap();
    assert!(
        e["message"].as_str().unwrap().contains("longer than 65536"),
        "{e}"
    );
    assert!(c.next().await.is_none(), "closed after the long line");

    // A client vanishing mid-line.
    let mut v = HisClient::tcp(&d).await;
    v.send_raw(b"{\"type\":\"pi").await.unwrap();
    drop(v);

    // Scanner garbage and a 1 MB scan are discarded; the next scan works.
    d.scan_bytes(b"\xff\xfe\x00\x01\n");
    d.scan_bytes(&vec![b'9'; 1 << 20]);
    d.scan_bytes(b"\n");
    d.scan("6901234567892");
    let m = good.next_of(&["otherCode", "card", "scanFailed"]).await;
    assert_eq!(
        m["text"], "6901234567892",
        "the first event after the garbage is the good scan"
    );

    // WebSocket: a foreign Origin is refused with 403, an allowed one served.
    let refused = ws_connect(&d, Some("https://evil.example.com")).await;
    assert_eq!(refused.unwrap_err(), 403);
    let mut ws = ws_connect(&d, Some("https://his.example-hospital.cn"))
        .await
        .unwrap();
    use futures_util::{SinkExt as _, StreamExt as _};
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains("\"auth\":\"token\""));
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        json!({"type": "auth", "token": d.his_token()}).to_string(),
    ))
    .await
    .unwrap();
    let ok = ws.next().await.unwrap().unwrap();
    assert!(ok.to_text().unwrap().contains("\"ok\":true"), "{ok}");
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"type":"ping","ref":"w"}"#,
    ))
    .await
    .unwrap();
    // The first identified client also gets what was held for HIS (the
    // good client never spoke): then the reply.
    let reply = loop {
        let r = ws.next().await.unwrap().unwrap();
        let m: Value = serde_json::from_str(r.to_text().unwrap()).unwrap();
        if m["type"] == "reply" {
            break m;
        }
        assert_eq!(m["type"], "otherCode", "{m}");
    };
    assert_eq!(reply["ref"], "w");

    // The good client never noticed.
    good.send(&json!({"type": "ping", "ref": "still-here"}))
        .await;
    assert_eq!(good.next_of(&["reply"]).await["ref"], "still-here");
    d.wait_log("WebSocket from an origin not in allowed_origins refused", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_permission_is_refused() {
    // Needs an unprivileged user to connect as.
    if !nix::unistd::geteuid().is_root() {
        crate::common::skip(
            "a_peer_without_permission_is_refused",
            "needs root to run a client as `nobody`",
            true,
        );
        return;
    }
    // An interpreter `nobody` can execute (not one under /root).
    let Some(python) = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
    else {
        crate::common::skip(
            "a_peer_without_permission_is_refused",
            "no system python3 for `nobody` to act as the unprivileged client",
            true,
        );
        return;
    };
    let sim = sim().await;
    let d = Daemon::start(&sim).await;
    let mut good = HisClient::unix(&d).await;
    // Let `nobody` reach the socket's directory; the socket itself stays 0660.
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = as_nobody(&python, &d.sock);
    assert!(
        out.contains("refused:") && out.contains("Permission denied"),
        "nobody got: {out}"
    );
    good.send(&json!({"type": "ping", "ref": 1})).await;
    assert_eq!(good.next_of(&["reply"]).await["ok"], true);

    // With the socket group set to nobody's group, nobody is let in: the
    // group check (SO_PEERCRED) and the file mode agree.
    drop(good);
    let _ = d.stop();
    let d = Daemon::start_with(
        &sim,
        Options {
            socket_group: Some("nogroup".into()),
            ..Options::default()
        },
    )
    .await;
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = as_nobody(&python, &d.sock);
    assert!(out.contains("\"hello\""), "nobody in the group got: {out}");
    // The peer's credentials are logged.
    d.wait_log("HIS client connected (unix) uid=65534", 1);
}

pub fn as_nobody(python: &std::path::Path, sock: &std::path::Path) -> String {
    use std::os::unix::process::CommandExt as _;
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); s.settimeout(5); print(s.recv(4096).decode())\nexcept OSError as e:\n print('refused:', e)\n";
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(sock)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

pub async fn ws_connect(d: &Daemon, origin: Option<&str>) -> Result<Ws, u16> {
    ws_connect_to(d, origin, "/").await
}

pub async fn ws_connect_to(d: &Daemon, origin: Option<&str>, path: &str) -> Result<Ws, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut req = format!("ws://{}{path}", d.ws)
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    let tcp = tokio::net::TcpStream::connect(&d.ws).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("websocket: {e}"),
    }
}

#[test]
fn demo_script_runs_the_whole_loop() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.scans");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ehc-agent"))
        .args(["demo", "--script", script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |needle: &str| stdout.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count("\"type\":\"card\""), 3, "{stdout}");
    assert_eq!(count("\"type\":\"scanFailed\""), 2, "{stdout}");
    assert_eq!(count("\"type\":\"otherCode\""), 1, "{stdout}");
    assert_eq!(count("platform ← reportHISData"), 3, "{stdout}");
    assert!(
        stdout.contains(
            "demo done: 6 scans, 6 HIS events, 3 uses uploaded, 3 reports received by the platform"
        ),
        "{stdout}"
    );
}
