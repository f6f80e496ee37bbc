//! The `trellis.toml` schema.
//!
//! One TOML file configures a sidecar; every key can be overridden from the
//! environment as `TRELLIS_<SECTION>__<KEY>` (double underscore between path
//! segments, e.g. `TRELLIS_SERVER__LISTEN=0.0.0.0:3700` or
//! `TRELLIS_COMPONENTS__STATE__CACHE__URL=redis://...`). `TRELLIS_API_TOKEN` is a
//! shorthand for `server.api_token`.
//!
//! Components are named instances of a backend (`[components.state.<name>]`). A
//! `default` state store on the embedded backend always exists so every API works
//! with no file at all; a file adds components or replaces `default` by name.
//!
//! Loading reports *every* problem it finds, each with its key path, instead of
//! stopping at the first: unknown keys, wrong types and broken rules between fields.
//!
//! ```
//! use trellis_core::config::{Config, StateComponent};
//!
//! let toml = r#"
//!     [server]
//!     listen = "127.0.0.1:4000"
//!
//!     [components.state.cache]
//!     type = "redis"
//!     url = "redis://127.0.0.1:6379"
//! "#;
//! let config = Config::from_sources(Some(toml), [("TRELLIS_SERVER__MAX_BODY_SIZE".into(), "1MiB".into())])
//!     .expect("valid");
//! assert_eq!(config.server.listen.port(), 4000);
//! assert_eq!(config.server.max_body_size.bytes(), 1 << 20);
//! assert!(matches!(config.components.state["default"], StateComponent::Embedded(_)));
//! assert!(matches!(config.components.state["cache"], StateComponent::Redis(_)));
//!
//! let errors = Config::from_sources(Some("[server]\nlisten = 5\nbogus = 1\n"), []).unwrap_err();
//! let keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
//! assert_eq!(keys, ["server.bogus", "server.listen"]);
//! ```

mod apps;
mod error;
mod eventstore;
mod load;
mod projection;
mod pubsub;
pub mod resiliency;
mod sagas;
mod served;
mod shards;
mod state;
pub mod units;

#[cfg(test)]
mod test;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use apps::{
    AppConfig, DiscoveryKind, HashKey, HealthCheckConfig, LbPolicy, ListenerConfig, OutlierConfig,
    Protocol, check_instance_url,
};
pub use error::{ConfigError, ConfigErrors};
pub use eventstore::{EmbeddedEventStore, EventStoreComponent, PostgresEventStore, UpcastRule};
pub use projection::{ProjectionConfig, StartAt};
pub use pubsub::{
    EmbeddedPubSub, NatsPubSub, NatsStorage, PubSubComponent, PublishDurability, RedisPubSub,
    SubscriptionConfig, SubscriptionDefaults, is_topic_name,
};
pub use resiliency::ResiliencyConfig;
pub use sagas::{EmbeddedSagaLog, PostgresSagaLog, SagaLogComponent};
pub use served::{CoordComponent, EmbeddedCoord, EtcdCoord, PostgresCoord, ServedApp};
pub use shards::{ShardMapConfig, ShardMember, ShardMembers, ShardPublish, ShardStrategy};
pub use state::{EmbeddedState, PostgresState, RedisState, StateComponent};
pub use units::ByteSize;

/// Name of the component every building block gets when none is configured.
pub const DEFAULT_COMPONENT: &str = "default";

/// The whole configuration of one sidecar.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// The HTTP listener and process-wide settings.
    pub server: ServerConfig,
    /// Log output.
    pub log: LogConfig,
    /// `[app]`: the application this sidecar serves, if any.
    pub app: Option<ServedApp>,
    /// Named backend instances, by building block.
    pub components: Components,
    /// `[apps.<id>]`: applications reachable through invoke and proxies.
    pub apps: BTreeMap<String, AppConfig>,
    /// `[resiliency]`: policies and the targets they guard.
    pub resiliency: ResiliencyConfig,
    /// `[[listeners]]`: ambassador proxies to run.
    pub listeners: Vec<ListenerConfig>,
    /// `[subscriptions.<name>]`: topics pushed to apps.
    pub subscriptions: BTreeMap<String, SubscriptionConfig>,
    /// `[projections.<name>]`: event store projections computed by apps, with read
    /// models in a state store.
    pub projections: BTreeMap<String, ProjectionConfig>,
    /// `[shards.<name>]`: shard maps, and the apps whose invocations they route.
    pub shards: BTreeMap<String, ShardMapConfig>,
    /// `[sagas.<name>]`: saga definitions, as JSON (checked by `trellis-saga`).
    pub sagas: BTreeMap<String, serde_json::Value>,
}

