//! What a scanned text is: a static health card code, a dynamic one, or
//! something else (a hospital's own barcode, a payment code, noise).
//!
//! The decision is structural and pure, so it can be fuzzed and so the scan
//! path never calls the platform for text that cannot be a health card:
//!
//! * **Static** (reference 3.2.4): `<card id>:1`. The simulator mints 64 hex
//!   characters; the reference's sample is 50 characters with a redacted `XXX`
//!   tail, so the id is any run of ASCII letters and digits of a plausible
//!   length, not strictly hex.
//! * **Dynamic** (3.2.10, 3.2.11): `<card id>:0:<one-time code>[:<field>]*`,
//!   e.g. `D109…FA1:0:BOE3…312::35020001001`. The reference's sample id has 48
//!   characters and contains an `S` (errata, DESIGN §9), so dynamic codes are
//!   recognised by their `:0:` structure, never by hex length.
//! * **Other**: everything else, passed to HIS untouched.
//!
//! Scanners add CR/LF and sometimes spaces; those are trimmed. A text longer
//! than [`MAX_CODE_LEN`] is refused outright: a jammed or misconfigured
//! scanner can send a megabyte, and no such text belongs on a screen or in a
//! log.
//!
//! A full-width colon `：` is **not** accepted. The agent reads scanners below
//! any input method (serial bytes, raw HID reports, grabbed evdev keys), so a
//! full-width colon can only come from text that went through a Chinese IME
//! on its way in. Rewriting it would mean sending the platform a text that was
//! never on the patient's card; such a text is left as `Other` and HIS sees it
//! as scanned, which is the honest answer.

use std::fmt;

/// Longest text that is classified at all. The longest real code in the
/// reference is about 100 characters; 4 KiB leaves room for hospitals' own
/// 2-D barcodes that share the scanner.
pub const MAX_CODE_LEN: usize = 4096;

/// Bounds on a card id: shortest and longest plausible.
const MIN_ID_LEN: usize = 16;
const MAX_ID_LEN: usize = 128;

/// A classified scan. `text` is the trimmed text, the form sent to the
/// platform and recorded in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub text: String,
    pub code: Code,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    Static {
        card_id: String,
    },
    Dynamic {
        card_id: String,
        /// The one-time part after `:0:`; it is what makes the code expire.
        token: String,
        /// Any further `:`-separated fields (the reference's sample has an
        /// empty one and an issuing organisation code).
        extra: Vec<String>,
    },
    Other,
}

impl Code {
    /// The `codeKind` of the HIS protocol.
    pub fn kind(&self) -> &'static str {
        match self {
            Code::Static { .. } => "static",
            Code::Dynamic { .. } => "dynamic",
            Code::Other => "other",
        }
    }

    pub fn card_id(&self) -> Option<&str> {
        match self {
            Code::Static { card_id } | Code::Dynamic { card_id, .. } => Some(card_id),
            Code::Other => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error("empty scan")]
    Empty,
    #[error("scan of {len} bytes is longer than the {MAX_CODE_LEN}-byte limit")]
    TooLong { len: usize },
}

/// Trim and classify a scanned text.
pub fn classify(raw: &str) -> Result<Scanned, CodeError> {
    if raw.len() > MAX_CODE_LEN {
        return Err(CodeError::TooLong { len: raw.len() });
    }
    let text = raw.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if text.is_empty() {
        return Err(CodeError::Empty);
    }
    Ok(Scanned {
        text: text.to_owned(),
        code: structure(text),
    })
}

