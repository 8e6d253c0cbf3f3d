//! The HIS listeners and the per-connection session (DESIGN §4, §6).
//!
//! * Unix socket: mode 0660, group `socket_group`; a socket file left by a
//!   killed agent is replaced after checking that nothing answers on it (two
//!   agents on one socket is refused). Each peer's uid/gid/pid is read with
//!   `SO_PEERCRED` and logged; a peer that is not root, not the service's own
//!   user and not in the group is refused (defence in depth behind the file
//!   mode).
//! * Loopback TCP, for HIS that cannot open Unix sockets.
//! * Loopback WebSocket for browser-based HIS: the handshake is refused with
//!   HTTP 403 unless its `Origin` is in `allowed_origins`, since any web page
//!   in the browser can reach loopback. A client that sends no Origin is not
//!   a browser and is served like a TCP client.
//!
//! Every session: `hello` first, then held and broadcast events from the hub,
//! replies to `use`/`bind`/`ping`. Malformed lines get an `error` and the
//! session goes on; a line over 64 KiB gets an `error` and the session ends;
//! a peer that stops reading for [`WRITE_TIMEOUT`] is dropped.

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

/// What the sessions need answered: the pipeline implements it.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, msg: In, peer: &str) -> impl Future<Output = Out> + Send;
}

#[derive(Debug, Clone, Default)]
pub struct HisSettings {
    pub unix: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub tcp: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub allowed_origins: Vec<String>,
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

/// Bound listeners, before serving: binding first lets the daemon report
/// READY only once HIS can connect, and tests learn the ports.
pub struct Listeners {
    unix: Option<(UnixListener, PathBuf)>,
    group_gid: Option<u32>,
    tcp: Option<TcpListener>,
    ws: Option<TcpListener>,
    pub unix_path: Option<PathBuf>,
    pub tcp_addr: Option<SocketAddr>,
    pub ws_addr: Option<SocketAddr>,
    allowed_origins: Arc<Vec<String>>,
}

pub async fn bind(s: &HisSettings) -> Result<Listeners, HisError> {
    let group_gid = match &s.socket_group {
        None => None,
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| HisError::NoSuchGroup(g.clone()))?
                .gid
                .as_raw(),
        ),
    };
    let unix = match &s.unix {
        None => None,
        Some(p) => Some((bind_unix(p, group_gid).await?, p.clone())),
    };
    let tcp_bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| HisError::Tcp { addr, source })
    };
    let tcp = match s.tcp {
        Some(a) => Some(tcp_bind(a).await?),
        None => None,
    };
    let ws = match s.ws {
        Some(a) => Some(tcp_bind(a).await?),
        None => None,
    };
    Ok(Listeners {
        unix_path: unix.as_ref().map(|(_, p)| p.clone()),
        tcp_addr: tcp.as_ref().and_then(|l| l.local_addr().ok()),
        ws_addr: ws.as_ref().and_then(|l| l.local_addr().ok()),
        unix,
        group_gid,
        tcp,
        ws,
        allowed_origins: Arc::new(s.allowed_origins.clone()),
    })
}

