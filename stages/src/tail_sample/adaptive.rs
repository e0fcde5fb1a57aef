//! The adaptive latency threshold (`latency.adaptive` on a top-level `latency` policy).
//!
//! Per route (the root span's `http.route`, else its name) the durations of the traces decided
//! are counted in a histogram of two halves of `window`: the current half and the one before.
//! Each time a half ends, every route's `quantile` over both halves is compared with the route's
//! threshold: within `margin_ms` of it (or above), the threshold is lifted by `step_ms`, up to
//! `max_threshold_ms`; back below the next lower threshold by more than the margin, it steps
//! back by `step_ms`, never below the configured `threshold_ms`. So a route moves at most one
//! step per half window, only on `min_samples` traces, and never oscillates between two steps
//! on a steady distribution. Lifted thresholds are stored in the queue
//! ([`tailgate_ipc::decisions::RouteThresholds`]): they survive restarts, log_mirror judges a
//! route's traceless records by them and the supervisor exports them.

use std::collections::HashMap;

use tailgate_config::AdaptiveLatency;
use tailgate_ipc::decisions::RouteThresholds;

/// One threshold change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The route.
    pub route: String,
    /// Threshold before, milliseconds.
    pub from_ms: u64,
    /// Threshold after, milliseconds.
    pub to_ms: u64,
    /// The quantile that moved it (milliseconds; `u64::MAX` above the histogram's range).
    pub quantile_ms: u64,
}

#[derive(Debug)]
struct Route {
    threshold_ms: u64,
    /// Counts per bucket: the current half window, then the previous one.
    halves: [Vec<u32>; 2],
}

/// The per-route thresholds and what they are computed from.
#[derive(Debug)]
pub struct Adaptive {
    base_ms: u64,
    max_ms: u64,
    step_ms: u64,
    margin_ms: u64,
    quantile: f64,
    half_window_nanos: u64,
    min_samples: u64,
    max_routes: usize,
    /// Histogram bucket width, milliseconds; the last bucket takes everything above.
    bucket_ms: u64,
    buckets: usize,
    routes: HashMap<String, Route>,
    /// Start of the current half window (pipeline time), 0 before the first tick.
    half_started: u64,
    /// Changes since the queue was created.
    changes: u64,
    /// A change not written to the queue yet.
    dirty: bool,
    /// Traces of routes past `max_routes` (judged by the base threshold).
    pub untracked: u64,
}

impl Adaptive {
    /// A tracker for a `latency` policy of `base_ms`, resuming the thresholds `stored`.
    pub fn new(base_ms: u64, config: &AdaptiveLatency, stored: &RouteThresholds) -> Adaptive {
        let max_ms = if config.max_threshold_ms == 0 { base_ms.saturating_mul(2) } else { config.max_threshold_ms };
        let step_ms = config.step_ms.max(1);
        let bucket_ms = (step_ms / 5).max(1);
        let span_ms = max_ms.saturating_add(step_ms).saturating_add(config.margin_ms);
        let buckets = usize::try_from(span_ms / bucket_ms + 2).unwrap_or(usize::MAX).min(4096);
        let mut adaptive = Adaptive {
            base_ms,
            max_ms,
            step_ms,
            margin_ms: config.margin_ms,
            quantile: config.quantile,
            half_window_nanos: (config.window.as_nanos() as u64 / 2).max(1),
            min_samples: config.min_samples,
            max_routes: config.max_routes,
            bucket_ms,
            buckets,
            routes: HashMap::new(),
            half_started: 0,
            changes: stored.changes,
            dirty: false,
            untracked: 0,
        };
        for (route, ms) in &stored.routes {
            if adaptive.routes.len() < adaptive.max_routes {
                let threshold_ms = (*ms).clamp(base_ms, max_ms);
                adaptive.routes.insert(route.clone(), Route { threshold_ms, halves: adaptive.empty_halves() });
            }
        }
        adaptive
    }

