//! Scanners: each configured device becomes a task that frames its bytes
//! into [`Scan`]s and sends them to the pipeline, and reports its state for
//! `status`.
//!
//! This build reads the `stdin` kind (the demo, and kiosks whose vendor
//! software pipes scans in). The other kinds of the configuration (`serial`,
//! `usb-hid`, `evdev`, `hid-pos`) are validated by `check` but refused by
//! `run` with a clear error until their readers land; see
//! [`unsupported_kinds`].

pub mod framing;
pub mod stdin;

use serde::Serialize;

use crate::config::{ScannerKind, ScannerSection};

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

/// Scanners in the configuration whose kind this build cannot read yet.
pub fn unsupported_kinds(scanners: &[ScannerSection]) -> Vec<String> {
    scanners
        .iter()
        .filter(|s| s.kind != ScannerKind::Stdin)
        .map(|s| {
            let kind = serde_json::to_value(s.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            format!("{} ({kind})", s.name)
        })
        .collect()
}
