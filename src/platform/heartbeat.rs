//! The terminal heartbeat: the one message of the protocol that is the
//! gateway's own, not the platform's (DESIGN §5b). A terminal behind a
//! gateway tells it, every `heartbeat_s`, how it is (its `status`), so
//! hospital IT sees the whole fleet in one place.
//!
//! It travels like a platform call (the same envelope, signed with the
//! terminal's secret and its gateway token) on a path outside the
//! platform's API paths, so the gateway checks it with the same code as any
//! other request. The status is carried as one JSON string field: what the
//! signature covers is then exactly the text the gateway parses, whatever
//! the nesting.
//!
//! Both ends are tolerant: every field is optional on the way in, because
//! terminals and the gateway are upgraded at different times.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Where a terminal posts its heartbeat. Not a platform path: the platform
/// answers it 404, which tells an agent it is not behind a gateway.
pub const PATH: &str = "/ehc-gateway/v1/heartbeat";

/// The `req` field that holds the beat as JSON text.
const FIELD: &str = "beat";

/// What a terminal says about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Beat {
    /// The agent's version.
    pub version: String,
    /// `[terminal] id` (the window's name on the platform; the gateway
    /// knows the terminal by its enrolment name).
    pub terminal_id: String,
    /// Seconds between beats: the gateway marks the terminal stale after
    /// three missed ones.
    pub interval_s: u64,
    /// The agent's `ehc-agent status --json`.
    pub status: Value,
}

impl Beat {
    /// The `req` object of the envelope.
    pub fn to_req(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert(
            FIELD.into(),
            Value::String(serde_json::to_string(self).unwrap_or_default()),
        );
        m
    }

    /// Read a beat from an envelope's `req`.
    pub fn from_req(req: &Map<String, Value>) -> Result<Beat, String> {
        let text = req
            .get(FIELD)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("req.{FIELD} is missing or not a string"))?;
        serde_json::from_str(text).map_err(|e| format!("req.{FIELD}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_survives_the_envelope_and_garbage_is_named() {
        let b = Beat {
            version: "1.2.3".into(),
            terminal_id: "WIN-07".into(),
            interval_s: 30,
            status: serde_json::json!({"outbox": {"pending": 340}}),
        };
        assert_eq!(Beat::from_req(&b.to_req()).unwrap(), b);
        let mut bad = Map::new();
        bad.insert("beat".into(), Value::String("{not json".into()));
        assert!(Beat::from_req(&bad).unwrap_err().contains("req.beat"));
        assert!(Beat::from_req(&Map::new()).unwrap_err().contains("missing"));
    }
}
