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
//!
//! Seams for what comes next (DESIGN §1): scanners feed a `scanner` module,
//! the scan path is `pipeline`, HIS clients are served by `his`, uses are kept
//! by `outbox`, and `app` wires them under one cancellation token. Each will
//! call [`platform::Client`] and classify failures with
//! [`platform::CallError::class`].

pub mod cli;
pub mod clock;
pub mod code;
pub mod commands;
pub mod config;
pub mod platform;
pub mod sim;
