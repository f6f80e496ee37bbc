//! Proxy listeners: every request is forwarded to the listener's target.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use trellis_proxy::{ProxyBody, Target, forward};

use super::invoke_error;
use crate::ApiError;
use crate::context::RequestContext;

/// What a listener forwards to.
#[derive(Debug, Clone)]
pub(crate) struct ListenerState {
    pub(crate) name: Arc<str>,
    pub(crate) target: Option<Target>,
}

/// Forwards any request, adding `X-Forwarded-For/-Proto/-Host`.
pub(crate) async fn forward(
    State(state): State<ListenerState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let Some(target) = state.target else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_healthy_upstream",
            format!("listener {:?} has no upstream", state.name),
        )
        .into_response();
    };
    let (mut parts, body) = req.into_parts();
    let Some(ctx) = parts.extensions.get::<RequestContext>().cloned() else {
        return ApiError::internal("request context missing").into_response();
    };
    let host = parts.headers.get(header::HOST).cloned();
    forward::outgoing_headers(&mut parts.headers, &ctx.request_id, &ctx.trace);
    let forwarded_for = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(earlier) => format!("{earlier}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = host {
        parts.headers.insert("x-forwarded-host", host);
    }
    if let Some(path) = parts.uri.path_and_query().cloned() {
        parts.uri = path.into();
    }
    match target
        .call(axum::http::Request::from_parts(
            parts,
            ProxyBody::stream(body),
        ))
        .await
    {
        Ok(response) => response.map(axum::body::Body::new).into_response(),
        Err(e) => invoke_error(&e).into_response(),
    }
}
