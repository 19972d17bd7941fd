//! Routes: canonical request paths and longest whole-segment prefix matching.
//!
//! Pure: no I/O. The path is checked and normalised exactly once here, and the same bytes are
//! used for matching and sent upstream, so a public prefix can never be used to reach a
//! protected path through an encoding the upstream decodes differently.

use crate::config::RouteConfig;

/// Why a request path was refused (answered 400 `Invalid path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidPath;

/// Checks a raw request path (without the query) and returns its canonical form.
pub fn canonicalize(raw: &str) -> Result<String, InvalidPath> {
    let _ = raw;
    Err(InvalidPath)
}

/// The compiled route table.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<RouteConfig>,
}

impl Router {
    /// Compiles the table from the config's routes.
    pub fn new(routes: &[RouteConfig]) -> Router {
        Router {
            routes: routes.to_vec(),
        }
    }

    /// The route whose prefix matches the most whole segments of a canonical `path`.
    pub fn find(&self, path: &str) -> Option<&RouteConfig> {
        let _ = path;
        self.routes.first()
    }
}
