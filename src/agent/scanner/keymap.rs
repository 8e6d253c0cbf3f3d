//! Keyboard-wedge scanners: key presses → text (pure).
//!
//! A scanner in keyboard mode "types" the code. Two sources feed this
//! module:
//!
//! * USB HID boot keyboard reports (8 bytes: modifiers, reserved, six key
//!   usages), read with libusb. Presses are found by diffing each report
//!   against the previous one, as Linux's `usbkbd` does: a usage present now
//!   and absent before is a press. Several keys may be pressed in one report.
//!   The rollover error usages (0x01–0x03, "too many keys") are ignored.
//! * Linux input events (evdev), whose key codes are mapped to the same HID
//!   usages so one table serves both.
//!
//! Layout: US (scanners are configured for it by default; other layouts are
//! a scanner setting, not ours to guess). Shift selects the upper symbol;
//! Caps Lock is ignored (a scanner never sends it meaningfully).
//!
//! **Alt codes** ("Alt mode", how scanners send non-ASCII such as Chinese):
//! while Alt is held, keypad digits accumulate a decimal number; when Alt is
//! released the number becomes one character. A number with a leading zero
//! below 256 is a Windows-1252 code (Alt+0128 = €); otherwise it is the
//! Unicode code point (Alt+20013 = 中), as Newland's and Honeywell's "Unicode
//! Alt" modes send it. Invalid numbers are dropped.

/// Modifier bits of the boot report's first byte.
const LCTRL: u8 = 0x01;
const LSHIFT: u8 = 0x02;
const LALT: u8 = 0x04;
const RCTRL: u8 = 0x10;
const RSHIFT: u8 = 0x20;
const RALT: u8 = 0x40;

/// What a key press produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A character of the code.
    Char(char),
    /// Enter / keypad Enter / Tab: a terminator.
    Enter,
}

/// Text from key events, for one device.
#[derive(Debug, Default)]
pub struct Decoder {
    prev_keys: [u8; 6],
    /// Modifiers as last seen.
    mods: u8,
    /// Decimal digits typed while Alt is held, when alt codes are on.
    alt_digits: Option<String>,
    alt_codes: bool,
}

impl Decoder {
    pub fn new(alt_codes: bool) -> Self {
        Decoder {
            alt_codes,
            ..Default::default()
        }
    }

    /// One 8-byte boot keyboard report (shorter reports are padded; a
    /// leading report ID must be stripped by the caller).
    pub fn report(&mut self, r: &[u8]) -> Vec<Output> {
        let mut out = Vec::new();
        let mods = r.first().copied().unwrap_or(0);
        let mut keys = [0u8; 6];
        for (i, k) in r.iter().skip(2).take(6).enumerate() {
            keys[i] = *k;
        }
        // Rollover error: the whole report is "too many keys"; keep state.
        if keys.iter().any(|k| (1..=3).contains(k)) {
            return out;
        }
        self.set_mods(mods, &mut out);
        for &k in keys.iter().filter(|k| **k != 0) {
            if !self.prev_keys.contains(&k) {
                self.press(k, &mut out);
            }
        }
        self.prev_keys = keys;
        out
    }

    /// A key event from evdev: Linux key code, pressed (1), released (0) or
    /// auto-repeated (2, ignored).
    pub fn evdev_key(&mut self, code: u16, value: i32) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(bit) = linux_modifier(code) {
            let mods = if value == 0 {
                self.mods & !bit
            } else {
                self.mods | bit
            };
            self.set_mods(mods, &mut out);
            return out;
        }
        if value == 1 {
            if let Some(usage) = linux_to_usage(code) {
                self.press(usage, &mut out);
            }
        }
        out
    }

    fn set_mods(&mut self, mods: u8, out: &mut Vec<Output>) {
        let alt_before = self.mods & (LALT | RALT) != 0;
        let alt_now = mods & (LALT | RALT) != 0;
        self.mods = mods;
        if self.alt_codes && alt_now && !alt_before {
            self.alt_digits = Some(String::new());
        }
        if alt_before && !alt_now {
            if let Some(d) = self.alt_digits.take() {
                if let Some(c) = alt_char(&d) {
                    out.push(Output::Char(c));
                }
            }
        }
    }

    fn press(&mut self, usage: u8, out: &mut Vec<Output>) {
        let alt = self.mods & (LALT | RALT) != 0;
        if alt && self.alt_codes {
            if let (Some(d), Some(digit)) = (self.alt_digits.as_mut(), keypad_digit(usage)) {
                if d.len() < 8 {
                    d.push(digit);
                }
            }
            return;
        }
        // Ctrl or Alt chords are not text.
        if self.mods & (LCTRL | RCTRL | LALT | RALT) != 0 {
            return;
        }
        let shift = self.mods & (LSHIFT | RSHIFT) != 0;
        if let Some(o) = usage_output(usage, shift) {
            out.push(o);
        }
    }
}

