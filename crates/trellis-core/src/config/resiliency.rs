//! Settings of the resilience policies (`[resiliency.policies.*]`), shared by the
//! config loader and `trellis-resilience`, which implements them.
//!
//! Each struct deserializes with defaults for every field and has a `validate` that
//! returns the first broken rule as `(field, message)`; the loader turns that into a
//! key path.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The statuses retried by default: 408, 429, 500, 502, 503, 504.
pub fn default_retry_statuses() -> Vec<u16> {
    vec![408, 429, 500, 502, 503, 504]
}

/// Whether `status` may be retried: 408, 429 and 5xx. Other 4xx mean the request
/// itself is wrong; sending it again won't help (dapr#4568).
pub fn is_retryable_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..=599).contains(&status)
}

/// An HTTP header name: 1+ token characters (RFC 9110).
pub(crate) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

// === circuit breaker ===

/// How a breaker's sliding window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// The last `window_size` calls.
    Count,
    /// The calls of the last `window_size` seconds.
    Time,
}

/// How a breaker behaves, set in config or switched at runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Closed / open / half-open as the window dictates.
    Auto,
    /// Always lets calls through and records nothing.
    Disabled,
    /// Always refuses calls.
    ForcedOpen,
}

/// A circuit breaker's settings. Defaults follow resilience4j's, scaled for a sidecar.
///
/// ```
/// use std::time::Duration;
/// use trellis_core::config::resiliency::BreakerConfig;
///
/// let config = BreakerConfig {
///     minimum_calls: 5,
///     failure_rate: 50.0,
///     open_wait: Duration::from_secs(10),
///     ..BreakerConfig::default()
/// };
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Count-based or time-based window.
    pub window: WindowKind,
    /// Calls (count window) or seconds (time window) in the window.
    pub window_size: u32,
    /// Calls the window needs before rates can trip the breaker.
    pub minimum_calls: u32,
    /// Trip when this percent of calls in the window failed (0 < x ≤ 100).
    pub failure_rate: f64,
    /// Trip when this percent of calls in the window were slow (0 < x ≤ 100).
    pub slow_call_rate: f64,
    /// A call taking longer than this is slow.
    #[serde(deserialize_with = "super::units::duration")]
    pub slow_call_duration: Duration,
    /// Also trip after this many failures in a row, whatever the window says.
    pub consecutive_failures: Option<u32>,
    /// How long the breaker stays open before letting trial calls through.
    #[serde(deserialize_with = "super::units::duration")]
    pub open_wait: Duration,
    /// Each trip in a row multiplies the open wait by this (1 = constant).
    pub open_wait_multiplier: f64,
    /// Cap of the growing open wait.
    #[serde(deserialize_with = "super::units::duration")]
    pub open_wait_max: Duration,
    /// Trial calls let through while half-open; their results decide.
    pub half_open_calls: u32,
    /// Auto, disabled or forced open.
    pub mode: Mode,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: WindowKind::Count,
            window_size: 100,
            minimum_calls: 20,
            failure_rate: 50.0,
            slow_call_rate: 100.0,
            slow_call_duration: Duration::from_secs(60),
            consecutive_failures: None,
            open_wait: Duration::from_secs(30),
            open_wait_multiplier: 1.0,
            open_wait_max: Duration::from_secs(300),
            half_open_calls: 5,
            mode: Mode::Auto,
        }
    }
}

impl BreakerConfig {
    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let rate = |name, v: f64| {
            if v > 0.0 && v <= 100.0 {
                Ok(())
            } else {
                Err((
                    name,
                    format!("must be a percentage above 0 and at most 100, got {v}"),
                ))
            }
        };
        rate("failure_rate", self.failure_rate)?;
        rate("slow_call_rate", self.slow_call_rate)?;
        if self.window_size == 0 || self.window_size > 100_000 {
            return Err((
                "window_size",
                format!("must be 1 to 100000, got {}", self.window_size),
            ));
        }
        if self.window == WindowKind::Time && self.window_size > 3600 {
            return Err((
                "window_size",
                format!(
                    "a time window is at most 3600 seconds, got {}",
                    self.window_size
                ),
            ));
        }
        if self.minimum_calls == 0 {
            return Err(("minimum_calls", "must be at least 1".into()));
        }
        if self.half_open_calls == 0 {
            return Err(("half_open_calls", "must be at least 1".into()));
        }
        if self.consecutive_failures == Some(0) {
            return Err((
                "consecutive_failures",
                "must be at least 1 (omit it to turn it off)".into(),
            ));
        }
        if !(1.0..=100.0).contains(&self.open_wait_multiplier) {
            return Err((
                "open_wait_multiplier",
                format!("must be 1 to 100, got {}", self.open_wait_multiplier),
            ));
        }
        if self.open_wait.is_zero() {
            return Err(("open_wait", "must be above 0".into()));
        }
        if self.open_wait_max < self.open_wait {
            return Err(("open_wait_max", "must be at least open_wait".into()));
        }
        Ok(())
    }
}

