//! The outbox's SQLite file: every use of a card (and every bind) until the
//! platform has confirmed it.
//!
//! Invariants (after Postfix's queue and Vector's disk buffer):
//!
//! 1. A row is committed with `synchronous=FULL` in WAL mode before the
//!    pipeline delivers the card to HIS, so a crash or power cut after HIS
//!    saw a card cannot lose its use. Both pragmas are read back at open; a
//!    file system that refuses them refuses the agent.
//! 2. A row holds only what its API call needs (the request body, which for a
//!    health card carries the QR text, never a name or ID number) and its own
//!    `requestId`, used for every retry: the platform de-duplicates on it.
//! 3. No row is deleted because a call failed. Rows leave only as `sent`
//!    rows older than the retention (purge), held rows on an explicit
//!    operator purge, or a `waiting` default use replaced by HIS's own `use`
//!    (it was never uploaded).
//! 4. Rows in flight are not marked in the file: a crash leaves them
//!    `pending`, and they are retried with the same requestId.
//!
//! 5. A `waiting` row (a default use waiting `use_wait_s` for HIS's `use`)
//!    becomes `pending` only through its deadline, and only in the same
//!    transaction that claims it for upload ([`Store::due`]). So a waiting
//!    row is never in flight, [`Store::replace_waiting`] (which deletes only
//!    waiting rows) can never delete a row the uploader is sending, and
//!    [`Store::make_all_due`] (recovery, `outbox flush`) never cuts a wait
//!    short. Either HIS's `use` replaces the default or the default is
//!    reported: never both.
//!
//! States: `waiting`, `pending`, `sent`, `held` (parked after a permanent
//! error, with its code; `outbox retry` re-queues).

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

/// Schema migrations; index + 1 is the `user_version` they lead to. Append
/// only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE rows (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        request_id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL CHECK (kind IN ('report', 'bind')),
        state TEXT NOT NULL CHECK (state IN ('waiting', 'pending', 'sent', 'held')),
        scan_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        next_attempt_at INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_code INTEGER,
        last_error TEXT,
        sent_at INTEGER
    );
    CREATE INDEX rows_due ON rows (state, next_attempt_at);
    CREATE INDEX rows_scan ON rows (scan_id);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Report,
    Bind,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Report => "report",
            Kind::Bind => "bind",
        }
    }
    fn parse(s: &str) -> Kind {
        if s == "bind" {
            Kind::Bind
        } else {
            Kind::Report
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Waiting,
    Pending,
    Sent,
    Held,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Pending => "pending",
            State::Sent => "sent",
            State::Held => "held",
        }
    }
    fn parse(s: &str) -> State {
        match s {
            "waiting" => State::Waiting,
            "sent" => State::Sent,
            "held" => State::Held,
            _ => State::Pending,
        }
    }
}

/// A row to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRow {
    pub request_id: String,
    pub kind: Kind,
    pub scan_id: String,
    /// The API's `req` as JSON.
    pub payload: String,
    pub created_at: i64,
    /// `Some(deadline)`: a waiting default use, due at the deadline.
    pub wait_until: Option<i64>,
}

/// A stored row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub id: i64,
    pub request_id: String,
    pub kind: Kind,
    pub state: State,
    pub scan_id: String,
    pub payload: String,
    pub created_at: i64,
    pub next_attempt_at: i64,
    pub attempts: i64,
    pub last_code: Option<i64>,
    pub last_error: Option<String>,
    pub sent_at: Option<i64>,
}

/// Counts for `status` and `outbox list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub waiting: i64,
    pub pending: i64,
    pub sent: i64,
    pub held: i64,
    /// `created_at` of the oldest waiting or pending row.
    pub oldest_unsent: Option<i64>,
    /// Earliest `next_attempt_at` of a waiting or pending row.
    pub next_due: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("outbox {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("outbox {path}: cannot create its directory: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox {path}: {what} is {got}, not {want}; the file system does not give the durability the outbox needs")]
    Durability {
        path: PathBuf,
        what: &'static str,
        got: String,
        want: &'static str,
    },
    #[error("outbox {path}: schema version {found} is newer than this agent's {SCHEMA_VERSION}; upgrade the agent")]
    TooNew { path: PathBuf, found: i64 },
}

