//! Redis, for two or more gateways of one hospital (high availability): the
//! enrolled terminals, the tokens they were given (so a terminal can fail
//! over to another gateway with the token it has), the daily budget, and
//! the hospital's one upstream token ([`SharedTokens`]).
//!
//! The upstream token follows what the WeChat SDKs' central token holders
//! learnt the hard way (DESIGN §5a): a refresh holds a lease
//! (`SET lease holder NX PX`), released only by its holder (a Lua
//! compare-and-delete); the new token is stored only if the generation is
//! still the one the refresh started from (a Lua compare-and-set), so a late
//! answer never overwrites a newer token; and every gateway re-reads the
//! store before asking for a refresh.
//!
//! Calls are synchronous with short timeouts, made on the blocking pool.
//! Redis unreachable: the gateway keeps serving with the token it holds in
//! memory, says so (logs, `gateway status`), and reconnects on the next
//! call.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use redis::{Commands as _, Connection, RedisResult};

use super::store::{new_terminal, GatewayStoreError, IssuedToken, Terminal};
use crate::platform::token::{SharedTokens, Token};

/// Connect and per-command timeout: a Redis that does not answer must not
/// hold a scan.
const TIMEOUT: Duration = Duration::from_millis(500);

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

const STORE_IF: &str = r"
local g = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
if g == tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'token', ARGV[2], 'expires_at', ARGV[3],
             'obtained_at', ARGV[4], 'generation', g + 1, 'holder', ARGV[5])
end
return redis.call('HMGET', KEYS[1], 'token', 'expires_at', 'obtained_at', 'generation')";

const TAKE_BUDGET: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[1] ~= '' and n >= tonumber(ARGV[1]) then
  return -1
end
n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 172800)
return n";

pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    conn: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RedisStore({:?}, prefix {:?})",
            self.client.get_connection_info().addr(),
            self.prefix
        )
    }
}

