//! Per-call overhead of Trellis's tower resilience layers against peer crates.
//!
//! Every contender in a group wraps the same trivial inner service and is driven the
//! same way: one current-thread tokio runtime, one `block_on` per criterion batch,
//! and inside it `ready().await` + `call(req).await` on one long-lived service, so
//! neither runtime entry nor service cloning is charged per call. Direct (non-tower)
//! APIs (`RateLimiter::check_local`, governor's `check`) are plain synchronous calls.
//!
//! Benchmark ids are `<group>/<contender>`; `ratios.py` beside this crate's manifest
//! turns criterion's estimates into tables.
//!
//! Run with:
//! `cargo bench -p trellis-bench --features bench --bench layers`

use std::fmt::Debug;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use trellis_resilience::BoxError;
use trellis_resilience::breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};
use trellis_resilience::bulkhead::{Bulkhead, BulkheadConfig, BulkheadLayer};
use trellis_resilience::classify::ErrorsAreFailures;
use trellis_resilience::rate_limit::{NoKey, RateLimitConfig, RateLimitLayer, RateLimiter};
use trellis_resilience::retry::{HttpRetryPolicy, RetryBudget, RetryConfig, RetryLayer};

type HttpRequest = http::Request<()>;
type HttpResponse = http::Response<()>;

/// The inner service every contender wraps in the generic groups.
fn echo()
-> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|x: u64| async move { Ok::<_, BoxError>(x) })
}

/// The inner service of the retry group: always 200, so nothing is retried.
fn ok_200() -> impl Service<HttpRequest, Response = HttpResponse, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|_req: HttpRequest| async move { Ok::<_, BoxError>(http::Response::new(())) })
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Times `iters` sequential calls of `service` inside one `block_on`.
fn bench_service<S, Req>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    id: &str,
    mut service: S,
    mut request: impl FnMut() -> Req,
) where
    S: Service<Req>,
    S::Error: Debug,
{
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let response = service
                        .ready()
                        .await
                        .expect("service ready")
                        .call(black_box(request()))
                        .await
                        .expect("call allowed and successful");
                    black_box(response);
                }
                start.elapsed()
            })
        });
    });
}

// === circuit breaker ===

/// failsafe has no tower layer: this adapter wraps each inner call's future in
/// `failsafe::futures::CircuitBreaker::call`, which is failsafe's async API.
#[derive(Clone)]
struct FailsafeService<S, B> {
    inner: S,
    breaker: B,
}

impl<S, B, Req> Service<Req> for FailsafeService<S, B>
where
    S: Service<Req>,
    B: failsafe::futures::CircuitBreaker,
{
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<
        S::Future,
        B::FailurePolicy,
        B::Instrument,
        failsafe::Any,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.breaker.call(self.inner.call(req))
    }
}

fn circuit_breaker(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("circuit_breaker");

    bench_service(&mut group, &rt, "baseline", echo(), || 7_u64);

    // Count window of 100 calls, 20 calls minimum, trips at 50 % failures.
    let breaker = Breaker::new("bench", BreakerConfig::default()).expect("valid breaker config");
    let trellis = CircuitBreakerLayer::new(breaker, ErrorsAreFailures).layer(echo());
    bench_service(&mut group, &rt, "trellis", trellis, || 7_u64);

    let layer = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .name("bench")
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .minimum_number_of_calls(20)
        .wait_duration_in_open(Duration::from_secs(30))
        .build()
        .expect("valid tower-resilience breaker config");
    bench_service(
        &mut group,
        &rt,
        "tower-resilience",
        layer.layer(echo()),
        || 7_u64,
    );

    // Default policy: success rate over a time window, or 5 consecutive failures.
    let failsafe = FailsafeService {
        inner: echo(),
        breaker: failsafe::Config::new().build(),
    };
    bench_service(&mut group, &rt, "failsafe", failsafe, || 7_u64);

    group.finish();
}

// === bulkhead ===

fn bulkhead(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("bulkhead");

    bench_service(&mut group, &rt, "baseline", echo(), || 7_u64);

    let config = BulkheadConfig {
        max_concurrent: 100,
        max_queue: 100,
        max_wait: Duration::from_secs(1),
    };
    let bulkhead = Bulkhead::new("bench", config).expect("valid bulkhead config");
    let trellis = BulkheadLayer::new(bulkhead).layer(echo());
    bench_service(&mut group, &rt, "trellis", trellis, || 7_u64);

    let layer = tower_resilience::bulkhead::BulkheadLayer::builder()
        .name("bench")
        .max_concurrent_calls(100)
        .max_wait_duration(Duration::from_secs(1))
        .build()
        .expect("valid tower-resilience bulkhead config");
    bench_service(
        &mut group,
        &rt,
        "tower-resilience",
        layer.layer(echo()),
        || 7_u64,
    );

    let tower = tower::limit::ConcurrencyLimitLayer::new(100).layer(echo());
    bench_service(&mut group, &rt, "tower", tower, || 7_u64);

    group.finish();
}

