//! Fan-out of scan events to HIS clients.
//!
//! Every connected client gets every event, through its own bounded queue.
//! A client whose queue is full (it stopped reading) is disconnected and
//! logged, so one stuck HIS window never slows the others or the scan path:
//! [`Hub::broadcast`] never waits.
//!
//! A client that stops reading is *evicted*: its session is told through
//! its [`Membership::evicted`] token and closes the connection. (Dropping
//! the hub's sender alone is not enough: the session holds a sender of its
//! own, so the queue never closes and the client would stay connected,
//! answering pings and never getting another card.)
//!
//! With no *identified* client connected (one that has sent a message:
//! `auth`, `ping`, anything), an event is also held for `hold_s`, at most
//! [`MAX_HELD`] of them, and handed to the first client that identifies
//! itself (a window whose HIS was restarting still gets the card the patient
//! just showed). A probe that connects and closes without a word does not
//! take them. Held events stay held until the session has written them
//! ([`Hub::rehold`] puts back what it could not write); past `hold_s`, or
//! past the bound, they are dropped and counted ([`Hub::held_dropped`]).
//!
//! Every event also gets a sequence number and stays in a journal for
//! `hold_s` (at most [`MAX_HELD`]), for HIS clients that cannot hold a
//! connection (the local HTTP API, [`super::http`]): they ask for what came
//! after the last number they saw, so one that was away gets what it missed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// tokio's Instant: the same as std's in production, and on a paused test
// clock the `hold_s` expiry can be tested without waiting.
use tokio::time::Instant;

use tokio::sync::mpsc;

/// Lines a client may have waiting before it counts as stuck.
pub const CLIENT_QUEUE: usize = 256;
/// Most events held while no identified client is connected.
pub const MAX_HELD: usize = 1024;

/// A line to send, shared between all clients' queues.
pub type Line = Arc<str>;

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Mutex<State>>,
    /// The last event's number (0: none yet), for waiters on the journal.
    seq: Arc<tokio::sync::watch::Sender<u64>>,
}

struct State {
    /// `hold_s`; a reload may change it.
    hold: Duration,
    next_id: u64,
    clients: HashMap<u64, Client>,
    held: VecDeque<(Line, Instant)>,
    held_dropped: u64,
    /// Every event with its number and deadline, oldest first.
    journal: VecDeque<(u64, Line, Instant)>,
}

struct Client {
    peer: String,
    tx: mpsc::Sender<Line>,
    evict: tokio_util::sync::CancellationToken,
    identified: bool,
}

/// A client's registration: its id, the queue to drain, and the signal to
/// close the connection.
pub struct Membership {
    pub id: u64,
    pub rx: mpsc::Receiver<Line>,
    /// Cancelled when the hub evicts the client (it stopped reading).
    pub evicted: tokio_util::sync::CancellationToken,
}

/// Held events handed to a client, with their deadlines, so that what
/// could not be written goes back ([`Hub::rehold`]).
pub type Held = Vec<(Line, Instant)>;

/// What [`Hub::clients`] reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientInfo {
    pub id: u64,
    pub peer: String,
}

