//! The open platform client: signs, sends, parses, classifies, and keeps the
//! app token (see [`super::token`] for why that needs care).
//!
//! Two kinds of callers use it with different patience ([`Urgency`]): the
//! scan path, where a person stands at the window (short timeout, from
//! `platform.timeout_ms`), and the outbox uploader, where nobody waits (longer
//! timeout). The outbox passes its own `requestId` so every retry of a row
//! carries the same one, and 10054 on a retry means "already have it".
//!
//! The client assumes nothing about who answers: the real platform, the
//! simulator, or a hospital gateway (DESIGN §5a) all speak the same protocol.
//!
//! Rules that each closed a hole:
//! * **No redirects, ever.** A 3xx would carry the appToken and QR texts to
//!   another host and its answers would be taken as the platform's. A
//!   redirect is an error of class configuration, naming the target.
//! * **One deadline per call.** `timeout_ms` bounds the whole scan path:
//!   token refresh, call, and the retry after 21003/21004 share it.
//! * **A refresh runs to its end** on its own task even if the caller's
//!   deadline passes: getAppToken revokes the old token as soon as the
//!   platform answers, so an answer thrown away would leave every call
//!   failing. The new token is made current in memory before it is saved;
//!   a failed save (full disk) is logged, not fatal.
//! * **Rejected refreshes back off exponentially** (2 s doubling to 5 min),
//!   and a 21003/21004 for a token of ours that had not expired is counted
//!   as a revocation by another holder of the appId (`status` says so).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use serde_json::{Map, Value};

use super::api::{self, Api, GetAppToken, ResponseError, MAX_BODY};
use super::error::{classify, Class};
use super::sign;
use super::token::{Identity, SharedTokens, StoreError, Token, TokenStore, MIN_REFRESH_INTERVAL};
use super::warm::Warmth;
use crate::clock;
use crate::config::{Config, Secret};

/// How long a call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// A person is waiting: `platform.timeout_ms`.
    Scan,
    /// Background upload: `platform.upload_timeout_ms`.
    Upload,
}

/// Per-call options.
#[derive(Debug, Clone)]
pub struct CallOptions {
    pub urgency: Urgency,
    /// Reuse this requestId (the outbox's own); `None` makes a fresh one.
    pub request_id: Option<String>,
}

impl CallOptions {
    pub fn scan() -> Self {
        CallOptions {
            urgency: Urgency::Scan,
            request_id: None,
        }
    }
    pub fn upload(request_id: impl Into<String>) -> Self {
        CallOptions {
            urgency: Urgency::Upload,
            request_id: Some(request_id.into()),
        }
    }
}

