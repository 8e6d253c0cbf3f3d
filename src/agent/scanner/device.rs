//! Scanner tasks: open the configured device, read scans, survive unplugging.
//!
//! One task per `[[scanner]]`. Each loops: open the device (by its configured
//! path, typically a `/dev/serial/by-id/` or `/dev/input/by-id/` name, so a
//! replugged device is found again wherever it enumerates), read until it
//! goes away (a serial read of 0 bytes or an I/O error, `ENODEV` from evdev
//! or hidraw), close it, wait [`RETRY`] and open again. Never a busy loop: a
//! missing device costs one `open` per [`RETRY`].
//!
//! Kinds:
//! * `serial`: tokio-serial, 8N1 at the configured baud, opened exclusively
//!   (`TIOCEXCL`) so no other program reads half the scans;
//! * `evdev`: any keyboard-like input device, grabbed (`EVIOCGRAB`) so the
//!   keys reach only the agent, not the desktop; key codes go through
//!   [`super::keymap`];
//! * `hid-pos`: a hidraw node of a HID POS scanner, reports assembled by
//!   [`super::hidpos`];
//! * `usb-hid`: libusb on a thread of its own, see [`super::usb`];
//! * `stdin`: see [`super::stdin`].
//!
//! Every state change is logged and kept in [`ScannerStates`] for `status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::framing::{Event, Framer};
use super::hidpos::{Assembled, Assembler, Layout};
use super::keymap::{self, Decoder};
use super::{Scan, ScannerState, MAX_SCAN_LEN};
use crate::config::{ScannerKind, ScannerSection, Terminator};

/// Pause between attempts to open a missing or failed device.
pub const RETRY: Duration = Duration::from_secs(1);

/// A scanner as `status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScannerStatus {
    pub kind: String,
    pub device: String,
    #[serde(flatten)]
    pub state: ScannerState,
    /// Unix time of the last state change.
    pub since: i64,
    pub scans: u64,
}

/// Every scanner's status, by name.
#[derive(Clone, Default)]
pub struct ScannerStates {
    map: Arc<Mutex<BTreeMap<String, ScannerStatus>>>,
    arrivals: super::Arrivals,
}

impl ScannerStates {
    /// Where every scanner tells that a scan started arriving.
    pub fn arrivals(&self) -> super::Arrivals {
        self.arrivals.clone()
    }

    pub fn snapshot(&self) -> BTreeMap<String, ScannerStatus> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn register(&self, spec: &ScannerSection) {
        let kind = serde_json::to_value(spec.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let device = match (&spec.path, spec.vendor_id) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(v)) => format!(
                "{v:04x}:{}",
                spec.product_id
                    .map(|p| format!("{p:04x}"))
                    .unwrap_or_else(|| "*".into())
            ),
            (None, None) => "-".into(),
        };
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(
            spec.name.clone(),
            ScannerStatus {
                kind,
                device,
                // Not opened yet: the first attempt is a logged change.
                state: ScannerState::Closed,
                since: crate::clock::now_unix(),
                scans: 0,
            },
        );
    }

    /// Forget a scanner a reload removed.
    pub fn unregister(&self, name: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Record a state; logs only real changes.
    pub fn set(&self, name: &str, state: ScannerState) {
        let mut g = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = g.get_mut(name) else { return };
        if s.state == state {
            return;
        }
        match &state {
            ScannerState::Connected => {
                tracing::info!(scanner = %name, device = %s.device, "scanner connected")
            }
            ScannerState::WaitingForDevice => {
                tracing::warn!(scanner = %name, device = %s.device, "scanner unplugged or not present; waiting for it")
            }
            ScannerState::Error { cause } => {
                tracing::warn!(scanner = %name, device = %s.device, cause = %cause, "scanner cannot be used")
            }
            ScannerState::Closed => tracing::info!(scanner = %name, "scanner closed"),
        }
        s.state = state;
        s.since = crate::clock::now_unix();
    }

    pub(crate) fn scanned(&self, name: &str) {
        if let Some(s) = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(name)
        {
            s.scans += 1;
        }
    }

    /// A name's current state.
    pub fn state(&self, name: &str) -> Option<ScannerState> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|s| s.state.clone())
    }
}

/// Why a device session ended.
enum End {
    Cancelled,
    Gone(String),
}

/// Frames text and hands scans on; shared by every kind.
struct Sink {
    name: String,
    framer: Framer,
    tx: mpsc::Sender<Scan>,
    states: ScannerStates,
}

