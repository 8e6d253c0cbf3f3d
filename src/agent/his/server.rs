//! The HIS listeners and the per-connection session (DESIGN §4, §6).
//!
//! Patients' names, ID numbers and phones go out on these connections, and
//! `bind` writes to the platform what HIS says: who may connect is the
//! whole point of this file.
//!
//! * Unix socket: mode 0660, group `socket_group`; a socket file left by a
//!   killed agent is replaced after checking that nothing answers on it (two
//!   agents on one socket is refused). Each peer's uid/gid/pid is read with
//!   `SO_PEERCRED`: a peer that is not root, not the service's own user and
//!   not in the group is refused. Its groups come from `/proc/PID/status`,
//!   or, where that is hidden (`ProtectProc=invisible`), from the user
//!   database (`getgrouplist`); a peer whose groups cannot be known at all
//!   is refused (fail closed).
//! * Loopback TCP and WebSocket: any local account can reach loopback, so
//!   every connection authenticates with the HIS token ([`HisToken`]): the
//!   first message is `{"type":"auth","token":"..."}` (WebSocket clients may
//!   put it in the URL instead, `?token=...`). Nothing is sent to a client
//!   but `hello` before that, and a wrong token, another message first, or
//!   silence for [`AUTH_TIMEOUT`] closes the connection. A WebSocket that
//!   carries an `Origin` (a browser) must also come from `allowed_origins`,
//!   since any page the browser shows can reach loopback.
//! * Every listener admits at most `max_clients` connections at once; past
//!   that a connection is told why and closed, with a log line (at most one
//!   every 10 s), so a local user cannot exhaust the agent's descriptors.
//!
//! Every session: `hello` first, then broadcast events from the hub, and
//! replies to `use`/`bind`/`ping`. Events held while no HIS was connected go
//! to the first client that sends a message (it has said it is HIS).
//! Malformed lines get an `error` and the session goes on; a line over
//! 64 KiB gets an `error` and the session ends; a peer that stops reading
//! for [`WRITE_TIMEOUT`] or lets [`super::hub::CLIENT_QUEUE`] events pile
//! up is disconnected. A Unix peer that shuts down only its sending side
//! (EOF on read, no POLLHUP) keeps receiving events; over TCP a half close
//! cannot be told from a close, so EOF ends the session there.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::hub::{Hub, Line};
use super::protocol::{self, In, Out, MAX_LINE};

/// A peer that does not take our writes for this long is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A TCP or WebSocket client must authenticate within this.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default connections per listener.
pub const DEFAULT_MAX_CLIENTS: usize = 32;

/// The token TCP and WebSocket clients present. Compared by digest, so the
/// comparison takes the same time whatever the guess.
#[derive(Clone)]
pub struct HisToken(Arc<[u8; 32]>);

impl HisToken {
    pub fn new(token: &str) -> Self {
        use sha2::Digest as _;
        HisToken(Arc::new(sha2::Sha256::digest(token.as_bytes()).into()))
    }

    pub fn matches(&self, presented: &str) -> bool {
        use sha2::Digest as _;
        let d: [u8; 32] = sha2::Sha256::digest(presented.as_bytes()).into();
        crate::platform::sign::same_bytes(&d, &self.0[..])
    }
}

impl std::fmt::Debug for HisToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<HIS token>")
    }
}

/// What the sessions need answered: the pipeline implements it.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, msg: In, peer: &str) -> impl Future<Output = Out> + Send;
}

#[derive(Debug, Clone)]
pub struct HisSettings {
    pub unix: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub tcp: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub allowed_origins: Vec<String>,
    /// Required of TCP and WebSocket clients; without one those listeners
    /// refuse every connection.
    pub token: Option<HisToken>,
    pub max_clients: usize,
    /// `socket_group`'s gid, resolved: the Unix peer check admits it.
    pub socket_gid: Option<u32>,
}

