//! `/v1/streams/...`: the event store over HTTP.
//!
//! The event store component is `?store=<name>` (default `default`). `$all` and
//! `$ce-<category>` are read-only system streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures_util::StreamExt as _;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use trellis_eventstore::event::{ALL, CATEGORY_PREFIX};
use trellis_eventstore::subscription::{Source, Start, subscribe};
use trellis_eventstore::{
    Append, Appended, AsOf, Body, Deletion, Direction, EventData, EventStore, EventStoreError,
    ExpectedVersion, Metadata, ReadStream, RecordedEvent, Snapshot, StreamMetadata, StreamName,
};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use crate::ApiError;
use crate::extract::{Json, Path, Query};

/// Most events in one append request (all streams together).
const MAX_EVENTS: usize = 10_000;
/// Most streams in one multi-stream append.
const MAX_STREAMS: usize = 100;
/// Default and largest page of a read.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/streams", post(append_multi))
        .route(
            "/v1/streams/{stream}",
            post(append).get(read).delete(delete),
        )
        .route("/v1/streams/{stream}/subscribe", get(subscribe_sse))
        .route(
            "/v1/streams/{stream}/metadata",
            get(get_metadata).put(put_metadata),
        )
        .route(
            "/v1/streams/{stream}/snapshot",
            get(get_snapshot).put(put_snapshot),
        )
}

// === request pieces ===

/// `?store=`: which event store component.
#[derive(Debug, Default, Deserialize, IntoParams)]
pub(crate) struct StoreQuery {
    /// The event store component (default `default`).
    pub(crate) store: Option<String>,
}

impl AppState {
    pub(crate) fn event_store(&self, name: Option<&str>) -> Result<&Arc<dyn EventStore>, ApiError> {
        let name = name.unwrap_or(trellis_core::config::DEFAULT_COMPONENT);
        self.eventstores.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.eventstores.keys().map(String::as_str).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "eventstore_not_found",
                format!(
                    "no event store named {name:?}; configured: {}",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
    }
}

/// What `stream` names for reading: `$all`, `$ce-<category>` or a stream.
pub(crate) fn source_of(stream: &str) -> Result<Source, ApiError> {
    stream
        .parse()
        .map_err(|e: trellis_eventstore::event::Invalid| {
            ApiError::bad_request("invalid_stream", e.to_string())
        })
}

pub(crate) fn stream_name(name: &str) -> Result<StreamName, ApiError> {
    StreamName::new(name).map_err(|e| ApiError::bad_request("invalid_stream", e.to_string()))
}

/// `"any" | "no_stream" | "exists" | N`.
fn expected_version<'de, D: Deserializer<'de>>(d: D) -> Result<ExpectedVersion, D::Error> {
    let value = Value::deserialize(d)?;
    parse_expected(&value).map_err(serde::de::Error::custom)
}

fn parse_expected(value: &Value) -> Result<ExpectedVersion, String> {
    match value {
        Value::String(s) if s == "any" => Ok(ExpectedVersion::Any),
        Value::String(s) if s == "no_stream" => Ok(ExpectedVersion::NoStream),
        Value::String(s) if s == "exists" => Ok(ExpectedVersion::Exists),
        Value::Number(n) if n.as_u64().is_some() => {
            Ok(ExpectedVersion::Exact(n.as_u64().unwrap_or_default()))
        }
        other => Err(format!(
            "expected_version must be \"any\", \"no_stream\", \"exists\" or a version (0 or more), got {other}"
        )),
    }
}

fn default_expected() -> ExpectedVersion {
    ExpectedVersion::Any
}

/// One event to append.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventBody {
    /// A UUID; generated if absent. Repeating an append with the same ids and
    /// expectation is a no-op.
    id: Option<String>,
    /// What happened, e.g. `OrderPlaced`.
    #[serde(rename = "type")]
    ty: String,
    /// JSON data.
    #[schema(value_type = Object)]
    data: Option<Box<RawValue>>,
    /// Binary data, base64 (instead of `data`).
    data_base64: Option<String>,
    /// `correlation_id`, `causation_id` and anything else.
    #[schema(value_type = Object)]
    metadata: Option<Map<String, Value>>,
}

