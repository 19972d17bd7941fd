//! Metrics (issue 10): every family `/metrics` serves, moved by the thing it counts.
//!
//! Each test scrapes the admin listener, does something to the public one, scrapes again
//! and checks the series by exact labels and by how far it moved. The attacker's view too: a
//! scan of random URLs and methods must not add series, and connections that vanish or are
//! cancelled must leave the gauges where they started.
//!
//! Everything talks to 127.0.0.1 and every wait is bounded.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

// ============================================================================================
// Scraping
// ============================================================================================

/// One scrape: every sample, keyed by name and its label set.
#[derive(Debug)]
struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    text: String,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|e| panic!("{line}: {e}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Scrape { samples, text }
    }

    /// The sample `name` with exactly `labels`, if there is one.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    /// Like [`Scrape::get`], but the series must exist.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{}", self.text))
    }

    /// How many series (samples) of families starting with `prefix` there are.
    fn count(&self, prefix: &str) -> usize {
        self.samples
            .iter()
            .filter(|(n, _, _)| n.starts_with(prefix))
            .count()
    }
}

/// `a="x",b="y"` (values as keycard writes them: no escapes needed for its label values).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let end = after.find('"').expect("closing quote");
        labels.insert(key.to_owned(), after[..end].to_owned());
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

async fn scrape(gw: &Gateway) -> Scrape {
    Scrape::parse(gw.metrics().await)
}

