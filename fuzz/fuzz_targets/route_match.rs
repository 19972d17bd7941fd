//! `route_match`: `routes::canonicalize`, `Router::find` and `upstream_path` on arbitrary request
//! paths.
//!
//! The checks live in fuzz/checks.rs (`check_route_match`), shared with tests/fuzz_corpus.rs, which
//! replays fuzz/corpus/route_match through them on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses one of the checks
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_route_match(data));
