//! Header rules for forwarded messages: hop-by-hop removal, identity strip-then-inject and
//! `X-Forwarded-*`.
//!
//! This module owns the step that turns the client's header block into the one the upstream
//! sees (and, for [`remove_hop_by_hop`], the upstream's response headers into the ones the
//! client sees). Pure: no I/O, no async.
//!
//! # Order
//!
//! The caller applies the rules in exactly this order:
//!
//! 1. [`remove_hop_by_hop`] (RFC 9110 §7.6.1): drops `Connection` and every header it names.
//! 2. [`IdentityHeaders::strip`]: drops every client header that looks like an identity
//!    header, in any casing or `_`/`.` spelling.
//! 3. [`set_forwarded`]: replaces (or, for a trusted proxy, extends) `X-Forwarded-*`.
//! 4. [`IdentityHeaders::inject`]: writes the verified user.
//!
//! The order is what makes the identity header the gateway's alone. `Connection` is
//! processed *first*, while only client headers exist, so `Connection: X-Auth-User` can
//! remove at most the client's own (forged) value, never the one injected in step 4; and
//! nothing runs after step 4 that could remove or duplicate it. Stripping runs before
//! injection for the same reason: the injected value is the only one left.

use std::net::IpAddr;

use http::header::{
    CONNECTION, CONTENT_LENGTH, FORWARDED, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::IdentityConfig;

/// `X-Forwarded-For`: the chain of client addresses.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`: the scheme the client used.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`: the `Host` the client asked for.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Real-IP`: nginx's single-address variant, removed from untrusted clients.
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `X-Request-Id`: the gateway's request id (see [`crate::gateway`]); a `Connection` option
/// must not be able to remove it before it reaches the upstream.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `HTTP2-Settings` (RFC 7540 §3.2.1; RFC 9113 dropped the h2c upgrade): a connection-specific
/// field that only means something together with `Upgrade: h2c`, which is never forwarded.
pub const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Whether a header (named in lower case with `-`) describes the client, the URL it asked
/// for or who it is, so that only a proxy in `server.trusted_proxies` may set it; from anyone
/// else it is removed.
///
/// Why: back ends and frameworks believe these.
/// - The whole `X-Forwarded-*` family (address, scheme, host, port, path, prefix, and also
///   oauth2-proxy's `X-Forwarded-User`/`-Email`/`-Groups`/`-Access-Token` and Envoy's
///   `X-Forwarded-Client-Cert`), `X-Forwarded`, `Forwarded` (RFC 7239) and `Forwarded-For`.
/// - Single-address variants: `X-Real-IP` (nginx), `Client-IP`/`X-Client-IP` (Rails, Rack,
///   PHP snippets), `True-Client-IP` (Akamai), `X-Cluster-Client-IP`, `CF-Connecting-IP(v6)`,
///   `Fastly-Client-IP`, `Fly-Client-IP`, `X-Azure-ClientIP`, `X-ARR-ClientIP`,
///   `X-Original-Forwarded-For` (ingress-nginx), `X-Envoy-External-Address`, `X-Remote-Addr`,
///   `X-Remote-IP`, `X-Originating-IP`, `X-ProxyUser-IP`.
/// - Scheme: `X-Scheme` (Tornado), `X-Url-Scheme`, `X-Real-Scheme`, `Front-End-Https`.
/// - The *real* path or host: `X-Original-URL`, `X-Rewrite-URL` (IIS URL Rewrite, older
///   Symfony and Zend), `X-Original-URI`, `X-Original-Path`, `X-Envoy-Original-Path`,
///   `X-Script-Name`, `X-Original-Host`, `X-Host`. A public request could otherwise name a
///   protected path in them.
/// - Other auth proxies' identity headers: `Remote-User`, `X-Remote-User`, `X-WebAuth-User`,
///   `X-Amzn-OIDC-*`, `X-Goog-Authenticated-User-*`, `X-MS-Client-Principal*`,
///   `Cf-Access-Authenticated-User-Email`.
pub fn is_client_describing(name: &str) -> bool {
    name.starts_with("x-forwarded")
        || name.starts_with("x-amzn-oidc-")
        || name.starts_with("x-goog-authenticated-user-")
        || name.starts_with("x-ms-client-principal")
        || matches!(
            name,
            "forwarded"
                | "forwarded-for"
                | "x-real-ip"
                | "client-ip"
                | "x-client-ip"
                | "true-client-ip"
                | "x-cluster-client-ip"
                | "cf-connecting-ip"
                | "cf-connecting-ipv6"
                | "fastly-client-ip"
                | "fly-client-ip"
                | "x-azure-clientip"
                | "x-arr-clientip"
                | "x-original-forwarded-for"
                | "x-envoy-external-address"
                | "x-remote-addr"
                | "x-remote-ip"
                | "x-originating-ip"
                | "x-proxyuser-ip"
                | "x-scheme"
                | "x-url-scheme"
                | "x-real-scheme"
                | "front-end-https"
                | "x-original-url"
                | "x-rewrite-url"
                | "x-original-uri"
                | "x-original-path"
                | "x-envoy-original-path"
                | "x-script-name"
                | "x-original-host"
                | "x-host"
                | "remote-user"
                | "x-remote-user"
                | "x-webauth-user"
                | "cf-access-authenticated-user-email"
        )
}

/// Whether a header (named in lower case with `-`) is one whose meaning keycard itself relies
/// on: hop-by-hop and framing fields, `Host`, the request id. Their `_`/`.` spellings are
/// removed from every request (see [`set_forwarded`]).
fn is_framing_or_gateway(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.as_str() == name)
        || matches!(name, "content-length" | "host" | "x-request-id")
}

