//! What `ehc-agent status` shows: scanners and their state, HIS clients,
//! outbox depth and oldest pending age, held rows, the last successful
//! upload, token validity, and why uploads are stopped if they are. Also the
//! one-line summary for systemd's `STATUS=`, and the list of things that
//! need an operator ([`Status::attention`]), which makes `status` exit
//! non-zero so monitoring can use it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::outbox::report::age;
use crate::agent::scanner::device::ScannerStatus;
use crate::agent::scanner::ScannerState;
use crate::clock;

/// A use waiting longer than this needs a look (an hour of outage is normal).
pub const OLD_PENDING_S: i64 = 6 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub agent: String,
    pub pid: u32,
    pub started_at: i64,
    pub terminal_id: String,
    pub scanners: BTreeMap<String, ScannerView>,
    pub his_clients: Vec<String>,
    pub held_events: usize,
    /// Events dropped before any HIS client took them (expired, over the
    /// bound, or `hold_s = 0`), since start.
    #[serde(default)]
    pub held_dropped: u64,
    pub outbox: OutboxView,
    pub uploads: UploadsView,
    pub token: TokenView,
    pub scans: crate::agent::pipeline::ScanStats,
    /// The last failed platform calls (API, result code), oldest first.
    #[serde(default)]
    pub recent_errors: Vec<crate::platform::client::RecentError>,
    /// Things an operator should look at; empty when all is well.
    pub attention: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScannerView {
    pub kind: String,
    pub device: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    pub since: i64,
    pub scans: u64,
}