/// `[server]`: the HTTP listener and process-wide settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address the HTTP API binds. A non-loopback address requires `api_token`.
    #[serde(deserialize_with = "units::socket_addr")]
    pub listen: SocketAddr,
    /// Directory for embedded backends' files. Created if missing.
    pub data_dir: PathBuf,
    /// Bearer token every `/v1` call must present. Also read from `TRELLIS_API_TOKEN`.
    pub api_token: Option<Secret>,
    /// Largest accepted request body; larger ones get 413 `payload_too_large`.
    pub max_body_size: ByteSize,
    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish.
    #[serde(deserialize_with = "units::duration")]
    pub drain_timeout: Duration,
}

impl ServerConfig {
    /// Default listen address, `127.0.0.1:3700`.
    pub const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 3700);
    /// Default request body limit, 4 MiB.
    pub const DEFAULT_MAX_BODY_SIZE: ByteSize = ByteSize::mib(4);
    /// Upper bound for `max_body_size`, 1 GiB: bodies are buffered in memory.
    pub const MAX_MAX_BODY_SIZE: ByteSize = ByteSize::mib(1024);
    /// Default drain timeout, 30 s.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: Self::DEFAULT_LISTEN,
            data_dir: PathBuf::from(".trellis"),
            api_token: None,
            max_body_size: Self::DEFAULT_MAX_BODY_SIZE,
            drain_timeout: Self::DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// `[log]`: log output. Command-line flags and `RUST_LOG` take precedence.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct LogConfig {
    /// `pretty` for humans, `json` for log shippers.
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter, e.g. `info,trellis_state=debug`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            filter: "info".to_owned(),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, one line per event with its span fields.
    Pretty,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// `[components.*]`: named backend instances, by building block.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Components {
    /// `[components.state.<name>]`.
    pub state: BTreeMap<String, StateComponent>,
    /// `[components.pubsub.<name>]`.
    pub pubsub: BTreeMap<String, PubSubComponent>,
    /// `[components.eventstore.<name>]`.
    pub eventstore: BTreeMap<String, EventStoreComponent>,
    /// `[components.coord.default]`: the coordination backend (only `default`).
    pub coord: BTreeMap<String, CoordComponent>,
    /// `[components.sagas.default]`: the saga and 2PC log (only `default`).
    pub sagas: BTreeMap<String, SagaLogComponent>,
}

impl Default for Components {
    fn default() -> Self {
        Self {
            state: BTreeMap::from([(
                DEFAULT_COMPONENT.to_owned(),
                StateComponent::Embedded(EmbeddedState::default()),
            )]),
            pubsub: BTreeMap::from([(
                DEFAULT_COMPONENT.to_owned(),
                PubSubComponent::Embedded(EmbeddedPubSub::default()),
            )]),
            eventstore: BTreeMap::from([(
                DEFAULT_COMPONENT.to_owned(),
                EventStoreComponent::Embedded(EmbeddedEventStore::default()),
            )]),
            coord: BTreeMap::from([(
                DEFAULT_COMPONENT.to_owned(),
                CoordComponent::Embedded(EmbeddedCoord::default()),
            )]),
            sagas: BTreeMap::from([(
                DEFAULT_COMPONENT.to_owned(),
                SagaLogComponent::Embedded(EmbeddedSagaLog::default()),
            )]),
        }
    }
}

/// A secret string (such as the API token) that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself. Name the call site's reason in a comment.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}
