//! `bench coldscan`: what a scan costs after the counter was idle.
//!
//! The simulator serves HTTPS (as the platform does) and closes connections
//! idle for 60 s (as the platform's front end does); a proxy adds the RTT,
//! handshakes included ([`ehc_agent::sim::delay`]). Each agent is the real
//! `App` with its stdin-scanner framing fed one character every `char_us`,
//! so the first byte of a code arrives before the rest, as from a scanner.
//! Scan-to-HIS is timed from the code's last byte (the Enter) to the `card`
//! line read on the HIS Unix socket. Beside it, in the same run: one warm
//! platform call through the same proxy (the floor: one round trip).
//!
//! Every (variant, RTT, gap) runs on `lanes` agents at once, their scans
//! staggered so they do not coincide; each agent makes one unmeasured scan
//! first (token, first connection), and measuring starts 10 s after the
//! last agent is ready. Each agent runs on a thread and runtime
//! of its own, and so does each proxy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ehc_agent::platform::api::{GetHealthCardByQrCode, QrCodeReq};
use ehc_agent::platform::{CallOptions, Client};
use ehc_agent::sim::delay::DelayProxy;
use ehc_agent::sim::{SimConfig, SimServer};
use tokio::io::AsyncWriteExt as _;

use super::{client_settings, ms, percentile};

/// Each scan's `scan done` line (its `ms`, `platform_ms`, `commit_ms`),
/// by scanId: the agents' own account of where a slow scan's time went.
static STAGES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, [f64; 3]>>> =
    std::sync::LazyLock::new(Default::default);

/// A tracing layer that keeps only the pipeline's `scan done` lines: every
/// other callsite is disabled, so the agents log nothing else.
struct ScanDone;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ScanDone {
    fn register_callsite(
        &self,
        m: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if m.target() == "ehc_agent::agent::pipeline" && *m.level() == tracing::Level::INFO {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct V {
            done: bool,
            id: String,
            f: [f64; 3],
        }
        impl tracing::field::Visit for V {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                match f.name() {
                    "message" => self.done = format!("{v:?}") == "scan done",
                    "scan_id" => self.id = format!("{v:?}"),
                    _ => {}
                }
            }
            fn record_f64(&mut self, f: &tracing::field::Field, v: f64) {
                let i = ["ms", "platform_ms", "commit_ms"]
                    .iter()
                    .position(|n| *n == f.name());
                if let Some(i) = i {
                    self.f[i] = v;
                }
            }
        }
        let mut v = V::default();
        e.record(&mut v);
        if v.done {
            STAGES.lock().unwrap().insert(v.id, v.f);
        }
    }
}

fn stages(id: &str) -> Option<[f64; 3]> {
    STAGES.lock().unwrap().get(id).copied()
}

/// Warm calls measured after a pause, and the pause (below the pool's
/// idle timeout and the simulator's keep-alive: the connection stays open).
const IDLE_CALLS: usize = 10;
const IDLE: Duration = Duration::from_secs(5);
/// Quiet between every agent's start and the first measured scan.
const SETTLE: Duration = Duration::from_secs(10);

struct Variant {
    name: &'static str,
    preconnect: bool,
    keep_warm_min: u64,
    /// Through a gateway (its own defaults towards the platform).
    gateway: bool,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        name: "none",
        preconnect: false,
        keep_warm_min: 0,
        gateway: false,
    },
    Variant {
        name: "preconnect",
        preconnect: true,
        keep_warm_min: 0,
        gateway: false,
    },
    Variant {
        name: "warm",
        preconnect: true,
        keep_warm_min: 240,
        gateway: false,
    },
    Variant {
        name: "gateway",
        preconnect: true,
        keep_warm_min: 240,
        gateway: true,
    },
];