/// Why a call did not succeed. [`CallError::class`] tells the caller what to
/// do about it.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach the platform: {0}")]
    Unreachable(String),
    #[error("the platform did not answer within {0} ms")]
    Timeout(u64),
    #[error("the platform answered HTTP {0}")]
    Http(u16),
    #[error("the platform answered a redirect (HTTP {status}) to {location}; redirects are never followed (they would send tokens and QR texts elsewhere): set base_url to the real address")]
    Redirect { status: u16, location: String },
    #[error("unusable platform response: {0}")]
    Response(#[from] ResponseError),
    #[error("platform result code {code}: {msg}")]
    Platform { code: i64, msg: String },
    #[error("token refreshed moments ago and rejected again (code {code}); not refreshing for {wait_s} s: another agent or program is using the same appId (put the terminals behind a gateway)")]
    TokenChurn { code: i64, wait_s: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CallError {
    /// The DESIGN §5 class of this failure.
    pub fn class(&self) -> Class {
        match self {
            CallError::Unreachable(_) | CallError::Timeout(_) | CallError::Response(_) => {
                Class::Retry
            }
            CallError::Http(s) if *s >= 500 || *s == 408 || *s == 429 => Class::Retry,
            // Any other HTTP status means the address is wrong (404 from a
            // proxy, 403 from a firewall page): the operator must act.
            CallError::Http(_) | CallError::Redirect { .. } => Class::Configuration,
            CallError::Platform { code, .. } => classify(*code),
            CallError::TokenChurn { .. } => Class::Token,
            // Our own state file failing is not the platform's fault; retry.
            CallError::Store(_) => Class::Retry,
        }
    }

    /// The platform's result code, when it answered with one.
    pub fn result_code(&self) -> Option<i64> {
        match self {
            CallError::Platform { code, .. } | CallError::TokenChurn { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when the platform could not be reached or gave no usable answer:
    /// the scan path's offline policy applies.
    pub fn is_unavailable(&self) -> bool {
        self.class() == Class::Retry && !matches!(self, CallError::Platform { .. })
    }
}

/// A request's `requestId`, and whose it is.
#[derive(Clone, Copy)]
enum Id<'a> {
    /// Made for this request (renewed when the request is sent again).
    Fresh(&'a str),
    /// The caller's (an outbox row's): kept, so 10054 means "already done".
    Caller(&'a str),
}

impl<'a> Id<'a> {
    fn of(id: &'a str, callers: bool) -> Self {
        if callers {
            Id::Caller(id)
        } else {
            Id::Fresh(id)
        }
    }

    fn as_str(&self) -> &'a str {
        match self {
            Id::Fresh(s) | Id::Caller(s) => s,
        }
    }
}

/// What the client needs from the configuration.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub base_url: String,
    /// More addresses of the same service (a second gateway), tried in
    /// order when the ones before cannot be connected to.
    pub fallback_urls: Vec<String>,
    pub app_id: String,
    pub hospital_id: String,
    pub secret: Secret,
    pub scan_timeout: Duration,
    pub upload_timeout: Duration,
    pub proxy: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// A connection that answered within this is taken to be open; the
    /// keep-warm interval ([`super::warm`]).
    pub warm: Duration,
    /// Keep one connection open for this long after the last API call
    /// (zero: never touched).
    pub keep_warm: Duration,
    /// Open a connection on the first byte of a scan when none is warm.
    pub preconnect: bool,
    /// `None`: keep the token in memory only.
    pub state_path: Option<PathBuf>,
    /// A token store shared with other holders of the appId (the
    /// gateways' Redis), and this process's name in it.
    pub shared: Option<(Arc<dyn SharedTokens>, String)>,
}

impl ClientSettings {
    pub fn from_config(c: &Config) -> Self {
        ClientSettings {
            base_url: c.platform.base_url.clone(),
            fallback_urls: c.platform.base_urls.clone(),
            app_id: c.platform.app_id.clone(),
            hospital_id: c.platform.hospital_id.clone(),
            secret: c.app_secret.clone(),
            scan_timeout: Duration::from_millis(c.platform.timeout_ms),
            upload_timeout: Duration::from_millis(c.platform.upload_timeout_ms),
            proxy: c.platform.proxy.clone(),
            ca_file: c.platform.ca_file.clone(),
            warm: Duration::from_secs(c.platform.warm_s),
            keep_warm: Duration::from_secs(c.platform.keep_warm_min * 60),
            preconnect: c.platform.preconnect,
            state_path: Some(c.state_path.clone()),
            shared: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("proxy `{0}`: {1}")]
    Proxy(String, String),
    #[error("CA file {0}: {1}")]
    Ca(PathBuf, String),
    #[error("HTTP client: {0}")]
    Http(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counters a status screen or metrics can read.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Set while the shared token store cannot be reached (the token in
    /// memory is used meanwhile).
    pub shared_down: std::sync::atomic::AtomicBool,
    pub token_fetches: AtomicI64,
    pub last_token_at: AtomicI64,
    /// 21003/21004 answers to a token of ours that had not expired: someone
    /// else fetched a token for the same appId.
    pub revocations: AtomicI64,
    pub last_revoked_at: AtomicI64,
    /// The last [`RECENT_ERRORS`] failed calls, newest last.
    recent: std::sync::Mutex<std::collections::VecDeque<RecentError>>,
}

/// How many failed calls [`ClientStats::recent_errors`] keeps.
pub const RECENT_ERRORS: usize = 10;

/// A failed platform call, for `status` and the gateway's fleet page. No
/// request content: the API, when, and the result code or transport class.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentError {
    pub at: i64,
    pub api: String,
    /// The platform's result code; `None` for a failure to get an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    /// The class ([`Class`]) and, without a code, what went wrong.
    pub what: String,
}

impl ClientStats {
    fn record(&self, api: &str, e: &CallError) {
        let (code, what) = match e {
            CallError::Platform { code, .. } => (Some(*code), e.class().as_str().to_owned()),
            other => (None, format!("{}: {other}", other.class().as_str())),
        };
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == RECENT_ERRORS {
            r.pop_front();
        }
        r.push_back(RecentError {
            at: clock::now_unix(),
            api: api.to_owned(),
            code,
            what,
        });
    }

    /// The last failed calls, oldest first.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// How long the heartbeat client keeps an idle connection.
const HEARTBEAT_IDLE: Duration = Duration::from_secs(180);

/// A cheap-to-clone handle.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// For heartbeats (see [`Client::heartbeat`]): made at the first one,
    /// so clients that never beat (the gateway's, `outbox flush`) and every
    /// start and reload do not build a second TLS client.
    side: std::sync::OnceLock<reqwest::Client>,
    /// `base_url` and its fallbacks, without trailing slashes.
    bases: Vec<String>,
    /// The base that answered last: calls start there.
    sticky: std::sync::atomic::AtomicUsize,
    settings: ClientSettings,
    tokens: TokenStore,
    refresh: Arc<tokio::sync::Mutex<()>>,
    /// Unix seconds of the last refresh caused by a 21003/21004 answer.
    last_rejected_refresh: AtomicI64,
    /// Rejected refreshes in a row (no successful call between them): the
    /// wait before the next one doubles with each.
    rejected_streak: AtomicI64,
    /// The last refresh that failed, for the generation it tried to
    /// replace: callers queued behind it get its answer instead of each
    /// asking again (single flight for failures too).
    last_failure: std::sync::Mutex<Option<(std::time::Instant, u64, FailedRefresh)>>,
    stats: ClientStats,
    warmth: Warmth,
}

/// Why a token is being fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// None held yet.
    Missing,
    /// About to expire.
    Expiring,
    /// The platform answered 21003/21004 to a call made with it.
    Rejected(i64),
}

/// A fresh `requestId`: 32 upper-case hex characters.
pub fn new_request_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Is this a well-formed requestId of ours?
pub fn is_request_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

impl Client {
    pub fn new(settings: ClientSettings) -> Result<Self, BuildError> {
        // A connection idle past `warm` is not trusted (the platform may
        // be closing it as the request goes out); the slack covers the
        // keep-warm touch's own timing.
        let http = http_client(&settings, settings.warm + Duration::from_secs(5))?;
        let identity = Identity {
            base_url: settings.base_url.clone(),
            app_id: settings.app_id.clone(),
            hospital_id: settings.hospital_id.clone(),
        };
        // A state directory that cannot be written must not stop the scan
        // path: the token is then kept in memory (a restart fetches a new one).
        let tokens = match TokenStore::open(settings.state_path.as_deref(), identity.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "token state cannot be opened; keeping the app token in memory only");
                TokenStore::open(None, identity)?
            }
        };
        let warmth = Warmth::new(settings.warm, settings.keep_warm);
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                side: std::sync::OnceLock::new(),
                bases: std::iter::once(&settings.base_url)
                    .chain(&settings.fallback_urls)
                    .map(|b| b.trim_end_matches('/').to_owned())
                    .collect(),
                sticky: std::sync::atomic::AtomicUsize::new(0),
                settings,
                tokens,
                refresh: Arc::new(tokio::sync::Mutex::new(())),
                last_rejected_refresh: AtomicI64::new(i64::MIN / 2),
                rejected_streak: AtomicI64::new(0),
                last_failure: std::sync::Mutex::new(None),
                stats: ClientStats::default(),
                warmth,
            }),
        })
    }

    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    /// The token the client holds now, if any.
    pub fn token(&self) -> Option<Token> {
        self.inner.tokens.current()
    }

    fn timeout(&self, u: Urgency) -> Duration {
        match u {
            Urgency::Scan => self.inner.settings.scan_timeout,
            Urgency::Upload => self.inner.settings.upload_timeout,
        }
    }

    /// Call API `A`. On 21003/21004 the token is refreshed (single flight)
    /// and the call retried once. The whole of it, refresh and retry
    /// included, is bounded by the urgency's timeout.
    pub async fn call<A: Api>(&self, req: &A::Req, opts: CallOptions) -> Result<A::Rsp, CallError> {
        let urgency = opts.urgency;
        as_urgency(urgency, self.call_inner::<A>(req, opts)).await
    }

    async fn call_inner<A: Api>(
        &self,
        req: &A::Req,
        opts: CallOptions,
    ) -> Result<A::Rsp, CallError> {
        let timeout = self.timeout(opts.urgency);
        let deadline = tokio::time::Instant::now() + timeout;
        let caller_id = opts.request_id.is_some();
        let request_id = opts.request_id.unwrap_or_else(new_request_id);
        let token = self.valid_token(deadline, timeout).await?;
        self.before_call(opts.urgency, deadline).await;
        let first = self
            .send::<A>(
                req,
                Id::of(&request_id, caller_id),
                &token.value,
                left(deadline, timeout)?,
            )
            .await;
        let result = match first {
            Err(e) if e.class() == Class::Token => {
                let code = e.result_code().unwrap_or_default();
                let now = clock::now_unix();
                if token.expires_at > now {
                    // Our token had not expired: another holder of the appId
                    // fetched a new one, which revoked ours.
                    let st = &self.inner.stats;
                    st.revocations.fetch_add(1, Ordering::Relaxed);
                    st.last_revoked_at.store(now, Ordering::Relaxed);
                }
                let fresh = self
                    .refresh(token.generation, deadline, timeout, Reason::Rejected(code))
                    .await?;
                // A caller's own requestId is kept (the outbox relies on it);
                // a throwaway one is renewed in case the platform's replay
                // guard remembered the rejected attempt.
                let retry_id = if caller_id {
                    request_id
                } else {
                    new_request_id()
                };
                self.send::<A>(
                    req,
                    Id::of(&retry_id, caller_id),
                    &fresh.value,
                    left(deadline, timeout)?,
                )
                .await
            }
            other => other,
        };
        match result {
            Ok(r) => {
                self.inner.rejected_streak.store(0, Ordering::Relaxed);
                Ok(r)
            }
            // A step timed out on what was left of the budget: the caller's
            // figure is the whole budget.
            Err(CallError::Timeout(_)) => Err(CallError::Timeout(timeout.as_millis() as u64)),
            Err(e) => Err(e),
        }
    }

    /// Send a terminal heartbeat to the gateway ([`super::heartbeat`]),
    /// signed like a call, on connections of its own and with the upload
    /// timeout: it never delays a scan or an upload. A 21003/21004 answer
    /// refreshes the token for the next beat; HTTP 404 means the base is
    /// the platform itself, not a gateway.
    pub async fn heartbeat(&self, beat: &super::heartbeat::Beat) -> Result<(), CallError> {
        let timeout = self.inner.settings.upload_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let token = self.valid_token(deadline, timeout).await?;
        let body = self.envelope_map(beat.to_req(), &new_request_id(), &token.value);
        let url = format!("{}{}", self.current_base(), super::heartbeat::PATH);
        // Heartbeats go on connections of their own: one in flight never
        // holds the connection a scan is about to use.
        let side = match self.inner.side.get() {
            Some(c) => c,
            None => {
                // Kept across beats (every 30 s by default; the gateway
                // keeps idle connections open), so beats do not open a
                // connection each: at the gateway a new connection means a
                // scan may be coming ([`crate::gateway::accept`]).
                let c = http_client(&self.inner.settings, HEARTBEAT_IDLE)
                    .map_err(|e| CallError::Unreachable(e.to_string()))?;
                self.inner.side.get_or_init(|| c)
            }
        };
        let sent = tokio::time::timeout(
            left(deadline, timeout)?,
            side.post(&url)
                .header("content-type", "application/json; charset=utf-8")
                .body(body)
                .send(),
        )
        .await
        .map_err(|_| CallError::Timeout(timeout.as_millis() as u64))?
        .map_err(|e| transport_error(&e))?;
        let status = sent.status();
        let bytes = read_capped(sent).await?;
        if !status.is_success() {
            return Err(CallError::Http(status.as_u16()));
        }
        match api::result_code(&bytes)? {
            0 => Ok(()),
            code @ (21003 | 21004) => {
                let _ = self
                    .refresh(token.generation, deadline, timeout, Reason::Rejected(code))
                    .await;
                Err(CallError::Platform {
                    code,
                    msg: "the gateway refused the token; refreshed for the next beat".into(),
                })
            }
            code => Err(CallError::Platform {
                code,
                msg: super::error::describe(code).unwrap_or_default().into(),
            }),
        }
    }

    /// The base that answered last (calls start there).
    fn current_base(&self) -> &str {
        let bases = &self.inner.bases;
        &bases[self.inner.sticky.load(Ordering::Relaxed) % bases.len()]
    }

    /// Before an API call: note it (keep-warm runs for a while after the
    /// last one), and let a scan wait for a warm-up in flight so it rides
    /// that connection.
    async fn before_call(&self, urgency: Urgency, deadline: tokio::time::Instant) {
        self.inner.warmth.called();
        if urgency == Urgency::Scan {
            self.inner.warmth.wait(deadline).await;
        }
    }

    /// A scan is arriving (its first byte came from a scanner): no
    /// keep-warm touch starts until it has arrived, and if no connection
    /// is warm, one starts opening now, while the rest of the code
    /// arrives. Returns at once.
    pub fn preconnect(&self) {
        self.inner.warmth.arriving();
        if !self.inner.settings.preconnect || self.inner.warmth.is_warm(std::time::Instant::now()) {
            return;
        }
        if self.inner.warmth.begin() {
            let this = self.clone();
            tokio::spawn(async move { this.warm_up(true).await });
        }
    }

    /// One request that is not an API call (`HEAD` on the base that
    /// answered last). A keep-warm touch (`open_only` false) goes out on
    /// the pooled connection, or opens one, and so keeps it open. A
    /// pre-connect (`open_only`) only opens a connection when none is
    /// idle, and the request is not sent: the connection is kept for the
    /// scan ([`super::preconnect`]), which would otherwise wait a round
    /// trip for the `HEAD`'s answer. The caller holds the warm-up claim.
    async fn warm_up(&self, open_only: bool) {
        let url = format!("{}/", self.current_base());
        let head = self.inner.http.head(&url).send();
        let sent = tokio::time::timeout(self.inner.settings.scan_timeout, async {
            if open_only {
                super::preconnect::opening(head).await
            } else {
                head.await
            }
        })
        .await;
        match sent {
            Ok(Ok(_)) => self.inner.warmth.answered(),
            Ok(Err(e)) if super::preconnect::is_kept(&e) => {
                tracing::debug!("connection opened ahead of the scan")
            }
            Ok(Err(e)) => tracing::debug!(error = %transport_error(&e), "warm-up failed"),
            Err(_) => tracing::debug!("warm-up timed out"),
        }
        self.inner.warmth.warmed();
    }

    /// Keep one connection open through a counter's idle gaps until `stop`
    /// (see [`super::warm`]). Returns at once when keep-warm is off.
    pub async fn keep_warm(self, stop: tokio_util::sync::CancellationToken) {
        let w = &self.inner.warmth;
        if w.keep_warm.is_zero() {
            return;
        }
        loop {
            let now = std::time::Instant::now();
            let due = w.touch_due(now).max(now + Duration::from_millis(100));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(due.into()) => {}
            }
            if w.should_touch(std::time::Instant::now()) && w.begin() {
                self.warm_up(false).await;
            } else if !w.is_warm(std::time::Instant::now()) {
                // Nothing to keep (no recent call): look again later.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(w.warm) => {}
                }
            }
        }
    }

    /// Make sure a fresh token is held (the gateway's refresher calls this
    /// ahead of expiry, so no forwarded scan pays for getAppToken).
    pub async fn warm_token(&self) -> Result<Token, CallError> {
        let timeout = self.inner.settings.upload_timeout;
        self.valid_token(tokio::time::Instant::now() + timeout, timeout)
            .await
    }

    /// Refresh the token ahead of its expiry (and fetch one now), until
    /// `stop`, so no call waiting on a person pays for getAppToken.
    /// Failures are retried with backoff (1 s doubling to 5 min); calls in
    /// between refresh on demand as before.
    pub async fn keep_fresh(self, stop: tokio_util::sync::CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match self.warm_token().await {
                Ok(t) => {
                    backoff = Duration::from_secs(1);
                    // Wake when it stops being fresh (fresh_at's margin).
                    let now = clock::now_unix();
                    let mut at = now + 1;
                    while t.fresh_at(at) && at < t.expires_at {
                        at += ((t.expires_at - at) / 2).max(1);
                    }
                    Duration::from_secs((at - now).clamp(1, 3600) as u64)
                }
                Err(e) => {
                    // A wrong secret or appId will not fix itself: ask
                    // rarely (a reload with the right one starts afresh).
                    if e.class() == Class::Configuration {
                        backoff = Duration::from_secs(300);
                    }
                    tracing::warn!(error = %e, retry_s = backoff.as_secs(), "background token refresh failed");
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                    w
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// A token fresh enough to use, fetching one if needed.
    async fn valid_token(
        &self,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Token, CallError> {
        let now = clock::now_unix();
        match self.inner.tokens.current() {
            Some(t) if t.fresh_at(now) => Ok(t),
            Some(t) => {
                self.refresh(t.generation, deadline, timeout, Reason::Expiring)
                    .await
            }
            None => self.refresh(0, deadline, timeout, Reason::Missing).await,
        }
    }

    /// Single-flight refresh of generation `seen`, waited for until
    /// `deadline`. The refresh itself runs on its own task and finishes even
    /// if nobody waits any more (see the module doc).
    async fn refresh(
        &self,
        seen: u64,
        deadline: tokio::time::Instant,
        timeout: Duration,
        reason: Reason,
    ) -> Result<Token, CallError> {
        let this = self.clone();
        let task = tokio::spawn(async move { this.refresh_now(seen, reason).await });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(CallError::Unreachable(format!("token refresh failed: {e}"))),
            Err(_) => Err(CallError::Timeout(timeout.as_millis() as u64)),
        }
    }

    fn shared(&self) -> Option<(Arc<dyn SharedTokens>, String)> {
        self.inner.settings.shared.clone()
    }

    /// Make `t` (from the shared store) the current token.
    fn adopt(&self, t: Token) -> Token {
        if let Err(e) = self.inner.tokens.adopt(&t) {
            tracing::error!(error = %e, "the shared app token could not be saved locally");
        }
        t
    }

    fn shared_unreachable(&self, e: &str) {
        if !self.inner.stats.shared_down.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "the shared token store cannot be reached; serving with the token in memory");
        }
    }

    fn shared_ok(&self) {
        if self.inner.stats.shared_down.swap(false, Ordering::Relaxed) {
            tracing::warn!("the shared token store is reachable again");
        }
    }

    /// The shared store's token: `Some(found)`, or `None` if it cannot be
    /// reached.
    async fn shared_load(&self, sh: &(Arc<dyn SharedTokens>, String)) -> Option<Option<Token>> {
        let s = sh.0.clone();
        match tokio::task::spawn_blocking(move || s.load()).await {
            Ok(Ok(t)) => {
                self.shared_ok();
                Some(t)
            }
            Ok(Err(e)) => {
                self.shared_unreachable(&e);
                None
            }
            Err(_) => None,
        }
    }

    async fn shared_release(&self) {
        if let Some((s, holder)) = self.shared() {
            let _ = tokio::task::spawn_blocking(move || s.release(&holder)).await;
        }
    }

    /// Take the refresh lease, or wait (up to twice `timeout`) for the
    /// holder's new token. A holder that died lets its lease expire.
    async fn lease_or_wait(
        &self,
        sh: &(Arc<dyn SharedTokens>, String),
        expected: u64,
        timeout: Duration,
    ) -> Lease {
        let ttl_ms = (timeout.as_millis() as u64).saturating_mul(2).max(1000);
        let deadline = tokio::time::Instant::now() + timeout * 2;
        loop {
            let (s, holder) = sh.clone();
            match tokio::task::spawn_blocking(move || s.lease(&holder, ttl_ms)).await {
                Ok(Ok(true)) => return Lease::Ours,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    self.shared_unreachable(&e);
                    return Lease::Unavailable;
                }
                Err(_) => return Lease::Unavailable,
            }
            // Another gateway is refreshing: its token will be stored.
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(Some(t)) = self.shared_load(sh).await {
                if t.generation > expected {
                    return Lease::Theirs(t);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                // Its lease outlives our patience: a refresh of ours now
                // would revoke the token it is about to store.
                return Lease::Waited;
            }
        }
    }

    /// The wait before another refresh caused by a rejection: 2 s, doubling
    /// with each rejected refresh in a row, at most 5 minutes.
    fn rejected_refresh_wait(&self) -> i64 {
        let streak = self
            .inner
            .rejected_streak
            .load(Ordering::Relaxed)
            .clamp(0, 16);
        (MIN_REFRESH_INTERVAL << streak).min(MAX_REFRESH_BACKOFF_S)
    }

    /// If the current token is already newer than `seen` and fresh, it is
    /// returned without a call; otherwise one getAppToken.
    async fn refresh_now(&self, seen: u64, reason: Reason) -> Result<Token, CallError> {
        let _guard = self.inner.refresh.clone().lock_owned().await;
        let now = clock::now_unix();
        if let Some(t) = self.inner.tokens.current() {
            if t.generation > seen && t.fresh_at(now) {
                return Ok(t);
            }
        }
        // The refresh we queued behind failed a moment ago: its answer is
        // ours (20 uploads failing at once make one getAppToken, not 20).
        if let Some((at, gen, failed)) = self
            .inner
            .last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if *gen == seen && at.elapsed() < FAILURE_SHARED_FOR {
                return Err(failed.error());
            }
        }
        let result = self.refresh_locked(seen, reason, now).await;
        let mut last = self
            .inner
            .last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *last = match &result {
            // A refusal to refresh (churn) is not an answer of the platform.
            Ok(_) | Err(CallError::TokenChurn { .. }) => None,
            Err(e) => Some((std::time::Instant::now(), seen, FailedRefresh::of(e))),
        };
        result
    }

    /// The refresh itself, under the single-flight lock.
    async fn refresh_locked(
        &self,
        seen: u64,
        reason: Reason,
        now: i64,
    ) -> Result<Token, CallError> {
        // Another holder of the appId may have refreshed already: never ask
        // for a token while a newer one is in the shared store.
        let mut shared_gen = None;
        if let Some(sh) = self.shared() {
            match self.shared_load(&sh).await {
                Some(Some(t)) if t.generation > seen && t.fresh_at(now) => {
                    return Ok(self.adopt(t));
                }
                Some(found) => shared_gen = Some(found.map(|t| t.generation).unwrap_or(0)),
                None => {}
            }
        }
        if let Reason::Rejected(code) = reason {
            let last = self.inner.last_rejected_refresh.load(Ordering::Relaxed);
            let wait = self.rejected_refresh_wait();
            if now - last < wait {
                tracing::warn!(code, wait_s = wait - (now - last), "app token rejected again right after a refresh; not refreshing yet (is another agent using the same appId?)");
                return Err(CallError::TokenChurn {
                    code,
                    wait_s: wait - (now - last),
                });
            }
            if now - last < wait * 4 {
                self.inner.rejected_streak.fetch_add(1, Ordering::Relaxed);
            } else {
                self.inner.rejected_streak.store(0, Ordering::Relaxed);
            }
            self.inner
                .last_rejected_refresh
                .store(now, Ordering::Relaxed);
        }
        let req = api::AppTokenReq {
            app_id: self.inner.settings.app_id.clone(),
        };
        // Nobody may be waiting for this call any more; it gets the patient
        // (upload) timeout so a slow answer still lands.
        let timeout = self.inner.settings.upload_timeout;
        // With a shared store, one holder at a time refreshes: the others
        // wait for its token instead of revoking it with their own.
        let mut leased = false;
        if let (Some(sh), Some(expected)) = (self.shared(), shared_gen) {
            match self.lease_or_wait(&sh, expected, timeout).await {
                Lease::Ours => leased = true,
                Lease::Theirs(t) => return Ok(self.adopt(t)),
                Lease::Unavailable => {}
                Lease::Waited => {
                    return Err(CallError::Unreachable(
                        "another gateway is refreshing the app token; try again".into(),
                    ))
                }
            }
        }
        let fetched = self
            .send::<GetAppToken>(&req, Id::Fresh(&new_request_id()), "", timeout)
            .await;
        let rsp = match fetched {
            Ok(r) => r,
            Err(e) => {
                if leased {
                    self.shared_release().await;
                }
                return Err(e);
            }
        };
        let (mut tok, saved) =
            self.inner
                .tokens
                .install(rsp.app_token, rsp.expires_in, clock::now_unix());
        if let Err(e) = saved {
            tracing::error!(error = %e, "the new app token could not be saved (it is in use from memory; a restart will fetch another)");
        }
        if let (Some((store, holder)), Some(expected)) = (self.shared(), shared_gen) {
            let ours = tok.clone();
            let stored =
                tokio::task::spawn_blocking(move || store.store_if(expected, &ours, &holder))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
            match stored {
                Ok(winner) => {
                    if winner.value != tok.value {
                        tracing::warn!(generation = winner.generation, "a newer token was stored by another gateway while ours was on its way; ours is dropped");
                    }
                    tok = self.adopt(winner);
                }
                Err(e) => self.shared_unreachable(&e),
            }
            if leased {
                self.shared_release().await;
            }
        }
        self.inner
            .stats
            .token_fetches
            .fetch_add(1, Ordering::Relaxed);
        crate::metrics::get().token_refreshes.inc();
        self.inner
            .stats
            .last_token_at
            .store(tok.obtained_at, Ordering::Relaxed);
        tracing::info!(generation = tok.generation, expires_in = rsp.expires_in, reason = ?reason, "obtained a new app token");
        Ok(tok)
    }

    /// One signed POST, with the body read up to [`MAX_BODY`]. `id`: the
    /// request's `requestId`; a throwaway one ([`Id::Fresh`]) is renewed if
    /// the request has to be sent again after its connection dropped (the
    /// first may have reached the platform, which would answer 10054).
    async fn send<A: Api>(
        &self,
        req: &A::Req,
        id: Id<'_>,
        token: &str,
        timeout: Duration,
    ) -> Result<A::Rsp, CallError> {
        let request_id = id.as_str();
        let body = |resend: bool| match id {
            Id::Fresh(_) if resend => self.envelope::<A>(req, &new_request_id(), token),
            _ => self.envelope::<A>(req, request_id, token),
        };
        let started = std::time::Instant::now();
        let bytes = self.post(A::PATH, &body, timeout).await;
        let result = bytes.and_then(|b| {
            let answer = api::parse_response::<A>(&b)?;
            match answer.rsp {
                Some(rsp) => Ok(rsp),
                None => Err(CallError::Platform {
                    code: answer.common_out.result_code,
                    msg: answer.common_out.err_msg,
                }),
            }
        });
        let elapsed = started.elapsed();
        let elapsed_ms = elapsed.as_millis() as u64;
        let class = match &result {
            Ok(_) => "success",
            Err(e) => e.class().as_str(),
        };
        crate::metrics::get().platform(A::NAME, class, elapsed.as_secs_f64());
        if let Err(e) = &result {
            self.inner.stats.record(A::NAME, e);
        }
        match &result {
            Ok(_) => tracing::debug!(api = A::NAME, request_id, elapsed_ms, "platform call ok"),
            Err(e) => {
                tracing::debug!(api = A::NAME, request_id, elapsed_ms, class = %e.class(), error = %e, "platform call failed")
            }
        }
        result
    }

    /// POST `body` to `path` on the first base that takes the connection,
    /// starting with the one that answered last; the body read up to
    /// [`MAX_BODY`]. A failure to connect moves on to the next base. A
    /// request whose connection closed before any answer came is sent once
    /// more (the next base first, else a new connection to the same one):
    /// the usual cause is a pooled connection whose server has gone (a
    /// gateway killed, a platform restarted) and the request never reached
    /// anyone. In case it did reach the platform, a throwaway `requestId`
    /// is renewed for the copy (see `body`) and a caller's own is kept: its
    /// 10054 then means done.
    ///
    /// `body(resend)` makes the body; `resend` is true for the copy after a
    /// dropped connection.
    async fn post(
        &self,
        path: &str,
        body: &(dyn Fn(bool) -> Vec<u8> + Sync),
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let bases = &self.inner.bases;
        let first = self.inner.sticky.load(Ordering::Relaxed) % bases.len();
        let fut = async {
            let mut last = None;
            let mut order: Vec<usize> = (0..bases.len())
                .map(|k| (first + k) % bases.len())
                .collect();
            let mut resent = false;
            let mut payload = body(false);
            let mut next = 0;
            while let Some(&i) = order.get(next) {
                next += 1;
                let url = format!("{}{}", bases[i], path);
                let sent = self
                    .inner
                    .http
                    .post(&url)
                    .header("content-type", "application/json; charset=utf-8")
                    .body(payload.clone())
                    .send()
                    .await;
                let resp = match sent {
                    Ok(r) => r,
                    Err(e) if e.is_connect() && bases.len() > 1 => {
                        tracing::warn!(base = %bases[i], error = %transport_error(&e), "cannot connect; trying the next address");
                        last = Some(transport_error(&e));
                        continue;
                    }
                    Err(e) if !resent && dropped_unanswered(&e) => {
                        resent = true;
                        payload = body(true);
                        tracing::warn!(base = %bases[i], error = %transport_error(&e), "the connection closed before an answer; sending once more");
                        if bases.len() == 1 {
                            order.push(i);
                        }
                        last = Some(transport_error(&e));
                        continue;
                    }
                    Err(e) => return Err(transport_error(&e)),
                };
                self.inner.sticky.store(i, Ordering::Relaxed);
                self.inner.warmth.answered();
                let status = resp.status();
                if status.is_redirection() {
                    let location = resp
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .map(redacted_location)
                        .unwrap_or_else(|| "(no Location)".into());
                    return Err(CallError::Redirect {
                        status: status.as_u16(),
                        location,
                    });
                }
                let bytes = read_capped(resp).await?;
                if !status.is_success() {
                    return Err(CallError::Http(status.as_u16()));
                }
                return Ok(bytes);
            }
            Err(last.unwrap_or_else(|| CallError::Unreachable("no address".into())))
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout(timeout.as_millis() as u64)),
        }
    }

    /// Forward a request a terminal sent (the gateway): `req` as the
    /// terminal sent it, its `requestId` unchanged (but for a query's copy
    /// after a dropped connection, see `post`), re-signed with this
    /// client's secret and current token. On 21003/21004 the token is
    /// refreshed (single flight, generation-guarded) and the request sent
    /// once more. Returns the platform's answer body unchanged, and its
    /// result code.
    pub async fn forward(
        &self,
        api_name: &str,
        path: &str,
        req: &Map<String, Value>,
        request_id: &str,
        urgency: Urgency,
    ) -> Result<(Vec<u8>, i64), CallError> {
        let timeout = self.timeout(urgency);
        let deadline = tokio::time::Instant::now() + timeout;
        let started = std::time::Instant::now();
        let mut token = self.valid_token(deadline, timeout).await?;
        self.before_call(urgency, deadline).await;
        let mut retried = false;
        let result: Result<(Vec<u8>, i64), CallError> = loop {
            // A copy sent after a dropped connection keeps the terminal's
            // requestId (a report's 10054 then means done), except for a
            // query: its answer may have been lost after the platform saw
            // the id, and a query done twice harms nothing.
            let body = self.envelope_map(req.clone(), request_id, &token.value);
            let renewed = std::sync::OnceLock::new();
            let copy = |resend: bool| {
                if resend && api::is_query(api_name) {
                    let _ = renewed.set(());
                    self.envelope_map(req.clone(), &new_request_id(), &token.value)
                } else {
                    body.clone()
                }
            };
            let mut bytes =
                as_urgency(urgency, self.post(path, &copy, left(deadline, timeout)?)).await?;
            if renewed.get().is_some() {
                // The terminal gets its own requestId back, as always.
                bytes = api::with_request_id(&bytes, request_id)?;
            }
            let code = api::result_code(&bytes)?;
            if matches!(code, 21003 | 21004) && !retried {
                retried = true;
                if token.expires_at > clock::now_unix() {
                    let st = &self.inner.stats;
                    st.revocations.fetch_add(1, Ordering::Relaxed);
                    st.last_revoked_at
                        .store(clock::now_unix(), Ordering::Relaxed);
                }
                token = self
                    .refresh(token.generation, deadline, timeout, Reason::Rejected(code))
                    .await?;
                continue;
            }
            break Ok((bytes, code));
        };
        let class = match &result {
            Ok((_, 0)) => "success",
            Ok((_, code)) => super::error::classify(*code).as_str(),
            Err(e) => e.class().as_str(),
        };
        crate::metrics::get().platform(api_name, class, started.elapsed().as_secs_f64());
        if matches!(result, Ok((_, 0))) {
            self.inner.rejected_streak.store(0, Ordering::Relaxed);
        }
        result
    }

    /// The signed JSON envelope for a request.
    fn envelope<A: Api>(&self, req: &A::Req, request_id: &str, token: &str) -> Vec<u8> {
        let req = match serde_json::to_value(req) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        self.envelope_map(req, request_id, token)
    }

    fn envelope_map(&self, req: Map<String, Value>, request_id: &str, token: &str) -> Vec<u8> {
        let s = &self.inner.settings;
        let mut common = Map::new();
        common.insert("appToken".into(), token.into());
        common.insert("requestId".into(), request_id.into());
        common.insert("hospitalId".into(), s.hospital_id.clone().into());
        common.insert("timestamp".into(), clock::now_unix().to_string().into());
        let signature = sign::sign(&common, Some(&req), s.secret.expose());
        common.insert("sign".into(), signature.into());
        let mut top = Map::new();
        top.insert("commonIn".into(), Value::Object(common));
        top.insert("req".into(), Value::Object(req));
        serde_json::to_vec(&Value::Object(top)).unwrap_or_default()
    }
}

