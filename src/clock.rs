//! A process-wide millisecond clock on tokio's time (so paused-clock tests control it), for
//! state kept in atomics: a `u64` fits where an `Instant` cannot.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds since the clock's base.
pub(crate) fn now_ms() -> u64 {
    Instant::now().saturating_duration_since(base()).as_millis() as u64
}

/// The instant `ms` denotes.
pub(crate) fn instant_at(ms: u64) -> Instant {
    base() + Duration::from_millis(ms)
}
