//! The fleet behind a gateway: 50 terminals send signed heartbeats (each
//! with its own credentials, through the agent's own client), one real
//! agent beats on its own, and hospital IT reads the same fleet as JSON, as
//! the `gateway fleet` table, as Prometheus series and as the page in a
//! real headless Chromium, with what needs attention first and why.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ehc_agent::config::Secret;
use ehc_agent::gateway::{config, RunningGateway};
use ehc_agent::platform::heartbeat::Beat;
use ehc_agent::platform::{Client, ClientSettings};
use serde_json::{json, Value};

use crate::common::*;

async fn gateway(sim: &ehc_agent::sim::SimServer, dir: &Path) -> (RunningGateway, PathBuf) {
    std::fs::write(dir.join("upstream_secret"), SECRET).unwrap();
    std::fs::set_permissions(
        dir.join("upstream_secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{}\"\napp_id = \"{APP_ID}\"\nhospital_id = \"{HOSPITAL}\"\napp_secret_file = \"upstream_secret\"\n",
        sim.base_url()
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = config::load(Some(&path), &Default::default()).unwrap();
    (RunningGateway::start(cfg).await.unwrap(), path)
}

fn terminal_client(gw: &RunningGateway, t: &ehc_agent::gateway::store::Terminal) -> Client {
    Client::new(ClientSettings {
        base_url: gw.base_url(),
        fallback_urls: vec![],
        app_id: t.app_id.clone(),
        hospital_id: HOSPITAL.into(),
        secret: Secret::new(&t.secret),
        scan_timeout: Duration::from_secs(5),
        upload_timeout: Duration::from_secs(10),
        proxy: None,
        ca_file: None,
        warm: Duration::from_secs(25),
        keep_warm: Duration::ZERO,
        preconnect: false,
        state_path: None,
        shared: None,
    })
    .unwrap()
}

/// A terminal's status as `ehc-agent status --json` has it: healthy, then
/// changed by `f`.
fn status(now: i64, f: impl FnOnce(&mut Value)) -> Value {
    let mut v = json!({
        "terminalId": "W",
        "scanners": {"counter": {"kind": "serial", "device": "/dev/ttyUSB0", "state": "connected", "since": now - 7200, "scans": 12}},
        "hisClients": ["uid 1000"],
        "outbox": {"pending": 0, "waiting": 0, "held": 0, "sent": 40},
        "uploads": {"uploaded": 40},
        "token": {"valid": true, "revocations": 0},
        "recentErrors": []
    });
    f(&mut v);
    v
}

async fn fleet_json(admin: std::net::SocketAddr) -> Value {
    json_of(
        http()
            .get(format!("http://{admin}/api/fleet"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn row<'a>(f: &'a Value, name: &str) -> &'a Value {
    f["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in the fleet"))
}

fn causes(r: &Value) -> String {
    r["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} / {}",
                c["zh"].as_str().unwrap(),
                c["en"].as_str().unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// An in-process agent enrolled at the gateway as `name`, beating every
/// second, with one stdin scanner.
async fn real_agent(dir: &Path, gw: &RunningGateway, name: &str) -> ehc_agent::agent::app::App {
    let t = gw.store.add_terminal(name, now()).unwrap();
    std::fs::write(dir.join("app_secret"), &t.secret).unwrap();
    std::fs::set_permissions(
        dir.join("app_secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let text = format!(
        "[platform]\nbase_url = \"{}\"\napp_id = \"{}\"\napp_secret_file = \"app_secret\"\nhospital_id = \"{HOSPITAL}\"\nheartbeat_s = 1\n\
         [terminal]\nid = \"WIN-REAL\"\ndepartment = \"内科\"\ncity_code = \"1\"\ncity_name = \"c\"\nhospital_code = \"h\"\nhospital_name = \"h\"\n\
         [his]\nlisten_unix = \"his.sock\"\n[outbox]\npath = \"outbox.sqlite\"\n",
        gw.base_url(),
        t.app_id
    );
    let cfg = ehc_agent::config::parse(&text, dir, &ehc_agent::config::Env::default()).unwrap();
    ehc_agent::agent::app::App::start(&cfg).await.unwrap()
}

const PROBLEMS: [&str; 4] = ["t-backlog", "t-stale", "t-stopped", "t-unplugged"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_terminals_one_page_attention_first() {
    let sim = sim().await;
    let d = tempfile::tempdir().unwrap();
    let (gw, cfg_path) = gateway(&sim, d.path()).await;
    let admin = gw.metrics_addr.expect("admin listener");
    let now = now();

    let mut names: Vec<String> = (1..=46).map(|i| format!("t-{i:02}")).collect();
    names.extend(PROBLEMS.iter().map(|s| s.to_string()));
    let mut sends = Vec::new();
    for name in &names {
        let t = gw.store.add_terminal(name, now).unwrap();
        let c = terminal_client(&gw, &t);
        let st = status(now, |v| match name.as_str() {
            "t-unplugged" => {
                v["scanners"]["counter"]["state"] = json!("waitingForDevice");
                v["scanners"]["counter"]["since"] = json!(now - 1500);
            }
            "t-backlog" => {
                v["outbox"] = json!({"pending": 300, "waiting": 40, "held": 0, "oldestPendingAgeS": 3 * 3600});
            }
            "t-stopped" => {
                v["uploads"] = json!({"stopped": "result code 21006 (签名错误)"});
                v["recentErrors"] = json!([{"at": now - 30, "api": "reportHISData", "code": 21006, "what": "configuration"}]);
            }
            _ => {}
        });
        let beat = Beat {
            version: "0.1.0".into(),
            terminal_id: name.to_uppercase(),
            // The stale one beats once, every second: three missed in 3 s.
            interval_s: if name == "t-stale" { 1 } else { 30 },
            status: st,
        };
        sends.push(tokio::spawn(async move { c.heartbeat(&beat).await }));
    }
    for s in sends {
        s.await.unwrap().expect("a heartbeat is accepted");
    }
    let real_dir = tempfile::tempdir().unwrap();
    let agent = real_agent(real_dir.path(), &gw, "w-real").await;

    // The stale terminal: three beats missed; the real agent: beating.
    let mut f = Value::Null;
    for i in 0.. {
        f = fleet_json(admin).await;
        let stale = f["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "t-stale" && r["stale"] == true);
        let real = f["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "w-real" && r["terminalId"] == "WIN-REAL");
        if stale && real {
            break;
        }
        assert!(
            i < 200,
            "t-stale never went stale, or w-real never beat: {f}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f["terminals"], 51);
    assert_eq!(f["needsAttention"], 4, "{f:#}");
    let rows = f["rows"].as_array().unwrap();
    let first: Vec<&str> = rows[..4]
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, PROBLEMS, "needing attention first: {first:?}");
    assert!(rows[4..]
        .iter()
        .all(|r| r["attention"].as_array().unwrap().is_empty()));
    let unplugged = causes(row(&f, "t-unplugged"));
    assert!(
        unplugged.contains("扫码枪 counter 未连接")
            && unplugged.contains("Scanner counter unplugged since"),
        "{unplugged}"
    );
    let backlog = causes(row(&f, "t-backlog"));
    assert!(
        backlog.contains("340 uses not uploaded, oldest 3 h"),
        "{backlog}"
    );
    assert!(causes(row(&f, "t-stale")).contains("No heartbeat for"));
    let stopped = row(&f, "t-stopped");
    assert!(causes(stopped).contains("Uploads stopped: result code 21006"));
    assert_eq!(stopped["recentErrors"][0]["code"], 21006);
    assert_eq!(stopped["recentErrors"][0]["meaning"], "签名错误");
    // Beijing time, whatever this machine's zone.
    assert_eq!(
        stopped["lastBeatBeijing"].as_str().unwrap().len(),
        "2026-12-02 09:12:00".len()
    );
    let real = row(&f, "w-real");
    assert_eq!(
        real["clockOffsetS"].as_i64().map(|o| o.abs() <= 2),
        Some(true)
    );

    // The same in the terminal: a table, attention first, exit 1.
    let out = crate::common::agent()
        .args(["gateway", "fleet", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("51 terminal(s), 4 need attention, 1 stale"),
        "{text}"
    );
    for l in &lines[2..6] {
        assert!(PROBLEMS.iter().any(|p| l.starts_with(p)), "{text}");
    }
    assert!(text.contains("Scanner counter unplugged since"), "{text}");

    // And Prometheus, per terminal.
    let m = http()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "ehc_agent_fleet_terminal_up{terminal=\"t-stale\"} 0",
        "ehc_agent_fleet_terminal_up{terminal=\"t-01\"} 1",
        "ehc_agent_fleet_outbox_unsent{terminal=\"t-backlog\"} 340",
        "ehc_agent_fleet_scanners_down{terminal=\"t-unplugged\"} 1",
        "ehc_agent_fleet_uploads_stopped{terminal=\"t-stopped\"} 1",
    ] {
        assert!(m.contains(want), "{want} missing from /metrics");
    }

    browser_shows_attention_first(admin).await;
    agent.shutdown().await;
}

/// Debian's Chromium renders the page (its script fetches `/api/fleet`);
/// the DOM it ends with has the four problems first with their causes. A
/// screenshot is left in the target directory (`fleet.png`).
async fn browser_shows_attention_first(admin: std::net::SocketAddr) {
    let Some(chromium) = find(&["chromium", "chromium-browser", "google-chrome"]) else {
        skip(
            "fleet page in Chromium",
            "no Chromium (.ci/run installs it; or apt-get install chromium)",
            true,
        );
        return;
    };
    let url = format!("http://{admin}/");
    let profile = tempfile::tempdir().unwrap();
    let (c, p, u) = (chromium.clone(), profile.path().to_owned(), url.clone());
    let dom = tokio::task::spawn_blocking(move || headless(&c, &p, "--dump-dom", &u))
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let rows: Vec<(String, usize)> = dom
        .split("<tr class=\"row ")
        .skip(1)
        .map(|tr| {
            let attr = |name: &str| {
                tr.split(&format!("{name}=\""))
                    .nth(1)
                    .and_then(|s| s.split('"').next())
                    .unwrap_or("")
                    .to_owned()
            };
            (
                attr("data-terminal"),
                attr("data-attention").parse().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(rows.len(), 51, "every terminal is a row: {dom}");
    let mut first: Vec<&str> = rows[..4].iter().map(|(n, _)| n.as_str()).collect();
    first.sort();
    assert_eq!(first, PROBLEMS);
    assert!(rows[..4].iter().all(|(_, n)| *n > 0));
    assert!(rows[4..].iter().all(|(_, n)| *n == 0));
    for words in [
        "Scanner counter unplugged since",
        "340 uses not uploaded",
        "No heartbeat for",
        "Uploads stopped: result code 21006",
        "需立即处理",
    ] {
        assert!(dom.contains(words), "the page says `{words}`");
    }
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let p = profile.path().to_owned();
    let out = tokio::task::spawn_blocking(move || headless(&chromium, &p, &arg, &url))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "a screenshot in {}",
        shot.display()
    );
    eprintln!("fleet page screenshot: {}", shot.display());
}

/// One headless Chromium run on `url` with `extra` (`--dump-dom`,
/// `--screenshot=F`), flags as the machine's notes require for a closed
/// network.
fn headless(chromium: &str, profile: &Path, extra: &str, url: &str) -> std::process::Output {
    std::process::Command::new(chromium)
        .args(HEADLESS_CHROMIUM)
        .args([
            "--hide-scrollbars",
            "--window-size=1400,1000",
            // Let the page's fetch of /api/fleet finish before the DOM or
            // the picture is taken.
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(extra)
        .arg(url)
        .output()
        .unwrap()
}
