//! Slow start (Envoy's): a new endpoint's weight ramps from a floor to full over a window,
//! `factor = max(floor, (age / window)^(1 / aggression))`.
//!
//! An endpoint's age comes from its `registered_at` tag (Unix seconds, written by
//! registration) when it has one, so every client agrees on it and a restarted client does
//! not ramp instances that are old; otherwise from when this Outrider first saw it, where
//! the endpoints of the first set a service receives count as old. When every endpoint of a
//! service is new (the whole service starting), none ramps.
//!
//! Owns: that arithmetic, done when a snapshot is built; the owner rebuilds in steps while a
//! ramp lasts. Must not: run per request.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Endpoint;
use crate::clock;
use crate::config::SlowStart;

/// Weights are multiplied by this while slow start is configured, so a ramp has steps finer
/// than one unit of weight (the picker divides common factors out again).
pub(crate) const SCALE: u32 = 100;

/// The tag registration writes: when the instance registered, in Unix seconds.
pub(crate) const REGISTERED_AT: &str = "registered_at";

/// A ramp step: the snapshot is rebuilt this often while an endpoint ramps.
pub(crate) fn step(cfg: &SlowStart) -> Duration {
    (cfg.window / 20).max(Duration::from_millis(100))
}

/// How far into its ramp `e` is: `None` when it is old (full weight).
fn age(cfg: &SlowStart, e: &Endpoint, now_ms: u64) -> Option<Duration> {
    let age = match e.tags.get(REGISTERED_AT).and_then(|t| t.parse::<u64>().ok()) {
        Some(at) => {
            let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            Duration::from_secs(wall.saturating_sub(at))
        }
        None => Duration::from_millis(now_ms.saturating_sub(e.state.seen_ms?)),
    };
    (age < cfg.window).then_some(age)
}

pub(crate) fn factor(cfg: &SlowStart, age: Duration) -> f64 {
    let t = age.as_secs_f64() / cfg.window.as_secs_f64();
    t.powf(1.0 / cfg.aggression).clamp(cfg.floor, 1.0)
}

/// The endpoints with their weights scaled by [`SCALE`] and ramped; also whether any ramps.
pub(crate) fn apply(cfg: &SlowStart, endpoints: &[Endpoint]) -> (Vec<Endpoint>, bool) {
    let now = clock::now_ms();
    let ages: Vec<Option<Duration>> = endpoints.iter().map(|e| age(cfg, e, now)).collect();
    let live = endpoints.iter().zip(&ages).filter(|(e, _)| e.weight > 0);
    let all_new = live.clone().count() > 0 && live.clone().all(|(_, a)| a.is_some());
    let mut ramping = false;
    let scaled = endpoints
        .iter()
        .zip(&ages)
        .map(|(e, a)| {
            let full = f64::from(e.weight) * f64::from(SCALE);
            let weight = match a {
                Some(age) if !all_new && e.weight > 0 => {
                    ramping = true;
                    (full * factor(cfg, *age)).round().max(1.0)
                }
                _ => full,
            };
            Endpoint { weight: weight as u32, ..e.clone() }
        })
        .collect();
    (scaled, ramping)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(aggression: f64) -> SlowStart {
        SlowStart { window: Duration::from_secs(10), floor: 0.1, aggression }
    }

    #[test]
    fn the_curve_starts_at_the_floor_and_reaches_full_weight_at_the_window() {
        let c = cfg(1.0);
        assert_eq!(factor(&c, Duration::ZERO), 0.1);
        assert!((factor(&c, Duration::from_secs(5)) - 0.5).abs() < 1e-9);
        assert_eq!(factor(&c, Duration::from_secs(10)), 1.0);
        // Aggression 2: sqrt — half the window gives ~71 % of the weight.
        assert!((factor(&cfg(2.0), Duration::from_secs(5)) - 0.5f64.sqrt()).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_ramps_unless_all_are_new_and_registered_at_is_believed() {
        let c = cfg(1.0);
        let mut eps = crate::upstream::tests::endpoints(&[1, 1, 1]);
        // endpoints() builds one set: the first a service receives, so all are old.
        assert!(!apply(&c, &eps).1);
        let fresh =
            std::sync::Arc::new(super::super::EndpointState::seen_now("127.0.0.1:9".parse().unwrap()));
        eps.push(Endpoint { state: fresh, ..eps[0].clone() });
        let (scaled, ramping) = apply(&c, &eps);
        assert!(ramping);
        assert_eq!(scaled[3].weight, 10, "floor: 10 % of 100");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(apply(&c, &eps).0[3].weight, 50);
        // Only new endpoints: the whole service is starting, nothing ramps.
        assert!(!apply(&c, &eps[3..]).1);
        // A registration time a minute ago: old, whoever sees it first.
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        eps[3].tags = std::sync::Arc::new([(REGISTERED_AT.to_string(), (wall - 60).to_string())].into());
        assert!(!apply(&c, &eps).1);
    }
}
