//! The server side of the platform's protocol, shared by the two programs
//! that *answer* it: the simulator (`ehc-agent sim`) and the hospital
//! gateway (`ehc-agent gateway`, DESIGN §5a). One copy, so a terminal cannot
//! tell them from the platform by how they check a request.
//!
//! Order of checks, as the platform applies them (outer to inner): body size
//! (20004), JSON envelope (20001, 10003, 10002), requestId (20001, 10037),
//! timestamp skew (20002) — [`parse_envelope`]; then for getAppToken the
//! caller's appId and hospital, for the other APIs the token
//! ([`TokenTable::check`]: 21001 none, 21004 unknown or revoked or of
//! another hospital, 21003 expired); then the signature ([`Envelope::verify`],
//! 21006). What follows (replay, caps, the API's own rules) is the server's.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{error, sign};

/// The platform's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub code: i64,
    pub msg: String,
    pub request_id: String,
    pub rsp: Option<Value>,
}

impl Answer {
    /// A refusal with the reference's text for `code`.
    pub fn err(code: i64, request_id: &str) -> Self {
        Answer {
            code,
            msg: error::describe(code).unwrap_or("错误").to_owned(),
            request_id: request_id.to_owned(),
            rsp: None,
        }
    }

    /// A refusal with the reference's text and a detail.
    pub fn err_msg(code: i64, request_id: &str, detail: &str) -> Self {
        let base = error::describe(code).unwrap_or("错误");
        Answer {
            code,
            msg: format!("{base}: {detail}"),
            request_id: request_id.to_owned(),
            rsp: None,
        }
    }

    pub fn ok(request_id: &str, rsp: Value) -> Self {
        Answer {
            code: 0,
            msg: "成功".into(),
            request_id: request_id.to_owned(),
            rsp: Some(rsp),
        }
    }

    /// The JSON body of the answer.
    pub fn to_json(&self) -> Value {
        let mut top = Map::new();
        top.insert(
            "commonOut".into(),
            json!({"requestId": self.request_id, "resultCode": self.code, "errMsg": self.msg}),
        );
        top.insert("rsp".into(), self.rsp.clone().unwrap_or(Value::Null));
        Value::Object(top)
    }
}

/// A request that passed the envelope checks.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub common: Map<String, Value>,
    pub req: Map<String, Value>,
    pub request_id: String,
    pub hospital_id: String,
    pub app_token: String,
    pub timestamp: i64,
    pub sign: String,
}

impl Envelope {
    /// 21006 unless signed with `secret`.
    pub fn verify(&self, secret: &str) -> Result<(), Answer> {
        if sign::verify(&self.common, Some(&self.req), secret, &self.sign) {
            Ok(())
        } else {
            Err(Answer::err(21006, &self.request_id))
        }
    }

    /// `req.appId` of a getAppToken request (10042 when absent).
    pub fn app_id(&self) -> Result<&str, Answer> {
        match self.req.get("appId").and_then(Value::as_str) {
            None | Some("") => Err(Answer::err_msg(10042, &self.request_id, "req.appId")),
            Some(a) => Ok(a),
        }
    }
}

/// Check a request body up to and including the timestamp's skew against
/// `now` (the real clock: a client cannot move it).
pub fn parse_envelope(
    body: &[u8],
    max_body: usize,
    now: i64,
    max_skew_s: u64,
) -> Result<Envelope, Answer> {
    if body.len() > max_body {
        return Err(Answer::err(20004, ""));
    }
    let Ok(Value::Object(mut top)) = serde_json::from_slice::<Value>(body) else {
        return Err(Answer::err_msg(
            20001,
            "",
            "body is not a JSON object (UTF-8)",
        ));
    };
    let common = match top.remove("commonIn") {
        None | Some(Value::Null) => return Err(Answer::err(10003, "")),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(Answer::err_msg(20001, "", "commonIn is not an object")),
    };
    let rid = match common.get("requestId") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(Answer::err_msg(
                20001,
                "",
                "commonIn.requestId missing or not a string",
            ))
        }
    };
    if rid.len() > 512 {
        return Err(Answer::err(10037, ""));
    }
    if !rid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(Answer::err_msg(
            20001,
            "",
            "commonIn.requestId has characters outside [A-Za-z0-9-]",
        ));
    }
    let req = match top.remove("req") {
        None | Some(Value::Null) => return Err(Answer::err(10002, &rid)),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(Answer::err_msg(20001, &rid, "req is not an object")),
    };
    for k in ["appToken", "hospitalId", "timestamp", "sign"] {
        match common.get(k) {
            Some(Value::String(_)) | None => {}
            Some(_) => {
                return Err(Answer::err_msg(
                    20001,
                    &rid,
                    &format!("commonIn.{k} is not a string"),
                ))
            }
        }
    }
    let s = |k: &str| {
        common
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let ts_text = s("timestamp");
    let timestamp = match ts_text.parse::<i64>() {
        Ok(t) if !ts_text.is_empty() => t,
        _ => {
            return Err(Answer::err_msg(
                20001,
                &rid,
                "commonIn.timestamp must be Unix seconds as a string",
            ))
        }
    };
    if (timestamp - now).unsigned_abs() > max_skew_s {
        return Err(Answer::err_msg(
            20002,
            &rid,
            "commonIn.timestamp too far from the platform's clock",
        ));
    }
    Ok(Envelope {
        hospital_id: s("hospitalId"),
        app_token: s("appToken"),
        sign: s("sign"),
        timestamp,
        request_id: rid,
        common,
        req,
    })
}

#[derive(Debug, Clone)]
struct TokenRec {
    holder: String,
    hospital_id: String,
    expires_at: i64,
    revoked: bool,
}

