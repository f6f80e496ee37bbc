//! `/v1/invoke/{app}/{path}`: service invocation through the sidecar.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use trellis_proxy::{ProxyBody, forward};

use super::{AppState, invoke_error};
use crate::ApiError;
use crate::context::RequestContext;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/invoke", any(missing_app))
        .route("/v1/invoke/", any(missing_app))
        .route("/v1/invoke/{app}", any(invoke))
        .route("/v1/invoke/{app}/", any(invoke))
        .route("/v1/invoke/{app}/{*path}", any(invoke))
}

async fn missing_app() -> ApiError {
    ApiError::bad_request("invalid_path", "expected /v1/invoke/{app}/{path}")
}

/// The path to forward: everything after `/v1/invoke/{app}`, kept exactly as the
/// caller encoded it, with the query.
fn upstream_path(uri: &axum::http::Uri) -> Result<(String, String), ApiError> {
    let rest = uri
        .path()
        .strip_prefix("/v1/invoke/")
        .ok_or_else(|| ApiError::bad_request("invalid_path", "expected /v1/invoke/{app}/{path}"))?;
    let (app, path) = rest.split_once('/').unwrap_or((rest, ""));
    let app = percent_decode(app)
        .ok_or_else(|| ApiError::bad_request("invalid_path", "the app name is not valid UTF-8"))?;
    // Dot segments would let `/x/../admin` slip past the policies of `/admin`.
    let dot_segment = path.split('/').any(|s| {
        let s = s.to_ascii_lowercase();
        matches!(s.as_str(), "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e.")
    });
    if dot_segment {
        return Err(ApiError::bad_request(
            "invalid_path",
            "dot segments (. and ..) are not allowed in invoke paths",
        ));
    }
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok((app, format!("/{path}{query}")))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Invoke an app: the request (method, path, query, headers minus hop-by-hop, body as
/// a stream) is forwarded to an instance of `app` under its resilience policies, with
/// this hop's `traceparent` and the `X-Request-Id`. The app's own answers, errors
/// included, are passed through unchanged. With a `Trellis-Shard-Key` header, the
/// request goes to the key's owner in the shard map bound to the app (never to
/// another instance); without one, the app's load balancing picks.
#[utoipa::path(
    method(get, post, put, patch, delete, head, options),
    path = "/v1/invoke/{app}/{path}",
    tag = "invoke",
    params(("app" = String, Path, description = "App id from [apps]"), ("path" = String, Path, description = "Path on the app")),
    responses(
        (status = 200, description = "Whatever the app answered (any status)"),
        (status = 400, description = "`no_shard_map`, `missing_shard_key` (with `Trellis-Shard-Key`)", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`app_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate_limited`, with Retry-After", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 502, description = "`upstream_unavailable`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`no_healthy_upstream`, `circuit_open`, `bulkhead_full`, `shard_owner_unavailable`, `shard_map_empty`, with Retry-After", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 504, description = "`upstream_timeout`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn invoke(
    State(state): State<AppState>,
    req: Request,
) -> Result<Response, ApiError> {
    let (app, path) = upstream_path(req.uri())?;
    let target = state.invoker.target(&app).ok_or_else(|| {
        let known: Vec<&str> = state.invoker.apps().collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            "app_not_found",
            format!(
                "no app {app:?} is configured; apps: {}",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        )
    })?;
    let (mut parts, body) = req.into_parts();
    let ctx = parts
        .extensions
        .get::<RequestContext>()
        .cloned()
        .ok_or_else(|| ApiError::internal("request context missing"))?;
    parts.uri = path
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_path", format!("invalid path {path:?}")))?;
    // With a Trellis-Shard-Key: to the key's owner in the app's shard map.
    let by_key = super::shards::route_by_key(&state, &app, &mut parts)?;
    forward::outgoing_headers(&mut parts.headers, &ctx.request_id, &ctx.trace);
    if state.strip_authorization {
        // That token is ours, not the app's.
        parts.headers.remove(axum::http::header::AUTHORIZATION);
    }
    let request = axum::http::Request::from_parts(parts, ProxyBody::stream(body));
    match target.call(request).await {
        Ok(response) => Ok(response.map(axum::body::Body::new).into_response()),
        Err(e) => Err(by_key.map_or_else(|| invoke_error(&e), |route| route.error(&e))),
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn split(uri: &str) -> Result<(String, String), &'static str> {
        upstream_path(&uri.parse().expect("uri")).map_err(|e| e.code())
    }

    #[test]
    fn paths() {
        assert_eq!(
            split("/v1/invoke/orders/a/b?x=1"),
            Ok(("orders".into(), "/a/b?x=1".into()))
        );
        assert_eq!(
            split("/v1/invoke/orders"),
            Ok(("orders".into(), "/".into()))
        );
        assert_eq!(
            split("/v1/invoke/orders/"),
            Ok(("orders".into(), "/".into()))
        );
        assert_eq!(
            split("/v1/invoke/orders/a%2Fb"),
            Ok(("orders".into(), "/a%2Fb".into())),
            "kept as encoded"
        );
        assert_eq!(
            split("/v1/invoke/my%20app/x"),
            Ok(("my app".into(), "/x".into()))
        );
        for bad in [
            "/v1/invoke/o/x/../admin",
            "/v1/invoke/o/./x",
            "/v1/invoke/o/%2e%2E/admin",
        ] {
            assert_eq!(split(bad), Err("invalid_path"), "{bad}");
        }
    }
}