impl Default for HisSettings {
    fn default() -> Self {
        HisSettings {
            unix: None,
            socket_group: None,
            tcp: None,
            ws: None,
            http: None,
            allowed_origins: Vec::new(),
            token: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            socket_gid: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HisError {
    #[error("another process is already serving HIS on {0} (is a second agent running?)")]
    AlreadyServed(PathBuf),
    #[error("HIS socket {path}: {source}")]
    Unix {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HIS socket group `{0}` does not exist (create it: groupadd --system {0})")]
    NoSuchGroup(String),
    #[error("cannot listen on {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The gid of the HIS socket group, if one is configured.
pub fn socket_gid(group: Option<&str>) -> Result<Option<u32>, HisError> {
    match group {
        None => Ok(None),
        Some(g) => Ok(Some(
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| HisError::NoSuchGroup(g.to_owned()))?
                .gid
                .as_raw(),
        )),
    }
}

/// Bind a loopback TCP (or WebSocket) listener.
pub async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, HisError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HisError::Tcp { addr, source })
}

/// Bind the HIS Unix socket: mode 0660, group `gid`; a stale socket file is
/// replaced, a live one refused.
pub async fn bind_unix(path: &Path, gid: Option<u32>) -> Result<UnixListener, HisError> {
    let err = |source| HisError::Unix {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(HisError::AlreadyServed(path.to_owned()));
        }
        tracing::info!(path = %path.display(), "removing a stale HIS socket left by an earlier run");
        std::fs::remove_file(path).map_err(err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    Ok(l)
}

/// Whether a Unix peer may use the socket: root, the agent's own user, or a
/// member (primary or supplementary) of the socket group.
///
/// `supplementary` is `None` when the peer's groups cannot be known (see
/// [`peer_groups`]): such a peer is refused unless its uid or primary gid
/// already admits it. Fail closed: a check that admits whoever it cannot
/// check is no check.
pub fn peer_allowed(
    uid: u32,
    gid: u32,
    supplementary: Option<&[u32]>,
    own_uid: u32,
    group: Option<u32>,
) -> bool {
    uid == 0
        || uid == own_uid
        || group.is_some_and(|g| g == gid || supplementary.is_some_and(|s| s.contains(&g)))
}

/// A peer's supplementary groups: from `/proc/PID/status`, or, when that is
/// hidden from us (`ProtectProc=invisible`), the groups its user has in the
/// user database. `None` if neither can be read.
fn peer_groups(pid: Option<i32>, uid: u32, gid: u32) -> Option<Vec<u32>> {
    supplementary_groups(pid).or_else(|| user_groups(uid, gid))
}

/// A process's supplementary groups, from `/proc/PID/status`; `None` if
/// they cannot be read.
fn supplementary_groups(pid: Option<i32>) -> Option<Vec<u32>> {
    let pid = pid?;
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
}

/// The groups of user `uid` in the user database (`getgrouplist`).
fn user_groups(uid: u32, gid: u32) -> Option<Vec<u32>> {
    use nix::unistd::{getgrouplist, Gid, Uid, User};
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten()?;
    let name = std::ffi::CString::new(user.name).ok()?;
    getgrouplist(&name, Gid::from_raw(gid))
        .ok()
        .map(|g| g.into_iter().map(Gid::as_raw).collect())
}

/// One listener's connection slots, and when a refusal was last logged.
/// The bound is read at each connection, so a reload can change it.
struct Slots {
    name: &'static str,
    active: Arc<std::sync::atomic::AtomicUsize>,
    last_log: std::sync::Mutex<Option<std::time::Instant>>,
    refused: std::sync::atomic::AtomicU64,
}

/// A taken slot; given back when dropped (the session ended).
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Slots {
    fn new(name: &'static str) -> Arc<Slots> {
        Arc::new(Slots {
            name,
            active: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            last_log: std::sync::Mutex::new(None),
            refused: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// A slot, or `None` (logged, at most once every 10 s) when `max` are
    /// taken.
    fn take(&self, max: usize) -> Option<Slot> {
        use std::sync::atomic::Ordering;
        let taken = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_ok() {
            return Some(Slot(self.active.clone()));
        }
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(listener = self.name, max_clients = max, refused_total = n, "HIS connection refused: the listener has max_clients connections already ([his] max_clients)");
        }
        None
    }

    fn full_message(max: usize) -> String {
        Out::error(
            None,
            format!("too many connections on this listener ({max}); closing"),
        )
        .to_line()
    }
}

/// Tell a refused peer why, briefly, and let it go.
async fn refuse<W: AsyncWrite + Unpin>(mut w: W, line: String) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        w.write_all(format!("{line}\n").as_bytes()),
    )
    .await;
}

/// What a reload may change without closing a listener or a connection:
/// read by each new connection.
struct Shared {
    hello: Line,
    hello_auth: Line,
    token: Option<HisToken>,
    origins: Arc<Vec<String>>,
    max_clients: usize,
    socket_gid: Option<u32>,
}

impl Shared {
    fn new(hello: &Out, s: &HisSettings) -> Shared {
        let with_auth = match hello {
            Out::Hello {
                protocol,
                agent,
                terminal_id,
                ..
            } => Out::Hello {
                protocol: *protocol,
                agent: agent.clone(),
                terminal_id: terminal_id.clone(),
                auth: Some("token".into()),
            },
            other => other.clone(),
        };
        Shared {
            hello: hello.to_line().into(),
            hello_auth: with_auth.to_line().into(),
            token: s.token.clone(),
            origins: Arc::new(s.allowed_origins.clone()),
            max_clients: s.max_clients.max(1),
            socket_gid: s.socket_gid,
        }
    }
}

/// Serves HIS clients on listeners it is given. Each listener runs until its
/// own stop token (a reload closes one listener and keeps the others);
/// sessions run until the server's `sessions` token (shutdown), so a reload
/// never drops a connected HIS.
pub struct Server<H> {
    ctx: Ctx<H>,
}

impl<H> Clone for Server<H> {
    fn clone(&self) -> Self {
        Server {
            ctx: self.ctx.clone(),
        }
    }
}

impl<H: Handler> Server<H> {
    /// `hello` is the greeting every client gets first; connections that
    /// must authenticate get it with `"auth":"token"`.
    pub fn new(
        hub: Hub,
        handler: Arc<H>,
        hello: &Out,
        settings: &HisSettings,
        sessions: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        Server {
            ctx: Ctx {
                hub,
                handler,
                shared: Arc::new(std::sync::RwLock::new(Arc::new(Shared::new(
                    hello, settings,
                )))),
                cancel: sessions,
                tracker: tracker.clone(),
            },
        }
    }

    /// New greeting, token, origins and bound for connections from now on.
    pub fn update(&self, hello: &Out, settings: &HisSettings) {
        *self.ctx.shared.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Shared::new(hello, settings));
    }

    /// Serve the Unix socket until `stop`; its file is removed then. The
    /// peer check admits the socket group of the current settings.
    pub fn serve_unix(&self, l: UnixListener, path: PathBuf, stop: CancellationToken) {
        let ctx = self.ctx.clone();
        self.ctx.tracker.spawn(async move {
            accept_unix(l, Slots::new("unix"), ctx, stop).await;
            let _ = std::fs::remove_file(&path);
        });
    }

    pub fn serve_tcp(&self, l: TcpListener, stop: CancellationToken) {
        let ctx = self.ctx.clone();
        self.ctx
            .tracker
            .spawn(async move { accept_tcp(l, Slots::new("tcp"), ctx, stop).await });
    }

    /// The local HTTP API ([`super::http`]) until `stop`; long polls and
    /// streams open at once are bounded by `max_clients`.
    pub fn serve_http(&self, l: TcpListener, stop: CancellationToken) {
        let shared = self.ctx.shared.clone();
        let current = move || shared.read().unwrap_or_else(|e| e.into_inner()).clone();
        let max = current().max_clients;
        let ctx = super::http::Ctx {
            hub: self.ctx.hub.clone(),
            handler: self.ctx.handler.clone(),
            access: Arc::new(move || {
                let s = current();
                super::http::Access {
                    token: s.token.clone(),
                    origins: s.origins.clone(),
                }
            }),
            waiting: Arc::new(tokio::sync::Semaphore::new(max)),
            version: concat!("ehc-agent ", env!("CARGO_PKG_VERSION")),
            // Long polls and streams end with the listener or at shutdown
            // (a stream never ends by itself, and graceful shutdown waits
            // for every response).
            end: self.ctx.cancel.child_token(),
        };
        let end = ctx.end.clone();
        let app = super::http::router(ctx);
        self.ctx.tracker.spawn(async move {
            let serve = axum::serve(l, app).with_graceful_shutdown(async move {
                tokio::select! {
                    _ = stop.cancelled() => end.cancel(),
                    _ = end.cancelled() => {}
                }
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "HIS HTTP listener stopped");
            }
        });
    }

    pub fn serve_ws(&self, l: TcpListener, stop: CancellationToken) {
        let ctx = self.ctx.clone();
        self.ctx
            .tracker
            .spawn(async move { accept_ws(l, Slots::new("websocket"), ctx, stop).await });
    }
}

struct Ctx<H> {
    hub: Hub,
    handler: Arc<H>,
    shared: Arc<std::sync::RwLock<Arc<Shared>>>,
    /// Ends every session (shutdown).
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl<H> Ctx<H> {
    fn shared(&self) -> Arc<Shared> {
        self.shared
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl<H> Clone for Ctx<H> {
    fn clone(&self) -> Self {
        Ctx {
            hub: self.hub.clone(),
            handler: self.handler.clone(),
            shared: self.shared.clone(),
            cancel: self.cancel.clone(),
            tracker: self.tracker.clone(),
        }
    }
}

/// How a session's client is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Checked by the socket's mode and `SO_PEERCRED`.
    PeerChecked,
    /// Must send `auth` with the token first.
    NeedsToken,
    /// Presented the token already (WebSocket URL).
    TokenGiven,
}

/// Wait before accepting again after an accept error (EMFILE and the like),
/// so a descriptor shortage does not become a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The next connection from `accept`, or `None` once cancelled. Accept
/// errors are logged and retried after [`ACCEPT_BACKOFF`].
async fn next_conn<S, A, F, Fut>(
    cancel: &CancellationToken,
    listener: &str,
    mut accept: F,
) -> Option<(S, A)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<(S, A)>>,
{
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            r = accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!(listener, error = %e, "HIS accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

async fn accept_unix<H: Handler>(
    l: UnixListener,
    slots: Arc<Slots>,
    ctx: Ctx<H>,
    stop: CancellationToken,
) {
    let own = nix::unistd::geteuid().as_raw();
    loop {
        let Some((s, _)) = next_conn(&stop, "unix", || l.accept()).await else {
            return;
        };
        let cred = match s.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read HIS peer credentials; refused");
                continue;
            }
        };
        let (uid, pgid, pid) = (cred.uid(), cred.gid(), cred.pid());
        let peer = format!(
            "unix uid={uid} gid={pgid} pid={}",
            pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
        );
        let groups = peer_groups(pid, uid, pgid);
        let gid = ctx.shared().socket_gid;
        if !peer_allowed(uid, pgid, groups.as_deref(), own, gid) {
            let why = if groups.is_none() {
                "its groups cannot be read"
            } else {
                "not root, not the service user, not in the socket group"
            };
            tracing::warn!(uid, gid = pgid, pid = ?pid, reason = why, "HIS peer refused");
            let line = Out::error(None, format!("permission denied: uid {uid} is not root, the agent's user, or in the HIS socket group")).to_line();
            ctx.tracker.spawn(refuse(s, line));
            continue;
        }
        let max = ctx.shared().max_clients;
        let Some(permit) = slots.take(max) else {
            ctx.tracker.spawn(refuse(s, Slots::full_message(max)));
            continue;
        };
        tracing::info!(uid, gid = pgid, pid = ?pid, "HIS client connected (unix)");
        let ctx2 = ctx.clone();
        let (r, w) = s.into_split();
        ctx.tracker.spawn(async move {
            session(
                LineReader::unix(r),
                LineWriter(w),
                peer,
                Admission::PeerChecked,
                ctx2,
            )
            .await;
            drop(permit);
        });
    }
}

async fn accept_tcp<H: Handler>(
    l: TcpListener,
    slots: Arc<Slots>,
    ctx: Ctx<H>,
    stop: CancellationToken,
) {
    loop {
        let Some((s, addr)) = next_conn(&stop, "tcp", || l.accept()).await else {
            return;
        };
        let max = ctx.shared().max_clients;
        let Some(permit) = slots.take(max) else {
            ctx.tracker.spawn(refuse(s, Slots::full_message(max)));
            continue;
        };
        let _ = s.set_nodelay(true);
        tracing::info!(peer = %addr, "HIS client connected (tcp), waiting for auth");
        let ctx2 = ctx.clone();
        let (r, w) = s.into_split();
        ctx.tracker.spawn(async move {
            session(
                LineReader::new(r),
                LineWriter(w),
                format!("tcp {addr}"),
                Admission::NeedsToken,
                ctx2,
            )
            .await;
            drop(permit);
        });
    }
}

/// The `token` parameter of a request URI's query, if any.
fn query_token(uri: &tokio_tungstenite::tungstenite::http::Uri) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "token").then(|| v.to_owned())
    })
}

