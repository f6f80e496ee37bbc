//! `/v1/registry/...`: the service registry. Instances register with a TTL (push
//! heartbeats), a phi-accrual detector, or an HTTP check the sidecar runs; reads can
//! block until the set changes (`?index=N&wait=30s`, as Consul's blocking queries),
//! and `GET /v1/registry/events` streams every change as Server-Sent Events.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use trellis_coord::detector::{Health, PhiSettings};
use trellis_coord::registry::{
    Change, Check, Event, Filter, Instance, Registration, Registry, RegistryError, Snapshot,
};
use trellis_core::config::units;

use super::AppState;
use crate::ApiError;
use crate::extract::{Json, Path, Query};

/// The longest a blocking query may wait (Consul's limit too).
const MAX_WAIT: Duration = Duration::from_secs(600);

/// The header carrying a read's index, for the next blocking query.
const INDEX_HEADER: &str = "trellis-index";

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/registry/services", get(services))
        .route("/v1/registry/services/{service}", get(instances))
        .route(
            "/v1/registry/services/{service}/instances/{id}",
            put(register).get(instance).delete(deregister),
        )
        .route(
            "/v1/registry/services/{service}/instances/{id}/heartbeat",
            post(heartbeat),
        )
        .route("/v1/registry/events", get(events))
}

impl AppState {
    fn service_registry(&self) -> &Registry {
        &self.service_registry
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::InvalidName { .. } => {
                ApiError::bad_request("invalid_name", e.to_string())
            }
            RegistryError::InvalidRegistration(_) => {
                ApiError::bad_request("invalid_registration", e.to_string())
            }
            RegistryError::UnknownInstance { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "instance_not_found", e.to_string())
            }
            RegistryError::NotPush { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_push_check", e.to_string())
            }
            RegistryError::Remote { .. } => {
                ApiError::new(StatusCode::CONFLICT, "remote_instance", e.to_string())
            }
            RegistryError::Full { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "registry_full",
                e.to_string(),
            )
            .with_retry_after(5),
            _ => ApiError::internal(e),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn health_str(h: Health) -> &'static str {
    match h {
        Health::Alive => "alive",
        Health::Suspect => "suspect",
        Health::Dead => "dead",
    }
}

fn instance_json(i: &Instance) -> Value {
    let now = Instant::now();
    let ago = |t: Instant| millis(now.saturating_duration_since(t));
    let until = |t: Instant| millis(t.saturating_duration_since(now));
    json!({
        "service": i.service,
        "id": i.id,
        "address": i.address,
        "metadata": i.metadata,
        "check": i.check,
        "health": health_str(i.health),
        "healthy": i.is_healthy(),
        "held_out_for_ms": i.held_out_until.map(until),
        "flap_penalty": (i.penalty * 10.0).round() / 10.0,
        "since_ms": ago(i.since),
        "last_heartbeat_ms": i.last_heartbeat.map(ago),
        "phi": i.phi.map(|p| (p * 100.0).round() / 100.0),
        "last_error": i.last_error,
        "deregister_in_ms": i.deregister_at.map(until),
        "modify_index": i.modify_index,
        "origin": i.origin,
    })
}

fn with_index(body: Value, index: u64) -> Response {
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(INDEX_HEADER, HeaderValue::from(index));
    response
}

fn snapshot_response(service: &str, s: &Snapshot) -> Response {
    with_index(
        json!({
            "service": service,
            "index": s.index,
            "instances": s.instances.iter().map(instance_json).collect::<Vec<_>>(),
        }),
        s.index,
    )
}

/// `PUT .../instances/{id}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    /// Where to reach the instance (`host:port` or a base URL).
    address: String,
    /// Labels.
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// Shorthand for a TTL check: heartbeat at least this often (e.g. `"10s"`).
    #[serde(default, deserialize_with = "units::option_duration")]
    #[schema(value_type = Option<String>)]
    ttl: Option<Duration>,
    /// The check: `{"type":"ttl","ttl":"10s","grace":"10s"}`,
    /// `{"type":"phi","suspect_threshold":5,"dead_threshold":10,"first_interval":"1s","acceptable_pause":"3s"}`
    /// or `{"type":"http","url":"http://...","interval":"10s","timeout":"2s","healthy_threshold":2,"unhealthy_threshold":3}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    check: Option<CheckBody>,
    /// Remove the instance this long after it is dead (default `"1m"`).
    #[serde(default, deserialize_with = "units::option_duration")]
    #[schema(value_type = Option<String>)]
    deregister_after: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum CheckBody {
    Ttl {
        #[serde(deserialize_with = "units::duration")]
        ttl: Duration,
        #[serde(default, deserialize_with = "units::option_duration")]
        grace: Option<Duration>,
    },
    Phi {
        #[serde(default)]
        suspect_threshold: Option<f64>,
        #[serde(default)]
        dead_threshold: Option<f64>,
        #[serde(default, deserialize_with = "units::option_duration")]
        first_interval: Option<Duration>,
        #[serde(default, deserialize_with = "units::option_duration")]
        acceptable_pause: Option<Duration>,
    },
    Http {
        url: String,
        #[serde(default, deserialize_with = "units::option_duration")]
        interval: Option<Duration>,
        #[serde(default, deserialize_with = "units::option_duration")]
        timeout: Option<Duration>,
        #[serde(default)]
        healthy_threshold: Option<u32>,
        #[serde(default)]
        unhealthy_threshold: Option<u32>,
    },
}

