//! `openapi.yaml` is kept true here: its paths and methods are exactly the endpoints keycard
//! answers itself, every request in a table of concrete requests gets a status the document
//! lists for that operation with a body, content type and headers the document allows, and
//! every status the document lists is provoked by at least one of those requests.
//!
//! The JSON Schema validator below knows only the keywords the document uses; a keyword it
//! does not know fails the test instead of being ignored, so the document cannot promise
//! more than is checked.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use keycard::auth::endpoints::Endpoint;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};
use support::*;

// ------------------------------------------------------------------------------- the document

/// The parsed document.
struct Spec {
    doc: Value,
}

impl Spec {
    fn load() -> Spec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let doc: Value = serde_norway::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
        let version = doc["openapi"].as_str().unwrap_or("");
        assert!(
            version.starts_with("3."),
            "openapi.yaml must be OpenAPI 3, says {version:?}"
        );
        Spec { doc }
    }

    /// Follows `$ref`s (local ones only) until a value that is not a reference.
    fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
                return value;
            };
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("only local $refs are supported: {reference}"));
            value = self
                .doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {reference}"));
        }
        panic!("$ref chain too deep");
    }

    /// `path -> [METHOD]`, methods uppercase and sorted.
    fn operations(&self) -> BTreeMap<String, BTreeSet<String>> {
        const METHODS: &[&str] = &[
            "get", "put", "post", "delete", "options", "head", "patch", "trace",
        ];
        let paths = self.doc["paths"].as_object().expect("paths is a map");
        paths
            .iter()
            .map(|(path, item)| {
                let item = item.as_object().expect("path item is a map");
                let methods = item
                    .keys()
                    .filter(|k| METHODS.contains(&k.as_str()))
                    .map(|k| k.to_ascii_uppercase())
                    .collect();
                (path.clone(), methods)
            })
            .collect()
    }

    fn operation(&self, method: &str, path: &str) -> &Value {
        let op = &self.doc["paths"][path][method.to_ascii_lowercase()];
        assert!(op.is_object(), "openapi.yaml has no {method} {path}");
        op
    }

    /// The documented response for a status of an operation, resolved.
    fn response(&self, method: &str, path: &str, status: u16) -> Option<&Value> {
        let responses = &self.operation(method, path)["responses"];
        responses.get(status.to_string()).map(|r| self.resolve(r))
    }

    fn statuses(&self, method: &str, path: &str) -> BTreeSet<u16> {
        self.operation(method, path)["responses"]
            .as_object()
            .expect("responses is a map")
            .keys()
            .map(|k| {
                k.parse().unwrap_or_else(|_| {
                    panic!("{method} {path}: response key {k:?} is not a status")
                })
            })
            .collect()
    }

    /// Checks one response against a documented response object; returns what is wrong.
    fn check_response(
        &self,
        documented: &Value,
        headers: &reqwest::header::HeaderMap,
        body: Option<&[u8]>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(declared) = documented.get("headers").and_then(Value::as_object) {
            for (name, header) in declared {
                let header = self.resolve(header);
                let required = header["required"].as_bool().unwrap_or(false);
                let values: Vec<_> = headers.get_all(name.as_str()).iter().collect();
                match values.as_slice() {
                    [] if required => errors.push(format!("required header {name} missing")),
                    [] => {}
                    [value] => {
                        let Ok(text) = value.to_str() else {
                            errors.push(format!("header {name} is not text: {value:?}"));
                            continue;
                        };
                        let schema = self.resolve(&header["schema"]);
                        let as_json = if schema["type"] == "integer" {
                            match text.parse::<i64>() {
                                Ok(n) => json!(n),
                                Err(_) => {
                                    errors
                                        .push(format!("header {name}: {text:?} is not an integer"));
                                    continue;
                                }
                            }
                        } else {
                            json!(text)
                        };
                        errors.extend(self.validate(schema, &as_json, &format!("header {name}")));
                    }
                    _ => errors.push(format!("header {name} sent {} times", values.len())),
                }
            }
        }
        let content = documented.get("content").and_then(Value::as_object);
        let media_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        match (content, body) {
            (None, Some(body)) if !body.is_empty() => {
                errors.push(format!("no content documented, got {} bytes", body.len()))
            }
            (None, _) => {}
            (Some(content), body) => {
                let Some(media_type) = media_type else {
                    errors.push("no Content-Type".into());
                    return errors;
                };
                let Some(entry) = content.get(&media_type) else {
                    errors.push(format!(
                        "Content-Type {media_type} not documented (documented: {:?})",
                        content.keys().collect::<Vec<_>>()
                    ));
                    return errors;
                };
                // HEAD: headers only.
                let Some(body) = body else { return errors };
                assert_eq!(media_type, "application/json", "only JSON is validated");
                match serde_json::from_slice::<Value>(body) {
                    Ok(value) => {
                        errors.extend(self.validate(self.resolve(&entry["schema"]), &value, "body"))
                    }
                    Err(e) => errors.push(format!(
                        "body is not JSON ({e}): {:?}",
                        String::from_utf8_lossy(body)
                    )),
                }
            }
        }
        errors
    }

    /// The subset of JSON Schema the document uses. Unknown keywords are an error, not a pass.
    fn validate(&self, schema: &Value, value: &Value, at: &str) -> Vec<String> {
        let schema = self.resolve(schema);
        let mut errors = Vec::new();
        let Some(keywords) = schema.as_object() else {
            return vec![format!("{at}: schema is not a map: {schema}")];
        };
        for (keyword, arg) in keywords {
            match keyword.as_str() {
                "description" | "example" => {}
                "type" => {
                    let ok = match arg.as_str().unwrap_or("") {
                        "object" => value.is_object(),
                        "string" => value.is_string(),
                        "integer" => value.is_i64() || value.is_u64(),
                        "number" => value.is_number(),
                        "boolean" => value.is_boolean(),
                        "array" => value.is_array(),
                        other => {
                            errors.push(format!("{at}: unsupported type {other:?}"));
                            true
                        }
                    };
                    if !ok {
                        errors.push(format!("{at}: {value} is not of type {arg}"));
                    }
                }
                "required" => {
                    for name in arg.as_array().into_iter().flatten() {
                        let name = name.as_str().unwrap_or("");
                        if value.get(name).is_none() {
                            errors.push(format!("{at}: required property {name:?} missing"));
                        }
                    }
                }
                "properties" => {
                    let properties = arg.as_object().expect("properties is a map");
                    for (name, property) in properties {
                        if let Some(v) = value.get(name) {
                            errors.extend(self.validate(property, v, &format!("{at}.{name}")));
                        }
                    }
                }
                "enum" => {
                    if !arg
                        .as_array()
                        .is_some_and(|options| options.contains(value))
                    {
                        errors.push(format!("{at}: {value} is not one of {arg}"));
                    }
                }
                "minLength" | "maxLength" => {
                    if let Some(s) = value.as_str() {
                        // JSON Schema counts characters (code points), not bytes.
                        let len = s.chars().count() as u64;
                        let bound = arg.as_u64().expect("length bound");
                        let ok = if keyword == "minLength" {
                            len >= bound
                        } else {
                            len <= bound
                        };
                        if !ok {
                            errors.push(format!("{at}: length {len} violates {keyword} {bound}"));
                        }
                    }
                }
                "pattern" => {
                    if let Some(s) = value.as_str() {
                        let pattern = arg.as_str().expect("pattern is a string");
                        let re = regex::Regex::new(pattern)
                            .unwrap_or_else(|e| panic!("{at}: bad pattern {pattern:?}: {e}"));
                        if !re.is_match(s) {
                            errors.push(format!("{at}: {s:?} does not match {pattern:?}"));
                        }
                    }
                }
                "minimum" => {
                    if let (Some(v), Some(min)) = (value.as_f64(), arg.as_f64())
                        && v < min
                    {
                        errors.push(format!("{at}: {v} is below the minimum {min}"));
                    }
                }
                other => errors.push(format!(
                    "{at}: the test's validator does not support keyword {other:?}; \
                     teach it before using it in openapi.yaml"
                )),
            }
        }
        errors
    }
}

