//! Every way an invocation fails, with the status and stable code the HTTP API
//! answers it with.

use std::time::Duration;

use http::StatusCode;
use trellis_resilience::BoxError;
use trellis_resilience::error::{
    BulkheadFull, CircuitOpen, InjectedFault, RateLimited, Timeout, cause_ref,
};

/// No instance of the app is available: none configured, all failing their health
/// checks, or all ejected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no healthy instance of {app:?}")]
pub struct NoHealthyUpstream {
    /// The app.
    pub app: String,
}

/// A request pinned to one instance ([`PinnedInstance`](crate::PinnedInstance)) can't
/// go there: it is not an instance of the app, fails its health checks, or is
/// ejected. Never sent elsewhere: the caller chose the instance for a reason.
#[derive(Debug, Clone, thiserror::Error)]
#[error("instance {instance} of {app:?} is unavailable: {reason}")]
pub struct InstanceUnavailable {
    /// The app.
    pub app: String,
    /// The instance asked for.
    pub instance: String,
    /// Why: `not an instance of the app`, `failing health checks` or `ejected`.
    pub reason: &'static str,
}

/// The upstream connection failed after the request was (possibly) sent.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream {instance} failed: {reason}")]
pub(crate) struct UpstreamError {
    pub(crate) instance: String,
    pub(crate) reason: String,
}

/// Why an invocation failed. The upstream's own 4xx/5xx answers are *not* errors:
/// they are passed through unchanged.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No app by that name is configured.
    #[error("no app {0:?} is configured")]
    AppNotFound(String),
    /// The call failed in a policy or in transport.
    #[error(transparent)]
    Failed(BoxError),
}

impl InvokeError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    /// The stable problem code.
    pub fn code(&self) -> &'static str {
        self.classify().1
    }

    /// The `Retry-After` to send, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        let Self::Failed(e) = self else { return None };
        let e = &**e;
        cause_ref::<CircuitOpen>(e)
            .map(|c| c.retry_after)
            .or_else(|| cause_ref::<BulkheadFull>(e).map(|b| b.retry_after))
            .or_else(|| cause_ref::<RateLimited>(e).map(|r| r.retry_after))
            .or_else(|| cause_ref::<NoHealthyUpstream>(e).map(|_| Duration::from_secs(1)))
            .or_else(|| cause_ref::<InstanceUnavailable>(e).map(|_| Duration::from_secs(1)))
    }

    fn classify(&self) -> (StatusCode, &'static str) {
        let e = match self {
            Self::AppNotFound(_) => return (StatusCode::NOT_FOUND, "app_not_found"),
            Self::Failed(e) => &**e,
        };
        if cause_ref::<CircuitOpen>(e).is_some() {
            (StatusCode::SERVICE_UNAVAILABLE, "circuit_open")
        } else if cause_ref::<BulkheadFull>(e).is_some() {
            (StatusCode::SERVICE_UNAVAILABLE, "bulkhead_full")
        } else if cause_ref::<RateLimited>(e).is_some() {
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
        } else if cause_ref::<NoHealthyUpstream>(e).is_some() {
            (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_upstream")
        } else if cause_ref::<InstanceUnavailable>(e).is_some() {
            (StatusCode::SERVICE_UNAVAILABLE, "instance_unavailable")
        } else if cause_ref::<Timeout>(e).is_some() {
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
        } else if let Some(fault) = cause_ref::<InjectedFault>(e) {
            (
                StatusCode::from_u16(fault.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "fault_injected",
            )
        } else {
            // Connection refused or reset, or the upstream broke off mid-answer.
            (StatusCode::BAD_GATEWAY, "upstream_unavailable")
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use trellis_resilience::error::{ConnectError, TimeoutKind};

    #[test]
    fn statuses_and_codes() {
        let failed = |e: BoxError| InvokeError::Failed(e);
        let cases: Vec<(InvokeError, u16, &str)> = vec![
            (InvokeError::AppNotFound("x".into()), 404, "app_not_found"),
            (
                failed(Box::new(NoHealthyUpstream { app: "x".into() })),
                503,
                "no_healthy_upstream",
            ),
            (
                failed(Box::new(InstanceUnavailable {
                    app: "x".into(),
                    instance: "http://10.0.0.1:80".into(),
                    reason: "ejected",
                })),
                503,
                "instance_unavailable",
            ),
            (
                failed(Box::new(CircuitOpen {
                    name: "b".into(),
                    retry_after: Duration::from_secs(7),
                })),
                503,
                "circuit_open",
            ),
            (
                failed(Box::new(BulkheadFull {
                    name: "b".into(),
                    retry_after: Duration::from_secs(1),
                })),
                503,
                "bulkhead_full",
            ),
            (
                failed(Box::new(RateLimited {
                    name: "r".into(),
                    retry_after: Duration::from_secs(2),
                })),
                429,
                "rate_limited",
            ),
            (
                failed(Box::new(Timeout {
                    kind: TimeoutKind::Attempt,
                    after: Duration::from_secs(1),
                })),
                504,
                "upstream_timeout",
            ),
            (
                failed(Box::new(ConnectError("refused".into()))),
                502,
                "upstream_unavailable",
            ),
            (
                failed(Box::new(InjectedFault { status: 500 })),
                500,
                "fault_injected",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status().as_u16(), e.code()), (status, code), "{e}");
        }
        let open = failed(Box::new(CircuitOpen {
            name: "b".into(),
            retry_after: Duration::from_secs(7),
        }));
        assert_eq!(open.retry_after(), Some(Duration::from_secs(7)));
    }
}
