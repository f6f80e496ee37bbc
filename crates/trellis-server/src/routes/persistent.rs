//! `/v1/streams/{stream}/persistent/{group}`: persistent subscriptions (consumer
//! groups with a server-side checkpoint) over a stream, a category (`$ce-<category>`)
//! or `$all`, and `/v1/persistent-subscriptions` to list them.
//!
//! Consumers `read` deliveries (long poll), then `ack` or `nack` them by ack id. An
//! unacked delivery comes back after the group's `ack_timeout`; after `max_retries`
//! failures the event is parked in the stream `trellis-parked-<group>`, from where
//! `replay-parked` delivers it again.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use trellis_core::config::units;
use trellis_eventstore::persistent::{
    Delivery, GroupInfo, MAX_WAIT, NackAction, Outcome, PersistentSubscriptions, Settings,
};
use trellis_eventstore::subscription::{Source, Start};
use utoipa::ToSchema;

use super::AppState;
use super::streams::{StoreQuery, event_json, source_of};
use crate::ApiError;
use crate::extract::{Json, JsonOrDefault, Path, Query};

/// Most deliveries in one read, and ack ids in one ack or nack.
const MAX_BATCH: usize = 1000;
/// Most deliveries a group keeps in flight.
const MAX_IN_FLIGHT: usize = 10_000;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/persistent-subscriptions", get(list))
        .route(
            "/v1/streams/{stream}/persistent/{group}",
            get(info).put(define).delete(remove),
        )
        .route("/v1/streams/{stream}/persistent/{group}/read", post(read))
        .route("/v1/streams/{stream}/persistent/{group}/ack", post(ack))
        .route("/v1/streams/{stream}/persistent/{group}/nack", post(nack))
        .route(
            "/v1/streams/{stream}/persistent/{group}/replay-parked",
            post(replay_parked),
        )
}

impl AppState {
    fn persistent(&self, store: Option<&str>) -> Result<&Arc<PersistentSubscriptions>, ApiError> {
        // The event store's own lookup gives the error for an unknown component.
        self.event_store(store)?;
        let name = store.unwrap_or(trellis_core::config::DEFAULT_COMPONENT);
        self.persistent.get(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "eventstore_not_found",
                format!("event store {name:?} has no persistent subscriptions"),
            )
        })
    }
}

fn source_json(source: &Source) -> Value {
    Value::from(source.to_string())
}

fn info_json(info: &GroupInfo) -> Value {
    json!({
        "group": info.name,
        "stream": source_json(&info.source),
        "checkpoint": info.checkpoint,
        "in_flight": info.in_flight,
        "retrying": info.retrying,
        "parked": info.parked,
        "settings": {
            "ack_timeout": humantime::format_duration(info.settings.ack_timeout).to_string(),
            "max_retries": info.settings.max_retries,
            "max_in_flight": info.settings.max_in_flight,
            "retry_delay": humantime::format_duration(info.settings.retry_delay).to_string(),
        },
    })
}

fn not_found(group: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "subscription_not_found",
        format!("no persistent subscription group {group:?} on this stream"),
    )
}

/// The group `group`, which must follow `stream`.
fn group_info(
    subs: &PersistentSubscriptions,
    stream: &str,
    group: &str,
) -> Result<GroupInfo, ApiError> {
    let source = source_of(stream)?;
    subs.info(group)
        .filter(|info| info.source == source)
        .ok_or_else(|| not_found(group))
}

/// Every persistent subscription group of an event store.
#[utoipa::path(
    get, path = "/v1/persistent-subscriptions", tag = "streams",
    params(("store" = Option<String>, Query, description = "Event store component (default `default`)")),
    responses((status = 200, description = "`{\"subscriptions\": [...]}`", body = Object))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Query(query): Query<StoreQuery>,
) -> Result<Response, ApiError> {
    let subs = state.persistent(query.store.as_deref())?;
    let groups: Vec<Value> = subs.list().iter().map(info_json).collect();
    Ok(axum::Json(json!({ "subscriptions": groups })).into_response())
}

