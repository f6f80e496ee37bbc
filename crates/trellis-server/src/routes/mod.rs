//! Routes, one module per API area.

pub(crate) mod coord;
pub(crate) mod fencing;
pub(crate) mod invoke;
pub(crate) mod ops;
pub(crate) mod persistent;
pub(crate) mod projections;
pub(crate) mod proxy;
pub(crate) mod pubsub;
pub(crate) mod registry;
pub(crate) mod resilience;
pub(crate) mod sagas;
pub(crate) mod shards;
pub(crate) mod state;
pub(crate) mod streams;
pub(crate) mod transactions;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use trellis_state::StateStore;

use crate::ApiError;

/// What handlers share: the open components, by name.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) stores: Arc<BTreeMap<String, Arc<dyn StateStore>>>,
    /// The apps `/v1/invoke` reaches, with their policies.
    pub(crate) invoker: Arc<trellis_proxy::Invoker>,
    /// Every policy instance: the apps' and the components'.
    pub(crate) registry: Arc<trellis_resilience::stack::Registry>,
    /// Whether `Authorization` carries this sidecar's own token (so it must not be
    /// forwarded to apps).
    pub(crate) strip_authorization: bool,
    /// The open event store components.
    pub(crate) eventstores: Arc<BTreeMap<String, Arc<dyn trellis_eventstore::EventStore>>>,
    /// Persistent subscriptions of each event store component.
    pub(crate) persistent:
        Arc<BTreeMap<String, Arc<trellis_eventstore::persistent::PersistentSubscriptions>>>,
    /// Locks and elections (embedded, in the data directory).
    pub(crate) coord: Option<Arc<dyn trellis_coord::Coordinator>>,
    /// The saga orchestrator (and its log).
    pub(crate) sagas: Option<Arc<trellis_saga::Orchestrator>>,
    /// The 2PC coordinator, on the saga log.
    pub(crate) transactions: Option<Arc<trellis_saga::twopc::TxCoordinator>>,
    /// Keys of state stores locked by 2PC `state` participants between prepare and
    /// commit: plain state writes must refuse them (`holder` / `begin_write`).
    pub(crate) key_locks: trellis_saga::twopc::KeyLocks,
    /// Projections run for apps.
    pub(crate) projections: Arc<crate::projections::Projections>,
    /// The open pub/sub components.
    pub(crate) pubsubs: Arc<BTreeMap<String, Arc<dyn trellis_pubsub::PubSub>>>,
    /// Push subscriptions.
    pub(crate) subscriptions: Arc<crate::subscriptions::Subscriptions>,
    /// The transactional outbox's relays, one per state store.
    pub(crate) outbox: Arc<crate::outbox::Outbox>,
    /// The config the server was built from.
    pub(crate) config: Arc<trellis_core::Config>,
    /// Shard maps (`[shards.<name>]`).
    pub(crate) shards: Arc<crate::shards::ShardMaps>,
    /// The service registry.
    pub(crate) service_registry: trellis_coord::registry::Registry,
    /// Its sharing with other sidecars (etcd), if any.
    pub(crate) registry_sharing: Arc<crate::registry::Sharing>,
    /// The registration of the app this sidecar serves (`[app]`), while it runs.
    pub(crate) self_registration: Arc<std::sync::Mutex<Option<crate::registry::SelfRegistration>>>,
}

impl AppState {
    pub(crate) fn store(&self, name: &str) -> Result<&Arc<dyn StateStore>, ApiError> {
        self.stores.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.stores.keys().map(String::as_str).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "store_not_found",
                format!(
                    "no state store named {name:?}; configured stores: {}",
                    known.join(", ")
                ),
            )
        })
    }
}

pub(crate) async fn route_not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!("no route for {}", uri.path()),
    )
}

pub(crate) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// An invocation failure as a problem.
pub(crate) fn invoke_error(e: &trellis_proxy::InvokeError) -> ApiError {
    let mut error = ApiError::new(e.status(), e.code(), e.to_string());
    if let Some(after) = e.retry_after() {
        error = error.with_retry_after(after.as_secs().max(1));
    }
    error
}
