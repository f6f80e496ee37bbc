//! The service registry: instances register under a service with an address,
//! metadata and a [`Check`]; a failure detector per instance moves it between
//! *alive*, *suspect* and *dead*; dead instances are deregistered after
//! `deregister_after`; instances that keep flipping are held out for a growing time
//! (flap damping, consul#2890). Every change bumps the service's *index*, so callers
//! can block until the set changes ([`Registry::wait`], Consul's blocking queries),
//! and is an [`Event`] (logged, counted, broadcast to [`Registry::subscribe`]rs).
//!
//! The registry runs on the caller's clock (`tokio::time`), so tests pause time and
//! step through suspect → dead → deregistered without sleeping. It is soft state, as
//! in Consul and Eureka: instances re-register when a heartbeat answers
//! [`RegistryError::UnknownInstance`] (the sidecar does this for its own app).
//!
//! # Sharing across sidecars
//! A registry is local to its process. To share it, each sidecar judges the
//! instances registered with it and publishes the verdicts; the other sidecars hold
//! them as *remote* instances ([`Registry::apply_remote`],
//! [`Registry::remove_remote`], [`Instance::origin`]), which their driver never
//! judges and which take no heartbeats ([`RegistryError::Remote`]). Every read path
//! (`instances`, `wait`, `services`, `subscribe`) shows local and remote instances
//! alike. The `etcd` module (feature `etcd`) does the publishing through etcd.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use trellis_coord::detector::Health;
//! use trellis_coord::registry::{Check, Filter, Registration, Registry, RegistrySettings};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::new(RegistrySettings::default(), None);
//! let reg = Registration::new("10.0.0.7:8080", Check::ttl(Duration::from_secs(10)));
//! registry.register("orders", "orders-1", reg)?;
//!
//! let found = registry.instances("orders", Filter::Healthy);
//! assert_eq!(found.instances[0].address, "10.0.0.7:8080");
//!
//! // Without heartbeats it turns suspect after the TTL, then dead.
//! tokio::time::sleep(Duration::from_secs(15)).await;
//! assert_eq!(registry.instances("orders", Filter::All).instances[0].health, Health::Suspect);
//! assert!(registry.instances("orders", Filter::Healthy).instances.is_empty());
//!
//! // A blocking query returns as soon as the set changes.
//! let changed = registry.wait("orders", found.index, Duration::from_secs(60), Filter::All).await;
//! assert!(changed.index > found.index);
//! # Ok(())
//! # }
//! ```

mod check;
mod engine;
#[cfg(feature = "etcd")]
pub mod etcd;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use check::{Check, Prober};
pub use engine::Registry;

use crate::detector::{DampingSettings, Health};

/// Registry-wide settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySettings {
    /// Flap damping applied to every instance.
    pub damping: DampingSettings,
    /// How often phi-accrual instances are re-evaluated.
    #[serde(with = "crate::detector::millis")]
    pub phi_poll: Duration,
    /// Most instances across all services.
    pub max_instances: usize,
    /// Events kept for slow subscribers before they skip.
    pub event_buffer: usize,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            damping: DampingSettings::default(),
            phi_poll: Duration::from_millis(100),
            max_instances: 100_000,
            event_buffer: 1024,
        }
    }
}

/// What an instance registers with.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Where to reach it (`host:port` or a URL).
    pub address: String,
    /// Free-form labels (zone, version, weight...).
    pub metadata: BTreeMap<String, String>,
    /// How its health is judged.
    pub check: Check,
    /// A dead instance is removed this long after it died.
    pub deregister_after: Duration,
}

impl Registration {
    /// A registration with no metadata, removed one minute after it dies.
    pub fn new(address: impl Into<String>, check: Check) -> Self {
        Self {
            address: address.into(),
            metadata: BTreeMap::new(),
            check,
            deregister_after: Duration::from_secs(60),
        }
    }

    /// With a metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// With another `deregister_after`.
    #[must_use]
    pub fn deregister_after(mut self, after: Duration) -> Self {
        self.deregister_after = after;
        self
    }
}

/// An instance as the registry sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Its service.
    pub service: String,
    /// Its id, unique within the service.
    pub id: String,
    /// Where to reach it.
    pub address: String,
    /// Its labels.
    pub metadata: BTreeMap<String, String>,
    /// `"ttl"`, `"phi"` or `"http"` (`"remote"` for a remote instance whose
    /// check kind this version does not know).
    pub check: &'static str,
    /// What the detector concludes.
    pub health: Health,
    /// Held out by flap damping until this moment, even while alive.
    pub held_out_until: Option<Instant>,
    /// Since when it has had this health.
    pub since: Instant,
    /// The last heartbeat (push checks).
    pub last_heartbeat: Option<Instant>,
    /// Phi now (phi checks).
    pub phi: Option<f64>,
    /// The flap-damping penalty now.
    pub penalty: f64,
    /// The last failed probe's reason (HTTP checks).
    pub last_error: Option<String>,
    /// When it will be deregistered (dead instances).
    pub deregister_at: Option<Instant>,
    /// The service index at which this instance last changed.
    pub modify_index: u64,
    /// The sidecar that judges it, for an instance registered with another one
    /// ([`Registry::apply_remote`]); `None` for an instance registered here.
    pub origin: Option<String>,
}

