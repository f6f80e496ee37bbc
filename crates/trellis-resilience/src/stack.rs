//! The policies of one HTTP target, composed in the fixed order of the crate docs,
//! and a registry of every policy instance for status APIs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::breaker::{Breaker, BreakerSnapshot, CircuitBreakerLayer};
use crate::bulkhead::{Bulkhead, BulkheadLayer, BulkheadSnapshot};
use crate::classify::HttpClassifier;
use crate::error::{BoxError, TimeoutKind};
use crate::fallback::{FallbackLayer, HttpFallback};
use crate::fault::{FaultConfig, FaultLayer, Faults};
use crate::hedge::HedgeLayer;
use crate::rate_limit::{HeaderKey, NoKey, RateLimitLayer, RateLimitSnapshot, RateLimiter};
use crate::retry::{BudgetSnapshot, HttpRetryPolicy, RetryBudget, RetryLayer, TryCloneBody};
use crate::timeout::TimeoutLayer;

/// An HTTP service with every layer boxed away.
pub type HttpService<B, RB> = BoxCloneSyncService<http::Request<B>, http::Response<RB>, BoxError>;

/// The policies guarding one HTTP target. Every field is optional; [`layer`](Self::layer)
/// applies those present, outermost first:
///
/// ```text
/// fallback → overall timeout → rate limit → retry → hedge → breaker
///          → bulkheads (target, then global) → attempt timeout → faults → call
/// ```
#[derive(Debug, Clone, Default)]
pub struct HttpPolicies {
    /// Replaces failures with a fixed response.
    pub fallback: Option<HttpFallback>,
    /// Bounds the whole call, retries included.
    pub overall_timeout: Option<Duration>,
    /// Refuses calls over the rate.
    pub rate_limit: Option<RateLimiter>,
    /// Retries failed attempts.
    pub retry: Option<RetryLayer<HttpRetryPolicy>>,
    /// Hedges slow idempotent calls.
    pub hedge: Option<HedgeLayer<HttpRetryPolicy>>,
    /// Stops calling a failing upstream.
    pub breaker: Option<Breaker>,
    /// Bound concurrency: the target's own first, then any shared (global) ones.
    pub bulkheads: Vec<Bulkhead>,
    /// Bounds each attempt.
    pub attempt_timeout: Option<Duration>,
    /// Chaos.
    pub faults: Option<Faults>,
}

impl HttpPolicies {
    /// Wraps `inner` in the policies present.
    pub fn layer<S, B, RB>(&self, inner: S) -> HttpService<B, RB>
    where
        S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: TryCloneBody + Send + 'static,
        RB: From<Bytes> + Send + 'static,
    {
        let mut svc: HttpService<B, RB> = BoxCloneSyncService::new(inner.map_err(Into::into));
        // Innermost first.
        if let Some(faults) = &self.faults {
            svc = BoxCloneSyncService::new(FaultLayer::new(faults.clone()).layer(svc));
        }
        if let Some(after) = self.attempt_timeout {
            svc =
                BoxCloneSyncService::new(TimeoutLayer::new(after, TimeoutKind::Attempt).layer(svc));
        }
        for bulkhead in self.bulkheads.iter().rev() {
            svc = BoxCloneSyncService::new(BulkheadLayer::new(bulkhead.clone()).layer(svc));
        }
        if let Some(breaker) = &self.breaker {
            svc = BoxCloneSyncService::new(
                CircuitBreakerLayer::new(breaker.clone(), HttpClassifier).layer(svc),
            );
        }
        if let Some(hedge) = &self.hedge {
            svc = BoxCloneSyncService::new(hedge.layer(svc));
        }
        if let Some(retry) = &self.retry {
            svc = BoxCloneSyncService::new(retry.layer(svc));
        }
        if let Some(limiter) = &self.rate_limit {
            svc = match limiter
                .config()
                .key_header()
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
            {
                Some(header) => BoxCloneSyncService::new(
                    RateLimitLayer::new(limiter.clone(), HeaderKey(header)).layer(svc),
                ),
                None => {
                    BoxCloneSyncService::new(RateLimitLayer::new(limiter.clone(), NoKey).layer(svc))
                }
            };
        }
        if let Some(after) = self.overall_timeout {
            svc =
                BoxCloneSyncService::new(TimeoutLayer::new(after, TimeoutKind::Overall).layer(svc));
        }
        if let Some(fallback) = &self.fallback {
            svc = BoxCloneSyncService::new(FallbackLayer::new(fallback.clone()).layer(svc));
        }
        svc
    }

