//! Wiring of the daemon: the outbox, the platform client, the pipeline, the
//! HIS listeners, the control socket, the metrics endpoint, the scanners and
//! the uploader, as tasks under one [`CancellationToken`] and
//! [`TaskTracker`] (after mini-redis).
//!
//! Start-up order matters: the outbox is opened (and its durability checked)
//! before anything can produce a use; the HIS and control listeners are
//! bound before scanners start, so the first card has somewhere to go; only
//! then is systemd told `READY=1`.
//!
//! Shutdown is phased so that nothing a patient started is lost: (1) stop
//! intake (scanners end; the scans they already read are queued), (2) drain
//! the scan lanes (every queued scan is resolved, recorded and broadcast),
//! (3) end HIS sessions (each writes what is queued for it first), the
//! listeners, the control socket, metrics and the uploader (rows in flight
//! stay pending and keep their requestIds).
//!
//! `SIGHUP` reloads the configuration *in place*: a new one with problems is
//! refused (every problem logged) and the agent keeps serving with the old.
//! A valid one changes only what changed, and stops nothing else:
//! * the outbox, the hub (connected HIS clients, held events), the scan
//!   lanes and the pipeline's scan memory (HIS's `use`/`bind` after a reload
//!   still find their scans) are kept; an outbox path change is refused
//!   until a restart (said in the log and in `status`);
//! * the pipeline and the uploader get the new settings (the uploader is
//!   restarted only if its settings or the platform's changed);
//! * a listener whose address did not change keeps its socket; a changed one
//!   is bound *before* the old one is closed, so the port is never free for
//!   another local user to take, and a bind that fails keeps the old one
//!   serving (logged, and under NEEDS ATTENTION in `status`): a reload never
//!   makes the agent exit;
//! * scanners whose section did not change keep running (a stdin scanner
//!   keeps its input); changed ones are reopened, removed ones closed.
//!
//! The watchdog (`WatchdogSec=`) is fed from the main loop only after a
//! round trip through the outbox's store, so a wedged agent is restarted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::his::protocol::{Out, PROTOCOL_VERSION};
use crate::agent::his::{HisSettings, Hub, Server};
use crate::agent::outbox::uploader::{self, UploaderSettings};
use crate::agent::outbox::{Outbox, StoreError};
use crate::agent::pipeline::{Pipeline, PipelineSettings};
use crate::agent::scanner::device::ScannerStates;
use crate::agent::scanner::{self, Scan};
use crate::agent::status::{OutboxView, ScannerView, Status, TokenView, UploadsView};
use crate::clock;
use crate::config::{self, Config, Env, ScannerKind};
use crate::platform::client::BuildError;
use crate::platform::{Client, ClientSettings};

