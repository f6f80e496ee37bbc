use std::time::Duration;

use tokio::time::advance;

use super::*;
use crate::classify::Outcome;

fn breaker(config: BreakerConfig) -> Breaker {
    Breaker::new("test", config).expect("valid")
}

fn calls(b: &Breaker, outcome: Outcome, n: usize) {
    for _ in 0..n {
        b.try_acquire().expect("allowed").record(outcome);
    }
}

fn small() -> BreakerConfig {
    BreakerConfig {
        window_size: 10,
        minimum_calls: 4,
        failure_rate: 50.0,
        open_wait: Duration::from_secs(10),
        half_open_calls: 2,
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn trips_on_failure_rate_only_after_minimum_calls() {
    let b = breaker(small());
    calls(&b, Outcome::Failure, 3);
    assert_eq!(b.state(), BreakerState::Closed, "3 calls < minimum 4");
    calls(&b, Outcome::Success, 1);
    // 3 of 4 failed = 75% ≥ 50%: tripped by the 4th call.
    assert_eq!(b.state(), BreakerState::Open);
    let err = b.try_acquire().expect_err("open");
    assert_eq!(err.retry_after, Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn stays_closed_below_the_rate() {
    let b = breaker(small());
    for _ in 0..20 {
        calls(&b, Outcome::Success, 2);
        calls(&b, Outcome::Failure, 1);
    }
    let s = b.snapshot();
    assert_eq!(s.state, BreakerState::Closed);
    assert_eq!(s.calls, 10, "the window holds the last 10 calls");
    assert!(s.failure_rate < 50.0, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn trips_on_slow_call_rate() {
    let b = breaker(BreakerConfig {
        slow_call_rate: 50.0,
        slow_call_duration: Duration::from_secs(2),
        ..small()
    });
    for _ in 0..4 {
        let permit = b.try_acquire().expect("closed");
        advance(Duration::from_secs(3)).await;
        permit.record(Outcome::Success);
    }
    let s = b.snapshot();
    assert_eq!(
        s.state,
        BreakerState::Open,
        "successful but slow calls trip it"
    );
}

#[tokio::test(start_paused = true)]
async fn trips_on_consecutive_failures_before_the_window_fills() {
    let b = breaker(BreakerConfig {
        consecutive_failures: Some(3),
        minimum_calls: 100,
        window_size: 100,
        ..small()
    });
    calls(&b, Outcome::Failure, 2);
    calls(&b, Outcome::Success, 1);
    calls(&b, Outcome::Failure, 2);
    assert_eq!(b.state(), BreakerState::Closed, "the streak was broken");
    calls(&b, Outcome::Failure, 1);
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn half_open_trials_close_it_again() {
    let b = breaker(small());
    let mut events = b.subscribe();
    calls(&b, Outcome::Failure, 4);
    advance(Duration::from_millis(9_999)).await;
    assert!(b.try_acquire().is_err(), "still open");
    advance(Duration::from_millis(1)).await;
    assert_eq!(b.state(), BreakerState::HalfOpen);
    let first = b.try_acquire().expect("trial 1");
    let second = b.try_acquire().expect("trial 2");
    let third = b.try_acquire().expect_err("only 2 trials");
    assert_eq!(third.retry_after, Duration::from_secs(1));
    first.record(Outcome::Success);
    second.record(Outcome::Success);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(
        b.snapshot().calls,
        0,
        "a closed breaker starts a fresh window"
    );

    let seen: Vec<(BreakerState, BreakerState)> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|e| (e.from, e.to))
        .collect();
    assert_eq!(
        seen,
        [
            (BreakerState::Closed, BreakerState::Open),
            (BreakerState::Open, BreakerState::HalfOpen),
            (BreakerState::HalfOpen, BreakerState::Closed),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn failed_trials_reopen_with_a_growing_capped_wait() {
    let b = breaker(BreakerConfig {
        open_wait_multiplier: 2.0,
        open_wait_max: Duration::from_secs(30),
        ..small()
    });
    calls(&b, Outcome::Failure, 4);
    let mut expected = [10, 20, 30, 30].into_iter();
    let mut wait = Duration::from_secs(expected.next().expect("first"));
    for next in expected {
        assert_eq!(b.try_acquire().expect_err("open").retry_after, wait);
        advance(wait).await;
        calls(&b, Outcome::Failure, 1);
        calls(&b, Outcome::Success, 1); // 1 of 2 failed = 50%: reopen
        wait = Duration::from_secs(next);
    }
    assert_eq!(b.snapshot().trips, 4);
    // Recovery resets the growth.
    advance(wait).await;
    calls(&b, Outcome::Success, 2);
    assert_eq!((b.state(), b.snapshot().trips), (BreakerState::Closed, 0));
    calls(&b, Outcome::Failure, 4);
    assert_eq!(
        b.try_acquire().expect_err("open").retry_after,
        Duration::from_secs(10)
    );
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_and_cancelled_trials_do_not_count() {
    let b = breaker(small());
    calls(&b, Outcome::Ignored, 10);
    assert_eq!(b.snapshot().calls, 0);
    calls(&b, Outcome::Failure, 4);
    advance(Duration::from_secs(10)).await;
    drop(b.try_acquire().expect("trial")); // cancelled
    b.try_acquire().expect("trial").record(Outcome::Ignored); // rejected further in
    // Both slots came back: two trials still possible.
    calls(&b, Outcome::Success, 2);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn late_results_of_an_older_period_are_ignored() {
    let b = breaker(small());
    let slow_success = b.try_acquire().expect("closed");
    calls(&b, Outcome::Failure, 4);
    assert_eq!(b.state(), BreakerState::Open);
    advance(Duration::from_secs(10)).await;
    calls(&b, Outcome::Success, 1);
    slow_success.record(Outcome::Success); // started before the trip: not a trial
    assert_eq!(
        b.state(),
        BreakerState::HalfOpen,
        "one trial still outstanding"
    );
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_failures() {
    let b = breaker(BreakerConfig {
        window: WindowKind::Time,
        window_size: 5,
        ..small()
    });
    calls(&b, Outcome::Failure, 3);
    advance(Duration::from_secs(5)).await;
    calls(&b, Outcome::Success, 1);
    calls(&b, Outcome::Failure, 1);
    assert_eq!(b.snapshot().calls, 2);
    assert_eq!(
        b.state(),
        BreakerState::Closed,
        "the first 3 failures left the window"
    );
}

#[tokio::test(start_paused = true)]
async fn modes_switch_at_runtime() {
    let b = breaker(BreakerConfig {
        mode: Mode::ForcedOpen,
        ..small()
    });
    assert_eq!(b.state(), BreakerState::ForcedOpen);
    assert!(b.try_acquire().is_err());
    b.set_mode(Mode::Disabled);
    calls(&b, Outcome::Failure, 50);
    assert_eq!((b.state(), b.snapshot().calls), (BreakerState::Disabled, 0));
    b.set_mode(Mode::Auto);
    assert_eq!(b.state(), BreakerState::Closed);
    calls(&b, Outcome::Failure, 4);
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn the_service_never_calls_through_an_open_breaker() {
    use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
    use tower::Layer;
    use tower_test::mock;

    let b = breaker(BreakerConfig {
        minimum_calls: 1,
        window_size: 1,
        ..small()
    });
    let (service, mut handle) = mock::pair::<&'static str, &'static str>();
    let mut service = mock::Spawn::new(
        CircuitBreakerLayer::new(b.clone(), crate::classify::ErrorsAreFailures).layer(service),
    );

    assert_ready_ok!(service.poll_ready());
    let mut call = tokio_test::task::spawn(service.call("first"));
    assert_pending!(call.poll());
    let (request, respond) = handle.next_request().await.expect("reaches the upstream");
    assert_eq!(request, "first");
    respond.send_error("boom");
    assert_ready_err!(call.poll());
    assert_eq!(b.state(), BreakerState::Open);

    assert_ready_ok!(service.poll_ready());
    let mut call = tokio_test::task::spawn(service.call("second"));
    let err = assert_ready_err!(call.poll());
    assert!(err.is::<crate::error::CircuitOpen>());
    assert!(
        handle.poll_request().is_pending(),
        "the upstream never saw the second call"
    );
}

#[test]
fn invalid_configs_name_the_field() {
    let bad = |c: BreakerConfig| Breaker::new("x", c).expect_err("invalid").0;
    assert_eq!(
        bad(BreakerConfig {
            failure_rate: 0.0,
            ..Default::default()
        }),
        "failure_rate"
    );
    assert_eq!(
        bad(BreakerConfig {
            slow_call_rate: 120.0,
            ..Default::default()
        }),
        "slow_call_rate"
    );
    assert_eq!(
        bad(BreakerConfig {
            window_size: 0,
            ..Default::default()
        }),
        "window_size"
    );
    assert_eq!(
        bad(BreakerConfig {
            half_open_calls: 0,
            ..Default::default()
        }),
        "half_open_calls"
    );
    assert_eq!(
        bad(BreakerConfig {
            consecutive_failures: Some(0),
            ..Default::default()
        }),
        "consecutive_failures"
    );
    assert_eq!(
        bad(BreakerConfig {
            open_wait_max: Duration::from_secs(1),
            ..Default::default()
        }),
        "open_wait_max"
    );
}
