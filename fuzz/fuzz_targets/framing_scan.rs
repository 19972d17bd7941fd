//! `framing_scan`: the request-smuggling guard (`framing::Scanner`) on arbitrary byte streams,
//! fed in pieces of several sizes (one chosen by the input).
//!
//! What hyper receives (everything released by `ready()`, then `finish()`) must be the input
//! unchanged, or, when a head was refused, an unchanged prefix of it followed by the
//! replacement head; a head is refused only if it really carries both `Transfer-Encoding` and
//! `Content-Length` (checked with an independent httparse parse). With a head limit larger
//! than the input, the result must not depend on how the stream was split into reads.
//! tests/fuzz_corpus.rs repeats these checks over fuzz/corpus/framing_scan on stable.
#![no_main]

use keycard::framing::Scanner;
use libfuzzer_sys::fuzz_target;

use keycard::framing::REJECTED_HEAD;

/// Feeds `input` in `step`-byte pieces, consuming what is ready after each, like `Guarded`.
fn run(input: &[u8], step: usize, max_head: usize) -> Vec<u8> {
    let mut scanner = Scanner::new(max_head);
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        scanner.push(piece);
        out.extend_from_slice(scanner.ready());
        scanner.consume(scanner.ready().len());
    }
    scanner.finish();
    out.extend_from_slice(scanner.ready());
    scanner.consume(scanner.ready().len());
    assert!(scanner.ready().is_empty());
    out
}

/// Whether `head` starts with a complete request head carrying both framing headers.
fn has_cl_and_te(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    let has = |name: &str| {
        request
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    has("content-length") && has("transfer-encoding")
}

fn check_one(input: &[u8], out: &[u8], step: usize, max_head: usize) {
    if out == input {
        return;
    }
    let kept = out.strip_suffix(REJECTED_HEAD).unwrap_or_else(|| {
        panic!("step {step}, max_head {max_head}: output is neither the input nor a refusal")
    });
    assert!(
        input.starts_with(kept),
        "step {step}, max_head {max_head}: bytes changed"
    );
    assert!(
        has_cl_and_te(&input[kept.len()..]),
        "step {step}, max_head {max_head}: refused a head at {} without CL+TE",
        kept.len()
    );
}

fn check(data: &[u8]) {
    let seed = data
        .iter()
        .fold(0usize, |h, &b| h.wrapping_mul(31) ^ usize::from(b));
    let chosen = 1 + seed % 97;
    let mut steps = vec![chosen, 2, 7, 64, 8192];
    if data.len() <= 2048 {
        steps.push(1);
    }
    // A head limit above the input: the output must not depend on how reads split the stream.
    let unbounded = data.len() + 1;
    let whole = run(data, data.len().max(1), unbounded);
    check_one(data, &whole, data.len(), unbounded);
    for &step in &steps {
        let out = run(data, step, unbounded);
        check_one(data, &out, step, unbounded);
        assert!(out == whole, "step {step} differs from a single read");
    }
    // Small head limits: heads give way to pass-through; still only whole, exact bytes.
    for max_head in [16, 1 + seed % 256] {
        let out = run(data, chosen, max_head);
        check_one(data, &out, chosen, max_head);
    }
}

fuzz_target!(|data: &[u8]| check(data));
