//! Operational endpoints: liveness, readiness, metrics and the OpenAPI document.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::ApiError;

/// How long a backend may take to answer a readiness check.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness and readiness status.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Status {
    /// `ok` or `ready`.
    status: &'static str,
    /// Per component (`state.<name>`, `pubsub.<name>`): `ok`, or why not.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    components: std::collections::BTreeMap<String, String>,
}

/// The process is alive and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Status)))]
pub(crate) async fn healthz() -> Json<Status> {
    Json(Status {
        status: "ok",
        components: Default::default(),
    })
}

/// Every configured backend answers. 503 `not_ready` (with per-component status)
/// otherwise.
#[utoipa::path(
    get, path = "/readyz", tag = "ops",
    responses(
        (status = 200, body = Status),
        (status = 503, description = "A backend is unreachable", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn readyz(State(app): State<AppState>) -> Response {
    fn status<E: std::fmt::Display>(
        answer: Result<Result<(), E>, tokio::time::error::Elapsed>,
    ) -> String {
        match answer {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {READINESS_TIMEOUT:?}"),
        }
    }
    let stores = app.stores.iter().map(|(name, store)| async move {
        let answer = tokio::time::timeout(READINESS_TIMEOUT, store.health()).await;
        (format!("state.{name}"), status(answer))
    });
    let pubsubs = app.pubsubs.iter().map(|(name, pubsub)| async move {
        let answer = tokio::time::timeout(READINESS_TIMEOUT, pubsub.health()).await;
        (format!("pubsub.{name}"), status(answer))
    });
    let eventstores = app.eventstores.iter().map(|(name, store)| async move {
        let answer = tokio::time::timeout(READINESS_TIMEOUT, store.health()).await;
        (format!("eventstore.{name}"), status(answer))
    });
    let (stores, pubsubs, eventstores) = futures_util::future::join3(
        futures_util::future::join_all(stores),
        futures_util::future::join_all(pubsubs),
        futures_util::future::join_all(eventstores),
    )
    .await;
    let components: std::collections::BTreeMap<String, String> = stores
        .into_iter()
        .chain(pubsubs)
        .chain(eventstores)
        .collect();
    let failing: Vec<&str> = components
        .iter()
        .filter(|(_, status)| status.as_str() != "ok")
        .map(|(name, _)| name.as_str())
        .collect();
    if failing.is_empty() {
        return Json(Status {
            status: "ready",
            components,
        })
        .into_response();
    }
    let detail = format!("unreachable: {}", failing.join(", "));
    let components = serde_json::to_value(&components).unwrap_or_default();
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", detail)
        .with_retry_after(1)
        .with_extension("components", components)
        .into_response()
}

/// Metrics in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, content_type = "text/plain", body = String)))]
pub(crate) async fn metrics() -> Response {
    let text = crate::telemetry::prometheus().render();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// This API's OpenAPI document, generated from the handlers.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, content_type = "application/json", body = Object)))]
pub(crate) async fn openapi() -> Response {
    match crate::openapi().to_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}
