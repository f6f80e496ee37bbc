//! `/v1/sagas/...`: saga definitions, starting sagas, their status and history, and
//! operator commands (retry, abort).
//!
//! A saga is persisted before `POST /v1/sagas/{name}` answers, and every step is
//! persisted before it is called, so a started saga runs to its end (completed,
//! compensated, or parked as `needs_attention`) through crashes of the sidecar.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_core::config::units;
use trellis_saga::definition::DefinitionError;
use trellis_saga::log::Filter;
use trellis_saga::{Orchestrator, SagaDefinition, SagaError, SagaStatus};

use super::AppState;
use crate::ApiError;
use crate::extract::{Body, Path, Query, parse_json};

/// Longest `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Longest `?wait=` on `GET /v1/sagas/{id}`.
const MAX_WAIT: Duration = Duration::from_secs(60);

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/sagas", get(list))
        .route("/v1/sagas/definitions", get(list_definitions))
        .route(
            "/v1/sagas/definitions/{name}",
            get(get_definition)
                .put(put_definition)
                .delete(delete_definition),
        )
        .route("/v1/sagas/{id}", get(get_saga).post(start))
        .route("/v1/sagas/{id}/retry", post(retry))
        .route("/v1/sagas/{id}/abort", post(abort))
}

impl AppState {
    fn orchestrator(&self) -> Result<&Orchestrator, ApiError> {
        self.sagas.as_deref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                "no saga log is open",
            )
        })
    }
}

/// A saga error as a problem.
pub(crate) fn saga_error(e: SagaError) -> ApiError {
    match e {
        SagaError::UnknownDefinition(name) => ApiError::new(
            StatusCode::NOT_FOUND,
            "definition_not_found",
            format!("no saga definition named {name:?}"),
        ),
        SagaError::InvalidDefinition(errors) => definition_errors(&errors),
        SagaError::NotFound(id) => ApiError::new(
            StatusCode::NOT_FOUND,
            "saga_not_found",
            format!("no saga with id {id:?}"),
        ),
        SagaError::WrongState(e) => {
            ApiError::new(StatusCode::CONFLICT, "saga_state_conflict", e.to_string())
        }
        SagaError::Conflict(id) => ApiError::new(
            StatusCode::CONFLICT,
            "concurrent_update",
            format!("saga {id} changed concurrently; try again"),
        ),
        SagaError::Closed => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the sidecar is shutting down",
        )
        .with_retry_after(1),
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_unavailable",
            other.to_string(),
        )
        .with_retry_after(1),
    }
}

/// Every problem of a definition, in one 400: the first one's code, all of them
/// under `errors`.
pub(crate) fn definition_errors(errors: &[DefinitionError]) -> ApiError {
    let code = errors.first().map_or("invalid_definition", |e| e.code);
    let detail = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let list: Vec<Value> = errors
        .iter()
        .map(|e| json!({"at": e.at, "reason": e.reason, "code": e.code}))
        .collect();
    ApiError::bad_request(code, detail).with_extension("errors", list)
}

/// Parses a definition body for `name` (the body's own `name`, if any, must match).
pub(crate) fn parse_definition(name: &str, body: &[u8]) -> Result<SagaDefinition, ApiError> {
    let mut value: Value = parse_json(body)?;
    let Some(object) = value.as_object_mut() else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "a saga definition is a JSON object",
        ));
    };
    match object.get("name") {
        Some(Value::String(n)) if n != name => {
            return Err(ApiError::bad_request(
                "invalid_definition",
                format!("the body names the saga {n:?} but the path names {name:?}"),
            ));
        }
        _ => {
            object.insert("name".into(), Value::String(name.to_owned()));
        }
    }
    let definition: SagaDefinition = serde_path_to_error::deserialize(value).map_err(|e| {
        ApiError::bad_request("invalid_definition", format!("{}: {}", e.path(), e.inner()))
    })?;
    if name == "definitions" {
        return Err(ApiError::bad_request(
            "invalid_definition",
            "\"definitions\" is reserved (it is the path of the definitions list)",
        ));
    }
    Ok(definition)
}

