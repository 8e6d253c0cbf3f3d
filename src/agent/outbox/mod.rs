//! The outbox: every use of a card, kept until the platform has it.
//!
//! [`store`] is the SQLite file and its invariants; [`uploader`] drains it to
//! the platform. This module is the handle both share with the pipeline:
//!
//! * [`Outbox::record`] commits rows before the pipeline delivers a card. If
//!   the commit fails (disk full, read-only state directory, I/O error), the
//!   rows go to a bounded memory **spill**, the call reports
//!   `recorded: false`, the fault is logged at ERROR and shown in status, and
//!   the spill is written as soon as the disk allows (the uploader retries it
//!   on its timer). A crash while uses sit in the spill loses them: that is
//!   the price of serving the patient when the disk cannot take a write, and
//!   the reason it is loud.
//! * A state directory that cannot be written when the agent starts
//!   (read-only mount, wrong owner) does not stop the agent either: it starts
//!   *degraded*, every use goes to the spill, and the outbox is opened as
//!   soon as the directory takes writes (each commit and each uploader pass
//!   tries). A file that opens but refuses WAL or `synchronous=FULL`, or has
//!   a newer schema, still refuses the start: that is not a passing fault.
//! * SQLite calls run on the blocking pool: an fsync must not stall the
//!   async workers that serve HIS clients.

pub mod report;
pub mod store;
pub mod uploader;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::Notify;

pub use store::{Counts, Kind, NewRow, Row, State, Store, StoreError};

/// Most uses kept in memory while the disk refuses writes.
pub const SPILL_CAP: usize = 10_000;

/// What the uploader and the spill report for `status`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UploadStatus {
    /// Uploads stopped by a configuration error (20000, 21001, 21002, 21005,
    /// 21006 or a wrong address): the cause, until fixed and resumed.
    pub stopped: Option<String>,
    /// Rate limited (10034/21007) until this Unix time (next Beijing day).
    pub rate_limited_until: Option<i64>,
    pub last_success_at: Option<i64>,
    pub last_error: Option<String>,
    /// Uses waiting in memory because the disk refused them.
    pub spilled: usize,
    /// Why the disk refused, while it does.
    pub disk_fault: Option<String>,
    pub uploaded: u64,
    pub failed_attempts: u64,
    /// Failed attempts since the last success.
    pub consecutive_failures: u64,
}

#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    path: std::path::PathBuf,
    /// `None` while the file cannot be opened (degraded start).
    store: Mutex<Option<Store>>,
    spill: Mutex<VecDeque<SpillItem>>,
    status: Mutex<UploadStatus>,
    wake: Notify,
    /// Bumped after each full pass of the uploader's loop.
    passes: tokio::sync::watch::Sender<u64>,
}

/// Rows that could not be committed, with what to do with them once they can.
enum SpillItem {
    Insert(Vec<NewRow>),
    Replace(String, Vec<NewRow>),
}

impl SpillItem {
    fn len(&self) -> usize {
        match self {
            SpillItem::Insert(r) | SpillItem::Replace(_, r) => r.len(),
        }
    }
}

/// What became of HIS's `use` ([`Outbox::record_replacing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaced {
    /// On disk; this many waiting default uses were replaced (0 or 1).
    Committed(usize),
    /// The disk refused: kept in memory, applied when it can be.
    Spilled,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a failure to open the outbox is the disk's passing trouble
/// (start degraded) rather than a file that cannot give the guarantees.
fn can_start_degraded(e: &StoreError) -> bool {
    match e {
        StoreError::Dir { .. } => true,
        StoreError::Sqlite { .. } => {
            e.is_disk_trouble()
                || matches!(e, StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(f, _), .. } if f.code == rusqlite::ErrorCode::PermissionDenied)
        }
        StoreError::Durability { .. } | StoreError::TooNew { .. } => false,
    }
}

impl Outbox {
    /// Open the outbox; refuse if it cannot be opened.
    pub fn open(path: &Path) -> Result<Outbox, StoreError> {
        let store = Store::open(path)?;
        Ok(Self::with(path, Some(store)))
    }

