//! The gateway's configuration (`/etc/ehc-agent/gateway.toml`): where it
//! listens for terminals, where it keeps its state, and the hospital's one
//! account on the platform (upstream).
//!
//! ```toml
//! [gateway]
//! listen = "127.0.0.1:7443"          # plain HTTP: loopback only (see docs/gateway.md)
//! public_url = "http://127.0.0.1:7443"  # what terminals put in base_url
//! state_dir = "/var/lib/ehc-agent-gateway"  # default $STATE_DIRECTORY
//! token_ttl_s = 7200                 # terminals' tokens
//! daily_budget = 100                 # optional: calls per interface per Beijing day (10034 past it)
//! budget_scope = "interface"         # or "hospital": every interface counted against one budget
//! scan_reserve = 20                  # with "hospital": the last 20 calls kept for scans
//!
//! [upstream]
//! base_url = "https://p-healthopen.tengmed.com"
//! app_id = "..."
//! app_secret_file = "/etc/ehc-agent/gateway_app_secret"  # or the systemd credential `app_secret`
//! hospital_id = "..."
//! ```
//!
//! Problems are collected like the agent's: every one, with its key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{Env, Problem, Secret, SECRET_CREDENTIAL};
use crate::platform::ClientSettings;

/// Where the gateway looks for its configuration without `--config`.
pub const DEFAULT_PATH: &str = "/etc/ehc-agent/gateway.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    gateway: GatewaySection,
    upstream: UpstreamSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewaySection {
    listen: String,
    #[serde(default)]
    public_url: Option<String>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default = "default_ttl")]
    token_ttl_s: u64,
    #[serde(default)]
    daily_budget: Option<u64>,
    #[serde(default)]
    budget_scope: BudgetScope,
    #[serde(default)]
    scan_reserve: u64,
    #[serde(default = "default_skew")]
    max_skew_s: u64,
    /// Serve TLS with this certificate chain and key (`gateway tls init`).
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    /// Two or more gateways: the shared store (`redis://host:port/db`).
    #[serde(default)]
    redis_url: Option<String>,
    #[serde(default = "default_prefix")]
    redis_prefix: String,
    /// The admin listener (the fleet page, `/api/fleet`, Prometheus
    /// `/metrics`), apart from the terminals' port. `metrics_listen` is its
    /// older name.
    #[serde(default, alias = "metrics_listen")]
    admin_listen: Option<String>,
    /// Off loopback, the admin listener serves these networks (CIDR)...
    #[serde(default)]
    admin_allow: Vec<String>,
    /// ...with this token (a file holding it, mode 0600).
    #[serde(default)]
    admin_token_file: Option<PathBuf>,
}

fn default_prefix() -> String {
    "ehc-gateway:".into()
}

fn default_ttl() -> u64 {
    7200
}
fn default_skew() -> u64 {
    300
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSection {
    base_url: String,
    app_id: String,
    #[serde(default)]
    app_secret_file: Option<PathBuf>,
    hospital_id: String,
    #[serde(default = "default_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_upload_timeout")]
    upload_timeout_ms: u64,
    #[serde(default)]
    proxy: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    /// As the agent's `[platform] warm_s` and `keep_warm_min`: the
    /// gateway keeps its own connection to the platform warm, so a
    /// terminal's scan after a quiet hour still costs one round trip.
    #[serde(default = "default_warm_s")]
    warm_s: u64,
    #[serde(default = "default_keep_warm_min")]
    keep_warm_min: u64,
}

fn default_warm_s() -> u64 {
    25
}
/// A day: the gateway's one upstream connection serves every counter,
/// emergency ones at night too; one `HEAD` per `warm_s` costs nothing.
fn default_keep_warm_min() -> u64 {
    1440
}

fn default_timeout() -> u64 {
    3000
}
fn default_upload_timeout() -> u64 {
    15000
}

/// What one `daily_budget` counts. The reference (3.1.1, 10034) limits
/// each interface on its own, and that is the default; `hospital` is for a
/// platform that counts a hospital's calls together, where the uploads
/// (which wait in the terminals' outboxes without harm) must not spend the
/// calls a patient at the window needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    #[default]
    Interface,
    Hospital,
}