fn alt_char(digits: &str) -> Option<char> {
    let n: u32 = digits.parse().ok()?;
    if digits.starts_with('0') && n < 256 {
        return windows_1252(n as u8);
    }
    char::from_u32(n).filter(|c| !c.is_control() || *c == '\t')
}

/// Windows-1252's 0x80–0x9F block; the rest is Latin-1.
fn windows_1252(b: u8) -> Option<char> {
    const HIGH: [u16; 32] = [
        0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039,
        0x0152, 0, 0x017D, 0, 0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC,
        0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178,
    ];
    match b {
        0x80..=0x9F => char::from_u32(u32::from(HIGH[(b - 0x80) as usize])).filter(|c| *c != '\0'),
        0x00..=0x1F => None,
        _ => Some(b as char),
    }
}

fn keypad_digit(usage: u8) -> Option<char> {
    match usage {
        0x59..=0x61 => Some((b'1' + (usage - 0x59)) as char),
        0x62 => Some('0'),
        // Some scanners send the top-row digits in Alt mode.
        0x1E..=0x26 => Some((b'1' + (usage - 0x1E)) as char),
        0x27 => Some('0'),
        _ => None,
    }
}

/// A HID keyboard usage (page 0x07) to its US-layout output.
pub fn usage_output(usage: u8, shift: bool) -> Option<Output> {
    let c = match usage {
        0x04..=0x1D => {
            let c = (b'a' + (usage - 0x04)) as char;
            if shift {
                c.to_ascii_uppercase()
            } else {
                c
            }
        }
        0x1E..=0x27 => {
            const PLAIN: &[u8; 10] = b"1234567890";
            const SHIFTED: &[u8; 10] = b"!@#$%^&*()";
            let i = (usage - 0x1E) as usize;
            (if shift { SHIFTED[i] } else { PLAIN[i] }) as char
        }
        0x28 | 0x58 | 0x2B => return Some(Output::Enter),
        0x2C => ' ',
        0x2D => pick(shift, '-', '_'),
        0x2E => pick(shift, '=', '+'),
        0x2F => pick(shift, '[', '{'),
        0x30 => pick(shift, ']', '}'),
        0x31 => pick(shift, '\\', '|'),
        0x33 => pick(shift, ';', ':'),
        0x34 => pick(shift, '\'', '"'),
        0x35 => pick(shift, '`', '~'),
        0x36 => pick(shift, ',', '<'),
        0x37 => pick(shift, '.', '>'),
        0x38 => pick(shift, '/', '?'),
        0x54 => '/',
        0x55 => '*',
        0x56 => '-',
        0x57 => '+',
        0x59..=0x61 => (b'1' + (usage - 0x59)) as char,
        0x62 => '0',
        0x63 => '.',
        _ => return None,
    };
    Some(Output::Char(c))
}

fn pick(shift: bool, plain: char, shifted: char) -> char {
    if shift {
        shifted
    } else {
        plain
    }
}

/// Linux modifier key codes → boot report modifier bits.
fn linux_modifier(code: u16) -> Option<u8> {
    Some(match code {
        29 => LCTRL,
        42 => LSHIFT,
        56 => LALT,
        97 => RCTRL,
        54 => RSHIFT,
        100 => RALT,
        _ => return None,
    })
}

