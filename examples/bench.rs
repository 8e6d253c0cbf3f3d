//! Benchmarks of ehc-agent, each figure printed beside the bound it is
//! measured against in the same run (docs/benchmarks.md has the results):
//!
//!     cargo run --release --example bench -- commit [--n 2000] [--dir D]
//!     cargo run --release --example bench -- drain [--rows 2000] [--latency-ms 50] [--concurrency 4]
//!     cargo run --release --example bench -- scan [--n 500] [--dir D]
//!
//! `commit`: uses committed per second (one transaction each, WAL +
//! synchronous=FULL) beside raw write+fdatasync per second on the same disk.
//! `drain`: upload rate of a backlog with the simulator answering after
//! `latency-ms`, beside the ideal `concurrency / round-trip`.
//! `scan`: scan-to-HIS latency (scan handed to the pipeline → `card` read by
//! an HIS client on the Unix socket) with the simulator at zero latency,
//! beside the platform call alone and one fsync.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ehc_agent::config::{self, Env, Secret};
use ehc_agent::outbox::uploader::{self, UploaderSettings};
use ehc_agent::outbox::{Kind, NewRow, Outbox};
use ehc_agent::platform::api::{GetHealthCardByQrCode, QrCodeReq};
use ehc_agent::platform::{CallOptions, Client, ClientSettings};
use ehc_agent::sim::{SimConfig, SimServer};
use tokio::io::AsyncBufReadExt as _;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    Commit {
        #[arg(long, default_value_t = 2000)]
        n: usize,
        /// Directory on the disk to measure (default: the current one).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    Drain {
        #[arg(long, default_value_t = 2000)]
        rows: usize,
        #[arg(long, default_value_t = 50)]
        latency_ms: u64,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    Scan {
        #[arg(long, default_value_t = 500)]
        n: usize,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// write(256 B) + fdatasync, `n` times: the disk's own bound.
fn raw_fsync(dir: &Path, n: usize) -> (f64, Vec<Duration>) {
    let path = dir.join("bench-fsync.tmp");
    let mut f = std::fs::File::create(&path).unwrap();
    let buf = [7u8; 256];
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&buf).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    lat.sort();
    (rate, lat)
}

fn row(qr: &str) -> NewRow {
    let now = ehc_agent::clock::now_unix();
    let req = serde_json::json!({
        "qrCodeText": qr, "time": ehc_agent::clock::platform_time(now, ehc_agent::clock::BEIJING),
        "hospitalId": ehc_agent::sim::config::DEFAULT_HOSPITAL_ID, "scene": "010101", "department": "内科",
        "cardType": "11", "cardChannel": "0100"
    });
    NewRow {
        request_id: ehc_agent::platform::client::new_request_id(),
        kind: Kind::Report,
        scan_id: "S".into(),
        payload: req.to_string(),
        created_at: now,
        wait_until: None,
    }
}

fn client_settings(sim: &SimServer) -> ClientSettings {
    ClientSettings {
        base_url: sim.base_url(),
        app_id: ehc_agent::sim::config::DEFAULT_APP_ID.into(),
        hospital_id: ehc_agent::sim::config::DEFAULT_HOSPITAL_ID.into(),
        secret: Secret::new(ehc_agent::sim::config::DEFAULT_APP_SECRET),
        scan_timeout: Duration::from_secs(5),
        upload_timeout: Duration::from_secs(30),
        proxy: None,
        ca_file: None,
        state_path: None,
    }
}

async fn commit(n: usize, dir: PathBuf) {
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let (raw_rate, raw_lat) = raw_fsync(tmp.path(), n);
    let outbox = Outbox::open(&tmp.path().join("outbox.sqlite")).unwrap();
    let qr = format!("{}:1", "A1".repeat(32));
    let mut lat = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        assert!(outbox.record(vec![row(&qr)]).await);
        lat.push(t.elapsed());
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    lat.sort();
    println!("disk: {}", dir.canonicalize().unwrap_or(dir).display());
    println!(
        "raw write+fdatasync:   {raw_rate:>8.0} /s   p50 {}  p99 {}",
        ms(percentile(&raw_lat, 0.5)),
        ms(percentile(&raw_lat, 0.99))
    );
    println!(
        "uses committed:        {rate:>8.0} /s   p50 {}  p99 {}   ({:.0}% of raw fsync rate)",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        100.0 * rate / raw_rate
    );
}

async fn drain(rows: usize, latency_ms: u64, concurrency: usize) {
    let mut cfg = SimConfig::default();
    cfg.faults.latency_ms = latency_ms;
    let sim = SimServer::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client = Client::new(client_settings(&sim)).unwrap();
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    // The round trip of one upload, token already held.
    let rtt_client = client.clone();
    let one = || async {
        let t = Instant::now();
        rtt_client
            .call::<ehc_agent::platform::api::ReportHisData>(
                &serde_json::from_value(serde_json::from_str(&row(&qr).payload).unwrap()).unwrap(),
                CallOptions::upload(ehc_agent::platform::client::new_request_id()),
            )
            .await
            .unwrap();
        t.elapsed()
    };
    one().await;
    let mut rtts = Vec::new();
    for _ in 0..10 {
        rtts.push(one().await);
    }
    rtts.sort();
    let rtt = percentile(&rtts, 0.5);
    let tmp = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&tmp.path().join("outbox.sqlite")).unwrap();
    let all: Vec<NewRow> = (0..rows).map(|_| row(&qr)).collect();
    outbox.with_store(move |s| s.insert(&all)).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let t0 = Instant::now();
    tokio::spawn(uploader::run(
        outbox.clone(),
        client,
        UploaderSettings {
            batch: 50,
            concurrency,
            retention_days: 7,
            clock: uploader::wall_clock(),
        },
        cancel.clone(),
    ));
    loop {
        let c = outbox.counts().await.unwrap();
        if c.pending == 0 {
            break;
        }
        outbox.next_pass(Duration::from_secs(1)).await;
    }
    let took = t0.elapsed();
    cancel.cancel();
    let rate = rows as f64 / took.as_secs_f64();
    let ideal = concurrency as f64 / rtt.as_secs_f64();
    println!(
        "simulator latency {latency_ms} ms; measured upload round trip p50 {}",
        ms(rtt)
    );
    println!("drained {rows} rows in {:.2} s: {rate:.1} rows/s; ideal concurrency/RTT = {concurrency}/{} = {ideal:.1} rows/s ({:.0}%)", took.as_secs_f64(), ms(rtt), 100.0 * rate / ideal);
}

