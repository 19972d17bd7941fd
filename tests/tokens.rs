//! Protected routes: the Authorization header, token verification (forged, expired, wrong
//! kind), and revocation through the store — including keys written by another process.

mod support;

use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use support::*;

/// Sends `token` to a protected route and asserts a 401 `invalid_token` that never reached
/// the upstream.
async fn assert_rejected(s: &Stack, token: &str, what: &str) -> Failure {
    let before = s.upstream.hits();
    let f = failure(s.gw.get("/private/resource", Some(token)).await).await;
    assert_invalid_token(&f, what);
    assert_eq!(
        s.upstream.hits(),
        before,
        "{what}: forwarded to the upstream"
    );
    f
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

// ----------------------------------------------------------------------------- header rules

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_route_without_authorization_is_401_with_bearer_challenge() {
    let s = Stack::start().await;
    for path in ["/private", "/private/x", "/api/v1/things?q=1", "/token"] {
        let f = failure(s.gw.get(path, None).await).await;
        assert_eq!(f.status, 401, "{path}: {f:?}");
        assert_eq!(f.msg, "Missing Authorization Header");
        assert_eq!(f.www_authenticate.as_deref(), Some("Bearer"));
    }
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_is_forwarded_with_x_auth_user_and_without_authorization() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("alice").await;
    let echo = Echo::from_response(s.gw.get("/private/a?b=c", Some(&access)).await).await;
    assert_eq!(echo.path, "/private/a?b=c");
    assert_eq!(echo.values("x-auth-user"), vec!["alice"]);
    assert!(
        !echo.has("authorization"),
        "Authorization must not be forwarded by default: {:?}",
        echo.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_token_route_passes_authorization_upstream() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("bob").await;
    let echo = Echo::from_response(s.gw.get("/token/x", Some(&access)).await).await;
    assert_eq!(
        echo.values("authorization"),
        vec![format!("Bearer {access}")]
    );
    assert_eq!(echo.values("x-auth-user"), vec!["bob"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_are_400_and_not_forwarded() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("carl").await;
    for path in ["/private", "/api/x"] {
        let resp =
            s.gw.client
                .get(s.gw.url(path))
                .header("authorization", format!("Bearer {access}"))
                .header("authorization", format!("Bearer {access}"))
                .send()
                .await
                .unwrap();
        let f = failure(resp).await;
        assert_eq!(f.status, 400, "{path}: {f:?}");
    }
    // Same over a raw socket with different casing.
    let req = raw_get(
        "/private",
        &[
            &format!("Authorization: Bearer {access}"),
            &format!("authorization: Bearer {access}"),
        ],
    );
    let r = raw_request(s.gw.addr, &req).await;
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_on_a_public_route_are_400() {
    // The contract's "More than one Authorization header -> 400" has no route condition.
    let s = Stack::start().await;
    let resp =
        s.gw.client
            .get(s.gw.url("/public/x"))
            .header("authorization", "Bearer a")
            .header("authorization", "Bearer b")
            .send()
            .await
            .unwrap();
    let status = resp.status();
    assert_eq!(status, 400, "{}", resp.text().await.unwrap());
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_bearer_or_empty_authorization_is_401() {
    let s = Stack::start().await;
    for value in [
        "Basic YWxpY2U6cGFzc3dvcmQ=",
        "Bearer",
        "Bearer ",
        "Token abc",
    ] {
        let resp =
            s.gw.client
                .get(s.gw.url("/private"))
                .header("authorization", value)
                .send()
                .await
                .unwrap();
        let f = failure(resp).await;
        assert_eq!(f.status, 401, "{value:?}: {f:?}");
        assert!(
            f.www_authenticate
                .as_deref()
                .is_some_and(|v| v.starts_with("Bearer")),
            "{value:?}: {f:?}"
        );
    }
    assert_eq!(s.upstream.hits(), 0);
}

// ----------------------------------------------------------------------------- verification

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_minted_with_the_configured_secret_bytes_is_accepted() {
    // The contract: the HS* secret is the configured string's UTF-8 bytes, so any issuer
    // that shares it can mint tokens keycard accepts.
    let s = Stack::start().await;
    let token = mint_valid(&claims("external", "access"));
    let echo = Echo::from_response(s.gw.get("/private", Some(&token)).await).await;
    assert_eq!(echo.values("x-auth-user"), vec!["external"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alg_none_token_is_rejected() {
    let s = Stack::start().await;
    let c = claims("alice", "access");
    assert_rejected(&s, &alg_none(&c), "alg none").await;
    // Also with a copied valid signature appended, and "None"/"NONE" spellings.
    let valid = mint_valid(&c);
    let sig = valid.rsplit('.').next().unwrap();
    assert_rejected(&s, &format!("{}{sig}", alg_none(&c)), "alg none + sig").await;
    for alg in ["None", "NONE", "nOnE"] {
        let header = b64url(json!({ "alg": alg, "typ": "JWT" }).to_string().as_bytes());
        let payload = b64url(c.to_string().as_bytes());
        assert_rejected(&s, &format!("{header}.{payload}."), alg).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signed_with_another_algorithm_is_rejected() {
    let s = Stack::start().await;
    let c = claims("alice", "access");
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let t = mint(alg, SECRET.as_bytes(), &c);
        assert_rejected(&s, &t, &format!("{alg:?} with the right secret")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signed_with_a_wrong_secret_is_rejected() {
    let s = Stack::start().await;
    let c = claims("alice", "access");
    let t = mint(
        Algorithm::HS256,
        b"some-other-secret-of-at-least-32-bytes!!",
        &c,
    );
    assert_rejected(&s, &t, "wrong secret").await;
    let t = mint(Algorithm::HS256, b"", &c);
    assert_rejected(&s, &t, "empty secret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_payload_is_rejected() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("eve").await;
    let c = decode_claims(&access);
    let forged = with_payload(&access, &with(c.clone(), "sub", json!("admin")));
    assert_rejected(&s, &forged, "sub changed").await;
    let forged = with_payload(&access, &with(c, "exp", json!(now() + 999_999)));
    assert_rejected(&s, &forged, "exp extended").await;
    // Signature stripped.
    let unsigned = access.rsplit_once('.').unwrap().0.to_owned() + ".";
    assert_rejected(&s, &unsigned, "signature removed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_issuer_is_rejected() {
    let s = Stack::start().await;
    let c = with(claims("alice", "access"), "iss", json!("someone-else"));
    assert_rejected(&s, &mint_valid(&c), "wrong iss").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_401_token_has_expired() {
    let s = Stack::start().await;
    let t = now();
    let c = json!({
        "sub": "alice", "iat": t - 1000, "nbf": t - 1000, "exp": t - 60,
        "jti": random_jti(), "iss": "keycard", "type": "access",
    });
    let f = assert_rejected(&s, &mint_valid(&c), "expired").await;
    assert_eq!(f.msg, "Token has expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_token_expires_after_access_ttl() {
    let s = Stack::start_with(|o| o.tokens.access_ttl = Duration::from_secs(2)).await;
    let (access, _) = s.gw.user("shortlived").await;
    assert_eq!(s.gw.get("/private", Some(&access)).await.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    let f = assert_rejected(&s, &access, "expired by ttl").await;
    assert_eq!(f.msg, "Token has expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbf_or_iat_in_the_future_is_rejected() {
    let s = Stack::start().await;
    let c = claims("alice", "access");
    let t = now();
    assert_rejected(
        &s,
        &mint_valid(&with(c.clone(), "nbf", json!(t + 300))),
        "nbf",
    )
    .await;
    assert_rejected(&s, &mint_valid(&with(c, "iat", json!(t + 300))), "iat").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leeway_allows_small_clock_skew_only() {
    let s = Stack::start_with(|o| o.tokens.leeway = Duration::from_secs(60)).await;
    let t = now();
    let c = claims("alice", "access");
    let skewed = with(with(c.clone(), "iat", json!(t + 30)), "nbf", json!(t + 30));
    assert_eq!(
        s.gw.get("/private", Some(&mint_valid(&skewed)))
            .await
            .status(),
        200,
        "30 s of skew is within a 60 s leeway"
    );
    let just_expired = with(c.clone(), "exp", json!(t - 30));
    assert_eq!(
        s.gw.get("/private", Some(&mint_valid(&just_expired)))
            .await
            .status(),
        200
    );
    let far = with(c, "iat", json!(t + 300));
    assert_rejected(&s, &mint_valid(&far), "iat beyond leeway").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_type_is_rejected() {
    let s = Stack::start().await;
    let c = claims("alice", "access");
    assert_rejected(
        &s,
        &mint_valid(&with(c.clone(), "type", json!("refresh"))),
        "refresh",
    )
    .await;
    assert_rejected(
        &s,
        &mint_valid(&with(c.clone(), "type", json!("admin"))),
        "admin",
    )
    .await;
    assert_rejected(&s, &mint_valid(&with(c, "type", json!(1))), "numeric type").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_required_claim_missing_is_rejected() {
    let s = Stack::start().await;
    let c = claims("alice", "access");
    // Sanity: the complete set is accepted.
    assert_eq!(
        s.gw.get("/private", Some(&mint_valid(&c))).await.status(),
        200
    );
    for key in ["sub", "iat", "nbf", "exp", "jti", "iss", "type"] {
        let t = mint_valid(&without(c.clone(), key));
        assert_rejected(&s, &t, &format!("missing {key}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_tokens_are_rejected() {
    let s = Stack::start().await;
    for t in [
        "garbage",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.eyJ9.xx",
        &"A".repeat(4000),
    ] {
        assert_rejected(&s, t, t).await;
    }
    // A valid token with trailing data.
    let t = mint_valid(&claims("alice", "access")) + ".extra";
    assert_rejected(&s, &t, "four segments").await;
}

// ----------------------------------------------------------------------------- revocation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_jti_written_directly_to_redis_is_rejected_on_next_request() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("frank").await;
    assert_eq!(s.gw.get("/private", Some(&access)).await.status(), 200);
    let jti = decode_claims(&access)["jti"].as_str().unwrap().to_owned();
    let () = s
        .redis
        .query(
            redis::cmd("SET")
                .arg(format!("keycard:revoked:{jti}"))
                .arg("1"),
        )
        .await;
    let hits = s.upstream.hits();
    let f = failure(s.gw.get("/private", Some(&access)).await).await;
    assert_eq!(f.status, 401, "{f:?}");
    assert_eq!(f.msg, "Token has been revoked");
    assert_invalid_token(&f, "revoked");
    assert_eq!(s.upstream.hits(), hits);
    // Deleting the key un-revokes it: the check is a live lookup, not a cache.
    let () = s
        .redis
        .query(redis::cmd("DEL").arg(format!("keycard:revoked:{jti}")))
        .await;
    assert_eq!(s.gw.get("/private", Some(&access)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_of_an_externally_minted_token_uses_its_jti() {
    let s = Stack::start().await;
    let c = claims("grace", "access");
    let token = mint_valid(&c);
    assert_eq!(s.gw.get("/private", Some(&token)).await.status(), 200);
    let key = format!("keycard:revoked:{}", c["jti"].as_str().unwrap());
    let () = s
        .redis
        .query(redis::cmd("SET").arg(&key).arg("1").arg("EX").arg(600))
        .await;
    let f = failure(s.gw.get("/private", Some(&token)).await).await;
    assert_eq!(f.msg, "Token has been revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_uses_the_configured_store_prefix() {
    let s = Stack::start_with(|o| o.store.prefix = "kc-test:".into()).await;
    let (access, _) = s.gw.user("heidi").await;
    let jti = decode_claims(&access)["jti"].as_str().unwrap().to_owned();
    // The default prefix means nothing here.
    let () = s
        .redis
        .query(
            redis::cmd("SET")
                .arg(format!("keycard:revoked:{jti}"))
                .arg("1"),
        )
        .await;
    assert_eq!(s.gw.get("/private", Some(&access)).await.status(), 200);
    let () = s
        .redis
        .query(
            redis::cmd("SET")
                .arg(format!("kc-test:revoked:{jti}"))
                .arg("1"),
        )
        .await;
    let f = failure(s.gw.get("/private", Some(&access)).await).await;
    assert_eq!(f.msg, "Token has been revoked");
    // Logout writes under the prefix too, and users live there.
    let keys: Vec<String> = s
        .redis
        .query(redis::cmd("KEYS").arg("kc-test:user:*"))
        .await;
    assert_eq!(keys, vec!["kc-test:user:heidi".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_401_on_a_protected_route_carries_www_authenticate() {
    let s = Stack::start().await;
    let c = claims("alice", "access");
    let tokens = [
        None,
        Some("garbage".to_owned()),
        Some(alg_none(&c)),
        Some(mint_valid(&with(c.clone(), "exp", json!(now() - 10)))),
    ];
    for t in &tokens {
        let f = failure(s.gw.get("/api/x", t.as_deref()).await).await;
        assert_eq!(f.status, 401);
        assert!(
            f.www_authenticate
                .as_deref()
                .is_some_and(|v| v.starts_with("Bearer")),
            "{t:?}: {f:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_hs512_is_the_only_algorithm_accepted() {
    let s = Stack::start_with(|o| o.tokens.algorithm = jsonwebtoken::Algorithm::HS512).await;
    let (access, _) = s.gw.user("olga").await;
    let header: Value =
        serde_json::from_slice(&b64url_decode(access.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["alg"], "HS512", "{header}");
    assert_eq!(s.gw.get("/private", Some(&access)).await.status(), 200);
    let c = claims("olga", "access");
    let ok = mint(Algorithm::HS512, SECRET.as_bytes(), &c);
    assert_eq!(s.gw.get("/private", Some(&ok)).await.status(), 200);
    for alg in [Algorithm::HS256, Algorithm::HS384] {
        let t = mint(alg, SECRET.as_bytes(), &c);
        assert_rejected(&s, &t, &format!("{alg:?} when HS512 is configured")).await;
    }
}
