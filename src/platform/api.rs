//! The platform's request and response types (reference 3.1.2, 3.2.1, 3.2.4,
//! 3.2.6, 3.2.7, 3.2.11), shared by the client and the simulator.
//!
//! Field names follow the reference, with its errata (DESIGN §9): the
//! reportHISData table says `idCardNumber` where its example says `idCard`;
//! we send `idCardNumber` (the table is the normative part) and the simulator
//! accepts either.
//!
//! Responses are parsed defensively: the body is capped at [`MAX_BODY`],
//! `commonOut` must be present with an integer `resultCode`, and `rsp` must
//! have the documented shape when the call succeeded. Anything else is a
//! [`ResponseError`], never a panic. Unknown fields are ignored everywhere, so
//! a platform that adds fields does not break the agent.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest response body the client reads. The biggest real answer (a card
/// with `adminExt`) is a few KiB.
pub const MAX_BODY: usize = 1 << 20;

/// Path prefix of the business APIs; getAppToken lives under its own.
pub const ISV_PREFIX: &str = "/rest/auth/HealthCard/HealthOpenPlatform/ISVOpenObj/";

/// One platform API: its name, path and typed request/response.
pub trait Api {
    const NAME: &'static str;
    const PATH: &'static str;
    type Req: Serialize + DeserializeOwned + Send + Sync;
    type Rsp: DeserializeOwned + Serialize + Send;
}

/// `commonIn` (3.1.2). `timestamp` is a string of Unix seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CommonIn {
    pub app_token: String,
    pub request_id: String,
    pub hospital_id: String,
    pub timestamp: String,
    pub sign: String,
}

/// `commonOut` (3.1.2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CommonOut {
    #[serde(default)]
    pub request_id: String,
    pub result_code: i64,
    #[serde(default)]
    pub err_msg: String,
}

// ---- getAppToken (3.2.1) ----

pub struct GetAppToken;
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AppTokenReq {
    pub app_id: String,
}
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AppTokenRsp {
    pub app_token: String,
    pub expires_in: u64,
}
impl Api for GetAppToken {
    const NAME: &'static str = "getAppToken";
    const PATH: &'static str = "/rest/auth/HealthCard/HealthOpenAuth/AuthObj/getAppToken";
    type Req = AppTokenReq;
    type Rsp = AppTokenRsp;
}

// ---- getHealthCardByQRCode (3.2.4) ----

pub struct GetHealthCardByQrCode;
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QrCodeReq {
    pub qr_code_text: String,
}
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthCardRsp {
    pub card: CardInfo,
}
/// The card of 3.2.4. Only `phid` and the identity are needed by HIS; every
/// field defaults so a platform that omits an optional one still works, but a
/// field of the wrong JSON type is an error.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct CardInfo {
    pub qr_code_text: String,
    pub name: String,
    pub gender: String,
    pub nation: String,
    pub birthday: String,
    pub id_number: String,
    pub id_type: String,
    pub address: String,
    pub phone1: String,
    pub phone2: String,
    pub phid: String,
    pub patid: String,
    pub health_card_id: String,
    pub admin_ext: String,
}
impl Api for GetHealthCardByQrCode {
    const NAME: &'static str = "getHealthCardByQRCode";
    const PATH: &'static str =
        "/rest/auth/HealthCard/HealthOpenPlatform/ISVOpenObj/getHealthCardByQRCode";
    type Req = QrCodeReq;
    type Rsp = HealthCardRsp;
}

// ---- verifyQRCode (3.2.11) ----

pub struct VerifyQrCode;
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VerifyQrCodeReq {
    pub qr_code_text: String,
    pub terminal_id: String,
    pub time: String,
    pub medical_step: String,
    pub use_city_code: String,
    pub use_city_name: String,
    pub hospital_code: String,
    pub hospital_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_scene: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_channel: Option<String>,
}
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct VerifiedCard {
    pub address: String,
    pub birthday: String,
    pub health_card_id: String,
    pub id_number: String,
    pub id_type: String,
    pub phid: String,
    pub name: String,
    pub nation: String,
    pub phone: String,
    pub gender: String,
}
impl Api for VerifyQrCode {
    const NAME: &'static str = "verifyQRCode";
    const PATH: &'static str = "/rest/auth/HealthCard/HealthOpenPlatform/ISVOpenObj/verifyQRCode";
    type Req = VerifyQrCodeReq;
    type Rsp = VerifiedCard;
}

/// Does the interface named `api_name` only read (a scan's query)? Sending
/// one twice harms nothing, so a copy may carry a new `requestId`.
pub fn is_query(api_name: &str) -> bool {
    api_name == GetHealthCardByQrCode::NAME || api_name == VerifyQrCode::NAME
}

// ---- reportHISData (3.2.7) ----

pub struct ReportHisData;
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReportReq {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qr_code_text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "idCard")]
    pub id_card_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub time: String,
    pub hospital_id: String,
    pub scene: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<String>,
    pub card_type: String,
    pub card_channel: String,
}
/// 3.2.7 answers `{"none": ""}`; anything object-shaped is accepted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NoneRsp {
    #[serde(default)]
    pub none: Value,
}
impl Api for ReportHisData {
    const NAME: &'static str = "reportHISData";
    const PATH: &'static str = "/rest/auth/HealthCard/HealthOpenPlatform/ISVOpenObj/reportHISData";
    type Req = ReportReq;
    type Rsp = NoneRsp;
}

