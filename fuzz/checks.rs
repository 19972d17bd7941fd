//! The invariants checked by the cargo-fuzz targets, written once.
//!
//! Included with `#[path] mod checks;` by each target in fuzz/fuzz_targets (libFuzzer, nightly
//! flags) and by tests/fuzz_corpus.rs (replays fuzz/corpus/<target>/* on stable in
//! `cargo test`). Depends only on keycard, std and crates both sides have (jsonwebtoken,
//! http). Each `check_<target>` takes the raw fuzz input and panics with a message naming the
//! broken promise.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey};
use keycard::auth::token::{TokenType, Tokens};
use keycard::config::{
    AuthMode, Config, ExposeSecret, RouteConfig, Secret, StoreUrl, TokenConfig, Upstream,
};
use keycard::routes::{Router, canonicalize, upstream_path};

// ---- token_verify ----
//
// `Tokens::verify` on arbitrary input never panics and never accepts a token that we did not
// sign. Each input is tried four ways:
// 1. as a token, verbatim (lossy UTF-8);
// 2. with its `header.payload` part re-signed with our key, so mutations reach the claim
//    checks behind the signature;
// 3. as JSON claims (or `header JSON` + newline + `claims JSON`), base64url-encoded and signed
//    with our key, so the fuzzer can mutate claims and header fields directly;
// 4. as the `sub` of tokens we `issue()`: those must verify (for their own type only), and any
//    one-byte change, anywhere or in the signature, must make them fail.
//
// Whatever verifies must carry our HS256 signature over exactly its `header.payload`, an
// HS256 header without `crit`, our issuer, the expected type, and be inside its validity window.

const SECRET: &[u8] = b"keycard-fuzz-secret-0123456789abcdef";
const ISSUER: &str = "keycard";
const DEFAULT_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
const TYPES: [TokenType; 2] = [TokenType::Access, TokenType::Refresh];

