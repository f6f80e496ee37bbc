//! Rate limiting with GCRA: `rate` calls per second sustained, up to `burst` at once;
//! optionally per key (for HTTP, a header such as `X-Api-Key`).
//!
//! The `redis` backend keeps each limit in Redis (one Lua script, Redis's clock), so
//! all sidecars share it; when Redis can't answer within `redis_timeout`, each
//! sidecar limits locally at the same rate instead of failing open or closed, and
//! logs that it did.
//!
//! Refusals are [`RateLimited`] with the wait until a call would be allowed; the HTTP
//! layer answers 429 `rate_limited` with `Retry-After`.
//!
//! ```
//! use trellis_resilience::rate_limit::{RateLimitConfig, RateLimiter};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let limiter = RateLimiter::new("api", RateLimitConfig { rate: 100.0, burst: Some(2), ..Default::default() }).unwrap();
//! assert!(limiter.check(None).await.is_ok());
//! assert!(limiter.check(None).await.is_ok());
//! let refused = limiter.check(None).await.unwrap_err();
//! assert!(refused.retry_after.as_millis() <= 10);
//! # }
//! ```
//!
//! [`RateLimited`]: crate::error::RateLimited

mod gcra;
mod redis;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use serde::Serialize;
use tokio::time::Instant;
use tower::{Layer, Service};

pub use self::gcra::Gcra;
use self::gcra::{Cell, KeyedCells};
use self::redis::RedisCells;
use crate::error::{BoxError, RateLimited};
pub use trellis_core::config::resiliency::{Backend, RateLimitConfig};

/// A limiter's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimitSnapshot {
    /// The limiter's name.
    pub name: String,
    /// Calls per second.
    pub rate: f64,
    /// Calls at once.
    pub burst: u32,
    /// `local` or `redis`.
    pub backend: Backend,
    /// Keys tracked locally (0 unless keyed).
    pub keys: usize,
    /// Calls refused since start.
    pub rejected: u64,
    /// Calls limited locally because Redis could not answer.
    pub fallbacks: u64,
}

#[derive(Debug)]
struct Shared {
    name: String,
    config: RateLimitConfig,
    gcra: Gcra,
    origin: Instant,
    global: Cell,
    keyed: Option<KeyedCells>,
    redis: Option<RedisCells>,
    rejected: AtomicU64,
    fallbacks: AtomicU64,
    rejected_metric: metrics::Counter,
    fallback_metric: metrics::Counter,
}

/// A rate limiter, shared by every clone.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    shared: Arc<Shared>,
}

impl RateLimiter {
    /// A limiter named `name` (also the Redis key prefix's last part).
    ///
    /// # Errors
    /// The config's first broken rule.
    pub fn new(
        name: impl Into<String>,
        config: RateLimitConfig,
    ) -> Result<Self, (&'static str, String)> {
        config.validate()?;
        let name = name.into();
        let gcra = Gcra::new(config.rate, config.burst());
        let redis = match (&config.backend, &config.redis_url) {
            (Backend::Redis, Some(url)) => Some(RedisCells::new(
                url.clone(),
                format!("trellis:ratelimit:{name}:"),
                config.redis_timeout,
            )),
            _ => None,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                keyed: config
                    .key
                    .is_some()
                    .then(|| KeyedCells::new(config.max_keys)),
                rejected_metric: metrics::counter!("trellis_rate_limit_rejected_total", "limiter" => name.clone()),
                fallback_metric: metrics::counter!("trellis_rate_limit_fallbacks_total", "limiter" => name.clone()),
                origin: Instant::now(),
                global: Cell::new(),
                rejected: AtomicU64::new(0),
                fallbacks: AtomicU64::new(0),
                redis,
                gcra,
                config,
                name,
            }),
        })
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Its settings.
    pub fn config(&self) -> &RateLimitConfig {
        &self.shared.config
    }

    /// Whether the limit lives in Redis (so checks are asynchronous).
    pub fn is_shared(&self) -> bool {
        self.shared.redis.is_some()
    }

    /// Decides a call against the local limit, without waiting.
    ///
    /// # Errors
    /// [`RateLimited`] with the wait until a call would be allowed.
    pub fn check_local(&self, key: Option<&str>) -> Result<(), RateLimited> {
        let shared = &self.shared;
        let now = u64::try_from(
            Instant::now()
                .saturating_duration_since(shared.origin)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX)
        // GCRA's TAT starts at 0, so time starts one full burst later: a fresh
        // limit is never "in debt".
        .saturating_add(1_000_000_000);
        let decision = match (&shared.keyed, key) {
            (Some(cells), key) => cells.check(&shared.gcra, key.unwrap_or(""), now),
            (None, _) => shared.global.check(&shared.gcra, now),
        };
        decision.map_err(|wait| self.refuse(wait))
    }

    /// Decides a call: in Redis for a shared limit (falling back to the local limit
    /// when Redis does not answer in time), else locally.
    ///
    /// # Errors
    /// [`RateLimited`] with the wait until a call would be allowed.
    pub async fn check(&self, key: Option<&str>) -> Result<(), RateLimited> {
        let Some(redis) = &self.shared.redis else {
            return self.check_local(key);
        };
        let emission = Duration::from_secs_f64(1.0 / self.shared.config.rate);
        let tolerance = emission * self.shared.config.burst();
        let key = if self.shared.keyed.is_some() {
            key.unwrap_or("")
        } else {
            ""
        };
        match redis.check(emission, tolerance, key).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(wait)) => Err(self.refuse(wait)),
            Err(reason) => {
                let n = self.shared.fallbacks.fetch_add(1, Ordering::Relaxed);
                self.shared.fallback_metric.increment(1);
                if n.is_power_of_two() || n == 0 {
                    tracing::warn!(limiter = %self.shared.name, %reason, fallbacks = n + 1, "Redis unreachable; limiting locally");
                }
                self.check_local(Some(key))
            }
        }
    }

    fn refuse(&self, wait: Duration) -> RateLimited {
        self.shared.rejected.fetch_add(1, Ordering::Relaxed);
        self.shared.rejected_metric.increment(1);
        RateLimited {
            name: self.shared.name.clone(),
            retry_after: wait,
        }
    }

    /// Current figures.
    pub fn snapshot(&self) -> RateLimitSnapshot {
        let shared = &self.shared;
        RateLimitSnapshot {
            name: shared.name.clone(),
            rate: shared.config.rate,
            burst: shared.config.burst(),
            backend: shared.config.backend,
            keys: shared.keyed.as_ref().map_or(0, KeyedCells::len),
            rejected: shared.rejected.load(Ordering::Relaxed),
            fallbacks: shared.fallbacks.load(Ordering::Relaxed),
        }
    }
}

