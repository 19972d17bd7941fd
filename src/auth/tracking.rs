//! Revocation cache: the per-request revocation check answered from memory, kept exact by
//! Redis itself (server-assisted client-side caching, RESP3 `CLIENT TRACKING`).
//!
//! The check reads the same few keys for every request of a session (`generation:<user>`,
//! `revoked:<jti>`, `family:<id>`), and they almost never change. So keycard keeps one extra
//! RESP3 connection with `CLIENT TRACKING ON`: every `MGET` of those keys goes over it, which
//! makes Redis remember that keycard read them, and the answers are kept here. When any
//! process writes one of those keys (a logout, `redis-cli SET ...revoked:<jti> 1`, an expiry,
//! `FLUSHALL`), Redis pushes an invalidation on that connection and the entry is dropped before
//! the connection reads anything else; the next request reads Redis again.
//!
//! The cache is only trusted while that channel is known to be up:
//! - it starts empty and is used only after `CLIENT TRACKING ON` succeeded;
//! - the connection closing (redis-rs reports it at once) empties it and turns it off;
//! - a `PING` goes out every [`HEARTBEAT`]; an entry is served only while the last answer on
//!   the connection is younger than [`LIVENESS`] (a `PING` unanswered within `store.timeout`
//!   drops the connection). A link that goes silent without
//!   closing (a partition) therefore stops the cache within [`LIVENESS`], and from then on
//!   every request is checked directly, as without the cache, until tracking is back.
//!
//! A read and an invalidation can cross: the `MGET` answer is handed to the request while the
//! connection goes on to read an invalidation of one of its keys. Every invalidation and every
//! change of connection bumps a counter, and an answer is only stored if the counter has not
//! moved since its `MGET` was sent, under the same lock; an invalidation processed after the
//! store removes the entry it would have made stale. So an entry is never older than the last
//! invalidation Redis sent for its key.
//!
//! Redis Cluster and Redis-compatible servers without `CLIENT TRACKING` (or an ACL that
//! forbids it) get no cache: every request is checked directly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};

/// How often the tracking connection is pinged.
pub const HEARTBEAT: Duration = Duration::from_millis(100);

/// How old the last answer on the tracking connection may be for the cache to be used: the
/// longest a cached answer can outlive a link that went silent (a partition, a hung Redis).
pub const LIVENESS: Duration = Duration::from_millis(300);

/// Most entries kept; past it the cache starts again empty (a flood of distinct tokens costs
/// at most this much memory, and then only direct checks).
const MAX_ENTRIES: usize = 100_000;

/// How long to wait before connecting again after the tracking connection failed.
const RETRY: Duration = Duration::from_secs(1);

/// The cache, shared by every request and the task that keeps the connection.
pub struct RevocationCache {
    state: Mutex<State>,
}

impl std::fmt::Debug for RevocationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("RevocationCache")
            .field("live", &state.connection.is_some())
            .field("entries", &state.entries.len())
            .finish()
    }
}

struct State {
    /// Key → value as last read (`None`: the key did not exist).
    entries: HashMap<String, Option<String>>,
    /// Bumped by every invalidation and every change of connection.
    version: u64,
    /// The tracking connection while tracking is on, with its id.
    connection: Option<(u64, MultiplexedConnection)>,
    /// When the tracking connection last answered.
    last_answer: Instant,
}

impl State {
    fn live(&self, now: Instant) -> bool {
        self.connection.is_some() && now.duration_since(self.last_answer) < LIVENESS
    }

    /// Empties the cache and turns it off (if `id` is the current connection's).
    fn down(&mut self, id: u64) {
        if self
            .connection
            .as_ref()
            .is_some_and(|(current, _)| *current == id)
        {
            self.connection = None;
            self.entries.clear();
            self.version += 1;
        }
    }
}

/// A read to make over the tracking connection, then to store with [`Ticket::store`].
pub struct Ticket<'a> {
    cache: &'a RevocationCache,
    version: u64,
    id: u64,
    /// The tracking connection (a clone: it is a handle).
    pub connection: MultiplexedConnection,
}

impl Ticket<'_> {
    /// Keeps `values` (answers to `MGET keys`), unless something was invalidated since the
    /// ticket was taken.
    pub fn store(self, keys: &[String], values: &[Option<String>]) {
        let mut state = lock(&self.cache.state);
        if state.version != self.version {
            return;
        }
        if state.entries.len() + keys.len() > MAX_ENTRIES {
            state.entries.clear();
        }
        for (key, value) in keys.iter().zip(values) {
            state.entries.insert(key.clone(), value.clone());
        }
        state.last_answer = Instant::now();
    }

    /// The read failed: the connection is not trusted until it is made again.
    pub fn failed(self) {
        lock(&self.cache.state).down(self.id);
    }
}