fn check_of(body: &RegisterBody) -> Result<Check, ApiError> {
    let invalid = |m: &str| ApiError::bad_request("invalid_check", m);
    match (&body.ttl, &body.check) {
        (Some(_), Some(_)) => Err(invalid("give either ttl or check, not both")),
        (None, None) => Err(invalid(
            "a registration needs a check: ttl (\"10s\") or check {\"type\": \"ttl\" | \"phi\" | \"http\", ...}",
        )),
        (Some(ttl), None) => Ok(Check::ttl(*ttl)),
        (None, Some(CheckBody::Ttl { ttl, grace })) => Ok(Check::Ttl {
            ttl: *ttl,
            grace: grace.unwrap_or(*ttl),
        }),
        (
            None,
            Some(CheckBody::Phi {
                suspect_threshold,
                dead_threshold,
                first_interval,
                acceptable_pause,
            }),
        ) => {
            let d = PhiSettings::default();
            Ok(Check::Phi(PhiSettings {
                suspect_threshold: suspect_threshold.unwrap_or(d.suspect_threshold),
                dead_threshold: dead_threshold.unwrap_or(d.dead_threshold),
                first_interval: first_interval.unwrap_or(d.first_interval),
                acceptable_pause: acceptable_pause.unwrap_or(d.acceptable_pause),
                ..d
            }))
        }
        (
            None,
            Some(CheckBody::Http {
                url,
                interval,
                timeout,
                healthy_threshold,
                unhealthy_threshold,
            }),
        ) => {
            let Check::Http {
                interval: di,
                timeout: dt,
                healthy_threshold: dh,
                unhealthy_threshold: du,
                ..
            } = Check::http("")
            else {
                return Err(ApiError::internal("http check defaults"));
            };
            Ok(Check::Http {
                url: url.clone(),
                interval: interval.unwrap_or(di),
                timeout: timeout.unwrap_or(dt),
                healthy_threshold: healthy_threshold.unwrap_or(dh),
                unhealthy_threshold: unhealthy_threshold.unwrap_or(du),
            })
        }
    }
}

