//! The hospital gateway (`ehc-agent gateway`, DESIGN §5a): one platform
//! account, one upstream token and one secret for every terminal.
//!
//! A new platform token revokes the old one, so terminals that each hold the
//! hospital's appId revoke each other; and the secret, which reads any
//! patient's identity through the platform, would sit on every counter PC.
//! The gateway speaks the platform's own protocol downstream (a terminal's
//! agent changes only `base_url`, `app_id` and its secret) and is the
//! platform's only client upstream.
//!
//! * [`config`]: the `gateway.toml` file.
//! * [`store`]: enrolled terminals and their secrets, the tokens the gateway
//!   gave them, calls per interface per Beijing day: in a SQLite file (one
//!   gateway) or in Redis ([`redis`], several gateways, which then also
//!   share the upstream token under a lease with compare-and-set).
//! * [`server`]: the platform's paths: terminals' checks, answered as the
//!   platform would ([`crate::platform::serve`], shared with the simulator),
//!   then forwarding with the hospital's account ([`crate::platform::Client`],
//!   whose token is single-flight, generation-guarded and persisted), and
//!   the terminals' heartbeats.
//! * [`fleet`] and [`admin`]: every terminal and what needs attention, on
//!   the admin listener (the page, `/api/fleet`, `/metrics`).
//! * [`tls`] and [`accept`]: the terminals' listener; an accepted connection
//!   warms the upstream one.
//!
//! The upstream token is refreshed ahead of expiry by a task of its own, so
//! no forwarded scan pays for getAppToken.

pub mod accept;
pub mod admin;
pub mod config;
pub mod fleet;
pub mod redis;
pub mod server;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::GatewayConfig;
use store::GatewayStore;

use crate::platform::Client;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] store::GatewayStoreError),
    #[error(transparent)]
    Client(#[from] crate::platform::client::BuildError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct RunningGateway {
    pub addr: SocketAddr,
    /// The admin listener's `/metrics`, if configured.
    pub metrics_addr: Option<SocketAddr>,
    scheme: &'static str,
    pub upstream: Client,
    pub store: Arc<GatewayStore>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The store the configuration asks for.
pub fn open_store(cfg: &GatewayConfig) -> Result<GatewayStore, store::GatewayStoreError> {
    Ok(match &cfg.redis {
        Some((url, prefix)) => GatewayStore::Redis(redis::RedisStore::new(url, prefix)?),
        None => GatewayStore::Sqlite(store::SqliteStore::open(&cfg.store_path())?),
    })
}

/// This gateway's name in the shared store: host, process and port.
fn holder_name(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "gateway".into());
    format!("{host}:{}:{}", std::process::id(), listen.port())
}

impl RunningGateway {
    /// Open the store, bind, and serve until [`RunningGateway::stop`].
    pub async fn start(cfg: GatewayConfig) -> Result<RunningGateway, GatewayError> {
        let store = Arc::new(open_store(&cfg)?);
        let cfg_listen = cfg.listen;
        let mut upstream_settings = cfg.upstream.clone();
        if let Some((url, prefix)) = &cfg.redis {
            let shared: Arc<dyn crate::platform::token::SharedTokens> =
                Arc::new(redis::RedisStore::new(url, prefix)?);
            upstream_settings.shared = Some((shared, holder_name(cfg.listen)));
        }
        let upstream = Client::new(upstream_settings)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| GatewayError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| GatewayError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let stop = CancellationToken::new();
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(c), Some(k)) => Some(tls::acceptor(c, k)?),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let gw = Arc::new(server::Gateway::new(cfg, store.clone(), upstream.clone()));
        let metrics_addr = match gw.cfg.metrics_listen {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|source| GatewayError::Listen { addr: a, source })?;
                let addr = l.local_addr().ok();
                let s3 = stop.clone();
                let app =
                    admin::router(gw.clone()).into_make_service_with_connect_info::<tls::Peer>();
                tokio::spawn(async move {
                    let _ = axum::serve(l, app)
                        .with_graceful_shutdown(async move { s3.cancelled().await })
                        .await;
                });
                addr
            }
            None => None,
        };
        let app = server::router(gw);
        let (s1, s2) = (stop.clone(), stop.clone());
        let refresher = upstream.clone();
        let warmer = upstream.clone();
        let upstream_warm = upstream.clone();
        let s4 = stop.clone();
        tokio::spawn(async move { refresher.keep_fresh(s2).await });
        tokio::spawn(async move { warmer.keep_warm(s4).await });
        let task = match tls {
            None => tokio::spawn(async move {
                let serve = axum::serve(
                    accept::Preconnecting::new(listener, upstream_warm),
                    app.into_make_service_with_connect_info::<tls::Peer>(),
                )
                .with_graceful_shutdown(async move { s1.cancelled().await });
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "gateway server stopped");
                }
            }),
            Some(acceptor) => {
                let listener = accept::Preconnecting::new(listener, upstream_warm);
                let l = tls::TlsListener::new(listener, acceptor).map_err(|source| {
                    GatewayError::Listen {
                        addr: cfg_listen,
                        source,
                    }
                })?;
                tokio::spawn(async move {
                    let serve =
                        axum::serve(l, app.into_make_service_with_connect_info::<tls::Peer>())
                            .with_graceful_shutdown(async move { s1.cancelled().await });
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "gateway server stopped");
                    }
                })
            }
        };
        tracing::info!(listen = %addr, scheme, "ehc-agent gateway running");
        Ok(RunningGateway {
            metrics_addr,
            scheme,
            addr,
            upstream,
            store,
            stop,
            task,
        })
    }

    /// What terminals put in `base_url`.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// `ehc-agent gateway run`: serve until SIGTERM/SIGINT.
pub async fn run(cfg: GatewayConfig) -> Result<(), GatewayError> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            return Err(GatewayError::Listen {
                addr: cfg.listen,
                source: e,
            })
        }
    };
    let gw = RunningGateway::start(cfg).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!("gateway stopping");
    gw.stop().await;
    Ok(())
}