/// Scans resolved at the same time (each may wait on the platform).
const PARALLEL_SCANS: usize = 8;
/// Scans queued between the scanners and the pipeline.
const SCAN_QUEUE: usize = 64;
/// How often STATUS= is refreshed when there is no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Outbox(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] BuildError),
    #[error(transparent)]
    His(#[from] crate::agent::his::server::HisError),
    #[error(transparent)]
    Control(#[from] crate::agent::control::ControlError),
    #[error(transparent)]
    HisToken(#[from] crate::agent::his::token::TokenError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

impl StartError {
    /// Whether this is the operator's configuration (exit 2) rather than a
    /// runtime failure (exit 1).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            StartError::His(crate::agent::his::server::HisError::NoSuchGroup(_))
        )
    }
}

/// What the control socket and the metrics endpoint look at.
pub struct Core {
    pub pipeline: Arc<Pipeline>,
    pub outbox: Outbox,
    pub hub: Hub,
    /// Replaced by a reload that changes the platform's settings.
    client: std::sync::RwLock<Client>,
    pub scanners: ScannerStates,
    terminal_id: std::sync::RwLock<String>,
    pub outbox_path: PathBuf,
    pub started_at: i64,
    /// What the last reload could not apply (a listener that could not be
    /// bound, an outbox path change); shown under NEEDS ATTENTION.
    reload_faults: std::sync::Mutex<Vec<String>>,
    /// `[platform] heartbeat_s`, as the last reload left it.
    pub(crate) heartbeat_s: std::sync::atomic::AtomicU64,
}

fn read<T: Clone>(l: &std::sync::RwLock<T>) -> T {
    l.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn write<T>(l: &std::sync::RwLock<T>, v: T) {
    *l.write().unwrap_or_else(|e| e.into_inner()) = v;
}

impl Core {
    pub fn client(&self) -> Client {
        read(&self.client)
    }

    pub async fn status(&self) -> Status {
        let now = clock::now_unix();
        let counts = self.outbox.counts().await.unwrap_or_default();
        let up = self.outbox.status();
        let client = self.client();
        let token = client.token();
        let mut s = Status {
            agent: concat!("ehc-agent ", env!("CARGO_PKG_VERSION")).into(),
            pid: std::process::id(),
            started_at: self.started_at,
            terminal_id: read(&self.terminal_id),
            scanners: self
                .scanners
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k, ScannerView::from(v)))
                .collect(),
            his_clients: self.hub.clients().into_iter().map(|c| c.peer).collect(),
            held_events: self.hub.held_count(),
            held_dropped: self.hub.held_dropped(),
            outbox: OutboxView {
                path: self.outbox_path.display().to_string(),
                pending: counts.pending,
                waiting: counts.waiting,
                held: counts.held,
                sent: counts.sent,
                oldest_pending_age_s: counts.oldest_unsent.map(|t| (now - t).max(0)),
                spilled: up.spilled,
                disk_fault: up.disk_fault.clone(),
            },
            uploads: UploadsView {
                last_success_at: up.last_success_at,
                stopped: up.stopped.clone(),
                rate_limited_until: up.rate_limited_until,
                last_error: up.last_error.clone(),
                uploaded: up.uploaded,
                failed_attempts: up.failed_attempts,
            },
            token: TokenView {
                valid: token.as_ref().is_some_and(|t| t.expires_at > now),
                expires_at: token.map(|t| t.expires_at),
                refreshes: client
                    .stats()
                    .token_fetches
                    .load(std::sync::atomic::Ordering::Relaxed),
                revocations: client
                    .stats()
                    .revocations
                    .load(std::sync::atomic::Ordering::Relaxed),
                last_revoked_at: Some(
                    client
                        .stats()
                        .last_revoked_at
                        .load(std::sync::atomic::Ordering::Relaxed),
                )
                .filter(|t| *t > 0),
            },
            scans: self.pipeline.stats(),
            recent_errors: client.stats().recent_errors(),
            attention: vec![],
        };
        s.assess(now);
        let faults = self
            .reload_faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.attention
            .extend(faults.into_iter().map(|f| format!("reload: {f}")));
        s
    }

    /// Refresh the state-mirroring gauges, then encode.
    pub async fn metrics_text(&self) -> String {
        let m = crate::metrics::get();
        let st = self.status().await;
        for (state, n) in [
            ("pending", st.outbox.pending),
            ("waiting", st.outbox.waiting),
            ("held", st.outbox.held),
            ("sent", st.outbox.sent),
        ] {
            m.outbox_rows
                .get_or_create(&vec![("state", state.to_owned())])
                .set(n);
        }
        m.outbox_oldest_pending_age
            .set(st.outbox.oldest_pending_age_s.unwrap_or(0));
        m.outbox_spilled.set(st.outbox.spilled as i64);
        m.uploads_stopped.set(i64::from(
            st.uploads.stopped.is_some()
                || st
                    .uploads
                    .rate_limited_until
                    .is_some_and(|t| t > clock::now_unix()),
        ));
        for (name, sc) in &st.scanners {
            m.scanner_up
                .get_or_create(&vec![("scanner", name.clone())])
                .set(i64::from(sc.state == "connected"));
        }
        m.his_clients.set(st.his_clients.len() as i64);
        m.encode()
    }
}

/// A running agent.
pub struct App {
    pub core: Arc<Core>,
    pub pipeline: Arc<Pipeline>,
    pub outbox: Outbox,
    pub hub: Hub,
    pub his_unix: Option<PathBuf>,
    pub his_tcp: Option<SocketAddr>,
    pub his_ws: Option<SocketAddr>,
    pub his_http: Option<SocketAddr>,
    pub control: PathBuf,
    pub metrics: Option<SocketAddr>,
    /// Inject scans as a scanner would.
    pub scans: mpsc::Sender<Scan>,
    /// Each configured device scanner's state.
    pub scanners: ScannerStates,
    /// Ends sessions, listeners, the uploader: the last phase of shutdown.
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// Scanners: stopped first at shutdown.
    intake: TaskTracker,
    /// Ends the dispatcher once intake has stopped and the queue is drained.
    dispatch_stop: CancellationToken,
    /// The dispatcher and its scan lanes.
    scan_tasks: TaskTracker,
    server: Server<Pipeline>,
    running: Running,
}

