//! Framing: rejects ambiguous HTTP/1.1 message framing before hyper parses it.
//!
//! RFC 9112 §6.3 says a request with both `Transfer-Encoding` and `Content-Length` "ought to
//! be handled as an error", because a front end and a back end that disagree on which one
//! frames the body can be made to see two different requests (request smuggling). hyper
//! instead drops `Content-Length`, reads the body as chunked and closes afterwards; the request
//! itself still reaches the handler, with no trace of the second header. keycard's contract is
//! stricter: such a request is answered 400, the connection is closed, nothing is forwarded.
//!
//! [`Guarded`] wraps the client's stream and follows the byte stream the way a server would:
//! it parses each request head (holding its bytes back until the head is complete, which
//! hyper must wait for anyway), then skips the body by its `Content-Length` or by walking the
//! chunked encoding, then expects the next head. When a head carries both framing headers it
//! hands hyper an unparseable head instead, so hyper answers 400 and closes.
//!
//! It must never be blinded: a request it cannot follow (a head that does not parse or is too
//! large, a `Content-Length` it cannot read) would otherwise let a smuggled request behind it
//! through. So when it loses track it stops following and raises
//! [`ConnectionFlags::must_close`]; the gateway then answers the current request with
//! `Connection: close`, and nothing after it on that connection is ever parsed. hyper is still
//! the one that rejects malformed input. It stops following without closing only for an HTTP/2
//! preface (hyper then speaks HTTP/2, which has no such framing) and after the gateway has
//! answered 101 Switching Protocols ([`ConnectionFlags::mark_upgraded`]).
//!
//! It also owns the header read timeout for a connection's *first* request: hyper-util's
//! HTTP/1-or-2 detection reads the first bytes before hyper's own header timer exists, so a
//! client that connects and sends nothing, or half a head, would otherwise hold the
//! connection forever. Later requests are covered by hyper's timer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What hyper is given instead of a head with ambiguous framing: a method with a control
/// byte, which no HTTP parser accepts. Public for the fuzz target and its corpus test.
pub const REJECTED_HEAD: &[u8] = b"\x01 / HTTP/1.1\r\n\r\n";

/// The HTTP/2 connection preface (RFC 9113 §3.4), which hyper-util detects itself.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the guard and the request path tell each other about one connection. Shared through
/// an `Arc`: the guard holds one, every request on the connection carries one in its
/// extensions.
#[derive(Debug, Default)]
pub struct ConnectionFlags {
    close: AtomicBool,
    upgraded: AtomicBool,
}

impl ConnectionFlags {
    /// Whether the guard lost track of this connection's framing: the response to the current
    /// request must carry `Connection: close`.
    pub fn must_close(&self) -> bool {
        self.close.load(Ordering::Acquire)
    }

    /// Called by the proxy when it answers 101: from here on the client's bytes are another
    /// protocol and pass straight through.
    pub fn mark_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }
}

/// Header slots for our parse; a head with more is left to hyper (which answers 431 past 100).
const MAX_HEADERS: usize = 128;

/// Where the scanner is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting (more of) a request head.
    Head,
    /// Inside a body of known length: this many bytes left.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not following the stream any more, legitimately (HTTP/2, or upgraded); every byte goes
    /// straight through.
    Passthrough,
    /// Lost track of the framing; every byte goes straight through and the connection must
    /// close after the current response.
    Blind,
    /// A head was refused; nothing more is read from the client.
    Rejected,
}

/// Positions inside the chunked transfer coding (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits of a chunk size; the value so far.
    Size(u64),
    /// Skipping a chunk extension up to CR, remembering the size.
    Ext(u64),
    /// After the size line's CR, expecting LF.
    SizeLf(u64),
    /// Inside chunk data: bytes left.
    Data(u64),
    /// After chunk data, expecting CR.
    DataCr,
    /// After chunk data's CR, expecting LF.
    DataLf,
    /// In the trailer section; whether the current line is still empty.
    Trailer { line_empty: bool },
    /// After a trailer line's CR, expecting LF.
    TrailerLf { line_empty: bool },
}