// The handshake callback's signature is tungstenite's, large error and all.
#[allow(clippy::result_large_err)]
async fn accept_ws<H: Handler>(
    l: TcpListener,
    slots: Arc<Slots>,
    ctx: Ctx<H>,
    stop: CancellationToken,
) {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    use tokio_tungstenite::tungstenite::http::StatusCode;
    loop {
        let Some((s, addr)) = next_conn(&stop, "websocket", || l.accept()).await else {
            return;
        };
        let shared = ctx.shared();
        let Some(permit) = slots.take(shared.max_clients) else {
            // Before the handshake: an HTTP answer a browser can show.
            let body = "too many connections to ehc-agent\n";
            ctx.tracker.spawn(refuse(
                s,
                format!("HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", body.len(), body.trim_end()),
            ));
            continue;
        };
        let ctx2 = ctx.clone();
        ctx.tracker.spawn(async move {
            let (token, origins) = (shared.token.clone(), shared.origins.clone());
            let mut given = None::<bool>;
            let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                let deny = |status: StatusCode, msg: String| {
                    let mut r = ErrorResponse::new(Some(msg));
                    *r.status_mut() = status;
                    r
                };
                match req.headers().get("origin").map(|o| o.to_str().unwrap_or("")) {
                    Some(o) if !origins.iter().any(|a| a == o) => {
                        tracing::warn!(peer = %addr, origin = %o, "WebSocket from an origin not in allowed_origins refused");
                        return Err(deny(StatusCode::FORBIDDEN, format!("origin {o} is not allowed to connect to ehc-agent\n")));
                    }
                    _ => {}
                }
                if let Some(t) = query_token(req.uri()) {
                    if !token.as_ref().is_some_and(|k| k.matches(&t)) {
                        tracing::warn!(peer = %addr, "WebSocket with a wrong HIS token refused");
                        return Err(deny(StatusCode::FORBIDDEN, "wrong HIS token\n".into()));
                    }
                    given = Some(true);
                }
                Ok(resp)
            };
            let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(Some(MAX_LINE))
                .max_frame_size(Some(MAX_LINE));
            let handshake = tokio_tungstenite::accept_hdr_async_with_config(s, check, Some(cfg));
            let ws = match tokio::time::timeout(WRITE_TIMEOUT, handshake).await {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "WebSocket handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let admission = if given == Some(true) {
                Admission::TokenGiven
            } else {
                Admission::NeedsToken
            };
            tracing::info!(peer = %addr, "HIS client connected (websocket)");
            let (w, r) = ws.split();
            session(WsReader(r), WsWriter(w), format!("ws {addr}"), admission, ctx2).await;
            drop(permit);
        });
    }
}

