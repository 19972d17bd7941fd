//! Replays the checked-in fuzz corpus (fuzz/corpus/<target>/*) through the same checks as the
//! cargo-fuzz targets in fuzz/fuzz_targets, on stable and without libFuzzer, so CI catches a
//! regression on any seed or on any input the fuzzers once found. The checks are copies of
//! the targets' (keep them in step); each target file documents what its checks mean.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey};
use keycard::auth::token::{TokenType, Tokens};
use keycard::config::{AuthMode, Config, RouteConfig, Secret, StoreUrl, TokenConfig, Upstream};
use keycard::framing::Scanner;
use keycard::routes::{Router, canonicalize, upstream_path};

/// Runs `check` on every file of fuzz/corpus/`target`; fails naming every file that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).expect("corpus file");
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: checks failed for {failed:#?}");
}

// ---- token_verify ----

const SECRET: &[u8] = b"keycard-fuzz-secret-0123456789abcdef";
const TYPES: [TokenType; 2] = [TokenType::Access, TokenType::Refresh];

fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(|| {
        Tokens::new(&TokenConfig {
            algorithm: Algorithm::HS256,
            secret: Secret::new(SECRET.to_vec()),
            issuer: "keycard".into(),
            access_ttl: Duration::from_secs(900),
            refresh_ttl: Duration::from_secs(7 * 86400),
            leeway: Duration::ZERO,
        })
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sign(message: &str) -> String {
    let key = EncodingKey::from_secret(SECRET);
    jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("HS256 signs")
}

fn b64url(input: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
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
        assert_eq!(signature, sign(message), "accepted a foreign signature");
        let header = jsonwebtoken::decode_header(token).expect("accepted an unreadable header");
        assert_eq!(header.alg, Algorithm::HS256);
        assert!(header.crit.is_none(), "accepted crit");
        assert_eq!(claims.iss, "keycard");
        assert_eq!(claims.token_type, expected);
        assert!(before < claims.exp, "accepted expired");
        assert!(claims.nbf <= after && claims.iat <= after, "accepted early");
    }
}

fn check_issued(data: &[u8], text: &str) {
    let sub: String = text.chars().take(64).collect();
    let seed = data.iter().fold(17usize, |h, &b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    for (ty, other) in [(TYPES[0], TYPES[1]), (TYPES[1], TYPES[0])] {
        let (token, issued) = tokens().issue(&sub, ty).expect("issue failed");
        let claims = tokens().verify(&token, ty).expect("own token rejected");
        assert_eq!((claims.sub, claims.jti), (sub.clone(), issued.jti));
        assert!(tokens().verify(&token, other).is_err(), "type confusion");
        let sig_start = token.rfind('.').expect("three parts") + 1;
        for i in [
            seed % token.len(),
            sig_start + seed % (token.len() - sig_start),
        ] {
            let mut bytes = token.clone().into_bytes();
            let mut r = 0x21 + ((seed >> 8) % 94) as u8;
            if r == bytes[i] {
                r = if r == 0x7e { 0x21 } else { r + 1 };
            }
            bytes[i] = r;
            let tampered = String::from_utf8(bytes).expect("ASCII");
            assert!(tokens().verify(&tampered, ty).is_err(), "byte {i} changed");
        }
    }
}

fn token_verify(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_verify(&text);
    let message = text.rsplit_once('.').map_or(&*text, |(m, _)| m);
    check_verify(&format!("{message}.{}", sign(message)));
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;
    let (header, claims) = text.split_once('\n').unwrap_or((header, &text));
    let message = format!(
        "{}.{}",
        b64url(header.as_bytes()),
        b64url(claims.as_bytes())
    );
    check_verify(&format!("{message}.{}", sign(&message)));
    check_issued(data, &text);
}

#[test]
fn token_verify_corpus() {
    replay("token_verify", token_verify);
    // The corpus must keep reaching the success path, or the invariants above test nothing.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/token_verify");
    let valid = std::fs::read_to_string(dir.join("valid-access.jwt")).expect("seed");
    assert!(tokens().verify(&valid, TokenType::Access).is_ok());
}

// ---- route_match ----

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

fn check_canonical(raw: &str, path: &str) {
    assert!(
        path.starts_with('/') && !path.contains("//"),
        "{raw:?} -> {path:?}"
    );
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
            let ok = matches!((hi, lo), (Some(h), Some(l)) if is_canonical_escape(h, l));
            assert!(ok, "{raw:?} -> {path:?}");
        }
    }
    assert_eq!(canonicalize(path).as_deref(), Ok(path), "not idempotent");
}