/// The hospital's daily budget, as the gateway applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub per_day: u64,
    pub scope: BudgetScope,
    /// With `Hospital`: calls past `per_day - scan_reserve` go to scans only.
    pub scan_reserve: u64,
}

/// The counter one call of `api` goes to in the hospital scope.
pub const HOSPITAL_COUNTER: &str = "all";

impl Budget {
    /// The counter a call of `api` is taken from, and the most that counter
    /// may reach for it.
    pub fn counter<'a>(&self, api: &'a str) -> (&'a str, u64) {
        use crate::platform::api::{Api as _, GetHealthCardByQrCode, VerifyQrCode};
        match self.scope {
            BudgetScope::Interface => (api, self.per_day),
            BudgetScope::Hospital
                if api == VerifyQrCode::NAME || api == GetHealthCardByQrCode::NAME =>
            {
                (HOSPITAL_COUNTER, self.per_day)
            }
            BudgetScope::Hospital => (HOSPITAL_COUNTER, self.per_day - self.scan_reserve),
        }
    }
}

/// A validated gateway configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub source: PathBuf,
    pub listen: SocketAddr,
    pub public_url: String,
    pub state_dir: PathBuf,
    pub token_ttl_s: u64,
    pub budget: Option<Budget>,
    pub max_skew_s: u64,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub redis: Option<(String, String)>,
    /// The admin listener (page, `/api/fleet`, `/metrics`).
    pub metrics_listen: Option<SocketAddr>,
    /// Who may use it from off loopback: networks, and the token they must
    /// present (both set when the listener is not on loopback).
    pub admin_allow: Vec<String>,
    pub admin_token: Option<String>,
    pub hospital_id: String,
    pub upstream: ClientSettings,
}

