//! Errors the policies return, each its own type so callers can downcast a
//! [`BoxError`] and map it (the HTTP layer turns them into problem+json).

use std::time::Duration;

/// The error type of every middleware here: the inner service's error or one of the
/// rejections below, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The circuit breaker is open (or forced open): the call was not attempted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("circuit breaker {name:?} is open; retry after {retry_after:?}")]
pub struct CircuitOpen {
    /// The breaker's name.
    pub name: String,
    /// When the breaker will let a trial call through.
    pub retry_after: Duration,
}

/// The bulkhead had no free slot and its wait queue was full, or the wait timed out.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bulkhead {name:?} is full")]
pub struct BulkheadFull {
    /// The bulkhead's name.
    pub name: String,
    /// A hint for clients: about how long a slot takes to free up.
    pub retry_after: Duration,
}

/// The rate limit was exceeded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("rate limit {name:?} exceeded; retry after {retry_after:?}")]
pub struct RateLimited {
    /// The limiter's name.
    pub name: String,
    /// When a call would be allowed.
    pub retry_after: Duration,
}

/// Which deadline ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// One attempt took too long.
    Attempt,
    /// The whole call, retries included, took too long.
    Overall,
}

/// A deadline ran out before the call completed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} timeout after {after:?}", match kind { TimeoutKind::Attempt => "attempt", TimeoutKind::Overall => "overall" })]
pub struct Timeout {
    /// Attempt or overall.
    pub kind: TimeoutKind,
    /// The deadline.
    pub after: Duration,
}

/// Fault injection aborted the call, as if the upstream had answered `status`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("fault injected: abort with status {status}")]
pub struct InjectedFault {
    /// The status the upstream "returned".
    pub status: u16,
}

/// Connecting to the upstream failed: the request was never sent, so it is safe to
/// send again even if it is not idempotent. Transports wrap such errors in this.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot connect to the upstream: {0}")]
pub struct ConnectError(pub String);

/// Whether `error`, or anything in its `source()` chain, is a `T`.
pub fn is_caused_by<T: std::error::Error + 'static>(
    error: &(dyn std::error::Error + 'static),
) -> bool {
    cause_ref::<T>(error).is_some()
}

/// The first `T` in `error`'s `source()` chain, itself included.
pub fn cause_ref<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// Whether the error is one of this crate's rejections (the call never reached the
/// upstream): breakers don't count these as upstream failures.
pub fn is_rejection(error: &(dyn std::error::Error + 'static)) -> bool {
    is_caused_by::<CircuitOpen>(error)
        || is_caused_by::<BulkheadFull>(error)
        || is_caused_by::<RateLimited>(error)
}

#[cfg(test)]
mod test {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] Timeout);

    #[test]
    fn finds_causes_through_the_chain() {
        let e: BoxError = Box::new(Wrapper(Timeout {
            kind: TimeoutKind::Attempt,
            after: Duration::from_secs(1),
        }));
        assert!(is_caused_by::<Timeout>(&*e));
        assert_eq!(
            cause_ref::<Timeout>(&*e).map(|t| t.kind),
            Some(TimeoutKind::Attempt)
        );
        assert!(!is_rejection(&*e));
        let r: BoxError = Box::new(BulkheadFull {
            name: "b".into(),
            retry_after: Duration::ZERO,
        });
        assert!(is_rejection(&*r));
    }
}