// ---- bindCardRelation (3.2.6) ----

pub struct BindCardRelation;
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BindReq {
    pub patid: String,
    pub qr_code_text: String,
}
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BindRsp {
    pub result: bool,
}
impl Api for BindCardRelation {
    const NAME: &'static str = "bindCardRelation";
    const PATH: &'static str =
        "/rest/auth/HealthCard/HealthOpenPlatform/ISVOpenObj/bindCardRelation";
    type Req = BindReq;
    type Rsp = BindRsp;
}

/// Names and paths of every API this crate speaks, for the simulator's router
/// and for metrics labels.
pub const API_NAMES: &[(&str, &str)] = &[
    (GetAppToken::NAME, GetAppToken::PATH),
    (GetHealthCardByQrCode::NAME, GetHealthCardByQrCode::PATH),
    (VerifyQrCode::NAME, VerifyQrCode::PATH),
    (ReportHisData::NAME, ReportHisData::PATH),
    (BindCardRelation::NAME, BindCardRelation::PATH),
];

/// Why a response body could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response body is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("response is not JSON: {0}")]
    NotJson(String),
    #[error("response is not a JSON object")]
    NotObject,
    #[error("response has no commonOut object")]
    MissingCommonOut,
    #[error("commonOut.resultCode is missing or not an integer")]
    BadResultCode,
    #[error("response rsp does not have the shape of {api}: {detail}")]
    BadRsp { api: &'static str, detail: String },
}

/// A parsed answer: the platform's `commonOut` and, on success, the typed
/// `rsp`.
#[derive(Debug)]
pub struct Answer<T> {
    pub common_out: CommonOut,
    pub rsp: Option<T>,
}

/// Parse a response body for API `A`. `rsp` is only required when
/// `resultCode` is 0: error answers often omit it or send `null`.
pub fn parse_response<A: Api>(body: &[u8]) -> Result<Answer<A::Rsp>, ResponseError> {
    if body.len() > MAX_BODY {
        return Err(ResponseError::TooLarge);
    }
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ResponseError::NotJson(e.to_string()))?;
    let Value::Object(mut top) = v else {
        return Err(ResponseError::NotObject);
    };
    let Some(Value::Object(co)) = top.remove("commonOut") else {
        return Err(ResponseError::MissingCommonOut);
    };
    let result_code = co
        .get("resultCode")
        .and_then(Value::as_i64)
        .ok_or(ResponseError::BadResultCode)?;
    let text = |k: &str| {
        co.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let common_out = CommonOut {
        request_id: text("requestId"),
        result_code,
        err_msg: text("errMsg"),
    };
    if result_code != 0 {
        return Ok(Answer {
            common_out,
            rsp: None,
        });
    }
    let rsp_value = top.remove("rsp").unwrap_or(Value::Null);
    let rsp_value = match rsp_value {
        // reportHISData's placeholder answer may be missing entirely.
        Value::Null => Value::Object(Map::new()),
        other => other,
    };
    let rsp = serde_json::from_value::<A::Rsp>(rsp_value).map_err(|e| ResponseError::BadRsp {
        api: A::NAME,
        detail: without_values(&e.to_string()),
    })?;
    Ok(Answer {
        common_out,
        rsp: Some(rsp),
    })
}

/// Just `commonOut.resultCode` of an answer (the gateway passes the rest
/// on untouched).
pub fn result_code(body: &[u8]) -> Result<i64, ResponseError> {
    if body.len() > MAX_BODY {
        return Err(ResponseError::TooLarge);
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ResponseError::NotJson(without_values(&e.to_string())))?;
    let Value::Object(top) = v else {
        return Err(ResponseError::NotObject);
    };
    let Some(Value::Object(co)) = top.get("commonOut") else {
        return Err(ResponseError::MissingCommonOut);
    };
    co.get("resultCode")
        .and_then(Value::as_i64)
        .ok_or(ResponseError::BadResultCode)
}

/// `body` with `commonOut.requestId` set to `request_id` (the gateway
/// hands a terminal its own id back when it sent a copy under another).
pub fn with_request_id(body: &[u8], request_id: &str) -> Result<Vec<u8>, ResponseError> {
    if body.len() > MAX_BODY {
        return Err(ResponseError::TooLarge);
    }
    let mut v: Value = serde_json::from_slice(body)
        .map_err(|e| ResponseError::NotJson(without_values(&e.to_string())))?;
    let Some(Value::Object(co)) = v.get_mut("commonOut") else {
        return Err(ResponseError::MissingCommonOut);
    };
    co.insert("requestId".into(), request_id.into());
    serde_json::to_vec(&v).map_err(|e| ResponseError::NotJson(e.to_string()))
}