/// The stream follower, pure so it can be tested without sockets.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Bytes read from the client and not yet handed to hyper.
    pending: Vec<u8>,
    /// How many bytes at the front of `pending` have been checked and may be handed over.
    ready: usize,
    /// Largest head we wait for before giving up and letting hyper answer 431.
    max_head: usize,
    /// Whether any head has been seen (the HTTP/2 preface is only valid first).
    seen_head: bool,
}

impl Scanner {
    /// A scanner that waits for heads of at most `max_head` bytes.
    pub fn new(max_head: usize) -> Scanner {
        Scanner {
            state: State::Head,
            pending: Vec::new(),
            ready: 0,
            max_head,
            seen_head: false,
        }
    }

    /// Whether the scanner lost track of the framing (see [`ConnectionFlags::must_close`]).
    pub fn is_blind(&self) -> bool {
        self.state == State::Blind
    }

    /// Stops following: everything held is released and everything after passes through.
    pub fn pass_through(&mut self) {
        if self.state != State::Rejected {
            self.state = State::Passthrough;
            self.ready = self.pending.len();
        }
    }

    /// Takes bytes read from the client.
    pub fn push(&mut self, data: &[u8]) {
        if self.state == State::Rejected {
            return;
        }
        self.pending.extend_from_slice(data);
        self.advance();
    }

    /// The end of the client's stream: whatever is held back is released for hyper to judge.
    pub fn finish(&mut self) {
        if self.state != State::Rejected {
            self.ready = self.pending.len();
        }
    }

    /// Bytes that may be handed to hyper now.
    pub fn ready(&self) -> &[u8] {
        &self.pending[..self.ready]
    }

    /// How many bytes may be read straight into the reader's buffer, skipping `pending`: all
    /// of them in pass-through, the rest of a body of known length; none while anything is
    /// held or a head or chunk line must be parsed. Saves two copies of every body and tunnel
    /// byte.
    fn direct_limit(&self) -> usize {
        if !self.pending.is_empty() {
            return 0;
        }
        match self.state {
            State::Passthrough | State::Blind => usize::MAX,
            State::Body(left) => usize::try_from(left).unwrap_or(usize::MAX),
            _ => 0,
        }
    }

    /// Accounts for `n` bytes read directly (at most [`Scanner::direct_limit`]).
    fn skipped(&mut self, n: usize) {
        if let State::Body(left) = self.state {
            let left = left.saturating_sub(n as u64);
            self.state = if left == 0 {
                State::Head
            } else {
                State::Body(left)
            };
        }
    }

