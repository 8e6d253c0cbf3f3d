//! `ehc-agent demo`: the whole loop with no configuration, for a newcomer's
//! first minute and for tests.
//!
//! It starts the platform simulator in-process, writes a configuration for
//! it into a temporary directory, starts the agent (outbox, HIS socket,
//! uploader) there, connects a real HIS client to the real Unix socket, and
//! reads scans from standard input or `--script FILE`. For each scan it
//! prints what HIS receives, and for each upload the `reportHISData` the
//! simulator received.
//!
//! Lines starting with `@` are expanded before they are "scanned", because
//! dynamic codes must be minted by the simulator at run time:
//! `@static N`, `@dynamic N`, `@expired N` (card N of the simulator),
//! `@unknown` (a well-formed code of no card), `@other` (a drug box's EAN-13).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;

use crate::agent::app::App;
use crate::config::{self, Env};
use crate::sim::{SimConfig, SimServer};

/// A well-formed static code of no card.
pub const UNKNOWN_CARD: &str = "0F1E2D3C4B5A69788796A5B4C3D2E1F00F1E2D3C4B5A69788796A5B4C3D2E1F0:1";
/// A hospital's own barcode (an EAN-13 from a drug box).
pub const OTHER_CODE: &str = "6901234567892";
/// How long `--script` may take before the demo gives up.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(60);

pub async fn run(script: Option<PathBuf>) -> anyhow::Result<bool> {
    let dir = tempfile::Builder::new()
        .prefix("ehc-agent-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let sim = Arc::new(SimServer::start(SimConfig::default(), "127.0.0.1:0".parse()?).await?);
    let cfg = demo_config(dir.path(), &sim.base_url())?;
    let app = App::start(&cfg).await?;
    let sock = app.his_unix.clone().context("the demo HIS socket")?;

    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let say = {
        let out = out.clone();
        move |line: String| {
            let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(o, "{line}");
            let _ = o.flush();
        }
    };

    say(format!(
        "ehc-agent demo: platform simulator at {}, HIS socket {}",
        sim.base_url(),
        sock.display()
    ));
    say(format!(
        "                outbox {}",
        cfg.outbox_path.display()
    ));
    print_samples(&sim, &say);

    // A real HIS client on the real socket.
    let (his_tx, mut his_rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let stream = tokio::net::UnixStream::connect(&sock)
        .await
        .context("connecting the demo HIS client")?;
    let say_his = say.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stream).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            say_his(format!("HIS      ← {l}"));
            if let Ok(v) = serde_json::from_str::<Value>(&l) {
                let _ = his_tx.send(v);
            }
        }
    });

    // Reports as the simulator receives them.
    let shown = Arc::new(std::sync::Mutex::new(0usize));
    let print_reports = {
        let (sim, say, shown) = (sim.clone(), say.clone(), shown.clone());
        move || {
            let mut shown = shown.lock().unwrap_or_else(|e| e.into_inner());
            let new: Vec<Value> = sim.with_state(|s| {
                s.reports
                    .iter()
                    .skip(*shown)
                    .map(|r| serde_json::to_value(r).unwrap_or_default())
                    .collect()
            });
            for r in new {
                *shown += 1;
                say(format!(
                    "platform ← reportHISData requestId={} scene={} department={} time=\"{}\" cardType={} cardChannel={} qrCodeText={}",
                    r["requestId"].as_str().unwrap_or(""),
                    r["scene"].as_str().unwrap_or(""),
                    r["department"].as_str().unwrap_or("-"),
                    r["time"].as_str().unwrap_or(""),
                    r["cardType"].as_str().unwrap_or(""),
                    r["cardChannel"].as_str().unwrap_or(""),
                    r["qrCodeText"].as_str().unwrap_or(""),
                ));
            }
        }
    };
    let mut changed = sim.subscribe();
    let printer = print_reports.clone();
    tokio::spawn(async move {
        loop {
            printer();
            if changed.changed().await.is_err() {
                break;
            }
        }
    });

    let expand = {
        let sim = sim.clone();
        move |line: String| expand(&sim, line)
    };
    let sent = match &script {
        Some(path) => {
            let text =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            crate::agent::scanner::stdin::run_mapped(
                "demo".into(),
                text.as_slice(),
                Duration::ZERO,
                app.scans.clone(),
                app.scanners.arrivals(),
                expand,
            )
            .await
        }
        None => {
            say("Paste or type a code and press Enter; Ctrl-D ends the demo.".into());
            crate::agent::scanner::stdin::run_mapped(
                "stdin".into(),
                tokio::io::stdin(),
                Duration::ZERO,
                app.scans.clone(),
                app.scanners.arrivals(),
                expand,
            )
            .await
        }
    };

    // Wait until every scan reached HIS and every use reached the platform.
    let done = tokio::time::timeout(SCRIPT_DEADLINE, async {
        let mut events = 0usize;
        while events + (app.pipeline.stats().discarded as usize) < sent {
            match his_rx.recv().await {
                Some(v)
                    if matches!(
                        v["type"].as_str(),
                        Some("card" | "scanFailed" | "otherCode")
                    ) =>
                {
                    events += 1
                }
                Some(_) => {}
                None => break,
            }
        }
        let mut changed = sim.subscribe();
        loop {
            let c = app.outbox.counts().await?;
            if c.pending == 0 && c.waiting == 0 && app.outbox.spilled() == 0 {
                return Ok::<_, anyhow::Error>((events, c.sent));
            }
            // Woken by the simulator receiving something, or re-check soon
            // (a retry may be scheduled for later).
            let _ = tokio::time::timeout(Duration::from_millis(500), changed.changed()).await;
        }
    })
    .await;
    print_reports();
    let reports = sim.with_state(|s| s.unique_reports().len());
    app.shutdown().await;
    match done {
        Ok(Ok((events, sent_rows))) => {
            say(format!("demo done: {sent} scans, {events} HIS events, {sent_rows} uses uploaded, {reports} reports received by the platform"));
            Ok(sent_rows as usize == reports)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => bail!(
            "not everything was delivered and reported within {} s",
            SCRIPT_DEADLINE.as_secs()
        ),
    }
}