/// The fixed hop-by-hop list: RFC 9110 §7.6.1 names `Connection`, `Proxy-Connection`,
/// `Keep-Alive`, `TE`, `Transfer-Encoding` and `Upgrade`; `Trailer` (§6.6.2) describes this
/// hop's framing; `Proxy-Authenticate`/`Proxy-Authorization` (§11.7) are addressed to the
/// proxy, never the origin; `HTTP2-Settings` belongs to an h2c upgrade of this hop only
/// (RFC 7540 §3.2.1) and is removed whether or not `Connection` names it.
const HOP_BY_HOP: [HeaderName; 10] = [
    CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    HTTP2_SETTINGS,
];

/// End-to-end headers that a `Connection` option is not allowed to remove.
///
/// RFC 9110 §7.6.1 forbids senders to list "a field that is intended for all recipients"
/// as a connection option, so honouring such a listing only ever serves an attacker
/// ("hop-by-hop header abuse"): `Connection: X-Forwarded-For` sent through a trusted front
/// proxy that forwards `Connection` would delete the client address that proxy added, and
/// the upstream would take the proxy's own address as the client's. `Host` is kept because
/// `X-Forwarded-Host` is derived from it, `Content-Length` because it is message framing,
/// `X-Request-Id` because it ties the upstream's logs to ours.
const NOT_NOMINATABLE: [HeaderName; 8] = [
    HOST,
    CONTENT_LENGTH,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    FORWARDED,
    X_REAL_IP,
    X_REQUEST_ID,
];

