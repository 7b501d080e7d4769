//! Two counters over a sliding window of ten time buckets, in atomics: what the retry budget
//! (requests, retries) and the circuit breaker (requests, failures) count.
//! Must not: lock — both sit on the request path.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;

const BUCKETS: usize = 10;

#[derive(Debug)]
pub(crate) struct Window {
    bucket_ms: u64,
    buckets: [Bucket; BUCKETS],
}

#[derive(Debug, Default)]
struct Bucket {
    epoch: AtomicU64,
    counts: [AtomicU32; 2],
}

// === impl Window ===

impl Window {
    pub(crate) fn new(window: Duration) -> Window {
        let bucket_ms = (window.as_millis() as u64 / BUCKETS as u64).max(1);
        Window { bucket_ms, buckets: Default::default() }
    }

    /// Adds to the two counters of the current bucket.
    pub(crate) fn add(&self, first: u32, second: u32) {
        let b = self.current();
        if first > 0 {
            b.counts[0].fetch_add(first, Ordering::Relaxed);
        }
        if second > 0 {
            b.counts[1].fetch_add(second, Ordering::Relaxed);
        }
    }

    /// Both counters summed over the window.
    pub(crate) fn sums(&self) -> (u64, u64) {
        let epoch = self.epoch();
        let live = self.buckets.iter().filter(|b| {
            let e = b.epoch.load(Ordering::Relaxed);
            e + BUCKETS as u64 > epoch && e <= epoch
        });
        live.fold((0, 0), |(x, y), b| {
            (
                x + u64::from(b.counts[0].load(Ordering::Relaxed)),
                y + u64::from(b.counts[1].load(Ordering::Relaxed)),
            )
        })
    }

    /// Forgets everything counted so far.
    pub(crate) fn clear(&self) {
        for b in &self.buckets {
            b.epoch.store(0, Ordering::Relaxed);
        }
    }

    fn epoch(&self) -> u64 {
        now_ms() / self.bucket_ms + BUCKETS as u64
    }

    /// The bucket for now, cleared first if it last served an older epoch.
    fn current(&self) -> &Bucket {
        let epoch = self.epoch();
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let seen = b.epoch.load(Ordering::Relaxed);
        if seen != epoch && b.epoch.compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            b.counts[0].store(0, Ordering::Relaxed);
            b.counts[1].store(0, Ordering::Relaxed);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_slide_out_of_the_window() {
        let w = Window::new(Duration::from_secs(10));
        w.add(3, 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        w.add(2, 0);
        assert_eq!(w.sums(), (5, 1));
        tokio::time::advance(Duration::from_millis(5_500)).await;
        assert_eq!(w.sums(), (2, 0), "the first bucket left the window");
        w.clear();
        assert_eq!(w.sums(), (0, 0));
    }
}
