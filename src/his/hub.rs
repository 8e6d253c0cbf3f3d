//! Fan-out of scan events to HIS clients.
//!
//! Every connected client gets every event, through its own bounded queue.
//! A client whose queue is full (it stopped reading) is disconnected and
//! logged, so one stuck HIS window never slows the others or the scan path:
//! [`Hub::broadcast`] never waits.
//!
//! With no client connected, an event is held for `hold_s` and handed to the
//! first client that connects (a window whose HIS was restarting still gets
//! the card the patient just showed); past that it is dropped with a log
//! line.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Lines a client may have waiting before it counts as stuck.
pub const CLIENT_QUEUE: usize = 256;
/// Most events held while no client is connected.
const MAX_HELD: usize = 1024;

/// A line to send, shared between all clients' queues.
pub type Line = Arc<str>;

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Mutex<State>>,
    hold: Duration,
}

struct State {
    next_id: u64,
    clients: HashMap<u64, Client>,
    held: VecDeque<(Line, Instant)>,
}

struct Client {
    peer: String,
    tx: mpsc::Sender<Line>,
}

/// A client's registration: its id and the queue to drain.
pub struct Membership {
    pub id: u64,
    pub rx: mpsc::Receiver<Line>,
    /// Sender for the connection's own replies, into the same queue.
    pub tx: mpsc::Sender<Line>,
}

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
                next_id: 1,
                clients: HashMap::new(),
                held: VecDeque::new(),
            })),
            hold,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send `line` to every client; with none, hold it. Never waits.
    /// Returns how many clients it was queued for.
    pub fn broadcast(&self, line: Line) -> usize {
        let mut st = self.lock();
        let now = Instant::now();
        drop_expired(&mut st.held, now);
        if st.clients.is_empty() {
            if self.hold.is_zero() {
                tracing::warn!("no HIS client connected and hold_s is 0: event dropped");
            } else {
                if st.held.len() >= MAX_HELD {
                    st.held.pop_front();
                    tracing::warn!("too many events held for HIS; the oldest was dropped");
                }
                st.held.push_back((line, now + self.hold));
                tracing::info!(
                    held = st.held.len(),
                    hold_s = self.hold.as_secs(),
                    "no HIS client connected: event held"
                );
            }
            return 0;
        }
        let mut stuck = Vec::new();
        let mut sent = 0;
        for (id, c) in &st.clients {
            match c.tx.try_send(line.clone()) {
                Ok(()) => sent += 1,
                Err(_) => stuck.push(*id),
            }
        }
        for id in stuck {
            if let Some(c) = st.clients.remove(&id) {
                // Dropping the sender ends the client's writer, which closes
                // the connection.
                tracing::warn!(client = id, peer = %c.peer, queue = CLIENT_QUEUE, "HIS client is not reading; disconnected");
            }
        }
        sent
    }

    /// Register a client. Held events go to it first.
    pub fn join(&self, peer: String) -> Membership {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        drop_expired(&mut st.held, Instant::now());
        let held: Vec<Line> = st.held.drain(..).map(|(l, _)| l).collect();
        if !held.is_empty() {
            tracing::info!(
                client = id,
                events = held.len(),
                "held events handed to the first HIS client"
            );
        }
        for l in held {
            let _ = tx.try_send(l);
        }
        st.clients.insert(
            id,
            Client {
                peer,
                tx: tx.clone(),
            },
        );
        Membership { id, rx, tx }
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
        drop_expired(&mut st.held, Instant::now());
        st.held.len()
    }
}

fn drop_expired(held: &mut VecDeque<(Line, Instant)>, now: Instant) {
    let before = held.len();
    held.retain(|(_, until)| *until > now);
    if held.len() < before {
        tracing::warn!(
            dropped = before - held.len(),
            "held events expired before any HIS client connected"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_and_stuck_clients() {
        let hub = Hub::new(Duration::from_secs(30));
        let mut a = hub.join("a".into());
        let b = hub.join("b".into());
        assert_eq!(hub.broadcast("x".into()), 2);
        assert_eq!(&*a.rx.try_recv().unwrap(), "x");
        // b never reads: after its queue fills it is dropped, a is not.
        for _ in 0..CLIENT_QUEUE {
            hub.broadcast("y".into());
            while a.rx.try_recv().is_ok() {}
        }
        assert_eq!(hub.client_count(), 1);
        drop(b);
        assert_eq!(hub.broadcast("z".into()), 1);
    }

    #[test]
    fn held_until_first_client() {
        let hub = Hub::new(Duration::from_secs(30));
        assert_eq!(hub.broadcast("card".into()), 0);
        assert_eq!(hub.held_count(), 1);
        let mut m = hub.join("late".into());
        assert_eq!(&*m.rx.try_recv().unwrap(), "card");
        assert_eq!(hub.held_count(), 0);
        let mut second = hub.join("second".into());
        assert!(second.rx.try_recv().is_err(), "handed to the first only");
    }

    #[test]
    fn zero_hold_drops() {
        let hub = Hub::new(Duration::ZERO);
        hub.broadcast("card".into());
        assert_eq!(hub.held_count(), 0);
    }
}
