//! Proxy: forwards a request that has passed auth to its route's upstream and streams the
//! answer back.
//!
//! Bodies are never collected: the client's `Incoming` body is handed to the upstream request
//! and the upstream's `Incoming` body to the response, so memory per request stays flat
//! whatever the payload size. Header rules live in [`headers`]; this module only decides the
//! upstream URI, applies them in the one safe order, and maps upstream failures to 502/504.
//!
//! `Upgrade` requests for a protocol on `server.upgrade_protocols` (default only `websocket`)
//! are forwarded with their `Upgrade`/`Connection: upgrade` pair restored after hop-by-hop
//! removal; any other protocol (`h2c` above all) is dropped with the other hop-by-hop headers
//! and the request goes on as plain HTTP/1.1. A 101 is relayed only when it switches to the
//! protocol the client asked for; then both sides are spliced together in a tunnel task. On protected routes the tunnel carries a
//! [`SessionWatch`] and is closed when the token expires or is revoked; every tunnel is closed
//! at shutdown (hyper's graceful shutdown does not track upgraded connections).

pub mod headers;
pub mod request_body;

use std::error::Error as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;

use crate::auth::SessionWatch;
use crate::body::{self, Body};
use crate::config::RouteConfig;
use crate::connection::Connection;
use crate::error::RequestError;
use headers::IdentityHeaders;
use request_body::{ClientBody, Fault};

/// Idle upstream connections are closed after this long. Kept below the common upstream
/// keep-alive timeouts (nginx 75 s, Node 5 s is the outlier) so we rarely reuse a connection
/// the upstream is about to close.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Cap on idle connections kept per upstream host.
const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// The pooled upstream clients. Routes that share a connect timeout (usually all of them)
/// share one client and so one connection pool.
#[derive(Debug)]
pub struct Proxy {
    clients: Vec<(Duration, Client<HttpConnector, ClientBody>)>,
    /// `server.body_idle_timeout`: a request body that stalls this long is cut.
    body_idle_timeout: Duration,
    /// `server.upgrade_protocols`, lowercased: the only protocols ever tunnelled.
    upgrade_protocols: Vec<String>,
    /// Turns true at shutdown; open tunnels close then.
    stop: watch::Receiver<bool>,
}

/// Who is calling, as the proxy needs to know it for forwarding headers.
#[derive(Debug)]
pub struct Caller<'a> {
    /// The TCP peer.
    pub peer: IpAddr,
    /// Whether the peer is in `server.trusted_proxies`.
    pub trusted: bool,
    /// The verified username, on required routes.
    pub user: Option<&'a str>,
    /// The upgrade to forward, from [`Proxy::requested_upgrade`]; `None` for plain HTTP.
    pub upgrade: Option<HeaderValue>,
    /// For an upgrade on a protected route: when the session must end.
    pub session: Option<SessionWatch>,
}