/// A reqwest client for `settings`: proxy, extra CA, timeouts, the pool.
/// `idle`: how long an idle pooled connection is kept.
fn http_client(settings: &ClientSettings, idle: Duration) -> Result<reqwest::Client, BuildError> {
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("ehc-agent/", env!("CARGO_PKG_VERSION")))
        // Per-call timeouts are applied around each call; this bounds a
        // connect attempt so an unreachable platform fails fast.
        .connect_timeout(settings.scan_timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(idle)
        // Keepalive probes keep NAT and firewall state of an idle
        // connection without an HTTP request the platform would see.
        .tcp_keepalive(Duration::from_secs(15))
        // A connection opened on a scan's first byte is held for the scan,
        // not spent on a request of its own (see `preconnect`).
        .connector_layer(super::preconnect::Layer::new(settings.warm));
    match &settings.proxy {
        Some(p) => {
            let proxy =
                reqwest::Proxy::all(p).map_err(|e| BuildError::Proxy(p.clone(), e.to_string()))?;
            b = b.proxy(proxy);
        }
        // Only the configured proxy is used: a stray http_proxy in the
        // service environment must not reroute patients' data.
        None => b = b.no_proxy(),
    }
    if let Some(ca) = &settings.ca_file {
        let pem = std::fs::read(ca).map_err(|e| BuildError::Ca(ca.clone(), e.to_string()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| BuildError::Ca(ca.clone(), e.to_string()))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().map_err(|e| BuildError::Http(e.to_string()))
}

/// Read a body, refusing to buffer more than [`MAX_BODY`].
async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, CallError> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(ResponseError::TooLarge.into());
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(&e))? {
        if buf.len() + chunk.len() > MAX_BODY {
            return Err(ResponseError::TooLarge.into());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// A failed refresh, kept to answer the callers that waited for it.
#[derive(Debug, Clone)]
enum FailedRefresh {
    Platform(i64, String),
    Other(String),
}

impl FailedRefresh {
    fn of(e: &CallError) -> Self {
        match e {
            CallError::Platform { code, msg } => FailedRefresh::Platform(*code, msg.clone()),
            other => FailedRefresh::Other(other.to_string()),
        }
    }

    fn error(&self) -> CallError {
        match self {
            FailedRefresh::Platform(code, msg) => CallError::Platform {
                code: *code,
                msg: msg.clone(),
            },
            FailedRefresh::Other(m) => CallError::Unreachable(m.clone()),
        }
    }
}

/// How long a failed refresh answers for the callers that queued behind it.
const FAILURE_SHARED_FOR: Duration = Duration::from_secs(2);

/// What [`Client::lease_or_wait`] came to.
enum Lease {
    /// We refresh.
    Ours,
    /// Another holder refreshed: its token.
    Theirs(Token),
    /// The store cannot be reached: refresh on our own.
    Unavailable,
    /// Another holder has been refreshing for too long: give up this time.
    Waited,
}

/// Longest wait between refreshes after repeated rejections.
const MAX_REFRESH_BACKOFF_S: i64 = 300;

/// What is left of `deadline`, or the timeout error when nothing is.
fn left(deadline: tokio::time::Instant, timeout: Duration) -> Result<Duration, CallError> {
    let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
    if rest.is_zero() {
        Err(CallError::Timeout(timeout.as_millis() as u64))
    } else {
        Ok(rest)
    }
}

/// A redirect target for a log line: scheme, host and port only (a query
/// could carry anything).
fn redacted_location(loc: &str) -> String {
    match reqwest::Url::parse(loc) {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or("?"),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "a relative address".into(),
    }
}

/// Run `f` as a scan's when `urgency` says so: a connection it has to open
/// is counted as a cold scan's ([`super::preconnect::for_scan`]).
async fn as_urgency<F: std::future::Future>(urgency: Urgency, f: F) -> F::Output {
    match urgency {
        Urgency::Scan => super::preconnect::for_scan(f).await,
        Urgency::Upload => f.await,
    }
}

/// True when `e` says the connection closed (or was reset) after the
/// request was written and before any answer: no status line came, so the
/// server gave no answer to act on.
fn dropped_unanswered(e: &reqwest::Error) -> bool {
    if e.is_connect() || e.is_timeout() || e.status().is_some() {
        return false;
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return true;
            }
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return true;
            }
        }
        src = s.source();
    }
    false
}

