//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` attributes.

use utoipa::OpenApi;

use crate::routes::{
    coord, invoke, ops, persistent, projections, pubsub, registry, resilience, sagas, shards,
    state, streams,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Trellis",
        description = "Distributed-application building blocks over HTTP. Errors are \
            application/problem+json with a stable `code`. When a token is configured, \
            every /v1 call needs `Authorization: Bearer <token>`."
    ),
    paths(
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::openapi,
        state::get_key,
        state::put_key,
        state::delete_key,
        state::bulk_get,
        state::transaction,
        state::list_keys,
        invoke::invoke,
        resilience::status,
        resilience::events,
        resilience::set_fault,
        resilience::set_breaker,
        pubsub::publish,
        pubsub::publish_bulk,
        pubsub::topic_stats,
        pubsub::replay,
        pubsub::pull,
        pubsub::ack,
        pubsub::nack,
        pubsub::extend,
        pubsub::reject,
        pubsub::list_subscriptions,
        pubsub::get_subscription,
        pubsub::put_subscription,
        pubsub::delete_subscription,
        streams::append,
        streams::append_multi,
        streams::read,
        streams::subscribe_sse,
        streams::get_metadata,
        streams::put_metadata,
        streams::delete,
        streams::get_snapshot,
        streams::put_snapshot,
        persistent::list,
        persistent::info,
        persistent::define,
        persistent::remove,
        persistent::read,
        persistent::ack,
        persistent::nack,
        persistent::replay_parked,
        projections::list,
        projections::one,
        projections::rebuild,
        coord::acquire,
        coord::extend,
        coord::release,
        coord::lock_holder,
        coord::campaign,
        coord::keep_alive,
        coord::resign,
        coord::leader,
        coord::observe,
        shards::list,
        shards::assignment,
        shards::owner,
        shards::set_members,
        registry::register,
        registry::heartbeat,
        registry::deregister,
        registry::instance,
        registry::instances,
        registry::services,
        registry::events,
        sagas::put_definition,
        sagas::get_definition,
        sagas::list_definitions,
        sagas::delete_definition,
        sagas::start,
        sagas::get_saga,
        sagas::list,
        sagas::retry,
        sagas::abort,
    ),
    components(schemas(crate::error::Problem)),
    tags(
        (name = "ops", description = "Health, readiness, metrics and this document"),
        (name = "state", description = "Key-value state with etags, TTLs and transactions"),
        (name = "invoke", description = "Calls to other apps through their instances and resilience policies"),
        (name = "streams", description = "Event store: streams with expected versions, $all, categories, catch-up subscriptions, metadata, snapshots"),
        (name = "pubsub", description = "CloudEvents on topics: publish, pull or push delivery to consumer groups, dead letters"),
        (name = "coordination", description = "Locks and leader election with fencing tokens"),
        (name = "registry", description = "Service registry: instances, TTL/phi/HTTP health checks, blocking queries, change events"),
        (name = "shards", description = "Shard maps: key owners, assignments, rebalance plans and events"),
        (name = "sagas", description = "Saga definitions, orchestrated sagas with compensation, operator retry/abort"),
        (name = "resilience", description = "Breakers, bulkheads, limiters, retry budgets, fault injection and upstream health"),
    )
)]
struct ApiDoc;

/// The OpenAPI document of this build's HTTP API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
