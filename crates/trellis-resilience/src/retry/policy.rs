//! What may be retried, and when.

use std::time::{Duration, SystemTime};

use crate::error::{
    BoxError, ConnectError, InjectedFault, Timeout, TimeoutKind, cause_ref, is_caused_by,
    is_rejection,
};

/// A retry policy's verdict on one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Return this result.
    Return,
    /// Try again.
    Retry {
        /// Wait at least this long (the upstream's `Retry-After`).
        after: Option<Duration>,
        /// The request provably never reached the upstream (e.g. the connection was
        /// refused), so even a non-idempotent request may be sent again.
        never_sent: bool,
    },
}

/// Decides retries for requests `Req` with responses `Res`.
pub trait RetryPolicy<Req, Res>: Clone + Send + Sync + 'static {
    /// Whether sending `req` twice is safe (idempotent, or carrying an idempotency key).
    fn may_repeat(&self, req: &Req) -> bool;
    /// A copy of `req` to send again, or `None` if it can't be replayed.
    fn clone_request(&self, req: &Req) -> Option<Req>;
    /// Whether the result of an attempt calls for another.
    fn decide(&self, result: Result<&Res, &BoxError>) -> Decision;
}

/// A request body that can (sometimes) be replayed.
pub trait TryCloneBody: Sized {
    /// A copy of the body, or `None` if it is a stream already being consumed.
    fn try_clone_body(&self) -> Option<Self>;
}

impl TryCloneBody for () {
    fn try_clone_body(&self) -> Option<Self> {
        Some(())
    }
}

impl TryCloneBody for bytes::Bytes {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl TryCloneBody for String {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

/// The HTTP policy:
/// - idempotent methods (`GET HEAD OPTIONS TRACE PUT DELETE`) and requests carrying
///   `Idempotency-Key` may be repeated; others only if `retry_non_idempotent`, or
///   when the connection failed before the request was sent;
/// - responses with a status in `statuses` are retried (only 408, 429 and 5xx may be
///   listed: other 4xx mean the request itself is wrong, and sending it again won't
///   help — dapr#4568);
/// - attempt timeouts, connection errors and injected faults with a listed status are
///   retried; our own rejections (open breaker, full bulkhead, rate limit) and the
///   overall timeout are not;
/// - `Retry-After` (seconds or an HTTP date) is a lower bound for the next delay.
#[derive(Debug, Clone)]
pub struct HttpRetryPolicy {
    statuses: Vec<u16>,
    retry_non_idempotent: bool,
}

impl HttpRetryPolicy {
    /// Retries on `statuses`; see the type's docs.
    pub fn new(statuses: Vec<u16>, retry_non_idempotent: bool) -> Self {
        Self {
            statuses,
            retry_non_idempotent,
        }
    }

