//! Gateway: the per-request service. Every request on `server.listen` enters here.
//!
//! It gives the request an id, checks the request target, canonicalises the path once, and
//! dispatches: auth endpoints to [`crate::auth`], everything else through the router, the token
//! check and the [`crate::proxy`]. Whatever happens, exactly one access-log line and one metrics
//! update are written, and errors become responses in one place ([`RequestError::into_response`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;

use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use tokio::sync::watch;
use tracing::Instrument;

use crate::auth::endpoints::Endpoint;
use crate::auth::{Auth, Identity, SessionWatch};
use crate::body::Body;
use crate::error::RequestError;
use crate::metrics::{Metrics, RouteMetrics};
use crate::policy::{Policy, Route};
use crate::proxy::headers::{client_ip, is_trusted};
use crate::proxy::{Caller, Proxy};
use crate::routes;

/// `X-Request-Id`: generated for every request, sent upstream and back to the client, and
/// written in the access log, so one id follows a request through every hop.
use crate::proxy::headers::X_REQUEST_ID as REQUEST_ID;

/// The per-request service: long-lived parts built once, plus the current [`Policy`], which a
/// reload swaps whole.
#[derive(Debug)]
pub struct Gateway {
    auth: Auth,
    proxy: Proxy,
    metrics: Arc<Metrics>,
    ids: RequestIds,
    /// What the config decides. Each request loads it once and keeps that snapshot to the end;
    /// tunnels recheck against it (see [`SessionWatch`]).
    policy: Arc<ArcSwap<Policy>>,
    /// The series of requests that matched no route (label `-`).
    unmatched: Arc<RouteMetrics>,
    /// The series of each auth endpoint (labelled with its name).
    endpoints: Vec<(Endpoint, Arc<RouteMetrics>)>,
}

/// What the access log and metrics need to know about a request, filled in as it goes.
struct Outcome {
    /// The route's label and series.
    route: Arc<RouteMetrics>,
    user: Option<String>,
}

/// Status logged for a request whose client went away before it was answered (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

/// One request's access-log line and metrics update, written on drop: when the request is
/// answered, and also when it is cancelled because its client hung up mid-way.
struct AccessLog {
    start: Instant,
    id: HeaderValue,
    peer: SocketAddr,
    method: http::Method,
    uri: http::Uri,
    outcome: Outcome,
    /// The answer's status; `None` until answered.
    status: Option<u16>,
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let status = self.status.unwrap_or(CLIENT_CLOSED);
        self.outcome.route.answered(&self.method, status, elapsed);
        tracing::info!(
            target: "keycard::access",
            request_id = self.id.to_str().unwrap_or("-"),
            peer = %self.peer.ip(),
            method = %self.method,
            path = %LoggedPath(self.uri.path()),
            route = %self.outcome.route.label(),
            status,
            user = self.outcome.user.as_deref().unwrap_or("-"),
            latency_ms = elapsed.as_secs_f64() * 1000.0,
        );
    }
}

