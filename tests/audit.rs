//! The audit log (`keycard::audit`) and the per-request span: every security event writes one
//! line with the same fields, the request's id is on every line of a request, and neither a
//! password nor a token is ever written.
//!
//! In-process gateways log through this test binary's global subscriber, which writes JSON (as
//! `KEYCARD_LOG_FORMAT=json` does) into a buffer the tests read. Tests run in parallel, so each
//! finds its own lines by a username or request id of its own. The CLI's events are tested
//! with the CLI, in `tests/users.rs`.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Everything logged so far, one JSON object per line.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Sink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buffer
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn lines() -> Vec<Value> {
    let text = String::from_utf8(captured().lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn raw_log() -> String {
    String::from_utf8(captured().lock().unwrap().clone()).unwrap()
}

/// The audit events about `user`, in order.
fn audit_of(user: &str) -> Vec<Value> {
    lines()
        .into_iter()
        .filter(|l| l["target"] == "keycard::audit" && l["user"] == user)
        .collect()
}

/// The audit event written for the request answered by `resp`'s id; asserts there is exactly
/// one and that it has every field.
fn event_for(resp: &reqwest::Response) -> Value {
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let events: Vec<Value> = lines()
        .into_iter()
        .filter(|l| l["target"] == "keycard::audit" && l["request_id"] == id.as_str())
        .collect();
    assert_eq!(
        events.len(),
        1,
        "audit events for request {id}: {events:#?}"
    );
    let event = events.into_iter().next().unwrap();
    for field in [
        "event",
        "outcome",
        "reason",
        "user",
        "client",
        "request_id",
        "jti",
    ] {
        assert!(event[field].is_string(), "no {field} in {event}");
    }
    event
}

fn jti_of(token: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: Value = serde_json::from_slice(&bytes).unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

fn assert_event(event: &Value, name: &str, outcome: &str, reason: &str, user: &str) {
    assert_eq!(
        (
            event["event"].as_str().unwrap(),
            event["outcome"].as_str().unwrap(),
            event["reason"].as_str().unwrap(),
            event["user"].as_str().unwrap(),
            event["client"].as_str().unwrap(),
        ),
        (name, outcome, reason, user, "127.0.0.1"),
        "{event}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_endpoint_writes_one_audit_event_with_its_fields() {
    captured();
    let s = Stack::start().await;
    let user = format!("audit-{}", &random_jti()[..8]);

    let created = s.gw.register(&user, PASSWORD).await;
    assert_eq!(created.status(), 201);
    assert_event(&event_for(&created), "register", "success", "-", &user);
    let again = s.gw.register(&user, PASSWORD).await;
    assert_eq!(again.status(), 409);
    assert_event(
        &event_for(&again),
        "register",
        "failure",
        "user_exists",
        &user,
    );

    let wrong = s.gw.login_raw(&user, "not-the-password").await;
    assert_eq!(wrong.status(), 401);
    let event = event_for(&wrong);
    assert_event(&event, "login", "failure", "bad_credentials", &user);
    assert_eq!(event["jti"], "-");

    let ok = s.gw.login_raw(&user, PASSWORD).await;
    let event = event_for(&ok);
    let body: Value = ok.json().await.unwrap();
    let (access, refresh) = (
        body["access_token"].as_str().unwrap().to_owned(),
        body["refresh_token"].as_str().unwrap().to_owned(),
    );
    assert_event(&event, "login", "success", "-", &user);
    assert_eq!(
        event["jti"],
        jti_of(&access).as_str(),
        "login names the new token"
    );

    let refreshed = s.gw.refresh(&refresh).await;
    assert_eq!(refreshed.status(), 200);
    let event = event_for(&refreshed);
    let body: Value = refreshed.json().await.unwrap();
    let access2 = body["access_token"].as_str().unwrap().to_owned();
    assert_event(&event, "refresh", "success", "-", &user);
    assert_eq!(event["jti"], jti_of(&access2).as_str());

    // The rotated refresh token used again: its whole family goes, and the audit says why.
    let reused = s.gw.refresh(&refresh).await;
    assert_eq!(reused.status(), 401);
    let event = event_for(&reused);
    assert_event(&event, "refresh_reuse", "failure", "reused", &user);
    assert_eq!(event["jti"], jti_of(&refresh).as_str());

    let (access3, _) = s.gw.login(&user, PASSWORD).await;
    let out = s.gw.logout(&access3).await;
    assert_eq!(out.status(), 200);
    let event = event_for(&out);
    assert_event(&event, "logout", "success", "-", &user);
    assert_eq!(event["jti"], jti_of(&access3).as_str());
    let again = s.gw.logout(&access3).await;
    assert_event(&event_for(&again), "logout", "failure", "revoked", &user);

    let (access4, _) = s.gw.login(&user, PASSWORD).await;
    let all =
        s.gw.client
            .delete(s.gw.url("/logout?all=true"))
            .bearer_auth(&access4)
            .send()
            .await
            .unwrap();
    assert_eq!(all.status(), 200);
    assert_event(&event_for(&all), "logout_all", "success", "-", &user);

    // A bad body: the failure class, and no user (none was read).
    let bad =
        s.gw.client
            .post(s.gw.url("/login"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
    assert_eq!(bad.status(), 400);
    let event = event_for(&bad);
    assert_eq!(
        (&event["reason"], &event["user"]),
        (&"invalid_request".into(), &"-".into())
    );

    // A refused method is no attempt: no event.
    let get = s.gw.get("/login", None).await;
    assert_eq!(get.status(), 405);
    let id = get.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        !lines()
            .iter()
            .any(|l| l["target"] == "keycard::audit" && l["request_id"] == id.as_str()),
        "405 audited"
    );

    // Seven events for this user, in the order they happened.
    let names: Vec<String> = audit_of(&user)
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "register",
            "register",
            "login",
            "login",
            "refresh",
            "refresh_reuse",
            "login",
            "logout",
            "logout",
            "login",
            "logout_all"
        ]
    );

    // Never a password or a token, in any line, audit or not.
    let log = raw_log();
    for secret in [PASSWORD, &access, &refresh, &access2, &access3, &access4] {
        assert!(!log.contains(secret), "a secret was logged");
    }
    assert!(
        !log.contains("not-the-password"),
        "a wrong password was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_logins_are_audited_as_throttle_events() {
    captured();
    let s = Stack::start_with(|o| {
        o.throttle.user_limit = 2;
        o.throttle.user_window = Duration::from_secs(60);
    })
    .await;
    let user = format!("throttle-{}", &random_jti()[..8]);
    assert_eq!(s.gw.register(&user, PASSWORD).await.status(), 201);
    for _ in 0..2 {
        assert_eq!(s.gw.login_raw(&user, "wrong-password").await.status(), 401);
    }
    let refused = s.gw.login_raw(&user, PASSWORD).await;
    assert_eq!(refused.status(), 429);
    assert_event(
        &event_for(&refused),
        "throttle",
        "failure",
        "too_many_failures",
        &user,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_a_request_carries_its_request_id() {
    captured();
    // An upstream that refuses connections: the request fails and logs a warning on its way.
    let redis = RedisServer::new();
    let mut opts = GatewayOpts::new(&redis.url(), &format!("http://127.0.0.1:{}", free_port()));
    opts.server.workers = 2;
    let gw = Gateway::start(opts).await;
    let id = format!("trace-{}", &random_jti()[..12]);
    let resp = gw
        .client
        .get(gw.url("/public/x"))
        .header("x-request-id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-request-id"], id.as_str());
    let mine: Vec<Value> = lines()
        .into_iter()
        .filter(|l| l.to_string().contains(&id))
        .collect();
    let warning = mine
        .iter()
        .find(|l| l["level"] == "WARN")
        .unwrap_or_else(|| panic!("no warning logged for {id}: {mine:#?}"));
    assert_eq!(warning["span"]["name"], "request", "{warning}");
    assert_eq!(warning["span"]["request_id"], id.as_str(), "{warning}");
}
