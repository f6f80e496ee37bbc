//! Publish/subscribe over HTTP: publishing, pull consumers, topic stats, dead-letter
//! replay, and push subscriptions.

use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use trellis_core::config::units;
use trellis_pubsub::event::{CloudEvent, Defaults};
use trellis_pubsub::{AckOutcome, PubSub, PubSubError, SubscriptionSettings};
use utoipa::ToSchema;

use super::AppState;
use crate::ApiError;
use crate::context::RequestContext;
use crate::extract::{Body, Json, Path, parse_json};

/// Most events in one bulk publish.
pub(crate) const MAX_BULK_EVENTS: usize = 1000;
/// Most messages in one pull.
const MAX_PULL: usize = 1000;
/// Longest long poll.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Most ack ids in one settle call.
const MAX_ACK_IDS: usize = 10_000;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/publish/{pubsub}/{topic}", post(publish))
        .route("/v1/publish/{pubsub}/{topic}/bulk", post(publish_bulk))
        .route("/v1/pubsub/{pubsub}/topics/{topic}", get(topic_stats))
        .route(
            "/v1/pubsub/{pubsub}/topics/{topic}/dead-letters/replay",
            post(replay),
        )
        .route("/v1/pubsub/{pubsub}/subscriptions/{group}/pull", post(pull))
        .route("/v1/pubsub/{pubsub}/subscriptions/{group}/ack", post(ack))
        .route("/v1/pubsub/{pubsub}/subscriptions/{group}/nack", post(nack))
        .route(
            "/v1/pubsub/{pubsub}/subscriptions/{group}/extend",
            post(extend),
        )
        .route(
            "/v1/pubsub/{pubsub}/subscriptions/{group}/reject",
            post(reject),
        )
        .route("/v1/subscriptions", get(list_subscriptions))
        .route(
            "/v1/subscriptions/{name}",
            put(put_subscription)
                .get(get_subscription)
                .delete(delete_subscription),
        )
}

impl AppState {
    pub(crate) fn pubsub(&self, name: &str) -> Result<&std::sync::Arc<dyn PubSub>, ApiError> {
        self.pubsubs.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.pubsubs.keys().map(String::as_str).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "pubsub_not_found",
                format!(
                    "no pub/sub component named {name:?}; configured: {}",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
    }

    /// The settings for `group` on `topic`: a declared subscription's, else the
    /// component's defaults.
    async fn settings(&self, pubsub: &str, topic: &str, group: &str) -> SubscriptionSettings {
        let defaults = self
            .config
            .components
            .pubsub
            .get(pubsub)
            .map(|c| c.defaults().clone())
            .unwrap_or_default();
        match self.subscriptions.settings_of(pubsub, topic, group).await {
            Some(sub) => sub.settings(&defaults),
            None => defaults,
        }
    }
}

impl From<PubSubError> for ApiError {
    fn from(e: PubSubError) -> Self {
        match e {
            PubSubError::InvalidTopic(_) => ApiError::bad_request("invalid_topic", e.to_string()),
            PubSubError::InvalidGroup(_) => ApiError::bad_request("invalid_group", e.to_string()),
            PubSubError::InvalidEvent(_) => ApiError::bad_request("invalid_event", e.to_string()),
            PubSubError::TooLarge(_) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                e.to_string(),
            ),
            PubSubError::Unavailable { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                e.to_string(),
            )
            .with_retry_after(1),
            e => ApiError::internal(e),
        }
    }
}

// === publishing ===

/// Where published events get their missing attributes, and their trace.
fn defaults(topic: &str) -> Defaults {
    Defaults {
        source: "/trellis".into(),
        ty: format!("trellis.{topic}"),
    }
}

/// Records the publisher's trace on the event (the `traceparent` extension) so
/// deliveries join it.
fn add_trace(event: &mut CloudEvent, ctx: Option<&RequestContext>) {
    if let Some(ctx) = ctx
        && !event.extensions.contains_key("traceparent")
    {
        event
            .extensions
            .insert("traceparent".into(), Value::from(ctx.trace.to_string()));
    }
}

/// The header carrying a choreography's correlation id; it becomes the event's
/// `correlationid` extension (unless the event has one), and push deliveries carry
/// it back to subscribers.
pub(crate) const CORRELATION_HEADER: &str = "trellis-correlation-id";