    /// Whether any policy needs to send a request more than once (so its body must
    /// be buffered to be replayable).
    pub fn replays(&self) -> bool {
        self.retry.is_some() || self.hedge.is_some()
    }
}

/// Every policy instance of a process, for `GET /v1/resilience` and dashboards.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    breakers: Vec<Breaker>,
    bulkheads: Vec<Bulkhead>,
    limiters: Vec<RateLimiter>,
    budgets: Vec<(String, Arc<RetryBudget>)>,
    faults: Vec<Faults>,
}

/// What [`Registry::snapshot`] returns.
#[derive(Debug, Clone, Serialize)]
pub struct ResilienceSnapshot {
    /// Every breaker's state and window.
    pub breakers: Vec<BreakerSnapshot>,
    /// Every bulkhead's occupancy.
    pub bulkheads: Vec<BulkheadSnapshot>,
    /// Every rate limiter.
    pub rate_limits: Vec<RateLimitSnapshot>,
    /// Every retry budget, by target.
    pub retry_budgets: Vec<NamedBudget>,
    /// Every fault injector and its current settings.
    pub faults: Vec<NamedFaults>,
}

/// A retry budget with its target's name.
#[derive(Debug, Clone, Serialize)]
pub struct NamedBudget {
    /// The target.
    pub name: String,
    /// Its figures.
    #[serde(flatten)]
    pub budget: BudgetSnapshot,
}

/// A fault injector with its name.
#[derive(Debug, Clone, Serialize)]
pub struct NamedFaults {
    /// The name.
    pub name: String,
    /// Its current settings.
    #[serde(flatten)]
    pub config: FaultConfig,
}

impl Registry {
    /// Registers every instance in `policies` (shared instances once).
    pub fn register(&mut self, target: &str, policies: &HttpPolicies) {
        if let Some(b) = &policies.breaker {
            self.add_breaker(b);
        }
        for b in &policies.bulkheads {
            self.add_bulkhead(b);
        }
        if let Some(l) = &policies.rate_limit
            && !self.limiters.iter().any(|x| x.name() == l.name())
        {
            self.limiters.push(l.clone());
        }
        if let Some(budget) = policies.retry.as_ref().and_then(|r| r.budget()) {
            self.add_budget(target, budget);
        }
        if let Some(f) = &policies.faults {
            self.add_faults(f);
        }
    }

    /// Adds a breaker (once per name).
    pub fn add_breaker(&mut self, breaker: &Breaker) {
        if !self.breakers.iter().any(|x| x.name() == breaker.name()) {
            self.breakers.push(breaker.clone());
        }
    }

    /// Adds a bulkhead (once per name).
    pub fn add_bulkhead(&mut self, bulkhead: &Bulkhead) {
        if !self.bulkheads.iter().any(|x| x.name() == bulkhead.name()) {
            self.bulkheads.push(bulkhead.clone());
        }
    }

    /// Adds a fault injector (once per name).
    pub fn add_faults(&mut self, faults: &Faults) {
        if !self.faults.iter().any(|x| x.name() == faults.name()) {
            self.faults.push(faults.clone());
        }
    }

    /// Adds the retry budget of `target`.
    pub fn add_budget(&mut self, target: &str, budget: &Arc<RetryBudget>) {
        self.budgets.push((target.to_owned(), Arc::clone(budget)));
    }

