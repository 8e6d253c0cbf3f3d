//! Wiring of the daemon: the outbox, the platform client, the pipeline, the
//! HIS listeners, the scanners and the uploader, as tasks under one
//! [`CancellationToken`] and [`TaskTracker`] (after mini-redis).
//!
//! Start-up order matters: the outbox is opened (and its durability checked)
//! before anything can produce a use; the HIS listeners are bound before
//! scanners start, so the first card has somewhere to go. Shutdown: stop
//! taking scans, let scans in flight finish (each is recorded before it is
//! delivered), stop the uploader (rows in flight stay pending), close the
//! listeners, remove the socket.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ScannerKind};
use crate::his::protocol::{Out, PROTOCOL_VERSION};
use crate::his::{HisSettings, Hub};
use crate::outbox::uploader::{self, UploaderSettings};
use crate::outbox::{Outbox, StoreError};
use crate::pipeline::{Pipeline, PipelineSettings};
use crate::platform::client::BuildError;
use crate::platform::{Client, ClientSettings};
use crate::scanner::device::ScannerStates;
use crate::scanner::{self, Scan};

/// Scans resolved at the same time (each may wait on the platform).
const PARALLEL_SCANS: usize = 8;
/// Scans queued between the scanners and the pipeline.
const SCAN_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Outbox(#[from] StoreError),
    #[error(transparent)]
    Client(#[from] BuildError),
    #[error(transparent)]
    His(#[from] crate::his::server::HisError),
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

/// A running agent.
pub struct App {
    pub pipeline: Arc<Pipeline>,
    pub outbox: Outbox,
    pub hub: Hub,
    pub client: Client,
    pub his_unix: Option<std::path::PathBuf>,
    pub his_tcp: Option<std::net::SocketAddr>,
    pub his_ws: Option<std::net::SocketAddr>,
    /// Inject scans (what `ehc-agent scan` will use through the control socket).
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
        let listeners = crate::his::server::bind(&HisSettings {
            unix: Some(cfg.his_unix.clone()),
            socket_group: cfg.his.socket_group.clone(),
            tcp: cfg.his_tcp,
            ws: cfg.his_ws,
            allowed_origins: cfg.his.allowed_origins.clone(),
        })
        .await?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let hello = Out::Hello {
            protocol: PROTOCOL_VERSION,
            agent: concat!("ehc-agent ", env!("CARGO_PKG_VERSION")).into(),
            terminal_id: cfg.terminal.id.clone(),
        }
        .to_line();
        let (his_unix, his_tcp, his_ws) = (
            listeners.unix_path.clone(),
            listeners.tcp_addr,
            listeners.ws_addr,
        );
        listeners.serve(
            hub.clone(),
            pipeline.clone(),
            hello.into(),
            cancel.clone(),
            &tracker,
        );

        tracker.spawn(uploader::run(
            outbox.clone(),
            client.clone(),
            UploaderSettings {
                batch: cfg.outbox.batch as usize,
                concurrency: cfg.outbox.concurrency as usize,
                retention_days: cfg.outbox.retention_days,
                clock: uploader::wall_clock(),
            },
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

        let scanners = ScannerStates::default();
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
        let shown = |a: Option<std::net::SocketAddr>| {
            a.map(|a| a.to_string()).unwrap_or_else(|| "off".into())
        };
        tracing::info!(
            terminal = %cfg.terminal.id,
            his_unix = %his_unix.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "off".into()),
            his_tcp = %shown(his_tcp),
            his_ws = %shown(his_ws),
            outbox = %cfg.outbox_path.display(),
            "ehc-agent running"
        );
        Ok(App {
            pipeline,
            outbox,
            hub,
            client,
            his_unix,
            his_tcp,
            his_ws,
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

/// `ehc-agent run`: start, then wait for SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> Result<(), StartError> {
    let app = App::start(&cfg).await?;
    wait_for_signal().await;
    app.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