/// A part that runs until its own token, and the configuration it runs with.
struct Part<K> {
    key: K,
    stop: CancellationToken,
}

/// What is running, with the configuration each part was started from: a
/// reload compares against it.
struct Running {
    cfg: Config,
    unix: Option<Part<PathBuf>>,
    tcp: Option<Part<SocketAddr>>,
    ws: Option<Part<SocketAddr>>,
    http: Option<Part<SocketAddr>>,
    control: Part<PathBuf>,
    metrics: Option<Part<SocketAddr>>,
    uploader: CancellationToken,
    /// Scanner name → its section (as JSON, to compare) and stop token.
    scanners: HashMap<String, Part<serde_json::Value>>,
}

/// The greeting every HIS client gets first.
fn hello(cfg: &Config) -> Out {
    Out::Hello {
        protocol: PROTOCOL_VERSION,
        agent: concat!("ehc-agent ", env!("CARGO_PKG_VERSION")).into(),
        terminal_id: cfg.terminal.id.clone(),
        auth: None,
    }
}

/// The HIS listeners' settings, with the token TCP and WebSocket clients
/// present (loaded, or made and published, only when one of them is on).
fn his_settings(cfg: &Config) -> Result<HisSettings, StartError> {
    let token = if cfg.his_tcp.is_some() || cfg.his_ws.is_some() || cfg.his_http.is_some() {
        let gid = crate::agent::his::server::socket_gid(cfg.his.socket_group.as_deref())?;
        let state_dir = cfg
            .state_path
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        let loaded = crate::agent::his::token::load(
            cfg.his_token.as_ref().map(|t| t.expose()),
            &state_dir,
            &cfg.his_unix,
            gid,
        )?;
        if let Some(p) = &loaded.published {
            tracing::info!(path = %p.display(), "HIS token for TCP and WebSocket clients published");
        }
        Some(loaded.token)
    } else {
        None
    };
    Ok(HisSettings {
        unix: Some(cfg.his_unix.clone()),
        socket_group: cfg.his.socket_group.clone(),
        tcp: cfg.his_tcp,
        ws: cfg.his_ws,
        http: cfg.his_http,
        allowed_origins: cfg.his.allowed_origins.clone(),
        token,
        max_clients: cfg.his.max_clients,
        socket_gid: crate::agent::his::server::socket_gid(cfg.his.socket_group.as_deref())?,
    })
}

/// The platform client's settings, comparable: a reload rebuilds the client
/// only when one of them changed.
fn client_key(cfg: &Config) -> String {
    let s = ClientSettings::from_config(cfg);
    format!(
        "{}|{}|{}|{:x}|{:?}|{:?}|{:?}|{:?}|{:?}",
        s.base_url,
        s.app_id,
        s.hospital_id,
        {
            use sha2::Digest as _;
            sha2::Sha256::digest(s.secret.expose().as_bytes())
        },
        s.scan_timeout,
        s.upload_timeout,
        s.proxy,
        s.ca_file,
        s.state_path
    )
}

fn scanner_key(s: &config::ScannerSection) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

