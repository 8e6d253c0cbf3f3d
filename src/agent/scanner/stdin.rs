//! The `stdin` scanner: scans arrive as lines on standard input (the demo,
//! and kiosk software that pipes scans in). Same framing rules as a device:
//! bounded length, invalid UTF-8 reported, debounce.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::mpsc;

use super::framing::{Event, Framer};
use super::{Arrivals, Scan, MAX_SCAN_LEN};
use crate::config::Terminator;

/// Read `input` until EOF, sending each scan and telling `arrivals` when
/// one starts. Returns the number of scans.
pub async fn run<R: AsyncRead + Unpin>(
    name: String,
    input: R,
    debounce: Duration,
    tx: mpsc::Sender<Scan>,
    arrivals: Arrivals,
) -> usize {
    run_mapped(name, input, debounce, tx, arrivals, |s| s).await
}

/// [`run`], with each scan's text passed through `map` first (the demo
/// expands its `@` shortcuts here).
pub async fn run_mapped<R: AsyncRead + Unpin>(
    name: String,
    mut input: R,
    debounce: Duration,
    tx: mpsc::Sender<Scan>,
    arrivals: Arrivals,
    map: impl Fn(String) -> String,
) -> usize {
    let mut framer = Framer::new(Terminator::Lf, MAX_SCAN_LEN, debounce);
    let mut buf = vec![0u8; 8192];
    let mut sent = 0;
    loop {
        let n = match input.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(scanner = %name, error = %e, "standard input failed; stdin scanner stops");
                break;
            }
        };
        for ev in framer.push(&buf[..n], Instant::now()) {
            if deliver(&name, ev, &tx, &arrivals, &map).await {
                sent += 1;
            }
        }
    }
    // A last line without newline still counts.
    for ev in framer.push(b"\n", Instant::now()) {
        if deliver(&name, ev, &tx, &arrivals, &map).await {
            sent += 1;
        }
    }
    tracing::info!(scanner = %name, scans = sent, "stdin scanner reached end of input");
    sent
}

async fn deliver(
    name: &str,
    ev: Event,
    tx: &mpsc::Sender<Scan>,
    arrivals: &Arrivals,
    map: &impl Fn(String) -> String,
) -> bool {
    match ev {
        Event::Started => {
            arrivals.started();
            false
        }
        Event::Scan(text) => tx
            .send(Scan {
                scanner: name.to_owned(),
                text: map(text),
                at: crate::clock::now_unix(),
            })
            .await
            .is_ok(),
        Event::TooLong(len) => {
            tracing::warn!(scanner = %name, len, limit = MAX_SCAN_LEN, "scan longer than the limit discarded");
            false
        }
        Event::NotUtf8(len) => {
            tracing::warn!(scanner = %name, len, "scan with bytes that are not UTF-8 discarded");
            false
        }
    }
}