impl EventBody {
    fn into_event(self, index: usize) -> Result<EventData, ApiError> {
        let bad = |m: String| {
            ApiError::bad_request("invalid_event", format!("event {index}: {m}"))
                .with_extension("index", index)
        };
        let data = match (self.data, self.data_base64) {
            (Some(_), Some(_)) => return Err(bad("give data or data_base64, not both".into())),
            (Some(raw), None) => Body::Json(raw),
            (None, Some(b64)) => Body::Bytes(
                STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| bad(format!("data_base64 is not base64: {e}")))?
                    .into(),
            ),
            (None, None) => Body::json(&Value::Null),
        };
        let metadata = Metadata::from_json(self.metadata.unwrap_or_default())
            .map_err(|e| bad(e.to_string()))?;
        let id = match self.id {
            Some(id) => {
                Uuid::parse_str(&id).map_err(|_| bad(format!("id {id:?} is not a UUID")))?
            }
            None => Uuid::new_v4(),
        };
        let event = EventData {
            id,
            ty: self.ty,
            data,
            metadata,
        };
        event.validate().map_err(|e| bad(e.to_string()))?;
        Ok(event)
    }
}

/// `POST /v1/streams/{stream}` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppendRequest {
    /// `"any"` (default), `"no_stream"`, `"exists"` or the version of the stream's last event.
    #[serde(default = "default_expected", deserialize_with = "expected_version")]
    #[schema(value_type = Object)]
    expected_version: ExpectedVersion,
    /// The events, in order.
    events: Vec<EventBody>,
}

/// One stream of `POST /v1/streams`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamAppend {
    /// The stream.
    stream: String,
    /// As in a single-stream append.
    #[serde(default = "default_expected", deserialize_with = "expected_version")]
    #[schema(value_type = Object)]
    expected_version: ExpectedVersion,
    /// The events.
    events: Vec<EventBody>,
}

/// `POST /v1/streams` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MultiAppendRequest {
    /// Appends to distinct streams, committed all or nothing.
    appends: Vec<StreamAppend>,
}

fn appended_json(a: &Appended) -> Value {
    json!({
        "stream": a.stream.as_str(),
        "version": a.version,
        "positions": if a.positions.is_empty() { Value::Null } else { json!({ "first": a.positions.start, "last": a.positions.end - 1 }) },
    })
}

fn events_of(events: Vec<EventBody>, offset: usize) -> Result<Vec<EventData>, ApiError> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, e)| e.into_event(offset + i))
        .collect()
}

impl From<EventStoreError> for ApiError {
    fn from(e: EventStoreError) -> Self {
        match e {
            EventStoreError::WrongExpectedVersion {
                ref stream, actual, ..
            } => {
                let stream = stream.to_string();
                ApiError::new(
                    StatusCode::CONFLICT,
                    "wrong_expected_version",
                    e.to_string(),
                )
                .with_extension("stream", stream)
                .with_extension("actual_version", actual.map_or(Value::Null, Value::from))
            }
            EventStoreError::StreamDeleted(ref stream) => {
                let stream = stream.to_string();
                ApiError::new(StatusCode::GONE, "stream_deleted", e.to_string())
                    .with_extension("stream", stream)
            }
            EventStoreError::StreamNotFound(ref stream) => {
                let stream = stream.to_string();
                ApiError::new(StatusCode::NOT_FOUND, "stream_not_found", e.to_string())
                    .with_extension("stream", stream)
            }
            EventStoreError::DuplicateEventId { .. } => {
                ApiError::new(StatusCode::CONFLICT, "duplicate_event_id", e.to_string())
            }
            EventStoreError::SubscriptionNotFound(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                "subscription_not_found",
                e.to_string(),
            ),
            EventStoreError::Invalid(_) => ApiError::bad_request("invalid_event", e.to_string()),
            EventStoreError::Unavailable { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                e.to_string(),
            )
            .with_retry_after(1),
            e => ApiError::internal(e),
        }
    }
}