    /// Marks `n` ready bytes as handed over.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.ready);
        self.pending.drain(..n);
        self.ready -= n;
    }

    /// Walks `pending[ready..]` as far as the state machine can.
    fn advance(&mut self) {
        while self.ready < self.pending.len() {
            match self.state {
                State::Passthrough | State::Blind => self.ready = self.pending.len(),
                State::Rejected => return,
                State::Head => {
                    if !self.head() {
                        return;
                    }
                }
                State::Body(left) => {
                    let avail = (self.pending.len() - self.ready) as u64;
                    let take = left.min(avail);
                    self.ready += take as usize;
                    self.state = if take == left {
                        State::Head
                    } else {
                        State::Body(left - take)
                    };
                }
                State::Chunked(chunk) => self.chunk(chunk),
            }
        }
    }

    /// Tries to parse one head at `ready`. Returns false when more bytes are needed.
    fn head(&mut self) -> bool {
        let bytes = &self.pending[self.ready..];
        if !self.seen_head {
            let n = bytes.len().min(H2_PREFACE.len());
            if bytes[..n] == H2_PREFACE[..n] {
                if n < H2_PREFACE.len() {
                    return false;
                }
                self.state = State::Passthrough;
                return true;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let len = match request.parse(bytes) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if bytes.len() > self.max_head {
                    self.state = State::Blind;
                    return true;
                }
                return false;
            }
            // Malformed, too many headers: hyper decides, and nothing after it is parsed.
            Err(_) => {
                self.state = State::Blind;
                return true;
            }
        };
        self.seen_head = true;
        // Read exactly as hyper reads them (`content_length_parse_all_values`, `is_chunked_`),
        // so the two can never disagree on where this message ends.
        let mut content_length: Option<Option<u64>> = None;
        let (mut chunked, mut transfer_encoding) = (false, false);
        for header in request.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                content_length = Some(merge_content_length(content_length, header.value));
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = true;
                // RFC 9112 §6.1: chunked must be the final coding.
                chunked = std::str::from_utf8(header.value).is_ok_and(|v| {
                    v.rsplit(',')
                        .next()
                        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
                });
            }
        }
        if transfer_encoding && content_length.is_some() {
            self.pending.truncate(self.ready);
            self.pending.extend_from_slice(REJECTED_HEAD);
            self.ready = self.pending.len();
            self.state = State::Rejected;
            return true;
        }
        self.ready += len;
        // An `Upgrade` request is followed like any other: whether the connection switches
        // protocols is only known from the answer, and the proxy reports a 101 through
        // `ConnectionFlags::mark_upgraded`.
        self.state = if transfer_encoding {
            if chunked {
                State::Chunked(Chunk::Size(0))
            } else {
                // hyper refuses a non-chunked request coding (400 and close).
                State::Blind
            }
        } else {
            match content_length {
                // Unreadable or conflicting lengths: hyper answers 400 and closes.
                Some(None) => State::Blind,
                Some(Some(0)) | None => State::Head,
                Some(Some(n)) => State::Body(n),
            }
        };
        true
    }

    /// Consumes chunked-coding bytes; anything unexpected makes the scanner blind (hyper will
    /// refuse the malformed body itself, and the connection closes).
    fn chunk(&mut self, chunk: Chunk) {
        if let Chunk::Data(left) = chunk {
            let avail = (self.pending.len() - self.ready) as u64;
            let take = left.min(avail);
            self.ready += take as usize;
            self.state = State::Chunked(if take == left {
                Chunk::DataCr
            } else {
                Chunk::Data(left - take)
            });
            return;
        }
        let byte = self.pending[self.ready];
        self.ready += 1;
        let next = match (chunk, byte) {
            (Chunk::Size(n), b) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                match n.checked_mul(16).and_then(|n| n.checked_add(digit)) {
                    Some(n) => State::Chunked(Chunk::Size(n)),
                    None => State::Blind,
                }
            }
            (Chunk::Size(n), b';' | b' ' | b'\t') => State::Chunked(Chunk::Ext(n)),
            (Chunk::Size(n) | Chunk::Ext(n), b'\r') => State::Chunked(Chunk::SizeLf(n)),
            (Chunk::Ext(n), _) => State::Chunked(Chunk::Ext(n)),
            (Chunk::SizeLf(0), b'\n') => State::Chunked(Chunk::Trailer { line_empty: true }),
            (Chunk::SizeLf(n), b'\n') => State::Chunked(Chunk::Data(n)),
            (Chunk::DataCr, b'\r') => State::Chunked(Chunk::DataLf),
            (Chunk::DataLf, b'\n') => State::Chunked(Chunk::Size(0)),
            (Chunk::Trailer { line_empty }, b'\r') => {
                State::Chunked(Chunk::TrailerLf { line_empty })
            }
            (Chunk::Trailer { .. }, _) => State::Chunked(Chunk::Trailer { line_empty: false }),
            (Chunk::TrailerLf { line_empty: true }, b'\n') => State::Head,
            (Chunk::TrailerLf { line_empty: false }, b'\n') => {
                State::Chunked(Chunk::Trailer { line_empty: true })
            }
            _ => State::Blind,
        };
        self.state = next;
    }
}

/// One `Content-Length` header folded into what came before, as hyper does: every value in
/// every header (comma lists included) must be the same integer; `Some(None)` is a conflict or
/// garbage.
fn merge_content_length(before: Option<Option<u64>>, value: &[u8]) -> Option<u64> {
    let mut current = match before {
        Some(None) => return None,
        Some(Some(n)) => Some(n),
        None => None,
    };
    let text = std::str::from_utf8(value).ok()?;
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n = part.parse::<u64>().ok()?;
        match current {
            Some(m) if m != n => return None,
            _ => current = Some(n),
        }
    }
    current
}