/// A group's checkpoint, deliveries in flight and retrying, parked count, settings.
#[utoipa::path(
    get, path = "/v1/streams/{stream}/persistent/{group}", tag = "streams",
    params(("stream" = String, Path, description = "Stream, `$all` or `$ce-<category>`"), ("group" = String, Path, description = "Group"), StoreQuery),
    responses(
        (status = 200, description = "The group", body = Object),
        (status = 404, description = "`subscription_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn info(
    State(state): State<AppState>,
    Path((stream, group)): Path<(String, String)>,
    Query(query): Query<StoreQuery>,
) -> Result<Response, ApiError> {
    let subs = state.persistent(query.store.as_deref())?;
    Ok(axum::Json(info_json(&group_info(subs, &stream, &group)?)).into_response())
}

/// `PUT .../persistent/{group}` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DefineBody {
    /// Where a new group starts: `start` (default), `end`, or a version (a stream)
    /// or position (`$all`, `$ce-…`). Ignored when the group exists.
    #[schema(value_type = Option<Object>)]
    from: Option<Value>,
    /// A delivery not acked within this is retried (default `30s`).
    #[serde(default, deserialize_with = "units::option_duration")]
    #[schema(value_type = Option<String>)]
    ack_timeout: Option<Duration>,
    /// Failures (nacks and timeouts) before an event is parked (default 10).
    max_retries: Option<u32>,
    /// Deliveries awaiting an ack at most (default 100).
    max_in_flight: Option<usize>,
    /// Delay before a retry (default `500ms`).
    #[serde(default, deserialize_with = "units::option_duration")]
    #[schema(value_type = Option<String>)]
    retry_delay: Option<Duration>,
}

fn start_of(from: Option<&Value>) -> Result<Start, ApiError> {
    match from {
        None => Ok(Start::Beginning),
        Some(Value::String(s)) if s == "start" => Ok(Start::Beginning),
        Some(Value::String(s)) if s == "end" => Ok(Start::End),
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            Ok(Start::At(n.as_u64().unwrap_or_default()))
        }
        Some(other) => Err(ApiError::bad_request(
            "invalid_subscription",
            format!("from must be \"start\", \"end\" or a position (0 or more), got {other}"),
        )),
    }
}

impl DefineBody {
    fn settings(&self) -> Result<Settings, ApiError> {
        let d = Settings::default();
        let settings = Settings {
            ack_timeout: self.ack_timeout.unwrap_or(d.ack_timeout),
            max_retries: self.max_retries.unwrap_or(d.max_retries),
            max_in_flight: self.max_in_flight.unwrap_or(d.max_in_flight),
            retry_delay: self.retry_delay.unwrap_or(d.retry_delay),
        };
        if settings.ack_timeout.is_zero() {
            return Err(ApiError::bad_request(
                "invalid_subscription",
                "ack_timeout must be more than 0",
            ));
        }
        if !(1..=MAX_IN_FLIGHT).contains(&settings.max_in_flight) {
            return Err(ApiError::bad_request(
                "invalid_subscription",
                format!(
                    "max_in_flight must be 1 to {MAX_IN_FLIGHT}, got {}",
                    settings.max_in_flight
                ),
            ));
        }
        Ok(settings)
    }
}

/// Defines a group on this stream (201), or changes its settings (200). A group's
/// stream can't change: delete the group first.
#[utoipa::path(
    put, path = "/v1/streams/{stream}/persistent/{group}", tag = "streams",
    params(("stream" = String, Path, description = "Stream, `$all` or `$ce-<category>`"), ("group" = String, Path, description = "Group"), StoreQuery),
    request_body = DefineBody,
    responses(
        (status = 201, description = "Created", body = Object),
        (status = 200, description = "Updated (or unchanged)", body = Object),
        (status = 400, description = "`invalid_subscription`, `invalid_stream`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`subscription_conflict`: the group follows another stream", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn define(
    State(state): State<AppState>,
    Path((stream, group)): Path<(String, String)>,
    Query(query): Query<StoreQuery>,
    JsonOrDefault(body): JsonOrDefault<DefineBody>,
) -> Result<Response, ApiError> {
    let subs = state.persistent(query.store.as_deref())?;
    let source = source_of(&stream)?;
    let settings = body.settings()?;
    let start = start_of(body.from.as_ref())?;
    if let Some(existing) = subs.info(&group)
        && existing.source != source
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "subscription_conflict",
            format!(
                "group {group:?} follows {}; delete it before defining it on {stream}",
                source_json(&existing.source)
            ),
        ));
    }
    let created = subs
        .define(&group, source, start, settings)
        .await
        .map_err(|e| match e {
            trellis_eventstore::EventStoreError::Invalid(e) => {
                ApiError::bad_request("invalid_subscription", e.to_string())
            }
            e => ApiError::from(e),
        })?;
    let info = subs.info(&group).ok_or_else(|| not_found(&group))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(info_json(&info))).into_response())
}