/// What a transport's reader yields.
enum Incoming {
    Line(Vec<u8>),
    /// The peer shut down its sending side (EOF); it may still read.
    EndOfInput,
    /// A line or message over [`MAX_LINE`].
    TooLong,
    /// A frame the protocol has no use for (binary WebSocket message).
    Unusable(&'static str),
    Closed,
}

trait ReadLines: Send {
    fn next_line(&mut self) -> impl Future<Output = Incoming> + Send;

    /// After [`Incoming::EndOfInput`]: whether the peer has gone entirely
    /// (closed, not just shut its sending side). Only a Unix socket can
    /// tell (POLLHUP); over TCP a peer that closed is found out by the next
    /// write.
    fn peer_gone(&self) -> bool {
        false
    }

    /// Whether [`ReadLines::peer_gone`] can tell a half close from a close.
    fn can_tell_half_close(&self) -> bool {
        false
    }
}

trait WriteLines: Send {
    fn send_line(&mut self, line: &str) -> impl Future<Output = std::io::Result<()>> + Send;
}

struct LineReader<R> {
    frames: FramedRead<R, AnyDelimiterCodec>,
    /// The socket to ask for POLLHUP (Unix sockets only).
    hup_fd: Option<std::os::fd::RawFd>,
}

impl<R: AsyncRead + Unpin + Send> LineReader<R> {
    fn new(r: R) -> Self {
        LineReader {
            frames: FramedRead::new(
                r,
                AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_LINE),
            ),
            hup_fd: None,
        }
    }
}

