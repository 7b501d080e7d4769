//! Request bodies that a retry can send again.
//!
//! The app's body streams to the first attempt as it arrives (no waiting for the whole body,
//! so gRPC streams and large uploads are not delayed); a copy is kept while it stays within
//! the cap. A later attempt replays the copy and then continues from where the source is.
//! Once the body outgrows the cap the copy is dropped and the request can no longer be
//! replayed — unless no byte was ever taken from the app (a connect failure), in which case
//! the next attempt simply streams it.
//! Owns: that bookkeeping. Must not: hold more than `cap` bytes per request.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The body as the upstream client sends it.
#[derive(Debug)]
pub enum UpstreamBody {
    /// No body (most GETs): every attempt can send it, with nothing to keep.
    Empty,
    /// Not retryable: the app's body as is.
    Direct(Incoming),
    Replay(Attempt),
}

/// A body shared by the attempts of one request.
#[derive(Debug, Clone)]
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug)]
struct Shared {
    /// `None` once the app's body has ended.
    source: Option<Incoming>,
    kept: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    cap: usize,
    overflowed: bool,
    touched: bool,
}

/// One attempt's view: replays what was kept, then reads on from the source.
#[derive(Debug)]
pub struct Attempt {
    shared: Arc<Mutex<Shared>>,
    next: usize,
    trailers_sent: bool,
}

// === impl Replay ===

impl Replay {
    pub fn new(source: Incoming, cap: usize) -> Self {
        let ended = source.is_end_stream();
        let shared = Shared {
            source: (!ended).then_some(source),
            kept: Vec::new(),
            trailers: None,
            size: 0,
            cap,
            overflowed: false,
            touched: false,
        };
        Replay { shared: Arc::new(Mutex::new(shared)) }
    }

    pub fn attempt(&self) -> UpstreamBody {
        UpstreamBody::Replay(Attempt { shared: self.shared.clone(), next: 0, trailers_sent: false })
    }

    /// Whether another attempt can send the whole body again.
    pub fn replayable(&self) -> bool {
        let s = lock(&self.shared);
        !s.touched || !s.overflowed
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl Attempt ===

impl Body for Attempt {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut s = lock(&this.shared);
        if this.next < s.kept.len() {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(s.kept[this.next - 1].clone()))));
        }
        let Some(source) = s.source.as_mut() else {
            return match s.trailers.clone() {
                Some(t) if !this.trailers_sent => {
                    this.trailers_sent = true;
                    Poll::Ready(Some(Ok(Frame::trailers(t))))
                }
                _ => Poll::Ready(None),
            };
        };
        let frame = match Pin::new(source).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                s.source = None;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        s.touched = true;
        if let Some(data) = frame.data_ref() {
            s.size += data.len();
            if s.overflowed {
                // Nothing is kept any more; this attempt is the only one.
            } else if s.size <= s.cap {
                s.kept.push(data.clone());
                this.next += 1;
            } else {
                s.overflowed = true;
                s.kept = Vec::new();
                this.next = 0;
            }
        } else if let Some(t) = frame.trailers_ref() {
            s.trailers = Some(t.clone());
            this.trailers_sent = true;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        s.source.is_none() && self.next >= s.kept.len() && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        match &s.source {
            Some(src) if !s.touched => src.size_hint(),
            None if !s.overflowed => SizeHint::with_exact(s.size as u64),
            _ => SizeHint::default(),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Direct(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Replay(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Direct(b) => b.is_end_stream(),
            UpstreamBody::Replay(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Direct(b) => b.size_hint(),
            UpstreamBody::Replay(b) => b.size_hint(),
        }
    }
}
