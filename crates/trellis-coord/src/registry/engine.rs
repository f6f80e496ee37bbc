//! The registry's state machine and the task that drives it through time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep_until, timeout};

use super::check::{Check, Detector, Prober};
use super::{
    Change, Event, Filter, Instance, Registration, RegistryError, RegistrySettings, RemoteInstance,
    ServiceSummary, Snapshot,
};
use crate::Name;
use crate::detector::{FlapDamping, Health};

/// Longest metadata map, address, and metadata key or value.
const MAX_METADATA: usize = 64;
const MAX_TEXT: usize = 1024;

/// The service registry (see the [module docs](super)). Cheap to clone; background
/// work stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: RegistrySettings,
    prober: Option<Arc<dyn Prober>>,
    state: Mutex<State>,
    /// The highest index handed out; blocked queries wait on it.
    index: watch::Sender<u64>,
    events: broadcast::Sender<Event>,
    /// Wakes the driver to re-plan (new instance, heartbeat that may move a deadline).
    replan: Arc<Notify>,
    driver: Mutex<Option<AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(driver) = lock(&self.driver).take() {
            driver.abort();
        }
        for service in lock(&self.state).services.values_mut() {
            for entry in service.instances.values_mut() {
                entry.stop_probe();
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    index: u64,
    count: usize,
    services: BTreeMap<String, Service>,
    /// Outlives registrations, so an instance that crashes and re-registers in a
    /// loop is still damped.
    damping: HashMap<(String, String), FlapDamping>,
}

#[derive(Debug, Default)]
struct Service {
    index: u64,
    instances: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    source: Source,
    health: Health,
    since: Instant,
    held_out_until: Option<Instant>,
    modify_index: u64,
}

/// Who judges an instance.
#[derive(Debug)]
enum Source {
    /// Registered here: its detector (and flap damping) judge it.
    Local(Box<Local>),
    /// Registered with another sidecar, which judges it; a mirror keeps it up to date
    /// through [`Registry::apply_remote`] and [`Registry::remove_remote`].
    Remote(Remote),
}

#[derive(Debug)]
struct Local {
    registration: Registration,
    /// Tells this registration's probe results from an earlier one's.
    generation: u64,
    detector: Detector,
    last_heartbeat: Option<Instant>,
    probe: Option<AbortHandle>,
}

/// A remote instance's details (its health and hold-out are the entry's).
#[derive(Debug, PartialEq)]
struct Remote {
    address: String,
    metadata: BTreeMap<String, String>,
    check_kind: String,
    origin: String,
}

impl Remote {
    fn new(r: &RemoteInstance) -> Self {
        Self {
            address: r.address.clone(),
            metadata: r.metadata.clone(),
            check_kind: r.check_kind.clone(),
            origin: r.origin.clone(),
        }
    }

    fn same_details(&self, r: &RemoteInstance) -> bool {
        self.address == r.address
            && self.metadata == r.metadata
            && self.check_kind == r.check_kind
            && self.origin == r.origin
    }
}

impl Entry {
    fn stop_probe(&mut self) {
        if let Source::Local(local) = &mut self.source
            && let Some(probe) = local.probe.take()
        {
            probe.abort();
        }
    }

    fn local(&self) -> Option<&Local> {
        match &self.source {
            Source::Local(local) => Some(local),
            Source::Remote(_) => None,
        }
    }

    /// The sidecar that judges it, if not this one.
    fn origin(&self) -> Option<&str> {
        match &self.source {
            Source::Local(_) => None,
            Source::Remote(remote) => Some(&remote.origin),
        }
    }
}

/// A remote instance's check kind as a static label (unknown kinds: `"remote"`).
fn kind_label(kind: &str) -> &'static str {
    ["ttl", "phi", "http"]
        .into_iter()
        .find(|k| *k == kind)
        .unwrap_or("remote")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is consistent after every statement that can panic (none should).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn check_name(what: &'static str, value: &str) -> Result<(), RegistryError> {
    Name::new(value).map(|_| ()).map_err(|e| match e {
        crate::Invalid::Name { reason, .. } => RegistryError::InvalidName {
            what,
            value: value.chars().take(MAX_TEXT).collect(),
            reason,
        },
        other => RegistryError::InvalidRegistration(other.to_string()),
    })
}

/// Checks an address and metadata (local and remote instances).
fn check_details(address: &str, metadata: &BTreeMap<String, String>) -> Result<(), RegistryError> {
    let bad = |m: String| Err(RegistryError::InvalidRegistration(m));
    if address.is_empty() || address.len() > MAX_TEXT {
        return bad(format!("address must be 1 to {MAX_TEXT} bytes"));
    }
    if metadata.len() > MAX_METADATA {
        return bad(format!("metadata may have at most {MAX_METADATA} entries"));
    }
    if let Some((k, _)) = metadata
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > MAX_TEXT || v.len() > MAX_TEXT)
    {
        return bad(format!(
            "metadata key {:?}: keys must be 1 to {MAX_TEXT} bytes, values at most {MAX_TEXT}",
            k.chars().take(64).collect::<String>()
        ));
    }
    Ok(())
}

