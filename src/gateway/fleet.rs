//! The fleet: every enrolled terminal with what its latest heartbeat says,
//! and what needs hospital IT's attention, worst first (DESIGN §5b). One
//! view, four faces: the page and `/api/fleet` on the admin listener
//! ([`super::admin`]), `ehc-agent gateway fleet` (a table), and Prometheus
//! series per terminal.
//!
//! Causes are words, in Chinese with English beside them, never a colour
//! alone. Times are Beijing time (the hospital's and the platform's),
//! computed here, so no browser's time zone changes what IT reads.
//!
//! The status inside a heartbeat is read field by field and every field is
//! optional: terminals run whatever version they were installed with.

use serde::Serialize;
use serde_json::Value;

use super::store::{StoredBeat, Terminal};
use crate::agent::outbox::report::age;
use crate::clock;

/// Heartbeats missed before a terminal is stale.
pub const MISSED_BEATS: i64 = 3;
/// Unsent uses from which a terminal's backlog needs a look.
pub const BACKLOG_ROWS: i64 = 50;
/// Or an unsent use older than this (seconds).
pub const BACKLOG_AGE_S: i64 = 3600;
/// A clock further off than this (seconds) is shown: the platform refuses
/// requests whose timestamp is 5 minutes off.
pub const CLOCK_OFFSET_S: i64 = 60;

