//! Building the server from config and running it until shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use trellis_core::Config;
use trellis_core::config::{ListenerConfig, ServerConfig};
use trellis_eventstore::persistent::PersistentSubscriptions;
use trellis_proxy::Invoker;
use trellis_resilience::stack::Registry;
use trellis_state::{StateError, StateStore};

use crate::ApiError;
use crate::auth::{Token, require_token};
use crate::context::{ContextConfig, request_context};
use crate::projections::Projections;
use crate::routes::{self, AppState, ops};
use crate::subscriptions::Subscriptions;

/// Why the server could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A component failed to open.
    #[error("components.state.{name}: {source}")]
    Component {
        /// The component's name.
        name: String,
        /// Why it failed.
        #[source]
        source: StateError,
    },
    /// An event store component failed to open.
    #[error("components.eventstore.{name}: {source}")]
    EventStore {
        /// The component's name.
        name: String,
        /// Why it failed.
        #[source]
        source: trellis_eventstore::EventStoreError,
    },
    /// The coordinator (locks, elections) failed to open.
    #[error("coordination: {0}")]
    Coord(#[source] trellis_coord::CoordError),
    /// A projection could not be started.
    #[error("projections.{name}: {reason}")]
    Projection {
        /// The projection's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A pub/sub component failed to open.
    #[error("components.pubsub.{name}: {source}")]
    PubSub {
        /// The component's name.
        name: String,
        /// Why it failed.
        #[source]
        source: trellis_pubsub::PubSubError,
    },
    /// A shard map could not be set up.
    #[error("shards.{name}: {reason}")]
    Shards {
        /// The map's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// An app or policy could not be set up.
    #[error(transparent)]
    Invoke(#[from] trellis_proxy::BuildError),
    /// The saga log or a saga definition could not be set up.
    #[error("{0}")]
    Sagas(String),
}

/// A sidecar: its open components, the apps it invokes, its proxy listeners, and the
/// HTTP API over them.
#[derive(Debug)]
pub struct Server {
    state: AppState,
    config: ServerConfig,
    listeners: Vec<ListenerConfig>,
}

/// A proxy listener, bound and ready to serve.
#[derive(Debug)]
pub struct BoundListener {
    config: ListenerConfig,
    listener: TcpListener,
}

impl BoundListener {
    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The address it accepts connections on.
    ///
    /// # Errors
    /// If the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

impl Server {
    /// Opens every configured component (concurrently) and prepares the API.
    ///
    /// # Errors
    /// The first component that fails to open; any already opened are closed again.
    pub async fn build(config: &Config) -> Result<Self, BuildError> {
        // Before any component registers its metrics, or they'd go nowhere.
        crate::telemetry::prometheus();
        let data_dir = config.server.data_dir.clone();
        let opening = config.components.state.iter().map(|(name, component)| {
            let data_dir = data_dir.clone();
            async move {
                (
                    name.clone(),
                    trellis_state::open(name, component, &data_dir).await,
                )
            }
        });
        let mut stores = BTreeMap::new();
        let mut failure = None;
        for (name, result) in futures_util::future::join_all(opening).await {
            match result {
                Ok(store) => {
                    stores.insert(name, store);
                }
                Err(source) => {
                    failure.get_or_insert(BuildError::Component { name, source });
                }
            }
        }
        if let Some(failure) = failure {
            close_all(&stores).await;
            return Err(failure);
        }
        let opening = config.components.pubsub.iter().map(|(name, component)| {
            let data_dir = data_dir.clone();
            async move {
                (
                    name.clone(),
                    trellis_pubsub::open(name, component, &data_dir).await,
                )
            }
        });
        let mut pubsubs = BTreeMap::new();
        for (name, result) in futures_util::future::join_all(opening).await {
            match result {
                Ok(pubsub) => {
                    pubsubs.insert(name, pubsub);
                }
                Err(source) => {
                    failure.get_or_insert(BuildError::PubSub { name, source });
                }
            }
        }
        if let Some(failure) = failure {
            close_pubsubs(&pubsubs).await;
            close_all(&stores).await;
            return Err(failure);
        }
        let opening = config
            .components
            .eventstore
            .iter()
            .map(|(name, component)| {
                let data_dir = data_dir.clone();
                async move {
                    (
                        name.clone(),
                        trellis_eventstore::open(name, component, &data_dir).await,
                    )
                }
            });
        let mut eventstores = BTreeMap::new();
        let mut persistent = BTreeMap::new();
        for (name, result) in futures_util::future::join_all(opening).await {
            let store = match result {
                Ok(store) => store,
                Err(source) => {
                    failure.get_or_insert(BuildError::EventStore { name, source });
                    continue;
                }
            };
            match PersistentSubscriptions::open(Arc::clone(&store)).await {
                Ok(subs) => {
                    persistent.insert(name.clone(), Arc::new(subs));
                    eventstores.insert(name, store);
                }
                Err(source) => {
                    if let Err(e) = store.close().await {
                        tracing::warn!(component = %format!("eventstore.{name}"), error = %e, "closing failed");
                    }
                    failure.get_or_insert(BuildError::EventStore { name, source });
                }
            }
        }
        if let Some(failure) = failure {
            close_eventstores(&eventstores).await;
            close_pubsubs(&pubsubs).await;
            close_all(&stores).await;
            return Err(failure);
        }
        let replay_limit =
            usize::try_from(config.server.max_body_size.bytes()).unwrap_or(usize::MAX);
        let service_registry = crate::registry::start();
        let discovered = config
            .apps
            .iter()
            .filter(|(_, app)| app.discovery == trellis_core::config::DiscoveryKind::Registry)
            .map(|(name, _)| name.clone());
        let discovery: Arc<dyn trellis_proxy::Discovery> = Arc::new(
            crate::registry::RegistryDiscovery::new(service_registry.clone(), discovered),
        );
        let invoker = match Invoker::new(config, Some(discovery), replay_limit) {
            Ok(invoker) => invoker,
            Err(e) => {
                close_eventstores(&eventstores).await;
                close_pubsubs(&pubsubs).await;
                close_all(&stores).await;
                return Err(e.into());
            }
        };
        let mut registry = invoker.registry().clone();
        let stores = match guard_components(config, stores, &mut registry) {
            Ok(stores) => stores,
            Err((e, stores)) => {
                close_eventstores(&eventstores).await;
                close_pubsubs(&pubsubs).await;
                close_all(&stores).await;
                return Err(e.into());
            }
        };
        let mut server = Self::from_stores(config.server.clone(), stores).with_invoker(invoker);
        server.state.registry = Arc::new(registry);
        server.state.service_registry = service_registry;
        server.listeners = config.listeners.clone();
        let config = Arc::new(config.clone());
        let pubsubs = Arc::new(pubsubs);
        server.state.subscriptions = Arc::new(
            Subscriptions::start(
                Arc::clone(&config),
                Arc::clone(&pubsubs),
                Arc::clone(&server.state.invoker),
                Some(&data_dir),
            )
            .await,
        );
        // The outbox relays publish what transactions stored, including what a
        // crash left behind: they start with the stores and pub/subs they join.
        server.state.outbox =
            Arc::new(crate::outbox::Outbox::start(&server.state.stores, &pubsubs));
        server.state.pubsubs = pubsubs;
        server.state.eventstores = Arc::new(eventstores);
        server.state.persistent = Arc::new(persistent);
        match crate::shards::ShardMaps::build(
            &config,
            &server.state.pubsubs,
            &server.state.invoker,
            Arc::new(trellis_core::SystemClock),
        ) {
            Ok(shards) => {
                let shards = Arc::new(shards);
                crate::registry::feed_shard_maps(&server.state.service_registry, &shards);
                server.state.shards = shards;
            }
            Err((name, e)) => {
                server.close().await;
                return Err(BuildError::Shards {
                    name,
                    reason: e.to_string(),
                });
            }
        }
        // Missing only when no component is embedded; `open` reports a failure.
        let _ = std::fs::create_dir_all(&data_dir);
        match open_coordinator(&config, &data_dir).await {
            Ok(coord) => server.state.coord = Some(coord),
            Err(e) => {
                server.close().await;
                return Err(BuildError::Coord(e));
            }
        }
        match crate::sagas::start(&config, &data_dir, &server.state).await {
            Ok((sagas, transactions)) => {
                server.state.sagas = sagas;
                server.state.transactions = transactions;
            }
            Err(e) => {
                server.close().await;
                return Err(BuildError::Sagas(e));
            }
        }
        match crate::registry::Sharing::start(&config, &server.state.service_registry).await {
            Ok(sharing) => server.state.registry_sharing = Arc::new(sharing),
            Err(e) => {
                server.close().await;
                return Err(BuildError::Coord(e));
            }
        }
        match Projections::start(
            &config,
            &server.state.eventstores,
            &server.state.stores,
            &server.state.invoker,
        ) {
            Ok(projections) => server.state.projections = Arc::new(projections),
            Err(e) => {
                server.close().await;
                return Err(BuildError::Projection {
                    name: e.name,
                    reason: e.reason,
                });
            }
        }
        server.state.config = config;
        Ok(server)
    }

    /// Replaces the invoker (apps and their policies).
    pub fn with_invoker(mut self, invoker: Invoker) -> Self {
        self.state.registry = Arc::new(invoker.registry().clone());
        self.state.invoker = Arc::new(invoker);
        self
    }

    /// Binds every `[[listeners]]` address.
    ///
    /// # Errors
    /// The first address that can't be bound, naming the listener.
    pub async fn bind_listeners(&self) -> std::io::Result<Vec<BoundListener>> {
        let mut bound = Vec::with_capacity(self.listeners.len());
        for config in &self.listeners {
            let listener = TcpListener::bind(config.listen).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "listener {:?} cannot listen on {}: {e}",
                        config.name, config.listen
                    ),
                )
            })?;
            bound.push(BoundListener {
                config: config.clone(),
                listener,
            });
        }
        Ok(bound)
    }

    /// A server over already-open stores (for embedding and tests). Install the
    /// metrics recorder ([`crate::telemetry::prometheus`]) before opening them, so
    /// their metrics are recorded.
    pub fn from_stores(
        config: ServerConfig,
        stores: BTreeMap<String, Arc<dyn StateStore>>,
    ) -> Self {
        // Install the recorder before anything records, or early metrics are lost.
        crate::telemetry::prometheus();
        let mut whole = Config::default();
        whole.server = config.clone();
        whole.components.pubsub.clear();
        let whole = Arc::new(whole);
        Self {
            state: AppState {
                stores: Arc::new(stores),
                invoker: Arc::new(Invoker::default()),
                registry: Arc::default(),
                strip_authorization: config.api_token.is_some(),
                pubsubs: Arc::default(),
                eventstores: Arc::default(),
                persistent: Arc::default(),
                projections: Arc::default(),
                coord: None,
                sagas: None,
                transactions: None,
                key_locks: trellis_saga::twopc::KeyLocks::default(),
                service_registry: crate::registry::start(),
                registry_sharing: Arc::default(),
                self_registration: Arc::default(),
                subscriptions: Arc::new(Subscriptions::empty(Arc::clone(&whole))),
                outbox: Arc::default(),
                config: whole,
                shards: Arc::default(),
            },
            listeners: Vec::new(),
            config,
        }
    }

    /// One line per enabled component, e.g. `state.default (embedded)`.
    pub fn components(&self) -> Vec<String> {
        self.state
            .stores
            .iter()
            .map(|(name, store)| format!("state.{name} ({})", store.backend()))
            .chain(
                self.state
                    .eventstores
                    .iter()
                    .map(|(name, es)| format!("eventstore.{name} ({})", es.backend())),
            )
            .chain(
                self.state
                    .pubsubs
                    .iter()
                    .map(|(name, ps)| format!("pubsub.{name} ({})", ps.backend())),
            )
            .chain(
                self.state
                    .coord
                    .iter()
                    .map(|c| format!("coord.default ({})", c.backend())),
            )
            .chain(
                self.state
                    .sagas
                    .iter()
                    .map(|o| format!("sagas.default ({})", o.backend())),
            )
            .chain(self.state.invoker.apps().map(|app| format!("app.{app}")))
            .chain(
                self.state.shards.iter().map(|map| {
                    format!("shards.{} ({})", map.name(), map.config().strategy.as_str())
                }),
            )
            .collect()
    }

    /// The complete HTTP API, with every middleware.
    pub fn router(&self) -> Router {
        let limit = usize::try_from(self.config.max_body_size.bytes()).unwrap_or(usize::MAX);
        let token = Token(
            self.config
                .api_token
                .as_ref()
                .map(|t| Arc::from(t.expose())),
        );
        Router::new()
            .route("/healthz", get(ops::healthz))
            .route("/readyz", get(ops::readyz))
            .route("/metrics", get(ops::metrics))
            .route("/openapi.json", get(ops::openapi))
            .merge(routes::state::router())
            .merge(routes::invoke::router())
            .merge(routes::resilience::router())
            .merge(routes::pubsub::router())
            .merge(routes::streams::router())
            .merge(routes::persistent::router())
            .merge(routes::projections::router())
            .merge(routes::coord::router())
            .merge(routes::registry::router())
            .merge(routes::shards::router())
            .merge(routes::sagas::router())
            .merge(routes::transactions::router())
            .fallback(routes::route_not_found)
            .method_not_allowed_fallback(routes::method_not_allowed)
            .with_state(self.state.clone())
            // Layers run outside-in from the bottom of this list:
            // Bodies are buffered by extractors; this bounds them (413 via `Body`).
            .layer(DefaultBodyLimit::max(limit))
            // Authenticate /v1 before any handler parses input.
            .layer(axum::middleware::from_fn_with_state(token, require_token))
            // Request id, trace context, the request span, completion log, metrics,
            // and the Content-Length check that refuses oversized bodies unread.
            .layer(axum::middleware::from_fn_with_state(
                ContextConfig {
                    body_limit: self.config.max_body_size.bytes(),
                    listener: None,
                },
                request_context,
            ))
            // A panic in a handler is a bug; the client gets a 500 problem, not a
            // reset connection.
            .layer(catch_panic())
    }

    /// The router of a proxy listener: every request is forwarded to its target.
    fn listener_router(&self, config: &ListenerConfig) -> Router {
        let target = match &config.app {
            Some(app) => self.state.invoker.target(app),
            None => self.state.invoker.listener(&config.name),
        };
        let state = routes::proxy::ListenerState {
            name: Arc::from(config.name.as_str()),
            target,
        };
        Router::new()
            .fallback(routes::proxy::forward)
            .with_state(state)
            // Same ids, trace context, access log and metrics as the API.
            .layer(axum::middleware::from_fn_with_state(
                ContextConfig {
                    body_limit: self.config.max_body_size.bytes(),
                    listener: Some(Arc::from(config.name.as_str())),
                },
                request_context,
            ))
            .layer(catch_panic())
    }

    /// Serves the API on `api` (if any) and every bound proxy listener until
    /// `shutdown` completes; then stops accepting, lets in-flight requests finish for
    /// up to `drain_timeout`, and closes every component.
    ///
    /// # Errors
    /// If accepting connections fails.
    pub async fn run(
        self,
        api: Option<TcpListener>,
        listeners: Vec<BoundListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let drain_timeout = self.config.drain_timeout;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!(
                ?drain_timeout,
                "shutting down: no new connections, draining in-flight requests"
            );
            let _ = stop.send(true);
        });
        let signal = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        let mut servers = tokio::task::JoinSet::new();
        if let (Some(api), Some(app)) = (&api, &self.state.config.app)
            && app.register
        {
            let port = api.local_addr()?.port();
            let registration = crate::registry::SelfRegistration::start(
                self.state.service_registry.clone(),
                app,
                port,
            );
            *self
                .state
                .self_registration
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(registration);
        }
        if let Some(api) = api {
            let serve = axum::serve(api, self.router()).with_graceful_shutdown(signal());
            servers.spawn(serve.into_future());
        }
        for bound in listeners {
            let app = self
                .listener_router(&bound.config)
                .into_make_service_with_connect_info::<std::net::SocketAddr>();
            let serve = axum::serve(bound.listener, app).with_graceful_shutdown(signal());
            servers.spawn(serve.into_future());
        }
        let upkeep = tokio::spawn(crate::telemetry::upkeep());
        let all_done = async {
            let mut result = Ok(());
            while let Some(joined) = servers.join_next().await {
                match joined {
                    Ok(Err(e)) if result.is_ok() => result = Err(e),
                    Err(e) if result.is_ok() => result = Err(std::io::Error::other(e)),
                    _ => {}
                }
            }
            result
        };
        let draining = async {
            let _ = signal().await;
            tokio::time::sleep(drain_timeout).await;
        };
        let result = tokio::select! {
            result = all_done => result,
            () = draining => {
                tracing::warn!(?drain_timeout, "drain timeout reached; abandoning requests still in flight");
                Ok(())
            }
        };
        upkeep.abort();
        self.close().await;
        result
    }

    /// Closes every component. Acknowledged writes are already durable; this stops
    /// background work and releases files and connections.
    pub async fn close(&self) {
        // Callers stop sending new work here before it goes away.
        let registration = self
            .state
            .self_registration
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(registration) = registration {
            registration.stop();
        }
        self.state.registry_sharing.stop().await;
        // Deliveries in progress finish and are settled before the pub/subs close,
        // within the drain timeout: any still out then are redelivered after restart.
        if tokio::time::timeout(
            self.config.drain_timeout,
            self.state.subscriptions.stop_all(),
        )
        .await
        .is_err()
        {
            tracing::warn!(
                "push deliveries still in progress at the drain timeout; they will be redelivered"
            );
        }
        // Projections stop after their batch in progress (committed or not at all).
        self.state.projections.stop_all().await;
        // Transactions stop between transitions (recovered on the next start), before
        // the orchestrator closes the log they share.
        if let Some(transactions) = &self.state.transactions {
            transactions.close().await;
        }
        // Sagas stop between transitions; they resume from the log on the next start.
        if let Some(sagas) = &self.state.sagas {
            sagas.close().await;
        }
        // Outbox relays stop after the message in hand; the rest stays stored and is
        // relayed after the restart.
        self.state.outbox.stop_all().await;
        if let Some(coord) = &self.state.coord
            && let Err(e) = coord.close().await
        {
            tracing::warn!(error = %e, "closing the coordinator failed");
        }
        close_pubsubs(&self.state.pubsubs).await;
        close_eventstores(&self.state.eventstores).await;
        close_all(&self.state.stores).await;
    }
}

