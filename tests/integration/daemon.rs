//! The real `ehc-agent run` process, started against an in-process simulator
//! with a configuration in a temp dir, a stdin scanner fed by the test, and
//! helpers for HIS clients on its real sockets.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use ehc_agent::sim::SimServer;

pub struct Daemon {
    pub child: Child,
    stdin: Option<ChildStdin>,
    dir: Option<tempfile::TempDir>,
    pub sock: PathBuf,
    pub tcp: String,
    pub ws: String,
    /// The local HTTP API's address (`his_http`).
    pub http: String,
    pub control: PathBuf,
    /// `off` or the metrics endpoint's address.
    pub metrics: String,
    /// Everything the daemon wrote to stderr so far, and a condvar
    /// signalled on every new line.
    pub log: Arc<(Mutex<String>, std::sync::Condvar)>,
}

pub struct Options {
    pub extra_toml: String,
    /// Lines added to `[his]`.
    pub his_extra: String,
    pub allowed_origins: Vec<String>,
    pub socket_group: Option<String>,
    pub base_url: Option<String>,
    /// Outbox file, relative to the daemon's directory.
    pub outbox_path: String,
    /// Extra environment for the daemon.
    pub env: Vec<(String, String)>,
    /// The platform account: (app_id, secret), default the simulator's.
    pub account: Option<(String, String)>,
    /// Replaces `base_url = "..."` (e.g. `base_urls = [...]`).
    pub platform_addr_line: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra_toml: String::new(),
            his_extra: String::new(),
            allowed_origins: vec!["https://his.example-hospital.cn".into()],
            socket_group: None,
            base_url: None,
            outbox_path: "outbox.sqlite".into(),
            env: Vec::new(),
            account: None,
            platform_addr_line: None,
        }
    }
}

impl Daemon {
    pub async fn start(sim: &SimServer) -> Daemon {
        Self::start_with(sim, Options::default()).await
    }

