//! ehc-agent: the hospital-side terminal agent for the WeChat electronic
//! health card (电子健康卡).
//!
//! A patient's QR code is read by a scanner, turned into a verified identity
//! by the health card open platform, handed to the hospital information
//! system (HIS) over a local socket, and every use of the card is reported to
//! the platform (`reportHISData`). See `DESIGN.md` in the shared folder for
//! the contract and `README.md` for how to run it.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the command line (clap definitions) and nothing else |
//! | [`commands`] | one function per subcommand: `check`, `sign`, `sim`; maps results to exit codes |
//! | [`config`] | the TOML schema, file discovery, systemd directories, validation that collects every problem |
//! | [`clock`] | Unix seconds, platform time at a fixed offset, Beijing-day boundaries |
//! | [`code`] | scanned text → static / dynamic / other health card code (pure, fuzzable) |
//! | [`platform`] | the open platform: [`platform::sign`] (pure signing), [`platform::api`] (typed requests and defensive response parsing), [`platform::error`] (result codes → classes), [`platform::tables`] (scene, card type and channel codes), [`platform::token`] (persisted token, generations), [`platform::client`] (reqwest, timeouts, single-flight refresh) |
//! | [`sim`] | the platform simulator (`ehc-agent sim`): a strict HTTP server of the same API with synthetic cards, faults and a control endpoint |
//! | [`scanner`] | scanners: [`scanner::framing`] (bytes → scans: terminators, idle gap, length cap, debounce), [`scanner::stdin`]; a [`scanner::Scan`] carries the scanner's name |
//! | [`pipeline`] | the scan path: classify → resolve (offline policy) → record → deliver; HIS's `use` and `bind` |
//! | [`his`] | HIS clients: [`his::protocol`] (messages), [`his::hub`] (fan-out, bounded queues, holding events), [`his::server`] (Unix socket with peer checks, loopback TCP, WebSocket with Origin allowlist) |
//! | [`outbox`] | uses until the platform has them: [`outbox::store`] (SQLite WAL + FULL, migrations, states), [`outbox::uploader`] (batches, backoff, rate limits, configuration stops), the memory spill for a full disk |
//! | [`app`] | the daemon's wiring: tasks under a cancellation token, start-up order, shutdown, signals, SIGHUP reload, sd_notify and the watchdog |
//! | [`control`] | the control socket (root and the service user): status, scan injection, outbox operations |
//! | [`status`] | what `status` shows, the systemd STATUS line, what needs attention |
//! | [`metrics`] | Prometheus metrics (prometheus-client) and their endpoint's content |
//! | [`gateway`] | the hospital gateway (`ehc-agent gateway`): the platform's protocol towards terminals, one account and one token upstream, enrolled terminals, the daily budget |
//! | [`demo`] | `ehc-agent demo`: simulator + agent + HIS client in one process |
//! | [`pii`] | masking names, ID numbers, phones and QR texts before they reach a log |
//! | [`secrets`] | reading secret files (app secret, HIS token): type and mode checks, BOM and white space |

pub mod app;
pub mod cli;
pub mod clock;
pub mod code;
pub mod commands;
pub mod config;
pub mod control;
pub mod demo;
pub mod gateway;
pub mod his;
pub mod metrics;
pub mod outbox;
pub mod pii;
pub mod pipeline;
pub mod platform;
pub mod scanner;
pub mod secrets;
pub mod sim;
pub mod status;