/// One reason a terminal needs attention.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Cause {
    /// Stable name, for scripts and tests (`stale`, `scanner`, ...).
    pub kind: &'static str,
    /// 1 is worst.
    pub severity: u8,
    pub zh: String,
    pub en: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScannerRow {
    pub name: String,
    pub state: String,
    pub since: Option<i64>,
    pub since_beijing: Option<String>,
    pub cause: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorRow {
    pub at: i64,
    pub at_beijing: String,
    pub api: String,
    pub code: Option<i64>,
    /// The code's meaning from the reference's table (Chinese, as the
    /// platform writes it).
    pub meaning: Option<String>,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// The enrolment name.
    pub name: String,
    /// `[terminal] id` from its heartbeat.
    pub terminal_id: Option<String>,
    pub version: Option<String>,
    pub peer: Option<String>,
    pub last_beat_at: Option<i64>,
    pub last_beat_beijing: Option<String>,
    pub interval_s: Option<u64>,
    pub stale: bool,
    pub scanners: Vec<ScannerRow>,
    pub his_clients: usize,
    pub unsent: i64,
    pub held: i64,
    pub oldest_unsent_age_s: Option<i64>,
    pub uploads_stopped: Option<String>,
    pub rate_limited_until_beijing: Option<String>,
    pub disk_fault: Option<String>,
    pub clock_offset_s: Option<i64>,
    pub token_revocations: i64,
    /// When a token of the terminal's was last revoked by a newer one.
    pub token_last_revoked_at: Option<i64>,
    pub token_refreshes: i64,
    pub recent_errors: Vec<ErrorRow>,
    /// Worst first; empty when all is well.
    pub attention: Vec<Cause>,
}

impl Row {
    fn worst(&self) -> u8 {
        self.attention
            .iter()
            .map(|c| c.severity)
            .min()
            .unwrap_or(u8::MAX)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fleet {
    pub generated_at: i64,
    pub generated_at_beijing: String,
    pub terminals: usize,
    pub needs_attention: usize,
    pub stale: usize,
    /// Needs attention first (worst cause first), then by name.
    pub rows: Vec<Row>,
}

fn beijing(t: i64) -> String {
    clock::platform_time(t, clock::BEIJING)
}

/// `HH:MM` Beijing time, or the date too when not today.
fn when(t: i64, now: i64) -> String {
    let full = beijing(t);
    if clock::day_number(t, clock::BEIJING) == clock::day_number(now, clock::BEIJING) {
        full.get(11..16).unwrap_or(&full).to_owned()
    } else {
        full.get(..16).unwrap_or(&full).to_owned()
    }
}

fn s(v: &Value, path: &[&str]) -> Option<String> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_str().map(str::to_owned)
}

fn i(v: &Value, path: &[&str]) -> Option<i64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_i64()
}

fn cause(kind: &'static str, severity: u8, zh: String, en: String) -> Cause {
    Cause {
        kind,
        severity,
        zh,
        en,
    }
}

/// A terminal's row from its enrolment and latest heartbeat, at `now`.
pub fn row(t: &Terminal, beat: Option<&StoredBeat>, now: i64) -> Row {
    let mut r = Row {
        name: t.name.clone(),
        terminal_id: None,
        version: None,
        peer: t.last_peer.clone(),
        last_beat_at: None,
        last_beat_beijing: None,
        interval_s: None,
        stale: true,
        scanners: vec![],
        his_clients: 0,
        unsent: 0,
        held: 0,
        oldest_unsent_age_s: None,
        uploads_stopped: None,
        rate_limited_until_beijing: None,
        disk_fault: None,
        clock_offset_s: None,
        token_revocations: 0,
        token_last_revoked_at: None,
        token_refreshes: 0,
        recent_errors: vec![],
        attention: vec![],
    };
    let Some(b) = beat else {
        r.attention.push(cause(
            "never",
            2,
            "从未收到心跳（终端未运行，或未指向本网关）".into(),
            "No heartbeat ever (not running, or not pointed at this gateway)".into(),
        ));
        return r;
    };
    let st = &b.beat.status;
    let interval = b.beat.interval_s.max(1);
    let silent = now - b.received_at;
    r.terminal_id = Some(b.beat.terminal_id.clone()).filter(|x| !x.is_empty());
    r.version = Some(b.beat.version.clone()).filter(|x| !x.is_empty());
    r.peer = Some(b.peer.clone());
    r.last_beat_at = Some(b.received_at);
    r.last_beat_beijing = Some(beijing(b.received_at));
    r.interval_s = Some(interval);
    r.stale = silent > MISSED_BEATS * interval as i64;
    r.clock_offset_s = Some(b.clock_offset_s);
    r.his_clients = st
        .get("hisClients")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    r.unsent =
        i(st, &["outbox", "pending"]).unwrap_or(0) + i(st, &["outbox", "waiting"]).unwrap_or(0);
    r.held = i(st, &["outbox", "held"]).unwrap_or(0);
    // The age when the beat was sent, plus the time since.
    r.oldest_unsent_age_s = i(st, &["outbox", "oldestPendingAgeS"]).map(|a| a + silent.max(0));
    r.uploads_stopped = s(st, &["uploads", "stopped"]);
    r.rate_limited_until_beijing = i(st, &["uploads", "rateLimitedUntil"])
        .filter(|u| *u > now)
        .map(beijing);
    r.disk_fault = s(st, &["outbox", "diskFault"]);
    r.token_revocations = i(st, &["token", "revocations"]).unwrap_or(0);
    r.token_last_revoked_at = i(st, &["token", "lastRevokedAt"]);
    r.token_refreshes = i(st, &["token", "refreshes"]).unwrap_or(0);
    if let Some(m) = st.get("scanners").and_then(Value::as_object) {
        for (name, sc) in m {
            let since = i(sc, &["since"]);
            r.scanners.push(ScannerRow {
                name: name.clone(),
                state: s(sc, &["state"]).unwrap_or_default(),
                since,
                since_beijing: since.map(beijing),
                cause: s(sc, &["cause"]),
            });
        }
    }
    if let Some(errs) = st.get("recentErrors").and_then(Value::as_array) {
        for e in errs.iter().rev() {
            let at = i(e, &["at"]).unwrap_or(0);
            let code = i(e, &["code"]);
            r.recent_errors.push(ErrorRow {
                at,
                at_beijing: beijing(at),
                api: s(e, &["api"]).unwrap_or_default(),
                code,
                meaning: code
                    .and_then(crate::platform::error::describe)
                    .map(str::to_owned),
                what: s(e, &["what"]).unwrap_or_default(),
            });
        }
    }
    assess(&mut r, now, silent);
    r
}

fn assess(r: &mut Row, now: i64, silent: i64) {
    let a = &mut r.attention;
    if r.stale {
        let last = r.last_beat_at.map(|t| when(t, now)).unwrap_or_default();
        a.push(cause(
            "stale",
            1,
            format!("失联：{} 未收到心跳（最后 {last}）", age(silent)),
            format!("No heartbeat for {} (last {last})", age(silent)),
        ));
    }
    for sc in &r.scanners {
        let since = sc.since.map(|t| when(t, now)).unwrap_or_default();
        match sc.state.as_str() {
            "connected" => {}
            "waitingForDevice" => a.push(cause(
                "scanner",
                1,
                format!("扫码枪 {} 未连接，自 {since} 起", sc.name),
                format!("Scanner {} unplugged since {since}", sc.name),
            )),
            "error" => a.push(cause(
                "scanner",
                1,
                format!(
                    "扫码枪 {} 故障：{}",
                    sc.name,
                    sc.cause.as_deref().unwrap_or("")
                ),
                format!(
                    "Scanner {} failed: {}",
                    sc.name,
                    sc.cause.as_deref().unwrap_or("")
                ),
            )),
            other => a.push(cause(
                "scanner",
                2,
                format!("扫码枪 {} 已关闭（{other}）", sc.name),
                format!("Scanner {} is {other}", sc.name),
            )),
        }
    }
    if let Some(why) = &r.uploads_stopped {
        a.push(cause(
            "uploadsStopped",
            1,
            format!("用卡数据上报已停止：{why}"),
            format!("Uploads stopped: {why}"),
        ));
    }
    if let Some(f) = &r.disk_fault {
        a.push(cause(
            "disk",
            1,
            format!("本地磁盘无法写入：{f}"),
            format!("The outbox cannot be written: {f}"),
        ));
    }
    let old = r.oldest_unsent_age_s.filter(|x| *x >= BACKLOG_AGE_S);
    if r.unsent >= BACKLOG_ROWS || old.is_some() {
        let oldest = r
            .oldest_unsent_age_s
            .map(|x| format!("，最早 {}", age(x)))
            .unwrap_or_default();
        let oldest_en = r
            .oldest_unsent_age_s
            .map(|x| format!(", oldest {}", age(x)))
            .unwrap_or_default();
        a.push(cause(
            "backlog",
            2,
            format!("积压 {} 条用卡数据未上报{oldest}", r.unsent),
            format!("{} uses not uploaded{oldest_en}", r.unsent),
        ));
    }
    if let Some(u) = &r.rate_limited_until_beijing {
        a.push(cause(
            "rateLimited",
            3,
            format!("平台调用次数已达上限，{u} 恢复上报"),
            format!("Platform call limit reached; uploads resume {u}"),
        ));
    }
    if r.held > 0 {
        a.push(cause(
            "held",
            2,
            format!("{} 条用卡数据被平台拒绝（需处理）", r.held),
            format!("{} uses refused by the platform (held)", r.held),
        ));
    }
    if let Some(off) = r.clock_offset_s.filter(|o| o.abs() > CLOCK_OFFSET_S) {
        let dir = if off > 0 { "快" } else { "慢" };
        let dir_en = if off > 0 { "fast" } else { "slow" };
        a.push(cause(
            "clock",
            2,
            format!("终端时钟{dir} {}", age(off.abs())),
            format!("Clock {} {dir_en}", age(off.abs())),
        ));
    }
    if let Some(t) = r
        .token_last_revoked_at
        .filter(|t| now - *t < crate::agent::status::REVOCATION_WINDOW_S)
    {
        a.push(cause(
            "token",
            2,
            format!(
                "令牌被撤销 {} 次（最后 {}）：此终端的账号还在别处使用",
                r.token_revocations,
                when(t, now)
            ),
            format!(
                "Token revoked {} time(s), last {}: this terminal's credentials are used elsewhere too",
                r.token_revocations,
                when(t, now)
            ),
        ));
    }
    a.sort_by_key(|c| c.severity);
}

/// The fleet at `now`: every enrolled, unrevoked terminal.
pub fn fleet(terminals: &[Terminal], beats: &[StoredBeat], now: i64) -> Fleet {
    let mut rows: Vec<Row> = terminals
        .iter()
        .filter(|t| t.revoked_at.is_none())
        .map(|t| row(t, beats.iter().find(|b| b.terminal == t.name), now))
        .collect();
    rows.sort_by(|a, b| a.worst().cmp(&b.worst()).then_with(|| a.name.cmp(&b.name)));
    Fleet {
        generated_at: now,
        generated_at_beijing: beijing(now),
        terminals: rows.len(),
        needs_attention: rows.iter().filter(|r| !r.attention.is_empty()).count(),
        stale: rows.iter().filter(|r| r.stale).count(),
        rows,
    }
}

/// `ehc-agent gateway fleet`: one line per terminal, attention first.
pub fn table(f: &Fleet) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} terminal(s), {} need attention, {} stale; {} (Beijing time)",
        f.terminals, f.needs_attention, f.stale, f.generated_at_beijing
    );
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<6} {:>7} {:>6} {:>4}  NEEDS ATTENTION",
        "TERMINAL", "LAST", "SCAN", "UNSENT", "HELD", "HIS"
    );
    for r in &f.rows {
        let last = r
            .last_beat_at
            .map(|t| when(t, f.generated_at))
            .unwrap_or_else(|| "never".into());
        let up = r.scanners.iter().filter(|s| s.state == "connected").count();
        let causes = if r.attention.is_empty() {
            "ok".to_owned()
        } else {
            r.attention
                .iter()
                .map(|c| c.en.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<6} {:>7} {:>6} {:>4}  {}",
            r.name,
            last,
            format!("{up}/{}", r.scanners.len()),
            r.unsent,
            r.held,
            r.his_clients,
            causes
        );
    }
    out
}

