use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use super::*;
use crate::error::ConnectError;

fn constant(ms: u64) -> Backoff {
    Backoff {
        kind: BackoffKind::Constant,
        base: Duration::from_millis(ms),
        max: Duration::from_secs(60),
        jitter: Jitter::None,
        ..Default::default()
    }
}

/// An upstream answering `statuses` in turn (then the last one forever), counting hits
/// and when they happened.
fn upstream(
    statuses: &'static [u16],
    hits: Arc<AtomicU32>,
    log: Arc<Mutex<Vec<Duration>>>,
) -> impl Service<http::Request<()>, Response = http::Response<()>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    let start = Instant::now();
    tower::service_fn(move |_req: http::Request<()>| {
        let n = hits.fetch_add(1, Ordering::SeqCst) as usize;
        log.lock().expect("lock").push(start.elapsed());
        let status = statuses[n.min(statuses.len() - 1)];
        async move {
            if status == 0 {
                return Err::<http::Response<()>, BoxError>(Box::new(ConnectError(
                    "refused".into(),
                )));
            }
            Ok(http::Response::builder()
                .status(status)
                .body(())
                .expect("response"))
        }
    })
}

fn get() -> http::Request<()> {
    http::Request::new(())
}

fn post() -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .body(())
        .expect("request")
}

fn layer(config: RetryConfig) -> RetryLayer<HttpRetryPolicy> {
    RetryLayer::with_budget("t", config, HttpRetryPolicy::default(), None, 7).expect("valid")
}

#[tokio::test(start_paused = true)]
async fn retries_on_the_schedule_then_gives_the_last_answer() {
    let (hits, log) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let config = RetryConfig {
        max_attempts: 4,
        backoff: Backoff {
            jitter: Jitter::None,
            base: Duration::from_millis(100),
            ..Default::default()
        },
        budget: None,
        ..Default::default()
    };
    let svc = layer(config).layer(upstream(&[503], Arc::clone(&hits), Arc::clone(&log)));
    let response = svc.oneshot(get()).await.expect("response");
    assert_eq!(response.status(), 503);
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    let times: Vec<u128> = log
        .lock()
        .expect("lock")
        .iter()
        .map(Duration::as_millis)
        .collect();
    assert_eq!(times, [0, 100, 300, 700], "exponential 100/200/400ms");
}

