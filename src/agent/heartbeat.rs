//! The terminal's heartbeat to its gateway (DESIGN §5b): every
//! `[platform] heartbeat_s`, the agent's `status` goes to the gateway so
//! hospital IT sees every window on one page.
//!
//! It is the agent's least important traffic: it runs on its own task and
//! its own connections ([`crate::platform::Client::heartbeat`]), with the
//! upload timeout, and a failure is logged, never retried early. An agent
//! talking to the platform itself (not a gateway) gets 404 for the
//! gateway's path: it says so once and stops until the next reload or
//! restart.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::agent::app::Core;
use crate::platform::heartbeat::Beat;
use crate::platform::CallError;

/// Send heartbeats until `stop`. The interval is read from `core` before
/// each beat (a reload may change it; 0 pauses them).
pub async fn run(core: Arc<Core>, stop: CancellationToken) {
    // The first beat soon after start: the fleet page shows a restarted
    // terminal at once.
    let mut wait = Duration::from_secs(1);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let every = core.heartbeat_s.load(Ordering::Relaxed);
        if every == 0 {
            wait = Duration::from_secs(5);
            continue;
        }
        wait = Duration::from_secs(every);
        let status = core.status().await;
        let beat = Beat {
            version: env!("CARGO_PKG_VERSION").into(),
            terminal_id: status.terminal_id.clone(),
            interval_s: every,
            status: serde_json::to_value(&status).unwrap_or_default(),
        };
        match core.client().heartbeat(&beat).await {
            Ok(()) => {
                if failing {
                    tracing::info!("heartbeats reach the gateway again");
                }
                failing = false;
            }
            Err(CallError::Http(404)) => {
                tracing::info!(
                    "the platform address is not an ehc-agent gateway: no heartbeats are sent"
                );
                return;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "heartbeat to the gateway failed; trying again every interval");
                }
                failing = true;
            }
        }
    }
}
