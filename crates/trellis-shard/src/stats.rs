//! Balance figures: how evenly a strategy spreads keys.

use std::fmt;

use crate::Strategy;

/// How many of a set of keys each member got, against its fair share.
///
/// ```
/// use trellis_shard::{LoadStats, Maglev, Member};
///
/// let maglev = Maglev::new(Member::all(["a", "b", "c", "d"])).expect("valid");
/// let keys: Vec<u64> = (0..10_000u32).map(|i| trellis_shard::hash(&i.to_le_bytes())).collect();
/// let stats = LoadStats::measure(&maglev, &keys);
/// assert_eq!(stats.counts.iter().sum::<u64>(), 10_000);
/// assert!(stats.max_over_mean() < 1.1, "{stats}");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LoadStats {
    /// Keys per member, by member index.
    pub counts: Vec<u64>,
    /// Each member's fair share: keys × weight / Σ weights.
    pub expected: Vec<f64>,
}

impl LoadStats {
    /// Places `hashes` (key hashes, placed together with [`Strategy::assign`]) and counts.
    pub fn measure(strategy: &dyn Strategy, hashes: &[u64]) -> Self {
        let members = strategy.members();
        let mut counts = vec![0u64; members.len()];
        for owner in strategy.assign(hashes).into_iter().flatten() {
            counts[owner] += 1;
        }
        let total_weight: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
        let expected = members
            .iter()
            .map(|m| {
                if total_weight == 0 {
                    0.0
                } else {
                    hashes.len() as f64 * f64::from(m.weight) / total_weight as f64
                }
            })
            .collect();
        Self { counts, expected }
    }

    /// The most loaded member against its fair share (max/mean with equal weights);
    /// 1.0 is perfect.
    pub fn max_over_mean(&self) -> f64 {
        self.ratios().fold(0.0, f64::max)
    }

    /// The least loaded member against its fair share; 1.0 is perfect.
    pub fn min_over_mean(&self) -> f64 {
        let min = self.ratios().fold(f64::INFINITY, f64::min);
        if min.is_finite() { min } else { 0.0 }
    }

    /// count / fair share of members with a share.
    fn ratios(&self) -> impl Iterator<Item = f64> + '_ {
        self.counts
            .iter()
            .zip(&self.expected)
            .filter(|(_, e)| **e > 0.0)
            .map(|(c, e)| *c as f64 / e)
    }
}

impl fmt::Display for LoadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max/mean {:.3}, min/mean {:.3}",
            self.max_over_mean(),
            self.min_over_mean()
        )
    }
}
