//! `/v1/projections`: the projections Trellis runs for apps
//! (`[projections.<name>]`), their checkpoint, lag and state, and rebuilds.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::AppState;
use crate::ApiError;
use crate::extract::Path;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/projections", get(list))
        .route("/v1/projections/{name}", get(one))
        .route("/v1/projections/{name}/rebuild", post(rebuild))
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "projection_not_found",
        format!("no projection {name:?} in [projections]"),
    )
}

/// Every projection: checkpoint, head, lag (events not yet applied), state
/// (`catching_up`, `live`, `failing` with the error, …), events applied, settings.
#[utoipa::path(
    get, path = "/v1/projections", tag = "streams",
    responses((status = 200, description = "`{\"projections\": [...]}`", body = Object))
)]
pub(crate) async fn list(State(state): State<AppState>) -> Response {
    axum::Json(json!({ "projections": state.projections.list() })).into_response()
}

/// One projection's status.
#[utoipa::path(
    get, path = "/v1/projections/{name}", tag = "streams",
    params(("name" = String, Path, description = "Projection")),
    responses(
        (status = 200, description = "The projection", body = Object),
        (status = 404, description = "`projection_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let status = state
        .projections
        .get(&name)
        .ok_or_else(|| not_found(&name))?;
    Ok(axum::Json(status).into_response())
}

/// Deletes the projection's read model and checkpoint, then applies it again from
/// its start. Readers see an empty, then partial, read model meanwhile. Answers when
/// the old read model is gone and the projection runs again.
#[utoipa::path(
    post, path = "/v1/projections/{name}/rebuild", tag = "streams",
    params(("name" = String, Path, description = "Projection")),
    responses(
        (status = 202, description = "Rebuilding", body = Object),
        (status = 404, description = "`projection_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn rebuild(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    match state.projections.rebuild(&name).await {
        None => Err(not_found(&name)),
        Some(Err(e)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_unavailable",
            format!("rebuilding {name:?} failed: {e}"),
        )
        .with_retry_after(1)),
        Some(Ok(())) => {
            let status = state.projections.get(&name).unwrap_or_default();
            Ok((StatusCode::ACCEPTED, axum::Json(status)).into_response())
        }
    }
}
