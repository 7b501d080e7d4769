//! A request body that later attempts can send again: the first attempt streams it from the
//! app as it arrives while a copy is kept; a later attempt replays the copy, then reads on from
//! where the app's body is. Past `cap` bytes the copy is dropped and the body is no longer
//! replayable — unless no byte was ever taken from the app (the attempt failed first).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::{ClientFault, Fault};

/// A body shared by the attempts of one request (one per request: its lock is never
/// contended across requests).
#[derive(Debug)]
pub(crate) struct Replay<B> {
    shared: Arc<Mutex<Shared<B>>>,
}

#[derive(Debug)]
struct Shared<B> {
    /// `None` once the app's body has ended.
    source: Option<B>,
    kept: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    size: usize,
    cap: usize,
    overflowed: bool,
    /// Whether any frame was taken from the source (a new attempt must then replay).
    touched: bool,
    fault: Fault,
}

/// One attempt's view: replays what was kept, then reads on from the source.
#[derive(Debug)]
pub(crate) struct Attempt<B> {
    shared: Arc<Mutex<Shared<B>>>,
    next: usize,
    trailers_sent: bool,
}

// === impl Replay ===

impl<B: Body<Data = Bytes> + Unpin> Replay<B>
where
    B::Error: ClientFault,
{
    pub(crate) fn new(source: B, cap: usize) -> Self {
        let ended = source.is_end_stream();
        let shared = Shared {
            source: (!ended).then_some(source),
            kept: Vec::new(),
            trailers: None,
            size: 0,
            cap,
            overflowed: false,
            touched: false,
            fault: Fault::default(),
        };
        Replay { shared: Arc::new(Mutex::new(shared)) }
    }

    pub(crate) fn attempt(&self) -> Attempt<B> {
        Attempt { shared: self.shared.clone(), next: 0, trailers_sent: false }
    }

    /// Whether another attempt can send the whole body again.
    pub(crate) fn replayable(&self) -> bool {
        let s = lock(&self.shared);
        !s.touched || !s.overflowed
    }

    pub(crate) fn fault(&self) -> Option<bool> {
        lock(&self.shared).fault.get()
    }
}

fn lock<B>(m: &Mutex<Shared<B>>) -> MutexGuard<'_, Shared<B>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl Attempt ===

impl<B: Body<Data = Bytes> + Unpin> Body for Attempt<B>
where
    B::Error: ClientFault,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
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
            Poll::Ready(Some(Err(e))) => {
                s.fault.record(&e);
                return Poll::Ready(Some(Err(e)));
            }
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::fmt;

    use http_body_util::BodyExt;

    use super::*;
    use crate::client::body::{Outbound, RequestBody};

    #[derive(Debug)]
    struct Broken(bool);

    impl fmt::Display for Broken {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(if self.0 { "the app went away" } else { "invalid chunk" })
        }
    }

    impl ClientFault for Broken {
        fn aborted(&self) -> bool {
            self.0
        }
    }

    /// A body of ready frames: data chunks, then optionally trailers or an error.
    struct Frames(VecDeque<Result<Frame<Bytes>, Broken>>);

    impl Frames {
        fn data(chunks: &[&'static str]) -> Frames {
            Frames(chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))).collect())
        }
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = Broken;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
            Poll::Ready(self.0.pop_front())
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    async fn read<B: Body<Data = Bytes> + Unpin>(body: B) -> Result<(String, Option<HeaderMap>), B::Error> {
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((String::from_utf8(collected.to_bytes().to_vec()).unwrap(), trailers))
    }

    #[tokio::test]
    async fn every_attempt_sends_the_whole_body_and_its_trailers() {
        let mut frames = Frames::data(&["ab", "cd"]);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        frames.0.push_back(Ok(Frame::trailers(trailers.clone())));
        let mut body = RequestBody::new(frames, 3, 1024);
        for _ in 0..3 {
            let attempt = body.next().expect("replayable");
            assert_eq!(read(attempt).await.unwrap(), ("abcd".to_string(), Some(trailers.clone())));
        }
    }

    #[tokio::test]
    async fn a_second_attempt_replays_what_the_first_read_then_continues() {
        let mut body = RequestBody::new(Frames::data(&["ab", "cd", "ef"]), 2, 1024);
        let mut first = body.next().unwrap();
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first); // the attempt failed after one chunk
        assert_eq!(read(body.next().unwrap()).await.unwrap().0, "abcdef");
    }

    #[tokio::test]
    async fn past_the_cap_the_body_is_no_longer_replayable() {
        let mut body = RequestBody::new(Frames::data(&["abcd", "efgh"]), 3, 6);
        assert!(body.replayable(), "nothing read yet");
        assert_eq!(read(body.next().unwrap()).await.unwrap().0, "abcdefgh");
        assert!(!body.replayable());
        assert!(body.next().is_none());
    }

    #[tokio::test]
    async fn an_untouched_body_over_the_cap_can_still_go_to_the_next_attempt() {
        let mut body = RequestBody::new(Frames::data(&["abcd", "efgh"]), 3, 2);
        drop(body.next().unwrap()); // a connect failure: nothing read
        assert_eq!(read(body.next().unwrap()).await.unwrap().0, "abcdefgh");
    }

    #[tokio::test]
    async fn a_once_body_comes_back_when_it_was_not_sent() {
        let mut body = RequestBody::new(Frames::data(&["x"]), 1, 0);
        let unsent = body.next().unwrap();
        assert!(body.next().is_none() && !body.replayable(), "sendable once");
        body.restore(unsent);
        assert!(body.replayable());
        assert!(matches!(body.next(), Some(Outbound::Once(..))));
    }

    #[tokio::test]
    async fn empty_bodies_need_no_copy() {
        let mut body = RequestBody::new(Frames::data(&[]), 3, 0);
        assert!(matches!(body, RequestBody::Empty));
        assert!(body.next().is_some() && body.next().is_some());
    }

    #[tokio::test]
    async fn errors_from_the_app_body_are_recorded_as_its_fault() {
        for (aborted, attempts) in [(false, 1), (true, 1), (false, 2), (true, 2)] {
            let mut frames = Frames::data(&["ab"]);
            frames.0.push_back(Err(Broken(aborted)));
            let mut body = RequestBody::new(frames, attempts, 1024);
            assert_eq!(body.fault(), None);
            assert!(read(body.next().unwrap()).await.is_err());
            assert_eq!(body.fault(), Some(aborted), "attempts {attempts}");
        }
    }
}
