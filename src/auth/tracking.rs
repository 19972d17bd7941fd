//! Revocation cache: the per-request revocation check answered from memory, kept exact by
//! Redis itself (server-assisted client-side caching, RESP3 `CLIENT TRACKING`), with one
//! shared `PING` standing in for many requests' reads.
//!
//! The check reads the same few keys for every request of a session (`generation:<user>`,
//! `revoked:<jti>`, `family:<id>`), and they almost never change. So keycard keeps one extra
//! RESP3 connection with `CLIENT TRACKING ON`: a miss reads the keys over it with `MGET`,
//! which makes Redis remember that keycard read them, and the answer is kept here. When any
//! process writes one of those keys (a logout, `redis-cli SET ...revoked:<jti> 1`, an expiry,
//! `FLUSHALL`), Redis pushes an invalidation on that connection and the entry is dropped as
//! the connection reads it.
//!
//! **The fence.** An invalidation is sent when the write happens, but it still has to travel
//! and be read; a request that arrives right after the writer's reply could otherwise be
//! answered from the entry it is about to drop. So a cached answer is only used once a `PING`
//! *sent after the request arrived* has been answered on the tracking connection. Redis
//! executes that `PING` after any write that finished before the request arrived, and
//! answers on one connection in order, so every invalidation for such a write has been read
//! (and its entry dropped) before the `PONG`. One `PING` is shared by every request that
//! arrived while the one before it was in flight, so under load it costs a fraction of a read
//! per request; it also proves the link is alive, so a silent link (a partition, a hung
//! Redis) fails closed after `store.timeout` like a direct read.
//!
//! A read and an invalidation can also cross the other way: the `MGET` answer is handed to
//! the request while the connection goes on to read an invalidation of one of its keys.
//! Every invalidation and every change of connection bumps a counter, and an answer is only
//! stored if the counter has not moved since its `MGET` was sent, under the same lock.
//!
//! The cache is off (every request checked directly, as without it) until `CLIENT TRACKING
//! ON` succeeded, and from the moment the connection closes or a `PING` fails until a new one
//! is made; it starts empty each time. Redis Cluster and servers without `CLIENT TRACKING`
//! (or an ACL that forbids it) get no cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{Notify, watch};

/// How often the tracking connection is pinged when no request asks for a fence.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Most entries kept; past it the cache starts again empty (a flood of distinct tokens costs
/// at most this much memory, and then only direct checks).
const MAX_ENTRIES: usize = 100_000;

/// How long to wait before connecting again after the tracking connection failed.
const RETRY: Duration = Duration::from_secs(1);

/// The cache, shared by every request and the task that keeps the connection.
pub struct RevocationCache {
    state: Mutex<State>,
    /// Wakes the pinger: a request wants a fence.
    demand: Notify,
    /// The last `PING` answered (its number), and whether the connection is up.
    fence: watch::Sender<Fence>,
}

#[derive(Clone, Copy)]
struct Fence {
    answered: u64,
    up: bool,
}

impl std::fmt::Debug for RevocationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("RevocationCache")
            .field("up", &state.connection.is_some())
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
    /// How many `PING`s have been sent (numbered from 1).
    pings_sent: u64,
}

impl State {
    /// Empties the cache and turns it off (if `id` is the current connection's).
    fn down(&mut self, id: u64) -> bool {
        if self
            .connection
            .as_ref()
            .is_some_and(|(current, _)| *current == id)
        {
            self.connection = None;
            self.entries.clear();
            self.version += 1;
            return true;
        }
        false
    }
}

/// What the cache says about a set of keys.
pub enum Lookup<'a> {
    /// Their values, confirmed fresh by a fence.
    Hit(Vec<Option<String>>),
    /// Not all cached: read them over the tracking connection, then [`Ticket::store`].
    Miss(Ticket<'a>),
    /// The cache is off: read them directly.
    Off,
    /// The fence was not answered within the store's timeout.
    TimedOut,
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
    }

    /// The read failed: the connection is not trusted until it is made again.
    pub fn failed(self) {
        self.cache.down(self.id);
    }
}