/// Sets the `correlationid` extension from `Trellis-Correlation-Id`, if given.
fn add_correlation(event: &mut CloudEvent, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(CORRELATION_HEADER) else {
        return Ok(());
    };
    let id = value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_header",
                "Trellis-Correlation-Id must be non-empty visible ASCII",
            )
        })?;
    if !event.extensions.contains_key("correlationid") {
        event
            .set_extension("correlationid", Value::from(id))
            .map_err(|e| ApiError::bad_request("invalid_header", e.to_string()))?;
    }
    Ok(())
}

fn content_type(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get(header::CONTENT_TYPE)
        .map(|v| {
            v.to_str().map(str::to_owned).map_err(|_| {
                ApiError::bad_request("invalid_header", "Content-Type is not visible ASCII")
            })
        })
        .transpose()
}

fn media_type(content_type: Option<&str>) -> String {
    content_type
        .and_then(|c| c.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn invalid_event(message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_event", message.to_string())
}

/// A structured-mode event from JSON bytes.
fn structured(bytes: &[u8], defaults: &Defaults) -> Result<CloudEvent, ApiError> {
    let value: Map<String, Value> = parse_json(bytes)
        .map_err(|e| invalid_event(format!("not a CloudEvent JSON object: {}", e.detail())))?;
    CloudEvent::from_structured(value, defaults).map_err(invalid_event)
}

/// The event of a single publish, by its content type:
/// `application/cloudevents+json` is structured mode; `ce-*` headers are binary mode;
/// anything else is the data of a new event.
fn event_of(headers: &HeaderMap, body: Bytes, defaults: &Defaults) -> Result<CloudEvent, ApiError> {
    let content_type = content_type(headers)?;
    let media = media_type(content_type.as_deref());
    if media == "application/cloudevents-batch+json" {
        return Err(invalid_event(
            "a batch goes to /v1/publish/{pubsub}/{topic}/bulk",
        ));
    }
    if media == "application/cloudevents+json" {
        return structured(&body, defaults);
    }
    let mut ce = Vec::new();
    for (name, value) in headers {
        if name.as_str().starts_with("ce-") {
            let value = value
                .to_str()
                .map_err(|_| invalid_event(format!("header {name} is not visible ASCII")))?;
            ce.push((name.as_str(), value));
        }
    }
    CloudEvent::from_binary(ce, content_type.as_deref(), body, defaults).map_err(invalid_event)
}

/// One publish's outcome.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PublishedView {
    /// The event id (generated if the publisher gave none).
    id: String,
    /// Its position in the topic.
    position: u64,
    /// Already published within the dedupe window: stored once.
    duplicate: bool,
    /// `fsync` (on this node's disk), `async` (written, not yet fsynced) or `broker`
    /// (stored as the broker's own durability settings say).
    #[schema(value_type = String)]
    durability: trellis_pubsub::Durability,
}

/// Publish one event. Structured mode with `Content-Type: application/cloudevents+json`;
/// binary mode with `ce-*` headers; any other body becomes the `data` of a new event.
/// `id`, `source` and `type` are filled in when missing. 201 once the event is
/// stored as durably as `durability` says.
#[utoipa::path(
    post, path = "/v1/publish/{pubsub}/{topic}", tag = "pubsub",
    params(("pubsub" = String, Path, description = "Pub/sub component"), ("topic" = String, Path, description = "Topic")),
    request_body(content = Object, description = "A CloudEvent (structured), or the data (binary mode / raw)"),
    responses(
        (status = 201, body = PublishedView),
        (status = 400, description = "`invalid_event`, `invalid_topic`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`pubsub_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`backend_unavailable`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn publish(
    State(state): State<AppState>,
    Path((pubsub, topic)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let ps = state.pubsub(&pubsub)?;
    trellis_pubsub::check_topic(&topic)?;
    let ctx = req.extensions().get::<RequestContext>().cloned();
    let headers = req.headers().clone();
    let Body(body) = <Body as axum::extract::FromRequest<()>>::from_request(req, &()).await?;
    let mut event = event_of(&headers, body, &defaults(&topic))?;
    add_trace(&mut event, ctx.as_ref());
    add_correlation(&mut event, &headers)?;
    let published = ps.publish(&topic, vec![event]).await?;
    let receipt = published
        .receipts
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("publish returned no receipt"))?;
    let view = PublishedView {
        id: receipt.id,
        position: receipt.position,
        duplicate: receipt.duplicate,
        durability: published.durability,
    };
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// A bulk publish's outcome.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BulkPublishedView {
    /// Per event, in order.
    results: Vec<BulkResult>,
    /// How durable every event is.
    #[schema(value_type = String)]
    durability: trellis_pubsub::Durability,
}

/// One event of a bulk publish.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BulkResult {
    id: String,
    position: u64,
    duplicate: bool,
}

/// Publish a batch: a JSON array of structured CloudEvents (any content type,
/// including `application/cloudevents-batch+json`). All or nothing: one invalid
/// event fails the batch with its `index`.
#[utoipa::path(
    post, path = "/v1/publish/{pubsub}/{topic}/bulk", tag = "pubsub",
    params(("pubsub" = String, Path, description = "Pub/sub component"), ("topic" = String, Path, description = "Topic")),
    request_body(content = Vec<Object>, description = "CloudEvents in structured mode (1 to 1000)"),
    responses(
        (status = 201, body = BulkPublishedView),
        (status = 400, description = "`invalid_event` (with `index`), `malformed_json`, `invalid_body`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`pubsub_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload_too_large`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn publish_bulk(
    State(state): State<AppState>,
    Path((pubsub, topic)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let ps = state.pubsub(&pubsub)?;
    trellis_pubsub::check_topic(&topic)?;
    let ctx = req.extensions().get::<RequestContext>().cloned();
    let Json(items) =
        <Json<Vec<Box<RawValue>>> as axum::extract::FromRequest<()>>::from_request(req, &())
            .await?;
    if items.is_empty() || items.len() > MAX_BULK_EVENTS {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("send 1 to {MAX_BULK_EVENTS} events, got {}", items.len()),
        ));
    }
    let defaults = defaults(&topic);
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let mut event = structured(item.get().as_bytes(), &defaults).map_err(|e| {
            ApiError::bad_request("invalid_event", format!("event {index}: {}", e.detail()))
                .with_extension("index", index)
        })?;
        add_trace(&mut event, ctx.as_ref());
        events.push(event);
    }
    let published = ps.publish(&topic, events).await?;
    let view = BulkPublishedView {
        results: published
            .receipts
            .into_iter()
            .map(|r| BulkResult {
                id: r.id,
                position: r.position,
                duplicate: r.duplicate,
            })
            .collect(),
        durability: published.durability,
    };
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

// === topics ===

/// A topic's head, oldest kept position, and per consumer group its lag, deliveries
/// in flight, redeliveries pending and dead letters.
#[utoipa::path(
    get, path = "/v1/pubsub/{pubsub}/topics/{topic}", tag = "pubsub",
    params(("pubsub" = String, Path, description = "Pub/sub component"), ("topic" = String, Path, description = "Topic")),
    responses(
        (status = 200, body = Object),
        (status = 404, description = "`pubsub_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn topic_stats(
    State(state): State<AppState>,
    Path((pubsub, topic)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let ps = state.pubsub(&pubsub)?;
    let stats = ps.stats(&topic).await?;
    let mut value = serde_json::to_value(&stats).map_err(ApiError::internal)?;
    if let Some(object) = value.as_object_mut() {
        object.insert("backend".into(), Value::from(ps.backend()));
    }
    Ok(axum::Json(value).into_response())
}

/// `POST .../dead-letters/replay` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplayRequest {
    /// The dead-letter topic, if not `<topic>.dlq`.
    dead_letter_topic: Option<String>,
}

/// Republishes every message of the topic's dead-letter topic to the topic (without
/// the dead-letter attributes), so every group gets it again.
#[utoipa::path(
    post, path = "/v1/pubsub/{pubsub}/topics/{topic}/dead-letters/replay", tag = "pubsub",
    params(("pubsub" = String, Path, description = "Pub/sub component"), ("topic" = String, Path, description = "Topic")),
    request_body(content = ReplayRequest, description = "Optional"),
    responses((status = 200, description = "`{\"replayed\": n}`", body = Object))
)]
pub(crate) async fn replay(
    State(state): State<AppState>,
    Path((pubsub, topic)): Path<(String, String)>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let ps = state.pubsub(&pubsub)?;
    trellis_pubsub::check_topic(&topic)?;
    let request: ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayRequest::default()
    } else {
        parse_json(&body)?
    };
    let mut settings = state
        .config
        .components
        .pubsub
        .get(&pubsub)
        .map(|c| c.defaults().clone())
        .unwrap_or_default();
    if let Some(dlq) = request.dead_letter_topic {
        trellis_pubsub::check_topic(&dlq)?;
        settings.dead_letter_topic = Some(dlq);
    }
    let replayed = ps.replay_dead_letters(&topic, &settings).await?;
    Ok(axum::Json(serde_json::json!({ "replayed": replayed })).into_response())
}

