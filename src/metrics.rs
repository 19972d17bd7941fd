//! Metrics: the Prometheus counters the gateway updates and the admin listener serves.
//!
//! Labels are bounded on purpose: the route label is a configured route path or an endpoint
//! name (never the request path), so a scan of random URLs cannot grow the series count.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

/// The registry and the handles the request path updates; shared behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    auth_failures: Family<FailureLabels, Counter>,
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
        Metrics {
            registry,
            requests,
            duration,
            auth_failures,
        }
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

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