fn check_size(count: usize) -> Result<(), ApiError> {
    if count > MAX_EVENTS {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("at most {MAX_EVENTS} events per append, got {count}"),
        ));
    }
    Ok(())
}

// === handlers ===

/// Append events to a stream, atomically, if it is at `expected_version`. Repeating
/// an append with the same event ids and expectation is a no-op (201, the first
/// outcome).
#[utoipa::path(
    post, path = "/v1/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "Stream"), StoreQuery),
    request_body = AppendRequest,
    responses(
        (status = 201, description = "`{\"stream\",\"version\",\"positions\":{\"first\",\"last\"}}`", body = Object),
        (status = 400, description = "`invalid_event` (with `index`), `invalid_stream`, `invalid_body`, `malformed_json`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`wrong_expected_version` (with `actual_version`), `duplicate_event_id`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 410, description = "`stream_deleted`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn append(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    Query(query): Query<StoreQuery>,
    Json(request): Json<AppendRequest>,
) -> Result<Response, ApiError> {
    let store = state.event_store(query.store.as_deref())?;
    let stream = stream_name(&stream)?;
    check_size(request.events.len())?;
    let events = events_of(request.events, 0)?;
    let appended = store
        .append(vec![Append {
            stream,
            expected: request.expected_version,
            events,
        }])
        .await?;
    let first = appended
        .first()
        .ok_or_else(|| ApiError::internal("append returned nothing"))?;
    Ok((StatusCode::CREATED, axum::Json(appended_json(first))).into_response())
}

/// Append to several streams at once, each with its own expected version: all or
/// nothing.
#[utoipa::path(
    post, path = "/v1/streams", tag = "streams",
    params(StoreQuery),
    request_body = MultiAppendRequest,
    responses(
        (status = 201, description = "`{\"results\": [...]}` in request order", body = Object),
        (status = 409, description = "`wrong_expected_version` (with `stream`, `actual_version`): nothing was appended", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn append_multi(
    State(state): State<AppState>,
    Query(query): Query<StoreQuery>,
    Json(request): Json<MultiAppendRequest>,
) -> Result<Response, ApiError> {
    let store = state.event_store(query.store.as_deref())?;
    if request.appends.is_empty() || request.appends.len() > MAX_STREAMS {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!(
                "give 1 to {MAX_STREAMS} appends, got {}",
                request.appends.len()
            ),
        ));
    }
    check_size(request.appends.iter().map(|a| a.events.len()).sum())?;
    let mut appends = Vec::with_capacity(request.appends.len());
    let mut offset = 0;
    for a in request.appends {
        let n = a.events.len();
        appends.push(Append {
            stream: stream_name(&a.stream)?,
            expected: a.expected_version,
            events: events_of(a.events, offset)?,
        });
        offset += n;
    }
    let appended = store.append(appends).await?;
    let results: Vec<Value> = appended.iter().map(appended_json).collect();
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "results": results })),
    )
        .into_response())
}

/// `GET /v1/streams/{stream}` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadQuery {
    /// The event store component (default `default`).
    store: Option<String>,
    /// First version to read (a stream), or first position (`$all`, `$ce-…`).
    from: Option<u64>,
    /// Same as `from`, for `$all`.
    from_position: Option<u64>,
    /// Page size, 1 to 10000 (default 100).
    limit: Option<usize>,
    /// `forward` (default) or `backward` (streams only).
    direction: Option<String>,
    /// Read the stream as it was at this version.
    as_of_version: Option<u64>,
    /// Read the stream as it was at this time (RFC 3339).
    as_of_time: Option<String>,
}

