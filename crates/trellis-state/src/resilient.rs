//! Resilience policies around a state store (`[resiliency.targets.components."state.<name>"]`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use trellis_resilience::breaker::Breaker;
use trellis_resilience::bulkhead::Bulkhead;
use trellis_resilience::classify::Outcome;
use trellis_resilience::error::{InjectedFault, Timeout, TimeoutKind};
use trellis_resilience::fault::Faults;
use trellis_resilience::retry::{RetryBudget, RetryConfig};

use crate::{
    ETag, Item, Key, Operation, Page, Precondition, StateError, StateStore, Value, WriteOptions,
};

/// The policies guarding one store. All optional.
#[derive(Debug, Default)]
pub struct ComponentPolicies {
    /// Bounds each attempt.
    pub attempt_timeout: Option<Duration>,
    /// Bounds the whole operation, retries included.
    pub overall_timeout: Option<Duration>,
    /// Retries of idempotent operations that found the backend unavailable.
    pub retry: Option<RetryConfig>,
    /// Stops calling a failing backend.
    pub breaker: Option<Breaker>,
    /// Bounds concurrent operations.
    pub bulkhead: Option<Bulkhead>,
    /// Chaos: failures show up as `Unavailable`.
    pub faults: Option<Faults>,
}

/// A state store behind resilience policies, applied in the same order as for HTTP
/// targets: overall timeout → retry → breaker → bulkhead → attempt timeout → faults.
///
/// Only an unreachable or failing backend counts against the breaker and is retried:
/// a failed precondition is a correct answer. Reads and unconditional writes are
/// retried; conditional writes and transactions are not (a retry after an unknown
/// outcome could report a conflict for a write that succeeded). Every refusal is
/// [`StateError::Unavailable`] with the policy's error as its source, so the HTTP
/// layer answers `503` with the right code and `Retry-After`.
#[derive(Debug)]
pub struct ResilientStore {
    inner: Arc<dyn StateStore>,
    policies: ComponentPolicies,
    budget: Option<Arc<RetryBudget>>,
    /// A std `Mutex`: one draw per retry, never held across an `.await`.
    rng: Mutex<fastrand::Rng>,
}

impl ResilientStore {
    /// Guards `inner` (named `name` for metrics) with `policies`.
    pub fn new(name: &str, inner: Arc<dyn StateStore>, policies: ComponentPolicies) -> Self {
        let budget = policies
            .retry
            .as_ref()
            .and_then(|r| r.budget)
            .map(|b| Arc::new(RetryBudget::new(name, b)));
        Self {
            inner,
            policies,
            budget,
            rng: Mutex::new(fastrand::Rng::new()),
        }
    }

    /// The retry budget, if retries are configured with one.
    pub fn budget(&self) -> Option<&Arc<RetryBudget>> {
        self.budget.as_ref()
    }

    fn unavailable(&self, e: impl std::error::Error + Send + Sync + 'static) -> StateError {
        StateError::unavailable(self.inner.backend(), e)
    }

    async fn guarded<T, F, Fut>(&self, retryable: bool, op: F) -> Result<T, StateError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StateError>>,
    {
        let attempts = async {
            if let Some(budget) = &self.budget {
                budget.deposit();
            }
            let mut attempt = 1;
            let mut previous = Duration::ZERO;
            loop {
                let result = self.attempt(&op).await;
                let Some(retry) = &self.policies.retry else {
                    return result;
                };
                let worth_it = retryable
                    && attempt < retry.max_attempts
                    && matches!(&result, Err(StateError::Unavailable { source, .. }) if !trellis_resilience::error::is_rejection(&**source));
                if !worth_it || self.budget.as_ref().is_some_and(|b| !b.withdraw()) {
                    return result;
                }
                let delay = {
                    let mut rng = self
                        .rng
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    retry.backoff.delay(attempt, previous, &mut rng)
                };
                tokio::time::sleep(delay).await;
                previous = delay;
                attempt += 1;
            }
        };
        match self.policies.overall_timeout {
            Some(after) => tokio::time::timeout(after, attempts)
                .await
                .unwrap_or_else(|_| {
                    Err(self.unavailable(Timeout {
                        kind: TimeoutKind::Overall,
                        after,
                    }))
                }),
            None => attempts.await,
        }
    }

