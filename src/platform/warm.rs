//! Connection warmth: what the platform client knows of whether a scan
//! will find an open connection, so that a scan costs one round trip and
//! not the three or four of a new TCP + TLS connection.
//!
//! reqwest's pool is not visible from outside, so warmth is inferred: a
//! connection that answered within `warm` is taken to be open (the setting
//! sits below the platform's keep-alive timeout). Two things act on it
//! ([`crate::platform::Client`]):
//!
//! * the keep-warm touch: while the counter is idle, one request that is
//!   not an API call (`HEAD` on the base URL, which the platform counts
//!   nowhere) every `warm`, for `keep_warm` after the last API call;
//! * the pre-connect: the first byte of a scan arriving from a scanner
//!   opens a connection when nothing is warm, so it is being made while the
//!   rest of the code arrives (70 characters take 70–350 ms from a serial
//!   or keyboard-wedge scanner). No request goes on it: it is kept for the
//!   scan ([`super::preconnect`]). A scan that is complete before the
//!   connection is waits for it and rides it, rather than opening a second.
//!
//! A touch never starts while a scan is arriving ([`ARRIVAL`] after its
//! first byte): on HTTP/1.1 the scan would wait up to a round trip for the
//! touch's answer. A touch that started before the first byte is answered
//! before the Enter whenever the code takes longer to arrive than a round
//! trip (a serial scanner's 70 characters: 70 ms).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long after a scan's first byte no keep-warm touch starts: longer
/// than any scanner takes to send a code (a keyboard wedge at 5 ms a
/// character, 100 characters: 0.5 s).
pub const ARRIVAL: Duration = Duration::from_secs(1);

/// The client's view of its connections.
pub struct Warmth {
    pub warm: Duration,
    pub keep_warm: Duration,
    /// When a request last got an HTTP answer (any status): its
    /// connection is open and back in the pool.
    last_answer: Mutex<Option<Instant>>,
    /// When an API call was last made (keep-warm runs for `keep_warm`
    /// after it).
    last_call: Mutex<Option<Instant>>,
    /// When the first byte of the latest scan arrived.
    arriving: Mutex<Option<Instant>>,
    /// `true` while a warm-up request is in flight.
    warming: watch::Sender<bool>,
}

fn get(m: &Mutex<Option<Instant>>) -> Option<Instant> {
    *m.lock().unwrap_or_else(|e| e.into_inner())
}

fn set(m: &Mutex<Option<Instant>>, at: Instant) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
}

impl Warmth {
    pub fn new(warm: Duration, keep_warm: Duration) -> Self {
        Warmth {
            warm,
            keep_warm,
            last_answer: Mutex::new(None),
            last_call: Mutex::new(None),
            arriving: Mutex::new(None),
            warming: watch::channel(false).0,
        }
    }

    pub fn answered(&self) {
        set(&self.last_answer, Instant::now());
    }

    pub fn called(&self) {
        set(&self.last_call, Instant::now());
    }

    /// The first byte of a scan arrived: no touch for [`ARRIVAL`].
    pub fn arriving(&self) {
        set(&self.arriving, Instant::now());
    }

    /// Is a connection taken to be open at `now`?
    pub fn is_warm(&self, now: Instant) -> bool {
        get(&self.last_answer).is_some_and(|t| now.saturating_duration_since(t) < self.warm)
    }

    /// When the keep-warm touch is next due (`warm` after the last
    /// answer, or now if none yet; not while a scan is arriving).
    pub fn touch_due(&self, now: Instant) -> Instant {
        let due = get(&self.last_answer).map_or(now, |t| t + self.warm);
        get(&self.arriving).map_or(due, |a| due.max(a + ARRIVAL))
    }

    /// Should the keep-warm touch go out now: nothing warm, no scan
    /// arriving, and an API call within `keep_warm` (nights and weekends
    /// stay quiet).
    pub fn should_touch(&self, now: Instant) -> bool {
        !self.is_warm(now)
            && get(&self.arriving).is_none_or(|a| now.saturating_duration_since(a) >= ARRIVAL)
            && get(&self.last_call)
                .is_some_and(|c| now.saturating_duration_since(c) < self.keep_warm)
    }

    /// Claim the warm-up: `true` for the one caller that should send it
    /// (none in flight), which must call [`Warmth::warmed`] when done.
    pub fn begin(&self) -> bool {
        self.warming.send_if_modified(|w| {
            if *w {
                false
            } else {
                *w = true;
                true
            }
        })
    }

    pub fn warmed(&self) {
        self.warming.send_replace(false);
    }

    /// Wait (until `deadline`) for a warm-up in flight, so a scan rides the
    /// connection it is opening instead of opening another.
    pub async fn wait(&self, deadline: tokio::time::Instant) {
        let mut rx = self.warming.subscribe();
        let _ = tokio::time::timeout_at(deadline, rx.wait_for(|w| !*w)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_for_a_while_after_an_answer_and_touched_only_after_calls() {
        let w = Warmth::new(Duration::from_secs(25), Duration::from_secs(3600));
        let t0 = Instant::now();
        assert!(!w.is_warm(t0), "nothing answered yet");
        assert!(!w.should_touch(t0), "no call yet: nothing to keep warm");
        w.called();
        w.answered();
        let t = Instant::now();
        assert!(w.is_warm(t + Duration::from_secs(24)));
        assert!(!w.is_warm(t + Duration::from_secs(25)));
        assert!(!w.should_touch(t + Duration::from_secs(10)));
        assert!(w.should_touch(t + Duration::from_secs(26)));
        assert!(
            !w.should_touch(t + Duration::from_secs(3601)),
            "an hour after the last call the counter is closed"
        );
        let due = w.touch_due(t);
        assert!(due <= t + Duration::from_secs(25) && due > t + Duration::from_secs(24));
    }

    /// A touch due while a scan's code is arriving waits until it has
    /// arrived: the scan must not find its connection busy with a `HEAD`.
    #[test]
    fn no_touch_while_a_scan_arrives() {
        // `warm` zero: a touch is due the moment anything was answered.
        let w = Warmth::new(Duration::ZERO, Duration::from_secs(3600));
        w.called();
        w.answered();
        assert!(w.should_touch(Instant::now()), "due");
        let before = Instant::now();
        w.arriving();
        let after = Instant::now();
        assert!(!w.should_touch(after), "a scan is arriving");
        assert!(
            !w.should_touch(before + ARRIVAL - Duration::from_millis(1)),
            "still arriving"
        );
        assert!(w.should_touch(after + ARRIVAL));
        assert!(w.touch_due(after) >= before + ARRIVAL);
    }

    #[tokio::test]
    async fn one_warm_up_at_a_time_and_waiters_released() {
        let w = std::sync::Arc::new(Warmth::new(
            Duration::from_secs(25),
            Duration::from_secs(60),
        ));
        assert!(w.begin());
        assert!(!w.begin(), "a second warm-up while one is in flight");
        let w2 = w.clone();
        let waiter = tokio::spawn(async move {
            w2.wait(tokio::time::Instant::now() + Duration::from_secs(3600))
                .await
        });
        w.warmed();
        waiter.await.unwrap();
        assert!(w.begin(), "free again once done");
    }
}