/// Linux key codes (input-event-codes.h) → HID keyboard usages: the inverse
/// of the kernel's `hid_keyboard` table for the keys a scanner types.
pub fn linux_to_usage(code: u16) -> Option<u8> {
    const LETTERS: [(u16, u8); 26] = [
        (30, 0x04),
        (48, 0x05),
        (46, 0x06),
        (32, 0x07),
        (18, 0x08),
        (33, 0x09),
        (34, 0x0A),
        (35, 0x0B),
        (23, 0x0C),
        (36, 0x0D),
        (37, 0x0E),
        (38, 0x0F),
        (50, 0x10),
        (49, 0x11),
        (24, 0x12),
        (25, 0x13),
        (16, 0x14),
        (19, 0x15),
        (31, 0x16),
        (20, 0x17),
        (22, 0x18),
        (47, 0x19),
        (17, 0x1A),
        (45, 0x1B),
        (21, 0x1C),
        (44, 0x1D),
    ];
    if let Some((_, u)) = LETTERS.iter().find(|(c, _)| *c == code) {
        return Some(*u);
    }
    Some(match code {
        2..=10 => 0x1E + (code - 2) as u8, // 1..9
        11 => 0x27,                        // 0
        28 => 0x28,                        // Enter
        15 => 0x2B,                        // Tab
        57 => 0x2C,                        // Space
        12 => 0x2D,
        13 => 0x2E,
        26 => 0x2F,
        27 => 0x30,
        43 => 0x31,
        39 => 0x33,
        40 => 0x34,
        41 => 0x35,
        51 => 0x36,
        52 => 0x37,
        53 => 0x38,
        98 => 0x54, // KP /
        55 => 0x55, // KP *
        74 => 0x56, // KP -
        78 => 0x57, // KP +
        96 => 0x58, // KP Enter
        79 => 0x59, // KP1
        80 => 0x5A,
        81 => 0x5B,
        75 => 0x5C,
        76 => 0x5D,
        77 => 0x5E,
        71 => 0x5F,
        72 => 0x60,
        73 => 0x61,
        82 => 0x62, // KP0
        83 => 0x63, // KP .
        _ => return None,
    })
}