/// Store a saga definition (replacing one of the same name). Sagas already started
/// keep the definition they started with.
#[utoipa::path(
    put, path = "/v1/sagas/definitions/{name}", tag = "sagas",
    params(("name" = String, Path, description = "Definition name")),
    request_body(content = Value, description = "`{steps: [{name, action, compensation?, retry?, timeout?}], pivot?, compensation_retry?}`"),
    responses(
        (status = 201, description = "Created"),
        (status = 200, description = "Replaced"),
        (status = 400, description = "`invalid_definition`, `invalid_template`, `unknown_target`; `errors` lists every problem", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn put_definition(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let orchestrator = state.orchestrator()?;
    let definition = parse_definition(&name, &body)?;
    let created = orchestrator
        .define(definition.clone())
        .await
        .map_err(saga_error)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(definition)).into_response())
}

/// A saga definition.
#[utoipa::path(
    get, path = "/v1/sagas/definitions/{name}", tag = "sagas",
    params(("name" = String, Path, description = "Definition name")),
    responses(
        (status = 200, description = "The definition"),
        (status = 404, description = "`definition_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_definition(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let definition = state
        .orchestrator()?
        .definition(&name)
        .ok_or_else(|| saga_error(SagaError::UnknownDefinition(name)))?;
    Ok(axum::Json(&*definition).into_response())
}

/// Every saga definition.
#[utoipa::path(
    get, path = "/v1/sagas/definitions", tag = "sagas",
    responses((status = 200, description = "`{definitions: [...]}`"))
)]
pub(crate) async fn list_definitions(State(state): State<AppState>) -> Result<Response, ApiError> {
    let definitions: Vec<Value> = state
        .orchestrator()?
        .definitions()
        .iter()
        .map(|d| serde_json::to_value(&**d).unwrap_or(Value::Null))
        .collect();
    Ok(axum::Json(json!({ "definitions": definitions })).into_response())
}

