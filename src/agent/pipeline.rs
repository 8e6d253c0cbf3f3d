//! The scan path: scan → classify ([`crate::code`]) → resolve (platform) →
//! record (outbox) → deliver (HIS hub).
//!
//! * Dynamic codes go to verifyQRCode with the terminal's fields; static
//!   codes to getHealthCardByQRCode; both with the short scan-path timeout.
//! * When the platform cannot be reached (network, timeout, HTTP 5xx, an
//!   unusable answer), the `[offline]` policy applies: a static code may pass
//!   as `verified: false, offline: true` with only its card id; a dynamic
//!   code is refused with `platformUnavailable`.
//! * The use is **committed before the card is delivered** (DESIGN §6). If
//!   the disk refuses, the card is still delivered (the patient must be
//!   served) with `recorded: false`, and the use waits in memory.
//! * Texts that are not health card codes pass to HIS as `otherCode`,
//!   untouched: hospitals' own barcodes share the scanner.
//! * Upload never happens here: a slow or dead reportHISData changes nothing
//!   for the person at the window.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use time::UtcOffset;

use crate::agent::his::protocol::{CardIdentity, FailReason, In, Out};
use crate::agent::his::server::Handler;
use crate::agent::his::Hub;
use crate::agent::outbox::{Kind, NewRow, Outbox, Replaced};
use crate::agent::scanner::Scan;
use crate::clock;
use crate::code::{self, Code};
use crate::config::{Config, StaticOffline};
use crate::pii;
use crate::platform::api::{
    BindReq, GetHealthCardByQrCode, QrCodeReq, ReportReq, VerifyQrCode, VerifyQrCodeReq,
};
use crate::platform::client::new_request_id;
use crate::platform::{tables, CallError, CallOptions, Client};

/// How many scans are remembered for `use` and `bind`.
const REMEMBERED_SCANS: usize = 4096;
/// How long a scan can still be referred to by `use` / `bind` (seconds).
const SCAN_MEMORY_S: i64 = 24 * 3600;
/// Most `use`s HIS may send for one scan. A patient's card is used a few
/// times at one visit (registration, payment, pharmacy); past this a client
/// is inflating the hospital's reports, and is refused.
pub const MAX_USES_PER_SCAN: u32 = 5;

/// Where one scan's time went, for its `scan done` line: a slow scan in the
/// journal says whether the platform (the network, a cold connection) or
/// the disk (the commit's fsync) took the time. Atomics, not cells: the
/// scan's future holds a reference across awaits and must stay `Send`.
#[derive(Default)]
struct Stages {
    platform_us: AtomicU64,
    commit_us: AtomicU64,
}

impl Stages {
    /// Run `f`, adding its duration to `slot`.
    async fn timed<T>(slot: &AtomicU64, f: impl std::future::Future<Output = T>) -> T {
        let t = Instant::now();
        let out = f.await;
        slot.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        out
    }

    fn ms(slot: &AtomicU64) -> f64 {
        ms(Duration::from_micros(slot.load(Ordering::Relaxed)))
    }
}

/// Milliseconds with a tenth of a millisecond, for logs.
fn ms(d: Duration) -> f64 {
    (d.as_micros() / 100) as f64 / 10.0
}

/// What the pipeline needs from the configuration.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub hospital_id: String,
    pub terminal_id: String,
    pub channel: String,
    pub scene: String,
    pub department: Option<String>,
    pub city_code: String,
    pub city_name: String,
    pub hospital_code: String,
    pub hospital_name: String,
    pub utc_offset: UtcOffset,
    pub static_offline: StaticOffline,
    pub report_dynamic: bool,
    pub use_wait_s: u64,
}

