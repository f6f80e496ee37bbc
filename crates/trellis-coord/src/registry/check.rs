//! How an instance's health is judged: the check it registers with, and the
//! per-instance detector state that check drives.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::detector::{Health, PhiAccrual, PhiSettings, TtlDetector};

/// How the registry decides whether an instance is alive. Selected per
/// registration, so each service (or instance) uses the detector that suits it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Check {
    /// Push: the instance heartbeats at least every `ttl`. Late by up to `grace` it is
    /// suspect, later dead (Consul's TTL check, etcd's lease).
    Ttl {
        /// Longest silence that is still alive.
        ttl: Duration,
        /// How long it stays suspect before it is dead.
        grace: Duration,
    },
    /// Push, adaptive: phi accrual over the observed heartbeat intervals (Akka,
    /// Cassandra): suspect at one threshold, dead at another.
    Phi(PhiSettings),
    /// Pull: the registry probes `url` every `interval` (HAProxy `inter`/`rise`/`fall`,
    /// Consul HTTP checks). Suspect after one failure, dead after
    /// `unhealthy_threshold` failures in a row, alive again after `healthy_threshold`
    /// successes in a row (the first success of a new instance is enough).
    Http {
        /// What to `GET`; any 2xx is healthy.
        url: String,
        /// Between probes.
        interval: Duration,
        /// A probe that takes longer failed.
        timeout: Duration,
        /// Successes in a row to come back.
        healthy_threshold: u32,
        /// Failures in a row to be dead.
        unhealthy_threshold: u32,
    },
}

impl Check {
    /// A TTL check with a grace of one more `ttl`.
    pub fn ttl(ttl: Duration) -> Self {
        Self::Ttl { ttl, grace: ttl }
    }

    /// An HTTP check with HAProxy-like defaults: every 10 s, 2 s timeout, rise 2,
    /// fall 3.
    pub fn http(url: impl Into<String>) -> Self {
        Self::Http {
            url: url.into(),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    /// `"ttl"`, `"phi"` or `"http"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Ttl { .. } => "ttl",
            Self::Phi(_) => "phi",
            Self::Http { .. } => "http",
        }
    }

    /// Whether the instance sends heartbeats (TTL and phi) rather than being probed.
    pub fn is_push(&self) -> bool {
        !matches!(self, Self::Http { .. })
    }

    /// What is wrong with it, if anything.
    pub(crate) fn problem(&self) -> Option<String> {
        let short = |d: &Duration| *d < Duration::from_millis(10);
        let long = |d: &Duration| *d > Duration::from_secs(24 * 60 * 60);
        match self {
            Self::Ttl { ttl, grace } => {
                if short(ttl) || long(ttl) {
                    Some(format!("ttl {ttl:?} must be between 10ms and 24h"))
                } else if long(grace) {
                    Some(format!("grace {grace:?} must be at most 24h"))
                } else {
                    None
                }
            }
            Self::Phi(s) => {
                if !(s.suspect_threshold > 0.0 && s.suspect_threshold.is_finite()) {
                    Some("phi suspect_threshold must be a positive number".into())
                } else if !(s.dead_threshold >= s.suspect_threshold && s.dead_threshold.is_finite())
                {
                    Some("phi dead_threshold must be at least suspect_threshold".into())
                } else if s.max_samples < 2 || s.max_samples > 10_000 {
                    Some("phi max_samples must be between 2 and 10000".into())
                } else if short(&s.first_interval) || long(&s.first_interval) {
                    Some("phi first_interval must be between 10ms and 24h".into())
                } else {
                    None
                }
            }
            Self::Http {
                url,
                interval,
                timeout,
                healthy_threshold,
                unhealthy_threshold,
            } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    Some(format!(
                        "check url {url:?} must start with http:// or https://"
                    ))
                } else if short(interval) || long(interval) {
                    Some(format!(
                        "check interval {interval:?} must be between 10ms and 24h"
                    ))
                } else if short(timeout) || timeout > interval {
                    Some(format!(
                        "check timeout {timeout:?} must be at least 10ms and at most the interval"
                    ))
                } else if *healthy_threshold == 0 || *unhealthy_threshold == 0 {
                    Some("check thresholds must be at least 1".into())
                } else {
                    None
                }
            }
        }
    }
}

