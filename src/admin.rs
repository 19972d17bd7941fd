//! Admin: the operator listener (`admin.listen`), apart from user traffic.
//!
//! `/healthz` says the process is alive (for restarts), `/readyz` says the store answers and
//! keycard is not shutting down (for load balancers: a replica that cannot check revocations,
//! or is about to stop, must not get new traffic), and
//! `/metrics` serves Prometheus text.

use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::auth::store::Store;
use crate::body::{self, Body};
use crate::metrics::Metrics;
use tokio::sync::watch;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    store: Store,
    metrics: Arc<Metrics>,
    /// True once a shutdown signal has arrived (see `server.shutdown_delay`).
    draining: watch::Receiver<bool>,
}

impl Admin {
    /// Shares the gateway's store and metrics, and the shutdown signal's first step.
    pub fn new(store: Store, metrics: Arc<Metrics>, draining: watch::Receiver<bool>) -> Admin {
        Admin {
            store,
            metrics,
            draining,
        }
    }

    /// Answers one admin request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            let mut response = body::json_msg(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match request.uri().path() {
            "/healthz" => body::json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
            "/readyz" if *self.draining.borrow() => body::json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "draining", "msg": "Shutting down"}),
            ),
            "/readyz" => match self.store.ping().await {
                Ok(()) => body::json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
                Err(error) => {
                    tracing::warn!(%error, "not ready: store unavailable");
                    body::json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({"status": "unavailable", "msg": "Authentication store unavailable"}),
                    )
                }
            },
            "/metrics" => {
                let mut response = Response::new(body::full(self.metrics.encode()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            _ => body::json_msg(StatusCode::NOT_FOUND, "Not found"),
        }
    }
}
