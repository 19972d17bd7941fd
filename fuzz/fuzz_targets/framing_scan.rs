//! `framing_scan`: the request-smuggling guard (`framing::Scanner`) on arbitrary byte streams: what
//! comes out is the input, or an unchanged prefix plus the refusal of a CL+TE head.
//!
//! The checks live in fuzz/checks.rs (`check_framing_scan`), shared with tests/fuzz_corpus.rs,
//! which replays fuzz/corpus/framing_scan through them on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses one of the checks
#[path = "../checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_framing_scan(data));
