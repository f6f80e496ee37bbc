//! Bulkhead: a bounded number of concurrent calls, a bounded queue of callers waiting
//! for a slot, and a bound on how long they wait — so one slow upstream ties up only
//! its own share of the sidecar, never all of it.
//!
//! A call that finds every slot taken and the queue full is refused at once with
//! [`BulkheadFull`]; one that waits longer than `max_wait` is refused then. The HTTP
//! layer answers both with 503 `bulkhead_full` and `Retry-After`. Stack two layers to
//! get a per-target limit under a global one, as an API gateway does.
//!
//! ```
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use trellis_resilience::bulkhead::{Bulkhead, BulkheadConfig, BulkheadLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let config = BulkheadConfig { max_concurrent: 10, max_queue: 20, max_wait: Duration::from_millis(500) };
//! let bulkhead = Bulkhead::new("payments", config).expect("valid");
//! let mut service = ServiceBuilder::new()
//!     .layer(BulkheadLayer::new(bulkhead.clone()))
//!     .service_fn(|n: u32| async move { Ok::<_, std::convert::Infallible>(n * 2) });
//! assert_eq!(service.ready().await.unwrap().call(21).await.unwrap(), 42);
//! assert_eq!(bulkhead.snapshot().in_use, 0);
//! # }
//! ```
//!
//! [`BulkheadFull`]: crate::error::BulkheadFull

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service, ServiceExt};

pub use trellis_core::config::resiliency::BulkheadConfig;

use crate::error::{BoxError, BulkheadFull};

/// Occupancy of a bulkhead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BulkheadSnapshot {
    /// The bulkhead's name.
    pub name: String,
    /// Slots in use.
    pub in_use: u32,
    /// Slots in all.
    pub max_concurrent: u32,
    /// Callers waiting.
    pub waiting: u32,
    /// Waiting places in all.
    pub max_queue: u32,
}

#[derive(Debug)]
struct Shared {
    name: String,
    config: BulkheadConfig,
    slots: Arc<Semaphore>,
    /// Callers currently waiting for a slot; bounded by `max_queue`.
    waiting: AtomicU32,
    rejected: metrics::Counter,
    in_use: metrics::Gauge,
}

/// A bulkhead, shared by every clone.
#[derive(Debug, Clone)]
pub struct Bulkhead {
    shared: Arc<Shared>,
}

/// A slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.in_use.decrement(1.0);
    }
}

/// Decrements the waiting count however the wait ends (slot, timeout, cancellation).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bulkhead {
    /// A bulkhead named `name`.
    ///
    /// # Errors
    /// The config's first broken rule.
    pub fn new(
        name: impl Into<String>,
        config: BulkheadConfig,
    ) -> Result<Self, (&'static str, String)> {
        config.validate()?;
        let name = name.into();
        Ok(Self {
            shared: Arc::new(Shared {
                slots: Arc::new(Semaphore::new(config.max_concurrent as usize)),
                waiting: AtomicU32::new(0),
                rejected: metrics::counter!("trellis_bulkhead_rejected_total", "bulkhead" => name.clone()),
                in_use: metrics::gauge!("trellis_bulkhead_in_use", "bulkhead" => name.clone()),
                name,
                config,
            }),
        })
    }

    /// Takes a slot, waiting (in FIFO order) if the queue has room.
    ///
    /// # Errors
    /// [`BulkheadFull`] if the queue is full or the wait exceeds `max_wait`.
    pub async fn acquire(&self) -> Result<Slot, BulkheadFull> {
        let shared = &self.shared;
        // The semaphore is fair: with callers queued, no permit is "available", so
        // a newcomer can't overtake them here.
        if let Ok(permit) = Arc::clone(&shared.slots).try_acquire_owned() {
            return Ok(self.slot(permit));
        }
        let queued = shared.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&shared.waiting);
        if queued >= shared.config.max_queue {
            return Err(self.full());
        }
        match tokio::time::timeout(
            shared.config.max_wait,
            Arc::clone(&shared.slots).acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(self.slot(permit)),
            // Timed out (the semaphore is never closed).
            _ => Err(self.full()),
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.shared.in_use.increment(1.0);
        Slot {
            _permit: permit,
            shared: Arc::clone(&self.shared),
        }
    }

    fn full(&self) -> BulkheadFull {
        self.shared.rejected.increment(1);
        BulkheadFull {
            name: self.shared.name.clone(),
            retry_after: self.shared.config.max_wait.max(Duration::from_secs(1)),
        }
    }

    /// Current occupancy.
    pub fn snapshot(&self) -> BulkheadSnapshot {
        let config = &self.shared.config;
        let free = u32::try_from(self.shared.slots.available_permits()).unwrap_or(u32::MAX);
        BulkheadSnapshot {
            name: self.shared.name.clone(),
            in_use: config.max_concurrent.saturating_sub(free),
            max_concurrent: config.max_concurrent,
            waiting: self
                .shared
                .waiting
                .load(Ordering::Acquire)
                .min(config.max_queue),
            max_queue: config.max_queue,
        }
    }

    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

