//! The registry shared across sidecars through etcd.
//!
//! # Design
//! Like a Consul agent, each sidecar judges the instances registered *with it*: its
//! [`Registry`] runs their detectors and flap damping, exactly as without etcd.
//! etcd only carries the verdicts. An [`EtcdMirror`] next to each registry
//! - **publishes** every local instance under `{prefix}registry/{service}/{id}`, as
//!   JSON (see below), re-publishing on every change (it follows
//!   [`Registry::subscribe`]; when it lags behind, it re-publishes everything) and
//!   deleting the key when the instance is deregistered. All of a sidecar's keys are
//!   attached to one *session lease* (10 s by default), kept alive in the
//!   background. When the sidecar dies, nobody keeps the lease alive: etcd drops
//!   its keys when the lease runs out, and the other sidecars drop its instances —
//!   that is how they learn that a sidecar died. A session lease found lost (a
//!   keep-alive answered "not found", or none answered for a whole TTL) is replaced
//!   by a new one, and everything is published again onto it.
//! - **imports** every other sidecar's keys into its registry as *remote*
//!   instances ([`Registry::apply_remote`], [`Registry::remove_remote`]): a listing
//!   of the prefix, then a watch from the revision after it. Remote instances are
//!   never judged locally; they show the health their own sidecar published, and
//!   [`Instance::origin`](super::Instance::origin) names that sidecar. When the
//!   watch breaks (or is compacted away), the mirror backs off, lists again —
//!   removing remote instances whose keys are gone — and watches again.
//!
//! Every read path (`instances`, `wait`, `services`, `instance`, `subscribe`) is
//! the registry's own and unchanged: remote instances simply appear in it, and a
//! blocking query wakes when one changes.
//!
//! # Who owns an instance
//! A key is written by the sidecar the instance registered with last. Registering
//! an id here that another sidecar published takes it over: this sidecar writes the
//! key unconditionally. Later writes of a key (health changes) and its deletion
//! are guarded by the revision of this sidecar's own last write, so a sidecar that
//! lost an instance to another never overwrites or deletes the other's key. A
//! sidecar that sees another's write of a key newer than its own write gives the
//! instance up ([`Registry::apply_remote`] replaces the local one; heartbeats for
//! it then answer [`RegistryError::Remote`](super::RegistryError::Remote)). When
//! the same id registers with two sidecars at the same moment, one of them wins.
//!
//! # Stored value
//! ```json
//! {"address": "10.0.0.7:8080", "metadata": {"zone": "a"}, "health": "alive",
//!  "held_out": null, "check": "ttl", "origin": "sidecar-1"}
//! ```
//! `health` is `alive`, `suspect` or `dead`; `held_out` is `null`, or how many more
//! milliseconds flap damping holds the instance out (as of the write); `check` is
//! the check's kind; `origin` the publishing sidecar.
//!
//! # Stopping
//! [`EtcdMirror::stop`] revokes the session lease, so the other sidecars drop this
//! one's instances at once, and stops the mirror. Dropping the mirror stops it
//! without revoking (the instances go when the lease runs out). Either way, the
//! registry then forgets its remote instances, as nothing keeps them fresh any
//! more. One mirror per registry.
//!
//! ```no_run
//! use trellis_coord::etcd::EtcdConfig;
//! use trellis_coord::registry::etcd::EtcdMirror;
//! use trellis_coord::registry::{Registry, RegistrySettings};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::new(RegistrySettings::default(), None);
//! let config = EtcdConfig {
//!     endpoints: vec!["http://10.0.0.1:2379".into()],
//!     prefix: "orders/".into(),
//!     ..EtcdConfig::default()
//! };
//! let mirror = EtcdMirror::start(registry.clone(), config, "sidecar-1").await?;
//! // ... register, query and wait on `registry` as usual ...
//! mirror.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::{Future, pending};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions, Txn, TxnOp, WatchOptions, WatchResponse, WatchStream,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use super::{Event, Instance, Registry, RemoteInstance};
use crate::api::CoordError;
use crate::detector::Health;
use crate::etcd::{BACKEND, EtcdConfig, connect_client, error, lease_not_found};

/// The first pause after a failure; it doubles up to [`MirrorSettings::max_backoff`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest origin.
const MAX_ORIGIN: usize = 256;

/// How an [`EtcdMirror`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorSettings {
    /// The session lease's TTL: how long after this sidecar dies the others drop
    /// its instances. etcd grants whole seconds, at least its minimum (2 s with
    /// default settings); it is kept alive every third of it.
    pub session_ttl: Duration,
    /// The longest pause between attempts to repair a broken watch or session.
    pub max_backoff: Duration,
}

