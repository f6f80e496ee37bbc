//! Failure detectors for the service registry: heartbeats with a TTL, the
//! phi-accrual detector (Hayashibara et al.; the variant Akka and Cassandra use),
//! and flap damping, all driven by the caller's clock so tests control time.
//!
//! A detector turns heartbeats into a [`Health`]: `Alive`, then `Suspect` (something
//! is late, don't route new work there), then `Dead` (deregister after a while).
//! [`FlapDamping`] holds out an instance that keeps flipping between up and down
//! for a growing time, as route-flap damping does in BGP (consul#2890).
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use tokio::time::Instant;
//! use trellis_coord::detector::{Health, PhiAccrual, PhiSettings};
//!
//! let start = Instant::now();
//! let mut detector = PhiAccrual::new(PhiSettings::default());
//! for i in 0..20 {
//!     detector.heartbeat(start + Duration::from_secs(i));
//! }
//! // One second after the last beat: as expected.
//! assert_eq!(detector.health(start + Duration::from_secs(20)), Health::Alive);
//! // A minute of silence after beats every second: not alive any more.
//! assert_ne!(detector.health(start + Duration::from_secs(80)), Health::Alive);
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What a detector concludes about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Heartbeats arrive as expected.
    Alive,
    /// Heartbeats are late: keep it, but send it no new work.
    Suspect,
    /// Considered failed.
    Dead,
}

/// Push heartbeats with a TTL: alive while the last heartbeat is younger than
/// `ttl`, suspect until `ttl + grace`, dead after.
#[derive(Debug, Clone)]
pub struct TtlDetector {
    ttl: Duration,
    grace: Duration,
    last: Option<Instant>,
}

impl TtlDetector {
    /// A detector for heartbeats expected at least every `ttl`; `grace` is how long
    /// an instance stays suspect before it is dead.
    pub fn new(ttl: Duration, grace: Duration) -> Self {
        Self {
            ttl,
            grace,
            last: None,
        }
    }

    /// Records a heartbeat at `now`.
    pub fn heartbeat(&mut self, now: Instant) {
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
    }

    /// The health at `now` (no heartbeat yet counts as one at registration: call
    /// [`heartbeat`](Self::heartbeat) when registering).
    pub fn health(&self, now: Instant) -> Health {
        let Some(last) = self.last else {
            return Health::Dead;
        };
        let silent = now.saturating_duration_since(last);
        if silent < self.ttl {
            Health::Alive
        } else if silent < self.ttl + self.grace {
            Health::Suspect
        } else {
            Health::Dead
        }
    }

    /// When the health next gets worse without a heartbeat.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        let last = self.last?;
        [last + self.ttl, last + self.ttl + self.grace]
            .into_iter()
            .find(|at| *at > now)
    }
}

/// Settings of the [`PhiAccrual`] detector (Akka's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhiSettings {
    /// Phi at which an instance becomes suspect (phi 1 ≈ a 10% chance the beat is
    /// merely late, phi 8 ≈ 0.000001%).
    pub suspect_threshold: f64,
    /// Phi at which it is dead.
    pub dead_threshold: f64,
    /// Inter-arrival samples kept.
    pub max_samples: usize,
    /// Floor of the standard deviation, so a very regular sender is not declared
    /// dead for the smallest delay.
    #[serde(with = "millis")]
    pub min_std_dev: Duration,
    /// Pauses this long are tolerated on top of the observed distribution (GC,
    /// network blips).
    #[serde(with = "millis")]
    pub acceptable_pause: Duration,
    /// The interval assumed before enough heartbeats arrived.
    #[serde(with = "millis")]
    pub first_interval: Duration,
}

impl Default for PhiSettings {
    fn default() -> Self {
        Self {
            suspect_threshold: 5.0,
            dead_threshold: 10.0,
            max_samples: 200,
            min_std_dev: Duration::from_millis(100),
            acceptable_pause: Duration::from_secs(3),
            first_interval: Duration::from_secs(1),
        }
    }
}

/// Durations as milliseconds in serde, without another dependency.
pub(crate) mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// The phi-accrual failure detector: instead of a fixed timeout it learns the
/// distribution of heartbeat intervals and reports how unlikely the current silence
/// is (`phi = -log10(P(a heartbeat comes later than now))`), so one threshold works
/// for senders with different rhythms and adapts as the network changes.
#[derive(Debug, Clone)]
pub struct PhiAccrual {
    settings: PhiSettings,
    intervals: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last: Option<Instant>,
}

impl PhiAccrual {
    /// A detector with no heartbeats yet.
    pub fn new(settings: PhiSettings) -> Self {
        Self {
            settings,
            intervals: VecDeque::new(),
            sum: 0.0,
            sum_sq: 0.0,
            last: None,
        }
    }

