//! Store: where users, revocations and the login throttle's counters live.
//!
//! One type, three backends: standalone Redis and Redis Cluster (`redis+cluster://`) for
//! anything shared between replicas, and an embedded map (`memory://`) for `keycard dev` and
//! single-instance use. This is the only file that knows Redis exists. Every operation is one
//! round trip (on a cluster the throttle's are one per subject, see [`Store::groups`]) and is
//! bounded by `store.timeout`, so a hung Redis turns into a quick 503 instead of a hung request.
//!
//! Key layout (all under `store.prefix`, default `keycard:`):
//! - `<prefix>generation:<username>` — integer, the user's session generation; `INCR` by
//!   `/logout?all=true` and `keycard user revoke`. No TTL.
//! - `<prefix>family:<id>` — `"1"`, a revoked refresh family, TTL the refresh lifetime.
//! - `<prefix>user:<username>` — string, JSON `{"phc": argon2id PHC hash, "roles": [...]}`
//!   (a bare PHC string, the older form, reads as no roles); written with `SET NX`.
//! - `<prefix>revoked:<jti>` — string `1`, expiring when the token would have.
//! - `<prefix>throttle:user:<username>` and `<prefix>throttle:addr:<ip>` — failed-attempt
//!   counters (`INCR`), expiring at the end of their window.
//! - `<prefix>throttle:pending:user:<username>` and `<prefix>throttle:pending:addr:<ip>` —
//!   attempts in flight, given back when each ends (see [`Subject`]).
//!
//! On a Redis Cluster, and only there, the username or address in the `user:`,
//! `generation:` and `throttle:` keys is a hash tag: `<prefix>user:{alice}`,
//! `<prefix>throttle:pending:addr:{10.0.0.7}` (see [`Store::tagged_key`]), so the keys one
//! script touches share a slot. `revoked:<jti>` (the contract's name: operators write it with
//! `redis-cli`) and `family:<id>` are unchanged. Standalone Redis keeps exactly the names
//! above, so existing deployments need no migration; a cluster deployment is new and starts
//! without keys, so there are no untagged ones to move.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use crate::auth::tracking::{Lookup, RevocationCache};
use crate::config::{StoreConfig, StoreUrl};
use crate::metrics::{Metrics, StoreOp, ThrottleSubject};

/// Why a store operation failed. Every variant means "could not find out", so callers fail
/// closed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or the connection broke.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered with something other than what the command returns.
    #[error("redis: unexpected reply: {0}")]
    Reply(#[from] redis::ParsingError),
    /// No answer within `store.timeout`.
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    /// A Redis Cluster store was opened outside a tokio runtime (its connection task needs
    /// one); a programming error, reported rather than panicking.
    #[error("a redis+cluster:// store needs a tokio runtime to connect")]
    NoRuntime,
}

/// How long an attempt's reservation lives if keycard dies before releasing it. An attempt
/// ends far sooner (the hash queue and the store each time out within seconds); this only
/// bounds what a crash can leave behind.
const RESERVATION_TTL: Duration = Duration::from_secs(120);

/// How often the embedded store drops expired entries (throttle counters, revocations).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// One throttled subject of an attempt: a client address or a username, with its limit.
///
/// Two counters per subject: *failures* (`<prefix>throttle:<kind>:<name>`), which live for
/// the window, and *attempts in flight* (`<prefix>throttle:pending:<kind>:<name>`). A new
/// attempt goes ahead only while failures plus attempts in flight stay below the limit, so
/// N parallel guesses still get exactly `limit` tries; but only a failed password ever
/// becomes a failure, so parallel correct logins never lock anyone out.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The address or username: on a Redis Cluster the hash tag of both keys, and how
    /// [`Store::begin_attempt`] knows which subject the user record shares a slot with.
    name: String,
    failures: String,
    pending: String,
    limit: u64,
    window: Duration,
    /// Whether a success forgets this subject's failures (the username's: the real user is
    /// not locked out by their own typos; never the address's, or one good account would
    /// reset a password spray's counter).
    clear_on_success: bool,
    /// Which throttle this is, for `keycard_throttle_hits_total`.
    kind: ThrottleSubject,
}

/// What the throttle says about a new attempt.
#[derive(Debug)]
pub enum Attempt {
    /// The attempt is reserved and may go ahead; end it with [`Reservation::end`].
    Go {
        /// The user's PHC hash, read in the same round trip (logins only; `None` when the
        /// user does not exist or no user was asked for).
        hash: Option<String>,
        /// The attempt's place under every subject's limit.
        reservation: Reservation,
    },
    /// Too many failures in the window; nothing was counted.
    Throttled {
        /// Until the later of the exhausted windows ends.
        retry_after: Duration,
    },
    /// Failures plus attempts in flight reach a limit; nothing was counted. Clears by itself
    /// as the attempts in flight end.
    Busy,
}

/// An attempt's reservation under its subjects' limits. End it with [`Reservation::end`];
/// dropped unended (the attempt failed before it was decided: no hashing slot, a store error)
/// it is given back in the background, so such an attempt never holds a user's or an
/// address's place. (A client that hangs up does not drop it: the endpoint decides the
/// attempt in its own task.)
#[derive(Debug)]
pub struct Reservation {
    store: Store,
    subjects: Vec<Subject>,
    ended: bool,
}

impl Reservation {
    /// Records how the attempt ended: a failure (a wrong password, a taken name) is counted
    /// against every subject; a success counts nothing and clears the failures of subjects
    /// that ask for it (the username's).
    pub async fn end(mut self, succeeded: bool) -> Result<(), StoreError> {
        self.ended = true;
        let outcome = if succeeded {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        };
        self.store.end_attempt(&self.subjects, outcome).await
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let store = self.store.clone();
        let subjects = std::mem::take(&mut self.subjects);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = store.end_attempt(&subjects, Outcome::Abandoned).await {
                    tracing::warn!(%error, "could not give back an abandoned login reservation");
                }
            });
        }
    }
}

