//! A failing projection backs off on `tokio::time`: with the clock paused, the
//! pauses between attempts take no real time, and the virtual time they took is at
//! least the backoff schedule. (Not exactly: while the embedded stores' writer
//! thread fsyncs, the idle runtime may auto-advance to its next timer.)

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::{Flaky, embedded, seed_account, triangle, view_entries};
use tokio::time::Instant;
use trellis_cqrs::{ProjectionRunner, ProjectionState};

#[tokio::test(start_paused = true)]
async fn a_failing_projection_backs_off_then_recovers() {
    let b = embedded().await.expect("embedded");
    let end = seed_account(&b.events, "slow", 10).await;
    let handle = ProjectionRunner::builder(Flaky::new(4))
        .retry_backoff(Duration::from_secs(1), Duration::from_secs(4))
        .build(Arc::clone(&b.events), Arc::clone(&b.state))
        .expect("build")
        .spawn();
    let started = Instant::now();
    let mut changes = handle.runner().status_changes();
    let failing = changes
        .wait_for(|s| matches!(s.state, ProjectionState::Failing { .. }))
        .await
        .expect("status")
        .clone();
    assert_eq!(failing.checkpoint, 0, "nothing committed while failing");
    assert_eq!(failing.lag, end, "the lag shows while failing");
    let status = changes
        .wait_for(|s| s.checkpoint >= end && s.state == ProjectionState::Live)
        .await
        .expect("status")
        .clone();
    // Four failures: pauses of 1, 2, 4 and 4 (the cap) seconds.
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(11), "{waited:?}");
    assert_eq!(
        status.last_error.as_deref(),
        Some("the downstream lookup is unavailable")
    );
    let view = view_entries(&b.state, "projections/flaky/").await;
    assert_eq!(
        view["totals"],
        json!({"events": 11, "deposited": triangle(10)})
    );
    handle.stop().await;
}
