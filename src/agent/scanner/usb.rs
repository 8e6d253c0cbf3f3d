//! `usb-hid` scanners: a keyboard-wedge scanner read directly over libusb
//! (rusb, libusb vendored), so the kernel's keyboard driver is detached and
//! the scanner's "keystrokes" never reach the desktop or whatever window has
//! the focus.
//!
//! On a dedicated thread (libusb is blocking): find the device by VID, PID
//! and serial number, detach the kernel driver, claim the HID keyboard
//! interface, switch it to the boot protocol, and read 8-byte reports from
//! its interrupt IN endpoint into [`super::keymap`]. Unplugged: release (the
//! kernel driver is reattached), wait for it to come back. With libusb's
//! hotplug support the callback is registered **before** enumerating, so a
//! device plugged in between the two is not missed; without it, the device
//! list is checked every [`super::device::RETRY`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusb::UsbContext as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::device::{ScannerStates, RETRY};
use super::framing::{Event, Framer};
use super::keymap::{self, Decoder};
use super::{Scan, ScannerState, MAX_SCAN_LEN};
use crate::config::{ScannerSection, Terminator};

/// How long a read waits before checking for shutdown and the idle gap.
const READ_SLICE: Duration = Duration::from_millis(100);

pub async fn run(
    spec: ScannerSection,
    tx: mpsc::Sender<Scan>,
    states: ScannerStates,
    cancel: CancellationToken,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, states2, name) = (stop.clone(), states.clone(), spec.name.clone());
    let thread = std::thread::Builder::new()
        .name(format!("usb-{}", spec.name))
        .spawn(move || thread_main(spec, tx, states2, stop2));
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            states.set(
                &name,
                ScannerState::Error {
                    cause: format!("cannot start its thread: {e}"),
                },
            );
            return;
        }
    };
    cancel.cancelled().await;
    stop.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    states.set(&name, ScannerState::Closed);
}

/// Hotplug callback: only wakes the thread; the thread re-enumerates.
struct Arrivals(Arc<AtomicBool>);

impl<T: rusb::UsbContext> rusb::Hotplug<T> for Arrivals {
    fn device_arrived(&mut self, _device: rusb::Device<T>) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn device_left(&mut self, _device: rusb::Device<T>) {}
}

fn thread_main(
    spec: ScannerSection,
    tx: mpsc::Sender<Scan>,
    states: ScannerStates,
    stop: Arc<AtomicBool>,
) {
    let ctx = match rusb::Context::new() {
        Ok(c) => c,
        Err(e) => {
            states.set(
                &spec.name,
                ScannerState::Error {
                    cause: format!("libusb: {e}"),
                },
            );
            return;
        }
    };
    let arrived = Arc::new(AtomicBool::new(true));
    // Registered before the first enumeration (below), so nothing slips
    // between them.
    let _registration: Option<rusb::Registration<rusb::Context>> = if rusb::has_hotplug() {
        let mut b = rusb::HotplugBuilder::new();
        if let Some(v) = spec.vendor_id {
            b.vendor_id(v);
        }
        if let Some(p) = spec.product_id {
            b.product_id(p);
        }
        b.register(&ctx, Box::new(Arrivals(arrived.clone()))).ok()
    } else {
        None
    };
    let hotplug = _registration.is_some();
    while !stop.load(Ordering::SeqCst) {
        if arrived.swap(false, Ordering::SeqCst) || !hotplug {
            match find(&ctx, &spec) {
                Ok(Some(dev)) => session(&dev, &spec, &tx, &states, &stop),
                Ok(None) => states.set(&spec.name, ScannerState::WaitingForDevice),
                Err(e) => states.set(&spec.name, ScannerState::Error { cause: e }),
            }
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // Wait for an arrival (hotplug) or the next look (no hotplug).
        let until = Instant::now() + RETRY;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            if hotplug {
                let _ = ctx.handle_events(Some(READ_SLICE));
                if arrived.load(Ordering::SeqCst) {
                    break;
                }
            } else {
                std::thread::sleep(READ_SLICE);
            }
        }
        // Without hotplug events, look again after RETRY; with them, also
        // look every RETRY in case an arrival came before we were ready.
        arrived.store(true, Ordering::SeqCst);
    }
}

/// The configured device, if attached.
fn find(
    ctx: &rusb::Context,
    spec: &ScannerSection,
) -> Result<Option<rusb::Device<rusb::Context>>, String> {
    let list = ctx
        .devices()
        .map_err(|e| format!("cannot list USB devices: {e}"))?;
    for dev in list.iter() {
        let Ok(d) = dev.device_descriptor() else {
            continue;
        };
        if Some(d.vendor_id()) != spec.vendor_id
            || spec.product_id.is_some_and(|p| p != d.product_id())
        {
            continue;
        }
        if let Some(want) = &spec.serial_number {
            let serial = dev
                .open()
                .ok()
                .and_then(|h| h.read_serial_number_string_ascii(&d).ok());
            if serial.as_deref() != Some(want.as_str()) {
                continue;
            }
        }
        return Ok(Some(dev));
    }
    Ok(None)
}

