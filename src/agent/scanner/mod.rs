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

/// A scanner's state, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum ScannerState {
    Connected,
    WaitingForDevice,
    Closed,
    Error { cause: String },
}
