//! Wiring of the daemon: the outbox, the platform client, the pipeline, the
//! HIS listeners, the control socket, the metrics endpoint, the scanners and
//! the uploader, as tasks under one [`CancellationToken`] and
//! [`TaskTracker`] (after mini-redis).
//!
//! Start-up order matters: the outbox is opened (and its durability checked)
//! before anything can produce a use; the HIS and control listeners are
//! bound before scanners start, so the first card has somewhere to go; only
//! then is systemd told `READY=1`. Shutdown: stop taking scans, let scans in
//! flight finish (each is recorded before it is delivered), stop the
//! uploader (rows in flight stay pending), close the listeners, remove the
//! sockets.
//!
//! `SIGHUP` reloads the configuration: a new one with problems is refused
//! (every problem logged) and the agent keeps serving with the old one; a
//! valid one replaces the running agent in-process (listeners re-bound,
//! scanners reopened; HIS clients reconnect, which they must handle anyway).
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

use crate::clock;
use crate::config::{self, Config, Env, ScannerKind};
use crate::his::protocol::{Out, PROTOCOL_VERSION};
use crate::his::{HisSettings, Hub};
use crate::outbox::uploader::{self, UploaderSettings};
use crate::outbox::{Outbox, StoreError};
use crate::pipeline::{Pipeline, PipelineSettings};
use crate::platform::client::BuildError;
use crate::platform::{Client, ClientSettings};
use crate::scanner::device::ScannerStates;
use crate::scanner::{self, Scan};
use crate::status::{OutboxView, ScannerView, Status, TokenView, UploadsView};

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
    His(#[from] crate::his::server::HisError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    HisToken(#[from] crate::his::token::TokenError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// Whether this is the operator's configuration (exit 2) rather than a
    /// runtime failure (exit 1).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            StartError::His(crate::his::server::HisError::NoSuchGroup(_))
        )
    }
}

/// What the control socket and the metrics endpoint look at.
pub struct Core {
    pub pipeline: Arc<Pipeline>,
    pub outbox: Outbox,
    pub hub: Hub,
    pub client: Client,
    pub scanners: ScannerStates,
    pub terminal_id: String,
    pub outbox_path: PathBuf,
    pub started_at: i64,
}