/// A gateway in `dir` towards the platform at `upstream` (over TLS,
/// trusting `ca`), with its default warm-keeping; returns it and one
/// terminal enrolled there (appId, secret).
async fn gateway(
    dir: &std::path::Path,
    upstream: &str,
    ca: &std::path::Path,
) -> (ehc_agent::gateway::RunningGateway, (String, String)) {
    use std::os::unix::fs::PermissionsExt as _;
    let secret = dir.join("upstream_secret");
    std::fs::write(&secret, ehc_agent::sim::config::DEFAULT_APP_SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\n[upstream]\nbase_url = \"{upstream}\"\n\
         app_id = \"{}\"\nhospital_id = \"{}\"\napp_secret_file = \"upstream_secret\"\nca_file = \"{}\"\n",
        ehc_agent::sim::config::DEFAULT_APP_ID,
        ehc_agent::sim::config::DEFAULT_HOSPITAL_ID,
        ca.display()
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = ehc_agent::gateway::config::load(Some(&path), &Default::default()).unwrap();
    let gw = ehc_agent::gateway::RunningGateway::start(cfg)
        .await
        .unwrap();
    let t = gw
        .store
        .add_terminal("bench", ehc_agent::clock::now_unix())
        .unwrap();
    (gw, (t.app_id, t.secret))
}

fn mint(sim: &SimServer) -> String {
    sim.with_state(|s| s.mint(0, Some(7200), ehc_agent::clock::now_unix()))
        .expect("card 0")
        .0
}

/// Type `code` and Enter into `w`, the i-th character at `i × char_us`
/// from the first (a schedule, not a sleep per character: sleeps round up to
/// the timer's millisecond and would add up). Returns (first byte, Enter).
async fn type_code(
    w: &mut tokio::io::DuplexStream,
    code: &str,
    char_us: u64,
) -> (Instant, Instant) {
    let first = tokio::time::Instant::now();
    for (i, b) in code.bytes().enumerate() {
        tokio::time::sleep_until(first + Duration::from_micros(char_us * i as u64)).await;
        w.write_all(&[b]).await.unwrap();
    }
    tokio::time::sleep_until(first + Duration::from_micros(char_us * code.len() as u64)).await;
    w.write_all(b"\n").await.unwrap();
    (first.into_std(), Instant::now())
}

/// Read HIS lines up to the next card; its scanId.
async fn until_card(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::UnixStream>>,
) -> String {
    loop {
        let l = lines.next_line().await.unwrap().expect("HIS socket open");
        if l.contains("\"type\":\"card\"") {
            let v: serde_json::Value = serde_json::from_str(&l).expect("a card is JSON");
            return v["scanId"].as_str().unwrap_or_default().to_owned();
        }
        assert!(!l.contains("\"type\":\"scanFailed\""), "a scan failed: {l}");
    }
}

/// The round trip the proxy actually delivers (its timers round up to the
/// millisecond): 100 bytes there and back over one connection to an echo
/// server, 100 times.
async fn ping_pong(rtt: Duration) -> Vec<Duration> {
    use tokio::io::AsyncReadExt as _;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = echo.accept().await.unwrap();
        let mut buf = [0u8; 100];
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let p = DelayProxy::start("127.0.0.1:0".parse().unwrap(), at, rtt)
        .await
        .unwrap();
    let mut c = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 100];
    for _ in 0..100 {
        let t = Instant::now();
        c.write_all(&[7u8; 100]).await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        out.push(t.elapsed());
    }
    out.sort();
    out
}

/// A TLS simulator of its own (agents sharing an appId would revoke each
/// other's tokens: the gateway's reason to be) behind a proxy adding `rtt`.
async fn platform(
    tls: &ehc_agent::gateway::tls::TlsFiles,
    rtt: Duration,
) -> (SimServer, DelayProxy) {
    let acceptor = ehc_agent::gateway::tls::acceptor(&tls.cert, &tls.key).unwrap();
    let sim = SimServer::start_with(
        SimConfig::default(),
        "127.0.0.1:0".parse().unwrap(),
        Some(acceptor),
    )
    .await
    .unwrap();
    let p = DelayProxy::start("127.0.0.1:0".parse().unwrap(), sim.addr, rtt)
        .await
        .unwrap();
    (sim, p)
}