// === pull consumers ===

/// `POST .../pull` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PullRequest {
    /// The topic.
    topic: String,
    /// Most messages to return, 1 to 1000 (default 10).
    #[serde(default = "default_max")]
    max: usize,
    /// Wait up to this long for the first message (long poll), 0 to 60000 (default 0).
    #[serde(default)]
    wait_ms: u64,
    /// Overrides the ack deadline of this group on this topic (e.g. `"30s"`).
    #[serde(default, deserialize_with = "units::option_duration")]
    #[schema(value_type = Option<String>)]
    ack_deadline: Option<Duration>,
    /// Overrides `max_deliveries`.
    #[serde(default)]
    max_deliveries: Option<u32>,
    /// Overrides `max_in_flight`.
    #[serde(default)]
    max_in_flight: Option<u32>,
    /// Overrides the dead-letter topic.
    #[serde(default)]
    dead_letter_topic: Option<String>,
}

fn default_max() -> usize {
    10
}

/// One pulled message.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MessageView {
    /// Settles this delivery (ack, nack, extend, reject).
    ack_id: String,
    /// 1 for the first delivery.
    attempt: u32,
    /// Position in the topic.
    position: u64,
    /// Ordering key, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// The CloudEvent (structured).
    #[schema(value_type = Object)]
    event: Box<RawValue>,
}

