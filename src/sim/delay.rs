//! A TCP proxy that adds a round-trip time, for measuring what a scan costs
//! over a real network (`bench coldscan`, the cold-scan tests) on one
//! machine. Each direction is delayed by half the RTT, in order; a new
//! connection's first bytes towards the server are held one more RTT, which
//! is what the TCP handshake costs a client (its data leaves only after
//! SYN, SYN-ACK), so a cold connection pays what it pays on a real line:
//! 1 RTT for TCP, then TLS's round trips, then the request's.
//!
//! Loopback connects in microseconds, so the connection to the server is
//! made at once; only the bytes are delayed. Deliveries are due on tokio's
//! millisecond timer, on a thread of the proxy's own: `bench coldscan`
//! measures what the proxy actually delivers (a ping-pong through it) and
//! compares scans with that.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A running proxy.
pub struct DelayProxy {
    pub addr: SocketAddr,
    connections: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
}

impl DelayProxy {
    /// Listen on `listen` (port 0 for any) and forward to `upstream` with
    /// `rtt` added to every round trip.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        rtt: Duration,
    ) -> std::io::Result<DelayProxy> {
        let l = std::net::TcpListener::bind(listen)?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicU64::new(0));
        let (count, live) = (connections.clone(), open.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        // Its own thread and runtime: a delivery due now is not queued
        // behind whatever else the caller's runtime is busy with (in the
        // benchmark, a hundred agents), as a network's is not.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let l = {
            let _in = rt.enter();
            TcpListener::from_std(l)?
        };
        let serve = async move {
            loop {
                let Ok((client, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                live.fetch_add(1, Ordering::Relaxed);
                let live = live.clone();
                tokio::spawn(async move {
                    let accepted = Instant::now();
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        live.fetch_sub(1, Ordering::Relaxed);
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let half = rtt / 2;
                    // Towards the server: nothing before the handshake's RTT.
                    let up = pipe(cr, sw, half, accepted + rtt);
                    let down = pipe(sr, cw, half, accepted);
                    tokio::join!(up, down);
                    live.fetch_sub(1, Ordering::Relaxed);
                });
            }
        };
        std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                // Dropping the runtime at the end drops every connection.
                rt.block_on(async move {
                    tokio::select! {
                        _ = serve => {}
                        _ = stopped.cancelled() => {}
                    }
                })
            })?;
        Ok(DelayProxy {
            addr,
            connections,
            open,
            stop,
        })
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connections open now (both directions not yet ended).
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copy `from` to `to`, each chunk `delay` after it was read (and not
/// before `not_before + delay`); the end of stream is passed on the same way.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    not_before: Instant,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let at = Instant::now().max(not_before) + delay;
            // An empty chunk is the end of stream.
            if tx.send((at, buf[..n].to_vec())).is_err() || n == 0 {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if chunk.is_empty() || to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes pass both ways in order, and the end of stream too.
    #[tokio::test]
    async fn bytes_and_the_end_pass_through() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            s.write_all(&all).await.unwrap();
        });
        let p = DelayProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            echo_addr,
            Duration::from_millis(2),
        )
        .await
        .unwrap();
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        for i in 0..100u8 {
            c.write_all(&[i; 10]).await.unwrap();
        }
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        let want: Vec<u8> = (0..100u8).flat_map(|i| [i; 10]).collect();
        assert_eq!(back, want);
        assert_eq!(p.connections(), 1);
    }
}