impl Sink {
    fn new(
        spec: &ScannerSection,
        terminator: Terminator,
        tx: mpsc::Sender<Scan>,
        states: ScannerStates,
    ) -> Sink {
        Sink {
            name: spec.name.clone(),
            framer: Framer::new(
                terminator,
                MAX_SCAN_LEN,
                Duration::from_millis(spec.debounce_ms),
            ),
            tx,
            states,
        }
    }

    async fn push(&mut self, bytes: &[u8]) -> bool {
        let events = self.framer.push(bytes, Instant::now());
        self.emit(events).await
    }

    async fn idle(&mut self) -> bool {
        let events = self.framer.idle(Instant::now());
        self.emit(events).await
    }

    /// `false` when the pipeline is gone (shutdown).
    async fn emit(&mut self, events: Vec<Event>) -> bool {
        for ev in events {
            match ev {
                Event::Started => self.states.arrivals.started(),
                Event::Scan(text) => {
                    self.states.scanned(&self.name);
                    let scan = Scan {
                        scanner: self.name.clone(),
                        text,
                        at: crate::clock::now_unix(),
                    };
                    if self.tx.send(scan).await.is_err() {
                        return false;
                    }
                }
                Event::TooLong(len) => {
                    tracing::warn!(scanner = %self.name, len, limit = MAX_SCAN_LEN, "scan longer than the limit discarded")
                }
                Event::NotUtf8(len) => {
                    tracing::warn!(scanner = %self.name, len, "scan with bytes that are not UTF-8 discarded")
                }
            }
        }
        true
    }
}

/// Keyboard-like devices end a scan with Enter; `none` uses the idle gap.
fn keyboard_terminator(spec: &ScannerSection) -> Terminator {
    if spec.terminator == Terminator::None {
        Terminator::None
    } else {
        Terminator::Lf
    }
}

/// Run one scanner until `cancel`. (`stdin` and `usb-hid` have their own.)
pub async fn run(
    spec: ScannerSection,
    tx: mpsc::Sender<Scan>,
    states: ScannerStates,
    cancel: CancellationToken,
) {
    states.register(&spec);
    if spec.kind == ScannerKind::UsbHid {
        super::usb::run(spec, tx, states, cancel).await;
        return;
    }
    loop {
        let end = match spec.kind {
            ScannerKind::Serial => serial_session(&spec, &tx, &states, &cancel).await,
            ScannerKind::Evdev => evdev_session(&spec, &tx, &states, &cancel).await,
            ScannerKind::HidPos => hidpos_session(&spec, &tx, &states, &cancel).await,
            ScannerKind::Stdin | ScannerKind::UsbHid => return,
        };
        match end {
            End::Cancelled => break,
            End::Gone(why) => {
                tracing::debug!(scanner = %spec.name, reason = %why, "device session ended");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
    states.set(&spec.name, ScannerState::Closed);
}

/// The device went away (unplugged, or an I/O error): wait for it.
fn unplugged(states: &ScannerStates, name: &str, why: impl std::fmt::Display) -> End {
    states.set(name, ScannerState::WaitingForDevice);
    End::Gone(why.to_string())
}

/// The device is there but cannot be used as configured.
fn unusable(states: &ScannerStates, name: &str, cause: String) -> End {
    states.set(
        name,
        ScannerState::Error {
            cause: cause.clone(),
        },
    );
    End::Gone(cause)
}

/// Open failures: a missing node means "waiting", anything else an error.
fn open_failed(states: &ScannerStates, name: &str, e: &std::io::Error) -> End {
    if e.kind() == std::io::ErrorKind::NotFound
        || e.raw_os_error() == Some(nix::libc::ENODEV)
        || e.raw_os_error() == Some(nix::libc::ENXIO)
    {
        unplugged(states, name, e)
    } else {
        unusable(states, name, e.to_string())
    }
}

async fn serial_session(
    spec: &ScannerSection,
    tx: &mpsc::Sender<Scan>,
    states: &ScannerStates,
    cancel: &CancellationToken,
) -> End {
    use tokio_serial::SerialPortBuilderExt as _;
    let path = spec.path.clone().unwrap_or_default();
    let builder = tokio_serial::new(path.to_string_lossy(), spec.baud.unwrap_or(9600))
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None);
    let mut port = match builder.open_native_async() {
        Ok(p) => p,
        Err(e) => return open_failed(states, &spec.name, &std::io::Error::from(e)),
    };
    if let Err(e) = port.set_exclusive(true) {
        return unusable(states, &spec.name, format!("cannot open exclusively: {e}"));
    }
    states.set(&spec.name, ScannerState::Connected);
    let mut sink = Sink::new(spec, spec.terminator, tx.clone(), states.clone());
    let idle = Duration::from_millis(spec.idle_ms.max(1));
    let mut buf = [0u8; 1024];
    let mut pending = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return End::Cancelled,
            r = port.read(&mut buf) => match r {
                Ok(0) => return unplugged(states, &spec.name, "end of file"),
                Ok(n) => {
                    pending = true;
                    if !sink.push(&buf[..n]).await { return End::Cancelled }
                }
                Err(e) => return unplugged(states, &spec.name, e),
            },
            _ = tokio::time::sleep(idle), if pending => {
                pending = false;
                if !sink.idle().await { return End::Cancelled }
            }
        }
    }
}

