//! Authorization: roles stored with users and carried in tokens, routes that require roles
//! (403), `auth = "optional"`, claims sent upstream as headers (and stripped from clients),
//! and `[registration]`.
//!
//! Real redis-server, real upstream, real gateway, over HTTP.

mod support;

use serde_json::Value;
use support::*;

/// Gives `user` these roles in the store, as `keycard user roles` would.
async fn set_roles(redis: &RedisServer, user: &str, roles: &[&str]) {
    let key = format!("keycard:user:{user}");
    let stored: String = redis.query(redis::cmd("GET").arg(&key)).await;
    let mut record: Value = serde_json::from_str(&stored).expect("a JSON user record");
    record["roles"] = roles.iter().map(|r| Value::from(*r)).collect();
    let () = redis
        .query(redis::cmd("SET").arg(&key).arg(record.to_string()))
        .await;
}

fn admin_routes(o: &mut GatewayOpts, upstream: &str) {
    o.routes.push(RouteConfig {
        roles: vec!["admin".into(), "ops".into()],
        ..route("/admin", upstream, "required")
    });
    o.routes.push(route("/maybe", upstream, "optional"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_roles_needs_one_of_them_else_403() {
    let s = Stack::start_with(|o| {
        let up = o.routes[0].upstream.to_string();
        admin_routes(o, &up);
    })
    .await;
    let (joe, _) = s.gw.user("joe").await;
    s.gw.register("root", PASSWORD).await;
    set_roles(&s.redis, "root", &["ops"]).await;
    let (root, _) = s.gw.login("root", PASSWORD).await;
    assert_eq!(decode_claims(&root)["roles"], serde_json::json!(["ops"]));
    assert_eq!(decode_claims(&joe)["roles"], serde_json::json!([]));

    let f = failure(s.gw.get("/admin/x", Some(&joe)).await).await;
    assert_eq!((f.status, f.msg.as_str()), (403, "Forbidden"));
    assert_eq!(s.gw.get("/admin/x", Some(&root)).await.status(), 200);
    // Other routes do not care about roles.
    assert_eq!(s.gw.get("/private/x", Some(&joe)).await.status(), 200);
    // No token is still 401, and a revoked token with the right role is 401, not 403.
    assert_eq!(s.gw.get("/admin/x", None).await.status(), 401);
    let logout = s.gw.logout(&root).await;
    assert_eq!(logout.status(), 200);
    let f = failure(s.gw.get("/admin/x", Some(&root)).await).await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Token has been revoked"));
    // A forged roles claim needs the key: a token minted with another secret is refused.
    let mut forged = claims("joe", "access");
    forged["roles"] = serde_json::json!(["admin"]);
    let forged = mint(
        jsonwebtoken::Algorithm::HS256,
        b"another-secret-0123456789-abcdefghijkl",
        &forged,
    );
    assert_eq!(s.gw.get("/admin/x", Some(&forged)).await.status(), 401);
    assert_eq!(
        s.upstream
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/admin"))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_read_again_at_refresh_and_a_deleted_user_gets_no_new_tokens() {
    let s = Stack::start_with(|o| {
        let up = o.routes[0].upstream.to_string();
        admin_routes(o, &up);
    })
    .await;
    let (access, refresh) = s.gw.user("kai").await;
    assert_eq!(s.gw.get("/admin/x", Some(&access)).await.status(), 403);
    set_roles(&s.redis, "kai", &["admin"]).await;
    let resp =
        s.gw.client
            .post(s.gw.url("/refresh"))
            .bearer_auth(&refresh)
            .send()
            .await
            .unwrap();
    let (status, body) = json_body(resp).await;
    assert_eq!(status, 200);
    let fresh = body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(s.gw.get("/admin/x", Some(&fresh)).await.status(), 200);

    let () = s
        .redis
        .query(redis::cmd("DEL").arg("keycard:user:kai"))
        .await;
    let refresh = body["refresh_token"].as_str().unwrap();
    let resp =
        s.gw.client
            .post(s.gw.url("/refresh"))
            .bearer_auth(refresh)
            .send()
            .await
            .unwrap();
    let f = failure(resp).await;
    assert_eq!((f.status, f.msg.as_str()), (401, "User not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_routes_pass_without_a_token_inject_a_valid_one_and_refuse_a_bad_one() {
    let s = Stack::start_with(|o| {
        let up = o.routes[0].upstream.to_string();
        admin_routes(o, &up);
    })
    .await;
    let resp =
        s.gw.client
            .get(s.gw.url("/maybe/x"))
            .header("x-auth-user", "spoofed")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = Echo::from_response(resp).await;
    assert!(
        !echo.has("x-auth-user"),
        "anonymous request got an identity: {echo:?}"
    );

    // Another scheme is no token: passed on anonymously, as Flask-JWT-Extended's optional.
    let resp =
        s.gw.client
            .get(s.gw.url("/maybe/x"))
            .header("authorization", "Basic b2xpdmU6c2VjcmV0")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let (access, _) = s.gw.user("olive").await;
    let echo = Echo::from_response(s.gw.get("/maybe/x", Some(&access)).await).await;
    assert_eq!(echo.values("x-auth-user"), ["olive"]);

    let mut expired = claims("olive", "access");
    expired["exp"] = (now() - 10).into();
    let f = failure(s.gw.get("/maybe/x", Some("garbage")).await).await;
    assert_eq!(f.status, 401, "{}", f.msg);
    let f = failure(s.gw.get("/maybe/x", Some(&mint_valid(&expired))).await).await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Token has expired"));
    let logout = s.gw.logout(&access).await;
    assert_eq!(logout.status(), 200);
    let f = failure(s.gw.get("/maybe/x", Some(&access)).await).await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Token has been revoked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapped_claims_reach_the_upstream_and_client_copies_never_do() {
    let s = Stack::start_with(|o| {
        o.identity.claims = vec![
            ("roles".into(), http::HeaderName::from_static("x-roles")),
            (
                "jti".into(),
                http::HeaderName::from_static("x-auth-token-id"),
            ),
        ];
        o.registration.default_roles = vec!["reader".into(), "writer".into()];
    })
    .await;
    let (access, _) = s.gw.user("mo").await;
    let jti = decode_claims(&access)["jti"].as_str().unwrap().to_owned();
    for path in ["/private/x", "/public/x"] {
        let resp =
            s.gw.client
                .get(s.gw.url(path))
                .bearer_auth(&access)
                .header("x-roles", "admin")
                .header("X_Roles", "admin")
                .header("x-auth-token-id", "forged")
                .send()
                .await
                .unwrap();
        let echo = Echo::from_response(resp).await;
        if path == "/private/x" {
            assert_eq!(echo.values("x-roles"), ["reader,writer"]);
            assert_eq!(echo.values("x-auth-token-id"), [jti.as_str()]);
        } else {
            assert!(!echo.has("x-roles") && !echo.has("x_roles"), "{echo:?}");
            assert!(!echo.has("x-auth-token-id"), "{echo:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_can_be_turned_off_and_gives_default_roles() {
    let s = Stack::start_with(|o| o.registration.enabled = false).await;
    let resp = s.gw.register("nobody", PASSWORD).await;
    let f = failure(resp).await;
    assert_eq!(
        (f.status, f.msg.as_str()),
        (403, "Registration is disabled")
    );
    let keys: Vec<String> = s
        .redis
        .query(redis::cmd("KEYS").arg("keycard:user:*"))
        .await;
    assert!(keys.is_empty(), "{keys:?}");

    let t = Stack::start_with(|o| o.registration.default_roles = vec!["member".into()]).await;
    let (access, _) = t.gw.user("newbie").await;
    assert_eq!(
        decode_claims(&access)["roles"],
        serde_json::json!(["member"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_stored_before_roles_existed_still_log_in() {
    // The older record was the bare PHC string.
    let s = Stack::start().await;
    s.gw.register("oldtimer", PASSWORD).await;
    let key = "keycard:user:oldtimer";
    let stored: String = s.redis.query(redis::cmd("GET").arg(key)).await;
    let record: Value = serde_json::from_str(&stored).unwrap();
    let phc = record["phc"].as_str().unwrap();
    assert!(phc.starts_with("$argon2id$"));
    let () = s.redis.query(redis::cmd("SET").arg(key).arg(phc)).await;
    let (access, _) = s.gw.login("oldtimer", PASSWORD).await;
    assert_eq!(decode_claims(&access)["roles"], serde_json::json!([]));
    assert_eq!(
        s.gw.login_raw("oldtimer", "wrong password!").await.status(),
        401
    );
}
