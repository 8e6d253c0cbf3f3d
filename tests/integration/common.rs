//! Helpers shared by the integration tests: a simulator on port 0, a client
//! pointed at it, hand-signed raw requests, and the control endpoint.

use std::path::PathBuf;
use std::time::Duration;

use ehc_agent::config::Secret;
use ehc_agent::platform::{sign, Client, ClientSettings};
use ehc_agent::sim::{SimConfig, SimServer};
use serde_json::{json, Map, Value};

pub const APP_ID: &str = ehc_agent::sim::config::DEFAULT_APP_ID;
pub const SECRET: &str = ehc_agent::sim::config::DEFAULT_APP_SECRET;
pub const HOSPITAL: &str = ehc_agent::sim::config::DEFAULT_HOSPITAL_ID;

pub async fn sim() -> SimServer {
    sim_with(SimConfig::default()).await
}

pub async fn sim_with(cfg: SimConfig) -> SimServer {
    SimServer::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("simulator starts")
}

pub fn settings(sim: &SimServer, state: Option<PathBuf>) -> ClientSettings {
    ClientSettings {
        fallback_urls: Vec::new(),
        shared: None,
        base_url: sim.base_url(),
        app_id: APP_ID.into(),
        hospital_id: HOSPITAL.into(),
        secret: Secret::new(SECRET),
        scan_timeout: Duration::from_secs(3),
        upload_timeout: Duration::from_secs(10),
        proxy: None,
        ca_file: None,
        warm: Duration::from_secs(25),
        keep_warm: Duration::ZERO,
        preconnect: true,
        state_path: state,
    }
}

pub fn client(sim: &SimServer) -> Client {
    Client::new(settings(sim, None)).unwrap()
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// The simulator's state, through its control endpoint.
pub async fn state(sim: &SimServer) -> Value {
    json_of(
        http()
            .get(format!("{}/_sim/state", sim.base_url()))
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Number of calls of `api` answered with `outcome` (a result code or
/// `http_503`, `outage`, ...).
pub async fn calls(sim: &SimServer, api: &str, outcome: &str) -> u64 {
    state(sim).await["calls"][api][outcome]
        .as_u64()
        .unwrap_or(0)
}

pub async fn control(sim: &SimServer, method: &str, path: &str, body: Value) -> reqwest::Response {
    let url = format!("{}{}", sim.base_url(), path);
    let c = http();
    let r = match method {
        "PUT" => c.put(url),
        "DELETE" => c.delete(url),
        "GET" => c.get(url),
        _ => c.post(url),
    };
    r.body(body.to_string())
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap()
}

pub async fn set_faults(sim: &SimServer, faults: Value) {
    let r = control(sim, "PUT", "/_sim/faults", faults).await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

pub async fn mint(sim: &SimServer, card: usize, ttl: Option<u64>) -> String {
    let v: Value = json_of(
        control(
            sim,
            "POST",
            "/_sim/mint",
            json!({"card": card, "ttlS": ttl}),
        )
        .await,
    )
    .await;
    v["qrCodeText"].as_str().unwrap().to_owned()
}

pub fn now() -> i64 {
    ehc_agent::clock::now_unix()
}

/// A hand-built signed envelope, for checking the simulator's rules
/// independently of the client.
pub fn envelope(token: &str, rid: &str, req: Value, secret: &str) -> Value {
    envelope_at(token, rid, req, secret, HOSPITAL, now())
}

pub fn envelope_at(
    token: &str,
    rid: &str,
    req: Value,
    secret: &str,
    hospital: &str,
    ts: i64,
) -> Value {
    let req = req.as_object().cloned().unwrap_or_default();
    let mut common = Map::new();
    common.insert("appToken".into(), token.into());
    common.insert("requestId".into(), rid.into());
    common.insert("hospitalId".into(), hospital.into());
    common.insert("timestamp".into(), ts.to_string().into());
    let s = sign::sign(&common, Some(&req), secret);
    common.insert("sign".into(), s.into());
    json!({"commonIn": common, "req": req})
}

pub fn path(api: &str) -> &'static str {
    ehc_agent::platform::api::API_NAMES
        .iter()
        .find(|(n, _)| *n == api)
        .unwrap()
        .1
}

/// POST raw bytes to an API path; the parsed JSON answer.
pub async fn post_raw(sim: &SimServer, api: &str, body: Vec<u8>) -> Value {
    let r = http()
        .post(format!("{}{}", sim.base_url(), path(api)))
        .body(body)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

pub async fn post(sim: &SimServer, api: &str, envelope: &Value) -> Value {
    post_raw(sim, api, envelope.to_string().into_bytes()).await
}

pub fn code(answer: &Value) -> i64 {
    answer["commonOut"]["resultCode"]
        .as_i64()
        .expect("resultCode")
}

pub fn rid(n: u32) -> String {
    format!("{:032X}", (n as u128) << 64 | rand_part())
}

fn rand_part() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    u128::from(N.fetch_add(1, Ordering::Relaxed)) ^ (std::process::id() as u128) << 32
}

/// A token straight from the simulator.
pub async fn token(sim: &SimServer) -> String {
    let a = post(
        sim,
        "getAppToken",
        &envelope("", &rid(0), json!({"appId": APP_ID}), SECRET),
    )
    .await;
    assert_eq!(code(&a), 0, "{a}");
    a["rsp"]["appToken"].as_str().unwrap().to_owned()
}

pub fn report(qr: &str) -> Value {
    json!({
        "qrCodeText": qr, "time": ehc_agent::clock::platform_time(now(), ehc_agent::clock::BEIJING),
        "hospitalId": HOSPITAL, "scene": "010101", "department": "内科", "cardType": "11", "cardChannel": "0100"
    })
}

pub async fn json_of(r: reqwest::Response) -> Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// The `ehc-agent` binary, with none of the caller's configuration or
/// systemd directories leaking in.
pub fn agent() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ehc-agent"));
    c.env_remove("EHC_AGENT_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY");
    c
}

/// A test that cannot run here says so. `needed_in_ci`: the tool is one
/// `.ci/run` installs (or CI's root has), so under CI (`CI=true`) the skip
/// is a failure rather than a test silently counted as passed.
pub fn skip(test: &str, reason: &str, needed_in_ci: bool) {
    if needed_in_ci && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} cannot run: {reason}; under CI this is a failure (.ci/run installs what it needs)");
    }
    eprintln!("SKIPPED {test}: {reason}");
    // The harness hides a passing test's output: the skip is also written
    // where `.ci/run` (or anyone) can count it after the run.
    let list = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("skipped-tests.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(list)
    {
        use std::io::Write as _;
        let _ = writeln!(f, "SKIPPED {test}: {reason}");
    }
}

/// A program on the PATH, by the first of `names` found.
pub fn find(names: &[&str]) -> Option<String> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
            .map(|p| p.display().to_string())
    })
}