impl StoreError {
    /// True for a disk that is full or read-only: the pipeline then spills
    /// to memory instead of failing the scan.
    pub fn is_disk_trouble(&self) -> bool {
        use rusqlite::ErrorCode::*;
        match self {
            StoreError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => matches!(
                e.code,
                DiskFull | ReadOnly | CannotOpen | SystemIoFailure | DatabaseBusy | DatabaseLocked
            ),
            _ => false,
        }
    }
}

pub struct Store {
    path: PathBuf,
    conn: Connection,
}

impl Store {
    /// Open (creating) the outbox, migrate it, and check durability.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: path.to_owned(),
                source,
            })?;
        }
        make_private(path).map_err(|source| StoreError::Dir {
            path: path.to_owned(),
            source,
        })?;
        let conn = Connection::open(path).map_err(|source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
        let mut store = Store {
            path: path.to_owned(),
            conn,
        };
        store.init()?;
        Ok(store)
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn init(&mut self) -> Result<(), StoreError> {
        self.conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| self.err(e))?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Durability {
                path: self.path.clone(),
                what: "journal_mode",
                got: mode,
                want: "wal",
            });
        }
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| self.err(e))?;
        // Read back: FULL is 2.
        let sync: i64 = self
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if sync != 2 {
            return Err(StoreError::Durability {
                path: self.path.clone(),
                what: "synchronous",
                got: sync.to_string(),
                want: "2 (FULL)",
            });
        }
        self.migrate()
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: self.path.clone(),
                found: version,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let path = self.path.clone();
            let tx = self
                .conn
                .transaction()
                .map_err(|source| StoreError::Sqlite {
                    path: path.clone(),
                    source,
                })?;
            tx.execute_batch(sql)
                .and_then(|_| tx.pragma_update(None, "user_version", (i + 1) as i64))
                .and_then(|_| tx.commit())
                .map_err(|source| StoreError::Sqlite { path, source })?;
            tracing::info!(version = i + 1, "outbox schema migrated");
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Insert rows in one transaction, committed (fsynced) on return.
    pub fn insert(&mut self, rows: &[NewRow]) -> Result<Vec<i64>, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(wrap)?;
        let ids = insert_rows(&tx, rows).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        Ok(ids)
    }

    /// HIS sent its first `use` for a scan: drop that scan's *waiting*
    /// default use (never claimed, never uploaded: invariant 5) and insert
    /// `rows` in its place, in one transaction. If no default is waiting any
    /// more (its deadline came and it was claimed), nothing is inserted: the
    /// default already stands for this use. Returns how many waiting rows
    /// were replaced.
    pub fn replace_waiting(&mut self, scan_id: &str, rows: &[NewRow]) -> Result<usize, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(wrap)?;
        let n = tx
            .execute(
                "DELETE FROM rows WHERE scan_id = ?1 AND state = 'waiting'",
                params![scan_id],
            )
            .map_err(wrap)?;
        if n > 0 {
            insert_rows(&tx, rows).map_err(wrap)?;
        }
        tx.commit().map_err(wrap)?;
        Ok(n)
    }

    /// Rows due at `now`, at most `limit`: half the places for the newest
    /// rows, the rest for the longest-waiting, so a long backlog never
    /// starves today's uses and today's uses never starve the backlog.
    ///
    /// Waiting rows whose deadline has come become pending here, in the
    /// same transaction as the read that claims them (invariant 5).
    pub fn due(
        &mut self,
        now: i64,
        limit: usize,
        exclude: &std::collections::HashSet<i64>,
    ) -> Result<Vec<Row>, StoreError> {
        let path = self.path.clone();
        let wrap = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let lim = (limit + exclude.len()) as i64;
        let tx = self.conn.transaction().map_err(wrap)?;
        tx.execute(
            "UPDATE rows SET state = 'pending' WHERE state = 'waiting' AND next_attempt_at <= ?1",
            params![now],
        )
        .map_err(wrap)?;
        let q = |order: &str, n: i64| -> Result<Vec<Row>, rusqlite::Error> {
            let sql = format!(
                "SELECT {COLS} FROM rows WHERE state = 'pending' AND next_attempt_at <= ?1 ORDER BY {order} LIMIT ?2"
            );
            let mut st = tx.prepare_cached(&sql)?;
            let rows = st.query_map(params![now, n], row_from)?;
            rows.collect()
        };
        let newest = q(
            "created_at DESC, id DESC",
            (limit as i64 + 1) / 2 + exclude.len() as i64,
        )
        .map_err(wrap)?;
        let oldest = q("next_attempt_at ASC, id ASC", lim).map_err(wrap)?;
        tx.commit().map_err(wrap)?;
        let mut out: Vec<Row> = Vec::with_capacity(limit);
        let mut seen = std::collections::HashSet::new();
        for r in newest.into_iter().chain(oldest) {
            if out.len() >= limit {
                break;
            }
            if !exclude.contains(&r.id) && seen.insert(r.id) {
                out.push(r);
            }
        }
        Ok(out)
    }

    pub fn mark_sent(&mut self, id: i64, now: i64, code: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE rows SET state = 'sent', sent_at = ?2, attempts = attempts + 1, last_code = ?3, last_error = NULL WHERE id = ?1",
                params![id, now, code],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// A failed attempt: stays pending, next try at `next`.
    pub fn mark_retry(
        &mut self,
        id: i64,
        next: i64,
        code: Option<i64>,
        error: &str,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE rows SET state = 'pending', attempts = attempts + 1, next_attempt_at = ?2, last_code = ?3, last_error = ?4 WHERE id = ?1",
                params![id, next, code, error],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// A permanent error: parked with its code.
    pub fn mark_held(&mut self, id: i64, code: Option<i64>, error: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE rows SET state = 'held', attempts = attempts + 1, last_code = ?2, last_error = ?3 WHERE id = ?1",
                params![id, code, error],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Re-queue held rows (all, or one by id). Returns how many.
    pub fn retry_held(&mut self, id: Option<i64>, now: i64) -> Result<usize, StoreError> {
        let n = match id {
            Some(id) => self.conn.execute(
                "UPDATE rows SET state = 'pending', next_attempt_at = ?2 WHERE id = ?1 AND state = 'held'",
                params![id, now],
            ),
            None => self
                .conn
                .execute("UPDATE rows SET state = 'pending', next_attempt_at = ?1 WHERE state = 'held'", params![now]),
        };
        n.map_err(|e| self.err(e))
    }

    /// Make every pending row due now (`outbox flush`, recovery). Waiting
    /// rows keep their deadline: HIS may still send its `use`.
    pub fn make_all_due(&mut self, now: i64) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "UPDATE rows SET next_attempt_at = ?1 WHERE state = 'pending' AND next_attempt_at > ?1",
                params![now],
            )
            .map_err(|e| self.err(e))
    }

    /// Delete sent rows sent before `before`. Held rows only if `held`.
    pub fn purge(&mut self, before: i64, held: bool) -> Result<usize, StoreError> {
        let mut n = self
            .conn
            .execute(
                "DELETE FROM rows WHERE state = 'sent' AND sent_at < ?1",
                params![before],
            )
            .map_err(|e| self.err(e))?;
        if held {
            n += self
                .conn
                .execute("DELETE FROM rows WHERE state = 'held'", [])
                .map_err(|e| self.err(e))?;
        }
        Ok(n)
    }

    pub fn counts(&self) -> Result<Counts, StoreError> {
        let mut c = Counts::default();
        let mut st = self
            .conn
            .prepare_cached("SELECT state, COUNT(*) FROM rows GROUP BY state")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| self.err(e))?;
        for r in rows {
            let (s, n) = r.map_err(|e| self.err(e))?;
            match State::parse(&s) {
                State::Waiting => c.waiting = n,
                State::Pending => c.pending = n,
                State::Sent => c.sent = n,
                State::Held => c.held = n,
            }
        }
        let (oldest, due): (Option<i64>, Option<i64>) = self
            .conn
            .query_row(
                "SELECT MIN(created_at), MIN(next_attempt_at) FROM rows WHERE state IN ('pending', 'waiting')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        c.oldest_unsent = oldest;
        c.next_due = due;
        Ok(c)
    }

    /// Rows in a state, oldest first, at most `limit`.
    pub fn list(&self, state: State, limit: usize) -> Result<Vec<Row>, StoreError> {
        let sql = format!("SELECT {COLS} FROM rows WHERE state = ?1 ORDER BY id LIMIT ?2");
        let mut st = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![state.as_str(), limit as i64], row_from)
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn get(&self, id: i64) -> Result<Option<Row>, StoreError> {
        let sql = format!("SELECT {COLS} FROM rows WHERE id = ?1");
        self.conn
            .query_row(&sql, params![id], row_from)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Small persistent settings (the rate-limit hold, why uploads stopped).
    pub fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn meta_set(&mut self, key: &str, value: Option<&str>) -> Result<(), StoreError> {
        let r = match value {
            Some(v) => self.conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                params![key, v],
            ),
            None => self.conn.execute("DELETE FROM meta WHERE key = ?1", params![key]),
        };
        r.map(|_| ()).map_err(|e| self.err(e))
    }

    /// Limit the file's size in pages (tests simulate a full disk with it).
    pub fn set_max_pages(&self, pages: i64) -> Result<i64, StoreError> {
        self.conn
            .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))
    }
}

