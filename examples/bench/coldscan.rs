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
//! first (token, first connection).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ehc_agent::platform::api::{GetHealthCardByQrCode, QrCodeReq};
use ehc_agent::platform::{CallOptions, Client};
use ehc_agent::sim::delay::DelayProxy;
use ehc_agent::sim::{SimConfig, SimServer};
use tokio::io::AsyncWriteExt as _;

use super::{client_settings, ms, percentile};

struct Variant {
    name: &'static str,
    preconnect: bool,
    keep_warm_min: u64,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "none",
        preconnect: false,
        keep_warm_min: 0,
    },
    Variant {
        name: "preconnect",
        preconnect: true,
        keep_warm_min: 0,
    },
    Variant {
        name: "warm",
        preconnect: true,
        keep_warm_min: 120,
    },
];

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

async fn until_card(lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::net::UnixStream>>) {
    loop {
        let l = lines.next_line().await.unwrap().expect("HIS socket open");
        if l.contains("\"type\":\"card\"") {
            return;
        }
        assert!(!l.contains("\"type\":\"scanFailed\""), "a scan failed: {l}");
    }
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
) -> (Vec<(Duration, Duration)>, (u64, u64)) {
    let (sim, proxy) = platform(&tls, rtt).await;
    let (ca, base) = (&tls.ca_cert, format!("https://{}", proxy.addr));
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!(
        "ca_file = \"{}\"\npreconnect = {}\nkeep_warm_min = {}",
        ca.display(),
        v.preconnect,
        v.keep_warm_min
    );
    let (app, mut lines) = super::in_process_agent(tmp.path(), &base, &extra).await;
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
    until_card(&mut lines).await;
    tokio::time::sleep(offset).await;
    let mut out = Vec::with_capacity(scans);
    for _ in 0..scans {
        tokio::time::sleep(gap).await;
        let code = mint(&sim);
        let (first, end) = type_code(&mut w, &code, char_us).await;
        until_card(&mut lines).await;
        out.push((end.elapsed(), end - first));
    }
    drop(w);
    app.shutdown().await;
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
    let tls_dir = tempfile::tempdir().unwrap();
    let files =
        Arc::new(ehc_agent::gateway::tls::init(tls_dir.path(), &["127.0.0.1".into()]).unwrap());
    let keepalive = SimConfig::default().keepalive_s;
    // The floor: warm calls through a proxy of each RTT.
    let mut floors = Vec::new();
    let mut code_len = 0;
    for &rtt in &rtts {
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
        for i in 0..21 {
            let t = Instant::now();
            c.call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
                .await
                .unwrap();
            if i > 0 {
                v.push(t.elapsed());
            }
        }
        v.sort();
        floors.push((rtt, percentile(&v, 0.5)));
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
    for v in &chosen {
        for &rtt in &rtts {
            for &gap in &gaps {
                for k in 0..lanes {
                    let files = files.clone();
                    let v: &'static Variant = VARIANTS.iter().find(|x| x.name == v.name).unwrap();
                    // Lanes of one gap take turns: spread over the gap
                    // (and over 2 s when the gap is shorter).
                    let spread = Duration::from_secs(gap.max(2));
                    let offset = spread * k as u32 / lanes as u32
                        + Duration::from_millis(37 * jobs.len() as u64 % 1000);
                    jobs.push(tokio::spawn(async move {
                        let got = lane(
                            files,
                            Duration::from_millis(rtt),
                            v,
                            Duration::from_secs(gap),
                            per_lane,
                            offset,
                            char_us,
                        )
                        .await;
                        (v.name, rtt, gap, got)
                    }));
                }
            }
        }
    }
    let mut results: std::collections::BTreeMap<(&str, u64, u64), Vec<Duration>> =
        Default::default();
    let mut typing: Vec<Duration> = Vec::new();
    let (mut full, mut resumed) = (0, 0);
    for j in jobs {
        let (name, rtt, gap, (got, (f, r))) = j.await.unwrap();
        typing.extend(got.iter().map(|(_, t)| *t));
        results
            .entry((name, rtt, gap))
            .or_default()
            .extend(got.into_iter().map(|(d, _)| d));
        full += f;
        resumed += r;
    }
    println!("| variant | RTT | warm call (p50) | idle gap | scans | p50 | p99 | p99 − RTT | p99 − warm call |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for v in &chosen {
        for (rtt, floor) in &floors {
            for &gap in &gaps {
                let mut d = results.remove(&(v.name, *rtt, gap)).unwrap_or_default();
                d.sort();
                if d.is_empty() {
                    continue;
                }
                let p99 = percentile(&d, 0.99);
                println!(
                    "| {} | {rtt} ms | {} | {gap} s | {} | {} | {} | {:+.1} ms | {:+.1} ms |",
                    v.name,
                    ms(*floor),
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
