//! The gateway's HTTP side: the platform's paths, answered as the platform
//! would towards the terminals ([`crate::platform::serve`]), and forwarded
//! upstream with the hospital's one account ([`Client::forward`]).
//!
//! For each request, in the platform's order: envelope and timestamp
//! (20001, 10003, 10002, 10037, 20002); for getAppToken the terminal's appId
//! (21002 unknown or revoked), the hospital (21005) and the terminal's
//! signature (21006), answered by the gateway itself with a token of its
//! own; for the other APIs the terminal's token (21001, 21004, 21003), the
//! terminal (21002 revoked) and its signature (21006); then the hospital's
//! daily budget for the interface (10034, answered here); then forwarding.
//!
//! Upstream token codes are the gateway's business (refresh and one retry
//! inside [`Client::forward`]); if one still comes back, or the platform
//! cannot be reached, the terminal gets HTTP 503, which its agent treats as
//! "unavailable": scans follow the offline policy, uses stay in its outbox.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::json;

use super::config::GatewayConfig;
use super::store::{GatewayStore, GatewayStoreError, IssuedToken, Terminal};
use crate::clock;
use crate::platform::api::{self, MAX_BODY};
use crate::platform::serve::{self, Answer, Envelope, TokenView};
use crate::platform::{Client, Urgency};

/// What every request handler shares.
pub struct Gateway {
    pub cfg: GatewayConfig,
    pub store: Arc<GatewayStore>,
    pub upstream: Client,
    /// The terminals and tokens this gateway has read from the store: when
    /// a shared store (Redis) cannot be reached, terminals it has seen keep
    /// being served with what it knew.
    pub cache: std::sync::Mutex<Cache>,
}

#[derive(Default)]
pub struct Cache {
    /// When each terminal's `last_seen` was last written: once a minute is
    /// enough for `terminal list`, and a write per request is not free.
    seen_written: std::collections::HashMap<String, i64>,
    terminals: std::collections::HashMap<String, Terminal>,
    by_app_id: std::collections::HashMap<String, String>,
    tokens: std::collections::HashMap<String, IssuedToken>,
    store_down: bool,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, store: Arc<GatewayStore>, upstream: Client) -> Gateway {
        Gateway {
            cfg,
            store,
            upstream,
            cache: std::sync::Mutex::new(Cache::default()),
        }
    }

    /// Record that `terminal` was seen, at most once a minute per terminal.
    fn seen(&self, terminal: &str, now: i64, peer: SocketAddr) {
        {
            let mut c = self.cache();
            match c.seen_written.get(terminal) {
                Some(t) if now - *t < 60 => return,
                _ => {
                    c.seen_written.insert(terminal.to_owned(), now);
                }
            }
        }
        let _ = self.store.seen(terminal, now, &peer.to_string());
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A store read, remembered; on a store failure, what was remembered.
    fn read<T: Clone>(
        &self,
        what: Result<Option<T>, GatewayStoreError>,
        remember: impl FnOnce(&mut Cache, &T),
        recall: impl FnOnce(&Cache) -> Option<T>,
    ) -> Result<Option<T>, GatewayStoreError> {
        match what {
            Ok(v) => {
                let mut c = self.cache();
                if c.store_down {
                    c.store_down = false;
                    tracing::warn!("the gateway store answers again");
                }
                if let Some(v) = &v {
                    remember(&mut c, v);
                }
                Ok(v)
            }
            Err(e) => {
                let mut c = self.cache();
                if !c.store_down {
                    c.store_down = true;
                    tracing::error!(error = %e, "the gateway store cannot be reached; serving the terminals already known from memory");
                }
                match recall(&c) {
                    Some(v) => Ok(Some(v)),
                    None => Err(e),
                }
            }
        }
    }

    fn terminal_by_app_id(&self, app_id: &str) -> Result<Option<Terminal>, GatewayStoreError> {
        self.read(
            self.store.terminal_by_app_id(app_id),
            |c, t| {
                c.by_app_id.insert(t.app_id.clone(), t.name.clone());
                c.terminals.insert(t.name.clone(), t.clone());
            },
            |c| {
                c.by_app_id
                    .get(app_id)
                    .and_then(|n| c.terminals.get(n))
                    .cloned()
            },
        )
    }

    fn terminal(&self, name: &str) -> Result<Option<Terminal>, GatewayStoreError> {
        self.read(
            self.store.terminal(name),
            |c, t| {
                c.terminals.insert(t.name.clone(), t.clone());
            },
            |c| c.terminals.get(name).cloned(),
        )
    }

    fn token(&self, token: &str) -> Result<Option<IssuedToken>, GatewayStoreError> {
        self.read(
            self.store.token(token),
            |c, t| {
                c.tokens.insert(t.token.clone(), t.clone());
            },
            |c| c.tokens.get(token).cloned(),
        )
    }
}

