//! The generic cell rate algorithm, in nanoseconds.
//!
//! GCRA keeps one number per limit: the *theoretical arrival time* (TAT) of the next
//! call if calls came at exactly the allowed rate. A call at `now` is allowed when,
//! after it, the TAT is no more than `burst` emission intervals ahead of `now`; it
//! then advances the TAT by one interval. Same behaviour as a token bucket refilled
//! continuously, in one word of state, updated with one compare-and-swap.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A rate (calls per second) and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Nanoseconds between calls at the sustained rate.
    emission: u64,
    /// How far the TAT may run ahead of now: `burst` emissions.
    tolerance: u64,
}

impl Gcra {
    /// `rate` calls per second, up to `burst` at once.
    ///
    /// # Panics
    /// If `rate` is not positive and finite or `burst` is 0 (validated configs never are).
    pub fn new(rate: f64, burst: u32) -> Self {
        assert!(
            rate.is_finite() && rate > 0.0 && burst > 0,
            "validated rate and burst"
        );
        let emission = (1e9 / rate).round().max(1.0) as u64;
        Self {
            emission,
            tolerance: emission.saturating_mul(u64::from(burst)),
        }
    }

    /// Decides a call at `now` given the current TAT: `Ok(new TAT)` or `Err(wait)`.
    pub fn decide(&self, tat: u64, now: u64) -> Result<u64, Duration> {
        let start = tat.max(now);
        let next = start.saturating_add(self.emission);
        let ahead = next - now;
        if ahead > self.tolerance {
            Err(Duration::from_nanos(ahead - self.tolerance))
        } else {
            Ok(next)
        }
    }
}

/// One limit in one atomic word.
#[derive(Debug)]
pub(crate) struct Cell {
    tat: AtomicU64,
}

impl Cell {
    pub(crate) fn new() -> Self {
        Self {
            tat: AtomicU64::new(0),
        }
    }

    pub(crate) fn check(&self, gcra: &Gcra, now: u64) -> Result<(), Duration> {
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let next = gcra.decide(current, now)?;
            match self
                .tat
                .compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }
}

/// Shards of the keyed map: spreads lock contention across keys.
const SHARDS: usize = 16;

/// One limit per key, with bounded memory: a key whose TAT is in the past is
/// equivalent to an absent one, so full shards drop those first.
#[derive(Debug)]
pub(crate) struct KeyedCells {
    shards: Vec<Mutex<HashMap<String, u64>>>,
    max_keys_per_shard: usize,
}

impl KeyedCells {
    pub(crate) fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_keys_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    pub(crate) fn check(&self, gcra: &Gcra, key: &str, now: u64) -> Result<(), Duration> {
        let shard = &self.shards[shard_of(key)];
        let mut map = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tat = map.get(key).copied().unwrap_or(0);
        let next = gcra.decide(tat, now)?;
        if !map.contains_key(key) && map.len() >= self.max_keys_per_shard {
            map.retain(|_, tat| *tat > now);
            if map.len() >= self.max_keys_per_shard {
                // Every key is mid-burst: forget the one closest to being idle.
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, tat)| **tat)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(key.to_owned(), next);
        Ok(())
    }

    /// Keys currently tracked.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }
}

fn shard_of(key: &str) -> usize {
    // FNV-1a: tiny, good enough to spread keys over 16 shards.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % SHARDS as u64) as usize
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn burst_then_rate() {
        let g = Gcra::new(10.0, 5);
        let cell = Cell::new();
        for _ in 0..5 {
            cell.check(&g, SEC).expect("burst");
        }
        let wait = cell.check(&g, SEC).expect_err("burst used up");
        assert_eq!(wait, Duration::from_millis(100));
        assert!(cell.check(&g, SEC + 99_000_000).is_err());
        cell.check(&g, SEC + 100_000_000)
            .expect("one emission later");
    }

    proptest! {
        /// Over any schedule, the calls allowed in any window of length L are at most
        /// burst + rate × L, and a call is refused only when the limit is reached.
        #[test]
        fn never_exceeds_rate_plus_burst(
            rate in 1u32..1000,
            burst in 1u32..50,
            gaps in proptest::collection::vec(0u64..50_000_000, 1..300),
        ) {
            let g = Gcra::new(f64::from(rate), burst);
            let cell = Cell::new();
            let mut now = SEC;
            let mut allowed = Vec::new();
            for gap in gaps {
                now += gap;
                if cell.check(&g, now).is_ok() {
                    allowed.push(now);
                }
            }
            let emission = (1e9 / f64::from(rate)).round() as u64;
            for (i, &start) in allowed.iter().enumerate() {
                for (j, &end) in allowed.iter().enumerate().skip(i) {
                    let span = end - start;
                    let count = (j - i + 1) as u64;
                    prop_assert!(count <= u64::from(burst) + span / emission + 1,
                        "{count} calls in {span}ns with rate {rate}/s burst {burst}");
                }
            }
        }

        /// A fresh or idle limit always allows `burst` calls at once.
        #[test]
        fn idle_limits_allow_a_full_burst(rate in 1u32..1000, burst in 1u32..50, idle in 0u64..10) {
            let g = Gcra::new(f64::from(rate), burst);
            let cell = Cell::new();
            let now = SEC * (idle + 1);
            for _ in 0..burst {
                prop_assert!(cell.check(&g, now).is_ok());
            }
            prop_assert!(cell.check(&g, now).is_err());
        }
    }

    #[test]
    fn keyed_cells_are_independent_and_bounded() {
        let g = Gcra::new(1.0, 1);
        let cells = KeyedCells::new(32);
        cells.check(&g, "a", SEC).expect("a");
        cells.check(&g, "b", SEC).expect("b is separate");
        assert!(cells.check(&g, "a", SEC).is_err());
        for i in 0..1000 {
            let _ = cells.check(&g, &format!("k{i}"), SEC + i);
        }
        assert!(
            cells.len() <= 32 + SHARDS,
            "memory stays bounded: {}",
            cells.len()
        );
    }
}
