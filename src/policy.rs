//! Policy: everything the config file decides about a request, compiled once and swapped
//! whole on reload.
//!
//! [`Policy::compile`] turns a validated [`Config`] into the values the request path uses:
//! the [`RouteTable`] (each [`Route`] holding its upstream client, timeouts and metrics label),
//! the token keys, the identity-header rules and the per-request limits. The gateway keeps the
//! current policy behind an `ArcSwap`; a request loads it once and uses that snapshot to the
//! end, so a reload never changes the rules under a request in flight. Long-lived parts (the
//! store, the password hasher, metrics, connection slots) are not here: they live for the
//! process (see [`crate::gateway::Gateway`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderValue, Request, Version, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ipnet::IpNet;

use crate::auth::token::Tokens;
use crate::config::{AuthMode, Config, RouteConfig, ThrottleConfig};
use crate::metrics::RouteMetrics;
use crate::proxy::headers::IdentityHeaders;
use crate::proxy::request_body::ClientBody;
use crate::routes::Router;

/// Idle upstream connections are closed after this long. Kept below the common upstream
/// keep-alive timeouts (nginx 75 s, Node 5 s is the outlier) so we rarely reuse a connection
/// the upstream is about to close.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Cap on idle connections kept per upstream host.
const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// A pooled HTTP/1.1 client for upstreams, `http://` or verified `https://`; cheap to clone
/// (the pool is shared).
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ClientBody>;

/// The compiled policy: one value, swapped whole.
#[derive(Debug)]
pub struct Policy {
    /// The config it was compiled from (for `keycard check`, reload comparisons and logs).
    pub config: Config,
    /// Routes in matching order.
    pub routes: RouteTable,
    /// Signs and verifies tokens with keys built once.
    pub tokens: Tokens,
    /// `[[issuers]]` and their cached keys.
    pub issuers: crate::auth::issuers::Issuers,
    /// Which headers are the gateway's own, and how the user is written.
    pub identity: IdentityHeaders,
    /// `server.trusted_proxies`.
    pub trusted_proxies: Vec<IpNet>,
    /// `[server.tls]`'s certificate and key: what the next TLS handshake presents.
    pub server_cert: Option<crate::tls::ServerCert>,
    /// `[throttle]`.
    pub throttle: ThrottleConfig,
    /// `server.*` limits read per request.
    pub limits: Limits,
}

/// The `[server]` limits the request path reads (the listener's own, such as the header read
/// timeout, are fixed when it starts).
#[derive(Debug, Clone)]
pub struct Limits {
    /// `server.max_target_bytes`: longer request targets are 414.
    pub max_target: usize,
    /// `server.max_header_bytes`: more header bytes are 431.
    pub max_headers: usize,
    /// `server.max_auth_body_bytes`: the largest body an auth endpoint reads.
    pub max_auth_body: usize,
    /// `server.body_read_timeout`: how long an auth endpoint waits for its whole body.
    pub body_read_timeout: Duration,
    /// `server.body_idle_timeout`: a proxied request body that stalls this long is cut.
    pub body_idle_timeout: Duration,
    /// `server.upgrade_recheck`: how often a tunnel's token is checked again.
    pub upgrade_recheck: Duration,
    /// `server.upgrade_protocols`, lowercased: the only protocols ever tunnelled.
    pub upgrade_protocols: Vec<String>,
}

/// The route table: compiled routes, most specific first.
pub type RouteTable = Router<Route>;

/// One compiled `[[routes]]` entry: everything a request matched to it needs.
#[derive(Debug)]
pub struct Route {
    /// The route as configured (prefix, upstream, auth mode, flags, timeouts).
    pub config: RouteConfig,
    /// Who may pass.
    pub policy: AuthMode,
    /// The pooled client for this route's upstream; routes with the same connect timeout
    /// and `ca_file` certificates share one (and so one pool).
    pub client: UpstreamClient,
    /// The metrics and access-log label: the route's path.
    pub label: Arc<str>,
    /// Its metrics series, set by the gateway (see [`crate::metrics::RouteMetrics`]); kept
    /// here so a request never looks them up by name.
    pub metrics: OnceLock<Arc<RouteMetrics>>,
}

impl AsRef<RouteConfig> for Route {
    fn as_ref(&self) -> &RouteConfig {
        &self.config
    }
}