    async fn attempt<T, F, Fut>(&self, op: &F) -> Result<T, StateError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StateError>>,
    {
        let _slot = match &self.policies.bulkhead {
            Some(b) => Some(b.acquire().await.map_err(|e| self.unavailable(e))?),
            None => None,
        };
        let permit = match &self.policies.breaker {
            Some(b) => Some(b.try_acquire().map_err(|e| self.unavailable(e))?),
            None => None,
        };
        let result = async {
            if let Some(faults) = &self.policies.faults {
                let (delay, abort) = faults.draw();
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                if let Some(status) = abort {
                    return Err(self.unavailable(InjectedFault { status }));
                }
            }
            match self.policies.attempt_timeout {
                Some(after) => tokio::time::timeout(after, op()).await.unwrap_or_else(|_| {
                    Err(self.unavailable(Timeout {
                        kind: TimeoutKind::Attempt,
                        after,
                    }))
                }),
                None => op().await,
            }
        }
        .await;
        if let Some(permit) = permit {
            permit.record(match &result {
                Err(StateError::Unavailable { .. } | StateError::Backend { .. }) => {
                    Outcome::Failure
                }
                _ => Outcome::Success,
            });
        }
        result
    }
}

#[async_trait]
impl StateStore for ResilientStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn get(&self, key: &Key) -> Result<Option<Item>, StateError> {
        self.guarded(true, || self.inner.get(key)).await
    }

    async fn set(
        &self,
        key: &Key,
        value: Value,
        options: WriteOptions,
    ) -> Result<ETag, StateError> {
        let retryable = options.precondition == Precondition::None;
        self.guarded(retryable, || {
            self.inner.set(key, value.clone(), options.clone())
        })
        .await
    }

    async fn delete(&self, key: &Key, precondition: Precondition) -> Result<bool, StateError> {
        let retryable = precondition == Precondition::None;
        self.guarded(retryable, || self.inner.delete(key, precondition.clone()))
            .await
    }

    async fn bulk_get(&self, keys: &[Key]) -> Result<Vec<Option<Item>>, StateError> {
        self.guarded(true, || self.inner.bulk_get(keys)).await
    }

    async fn transact(&self, operations: Vec<Operation>) -> Result<Vec<Option<ETag>>, StateError> {
        self.guarded(false, || self.inner.transact(operations.clone()))
            .await
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Page, StateError> {
        self.guarded(true, || self.inner.list(prefix, after, limit))
            .await
    }

    async fn health(&self) -> Result<(), StateError> {
        // Readiness must see the backend itself, not the breaker's opinion of it.
        self.inner.health().await
    }

    async fn close(&self) -> Result<(), StateError> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod test {
    use std::sync::atomic::{AtomicU32, Ordering};

    use trellis_core::config::resiliency::{Backoff, BackoffKind, BreakerConfig, Jitter};

    use super::*;

    /// A store whose gets fail with `Unavailable` `failures` times, then succeed.
    #[derive(Debug)]
    struct Flaky {
        calls: AtomicU32,
        failures: u32,
    }

    #[async_trait]
    impl StateStore for Flaky {
        fn backend(&self) -> &'static str {
            "flaky"
        }
        async fn get(&self, _key: &Key) -> Result<Option<Item>, StateError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.failures {
                return Err(StateError::unavailable("flaky", "down"));
            }
            Ok(None)
        }
        async fn set(&self, _: &Key, _: Value, _: WriteOptions) -> Result<ETag, StateError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Err(StateError::EtagMismatch { key: "k".into() })
        }
        async fn delete(&self, _: &Key, _: Precondition) -> Result<bool, StateError> {
            Ok(false)
        }
        async fn transact(&self, _: Vec<Operation>) -> Result<Vec<Option<ETag>>, StateError> {
            Ok(Vec::new())
        }
        async fn list(&self, _: &str, _: Option<&Key>, _: usize) -> Result<Page, StateError> {
            Ok(Page::default())
        }
        async fn health(&self) -> Result<(), StateError> {
            Ok(())
        }
        async fn close(&self) -> Result<(), StateError> {
            Ok(())
        }
    }

    fn flaky(failures: u32) -> Arc<Flaky> {
        Arc::new(Flaky {
            calls: AtomicU32::new(0),
            failures,
        })
    }

    fn retry() -> RetryConfig {
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
        }
    }

    fn key() -> Key {
        Key::new("k").expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn reads_are_retried_when_the_backend_is_unavailable() {
        let inner = flaky(2);
        let store = ResilientStore::new(
            "t",
            inner.clone(),
            ComponentPolicies {
                retry: Some(retry()),
                ..Default::default()
            },
        );
        assert_eq!(store.get(&key()).await.expect("third time lucky"), None);
        assert_eq!(inner.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn precondition_failures_are_answers_not_failures() {
        let inner = flaky(0);
        let breaker = Breaker::new(
            "t",
            BreakerConfig {
                window_size: 2,
                minimum_calls: 2,
                ..Default::default()
            },
        )
        .expect("valid");
        let store = ResilientStore::new(
            "t",
            inner.clone(),
            ComponentPolicies {
                retry: Some(retry()),
                breaker: Some(breaker.clone()),
                ..Default::default()
            },
        );
        for _ in 0..5 {
            let r = store
                .set(&key(), Value::bytes("v"), WriteOptions::default())
                .await;
            assert!(matches!(r, Err(StateError::EtagMismatch { .. })));
        }
        assert_eq!(inner.calls.load(Ordering::SeqCst), 5, "not retried");
        assert_eq!(
            breaker.state(),
            trellis_resilience::breaker::BreakerState::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_refuses_with_unavailable() {
        let inner = flaky(100);
        let breaker = Breaker::new(
            "t",
            BreakerConfig {
                window_size: 2,
                minimum_calls: 2,
                ..Default::default()
            },
        )
        .expect("valid");
        let store = ResilientStore::new(
            "t",
            inner.clone(),
            ComponentPolicies {
                breaker: Some(breaker),
                ..Default::default()
            },
        );
        for _ in 0..2 {
            assert!(store.get(&key()).await.is_err());
        }
        match store.get(&key()).await {
            Err(StateError::Unavailable { source, .. }) => {
                assert!(source.is::<trellis_resilience::error::CircuitOpen>())
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(inner.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_bound_each_attempt_and_the_whole() {
        #[derive(Debug)]
        struct Stuck;
        #[async_trait]
        impl StateStore for Stuck {
            fn backend(&self) -> &'static str {
                "stuck"
            }
            async fn get(&self, _: &Key) -> Result<Option<Item>, StateError> {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(None)
            }
            async fn set(&self, _: &Key, _: Value, _: WriteOptions) -> Result<ETag, StateError> {
                unreachable!()
            }
            async fn delete(&self, _: &Key, _: Precondition) -> Result<bool, StateError> {
                unreachable!()
            }
            async fn transact(&self, _: Vec<Operation>) -> Result<Vec<Option<ETag>>, StateError> {
                unreachable!()
            }
            async fn list(&self, _: &str, _: Option<&Key>, _: usize) -> Result<Page, StateError> {
                unreachable!()
            }
            async fn health(&self) -> Result<(), StateError> {
                Ok(())
            }
            async fn close(&self) -> Result<(), StateError> {
                Ok(())
            }
        }
        let store = ResilientStore::new(
            "t",
            Arc::new(Stuck),
            ComponentPolicies {
                attempt_timeout: Some(Duration::from_millis(100)),
                overall_timeout: Some(Duration::from_millis(250)),
                retry: Some(retry()),
                ..Default::default()
            },
        );
        let started = tokio::time::Instant::now();
        let err = store.get(&key()).await.expect_err("times out");
        // 100ms + 10ms + 100ms + 10ms, then the overall deadline at 250ms.
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        match err {
            StateError::Unavailable { source, .. } => {
                assert_eq!(
                    source.downcast_ref::<Timeout>().map(|t| t.kind),
                    Some(TimeoutKind::Overall)
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
