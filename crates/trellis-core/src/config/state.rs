use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units;

/// `[components.state.<name>]`: one state store, selected by `type`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StateComponent {
    /// `type = "embedded"`: a redb file in the data directory.
    Embedded(EmbeddedState),
    /// `type = "postgres"`: a table in PostgreSQL.
    Postgres(PostgresState),
    /// `type = "redis"`: hashes under a key prefix in Redis.
    Redis(RedisState),
}

impl StateComponent {
    /// The accepted values of `type`.
    pub const TYPES: [&'static str; 3] = ["embedded", "postgres", "redis"];

    /// The value of `type` for this component.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Embedded(_) => "embedded",
            Self::Postgres(_) => "postgres",
            Self::Redis(_) => "redis",
        }
    }
}

/// Settings of an embedded state store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct EmbeddedState {
    /// Database file; defaults to `<data_dir>/state/<name>.redb`.
    pub path: Option<PathBuf>,
    /// How often expired keys are deleted (they are never *returned* once expired).
    #[serde(deserialize_with = "units::duration")]
    pub sweep_interval: Duration,
}

impl Default for EmbeddedState {
    fn default() -> Self {
        Self {
            path: None,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }
}

/// Settings of a PostgreSQL state store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct PostgresState {
    /// Connection URL, e.g. `postgres://postgres@127.0.0.1:5432/test`.
    pub url: String,
    /// Maximum pooled connections.
    #[serde(default = "default_pool_size", deserialize_with = "units::lenient_u32")]
    pub pool_size: u32,
    /// Schema holding the table; created if missing.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Table name; defaults to `trellis_state_<name>` (non-alphanumerics become `_`).
    #[serde(default)]
    pub table: Option<String>,
    /// How long to wait for a connection.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "units::duration"
    )]
    pub connect_timeout: Duration,
    /// How often expired rows are deleted.
    #[serde(
        default = "default_sweep_interval",
        deserialize_with = "units::duration"
    )]
    pub sweep_interval: Duration,
}

impl PostgresState {
    /// A config for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: default_pool_size(),
            schema: default_schema(),
            table: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }

    /// The table for component `name`: `table` if set, else `trellis_state_<name>`.
    pub fn table_for(&self, name: &str) -> String {
        self.table.clone().unwrap_or_else(|| {
            let suffix: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            format!("trellis_state_{suffix}")
        })
    }
}

/// Settings of a Redis state store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct RedisState {
    /// Connection URL, e.g. `redis://127.0.0.1:6379/0`.
    pub url: String,
    /// Prefix of every key; defaults to `trellis:state:{<name>}:`. The braces are a
    /// Redis Cluster hash tag, keeping one store's keys in one slot so its scripts
    /// stay atomic.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// How long to wait for a connection and for each command.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "units::duration"
    )]
    pub connect_timeout: Duration,
    /// How often the key index drops keys that Redis has expired.
    #[serde(
        default = "default_sweep_interval",
        deserialize_with = "units::duration"
    )]
    pub sweep_interval: Duration,
}

impl RedisState {
    /// A config for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
        }
    }

    /// The key prefix for component `name`.
    pub fn key_prefix_for(&self, name: &str) -> String {
        self.key_prefix
            .clone()
            .unwrap_or_else(|| format!("trellis:state:{{{name}}}:"))
    }
}

const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn default_pool_size() -> u32 {
    10
}
fn default_schema() -> String {
    "public".to_owned()
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_sweep_interval() -> Duration {
    DEFAULT_SWEEP_INTERVAL
}
