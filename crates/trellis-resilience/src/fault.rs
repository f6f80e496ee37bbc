//! Fault injection for chaos testing: delay a percentage of calls, abort a percentage
//! with a status. Off unless configured, and switchable at runtime ([`Faults::set`])
//! so a running system can be made to misbehave on demand — and healed again.
//!
//! Injected innermost, a fault looks to every other policy exactly like the upstream
//! misbehaving: aborts count as failures for breakers, are retried like the status
//! they carry, and delays run into attempt timeouts.
//!
//! ```
//! use tower::{ServiceBuilder, ServiceExt};
//! use trellis_resilience::error::InjectedFault;
//! use trellis_resilience::fault::{FaultConfig, FaultLayer, Faults};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let faults = Faults::with_seed("payments", FaultConfig::default(), 1).expect("valid");
//! let service = ServiceBuilder::new()
//!     .layer(FaultLayer::new(faults.clone()))
//!     .service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>("ok") });
//! assert_eq!(service.clone().oneshot(()).await.unwrap(), "ok");
//!
//! faults.set(FaultConfig { abort_percent: 100.0, abort_status: 503, ..Default::default() }).expect("valid");
//! let err = service.oneshot(()).await.unwrap_err();
//! assert_eq!(err.downcast_ref::<InjectedFault>().map(|f| f.status), Some(503));
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt};

pub use trellis_core::config::resiliency::FaultConfig;

use crate::error::{BoxError, InjectedFault};

#[derive(Debug)]
struct Shared {
    name: String,
    config: RwLock<FaultConfig>,
    /// Seedable, so a chaos run can be replayed.
    rng: Mutex<fastrand::Rng>,
    delayed: metrics::Counter,
    aborted: metrics::Counter,
}

/// A switchable set of faults, shared by every clone.
#[derive(Debug, Clone)]
pub struct Faults {
    shared: Arc<Shared>,
}

impl Faults {
    /// Faults named `name`, random from entropy.
    ///
    /// # Errors
    /// The config's first broken rule.
    pub fn new(name: &str, config: FaultConfig) -> Result<Self, (&'static str, String)> {
        Self::with_seed(name, config, fastrand::u64(..))
    }

    /// Faults named `name` with a reproducible random sequence.
    ///
    /// # Errors
    /// The config's first broken rule.
    pub fn with_seed(
        name: &str,
        config: FaultConfig,
        seed: u64,
    ) -> Result<Self, (&'static str, String)> {
        config.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                config: RwLock::new(config),
                rng: Mutex::new(fastrand::Rng::with_seed(seed)),
                delayed: metrics::counter!("trellis_faults_injected_total", "fault" => name.to_owned(), "kind" => "delay"),
                aborted: metrics::counter!("trellis_faults_injected_total", "fault" => name.to_owned(), "kind" => "abort"),
            }),
        })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The current settings.
    pub fn get(&self) -> FaultConfig {
        *self
            .shared
            .config
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the settings, effective for the next call.
    ///
    /// # Errors
    /// The new config's first broken rule; the old one stays.
    pub fn set(&self, config: FaultConfig) -> Result<(), (&'static str, String)> {
        config.validate()?;
        *self
            .shared
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        tracing::warn!(fault = %self.shared.name, ?config, "fault injection changed");
        Ok(())
    }

    /// Draws the faults for one call: the delay to add and the status to abort with,
    /// each present with its configured probability. For callers that apply faults
    /// without the tower layer.
    pub fn draw(&self) -> (Option<Duration>, Option<u16>) {
        let config = self.get();
        if config.is_off() {
            return (None, None);
        }
        let mut rng = self
            .shared
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let delay = (rng.f64() * 100.0 < config.delay_percent).then_some(config.delay);
        let abort = (rng.f64() * 100.0 < config.abort_percent).then_some(config.abort_status);
        drop(rng);
        if delay.is_some() {
            self.shared.delayed.increment(1);
        }
        if abort.is_some() {
            self.shared.aborted.increment(1);
        }
        (delay, abort)
    }
}

/// Wraps a service in a [`FaultInjection`].
#[derive(Debug, Clone)]
pub struct FaultLayer {
    faults: Faults,
}

impl FaultLayer {
    /// Injects `faults`.
    pub const fn new(faults: Faults) -> Self {
        Self { faults }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultInjection<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultInjection {
            inner,
            faults: self.faults.clone(),
        }
    }
}

/// A service with faults injected in front of it.
#[derive(Debug, Clone)]
pub struct FaultInjection<S> {
    inner: S,
    faults: Faults,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, Req> Service<Req> for FaultInjection<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let kind = match self.faults.draw() {
            (None, None) => Kind::Called {
                future: self.inner.call(req),
            },
            (delay, abort) => {
                let fresh = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, fresh);
                Kind::Faulted {
                    future: Box::pin(async move {
                        if let Some(delay) = delay {
                            tokio::time::sleep(delay).await;
                        }
                        if let Some(status) = abort {
                            return Err(InjectedFault { status }.into());
                        }
                        inner.oneshot(req).await.map_err(Into::into)
                    }),
                }
            }
        };
        ResponseFuture { kind }
    }
}

pin_project! {
    /// The future of a [`FaultInjection`] call.
    pub struct ResponseFuture<F, T> {
        #[pin]
        kind: Kind<F, T>,
    }
}

pin_project! {
    #[project = KindProjection]
    enum Kind<F, T> {
        Called { #[pin] future: F },
        Faulted { future: BoxFuture<T> },
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
            KindProjection::Faulted { future } => future.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn service(
        faults: &Faults,
    ) -> FaultInjection<
        impl Service<(), Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static,
    > {
        FaultLayer::new(faults.clone())
            .layer(tower::service_fn(|_: ()| async { Ok::<_, BoxError>(()) }))
    }

    #[tokio::test(start_paused = true)]
    async fn percentages_hold_over_many_calls() {
        let faults = Faults::with_seed(
            "f",
            FaultConfig {
                abort_percent: 30.0,
                ..Default::default()
            },
            9,
        )
        .expect("valid");
        let svc = service(&faults);
        let mut aborted = 0;
        for _ in 0..10_000 {
            if svc.clone().oneshot(()).await.is_err() {
                aborted += 1;
            }
        }
        assert!(
            (2_700..=3_300).contains(&aborted),
            "{aborted} of 10000 at 30%"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn delays_and_runtime_switching() {
        let faults = Faults::with_seed("f", FaultConfig::default(), 1).expect("valid");
        let svc = service(&faults);
        let t = tokio::time::Instant::now();
        svc.clone().oneshot(()).await.expect("off: passes");
        assert_eq!(t.elapsed(), Duration::ZERO);
        faults
            .set(FaultConfig {
                delay_percent: 100.0,
                delay: Duration::from_millis(250),
                ..Default::default()
            })
            .expect("valid");
        svc.clone().oneshot(()).await.expect("delayed, not aborted");
        assert_eq!(t.elapsed(), Duration::from_millis(250));
        assert!(
            faults
                .set(FaultConfig {
                    abort_percent: 101.0,
                    ..Default::default()
                })
                .is_err()
        );
        assert_eq!(
            faults.get().delay_percent,
            100.0,
            "an invalid change keeps the old settings"
        );
    }
}