impl From<ScannerStatus> for ScannerView {
    fn from(s: ScannerStatus) -> Self {
        let (state, cause) = match s.state {
            ScannerState::Connected => ("connected", None),
            ScannerState::WaitingForDevice => ("waitingForDevice", None),
            ScannerState::Closed => ("closed", None),
            ScannerState::Error { cause } => ("error", Some(cause)),
        };
        ScannerView {
            kind: s.kind,
            device: s.device,
            state: state.into(),
            cause,
            since: s.since,
            scans: s.scans,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxView {
    pub path: String,
    pub pending: i64,
    pub waiting: i64,
    pub held: i64,
    pub sent: i64,
    pub oldest_pending_age_s: Option<i64>,
    pub spilled: usize,
    pub disk_fault: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadsView {
    pub last_success_at: Option<i64>,
    pub stopped: Option<String>,
    pub rate_limited_until: Option<i64>,
    pub last_error: Option<String>,
    pub uploaded: u64,
    pub failed_attempts: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenView {
    pub valid: bool,
    pub expires_at: Option<i64>,
    pub refreshes: i64,
    /// Times the platform rejected a token of ours that had not expired:
    /// someone else fetched one for the same appId.
    #[serde(default)]
    pub revocations: i64,
    #[serde(default)]
    pub last_revoked_at: Option<i64>,
}

/// A revocation by another holder of the appId within this long is shown
/// under attention.
pub const REVOCATION_WINDOW_S: i64 = 3600;

impl Status {
    /// Fill [`Status::attention`] from the rest.
    pub fn assess(&mut self, now: i64) {
        let mut a = Vec::new();
        for (name, s) in &self.scanners {
            match s.state.as_str() {
                "connected" => {}
                "error" => a.push(format!(
                    "scanner {name}: {}",
                    s.cause.as_deref().unwrap_or("error")
                )),
                other => a.push(format!(
                    "scanner {name} is {} since {}",
                    human_state(other),
                    age(now - s.since)
                )),
            }
        }
        if let Some(why) = &self.uploads.stopped {
            a.push(format!("uploads stopped: {why}"));
        }
        if let Some(t) = self
            .token
            .last_revoked_at
            .filter(|t| now - *t < REVOCATION_WINDOW_S)
        {
            a.push(format!(
                "the platform revoked this agent's app token {} time(s), last {} ago: another agent or program uses the same appId, and each new token revokes the other's (scans fail or slow down). Give each hospital one token holder: put the terminals behind an ehc-agent gateway",
                self.token.revocations,
                age(now - t)
            ));
        }
        if let Some(t) = self.uploads.rate_limited_until.filter(|t| *t > now) {
            a.push(format!(
                "platform call limit reached; uploads resume {} (Beijing time)",
                clock::platform_time(t, clock::BEIJING)
            ));
        }
        if self.outbox.held > 0 {
            a.push(format!(
                "{} held row(s) the platform refused (`ehc-agent outbox list`)",
                self.outbox.held
            ));
        }
        if let Some(f) = &self.outbox.disk_fault {
            a.push(format!(
                "outbox cannot be written ({} use(s) in memory): {f}",
                self.outbox.spilled
            ));
        }
        if let Some(age_s) = self
            .outbox
            .oldest_pending_age_s
            .filter(|a| *a > OLD_PENDING_S)
        {
            a.push(format!("oldest use waiting for upload for {}", age(age_s)));
        }
        self.attention = a;
    }

    /// systemd's one-line `STATUS=`.
    pub fn line(&self) -> String {
        let up = self
            .scanners
            .values()
            .filter(|s| s.state == "connected")
            .count();
        let mut s = format!(
            "{}/{} scanners, {} HIS client(s), {} pending upload(s)",
            up,
            self.scanners.len(),
            self.his_clients.len(),
            self.outbox.pending + self.outbox.waiting
        );
        if let Some(first) = self.attention.first() {
            s.push_str("; ");
            s.push_str(first);
        }
        s
    }

    /// One readable screen.
    pub fn human(&self, now: i64) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} (pid {}), terminal {}, up {}",
            self.agent,
            self.pid,
            self.terminal_id,
            age(now - self.started_at)
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "scanners");
        if self.scanners.is_empty() {
            let _ = writeln!(s, "  none configured");
        }
        for (name, sc) in &self.scanners {
            let _ = writeln!(
                s,
                "  {:<14} {:<8} {:<20} {} for {}, {} scan(s){}",
                name,
                sc.kind,
                human_state(&sc.state),
                sc.device,
                age(now - sc.since),
                sc.scans,
                sc.cause
                    .as_deref()
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            s,
            "HIS clients: {}{}",
            self.his_clients.len(),
            if self.held_events > 0 {
                format!(" ({} event(s) held for the next client)", self.held_events)
            } else {
                String::new()
            }
        );
        for c in &self.his_clients {
            let _ = writeln!(s, "  {c}");
        }
        let o = &self.outbox;
        let _ = writeln!(
            s,
            "outbox: {} pending{}, {} waiting for HIS, {} held, {} sent (kept for the retention period)",
            o.pending,
            o.oldest_pending_age_s.map(|a| format!(" (oldest {})", age(a))).unwrap_or_default(),
            o.waiting,
            o.held,
            o.sent
        );
        let u = &self.uploads;
        let _ = writeln!(
            s,
            "uploads: last success {}, {} uploaded, {} failed attempt(s) since start",
            u.last_success_at
                .map(|t| format!("{} ago", age(now - t)))
                .unwrap_or_else(|| "never (since start)".into()),
            u.uploaded,
            u.failed_attempts
        );
        if let Some(e) = &u.last_error {
            let _ = writeln!(s, "  last error: {e}");
        }
        let _ = writeln!(
            s,
            "token: {}, {} refresh(es)",
            match (self.token.valid, self.token.expires_at) {
                (true, Some(t)) => format!("valid for {}", age(t - now)),
                (false, Some(_)) => "expired (refreshed on the next call)".into(),
                _ => "none yet".into(),
            },
            self.token.refreshes
        );
        let sc = &self.scans;
        let _ = writeln!(
            s,
            "scans: {} card(s) ({} offline), {} failed, {} other code(s), {} discarded",
            sc.cards, sc.offline_cards, sc.failed, sc.other, sc.discarded
        );
        let _ = writeln!(s);
        if self.attention.is_empty() {
            let _ = writeln!(s, "all well");
        } else {
            let _ = writeln!(s, "NEEDS ATTENTION");
            for a in &self.attention {
                let _ = writeln!(s, "  - {a}");
            }
        }
        s
    }
}

fn human_state(s: &str) -> &str {
    match s {
        "waitingForDevice" => "waiting for device",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Status {
        Status {
            agent: "ehc-agent 0.1.0".into(),
            pid: 1,
            started_at: 0,
            terminal_id: "W".into(),
            scanners: BTreeMap::new(),
            his_clients: vec![],
            held_events: 0,
            held_dropped: 0,
            outbox: OutboxView::default(),
            uploads: UploadsView::default(),
            token: TokenView::default(),
            scans: Default::default(),
            recent_errors: vec![],
            attention: vec![],
        }
    }

    #[test]
    fn attention_lists_what_needs_an_operator() {
        let mut s = base();
        s.assess(100);
        assert!(s.attention.is_empty());
        assert!(s.human(100).contains("all well"));
        s.scanners.insert(
            "left".into(),
            ScannerView {
                kind: "serial".into(),
                device: "/dev/x".into(),
                state: "waitingForDevice".into(),
                cause: None,
                since: 40,
                scans: 0,
            },
        );
        s.uploads.stopped = Some("result code 21006: 签名错误".into());
        s.outbox.held = 2;
        s.outbox.oldest_pending_age_s = Some(OLD_PENDING_S + 1);
        s.assess(100);
        assert_eq!(s.attention.len(), 4, "{:?}", s.attention);
        assert!(s.attention[0].contains("waiting for device"));
        assert!(s.line().contains("uploads stopped") || s.line().contains("scanner left"));
        assert!(s.human(100).contains("NEEDS ATTENTION"));
    }

    /// Regression: two windows sharing an appId failed a third of their
    /// scans while `status` said all was well.
    #[test]
    fn token_revocations_by_another_holder_need_attention() {
        let mut s = base();
        s.token.revocations = 3;
        s.token.last_revoked_at = Some(100);
        s.assess(160);
        assert_eq!(s.attention.len(), 1, "{:?}", s.attention);
        assert!(s.attention[0].contains("3 time(s)") && s.attention[0].contains("gateway"));
        // An hour later, with no new revocation, it is history.
        s.assess(100 + REVOCATION_WINDOW_S);
        assert!(s.attention.is_empty());
    }
}
