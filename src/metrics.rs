//! Metrics: the Prometheus families the gateway updates and the admin listener serves.
//!
//! Labels are bounded on purpose: the route label is a configured route path, an endpoint
//! name or `-` (never the request path), methods outside the standard nine are `OTHER`,
//! statuses are counted by class, and every other label comes from a fixed list in this file.
//! A scan of random URLs or methods cannot grow the series count.
//!
//! The request path never looks a series up by its labels: every fixed series is created
//! once, here, and kept as a handle (a [`Counter`] or [`Gauge`] is an `Arc` of an atomic), and
//! each route's series hang off its [`RouteMetrics`], which the route keeps. An update is then
//! one or two atomic adds, with no allocation and no lock. Latencies use [`Latency`], a
//! histogram of atomics (prometheus-client's own takes a lock per observation).
//!
//! Series that should be visible from the start (every outcome of every counter, each
//! listener's gauges, each route's histograms) are created at 0, so `increase()` sees the
//! first event and dashboards show zero instead of nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::Method;

use crate::auth::endpoints::Endpoint;
use crate::error::RequestError;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// Declares a fixed label set: an enum, its label values in order, and `ALL`.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order (the order of the cached handles).
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label value.
            pub fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

label_values! {
    /// `keycard_auth_decisions_total{outcome}`: how a token check on a protected route (or a
    /// forward-auth question) ended.
    AuthOutcome {
        /// Let in.
        Ok => "ok",
        /// No `Authorization` header.
        Missing => "missing",
        /// Malformed, mis-signed, wrong kind or unknown issuer.
        Invalid => "invalid",
        /// Past its `exp`.
        Expired => "expired",
        /// Revoked: its `jti`, its user's sessions or its refresh family.
        Revoked => "revoked",
        /// A valid token without the route's roles, or forward-auth for no (trusted) route.
        Forbidden => "forbidden",
        /// The store could not say whether the token is revoked (refused: fail closed).
        StoreError => "store_error",
    }
}

label_values! {
    /// `keycard_logins_total{outcome}`.
    LoginOutcome {
        /// Tokens issued.
        Ok => "ok",
        /// Wrong password or unknown user (indistinguishable on purpose).
        BadCredentials => "bad_credentials",
        /// Refused by the throttle (429): too many failures, or too many attempts in flight.
        Throttled => "throttled",
        /// Password hashing saturated (503).
        Busy => "busy",
        /// Bad body, content type, method or size, or a body not sent in time.
        InvalidRequest => "invalid_request",
        /// The store did not answer.
        StoreError => "store_error",
        /// Anything else (a 500).
        Error => "error",
    }
}

label_values! {
    /// `keycard_registrations_total{outcome}`.
    RegistrationOutcome {
        /// User created.
        Ok => "ok",
        /// The name is taken (409).
        Exists => "exists",
        /// Bad body, content type, method, size, user name or password.
        InvalidRequest => "invalid_request",
        /// `registration.enabled = false` (403).
        Disabled => "disabled",
        /// Refused by the address throttle (429).
        Throttled => "throttled",
        /// Password hashing saturated (503).
        Busy => "busy",
        /// The store did not answer.
        StoreError => "store_error",
        /// Anything else (a 500).
        Error => "error",
    }
}

label_values! {
    /// `keycard_refreshes_total{outcome}`.
    RefreshOutcome {
        /// A new pair issued.
        Ok => "ok",
        /// No token, a malformed or mis-signed one, an access token, or a deleted user.
        Invalid => "invalid",
        /// The refresh token is past its `exp`.
        Expired => "expired",
        /// The token's session or family was ended (logout, `logout?all=true`, a reuse).
        Revoked => "revoked",
        /// A refresh token presented again after it was rotated (or logged out): its whole
        /// family was revoked.
        Reused => "reused",
        /// Wrong method, two `Authorization` headers.
        InvalidRequest => "invalid_request",
        /// The store did not answer.
        StoreError => "store_error",
        /// Anything else (a 500).
        Error => "error",
    }
}

label_values! {
    /// `keycard_throttle_hits_total{subject}`: which throttle refused an attempt.
    ThrottleSubject {
        /// `throttle.address_*`.
        Address => "address",
        /// `throttle.user_*`.
        User => "user",
    }
}

