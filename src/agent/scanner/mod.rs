//! Scanners: each configured device becomes a task ([`device`]) that frames
//! its bytes into [`Scan`]s ([`framing`]), sends them to the pipeline, and
//! reports its state for `status`. Keyboard-wedge devices go through
//! [`keymap`], HID POS devices through [`hidpos`], `usb-hid` through
//! [`usb`] (libusb); [`sysfs`] finds devices for `ehc-agent scanners`.

pub mod device;
pub mod framing;
pub mod hidpos;
pub mod keymap;
pub mod stdin;
pub mod sysfs;
pub mod usb;

use serde::Serialize;

/// Longest scan accepted from a device (see [`crate::code::MAX_CODE_LEN`]).
pub const MAX_SCAN_LEN: usize = crate::code::MAX_CODE_LEN;

/// One scan: which scanner, what text, when (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub scanner: String,
    pub text: String,
    pub at: i64,
}

/// Told when a scan starts arriving (its first byte), by every scanner
/// task, so the platform connection is opened while the rest of the code
/// arrives ([`crate::platform::Client::preconnect`]). Many starts before
/// anyone looks are one.
#[derive(Debug, Clone, Default)]
pub struct Arrivals(std::sync::Arc<tokio::sync::Notify>);

impl Arrivals {
    pub fn started(&self) {
        self.0.notify_one();
    }

    /// Wait for the next start.
    pub async fn next(&self) {
        self.0.notified().await;
    }
}

/// A scanner's state, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum ScannerState {
    Connected,
    WaitingForDevice,
    Closed,
    Error { cause: String },
}
