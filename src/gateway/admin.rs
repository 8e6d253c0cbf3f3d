//! The gateway's admin listener, apart from the terminals' port: the fleet
//! page (`/`), the same data as JSON (`/api/fleet`), and Prometheus
//! (`/metrics`, with per-terminal series).
//!
//! Who may look: any peer on loopback; from elsewhere only a peer in
//! `admin_allow` that presents `admin_token` (`Authorization: Bearer`, or
//! `?token=` for the page itself, which then sends it as a header). The
//! page shows which windows exist and their state, not patients' data, but
//! it is still the hospital's business.
//!
//! The page is one self-contained file (`fleet.html`, compiled in): no CDN,
//! no fonts from outside; hospital intranets have no internet.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::fleet;
use super::server::Gateway;

const PAGE: &str = include_str!("fleet.html");

/// The fleet now, from the store.
pub fn current(gw: &Gateway) -> Result<fleet::Fleet, super::store::GatewayStoreError> {
    let terminals = gw.store.terminals()?;
    let beats = gw.store.beats()?;
    Ok(fleet::fleet(&terminals, &beats, crate::clock::now_unix()))
}

pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/fleet", get(api_fleet))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), guard))
        .with_state(gw)
}

/// Loopback, or an allowed network with the token.
async fn guard(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(super::tls::Peer(peer)): ConnectInfo<super::tls::Peer>,
    req: Request,
    next: Next,
) -> Response {
    if permitted(&gw, peer, &req) {
        next.run(req).await
    } else {
        tracing::warn!(peer = %peer, path = %req.uri().path(), "admin request refused");
        (
            StatusCode::FORBIDDEN,
            "refused: the admin listener serves loopback, or admin_allow networks with the admin token\n",
        )
            .into_response()
    }
}

fn permitted(gw: &Gateway, peer: SocketAddr, req: &Request) -> bool {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query = crate::agent::his::http::query_token(req.uri());
    may_look(
        peer.ip(),
        &gw.cfg.admin_allow,
        gw.cfg.admin_token.as_deref(),
        bearer.or(query.as_deref()),
    )
}

/// Loopback always; otherwise an allowed network and the right token.
fn may_look(
    ip: std::net::IpAddr,
    allow: &[String],
    token: Option<&str>,
    given: Option<&str>,
) -> bool {
    if ip.to_canonical().is_loopback() {
        return true;
    }
    let Some(token) = token else {
        return false;
    };
    !allow.is_empty()
        && super::server::allowed(ip, allow)
        && given.is_some_and(|g| crate::platform::sign::same_bytes(g.as_bytes(), token.as_bytes()))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page needs is in it; it talks only to here.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn api_fleet(State(gw): State<Arc<Gateway>>) -> Response {
    let r = tokio::task::spawn_blocking(move || current(&gw)).await;
    match r {
        Ok(Ok(f)) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(f)).into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(
                serde_json::json!({"error": format!("the gateway store cannot be read: {e}")}),
            ),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let text = tokio::task::spawn_blocking(move || {
        if let Ok(f) = current(&gw) {
            fleet::fill_metrics(&f);
        }
        super::server::metrics_text(&gw)
    })
    .await
    .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_or_an_allowed_network_with_the_token() {
        let allow = vec!["10.8.0.0/16".to_owned()];
        let tok = Some("0123456789abcdef0123");
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(may_look(ip("127.0.0.1"), &[], None, None));
        assert!(may_look(ip("::ffff:127.0.0.1"), &[], None, None));
        assert!(may_look(ip("10.8.3.4"), &allow, tok, tok));
        assert!(!may_look(ip("10.8.3.4"), &allow, tok, None), "no token");
        assert!(
            !may_look(ip("10.8.3.4"), &allow, tok, Some("0123456789abcdef0124")),
            "wrong token"
        );
        assert!(
            !may_look(ip("10.9.3.4"), &allow, tok, tok),
            "outside the networks"
        );
        assert!(
            !may_look(ip("10.8.3.4"), &[], tok, tok),
            "no allowlist: loopback only"
        );
        assert!(
            !may_look(ip("10.8.3.4"), &allow, None, None),
            "no token configured: loopback only"
        );
    }
}
