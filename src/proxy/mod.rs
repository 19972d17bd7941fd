//! Proxy: forwards an authenticated request to its upstream and streams the answer back.

pub mod headers;