/// Pull messages for a consumer group: up to `max`, waiting up to `wait_ms` for the
/// first. Each must be acked (or nacked) before its ack deadline, else it is
/// redelivered. The group's settings are those of a subscription declared for it,
/// else the component's defaults, with the overrides given here.
#[utoipa::path(
    post, path = "/v1/pubsub/{pubsub}/subscriptions/{group}/pull", tag = "pubsub",
    params(("pubsub" = String, Path, description = "Pub/sub component"), ("group" = String, Path, description = "Consumer group")),
    request_body = PullRequest,
    responses(
        (status = 200, description = "`{\"messages\": [...]}`", body = Object),
        (status = 400, description = "`invalid_body`, `invalid_topic`, `invalid_group`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`pubsub_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn pull(
    State(state): State<AppState>,
    Path((pubsub, group)): Path<(String, String)>,
    Json(request): Json<PullRequest>,
) -> Result<Response, ApiError> {
    let ps = state.pubsub(&pubsub)?;
    if !(1..=MAX_PULL).contains(&request.max) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("max must be 1 to {MAX_PULL}, got {}", request.max),
        ));
    }
    let wait = Duration::from_millis(request.wait_ms);
    if wait > MAX_WAIT {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!(
                "wait_ms must be at most {}, got {}",
                MAX_WAIT.as_millis(),
                request.wait_ms
            ),
        ));
    }
    trellis_pubsub::check_topic(&request.topic)?;
    trellis_pubsub::check_group(&group)?;
    let mut settings = state.settings(&pubsub, &request.topic, &group).await;
    settings.ack_deadline = request.ack_deadline.unwrap_or(settings.ack_deadline);
    settings.max_deliveries = request.max_deliveries.unwrap_or(settings.max_deliveries);
    settings.max_in_flight = request.max_in_flight.unwrap_or(settings.max_in_flight);
    if let Some(dlq) = request.dead_letter_topic {
        settings.dead_letter_topic = Some(dlq);
    }
    settings.validate().map_err(|(field, message)| {
        ApiError::bad_request("invalid_body", format!("{field}: {message}"))
    })?;
    let deliveries = ps
        .pull(&request.topic, &group, &settings, request.max, wait)
        .await?;
    let mut messages = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        let text = String::from_utf8(d.event.to_vec()).map_err(ApiError::internal)?;
        let event = RawValue::from_string(text).map_err(ApiError::internal)?;
        messages.push(MessageView {
            ack_id: d.ack_id,
            attempt: d.attempt,
            position: d.position,
            key: d.key,
            event,
        });
    }
    Ok(axum::Json(serde_json::json!({ "messages": messages })).into_response())
}

