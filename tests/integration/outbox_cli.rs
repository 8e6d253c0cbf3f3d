//! `ehc-agent outbox list|retry|purge|flush` as an operator runs them.

use std::os::unix::fs::PermissionsExt as _;

use ehc_agent::agent::outbox::{Kind, NewRow, Store};
use serde_json::Value;

use crate::common::*;

fn rows(qr: &str, n: usize) -> Vec<NewRow> {
    (0..n)
        .map(|_| NewRow {
            request_id: ehc_agent::platform::client::new_request_id(),
            kind: Kind::Report,
            scan_id: "S".into(),
            payload: report(qr).to_string(),
            created_at: now(),
            wait_until: None,
        })
        .collect()
}

#[test]
fn list_retry_purge() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.sqlite");
    let mut s = Store::open(&path).unwrap();
    let qr = format!("{}:1", "C7DA2934".repeat(8));
    let ids = s.insert(&rows(&qr, 4)).unwrap();
    s.mark_held(ids[0], Some(10042), "platform result code 10042: 参数错误")
        .unwrap();
    s.mark_sent(ids[1], now(), 0).unwrap();
    drop(s);

    let out = agent()
        .args(["outbox", "list", "--json", "--outbox"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            v["counts"]["pending"].as_i64(),
            v["counts"]["held"].as_i64(),
            v["counts"]["sent"].as_i64()
        ),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(v["held"][0]["lastCode"], 10042);
    assert_eq!(v["held"][0]["qrCodeText"], "C7DA2934…(66 chars)");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&qr),
        "QR texts are masked"
    );

    let out = agent()
        .args(["outbox", "list", "--outbox"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pending 2") && text.contains("held 1") && text.contains("10042"),
        "{text}"
    );

    let out = agent()
        .args(["outbox", "retry"])
        .arg("--outbox")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "retry needs an id or --held");
    let out = agent()
        .args(["outbox", "retry", "--held", "--outbox"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-queued 1"));
    let out = agent()
        .args(["outbox", "purge", "--held", "--outbox"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "held rows need --yes");
    let out = agent()
        .args(["outbox", "purge", "--outbox"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 1 row(s) (sent)"));
    let c = Store::open(&path).unwrap().counts().unwrap();
    assert_eq!((c.pending, c.held, c.sent), (3, 0, 0));
}

fn flush_config(dir: &std::path::Path, base_url: &str, secret: &str) -> std::path::PathBuf {
    let s = dir.join("app_secret");
    std::fs::write(&s, secret).unwrap();
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[platform]\nbase_url = \"{base_url}\"\napp_id = \"{APP_ID}\"\napp_secret_file = \"app_secret\"\nhospital_id = \"{HOSPITAL}\"\n\
             [terminal]\nid = \"W\"\ndepartment = \"内科\"\ncity_code = \"1\"\ncity_name = \"c\"\nhospital_code = \"h\"\nhospital_name = \"h\"\n\
             [his]\nlisten_unix = \"his.sock\"\n[outbox]\npath = \"outbox.sqlite\"\n"
        ),
    )
    .unwrap();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_uploads_everything_or_says_why_not() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    let mut s = Store::open(&dir.path().join("outbox.sqlite")).unwrap();
    let ids = s.insert(&rows(&qr, 5)).unwrap();
    // Backed off far into the future: flush makes them due.
    for id in ids {
        s.mark_retry(id, now() + 3600, Some(-1), "x").unwrap();
    }
    drop(s);
    let cfg = flush_config(dir.path(), &sim.base_url(), SECRET);
    let out = tokio::task::spawn_blocking(move || {
        agent()
            .args(["outbox", "flush", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("uploaded 5 row(s)"));
    assert_eq!(state(&sim).await["uniqueReports"], 5);

    // A wrong secret: exit 1 with the reason, rows kept.
    let dir = tempfile::tempdir().unwrap();
    Store::open(&dir.path().join("outbox.sqlite"))
        .unwrap()
        .insert(&rows(&qr, 2))
        .unwrap();
    let cfg = flush_config(dir.path(), &sim.base_url(), "wrong-secret");
    let out = tokio::task::spawn_blocking(move || {
        agent()
            .args(["outbox", "flush", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 row(s) still pending") && err.contains("21006"),
        "{err}"
    );
}
