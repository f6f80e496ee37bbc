use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units;

/// `[components.eventstore.<name>]`: one event store, selected by `type`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EventStoreComponent {
    /// `type = "embedded"`: a redb file in the data directory.
    Embedded(EmbeddedEventStore),
    /// `type = "postgres"`: tables in a PostgreSQL schema.
    Postgres(PostgresEventStore),
}

impl EventStoreComponent {
    /// The accepted values of `type`.
    pub const TYPES: [&'static str; 2] = ["embedded", "postgres"];

    /// The value of `type` for this component.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Embedded(_) => "embedded",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Settings of an embedded event store.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedEventStore {
    /// Database file; defaults to `<data_dir>/eventstore/<name>.redb`.
    pub path: Option<PathBuf>,
}

/// Settings of a PostgreSQL event store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresEventStore {
    /// Connection URL, e.g. `postgres://postgres@127.0.0.1:5432/test`. Required.
    pub url: String,
    /// Maximum pooled connections.
    #[serde(default = "default_pool_size", deserialize_with = "units::lenient_u32")]
    pub pool_size: u32,
    /// Schema holding the event store's tables; created if missing. Defaults to
    /// `trellis_events_<name>` (non-alphanumerics become `_`).
    #[serde(default)]
    pub schema: Option<String>,
    /// How long to wait for a connection.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "units::duration"
    )]
    pub connect_timeout: Duration,
}

fn default_pool_size() -> u32 {
    16
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

impl PostgresEventStore {
    /// A config for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: default_pool_size(),
            schema: None,
            connect_timeout: default_connect_timeout(),
        }
    }

    /// The schema for component `name`: `schema` if set, else `trellis_events_<name>`.
    pub fn schema_for(&self, name: &str) -> String {
        self.schema.clone().unwrap_or_else(|| {
            let cleaned: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("trellis_events_{cleaned}")
        })
    }
}
