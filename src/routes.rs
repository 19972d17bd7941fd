//! Routes: canonical request paths and longest whole-segment prefix matching.
//!
//! This module owns the step between "a request arrived" and "we know which route it is for":
//! [`canonicalize`] checks and normalises the raw path exactly once, [`Router::find`] picks
//! the route, and [`upstream_path`] computes the path the upstream receives. The same
//! canonical bytes are used for matching and sent upstream, so a public prefix can never be
//! used to reach a protected path through an encoding the upstream decodes differently.
//!
//! Pure: no I/O, no allocation beyond the returned strings.
//!
//! # The invariant
//!
//! For every path accepted by [`canonicalize`], an upstream that percent-decodes the path
//! once (the way every mainstream HTTP server does) sees *exactly the same segments* that the
//! router matched on: no segment boundary can appear or disappear after decoding (encoded `/`
//! and `\` are refused), no segment can climb to its parent (`.` and `..`, encoded or not, are
//! refused), no segment can be truncated by path parameters (`;` is refused) or by a C string
//! terminator (NUL is refused), and two spellings of the same unreserved character (`a` and
//! `%61`) become one. Hence, if a protected route `/admin` exists, no request routed to a less
//! specific public route (`/` or `/public`) can name an upstream path under `/admin`.
//!
//! What this module cannot protect against, and what upstreams must therefore not do (all of
//! them are bugs in the upstream, and nginx and Envoy make the same assumption):
//! - decode the path twice (`%252e%252e` is kept as is, and becomes `..` only on a second
//!   decode);
//! - decode the path before splitting off the query or fragment (`%3F`, `%23` are kept);
//! - match paths case-insensitively or ignore trailing dots or spaces (Windows file systems);
//! - interpret invalid or overlong UTF-8 (`%C0%AE`) as ASCII.
//!
//! Route prefixes in the configuration must themselves be canonical (as produced by
//! [`canonicalize`], e.g. `/caf%C3%A9` rather than `/caf%c3%a9` and `/admin` rather than
//! `/%61dmin`), otherwise they can never match.

use crate::config::RouteConfig;

/// Why a request path was refused (answered 400 `Invalid path`).
///
/// Deliberately carries no detail: the client gets one generic answer whatever the reason,
/// so probing the normaliser reveals nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidPath;

impl std::fmt::Display for InvalidPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid path")
    }
}

impl std::error::Error for InvalidPath {}

/// Checks a raw request path (without the query) and returns its canonical form.
///
/// Why: route matching is only as good as the agreement between what the gateway matches
/// and what the upstream serves. This function makes both see the same bytes, and refuses
/// every input for which a decoding upstream could see a different path structure.
///
/// Rules, applied in one left-to-right pass:
/// - The path must start with `/` (so `*`, the empty string and absolute URIs are refused).
/// - Percent-encoding is normalised as RFC 3986 §6.2.2.1–2 describes: an escape of an
///   *unreserved* character (`A-Z a-z 0-9 - . _ ~`) is decoded (`/%61dmin` becomes `/admin`,
///   so it cannot dodge a route on `/admin`); every other escape is kept with upper-case hex
///   digits (`%c3` becomes `%C3`). A `%` not followed by two hex digits is refused.
/// - Refused because a decoding upstream would see a different path structure: an encoded
///   `/` (`%2F`) or `\` (`%5C`), a raw `\` (a separator on Windows and to some frameworks),
///   NUL (`%00`, which truncates paths in C), and `;` raw or encoded (`%3B`; path parameters
///   are stripped by Tomcat, Jetty and Spring before matching, the classic `/..;/` bypass).
/// - Refused: any dot-segment `.` or `..`, checked *after* decoding, so `%2e%2e`, `.%2E` and
///   friends are caught too (RFC 3986 §5.2.4 would resolve them; we refuse instead of
///   resolving, because resolving `/public/../admin` would route to `/admin` anyway and such
///   paths are only ever sent by scanners).
/// - Refused: raw control characters, raw space, raw non-ASCII, and a raw `?` or `#` (which
///   cannot be part of a path; their presence means the caller passed something else).
/// - Runs of `/` collapse into one (`//admin` → `/admin`), as nginx's `merge_slashes` does,
///   because most upstreams treat empty segments as absent and `//admin` must not dodge a
///   route on `/admin`. A trailing slash is kept (`/api/` stays `/api/`).
///
/// The function is idempotent: canonicalising a canonical path returns it unchanged.
pub fn canonicalize(raw: &str) -> Result<String, InvalidPath> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(InvalidPath);
    }
    let mut out = String::with_capacity(bytes.len());
    // Byte index in `out` where the current segment starts (just after its `/`).
    let mut segment_start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'/' => {
                check_segment(&out[segment_start..])?;
                if !out.ends_with('/') {
                    out.push('/');
                }
                segment_start = out.len();
                i += 1;
            }
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(InvalidPath);
                };
                let decoded = (hi << 4) | lo;
                if is_unreserved(decoded) {
                    out.push(char::from(decoded));
                } else if is_forbidden_decoded(decoded) {
                    return Err(InvalidPath);
                } else {
                    out.push('%');
                    out.push(char::from(HEX_UPPER[usize::from(hi)]));
                    out.push(char::from(HEX_UPPER[usize::from(lo)]));
                }
                i += 3;
            }
            _ if is_forbidden_raw(b) => return Err(InvalidPath),
            _ => {
                // Every byte that reaches here is printable ASCII, hence a whole `char`.
                out.push(char::from(b));
                i += 1;
            }
        }
    }
    check_segment(&out[segment_start..])?;
    Ok(out)
}

