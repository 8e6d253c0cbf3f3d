//! A connection opened ahead of the request that will use it.
//!
//! The first byte of a scan arrives 70–350 ms before the last; a new
//! connection to the platform takes two round trips (TCP, TLS 1.3) before
//! the request's own. Opening it on the first byte hides those two round
//! trips behind the scanner, but only if the scan can use the connection
//! the moment it is up. reqwest's pool has no "open a connection" call, so
//! the warm-up used to be a `HEAD` request, and HTTP/1.1 holds the scan
//! back until that request's answer is in: one round trip lost.
//!
//! This layer sits in reqwest's connector stack (`connector_layer`). A
//! request sent inside [`opening`] does not get the connection it asked
//! for: the layer keeps it and fails that request with [`Kept`]. The next
//! connect to the same destination (the scan's, when the pool has nothing
//! idle) gets the kept connection at once, or waits for the one being
//! opened rather than opening a second. A kept connection unused for
//! `fresh` is closed (the platform's front end may be closing it, and the
//! scan may have found an idle pooled connection instead).
//!
//! Every connection it opens is counted by what opened it
//! (`ehc_agent_platform_connections_opened_total{by}`): `preconnect`, `scan`
//! (a scan found nothing open and paid the handshakes itself: the thing
//! keep-warm and pre-connect exist to prevent, so IT can see it), `other`.
//!
//! Destinations are told apart by the connector request's `Debug` text
//! (reqwest's request type is sealed; its text is the destination URI), so
//! a connection opened to one base is never handed to a request for
//! another.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

tokio::task_local! {
    static OPENING: ();
    static SCAN: ();
}

/// Run `request` as a scan's: a connection it has to open itself is
/// counted as a cold scan's.
pub async fn for_scan<F: Future>(request: F) -> F::Output {
    SCAN.scope((), request).await
}

/// Run `request` so that the connection it opens (if it opens one) is kept
/// for the next request instead; it then fails with [`Kept`].
pub async fn opening<F: Future>(request: F) -> F::Output {
    OPENING.scope((), request).await
}

/// The error a request sent inside [`opening`] gets when its connection
/// was kept (or one was already kept or being opened) for the next request.
#[derive(Debug, thiserror::Error)]
#[error("connection kept for the next request")]
pub struct Kept;

/// Is `e` (a reqwest error, through its sources) a [`Kept`]?
pub fn is_kept(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<Kept>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The layer given to `reqwest::ClientBuilder::connector_layer`.
#[derive(Clone)]
pub struct Layer {
    fresh: Duration,
}

impl Layer {
    /// A kept connection is handed out for `fresh` after it was opened.
    pub fn new(fresh: Duration) -> Self {
        Layer { fresh }
    }
}

impl<S> tower_layer::Layer<S> for Layer {
    type Service = Slot<S>;
    fn layer(&self, inner: S) -> Slot<S> {
        Slot {
            inner,
            shared: Arc::new(Shared {
                state: Mutex::new(State::Empty),
                connecting: Mutex::new(Vec::new()),
                changed: Notify::new(),
                fresh: self.fresh,
            }),
        }
    }
}

/// The connector wrapped by [`Layer`]; clones share the kept connection.
#[derive(Clone)]
pub struct Slot<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Destinations a request is opening a connection to itself (one entry
    /// per connect): a pre-connect then has nothing to add.
    connecting: Mutex<Vec<String>>,
    /// Woken when an opening ends (kept, failed or abandoned).
    changed: Notify,
    fresh: Duration,
}

enum State {
    Empty,
    Opening {
        dest: String,
    },
    Kept {
        dest: String,
        at: Instant,
        conn: Box<dyn Any + Send>,
    },
}

enum Take {
    Conn(Box<dyn Any + Send>),
    Wait,
    Connect,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claim the opening for `dest`: false when a connection to it is
    /// already kept (and fresh) or being opened, by a pre-connect or by a
    /// request (a code that arrived all at once: its scan got there first).
    fn claim(&self, dest: &str) -> bool {
        let mut s = self.lock();
        if self
            .connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|d| d == dest)
        {
            return false;
        }
        match &*s {
            State::Opening { dest: d } if d == dest => false,
            State::Kept { dest: d, at, .. } if d == dest && at.elapsed() < self.fresh => false,
            _ => {
                *s = State::Opening { dest: dest.into() };
                true
            }
        }
    }

    fn take(&self, dest: &str) -> Take {
        let mut s = self.lock();
        match &*s {
            State::Opening { dest: d } if d == dest => Take::Wait,
            State::Kept { dest: d, at, .. } if d == dest && at.elapsed() < self.fresh => {
                match std::mem::replace(&mut *s, State::Empty) {
                    State::Kept { conn, .. } => Take::Conn(conn),
                    _ => unreachable!("matched Kept above"),
                }
            }
            State::Kept { at, .. } if at.elapsed() >= self.fresh => {
                *s = State::Empty;
                Take::Connect
            }
            _ => Take::Connect,
        }
    }

    /// The opening for `dest` ended: keep `conn`, if any, for `fresh`.
    fn opened(self: &Arc<Self>, dest: &str, conn: Option<Box<dyn Any + Send>>) {
        let mut s = self.lock();
        if matches!(&*s, State::Opening { dest: d } if d == dest) {
            *s = match conn {
                Some(conn) => {
                    let at = Instant::now();
                    // Not taken in time (the scan found an idle pooled
                    // connection, or never came): closed, not left open
                    // for the server to time out.
                    let this = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(this.fresh).await;
                        let mut s = this.lock();
                        if matches!(&*s, State::Kept { at: a, .. } if *a == at) {
                            *s = State::Empty;
                        }
                    });
                    State::Kept {
                        dest: dest.into(),
                        at,
                        conn,
                    }
                }
                None => State::Empty,
            };
        }
        drop(s);
        self.changed.notify_waiters();
    }
}

