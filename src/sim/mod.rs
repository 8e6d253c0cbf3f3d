//! The platform simulator (`ehc-agent sim`): a strict, local stand-in for
//! the health card open platform, for the demo, the integration tests, HIS
//! vendors and outage rehearsals. See `docs/simulator.md`.
//!
//! * [`config`]: who the simulator is, its cards, its limits;
//! * [`state`]: the rules of the reference, without I/O;
//! * [`faults`]: latency, errors, outages, broken bodies;
//! * [`server`]: HTTP(S), the control endpoint, the outage-aware listener;
//! * [`keepalive`]: idle connections closed, as the platform's front end does;
//! * [`delay`]: a proxy that adds a round-trip time, for benchmarks and tests.

pub mod config;
pub mod delay;
pub mod faults;
pub mod keepalive;
pub mod server;
pub mod state;

pub use config::{SimCard, SimConfig};
pub use faults::Faults;
pub use server::{run_forever, SimServer};