impl App {
    pub async fn start(cfg: &Config) -> Result<App, StartError> {
        let (outbox, degraded) = Outbox::open_or_degraded(&cfg.outbox_path)?;
        if let Some(e) = degraded {
            tracing::error!(error = %e, "outbox cannot be opened: starting degraded, uses are kept in memory until the state directory takes writes (a crash now loses them)");
        }
        let client = Client::new(ClientSettings::from_config(cfg))?;
        let hub = Hub::new(Duration::from_secs(cfg.his.hold_s));
        let pipeline = Arc::new(Pipeline::new(
            PipelineSettings::from_config(cfg),
            client.clone(),
            outbox.clone(),
            hub.clone(),
        ));
        let his = his_settings(cfg)?;
        let unix_l = crate::agent::his::server::bind_unix(&cfg.his_unix, his.socket_gid).await?;
        let tcp_l = match cfg.his_tcp {
            Some(a) => Some(crate::agent::his::server::bind_tcp(a).await?),
            None => None,
        };
        let ws_l = match cfg.his_ws {
            Some(a) => Some(crate::agent::his::server::bind_tcp(a).await?),
            None => None,
        };
        let http_l = match cfg.his_http {
            Some(a) => Some(crate::agent::his::server::bind_tcp(a).await?),
            None => None,
        };
        let control_path = crate::agent::control::path_for(&cfg.his_unix);
        let control = crate::agent::control::bind(&control_path).await?;
        let metrics_listener = match cfg.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Metrics { addr, source })?,
            ),
            None => None,
        };
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let scanners = ScannerStates::default();
        let core = Arc::new(Core {
            pipeline: pipeline.clone(),
            outbox: outbox.clone(),
            hub: hub.clone(),
            client: std::sync::RwLock::new(client.clone()),
            scanners: scanners.clone(),
            terminal_id: std::sync::RwLock::new(cfg.terminal.id.clone()),
            outbox_path: cfg.outbox_path.clone(),
            started_at: clock::now_unix(),
            reload_faults: std::sync::Mutex::new(Vec::new()),
            heartbeat_s: std::sync::atomic::AtomicU64::new(cfg.platform.heartbeat_s),
        });
        let server = Server::new(
            hub.clone(),
            pipeline.clone(),
            &hello(cfg),
            &his,
            cancel.clone(),
            &tracker,
        );
        let his_tcp = tcp_l.as_ref().and_then(|l| l.local_addr().ok());
        let his_ws = ws_l.as_ref().and_then(|l| l.local_addr().ok());
        let his_http = http_l.as_ref().and_then(|l| l.local_addr().ok());
        let unix_stop = cancel.child_token();
        server.serve_unix(unix_l, cfg.his_unix.clone(), unix_stop.clone());
        let tcp = tcp_l.map(|l| {
            let stop = cancel.child_token();
            server.serve_tcp(l, stop.clone());
            Part {
                key: cfg.his_tcp.expect("bound because configured"),
                stop,
            }
        });
        let ws = ws_l.map(|l| {
            let stop = cancel.child_token();
            server.serve_ws(l, stop.clone());
            Part {
                key: cfg.his_ws.expect("bound because configured"),
                stop,
            }
        });
        let http = http_l.map(|l| {
            let stop = cancel.child_token();
            server.serve_http(l, stop.clone());
            Part {
                key: cfg.his_http.expect("bound because configured"),
                stop,
            }
        });
        let control_stop = cancel.child_token();
        crate::agent::control::serve(
            control,
            control_path.clone(),
            core.clone(),
            control_stop.clone(),
            &tracker,
        );
        let (metrics, metrics_part) = match metrics_listener {
            Some(l) => {
                let addr = l.local_addr().ok();
                let stop = cancel.child_token();
                serve_metrics(l, core.clone(), stop.clone(), &tracker);
                (addr, cfg.metrics.map(|key| Part { key, stop }))
            }
            None => (None, None),
        };

        let uploader_stop = cancel.child_token();
        tracker.spawn(uploader::run(
            outbox.clone(),
            client.clone(),
            UploaderSettings::from_config(cfg),
            uploader_stop.clone(),
        ));
        // The token is fetched now and refreshed ahead of expiry, so the
        // first scan (and any near expiry) does not pay for getAppToken.
        tracker.spawn(client.clone().keep_fresh(uploader_stop.clone()));
        tracker.spawn(client.clone().keep_warm(uploader_stop.clone()));
        tracker.spawn(crate::agent::heartbeat::run(
            core.clone(),
            uploader_stop.clone(),
        ));
        // The first byte of a scan opens the platform connection if none is
        // warm (the client in use now: a reload may have replaced it).
        {
            let (arrivals, core, stop) = (scanners.arrivals(), core.clone(), cancel.child_token());
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = arrivals.next() => core.client().preconnect(),
                    }
                }
            });
        }

        let (tx, rx) = mpsc::channel::<Scan>(SCAN_QUEUE);
        let scan_tasks = TaskTracker::new();
        let dispatch_stop = CancellationToken::new();
        scan_tasks.spawn(dispatch(
            rx,
            pipeline.clone(),
            dispatch_stop.clone(),
            scan_tasks.clone(),
        ));

        let intake = TaskTracker::new();
        let mut running_scanners = HashMap::new();
        for s in &cfg.scanners {
            let stop = cancel.child_token();
            start_scanner(s, &tx, &scanners, stop.clone(), &intake);
            running_scanners.insert(
                s.name.clone(),
                Part {
                    key: scanner_key(s),
                    stop,
                },
            );
        }
        let shown =
            |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
        tracing::info!(
            terminal = %cfg.terminal.id,
            his_unix = %cfg.his_unix.display(),
            his_tcp = %shown(his_tcp),
            his_ws = %shown(his_ws),
            his_http = %shown(his_http),
            control = %control_path.display(),
            metrics = %shown(metrics),
            outbox = %cfg.outbox_path.display(),
            "ehc-agent running"
        );
        Ok(App {
            core,
            pipeline,
            outbox,
            hub,
            his_unix: Some(cfg.his_unix.clone()),
            his_tcp,
            his_ws,
            his_http,
            control: control_path.clone(),
            metrics,
            scans: tx,
            scanners,
            cancel,
            tracker,
            intake,
            dispatch_stop,
            scan_tasks,
            server,
            running: Running {
                cfg: cfg.clone(),
                unix: Some(Part {
                    key: cfg.his_unix.clone(),
                    stop: unix_stop,
                }),
                tcp,
                ws,
                http,
                control: Part {
                    key: control_path,
                    stop: control_stop,
                },
                metrics: metrics_part,
                uploader: uploader_stop,
                scanners: running_scanners,
            },
        })
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Apply a new, valid configuration in place (module doc). Returns what
    /// could not be applied; the agent goes on serving either way.
    pub async fn reload(&mut self, new: &Config) -> Vec<String> {
        let mut faults = Vec::new();
        let old = self.running.cfg.clone();

        if new.outbox_path != old.outbox_path {
            faults.push(format!(
                "outbox.path changed to {}: the outbox stays at {} until the agent is restarted",
                new.outbox_path.display(),
                old.outbox_path.display()
            ));
        }

        // The platform client, the pipeline, the uploader.
        let mut client = self.core.client();
        let client_changed = client_key(new) != client_key(&old);
        let mut client_ok = true;
        if client_changed {
            match Client::new(ClientSettings::from_config(new)) {
                Ok(c) => client = c,
                Err(e) => {
                    client_ok = false;
                    faults.push(format!("the platform settings could not be applied ({e}); still using the previous ones"));
                }
            }
        }
        self.pipeline
            .reconfigure(PipelineSettings::from_config(new), client.clone());
        write(&self.core.client, client.clone());
        write(&self.core.terminal_id, new.terminal.id.clone());
        self.core.heartbeat_s.store(
            new.platform.heartbeat_s,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.hub.set_hold(Duration::from_secs(new.his.hold_s));
        let uploader_changed = (client_changed && client_ok)
            || new.outbox.batch != old.outbox.batch
            || new.outbox.concurrency != old.outbox.concurrency
            || new.outbox.retention_days != old.outbox.retention_days;
        if uploader_changed {
            // Rows in flight stay pending and are sent again with their
            // requestIds (10054 then means done).
            self.running.uploader.cancel();
            let stop = self.cancel.child_token();
            self.tracker.spawn(uploader::run(
                self.outbox.clone(),
                client.clone(),
                UploaderSettings::from_config(new),
                stop.clone(),
            ));
            self.tracker.spawn(client.clone().keep_fresh(stop.clone()));
            self.tracker.spawn(client.keep_warm(stop.clone()));
            self.tracker.spawn(crate::agent::heartbeat::run(
                self.core.clone(),
                stop.clone(),
            ));
            self.running.uploader = stop;
        }

        // HIS: settings every new connection reads, then the listeners.
        match his_settings(new) {
            Ok(his) => {
                // A new socket_group on the same socket: hand it over now
                // (the peer check reads the group from these settings).
                if new.his.socket_group != old.his.socket_group && new.his_unix == old.his_unix {
                    if let Some(gid) = his.socket_gid {
                        if let Err(e) = std::os::unix::fs::chown(&old.his_unix, None, Some(gid)) {
                            faults.push(format!(
                                "his.socket_group: cannot give {} to the group: {e}",
                                old.his_unix.display()
                            ));
                        }
                    }
                }
                self.server.update(&hello(new), &his)
            }
            Err(e) => faults.push(format!("[his]: {e}; HIS clients are admitted as before")),
        }
        if new.his_unix != old.his_unix {
            let bound = match crate::agent::his::server::socket_gid(new.his.socket_group.as_deref())
            {
                Ok(gid) => crate::agent::his::server::bind_unix(&new.his_unix, gid).await,
                Err(e) => Err(e),
            };
            match bound {
                Ok(l) => {
                    let stop = self.cancel.child_token();
                    self.server
                        .serve_unix(l, new.his_unix.clone(), stop.clone());
                    if let Some(p) = self.running.unix.replace(Part {
                        key: new.his_unix.clone(),
                        stop,
                    }) {
                        p.stop.cancel();
                    }
                    self.his_unix = Some(new.his_unix.clone());
                    tracing::info!(path = %new.his_unix.display(), "HIS socket moved");
                }
                Err(e) => faults.push(format!(
                    "his.listen_unix {}: {e}; still serving on {}",
                    new.his_unix.display(),
                    old.his_unix.display()
                )),
            }
            let control_path = crate::agent::control::path_for(&new.his_unix);
            if control_path != self.running.control.key {
                match crate::agent::control::bind(&control_path).await {
                    Ok(l) => {
                        let stop = self.cancel.child_token();
                        crate::agent::control::serve(
                            l,
                            control_path.clone(),
                            self.core.clone(),
                            stop.clone(),
                            &self.tracker,
                        );
                        let old = std::mem::replace(
                            &mut self.running.control,
                            Part {
                                key: control_path.clone(),
                                stop,
                            },
                        );
                        old.stop.cancel();
                        self.control = control_path;
                    }
                    Err(e) => faults.push(format!(
                        "control socket {}: {e}; still at {}",
                        control_path.display(),
                        self.running.control.key.display()
                    )),
                }
            }
        }
        self.his_tcp = self
            .reload_tcp(new.his_tcp, Listener::Tcp, &mut faults)
            .await
            .or(self.his_tcp.filter(|_| self.running.tcp.is_some()));
        self.his_ws = self
            .reload_tcp(new.his_ws, Listener::Ws, &mut faults)
            .await
            .or(self.his_ws.filter(|_| self.running.ws.is_some()));
        self.his_http = self
            .reload_tcp(new.his_http, Listener::Http, &mut faults)
            .await
            .or(self.his_http.filter(|_| self.running.http.is_some()));
        if new.metrics != self.running.metrics.as_ref().map(|p| p.key) {
            match new.metrics {
                None => {
                    if let Some(p) = self.running.metrics.take() {
                        p.stop.cancel();
                    }
                    self.metrics = None;
                }
                Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => {
                        self.metrics = l.local_addr().ok();
                        let stop = self.cancel.child_token();
                        serve_metrics(l, self.core.clone(), stop.clone(), &self.tracker);
                        if let Some(p) = self.running.metrics.replace(Part { key: addr, stop }) {
                            p.stop.cancel();
                        }
                    }
                    Err(e) => faults.push(format!(
                        "metrics.listen {addr}: {e}; metrics stay where they were"
                    )),
                },
            }
        }

        // Scanners: the unchanged keep running.
        let wanted: HashMap<String, &config::ScannerSection> =
            new.scanners.iter().map(|s| (s.name.clone(), s)).collect();
        let names: Vec<String> = self.running.scanners.keys().cloned().collect();
        for name in names {
            let keep = wanted
                .get(&name)
                .is_some_and(|s| scanner_key(s) == self.running.scanners[&name].key);
            if !keep {
                if let Some(p) = self.running.scanners.remove(&name) {
                    p.stop.cancel();
                    self.scanners.unregister(&name);
                    tracing::info!(scanner = %name, "scanner closed by the reload");
                }
            }
        }
        for s in &new.scanners {
            if !self.running.scanners.contains_key(&s.name) {
                let stop = self.cancel.child_token();
                start_scanner(s, &self.scans, &self.scanners, stop.clone(), &self.intake);
                self.running.scanners.insert(
                    s.name.clone(),
                    Part {
                        key: scanner_key(s),
                        stop,
                    },
                );
            }
        }

        for f in &faults {
            tracing::error!(problem = %f, "reload: not applied");
        }
        *self
            .core
            .reload_faults
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = faults.clone();
        // What was applied is now the running configuration, but a part
        // that kept its old setting keeps being compared with it.
        let mut applied = new.clone();
        applied.outbox_path = old.outbox_path.clone();
        if let Some(p) = &self.running.unix {
            applied.his_unix = p.key.clone();
        }
        applied.his_tcp = self.running.tcp.as_ref().map(|p| p.key);
        applied.his_ws = self.running.ws.as_ref().map(|p| p.key);
        applied.his_http = self.running.http.as_ref().map(|p| p.key);
        applied.metrics = self.running.metrics.as_ref().map(|p| p.key);
        if !client_ok {
            applied.platform = old.platform.clone();
            applied.app_secret = old.app_secret.clone();
            applied.state_path = old.state_path.clone();
        }
        self.running.cfg = applied;
        faults
    }

    /// Move a TCP-style listener to `want`: bind first, then close the old.
    /// Returns the new bound address when it moved.
    async fn reload_tcp(
        &mut self,
        want: Option<SocketAddr>,
        which: Listener,
        faults: &mut Vec<String>,
    ) -> Option<SocketAddr> {
        let slot = match which {
            Listener::Tcp => &mut self.running.tcp,
            Listener::Ws => &mut self.running.ws,
            Listener::Http => &mut self.running.http,
        };
        if want == slot.as_ref().map(|p| p.key) {
            return None;
        }
        let Some(addr) = want else {
            if let Some(p) = slot.take() {
                p.stop.cancel();
            }
            return None;
        };
        match crate::agent::his::server::bind_tcp(addr).await {
            Ok(l) => {
                let bound = l.local_addr().ok();
                let stop = self.cancel.child_token();
                match which {
                    Listener::Tcp => self.server.serve_tcp(l, stop.clone()),
                    Listener::Ws => self.server.serve_ws(l, stop.clone()),
                    Listener::Http => self.server.serve_http(l, stop.clone()),
                }
                if let Some(p) = slot.replace(Part { key: addr, stop }) {
                    p.stop.cancel();
                }
                tracing::info!(listener = which.key(), address = %addr, "HIS listener moved");
                bound
            }
            Err(e) => {
                let now = slot
                    .as_ref()
                    .map(|p| format!("still serving on {}", p.key))
                    .unwrap_or_else(|| "not listening".into());
                faults.push(format!("{} {addr}: {e}; {now}", which.key()));
                None
            }
        }
    }

    /// Stop in phases (module doc): intake, scan lanes, then the rest.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        for p in self.running.scanners.values() {
            p.stop.cancel();
        }
        self.intake.close();
        self.intake.wait().await;
        drop(self.scans);
        self.dispatch_stop.cancel();
        self.scan_tasks.close();
        self.scan_tasks.wait().await;
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!("stopped");
    }
}

