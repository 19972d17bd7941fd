//! keycard: an authentication gateway.
//!
//! keycard answers `/register`, `/login`, `/logout` and `/refresh` itself and puts every other
//! request behind a JWT check (signature, expiry, issuer, type, and a revocation lookup in the
//! store) before streaming it to the upstream its route names, with the caller's identity in a
//! header the gateway alone controls.
//!
//! # Layout
//!
//! A request runs one way through the crate:
//!
//! ```text
//! server (accept, HTTP/1 + HTTP/2, drain) -> gateway (request id, log, dispatch)
//!   -> routes (canonical path, longest prefix) -> auth (token, store) -> proxy -> upstream
//! ```
//!
//! - [`config`]: the TOML file parsed once into typed structs. Pure.
//! - [`server`]: listeners, connection handling, graceful shutdown.
//! - [`framing`]: refuses requests with ambiguous HTTP/1 framing (request smuggling).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on their own listener.
//! - [`connection`]: what one client connection shares with its requests (slot, streams).
//! - [`gateway`]: the per-request service and access log; holds the current policy.
//! - [`policy`]: the compiled config (route table, keys, limits), swapped whole on reload.
//! - [`reload`]: watches the config file and SIGHUP, and swaps in a new policy.
//! - [`error`]: the one error enum and its one mapping to responses.
//! - [`routes`]: path canonicalisation and route matching. Pure.
//! - [`auth`]: tokens, password hashing, the store and the auth endpoints.
//! - [`proxy`]: header rules and the streaming upstream client.
//! - [`tls`]: the listener's certificate, upstream CAs, and the rustls configurations.
//! - [`dev`]: the `keycard dev` playground.

#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod body;
pub mod config;
pub mod connection;
pub mod dev;
pub mod error;
pub mod framing;
pub mod gateway;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod server;
pub mod tls;
pub mod users;

pub use server::{Listeners, run, run_with_reload};

/// `keycard --version`: the crate version and the git revision it was built from
/// (`unknown` when built without git; see `build.rs`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("KEYCARD_GIT_REV"),
    ")"
);

/// The git revision keycard was built from, as in [`VERSION`].
pub const REVISION: &str = env!("KEYCARD_GIT_REV");