impl PipelineSettings {
    pub fn from_config(c: &Config) -> Self {
        PipelineSettings {
            hospital_id: c.platform.hospital_id.clone(),
            terminal_id: c.terminal.id.clone(),
            channel: c.terminal.channel.clone(),
            scene: c.terminal.scene.clone(),
            department: c.terminal.department.clone(),
            city_code: c.terminal.city_code.clone(),
            city_name: c.terminal.city_name.clone(),
            hospital_code: c.terminal.hospital_code.clone(),
            hospital_name: c.terminal.hospital_name.clone(),
            utc_offset: c.utc_offset,
            static_offline: c.offline.static_codes,
            report_dynamic: c.outbox.report_dynamic,
            use_wait_s: c.his.use_wait_s,
        }
    }
}

/// A delivered scan, kept so HIS can refer to it by `scanId`.
#[derive(Debug, Clone)]
struct Remembered {
    text: String,
    dynamic: bool,
    at: i64,
    /// `use`s HIS has sent for this scan.
    his_uses: u32,
    /// The default use was committed as *waiting* (`use_wait_s > 0`).
    waiting_default: bool,
}

/// Counters for status and metrics.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ScanStats {
    pub cards: u64,
    pub offline_cards: u64,
    pub failed: u64,
    pub other: u64,
    pub discarded: u64,
    pub unrecorded: u64,
}

pub struct Pipeline {
    /// Swapped by a reload; a scan in flight keeps the settings it started
    /// with.
    settings: std::sync::RwLock<std::sync::Arc<PipelineSettings>>,
    client: std::sync::RwLock<Client>,
    outbox: Outbox,
    hub: Hub,
    scans: Mutex<(HashMap<String, Remembered>, VecDeque<String>)>,
    stats: Mutex<ScanStats>,
}

/// A new scan id: `S` and 24 hex characters.
fn new_scan_id() -> String {
    format!("S{}", &new_request_id()[..24])
}

impl Pipeline {
    pub fn new(settings: PipelineSettings, client: Client, outbox: Outbox, hub: Hub) -> Self {
        Pipeline {
            settings: std::sync::RwLock::new(std::sync::Arc::new(settings)),
            client: std::sync::RwLock::new(client),
            outbox,
            hub,
            scans: Mutex::new((HashMap::new(), VecDeque::new())),
            stats: Mutex::new(ScanStats::default()),
        }
    }