/// A client stream whose reads go through a [`Scanner`]. Writes pass straight through.
#[derive(Debug)]
pub struct Guarded<T> {
    inner: T,
    scanner: Scanner,
    eof: bool,
    /// Until the first bytes are handed to hyper: when the connection is given up.
    first_head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    flags: Arc<ConnectionFlags>,
}

impl<T> Guarded<T> {
    /// Wraps `inner`, waiting for heads of at most `max_head` bytes; the first head must be
    /// complete within `header_read_timeout` of now. `flags` is shared with the requests of
    /// this connection.
    pub fn new(
        inner: T,
        max_head: usize,
        header_read_timeout: Duration,
        flags: Arc<ConnectionFlags>,
    ) -> Guarded<T> {
        Guarded {
            inner,
            scanner: Scanner::new(max_head),
            eof: false,
            first_head_deadline: Some(Box::pin(tokio::time::sleep(header_read_timeout))),
            flags,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.flags.upgraded.load(Ordering::Acquire) {
            this.scanner.pass_through();
        }
        loop {
            let ready = this.scanner.ready();
            if !ready.is_empty() {
                this.first_head_deadline = None;
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.scanner.consume(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof || this.scanner.state == State::Rejected {
                return Poll::Ready(Ok(()));
            }
            let direct = this.scanner.direct_limit().min(buf.remaining());
            if direct > 0 {
                // Nothing to parse in these bytes: read them into hyper's buffer and count them.
                let dst = buf.initialize_unfilled_to(direct);
                let mut read = ReadBuf::new(dst);
                match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        buf.advance(n);
                        if n == 0 {
                            this.eof = true;
                            this.scanner.finish();
                        } else {
                            this.scanner.skipped(n);
                        }
                        return Poll::Ready(Ok(()));
                    }
                }
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => {
                    if let Some(deadline) = this.first_head_deadline.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not received within header_read_timeout",
                        )));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if read.filled().is_empty() {
                        this.eof = true;
                        this.scanner.finish();
                    } else {
                        this.scanner.push(read.filled());
                        if this.scanner.is_blind() {
                            this.flags.close.store(true, Ordering::Release);
                        }
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes and returns what hyper would see.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, State) {
        let mut scanner = Scanner::new(1024);
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            scanner.push(piece);
            out.extend_from_slice(scanner.ready());
            let n = scanner.ready().len();
            scanner.consume(n);
        }
        (out, scanner.state)
    }

    fn every_step(input: &[u8]) -> Vec<(Vec<u8>, State)> {
        (1..=input.len()).map(|step| run(input, step)).collect()
    }

    #[test]
    fn plain_requests_pass_unchanged() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /y HTTP/1.1\r\n\r\n";
        for (out, state) in every_step(input) {
            assert_eq!(out, input);
            assert_eq!(state, State::Head);
        }
    }