impl Gateway {
    /// A gateway applying `policy`; upgraded connections close when `stop` turns true.
    pub fn new(
        policy: Policy,
        auth: Auth,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Gateway {
        let endpoints = [
            Endpoint::Register,
            Endpoint::Login,
            Endpoint::Logout,
            Endpoint::Refresh,
            Endpoint::Jwks,
        ]
        .into_iter()
        .map(|e| (e, metrics.route(Arc::from(e.name()), false)))
        .collect();
        let gateway = Gateway {
            auth,
            proxy: Proxy::new(stop),
            unmatched: metrics.route(Arc::from("-"), false),
            endpoints,
            metrics,
            ids: RequestIds::new(),
            policy: Arc::new(ArcSwap::from_pointee(policy)),
        };
        gateway.warm(&gateway.policy.load());
        gateway
    }

    /// Creates the series of every route of `policy` now, so each shows (at 0) from the start.
    fn warm(&self, policy: &Policy) {
        for route in policy.routes.routes() {
            self.route_metrics(route);
        }
    }

    /// `route`'s series, created on first use and then kept by the route.
    fn route_metrics(&self, route: &Route) -> Arc<RouteMetrics> {
        Arc::clone(
            route
                .metrics
                .get_or_init(|| self.metrics.route(route.label.clone(), true)),
        )
    }

    /// The series of an auth endpoint.
    fn endpoint_metrics(&self, endpoint: Endpoint) -> Arc<RouteMetrics> {
        self.endpoints
            .iter()
            .find(|(e, _)| *e == endpoint)
            .map_or_else(|| Arc::clone(&self.unmatched), |(_, m)| Arc::clone(m))
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Puts `policy` in force for every request that starts from now on; requests in flight
    /// finish on the one they started with.
    pub fn swap_policy(&self, policy: Policy) {
        self.warm(&policy);
        self.policy.store(Arc::new(policy));
    }

    /// Answers one request; never fails (failures are responses).
    ///
    /// Everything logged while answering it, on any task it starts, is inside one `request`
    /// span carrying its `request_id`, so one id finds every line of it.
    pub async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let id = client_request_id(request.headers()).unwrap_or_else(|| self.ids.next());
        let span = tracing::info_span!("request", request_id = id.to_str().unwrap_or("-"));
        self.answer(request, peer, id).instrument(span).await
    }

    /// [`Gateway::handle`] within the request's span.
    async fn answer(
        &self,
        mut request: Request<Incoming>,
        peer: SocketAddr,
        id: HeaderValue,
    ) -> Response<Body> {
        request.headers_mut().insert(REQUEST_ID.clone(), id.clone());
        // Written when this function returns, or when hyper drops it because the client went
        // away (then with 499, nginx's "client closed request"): every request is logged once.
        let mut log = AccessLog {
            start: Instant::now(),
            id: id.clone(),
            peer,
            method: request.method().clone(),
            // A cheap clone (the URI's bytes are shared), to log the path after the request
            // has been handed on.
            uri: request.uri().clone(),
            outcome: Outcome {
                route: Arc::clone(&self.unmatched),
                user: None,
            },
            status: None,
        };
        let http1 = request.version() < Version::HTTP_2;

        let mut close = false;
        let mut response = match self.dispatch(request, peer, &mut log.outcome).await {
            Ok(response) => response,
            Err(error) => {
                if error.status().is_server_error() {
                    tracing::warn!(request_id = id.to_str().unwrap_or("-"), error = %error_chain(&error), "request failed");
                } else if error.closes_connection() {
                    tracing::debug!(request_id = id.to_str().unwrap_or("-"), error = %error_chain(&error), "client error");
                }
                close = error.closes_connection();
                error.into_response()
            }
        };
        response.headers_mut().insert(REQUEST_ID.clone(), id);
        // The client's body was cut short or broken: end the connection after this response,
        // so nothing after it is parsed as a request. (HTTP/2 has no such header; there the
        // stream alone ends.)
        if http1 && close {
            response
                .headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        log.status = Some(response.status().as_u16());
        response
    }

    /// The request's phases, in order: check the head, match the route (or auth endpoint),
    /// authorize, forward. The policy is loaded once, here.
    async fn dispatch(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, RequestError> {
        let policy = self.policy.load_full();
        let limits = &policy.limits;
        let target_len = request
            .uri()
            .path_and_query()
            .map_or(0, |pq| pq.as_str().len());
        if target_len > limits.max_target {
            return Err(RequestError::UriTooLong);
        }
        check_head(&request, limits.max_headers)?;
        let path =
            routes::canonicalize(request.uri().path()).map_err(|_| RequestError::InvalidPath)?;

        let forward_auth = &policy.config.forward_auth;
        if forward_auth.enabled && path == forward_auth.path {
            let trusted = is_trusted(peer.ip(), &policy.trusted_proxies);
            let (identity, route) = self
                .auth
                .forward_auth(&policy, request.headers(), trusted)
                .await?;
            outcome.route = self.route_metrics(route);
            outcome.user = identity.user().map(str::to_owned);
            let mut response = crate::body::json_msg(http::StatusCode::OK, "Authorized");
            identity.write_headers(&policy.identity, response.headers_mut())?;
            return Ok(response);
        }

        if let Some(endpoint) = Endpoint::from_path(&path) {
            outcome.route = self.endpoint_metrics(endpoint);
            let client = client_ip(request.headers(), peer.ip(), &policy.trusted_proxies);
            let answered = (self.auth)
                .endpoint(&policy, endpoint, request, client)
                .await;
            self.metrics
                .endpoint(endpoint, answered.as_ref().map(|_| ()));
            let (response, user) = answered?;
            outcome.user = user;
            return Ok(response);
        }

        // keycard is a reverse proxy, not a forward one: a CONNECT tunnel would carry traffic
        // past every route and identity rule.
        if request.method() == http::Method::CONNECT {
            return Err(RequestError::MethodNotAllowed {
                allow: "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
            });
        }
        let route = policy.routes.find(&path).ok_or(RequestError::NoRoute)?;
        outcome.route = self.route_metrics(route);
        let identity = self
            .auth
            .authorize(&policy, route, request.headers())
            .await?;
        outcome.user = identity.user().map(str::to_owned);
        let upgrade = policy.requested_upgrade(&request);
        // A tunnel outlives its request: it keeps being checked against the policy in force.
        let session = upgrade.is_some().then(|| {
            let token = match identity {
                Identity::User(_) => crate::auth::bearer_token(request.headers()).ok(),
                Identity::Anonymous => None,
            };
            SessionWatch::new(
                &self.auth.store,
                Arc::clone(&self.policy),
                &path,
                &identity,
                token,
            )
        });
        let caller = Caller {
            peer: peer.ip(),
            trusted: is_trusted(peer.ip(), &policy.trusted_proxies),
            identity: &identity,
            upgrade,
            session,
        };
        let sent = Instant::now();
        let answered = (self.proxy)
            .forward(request, route, &path, &policy, caller)
            .await;
        // Up to the upstream's response head (its body streams afterwards).
        if answered.is_ok() {
            outcome.route.upstream(sent.elapsed());
        }
        answered
    }
}

/// Header-level checks hyper does not make:
/// - total size (hyper's buffer limit is looser, see [`crate::server::head_buffer`]);
/// - `Host` (RFC 9112 §3.2): exactly one on HTTP/1.1 (none or several is 400, since the
///   gateway and the upstream might each pick a different one), a valid authority, and over
///   HTTP/2 the same as `:authority` when both are sent (RFC 9113 §8.3.1);
/// - a single `Authorization`;
/// - `Transfer-Encoding`: only `chunked` (RFC 9112 §6.1: a coding the server does not
///   understand is 501). The upstream request is re-framed by keycard's own client, so any
///   other coding (`gzip, chunked`) would reach the upstream with its bytes still coded and
///   no word of it.
fn check_head<B>(request: &Request<B>, max: usize) -> Result<(), RequestError> {
    let headers = request.headers();
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if size > max {
        return Err(RequestError::HeadersTooLarge);
    }
    let mut hosts = headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(RequestError::BadRequest("Multiple Host headers".into())),
        (None, None) if request.version() == Version::HTTP_11 => {
            return Err(RequestError::BadRequest("Missing Host header".into()));
        }
        (Some(host), None) => {
            if !is_host(host.as_bytes()) {
                return Err(RequestError::BadRequest("Invalid Host header".into()));
            }
            if request.version() == Version::HTTP_2
                && let Some(authority) = request.uri().authority()
                && !authority
                    .as_str()
                    .as_bytes()
                    .eq_ignore_ascii_case(host.as_bytes())
            {
                return Err(RequestError::BadRequest(
                    "Host does not match :authority".into(),
                ));
            }
        }
        (None, None) => {}
    }
    // The target's own authority (absolute form, HTTP/2 `:authority`) becomes the upstream's
    // Host: the same rules.
    if request
        .uri()
        .authority()
        .is_some_and(|a| !is_host(a.as_str().as_bytes()))
    {
        return Err(RequestError::BadRequest("Invalid Host header".into()));
    }
    // On every route, public ones too: an upstream that reads auth itself must never have to
    // guess which of two credentials is meant.
    if headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(RequestError::BadRequest(
            "Multiple Authorization headers".into(),
        ));
    }
    let mut codings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    // Exactly one `chunked`, or nothing: `chunked, chunked` would lose the inner coding too.
    if let Some(first) = codings.next()
        && (!first.eq_ignore_ascii_case(b"chunked") || codings.next().is_some())
    {
        return Err(RequestError::NotImplemented(
            "Transfer coding not supported",
        ));
    }
    Ok(())
}

/// Whether a `Host` value or target authority is a plain `host[:port]` (RFC 9110 §7.2,
/// RFC 3986 §3.2.2): a registered name or IPv4 address, or a bracketed IPv6 literal, then at
/// most a numeric port. No userinfo (RFC 9113 §8.3.1 forbids it in `:authority`; a back end's
/// URL parser would read `good@evil` as host `evil` while a suffix check sees `good`), no
/// spaces, no path. Checked in place, without allocating, on every request.
fn is_host(value: &[u8]) -> bool {
    let (host_ok, rest) = match value.strip_prefix(b"[") {
        Some(inner) => match inner.iter().position(|&b| b == b']') {
            Some(end) => (
                end > 0
                    && inner[..end]
                        .iter()
                        .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
                &inner[end + 1..],
            ),
            None => (false, &b""[..]),
        },
        None => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            let name = &value[..end];
            (
                !name.is_empty()
                    && name.iter().all(|&b| {
                        b.is_ascii_alphanumeric()
                            || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%' | b'!' | b'$')
                            || matches!(b, b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',')
                            || matches!(b, b';' | b'=')
                    }),
                &value[end..],
            )
        }
    };
    host_ok
        && match rest.strip_prefix(b":") {
            None => rest.is_empty(),
            Some(port) => {
                port.iter().all(u8::is_ascii_digit)
                    && std::str::from_utf8(port).is_ok_and(|p| p.parse::<u16>().is_ok())
            }
        }
}