/// Runs HTTP checks for the registry (the sidecar supplies one built on its HTTP
/// client; tests supply fakes).
#[async_trait]
pub trait Prober: Debug + Send + Sync + 'static {
    /// `GET url`: `Ok` on a 2xx answer, `Err(reason)` otherwise. The registry applies
    /// the check's timeout around the call.
    async fn probe(&self, url: &str) -> Result<(), String>;
}

/// The detector state behind one registered instance.
#[derive(Debug)]
pub(crate) enum Detector {
    Ttl(TtlDetector),
    Phi(PhiAccrual),
    Http {
        ok_in_a_row: u32,
        failed_in_a_row: u32,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
        last_error: Option<String>,
    },
}

impl Detector {
    /// A fresh detector; push checks count the registration as a heartbeat.
    pub(crate) fn new(check: &Check, now: Instant) -> Self {
        match check {
            Check::Ttl { ttl, grace } => {
                let mut d = TtlDetector::new(*ttl, *grace);
                d.heartbeat(now);
                Self::Ttl(d)
            }
            Check::Phi(settings) => {
                let mut d = PhiAccrual::new(settings.clone());
                d.heartbeat(now);
                Self::Phi(d)
            }
            Check::Http {
                healthy_threshold,
                unhealthy_threshold,
                ..
            } => Self::Http {
                ok_in_a_row: 0,
                failed_in_a_row: 0,
                healthy_threshold: *healthy_threshold,
                unhealthy_threshold: *unhealthy_threshold,
                last_error: None,
            },
        }
    }

    /// Records a heartbeat; `false` for a pull check (which takes none).
    pub(crate) fn heartbeat(&mut self, now: Instant) -> bool {
        match self {
            Self::Ttl(d) => d.heartbeat(now),
            Self::Phi(d) => d.heartbeat(now),
            Self::Http { .. } => return false,
        }
        true
    }

    /// Records a probe result (pull checks only).
    pub(crate) fn probed(&mut self, result: Result<(), String>) {
        if let Self::Http {
            ok_in_a_row,
            failed_in_a_row,
            last_error,
            ..
        } = self
        {
            match result {
                Ok(()) => {
                    *ok_in_a_row = ok_in_a_row.saturating_add(1);
                    *failed_in_a_row = 0;
                    *last_error = None;
                }
                Err(e) => {
                    *failed_in_a_row = failed_in_a_row.saturating_add(1);
                    *ok_in_a_row = 0;
                    *last_error = Some(e);
                }
            }
        }
    }

    /// The health at `now`, given the health it had (pull checks move only on probes).
    pub(crate) fn health(&self, now: Instant, current: Health) -> Health {
        match self {
            Self::Ttl(d) => d.health(now),
            Self::Phi(d) => d.health(now),
            Self::Http {
                ok_in_a_row,
                failed_in_a_row,
                healthy_threshold,
                unhealthy_threshold,
                ..
            } => {
                if *failed_in_a_row >= *unhealthy_threshold {
                    Health::Dead
                } else if *failed_in_a_row > 0 {
                    Health::Suspect
                } else if *ok_in_a_row == 0 {
                    // Not probed yet.
                    current
                } else if current == Health::Dead && *ok_in_a_row < *healthy_threshold {
                    // A dead instance comes back after `healthy_threshold` successes;
                    // a suspect one (not yet dead, or never checked) after one.
                    Health::Dead
                } else {
                    Health::Alive
                }
            }
        }
    }

    /// When the health may next change on its own (push checks): the driver wakes
    /// then. Phi has no closed form, so it is polled every `phi_poll`.
    pub(crate) fn next_change(&self, now: Instant, phi_poll: Duration) -> Option<Instant> {
        match self {
            Self::Ttl(d) => d.next_change(now),
            Self::Phi(_) => Some(now + phi_poll),
            Self::Http { .. } => None,
        }
    }

    /// Phi now, for display (phi checks only).
    pub(crate) fn phi(&self, now: Instant) -> Option<f64> {
        match self {
            Self::Phi(d) => d.phi(now),
            _ => None,
        }
    }

    /// The last probe's error (pull checks only).
    pub(crate) fn last_error(&self) -> Option<&str> {
        match self {
            Self::Http { last_error, .. } => last_error.as_deref(),
            _ => None,
        }
    }
}