const HEX_UPPER: [u8; 16] = *b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3 `unreserved`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters whose *encoded* form is refused, because decoding them changes the structure
/// of the path (separators, parameters, string terminators).
fn is_forbidden_decoded(b: u8) -> bool {
    matches!(b, 0 | b'/' | b'\\' | b';')
}

/// Bytes refused when they appear raw.
fn is_forbidden_raw(b: u8) -> bool {
    b <= b' ' || b >= 0x7f || matches!(b, b'\\' | b';' | b'?' | b'#')
}

fn check_segment(segment: &str) -> Result<(), InvalidPath> {
    if segment == "." || segment == ".." {
        Err(InvalidPath)
    } else {
        Ok(())
    }
}

/// A route prefix without trailing slashes; `/` (everything) becomes the empty string.
///
/// Config promises prefixes without a trailing slash (except `/`), but matching must not
/// silently go wrong if one slips through, so `/api/` is treated as `/api`.
fn trimmed_prefix(route_path: &str) -> &str {
    route_path.trim_end_matches('/')
}

/// Whether `prefix` (trimmed) covers `path` on a whole-segment boundary.
fn segment_prefix_len(prefix: &str, path: &str) -> Option<usize> {
    let p = trimmed_prefix(prefix);
    if p.is_empty() {
        return Some(0);
    }
    let rest = path.strip_prefix(p)?;
    if rest.is_empty() || rest.starts_with('/') {
        Some(p.len())
    } else {
        None
    }
}

/// A route table in matching order: any route type that can show its [`RouteConfig`].
///
/// Why a type: sorting and trimming happen once, and every request then does a single linear
/// scan with no allocation. Generic so that the gateway's compiled routes (which carry their
/// upstream client and metrics label, see [`crate::policy::Route`]) and plain configs (the
/// fuzz target) match by the same code.
#[derive(Debug, Clone)]
pub struct Router<R = RouteConfig> {
    /// Routes ordered by descending (trimmed) prefix length; ties keep file order, so the
    /// first of two identical prefixes wins deterministically.
    routes: Vec<R>,
}

impl<R: AsRef<RouteConfig>> Router<R> {
    /// Builds the table from routes in any order.
    ///
    /// Why precompute: sorting by descending prefix length means the first match in a scan
    /// is the longest, i.e. the most specific route.
    pub fn new(mut routes: Vec<R>) -> Router<R> {
        // Stable sort: equal lengths keep their file order.
        routes.sort_by_key(|r| std::cmp::Reverse(trimmed_prefix(&r.as_ref().path).len()));
        Router { routes }
    }

