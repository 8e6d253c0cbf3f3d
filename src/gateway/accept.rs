//! A terminal's new connection is news of a scan on its way.
//!
//! An agent with no warm connection opens one to the gateway on the first
//! byte of a scan, with no request on it (the request would hold the scan
//! back a round trip: [`crate::platform::preconnect`]). The only sign the
//! gateway gets of the coming scan is that connection being accepted, so
//! every accept asks the upstream client to open its own connection to the
//! platform if none is warm: the scan then costs one round trip on each
//! leg. When the upstream connection is warm (the usual case: it is kept
//! warm for `[upstream] keep_warm_min` after the last call) this is a
//! clock read and nothing more.

use std::net::SocketAddr;

use crate::platform::Client;

/// Wraps a listener; each accepted connection calls
/// [`Client::preconnect`] on the upstream client.
pub struct Preconnecting<L> {
    inner: L,
    upstream: Client,
}

impl<L> Preconnecting<L> {
    pub fn new(inner: L, upstream: Client) -> Self {
        Preconnecting { inner, upstream }
    }
}

impl<L> axum::serve::Listener for Preconnecting<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Io = L::Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let got = self.inner.accept().await;
        self.upstream.preconnect();
        got
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}