// === bulkhead ===

/// A bulkhead's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulkheadConfig {
    /// Calls in flight at most.
    pub max_concurrent: u32,
    /// Callers waiting for a slot at most; more are refused at once.
    pub max_queue: u32,
    /// How long a caller may wait for a slot.
    #[serde(deserialize_with = "super::units::duration")]
    pub max_wait: Duration,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 100,
            max_queue: 100,
            max_wait: Duration::from_secs(1),
        }
    }
}

impl BulkheadConfig {
    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_concurrent == 0 || self.max_concurrent > 1_000_000 {
            return Err((
                "max_concurrent",
                format!("must be 1 to 1000000, got {}", self.max_concurrent),
            ));
        }
        if self.max_queue > 1_000_000 {
            return Err((
                "max_queue",
                format!("must be at most 1000000, got {}", self.max_queue),
            ));
        }
        Ok(())
    }
}

// === rate limit ===

/// Where a limit is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// In this process.
    Local,
    /// In Redis, shared by every sidecar.
    Redis,
}

/// A rate limit's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained calls per second.
    pub rate: f64,
    /// Calls allowed at once; defaults to the rate (at least 1).
    pub burst: Option<u32>,
    /// Limit per key: `header:<name>` (HTTP). Without it, one limit for all calls.
    pub key: Option<String>,
    /// `local` or `redis`.
    pub backend: Backend,
    /// For `backend = "redis"`.
    pub redis_url: Option<String>,
    /// How long to wait for Redis before limiting locally.
    #[serde(deserialize_with = "super::units::duration")]
    pub redis_timeout: Duration,
    /// Keys tracked locally at most (memory bound).
    pub max_keys: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            rate: 100.0,
            burst: None,
            key: None,
            backend: Backend::Local,
            redis_url: None,
            redis_timeout: Duration::from_millis(50),
            max_keys: 100_000,
        }
    }
}

impl RateLimitConfig {
    /// The burst in effect.
    pub fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| (self.rate.ceil() as u32).max(1))
    }

    /// The header a keyed limit reads, if any.
    pub fn key_header(&self) -> Option<&str> {
        self.key.as_deref().and_then(|k| k.strip_prefix("header:"))
    }

    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1e9) {
            return Err((
                "rate",
                format!(
                    "must be above 0 and at most 1e9 per second, got {}",
                    self.rate
                ),
            ));
        }
        if self.burst == Some(0) {
            return Err(("burst", "must be at least 1".into()));
        }
        if let Some(key) = &self.key {
            let valid = self.key_header().is_some_and(is_header_name);
            if !valid {
                return Err(("key", format!("expected \"header:<name>\", got {key:?}")));
            }
        }
        match (&self.backend, &self.redis_url) {
            (Backend::Redis, None) => {
                return Err(("redis_url", "required for backend = \"redis\"".into()));
            }
            (Backend::Redis, Some(url)) if !url.starts_with("redis://") => {
                return Err(("redis_url", format!("expected a redis:// URL, got {url:?}")));
            }
            _ => {}
        }
        if self.max_keys == 0 {
            return Err(("max_keys", "must be at least 1".into()));
        }
        Ok(())
    }
}

// === retry ===

/// How delays grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackoffKind {
    /// Always `base`.
    Constant,
    /// `base × multiplier^(attempt - 1)`, capped at `max`.
    Exponential,
}

/// How delays are randomized, so that callers that failed together don't retry
/// together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// The computed delay exactly.
    None,
    /// Uniform in `[0, computed]` ("full jitter").
    Full,
    /// Uniform in `[base, min(max, previous × 3)]` ("decorrelated jitter").
    Decorrelated,
}

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// Constant or exponential.
    pub kind: BackoffKind,
    /// The first delay.
    #[serde(deserialize_with = "super::units::duration")]
    pub base: Duration,
    /// The largest delay.
    #[serde(deserialize_with = "super::units::duration")]
    pub max: Duration,
    /// Growth per attempt (exponential).
    pub multiplier: f64,
    /// Randomization.
    pub jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            kind: BackoffKind::Exponential,
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: Jitter::Full,
        }
    }
}