/// Extracts the key a request is limited by.
pub trait KeyFn<Req>: Clone + Send + Sync + 'static {
    /// The key, or `None` to use the shared anonymous limit.
    fn key<'a>(&self, req: &'a Req) -> Option<Cow<'a, str>>;
}

/// No key: one limit for all calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKey;

impl<Req> KeyFn<Req> for NoKey {
    fn key<'a>(&self, _req: &'a Req) -> Option<Cow<'a, str>> {
        None
    }
}

/// Keys HTTP requests by a header's value.
#[derive(Debug, Clone)]
pub struct HeaderKey(pub http::HeaderName);

impl<B> KeyFn<http::Request<B>> for HeaderKey {
    fn key<'a>(&self, req: &'a http::Request<B>) -> Option<Cow<'a, str>> {
        req.headers()
            .get(&self.0)
            .and_then(|v| v.to_str().ok())
            .map(Cow::Borrowed)
    }
}

/// Wraps a service in a [`RateLimit`].
#[derive(Debug, Clone)]
pub struct RateLimitLayer<K> {
    limiter: RateLimiter,
    key: K,
}

impl<K> RateLimitLayer<K> {
    /// Limits services with `limiter`, keyed by `key`.
    pub const fn new(limiter: RateLimiter, key: K) -> Self {
        Self { limiter, key }
    }
}

impl<S, K: Clone> Layer<S> for RateLimitLayer<K> {
    type Service = RateLimit<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            key: self.key.clone(),
        }
    }
}

/// A rate-limited service: calls over the limit fail with [`RateLimited`] and never
/// reach the inner service.
#[derive(Debug, Clone)]
pub struct RateLimit<S, K> {
    inner: S,
    limiter: RateLimiter,
    key: K,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, Req, K> Service<Req> for RateLimit<S, K>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
    K: KeyFn<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if self.limiter.is_shared() {
            // The decision needs Redis: make it in the future, then call a clone
            // that is driven to readiness there.
            let key = self.key.key(&req).map(Cow::into_owned);
            let limiter = self.limiter.clone();
            let inner = self.inner.clone();
            let inner = std::mem::replace(&mut self.inner, inner);
            return ResponseFuture {
                kind: Kind::Boxed {
                    future: Box::pin(async move {
                        limiter.check(key.as_deref()).await?;
                        tower::ServiceExt::oneshot(inner, req)
                            .await
                            .map_err(Into::into)
                    }),
                },
            };
        }
        let decision = self.limiter.check_local(self.key.key(&req).as_deref());
        ResponseFuture {
            kind: match decision {
                Ok(()) => Kind::Called {
                    future: self.inner.call(req),
                },
                Err(limited) => Kind::Rejected {
                    error: Some(limited),
                },
            },
        }
    }
}