    /// Records a heartbeat at `now`.
    pub fn heartbeat(&mut self, now: Instant) {
        match self.last {
            None => {
                // Seed the window with the expected interval (mean ± a quarter), as
                // Akka does, so the first silences are judged sensibly.
                let first = self.settings.first_interval.as_secs_f64() * 1000.0;
                self.push(first - first / 4.0);
                self.push(first + first / 4.0);
            }
            Some(last) if now > last => {
                self.push(now.duration_since(last).as_secs_f64() * 1000.0);
            }
            Some(_) => return,
        }
        self.last = Some(now);
    }

    fn push(&mut self, interval_ms: f64) {
        if self.intervals.len() >= self.settings.max_samples.max(2)
            && let Some(old) = self.intervals.pop_front()
        {
            self.sum -= old;
            self.sum_sq -= old * old;
        }
        self.intervals.push_back(interval_ms);
        self.sum += interval_ms;
        self.sum_sq += interval_ms * interval_ms;
    }

    /// How suspicious the silence since the last heartbeat is at `now`: 0 right
    /// after a heartbeat, growing without bound. `None` before the first heartbeat.
    pub fn phi(&self, now: Instant) -> Option<f64> {
        let last = self.last?;
        let n = self.intervals.len() as f64;
        let mean = self.sum / n + self.settings.acceptable_pause.as_secs_f64() * 1000.0;
        let variance = (self.sum_sq / n - (self.sum / n).powi(2)).max(0.0);
        let min_std = self.settings.min_std_dev.as_secs_f64() * 1000.0;
        let std_dev = variance.sqrt().max(min_std).max(f64::MIN_POSITIVE);
        let elapsed = now.saturating_duration_since(last).as_secs_f64() * 1000.0;
        // A logistic approximation of the normal CDF (Akka's), numerically stable
        // on both sides of the mean.
        let y = (elapsed - mean) / std_dev;
        let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
        let phi = if elapsed > mean {
            -(e / (1.0 + e)).log10()
        } else {
            -(1.0 - 1.0 / (1.0 + e)).log10()
        };
        Some(if phi.is_finite() {
            phi.max(0.0)
        } else {
            f64::MAX
        })
    }

    /// The health at `now`; dead before the first heartbeat.
    pub fn health(&self, now: Instant) -> Health {
        match self.phi(now) {
            None => Health::Dead,
            Some(phi) if phi >= self.settings.dead_threshold => Health::Dead,
            Some(phi) if phi >= self.settings.suspect_threshold => Health::Suspect,
            Some(_) => Health::Alive,
        }
    }
}

/// Settings of [`FlapDamping`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DampingSettings {
    /// Penalty added by each flip from up to down.
    pub penalty: f64,
    /// Held out while the penalty is above this...
    pub suppress: f64,
    /// ...until it has decayed below this.
    pub reuse: f64,
    /// The penalty halves every this long.
    #[serde(with = "millis")]
    pub half_life: Duration,
    /// The penalty never exceeds this (so a held-out instance always comes back
    /// within a bounded time after it stabilizes).
    pub max_penalty: f64,
}

impl Default for DampingSettings {
    fn default() -> Self {
        Self {
            penalty: 1000.0,
            suppress: 2500.0,
            reuse: 750.0,
            half_life: Duration::from_secs(60),
            max_penalty: 8000.0,
        }
    }
}

/// Route-flap damping for one instance: every failure adds a penalty that decays
/// exponentially; an instance whose penalty crosses `suppress` is held out (even
/// while healthy) until the penalty decays below `reuse`. An instance that fails
/// once is back as soon as it is healthy; one that keeps flipping is held out for
/// longer and longer, up to the bound `max_penalty` sets.
#[derive(Debug, Clone)]
pub struct FlapDamping {
    settings: DampingSettings,
    penalty: f64,
    at: Option<Instant>,
    suppressed: bool,
}

