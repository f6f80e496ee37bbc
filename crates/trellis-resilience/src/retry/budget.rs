//! A retry budget: retries may add at most `percent` to the rate of original calls,
//! plus `min_per_sec`, over a sliding window.
//!
//! # Why a budget and not just max attempts
//! With 3 attempts per call, an upstream that starts failing gets 3× its normal load
//! exactly when it can least take it, and every caller in a chain multiplies that
//! again. A budget caps retries as a fraction of real traffic, so a failing upstream
//! sees at most `1 + percent/100` times its load. A retry is charged when it is
//! *decided*, before its backoff: retries waiting to be sent count (Envoy counts only
//! retries in flight, so a burst of failures can schedule far more than its budget —
//! envoy#30205).

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::BudgetConfig;
use tokio::time::Instant;

/// Figures of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BudgetSnapshot {
    /// Original calls in the window.
    pub calls: u64,
    /// Retries charged in the window.
    pub retries: u64,
    /// Retries the window allows.
    pub allowed: u64,
    /// Retries refused for lack of budget since start.
    pub exhausted: u64,
}

const BUCKETS: u64 = 10;

#[derive(Debug)]
struct Counts {
    /// (calls, retries) per bucket of `window / BUCKETS`.
    buckets: [(u64, u64); BUCKETS as usize],
    /// Index of the newest bucket since `origin`.
    head: u64,
    exhausted: u64,
}

/// A retry budget, shared by every caller of one target.
#[derive(Debug)]
pub struct RetryBudget {
    config: BudgetConfig,
    origin: Instant,
    bucket: Duration,
    /// A std `Mutex`: a few additions per call, never held across an `.await`.
    counts: Mutex<Counts>,
    exhausted_metric: metrics::Counter,
}

impl RetryBudget {
    /// A budget named `name` (for metrics).
    pub fn new(name: &str, config: BudgetConfig) -> Self {
        Self {
            origin: Instant::now(),
            bucket: config.window / BUCKETS as u32,
            counts: Mutex::new(Counts {
                buckets: [(0, 0); BUCKETS as usize],
                head: 0,
                exhausted: 0,
            }),
            exhausted_metric: metrics::counter!("trellis_retry_budget_exhausted_total", "budget" => name.to_owned()),
            config,
        }
    }

    fn advance(&self, counts: &mut Counts) -> usize {
        let now = Instant::now().saturating_duration_since(self.origin);
        let index =
            u64::try_from(now.as_nanos() / self.bucket.as_nanos().max(1)).unwrap_or(u64::MAX);
        if index > counts.head {
            let stale = (index - counts.head).min(BUCKETS);
            for i in counts.head + 1..=counts.head + stale {
                counts.buckets[(i % BUCKETS) as usize] = (0, 0);
            }
            counts.head = index;
        }
        (counts.head % BUCKETS) as usize
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts an original call.
    pub fn deposit(&self) {
        let mut counts = self.lock();
        let i = self.advance(&mut counts);
        counts.buckets[i].0 += 1;
    }

    fn totals(counts: &Counts) -> (u64, u64) {
        counts
            .buckets
            .iter()
            .fold((0, 0), |(c, r), (bc, br)| (c + bc, r + br))
    }

    fn allowed(&self, calls: u64) -> u64 {
        let floor = u64::from(self.config.min_per_sec) * self.config.window.as_secs();
        floor + (calls as f64 * self.config.percent / 100.0) as u64
    }

    /// Charges one retry; `false` (and nothing charged) if the budget is spent.
    pub fn withdraw(&self) -> bool {
        let mut counts = self.lock();
        let i = self.advance(&mut counts);
        let (calls, retries) = Self::totals(&counts);
        if retries < self.allowed(calls) {
            counts.buckets[i].1 += 1;
            true
        } else {
            counts.exhausted += 1;
            self.exhausted_metric.increment(1);
            false
        }
    }

    /// Current figures.
    pub fn snapshot(&self) -> BudgetSnapshot {
        let mut counts = self.lock();
        self.advance(&mut counts);
        let (calls, retries) = Self::totals(&counts);
        BudgetSnapshot {
            calls,
            retries,
            allowed: self.allowed(calls),
            exhausted: counts.exhausted,
        }
    }
}

#[cfg(test)]
mod test {
    use tokio::time::advance;

    use super::*;

    fn budget(percent: f64, min_per_sec: u32) -> RetryBudget {
        RetryBudget::new(
            "t",
            BudgetConfig {
                percent,
                min_per_sec,
                window: Duration::from_secs(10),
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_fraction_of_calls_plus_a_floor() {
        let b = budget(20.0, 1);
        for _ in 0..100 {
            b.deposit();
        }
        // 10 (floor: 1/s × 10s) + 20% of 100.
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 30);
        assert_eq!(b.snapshot().exhausted, 70);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides() {
        let b = budget(0.0, 1);
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        advance(Duration::from_secs(5)).await;
        assert!(!b.withdraw(), "all 10 retries still in the window");
        advance(Duration::from_secs(5)).await;
        assert_eq!(
            (0..20).filter(|_| b.withdraw()).count(),
            10,
            "the old retries left the window"
        );
    }
}