/// Deletes a group. Its checkpoint and parked stream stay: defining it again
/// resumes where it was.
#[utoipa::path(
    delete, path = "/v1/streams/{stream}/persistent/{group}", tag = "streams",
    params(("stream" = String, Path, description = "Stream, `$all` or `$ce-<category>`"), ("group" = String, Path, description = "Group"), StoreQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`subscription_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn remove(
    State(state): State<AppState>,
    Path((stream, group)): Path<(String, String)>,
    Query(query): Query<StoreQuery>,
) -> Result<Response, ApiError> {
    let subs = state.persistent(query.store.as_deref())?;
    group_info(subs, &stream, &group)?;
    if subs.delete(&group).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found(&group))
    }
}

/// `POST .../read` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadBody {
    /// Most deliveries to return, 1 to 1000 (default 10).
    #[serde(default = "default_max")]
    max: usize,
    /// Wait up to this long for the first delivery (long poll), 0 to 60000 (default 0).
    #[serde(default)]
    wait_ms: u64,
}

fn default_max() -> usize {
    10
}

impl Default for ReadBody {
    fn default() -> Self {
        Self {
            max: default_max(),
            wait_ms: 0,
        }
    }
}

fn delivery_json(d: &Delivery) -> Value {
    json!({
        "ack_id": d.ack_id,
        "attempt": d.attempt,
        "replayed": d.replayed,
        "event": event_json(&d.event),
    })
}

/// Deliveries for a consumer of the group: events no other consumer holds, each to
/// be acked (or nacked) within the group's `ack_timeout`.
#[utoipa::path(
    post, path = "/v1/streams/{stream}/persistent/{group}/read", tag = "streams",
    params(("stream" = String, Path, description = "Stream, `$all` or `$ce-<category>`"), ("group" = String, Path, description = "Group"), StoreQuery),
    request_body = ReadBody,
    responses(
        (status = 200, description = "`{\"events\": [{\"ack_id\",\"attempt\",\"replayed\",\"event\"}]}`", body = Object),
        (status = 404, description = "`subscription_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn read(
    State(state): State<AppState>,
    Path((stream, group)): Path<(String, String)>,
    Query(query): Query<StoreQuery>,
    JsonOrDefault(body): JsonOrDefault<ReadBody>,
) -> Result<Response, ApiError> {
    let subs = state.persistent(query.store.as_deref())?;
    group_info(subs, &stream, &group)?;
    if !(1..=MAX_BATCH).contains(&body.max) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("max must be 1 to {MAX_BATCH}, got {}", body.max),
        ));
    }
    let wait = Duration::from_millis(body.wait_ms);
    if wait > MAX_WAIT {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!(
                "wait_ms must be 0 to {}, got {}",
                MAX_WAIT.as_millis(),
                body.wait_ms
            ),
        ));
    }
    let deliveries = subs.read(&group, body.max, wait).await?;
    let events: Vec<Value> = deliveries.iter().map(delivery_json).collect();
    Ok(axum::Json(json!({ "events": events })).into_response())
}

/// `POST .../ack` and `.../nack` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettleBody {
    /// The deliveries' ack ids.
    ack_ids: Vec<String>,
    /// For a nack: `retry` (default; parked after `max_retries`), `park` or `skip`.
    action: Option<String>,
}