#[allow(clippy::too_many_arguments)]
async fn lane(
    tls: Arc<ehc_agent::gateway::tls::TlsFiles>,
    rtt: Duration,
    v: &Variant,
    gap: Duration,
    scans: usize,
    offset: Duration,
    char_us: u64,
    ready: Arc<tokio::sync::Barrier>,
) -> (Vec<(Duration, Duration, String)>, (u64, u64)) {
    let (sim, proxy) = platform(&tls, rtt).await;
    let (ca, upstream) = (&tls.ca_cert, format!("https://{}", proxy.addr));
    let tmp = tempfile::tempdir().unwrap();
    let settings = format!(
        "preconnect = {}\nkeep_warm_min = {}",
        v.preconnect, v.keep_warm_min
    );
    let gw = if v.gateway {
        Some(gateway(tmp.path(), &upstream, ca).await)
    } else {
        None
    };
    let (app, mut lines) = match &gw {
        // The terminal talks to the gateway on loopback (a hospital LAN's
        // fraction of a millisecond is not simulated), the gateway to the
        // platform through the proxy.
        Some((gw, (id, secret))) => {
            super::in_process_agent(
                tmp.path(),
                &gw.base_url(),
                Some((id.as_str(), secret.as_str())),
                &settings,
            )
            .await
        }
        None => {
            let extra = format!("ca_file = \"{}\"\n{settings}", ca.display());
            super::in_process_agent(tmp.path(), &upstream, None, &extra).await
        }
    };
    let (mut w, r) = tokio::io::duplex(4096);
    let (tx, arrivals) = (app.scans.clone(), app.scanners.arrivals());
    tokio::spawn(ehc_agent::agent::scanner::stdin::run_mapped(
        "bench".into(),
        r,
        Duration::ZERO,
        tx,
        arrivals,
        |s| s,
    ));
    // Unmeasured: the token and the first connection.
    let _ = type_code(&mut w, &mint(&sim), char_us).await;
    let _ = until_card(&mut lines).await;
    // Measuring starts when every agent has started and the start's
    // storm (hundreds of handshakes and first scans) has passed.
    ready.wait().await;
    tokio::time::sleep(SETTLE + offset).await;
    let mut out = Vec::with_capacity(scans);
    for _ in 0..scans {
        tokio::time::sleep(gap).await;
        let code = mint(&sim);
        let (first, end) = type_code(&mut w, &code, char_us).await;
        let id = until_card(&mut lines).await;
        out.push((end.elapsed(), end - first, id));
    }
    drop(w);
    app.shutdown().await;
    if let Some((gw, _)) = gw {
        gw.stop().await;
    }
    let hs = sim.handshakes().unwrap_or_default();
    sim.stop().await;
    (out, hs)
}