impl RedisStore {
    /// `url` as `redis://host:port/db`; every key starts with `prefix`.
    pub fn new(url: &str, prefix: &str) -> Result<RedisStore, GatewayStoreError> {
        let client =
            redis::Client::open(url).map_err(|e| GatewayStoreError::Redis(e.to_string()))?;
        Ok(RedisStore {
            client,
            prefix: prefix.to_owned(),
            conn: Mutex::new(None),
        })
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Connection>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the connection, connecting first if needed; a failed
    /// command drops the connection so the next call reconnects.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Result<T, String> {
        let mut slot = self.lock();
        if slot.is_none() {
            let c = self
                .client
                .get_connection_with_timeout(TIMEOUT)
                .map_err(|e| e.to_string())?;
            c.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            c.set_write_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            *slot = Some(c);
        }
        let conn = slot.as_mut().expect("connected above");
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                *slot = None;
                Err(e.to_string())
            }
        }
    }

    fn w<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, GatewayStoreError> {
        self.with(f).map_err(GatewayStoreError::Redis)
    }

    /// Whether Redis answers now (for `gateway status`).
    pub fn ping(&self) -> Result<(), String> {
        self.with(|c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }

    pub fn add_terminal(&self, name: &str, now: i64) -> Result<Terminal, GatewayStoreError> {
        let t = new_terminal(name, now)?;
        let key = self.key(&format!("terminal:{name}"));
        let created: bool = self.w(|c| c.hset_nx(&key, "app_id", &t.app_id))?;
        if !created {
            return Err(GatewayStoreError::Exists(name.into()));
        }
        let (appkey, setkey) = (
            self.key(&format!("appid:{}", t.app_id)),
            self.key("terminals"),
        );
        self.w(|c| {
            redis::pipe()
                .atomic()
                .hset_multiple(
                    &key,
                    &[
                        ("secret", t.secret.clone()),
                        ("created_at", t.created_at.to_string()),
                    ],
                )
                .set(&appkey, name)
                .sadd(&setkey, name)
                .query::<()>(c)
        })?;
        Ok(t)
    }

    pub fn revoke_terminal(&self, name: &str, now: i64) -> Result<(), GatewayStoreError> {
        match self.terminal(name)? {
            Some(t) if t.revoked_at.is_none() => {}
            _ => return Err(GatewayStoreError::NoSuchTerminal(name.into())),
        }
        let key = self.key(&format!("terminal:{name}"));
        let current = self.key(&format!("termtok:{name}"));
        let old: Option<String> = self.w(|c| c.get(&current))?;
        self.w(|c| {
            let mut p = redis::pipe();
            p.atomic().hset(&key, "revoked_at", now).del(&current);
            if let Some(o) = &old {
                p.del(self.key(&format!("tok:{o}")));
            }
            p.query::<()>(c)
        })
    }

    pub fn terminals(&self) -> Result<Vec<Terminal>, GatewayStoreError> {
        let mut names: Vec<String> = self.w(|c| c.smembers(self.key("terminals")))?;
        names.sort();
        let mut out = Vec::new();
        for n in names {
            if let Some(t) = self.terminal(&n)? {
                out.push(t);
            }
        }
        Ok(out)
    }

    pub fn terminal_by_app_id(&self, app_id: &str) -> Result<Option<Terminal>, GatewayStoreError> {
        let name: Option<String> = self.w(|c| c.get(self.key(&format!("appid:{app_id}"))))?;
        match name {
            Some(n) => self.terminal(&n),
            None => Ok(None),
        }
    }

    pub fn terminal(&self, name: &str) -> Result<Option<Terminal>, GatewayStoreError> {
        let h: std::collections::HashMap<String, String> =
            self.w(|c| c.hgetall(self.key(&format!("terminal:{name}"))))?;
        if !h.contains_key("secret") {
            return Ok(None);
        }
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok());
        Ok(Some(Terminal {
            name: name.into(),
            app_id: h.get("app_id").cloned().unwrap_or_default(),
            secret: h.get("secret").cloned().unwrap_or_default(),
            created_at: num("created_at").unwrap_or_default(),
            revoked_at: num("revoked_at"),
            last_seen: num("last_seen"),
            last_peer: h.get("last_peer").cloned(),
            allow: h
                .get("allow")
                .map(|a| {
                    a.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }

    pub fn issue_token(&self, t: &IssuedToken) -> Result<(), GatewayStoreError> {
        let current = self.key(&format!("termtok:{}", t.terminal));
        let old: Option<String> = self.w(|c| c.get(&current))?;
        let value = format!("{}\t{}\t{}", t.terminal, t.hospital_id, t.expires_at);
        let ttl = (t.expires_at - crate::clock::now_unix()).max(1) as u64 + 60;
        self.w(|c| {
            let mut p = redis::pipe();
            p.atomic()
                .set_ex(self.key(&format!("tok:{}", t.token)), &value, ttl)
                .set_ex(&current, &t.token, ttl);
            if let Some(o) = &old {
                p.del(self.key(&format!("tok:{o}")));
            }
            p.query::<()>(c)
        })
    }

    pub fn token(&self, token: &str) -> Result<Option<IssuedToken>, GatewayStoreError> {
        if token.is_empty() {
            return Ok(None);
        }
        let v: Option<String> = self.w(|c| c.get(self.key(&format!("tok:{token}"))))?;
        Ok(v.and_then(|v| {
            let mut it = v.split('\t');
            Some(IssuedToken {
                token: token.into(),
                terminal: it.next()?.into(),
                hospital_id: it.next()?.into(),
                expires_at: it.next()?.parse().ok()?,
            })
        }))
    }

    pub fn seen(&self, terminal: &str, now: i64, peer: &str) -> Result<(), GatewayStoreError> {
        let key = self.key(&format!("terminal:{terminal}"));
        self.w(|c| {
            c.hset_multiple::<_, _, _, ()>(
                &key,
                &[
                    ("last_seen", now.to_string()),
                    ("last_peer", peer.to_owned()),
                ],
            )
        })
    }

    pub fn take_budget(
        &self,
        api: &str,
        day: i64,
        limit: Option<u64>,
    ) -> Result<Option<u64>, GatewayStoreError> {
        let key = self.key(&format!("budget:{day}:{api}"));
        let n: i64 = self.w(|c| {
            redis::Script::new(TAKE_BUDGET)
                .key(&key)
                .arg(limit.map(|l| l.to_string()).unwrap_or_default())
                .invoke(c)
        })?;
        Ok((n >= 0).then_some(n as u64))
    }

    /// Heartbeats live in one hash, terminal → JSON: every gateway of the
    /// hospital reads the same fleet.
    pub fn put_beat(&self, beat: &super::store::StoredBeat) -> Result<(), GatewayStoreError> {
        let text = serde_json::to_string(beat).unwrap_or_default();
        let key = self.key("heartbeats");
        self.w(|c| c.hset::<_, _, _, ()>(&key, &beat.terminal, text))
    }

    pub fn beats(&self) -> Result<Vec<super::store::StoredBeat>, GatewayStoreError> {
        let all: std::collections::BTreeMap<String, String> =
            self.w(|c| c.hgetall(self.key("heartbeats")))?;
        Ok(all
            .values()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect())
    }

    pub fn budget_used(&self, day: i64) -> Result<Vec<(String, u64)>, GatewayStoreError> {
        let mut out = Vec::new();
        let counters = crate::platform::api::API_NAMES
            .iter()
            .map(|(api, _)| *api)
            .chain([super::config::HOSPITAL_COUNTER]);
        for api in counters {
            let n: Option<u64> = self.w(|c| c.get(self.key(&format!("budget:{day}:{api}"))))?;
            if let Some(n) = n {
                out.push((api.to_owned(), n));
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn set_allow(&self, name: &str, allow: &[String]) -> Result<(), GatewayStoreError> {
        if self.terminal(name)?.is_none() {
            return Err(GatewayStoreError::NoSuchTerminal(name.into()));
        }
        let key = self.key(&format!("terminal:{name}"));
        self.w(|c| c.hset::<_, _, _, ()>(&key, "allow", allow.join(",")))
    }

    /// Which gateway stored the upstream token, for `gateway status`.
    pub fn token_holder(&self) -> Result<Option<String>, String> {
        self.with(|c| c.hget(self.key("upstream"), "holder"))
    }
}

fn token_from(v: &[Option<String>]) -> Option<Token> {
    let get = |i: usize| v.get(i).cloned().flatten();
    Some(Token {
        value: get(0)?,
        expires_at: get(1)?.parse().ok()?,
        obtained_at: get(2)?.parse().ok()?,
        generation: get(3)?.parse().ok()?,
    })
}

impl SharedTokens for RedisStore {
    fn load(&self) -> Result<Option<Token>, String> {
        let v: Vec<Option<String>> = self.with(|c| {
            redis::cmd("HMGET")
                .arg(self.key("upstream"))
                .arg(&["token", "expires_at", "obtained_at", "generation"])
                .query(c)
        })?;
        Ok(token_from(&v))
    }

    fn lease(&self, holder: &str, ttl_ms: u64) -> Result<bool, String> {
        let r: Option<String> = self.with(|c| {
            redis::cmd("SET")
                .arg(self.key("lease"))
                .arg(holder)
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms)
                .query(c)
        })?;
        Ok(r.is_some())
    }

    fn release(&self, holder: &str) -> Result<(), String> {
        self.with(|c| {
            redis::Script::new(RELEASE)
                .key(self.key("lease"))
                .arg(holder)
                .invoke::<i64>(c)
        })
        .map(|_| ())
    }

    fn store_if(&self, expected: u64, token: &Token, holder: &str) -> Result<Token, String> {
        let v: Vec<Option<String>> = self.with(|c| {
            redis::Script::new(STORE_IF)
                .key(self.key("upstream"))
                .arg(expected)
                .arg(&token.value)
                .arg(token.expires_at)
                .arg(token.obtained_at)
                .arg(holder)
                .invoke(c)
        })?;
        token_from(&v).ok_or_else(|| "the stored token is unreadable".into())
    }
}