/// Begins an attempt, atomically. KEYS: per subject a (failures, pending) pair, then
/// optionally the user key whose value (the hash) is returned. ARGV: per subject its limit
/// (0 = no limit), then the reservation TTL in ms. Counts nothing unless every subject has
/// room. Returns { verdict (0 go, 1 throttled, 2 busy), retry-after ms, hash or false, which
/// subjects refused (bit i-1 for subject i) }.
const BEGIN_SCRIPT: &str = r"
local subjects = #ARGV - 1
local throttled_ms, throttled, busy = -1, 0, 0
for i = 1, subjects do
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    local failed = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
    local pending = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
    if failed >= limit then
      throttled_ms = math.max(throttled_ms, redis.call('PTTL', KEYS[2 * i - 1]))
      throttled = throttled + 2 ^ (i - 1)
    elseif failed + math.max(pending, 0) >= limit then
      busy = busy + 2 ^ (i - 1)
    end
  end
end
if throttled_ms >= 0 then return { 1, throttled_ms, false, throttled } end
if busy > 0 then return { 2, 0, false, busy } end
for i = 1, subjects do
  redis.call('INCR', KEYS[2 * i])
  redis.call('PEXPIRE', KEYS[2 * i], ARGV[subjects + 1])
end
local hash = false
if #KEYS > 2 * subjects then hash = redis.call('GET', KEYS[#KEYS]) or false end
return { 0, 0, hash, 0 }
";

/// Ends an attempt begun with [`BEGIN_SCRIPT`]. KEYS: the same (failures, pending) pairs.
/// ARGV: outcome (`fail`, `ok` or `release`), then per subject its window in ms and whether
/// a success clears its failures (1/0). A failure is counted with the window's expiry set on
/// first use; a release (the request was abandoned) only gives the reservation back.
const END_SCRIPT: &str = r"
local outcome = ARGV[1]
for i = 1, #KEYS / 2 do
  local failures, pending = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('DECR', pending) <= 0 then redis.call('DEL', pending) end
  if outcome == 'fail' then
    redis.call('INCR', failures)
    if redis.call('PTTL', failures) < 0 then
      redis.call('PEXPIRE', failures, ARGV[2 * i])
    end
  elseif outcome == 'ok' and ARGV[2 * i + 1] == '1' then
    redis.call('DEL', failures)
  end
end
return 1
";

/// What beginning an attempt on one group of subjects said: the verdict (0 go, 1 throttled,
/// 2 busy), the retry-after, the user's hash, and which subjects refused (bit `i` for the
/// group's subject `i`).
type Begun = (u8, Duration, Option<String>, u64);

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The password was right (or the registration succeeded): nothing is counted.
    Succeeded,
    /// A wrong password, or a registration for a name that exists: one failure per subject.
    Failed,
    /// The request was abandoned before it was decided: the reservation is given back.
    Abandoned,
}

impl Outcome {
    fn as_arg(self) -> &'static str {
        match self {
            Outcome::Succeeded => "ok",
            Outcome::Failed => "fail",
            Outcome::Abandoned => "release",
        }
    }
}

/// Handle to the configured store; cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    prefix: Arc<str>,
    timeout: Duration,
    /// Answers of the revocation check kept exact by Redis client tracking (standalone Redis
    /// only, once [`Store::with_revocation_cache`] started it).
    revocations: Option<Arc<RevocationCache>>,
    /// Where call latencies and throttle hits are recorded (the gateway's store; one-shot CLI
    /// commands have none).
    metrics: Option<Arc<Metrics>>,
}

/// A stored user: the password hash and the roles tokens will carry.
///
/// Stored as JSON (`{"phc":"$argon2id$...","roles":["admin"]}`). A bare PHC string, what
/// keycard stored before users had roles, still reads as a user with no roles.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserRecord {
    /// The argon2id PHC string.
    pub phc: String,
    /// Role names, in the order given.
    #[serde(default)]
    pub roles: Vec<String>,
}

impl UserRecord {
    /// The stored form.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads either stored form; `None` for anything else.
    pub fn decode(value: &str) -> Option<UserRecord> {
        if value.starts_with('{') {
            serde_json::from_str(value).ok()
        } else {
            Some(UserRecord {
                phc: value.to_owned(),
                roles: Vec::new(),
            })
        }
    }
}

#[derive(Clone)]
enum Backend {
    /// Redis, standalone or a cluster: every command goes through [`Remote`].
    Redis(Remote),
    Memory(Arc<Mutex<MemoryMap>>),
}