pub(crate) fn event_json(e: &RecordedEvent) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), Value::from(e.id.to_string()));
    out.insert("stream".into(), Value::from(e.stream.as_str()));
    out.insert("version".into(), Value::from(e.version));
    out.insert("position".into(), Value::from(e.position));
    out.insert("type".into(), Value::from(e.ty.clone()));
    let time = UNIX_EPOCH + Duration::from_millis(e.timestamp_ms);
    out.insert(
        "timestamp".into(),
        Value::from(humantime::format_rfc3339_millis(time).to_string()),
    );
    match &e.data {
        Body::Json(raw) => {
            out.insert(
                "data".into(),
                serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            );
        }
        Body::Bytes(b) => {
            out.insert("data_base64".into(), Value::from(STANDARD.encode(b)));
        }
    }
    out.insert("metadata".into(), Value::Object(e.metadata.to_json()));
    Value::Object(out)
}

fn limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {MAX_LIMIT}, got {limit}"),
        ));
    }
    Ok(limit)
}

/// Read a stream (`from`, `limit`, `direction`, `as_of_version`, `as_of_time`), `$all`
/// (`from_position`, `limit`) or a category `$ce-<category>` (`from`: a global
/// position).
#[utoipa::path(
    get, path = "/v1/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "Stream, `$all` or `$ce-<category>`"), ReadQuery),
    responses(
        (status = 200, description = "`{\"stream\",\"version\",\"events\",\"next\"}`", body = Object),
        (status = 404, description = "`stream_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 410, description = "`stream_deleted`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn read(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    Query(query): Query<ReadQuery>,
) -> Result<Response, ApiError> {
    let store = state.event_store(query.store.as_deref())?;
    let limit = limit(query.limit)?;
    let direction = match query.direction.as_deref() {
        None | Some("forward") => Direction::Forward,
        Some("backward") => Direction::Backward,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("direction must be forward or backward, got {other:?}"),
            ));
        }
    };
    if stream == ALL || stream.starts_with(CATEGORY_PREFIX) {
        if direction == Direction::Backward
            || query.as_of_version.is_some()
            || query.as_of_time.is_some()
        {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("{stream} is read forward by position only"),
            ));
        }
        let from = query.from_position.or(query.from).unwrap_or(0);
        let events = match stream.strip_prefix(CATEGORY_PREFIX) {
            Some(category) => store.read_category(category, from, limit).await?,
            None => store.read_all(from, limit).await?,
        };
        let next = events
            .last()
            .map(|e| e.position + 1)
            .filter(|_| events.len() == limit);
        let events: Vec<Value> = events.iter().map(event_json).collect();
        return Ok(
            axum::Json(json!({ "stream": stream, "events": events, "next": next })).into_response(),
        );
    }
    let name = stream_name(&stream)?;
    let as_of = match (query.as_of_version, query.as_of_time.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "give as_of_version or as_of_time, not both",
            ));
        }
        (Some(v), None) => Some(AsOf::Version(v)),
        (None, Some(t)) => {
            let time = humantime::parse_rfc3339_weak(t).map_err(|e| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("as_of_time is not an RFC 3339 time: {e}"),
                )
            })?;
            let ms = time
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            Some(AsOf::Timestamp(ms))
        }
        (None, None) => None,
    };
    let slice = store
        .read_stream(
            &name,
            ReadStream {
                from: query.from,
                limit,
                direction,
                as_of,
            },
        )
        .await?;
    let events: Vec<Value> = slice.events.iter().map(event_json).collect();
    Ok(axum::Json(json!({ "stream": name.as_str(), "version": slice.version, "events": events, "next": slice.next })).into_response())
}

/// `GET .../subscribe` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubscribeQuery {
    /// The event store component (default `default`).
    store: Option<String>,
    /// `start` (default), `end`, or a version (a stream) / position (`$all`, `$ce-…`).
    from: Option<String>,
}

