//! `config_parse`: `Config::parse` on arbitrary text (every `${VAR}` resolves to 40 `x`).
//!
//! On error: at least one error, each with a non-empty message and, when it has a position, a
//! line inside the file and a column of at least 1. On success, what the contract promises of
//! a valid config: a secret of at least 32 bytes, TTLs of at least 1s, leeway of at most 5m,
//! canonical route prefixes and upstream base paths, unique route paths each reachable by its
//! own path; tokens issued with the resulting settings verify; and neither `Debug` nor
//! `describe_routes()` depends on the secret or the redis URL (which may carry a password).
//! tests/fuzz_corpus.rs repeats these checks over fuzz/corpus/config_parse on stable.
#![no_main]

use std::path::Path;
use std::time::Duration;

use keycard::auth::token::{TokenType, Tokens};
use keycard::config::{Config, Secret, StoreUrl};
use keycard::routes::{Router, canonicalize};
use libfuzzer_sys::fuzz_target;

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

fn check(text: &str) {
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
    for ty in [TokenType::Access, TokenType::Refresh] {
        let (token, _) = tokens
            .issue("alice", ty)
            .expect("issue with an accepted config");
        tokens
            .verify(&token, ty)
            .expect("own token rejected with an accepted config");
    }

    let described = config.describe_routes();
    assert!(!described.is_empty());
    let debug = format!("{config:?}");
    let mut other = config.clone();
    other.tokens.secret = Secret::new(b"a-completely-different-secret-value-0123".to_vec());
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

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !may_read_special_file(text) {
        check(text);
    }
});
