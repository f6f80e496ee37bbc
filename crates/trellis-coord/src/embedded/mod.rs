//! The embedded backend: one process, leases in memory, fencing tokens in a redb
//! file.
//!
//! # What is durable, and why only that
//! Leases live in memory: after a restart every lock is free and every election
//! leaderless, and holders find out when their next keep-alive fails with
//! [`CoordError::NotHolder`]. That is the safe direction — nothing is held by a
//! process that is gone. What must survive is the *fencing token* counter of each
//! name: a holder from before the restart may still be writing, so every token
//! handed out afterwards must be larger. A token is therefore committed with an
//! fsync before the lease that carries it is returned (see the `tokens` module).
//!
//! # Time
//! Deadlines are `tokio::time::Instant`s, so tests can pause and advance time.
//! Expiry is checked lazily by every call, and a background *sweeper* task sleeps
//! until the earliest lease deadline, frees the names whose lease ran out, wakes
//! their first waiter and tells observers — without anyone calling.
//!
//! # Waiting
//! Blocked calls queue per name, first come first served (the `slot` module): a
//! freed name is promised to the first waiter, which alone may take it, so a stream
//! of newcomers cannot starve it. A call that times out or is cancelled leaves the
//! queue and passes its turn on.

mod slot;
mod tokens;

#[cfg(test)]
mod test;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::slot::{Effect, Holder, Poll, Slot, WaiterId};
use self::tokens::Tokens;
use crate::api::{ByKind, CoordError, Kind, LeaderInfo, Lease};
use crate::name::Name;

pub(crate) const BACKEND: &str = "embedded";

/// Limits of an [`EmbeddedCoordinator`] (bounded memory).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EmbeddedOptions {
    /// Most calls waiting for one name; more are [`CoordError::Overloaded`].
    pub max_waiters: usize,
    /// Most names in use at once (held, awaited or observed); more are
    /// [`CoordError::Overloaded`].
    pub max_names: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            max_waiters: 1024,
            max_names: 100_000,
        }
    }
}

/// A single-node [`Coordinator`]: leases in memory, fencing tokens fsynced to a
/// redb file.
///
/// ```
/// use std::time::Duration;
/// use trellis_coord::embedded::EmbeddedCoordinator;
/// use trellis_coord::{Coordinator, Name};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let coord = EmbeddedCoordinator::open(dir.path().join("coord.redb")).await?;
/// let name = Name::new("nightly-report")?;
/// let lease = coord.acquire(&name, "worker-1", Duration::from_secs(10), Duration::ZERO).await?;
/// // Someone else trying at once gives up.
/// assert!(coord.acquire(&name, "worker-2", Duration::from_secs(10), Duration::ZERO).await.is_err());
/// coord.release(&name, "worker-1", lease.fencing_token).await?;
/// coord.close().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct EmbeddedCoordinator {
    shared: Arc<Shared>,
    /// The sweeper task; aborted on close and on drop.
    sweeper: Mutex<Option<JoinHandle<()>>>,
}

type Key = (Kind, Name);

#[derive(Debug)]
struct Shared {
    /// Every name's state. A std `Mutex`: never held across an `.await`, so every
    /// transition is atomic and cheap.
    state: Mutex<State>,
    tokens: Tokens,
    options: EmbeddedOptions,
    next_id: AtomicU64,
}

#[derive(Debug)]
struct State {
    entries: HashMap<Key, Entry>,
    /// Lease deadlines, earliest first. Entries whose time no longer matches their
    /// name's [`Entry::timer`] are stale and skipped.
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    /// Wakes the sweeper when a deadline earlier than all others appears.
    poke: Arc<Notify>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Entry {
    slot: Slot,
    /// One per waiting call, notified on [`Effect::Wake`]. (`Notify` keeps a permit,
    /// so a wake that comes before the call waits again is not lost.)
    wakers: HashMap<WaiterId, Arc<Notify>>,
    /// The holder as seen by observers; created by the first `observe`.
    observers: Option<watch::Sender<Option<LeaderInfo>>>,
    /// The deadline this name has in [`State::timers`].
    timer: Option<Instant>,
}

fn lease(kind: Kind, name: &Name, h: Holder) -> Lease {
    Lease {
        kind,
        name: name.clone(),
        owner: h.owner,
        fencing_token: h.token,
        expires_at: h.expires_at,
        ttl: h.ttl,
    }
}

fn leader_info(h: &Holder) -> LeaderInfo {
    LeaderInfo {
        candidate: h.owner.clone(),
        fencing_token: h.token,
        expires_at: h.expires_at,
        ttl: h.ttl,
    }
}

impl State {
    /// The entry of `key`, created if the name limit allows.
    fn entry(&mut self, key: &Key, max_names: usize) -> Result<&mut Entry, CoordError> {
        if !self.entries.contains_key(key) && self.entries.len() >= max_names {
            return Err(CoordError::Overloaded {
                kind: key.0,
                name: key.1.clone(),
                what: "names in use",
                limit: max_names,
            });
        }
        Ok(self.entries.entry(key.clone()).or_default())
    }