const COLS: &str = "id, request_id, kind, state, scan_id, payload, created_at, next_attempt_at, attempts, last_code, last_error, sent_at";

/// An SQLite database's file and its `-wal` and `-shm` companions.
pub fn sqlite_files(path: &Path) -> [PathBuf; 3] {
    ["", "-wal", "-shm"].map(|suffix| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    })
}

/// Create an SQLite file (and tighten its `-wal` and `-shm` companions)
/// with mode 0600, whatever the umask: the outbox holds QR texts and the
/// state file the live appToken, which no other local account may read.
/// SQLite gives the `-wal` and `-shm` files it creates later the main
/// file's mode, so creating that one right is what matters.
pub fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for p in sqlite_files(path) {
        if let Ok(m) = std::fs::metadata(&p) {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 && m.is_file() {
                tracing::warn!(path = %p.display(), mode = format!("{mode:o}"), "state file was readable by other accounts: now 0600");
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o700))?;
            }
        }
    }
    Ok(())
}

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        id: r.get(0)?,
        request_id: r.get(1)?,
        kind: Kind::parse(&r.get::<_, String>(2)?),
        state: State::parse(&r.get::<_, String>(3)?),
        scan_id: r.get(4)?,
        payload: r.get(5)?,
        created_at: r.get(6)?,
        next_attempt_at: r.get(7)?,
        attempts: r.get(8)?,
        last_code: r.get(9)?,
        last_error: r.get(10)?,
        sent_at: r.get(11)?,
    })
}

