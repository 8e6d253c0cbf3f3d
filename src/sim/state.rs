//! The simulator's memory and rules: tokens, requestIds, cards, dynamic
//! codes, received reports and binds, call counts. [`SimState::answer`] takes
//! one request body and returns the platform's answer; it does no I/O, so
//! every rule is testable without a socket.
//!
//! Order of checks, as the platform applies them (outer to inner): body size
//! (20004), JSON envelope (20001, 10003, 10002), requestId (20001, 10037),
//! timestamp skew (20002), then for getAppToken appId (21002), hospital
//! (21005), signature (21006); for the other APIs token presence (21001),
//! token validity (21004 revoked or unknown, 21003 expired), token's hospital
//! (21004), signature (21006); then replay (10054), daily cap (10034), and the
//! API's own rules.
//!
//! A requestId is remembered once it has been **answered with success**. So
//! a request the platform rejected can be retried with the same requestId,
//! and 10054 on a retry really means "already received" (DESIGN §5).
//!
//! Two clocks: the real one checks `timestamp` skew (a client cannot move
//! it); the simulated one (real + `clock_offset`, moved by `/_sim/clock`)
//! expires tokens and dynamic codes and decides the Beijing day of the cap.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use super::config::{SimCard, SimConfig};
use super::faults::Faults;
use crate::clock;
use crate::code::{self, Code};
use crate::platform::api::{
    Api, BindCardRelation, GetAppToken, GetHealthCardByQrCode, ReportHisData, ReportReq,
    VerifyQrCode,
};
use crate::platform::{error, tables};

pub use crate::platform::serve::Answer;
use crate::platform::serve::{self, TokenTable};