/// Catch-up subscription as Server-Sent Events: history from `from`, then live events,
/// one `event: event` per event with its JSON (`id:` is its position, or version for a
/// stream). Flow-controlled: a slow reader slows the subscription, it is never
/// dropped.
#[utoipa::path(
    get, path = "/v1/streams/{stream}/subscribe", tag = "streams",
    params(("stream" = String, Path, description = "Stream, `$all` or `$ce-<category>`"), SubscribeQuery),
    responses((status = 200, description = "text/event-stream", content_type = "text/event-stream", body = String))
)]
pub(crate) async fn subscribe_sse(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    Query(query): Query<SubscribeQuery>,
) -> Result<Response, ApiError> {
    let store = Arc::clone(state.event_store(query.store.as_deref())?);
    let source = source_of(&stream)?;
    let start = match query.from.as_deref() {
        None | Some("start") => Start::Beginning,
        Some("end") => Start::End,
        Some(n) => Start::At(n.parse().map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("from must be start, end or a number, got {n:?}"),
            )
        })?),
    };
    let by_version = matches!(source, Source::Stream(_));
    let events = subscribe(store, source, start).map(move |item| {
        Ok::<_, Infallible>(match item {
            Ok(e) => SseEvent::default()
                .event("event")
                .id(if by_version { e.version } else { e.position }.to_string())
                .data(event_json(&e).to_string()),
            Err(e) => {
                let problem = ApiError::from(e);
                SseEvent::default()
                    .event("error")
                    .data(json!({ "code": problem.code(), "detail": problem.detail() }).to_string())
            }
        })
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `PUT .../metadata` body (and `GET` answer).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetadataBody {
    /// Hide events older than this (e.g. `"30d"`).
    #[serde(
        default,
        deserialize_with = "trellis_core::config::units::option_duration"
    )]
    #[schema(value_type = Option<String>)]
    max_age: Option<Duration>,
    /// Show only the newest this many events.
    max_count: Option<u64>,
    /// Hide events with a lower version.
    truncate_before: Option<u64>,
}