/// Fill the per-terminal Prometheus series (terminals that left the fleet
/// leave the series).
pub fn fill_metrics(f: &Fleet) {
    let m = crate::metrics::get();
    let fams = [
        &m.fleet_up,
        &m.fleet_attention,
        &m.fleet_outbox_unsent,
        &m.fleet_outbox_oldest_age,
        &m.fleet_scanners_down,
        &m.fleet_uploads_stopped,
        &m.fleet_clock_offset,
        &m.fleet_last_heartbeat,
    ];
    for fam in fams {
        fam.clear();
    }
    for r in &f.rows {
        let l = vec![("terminal", r.name.clone())];
        m.fleet_up.get_or_create(&l).set(i64::from(!r.stale));
        m.fleet_attention
            .get_or_create(&l)
            .set(r.attention.len() as i64);
        m.fleet_outbox_unsent.get_or_create(&l).set(r.unsent);
        m.fleet_outbox_oldest_age
            .get_or_create(&l)
            .set(r.oldest_unsent_age_s.unwrap_or(0));
        m.fleet_scanners_down
            .get_or_create(&l)
            .set(r.scanners.iter().filter(|s| s.state != "connected").count() as i64);
        m.fleet_uploads_stopped
            .get_or_create(&l)
            .set(i64::from(r.uploads_stopped.is_some()));
        m.fleet_clock_offset
            .get_or_create(&l)
            .set(r.clock_offset_s.unwrap_or(0));
        m.fleet_last_heartbeat
            .get_or_create(&l)
            .set(r.last_beat_at.unwrap_or(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::heartbeat::Beat;
    use serde_json::json;

    fn t(name: &str) -> Terminal {
        Terminal {
            name: name.into(),
            app_id: format!("gw-{name}"),
            secret: "s".into(),
            created_at: 0,
            revoked_at: None,
            last_seen: None,
            last_peer: None,
            allow: vec![],
        }
    }

    fn beat(name: &str, at: i64, status: Value) -> StoredBeat {
        StoredBeat {
            terminal: name.into(),
            received_at: at,
            clock_offset_s: 0,
            peer: "10.0.0.7".into(),
            beat: Beat {
                version: "0.1.0".into(),
                terminal_id: name.to_uppercase(),
                interval_s: 30,
                status,
            },
        }
    }

    fn healthy() -> Value {
        json!({"scanners": {"s1": {"state": "connected", "since": 0}},
               "hisClients": ["uid 1000"], "outbox": {"pending": 0, "waiting": 0, "held": 0},
               "uploads": {}, "token": {"revocations": 0}})
    }

    #[test]
    fn attention_first_worst_first_with_causes_in_words() {
        let now = 1_764_640_000;
        let names = [
            "a-ok",
            "b-unplugged",
            "c-backlog",
            "d-stale",
            "e-stopped",
            "f-never",
        ];
        let ts: Vec<Terminal> = names.iter().map(|n| t(n)).collect();
        let mut unplugged = healthy();
        unplugged["scanners"]["s1"] = json!({"state": "waitingForDevice", "since": now - 600});
        let mut backlog = healthy();
        backlog["outbox"] =
            json!({"pending": 300, "waiting": 40, "held": 0, "oldestPendingAgeS": 10800});
        let mut stopped = healthy();
        stopped["uploads"] = json!({"stopped": "result code 21006 (签名错误)"});
        stopped["recentErrors"] = json!([{"at": now - 5, "api": "reportHISData", "code": 21006, "what": "configuration"}]);
        let beats = vec![
            beat("a-ok", now - 10, healthy()),
            beat("b-unplugged", now - 10, unplugged),
            beat("c-backlog", now - 10, backlog),
            beat("d-stale", now - 200, healthy()),
            beat("e-stopped", now - 10, stopped),
        ];
        let f = fleet(&ts, &beats, now);
        let order: Vec<&str> = f.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            order,
            [
                "b-unplugged",
                "d-stale",
                "e-stopped",
                "c-backlog",
                "f-never",
                "a-ok"
            ]
        );
        assert_eq!(f.needs_attention, 5);
        let by = |n: &str| f.rows.iter().find(|r| r.name == n).unwrap();
        assert!(by("b-unplugged").attention[0]
            .en
            .contains("Scanner s1 unplugged since"));
        assert!(by("b-unplugged").attention[0].zh.contains("未连接"));
        assert!(
            by("c-backlog").attention[0]
                .en
                .contains("340 uses not uploaded, oldest 3 h"),
            "{:?}",
            by("c-backlog").attention
        );
        assert!(by("d-stale").stale && by("d-stale").attention[0].kind == "stale");
        assert!(by("e-stopped").attention[0]
            .en
            .starts_with("Uploads stopped: result code 21006"));
        let e = &by("e-stopped").recent_errors[0];
        assert_eq!(e.code, Some(21006));
        assert!(e.meaning.as_deref().unwrap_or("").contains("签名"), "{e:?}");
        assert!(by("a-ok").attention.is_empty() && !by("a-ok").stale);
        let text = table(&f);
        assert!(
            text.lines().nth(2).unwrap().starts_with("b-unplugged"),
            "{text}"
        );
        assert!(text.contains("a-ok") && text.contains(" ok"), "{text}");
    }

    #[test]
    fn a_beat_from_a_future_agent_with_odd_fields_still_makes_a_row() {
        let now = 1_764_640_000;
        let b = beat(
            "x",
            now,
            json!({"scanners": "not a map", "outbox": {"pending": "many"}, "new": [1, 2]}),
        );
        let r = row(&t("x"), Some(&b), now);
        assert!(!r.stale);
        assert_eq!(r.unsent, 0);
        assert!(r.scanners.is_empty());
    }
}