    /// Open the outbox, or start degraded when the disk refuses for now
    /// (the error is returned to be reported).
    pub fn open_or_degraded(path: &Path) -> Result<(Outbox, Option<StoreError>), StoreError> {
        match Store::open(path) {
            Ok(store) => Ok((Self::with(path, Some(store)), None)),
            Err(e) if can_start_degraded(&e) => {
                let o = Self::with(path, None);
                o.update_status(|s| s.disk_fault = Some(e.to_string()));
                Ok((o, Some(e)))
            }
            Err(e) => Err(e),
        }
    }

    fn with(path: &Path, store: Option<Store>) -> Outbox {
        let now = crate::clock::now_unix();
        let status = UploadStatus {
            rate_limited_until: store
                .as_ref()
                .and_then(|s| s.meta_get(uploader::META_RATE_LIMIT).ok().flatten())
                .and_then(|v| v.parse().ok())
                .filter(|t| *t > now),
            ..UploadStatus::default()
        };
        Outbox {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                store: Mutex::new(store),
                spill: Mutex::new(VecDeque::new()),
                status: Mutex::new(status),
                wake: Notify::new(),
                passes: tokio::sync::watch::channel(0).0,
            }),
        }
    }

    /// Run `f` on the store on the blocking pool (opening it first if the
    /// agent started degraded).
    pub async fn with_store<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || {
            let mut guard = lock(&inner.store);
            let store = ensure_open(&inner, &mut guard)?;
            f(store)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Commit new rows (fsynced) and wake the uploader. `false`: the disk
    /// refused and the rows are in the memory spill.
    pub async fn record(&self, rows: Vec<NewRow>) -> bool {
        self.commit(SpillItem::Insert(rows)).await
    }

    /// HIS's own `use` for a scan: replaces the scan's waiting default use.
    pub async fn record_replacing(&self, scan_id: String, rows: Vec<NewRow>) -> Replaced {
        match self.commit_counted(SpillItem::Replace(scan_id, rows)).await {
            Some(n) => Replaced::Committed(n),
            None => Replaced::Spilled,
        }
    }

    async fn commit(&self, item: SpillItem) -> bool {
        self.commit_counted(item).await.is_some()
    }

    /// Commit `item`: `Some(waiting rows replaced)` once it is on disk,
    /// `None` when it went to the spill.
    async fn commit_counted(&self, item: SpillItem) -> Option<usize> {
        let inner = self.inner.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let mut guard = lock(&inner.store);
            let store = match ensure_open(&inner, &mut guard) {
                Ok(s) => s,
                Err(e) => {
                    spill(&inner, item, &e);
                    return None;
                }
            };
            // Older spilled uses first, to keep their order.
            flush_spill(&inner, store);
            let result = match &item {
                SpillItem::Insert(rows) => store.insert(rows).map(|_| 0),
                SpillItem::Replace(scan, rows) => store.replace_waiting(scan, rows),
            };
            match result {
                Ok(n) => {
                    if lock(&inner.spill).is_empty() {
                        lock(&inner.status).disk_fault = None;
                    }
                    Some(n)
                }
                Err(e) => {
                    spill(&inner, item, &e);
                    None
                }
            }
        })
        .await
        .unwrap_or(None);
        self.inner.wake.notify_one();
        ok
    }

    /// Try to write spilled rows now. Returns how many remain.
    pub async fn flush_spill(&self) -> usize {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&inner.store);
            match ensure_open(&inner, &mut guard) {
                Ok(store) => flush_spill(&inner, store),
                Err(_) => lock(&inner.spill).iter().map(SpillItem::len).sum(),
            }
        })
        .await
        .unwrap_or(0)
    }

    pub fn spilled(&self) -> usize {
        lock(&self.inner.spill).iter().map(SpillItem::len).sum()
    }

    pub fn status(&self) -> UploadStatus {
        let mut s = lock(&self.inner.status).clone();
        s.spilled = self.spilled();
        s
    }

    pub(crate) fn update_status(&self, f: impl FnOnce(&mut UploadStatus)) {
        f(&mut lock(&self.inner.status));
    }

    pub async fn counts(&self) -> Result<Counts, StoreError> {
        self.with_store(|s| s.counts()).await
    }

    /// Wake the uploader (new rows, a retry, a flush, a resume).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    pub(crate) fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.wake.notified()
    }

    pub(crate) fn pass_done(&self) {
        self.inner.passes.send_modify(|n| *n += 1);
    }

    /// Wake the uploader and wait until it has made a full pass that began
    /// after this call: whatever was changed before is then acted on (calls
    /// dispatched, holds respected). For tests and `outbox flush`.
    pub async fn settle(&self) {
        let mut rx = self.inner.passes.subscribe();
        // Two passes: the first may have begun before the change.
        for _ in 0..2 {
            rx.borrow_and_update();
            self.wake();
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Wait for the uploader's next pass, at most `limit`.
    pub async fn next_pass(&self, limit: std::time::Duration) {
        let mut rx = self.inner.passes.subscribe();
        let _ = tokio::time::timeout(limit, rx.changed()).await;
    }

    /// Wait (up to `limit`) until `cond` holds on the upload status, checking
    /// after each pass of the uploader. `false` if it never did.
    pub async fn wait_status(
        &self,
        limit: std::time::Duration,
        cond: impl Fn(&UploadStatus) -> bool,
    ) -> bool {
        let mut rx = self.inner.passes.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if cond(&self.status()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return cond(&self.status());
            }
        }
    }

    /// Clear a configuration stop and a rate-limit hold, and wake the
    /// uploader: the operator says the cause is fixed.
    pub async fn resume(&self) {
        self.update_status(|s| {
            s.stopped = None;
            s.rate_limited_until = None;
        });
        let _ = self
            .with_store(|s| s.meta_set(uploader::META_RATE_LIMIT, None))
            .await;
        self.wake();
    }
}