fn check_remote(r: &RemoteInstance) -> Result<(), RegistryError> {
    check_details(&r.address, &r.metadata)?;
    let bad = |m: &str| Err(RegistryError::InvalidRegistration(m.to_owned()));
    if r.origin.is_empty() || r.origin.len() > MAX_TEXT {
        return bad("origin must be 1 to 1024 bytes");
    }
    if r.check_kind.len() > MAX_TEXT {
        return bad("check kind must be at most 1024 bytes");
    }
    Ok(())
}

fn check_registration(r: &Registration) -> Result<(), RegistryError> {
    let bad = |m: String| Err(RegistryError::InvalidRegistration(m));
    check_details(&r.address, &r.metadata)?;
    if r.deregister_after > Duration::from_secs(7 * 24 * 60 * 60) {
        return bad("deregister_after must be at most 7 days".into());
    }
    match r.check.problem() {
        Some(p) => bad(p),
        None => Ok(()),
    }
}

impl Registry {
    /// A registry running on the current tokio runtime; `prober` runs HTTP checks
    /// (without one, registrations with an HTTP check are refused).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(settings: RegistrySettings, prober: Option<Arc<dyn Prober>>) -> Self {
        let replan = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            events: broadcast::channel(settings.event_buffer.max(1)).0,
            settings,
            prober,
            // Index 0 means "answer at once" in a blocking query; never hand it out.
            state: Mutex::new(State {
                index: 1,
                ..State::default()
            }),
            index: watch::channel(1).0,
            replan: Arc::clone(&replan),
            driver: Mutex::new(None),
        });
        let driver = tokio::spawn(drive(Arc::downgrade(&inner), replan));
        *lock(&inner.driver) = Some(driver.abort_handle());
        Self { inner }
    }

    /// Registers (or re-registers) instance `id` of `service`. Registering again
    /// with the same details is a heartbeat; with different ones it replaces the
    /// instance (and restarts its detector). A new instance with a push check starts
    /// alive; with an HTTP check it is suspect until its first probe passes.
    ///
    /// Registering an id that is [remote](Self::apply_remote) takes it over: the
    /// instance is now registered here and judged here (a mirror then publishes it as
    /// this sidecar's).
    ///
    /// # Errors
    /// Invalid names or registration, or [`RegistryError::Full`].
    pub fn register(
        &self,
        service: &str,
        id: &str,
        registration: Registration,
    ) -> Result<Instance, RegistryError> {
        check_name("service", service)?;
        check_name("instance id", id)?;
        check_registration(&registration)?;
        if !registration.check.is_push() && self.inner.prober.is_none() {
            return Err(RegistryError::InvalidRegistration(
                "http checks are not available here (no prober)".into(),
            ));
        }
        let now = Instant::now();
        let mut state = lock(&self.inner.state);
        let state = &mut *state;
        let current = state
            .services
            .get_mut(service)
            .and_then(|s| s.instances.get_mut(id));
        let replacing = match current.map(|e| &mut e.source) {
            Some(Source::Local(local)) if local.registration == registration => {
                // The same details again: a heartbeat.
                if local.detector.heartbeat(now) {
                    local.last_heartbeat = Some(now);
                }
                None
            }
            other => Some(other.is_some()),
        };
        let Some(replacing) = replacing else {
            let instance = self.inner.evaluate_one(state, service, id, now);
            self.inner.replan.notify_one();
            return instance.ok_or_else(|| unknown(service, id));
        };
        if !replacing && state.count >= self.inner.settings.max_instances {
            return Err(RegistryError::Full {
                limit: self.inner.settings.max_instances,
            });
        }
        state.index += 1;
        let index = state.index;
        let generation = index;
        let svc = state.services.entry(service.to_owned()).or_default();
        if let Some(mut old) = svc.instances.remove(id) {
            old.stop_probe();
        } else {
            state.count += 1;
        }
        svc.index = index;
        let push = registration.check.is_push();
        let mut local = Local {
            detector: Detector::new(&registration.check, now),
            last_heartbeat: push.then_some(now),
            generation,
            probe: None,
            registration,
        };
        if let Check::Http {
            url,
            interval,
            timeout,
            ..
        } = &local.registration.check
            && let Some(prober) = &self.inner.prober
        {
            let task = tokio::spawn(probe_loop(
                Arc::downgrade(&self.inner),
                Arc::clone(prober),
                (service.to_owned(), id.to_owned(), generation),
                url.clone(),
                *interval,
                *timeout,
            ));
            local.probe = Some(task.abort_handle());
        }
        let entry = Entry {
            source: Source::Local(Box::new(local)),
            health: if push { Health::Alive } else { Health::Suspect },
            since: now,
            held_out_until: None,
            modify_index: index,
        };
        svc.instances.insert(id.to_owned(), entry);
        tracing::info!(service, id, replacing, "instance registered");
        self.inner.emit(service, id, Change::Registered, index);
        // A flapping instance that re-registers stays held out.
        let instance = self.inner.evaluate_one(state, service, id, now);
        self.inner.index.send_replace(state.index);
        self.inner.replan.notify_one();
        instance.ok_or_else(|| unknown(service, id))
    }

    /// Records a heartbeat from a push-checked instance.
    ///
    /// # Errors
    /// [`RegistryError::UnknownInstance`] (register again),
    /// [`RegistryError::NotPush`], or [`RegistryError::Remote`] (another sidecar
    /// judges it: heartbeat there, or register here to take it over).
    pub fn heartbeat(&self, service: &str, id: &str) -> Result<Instance, RegistryError> {
        let now = Instant::now();
        let mut state = lock(&self.inner.state);
        let state = &mut *state;
        let entry = state
            .services
            .get_mut(service)
            .and_then(|s| s.instances.get_mut(id))
            .ok_or_else(|| unknown(service, id))?;
        let local = match &mut entry.source {
            Source::Local(local) => local,
            Source::Remote(remote) => return Err(remote_error(service, id, &remote.origin)),
        };
        if !local.detector.heartbeat(now) {
            return Err(RegistryError::NotPush {
                service: service.to_owned(),
                id: id.to_owned(),
            });
        }
        local.last_heartbeat = Some(now);
        let instance = self.inner.evaluate_one(state, service, id, now);
        self.inner.replan.notify_one();
        instance.ok_or_else(|| unknown(service, id))
    }

    /// Removes an instance registered here.
    ///
    /// # Errors
    /// [`RegistryError::UnknownInstance`], or [`RegistryError::Remote`]: another
    /// sidecar judges it, so only that sidecar (or its death) removes it.
    pub fn deregister(&self, service: &str, id: &str) -> Result<(), RegistryError> {
        let mut state = lock(&self.inner.state);
        if let Some(origin) = state
            .services
            .get(service)
            .and_then(|s| s.instances.get(id))
            .and_then(Entry::origin)
        {
            return Err(remote_error(service, id, origin));
        }
        if self.inner.remove(&mut state, service, id, false) {
            Ok(())
        } else {
            Err(unknown(service, id))
        }
    }

    /// One instance.
    pub fn instance(&self, service: &str, id: &str) -> Option<Instance> {
        let now = Instant::now();
        let state = lock(&self.inner.state);
        let entry = state.services.get(service)?.instances.get(id)?;
        Some(view(service, id, entry, &state, now))
    }

    /// A service's instances now (an unknown service has none, at the registry-wide
    /// index).
    pub fn instances(&self, service: &str, filter: Filter) -> Snapshot {
        let now = Instant::now();
        let state = lock(&self.inner.state);
        snapshot(&state, service, filter, now)
    }

    /// A blocking query: waits until the service's index is above `index`, or `wait`
    /// passes, then answers like [`instances`](Self::instances). With `index` 0 (or
    /// an index from before a restart, i.e. above the current one) it answers at once.
    pub async fn wait(
        &self,
        service: &str,
        index: u64,
        wait: Duration,
        filter: Filter,
    ) -> Snapshot {
        let mut rx = self.inner.index.subscribe();
        let deadline = Instant::now() + wait;
        loop {
            {
                let now = Instant::now();
                let state = lock(&self.inner.state);
                let current = state.services.get(service).map_or(0, |s| s.index);
                if index == 0 || current > index || index > state.index || now >= deadline {
                    return snapshot(&state, service, filter, now);
                }
                rx.mark_unchanged();
            }
            if timeout(
                deadline.saturating_duration_since(Instant::now()),
                rx.changed(),
            )
            .await
            .is_err()
            {
                // Time is up: answer with what is there.
                continue;
            }
        }
    }

    /// Every service with instances, and the registry-wide index.
    pub fn services(&self) -> (u64, Vec<ServiceSummary>) {
        let now = Instant::now();
        let state = lock(&self.inner.state);
        let list = state
            .services
            .iter()
            .filter(|(_, s)| !s.instances.is_empty())
            .map(|(name, s)| ServiceSummary {
                service: name.clone(),
                index: s.index,
                instances: s.instances.len(),
                healthy: s
                    .instances
                    .iter()
                    .filter(|(id, e)| view(name, id, e, &state, now).is_healthy())
                    .count(),
            })
            .collect();
        (state.index, list)
    }

    /// Every later change, as it happens (a subscriber that falls more than
    /// `event_buffer` behind skips ahead: `RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Inserts or updates instance `id` of `service` as another sidecar (`origin`)
    /// judges it. The driver never judges it: no detector, no flap damping, no
    /// `deregister_after` — it stays as given until the next `apply_remote` or
    /// [`remove_remote`](Self::remove_remote). Bumps the service index and emits
    /// events only when something changed: [`Change::Registered`] when it is new
    /// (or its address, metadata, check kind or origin changed), [`Change::Health`],
    /// [`Change::HeldOut`] (penalty 0: the origin's damping decided) and
    /// [`Change::Released`].
    ///
    /// An id registered *here* is replaced: the caller (a mirror) decided that the
    /// other sidecar's registration is the newer one.
    ///
    /// # Errors
    /// Invalid names, address, metadata or origin, or [`RegistryError::Full`].
    pub fn apply_remote(
        &self,
        service: &str,
        id: &str,
        remote: RemoteInstance,
    ) -> Result<Instance, RegistryError> {
        check_name("service", service)?;
        check_name("instance id", id)?;
        check_remote(&remote)?;
        let now = Instant::now();
        let held_until = remote.held_out.map(|d| {
            now.checked_add(d)
                .unwrap_or(now + Duration::from_secs(86_400))
        });
        let mut state = lock(&self.inner.state);
        let state = &mut *state;
        let current = state
            .services
            .get_mut(service)
            .and_then(|s| s.instances.get_mut(id));
        match current {
            Some(entry) if matches!(entry.source, Source::Remote(_)) => {
                let mut changes = Vec::new();
                if let Source::Remote(details) = &mut entry.source
                    && !details.same_details(&remote)
                {
                    *details = Remote::new(&remote);
                    changes.push(Change::Registered);
                }
                if entry.health != remote.health {
                    changes.push(Change::Health {
                        from: entry.health,
                        to: remote.health,
                    });
                    entry.health = remote.health;
                    entry.since = now;
                }
                match (entry.held_out_until, held_until) {
                    (None, Some(until)) => {
                        entry.held_out_until = Some(until);
                        changes.push(Change::HeldOut {
                            until,
                            penalty: 0.0,
                        });
                    }
                    (Some(_), None) => {
                        entry.held_out_until = None;
                        changes.push(Change::Released);
                    }
                    _ => {}
                }
                if !changes.is_empty() {
                    state.index += 1;
                    let index = state.index;
                    entry.modify_index = index;
                    if let Some(svc) = state.services.get_mut(service) {
                        svc.index = index;
                    }
                    tracing::debug!(service, id, origin = %remote.origin, ?changes, "remote instance updated");
                    for change in changes {
                        self.inner.emit(service, id, change, index);
                    }
                    self.inner.index.send_replace(index);
                }
            }
            other => {
                let replacing = other.is_some();
                if !replacing && state.count >= self.inner.settings.max_instances {
                    return Err(RegistryError::Full {
                        limit: self.inner.settings.max_instances,
                    });
                }
                state.index += 1;
                let index = state.index;
                let svc = state.services.entry(service.to_owned()).or_default();
                if let Some(mut old) = svc.instances.remove(id) {
                    old.stop_probe();
                } else {
                    state.count += 1;
                }
                svc.index = index;
                svc.instances.insert(
                    id.to_owned(),
                    Entry {
                        source: Source::Remote(Remote::new(&remote)),
                        health: remote.health,
                        since: now,
                        held_out_until: held_until,
                        modify_index: index,
                    },
                );
                tracing::info!(service, id, origin = %remote.origin, replacing, "remote instance registered");
                self.inner.emit(service, id, Change::Registered, index);
                self.inner.index.send_replace(index);
            }
        }
        let entry = state
            .services
            .get(service)
            .and_then(|s| s.instances.get(id))
            .ok_or_else(|| unknown(service, id))?;
        Ok(view(service, id, entry, state, now))
    }

    /// Removes a remote instance (event [`Change::Deregistered`], not dead); `false`
    /// if there is none — an instance registered here is left alone.
    pub fn remove_remote(&self, service: &str, id: &str) -> bool {
        let mut state = lock(&self.inner.state);
        let remote = state
            .services
            .get(service)
            .and_then(|s| s.instances.get(id))
            .is_some_and(|e| e.origin().is_some());
        remote && self.inner.remove(&mut state, service, id, false)
    }

    /// Every instance of every service, local and remote (the etcd mirror republishes
    /// them).
    #[cfg(feature = "etcd")]
    pub(crate) fn all_instances(&self) -> Vec<Instance> {
        let now = Instant::now();
        let state = lock(&self.inner.state);
        state
            .services
            .iter()
            .flat_map(|(service, s)| {
                s.instances
                    .iter()
                    .map(|(id, e)| view(service, id, e, &state, now))
            })
            .collect()
    }
}

