//! The response body the proxy hands back: either the upstream's, streamed through and
//! keeping its endpoint's in-flight count until the last frame, or a short local one.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::upstream::InFlight;
use crate::upstream::breaker::Admission;

#[derive(Debug)]
pub enum ProxyBody {
    Upstream {
        inner: Incoming,
        /// Dropped as soon as the body ends, so least-request and the concurrency limit see
        /// the true load.
        in_flight: Option<(InFlight, Option<Admission>)>,
    },
    Local(Full<Bytes>),
}

// === impl ProxyBody ===

impl ProxyBody {
    pub fn upstream(inner: Incoming, in_flight: InFlight, admission: impl Into<Option<Admission>>) -> Self {
        ProxyBody::Upstream { inner, in_flight: Some((in_flight, admission.into())) }
    }

    pub fn local(bytes: Bytes) -> Self {
        ProxyBody::Local(Full::new(bytes))
    }

    pub fn empty() -> Self {
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
            ProxyBody::Upstream { inner, in_flight } => {
                let poll = Pin::new(inner).poll_frame(cx);
                if matches!(poll, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                    in_flight.take();
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
