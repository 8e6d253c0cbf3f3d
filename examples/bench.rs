//! Benchmarks of ehc-agent, each figure printed beside the bound it is
//! measured against in the same run (docs/benchmarks.md has the results):
//!
//!     cargo run --release --example bench -- commit [--n 2000] [--dir D]
//!     cargo run --release --example bench -- drain [--rows 2000] [--latency-ms 50] [--concurrency 4]
//!     cargo run --release --example bench -- scan [--n 500] [--dir D]
//!     cargo build --release && cargo run --release --example bench -- ready [--n 20]
//!     cargo build --release && cargo run --release --example bench -- idle [--seconds 60]
//!     cargo build --release && cargo run --release --example bench -- gateway [--terminals 500] [--calls 20000] [--concurrency 64]
//!     cargo run --release --example bench -- coldscan [--gaps 0,2,65,300] [--rtts 20,100] [--n 20] [--lanes 5] [--char-us 1000]
//!
//! `commit`: uses committed per second (one transaction each, WAL +
//! synchronous=FULL) beside raw write+fdatasync per second on the same disk.
//! `drain`: upload rate of a backlog with the simulator answering after
//! `latency-ms`, beside the ideal `concurrency / round-trip`.
//! `scan`: scan-to-HIS latency (scan handed to the pipeline → `card` read by
//! an HIS client on the Unix socket) with the simulator at zero latency,
//! beside the platform call alone and one fsync.
//! `ready`: from exec of `ehc-agent run` to its `READY=1` on NOTIFY_SOCKET,
//! beside exec to exit of `ehc-agent --version` (what starting any process
//! of this binary costs).
//! `idle`: the daemon with a configuration like a window's (HIS socket,
//! TCP, metrics), no scans: resident memory, and context switches per second
//! (wakeups) and CPU time over `seconds`, from /proc.
//! `gateway`: `terminals` simulated terminals (each signs with its own
//! credentials, as an agent does) call getHealthCardByQRCode through one
//! `ehc-agent gateway` process, `concurrency` in flight; latency beside the
//! same calls made directly to the simulator in the same run, calls per
//! second, and the gateway's CPU time and resident memory from /proc.
//! `coldscan`: scan-to-HIS over HTTPS through a proxy that adds an RTT, for
//! scans after idle gaps, beside a warm call's time through the same proxy
//! (the one-round-trip floor); codes are typed into the agent's scanner
//! framing a character at a time, as a scanner sends them.

#[path = "bench/coldscan.rs"]
mod coldscan;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ehc_agent::agent::outbox::uploader::{self, UploaderSettings};
use ehc_agent::agent::outbox::{Kind, NewRow, Outbox};
use ehc_agent::config::{self, Env, Secret};
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
    Gateway {
        #[arg(long, default_value_t = 500)]
        terminals: usize,
        #[arg(long, default_value_t = 20000)]
        calls: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
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
    Ready {
        #[arg(long, default_value_t = 20)]
        n: usize,
    },
    Idle {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    Coldscan {
        /// Idle gaps before each measured scan (seconds).
        #[arg(long, value_delimiter = ',', default_value = "0,2,65,300")]
        gaps: Vec<u64>,
        /// Round-trip times added by the proxy (milliseconds).
        #[arg(long, value_delimiter = ',', default_value = "20,100")]
        rtts: Vec<u64>,
        /// Measured scans per variant, RTT and gap.
        #[arg(long, default_value_t = 20)]
        n: usize,
        /// Agents per variant, RTT and gap, scanning in turn (more lanes:
        /// the long gaps take less wall time).
        #[arg(long, default_value_t = 5)]
        lanes: usize,
        /// Time between the characters of a code (1000 µs: a 9600-baud
        /// serial scanner; keyboard wedges take 2000–5000).
        #[arg(long, default_value_t = 1000)]
        char_us: u64,
        /// none (no pre-connect, no keep-warm), preconnect (first byte
        /// only), warm (both: the default configuration), gateway (the
        /// default configuration towards a gateway on loopback, the RTT
        /// between gateway and simulator).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "none,preconnect,warm,gateway"
        )]
        variants: Vec<String>,
    },
}

/// The release binary next to this example.
fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("ehc-agent"))
        .unwrap();
    assert!(
        bin.exists(),
        "build the agent first: cargo build --release ({} missing)",
        bin.display()
    );
    bin
}