fn remote_error(service: &str, id: &str, origin: &str) -> RegistryError {
    RegistryError::Remote {
        service: service.chars().take(MAX_TEXT).collect(),
        id: id.chars().take(MAX_TEXT).collect(),
        origin: origin.to_owned(),
    }
}

fn unknown(service: &str, id: &str) -> RegistryError {
    RegistryError::UnknownInstance {
        service: service.chars().take(MAX_TEXT).collect(),
        id: id.chars().take(MAX_TEXT).collect(),
    }
}

fn view(service: &str, id: &str, e: &Entry, state: &State, now: Instant) -> Instance {
    match &e.source {
        Source::Local(l) => {
            let penalty = state
                .damping
                .get(&(service.to_owned(), id.to_owned()))
                .map_or(0.0, |d| d.penalty(now));
            Instance {
                service: service.to_owned(),
                id: id.to_owned(),
                address: l.registration.address.clone(),
                metadata: l.registration.metadata.clone(),
                check: l.registration.check.kind(),
                health: e.health,
                held_out_until: e.held_out_until,
                since: e.since,
                last_heartbeat: l.last_heartbeat,
                phi: l.detector.phi(now),
                penalty,
                last_error: l.detector.last_error().map(str::to_owned),
                deregister_at: (e.health == Health::Dead)
                    .then(|| e.since + l.registration.deregister_after),
                modify_index: e.modify_index,
                origin: None,
            }
        }
        Source::Remote(r) => Instance {
            service: service.to_owned(),
            id: id.to_owned(),
            address: r.address.clone(),
            metadata: r.metadata.clone(),
            check: kind_label(&r.check_kind),
            health: e.health,
            held_out_until: e.held_out_until,
            since: e.since,
            last_heartbeat: None,
            phi: None,
            penalty: 0.0,
            last_error: None,
            deregister_at: None,
            modify_index: e.modify_index,
            origin: Some(r.origin.clone()),
        },
    }
}