label_values! {
    /// `keycard_store_duration_seconds{op}`: the store calls the gateway makes.
    StoreOp {
        /// [`crate::auth::store::Store::is_revoked`]: every authenticated request.
        RevocationCheck => "revocation_check",
        /// [`crate::auth::store::Store::get_user`]: `/refresh`.
        UserLookup => "user_lookup",
        /// [`crate::auth::store::Store::create_user`]: `/register`.
        UserCreate => "user_create",
        /// [`crate::auth::store::Store::revoke`]: `/logout`, `/refresh`.
        Revoke => "revoke",
        /// [`crate::auth::store::Store::revoke_family`]: a refresh token reused.
        RevokeFamily => "revoke_family",
        /// [`crate::auth::store::Store::generation`]: `/login`.
        Generation => "generation",
        /// [`crate::auth::store::Store::end_all_sessions`]: `/logout?all=true`.
        EndSessions => "end_sessions",
        /// [`crate::auth::store::Store::begin_attempt`]: the throttle check of a login or
        /// registration (it reads the password hash in the same call).
        ThrottleBegin => "throttle_begin",
        /// Recording how a login or registration attempt ended.
        ThrottleEnd => "throttle_end",
        /// [`crate::auth::store::Store::ping`]: `/readyz`.
        Ping => "ping",
    }
}

label_values! {
    /// The `listener` label.
    Listener {
        /// `server.listen`.
        Public => "public",
        /// `admin.listen`.
        Admin => "admin",
    }
}

label_values! {
    /// `keycard_open_connections{kind}`.
    ConnKind {
        /// HTTP/1.x (and a connection whose first request has not arrived yet).
        Http1 => "http1",
        /// HTTP/2.
        H2 => "h2",
        /// An upgraded (WebSocket) tunnel, for as long as it is open.
        Upgraded => "upgraded",
    }
}

/// The standard methods (RFC 9110 §9, and PATCH); anything else is counted as `OTHER`.
const METHODS: [(Method, &str); 9] = [
    (Method::GET, "GET"),
    (Method::HEAD, "HEAD"),
    (Method::POST, "POST"),
    (Method::PUT, "PUT"),
    (Method::DELETE, "DELETE"),
    (Method::PATCH, "PATCH"),
    (Method::OPTIONS, "OPTIONS"),
    (Method::CONNECT, "CONNECT"),
    (Method::TRACE, "TRACE"),
];

/// Status classes, by `status / 100 - 1`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `method` as a bounded index into [`METHODS`] plus one for `OTHER`.
fn method_index(method: &Method) -> usize {
    METHODS
        .iter()
        .position(|(m, _)| m == method)
        .unwrap_or(METHODS.len())
}

/// `status` as an index into [`STATUS_CLASSES`]; a status outside 100–599 (an upstream may
/// send up to 999) counts as `5xx`.
fn status_class_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100 - 1),
        _ => 4,
    }
}

/// Labels of `keycard_http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// Route path, auth endpoint name, or `-` when nothing matched.
    route: Arc<str>,
    /// A standard method, or `OTHER`.
    method: &'static str,
    /// `1xx` … `5xx`.
    status_class: &'static str,
}

/// Labels of the per-route histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: Arc<str>,
}

/// A label set of one fixed label (`outcome`, `op`, `subject`, `listener`, `result`).
type Fixed = [(&'static str, &'static str); 1];

/// Labels of `keycard_open_connections`.
type ConnLabels = [(&'static str, &'static str); 2];

/// Buckets of the request and upstream histograms: 0.5 ms … ~16 s.
const REQUEST_BUCKETS: (Duration, usize) = (Duration::from_micros(500), 16);

/// Buckets of the store histogram: 50 µs … ~1.6 s (a revocation cache hit is a few µs, a
/// Redis round trip on a LAN a few hundred).
const STORE_BUCKETS: (Duration, usize) = (Duration::from_micros(50), 16);

/// A latency histogram of atomics: bucket bounds doubling from a start, counts and the sum
/// (in nanoseconds, so an observation is two atomic adds). Encoded like prometheus-client's
/// `Histogram` (seconds, cumulative `le` buckets, `+Inf` last).
#[derive(Debug, Clone)]
pub struct Latency(Arc<LatencyInner>);