impl RevocationCache {
    /// Starts the cache and the task that keeps its connection to `client`'s server, until
    /// the returned value (and every clone of it) is dropped.
    pub fn start(client: &redis::Client, timeout: Duration) -> Arc<RevocationCache> {
        let cache = Arc::new(RevocationCache {
            state: Mutex::new(State {
                entries: HashMap::new(),
                version: 0,
                connection: None,
                last_answer: Instant::now(),
            }),
        });
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        match redis::Client::open(info) {
            Ok(client) => {
                tokio::spawn(keep(Arc::downgrade(&cache), client, timeout));
            }
            Err(error) => tracing::warn!(%error, "revocation cache off"),
        }
        cache
    }

    /// The values of `keys` if every one is cached and the cache is live; else `None`.
    pub fn get(&self, keys: &[String]) -> Option<Vec<Option<String>>> {
        let state = lock(&self.state);
        if !state.live(Instant::now()) {
            return None;
        }
        keys.iter().map(|k| state.entries.get(k).cloned()).collect()
    }

    /// A ticket to read over the tracking connection, when tracking is on.
    pub fn ticket(&self) -> Option<Ticket<'_>> {
        let state = lock(&self.state);
        if !state.live(Instant::now()) {
            return None;
        }
        let (id, connection) = state.connection.as_ref()?;
        Some(Ticket {
            cache: self,
            version: state.version,
            id: *id,
            connection: connection.clone(),
        })
    }

    /// Drops `key` (keycard itself just wrote it), and any read of it still in flight.
    pub fn forget(&self, key: &str) {
        let mut state = lock(&self.state);
        state.version += 1;
        state.entries.remove(key);
    }

    /// Whether entries are being served now (for tests and the debug view).
    pub fn is_live(&self) -> bool {
        lock(&self.state).live(Instant::now())
    }

    /// Applies a message Redis pushed on connection `id`.
    fn pushed(&self, id: u64, info: &PushInfo) {
        let mut state = lock(&self.state);
        match info.kind {
            PushKind::Invalidate => {
                state.version += 1;
                match info.data.first() {
                    Some(Value::Array(keys)) => {
                        for key in keys {
                            if let Ok(key) = redis::from_redis_value_ref::<String>(key) {
                                state.entries.remove(&key);
                            }
                        }
                    }
                    // `FLUSHALL`/`FLUSHDB`, or a form we do not know: forget everything.
                    _ => state.entries.clear(),
                }
            }
            PushKind::Disconnection => state.down(id),
            _ => {}
        }
    }
}

/// Keeps the tracking connection: connect, `CLIENT TRACKING ON`, then ping every
/// [`HEARTBEAT`]; on any failure turn the cache off, wait [`RETRY`] and start again. Ends when
/// the cache is dropped.
async fn keep(cache: Weak<RevocationCache>, client: redis::Client, timeout: Duration) {
    let mut id = 0u64;
    let mut warned = false;
    loop {
        id += 1;
        let pushes = cache.clone();
        let this = id;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_push_sender(move |info: PushInfo| {
                if let Some(cache) = pushes.upgrade() {
                    cache.pushed(this, &info);
                }
                Ok::<(), std::convert::Infallible>(())
            });
        let connected = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .query_async::<()>(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(conn)
        };
        match tokio::time::timeout(timeout, connected).await {
            Ok(Ok(conn)) => {
                let Some(strong) = cache.upgrade() else {
                    return;
                };
                {
                    let mut state = lock(&strong.state);
                    state.entries.clear();
                    state.version += 1;
                    state.connection = Some((id, conn.clone()));
                    state.last_answer = Instant::now();
                }
                drop(strong);
                tracing::info!("revocation cache on (Redis client tracking)");
                warned = false;
                heartbeat(&cache, id, conn, timeout).await;
                let Some(strong) = cache.upgrade() else {
                    return;
                };
                lock(&strong.state).down(id);
                tracing::warn!(
                    "revocation cache off: the tracking connection failed; checking Redis \
                     directly until it is back"
                );
            }
            Ok(Err(error)) if !warned => {
                warned = true;
                tracing::warn!(%error, "revocation cache off: cannot enable client tracking; checking Redis directly");
            }
            _ => {}
        }
        if cache.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Pings the tracking connection every [`HEARTBEAT`] until a ping fails or goes unanswered
/// for `timeout`, the connection is replaced, or the cache is dropped. (A late answer turns
/// the cache off by [`LIVENESS`] alone; only a failed one costs the connection.)
async fn heartbeat(
    cache: &Weak<RevocationCache>,
    id: u64,
    mut conn: MultiplexedConnection,
    timeout: Duration,
) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<()>(&mut conn);
        let answered = matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(())));
        let Some(cache) = cache.upgrade() else { return };
        let mut state = lock(&cache.state);
        if !answered || state.connection.as_ref().is_none_or(|(c, _)| *c != id) {
            return;
        }
        state.last_answer = Instant::now();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