fn catch_panic() -> CatchPanicLayer<fn(Box<dyn std::any::Any + Send>) -> axum::response::Response> {
    fn rescue(_panic: Box<dyn std::any::Any + Send>) -> axum::response::Response {
        tracing::error!("handler panicked");
        ApiError::internal("handler panicked").into_response()
    }
    CatchPanicLayer::custom(rescue as fn(_) -> _)
}

type Stores = BTreeMap<String, Arc<dyn StateStore>>;

/// Opens `[components.coord.default]` (embedded unless configured).
async fn open_coordinator(
    config: &Config,
    data_dir: &std::path::Path,
) -> Result<Arc<dyn trellis_coord::Coordinator>, trellis_coord::CoordError> {
    use trellis_core::config::CoordComponent;
    let component = config
        .components
        .coord
        .get(trellis_core::config::DEFAULT_COMPONENT);
    Ok(match component {
        None | Some(CoordComponent::Embedded(_)) => Arc::new(
            trellis_coord::embedded::EmbeddedCoordinator::open(data_dir.join("coord.redb")).await?,
        ),
        Some(CoordComponent::Postgres(pg)) => {
            let mut settings = trellis_coord::postgres::PostgresConfig::default();
            settings.url.clone_from(&pg.url);
            settings.schema.clone_from(&pg.schema);
            settings.max_connections = pg.max_connections;
            Arc::new(trellis_coord::postgres::PostgresCoordinator::connect(settings).await?)
        }
        #[cfg(feature = "etcd")]
        Some(CoordComponent::Etcd(etcd)) => {
            let mut settings = trellis_coord::etcd::EtcdConfig::default();
            settings.endpoints.clone_from(&etcd.endpoints);
            settings.prefix.clone_from(&etcd.prefix);
            settings.connect_timeout = etcd.connect_timeout;
            Arc::new(trellis_coord::etcd::EtcdCoordinator::connect(settings).await?)
        }
        #[cfg(not(feature = "etcd"))]
        Some(CoordComponent::Etcd(_)) => {
            return Err(trellis_coord::CoordError::Backend {
                backend: "etcd",
                reason: "components.coord.default.type = \"etcd\" needs a trellis binary built \
                         with the etcd feature (cargo build -p trellis-cli --features etcd)"
                    .into(),
            });
        }
        Some(other) => {
            return Err(trellis_coord::CoordError::Backend {
                backend: "coord",
                reason: format!("unsupported coordination backend {other:?}"),
            });
        }
    })
}