/// A request's own connect to `dest`, listed in [`Shared::connecting`]
/// while it lasts (however it ends).
struct Connecting<'a> {
    shared: &'a Shared,
    dest: &'a str,
}

impl<'a> Connecting<'a> {
    fn new(shared: &'a Shared, dest: &'a str) -> Self {
        let mut c = shared.connecting.lock().unwrap_or_else(|e| e.into_inner());
        c.push(dest.to_owned());
        Connecting { shared, dest }
    }
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let mut c = self
            .shared
            .connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(i) = c.iter().position(|d| d == self.dest) {
            c.swap_remove(i);
        }
    }
}

/// Ends an opening that was dropped half way (its request timed out or
/// was cancelled), so requests waiting for it go and connect themselves.
struct Abandon<'a> {
    shared: &'a Arc<Shared>,
    dest: &'a str,
    done: bool,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.opened(self.dest, None);
        }
    }
}

impl<S, R> tower_service::Service<R> for Slot<S>
where
    S: tower_service::Service<R> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    R: std::fmt::Debug + Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        // The service that was polled ready makes the call (tower's rule);
        // a clone stays behind for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let dest = format!("{req:?}");
        // Read here: `call` runs inside the poll of the request's future,
        // where the task-local scope of `opening` is in force.
        let keep = OPENING.try_with(|_| ()).is_ok();
        let by = if keep {
            "preconnect"
        } else if SCAN.try_with(|_| ()).is_ok() {
            "scan"
        } else {
            "other"
        };
        Box::pin(async move {
            if keep {
                if !shared.claim(&dest) {
                    return Err(Kept.into());
                }
                let mut abandon = Abandon {
                    shared: &shared,
                    dest: &dest,
                    done: false,
                };
                let got = inner.call(req).await;
                abandon.done = true;
                return match got {
                    Ok(conn) => {
                        crate::metrics::get().connection_opened(by);
                        shared.opened(&dest, Some(Box::new(conn)));
                        Err(Kept.into())
                    }
                    Err(e) => {
                        shared.opened(&dest, None);
                        Err(e.into())
                    }
                };
            }
            loop {
                let notified = shared.changed.notified();
                tokio::pin!(notified);
                // Registered before looking, so an opening that ends in
                // between still wakes this request.
                notified.as_mut().enable();
                match shared.take(&dest) {
                    Take::Conn(conn) => match conn.downcast::<S::Response>() {
                        Ok(conn) => return Ok(*conn),
                        Err(_) => break,
                    },
                    Take::Wait => notified.await,
                    Take::Connect => break,
                }
            }
            let connecting = Connecting::new(&shared, &dest);
            let conn = inner.call(req).await.map_err(Into::into);
            drop(connecting);
            let conn = conn?;
            crate::metrics::get().connection_opened(by);
            Ok(conn)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower_layer::Layer as _;
    use tower_service::Service as _;

    /// A connector that counts its connects and makes each wait for a
    /// permit, so a test decides when a connection is "up".
    #[derive(Clone)]
    struct Counting {
        made: Arc<AtomicUsize>,
        permits: Arc<tokio::sync::Semaphore>,
    }

    impl tower_service::Service<String> for Counting {
        type Response = usize;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<usize, BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, dest: String) -> Self::Future {
            let (made, permits) = (self.made.clone(), self.permits.clone());
            Box::pin(async move {
                permits.acquire().await.unwrap().forget();
                if dest == "unreachable" {
                    return Err("refused".into());
                }
                Ok(made.fetch_add(1, Ordering::SeqCst) + 1)
            })
        }
    }

    fn slot(
        fresh: Duration,
    ) -> (
        Slot<Counting>,
        Arc<AtomicUsize>,
        Arc<tokio::sync::Semaphore>,
    ) {
        let made = Arc::new(AtomicUsize::new(0));
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        let s = Layer::new(fresh).layer(Counting {
            made: made.clone(),
            permits: permits.clone(),
        });
        (s, made, permits)
    }

    /// A request sent inside [`opening`] (the connector is called when the
    /// request is first polled, as reqwest's is).
    async fn open(mut s: Slot<Counting>, dest: &str) -> Result<usize, BoxError> {
        let dest = dest.to_string();
        opening(async move { s.call(dest).await }).await
    }

    #[tokio::test]
    async fn the_next_request_gets_the_connection_the_opening_made() {
        let (mut s, made, permits) = slot(Duration::from_secs(60));
        permits.add_permits(1);
        let e = open(s.clone(), "a").await.unwrap_err();
        assert!(
            is_kept(&*e),
            "the opening request is told its connection was kept"
        );
        assert_eq!(made.load(Ordering::SeqCst), 1);
        assert_eq!(s.call("a".into()).await.unwrap(), 1, "the kept one");
        assert_eq!(made.load(Ordering::SeqCst), 1, "no second connect");
    }

    /// A code that arrives all at once can have its scan at the connector
    /// before the pre-connect: the scan's own connect is under way, and a
    /// second connection kept for nobody would only sit open.
    #[tokio::test]
    async fn no_opening_while_a_request_connects_itself() {
        let (s, made, permits) = slot(Duration::from_secs(60));
        let mut s2 = s.clone();
        let scan = tokio::spawn(async move { s2.call("a".to_string()).await.unwrap() });
        tokio::task::yield_now().await;
        // Permits for two connects: an opening that went ahead would make
        // one of its own beside the scan's.
        permits.add_permits(2);
        let e = open(s.clone(), "a").await.unwrap_err();
        assert!(is_kept(&*e), "nothing to open: {e}");
        assert_eq!(scan.await.unwrap(), 1);
        assert_eq!(made.load(Ordering::SeqCst), 1, "one connection, the scan's");
        // Once the scan's connect is over, an opening may go ahead again.
        assert!(is_kept(&*open(s.clone(), "a").await.unwrap_err()));
        assert_eq!(made.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_during_the_opening_waits_for_it_rather_than_connecting() {
        let (s, made, permits) = slot(Duration::from_secs(60));
        let mut s2 = s.clone();
        let opener = tokio::spawn(open(s.clone(), "a"));
        // The scan arrives while the handshake is still going.
        let scan = tokio::spawn(async move { s2.call("a".to_string()).await.unwrap() });
        tokio::task::yield_now().await;
        assert_eq!(made.load(Ordering::SeqCst), 0);
        permits.add_permits(1);
        assert!(is_kept(&*opener.await.unwrap().unwrap_err()));
        assert_eq!(
            scan.await.unwrap(),
            1,
            "the scan rode the opened connection"
        );
        assert_eq!(made.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn another_destination_or_a_stale_connection_is_never_handed_out() {
        let (mut s, made, permits) = slot(Duration::from_millis(0));
        permits.add_permits(3);
        assert!(open(s.clone(), "a").await.is_err());
        assert_eq!(s.call("b".into()).await.unwrap(), 2, "b connects itself");
        assert_eq!(
            s.call("a".into()).await.unwrap(),
            3,
            "a kept past `fresh` is dropped"
        );
        assert_eq!(made.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_connection_not_taken_is_closed_after_fresh() {
        let (s, _, permits) = slot(Duration::from_secs(25));
        permits.add_permits(1);
        assert!(open(s.clone(), "a").await.is_err());
        assert!(matches!(&*s.shared.lock(), State::Kept { .. }));
        tokio::time::sleep(Duration::from_secs(26)).await;
        assert!(
            matches!(&*s.shared.lock(), State::Empty),
            "dropped, so closed"
        );
    }

    #[tokio::test]
    async fn a_failed_or_abandoned_opening_releases_its_waiters() {
        let (mut s, made, permits) = slot(Duration::from_secs(60));
        // Abandoned: the opening's request is dropped mid-connect.
        let opener = tokio::spawn(open(s.clone(), "a"));
        tokio::task::yield_now().await;
        let mut s2 = s.clone();
        let scan = tokio::spawn(async move { s2.call("a".to_string()).await.unwrap() });
        tokio::task::yield_now().await;
        opener.abort();
        let _ = opener.await;
        permits.add_permits(1);
        assert_eq!(scan.await.unwrap(), 1, "the scan connected itself");
        // Failed: the error is the connector's, and the next request connects.
        permits.add_permits(2);
        let e = open(s.clone(), "unreachable").await.unwrap_err();
        assert!(!is_kept(&*e) && e.to_string().contains("refused"));
        assert_eq!(s.call("a".into()).await.unwrap(), 2);
        assert_eq!(made.load(Ordering::SeqCst), 2);
    }
}
