//! What `ehc-agent outbox list` shows: counts, the oldest pending age, the
//! held rows with their codes. QR texts are masked (first 8 characters): the
//! screen may be shared, the output pasted into a ticket.

use serde::{Deserialize, Serialize};

use super::{Counts, Row, State, Store, StoreError};
use crate::clock;
use crate::pii;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    pub path: String,
    pub counts: Counts,
    pub oldest_pending_age_s: Option<i64>,
    pub held: Vec<HeldRow>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldRow {
    pub id: i64,
    pub kind: String,
    pub request_id: String,
    pub last_code: Option<i64>,
    pub last_error: Option<String>,
    pub attempts: i64,
    pub created_at: String,
    /// Masked.
    pub qr_code_text: String,
}

impl HeldRow {
    fn from(r: Row) -> Self {
        let qr = serde_json::from_str::<serde_json::Value>(&r.payload)
            .ok()
            .and_then(|v| {
                v.get("qrCodeText")
                    .and_then(|q| q.as_str())
                    .map(|q| pii::qr(q).to_string())
            })
            .unwrap_or_default();
        HeldRow {
            id: r.id,
            kind: r.kind.as_str().to_owned(),
            request_id: r.request_id,
            last_code: r.last_code,
            last_error: r.last_error,
            attempts: r.attempts,
            created_at: clock::platform_time(r.created_at, clock::BEIJING),
            qr_code_text: qr,
        }
    }
}

pub fn listing(store: &Store, now: i64) -> Result<Listing, StoreError> {
    let counts = store.counts()?;
    let held = store
        .list(State::Held, 1000)?
        .into_iter()
        .map(HeldRow::from)
        .collect();
    Ok(Listing {
        path: store.path().display().to_string(),
        oldest_pending_age_s: counts.oldest_unsent.map(|t| (now - t).max(0)),
        counts,
        held,
    })
}

/// `3 h 5 min`, `42 s`.
pub fn age(s: i64) -> String {
    match s {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        s => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

impl Listing {
    pub fn human(&self) -> String {
        use std::fmt::Write as _;
        let c = &self.counts;
        let mut s = format!("outbox {}\n", self.path);
        let _ = writeln!(
            s,
            "  pending {}{}, waiting {}, sent {}, held {}",
            c.pending,
            self.oldest_pending_age_s
                .map(|a| format!(" (oldest {})", age(a)))
                .unwrap_or_default(),
            c.waiting,
            c.sent,
            c.held
        );
        if !self.held.is_empty() {
            let _ = writeln!(s, "held rows (re-queue with `ehc-agent outbox retry ID` or `--held` once the cause is fixed):");
            let _ = writeln!(
                s,
                "  {:>6}  {:<6}  {:>7}  {:>8}  {:<19}  {:<22}  error",
                "id", "kind", "code", "attempts", "created", "qr"
            );
            for h in &self.held {
                let _ = writeln!(
                    s,
                    "  {:>6}  {:<6}  {:>7}  {:>8}  {:<19}  {:<22}  {}",
                    h.id,
                    h.kind,
                    h.last_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    h.attempts,
                    h.created_at,
                    h.qr_code_text,
                    h.last_error.as_deref().unwrap_or("")
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(age(42), "42 s");
        assert_eq!(age(3 * 3600 + 5 * 60), "3 h 5 min");
        assert_eq!(age(2 * 86_400 + 3600), "2 d 1 h");
    }

    #[test]
    fn held_rows_are_listed_masked() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("o.sqlite")).unwrap();
        let ids = s
            .insert(&[super::super::NewRow {
                request_id: "R".into(),
                kind: super::super::Kind::Report,
                scan_id: "S".into(),
                payload: r#"{"qrCodeText":"ABCDEFGHIJKLMNOP:1"}"#.into(),
                created_at: 100,
                wait_until: None,
            }])
            .unwrap();
        s.mark_held(ids[0], Some(10042), "bad").unwrap();
        let l = listing(&s, 200).unwrap();
        assert_eq!(l.held.len(), 1);
        assert_eq!(l.held[0].qr_code_text, "ABCDEFGH…(18 chars)");
        let text = l.human();
        assert!(
            text.contains("10042") && !text.contains("IJKLMNOP"),
            "{text}"
        );
    }
}
