//! Store: where users, revocations and (later) throttling counters live.
//!
//! One type, two backends: Redis for anything shared between replicas, and an embedded map
//! (`memory://`) for `keycard dev` and single-instance use. This is the only file that knows
//! Redis exists. Every operation is one round trip and is bounded by `store.timeout`, so a hung
//! Redis turns into a quick 503 instead of a hung request.
//!
//! Key layout (all under `store.prefix`, default `keycard:`):
//! - `<prefix>user:<username>` — string, the argon2id PHC hash; written with `SET NX`.
//! - `<prefix>revoked:<jti>` — string `1`, expiring when the token would have.
//! - `<prefix>throttle:user:<username>` and `<prefix>throttle:addr:<ip>` — failed-login
//!   counters (`INCR`), expiring at the end of their window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::{StoreConfig, StoreUrl};

/// Why a store operation failed. Every variant means "could not find out", so callers fail
/// closed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or the connection broke.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No answer within `store.timeout`.
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
}

/// A login-attempt counter: failed attempts in the current window (plus the one in progress;
/// successes are taken back) and the time until the window resets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    /// Attempts counted in the window, the current one included.
    pub count: u64,
    /// Time until the window ends and the count starts again from zero.
    pub resets_in: Duration,
}

/// Everything `/login` reads, fetched in one round trip.
#[derive(Debug, Default)]
pub struct LoginState {
    /// The user's PHC hash, if the user exists.
    pub hash: Option<String>,
    /// Attempts for this username.
    pub user: Counter,
    /// Attempts from this client address.
    pub address: Counter,
}