/// The verifier under test: HS256 with [`SECRET`], no leeway.
pub fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(|| {
        Tokens::new(&TokenConfig {
            secret: Secret::from(SECRET.to_vec()),
            issuer: ISSUER.into(),
            ..TokenConfig::default()
        })
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Our HS256 signature of `message`, base64url without padding.
fn sign(message: &str) -> String {
    static KEY: OnceLock<EncodingKey> = OnceLock::new();
    let key = KEY.get_or_init(|| EncodingKey::from_secret(SECRET));
    jsonwebtoken::crypto::sign(message.as_bytes(), key, Algorithm::HS256).expect("HS256 signs")
}

fn b64url(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Verifies `token` as both types; whatever is accepted must satisfy every promise.
fn check_verify(token: &str) {
    for expected in TYPES {
        let before = now();
        let result = tokens().verify(token, expected);
        let after = now();
        let claims = match result {
            Ok(claims) => claims,
            Err(e) => {
                assert!(!e.to_string().is_empty(), "empty error for {token:?}");
                continue;
            }
        };
        let (message, signature) = token.rsplit_once('.').expect("accepted without a '.'");
        assert_eq!(
            signature,
            sign(message),
            "accepted a foreign signature: {token:?}"
        );
        let header = jsonwebtoken::decode_header(token).expect("accepted an unreadable header");
        assert_eq!(header.alg, Algorithm::HS256, "{token:?}");
        assert!(header.crit.is_none(), "accepted crit: {token:?}");
        assert_eq!(claims.iss, ISSUER, "{token:?}");
        assert_eq!(claims.token_type, expected, "{token:?}");
        assert!(before < claims.exp, "accepted expired: {token:?}");
        assert!(
            claims.nbf <= after && claims.iat <= after,
            "accepted early: {token:?}"
        );
    }
}

/// Tokens we issue verify for their own type only, and any one-byte change breaks them.
fn check_issued(data: &[u8], text: &str) {
    // A subject that could not be a user name (and so not an identity header) is refused even
    // in a token signed with our key.
    let raw: String = text.chars().take(100).collect();
    if !keycard::auth::is_valid_username(&raw) {
        for ty in TYPES {
            let (token, _) = tokens().issue(&raw, &[], ty).expect("issue failed");
            assert!(tokens().verify(&token, ty).is_err(), "accepted sub {raw:?}");
        }
    }
    // The rest of the checks need a token we accept: the input's user-name characters,
    // lowercased as keycard issues them.
    let sub: String = text
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
        .map(|c| c.to_ascii_lowercase())
        .take(64)
        .collect();
    let sub = if sub.is_empty() {
        "fuzz".to_owned()
    } else {
        sub
    };
    let seed = data.iter().fold(17usize, |h, &b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    for (ty, other) in [(TYPES[0], TYPES[1]), (TYPES[1], TYPES[0])] {
        let (token, issued) = tokens().issue(&sub, &[], ty).expect("issue failed");
        let claims = tokens().verify(&token, ty).expect("own token rejected");
        assert_eq!(
            (claims.sub.as_str(), claims.jti.as_str()),
            (sub.as_str(), issued.jti.as_str())
        );
        assert!(
            tokens().verify(&token, other).is_err(),
            "type confusion: {token}"
        );
        let sig_start = token.rfind('.').expect("three parts") + 1;
        let anywhere = seed % token.len();
        let in_signature = sig_start + seed % (token.len() - sig_start);
        for i in [anywhere, in_signature] {
            let mut bytes = token.clone().into_bytes();
            // A different printable ASCII byte, so the result stays a `str`.
            let mut r = 0x21 + ((seed >> 8) % 94) as u8;
            if r == bytes[i] {
                r = if r == 0x7e { 0x21 } else { r + 1 };
            }
            bytes[i] = r;
            let tampered = String::from_utf8(bytes).expect("ASCII");
            assert!(
                tokens().verify(&tampered, ty).is_err(),
                "byte {i} changed, still accepted: {tampered}"
            );
        }
    }
}

pub fn check_token_verify(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // 1. Verbatim.
    check_verify(&text);
    // 2. Re-signed with our key.
    let message = text.rsplit_once('.').map_or(&*text, |(m, _)| m);
    check_verify(&format!("{message}.{}", sign(message)));
    // 3. As JSON, encoded and signed.
    let (header, claims) = text.split_once('\n').unwrap_or((DEFAULT_HEADER, &text));
    let message = format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(claims.as_bytes())
    );
    check_verify(&format!("{message}.{}", sign(&message)));
    // 4. Our own tokens.
    check_issued(data, &text);
}

// ---- route_match ----
//
// `routes::canonicalize`, `Router::find` and `upstream_path` on arbitrary request paths.
// Whatever `canonicalize` accepts must be canonical: idempotent, starting with `/`, no empty
// segment, no dot-segment, visible ASCII without `\ ; ? #`, and every remaining `%XX` escape
// upper-case and of a byte that is neither unreserved (those are decoded) nor a separator,
// `;` or NUL (those are refused). So an upstream that decodes once sees exactly the segments
// the router matched on. On the fixed table below, the route picked must be the one the
// path's first segment names (`/admin/..` can never land on `/`), its prefix must be a
// whole-segment prefix of the path, and the upstream path must be canonical too.

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
        ..RouteConfig::default()
    }
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let routes: Vec<_> = TABLE.iter().map(|&(p, a)| route(p, a, false, "")).collect();
        Router::new(routes)
    })
}

