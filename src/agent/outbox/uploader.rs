//! Drains the outbox to the platform (DESIGN §5).
//!
//! * Wakes on new rows and on its own timers (the next due row, the end of a
//!   rate-limit hold, the spill retry, the hourly purge): no polling loop.
//! * Takes up to `batch` due rows at a time (half newest, half
//!   longest-waiting, see [`super::Store::due`]) and keeps up to
//!   `concurrency` calls in flight.
//! * Each row is sent with its own requestId; 10054 ("duplicate request") on
//!   any attempt means the platform already has it, so the row is sent.
//! * Failures by class: retry (backoff from 1 s up to 1 h, growing with the
//!   row's age, full jitter); token (the client already refreshed once; the
//!   row is retried like any other); rate limit (every upload holds until the
//!   next Beijing-time day); permanent (the row is parked `held` with its
//!   code); configuration (uploads stop, every row is kept, the cause is in
//!   status until the operator resumes).
//! * Shutdown cancels calls in flight; their rows stay pending and are
//!   retried with the same requestId after the restart.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Kind, Outbox, Row};
use crate::clock;
use crate::platform::api::{BindCardRelation, BindReq, ReportHisData, ReportReq};
use crate::platform::error::DUPLICATE_REQUEST;
use crate::platform::{CallError, CallOptions, Class, Client};

/// Meta key holding the end of a rate-limit hold (Unix seconds).
pub const META_RATE_LIMIT: &str = "rate_limited_until";

/// Longest backoff.
pub const MAX_BACKOFF_S: i64 = 3600;
/// How often spilled uses are retried while the disk refuses them.
const SPILL_RETRY: Duration = Duration::from_secs(5);
/// How often sent rows past their retention are purged.
const PURGE_EVERY_S: i64 = 3600;

/// The uploader's wall clock (Unix seconds). Injectable so a test can let a
/// simulated day pass.
pub type Clock = std::sync::Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn wall_clock() -> Clock {
    std::sync::Arc::new(clock::now_unix)
}

#[derive(Clone)]
pub struct UploaderSettings {
    pub batch: usize,
    pub concurrency: usize,
    pub retention_days: u32,
    pub clock: Clock,
}

impl UploaderSettings {
    /// From the `[outbox]` section, on the wall clock.
    pub fn from_config(c: &crate::config::Config) -> Self {
        UploaderSettings {
            batch: c.outbox.batch as usize,
            concurrency: c.outbox.concurrency as usize,
            retention_days: c.outbox.retention_days,
            clock: wall_clock(),
        }
    }
}

/// Seconds until the next attempt for a row of age `age_s`: uniform in
/// `1..=clamp(age, 1, 1 h)` (full jitter, after Vector's and AWS's advice).
pub fn backoff(age_s: i64, rng: &mut impl rand::Rng) -> i64 {
    let cap = age_s.clamp(1, MAX_BACKOFF_S);
    rng.random_range(1..=cap)
}

/// What one attempt came to.
#[derive(Debug, Clone)]
enum Outcome {
    Sent(i64),
    Retry(Option<i64>, String),
    RateLimited(Option<i64>, String),
    Held(Option<i64>, String),
    Stop(Option<i64>, String),
}

fn outcome(r: Result<(), CallError>) -> Outcome {
    match r {
        Ok(()) => Outcome::Sent(0),
        Err(e) if e.result_code() == Some(DUPLICATE_REQUEST) => Outcome::Sent(DUPLICATE_REQUEST),
        Err(e) => {
            let (code, msg) = (e.result_code(), e.to_string());
            match e.class() {
                Class::Success => Outcome::Sent(code.unwrap_or(0)),
                Class::Retry | Class::Token => Outcome::Retry(code, msg),
                Class::RateLimit => Outcome::RateLimited(code, msg),
                Class::Permanent => Outcome::Held(code, msg),
                Class::Configuration => Outcome::Stop(code, msg),
            }
        }
    }
}

