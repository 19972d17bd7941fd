//! Connection: what one accepted client connection shares with the requests it carries.
//!
//! The server creates one [`Connection`] per accepted socket and hands every request on it an
//! `Arc` of it (in the request's extensions). It holds:
//! - the connection's slot under `server.max_connections`, released only when the last holder
//!   lets go, so an upgraded tunnel (which outlives hyper's connection future) keeps counting;
//! - the task tracker the server drains at shutdown, which tunnels join too;
//! - a count of open streams, which bounds how long a connection with none may stay open
//!   (`server.h2_idle_timeout`);
//! - its listener's gauges: it counts itself in `keycard_open_connections` (as `http1` until a
//!   request says HTTP/2, as `upgraded` once it becomes a tunnel) and each request in
//!   `keycard_requests_in_flight`, and takes itself off both when dropped, however it ends.
//! - whether it came in over TLS, which the proxy tells upstreams (`X-Forwarded-Proto`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::metrics::{ConnKind, ListenerMetrics};

/// One accepted client connection, shared by its requests and its tunnel.
#[derive(Debug)]
pub struct Connection {
    /// The connection's place under `server.max_connections`: freed when this value drops,
    /// that is after hyper's connection future *and* any tunnel it became have ended.
    _slot: OwnedSemaphorePermit,
    /// The server's tracker: shutdown waits for everything spawned on it.
    tracker: TaskTracker,
    /// Requests (streams) whose response has not been fully sent or dropped.
    open_streams: AtomicUsize,
    /// When the last stream ended (ms after `opened`); the idle clock starts there.
    idle_since_ms: AtomicU64,
    opened: Instant,
    /// The listener's gauges.
    gauges: Arc<ListenerMetrics>,
    /// What it is counted as in `keycard_open_connections`: a [`ConnKind`] as `u8`.
    kind: AtomicU8,
    /// Whether the client connected with TLS (`[server.tls]`).
    tls: bool,
}

impl Connection {
    /// A connection holding `slot`, whose tunnels join `tracker`, counted in `gauges` (as
    /// `http1` until a request says otherwise); `tls` when the client completed a TLS
    /// handshake on it.
    pub fn new(
        slot: OwnedSemaphorePermit,
        tracker: TaskTracker,
        gauges: Arc<ListenerMetrics>,
        tls: bool,
    ) -> Connection {
        gauges.open(ConnKind::Http1).inc();
        Connection {
            _slot: slot,
            tracker,
            open_streams: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            opened: Instant::now(),
            gauges,
            kind: AtomicU8::new(ConnKind::Http1 as u8),
            tls,
        }
    }

    /// Counts the connection as `kind` from now on (instead of what it was).
    fn count_as(&self, kind: ConnKind) {
        let was = self.kind.swap(kind as u8, Ordering::AcqRel);
        if was != kind as u8 {
            self.gauges.open(kind).inc();
            self.gauges.open(kind_of(was)).dec();
        }
    }

    /// Whether the client reached keycard over TLS: the scheme upstreams are told.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Runs an upgraded connection's tunnel on the server's tracker, holding this connection
    /// (and so its slot) until the tunnel ends. Shutdown waits for it like for any connection.
    pub fn spawn_tunnel(self: Arc<Self>, tunnel: impl Future<Output = ()> + Send + 'static) {
        let tracker = self.tracker.clone();
        self.count_as(ConnKind::Upgraded);
        tracker.spawn(async move {
            tunnel.await;
            drop(self);
        });
    }

    /// Counts a stream of `version` as open (and in flight) until the returned guard drops
    /// (with the response body). An HTTP/2 one makes the connection count as `h2`.
    pub fn open_stream(self: &Arc<Self>, version: http::Version) -> StreamGuard {
        if version == http::Version::HTTP_2
            && self.kind.load(Ordering::Relaxed) != ConnKind::H2 as u8
        {
            self.count_as(ConnKind::H2);
        }
        self.gauges.in_flight.inc();
        self.open_streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(Arc::clone(self))
    }

    /// Resolves once the connection has had no open stream for `limit`. Wakes at most once per
    /// `limit` while streams are open.
    pub async fn idle_for(&self, limit: Duration) {
        loop {
            let since =
                self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
            tokio::time::sleep_until(since + limit).await;
            if self.open_streams.load(Ordering::Acquire) == 0 {
                let since =
                    self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                if since.elapsed() >= limit {
                    return;
                }
            } else {
                // Busy: look again a whole period after now.
                tokio::time::sleep(limit).await;
            }
        }
    }
}

/// An open stream on a [`Connection`]; dropping it closes the stream and, when it was the
/// last one, starts the connection's idle clock.
#[derive(Debug)]
pub struct StreamGuard(Arc<Connection>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let connection = &self.0;
        let elapsed = u64::try_from(connection.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        connection.idle_since_ms.store(elapsed, Ordering::Release);
        connection.open_streams.fetch_sub(1, Ordering::AcqRel);
        connection.gauges.in_flight.dec();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.gauges
            .open(kind_of(self.kind.load(Ordering::Acquire)))
            .dec();
    }
}

/// The [`ConnKind`] stored as `kind`.
fn kind_of(kind: u8) -> ConnKind {
    ConnKind::ALL
        .get(usize::from(kind))
        .copied()
        .unwrap_or(ConnKind::Http1)
}