    /// Every breaker.
    pub fn breakers(&self) -> &[Breaker] {
        &self.breakers
    }

    /// The breaker named `name`.
    pub fn breaker(&self, name: &str) -> Option<&Breaker> {
        self.breakers.iter().find(|b| b.name() == name)
    }

    /// The fault injector named `name`.
    pub fn faults(&self, name: &str) -> Option<&Faults> {
        self.faults.iter().find(|f| f.name() == name)
    }

    /// Everything's current figures.
    pub fn snapshot(&self) -> ResilienceSnapshot {
        ResilienceSnapshot {
            breakers: self.breakers.iter().map(Breaker::snapshot).collect(),
            bulkheads: self.bulkheads.iter().map(Bulkhead::snapshot).collect(),
            rate_limits: self.limiters.iter().map(RateLimiter::snapshot).collect(),
            retry_budgets: self
                .budgets
                .iter()
                .map(|(name, b)| NamedBudget {
                    name: name.clone(),
                    budget: b.snapshot(),
                })
                .collect(),
            faults: self
                .faults
                .iter()
                .map(|f| NamedFaults {
                    name: f.name().to_owned(),
                    config: f.get(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod test {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::breaker::{BreakerConfig, BreakerState};
    use crate::fallback::FallbackConfig;
    use crate::retry::{Backoff, BackoffKind, Jitter, RetryConfig};

    fn upstream(
        status: u16,
        hits: Arc<AtomicU32>,
    ) -> impl Service<
        http::Request<Bytes>,
        Response = http::Response<Bytes>,
        Error = BoxError,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static {
        tower::service_fn(move |_: http::Request<Bytes>| {
            hits.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, BoxError>(
                    http::Response::builder()
                        .status(status)
                        .body(Bytes::new())
                        .expect("response"),
                )
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_feed_the_breaker_and_the_fallback_answers_once_it_opens() {
        let breaker = Breaker::new(
            "b",
            BreakerConfig {
                window_size: 6,
                minimum_calls: 6,
                open_wait: Duration::from_secs(60),
                ..Default::default()
            },
        )
        .expect("valid");
        let retry = RetryLayer::with_budget(
            "t",
            RetryConfig {
                max_attempts: 3,
                backoff: Backoff {
                    kind: BackoffKind::Constant,
                    base: Duration::from_millis(10),
                    jitter: Jitter::None,
                    ..Default::default()
                },
                budget: None,
                ..Default::default()
            },
            HttpRetryPolicy::default(),
            None,
            1,
        )
        .expect("valid");
        let policies = HttpPolicies {
            fallback: Some(HttpFallback::new(
                "fb",
                FallbackConfig {
                    status: 200,
                    body: "cached".into(),
                    ..Default::default()
                },
            )),
            retry: Some(retry),
            breaker: Some(breaker.clone()),
            ..Default::default()
        };
        let hits = Arc::new(AtomicU32::new(0));
        let svc = policies.layer(upstream(503, Arc::clone(&hits)));
        for _ in 0..2 {
            let r = svc
                .clone()
                .oneshot(http::Request::new(Bytes::new()))
                .await
                .expect("fallback, not an error");
            assert_eq!(r.headers()["x-trellis-fallback"], "fb");
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            6,
            "2 calls × 3 attempts, each seen by the breaker"
        );
        assert_eq!(breaker.state(), BreakerState::Open);
        svc.clone()
            .oneshot(http::Request::new(Bytes::new()))
            .await
            .expect("fallback");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            6,
            "an open breaker stops the attempts; the fallback answers"
        );

        let mut registry = Registry::default();
        registry.register("t", &policies);
        let snapshot = serde_json::to_value(registry.snapshot()).expect("serializable");
        assert_eq!(snapshot["breakers"][0]["state"], "open");
    }
}
