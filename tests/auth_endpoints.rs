//! The endpoints keycard answers itself: /register, /login, /logout, /refresh — bodies,
//! validation, method rules, rotation, and the memory:// store end to end.

mod support;

use serde_json::{Value, json};
use support::*;

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn post_json(gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    gw.client
        .post(gw.url(path))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn post_raw(gw: &Gateway, path: &str, ct: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut req = gw.client.post(gw.url(path)).body(body);
    if let Some(ct) = ct {
        req = req.header("content-type", ct);
    }
    req.send().await.unwrap()
}

// ----------------------------------------------------------------------------- register

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_with_json_body_returns_201_and_message() {
    let s = Stack::start().await;
    let (status, body) = json_body(s.gw.register("alice", PASSWORD).await).await;
    assert_eq!(status, 201);
    assert_eq!(body, json!({ "msg": "User created successfully" }));
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_login_with_form_bodies() {
    let s = Stack::start().await;
    let body = form(&[("username", "form.user"), ("password", "p@ss word&=+%")]);
    let resp = post_raw(
        &s.gw,
        "/register",
        Some("application/x-www-form-urlencoded"),
        body.clone().into_bytes(),
    )
    .await;
    let (status, v) = json_body(resp).await;
    assert_eq!(
        (status, v),
        (201, json!({ "msg": "User created successfully" }))
    );

    let resp = post_raw(
        &s.gw,
        "/login",
        Some("application/x-www-form-urlencoded"),
        body.into_bytes(),
    )
    .await;
    let (status, v) = json_body(resp).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["access_token"].is_string());
    // The JSON login with the decoded password works too: both bodies mean the same thing.
    s.gw.login("form.user", "p@ss word&=+%").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_accepts_json_with_charset_parameter() {
    let s = Stack::start().await;
    let body = json!({ "username": "charset", "password": PASSWORD }).to_string();
    let resp = post_raw(
        &s.gw,
        "/register",
        Some("application/json; charset=utf-8"),
        body.into_bytes(),
    )
    .await;
    assert_eq!(resp.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_existing_user_is_409_also_in_another_case() {
    let s = Stack::start().await;
    assert_eq!(s.gw.register("dave", PASSWORD).await.status(), 201);
    let f = failure(s.gw.register("dave", PASSWORD).await).await;
    assert_eq!(f.status, 409, "{f:?}");
    let f = failure(s.gw.register("DAVE", "another password").await).await;
    assert_eq!(f.status, 409, "usernames are case-insensitive: {f:?}");
    let f = failure(s.gw.register("DaVe", PASSWORD).await).await;
    assert_eq!(f.status, 409, "{f:?}");
    // The original password still works: the 409s changed nothing.
    s.gw.login("dave", PASSWORD).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_missing_and_invalid_fields_with_400() {
    let s = Stack::start().await;
    let long_name = "a".repeat(65);
    let cases: Vec<(&str, Value)> = vec![
        ("missing password", json!({ "username": "bob" })),
        ("missing username", json!({ "password": PASSWORD })),
        ("empty object", json!({})),
        (
            "empty username",
            json!({ "username": "", "password": PASSWORD }),
        ),
        (
            "65-char username",
            json!({ "username": long_name, "password": PASSWORD }),
        ),
        (
            "space in username",
            json!({ "username": "bob smith", "password": PASSWORD }),
        ),
        (
            "slash in username",
            json!({ "username": "bob/x", "password": PASSWORD }),
        ),
        (
            "colon in username",
            json!({ "username": "bob:x", "password": PASSWORD }),
        ),
        (
            "non-ascii username",
            json!({ "username": "bób", "password": PASSWORD }),
        ),
        (
            "7-byte password",
            json!({ "username": "bob", "password": "1234567" }),
        ),
        (
            "1025-byte password",
            json!({ "username": "bob", "password": "x".repeat(1025) }),
        ),
        (
            "numeric username",
            json!({ "username": 12345, "password": PASSWORD }),
        ),
        ("array body", json!(["bob", PASSWORD])),
    ];
    for (what, body) in cases {
        let f = failure(post_json(&s.gw, "/register", &body).await).await;
        assert_eq!(f.status, 400, "{what}: {f:?}");
    }
    // Nothing was created by the rejected attempts.
    let f = failure(s.gw.login_raw("bob", "x".repeat(1025).as_str()).await).await;
    assert_ne!(f.status, 200);
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_accepts_boundary_lengths_and_all_allowed_characters() {
    let s = Stack::start().await;
    let name64 = "b".repeat(64);
    for (user, pw) in [
        (name64.as_str(), PASSWORD.to_owned()),
        ("x", "12345678".to_owned()),
        ("Mixed.Case_user@example-1", PASSWORD.to_owned()),
        ("longpw", "y".repeat(1024)),
        // 4 characters, 8 bytes: the limit counts bytes.
        ("bytes", "éééé".to_owned()),
    ] {
        let (status, body) = json_body(s.gw.register(user, &pw).await).await;
        assert_eq!(status, 201, "{user}: {body}");
        s.gw.login(user, &pw).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_malformed_json_is_400() {
    let s = Stack::start().await;
    for body in [
        &b"{\"username\": \"bob\", "[..],
        b"not json",
        b"",
        b"\xff\xfe",
    ] {
        let f =
            failure(post_raw(&s.gw, "/register", Some("application/json"), body.to_vec()).await)
                .await;
        assert_eq!(f.status, 400, "{:?}: {f:?}", String::from_utf8_lossy(body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_body_over_16_kib_is_413() {
    let s = Stack::start().await;
    let body = json!({ "username": "big", "password": PASSWORD, "pad": "p".repeat(17 * 1024) });
    let f = failure(post_json(&s.gw, "/register", &body).await).await;
    assert_eq!(f.status, 413, "{f:?}");
    let f = failure(post_json(&s.gw, "/login", &body).await).await;
    assert_eq!(f.status, 413, "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_chunked_body_over_16_kib_is_413() {
    // No Content-Length to check up front: the limit must apply while reading.
    let s = Stack::start().await;
    let pad = "p".repeat(20 * 1024);
    let body = format!("{{\"username\":\"big\",\"password\":\"{PASSWORD}\",\"pad\":\"{pad}\"}}");
    let mut req = String::from(
        "POST /register HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
    );
    for part in body.as_bytes().chunks(4096) {
        req.push_str(&format!(
            "{:x}\r\n{}\r\n",
            part.len(),
            std::str::from_utf8(part).unwrap()
        ));
    }
    req.push_str("0\r\n\r\n");
    let r = raw_request(s.gw.addr, req.as_bytes()).await;
    assert_eq!(r.status, 413, "{}", r.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_text_plain_or_missing_content_type_is_415() {
    let s = Stack::start().await;
    let body = json!({ "username": "ct", "password": PASSWORD }).to_string();
    for ct in [
        Some("text/plain"),
        None,
        Some("multipart/form-data; boundary=x"),
    ] {
        for path in ["/register", "/login"] {
            let f = failure(post_raw(&s.gw, path, ct, body.clone().into_bytes()).await).await;
            assert_eq!(f.status, 415, "{path} with {ct:?}: {f:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_of_one_name_create_exactly_one_user() {
    let s = Stack::start().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = s.gw.client.clone();
        let url = s.gw.url("/register");
        // Different cases and passwords: still one name.
        let user = if i % 2 == 0 { "racer" } else { "RACER" };
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .json(&json!({ "username": user, "password": format!("password-{i}") }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let created = statuses.iter().filter(|&&s| s == 201).count();
    let conflicts = statuses.iter().filter(|&&s| s == 409).count();
    assert_eq!((created, conflicts), (1, 19), "{statuses:?}");
}

// ----------------------------------------------------------------------------- login

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_returns_bearer_token_pair_with_documented_claims() {
    let s = Stack::start().await;
    assert_eq!(s.gw.register("erin", PASSWORD).await.status(), 201);
    let (status, body) = json_body(s.gw.login_raw("erin", PASSWORD).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"].as_i64(), Some(15 * 60), "{body}");
    let access = body["access_token"].as_str().unwrap();
    let refresh = body["refresh_token"].as_str().unwrap();

    let a = decode_claims(access);
    let r = decode_claims(refresh);
    for (c, kind, ttl) in [(&a, "access", 15 * 60), (&r, "refresh", 7 * 24 * 3600)] {
        assert_eq!(c["sub"], "erin", "{c}");
        assert_eq!(c["iss"], "keycard", "{c}");
        assert_eq!(c["type"], kind, "{c}");
        let iat = c["iat"].as_i64().expect("iat");
        let nbf = c["nbf"].as_i64().expect("nbf");
        let exp = c["exp"].as_i64().expect("exp");
        assert!((iat - now()).abs() <= 5, "{c}");
        assert!(nbf <= iat + 1, "{c}");
        assert_eq!(exp - iat, ttl, "{c}");
        let jti = c["jti"].as_str().expect("jti");
        // >= 122 random bits: at least 21 base64 or 31 hex characters.
        assert!(jti.len() >= 21, "jti too short: {jti}");
    }
    assert_ne!(a["jti"], r["jti"]);
    // A second login gets fresh jtis.
    let (a2, _) = s.gw.login("erin", PASSWORD).await;
    assert_ne!(decode_claims(&a2)["jti"], a["jti"]);
    // The token is accepted on a protected route.
    assert_eq!(s.gw.get("/private/x", Some(access)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_wrong_password_and_unknown_user_are_the_same_401() {
    let s = Stack::start().await;
    assert_eq!(s.gw.register("frank", PASSWORD).await.status(), 201);
    let wrong = failure(s.gw.login_raw("frank", "wrong password").await).await;
    let unknown = failure(s.gw.login_raw("nobody", PASSWORD).await).await;
    for f in [&wrong, &unknown] {
        assert_eq!(f.status, 401, "{f:?}");
        assert_eq!(f.msg, "Bad username or password");
        assert!(
            f.www_authenticate
                .as_deref()
                .is_some_and(|v| v.starts_with("Bearer")),
            "every 401 carries WWW-Authenticate: Bearer: {f:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_case_insensitive_and_sub_is_lowercase() {
    let s = Stack::start().await;
    assert_eq!(s.gw.register("Carol", PASSWORD).await.status(), 201);
    for name in ["carol", "CAROL", "Carol"] {
        let (access, refresh) = s.gw.login(name, PASSWORD).await;
        assert_eq!(decode_claims(&access)["sub"], "carol");
        assert_eq!(decode_claims(&refresh)["sub"], "carol");
    }
    let (access, _) = s.gw.login("CAROL", PASSWORD).await;
    let echo = Echo::from_response(s.gw.get("/private/me", Some(&access)).await).await;
    assert_eq!(echo.values("x-auth-user"), vec!["carol"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_rejects_malformed_bodies_with_400() {
    let s = Stack::start().await;
    for body in [json!({ "username": "x" }), json!({ "password": PASSWORD })] {
        let f = failure(post_json(&s.gw, "/login", &body).await).await;
        assert_eq!(f.status, 400, "{body}: {f:?}");
    }
    let f = failure(post_raw(&s.gw, "/login", Some("application/json"), b"{".to_vec()).await).await;
    assert_eq!(f.status, 400, "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_works_with_default_argon2_parameters() {
    let redis = RedisServer::new();
    let upstream = Upstream::start().await;
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    opts.passwords = Default::default();
    let gw = Gateway::start(opts).await;
    let (access, _) = gw.user("slowhash").await;
    assert_eq!(gw.get("/private", Some(&access)).await.status(), 200);
    // Whatever the layout, the store holds an argon2id hash and never the password.
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("*")).await;
    let mut values = Vec::new();
    for key in keys {
        let kind: String = redis.query(redis::cmd("TYPE").arg(&key)).await;
        if kind == "string" {
            let v: String = redis.query(redis::cmd("GET").arg(&key)).await;
            values.push(v);
        } else if kind == "hash" {
            let vs: Vec<String> = redis.query(redis::cmd("HVALS").arg(&key)).await;
            values.extend(vs);
        }
    }
    assert!(values.iter().all(|v| !v.contains(PASSWORD)), "{values:?}");
    assert!(
        values.iter().any(|v| v.contains("\"phc\":\"$argon2id$")),
        "no argon2id hash stored: {values:?}"
    );
}

// ----------------------------------------------------------------------------- methods

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_paths_answer_other_methods_with_405_and_allow() {
    let s = Stack::start().await;
    let cases: [(&str, &[&str]); 8] = [
        ("/login", &["GET", "PUT", "DELETE", "PATCH"]),
        ("/register", &["GET", "PUT", "DELETE", "PATCH"]),
        ("/refresh", &["GET", "PUT", "DELETE", "PATCH"]),
        ("/logout", &["GET", "PUT", "PATCH"]),
        ("/login", &["OPTIONS"]),
        ("/register", &["OPTIONS"]),
        ("/refresh", &["OPTIONS"]),
        ("/logout", &["OPTIONS"]),
    ];
    for (path, methods) in cases {
        for m in methods {
            let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
            let resp =
                s.gw.client
                    .request(method, s.gw.url(path))
                    .send()
                    .await
                    .unwrap();
            let f = failure(resp).await;
            assert_eq!(f.status, 405, "{m} {path}: {f:?}");
            let allow = f
                .headers
                .get("allow")
                .unwrap_or_else(|| panic!("{m} {path}: 405 without Allow"))
                .to_str()
                .unwrap()
                .to_ascii_uppercase();
            assert!(allow.contains("POST"), "{m} {path}: Allow {allow}");
            if path == "/logout" {
                assert!(allow.contains("DELETE"), "{m} {path}: Allow {allow}");
            }
            assert!(!allow.contains(m), "{m} {path}: Allow {allow}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_paths_are_never_forwarded_even_with_a_catch_all_route() {
    let redis = RedisServer::new();
    let upstream = Upstream::start().await;
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    opts.routes
        .push(support::route("/", &upstream.url(), "public"));
    let gw = Gateway::start(opts).await;
    let (access, _) = gw.user("grace").await;
    // The catch-all works (sanity), then clear the count.
    assert_eq!(gw.get("/anything", None).await.status(), 200);
    let before = upstream.hits();
    for path in ["/register", "/login", "/logout", "/refresh"] {
        for m in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let method = reqwest::Method::from_bytes(m.as_bytes()).unwrap();
            let resp = gw
                .client
                .request(method.clone(), gw.url(path))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            assert_ne!(resp.status(), 200, "{m} {path}");
            // And with a token, which must not change anything.
            let _ = gw
                .client
                .request(method, gw.url(&format!("{path}?x=1")))
                .bearer_auth(&access)
                .send()
                .await
                .unwrap();
        }
    }
    assert_eq!(
        upstream.hits(),
        before,
        "auth paths reached the upstream: {:?}",
        &upstream.requests()[before..]
    );
}

// ----------------------------------------------------------------------------- logout

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_with_delete_or_post_revokes_the_access_token() {
    let s = Stack::start().await;
    assert_eq!(s.gw.register("heidi", PASSWORD).await.status(), 201);
    for method in [reqwest::Method::DELETE, reqwest::Method::POST] {
        let (access, _) = s.gw.login("heidi", PASSWORD).await;
        assert_eq!(s.gw.get("/private", Some(&access)).await.status(), 200);
        let resp =
            s.gw.client
                .request(method.clone(), s.gw.url("/logout"))
                .bearer_auth(&access)
                .send()
                .await
                .unwrap();
        let (status, body) = json_body(resp).await;
        assert_eq!(
            (status, body),
            (200, json!({ "msg": "Token revoked" })),
            "{method}"
        );
        let f = failure(s.gw.get("/private", Some(&access)).await).await;
        assert_eq!(f.status, 401, "{f:?}");
        assert_eq!(f.msg, "Token has been revoked");
        assert_invalid_token(&f, "revoked");
        // A second logout with the same token is refused too.
        let resp =
            s.gw.client
                .delete(s.gw.url("/logout"))
                .bearer_auth(&access)
                .send()
                .await
                .unwrap();
        assert_eq!(resp.status(), 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_without_token_is_401_with_bearer_challenge() {
    let s = Stack::start().await;
    let f = failure(
        s.gw.client
            .delete(s.gw.url("/logout"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(f.status, 401, "{f:?}");
    assert_eq!(f.msg, "Missing Authorization Header");
    assert_eq!(f.www_authenticate.as_deref(), Some("Bearer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_with_refresh_token_or_garbage_is_401() {
    let s = Stack::start().await;
    let (_, refresh) = s.gw.user("ivan").await;
    for token in [refresh.as_str(), "garbage"] {
        let resp =
            s.gw.client
                .delete(s.gw.url("/logout"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
        let f = failure(resp).await;
        assert_invalid_token(&f, token);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_revocation_key_expires_when_the_token_would() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("judy").await;
    let claims = decode_claims(&access);
    let jti = claims["jti"].as_str().unwrap();
    let exp = claims["exp"].as_i64().unwrap();
    let resp =
        s.gw.client
            .delete(s.gw.url("/logout"))
            .bearer_auth(&access)
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let key = format!("keycard:revoked:{jti}");
    let pttl: i64 = s.redis.query(redis::cmd("PTTL").arg(&key)).await;
    let remaining_ms = (exp - now()) * 1000;
    assert!(
        pttl > 0 && (pttl - remaining_ms).abs() <= 3000,
        "PTTL {pttl} ms, token has {remaining_ms} ms left"
    );
}

// ----------------------------------------------------------------------------- refresh

async fn refresh(gw: &Gateway, token: &str) -> reqwest::Response {
    gw.client
        .post(gw.url("/refresh"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_returns_a_new_pair_and_the_used_token_is_revoked() {
    let s = Stack::start().await;
    let (_, refresh1) = s.gw.user("ken").await;
    let (status, body) = json_body(refresh(&s.gw, &refresh1).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["expires_in"].is_number());
    let access2 = body["access_token"].as_str().unwrap();
    let refresh2 = body["refresh_token"].as_str().unwrap();
    assert_ne!(refresh2, refresh1);
    assert_eq!(decode_claims(access2)["sub"], "ken");
    assert_eq!(decode_claims(refresh2)["type"], "refresh");
    assert_eq!(s.gw.get("/private", Some(access2)).await.status(), 200);

    // Rotation: the first refresh token is spent.
    let f = failure(refresh(&s.gw, &refresh1).await).await;
    assert_eq!(f.status, 401, "{f:?}");
    assert_eq!(f.msg, "Token has been revoked");
    // Its revocation lives as long as the refresh token would have.
    let c = decode_claims(&refresh1);
    let key = format!("keycard:revoked:{}", c["jti"].as_str().unwrap());
    let ttl: i64 = s.redis.query(redis::cmd("TTL").arg(&key)).await;
    let remaining = c["exp"].as_i64().unwrap() - now();
    assert!(
        ttl > 0 && (ttl - remaining).abs() <= 3,
        "TTL {ttl}, expected ~{remaining}"
    );
    // Since issue 8 the reuse above also revoked the whole family (RFC 9700 §4.14), so the
    // new refresh token is gone too; a new login's works exactly once.
    assert_eq!(refresh(&s.gw, refresh2).await.status(), 401);
    let (_, fresh) = s.gw.login("ken", PASSWORD).await;
    assert_eq!(refresh(&s.gw, &fresh).await.status(), 200);
    assert_eq!(refresh(&s.gw, &fresh).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_with_access_token_or_none_is_401() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("leo").await;
    let f = failure(refresh(&s.gw, &access).await).await;
    assert_invalid_token(&f, "access token at /refresh");
    let f = failure(s.gw.client.post(s.gw.url("/refresh")).send().await.unwrap()).await;
    assert_eq!(f.status, 401);
    assert_eq!(f.www_authenticate.as_deref(), Some("Bearer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_is_refused_on_protected_routes() {
    let s = Stack::start().await;
    let (_, refresh) = s.gw.user("mallory").await;
    let f = failure(s.gw.get("/private", Some(&refresh)).await).await;
    assert_invalid_token(&f, "refresh token as access");
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_with_one_token_yield_at_most_one_success() {
    let s = Stack::start().await;
    let (_, token) = s.gw.user("niaj").await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let client = s.gw.client.clone();
        let url = s.gw.url("/refresh");
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() == 200 {
            ok += 1;
        }
    }
    // At most one wins the rotation; the other uses are reuse, which revokes the family
    // (RFC 9700 §4.14), so the winner's new pair may be revoked before it is even issued.
    assert!(ok <= 1, "a refresh token must be usable at most once: {ok}");
}

// ----------------------------------------------------------------------------- memory store

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_end_to_end() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(GatewayOpts::new("memory://", &upstream.url())).await;
    let (access, refresh1) = gw.user("olivia").await;
    let echo = Echo::from_response(gw.get("/private/data", Some(&access)).await).await;
    assert_eq!(echo.values("x-auth-user"), vec!["olivia"]);
    assert_eq!(
        failure(gw.register("OLIVIA", PASSWORD).await).await.status,
        409
    );

    let resp = refresh(&gw, &refresh1).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(refresh(&gw, &refresh1).await.status(), 401);

    // That reuse revoked the login's family (RFC 9700 §4.14): log out from a new login.
    let (access, _) = gw.login("olivia", PASSWORD).await;
    let resp = gw
        .client
        .delete(gw.url("/logout"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let f = failure(gw.get("/private/data", Some(&access)).await).await;
    assert_eq!(f.msg, "Token has been revoked");
    let ready = gw.client.get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_invalid_fields_is_400_not_401() {
    let s = Stack::start().await;
    let long_name = "a".repeat(65);
    for body in [
        json!({ "username": "bad name", "password": PASSWORD }),
        json!({ "username": long_name, "password": PASSWORD }),
        json!({ "username": "ok", "password": "p".repeat(1025) }),
    ] {
        let f = failure(post_json(&s.gw, "/login", &body).await).await;
        assert_eq!(f.status, 400, "{f:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_are_throttled_with_429_and_retry_after() {
    let s = Stack::start().await;
    assert_eq!(s.gw.register("victim", PASSWORD).await.status(), 201);
    let mut throttled = None;
    for i in 0..100 {
        let resp = s.gw.login_raw("victim", &format!("guess-{i:04}")).await;
        if resp.status() == 429 {
            throttled = Some(resp);
            break;
        }
        assert_eq!(resp.status(), 401);
    }
    let resp = throttled.expect("100 wrong passwords for one user in a row were never throttled");
    let retry = resp
        .headers()
        .get("retry-after")
        .expect("429 carries Retry-After")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        retry.parse::<u64>().is_ok_and(|n| n >= 1),
        "Retry-After {retry}"
    );
    let f = failure(resp).await;
    assert!(!f.msg.is_empty());
}
