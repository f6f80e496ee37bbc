//! Guards that keep a lease alive and say when it is lost: [`LockGuard`] and
//! [`Leadership`].
//!
//! # Why a guard and not just `extend` calls
//! A lease is only as good as its keep-alives, and the moment it stops being valid is
//! the moment the holder must stop acting on it — between two keep-alives, not at the
//! next one. A guard's background task renews the lease at a third of its TTL (so two
//! consecutive failures still leave time), retries transient backend errors until
//! the lease's own deadline, and resolves [`lost`](LockGuard::lost) as soon as it
//! knows: the backend says someone else holds it, the deadline passed without a
//! successful renewal, the backend closed — or, for leadership, the election's
//! observer shows another term. Work guarded by a lease should `select!` on `lost()`
//! and pass the [`fencing_token`](LockGuard::fencing_token) to the storage it writes.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use trellis_coord::embedded::EmbeddedCoordinator;
//! use trellis_coord::{Coordinator, Leadership, Name};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let coord: Arc<dyn Coordinator> =
//!     Arc::new(EmbeddedCoordinator::open(dir.path().join("coord.redb")).await?);
//! let name = Name::new("scheduler")?;
//! let leadership =
//!     Leadership::campaign(Arc::clone(&coord), &name, "node-a", Duration::from_secs(5), Duration::from_secs(30)).await?;
//! let lost = leadership.lost();
//! tokio::select! {
//!     reason = lost => println!("lost leadership: {reason:?}"),
//!     () = async { /* lead, writing with leadership.fencing_token() */ } => {}
//! }
//! leadership.resign().await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::api::{CoordError, Coordinator, Kind, LeaderInfo, Lease, give_up, renew, take};
use crate::name::Name;

/// Why a guard's lease is no longer held.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseLost {
    /// No renewal succeeded before the lease's deadline.
    Expired,
    /// The backend says it is not held with this token any more; `holder` holds it
    /// now, if anyone.
    Revoked {
        /// The new holder, if known.
        holder: Option<String>,
    },
    /// The backend was closed.
    Closed,
    /// Released (or resigned) through the guard, or the guard was dropped.
    Released,
}

#[derive(Debug, Clone)]
enum Held {
    Yes(Lease),
    /// Why, and the last lease held.
    Lost(LeaseLost, Lease),
}

/// What both guards share.
#[derive(Debug)]
struct Guard {
    coord: Arc<dyn Coordinator>,
    /// The term's token (the current lease is in `state`).
    token: u64,
    state: watch::Receiver<Held>,
    keep_alive: JoinHandle<()>,
    /// Dropping it tells the keep-alive task the guard is gone: it gives the lease
    /// up. (Not the `state` receiver: `lost()` futures hold clones of it.)
    _dropped: oneshot::Sender<()>,
}

impl Guard {
    async fn take(
        coord: Arc<dyn Coordinator>,
        kind: Kind,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Self, CoordError> {
        let lease = take(coord.as_ref(), kind, name, owner, ttl, wait).await?;
        // Observing the election shows a new term at once; keep-alives would only
        // notice at the next renewal.
        let observer = match kind {
            Kind::Election => match coord.observe(name).await {
                Ok(rx) => Some(rx),
                Err(e) => {
                    // Don't keep a leadership nobody looks after.
                    let _ = give_up(coord.as_ref(), &lease).await;
                    return Err(e);
                }
            },
            Kind::Lock => None,
        };
        let (tx, state) = watch::channel(Held::Yes(lease.clone()));
        let (dropped_tx, dropped) = oneshot::channel();
        let keep_alive = tokio::spawn(keep_alive(
            Arc::clone(&coord),
            lease.clone(),
            tx,
            dropped,
            observer,
        ));
        Ok(Self {
            coord,
            token: lease.fencing_token,
            state,
            keep_alive,
            _dropped: dropped_tx,
        })
    }

    fn lease(&self) -> Lease {
        match &*self.state.borrow() {
            Held::Yes(lease) | Held::Lost(_, lease) => lease.clone(),
        }
    }

    fn is_held(&self) -> bool {
        matches!(&*self.state.borrow(), Held::Yes(lease) if !lease.is_expired())
    }

    fn lost(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            match state.wait_for(|s| matches!(s, Held::Lost(..))).await {
                Ok(held) => match &*held {
                    Held::Lost(reason, _) => reason.clone(),
                    Held::Yes(_) => LeaseLost::Released,
                },
                // The keep-alive task is gone: the guard released the lease.
                Err(_) => LeaseLost::Released,
            }
        }
    }

    async fn give_up(self) -> Result<(), CoordError> {
        self.keep_alive.abort();
        let lease = self.lease();
        give_up(self.coord.as_ref(), &lease).await
    }
}

/// The keep-alive task: renews at a third of the TTL until the lease is lost or the
/// guard dropped, and publishes the outcome.
async fn keep_alive(
    coord: Arc<dyn Coordinator>,
    mut lease: Lease,
    state: watch::Sender<Held>,
    mut dropped: oneshot::Receiver<()>,
    mut observer: Option<watch::Receiver<Option<LeaderInfo>>>,
) {
    let reason = loop {
        // A third of the TTL after the last grant or renewal.
        let next = lease
            .expires_at
            .checked_sub(lease.ttl * 2 / 3)
            .unwrap_or(lease.expires_at);
        tokio::select! {
            biased;
            _ = &mut dropped => {
                if let Err(e) = give_up(coord.as_ref(), &lease).await {
                    tracing::debug!(kind = %lease.kind, name = %lease.name, error = %e, "guard dropped: lease not given up");
                }
                break LeaseLost::Released;
            }
            holder = other_term(&mut observer, lease.fencing_token) => {
                break LeaseLost::Revoked { holder };
            }
            () = sleep_until(next) => {}
        }
        match renew_until_deadline(coord.as_ref(), &lease).await {
            Ok(renewed) => {
                lease = renewed;
                state.send_replace(Held::Yes(lease.clone()));
            }
            Err(reason) => break reason,
        }
    };
    tracing::info!(kind = %lease.kind, name = %lease.name, owner = %lease.owner, token = lease.fencing_token, ?reason, "guarded lease lost");
    state.send_replace(Held::Lost(reason, lease));
}

