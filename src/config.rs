//! The agent's configuration: the TOML schema of DESIGN §3, where it is found,
//! and a validation that reports **every** problem at once.
//!
//! IT staff edit this file on a counter PC over a remote session, often
//! without the docs at hand. Reporting one mistake per `check` run turns a
//! five-typo file into five round trips, so loading is done in two stages:
//!
//! 1. The text is parsed as TOML (a syntax error is the one problem that
//!    stops everything: nothing after it can be trusted).
//! 2. Each section (and each `[[scanner]]`) is deserialized on its own.
//!    Every key serde does not use is recorded as unknown (`serde_ignored`);
//!    an error is recorded at the exact key serde was in
//!    (`serde_path_to_error`), that key is set aside and the section tried
//!    again, so every wrong value is found, not just the first. Then the
//!    semantic checks run on whatever parsed. (The section structs are
//!    deserialized only through this, so unknown keys are never silently
//!    accepted.)
//!
//! Problems carry the dotted key path (`scanner[1].baud`), so the operator can
//! find them without reading code.
//!
//! Under systemd the paths default into `$STATE_DIRECTORY` and
//! `$RUNTIME_DIRECTORY`, and the app secret is taken from the credential
//! `app_secret` in `$CREDENTIALS_DIRECTORY` when present (`LoadCredential=`).

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::UtcOffset;

use crate::clock;
use crate::platform::tables;

/// Environment variable naming the configuration file.
pub const ENV_CONFIG: &str = "EHC_AGENT_CONFIG";
/// System-wide configuration file.
pub const SYSTEM_CONFIG: &str = "/etc/ehc-agent/agent.toml";
/// Name of the systemd credential holding the app secret.
pub const SECRET_CREDENTIAL: &str = "app_secret";

// ---------------------------------------------------------------- schema ----

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PlatformSection {
    /// The platform, or the hospital's gateway.
    #[serde(default)]
    pub base_url: String,
    /// Instead of `base_url`: several gateways, tried in this order when one
    /// cannot be reached. After validation `base_url` is the first and this
    /// holds the rest.
    #[serde(default)]
    pub base_urls: Vec<String>,
    pub app_id: String,
    #[serde(default)]
    pub app_secret_file: Option<PathBuf>,
    pub hospital_id: String,
    /// Scan-path calls: somebody is waiting at the window.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Uploads from the outbox: nobody waits, a slow answer is fine.
    #[serde(default = "default_upload_timeout_ms")]
    pub upload_timeout_ms: u64,
    #[serde(default)]
    pub proxy: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Where the token is kept across restarts. Defaults beside the outbox.
    #[serde(default)]
    pub state_path: Option<PathBuf>,
    /// A connection used within this many seconds is taken to be open
    /// (below the platform's keep-alive timeout), and the interval of the
    /// keep-warm touch.
    #[serde(default = "default_warm_s")]
    pub warm_s: u64,
    /// For how long after the last platform call one connection is kept
    /// open through idle gaps (minutes; 0 = never).
    #[serde(default = "default_keep_warm_min")]
    pub keep_warm_min: u64,
    /// Open a connection when the first byte of a scan arrives, if none is
    /// warm.
    #[serde(default = "yes")]
    pub preconnect: bool,
    /// Behind a gateway: seconds between heartbeats (0: none). Ignored,
    /// after one try, when `base_url` is the platform itself.
    #[serde(default = "default_heartbeat_s")]
    pub heartbeat_s: u64,
}

fn default_heartbeat_s() -> u64 {
    30
}

fn yes() -> bool {
    true
}

fn default_warm_s() -> u64 {
    25
}
/// Four hours: a counter's lunch break (two hours, often more) stays
/// warm; nights and weekends go quiet.
fn default_keep_warm_min() -> u64 {
    240
}