/// Decoded outputs → text with a terminator: what the framer expects.
pub fn to_bytes(outs: &[Output]) -> Vec<u8> {
    let mut v = Vec::new();
    for o in outs {
        match o {
            Output::Char(c) => {
                let mut b = [0u8; 4];
                v.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
            Output::Enter => v.push(b'\n'),
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(mods: u8, keys: &[u8]) -> [u8; 8] {
        let mut r = [0u8; 8];
        r[0] = mods;
        r[2..2 + keys.len()].copy_from_slice(keys);
        r
    }

    fn type_reports(d: &mut Decoder, reports: &[[u8; 8]]) -> String {
        let mut outs = Vec::new();
        for r in reports {
            outs.extend(d.report(r));
        }
        String::from_utf8(to_bytes(&outs)).unwrap()
    }

    #[test]
    fn letters_digits_shift_and_enter() {
        let mut d = Decoder::new(false);
        // "Ab1:" then Enter, each key pressed and released.
        let s = type_reports(
            &mut d,
            &[
                rep(LSHIFT, &[0x04]),
                rep(0, &[]),
                rep(0, &[0x05]),
                rep(0, &[]),
                rep(0, &[0x1E]),
                rep(0, &[]),
                rep(RSHIFT, &[0x33]),
                rep(0, &[]),
                rep(0, &[0x28]),
                rep(0, &[]),
            ],
        );
        assert_eq!(s, "Ab1:\n");
    }

    #[test]
    fn several_keys_in_one_report_and_held_keys() {
        let mut d = Decoder::new(false);
        // Scanners that type fast put several new keys in one report; a key
        // still held in the next report is not pressed again.
        let s = type_reports(
            &mut d,
            &[
                rep(0, &[0x04, 0x05, 0x06]),
                rep(0, &[0x06, 0x07]),
                rep(0, &[]),
            ],
        );
        assert_eq!(s, "abcd");
        // The same key twice needs a release in between.
        let s = type_reports(
            &mut d,
            &[
                rep(0, &[0x04]),
                rep(0, &[0x04]),
                rep(0, &[]),
                rep(0, &[0x04]),
            ],
        );
        assert_eq!(s, "aa");
    }

    #[test]
    fn rollover_errors_are_ignored() {
        let mut d = Decoder::new(false);
        let s = type_reports(
            &mut d,
            &[
                rep(0, &[0x04]),
                rep(0, &[1, 1, 1, 1, 1, 1]),
                rep(0, &[0x04, 0x05]),
                rep(0, &[]),
            ],
        );
        assert_eq!(s, "ab");
    }

    #[test]
    fn keypad_digits() {
        let mut d = Decoder::new(false);
        let s = type_reports(
            &mut d,
            &[
                rep(0, &[0x59]),
                rep(0, &[0x62]),
                rep(0, &[0x63]),
                rep(0, &[0x58]),
                rep(0, &[]),
            ],
        );
        assert_eq!(s, "10.\n");
    }

    #[test]
    fn alt_codes_decode_unicode_and_cp1252() {
        let mut d = Decoder::new(true);
        // Alt held, keypad 2 0 0 1 3, Alt released: 中 (U+4E2D = 20013).
        let keys = [0x5A, 0x62, 0x62, 0x59, 0x5B];
        let mut reports = vec![rep(LALT, &[])];
        for k in keys {
            reports.push(rep(LALT, &[k]));
            reports.push(rep(LALT, &[]));
        }
        reports.push(rep(0, &[]));
        assert_eq!(type_reports(&mut d, &reports), "中");
        // Alt+0128 = € (Windows-1252).
        let mut reports = vec![rep(LALT, &[])];
        for k in [0x62, 0x59, 0x5A, 0x60] {
            reports.push(rep(LALT, &[k]));
            reports.push(rep(LALT, &[]));
        }
        reports.push(rep(0, &[]));
        assert_eq!(type_reports(&mut d, &reports), "€");
        // Without alt_codes, Alt chords type nothing.
        let mut plain = Decoder::new(false);
        assert_eq!(
            type_reports(&mut plain, &[rep(LALT, &[0x5A]), rep(0, &[])]),
            ""
        );
    }

    #[test]
    fn evdev_path_uses_the_same_table() {
        let mut d = Decoder::new(true);
        let mut outs = Vec::new();
        // Shift+A, b, Enter.
        for (code, v) in [
            (42, 1),
            (30, 1),
            (30, 0),
            (42, 0),
            (48, 1),
            (48, 0),
            (28, 1),
            (28, 0),
        ] {
            outs.extend(d.evdev_key(code, v));
        }
        assert_eq!(to_bytes(&outs), b"Ab\n");
        // Alt + KP2 KP0 KP0 KP1 KP3 → 中; autorepeat (2) ignored.
        let mut outs = Vec::new();
        outs.extend(d.evdev_key(56, 1));
        for code in [80, 82, 82, 79, 81] {
            outs.extend(d.evdev_key(code, 1));
            outs.extend(d.evdev_key(code, 2));
            outs.extend(d.evdev_key(code, 0));
        }
        outs.extend(d.evdev_key(56, 0));
        assert_eq!(String::from_utf8(to_bytes(&outs)).unwrap(), "中");
    }

    #[test]
    fn a_whole_health_card_code_via_reports() {
        // A static code typed as a scanner does: press, release, Enter.
        let code = "C7DA29345B6DF90A6F5BBEBD73EBE2EDA26F341A6CFEEEB121A0B1C2D3E4F50617:1";
        let mut reports = Vec::new();
        for ch in code.chars() {
            let (usage, shift) = match ch {
                'A'..='Z' => (0x04 + (ch as u8 - b'A'), true),
                '1'..='9' => (0x1E + (ch as u8 - b'1'), false),
                '0' => (0x27, false),
                ':' => (0x33, true),
                _ => unreachable!(),
            };
            reports.push(rep(if shift { LSHIFT } else { 0 }, &[usage]));
            reports.push(rep(0, &[]));
        }
        reports.push(rep(0, &[0x28]));
        reports.push(rep(0, &[]));
        let mut d = Decoder::new(false);
        assert_eq!(type_reports(&mut d, &reports), format!("{code}\n"));
    }

    #[test]
    fn garbage_reports_never_panic() {
        let mut d = Decoder::new(true);
        for i in 0..=255u8 {
            let _ = d.report(&[i, i, i, i.wrapping_mul(7), i, 0xFF, 0xE0, i]);
            let _ = d.report(&[i]);
            let _ = d.report(&[]);
            let _ = d.evdev_key(u16::from(i) * 3, i32::from(i % 3));
        }
    }
}
