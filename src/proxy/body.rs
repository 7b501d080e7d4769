//! The response body handed back to the app: the upstream's, streamed through while it holds
//! its endpoint's in-flight count, the breaker admission and the upstream connection until
//! the last frame; or a short local one.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::client::Lease;
use crate::config::ClientWeighted;
use crate::upstream::InFlight;
use crate::upstream::breaker::Admission;

/// The response body handed back to the app.
#[derive(Debug)]
pub(crate) enum ProxyBody {
    Upstream {
        inner: Incoming,
        /// Dropped as soon as the body ends, so least-request and the concurrency limit see
        /// the true load, and an HTTP/1.1 connection is free for the next request.
        held: Option<Held>,
    },
    Local(Full<Bytes>),
}

/// What a streaming response holds until its last frame.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) in_flight: InFlight,
    /// The breaker's in-flight slot, given back when the body ends (held for its `Drop`).
    pub(crate) _admission: Option<Admission>,
    pub(crate) lease: Option<Lease>,
    /// Under `client_weighted`: read a load report from the trailers (gRPC sends it there).
    pub(crate) orca: Option<ClientWeighted>,
}

// === impl ProxyBody ===

impl ProxyBody {
    pub(crate) fn upstream(inner: Incoming, held: Held) -> Self {
        // An empty body (204, HEAD, Content-Length: 0) may never be polled: finish now.
        if inner.is_end_stream() {
            held.finish();
            return ProxyBody::Upstream { inner, held: None };
        }
        ProxyBody::Upstream { inner, held: Some(held) }
    }

    pub(crate) fn local(bytes: Bytes) -> Self {
        ProxyBody::Local(Full::new(bytes))
    }

    pub(crate) fn empty() -> Self {
        ProxyBody::Local(Full::new(Bytes::new()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream { inner, held } => {
                let poll = Pin::new(&mut *inner).poll_frame(cx);
                if let (Poll::Ready(Some(Ok(frame))), Some(h)) = (&poll, held.as_ref())
                    && let (Some(trailers), Some(cfg)) = (frame.trailers_ref(), &h.orca)
                {
                    h.in_flight.state().load.record_from(trailers, cfg);
                }
                match &poll {
                    // Read to its end: the connection may serve the next request.
                    Poll::Ready(None) => {
                        if let Some(h) = held.take() {
                            h.finish();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => drop(held.take()),
                    _ if inner.is_end_stream() => {
                        if let Some(h) = held.take() {
                            h.finish();
                        }
                    }
                    _ => {}
                }
                poll
            }
            ProxyBody::Local(full) => Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
            ProxyBody::Local(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
            ProxyBody::Local(full) => full.size_hint(),
        }
    }
}

// === impl Held ===

impl Held {
    /// The response ended cleanly: its HTTP/1.1 connection goes back to the pool.
    fn finish(self) {
        if let Some(lease) = self.lease {
            lease.release(&self.in_flight.state().pool);
        }
    }
}
