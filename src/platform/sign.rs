//! Request signing, exactly as the open platform verifies it (reference 3.1.3,
//! DESIGN §5).
//!
//! The platform signs the *merged* fields of `commonIn` and `req`: the Java
//! demo puts `commonIn` into a `TreeMap` and then `req` over it, so when both
//! carry the same key (reportHISData has `hospitalId` in both) the `req` value
//! is the one signed. We do the same. `sign` itself is left out, as are `null`
//! and `""` values; everything else is rendered as `key=value`, sorted by key
//! in byte order, joined with `&`, followed by the app secret, hashed with
//! SHA-256 and encoded with standard Base64.
//!
//! One deliberate difference from the Java demo: when the *last* key in sort
//! order is skipped (null or empty), the demo leaves a trailing `&`. That is a
//! bug of the demo's loop, not a rule; the simulator and DESIGN §5 join only
//! the fields that are present, and so do we.
//!
//! This module is pure: no I/O, no clock. The simulator verifies with the same
//! function, so the two can never drift apart.

use base64::Engine as _;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The text that is hashed, without the secret: what `ehc-agent sign` shows an
/// integrator so they can compare it with their own.
pub fn raw_string(common_in: &Map<String, Value>, req: Option<&Map<String, Value>>) -> String {
    // BTreeMap<String, _> orders by byte order of the UTF-8 keys, which is the
    // order the reference asks for (case-sensitive, `appId` < `appToken`).
    let mut merged: std::collections::BTreeMap<&str, &Value> = std::collections::BTreeMap::new();
    for (k, v) in common_in {
        merged.insert(k, v);
    }
    if let Some(req) = req {
        for (k, v) in req {
            merged.insert(k, v);
        }
    }
    let mut out = String::new();
    for (k, v) in merged {
        if k == "sign" {
            continue;
        }
        let Some(rendered) = render(v) else { continue };
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(&rendered);
    }
    out
}

/// `Base64(SHA256(raw + secret))`.
pub fn sign_raw(raw: &str, secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(raw.as_bytes());
    h.update(secret.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Sign a request's `commonIn` and `req`.
pub fn sign(
    common_in: &Map<String, Value>,
    req: Option<&Map<String, Value>>,
    secret: &str,
) -> String {
    sign_raw(&raw_string(common_in, req), secret)
}

/// Check a signature in constant time with respect to its content, so the
/// simulator (and a future gateway) does not leak how much of a forged sign
/// matched.
pub fn verify(
    common_in: &Map<String, Value>,
    req: Option<&Map<String, Value>>,
    secret: &str,
    given: &str,
) -> bool {
    let expected = sign(common_in, req, secret);
    same_bytes(expected.as_bytes(), given.as_bytes())
}

/// Equal, in a time that does not depend on where they differ (for
/// signatures and tokens).
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One value as the signer writes it, or `None` when it does not take part.
fn render(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(_) | Value::Object(_) => Some(compact_sorted(v)),
    }
}

/// Compact JSON with object keys sorted and non-ASCII left as UTF-8: what
/// fastjson's `MapSortField` produces for nested parameters.
fn compact_sorted(v: &Value) -> String {
    // serde_json's Map is a BTreeMap unless `preserve_order` is enabled (we
    // never enable it), and its serializer does not escape non-ASCII, so plain
    // `to_string` already gives sorted keys and raw UTF-8. A test pins this.
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn reference_get_app_token_vector() {
        let common = obj(json!({
            "appToken": "",
            "requestId": "DB4D975748A84309977EA25224C0F5CF",
            "hospitalId": "90003",
            "timestamp": "1525392000",
            "sign": ""
        }));
        let req = obj(json!({"appId": "a1a2e0bde41574ad8ea9a4bb58022oop"}));
        let raw = raw_string(&common, Some(&req));
        assert_eq!(
            raw,
            "appId=a1a2e0bde41574ad8ea9a4bb58022oop&hospitalId=90003&requestId=DB4D975748A84309977EA25224C0F5CF&timestamp=1525392000"
        );
        assert_eq!(
            sign_raw(&raw, "8c8e763f443ef983ac33aef1c7085cfb"),
            "TsccMUMTHfOiEovR2hMlRXcQqctRFmPbpPIZdxXCJ/o="
        );
    }

    #[test]
    fn number_zero_vector() {
        let req = obj(json!({"channelNum": 0}));
        assert_eq!(raw_string(&Map::new(), Some(&req)), "channelNum=0");
        assert_eq!(
            sign(&Map::new(), Some(&req), "secret"),
            "izPY5tjxkXETiFSV03ck5ImGpUv2fvK8aHcFrDebzc4="
        );
    }

    #[test]
    fn sign_null_and_empty_are_left_out() {
        let common = obj(json!({"sign": "abc", "a": null, "b": "", "c": "x"}));
        assert_eq!(raw_string(&common, None), "c=x");
        // A skipped last key must not leave a trailing '&'.
        let common = obj(json!({"a": "1", "z": null}));
        assert_eq!(raw_string(&common, None), "a=1");
    }

    #[test]
    fn booleans_and_numbers() {
        let req = obj(json!({"t": true, "f": false, "n": -12, "x": 1.5}));
        assert_eq!(
            raw_string(&Map::new(), Some(&req)),
            "f=false&n=-12&t=true&x=1.5"
        );
    }

    #[test]
    fn nested_values_are_compact_sorted_unescaped() {
        let req = obj(json!({"o": {"b": 1, "a": "内科", "c": [true, null, {"z": 0, "y": ""}]}}));
        assert_eq!(
            raw_string(&Map::new(), Some(&req)),
            r#"o={"a":"内科","b":1,"c":[true,null,{"y":"","z":0}]}"#
        );
    }

    #[test]
    fn keys_sort_by_byte_order_case_sensitive() {
        let req = obj(json!({"b": "1", "B": "2", "appToken": "t", "appId": "i", "_": "u"}));
        assert_eq!(
            raw_string(&Map::new(), Some(&req)),
            "B=2&_=u&appId=i&appToken=t&b=1"
        );
    }

    #[test]
    fn req_wins_over_common_in_on_duplicate_key() {
        let common = obj(json!({"hospitalId": "1"}));
        let req = obj(json!({"hospitalId": "2"}));
        assert_eq!(raw_string(&common, Some(&req)), "hospitalId=2");
    }

    #[test]
    fn verify_accepts_own_and_rejects_other_secret() {
        let common = obj(json!({"requestId": "A", "timestamp": "1"}));
        let s = sign(&common, None, "k1");
        assert!(verify(&common, None, "k1", &s));
        assert!(!verify(&common, None, "k2", &s));
        assert!(!verify(&common, None, "k1", "short"));
    }
}