impl Proxy {
    /// Builds one client per distinct connect timeout among `routes`; tunnels only
    /// `upgrade_protocols` and closes them when `stop` turns true.
    pub fn new(
        routes: &[RouteConfig],
        server: &crate::config::ServerConfig,
        stop: watch::Receiver<bool>,
    ) -> Proxy {
        let mut clients: Vec<(Duration, Client<HttpConnector, ClientBody>)> = Vec::new();
        for route in routes {
            if clients.iter().any(|(t, _)| *t == route.connect_timeout) {
                continue;
            }
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(route.connect_timeout));
            connector.set_nodelay(true);
            let client = Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
                .build(connector);
            clients.push((route.connect_timeout, client));
        }
        Proxy {
            clients,
            body_idle_timeout: server.body_idle_timeout,
            upgrade_protocols: server.upgrade_protocols.clone(),
            stop,
        }
    }

    /// The upgrade a request asks for and keycard will tunnel: an HTTP/1.1 request with an
    /// `upgrade` token in `Connection` (RFC 9110 §7.8), and of the protocols its `Upgrade`
    /// offers those on `server.upgrade_protocols`. `None` means the request is served as plain
    /// HTTP/1.1 (its `Upgrade` goes with the other hop-by-hop headers). HTTP/2 has no such
    /// mechanism.
    pub fn requested_upgrade<B>(&self, request: &Request<B>) -> Option<HeaderValue> {
        if request.version() != Version::HTTP_11 || self.upgrade_protocols.is_empty() {
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
        self.upgrade_protocols.iter().any(|allowed| {
            allowed.as_bytes().eq_ignore_ascii_case(protocol)
                || allowed.as_bytes().eq_ignore_ascii_case(name)
        })
    }

    /// Sends `request` (whose path has been canonicalised to `path`) to `route`'s upstream.
    pub async fn forward(
        &self,
        mut request: Request<Incoming>,
        route: &RouteConfig,
        path: &str,
        identity: &IdentityHeaders,
        caller: Caller<'_>,
    ) -> Result<Response<Body>, RequestError> {
        let client = self
            .clients
            .iter()
            .find(|(t, _)| *t == route.connect_timeout)
            .map(|(_, c)| c)
            .ok_or_else(|| RequestError::Internal("no client for route".into()))?;

        keep_client_host(&mut request);
        *request.uri_mut() = upstream_uri(route, path, request.uri())?;
        let upgrade = caller.upgrade.clone();
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let connection = request.extensions_mut().remove::<Arc<Connection>>();
        prepare_headers(&mut request, route, identity, &caller)?;
        if let Some(protocol) = &upgrade {
            restore_upgrade(request.headers_mut(), protocol.clone());
        }
        *request.version_mut() = Version::HTTP_11;
        let (parts, incoming) = request.into_parts();
        let (body, fault) = ClientBody::new(incoming, self.body_idle_timeout);
        let request = Request::from_parts(parts, body);

        let sent = tokio::time::timeout(route.timeout, client.request(request)).await;
        // A body the client stalled or broke fails the upstream request too: that is the
        // client's error (408/400, connection closed), not the upstream's.
        match fault.as_ref().and_then(|f| f.get()) {
            Some(Fault::Stalled) => return Err(RequestError::RequestTimeout),
            Some(Fault::Broken) => return Err(RequestError::BrokenBody),
            None => {}
        }
        let mut response = match sent {
            Err(_) => return Err(RequestError::GatewayTimeout),
            Ok(Err(e)) => return Err(classify(e)),
            Ok(Ok(response)) => response,
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client_side), Some(asked)) = (client_side, &upgrade) else {
                return Err(RequestError::BadGateway(
                    "upstream switched protocols unasked".into(),
                ));
            };
            // Only to a protocol the client asked for (and so one on the allow-list): an
            // upstream that answers `Upgrade: h2c` to a WebSocket request gets no tunnel.
            let protocol = response.headers().get(header::UPGRADE).cloned();
            let agreed = protocol.as_ref().is_some_and(|p| {
                asked.as_bytes().split(|&b| b == b',').any(|a| {
                    a.trim_ascii()
                        .eq_ignore_ascii_case(p.as_bytes().trim_ascii())
                })
            });
            if !agreed {
                return Err(RequestError::BadGateway(format!(
                    "upstream switched to {protocol:?}, not to the requested {asked:?}"
                )));
            }
            let upstream_side = hyper::upgrade::on(&mut response);
            let tunnel = tunnel(
                client_side,
                upstream_side,
                caller.session,
                self.stop.clone(),
            );
            match connection {
                // From the 101 on, the client's bytes are the new protocol, not HTTP requests.
                // The tunnel keeps the connection's slot under max_connections until it ends.
                Some(connection) => {
                    connection.flags.mark_upgraded();
                    connection.spawn_tunnel(tunnel);
                }
                None => {
                    tokio::spawn(tunnel);
                }
            }
            let (mut parts, incoming) = response.into_parts();
            headers::remove_hop_by_hop(&mut parts.headers);
            if let Some(protocol) = protocol {
                restore_upgrade(&mut parts.headers, protocol);
            }
            return Ok(Response::from_parts(parts, body::stream(incoming)));
        }

        let (mut parts, incoming) = response.into_parts();
        headers::remove_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body::stream(incoming)))
    }
}

