//! Fallback: answer a failed call with a fixed response instead of an error — a cached
//! default, an empty list, a friendly 503 — so callers degrade instead of breaking.
//!
//! ```
//! use tower::{ServiceBuilder, ServiceExt};
//! use trellis_resilience::fallback::{FallbackConfig, FallbackLayer, HttpFallback};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let fallback = HttpFallback::new("catalog", FallbackConfig { status: 200, body: "[]".into(), ..Default::default() });
//! let service = ServiceBuilder::new()
//!     .layer(FallbackLayer::new(fallback))
//!     .service_fn(|_: ()| async { Err::<http::Response<bytes::Bytes>, _>("down") });
//! let response = service.oneshot(()).await.unwrap();
//! assert_eq!((response.status().as_u16(), &response.body()[..]), (200, &b"[]"[..]));
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

pub use trellis_core::config::resiliency::FallbackConfig;

use crate::classify::{Classify, HttpClassifier, Outcome};
use crate::error::BoxError;

/// Produces a replacement for a failed result.
pub trait Fallback<Res>: Clone + Send + Sync + 'static {
    /// The replacement, or `None` to keep `result`.
    fn fallback(&self, result: Result<&Res, &BoxError>) -> Option<Res>;
}

/// Replaces HTTP failures — errors (rejections included: an open breaker is the
/// classic case) and 5xx/429 responses — with a fixed response, marked with an
/// `x-trellis-fallback: <name>` header.
#[derive(Debug, Clone)]
pub struct HttpFallback {
    name: http::HeaderValue,
    status: http::StatusCode,
    content_type: http::HeaderValue,
    body: Bytes,
    used: metrics::Counter,
}

impl HttpFallback {
    /// A fallback named `name` (the config must be valid; invalid parts fall back to
    /// 503 and `application/octet-stream`).
    pub fn new(name: &str, config: FallbackConfig) -> Self {
        Self {
            name: http::HeaderValue::from_str(name)
                .unwrap_or(http::HeaderValue::from_static("fallback")),
            status: http::StatusCode::from_u16(config.status)
                .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE),
            content_type: http::HeaderValue::from_str(&config.content_type)
                .unwrap_or(http::HeaderValue::from_static("application/octet-stream")),
            body: Bytes::from(config.body),
            used: metrics::counter!("trellis_fallbacks_total", "fallback" => name.to_owned()),
        }
    }
}

impl<B: From<Bytes> + Send + 'static> Fallback<http::Response<B>> for HttpFallback {
    fn fallback(&self, result: Result<&http::Response<B>, &BoxError>) -> Option<http::Response<B>> {
        let failed = result.is_err() || HttpClassifier.classify(result) == Outcome::Failure;
        if !failed {
            return None;
        }
        self.used.increment(1);
        let mut response = http::Response::new(B::from(self.body.clone()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, self.content_type.clone());
        headers.insert("x-trellis-fallback", self.name.clone());
        Some(response)
    }
}

/// Wraps a service in a [`FallbackService`].
#[derive(Debug, Clone)]
pub struct FallbackLayer<F> {
    fallback: F,
}

impl<F> FallbackLayer<F> {
    /// Replaces failures using `fallback`.
    pub const fn new(fallback: F) -> Self {
        Self { fallback }
    }
}

impl<S, F: Clone> Layer<S> for FallbackLayer<F> {
    type Service = FallbackService<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        FallbackService {
            inner,
            fallback: self.fallback.clone(),
        }
    }
}

/// A service whose failures are replaced by a fallback.
#[derive(Debug, Clone)]
pub struct FallbackService<S, F> {
    inner: S,
    fallback: F,
}

impl<S, F, Req> Service<Req> for FallbackService<S, F>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    F: Fallback<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, F>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // An inner that can't get ready is a failure too; but readiness errors have
        // no request to answer, so they pass through.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ResponseFuture {
            future: self.inner.call(req),
            fallback: self.fallback.clone(),
        }
    }
}

pin_project! {
    /// The future of a [`FallbackService`] call.
    #[derive(Debug)]
    pub struct ResponseFuture<Fut, F> {
        #[pin]
        future: Fut,
        fallback: F,
    }
}

impl<Fut, F, T, E> Future for ResponseFuture<Fut, F>
where
    Fut: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    F: Fallback<T>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.future.poll(cx)).map_err(Into::into);
        Poll::Ready(match this.fallback.fallback(result.as_ref()) {
            Some(replacement) => Ok(replacement),
            None => result,
        })
    }
}

#[cfg(test)]
mod test {
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn replaces_errors_and_failure_statuses_only() {
        let fallback = HttpFallback::new(
            "f",
            FallbackConfig {
                status: 200,
                body: "cached".into(),
                content_type: "text/plain".into(),
            },
        );
        let service = |status: u16, fail: bool| {
            FallbackLayer::new(fallback.clone()).layer(tower::service_fn(move |_: ()| async move {
                if fail {
                    return Err::<http::Response<Bytes>, BoxError>("down".into());
                }
                Ok(http::Response::builder()
                    .status(status)
                    .body(Bytes::from("real"))
                    .expect("response"))
            }))
        };
        for (status, fail, expect_fallback) in [
            (200, false, false),
            (404, false, false),
            (503, false, true),
            (429, false, true),
            (0, true, true),
        ] {
            let r = service(status, fail)
                .oneshot(())
                .await
                .expect("never an error");
            assert_eq!(
                r.headers().contains_key("x-trellis-fallback"),
                expect_fallback,
                "{status} {fail}"
            );
            if expect_fallback {
                assert_eq!(
                    (
                        r.status().as_u16(),
                        &r.body()[..],
                        r.headers()["content-type"].as_bytes()
                    ),
                    (200, &b"cached"[..], &b"text/plain"[..])
                );
            }
        }
    }
}