/// A file of the repository's `examples/`.
pub fn example(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// Headless Chromium as this machine's closed network needs it (no
/// background connections, no sandbox as root, a fresh profile given by the
/// caller with `--user-data-dir`).
pub const HEADLESS_CHROMIUM: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// How a [`dying_relay`] connection dies under the request that arrives
/// after it is told to.
#[derive(Clone, Copy)]
pub enum Death {
    /// Before the request reaches the platform (a gateway killed while the
    /// agent held a pooled connection to it).
    Before,
    /// After the platform answered, the answer lost (a gateway killed
    /// mid-forward).
    After,
}

/// A relay in front of `upstream`: once `die` is set, the connection that
/// carries the next request dies as `death` says (and `die` is cleared).
/// Returns its address, `die` and the count of connections accepted.
pub async fn dying_relay(
    upstream: String,
    death: Death,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let die = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (die2, accepted2) = (die.clone(), accepted.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            accepted2.fetch_add(1, Ordering::SeqCst);
            let up = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let die = die2.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = up.into_split();
                // Answers pass back until the connection is to die; then
                // the next one is swallowed and reported.
                let swallow = Arc::new(AtomicBool::new(false));
                let (answered_tx, answered) = tokio::sync::oneshot::channel::<()>();
                let sw = swallow.clone();
                let back = tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(k) = ur.read(&mut buf).await {
                        if k == 0 {
                            break;
                        }
                        if sw.load(Ordering::SeqCst) {
                            let _ = answered_tx.send(());
                            return;
                        }
                        if cw.write_all(&buf[..k]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut buf = vec![0u8; 65536];
                while let Ok(k) = cr.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    if die
                        .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        if let Death::After = death {
                            swallow.store(true, Ordering::SeqCst);
                            let _ = uw.write_all(&buf[..k]).await;
                            let _ = answered.await;
                        }
                        break;
                    }
                    if uw.write_all(&buf[..k]).await.is_err() {
                        break;
                    }
                }
                back.abort();
                // Dropping both halves closes the connection unanswered.
            });
        }
    });
    (addr, die, accepted)
}

/// The value of the first sample of `series` (its name and labels, as
/// printed) in a Prometheus text exposition; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
