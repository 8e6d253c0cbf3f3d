//! The local HTTP API for HIS clients that cannot hold a socket open
//! (PowerBuilder, Delphi, VB, older .NET: they call a local service and
//! parse the answer, as they do with ID-card readers), and for browser pages
//! that need a push channel surviving reloads. `[his] listen_http`,
//! loopback only.
//!
//! * `GET /v1/events?after=SEQ&wait=30`: long poll. The events after number
//!   `SEQ` from the hub's journal ([`super::hub::Hub::events_after`]), in
//!   order, at once if there are any, else when the next arrives, else an
//!   empty answer after `wait` seconds (at most 60). A client that was away
//!   gets what it missed within `hold_s`.
//! * `GET /v1/events/stream`: Server-Sent Events, each with its number as
//!   `id`, resumable with `Last-Event-ID` (what `EventSource` sends when it
//!   reconnects) or `?after=SEQ`.
//! * `POST /v1/use`, `POST /v1/bind`: the socket protocol's `use` and `bind`
//!   objects (`type` may be left out); the answer is its `reply`/`error`.
//! * `GET /v1/health`: that the agent is up, its version, the last number.
//!
//! The same JSON objects as the socket protocol. Authentication is the HIS
//! token of the TCP listener: `Authorization: Bearer TOKEN` (or
//! `X-EHC-Token`), or `?token=` where a browser cannot set headers
//! (`EventSource`). A request carrying an `Origin` (a browser) must come
//! from exactly one of `allowed_origins`; CORS preflights are answered for
//! those origins only, including Chrome's Local Network Access
//! (`Access-Control-Allow-Private-Network`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

use super::hub::Hub;
use super::protocol::{self, Out};
use super::server::{Handler, HisToken};

/// Longest long poll.
pub const MAX_WAIT_S: u64 = 60;
/// Largest request body (a `use` or `bind` is a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;

/// What every request reads: the token and the origins (a reload may
/// change them).
#[derive(Clone)]
pub struct Access {
    pub token: Option<HisToken>,
    pub origins: Arc<Vec<String>>,
}

/// Reads the current [`Access`] (a reload may have changed it).
pub type AccessFn = Arc<dyn Fn() -> Access + Send + Sync>;

pub struct Ctx<H> {
    pub hub: Hub,
    pub handler: Arc<H>,
    pub access: AccessFn,
    pub waiting: Arc<tokio::sync::Semaphore>,
    pub version: &'static str,
    /// Cancelled when the listener closes: waits and streams end.
    pub end: tokio_util::sync::CancellationToken,
}

impl<H> Clone for Ctx<H> {
    fn clone(&self) -> Self {
        Ctx {
            hub: self.hub.clone(),
            handler: self.handler.clone(),
            access: self.access.clone(),
            waiting: self.waiting.clone(),
            version: self.version,
            end: self.end.clone(),
        }
    }
}

impl<H> Ctx<H> {
    fn access(&self) -> Access {
        (self.access)()
    }
}

pub fn router<H: Handler>(ctx: Ctx<H>) -> Router {
    Router::new()
        .route("/v1/health", get(health::<H>))
        .route("/v1/events", get(poll::<H>))
        .route("/v1/events/stream", get(stream::<H>))
        .route("/v1/use", post(use_or_bind::<H>))
        .route("/v1/bind", post(use_or_bind::<H>))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such path: see docs/his-protocol.md",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            guard::<H>,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(ctx)
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"type": "error", "message": message})),
    )
        .into_response()
}

fn presented_token(headers: &HeaderMap, uri: &axum::http::Uri) -> Option<String> {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    h(header::AUTHORIZATION.as_str())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h("x-ehc-token"))
        .map(str::to_owned)
        .or_else(|| query_token(uri))
}

/// `?token=` (decoded), for clients that cannot set headers.
pub(crate) fn query_token(uri: &axum::http::Uri) -> Option<String> {
    Query::<std::collections::HashMap<String, String>>::try_from_uri(uri)
        .ok()
        .and_then(|Query(mut q)| q.remove("token"))
}

