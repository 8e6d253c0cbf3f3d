//! Masking of personal data before it can reach a log (DESIGN §6): names
//! (`张*`), ID numbers (`4301**********1234`), phone numbers
//! (`188****8808`) and QR texts (first 8 characters).
//!
//! Log lines take these through `%pii::qr(text)` and friends; the HIS
//! socket, which must carry the real values, never goes through here.

use std::fmt;

/// A QR text or any scanned text: its first 8 characters and its length.
pub fn qr(text: &str) -> Masked {
    let head: String = text.chars().take(8).collect();
    Masked(format!("{head}…({} chars)", text.chars().count()))
}

/// A name: the first character, then `*`.
pub fn name(text: &str) -> Masked {
    let mut c = text.chars();
    Masked(match c.next() {
        Some(first) => format!("{first}*"),
        None => String::new(),
    })
}

/// An ID number: the first 4 and last 4 characters.
pub fn id_number(text: &str) -> Masked {
    keep_ends(text, 4, 4)
}

/// A phone number: the first 3 and last 4 digits.
pub fn phone(text: &str) -> Masked {
    keep_ends(text, 3, 4)
}

fn keep_ends(text: &str, head: usize, tail: usize) -> Masked {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= head + tail {
        return Masked("*".repeat(chars.len()));
    }
    let mut s: String = chars[..head].iter().collect();
    s.extend(std::iter::repeat_n('*', chars.len() - head - tail));
    s.extend(&chars[chars.len() - tail..]);
    Masked(s)
}

/// A masked value, for `%` in tracing fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masked(String);

impl fmt::Display for Masked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_as_design_says() {
        assert_eq!(name("张三").to_string(), "张*");
        assert_eq!(
            id_number("430101199001011234").to_string(),
            "4301**********1234"
        );
        assert_eq!(phone("18808808808").to_string(), "188****8808");
        assert_eq!(qr("C7DA29345B6DF90A:1").to_string(), "C7DA2934…(18 chars)");
        assert_eq!(id_number("123").to_string(), "***");
        assert_eq!(name("").to_string(), "");
    }
}