/// `POST .../ack|nack|extend|reject` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettleRequest {
    /// Ack ids from a pull (1 to 10000).
    ack_ids: Vec<String>,
    /// nack: redeliver after this (default: the backoff).
    #[serde(default)]
    delay_ms: Option<u64>,
    /// extend: the new deadline, from now.
    #[serde(default)]
    by_ms: Option<u64>,
    /// reject: why (recorded in `deadletterreason`).
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack,
    Nack,
    Extend,
    Reject,
}

impl Settle {
    fn allowed(self, request: &SettleRequest) -> Result<(), ApiError> {
        let extra = match self {
            Settle::Ack => [
                ("delay_ms", request.delay_ms.is_some()),
                ("by_ms", request.by_ms.is_some()),
                ("reason", request.reason.is_some()),
            ],
            Settle::Nack => [
                ("by_ms", request.by_ms.is_some()),
                ("reason", request.reason.is_some()),
                ("", false),
            ],
            Settle::Extend => [
                ("delay_ms", request.delay_ms.is_some()),
                ("reason", request.reason.is_some()),
                ("", false),
            ],
            Settle::Reject => [
                ("delay_ms", request.delay_ms.is_some()),
                ("by_ms", request.by_ms.is_some()),
                ("", false),
            ],
        };
        match extra.iter().find(|(_, present)| *present) {
            Some((field, _)) => Err(ApiError::bad_request(
                "invalid_body",
                format!("{field} does not apply to {self:?}").to_lowercase(),
            )),
            None => Ok(()),
        }
    }
}

async fn settle(
    state: &AppState,
    pubsub: &str,
    group: &str,
    request: SettleRequest,
    how: Settle,
) -> Result<Response, ApiError> {
    let ps = state.pubsub(pubsub)?;
    trellis_pubsub::check_group(group)?;
    how.allowed(&request)?;
    if request.ack_ids.is_empty() || request.ack_ids.len() > MAX_ACK_IDS {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!(
                "send 1 to {MAX_ACK_IDS} ack_ids, got {}",
                request.ack_ids.len()
            ),
        ));
    }
    let ids = &request.ack_ids;
    let outcomes = match how {
        Settle::Ack => ps.ack(group, ids).await?,
        Settle::Nack => {
            ps.nack(group, ids, request.delay_ms.map(Duration::from_millis))
                .await?
        }
        Settle::Extend => {
            let by = request
                .by_ms
                .ok_or_else(|| ApiError::bad_request("invalid_body", "by_ms is required"))?;
            if !(1..=3_600_000).contains(&by) {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    format!("by_ms must be 1 to 3600000, got {by}"),
                ));
            }
            ps.extend(group, ids, Duration::from_millis(by)).await?
        }
        Settle::Reject => {
            let reason = request
                .reason
                .as_deref()
                .unwrap_or("rejected by the consumer");
            if reason.len() > 1024 {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "reason must be at most 1024 bytes",
                ));
            }
            ps.reject(group, ids, reason).await?
        }
    };
    let results: Vec<Value> = ids
        .iter()
        .zip(&outcomes)
        .map(|(id, outcome)| serde_json::json!({ "ack_id": id, "outcome": outcome }))
        .collect();
    match outcomes.iter().find(|o| **o != AckOutcome::Ok) {
        None => Ok(axum::Json(serde_json::json!({ "results": results })).into_response()),
        Some(AckOutcome::NotFound) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ack_id_not_found",
            "an ack id is unknown (malformed, or never delivered to this group); the others in `results` were applied",
        )
        .with_extension("results", results)),
        Some(_) => Err(ApiError::new(
            StatusCode::GONE,
            "ack_id_expired",
            "an ack id is no longer current (already settled, or its deadline passed and it was redelivered); the others in `results` were applied",
        )
        .with_extension("results", results)),
    }
}