// ------------------------------------------------------------------------ paths and methods

/// The path each endpoint is answered on. The match is exhaustive on purpose: a new endpoint
/// does not compile here until it is added to this test and to openapi.yaml.
fn endpoint_path(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Register => "/register",
        Endpoint::Login => "/login",
        Endpoint::Logout => "/logout",
        Endpoint::Refresh => "/refresh",
        Endpoint::Jwks => "/.well-known/jwks.json",
    }
}

const ALL_ENDPOINTS: [Endpoint; 5] = [
    Endpoint::Register,
    Endpoint::Login,
    Endpoint::Logout,
    Endpoint::Refresh,
    Endpoint::Jwks,
];

#[test]
fn document_paths_are_exactly_the_gateway_endpoints() {
    let spec = Spec::load();
    let documented: BTreeSet<String> = spec.operations().into_keys().collect();
    let answered: BTreeSet<String> = ALL_ENDPOINTS
        .iter()
        .map(|&e| {
            let path = endpoint_path(e);
            assert_eq!(Endpoint::from_path(path), Some(e), "{path}");
            path.to_owned()
        })
        .collect();
    assert_eq!(documented, answered);
}

#[test]
fn request_bodies_and_security_are_documented_per_operation() {
    let spec = Spec::load();
    for (path, methods) in spec.operations() {
        for method in methods {
            let op = spec.operation(&method, &path);
            let takes_credentials = matches!(path.as_str(), "/register" | "/login");
            if path == "/.well-known/jwks.json" {
                assert!(op.get("security").is_none(), "the key set is public");
                assert!(
                    op.get("requestBody").is_none(),
                    "{method} {path} reads no body"
                );
            } else if takes_credentials {
                let body = spec.resolve(&op["requestBody"]);
                assert_eq!(body["required"], true, "{method} {path}");
                let types: BTreeSet<&str> = body["content"]
                    .as_object()
                    .expect("requestBody content")
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(
                    types,
                    BTreeSet::from(["application/json", "application/x-www-form-urlencoded"]),
                    "{method} {path}"
                );
                assert!(
                    op.get("security").is_none(),
                    "{method} {path} needs no token"
                );
            } else {
                let optional_body = spec.resolve(&op["requestBody"]);
                assert!(
                    op.get("requestBody").is_none()
                        || (path == "/logout" && optional_body["required"] == false),
                    "{method} {path} reads no body (logout: an optional one)"
                );
                let security = op["security"].as_array().expect("security");
                assert_eq!(security.len(), 1, "{method} {path}");
                let scheme_name = security[0]
                    .as_object()
                    .and_then(|o| o.keys().next())
                    .expect("a security scheme");
                let scheme = &spec.doc["components"]["securitySchemes"][scheme_name];
                assert_eq!(scheme["type"], "http", "{scheme_name}");
                assert_eq!(scheme["scheme"], "bearer", "{scheme_name}");
            }
        }
    }
}

