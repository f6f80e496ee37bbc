//! The sidecar's service registry: the engine from `trellis_coord::registry` with
//! HTTP checks run through `trellis-proxy`'s probe, the registration of the app this
//! sidecar serves (`[app]`), and discovery for `[apps.*]` with `discovery = "registry"`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_coord::registry::{
    Check, Filter, Prober, Registration, Registry, RegistryError, RegistrySettings, Snapshot,
};
use trellis_core::config::ServedApp;
use trellis_proxy::{Discovery, HealthProbe};

/// HTTP checks through a pooled client.
#[derive(Debug)]
struct HttpProber(HealthProbe);

#[async_trait]
impl Prober for HttpProber {
    async fn probe(&self, url: &str) -> Result<(), String> {
        self.0.get(url).await
    }
}

/// A registry whose HTTP checks use the sidecar's HTTP client.
pub(crate) fn start() -> Registry {
    let prober = HttpProber(HealthProbe::new(Duration::from_secs(2)));
    Registry::new(RegistrySettings::default(), Some(Arc::new(prober)))
}

/// `[apps.*]` with `discovery = "registry"`: the healthy instances of the service
/// named like the app, as base URLs, following every change with a blocking query
/// (until every receiver is gone).
#[derive(Debug)]
pub(crate) struct RegistryDiscovery {
    apps: HashMap<String, watch::Receiver<Vec<String>>>,
}

impl RegistryDiscovery {
    pub(crate) fn new(registry: Registry, apps: impl IntoIterator<Item = String>) -> Self {
        let apps = apps
            .into_iter()
            .map(|app| {
                let (tx, rx) = watch::channel(urls(&registry.instances(&app, Filter::Healthy)));
                tokio::spawn(follow(registry.clone(), app.clone(), tx));
                (app, rx)
            })
            .collect();
        Self { apps }
    }
}

impl Discovery for RegistryDiscovery {
    fn subscribe(&self, app: &str) -> Option<watch::Receiver<Vec<String>>> {
        self.apps.get(app).cloned()
    }
}