/// reqwest's top-level message ("error sending request") hides the cause;
/// the operator needs the chain ("connection refused").
fn transport_error(e: &reqwest::Error) -> CallError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    CallError::Unreachable(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: with a token that kept being revoked, the agent refreshed
    /// every 2 s and burnt the daily getAppToken budget.
    #[test]
    fn rejected_refreshes_back_off_exponentially() {
        let c = Client::new(ClientSettings {
            base_url: "http://127.0.0.1:9".into(),
            fallback_urls: Vec::new(),
            app_id: "a".into(),
            hospital_id: "h".into(),
            secret: Secret::new("s"),
            scan_timeout: Duration::from_secs(1),
            upload_timeout: Duration::from_secs(1),
            proxy: None,
            ca_file: None,
            warm: Duration::from_secs(25),
            keep_warm: Duration::ZERO,
            preconnect: true,
            state_path: None,
            shared: None,
        })
        .unwrap();
        let waits: Vec<i64> = (0..12)
            .map(|n| {
                c.inner.rejected_streak.store(n, Ordering::Relaxed);
                c.rejected_refresh_wait()
            })
            .collect();
        assert_eq!(&waits[..5], &[2, 4, 8, 16, 32]);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), MAX_REFRESH_BACKOFF_S);
    }

    #[test]
    fn request_ids() {
        let a = new_request_id();
        assert!(is_request_id(&a), "{a}");
        assert_ne!(a, new_request_id());
        assert!(!is_request_id("db4d975748a84309977ea25224c0f5cf"));
        assert!(!is_request_id("DB4D"));
    }

    #[test]
    fn classes_of_transport_errors() {
        assert_eq!(CallError::Http(502).class(), Class::Retry);
        assert_eq!(CallError::Http(404).class(), Class::Configuration);
        assert_eq!(CallError::Timeout(3000).class(), Class::Retry);
        assert!(CallError::Timeout(1).is_unavailable());
        let p = CallError::Platform {
            code: -1,
            msg: String::new(),
        };
        assert_eq!(p.class(), Class::Retry);
        assert!(!p.is_unavailable());
        assert_eq!(
            CallError::Platform {
                code: 21006,
                msg: String::new()
            }
            .class(),
            Class::Configuration
        );
    }
}
