//! The terminal agent (`ehc-agent run`): one of the three roles around the
//! platform's protocol, beside the gateway ([`crate::gateway`]) and the
//! simulator ([`crate::sim`]). It is the protocol's client: scanners in,
//! verified identities out to HIS, every use reported.
//!
//! | module | owns |
//! |---|---|
//! | [`scanner`] | scanners: framing, keymap, serial, evdev, HID POS, libusb, stdin; their states |
//! | [`pipeline`] | the scan path: classify → resolve (offline policy) → record → deliver; HIS's `use` and `bind` |
//! | [`his`] | HIS clients: protocol, hub (fan-out, held events), listeners with their access rules, the HIS token |
//! | [`outbox`] | uses until the platform has them: the SQLite store and the uploader |
//! | [`app`] | wiring, start-up order, reload in place, phased shutdown, signals, sd_notify, the watchdog |
//! | [`control`] | the control socket: status, scan injection, outbox operations |
//! | [`status`] | what `status` shows and what needs attention |
//! | [`demo`] | `ehc-agent demo`: simulator + agent + HIS client in one process |

pub mod app;
pub mod control;
pub mod demo;
pub mod heartbeat;
pub mod his;
pub mod outbox;
pub mod pipeline;
pub mod scanner;
pub mod status;
