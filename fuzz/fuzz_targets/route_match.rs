//! `route_match`: `routes::canonicalize`, `Router::find` and `upstream_path` on arbitrary
//! request paths.
//!
//! Whatever `canonicalize` accepts must be canonical: idempotent, starting with `/`, no empty
//! segment, no dot-segment, visible ASCII without `\ ; ? #`, and every remaining `%XX` escape
//! upper-case and of a byte that is neither unreserved (those are decoded) nor a separator,
//! `;` or NUL (those are refused). So an upstream that decodes once sees exactly the segments
//! the router matched on. On the fixed table below, the route picked must be the one the
//! path's first segment names (`/admin/..` can never land on `/`), its prefix must be a
//! whole-segment prefix of the path, and the upstream path must be canonical too.
//! tests/fuzz_corpus.rs repeats these checks over fuzz/corpus/route_match on stable.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use keycard::config::{AuthMode, RouteConfig, Upstream};
use keycard::routes::{Router, canonicalize, upstream_path};
use libfuzzer_sys::fuzz_target;

/// The table: (prefix, auth). The catch-all is protected; `/public` and `/static` are not.
const TABLE: [(&str, AuthMode); 4] = [
    ("/public", AuthMode::Public),
    ("/", AuthMode::Required),
    ("/admin", AuthMode::Required),
    ("/static", AuthMode::Public),
];

fn route(path: &str, auth: AuthMode, strip_prefix: bool, base_path: &str) -> RouteConfig {
    RouteConfig {
        path: path.into(),
        upstream: Upstream {
            scheme: http::uri::Scheme::HTTP,
            authority: http::uri::Authority::from_static("127.0.0.1:3000"),
            base_path: base_path.into(),
        },
        auth,
        strip_prefix,
        forward_token: false,
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(60),
    }
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let routes: Vec<_> = TABLE.iter().map(|&(p, a)| route(p, a, false, "")).collect();
        Router::new(&routes)
    })
}

fn is_canonical_escape(hi: u8, lo: u8) -> bool {
    let hex = |c: u8| matches!(c, b'0'..=b'9' | b'A'..=b'F');
    if !hex(hi) || !hex(lo) {
        return false;
    }
    let v = |c: u8| if c <= b'9' { c - b'0' } else { c - b'A' + 10 };
    let byte = v(hi) << 4 | v(lo);
    let unreserved = byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~');
    !unreserved && !matches!(byte, 0 | b'/' | b'\\' | b';')
}

/// Every promise about a canonical path.
fn check_canonical(raw: &str, path: &str) {
    assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    assert!(!path.contains("//"), "{raw:?} -> {path:?}");
    assert!(
        path.split('/').all(|s| s != "." && s != ".."),
        "{raw:?} -> {path:?}"
    );
    let upper = path.to_ascii_uppercase();
    for bad in ["%2F", "%5C", "%00", "%3B", "%2E"] {
        assert!(!upper.contains(bad), "{raw:?} -> {path:?}");
    }
    let b = path.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        assert!(
            c.is_ascii_graphic() && !b"\\;?#".contains(&c),
            "{raw:?} -> {path:?}"
        );
        if c == b'%' {
            let (hi, lo) = (b.get(i + 1).copied(), b.get(i + 2).copied());
            assert!(
                matches!((hi, lo), (Some(h), Some(l)) if is_canonical_escape(h, l)),
                "{raw:?} -> {path:?}"
            );
        }
    }
    assert_eq!(
        canonicalize(path).as_deref(),
        Ok(path),
        "not idempotent: {raw:?}"
    );
}

fn check(raw: &str) {
    let Ok(path) = canonicalize(raw) else {
        return;
    };
    check_canonical(raw, &path);

    let found = router()
        .find(&path)
        .expect("the catch-all matches everything");
    let prefix = found.path.trim_end_matches('/');
    assert!(
        prefix.is_empty()
            || path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with('/')),
        "{raw:?} -> {path:?} routed to {}",
        found.path
    );
    // With this table the first segment alone decides: "/adminx" is not "/admin".
    let first = path.split('/').nth(1).unwrap_or_default();
    let expected = match first {
        "public" | "admin" | "static" => format!("/{first}"),
        _ => "/".to_string(),
    };
    assert_eq!(found.path, expected, "{raw:?} -> {path:?}");
    let auth = TABLE.iter().find(|(p, _)| *p == expected).map(|r| r.1);
    assert_eq!(Some(found.auth), auth, "{raw:?}");

    for strip in [false, true] {
        for base in ["", "/v1"] {
            let r = route(&found.path, found.auth, strip, base);
            let up = upstream_path(&r, &path);
            assert!(up.starts_with('/'), "{raw:?} -> {up:?}");
            check_canonical(raw, &up);
            let rest = if strip {
                &path[prefix.len()..]
            } else {
                &path[..]
            };
            let rest = if rest.is_empty() { "/" } else { rest };
            assert_eq!(
                up,
                format!("{base}{rest}"),
                "{raw:?} strip={strip} base={base:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Request paths reach the gateway as `str`; invalid UTF-8 never gets this far.
    if let Ok(raw) = std::str::from_utf8(data) {
        check(raw);
    }
});