/// Scrapes until `check` holds (bounded): gauges move when connections close, a moment after
/// the client side did.
async fn scrape_until(gw: &Gateway, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = scrape(gw).await;
        if check(&s) {
            return s;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within 5 s; last scrape:\n{}", s.text);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const REQUESTS: &str = "keycard_http_requests_total";
const DECISIONS: &str = "keycard_auth_decisions_total";
const LOGINS: &str = "keycard_logins_total";
const REGISTRATIONS: &str = "keycard_registrations_total";
const REFRESHES: &str = "keycard_refreshes_total";
const THROTTLE_HITS: &str = "keycard_throttle_hits_total";
const OPEN: &str = "keycard_open_connections";
const IN_FLIGHT: &str = "keycard_requests_in_flight";
const STORE_COUNT: &str = "keycard_store_duration_seconds_count";

fn requests(route: &str, method: &str, class: &str) -> [(&'static str, String); 3] {
    [
        ("route", route.to_owned()),
        ("method", method.to_owned()),
        ("status_class", class.to_owned()),
    ]
}

/// `keycard_http_requests_total` for (route, method, class); 0 when the series does not exist.
fn req(s: &Scrape, route: &str, method: &str, class: &str) -> f64 {
    let labels = requests(route, method, class);
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    s.get(REQUESTS, &labels).unwrap_or(0.0)
}

fn outcome(s: &Scrape, family: &str, outcome: &str) -> f64 {
    s.value(family, &[("outcome", outcome)])
}

fn open(s: &Scrape, listener: &str, kind: &str) -> f64 {
    s.value(OPEN, &[("listener", listener), ("kind", kind)])
}

fn store_calls(s: &Scrape, op: &str) -> f64 {
    s.value(STORE_COUNT, &[("op", op)])
}

fn expired_token(sub: &str) -> String {
    let mut c = claims(sub, "access");
    c["iat"] = json!(now() - 7200);
    c["nbf"] = json!(now() - 7200);
    c["exp"] = json!(now() - 3600);
    mint_valid(&c)
}

// ============================================================================================
// Requests and decisions
// ============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixed_series_exists_at_zero_from_the_start() {
    let s = Stack::start_with(|_| {}).await;
    let m = scrape(&s.gw).await;
    for (family, outcomes) in [
        (
            DECISIONS,
            &[
                "ok",
                "missing",
                "invalid",
                "expired",
                "revoked",
                "forbidden",
                "store_error",
            ][..],
        ),
        (
            LOGINS,
            &[
                "ok",
                "bad_credentials",
                "throttled",
                "invalid_request",
                "store_error",
            ][..],
        ),
        (
            REGISTRATIONS,
            &["ok", "exists", "invalid_request", "disabled", "store_error"][..],
        ),
        (REFRESHES, &["ok", "invalid", "reused", "store_error"][..]),
    ] {
        for o in outcomes {
            assert_eq!(outcome(&m, family, o), 0.0, "{family} {o}");
        }
    }
    for subject in ["address", "user"] {
        assert_eq!(m.value(THROTTLE_HITS, &[("subject", subject)]), 0.0);
    }
    for listener in ["public", "admin"] {
        for kind in ["http1", "h2", "upgraded"] {
            m.value(OPEN, &[("listener", listener), ("kind", kind)]);
        }
        m.value(IN_FLIGHT, &[("listener", listener)]);
    }
    // No public traffic yet; the admin scrape itself is the one admin request in flight.
    assert_eq!(m.value(IN_FLIGHT, &[("listener", "public")]), 0.0);
    assert_eq!(m.value(IN_FLIGHT, &[("listener", "admin")]), 1.0);
    assert_eq!(open(&m, "public", "http1"), 0.0);
    for op in [
        "revocation_check",
        "user_lookup",
        "user_create",
        "revoke",
        "ping",
    ] {
        assert_eq!(store_calls(&m, op), 0.0, "{op}");
    }
    // Each configured route, and the endpoint and unmatched labels, show their latency.
    for route in ["/api", "/public", "-", "login", "register"] {
        assert_eq!(
            m.value(
                "keycard_http_request_duration_seconds_count",
                &[("route", route)]
            ),
            0.0,
            "{route}"
        );
    }
    m.value(
        "keycard_upstream_duration_seconds_count",
        &[("route", "/api")],
    );
    assert!(
        m.get(
            "keycard_upstream_duration_seconds_count",
            &[("route", "login")]
        )
        .is_none(),
        "endpoints are not proxied"
    );
    assert!(m.value("keycard_runtime_workers", &[]) >= 1.0);
    assert!(
        !m.text.contains("keycard_auth_failures"),
        "the old family is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_check_moves_its_decision_and_its_request_series_by_one() {
    let s = Stack::start_with(|o| {
        let admin = RouteConfig {
            path: "/admin".into(),
            roles: vec!["admin".into()],
            ..o.routes[0].clone()
        };
        assert_eq!(o.routes[0].path, "/api");
        o.routes.push(admin);
    })
    .await;
    let (access, _) = s.gw.user("alice").await;
    let gw = &s.gw;

    // Each case: request, expected status, expected decision.
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("missing", "/api/x", None, 401, "missing"),
        (
            "malformed",
            "/api/x",
            Some("not.a.jwt".into()),
            401,
            "invalid",
        ),
        (
            "expired",
            "/api/x",
            Some(expired_token("alice")),
            401,
            "expired",
        ),
        (
            "no role",
            "/admin/x",
            Some(access.clone()),
            403,
            "forbidden",
        ),
        ("valid", "/api/x", Some(access.clone()), 200, "ok"),
    ];
    for (what, path, token, status, decision) in cases {
        let route = if path.starts_with("/admin") {
            "/admin"
        } else {
            "/api"
        };
        let class = format!("{}xx", status / 100);
        let before = scrape(gw).await;
        let resp = gw.get(path, token.as_deref()).await;
        assert_eq!(resp.status().as_u16(), status, "{what}");
        drop(resp.bytes().await);
        let after = scrape(gw).await;
        assert_eq!(
            outcome(&after, DECISIONS, decision) - outcome(&before, DECISIONS, decision),
            1.0,
            "{what}: decision {decision}"
        );
        let all: f64 = [
            "ok",
            "missing",
            "invalid",
            "expired",
            "revoked",
            "forbidden",
        ]
        .iter()
        .map(|o| outcome(&after, DECISIONS, o) - outcome(&before, DECISIONS, o))
        .sum();
        assert_eq!(all, 1.0, "{what}: exactly one decision");
        assert_eq!(
            req(&after, route, "GET", &class) - req(&before, route, "GET", &class),
            1.0,
            "{what}: {REQUESTS}{{route={route},GET,{class}}}"
        );
        let duration = |m: &Scrape| {
            m.value(
                "keycard_http_request_duration_seconds_count",
                &[("route", route)],
            )
        };
        assert_eq!(duration(&after) - duration(&before), 1.0, "{what}");
        let upstream = |m: &Scrape| {
            m.value(
                "keycard_upstream_duration_seconds_count",
                &[("route", route)],
            )
        };
        let proxied = f64::from(u8::from(status == 200));
        assert_eq!(upstream(&after) - upstream(&before), proxied, "{what}");
        assert_eq!(
            store_calls(&after, "revocation_check") - store_calls(&before, "revocation_check"),
            // Only a token that verified is looked up.
            f64::from(u8::from(decision == "ok" || decision == "forbidden")),
            "{what}"
        );
    }

    // Revoked: the same token after logout.
    let before = scrape(gw).await;
    assert_eq!(gw.logout(&access).await.status(), 200);
    assert_eq!(gw.get("/api/x", Some(&access)).await.status(), 401);
    let after = scrape(gw).await;
    assert_eq!(
        outcome(&after, DECISIONS, "revoked") - outcome(&before, DECISIONS, "revoked"),
        1.0
    );
    assert_eq!(req(&after, "logout", "DELETE", "2xx"), 1.0);
    assert_eq!(
        store_calls(&after, "revoke") - store_calls(&before, "revoke"),
        1.0
    );

    // A public route checks no token: no decision.
    let before = scrape(gw).await;
    assert_eq!(gw.get("/public/x", None).await.status(), 200);
    let after = scrape(gw).await;
    for o in ["ok", "missing"] {
        assert_eq!(
            outcome(&after, DECISIONS, o),
            outcome(&before, DECISIONS, o)
        );
    }
    assert_eq!(
        req(&after, "/public", "GET", "2xx") - req(&before, "/public", "GET", "2xx"),
        1.0
    );

    // The store down: the check cannot be made, and is refused as such.
    let before = scrape(gw).await;
    let mut redis = s.redis;
    redis.stop();
    let token = mint_valid(&claims("alice", "access"));
    assert_eq!(gw.get("/api/x", Some(&token)).await.status(), 503);
    let after = scrape(gw).await;
    assert_eq!(
        outcome(&after, DECISIONS, "store_error") - outcome(&before, DECISIONS, "store_error"),
        1.0
    );
    assert_eq!(
        req(&after, "/api", "GET", "5xx") - req(&before, "/api", "GET", "5xx"),
        1.0
    );
    assert_eq!(
        store_calls(&after, "revocation_check") - store_calls(&before, "revocation_check"),
        1.0
    );
    drop(s.upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_questions_are_decisions_under_the_route_they_ask_about() {
    let s = Stack::start_with(|o| o.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()])
        .await;
    let gw = &s.gw;
    let (access, _) = gw.user("fwd").await;
    let verify = |uri: Option<&'static str>, token: Option<&str>| {
        let mut r = gw.client.get(gw.url("/_keycard/verify"));
        if let Some(uri) = uri {
            r = r.header("x-forwarded-uri", uri);
        }
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let before = scrape(gw).await;
    assert_eq!(
        verify(Some("/private/a"), Some(&access))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        verify(Some("/private/a"), None).await.unwrap().status(),
        401
    );
    assert_eq!(
        verify(Some("/nowhere"), Some(&access))
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(verify(None, Some(&access)).await.unwrap().status(), 403);
    let after = scrape(gw).await;
    let moved = |o: &str| outcome(&after, DECISIONS, o) - outcome(&before, DECISIONS, o);
    assert_eq!(moved("ok"), 1.0);
    assert_eq!(moved("missing"), 1.0);
    assert_eq!(moved("forbidden"), 2.0, "no route, no forwarded URI");
    assert_eq!(req(&after, "/private", "GET", "2xx"), 1.0);
    // Nothing was proxied.
    assert_eq!(
        after.value(
            "keycard_upstream_duration_seconds_count",
            &[("route", "/private")]
        ),
        0.0
    );
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_are_other_and_a_scan_of_random_urls_adds_no_series() {
    let s = Stack::start_with(|_| {}).await;
    let gw = &s.gw;
    let foo = reqwest::Method::from_bytes(b"FOO").unwrap();
    let resp = gw
        .client
        .request(foo, gw.url("/public/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "a public route forwards any method");
    let m = scrape(gw).await;
    assert_eq!(req(&m, "/public", "OTHER", "2xx"), 1.0, "{}", m.text);
    assert!(!m.text.contains("FOO"));

    // Warm up the series a scan can legitimately touch (unmatched GET and OTHER, 4xx).
    let bar = reqwest::Method::from_bytes(b"BAR").unwrap();
    gw.get("/warm", None).await;
    gw.client
        .request(bar, gw.url("/warm"))
        .send()
        .await
        .unwrap();
    let before = scrape(gw).await;
    for i in 0..60 {
        let path = format!("/scan-{i}-{}", random_jti());
        let method = reqwest::Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
        assert_eq!(gw.get(&path, None).await.status(), 404);
        let resp = gw
            .client
            .request(method, gw.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        // Under a protected route: a sub-path is not a new series either.
        assert_eq!(gw.get(&format!("/api{path}"), None).await.status(), 401);
    }
    let after = scrape(gw).await;
    assert_eq!(
        req(&after, "-", "GET", "4xx") - req(&before, "-", "GET", "4xx"),
        60.0
    );
    assert_eq!(
        req(&after, "-", "OTHER", "4xx") - req(&before, "-", "OTHER", "4xx"),
        60.0
    );
    assert!(!after.text.contains("scan-"), "a path became a label");
    // One new series: /api's GET 4xx. Everything else existed.
    assert_eq!(
        after.count("keycard_"),
        before.count("keycard_") + 1,
        "before:\n{}\nafter:\n{}",
        before.text,
        after.text
    );
}

// ============================================================================================
// Endpoints and the throttle
// ============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_registrations_and_refreshes_count_each_outcome() {
    let s = Stack::start_with(|_| {}).await;
    let gw = &s.gw;
    let start = scrape(gw).await;

    assert_eq!(gw.register("rita", PASSWORD).await.status(), 201);
    assert_eq!(gw.register("rita", PASSWORD).await.status(), 409);
    assert_eq!(gw.register("x y", PASSWORD).await.status(), 400);
    let (access, refresh) = gw.login("rita", PASSWORD).await;
    assert_eq!(gw.login_raw("rita", "wrong password!").await.status(), 401);
    assert_eq!(
        gw.login_raw("nobody", "wrong password!").await.status(),
        401
    );
    let resp = (gw
        .client
        .post(gw.url("/login"))
        .body("{")
        .header("content-type", "application/json"))
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 400);

    // Refresh: a rotation, then the old token again (reuse: the family goes), then the
    // rotated one (revoked with its family), then an access token where a refresh one belongs.
    let (status, body) = json_body(gw.refresh(&refresh).await).await;
    assert_eq!(status, 200, "{body}");
    let rotated = body["refresh_token"].as_str().unwrap().to_owned();
    assert_revoked(gw.refresh(&refresh).await, "reused refresh token").await;
    assert_revoked(
        gw.refresh(&rotated).await,
        "refresh token of a revoked family",
    )
    .await;
    assert_eq!(gw.refresh(&access).await.status(), 401);

    let end = scrape(gw).await;
    let moved = |family: &str, o: &str| outcome(&end, family, o) - outcome(&start, family, o);
    assert_eq!(moved(REGISTRATIONS, "ok"), 1.0);
    assert_eq!(moved(REGISTRATIONS, "exists"), 1.0);
    assert_eq!(moved(REGISTRATIONS, "invalid_request"), 1.0);
    assert_eq!(moved(LOGINS, "ok"), 1.0);
    assert_eq!(moved(LOGINS, "bad_credentials"), 2.0);
    assert_eq!(moved(LOGINS, "invalid_request"), 1.0);
    assert_eq!(moved(REFRESHES, "ok"), 1.0);
    assert_eq!(moved(REFRESHES, "reused"), 1.0);
    assert_eq!(moved(REFRESHES, "revoked"), 1.0);
    assert_eq!(moved(REFRESHES, "invalid"), 1.0);
    assert_eq!(req(&end, "register", "POST", "2xx"), 1.0);
    assert_eq!(req(&end, "register", "POST", "4xx"), 2.0);
    assert_eq!(req(&end, "login", "POST", "4xx"), 3.0);
    assert_eq!(req(&end, "refresh", "POST", "4xx"), 3.0);

    // The store calls they made.
    let calls = |op: &str| store_calls(&end, op) - store_calls(&start, op);
    assert_eq!(calls("user_create"), 2.0);
    assert_eq!(
        calls("throttle_begin"),
        5.0,
        "2 registrations and 3 logins reached it"
    );
    assert_eq!(calls("throttle_end"), 5.0);
    assert_eq!(calls("generation"), 1.0);
    assert_eq!(calls("revoke_family"), 1.0);
    assert!(calls("revoke") >= 3.0);
    assert!(calls("user_lookup") >= 1.0);
    // /readyz pings the store.
    let resp = gw.client.get(gw.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        store_calls(&scrape(gw).await, "ping") - store_calls(&end, "ping"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_hits_say_which_throttle_refused() {
    let s = Stack::start_with(|o| {
        o.throttle.user_limit = 3;
        o.throttle.address_limit = 5;
        // X-Forwarded-For is believed from loopback: each phase comes from its own address.
        o.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let gw = &s.gw;
    let login_from = |address: &'static str, user: String| {
        gw.client
            .post(gw.url("/login"))
            .header("x-forwarded-for", address)
            .json(&json!({ "username": user, "password": "wrong password!" }))
            .send()
    };
    let hits = |m: &Scrape, subject: &str| m.value(THROTTLE_HITS, &[("subject", subject)]);

    // One user, three failures: the fourth attempt is refused by the user's throttle.
    let before = scrape(gw).await;
    for _ in 0..3 {
        assert_eq!(
            login_from("10.0.0.1", "target".into())
                .await
                .unwrap()
                .status(),
            401
        );
    }
    assert_eq!(
        login_from("10.0.0.1", "target".into())
            .await
            .unwrap()
            .status(),
        429
    );
    let after = scrape(gw).await;
    assert_eq!(hits(&after, "user") - hits(&before, "user"), 1.0);
    assert_eq!(hits(&after, "address") - hits(&before, "address"), 0.0);
    assert_eq!(
        outcome(&after, LOGINS, "throttled") - outcome(&before, LOGINS, "throttled"),
        1.0
    );
    assert_eq!(
        outcome(&after, LOGINS, "bad_credentials") - outcome(&before, LOGINS, "bad_credentials"),
        3.0
    );

    // One address, five names: the sixth attempt is refused by the address's throttle.
    let before = after;
    for i in 0..5 {
        assert_eq!(
            login_from("10.0.0.2", format!("spray{i}"))
                .await
                .unwrap()
                .status(),
            401
        );
    }
    for i in 5..7 {
        assert_eq!(
            login_from("10.0.0.2", format!("spray{i}"))
                .await
                .unwrap()
                .status(),
            429
        );
    }
    let after = scrape(gw).await;
    assert_eq!(hits(&after, "address") - hits(&before, "address"), 2.0);
    assert_eq!(hits(&after, "user") - hits(&before, "user"), 0.0);
    assert_eq!(req(&after, "login", "POST", "4xx"), 11.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_disabled_and_store_errors_are_their_own_outcomes() {
    let mut s = Stack::start_with(|o| o.registration.enabled = false).await;
    let gw = &s.gw;
    assert_eq!(gw.register("nope", PASSWORD).await.status(), 403);
    s.redis.stop();
    let gw = &s.gw;
    assert_eq!(gw.login_raw("who", PASSWORD).await.status(), 503);
    let refresh = mint_valid(&claims("who", "refresh"));
    assert_eq!(gw.refresh(&refresh).await.status(), 503);
    let m = scrape(gw).await;
    assert_eq!(outcome(&m, REGISTRATIONS, "disabled"), 1.0);
    assert_eq!(outcome(&m, LOGINS, "store_error"), 1.0);
    assert_eq!(outcome(&m, REFRESHES, "store_error"), 1.0);
    assert_eq!(req(&m, "login", "POST", "5xx"), 1.0);
}

// ============================================================================================
// Connections and requests in flight
// ============================================================================================

/// Sends a keep-alive GET on a raw connection and reads the whole (small) answer.
async fn raw_get_keepalive(stream: &mut TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf))
            .await
            .expect("answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap());
            let done = match length {
                Some(len) => body.len() >= len,
                None => body.ends_with("0\r\n\r\n"),
            };
            if done {
                return head.to_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connections_are_counted_while_open_and_in_flight_while_answered() {
    let s = Stack::start_with(|_| {}).await;
    let gw = &s.gw;
    let m = scrape(gw).await;
    assert_eq!(open(&m, "public", "http1"), 0.0);
    // The scrape's own connection is open on the admin listener.
    assert!(open(&m, "admin", "http1") >= 1.0);

    let mut a = TcpStream::connect(gw.addr).await.unwrap();
    let mut b = TcpStream::connect(gw.addr).await.unwrap();
    assert!(
        raw_get_keepalive(&mut a, "/public/x")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        raw_get_keepalive(&mut b, "/public/y")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let m = scrape_until(gw, "two open", |m| open(m, "public", "http1") == 2.0).await;
    assert_eq!(open(&m, "public", "h2"), 0.0);
    assert_eq!(
        m.value(IN_FLIGHT, &[("listener", "public")]),
        0.0,
        "both answered"
    );
    drop(a);
    scrape_until(gw, "one left", |m| open(m, "public", "http1") == 1.0).await;
    drop(b);
    scrape_until(gw, "none left", |m| open(m, "public", "http1") == 0.0).await;

    // A slow answer is in flight until it is sent; a client that hangs up before takes the
    // request out of flight and its connection out of the count.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /public/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    scrape_until(gw, "slow request in flight", |m| {
        m.value(IN_FLIGHT, &[("listener", "public")]) == 1.0 && open(m, "public", "http1") == 1.0
    })
    .await;
    drop(slow);
    // Out of flight, uncounted as a connection, and answered as 499 (the client closed
    // first), a 4xx. Each is written when its own guard drops, in no fixed order: wait for all.
    scrape_until(gw, "cancelled request gone and counted as 4xx", |m| {
        m.value(IN_FLIGHT, &[("listener", "public")]) == 0.0
            && open(m, "public", "http1") == 0.0
            && req(m, "/public", "GET", "4xx") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_counts_as_h2_not_http1() {
    let s = Stack::start_with(|_| {}).await;
    let gw = &s.gw;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    let conn = tokio::spawn(conn);
    let request = http::Request::get(format!("http://{}/public/h2", gw.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("h2 answer within 5 s")
        .expect("h2 request");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let m = scrape_until(gw, "h2 counted", |m| open(m, "public", "h2") == 1.0).await;
    assert_eq!(open(&m, "public", "http1"), 0.0, "not also http1");
    assert_eq!(req(&m, "/public", "GET", "2xx"), 1.0);
    drop(sender);
    conn.abort();
    scrape_until(gw, "h2 closed", |m| open(m, "public", "h2") == 0.0).await;
}

/// A WebSocket echo server.
async fn ws_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if msg.is_close()
                        || ((msg.is_text() || msg.is_binary()) && tx.send(msg).await.is_err())
                    {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_counts_as_upgraded_until_it_closes() {
    let redis = RedisServer::new();
    let (ws_addr, ws_task) = ws_upstream().await;
    let gw = Gateway::start(GatewayOpts::new(&redis.url(), &format!("http://{ws_addr}"))).await;
    let token = mint_valid(&claims("wendy", "access"));

    for round in 0..2 {
        let mut handshake = format!("ws://{}/api/ws", gw.addr)
            .into_client_request()
            .unwrap();
        handshake
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::client_async(handshake, tcp),
        )
        .await
        .expect("handshake within 5 s")
        .expect("handshake");
        ws.send(Message::text("hi")).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo within 5 s")
            .unwrap()
            .unwrap();
        assert_eq!(echo.to_text().unwrap(), "hi");
        let m = scrape_until(&gw, "tunnel counted", |m| {
            open(m, "public", "upgraded") == 1.0
        })
        .await;
        assert_eq!(
            open(&m, "public", "http1"),
            0.0,
            "an upgraded connection is not also http1"
        );
        assert_eq!(m.value(IN_FLIGHT, &[("listener", "public")]), 0.0);
        assert_eq!(req(&m, "/api", "GET", "1xx"), f64::from(round + 1));
        if round == 0 {
            // A clean close.
            ws.close(None).await.unwrap();
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_secs(2), ws.next()).await
            {}
            // The close handshake is done; the client closes its side of the TCP connection
            // (until then the tunnel stays open half-closed, as TCP allows).
            drop(ws);
        } else {
            // The client just vanishes.
            drop(ws);
        }
        scrape_until(&gw, "tunnel closed", |m| {
            open(m, "public", "upgraded") == 0.0 && open(m, "public", "http1") == 0.0
        })
        .await;
    }
    ws_task.abort();
}