/// One login attempt, atomically: counts it against the username and the address (starting a
/// window's expiry on a counter's first use) and returns the user's hash with both counts and
/// their remaining windows. Counting *before* the password is checked is what makes the limit
/// exact: of N parallel guesses, only those the limit allows ever reach argon2.
/// KEYS: user, user counter, address counter. ARGV: user window ms, address window ms.
const ATTEMPT_SCRIPT: &str = r"
local out = { redis.call('GET', KEYS[1]) or false }
for i = 2, 3 do
  local n = redis.call('INCR', KEYS[i])
  if redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], ARGV[i - 1])
  end
  out[#out + 1] = n
  out[#out + 1] = redis.call('PTTL', KEYS[i])
end
return out
";

/// A successful login: forgets the username's failures and takes back the address's
/// reservation (only while its window still runs: a DECR on an expired key would create one
/// with no expiry). KEYS: user counter, address counter.
const SUCCESS_SCRIPT: &str = r"
redis.call('DEL', KEYS[1])
if redis.call('PTTL', KEYS[2]) > 0 then
  redis.call('DECR', KEYS[2])
end
return 1
";

/// Handle to the configured store; cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    prefix: Arc<str>,
    timeout: Duration,
}

#[derive(Clone)]
enum Backend {
    /// A single multiplexed connection that reconnects by itself.
    Redis(ConnectionManager),
    Memory(Arc<Mutex<MemoryMap>>),
}

/// The embedded backend: values with optional deadlines, swept lazily on access.
#[derive(Default)]
struct MemoryMap {
    entries: HashMap<String, (String, Option<Instant>)>,
    /// Writes since the last sweep of expired entries; sweeping every N writes keeps memory
    /// bounded without a background task.
    writes: usize,
}

impl MemoryMap {
    fn counter(&self, key: &str, now: Instant) -> Counter {
        match self.entries.get(key) {
            Some((value, Some(deadline))) if *deadline > now => Counter {
                count: value.parse().unwrap_or(0),
                resets_in: *deadline - now,
            },
            _ => Counter::default(),
        }
    }

    /// `INCR` plus an expiry on first use, like [`ATTEMPT_SCRIPT`]; returns the new count.
    fn bump(&mut self, key: &str, window: Duration) {
        let now = Instant::now();
        let Counter { count, resets_in } = self.counter(key, now);
        let deadline = if count == 0 {
            now + window
        } else {
            now + resets_in
        };
        self.entries
            .insert(key.to_owned(), ((count + 1).to_string(), Some(deadline)));
    }

    fn live(&self, key: &str, now: Instant) -> Option<&String> {
        match self.entries.get(key) {
            Some((value, deadline)) if deadline.is_none_or(|d| d > now) => Some(value),
            _ => None,
        }
    }

    /// `SET key value NX [PX ttl]`: true when written.
    fn set_nx(&mut self, key: &str, value: &str, ttl: Option<Duration>) -> bool {
        let now = Instant::now();
        if self.live(key, now).is_some() {
            return false;
        }
        self.writes += 1;
        if self.writes >= 1024 {
            self.writes = 0;
            self.entries
                .retain(|_, (_, deadline)| deadline.is_none_or(|d| d > now));
        }
        self.entries
            .insert(key.to_owned(), (value.to_owned(), ttl.map(|t| now + t)));
        true
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backend {
            Backend::Redis(_) => "redis",
            Backend::Memory(_) => "memory",
        };
        f.debug_struct("Store")
            .field("backend", &kind)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Store {
    /// Opens the configured store. Redis connects lazily, so keycard starts (and `/readyz`
    /// reports 503) while Redis is still coming up, and reconnects on its own afterwards.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let backend = match &config.url {
            StoreUrl::Memory => {
                tracing::warn!(
                    "store is memory://: users and revocations live in this process only and are \
                     not shared with other replicas"
                );
                Backend::Memory(Arc::default())
            }
            StoreUrl::Redis(url) => {
                let client = redis::Client::open(url.as_str())?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.timeout))
                    .set_response_timeout(Some(config.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Backend::Redis(ConnectionManager::new_lazy_with_config(
                    client,
                    manager_config,
                )?)
            }
        };
        Ok(Store {
            backend,
            prefix: config.prefix.as_str().into(),
            timeout: config.timeout,
        })
    }

    /// Runs one Redis command on the shared connection, bounded by `store.timeout`.
    async fn query<T: redis::FromRedisValue>(
        &self,
        conn: &ConnectionManager,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = conn.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async(&mut conn)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + kind.len() + name.len());
        key.push_str(&self.prefix);
        key.push_str(kind);
        key.push_str(name);
        key
    }

    /// `SET key value NX [PX ttl]` on either backend; true when this call wrote it. Atomic, so
    /// two racing writers cannot both win.
    async fn set_nx(
        &self,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Redis(conn) => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(value).arg("NX");
                if let Some(ttl) = ttl {
                    cmd.arg("PX").arg(millis(ttl));
                }
                let reply: Option<String> = self.query(conn, &cmd).await?;
                Ok(reply.is_some())
            }
            Backend::Memory(map) => Ok(lock(map).set_nx(key, value, ttl)),
        }
    }

    /// Creates a user with its password hash; false when the name is taken.
    pub async fn create_user(&self, username: &str, phc: &str) -> Result<bool, StoreError> {
        self.set_nx(&self.key("user:", username), phc, None).await
    }

    /// Revokes a `jti` for `ttl` (the token's remaining life). Returns false when it was
    /// already revoked, which makes refresh-token rotation single-use even under a race.
    pub async fn revoke(&self, jti: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.set_nx(&self.key("revoked:", jti), "1", Some(ttl))
            .await
    }

    /// Whether a `jti` is revoked: one `EXISTS`, the only store call on the proxied path.
    pub async fn is_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        let key = self.key("revoked:", jti);
        match &self.backend {
            Backend::Redis(conn) => {
                let n: u64 = self.query(conn, redis::cmd("EXISTS").arg(&key)).await?;
                Ok(n > 0)
            }
            Backend::Memory(map) => Ok(lock(map).live(&key, Instant::now()).is_some()),
        }
    }

    /// Counts a login attempt against the username and the address and returns the user's
    /// hash with both counts (this attempt included), in one atomic round trip. See
    /// [`ATTEMPT_SCRIPT`] for why the attempt is counted before the password is checked.
    pub async fn login_attempt(
        &self,
        username: &str,
        address: &str,
        user_window: Duration,
        address_window: Duration,
    ) -> Result<LoginState, StoreError> {
        let user_key = self.key("user:", username);
        let user_failures = self.key("throttle:user:", username);
        let address_failures = self.key("throttle:addr:", address);
        match &self.backend {
            Backend::Redis(conn) => {
                let cmd = eval(
                    ATTEMPT_SCRIPT,
                    &[&user_key, &user_failures, &address_failures],
                    &[millis(user_window), millis(address_window)],
                );
                let (hash, user_count, user_ttl, address_count, address_ttl): (
                    Option<String>,
                    u64,
                    i64,
                    u64,
                    i64,
                ) = self.query(conn, &cmd).await?;
                let counter = |count: u64, ttl: i64| Counter {
                    count,
                    resets_in: Duration::from_millis(ttl.max(0) as u64),
                };
                Ok(LoginState {
                    hash,
                    user: counter(user_count, user_ttl),
                    address: counter(address_count, address_ttl),
                })
            }
            Backend::Memory(map) => {
                let mut map = lock(map);
                let now = Instant::now();
                map.bump(&user_failures, user_window);
                map.bump(&address_failures, address_window);
                Ok(LoginState {
                    hash: map.live(&user_key, now).cloned(),
                    user: map.counter(&user_failures, now),
                    address: map.counter(&address_failures, now),
                })
            }
        }
    }

    /// A login succeeded: the username's failures are forgotten (the real user is not locked
    /// out by their own earlier typos) and the address gets its attempt back, so many users
    /// behind one NAT are not throttled for logging in.
    pub async fn login_succeeded(&self, username: &str, address: &str) -> Result<(), StoreError> {
        let user_failures = self.key("throttle:user:", username);
        let address_failures = self.key("throttle:addr:", address);
        match &self.backend {
            Backend::Redis(conn) => {
                let cmd = eval(SUCCESS_SCRIPT, &[&user_failures, &address_failures], &[]);
                let _: i64 = self.query(conn, &cmd).await?;
                Ok(())
            }
            Backend::Memory(map) => {
                let mut map = lock(map);
                map.entries.remove(&user_failures);
                if let Some((value, Some(deadline))) = map.entries.get_mut(&address_failures)
                    && *deadline > Instant::now()
                {
                    let count = value.parse::<u64>().unwrap_or(1).saturating_sub(1);
                    *value = count.to_string();
                }
                Ok(())
            }
        }
    }

    /// Whether the store answers; used by `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redis(conn) => {
                let _: String = self.query(conn, &redis::cmd("PING")).await?;
                Ok(())
            }
            Backend::Memory(_) => Ok(()),
        }
    }
}

