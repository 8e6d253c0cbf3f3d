//! The control socket: how `ehc-agent status`, `scan` and `outbox …` talk to
//! the running daemon.
//!
//! A Unix socket beside the HIS socket (`control.sock`), mode 0600, for root
//! and the service's own user only (checked with `SO_PEERCRED` as well): it
//! can inject scans and operate the outbox, which HIS clients must not.
//! One JSON object per line each way: a request `{"cmd": ...}`, an answer
//! `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::app::Core;
use crate::agent::outbox::report;
use crate::clock;

/// Longest request line.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "camelCase")]
pub enum Request {
    Status,
    Scan {
        text: String,
        #[serde(default)]
        scanner: Option<String>,
    },
    OutboxList,
    OutboxRetry {
        #[serde(default)]
        id: Option<i64>,
        #[serde(default)]
        held: bool,
    },
    OutboxFlush,
    OutboxPurge {
        #[serde(default)]
        held: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the agent is not running (nothing answers on {0})")]
    NotRunning(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another agent is already running (it answers on {0})")]
    AlreadyServed(PathBuf),
    #[error("the agent refused: {0}")]
    Refused(String),
    #[error("the agent's answer was not understood: {0}")]
    BadAnswer(String),
}

/// The control socket for a HIS socket path: same directory.
pub fn path_for(his_unix: &Path) -> PathBuf {
    his_unix
        .parent()
        .unwrap_or(Path::new("/run/ehc-agent"))
        .join("control.sock")
}

pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::AlreadyServed(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

pub fn serve(
    l: UnixListener,
    path: PathBuf,
    core: Arc<Core>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    let t2 = tracker.clone();
    tracker.spawn(async move {
        let own = nix::unistd::geteuid().as_raw();
        loop {
            let s = tokio::select! {
                _ = cancel.cancelled() => break,
                r = l.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let uid = s.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
            if uid != 0 && uid != own {
                tracing::warn!(
                    uid,
                    "control socket peer refused: only root and the service user"
                );
                continue;
            }
            let core = core.clone();
            t2.spawn(async move {
                if let Err(e) = session(s, &core).await {
                    tracing::debug!(error = %e, "control session ended");
                }
            });
        }
        let _ = std::fs::remove_file(&path);
    });
}

async fn session(s: UnixStream, core: &Core) -> std::io::Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r).take(MAX_REQUEST as u64);
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Ok(());
    }
    let answer = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handle(req, core).await,
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let mut out = answer.to_string();
    out.push('\n');
    w.write_all(out.as_bytes()).await
}

async fn handle(req: Request, core: &Core) -> Value {
    let fail = |e: String| json!({"ok": false, "error": e});
    match req {
        Request::Status => json!({"ok": true, "status": core.status().await}),
        Request::Scan { text, scanner } => {
            let scan = crate::agent::scanner::Scan {
                scanner: scanner.unwrap_or_else(|| "control".into()),
                text,
                at: clock::now_unix(),
            };
            match core.pipeline.handle_scan(scan).await {
                Some(ev) => json!({"ok": true, "event": ev}),
                None => fail("the scan was discarded (empty, or longer than 4096 bytes)".into()),
            }
        }
        Request::OutboxList => {
            let now = clock::now_unix();
            match core
                .outbox
                .with_store(move |s| report::listing(s, now))
                .await
            {
                Ok(l) => json!({"ok": true, "listing": l}),
                Err(e) => fail(e.to_string()),
            }
        }
        Request::OutboxRetry { id, held } => {
            if id.is_none() && !held {
                return fail("say which rows: an id, or held".into());
            }
            let now = clock::now_unix();
            match core.outbox.with_store(move |s| s.retry_held(id, now)).await {
                Ok(n) => {
                    core.outbox.wake();
                    json!({"ok": true, "requeued": n})
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Request::OutboxFlush => {
            core.outbox.resume().await;
            let now = clock::now_unix();
            let r = core.outbox.with_store(move |s| {
                s.make_all_due(now)?;
                s.counts()
            });
            match r.await {
                Ok(c) => {
                    core.outbox.wake();
                    json!({"ok": true, "pending": c.pending + c.waiting})
                }
                Err(e) => fail(e.to_string()),
            }
        }
        Request::OutboxPurge { held } => match core
            .outbox
            .with_store(move |s| s.purge(i64::MAX, held))
            .await
        {
            Ok(n) => json!({"ok": true, "deleted": n}),
            Err(e) => fail(e.to_string()),
        },
    }
}

/// Send one request to a running daemon.
pub async fn request(path: &Path, req: &Request) -> Result<Value, ControlError> {
    let s = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning(path.to_owned()));
        }
        Err(source) => {
            return Err(ControlError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let (r, mut w) = s.into_split();
    let mut line = serde_json::to_string(req).unwrap_or_default();
    line.push('\n');
    w.write_all(line.as_bytes()).await.map_err(io)?;
    let mut answer = String::new();
    let n = tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(r).read_line(&mut answer),
    )
    .await
    .map_err(|_| ControlError::BadAnswer("no answer within 30 s".into()))?
    .map_err(io)?;
    if n == 0 {
        // Accepted and closed without a word: the peer check refused us.
        return Err(ControlError::Refused(
            "closed the connection (only root and the service user may use the control socket)"
                .into(),
        ));
    }
    let v: Value =
        serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(ControlError::Refused(
            v["error"].as_str().unwrap_or("unknown error").to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for (text, req) in [
            (r#"{"cmd":"status"}"#, Request::Status),
            (
                r#"{"cmd":"scan","text":"X"}"#,
                Request::Scan {
                    text: "X".into(),
                    scanner: None,
                },
            ),
            (
                r#"{"cmd":"outboxRetry","held":true}"#,
                Request::OutboxRetry {
                    id: None,
                    held: true,
                },
            ),
            (
                r#"{"cmd":"outboxPurge"}"#,
                Request::OutboxPurge { held: false },
            ),
        ] {
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), req);
        }
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"rm -rf"}"#).is_err());
        assert_eq!(
            path_for(Path::new("/run/ehc-agent/his.sock")),
            Path::new("/run/ehc-agent/control.sock")
        );
    }
}