fn default_timeout_ms() -> u64 {
    3000
}
fn default_upload_timeout_ms() -> u64 {
    15000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TerminalSection {
    pub id: String,
    #[serde(default = "default_channel")]
    pub channel: String,
    #[serde(default = "default_scene")]
    pub scene: String,
    #[serde(default)]
    pub department: Option<String>,
    pub city_code: String,
    pub city_name: String,
    pub hospital_code: String,
    pub hospital_name: String,
    #[serde(default = "default_utc_offset")]
    pub utc_offset: String,
}

fn default_channel() -> String {
    "0100".into()
}
fn default_scene() -> String {
    "010101".into()
}
fn default_utc_offset() -> String {
    "+08:00".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScannerKind {
    Serial,
    UsbHid,
    Evdev,
    HidPos,
    Stdin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Terminator {
    Cr,
    Lf,
    Crlf,
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ScannerSection {
    pub name: String,
    pub kind: ScannerKind,
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub baud: Option<u32>,
    #[serde(default)]
    pub vendor_id: Option<u16>,
    #[serde(default)]
    pub product_id: Option<u16>,
    #[serde(default)]
    pub serial_number: Option<String>,
    #[serde(default = "default_terminator")]
    pub terminator: Terminator,
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    #[serde(default)]
    pub alt_codes: bool,
}

fn default_terminator() -> Terminator {
    Terminator::Cr
}
fn default_idle_ms() -> u64 {
    50
}
fn default_debounce_ms() -> u64 {
    1500
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HisSection {
    #[serde(default)]
    pub listen_unix: Option<PathBuf>,
    #[serde(default)]
    pub socket_group: Option<String>,
    #[serde(default)]
    pub listen_tcp: Option<String>,
    #[serde(default)]
    pub listen_ws: Option<String>,
    /// The local HTTP API (long poll, Server-Sent Events, `use`, `bind`),
    /// loopback only.
    #[serde(default)]
    pub listen_http: Option<String>,
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    #[serde(default = "default_hold_s")]
    pub hold_s: u64,
    #[serde(default)]
    pub use_wait_s: u64,
    /// The token TCP and WebSocket clients present; default: generated and
    /// kept in the state directory.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
}

fn default_max_clients() -> usize {
    crate::agent::his::server::DEFAULT_MAX_CLIENTS
}

impl Default for HisSection {
    fn default() -> Self {
        HisSection {
            listen_unix: None,
            socket_group: None,
            listen_tcp: None,
            listen_ws: None,
            listen_http: None,
            allowed_origins: Vec::new(),
            hold_s: default_hold_s(),
            use_wait_s: 0,
            token_file: None,
            max_clients: default_max_clients(),
        }
    }
}

fn default_hold_s() -> u64 {
    30
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StaticOffline {
    PassUnverified,
    Reject,
}

/// Dynamic codes can only be checked by the platform; the one policy is to
/// refuse them when it cannot be reached. The key exists so a configuration
/// says so explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DynamicOffline {
    Reject,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OfflineSection {
    #[serde(default = "default_static_offline")]
    pub static_codes: StaticOffline,
    #[serde(default = "default_dynamic_offline")]
    pub dynamic_codes: DynamicOffline,
}

impl Default for OfflineSection {
    fn default() -> Self {
        OfflineSection {
            static_codes: default_static_offline(),
            dynamic_codes: default_dynamic_offline(),
        }
    }
}

fn default_static_offline() -> StaticOffline {
    StaticOffline::PassUnverified
}
fn default_dynamic_offline() -> DynamicOffline {
    DynamicOffline::Reject
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OutboxSection {
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "default_batch")]
    pub batch: u32,
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    #[serde(default = "default_true")]
    pub report_dynamic: bool,
}

impl Default for OutboxSection {
    fn default() -> Self {
        OutboxSection {
            path: None,
            batch: default_batch(),
            concurrency: default_concurrency(),
            retention_days: default_retention_days(),
            report_dynamic: true,
        }
    }
}

fn default_batch() -> u32 {
    50
}
fn default_concurrency() -> u32 {
    4
}
fn default_retention_days() -> u32 {
    7
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MetricsSection {
    pub listen: String,
}

// ------------------------------------------------------------- validated ----

/// A configuration that passed every check, with defaults and systemd
/// directories resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Option<PathBuf>,
    pub platform: PlatformSection,
    /// Where the secret was read from (file or credential), for `check`.
    pub secret_source: PathBuf,
    pub app_secret: Secret,
    pub terminal: TerminalSection,
    pub utc_offset: UtcOffset,
    pub scanners: Vec<ScannerSection>,
    pub his: HisSection,
    pub his_tcp: Option<SocketAddr>,
    pub his_ws: Option<SocketAddr>,
    pub his_http: Option<SocketAddr>,
    pub his_unix: PathBuf,
    /// The HIS token read from `his.token_file`, when one is set.
    pub his_token: Option<Secret>,
    pub offline: OfflineSection,
    pub outbox: OutboxSection,
    pub outbox_path: PathBuf,
    pub state_path: PathBuf,
    pub metrics: Option<SocketAddr>,
}

/// The app secret. Its `Debug` never shows it, so a stray `{:?}` cannot leak
/// it into a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// One thing wrong with a configuration, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no configuration file found (looked at --config, ${ENV_CONFIG}, {SYSTEM_CONFIG}, {user})", user = .0)]
    NotFound(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} has {} problem(s):\n{}", .path.display(), .problems.len(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// The environment the configuration is resolved in: systemd's directories
/// and the user's config dir. Passed explicitly so tests do not have to touch
/// process-wide environment variables.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub config_var: Option<PathBuf>,
    pub state_directory: Option<PathBuf>,
    pub runtime_directory: Option<PathBuf>,
    pub credentials_directory: Option<PathBuf>,
    pub user_config: Option<PathBuf>,
}

impl Env {
    /// Read from the process environment.
    pub fn from_process() -> Self {
        // systemd may pass several colon-separated directories; the first is ours.
        let first = |k: &str| {
            std::env::var_os(k)
                .and_then(|v| {
                    v.to_str()
                        .map(|s| s.split(':').next().unwrap_or("").to_owned())
                })
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        };
        Env {
            config_var: std::env::var_os(ENV_CONFIG)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            state_directory: first("STATE_DIRECTORY"),
            runtime_directory: first("RUNTIME_DIRECTORY"),
            credentials_directory: first("CREDENTIALS_DIRECTORY"),
            user_config: directories::ProjectDirs::from("", "", "ehc-agent")
                .map(|d| d.config_dir().join("agent.toml")),
        }
    }
}

/// Find the configuration file: `--config`, `$EHC_AGENT_CONFIG`,
/// `/etc/ehc-agent/agent.toml`, then the user's config directory.
pub fn discover(explicit: Option<&Path>, env: &Env) -> Result<PathBuf, ConfigError> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    if let Some(p) = &env.config_var {
        return Ok(p.clone());
    }
    let system = PathBuf::from(SYSTEM_CONFIG);
    if system.exists() {
        return Ok(system);
    }
    if let Some(user) = &env.user_config {
        if user.exists() {
            return Ok(user.clone());
        }
    }
    Err(ConfigError::NotFound(
        env.user_config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the user config directory".into()),
    ))
}

/// Discover, read and validate.
pub fn load(explicit: Option<&Path>, env: &Env) -> Result<Config, ConfigError> {
    let path = discover(explicit, env)?;
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base, env)
        .map(|mut c| {
            c.source = Some(path.clone());
            c
        })
        .map_err(|problems| ConfigError::Invalid { path, problems })
}

/// Parse and validate configuration text. Relative paths are taken from
/// `base` (the configuration file's directory). Every problem is returned.
pub fn parse(text: &str, base: &Path, env: &Env) -> Result<Config, Vec<Problem>> {
    let mut v = Validator::default();
    let mut doc: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            v.problem(
                "(file)",
                format!("not valid TOML: {}", e.to_string().trim()),
            );
            return Err(v.problems);
        }
    };

    // `base_url` is optional to serde (`base_urls` may stand instead), so
    // its absence is noticed here, whatever else the section lacks.
    let no_base_url = doc
        .get("platform")
        .and_then(toml::Value::as_table)
        .is_some_and(|t| !t.contains_key("base_url") && !t.contains_key("base_urls"));
    if no_base_url {
        v.problem("platform.base_url", "missing required key".into());
    }
    let platform: Option<PlatformSection> = v.section(&mut doc, "platform", true);
    let terminal: Option<TerminalSection> = v.section(&mut doc, "terminal", true);
    let his: HisSection = v.section(&mut doc, "his", false).unwrap_or_default();
    let offline: OfflineSection = v.section(&mut doc, "offline", false).unwrap_or_default();
    let outbox: OutboxSection = v.section(&mut doc, "outbox", false).unwrap_or_default();
    let metrics: Option<MetricsSection> = v.section(&mut doc, "metrics", false);
    let scanners = v.scanners(&mut doc);
    for key in doc.keys() {
        v.problem(key, "unknown section".to_string());
    }

    // ---- semantic checks, on whatever parsed ----
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };

    let mut secret = None;
    let mut platform = platform;
    if let Some(p) = platform.as_mut() {
        match (p.base_url.is_empty(), p.base_urls.is_empty()) {
            (true, true) if no_base_url => {}
            (true, true) => v.problem("platform.base_url", "must not be empty".into()),
            (false, false) => v.problem(
                "platform.base_urls",
                "give base_url or base_urls, not both".into(),
            ),
            (true, false) => {
                p.base_url = p.base_urls.remove(0);
            }
            (false, true) => {}
        }
        if !p.base_url.is_empty() {
            v.check_base_url("platform.base_url", &p.base_url);
        }
        for (i, u) in p.base_urls.clone().iter().enumerate() {
            v.check_base_url(&format!("platform.base_urls[{}]", i + 1), u);
        }
        v.nonempty("platform.app_id", &p.app_id);
        v.nonempty("platform.hospital_id", &p.hospital_id);
        v.positive("platform.timeout_ms", p.timeout_ms);
        v.positive("platform.upload_timeout_ms", p.upload_timeout_ms);
        v.positive("platform.warm_s", p.warm_s);
        if let Some(proxy) = &p.proxy {
            if reqwest::Proxy::all(proxy).is_err() {
                v.problem("platform.proxy", format!("`{proxy}` is not a proxy URL"));
            }
        }
        if let Some(ca) = &p.ca_file {
            let ca = resolve(ca);
            match std::fs::read(&ca) {
                Err(e) => v.problem(
                    "platform.ca_file",
                    format!("cannot read {}: {e}", ca.display()),
                ),
                Ok(pem) => {
                    if reqwest::Certificate::from_pem_bundle(&pem)
                        .map(|c| c.is_empty())
                        .unwrap_or(true)
                    {
                        v.problem(
                            "platform.ca_file",
                            format!("{} holds no PEM certificate", ca.display()),
                        );
                    }
                }
            }
        }
        secret = v.secret(p.app_secret_file.as_deref().map(resolve), env);
    }

    let mut utc_offset = clock::BEIJING;
    if let Some(t) = &terminal {
        v.nonempty("terminal.id", &t.id);
        v.nonempty("terminal.city_code", &t.city_code);
        v.nonempty("terminal.city_name", &t.city_name);
        v.nonempty("terminal.hospital_code", &t.hospital_code);
        v.nonempty("terminal.hospital_name", &t.hospital_name);
        if tables::channel_name(&t.channel).is_none() {
            v.problem(
                "terminal.channel",
                format!("`{}` is not a channel code of table 3.3.3 (0100 window, 0200 kiosk, 0300 doctor's desk, ...)", t.channel),
            );
        }
        if tables::scene_name(&t.scene).is_none() {
            v.problem(
                "terminal.scene",
                format!("`{}` is not a scene code of table 3.3.1", t.scene),
            );
        } else if tables::scene_needs_department(&t.scene)
            && t.department.as_deref().is_none_or(|d| d.trim().is_empty())
        {
            v.problem(
                "terminal.department",
                format!("required when the default scene is {} (reportHISData needs a department for registration scenes)", t.scene),
            );
        }
        match clock::parse_offset(&t.utc_offset) {
            Some(o) => utc_offset = o,
            None => v.problem(
                "terminal.utc_offset",
                format!("`{}` is not a UTC offset like +08:00", t.utc_offset),
            ),
        }
    }

    let mut names = HashSet::new();
    for (i, s) in scanners.iter() {
        if s.name.trim().is_empty() {
            v.problem(format!("scanner[{i}].name"), "must not be empty".into());
        } else if !names.insert(s.name.clone()) {
            v.problem(
                format!("scanner[{i}].name"),
                format!("duplicate scanner name `{}`", s.name),
            );
        }
        v.check_scanner(*i, s);
    }

    let his_tcp = his
        .listen_tcp
        .as_deref()
        .and_then(|a| v.loopback("his.listen_tcp", a));
    let his_ws = his
        .listen_ws
        .as_deref()
        .and_then(|a| v.loopback("his.listen_ws", a));
    let his_http = his
        .listen_http
        .as_deref()
        .and_then(|a| v.loopback("his.listen_http", a));
    let metrics_addr = metrics
        .as_ref()
        .and_then(|m| v.loopback("metrics.listen", &m.listen));
    for (i, o) in his.allowed_origins.iter().enumerate() {
        if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
            v.problem(
                format!("his.allowed_origins[{i}]"),
                format!("`{o}` is not an origin like https://his.example.cn (scheme, host, optional port, no path)"),
            );
        }
    }
    if let Some(g) = &his.socket_group {
        v.nonempty("his.socket_group", g);
    }
    v.positive("his.max_clients", his.max_clients as u64);
    let his_token = his.token_file.as_deref().map(resolve).and_then(|p| {
        match crate::secrets::read(&p, crate::secrets::Readers::Group) {
            Ok(t) if t.len() < 16 => {
                v.problem("his.token_file", format!("{}: the token is shorter than 16 characters; use e.g. `openssl rand -hex 32`", p.display()));
                None
            }
            Ok(t) => Some(Secret(t)),
            Err(e) => {
                v.problem("his.token_file", e.to_string());
                None
            }
        }
    });

    v.positive("outbox.batch", u64::from(outbox.batch));
    v.positive("outbox.concurrency", u64::from(outbox.concurrency));

    let state_dir = env
        .state_directory
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/ehc-agent"));
    let runtime_dir = env
        .runtime_directory
        .clone()
        .unwrap_or_else(|| PathBuf::from("/run/ehc-agent"));
    let outbox_path = outbox
        .path
        .as_deref()
        .map(resolve)
        .unwrap_or_else(|| state_dir.join("outbox.sqlite"));
    let state_path = platform
        .as_ref()
        .and_then(|p| p.state_path.as_deref().map(resolve))
        .unwrap_or_else(|| {
            outbox_path
                .parent()
                .unwrap_or(&state_dir)
                .join("state.sqlite")
        });
    let his_unix = his
        .listen_unix
        .as_deref()
        .map(resolve)
        .unwrap_or_else(|| runtime_dir.join("his.sock"));

    if !v.problems.is_empty() {
        return Err(v.problems);
    }
    let (Some(platform), Some(terminal), Some((secret_source, app_secret))) =
        (platform, terminal, secret)
    else {
        // Unreachable in practice: a missing section or secret is a problem above.
        return Err(vec![Problem {
            key: "(file)".into(),
            message: "incomplete configuration".into(),
        }]);
    };
    Ok(Config {
        source: None,
        platform,
        secret_source,
        app_secret,
        terminal,
        utc_offset,
        scanners: scanners.into_iter().map(|(_, s)| s).collect(),
        his,
        his_tcp,
        his_ws,
        his_http,
        his_unix,
        his_token,
        offline,
        outbox,
        outbox_path,
        state_path,
        metrics: metrics_addr,
    })
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, key: impl Into<String>, message: String) {
        self.problems.push(Problem {
            key: key.into(),
            message,
        });
    }

    /// Deserialize `doc[name]` into `T`, collecting every unknown key.
    fn section<T: DeserializeOwned>(
        &mut self,
        doc: &mut toml::Table,
        name: &str,
        required: bool,
    ) -> Option<T> {
        match doc.remove(name) {
            None => {
                if required {
                    self.problem(name, "missing section".into());
                }
                None
            }
            Some(toml::Value::Table(t)) => self.table(t, name),
            Some(_) => {
                self.problem(name, "must be a table ([section])".into());
                None
            }
        }
    }

    /// Deserialize one table: unknown keys recorded, and every key with a
    /// wrong value recorded at its path (each is set aside in turn and the
    /// table tried again).
    fn table<T: DeserializeOwned>(&mut self, mut t: toml::Table, path: &str) -> Option<T> {
        let mut unknown: Vec<String> = Vec::new();
        let mut blamed: Vec<String> = Vec::new();
        loop {
            let mut ignored = Vec::new();
            let value = toml::Value::Table(t.clone());
            let result: Result<T, _> = serde_path_to_error::deserialize(
                serde_ignored::Deserializer::new(value, &mut |p: serde_ignored::Path<'_>| {
                    ignored.push(p.to_string())
                }),
            );
            for k in ignored {
                if !unknown.contains(&k) {
                    self.problem(format!("{path}.{k}"), "unknown key".into());
                    unknown.push(k);
                }
            }
            let e = match result {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            let at = e.path().to_string();
            let msg = e.inner().message().trim().to_owned();
            if let Some(field) = missing_field(&msg) {
                // A required key that is absent (not one set aside for a
                // wrong value: that was reported already).
                if !blamed.contains(&field) {
                    let key = if at == "." || at.is_empty() {
                        field
                    } else {
                        format!("{at}.{field}")
                    };
                    self.problem(format!("{path}.{key}"), "missing required key".into());
                }
                return None;
            }
            let top = at.split(['.', '[']).next().unwrap_or_default().to_owned();
            if top.is_empty() || top == "?" || t.remove(&top).is_none() {
                self.problem(path, msg);
                return None;
            }
            self.problem(format!("{path}.{at}"), msg);
            blamed.push(top);
        }
    }

    fn scanners(&mut self, doc: &mut toml::Table) -> Vec<(usize, ScannerSection)> {
        let mut out = Vec::new();
        match doc.remove("scanner") {
            None => {}
            Some(toml::Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    let path = format!("scanner[{i}]");
                    match item {
                        toml::Value::Table(t) => {
                            if let Some(s) = self.table::<ScannerSection>(t, &path) {
                                out.push((i, s));
                            }
                        }
                        _ => self.problem(path, "must be a table ([[scanner]])".into()),
                    }
                }
            }
            Some(_) => self.problem("scanner", "must be an array of tables ([[scanner]])".into()),
        }
        out
    }

    fn nonempty(&mut self, key: &str, v: &str) {
        if v.trim().is_empty() {
            self.problem(key, "must not be empty".into());
        }
    }

    fn positive(&mut self, key: &str, v: u64) {
        if v == 0 {
            self.problem(key, "must be greater than 0".into());
        }
    }

    fn check_base_url(&mut self, key: &str, url: &str) {
        let Ok(u) = reqwest::Url::parse(url) else {
            self.problem(key, format!("`{url}` is not a URL"));
            return;
        };
        match u.scheme() {
            "https" => {}
            "http" => {
                let host = u.host_str().unwrap_or_default();
                let loopback = host == "localhost"
                    || host
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    self.problem(
                        key,
                        format!("plain http is allowed only for loopback addresses (patients' identities cross this link); use https: `{url}`"),
                    );
                }
            }
            s => self.problem(key, format!("scheme `{s}` is not http or https")),
        }
        if u.path() != "/" && !u.path().is_empty() {
            // The API paths are appended to the base; a path here is almost
            // always a pasted full API address.
            if u.path().contains("/rest/") {
                self.problem(key, "give the base address only, without /rest/... (the agent appends each API's path)".into());
            }
        }
    }

    fn loopback(&mut self, key: &str, addr: &str) -> Option<SocketAddr> {
        match addr.parse::<SocketAddr>() {
            Err(_) => {
                self.problem(
                    key,
                    format!("`{addr}` is not an address like 127.0.0.1:7410"),
                );
                None
            }
            Ok(a) if !a.ip().is_loopback() => {
                self.problem(
                    key,
                    format!("`{addr}` is not a loopback address: patients' identities must not be served to the network"),
                );
                None
            }
            Ok(a) => Some(a),
        }
    }

    /// Read the app secret: the systemd credential wins over the file.
    fn secret(&mut self, file: Option<PathBuf>, env: &Env) -> Option<(PathBuf, Secret)> {
        let key = "platform.app_secret_file";
        let credential = env
            .credentials_directory
            .as_ref()
            .map(|d| d.join(SECRET_CREDENTIAL))
            .filter(|p| p.exists());
        let (path, from_credential) = match (credential, file) {
            (Some(c), _) => (c, true),
            (None, Some(f)) => (f, false),
            (None, None) => {
                self.problem(key, format!("missing: name a file, or pass the systemd credential `{SECRET_CREDENTIAL}`"));
                return None;
            }
        };
        let readers = if from_credential {
            crate::secrets::Readers::Credential
        } else {
            crate::secrets::Readers::Owner
        };
        match crate::secrets::read(&path, readers) {
            Err(e) => {
                self.problem(key, e.to_string());
                None
            }
            Ok(s) => Some((path, Secret(s))),
        }
    }

    fn check_scanner(&mut self, i: usize, s: &ScannerSection) {
        let k = |f: &str| format!("scanner[{i}].{f}");
        match s.kind {
            ScannerKind::Serial => {
                if s.path.is_none() {
                    self.problem(
                        k("path"),
                        "required for a serial scanner (prefer a /dev/serial/by-id/ name)".into(),
                    );
                }
                match s.baud {
                    None => self.problem(
                        k("baud"),
                        "required for a serial scanner (9600 is common)".into(),
                    ),
                    Some(0) => self.problem(k("baud"), "must be greater than 0".into()),
                    Some(_) => {}
                }
            }
            ScannerKind::UsbHid => {
                if s.vendor_id.is_none() {
                    self.problem(k("vendor_id"), "required for a usb-hid scanner".into());
                }
            }
            ScannerKind::Evdev => {
                if s.path.is_none() {
                    self.problem(
                        k("path"),
                        "required for an evdev scanner (a /dev/input/by-id/ name)".into(),
                    );
                }
            }
            ScannerKind::HidPos => {
                if s.path.is_none() && s.vendor_id.is_none() {
                    self.problem(
                        k("path"),
                        "a hid-pos scanner needs a hidraw path or a vendor_id".into(),
                    );
                }
            }
            ScannerKind::Stdin => {}
        }
        if s.terminator == Terminator::None && s.idle_ms == 0 {
            self.problem(
                k("idle_ms"),
                "must be greater than 0 when terminator is \"none\" (it is what ends a scan)"
                    .into(),
            );
        }
    }
}