    /// The statuses retried by default: 408, 429, 500, 502, 503, 504.
    pub fn default_statuses() -> Vec<u16> {
        trellis_core::config::resiliency::default_retry_statuses()
    }
}

impl Default for HttpRetryPolicy {
    fn default() -> Self {
        Self::new(Self::default_statuses(), false)
    }
}

fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

impl<B: TryCloneBody, Res> RetryPolicy<http::Request<B>, http::Response<Res>> for HttpRetryPolicy {
    fn may_repeat(&self, req: &http::Request<B>) -> bool {
        use http::Method;
        self.retry_non_idempotent
            || matches!(
                *req.method(),
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
            || req.headers().contains_key("idempotency-key")
    }

    fn clone_request(&self, req: &http::Request<B>) -> Option<http::Request<B>> {
        let body = req.body().try_clone_body()?;
        let mut copy = http::Request::new(body);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        *copy.extensions_mut() = req.extensions().clone();
        Some(copy)
    }

    fn decide(&self, result: Result<&http::Response<Res>, &BoxError>) -> Decision {
        let retry = |after, never_sent| Decision::Retry { after, never_sent };
        match result {
            Ok(response) if self.statuses.contains(&response.status().as_u16()) => {
                retry(retry_after(response.headers()), false)
            }
            Ok(_) => Decision::Return,
            Err(e) if is_rejection(&**e) => Decision::Return,
            Err(e) if is_caused_by::<ConnectError>(&**e) => retry(None, true),
            Err(e) => match (cause_ref::<Timeout>(&**e), cause_ref::<InjectedFault>(&**e)) {
                (Some(t), _) if t.kind == TimeoutKind::Overall => Decision::Return,
                (Some(_), _) => retry(None, false),
                (None, Some(fault)) if self.statuses.contains(&fault.status) => retry(None, false),
                (None, Some(_)) => Decision::Return,
                // Any other transport error: the request may or may not have arrived.
                (None, None) => retry(None, false),
            },
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn request(method: &str, key: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder().method(method).uri("/x");
        if let Some(key) = key {
            b = b.header("idempotency-key", key);
        }
        b.body(()).expect("request")
    }

    fn response(status: u16, retry_after: Option<&str>) -> http::Response<()> {
        let mut b = http::Response::builder().status(status);
        if let Some(v) = retry_after {
            b = b.header("retry-after", v);
        }
        b.body(()).expect("response")
    }

    #[test]
    fn idempotency_rules() {
        let p = HttpRetryPolicy::default();
        let may = |r: &http::Request<()>| RetryPolicy::<_, http::Response<()>>::may_repeat(&p, r);
        assert!(may(&request("GET", None)));
        assert!(may(&request("PUT", None)));
        assert!(!may(&request("POST", None)));
        assert!(!may(&request("PATCH", None)));
        assert!(may(&request("POST", Some("k1"))));
        let lax = HttpRetryPolicy::new(HttpRetryPolicy::default_statuses(), true);
        assert!(RetryPolicy::<_, http::Response<()>>::may_repeat(
            &lax,
            &request("POST", None)
        ));
    }

    #[test]
    fn decisions() {
        let p = HttpRetryPolicy::default();
        let decide = |r: Result<&http::Response<()>, &BoxError>| {
            RetryPolicy::<http::Request<()>, _>::decide(&p, r)
        };
        assert_eq!(decide(Ok(&response(200, None))), Decision::Return);
        assert_eq!(decide(Ok(&response(404, None))), Decision::Return);
        assert_eq!(decide(Ok(&response(400, None))), Decision::Return);
        assert_eq!(
            decide(Ok(&response(503, None))),
            Decision::Retry {
                after: None,
                never_sent: false
            }
        );
        assert_eq!(
            decide(Ok(&response(429, Some("3")))),
            Decision::Retry {
                after: Some(Duration::from_secs(3)),
                never_sent: false
            }
        );
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        match decide(Ok(&response(503, Some(&date)))) {
            Decision::Retry { after: Some(d), .. } => {
                assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120))
            }
            other => panic!("{other:?}"),
        }
        let err = |e: BoxError| decide(Err(&e));
        assert_eq!(
            err(Box::new(ConnectError("refused".into()))),
            Decision::Retry {
                after: None,
                never_sent: true
            }
        );
        assert_eq!(
            err(Box::new(Timeout {
                kind: TimeoutKind::Attempt,
                after: Duration::from_secs(1)
            })),
            Decision::Retry {
                after: None,
                never_sent: false
            }
        );
        assert_eq!(
            err(Box::new(Timeout {
                kind: TimeoutKind::Overall,
                after: Duration::from_secs(1)
            })),
            Decision::Return
        );
        assert_eq!(
            err(Box::new(crate::error::CircuitOpen {
                name: "b".into(),
                retry_after: Duration::ZERO
            })),
            Decision::Return
        );
        assert_eq!(
            err(Box::new(InjectedFault { status: 503 })),
            Decision::Retry {
                after: None,
                never_sent: false
            }
        );
        assert_eq!(
            err(Box::new(InjectedFault { status: 418 })),
            Decision::Return
        );
    }

    #[test]
    fn clones_keep_method_uri_headers() {
        let p = HttpRetryPolicy::default();
        let mut r = http::Request::builder()
            .method("PUT")
            .uri("/a?b=c")
            .header("x", "y")
            .body(bytes::Bytes::from("body"))
            .expect("request");
        r.extensions_mut().insert(7u32);
        let c = RetryPolicy::<_, http::Response<()>>::clone_request(&p, &r).expect("replayable");
        assert_eq!(
            (
                c.method(),
                c.uri(),
                c.headers()["x"].as_bytes(),
                c.body().as_ref()
            ),
            (r.method(), r.uri(), &b"y"[..], &b"body"[..])
        );
        assert_eq!(c.extensions().get::<u32>(), Some(&7));
    }
}
