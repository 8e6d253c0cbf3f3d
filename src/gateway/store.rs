//! The gateway's SQLite file: enrolled terminals (with the secrets they sign
//! with), the tokens the gateway gave them, and the calls forwarded per
//! interface per Beijing day (the platform's before-launch limit is the
//! hospital's, not a terminal's).
//!
//! The file is 0600 (terminal secrets read any patient's identity through
//! the gateway). `ehc-agent gateway terminal add|revoke` write it while the
//! gateway runs; the gateway reads a terminal's row on every request, so a
//! revocation takes effect at the next request, not at a restart.
//!
//! The upstream token is not here: it is the platform client's own state
//! file (`upstream.sqlite`, [`crate::platform::token`]), with its generation,
//! persisted before first use.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rand::Rng as _;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS terminals (
    name TEXT PRIMARY KEY,
    app_id TEXT NOT NULL UNIQUE,
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    last_seen INTEGER,
    last_peer TEXT,
    allow TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS terminal_tokens (
    token TEXT PRIMARY KEY,
    terminal TEXT NOT NULL,
    hospital_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS heartbeats (
    terminal TEXT PRIMARY KEY,
    beat TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS budget (
    api TEXT NOT NULL,
    day INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    PRIMARY KEY (api, day)
);";

#[derive(Debug, thiserror::Error)]
pub enum GatewayStoreError {
    #[error("gateway store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("gateway store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a terminal named `{0}` is already enrolled (revoke it first, or pick another name)")]
    Exists(String),
    #[error("no terminal named `{0}`")]
    NoSuchTerminal(String),
    #[error("terminal names are letters, digits, `-`, `_` and `.`, 1 to 64 of them: `{0}`")]
    BadName(String),
    #[error("redis: {0}")]
    Redis(String),
}

/// Where the gateway keeps terminals, their tokens and the budget: its own
/// SQLite file (one gateway), or Redis shared by several (high
/// availability; [`super::redis`]).
pub enum GatewayStore {
    Sqlite(SqliteStore),
    Redis(super::redis::RedisStore),
}

macro_rules! delegate {
    ($( $(#[$m:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        impl GatewayStore {
            $( $(#[$m])* pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                match self {
                    GatewayStore::Sqlite(s) => s.$name($($arg),*),
                    GatewayStore::Redis(r) => r.$name($($arg),*),
                }
            } )*
        }
    };
}

delegate! {
    /// Enrol a terminal: a fresh appId and secret of its own.
    fn add_terminal(&self, name: &str, now: i64) -> Result<Terminal, GatewayStoreError>;
    /// Revoke a terminal: its tokens stop working at once, its appId gets
    /// 21002 from now on.
    fn revoke_terminal(&self, name: &str, now: i64) -> Result<(), GatewayStoreError>;
    fn terminals(&self) -> Result<Vec<Terminal>, GatewayStoreError>;
    fn terminal_by_app_id(&self, app_id: &str) -> Result<Option<Terminal>, GatewayStoreError>;
    fn terminal(&self, name: &str) -> Result<Option<Terminal>, GatewayStoreError>;
    /// Record a new token for a terminal; its earlier tokens stop working.
    fn issue_token(&self, t: &IssuedToken) -> Result<(), GatewayStoreError>;
    fn token(&self, token: &str) -> Result<Option<IssuedToken>, GatewayStoreError>;
    fn seen(&self, terminal: &str, now: i64, peer: &str) -> Result<(), GatewayStoreError>;
    /// Count one call of `api` on Beijing day `day`, unless that would pass
    /// `limit`: the calls counted that day, or `None` when spent.
    fn take_budget(&self, api: &str, day: i64, limit: Option<u64>) -> Result<Option<u64>, GatewayStoreError>;
    fn budget_used(&self, day: i64) -> Result<Vec<(String, u64)>, GatewayStoreError>;
    /// The source networks a terminal may call from (empty: any).
    fn set_allow(&self, name: &str, allow: &[String]) -> Result<(), GatewayStoreError>;
    /// Keep a terminal's latest heartbeat (the one before it is replaced).
    fn put_beat(&self, beat: &StoredBeat) -> Result<(), GatewayStoreError>;
    /// Every terminal's latest heartbeat.
    fn beats(&self) -> Result<Vec<StoredBeat>, GatewayStoreError>;
}

/// A terminal's latest heartbeat as the gateway received it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredBeat {
    /// The enrolment name (the token's holder).
    pub terminal: String,
    /// The gateway's clock when it arrived.
    pub received_at: i64,
    /// The terminal's clock minus the gateway's, in seconds (from the
    /// envelope's timestamp; within a second or so).
    pub clock_offset_s: i64,
    pub peer: String,
    pub beat: crate::platform::heartbeat::Beat,
}

/// A new terminal's appId and secret (the same for either store).
pub(crate) fn new_terminal(name: &str, now: i64) -> Result<Terminal, GatewayStoreError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(GatewayStoreError::BadName(name.into()));
    }
    let mut rng = rand::rng();
    let id: [u8; 8] = rng.random();
    let secret: [u8; 24] = rng.random();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Ok(Terminal {
        name: name.into(),
        app_id: format!("gw-{}-{}", name, hex(&id)),
        secret: hex(&secret),
        created_at: now,
        revoked_at: None,
        last_seen: None,
        last_peer: None,
        allow: Vec::new(),
    })
}

