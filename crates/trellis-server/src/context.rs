//! Per-request context: request id, W3C trace context, the request span every log
//! line of the request is recorded in, the completion log line and HTTP metrics.

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;
use tracing::Instrument;
use trellis_core::{RequestId, TraceContext};

use crate::error::LoggedError;
use crate::extract::payload_too_large;

/// `X-Request-Id`.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C `traceparent`.
pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The identity of the request being served, for handlers that call onwards.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The caller's `X-Request-Id`, or a generated one.
    pub request_id: RequestId,
    /// This hop's span in the caller's trace, or a new trace.
    pub trace: TraceContext,
}

/// Settings of the request-context middleware.
#[derive(Debug, Clone)]
pub(crate) struct ContextConfig {
    /// The largest accepted body, checked against `Content-Length` before reading.
    pub(crate) body_limit: u64,
    /// For a proxy listener: its name (the `route` of its requests in metrics).
    pub(crate) listener: Option<std::sync::Arc<str>>,
}

pub(crate) async fn request_context(
    axum::extract::State(config): axum::extract::State<ContextConfig>,
    mut req: Request,
    next: Next,
) -> Response {
    let request_id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(RequestId::from_header)
        .unwrap_or_else(RequestId::generate);
    let trace = req
        .headers()
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map_or_else(TraceContext::new_root, |parent| parent.child());
    let route = match (req.extensions().get::<MatchedPath>(), &config.listener) {
        (_, Some(listener)) => format!("listener:{listener}"),
        (Some(path), None) => path.as_str().to_owned(),
        (None, None) => "unmatched".to_owned(),
    };
    let path = config
        .listener
        .as_ref()
        .map(|_| req.uri().path().to_owned());
    let method = req.method().clone();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        trace_id = %trace.trace_id(),
        span_id = %trace.span_id(),
        method = %method,
        route = %route,
    );
    req.extensions_mut().insert(RequestContext {
        request_id: request_id.clone(),
        trace,
    });

    let started = Instant::now();
    let too_large = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > config.body_limit);
    let mut response = if too_large {
        // Refuse before reading a byte of it.
        payload_too_large().into_response()
    } else {
        next.run(req).instrument(span.clone()).await
    };
    let elapsed = started.elapsed();

    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id.as_str()) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
        headers.insert(TRACEPARENT.clone(), v);
    }

    let status = response.status();
    let _entered = span.enter();
    let latency_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
    let upstream = response
        .extensions()
        .get::<trellis_proxy::Instance>()
        .map(|i| i.0.as_str());
    if let Some(path) = &path {
        // A proxy listener's access log line.
        tracing::info!(
            status = status.as_u16(),
            latency_ms,
            path = %path,
            upstream = upstream.unwrap_or("-"),
            code = response.extensions().get::<LoggedError>().map_or("-", |e| e.code),
            "proxied"
        );
    } else {
        match response.extensions().get::<LoggedError>() {
            Some(e) if status.is_server_error() => {
                tracing::error!(status = status.as_u16(), latency_ms, code = e.code, error = %e.detail, "request failed");
            }
            Some(e) => {
                tracing::info!(status = status.as_u16(), latency_ms, code = e.code, detail = %e.detail, "request rejected");
            }
            None => match upstream {
                Some(upstream) => tracing::info!(
                    status = status.as_u16(),
                    latency_ms,
                    upstream,
                    "request completed"
                ),
                None => tracing::info!(status = status.as_u16(), latency_ms, "request completed"),
            },
        }
    }
    let handles = http_metrics(&method, &route, status.as_u16());
    handles.0.increment(1);
    handles.1.record(elapsed.as_secs_f64());
    drop(_entered);
    response
}

/// The request counter and latency histogram of one (method, route, status), cached:
/// registering them per request would hash and allocate label sets on the hot path.
type HttpHandles = (metrics::Counter, metrics::Histogram);

fn http_metrics(method: &axum::http::Method, route: &str, status: u16) -> HttpHandles {
    use std::collections::HashMap;
    use std::sync::{OnceLock, RwLock};

    type Cache = RwLock<HashMap<(&'static str, u16), HashMap<String, HttpHandles>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    // Only standard methods get their own label: arbitrary ones would let any client
    // create unbounded metric series.
    let method: &'static str = match *method {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::PATCH => "PATCH",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    };
    let cache = CACHE.get_or_init(Cache::default);
    if let Some(found) = cache
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&(method, status))
        .and_then(|routes| routes.get(route))
    {
        return found.clone();
    }
    let labels = [
        ("method", method.to_owned()),
        ("route", route.to_owned()),
        ("status", status.to_string()),
    ];
    let handles = (
        metrics::counter!("trellis_http_requests_total", &labels),
        metrics::histogram!("trellis_http_request_duration_seconds", &labels),
    );
    cache
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry((method, status))
        .or_default()
        .insert(route.to_owned(), handles.clone());
    handles
}
