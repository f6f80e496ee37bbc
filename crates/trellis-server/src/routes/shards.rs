//! `/v1/shards/...`: shard maps (`[shards.<name>]`) — who owns a key, the whole
//! assignment with the last rebalance, and runtime membership of static maps.
//!
//! Membership set with `PUT /v1/shards/{name}/members` lives in this sidecar's memory
//! (the config file wins on restart), like the runtime APIs of HAProxy and Envoy:
//! with several sidecars, send it to each, or let the service registry drive the
//! members (`members = { registry = "<service>" }`).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use trellis_core::config::{ShardMember, ShardMembers};
use utoipa::ToSchema;

use super::AppState;
use crate::ApiError;
use crate::extract::{Json, Path, Query};
use crate::shards::{ShardMap, ShardsError};

/// The request header naming the shard key of an invocation.
pub(crate) static SHARD_KEY: axum::http::HeaderName =
    axum::http::HeaderName::from_static("trellis-shard-key");

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/shards", get(list))
        .route("/v1/shards/{name}", get(assignment))
        .route("/v1/shards/{name}/owner", get(owner))
        .route("/v1/shards/{name}/members", put(set_members))
}

impl From<ShardsError> for ApiError {
    fn from(e: ShardsError) -> Self {
        match &e {
            ShardsError::UnknownMap(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_shard_map", e.to_string())
            }
            ShardsError::InvalidMembers(_) | ShardsError::Strategy(_) => {
                ApiError::bad_request("invalid_members", e.to_string())
            }
            ShardsError::NoPubSub(_) => ApiError::internal(e),
        }
    }
}

fn summary(map: &ShardMap) -> Value {
    let placement = map.placement();
    json!({
        "name": map.name(),
        "strategy": map.config().strategy.as_str(),
        "shards": map.config().shards,
        "members": placement.members.len(),
        "source": map.source(),
        "app": map.config().bound_app(),
        "version": placement.version,
    })
}

/// Every shard map: name, strategy, shard count, member count and source
/// (`static`, `app:<id>`, `registry:<service>`), bound app, version.
#[utoipa::path(
    get, path = "/v1/shards", tag = "shards",
    responses((status = 200, description = "`{\"maps\": [{\"name\", \"strategy\", \"shards\", \"members\", \"source\", \"app\", \"version\"}]}`", body = Object))
)]
pub(crate) async fn list(State(state): State<AppState>) -> Response {
    let maps: Vec<Value> = state.shards.iter().map(|m| summary(m)).collect();
    axum::Json(json!({ "maps": maps })).into_response()
}

/// A member and how many shards it owns.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MemberView {
    /// The id shards are placed by.
    id: String,
    /// Where it is reached.
    address: String,
    /// Its relative share.
    weight: u32,
    /// Shards it owns now.
    shards: usize,
}

/// One shard's owner.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ShardView {
    /// The shard number.
    shard: u32,
    /// The owner's id; `null` without members.
    owner: Option<String>,
}

/// A shard map's whole assignment.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AssignmentView {
    /// The map.
    name: String,
    /// `ring`, `jump`, `rendezvous`, `maglev` or `bounded`.
    strategy: &'static str,
    /// `static`, `app:<id>` or `registry:<service>`.
    source: String,
    /// The app whose invocations it routes, if any.
    app: Option<String>,
    /// Placement version: 1 at start, +1 per membership change.
    version: u64,
    /// The members, in order, with their shard counts.
    members: Vec<MemberView>,
    /// Every shard's owner, in shard order.
    shards: Vec<ShardView>,
    /// The last membership change: `{at, version, moves: [{shard, from, to}], moved,
    /// optimum}`; `null` before the first.
    #[schema(value_type = Option<Object>)]
    last_rebalance: Option<crate::shards::Rebalance>,
}