    /// Carries out a transition's effects on `key`, schedules its deadline, tells
    /// observers, and drops the entry if nothing is left in it.
    fn settle(&mut self, key: &Key, fx: Vec<Effect>) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        for effect in fx {
            match effect {
                Effect::Wake(id) => {
                    if let Some(waker) = entry.wakers.get(&id) {
                        waker.notify_one();
                    }
                }
                Effect::Expired { owner, token } => {
                    tracing::info!(kind = %key.0, name = %key.1, %owner, token, "lease expired");
                    metrics::counter!("trellis_coord_expired_total", "backend" => BACKEND, "kind" => key.0.as_str())
                        .increment(1);
                }
                Effect::Changed => {}
            }
        }
        if let Some(tx) = &entry.observers {
            let now = entry.slot.peek().map(leader_info);
            tx.send_if_modified(|seen| {
                let changed =
                    seen.as_ref().map(|l| l.fencing_token) != now.as_ref().map(|l| l.fencing_token);
                // Keep-alives move the expiry without notifying.
                *seen = now;
                changed
            });
        }
        if let Some(at) = entry.slot.expires_at()
            && entry.timer.is_none_or(|t| at < t)
        {
            entry.timer = Some(at);
            if self
                .timers
                .peek()
                .is_none_or(|Reverse((first, _))| at < *first)
            {
                self.poke.notify_one();
            }
            self.timers.push(Reverse((at, key.clone())));
        }
        if entry.slot.is_idle()
            && entry.wakers.is_empty()
            && entry
                .observers
                .as_ref()
                .is_none_or(|tx| tx.receiver_count() == 0)
        {
            self.entries.remove(key);
        }
    }

    /// Expires every lease due at `now`; the next deadline.
    fn sweep(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse((at, _))) = self.timers.peek()
            && *at <= now
        {
            let Some(Reverse((at, key))) = self.timers.pop() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&key) else {
                continue;
            };
            if entry.timer != Some(at) {
                continue;
            }
            entry.timer = None;
            let mut fx = Vec::new();
            entry.slot.expire(now, &mut fx);
            // Still held (extended): `settle` schedules its new deadline.
            self.settle(&key, fx);
        }
        self.timers.peek().map(|Reverse((at, _))| *at)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Takes a waiting call out of its line when the call ends without taking the name
/// (timed out, cancelled), passing its turn on.
struct Queued<'a> {
    shared: &'a Shared,
    key: &'a Key,
    id: WaiterId,
    armed: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // NOTE: callers disarm (or drop) this before locking `state` themselves: the
        // std mutex is not reentrant.
        let mut state = self.shared.lock();
        if let Some(entry) = state.entries.get_mut(self.key) {
            entry.wakers.remove(&self.id);
            let mut fx = Vec::new();
            entry.slot.leave(self.id, &mut fx);
            state.settle(self.key, fx);
        }
    }
}

/// A name promised to a call while its token is made durable; given up (to the next
/// waiter) if the call fails or is cancelled before the lease is in place.
struct Reservation<'a> {
    shared: &'a Shared,
    key: &'a Key,
    id: WaiterId,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.shared.lock();
        if let Some(entry) = state.entries.get_mut(self.key) {
            let mut fx = Vec::new();
            entry.slot.abandon(self.id, &mut fx);
            state.settle(self.key, fx);
        }
    }
}

async fn sweeper(shared: Weak<Shared>, poke: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = shared.lock();
            if state.closed {
                return;
            }
            state.sweep(Instant::now())
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = poke.notified() => {}
                }
            }
            None => poke.notified().await,
        }
    }
}

impl EmbeddedCoordinator {
    /// Opens (or creates) the coordinator whose fencing tokens live in the file at
    /// `path`, with default limits.
    ///
    /// # Errors
    /// If the file can't be opened (notably: another process has it open).
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, CoordError> {
        Self::open_with(path, EmbeddedOptions::default()).await
    }