/// The request path for the log: without the query (queries may carry secrets) and cut at
/// 256 bytes, so a hostile target cannot flood the log.
struct LoggedPath<'a>(&'a str);

impl std::fmt::Display for LoggedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut end = self.0.len().min(256);
        while !self.0.is_char_boundary(end) {
            end -= 1;
        }
        f.write_str(&self.0[..end])
    }
}

/// An error and its sources on one line, for the log (clients only see the generic message).
fn error_chain(error: &RequestError) -> String {
    let mut text = match error {
        RequestError::BadGateway(detail) | RequestError::Internal(detail) => {
            format!("{error}: {detail}")
        }
        _ => error.to_string(),
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        // Many errors already print their source in their own message (redis' do); say each
        // cause once.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The client's `X-Request-Id`, kept when it is the only one and 1–128 characters of
/// `A-Z a-z 0-9 . _ -` (so it correlates with the caller's own logs, as behind Envoy or
/// nginx); anything else is replaced by keycard's own. The alphabet keeps it safe to log and
/// to send on.
fn client_request_id(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let mut sent = headers.get_all(&REQUEST_ID).iter();
    let id = sent.next()?;
    let ok = sent.next().is_none()
        && (1..=128).contains(&id.len())
        && id
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then(|| id.clone())
}

/// Request ids: a random per-process prefix and a counter. Unique within a process, unlikely
/// to collide across replicas, and no syscall per request.
#[derive(Debug)]
struct RequestIds {
    prefix: u32,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        let mut bytes = [0u8; 4];
        // A failed getrandom only makes ids less unique across replicas; not worth failing for.
        let _ = getrandom::fill(&mut bytes);
        RequestIds {
            prefix: u32::from_le_bytes(bytes),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let text = format!("{:08x}{:012x}", self.prefix, n & 0xffff_ffff_ffff);
        // Hex digits are always a valid header value.
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_request_id_is_kept_only_when_plain_short_and_single() {
        let id = |values: &[&[u8]]| {
            let mut headers = http::HeaderMap::new();
            for v in values {
                headers.append(&REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
            }
            client_request_id(&headers).map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(id(&[b"abc-123_X.y"]).as_deref(), Some("abc-123_X.y"));
        let longest = "a".repeat(128);
        assert_eq!(id(&[longest.as_bytes()]), Some(longest.clone()));
        assert_eq!(id(&[format!("{longest}a").as_bytes()]), None);
        for bad in [
            &b""[..],
            b"a b",
            b"a/b",
            b"a\tb",
            b"a,b",
            b"a\xffb",
            b"a;b",
            b"a\"b",
        ] {
            assert_eq!(id(&[bad]), None, "{bad:?}");
        }
        assert_eq!(id(&[]), None);
        assert_eq!(id(&[b"one", b"two"]), None, "two ids: neither is kept");
    }

    #[test]
    fn plain_hosts_pass_and_anything_else_is_refused() {
        for ok in [
            "example.com",
            "example.com:8080",
            "127.0.0.1",
            "127.0.0.1:65535",
            "[::1]",
            "[2001:db8::1]:443",
            "xn--bcher-kva.example",
            "example.com.",
        ] {
            assert!(is_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "user@evil.example",
            "good.example@evil.example",
            "example.com:abc",
            "example.com:+80",
            "example.com:65536",
            "example.com:",
            "example.com/x",
            "a.com, b.com",
            "[::1",
            "[]:80",
            "[::1]x",
            ":80",
        ] {
            assert!(!is_host(bad.as_bytes()), "{bad}");
        }
    }
}