impl Backoff {
    /// The delay before retry number `retry` (1 for the first retry), given the
    /// previous delay (for decorrelated jitter) and a random source.
    pub fn delay(&self, retry: u32, previous: Duration, rng: &mut fastrand::Rng) -> Duration {
        let computed = match self.kind {
            BackoffKind::Constant => self.base,
            BackoffKind::Exponential => {
                let exponent = i32::try_from(retry.saturating_sub(1)).unwrap_or(i32::MAX);
                let factor = self.multiplier.powi(exponent);
                if factor.is_finite() && factor < 1e9 {
                    self.base.mul_f64(factor).min(self.max)
                } else {
                    self.max
                }
            }
        }
        .min(self.max);
        match self.jitter {
            Jitter::None => computed,
            Jitter::Full => uniform(Duration::ZERO, computed, rng),
            Jitter::Decorrelated => {
                let upper = previous.max(self.base).saturating_mul(3).min(self.max);
                uniform(self.base.min(upper), upper, rng)
            }
        }
    }

    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max < self.base {
            return Err(("max", "must be at least base".into()));
        }
        if !(1.0..=100.0).contains(&self.multiplier) {
            return Err((
                "multiplier",
                format!("must be 1 to 100, got {}", self.multiplier),
            ));
        }
        Ok(())
    }
}

fn uniform(low: Duration, high: Duration, rng: &mut fastrand::Rng) -> Duration {
    let low_ns = u64::try_from(low.as_nanos()).unwrap_or(u64::MAX);
    let high_ns = u64::try_from(high.as_nanos())
        .unwrap_or(u64::MAX)
        .max(low_ns);
    Duration::from_nanos(rng.u64(low_ns..=high_ns))
}

/// Budget settings.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Retries may add this percent of the original call rate.
    pub percent: f64,
    /// Retries per second allowed whatever the traffic, so a quiet service can retry.
    pub min_per_sec: u32,
    /// The window rates are measured over.
    #[serde(deserialize_with = "super::units::duration")]
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            percent: 20.0,
            min_per_sec: 10,
            window: Duration::from_secs(10),
        }
    }
}

impl BudgetConfig {
    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=1000.0).contains(&self.percent) {
            return Err((
                "percent",
                format!("must be 0 to 1000, got {}", self.percent),
            ));
        }
        if self.window < Duration::from_secs(1) || self.window > Duration::from_secs(600) {
            return Err(("window", "must be 1s to 10m".into()));
        }
        Ok(())
    }
}

/// Retry settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delays between attempts.
    pub backoff: Backoff,
    /// Statuses that are retried (408, 429 and 5xx only).
    pub statuses: Vec<u16>,
    /// Also retry requests that are not idempotent and carry no `Idempotency-Key`.
    pub retry_non_idempotent: bool,
    /// A `Retry-After` longer than this ends the retries instead.
    #[serde(deserialize_with = "super::units::duration")]
    pub max_retry_after: Duration,
    /// The retry budget; `None` turns it off (not recommended).
    pub budget: Option<BudgetConfig>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Backoff::default(),
            statuses: default_retry_statuses(),
            retry_non_idempotent: false,
            max_retry_after: Duration::from_secs(30),
            budget: Some(BudgetConfig::default()),
        }
    }
}

impl RetryConfig {
    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=10).contains(&self.max_attempts) {
            return Err((
                "max_attempts",
                format!("must be 1 to 10, got {}", self.max_attempts),
            ));
        }
        self.backoff
            .validate()
            .map_err(|(field, msg)| match field {
                "max" => ("backoff.max", msg),
                _ => ("backoff.multiplier", msg),
            })?;
        if let Some(bad) = self.statuses.iter().find(|s| !is_retryable_status(**s)) {
            return Err((
                "statuses",
                format!(
                    "{bad} can't be retried: only 408, 429 and 5xx are (other 4xx mean the request is wrong)"
                ),
            ));
        }
        if let Some(budget) = &self.budget {
            budget.validate().map_err(|(field, msg)| match field {
                "percent" => ("budget.percent", msg),
                _ => ("budget.window", msg),
            })?;
        }
        Ok(())
    }
}