async fn scan(n: usize, dir: PathBuf) {
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let sim = Arc::new(
        SimServer::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap(),
    );
    let secret = tmp.path().join("app_secret");
    std::fs::write(&secret, ehc_agent::sim::config::DEFAULT_APP_SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "[platform]\nbase_url = \"{}\"\napp_id = \"{}\"\napp_secret_file = \"app_secret\"\nhospital_id = \"{}\"\n\
         [terminal]\nid = \"B\"\ndepartment = \"内科\"\ncity_code = \"1\"\ncity_name = \"c\"\nhospital_code = \"h\"\nhospital_name = \"h\"\n\
         [his]\nlisten_unix = \"his.sock\"\n[outbox]\npath = \"outbox.sqlite\"\n",
        sim.base_url(),
        ehc_agent::sim::config::DEFAULT_APP_ID,
        ehc_agent::sim::config::DEFAULT_HOSPITAL_ID
    );
    let cfg = config::parse(&text, tmp.path(), &Env::default()).unwrap();
    let app = ehc_agent::app::App::start(&cfg).await.unwrap();
    let stream = tokio::net::UnixStream::connect(app.his_unix.as_ref().unwrap())
        .await
        .unwrap();
    let mut lines = tokio::io::BufReader::new(stream).lines();
    lines.next_line().await.unwrap(); // hello
    let qr = sim.with_state(|s| s.static_code(0)).unwrap();
    // The platform call alone, for comparison.
    let client = Client::new(client_settings(&sim)).unwrap();
    let req = QrCodeReq {
        qr_code_text: qr.clone(),
    };
    client
        .call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
        .await
        .unwrap();
    let mut platform = Vec::new();
    for _ in 0..n.min(200) {
        let t = Instant::now();
        client
            .call::<GetHealthCardByQrCode>(&req, CallOptions::scan())
            .await
            .unwrap();
        platform.push(t.elapsed());
    }
    platform.sort();
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n + 10 {
        let t = Instant::now();
        app.scans
            .send(ehc_agent::scanner::Scan {
                scanner: "bench".into(),
                text: qr.clone(),
                at: ehc_agent::clock::now_unix(),
            })
            .await
            .unwrap();
        loop {
            let l = lines.next_line().await.unwrap().unwrap();
            if l.contains("\"type\":\"card\"") {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    let lat: Vec<Duration> = {
        let mut v = lat.split_off(10); // warm-up dropped
        v.sort();
        v
    };
    let (_, fsync) = raw_fsync(tmp.path(), 200);
    app.shutdown().await;
    println!("scan-to-HIS (scan in → card read on the Unix socket), {n} scans, simulator at zero latency:");
    println!(
        "  total            p50 {}  p99 {}",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99))
    );
    println!(
        "  platform call    p50 {}  p99 {}  (getHealthCardByQRCode to the simulator alone)",
        ms(percentile(&platform, 0.5)),
        ms(percentile(&platform, 0.99))
    );
    println!(
        "  agent's own      p50 {}  (total minus platform call, medians)",
        ms(percentile(&lat, 0.5).saturating_sub(percentile(&platform, 0.5)))
    );
    println!(
        "  one fdatasync    p50 {}  p99 {}  (the bound of the commit before delivery)",
        ms(percentile(&fsync, 0.5)),
        ms(percentile(&fsync, 0.99))
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    match Args::parse().what {
        What::Commit { n, dir } => commit(n, dir).await,
        What::Drain {
            rows,
            latency_ms,
            concurrency,
        } => drain(rows, latency_ms, concurrency).await,
        What::Scan { n, dir } => scan(n, dir).await,
    }
}