fn demo_config(dir: &Path, base_url: &str) -> anyhow::Result<config::Config> {
    use std::os::unix::fs::PermissionsExt as _;
    let secret = dir.join("app_secret");
    std::fs::write(&secret, crate::sim::config::DEFAULT_APP_SECRET)?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    let text = format!(
        r#"
[platform]
base_url = "{base_url}"
app_id = "{app}"
app_secret_file = "app_secret"
hospital_id = "{hospital}"
[terminal]
id = "DEMO-01"
channel = "0100"
scene = "010101"
department = "内科"
city_code = "110000"
city_name = "北京市"
hospital_code = "01"
hospital_name = "演示医院"
[his]
listen_unix = "his.sock"
hold_s = 30
[outbox]
path = "outbox.sqlite"
"#,
        app = crate::sim::config::DEFAULT_APP_ID,
        hospital = crate::sim::config::DEFAULT_HOSPITAL_ID,
    );
    config::parse(&text, dir, &Env::default())
        .map_err(|p| anyhow::anyhow!("demo configuration: {p:?}"))
}

fn print_samples(sim: &SimServer, say: &impl Fn(String)) {
    let cards = sim.with_state(|s| s.cards());
    let names: Vec<String> =
        sim.with_state(|s| s.config().cards.iter().map(|c| c.name.clone()).collect());
    say("Sample codes (or type the @ form):".into());
    if let Some(c) = cards.first() {
        say(format!(
            "  @static 0    static code of {}:  {}",
            names[0], c.static_code
        ));
    }
    if let Some(code) = sim.with_state(|s| s.mint(1, None, crate::clock::now_unix())) {
        say(format!(
            "  @dynamic 1   dynamic code of {}: {}",
            names.get(1).cloned().unwrap_or_default(),
            code.0
        ));
    }
    say("  @expired 2   a dynamic code that has already expired".into());
    say(format!("  @unknown     a code of no card:  {UNKNOWN_CARD}"));
    say(format!("  @other       not a health card:  {OTHER_CODE}"));
}

/// Expand an `@` line; other lines pass unchanged.
fn expand(sim: &SimServer, line: String) -> String {
    let t = line.trim();
    let Some(rest) = t.strip_prefix('@') else {
        return line;
    };
    let mut parts = rest.split_whitespace();
    let what = parts.next().unwrap_or("");
    let n: usize = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let now = crate::clock::now_unix();
    match what {
        "static" => sim.with_state(|s| s.static_code(n)).unwrap_or(line),
        "dynamic" => sim
            .with_state(|s| s.mint(n, None, now))
            .map(|c| c.0)
            .unwrap_or(line),
        "expired" => sim
            .with_state(|s| s.mint(n, Some(0), now))
            .map(|c| c.0)
            .unwrap_or(line),
        "unknown" => UNKNOWN_CARD.into(),
        "other" => OTHER_CODE.into(),
        _ => line,
    }
}
