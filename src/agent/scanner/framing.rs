//! Turning a scanner's byte stream into scans (pure: bytes and instants in,
//! events out).
//!
//! * A scan ends at the configured terminator (`cr`, `lf`, `crlf`), or, with
//!   `none`, after `idle` with no byte (the caller calls [`Framer::idle`]
//!   when its read times out).
//! * A scan longer than `max_len` is discarded up to the next terminator and
//!   reported once; the buffer never grows past `max_len`, whatever the
//!   device sends.
//! * Bytes that are not UTF-8 make a `NotUtf8` event, never a panic.
//! * The same text again within `debounce` is one scan: scanners in
//!   continuous mode re-read the code held under them.

use std::time::{Duration, Instant};

use crate::config::Terminator;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The first byte of a scan arrived (the rest follows over the next
    /// 70–350 ms): time enough to open the platform connection.
    Started,
    Scan(String),
    /// A scan longer than the limit was discarded (its length so far).
    TooLong(usize),
    /// A scan's bytes were not UTF-8.
    NotUtf8(usize),
}

#[derive(Debug)]
pub struct Framer {
    terminator: Terminator,
    max_len: usize,
    debounce: Duration,
    buf: Vec<u8>,
    /// Bytes dropped from the current overlong scan, 0 if none.
    discarding: usize,
    /// `Started` was reported for the scan being read.
    started: bool,
    last: Option<(String, Instant)>,
}

impl Framer {
    pub fn new(terminator: Terminator, max_len: usize, debounce: Duration) -> Self {
        Framer {
            terminator,
            max_len,
            debounce,
            buf: Vec::new(),
            discarding: 0,
            started: false,
            last: None,
        }
    }

    /// Feed bytes read at `now`.
    pub fn push(&mut self, bytes: &[u8], now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        for &b in bytes {
            let ends = match self.terminator {
                Terminator::Cr => b == b'\r',
                Terminator::Lf | Terminator::Crlf => b == b'\n',
                Terminator::None => false,
            };
            if ends {
                self.end(now, &mut out);
            } else if self.discarding > 0 {
                self.discarding += 1;
            } else if self.buf.len() >= self.max_len {
                self.discarding = self.buf.len() + 1;
                self.buf.clear();
            } else {
                if !self.started && !b.is_ascii_whitespace() {
                    self.started = true;
                    out.push(Event::Started);
                }
                self.buf.push(b);
            }
        }
        out
    }

    /// The line has been quiet for the idle gap: with terminator `none`
    /// that ends the scan. (With a terminator, a partial scan is kept: a
    /// slow serial line can pause mid-code.)
    pub fn idle(&mut self, now: Instant) -> Vec<Event> {
        let mut out = Vec::new();
        if self.terminator == Terminator::None {
            self.end(now, &mut out);
        }
        out
    }

    fn end(&mut self, now: Instant, out: &mut Vec<Event>) {
        self.started = false;
        if self.discarding > 0 {
            out.push(Event::TooLong(self.discarding));
            self.discarding = 0;
            self.buf.clear();
            return;
        }
        let mut bytes = std::mem::take(&mut self.buf);
        if self.terminator == Terminator::Crlf && bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return;
        }
        match String::from_utf8(bytes) {
            Err(e) => out.push(Event::NotUtf8(e.as_bytes().len())),
            Ok(text) => {
                if let Some((prev, at)) = &self.last {
                    if *prev == text && now.duration_since(*at) < self.debounce {
                        return;
                    }
                }
                self.last = Some((text.clone(), now));
                out.push(Event::Scan(text));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(t: Terminator) -> Framer {
        Framer::new(t, 16, Duration::from_millis(1500))
    }

    impl Framer {
        /// `push` without the `Started` events.
        fn scans(&mut self, b: &[u8], now: Instant) -> Vec<Event> {
            let mut v = self.push(b, now);
            v.retain(|e| *e != Event::Started);
            v
        }
    }

    /// The first byte of each scan is told once, before the rest arrives;
    /// blank lines and the terminator tell nothing.
    #[test]
    fn the_first_byte_of_a_scan_is_told_once() {
        let now = Instant::now();
        let mut x = f(Terminator::Lf);
        assert_eq!(x.push(b"\r\n  ", now), []);
        assert_eq!(x.push(b"A", now), [Event::Started]);
        assert_eq!(x.push(b"BC", now), []);
        assert_eq!(
            x.push(b"D\nE", now),
            [Event::Scan("  ABCD".into()), Event::Started]
        );
    }

    #[test]
    fn terminators() {
        let now = Instant::now();
        assert_eq!(
            f(Terminator::Cr).scans(b"AB\rCD\r", now),
            [Event::Scan("AB".into()), Event::Scan("CD".into())]
        );
        assert_eq!(
            f(Terminator::Lf).scans(b"AB\nCD", now),
            [Event::Scan("AB".into())]
        );
        assert_eq!(
            f(Terminator::Crlf).scans(b"AB\r\nCD\r\n", now),
            [Event::Scan("AB".into()), Event::Scan("CD".into())]
        );
        let mut n = f(Terminator::None);
        assert!(n.scans(b"AB\r\n", now).is_empty());
        assert_eq!(n.idle(now), [Event::Scan("AB\r\n".into())]);
        assert!(n.idle(now).is_empty(), "nothing buffered");
    }

    #[test]
    fn split_reads_join() {
        let now = Instant::now();
        let mut x = f(Terminator::Cr);
        assert!(x.scans(b"A", now).is_empty());
        assert!(x.idle(now).is_empty(), "a pause mid-code does not end it");
        assert_eq!(x.scans(b"B\r", now), [Event::Scan("AB".into())]);
    }

    #[test]
    fn overlong_is_discarded_to_the_terminator_without_growing() {
        let now = Instant::now();
        let mut x = f(Terminator::Lf);
        let burst = vec![b'7'; 1 << 20];
        assert!(x.scans(&burst, now).is_empty());
        assert!(x.buf.capacity() <= 64, "buffer stays bounded");
        assert_eq!(
            x.scans(b"\nOK\n", now),
            [Event::TooLong(1 << 20), Event::Scan("OK".into())]
        );
    }

    #[test]
    fn garbage_and_blank() {
        let now = Instant::now();
        let mut x = f(Terminator::Lf);
        assert_eq!(x.scans(b"\xff\xfe\x00\n", now), [Event::NotUtf8(3)]);
        assert!(x.scans(b"  \n\n", now).is_empty());
    }

    #[test]
    fn debounce() {
        let t0 = Instant::now();
        let mut x = f(Terminator::Lf);
        assert_eq!(x.scans(b"A\n", t0).len(), 1);
        assert!(x.scans(b"A\n", t0 + Duration::from_millis(1000)).is_empty());
        assert_eq!(x.scans(b"B\n", t0 + Duration::from_millis(1100)).len(), 1);
        assert_eq!(
            x.scans(b"A\n", t0 + Duration::from_millis(1200)).len(),
            1,
            "a different code in between"
        );
        assert_eq!(
            x.scans(b"A\n", t0 + Duration::from_millis(2800)).len(),
            1,
            "after the window"
        );
    }
}