    fn empty_halves(&self) -> [Vec<u32>; 2] {
        [vec![0; self.buckets], vec![0; self.buckets]]
    }

    /// The threshold for a trace of `route` (the base one without a route or an untracked one).
    pub fn threshold_ms(&self, route: Option<&str>) -> u64 {
        route.and_then(|r| self.routes.get(r)).map_or(self.base_ms, |r| r.threshold_ms)
    }

    /// Counts a decided trace of `route` that lasted `duration_nanos`.
    pub fn observe(&mut self, route: &str, duration_nanos: u64) {
        let bucket = usize::try_from(duration_nanos / 1_000_000 / self.bucket_ms).unwrap_or(usize::MAX);
        let bucket = bucket.min(self.buckets - 1);
        if !self.routes.contains_key(route) {
            if self.routes.len() >= self.max_routes {
                self.untracked += 1;
                return;
            }
            let halves = self.empty_halves();
            self.routes.insert(route.to_owned(), Route { threshold_ms: self.base_ms, halves });
        }
        if let Some(state) = self.routes.get_mut(route) {
            state.halves[0][bucket] = state.halves[0][bucket].saturating_add(1);
        }
    }

    /// Ends the half windows that are over by `now` (pipeline time) and moves the thresholds
    /// their data calls for.
    pub fn tick(&mut self, now: u64) -> Vec<Change> {
        if self.half_started == 0 {
            self.half_started = now;
            return Vec::new();
        }
        if now < self.half_started.saturating_add(self.half_window_nanos) {
            return Vec::new();
        }
        let changes = self.evaluate();
        let halves_over = (now - self.half_started) / self.half_window_nanos;
        self.half_started += halves_over * self.half_window_nanos;
        for state in self.routes.values_mut() {
            if halves_over >= 2 {
                // Idle for a whole window: nothing of it is recent.
                state.halves[1].iter_mut().for_each(|c| *c = 0);
            } else {
                state.halves.swap(0, 1);
            }
            state.halves[0].iter_mut().for_each(|c| *c = 0);
        }
        // Routes at their base with nothing counted are forgotten (room for others).
        let base = self.base_ms;
        self.routes.retain(|_, r| r.threshold_ms != base || r.halves[1].iter().any(|c| *c > 0));
        changes
    }

