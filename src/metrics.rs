//! Prometheus metrics (`[metrics] listen`, loopback only), with
//! prometheus-client.
//!
//! One registry per process, like the `metrics` crate's global recorder:
//! counters and histograms are updated where things happen (pipeline,
//! platform client, uploader); gauges that mirror state (outbox depth,
//! scanners up, HIS clients) are refreshed from the daemon's status on each
//! scrape, so they are never stale.
//!
//! Names follow Prometheus conventions: `ehc_agent_` prefix, base units
//! (seconds), `_total` on counters (added by the encoder).

use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Mutex<Registry>,
    pub scans: Family<Labels, Counter>,
    pub scan_to_his: Histogram,
    pub platform_requests: HistogramFamily,
    /// New connections to the platform (or gateway), by what opened them.
    pub platform_connections: Family<Labels, Counter>,
    pub uploads: Family<Labels, Counter>,
    pub token_refreshes: Counter,
    pub outbox_rows: Family<Labels, Gauge>,
    pub outbox_oldest_pending_age: Gauge,
    pub outbox_spilled: Gauge,
    pub uploads_stopped: Gauge,
    pub scanner_up: Family<Labels, Gauge>,
    pub his_clients: Gauge,
    /// The gateway's (`ehc-agent gateway`): terminal requests by API and
    /// outcome (a result code, `forwarded`, `unavailable`).
    pub gateway_requests: Family<Labels, Counter>,
    pub gateway_terminals: Gauge,
    pub gateway_budget_used: Family<Labels, Gauge>,
    pub gateway_upstream_generation: Gauge,
    pub gateway_store_down: Gauge,
    /// The fleet, per terminal (from heartbeats; refilled at each scrape).
    pub fleet_up: Family<Labels, Gauge>,
    pub fleet_attention: Family<Labels, Gauge>,
    pub fleet_outbox_unsent: Family<Labels, Gauge>,
    pub fleet_outbox_oldest_age: Family<Labels, Gauge>,
    pub fleet_scanners_down: Family<Labels, Gauge>,
    pub fleet_uploads_stopped: Family<Labels, Gauge>,
    pub fleet_clock_offset: Family<Labels, Gauge>,
    pub fleet_last_heartbeat: Family<Labels, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let mut r = Registry::with_prefix("ehc_agent");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            scans: Family::default(),
            scan_to_his: latency_histogram(),
            platform_requests: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            platform_connections: Family::default(),
            uploads: Family::default(),
            token_refreshes: Counter::default(),
            outbox_rows: Family::default(),
            outbox_oldest_pending_age: Gauge::default(),
            outbox_spilled: Gauge::default(),
            uploads_stopped: Gauge::default(),
            scanner_up: Family::default(),
            his_clients: Gauge::default(),
            gateway_requests: Family::default(),
            gateway_terminals: Gauge::default(),
            gateway_budget_used: Family::default(),
            gateway_upstream_generation: Gauge::default(),
            gateway_store_down: Gauge::default(),
            fleet_up: Family::default(),
            fleet_attention: Family::default(),
            fleet_outbox_unsent: Family::default(),
            fleet_outbox_oldest_age: Family::default(),
            fleet_scanners_down: Family::default(),
            fleet_uploads_stopped: Family::default(),
            fleet_clock_offset: Family::default(),
            fleet_last_heartbeat: Family::default(),
        };
        r.register(
            "scans",
            "Scans handled, by result (card, offline_card, failed, other, discarded)",
            m.scans.clone(),
        );
        r.register(
            "scan_to_his_seconds",
            "From a scan read to its event queued for HIS clients",
            m.scan_to_his.clone(),
        );
        r.register(
            "platform_request_duration_seconds",
            "Platform calls by API and result class",
            m.platform_requests.clone(),
        );
        r.register(
            "platform_connections_opened",
            "New connections to the platform or gateway by what opened them: preconnect (a scan's first byte), scan (a scan found none open and paid the handshakes: keep-warm did not hold one), other (uploads, keep-warm, token)",
            m.platform_connections.clone(),
        );
        r.register(
            "uploads",
            "Outbox upload attempts by result class",
            m.uploads.clone(),
        );
        r.register(
            "token_refreshes",
            "getAppToken calls",
            m.token_refreshes.clone(),
        );
        r.register("outbox_rows", "Outbox rows by state", m.outbox_rows.clone());
        r.register(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest use not yet uploaded",
            m.outbox_oldest_pending_age.clone(),
        );
        r.register(
            "outbox_spilled_uses",
            "Uses held in memory because the disk refused them",
            m.outbox_spilled.clone(),
        );
        r.register(
            "uploads_stopped",
            "1 while uploads are stopped by a configuration error or a rate limit",
            m.uploads_stopped.clone(),
        );
        r.register(
            "scanner_up",
            "1 while a scanner's device is connected",
            m.scanner_up.clone(),
        );
        r.register(
            "his_clients",
            "Connected HIS clients",
            m.his_clients.clone(),
        );
        r.register(
            "gateway_requests",
            "Gateway: terminal requests by API and outcome (result code answered by the gateway, forwarded, unavailable)",
            m.gateway_requests.clone(),
        );
        r.register(
            "gateway_terminals",
            "Gateway: enrolled, unrevoked terminals",
            m.gateway_terminals.clone(),
        );
        r.register(
            "gateway_budget_used",
            "Gateway: calls forwarded today (Beijing day) per interface",
            m.gateway_budget_used.clone(),
        );
        r.register(
            "gateway_upstream_token_generation",
            "Gateway: generation of the upstream token held",
            m.gateway_upstream_generation.clone(),
        );
        r.register(
            "gateway_store_down",
            "Gateway: 1 while its store (Redis) cannot be reached",
            m.gateway_store_down.clone(),
        );
        for (name, help, f) in [
            ("fleet_terminal_up", "Fleet: 1 while the terminal's heartbeats arrive, 0 once three are missed (or none ever came)", &m.fleet_up),
            ("fleet_terminal_attention", "Fleet: the terminal's causes needing attention", &m.fleet_attention),
            ("fleet_outbox_unsent", "Fleet: uses the terminal has not yet uploaded", &m.fleet_outbox_unsent),
            ("fleet_outbox_oldest_unsent_age_seconds", "Fleet: age of the terminal's oldest unsent use", &m.fleet_outbox_oldest_age),
            ("fleet_scanners_down", "Fleet: the terminal's scanners that are not connected", &m.fleet_scanners_down),
            ("fleet_uploads_stopped", "Fleet: 1 while the terminal's uploads are stopped", &m.fleet_uploads_stopped),
            ("fleet_clock_offset_seconds", "Fleet: the terminal's clock minus the gateway's", &m.fleet_clock_offset),
            ("fleet_last_heartbeat_timestamp_seconds", "Fleet: when the terminal's last heartbeat arrived (Unix time)", &m.fleet_last_heartbeat),
        ] {
            r.register(name, help, f.clone());
        }
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    })
}

