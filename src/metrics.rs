//! Metrics: the Prometheus counters the gateway updates and the admin listener serves.
//!
//! Labels are bounded on purpose: the route label is a configured route path or an endpoint
//! name (never the request path), so a scan of random URLs cannot grow the series count.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `keycard_http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// Route path, auth endpoint name, or `-` when nothing matched.
    route: Arc<str>,
    /// Response status code.
    status: u16,
}

/// Labels of `keycard_auth_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    /// `missing`, `invalid`, `expired`, `revoked`, `store_unavailable`, `bad_credentials`.
    reason: &'static str,
}

/// Labels of `keycard_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    /// `ok` or `error`.
    result: &'static str,
}

/// The registry and the handles the request path updates; shared behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    auth_failures: Family<FailureLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    last_reload_success: Gauge<f64, AtomicU64>,
    workers: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `keycard_` prefix.
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
            "Requests answered, by route and status",
            requests.clone(),
        );
        // 0.5 ms .. ~16 s
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "http_request_duration_seconds",
            "Time from request head to response head",
            duration.clone(),
        );
        let auth_failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused by authentication, by reason",
            auth_failures.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads, by result (ok, or error: the file was rejected and the old one kept)",
            reloads.clone(),
        );
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
        let metrics = Metrics {
            registry,
            requests,
            duration,
            auth_failures,
            reloads,
            last_reload_success,
            workers,
        };
        metrics.last_reload_success.set(unix_now());
        // Both series exist from the start, so `increase(...)` sees the first error too.
        for result in ["ok", "error"] {
            let _ = metrics.reloads.get_or_create(&ReloadLabels { result });
        }
        metrics
    }

    /// Records how many event loops serve the public listener (`server.workers`).
    pub fn set_workers(&self, workers: usize) {
        self.workers.set(i64::try_from(workers).unwrap_or(i64::MAX));
    }

    /// Counts one answered request.
    pub fn request(&self, route: &Arc<str>, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                status,
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one authentication refusal.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&FailureLabels { reason })
            .inc();
    }

    /// Counts one config reload; a good one also stamps the time.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
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
