//! One function per subcommand, each returning the process exit status.
//! `main` stays thin; everything here is callable from tests.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use serde_json::Value;

mod browser_policy;
mod gateway;
mod outbox;

use crate::cli::{Cli, Command, SignArgs, SimAction, SimArgs};
use crate::config::{self, ConfigError, Env};
use crate::platform::sign;

/// Exit status for bad usage or an invalid configuration (DESIGN §2).
pub const EXIT_USAGE: u8 = 2;

/// Human-readable logs on stderr; `RUST_LOG` overrides `-v`. The demo
/// starts quieter: its output is the point.
pub fn init_tracing(verbose: u8, command: &Command) {
    let quiet = matches!(command, Command::Demo { .. });
    let default = match (verbose, quiet) {
        (0, true) => "error",
        (0, false) => "info",
        (1, _) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // Under systemd (stderr connected to the journal), structured fields go
    // to journald as fields; elsewhere, readable lines on stderr.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            if tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("ehc-agent".into()))
                .try_init()
                .is_ok()
            {
                return;
            }
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal, and never with NO_COLOR set (no-color.org).
        .with_ansi(
            std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(a) => run_cmd(a.config.as_deref()),
        Command::Demo { script } => {
            let rt = runtime()?;
            let ok = rt.block_on(crate::agent::demo::run(script));
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
            let ok = ok?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Check(a) => Ok(check(a.config.as_deref(), &Env::from_process())),
        Command::Outbox(a) => outbox::run(a),
        Command::Scanners { json, all } => scanners(json, all),
        Command::BrowserPolicy {
            origins,
            check,
            browsers,
            root,
        } => browser_policy_cmd(&origins, check, &browsers, &root),
        Command::Status { json, at } => runtime()?.block_on(status(json, at)),
        Command::Scan { text, at } => runtime()?.block_on(scan(text, at)),
        Command::Sign(a) => sign_cmd(a),
        Command::Sim(a) => sim_cmd(a),
        Command::Gateway(a) => gateway::run(a),
    }
}

/// `ehc-agent check`: every problem and exit 2, or the summary and exit 0.
pub fn check(explicit: Option<&Path>, env: &Env) -> ExitCode {
    match config::load(explicit, env) {
        Ok(c) => {
            print!("{}", c.summary());
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Err(e @ ConfigError::Invalid { .. }) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("ehc-agent: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Exit status of `status` when the agent does not run (as `systemctl status`).
pub const EXIT_NOT_RUNNING: u8 = 3;

/// Where the running agent's control socket is.
pub(crate) fn control_path(control: Option<&Path>, config: Option<&Path>) -> PathBuf {
    if let Some(p) = control {
        return p.to_owned();
    }
    let env = Env::from_process();
    if let Ok(c) = config::load(config, &env) {
        return crate::agent::control::path_for(&c.his_unix);
    }
    env.runtime_directory
        .unwrap_or_else(|| PathBuf::from("/run/ehc-agent"))
        .join("control.sock")
}

async fn status(json: bool, at: crate::cli::ControlArg) -> anyhow::Result<ExitCode> {
    let path = control_path(at.control.as_deref(), at.config.as_deref());
    let v = match crate::agent::control::request(&path, &crate::agent::control::Request::Status)
        .await
    {
        Ok(v) => v,
        Err(e @ crate::agent::control::ControlError::NotRunning(_)) => {
            eprintln!("ehc-agent: {e}");
            return Ok(ExitCode::from(EXIT_NOT_RUNNING));
        }
        Err(e) => return Err(e.into()),
    };
    let st: crate::agent::status::Status = serde_json::from_value(v["status"].clone())
        .context("the agent's status was not understood")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", st.human(crate::clock::now_unix()));
    }
    Ok(if st.attention.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn scan(text: String, at: crate::cli::ControlArg) -> anyhow::Result<ExitCode> {
    let path = control_path(at.control.as_deref(), at.config.as_deref());
    let v = crate::agent::control::request(
        &path,
        &crate::agent::control::Request::Scan {
            text,
            scanner: None,
        },
    )
    .await?;
    println!("{}", v["event"]);
    Ok(ExitCode::SUCCESS)
}

/// `ehc-agent scanners`: what is attached, and configuration to paste.
fn scanners(json: bool, all: bool) -> anyhow::Result<ExitCode> {
    use crate::agent::scanner::sysfs;
    let devices: Vec<_> = sysfs::usb_devices()
        .into_iter()
        .filter(|d| {
            all || d.known_scanner_vendor.is_some()
                || d.interfaces.iter().any(|i| {
                    matches!(
                        i.kind.as_str(),
                        "HID keyboard" | "HID POS" | "CDC ACM (serial)"
                    )
                })
        })
        .collect();
    let serial = sysfs::other_serial_ports();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"usb": devices, "serialPorts": serial})
            )?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if devices.is_empty() {
        println!(
            "no USB scanner candidates attached{}",
            if all {
                ""
            } else {
                " (--all lists every USB device)"
            }
        );
    }
    for d in &devices {
        println!(
            "{:04x}:{:04x}  {} {}{}{}",
            d.vendor_id,
            d.product_id,
            d.manufacturer.as_deref().unwrap_or("?"),
            d.product.as_deref().unwrap_or("?"),
            d.serial
                .as_ref()
                .map(|s| format!("  serial {s}"))
                .unwrap_or_default(),
            d.known_scanner_vendor
                .map(|v| format!("  [{v}, a scanner maker]"))
                .unwrap_or_default()
        );
        for i in &d.interfaces {
            println!(
                "    interface {}: {}  {}",
                i.number,
                i.kind,
                i.nodes.join(" ")
            );
            for b in &i.by_id {
                println!("        {b}");
            }
            for n in &i.notes {
                println!("        note: {n}");
            }
        }
        for block in sysfs::suggestions(d) {
            println!();
            for line in block.lines() {
                println!("    {line}");
            }
        }
        println!();
    }
    if !serial.is_empty() {
        println!("other serial ports (RS-232): {}", serial.join(" "));
        println!("    [[scanner]]\n    name = \"rs232\"\n    kind = \"serial\"\n    path = \"{}\"\n    baud = 9600", serial[0]);
    }
    if !nix::unistd::geteuid().is_root() {
        println!("(not root: HID report descriptors could not be read, so HID POS scanners may show as plain HID)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `ehc-agent sign`: the raw sign string with the secret shown as
/// `<secret>`, the computed sign, and whether it matches the envelope's own.
fn sign_cmd(a: SignArgs) -> anyhow::Result<ExitCode> {
    let text = match &a.file {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading standard input")?;
            s
        }
    };
    let secret = match (&a.app_secret_file, &a.config) {
        (Some(f), _) => read_secret(f)?,
        (None, explicit) => {
            let c = config::load(explicit.as_deref(), &Env::from_process()).context(
                "no --app-secret-file given, and the configuration could not supply the secret",
            )?;
            c.app_secret.expose().to_owned()
        }
    };
    let out = sign_report(&text, &secret)?;
    print!("{}", out.text);
    Ok(if out.matches == Some(false) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn read_secret(f: &Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(f)
        .with_context(|| format!("reading app secret {}", f.display()))?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        bail!("app secret file {} is empty", f.display());
    }
    Ok(s)
}

/// What `sign` prints, computed without I/O so tests can check it.
pub struct SignReport {
    pub text: String,
    /// Whether the envelope's own `sign` matched, when it had one.
    pub matches: Option<bool>,
}

pub fn sign_report(envelope: &str, secret: &str) -> anyhow::Result<SignReport> {
    let v: Value = serde_json::from_str(envelope).context("the request is not JSON")?;
    let Some(top) = v.as_object() else {
        bail!("the request is not a JSON object");
    };
    let Some(common) = top.get("commonIn").and_then(Value::as_object) else {
        bail!("the request has no commonIn object");
    };
    let req = match top.get("req") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => bail!("req is not a JSON object"),
    };
    let raw = sign::raw_string(common, req);
    let computed = sign::sign_raw(&raw, secret);
    let given = common
        .get("sign")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let mut text = format!("raw:  {raw}<secret>\nsign: {computed}\n");
    let matches = given.map(|g| g == computed);
    match given {
        Some(g) if g == computed => text.push_str("the request's own sign matches\n"),
        Some(g) => text.push_str(&format!(
            "the request's own sign differs: {g}\n(check the secret, field order, empty values and number formatting against the raw string above)\n"
        )),
        None => {}
    }
    Ok(SignReport { text, matches })
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `ehc-agent run`.
fn run_cmd(explicit: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = match config::load(explicit, &Env::from_process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ehc-agent: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let rt = runtime()?;
    let result = rt.block_on(crate::agent::app::run(cfg));
    // Every task has finished by now, but a stdin scanner's blocking read
    // cannot be interrupted: do not let it hold the process.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is_configuration() => {
            eprintln!("ehc-agent: {e}");
            Ok(ExitCode::from(EXIT_USAGE))
        }
        Err(e) => Err(e.into()),
    }
}

/// The simulator's TLS acceptor from `--tls DIR` (made there when absent,
/// for 127.0.0.1, ::1, localhost and the listen address) or `--cert/--key`.
fn sim_tls(
    a: &SimArgs,
) -> Result<Option<tokio_rustls::TlsAcceptor>, crate::gateway::tls::TlsError> {
    use crate::gateway::tls;
    let (cert, key) = match (&a.tls, &a.cert, &a.key) {
        (Some(dir), _, _) => {
            let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
            if !cert.exists() && !key.exists() {
                let mut names: Vec<String> =
                    vec!["127.0.0.1".into(), "::1".into(), "localhost".into()];
                let ip = a.listen.ip();
                if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
                    names.push(ip.to_string());
                }
                let files = tls::init(dir, &names)?;
                println!(
                    "made a CA and a certificate for {}: trust {} (the agent's platform.ca_file)",
                    names.join(", "),
                    files.ca_cert.display()
                );
            }
            (cert, key)
        }
        (None, Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => return Ok(None),
    };
    tls::acceptor(&cert, &key).map(Some)
}

fn browser_policy_cmd(
    origins: &[String],
    check: bool,
    browsers: &[String],
    root: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let mut clean = Vec::new();
    for o in origins {
        match browser_policy::check_origin(o) {
            Ok(c) => clean.push(c),
            Err(e) => {
                eprintln!("ehc-agent browser-policy: {e}");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        }
    }
    let mut all = true;
    for (browser, dir) in browser_policy::folders(root, browsers) {
        for o in &clean {
            if check {
                match browser_policy::in_place(&dir, o) {
                    Ok(true) => println!(
                        "{browser}: {o} allowed to reach loopback ({})",
                        dir.display()
                    ),
                    Ok(false) => {
                        all = false;
                        println!("{browser}: {o} NOT allowed (run without --check as root to add it to {})", dir.display());
                    }
                    Err(e) => {
                        all = false;
                        println!("{browser}: {e}");
                    }
                }
            } else {
                match browser_policy::install(&dir, o) {
                    Ok(done) => {
                        for d in done {
                            println!("{browser}: {d}");
                        }
                    }
                    Err(e) => {
                        eprintln!("ehc-agent browser-policy: {browser}: {e}");
                        return Ok(ExitCode::from(1));
                    }
                }
            }
        }
    }
    if !check {
        println!("Restart the browsers, or open chrome://policy and press Reload policies.");
    }
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn sim_cmd(a: SimArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match a.action {
            None => {
                let cfg = match &a.config {
                    Some(p) => match crate::sim::SimConfig::load(p) {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("ehc-agent sim: {e}");
                            return Ok(ExitCode::from(EXIT_USAGE));
                        }
                    },
                    None => crate::sim::SimConfig::default(),
                };
                let tls = match sim_tls(&a) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("ehc-agent sim: {e}");
                        return Ok(ExitCode::from(EXIT_USAGE));
                    }
                };
                crate::sim::run_forever(cfg, a.listen, tls).await?;
                Ok(ExitCode::SUCCESS)
            }
            Some(SimAction::Mint { at, card, ttl }) => {
                let body = serde_json::json!({"card": card, "ttlS": ttl});
                let v = control_call(at, "POST", "/_sim/mint", Some(body)).await?;
                println!(
                    "{}",
                    v.get("qrCodeText")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                );
                Ok(ExitCode::SUCCESS)
            }
            Some(SimAction::Cards { at }) => {
                let v = control_call(at, "GET", "/_sim/cards", None).await?;
                for c in v.as_array().into_iter().flatten() {
                    println!(
                        "{}  {}",
                        c.get("index").and_then(Value::as_u64).unwrap_or_default(),
                        c.get("staticCode")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

async fn control_call(
    at: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{at}{path}");
    let req = match method {
        "POST" => client
            .post(&url)
            .body(body.unwrap_or(Value::Null).to_string())
            .header("content-type", "application/json"),
        _ => client.get(&url),
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("no simulator answering at {at}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("simulator answered {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// Where a path given relative to the working directory ends up, for messages.
pub fn display_path(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_report_on_reference_example() {
        let env = r#"{"commonIn":{"appToken":"","requestId":"DB4D975748A84309977EA25224C0F5CF","hospitalId":"90003","timestamp":"1525392000","sign":""},"req":{"appId":"a1a2e0bde41574ad8ea9a4bb58022oop"}}"#;
        let r = sign_report(env, "8c8e763f443ef983ac33aef1c7085cfb").unwrap();
        assert!(
            r.text
                .contains("sign: TsccMUMTHfOiEovR2hMlRXcQqctRFmPbpPIZdxXCJ/o="),
            "{}",
            r.text
        );
        assert!(r.text.contains("timestamp=1525392000<secret>"));
        assert!(!r.text.contains("8c8e763f"));
        assert_eq!(r.matches, None);
        let wrong = env.replace("\"sign\":\"\"", "\"sign\":\"abc\"");
        assert_eq!(
            sign_report(&wrong, "8c8e763f443ef983ac33aef1c7085cfb")
                .unwrap()
                .matches,
            Some(false)
        );
        assert!(sign_report("[1]", "s").is_err());
        assert!(sign_report("{\"req\":{}}", "s").is_err());
    }
}