// === hedge ===

/// Hedging settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HedgeConfig {
    /// Wait this long for an answer before sending a hedge.
    #[serde(deserialize_with = "super::units::duration")]
    pub delay: Duration,
    /// Extra copies of one call at most.
    pub max_hedges: u32,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(100),
            max_hedges: 1,
        }
    }
}

impl HedgeConfig {
    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=5).contains(&self.max_hedges) {
            return Err((
                "max_hedges",
                format!("must be 1 to 5, got {}", self.max_hedges),
            ));
        }
        if self.delay.is_zero() {
            return Err(("delay", "must be above 0".into()));
        }
        Ok(())
    }
}

// === fallback ===

/// A fixed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackConfig {
    /// Its status.
    pub status: u16,
    /// Its `Content-Type`.
    pub content_type: String,
    /// Its body.
    pub body: String,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        Self {
            status: 503,
            content_type: "application/json".into(),
            body: "{}".into(),
        }
    }
}

impl FallbackConfig {
    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(200..=599).contains(&self.status) {
            return Err((
                "status",
                format!(
                    "must be an HTTP status from 200 to 599, got {}",
                    self.status
                ),
            ));
        }
        if self.content_type.is_empty()
            || !self
                .content_type
                .bytes()
                .all(|b| b == b' ' || b.is_ascii_graphic())
        {
            return Err(("content_type", "must be a valid header value".into()));
        }
        Ok(())
    }
}

// === fault ===

/// What to inject.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Percent of calls delayed.
    pub delay_percent: f64,
    /// How long.
    #[serde(
        deserialize_with = "super::units::duration",
        serialize_with = "serialize_duration"
    )]
    pub delay: Duration,
    /// Percent of calls aborted.
    pub abort_percent: f64,
    /// The status an aborted call "returns".
    pub abort_status: u16,
}

fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            delay_percent: 0.0,
            delay: Duration::from_secs(1),
            abort_percent: 0.0,
            abort_status: 503,
        }
    }
}

impl FaultConfig {
    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, value) in [
            ("delay_percent", self.delay_percent),
            ("abort_percent", self.abort_percent),
        ] {
            if !(0.0..=100.0).contains(&value) {
                return Err((field, format!("must be 0 to 100, got {value}")));
            }
        }
        if !(100..=599).contains(&self.abort_status) {
            return Err((
                "abort_status",
                format!("must be an HTTP status, got {}", self.abort_status),
            ));
        }
        if self.delay > Duration::from_secs(600) {
            return Err(("delay", "must be at most 10m".into()));
        }
        Ok(())
    }

    /// Whether nothing is injected.
    pub fn is_off(&self) -> bool {
        self.delay_percent <= 0.0 && self.abort_percent <= 0.0
    }
}

// === targets ===

/// `[resiliency]`: named policies and the targets they guard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResiliencyConfig {
    /// `[resiliency.policies.<kind>.<name>]`.
    pub policies: Policies,
    /// `[resiliency.targets.apps.<app>]` and `[resiliency.targets.components.<kind.name>]`.
    pub targets: Targets,
    /// `[resiliency.global]`: policies shared by every app target.
    pub global: GlobalPolicies,
}

/// Named policies, by kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    /// Per-attempt and overall deadlines.
    pub timeouts: BTreeMap<String, TimeoutConfig>,
    /// Retries.
    pub retries: BTreeMap<String, RetryConfig>,
    /// Circuit breakers.
    pub breakers: BTreeMap<String, BreakerConfig>,
    /// Bulkheads.
    pub bulkheads: BTreeMap<String, BulkheadConfig>,
    /// Rate limits.
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    /// Hedging.
    pub hedges: BTreeMap<String, HedgeConfig>,
    /// Fallback responses.
    pub fallbacks: BTreeMap<String, FallbackConfig>,
    /// Fault injection.
    pub faults: BTreeMap<String, FaultConfig>,
}

/// Deadlines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// Each attempt.
    #[serde(deserialize_with = "super::units::option_duration")]
    pub attempt: Option<Duration>,
    /// The whole call, retries and backoff included.
    #[serde(deserialize_with = "super::units::option_duration")]
    pub overall: Option<Duration>,
}