impl Hub {
    pub fn new(hold: Duration) -> Hub {
        Hub {
            inner: Arc::new(Mutex::new(State {
                hold,
                next_id: 1,
                clients: HashMap::new(),
                held: VecDeque::new(),
                held_dropped: 0,
                journal: VecDeque::new(),
            })),
            seq: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Events after number `after`, in order, with the last number; events
    /// older than `hold_s` are gone. An `after` beyond the last number is
    /// from before a restart (numbers start again at 1): every event held
    /// is returned.
    pub fn events_after(&self, after: u64) -> (Vec<(u64, Line)>, u64) {
        let mut st = self.lock();
        let now = Instant::now();
        st.journal.retain(|(_, _, until)| *until > now);
        let last = *self.seq.borrow();
        let from = if after > last { 0 } else { after };
        let v = st
            .journal
            .iter()
            .filter(|(n, _, _)| *n > from)
            .map(|(n, l, _)| (*n, l.clone()))
            .collect();
        (v, last)
    }

    /// Events an HTTP client has taken ([`super::http`]) have reached HIS:
    /// they are no longer held for the first socket client.
    pub fn taken(&self, lines: &[&Line]) {
        let mut st = self.lock();
        st.held
            .retain(|(h, _)| !lines.iter().any(|l| Arc::ptr_eq(h, l)));
    }

    /// The last event's number now, and a receiver that changes with it.
    pub fn watch_seq(&self) -> tokio::sync::watch::Receiver<u64> {
        self.seq.subscribe()
    }

    /// A reload's new `hold_s`, for events held from now on.
    pub fn set_hold(&self, hold: Duration) {
        self.lock().hold = hold;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send `line` to every client; with no identified client, also hold
    /// it. Never waits. Returns how many clients it was queued for.
    pub fn broadcast(&self, line: Line) -> usize {
        let mut st = self.lock();
        let now = Instant::now();
        drop_expired(&mut st, now);
        // Numbered under the lock, so the journal is in number order.
        let n = *self.seq.borrow() + 1;
        st.journal.retain(|(_, _, until)| *until > now);
        if st.journal.len() >= MAX_HELD {
            st.journal.pop_front();
        }
        let until = now + st.hold;
        if !st.hold.is_zero() {
            st.journal.push_back((n, line.clone(), until));
        }
        self.seq.send_replace(n);
        let mut stuck = Vec::new();
        let mut sent = 0;
        let mut identified = 0;
        for (id, c) in &st.clients {
            match c.tx.try_send(line.clone()) {
                Ok(()) => {
                    sent += 1;
                    identified += usize::from(c.identified);
                }
                Err(_) => stuck.push(*id),
            }
        }
        for id in stuck {
            if let Some(c) = st.clients.remove(&id) {
                c.evict.cancel();
                tracing::warn!(client = id, peer = %c.peer, queue = CLIENT_QUEUE, "HIS client is not reading; disconnecting it");
            }
        }
        if identified == 0 {
            if st.hold.is_zero() {
                if sent == 0 {
                    tracing::warn!("no HIS client connected and hold_s is 0: event dropped");
                    st.held_dropped += 1;
                }
            } else {
                if st.held.len() >= MAX_HELD {
                    st.held.pop_front();
                    st.held_dropped += 1;
                    tracing::warn!(
                        max = MAX_HELD,
                        "too many events held for HIS; the oldest was dropped"
                    );
                }
                let until = now + st.hold;
                st.held.push_back((line, until));
                tracing::info!(
                    held = st.held.len(),
                    hold_s = st.hold.as_secs(),
                    "no identified HIS client connected: event held"
                );
            }
        }
        sent
    }

    /// Register a client. It gets broadcasts from now on; held events only
    /// once it identifies itself ([`Hub::identify`]).
    pub fn join(&self, peer: String) -> Membership {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let evicted = tokio_util::sync::CancellationToken::new();
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.clients.insert(
            id,
            Client {
                peer,
                tx,
                evict: evicted.clone(),
                identified: false,
            },
        );
        Membership { id, rx, evicted }
    }

    /// The client has said it is HIS: the events held so far are its to
    /// write (the first identified client takes them all).
    pub fn identify(&self, id: u64) -> Held {
        let mut st = self.lock();
        drop_expired(&mut st, Instant::now());
        match st.clients.get_mut(&id) {
            Some(c) if !c.identified => c.identified = true,
            _ => return Vec::new(),
        }
        let held: Held = st.held.drain(..).collect();
        if !held.is_empty() {
            tracing::info!(
                client = id,
                events = held.len(),
                "held events handed to the first identified HIS client"
            );
        }
        held
    }

    /// Events a session took with [`Hub::identify`] but could not write:
    /// held again, in front, with their own deadlines.
    pub fn rehold(&self, events: Held) {
        if events.is_empty() {
            return;
        }
        let mut st = self.lock();
        tracing::warn!(
            events = events.len(),
            "HIS client went away before its held events were written; held again"
        );
        for e in events.into_iter().rev() {
            st.held.push_front(e);
        }
        while st.held.len() > MAX_HELD {
            st.held.pop_back();
            st.held_dropped += 1;
        }
    }

    /// Events dropped unseen since start: expired, over [`MAX_HELD`], or
    /// with `hold_s = 0` and nobody connected.
    pub fn held_dropped(&self) -> u64 {
        self.lock().held_dropped
    }

    pub fn leave(&self, id: u64) {
        self.lock().clients.remove(&id);
    }

    pub fn client_count(&self) -> usize {
        self.lock().clients.len()
    }

    pub fn clients(&self) -> Vec<ClientInfo> {
        let st = self.lock();
        let mut v: Vec<_> = st
            .clients
            .iter()
            .map(|(id, c)| ClientInfo {
                id: *id,
                peer: c.peer.clone(),
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    pub fn held_count(&self) -> usize {
        let mut st = self.lock();
        drop_expired(&mut st, Instant::now());
        st.held.len()
    }
}

fn drop_expired(st: &mut State, now: Instant) {
    let before = st.held.len();
    st.held.retain(|(_, until)| *until > now);
    let dropped = before - st.held.len();
    if dropped > 0 {
        st.held_dropped += dropped as u64;
        tracing::warn!(
            dropped,
            "held events expired before any HIS client identified itself"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_and_stuck_clients_are_evicted() {
        let hub = Hub::new(Duration::from_secs(30));
        let mut a = hub.join("a".into());
        let b = hub.join("b".into());
        assert_eq!(hub.broadcast("x".into()), 2);
        assert_eq!(&*a.rx.try_recv().unwrap(), "x");
        // b never reads: after its queue fills it is evicted, a is not.
        for _ in 0..CLIENT_QUEUE {
            hub.broadcast("y".into());
            while a.rx.try_recv().is_ok() {}
        }
        assert_eq!(hub.client_count(), 1);
        assert!(b.evicted.is_cancelled(), "the session is told to close");
        assert!(!a.evicted.is_cancelled());
        assert_eq!(hub.broadcast("z".into()), 1);
    }

    #[test]
    fn held_until_a_client_identifies_itself() {
        let hub = Hub::new(Duration::from_secs(30));
        assert_eq!(hub.broadcast("card".into()), 0);
        assert_eq!(hub.held_count(), 1);
        // A probe connects and leaves without a word: it takes nothing.
        let probe = hub.join("probe".into());
        hub.leave(probe.id);
        assert_eq!(hub.held_count(), 1);
        let m = hub.join("his".into());
        let held = hub.identify(m.id);
        assert_eq!(held.len(), 1);
        assert_eq!(&*held[0].0, "card");
        assert_eq!(hub.held_count(), 0);
        let second = hub.join("second".into());
        assert!(
            hub.identify(second.id).is_empty(),
            "handed to the first only"
        );
    }

    /// Regression: 300 held events, the first client got 256 and the log
    /// said all were handed over.
    #[test]
    fn held_events_are_not_lost_to_the_queue_bound_and_come_back_if_unwritten() {
        let hub = Hub::new(Duration::from_secs(30));
        for i in 0..300 {
            hub.broadcast(format!("c{i}").into());
        }
        let m = hub.join("his".into());
        let held = hub.identify(m.id);
        assert_eq!(held.len(), 300);
        // The session wrote 100, then the connection broke.
        hub.rehold(held[100..].to_vec());
        hub.leave(m.id);
        let n = hub.join("next".into());
        let again = hub.identify(n.id);
        assert_eq!(again.len(), 200);
        assert_eq!(&*again[0].0, "c100", "in order");
        assert_eq!(hub.held_dropped(), 0);
    }

    #[test]
    fn the_bound_is_counted() {
        let hub = Hub::new(Duration::from_secs(30));
        for i in 0..MAX_HELD + 5 {
            hub.broadcast(format!("c{i}").into());
        }
        assert_eq!(hub.held_count(), MAX_HELD);
        assert_eq!(hub.held_dropped(), 5);
    }

    #[test]
    fn zero_hold_drops_and_counts() {
        let hub = Hub::new(Duration::ZERO);
        hub.broadcast("card".into());
        assert_eq!(hub.held_count(), 0);
        assert_eq!(hub.held_dropped(), 1);
    }

    /// The journal: numbered, in order, what came after a number, and a
    /// number from before a restart gets everything still held.
    #[test]
    fn the_journal_answers_what_came_after() {
        let hub = Hub::new(Duration::from_secs(30));
        let rx = hub.watch_seq();
        for i in 1..=5 {
            hub.broadcast(format!("e{i}").into());
        }
        assert_eq!(*rx.borrow(), 5);
        let (v, last) = hub.events_after(3);
        assert_eq!(last, 5);
        assert_eq!(
            v.iter().map(|(n, l)| format!("{n}{l}")).collect::<Vec<_>>(),
            ["4e4", "5e5"]
        );
        assert!(hub.events_after(5).0.is_empty());
        assert_eq!(
            hub.events_after(900).0.len(),
            5,
            "a number from before a restart"
        );
        for i in 0..MAX_HELD {
            hub.broadcast(format!("f{i}").into());
        }
        let (v, _) = hub.events_after(0);
        assert_eq!(v.len(), MAX_HELD, "bounded");
        assert_eq!(v[0].0, 6, "the oldest went first");
    }

    /// What an HTTP client took is not held for a socket client too.
    #[test]
    fn taken_over_http_is_no_longer_held() {
        let hub = Hub::new(Duration::from_secs(30));
        hub.broadcast("a".into());
        hub.broadcast("b".into());
        let (v, _) = hub.events_after(1);
        hub.taken(&v.iter().map(|(_, l)| l).collect::<Vec<_>>());
        let m = hub.join("his".into());
        let held = hub.identify(m.id);
        assert_eq!(held.len(), 1);
        assert_eq!(&*held[0].0, "a");
    }

    /// `hold_s` expiry on tokio's paused clock.
    #[tokio::test(start_paused = true)]
    async fn expired_events_are_dropped_and_counted() {
        let hub = Hub::new(Duration::from_secs(30));
        hub.broadcast("old".into());
        tokio::time::advance(Duration::from_secs(20)).await;
        hub.broadcast("new".into());
        assert_eq!(hub.held_count(), 2);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(hub.held_count(), 1, "the first expired at 30 s");
        let m = hub.join("late".into());
        let held = hub.identify(m.id);
        assert_eq!(held.len(), 1);
        assert_eq!(&*held[0].0, "new");
        assert_eq!(hub.held_dropped(), 1);
    }
}