/// The metrics text, with the gauges that mirror the store refreshed.
pub fn metrics_text(gw: &Gateway) -> String {
    let m = crate::metrics::get();
    if let Ok(ts) = gw.store.terminals() {
        m.gateway_terminals
            .set(ts.iter().filter(|t| t.revoked_at.is_none()).count() as i64);
    }
    let day = clock::day_number(clock::now_unix(), clock::BEIJING);
    if let Ok(used) = gw.store.budget_used(day) {
        for (api, n) in used {
            m.gateway_budget_used
                .get_or_create(&vec![("api", api)])
                .set(n as i64);
        }
    }
    if let Some(t) = gw.upstream.token() {
        m.gateway_upstream_generation.set(t.generation as i64);
    }
    m.gateway_store_down.set(i64::from(gw.cache().store_down));
    m.encode()
}

/// The router: one POST route per platform API.
pub fn router(gw: Arc<Gateway>) -> Router {
    let mut r = Router::new();
    for (name, path) in api::API_NAMES {
        let (name, path): (&'static str, &'static str) = (name, path);
        r = r.route(
            path,
            post(
                move |State(gw): State<Arc<Gateway>>,
                      ConnectInfo(super::tls::Peer(peer)): ConnectInfo<super::tls::Peer>,
                      body: Bytes| async move {
                    handle(gw, name, path, peer, body).await
                },
            ),
        );
    }
    r = r.route(
        crate::platform::heartbeat::PATH,
        post(
            |State(gw): State<Arc<Gateway>>,
             ConnectInfo(super::tls::Peer(peer)): ConnectInfo<super::tls::Peer>,
             body: Bytes| async move { heartbeat(gw, peer, body).await },
        ),
    );
    // A terminal's warm-up (`HEAD /`, not an API call): its connection is
    // then open, and the gateway opens its own to the platform if none is
    // warm, so the scan that follows is one round trip on each leg.
    r.route(
        "/",
        axum::routing::head(|State(gw): State<Arc<Gateway>>| async move {
            gw.upstream.preconnect();
            StatusCode::NO_CONTENT
        }),
    )
    .fallback(|| async {
        (
            StatusCode::NOT_FOUND,
            "not a health card open platform path\n",
        )
    })
    .layer(DefaultBodyLimit::max(MAX_BODY))
    .with_state(gw)
}

fn answer(a: Answer) -> Response {
    json_response(StatusCode::OK, a.to_json().to_string().into_bytes())
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The platform is unreachable or kept refusing the hospital's token: the
/// terminal retries later.
fn unavailable(why: &str) -> Response {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": why}).to_string().into_bytes(),
    )
}

/// Scans wait at a window: the short timeout; reports and binds do not.
fn urgency(api_name: &str) -> Urgency {
    if crate::platform::api::is_query(api_name) {
        Urgency::Scan
    } else {
        Urgency::Upload
    }
}

async fn handle(
    gw: Arc<Gateway>,
    api_name: &'static str,
    path: &'static str,
    peer: SocketAddr,
    body: Bytes,
) -> Response {
    let now = clock::now_unix();
    let env = match serve::parse_envelope(&body, MAX_BODY, now, gw.cfg.max_skew_s) {
        Ok(e) => e,
        Err(a) => return answer(a),
    };
    let checked = tokio::task::spawn_blocking({
        let gw = gw.clone();
        let env = env.clone();
        move || admit(&gw, api_name, &env, now, peer)
    })
    .await;
    let m = crate::metrics::get();
    let admitted = match checked {
        Ok(Ok(a)) => a,
        Ok(Err(a)) => {
            m.gateway_request(api_name, &a.code.to_string());
            return answer(a);
        }
        Err(_) => return unavailable("internal error"),
    };
    let terminal = match admitted {
        Admitted::Token(a) => {
            m.gateway_request(api_name, "token_issued");
            return answer(a);
        }
        Admitted::Forward(t) => t,
    };
    match gw
        .upstream
        .forward(api_name, path, &env.req, &env.request_id, urgency(api_name))
        .await
    {
        Ok((_, code)) if matches!(code, 21003 | 21004) => {
            m.gateway_request(api_name, "unavailable");
            tracing::error!(api = api_name, code, terminal = %terminal, "the platform refused the hospital's token even after a refresh");
            unavailable("the platform refused the hospital's token; retry later")
        }
        Ok((bytes, code)) => {
            m.gateway_request(api_name, "forwarded");
            tracing::debug!(api = api_name, code, terminal = %terminal, request_id = %env.request_id, "forwarded");
            json_response(StatusCode::OK, bytes)
        }
        Err(e) => {
            m.gateway_request(api_name, "unavailable");
            tracing::warn!(api = api_name, terminal = %terminal, error = %e, class = %e.class(), "forwarding failed");
            unavailable(&format!(
                "the gateway could not reach the platform: {}",
                e.class()
            ))
        }
    }
}