    fn settings(&self) -> std::sync::Arc<PipelineSettings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn client(&self) -> Client {
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A reload: new settings and client for scans from now on. The scan
    /// memory (HIS's `use` and `bind` refer to it) is kept.
    pub fn reconfigure(&self, settings: PipelineSettings, client: Client) {
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(settings);
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client;
    }

    pub fn stats(&self) -> ScanStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count(&self, f: impl FnOnce(&mut ScanStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Handle one scan to the end: the event HIS was sent, or `None` for a
    /// scan that was discarded (empty or over the length limit).
    pub async fn handle_scan(&self, scan: Scan) -> Option<Out> {
        let started = Instant::now();
        let stages = Stages::default();
        let metrics = crate::metrics::get();
        let scanned = match code::classify(&scan.text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(scanner = %scan.scanner, error = %e, "scan discarded");
                self.count(|s| s.discarded += 1);
                metrics.scan("discarded");
                return None;
            }
        };
        let scan_id = new_scan_id();
        let done_id = scan_id.clone();
        let kind = scanned.code.kind().to_owned();
        tracing::info!(scanner = %scan.scanner, scan_id = %scan_id, kind = %kind, code = %pii::qr(&scanned.text), "scan");
        let out = match &scanned.code {
            Code::Other => {
                self.count(|s| s.other += 1);
                Out::OtherCode {
                    scan_id,
                    scanner: scan.scanner,
                    text: scanned.text,
                }
            }
            Code::Static { card_id } => {
                self.resolve_static(&scan, scan_id, &scanned.text, card_id, &stages)
                    .await
            }
            Code::Dynamic { .. } => {
                self.resolve_dynamic(&scan, scan_id, &scanned.text, &stages)
                    .await
            }
        };
        self.hub.broadcast(out.to_line().into());
        let result = match &out {
            Out::Card { offline: true, .. } => "offline_card",
            Out::Card { .. } => "card",
            Out::ScanFailed { .. } => "failed",
            _ => "other",
        };
        let took = started.elapsed();
        metrics.scan(result);
        metrics.scan_to_his.observe(took.as_secs_f64());
        tracing::info!(
            scan_id = %done_id,
            result,
            ms = ms(took),
            platform_ms = Stages::ms(&stages.platform_us),
            commit_ms = Stages::ms(&stages.commit_us),
            "scan done"
        );
        Some(out)
    }

    async fn resolve_static(
        &self,
        scan: &Scan,
        scan_id: String,
        text: &str,
        card_id: &str,
        stages: &Stages,
    ) -> Out {
        let req = QrCodeReq {
            qr_code_text: text.to_owned(),
        };
        let client = self.client();
        let call = client.call::<GetHealthCardByQrCode>(&req, CallOptions::scan());
        match Stages::timed(&stages.platform_us, call).await {
            Ok(rsp) => {
                let c = rsp.card;
                let identity = CardIdentity {
                    health_card_id: if c.health_card_id.is_empty() {
                        card_id.to_owned()
                    } else {
                        c.health_card_id
                    },
                    phid: c.phid,
                    name: c.name,
                    gender: c.gender,
                    nation: c.nation,
                    birthday: c.birthday,
                    id_type: c.id_type,
                    id_number: c.id_number,
                    phone: c.phone1,
                    address: c.address,
                    patid: c.patid,
                };
                self.card(scan, scan_id, text, false, identity, true, stages)
                    .await
            }
            Err(e)
                if e.is_unavailable()
                    && self.settings().static_offline == StaticOffline::PassUnverified =>
            {
                tracing::warn!(scan_id = %scan_id, error = %e, "platform unavailable: static code passed offline, unverified");
                let identity = CardIdentity {
                    health_card_id: card_id.to_owned(),
                    ..CardIdentity::default()
                };
                self.count(|s| s.offline_cards += 1);
                self.card(scan, scan_id, text, false, identity, false, stages)
                    .await
            }
            Err(e) => self.failed(scan, scan_id, "static", &e),
        }
    }

    async fn resolve_dynamic(
        &self,
        scan: &Scan,
        scan_id: String,
        text: &str,
        stages: &Stages,
    ) -> Out {
        let s = self.settings();
        let req = VerifyQrCodeReq {
            qr_code_text: text.to_owned(),
            terminal_id: s.terminal_id.clone(),
            time: clock::platform_time(scan.at, s.utc_offset),
            medical_step: s.scene.clone(),
            use_city_code: s.city_code.clone(),
            use_city_name: s.city_name.clone(),
            hospital_code: s.hospital_code.clone(),
            hospital_name: s.hospital_name.clone(),
            use_scene: Some(s.scene.clone()),
            use_channel: Some(s.channel.clone()),
        };
        let client = self.client();
        let call = client.call::<VerifyQrCode>(&req, CallOptions::scan());
        match Stages::timed(&stages.platform_us, call).await {
            Ok(v) => {
                let identity = CardIdentity {
                    health_card_id: v.health_card_id,
                    phid: v.phid,
                    name: v.name,
                    gender: v.gender,
                    nation: v.nation,
                    birthday: v.birthday,
                    id_type: v.id_type,
                    id_number: v.id_number,
                    phone: v.phone,
                    address: v.address,
                    patid: String::new(),
                };
                self.card(scan, scan_id, text, true, identity, true, stages)
                    .await
            }
            Err(e) => self.failed(scan, scan_id, "dynamic", &e),
        }
    }

    /// Record the default use, then build the `card` event.
    #[allow(clippy::too_many_arguments)] // the scan's parts, each used once
    async fn card(
        &self,
        scan: &Scan,
        scan_id: String,
        text: &str,
        dynamic: bool,
        card: CardIdentity,
        verified: bool,
        stages: &Stages,
    ) -> Out {
        let mut card = card;
        let cut = card.cap_fields();
        if !cut.is_empty() {
            tracing::warn!(scan_id = %scan_id, fields = ?cut, "the platform's answer had over-long identity fields; cut to the protocol's limits");
        }
        let s = self.settings();
        let recorded = if dynamic && !s.report_dynamic {
            true // verifyQRCode already counted this use
        } else {
            let wait_until = (s.use_wait_s > 0).then(|| clock::deadline_after(s.use_wait_s));
            let row = self.report_row(
                &scan_id,
                text,
                &s.scene,
                s.department.as_deref(),
                scan.at,
                wait_until,
            );
            Stages::timed(&stages.commit_us, self.outbox.record(vec![row])).await
        };
        if !recorded {
            self.count(|s| s.unrecorded += 1);
        }
        let waiting_default = s.use_wait_s > 0 && (!dynamic || s.report_dynamic);
        self.remember(&scan_id, text, dynamic, scan.at, waiting_default);
        self.count(|s| s.cards += 1);
        Out::Card {
            scan_id,
            scanner: scan.scanner.clone(),
            scanned_at: clock::platform_time(scan.at, s.utc_offset),
            code_kind: if dynamic { "dynamic" } else { "static" }.into(),
            verified,
            offline: !verified,
            recorded,
            qr_code_text: text.to_owned(),
            card: Box::new(card),
        }
    }

    fn failed(&self, scan: &Scan, scan_id: String, kind: &str, e: &CallError) -> Out {
        let code = e.result_code();
        let reason = if e.is_unavailable() {
            FailReason::PlatformUnavailable
        } else {
            match code {
                Some(-10019) => FailReason::CardNotFound,
                Some(10020) if kind == "dynamic" => FailReason::CodeExpired,
                Some(10020) => FailReason::CardNotFound,
                _ => FailReason::PlatformRejected,
            }
        };
        tracing::warn!(scan_id = %scan_id, kind, reason = ?reason, code = ?code, error = %e, "scan failed");
        self.count(|s| s.failed += 1);
        Out::ScanFailed {
            scan_id,
            scanner: scan.scanner.clone(),
            code_kind: kind.into(),
            reason,
            result_code: code,
            message: e.to_string(),
        }
    }

    fn report_row(
        &self,
        scan_id: &str,
        text: &str,
        scene: &str,
        department: Option<&str>,
        at: i64,
        wait_until: Option<i64>,
    ) -> NewRow {
        let s = self.settings();
        let req = ReportReq {
            qr_code_text: Some(text.to_owned()),
            id_card_number: None,
            name: None,
            time: clock::platform_time(at, s.utc_offset),
            hospital_id: s.hospital_id.clone(),
            scene: scene.to_owned(),
            department: department.map(str::to_owned).filter(|d| !d.is_empty()),
            card_type: tables::CARD_TYPE_HEALTH_CARD.to_owned(),
            card_channel: s.channel.clone(),
        };
        NewRow {
            request_id: new_request_id(),
            kind: Kind::Report,
            scan_id: scan_id.to_owned(),
            payload: serde_json::to_string(&req).unwrap_or_default(),
            created_at: clock::now_unix(),
            wait_until,
        }
    }

    fn remember(&self, scan_id: &str, text: &str, dynamic: bool, at: i64, waiting_default: bool) {
        let mut g = self.scans.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *g;
        map.insert(
            scan_id.to_owned(),
            Remembered {
                text: text.to_owned(),
                dynamic,
                at,
                his_uses: 0,
                waiting_default,
            },
        );
        order.push_back(scan_id.to_owned());
        while order.len() > REMEMBERED_SCANS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    fn recall(&self, scan_id: &str) -> Option<Remembered> {
        let g = self.scans.lock().unwrap_or_else(|e| e.into_inner());
        g.0.get(scan_id)
            .filter(|r| clock::now_unix() - r.at < SCAN_MEMORY_S)
            .cloned()
    }

    /// Take one of the scan's use slots (at most [`MAX_USES_PER_SCAN`]);
    /// returns which use this is (1 = the first).
    fn take_use(&self, scan_id: &str) -> Result<u32, String> {
        let mut g = self.scans.lock().unwrap_or_else(|e| e.into_inner());
        let r = g.0.get_mut(scan_id).ok_or_else(|| unknown_scan(scan_id))?;
        if r.his_uses >= MAX_USES_PER_SCAN {
            return Err(format!(
                "scan `{scan_id}` already has {MAX_USES_PER_SCAN} uses, the most one scan may have; scan the card again for a new visit"
            ));
        }
        r.his_uses += 1;
        Ok(r.his_uses)
    }

    /// HIS's `use`. With `use_wait_s = 0` each `use` is one more use. With
    /// `use_wait_s > 0` the first `use` *is* the use the waiting default
    /// stood for: it replaces the default while that still waits, and if
    /// the default's deadline has already passed (it is claimed or sent) it
    /// adds nothing, so the scan is never reported twice for one use.
    /// Later `use`s add uses.
    async fn on_use(
        &self,
        scan_id: &str,
        scene: Option<String>,
        department: Option<String>,
    ) -> Result<(), String> {
        let r = self.recall(scan_id).ok_or_else(|| unknown_scan(scan_id))?;
        let s = self.settings();
        let scene = scene.unwrap_or_else(|| s.scene.clone());
        let department = department.or_else(|| s.department.clone());
        if tables::scene_needs_department(&scene) && department.is_none() {
            return Err(format!("scene {scene} needs a department"));
        }
        let nth = self.take_use(scan_id)?;
        if r.dynamic && !s.report_dynamic {
            return Ok(());
        }
        let row = self.report_row(
            scan_id,
            &r.text,
            &scene,
            department.as_deref(),
            clock::now_unix(),
            None,
        );
        if nth == 1 && r.waiting_default {
            match self
                .outbox
                .record_replacing(scan_id.to_owned(), vec![row])
                .await
            {
                Replaced::Committed(1) => {
                    tracing::info!(scan_id, scene = %scene, "use from HIS replaced the waiting default use")
                }
                Replaced::Committed(_) => {
                    // The default's wait ended before this `use` came: it is
                    // being (or was) reported, and HIS's row was not added,
                    // since reporting it too would count one use twice.
                    tracing::warn!(scan_id, scene = %scene, "use from HIS came after use_wait_s: the default use already stands for it (raise use_wait_s)");
                }
                Replaced::Spilled => {}
            }
            return Ok(());
        }
        tracing::info!(scan_id, scene = %scene, nth, "use recorded from HIS");
        self.outbox.record(vec![row]).await;
        Ok(())
    }

    async fn on_bind(&self, scan_id: &str, patid: String) -> Result<(), String> {
        let r = self.recall(scan_id).ok_or_else(|| unknown_scan(scan_id))?;
        let req = BindReq {
            patid,
            qr_code_text: r.text,
        };
        let row = NewRow {
            request_id: new_request_id(),
            kind: Kind::Bind,
            scan_id: scan_id.to_owned(),
            payload: serde_json::to_string(&req).unwrap_or_default(),
            created_at: clock::now_unix(),
            wait_until: None,
        };
        tracing::info!(scan_id, "bind queued");
        self.outbox.record(vec![row]).await;
        Ok(())
    }
}

fn unknown_scan(scan_id: &str) -> String {
    format!("unknown scanId `{scan_id}` (cards are remembered for 24 h, not across restarts)")
}

impl Handler for Pipeline {
    async fn handle(&self, msg: In, peer: &str) -> Out {
        let (reference, result): (Option<Value>, Result<(), String>) = match msg {
            // Sessions answer `auth` themselves; one that gets here is on an
            // admitted connection.
            In::Ping { reference } | In::Auth { reference, .. } => (reference, Ok(())),
            In::Use {
                reference,
                scan_id,
                scene,
                department,
            } => (reference, self.on_use(&scan_id, scene, department).await),
            In::Bind {
                reference,
                scan_id,
                patid,
            } => (reference, self.on_bind(&scan_id, patid).await),
        };
        match result {
            Ok(()) => Out::Reply {
                reference,
                ok: true,
            },
            Err(message) => {
                tracing::info!(peer, error = %message, "HIS request refused");
                Out::error(reference, message)
            }
        }
    }
}
