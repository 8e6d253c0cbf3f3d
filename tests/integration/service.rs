//! The daemon as a service: sd_notify READY and WATCHDOG, SIGTERM under
//! load, SIGHUP with a broken and a good configuration, `status --json`,
//! `scan`, and the metrics endpoint.

use serde_json::{json, Value};

use crate::common::*;
use crate::daemon::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_after_listeners_accept_and_watchdog_keeps_coming() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let opts = Options {
        env: vec![
            ("NOTIFY_SOCKET".into(), notify_path.display().to_string()),
            ("WATCHDOG_USEC".into(), "400000".into()),
            ("WATCHDOG_PID".into(), "self".into()),
        ],
        ..Options::default()
    };
    let d = Daemon::start_with(&sim, opts).await;
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.contains("READY=1"), "{first}");
    assert!(first.contains("STATUS="), "{first}");
    // When READY=1 arrives, HIS can connect.
    let mut his = HisClient::unix(&d).await;
    his.send(&json!({"type": "ping", "ref": 1})).await;
    assert_eq!(his.next_of(&["reply"]).await["ok"], true);
    let mut watchdogs = 0;
    while watchdogs < 3 {
        let n = notify.recv(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            watchdogs += 1;
        }
    }
    let (status, log, _) = d.stop();
    assert!(status.success(), "{log}");
    let mut last = String::new();
    while let Ok(n) = notify.recv(&mut buf) {
        last = String::from_utf8_lossy(&buf[..n]).into_owned();
        if last.contains("STOPPING=1") {
            break;
        }
    }
    assert!(last.contains("STOPPING=1"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_0_and_loses_nothing() {
    let sim = sim().await;
    set_faults(&sim, json!({"latency_ms": 20})).await;
    let mut d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    for i in 0..30 {
        d.scan(&sim.with_state(|s| s.static_code(i % 4)).unwrap());
    }
    let mut seen = vec![];
    for _ in 0..5 {
        seen.push(
            his.next_of(&["card"]).await["scanId"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let (status, log, dir) = d.stop();
    assert!(status.success(), "exit 0 under load:\n{log}");
    assert!(log.contains("SIGTERM") && log.contains("stopped"), "{log}");
    // Cards delivered before and during the shutdown all have their use.
    while let Some(m) = his.next().await {
        if m["type"] == "card" {
            seen.push(m["scanId"].as_str().unwrap().to_owned());
        }
    }
    let store = ehc_agent::agent::outbox::Store::open(&dir.path().join("outbox.sqlite")).unwrap();
    let mut scans = std::collections::HashSet::new();
    for st in [
        ehc_agent::agent::outbox::State::Pending,
        ehc_agent::agent::outbox::State::Sent,
    ] {
        for r in store.list(st, 1000).unwrap() {
            scans.insert(r.scan_id);
        }
    }
    for id in &seen {
        assert!(
            scans.contains(id),
            "card {id} delivered to HIS has no use in the outbox"
        );
    }
    // Nothing left behind: the sockets are gone.
    assert!(!dir.path().join("his.sock").exists() && !dir.path().join("control.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_a_broken_configuration_and_applies_a_good_one() {
    let sim = sim().await;
    let d = Daemon::start(&sim).await;
    let mut his = HisClient::unix(&d).await;
    let cfg = d.path().join("agent.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        good.replace("channel = \"0100\"", "channel = \"9999\"")
            .replace("[outbox]", "[outbox]\nbatch = 0"),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_log("configuration NOT reloaded", 1);
    let log = d.log();
    assert!(
        log.contains("terminal.channel") && log.contains("outbox.batch"),
        "every problem logged:\n{log}"
    );
    // Still serving the same client.
    his.send(&json!({"type": "ping", "ref": "after-bad-hup"}))
        .await;
    assert_eq!(his.next_of(&["reply"]).await["ref"], "after-bad-hup");
    // A good new configuration is applied: the new terminal id greets.
    std::fs::write(
        &cfg,
        good.replace("id = \"WIN-T\"", "id = \"WIN-RELOADED\""),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_log("configuration reloaded", 1);
    let mut his2 = HisClient::unix(&d).await;
    his2.send(&json!({"type": "ping", "ref": 2})).await;
    assert_eq!(his2.next_of(&["reply"]).await["ok"], true);
    let out = agent()
        .args(["status", "--json", "--control"])
        .arg(&d.control)
        .output()
        .unwrap();
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["terminalId"], "WIN-RELOADED");
    let (status, log, _) = d.stop();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reflects_unplugged_scanner_stopped_uploads_and_held_rows() {
    let sim = sim().await;
    let opts = Options {
        extra_toml: "[[scanner]]\nname = \"left\"\nkind = \"serial\"\npath = \"/dev/serial/by-id/usb-not-plugged-in\"\nbaud = 9600\n".into(),
        ..Options::default()
    };
    let d = Daemon::start_with(&sim, opts).await;
    d.wait_log("scanner unplugged or not present", 1);
    // A row the platform refuses for good, then a configuration error.
    set_faults(
        &sim,
        json!({"force": {"code": 10042, "count": 1, "api": "reportHISData"}}),
    )
    .await;
    let scan = |text: &str| {
        agent()
            .args(["scan", text, "--control"])
            .arg(&d.control)
            .output()
            .unwrap()
    };
    let out = scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ev["type"], "card", "`scan` prints what HIS received");
    d.wait_log("held for the operator", 1);
    set_faults(
        &sim,
        json!({"force": {"code": 21006, "count": 1, "api": "reportHISData"}}),
    )
    .await;
    scan(&sim.with_state(|s| s.static_code(1)).unwrap());
    d.wait_log("uploads stopped", 1);

    let out = agent()
        .args(["status", "--json", "--control"])
        .arg(&d.control)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "non-zero when something needs attention"
    );
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["scanners"]["left"]["state"], "waitingForDevice");
    assert!(
        st["uploads"]["stopped"].as_str().unwrap().contains("21006"),
        "{st}"
    );
    assert_eq!(st["outbox"]["held"], 1);
    assert_eq!(st["outbox"]["pending"], 1, "the stopped row is kept");
    assert_eq!(st["attention"].as_array().unwrap().len(), 3, "{st}");
    let human = String::from_utf8(
        agent()
            .args(["status", "--control"])
            .arg(&d.control)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        human.contains("NEEDS ATTENTION") && human.contains("waiting for device"),
        "{human}"
    );
    // Through the daemon: list the held row, re-queue it.
    let out = agent()
        .args(["outbox", "list", "--json", "--control"])
        .arg(&d.control)
        .output()
        .unwrap();
    let l: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(l["held"][0]["lastCode"], 10042);
    let (status, log, _) = d.stop();
    assert!(status.success(), "{log}");
    // Not running: exit 3.
    let out = agent()
        .args(["status", "--control"])
        .arg("/nonexistent/control.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_the_named_series_and_they_move() {
    let sim = sim().await;
    let opts = Options {
        extra_toml: "[metrics]\nlisten = \"127.0.0.1:0\"\n".into(),
        ..Options::default()
    };
    let mut d = Daemon::start_with(&sim, opts).await;
    let mut his = HisClient::unix(&d).await;
    let url = format!("http://{}/metrics", d.metrics);
    let scrape = || async { http().get(&url).send().await.unwrap().text().await.unwrap() };
    let value = metric_value;
    let before = scrape().await;
    for name in [
        "ehc_agent_his_clients 1",
        "ehc_agent_outbox_rows{state=\"pending\"}",
        "ehc_agent_outbox_oldest_pending_age_seconds",
        "ehc_agent_uploads_stopped 0",
        "ehc_agent_scan_to_his_seconds_count",
        "ehc_agent_token_refreshes_total",
    ] {
        assert!(before.contains(name), "{name} not in:\n{before}");
    }
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    his.next_of(&["card"]).await;
    until_sim(&sim, "the report", |s| s["uniqueReports"] == 1).await;
    let after = scrape().await;
    assert_eq!(
        value(&after, "ehc_agent_scans_total{result=\"card\"}"),
        value(&before, "ehc_agent_scans_total{result=\"card\"}") + 1.0
    );
    assert!(
        value(&after, "ehc_agent_scan_to_his_seconds_count")
            > value(&before, "ehc_agent_scan_to_his_seconds_count")
    );
    assert!(after.contains("ehc_agent_platform_request_duration_seconds_count{api=\"getHealthCardByQRCode\",class=\"success\"}"), "{after}");
    assert!(
        value(&after, "ehc_agent_token_refreshes_total") >= 1.0,
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_socket_is_refused() {
    let sim = sim().await;
    let d = Daemon::start(&sim).await;
    let out = agent()
        .args(["run", "--config"])
        .arg(d.path().join("agent.toml"))
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("STATE_DIRECTORY")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already serving HIS") || err.contains("already running"),
        "{err}"
    );
    // The first one is untouched.
    let mut his = HisClient::unix(&d).await;
    his.send(&json!({"type": "ping", "ref": 1})).await;
    assert_eq!(his.next_of(&["reply"]).await["ok"], true);
}