impl Metrics {
    pub fn scan(&self, result: &str) {
        self.scans
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    pub fn platform(&self, api: &str, class: &str, secs: f64) {
        self.platform_requests
            .get_or_create(&vec![("api", api.to_owned()), ("class", class.to_owned())])
            .observe(secs);
    }

    pub fn connection_opened(&self, by: &'static str) {
        self.platform_connections
            .get_or_create(&vec![("by", by.to_owned())])
            .inc();
    }

    pub fn upload(&self, class: &str) {
        self.uploads
            .get_or_create(&vec![("class", class.to_owned())])
            .inc();
    }

    pub fn gateway_request(&self, api: &str, outcome: &str) {
        self.gateway_requests
            .get_or_create(&vec![
                ("api", api.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let _ = encode(&mut s, &r);
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn named_series_are_exposed() {
        let m = super::get();
        m.scan("card");
        m.platform("verifyQRCode", "success", 0.01);
        m.upload("success");
        let text = m.encode();
        for name in [
            "ehc_agent_scans_total{result=\"card\"}",
            "ehc_agent_platform_request_duration_seconds_bucket{",
            "ehc_agent_uploads_total{class=\"success\"}",
            "ehc_agent_scan_to_his_seconds_count",
            "ehc_agent_his_clients",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