fn snapshot(state: &State, service: &str, filter: Filter, now: Instant) -> Snapshot {
    let Some(svc) = state.services.get(service) else {
        // Unknown: the registry-wide index, so a blocking query with it wakes when
        // the service first appears.
        return Snapshot {
            index: state.index,
            instances: Vec::new(),
        };
    };
    Snapshot {
        index: svc.index,
        instances: svc
            .instances
            .iter()
            .map(|(id, e)| view(service, id, e, state, now))
            .filter(|i| filter == Filter::All || i.is_healthy())
            .collect(),
    }
}

impl Inner {
    fn emit(&self, service: &str, id: &str, change: Change, index: u64) {
        metrics::counter!("trellis_registry_changes_total", "service" => service.to_owned(), "change" => change.label()).increment(1);
        // No subscribers is fine.
        let _ = self.events.send(Event {
            service: service.to_owned(),
            id: id.to_owned(),
            change,
            index,
        });
    }

    /// Re-judges one instance at `now`, recording and announcing what changed.
    /// Returns the instance, or `None` if it was deregistered.
    fn evaluate_one(
        &self,
        state: &mut State,
        service: &str,
        id: &str,
        now: Instant,
    ) -> Option<Instance> {
        let key = (service.to_owned(), id.to_owned());
        let entry = state.services.get_mut(service)?.instances.get_mut(id)?;
        let Source::Local(local) = &entry.source else {
            // Another sidecar judges it.
            let entry = state.services.get(service)?.instances.get(id)?;
            return Some(view(service, id, entry, state, now));
        };
        let health = local.detector.health(now, entry.health);
        let mut changes = Vec::new();
        if health != entry.health {
            let from = entry.health;
            tracing::info!(service, id, ?from, to = ?health, "instance health changed");
            if from == Health::Alive {
                // A flip from up to down: flap damping counts it.
                let damping = state
                    .damping
                    .entry(key.clone())
                    .or_insert_with(|| FlapDamping::new(self.settings.damping.clone()));
                damping.failed(now);
            }
            entry.health = health;
            entry.since = now;
            changes.push(Change::Health { from, to: health });
        }
        let damping = state.damping.get_mut(&key);
        let held_until = damping.and_then(|d| {
            if d.suppressed(now) {
                d.released_at(now).map(|at| (at, d.penalty(now)))
            } else {
                None
            }
        });
        match (entry.held_out_until, held_until) {
            (None, Some((until, penalty))) => {
                tracing::warn!(service, id, penalty, "instance keeps flapping: held out");
                entry.held_out_until = Some(until);
                changes.push(Change::HeldOut { until, penalty });
            }
            (Some(_), None) => {
                tracing::info!(service, id, "flap damping released the instance");
                entry.held_out_until = None;
                changes.push(Change::Released);
            }
            (Some(_), Some((until, _))) => entry.held_out_until = Some(until),
            (None, None) => {}
        }
        if !changes.is_empty() {
            state.index += 1;
            let index = state.index;
            entry.modify_index = index;
            if let Some(svc) = state.services.get_mut(service) {
                svc.index = index;
            }
            for change in changes {
                self.emit(service, id, change, index);
            }
            self.index.send_replace(index);
        }
        let entry = state.services.get(service)?.instances.get(id)?;
        if entry.health == Health::Dead
            && entry.local().is_some_and(|l| {
                now.saturating_duration_since(entry.since) >= l.registration.deregister_after
            })
        {
            tracing::info!(service, id, "dead instance deregistered");
            self.remove(state, service, id, true);
            return None;
        }
        Some(view(service, id, entry, state, now))
    }

