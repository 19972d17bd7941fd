//! Framing: the one read deadline hyper lacks, on a connection's first request head.
//!
//! hyper itself handles ambiguous HTTP/1 framing since 1.11 (hyperium/hyper#4124, required by
//! `Cargo.toml`): a request with both `Content-Length` and `Transfer-Encoding` has its length
//! dropped, its body read as chunked, and the connection closed after the response, as
//! RFC 9112 §6.1 allows; two different lengths or a bad `Transfer-Encoding` are 400. keycard's
//! own client re-frames every upstream request, so nothing is ever forwarded with both.
//!
//! What hyper does not do (hyperium/hyper#3962): hyper-util reads a new connection's first
//! bytes to tell HTTP/1 from HTTP/2 before hyper's header timer exists, so a client that
//! connects and sends nothing, or half a head, would hold the connection forever. [`FirstHead`]
//! puts `server.header_read_timeout` on the reads up to the end of the first head (or the
//! HTTP/2 preface), then gets out of the way: it reads straight into hyper's buffer and only
//! looks at the bytes of that first head.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client stream whose first request head must arrive within a deadline.
#[derive(Debug)]
pub struct FirstHead<T> {
    inner: T,
    /// Armed until the first head (or the HTTP/2 preface) is complete.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes seen so far, while they still match the HTTP/2 preface.
    preface_matched: usize,
    /// Whether the first bytes departed from the preface (so this is HTTP/1).
    http1: bool,
    /// Inside the head: whether the last line ended (an LF, then at most a CR), so that
    /// another LF ends the head (`\r\n\r\n`, or the bare `\n\n` hyper also accepts).
    line_ended: bool,
}

impl<T> FirstHead<T> {
    /// Wraps `inner`; its first head must be complete within `limit` of now.
    pub fn new(inner: T, limit: Duration) -> FirstHead<T> {
        FirstHead {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
            preface_matched: 0,
            http1: false,
            line_ended: false,
        }
    }

    /// Follows newly read bytes until the first head (or the preface) is complete.
    fn saw(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if !self.http1 {
                if H2_PREFACE.get(self.preface_matched) == Some(&b) {
                    self.preface_matched += 1;
                    if self.preface_matched == H2_PREFACE.len() {
                        // HTTP/2: hyper's own timers (h2_idle_timeout) take over.
                        self.deadline = None;
                        return;
                    }
                    continue;
                }
                self.http1 = true;
                // Follow the bytes taken for a preface as the head they turned out to be.
                for &p in &H2_PREFACE[..self.preface_matched] {
                    if self.head_ends_with(p) {
                        return;
                    }
                }
            }
            if self.head_ends_with(b) {
                return;
            }
        }
    }

    /// Follows one head byte; true (and the deadline disarmed) when it ends the head.
    fn head_ends_with(&mut self, b: u8) -> bool {
        match b {
            b'\n' if self.line_ended => {
                self.deadline = None;
                return true;
            }
            b'\n' => self.line_ended = true,
            b'\r' => {}
            _ => self.line_ended = false,
        }
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstHead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.deadline.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    this.deadline = None;
                } else {
                    this.saw(new);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not received within header_read_timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstHead<T> {
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

    fn armed_after(pieces: &[&[u8]]) -> bool {
        let mut first = FirstHead::new((), Duration::from_secs(60));
        for piece in pieces {
            first.saw(piece);
        }
        first.deadline.is_some()
    }

    #[tokio::test]
    async fn the_deadline_lasts_until_the_first_head_ends() {
        assert!(armed_after(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]));
        assert!(!armed_after(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]));
        // Split anywhere, bare LF too.
        assert!(!armed_after(&[
            b"GET / HTTP/1.1\r\nHost: a\r",
            b"\n",
            b"\r",
            b"\n"
        ]));
        assert!(!armed_after(&[b"GET / HTTP/1.1\nHost: a\n\n"]));
        // A slowloris sending one header line at a time stays under the deadline.
        assert!(armed_after(&[
            b"GET / HTTP/1.1\r\n",
            b"X-a: 1\r\n",
            b"X-b: 2\r\n"
        ]));
    }

    #[tokio::test]
    async fn the_http2_preface_disarms_it_and_a_partial_one_does_not() {
        assert!(!armed_after(&[H2_PREFACE]));
        assert!(armed_after(&[&H2_PREFACE[..10]]));
        assert!(!armed_after(&[&H2_PREFACE[..10], &H2_PREFACE[10..]]));
        // Departing from the preface makes it HTTP/1, whose head must then end.
        assert!(armed_after(&[b"PRI * HTTP/1.1\r\n"]));
        assert!(!armed_after(&[b"PRI * HTTP/1.1\r\n\r\n"]));
    }
}