/// CORS headers for an allowed origin.
fn cors(resp: &mut Response, origin: &str) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
}

/// The token, and for browsers the exact origin; preflights answered for
/// allowed origins only.
async fn guard<H: Handler>(State(ctx): State<Ctx<H>>, req: Request, next: Next) -> Response {
    let a = ctx.access();
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(o) = &origin {
        if !a.origins.iter().any(|x| x == o) {
            tracing::warn!(origin = %o, path = %req.uri().path(), "HIS HTTP request from an origin not in allowed_origins; refused");
            return error(
                StatusCode::FORBIDDEN,
                "this page's origin is not in [his] allowed_origins",
            );
        }
    }
    if req.method() == Method::OPTIONS {
        // Only reached with an allowed origin (or none: not a browser).
        let mut r = StatusCode::NO_CONTENT.into_response();
        if let Some(o) = &origin {
            cors(&mut r, o);
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type, last-event-id, x-ehc-token"),
            );
            // Chrome's Private/Local Network Access preflight.
            h.insert(
                "access-control-allow-private-network",
                HeaderValue::from_static("true"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
        return r;
    }
    let ok = match (&a.token, presented_token(req.headers(), req.uri())) {
        (Some(t), Some(p)) => t.matches(&p),
        _ => false,
    };
    if !ok {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "authenticate with the HIS token: Authorization: Bearer <token> (or ?token= for EventSource)",
        );
        if let Some(o) = &origin {
            cors(&mut r, o);
        }
        return r;
    }
    let mut r = next.run(req).await;
    if let Some(o) = &origin {
        cors(&mut r, o);
    }
    r
}

async fn health<H: Handler>(State(ctx): State<Ctx<H>>) -> Response {
    let last = *ctx.hub.watch_seq().borrow();
    axum::Json(json!({
        "type": "health",
        "ok": true,
        "agent": ctx.version,
        "protocol": protocol::PROTOCOL_VERSION,
        "lastSeq": last,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct PollQuery {
    after: Option<u64>,
    wait: Option<u64>,
}

/// `{"events":[{"seq":N,"event":LINE},...],"last":N}`, each event the
/// socket protocol's line as it is (same fields, same order).
fn events_response(v: &[(u64, super::hub::Line)], last: u64) -> Response {
    let mut out = String::from("{\"events\":[");
    for (i, (n, l)) in v.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("{{\"seq\":{n},\"event\":{l}}}"));
    }
    out.push_str(&format!("],\"last\":{last}}}"));
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        out,
    )
        .into_response()
}

async fn poll<H: Handler>(
    State(ctx): State<Ctx<H>>,
    q: Result<Query<PollQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "after and wait are whole numbers: /v1/events?after=12&wait=30",
        );
    };
    let after = q.after.unwrap_or(0);
    let wait = Duration::from_secs(q.wait.unwrap_or(30).min(MAX_WAIT_S));
    let Ok(_slot) = ctx.waiting.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many HIS clients waiting at once ([his] max_clients)",
        );
    };
    let mut rx = ctx.hub.watch_seq();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (v, last) = ctx.hub.events_after(after);
        if !v.is_empty() || wait.is_zero() {
            ctx.hub.taken(&v.iter().map(|(_, l)| l).collect::<Vec<_>>());
            return events_response(&v, last);
        }
        // Only a number newer than the one just read wakes us.
        rx.borrow_and_update();
        let woke = tokio::select! {
            r = tokio::time::timeout_at(deadline, rx.changed()) => matches!(r, Ok(Ok(()))),
            _ = ctx.end.cancelled() => false,
        };
        if !woke {
            return events_response(&[], last);
        }
    }
}

