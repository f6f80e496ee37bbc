//! Deadlines: per attempt (innermost) and overall (outermost), both this one layer.
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//! use trellis_resilience::error::{Timeout, TimeoutKind};
//! use trellis_resilience::timeout::TimeoutLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let service = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_millis(10), TimeoutKind::Attempt))
//!     .service_fn(|_: ()| async {
//!         tokio::time::sleep(Duration::from_secs(1)).await;
//!         Ok::<_, std::convert::Infallible>(())
//!     });
//! let err = service.oneshot(()).await.unwrap_err();
//! assert_eq!(err.downcast_ref::<Timeout>().map(|t| t.kind), Some(TimeoutKind::Attempt));
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::{BoxError, Timeout, TimeoutKind};

/// Bounds calls to `after`.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    after: Duration,
    kind: TimeoutKind,
}

impl TimeoutLayer {
    /// Fails calls taking longer than `after` with a [`Timeout`] of `kind`.
    pub const fn new(after: Duration, kind: TimeoutKind) -> Self {
        Self { after, kind }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = TimeoutService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TimeoutService {
            inner,
            after: self.after,
            kind: self.kind,
        }
    }
}

/// A service whose calls fail with [`Timeout`] after a deadline; the inner call is
/// dropped (cancelled) then.
#[derive(Debug, Clone)]
pub struct TimeoutService<S> {
    inner: S,
    after: Duration,
    kind: TimeoutKind,
}

impl<S, Req> Service<Req> for TimeoutService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            future: self.inner.call(req),
            sleep: tokio::time::sleep(self.after),
            error: Timeout {
                kind: self.kind,
                after: self.after,
            },
        }
    }
}

pin_project! {
    /// The future of a [`TimeoutService`] call.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        future: F,
        #[pin]
        sleep: Sleep,
        error: Timeout,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.future.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(this.error.clone().into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod test {
    use tower::ServiceExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn completes_or_times_out_exactly_at_the_deadline() {
        let slow = |ms: u64| {
            TimeoutLayer::new(Duration::from_millis(100), TimeoutKind::Overall).layer(
                tower::service_fn(move |_: ()| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<_, BoxError>(ms)
                }),
            )
        };
        assert_eq!(slow(99).oneshot(()).await.expect("in time"), 99);
        let started = tokio::time::Instant::now();
        let err = slow(101).oneshot(()).await.expect_err("late");
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(
            err.downcast_ref::<Timeout>().map(|t| t.kind),
            Some(TimeoutKind::Overall)
        );
    }
}
