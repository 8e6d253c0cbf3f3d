//! Scans after idle gaps ride an open connection: the simulator over TLS
//! closes idle connections (as the platform's front end does), a proxy
//! counts connections, and the agent must (a) open one on the first byte
//! of a scan and send the scan on it, (b) keep one open through an idle gap,
//! (c) resume TLS sessions; a gateway asked to warm up opens its own
//! upstream connection. Timings are `bench coldscan`'s job; these tests
//! assert on connections, which do not depend on the machine's speed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ehc_agent::agent::app::App;
use ehc_agent::config::{self, Env};
use ehc_agent::gateway::tls::{self, TlsFiles};
use ehc_agent::sim::delay::DelayProxy;
use ehc_agent::sim::{SimConfig, SimServer};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

use crate::common::*;

/// A TLS simulator closing connections idle for `keepalive_s`, behind a
/// proxy that counts connections and adds `rtt_ms`.
async fn platform(dir: &Path, keepalive_s: u64, rtt_ms: u64) -> (SimServer, DelayProxy, TlsFiles) {
    let files = tls::init(&dir.join("tls"), &["127.0.0.1".into()]).unwrap();
    let acceptor = tls::acceptor(&files.cert, &files.key).unwrap();
    let sim = SimServer::start_with(
        SimConfig {
            keepalive_s,
            ..SimConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
        Some(acceptor),
    )
    .await
    .unwrap();
    let rtt = Duration::from_millis(rtt_ms);
    let proxy = DelayProxy::start("127.0.0.1:0".parse().unwrap(), sim.addr, rtt)
        .await
        .unwrap();
    (sim, proxy, files)
}

/// Poll `cond` every 10 ms for up to 20 s (a condition, not a guessed wait).
async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

struct Agent {
    app: App,
    keys: tokio::io::DuplexStream,
    his: tokio::io::Lines<tokio::io::BufReader<tokio::net::UnixStream>>,
}

impl Agent {
    /// An agent towards `base` (through the proxy), its scanner framing fed
    /// by [`Agent::keys`], its HIS socket read by [`Agent::card`].
    async fn start(dir: &Path, base: &str, ca: &Path, platform_extra: &str) -> Agent {
        std::fs::write(dir.join("app_secret"), SECRET).unwrap();
        std::fs::set_permissions(
            dir.join("app_secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let text = format!(
            "[platform]\nbase_url = \"{base}\"\napp_id = \"{APP_ID}\"\napp_secret_file = \"app_secret\"\nhospital_id = \"{HOSPITAL}\"\n\
             ca_file = \"{}\"\n{platform_extra}\n\
             [terminal]\nid = \"W1\"\ndepartment = \"内科\"\ncity_code = \"1\"\ncity_name = \"c\"\nhospital_code = \"h\"\nhospital_name = \"h\"\n\
             [his]\nlisten_unix = \"his.sock\"\n[outbox]\npath = \"outbox.sqlite\"\n",
            ca.display()
        );
        let cfg = config::parse(&text, dir, &Env::default()).unwrap();
        let app = App::start(&cfg).await.unwrap();
        let s = tokio::net::UnixStream::connect(app.his_unix.as_ref().unwrap())
            .await
            .unwrap();
        let mut his = tokio::io::BufReader::new(s).lines();
        his.next_line().await.unwrap(); // hello
        let (keys, r) = tokio::io::duplex(4096);
        tokio::spawn(ehc_agent::agent::scanner::stdin::run_mapped(
            "counter".into(),
            r,
            Duration::ZERO,
            app.scans.clone(),
            app.scanners.arrivals(),
            |s| s,
        ));
        Agent { app, keys, his }
    }

    async fn card(&mut self) {
        loop {
            let l = self.his.next_line().await.unwrap().expect("HIS open");
            assert!(!l.contains("scanFailed"), "the scan failed: {l}");
            if l.contains("\"type\":\"card\"") {
                return;
            }
        }
    }

    async fn scan(&mut self, code: &str) {
        self.keys
            .write_all(format!("{code}\n").as_bytes())
            .await
            .unwrap();
        self.card().await;
    }
}

fn minted(sim: &SimServer) -> String {
    sim.with_state(|s| s.mint(0, Some(3600), now())).unwrap().0
}

/// The first byte of a code opens the connection (the server had closed the
/// last one), and the scan goes on that connection, not a second one, even
/// though the rest of the code arrives while the handshakes are still under
/// way (200 ms RTT); no request is sent on it before the scan's (the scan
/// would wait a round trip behind it); the new TLS session is a resumed one.
#[tokio::test]
async fn the_first_byte_opens_the_connection_the_scan_rides() {
    let d = tempfile::tempdir().unwrap();
    let (sim, proxy, files) = platform(d.path(), 1, 200).await;
    let base = format!("https://{}", proxy.addr);
    let mut a = Agent::start(
        d.path(),
        &base,
        &files.ca_cert,
        "warm_s = 1\nkeep_warm_min = 0\npreconnect = true",
    )
    .await;
    a.scan(&minted(&sim)).await;
    // Uploads done and every connection closed by the server for idleness.
    for i in 0.. {
        let c = a.app.outbox.counts().await.unwrap();
        if c.waiting + c.pending == 0 {
            break;
        }
        assert!(i < 2000, "the use was never uploaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    until("the server closed the idle connections", || {
        proxy.open() == 0
    })
    .await;
    let before = proxy.connections();
    let stray = sim.unrouted();
    let code = minted(&sim);
    let (first, rest) = code.split_at(1);
    a.keys.write_all(first.as_bytes()).await.unwrap();
    until("a connection opened on the first byte", || {
        proxy.connections() == before + 1
    })
    .await;
    a.keys
        .write_all(format!("{rest}\n").as_bytes())
        .await
        .unwrap();
    a.card().await;
    assert_eq!(
        proxy.connections(),
        before + 1,
        "the scan rode the connection its first byte opened"
    );
    assert_eq!(
        sim.unrouted(),
        stray,
        "the connection was opened bare: no warm-up request went on it for the scan to wait behind"
    );
    let (_, resumed) = sim.handshakes().unwrap();
    assert!(
        resumed >= 1,
        "TLS sessions are resumed, not renegotiated in full"
    );
    a.app.shutdown().await;
}

/// With keep-warm, one connection outlives an idle gap longer than the
/// server's keep-alive timeout (without it the server closes them all).
#[tokio::test]
async fn keep_warm_holds_a_connection_through_an_idle_gap() {
    let d = tempfile::tempdir().unwrap();
    let (sim, proxy, files) = platform(d.path(), 2, 0).await;
    let base = format!("https://{}", proxy.addr);
    let mut a = Agent::start(
        d.path(),
        &base,
        &files.ca_cert,
        "warm_s = 1\nkeep_warm_min = 1\npreconnect = false",
    )
    .await;
    a.scan(&minted(&sim)).await;
    // The gap under test: two and a half times the server's keep-alive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        proxy.open() >= 1,
        "a connection is still open after 5 s idle against a 2 s keep-alive"
    );
    assert!(
        sim.unrouted() >= 1,
        "it was kept open by requests (a bare connection would be closed)"
    );
    a.scan(&minted(&sim)).await;
    a.app.shutdown().await;
}

/// A terminal's `HEAD /` at the gateway, or its bare new connection, makes
/// the gateway open its own connection to the platform when none is warm.
#[tokio::test]
async fn a_warm_up_at_the_gateway_warms_its_upstream() {
    let d = tempfile::tempdir().unwrap();
    let (_sim, proxy, files) = platform(d.path(), 1, 0).await;
    std::fs::write(d.path().join("upstream_secret"), SECRET).unwrap();
    std::fs::set_permissions(
        d.path().join("upstream_secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\n[upstream]\nbase_url = \"https://{}\"\n\
         app_id = \"{APP_ID}\"\nhospital_id = \"{HOSPITAL}\"\napp_secret_file = \"upstream_secret\"\nca_file = \"{}\"\n\
         warm_s = 1\nkeep_warm_min = 0\n",
        proxy.addr,
        files.ca_cert.display()
    );
    std::fs::write(d.path().join("gateway.toml"), text).unwrap();
    let cfg =
        ehc_agent::gateway::config::load(Some(&d.path().join("gateway.toml")), &Default::default())
            .unwrap();
    let gw = Arc::new(
        ehc_agent::gateway::RunningGateway::start(cfg)
            .await
            .unwrap(),
    );
    // Its token fetch at start used a connection; wait until the platform
    // closed it for idleness.
    until("the gateway fetched its token", || proxy.connections() >= 1).await;
    until("the server closed the idle connection", || {
        proxy.open() == 0
    })
    .await;
    let before = proxy.connections();
    let r = http()
        .head(format!("{}/", gw.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    until("the gateway opened an upstream connection", || {
        proxy.connections() == before + 1
    })
    .await;
    // A terminal's pre-connect is a bare connection (no request on it):
    // accepting it is enough for the gateway to open its upstream one.
    until("the server closed the idle connection", || {
        proxy.open() == 0
    })
    .await;
    let before = proxy.connections();
    let bare = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    until(
        "the gateway opened an upstream connection on an accept",
        || proxy.connections() == before + 1,
    )
    .await;
    drop(bare);
}

/// `ehc-agent sim --tls DIR` makes a CA and a certificate there and serves
/// HTTPS that the agent's client trusts through `ca_file`.
#[tokio::test]
async fn sim_tls_serves_https_with_a_ca_it_made() {
    let d = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ehc-agent"))
        .args(["sim", "--listen", &format!("127.0.0.1:{port}"), "--tls"])
        .arg(d.path().join("tls"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    while let Some(l) = out.next_line().await.unwrap() {
        banner.push_str(&l);
        banner.push('\n');
        if l.starts_with("platform simulator at") {
            break;
        }
    }
    assert!(
        banner.contains("ca.pem"),
        "says which CA to trust: {banner}"
    );
    assert!(
        banner.contains(&format!("https://127.0.0.1:{port}")),
        "{banner}"
    );
    let ca = std::fs::read(d.path().join("tls/ca.pem")).unwrap();
    let c = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let r = c
        .post(format!("https://127.0.0.1:{port}{}", path("getAppToken")))
        .body(envelope("", &rid(1), serde_json::json!({"appId": APP_ID}), SECRET).to_string())
        .send()
        .await
        .unwrap();
    let v = json_of(r).await;
    assert_eq!(code(&v), 0, "{v}");
    // Plain HTTP is not served on the TLS port.
    assert!(http()
        .post(format!("http://127.0.0.1:{port}{}", path("getAppToken")))
        .body("{}")
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
        .eq(&false));
    let _ = child.kill().await;
}

/// IT can see cold scans: `ehc_agent_platform_connections_opened_total`
/// counts a connection a scan had to open itself (`by="scan"`) apart from
/// one its first byte opened (`by="preconnect"`). The daemon runs as its
/// own process (the counters are per process); the simulator closes
/// connections idle for 2 s (the agent takes them for closed after 1 s), a
/// proxy in front shows when it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_scans_are_counted_by_what_opened_their_connection() {
    use crate::daemon::{until_sim, Daemon, HisClient, Options};
    let sim = sim_with(SimConfig {
        keepalive_s: 2,
        ..SimConfig::default()
    })
    .await;
    let proxy = DelayProxy::start("127.0.0.1:0".parse().unwrap(), sim.addr, Duration::ZERO)
        .await
        .unwrap();
    for preconnect in [false, true] {
        let opts = Options {
            extra_toml: "[metrics]\nlisten = \"127.0.0.1:0\"\n".into(),
            platform_addr_line: Some(format!(
                "base_url = \"http://{}\"\npreconnect = {preconnect}\nkeep_warm_min = 0\nwarm_s = 1",
                proxy.addr
            )),
            ..Options::default()
        };
        let mut d = Daemon::start_with(&sim, opts).await;
        let mut his = HisClient::unix(&d).await;
        let url = format!("http://{}/metrics", d.metrics);
        let scrape = || async { http().get(&url).send().await.unwrap().text().await.unwrap() };
        let reports = |s: &serde_json::Value| s["reports"].as_array().map_or(0, Vec::len);
        let before_scan = reports(&state(&sim).await);
        d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
        his.next_of(&["card"]).await;
        until_sim(&sim, "the report", |s| reports(s) == before_scan + 1).await;
        until("the server closed the idle connections", || {
            proxy.open() == 0
        })
        .await;
        let before = scrape().await;
        let code = sim.with_state(|s| s.static_code(1)).unwrap();
        let series =
            |by: &str| format!("ehc_agent_platform_connections_opened_total{{by=\"{by}\"}}");
        if preconnect {
            // The first byte ahead of the rest, as from a scanner.
            let (first, rest) = code.split_at(1);
            d.scan_bytes(first.as_bytes());
            for i in 0.. {
                let now = scrape().await;
                if metric_value(&now, &series("preconnect"))
                    > metric_value(&before, &series("preconnect"))
                {
                    break;
                }
                assert!(i < 2000, "no connection opened on the first byte:\n{now}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            d.scan(rest);
        } else {
            d.scan(&code);
        }
        let m = his.next_of(&["card"]).await;
        assert_eq!(m["verified"], true, "{m}");
        let after = scrape().await;
        let delta =
            |by: &str| metric_value(&after, &series(by)) - metric_value(&before, &series(by));
        if preconnect {
            assert_eq!((delta("preconnect"), delta("scan")), (1.0, 0.0), "{after}");
        } else {
            assert_eq!((delta("preconnect"), delta("scan")), (0.0, 1.0), "{after}");
        }
    }
}

/// The value of `key=` in a log line (tracing's `key=value` format).
fn field(line: &str, key: &str) -> f64 {
    let at = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    let v = &line[at + key.len() + 2..];
    let v = v.split_whitespace().next().unwrap_or_default();
    v.parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {line:?}"))
}

/// A slow scan in the journal says where its time went: the platform
/// (here a proxy adding 60 ms: the call cannot take less) or the commit.
#[tokio::test]
async fn a_scan_done_line_says_where_the_time_went() {
    use crate::daemon::{Daemon, HisClient, Options};
    let sim = sim_with(SimConfig::default()).await;
    let proxy = DelayProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        sim.addr,
        Duration::from_millis(60),
    )
    .await
    .unwrap();
    let opts = Options {
        platform_addr_line: Some(format!("base_url = \"http://{}\"", proxy.addr)),
        ..Options::default()
    };
    let mut d = Daemon::start_with(&sim, opts).await;
    let mut his = HisClient::unix(&d).await;
    d.scan(&sim.with_state(|s| s.static_code(0)).unwrap());
    let card = his.next_of(&["card"]).await;
    d.wait_log("scan done", 1);
    let log = d.log();
    let line = log.lines().find(|l| l.contains("scan done")).unwrap();
    assert!(
        line.contains(card["scanId"].as_str().unwrap()),
        "{line} / {card}"
    );
    assert!(line.contains("result=\"card\""), "{line}");
    let (total, platform, commit) = (
        field(line, "ms"),
        field(line, "platform_ms"),
        field(line, "commit_ms"),
    );
    assert!(platform >= 60.0, "the call crossed the proxy: {line}");
    assert!(commit > 0.0, "the use was committed: {line}");
    assert!(total >= platform + commit, "{line}");
}