/// `missing field `x`` → `x`.
fn missing_field(msg: &str) -> Option<String> {
    msg.strip_prefix("missing field `")
        .and_then(|r| r.split('`').next())
        .map(str::to_owned)
}

impl Config {
    /// One screen for `ehc-agent check`: the effective values, secret
    /// redacted.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let p = &self.platform;
        let t = &self.terminal;
        let _ = writeln!(
            s,
            "configuration: {}",
            self.source
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(text)".into())
        );
        let _ = writeln!(
            s,
            "platform   {} app_id={} hospital_id={}",
            p.base_url, p.app_id, p.hospital_id
        );
        let _ = writeln!(
            s,
            "           secret=<redacted> from {}",
            self.secret_source.display()
        );
        let _ = writeln!(
            s,
            "           timeouts: scan {} ms, upload {} ms; warm {} s, kept warm {} min; proxy {}; extra CA {}",
            p.timeout_ms,
            p.upload_timeout_ms,
            p.warm_s,
            p.keep_warm_min,
            p.proxy.as_deref().unwrap_or("none"),
            p.ca_file
                .as_deref()
                .map(|c| c.display().to_string())
                .unwrap_or_else(|| "none".into())
        );
        let _ = writeln!(
            s,
            "terminal   {} channel {} ({}) scene {} ({}) department {}",
            t.id,
            t.channel,
            tables::channel_name(&t.channel).unwrap_or("?"),
            t.scene,
            tables::scene_name(&t.scene).unwrap_or("?"),
            t.department.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            s,
            "           {} {} / {} {}, time at UTC{}",
            t.hospital_code, t.hospital_name, t.city_code, t.city_name, t.utc_offset
        );
        if self.scanners.is_empty() {
            let _ = writeln!(s, "scanners   none (scans only through `ehc-agent scan`)");
        }
        for sc in &self.scanners {
            let dev = match (&sc.path, sc.vendor_id) {
                (Some(p), _) => p.display().to_string(),
                (None, Some(v)) => format!(
                    "{v:04x}:{}",
                    sc.product_id
                        .map(|p| format!("{p:04x}"))
                        .unwrap_or_else(|| "*".into())
                ),
                _ => "-".into(),
            };
            let _ = writeln!(s, "scanner    {} {} {}", sc.name, as_written(&sc.kind), dev);
        }
        let h = &self.his;
        let _ = writeln!(
            s,
            "his        unix {} (group {})",
            self.his_unix.display(),
            h.socket_group.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            s,
            "           tcp {} ws {} http {} origins [{}]",
            opt_addr(self.his_tcp),
            opt_addr(self.his_ws),
            opt_addr(self.his_http),
            h.allowed_origins.join(", ")
        );
        let _ = writeln!(
            s,
            "           hold {} s, use wait {} s",
            h.hold_s, h.use_wait_s
        );
        let _ = writeln!(
            s,
            "offline    static codes {}, dynamic codes {}",
            as_written(&self.offline.static_codes),
            as_written(&self.offline.dynamic_codes)
        );
        let o = &self.outbox;
        let _ = writeln!(
            s,
            "outbox     {} batch {} concurrency {} retention {} d report_dynamic {}",
            self.outbox_path.display(),
            o.batch,
            o.concurrency,
            o.retention_days,
            o.report_dynamic
        );
        let _ = writeln!(s, "state      {}", self.state_path.display());
        let _ = writeln!(s, "metrics    {}", opt_addr(self.metrics));
        s
    }
}