async fn evdev_session(
    spec: &ScannerSection,
    tx: &mpsc::Sender<Scan>,
    states: &ScannerStates,
    cancel: &CancellationToken,
) -> End {
    let path = spec.path.clone().unwrap_or_default();
    let mut dev = match evdev::Device::open(&path) {
        Ok(d) => d,
        Err(e) => return open_failed(states, &spec.name, &e),
    };
    if let Err(e) = dev.grab() {
        // Without the grab the scanner would also type into the desktop.
        return unusable(
            states,
            &spec.name,
            format!("cannot grab the device (is another program holding it?): {e}"),
        );
    }
    let mut events = match dev.into_event_stream() {
        Ok(s) => s,
        Err(e) => return open_failed(states, &spec.name, &e),
    };
    states.set(&spec.name, ScannerState::Connected);
    let mut decoder = Decoder::new(spec.alt_codes);
    let mut sink = Sink::new(spec, keyboard_terminator(spec), tx.clone(), states.clone());
    let idle = Duration::from_millis(spec.idle_ms.max(1));
    let mut pending = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return End::Cancelled,
            ev = events.next_event() => match ev {
                Ok(ev) if ev.event_type() == evdev::EventType::KEY => {
                    let out = decoder.evdev_key(ev.code(), ev.value());
                    if !out.is_empty() {
                        pending = true;
                        if !sink.push(&keymap::to_bytes(&out)).await { return End::Cancelled }
                    }
                }
                Ok(_) => {}
                Err(e) => return unplugged(states, &spec.name, e),
            },
            _ = tokio::time::sleep(idle), if pending => {
                pending = false;
                if !sink.idle().await { return End::Cancelled }
            }
        }
    }
}

/// The hidraw node of a HID POS scanner: the configured path, or the node
/// whose USB ids match.
fn hidpos_path(spec: &ScannerSection) -> Option<PathBuf> {
    if let Some(p) = &spec.path {
        return Some(p.clone());
    }
    let vid = spec.vendor_id?;
    super::sysfs::hidraw_for(vid, spec.product_id).map(|n| Path::new("/dev").join(n))
}

async fn hidpos_session(
    spec: &ScannerSection,
    tx: &mpsc::Sender<Scan>,
    states: &ScannerStates,
    cancel: &CancellationToken,
) -> End {
    let Some(path) = hidpos_path(spec) else {
        return unplugged(states, &spec.name, "no matching hidraw node");
    };
    // hidraw hands out one report per read; tokio's File reads on the
    // blocking pool, and a read cut short by the idle timer keeps its data
    // for the next one.
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return open_failed(states, &spec.name, &e),
    };
    states.set(&spec.name, ScannerState::Connected);
    let mut asm = Assembler::new(Layout::for_vendor(spec.vendor_id), MAX_SCAN_LEN);
    let mut sink = Sink::new(spec, Terminator::Lf, tx.clone(), states.clone());
    let idle = Duration::from_millis(spec.idle_ms.max(50));
    let mut buf = [0u8; 256];
    let mut pending = false;
    loop {
        let done = tokio::select! {
            _ = cancel.cancelled() => return End::Cancelled,
            r = file.read(&mut buf) => match r {
                Ok(0) => return unplugged(states, &spec.name, "end of file"),
                Ok(n) => { pending = true; asm.report(&buf[..n]) }
                Err(e) => return unplugged(states, &spec.name, e),
            },
            _ = tokio::time::sleep(idle), if pending => { pending = false; asm.idle() }
        };
        match done {
            Some(Assembled::Code(mut bytes)) => {
                pending = false;
                bytes.push(b'\n');
                if !sink.push(&bytes).await {
                    return End::Cancelled;
                }
            }
            Some(Assembled::TooLong) => {
                tracing::warn!(scanner = %spec.name, limit = MAX_SCAN_LEN, "HID POS code longer than the limit discarded")
            }
            None => {}
        }
    }
}
