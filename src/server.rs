//! Server: the accept loops, per-connection HTTP handling, and graceful shutdown.
//!
//! [`run`] is the whole gateway: it opens the store, builds the [`Gateway`] around the compiled
//! [`Policy`], and serves the public and admin listeners until the shutdown future resolves
//! ([`run_with_reload`] also watches the config file). Listeners come in already bound, so
//! tests bind port 0 and drive the real thing in-process.
//!
//! The runtime model is nginx's: `server.workers` event loops, each a single-threaded tokio
//! runtime on its own thread with its own listener on the public address (`SO_REUSEPORT`, so
//! the kernel spreads new connections), and a connection stays on the loop that accepted it.
//! The loop that calls [`run`] is the first of them and also runs the admin listener and the
//! reloader. Measured with `scripts/bench.sh`, this served about a quarter more requests per
//! CPU than tokio's work-stealing scheduler: no cross-thread wake-ups or task stealing on the
//! request path.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::auth::store::Store;
use crate::body::Body;
use crate::config::Config;
use crate::connection::{Connection, StreamGuard};
use crate::framing::FirstHead;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::reload::ReloadSource;

/// Largest request head hyper will buffer: the header limit plus the target limit plus room
/// for the request line. Anything larger is answered 431 by hyper itself; the gateway enforces
/// the exact limits.
pub fn head_buffer(config: &crate::config::ServerConfig) -> usize {
    (config.max_header_bytes + config.max_target_bytes + 1024).max(8 * 1024)
}

/// Already-bound listeners, so tests can bind port 0 and read the address back.
#[derive(Debug)]
pub struct Listeners {
    /// `server.listen`: user traffic.
    pub server: TcpListener,
    /// `admin.listen`: health, readiness, metrics.
    pub admin: TcpListener,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store could not be opened (bad URL).
    #[error("store: {0}")]
    Store(#[from] crate::auth::store::StoreError),
    /// The password hasher could not be built (bad argon2 parameters).
    #[error("passwords: {0}")]
    Passwords(#[from] crate::auth::password::PasswordError),
}

/// Runs the gateway until `shutdown` resolves, then answers `/readyz` with 503 for
/// `server.shutdown_delay` while still serving, then stops accepting, lets in-flight requests
/// finish (bounded by `server.shutdown_timeout`) and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with_reload(config, listeners, shutdown, None).await
}

/// Like [`run`], and while it runs, reloads the config from `reload` (see [`crate::reload`]).
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: Option<ReloadSource>,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(&config.store)?.with_revocation_cache(&config.store)?;
    let auth = Auth::new(&config, store.clone())?;
    // One signal, watched by both accept loops and by upgraded connections.
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = Limits {
        max_head: head_buffer(&config.server),
        header_read_timeout: config.server.header_read_timeout,
        shutdown_timeout: config.server.shutdown_timeout,
        max_connections: config.server.max_connections,
        h2_idle_timeout: config.server.h2_idle_timeout,
    };
    let routes = config.routes.len();
    let shutdown_delay = config.server.shutdown_delay;
    let workers = config.server.workers;
    metrics.set_workers(workers);
    let gateway = Arc::new(Gateway::new(
        Policy::compile(config, None),
        auth,
        metrics.clone(),
        stop_rx.clone(),
    ));
    // Shutdown in two steps: first `/readyz` turns 503 while both listeners keep serving for
    // `server.shutdown_delay` (load balancers need that long to take this replica out), then
    // the accept loops stop and drain.
    let (draining_tx, draining_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = draining_tx.send(true);
        if !shutdown_delay.is_zero() {
            tracing::info!(
                delay = ?shutdown_delay,
                "readyz now answers 503; serving for server.shutdown_delay before draining"
            );
            tokio::time::sleep(shutdown_delay).await;
        }
        let _ = stop_tx.send(true);
    });
    if let Some(source) = reload {
        tokio::spawn(crate::reload::watch(
            source,
            Arc::clone(&gateway),
            Arc::clone(&metrics),
            stop_rx.clone(),
        ));
    }

    tracing::info!(
        listen = %local(&listeners.server),
        admin = %local(&listeners.admin),
        routes,
        "keycard started"
    );

    let admin_state = Arc::new(crate::admin::Admin::new(store, metrics, draining_rx));
    // `max_connections` counts each listener on its own; the public listener's event loops
    // share one count.
    let admin = tokio::spawn(serve(
        listeners.admin,
        limits.clone(),
        Arc::new(Semaphore::new(limits.max_connections)),
        stop_rx.clone(),
        move |request, _peer| {
            let admin_state = admin_state.clone();
            async move { admin_state.handle(request).await }
        },
    ));
    let handler = move |request, peer| {
        let gateway = Arc::clone(&gateway);
        async move { gateway.handle(request, peer).await }
    };
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut loops = Vec::new();
    for n in 1..workers {
        match event_loop(
            n,
            &listeners.server,
            limits.clone(),
            Arc::clone(&slots),
            stop_rx.clone(),
            handler.clone(),
        ) {
            Ok(done) => loops.push(done),
            Err(error) => tracing::error!(%error, "cannot start worker {n}; serving with fewer"),
        }
    }
    serve(listeners.server, limits, slots, stop_rx, handler).await;
    for done in loops {
        let _ = done.await;
    }
    let _ = admin.await;
    tracing::info!("keycard stopped");
    Ok(())
}