/// The two kinds of Redis connection, behind one [`redis::aio::ConnectionLike`] so that each
/// store operation has one code path. What differs is only the key layout (see
/// [`Store::tagged_key`]) and what cannot be one call on a cluster (the throttle's script, a
/// `SCAN`).
#[derive(Clone)]
enum Remote {
    /// Standalone Redis: a single multiplexed connection that reconnects by itself.
    Single(ConnectionManager),
    /// A Redis Cluster: a connection per node, each command sent to the master of its keys'
    /// slot, following `MOVED`/`ASK` and re-reading the slot map after a failover.
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Remote {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Remote::Single(conn) => conn.req_packed_command(cmd),
            Remote::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Remote::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Remote::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Remote::Single(conn) => conn.get_db(),
            Remote::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The embedded backend: values with optional deadlines. Expired entries read as missing
/// and are dropped every [`SWEEP_EVERY`] by a background task, so counters a flood of
/// addresses or names creates do not pile up.
#[derive(Default)]
struct MemoryMap {
    entries: HashMap<String, (String, Option<Instant>)>,
}

impl MemoryMap {
    fn live(&self, key: &str, now: Instant) -> Option<&String> {
        match self.entries.get(key) {
            Some((value, deadline)) if deadline.is_none_or(|d| d > now) => Some(value),
            _ => None,
        }
    }

    fn count(&self, key: &str, now: Instant) -> i64 {
        self.live(key, now)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Time until `key` expires (zero when missing or without expiry).
    fn ttl(&self, key: &str, now: Instant) -> Duration {
        match self.entries.get(key) {
            Some((_, Some(deadline))) => deadline.saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    /// Adds `by` to a live counter (a missing one starts at 0), keeping its deadline unless
    /// `deadline` replaces it; a counter that falls to 0 or below is removed.
    fn add(&mut self, key: &str, by: i64, deadline: Option<Instant>, now: Instant) {
        let count = self.count(key, now) + by;
        if count <= 0 {
            self.entries.remove(key);
            return;
        }
        let kept = match self.entries.get(key) {
            Some((_, d)) if self.live(key, now).is_some() => *d,
            _ => None,
        };
        self.entries
            .insert(key.to_owned(), (count.to_string(), deadline.or(kept)));
    }

    /// [`BEGIN_SCRIPT`], for the embedded store.
    fn begin(&mut self, subjects: &[Subject], user_key: Option<&str>) -> Begun {
        let now = Instant::now();
        let mut throttled: Option<Duration> = None;
        let (mut throttled_by, mut busy_by) = (0u64, 0u64);
        for (i, s) in subjects.iter().enumerate().filter(|(_, s)| s.limit > 0) {
            let limit = i64::try_from(s.limit).unwrap_or(i64::MAX);
            let failed = self.count(&s.failures, now);
            let bit = 1u64.checked_shl(i as u32).unwrap_or(0);
            if failed >= limit {
                throttled = throttled.max(Some(self.ttl(&s.failures, now)));
                throttled_by |= bit;
            } else if failed + self.count(&s.pending, now).max(0) >= limit {
                busy_by |= bit;
            }
        }
        if let Some(retry_after) = throttled {
            return (1, retry_after, None, throttled_by);
        }
        if busy_by != 0 {
            return (2, Duration::ZERO, None, busy_by);
        }
        for s in subjects {
            self.add(&s.pending, 1, Some(now + RESERVATION_TTL), now);
        }
        let hash = user_key.and_then(|k| self.live(k, now).cloned());
        (0, Duration::ZERO, hash, 0)
    }

    /// [`END_SCRIPT`], for the embedded store.
    fn end(&mut self, subjects: &[Subject], outcome: Outcome) {
        let now = Instant::now();
        for s in subjects {
            self.add(&s.pending, -1, None, now);
            match outcome {
                Outcome::Failed => {
                    let fresh = self.live(&s.failures, now).is_none();
                    self.add(&s.failures, 1, fresh.then(|| now + s.window), now);
                }
                Outcome::Succeeded if s.clear_on_success => {
                    self.entries.remove(&s.failures);
                }
                _ => {}
            }
        }
    }

    /// `SET key value NX [PX ttl]`: true when written.
    fn set_nx(&mut self, key: &str, value: &str, ttl: Option<Duration>) -> bool {
        let now = Instant::now();
        if self.live(key, now).is_some() {
            return false;
        }
        self.entries
            .insert(key.to_owned(), (value.to_owned(), ttl.map(|t| now + t)));
        true
    }

    /// Drops every expired entry.
    fn sweep(&mut self) {
        let now = Instant::now();
        self.entries
            .retain(|_, (_, deadline)| deadline.is_none_or(|d| d > now));
    }
}

/// A client for the standalone Redis at `url` (user and password, if any, written in it).
/// `rediss://` is TLS, verified against the public roots built in (webpki-roots) or, with
/// `store.ca_file`, against that CA only; the server's name (or IP) must be in its
/// certificate either way: this build cannot turn verification off (redis-rs's
/// `tls-rustls-insecure` feature is not enabled, and the config refuses `#insecure`).
fn client(url: &str, config: &StoreConfig) -> Result<redis::Client, StoreError> {
    if !url.starts_with("rediss://") {
        return Ok(redis::Client::open(url)?);
    }
    use_ring_for_tls();
    match &config.ca {
        Some(ca) => Ok(redis::Client::build_with_tls(url, certificates(ca))?),
        None => Ok(redis::Client::open(url)?),
    }
}

/// `store.ca_file`'s certificates as redis-rs wants them: trust anchors, no client
/// certificate.
fn certificates(ca: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.to_vec()),
    }
}

/// redis-rs builds its rustls config with the process's default crypto provider. keycard's
/// tree enables only ring today, which rustls then picks by itself; installing it explicitly
/// keeps a future dependency that also enables aws-lc-rs from turning every TLS connect into
/// a panic. (Installing twice is a no-op error, ignored.)
fn use_ring_for_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Sweeps the embedded store every `every` for as long as the store exists (the task holds
/// only a weak reference). Without a runtime (a unit test building a store by hand) nothing
/// is spawned; reads still treat expired entries as missing.
fn spawn_sweeper(map: &Arc<Mutex<MemoryMap>>, every: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let map = Arc::downgrade(map);
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(map) = map.upgrade() else { return };
            lock(&map).sweep();
        }
    });
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backend {
            Backend::Redis(Remote::Single(_)) => "redis",
            Backend::Redis(Remote::Cluster(_)) => "redis cluster",
            Backend::Memory(_) => "memory",
        };
        f.debug_struct("Store")
            .field("backend", &kind)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Store {
    /// Opens the configured store. Redis (standalone or cluster) connects lazily, so keycard
    /// starts (and `/readyz` reports 503) while Redis is still coming up, and reconnects on
    /// its own afterwards.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let backend = match &config.url {
            StoreUrl::Memory => {
                tracing::warn!(
                    "store is memory://: users and revocations live in this process only and are \
                     not shared with other replicas"
                );
                let map = Arc::default();
                spawn_sweeper(&map, SWEEP_EVERY);
                Backend::Memory(map)
            }
            StoreUrl::Redis(url) => {
                let client = client(url, config)?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Backend::Redis(Remote::Single(ConnectionManager::new_lazy_with_config(
                    client,
                    manager_config,
                )?))
            }
            StoreUrl::Cluster(nodes) => {
                // The connection task is spawned on the current runtime; without one the
                // cluster client would panic, so say so instead.
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(StoreError::NoRuntime);
                }
                // Each try connects within `store.connect_timeout` and is answered within
                // `store.timeout`; the whole command with its retries and redirections stays
                // within `store.timeout`, as `query` enforces.
                let mut builder =
                    redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                        .connection_timeout(config.connect_timeout)
                        .response_timeout(config.timeout)
                        .retries(3)
                        .max_retry_wait(500);
                if config.url.is_tls() {
                    use_ring_for_tls();
                }
                // `rediss://` seed nodes make every node connection TLS (redis-rs takes the
                // mode from the first node); the CA, when given, replaces the public roots.
                if let Some(ca) = &config.ca {
                    builder = builder.certs(certificates(ca));
                }
                let client = builder.build()?;
                let cluster_config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(config.connect_timeout)
                    .set_response_timeout(config.timeout);
                // Pending: the nodes are connected in the background, like the standalone
                // `new_lazy_with_config`; until then commands fail (503) rather than startup.
                Backend::Redis(Remote::Cluster(
                    client.get_pending_async_connection_with_config(cluster_config),
                ))
            }
        };
        Ok(Store {
            backend,
            prefix: config.prefix.as_str().into(),
            timeout: config.timeout,
            revocations: None,
            metrics: None,
        })
    }

    /// Records this store's call latencies (`keycard_store_duration_seconds`) and throttle
    /// refusals (`keycard_throttle_hits_total`) in `metrics`, for it and its clones.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Store {
        self.metrics = Some(metrics);
        self
    }

    /// Runs one store call, recording how long it took as `op` (when it ran to the end: a
    /// call cancelled with its request says nothing about the store).
    async fn timed<T>(&self, op: StoreOp, call: impl Future<Output = T>) -> T {
        let Some(metrics) = &self.metrics else {
            return call.await;
        };
        let started = Instant::now();
        let result = call.await;
        metrics.store(op, started.elapsed());
        result
    }

    /// Starts the revocation cache (see [`crate::auth::tracking`]) on standalone Redis; other
    /// stores are returned unchanged. The gateway calls this; one-shot CLI commands do not.
    pub fn with_revocation_cache(mut self, config: &StoreConfig) -> Result<Store, StoreError> {
        match &config.url {
            StoreUrl::Redis(url) => {
                // The same client as the store's: the tracking connection gets the same TLS
                // settings and the same ACL user as every other connection.
                let client = client(url, config)?;
                self.revocations = Some(RevocationCache::start(
                    &client,
                    config.connect_timeout,
                    config.timeout,
                ));
            }
            StoreUrl::Cluster(_) => tracing::info!(
                "revocation cache off on Redis Cluster: every request is checked in Redis"
            ),
            StoreUrl::Memory => {}
        }
        Ok(self)
    }

    /// Whether the revocation cache's tracking connection is up now.
    pub fn revocation_cache_on(&self) -> bool {
        self.revocations.as_ref().is_some_and(|c| c.is_on())
    }

    /// Runs one Redis command on the shared connection (either kind), bounded by
    /// `store.timeout`.
    async fn query<T: redis::FromRedisValue, C: redis::aio::ConnectionLike + Clone>(
        &self,
        conn: &C,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = conn.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async(&mut conn)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Like [`Store::query`], but on a cluster sent to the node `node` (host, port) rather
    /// than routed by key: what a `SCAN` of one master needs. Standalone ignores `node`.
    async fn query_node<T: redis::FromRedisValue>(
        &self,
        conn: &Remote,
        cmd: &redis::Cmd,
        node: Option<&(String, u16)>,
    ) -> Result<T, StoreError> {
        let (Remote::Cluster(cluster), Some((host, port))) = (conn, node) else {
            return self.query(conn, cmd).await;
        };
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.clone(),
            port: *port,
        });
        let mut cluster = cluster.clone();
        let sent = cluster.route_command(cmd.clone(), routing);
        match tokio::time::timeout(self.timeout, sent).await {
            Ok(value) => Ok(redis::from_redis_value(value?)?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Whether keys are laid out for a Redis Cluster (see [`Store::tagged_key`]).
    fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Redis(Remote::Cluster(_)))
    }

    /// `<prefix><kind><name>`: for keys that live alone (`revoked:`, `family:`).
    fn key(&self, kind: &str, name: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + kind.len() + name.len() + 2);
        key.push_str(&self.prefix);
        key.push_str(kind);
        key.push_str(name);
        key
    }

    /// A key of one user's (or one address's) group: `<prefix><kind><name>`, and on a Redis
    /// Cluster `<prefix><kind>{<name>}`, so that the hash tag puts every key of the group in
    /// one slot and a script can touch them together. Standalone keeps the untagged names, so
    /// existing deployments need no migration. (Names cannot hold braces: usernames are
    /// `A-Z a-z 0-9 . _ @ -`, addresses are IPs, and a cluster's prefix may not have them.)
    fn tagged_key(&self, kind: &str, name: &str) -> String {
        if !self.is_cluster() {
            return self.key(kind, name);
        }
        let mut key = self.key(kind, "{");
        key.push_str(name);
        key.push('}');
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

    /// Creates a user; false when the name is taken.
    pub async fn create_user(&self, username: &str, user: &UserRecord) -> Result<bool, StoreError> {
        let key = self.tagged_key("user:", username);
        self.timed(StoreOp::UserCreate, self.set_nx(&key, &user.encode(), None))
            .await
    }

    /// The user `username`, if there is one.
    pub async fn get_user(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let key = self.tagged_key("user:", username);
        let value: Option<String> = self
            .timed(StoreOp::UserLookup, async {
                match &self.backend {
                    Backend::Redis(conn) => self.query(conn, redis::cmd("GET").arg(&key)).await,
                    Backend::Memory(map) => Ok(lock(map).live(&key, Instant::now()).cloned()),
                }
            })
            .await?;
        Ok(value.as_deref().and_then(UserRecord::decode))
    }

    /// Revokes a `jti` for `ttl` (the token's remaining life). Returns false when it was
    /// already revoked, which makes refresh-token rotation single-use even under a race.
    ///
    /// An empty `jti` (another issuer's token without one) revokes nothing: `revoked:` alone
    /// would otherwise stand for every such token at once.
    pub async fn revoke(&self, jti: &str, ttl: Duration) -> Result<bool, StoreError> {
        if jti.is_empty() {
            return Ok(false);
        }
        let key = self.key("revoked:", jti);
        let written = self
            .timed(StoreOp::Revoke, self.set_nx(&key, "1", Some(ttl)))
            .await;
        self.forget(&key);
        written
    }

    /// Rotates a refresh token: revokes `jti` like [`Store::revoke`], true when this call did
    /// it. When the answer is lost (the store timed out), the write may still land later, and
    /// the client, told 503, would retry and be taken for a thief replaying a rotated token
    /// (its whole family revoked). So the write carries a value of its own, and after a lost
    /// answer it is taken back: a compare-and-delete sent on the same connection, which Redis
    /// runs after the write if the write ever runs. A revocation someone else wrote (a logout)
    /// has another value and stays.
    pub async fn rotate(&self, jti: &str, ttl: Duration) -> Result<bool, StoreError> {
        if jti.is_empty() {
            return Ok(false);
        }
        let key = self.key("revoked:", jti);
        // Any value but a logout's "1", told apart from a racing rotation of the same token.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mark = format!("rotated-{nanos:x}");
        let written = self
            .timed(StoreOp::Revoke, self.set_nx(&key, &mark, Some(ttl)))
            .await;
        self.forget(&key);
        if written.is_err()
            && let Backend::Redis(conn) = &self.backend
        {
            let (store, conn) = (self.clone(), conn.clone());
            tokio::spawn(async move {
                let mut undo = redis::cmd("EVAL");
                undo.arg(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                     return redis.call('DEL', KEYS[1]) end return 0",
                )
                .arg(1)
                .arg(&key)
                .arg(&mark);
                let undone: Result<i64, _> = store.query(&conn, &undo).await;
                store.forget(&key);
                if let Err(error) = undone {
                    tracing::warn!(%error, "cannot take back a refresh rotation whose answer was lost");
                }
            });
        }
        written
    }

    /// Drops `key` from the revocation cache after keycard wrote it: this process's own
    /// revocations apply to its next request without waiting for Redis's invalidation.
    fn forget(&self, key: &str) {
        if let Some(cache) = &self.revocations {
            cache.forget(key);
        }
    }

    /// Whether a token is no longer good: its `jti` revoked, its user's generation moved past
    /// the token's (`/logout?all=true`), or its refresh family revoked (a rotated refresh
    /// token was used again). One `MGET`: the only store call on the proxied path, one round
    /// trip.
    /// `jti` `None` checks the session only.
    pub async fn is_revoked(
        &self,
        jti: Option<&str>,
        user: &str,
        generation: u64,
        family: &str,
    ) -> Result<bool, StoreError> {
        // generation first, then the others that apply: any of them present means revoked.
        let mut keys = vec![self.tagged_key("generation:", user)];
        if let Some(jti) = jti.filter(|j| !j.is_empty()) {
            keys.push(self.key("revoked:", jti));
        }
        if !family.is_empty() {
            keys.push(self.key("family:", family));
        }
        // On a cluster these keys are in different slots (the generation is tagged with the
        // user, a revocation is not): redis-rs routes `MGET` as a multi-slot command, sending
        // one `MGET` per slot's node at once and putting the answers back in key order
        // (`MultipleNodeRoutingInfo::MultiSlot` in its cluster_routing), so this stays one
        // call here and one round trip's time there.
        let values: Vec<Option<String>> = self
            .timed(StoreOp::RevocationCheck, async {
                match &self.backend {
                    Backend::Redis(conn) => self.read_revocations(conn, &keys).await,
                    Backend::Memory(map) => {
                        let map = lock(map);
                        let now = Instant::now();
                        Ok(keys.iter().map(|k| map.live(k, now).cloned()).collect())
                    }
                }
            })
            .await?;
        let current: u64 = values
            .first()
            .and_then(|v| v.as_deref()?.parse().ok())
            .unwrap_or(0);
        Ok(current > generation || values.iter().skip(1).any(Option::is_some))
    }

    /// `MGET keys` for the revocation check: from the revocation cache when it has them all
    /// (confirmed by a fence, see [`crate::auth::tracking`]), else over its tracking
    /// connection (which keeps what it read), else directly. A tracking connection that fails
    /// is turned off and the read made directly, except on a timeout (Redis itself is slow:
    /// one timeout is enough).
    async fn read_revocations(
        &self,
        conn: &Remote,
        keys: &[String],
    ) -> Result<Vec<Option<String>>, StoreError> {
        let mut mget = redis::cmd("MGET");
        mget.arg(keys);
        if let Some(cache) = &self.revocations {
            match cache.lookup(keys, self.timeout).await {
                Lookup::Hit(values) => return Ok(values),
                Lookup::TimedOut => return Err(StoreError::Timeout(self.timeout)),
                Lookup::Off => {}
                Lookup::Miss(ticket) => {
                    let read: Result<Vec<Option<String>>, _> =
                        self.query(&ticket.connection, &mget).await;
                    match read {
                        Ok(values) => {
                            ticket.store(keys, &values);
                            return Ok(values);
                        }
                        Err(error) => {
                            ticket.failed();
                            if matches!(error, StoreError::Timeout(_)) {
                                return Err(error);
                            }
                        }
                    }
                }
            }
        }
        self.query(conn, &mget).await
    }

    /// Replaces `username`'s roles; false when there is no such user. (Read, change, write:
    /// two operators changing one user at once could lose one change; `keycard user roles`
    /// is an operator's tool, not a request path.)
    pub async fn set_roles(&self, username: &str, roles: &[String]) -> Result<bool, StoreError> {
        let Some(mut user) = self.get_user(username).await? else {
            return Ok(false);
        };
        user.roles = roles.to_vec();
        let key = self.tagged_key("user:", username);
        match &self.backend {
            Backend::Redis(conn) => {
                let cmd = redis::cmd("SET")
                    .arg(&key)
                    .arg(user.encode())
                    .arg("XX")
                    .clone();
                let reply: Option<String> = self.query(conn, &cmd).await?;
                Ok(reply.is_some())
            }
            Backend::Memory(map) => {
                lock(map).entries.insert(key, (user.encode(), None));
                Ok(true)
            }
        }
    }

    /// Deletes `username`; false when there was no such user.
    pub async fn delete_user(&self, username: &str) -> Result<bool, StoreError> {
        let key = self.tagged_key("user:", username);
        match &self.backend {
            Backend::Redis(conn) => {
                let n: u64 = self.query(conn, redis::cmd("DEL").arg(&key)).await?;
                Ok(n > 0)
            }
            Backend::Memory(map) => Ok(lock(map).entries.remove(&key).is_some()),
        }
    }

    /// Every user with its roles, sorted by name. `SCAN` walks one node's keys, so on a
    /// cluster every master is scanned in turn (read from `CLUSTER SLOTS`).
    pub async fn list_users(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        // On a cluster the name sits in a hash tag: `<prefix>user:{alice}`.
        let prefix = self.key("user:", if self.is_cluster() { "{" } else { "" });
        let suffix = if self.is_cluster() { "}" } else { "" };
        let mut users = Vec::new();
        match &self.backend {
            Backend::Redis(conn) => {
                let nodes = match conn {
                    Remote::Single(_) => vec![None],
                    Remote::Cluster(_) => self.masters(conn).await?.into_iter().map(Some).collect(),
                };
                for node in &nodes {
                    let mut cursor = 0u64;
                    loop {
                        let mut cmd = redis::cmd("SCAN");
                        cmd.arg(cursor)
                            .arg("MATCH")
                            .arg(format!("{prefix}*{suffix}"))
                            .arg("COUNT")
                            .arg(500);
                        let (next, keys): (u64, Vec<String>) =
                            self.query_node(conn, &cmd, node.as_ref()).await?;
                        for key in keys {
                            let Some(name) = key
                                .strip_prefix(prefix.as_str())
                                .and_then(|k| k.strip_suffix(suffix))
                            else {
                                continue;
                            };
                            if let Some(user) = self.get_user(name).await? {
                                users.push((name.to_owned(), user.roles));
                            }
                        }
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
            Backend::Memory(map) => {
                let map = lock(map);
                for (key, (value, _)) in &map.entries {
                    if let (Some(name), Some(user)) =
                        (key.strip_prefix(&prefix), UserRecord::decode(value))
                    {
                        users.push((name.to_owned(), user.roles));
                    }
                }
            }
        }
        users.sort();
        // A key seen twice (a slot moving between masters during the scan) is one user.
        users.dedup_by(|a, b| a.0 == b.0);
        Ok(users)
    }

    /// A cluster's masters, as (host, port): the first address of each slot range in
    /// `CLUSTER SLOTS`, once each.
    async fn masters(&self, conn: &Remote) -> Result<Vec<(String, u16)>, StoreError> {
        let ranges: Vec<Vec<redis::Value>> = self
            .query(conn, &redis::cmd("CLUSTER").arg("SLOTS").clone())
            .await?;
        let mut masters = Vec::new();
        for range in ranges {
            // [start, end, [host, port, id, ...], replicas...]
            let Some(redis::Value::Array(master)) = range.get(2) else {
                continue;
            };
            let (Some(host), Some(port)) = (master.first(), master.get(1)) else {
                continue;
            };
            let node: (String, u16) = (
                redis::from_redis_value_ref(host)?,
                redis::from_redis_value_ref(port)?,
            );
            if !masters.contains(&node) {
                masters.push(node);
            }
        }
        Ok(masters)
    }

    /// The user's session generation: tokens issued now carry it.
    pub async fn generation(&self, user: &str) -> Result<u64, StoreError> {
        let key = self.tagged_key("generation:", user);
        let value: Option<String> = self
            .timed(StoreOp::Generation, async {
                match &self.backend {
                    Backend::Redis(conn) => self.query(conn, redis::cmd("GET").arg(&key)).await,
                    Backend::Memory(map) => Ok(lock(map).live(&key, Instant::now()).cloned()),
                }
            })
            .await?;
        Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// Ends every session of `user`: tokens issued before carry a lower generation and are
    /// refused; tokens issued after carry the new one and work at once.
    pub async fn end_all_sessions(&self, user: &str) -> Result<u64, StoreError> {
        let key = self.tagged_key("generation:", user);
        self.timed(StoreOp::EndSessions, async {
            match &self.backend {
                Backend::Redis(conn) => {
                    let generation = self.query(conn, redis::cmd("INCR").arg(&key)).await;
                    self.forget(&key);
                    generation
                }
                Backend::Memory(map) => {
                    let mut map = lock(map);
                    let now = Instant::now();
                    map.add(&key, 1, None, now);
                    Ok(map.count(&key, now) as u64)
                }
            }
        })
        .await
    }

    /// Revokes a refresh family for `ttl` (the longest a token of it can live): every access
    /// and refresh token descended from one login.
    pub async fn revoke_family(&self, family: &str, ttl: Duration) -> Result<(), StoreError> {
        if !family.is_empty() {
            let key = self.key("family:", family);
            let written = self
                .timed(StoreOp::RevokeFamily, self.set_nx(&key, "1", Some(ttl)))
                .await;
            self.forget(&key);
            written?;
        }
        Ok(())
    }

    /// A throttle subject: `kind` is `user` or `addr`.
    pub fn subject(
        &self,
        kind: &str,
        name: &str,
        limit: u64,
        window: Duration,
        clear_on_success: bool,
    ) -> Subject {
        let failures = self.tagged_key(&format!("throttle:{kind}:"), name);
        let pending = self.tagged_key(&format!("throttle:pending:{kind}:"), name);
        Subject {
            name: name.to_owned(),
            failures,
            pending,
            limit,
            window,
            clear_on_success,
            kind: if kind == "user" {
                ThrottleSubject::User
            } else {
                ThrottleSubject::Address
            },
        }
    }

    /// Begins an attempt against `subjects` (address first), and reads `user`'s hash with it
    /// when asked. Nothing is counted unless every subject has room; see [`Subject`] for the
    /// rule. One atomic round trip on standalone Redis and in memory; on a cluster one per
    /// subject (see [`Store::groups`]), a refusal giving back what the earlier ones reserved.
    pub async fn begin_attempt(
        &self,
        subjects: Vec<Subject>,
        user: Option<&str>,
    ) -> Result<Attempt, StoreError> {
        self.timed(StoreOp::ThrottleBegin, self.begin_groups(subjects, user))
            .await
    }

    /// [`Store::begin_attempt`], group by group; counts each subject that refuses in
    /// `keycard_throttle_hits_total`.
    async fn begin_groups(
        &self,
        subjects: Vec<Subject>,
        user: Option<&str>,
    ) -> Result<Attempt, StoreError> {
        let user_key = user.map(|u| self.tagged_key("user:", u));
        // Grows group by group. A store error part-way drops it, which gives back (in the
        // background) what was reserved so far.
        let mut reservation = Reservation {
            store: self.clone(),
            subjects: Vec::with_capacity(subjects.len()),
            ended: false,
        };
        let mut hash = None;
        for (group, with_user) in self.groups(&subjects, user) {
            let user_key = user_key.as_deref().filter(|_| with_user);
            let (verdict, retry_after, read, refused_by) =
                self.begin_group(group, user_key).await?;
            if verdict != 0 {
                if let Some(metrics) = &self.metrics {
                    for (i, subject) in group.iter().enumerate() {
                        if refused_by >> i & 1 == 1 {
                            metrics.throttle_hit(subject.kind);
                        }
                    }
                }
                // Only on a cluster can an earlier group hold a reservation here. Given back
                // now rather than by `Drop`, so the next attempt sees it gone.
                reservation.ended = true;
                if !reservation.subjects.is_empty()
                    && let Err(error) = self
                        .end_attempt(&reservation.subjects, Outcome::Abandoned)
                        .await
                {
                    tracing::warn!(%error, "could not give back a refused attempt's reservation");
                }
                return Ok(match verdict {
                    1 => Attempt::Throttled { retry_after },
                    _ => Attempt::Busy,
                });
            }
            reservation.subjects.extend_from_slice(group);
            hash = hash.or(read);
        }
        Ok(Attempt::Go { hash, reservation })
    }

    /// Ends an attempt (see [`END_SCRIPT`]): one call per group, as it began.
    async fn end_attempt(&self, subjects: &[Subject], outcome: Outcome) -> Result<(), StoreError> {
        self.timed(StoreOp::ThrottleEnd, async {
            for (group, _) in self.groups(subjects, None) {
                if !group.is_empty() {
                    self.end_group(group, outcome).await?;
                }
            }
            Ok(())
        })
        .await
    }

    /// How an attempt's subjects are split into calls, each with whether the user record is
    /// read in it. Standalone Redis and memory: one group, all subjects and the user record,
    /// atomic. A cluster allows a script only the keys of one slot: each subject is a group
    /// of its own (its two keys share its name's hash tag), and the user record, tagged with
    /// the username, goes with the subject of that name (or alone when there is none).
    fn groups<'s>(
        &self,
        subjects: &'s [Subject],
        user: Option<&str>,
    ) -> Vec<(&'s [Subject], bool)> {
        if !self.is_cluster() {
            return vec![(subjects, user.is_some())];
        }
        let mut groups: Vec<(&[Subject], bool)> = subjects
            .chunks(1)
            .map(|s| (s, user.is_some_and(|u| s.iter().any(|s| s.name == u))))
            .collect();
        if user.is_some() && !groups.iter().any(|(_, with_user)| *with_user) {
            groups.push((&[], true));
        }
        groups
    }

    /// [`BEGIN_SCRIPT`] (or [`MemoryMap::begin`]) over one group of subjects, reading the
    /// user record at `user_key` when given.
    async fn begin_group(
        &self,
        subjects: &[Subject],
        user_key: Option<&str>,
    ) -> Result<Begun, StoreError> {
        match &self.backend {
            Backend::Redis(conn) => {
                let mut keys: Vec<&str> = Vec::with_capacity(subjects.len() * 2 + 1);
                let mut args: Vec<u64> = Vec::with_capacity(subjects.len() + 1);
                for s in subjects {
                    keys.push(&s.failures);
                    keys.push(&s.pending);
                    args.push(s.limit);
                }
                keys.extend(user_key);
                args.push(millis(RESERVATION_TTL));
                let cmd = eval(BEGIN_SCRIPT, &keys, &args);
                let (verdict, ttl, hash, refused_by): (u8, i64, Option<String>, u64) =
                    self.query(conn, &cmd).await?;
                let ttl = Duration::from_millis(ttl.max(0) as u64);
                Ok((verdict, ttl, hash, refused_by))
            }
            Backend::Memory(map) => Ok(lock(map).begin(subjects, user_key)),
        }
    }

    /// [`END_SCRIPT`] (or [`MemoryMap::end`]) over one group of subjects.
    async fn end_group(&self, subjects: &[Subject], outcome: Outcome) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redis(conn) => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(END_SCRIPT).arg(subjects.len() * 2);
                for s in subjects {
                    cmd.arg(&s.failures).arg(&s.pending);
                }
                cmd.arg(outcome.as_arg());
                for s in subjects {
                    cmd.arg(millis(s.window)).arg(u8::from(s.clear_on_success));
                }
                let _: i64 = self.query(conn, &cmd).await?;
                Ok(())
            }
            Backend::Memory(map) => {
                lock(map).end(subjects, outcome);
                Ok(())
            }
        }
    }

    /// Whether the store answers; used by `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.timed(StoreOp::Ping, async {
            match &self.backend {
                Backend::Redis(conn) => {
                    let _: String = self.query(conn, &redis::cmd("PING")).await?;
                    Ok(())
                }
                Backend::Memory(_) => Ok(()),
            }
        })
        .await
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
            ..StoreConfig::default()
        })
        .unwrap()
    }

    fn subjects(store: &Store, user: &str, address: &str, limit: u64, w: Duration) -> Vec<Subject> {
        vec![
            store.subject("addr", address, limit * 10, w, false),
            store.subject("user", user, limit, w, true),
        ]
    }

    async fn attempt(store: &Store, user: &str, address: &str, limit: u64, w: Duration) -> Attempt {
        store
            .begin_attempt(subjects(store, user, address, limit, w), Some(user))
            .await
            .unwrap()
    }

    fn go(attempt: Attempt) -> (Option<String>, Reservation) {
        match attempt {
            Attempt::Go { hash, reservation } => (hash, reservation),
            other => panic!("expected Go, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn memory_create_user_is_first_writer_wins() {
        let store = memory();
        assert!(
            store
                .create_user(
                    "alice",
                    &UserRecord {
                        phc: "h1".into(),
                        roles: vec![]
                    }
                )
                .await
                .unwrap()
        );
        assert!(
            !store
                .create_user(
                    "alice",
                    &UserRecord {
                        phc: "h2".into(),
                        roles: vec![]
                    }
                )
                .await
                .unwrap()
        );
        let w = Duration::from_secs(60);
        let (hash, r) = go(attempt(&store, "alice", "a", 5, w).await);
        let phc = hash.as_deref().and_then(UserRecord::decode).map(|u| u.phc);
        assert_eq!(phc.as_deref(), Some("h1"));
        r.end(true).await.unwrap();
        let (hash, r) = go(attempt(&store, "bob", "a", 5, w).await);
        assert_eq!(hash, None);
        r.end(false).await.unwrap();
    }

    #[tokio::test]
    async fn memory_failures_throttle_and_in_flight_attempts_only_make_busy() {
        let store = memory();
        let w = Duration::from_millis(200);
        // Two in flight with a limit of 2: a third is Busy, and counting nothing.
        let (_, a) = go(attempt(&store, "alice", "ip", 2, w).await);
        let (_, b) = go(attempt(&store, "alice", "ip", 2, w).await);
        assert!(matches!(
            attempt(&store, "alice", "ip", 2, w).await,
            Attempt::Busy
        ));
        // Both succeed: nothing is left behind, the next attempt goes ahead.
        a.end(true).await.unwrap();
        b.end(true).await.unwrap();
        let (_, c) = go(attempt(&store, "alice", "ip", 2, w).await);
        c.end(false).await.unwrap();
        let (_, d) = go(attempt(&store, "alice", "ip", 2, w).await);
        d.end(false).await.unwrap();
        match attempt(&store, "alice", "ip", 2, w).await {
            Attempt::Throttled { retry_after } => assert!(retry_after <= w),
            other => panic!("expected Throttled, got {other:?}"),
        }
        // A dropped reservation is given back in the background.
        let (_, e) = go(attempt(&store, "bob", "ip", 2, w).await);
        let (_, f) = go(attempt(&store, "bob", "ip", 2, w).await);
        drop((e, f));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_, g) = go(attempt(&store, "bob", "ip", 2, w).await);
        g.end(true).await.unwrap();
        tokio::time::sleep(w + Duration::from_millis(20)).await;
        go(attempt(&store, "alice", "ip", 2, w).await);
    }

    #[tokio::test]
    async fn memory_throttle_refusals_are_counted_by_the_subject_that_refused() {
        let metrics = Arc::new(Metrics::new());
        let store = memory().with_metrics(Arc::clone(&metrics));
        let w = Duration::from_secs(60);
        let hits = |subject: &str| {
            let line = format!("keycard_throttle_hits_total{{subject=\"{subject}\"}} ");
            let text = metrics.encode();
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()).map(str::to_owned))
                .unwrap_or_else(|| panic!("no {line} in {text}"))
        };
        // The user's limit is 1, the address's 10: one failure, then the user refuses.
        let (_, a) = go(attempt(&store, "carol", "ip", 1, w).await);
        a.end(false).await.unwrap();
        assert!(matches!(
            attempt(&store, "carol", "ip", 1, w).await,
            Attempt::Throttled { .. }
        ));
        assert_eq!(
            (hits("user").as_str(), hits("address").as_str()),
            ("1", "0")
        );
        // An attempt in flight at the limit makes the next one Busy: also a hit.
        let (_, b) = go(attempt(&store, "dave", "ip", 1, w).await);
        assert!(matches!(
            attempt(&store, "dave", "ip", 1, w).await,
            Attempt::Busy
        ));
        assert_eq!(hits("user"), "2");
        b.end(true).await.unwrap();
        let text = metrics.encode();
        assert!(
            text.contains("keycard_store_duration_seconds_count{op=\"throttle_begin\"} 4"),
            "{text}"
        );
        assert!(text.contains("keycard_store_duration_seconds_count{op=\"throttle_end\"} 2"));
    }

    #[tokio::test]
    async fn memory_store_sweeps_expired_entries_on_a_schedule() {
        let store = memory();
        let Backend::Memory(map) = &store.backend else {
            unreachable!()
        };
        spawn_sweeper(map, Duration::from_millis(50));
        let w = Duration::from_millis(30);
        for i in 0..200 {
            let (_, r) = go(attempt(&store, &format!("u{i}"), "ip", 100, w).await);
            r.end(false).await.unwrap();
        }
        assert!(lock(map).entries.len() >= 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(lock(map).entries.len(), 0, "expired counters are swept");
    }

    #[tokio::test]
    async fn memory_revocation_expires() {
        let store = memory();
        assert!(!store.is_revoked(Some("j"), "u", 0, "").await.unwrap());
        assert!(store.revoke("j", Duration::from_millis(30)).await.unwrap());
        assert!(!store.revoke("j", Duration::from_millis(30)).await.unwrap());
        assert!(store.is_revoked(Some("j"), "u", 0, "").await.unwrap());
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(!store.is_revoked(Some("j"), "u", 0, "").await.unwrap());
    }
}
