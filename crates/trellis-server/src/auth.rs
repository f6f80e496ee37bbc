//! Bearer-token authentication of `/v1`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::ApiError;

/// The configured token, if any.
#[derive(Debug, Clone)]
pub(crate) struct Token(pub(crate) Option<Arc<str>>);

/// Requires `Authorization: Bearer <token>` on every `/v1` path when a token is
/// configured. Health, readiness, metrics and the OpenAPI document stay open so
/// orchestrators and scrapers need no secret.
pub(crate) async fn require_token(
    State(token): State<Token>,
    req: Request,
    next: Next,
) -> Response {
    let Some(expected) = token.0.as_deref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if !(path == "/v1" || path.starts_with("/v1/")) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "this server requires Authorization: Bearer <token>",
        )
        .into_response(),
        // Constant time in the token's content: a wrong guess reveals nothing about
        // how much of it was right.
        Some(given) if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) => {
            next.run(req).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the bearer token is not valid",
        )
        .into_response(),
    }
}
