//! The coordination contract every backend implements.

use std::fmt::{self, Debug};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::name::{Name, check_owner, check_ttl, check_wait};

/// Which namespace a name lives in: a lock and an election may share a name without
/// sharing anything else, fencing tokens included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A lock (`acquire` / `extend` / `release`).
    Lock,
    /// An election (`campaign` / `keep_alive` / `resign`).
    Election,
}

impl Kind {
    /// `"lock"` or `"election"` (log fields, metric labels, storage keys).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lock => "lock",
            Self::Election => "election",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lease on a lock, or on leadership of an election: who holds it, with which
/// fencing token, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// A lock or an election.
    pub kind: Kind,
    /// Its name.
    pub name: Name,
    /// The lock's owner, or the elected candidate.
    pub owner: String,
    /// Strictly greater than the token of every earlier holder of this name (of this
    /// kind), across restarts of the backend. It stays the same while the lease is
    /// extended.
    pub fencing_token: u64,
    /// When the holder must consider the lease lost unless it was extended. A
    /// monotonic deadline (no wall clock involved), never later than the moment the
    /// backend frees the name: a holder that stops work by then never overlaps the
    /// next holder.
    pub expires_at: Instant,
    /// The lease duration granted (a backend may round the requested one up), from
    /// the last acquire or extend.
    pub ttl: Duration,
}

impl Lease {
    /// How long until [`expires_at`](Self::expires_at) (zero once passed), for display.
    pub fn remaining(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    /// Whether [`expires_at`](Self::expires_at) has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.expires_at
    }
}

/// The current leader of an election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The elected candidate.
    pub candidate: String,
    /// The term's fencing token.
    pub fencing_token: u64,
    /// When its lease expires unless kept alive. In values from
    /// [`Coordinator::observe`] this is as of the last change of leader or later (keep-alives
    /// update it without notifying).
    pub expires_at: Instant,
    /// The lease duration granted.
    pub ttl: Duration,
}

impl LeaderInfo {
    /// How long until [`expires_at`](Self::expires_at) (zero once passed), for display.
    pub fn remaining(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }
}

impl From<&Lease> for LeaderInfo {
    fn from(lease: &Lease) -> Self {
        Self {
            candidate: lease.owner.clone(),
            fencing_token: lease.fencing_token,
            expires_at: lease.expires_at,
            ttl: lease.ttl,
        }
    }
}