/// Removes hop-by-hop headers from a request or response about to be forwarded.
///
/// Why: RFC 9110 §7.6.1 says a proxy MUST remove `Connection`, every header named as a
/// connection option in it, and the headers that only describe the previous hop. Leaving
/// them would let a client negotiate things (upgrades, framing, keep-alive) directly with
/// the upstream behind the gateway's back.
///
/// `Connection` options are comma-separated, case-insensitive and may carry optional
/// whitespace; every `Connection` header line counts. Options that are not valid header
/// names are ignored. Options naming an end-to-end header the gateway relies on (see
/// `NOT_NOMINATABLE`: `Host`, `Content-Length`, `X-Forwarded-*`, `Forwarded`, `X-Real-IP`,
/// `X-Request-Id`) are deliberately ignored too, as nginx and HAProxy effectively do.
///
/// Allocates only when a `Connection` header names something.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut nominated: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        for option in value.as_bytes().split(|&b| b == b',') {
            let option = option.trim_ascii();
            if option.is_empty() {
                continue;
            }
            // `from_bytes` lower-cases, so `KEEP-ALIVE` and `keep-alive` are one name.
            if let Ok(name) = HeaderName::from_bytes(option)
                && !NOT_NOMINATABLE.contains(&name)
            {
                nominated.push(name);
            }
        }
    }
    for name in &nominated {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// `_` and `.` fold to `-`; ASCII letters to lower case.
///
/// CGI, WSGI, Rack and PHP turn `X_Auth_User`, `X.Auth.User` and `X-Auth-User` into the same
/// variable, so for identity purposes they are the same header.
fn fold(b: u8) -> u8 {
    match b {
        b'_' | b'.' => b'-',
        _ => b.to_ascii_lowercase(),
    }
}

fn fold_str(s: &str) -> Vec<u8> {
    s.bytes().map(fold).collect()
}

/// Whether `name`, folded, starts with `folded_prefix` (already folded).
fn folded_starts_with(name: &[u8], folded_prefix: &[u8]) -> bool {
    name.len() >= folded_prefix.len() && name.iter().zip(folded_prefix).all(|(&a, &b)| fold(a) == b)
}

/// The error from [`IdentityHeaders::inject`]: the user name cannot be sent safely.
///
/// Why an error and not a panic: the name comes from a verified token, so this is a bug or a
/// key compromise, and the request must fail closed (500) rather than take the process down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("user name is not a valid identity header value")]
pub struct InvalidIdentity;

/// The identity header rules, compiled once from `[identity]`.
///
/// Why a type: the folded prefix and user header are computed at startup, so the per-request
/// strip is a byte comparison per header with no allocation when nothing matches.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    /// The header the verified user name is written to, as configured.
    user_header: HeaderName,
    /// `user_header`, folded (see `fold`).
    user_folded: Vec<u8>,
    /// `identity.prefix`, folded; empty disables the prefix rule (it would match everything).
    prefix_folded: Vec<u8>,
    /// `[identity.claims]`: claim → header, with each header folded for the strip rule.
    claims: Vec<(String, HeaderName, Vec<u8>)>,
}

/// The longest claim header written; a longer value (hundreds of roles) is left out, and
/// logged, rather than risk the upstream's header limit.
const MAX_CLAIM_HEADER_BYTES: usize = 4096;

impl IdentityHeaders {
    /// Compiles the rules from the validated config.
    ///
    /// The prefix is folded again here (idempotent) so the rule holds even if the config was
    /// built by hand. An empty prefix would strip every header, so it disables the prefix
    /// rule instead; the user header is stripped regardless.
    pub fn new(config: &IdentityConfig) -> IdentityHeaders {
        IdentityHeaders {
            user_header: config.user_header.clone(),
            user_folded: fold_str(config.user_header.as_str()),
            prefix_folded: fold_str(&config.prefix),
            claims: (config.claims.iter())
                .map(|(claim, name)| (claim.clone(), name.clone(), fold_str(name.as_str())))
                .collect(),
        }
    }

    /// Whether a header name is one only the gateway may set.
    ///
    /// Why folded: back ends that read headers through CGI-style variables cannot tell
    /// `X_Auth_User` from `X-Auth-User`, so a client must not be able to send either. True
    /// when the folded name starts with the configured prefix or equals the folded user
    /// header.
    pub fn is_identity(&self, name: &HeaderName) -> bool {
        let name = name.as_str().as_bytes();
        let equals = |folded: &[u8]| name.len() == folded.len() && folded_starts_with(name, folded);
        (!self.prefix_folded.is_empty() && folded_starts_with(name, &self.prefix_folded))
            || equals(&self.user_folded)
            || self.claims.iter().any(|(_, _, folded)| equals(folded))
    }