/// A window-like configuration for a daemon against `sim`, in `dir`.
fn write_config(dir: &Path, sim: &SimServer, extra: &str) -> PathBuf {
    let secret = dir.join("app_secret");
    std::fs::write(&secret, ehc_agent::sim::config::DEFAULT_APP_SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[platform]\nbase_url = \"{}\"\napp_id = \"{}\"\napp_secret_file = \"app_secret\"\nhospital_id = \"{}\"\n\
             [terminal]\nid = \"B\"\ndepartment = \"内科\"\ncity_code = \"1\"\ncity_name = \"c\"\nhospital_code = \"h\"\nhospital_name = \"h\"\n\
             [his]\nlisten_unix = \"his.sock\"\nlisten_tcp = \"127.0.0.1:0\"\n[outbox]\npath = \"outbox.sqlite\"\n{extra}",
            sim.base_url(),
            ehc_agent::sim::config::DEFAULT_APP_ID,
            ehc_agent::sim::config::DEFAULT_HOSPITAL_ID
        ),
    )
    .unwrap();
    cfg
}

/// Start the daemon with a NOTIFY_SOCKET; return it once READY=1 arrived,
/// with the time that took.
fn start_until_ready(dir: &Path, cfg: &Path) -> (std::process::Child, Duration) {
    let sock_path = dir.join(format!("notify-{}.sock", rand_suffix()));
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let t = Instant::now();
    let child = std::process::Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = child;
    let mut buf = [0u8; 4096];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => {
                return (child, t.elapsed())
            }
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no READY=1 within 30 s: {e}");
            }
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn stop(mut child: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

async fn ready(n: usize) {
    let sim = SimServer::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut exec = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        assert!(std::process::Command::new(agent_bin())
            .arg("--version")
            .output()
            .unwrap()
            .status
            .success());
        exec.push(t.elapsed());
    }
    let mut lat = Vec::new();
    for _ in 0..n {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = write_config(tmp.path(), &sim, "");
        let (child, took) = tokio::task::block_in_place(|| start_until_ready(tmp.path(), &cfg));
        lat.push(took);
        stop(child);
    }
    exec.sort();
    lat.sort();
    println!("start-to-READY (exec → READY=1, fresh outbox each run), {n} runs:");
    println!(
        "  ehc-agent run      p50 {}  max {}",
        ms(percentile(&lat, 0.5)),
        ms(*lat.last().unwrap())
    );
    println!(
        "  ehc-agent --version (exec → exit) p50 {}  max {}",
        ms(percentile(&exec, 0.5)),
        ms(*exec.last().unwrap())
    );
}

/// Context switches (voluntary + involuntary) of every thread of `pid`.
fn switches(pid: u32) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(t.path().join("status")) {
            for l in s.lines() {
                if l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
                {
                    total += l
                        .split_whitespace()
                        .last()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    total
}

fn proc_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_owned())
        .unwrap_or_default()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

async fn idle(seconds: u64) {
    let sim = SimServer::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), &sim, "[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let (child, took) = tokio::task::block_in_place(|| start_until_ready(tmp.path(), &cfg));
    let pid = child.id();
    // Let start-up settle (first token fetch, first uploader pass).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (sw0, cpu0) = (switches(pid), cpu_ticks(pid));
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (sw1, cpu1) = (switches(pid), cpu_ticks(pid));
    let threads = proc_field(pid, "Threads:");
    println!("idle daemon (HIS unix + TCP, metrics, no scanner devices, no scans), {seconds} s, ready after {}:", ms(took));
    println!(
        "  resident memory   VmRSS {}  (peak VmHWM {})",
        proc_field(pid, "VmRSS:"),
        proc_field(pid, "VmHWM:")
    );
    println!("  threads           {threads}");
    println!(
        "  wakeups           {:.2} context switches/s (all threads)",
        (sw1 - sw0) as f64 / seconds as f64
    );
    println!("  CPU time          {} ticks in {seconds} s", cpu1 - cpu0);
    stop(child);
}

