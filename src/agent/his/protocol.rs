//! The HIS protocol's messages (DESIGN §4, `docs/his-protocol.md`):
//! newline-delimited JSON objects, camelCase, tagged by `type`.
//!
//! Incoming lines are parsed leniently where the protocol says so (unknown
//! fields ignored) and strictly where a mistake would change what is
//! reported (a `use` needs its `scanId`; scene codes must be in table
//! 3.3.1). Every refusal carries the client's `ref`, so an HIS can match the
//! `error` to its request.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Protocol version sent in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest accepted line; a longer one closes the connection.
pub const MAX_LINE: usize = 64 * 1024;

/// The identity HIS receives.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CardIdentity {
    pub health_card_id: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub phid: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub gender: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub nation: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub birthday: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub id_type: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub id_number: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub phone: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub address: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub patid: String,
}

/// Longest identity field passed to HIS, in characters; the address may be
/// longer. Real values are far shorter (an ID number is 18); a 300 000
/// character name from a hostile or broken answer must not become a
/// 900 KB line that HIS chokes on.
pub const MAX_FIELD_CHARS: usize = 128;
pub const MAX_ADDRESS_CHARS: usize = 512;

impl CardIdentity {
    /// Cut over-long fields at [`MAX_FIELD_CHARS`] ([`MAX_ADDRESS_CHARS`]
    /// for the address). Returns the names of the fields cut, for a log
    /// line that names them (never their values).
    pub fn cap_fields(&mut self) -> Vec<&'static str> {
        let mut cut = Vec::new();
        let fields: [(&'static str, &mut String, usize); 11] = [
            ("healthCardId", &mut self.health_card_id, MAX_FIELD_CHARS),
            ("phid", &mut self.phid, MAX_FIELD_CHARS),
            ("name", &mut self.name, MAX_FIELD_CHARS),
            ("gender", &mut self.gender, MAX_FIELD_CHARS),
            ("nation", &mut self.nation, MAX_FIELD_CHARS),
            ("birthday", &mut self.birthday, MAX_FIELD_CHARS),
            ("idType", &mut self.id_type, MAX_FIELD_CHARS),
            ("idNumber", &mut self.id_number, MAX_FIELD_CHARS),
            ("phone", &mut self.phone, MAX_FIELD_CHARS),
            ("address", &mut self.address, MAX_ADDRESS_CHARS),
            ("patid", &mut self.patid, MAX_FIELD_CHARS),
        ];
        for (name, value, max) in fields {
            if let Some((i, _)) = value.char_indices().nth(max) {
                value.truncate(i);
                cut.push(name);
            }
        }
        cut
    }
}

/// Agent → HIS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Out {
    #[serde(rename_all = "camelCase")]
    Hello {
        protocol: u32,
        agent: String,
        terminal_id: String,
        /// `"token"` on connections that must send `auth` first.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        auth: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Card {
        scan_id: String,
        scanner: String,
        scanned_at: String,
        code_kind: String,
        verified: bool,
        offline: bool,
        /// False when the use could not be written to disk (it is kept in
        /// memory until it can); HIS may warn the operator.
        recorded: bool,
        qr_code_text: String,
        card: Box<CardIdentity>,
    },
    #[serde(rename_all = "camelCase")]
    ScanFailed {
        scan_id: String,
        scanner: String,
        code_kind: String,
        reason: FailReason,
        #[serde(skip_serializing_if = "Option::is_none")]
        result_code: Option<i64>,
        message: String,
    },
    #[serde(rename_all = "camelCase")]
    OtherCode {
        scan_id: String,
        scanner: String,
        text: String,
    },
    #[serde(rename_all = "camelCase")]
    Reply {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
        ok: bool,
    },
    #[serde(rename_all = "camelCase")]
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
        message: String,
    },
}