/// Whether `peer` is in one of the networks of `allow` (CIDR like
/// `10.1.0.0/16`, `fd00::/8`, or a bare address); an empty list allows any.
pub fn allowed(peer: std::net::IpAddr, allow: &[String]) -> bool {
    use std::net::IpAddr;
    let peer = peer.to_canonical();
    allow.is_empty()
        || allow.iter().any(|net| {
            let (addr, len) = net.split_once('/').unwrap_or((net, ""));
            let Ok(addr) = addr.parse::<IpAddr>() else {
                return false;
            };
            match (peer, addr) {
                (IpAddr::V4(p), IpAddr::V4(a)) => {
                    let len: u32 = len.parse().unwrap_or(32).min(32);
                    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                    u32::from(p) & mask == u32::from(a) & mask
                }
                (IpAddr::V6(p), IpAddr::V6(a)) => {
                    let len: u32 = len.parse().unwrap_or(128).min(128);
                    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                    u128::from(p) & mask == u128::from(a) & mask
                }
                _ => false,
            }
        })
}

/// Whether `net` is a CIDR (or address) [`allowed`] understands.
pub fn valid_cidr(net: &str) -> bool {
    let (addr, len) = net.split_once('/').unwrap_or((net, "0"));
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => len.parse::<u32>().is_ok_and(|l| l <= 32),
        Ok(std::net::IpAddr::V6(_)) => len.parse::<u32>().is_ok_and(|l| l <= 128),
        Err(_) => false,
    }
}

/// A terminal calling from outside its allowed networks: 21002, as for an
/// app that may not call.
fn from_allowed(t: &Terminal, peer: SocketAddr, rid: &str) -> Result<(), Answer> {
    if allowed(peer.ip(), &t.allow) {
        Ok(())
    } else {
        tracing::warn!(terminal = %t.name, peer = %peer, "a terminal called from outside its allowed networks; refused");
        Err(Answer::err(21002, rid))
    }
}

/// The enrolled terminal a request with a gateway token comes from: its
/// token, its network, its signature (blocking: the store).
fn caller(gw: &Gateway, env: &Envelope, now: i64, peer: SocketAddr) -> Result<Terminal, Answer> {
    let rid = &env.request_id;
    let internal = |e: super::store::GatewayStoreError| {
        tracing::error!(error = %e, "gateway store failed");
        Answer::err(-1, rid)
    };
    let found = gw.token(&env.app_token).map_err(internal)?;
    let holder = serve::check_token(
        env,
        found.as_ref().map(|t| TokenView {
            holder: &t.terminal,
            hospital_id: &t.hospital_id,
            expires_at: t.expires_at,
            revoked: false,
        }),
        now,
    )?
    .to_owned();
    let terminal = match gw.terminal(&holder).map_err(internal)? {
        Some(t) if t.revoked_at.is_none() => t,
        _ => return Err(Answer::err(21002, rid)),
    };
    from_allowed(&terminal, peer, rid)?;
    env.verify(&terminal.secret)?;
    gw.seen(&terminal.name, now, peer);
    Ok(terminal)
}

/// Heartbeats are accepted from a clock this far off (it is what the fleet
/// page should show, not refuse): a day.
const BEAT_MAX_SKEW_S: u64 = 86_400;

