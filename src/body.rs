//! Bodies: the one response body type, and helpers for the JSON the gateway writes itself.
//!
//! Proxied bodies stream through untouched (`Incoming` boxed, never collected); the gateway's
//! own answers are small `Full` buffers. Both fit one boxed type so a handler can return either.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// The body of every response keycard sends.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A body of fixed bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A streamed body from the upstream, passed on as it arrives.
pub fn stream(incoming: hyper::body::Incoming) -> Body {
    incoming.boxed()
}

/// A JSON response from any serialisable value.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The `{"msg": "..."}` shape every gateway message and error uses.
pub fn json_msg(status: StatusCode, msg: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "msg": msg }))
}