fn is_id(s: &str) -> bool {
    (MIN_ID_LEN..=MAX_ID_LEN).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn is_field(s: &str) -> bool {
    s.len() <= MAX_ID_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn structure(text: &str) -> Code {
    let mut parts = text.split(':');
    let id = parts.next().unwrap_or_default();
    let Some(flag) = parts.next() else {
        return Code::Other;
    };
    if !is_id(id) {
        return Code::Other;
    }
    match flag {
        "1" if parts.next().is_none() => Code::Static {
            card_id: id.to_owned(),
        },
        "0" => {
            let rest: Vec<&str> = parts.collect();
            let Some((token, extra)) = rest.split_first() else {
                return Code::Other;
            };
            if token.is_empty() || !is_field(token) || !extra.iter().all(|f| is_field(f)) {
                return Code::Other;
            }
            Code::Dynamic {
                card_id: id.to_owned(),
                token: (*token).to_owned(),
                extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            }
        }
        _ => Code::Other,
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The sample codes printed in the reference (3.2.4, 3.2.10, 3.2.11).
    const REF_STATIC: &str = "C7DA29345B6DF90A6F5BBEBD73EBE2EDA26F341A6CFEEEB121XXX:1";
    const REF_DYNAMIC: &str =
        "D109C4C340995DFC13262A55699FBDAD8S564E8B65796FA1:0:BOE3CC5F50EF5DC663F094C985B58312::35020001001";

    #[test]
    fn reference_samples() {
        let s = classify(REF_STATIC).unwrap();
        assert_eq!(
            s.code,
            Code::Static {
                card_id: "C7DA29345B6DF90A6F5BBEBD73EBE2EDA26F341A6CFEEEB121XXX".into()
            }
        );
        assert_eq!(s.text, REF_STATIC);
        let d = classify(REF_DYNAMIC).unwrap();
        assert_eq!(
            d.code,
            Code::Dynamic {
                card_id: "D109C4C340995DFC13262A55699FBDAD8S564E8B65796FA1".into(),
                token: "BOE3CC5F50EF5DC663F094C985B58312".into(),
                extra: vec!["".into(), "35020001001".into()],
            }
        );
        assert_eq!(d.text, REF_DYNAMIC);
    }

    #[test]
    fn trims_scanner_noise() {
        let s = classify(&format!("  {REF_STATIC}\r\n")).unwrap();
        assert_eq!(s.text, REF_STATIC);
        assert_eq!(s.code.kind(), "static");
    }

    #[test]
    fn others() {
        for t in [
            "6901234567892",                    // EAN-13 from a drug box
            "https://example.org/?a=1:1",       // URL with colons
            "ABC:1",                            // id too short
            "C7DA29345B6DF90A6F5BBEBD73EB:1:2", // static with extra field
            "C7DA29345B6DF90A6F5BBEBD73EB:0",   // dynamic without token
            "C7DA29345B6DF90A6F5BBEBD73EB:0:",  // empty token
            "C7DA29345B6DF90A6F5BBEBD73EB：1",  // full-width colon
            "C7DA29345B6DF90A-F5BBEBD73EB:1",   // non-alphanumeric id
        ] {
            assert_eq!(classify(t).unwrap().code, Code::Other, "{t}");
        }
    }

    #[test]
    fn empty_and_too_long() {
        assert_eq!(classify(" \r\n\0"), Err(CodeError::Empty));
        let big = "A".repeat(1 << 20);
        assert_eq!(classify(&big), Err(CodeError::TooLong { len: 1 << 20 }));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = classify(&s);
        }

        #[test]
        fn never_panics_on_colon_soup(s in "[A-F0-9:：\\s]{0,200}") {
            let _ = classify(&s);
        }

        #[test]
        fn static_round_trips(id in "[0-9A-F]{64}") {
            let text = format!("{id}:1");
            let s = classify(&text).unwrap();
            prop_assert_eq!(s.text, text);
            prop_assert_eq!(s.code, Code::Static { card_id: id });
        }

        #[test]
        fn dynamic_round_trips(id in "[0-9A-Z]{48}", tok in "[0-9A-F]{32}", org in "[0-9]{0,12}") {
            let text = format!("{id}:0:{tok}::{org}");
            let s = classify(&text).unwrap();
            prop_assert_eq!(s.code, Code::Dynamic { card_id: id, token: tok, extra: vec![String::new(), org] });
        }
    }
}