/// An enrolled terminal.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Terminal {
    pub name: String,
    pub app_id: String,
    #[serde(skip)]
    pub secret: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub last_seen: Option<i64>,
    pub last_peer: Option<String>,
    /// Source networks (CIDR) the terminal may call from; empty: any.
    pub allow: Vec<String>,
}

/// A token the gateway issued to a terminal.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub terminal: String,
    pub hospital_id: String,
    pub expires_at: i64,
}

pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, GatewayStoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| GatewayStoreError::Io {
                path: path.to_owned(),
                source,
            })?;
        }
        crate::agent::outbox::store::make_private(path).map_err(|source| {
            GatewayStoreError::Io {
                path: path.to_owned(),
                source,
            }
        })?;
        give_to_dir_owner(path);
        let err = |source| GatewayStoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // Losing the last budget increments or a token to a power cut is
        // harmless (a terminal asks for a new token); an fsync per forwarded
        // call is not.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(SqliteStore {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, source: rusqlite::Error) -> GatewayStoreError {
        GatewayStoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Enrol a terminal: a fresh appId and secret of its own.
    pub fn add_terminal(&self, name: &str, now: i64) -> Result<Terminal, GatewayStoreError> {
        let t = new_terminal(name, now)?;
        let c = self.conn();
        let exists: Option<String> = c
            .query_row(
                "SELECT name FROM terminals WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if exists.is_some() {
            return Err(GatewayStoreError::Exists(name.into()));
        }
        c.execute(
            "INSERT INTO terminals (name, app_id, secret, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![t.name, t.app_id, t.secret, t.created_at],
        )
        .map_err(|e| self.err(e))?;
        Ok(t)
    }

    /// Revoke a terminal: its tokens stop working at once, its appId gets
    /// 21002 from now on. The row stays (who it was, when).
    pub fn revoke_terminal(&self, name: &str, now: i64) -> Result<(), GatewayStoreError> {
        let c = self.conn();
        let n = c
            .execute(
                "UPDATE terminals SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
                params![name, now],
            )
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(GatewayStoreError::NoSuchTerminal(name.into()));
        }
        c.execute(
            "DELETE FROM terminal_tokens WHERE terminal = ?1",
            params![name],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn terminals(&self) -> Result<Vec<Terminal>, GatewayStoreError> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT name, app_id, secret, created_at, revoked_at, last_seen, last_peer, allow FROM terminals ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], terminal_from).map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    pub fn terminal_by_app_id(&self, app_id: &str) -> Result<Option<Terminal>, GatewayStoreError> {
        self.conn()
            .query_row(
                "SELECT name, app_id, secret, created_at, revoked_at, last_seen, last_peer, allow FROM terminals WHERE app_id = ?1",
                params![app_id],
                terminal_from,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn terminal(&self, name: &str) -> Result<Option<Terminal>, GatewayStoreError> {
        self.conn()
            .query_row(
                "SELECT name, app_id, secret, created_at, revoked_at, last_seen, last_peer, allow FROM terminals WHERE name = ?1",
                params![name],
                terminal_from,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Record a new token for `terminal`; its earlier tokens are deleted
    /// (a terminal's new token revokes only its own old one).
    pub fn issue_token(&self, t: &IssuedToken) -> Result<(), GatewayStoreError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(|e| self.err(e))?;
        tx.execute(
            "DELETE FROM terminal_tokens WHERE terminal = ?1 OR expires_at < ?2",
            params![t.terminal, t.expires_at - 86_400],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO terminal_tokens (token, terminal, hospital_id, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![t.token, t.terminal, t.hospital_id, t.expires_at],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))
    }

    pub fn token(&self, token: &str) -> Result<Option<IssuedToken>, GatewayStoreError> {
        self.conn()
            .query_row(
                "SELECT token, terminal, hospital_id, expires_at FROM terminal_tokens WHERE token = ?1",
                params![token],
                |r| {
                    Ok(IssuedToken {
                        token: r.get(0)?,
                        terminal: r.get(1)?,
                        hospital_id: r.get(2)?,
                        expires_at: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn seen(&self, terminal: &str, now: i64, peer: &str) -> Result<(), GatewayStoreError> {
        self.conn()
            .execute(
                "UPDATE terminals SET last_seen = ?2, last_peer = ?3 WHERE name = ?1",
                params![terminal, now, peer],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Count one call of `api` on Beijing day `day`, unless that would pass
    /// `limit`. Returns the calls counted that day (with this one), or
    /// `None` when the budget is spent.
    pub fn take_budget(
        &self,
        api: &str,
        day: i64,
        limit: Option<u64>,
    ) -> Result<Option<u64>, GatewayStoreError> {
        let mut c = self.conn();
        let tx = c.transaction().map_err(|e| self.err(e))?;
        let used: u64 = tx
            .query_row(
                "SELECT calls FROM budget WHERE api = ?1 AND day = ?2",
                params![api, day],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(|e| self.err(e))?
            .unwrap_or(0) as u64;
        if limit.is_some_and(|l| used >= l) {
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO budget (api, day, calls) VALUES (?1, ?2, 1)
             ON CONFLICT(api, day) DO UPDATE SET calls = calls + 1",
            params![api, day],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Some(used + 1))
    }

    pub fn set_allow(&self, name: &str, allow: &[String]) -> Result<(), GatewayStoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE terminals SET allow = ?2 WHERE name = ?1",
                params![name, allow.join(",")],
            )
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(GatewayStoreError::NoSuchTerminal(name.into()));
        }
        Ok(())
    }

    pub fn put_beat(&self, beat: &StoredBeat) -> Result<(), GatewayStoreError> {
        let text = serde_json::to_string(beat).unwrap_or_default();
        self.conn()
            .execute(
                "INSERT INTO heartbeats (terminal, beat) VALUES (?1, ?2)
                 ON CONFLICT(terminal) DO UPDATE SET beat = excluded.beat",
                params![beat.terminal, text],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn beats(&self) -> Result<Vec<StoredBeat>, GatewayStoreError> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT beat FROM heartbeats ORDER BY terminal")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for text in rows {
            // A row a newer gateway wrote in a shape this one cannot read
            // is left out, not an error for the whole page.
            if let Ok(b) = serde_json::from_str(&text.map_err(|e| self.err(e))?) {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Calls counted per interface on Beijing day `day`.
    pub fn budget_used(&self, day: i64) -> Result<Vec<(String, u64)>, GatewayStoreError> {
        let c = self.conn();
        let mut st = c
            .prepare("SELECT api, calls FROM budget WHERE day = ?1 ORDER BY api")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![day], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

/// `gateway terminal add` is run by root on a store that belongs to the
/// service's user (`StateDirectory=`): files root creates there are handed
/// to the directory's owner, or the service could not open them.
fn give_to_dir_owner(path: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let Some(owner) = path
        .parent()
        .and_then(|d| std::fs::metadata(d).ok())
        .map(|m| (m.uid(), m.gid()))
        .filter(|(u, _)| *u != 0)
    else {
        return;
    };
    for p in crate::agent::outbox::store::sqlite_files(path) {
        let _ = std::os::unix::fs::chown(&p, Some(owner.0), Some(owner.1));
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        give_to_dir_owner(&self.path);
    }
}

fn terminal_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Terminal> {
    Ok(Terminal {
        name: r.get(0)?,
        app_id: r.get(1)?,
        secret: r.get(2)?,
        created_at: r.get(3)?,
        revoked_at: r.get(4)?,
        last_seen: r.get(5)?,
        last_peer: r.get(6)?,
        allow: r
            .get::<_, String>(7)?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminals_tokens_and_budget() {
        let d = tempfile::tempdir().unwrap();
        let s = GatewayStore::Sqlite(SqliteStore::open(&d.path().join("g.sqlite")).unwrap());
        let a = s.add_terminal("WIN-01", 1).unwrap();
        assert!(matches!(
            s.add_terminal("WIN-01", 2),
            Err(GatewayStoreError::Exists(_))
        ));
        assert!(matches!(
            s.add_terminal("bad name", 2),
            Err(GatewayStoreError::BadName(_))
        ));
        assert_eq!(
            s.terminal_by_app_id(&a.app_id).unwrap().unwrap().name,
            "WIN-01"
        );
        let tok = |t: &str| IssuedToken {
            token: t.into(),
            terminal: "WIN-01".into(),
            hospital_id: "H".into(),
            expires_at: 100_000,
        };
        s.issue_token(&tok("T1")).unwrap();
        s.issue_token(&tok("T2")).unwrap();
        assert!(s.token("T1").unwrap().is_none(), "replaced by T2");
        assert!(s.token("T2").unwrap().is_some());
        s.revoke_terminal("WIN-01", 5).unwrap();
        assert!(
            s.token("T2").unwrap().is_none(),
            "revocation drops its tokens"
        );
        assert_eq!(s.terminal("WIN-01").unwrap().unwrap().revoked_at, Some(5));
        assert_eq!(s.take_budget("x", 1, Some(2)).unwrap(), Some(1));
        assert_eq!(s.take_budget("x", 1, Some(2)).unwrap(), Some(2));
        assert_eq!(s.take_budget("x", 1, Some(2)).unwrap(), None);
        assert_eq!(
            s.take_budget("x", 2, Some(2)).unwrap(),
            Some(1),
            "a new day"
        );
        assert_eq!(s.budget_used(1).unwrap(), [("x".to_owned(), 2)]);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join("g.sqlite"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0);
    }
}