/// serde's message without the value it quotes: `invalid type: string
/// "张三", expected u64` becomes `invalid type (expected u64)`. A wrongly
/// typed identity field would otherwise put a patient's name or ID number
/// into a WARN line.
pub fn without_values(msg: &str) -> String {
    let head = msg.split([':', '`', '"', ',']).next().unwrap_or(msg).trim();
    match msg.split_once(", expected ") {
        Some((_, expected)) => {
            // What serde expected is a type or a list of field names: never
            // data. A missing field's name is safe too.
            let expected = expected.split(" at line ").next().unwrap_or(expected);
            format!("{head} (expected {expected})")
        }
        None if head.starts_with("missing field") || head.starts_with("duplicate field") => {
            msg.split(" at line ").next().unwrap_or(msg).to_owned()
        }
        None => head.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a wrongly typed platform answer put the name and ID
    /// number into a WARN line through serde's message.
    #[test]
    fn shape_errors_never_quote_values() {
        let body = r#"{"commonOut":{"resultCode":0},"rsp":{"card":{"name":["张三"],"idNumber":43010119900101123}}}"#.as_bytes();
        let e = parse_response::<GetHealthCardByQrCode>(body)
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("张三") && !e.contains("43010119900101123"),
            "{e}"
        );
        assert!(e.contains("expected"), "{e}");
        assert_eq!(
            without_values("invalid type: string \"张三\", expected a string at line 1 column 5"),
            "invalid type (expected a string)"
        );
        assert_eq!(
            without_values("unknown variant `张三`, expected one of `a`, `b`"),
            "unknown variant (expected one of `a`, `b`)"
        );
    }

    #[test]
    fn reference_card_example_parses() {
        let body = r#"{"commonOut":{"requestId":"4D6F","resultCode":0,"errMsg":"成功"},
          "rsp":{"card":{"qrCodeText":"X:1","name":"张三","gender":"男","nation":"汉族",
          "birthday":"1998-09-08","idNumber":"1","idType":"01","address":"地址","phone1":"1",
          "phone2":"1","phid":"36","patid":"院内 ID","healthCardId":"A4","adminExt":"{}","newField":1}}}"#;
        let a = parse_response::<GetHealthCardByQrCode>(body.as_bytes()).unwrap();
        assert_eq!(a.common_out.result_code, 0);
        assert_eq!(a.rsp.unwrap().card.phid, "36");
    }

    #[test]
    fn error_answer_needs_no_rsp() {
        let body = br#"{"commonOut":{"requestId":"A","resultCode":21004,"errMsg":"x"},"rsp":null}"#;
        let a = parse_response::<VerifyQrCode>(body).unwrap();
        assert_eq!(a.common_out.result_code, 21004);
        assert!(a.rsp.is_none());
    }

    #[test]
    fn hostile_bodies_are_typed_errors() {
        use ResponseError::*;
        type Case = (&'static [u8], fn(&ResponseError) -> bool);
        let cases: &[Case] = &[
            (b"<html>502</html>", |e| matches!(e, NotJson(_))),
            (b"{\"commonOut\":{\"resultCode\":0", |e| {
                matches!(e, NotJson(_))
            }),
            (b"[1,2]", |e| matches!(e, NotObject)),
            (b"{\"rsp\":{}}", |e| matches!(e, MissingCommonOut)),
            (b"{\"commonOut\":\"x\"}", |e| matches!(e, MissingCommonOut)),
            (b"{\"commonOut\":{\"resultCode\":\"0\"}}", |e| {
                matches!(e, BadResultCode)
            }),
            (b"{\"commonOut\":{\"resultCode\":1.5}}", |e| {
                matches!(e, BadResultCode)
            }),
            (
                b"{\"commonOut\":{\"resultCode\":0},\"rsp\":{\"card\":\"x\"}}",
                |e| matches!(e, BadRsp { .. }),
            ),
            (b"{\"commonOut\":{\"resultCode\":0},\"rsp\":[]}", |e| {
                matches!(e, BadRsp { .. })
            }),
        ];
        for (body, ok) in cases {
            let err = parse_response::<GetHealthCardByQrCode>(body).unwrap_err();
            assert!(ok(&err), "{}: {err}", String::from_utf8_lossy(body));
        }
        let big = vec![b' '; MAX_BODY + 1];
        assert_eq!(parse_response::<ReportHisData>(&big).unwrap_err(), TooLarge);
    }

    #[test]
    fn report_success_without_rsp() {
        let a = parse_response::<ReportHisData>(br#"{"commonOut":{"resultCode":0}}"#).unwrap();
        assert!(a.rsp.is_some());
    }

    #[test]
    fn report_req_accepts_id_card_alias_and_sends_table_name() {
        let r: ReportReq = serde_json::from_str(
            r#"{"idCard":"1","name":"n","time":"t","hospitalId":"h","scene":"s","cardType":"01","cardChannel":"0100"}"#,
        )
        .unwrap();
        assert_eq!(r.id_card_number.as_deref(), Some("1"));
        let out = serde_json::to_string(&r).unwrap();
        assert!(out.contains("\"idCardNumber\":\"1\""));
        assert!(!out.contains("qrCodeText"));
    }
}
