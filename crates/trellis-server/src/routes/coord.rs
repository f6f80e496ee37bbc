//! `/v1/locks/...` and `/v1/elections/...`: locks and leader election with fencing
//! tokens, on the sidecar's coordinator (embedded: `<data_dir>/coord.redb`).
//!
//! Durations are strings (`"10s"`, `"500ms"`). A blocking call (`wait`) answers when
//! it gets the lock or wins, or with 409 when `wait` runs out.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use trellis_coord::{CoordError, Coordinator, Kind, LeaderInfo, Lease, Name};
use trellis_core::config::units;

use super::AppState;
use crate::ApiError;
use crate::extract::{Json, Path};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/locks/{name}", get(lock_holder))
        .route("/v1/locks/{name}/acquire", post(acquire))
        .route("/v1/locks/{name}/extend", post(extend))
        .route("/v1/locks/{name}/release", post(release))
        .route("/v1/elections/{name}", get(leader))
        .route("/v1/elections/{name}/campaign", post(campaign))
        .route("/v1/elections/{name}/keep-alive", post(keep_alive))
        .route("/v1/elections/{name}/resign", post(resign))
        .route("/v1/elections/{name}/observe", get(observe))
}

impl AppState {
    fn coordinator(&self) -> Result<&Arc<dyn Coordinator>, ApiError> {
        self.coord.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                "no coordinator is running",
            )
        })
    }
}

fn name_of(name: &str) -> Result<Name, ApiError> {
    Name::new(name).map_err(|e| ApiError::bad_request("invalid_name", e.to_string()))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lease_json(lease: &Lease) -> Value {
    let holder = if lease.kind == Kind::Lock {
        "owner"
    } else {
        "leader"
    };
    json!({
        "name": lease.name.as_ref(),
        holder: lease.owner,
        "fencing_token": lease.fencing_token,
        "ttl_ms": millis(lease.ttl),
        "expires_in_ms": millis(lease.expires_at.saturating_duration_since(Instant::now())),
    })
}

fn leader_json(name: &Name, info: Option<&LeaderInfo>) -> Value {
    match info {
        None => json!({ "name": name.as_ref(), "leader": null }),
        Some(info) => json!({
            "name": name.as_ref(),
            "leader": info.candidate,
            "fencing_token": info.fencing_token,
            "ttl_ms": millis(info.ttl),
            "expires_in_ms": millis(info.expires_at.saturating_duration_since(Instant::now())),
        }),
    }
}

impl From<CoordError> for ApiError {
    fn from(e: CoordError) -> Self {
        match &e {
            CoordError::Timeout { kind, .. } => ApiError::new(
                StatusCode::CONFLICT,
                if *kind == Kind::Lock {
                    "lock_held"
                } else {
                    "not_elected"
                },
                e.to_string(),
            ),
            CoordError::NotHolder { kind, .. } => ApiError::new(
                StatusCode::FORBIDDEN,
                if *kind == Kind::Lock {
                    "not_lock_holder"
                } else {
                    "not_leader"
                },
                e.to_string(),
            ),
            CoordError::Invalid(trellis_coord::Invalid::Ttl { .. }) => {
                ApiError::bad_request("invalid_ttl", e.to_string())
            }
            CoordError::Invalid(trellis_coord::Invalid::Name { .. }) => {
                ApiError::bad_request("invalid_name", e.to_string())
            }
            CoordError::Invalid(_) => ApiError::bad_request("invalid_body", e.to_string()),
            CoordError::Overloaded { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
                    .with_retry_after(1)
            }
            CoordError::Closed | CoordError::Unavailable { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                e.to_string(),
            )
            .with_retry_after(1),
            _ => ApiError::internal(e),
        }
    }
}

/// `POST .../acquire` and `.../campaign` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AcquireBody {
    /// Who asks: the lock's owner (`owner`) or the candidate (`candidate`).
    #[serde(alias = "candidate")]
    owner: String,
    /// Lease duration, e.g. `"10s"`.
    #[serde(deserialize_with = "units::duration")]
    #[schema(value_type = String)]
    ttl: Duration,
    /// Wait up to this long (default 0: try once).
    #[serde(default, deserialize_with = "units::option_duration")]
    #[schema(value_type = Option<String>)]
    wait: Option<Duration>,
}