// === rate limiter ===

/// 1e9 calls per second (the most Trellis accepts) with a burst of 1e9: no call in
/// this benchmark is ever refused, so this measures the allowed path.
const RATE: u32 = 1_000_000_000;

fn trellis_limiter() -> RateLimiter {
    RateLimiter::new(
        "bench",
        RateLimitConfig {
            rate: f64::from(RATE),
            burst: Some(RATE),
            ..Default::default()
        },
    )
    .expect("valid rate limit config")
}

fn rate_limiter(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("rate_limiter");

    // Direct, synchronous decisions.
    let limiter = trellis_limiter();
    group.bench_function("trellis-check", |b| {
        b.iter(|| {
            limiter.check_local(black_box(None)).expect("allowed");
        });
    });

    let rate = NonZeroU32::new(RATE).expect("non-zero");
    let governor =
        governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(rate));
    group.bench_function("governor", |b| {
        b.iter(|| {
            governor.check().expect("allowed");
        });
    });

    // As tower layers around the echo service.
    bench_service(&mut group, &rt, "baseline", echo(), || 7_u64);

    let trellis = RateLimitLayer::new(trellis_limiter(), NoKey).layer(echo());
    bench_service(&mut group, &rt, "trellis", trellis, || 7_u64);

    // A token bucket refilled at 1e9/s holding up to 1e9 + 1e9 tokens; a refused
    // call would fail at once (no waiting), like Trellis's.
    let rate = usize::try_from(RATE).expect("fits usize");
    let layer = tower_resilience::ratelimiter::RateLimiterLayer::burst(rate, rate)
        .name("bench")
        .timeout_duration(Duration::ZERO)
        .build()
        .expect("valid tower-resilience rate limiter config");
    bench_service(
        &mut group,
        &rt,
        "tower-resilience",
        layer.layer(echo()),
        || 7_u64,
    );

    group.finish();
}

// === retry ===

/// `tower::retry`'s policy reduced to its essentials: retry 5xx up to twice, no
/// backoff, no budget.
#[derive(Debug, Clone)]
struct RetryServerErrors {
    retries_left: u32,
}

impl tower::retry::Policy<HttpRequest, HttpResponse, BoxError> for RetryServerErrors {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut HttpRequest,
        result: &mut Result<HttpResponse, BoxError>,
    ) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        if failed && self.retries_left > 0 {
            self.retries_left -= 1;
            Some(std::future::ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, req: &HttpRequest) -> Option<HttpRequest> {
        Some(req.clone())
    }
}

fn retry(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("retry");
    let request = || http::Request::new(());

    bench_service(&mut group, &rt, "baseline", ok_200(), request);

    // Trellis's defaults: 3 attempts, exponential backoff with full jitter, and a
    // retry budget (charged one deposit per call).
    let config = RetryConfig::default();
    let budget = config
        .budget
        .map(|b| Arc::new(RetryBudget::new("bench", b)));
    let layer = RetryLayer::with_budget("bench", config, HttpRetryPolicy::default(), budget, 42)
        .expect("valid retry config");
    bench_service(&mut group, &rt, "trellis", layer.layer(ok_200()), request);

    // The same without a budget, to compare like with like against peers that have none.
    let config = RetryConfig {
        budget: None,
        ..RetryConfig::default()
    };
    let layer = RetryLayer::with_budget("bench", config, HttpRetryPolicy::default(), None, 42)
        .expect("valid retry config");
    bench_service(
        &mut group,
        &rt,
        "trellis-no-budget",
        layer.layer(ok_200()),
        request,
    );

    let layer =
        tower_resilience::retry::RetryLayer::<HttpRequest, HttpResponse, BoxError>::builder()
            .name("bench")
            .max_attempts(3)
            .exponential_backoff(Duration::from_millis(100))
            .retry_on_response(|response: &HttpResponse| response.status().is_server_error())
            .build();
    bench_service(
        &mut group,
        &rt,
        "tower-resilience",
        layer.layer(ok_200()),
        request,
    );

    let tower =
        tower::retry::RetryLayer::new(RetryServerErrors { retries_left: 2 }).layer(ok_200());
    bench_service(&mut group, &rt, "tower", tower, request);

    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    circuit_breaker(&mut criterion);
    bulkhead(&mut criterion);
    rate_limiter(&mut criterion);
    retry(&mut criterion);
    criterion.final_summary();
}
