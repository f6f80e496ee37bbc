//! `/v1/resilience`: every policy instance's state, and runtime switches for fault
//! injection and breakers.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use trellis_proxy::GroupSnapshot;
use trellis_resilience::breaker::{BreakerSnapshot, Mode};
use trellis_resilience::fault::FaultConfig;
use trellis_resilience::stack::ResilienceSnapshot;
use utoipa::ToSchema;

use super::AppState;
use crate::ApiError;
use crate::extract::{Json, Path};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/resilience", get(status))
        .route("/v1/resilience/events", get(events))
        .route("/v1/resilience/faults/{name}", put(set_fault))
        .route("/v1/resilience/breakers/{name}", put(set_breaker))
}

/// Every breaker, bulkhead, limiter, retry budget and fault injector, and every app's
/// instances.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Status {
    #[serde(flatten)]
    #[schema(value_type = Object)]
    policies: ResilienceSnapshot,
    /// Per app: load balancing and each instance's health, ejection, load, latency.
    #[schema(value_type = Vec<Object>)]
    upstreams: Vec<GroupSnapshot>,
}

/// The state of every resilience policy and upstream.
#[utoipa::path(get, path = "/v1/resilience", tag = "resilience", responses((status = 200, body = Status)))]
pub(crate) async fn status(State(state): State<AppState>) -> axum::Json<Status> {
    axum::Json(Status {
        policies: state.registry.snapshot(),
        upstreams: state.invoker.snapshot(),
    })
}

/// Fault injection settings (all fields optional; omitted ones are 0 / defaults).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultRequest {
    /// Percent of calls delayed (0-100).
    #[serde(default)]
    delay_percent: f64,
    /// Delay, e.g. "500ms".
    #[serde(default)]
    delay: Option<String>,
    /// Percent of calls aborted (0-100).
    #[serde(default)]
    abort_percent: f64,
    /// Status of aborted calls (default 503).
    #[serde(default)]
    abort_status: Option<u16>,
}

/// Switch fault injection of a target at runtime (`{}` turns it off).
#[utoipa::path(
    put, path = "/v1/resilience/faults/{name}", tag = "resilience",
    params(("name" = String, Path, description = "The target: an app, or app + route prefix")),
    request_body = FaultRequest,
    responses(
        (status = 200, description = "The settings now in effect", body = Object),
        (status = 400, description = "`invalid_fault`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`fault_not_found`: the target has no fault policy", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn set_fault(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(request): Json<FaultRequest>,
) -> Result<axum::Json<FaultConfig>, ApiError> {
    let faults = state.registry.faults(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "fault_not_found",
            format!("target {name:?} has no fault policy; attach one in [resiliency.targets]"),
        )
    })?;
    let defaults = FaultConfig::default();
    let delay = match &request.delay {
        Some(text) => humantime_duration(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_fault",
                format!("delay {text:?} is not a duration such as \"500ms\""),
            )
        })?,
        None => defaults.delay,
    };
    let config = FaultConfig {
        delay_percent: request.delay_percent,
        delay,
        abort_percent: request.abort_percent,
        abort_status: request.abort_status.unwrap_or(defaults.abort_status),
    };
    faults.set(config).map_err(|(field, message)| {
        ApiError::bad_request("invalid_fault", format!("{field}: {message}"))
    })?;
    Ok(axum::Json(faults.get()))
}

fn humantime_duration(text: &str) -> Option<std::time::Duration> {
    #[derive(Deserialize)]
    struct D(
        #[serde(deserialize_with = "trellis_core::config::units::duration")] std::time::Duration,
    );
    serde_json::from_value::<D>(serde_json::Value::String(text.to_owned()))
        .ok()
        .map(|d| d.0)
}

/// A breaker's mode.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BreakerRequest {
    /// `auto`, `disabled` or `forced_open`.
    #[schema(value_type = String)]
    mode: Mode,
}

/// Force a breaker open, disable it, or return it to automatic (closed, fresh window).
#[utoipa::path(
    put, path = "/v1/resilience/breakers/{name}", tag = "resilience",
    params(("name" = String, Path, description = "The breaker (its target's name)")),
    request_body = BreakerRequest,
    responses(
        (status = 200, description = "The breaker now", body = Object),
        (status = 404, description = "`breaker_not_found`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn set_breaker(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(request): Json<BreakerRequest>,
) -> Result<axum::Json<BreakerSnapshot>, ApiError> {
    let breaker = state.registry.breaker(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "breaker_not_found",
            format!("no breaker named {name:?}"),
        )
    })?;
    breaker.set_mode(request.mode);
    Ok(axum::Json(breaker.snapshot()))
}

/// Breaker state transitions as Server-Sent Events (`event: breaker`, data
/// `{"breaker","from","to"}`), from now on.
#[utoipa::path(
    get, path = "/v1/resilience/events", tag = "resilience",
    responses((status = 200, description = "A text/event-stream of breaker transitions", content_type = "text/event-stream", body = String))
)]
pub(crate) async fn events(
    State(state): State<AppState>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};

    // One channel fed by every breaker; bounded, and a subscriber that lags just
    // skips what it missed (the current state is always at GET /v1/resilience).
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    for breaker in state.registry.breakers() {
        let mut events = breaker.subscribe();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let data = serde_json::to_string(&event).unwrap_or_default();
        Some((Ok(Event::default().event("breaker").data(data)), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