    /// Removes an instance; `false` if there was none.
    fn remove(&self, state: &mut State, service: &str, id: &str, dead: bool) -> bool {
        let Some(svc) = state.services.get_mut(service) else {
            return false;
        };
        let Some(mut entry) = svc.instances.remove(id) else {
            return false;
        };
        entry.stop_probe();
        state.count -= 1;
        state.index += 1;
        svc.index = state.index;
        if !dead {
            tracing::info!(service, id, "instance deregistered");
        }
        self.emit(service, id, Change::Deregistered { dead }, state.index);
        self.index.send_replace(state.index);
        true
    }

    /// Re-judges every instance; returns when the next one may change on its own.
    fn evaluate_all(&self, now: Instant) -> Option<Instant> {
        let mut state = lock(&self.state);
        let state = &mut *state;
        let keys: Vec<(String, String)> = state
            .services
            .iter()
            .flat_map(|(s, svc)| svc.instances.keys().map(move |id| (s.clone(), id.clone())))
            .collect();
        let mut next: Option<Instant> = None;
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for (service, id) in &keys {
            if self.evaluate_one(state, service, id, now).is_none() {
                continue;
            }
            let Some(entry) = state
                .services
                .get(service)
                .and_then(|s| s.instances.get(id))
            else {
                continue;
            };
            // Remote instances change only when their origin says so.
            let Some(local) = entry.local() else {
                continue;
            };
            at(local.detector.next_change(now, self.settings.phi_poll));
            at(entry.held_out_until);
            if entry.health == Health::Dead {
                at(Some(entry.since + local.registration.deregister_after));
            }
        }
        // Forget damping history that has decayed away for instances that are gone.
        state.damping.retain(|(service, id), d| {
            d.penalty(now) >= 1.0
                || state
                    .services
                    .get(service)
                    .is_some_and(|s| s.instances.contains_key(id))
        });
        let active = state
            .services
            .values()
            .map(|s| s.instances.len())
            .sum::<usize>();
        metrics::gauge!("trellis_registry_instances").set(active as f64);
        next
    }

