//! The coordination building block: locks and leader elections on leases, with
//! fencing tokens that keep a deposed holder from overwriting its successor's work.
//!
//! A lock (or an election) has at most one holder at a time, on a lease that lasts
//! a TTL unless extended; a holder that crashes loses it when the TTL runs out.
//! Leases alone are not enough — a holder paused longer than its TTL (GC, a stopped
//! VM) wakes up still believing it holds the lock — so every new lease carries a
//! *fencing token* that is larger than every earlier one for that name, even across
//! restarts, and storage refuses writes that carry a token older than the latest
//! ([`Coordinator::latest_token`]).
//!
//! # Layout
//! - [`Coordinator`]: the backend contract — locks (`acquire`, `extend`, `release`),
//!   elections (`campaign`, `keep_alive`, `resign`, `leader`, `observe`) and fencing
//!   (`latest_token`) — with [`Lease`], [`LeaderInfo`] and [`CoordError`].
//! - [`Name`] and the limits on names, owners, TTLs and waits.
//! - [`LockGuard`] and [`Leadership`]: leases kept alive in the background, with a
//!   `lost()` future that fires when they are no longer held.
//! - [`detector`]: failure detectors for the registry — heartbeats with a TTL,
//!   phi accrual, and flap damping — driven by the caller's clock.
//! - [`registry`]: the service registry — instances, their health (alive, suspect,
//!   dead) from those detectors, flap damping, blocking queries and change events;
//!   with feature `etcd`, `registry::etcd::EtcdMirror` shares it across sidecars.
//! - [`embedded`]: the single-node backend (leases in memory, tokens fsynced to redb).
//! - `contract` (feature `contract`): the test suite every backend passes, including
//!   a randomized history checker for mutual exclusion.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use trellis_coord::embedded::EmbeddedCoordinator;
//! use trellis_coord::{Coordinator, Kind, LockGuard, Name};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let coord: Arc<dyn Coordinator> =
//!     Arc::new(EmbeddedCoordinator::open(dir.path().join("coord.redb")).await?);
//! let name = Name::new("invoices")?;
//!
//! let guard = LockGuard::acquire(Arc::clone(&coord), &name, "worker-1", Duration::from_secs(10), Duration::from_secs(5)).await?;
//! let token = guard.fencing_token();
//! // Storage accepts a write carrying `token` only while no newer token exists.
//! assert!(token >= coord.latest_token(Kind::Lock, &name).await?);
//! guard.release().await?;
//!
//! let next = coord.acquire(&name, "worker-2", Duration::from_secs(10), Duration::ZERO).await?;
//! assert!(next.fencing_token > token);
//! # Ok(())
//! # }
//! ```

mod api;
pub mod detector;
pub mod embedded;
#[cfg(feature = "etcd")]
pub mod etcd;
mod guard;
mod name;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod registry;

#[cfg(feature = "contract")]
pub mod contract;

pub use api::{CoordError, Coordinator, Invalid, Kind, LeaderInfo, Lease};
pub use guard::{Leadership, LeaseLost, LockGuard};
pub use name::{MAX_NAME_LEN, MAX_OWNER_LEN, MAX_TTL, MAX_WAIT, MIN_TTL, Name};