#[derive(Debug)]
struct LatencyInner {
    /// Upper bounds in nanoseconds, ascending.
    bounds: Box<[u64]>,
    /// One count per bound, plus `+Inf`; not cumulative.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Latency {
    /// `length` buckets from `start`, each twice the one before.
    fn new((start, length): (Duration, usize)) -> Latency {
        let start = u64::try_from(start.as_nanos()).unwrap_or(u64::MAX);
        let bounds: Box<[u64]> = (0..length)
            .map(|i| start.saturating_mul(1u64 << i.min(63)))
            .collect();
        let counts = (0..=length).map(|_| AtomicU64::new(0)).collect();
        Latency(Arc::new(LatencyInner {
            bounds,
            counts,
            sum_nanos: AtomicU64::new(0),
        }))
    }

    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let inner = &self.0;
        let bucket = inner.bounds.partition_point(|&bound| bound < nanos);
        if let Some(count) = inner.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &self.0;
        let mut count = 0;
        let buckets: Vec<(f64, u64)> = inner
            .counts
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let n = n.load(Ordering::Relaxed);
                count += n;
                let bound = inner
                    .bounds
                    .get(i)
                    .map_or(f64::MAX, |&b| Duration::from_nanos(b).as_secs_f64());
                (bound, n)
            })
            .collect();
        let sum = Duration::from_nanos(inner.sum_nanos.load(Ordering::Relaxed)).as_secs_f64();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None::<&_>)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A family of [`Latency`] histograms, all with the same buckets.
type LatencyFamily<L> = Family<L, Latency, fn() -> Latency>;

fn request_latency() -> Latency {
    Latency::new(REQUEST_BUCKETS)
}

fn store_latency() -> Latency {
    Latency::new(STORE_BUCKETS)
}

/// One route label's series: what a request matched to it updates. Routes keep theirs (see
/// [`crate::policy::Route::metrics`]), so no request looks its series up by name.
#[derive(Debug)]
pub struct RouteMetrics {
    label: Arc<str>,
    requests: Family<RequestLabels, Counter>,
    /// `keycard_http_requests_total` by method, then status class; each created on first use
    /// (so only combinations that happened are series) and then kept.
    counts: [[OnceLock<Counter>; 5]; METHODS.len() + 1],
    duration: Latency,
    /// Only for routes that proxy (not endpoints, not `-`).
    upstream: Option<Latency>,
}

impl RouteMetrics {
    /// The route label: also the access log's `route`.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// Counts one answered request (status 499 when the client went away first) and its time
    /// from request head to response head.
    pub fn answered(&self, method: &Method, status: u16, elapsed: Duration) {
        let (m, s) = (method_index(method), status_class_index(status));
        if let Some(cell) = self.counts.get(m).and_then(|row| row.get(s)) {
            cell.get_or_init(|| {
                self.requests.get_or_create_owned(&RequestLabels {
                    route: self.label.clone(),
                    method: METHODS.get(m).map_or("OTHER", |(_, name)| name),
                    status_class: STATUS_CLASSES[s],
                })
            })
            .inc();
        }
        self.duration.observe(elapsed);
    }

    /// Records how long the upstream took to answer a proxied request's head.
    pub fn upstream(&self, elapsed: Duration) {
        if let Some(upstream) = &self.upstream {
            upstream.observe(elapsed);
        }
    }
}

/// One listener's gauges, shared by its connections (see [`crate::connection::Connection`]).
#[derive(Debug)]
pub struct ListenerMetrics {
    /// `keycard_requests_in_flight{listener}`.
    pub in_flight: Gauge,
    /// `keycard_open_connections{listener, kind}`, indexed like [`ConnKind::ALL`].
    open: [Gauge; 3],
}

impl ListenerMetrics {
    /// The open-connections gauge of `kind`.
    pub fn open(&self, kind: ConnKind) -> &Gauge {
        &self.open[kind as usize]
    }
}

