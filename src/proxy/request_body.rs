//! Request bodies on their way upstream: the client must keep them moving, and when it breaks
//! one the fault is recorded as the client's.
//!
//! hyper puts no deadline on a request body, so a client that sends a head and then trickles
//! (or stops) would hold its connection, its `max_connections` slot and an upstream connection
//! for as long as the upstream waits. [`ClientBody`] cuts a body that makes no progress for
//! `server.body_idle_timeout` while keycard waits on the client (time the upstream spends not
//! reading does not count). A body that stalls, is malformed (a bad chunk-size line) or is
//! reset mid-way fails the upstream request; the [`BodyFault`] it leaves behind lets the proxy
//! answer 408 or 400 and close, instead of blaming the upstream with a 502.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// What went wrong with a client's body, as far as the proxy needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No progress for `server.body_idle_timeout`.
    Stalled,
    /// The body could not be read: malformed framing, or the client went away mid-way.
    Broken,
}

/// Shared between a [`ClientBody`] and the proxy: the fault, if the body had one.
#[derive(Debug, Default)]
pub struct BodyFault(AtomicU8);

impl BodyFault {
    /// The fault recorded so far, if any.
    pub fn get(&self) -> Option<Fault> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(Fault::Stalled),
            2 => Some(Fault::Broken),
            _ => None,
        }
    }

    fn set(&self, fault: Fault) {
        let code = match fault {
            Fault::Stalled => 1,
            Fault::Broken => 2,
        };
        self.0.store(code, Ordering::Release);
    }
}

/// The error a [`ClientBody`] ends with; the upstream request fails with it.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// See [`Fault::Stalled`].
    #[error("request body made no progress for {0:?}")]
    Stalled(Duration),
    /// See [`Fault::Broken`].
    #[error("request body: {0}")]
    Broken(#[source] hyper::Error),
}

/// A client's request body with an idle deadline. Bodies known to be empty (most `GET`s) get
/// no timer and no allocation.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    watch: Option<Watch>,
}

#[derive(Debug)]
struct Watch {
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    /// Whether the timer is running: only while we wait on the client.
    waiting: bool,
    fault: Arc<BodyFault>,
}

impl ClientBody {
    /// Wraps `inner`; the fault (if any) is reported through the returned handle, which is
    /// `None` for a body that is already complete.
    pub fn new(inner: Incoming, idle: Duration) -> (ClientBody, Option<Arc<BodyFault>>) {
        if inner.is_end_stream() {
            return (ClientBody { inner, watch: None }, None);
        }
        let fault = Arc::new(BodyFault::default());
        let watch = Watch {
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
            fault: Arc::clone(&fault),
        };
        let body = ClientBody {
            inner,
            watch: Some(watch),
        };
        (body, Some(fault))
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let Some(watch) = this.watch.as_mut() else {
            return polled.map_err(ClientBodyError::Broken);
        };
        match polled {
            Poll::Ready(Some(Err(error))) => {
                watch.fault.set(Fault::Broken);
                Poll::Ready(Some(Err(ClientBodyError::Broken(error))))
            }
            Poll::Ready(other) => {
                watch.waiting = false;
                Poll::Ready(other.map(|frame| frame.map_err(ClientBodyError::Broken)))
            }
            Poll::Pending => {
                if !watch.waiting {
                    watch.waiting = true;
                    watch.timer.as_mut().reset(Instant::now() + watch.idle);
                }
                ready!(watch.timer.as_mut().poll(cx));
                watch.fault.set(Fault::Stalled);
                Poll::Ready(Some(Err(ClientBodyError::Stalled(watch.idle))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
