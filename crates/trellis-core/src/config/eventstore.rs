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

    /// The upcasting rules applied to events read from this store.
    pub fn upcasters(&self) -> &[UpcastRule] {
        match self {
            Self::Embedded(c) => &c.upcasters,
            Self::Postgres(c) => &c.upcasters,
        }
    }

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
    /// `[[components.eventstore.<name>.upcasters]]`: rules that turn stored old
    /// event shapes into the current one on read.
    pub upcasters: Vec<UpcastRule>,
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
    /// `[[components.eventstore.<name>.upcasters]]`: rules that turn stored old
    /// event shapes into the current one on read.
    #[serde(default)]
    pub upcasters: Vec<UpcastRule>,
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
            upcasters: Vec::new(),
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

/// One declarative upcasting rule: events of `event_type` (optionally only those
/// whose metadata `schema_version` is below `before_version`, absent counting as 1)
/// are reshaped on read. Stored events never change.
///
/// ```toml
/// [[components.eventstore.default.upcasters]]
/// event_type = "OrderPlaced"
/// rename = { "total" = "amount.value" }      # move fields (dotted paths)
/// defaults = { "amount.currency" = "EUR" }   # set when missing
/// remove = ["legacy_flag"]
/// set_version = 2                            # metadata schema_version afterwards
///
/// [[components.eventstore.default.upcasters]]
/// event_type = "CustomerMoved"
/// rename_type = "AddressChanged"
/// ```
///
/// Rules run in order, each on the output of the ones before, so a chain of rules
/// takes an event through several versions.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpcastRule {
    /// The event type the rule applies to.
    pub event_type: String,
    /// Only events whose metadata `schema_version` is below this.
    #[serde(default)]
    pub before_version: Option<u64>,
    /// The event's new type.
    #[serde(default)]
    pub rename_type: Option<String>,
    /// Moves fields of the JSON data: old dotted path → new dotted path.
    #[serde(default)]
    pub rename: std::collections::BTreeMap<String, String>,
    /// Sets fields that are missing: dotted path → JSON value.
    #[serde(default)]
    pub defaults: std::collections::BTreeMap<String, serde_json::Value>,
    /// Removes fields (dotted paths).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Sets the metadata `schema_version` afterwards.
    #[serde(default)]
    pub set_version: Option<u64>,
}

impl UpcastRule {
    /// Problems with the rule, as (key below the rule, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.event_type.is_empty() {
            problems.push(("event_type".to_owned(), "must not be empty".to_owned()));
        }
        if self.rename_type.as_deref() == Some("") {
            problems.push(("rename_type".to_owned(), "must not be empty".to_owned()));
        }
        let bad_path = |p: &str| p.is_empty() || p.split('.').any(str::is_empty);
        for (from, to) in &self.rename {
            if bad_path(from) || bad_path(to) {
                problems.push((
                    format!("rename.{from}"),
                    format!("paths are dot-separated field names, got {from:?} -> {to:?}"),
                ));
            }
        }
        for path in self.defaults.keys() {
            if bad_path(path) {
                problems.push((
                    format!("defaults.{path}"),
                    "paths are dot-separated field names".to_owned(),
                ));
            }
        }
        for (i, path) in self.remove.iter().enumerate() {
            if bad_path(path) {
                problems.push((
                    format!("remove[{i}]"),
                    format!("paths are dot-separated field names, got {path:?}"),
                ));
            }
        }
        if let (Some(before), Some(set)) = (self.before_version, self.set_version)
            && set < before
        {
            problems.push((
                "set_version".to_owned(),
                format!(
                    "must be at least before_version ({before}), or the rule would apply again"
                ),
            ));
        }
        problems
    }
}