async fn stream<H: Handler>(
    State(ctx): State<Ctx<H>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or_else(|| q.get("after").and_then(|a| a.parse().ok()));
    let Ok(slot) = ctx.waiting.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many HIS clients waiting at once ([his] max_clients)",
        );
    };
    let hub = ctx.hub.clone();
    tracing::debug!(after = ?after, "HIS HTTP event stream opened");
    // Without a number: from now on (a page opened fresh does not replay
    // cards already shown); with one: what came after it.
    let start = after.unwrap_or_else(|| *hub.watch_seq().borrow());
    let s = futures_util::StreamExt::take_until(
        async_stream(hub, start, slot),
        ctx.end.clone().cancelled_owned(),
    );
    Sse::new(s)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn async_stream(
    hub: Hub,
    start: u64,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    let rx = hub.watch_seq();
    futures_util::stream::unfold(
        (
            hub,
            rx,
            start,
            std::collections::VecDeque::<(u64, String)>::new(),
            slot,
        ),
        |(hub, mut rx, mut seen, mut queue, slot)| async move {
            loop {
                if let Some((n, line)) = queue.pop_front() {
                    let ev = Event::default().id(n.to_string()).data(line);
                    return Some((Ok(ev), (hub, rx, seen, queue, slot)));
                }
                rx.borrow_and_update();
                let (v, last) = hub.events_after(seen);
                if !v.is_empty() {
                    hub.taken(&v.iter().map(|(_, l)| l).collect::<Vec<_>>());
                    seen = v.last().map(|(n, _)| *n).unwrap_or(last);
                    queue.extend(v.into_iter().map(|(n, l)| (n, l.to_string())));
                    continue;
                }
                if last < seen {
                    // The agent's numbers started again (not possible within
                    // one process; defensive).
                    seen = last;
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        },
    )
}

async fn use_or_bind<H: Handler>(State(ctx): State<Ctx<H>>, req: Request) -> Response {
    let kind = if req.uri().path().ends_with("/use") {
        "use"
    } else {
        "bind"
    };
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "the body is over 64 KiB"),
    };
    let msg = match with_type(&body, kind) {
        Ok(m) => m,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let out = match protocol::parse_in(&msg) {
        Ok(m) => ctx.handler.handle(m, "http").await,
        Err(r) => r.into_out(),
    };
    let status = match out {
        Out::Error { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        out.to_line(),
    )
        .into_response()
}

/// The body as a socket message: an object, `type` set to `kind` when
/// absent; another `type` is refused.
fn with_type(body: &Bytes, kind: &str) -> Result<Vec<u8>, String> {
    let mut v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let Some(o) = v.as_object_mut() else {
        return Err("the body must be a JSON object".into());
    };
    match o.get("type").and_then(Value::as_str) {
        None => {
            o.insert("type".into(), kind.into());
        }
        Some(t) if t == kind => {}
        Some(t) => return Err(format!("`type` is `{t}` on /v1/{kind}")),
    }
    Ok(serde_json::to_vec(&v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_become_socket_messages() {
        let b = Bytes::from_static(br#"{"scanId":"S1","scene":"010106"}"#);
        let m: Value = serde_json::from_slice(&with_type(&b, "use").unwrap()).unwrap();
        assert_eq!(m["type"], "use");
        assert!(with_type(&Bytes::from_static(br#"{"type":"bind"}"#), "use")
            .unwrap_err()
            .contains("`bind`"));
        assert!(with_type(&Bytes::from_static(b"[1]"), "use")
            .unwrap_err()
            .contains("object"));
        assert!(with_type(&Bytes::from_static(b"{nope"), "use")
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn tokens_from_headers_or_the_query() {
        let mut h = HeaderMap::new();
        let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
        assert_eq!(
            presented_token(&h, &uri("/v1/events?after=3&token=ab%2Bc")),
            Some("ab+c".into())
        );
        h.insert("x-ehc-token", HeaderValue::from_static("x1"));
        assert_eq!(presented_token(&h, &uri("/v1/health")), Some("x1".into()));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer b2"));
        assert_eq!(
            presented_token(&h, &uri("/v1/health?token=q")),
            Some("b2".into())
        );
    }
}
