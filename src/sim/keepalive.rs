//! The platform's keep-alive timeout, simulated: a connection with no
//! traffic in either direction for `keepalive` is closed by the server, as
//! the real platform's front end (and every web server) does. Without it a
//! client that never lets go of an idle connection would look warm against
//! the simulator and cold against the platform, and the cold-scan work
//! (`bench coldscan`) would measure nothing.
//!
//! The close is an end of stream on the read side: hyper then ends the
//! connection cleanly, after any answer it is still writing.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// An I/O stream that reads as ended once it has been idle for `idle`.
pub struct IdleClose<T> {
    inner: T,
    idle: Option<Duration>,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleClose<T> {
    /// `None`: never closed for idleness.
    pub fn new(inner: T, idle: Option<Duration>) -> Self {
        let first = idle.unwrap_or(Duration::from_secs(86400 * 365));
        IdleClose {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(first)),
        }
    }

    fn touch(&mut self) {
        if let Some(d) = self.idle {
            self.timer.as_mut().reset(Instant::now() + d);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleClose<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if self.idle.is_some() && self.timer.as_mut().poll(cx).is_ready() {
                    // Idle too long: the end of the stream.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleClose<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use std::future::Future as _;

/// A listener whose connections are [`IdleClose`].
pub struct IdleListener<L> {
    pub inner: L,
    pub idle: Option<Duration>,
}

impl<L> axum::serve::Listener for IdleListener<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Io = IdleClose<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        let (io, addr) = self.inner.accept().await;
        (IdleClose::new(io, self.idle), addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_ends_and_a_busy_one_does_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = IdleClose::new(a, Some(Duration::from_secs(60)));
        let mut buf = [0u8; 8];
        // Traffic every 40 s keeps it open past 60 s.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(40)).await;
            b.write_all(b"x").await.unwrap();
            assert_eq!(s.read(&mut buf).await.unwrap(), 1);
        }
        // Then 60 s of nothing: end of stream.
        assert_eq!(s.read(&mut buf).await.unwrap(), 0);
    }
}