impl LineReader<tokio::net::unix::OwnedReadHalf> {
    fn unix(r: tokio::net::unix::OwnedReadHalf) -> Self {
        use std::os::fd::AsRawFd as _;
        let fd = r.as_ref().as_raw_fd();
        LineReader {
            hup_fd: Some(fd),
            ..Self::new(r)
        }
    }
}

impl<R: AsyncRead + Unpin + Send> ReadLines for LineReader<R> {
    fn can_tell_half_close(&self) -> bool {
        self.hup_fd.is_some()
    }

    fn peer_gone(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(fd) = self.hup_fd else { return false };
        // The fd is owned by the reader half we hold, so it is open.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let mut fds = [PollFd::new(fd, PollFlags::empty())];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            && fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
    }

    async fn next_line(&mut self) -> Incoming {
        match self.frames.next().await {
            None => Incoming::EndOfInput,
            Some(Ok(b)) => Incoming::Line(b.to_vec()),
            Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => Incoming::TooLong,
            Some(Err(AnyDelimiterCodecError::Io(_))) => Incoming::Closed,
        }
    }
}

struct LineWriter<W>(W);

impl<W: AsyncWrite + Unpin + Send> WriteLines for LineWriter<W> {
    async fn send_line(&mut self, line: &str) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.0.write_all(&buf).await
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;
struct WsReader(futures_util::stream::SplitStream<WsStream>);
struct WsWriter(futures_util::stream::SplitSink<WsStream, tokio_tungstenite::tungstenite::Message>);

impl ReadLines for WsReader {
    async fn next_line(&mut self) -> Incoming {
        use tokio_tungstenite::tungstenite::{error::CapacityError, Error, Message};
        loop {
            return match self.0.next().await {
                None | Some(Ok(Message::Close(_))) => Incoming::Closed,
                Some(Ok(Message::Text(t))) => Incoming::Line(t.as_bytes().to_vec()),
                Some(Ok(Message::Binary(_))) => Incoming::Unusable(
                    "binary WebSocket messages are not part of the protocol; send text frames",
                ),
                Some(Ok(_)) => continue, // ping/pong: tungstenite answers pings itself
                Some(Err(Error::Capacity(CapacityError::MessageTooLong { .. }))) => {
                    Incoming::TooLong
                }
                Some(Err(_)) => Incoming::Closed,
            };
        }
    }
}

impl WriteLines for WsWriter {
    async fn send_line(&mut self, line: &str) -> std::io::Result<()> {
        self.0
            .send(tokio_tungstenite::tungstenite::Message::text(line))
            .await
            .map_err(std::io::Error::other)
    }
}

async fn write<W: WriteLines>(w: &mut W, line: &str) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, w.send_line(line)).await,
        Ok(Ok(()))
    )
}