/// A stream's version, read limits and deletion state.
#[utoipa::path(
    get, path = "/v1/streams/{stream}/metadata", tag = "streams",
    params(("stream" = String, Path, description = "Stream"), StoreQuery),
    responses((status = 200, body = Object), (status = 404, description = "`stream_not_found`", body = crate::error::Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn get_metadata(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    Query(query): Query<StoreQuery>,
) -> Result<Response, ApiError> {
    let store = state.event_store(query.store.as_deref())?;
    let name = stream_name(&stream)?;
    let info = store
        .stream_info(&name)
        .await?
        .ok_or(EventStoreError::StreamNotFound(name))?;
    let m = info.metadata;
    Ok(axum::Json(json!({
        "stream": info.stream.as_str(),
        "version": info.version,
        "deleted": info.deleted.map(|d| match d { Deletion::Soft => "soft", Deletion::Hard => "hard" }),
        "max_age": m.max_age.map(|d| humantime::format_duration(d).to_string()),
        "max_count": m.max_count,
        "truncate_before": m.truncate_before,
    }))
    .into_response())
}

/// Set a stream's read limits: `max_age`, `max_count`, `truncate_before` (enforced on
/// reads; `$all` keeps the events).
#[utoipa::path(
    put, path = "/v1/streams/{stream}/metadata", tag = "streams",
    params(("stream" = String, Path, description = "Stream"), StoreQuery),
    request_body = MetadataBody,
    responses((status = 204, description = "Set"), (status = 410, description = "`stream_deleted`", body = crate::error::Problem, content_type = "application/problem+json"))
)]
pub(crate) async fn put_metadata(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    Query(query): Query<StoreQuery>,
    Json(body): Json<MetadataBody>,
) -> Result<Response, ApiError> {
    let store = state.event_store(query.store.as_deref())?;
    let name = stream_name(&stream)?;
    let metadata = StreamMetadata {
        max_age: body.max_age,
        max_count: body.max_count,
        truncate_before: body.truncate_before,
    };
    store.set_metadata(&name, metadata).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /v1/streams/{stream}` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteQuery {
    /// The event store component (default `default`).
    store: Option<String>,
    /// `any` (default), `exists` or a version.
    expected_version: Option<String>,
    /// `true`: tombstone the stream for good; default: soft delete (recreated by the
    /// next append).
    hard: Option<bool>,
}

/// Delete a stream: soft (its events hidden, recreated by appending) or hard
/// (tombstoned: reads and appends get 410).
#[utoipa::path(
    delete, path = "/v1/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "Stream"), DeleteQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "`stream_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`wrong_expected_version`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    let store = state.event_store(query.store.as_deref())?;
    let name = stream_name(&stream)?;
    let expected = match query.expected_version.as_deref() {
        None => ExpectedVersion::Any,
        Some(text) => {
            let value = text
                .parse::<u64>()
                .map_or_else(|_| Value::from(text), Value::from);
            parse_expected(&value).map_err(|e| ApiError::bad_request("invalid_query", e))?
        }
    };
    let how = if query.hard.unwrap_or(false) {
        Deletion::Hard
    } else {
        Deletion::Soft
    };
    store.delete(&name, expected, how).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT .../snapshot` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotBody {
    /// The version of the last event folded into the state.
    version: u64,
    /// The state.
    #[schema(value_type = Object)]
    data: Box<RawValue>,
}

/// Save a snapshot of an aggregate's state at a version.
#[utoipa::path(
    put, path = "/v1/streams/{stream}/snapshot", tag = "streams",
    params(("stream" = String, Path, description = "Stream"), StoreQuery),
    request_body = SnapshotBody,
    responses((status = 204, description = "Saved"))
)]
pub(crate) async fn put_snapshot(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    Query(query): Query<StoreQuery>,
    Json(body): Json<SnapshotBody>,
) -> Result<Response, ApiError> {
    let store = state.event_store(query.store.as_deref())?;
    let name = stream_name(&stream)?;
    store
        .save_snapshot(
            &name,
            Snapshot {
                version: body.version,
                data: Body::Json(body.data),
            },
        )
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The latest snapshot and the events after it (up to `limit`): everything needed to
/// load the aggregate.
#[utoipa::path(
    get, path = "/v1/streams/{stream}/snapshot", tag = "streams",
    params(("stream" = String, Path, description = "Stream"), StoreQuery),
    responses((status = 200, description = "`{\"snapshot\": {\"version\",\"data\"} | null, \"events\": [...], \"version\", \"next\"}`", body = Object))
)]
pub(crate) async fn get_snapshot(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    Query(query): Query<StoreQuery>,
) -> Result<Response, ApiError> {
    let store = state.event_store(query.store.as_deref())?;
    let name = stream_name(&stream)?;
    let snapshot = store.load_snapshot(&name).await?;
    let from = snapshot.as_ref().map_or(0, |s| s.version + 1);
    let slice = match store
        .read_stream(
            &name,
            ReadStream {
                from: Some(from),
                limit: MAX_LIMIT,
                ..ReadStream::default()
            },
        )
        .await
    {
        Ok(slice) => slice,
        Err(EventStoreError::StreamNotFound(_)) if snapshot.is_some() => Default::default(),
        Err(e) => return Err(e.into()),
    };
    let snapshot = snapshot.map(|s| {
        let data = match &s.data {
            Body::Json(raw) => serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            Body::Bytes(b) => Value::from(STANDARD.encode(b)),
        };
        json!({ "version": s.version, "data": data })
    });
    let events: Vec<Value> = slice.events.iter().map(event_json).collect();
    Ok(axum::Json(json!({ "snapshot": snapshot, "events": events, "version": slice.version, "next": slice.next })).into_response())
}