#[tokio::test]
async fn methods_not_documented_are_405_with_an_allow_naming_the_documented_ones() {
    let spec = Spec::load();
    let s = Stack::start().await;
    let method_not_allowed = spec.resolve(&spec.doc["components"]["responses"]["MethodNotAllowed"]);
    let all = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::TRACE,
    ];
    let mut errors = Vec::new();
    for (path, documented) in spec.operations() {
        for method in &all {
            let resp =
                s.gw.client
                    .request(method.clone(), s.gw.url(&path))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            let status = resp.status().as_u16();
            let what = format!("{method} {path}");
            if documented.contains(method.as_str()) {
                if status == 405 {
                    errors.push(format!("{what}: documented, but answered 405"));
                }
                continue;
            }
            if status != 405 {
                errors.push(format!("{what}: not documented, but answered {status}"));
                continue;
            }
            let allow: BTreeSet<String> = resp
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(',')
                .map(|m| m.trim().to_owned())
                .filter(|m| !m.is_empty())
                .collect();
            if allow != documented {
                errors.push(format!(
                    "{what}: Allow {allow:?}, documented {documented:?}"
                ));
            }
            let headers = resp.headers().clone();
            let body = resp.bytes().await.expect("read body");
            let body = (*method != Method::HEAD).then_some(&body[..]);
            for e in spec.check_response(method_not_allowed, &headers, body) {
                errors.push(format!("{what}: {e}"));
            }
        }
    }
    assert_eq!(s.upstream.hits(), 0, "nothing on an auth path is forwarded");
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

