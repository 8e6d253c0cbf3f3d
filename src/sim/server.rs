//! The simulator's HTTP side: the platform's five paths, the `/_sim/`
//! control endpoint (loopback peers only), and a listener that can refuse or
//! reset connections to simulate an outage.
//!
//! Faults are applied here, around [`SimState::answer`]: latency first, then
//! HTTP 5xx, forced and random result codes, then the real answer, then lost
//! answers and body faults. An outage also breaks requests on connections
//! that were already open (keep-alive), by aborting the response body.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::config::SimConfig;
use super::faults::{BodyKind, Faults, OutageMode};
use super::keepalive::IdleListener;
use super::state::SimState;
use crate::clock;
use crate::platform::api::API_NAMES;

pub(crate) struct Shared {
    state: Mutex<SimState>,
    /// Bumped on every fault change, so the listener re-reads the outage.
    faults_changed: watch::Sender<u64>,
    /// Bumped after every platform answer, so a watcher (the demo, tests)
    /// can wait for "something was received" instead of polling.
    answered: watch::Sender<u64>,
    /// Requests for no API or control path (a client's `HEAD /` keeping
    /// its connection warm lands here), so tests can tell a connection
    /// opened by a request from one opened bare.
    unrouted: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn outage(&self, now: i64) -> Option<OutageMode> {
        self.lock().faults.outage_at(now)
    }

    fn set_faults(&self, mut f: Faults) -> Result<(), String> {
        f.validate()?;
        if let Some(o) = f.outage.as_mut() {
            if o.mode == OutageMode::Refuse && o.for_s.is_none() {
                return Err("a `refuse` outage needs for_s: the control endpoint shares the port and could not clear it".into());
            }
            o.until = o.for_s.map(|s| clock::now_unix() + s as i64);
        }
        self.lock().faults = f;
        self.faults_changed.send_modify(|v| *v += 1);
        Ok(())
    }
}

/// A running simulator.
pub struct SimServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// `Some` when serving HTTPS.
    tls: Option<Arc<crate::gateway::tls::HandshakeCounts>>,
}

impl SimServer {
    /// Bind `addr` (port 0 for any) and serve plain HTTP until
    /// [`SimServer::stop`].
    pub async fn start(cfg: SimConfig, addr: SocketAddr) -> std::io::Result<SimServer> {
        Self::start_with(cfg, addr, None).await
    }