/// Registers (or re-registers) an instance. Registering again with the same body
/// counts as a heartbeat; a different body replaces the instance.
#[utoipa::path(put, path = "/v1/registry/services/{service}/instances/{id}", tag = "registry", request_body = RegisterBody,
    params(("service" = String, Path, description = "Service"), ("id" = String, Path, description = "Instance id")),
    responses((status = 200, description = "The instance", body = Object),
              (status = 400, description = "`invalid_name`, `invalid_registration`, `invalid_check`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn register(
    State(state): State<AppState>,
    Path((service, id)): Path<(String, String)>,
    Json(body): Json<RegisterBody>,
) -> Result<Response, ApiError> {
    let check = check_of(&body)?;
    let mut registration = Registration::new(body.address, check);
    registration.metadata = body.metadata;
    if let Some(after) = body.deregister_after {
        registration.deregister_after = after;
    }
    let instance = state
        .service_registry()
        .register(&service, &id, registration)?;
    Ok(with_index(instance_json(&instance), instance.modify_index))
}

/// A heartbeat from a TTL- or phi-checked instance. 404 `instance_not_found` means
/// the registry has forgotten it (deregistered, or restarted): register again.
#[utoipa::path(post, path = "/v1/registry/services/{service}/instances/{id}/heartbeat", tag = "registry",
    params(("service" = String, Path, description = "Service"), ("id" = String, Path, description = "Instance id")),
    responses((status = 200, description = "The instance", body = Object),
              (status = 404, description = "`instance_not_found`: register again", body = crate::error::Problem, content_type = "application/problem+json"),
              (status = 409, description = "`not_push_check`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn heartbeat(
    State(state): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let instance = state.service_registry().heartbeat(&service, &id)?;
    Ok(with_index(instance_json(&instance), instance.modify_index))
}

/// Removes an instance.
#[utoipa::path(delete, path = "/v1/registry/services/{service}/instances/{id}", tag = "registry",
    params(("service" = String, Path, description = "Service"), ("id" = String, Path, description = "Instance id")),
    responses((status = 204, description = "Deregistered"),
              (status = 404, description = "`instance_not_found`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn deregister(
    State(state): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    state.service_registry().deregister(&service, &id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// One instance.
#[utoipa::path(get, path = "/v1/registry/services/{service}/instances/{id}", tag = "registry",
    params(("service" = String, Path, description = "Service"), ("id" = String, Path, description = "Instance id")),
    responses((status = 200, description = "The instance", body = Object),
              (status = 404, description = "`instance_not_found`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn instance(
    State(state): State<AppState>,
    Path((service, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let instance = state
        .service_registry()
        .instance(&service, &id)
        .ok_or_else(|| RegistryError::UnknownInstance {
            service: service.chars().take(128).collect(),
            id: id.chars().take(128).collect(),
        })?;
    Ok(with_index(instance_json(&instance), instance.modify_index))
}

/// `GET /v1/registry/services/{service}` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstancesQuery {
    /// Only alive instances that flap damping does not hold out.
    #[serde(default)]
    healthy: bool,
    /// Block until the service's index is above this (from `Trellis-Index`).
    #[serde(default)]
    index: Option<u64>,
    /// How long to block (default 5m, at most 10m), e.g. `"30s"`.
    #[serde(default, deserialize_with = "units::option_duration")]
    #[param(value_type = Option<String>)]
    wait: Option<Duration>,
}

/// A service's instances (`[]` for one nobody registered). With `index`, a blocking
/// query: answers when the set changes or `wait` passes. The `Trellis-Index` header
/// (and `index` field) is what to pass next time.
#[utoipa::path(get, path = "/v1/registry/services/{service}", tag = "registry",
    params(("service" = String, Path, description = "Service"), InstancesQuery),
    responses((status = 200, description = "`{\"service\",\"index\",\"instances\":[...]}`", body = Object),
              (status = 400, description = "`invalid_query`, `invalid_wait`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn instances(
    State(state): State<AppState>,
    Path(service): Path<String>,
    Query(query): Query<InstancesQuery>,
) -> Result<Response, ApiError> {
    let filter = if query.healthy {
        Filter::Healthy
    } else {
        Filter::All
    };
    let registry = state.service_registry();
    let snapshot = match query.index {
        None => registry.instances(&service, filter),
        Some(index) => {
            let wait = query.wait.unwrap_or(Duration::from_secs(300));
            if wait > MAX_WAIT {
                return Err(ApiError::bad_request(
                    "invalid_wait",
                    format!("wait {wait:?} is longer than the limit of 10m"),
                ));
            }
            registry.wait(&service, index, wait, filter).await
        }
    };
    Ok(snapshot_response(&service, &snapshot))
}

/// Every service with instances: `{index, services: [{service, instances, healthy, index}]}`.
#[utoipa::path(get, path = "/v1/registry/services", tag = "registry",
    responses((status = 200, description = "The services", body = Object)))]
pub(crate) async fn services(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (index, list) = state.service_registry().services();
    let list: Vec<Value> = list
        .iter()
        .map(|s| {
            json!({
                "service": s.service,
                "instances": s.instances,
                "healthy": s.healthy,
                "index": s.index,
            })
        })
        .collect();
    Ok(with_index(
        json!({ "index": index, "services": list }),
        index,
    ))
}

fn event_json(e: &Event) -> Value {
    let mut out = json!({
        "service": e.service,
        "id": e.id,
        "change": e.change.label(),
        "index": e.index,
    });
    match &e.change {
        Change::Health { from, to } => {
            out["from"] = health_str(*from).into();
            out["to"] = health_str(*to).into();
        }
        Change::HeldOut { until, penalty } => {
            out["held_out_for_ms"] = millis(until.saturating_duration_since(Instant::now())).into();
            out["flap_penalty"] = ((penalty * 10.0).round() / 10.0).into();
        }
        Change::Deregistered { dead } => out["dead"] = (*dead).into(),
        _ => {}
    }
    out
}

/// Every later change to any instance (registered, alive, suspect, dead, held_out,
/// released, deregistered) as Server-Sent Events named `change`.
#[utoipa::path(get, path = "/v1/registry/events", tag = "registry",
    responses((status = 200, description = "`text/event-stream`", content_type = "text/event-stream")))]
pub(crate) async fn events(
    State(state): State<AppState>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = state.service_registry().subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(e) => SseEvent::default()
                .event("change")
                .data(event_json(&e).to_string()),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => SseEvent::default()
                .event("lagged")
                .data(json!({ "skipped": n }).to_string()),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
