//! Serving HIS (DESIGN §4): the message types ([`protocol`]), the fan-out of
//! events to every client ([`hub`]), and the listeners and sessions
//! ([`server`]).

pub mod hub;
pub mod protocol;
pub mod server;

pub use hub::Hub;
pub use protocol::{In, Out};
pub use server::{HisSettings, Listeners};