/// The open store, opening it now if the agent started degraded.
fn ensure_open<'a>(
    inner: &Inner,
    slot: &'a mut Option<Store>,
) -> Result<&'a mut Store, StoreError> {
    if slot.is_none() {
        let store = Store::open(&inner.path)?;
        tracing::warn!(path = %inner.path.display(), "outbox opened: the state directory takes writes again");
        *slot = Some(store);
    }
    Ok(slot.as_mut().expect("just opened"))
}

fn spill(inner: &Inner, item: SpillItem, e: &StoreError) {
    let mut sp = lock(&inner.spill);
    let held: usize = sp.iter().map(SpillItem::len).sum();
    let n = item.len();
    if held + n > SPILL_CAP {
        tracing::error!(error = %e, lost = n, spilled = held, "outbox cannot be written and the memory spill is full: these uses are LOST");
    } else {
        sp.push_back(item);
        tracing::error!(error = %e, spilled = held + n, "outbox cannot be written: uses kept in memory until the disk allows (a crash now loses them)");
    }
    drop(sp);
    lock(&inner.status).disk_fault = Some(e.to_string());
}

fn flush_spill(inner: &Inner, store: &mut Store) -> usize {
    let mut sp = lock(&inner.spill);
    while let Some(item) = sp.front() {
        let r = match item {
            SpillItem::Insert(rows) => store.insert(rows).map(|_| ()),
            SpillItem::Replace(scan, rows) => store.replace_waiting(scan, rows).map(|_| ()),
        };
        match r {
            Ok(()) => {
                let n = item.len();
                sp.pop_front();
                tracing::warn!(
                    written = n,
                    remaining = sp.len(),
                    "spilled uses written to the outbox"
                );
            }
            Err(_) => break,
        }
    }
    let left = sp.iter().map(SpillItem::len).sum();
    drop(sp);
    if left == 0 {
        lock(&inner.status).disk_fault = None;
    }
    left
}