impl RevocationCache {
    /// Starts the cache and the task that keeps its connection to `client`'s server, until
    /// the returned value (and every clone of it) is dropped. The connection is `client`'s
    /// (its TLS settings, user and password) switched to RESP3; each attempt to open it gets
    /// `connect_timeout` (`store.connect_timeout`), each command `timeout` (`store.timeout`).
    pub fn start(
        client: &redis::Client,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Arc<RevocationCache> {
        let cache = Arc::new(RevocationCache {
            state: Mutex::new(State {
                entries: HashMap::new(),
                version: 0,
                connection: None,
                pings_sent: 0,
            }),
            demand: Notify::new(),
            fence: watch::Sender::new(Fence {
                answered: 0,
                up: false,
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
                let timeouts = Timeouts {
                    connect: connect_timeout,
                    command: timeout,
                };
                tokio::spawn(keep(Arc::downgrade(&cache), client, timeouts));
            }
            Err(error) => tracing::warn!(%error, "revocation cache off"),
        }
        cache
    }

    /// Looks `keys` up: cached values once a fence confirms them (waiting at most
    /// `timeout`), else a ticket to read them over the tracking connection, else `Off`.
    pub async fn lookup(&self, keys: &[String], timeout: Duration) -> Lookup<'_> {
        let wanted = {
            let state = lock(&self.state);
            if state.connection.is_none() {
                return Lookup::Off;
            }
            if !keys.iter().all(|k| state.entries.contains_key(k)) {
                // A read sent now is fresh by itself: no fence needed.
                return self.ticket(&state);
            }
            // The first PING sent from now on.
            state.pings_sent + 1
        };
        self.demand.notify_one();
        let mut fence = self.fence.subscribe();
        let fenced =
            tokio::time::timeout(timeout, fence.wait_for(|f| !f.up || f.answered >= wanted)).await;
        match fenced {
            Ok(Ok(f)) if f.up => {}
            Ok(_) => return Lookup::Off,
            Err(_) => return Lookup::TimedOut,
        }
        // Invalidations read before the PONG have dropped their entries by now.
        let state = lock(&self.state);
        if state.connection.is_none() {
            return Lookup::Off;
        }
        match keys
            .iter()
            .map(|k| state.entries.get(k).cloned())
            .collect::<Option<Vec<_>>>()
        {
            Some(values) => Lookup::Hit(values),
            None => self.ticket(&state),
        }
    }

    fn ticket(&self, state: &State) -> Lookup<'_> {
        match &state.connection {
            Some((id, connection)) => Lookup::Miss(Ticket {
                cache: self,
                version: state.version,
                id: *id,
                connection: connection.clone(),
            }),
            None => Lookup::Off,
        }
    }

    /// Drops `key` (keycard itself just wrote it), and any read of it still in flight.
    pub fn forget(&self, key: &str) {
        let mut state = lock(&self.state);
        state.version += 1;
        state.entries.remove(key);
    }

    /// Whether tracking is on now (for tests and the debug view).
    pub fn is_on(&self) -> bool {
        lock(&self.state).connection.is_some()
    }

    /// Turns the cache off if `id` is the current connection, and releases fence waiters.
    fn down(&self, id: u64) {
        if lock(&self.state).down(id) {
            self.fence.send_modify(|f| f.up = false);
        }
    }

    /// Applies a message Redis pushed on connection `id`.
    fn pushed(&self, id: u64, info: &PushInfo) {
        match info.kind {
            PushKind::Invalidate => {
                let mut state = lock(&self.state);
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
            PushKind::Disconnection => self.down(id),
            _ => {}
        }
    }
}

/// `store.connect_timeout` and `store.timeout`, for the tracking connection.
#[derive(Clone, Copy)]
struct Timeouts {
    connect: Duration,
    command: Duration,
}

/// Keeps the tracking connection: connect, `CLIENT TRACKING ON`, then answer fences (and ping
/// every [`HEARTBEAT`] when none is asked for); on any failure turn the cache off, wait
/// [`RETRY`] and start again. Ends when the cache is dropped.
async fn keep(cache: Weak<RevocationCache>, client: redis::Client, timeouts: Timeouts) {
    let timeout = timeouts.command;
    let mut id = 0u64;
    let mut warned = false;
    loop {
        id += 1;
        let pushes = cache.clone();
        let this = id;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeouts.connect))
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
        // Connecting (TCP, TLS, HELLO) and then one command.
        match tokio::time::timeout(timeouts.connect + timeout, connected).await {
            Ok(Ok(conn)) => {
                let Some(strong) = cache.upgrade() else {
                    return;
                };
                {
                    let mut state = lock(&strong.state);
                    state.entries.clear();
                    state.version += 1;
                    state.connection = Some((id, conn.clone()));
                }
                strong.fence.send_modify(|f| f.up = true);
                drop(strong);
                tracing::info!("revocation cache on (Redis client tracking)");
                warned = false;
                fences(&cache, conn, timeout).await;
                let Some(strong) = cache.upgrade() else {
                    return;
                };
                strong.down(id);
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

/// Sends numbered `PING`s on the tracking connection: at once when a request waits for a
/// fence, else every [`HEARTBEAT`]; publishes each answer. Returns when a `PING` fails or
/// goes unanswered for `timeout`, or the cache is dropped.
async fn fences(cache: &Weak<RevocationCache>, mut conn: MultiplexedConnection, timeout: Duration) {
    loop {
        let number = {
            let Some(cache) = cache.upgrade() else {
                return;
            };
            let _ = tokio::time::timeout(HEARTBEAT, cache.demand.notified()).await;
            let mut state = lock(&cache.state);
            state.pings_sent += 1;
            state.pings_sent
        };
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<()>(&mut conn);
        let answered = matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(())));
        let Some(cache) = cache.upgrade() else {
            return;
        };
        if !answered {
            return;
        }
        cache
            .fence
            .send_modify(|f| f.answered = f.answered.max(number));
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