/// The simulator's one token holder: its appId.
const HOLDER: &str = "app";

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportRec {
    pub request_id: String,
    #[serde(flatten)]
    pub req: ReportReq,
    pub received_at: i64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BindRec {
    pub request_id: String,
    pub patid: String,
    pub qr_code_text: String,
    pub card: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyRec {
    pub request_id: String,
    pub card: usize,
    pub medical_step: String,
    pub terminal_id: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CardView {
    pub index: usize,
    pub card_id: String,
    pub static_code: String,
    pub gender: String,
    pub birthday: String,
}

pub struct SimState {
    cfg: SimConfig,
    pub faults: Faults,
    pub rng: StdRng,
    pub clock_offset: i64,
    card_ids: Vec<String>,
    patids: Vec<String>,
    tokens: TokenTable,
    answered: HashSet<String>,
    pub duplicates: u64,
    pub reports: Vec<ReportRec>,
    pub binds: Vec<BindRec>,
    pub verifications: Vec<VerifyRec>,
    /// api → result code (or `http_5xx`, `lost`) → count.
    pub calls: BTreeMap<String, BTreeMap<String, u64>>,
    day_counts: HashMap<(String, i64), u64>,
    dynamic: HashMap<String, (usize, i64)>,
}

fn derive_card_id(i: usize, c: &SimCard) -> String {
    let mut h = Sha256::new();
    h.update(format!("ehc-sim-card/{i}/{}/{}", c.name, c.id_number).as_bytes());
    hex_upper(&h.finalize())
}

fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

impl SimState {
    pub fn new(cfg: SimConfig) -> Self {
        let card_ids = cfg
            .cards
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.card_id
                    .clone()
                    .map(|s| s.to_uppercase())
                    .unwrap_or_else(|| derive_card_id(i, c))
            })
            .collect();
        let patids = cfg.cards.iter().map(|c| c.patid.clone()).collect();
        let rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let faults = cfg.faults.clone();
        SimState {
            cfg,
            faults,
            rng,
            clock_offset: 0,
            card_ids,
            patids,
            tokens: TokenTable::default(),
            answered: HashSet::new(),
            duplicates: 0,
            reports: Vec::new(),
            binds: Vec::new(),
            verifications: Vec::new(),
            calls: BTreeMap::new(),
            day_counts: HashMap::new(),
            dynamic: HashMap::new(),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    pub fn sim_now(&self, real_now: i64) -> i64 {
        real_now + self.clock_offset
    }

    pub fn cards(&self) -> Vec<CardView> {
        self.cfg
            .cards
            .iter()
            .enumerate()
            .map(|(i, c)| CardView {
                index: i,
                card_id: self.card_ids[i].clone(),
                static_code: format!("{}:1", self.card_ids[i]),
                gender: c.gender.clone(),
                birthday: c.birthday.clone(),
            })
            .collect()
    }

    pub fn static_code(&self, card: usize) -> Option<String> {
        self.card_ids.get(card).map(|id| format!("{id}:1"))
    }

    /// A fresh dynamic code for `card`, valid `ttl` seconds of simulated time.
    pub fn mint(&mut self, card: usize, ttl: Option<u64>, real_now: i64) -> Option<(String, i64)> {
        let id = self.card_ids.get(card)?.clone();
        let tok: [u8; 16] = self.rng.random();
        let tok = hex_upper(&tok);
        let expires = self.sim_now(real_now) + ttl.unwrap_or(self.cfg.dynamic_ttl_s) as i64;
        self.dynamic.insert(tok.clone(), (card, expires));
        Some((
            format!("{id}:0:{tok}::{}", self.cfg.hospital_ids[0]),
            expires,
        ))
    }

    /// The current (newest, unrevoked) token and its expiry.
    pub fn current_token(&self) -> Option<(String, i64)> {
        self.tokens.current()
    }

    pub fn tokens_issued(&self) -> u64 {
        self.tokens.issued()
    }

    pub fn revoke_all(&mut self) {
        self.tokens.revoke_all();
    }

    /// Forget received records and counters (not cards, tokens or faults).
    pub fn reset_records(&mut self) {
        self.reports.clear();
        self.binds.clear();
        self.verifications.clear();
        self.calls.clear();
        self.duplicates = 0;
    }

    /// Count an outcome in the per-API table.
    pub fn count(&mut self, api: &str, outcome: &str) {
        *self
            .calls
            .entry(api.to_owned())
            .or_default()
            .entry(outcome.to_owned())
            .or_default() += 1;
    }

    /// The answer for a fault-forced result code, echoing the request's
    /// requestId when it has one.
    pub fn forced_answer(&mut self, api: &str, code: i64, body: &[u8]) -> Answer {
        let rid = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                v.pointer("/commonIn/requestId")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        self.count(api, &code.to_string());
        let mut a = Answer::err(code, &rid);
        a.msg = format!("{} (simulated fault)", a.msg);
        a
    }

    /// Answer one request body for `api`. `real_now` is the real Unix time.
    pub fn answer(&mut self, api: &str, body: &[u8], real_now: i64) -> Answer {
        let a = self.answer_inner(api, body, real_now);
        self.count(api, &a.code.to_string());
        a
    }

    fn answer_inner(&mut self, api: &str, body: &[u8], real_now: i64) -> Answer {
        let env =
            match serve::parse_envelope(body, self.cfg.max_body, real_now, self.cfg.max_skew_s) {
                Ok(e) => e,
                Err(a) => return a,
            };
        let sim_now = self.sim_now(real_now);
        let rid = env.request_id.clone();
        let hospital = env.hospital_id.clone();
        let req = env.req.clone();
        if api == GetAppToken::NAME {
            match env.app_id() {
                Err(a) => return a,
                Ok(a) if a != self.cfg.app_id => return Answer::err(21002, &rid),
                Ok(_) => {}
            }
            if !self.cfg.hospital_ids.contains(&hospital) {
                return Answer::err(21005, &rid);
            }
        } else if let Err(a) = self.tokens.check(&env, sim_now) {
            return a;
        }
        if let Err(a) = env.verify(&self.cfg.app_secret) {
            return a;
        }
        if self.answered.contains(&rid) {
            self.duplicates += 1;
            return Answer::err(error::DUPLICATE_REQUEST, &rid);
        }
        if let Some(cap) = self.cfg.daily_cap {
            let day = clock::day_number(sim_now, clock::BEIJING);
            let n = self.day_counts.entry((api.to_owned(), day)).or_default();
            *n += 1;
            if *n > cap {
                return Answer::err(10034, &rid);
            }
        }
        let answer = match api {
            GetAppToken::NAME => self.get_app_token(&rid, &hospital, sim_now),
            GetHealthCardByQrCode::NAME => self.get_card(&rid, &req, sim_now),
            VerifyQrCode::NAME => self.verify_qr(&rid, &req, sim_now),
            ReportHisData::NAME => self.report(&rid, &req, &hospital, real_now),
            BindCardRelation::NAME => self.bind(&rid, &req, sim_now),
            _ => Answer::err(20002, &rid),
        };
        if answer.code == 0 {
            self.answered.insert(rid);
        }
        answer
    }

    fn get_app_token(&mut self, rid: &str, hospital: &str, sim_now: i64) -> Answer {
        // A new token revokes every earlier one (reference 3.2.1).
        let tok = serve::new_token(&mut self.rng);
        self.tokens.issue(
            tok.clone(),
            HOLDER,
            hospital,
            sim_now + self.cfg.token_ttl_s as i64,
        );
        Answer::ok(
            rid,
            json!({"appToken": tok, "expiresIn": self.cfg.token_ttl_s}),
        )
    }

    /// Resolve a QR text to a card: static or unexpired dynamic.
    fn resolve(
        &self,
        text: &str,
        sim_now: i64,
        allow_static: bool,
    ) -> Result<(usize, bool), (i64, &'static str)> {
        let Ok(scanned) = code::classify(text) else {
            return Err((10020, "unreadable code"));
        };
        match scanned.code {
            Code::Static { card_id } if allow_static => self
                .card_ids
                .iter()
                .position(|c| *c == card_id)
                .map(|i| (i, false))
                .ok_or((-10019, "no such card")),
            Code::Dynamic { card_id, token, .. } => {
                let known = self.card_ids.iter().position(|c| *c == card_id);
                match (known, self.dynamic.get(&token)) {
                    (None, _) => Err((-10019, "no such card")),
                    (Some(i), Some((card, exp))) if *card == i && sim_now < *exp => Ok((i, true)),
                    (Some(_), Some((card, _))) if self.card_ids[*card] == card_id => {
                        Err((10020, "dynamic code expired"))
                    }
                    (Some(_), _) => Err((10020, "dynamic code not issued")),
                }
            }
            _ => Err((10020, "not a health card code")),
        }
    }

    fn phid(&self, i: usize) -> String {
        let mut h = Sha256::new();
        h.update(self.card_ids[i].as_bytes());
        format!("SIM{}", &hex_upper(&h.finalize())[..24])
    }

    fn get_card(&mut self, rid: &str, req: &Map<String, Value>, sim_now: i64) -> Answer {
        let text = match req.get("qrCodeText").and_then(Value::as_str) {
            None | Some("") => return Answer::err(10018, rid),
            Some(t) => t.to_owned(),
        };
        let (i, dynamic) = match self.resolve(&text, sim_now, true) {
            Ok(r) => r,
            Err((code, why)) => return Answer::err_msg(code, rid, why),
        };
        let c = &self.cfg.cards[i];
        let admin_ext = json!({
            "qr_code": text, "ecardId": self.card_ids[i], "main_index": self.phid(i),
            "id_type": tables::card_type_name(&c.id_type).unwrap_or(""), "id_number": c.id_number,
            "name": c.name, "sex": c.gender, "birthday": c.birthday, "telephone": c.phone,
            "nation": c.nation, "unit": "null", "address": c.address,
        })
        .to_string();
        Answer::ok(
            rid,
            json!({"card": {
                "qrCodeText": text, "name": c.name, "gender": c.gender, "nation": c.nation,
                "birthday": c.birthday, "idNumber": c.id_number, "idType": c.id_type,
                "address": c.address, "phone1": c.phone, "phone2": "", "phid": self.phid(i),
                "patid": self.patids[i],
                "healthCardId": if dynamic { self.card_ids[i].clone() } else { String::new() },
                "adminExt": admin_ext,
            }}),
        )
    }

    fn verify_qr(&mut self, rid: &str, req: &Map<String, Value>, sim_now: i64) -> Answer {
        let s = |k: &str| {
            req.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let text = s("qrCodeText");
        if text.is_empty() {
            return Answer::err(10018, rid);
        }
        for k in [
            "terminalId",
            "time",
            "medicalStep",
            "useCityCode",
            "useCityName",
            "hospitalCode",
            "hospitalName",
        ] {
            if s(k).is_empty() {
                return Answer::err_msg(10042, rid, &format!("req.{k} is required"));
            }
        }
        if clock::parse_platform_time(&s("time"), clock::BEIJING).is_none() {
            return Answer::err_msg(10042, rid, "req.time must be yyyy-MM-dd HH:mm:ss");
        }
        if tables::scene_name(&s("medicalStep")).is_none() {
            return Answer::err_msg(10042, rid, "req.medicalStep is not in table 3.3.1");
        }
        if let Some(ch) = req.get("useChannel").and_then(Value::as_str) {
            if tables::channel_name(ch).is_none() {
                return Answer::err_msg(10042, rid, "req.useChannel is not in table 3.3.3");
            }
        }
        let i = match self.resolve(&text, sim_now, false) {
            Ok((i, _)) => i,
            Err((code, why)) => return Answer::err_msg(code, rid, why),
        };
        self.verifications.push(VerifyRec {
            request_id: rid.to_owned(),
            card: i,
            medical_step: s("medicalStep"),
            terminal_id: s("terminalId"),
        });
        let c = &self.cfg.cards[i];
        Answer::ok(
            rid,
            json!({
                "address": c.address, "birthday": c.birthday, "gender": c.gender,
                "healthCardId": self.card_ids[i], "idNumber": c.id_number, "idType": c.id_type,
                "name": c.name, "nation": c.nation, "phid": self.phid(i), "phone": c.phone,
            }),
        )
    }

    fn report(
        &mut self,
        rid: &str,
        req: &Map<String, Value>,
        hospital: &str,
        real_now: i64,
    ) -> Answer {
        let r: ReportReq = match serde_json::from_value(Value::Object(req.clone())) {
            Ok(r) => r,
            Err(e) => return Answer::err_msg(10042, rid, &e.to_string()),
        };
        if r.hospital_id != hospital {
            return Answer::err_msg(
                21005,
                rid,
                "req.hospitalId differs from commonIn.hospitalId",
            );
        }
        if clock::parse_platform_time(&r.time, clock::BEIJING).is_none() {
            return Answer::err_msg(10042, rid, "req.time must be yyyy-MM-dd HH:mm:ss");
        }
        if tables::scene_name(&r.scene).is_none() {
            return Answer::err_msg(10042, rid, "req.scene is not in table 3.3.1");
        }
        if tables::card_type_name(&r.card_type).is_none() {
            return Answer::err_msg(10042, rid, "req.cardType is not in table 3.3.2");
        }
        if tables::channel_name(&r.card_channel).is_none() {
            return Answer::err_msg(10042, rid, "req.cardChannel is not in table 3.3.3");
        }
        let present = |o: &Option<String>| o.as_deref().is_some_and(|s| !s.is_empty());
        if r.card_type == tables::CARD_TYPE_HEALTH_CARD {
            if !present(&r.qr_code_text) {
                return Answer::err(10018, rid);
            }
        } else {
            if !present(&r.name) {
                return Answer::err(10013, rid);
            }
            if !present(&r.id_card_number) {
                return Answer::err(10014, rid);
            }
        }
        if tables::scene_needs_department(&r.scene) && !present(&r.department) {
            return Answer::err_msg(10042, rid, "req.department is required for this scene");
        }
        self.reports.push(ReportRec {
            request_id: rid.to_owned(),
            req: r,
            received_at: real_now,
        });
        Answer::ok(rid, json!({"none": ""}))
    }

    fn bind(&mut self, rid: &str, req: &Map<String, Value>, sim_now: i64) -> Answer {
        let s = |k: &str| {
            req.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (patid, text) = (s("patid"), s("qrCodeText"));
        if patid.is_empty() {
            return Answer::err(10033, rid);
        }
        if text.is_empty() {
            return Answer::err(10018, rid);
        }
        let i = match self.resolve(&text, sim_now, true) {
            Ok((i, _)) => i,
            Err((code, why)) => return Answer::err_msg(code, rid, why),
        };
        self.patids[i] = patid.clone();
        self.binds.push(BindRec {
            request_id: rid.to_owned(),
            patid,
            qr_code_text: text,
            card: i,
        });
        Answer::ok(rid, json!({"result": true}))
    }

    /// Reports de-duplicated by requestId (a lost answer's retry is counted
    /// once), as the platform's statistics would see them.
    pub fn unique_reports(&self) -> Vec<&ReportRec> {
        let mut seen = HashSet::new();
        self.reports
            .iter()
            .filter(|r| seen.insert(r.request_id.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn envelope(st: &SimState, token: &str, req: Value, rid: &str) -> Vec<u8> {
        let req = req.as_object().unwrap().clone();
        let mut common = Map::new();
        common.insert("appToken".into(), token.into());
        common.insert("requestId".into(), rid.into());
        common.insert("hospitalId".into(), "10086".into());
        common.insert("timestamp".into(), NOW.to_string().into());
        let s = crate::platform::sign::sign(&common, Some(&req), &st.config().app_secret);
        common.insert("sign".into(), s.into());
        serde_json::to_vec(&json!({"commonIn": common, "req": req})).unwrap()
    }

    fn token(st: &mut SimState, rid: &str) -> String {
        let app = st.config().app_id.clone();
        let body = envelope(st, "", json!({"appId": app}), rid);
        let a = st.answer("getAppToken", &body, NOW);
        assert_eq!(a.code, 0, "{a:?}");
        a.rsp.unwrap()["appToken"].as_str().unwrap().to_owned()
    }

    #[test]
    fn token_lifecycle() {
        let mut st = SimState::new(SimConfig::default());
        let t1 = token(&mut st, "R1");
        let code = st.static_code(0).unwrap();
        let q =
            |st: &SimState, t: &str, rid: &str| envelope(st, t, json!({"qrCodeText": code}), rid);
        assert_eq!(
            st.answer("getHealthCardByQRCode", &q(&st, &t1, "R2"), NOW)
                .code,
            0
        );
        let t2 = token(&mut st, "R3");
        assert_eq!(
            st.answer("getHealthCardByQRCode", &q(&st, &t1, "R4"), NOW)
                .code,
            21004
        );
        assert_eq!(
            st.answer("getHealthCardByQRCode", &q(&st, &t2, "R4"), NOW)
                .code,
            0
        );
        assert_eq!(
            st.answer("getHealthCardByQRCode", &q(&st, "", "R5"), NOW)
                .code,
            21001
        );
        st.clock_offset = 7200;
        assert_eq!(
            st.answer("getHealthCardByQRCode", &q(&st, &t2, "R6"), NOW)
                .code,
            21003
        );
        assert_eq!(st.tokens_issued(), 2);
    }

    #[test]
    fn envelope_errors() {
        let mut st = SimState::new(SimConfig::default());
        assert_eq!(st.answer("reportHISData", b"\xff\xfe", NOW).code, 20001);
        assert_eq!(st.answer("reportHISData", b"{}", NOW).code, 10003);
        assert_eq!(
            st.answer("reportHISData", br#"{"commonIn":{"requestId":"A"}}"#, NOW)
                .code,
            10002
        );
        let deep = "[".repeat(100_000);
        assert_eq!(st.answer("reportHISData", deep.as_bytes(), NOW).code, 20001);
        let big = vec![b' '; (1 << 20) + 1];
        assert_eq!(st.answer("reportHISData", &big, NOW).code, 20004);
    }
}
