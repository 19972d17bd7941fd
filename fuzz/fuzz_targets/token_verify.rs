//! `token_verify`: `Tokens::verify` on arbitrary input never panics and never accepts a token
//! that we did not sign.
//!
//! Each input is tried four ways:
//! 1. as a token, verbatim (lossy UTF-8);
//! 2. with its `header.payload` part re-signed with our key, so mutations reach the claim
//!    checks behind the signature;
//! 3. as JSON claims (or `header JSON` + newline + `claims JSON`), base64url-encoded and signed
//!    with our key, so the fuzzer can mutate claims and header fields directly;
//! 4. as the `sub` of tokens we `issue()`: those must verify (for their own type only), and any
//!    one-byte change, anywhere or in the signature, must make them fail.
//!
//! Whatever verifies must carry our HS256 signature over exactly its `header.payload`, an
//! HS256 header without `crit`, our issuer, the expected type, and be inside its validity window.
//! tests/fuzz_corpus.rs repeats these checks over fuzz/corpus/token_verify on stable.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey};
use keycard::auth::token::{TokenType, Tokens};
use keycard::config::{Secret, TokenConfig};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"keycard-fuzz-secret-0123456789abcdef";
const ISSUER: &str = "keycard";
const DEFAULT_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
const TYPES: [TokenType; 2] = [TokenType::Access, TokenType::Refresh];

fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(|| {
        Tokens::new(&TokenConfig {
            algorithm: Algorithm::HS256,
            secret: Secret::new(SECRET.to_vec()),
            issuer: ISSUER.into(),
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
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
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
    let sub: String = text.chars().take(64).collect();
    let seed = data.iter().fold(17usize, |h, &b| {
        h.wrapping_mul(31).wrapping_add(usize::from(b))
    });
    for (ty, other) in [(TYPES[0], TYPES[1]), (TYPES[1], TYPES[0])] {
        let (token, issued) = tokens().issue(&sub, ty).expect("issue failed");
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

fuzz_target!(|data: &[u8]| {
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
});