#[derive(Clone, Copy)]
enum Listener {
    Tcp,
    Ws,
    Http,
}

impl Listener {
    fn key(self) -> &'static str {
        match self {
            Listener::Tcp => "his.listen_tcp",
            Listener::Ws => "his.listen_ws",
            Listener::Http => "his.listen_http",
        }
    }
}

/// Start one scanner on the intake tracker, until `stop`.
fn start_scanner(
    s: &config::ScannerSection,
    tx: &mpsc::Sender<Scan>,
    states: &ScannerStates,
    stop: CancellationToken,
    intake: &TaskTracker,
) {
    if s.kind == ScannerKind::Stdin {
        let (name, debounce, tx, arrivals) = (
            s.name.clone(),
            Duration::from_millis(s.debounce_ms),
            tx.clone(),
            states.arrivals(),
        );
        intake.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = scanner::stdin::run(name, tokio::io::stdin(), debounce, tx, arrivals) => {}
            }
        });
    } else {
        intake.spawn(scanner::device::run(
            s.clone(),
            tx.clone(),
            states.clone(),
            stop,
        ));
    }
}

fn serve_metrics(
    l: tokio::net::TcpListener,
    core: Arc<Core>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let core = core.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        core.metrics_text().await,
                    )
                }
            }),
        )
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                "metrics are at /metrics\n",
            )
        });
    tracker.spawn(async move {
        let _ = axum::serve(l, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
}

/// Take scans from the scanners and resolve them: in order for each scanner
/// (a patient who scans twice sees two cards in that order), scanners in
/// parallel up to [`PARALLEL_SCANS`].
async fn dispatch(
    mut rx: mpsc::Receiver<Scan>,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(PARALLEL_SCANS));
    let mut lanes: HashMap<String, mpsc::UnboundedSender<Scan>> = HashMap::new();
    let mut route = |scan: Scan| {
        let lane = lanes.entry(scan.scanner.clone()).or_insert_with(|| {
            let (tx, mut lane_rx) = mpsc::unbounded_channel::<Scan>();
            let (p, limit) = (pipeline.clone(), limit.clone());
            // A scan in flight runs to the end even during shutdown: it is
            // recorded before it is delivered, and stopping it half-way would
            // only lose the card for the person at the window.
            tasks.spawn(async move {
                while let Some(scan) = lane_rx.recv().await {
                    let Ok(_permit) = limit.acquire().await else {
                        break;
                    };
                    p.handle_scan(scan).await;
                }
            });
            tx
        });
        let _ = lane.send(scan);
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // Intake has stopped: what the scanners already queued is
                // still a patient's scan.
                while let Ok(scan) = rx.try_recv() {
                    route(scan);
                }
                break;
            }
            s = rx.recv() => match s { Some(s) => route(s), None => break },
        }
    }
    // Dropping the lanes' senders lets each lane finish what it holds.
}

