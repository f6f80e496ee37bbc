//! Sliding windows of call outcomes: the last N calls, or the calls of the last N
//! seconds. Both keep running totals, so recording and reading are O(1) (amortized
//! for the time window).

use tokio::time::Instant;

/// Totals over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Recorded calls.
    pub calls: u32,
    /// Of which failed.
    pub failures: u32,
    /// Of which were slower than the slow-call duration.
    pub slow: u32,
}

impl Stats {
    /// Failed calls in percent of all calls (0 when empty).
    pub fn failure_rate(&self) -> f64 {
        percent(self.failures, self.calls)
    }

    /// Slow calls in percent of all calls (0 when empty).
    pub fn slow_call_rate(&self) -> f64 {
        percent(self.slow, self.calls)
    }

    pub(crate) fn add(&mut self, failed: bool, slow: bool) {
        self.calls += 1;
        self.failures += u32::from(failed);
        self.slow += u32::from(slow);
    }

    fn sub(&mut self, other: Stats) {
        self.calls -= other.calls;
        self.failures -= other.failures;
        self.slow -= other.slow;
    }
}

fn percent(part: u32, whole: u32) -> f64 {
    if whole == 0 {
        0.0
    } else {
        f64::from(part) * 100.0 / f64::from(whole)
    }
}

/// A window over the last `size` calls.
#[derive(Debug, Clone)]
pub(crate) struct CountWindow {
    /// (failed, slow) of each call, oldest overwritten first.
    ring: Vec<(bool, bool)>,
    next: usize,
    totals: Stats,
}

impl CountWindow {
    /// A window over the last `size` (at least 1) calls.
    pub(crate) fn new(size: u32) -> Self {
        Self {
            ring: Vec::with_capacity(size.max(1) as usize),
            next: 0,
            totals: Stats::default(),
        }
    }

    /// Records one call.
    pub(crate) fn record(&mut self, failed: bool, slow: bool) {
        let capacity = self.ring.capacity();
        if self.ring.len() < capacity {
            self.ring.push((failed, slow));
        } else {
            let (old_failed, old_slow) = self.ring[self.next];
            self.totals.sub(Stats {
                calls: 1,
                failures: u32::from(old_failed),
                slow: u32::from(old_slow),
            });
            self.ring[self.next] = (failed, slow);
        }
        self.next = (self.next + 1) % capacity;
        self.totals.add(failed, slow);
    }

    /// Totals over the window.
    pub(crate) fn stats(&self) -> Stats {
        self.totals
    }
}

/// A window over the calls of the last `seconds` seconds, in one-second buckets.
#[derive(Debug, Clone)]
pub(crate) struct TimeWindow {
    origin: Instant,
    buckets: Vec<Stats>,
    /// The second (since `origin`) of the newest bucket; older seconds were cleared.
    head: u64,
    totals: Stats,
}

impl TimeWindow {
    /// A window over the last `seconds` (at least 1) seconds, starting at `now`.
    pub(crate) fn new(seconds: u32, now: Instant) -> Self {
        Self {
            origin: now,
            buckets: vec![Stats::default(); seconds.max(1) as usize],
            head: 0,
            totals: Stats::default(),
        }
    }

    fn advance(&mut self, now: Instant) -> usize {
        let second = now.saturating_duration_since(self.origin).as_secs();
        let size = self.buckets.len() as u64;
        if second > self.head {
            // Clear every bucket that fell out of the window, at most all of them.
            let first_stale = self.head + 1;
            let stale = (second - self.head).min(size);
            for s in first_stale..first_stale + stale {
                let bucket = &mut self.buckets[(s % size) as usize];
                self.totals.sub(*bucket);
                *bucket = Stats::default();
            }
            self.head = second;
        }
        (self.head % size) as usize
    }

    /// Records one call at `now`.
    pub(crate) fn record(&mut self, now: Instant, failed: bool, slow: bool) {
        let index = self.advance(now);
        self.buckets[index].add(failed, slow);
        self.totals.add(failed, slow);
    }

    /// Totals over the window ending at `now`.
    pub(crate) fn stats(&mut self, now: Instant) -> Stats {
        self.advance(now);
        self.totals
    }
}

#[cfg(test)]
mod test {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn rates() {
        let s = Stats {
            calls: 4,
            failures: 1,
            slow: 2,
        };
        assert_eq!((s.failure_rate(), s.slow_call_rate()), (25.0, 50.0));
        assert_eq!(Stats::default().failure_rate(), 0.0);
    }

    proptest! {
        /// The count window equals a model that recounts the last `size` calls.
        #[test]
        fn count_window_matches_model(size in 1u32..20, calls in proptest::collection::vec((any::<bool>(), any::<bool>()), 0..100)) {
            let mut window = CountWindow::new(size);
            for (i, &(failed, slow)) in calls.iter().enumerate() {
                window.record(failed, slow);
                let recent = &calls[(i + 1).saturating_sub(size as usize)..=i];
                let model = Stats {
                    calls: recent.len() as u32,
                    failures: recent.iter().filter(|c| c.0).count() as u32,
                    slow: recent.iter().filter(|c| c.1).count() as u32,
                };
                prop_assert_eq!(window.stats(), model);
            }
        }

        /// The time window equals a model that recounts the calls whose second is
        /// within the last `seconds` seconds.
        #[test]
        fn time_window_matches_model(
            seconds in 1u32..10,
            steps in proptest::collection::vec((0u64..3000, any::<bool>(), any::<bool>()), 0..100),
        ) {
            let origin = Instant::now();
            let mut window = TimeWindow::new(seconds, origin);
            let mut at = 0u64; // milliseconds since origin
            let mut log: Vec<(u64, bool, bool)> = Vec::new();
            for (advance_ms, failed, slow) in steps {
                at += advance_ms;
                let now = origin + Duration::from_millis(at);
                window.record(now, failed, slow);
                log.push((at / 1000, failed, slow));
                let current = at / 1000;
                let recent: Vec<_> = log.iter().filter(|(s, ..)| s + u64::from(seconds) > current).collect();
                let model = Stats {
                    calls: recent.len() as u32,
                    failures: recent.iter().filter(|c| c.1).count() as u32,
                    slow: recent.iter().filter(|c| c.2).count() as u32,
                };
                prop_assert_eq!(window.stats(now), model);
            }
        }
    }
}
