//! Extractors whose rejections are problem+json with stable codes, so bad input
//! never gets axum's plain-text errors.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::ApiError;

/// The raw request body, bounded by the server's `max_body_size`.
#[derive(Debug)]
pub(crate) struct Body(pub(crate) Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    payload_too_large()
                } else {
                    ApiError::bad_request("invalid_body", rejection.body_text())
                }
            })
    }
}

pub(crate) fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the request body exceeds the server's max_body_size",
    )
}

/// A JSON body of type `T`. Any content type is accepted (a sidecar is called from
/// curl and from every language's HTTP client, not all of which label JSON); the
/// bytes must be JSON.
///
/// Syntax errors are `malformed_json`; a well-formed document of the wrong shape is
/// `invalid_body`, with the path to the offending field.
#[derive(Debug)]
pub(crate) struct Json<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Body(bytes) = Body::from_request(req, state).await?;
        parse_json(&bytes).map(Json)
    }
}

/// A JSON body of type `T` that may be left out: an empty (or all-whitespace) body
/// is `T::default()`. Otherwise as [`Json`].
#[derive(Debug)]
pub(crate) struct JsonOrDefault<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for JsonOrDefault<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Body(bytes) = Body::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        parse_json(&bytes).map(JsonOrDefault)
    }
}

/// Parses JSON with errors that name the failing field.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let at = if path == "." {
                    String::new()
                } else {
                    format!("at {path}: ")
                };
                ApiError::bad_request("invalid_body", format!("{at}{inner}"))
            }
            _ => ApiError::bad_request("malformed_json", inner.to_string()),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request("malformed_json", e.to_string()))?;
    Ok(value)
}

/// Query parameters of type `T`; rejections are `invalid_query`.
#[derive(Debug)]
pub(crate) struct Query<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|rejection| ApiError::bad_request("invalid_query", rejection.body_text()))
    }
}

/// Path parameters of type `T`; rejections are `invalid_path`.
#[derive(Debug)]
pub(crate) struct Path<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))
    }
}

#[cfg(test)]
mod test {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Shape {
        keys: Vec<String>,
    }

    #[test]
    fn json_errors_are_classified() {
        let err = |body: &str| parse_json::<Shape>(body.as_bytes()).expect_err("invalid");
        assert_eq!(err("{").code(), "malformed_json");
        assert_eq!(err("").code(), "malformed_json");
        assert_eq!(err("{\"keys\": []} trailing").code(), "malformed_json");
        let wrong = err("{\"keys\": [\"a\", 2]}");
        assert_eq!(wrong.code(), "invalid_body");
        assert_eq!(err("{}").code(), "invalid_body");
        assert_eq!(err("[]").code(), "invalid_body");
        assert!(parse_json::<Shape>(b"{\"keys\": []}").is_ok());
    }
}