    /// Opens (or creates) the coordinator with `options`.
    ///
    /// # Errors
    /// If the file can't be opened (notably: another process has it open).
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: EmbeddedOptions,
    ) -> Result<Self, CoordError> {
        let tokens = Tokens::open(path.as_ref()).await?;
        let poke = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                entries: HashMap::new(),
                timers: BinaryHeap::new(),
                poke: Arc::clone(&poke),
                closed: false,
            }),
            tokens,
            options,
            next_id: AtomicU64::new(1),
        });
        let sweeper = tokio::spawn(sweeper(Arc::downgrade(&shared), poke));
        Ok(Self {
            shared,
            sweeper: Mutex::new(Some(sweeper)),
        })
    }

    /// The file holding the fencing tokens.
    pub fn path(&self) -> &Path {
        self.shared.tokens.path()
    }

    /// Takes the name (lock or leadership), waiting up to `wait`.
    async fn grant(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError> {
        let shared = &*self.shared;
        let key = (kind, name.clone());
        let started = Instant::now();
        let deadline = started + wait;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut queued = Queued {
            shared,
            key: &key,
            id,
            armed: false,
        };
        loop {
            let waker = {
                let mut state = shared.lock();
                if state.closed {
                    queued.armed = false;
                    return Err(CoordError::Closed);
                }
                let now = Instant::now();
                let max_waiters = shared.options.max_waiters;
                let entry = state.entry(&key, shared.options.max_names)?;
                let mut fx = Vec::new();
                match entry.slot.poll(id, owner, ttl, now, &mut fx) {
                    Poll::Held(h) => {
                        // `poll` took the call out of the line.
                        entry.wakers.remove(&id);
                        queued.armed = false;
                        state.settle(&key, fx);
                        return Ok(lease(kind, name, h));
                    }
                    Poll::Reserved => {
                        entry.wakers.remove(&id);
                        queued.armed = false;
                        state.settle(&key, fx);
                        break;
                    }
                    Poll::Busy { holder } if now >= deadline => {
                        entry.wakers.remove(&id);
                        entry.slot.leave(id, &mut fx);
                        queued.armed = false;
                        state.settle(&key, fx);
                        drop(state);
                        metrics::counter!("trellis_coord_timeouts_total", "backend" => BACKEND, "kind" => kind.as_str())
                            .increment(1);
                        return Err(CoordError::Timeout {
                            kind,
                            name: name.clone(),
                            waited: now - started,
                            holder,
                        });
                    }
                    Poll::Busy { .. } => {
                        if !queued.armed {
                            if entry.slot.waiting() >= max_waiters {
                                state.settle(&key, fx);
                                return Err(CoordError::Overloaded {
                                    kind,
                                    name: name.clone(),
                                    what: "waiters",
                                    limit: max_waiters,
                                });
                            }
                            entry.slot.enqueue(id);
                            queued.armed = true;
                        }
                        let waker = Arc::clone(entry.wakers.entry(id).or_default());
                        state.settle(&key, fx);
                        waker
                    }
                }
            };
            tokio::select! {
                () = waker.notified() => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }

        // The name is promised to this call: make a token durable, then take it.
        let mut reservation = Reservation {
            shared,
            key: &key,
            id,
            armed: true,
        };
        let token = shared.tokens.issue(kind, name).await?;
        let mut state = shared.lock();
        if state.closed {
            reservation.armed = false;
            return Err(CoordError::Closed);
        }
        let now = Instant::now();
        let mut fx = Vec::new();
        let granted = state
            .entries
            .get_mut(&key)
            .and_then(|e| e.slot.granted(id, owner, token, ttl, now, &mut fx));
        reservation.armed = false;
        state.settle(&key, fx);
        drop(state);
        let Some(h) = granted else {
            return Err(CoordError::Backend {
                backend: BACKEND,
                reason: format!("{kind} {name}: reservation lost"),
            });
        };
        let waited = now - started;
        metrics::counter!("trellis_coord_granted_total", "backend" => BACKEND, "kind" => kind.as_str())
            .increment(1);
        metrics::histogram!("trellis_coord_wait_seconds", "backend" => BACKEND, "kind" => kind.as_str())
            .record(waited.as_secs_f64());
        tracing::debug!(%kind, %name, %owner, token, ?ttl, ?waited, "lease granted");
        Ok(lease(kind, name, h))
    }

    /// Extends the holder's lease.
    async fn renew(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError> {
        let key = (kind, name.clone());
        let mut state = self.shared.lock();
        if state.closed {
            return Err(CoordError::Closed);
        }
        let now = Instant::now();
        let mut fx = Vec::new();
        let renewed = match state.entries.get_mut(&key) {
            Some(entry) => entry.slot.renew(owner, token, ttl, now, &mut fx),
            None => Err(None),
        };
        state.settle(&key, fx);
        renewed
            .map(|h| lease(kind, name, h))
            .map_err(|holder| CoordError::NotHolder {
                kind,
                name: name.clone(),
                owner: owner.to_owned(),
                token,
                holder,
            })
    }

    /// Gives the holder's lease up.
    async fn revoke(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        token: u64,
    ) -> Result<(), CoordError> {
        let key = (kind, name.clone());
        let mut state = self.shared.lock();
        if state.closed {
            return Err(CoordError::Closed);
        }
        let now = Instant::now();
        let mut fx = Vec::new();
        let revoked = match state.entries.get_mut(&key) {
            Some(entry) => entry.slot.revoke(owner, token, now, &mut fx),
            None => Err(None),
        };
        state.settle(&key, fx);
        drop(state);
        match revoked {
            Ok(_) => {
                metrics::counter!("trellis_coord_released_total", "backend" => BACKEND, "kind" => kind.as_str())
                    .increment(1);
                tracing::debug!(%kind, %name, %owner, token, "lease released");
                Ok(())
            }
            Err(holder) => Err(CoordError::NotHolder {
                kind,
                name: name.clone(),
                owner: owner.to_owned(),
                token,
                holder,
            }),
        }
    }

    /// The current lease of a name.
    fn holder(&self, kind: Kind, name: &Name) -> Result<Option<Lease>, CoordError> {
        let key = (kind, name.clone());
        let mut state = self.shared.lock();
        if state.closed {
            return Err(CoordError::Closed);
        }
        let mut fx = Vec::new();
        let holder = state
            .entries
            .get_mut(&key)
            .and_then(|e| e.slot.holder(Instant::now(), &mut fx).cloned());
        state.settle(&key, fx);
        Ok(holder.map(|h| lease(kind, name, h)))
    }
}

impl Drop for EmbeddedCoordinator {
    fn drop(&mut self) {
        if let Some(sweeper) = self
            .sweeper
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            sweeper.abort();
        }
    }
}

#[async_trait]
impl ByKind for EmbeddedCoordinator {
    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    async fn take_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError> {
        self.grant(kind, name, owner, ttl, wait).await
    }

    async fn renew_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        fencing_token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError> {
        self.renew(kind, name, owner, fencing_token, ttl).await
    }

    async fn end_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        fencing_token: u64,
    ) -> Result<(), CoordError> {
        self.revoke(kind, name, owner, fencing_token).await
    }

    async fn current_lease(&self, kind: Kind, name: &Name) -> Result<Option<Lease>, CoordError> {
        self.holder(kind, name)
    }

    async fn follow_leader(
        &self,
        name: &Name,
    ) -> Result<watch::Receiver<Option<LeaderInfo>>, CoordError> {
        let key = (Kind::Election, name.clone());
        let mut state = self.shared.lock();
        if state.closed {
            return Err(CoordError::Closed);
        }
        let entry = state.entry(&key, self.shared.options.max_names)?;
        let mut fx = Vec::new();
        let current = entry.slot.holder(Instant::now(), &mut fx).map(leader_info);
        let rx = entry
            .observers
            .get_or_insert_with(|| watch::Sender::new(current))
            .subscribe();
        state.settle(&key, fx);
        Ok(rx)
    }

    async fn newest_token(&self, kind: Kind, name: &Name) -> Result<u64, CoordError> {
        let key = (kind, name.clone());
        {
            let state = self.shared.lock();
            if state.closed {
                return Err(CoordError::Closed);
            }
            if let Some(token) = state.entries.get(&key).and_then(|e| e.slot.last_token()) {
                return Ok(token);
            }
        }
        let token = self.shared.tokens.latest(kind, name).await?;
        if let Some(entry) = self.shared.lock().entries.get_mut(&key) {
            entry.slot.note_token(token);
        }
        Ok(token)
    }

    async fn check_health(&self) -> Result<(), CoordError> {
        if self.shared.lock().closed {
            return Err(CoordError::Closed);
        }
        self.shared
            .tokens
            .latest(Kind::Lock, &Name::internal("trellis.health"))
            .await
            .map(drop)
    }

    async fn shut_down(&self) -> Result<(), CoordError> {
        let entries = {
            let mut state = self.shared.lock();
            state.closed = true;
            state.timers.clear();
            std::mem::take(&mut state.entries)
        };
        // Waiting calls wake, see `closed` and fail; observers see their channel close.
        for entry in entries.values() {
            for waker in entry.wakers.values() {
                waker.notify_one();
            }
        }
        drop(entries);
        let sweeper = self
            .sweeper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(sweeper) = sweeper {
            sweeper.abort();
        }
        self.shared.tokens.close().await
    }
}