/// Starts worker `n`: a thread running a single-threaded runtime that serves its own listener
/// on `first`'s address until `stop`, then drains. The receiver resolves when it has.
fn event_loop<F, Fut>(
    n: usize,
    first: &TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    handler: F,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>>
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = worker_listener(first)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("keycard-worker-{n}"))
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, limits, slots, stop, handler).await,
                    Err(error) => tracing::error!(%error, "worker {n} cannot listen"),
                }
            });
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

/// Another listener on `first`'s address for one more worker: its own socket when `first` has
/// `SO_REUSEPORT` (the binary binds that way; the kernel then balances connections between
/// the sockets), otherwise a duplicate of `first` (the loops then take turns on one queue).
fn worker_listener(first: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    let shared = socket2::SockRef::from(first);
    if shared.reuse_port()? {
        return reuseport_listener(first.local_addr()?);
    }
    let socket = shared.try_clone()?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A non-blocking listening socket on `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`), so that
/// every event loop can have its own on one address.
pub fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The accept queue of each public listener (as tokio's and std's default).
pub const LISTEN_BACKLOG: i32 = 1024;

/// Resolves once the stop signal is set (or its sender is gone). The borrow of the watch value
/// ends inside, so the accept loop's future stays `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string())
}

/// Connection limits shared by both listeners.
#[derive(Debug, Clone)]
struct Limits {
    max_head: usize,
    header_read_timeout: Duration,
    shutdown_timeout: Duration,
    max_connections: usize,
    h2_idle_timeout: Duration,
}

/// Accepts connections until `stop` turns true, serving each with HTTP/1.1 or HTTP/2 (h2c),
/// then drains. An accept error (out of file descriptors, say) is logged and retried after a
/// pause: it must never end the loop.
///
/// Every connection, and every tunnel one becomes, runs on one [`TaskTracker`] and holds its
/// slot under `max_connections` until it ends; at shutdown each connection is told to finish
/// (hyper's graceful shutdown: HTTP/1 closes after the current response, HTTP/2 sends
/// GOAWAY), tunnels close, and the drain waits for the tracker, bounded by
/// `shutdown_timeout`. A connection with no open stream for `h2_idle_timeout` is shut down the
/// same way; HTTP/2 keep-alive pings every half of it find peers that vanished mid-stream.
async fn serve<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head);
    let ping_every = limits.h2_idle_timeout / 2;
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(ping_every)
        .keep_alive_timeout(ping_every.min(Duration::from_secs(20)))
        .max_header_list_size(u32::try_from(limits.max_head).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let tracker = TaskTracker::new();
    let mut last_accept_error = None;
    let mut failed_accepts = 0u64;

    loop {
        // Past max_connections, stop accepting: new connections wait in the kernel backlog
        // instead of each costing us a task.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors repeats every retry: say so once a second at most.
                    failed_accepts += 1;
                    if last_accept_error.is_none_or(|at: tokio::time::Instant| at.elapsed() >= Duration::from_secs(1)) {
                        tracing::error!(%error, failures = failed_accepts, "accept failed; retrying");
                        last_accept_error = Some(tokio::time::Instant::now());
                        failed_accepts = 0;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let io = FirstHead::new(stream, limits.header_read_timeout);
        let connection = Arc::new(Connection::new(slot, tracker.clone()));
        let per_request = Arc::clone(&connection);
        let service = service_fn(move |mut request: Request<Incoming>| {
            let stream = per_request.open_stream();
            request.extensions_mut().insert(Arc::clone(&per_request));
            let handler = handler.clone();
            async move {
                let response = handler(request, peer).await;
                Ok::<_, Infallible>(response.map(|body| Tracked {
                    inner: body,
                    _stream: stream,
                }))
            }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let mut stop = stop.clone();
        let idle_limit = limits.h2_idle_timeout;
        tracker.spawn(async move {
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%peer, error = %error, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stopped(&mut stop), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = connection.idle_for(idle_limit), if !closing => {
                        tracing::debug!(%peer, "closing a connection idle for {idle_limit:?}");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            // The slot goes with the last holder: here, or when a tunnel this connection
            // became ends.
            drop(connection);
        });
    }

    drop(listener);
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(connections = open, "draining connections");
    }
    if tokio::time::timeout(limits.shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?limits.shutdown_timeout,
            "drain timed out; closing remaining connections"
        );
    }
}

/// A response body that keeps its stream counted as open (see [`Connection::open_stream`])
/// until it has been sent or dropped.
struct Tracked {
    inner: Body,
    _stream: StreamGuard,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