    /// Applies a probe result, if it is for the current registration.
    fn probed(&self, service: &str, id: &str, generation: u64, result: Result<(), String>) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let state = &mut *state;
        let Some(local) = state
            .services
            .get_mut(service)
            .and_then(|s| s.instances.get_mut(id))
            .and_then(|e| match &mut e.source {
                Source::Local(local) if local.generation == generation => Some(local),
                _ => None,
            })
        else {
            return;
        };
        if let Err(e) = &result {
            tracing::debug!(service, id, error = %e, "health check failed");
        }
        local.detector.probed(result);
        self.evaluate_one(state, service, id, now);
        self.replan.notify_one();
    }
}

/// Moves instances through time: wakes at the earliest moment one may change (or
/// when told to re-plan) and re-judges them all.
async fn drive(inner: Weak<Inner>, replan: Arc<Notify>) {
    loop {
        let next = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            inner.evaluate_all(Instant::now())
        };
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            () = sleep_until(next.unwrap_or(far)) => {}
            () = replan.notified() => {}
        }
    }
}

/// Probes one instance every `interval` (the first probe at once) until it is
/// deregistered or replaced.
async fn probe_loop(
    inner: Weak<Inner>,
    prober: Arc<dyn Prober>,
    (service, id, generation): (String, String, u64),
    url: String,
    interval: Duration,
    probe_timeout: Duration,
) {
    let mut next = Instant::now();
    loop {
        sleep_until(next).await;
        next += interval;
        let result = match timeout(probe_timeout, prober.probe(&url)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {probe_timeout:?}")),
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.probed(&service, &id, generation, result);
    }
}