/// An instance's address as a base URL (`host:port` gets `http://`).
fn base_url(address: &str) -> String {
    let address = address.trim_end_matches('/');
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

fn urls(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .instances
        .iter()
        .map(|i| base_url(&i.address))
        .collect()
}

async fn follow(registry: Registry, service: String, tx: watch::Sender<Vec<String>>) {
    // 0: the first query answers at once, catching anything since `new`.
    let mut index = 0;
    loop {
        let snapshot = tokio::select! {
            s = registry.wait(&service, index, Duration::from_secs(300), Filter::Healthy) => s,
            () = tx.closed() => return,
        };
        index = snapshot.index;
        let list = urls(&snapshot);
        tx.send_if_modified(|current| {
            if *current == list {
                false
            } else {
                tracing::info!(app = %service, instances = list.len(), "instances from the registry changed");
                *current = list;
                true
            }
        });
    }
}

/// Registers the app this sidecar serves and heartbeats for it while it is healthy
/// (when `health_path` is set) — re-registering whenever the registry has forgotten
/// it. Deregisters it on [`SelfRegistration::stop`].
#[derive(Debug)]
pub(crate) struct SelfRegistration {
    registry: Registry,
    service: String,
    id: String,
    task: JoinHandle<()>,
}

impl SelfRegistration {
    pub(crate) fn start(registry: Registry, app: &ServedApp, port: u16) -> Self {
        let id = app.instance_id(port);
        let mut registration = Registration::new(
            app.url.clone(),
            Check::Ttl {
                ttl: app.ttl,
                grace: app.ttl,
            },
        )
        .deregister_after(app.deregister_after);
        registration.metadata = app.metadata.clone();
        let health_url = app
            .health_path
            .as_ref()
            .map(|p| format!("{}{p}", app.url.trim_end_matches('/')));
        let task = tokio::spawn(heartbeat_loop(
            registry.clone(),
            app.id.clone(),
            id.clone(),
            registration,
            health_url,
            app.heartbeat_interval,
        ));
        tracing::info!(service = %app.id, id = %id, "registering the app in the service registry");
        Self {
            registry,
            service: app.id.clone(),
            id,
            task,
        }
    }

    /// Stops heartbeating and removes the registration.
    pub(crate) fn stop(&self) {
        self.task.abort();
        match self.registry.deregister(&self.service, &self.id) {
            Ok(()) | Err(RegistryError::UnknownInstance { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "deregistering the app failed"),
        }
    }
}

async fn heartbeat_loop(
    registry: Registry,
    service: String,
    id: String,
    registration: Registration,
    health_url: Option<String>,
    every: Duration,
) {
    let probe = HealthProbe::new(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registered = false;
    let mut app_healthy = true;
    loop {
        tick.tick().await;
        if let Some(url) = &health_url {
            let ok = matches!(
                tokio::time::timeout(every, probe.get(url)).await,
                Ok(Ok(()))
            );
            if ok != app_healthy {
                app_healthy = ok;
                if ok {
                    tracing::info!(service = %service, "the app answers its health check again");
                } else {
                    tracing::warn!(service = %service, url = %url, "the app fails its health check: not heartbeating");
                }
            }
            if !ok {
                continue;
            }
        }
        let result = if registered {
            registry.heartbeat(&service, &id).map(|_| ())
        } else {
            Err(RegistryError::UnknownInstance {
                service: service.clone(),
                id: id.clone(),
            })
        };
        match result {
            Ok(()) => {}
            Err(RegistryError::UnknownInstance { .. }) => {
                match registry.register(&service, &id, registration.clone()) {
                    Ok(_) => registered = true,
                    Err(e) => tracing::warn!(error = %e, "registering the app failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat for the app failed"),
        }
    }
}

/// Feeds every shard map with `members = { registry = "<service>" }`: on each change
/// of the service's healthy instances, the maps get them as members (id = instance
/// id, address = its base URL, weight = its `weight` metadata or 1) and rebalance.
pub(crate) fn feed_shard_maps(registry: &Registry, shards: &Arc<crate::shards::ShardMaps>) {
    let services: std::collections::BTreeSet<String> = shards
        .iter()
        .filter_map(|map| match &map.config().members {
            trellis_core::config::ShardMembers::Registry(service) => Some(service.clone()),
            _ => None,
        })
        .collect();
    for service in services {
        let shards = Arc::downgrade(shards);
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut index = 0;
            loop {
                let snapshot = registry
                    .wait(&service, index, Duration::from_secs(300), Filter::Healthy)
                    .await;
                if snapshot.index == index {
                    continue;
                }
                index = snapshot.index;
                let Some(shards) = shards.upgrade() else {
                    return;
                };
                let members = snapshot
                    .instances
                    .iter()
                    .map(|i| {
                        let mut member = trellis_core::config::ShardMember::new(
                            i.id.clone(),
                            base_url(&i.address),
                        );
                        if let Some(weight) = i
                            .metadata
                            .get("weight")
                            .and_then(|w| w.parse::<u32>().ok())
                            .filter(|w| *w > 0)
                        {
                            member.weight = weight;
                        }
                        member
                    })
                    .collect();
                shards.set_registry_members(&service, members).await;
            }
        });
    }
}

/// Shares the registry with the other sidecars of the coordination backend: with
/// `[components.coord.default] type = "etcd"`, an [`EtcdMirror`] publishes the
/// instances registered here and imports everyone else's. Otherwise the registry is
/// this sidecar's own.
///
/// [`EtcdMirror`]: trellis_coord::registry::etcd::EtcdMirror
#[derive(Debug, Default)]
pub(crate) struct Sharing {
    #[cfg(feature = "etcd")]
    mirror: tokio::sync::Mutex<Option<trellis_coord::registry::etcd::EtcdMirror>>,
}

impl Sharing {
    /// Starts sharing `registry` if the coordination backend can carry it.
    #[cfg_attr(not(feature = "etcd"), allow(clippy::unused_async))]
    pub(crate) async fn start(
        config: &trellis_core::Config,
        registry: &Registry,
    ) -> Result<Self, trellis_coord::CoordError> {
        #[cfg(feature = "etcd")]
        if let Some(trellis_core::config::CoordComponent::Etcd(etcd)) = config
            .components
            .coord
            .get(trellis_core::config::DEFAULT_COMPONENT)
        {
            let mut settings = trellis_coord::etcd::EtcdConfig::default();
            settings.endpoints.clone_from(&etcd.endpoints);
            settings.prefix.clone_from(&etcd.prefix);
            settings.connect_timeout = etcd.connect_timeout;
            let origin = format!(
                "sidecar-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            let mirror = trellis_coord::registry::etcd::EtcdMirror::start(
                registry.clone(),
                settings,
                origin,
            )
            .await?;
            tracing::info!(
                origin = mirror.origin(),
                prefix = mirror.prefix(),
                "sharing the service registry through etcd"
            );
            return Ok(Self {
                mirror: tokio::sync::Mutex::new(Some(mirror)),
            });
        }
        let _ = (config, registry);
        Ok(Self::default())
    }

    /// Stops sharing: the other sidecars drop this one's instances at once.
    #[cfg_attr(not(feature = "etcd"), allow(clippy::unused_async))]
    pub(crate) async fn stop(&self) {
        #[cfg(feature = "etcd")]
        if let Some(mirror) = self.mirror.lock().await.take()
            && let Err(e) = mirror.stop().await
        {
            tracing::warn!(error = %e, "stopping the registry mirror failed");
        }
    }
}