    pub async fn start_with(sim: &SimServer, o: Options) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, sim, o).await
    }

    /// Start in an existing directory (a restart keeps the outbox there).
    pub async fn start_in(dir: tempfile::TempDir, sim: &SimServer, o: Options) -> Daemon {
        let (app_id, secret_text) = o
            .account
            .clone()
            .unwrap_or_else(|| (crate::common::APP_ID.into(), crate::common::SECRET.into()));
        let secret = dir.path().join("app_secret");
        std::fs::write(&secret, &secret_text).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let origins: Vec<String> = o
            .allowed_origins
            .iter()
            .map(|x| format!("\"{x}\""))
            .collect();
        let group = o
            .socket_group
            .map(|g| format!("socket_group = \"{g}\"\n"))
            .unwrap_or_default();
        let cfg = format!(
            r#"
[platform]
{base_line}
app_id = "{app}"
app_secret_file = "app_secret"
hospital_id = "{hosp}"
timeout_ms = 2000
[terminal]
id = "WIN-T"
channel = "0100"
scene = "010101"
department = "内科"
city_code = "110000"
city_name = "北京市"
hospital_code = "01"
hospital_name = "测试医院"
[[scanner]]
name = "window"
kind = "stdin"
debounce_ms = 0
[his]
listen_unix = "his.sock"
listen_tcp = "127.0.0.1:0"
listen_ws = "127.0.0.1:0"
listen_http = "127.0.0.1:0"
allowed_origins = [{origins}]
hold_s = 30
{group}
{his_extra}
[outbox]
path = "{outbox}"
{extra}
"#,
            base_line = o.platform_addr_line.clone().unwrap_or_else(|| format!(
                "base_url = \"{}\"",
                o.base_url.clone().unwrap_or_else(|| sim.base_url())
            )),
            app = app_id,
            hosp = crate::common::HOSPITAL,
            origins = origins.join(", "),
            extra = o.extra_toml,
            his_extra = o.his_extra,
            outbox = o.outbox_path,
        );
        std::fs::write(dir.path().join("agent.toml"), cfg).unwrap();
        // `WATCHDOG_PID=self`: as systemd does, the daemon's own pid, which
        // only an exec from a shell can know in advance.
        let own_pid = o
            .env
            .iter()
            .any(|(k, v)| k == "WATCHDOG_PID" && v == "self");
        let mut cmd = if own_pid {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
                .arg(env!("CARGO_BIN_EXE_ehc-agent"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_ehc-agent"))
        };
        let mut child = cmd
            .arg("run")
            .arg("--config")
            .arg(dir.path().join("agent.toml"))
            .env("RUST_LOG", "info,ehc_agent=debug")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("STATE_DIRECTORY")
            .env_remove("RUNTIME_DIRECTORY")
            .envs(
                o.env
                    .iter()
                    .filter(|(k, _)| k != "WATCHDOG_PID")
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(String::new()), std::sync::Condvar::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<String>();
        let log2 = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut ready = Some(ready_tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                {
                    let mut l = log2.0.lock().unwrap_or_else(|e| e.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
                log2.1.notify_all();
                if line.contains("ehc-agent running") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let ready = match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => panic!("daemon did not start:\n{}", log.0.lock().unwrap()),
        };
        let field = |name: &str| -> String {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in {ready}"))
                .to_owned()
        };
        Daemon {
            child,
            stdin,
            sock: dir.path().join("his.sock"),
            tcp: field("his_tcp"),
            ws: field("his_ws"),
            http: field("his_http"),
            control: PathBuf::from(field("control")),
            metrics: field("metrics"),
            dir: Some(dir),
            log,
        }
    }

    /// Type a line on the daemon's stdin scanner.
    pub fn scan(&mut self, text: &str) {
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(text.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        s.flush().unwrap();
    }

    pub fn scan_bytes(&mut self, bytes: &[u8]) {
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(bytes).unwrap();
        s.flush().unwrap();
    }

    /// The daemon's directory (configuration, outbox, socket).
    /// The HIS token the agent published beside its socket.
    pub fn his_token(&self) -> String {
        std::fs::read_to_string(self.path().join("his.token")).expect("published HIS token")
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.as_ref().expect("directory").path()
    }

    pub fn log(&self) -> String {
        self.log.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wait (bounded) until `needle` appears in the log at least `n` times.
    pub fn wait_log(&self, needle: &str, n: usize) {
        let (m, cv) = &*self.log;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut l = m.lock().unwrap_or_else(|e| e.into_inner());
        while l.matches(needle).count() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {n}× {needle:?} in the log:\n{l}"
            );
            l = cv.wait_timeout(l, left).unwrap().0;
        }
    }

    /// The daemon's CPU time so far (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// SIGTERM and wait; the exit status.
    pub fn stop(mut self) -> (std::process::ExitStatus, String, tempfile::TempDir) {
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        let log = self.log();
        (status, log, self.dir.take().expect("directory"))
    }

    pub fn signal(&self, sig: &str) {
        nix_kill(self.child.id() as i32, sig);
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) -> tempfile::TempDir {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.dir.take().expect("directory")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Every scenario run against a daemon is also a check that no
        // identity reached its log (DESIGN §6).
        if !std::thread::panicking() {
            assert_no_pii(&self.log());
        }
    }
}

/// The synthetic identities' values, and the cards' full ids, never appear
/// in a log: names, ID numbers, phone numbers, QR texts.
pub fn assert_no_pii(log: &str) {
    let st = ehc_agent::sim::SimConfig::default();
    let sim = ehc_agent::sim::state::SimState::new(st.clone());
    for c in &st.cards {
        for value in [&c.name, &c.id_number, &c.phone] {
            assert!(
                !log.contains(value.as_str()),
                "{value} leaked into a log:\n{log}"
            );
        }
    }
    for c in sim.cards() {
        assert!(
            !log.contains(&c.card_id),
            "a full card id leaked into a log:\n{log}"
        );
    }
}

fn nix_kill(pid: i32, sig: &str) {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
}

/// An HIS client speaking newline-delimited JSON over any stream.
pub struct HisClient {
    reader: BufReader<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
    writer: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
}

impl HisClient {
    pub async fn unix(d: &Daemon) -> HisClient {
        let s = tokio::net::UnixStream::connect(&d.sock).await.unwrap();
        let (r, w) = s.into_split();
        Self::from_parts(Box::new(r), Box::new(w)).await
    }

    /// A TCP client that has authenticated with the published HIS token.
    pub async fn tcp(d: &Daemon) -> HisClient {
        let mut c = Self::tcp_unauthenticated(d).await;
        c.send(&serde_json::json!({"type": "auth", "token": d.his_token(), "ref": "auth"}))
            .await;
        let r = c.next().await.expect("auth reply");
        assert_eq!(
            r,
            serde_json::json!({"type": "reply", "ref": "auth", "ok": true})
        );
        c
    }

    /// A TCP client that has only read `hello`.
    pub async fn tcp_unauthenticated(d: &Daemon) -> HisClient {
        let s = tokio::net::TcpStream::connect(&d.tcp).await.unwrap();
        let (r, w) = s.into_split();
        Self::from_parts(Box::new(r), Box::new(w)).await
    }

    /// A Unix client whose write half can be shut down.
    pub async fn unix_parts(d: &Daemon) -> (HisClient, tokio::net::unix::OwnedWriteHalf) {
        let s = tokio::net::UnixStream::connect(&d.sock).await.unwrap();
        let (r, w) = s.into_split();
        let c = Self::from_parts(Box::new(r), Box::new(tokio::io::sink())).await;
        (c, w)
    }

    async fn from_parts(
        r: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        w: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    ) -> HisClient {
        let mut c = HisClient {
            reader: BufReader::new(r),
            writer: w,
        };
        let hello = c.next().await.expect("hello");
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["protocol"], 1);
        c
    }

    /// The next message, or `None` when the agent closed the connection.
    pub async fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(20), self.reader.read_line(&mut line))
            .await
            .expect("an HIS message within 20 s")
            .ok()?;
        if n == 0 {
            return None;
        }
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}")))
    }

    /// The next message of one of `types`, skipping others.
    pub async fn next_of(&mut self, types: &[&str]) -> Value {
        loop {
            let m = self.next().await.expect("connection open");
            if types.contains(&m["type"].as_str().unwrap_or("")) {
                return m;
            }
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }

    pub async fn send(&mut self, v: &Value) {
        let mut line = v.to_string();
        line.push('\n');
        self.send_raw(line.as_bytes()).await.unwrap();
    }
}

/// Wait (bounded) until the simulator has a report with `scene` (an HIS
/// client's `use` reached the platform).
pub async fn until_reported(sim: &SimServer, what: &str, scene: &str) -> Value {
    until_sim(sim, what, |s| {
        s["reports"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["scene"] == scene))
    })
    .await
}

/// Wait (bounded) until `cond` holds on the simulator's state, waking on
/// each platform answer.
pub async fn until_sim(sim: &SimServer, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let mut changed = sim.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = crate::common::state(sim).await;
        if cond(&st) {
            return st;
        }
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(_) => {}
            Err(_) => panic!("timed out waiting for: {what}\nstate: {st}"),
        }
    }
}