macro_rules! settle_handler {
    ($name:ident, $how:expr, $path:literal, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(
            post, path = $path, tag = "pubsub",
            params(("pubsub" = String, Path, description = "Pub/sub component"), ("group" = String, Path, description = "Consumer group")),
            request_body = SettleRequest,
            responses(
                (status = 200, description = "`{\"results\": [{\"ack_id\", \"outcome\"}]}`", body = Object),
                (status = 404, description = "`ack_id_not_found`, `pubsub_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
                (status = 410, description = "`ack_id_expired`", body = crate::error::Problem, content_type = "application/problem+json"),
            )
        )]
        pub(crate) async fn $name(
            State(state): State<AppState>,
            Path((pubsub, group)): Path<(String, String)>,
            Json(request): Json<SettleRequest>,
        ) -> Result<Response, ApiError> {
            settle(&state, &pubsub, &group, request, $how).await
        }
    };
}

settle_handler!(
    ack,
    Settle::Ack,
    "/v1/pubsub/{pubsub}/subscriptions/{group}/ack",
    "Acknowledge deliveries: done."
);
settle_handler!(
    nack,
    Settle::Nack,
    "/v1/pubsub/{pubsub}/subscriptions/{group}/nack",
    "Return deliveries for redelivery after `delay_ms` (default: the backoff); on the last allowed delivery, dead-letter them."
);
settle_handler!(
    extend,
    Settle::Extend,
    "/v1/pubsub/{pubsub}/subscriptions/{group}/extend",
    "Move deliveries' ack deadlines to `by_ms` from now."
);
settle_handler!(
    reject,
    Settle::Reject,
    "/v1/pubsub/{pubsub}/subscriptions/{group}/reject",
    "Send deliveries to the dead-letter topic now, with `reason`."
);

// === push subscriptions ===

/// Every push subscription, with its effective settings and delivery counts.
#[utoipa::path(get, path = "/v1/subscriptions", tag = "pubsub", responses((status = 200, description = "`{\"subscriptions\": [...]}`", body = Object)))]
pub(crate) async fn list_subscriptions(State(state): State<AppState>) -> Response {
    axum::Json(serde_json::json!({ "subscriptions": state.subscriptions.list().await }))
        .into_response()
}

/// One push subscription.
#[utoipa::path(
    get, path = "/v1/subscriptions/{name}", tag = "pubsub",
    params(("name" = String, Path, description = "Subscription")),
    responses(
        (status = 200, body = crate::subscriptions::SubscriptionView),
        (status = 404, description = "`subscription_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn get_subscription(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    state
        .subscriptions
        .get(&name)
        .await
        .map(|v| axum::Json(v).into_response())
        .ok_or_else(|| subscription_not_found(&name))
}

fn subscription_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "subscription_not_found",
        format!("no subscription named {name:?}"),
    )
}

/// Create or replace a push subscription: `{"pubsub","topic","group","app","route",
/// "max_in_flight","ack_deadline","max_deliveries","min_backoff","max_backoff",
/// "dead_letter_topic"}` (only `topic`, `app` and `route` are required). Kept across
/// restarts. 201 when created, 200 when replaced.
#[utoipa::path(
    put, path = "/v1/subscriptions/{name}", tag = "pubsub",
    params(("name" = String, Path, description = "Subscription")),
    request_body(content = Object, description = "The subscription"),
    responses(
        (status = 201, description = "Created", body = crate::subscriptions::SubscriptionView),
        (status = 200, description = "Replaced", body = crate::subscriptions::SubscriptionView),
        (status = 400, description = "`invalid_subscription` (with `fields`), `malformed_json`, `invalid_body`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`pubsub_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`subscription_in_config`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn put_subscription(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "expected a JSON object",
        ));
    }
    let created = state.subscriptions.put(&name, body).await?;
    let view = state
        .subscriptions
        .get(&name)
        .await
        .ok_or_else(|| subscription_not_found(&name))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(view)).into_response())
}

/// Stop and remove a push subscription declared through the API. Its consumer
/// group's position stays, so re-creating it resumes where it stopped.
#[utoipa::path(
    delete, path = "/v1/subscriptions/{name}", tag = "pubsub",
    params(("name" = String, Path, description = "Subscription")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "`subscription_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`subscription_in_config`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn delete_subscription(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if state.subscriptions.delete(&name).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(subscription_not_found(&name))
    }
}