/// Wraps a service in a [`BulkheadService`].
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// Limits services with `bulkhead`.
    pub const fn new(bulkhead: Bulkhead) -> Self {
        Self { bulkhead }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService {
            inner,
            bulkhead: self.bulkhead.clone(),
        }
    }
}

/// A service behind a bulkhead. The slot is held until the inner call's future
/// completes (for HTTP: until the response head arrives).
#[derive(Debug, Clone)]
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
}

impl<S, Req> Service<Req> for BulkheadService<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness of the inner service is awaited once a slot is ours.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let bulkhead = self.bulkhead.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let _slot = bulkhead.acquire().await?;
            inner.oneshot(req).await.map_err(Into::into)
        })
    }
}

#[cfg(test)]
mod test {
    use std::time::Duration;

    use tokio::time::advance;

    use super::*;

    fn bulkhead(max_concurrent: u32, max_queue: u32, max_wait_ms: u64) -> Bulkhead {
        Bulkhead::new(
            "b",
            BulkheadConfig {
                max_concurrent,
                max_queue,
                max_wait: Duration::from_millis(max_wait_ms),
            },
        )
        .expect("valid")
    }

    #[tokio::test(start_paused = true)]
    async fn admits_queues_and_refuses() {
        let b = bulkhead(2, 1, 1000);
        let s1 = b.acquire().await.expect("slot 1");
        let _s2 = b.acquire().await.expect("slot 2");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.acquire().await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert_eq!(b.snapshot().waiting, 1);
        let err = b.acquire().await.expect_err("queue full");
        assert_eq!(err.retry_after, Duration::from_secs(1));
        assert_eq!(b.snapshot().waiting, 1, "the refused caller left the queue");

        drop(s1);
        waiter
            .await
            .expect("join")
            .expect("the queued caller got the freed slot");
        assert_eq!(
            b.snapshot(),
            BulkheadSnapshot {
                name: "b".into(),
                in_use: 1,
                max_concurrent: 2,
                waiting: 0,
                max_queue: 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded_by_max_wait() {
        let b = bulkhead(1, 5, 500);
        let _held = b.acquire().await.expect("slot");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.acquire().await.map(drop) }
        });
        tokio::task::yield_now().await;
        advance(Duration::from_millis(499)).await;
        assert!(!waiter.is_finished());
        advance(Duration::from_millis(1)).await;
        assert!(
            waiter.await.expect("join").is_err(),
            "gave up after max_wait"
        );
        assert_eq!(b.snapshot().waiting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_leave_the_queue() {
        let b = bulkhead(1, 1, 10_000);
        let _held = b.acquire().await.expect("slot");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.acquire().await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert_eq!(b.snapshot().waiting, 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(b.snapshot().waiting, 0);
        assert!(
            b.acquire().await.is_err(),
            "slot still held; queue free again but wait times out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_gets_exactly_capacity_plus_queue_through() {
        let b = bulkhead(3, 2, 1000);
        let service = BulkheadLayer::new(b.clone()).layer(tower::service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, BoxError>(())
        }));
        let calls: Vec<_> = (0..20)
            .map(|_| tokio::spawn(service.clone().oneshot(())))
            .collect();
        let mut ok = 0;
        let mut full = 0;
        for call in calls {
            match call.await.expect("join") {
                Ok(()) => ok += 1,
                Err(e) if e.is::<BulkheadFull>() => full += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((ok, full), (5, 15));
    }
}