fn insert_rows(tx: &Transaction<'_>, rows: &[NewRow]) -> rusqlite::Result<Vec<i64>> {
    let mut st = tx.prepare_cached(
        "INSERT INTO rows (request_id, kind, state, scan_id, payload, created_at, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut ids = Vec::with_capacity(rows.len());
    for r in rows {
        let (state, due) = match r.wait_until {
            Some(d) => (State::Waiting, d),
            None => (State::Pending, r.created_at),
        };
        st.execute(params![
            r.request_id,
            r.kind.as_str(),
            state.as_str(),
            r.scan_id,
            r.payload,
            r.created_at,
            due
        ])?;
        ids.push(tx.last_insert_rowid());
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn row(rid: &str, scan: &str, at: i64) -> NewRow {
        NewRow {
            request_id: rid.into(),
            kind: Kind::Report,
            scan_id: scan.into(),
            payload: "{}".into(),
            created_at: at,
            wait_until: None,
        }
    }

    /// Regression: outside the unit (umask 022) the outbox and its WAL were
    /// created 0644 and `nobody` read QR texts from them.
    #[test]
    fn files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.sqlite");
        // An older file left world-readable is tightened too.
        let old = d.path().join("old.sqlite");
        std::fs::write(&old, b"").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        for path in [&p, &old] {
            let mut s = Store::open(path).unwrap();
            s.insert(&[row(&format!("R{}", path.display()), "S", 1)])
                .unwrap();
            for suffix in ["", "-wal", "-shm"] {
                let f = format!("{}{suffix}", path.display());
                if let Ok(m) = std::fs::metadata(&f) {
                    assert_eq!(
                        m.permissions().mode() & 0o077,
                        0,
                        "{f} is {:o}",
                        m.permissions().mode()
                    );
                }
            }
        }
    }

    #[test]
    fn opens_durable_and_versioned() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("o.sqlite");
        let s = Store::open(&p).unwrap();
        let v: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let sync: i64 = s
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
        drop(s);
        // A newer schema is refused rather than misread.
        let c = Connection::open(&p).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(c);
        assert!(matches!(Store::open(&p), Err(StoreError::TooNew { .. })));
    }

    /// Every older version (here: an empty file, version 0, and a v1 file
    /// with rows) migrates to the current one with its rows intact.
    #[test]
    fn migrates_from_every_older_version() {
        for from in 0..SCHEMA_VERSION {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("o.sqlite");
            let c = Connection::open(&p).unwrap();
            for (i, sql) in MIGRATIONS.iter().enumerate().take(from as usize) {
                c.execute_batch(sql).unwrap();
                c.pragma_update(None, "user_version", (i + 1) as i64)
                    .unwrap();
            }
            if from >= 1 {
                c.execute(
                    "INSERT INTO rows (request_id, kind, state, scan_id, payload, created_at, next_attempt_at) VALUES ('R', 'report', 'pending', 'S', '{}', 1, 1)",
                    [],
                )
                .unwrap();
            }
            drop(c);
            let s = Store::open(&p).unwrap();
            let v: i64 = s
                .conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, SCHEMA_VERSION, "from {from}");
            assert_eq!(s.counts().unwrap().pending, i64::from(from >= 1));
        }
    }

    #[test]
    fn states_and_due_mix_new_and_old() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("o.sqlite")).unwrap();
        let ids = s
            .insert(
                &(0..10)
                    .map(|i| row(&format!("R{i}"), "S", i))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let none = Default::default();
        let due = s.due(100, 4, &none).unwrap();
        let got: Vec<_> = due.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(got, ["R9", "R8", "R0", "R1"], "two newest, two oldest");
        s.mark_sent(ids[9], 100, 0).unwrap();
        s.mark_retry(ids[8], 500, Some(-1), "x").unwrap();
        s.mark_held(ids[7], Some(10042), "bad").unwrap();
        let c = s.counts().unwrap();
        assert_eq!(
            (c.pending, c.sent, c.held, c.oldest_unsent),
            (8, 1, 1, Some(0))
        );
        assert!(s
            .due(100, 100, &none)
            .unwrap()
            .iter()
            .all(|r| r.id != ids[8]));
        assert_eq!(s.retry_held(None, 100).unwrap(), 1);
        assert_eq!(s.purge(101, false).unwrap(), 1);
        assert_eq!(s.counts().unwrap().sent, 0);
    }

    #[test]
    fn waiting_rows_are_replaced_by_his_use() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("o.sqlite")).unwrap();
        let waiting = |rid: &str, scan: &str, until: i64| NewRow {
            wait_until: Some(until),
            ..row(rid, scan, 10)
        };
        s.insert(&[waiting("W", "S1", 40)]).unwrap();
        let none = Default::default();
        assert!(s.due(39, 10, &none).unwrap().is_empty());
        // Before its deadline HIS's use replaces the default use.
        assert_eq!(s.replace_waiting("S1", &[row("U1", "S1", 20)]).unwrap(), 1);
        assert_eq!(s.replace_waiting("S1", &[row("U2", "S1", 21)]).unwrap(), 0);
        let c = s.counts().unwrap();
        assert_eq!(
            (c.waiting, c.pending),
            (0, 1),
            "nothing waits: U2 adds nothing"
        );
    }

    /// Regression (reported twice): a waiting row claimed for upload at its
    /// deadline was then deleted by HIS's late `use`, so `mark_sent` updated
    /// nothing and HIS's row was sent too.
    #[test]
    fn a_claimed_waiting_row_is_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("o.sqlite")).unwrap();
        s.insert(&[NewRow {
            wait_until: Some(40),
            ..row("W", "S1", 10)
        }])
        .unwrap();
        let none = Default::default();
        let claimed = s.due(40, 10, &none).unwrap();
        assert_eq!(claimed.len(), 1, "due at its deadline");
        assert_eq!(claimed[0].state, State::Pending, "claimed rows are pending");
        assert_eq!(s.replace_waiting("S1", &[row("U", "S1", 41)]).unwrap(), 0);
        assert!(s.get(claimed[0].id).unwrap().is_some(), "still in the file");
        s.mark_sent(claimed[0].id, 41, 0).unwrap();
        let c = s.counts().unwrap();
        assert_eq!((c.sent, c.pending), (1, 0), "reported once: {c:?}");
    }

    /// Regression (8 of 11 cards reported twice): recovery and `outbox
    /// flush` made waiting rows due before HIS's `use` could replace them.
    #[test]
    fn make_all_due_leaves_waiting_rows_waiting() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("o.sqlite")).unwrap();
        s.insert(&[NewRow {
            wait_until: Some(100),
            ..row("W", "S1", 10)
        }])
        .unwrap();
        let r = s.insert(&[row("P", "S2", 10)]).unwrap()[0];
        s.mark_retry(r, 5000, Some(-1), "x").unwrap();
        assert_eq!(s.make_all_due(50).unwrap(), 1, "only the pending row");
        let none = Default::default();
        let due: Vec<_> = s
            .due(50, 10, &none)
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(due, ["P"]);
        assert_eq!(s.replace_waiting("S1", &[row("U", "S1", 60)]).unwrap(), 1);
    }

    #[test]
    fn full_disk_is_disk_trouble() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(&d.path().join("o.sqlite")).unwrap();
        let pages: i64 = s
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        s.set_max_pages(pages).unwrap();
        let big = NewRow {
            payload: "x".repeat(100_000),
            ..row("R", "S", 1)
        };
        let e = s.insert(&[big]).unwrap_err();
        assert!(e.is_disk_trouble(), "{e:?}");
    }
}

