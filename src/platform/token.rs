//! The app token: fetched once, shared by every call, kept across restarts.
//!
//! `getAppToken` is dangerous to call: **a new token revokes the old one**
//! (reference 3.2.1). Twenty scans that all see the token expire must cause
//! one refresh, not twenty that revoke each other; a restart must not fetch a
//! new token while the stored one is valid (it would revoke the one in use by
//! a sibling process, and waste a call of a hospital's daily cap).
//!
//! So:
//! * the token lives in a small SQLite file, written with `synchronous=FULL`
//!   and committed **before** it is first used;
//! * refreshes are single flight (an async mutex), and each token carries a
//!   *generation*. A call that failed with 21003/21004 asks for a refresh
//!   "of generation g"; if the current generation is already newer, somebody
//!   else refreshed and the caller just retries with it;
//! * a token is refreshed [`REFRESH_MARGIN`] seconds before it expires;
//! * a refresh *because the platform rejected the token* happens at most
//!   once per [`MIN_REFRESH_INTERVAL`]: two processes sharing one appId would
//!   otherwise revoke each other in a tight loop. The caller then gets the
//!   token error and its own retry policy takes over. (The client enforces
//!   this; see `client::Client::refresh`.)

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

/// Refresh this many seconds before the platform's expiry.
pub const REFRESH_MARGIN: i64 = 300;
/// Never refresh because of a rejection more often than this (seconds).
pub const MIN_REFRESH_INTERVAL: i64 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub value: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub obtained_at: i64,
    pub generation: u64,
}

impl Token {
    /// Whether the token may still be used at `now`, or should be replaced
    /// first: [`REFRESH_MARGIN`] before expiry, or a fifth of its lifetime
    /// for a short-lived one (a gateway's or a test platform's), so that a
    /// token is used for most of its life instead of refreshed at every call.
    pub fn fresh_at(&self, now: i64) -> bool {
        let lifetime = (self.expires_at - self.obtained_at).max(0);
        now < self.expires_at - REFRESH_MARGIN.min(lifetime / 5)
    }
}