impl Default for MirrorSettings {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(10),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Shares a [`Registry`] with the other sidecars on the same etcd cluster and
/// prefix (see the [module docs](self)). Stops when dropped.
#[derive(Debug)]
pub struct EtcdMirror {
    origin: String,
    prefix: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), CoordError>>>,
}

impl EtcdMirror {
    /// Connects to etcd (as [`EtcdCoordinator::connect`](crate::etcd::EtcdCoordinator::connect)
    /// does), publishes `registry`'s local instances as sidecar `origin`, imports
    /// the other sidecars' instances, and keeps both up to date in the background.
    /// With [`MirrorSettings::default`].
    ///
    /// # Errors
    /// See [`start_with`](Self::start_with).
    pub async fn start(
        registry: Registry,
        config: EtcdConfig,
        origin: impl Into<String>,
    ) -> Result<Self, CoordError> {
        Self::start_with(registry, config, origin, MirrorSettings::default()).await
    }

    /// [`start`](Self::start) with other settings.
    ///
    /// # Errors
    /// [`CoordError::Backend`] for an invalid config, origin (1 to 256 bytes, no
    /// control characters) or settings; [`CoordError::Unavailable`] if etcd can't
    /// be reached or the first publication and listing fail.
    pub async fn start_with(
        registry: Registry,
        config: EtcdConfig,
        origin: impl Into<String>,
        settings: MirrorSettings,
    ) -> Result<Self, CoordError> {
        let origin = origin.into();
        if origin.is_empty() || origin.len() > MAX_ORIGIN || origin.chars().any(char::is_control) {
            return Err(invalid(format!(
                "origin {:?}: must be 1 to {MAX_ORIGIN} bytes without control characters",
                origin.chars().take(64).collect::<String>()
            )));
        }
        if settings.session_ttl < Duration::from_secs(1)
            || settings.session_ttl > Duration::from_secs(24 * 60 * 60)
        {
            return Err(invalid(
                "session_ttl: must be between 1s and 24h".to_owned(),
            ));
        }
        if settings.max_backoff.is_zero() {
            return Err(invalid("max_backoff: must be above 0".to_owned()));
        }
        let (client, config) = connect_client(config).await?;
        // Before the first publication, so no change is missed.
        let events = registry.subscribe();
        let prefix = format!("{}registry/", config.prefix);
        let mut mirror = Mirror {
            registry,
            client,
            prefix: prefix.clone(),
            origin: origin.clone(),
            request_timeout: config.request_timeout,
            settings,
            session: None,
            old_leases: Vec::new(),
            lost: None,
            watch: None,
            owned: HashMap::new(),
            repair: Repair::default(),
        };
        let ready = async {
            mirror.new_session().await?;
            mirror.publish_all().await?;
            mirror.watch = Some(mirror.relist().await?);
            Ok::<(), CoordError>(())
        };
        if let Err(e) = ready.await {
            if let Some(session) = mirror.session.take() {
                // Best effort: else the keys published so far go with the lease.
                let _ = mirror.revoke(session.id).await;
            }
            return Err(e);
        }
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(mirror.run(stopped, events));
        tracing::info!(%origin, %prefix, "registry mirrored through etcd");
        Ok(Self {
            origin,
            prefix,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// This sidecar's name in the shared registry.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Where instances are published: `{config prefix}registry/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Revokes the session lease — the other sidecars drop this one's instances at
    /// once — and stops mirroring; the registry forgets its remote instances.
    ///
    /// # Errors
    /// [`CoordError::Unavailable`] if the lease could not be revoked (the instances
    /// then go when it runs out); the mirror is stopped anyway.
    pub async fn stop(mut self) -> Result<(), CoordError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|e| CoordError::Backend {
                backend: BACKEND,
                reason: format!("registry mirror task: {e}"),
            })?,
            None => Ok(()),
        }
    }
}

impl Drop for EtcdMirror {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn invalid(problem: String) -> CoordError {
    CoordError::Backend {
        backend: BACKEND,
        reason: format!("invalid registry mirror config: {problem}"),
    }
}

/// The stored value of an instance's key.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    address: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    health: Health,
    /// Milliseconds it stays held out, as of the write.
    #[serde(default)]
    held_out: Option<u64>,
    check: String,
    origin: String,
}

