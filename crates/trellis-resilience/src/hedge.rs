//! Hedged requests: if an idempotent call hasn't answered after `delay`, send the same
//! request again (the load balancer may pick another instance); the first good answer
//! wins and the others are cancelled. Trades a little extra load for a much shorter
//! tail when one instance is slow.
//!
//! Hedges are charged to the retry budget when one is given, so hedging can't
//! amplify an overload either.
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//! use trellis_resilience::hedge::{HedgeConfig, HedgeLayer};
//! use trellis_resilience::retry::HttpRetryPolicy;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = HedgeLayer::new("search", HedgeConfig { delay: Duration::from_millis(50), max_hedges: 1 }, HttpRetryPolicy::default(), None)
//!     .expect("valid");
//! let service = ServiceBuilder::new().layer(layer).service_fn(|_: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(()))
//! });
//! assert_eq!(service.oneshot(http::Request::new(())).await.unwrap().status(), 200);
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tower::{Layer, Service, ServiceExt};

pub use trellis_core::config::resiliency::HedgeConfig;

use crate::error::BoxError;
use crate::retry::{Decision, RetryBudget, RetryPolicy};

#[derive(Debug)]
struct Shared<P> {
    config: HedgeConfig,
    policy: P,
    budget: Option<Arc<RetryBudget>>,
    hedges: metrics::Counter,
}

/// Wraps a service in a [`Hedge`].
#[derive(Debug)]
pub struct HedgeLayer<P> {
    shared: Arc<Shared<P>>,
}

impl<P> Clone for HedgeLayer<P> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<P> HedgeLayer<P> {
    /// Hedges calls `policy` says may be repeated, charging `budget` if given.
    ///
    /// # Errors
    /// The config's first broken rule.
    pub fn new(
        name: &str,
        config: HedgeConfig,
        policy: P,
        budget: Option<Arc<RetryBudget>>,
    ) -> Result<Self, (&'static str, String)> {
        config.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                policy,
                budget,
                hedges: metrics::counter!("trellis_hedges_total", "target" => name.to_owned()),
            }),
        })
    }
}

impl<S, P> Layer<S> for HedgeLayer<P> {
    type Service = Hedge<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// A service whose slow idempotent calls are hedged.
#[derive(Debug)]
pub struct Hedge<S, P> {
    inner: S,
    shared: Arc<Shared<P>>,
}

impl<S: Clone, P> Clone for Hedge<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

type Attempt<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, P, Req> Service<Req> for Hedge<S, P>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::Response: Send + 'static,
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
        let fresh = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, fresh);
        let shared = Arc::clone(&self.shared);
        if !shared.policy.may_repeat(&req) {
            return Box::pin(async move { service.oneshot(req).await.map_err(Into::into) });
        }
        Box::pin(async move {
            let attempt = |service: S, req: Req| -> Attempt<S::Response> {
                Box::pin(async move { service.oneshot(req).await.map_err(Into::into) })
            };
            let mut spare = shared.policy.clone_request(&req);
            let mut in_flight = FuturesUnordered::new();
            in_flight.push(attempt(service.clone(), req));
            let mut hedges_left = shared.config.max_hedges;
            let mut last = None;
            let timer = tokio::time::sleep(shared.config.delay);
            tokio::pin!(timer);
            loop {
                let can_hedge = hedges_left > 0 && spare.is_some();
                tokio::select! {
                    Some(result) = in_flight.next() => {
                        if matches!(shared.policy.decide(result.as_ref()), Decision::Return) {
                            // A good answer: dropping `in_flight` cancels the rest.
                            return result;
                        }
                        last = Some(result);
                        if in_flight.is_empty() {
                            if !can_hedge {
                                break;
                            }
                            // Everything failed before the timer: hedge right away.
                            timer.as_mut().reset(tokio::time::Instant::now());
                        }
                    }
                    () = &mut timer, if can_hedge => {
                        if shared.budget.as_ref().is_some_and(|b| !b.withdraw()) {
                            hedges_left = 0;
                            continue;
                        }
                        let Some(req) = spare.take() else { continue };
                        spare = shared.policy.clone_request(&req);
                        hedges_left -= 1;
                        shared.hedges.increment(1);
                        in_flight.push(attempt(service.clone(), req));
                        timer.as_mut().reset(tokio::time::Instant::now() + shared.config.delay);
                    }
                    else => break,
                }
            }
            last.unwrap_or_else(|| Err("hedged call produced no result".into()))
        })
    }
}