async fn bind_unix(path: &Path, gid: Option<u32>) -> Result<UnixListener, HisError> {
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
/// `supplementary` is `None` when the peer's groups cannot be read (under
/// `ProtectProc=invisible` other users' `/proc` entries are hidden). The
/// kernel has then already checked the socket file's 0660 group mode on
/// connect, which is the primary control; refusing would lock out every HIS
/// user whose membership is supplementary.
pub fn peer_allowed(
    uid: u32,
    gid: u32,
    supplementary: Option<&[u32]>,
    own_uid: u32,
    group: Option<u32>,
) -> bool {
    uid == 0
        || uid == own_uid
        || group.is_some_and(|g| g == gid || supplementary.is_none_or(|s| s.contains(&g)))
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

impl Listeners {
    /// Serve every listener until `cancel`, on tasks tracked by `tracker`.
    pub fn serve<H: Handler>(
        self,
        hub: Hub,
        handler: Arc<H>,
        hello: Line,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let ctx = Ctx {
            hub,
            handler,
            hello,
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        };
        if let Some((l, path)) = self.unix {
            let (ctx, gid) = (ctx.clone(), self.group_gid);
            tracker.spawn(async move {
                accept_unix(l, gid, ctx).await;
                let _ = std::fs::remove_file(&path);
            });
        }
        if let Some(l) = self.tcp {
            let ctx = ctx.clone();
            tracker.spawn(async move { accept_tcp(l, ctx).await });
        }
        if let Some(l) = self.ws {
            let (ctx, origins) = (ctx.clone(), self.allowed_origins.clone());
            tracker.spawn(async move { accept_ws(l, origins, ctx).await });
        }
    }
}

struct Ctx<H> {
    hub: Hub,
    handler: Arc<H>,
    hello: Line,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl<H> Clone for Ctx<H> {
    fn clone(&self) -> Self {
        Ctx {
            hub: self.hub.clone(),
            handler: self.handler.clone(),
            hello: self.hello.clone(),
            cancel: self.cancel.clone(),
            tracker: self.tracker.clone(),
        }
    }
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

async fn accept_unix<H: Handler>(l: UnixListener, gid: Option<u32>, ctx: Ctx<H>) {
    let own = nix::unistd::geteuid().as_raw();
    loop {
        let Some((s, _)) = next_conn(&ctx.cancel, "unix", || l.accept()).await else {
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
        if !peer_allowed(uid, pgid, supplementary_groups(pid).as_deref(), own, gid) {
            tracing::warn!(uid, gid = pgid, pid = ?pid, "HIS peer refused: not root, not the service user, not in the socket group");
            let mut s = s;
            let line = Out::error(None, format!("permission denied: uid {uid} is not root, the agent's user, or in the HIS socket group")).to_line();
            let _ =
                tokio::time::timeout(WRITE_TIMEOUT, s.write_all(format!("{line}\n").as_bytes()))
                    .await;
            continue;
        }
        tracing::info!(uid, gid = pgid, pid = ?pid, "HIS client connected (unix)");
        let ctx2 = ctx.clone();
        let (r, w) = s.into_split();
        ctx.tracker
            .spawn(async move { session(LineReader::new(r), LineWriter(w), peer, ctx2).await });
    }
}

async fn accept_tcp<H: Handler>(l: TcpListener, ctx: Ctx<H>) {
    loop {
        let Some((s, addr)) = next_conn(&ctx.cancel, "tcp", || l.accept()).await else {
            return;
        };
        let _ = s.set_nodelay(true);
        tracing::info!(peer = %addr, "HIS client connected (tcp)");
        let ctx2 = ctx.clone();
        let (r, w) = s.into_split();
        ctx.tracker.spawn(async move {
            session(
                LineReader::new(r),
                LineWriter(w),
                format!("tcp {addr}"),
                ctx2,
            )
            .await
        });
    }
}

// The handshake callback's signature is tungstenite's, large error and all.
#[allow(clippy::result_large_err)]
async fn accept_ws<H: Handler>(l: TcpListener, origins: Arc<Vec<String>>, ctx: Ctx<H>) {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    loop {
        let Some((s, addr)) = next_conn(&ctx.cancel, "websocket", || l.accept()).await else {
            return;
        };
        let (ctx2, origins) = (ctx.clone(), origins.clone());
        ctx.tracker.spawn(async move {
            let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                match req.headers().get("origin").map(|o| o.to_str().unwrap_or("")) {
                    Some(o) if !origins.iter().any(|a| a == o) => {
                        tracing::warn!(peer = %addr, origin = %o, "WebSocket from an origin not in allowed_origins refused");
                        let mut r = ErrorResponse::new(Some(format!("origin {o} is not allowed to connect to ehc-agent\n")));
                        *r.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::FORBIDDEN;
                        Err(r)
                    }
                    _ => Ok(resp),
                }
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
            tracing::info!(peer = %addr, "HIS client connected (websocket)");
            let (w, r) = ws.split();
            session(WsReader(r), WsWriter(w), format!("ws {addr}"), ctx2).await
        });
    }
}

/// What a transport's reader yields.
enum Incoming {
    Line(Vec<u8>),
    /// A line or message over [`MAX_LINE`].
    TooLong,
    /// A frame the protocol has no use for (binary WebSocket message).
    Unusable(&'static str),
    Closed,
}

trait ReadLines: Send {
    fn next_line(&mut self) -> impl Future<Output = Incoming> + Send;
}

trait WriteLines: Send {
    fn send_line(&mut self, line: &str) -> impl Future<Output = std::io::Result<()>> + Send;
}

struct LineReader<R>(FramedRead<R, AnyDelimiterCodec>);

impl<R: AsyncRead + Unpin + Send> LineReader<R> {
    fn new(r: R) -> Self {
        LineReader(FramedRead::new(
            r,
            AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_LINE),
        ))
    }
}

impl<R: AsyncRead + Unpin + Send> ReadLines for LineReader<R> {
    async fn next_line(&mut self) -> Incoming {
        match self.0.next().await {
            None => Incoming::Closed,
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

async fn session<R: ReadLines, W: WriteLines, H: Handler>(
    mut r: R,
    mut w: W,
    peer: String,
    ctx: Ctx<H>,
) {
    let mut m = ctx.hub.join(peer.clone());
    let mut why = "client closed the connection";
    if write(&mut w, &ctx.hello).await {
        loop {
            tokio::select! {
                _ = ctx.cancel.cancelled() => { why = "agent shutting down"; break }
                line = m.rx.recv() => match line {
                    Some(l) => if !write(&mut w, &l).await { why = "write failed or timed out"; break },
                    None => { why = "not reading (queue full)"; break }
                },
                inc = r.next_line() => match inc {
                    Incoming::Closed => break,
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
                            Ok(msg) => ctx.handler.handle(msg, &peer).await,
                            Err(refusal) => {
                                tracing::debug!(peer = %peer, error = %refusal.message, "HIS message refused");
                                refusal.into_out()
                            }
                        };
                        if !write(&mut w, &out.to_line()).await { why = "write failed or timed out"; break }
                    }
                }
            }
        }
    }
    ctx.hub.leave(m.id);
    tracing::info!(peer = %peer, reason = why, "HIS client disconnected");
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
            peer_allowed(1000, 1000, None, own, Some(42)),
            "groups hidden: the file mode decided"
        );
    }

    #[test]
    fn reads_own_supplementary_groups() {
        let me = std::process::id() as i32;
        // Present (possibly empty) for a live process; absent pid gives none.
        assert!(supplementary_groups(Some(me)).is_some());
        assert!(supplementary_groups(None).is_none());
    }
}