/// Delete a saga definition; running sagas are unaffected.
#[utoipa::path(
    delete, path = "/v1/sagas/definitions/{name}", tag = "sagas",
    params(("name" = String, Path, description = "Definition name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`definition_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete_definition(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state
        .orchestrator()?
        .undefine(&name)
        .await
        .map_err(saga_error)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(saga_error(SagaError::UnknownDefinition(name)))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartRequest {
    #[serde(default)]
    input: Value,
}

/// Start a saga of definition `{id}` (a definition name) with `{input}`. With an
/// `Idempotency-Key` used before for this definition, starts nothing and answers
/// with the first saga's id (200 instead of 202).
#[utoipa::path(
    post, path = "/v1/sagas/{name}", tag = "sagas",
    params(("name" = String, Path, description = "Definition name"),
           ("Idempotency-Key" = Option<String>, Header, description = "Dedupes retried starts")),
    request_body(content = Value, description = "`{input}`"),
    responses(
        (status = 202, description = "Started: `{id}`; it runs in the background"),
        (status = 200, description = "Already started with this Idempotency-Key: `{id}`"),
        (status = 400, description = "`malformed_json`, `invalid_body`, `invalid_header`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`definition_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn start(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let orchestrator = state.orchestrator()?;
    let request: StartRequest = if body.is_empty() {
        StartRequest { input: Value::Null }
    } else {
        parse_json(&body)?
    };
    let key = idempotency_key(&headers)?;
    let started = orchestrator
        .start(&name, request.input, key.as_deref())
        .await
        .map_err(saga_error)?;
    let status = if started.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let location = format!("/v1/sagas/{}", started.id);
    Ok((
        status,
        [(axum::http::header::LOCATION, location)],
        axum::Json(json!({ "id": started.id, "created": started.created })),
    )
        .into_response())
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_header",
                format!("Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
            )
        })?;
    Ok(Some(key.to_owned()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GetQuery {
    #[serde(default, deserialize_with = "units::option_duration")]
    wait: Option<Duration>,
}

/// A saga: status, steps (attempts, outputs, errors) and the full history. With
/// `?wait=10s`, answers once it is no longer running or compensating (or the wait
/// runs out).
#[utoipa::path(
    get, path = "/v1/sagas/{id}", tag = "sagas",
    params(("id" = String, Path, description = "Saga id"),
           ("wait" = Option<String>, Query, description = "Wait up to this long (max 60s) for the saga to finish or park")),
    responses(
        (status = 200, description = "The saga"),
        (status = 404, description = "`saga_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_saga(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<GetQuery>,
) -> Result<Response, ApiError> {
    let orchestrator = state.orchestrator()?;
    let saga = match query.wait {
        Some(wait) => orchestrator
            .wait(&id, wait.min(MAX_WAIT))
            .await
            .map_err(saga_error)?,
        None => orchestrator
            .get(&id)
            .await
            .map_err(saga_error)?
            .ok_or_else(|| saga_error(SagaError::NotFound(id)))?,
    };
    Ok(axum::Json(saga).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    name: Option<String>,
    status: Option<String>,
    before: Option<String>,
    limit: Option<usize>,
}

/// Sagas, newest first, filtered by definition `name` and `status`; page with
/// `before=<last id>`.
#[utoipa::path(
    get, path = "/v1/sagas", tag = "sagas",
    params(("name" = Option<String>, Query, description = "Definition name"),
           ("status" = Option<String>, Query, description = "running, compensating, completed, compensated or needs_attention"),
           ("before" = Option<String>, Query, description = "The last id of the previous page"),
           ("limit" = Option<usize>, Query, description = "At most this many (default 100, max 1000)")),
    responses(
        (status = 200, description = "`{sagas: [...], next}`"),
        (status = 400, description = "`invalid_query`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let filter = list_filter(
        query.status,
        query.before,
        query.limit,
        |s| SagaStatus::parse(s).is_some(),
        "running, compensating, completed, compensated, needs_attention",
    )?;
    let limit = filter.limit;
    let sagas = state
        .orchestrator()?
        .list(&Filter {
            name: query.name,
            ..filter
        })
        .await
        .map_err(saga_error)?;
    let next = next_page(&sagas, limit, |s| &s.id);
    Ok(axum::Json(json!({ "sagas": sagas, "next": next })).into_response())
}

/// The filter of a list endpoint: `status` checked by `known` (else 400
/// `invalid_query` naming `statuses`), the `before` cursor, and `limit` (default
/// 100, at most [`MAX_LIST`](trellis_saga::log::MAX_LIST)).
pub(crate) fn list_filter(
    status: Option<String>,
    before: Option<String>,
    limit: Option<usize>,
    known: impl Fn(&str) -> bool,
    statuses: &str,
) -> Result<Filter, ApiError> {
    if let Some(status) = &status
        && !known(status)
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("unknown status {status:?}; one of {statuses}"),
        ));
    }
    Ok(Filter {
        status,
        before,
        limit: limit.unwrap_or(100).clamp(1, trellis_saga::log::MAX_LIST),
        ..Filter::default()
    })
}

/// The `next` cursor of a full page: its last id.
pub(crate) fn next_page<T>(
    items: &[T],
    limit: usize,
    id: impl Fn(&T) -> &String,
) -> Option<String> {
    (items.len() == limit)
        .then(|| items.last().map(|t| id(t).clone()))
        .flatten()
}

/// Retry a saga parked as `needs_attention`, with a fresh attempt budget.
#[utoipa::path(
    post, path = "/v1/sagas/{id}/retry", tag = "sagas",
    params(("id" = String, Path, description = "Saga id")),
    responses(
        (status = 200, description = "The saga, running or compensating again"),
        (status = 404, description = "`saga_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`saga_state_conflict`: it does not need attention", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let saga = state.orchestrator()?.retry(&id).await.map_err(saga_error)?;
    Ok(axum::Json(saga).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AbortRequest {
    #[serde(default)]
    reason: Option<String>,
}

/// Abort a saga going forward (before its pivot): it compensates what ran.
#[utoipa::path(
    post, path = "/v1/sagas/{id}/abort", tag = "sagas",
    params(("id" = String, Path, description = "Saga id")),
    request_body(content = Value, description = "`{reason?}`"),
    responses(
        (status = 200, description = "The saga, compensating"),
        (status = 404, description = "`saga_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`saga_state_conflict`: finished, compensating, or past its pivot", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn abort(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let request: AbortRequest = if body.is_empty() {
        AbortRequest::default()
    } else {
        parse_json(&body)?
    };
    let reason = request.reason.unwrap_or_else(|| "no reason given".into());
    let saga = state
        .orchestrator()?
        .abort(&id, &reason)
        .await
        .map_err(saga_error)?;
    Ok(axum::Json(saga).into_response())
}