/// Puts back the one hop-by-hop pair an upgrade needs, after every other one was removed.
fn restore_upgrade(headers: &mut http::HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Splices the client's and the upstream's upgraded connections until either side closes,
/// the session ends, or keycard shuts down.
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    session: Option<SessionWatch>,
    mut stop: watch::Receiver<bool>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let session_end = async move {
        match session {
            Some(session) => session.ended().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(error) = result {
                tracing::debug!(%error, "upgraded connection ended with an error");
            }
        }
        reason = session_end => {
            tracing::info!(reason, "closing upgraded connection");
        }
        _ = stop.wait_for(|stopped| *stopped) => {
            tracing::debug!("closing upgraded connection at shutdown");
        }
    }
}

/// `scheme://authority` of the upstream, then the path it should see, then the query as the
/// client sent it.
fn upstream_uri(route: &RouteConfig, path: &str, original: &Uri) -> Result<Uri, RequestError> {
    let mut target = crate::routes::upstream_path(route, path);
    if let Some(query) = original.query() {
        target.push('?');
        target.push_str(query);
    }
    let path_and_query = PathAndQuery::try_from(target)
        .map_err(|e| RequestError::Internal(format!("upstream path: {e}")))?;
    Uri::builder()
        .scheme(route.upstream.scheme.clone())
        .authority(route.upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| RequestError::Internal(format!("upstream uri: {e}")))
}

/// The host the client asked for, as the HTTP/1.1 upstream's `Host`. Must run before the URI
/// is rewritten to the upstream's. The client's host is kept (as Envoy does), so
/// virtual-hosted back ends see the name the client used: HTTP/2's `:authority` (the gateway
/// has checked that a `Host` sent with it agrees), or the authority of an HTTP/1
/// absolute-form target, which replaces `Host` (RFC 9112 §3.2.2).
///
/// Also joins HTTP/2's split `cookie` fields into the one `Cookie` line HTTP/1.1 allows
/// (RFC 9113 §8.2.3).
fn keep_client_host<B>(request: &mut Request<B>) {
    if let Some(authority) = request.uri().authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        request.headers_mut().insert(header::HOST, value);
    }
    if request.version() == Version::HTTP_2 {
        let headers = request.headers_mut();
        let mut cookies = headers.get_all(header::COOKIE).iter();
        if cookies.next().is_some() && cookies.next().is_some() {
            let joined: Vec<&[u8]> = headers
                .get_all(header::COOKIE)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect();
            if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
                headers.insert(header::COOKIE, value);
            }
        }
    }
}

/// Applies the header rules in the only safe order: hop-by-hop first (so a `Connection`
/// header can name anything it likes), then identity strip, then forwarding headers, then
/// the gateway's own identity, which nothing after it can remove.
fn prepare_headers(
    request: &mut Request<Incoming>,
    route: &RouteConfig,
    identity: &IdentityHeaders,
    caller: &Caller<'_>,
) -> Result<(), RequestError> {
    let headers = request.headers_mut();
    headers::remove_hop_by_hop(headers);
    identity.strip(headers);
    if !route.forward_token {
        headers.remove(header::AUTHORIZATION);
    }
    headers::set_forwarded(headers, caller.peer, caller.trusted, "http");
    if let Some(user) = caller.user {
        identity
            .inject(headers, user)
            .map_err(|e| RequestError::Internal(format!("identity header: {e}")))?;
    }
    Ok(())
}

/// Refused, reset or unreachable is 502; a connect that timed out is 504, like nginx's
/// `proxy_connect_timeout`.
fn classify(error: hyper_util::client::legacy::Error) -> RequestError {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return RequestError::GatewayTimeout;
        }
        source = cause.source();
    }
    RequestError::BadGateway(format!("{error:#}: {:?}", error.source()))
}
