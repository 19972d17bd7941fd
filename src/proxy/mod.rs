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
//! protocol the client asked for; then both sides are spliced together in a tunnel task that
//! keeps its connection's `max_connections` slot. Every tunnel carries a [`SessionWatch`] and
//! is closed when the policy in force would no longer let it in (its token expired or was
//! revoked, its route changed), and at shutdown.

pub mod headers;
pub mod request_body;

use std::error::Error as _;
use std::net::IpAddr;
use std::sync::Arc;
use tracing::Instrument;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::auth::{Identity, SessionWatch};
use crate::body::{self, Body};
use crate::config::RouteConfig;
use crate::connection::Connection;
use crate::error::RequestError;
use crate::policy::{Policy, Route};
use request_body::{ClientBody, Fault};

/// Forwards requests to their route's upstream (each route carries its own pooled client,
/// see [`crate::policy::Route`]) and runs the tunnels upgrades become.
#[derive(Debug)]
pub struct Proxy {
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
    /// Who the caller is, as [`crate::auth::Auth::authorize`] decided.
    pub identity: &'a Identity,
    /// The upgrade to forward, from [`Policy::requested_upgrade`]; `None` for plain HTTP.
    pub upgrade: Option<HeaderValue>,
    /// For an upgrade: when the tunnel must end.
    pub session: Option<SessionWatch>,
}

impl Proxy {
    /// A proxy whose tunnels close when `stop` turns true.
    pub fn new(stop: watch::Receiver<bool>) -> Proxy {
        Proxy { stop }
    }

    /// Sends `request` (whose path has been canonicalised to `path`) to `route`'s upstream.
    pub async fn forward(
        &self,
        mut request: Request<Incoming>,
        route: &Route,
        path: &str,
        policy: &Policy,
        caller: Caller<'_>,
    ) -> Result<Response<Body>, RequestError> {
        keep_client_host(&mut request);
        *request.uri_mut() = upstream_uri(&route.config, path, request.uri())?;
        let upgrade = caller.upgrade.clone();
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let connection = request.extensions_mut().remove::<Arc<Connection>>();
        // The scheme the client really used: TLS is known per connection, never read from
        // the request.
        let scheme = match connection.as_ref().is_some_and(|c| c.is_tls()) {
            true => "https",
            false => "http",
        };
        prepare_headers(&mut request, route, policy, &caller, scheme)?;
        if let Some(protocol) = &upgrade {
            restore_upgrade(request.headers_mut(), protocol.clone());
        }
        *request.version_mut() = Version::HTTP_11;
        let (mut parts, incoming) = request.into_parts();
        let (body, fault) = ClientBody::new(incoming, policy.limits.body_idle_timeout);
        // A body of unknown length goes upstream chunked whatever the method: left to itself,
        // hyper's client sends no body at all for a GET or HEAD it cannot size.
        if !http_body::Body::is_end_stream(&body)
            && http_body::Body::size_hint(&body).exact().is_none()
        {
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let request = Request::from_parts(parts, body);

        let sent = tokio::time::timeout(route.config.timeout, route.client.request(request)).await;
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
            )
            // The tunnel's log lines carry the request's id, like the request's own.
            .in_current_span();
            match connection {
                // The tunnel keeps the connection's slot under max_connections until it ends.
                Some(connection) => connection.spawn_tunnel(tunnel),
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
/// the gateway's own identity, which nothing after it can remove. `scheme` is the one the
/// client connected with (`X-Forwarded-Proto`, unless a trusted proxy said otherwise).
fn prepare_headers(
    request: &mut Request<Incoming>,
    route: &Route,
    policy: &Policy,
    caller: &Caller<'_>,
    scheme: &str,
) -> Result<(), RequestError> {
    let headers = request.headers_mut();
    headers::remove_hop_by_hop(headers);
    policy.identity.strip(headers);
    if !route.config.forward_token {
        headers.remove(header::AUTHORIZATION);
    }
    headers::set_forwarded(headers, caller.peer, caller.trusted, scheme);
    caller.identity.write_headers(&policy.identity, headers)
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
