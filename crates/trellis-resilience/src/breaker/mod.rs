//! Circuit breaker: stop calling an upstream that keeps failing, so it can recover
//! and callers fail fast instead of piling up.
//!
//! # Why these knobs
//! A breaker that trips on *rates* over a sliding window ignores a lone failure in
//! a quiet minute; `minimum_calls` keeps it from tripping on the first two calls of
//! the day. `consecutive_failures` catches an upstream that went hard down before the
//! window fills. Slow calls count separately: an upstream answering in 30s is down as
//! far as its callers are concerned. After `open_wait` a few half-open trial calls
//! decide; a breaker that keeps re-tripping waits longer each time
//! (`open_wait_multiplier`, up to `open_wait_max`), so a dead upstream isn't probed at
//! a fixed rate forever.
//!
//! Transitions are [`BreakerEvent`]s ([`Breaker::subscribe`]), logged, and counted
//! in `trellis_breaker_transitions_total`; `trellis_breaker_state` is a gauge
//! (0 closed, 1 open, 2 half-open, 3 disabled, 4 forced open).
//!
//! ```
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use trellis_resilience::breaker::{Breaker, BreakerConfig, CircuitBreakerLayer};
//! use trellis_resilience::classify::ErrorsAreFailures;
//! use trellis_resilience::error::CircuitOpen;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let config = BreakerConfig { window_size: 4, minimum_calls: 4, ..Default::default() };
//! let breaker = Breaker::new("flaky", config).expect("valid config");
//! let mut service = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new(breaker.clone(), ErrorsAreFailures))
//!     .service_fn(|_: ()| async { Err::<(), _>("upstream down") });
//!
//! for _ in 0..4 {
//!     let _ = service.ready().await.unwrap().call(()).await;
//! }
//! let err = service.ready().await.unwrap().call(()).await.unwrap_err();
//! assert!(err.is::<CircuitOpen>());
//! # }
//! ```

mod service;
mod state;
mod window;

#[cfg(test)]
mod test;

pub use service::{CircuitBreaker, CircuitBreakerLayer, ResponseFuture};
pub use state::{Breaker, BreakerEvent, BreakerSnapshot, BreakerState, Permit};
pub use trellis_core::config::resiliency::{BreakerConfig, Mode, WindowKind};
pub use window::Stats;
