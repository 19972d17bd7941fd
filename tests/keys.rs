//! Keys: RS256/ES256/EdDSA signing, `kid` on every token, previous keys that still verify,
//! rotation by reload, `aud`, and the JWKS checked by a standard JWT library (PyJWT).
//!
//! Real redis-server, real upstream, real gateway, over HTTP. The PEM keys are the test-only
//! fixtures in `tests/keys`.

mod support;

use jsonwebtoken::Algorithm;
use serde_json::Value;
use support::*;

/// The header of a token, decoded.
fn header(token: &str) -> Value {
    let part = token.split('.').next().unwrap();
    serde_json::from_slice(&b64url_decode(part).unwrap()).unwrap()
}

async fn jwks(gw: &Gateway) -> (reqwest::header::HeaderMap, Value) {
    let resp = gw
        .client
        .get(gw.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    (headers, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_carry_their_kid_and_audience_and_the_jwks_lists_only_public_parts() {
    let s = Stack::start_with(|o| {
        sign_with(&mut o.tokens, Algorithm::ES256, "es256.pem", "2026-11");
        o.tokens.audience = Some("my-api".into());
    })
    .await;
    let (access, refresh) = s.gw.user("erin").await;
    for token in [&access, &refresh] {
        let h = header(token);
        assert_eq!(
            (h["alg"].as_str(), h["kid"].as_str()),
            (Some("ES256"), Some("2026-11"))
        );
        assert_eq!(decode_claims(token)["aud"], "my-api");
    }
    assert_eq!(s.gw.get("/private/x", Some(&access)).await.status(), 200);
    let (headers, set) = jwks(&s.gw).await;
    assert_eq!(headers["cache-control"], "public, max-age=300");
    let keys = set["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{set}");
    assert_eq!(keys[0]["kid"], "2026-11");
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["alg"], "ES256");
    assert!(keys[0].get("d").is_none(), "private part published: {set}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hmac_keys_the_jwks_is_empty_and_never_shows_a_secret() {
    let s = Stack::start().await;
    let (_, set) = jwks(&s.gw).await;
    assert_eq!(set, serde_json::json!({"keys": []}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyjwt_verifies_keycard_tokens_against_the_published_jwks() {
    // The contract for upstreams that verify tokens themselves: a standard library, given
    // only the JWKS, accepts the token (signature, alg, aud, iss) and reads the user.
    const SCRIPT: &str = r#"
import json, sys, jwt
jwks, token, audience = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
kid = jwt.get_unverified_header(token)["kid"]
key = [k for k in jwks["keys"] if k["kid"] == kid][0]
claims = jwt.decode(token, jwt.PyJWK(key).key, algorithms=[key["alg"]],
                    audience=audience, issuer="keycard")
print(claims["sub"])
"#;
    for (alg, pem) in [
        (Algorithm::RS256, "rs256.pem"),
        (Algorithm::ES256, "es256.pem"),
        (Algorithm::EdDSA, "ed25519.pem"),
    ] {
        let s = Stack::start_with(|o| {
            sign_with(&mut o.tokens, alg, pem, &format!("{alg:?}-key"));
            o.tokens.audience = Some("my-api".into());
        })
        .await;
        let (access, _) = s.gw.user("pat").await;
        let (_, set) = jwks(&s.gw).await;
        // /usr/bin/python3: Debian's, with python3-jwt (scripts/test.sh installs it).
        let out = std::process::Command::new("/usr/bin/python3")
            .args(["-c", SCRIPT, &set.to_string(), &access, "my-api"])
            .output()
            .expect("/usr/bin/python3 (apt-get install python3-jwt python3-cryptography)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{alg:?}: PyJWT refused the token: {stderr}"
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "pat",
            "{alg:?}"
        );

        // And it refuses one that does not verify: the check above is not vacuous.
        let tampered = with_payload(&access, &{
            let mut c = decode_claims(&access);
            c["sub"] = "mallory".into();
            c
        });
        let out = std::process::Command::new("/usr/bin/python3")
            .args(["-c", SCRIPT, &set.to_string(), &tampered, "my-api"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{alg:?}: PyJWT accepted a tampered token"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_old_tokens_until_the_old_key_is_removed_and_reloaded() {
    let redis = RedisServer::new();
    let upstream = Upstream::start().await;
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    sign_with(
        &mut opts.tokens,
        Algorithm::ES256,
        "es256-old.pem",
        "2026-10",
    );
    let (gw, file) = Gateway::start_reloadable(opts.clone()).await;
    let (old, _) = gw.user("rory").await;
    assert_eq!(header(&old)["kid"], "2026-10");

    // Rotate: a new signing key; the old one stays as a previous key.
    sign_with(&mut opts.tokens, Algorithm::ES256, "es256.pem", "2026-11");
    opts.tokens.previous_keys = vec![previous_pem(
        Algorithm::ES256,
        "es256-old.pub.pem",
        "2026-10",
    )];
    file.write(&opts.to_toml());
    wait_for(&gw, |h| h["kid"] == "2026-11").await;
    let (new, _) = gw.login("rory", PASSWORD).await;
    assert_eq!(header(&new)["kid"], "2026-11");
    assert_eq!(
        gw.get("/private/x", Some(&old)).await.status(),
        200,
        "no forced logout"
    );
    assert_eq!(gw.get("/private/x", Some(&new)).await.status(), 200);
    let (_, set) = jwks(&gw).await;
    let kids: Vec<&str> = set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, ["2026-11", "2026-10"]);

    // Retire the old key: its tokens stop working, the new ones do not.
    opts.tokens.previous_keys.clear();
    file.write(&opts.to_toml());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gw.get("/private/x", Some(&old)).await.status() == 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "retired key still accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let f = failure(gw.get("/private/x", Some(&old)).await).await;
    assert_eq!(
        (f.status, f.msg.as_str()),
        (401, "Signature verification failed")
    );
    assert_eq!(gw.get("/private/x", Some(&new)).await.status(), 200);
}

/// Waits (bounded) until a fresh login's token header satisfies `done`.
async fn wait_for(gw: &Gateway, done: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (token, _) = gw.login("rory", PASSWORD).await;
        if done(&header(&token)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_kid_is_tried_against_the_current_key_only() {
    const OLD: &str = "an-old-hmac-secret-0123456789-abcdefghijkl";
    let s = Stack::start_with(|o| {
        o.tokens.previous_keys = vec![PreviousKey {
            kid: "old".into(),
            algorithm: Some(Algorithm::HS256),
            secret: Secret::from(OLD.as_bytes().to_vec()),
            ..PreviousKey::default()
        }];
    })
    .await;
    let claims = claims("kim", "access");
    // Minted before keys had ids, with the current secret: accepted.
    let no_kid = mint(Algorithm::HS256, SECRET.as_bytes(), &claims);
    assert!(header(&no_kid).get("kid").is_none_or(Value::is_null));
    assert_eq!(s.gw.get("/private/x", Some(&no_kid)).await.status(), 200);
    // The previous key verifies only when the token names it.
    let old_no_kid = mint(Algorithm::HS256, OLD.as_bytes(), &claims);
    let f = failure(s.gw.get("/private/x", Some(&old_no_kid)).await).await;
    assert_eq!(
        (f.status, f.msg.as_str()),
        (401, "Signature verification failed")
    );
    let with_kid = |kid: &str, secret: &[u8]| {
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap()
    };
    assert_eq!(
        s.gw.get("/private/x", Some(&with_kid("old", OLD.as_bytes())))
            .await
            .status(),
        200
    );
    // An unknown kid, or a kid naming the wrong key, is refused.
    for token in [
        with_kid("nope", SECRET.as_bytes()),
        with_kid("old", SECRET.as_bytes()),
    ] {
        let f = failure(s.gw.get("/private/x", Some(&token)).await).await;
        assert_eq!(
            (f.status, f.msg.as_str()),
            (401, "Signature verification failed")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_is_required_when_configured() {
    let s = Stack::start_with(|o| o.tokens.audience = Some("my-api".into())).await;
    let (access, _) = s.gw.user("ada").await;
    assert_eq!(s.gw.get("/private/x", Some(&access)).await.status(), 200);
    let mut c = claims("ada", "access");
    let missing = mint_valid(&c);
    let f = failure(s.gw.get("/private/x", Some(&missing)).await).await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Missing claim"));
    c["aud"] = "other-api".into();
    let f = failure(s.gw.get("/private/x", Some(&mint_valid(&c))).await).await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Invalid audience"));
    c["aud"] = "my-api".into();
    assert_eq!(
        s.gw.get("/private/x", Some(&mint_valid(&c))).await.status(),
        200
    );
}