/// Wraps every store named in `[resiliency.targets.components."state.<name>"]` in its
/// policies, registering them for `/v1/resilience`.
fn guard_components(
    config: &Config,
    mut stores: Stores,
    registry: &mut Registry,
) -> Result<Stores, (trellis_proxy::BuildError, Stores)> {
    use trellis_resilience::breaker::Breaker;
    use trellis_resilience::bulkhead::Bulkhead;
    use trellis_resilience::fault::Faults;
    use trellis_state::{ComponentPolicies, ResilientStore};

    let policies = &config.resiliency.policies;
    for (component, refs) in &config.resiliency.targets.components {
        let Some(name) = component.strip_prefix("state.") else {
            continue;
        };
        let Some(store) = stores.get(name).cloned() else {
            continue;
        };
        let error = |kind: &str, policy: &str, message: String| trellis_proxy::BuildError {
            key: format!("resiliency.policies.{kind}.{policy}"),
            message,
        };
        let built = (|| {
            let mut out = ComponentPolicies::default();
            if let Some(t) = refs.timeout.as_ref().and_then(|t| policies.timeouts.get(t)) {
                out.attempt_timeout = t.attempt;
                out.overall_timeout = t.overall;
            }
            out.retry = refs
                .retry
                .as_ref()
                .and_then(|r| policies.retries.get(r))
                .cloned();
            if let Some((p, settings)) = refs
                .breaker
                .as_ref()
                .and_then(|b| policies.breakers.get(b).map(|s| (b, s)))
            {
                let breaker = Breaker::new(component.clone(), settings.clone())
                    .map_err(|(_, m)| error("breakers", p, m))?;
                registry.add_breaker(&breaker);
                out.breaker = Some(breaker);
            }
            if let Some((p, settings)) = refs
                .bulkhead
                .as_ref()
                .and_then(|b| policies.bulkheads.get(b).map(|s| (b, s)))
            {
                let bulkhead = Bulkhead::new(component.clone(), settings.clone())
                    .map_err(|(_, m)| error("bulkheads", p, m))?;
                registry.add_bulkhead(&bulkhead);
                out.bulkhead = Some(bulkhead);
            }
            if let Some((p, settings)) = refs
                .fault
                .as_ref()
                .and_then(|f| policies.faults.get(f).map(|s| (f, s)))
            {
                let faults =
                    Faults::new(component, *settings).map_err(|(_, m)| error("faults", p, m))?;
                registry.add_faults(&faults);
                out.faults = Some(faults);
            }
            Ok(out)
        })();
        match built {
            Ok(component_policies) => {
                let guarded = ResilientStore::new(component, store, component_policies);
                if let Some(budget) = guarded.budget() {
                    registry.add_budget(component, budget);
                }
                stores.insert(name.to_owned(), Arc::new(guarded));
            }
            Err(e) => return Err((e, stores)),
        }
    }
    Ok(stores)
}

async fn close_eventstores(stores: &BTreeMap<String, Arc<dyn trellis_eventstore::EventStore>>) {
    for (name, store) in stores {
        if let Err(e) = store.close().await {
            tracing::warn!(component = %format!("eventstore.{name}"), error = %e, "closing failed");
        }
    }
}

async fn close_pubsubs(pubsubs: &BTreeMap<String, Arc<dyn trellis_pubsub::PubSub>>) {
    for (name, pubsub) in pubsubs {
        if let Err(e) = pubsub.close().await {
            tracing::warn!(component = %format!("pubsub.{name}"), error = %e, "closing failed");
        }
    }
}

async fn close_all(stores: &BTreeMap<String, Arc<dyn StateStore>>) {
    for (name, store) in stores {
        if let Err(e) = store.close().await {
            tracing::warn!(component = %format!("state.{name}"), error = %e, "closing failed");
        }
    }
}