/// `POST .../extend`, `.../keep-alive` body (`ttl`), and `.../release`,
/// `.../resign` (no `ttl`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HolderBody {
    /// The holder.
    #[serde(alias = "candidate")]
    owner: String,
    /// The token it got.
    fencing_token: u64,
    /// The new lease duration (extend and keep-alive only).
    #[serde(default, deserialize_with = "units::option_duration")]
    #[schema(value_type = Option<String>)]
    ttl: Option<Duration>,
}

fn ttl_of(body: &HolderBody) -> Result<Duration, ApiError> {
    body.ttl
        .ok_or_else(|| ApiError::bad_request("invalid_ttl", "ttl is required"))
}

/// Acquires a lock or campaigns, waiting up to `wait`.
async fn grant(
    state: &AppState,
    kind: Kind,
    name: &str,
    body: AcquireBody,
) -> Result<Response, ApiError> {
    let coord = state.coordinator()?;
    let name = name_of(name)?;
    let wait = body.wait.unwrap_or_default();
    let lease = match kind {
        Kind::Lock => coord.acquire(&name, &body.owner, body.ttl, wait).await?,
        _ => coord.campaign(&name, &body.owner, body.ttl, wait).await?,
    };
    Ok(axum::Json(lease_json(&lease)).into_response())
}

/// Extends a lock or keeps a leader alive.
async fn renew(
    state: &AppState,
    kind: Kind,
    name: &str,
    body: HolderBody,
) -> Result<Response, ApiError> {
    let coord = state.coordinator()?;
    let name = name_of(name)?;
    let ttl = ttl_of(&body)?;
    let (owner, token) = (&body.owner, body.fencing_token);
    let lease = match kind {
        Kind::Lock => coord.extend(&name, owner, token, ttl).await?,
        _ => coord.keep_alive(&name, owner, token, ttl).await?,
    };
    Ok(axum::Json(lease_json(&lease)).into_response())
}