/// The whole assignment of a shard map: members with their shard counts, every
/// shard's owner, the version and the last rebalance plan.
#[utoipa::path(
    get, path = "/v1/shards/{name}", tag = "shards",
    params(("name" = String, Path, description = "Shard map from [shards]")),
    responses(
        (status = 200, body = AssignmentView),
        (status = 404, description = "`unknown_shard_map`", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn assignment(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<axum::Json<AssignmentView>, ApiError> {
    let map = state.shards.get(&name)?;
    let placement = map.placement();
    let counts = placement.counts();
    Ok(axum::Json(AssignmentView {
        name: map.name().to_owned(),
        strategy: map.config().strategy.as_str(),
        source: map.source(),
        app: map.config().bound_app().map(str::to_owned),
        version: placement.version,
        members: placement
            .members
            .iter()
            .zip(counts)
            .map(|(m, shards)| MemberView {
                id: m.id.clone(),
                address: m.address.clone(),
                weight: m.weight,
                shards,
            })
            .collect(),
        shards: placement
            .shards()
            .map(|(shard, owner)| ShardView {
                shard,
                owner: owner.map(|o| o.id.clone()),
            })
            .collect(),
        last_rebalance: placement.last_rebalance.as_deref().cloned(),
    }))
}

/// `?key=`.
#[derive(Debug, Deserialize)]
pub(crate) struct KeyQuery {
    key: Option<String>,
}

/// The problem for a map without members.
pub(crate) fn no_owner(map: &str, shard: u32) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shard_map_empty",
        format!("shard map {map:?} has no members, so shard {shard} has no owner"),
    )
    .with_retry_after(1)
    .with_extension("map", map)
    .with_extension("shard", shard)
}

/// Who owns a key: its shard, the shard's owner and the placement version that
/// answered. Every sidecar with the same members answers the same.
#[utoipa::path(
    get, path = "/v1/shards/{name}/owner", tag = "shards",
    params(
        ("name" = String, Path, description = "Shard map from [shards]"),
        ("key" = String, Query, description = "The key (its UTF-8 bytes are hashed)"),
    ),
    responses(
        (status = 200, description = "`{\"map\", \"shard\", \"owner\": {\"id\", \"address\"}, \"version\"}`", body = Object),
        (status = 400, description = "`missing_shard_key`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`unknown_shard_map`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 503, description = "`shard_map_empty`: the map has no members", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn owner(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<KeyQuery>,
) -> Result<Response, ApiError> {
    let map = state.shards.get(&name)?;
    let key = query.key.filter(|k| !k.is_empty()).ok_or_else(|| {
        ApiError::bad_request(
            "missing_shard_key",
            "give the key as ?key=<key> (non-empty)",
        )
    })?;
    let found = map.owner(key.as_bytes());
    let Some(owner) = found.owner else {
        return Err(no_owner(map.name(), found.shard));
    };
    Ok(axum::Json(json!({
        "map": map.name(),
        "shard": found.shard,
        "owner": owner,
        "version": found.version,
    }))
    .into_response())
}

/// `PUT /v1/shards/{name}/members` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MembersBody {
    /// The new members, `[{"id", "address", "weight"}]` (weight defaults to 1); may
    /// be empty.
    #[schema(value_type = Vec<Object>)]
    members: Vec<ShardMember>,
}

/// Replaces the members of a static shard map (`members = [...]` in config) in this
/// sidecar, like the runtime APIs of HAProxy and Envoy: the rebalance plan is
/// computed, logged, kept as `last_rebalance`, and published to the map's `publish`
/// topic as a `trellis.shards.rebalanced` event; the version goes up by one. The
/// change is not written to the config file: it lasts until restart. Maps whose
/// members come from an app or the registry refuse it (409 `shard_members_managed`).
#[utoipa::path(
    put, path = "/v1/shards/{name}/members", tag = "shards",
    params(("name" = String, Path, description = "Shard map from [shards]")),
    request_body = MembersBody,
    responses(
        (status = 200, description = "`{\"changed\": bool, \"version\", \"rebalance\": {at, version, moves, moved, optimum} | null}`", body = Object),
        (status = 400, description = "`invalid_members` (the detail names each member at fault), `malformed_json`, `invalid_body`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "`unknown_shard_map`", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 409, description = "`shard_members_managed`: the members come from an app or the registry", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub(crate) async fn set_members(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Json(body): Json<MembersBody>,
) -> Result<Response, ApiError> {
    let map = state.shards.get(&name)?;
    match &map.config().members {
        ShardMembers::Static(_) => {}
        ShardMembers::App(app) => {
            return Err(managed(&name, format!("the instances of app {app:?}")));
        }
        ShardMembers::Registry(service) => {
            return Err(managed(
                &name,
                format!("the service registry (service {service:?})"),
            ));
        }
    }
    if let Some(app) = map.config().bound_app()
        && let Some(target) = state.invoker.target(app)
    {
        let instances: Vec<String> = target
            .snapshot()
            .instances
            .into_iter()
            .map(|i| i.url)
            .collect();
        let strangers: Vec<String> = body
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                !instances
                    .iter()
                    .any(|i| i == m.address.trim_end_matches('/'))
            })
            .map(|(i, m)| {
                format!(
                    "members[{i}].address: {:?} is not an instance of app {app:?}",
                    m.address
                )
            })
            .collect();
        if !strangers.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_members",
                format!(
                    "{} (instances: {})",
                    strangers.join("; "),
                    instances.join(", ")
                ),
            ));
        }
    }
    let rebalance = map.set_members(body.members).await?;
    Ok(axum::Json(json!({
        "changed": rebalance.is_some(),
        "version": map.placement().version,
        "rebalance": rebalance.as_deref(),
    }))
    .into_response())
}