impl Out {
    /// One line of the wire format (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","message":"internal serialization error"}"#.into()
        })
    }

    pub fn error(reference: Option<Value>, message: impl Into<String>) -> Out {
        Out::Error {
            reference,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum FailReason {
    CodeExpired,
    CardNotFound,
    PlatformUnavailable,
    PlatformRejected,
}

/// HIS → agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum In {
    Use {
        reference: Option<Value>,
        scan_id: String,
        scene: Option<String>,
        department: Option<String>,
    },
    Bind {
        reference: Option<Value>,
        scan_id: String,
        patid: String,
    },
    Ping {
        reference: Option<Value>,
    },
    /// The first message on loopback TCP and WebSocket connections: the
    /// token from the HIS token file (see `docs/his-protocol.md`).
    Auth {
        reference: Option<Value>,
        token: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIn {
    #[serde(rename = "type")]
    kind: Option<Value>,
    #[serde(rename = "ref")]
    reference: Option<Value>,
    scan_id: Option<Value>,
    scene: Option<Value>,
    department: Option<Value>,
    patid: Option<Value>,
    token: Option<Value>,
}

/// A line that could not be taken: answer `error` with this, keep the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reference: Option<Value>,
    pub message: String,
}

impl Refusal {
    pub fn into_out(self) -> Out {
        Out::error(self.reference, self.message)
    }
}

/// Parse one incoming line (without its newline).
pub fn parse_in(line: &[u8]) -> Result<In, Refusal> {
    let refuse = |reference: Option<Value>, message: String| Refusal { reference, message };
    let text = std::str::from_utf8(line).map_err(|_| refuse(None, "line is not UTF-8".into()))?;
    let raw: RawIn = match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => serde_json::from_value(v)
            .map_err(|e| refuse(None, format!("malformed message: {e}")))?,
        Ok(_) => return Err(refuse(None, "a message must be a JSON object".into())),
        Err(e) => return Err(refuse(None, format!("malformed JSON: {e}"))),
    };
    // `ref` is echoed back; only scalars make sense and only short ones are kept.
    let reference = match raw.reference {
        Some(v @ (Value::String(_) | Value::Number(_))) if v.to_string().len() <= 128 => Some(v),
        Some(Value::Null) | None => None,
        Some(_) => {
            return Err(refuse(
                None,
                "`ref` must be a string or a number of at most 128 characters".into(),
            ))
        }
    };
    let text_field = |v: Option<Value>, name: &str| -> Result<Option<String>, Refusal> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= 256 => Ok(Some(s)),
            Some(_) => Err(Refusal {
                reference: reference.clone(),
                message: format!("`{name}` must be a string of at most 256 bytes"),
            }),
        }
    };
    let kind = match raw.kind {
        Some(Value::String(s)) => s,
        _ => return Err(refuse(reference, "missing `type`".into())),
    };
    match kind.as_str() {
        "ping" => Ok(In::Ping { reference }),
        "auth" => {
            let token = text_field(raw.token, "token")?
                .ok_or_else(|| refuse(reference.clone(), "`auth` needs `token`".into()))?;
            Ok(In::Auth { reference, token })
        }
        "use" => {
            let scan_id = text_field(raw.scan_id, "scanId")?
                .ok_or_else(|| refuse(reference.clone(), "`use` needs `scanId`".into()))?;
            let scene = text_field(raw.scene, "scene")?;
            if let Some(s) = &scene {
                if crate::platform::tables::scene_name(s).is_none() {
                    return Err(refuse(
                        reference,
                        format!("scene `{s}` is not in table 3.3.1"),
                    ));
                }
            }
            let department =
                text_field(raw.department, "department")?.filter(|d| !d.trim().is_empty());
            Ok(In::Use {
                reference,
                scan_id,
                scene,
                department,
            })
        }
        "bind" => {
            let scan_id = text_field(raw.scan_id, "scanId")?
                .ok_or_else(|| refuse(reference.clone(), "`bind` needs `scanId`".into()))?;
            let patid = text_field(raw.patid, "patid")?
                .filter(|p| !p.trim().is_empty())
                .ok_or_else(|| refuse(reference.clone(), "`bind` needs `patid`".into()))?;
            Ok(In::Bind {
                reference,
                scan_id,
                patid,
            })
        }
        other => {
            let shown: String = other.chars().take(40).collect();
            Err(refuse(reference, format!("unknown type `{shown}`")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_long_identity_fields_are_cut_and_named() {
        let mut c = CardIdentity {
            name: "张".repeat(300_000),
            address: "路".repeat(600),
            id_number: "110101199001011234".into(),
            ..CardIdentity::default()
        };
        assert_eq!(c.cap_fields(), ["name", "address"]);
        assert_eq!(c.name.chars().count(), MAX_FIELD_CHARS);
        assert_eq!(c.address.chars().count(), MAX_ADDRESS_CHARS);
        assert_eq!(c.id_number, "110101199001011234");
    }
    use serde_json::json;

    #[test]
    fn parses_the_three_messages() {
        assert_eq!(
            parse_in(r#"{"type":"use","scanId":"S1","scene":"010101","department":"内科","ref":"7","extra":1}"#.as_bytes()),
            Ok(In::Use {
                reference: Some(json!("7")),
                scan_id: "S1".into(),
                scene: Some("010101".into()),
                department: Some("内科".into())
            })
        );
        assert_eq!(
            parse_in(br#"{"type":"bind","scanId":"S1","patid":"100234","ref":8}"#),
            Ok(In::Bind {
                reference: Some(json!(8)),
                scan_id: "S1".into(),
                patid: "100234".into()
            })
        );
        assert_eq!(
            parse_in(br#"{"type":"ping"}"#),
            Ok(In::Ping { reference: None })
        );
    }

    #[test]
    fn refusals_name_the_problem_and_keep_the_ref() {
        let cases: &[(&[u8], &str)] = &[
            (b"{not json", "malformed JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (b"[1,2]", "JSON object"),
            (br#"{"ref":"1"}"#, "missing `type`"),
            (br#"{"type":"dance","ref":"1"}"#, "unknown type `dance`"),
            (br#"{"type":"use","ref":"1"}"#, "needs `scanId`"),
            (
                br#"{"type":"use","scanId":"S","scene":"42","ref":"1"}"#,
                "not in table 3.3.1",
            ),
            (
                br#"{"type":"bind","scanId":"S","ref":"1"}"#,
                "needs `patid`",
            ),
            (
                br#"{"type":"use","scanId":5,"ref":"1"}"#,
                "`scanId` must be a string",
            ),
            (br#"{"type":"ping","ref":{"a":1}}"#, "`ref` must be"),
        ];
        for (line, want) in cases {
            let r = parse_in(line).unwrap_err();
            assert!(
                r.message.contains(want),
                "{}: {}",
                String::from_utf8_lossy(line),
                r.message
            );
        }
        assert_eq!(
            parse_in(br#"{"type":"dance","ref":"1"}"#)
                .unwrap_err()
                .reference,
            Some(json!("1"))
        );
    }

    #[test]
    fn out_lines() {
        let l = Out::Reply {
            reference: Some(json!("7")),
            ok: true,
        }
        .to_line();
        assert_eq!(l, r#"{"type":"reply","ref":"7","ok":true}"#);
        let l = Out::ScanFailed {
            scan_id: "S".into(),
            scanner: "w".into(),
            code_kind: "dynamic".into(),
            reason: FailReason::CodeExpired,
            result_code: Some(10020),
            message: "m".into(),
        }
        .to_line();
        assert!(
            l.contains(r#""type":"scanFailed""#)
                && l.contains(r#""reason":"codeExpired""#)
                && l.contains(r#""resultCode":10020"#)
        );
    }
}