/// A request that is not valid; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    /// A lock or election name.
    #[error("invalid name {name:?}: {reason}")]
    Name {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An owner or candidate id.
    #[error("invalid owner {owner:?}: {reason}")]
    Owner {
        /// The id given (its first 64 characters).
        owner: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A lease duration outside [`MIN_TTL`](crate::MIN_TTL)..=[`MAX_TTL`](crate::MAX_TTL).
    #[error("invalid ttl {ttl:?}: must be between 10ms and 24h")]
    Ttl {
        /// The duration given.
        ttl: Duration,
    },
    /// A wait longer than [`MAX_WAIT`](crate::MAX_WAIT).
    #[error("invalid wait {wait:?}: must be at most 24h")]
    Wait {
        /// The duration given.
        wait: Duration,
    },
}

/// Why a coordination operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordError {
    /// The lock was not acquired (the candidate not elected) within the wait.
    #[error("{kind} {name} was not {} within {waited:?}{}", if *kind == Kind::Lock { "acquired" } else { "won" }, holder.as_ref().map_or_else(String::new, |h| format!(" (held by {h:?})")))]
    Timeout {
        /// Lock or election.
        kind: Kind,
        /// Its name.
        name: Name,
        /// How long the call waited.
        waited: Duration,
        /// Who held it when the wait ended, if anyone (`None` also when it was free
        /// but promised to an earlier waiter).
        holder: Option<String>,
    },
    /// The caller does not hold the lease it tried to extend or give up: someone else
    /// does, nobody does (released or expired: an expired lease cannot be revived), or
    /// the token is not the current one.
    #[error("{owner:?} with token {token} does not hold {kind} {name}{}", holder.as_ref().map_or_else(|| " (nobody does)".to_owned(), |h| format!(" ({h:?} does)")))]
    NotHolder {
        /// Lock or election.
        kind: Kind,
        /// Its name.
        name: Name,
        /// The caller.
        owner: String,
        /// The token the caller gave.
        token: u64,
        /// Who holds it now, if anyone.
        holder: Option<String>,
    },
    /// Too many callers are already waiting for this name (or too many names are in
    /// use); retry later.
    #[error("{kind} {name}: {what} limit of {limit} reached")]
    Overloaded {
        /// Lock or election.
        kind: Kind,
        /// Its name.
        name: Name,
        /// Which limit.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A request that is not valid.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The backend was closed; nothing more will succeed on this instance.
    #[error("coordination backend is closed")]
    Closed,
    /// The backend could not be reached; the outcome of a mutation is unknown.
    #[error("{backend} coordination backend unavailable: {reason}")]
    Unavailable {
        /// The backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// Any other backend failure.
    #[error("{backend} coordination backend error: {reason}")]
    Backend {
        /// The backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
}

impl CoordError {
    /// Whether retrying the same call may succeed (the backend had a problem, not the
    /// request).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. } | Self::Backend { .. } | Self::Overloaded { .. }
        )
    }
}

/// A coordination backend: locks and leader elections on leases with fencing tokens.
///
/// Locks and elections work alike: a *name* has at most one holder (lock owner,
/// elected leader) at a time, on a *lease* that lasts `ttl` unless extended. A lock
/// and an election may share a name without interfering. Names come into existence
/// on first use; an unknown one is simply free.
///
/// # To ensure correctness
/// Every implementation must guarantee, and `contract` checks:
/// 1. **Mutual exclusion**: at any moment at most one lease per name and kind is
///    valid. A lease is valid from the moment it is granted until it is released or
///    its expiry passes; the [`Lease::expires_at`] handed to the holder is never later
///    than the moment the backend frees the name, so a holder that stops by then never
///    overlaps its successor (compute it from a time taken *before* the request was
///    sent when the backend is remote).
/// 2. **Expiry is final**: once a lease has expired, extending or releasing it fails
///    with [`CoordError::NotHolder`], even if nobody took the name since.
/// 3. **Fencing tokens strictly increase** per name and kind with every new lease,
///    across restarts: a token is made durable (fsynced, committed) before a lease
///    carrying it is returned, and never issued twice. Extending keeps the token.
///    [`latest_token`](Self::latest_token) is at least the token of every lease
///    returned so far. Tokens need not be contiguous.
/// 4. **Only the holder** (same owner and same token) may extend or give up a lease;
///    everything else is [`CoordError::NotHolder`] and changes nothing.
/// 5. **Blocking calls** wait up to `wait` (zero: try once) and return as soon as the
///    name is free and it is the caller's turn: on release, on expiry (without anyone
///    calling), on resign. They fail with [`CoordError::Timeout`] no earlier than
///    `wait` after the call. A call by the current holder returns its lease again,
///    extended to the new `ttl` (a retried request is harmless).
/// 6. **Validation first**: invalid owners, TTLs and waits are
///    [`CoordError::Invalid`] and change nothing.
/// 7. **Observers see every change of leader**: [`observe`](Self::observe) starts from
///    the current leader and reports each later change of leader (a new term, or no
///    leader) — a slow observer may skip intermediate values but never sees an older
///    term after a newer one. Keep-alives do not notify.
///
/// The Rust guards [`LockGuard`](crate::LockGuard) and
/// [`Leadership`](crate::Leadership) build keep-alive and loss detection on top of
/// these methods.
#[async_trait]
pub trait Coordinator: Debug + Send + Sync + 'static {
    /// The backend's name.
    fn backend(&self) -> &'static str;

    // === locks ===

    /// Acquires the lock `name` for `owner` for `ttl`, waiting up to `wait` for it.
    async fn acquire(
        &self,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError>;

    /// Extends the holder's lease to `ttl` from now.
    async fn extend(
        &self,
        name: &Name,
        owner: &str,
        fencing_token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError>;

    /// Releases the lock; only its holder may.
    async fn release(&self, name: &Name, owner: &str, fencing_token: u64)
    -> Result<(), CoordError>;

    /// The lock's current lease, if it is held.
    async fn lock_holder(&self, name: &Name) -> Result<Option<Lease>, CoordError>;

    // === elections ===

    /// Campaigns for leadership of `name`, waiting up to `wait` to be elected.
    async fn campaign(
        &self,
        name: &Name,
        candidate: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError>;

    /// Extends the leader's lease to `ttl` from now.
    async fn keep_alive(
        &self,
        name: &Name,
        candidate: &str,
        fencing_token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError>;

    /// Gives up leadership; the next waiting candidate is elected.
    async fn resign(
        &self,
        name: &Name,
        candidate: &str,
        fencing_token: u64,
    ) -> Result<(), CoordError>;

    /// The current leader, if any.
    async fn leader(&self, name: &Name) -> Result<Option<LeaderInfo>, CoordError>;

    /// Follows the election's leader: the receiver starts at the current one and
    /// changes with every new term or loss of leader (see the guarantees above).
    async fn observe(&self, name: &Name)
    -> Result<watch::Receiver<Option<LeaderInfo>>, CoordError>;

    // === fencing ===

    /// The newest fencing token issued for `name` (0 if none ever was), so storage
    /// can refuse a write that carries an older one.
    async fn latest_token(&self, kind: Kind, name: &Name) -> Result<u64, CoordError>;

    /// Checks the backend is reachable.
    async fn health(&self) -> Result<(), CoordError>;

    /// Stops background work and fails waiting calls with [`CoordError::Closed`].
    /// Issued tokens are already durable; leases are not kept by an embedded backend.
    async fn close(&self) -> Result<(), CoordError>;
}

// === kind-generic helpers (guards, contract) ===

/// Acquires a lock or campaigns.
pub(crate) async fn take(
    coord: &dyn Coordinator,
    kind: Kind,
    name: &Name,
    owner: &str,
    ttl: Duration,
    wait: Duration,
) -> Result<Lease, CoordError> {
    match kind {
        Kind::Lock => coord.acquire(name, owner, ttl, wait).await,
        Kind::Election => coord.campaign(name, owner, ttl, wait).await,
    }
}

/// Extends a lock or keeps leadership alive.
pub(crate) async fn renew(
    coord: &dyn Coordinator,
    lease: &Lease,
    ttl: Duration,
) -> Result<Lease, CoordError> {
    match lease.kind {
        Kind::Lock => {
            coord
                .extend(&lease.name, &lease.owner, lease.fencing_token, ttl)
                .await
        }
        Kind::Election => {
            coord
                .keep_alive(&lease.name, &lease.owner, lease.fencing_token, ttl)
                .await
        }
    }
}

/// Releases a lock or resigns.
pub(crate) async fn give_up(coord: &dyn Coordinator, lease: &Lease) -> Result<(), CoordError> {
    match lease.kind {
        Kind::Lock => {
            coord
                .release(&lease.name, &lease.owner, lease.fencing_token)
                .await
        }
        Kind::Election => {
            coord
                .resign(&lease.name, &lease.owner, lease.fencing_token)
                .await
        }
    }
}

// === backends written once for both kinds ===

/// A backend whose locks and elections share one code path, differing only in
/// [`Kind`]; it gets [`Coordinator`] from the blanket impl below, so the mapping of
/// `acquire`/`campaign`, `extend`/`keep_alive`, `release`/`resign` onto that path
/// is written once for every such backend.
#[async_trait]
pub(crate) trait ByKind: Debug + Send + Sync + 'static {
    /// [`Coordinator::backend`].
    fn backend_name(&self) -> &'static str;

    /// [`Coordinator::acquire`] or [`Coordinator::campaign`].
    async fn take_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError>;

    /// [`Coordinator::extend`] or [`Coordinator::keep_alive`].
    async fn renew_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        fencing_token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError>;

    /// [`Coordinator::release`] or [`Coordinator::resign`].
    async fn end_lease(
        &self,
        kind: Kind,
        name: &Name,
        owner: &str,
        fencing_token: u64,
    ) -> Result<(), CoordError>;

    /// [`Coordinator::lock_holder`] or [`Coordinator::leader`].
    async fn current_lease(&self, kind: Kind, name: &Name) -> Result<Option<Lease>, CoordError>;

    /// [`Coordinator::observe`].
    async fn follow_leader(
        &self,
        name: &Name,
    ) -> Result<watch::Receiver<Option<LeaderInfo>>, CoordError>;

    /// [`Coordinator::latest_token`].
    async fn newest_token(&self, kind: Kind, name: &Name) -> Result<u64, CoordError>;

    /// [`Coordinator::health`].
    async fn check_health(&self) -> Result<(), CoordError>;

    /// [`Coordinator::close`].
    async fn shut_down(&self) -> Result<(), CoordError>;
}

/// Validation first (guarantee 6), once for every backend.
fn check_take(owner: &str, ttl: Duration, wait: Duration) -> Result<(), CoordError> {
    check_owner(owner)?;
    check_ttl(ttl)?;
    check_wait(wait)?;
    Ok(())
}

#[async_trait]
impl<T: ByKind> Coordinator for T {
    fn backend(&self) -> &'static str {
        self.backend_name()
    }

    async fn acquire(
        &self,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError> {
        check_take(owner, ttl, wait)?;
        self.take_lease(Kind::Lock, name, owner, ttl, wait).await
    }

    async fn extend(
        &self,
        name: &Name,
        owner: &str,
        fencing_token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError> {
        check_owner(owner)?;
        check_ttl(ttl)?;
        self.renew_lease(Kind::Lock, name, owner, fencing_token, ttl)
            .await
    }

    async fn release(
        &self,
        name: &Name,
        owner: &str,
        fencing_token: u64,
    ) -> Result<(), CoordError> {
        check_owner(owner)?;
        self.end_lease(Kind::Lock, name, owner, fencing_token).await
    }

    async fn lock_holder(&self, name: &Name) -> Result<Option<Lease>, CoordError> {
        self.current_lease(Kind::Lock, name).await
    }

    async fn campaign(
        &self,
        name: &Name,
        candidate: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError> {
        check_take(candidate, ttl, wait)?;
        self.take_lease(Kind::Election, name, candidate, ttl, wait)
            .await
    }

    async fn keep_alive(
        &self,
        name: &Name,
        candidate: &str,
        fencing_token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError> {
        check_owner(candidate)?;
        check_ttl(ttl)?;
        self.renew_lease(Kind::Election, name, candidate, fencing_token, ttl)
            .await
    }

    async fn resign(
        &self,
        name: &Name,
        candidate: &str,
        fencing_token: u64,
    ) -> Result<(), CoordError> {
        check_owner(candidate)?;
        self.end_lease(Kind::Election, name, candidate, fencing_token)
            .await
    }

    async fn leader(&self, name: &Name) -> Result<Option<LeaderInfo>, CoordError> {
        Ok(self
            .current_lease(Kind::Election, name)
            .await?
            .map(|l| LeaderInfo::from(&l)))
    }

    async fn observe(
        &self,
        name: &Name,
    ) -> Result<watch::Receiver<Option<LeaderInfo>>, CoordError> {
        self.follow_leader(name).await
    }

    async fn latest_token(&self, kind: Kind, name: &Name) -> Result<u64, CoordError> {
        self.newest_token(kind, name).await
    }

    async fn health(&self) -> Result<(), CoordError> {
        self.check_health().await
    }

    async fn close(&self) -> Result<(), CoordError> {
        self.shut_down().await
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn object_safe() {
        fn _obj_safe(_: Box<dyn Coordinator>) {}
    }

    #[test]
    fn messages_carry_the_values() {
        let name = Name::new("jobs").expect("name");
        let e = CoordError::Timeout {
            kind: Kind::Lock,
            name: name.clone(),
            waited: Duration::from_secs(1),
            holder: Some("a".into()),
        };
        assert_eq!(
            e.to_string(),
            r#"lock jobs was not acquired within 1s (held by "a")"#
        );
        let e = CoordError::NotHolder {
            kind: Kind::Election,
            name,
            owner: "b".into(),
            token: 7,
            holder: None,
        };
        assert_eq!(
            e.to_string(),
            r#""b" with token 7 does not hold election jobs (nobody does)"#
        );
        assert!(!e.is_transient());
    }
}