impl GatewayConfig {
    /// The gateway's own store (terminals, their tokens, the budget).
    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("gateway.sqlite")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayConfigError {
    #[error("{path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {}: {}", p.key, p.message)).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// Read and validate `path` (or [`DEFAULT_PATH`]).
pub fn load(path: Option<&Path>, env: &Env) -> Result<GatewayConfig, GatewayConfigError> {
    let path = path
        .map(Path::to_owned)
        .unwrap_or_else(|| DEFAULT_PATH.into());
    let text = std::fs::read_to_string(&path).map_err(|e| GatewayConfigError::Read {
        path: path.clone(),
        error: e.to_string(),
    })?;
    parse(&text, &path, env).map_err(|problems| GatewayConfigError::Invalid { path, problems })
}

pub fn parse(text: &str, path: &Path, env: &Env) -> Result<GatewayConfig, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| {
        problems.push(Problem {
            key: key.into(),
            message,
        })
    };
    let value: toml::Value = match toml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            problem(
                "(file)",
                format!("not valid TOML: {}", e.to_string().trim()),
            );
            return Err(problems);
        }
    };
    let file: File = match serde_path_to_error::deserialize(value) {
        Ok(f) => f,
        Err(e) => {
            problem(&e.path().to_string(), e.inner().message().trim().to_owned());
            return Err(problems);
        }
    };
    let base = path.parent().unwrap_or(Path::new("/"));
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let g = &file.gateway;
    let tls = match (&g.tls_cert, &g.tls_key) {
        (Some(c), Some(k)) => {
            for (key, p) in [("gateway.tls_cert", c), ("gateway.tls_key", k)] {
                if !resolve(p).is_file() {
                    problem(
                        key,
                        format!(
                            "{}: no such file (`ehc-agent gateway tls init` makes them)",
                            resolve(p).display()
                        ),
                    );
                }
            }
            true
        }
        (None, None) => false,
        _ => {
            problem(
                "gateway.tls_cert",
                "give both tls_cert and tls_key, or neither".into(),
            );
            false
        }
    };
    let listen = match g.listen.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_loopback() || tls => Some(a),
        // Terminal tokens, signatures and patients' identities would cross
        // the network in clear text.
        Ok(_) => {
            problem("gateway.listen", format!("`{}`: plain HTTP is served only on a loopback address; set tls_cert and tls_key for other machines (`ehc-agent gateway tls init`, docs/gateway.md)", g.listen));
            None
        }
        Err(_) => {
            problem(
                "gateway.listen",
                format!("`{}` is not an address like 127.0.0.1:7443", g.listen),
            );
            None
        }
    };
    if g.token_ttl_s < 120 {
        problem("gateway.token_ttl_s", "at least 120 s".into());
    }
    let metrics_listen = match g.admin_listen.as_deref().map(str::parse::<SocketAddr>) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => {
            problem(
                "gateway.admin_listen",
                "an address like 127.0.0.1:9411".into(),
            );
            None
        }
    };
    for net in &g.admin_allow {
        if !super::server::valid_cidr(net) {
            problem(
                "gateway.admin_allow",
                format!("`{net}` is not an address or a network like 10.1.0.0/16"),
            );
        }
    }
    let admin_token = match g.admin_token_file.as_deref().map(resolve) {
        None => None,
        Some(f) => match crate::secrets::read(&f, crate::secrets::Readers::Owner) {
            Ok(t) if t.len() >= 16 => Some(t),
            Ok(_) => {
                problem(
                    "gateway.admin_token_file",
                    "the token must be at least 16 characters".into(),
                );
                None
            }
            Err(e) => {
                problem("gateway.admin_token_file", e.to_string());
                None
            }
        },
    };
    // Off loopback the page shows every terminal's state to whoever asks:
    // both a network allowlist and a token, or it is refused.
    if let Some(a) = metrics_listen.filter(|a| !a.ip().is_loopback()) {
        if g.admin_allow.is_empty() || g.admin_token_file.is_none() {
            problem(
                "gateway.admin_listen",
                format!("{a} is not loopback: set admin_allow (the networks of hospital IT) and admin_token_file too"),
            );
        }
    }
    if let Some(u) = &g.redis_url {
        if redis::Client::open(u.as_str()).is_err() {
            problem("gateway.redis_url", format!("`{u}` is not a redis:// URL"));
        }
    }
    if g.daily_budget == Some(0) {
        problem("gateway.daily_budget", "must be greater than 0".into());
    }
    if g.scan_reserve > 0 {
        match (g.daily_budget, g.budget_scope) {
            (None, _) => problem(
                "gateway.scan_reserve",
                "needs `daily_budget`: a reserve of no budget".into(),
            ),
            (Some(_), BudgetScope::Interface) => problem(
                "gateway.scan_reserve",
                "protects nothing with `budget_scope = \"interface\"` (scans and uploads are different interfaces, each with its own budget); set `budget_scope = \"hospital\"` if the platform counts the hospital's calls together".into(),
            ),
            (Some(b), BudgetScope::Hospital) if g.scan_reserve >= b => problem(
                "gateway.scan_reserve",
                format!("{} leaves no budget for uploads: it must be less than daily_budget ({b})", g.scan_reserve),
            ),
            _ => {}
        }
    }
    let u = &file.upstream;
    if reqwest::Url::parse(&u.base_url).is_err() {
        problem(
            "upstream.base_url",
            format!("`{}` is not a URL", u.base_url),
        );
    }
    for (k, v) in [
        ("upstream.app_id", &u.app_id),
        ("upstream.hospital_id", &u.hospital_id),
    ] {
        if v.trim().is_empty() {
            problem(k, "must not be empty".into());
        }
    }
    let credential = env
        .credentials_directory
        .as_ref()
        .map(|d| d.join(SECRET_CREDENTIAL))
        .filter(|p| p.exists());
    let secret = match (credential, u.app_secret_file.as_deref().map(resolve)) {
        (Some(c), _) => crate::secrets::read(&c, crate::secrets::Readers::Credential),
        (None, Some(f)) => crate::secrets::read(&f, crate::secrets::Readers::Owner),
        (None, None) => {
            problem(
                "upstream.app_secret_file",
                format!(
                    "missing: name a file, or pass the systemd credential `{SECRET_CREDENTIAL}`"
                ),
            );
            Ok(String::new())
        }
    };
    let secret = match secret {
        Ok(s) => s,
        Err(e) => {
            problem("upstream.app_secret_file", e.to_string());
            String::new()
        }
    };
    let state_dir = g
        .state_dir
        .as_deref()
        .map(resolve)
        .or_else(|| env.state_directory.clone())
        .unwrap_or_else(|| PathBuf::from("/var/lib/ehc-agent-gateway"));
    if !problems.is_empty() {
        return Err(problems);
    }
    let listen = listen.expect("checked above");
    Ok(GatewayConfig {
        source: path.to_owned(),
        listen,
        public_url: g
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{}://{listen}", if tls { "https" } else { "http" })),
        tls_cert: g.tls_cert.as_deref().map(resolve),
        tls_key: g.tls_key.as_deref().map(resolve),
        metrics_listen,
        admin_allow: g.admin_allow.clone(),
        admin_token,
        redis: g.redis_url.clone().map(|u| (u, g.redis_prefix.clone())),
        token_ttl_s: g.token_ttl_s,
        budget: g.daily_budget.map(|per_day| Budget {
            per_day,
            scope: g.budget_scope,
            scan_reserve: g.scan_reserve,
        }),
        max_skew_s: g.max_skew_s,
        hospital_id: u.hospital_id.clone(),
        upstream: ClientSettings {
            base_url: u.base_url.clone(),
            fallback_urls: Vec::new(),
            app_id: u.app_id.clone(),
            hospital_id: u.hospital_id.clone(),
            secret: Secret::new(secret),
            scan_timeout: std::time::Duration::from_millis(u.timeout_ms),
            upload_timeout: std::time::Duration::from_millis(u.upload_timeout_ms),
            proxy: u.proxy.clone(),
            ca_file: u.ca_file.as_deref().map(resolve),
            warm: std::time::Duration::from_secs(u.warm_s.max(1)),
            keep_warm: std::time::Duration::from_secs(u.keep_warm_min * 60),
            // A terminal's `HEAD /` asks for it (server.rs).
            preconnect: true,
            state_path: Some(state_dir.join("upstream.sqlite")),
            shared: None,
        },
        state_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn every_problem_is_named_and_plain_http_is_loopback_only() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("s");
        std::fs::write(&secret, "sec").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "[gateway]\nlisten = \"0.0.0.0:7443\"\ntoken_ttl_s = 5\n[upstream]\nbase_url = \"nope\"\napp_id = \"\"\nhospital_id = \"h\"\napp_secret_file = \"{}\"\n",
            secret.display()
        );
        let p = parse(&text, &d.path().join("g.toml"), &Env::default()).unwrap_err();
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "gateway.listen",
                "gateway.token_ttl_s",
                "upstream.base_url",
                "upstream.app_id"
            ]
        );
        let good = text
            .replace("0.0.0.0", "127.0.0.1")
            .replace("token_ttl_s = 5", "")
            .replace("\"nope\"", "\"http://127.0.0.1:1\"")
            .replace("app_id = \"\"", "app_id = \"a\"");
        let c = parse(&good, &d.path().join("g.toml"), &Env::default()).unwrap();
        assert_eq!(c.public_url, "http://127.0.0.1:7443");
        assert_eq!(c.upstream.secret.expose(), "sec");
    }

    #[test]
    fn a_scan_reserve_only_where_it_protects_something() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("s");
        std::fs::write(&secret, "sec").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with = |budget: &str| {
            let text = format!(
                "[gateway]\nlisten = \"127.0.0.1:7443\"\n{budget}\n[upstream]\nbase_url = \"http://127.0.0.1:1\"\napp_id = \"a\"\nhospital_id = \"h\"\napp_secret_file = \"{}\"\n",
                secret.display()
            );
            parse(&text, &d.path().join("g.toml"), &Env::default())
        };
        for (budget, why) in [
            ("scan_reserve = 5", "needs `daily_budget`"),
            ("daily_budget = 100\nscan_reserve = 5", "protects nothing"),
            (
                "daily_budget = 5\nbudget_scope = \"hospital\"\nscan_reserve = 5",
                "must be less than daily_budget (5)",
            ),
        ] {
            let p = with(budget).unwrap_err();
            assert_eq!(p.len(), 1, "{budget}: {p:?}");
            assert_eq!(p[0].key, "gateway.scan_reserve");
            assert!(p[0].message.contains(why), "{budget}: {}", p[0].message);
        }
        let p = with("daily_budget = 5\nbudget_scope = \"everything\"").unwrap_err();
        assert!(p[0].message.contains("interface"), "{p:?}");

        let b = with("daily_budget = 100\nbudget_scope = \"hospital\"\nscan_reserve = 20")
            .unwrap()
            .budget
            .unwrap();
        assert_eq!(b.counter("verifyQRCode"), (HOSPITAL_COUNTER, 100));
        assert_eq!(b.counter("getHealthCardByQRCode"), (HOSPITAL_COUNTER, 100));
        assert_eq!(b.counter("reportHISData"), (HOSPITAL_COUNTER, 80));
        assert_eq!(b.counter("bindCardRelation"), (HOSPITAL_COUNTER, 80));
        let b = with("daily_budget = 100").unwrap().budget.unwrap();
        assert_eq!(b.counter("reportHISData"), ("reportHISData", 100));
        assert_eq!(b.counter("verifyQRCode"), ("verifyQRCode", 100));
    }

    #[test]
    fn the_admin_listener_off_loopback_needs_networks_and_a_token() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("s");
        std::fs::write(&secret, "sec").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token = d.path().join("admin_token");
        std::fs::write(&token, "a-long-admin-token-0123456789\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with = |admin: &str| {
            let text = format!(
                "[gateway]\nlisten = \"127.0.0.1:7443\"\n{admin}\n[upstream]\nbase_url = \"http://127.0.0.1:1\"\napp_id = \"a\"\nhospital_id = \"h\"\napp_secret_file = \"{}\"\n",
                secret.display()
            );
            parse(&text, &d.path().join("g.toml"), &Env::default())
        };
        // The old name still works, on loopback.
        let c = with("metrics_listen = \"127.0.0.1:9411\"").unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9411".parse().unwrap()));
        let p = with("admin_listen = \"10.0.0.5:9411\"").unwrap_err();
        assert_eq!(p[0].key, "gateway.admin_listen");
        assert!(p[0].message.contains("admin_allow"), "{p:?}");
        let p =
            with("admin_listen = \"10.0.0.5:9411\"\nadmin_allow = [\"10.8.0.0/33x\"]").unwrap_err();
        assert!(p.iter().any(|p| p.key == "gateway.admin_allow"), "{p:?}");
        let c = with(&format!(
            "admin_listen = \"10.0.0.5:9411\"\nadmin_allow = [\"10.8.0.0/16\"]\nadmin_token_file = \"{}\"",
            token.display()
        ))
        .unwrap();
        assert_eq!(
            c.admin_token.as_deref(),
            Some("a-long-admin-token-0123456789")
        );
    }
}
