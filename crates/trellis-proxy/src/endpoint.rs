//! One instance of an app and what we know about it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// How long a latency sample takes to decay to 1/e in the peak-EWMA estimate.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The assumed latency of an instance with no samples yet: low, so new instances get
/// traffic and a real estimate quickly.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// Peak-EWMA latency: jumps up to a slow sample at once, decays back down slowly.
/// Reacts to an instance turning slow in one request, forgets it over seconds.
#[derive(Debug)]
struct PeakEwma {
    nanos: f64,
    stamp: Instant,
}

impl PeakEwma {
    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.nanos {
            self.nanos = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
            let w = (-elapsed / EWMA_DECAY.as_secs_f64()).exp();
            self.nanos = self.nanos * w + rtt * (1.0 - w);
        }
        self.stamp = now;
    }
}

/// Latency totals of the current outlier-detection interval.
#[derive(Debug, Default)]
struct Interval {
    requests: u32,
    total: Duration,
}

/// One instance.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// `http://host:port`.
    pub(crate) url: String,
    pub(crate) authority: http::uri::Authority,
    in_flight: AtomicU64,
    ewma: Mutex<PeakEwma>,
    /// Set by active health checks; true until a check says otherwise.
    healthy: AtomicBool,
    /// While ejected: until when.
    ejected_until: Mutex<Option<Instant>>,
    /// Ejections so far (each is longer).
    ejections: AtomicU32,
    /// Errors in a row.
    consecutive_errors: AtomicU32,
    interval: Mutex<Interval>,
    requests: AtomicU64,
    failures: AtomicU64,
    /// `trellis_upstream_requests_total{app, instance, outcome}`, registered once.
    outcomes: [metrics::Counter; 2],
}

/// What an endpoint looks like now.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    /// Its URL.
    pub url: String,
    /// Whether the active checks consider it healthy.
    pub healthy: bool,
    /// Milliseconds until it is back in rotation, if ejected.
    pub ejected_for_ms: Option<u64>,
    /// Ejections so far.
    pub ejections: u32,
    /// Requests in flight.
    pub in_flight: u64,
    /// Peak-EWMA latency in milliseconds.
    pub latency_ms: f64,
    /// Requests sent since start.
    pub requests: u64,
    /// Of which failed (5xx or transport error).
    pub failures: u64,
}

/// Counts a request in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Locks a std mutex, ignoring poisoning (the data are counters, always consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Endpoint {
    pub(crate) fn new(app: &str, url: String) -> Result<Self, String> {
        let authority = url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .and_then(|a| a.parse::<http::uri::Authority>().ok())
            .ok_or_else(|| format!("invalid instance URL {url:?}"))?;
        Ok(Self {
            authority,
            in_flight: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma {
                nanos: DEFAULT_RTT.as_nanos() as f64,
                stamp: Instant::now(),
            }),
            healthy: AtomicBool::new(true),
            ejected_until: Mutex::new(None),
            ejections: AtomicU32::new(0),
            consecutive_errors: AtomicU32::new(0),
            interval: Mutex::new(Interval::default()),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            outcomes: ["success", "failure"].map(|outcome| {
                metrics::counter!(
                    "trellis_upstream_requests_total",
                    "app" => app.to_owned(), "instance" => url.clone(), "outcome" => outcome
                )
            }),
            url,
        })
    }

    /// Whether requests may go here now.
    pub(crate) fn is_available(&self, now: Instant) -> bool {
        self.healthy.load(Ordering::Acquire) && !self.is_ejected(now)
    }

    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        let mut until = lock(&self.ejected_until);
        match *until {
            Some(t) if now < t => true,
            Some(_) => {
                // Back in rotation with a clean slate of errors.
                *until = None;
                self.consecutive_errors.store(0, Ordering::Release);
                false
            }
            None => false,
        }
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(&self.in_flight)
    }

    /// The balancer's cost: expected latency × queue length.
    pub(crate) fn load(&self) -> f64 {
        lock(&self.ewma).nanos * (self.in_flight() + 1) as f64
    }

    /// Records a finished request. Returns the errors in a row so far.
    pub(crate) fn record(&self, latency: Duration, failed: bool, now: Instant) -> u32 {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.outcomes[usize::from(failed)].increment(1);
        lock(&self.ewma).observe(latency, now);
        {
            let mut interval = lock(&self.interval);
            interval.requests += 1;
            interval.total += latency;
        }
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.consecutive_errors.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.consecutive_errors.store(0, Ordering::Release);
            0
        }
    }

    /// Takes the latency totals of the interval that just ended: (requests, mean).
    pub(crate) fn take_interval(&self) -> (u32, Duration) {
        let taken = std::mem::take(&mut *lock(&self.interval));
        let mean = if taken.requests == 0 {
            Duration::ZERO
        } else {
            taken.total / taken.requests
        };
        (taken.requests, mean)
    }

    /// Ejects until `now + base × (ejections + 1)`, capped at `max`. Returns the
    /// duration.
    pub(crate) fn eject(&self, now: Instant, base: Duration, max: Duration) -> Duration {
        let n = self.ejections.fetch_add(1, Ordering::AcqRel) + 1;
        let duration = base.saturating_mul(n).min(max);
        *lock(&self.ejected_until) = Some(now + duration);
        duration
    }

    pub(crate) fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::AcqRel) != healthy
    }

    pub(crate) fn snapshot(&self, now: Instant) -> EndpointSnapshot {
        let ejected_for = match *lock(&self.ejected_until) {
            Some(t) if t > now => Some(u64::try_from((t - now).as_millis()).unwrap_or(u64::MAX)),
            _ => None,
        };
        EndpointSnapshot {
            url: self.url.clone(),
            healthy: self.healthy.load(Ordering::Acquire),
            ejected_for_ms: ejected_for,
            ejections: self.ejections.load(Ordering::Acquire),
            in_flight: self.in_flight(),
            latency_ms: lock(&self.ewma).nanos / 1e6,
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

impl AsRef<str> for Endpoint {
    fn as_ref(&self) -> &str {
        &self.url
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_and_decays_down() {
        let e = Endpoint::new("t", "http://a:1".into()).expect("url");
        let now = Instant::now();
        e.record(Duration::from_millis(100), false, now);
        assert_eq!(
            e.snapshot(now).latency_ms,
            100.0,
            "a slow sample takes effect at once"
        );
        e.record(
            Duration::from_millis(1),
            false,
            now + Duration::from_secs(10),
        );
        let after = e.snapshot(now).latency_ms;
        assert!(
            (35.0..40.0).contains(&after),
            "decays by 1/e over 10s: {after}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_grow_and_expire() {
        let e = Endpoint::new("t", "http://a:1".into()).expect("url");
        let now = Instant::now();
        assert_eq!(
            e.eject(now, Duration::from_secs(30), Duration::from_secs(75)),
            Duration::from_secs(30)
        );
        assert!(!e.is_available(now + Duration::from_secs(29)));
        assert!(e.is_available(now + Duration::from_secs(30)));
        assert_eq!(
            e.eject(now, Duration::from_secs(30), Duration::from_secs(75)),
            Duration::from_secs(60)
        );
        assert_eq!(
            e.eject(now, Duration::from_secs(30), Duration::from_secs(75)),
            Duration::from_secs(75)
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            Endpoint::new("t", "http://10.0.0.1:8080/".into())
                .expect("url")
                .authority,
            "10.0.0.1:8080"
        );
        assert!(Endpoint::new("t", "https://x".into()).is_err());
    }
}
