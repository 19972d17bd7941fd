//! `[[issuers]]`: tokens from another identity provider, verified against its JWKS, served
//! here by a local server on loopback with keys made for the test.
//!
//! Real redis-server, real upstream, real gateway, over HTTP.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keycard::auth::keys::{self, Material};
use keycard::config::{IssuerConfig, JwksUrl};
use serde_json::{Value, json};
use support::*;

const IDP: &str = "https://idp.example.com/";

/// A JWKS server: serves `body`, counts fetches, answers 500 while `failing`.
struct Jwks {
    addr: std::net::SocketAddr,
    body: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
}

impl Jwks {
    async fn start(body: String) -> Jwks {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let fetches = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (b, f, fail) = (body.clone(), fetches.clone(), failing.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (b, f, fail) = (b.clone(), f.clone(), fail.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let status = if fail.load(Ordering::SeqCst) {
                            500
                        } else {
                            200
                        };
                        let body = b.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Jwks {
            addr,
            body,
            fetches,
            failing,
        }
    }
}

/// The signing key and the public JWK of a test key under `kid`.
fn key(alg: Algorithm, private: &str, public: &str, kid: &str) -> (EncodingKey, Value) {
    let pem = std::fs::read(key_path(private)).unwrap();
    let (_, signing) = keys::load(kid, alg, Material::PrivatePem(&pem)).unwrap();
    let pem = std::fs::read(key_path(public)).unwrap();
    let (verifying, _) = keys::load(kid, alg, Material::PublicPem(&pem)).unwrap();
    let jwk = serde_json::to_value(verifying.jwk.unwrap()).unwrap();
    (signing.unwrap(), jwk)
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn idp_claims(sub: &str) -> Value {
    json!({
        "iss": IDP, "sub": sub, "aud": "my-api", "exp": now() + 600, "iat": now(),
        "jti": random_jti(), "roles": ["admin"],
    })
}

async fn stack(jwks: &Jwks, adjust: impl FnOnce(&mut IssuerConfig)) -> Stack {
    let url = JwksUrl(format!("http://{}/jwks.json", jwks.addr).parse().unwrap());
    Stack::start_with(|o| {
        let up = o.routes[0].upstream.to_string();
        o.routes.push(RouteConfig {
            roles: vec!["admin".into()],
            ..route("/admin", &up, "required")
        });
        let mut issuer = IssuerConfig {
            issuer: IDP.into(),
            jwks_url: url,
            audience: Some("my-api".into()),
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            ..IssuerConfig::default()
        };
        adjust(&mut issuer);
        o.issuers = vec![issuer];
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_issuers_tokens_pass_the_same_rules_and_headers() {
    let (rsa, jwk) = key(Algorithm::RS256, "rs256.pem", "rs256.pub.pem", "idp-1");
    let jwks = Jwks::start(json!({ "keys": [jwk] }).to_string()).await;
    let s = stack(&jwks, |_| {}).await;

    let good = sign(Algorithm::RS256, &rsa, "idp-1", &idp_claims("auth0|5f00ab"));
    let echo = Echo::from_response(s.gw.get("/private/x", Some(&good)).await).await;
    assert_eq!(echo.values("x-auth-user"), ["auth0|5f00ab"]);
    assert_eq!(
        s.gw.get("/admin/x", Some(&good)).await.status(),
        200,
        "roles claim honoured"
    );

    // What must hold: exp, the audience, an allowed algorithm, the signature.
    let mut c = idp_claims("bob");
    c.as_object_mut().unwrap().remove("exp");
    let f = failure(
        s.gw.get(
            "/private/x",
            Some(&sign(Algorithm::RS256, &rsa, "idp-1", &c)),
        )
        .await,
    )
    .await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Missing claim"));
    let mut c = idp_claims("bob");
    c["aud"] = "other".into();
    let f = failure(
        s.gw.get(
            "/private/x",
            Some(&sign(Algorithm::RS256, &rsa, "idp-1", &c)),
        )
        .await,
    )
    .await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Invalid audience"));
    // Algorithm confusion: HS256 keyed with the public key's bytes.
    let public = std::fs::read(key_path("rs256.pub.pem")).unwrap();
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public),
        "idp-1",
        &idp_claims("bob"),
    );
    assert_eq!(s.gw.get("/private/x", Some(&confused)).await.status(), 401);
    let tampered = with_payload(&good, &idp_claims("mallory"));
    assert_eq!(s.gw.get("/private/x", Some(&tampered)).await.status(), 401);
    let mut no_roles = idp_claims("carl");
    no_roles.as_object_mut().unwrap().remove("roles");
    let carl = sign(Algorithm::RS256, &rsa, "idp-1", &no_roles);
    assert_eq!(s.gw.get("/private/x", Some(&carl)).await.status(), 200);
    assert_eq!(s.gw.get("/admin/x", Some(&carl)).await.status(), 403);

    // A jti is revocable through the same key as keycard's own tokens.
    let jti = decode_claims(&good)["jti"].as_str().unwrap().to_owned();
    let () = s
        .redis
        .query(
            redis::cmd("SET")
                .arg(format!("keycard:revoked:{jti}"))
                .arg("1")
                .arg("EX")
                .arg(600),
        )
        .await;
    let f = failure(s.gw.get("/private/x", Some(&good)).await).await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Token has been revoked"));

    // keycard never issues for it: such a token is no refresh token.
    let resp =
        s.gw.client
            .post(s.gw.url("/refresh"))
            .bearer_auth(&carl)
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_fetches_the_keys_again_at_most_once_per_interval() {
    let (rsa, jwk) = key(Algorithm::RS256, "rs256.pem", "rs256.pub.pem", "idp-1");
    let (ec, ec_jwk) = key(Algorithm::ES256, "es256.pem", "es256.pub.pem", "idp-2");
    let jwks = Jwks::start(json!({ "keys": [jwk.clone()] }).to_string()).await;
    let s = stack(&jwks, |i| i.refetch_interval = Duration::from_secs(2)).await;
    let first = sign(Algorithm::RS256, &rsa, "idp-1", &idp_claims("dana"));
    assert_eq!(s.gw.get("/private/x", Some(&first)).await.status(), 200);
    let before = jwks.fetches.load(Ordering::SeqCst);

    // The provider rotates in a new key; a token naming it triggers one fetch.
    *jwks.body.lock().unwrap() = json!({ "keys": [jwk, ec_jwk] }).to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let rotated = sign(Algorithm::ES256, &ec, "idp-2", &idp_claims("dana"));
    assert_eq!(s.gw.get("/private/x", Some(&rotated)).await.status(), 200);
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), before + 1);

    // Unknown kids in a burst: at most one more fetch in the interval, all refused.
    for i in 0..5 {
        let unknown = sign(
            Algorithm::ES256,
            &ec,
            &format!("nope-{i}"),
            &idp_claims("dana"),
        );
        assert_eq!(s.gw.get("/private/x", Some(&unknown)).await.status(), 401);
    }
    assert!(
        jwks.fetches.load(Ordering::SeqCst) <= before + 2,
        "a flood of unknown kids fetched every time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_keeps_the_last_good_keys() {
    let (rsa, jwk) = key(Algorithm::RS256, "rs256.pem", "rs256.pub.pem", "idp-1");
    let jwks = Jwks::start(json!({ "keys": [jwk] }).to_string()).await;
    let s = stack(&jwks, |i| {
        i.cache_ttl = Duration::from_secs(1);
        i.refetch_interval = Duration::from_secs(1);
    })
    .await;
    let token = sign(Algorithm::RS256, &rsa, "idp-1", &idp_claims("eve"));
    assert_eq!(s.gw.get("/private/x", Some(&token)).await.status(), 200);
    jwks.failing.store(true, Ordering::SeqCst);
    let before = jwks.fetches.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The cache is stale and the fetch fails: the last good set still verifies.
    assert_eq!(s.gw.get("/private/x", Some(&token)).await.status(), 200);
    assert!(
        jwks.fetches.load(Ordering::SeqCst) > before,
        "a stale set was not fetched again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_jwks_url_that_fails_its_handshake_refuses_tokens_and_nothing_else() {
    // https:// goes through TLS (Mozilla roots): a plain-HTTP server there fails the
    // handshake, the issuer has no keys, and its tokens are refused; keycard's own still work.
    let (rsa, jwk) = key(Algorithm::RS256, "rs256.pem", "rs256.pub.pem", "idp-1");
    let jwks = Jwks::start(json!({ "keys": [jwk] }).to_string()).await;
    let url = JwksUrl(format!("https://{}/jwks.json", jwks.addr).parse().unwrap());
    let s = stack(&jwks, |i| i.jwks_url = url).await;
    let token = sign(Algorithm::RS256, &rsa, "idp-1", &idp_claims("fay"));
    let f = failure(s.gw.get("/private/x", Some(&token)).await).await;
    assert_eq!(
        (f.status, f.msg.as_str()),
        (401, "Signature verification failed")
    );
    let (own, _) = s.gw.user("fay").await;
    assert_eq!(s.gw.get("/private/x", Some(&own)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_findings_for_other_issuers() {
    // The set has a key keycard cannot use (an X25519 encryption key, an unknown kty): they
    // are skipped, not a reason to refuse the whole set.
    let (rsa, jwk) = key(Algorithm::RS256, "rs256.pem", "rs256.pub.pem", "idp-1");
    let odd = [
        json!({"kty": "OKP", "crv": "X25519", "use": "enc", "kid": "x", "x": "AAAA"}),
        json!({"kty": "future", "kid": "f"}),
    ];
    let jwks = Jwks::start(json!({ "keys": [odd[0], jwk, odd[1]] }).to_string()).await;
    let s = stack(&jwks, |_| {}).await;
    let (local, _) = s.gw.user("alice").await;

    // nbf and iat in the future are refused, as for keycard's own tokens.
    for claim in ["nbf", "iat"] {
        let mut c = idp_claims("kim");
        c[claim] = (now() + 3600).into();
        let token = sign(Algorithm::RS256, &rsa, "idp-1", &c);
        let f = failure(s.gw.get("/private/x", Some(&token)).await).await;
        assert_eq!(
            (f.status, f.msg.as_str()),
            (401, "Token not yet valid"),
            "{claim}"
        );
    }

    // A token without jti: logging out cannot revoke it, and must not revoke every other
    // jti-less token (the empty key once did).
    let mut c = idp_claims("dave");
    c.as_object_mut().unwrap().remove("jti");
    let dave = sign(Algorithm::RS256, &rsa, "idp-1", &c);
    let mut c = idp_claims("carol");
    c.as_object_mut().unwrap().remove("jti");
    let carol = sign(Algorithm::RS256, &rsa, "idp-1", &c);
    assert_eq!(s.gw.logout(&dave).await.status(), 400);
    assert_eq!(s.gw.get("/private/x", Some(&carol)).await.status(), 200);
    let (_, refresh) = s.gw.login("alice", PASSWORD).await;
    assert_eq!(
        s.gw.refresh(&refresh).await.status(),
        200,
        "refresh unaffected"
    );

    // An outside "alice" cannot end the local alice's sessions.
    let outside_alice = sign(Algorithm::RS256, &rsa, "idp-1", &idp_claims("alice"));
    let resp =
        s.gw.client
            .delete(s.gw.url("/logout?all=true"))
            .bearer_auth(&outside_alice)
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(s.gw.get("/private/x", Some(&local)).await.status(), 200);
}
