//! What counts as a failure.
//!
//! Breakers and fallbacks ask a [`Classify`] whether a result was a success, a
//! failure, or neither (a rejection by our own policies, which says nothing about the
//! upstream). [`HttpClassifier`] is the default for HTTP: 5xx and 429 responses,
//! timeouts and connection errors are failures; other 4xx are the caller's problem and
//! count as successes of the upstream.

use crate::error::{BoxError, InjectedFault, is_caused_by, is_rejection};

/// The verdict on one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream did its job.
    Success,
    /// The upstream failed.
    Failure,
    /// Not the upstream's doing (e.g. our bulkhead refused the call): not recorded.
    Ignored,
}

/// Classifies results of a service with response type `Res`.
///
/// ```
/// use trellis_resilience::classify::{Classify, Outcome};
/// use trellis_resilience::BoxError;
///
/// /// Counts only errors, never responses, as failures.
/// #[derive(Clone)]
/// struct ErrorsOnly;
///
/// impl<Res> Classify<Res> for ErrorsOnly {
///     fn classify(&self, result: Result<&Res, &BoxError>) -> Outcome {
///         if result.is_ok() { Outcome::Success } else { Outcome::Failure }
///     }
/// }
/// ```
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// The verdict on `result`.
    fn classify(&self, result: Result<&Res, &BoxError>) -> Outcome;
}

/// For any service: `Ok` is a success, an error a failure, our own rejections ignored.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsAreFailures;

impl<Res> Classify<Res> for ErrorsAreFailures {
    fn classify(&self, result: Result<&Res, &BoxError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) if is_rejection(&**e) => Outcome::Ignored,
            Err(_) => Outcome::Failure,
        }
    }
}

/// The default for HTTP: 5xx and 429 responses and every error (timeouts, connection
/// errors, injected faults) are failures; other responses are successes; our own
/// rejections are ignored.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpClassifier;

impl HttpClassifier {
    /// Whether a response status counts as an upstream failure.
    pub fn is_failure_status(status: http::StatusCode) -> bool {
        status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS
    }
}

impl<B> Classify<http::Response<B>> for HttpClassifier {
    fn classify(&self, result: Result<&http::Response<B>, &BoxError>) -> Outcome {
        match result {
            Ok(response) if Self::is_failure_status(response.status()) => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(e) if is_rejection(&**e) => Outcome::Ignored,
            Err(e) if is_caused_by::<InjectedFault>(&**e) => Outcome::Failure,
            Err(_) => Outcome::Failure,
        }
    }
}

#[cfg(test)]
mod test {
    use std::time::Duration;

    use super::*;
    use crate::error::{BulkheadFull, Timeout, TimeoutKind};

    fn response(status: u16) -> http::Response<()> {
        http::Response::builder()
            .status(status)
            .body(())
            .expect("response")
    }

    #[test]
    fn http_defaults() {
        let c = HttpClassifier;
        for (status, outcome) in [
            (200, Outcome::Success),
            (404, Outcome::Success),
            (409, Outcome::Success),
            (429, Outcome::Failure),
            (500, Outcome::Failure),
            (503, Outcome::Failure),
        ] {
            assert_eq!(c.classify(Ok(&response(status))), outcome, "{status}");
        }
        let timeout: BoxError = Box::new(Timeout {
            kind: TimeoutKind::Attempt,
            after: Duration::from_secs(1),
        });
        assert_eq!(
            Classify::<http::Response<()>>::classify(&c, Err(&timeout)),
            Outcome::Failure
        );
        let full: BoxError = Box::new(BulkheadFull {
            name: "b".into(),
            retry_after: Duration::ZERO,
        });
        assert_eq!(
            Classify::<http::Response<()>>::classify(&c, Err(&full)),
            Outcome::Ignored
        );
    }
}