pub async fn run(
    gaps: Vec<u64>,
    rtts: Vec<u64>,
    n: usize,
    lanes: usize,
    char_us: u64,
    variants: Vec<String>,
) {
    let lanes = lanes.max(1);
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        let _ =
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(ScanDone));
    }
    let tls_dir = tempfile::tempdir().unwrap();
    let files =
        Arc::new(ehc_agent::gateway::tls::init(tls_dir.path(), &["127.0.0.1".into()]).unwrap());
    let keepalive = SimConfig::default().keepalive_s;
    // The floor: warm calls through a proxy of each RTT.
    let mut floors = Vec::new();
    let mut code_len = 0;
    for &rtt in &rtts {
        let measured = ping_pong(Duration::from_millis(rtt)).await;
        let (sim, p) = platform(&files, Duration::from_millis(rtt)).await;
        code_len = mint(&sim).len();
        let mut s = client_settings(&sim);
        s.base_url = format!("https://{}", p.addr);
        s.ca_file = Some(files.ca_cert.clone());
        let c = Client::new(s).unwrap();
        let mut v = Vec::new();
        let req = QrCodeReq {
            qr_code_text: sim.with_state(|s| s.static_code(0)).unwrap(),
        };
        for i in 0..101 {
            let t = Instant::now();
            c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
                .await
                .unwrap();
            if i > 0 {
                v.push(t.elapsed());
            }
        }
        v.sort();
        // The same warm call after `IDLE` of quiet on a connection still
        // open: what idleness costs a request on this machine by itself
        // (timers, sleeping cores), with no cold connection involved.
        let mut after_idle = Vec::new();
        for _ in 0..IDLE_CALLS {
            tokio::time::sleep(IDLE).await;
            let t = Instant::now();
            c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
                .await
                .unwrap();
            after_idle.push(t.elapsed());
        }
        after_idle.sort();
        floors.push((rtt, percentile(&v, 0.5), percentile(&v, 0.99)));
        println!(
            "RTT {rtt} ms as the proxy delivers it (100-byte ping-pong, {} rounds): p50 {} p99 {}",
            measured.len(),
            ms(percentile(&measured, 0.5)),
            ms(percentile(&measured, 0.99))
        );
        println!(
            "warm call at {rtt} ms RTT: back to back p50 {} p99 {}; after {} s idle ({IDLE_CALLS} calls) p50 {} max {}",
            ms(percentile(&v, 0.5)),
            ms(percentile(&v, 0.99)),
            IDLE.as_secs(),
            ms(percentile(&after_idle, 0.5)),
            ms(*after_idle.last().unwrap())
        );
        sim.stop().await;
    }
    let chosen: Vec<&Variant> = VARIANTS
        .iter()
        .filter(|v| variants.iter().any(|n| n == v.name))
        .collect();
    let per_lane = n.div_ceil(lanes);
    let longest = gaps.iter().max().copied().unwrap_or(0);
    println!(
        "coldscan: {} variant(s) × RTT {:?} ms × gaps {:?} s, {} scans each on {lanes} agents; \
         codes of {code_len} characters at {char_us} µs each ({} ms); simulator over TLS closes idle \
         connections after {keepalive} s; about {} min",
        chosen.len(),
        rtts,
        gaps,
        per_lane * lanes,
        code_len as u64 * char_us / 1000,
        (per_lane as u64 * longest + 60) / 60 + 1
    );
    let mut jobs = Vec::new();
    let ready = Arc::new(tokio::sync::Barrier::new(
        chosen.len() * rtts.len() * gaps.len() * lanes,
    ));
    for v in &chosen {
        for &rtt in &rtts {
            for &gap in &gaps {
                for k in 0..lanes {
                    let (files, ready) = (files.clone(), ready.clone());
                    let v: &'static Variant = VARIANTS.iter().find(|x| x.name == v.name).unwrap();
                    // Lanes of one gap take turns: spread over the gap
                    // (and over 2 s when the gap is shorter).
                    let spread = Duration::from_secs(gap.max(2));
                    let offset = spread * k as u32 / lanes as u32
                        + Duration::from_millis(37 * jobs.len() as u64 % 1000);
                    // Each agent (with its simulator) on a thread and
                    // runtime of its own, as on its own PC: the kernel
                    // preempts, where tasks on one shared runtime would
                    // queue behind each other's work.
                    jobs.push(tokio::task::spawn_blocking(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        let got = rt.block_on(lane(
                            files,
                            Duration::from_millis(rtt),
                            v,
                            Duration::from_secs(gap),
                            per_lane,
                            offset,
                            char_us,
                            ready,
                        ));
                        (v.name, rtt, gap, got)
                    }));
                }
            }
        }
    }
    // (variant, RTT, gap) → (scan-to-HIS, scanId) of every scan.
    type Cells = std::collections::BTreeMap<(&'static str, u64, u64), Vec<(Duration, String)>>;
    let mut results: Cells = Default::default();
    let mut typing: Vec<Duration> = Vec::new();
    let (mut full, mut resumed) = (0, 0);
    for j in jobs {
        let (name, rtt, gap, (got, (f, r))) = j.await.unwrap();
        typing.extend(got.iter().map(|(_, t, _)| *t));
        results
            .entry((name, rtt, gap))
            .or_default()
            .extend(got.into_iter().map(|(d, _, id)| (d, id)));
        full += f;
        resumed += r;
    }
    println!("| variant | RTT | warm call p50 / p99 | idle gap | scans | p50 | p99 | p99 − RTT | p99 − warm call p50 | slowest: platform / commit / rest |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for v in &chosen {
        for (rtt, floor, floor99) in &floors {
            for &gap in &gaps {
                let mut scans = results.remove(&(v.name, *rtt, gap)).unwrap_or_default();
                scans.sort();
                let Some((slowest, id)) = scans.last() else {
                    continue;
                };
                // The slowest scan by the agent's own account: the
                // platform call (network, connection), the commit (fsync),
                // and the rest (framing, HIS socket, this harness).
                let split = match stages(id) {
                    Some([_, p, c]) => format!(
                        "{p:.1} / {c:.1} / {:.1} ms",
                        slowest.as_secs_f64() * 1000.0 - p - c
                    ),
                    None => "(no scan done line)".into(),
                };
                let d: Vec<Duration> = scans.iter().map(|(d, _)| *d).collect();
                let p99 = percentile(&d, 0.99);
                println!(
                    "| {} | {rtt} ms | {} / {} | {gap} s | {} | {} | {} | {:+.1} ms | {:+.1} ms | {split} |",
                    v.name,
                    ms(*floor),
                    ms(*floor99),
                    d.len(),
                    ms(percentile(&d, 0.5)),
                    ms(p99),
                    p99.as_secs_f64() * 1000.0 - *rtt as f64,
                    (p99.as_secs_f64() - floor.as_secs_f64()) * 1000.0
                );
            }
        }
    }
    typing.sort();
    println!(
        "first byte to Enter: p50 {}, max {}; TLS handshakes at the simulators: {full} full, {resumed} resumed",
        ms(percentile(&typing, 0.5)),
        ms(*typing.last().unwrap_or(&Duration::ZERO))
    );
}