// ------------------------------------------------------------------- statuses, bodies, headers

/// Sends requests, checks each answer against the document and remembers which documented
/// statuses were seen.
struct Probe<'a> {
    spec: &'a Spec,
    gw: &'a Gateway,
    seen: BTreeSet<(String, String, u16)>,
    errors: Vec<String>,
}

impl Probe<'_> {
    fn request(&self, method: &str, path: &str) -> RequestBuilder {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        self.gw.client.request(method, self.gw.url(path))
    }

    /// Sends `request` for operation `method path`, expecting `expected`; checks the answer
    /// against the document and returns its JSON body.
    async fn case(
        &mut self,
        method: &str,
        path: &str,
        what: &str,
        request: RequestBuilder,
        expected: u16,
    ) -> Value {
        let resp: Response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} ({what}): {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("read body");
        let label = format!("{method} {path} ({what}) -> {status}");
        if status != expected {
            self.errors.push(format!(
                "{label}: expected {expected}; body {:?}",
                String::from_utf8_lossy(&body)
            ));
        }
        match self.spec.response(method, path, status) {
            None => self
                .errors
                .push(format!("{label}: status not documented for the operation")),
            Some(documented) => {
                for e in self.spec.check_response(documented, &headers, Some(&body)) {
                    self.errors.push(format!("{label}: {e}"));
                }
                self.seen
                    .insert((method.to_owned(), path.to_owned(), status));
            }
        }
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    }

    fn json(&self, method: &str, path: &str, body: &Value) -> RequestBuilder {
        self.request(method, path).json(body)
    }

    fn form(&self, method: &str, path: &str, body: &str) -> RequestBuilder {
        self.request(method, path)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
    }

    fn bearer(&self, method: &str, path: &str, token: &str) -> RequestBuilder {
        self.request(method, path).bearer_auth(token)
    }
}

fn creds(username: &str, password: &str) -> Value {
    json!({ "username": username, "password": password })
}

/// A request target over the default 8 KiB limit (`server.max_target_bytes`).
fn long_target(path: &str) -> String {
    format!("{path}?q={}", "a".repeat(8 * 1024))
}

/// A header pushing the request over the default 32 KiB limit (`server.max_header_bytes`).
fn huge_header(request: RequestBuilder) -> RequestBuilder {
    request.header("x-filler", "a".repeat(33 * 1024))
}