/// `EVAL script numkeys keys... args...`.
fn eval(script: &str, keys: &[&str], args: &[u64]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len()).arg(keys).arg(args);
    cmd
}

/// A duration as Redis milliseconds, never 0 (which Redis refuses as an expiry).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Locks the memory map. A panic while holding the lock cannot leave the map half-written
/// (every mutation is a single insert or retain), so a poisoned lock is safe to reuse.
fn lock(map: &Mutex<MemoryMap>) -> std::sync::MutexGuard<'_, MemoryMap> {
    map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Store {
        Store::open(&StoreConfig {
            url: StoreUrl::Memory,
            prefix: "t:".into(),
            timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn memory_create_user_is_first_writer_wins() {
        let store = memory();
        assert!(store.create_user("alice", "h1").await.unwrap());
        assert!(!store.create_user("alice", "h2").await.unwrap());
        let w = Duration::from_secs(60);
        let alice = store.login_attempt("alice", "a", w, w).await.unwrap();
        assert_eq!(alice.hash.as_deref(), Some("h1"));
        let bob = store.login_attempt("bob", "a", w, w).await.unwrap();
        assert_eq!(bob.hash, None);
    }

    #[tokio::test]
    async fn memory_login_attempts_are_counted_before_the_check() {
        let store = memory();
        let w = Duration::from_millis(60);
        store.create_user("alice", "h").await.unwrap();
        store
            .login_attempt("alice", "10.0.0.1", w, w)
            .await
            .unwrap();
        let state = store
            .login_attempt("alice", "10.0.0.2", w, w)
            .await
            .unwrap();
        assert_eq!(state.hash.as_deref(), Some("h"));
        assert_eq!(state.user.count, 2, "this attempt is included");
        assert_eq!(state.address.count, 1);
        assert!(state.user.resets_in <= w && state.user.resets_in > Duration::ZERO);
        // Success forgets the user's failures and gives the address its attempt back.
        store.login_succeeded("alice", "10.0.0.2").await.unwrap();
        let state = store
            .login_attempt("alice", "10.0.0.2", w, w)
            .await
            .unwrap();
        assert_eq!((state.user.count, state.address.count), (1, 1));
        tokio::time::sleep(w + Duration::from_millis(10)).await;
        let state = store.login_attempt("bob", "10.0.0.1", w, w).await.unwrap();
        assert_eq!(state.address.count, 1, "a new window");
        assert_eq!(state.hash, None);
    }

    #[tokio::test]
    async fn memory_revocation_expires() {
        let store = memory();
        assert!(!store.is_revoked("j").await.unwrap());
        assert!(store.revoke("j", Duration::from_millis(30)).await.unwrap());
        assert!(!store.revoke("j", Duration::from_millis(30)).await.unwrap());
        assert!(store.is_revoked("j").await.unwrap());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(!store.is_revoked("j").await.unwrap());
    }
}