impl Policy {
    /// Compiles `config`. Upstream clients are taken over from `previous` where the connect
    /// timeout and the trusted CAs are the same, so a reload keeps warm connection pools (and
    /// a changed `ca_file` gets a new client, never a pool of connections verified against
    /// the old CA). Cheap: no hashing, no I/O (keys and certificates were read with the
    /// config).
    pub fn compile(config: Config, previous: Option<&Policy>) -> Policy {
        type Key = (Duration, Option<crate::tls::UpstreamCa>);
        let key = |r: &RouteConfig| -> Key { (r.connect_timeout, r.ca.clone()) };
        let mut clients: Vec<(Key, UpstreamClient)> = previous
            .map(|p| {
                p.routes
                    .routes()
                    .iter()
                    .map(|r| (key(&r.config), r.client.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let wanted = key(route);
                let client = match clients.iter().find(|(k, _)| *k == wanted) {
                    Some((_, client)) => client.clone(),
                    None => {
                        let client = upstream_client(route.connect_timeout, route.ca.as_ref());
                        clients.push((wanted, client.clone()));
                        client
                    }
                };
                Route {
                    policy: route.auth,
                    label: Arc::from(route.path.as_str()),
                    metrics: OnceLock::new(),
                    client,
                    config: route.clone(),
                }
            })
            .collect();
        let server = &config.server;
        Policy {
            routes: Router::new(routes),
            tokens: Tokens::new(&config.tokens),
            issuers: crate::auth::issuers::Issuers::new(&config.issuers),
            identity: IdentityHeaders::new(&config.identity),
            trusted_proxies: server.trusted_proxies.clone(),
            server_cert: server.tls.as_ref().and_then(|tls| tls.cert.clone()),
            throttle: config.throttle.clone(),
            limits: Limits {
                max_target: server.max_target_bytes,
                max_headers: server.max_header_bytes,
                max_auth_body: server.max_auth_body_bytes,
                body_read_timeout: server.body_read_timeout,
                body_idle_timeout: server.body_idle_timeout,
                upgrade_recheck: server.upgrade_recheck,
                upgrade_protocols: server.upgrade_protocols.clone(),
            },
            config,
        }
    }

    /// The upgrade a request asks for and keycard will tunnel: an HTTP/1.1 request with an
    /// `upgrade` token in `Connection` (RFC 9110 §7.8), and of the protocols its `Upgrade`
    /// offers those on `server.upgrade_protocols`. `None` means the request is served as plain
    /// HTTP/1.1 (its `Upgrade` goes with the other hop-by-hop headers). HTTP/2 has no such
    /// mechanism.
    pub fn requested_upgrade<B>(&self, request: &Request<B>) -> Option<HeaderValue> {
        if request.version() != Version::HTTP_11 || self.limits.upgrade_protocols.is_empty() {
            return None;
        }
        let asks = request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        if !asks {
            return None;
        }
        let mut offered = Vec::new();
        for protocol in request
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
        {
            if self.is_allowed(protocol) {
                if !offered.is_empty() {
                    offered.extend_from_slice(b", ");
                }
                offered.extend_from_slice(protocol);
            }
        }
        HeaderValue::from_bytes(&offered)
            .ok()
            .filter(|_| !offered.is_empty())
    }

    /// Whether one `Upgrade` protocol (`name` or `name/version`) is on the allow-list, which
    /// may name either form.
    fn is_allowed(&self, protocol: &[u8]) -> bool {
        let name = protocol.split(|&b| b == b'/').next().unwrap_or(protocol);
        self.limits.upgrade_protocols.iter().any(|allowed| {
            allowed.as_bytes().eq_ignore_ascii_case(protocol)
                || allowed.as_bytes().eq_ignore_ascii_case(name)
        })
    }
}

/// A pooled client whose connects time out after `connect_timeout` (the TCP connect; the TLS
/// handshake is under the route's `timeout`). `https://` upstreams are verified against `ca`
/// alone when given, else the Mozilla roots, with the upstream's host as the name.
fn upstream_client(
    connect_timeout: Duration,
    ca: Option<&crate::tls::UpstreamCa>,
) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    // The URI's scheme decides: HttpsConnector hands http:// through untouched.
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(crate::tls::client_config(ca))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .build(connector)
}