/// A terminal's heartbeat: checked like any call of the terminal's (but
/// never counted in the budget, never forwarded), kept in the store.
async fn heartbeat(gw: Arc<Gateway>, peer: SocketAddr, body: Bytes) -> Response {
    let now = clock::now_unix();
    let env = match serve::parse_envelope(&body, MAX_BODY, now, BEAT_MAX_SKEW_S) {
        Ok(e) => e,
        Err(a) => return answer(a),
    };
    let beat = match crate::platform::heartbeat::Beat::from_req(&env.req) {
        Ok(b) => b,
        Err(why) => return answer(Answer::err_msg(10042, &env.request_id, &why)),
    };
    let stored = tokio::task::spawn_blocking(move || {
        let terminal = caller(&gw, &env, now, peer)?;
        let b = super::store::StoredBeat {
            terminal: terminal.name.clone(),
            received_at: now,
            clock_offset_s: env.timestamp - now,
            peer: peer.ip().to_string(),
            beat,
        };
        if let Err(e) = gw.store.put_beat(&b) {
            tracing::error!(error = %e, terminal = %terminal.name, "a heartbeat could not be stored");
            return Err(Answer::err(-1, &env.request_id));
        }
        Ok(Answer::ok(&env.request_id, json!({})))
    })
    .await;
    match stored {
        Ok(Ok(a)) | Ok(Err(a)) => answer(a),
        Err(_) => unavailable("internal error"),
    }
}

/// What the gateway does with a request that passed its checks.
enum Admitted {
    /// getAppToken: answered by the gateway.
    Token(Answer),
    /// Forward, for this terminal.
    Forward(String),
}

/// The terminal's checks and the budget (blocking: the store).
fn admit(
    gw: &Gateway,
    api_name: &str,
    env: &Envelope,
    now: i64,
    peer: SocketAddr,
) -> Result<Admitted, Answer> {
    let rid = &env.request_id;
    let internal = |e: super::store::GatewayStoreError| {
        tracing::error!(error = %e, "gateway store failed");
        Answer::err(-1, rid)
    };
    if api_name == "getAppToken" {
        let app_id = env.app_id()?;
        let terminal = match gw.terminal_by_app_id(app_id).map_err(internal)? {
            Some(t) if t.revoked_at.is_none() => t,
            Some(t) => {
                tracing::warn!(terminal = %t.name, peer = %peer, "a revoked terminal asked for a token");
                return Err(Answer::err(21002, rid));
            }
            None => return Err(Answer::err(21002, rid)),
        };
        from_allowed(&terminal, peer, rid)?;
        if env.hospital_id != gw.cfg.hospital_id {
            return Err(Answer::err(21005, rid));
        }
        env.verify(&terminal.secret)?;
        let token = serve::new_token(&mut rand::rng());
        let expires_at = now + gw.cfg.token_ttl_s as i64;
        let issued = IssuedToken {
            token: token.clone(),
            terminal: terminal.name.clone(),
            hospital_id: env.hospital_id.clone(),
            expires_at,
        };
        // Remembered here too: with the store down, this gateway still
        // knows the token it gave.
        gw.cache().tokens.insert(token.clone(), issued.clone());
        if let Err(e) = gw.store.issue_token(&issued) {
            tracing::error!(error = %e, terminal = %terminal.name, "the token could not be stored; only this gateway knows it");
        }
        gw.seen(&terminal.name, now, peer);
        tracing::info!(terminal = %terminal.name, peer = %peer, "token issued to a terminal");
        return Ok(Admitted::Token(Answer::ok(
            rid,
            json!({"appToken": token, "expiresIn": gw.cfg.token_ttl_s}),
        )));
    }
    let terminal = caller(gw, env, now, peer)?;
    let day = clock::day_number(now, clock::BEIJING);
    // A store that cannot count does not stop the scans: the call goes
    // uncounted (logged by the store read above).
    if let Some(budget) = gw.cfg.budget {
        let (counter, limit) = budget.counter(api_name);
        if gw
            .store
            .take_budget(counter, day, Some(limit))
            .unwrap_or(Some(0))
            .is_none()
        {
            tracing::warn!(
                api = api_name,
                counter,
                limit,
                "the hospital's daily budget is spent for this interface; answering 10034 until Beijing midnight"
            );
            return Err(Answer::err(10034, rid));
        }
    }
    Ok(Admitted::Forward(terminal.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_networks() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let nets = vec![
            "10.1.0.0/16".to_owned(),
            "fd00::/8".to_owned(),
            "192.168.5.7".to_owned(),
        ];
        assert!(allowed(ip("10.1.200.3"), &nets));
        assert!(!allowed(ip("10.2.0.1"), &nets));
        assert!(allowed(ip("::ffff:10.1.0.9"), &nets), "IPv4-mapped");
        assert!(allowed(ip("fd12::1"), &nets));
        assert!(allowed(ip("192.168.5.7"), &nets) && !allowed(ip("192.168.5.8"), &nets));
        assert!(allowed(ip("8.8.8.8"), &[]), "no list: any");
        assert!(
            valid_cidr("10.0.0.0/8")
                && valid_cidr("::1")
                && !valid_cidr("10.0.0.0/33")
                && !valid_cidr("x")
        );
    }
}