pin_project! {
    /// The future of a [`RateLimit`] call.
    pub struct ResponseFuture<F, T> {
        #[pin]
        kind: Kind<F, T>,
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<F, T> {
        Called { #[pin] future: F },
        Rejected { error: Option<RateLimited> },
        Boxed { future: BoxFuture<T> },
    }
}

impl<F, T> std::fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProjection::Called { future } => {
                Poll::Ready(ready!(future.poll(cx)).map_err(Into::into))
            }
            KindProjection::Rejected { error } => Poll::Ready(Err(error
                .take()
                .expect("ResponseFuture polled after completion")
                .into())),
            KindProjection::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod test {
    use tokio::time::advance;
    use tower::ServiceExt;

    use super::*;

    fn limiter(rate: f64, burst: u32, key: Option<&str>) -> RateLimiter {
        RateLimiter::new(
            "t",
            RateLimitConfig {
                rate,
                burst: Some(burst),
                key: key.map(str::to_owned),
                ..Default::default()
            },
        )
        .expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn refills_at_the_rate() {
        let l = limiter(2.0, 2, None);
        l.check(None).await.expect("1");
        l.check(None).await.expect("2");
        let refused = l.check(None).await.expect_err("burst used");
        assert_eq!(refused.retry_after, Duration::from_millis(500));
        advance(Duration::from_millis(499)).await;
        assert!(l.check(None).await.is_err());
        advance(Duration::from_millis(1)).await;
        l.check(None).await.expect("refilled one");
        assert_eq!(l.snapshot().rejected, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_have_their_own_limits() {
        let l = limiter(1.0, 1, Some("header:x-api-key"));
        l.check(Some("alice")).await.expect("alice");
        l.check(Some("bob")).await.expect("bob");
        assert!(l.check(Some("alice")).await.is_err());
        l.check(None).await.expect("anonymous shares one limit");
        assert!(l.check(None).await.is_err());
        assert_eq!(l.snapshot().keys, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_refuses_without_calling_through() {
        let calls = Arc::new(AtomicU64::new(0));
        let service = RateLimitLayer::new(
            limiter(1.0, 1, Some("header:x-api-key")),
            HeaderKey(http::HeaderName::from_static("x-api-key")),
        )
        .layer(tower::service_fn({
            let calls = Arc::clone(&calls);
            move |_: http::Request<()>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, BoxError>(()) }
            }
        }));
        let request = |key: &str| {
            http::Request::builder()
                .header("x-api-key", key)
                .body(())
                .expect("request")
        };
        service.clone().oneshot(request("a")).await.expect("first");
        let err = service
            .clone()
            .oneshot(request("a"))
            .await
            .expect_err("limited");
        assert!(err.is::<RateLimited>());
        service
            .clone()
            .oneshot(request("b"))
            .await
            .expect("other key");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn redis_unreachable_falls_back_to_local_limiting() {
        let l = RateLimiter::new(
            "fallback",
            RateLimitConfig {
                rate: 1.0,
                burst: Some(1),
                backend: Backend::Redis,
                redis_url: Some("redis://127.0.0.1:1".into()),
                redis_timeout: Duration::from_millis(100),
                ..Default::default()
            },
        )
        .expect("valid");
        l.check(None).await.expect("allowed locally");
        assert!(
            l.check(None).await.is_err(),
            "the local limit still applies"
        );
        assert_eq!(l.snapshot().fallbacks, 2);
    }

    #[tokio::test]
    async fn sidecars_share_one_limit_in_redis() {
        if !trellis_core::testing::services_enabled("Redis") {
            return;
        }
        let name = trellis_core::testing::unique_name("t_rl");
        let config = RateLimitConfig {
            rate: 0.5,
            burst: Some(3),
            backend: Backend::Redis,
            redis_url: Some(trellis_core::testing::redis_url()),
            redis_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let a = RateLimiter::new(name.clone(), config.clone()).expect("valid");
        let b = RateLimiter::new(name, config).expect("valid");
        let mut allowed = 0;
        for limiter in [&a, &b, &a, &b, &a, &b] {
            if limiter.check(None).await.is_ok() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 3, "one burst of 3 across both sidecars");
        let refused = b.check(None).await.expect_err("limited");
        assert!(refused.retry_after > Duration::from_secs(1), "{refused:?}");
        assert_eq!(
            a.snapshot().fallbacks + b.snapshot().fallbacks,
            0,
            "Redis answered"
        );
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let bad = |c: RateLimitConfig| c.validate().expect_err("invalid").0;
        assert_eq!(
            bad(RateLimitConfig {
                rate: 0.0,
                ..Default::default()
            }),
            "rate"
        );
        assert_eq!(
            bad(RateLimitConfig {
                rate: f64::NAN,
                ..Default::default()
            }),
            "rate"
        );
        assert_eq!(
            bad(RateLimitConfig {
                burst: Some(0),
                ..Default::default()
            }),
            "burst"
        );
        assert_eq!(
            bad(RateLimitConfig {
                key: Some("cookie:x".into()),
                ..Default::default()
            }),
            "key"
        );
        assert_eq!(
            bad(RateLimitConfig {
                key: Some("header:bad header".into()),
                ..Default::default()
            }),
            "key"
        );
        assert_eq!(
            bad(RateLimitConfig {
                backend: Backend::Redis,
                ..Default::default()
            }),
            "redis_url"
        );
    }
}