/// A token store shared by several processes holding one appId (the
/// gateways of one hospital, DESIGN §5a). The client consults it around
/// every refresh: it re-reads it first (another process may have a newer
/// token), takes a lease so that only one process calls getAppToken, and
/// stores the new token only if the generation it started from is still
/// the stored one, so a late answer never overwrites a newer token.
/// Synchronous: called on the blocking pool.
pub trait SharedTokens: Send + Sync + std::fmt::Debug {
    /// The stored token, if any.
    fn load(&self) -> Result<Option<Token>, String>;
    /// Take the refresh lease for `ttl_ms`; `false` when another holds it.
    fn lease(&self, holder: &str, ttl_ms: u64) -> Result<bool, String>;
    /// Give the lease back, if `holder` still has it.
    fn release(&self, holder: &str) -> Result<(), String>;
    /// Store `token` as generation `expected + 1` if the stored generation
    /// is still `expected`. Returns what is stored afterwards: ours, or the
    /// newer one that won.
    fn store_if(&self, expected: u64, token: &Token, holder: &str) -> Result<Token, String>;
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create directory for {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Which platform identity a stored token belongs to: a token of another
/// appId, hospital or platform is never used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub base_url: String,
    pub app_id: String,
    pub hospital_id: String,
}

/// The persisted token, plus the in-memory copy the hot path reads.
pub struct TokenStore {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
    identity: Identity,
    current: Mutex<Option<Token>>,
}

impl TokenStore {
    /// Open (creating) the state database. `None` as path keeps the token in
    /// memory only (the `sign`-style tools and some tests).
    pub fn open(path: Option<&Path>, identity: Identity) -> Result<Self, StoreError> {
        let Some(path) = path else {
            return Ok(TokenStore {
                path: PathBuf::new(),
                conn: Mutex::new(None),
                identity,
                current: Mutex::new(None),
            });
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: path.to_owned(),
                source,
            })?;
        }
        let err = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        crate::agent::outbox::store::make_private(path).map_err(|source| StoreError::Dir {
            path: path.to_owned(),
            source,
        })?;
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS token (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                base_url TEXT NOT NULL,
                app_id TEXT NOT NULL,
                hospital_id TEXT NOT NULL,
                token TEXT NOT NULL,
                expires_at INTEGER NOT NULL,
                obtained_at INTEGER NOT NULL,
                generation INTEGER NOT NULL
            );",
        )
        .map_err(err)?;
        let stored = conn
            .query_row(
                "SELECT base_url, app_id, hospital_id, token, expires_at, obtained_at, generation FROM token WHERE id = 1",
                [],
                |r| {
                    Ok((
                        Identity {
                            base_url: r.get(0)?,
                            app_id: r.get(1)?,
                            hospital_id: r.get(2)?,
                        },
                        Token {
                            value: r.get(3)?,
                            expires_at: r.get(4)?,
                            obtained_at: r.get(5)?,
                            generation: r.get::<_, i64>(6)? as u64,
                        },
                    ))
                },
            )
            .optional()
            .map_err(err)?;
        let current = stored.and_then(|(id, tok)| (id == identity).then_some(tok));
        Ok(TokenStore {
            path: path.to_owned(),
            conn: Mutex::new(Some(conn)),
            identity,
            current: Mutex::new(current),
        })
    }

    pub fn current(&self) -> Option<Token> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Store a new token (committed to disk before returning) and make it
    /// current. Returns it with its generation.
    /// Make a token obtained elsewhere (a shared store) current, with its
    /// generation, and save it.
    pub fn adopt(&self, tok: &Token) -> Result<(), StoreError> {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(tok.clone());
        self.save(tok)
    }

    fn save(&self, tok: &Token) -> Result<(), StoreError> {
        match self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            None => Ok(()),
            Some(conn) => conn
                .execute(
                    "INSERT INTO token (id, base_url, app_id, hospital_id, token, expires_at, obtained_at, generation)
                     VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT(id) DO UPDATE SET base_url=?1, app_id=?2, hospital_id=?3, token=?4,
                       expires_at=?5, obtained_at=?6, generation=?7",
                    params![
                        self.identity.base_url,
                        self.identity.app_id,
                        self.identity.hospital_id,
                        tok.value,
                        tok.expires_at,
                        tok.obtained_at,
                        tok.generation as i64
                    ],
                )
                .map(|_| ())
                .map_err(|source| StoreError::Sqlite {
                    path: self.path.clone(),
                    source,
                }),
        }
    }

    /// Make a new token current, then save it. It is current in memory
    /// whatever the save does: getAppToken has already revoked the old one,
    /// so throwing the new one away (full disk) would make every call fail.
    /// The save's error is returned beside it for the caller to report.
    pub fn install(
        &self,
        value: String,
        expires_in: u64,
        now: i64,
    ) -> (Token, Result<(), StoreError>) {
        let generation = self.current().map(|t| t.generation).unwrap_or(0) + 1;
        let tok = Token {
            value,
            expires_at: now.saturating_add(expires_in.min(i64::MAX as u64) as i64),
            obtained_at: now,
            generation,
        };
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(tok.clone());
        let saved = self.save(&tok);
        (tok, saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            base_url: "http://127.0.0.1:1".into(),
            app_id: "app".into(),
            hospital_id: "h".into(),
        }
    }

    #[test]
    fn survives_reopen_and_ignores_other_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/state.sqlite");
        let s = TokenStore::open(Some(&p), id()).unwrap();
        assert!(s.current().is_none());
        let (t, saved) = s.install("T1".into(), 7200, 1000);
        saved.unwrap();
        assert_eq!((t.generation, t.expires_at), (1, 8200));
        assert!(t.fresh_at(1000) && !t.fresh_at(8200 - REFRESH_MARGIN));
        drop(s);
        let s = TokenStore::open(Some(&p), id()).unwrap();
        assert_eq!(s.current().unwrap().value, "T1");
        assert_eq!(s.install("T2".into(), 7200, 2000).0.generation, 2);
        drop(s);
        let other = Identity {
            app_id: "other".into(),
            ..id()
        };
        assert!(TokenStore::open(Some(&p), other)
            .unwrap()
            .current()
            .is_none());
    }

    /// Regression: a token that could not be saved (full disk) was thrown
    /// away after getAppToken had revoked the old one; every call then failed.
    #[test]
    fn a_token_that_cannot_be_saved_is_still_current() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.sqlite");
        let s = TokenStore::open(Some(&p), id()).unwrap();
        s.conn
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .pragma_update(None, "query_only", true)
            .unwrap();
        let (t, saved) = s.install("T1".into(), 7200, 1000);
        assert!(saved.is_err(), "the save was refused");
        assert_eq!(
            s.current(),
            Some(t),
            "and the token is current all the same"
        );
    }
}
