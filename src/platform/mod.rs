//! Everything about talking to the health card open platform: signing
//! ([`sign`]), the typed API ([`api`]), result codes and their classes
//! ([`error`]), the code tables ([`tables`]), the app token ([`token`]) and
//! the HTTP client ([`client`]), its connections' warmth ([`warm`]) and the
//! connection it opens ahead of a scan ([`preconnect`]); the server side
//! shared by the simulator and the gateway ([`serve`]); the gateway's own message, the terminal
//! heartbeat ([`heartbeat`]).

pub mod api;
pub mod client;
pub mod error;
pub mod heartbeat;
pub mod preconnect;
pub mod serve;
pub mod sign;
pub mod tables;
pub mod token;
pub mod warm;

pub use client::{CallError, CallOptions, Client, ClientSettings, Urgency};
pub use error::Class;