fn is_canonical_escape(hi: u8, lo: u8) -> bool {
    let hex = |c: u8| matches!(c, b'0'..=b'9' | b'A'..=b'F');
    if !hex(hi) || !hex(lo) {
        return false;
    }
    let v = |c: u8| if c <= b'9' { c - b'0' } else { c - b'A' + 10 };
    let byte = (v(hi) << 4) | v(lo);
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

pub fn check_route_match(data: &[u8]) {
    // Request paths reach the gateway as `str`; invalid UTF-8 never gets this far.
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
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

// ---- config_parse ----
//
// `Config::parse` on arbitrary text (every `${VAR}` resolves to 40 `x`). On error: at least
// one error, each with a non-empty message and, when it has a position, a line inside the file
// and a column of at least 1. On success, what the contract promises of a valid config: a
// secret of at least 32 bytes, TTLs of at least 1s, leeway of at most 5m, canonical route
// prefixes and upstream base paths, unique route paths each reachable by its own path; tokens
// issued with the resulting settings verify; and neither `Debug` nor `describe_routes()`
// depends on the secret or the redis URL (which may carry a password).

/// `tokens.secret_file` makes `parse` read a file. Keep the fuzzer away from devices, /proc
/// and FIFOs (reading /dev/zero or /dev/stdin never ends); `\u`/`\U`/`\x` escapes could spell
/// any key or path, so inputs with them are skipped too.
fn may_read_special_file(text: &str) -> bool {
    ["\\u", "\\U", "\\x"].iter().any(|e| text.contains(e))
        || (text.contains("secret_file")
            && ["dev", "proc", "fd", "run", "std", "tmp", "sys"]
                .iter()
                .any(|w| text.contains(w)))
}

pub fn check_config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if may_read_special_file(text) {
        return;
    }
    let env = |_: &str| Some("x".repeat(40));
    let config = match Config::parse(text, Path::new("fuzz.toml"), &env) {
        Ok(config) => config,
        Err(errors) => {
            assert!(!errors.errors.is_empty(), "Err without errors");
            let lines = text.split('\n').count();
            for e in &errors.errors {
                assert!(!e.to_string().trim().is_empty() && !e.message.trim().is_empty());
                if let Some((line, col)) = e.position {
                    assert!(
                        (1..=lines).contains(&line) && col >= 1,
                        "{e} ({lines} lines)"
                    );
                }
            }
            assert!(!errors.to_string().is_empty());
            return;
        }
    };

    let t = &config.tokens;
    assert!(
        t.secret.expose_secret().len() >= 32,
        "short secret accepted"
    );
    assert!(t.access_ttl >= Duration::from_secs(1) && t.refresh_ttl >= Duration::from_secs(1));
    assert!(
        t.leeway <= Duration::from_secs(300),
        "leeway {:?}",
        t.leeway
    );

    assert!(!config.routes.is_empty(), "no routes accepted");
    let router = Router::new(config.routes.clone());
    for (i, r) in config.routes.iter().enumerate() {
        assert_eq!(
            canonicalize(&r.path).as_deref(),
            Ok(r.path.as_str()),
            "routes[{i}]"
        );
        assert!(
            r.path == "/" || !r.path.ends_with('/'),
            "routes[{i}] {:?}",
            r.path
        );
        let base = &r.upstream.base_path;
        assert!(base.is_empty() || canonicalize(base).as_deref() == Ok(base.as_str()));
        assert!(
            config.routes[..i].iter().all(|q| q.path != r.path),
            "duplicate {:?}",
            r.path
        );
        let found = router.find(&r.path).map(|f| f.path.as_str());
        assert_eq!(found, Some(r.path.as_str()), "routes[{i}] unreachable");
    }

    let tokens = Tokens::new(t);
    for ty in TYPES {
        let (token, _) = tokens
            .issue("alice", &[], ty)
            .expect("issue with an accepted config");
        tokens
            .verify(&token, ty)
            .expect("own token rejected with an accepted config");
    }

    let described = config.describe_routes();
    assert!(!described.is_empty());
    let debug = format!("{config:?}");
    let mut other = config.clone();
    other.tokens.secret = Secret::from(b"a-completely-different-secret-value-0123".to_vec());
    if let StoreUrl::Redis(_) = other.store.url {
        other.store.url = StoreUrl::Redis("redis://:hunter2@elsewhere:6380/3".into());
    }
    assert_eq!(
        format!("{other:?}"),
        debug,
        "Debug depends on the secret or store URL"
    );
    assert_eq!(other.describe_routes(), described, "describe_routes leaks");
}