/// The registry and the handles the request path updates; shared behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: LatencyFamily<RouteLabel>,
    upstreams: LatencyFamily<RouteLabel>,
    store: Vec<Latency>,
    decisions: Vec<Counter>,
    logins: Vec<Counter>,
    registrations: Vec<Counter>,
    refreshes: Vec<Counter>,
    throttle_hits: Vec<Counter>,
    listeners: Vec<Arc<ListenerMetrics>>,
    reloads: [Counter; 2],
    last_reload_success: Gauge<f64, AtomicU64>,
    workers: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a counter family with one label `name`, creating every value at 0, and returns
/// the handles in the order of `values`.
fn fixed_counters(
    registry: &mut Registry,
    metric: &str,
    help: &str,
    name: &'static str,
    values: impl IntoIterator<Item = &'static str>,
) -> Vec<Counter> {
    let family = Family::<Fixed, Counter>::default();
    let handles = values
        .into_iter()
        .map(|value| family.get_or_create_owned(&[(name, value)]))
        .collect();
    registry.register(metric, help, family);
    handles
}

impl Metrics {
    /// Registers every metric under the `keycard_` prefix, with the series that exist from the
    /// start.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keycard");
        let build = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        build
            .get_or_create(&vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("revision", crate::REVISION),
            ])
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the labels say which keycard this is (version, git revision)",
            build,
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests answered on the public listener, by route, method and status class \
             (4xx includes 499: the client went away first)",
            requests.clone(),
        );
        let durations = LatencyFamily::<RouteLabel>::new_with_constructor(request_latency);
        registry.register(
            "http_request_duration_seconds",
            "Time from request head to response head, by route",
            durations.clone(),
        );
        let upstreams = LatencyFamily::<RouteLabel>::new_with_constructor(request_latency);
        registry.register(
            "upstream_duration_seconds",
            "Time the upstream took to answer a proxied request's head, by route",
            upstreams.clone(),
        );
        let store_family = LatencyFamily::<Fixed>::new_with_constructor(store_latency);
        let store = StoreOp::ALL
            .iter()
            .map(|op| store_family.get_or_create_owned(&[("op", op.label())]))
            .collect();
        registry.register(
            "store_duration_seconds",
            "Latency of store (Redis or memory) calls, by operation",
            store_family,
        );
        let decisions = fixed_counters(
            &mut registry,
            "auth_decisions",
            "Token checks on protected routes and forward-auth, by outcome",
            "outcome",
            AuthOutcome::ALL.iter().map(|o| o.label()),
        );
        let logins = fixed_counters(
            &mut registry,
            "logins",
            "/login attempts, by outcome",
            "outcome",
            LoginOutcome::ALL.iter().map(|o| o.label()),
        );
        let registrations = fixed_counters(
            &mut registry,
            "registrations",
            "/register attempts, by outcome",
            "outcome",
            RegistrationOutcome::ALL.iter().map(|o| o.label()),
        );
        let refreshes = fixed_counters(
            &mut registry,
            "refreshes",
            "/refresh attempts, by outcome",
            "outcome",
            RefreshOutcome::ALL.iter().map(|o| o.label()),
        );
        let throttle_hits = fixed_counters(
            &mut registry,
            "throttle_hits",
            "Login and registration attempts refused by the throttle, by which throttle refused",
            "subject",
            ThrottleSubject::ALL.iter().map(|s| s.label()),
        );
        let in_flight = Family::<Fixed, Gauge>::default();
        let open = Family::<ConnLabels, Gauge>::default();
        let listeners = Listener::ALL
            .iter()
            .map(|l| {
                let listener = ("listener", l.label());
                let kind = |k: ConnKind| open.get_or_create_owned(&[listener, ("kind", k.label())]);
                Arc::new(ListenerMetrics {
                    in_flight: in_flight.get_or_create_owned(&[listener]),
                    open: [
                        kind(ConnKind::Http1),
                        kind(ConnKind::H2),
                        kind(ConnKind::Upgraded),
                    ],
                })
            })
            .collect();
        registry.register(
            "requests_in_flight",
            "Requests received and not yet fully answered (response body included), by listener",
            in_flight,
        );
        registry.register(
            "open_connections",
            "Open client connections, by listener and kind (http1, h2, upgraded)",
            open,
        );
        let reloads = fixed_counters(
            &mut registry,
            "config_reloads",
            "Config reloads, by result (ok, or error: the file was rejected and the old one kept)",
            "result",
            ["ok", "error"],
        );
        let reloads = [reloads[0].clone(), reloads[1].clone()];
        let last_reload_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded (Unix time): at startup, then at each good reload",
            last_reload_success.clone(),
        );
        let workers = Gauge::<i64>::default();
        registry.register(
            "runtime_workers",
            "Event loops serving the public listener (server.workers)",
            workers.clone(),
        );
        last_reload_success.set(unix_now());
        Metrics {
            registry,
            requests,
            durations,
            upstreams,
            store,
            decisions,
            logins,
            registrations,
            refreshes,
            throttle_hits,
            listeners,
            reloads,
            last_reload_success,
            workers,
        }
    }

    /// The series of route label `label`, created now (its latency histograms at 0, so the
    /// route shows from the start); `proxied` routes also get an upstream histogram. Calling
    /// it again for the same label (after a reload) continues the same series.
    pub fn route(&self, label: Arc<str>, proxied: bool) -> Arc<RouteMetrics> {
        let key = RouteLabel {
            route: label.clone(),
        };
        Arc::new(RouteMetrics {
            requests: self.requests.clone(),
            counts: Default::default(),
            duration: self.durations.get_or_create_owned(&key),
            upstream: proxied.then(|| self.upstreams.get_or_create_owned(&key)),
            label,
        })
    }

    /// The gauges of `listener`.
    pub fn listener(&self, listener: Listener) -> Arc<ListenerMetrics> {
        Arc::clone(&self.listeners[listener as usize])
    }

    /// Records how long a store call took.
    pub fn store(&self, op: StoreOp, elapsed: Duration) {
        self.store[op as usize].observe(elapsed);
    }

    /// Counts one token check on a protected route or for forward-auth.
    pub fn auth_decision(&self, outcome: AuthOutcome) {
        self.decisions[outcome as usize].inc();
    }

    /// Counts one `/login`.
    pub fn login(&self, outcome: LoginOutcome) {
        self.logins[outcome as usize].inc();
    }

    /// Counts one `/register`.
    pub fn registration(&self, outcome: RegistrationOutcome) {
        self.registrations[outcome as usize].inc();
    }

    /// Counts one `/refresh`.
    pub fn refresh(&self, outcome: RefreshOutcome) {
        self.refreshes[outcome as usize].inc();
    }

    /// Counts how an auth endpoint request ended, in its endpoint's family (`/login`,
    /// `/register`, `/refresh`; `/logout` and the JWKS have none).
    pub fn endpoint(&self, endpoint: Endpoint, result: Result<(), &RequestError>) {
        use RequestError as E;
        let invalid_request = |e: &RequestError| {
            matches!(
                e,
                E::BadRequest(_)
                    | E::UnsupportedMediaType
                    | E::PayloadTooLarge
                    | E::RequestTimeout
                    | E::BrokenBody
                    | E::MethodNotAllowed { .. }
            )
        };
        match endpoint {
            Endpoint::Login => self.login(match result {
                Ok(()) => LoginOutcome::Ok,
                Err(E::BadCredentials) => LoginOutcome::BadCredentials,
                Err(E::TooManyRequests { .. }) => LoginOutcome::Throttled,
                Err(E::Busy { .. }) => LoginOutcome::Busy,
                Err(E::StoreUnavailable(_)) => LoginOutcome::StoreError,
                Err(e) if invalid_request(e) => LoginOutcome::InvalidRequest,
                Err(_) => LoginOutcome::Error,
            }),
            Endpoint::Register => self.registration(match result {
                Ok(()) => RegistrationOutcome::Ok,
                Err(E::UserExists) => RegistrationOutcome::Exists,
                Err(E::Forbidden(_)) => RegistrationOutcome::Disabled,
                Err(E::TooManyRequests { .. }) => RegistrationOutcome::Throttled,
                Err(E::Busy { .. }) => RegistrationOutcome::Busy,
                Err(E::StoreUnavailable(_)) => RegistrationOutcome::StoreError,
                Err(e) if invalid_request(e) => RegistrationOutcome::InvalidRequest,
                Err(_) => RegistrationOutcome::Error,
            }),
            Endpoint::Refresh => self.refresh(match result {
                Ok(()) => RefreshOutcome::Ok,
                Err(E::MissingAuth | E::InvalidToken(_)) => RefreshOutcome::Invalid,
                Err(E::Expired) => RefreshOutcome::Expired,
                Err(E::Revoked) => RefreshOutcome::Revoked,
                Err(E::Reused) => RefreshOutcome::Reused,
                Err(E::StoreUnavailable(_)) => RefreshOutcome::StoreError,
                Err(e) if invalid_request(e) => RefreshOutcome::InvalidRequest,
                Err(_) => RefreshOutcome::Error,
            }),
            Endpoint::Logout | Endpoint::Jwks => {}
        }
    }

    /// Counts one attempt refused by `subject`'s throttle.
    pub fn throttle_hit(&self, subject: ThrottleSubject) {
        self.throttle_hits[subject as usize].inc();
    }

    /// Records how many event loops serve the public listener (`server.workers`).
    pub fn set_workers(&self, workers: usize) {
        self.workers.set(i64::try_from(workers).unwrap_or(i64::MAX));
    }

    /// Counts one config reload; a good one also stamps the time.
    pub fn config_reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].inc();
        if ok {
            self.last_reload_success.set(unix_now());
        }
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Seconds since the Unix epoch, as Prometheus timestamps are written.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn methods_and_statuses_are_bounded() {
        assert_eq!(method_index(&Method::GET), 0);
        assert_eq!(method_index(&Method::TRACE), 8);
        let foo = Method::from_bytes(b"FOO").unwrap();
        assert_eq!(method_index(&foo), METHODS.len());
        assert_eq!(status_class_index(101), 0);
        assert_eq!(status_class_index(200), 1);
        assert_eq!(status_class_index(499), 3);
        assert_eq!(status_class_index(599), 4);
        assert_eq!(status_class_index(999), 4);
    }

    #[test]
    fn latency_buckets_count_sum_and_encode_cumulatively() {
        let metrics = Metrics::new();
        let route = metrics.route(Arc::from("/api"), true);
        route.answered(&Method::GET, 200, Duration::from_micros(300));
        route.answered(&Method::GET, 204, Duration::from_millis(3));
        route.answered(
            &Method::from_bytes(b"FOO").unwrap(),
            405,
            Duration::from_secs(60),
        );
        let text = metrics.encode();
        let d = "keycard_http_request_duration_seconds";
        assert_eq!(
            line(&text, &format!("{d}_count{{route=\"/api\"}}")),
            Some("3")
        );
        assert_eq!(
            line(
                &text,
                &format!("{d}_bucket{{le=\"0.0005\",route=\"/api\"}}")
            ),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            line(&text, &format!("{d}_bucket{{le=\"0.004\",route=\"/api\"}}")),
            Some("2")
        );
        assert_eq!(
            line(&text, &format!("{d}_bucket{{le=\"+Inf\",route=\"/api\"}}")),
            Some("3")
        );
        let sum: f64 = line(&text, &format!("{d}_sum{{route=\"/api\"}}"))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 60.0033).abs() < 1e-9, "{sum}");
        let r = "keycard_http_requests_total{route=\"/api\"";
        assert_eq!(
            line(&text, &format!("{r},method=\"GET\",status_class=\"2xx\"}}")),
            Some("2")
        );
        assert_eq!(
            line(
                &text,
                &format!("{r},method=\"OTHER\",status_class=\"4xx\"}}")
            ),
            Some("1")
        );
        assert!(text.contains("keycard_upstream_duration_seconds_count{route=\"/api\"} 0"));
    }

    #[test]
    fn fixed_series_exist_at_zero() {
        let text = Metrics::new().encode();
        for series in [
            "keycard_auth_decisions_total{outcome=\"store_error\"} 0",
            "keycard_logins_total{outcome=\"throttled\"} 0",
            "keycard_registrations_total{outcome=\"disabled\"} 0",
            "keycard_refreshes_total{outcome=\"reused\"} 0",
            "keycard_throttle_hits_total{subject=\"address\"} 0",
            "keycard_requests_in_flight{listener=\"admin\"} 0",
            "keycard_open_connections{listener=\"public\",kind=\"upgraded\"} 0",
            "keycard_store_duration_seconds_count{op=\"revocation_check\"} 0",
            "keycard_config_reloads_total{result=\"error\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }
}
