//! USB HID POS scanners (usage page 0x8C, "HID Point of Sale Usage Tables"):
//! the code arrives as data, not keystrokes, in "scanned data" input reports
//! read from a hidraw node. No keyboard layout, no Alt codes, no desktop
//! typing: the cleanest interface when a scanner offers it.
//!
//! A report carries a length byte and up to 56 data bytes; longer codes span
//! several reports. Vendors lay the report out differently:
//!
//! | layout | report | data | continued |
//! |---|---|---|---|
//! | Honeywell | `[0]` id 0x02, `[1]` data length, `[2..5]` AIM symbology id (`]Q1`), `[5..]` data | after the AIM id | bit 0 of the last byte |
//! | Newland | `[0]` id 0x02, `[1]` data length, `[2..58]` data, `[62]` symbology | right after the length | a full report (56 bytes) is followed by more; a shorter one ends the code |
//!
//! [`Assembler::report`] joins the parts; a code ends at a report that is not
//! continued. Reports with another id (status, settings) are ignored; a
//! length beyond the report is clamped, never trusted.

/// Data bytes in one report.
pub const MAX_DATA: usize = 56;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Honeywell,
    Newland,
}

impl Layout {
    /// Guess from the USB vendor id; Honeywell/Metrologic's layout is the
    /// one the HID POS tables describe, so it is the default.
    pub fn for_vendor(vendor_id: Option<u16>) -> Layout {
        match vendor_id {
            Some(0x1eab) => Layout::Newland,
            _ => Layout::Honeywell,
        }
    }
}

/// Scanned-data report id.
const SCANNED_DATA: u8 = 0x02;

#[derive(Debug)]
pub struct Assembler {
    layout: Layout,
    buf: Vec<u8>,
    max_len: usize,
    overflow: bool,
}

/// What a report completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembled {
    /// A whole code's bytes (not yet checked as UTF-8).
    Code(Vec<u8>),
    /// A code longer than the limit was dropped.
    TooLong,
}

impl Assembler {
    pub fn new(layout: Layout, max_len: usize) -> Self {
        Assembler {
            layout,
            buf: Vec::new(),
            max_len,
            overflow: false,
        }
    }

    /// One input report as read from hidraw (report id first).
    pub fn report(&mut self, r: &[u8]) -> Option<Assembled> {
        if r.len() < 3 || r[0] != SCANNED_DATA {
            return None;
        }
        let len = (r[1] as usize).min(MAX_DATA);
        let (data, continued) = match self.layout {
            Layout::Honeywell => {
                let start = 5.min(r.len());
                let end = (start + len).min(r.len());
                let cont = r.len() >= 64 && r[63] & 0x01 != 0;
                (&r[start..end], cont)
            }
            Layout::Newland => {
                let end = (2 + len).min(r.len());
                (&r[2..end], len == MAX_DATA)
            }
        };
        if self.buf.len() + data.len() > self.max_len {
            self.overflow = true;
            self.buf.clear();
        } else if !self.overflow {
            self.buf.extend_from_slice(data);
        }
        if continued {
            return None;
        }
        let done = if std::mem::take(&mut self.overflow) {
            Assembled::TooLong
        } else {
            Assembled::Code(std::mem::take(&mut self.buf))
        };
        self.buf.clear();
        Some(done)
    }

    /// The line went quiet with a code half-assembled (a Newland code of
    /// exactly 56·n bytes has no short final report): emit what there is.
    pub fn idle(&mut self) -> Option<Assembled> {
        if self.buf.is_empty() && !self.overflow {
            return None;
        }
        if std::mem::take(&mut self.overflow) {
            self.buf.clear();
            return Some(Assembled::TooLong);
        }
        Some(Assembled::Code(std::mem::take(&mut self.buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Honeywell scanned-data report: id, length, AIM id, data, continued bit.
    fn honeywell(data: &[u8], continued: bool) -> [u8; 64] {
        let mut r = [0u8; 64];
        r[0] = 0x02;
        r[1] = data.len() as u8;
        r[2..5].copy_from_slice(b"]Q1");
        r[5..5 + data.len()].copy_from_slice(data);
        r[63] = u8::from(continued);
        r
    }

    /// A Newland scanned-data report: id, length, data, symbology at 62.
    fn newland(data: &[u8]) -> [u8; 64] {
        let mut r = [0u8; 64];
        r[0] = 0x02;
        r[1] = data.len() as u8;
        r[2..2 + data.len()].copy_from_slice(data);
        r[62] = b'Q';
        r
    }

    const CODE: &[u8] = b"D109C4C340995DFC13262A55699FBDAD8S564E8B65796FA1:0:BOE3CC5F50EF5DC663F094C985B58312::35020001001";

    #[test]
    fn honeywell_single_and_continued() {
        let mut a = Assembler::new(Layout::Honeywell, 4096);
        assert_eq!(
            a.report(&honeywell(b"6901234567892", false)),
            Some(Assembled::Code(b"6901234567892".to_vec()))
        );
        let (p1, p2) = CODE.split_at(MAX_DATA);
        assert_eq!(a.report(&honeywell(p1, true)), None);
        assert_eq!(
            a.report(&honeywell(p2, false)),
            Some(Assembled::Code(CODE.to_vec()))
        );
    }

    #[test]
    fn newland_single_and_continued() {
        let mut a = Assembler::new(Layout::Newland, 4096);
        assert_eq!(
            a.report(&newland(b"ABC:1")),
            Some(Assembled::Code(b"ABC:1".to_vec()))
        );
        let (p1, p2) = CODE.split_at(MAX_DATA);
        assert_eq!(a.report(&newland(p1)), None, "a full report continues");
        assert_eq!(a.report(&newland(p2)), Some(Assembled::Code(CODE.to_vec())));
        // Exactly 56 bytes: ends on the idle gap.
        assert_eq!(a.report(&newland(&CODE[..MAX_DATA])), None);
        assert_eq!(a.idle(), Some(Assembled::Code(CODE[..MAX_DATA].to_vec())));
        assert_eq!(a.idle(), None);
    }

    #[test]
    fn other_reports_and_lies_are_harmless() {
        let mut a = Assembler::new(Layout::Honeywell, 4096);
        assert_eq!(
            a.report(&[0x04, 1, 2, 3]),
            None,
            "output/status report ids ignored"
        );
        assert_eq!(a.report(&[]), None);
        assert_eq!(a.report(&[0x02]), None);
        // A length larger than the report is clamped to what is there.
        let mut r = honeywell(b"AB", false);
        r[1] = 250;
        assert!(matches!(a.report(&r[..10]), Some(Assembled::Code(c)) if c.len() == 5));
    }

    #[test]
    fn too_long_is_dropped_once() {
        let mut a = Assembler::new(Layout::Honeywell, 100);
        for _ in 0..3 {
            assert_eq!(a.report(&honeywell(&[b'9'; 56], true)), None);
        }
        assert_eq!(a.report(&honeywell(b"x", false)), Some(Assembled::TooLong));
        assert_eq!(
            a.report(&honeywell(b"ok", false)),
            Some(Assembled::Code(b"ok".to_vec()))
        );
    }

    #[test]
    fn vendor_guess() {
        assert_eq!(Layout::for_vendor(Some(0x1eab)), Layout::Newland);
        assert_eq!(Layout::for_vendor(Some(0x0c2e)), Layout::Honeywell);
        assert_eq!(Layout::for_vendor(None), Layout::Honeywell);
    }
}