impl FlapDamping {
    /// No penalty yet.
    pub fn new(settings: DampingSettings) -> Self {
        Self {
            settings,
            penalty: 0.0,
            at: None,
            suppressed: false,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let Some(at) = self.at else {
            return 0.0;
        };
        let half_life = self.settings.half_life.as_secs_f64().max(f64::MIN_POSITIVE);
        let elapsed = now.saturating_duration_since(at).as_secs_f64();
        self.penalty * 0.5f64.powf(elapsed / half_life)
    }

    /// Records a failure (a flip from up to down) at `now`.
    pub fn failed(&mut self, now: Instant) {
        self.penalty = (self.decayed(now) + self.settings.penalty).min(self.settings.max_penalty);
        self.at = Some(now);
        if self.penalty >= self.settings.suppress {
            self.suppressed = true;
        }
    }

    /// The current penalty.
    pub fn penalty(&self, now: Instant) -> f64 {
        self.decayed(now)
    }

    /// Whether the instance is held out at `now`.
    pub fn suppressed(&mut self, now: Instant) -> bool {
        if self.suppressed && self.decayed(now) < self.settings.reuse {
            self.suppressed = false;
        }
        self.suppressed
    }

    /// When a held-out instance comes back if it fails no more; `None` if it is
    /// not held out.
    pub fn released_at(&self, now: Instant) -> Option<Instant> {
        if !self.suppressed {
            return None;
        }
        let current = self.decayed(now);
        if current < self.settings.reuse {
            return Some(now);
        }
        let halvings = (current / self.settings.reuse).log2();
        Some(now + self.settings.half_life.mul_f64(halvings))
    }
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn ttl_goes_alive_suspect_dead() {
        let t0 = Instant::now();
        let mut d = TtlDetector::new(secs(10.0), secs(20.0));
        assert_eq!(d.health(t0), Health::Dead, "never seen");
        d.heartbeat(t0);
        assert_eq!(d.health(t0 + secs(9.9)), Health::Alive);
        assert_eq!(d.health(t0 + secs(10.0)), Health::Suspect);
        assert_eq!(d.next_change(t0 + secs(10.0)), Some(t0 + secs(30.0)));
        assert_eq!(d.health(t0 + secs(30.0)), Health::Dead);
        d.heartbeat(t0 + secs(31.0));
        assert_eq!(d.health(t0 + secs(31.0)), Health::Alive);
        // A late (reordered) heartbeat never moves time back.
        d.heartbeat(t0 + secs(1.0));
        assert_eq!(d.health(t0 + secs(40.0)), Health::Alive);
    }

    #[test]
    fn phi_learns_the_rhythm() {
        let t0 = Instant::now();
        let settings = PhiSettings {
            acceptable_pause: Duration::ZERO,
            ..PhiSettings::default()
        };
        let mut fast = PhiAccrual::new(settings.clone());
        let mut slow = PhiAccrual::new(settings);
        for i in 0..100u32 {
            fast.heartbeat(t0 + Duration::from_millis(100) * i);
            slow.heartbeat(t0 + Duration::from_secs(10) * i);
        }
        let fast_last = t0 + Duration::from_millis(9900);
        let slow_last = t0 + Duration::from_secs(990);
        // Two seconds of silence: alarming for a 100 ms sender, nothing for a 10 s one.
        assert_eq!(fast.health(fast_last + secs(2.0)), Health::Dead);
        assert_eq!(slow.health(slow_last + secs(2.0)), Health::Alive);
        assert_eq!(slow.health(slow_last + secs(60.0)), Health::Dead);
        assert_eq!(
            PhiAccrual::new(PhiSettings::default()).health(t0),
            Health::Dead
        );
    }

    #[test]
    fn damping_holds_out_a_flapping_instance_for_longer_each_time() {
        let t0 = Instant::now();
        let mut d = FlapDamping::new(DampingSettings::default());
        d.failed(t0);
        assert!(!d.suppressed(t0), "one failure is not flapping");
        d.failed(t0 + secs(1.0));
        d.failed(t0 + secs(2.0));
        assert!(d.suppressed(t0 + secs(2.0)));
        let first = d.released_at(t0 + secs(2.0)).expect("held out");
        assert!(d.suppressed(first - secs(1.0)));
        assert!(!d.suppressed(first + secs(1.0)));
        // More flapping: held out longer, but never beyond the bound.
        let mut now = first + secs(2.0);
        for _ in 0..20 {
            d.failed(now);
            now += secs(1.0);
        }
        let second = d.released_at(now).expect("held out");
        assert!(second.duration_since(now) > first.duration_since(t0 + secs(2.0)));
        let bound = DampingSettings::default()
            .half_life
            .mul_f64((8000.0f64 / 750.0).log2());
        assert!(second.duration_since(now) <= bound + secs(1.0));
    }

    proptest! {
        /// Phi never decreases as silence grows, and is 0-ish right after a beat.
        #[test]
        fn phi_grows_with_silence(intervals in proptest::collection::vec(10u64..5000, 2..50), probes in proptest::collection::vec(0u64..600_000, 1..20)) {
            let t0 = Instant::now();
            let mut d = PhiAccrual::new(PhiSettings::default());
            let mut at = t0;
            d.heartbeat(at);
            for ms in intervals {
                at += Duration::from_millis(ms);
                d.heartbeat(at);
            }
            let mut probes = probes;
            probes.sort_unstable();
            let mut previous = 0.0f64;
            for ms in probes {
                let phi = d.phi(at + Duration::from_millis(ms)).expect("beats seen");
                prop_assert!(phi >= previous - 1e-9, "phi went down: {previous} -> {phi}");
                previous = phi;
            }
        }

        /// The penalty decays monotonically and suppression always ends.
        #[test]
        fn damping_always_releases(failures in proptest::collection::vec(0u64..120_000, 1..40)) {
            let t0 = Instant::now();
            let mut d = FlapDamping::new(DampingSettings::default());
            let mut at = t0;
            for ms in failures {
                at += Duration::from_millis(ms);
                d.failed(at);
            }
            if let Some(release) = d.released_at(at) {
                prop_assert!(!d.suppressed(release + Duration::from_secs(1)));
            }
            prop_assert!(d.penalty(at + Duration::from_secs(3600)) < d.penalty(at) + 1e-9);
        }
    }
}