fn route_match(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = canonicalize(raw) else {
        return;
    };
    check_canonical(raw, &path);
    let routes: Vec<_> = TABLE.iter().map(|&(p, a)| route(p, a, false, "")).collect();
    let router = Router::new(&routes);
    let found = router
        .find(&path)
        .expect("the catch-all matches everything");
    let prefix = found.path.trim_end_matches('/');
    let whole_segment = prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('/'));
    assert!(whole_segment, "{path:?} routed to {}", found.path);
    let first = path.split('/').nth(1).unwrap_or_default();
    let expected = match first {
        "public" | "admin" | "static" => format!("/{first}"),
        _ => "/".to_string(),
    };
    assert_eq!(found.path, expected, "{raw:?} -> {path:?}");
    let auth = TABLE.iter().find(|(p, _)| *p == expected).map(|r| r.1);
    assert_eq!(Some(found.auth), auth);
    for strip in [false, true] {
        for base in ["", "/v1"] {
            let up = upstream_path(&route(&found.path, found.auth, strip, base), &path);
            check_canonical(raw, &up);
            let rest = if strip {
                &path[prefix.len()..]
            } else {
                &path[..]
            };
            let rest = if rest.is_empty() { "/" } else { rest };
            assert_eq!(up, format!("{base}{rest}"), "strip={strip} base={base:?}");
        }
    }
}

#[test]
fn route_match_corpus() {
    replay("route_match", route_match);
}

// ---- config_parse ----

fn may_read_special_file(text: &str) -> bool {
    ["\\u", "\\U", "\\x"].iter().any(|e| text.contains(e))
        || (text.contains("secret_file")
            && ["dev", "proc", "fd", "run", "std", "tmp", "sys"]
                .iter()
                .any(|w| text.contains(w)))
}

fn config_parse(data: &[u8]) {
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
            return;
        }
    };
    let t = &config.tokens;
    assert!(t.secret.expose().len() >= 32, "short secret accepted");
    assert!(t.access_ttl >= Duration::from_secs(1) && t.refresh_ttl >= Duration::from_secs(1));
    assert!(
        t.leeway <= Duration::from_secs(300),
        "leeway {:?}",
        t.leeway
    );
    assert!(!config.routes.is_empty(), "no routes accepted");
    let router = Router::new(&config.routes);
    for (i, r) in config.routes.iter().enumerate() {
        assert_eq!(canonicalize(&r.path).as_deref(), Ok(r.path.as_str()));
        assert!(r.path == "/" || !r.path.ends_with('/'), "routes[{i}]");
        let base = &r.upstream.base_path;
        assert!(base.is_empty() || canonicalize(base).as_deref() == Ok(base.as_str()));
        assert!(
            config.routes[..i].iter().all(|q| q.path != r.path),
            "duplicate"
        );
        let found = router.find(&r.path).map(|f| f.path.as_str());
        assert_eq!(found, Some(r.path.as_str()), "routes[{i}] unreachable");
    }
    let tokens = Tokens::new(t);
    for ty in TYPES {
        let (token, _) = tokens.issue("alice", ty).expect("issue");
        tokens.verify(&token, ty).expect("own token rejected");
    }
    let described = config.describe_routes();
    let debug = format!("{config:?}");
    let mut other = config.clone();
    other.tokens.secret = Secret::new(b"a-completely-different-secret-value-0123".to_vec());
    if let StoreUrl::Redis(_) = other.store.url {
        other.store.url = StoreUrl::Redis("redis://:hunter2@elsewhere:6380/3".into());
    }
    assert_eq!(
        format!("{other:?}"),
        debug,
        "Debug depends on the secret or URL"
    );
    assert_eq!(other.describe_routes(), described, "describe_routes leaks");
}

#[test]
fn config_parse_corpus() {
    replay("config_parse", config_parse);
}

// ---- framing_scan ----

use keycard::framing::REJECTED_HEAD;

fn run(input: &[u8], step: usize, max_head: usize) -> Vec<u8> {
    let mut scanner = Scanner::new(max_head);
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        scanner.push(piece);
        out.extend_from_slice(scanner.ready());
        scanner.consume(scanner.ready().len());
    }
    scanner.finish();
    out.extend_from_slice(scanner.ready());
    out
}

fn has_cl_and_te(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    let has = |n: &str| {
        request
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(n))
    };
    has("content-length") && has("transfer-encoding")
}

fn check_one(input: &[u8], out: &[u8], what: &str) {
    if out == input {
        return;
    }
    let kept = out
        .strip_suffix(REJECTED_HEAD)
        .unwrap_or_else(|| panic!("{what}: output is neither the input nor a refusal"));
    assert!(input.starts_with(kept), "{what}: bytes changed");
    let refused = &input[kept.len()..];
    assert!(
        has_cl_and_te(refused),
        "{what}: refused a head without CL+TE"
    );
}

fn framing_scan(data: &[u8]) {
    let seed = data
        .iter()
        .fold(0usize, |h, &b| h.wrapping_mul(31) ^ usize::from(b));
    let chosen = 1 + seed % 97;
    let unbounded = data.len() + 1;
    let whole = run(data, data.len().max(1), unbounded);
    check_one(data, &whole, "one read");
    let mut steps = vec![chosen, 2, 7, 64, 8192];
    if data.len() <= 2048 {
        steps.push(1);
    }
    for step in steps {
        let out = run(data, step, unbounded);
        check_one(data, &out, &format!("step {step}"));
        assert!(out == whole, "step {step} differs from a single read");
    }
    for max_head in [16, 1 + seed % 256] {
        let out = run(data, chosen, max_head);
        check_one(data, &out, &format!("step {chosen}, max_head {max_head}"));
    }
}

#[test]
fn framing_scan_corpus() {
    replay("framing_scan", framing_scan);
}