impl Instance {
    /// Alive and not held out: new work may go there.
    pub fn is_healthy(&self) -> bool {
        self.health == Health::Alive && self.held_out_until.is_none()
    }
}

/// An instance registered with another sidecar, as that sidecar judges it: what
/// [`Registry::apply_remote`] takes (a mirror such as `registry::etcd::EtcdMirror`
/// reads it from the shared store).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteInstance {
    /// Where to reach it.
    pub address: String,
    /// Its labels.
    pub metadata: BTreeMap<String, String>,
    /// What its sidecar's detector concludes.
    pub health: Health,
    /// Held out by its sidecar's flap damping for about this much longer (as of
    /// when it was published), or not held out. The local view shows it held out
    /// until the origin says it was released.
    pub held_out: Option<Duration>,
    /// Its check's kind at its sidecar: `"ttl"`, `"phi"` or `"http"` (anything else
    /// shows as `"remote"` in [`Instance::check`]).
    pub check_kind: String,
    /// The sidecar that judges it.
    pub origin: String,
}

/// Which instances a query returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Filter {
    /// Every registered instance, whatever its health.
    #[default]
    All,
    /// Only [healthy](Instance::is_healthy) ones.
    Healthy,
}

/// The instances of a service at an index.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The service's index: it grows with every change to the service's instances
    /// (registration, health, hold-out, removal); pass it to [`Registry::wait`].
    pub index: u64,
    /// The instances, ordered by id.
    pub instances: Vec<Instance>,
}

/// A service and how many instances it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSummary {
    /// The service.
    pub service: String,
    /// Its index.
    pub index: u64,
    /// Registered instances.
    pub instances: usize,
    /// Healthy ones.
    pub healthy: usize,
}

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Change {
    /// Registered, or re-registered with different details.
    Registered,
    /// Its health changed.
    Health {
        /// Before.
        from: Health,
        /// After.
        to: Health,
    },
    /// Flap damping holds it out until `until`.
    HeldOut {
        /// When it comes back if it stops flapping.
        until: Instant,
        /// The penalty that put it there.
        penalty: f64,
    },
    /// Flap damping released it.
    Released,
    /// Removed: by request, or `deregister_after` its death.
    Deregistered {
        /// Whether it was removed for being dead (else: by request).
        dead: bool,
    },
}

impl Change {
    /// A short label (metrics, logs): `registered`, `alive`, `suspect`, `dead`,
    /// `held_out`, `released`, `deregistered`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Health { to, .. } => match to {
                Health::Alive => "alive",
                Health::Suspect => "suspect",
                Health::Dead => "dead",
            },
            Self::HeldOut { .. } => "held_out",
            Self::Released => "released",
            Self::Deregistered { .. } => "deregistered",
        }
    }
}

/// A change to an instance, as broadcast to subscribers.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The service.
    pub service: String,
    /// The instance.
    pub id: String,
    /// What happened.
    pub change: Change,
    /// The service index after the change.
    pub index: u64,
}

/// Why a registry call failed; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A service name or instance id that is not a valid [`Name`](crate::Name).
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// `"service"` or `"instance id"`.
        what: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A registration that is not valid (address, metadata, check).
    #[error("invalid registration: {0}")]
    InvalidRegistration(String),
    /// No such instance (never registered, deregistered, or the registry restarted):
    /// register again.
    #[error("instance {id:?} of service {service:?} is not registered")]
    UnknownInstance {
        /// The service.
        service: String,
        /// The instance.
        id: String,
    },
    /// A heartbeat for an instance whose check is pulled (HTTP), not pushed.
    #[error("instance {id:?} of service {service:?} has an http check; it takes no heartbeats")]
    NotPush {
        /// The service.
        service: String,
        /// The instance.
        id: String,
    },
    /// The instance is registered with another sidecar (`origin`), which judges it:
    /// it takes no heartbeats here and is not deregistered here. Registering it here
    /// takes it over.
    #[error("instance {id:?} of service {service:?} is registered with sidecar {origin:?}")]
    Remote {
        /// The service.
        service: String,
        /// The instance.
        id: String,
        /// The sidecar that owns it.
        origin: String,
    },
    /// The registry holds as many instances as it may.
    #[error("the registry is full ({limit} instances)")]
    Full {
        /// The limit.
        limit: usize,
    },
}

#[cfg(test)]
mod test;