/// An enum value as it is spelled in the file.
fn as_written<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn opt_addr(a: Option<SocketAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_else(|| "off".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A temp dir holding an app secret with mode 0600.
    fn secret_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("app_secret");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        d
    }

    fn minimal(secret: &Path) -> String {
        format!(
            r#"
[platform]
base_url = "http://127.0.0.1:8900"
app_id = "app"
app_secret_file = "{}"
hospital_id = "10086"
[terminal]
id = "WIN-1"
department = "内科"
city_code = "110000"
city_name = "北京市"
hospital_code = "01"
hospital_name = "医院"
"#,
            secret.display()
        )
    }

    fn keys(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn example_config_passes_with_a_credential() {
        let d = secret_dir();
        let env = Env {
            credentials_directory: Some(d.path().to_owned()),
            ..Env::default()
        };
        let text = include_str!("../config/agent.toml");
        let c = parse(text, Path::new("/etc/ehc-agent"), &env).unwrap_or_else(|p| panic!("{p:#?}"));
        assert_eq!(c.app_secret.expose(), "s3cret");
        assert_eq!(c.secret_source, d.path().join("app_secret"));
        assert_eq!(c.scanners.len(), 1);
        assert_eq!(c.his_tcp, None, "the shipped example keeps TCP off");
        assert!(!c.summary().contains("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn minimal_config_and_defaults_follow_systemd_dirs() {
        let d = secret_dir();
        let env = Env {
            state_directory: Some("/var/lib/ehc-agent-test".into()),
            runtime_directory: Some("/run/ehc-test".into()),
            ..Env::default()
        };
        let c = parse(
            &minimal(&d.path().join("app_secret")),
            Path::new("/x"),
            &env,
        )
        .unwrap();
        assert_eq!(
            c.outbox_path,
            Path::new("/var/lib/ehc-agent-test/outbox.sqlite")
        );
        assert_eq!(
            c.state_path,
            Path::new("/var/lib/ehc-agent-test/state.sqlite")
        );
        assert_eq!(c.his_unix, Path::new("/run/ehc-test/his.sock"));
        assert_eq!(c.platform.timeout_ms, 3000);
        assert_eq!(c.terminal.channel, "0100");
        assert_eq!(c.utc_offset, clock::BEIJING);
        assert_eq!(c.offline.static_codes, StaticOffline::PassUnverified);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("app_secret");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            r#"
[platform]
base_url = "http://platform.example.cn"
app_id = "app"
app_secret_file = "{}"
hospital_id = "10086"
timeout_ms = 0
colour = "blue"
flavour = "x"
[terminal]
id = "WIN-1"
channel = "9999"
scene = "0101011"
city_code = "110000"
city_name = "北京市"
hospital_code = "01"
hospital_name = "医院"
utc_offset = "Beijing"
[[scanner]]
name = "a"
kind = "stdin"
[[scanner]]
name = "a"
kind = "serial"
[his]
listen_tcp = "0.0.0.0:7410"
[outbox]
batch = 0
[bogus]
x = 1
"#,
            secret.display()
        );
        let problems = parse(&text, d.path(), &Env::default()).unwrap_err();
        let k = keys(&problems);
        for want in [
            "platform.colour",
            "platform.flavour",
            "platform.base_url",
            "platform.timeout_ms",
            "platform.app_secret_file",
            "terminal.channel",
            "terminal.department",
            "terminal.utc_offset",
            "scanner[1].name",
            "scanner[1].path",
            "scanner[1].baud",
            "his.listen_tcp",
            "outbox.batch",
            "bogus",
        ] {
            assert!(k.contains(&want), "missing {want} in {problems:#?}");
        }
        let secret_msg = &problems
            .iter()
            .find(|p| p.key == "platform.app_secret_file")
            .unwrap()
            .message;
        assert!(
            secret_msg.contains("readable by group or others"),
            "{secret_msg}"
        );
    }

    #[test]
    fn missing_and_empty_secret_and_missing_sections() {
        let d = tempfile::tempdir().unwrap();
        let p = parse(&minimal(&d.path().join("nope")), d.path(), &Env::default()).unwrap_err();
        assert_eq!(keys(&p), ["platform.app_secret_file"]);
        let empty = d.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = parse(&minimal(&empty), d.path(), &Env::default()).unwrap_err();
        assert!(p[0].message.contains("is empty"), "{p:?}");
        let p = parse("", d.path(), &Env::default()).unwrap_err();
        assert_eq!(keys(&p), ["platform", "terminal"]);
        let p = parse("[platform]\napp_id = \"a\"\n", d.path(), &Env::default()).unwrap_err();
        assert!(keys(&p).contains(&"platform.base_url"), "{p:?}");
    }

    #[test]
    fn syntax_error_is_one_problem() {
        let p = parse("[platform\nx=", Path::new("."), &Env::default()).unwrap_err();
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("not valid TOML"));
    }

    #[test]
    fn type_errors_name_the_section() {
        let d = secret_dir();
        let text = minimal(&d.path().join("app_secret")) + "[outbox]\nbatch = \"many\"\n";
        let p = parse(&text, d.path(), &Env::default()).unwrap_err();
        assert_eq!(keys(&p), ["outbox.batch"], "{p:?}");
        // Two wrong types and a missing required key in one section: all three.
        let text =
            "[platform]\nbase_url = 1\napp_id = \"a\"\nhospital_id = [1]\n[terminal]\nid = \"x\"\n";
        let p = parse(text, d.path(), &Env::default()).unwrap_err();
        let k = keys(&p);
        assert!(
            k.contains(&"platform.base_url") && k.contains(&"platform.hospital_id"),
            "{p:?}"
        );
    }

    #[test]
    fn loopback_rules() {
        let d = secret_dir();
        let base = minimal(&d.path().join("app_secret"));
        for (extra, ok) in [
            ("[his]\nlisten_tcp = \"[::1]:7410\"\n", true),
            ("[his]\nlisten_ws = \"192.168.1.5:7411\"\n", false),
            ("[metrics]\nlisten = \"0.0.0.0:9410\"\n", false),
            (
                "[his]\nallowed_origins = [\"https://his.example.cn\"]\n",
                true,
            ),
            ("[his]\nallowed_origins = [\"his.example.cn\"]\n", false),
        ] {
            assert_eq!(
                parse(&(base.clone() + extra), d.path(), &Env::default()).is_ok(),
                ok,
                "{extra}"
            );
        }
        for (url, ok) in [
            ("https://p-healthopen.tengmed.com", true),
            ("http://localhost:8900", true),
            ("http://[::1]:8900", true),
            ("http://10.0.0.1", false),
            ("ftp://x", false),
            ("https://p-healthopen.tengmed.com/rest/auth/x", false),
        ] {
            let t = base.replace("http://127.0.0.1:8900", url);
            assert_eq!(parse(&t, d.path(), &Env::default()).is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn discovery_order() {
        let d = tempfile::tempdir().unwrap();
        let user = d.path().join("user.toml");
        let env = Env {
            config_var: Some("/from/env.toml".into()),
            user_config: Some(user.clone()),
            ..Env::default()
        };
        assert_eq!(
            discover(Some(Path::new("/cli.toml")), &env).unwrap(),
            Path::new("/cli.toml")
        );
        assert_eq!(discover(None, &env).unwrap(), Path::new("/from/env.toml"));
        if !Path::new(SYSTEM_CONFIG).exists() {
            let env = Env {
                user_config: Some(user.clone()),
                ..Env::default()
            };
            assert!(matches!(
                discover(None, &env),
                Err(ConfigError::NotFound(_))
            ));
            std::fs::write(&user, "").unwrap();
            assert_eq!(discover(None, &env).unwrap(), user);
        }
    }
}