#[tokio::test]
async fn every_documented_status_is_provoked_and_every_answer_conforms() {
    let spec = Spec::load();
    // A short body deadline, so the 408 case takes a second, not ten.
    let mut s = Stack::start_with(|o| {
        o.server.body_read_timeout = Duration::from_secs(1);
    })
    .await;
    let gw = &s.gw;
    let mut p = Probe {
        spec: &spec,
        gw,
        seen: BTreeSet::new(),
        errors: Vec::new(),
    };
    let ok = creds("doc-user", PASSWORD);

    // ---- POST /register
    let (m, r) = ("POST", "/register");
    p.case(m, r, "json", p.json(m, r, &ok), 201).await;
    p.case(
        m,
        r,
        "form",
        p.form(m, r, "username=doc-form&password=eight-bytes"),
        201,
    )
    .await;
    p.case(
        m,
        r,
        "4 characters, 8 bytes",
        p.json(m, r, &creds("doc-bytes", "éééé")),
        201,
    )
    .await;
    p.case(m, r, "exists", p.json(m, r, &ok), 409).await;
    p.case(
        m,
        r,
        "exists, other case",
        p.json(m, r, &creds("DOC-User", PASSWORD)),
        409,
    )
    .await;
    for (what, request) in [
        (
            "malformed JSON",
            p.request(m, r)
                .header("content-type", "application/json")
                .body("{"),
        ),
        ("JSON array", p.json(m, r, &json!([1]))),
        ("no password", p.json(m, r, &json!({ "username": "doc-x" }))),
        (
            "null username",
            p.json(m, r, &json!({ "username": null, "password": PASSWORD })),
        ),
        (
            "numeric password",
            p.json(m, r, &json!({ "username": "doc-x", "password": 12345678 })),
        ),
        (
            "username with a space",
            p.json(m, r, &creds("doc x", PASSWORD)),
        ),
        (
            "65-character username",
            p.json(m, r, &creds(&"a".repeat(65), PASSWORD)),
        ),
        ("7-byte password", p.json(m, r, &creds("doc-x", "1234567"))),
        (
            "1024 characters, 2048 bytes",
            p.json(m, r, &creds("doc-x", &"é".repeat(1024))),
        ),
        (
            "form field twice",
            p.form(m, r, "username=a&username=b&password=12345678"),
        ),
        (
            "two Authorization headers",
            p.json(m, r, &creds("doc-x", PASSWORD))
                .header("authorization", "Bearer a")
                .header("authorization", "Bearer b"),
        ),
    ] {
        p.case(m, r, what, request, 400).await;
    }
    let big = creds("doc-big", &"x".repeat(17 * 1024));
    p.case(m, r, "17 KiB body", p.json(m, r, &big), 413).await;
    p.case(
        m,
        r,
        "text/plain",
        p.request(m, r)
            .header("content-type", "text/plain")
            .body("x"),
        415,
    )
    .await;
    p.case(m, r, "no Content-Type", p.request(m, r).body("{}"), 415)
        .await;
    p.case(m, r, "long target", p.json(m, &long_target(r), &ok), 414)
        .await;
    p.case(m, r, "huge header", huge_header(p.json(m, r, &ok)), 431)
        .await;

    // ---- POST /login
    let (m, r) = ("POST", "/login");
    let pair = p.case(m, r, "json", p.json(m, r, &ok), 200).await;
    let access = pair["access_token"].as_str().unwrap_or_default().to_owned();
    let refresh = pair["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    p.case(
        m,
        r,
        "form",
        p.form(m, r, "username=DOC-FORM&password=eight-bytes"),
        200,
    )
    .await;
    p.case(
        m,
        r,
        "malformed JSON",
        p.request(m, r)
            .header("content-type", "application/json")
            .body("not json"),
        400,
    )
    .await;
    p.case(m, r, "no username", p.form(m, r, "password=12345678"), 400)
        .await;
    p.case(
        m,
        r,
        "wrong password",
        p.json(m, r, &creds("doc-user", "wrong password")),
        401,
    )
    .await;
    p.case(
        m,
        r,
        "unknown user",
        p.json(m, r, &creds("doc-nobody", PASSWORD)),
        401,
    )
    .await;
    p.case(m, r, "17 KiB body", p.json(m, r, &big), 413).await;
    p.case(m, r, "no Content-Type", p.request(m, r).body("{}"), 415)
        .await;
    p.case(m, r, "long target", p.json(m, &long_target(r), &ok), 414)
        .await;
    p.case(m, r, "huge header", huge_header(p.json(m, r, &ok)), 431)
        .await;
    // The default throttle: 5 failures for one username, then 429 even for the right password.
    let throttled = creds("doc-throttled", PASSWORD);
    p.case(
        "POST",
        "/register",
        "throttle setup",
        p.json("POST", "/register", &throttled),
        201,
    )
    .await;
    for _ in 0..5 {
        let wrong = creds("doc-throttled", "wrong password");
        p.case(m, r, "failure", p.json(m, r, &wrong), 401).await;
    }
    p.case(m, r, "throttled", p.json(m, r, &throttled), 429)
        .await;

    // ---- DELETE and POST /logout
    let r = "/logout";
    for m in ["DELETE", "POST"] {
        let (token, _) = gw.login("doc-user", PASSWORD).await;
        p.case(m, r, "access token", p.bearer(m, r, &token), 200)
            .await;
        p.case(m, r, "revoked", p.bearer(m, r, &token), 401).await;
        p.case(m, r, "no token", p.request(m, r), 401).await;
        p.case(m, r, "garbage", p.bearer(m, r, "not-a-jwt"), 401)
            .await;
        p.case(
            m,
            r,
            "Basic",
            p.request(m, r).header("authorization", "Basic eDp5"),
            401,
        )
        .await;
        p.case(m, r, "refresh token", p.bearer(m, r, &refresh), 401)
            .await;
        let mut expired = claims("doc-user", "access");
        expired["iat"] = json!(now() - 1000);
        expired["nbf"] = json!(now() - 1000);
        expired["exp"] = json!(now() - 100);
        p.case(m, r, "expired", p.bearer(m, r, &mint_valid(&expired)), 401)
            .await;
        let forged = mint(
            jsonwebtoken::Algorithm::HS256,
            b"another-secret-0123456789-abcdefghijkl",
            &claims("doc-user", "access"),
        );
        p.case(m, r, "bad signature", p.bearer(m, r, &forged), 401)
            .await;
        let two = p
            .bearer(m, r, &access)
            .header("authorization", "Bearer other");
        p.case(m, r, "two Authorization headers", two, 400).await;
        let long = p.request(m, &long_target(r)).bearer_auth(&access);
        p.case(m, r, "long target", long, 414).await;
        p.case(
            m,
            r,
            "huge header",
            huge_header(p.bearer(m, r, &access)),
            431,
        )
        .await;
    }

    // ---- POST /refresh
    let (m, r) = ("POST", "/refresh");
    let rotated = p
        .case(m, r, "refresh token", p.bearer(m, r, &refresh), 200)
        .await;
    p.case(
        m,
        r,
        "refresh token used again",
        p.bearer(m, r, &refresh),
        401,
    )
    .await;
    p.case(m, r, "access token", p.bearer(m, r, &access), 401)
        .await;
    p.case(m, r, "no token", p.request(m, r), 401).await;
    let mut expired = claims("doc-user", "refresh");
    expired["exp"] = json!(now() - 100);
    p.case(m, r, "expired", p.bearer(m, r, &mint_valid(&expired)), 401)
        .await;
    let fresh = rotated["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let two = p
        .bearer(m, r, &fresh)
        .header("authorization", "Bearer other");
    p.case(m, r, "two Authorization headers", two, 400).await;
    p.case(
        m,
        r,
        "long target",
        p.request(m, &long_target(r)).bearer_auth(&fresh),
        414,
    )
    .await;
    p.case(
        m,
        r,
        "huge header",
        huge_header(p.bearer(m, r, &fresh)),
        431,
    )
    .await;

    // ---- bodies that never finish: 408 after server.body_read_timeout
    for r in ["/register", "/login"] {
        let never = futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
        let stalled = p
            .request("POST", r)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(never));
        p.case("POST", r, "body never finishes", stalled, 408).await;
    }

    let (logout_token, _) = gw.login("doc-user", PASSWORD).await;
    let (_, spare_refresh) = gw.login("doc-user", PASSWORD).await;

    // ---- probing taken names from one address: each 409 counts, then 429
    let mut probes = 0;
    while gw.register("doc-user", PASSWORD).await.status() == 409 {
        probes += 1;
        assert!(
            probes <= 60,
            "60 taken-name registrations were never throttled"
        );
    }
    let (m, r) = ("POST", "/register");
    p.case(m, r, "address throttled", p.json(m, r, &ok), 429)
        .await;

    // ---- GET /.well-known/jwks.json (HS256 here: an empty set)
    let (m, r) = ("GET", "/.well-known/jwks.json");
    p.case(m, r, "key set", p.request(m, r), 200).await;
    p.case(m, r, "long target", p.request(m, &long_target(r)), 414)
        .await;
    p.case(m, r, "huge header", huge_header(p.request(m, r)), 431)
        .await;

    // ---- the store goes away: every operation fails closed with 503
    s.redis.stop();
    let outage = "store down";
    p.case(
        "POST",
        "/register",
        outage,
        p.json("POST", "/register", &creds("doc-late", PASSWORD)),
        503,
    )
    .await;
    p.case("POST", "/login", outage, p.json("POST", "/login", &ok), 503)
        .await;
    for m in ["DELETE", "POST"] {
        p.case(
            m,
            "/logout",
            outage,
            p.bearer(m, "/logout", &logout_token),
            503,
        )
        .await;
    }
    p.case(
        "POST",
        "/refresh",
        outage,
        p.bearer("POST", "/refresh", &spare_refresh),
        503,
    )
    .await;

    // ---- every documented status was provoked
    for (path, methods) in spec.operations() {
        for method in methods {
            for status in spec.statuses(&method, &path) {
                if !p.seen.contains(&(method.clone(), path.clone(), status)) {
                    p.errors.push(format!(
                        "{method} {path}: documented status {status} was never provoked; \
                         add a request for it or drop it from openapi.yaml"
                    ));
                }
            }
        }
    }
    assert!(p.errors.is_empty(), "{}", p.errors.join("\n"));
    assert_eq!(s.upstream.hits(), 0, "nothing on an auth path is forwarded");
}

