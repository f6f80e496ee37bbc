//! Retries with backoff, jitter, `Retry-After`, idempotency rules and a budget.
//!
//! One layer owns retries per hop: build one [`RetryLayer`] per target and don't
//! stack another retry (an SDK's, an HTTP client's) under it — stacked retries
//! multiply (dapr#4512).
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//! use trellis_resilience::retry::{Backoff, BackoffKind, HttpRetryPolicy, Jitter, RetryConfig, RetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let config = RetryConfig {
//!     max_attempts: 3,
//!     backoff: Backoff { kind: BackoffKind::Constant, base: Duration::from_millis(1), jitter: Jitter::None, ..Default::default() },
//!     ..Default::default()
//! };
//! let hits = Arc::new(AtomicU32::new(0));
//! let service = ServiceBuilder::new()
//!     .layer(RetryLayer::new("upstream", config, HttpRetryPolicy::default()).expect("valid"))
//!     .service_fn({
//!         let hits = Arc::clone(&hits);
//!         move |_req: http::Request<()>| {
//!             let n = hits.fetch_add(1, Ordering::SeqCst);
//!             async move { Ok::<_, std::convert::Infallible>(http::Response::builder().status(if n < 2 { 503 } else { 200 }).body(()).unwrap()) }
//!         }
//!     });
//! let response = service.oneshot(http::Request::new(())).await.unwrap();
//! assert_eq!((response.status().as_u16(), hits.load(Ordering::SeqCst)), (200, 3));
//! # }
//! ```

mod budget;
mod policy;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};

pub use self::budget::{BudgetSnapshot, RetryBudget};
pub use self::policy::{Decision, HttpRetryPolicy, RetryPolicy, TryCloneBody};
use crate::error::BoxError;
pub use trellis_core::config::resiliency::{
    Backoff, BackoffKind, BudgetConfig, Jitter, RetryConfig,
};

#[derive(Debug)]
struct Shared<P> {
    name: String,
    config: RetryConfig,
    policy: P,
    budget: Option<Arc<RetryBudget>>,
    /// A std `Mutex`: one draw per retry, never held across an `.await`.
    rng: Mutex<fastrand::Rng>,
    retries: metrics::Counter,
}

/// Wraps a service in a [`Retry`].
#[derive(Debug)]
pub struct RetryLayer<P> {
    shared: Arc<Shared<P>>,
}

impl<P> Clone for RetryLayer<P> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<P> RetryLayer<P> {
    /// Retries under `policy` with a budget of its own (if configured), jitter from
    /// entropy.
    ///
    /// # Errors
    /// The config's first broken rule.
    pub fn new(name: &str, config: RetryConfig, policy: P) -> Result<Self, (&'static str, String)> {
        let budget = config.budget.map(|b| Arc::new(RetryBudget::new(name, b)));
        Self::with_budget(name, config, policy, budget, fastrand::u64(..))
    }

    /// Retries under `policy` charging `budget` (shared, e.g. with hedging), with
    /// jitter from `seed`.
    ///
    /// # Errors
    /// The config's first broken rule.
    pub fn with_budget(
        name: &str,
        config: RetryConfig,
        policy: P,
        budget: Option<Arc<RetryBudget>>,
        seed: u64,
    ) -> Result<Self, (&'static str, String)> {
        config.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                retries: metrics::counter!("trellis_retries_total", "target" => name.to_owned()),
                config,
                policy,
                budget,
                rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            }),
        })
    }

    /// The budget, if any.
    pub fn budget(&self) -> Option<&Arc<RetryBudget>> {
        self.shared.budget.as_ref()
    }
}

impl<S, P> Layer<S> for RetryLayer<P> {
    type Service = Retry<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// A service whose failed calls are retried.
#[derive(Debug)]
pub struct Retry<S, P> {
    inner: S,
    shared: Arc<Shared<P>>,
}

impl<S: Clone, P> Clone for Retry<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S, P, Req> Service<Req> for Retry<S, P>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::Response: Send,
    P: RetryPolicy<Req, S::Response>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // The ready clone takes this call; the fresh clone waits for the next.
        let fresh = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, fresh);
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            if let Some(budget) = &shared.budget {
                budget.deposit();
            }
            let mut req = req;
            let mut attempt = 1;
            let mut previous = Duration::ZERO;
            loop {
                let copy = if attempt < shared.config.max_attempts {
                    shared.policy.clone_request(&req)
                } else {
                    None
                };
                let result = if attempt == 1 {
                    service.call(req).await.map_err(Into::into)
                } else {
                    service
                        .ready()
                        .await
                        .map_err(Into::into)?
                        .call(req)
                        .await
                        .map_err(Into::into)
                };
                let Some(next) = copy else { return result };
                let after = match shared.policy.decide(result.as_ref()) {
                    Decision::Return => return result,
                    Decision::Retry { after, never_sent } => {
                        if !never_sent && !shared.policy.may_repeat(&next) {
                            return result;
                        }
                        after
                    }
                };
                if after.is_some_and(|after| after > shared.config.max_retry_after) {
                    return result;
                }
                // Charged now, before the backoff: retries waiting to be sent count.
                if shared.budget.as_ref().is_some_and(|b| !b.withdraw()) {
                    tracing::debug!(target = %shared.name, attempt, "retry budget exhausted");
                    return result;
                }
                let delay = {
                    let mut rng = shared
                        .rng
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    shared.config.backoff.delay(attempt, previous, &mut rng)
                }
                .max(after.unwrap_or_default());
                drop(result);
                shared.retries.increment(1);
                tracing::debug!(target = %shared.name, attempt, ?delay, "retrying");
                tokio::time::sleep(delay).await;
                previous = delay;
                attempt += 1;
                req = next;
            }
        })
    }
}

#[cfg(test)]
mod test;