/// `calls` getHealthCardByQRCode from `clients` (round robin), at most
/// `concurrency` in flight: sorted latencies and the wall time.
async fn load(
    clients: &[Client],
    req: &QrCodeReq,
    calls: usize,
    concurrency: usize,
) -> (Vec<Duration>, Duration) {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(calls);
    for i in 0..calls {
        let (c, r, sem) = (clients[i % clients.len()].clone(), req.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            let t = Instant::now();
            c.call::<GetHealthCardByQrCode>(&r, CallOptions::scan())
                .await
                .expect("call succeeds");
            t.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(calls);
    for t in tasks {
        lat.push(t.await.unwrap());
    }
    let wall = started.elapsed();
    lat.sort();
    (lat, wall)
}

async fn gateway(terminals: usize, calls: usize, concurrency: usize) {
    let sim = SimServer::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // The direct calls go to a simulator of their own: with the same appId
    // they would revoke the gateway's token (the very problem it solves).
    let sim_direct = SimServer::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("upstream_secret");
    std::fs::write(&secret, ehc_agent::sim::config::DEFAULT_APP_SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\n[upstream]\nbase_url = \"{}\"\napp_id = \"{}\"\nhospital_id = \"{}\"\napp_secret_file = \"upstream_secret\"\n",
            sim.base_url(),
            ehc_agent::sim::config::DEFAULT_APP_ID,
            ehc_agent::sim::config::DEFAULT_HOSPITAL_ID,
        ),
    )
    .unwrap();
    // Enrol the terminals before the gateway starts (the same store file).
    let gcfg = ehc_agent::gateway::config::load(Some(&cfg), &Env::default()).unwrap();
    let store = ehc_agent::gateway::open_store(&gcfg).unwrap();
    let creds: Vec<_> = (0..terminals)
        .map(|i| store.add_terminal(&format!("T{i:04}"), 0).unwrap())
        .collect();
    drop(store);
    let mut child = std::process::Command::new(agent_bin())
        .args(["gateway", "run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pid = child.id();
    let base = format!("http://127.0.0.1:{port}");
    let settings = |base: &str, app_id: &str, secret: &str| ClientSettings {
        base_url: base.to_owned(),
        fallback_urls: Vec::new(),
        shared: None,
        app_id: app_id.to_owned(),
        hospital_id: ehc_agent::sim::config::DEFAULT_HOSPITAL_ID.into(),
        secret: Secret::new(secret),
        scan_timeout: Duration::from_secs(10),
        upload_timeout: Duration::from_secs(10),
        proxy: None,
        ca_file: None,
        warm: Duration::from_secs(25),
        keep_warm: Duration::ZERO,
        preconnect: true,
        state_path: None,
    };
    let via: Vec<Client> = creds
        .iter()
        .map(|t| Client::new(settings(&base, &t.app_id, &t.secret)).unwrap())
        .collect();
    let direct = vec![Client::new(settings(
        &sim_direct.base_url(),
        ehc_agent::sim::config::DEFAULT_APP_ID,
        ehc_agent::sim::config::DEFAULT_APP_SECRET,
    ))
    .unwrap()];
    let req = QrCodeReq {
        qr_code_text: sim.with_state(|s| s.static_code(0)).unwrap(),
    };
    // Warm up: every terminal's token, every connection.
    load(&via, &req, terminals, concurrency).await;
    load(&direct, &req, concurrency * 4, concurrency).await;
    let req_direct = QrCodeReq {
        qr_code_text: sim_direct.with_state(|s| s.static_code(0)).unwrap(),
    };
    // Latency: one call at a time (a window scans one card at a time).
    let one = 2000.min(calls);
    let (g1, _) = load(&via, &req, one, 1).await;
    let (d1, _) = load(&direct, &req_direct, one, 1).await;
    // Throughput and cost: `concurrency` in flight.
    let (cpu0, rss0) = (cpu_ticks(pid), proc_field(pid, "VmRSS:"));
    let (g, gwall) = load(&via, &req, calls, concurrency).await;
    let cpu1 = cpu_ticks(pid);
    let rss1 = proc_field(pid, "VmRSS:");
    let (d, dwall) = load(&direct, &req_direct, calls, concurrency).await;
    let tick = 100.0; // USER_HZ
    println!("gateway: {terminals} terminals, getHealthCardByQRCode, simulator at zero latency:");
    println!("  one at a time ({one} calls):");
    println!(
        "    through the gateway  p50 {}  p99 {}",
        ms(percentile(&g1, 0.5)),
        ms(percentile(&g1, 0.99))
    );
    println!(
        "    direct               p50 {}  p99 {}",
        ms(percentile(&d1, 0.5)),
        ms(percentile(&d1, 0.99))
    );
    println!(
        "    gateway-added        p50 {}  p99 {}",
        ms(percentile(&g1, 0.5).saturating_sub(percentile(&d1, 0.5))),
        ms(percentile(&g1, 0.99).saturating_sub(percentile(&d1, 0.99)))
    );
    println!("  {concurrency} in flight ({calls} calls; the load generator shares the 2 cores):");
    println!(
        "    through the gateway  p50 {}  p99 {}  {:.0} calls/s",
        ms(percentile(&g, 0.5)),
        ms(percentile(&g, 0.99)),
        calls as f64 / gwall.as_secs_f64()
    );
    println!(
        "    direct               p50 {}  p99 {}  {:.0} calls/s",
        ms(percentile(&d, 0.5)),
        ms(percentile(&d, 0.99)),
        calls as f64 / dwall.as_secs_f64()
    );
    println!(
        "  gateway CPU          {:.2} s for {calls} calls ({:.0} µs per call); RSS {rss0} before, {rss1} after",
        (cpu1 - cpu0) as f64 / tick,
        (cpu1 - cpu0) as f64 / tick * 1e6 / calls as f64
    );
    println!(
        "  upstream getAppToken calls for {} forwarded calls: {}",
        calls + one + terminals,
        sim.with_state(|s| s.tokens_issued())
    );
    let _ = child.kill();
    let _ = child.wait();
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
        fallback_urls: Vec::new(),
        shared: None,
        base_url: sim.base_url(),
        app_id: ehc_agent::sim::config::DEFAULT_APP_ID.into(),
        hospital_id: ehc_agent::sim::config::DEFAULT_HOSPITAL_ID.into(),
        secret: Secret::new(ehc_agent::sim::config::DEFAULT_APP_SECRET),
        scan_timeout: Duration::from_secs(5),
        upload_timeout: Duration::from_secs(30),
        proxy: None,
        ca_file: None,
        warm: Duration::from_secs(25),
        keep_warm: Duration::ZERO,
        preconnect: true,
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

/// The agent in-process in `dir` towards `base` (the simulator's
/// identity; `platform_extra` added to `[platform]`), and an HIS client on
/// its Unix socket past the `hello`.
async fn in_process_agent(
    dir: &Path,
    base: &str,
    account: Option<(&str, &str)>,
    platform_extra: &str,
) -> (
    ehc_agent::agent::app::App,
    tokio::io::Lines<tokio::io::BufReader<tokio::net::UnixStream>>,
) {
    // The simulator's account, or a terminal's at a gateway.
    let (app_id, app_secret) = account.unwrap_or((
        ehc_agent::sim::config::DEFAULT_APP_ID,
        ehc_agent::sim::config::DEFAULT_APP_SECRET,
    ));
    let secret = dir.join("app_secret");
    std::fs::write(&secret, app_secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "[platform]\nbase_url = \"{base}\"\napp_id = \"{app_id}\"\napp_secret_file = \"app_secret\"\nhospital_id = \"{}\"\n{platform_extra}\n\
         [terminal]\nid = \"B\"\ndepartment = \"内科\"\ncity_code = \"1\"\ncity_name = \"c\"\nhospital_code = \"h\"\nhospital_name = \"h\"\n\
         [his]\nlisten_unix = \"his.sock\"\n[outbox]\npath = \"outbox.sqlite\"\n",
        ehc_agent::sim::config::DEFAULT_HOSPITAL_ID
    );
    let cfg = config::parse(&text, dir, &Env::default()).unwrap();
    let app = ehc_agent::agent::app::App::start(&cfg).await.unwrap();
    let stream = tokio::net::UnixStream::connect(app.his_unix.as_ref().unwrap())
        .await
        .unwrap();
    let mut lines = tokio::io::BufReader::new(stream).lines();
    lines.next_line().await.unwrap(); // hello
    (app, lines)
}

async fn scan(n: usize, dir: PathBuf) {
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let sim = Arc::new(
        SimServer::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap(),
    );
    let (app, mut lines) = in_process_agent(tmp.path(), &sim.base_url(), None, "").await;
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
            .send(ehc_agent::agent::scanner::Scan {
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
        What::Ready { n } => ready(n).await,
        What::Idle { seconds } => idle(seconds).await,
        What::Coldscan {
            gaps,
            rtts,
            n,
            lanes,
            char_us,
            variants,
        } => coldscan::run(gaps, rtts, n, lanes, char_us, variants).await,
        What::Gateway {
            terminals,
            calls,
            concurrency,
        } => gateway(terminals, calls, concurrency).await,
    }
}