// ---------------------------------------------------------------- request schema vs. gateway

/// The request schema and the gateway agree on which usernames and passwords are valid,
/// except where JSON Schema cannot say "bytes" (the two cases at the end).
#[tokio::test]
async fn credentials_schema_agrees_with_the_gateway() {
    let spec = Spec::load();
    let s = Stack::start().await;
    let schema = spec.resolve(&spec.doc["components"]["schemas"]["Credentials"]);
    let mut errors = Vec::new();
    let long_ok = "a".repeat(64);
    let long_bad = "a".repeat(65);
    let max_password = "p".repeat(1024);
    let over_password = "p".repeat(1025);
    let cases: Vec<(&str, &str)> = vec![
        ("a", PASSWORD),
        (&long_ok, PASSWORD),
        ("Alice.B@x-y_z", PASSWORD),
        ("0123456789", PASSWORD),
        ("", PASSWORD),
        (&long_bad, PASSWORD),
        ("a b", PASSWORD),
        ("é", PASSWORD),
        ("a/b", PASSWORD),
        ("a+b", PASSWORD),
        ("semi;colon", PASSWORD),
        ("pw-8", "12345678"),
        ("pw-1024", &max_password),
        ("pw-7", "1234567"),
        ("pw-1025", &over_password),
        ("pw-0", ""),
    ];
    for (username, password) in cases {
        let body = creds(username, password);
        let valid = spec.validate(schema, &body, "request").is_empty();
        let status = s.gw.register(username, password).await.status().as_u16();
        let accepted = status == 201;
        if valid != accepted || !(status == 201 || status == 400) {
            errors.push(format!(
                "username {username:?}, password of {} bytes: schema says valid={valid}, \
                 gateway answered {status}",
                password.len()
            ));
        }
    }
    // Documented disagreements: the gateway counts bytes, JSON Schema counts characters.
    let seven_chars = "ééééééé"; // 7 characters, 14 bytes: accepted
    let body = creds("pw-bytes-short", seven_chars);
    assert!(!spec.validate(schema, &body, "request").is_empty());
    assert_eq!(
        s.gw.register("pw-bytes-short", seven_chars).await.status(),
        201
    );
    let long_chars = "é".repeat(1024); // 1024 characters, 2048 bytes: refused
    let body = creds("pw-bytes-long", &long_chars);
    assert!(spec.validate(schema, &body, "request").is_empty());
    assert_eq!(
        s.gw.register("pw-bytes-long", &long_chars).await.status(),
        400
    );
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