    fn evaluate(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        for (route, state) in &mut self.routes {
            let total: u64 = state.halves.iter().flatten().map(|c| u64::from(*c)).sum();
            if total == 0 || total < self.min_samples {
                continue;
            }
            let rank = ((self.quantile * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0u64;
            let mut quantile_ms = u64::MAX;
            for bucket in 0..self.buckets {
                seen += u64::from(state.halves[0][bucket]) + u64::from(state.halves[1][bucket]);
                if seen >= rank {
                    if bucket + 1 < self.buckets {
                        quantile_ms = (bucket as u64 + 1) * self.bucket_ms;
                    }
                    break;
                }
            }
            let from = state.threshold_ms;
            let near = quantile_ms.saturating_add(self.margin_ms) >= from;
            let to = if near && from < self.max_ms {
                from.saturating_add(self.step_ms).min(self.max_ms)
            } else if !near
                && from > self.base_ms
                && quantile_ms.saturating_add(self.margin_ms) < from.saturating_sub(self.step_ms)
            {
                from.saturating_sub(self.step_ms).max(self.base_ms)
            } else {
                from
            };
            if to != from {
                state.threshold_ms = to;
                changes.push(Change { route: route.clone(), from_ms: from, to_ms: to, quantile_ms });
            }
        }
        changes.sort_by(|a, b| a.route.cmp(&b.route));
        self.changes += changes.len() as u64;
        self.dirty |= !changes.is_empty();
        changes
    }

    /// The thresholds to store, once after each change.
    pub fn take_dirty(&mut self) -> Option<RouteThresholds> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(self.thresholds())
    }

    /// Whether a change waits to be stored.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The lifted thresholds (routes at the base are left out).
    pub fn thresholds(&self) -> RouteThresholds {
        let routes = self
            .routes
            .iter()
            .filter(|(_, r)| r.threshold_ms != self.base_ms)
            .map(|(route, r)| (route.clone(), r.threshold_ms))
            .collect();
        RouteThresholds { routes, changes: self.changes }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HALF: u64 = 5_000_000_000;

    fn config() -> AdaptiveLatency {
        AdaptiveLatency {
            window: std::time::Duration::from_secs(10),
            max_threshold_ms: 300,
            min_samples: 20,
            ..AdaptiveLatency::default()
        }
    }

    /// Feeds one half window of 100 traces: `slow` of them at `high_ms`, the rest at 50 ms.
    fn half(adaptive: &mut Adaptive, at: u64, slow: u32, high_ms: u64) -> Vec<Change> {
        for n in 0..100 {
            let ms = if n < slow { high_ms } else { 50 };
            adaptive.observe("/checkout", ms * 1_000_000);
        }
        adaptive.tick(at)
    }

    #[test]
    fn the_threshold_rises_in_steps_while_the_p95_nears_it_and_returns_after_recovery() {
        let mut adaptive = Adaptive::new(200, &config(), &RouteThresholds::default());
        assert!(adaptive.tick(1).is_empty());
        // p95 at 185 ms: within 25 ms of 200: one step per half window, up to the maximum.
        let mut seen = Vec::new();
        for k in 1..=8 {
            seen.extend(half(&mut adaptive, 1 + k * HALF, 10, 185).into_iter().map(|c| c.to_ms));
        }
        assert_eq!(seen, vec![225]);
        // The p95 drifts on towards the new threshold: the next steps, never past 300.
        for k in 9..=20 {
            seen.extend(half(&mut adaptive, 1 + k * HALF, 10, 290).into_iter().map(|c| c.to_ms));
        }
        assert_eq!(seen, vec![225, 250, 275, 300]);
        assert_eq!(adaptive.threshold_ms(Some("/checkout")), 300);
        assert_eq!(adaptive.threshold_ms(Some("/other")), 200);
        assert_eq!(adaptive.thresholds().routes.get("/checkout"), Some(&300));
        // Recovery: the p95 falls to 50 ms; one step back per half window, down to the base.
        for k in 21..=40 {
            seen.extend(half(&mut adaptive, 1 + k * HALF, 0, 0).into_iter().map(|c| c.to_ms));
        }
        assert_eq!(seen, vec![225, 250, 275, 300, 275, 250, 225, 200]);
        assert!(adaptive.thresholds().routes.is_empty());
        assert_eq!(adaptive.thresholds().changes, 8);
    }

    #[test]
    fn a_steady_p95_between_two_steps_does_not_oscillate() {
        let mut adaptive = Adaptive::new(200, &config(), &RouteThresholds::default());
        adaptive.tick(1);
        let mut seen = Vec::new();
        for k in 1..=20 {
            seen.extend(half(&mut adaptive, 1 + k * HALF, 10, 190).into_iter().map(|c| c.to_ms));
        }
        // 190 + 25 >= 200: lifted to 225; 190 + 25 < 225 but not below 200: it stays.
        assert_eq!(seen, vec![225]);
    }

    #[test]
    fn few_samples_move_nothing_and_stored_thresholds_resume() {
        let stored = RouteThresholds { routes: [("/a".to_string(), 250)].into(), changes: 2 };
        let mut adaptive = Adaptive::new(200, &config(), &stored);
        assert_eq!(adaptive.threshold_ms(Some("/a")), 250);
        adaptive.tick(1);
        for _ in 0..5 {
            adaptive.observe("/b", 199_000_000);
        }
        assert!(adaptive.tick(1 + HALF).is_empty());
        assert_eq!(adaptive.take_dirty(), None);
    }
}