impl Core {
    pub async fn status(&self) -> Status {
        let now = clock::now_unix();
        let counts = self.outbox.counts().await.unwrap_or_default();
        let up = self.outbox.status();
        let token = self.client.token();
        let mut s = Status {
            agent: concat!("ehc-agent ", env!("CARGO_PKG_VERSION")).into(),
            pid: std::process::id(),
            started_at: self.started_at,
            terminal_id: self.terminal_id.clone(),
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
                refreshes: self
                    .client
                    .stats()
                    .token_fetches
                    .load(std::sync::atomic::Ordering::Relaxed),
                revocations: self
                    .client
                    .stats()
                    .revocations
                    .load(std::sync::atomic::Ordering::Relaxed),
                last_revoked_at: Some(
                    self.client
                        .stats()
                        .last_revoked_at
                        .load(std::sync::atomic::Ordering::Relaxed),
                )
                .filter(|t| *t > 0),
            },
            scans: self.pipeline.stats(),
            attention: vec![],
        };
        s.assess(now);
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
    pub client: Client,
    pub his_unix: Option<PathBuf>,
    pub his_tcp: Option<SocketAddr>,
    pub his_ws: Option<SocketAddr>,
    pub control: PathBuf,
    pub metrics: Option<SocketAddr>,
    /// Inject scans as a scanner would.
    pub scans: mpsc::Sender<Scan>,
    /// Each configured device scanner's state.
    pub scanners: ScannerStates,
    cancel: CancellationToken,
    tracker: TaskTracker,
    scan_tasks: TaskTracker,
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
        // Loopback TCP and WebSocket clients authenticate; the Unix socket
        // is guarded by its mode and the peer check.
        let token = if cfg.his_tcp.is_some() || cfg.his_ws.is_some() {
            let gid = cfg.his.socket_group.as_deref().and_then(|g| {
                nix::unistd::Group::from_name(g)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw())
            });
            let state_dir = cfg
                .state_path
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
            let loaded = crate::his::token::load(
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
        let listeners = crate::his::server::bind(&HisSettings {
            unix: Some(cfg.his_unix.clone()),
            socket_group: cfg.his.socket_group.clone(),
            tcp: cfg.his_tcp,
            ws: cfg.his_ws,
            allowed_origins: cfg.his.allowed_origins.clone(),
            token,
            max_clients: cfg.his.max_clients,
        })
        .await?;
        let control_path = crate::control::path_for(&cfg.his_unix);
        let control = crate::control::bind(&control_path).await?;
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
            client: client.clone(),
            scanners: scanners.clone(),
            terminal_id: cfg.terminal.id.clone(),
            outbox_path: cfg.outbox_path.clone(),
            started_at: clock::now_unix(),
        });
        let hello = Out::Hello {
            protocol: PROTOCOL_VERSION,
            agent: concat!("ehc-agent ", env!("CARGO_PKG_VERSION")).into(),
            terminal_id: cfg.terminal.id.clone(),
            auth: None,
        };
        let (his_unix, his_tcp, his_ws) = (
            listeners.unix_path.clone(),
            listeners.tcp_addr,
            listeners.ws_addr,
        );
        listeners.serve(
            hub.clone(),
            pipeline.clone(),
            hello,
            cancel.clone(),
            &tracker,
        );
        crate::control::serve(
            control,
            control_path.clone(),
            core.clone(),
            cancel.clone(),
            &tracker,
        );
        let metrics = match metrics_listener {
            Some(l) => {
                let addr = l.local_addr().ok();
                serve_metrics(l, core.clone(), cancel.clone(), &tracker);
                addr
            }
            None => None,
        };

        tracker.spawn(uploader::run(
            outbox.clone(),
            client.clone(),
            UploaderSettings::from_config(cfg),
            cancel.clone(),
        ));

        let (tx, rx) = mpsc::channel::<Scan>(SCAN_QUEUE);
        let scan_tasks = TaskTracker::new();
        tracker.spawn(dispatch(
            rx,
            pipeline.clone(),
            cancel.clone(),
            scan_tasks.clone(),
        ));

        for s in cfg.scanners.iter().filter(|s| s.kind != ScannerKind::Stdin) {
            tracker.spawn(scanner::device::run(
                s.clone(),
                tx.clone(),
                scanners.clone(),
                cancel.clone(),
            ));
        }
        for s in cfg.scanners.iter().filter(|s| s.kind == ScannerKind::Stdin) {
            let (name, debounce, tx) = (
                s.name.clone(),
                Duration::from_millis(s.debounce_ms),
                tx.clone(),
            );
            let cancel = cancel.clone();
            tracker.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = scanner::stdin::run(name, tokio::io::stdin(), debounce, tx) => {}
                }
            });
        }
        let shown =
            |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
        tracing::info!(
            terminal = %cfg.terminal.id,
            his_unix = %his_unix.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "off".into()),
            his_tcp = %shown(his_tcp),
            his_ws = %shown(his_ws),
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
            client,
            his_unix,
            his_tcp,
            his_ws,
            control: control_path,
            metrics,
            scans: tx,
            scanners,
            cancel,
            tracker,
            scan_tasks,
        })
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stop: no new scans, finish scans in flight, stop the uploader and
    /// listeners.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.cancel.cancel();
        self.scan_tasks.close();
        self.scan_tasks.wait().await;
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!("stopped");
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
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(PARALLEL_SCANS));
    let mut lanes: HashMap<String, mpsc::UnboundedSender<Scan>> = HashMap::new();
    loop {
        let scan = tokio::select! {
            _ = cancel.cancelled() => break,
            s = rx.recv() => match s { Some(s) => s, None => break },
        };
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
            tracing::error!(error = %e, "cannot install signal handlers; not starting");
            return Ok(());
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
                        app.shutdown().await;
                        match App::start(&new).await {
                            Ok(a) => {
                                app = a;
                                cfg = new;
                                tracing::info!("configuration reloaded");
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "the new configuration could not start; going back to the previous one");
                                app = App::start(&cfg).await?;
                            }
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