/// systemd notifications; no-ops outside systemd.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    let _ = sd_notify::notify(false, state);
}

enum Event {
    Stop(&'static str),
    Reload,
    Tick,
}

/// `ehc-agent run`: start, serve, reload on SIGHUP, stop on SIGTERM/SIGINT.
pub async fn run(mut cfg: Config) -> Result<(), StartError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers first: a SIGHUP (`systemctl reload`) or SIGTERM arriving
    // while the agent starts must be handled, not kill it by default action.
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return Err(StartError::Signals(e));
        }
    };
    let mut app = App::start(&cfg).await?;
    let status = app.core.status().await;
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status.line()),
    ]);
    let mut watchdog_usec = 0u64;
    let tick = if sd_notify::watchdog_enabled(false, &mut watchdog_usec) {
        Duration::from_micros(watchdog_usec / 2).max(Duration::from_millis(100))
    } else {
        STATUS_EVERY
    };
    let watchdog = watchdog_usec > 0;
    let mut ticker = tokio::time::interval(tick);
    loop {
        let ev = tokio::select! {
            _ = term.recv() => Event::Stop("SIGTERM"),
            _ = int.recv() => Event::Stop("SIGINT"),
            _ = hup.recv() => Event::Reload,
            _ = ticker.tick() => Event::Tick,
        };
        match ev {
            Event::Stop(sig) => {
                tracing::info!(signal = sig, "stopping");
                notify(&[sd_notify::NotifyState::Stopping]);
                app.shutdown().await;
                return Ok(());
            }
            Event::Tick => {
                // The store answering proves the blocking pool and the
                // outbox lock are not wedged; only then feed the watchdog.
                let alive = tokio::time::timeout(tick, app.core.status()).await;
                match alive {
                    Ok(st) => {
                        if watchdog {
                            notify(&[sd_notify::NotifyState::Watchdog, sd_notify::NotifyState::Status(&st.line())]);
                        } else {
                            notify(&[sd_notify::NotifyState::Status(&st.line())]);
                        }
                    }
                    Err(_) => tracing::error!("the agent did not answer its own health check in time; not feeding the watchdog"),
                }
            }
            Event::Reload => {
                let source = cfg.source.clone();
                tracing::info!(config = ?source, "SIGHUP: reloading the configuration");
                match config::load(source.as_deref(), &Env::from_process()) {
                    Err(config::ConfigError::Invalid { problems, .. }) => {
                        for p in &problems {
                            tracing::error!(key = %p.key, problem = %p.message, "new configuration refused");
                        }
                        tracing::error!(
                            problems = problems.len(),
                            "configuration NOT reloaded: still serving with the previous one"
                        );
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "configuration NOT reloaded: still serving with the previous one")
                    }
                    Ok(new) => {
                        notify(&[sd_notify::NotifyState::Reloading]);
                        let faults = app.reload(&new).await;
                        cfg = new;
                        if faults.is_empty() {
                            tracing::info!("configuration reloaded");
                        } else {
                            tracing::warn!(not_applied = faults.len(), "configuration reloaded in part; see the errors above and `ehc-agent status`");
                        }
                        let status = app.core.status().await;
                        notify(&[
                            sd_notify::NotifyState::Ready,
                            sd_notify::NotifyState::Status(&status.line()),
                        ]);
                    }
                }
            }
        }
    }
}
