//! `config_parse`: `Config::parse` on arbitrary text: errors are positioned, accepted configs
//! respect every bound and never show the secret or the redis URL.
//!
//! The checks live in fuzz/checks.rs (`check_config_parse`), shared with tests/fuzz_corpus.rs,
//! which replays fuzz/corpus/config_parse through them on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses one of the checks
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_config_parse(data));
