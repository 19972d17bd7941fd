//! `token_verify`: `Tokens::verify` on arbitrary input never panics and never accepts a token that
//! we did not sign.
//!
//! The checks live in fuzz/checks.rs (`check_token_verify`), shared with tests/fuzz_corpus.rs,
//! which replays fuzz/corpus/token_verify through them on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses one of the checks
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_token_verify(data));