impl TimeoutConfig {
    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.attempt.is_some_and(|d| d.is_zero()) {
            return Err(("attempt", "must be above 0".into()));
        }
        if self.overall.is_some_and(|d| d.is_zero()) {
            return Err(("overall", "must be above 0".into()));
        }
        if let (Some(a), Some(o)) = (self.attempt, self.overall)
            && o < a
        {
            return Err(("overall", "must be at least attempt".into()));
        }
        Ok(())
    }
}

/// Policy names guarding one target (each refers to `[resiliency.policies.*]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyRefs {
    /// A `timeouts` policy.
    pub timeout: Option<String>,
    /// A `retries` policy.
    pub retry: Option<String>,
    /// A `breakers` policy; each target gets its own breaker instance.
    pub breaker: Option<String>,
    /// A `bulkheads` policy; each target gets its own bulkhead instance.
    pub bulkhead: Option<String>,
    /// A `rate_limits` policy; each target gets its own limiter.
    pub rate_limit: Option<String>,
    /// A `hedges` policy.
    pub hedge: Option<String>,
    /// A `fallbacks` policy.
    pub fallback: Option<String>,
    /// A `faults` policy; each target gets its own switchable injector.
    pub fault: Option<String>,
}

/// The policies of one app — the keys of [`PolicyRefs`] — and `routes`: overrides for
/// path prefixes of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppTarget {
    /// For every call to the app.
    pub policies: PolicyRefs,
    /// `[resiliency.targets.apps.<app>.routes."/prefix"]`: the longest matching
    /// prefix replaces the app's policies for calls under it.
    pub routes: BTreeMap<String, PolicyRefs>,
}

/// What policies guard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    /// By app id.
    pub apps: BTreeMap<String, AppTarget>,
    /// By component, as `<kind>.<name>`, e.g. `state.default`.
    pub components: BTreeMap<String, PolicyRefs>,
}

/// Policies every app target shares (one instance for all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GlobalPolicies {
    /// A `bulkheads` policy bounding all invocations together.
    pub bulkhead: Option<String>,
}

#[cfg(test)]
mod backoff_test {
    use proptest::prelude::*;

    use super::*;

    fn backoff(kind: BackoffKind, jitter: Jitter) -> Backoff {
        Backoff {
            kind,
            jitter,
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
        }
    }

    #[test]
    fn exponential_without_jitter_doubles_up_to_the_cap() {
        let b = backoff(BackoffKind::Exponential, Jitter::None);
        let mut rng = fastrand::Rng::with_seed(1);
        let delays: Vec<u64> = (1..=7)
            .map(|r| b.delay(r, Duration::ZERO, &mut rng).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 2000, 2000]);
        let c = backoff(BackoffKind::Constant, Jitter::None);
        assert_eq!(
            c.delay(9, Duration::ZERO, &mut rng),
            Duration::from_millis(100)
        );
    }

    proptest! {
        #[test]
        fn full_jitter_stays_under_the_computed_delay(retry in 1u32..64, seed: u64) {
            let b = backoff(BackoffKind::Exponential, Jitter::Full);
            let exact = backoff(BackoffKind::Exponential, Jitter::None);
            let mut rng = fastrand::Rng::with_seed(seed);
            let d = b.delay(retry, Duration::ZERO, &mut rng);
            prop_assert!(d <= exact.delay(retry, Duration::ZERO, &mut rng));
        }

        #[test]
        fn decorrelated_jitter_stays_between_base_and_three_times_previous(previous_ms in 0u64..10_000, seed: u64) {
            let b = backoff(BackoffKind::Exponential, Jitter::Decorrelated);
            let mut rng = fastrand::Rng::with_seed(seed);
            let previous = Duration::from_millis(previous_ms);
            let d = b.delay(2, previous, &mut rng);
            prop_assert!(d >= b.base.min(b.max));
            prop_assert!(d <= b.max);
            prop_assert!(d <= previous.max(b.base) * 3);
        }

        #[test]
        fn the_same_seed_gives_the_same_schedule(seed: u64) {
            let b = backoff(BackoffKind::Exponential, Jitter::Full);
            let schedule = |seed| {
                let mut rng = fastrand::Rng::with_seed(seed);
                (1..6).map(|r| b.delay(r, Duration::ZERO, &mut rng)).collect::<Vec<_>>()
            };
            prop_assert_eq!(schedule(seed), schedule(seed));
        }
    }
}
