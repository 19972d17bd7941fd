//! Admin: the operator listener (`admin.listen`), apart from user traffic.
//!
//! `/healthz` says the process is alive (for restarts), `/readyz` says the store answers (for
//! load balancers: a replica that cannot check revocations must not get traffic) and that
//! keycard is not shutting down (503 from SIGTERM on, so it is taken out of rotation during
//! `server.shutdown_delay`), and `/metrics` serves Prometheus text.

use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::auth::store::Store;
use crate::body::{self, Body};
use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    store: Store,
    metrics: Arc<Metrics>,
    /// True from the shutdown signal on.
    draining: watch::Receiver<bool>,
}

impl Admin {
    /// Shares the gateway's store and metrics; `draining` turns true when shutdown begins.
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
            // Shutting down: out of rotation, whatever the store says.
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
