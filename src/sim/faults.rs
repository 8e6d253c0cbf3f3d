//! Faults the simulator can inject, at start (its config) or at run time
//! (`PUT /_sim/faults`): what the outbox and the scan path must survive.
//!
//! * `latency_ms` + `jitter_ms`: every answer is delayed by a fixed amount
//!   plus a uniform random part.
//! * `api.<name>` (or `api."*"`): per-API rates of HTTP 5xx, of a chosen
//!   result code, and of *lost answers* (the request is processed, then
//!   answered 502: the case where a retry must get 10054).
//! * `outage`: `refuse` closes the listening socket (connection refused);
//!   `reset` accepts and drops connections. For `for_s` seconds or until
//!   cleared.
//! * `force`: the next `count` calls (of one API, or any) get `code`.
//! * `body`: answers are `truncated` (cut mid-JSON), `not-json` (an HTML
//!   error page), or `slow` (trickled over `slow_ms`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    pub latency_ms: u64,
    pub jitter_ms: u64,
    /// Keyed by API name (`reportHISData`) or `*` for all.
    pub api: BTreeMap<String, ApiFaults>,
    pub outage: Option<Outage>,
    pub force: Option<Force>,
    pub body: Option<BodyFault>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiFaults {
    pub http_5xx_rate: f64,
    pub result_code: Option<i64>,
    pub result_code_rate: f64,
    pub lost_answer_rate: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OutageMode {
    Refuse,
    Reset,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    pub mode: OutageMode,
    /// Seconds from when the fault is set; absent = until cleared.
    #[serde(default)]
    pub for_s: Option<u64>,
    /// Filled in by the simulator: real Unix time the outage ends.
    #[serde(default)]
    pub until: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Force {
    pub code: i64,
    pub count: u64,
    #[serde(default)]
    pub api: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BodyKind {
    Truncated,
    NotJson,
    Slow,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BodyFault {
    pub kind: BodyKind,
    #[serde(default)]
    pub api: Option<String>,
    /// How many answers; absent = all until cleared.
    #[serde(default)]
    pub count: Option<u64>,
    /// For `slow`: total time to trickle the body over.
    #[serde(default = "default_slow_ms")]
    pub slow_ms: u64,
}

fn default_slow_ms() -> u64 {
    5000
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        for (name, f) in &self.api {
            for (k, r) in [
                ("http_5xx_rate", f.http_5xx_rate),
                ("result_code_rate", f.result_code_rate),
                ("lost_answer_rate", f.lost_answer_rate),
            ] {
                if !(0.0..=1.0).contains(&r) {
                    return Err(format!("faults.api.{name}.{k} must be between 0 and 1"));
                }
            }
            if f.result_code_rate > 0.0 && f.result_code.is_none() {
                return Err(format!(
                    "faults.api.{name}.result_code_rate needs result_code"
                ));
            }
            if name != "*"
                && !crate::platform::api::API_NAMES
                    .iter()
                    .any(|(n, _)| n == name)
            {
                return Err(format!("faults.api.{name}: no such API"));
            }
        }
        Ok(())
    }

    /// The per-API faults for `api`, the specific entry winning over `*`.
    pub fn for_api(&self, api: &str) -> Option<&ApiFaults> {
        self.api.get(api).or_else(|| self.api.get("*"))
    }

    /// Whether an outage is in force at `now` (real Unix seconds).
    pub fn outage_at(&self, now: i64) -> Option<OutageMode> {
        self.outage
            .as_ref()
            .filter(|o| o.until.is_none_or(|u| now < u))
            .map(|o| o.mode)
    }

    /// Take one forced result code for `api`, if any are left.
    pub fn take_forced(&mut self, api: &str) -> Option<i64> {
        let f = self.force.as_mut()?;
        if f.api.as_deref().is_some_and(|a| a != api) || f.count == 0 {
            return None;
        }
        f.count -= 1;
        let code = f.code;
        if f.count == 0 {
            self.force = None;
        }
        Some(code)
    }

    /// Take one body fault for `api`, if any.
    pub fn take_body(&mut self, api: &str) -> Option<(BodyKind, u64)> {
        let b = self.body.as_mut()?;
        if b.api.as_deref().is_some_and(|a| a != api) {
            return None;
        }
        let out = (b.kind, b.slow_ms);
        if let Some(c) = b.count.as_mut() {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.body = None;
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_codes_count_down_per_api() {
        let mut f = Faults {
            force: Some(Force {
                code: 21004,
                count: 2,
                api: Some("verifyQRCode".into()),
            }),
            ..Default::default()
        };
        assert_eq!(f.take_forced("reportHISData"), None);
        assert_eq!(f.take_forced("verifyQRCode"), Some(21004));
        assert_eq!(f.take_forced("verifyQRCode"), Some(21004));
        assert_eq!(f.take_forced("verifyQRCode"), None);
        assert!(f.force.is_none());
    }

    #[test]
    fn outage_window() {
        let f = Faults {
            outage: Some(Outage {
                mode: OutageMode::Reset,
                for_s: Some(10),
                until: Some(110),
            }),
            ..Default::default()
        };
        assert_eq!(f.outage_at(100), Some(OutageMode::Reset));
        assert_eq!(f.outage_at(110), None);
    }

    #[test]
    fn validation() {
        let mut f = Faults::default();
        f.api.insert("nope".into(), ApiFaults::default());
        assert!(f.validate().is_err());
        let mut f = Faults::default();
        f.api.insert(
            "*".into(),
            ApiFaults {
                http_5xx_rate: 1.5,
                ..Default::default()
            },
        );
        assert!(f.validate().is_err());
    }
}