fn managed(name: &str, source: String) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "shard_members_managed",
        format!("the members of shard map {name:?} follow {source}; they can't be set by hand"),
    )
}

// === Invocation by key ===

/// Where a keyed invocation goes: the key's owner in the app's shard map.
#[derive(Debug)]
pub(crate) struct KeyRoute {
    map: String,
    shard: u32,
    owner: crate::shards::MemberRef,
    version: u64,
}

/// For `/v1/invoke/{app}/...`: with a `Trellis-Shard-Key` header, pins the request
/// to the key's owner in the shard map bound to `app` (a
/// [`trellis_proxy::PinnedInstance`]); without one, `None` and the app's load
/// balancing applies.
///
/// # Errors
/// 400 `no_shard_map` if no map is bound to `app`, 400 `missing_shard_key` for an
/// empty key, 503 `shard_map_empty` if the map has no members.
pub(crate) fn route_by_key(
    state: &AppState,
    app: &str,
    parts: &mut axum::http::request::Parts,
) -> Result<Option<KeyRoute>, ApiError> {
    let Some(key) = parts.headers.get(&SHARD_KEY) else {
        return Ok(None);
    };
    let map = state.shards.for_app(app).ok_or_else(|| {
        ApiError::bad_request(
            "no_shard_map",
            format!(
                "the request has a Trellis-Shard-Key but no shard map is bound to app {app:?}; \
                 bind one with [shards.<name>] app = {app:?}"
            ),
        )
    })?;
    if key.is_empty() {
        return Err(ApiError::bad_request(
            "missing_shard_key",
            "the Trellis-Shard-Key header is empty",
        ));
    }
    let found = map.owner(key.as_bytes());
    let owner = found
        .owner
        .ok_or_else(|| no_owner(map.name(), found.shard))?;
    parts
        .extensions
        .insert(trellis_proxy::PinnedInstance(owner.address.clone()));
    Ok(Some(KeyRoute {
        map: map.name().to_owned(),
        shard: found.shard,
        owner,
        version: found.version,
    }))
}

impl KeyRoute {
    /// The problem for a failed keyed invocation: 503 `shard_owner_unavailable` when
    /// the owner is not a healthy instance of the app, else as any invocation.
    pub(crate) fn error(&self, e: &trellis_proxy::InvokeError) -> ApiError {
        let trellis_proxy::InvokeError::Failed(cause) = e else {
            return super::invoke_error(e);
        };
        match trellis_resilience::error::cause_ref::<trellis_proxy::InstanceUnavailable>(&**cause) {
            Some(unavailable) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shard_owner_unavailable",
                format!(
                    "shard {} of map {:?} is owned by {:?} at {}, which is {}",
                    self.shard,
                    self.map,
                    self.owner.id,
                    self.owner.address,
                    match unavailable.reason {
                        "not an instance of the app" => {
                            format!("not an instance of app {:?}", unavailable.app)
                        }
                        reason => reason.to_owned(),
                    }
                ),
            )
            .with_retry_after(1)
            .with_extension("map", self.map.clone())
            .with_extension("shard", self.shard)
            .with_extension("owner", self.owner.id.clone())
            .with_extension("version", self.version),
            None => super::invoke_error(e),
        }
    }
}