    #[test]
    fn chunked_bodies_are_followed_to_the_next_head() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        for (out, state) in every_step(input) {
            assert_eq!(out, input);
            assert_eq!(state, State::Head);
        }
    }

    #[test]
    fn content_length_with_transfer_encoding_is_replaced() {
        for input in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                [..],
            &b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n"
                [..],
        ] {
            for (out, state) in every_step(input) {
                assert_eq!(out, REJECTED_HEAD);
                assert_eq!(state, State::Rejected);
            }
        }
    }

    #[test]
    fn smuggled_second_request_is_caught_after_a_body() {
        let input = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /admin HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, state) = run(input, 7);
        assert!(out.ends_with(REJECTED_HEAD));
        assert!(out.starts_with(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"));
        assert_eq!(state, State::Rejected);
    }

    #[test]
    fn head_is_held_back_until_complete() {
        let mut scanner = Scanner::new(1024);
        scanner.push(b"GET / HTTP/1.1\r\nHost:");
        assert!(scanner.ready().is_empty());
        scanner.push(b" a\r\n\r\n");
        assert_eq!(scanner.ready().len(), 27);
    }

    #[test]
    fn http2_preface_passes_through_without_closing() {
        for step in 1..H2_PREFACE.len() {
            let (out, state) = run(H2_PREFACE, step);
            assert_eq!(state, State::Passthrough);
            assert_eq!(out, H2_PREFACE);
        }
    }

    #[test]
    fn an_upgrade_request_is_followed_until_the_gateway_answers_101() {
        // Not upgraded (e.g. `Upgrade` without `Connection: upgrade`, or the upstream said
        // no): the next request is still scanned, and a smuggling one behind it is caught.
        let (out, state) = run(
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            4,
        );
        assert_eq!(state, State::Rejected);
        assert!(out.ends_with(REJECTED_HEAD));
        // Upgraded: whatever the client sends next is released as it is.
        let mut scanner = Scanner::new(1024);
        scanner.push(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
        let n = scanner.ready().len();
        scanner.consume(n);
        scanner.push(b"HELLO");
        assert!(scanner.ready().is_empty(), "held back as a possible head");
        scanner.pass_through();
        assert_eq!(scanner.ready(), b"HELLO");
        scanner.consume(5);
        scanner.push(b"\x81\x05Transfer-Encoding");
        assert_eq!(scanner.ready(), b"\x81\x05Transfer-Encoding");
    }

    #[test]
    fn content_length_lists_are_read_as_hyper_reads_them() {
        // hyper accepts `5, 5` and repeated equal headers; the scanner must follow them, or a
        // request behind them would slip past unscanned.
        for first in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello"[..],
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"[..],
        ] {
            let mut input = first.to_vec();
            input.extend_from_slice(
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            let (out, state) = run(&input, 3);
            assert_eq!(state, State::Rejected);
            assert!(out.starts_with(first) && out.ends_with(REJECTED_HEAD));
        }
        assert_eq!(merge_content_length(None, b"5, 5"), Some(5));
        assert_eq!(merge_content_length(Some(Some(5)), b"6"), None);
        assert_eq!(merge_content_length(None, b"+5"), None);
        assert_eq!(merge_content_length(None, b""), None);
    }

    #[test]
    fn heads_it_cannot_follow_make_it_blind() {
        let mut scanner = Scanner::new(16);
        scanner.push(b"GET / HTTP/1.1\r\nX: yyyyyyyyyyyyyyyyyyyy");
        assert!(scanner.is_blind());
        for input in [
            &b"GET / HTTP/1.1\r\nbad header\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let (out, state) = run(input, 5);
            assert_eq!(state, State::Blind, "{}", String::from_utf8_lossy(input));
            assert_eq!(out, input, "bytes still reach hyper, which refuses them");
        }
    }

    #[tokio::test]
    async fn bodies_read_directly_are_still_followed_to_the_next_head() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut guarded = Guarded::new(
            server,
            1024,
            Duration::from_secs(5),
            Arc::new(ConnectionFlags::default()),
        );
        let head = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n";
        client.write_all(head).await.unwrap();
        let mut out = vec![0u8; head.len()];
        guarded.read_exact(&mut out).await.unwrap();
        assert_eq!(out, head);
        // The body now arrives on its own (read straight through), then a smuggling head.
        client.write_all(b"0123").await.unwrap();
        let mut part = [0u8; 4];
        guarded.read_exact(&mut part).await.unwrap();
        assert_eq!(guarded.scanner.state, State::Body(6));
        client
            .write_all(
                b"456789POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
        drop(client);
        let mut rest = Vec::new();
        guarded.read_to_end(&mut rest).await.unwrap();
        let mut expected = b"456789".to_vec();
        expected.extend_from_slice(REJECTED_HEAD);
        assert_eq!(rest, expected);
    }

    #[tokio::test]
    async fn pass_through_bytes_are_read_directly_and_unchanged() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut guarded = Guarded::new(
            server,
            1024,
            Duration::from_secs(5),
            Arc::new(ConnectionFlags::default()),
        );
        let mut input = H2_PREFACE.to_vec();
        input.extend((0..20_000u32).map(|i| (i % 251) as u8));
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut out = Vec::new();
        guarded.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
    }

    #[test]
    fn eof_releases_a_partial_head() {
        let mut scanner = Scanner::new(1024);
        scanner.push(b"GET / HT");
        assert!(scanner.ready().is_empty());
        scanner.finish();
        assert_eq!(scanner.ready(), b"GET / HT");
    }
}