impl Record {
    fn of(i: &Instance, origin: &str, now: Instant) -> Self {
        Self {
            address: i.address.clone(),
            metadata: i.metadata.clone(),
            health: i.health,
            held_out: i.held_out_until.map(|until| {
                u64::try_from(until.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
            }),
            check: i.check.to_owned(),
            origin: origin.to_owned(),
        }
    }

    fn into_remote(self) -> RemoteInstance {
        RemoteInstance {
            address: self.address,
            metadata: self.metadata,
            health: self.health,
            held_out: self.held_out.map(Duration::from_millis),
            check_kind: self.check,
            origin: self.origin,
        }
    }
}

/// (service, id).
type Key = (String, String);

/// The session lease; its keep-alive task stops when it is dropped.
struct Session {
    id: i64,
    keeper: AbortHandle,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// What is broken and waits for a retry.
#[derive(Debug, Default)]
struct Repair {
    /// The session lease is lost: grant another (then publish everything).
    session: bool,
    /// Not every local change made it to etcd: publish everything.
    publish: bool,
    /// The watch is broken: list and watch again.
    relist: bool,
}

impl Repair {
    fn any(&self) -> bool {
        self.session || self.publish || self.relist
    }
}

/// The background task's state.
struct Mirror {
    registry: Registry,
    client: Client,
    /// `{config prefix}registry/`.
    prefix: String,
    origin: String,
    request_timeout: Duration,
    settings: MirrorSettings,
    session: Option<Session>,
    /// Replaced session leases, revoked once everything is published again.
    old_leases: Vec<i64>,
    /// Fires when the session's keep-alive gives up.
    lost: Option<oneshot::Receiver<()>>,
    watch: Option<WatchStream>,
    /// The keys this sidecar wrote, and the revision of its last write of each.
    owned: HashMap<Key, i64>,
    repair: Repair,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        // Nothing keeps the remote instances fresh any more.
        for i in self.registry.all_instances() {
            if i.origin.is_some() {
                self.registry.remove_remote(&i.service, &i.id);
            }
        }
    }
}

/// What woke the mirror.
enum Wake {
    Stop,
    Event(Result<Event, RecvError>),
    Watch(Result<Option<WatchResponse>, etcd_client::Error>),
    Lost,
    Retry,
}

impl Mirror {
    async fn run(
        mut self,
        mut stop: oneshot::Receiver<()>,
        mut events: broadcast::Receiver<Event>,
    ) -> Result<(), CoordError> {
        let mut backoff = FIRST_BACKOFF;
        let mut retry_at: Option<Instant> = None;
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            let wake = tokio::select! {
                _ = &mut stop => Wake::Stop,
                event = events.recv() => Wake::Event(event),
                message = next_message(self.watch.as_mut()) => Wake::Watch(message),
                () = fired(self.lost.as_mut()) => Wake::Lost,
                () = sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => Wake::Retry,
            };
            match wake {
                Wake::Stop => break,
                Wake::Event(Ok(event)) => self.local_changes(event, &mut events).await,
                Wake::Event(Err(RecvError::Lagged(skipped))) => {
                    tracing::debug!(
                        skipped,
                        "registry mirror lagged behind: publishing everything"
                    );
                    self.repair.publish = true;
                }
                // The registry is gone (we hold a clone, so this does not happen).
                Wake::Event(Err(RecvError::Closed)) => break,
                Wake::Watch(Ok(Some(resp))) => {
                    if resp.canceled() {
                        tracing::warn!(reason = %resp.cancel_reason(), "registry watch cancelled: listing again");
                        self.watch = None;
                        self.repair.relist = true;
                    } else {
                        self.watched(&resp).await;
                    }
                }
                Wake::Watch(outcome) => {
                    match outcome {
                        Err(e) => {
                            tracing::warn!(error = %e, "registry watch failed: listing again")
                        }
                        _ => tracing::warn!("registry watch ended: listing again"),
                    }
                    self.watch = None;
                    self.repair.relist = true;
                }
                Wake::Lost => {
                    tracing::warn!("registry session lease lost: publishing on a new one");
                    self.lost = None;
                    self.repair.session = true;
                }
                Wake::Retry => {
                    retry_at = None;
                    match self.fix().await {
                        Ok(()) => backoff = FIRST_BACKOFF,
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?backoff, "registry mirror: etcd unavailable");
                            retry_at = Some(Instant::now() + backoff);
                            backoff = (backoff * 2).min(self.settings.max_backoff);
                        }
                    }
                }
            }
            if self.repair.any() && retry_at.is_none() {
                retry_at = Some(Instant::now() + backoff);
            }
        }
        // Stopping: the other sidecars drop our instances now rather than after the TTL.
        let mut outcome = Ok(());
        if let Some(session) = self.session.take() {
            outcome = self.revoke(session.id).await;
        }
        for id in std::mem::take(&mut self.old_leases) {
            let _ = self.revoke(id).await;
        }
        tracing::info!(origin = %self.origin, "registry mirror stopped");
        outcome
    }

    /// Repairs what is broken, in order: session, publication, watch.
    async fn fix(&mut self) -> Result<(), CoordError> {
        if self.repair.session {
            if let Some(old) = self.session.take() {
                self.old_leases.push(old.id);
            }
            self.new_session().await?;
            self.repair.session = false;
            self.repair.publish = true;
        }
        if self.repair.publish {
            self.publish_all().await?;
            self.repair.publish = false;
            for id in std::mem::take(&mut self.old_leases) {
                let _ = self.revoke(id).await;
            }
        }
        if self.repair.relist {
            self.watch = Some(self.relist().await?);
            self.repair.relist = false;
        }
        Ok(())
    }

    /// One request, within the request timeout; client errors as they are.
    async fn call_raw<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<Result<T, etcd_client::Error>, CoordError> {
        timeout(self.request_timeout, request)
            .await
            .map_err(|_| CoordError::Unavailable {
                backend: BACKEND,
                reason: format!("{what}: no answer within {:?}", self.request_timeout),
            })
    }

    async fn call<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, CoordError> {
        self.call_raw(what, request)
            .await?
            .map_err(|e| error(what, e))
    }

    /// Grants a session lease and starts keeping it alive.
    async fn new_session(&mut self) -> Result<(), CoordError> {
        let asked = i64::try_from(self.settings.session_ttl.as_secs())
            .unwrap_or(i64::MAX)
            .saturating_add(i64::from(self.settings.session_ttl.subsec_nanos() > 0))
            .max(1);
        let mut leases = self.client.lease_client();
        let resp = self
            .call("grant session lease", leases.grant(asked, None))
            .await?;
        let ttl = u64::try_from(resp.ttl())
            .ok()
            .filter(|t| *t > 0)
            .ok_or_else(|| CoordError::Backend {
                backend: BACKEND,
                reason: format!("grant session lease: ttl {} for {asked}s", resp.ttl()),
            })?;
        let (lost, fired) = oneshot::channel();
        let keeper = tokio::spawn(keep_alive(
            self.client.clone(),
            resp.id(),
            Duration::from_secs(ttl),
            self.request_timeout,
            lost,
        ));
        self.session = Some(Session {
            id: resp.id(),
            keeper: keeper.abort_handle(),
        });
        self.lost = Some(fired);
        tracing::debug!(lease = resp.id(), ttl, "registry session lease granted");
        Ok(())
    }

    async fn revoke(&self, id: i64) -> Result<(), CoordError> {
        let mut leases = self.client.lease_client();
        match self
            .call_raw("revoke session lease", leases.revoke(id))
            .await?
        {
            Ok(_) => Ok(()),
            Err(e) if lease_not_found(&e) => Ok(()),
            Err(e) => Err(error("revoke session lease", e)),
        }
    }

    fn key(&self, service: &str, id: &str) -> String {
        format!("{}{service}/{id}", self.prefix)
    }

    /// The (service, id) of a key under the prefix.
    fn parse_key(&self, key: &[u8]) -> Option<Key> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        let (service, id) = rest.split_once('/')?;
        (!service.is_empty() && !id.is_empty() && !id.contains('/'))
            .then(|| (service.to_owned(), id.to_owned()))
    }

    /// Publishes the instances a registry event (and any queued behind it) touched.
    async fn local_changes(&mut self, first: Event, events: &mut broadcast::Receiver<Event>) {
        let mut keys = BTreeSet::from([(first.service, first.id)]);
        loop {
            match events.try_recv() {
                Ok(event) => {
                    keys.insert((event.service, event.id));
                }
                Err(TryRecvError::Lagged(_)) => self.repair.publish = true,
                Err(_) => break,
            }
        }
        if self.repair.publish {
            // Everything goes out on the next repair anyway.
            return;
        }
        for (service, id) in keys {
            if let Err(e) = self.publish_key(&service, &id).await {
                tracing::warn!(service, id, error = %e, "registry instance not published; retrying");
                self.repair.publish = true;
                return;
            }
        }
    }

    /// Brings the key of (service, id) in line with the registry.
    async fn publish_key(&mut self, service: &str, id: &str) -> Result<(), CoordError> {
        match self.registry.instance(service, id) {
            Some(i) if i.origin.is_none() => self.put(&i).await,
            Some(_) => {
                // Another sidecar's now: its key is not ours to touch.
                self.owned.remove(&(service.to_owned(), id.to_owned()));
                Ok(())
            }
            None => self.delete(service, id).await,
        }
    }

    /// Writes a local instance's key on the session lease: unconditionally if this
    /// sidecar does not own it yet (a registration takes it over), else only if
    /// nobody wrote it since this sidecar did.
    async fn put(&mut self, i: &Instance) -> Result<(), CoordError> {
        let lease = match &self.session {
            Some(s) if !self.repair.session => s.id,
            _ => {
                return Err(CoordError::Unavailable {
                    backend: BACKEND,
                    reason: "no session lease".to_owned(),
                });
            }
        };
        let key = self.key(&i.service, &i.id);
        let value =
            serde_json::to_vec(&Record::of(i, &self.origin, Instant::now())).map_err(|e| {
                CoordError::Backend {
                    backend: BACKEND,
                    reason: format!("encode instance: {e}"),
                }
            })?;
        let owned_key = (i.service.clone(), i.id.clone());
        let put = TxnOp::put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        );
        let txn = match self.owned.get(&owned_key) {
            Some(rev) => Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Less,
                    rev + 1,
                )])
                .and_then([put]),
            None => Txn::new().and_then([put]),
        };
        let mut kv = self.client.kv_client();
        match self.call_raw("publish", kv.txn(txn)).await? {
            Ok(resp) if resp.succeeded() => {
                let revision = resp.header().map_or(0, |h| h.revision());
                self.owned.insert(owned_key, revision);
                Ok(())
            }
            Ok(_) => {
                // Someone registered it with another sidecar since: the watch brings
                // their write, which takes it over here too.
                tracing::debug!(service = %i.service, id = %i.id, "registry key written by another sidecar; not overwritten");
                Ok(())
            }
            Err(e) => {
                if lease_not_found(&e) {
                    self.repair.session = true;
                }
                Err(error("publish", e))
            }
        }
    }

    /// Deletes a key this sidecar owns, unless someone wrote it since.
    async fn delete(&mut self, service: &str, id: &str) -> Result<(), CoordError> {
        let owned_key = (service.to_owned(), id.to_owned());
        let Some(rev) = self.owned.remove(&owned_key) else {
            return Ok(());
        };
        let key = self.key(service, id);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Less,
                rev + 1,
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let mut kv = self.client.kv_client();
        if let Err(e) = self.call("unpublish", kv.txn(txn)).await {
            // Still ours to delete on the next repair.
            self.owned.insert(owned_key, rev);
            return Err(e);
        }
        Ok(())
    }

    /// Publishes every local instance, and deletes the keys of those that are gone.
    async fn publish_all(&mut self) -> Result<(), CoordError> {
        let local: Vec<Instance> = self
            .registry
            .all_instances()
            .into_iter()
            .filter(|i| i.origin.is_none())
            .collect();
        let keys: HashSet<Key> = local
            .iter()
            .map(|i| (i.service.clone(), i.id.clone()))
            .collect();
        for i in &local {
            self.put(i).await?;
        }
        let gone: Vec<Key> = self
            .owned
            .keys()
            .filter(|k| !keys.contains(*k))
            .cloned()
            .collect();
        for (service, id) in gone {
            self.publish_key(&service, &id).await?;
        }
        Ok(())
    }

    /// Imports another sidecar's key; the key if it is now a remote instance here.
    fn import(&mut self, kv: &KeyValue) -> Option<Key> {
        let key = self.parse_key(kv.key())?;
        let record: Record = match serde_json::from_slice(kv.value()) {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable registry record skipped");
                return None;
            }
        };
        if record.origin == self.origin {
            // Ours (or from this sidecar's previous life: it goes with that lease).
            return None;
        }
        if self
            .owned
            .get(&key)
            .is_some_and(|rev| *rev >= kv.mod_revision())
        {
            // This sidecar wrote it since.
            return None;
        }
        if self.owned.remove(&key).is_some() {
            tracing::info!(service = %key.0, id = %key.1, origin = %record.origin, "instance taken over by another sidecar");
        }
        match self
            .registry
            .apply_remote(&key.0, &key.1, record.into_remote())
        {
            Ok(_) => Some(key),
            Err(e) => {
                tracing::warn!(service = %key.0, id = %key.1, error = %e, "remote instance not imported");
                None
            }
        }
    }

    /// Applies watched changes.
    async fn watched(&mut self, resp: &WatchResponse) {
        for event in resp.events() {
            let Some(kv) = event.kv() else {
                continue;
            };
            match event.event_type() {
                EventType::Put => {
                    self.import(kv);
                }
                EventType::Delete => {
                    let Some(key) = self.parse_key(kv.key()) else {
                        continue;
                    };
                    match self.owned.get(&key) {
                        None => {
                            self.registry.remove_remote(&key.0, &key.1);
                        }
                        Some(rev) if *rev >= kv.mod_revision() => {}
                        Some(_) => {
                            // Our key went with a lost lease (or was deleted by hand):
                            // publish it again if it is still ours.
                            self.owned.remove(&key);
                            if let Err(e) = self.publish_key(&key.0, &key.1).await {
                                tracing::debug!(service = %key.0, id = %key.1, error = %e, "registry key not published again yet");
                                self.repair.publish = true;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Lists the prefix: imports what other sidecars published, drops remote
    /// instances that are gone, publishes again what of ours is missing; then
    /// watches from the revision after the listing.
    async fn relist(&mut self) -> Result<WatchStream, CoordError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .call(
                "list registry",
                kv.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut remote = HashSet::new();
        let mut present = HashSet::new();
        for kv in resp.kvs() {
            if let Some(key) = self.parse_key(kv.key()) {
                present.insert(key);
            }
            if let Some(key) = self.import(kv) {
                remote.insert(key);
            }
        }
        for i in self.registry.all_instances() {
            if i.origin.is_some() && !remote.contains(&(i.service.clone(), i.id.clone())) {
                self.registry.remove_remote(&i.service, &i.id);
            }
        }
        let missing: Vec<Key> = self
            .owned
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for (service, id) in missing {
            self.owned.remove(&(service.clone(), id.clone()));
            self.publish_key(&service, &id).await?;
        }
        let mut watches = self.client.watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        self.call(
            "watch registry",
            watches.watch(self.prefix.as_str(), Some(options)),
        )
        .await
    }
}

async fn next_message(
    watch: Option<&mut WatchStream>,
) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match watch {
        Some(watch) => watch.message().await,
        None => pending().await,
    }
}

async fn fired(lost: Option<&mut oneshot::Receiver<()>>) {
    match lost {
        Some(lost) => {
            let _ = lost.await;
        }
        None => pending().await,
    }
}

/// Keeps the session lease alive every third of its TTL; tells `lost` when etcd
/// says it is gone, or when no keep-alive succeeded for a whole TTL.
async fn keep_alive(
    client: Client,
    id: i64,
    ttl: Duration,
    request_timeout: Duration,
    lost: oneshot::Sender<()>,
) {
    let mut leases = client.lease_client();
    let mut open: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
    let mut last_ok = Instant::now();
    loop {
        sleep(ttl / 3).await;
        // NOTE: taken before sending, so the lease is known to live at least until
        // `last_ok + ttl`.
        let sent = Instant::now();
        let attempt = timeout(request_timeout, async {
            match &mut open {
                // Opening the stream sends the first keep-alive and checks its answer.
                None => {
                    open = Some(leases.keep_alive(id).await?);
                    Ok::<bool, etcd_client::Error>(true)
                }
                Some((keeper, stream)) => {
                    keeper.keep_alive().await?;
                    match stream.message().await? {
                        Some(resp) => Ok(resp.ttl() > 0),
                        None => Err(etcd_client::Error::LeaseKeepAliveError(
                            "keep-alive stream closed".to_owned(),
                        )),
                    }
                }
            }
        })
        .await;
        match attempt {
            Ok(Ok(true)) => last_ok = sent,
            Ok(Ok(false)) => break,
            Ok(Err(e)) if lease_not_found(&e) => break,
            Ok(Err(e)) => {
                tracing::debug!(lease = id, error = %e, "session keep-alive failed");
                open = None;
            }
            Err(_) => {
                tracing::debug!(lease = id, "session keep-alive timed out");
                open = None;
            }
        }
        if Instant::now() >= last_ok + ttl {
            break;
        }
    }
    tracing::debug!(lease = id, "registry session lease lost");
    let _ = lost.send(());
}