/// Releases a lock or resigns.
async fn give_up(
    state: &AppState,
    kind: Kind,
    name: &str,
    body: HolderBody,
) -> Result<Response, ApiError> {
    let coord = state.coordinator()?;
    let name = name_of(name)?;
    let (owner, token) = (&body.owner, body.fencing_token);
    match kind {
        Kind::Lock => coord.release(&name, owner, token).await?,
        _ => coord.resign(&name, owner, token).await?,
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Acquires a lock, waiting up to `wait`. The fencing token is strictly greater
/// than every earlier holder's: pass it to storage (`Trellis-Fencing`) so that a
/// holder that lost its lease can't overwrite its successor's work.
#[utoipa::path(post, path = "/v1/locks/{name}/acquire", tag = "coordination", request_body = AcquireBody,
    params(("name" = String, Path, description = "Lock")),
    responses((status = 200, description = "`{\"name\",\"owner\",\"fencing_token\",\"ttl_ms\",\"expires_in_ms\"}`", body = Object),
              (status = 409, description = "`lock_held`", body = crate::error::Problem, content_type = "application/problem+json"),
              (status = 400, description = "`invalid_ttl`, `invalid_name`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn acquire(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<AcquireBody>,
) -> Result<Response, ApiError> {
    grant(&state, Kind::Lock, &name, body).await
}

/// Extends a held lock (only by its holder: 403 `not_lock_holder` otherwise).
#[utoipa::path(post, path = "/v1/locks/{name}/extend", tag = "coordination", request_body = HolderBody,
    params(("name" = String, Path, description = "Lock")),
    responses((status = 200, description = "The lease", body = Object),
              (status = 403, description = "`not_lock_holder`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn extend(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<HolderBody>,
) -> Result<Response, ApiError> {
    renew(&state, Kind::Lock, &name, body).await
}

/// Releases a lock (only by its holder: 403 `not_lock_holder` otherwise).
#[utoipa::path(post, path = "/v1/locks/{name}/release", tag = "coordination", request_body = HolderBody,
    params(("name" = String, Path, description = "Lock")),
    responses((status = 204, description = "Released"),
              (status = 403, description = "`not_lock_holder`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn release(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<HolderBody>,
) -> Result<Response, ApiError> {
    give_up(&state, Kind::Lock, &name, body).await
}

/// Who holds a lock (`"owner": null` if nobody), and the newest token issued.
#[utoipa::path(get, path = "/v1/locks/{name}", tag = "coordination",
    params(("name" = String, Path, description = "Lock")),
    responses((status = 200, description = "The holder", body = Object)))]
pub(crate) async fn lock_holder(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let coord = state.coordinator()?;
    let name = name_of(&name)?;
    let latest = coord.latest_token(Kind::Lock, &name).await?;
    let mut out = match coord.lock_holder(&name).await? {
        Some(lease) => lease_json(&lease),
        None => json!({ "name": name.as_ref(), "owner": null }),
    };
    out["latest_token"] = Value::from(latest);
    Ok(axum::Json(out).into_response())
}

/// Campaigns for leadership, waiting up to `wait` to be elected.
#[utoipa::path(post, path = "/v1/elections/{name}/campaign", tag = "coordination", request_body = AcquireBody,
    params(("name" = String, Path, description = "Election")),
    responses((status = 200, description = "`{\"name\",\"leader\",\"fencing_token\",\"ttl_ms\",\"expires_in_ms\"}`", body = Object),
              (status = 409, description = "`not_elected`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn campaign(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<AcquireBody>,
) -> Result<Response, ApiError> {
    grant(&state, Kind::Election, &name, body).await
}

/// Keeps the leader's lease alive (only by the leader: 403 `not_leader`).
#[utoipa::path(post, path = "/v1/elections/{name}/keep-alive", tag = "coordination", request_body = HolderBody,
    params(("name" = String, Path, description = "Election")),
    responses((status = 200, description = "The lease", body = Object),
              (status = 403, description = "`not_leader`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn keep_alive(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<HolderBody>,
) -> Result<Response, ApiError> {
    renew(&state, Kind::Election, &name, body).await
}

/// Resigns leadership (only by the leader: 403 `not_leader`).
#[utoipa::path(post, path = "/v1/elections/{name}/resign", tag = "coordination", request_body = HolderBody,
    params(("name" = String, Path, description = "Election")),
    responses((status = 204, description = "Resigned"),
              (status = 403, description = "`not_leader`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn resign(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<HolderBody>,
) -> Result<Response, ApiError> {
    let coord = state.coordinator()?;
    let name = name_of(&name)?;
    coord.resign(&name, &body.owner, body.fencing_token).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The current leader (`"leader": null` between terms); 404 `election_not_found`
/// for an election that never had one.
#[utoipa::path(get, path = "/v1/elections/{name}", tag = "coordination",
    params(("name" = String, Path, description = "Election")),
    responses((status = 200, description = "The leader", body = Object),
              (status = 404, description = "`election_not_found`", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn leader(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let coord = state.coordinator()?;
    let name = name_of(&name)?;
    let info = coord.leader(&name).await?;
    if info.is_none() && coord.latest_token(Kind::Election, &name).await? == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "election_not_found",
            format!("election {name} never had a leader"),
        ));
    }
    Ok(axum::Json(leader_json(&name, info.as_ref())).into_response())
}

/// Every change of leader as Server-Sent Events (`event: leader`), starting with
/// the current one.
#[utoipa::path(get, path = "/v1/elections/{name}/observe", tag = "coordination",
    params(("name" = String, Path, description = "Election")),
    responses((status = 200, description = "text/event-stream", content_type = "text/event-stream", body = String)))]
pub(crate) async fn observe(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let coord = state.coordinator()?;
    let name = name_of(&name)?;
    let watch = coord.observe(&name).await?;
    let events = futures_util::stream::unfold((watch, true), move |(mut watch, first)| {
        let name = name.clone();
        async move {
            if !first && watch.changed().await.is_err() {
                return None;
            }
            let data = leader_json(&name, watch.borrow_and_update().as_ref()).to_string();
            Some((
                Ok::<_, Infallible>(SseEvent::default().event("leader").data(data)),
                (watch, false),
            ))
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
