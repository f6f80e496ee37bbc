//! Service invocation and ambassador proxying.
//!
//! An application calls another through its sidecar (`/v1/invoke/<app>/<path>`) or
//! through a proxy listener; either way the request is forwarded to one instance of
//! the target app, chosen by a load balancer among healthy, non-ejected instances,
//! under the target's resilience policies.
//!
//! # Layout
//! - [`Invoker`]: every configured app with its instances and policies; the entry
//!   point of invoke and of proxy listeners.
//! - [`Discovery`]: where instances come from ([`StaticDiscovery`] from config; the
//!   service registry plugs in here).
//! - `group`, `endpoint`: one app's instances and their state — in-flight requests,
//!   peak-EWMA latency, health, ejection.
//! - `balance`: round robin, power-of-two-choices on peak EWMA, and consistent
//!   hashing with bounded loads.
//! - `health`, `outlier`: active health checks; passive ejection on consecutive errors
//!   and on latency far above the peers'.
//! - `upstream`: the tower service that picks an instance and sends the request;
//!   a [`PinnedInstance`] request extension overrides the pick (shard owners).
//! - `forward`: what changes between the incoming and the forwarded request
//!   (hop-by-hop headers, trace context).
//! - [`ProxyBody`]: a body that is either buffered (replayable, for retries and
//!   hedging) or streamed.
//! - [`InvokeError`]: every way an invocation fails, with its HTTP status and code.

mod balance;
mod body;
mod discovery;
mod endpoint;
mod error;
pub mod forward;
mod group;
mod health;
mod invoker;
mod outlier;
#[cfg(feature = "testing")]
pub mod testing;
mod upstream;

pub use body::ProxyBody;
pub use discovery::{Discovery, StaticDiscovery};
pub use endpoint::EndpointSnapshot;
pub use error::{InstanceUnavailable, InvokeError, NoHealthyUpstream};
pub use group::GroupSnapshot;
pub use health::HealthProbe;
pub use invoker::{BuildError, Invoker, Target};
pub use upstream::{Instance, PinnedInstance};