async fn send(client: &Client, row: &Row) -> Result<(), CallError> {
    let opts = CallOptions::upload(row.request_id.clone());
    match row.kind {
        Kind::Report => {
            let req: ReportReq =
                serde_json::from_str(&row.payload).map_err(|e| CallError::Platform {
                    code: 10042,
                    msg: format!("stored payload unreadable: {e}"),
                })?;
            client.call::<ReportHisData>(&req, opts).await.map(|_| ())
        }
        Kind::Bind => {
            let req: BindReq =
                serde_json::from_str(&row.payload).map_err(|e| CallError::Platform {
                    code: 10042,
                    msg: format!("stored payload unreadable: {e}"),
                })?;
            let rsp = client.call::<BindCardRelation>(&req, opts).await?;
            if rsp.result {
                Ok(())
            } else {
                Err(CallError::Platform {
                    code: 10042,
                    msg: "bindCardRelation answered result=false".into(),
                })
            }
        }
    }
}

/// Run until `cancel`. Errors of the store are logged and retried on a timer;
/// they never end the uploader.
pub async fn run(
    outbox: Outbox,
    client: Client,
    settings: UploaderSettings,
    cancel: CancellationToken,
) {
    let mut in_flight: JoinSet<(Row, Result<(), CallError>)> = JoinSet::new();
    let mut flying: HashSet<i64> = HashSet::new();
    let mut queue: VecDeque<Row> = VecDeque::new();
    let now_fn = settings.clock.clone();
    let mut next_purge = now_fn();
    let concurrency = settings.concurrency.max(1);
    loop {
        // Register for a wake-up before looking, so none is missed.
        let notified = outbox.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let now = now_fn();
        if outbox.spilled() > 0 {
            outbox.flush_spill().await;
        }
        if now >= next_purge {
            let before = now - i64::from(settings.retention_days) * 86_400;
            match outbox.with_store(move |s| s.purge(before, false)).await {
                Ok(n) if n > 0 => {
                    tracing::info!(purged = n, "purged sent rows past their retention")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "outbox purge failed"),
            }
            next_purge = now + PURGE_EVERY_S;
        }
        let status = outbox.status();
        let hold_until = status.rate_limited_until.filter(|t| *t > now);
        let held = status.stopped.is_some() || hold_until.is_some();
        if held {
            queue.clear();
        }
        if hold_until.is_none() && status.rate_limited_until.is_some() {
            outbox.update_status(|s| s.rate_limited_until = None);
            let _ = outbox
                .with_store(|s| s.meta_set(META_RATE_LIMIT, None))
                .await;
            tracing::info!("rate-limit hold over: uploads resume");
        }
        if !held && queue.is_empty() {
            let exclude = flying.clone();
            let batch = settings.batch.max(1);
            match outbox
                .with_store(move |s| s.due(now, batch, &exclude))
                .await
            {
                Ok(rows) => queue.extend(rows),
                Err(e) => tracing::error!(error = %e, "outbox read failed"),
            }
        }
        while !held && in_flight.len() < concurrency {
            let Some(row) = queue.pop_front() else { break };
            flying.insert(row.id);
            let c = client.clone();
            in_flight.spawn(async move {
                let r = send(&c, &row).await;
                (row, r)
            });
        }

        // When to look again without being woken.
        let mut wake_at = next_purge;
        if let Some(t) = hold_until {
            wake_at = wake_at.min(t);
        }
        if !held && in_flight.len() < concurrency {
            if let Ok(c) = outbox.counts().await {
                if let Some(due) = c.next_due {
                    // Rows already due but in flight would make this a spin;
                    // completions wake us for those.
                    if due > now || in_flight.is_empty() {
                        wake_at = wake_at.min(due.max(now + 1));
                    }
                }
            }
        }
        if !queue.is_empty() && !held && in_flight.len() < concurrency {
            wake_at = now;
        }
        let sleep = if outbox.spilled() > 0 {
            SPILL_RETRY.min(secs_until(wake_at, now))
        } else {
            secs_until(wake_at, now)
        };

        // A full pass is done: everything changed before it began has been
        // seen (tests wait on this instead of sleeping).
        outbox.pass_done();
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Ok((row, result)) = done {
                    flying.remove(&row.id);
                    settle(&outbox, row, result, now_fn()).await;
                }
            }
            _ = &mut notified => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
    // Calls in flight are abandoned; their rows are still pending in the
    // file and keep their requestIds.
    in_flight.abort_all();
    while in_flight.join_next().await.is_some() {}
}