    /// [`SimServer::start`], serving HTTPS with `tls` when given (the real
    /// platform is HTTPS: its handshakes are part of what a scan costs).
    pub async fn start_with(
        cfg: SimConfig,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<SimServer> {
        cfg.validate().map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let max_body = cfg.max_body;
        let idle = (cfg.keepalive_s > 0).then(|| Duration::from_secs(cfg.keepalive_s));
        let (tx, rx) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(SimState::new(cfg)),
            faults_changed: tx,
            answered: watch::channel(0).0,
            unrouted: Default::default(),
        });
        let initial = shared.lock().faults.clone();
        shared.set_faults(initial).map_err(std::io::Error::other)?;
        let app = router(shared.clone(), max_body);
        let shutdown = CancellationToken::new();
        let faulty = FaultyListener {
            addr,
            inner: Some(listener),
            shared: shared.clone(),
            changed: rx,
        };
        let stop = shutdown.clone();
        let (task, counts) = match tls {
            None => {
                let l = IdleListener {
                    inner: faulty,
                    idle,
                };
                let task = tokio::spawn(async move {
                    let serve = axum::serve(l, app.into_make_service_with_connect_info::<Peer>())
                        .with_graceful_shutdown(async move { stop.cancelled().await });
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "simulator server stopped");
                    }
                });
                (task, None)
            }
            Some(acceptor) => {
                let tls = crate::gateway::tls::TlsListener::new(faulty, acceptor)?;
                let counts = tls.counts();
                let l = IdleListener { inner: tls, idle };
                let task = tokio::spawn(async move {
                    let serve = axum::serve(l, app.into_make_service_with_connect_info::<Peer>())
                        .with_graceful_shutdown(async move { stop.cancelled().await });
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "simulator server stopped");
                    }
                });
                (task, Some(counts))
            }
        };
        Ok(SimServer {
            addr,
            shared,
            shutdown,
            task,
            tls: counts,
        })
    }

    /// TLS handshakes so far, (full, resumed); `None` over plain HTTP.
    pub fn handshakes(&self) -> Option<(u64, u64)> {
        self.tls.as_ref().map(|c| {
            (
                c.full.load(std::sync::atomic::Ordering::Relaxed),
                c.resumed.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }

    /// Requests so far for a path that is no API (a warm-up's `HEAD /`).
    pub fn unrouted(&self) -> u64 {
        self.shared
            .unrouted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS): what the agent's
    /// `platform.base_url` takes.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Look at or change the simulator's state in-process.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut SimState) -> R) -> R {
        f(&mut self.shared.lock())
    }

    pub fn set_faults(&self, f: Faults) -> Result<(), String> {
        self.shared.set_faults(f)
    }

    /// A receiver that changes after every platform answer.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.answered.subscribe()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// `ehc-agent sim`: serve until Ctrl-C or SIGTERM.
pub async fn run_forever(
    cfg: SimConfig,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<()> {
    let (app_id, hospital) = (cfg.app_id.clone(), cfg.hospital_ids.join(","));
    let sim = SimServer::start_with(cfg, addr, tls).await?;
    tracing::info!(addr = %sim.addr, app_id = %app_id, hospital_ids = %hospital, "platform simulator listening");
    println!(
        "platform simulator at {} (control: {}/_sim/state)",
        sim.base_url(),
        sim.base_url()
    );
    for c in sim.with_state(|s| s.cards()) {
        println!("card {}: static code {}", c.index, c.static_code);
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    sim.stop().await;
    Ok(())
}

fn router(shared: Arc<Shared>, max_body: usize) -> Router {
    let mut r = Router::new();
    for (name, path) in API_NAMES {
        let name: &'static str = name;
        r = r.route(
            path,
            post(move |st: State<Arc<Shared>>, body: Bytes| api_call(st, name, body)),
        );
    }
    r.route("/_sim/state", get(ctl_state))
        .route("/_sim/cards", get(ctl_cards))
        .route("/_sim/mint", post(ctl_mint))
        .route(
            "/_sim/faults",
            get(ctl_get_faults)
                .put(ctl_put_faults)
                .delete(ctl_clear_faults),
        )
        .route("/_sim/clock", post(ctl_clock))
        .route("/_sim/revoke", post(ctl_revoke))
        .route("/_sim/reset", post(ctl_reset))
        .fallback(|st: State<Arc<Shared>>| async move {
            st.unrouted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (
                StatusCode::NOT_FOUND,
                "no such path on the platform simulator\n",
            )
        })
        // Bodies up to 4x the limit are read so an oversized request gets the
        // platform's own 20004 answer; larger ones get HTTP 413.
        .layer(DefaultBodyLimit::max(max_body.saturating_mul(4)))
        .layer(axum::middleware::from_fn(loopback_control))
        .with_state(shared)
}

/// `/_sim/` is for the machine itself: refuse other peers.
async fn loopback_control(
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.uri().path().starts_with("/_sim/") && !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "the simulator's control endpoint answers loopback peers only\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// What to do with one platform request, decided under the lock.
enum Plan {
    Http5xx,
    Answer {
        json: Value,
        lost: bool,
        body_fault: Option<(BodyKind, u64)>,
    },
}

async fn api_call(State(sh): State<Arc<Shared>>, api: &'static str, body: Bytes) -> Response {
    let now = clock::now_unix();
    if sh.outage(now).is_some() {
        sh.lock().count(api, "outage");
        return aborted();
    }
    let delay = {
        let mut st = sh.lock();
        let (lat, jit) = (st.faults.latency_ms, st.faults.jitter_ms);
        lat + if jit > 0 {
            st.rng.random_range(0..=jit)
        } else {
            0
        }
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let plan = {
        let mut st = sh.lock();
        let f = st.faults.for_api(api).cloned().unwrap_or_default();
        let roll = |st: &mut SimState, p: f64| p > 0.0 && st.rng.random_bool(p.min(1.0));
        if roll(&mut st, f.http_5xx_rate) {
            st.count(api, "http_503");
            Plan::Http5xx
        } else {
            let forced = st.faults.take_forced(api);
            let random = f
                .result_code
                .filter(|_| forced.is_none() && roll(&mut st, f.result_code_rate));
            let forced = forced.or(random);
            let answer = match forced {
                Some(code) => st.forced_answer(api, code, &body),
                None => st.answer(api, &body, now),
            };
            let lost = roll(&mut st, f.lost_answer_rate);
            if lost {
                st.count(api, "lost_answer");
            }
            sh.answered.send_modify(|n| *n += 1);
            Plan::Answer {
                json: answer.to_json(),
                lost,
                body_fault: st.faults.take_body(api),
            }
        }
    };
    match plan {
        Plan::Http5xx => (
            StatusCode::SERVICE_UNAVAILABLE,
            "<html><body>503 Service Temporarily Unavailable</body></html>",
        )
            .into_response(),
        Plan::Answer { lost: true, .. } => (
            StatusCode::BAD_GATEWAY,
            "<html><body>502 Bad Gateway</body></html>",
        )
            .into_response(),
        Plan::Answer {
            json, body_fault, ..
        } => {
            let text = json.to_string();
            match body_fault {
                None => (
                    [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
                    text,
                )
                    .into_response(),
                Some((BodyKind::NotJson, _)) => (
                    [(header::CONTENT_TYPE, "text/html")],
                    "<html><body>系统繁忙</body></html>",
                )
                    .into_response(),
                Some((BodyKind::Truncated, _)) => {
                    let cut = text.len() / 2;
                    let cut = (0..=cut)
                        .rev()
                        .find(|i| text.is_char_boundary(*i))
                        .unwrap_or(0);
                    (
                        [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
                        text[..cut].to_owned(),
                    )
                        .into_response()
                }
                Some((BodyKind::Slow, total_ms)) => slow_body(text.into_bytes(), total_ms),
            }
        }
    }
}

/// A response whose body fails at once: the connection is torn down, which
/// the client sees as a transport error, like a reset.
fn aborted() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("simulated outage"))
    });
    Response::new(Body::from_stream(stream))
}

/// The body in 16 pieces over `total_ms`.
fn slow_body(bytes: Vec<u8>, total_ms: u64) -> Response {
    let pieces: Vec<Bytes> = bytes
        .chunks(bytes.len().div_ceil(16).max(1))
        .map(Bytes::copy_from_slice)
        .collect();
    let step = Duration::from_millis(total_ms / pieces.len().max(1) as u64);
    let stream = futures_util::stream::unfold(pieces.into_iter(), move |mut it| async move {
        let next = it.next()?;
        tokio::time::sleep(step).await;
        Some((Ok::<Bytes, std::io::Error>(next), it))
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json;charset=UTF-8"
            .parse()
            .unwrap_or(header::HeaderValue::from_static("application/json")),
    );
    r
}

// ---------------------------------------------------------------- control ---

async fn ctl_state(State(sh): State<Arc<Shared>>) -> Json<Value> {
    let st = sh.lock();
    let now = clock::now_unix();
    let unique = st.unique_reports().len();
    Json(json!({
        "reports": st.reports,
        "uniqueReports": unique,
        "binds": st.binds,
        "verifications": st.verifications,
        "duplicates": st.duplicates,
        "calls": st.calls,
        "token": st.current_token().map(|(t, e)| json!({"appToken": t, "expiresAt": e})),
        "tokensIssued": st.tokens_issued(),
        "clockOffsetS": st.clock_offset,
        "simNow": st.sim_now(now),
        "faults": st.faults,
    }))
}

async fn ctl_cards(State(sh): State<Arc<Shared>>) -> Json<Value> {
    Json(json!(sh.lock().cards()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MintReq {
    #[serde(default)]
    card: usize,
    #[serde(default)]
    ttl_s: Option<u64>,
}

async fn ctl_mint(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: MintReq = match parse_ctl(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match sh.lock().mint(req.card, req.ttl_s, clock::now_unix()) {
        Some((code, exp)) => Json(json!({"qrCodeText": code, "expiresAt": exp})).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no card {}\n", req.card)).into_response(),
    }
}

async fn ctl_get_faults(State(sh): State<Arc<Shared>>) -> Json<Value> {
    Json(json!(sh.lock().faults))
}

async fn ctl_put_faults(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    let f: Faults = match parse_ctl(&body) {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    match sh.set_faults(f) {
        Ok(()) => Json(json!(sh.lock().faults)).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn ctl_clear_faults(State(sh): State<Arc<Shared>>) -> Json<Value> {
    let _ = sh.set_faults(Faults::default());
    Json(json!(Faults::default()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClockReq {
    advance_s: i64,
}

async fn ctl_clock(State(sh): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: ClockReq = match parse_ctl(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut st = sh.lock();
    st.clock_offset = st.clock_offset.saturating_add(req.advance_s);
    Json(json!({"clockOffsetS": st.clock_offset})).into_response()
}

async fn ctl_revoke(State(sh): State<Arc<Shared>>) -> Json<Value> {
    sh.lock().revoke_all();
    Json(json!({"revoked": true}))
}

async fn ctl_reset(State(sh): State<Arc<Shared>>) -> Json<Value> {
    sh.lock().reset_records();
    Json(json!({"reset": true}))
}

/// A control request's JSON body (empty means `{}`), or the 400 answer.
fn parse_ctl<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, (StatusCode, String)> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("bad control request: {e}\n"),
        )
    })
}

// --------------------------------------------------------------- listener ---

/// The peer address of a connection, for the control endpoint's loopback
/// check.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl<L> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, IdleListener<L>>>
    for Peer
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, IdleListener<L>>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// A TCP listener that obeys the outage fault: `refuse` closes the socket
/// (connections are refused), `reset` accepts and drops with RST. Control
/// requests (`/_sim/`) still pass during a `reset` outage.
struct FaultyListener {
    addr: SocketAddr,
    inner: Option<TcpListener>,
    shared: Arc<Shared>,
    changed: watch::Receiver<u64>,
}

impl axum::serve::Listener for FaultyListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let now = clock::now_unix();
            let outage = self.shared.outage(now);
            if outage == Some(OutageMode::Refuse) {
                self.inner = None;
                let until = self
                    .shared
                    .lock()
                    .faults
                    .outage
                    .as_ref()
                    .and_then(|o| o.until);
                let wait = until.map(|u| {
                    Duration::from_secs((u - now).max(0) as u64) + Duration::from_millis(10)
                });
                tokio::select! {
                    _ = self.changed.changed() => {}
                    _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600))) => {}
                }
                continue;
            }
            if self.inner.is_none() {
                match TcpListener::bind(self.addr).await {
                    Ok(l) => self.inner = Some(l),
                    Err(e) => {
                        tracing::warn!(addr = %self.addr, error = %e, "simulator cannot rebind after outage; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let Some(l) = self.inner.as_ref() else {
                continue;
            };
            let accepted = tokio::select! {
                r = l.accept() => r,
                _ = self.changed.changed() => continue,
            };
            match accepted {
                Ok((s, peer)) => {
                    if self.shared.outage(clock::now_unix()) == Some(OutageMode::Reset)
                        && !is_control(&s).await
                    {
                        // Linger 0 makes the close an RST, which is what a
                        // reset outage is; with 0 the drop does not block.
                        #[allow(deprecated)]
                        let _ = s.set_linger(Some(Duration::ZERO));
                        drop(s);
                        continue;
                    }
                    let _ = s.set_nodelay(true);
                    return (s, peer);
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "simulator accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Does this connection's first request line address `/_sim/`?
async fn is_control(s: &TcpStream) -> bool {
    let mut buf = [0u8; 32];
    match tokio::time::timeout(Duration::from_millis(500), s.peek(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].windows(6).any(|w| w == b"/_sim/"),
        _ => false,
    }
}