#[tokio::test(start_paused = true)]
async fn other_4xx_and_successes_are_not_retried() {
    for status in [200u16, 201, 400, 401, 404, 409, 422] {
        let hits = Arc::new(AtomicU32::new(0));
        let svc = layer(RetryConfig {
            backoff: constant(1),
            ..Default::default()
        })
        .layer(upstream(
            Box::leak(vec![status].into_boxed_slice()),
            Arc::clone(&hits),
            Arc::default(),
        ));
        assert_eq!(
            svc.oneshot(get())
                .await
                .expect("response")
                .status()
                .as_u16(),
            status
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "{status} must not be retried"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_requests_are_retried_only_when_never_sent() {
    let hits = Arc::new(AtomicU32::new(0));
    let svc = layer(RetryConfig {
        backoff: constant(1),
        ..Default::default()
    })
    .layer(upstream(&[503], Arc::clone(&hits), Arc::default()));
    svc.oneshot(post()).await.expect("response");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a POST that reached the upstream is not repeated"
    );

    let hits = Arc::new(AtomicU32::new(0));
    let svc = layer(RetryConfig {
        backoff: constant(1),
        ..Default::default()
    })
    .layer(upstream(&[0, 0, 200], Arc::clone(&hits), Arc::default()));
    assert_eq!(svc.oneshot(post()).await.expect("response").status(), 200);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "refused connections are safe to retry"
    );

    let hits = Arc::new(AtomicU32::new(0));
    let svc = layer(RetryConfig {
        backoff: constant(1),
        ..Default::default()
    })
    .layer(upstream(&[503, 200], Arc::clone(&hits), Arc::default()));
    let keyed = http::Request::builder()
        .method("POST")
        .header("idempotency-key", "k")
        .body(())
        .expect("request");
    assert_eq!(svc.oneshot(keyed).await.expect("response").status(), 200);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_bounded() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let hits = Arc::new(AtomicU32::new(0));
    let inner = {
        let (hits, log) = (Arc::clone(&hits), Arc::clone(&log));
        let start = Instant::now();
        tower::service_fn(move |_: http::Request<()>| {
            let n = hits.fetch_add(1, Ordering::SeqCst);
            log.lock().expect("lock").push(start.elapsed());
            let after = if n == 0 { "2" } else { "120" };
            async move {
                Ok::<_, BoxError>(
                    http::Response::builder()
                        .status(429)
                        .header("retry-after", after)
                        .body(())
                        .expect("response"),
                )
            }
        })
    };
    let svc = layer(RetryConfig {
        backoff: constant(10),
        max_attempts: 5,
        ..Default::default()
    })
    .layer(inner);
    assert_eq!(svc.oneshot(get()).await.expect("response").status(), 429);
    let times: Vec<u64> = log
        .lock()
        .expect("lock")
        .iter()
        .map(|d| d.as_secs())
        .collect();
    assert_eq!(
        times,
        [0, 2],
        "waited the 2s asked for; a 120s Retry-After ends the retries"
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_caps_retries_across_calls() {
    // No original traffic to speak of: only the floor, 1/s over 10s = 10 retries.
    let budget = Arc::new(RetryBudget::new(
        "t",
        BudgetConfig {
            percent: 0.0,
            min_per_sec: 1,
            window: Duration::from_secs(10),
        },
    ));
    let hits = Arc::new(AtomicU32::new(0));
    let retry = RetryLayer::with_budget(
        "t",
        RetryConfig {
            max_attempts: 3,
            backoff: constant(1000),
            ..Default::default()
        },
        HttpRetryPolicy::default(),
        Some(Arc::clone(&budget)),
        1,
    )
    .expect("valid");
    let svc = retry.layer(upstream(&[503], Arc::clone(&hits), Arc::default()));
    // 20 concurrent failing calls: each wants 2 retries (40), all decided while the
    // earlier ones still wait in backoff.
    let calls: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for call in calls {
        call.await.expect("join").expect("response");
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        20 + 10,
        "20 originals + exactly the 10 retries budgeted"
    );
    assert_eq!(
        budget.snapshot().exhausted,
        20,
        "10 first retries and 10 second retries refused"
    );
}

#[tokio::test(start_paused = true)]
async fn jitter_is_reproducible_from_the_seed() {
    let schedule = |seed| async move {
        let log = Arc::new(Mutex::new(Vec::new()));
        let retry = RetryLayer::with_budget(
            "t",
            RetryConfig {
                max_attempts: 5,
                budget: None,
                ..Default::default()
            },
            HttpRetryPolicy::default(),
            None,
            seed,
        )
        .expect("valid");
        retry
            .layer(upstream(&[503], Arc::default(), Arc::clone(&log)))
            .oneshot(get())
            .await
            .expect("response");
        log.lock().expect("lock").clone()
    };
    assert_eq!(schedule(42).await, schedule(42).await);
    assert_ne!(schedule(42).await, schedule(43).await);
}

#[test]
fn invalid_configs_name_the_field() {
    let bad = |c: RetryConfig| c.validate().expect_err("invalid").0;
    assert_eq!(
        bad(RetryConfig {
            max_attempts: 0,
            ..Default::default()
        }),
        "max_attempts"
    );
    assert_eq!(
        bad(RetryConfig {
            statuses: vec![404],
            ..Default::default()
        }),
        "statuses"
    );
    assert_eq!(
        bad(RetryConfig {
            backoff: Backoff {
                max: Duration::from_millis(1),
                ..Default::default()
            },
            ..Default::default()
        }),
        "backoff.max"
    );
    assert_eq!(
        bad(RetryConfig {
            budget: Some(BudgetConfig {
                percent: -1.0,
                ..Default::default()
            }),
            ..Default::default()
        }),
        "budget.percent"
    );
}