fn secs_until(t: i64, now: i64) -> Duration {
    Duration::from_secs((t - now).max(0) as u64)
}

/// Write the outcome of one attempt.
async fn settle(outbox: &Outbox, row: Row, result: Result<(), CallError>, now: i64) {
    let out = outcome(result);
    crate::metrics::get().upload(match &out {
        Outcome::Sent(_) => "success",
        Outcome::Retry(..) => "retry",
        Outcome::RateLimited(..) => "rate_limit",
        Outcome::Held(..) => "permanent",
        Outcome::Stop(..) => "configuration",
    });
    // The first success after failures: the platform is back. Rows that
    // backed off during the outage (up to an hour) become due now, so a
    // backlog drains at the platform's pace, not its backoff's.
    let recovered = matches!(out, Outcome::Sent(_)) && outbox.status().consecutive_failures > 0;
    let id = row.id;
    let age = now - row.created_at;
    let kind = row.kind.as_str();
    let rid = row.request_id.clone();
    // The row's outcome is written first, then the status: whoever reads
    // the status (the operator, a test) never sees more than the file holds.
    let out_for_store = out.clone();
    let r = outbox
        .with_store(move |s| {
            if recovered {
                match s.make_all_due(now) {
                    Ok(n) if n > 0 => {
                        tracing::info!(rows = n, "platform reachable again: backlog due now")
                    }
                    _ => {}
                }
            }
            match out_for_store {
                Outcome::Sent(code) => s.mark_sent(id, now, code),
                Outcome::Retry(code, msg) => {
                    let next = now + backoff(age, &mut rand::rng());
                    s.mark_retry(id, next, code, &msg)
                }
                Outcome::RateLimited(code, msg) => {
                    s.mark_retry(id, clock::next_midnight(now, clock::BEIJING), code, &msg)
                }
                Outcome::Held(code, msg) => s.mark_held(id, code, &msg),
                // Kept pending and due: it goes first once uploads resume.
                Outcome::Stop(code, msg) => s.mark_retry(id, now, code, &msg),
            }
        })
        .await;
    if let Err(e) = r {
        // The row stays as it was (pending): at worst it is sent again with
        // the same requestId and the platform answers 10054.
        tracing::error!(row = id, error = %e, "cannot record the upload's outcome");
    }

    match &out {
        Outcome::Sent(code) => {
            tracing::debug!(row = id, request_id = %rid, kind, code, "uploaded");
            outbox.update_status(|s| {
                s.last_success_at = Some(now);
                s.uploaded += 1;
                s.consecutive_failures = 0;
            });
        }
        Outcome::Retry(code, msg) => {
            tracing::warn!(row = id, request_id = %rid, kind, code = ?code, error = %msg, attempts = row.attempts + 1, "upload failed; will retry");
            outbox.update_status(|s| {
                s.last_error = Some(msg.clone());
                s.failed_attempts += 1;
                s.consecutive_failures += 1;
            });
        }
        Outcome::RateLimited(code, msg) => {
            let until = clock::next_midnight(now, clock::BEIJING);
            tracing::warn!(code = ?code, until, "platform call limit reached: uploads hold until the next Beijing day");
            outbox.update_status(|s| {
                s.rate_limited_until = Some(until);
                s.last_error = Some(msg.clone());
                s.failed_attempts += 1;
                s.consecutive_failures += 1;
            });
            let _ = outbox
                .with_store(move |s| s.meta_set(META_RATE_LIMIT, Some(&until.to_string())))
                .await;
        }
        Outcome::Held(code, msg) => {
            tracing::error!(row = id, request_id = %rid, kind, code = ?code, error = %msg, "platform refused this row permanently: held for the operator (`ehc-agent outbox list`)");
            outbox.update_status(|s| {
                s.last_error = Some(msg.clone());
                s.failed_attempts += 1;
                s.consecutive_failures += 1;
            });
        }
        Outcome::Stop(code, msg) => {
            tracing::error!(code = ?code, error = %msg, "configuration error: uploads stopped, every row kept; fix the configuration and reload or run `ehc-agent outbox flush`");
            outbox.update_status(|s| {
                s.stopped = Some(match code {
                    Some(c) => format!("result code {c}: {msg}"),
                    None => msg.clone(),
                });
                s.last_error = Some(msg.clone());
                s.failed_attempts += 1;
                s.consecutive_failures += 1;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_age_and_is_bounded() {
        use rand::SeedableRng as _;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mean = |age: i64, rng: &mut rand::rngs::StdRng| {
            let draws: Vec<i64> = (0..4000).map(|_| backoff(age, rng)).collect();
            assert!(draws
                .iter()
                .all(|b| (1..=age.clamp(1, MAX_BACKOFF_S)).contains(b)));
            // Full jitter: the whole range is used, not one value.
            let (lo, hi) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
            (
                draws.iter().sum::<i64>() as f64 / draws.len() as f64,
                *lo,
                *hi,
            )
        };
        assert_eq!(backoff(0, &mut rng), 1);
        let (m30, lo30, hi30) = mean(30, &mut rng);
        let (m600, _, _) = mean(600, &mut rng);
        let (mday, _, hiday) = mean(86_400, &mut rng);
        let (m10d, _, _) = mean(10 * 86_400, &mut rng);
        // Uniform on 1..=cap: the mean is about cap/2, so it grows with age
        // until the cap, then stays.
        assert!((lo30, hi30) == (1, 30), "{lo30}..{hi30}");
        assert!((m30 - 15.5).abs() < 1.5, "{m30}");
        assert!(m600 > 10.0 * m30, "{m600} vs {m30}");
        assert!(mday > 4.0 * m600, "{mday} vs {m600}");
        assert!(hiday <= MAX_BACKOFF_S && hiday > MAX_BACKOFF_S * 9 / 10);
        assert!((m10d - mday).abs() < mday * 0.1, "capped: {m10d} vs {mday}");
    }

    #[test]
    fn outcomes_by_class() {
        let p = |code| {
            Err(CallError::Platform {
                code,
                msg: String::new(),
            })
        };
        assert!(matches!(outcome(Ok(())), Outcome::Sent(0)));
        assert!(matches!(outcome(p(10054)), Outcome::Sent(10054)));
        assert!(matches!(outcome(p(-1)), Outcome::Retry(Some(-1), _)));
        assert!(matches!(outcome(p(21004)), Outcome::Retry(..)));
        assert!(matches!(outcome(p(10034)), Outcome::RateLimited(..)));
        assert!(matches!(outcome(p(21007)), Outcome::RateLimited(..)));
        assert!(matches!(outcome(p(10042)), Outcome::Held(Some(10042), _)));
        assert!(matches!(outcome(p(21006)), Outcome::Stop(Some(21006), _)));
        assert!(matches!(
            outcome(Err(CallError::Http(404))),
            Outcome::Stop(None, _)
        ));
        assert!(matches!(
            outcome(Err(CallError::Timeout(1))),
            Outcome::Retry(None, _)
        ));
    }
}
