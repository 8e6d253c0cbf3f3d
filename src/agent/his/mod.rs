//! Serving HIS (DESIGN §4): the message types ([`protocol`]), the fan-out of
//! events to every client ([`hub`]), and the listeners and sessions
//! ([`server`]), and the token TCP and WebSocket clients present
//! ([`token`]).

pub mod http;
pub mod hub;
pub mod protocol;
pub mod server;
pub mod token;

pub use hub::Hub;
pub use protocol::{In, Out};
pub use server::{HisSettings, Server};