fn outcomes_json(ids: &[String], outcomes: &[Outcome]) -> Value {
    let results: Vec<Value> = ids
        .iter()
        .zip(outcomes)
        .map(|(id, outcome)| {
            let outcome = match outcome {
                Outcome::Ok => "ok",
                Outcome::NotFound => "not_found",
                Outcome::Stale => "stale",
            };
            json!({ "ack_id": id, "outcome": outcome })
        })
        .collect();
    json!({ "results": results })
}

fn checked_ids(body: &SettleBody) -> Result<(), ApiError> {
    if body.ack_ids.is_empty() || body.ack_ids.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("ack_ids must hold 1 to {MAX_BATCH} ids"),
        ));
    }
    Ok(())
}

/// Acknowledges deliveries. Each result is `ok`, `stale` (settled already, or
/// superseded by a redelivery) or `not_found` (not an ack id of this group).
#[utoipa::path(
    post, path = "/v1/streams/{stream}/persistent/{group}/ack", tag = "streams",
    params(("stream" = String, Path, description = "Stream, `$all` or `$ce-<category>`"), ("group" = String, Path, description = "Group"), StoreQuery),
    request_body = SettleBody,
    responses(
        (status = 200, description = "`{\"results\": [{\"ack_id\",\"outcome\"}]}`", body = Object),
        (status = 404, description = "`subscription_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn ack(
    State(state): State<AppState>,
    Path((stream, group)): Path<(String, String)>,
    Query(query): Query<StoreQuery>,
    Json(body): Json<SettleBody>,
) -> Result<Response, ApiError> {
    let subs = state.persistent(query.store.as_deref())?;
    group_info(subs, &stream, &group)?;
    checked_ids(&body)?;
    if body.action.is_some() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "action is for nacks only",
        ));
    }
    let outcomes = subs.ack(&group, &body.ack_ids).await?;
    Ok(axum::Json(outcomes_json(&body.ack_ids, &outcomes)).into_response())
}

/// Nacks deliveries: `retry` them after the group's `retry_delay` (parked after
/// `max_retries` failures), `park` them now, or `skip` them.
#[utoipa::path(
    post, path = "/v1/streams/{stream}/persistent/{group}/nack", tag = "streams",
    params(("stream" = String, Path, description = "Stream, `$all` or `$ce-<category>`"), ("group" = String, Path, description = "Group"), StoreQuery),
    request_body = SettleBody,
    responses(
        (status = 200, description = "`{\"results\": [{\"ack_id\",\"outcome\"}]}`", body = Object),
        (status = 404, description = "`subscription_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn nack(
    State(state): State<AppState>,
    Path((stream, group)): Path<(String, String)>,
    Query(query): Query<StoreQuery>,
    Json(body): Json<SettleBody>,
) -> Result<Response, ApiError> {
    let subs = state.persistent(query.store.as_deref())?;
    group_info(subs, &stream, &group)?;
    checked_ids(&body)?;
    let action = match body.action.as_deref() {
        None | Some("retry") => NackAction::Retry,
        Some("park") => NackAction::Park,
        Some("skip") => NackAction::Skip,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("action must be retry, park or skip, got {other:?}"),
            ));
        }
    };
    let outcomes = subs.nack(&group, &body.ack_ids, action).await?;
    Ok(axum::Json(outcomes_json(&body.ack_ids, &outcomes)).into_response())
}

/// Delivers every event parked so far to the group again (as `replayed`
/// deliveries, acked and nacked like any other).
#[utoipa::path(
    post, path = "/v1/streams/{stream}/persistent/{group}/replay-parked", tag = "streams",
    params(("stream" = String, Path, description = "Stream, `$all` or `$ce-<category>`"), ("group" = String, Path, description = "Group"), StoreQuery),
    responses(
        (status = 200, description = "`{\"queued\": n}`", body = Object),
        (status = 404, description = "`subscription_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn replay_parked(
    State(state): State<AppState>,
    Path((stream, group)): Path<(String, String)>,
    Query(query): Query<StoreQuery>,
) -> Result<Response, ApiError> {
    let subs = state.persistent(query.store.as_deref())?;
    group_info(subs, &stream, &group)?;
    let queued = subs.replay_parked(&group).await?;
    Ok(axum::Json(json!({ "queued": queued })).into_response())
}