    /// The route whose prefix matches the most whole segments of a canonical `path`.
    ///
    /// `/api` matches `/api`, `/api/` and `/api/x` but not `/apix`, because a prefix that
    /// ended mid-segment would let `/adminpanel` fall under `/admin`'s policy (or, worse,
    /// `/admin` escape it). `/` matches everything. The path must already be canonical
    /// (see [`canonicalize`]); `None` means the gateway answers 404.
    pub fn find(&self, path: &str) -> Option<&R> {
        self.routes
            .iter()
            .find(|r| segment_prefix_len(&r.as_ref().path, path).is_some())
    }

    /// The routes in matching order (most specific first), for `keycard check` and logs.
    pub fn routes(&self) -> &[R] {
        &self.routes
    }
}

impl AsRef<RouteConfig> for RouteConfig {
    fn as_ref(&self) -> &RouteConfig {
        self
    }
}

/// The path sent upstream for a canonical `path` matched by `route`.
///
/// Why here: the upstream must receive the very bytes that were matched (see the module
/// doc), only re-rooted. With `strip_prefix` the route's prefix is removed (`/api/x` → `/x`,
/// `/api` → `/`; a route on `/` strips nothing); then the upstream's `base_path` is put in
/// front (`/v1` + `/x` → `/v1/x`, `/v1` + `/` → `/v1/`). The result always starts with `/`.
/// If `route` does not actually match `path` (a caller bug), nothing is stripped.
pub fn upstream_path(route: &RouteConfig, path: &str) -> String {
    let rest = if route.strip_prefix {
        match segment_prefix_len(&route.path, path) {
            Some(len) => &path[len..],
            None => path,
        }
    } else {
        path
    };
    let base = route.upstream.base_path.trim_end_matches('/');
    let mut out = String::with_capacity(base.len() + rest.len() + 2);
    if !base.is_empty() && !base.starts_with('/') {
        out.push('/');
    }
    out.push_str(base);
    if !rest.starts_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthMode, Upstream};

    fn route(path: &str, auth: AuthMode) -> RouteConfig {
        route_with(path, auth, false, "")
    }

    fn route_with(path: &str, auth: AuthMode, strip_prefix: bool, base: &str) -> RouteConfig {
        RouteConfig {
            path: path.to_string(),
            upstream: Upstream {
                scheme: http::uri::Scheme::HTTP,
                authority: http::uri::Authority::from_static("127.0.0.1:3000"),
                base_path: base.to_string(),
            },
            auth,
            strip_prefix,
            ..RouteConfig::default()
        }
    }

    fn canon(raw: &str) -> Result<String, InvalidPath> {
        canonicalize(raw)
    }

    // ---- canonicalize: accepted shapes ----

    #[test]
    fn plain_paths_are_unchanged() {
        for p in [
            "/",
            "/a",
            "/api/",
            "/api/x/y",
            "/.well-known/x",
            "/a.b",
            "/..a",
            "/a..",
            "/...",
            "/a:b@c!$&'()*+,=",
            "/~user",
        ] {
            assert_eq!(canon(p).as_deref(), Ok(p), "{p}");
        }
    }

    #[test]
    fn encoded_unreserved_is_decoded() {
        assert_eq!(canon("/%70rivate").as_deref(), Ok("/private"));
        assert_eq!(canon("/%61dmin").as_deref(), Ok("/admin"));
        assert_eq!(canon("/%7e").as_deref(), Ok("/~"));
        assert_eq!(canon("/%7E").as_deref(), Ok("/~"));
        assert_eq!(canon("/%41%5a%30%2d%5f").as_deref(), Ok("/AZ0-_"));
        assert_eq!(canon("/a%2eb").as_deref(), Ok("/a.b"));
    }

    #[test]
    fn other_escapes_are_kept_with_uppercase_hex() {
        assert_eq!(canon("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(canon("/caf%c3%a9").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(canon("/%3f%23%25").as_deref(), Ok("/%3F%23%25"));
        // A double-encoded dot stays double-encoded: one decode gives `%2e`, not `.`.
        assert_eq!(canon("/%252e%252e/x").as_deref(), Ok("/%252e%252e/x"));
    }

    #[test]
    fn slashes_collapse_but_trailing_slash_stays() {
        assert_eq!(canon("//private").as_deref(), Ok("/private"));
        assert_eq!(canon("///a//b///").as_deref(), Ok("/a/b/"));
        assert_eq!(canon("//").as_deref(), Ok("/"));
        assert_eq!(canon("/api/").as_deref(), Ok("/api/"));
    }

    // ---- canonicalize: refused shapes ----

    #[test]
    fn must_start_with_slash() {
        for p in ["", "*", "a/b", "http://h/x", "%2f"] {
            assert_eq!(canon(p), Err(InvalidPath), "{p:?}");
        }
    }

    #[test]
    fn dot_segments_are_refused_raw_and_encoded() {
        for p in [
            "/public/../private",
            "/public/./private",
            "/public/%2e%2e/private",
            "/public/%2E%2e/private",
            "/public/.%2e/private",
            "/public/%2e./private",
            "/public/%2e/private",
            "/%2e%2e/x",
            "/.%2e/",
            "/..",
            "/.",
            "/a/..",
            "/a/.",
            "/a/%2E",
            "//..//x",
        ] {
            assert_eq!(canon(p), Err(InvalidPath), "{p}");
        }
    }

    #[test]
    fn encoded_separators_are_refused() {
        for p in [
            "/public%2fprivate",
            "/public%2Fprivate",
            "/public%5cprivate",
            "/public%5Cprivate",
            "/public\\private",
        ] {
            assert_eq!(canon(p), Err(InvalidPath), "{p}");
        }
    }

    #[test]
    fn nul_and_path_parameters_are_refused() {
        for p in [
            "/x%00",
            "/x\0",
            "/a;b",
            "/a%3bb",
            "/a%3Bb",
            "/..;/admin",
            "/admin;",
        ] {
            assert_eq!(canon(p), Err(InvalidPath), "{p:?}");
        }
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for p in ["/a%zz", "/a%", "/a%2", "/a%g0", "/a%%41", "/%+1"] {
            assert_eq!(canon(p), Err(InvalidPath), "{p}");
        }
    }

    #[test]
    fn raw_controls_space_and_non_ascii_are_refused() {
        for p in [
            "/a b",
            "/a\tb",
            "/a\r\nb",
            "/a\x7fb",
            "/caf\u{e9}",
            "/a?b",
            "/a#b",
        ] {
            assert_eq!(canon(p), Err(InvalidPath), "{p:?}");
        }
    }

    // ---- Router ----

    #[test]
    fn longest_whole_segment_prefix_wins() {
        let router = Router::new(vec![
            route("/", AuthMode::Public),
            route("/api/admin", AuthMode::Required),
            route("/api", AuthMode::Public),
        ]);
        let find = |p: &str| router.find(p).map(|r| r.path.as_str());
        assert_eq!(find("/"), Some("/"));
        assert_eq!(find("/api"), Some("/api"));
        assert_eq!(find("/api/"), Some("/api"));
        assert_eq!(find("/api/x"), Some("/api"));
        assert_eq!(find("/apix"), Some("/"));
        assert_eq!(find("/api/admin"), Some("/api/admin"));
        assert_eq!(find("/api/admin/"), Some("/api/admin"));
        assert_eq!(find("/api/admin/users"), Some("/api/admin"));
        assert_eq!(find("/api/administrator"), Some("/api"));
        assert_eq!(
            router
                .routes()
                .iter()
                .map(|r| r.path.as_str())
                .collect::<Vec<_>>(),
            ["/api/admin", "/api", "/"]
        );
    }

    #[test]
    fn no_catch_all_means_no_match() {
        let router = Router::new(vec![route("/api", AuthMode::Public)]);
        assert!(router.find("/").is_none());
        assert!(router.find("/apix").is_none());
        assert!(router.find("/other").is_none());
        assert!(Router::<RouteConfig>::new(vec![]).find("/").is_none());
    }

    #[test]
    fn trailing_slash_in_route_prefix_is_tolerated() {
        let router = Router::new(vec![route("/api/", AuthMode::Public)]);
        assert!(router.find("/api").is_some());
        assert!(router.find("/api/x").is_some());
        assert!(router.find("/apix").is_none());
    }

    #[test]
    fn equal_prefixes_keep_file_order() {
        let router = Router::new(vec![
            route("/a", AuthMode::Required),
            route("/a", AuthMode::Public),
        ]);
        assert_eq!(router.find("/a").map(|r| r.auth), Some(AuthMode::Required));
    }

    /// Canonicalise then route, the way the gateway does.
    fn route_of(router: &Router, raw: &str) -> Result<Option<AuthMode>, InvalidPath> {
        let path = canonicalize(raw)?;
        Ok(router.find(&path).map(|r| r.auth))
    }

    #[test]
    fn public_prefix_cannot_reach_protected_catch_all() {
        let router = Router::new(vec![
            route("/", AuthMode::Required),
            route("/public", AuthMode::Public),
        ]);
        let r = |p| route_of(&router, p);
        assert_eq!(r("/public/x"), Ok(Some(AuthMode::Public)));
        assert_eq!(r("/public"), Ok(Some(AuthMode::Public)));
        assert_eq!(r("/private"), Ok(Some(AuthMode::Required)));
        assert_eq!(r("/publicx"), Ok(Some(AuthMode::Required)));
        for attack in [
            "/public/../private",
            "/public/%2e%2e/private",
            "/public/%2E%2e/private",
            "/public/.%2e/private",
            "/public%2fprivate",
            "/public%2Fprivate",
            "/public%5cprivate",
            "/public\\private",
            "/public/..;/private",
            "/public;/../private",
            "/public%00/../private",
        ] {
            assert_eq!(r(attack), Err(InvalidPath), "{attack}");
        }
        // Decoding an unreserved char cannot turn a protected path into a public one either.
        assert_eq!(r("/%70ublic/x"), Ok(Some(AuthMode::Public)));
        assert_eq!(r("/%70rivate"), Ok(Some(AuthMode::Required)));
    }

    #[test]
    fn protected_prefix_cannot_be_dodged_through_public_catch_all() {
        let router = Router::new(vec![
            route("/", AuthMode::Public),
            route("/admin", AuthMode::Required),
        ]);
        let r = |p| route_of(&router, p);
        for reach_admin in [
            "/admin",
            "/admin/",
            "/admin/x",
            "//admin",
            "///admin//x",
            "/%61dmin",
            "/%61%64%6D%69%6E/x",
            "/adm%69n",
        ] {
            assert_eq!(
                r(reach_admin),
                Ok(Some(AuthMode::Required)),
                "{reach_admin}"
            );
        }
        for refused in [
            "/x/../admin",
            "/x/%2e%2e/admin",
            "/%2e/admin",
            "/./admin",
            "/admin;x",
            "/admin%3b",
            "/admin%00",
            "/x%2f..%2fadmin",
            "/x%5c..%5cadmin",
        ] {
            assert_eq!(r(refused), Err(InvalidPath), "{refused}");
        }
        assert_eq!(r("/administrator"), Ok(Some(AuthMode::Public)));
    }

    /// What an upstream that percent-decodes once sees as the path's segments.
    fn upstream_segments(canonical: &str) -> Vec<Vec<u8>> {
        let mut decoded = Vec::new();
        let b = canonical.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hi = hex_value(b[i + 1]).unwrap_or(0);
                let lo = hex_value(b[i + 2]).unwrap_or(0);
                decoded.push((hi << 4) | lo);
                i += 3;
            } else {
                decoded.push(b[i]);
                i += 1;
            }
        }
        decoded
            .split(|&c| c == b'/' || c == b'\\')
            .filter(|s| !s.is_empty())
            .map(|s| {
                // Path parameters and NUL truncate the segment in many servers.
                let end = s
                    .iter()
                    .position(|&c| c == b';' || c == 0)
                    .unwrap_or(s.len());
                s[..end].to_vec()
            })
            .collect()
    }

    /// Every combination of up to four hostile tokens: whatever is accepted is canonical,
    /// idempotent, and routed the way a decoding upstream would understand it.
    #[test]
    fn exhaustive_small_inputs_keep_the_invariant() {
        const TOKENS: &[&str] = &[
            "/", "//", "admin", "%61dmin", "adm%69n", ".", "..", "%2e", "%2E", "%2f", "%5C", "\\",
            ";", "%3b", "%00", "%", "%zz", "%25", "%41", "%c3", "x", "?",
        ];
        let router = Router::new(vec![
            route("/", AuthMode::Public),
            route("/admin", AuthMode::Required),
        ]);
        let n = TOKENS.len();
        let mut accepted = 0;
        for len in 0..=4u32 {
            for mut code in 0..n.pow(len) {
                let mut raw = String::from("/");
                for _ in 0..len {
                    raw.push_str(TOKENS[code % n]);
                    code /= n;
                }
                let Ok(path) = canonicalize(&raw) else {
                    continue;
                };
                accepted += 1;
                assert!(path.starts_with('/'), "{raw} -> {path}");
                assert!(!path.contains("//"), "{raw} -> {path}");
                assert_eq!(canonicalize(&path).as_deref(), Ok(path.as_str()), "{raw}");
                let segs = upstream_segments(&path);
                assert!(
                    segs.iter().all(|s| s != b"." && s != b".."),
                    "{raw} -> {path}"
                );
                let upstream_admin = segs.first().is_some_and(|s| s == b"admin");
                let routed_admin = router.find(&path).map(|r| r.auth) == Some(AuthMode::Required);
                assert_eq!(upstream_admin, routed_admin, "{raw} -> {path}");
            }
        }
        assert!(accepted > 1000, "only {accepted} accepted");
    }

    // ---- upstream_path ----

    #[test]
    fn upstream_path_without_strip_keeps_the_path() {
        let r = route_with("/api", AuthMode::Public, false, "");
        assert_eq!(upstream_path(&r, "/api/x"), "/api/x");
        assert_eq!(upstream_path(&r, "/api"), "/api");
        let r = route_with("/api", AuthMode::Public, false, "/v1");
        assert_eq!(upstream_path(&r, "/api/x"), "/v1/api/x");
    }

    #[test]
    fn upstream_path_strips_the_prefix() {
        let r = route_with("/api", AuthMode::Public, true, "");
        assert_eq!(upstream_path(&r, "/api/x"), "/x");
        assert_eq!(upstream_path(&r, "/api/x/"), "/x/");
        assert_eq!(upstream_path(&r, "/api"), "/");
        assert_eq!(upstream_path(&r, "/api/"), "/");
        let r = route_with("/", AuthMode::Public, true, "");
        assert_eq!(upstream_path(&r, "/"), "/");
        assert_eq!(upstream_path(&r, "/x/y"), "/x/y");
        let r = route_with("/a/b", AuthMode::Public, true, "");
        assert_eq!(upstream_path(&r, "/a/b/c"), "/c");
    }

    #[test]
    fn upstream_path_prepends_base_path() {
        let r = route_with("/api", AuthMode::Public, true, "/v1");
        assert_eq!(upstream_path(&r, "/api/x"), "/v1/x");
        assert_eq!(upstream_path(&r, "/api"), "/v1/");
        let r = route_with("/", AuthMode::Public, true, "/v1");
        assert_eq!(upstream_path(&r, "/"), "/v1/");
        assert_eq!(upstream_path(&r, "/x"), "/v1/x");
        // Defensive against a base path that slipped through config without its slashes.
        let r = route_with("/api", AuthMode::Public, true, "v1/");
        assert_eq!(upstream_path(&r, "/api/x"), "/v1/x");
    }

    #[test]
    fn upstream_path_never_strips_mid_segment() {
        // A caller bug (route not matching the path) must not produce `/x` from `/apix`.
        let r = route_with("/api", AuthMode::Public, true, "");
        assert_eq!(upstream_path(&r, "/apix"), "/apix");
    }

    #[test]
    fn upstream_path_keeps_canonical_escapes() {
        let r = route_with("/api", AuthMode::Public, true, "/v1");
        let path = canonicalize("/api/caf%c3%a9%20x").unwrap_or_default();
        assert_eq!(upstream_path(&r, &path), "/v1/caf%C3%A9%20x");
    }
}