#[cfg(test)]
mod test {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::retry::HttpRetryPolicy;

    /// Call n sleeps `delays[n]` ms then answers `200 + n`.
    fn upstream(
        delays: &'static [u64],
        hits: Arc<AtomicU32>,
        finished: Arc<AtomicU32>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<()>,
        Error = BoxError,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_: http::Request<()>| {
            let n = hits.fetch_add(1, Ordering::SeqCst) as usize;
            let finished = Arc::clone(&finished);
            async move {
                tokio::time::sleep(Duration::from_millis(delays[n.min(delays.len() - 1)])).await;
                finished.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(
                    http::Response::builder()
                        .status(200 + n as u16)
                        .body(())
                        .expect("response"),
                )
            }
        })
    }

    fn hedge(max_hedges: u32) -> HedgeLayer<HttpRetryPolicy> {
        HedgeLayer::new(
            "t",
            HedgeConfig {
                delay: Duration::from_millis(50),
                max_hedges,
            },
            HttpRetryPolicy::default(),
            None,
        )
        .expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_beats_a_slow_first_attempt_and_the_loser_is_cancelled() {
        let (hits, finished) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let svc = hedge(1).layer(upstream(
            &[1000, 10],
            Arc::clone(&hits),
            Arc::clone(&finished),
        ));
        let started = tokio::time::Instant::now();
        let response = svc.oneshot(http::Request::new(())).await.expect("response");
        assert_eq!(response.status(), 201, "the hedge answered");
        assert_eq!(started.elapsed(), Duration::from_millis(60));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            (hits.load(Ordering::SeqCst), finished.load(Ordering::SeqCst)),
            (2, 1),
            "the slow attempt was dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fast_calls_are_not_hedged() {
        let hits = Arc::new(AtomicU32::new(0));
        let svc = hedge(2).layer(upstream(&[10], Arc::clone(&hits), Arc::default()));
        svc.oneshot(http::Request::new(())).await.expect("response");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn non_idempotent_calls_are_never_hedged() {
        let hits = Arc::new(AtomicU32::new(0));
        let svc = hedge(2).layer(upstream(&[1000], Arc::clone(&hits), Arc::default()));
        let post = http::Request::builder()
            .method("POST")
            .body(())
            .expect("request");
        svc.oneshot(post).await.expect("response");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hedges_are_limited_and_charged_to_the_budget() {
        let hits = Arc::new(AtomicU32::new(0));
        let budget = Arc::new(RetryBudget::new(
            "t",
            crate::retry::BudgetConfig {
                percent: 0.0,
                min_per_sec: 0,
                window: Duration::from_secs(10),
            },
        ));
        let layer = HedgeLayer::new(
            "t",
            HedgeConfig {
                delay: Duration::from_millis(50),
                max_hedges: 3,
            },
            HttpRetryPolicy::default(),
            Some(budget),
        )
        .expect("valid");
        let svc = layer.layer(upstream(&[500], Arc::clone(&hits), Arc::default()));
        svc.oneshot(http::Request::new(())).await.expect("response");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "an empty budget allows no hedge"
        );

        let hits = Arc::new(AtomicU32::new(0));
        let svc = hedge(3).layer(upstream(&[500], Arc::clone(&hits), Arc::default()));
        svc.oneshot(http::Request::new(())).await.expect("response");
        assert_eq!(hits.load(Ordering::SeqCst), 4, "1 + max_hedges");
    }
}
