//! Replays the checked-in fuzz corpus (fuzz/corpus/<target>/*) through the same checks as the
//! cargo-fuzz targets in fuzz/fuzz_targets, on stable and without libFuzzer, so CI catches a
//! regression on any seed or on any input the fuzzers once found. The checks themselves live
//! once, in fuzz/checks.rs, which documents what each of them means.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use keycard::auth::token::TokenType;

#[path = "../fuzz/checks.rs"]
mod checks;

/// Runs `check` on every file of fuzz/corpus/`target`; fails naming every file that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).expect("corpus file");
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: checks failed for {failed:#?}");
}

#[test]
fn token_verify_corpus() {
    replay("token_verify", checks::check_token_verify);
    // The corpus must keep reaching the success path, or the invariants above test nothing.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/token_verify");
    let valid = std::fs::read_to_string(dir.join("valid-access.jwt")).expect("seed");
    assert!(checks::tokens().verify(&valid, TokenType::Access).is_ok());
}

#[test]
fn route_match_corpus() {
    replay("route_match", checks::check_route_match);
}

#[test]
fn config_parse_corpus() {
    replay("config_parse", checks::check_config_parse);
}