/// Wait for the client's `auth`. `Ok` with the reply to send, or `Err`
/// with the refusal to send before closing.
async fn authenticate<R: ReadLines>(r: &mut R, token: Option<&HisToken>) -> Result<Out, Out> {
    let first = match tokio::time::timeout(AUTH_TIMEOUT, r.next_line()).await {
        Err(_) => {
            return Err(Out::error(
                None,
                format!("no auth within {} s; closing", AUTH_TIMEOUT.as_secs()),
            ))
        }
        Ok(Incoming::Line(bytes)) => bytes,
        Ok(_) => return Err(Out::error(None, "expected an auth message")),
    };
    match protocol::parse_in(&first) {
        Ok(In::Auth {
            reference,
            token: presented,
        }) => {
            if token.is_some_and(|t| t.matches(&presented)) {
                Ok(Out::Reply {
                    reference,
                    ok: true,
                })
            } else if token.is_none() {
                Err(Out::error(reference, "this agent has no HIS token configured; TCP and WebSocket clients cannot be admitted"))
            } else {
                Err(Out::error(reference, "wrong HIS token; closing"))
            }
        }
        Ok(_) | Err(_) => Err(Out::error(
            None,
            r#"authenticate first: send {"type":"auth","token":"<the HIS token>"}; closing"#,
        )),
    }
}

