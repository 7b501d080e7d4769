//! Request bodies as the client sends them.
//!
//! [`RequestBody`]: the app's request body across attempts — empty, sendable once, or
//! replayable — and [`RequestBody::next`] hands out what the next attempt may send
//! ([`Outbound`]). A replayable body streams to the first attempt as it arrives (no
//! store-and-forward, so gRPC streams and uploads are not delayed) while a copy is kept up to
//! a cap; once it outgrows the cap the copy is dropped and the body can no longer be sent
//! again. An error *from the app's body* (malformed chunking, the app went away mid-body) is
//! recorded, so the failure is blamed on the client rather than the upstream.
//! Must not: hold more than the cap per request.

mod replay;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use replay::Replay;

/// The body the upstream client sends.
pub(crate) type UpstreamBody = Outbound<Incoming>;

/// An error in the app's request body: a broken body, or the app gone mid-body.
pub(crate) trait ClientFault: std::fmt::Display {
    fn aborted(&self) -> bool;
}

impl ClientFault for hyper::Error {
    /// The app went away mid-body: HTTP/1.1's body ended early (hyper reports an
    /// `UnexpectedEof` under a body error), the connection was reset, or an HTTP/2 stream was
    /// cancelled or reset — as opposed to a body that arrived malformed.
    fn aborted(&self) -> bool {
        if self.is_incomplete_message() {
            return true;
        }
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
                return matches!(io.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe);
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.is_io() || h2.reason() == Some(h2::Reason::CANCEL);
            }
            source = e.source();
        }
        false
    }
}

/// What went wrong with the app's body, if anything (shared with the attempts sending it).
#[derive(Debug, Default)]
pub(crate) struct Fault(AtomicU8);

/// The app's request body across the attempts of one request.
#[derive(Debug)]
pub(crate) enum RequestBody<B> {
    /// No body (most GETs): every attempt sends nothing.
    Empty,
    /// Streamed as is, by one attempt; a connect failure gives it back.
    Once(Option<B>, Arc<Fault>),
    /// Streamed to the first attempt while a capped copy is kept for the next ones.
    Replay(Replay<B>),
}

/// One attempt's body.
#[derive(Debug)]
pub(crate) enum Outbound<B> {
    Empty,
    Once(B, Arc<Fault>),
    Replay(replay::Attempt<B>),
}

// === impl RequestBody ===

impl<B> RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: ClientFault,
{
    /// `attempts`: how many attempts the policy allows; `cap`: the most kept for replay.
    pub(crate) fn new(body: B, attempts: u32, cap: usize) -> Self {
        if body.is_end_stream() {
            RequestBody::Empty
        } else if attempts <= 1 {
            RequestBody::Once(Some(body), Arc::default())
        } else {
            RequestBody::Replay(Replay::new(body, cap))
        }
    }

    /// The body for the next attempt; `None` when it cannot be sent (again).
    pub(crate) fn next(&mut self) -> Option<Outbound<B>> {
        match self {
            RequestBody::Empty => Some(Outbound::Empty),
            RequestBody::Once(body, fault) => Some(Outbound::Once(body.take()?, fault.clone())),
            RequestBody::Replay(r) => r.replayable().then(|| Outbound::Replay(r.attempt())),
        }
    }

    /// Takes back a body an attempt never started to send (the connection failed first).
    pub(crate) fn restore(&mut self, unsent: Outbound<B>) {
        if let (RequestBody::Once(slot @ None, _), Outbound::Once(body, _)) = (self, unsent) {
            *slot = Some(body);
        }
    }

    /// Whether another attempt could send the whole body.
    pub(crate) fn replayable(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Once(body, _) => body.is_some(),
            RequestBody::Replay(r) => r.replayable(),
        }
    }

    /// The app's body failed: `Some(aborted)` (true: the app went away mid-body).
    pub(crate) fn fault(&self) -> Option<bool> {
        match self {
            RequestBody::Empty => None,
            RequestBody::Once(_, fault) => fault.get(),
            RequestBody::Replay(r) => r.fault(),
        }
    }
}

// === impl Fault ===

impl Fault {
    const MALFORMED: u8 = 1;
    const ABORTED: u8 = 2;

    pub(crate) fn record(&self, e: &impl ClientFault) {
        let kind = if e.aborted() { Fault::ABORTED } else { Fault::MALFORMED };
        self.0.store(kind, Ordering::Relaxed);
        tracing::debug!("request body from the app failed: {e}");
    }

    pub(crate) fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            k => Some(k == Fault::ABORTED),
        }
    }
}

// === impl Outbound ===

impl<B> Body for Outbound<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: ClientFault,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.get_mut() {
            Outbound::Empty => Poll::Ready(None),
            Outbound::Once(b, fault) => {
                let poll = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(Some(Err(e))) = &poll {
                    fault.record(e);
                }
                poll
            }
            Outbound::Replay(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outbound::Empty => true,
            Outbound::Once(b, _) => b.is_end_stream(),
            Outbound::Replay(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Outbound::Empty => SizeHint::with_exact(0),
            Outbound::Once(b, _) => b.size_hint(),
            Outbound::Replay(b) => b.size_hint(),
        }
    }
}