/// Tokens handed out by a server, each bound to a holder (the simulator's
/// one appId, or a gateway's terminal) and a hospital. A new token for a
/// holder revokes that holder's earlier ones, and only those (reference
/// 3.2.1: "a second call invalidates the first").
#[derive(Debug, Default, Clone)]
pub struct TokenTable {
    tokens: HashMap<String, TokenRec>,
    issued: u64,
}

impl TokenTable {
    /// Issue `token` to `holder`, valid until `expires_at`.
    pub fn issue(&mut self, token: String, holder: &str, hospital_id: &str, expires_at: i64) {
        self.revoke_holder(holder);
        // Expired and revoked tokens are kept only while they can still be
        // presented meaningfully (their answer is 21004 either way).
        self.tokens
            .retain(|_, t| !t.revoked || t.expires_at > expires_at - 86_400);
        self.tokens.insert(
            token,
            TokenRec {
                holder: holder.to_owned(),
                hospital_id: hospital_id.to_owned(),
                expires_at,
                revoked: false,
            },
        );
        self.issued += 1;
    }

    pub fn revoke_holder(&mut self, holder: &str) {
        for t in self.tokens.values_mut().filter(|t| t.holder == holder) {
            t.revoked = true;
        }
    }

    pub fn revoke_all(&mut self) {
        for t in self.tokens.values_mut() {
            t.revoked = true;
        }
    }

    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// The current (unrevoked) token of any holder and its expiry.
    pub fn current(&self) -> Option<(String, i64)> {
        self.tokens
            .iter()
            .find(|(_, t)| !t.revoked)
            .map(|(k, t)| (k.clone(), t.expires_at))
    }

    /// The holder of the envelope's token (see [`check_token`]).
    pub fn check(&self, env: &Envelope, now: i64) -> Result<&str, Answer> {
        let found = self.tokens.get(&env.app_token).map(|t| TokenView {
            holder: &t.holder,
            hospital_id: &t.hospital_id,
            expires_at: t.expires_at,
            revoked: t.revoked,
        });
        check_token(env, found, now)
    }
}

/// A token as a server found it, wherever it keeps them.
#[derive(Debug, Clone, Copy)]
pub struct TokenView<'a> {
    pub holder: &'a str,
    pub hospital_id: &'a str,
    pub expires_at: i64,
    pub revoked: bool,
}

/// The platform's answer to the envelope's token, `found` being what the
/// server knows of it: 21001 none presented, 21004 unknown, revoked or of
/// another hospital, 21003 expired at `now`; else its holder.
pub fn check_token<'a>(
    env: &Envelope,
    found: Option<TokenView<'a>>,
    now: i64,
) -> Result<&'a str, Answer> {
    let rid = &env.request_id;
    if env.app_token.is_empty() {
        return Err(Answer::err(21001, rid));
    }
    match found {
        None => Err(Answer::err(21004, rid)),
        Some(t) if t.revoked => Err(Answer::err(21004, rid)),
        Some(t) if now >= t.expires_at => Err(Answer::err(21003, rid)),
        Some(t) if t.hospital_id != env.hospital_id => Err(Answer::err(21004, rid)),
        Some(t) => Ok(t.holder),
    }
}

/// A fresh token: 32 upper-case hex characters.
pub fn new_token(rng: &mut impl rand::Rng) -> String {
    let b: [u8; 16] = rng.random();
    b.iter().map(|x| format!("{x:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(token: &str, hospital: &str) -> Envelope {
        Envelope {
            common: Map::new(),
            req: Map::new(),
            request_id: "R".into(),
            hospital_id: hospital.into(),
            app_token: token.into(),
            timestamp: 0,
            sign: String::new(),
        }
    }

    #[test]
    fn a_new_token_revokes_only_its_holders_old_one() {
        let mut t = TokenTable::default();
        t.issue("A1".into(), "a", "H", 100);
        t.issue("B1".into(), "b", "H", 100);
        t.issue("A2".into(), "a", "H", 100);
        assert_eq!(t.check(&env("A1", "H"), 0).unwrap_err().code, 21004);
        assert_eq!(t.check(&env("A2", "H"), 0).unwrap(), "a");
        assert_eq!(t.check(&env("B1", "H"), 0).unwrap(), "b");
        assert_eq!(t.check(&env("B1", "H"), 100).unwrap_err().code, 21003);
        assert_eq!(t.check(&env("B1", "X"), 0).unwrap_err().code, 21004);
        assert_eq!(t.check(&env("", "H"), 0).unwrap_err().code, 21001);
    }

    #[test]
    fn envelope_checks_in_order() {
        let now = 1_000_000;
        let e = |b: &str| {
            parse_envelope(b.as_bytes(), 1 << 20, now, 300)
                .unwrap_err()
                .code
        };
        assert_eq!(e("[]"), 20001);
        assert_eq!(e("{}"), 10003);
        assert_eq!(e(r#"{"commonIn":{}}"#), 20001);
        assert_eq!(e(r#"{"commonIn":{"requestId":"R"}}"#), 10002);
        assert_eq!(
            e(r#"{"commonIn":{"requestId":"R","timestamp":"1"},"req":{}}"#),
            20002
        );
        let ok = parse_envelope(
            format!(r#"{{"commonIn":{{"requestId":"R","timestamp":"{now}","hospitalId":"H"}},"req":{{"appId":"x"}}}}"#).as_bytes(),
            1 << 20,
            now,
            300,
        )
        .unwrap();
        assert_eq!((ok.hospital_id.as_str(), ok.app_id().unwrap()), ("H", "x"));
    }
}