/// The outbox against an in-memory model, under random sequences of
/// operations including crashes (the connection leaked, never closed, as a
/// killed process leaves it) and restarts.
#[cfg(test)]
mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashSet};

    #[derive(Debug, Clone)]
    enum Op {
        Record(u8),
        /// A default use waiting this long for HIS's `use`, for scan k.
        RecordWaiting(u8, u16),
        /// HIS's `use` for scan k.
        Replace(u8),
        MakeAllDue,
        Claim(u8),
        Ack(u8),
        Retry(u8, u16),
        Hold(u8),
        Stop(u8),
        Crash,
        Restart,
        Purge(u16),
        Advance(u16),
        RetryHeld,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u8..4).prop_map(Op::Record),
            3 => (0u8..4, 0u16..3000).prop_map(|(k, w)| Op::RecordWaiting(k, w)),
            2 => (0u8..4).prop_map(Op::Replace),
            1 => Just(Op::MakeAllDue),
            4 => (1u8..8).prop_map(Op::Claim),
            3 => any::<u8>().prop_map(Op::Ack),
            2 => (any::<u8>(), 0u16..4000).prop_map(|(i, d)| Op::Retry(i, d)),
            1 => any::<u8>().prop_map(Op::Hold),
            1 => any::<u8>().prop_map(Op::Stop),
            1 => Just(Op::Crash),
            1 => Just(Op::Restart),
            1 => (0u16..5000).prop_map(Op::Purge),
            2 => (0u16..5000).prop_map(Op::Advance),
            1 => Just(Op::RetryHeld),
        ]
    }

    #[derive(Debug, Clone, PartialEq)]
    struct M {
        request_id: String,
        scan: String,
        state: State,
        next: i64,
        sent_at: Option<i64>,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
        #[test]
        fn outbox_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("o.sqlite");
            let mut store = Store::open(&path).unwrap();
            let mut model: BTreeMap<i64, M> = BTreeMap::new();
            let mut claimed: Vec<i64> = Vec::new();
            let mut now: i64 = 1_000_000;
            let mut next_rid = 0u32;
            for op in ops {
                match op {
                    Op::Record(n) => {
                        let rows: Vec<NewRow> = (0..n).map(|_| {
                            next_rid += 1;
                            NewRow { request_id: format!("{next_rid:032X}"), kind: Kind::Report, scan_id: "S".into(), payload: "{}".into(), created_at: now, wait_until: None }
                        }).collect();
                        let ids = store.insert(&rows).unwrap();
                        for (id, r) in ids.into_iter().zip(rows) {
                            prop_assert!(!model.contains_key(&id), "row id reused");
                            model.insert(id, M { request_id: r.request_id, scan: "S".into(), state: State::Pending, next: now, sent_at: None });
                        }
                    }
                    Op::RecordWaiting(k, wait) => {
                        next_rid += 1;
                        let r = NewRow { request_id: format!("{next_rid:032X}"), kind: Kind::Report, scan_id: format!("S{k}"), payload: "{}".into(), created_at: now, wait_until: Some(now + i64::from(wait)) };
                        let id = store.insert(std::slice::from_ref(&r)).unwrap()[0];
                        model.insert(id, M { request_id: r.request_id, scan: r.scan_id, state: State::Waiting, next: now + i64::from(wait), sent_at: None });
                    }
                    Op::Replace(k) => {
                        next_rid += 1;
                        let scan = format!("S{k}");
                        let r = NewRow { request_id: format!("{next_rid:032X}"), kind: Kind::Report, scan_id: scan.clone(), payload: "{}".into(), created_at: now, wait_until: None };
                        let n = store.replace_waiting(&scan, std::slice::from_ref(&r)).unwrap();
                        let before = model.len();
                        model.retain(|_, m| !(m.scan == scan && m.state == State::Waiting));
                        prop_assert_eq!(n, before - model.len());
                        let added = store.list(State::Pending, 100_000).unwrap().into_iter().find(|x| x.request_id == r.request_id);
                        prop_assert_eq!(added.is_some(), n > 0, "HIS's row added only in place of a waiting default");
                        if let Some(a) = added {
                            model.insert(a.id, M { request_id: r.request_id, scan, state: State::Pending, next: now, sent_at: None });
                        }
                        // The invariant the uploader relies on: a row in
                        // flight is never deleted under it.
                        for id in &claimed {
                            prop_assert!(store.get(*id).unwrap().is_some(), "claimed row {} deleted", id);
                        }
                    }
                    Op::MakeAllDue => {
                        store.make_all_due(now).unwrap();
                        for m in model.values_mut().filter(|m| m.state == State::Pending) {
                            m.next = m.next.min(now);
                        }
                    }
                    Op::Claim(n) => {
                        let exclude: HashSet<i64> = claimed.iter().copied().collect();
                        // Waiting rows past their deadline are promoted by the claim.
                        for m in model.values_mut().filter(|m| m.state == State::Waiting && m.next <= now) {
                            m.state = State::Pending;
                        }
                        let due = store.due(now, n as usize, &exclude).unwrap();
                        prop_assert!(due.len() <= n as usize);
                        for r in due {
                            let m = &model[&r.id];
                            prop_assert_eq!(m.state, State::Pending, "only pending rows are due");
                            prop_assert!(m.next <= now, "not due yet");
                            prop_assert!(!claimed.contains(&r.id), "claimed twice");
                            prop_assert_eq!(&r.request_id, &m.request_id, "requestId changed");
                            claimed.push(r.id);
                        }
                        // Every due, unclaimed row is eventually offered: with
                        // a large enough limit, all of them are.
                        let exclude: HashSet<i64> = claimed.iter().copied().collect();
                        let all = store.due(now, 10_000, &exclude).unwrap().len();
                        let expect = model.iter().filter(|(id, m)| m.state == State::Pending && m.next <= now && !exclude.contains(id)).count();
                        prop_assert_eq!(all, expect);
                    }
                    Op::Ack(i) | Op::Hold(i) | Op::Stop(i) | Op::Retry(i, _) if !claimed.is_empty() => {
                        let id = claimed.remove(i as usize % claimed.len());
                        let m = model.get_mut(&id).unwrap();
                        match op {
                            Op::Ack(_) => { store.mark_sent(id, now, 0).unwrap(); m.state = State::Sent; m.sent_at = Some(now); }
                            Op::Hold(_) => { store.mark_held(id, Some(10042), "x").unwrap(); m.state = State::Held; }
                            Op::Stop(_) => { store.mark_retry(id, now, Some(21006), "x").unwrap(); m.next = now; }
                            Op::Retry(_, d) => { store.mark_retry(id, now + i64::from(d), Some(-1), "x").unwrap(); m.next = now + i64::from(d); }
                            _ => unreachable!(),
                        }
                    }
                    Op::Ack(_) | Op::Hold(_) | Op::Stop(_) | Op::Retry(..) => {}
                    Op::Crash => {
                        // In-flight claims die with the process; the file stays.
                        std::mem::forget(store);
                        store = Store::open(&path).unwrap();
                        claimed.clear();
                    }
                    Op::Restart => {
                        drop(store);
                        store = Store::open(&path).unwrap();
                        claimed.clear();
                    }
                    Op::Purge(age) => {
                        let before = now - i64::from(age);
                        store.purge(before, false).unwrap();
                        model.retain(|_, m| !(m.state == State::Sent && m.sent_at.is_some_and(|t| t < before)));
                    }
                    Op::Advance(d) => now += i64::from(d),
                    Op::RetryHeld => {
                        store.retry_held(None, now).unwrap();
                        for m in model.values_mut().filter(|m| m.state == State::Held) {
                            m.state = State::Pending;
                            m.next = now;
                        }
                    }
                }
                // The file and the model agree on every row: nothing lost,
                // nothing extra, requestIds unchanged, held rows stay held.
                let mut stored: BTreeMap<i64, (String, State)> = BTreeMap::new();
                for st in [State::Pending, State::Sent, State::Held, State::Waiting] {
                    for r in store.list(st, 100_000).unwrap() {
                        stored.insert(r.id, (r.request_id, r.state));
                    }
                }
                let expected: BTreeMap<i64, (String, State)> = model.iter().map(|(id, m)| (*id, (m.request_id.clone(), m.state))).collect();
                prop_assert_eq!(stored, expected);
            }
        }
    }
}