async fn session<R: ReadLines, W: WriteLines, H: Handler>(
    mut r: R,
    mut w: W,
    peer: String,
    admission: Admission,
    ctx: Ctx<H>,
) {
    let shared = ctx.shared();
    let hello = if admission == Admission::PeerChecked {
        &shared.hello
    } else {
        &shared.hello_auth
    };
    // A client whose peer was checked gets events from its hello on: it
    // joins the hub before the hello is written, so a scan published just
    // after the client read its hello cannot pass it by. (Regression: one
    // did, and as the client had not spoken, the held copy was not its.)
    let early = (admission == Admission::PeerChecked).then(|| ctx.hub.join(peer.clone()));
    if !write(&mut w, hello).await {
        if let Some(m) = early {
            ctx.hub.leave(m.id);
        }
        return;
    }
    let mut identified = false;
    if admission == Admission::NeedsToken {
        match authenticate(&mut r, shared.token.as_ref()).await {
            Ok(reply) => {
                if !write(&mut w, &reply.to_line()).await {
                    return;
                }
                identified = true;
            }
            Err(refusal) => {
                tracing::warn!(peer = %peer, "HIS client refused: no valid auth");
                let _ = write(&mut w, &refusal.to_line()).await;
                return;
            }
        }
    } else if admission == Admission::TokenGiven {
        identified = true;
    }
    let mut m = match early {
        Some(m) => m,
        None => ctx.hub.join(peer.clone()),
    };
    let mut why = "client closed the connection";
    let mut reading = true;
    // While the client only reads: how often to look whether it has gone.
    let mut gone_check = tokio::time::interval(Duration::from_secs(1));
    'session: {
        if identified && !deliver_held(&mut w, &ctx.hub, m.id).await {
            why = "write failed or timed out";
            break 'session;
        }
        loop {
            tokio::select! {
                _ = ctx.cancel.cancelled() => {
                    // Events already queued (the last scans drained at
                    // shutdown) are written before closing.
                    while let Ok(l) = m.rx.try_recv() {
                        if !write(&mut w, &l).await { break }
                    }
                    why = "agent shutting down";
                    break
                }
                _ = m.evicted.cancelled() => { why = "not reading (queue full): evicted"; break }
                _ = gone_check.tick(), if !reading => if r.peer_gone() { break },
                line = m.rx.recv() => match line {
                    Some(l) => if !write(&mut w, &l).await { why = "write failed or timed out"; break },
                    None => { why = "evicted"; break }
                },
                inc = r.next_line(), if reading => match inc {
                    Incoming::Closed => break,
                    Incoming::EndOfInput => {
                        // Over TCP a half close cannot be told from a close
                        // until a write fails: a closed client would hold
                        // its slot as a ghost. Only Unix sockets keep
                        // half-closed clients.
                        if !r.can_tell_half_close() || r.peer_gone() {
                            break;
                        }
                        // Shut its sending side only (`socat -u`, `nc -q`):
                        // it still reads, so it still gets cards.
                        tracing::info!(peer = %peer, "HIS client closed its input; it keeps receiving events");
                        reading = false;
                    }
                    Incoming::TooLong => {
                        let _ = write(&mut w, &Out::error(None, format!("line longer than {MAX_LINE} bytes; closing the connection")).to_line()).await;
                        why = "line too long";
                        break;
                    }
                    Incoming::Unusable(msg) => {
                        if !write(&mut w, &Out::error(None, msg).to_line()).await { break }
                    }
                    Incoming::Line(bytes) => {
                        if bytes.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        let out = match protocol::parse_in(&bytes) {
                            Ok(In::Auth { reference, token }) => {
                                // Harmless on an admitted connection; a wrong
                                // token is still said to be wrong.
                                let current = ctx.shared();
                                if current.token.as_ref().is_some_and(|t| t.matches(&token)) || admission == Admission::PeerChecked && current.token.is_none() {
                                    Out::Reply { reference, ok: true }
                                } else {
                                    Out::error(reference, "wrong HIS token")
                                }
                            }
                            Ok(msg) => ctx.handler.handle(msg, &peer).await,
                            Err(refusal) => {
                                tracing::debug!(peer = %peer, error = %refusal.message, "HIS message refused");
                                refusal.into_out()
                            }
                        };
                        if !write(&mut w, &out.to_line()).await { why = "write failed or timed out"; break }
                        if !identified {
                            // It has spoken: it is HIS, and the held events
                            // are its.
                            identified = true;
                            if !deliver_held(&mut w, &ctx.hub, m.id).await {
                                why = "write failed or timed out";
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
    ctx.hub.leave(m.id);
    tracing::info!(peer = %peer, reason = why, "HIS client disconnected");
}

/// Write the events held for HIS to a client that has identified itself;
/// whatever cannot be written is held again. `false` if a write failed.
async fn deliver_held<W: WriteLines>(w: &mut W, hub: &Hub, id: u64) -> bool {
    let mut held = hub.identify(id).into_iter();
    while let Some((line, until)) = held.next() {
        if !write(w, &line).await {
            let mut rest = vec![(line, until)];
            rest.extend(held);
            hub.rehold(rest);
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_rules() {
        let own = 999;
        assert!(peer_allowed(0, 0, Some(&[]), own, None), "root");
        assert!(peer_allowed(own, 5, Some(&[]), own, None), "service user");
        assert!(
            !peer_allowed(1000, 1000, Some(&[]), own, None),
            "stranger, no group configured"
        );
        assert!(
            !peer_allowed(1000, 1000, None, own, None),
            "stranger, groups unknown, no group configured"
        );
        assert!(
            peer_allowed(1000, 42, Some(&[]), own, Some(42)),
            "primary group"
        );
        assert!(
            peer_allowed(1000, 1000, Some(&[7, 42]), own, Some(42)),
            "supplementary group"
        );
        assert!(
            !peer_allowed(1000, 1000, Some(&[7]), own, Some(42)),
            "not in the group"
        );
        assert!(
            !peer_allowed(1000, 1000, None, own, Some(42)),
            "groups unknown: refused (fail closed)"
        );
        assert!(
            peer_allowed(1000, 42, None, own, Some(42)),
            "groups unknown, but the primary group admits"
        );
    }

    /// With `/proc` hidden, a user's groups still come from the user
    /// database: root's include gid 0.
    #[test]
    fn groups_from_the_user_database() {
        let g = user_groups(0, 0).expect("root is in the user database");
        assert!(g.contains(&0), "{g:?}");
        assert!(peer_groups(None, 0, 0).is_some());
        assert!(user_groups(4_000_000_000, 4_000_000_000).is_none());
    }

    #[test]
    fn tokens_match_only_themselves() {
        let t = HisToken::new("3f9a");
        assert!(t.matches("3f9a"));
        assert!(!t.matches("3f9b") && !t.matches("") && !t.matches("3f9a "));
        assert_eq!(format!("{t:?}"), "<HIS token>");
    }

    #[test]
    fn reads_own_supplementary_groups() {
        let me = std::process::id() as i32;
        // Present (possibly empty) for a live process; absent pid gives none.
        assert!(supplementary_groups(Some(me)).is_some());
        assert!(supplementary_groups(None).is_none());
    }
}