    /// Removes every identity header (all values, every spelling) from a client request.
    ///
    /// Why: the upstream trusts these headers blindly, so a client-sent value must never
    /// reach it, on any route, public ones included. No allocation when nothing matches.
    pub fn strip(&self, headers: &mut HeaderMap) {
        if !headers.keys().any(|name| self.is_identity(name)) {
            return;
        }
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| self.is_identity(name))
            .cloned()
            .collect();
        for name in &doomed {
            headers.remove(name);
        }
    }

    /// Sets the user header to the verified user name, replacing any value.
    ///
    /// Why it validates: the name is checked against the contract's user-name alphabet
    /// (`A-Z a-z 0-9 . _ @ -`, 1–64 characters) so that nothing but a plain user name can
    /// ever be presented to the upstream as an identity, whatever ended up in a token.
    pub fn inject(&self, headers: &mut HeaderMap, user: &str) -> Result<(), InvalidIdentity> {
        if !crate::auth::is_valid_username(user) {
            return Err(InvalidIdentity);
        }
        let value = HeaderValue::from_str(user).map_err(|_| InvalidIdentity)?;
        headers.insert(self.user_header.clone(), value);
        Ok(())
    }

    /// Sets the user header to a user named by another issuer (`[[issuers]]`), whose subjects
    /// need not follow keycard's user-name alphabet (`auth0|5f…`, UUIDs): any 1–255 visible
    /// ASCII characters without `,` `;` or quotes.
    pub fn inject_external(
        &self,
        headers: &mut HeaderMap,
        user: &str,
    ) -> Result<(), InvalidIdentity> {
        if !crate::auth::is_safe_identity(user) {
            return Err(InvalidIdentity);
        }
        let value = HeaderValue::from_str(user).map_err(|_| InvalidIdentity)?;
        headers.insert(self.user_header.clone(), value);
        Ok(())
    }

    /// Writes the `[identity.claims]` headers from a verified token, replacing any value.
    /// Arrays (`roles`) are comma-separated; an empty claim writes no header, and a value
    /// that is too long or not a valid header value is left out (and logged).
    pub fn inject_claims(&self, headers: &mut HeaderMap, claims: &crate::auth::token::Claims) {
        for (claim, name, _) in &self.claims {
            let value = match claim.as_str() {
                "sub" => claims.sub.clone(),
                "roles" => claims.roles.join(","),
                "iss" => claims.iss.clone(),
                "aud" => claims.aud.clone().unwrap_or_default(),
                "jti" => claims.jti.clone(),
                _ => continue,
            };
            if value.is_empty() {
                continue;
            }
            match HeaderValue::from_str(&value) {
                Ok(v) if value.len() <= MAX_CLAIM_HEADER_BYTES => {
                    headers.insert(name.clone(), v);
                }
                _ => {
                    tracing::warn!(%claim, header = %name, len = value.len(), "claim left out: too long or not a header value")
                }
            }
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a dual-stack socket reports for an
/// IPv4 client) as the IPv4 address it is; anything else unchanged.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Whether the peer is one of `server.trusted_proxies`.
///
/// Why: only a trusted proxy's `X-Forwarded-*` may be believed; everyone else's are forged
/// until proven otherwise. An IPv4-mapped IPv6 peer is compared as IPv4 (so
/// `::ffff:10.0.0.1` is in `10.0.0.0/8`) and also as written (so it is in
/// `::ffff:0:0/96`).
pub fn is_trusted(peer: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    let canonical = canonical_ip(peer);
    trusted
        .iter()
        .any(|net| net.contains(&canonical) || net.contains(&peer))
}

/// The address of the client a request really comes from: the peer, or, when the peer is a
/// trusted proxy, the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy.
///
/// Why rightmost: every entry left of the last trusted hop was written by whoever sent the
/// request there, so only the entry our own proxies appended is believable. Per-address login
/// throttling keys on this; keying on a load balancer's address would lock out everyone.
/// Unparseable entries stop the walk (the entry before them cannot be trusted either).
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[ipnet::IpNet]) -> IpAddr {
    let mut client = canonical_ip(peer);
    if !is_trusted(peer, trusted) {
        return client;
    }
    let entries: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    for entry in entries.iter().rev() {
        // Some proxies (Azure Application Gateway) write `ip:port` or `[v6]:port`.
        let parsed = entry
            .parse::<IpAddr>()
            .or_else(|_| entry.parse::<std::net::SocketAddr>().map(|a| a.ip()));
        let Ok(ip) = parsed else {
            break;
        };
        client = canonical_ip(ip);
        if !is_trusted(ip, trusted) {
            break;
        }
    }
    client
}

/// Removes the client-describing headers a peer may not send (all of them from an untrusted
/// peer), and from every peer the `_`/`.` spellings of those and of the framing headers
/// (`X_Original_URL`, `x.forwarded.for`, `Transfer_Encoding`).
///
/// Why the spellings: CGI, WSGI, Rack and PHP read `X_Original_URL` and `X-Original-URL` as
/// the same variable (`HTTP_X_ORIGINAL_URL`, the header-underscore confusion of Puma's
/// CVE-2024-45614), and no proxy keycard trusts writes them that way. One scan of the header
/// names; only names holding `_` or `.` are folded, and nothing is allocated unless
/// something goes.
fn strip_client_headers(headers: &mut HeaderMap, trusted: bool) {
    let doomed = |name: &HeaderName| {
        let name = name.as_str();
        if name.bytes().any(|b| b == b'_' || b == b'.') {
            let folded = String::from_utf8(fold_str(name)).unwrap_or_default();
            is_client_describing(&folded) || is_framing_or_gateway(&folded)
        } else {
            !trusted && is_client_describing(name)
        }
    };
    if !headers.keys().any(doomed) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in &names {
        headers.remove(name);
    }
}

/// Sets `X-Forwarded-For`, `-Proto` and `-Host` for the upstream.
///
/// Why: the upstream cannot see the client's address, scheme or requested host any other
/// way, and it must never see forged ones (they drive IP allow-lists, rate limits, redirects
/// and absolute URLs).
///
/// - Any peer: the `_`/`.` spellings of client-describing and framing headers are removed
///   (see `strip_client_headers`).
/// - Untrusted peer: every header [`is_client_describing`] names is removed; then
///   `X-Forwarded-For: <peer>`, `X-Forwarded-Proto: <proto>` and, if the request has a
///   `Host`, `X-Forwarded-Host: <Host>` are set.
/// - Trusted peer: every received `X-Forwarded-For` line is joined into one comma-separated
///   chain and `, <peer>` is appended (the de-facto convention: each proxy appends the
///   address it received the request from). The proxy's other client-describing headers
///   are kept; missing `-Proto` and `-Host` are set as above.
///
/// The peer is written plainly (`10.0.0.1`, `::1`); an IPv4-mapped IPv6 peer is written as
/// IPv4. A `proto` that is not a valid header value is not written (fail closed: the
/// client's value has been removed either way when the peer is untrusted).
pub fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr, trusted: bool, proto: &str) {
    let peer = canonical_ip(peer).to_string();
    strip_client_headers(headers, trusted);

    let mut chain: Vec<u8> = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        let part = value.as_bytes().trim_ascii();
        if part.is_empty() {
            continue;
        }
        if !chain.is_empty() {
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(part);
    }
    if !chain.is_empty() {
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(peer.as_bytes());
    let xff = HeaderValue::from_bytes(&chain)
        .or_else(|_| HeaderValue::from_str(&peer))
        .ok();
    match xff {
        Some(value) => {
            headers.insert(X_FORWARDED_FOR, value);
        }
        None => {
            headers.remove(X_FORWARDED_FOR);
        }
    }

    if !headers.contains_key(X_FORWARDED_PROTO) {
        let value = match proto {
            "http" => Some(HeaderValue::from_static("http")),
            "https" => Some(HeaderValue::from_static("https")),
            other => HeaderValue::from_str(other).ok(),
        };
        if let Some(value) = value {
            headers.insert(X_FORWARDED_PROTO, value);
        }
    }

    if !headers.contains_key(X_FORWARDED_HOST)
        && let Some(host) = headers.get(HOST).cloned()
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn identity() -> IdentityHeaders {
        IdentityHeaders::new(&IdentityConfig {
            user_header: HeaderName::from_static("x-auth-user"),
            prefix: "x-auth-".to_string(),
            claims: Vec::new(),
        })
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn all(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));

    // ---- remove_hop_by_hop ----

    #[test]
    fn fixed_hop_by_hop_headers_are_removed() {
        let mut h = map(&[
            ("connection", "close"),
            ("proxy-connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn connection_header_is_case_insensitive() {
        let mut h = map(&[
            ("connection", "KEEP-ALIVE, X-Foo"),
            ("x-foo", "1"),
            ("keep-alive", "timeout=5"),
            ("x-bar", "2"),
        ]);
        remove_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-foo"));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key("connection"));
        assert_eq!(all(&h, "x-bar"), ["2"]);
    }

    #[test]
    fn connection_options_tolerate_whitespace_and_empty_items() {
        let mut h = map(&[
            ("connection", " ,\tx-a ,, x-b\t, "),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
        ]);
        remove_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-a"));
        assert!(!h.contains_key("x-b"));
        assert!(h.contains_key("x-c"));
    }

    #[test]
    fn every_connection_header_line_counts() {
        let mut h = map(&[
            ("connection", "x-a"),
            ("connection", "X-B"),
            ("x-a", "1"),
            ("x-a", "1b"),
            ("x-b", "2"),
            ("x-c", "3"),
        ]);
        remove_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-a"));
        assert!(!h.contains_key("x-b"));
        assert!(h.contains_key("x-c"));
    }

    #[test]
    fn invalid_connection_options_are_ignored() {
        let mut h = map(&[("connection", "bad name, x-a, (x)"), ("x-a", "1")]);
        remove_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-a"));
    }

    #[test]
    fn connection_cannot_remove_end_to_end_headers_the_gateway_relies_on() {
        let mut h = map(&[
            (
                "connection",
                "Host, Content-Length, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, Forwarded, X-Real-IP",
            ),
            ("host", "example.com"),
            ("content-length", "3"),
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "example.com"),
            ("forwarded", "for=198.51.100.1"),
            ("x-real-ip", "198.51.100.1"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 7);
    }

    #[test]
    fn response_direction_works_the_same() {
        let mut h = map(&[
            ("connection", "keep-alive, x-upstream-hop"),
            ("keep-alive", "timeout=5"),
            ("x-upstream-hop", "1"),
            ("content-type", "text/plain"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    // ---- identity ----

    #[test]
    fn identity_names_fold_case_underscore_and_dot() {
        let id = identity();
        for name in [
            "x-auth-user",
            "X-Auth-User",
            "X_Auth_User",
            "x.auth.user",
            "X-AUTH-ROLE",
            "x_auth_groups",
            "x.auth-anything",
            "X-Auth-",
        ] {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert!(id.is_identity(&name), "{name}");
        }
        for name in [
            "x-auth",
            "x-authuser",
            "x-author",
            "authorization",
            "x-user",
            "xx-auth-user",
        ] {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert!(!id.is_identity(&name), "{name}");
        }
    }

    #[test]
    fn user_header_outside_the_prefix_is_still_identity() {
        let id = IdentityHeaders::new(&IdentityConfig {
            user_header: HeaderName::from_static("remote_user"),
            prefix: "x-auth-".to_string(),
            claims: Vec::new(),
        });
        for name in ["remote-user", "REMOTE_USER", "remote.user", "x-auth-user"] {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert!(id.is_identity(&name), "{name}");
        }
        for name in ["remote-user2", "remote", "x-remote-user"] {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert!(!id.is_identity(&name), "{name}");
        }
    }

    #[test]
    fn prefix_is_folded_even_if_config_was_not() {
        let id = IdentityHeaders::new(&IdentityConfig {
            user_header: HeaderName::from_static("x-auth-user"),
            prefix: "X_Auth.".to_string(),
            claims: Vec::new(),
        });
        assert!(id.is_identity(&HeaderName::from_static("x-auth-role")));
    }

    #[test]
    fn empty_prefix_does_not_strip_everything() {
        let id = IdentityHeaders::new(&IdentityConfig {
            user_header: HeaderName::from_static("x-auth-user"),
            prefix: String::new(),
            claims: Vec::new(),
        });
        assert!(id.is_identity(&HeaderName::from_static("x_auth_user")));
        assert!(!id.is_identity(&HeaderName::from_static("accept")));
    }

    #[test]
    fn strip_removes_all_spellings_and_duplicates() {
        let mut h = map(&[
            ("X-Auth-User", "mallory"),
            ("x-auth-user", "mallory2"),
            ("X_Auth_User", "mallory3"),
            ("x.auth.user", "mallory4"),
            ("X-AUTH-ROLE", "admin"),
            ("x-auth-role", "root"),
            ("accept", "*/*"),
            ("x-authority", "kept"),
            ("authorization", "Bearer t"),
        ]);
        identity().strip(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(left, ["accept", "authorization", "x-authority"]);
    }

    #[test]
    fn strip_preserves_non_identity_headers_and_their_values() {
        let mut h = map(&[("accept", "a"), ("accept", "b"), ("cookie", "c=1")]);
        let before = h.clone();
        identity().strip(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn inject_replaces_any_existing_value() {
        let id = identity();
        let mut h = map(&[("x-auth-user", "a"), ("x-auth-user", "b")]);
        id.inject(&mut h, "alice@example.com").unwrap();
        assert_eq!(all(&h, "x-auth-user"), ["alice@example.com"]);
    }

    #[test]
    fn inject_refuses_names_outside_the_user_alphabet() {
        let id = identity();
        let long = "a".repeat(65);
        for bad in [
            "",
            "a b",
            "a,b",
            "a\r\nx-evil: 1",
            "é",
            "a:b",
            long.as_str(),
        ] {
            let mut h = HeaderMap::new();
            assert_eq!(id.inject(&mut h, bad), Err(InvalidIdentity), "{bad:?}");
            assert!(h.is_empty());
        }
        let mut h = HeaderMap::new();
        assert!(id.inject(&mut h, &"a".repeat(64)).is_ok());
    }

    #[test]
    fn connection_naming_identity_header_cannot_remove_the_injected_value() {
        let id = identity();
        let mut h = map(&[
            ("connection", "X-Auth-User, x_auth_user"),
            ("x-auth-user", "mallory"),
            ("x_auth_user", "mallory"),
            ("host", "example.com"),
        ]);
        remove_hop_by_hop(&mut h);
        id.strip(&mut h);
        set_forwarded(&mut h, PEER, false, "http");
        id.inject(&mut h, "alice").unwrap();
        assert_eq!(all(&h, "x-auth-user"), ["alice"]);
        assert!(!h.contains_key("x_auth_user"));
        assert!(!h.contains_key("connection"));
    }

    #[test]
    fn public_route_sequence_leaves_no_identity() {
        let id = identity();
        let mut h = map(&[("x-auth-user", "mallory"), ("X_AUTH_USER", "mallory")]);
        remove_hop_by_hop(&mut h);
        id.strip(&mut h);
        set_forwarded(&mut h, PEER, false, "http");
        assert!(h.keys().all(|k| !id.is_identity(k)));
    }

    // ---- forwarding ----

    #[test]
    fn untrusted_peer_replaces_forwarding_headers() {
        let mut h = map(&[
            ("host", "app.example.com"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4;proto=https"),
            ("x-real-ip", "1.2.3.4"),
        ]);
        set_forwarded(&mut h, PEER, false, "http");
        assert_eq!(all(&h, "x-forwarded-for"), ["203.0.113.7"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["http"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["app.example.com"]);
        assert!(!h.contains_key("forwarded"));
        assert!(!h.contains_key("x-real-ip"));
    }

    #[test]
    fn underscore_and_dot_spellings_are_removed_even_from_trusted_peers() {
        for trusted in [false, true] {
            let mut h = map(&[
                ("x_original_url", "/admin"),
                ("X.Forwarded.For", "10.0.0.1"),
                ("x_real_ip", "10.0.0.1"),
                ("true_client_ip", "10.0.0.1"),
                ("x_forwarded_proto", "https"),
                ("x_custom_thing", "kept"),
                ("x-original-url", "/admin"),
            ]);
            set_forwarded(&mut h, PEER, trusted, "http");
            for name in [
                "x_original_url",
                "x.forwarded.for",
                "x_real_ip",
                "true_client_ip",
            ] {
                assert!(!h.contains_key(name), "{name} (trusted {trusted})");
            }
            assert_eq!(all(&h, "x_custom_thing"), ["kept"]);
            assert_eq!(h.contains_key("x-original-url"), trusted);
            assert_eq!(all(&h, "x-forwarded-proto").len(), 1);
        }
    }

    #[test]
    fn a_trusted_proxy_may_write_ports_in_x_forwarded_for() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        for (xff, client) in [
            ("198.51.100.7:4711", "198.51.100.7"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("198.51.100.7:4711, 10.0.0.9:80", "198.51.100.7"),
        ] {
            let h = map(&[("x-forwarded-for", xff)]);
            assert_eq!(client_ip(&h, peer, &trusted).to_string(), client, "{xff}");
        }
    }

    #[test]
    fn untrusted_peer_without_host_gets_no_forwarded_host() {
        let mut h = map(&[("x-forwarded-host", "evil.example")]);
        set_forwarded(&mut h, PEER, false, "https");
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
    }

    #[test]
    fn trusted_peer_appends_to_the_chain() {
        let mut h = map(&[("host", "h"), ("x-forwarded-for", "198.51.100.1")]);
        set_forwarded(&mut h, PEER, true, "http");
        assert_eq!(all(&h, "x-forwarded-for"), ["198.51.100.1, 203.0.113.7"]);
    }

    #[test]
    fn trusted_peer_joins_multiple_xff_lines() {
        let mut h = map(&[
            ("x-forwarded-for", "198.51.100.1, 198.51.100.2"),
            ("x-forwarded-for", " 198.51.100.3 "),
            ("x-forwarded-for", ""),
        ]);
        set_forwarded(&mut h, PEER, true, "http");
        assert_eq!(
            all(&h, "x-forwarded-for"),
            ["198.51.100.1, 198.51.100.2, 198.51.100.3, 203.0.113.7"]
        );
    }

    #[test]
    fn trusted_peer_keeps_proto_host_and_forwarded() {
        let mut h = map(&[
            ("host", "internal:8080"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "app.example.com"),
            ("forwarded", "for=198.51.100.1;proto=https"),
            ("x-real-ip", "198.51.100.1"),
        ]);
        set_forwarded(&mut h, PEER, true, "http");
        assert_eq!(all(&h, "x-forwarded-for"), ["203.0.113.7"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["app.example.com"]);
        assert_eq!(all(&h, "forwarded"), ["for=198.51.100.1;proto=https"]);
        assert_eq!(all(&h, "x-real-ip"), ["198.51.100.1"]);
    }

    #[test]
    fn trusted_peer_without_headers_gets_them_set() {
        let mut h = map(&[("host", "app.example.com")]);
        set_forwarded(&mut h, PEER, true, "https");
        assert_eq!(all(&h, "x-forwarded-for"), ["203.0.113.7"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["https"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["app.example.com"]);
    }

    #[test]
    fn ipv6_peers_are_written_plainly_and_mapped_ones_as_ipv4() {
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, IpAddr::V6(Ipv6Addr::LOCALHOST), false, "http");
        assert_eq!(all(&h, "x-forwarded-for"), ["::1"]);
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, mapped, false, "http");
        assert_eq!(all(&h, "x-forwarded-for"), ["10.0.0.1"]);
    }

    #[test]
    fn invalid_proto_is_not_written() {
        let mut h = map(&[("x-forwarded-proto", "https")]);
        set_forwarded(&mut h, PEER, false, "bad\nproto");
        assert!(!h.contains_key("x-forwarded-proto"));
    }

    #[test]
    fn trust_handles_ipv4_mapped_ipv6_peers() {
        let nets: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert!(is_trusted(mapped, &nets));
        assert!(is_trusted(IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7)), &nets));
        assert!(!is_trusted(PEER, &nets));
        let outside = IpAddr::V6(Ipv4Addr::new(11, 0, 0, 1).to_ipv6_mapped());
        assert!(!is_trusted(outside, &nets));
        assert!(!is_trusted(PEER, &[]));
        let v6: Vec<ipnet::IpNet> = vec!["fd00::/8".parse().unwrap()];
        assert!(is_trusted("fd00::1".parse().unwrap(), &v6));
        assert!(!is_trusted("::1".parse().unwrap(), &v6));
        let mapped_net: Vec<ipnet::IpNet> = vec!["::ffff:10.0.0.0/104".parse().unwrap()];
        assert!(is_trusted(mapped, &mapped_net));
    }

    #[test]
    fn client_ip_is_the_rightmost_untrusted_hop() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("6.6.6.6, 1.2.3.4"),
        );
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.7"));
        let lb: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "9.9.9.9".parse().unwrap();
        // Behind our proxies: the last address they saw, not the forged leftmost one.
        assert_eq!(
            client_ip(&h, lb, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // From an untrusted peer the header is ignored.
        assert_eq!(client_ip(&h, stranger, &trusted), stranger);
        // No header: the peer itself.
        assert_eq!(client_ip(&HeaderMap::new(), lb, &trusted), lb);
        // Garbage stops the walk at the last good trusted hop.
        let mut g = HeaderMap::new();
        g.append(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4, junk"));
        assert_eq!(client_ip(&g, lb, &trusted), lb);
    }
}