/// The HID interface to read: a boot keyboard if there is one, else any HID
/// interface; with its interrupt IN endpoint.
fn keyboard_interface(dev: &rusb::Device<rusb::Context>) -> Option<(u8, u8, bool)> {
    let cfg = dev.active_config_descriptor().ok()?;
    let mut best: Option<(u8, u8, bool)> = None;
    for iface in cfg.interfaces() {
        for alt in iface.descriptors() {
            if alt.class_code() != 3 {
                continue;
            }
            let ep = alt.endpoint_descriptors().find(|e| {
                e.direction() == rusb::Direction::In
                    && e.transfer_type() == rusb::TransferType::Interrupt
            });
            let Some(ep) = ep else { continue };
            let boot_kbd = alt.sub_class_code() == 1 && alt.protocol_code() == 1;
            if boot_kbd || best.is_none() {
                best = Some((alt.interface_number(), ep.address(), boot_kbd));
            }
            if boot_kbd {
                return best;
            }
        }
    }
    best
}

fn session(
    dev: &rusb::Device<rusb::Context>,
    spec: &ScannerSection,
    tx: &mpsc::Sender<Scan>,
    states: &ScannerStates,
    stop: &AtomicBool,
) {
    let Some((iface, ep, boot)) = keyboard_interface(dev) else {
        states.set(&spec.name, ScannerState::Error { cause: "the device has no HID interface with an interrupt IN endpoint (is it in keyboard mode?)".into() });
        return;
    };
    let h = match dev.open() {
        Ok(h) => h,
        Err(e) => {
            states.set(
                &spec.name,
                ScannerState::Error {
                    cause: format!("cannot open the USB device (permissions? see udev/): {e}"),
                },
            );
            return;
        }
    };
    // Detach the kernel's keyboard driver while we hold the interface, and
    // give it back when we release it.
    let _ = h.set_auto_detach_kernel_driver(true);
    if let Err(e) = h.claim_interface(iface) {
        states.set(
            &spec.name,
            ScannerState::Error {
                cause: format!("cannot claim interface {iface}: {e}"),
            },
        );
        return;
    }
    if boot {
        // SET_PROTOCOL(boot): fixed 8-byte reports whatever the descriptor.
        let _ = h.write_control(
            0x21,
            0x0B,
            0,
            u16::from(iface),
            &[],
            Duration::from_millis(500),
        );
    }
    states.set(&spec.name, ScannerState::Connected);
    let terminator = if spec.terminator == Terminator::None {
        Terminator::None
    } else {
        Terminator::Lf
    };
    let mut framer = Framer::new(
        terminator,
        MAX_SCAN_LEN,
        Duration::from_millis(spec.debounce_ms),
    );
    let mut decoder = Decoder::new(spec.alt_codes);
    let idle = Duration::from_millis(spec.idle_ms.max(1));
    let mut last_byte: Option<Instant> = None;
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::SeqCst) {
        match h.read_interrupt(ep, &mut buf, READ_SLICE) {
            Ok(n) => {
                // Non-boot interfaces may prefix a report id.
                let report = if !boot && n == 9 {
                    &buf[1..n]
                } else {
                    &buf[..n]
                };
                let out = decoder.report(report);
                if !out.is_empty() {
                    last_byte = Some(Instant::now());
                    let events = framer.push(&keymap::to_bytes(&out), Instant::now());
                    if !emit(events, spec, tx, states) {
                        break;
                    }
                }
            }
            Err(rusb::Error::Timeout) => {
                if last_byte.is_some_and(|t| t.elapsed() >= idle) {
                    last_byte = None;
                    if !emit(framer.idle(Instant::now()), spec, tx, states) {
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(scanner = %spec.name, error = %e, "USB read ended");
                states.set(&spec.name, ScannerState::WaitingForDevice);
                break;
            }
        }
    }
    let _ = h.release_interface(iface);
}

fn emit(
    events: Vec<Event>,
    spec: &ScannerSection,
    tx: &mpsc::Sender<Scan>,
    states: &ScannerStates,
) -> bool {
    for ev in events {
        match ev {
            Event::Started => states.arrivals().started(),
            Event::Scan(text) => {
                states.scanned(&spec.name);
                if tx
                    .blocking_send(Scan {
                        scanner: spec.name.clone(),
                        text,
                        at: crate::clock::now_unix(),
                    })
                    .is_err()
                {
                    return false;
                }
            }
            Event::TooLong(len) => {
                tracing::warn!(scanner = %spec.name, len, "scan longer than the limit discarded")
            }
            Event::NotUtf8(len) => {
                tracing::warn!(scanner = %spec.name, len, "scan with bytes that are not UTF-8 discarded")
            }
        }
    }
    true
}