/// Renews `lease`, retrying transient errors, until its deadline.
async fn renew_until_deadline(coord: &dyn Coordinator, lease: &Lease) -> Result<Lease, LeaseLost> {
    let pause = (lease.ttl / 10).max(Duration::from_millis(5));
    loop {
        match timeout_at(lease.expires_at, renew(coord, lease, lease.ttl)).await {
            Err(_) => return Err(LeaseLost::Expired),
            Ok(Ok(renewed)) => return Ok(renewed),
            Ok(Err(CoordError::NotHolder { holder, .. })) => {
                return Err(LeaseLost::Revoked { holder });
            }
            Ok(Err(CoordError::Closed)) => return Err(LeaseLost::Closed),
            Ok(Err(e)) => {
                tracing::warn!(kind = %lease.kind, name = %lease.name, error = %e, "lease renewal failed; retrying");
                let retry = (Instant::now() + pause).min(lease.expires_at);
                sleep_until(retry).await;
                if Instant::now() >= lease.expires_at {
                    return Err(LeaseLost::Expired);
                }
            }
        }
    }
}

/// Resolves when the observed election has a term other than `token` (giving its
/// leader, if any); never without an observer.
async fn other_term(
    observer: &mut Option<watch::Receiver<Option<LeaderInfo>>>,
    token: u64,
) -> Option<String> {
    let Some(rx) = observer else {
        return std::future::pending().await;
    };
    let outcome = rx
        .wait_for(|l| l.as_ref().is_none_or(|l| l.fencing_token != token))
        .await
        .map(|leader| leader.as_ref().map(|l| l.candidate.clone()));
    match outcome {
        Ok(holder) => holder,
        Err(_) => {
            // The backend closed the observer; keep-alives will say more.
            *observer = None;
            std::future::pending().await
        }
    }
}

// === impl LockGuard ===

/// A held lock, kept alive in the background until released, dropped or lost.
///
/// Dropping the guard releases the lock in the background (best effort); call
/// [`release`](Self::release) to know it happened.
#[derive(Debug)]
pub struct LockGuard(Guard);

impl LockGuard {
    /// Acquires the lock `name` for `owner` (waiting up to `wait`) and keeps it alive.
    ///
    /// # Errors
    /// What [`Coordinator::acquire`] returns.
    pub async fn acquire(
        coord: Arc<dyn Coordinator>,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Self, CoordError> {
        Guard::take(coord, Kind::Lock, name, owner, ttl, wait)
            .await
            .map(Self)
    }

    /// The lease as of the last renewal (the last one held, once lost).
    pub fn lease(&self) -> Lease {
        self.0.lease()
    }

    /// The lease's fencing token: pass it to the storage this lock protects.
    pub fn fencing_token(&self) -> u64 {
        self.0.token
    }

    /// Whether the lock is still held: not lost, and the lease's deadline not passed.
    pub fn is_held(&self) -> bool {
        self.0.is_held()
    }

    /// Resolves once the lock is lost (or released through this guard).
    pub fn lost(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        self.0.lost()
    }

    /// Stops the keep-alives and releases the lock.
    ///
    /// # Errors
    /// What [`Coordinator::release`] returns ([`CoordError::NotHolder`] if it was
    /// already lost).
    pub async fn release(self) -> Result<(), CoordError> {
        self.0.give_up().await
    }
}

// === impl Leadership ===

/// Leadership of an election, kept alive in the background until resigned, dropped
/// or lost.
///
/// Dropping it resigns in the background (best effort); call
/// [`resign`](Self::resign) to know it happened.
#[derive(Debug)]
pub struct Leadership(Guard);

impl Leadership {
    /// Campaigns for `name` as `candidate`, waiting up to `wait` to be elected, and
    /// keeps the leadership alive.
    ///
    /// # Errors
    /// What [`Coordinator::campaign`] returns ([`CoordError::Timeout`] if not elected
    /// within `wait`).
    pub async fn campaign(
        coord: Arc<dyn Coordinator>,
        name: &Name,
        candidate: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Self, CoordError> {
        Guard::take(coord, Kind::Election, name, candidate, ttl, wait)
            .await
            .map(Self)
    }

    /// The term's lease as of the last keep-alive (the last one held, once lost).
    pub fn lease(&self) -> Lease {
        self.0.lease()
    }

    /// The term's fencing token.
    pub fn fencing_token(&self) -> u64 {
        self.0.token
    }

    /// Whether this candidate still leads: not lost, and the lease's deadline not
    /// passed.
    pub fn is_leader(&self) -> bool {
        self.0.is_held()
    }

    /// Resolves once leadership is lost (or resigned through this guard).
    pub fn lost(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        self.0.lost()
    }

    /// Stops the keep-alives and resigns.
    ///
    /// # Errors
    /// What [`Coordinator::resign`] returns ([`CoordError::NotHolder`] if leadership
    /// was already lost).
    pub async fn resign(self) -> Result<(), CoordError> {
        self.0.give_up().await
    }
}
