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
//! Three roles around one protocol, the platform's:
//!
//! ```text
//!  agent (client)  ──►  gateway (server downstream, client upstream)  ──►  platform
//!                                                                          sim (server)
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`platform`] | the protocol, both sides: [`platform::sign`] (pure signing), [`platform::api`] (typed requests, defensive response parsing), [`platform::error`] (result codes → classes), [`platform::tables`] (code tables), [`platform::token`] (persisted token, generations, the shared-store hook), [`platform::client`] (reqwest, deadlines, single-flight refresh, forwarding), [`platform::serve`] (the server side: envelope, token and signature checks, answers) |
//! | [`agent`] | the terminal agent (`ehc-agent run`): [`agent::scanner`], [`agent::pipeline`], [`agent::his`], [`agent::outbox`], [`agent::app`], [`agent::control`], [`agent::status`], [`agent::demo`] |
//! | [`gateway`] | the hospital gateway (`ehc-agent gateway`): terminals' checks, one account and token upstream, SQLite or Redis store, TLS, the daily budget |
//! | [`sim`] | the platform simulator (`ehc-agent sim`): synthetic cards, faults, a control endpoint |
//! | [`code`] | scanned text → static / dynamic / other health card code (pure, fuzzable) |
//! | [`config`] | the agent's TOML schema, file discovery, systemd directories, validation that collects every problem |
//! | [`cli`], [`commands`] | the command line and one function per subcommand; exit codes |
//! | [`clock`] | Unix seconds, platform time at a fixed offset, Beijing-day boundaries, deadlines |
//! | [`metrics`] | Prometheus metrics (prometheus-client) for the agent and the gateway |
//! | [`pii`] | masking names, ID numbers, phones and QR texts before they reach a log |
//! | [`secrets`] | reading secret files (app secret, HIS token): type and mode checks, BOM and white space |

pub mod agent;
pub mod cli;
pub mod clock;
pub mod code;
pub mod commands;
pub mod config;
pub mod gateway;
pub mod metrics;
pub mod pii;
pub mod platform;
pub mod secrets;
pub mod sim;
