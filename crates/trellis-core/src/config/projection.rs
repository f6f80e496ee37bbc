use std::time::Duration;

use serde::Deserialize;

use super::units;

/// `[projections.<name>]`: a projection run by Trellis for an app. Trellis reads
/// the events of `source` in order and posts them in batches to `route` on
/// `[apps.<app>]`; the app answers with the read-model writes the batch makes, and
/// Trellis applies them to the state store `state` in one transaction with the
/// projection's checkpoint, so every event takes effect exactly once — through
/// crashes and restarts.
///
/// ```toml
/// [projections.order-list]
/// source = "$ce-order"          # a stream, $ce-<category> or $all
/// app = "orders"
/// route = "/projections/order-list"
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionConfig {
    /// The event store component; `default` if unset.
    #[serde(default = "default_component")]
    pub eventstore: String,
    /// What it follows: a stream, `$ce-<category>` or `$all`.
    pub source: String,
    /// The `[apps.<id>]` that computes the read model.
    pub app: String,
    /// The path on the app that receives each batch (`POST`).
    pub route: String,
    /// The state store holding the read model and the checkpoint; `default` if unset.
    #[serde(default = "default_component")]
    pub state: String,
    /// Prefix of the read model's keys in the state store; defaults to
    /// `<name>/`. Rebuilding deletes every key under it.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Most events per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Where a projection without a checkpoint starts: `"beginning"` (default),
    /// `"end"`, or a position (a version for a single stream).
    #[serde(default)]
    pub start: Option<StartAt>,
    /// Longest delay between attempts when the app fails.
    #[serde(default = "default_max_backoff", deserialize_with = "units::duration")]
    pub max_backoff: Duration,
}

/// `start` of a projection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum StartAt {
    /// A position (a version for a single stream).
    Position(u64),
    /// `"beginning"` or `"end"`.
    Named(String),
}

fn default_component() -> String {
    super::DEFAULT_COMPONENT.to_owned()
}

fn default_batch_size() -> usize {
    100
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

impl ProjectionConfig {
    /// Most events per batch, at most.
    pub const MAX_BATCH_SIZE: usize = 10_000;

    /// The key prefix: `key_prefix`, else `<name>/`.
    pub fn prefix(&self, name: &str) -> String {
        self.key_prefix
            .clone()
            .unwrap_or_else(|| format!("{name}/"))
    }

    /// Problems, as `(field, message)`.
    pub fn validate(&self, name: &str, config: &super::Config) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !super::pubsub::is_topic_name(name) {
            problems.push((
                "",
                format!(
                    "invalid projection name {name:?}: use 1-249 of A-Z, a-z, 0-9, '.', '_' and '-'"
                ),
            ));
        }
        let known = |keys: Vec<&String>| {
            keys.iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !config.components.eventstore.contains_key(&self.eventstore) {
            problems.push((
                "eventstore",
                format!(
                    "no event store component {:?}; configured: {}",
                    self.eventstore,
                    known(config.components.eventstore.keys().collect())
                ),
            ));
        }
        if !config.components.state.contains_key(&self.state) {
            problems.push((
                "state",
                format!(
                    "no state store {:?}; configured: {}",
                    self.state,
                    known(config.components.state.keys().collect())
                ),
            ));
        }
        if !config.apps.contains_key(&self.app) {
            problems.push(("app", format!("no app {:?} in [apps]", self.app)));
        }
        if !self.route.starts_with('/') {
            problems.push((
                "route",
                format!("must be a path starting with '/', got {:?}", self.route),
            ));
        }
        let source_ok = match self.source.strip_prefix('$') {
            None => !self.source.is_empty() && !self.source.chars().any(char::is_control),
            Some("all") => true,
            Some(rest) => rest.strip_prefix("ce-").is_some_and(|c| !c.is_empty()),
        };
        if !source_ok {
            problems.push((
                "source",
                format!(
                    "must be a stream name, $ce-<category> or $all, got {:?}",
                    self.source
                ),
            ));
        }
        if !(1..=Self::MAX_BATCH_SIZE).contains(&self.batch_size) {
            problems.push((
                "batch_size",
                format!(
                    "must be 1 to {}, got {}",
                    Self::MAX_BATCH_SIZE,
                    self.batch_size
                ),
            ));
        }
        if let Some(StartAt::Named(s)) = &self.start
            && s != "beginning"
            && s != "end"
        {
            problems.push((
                "start",
                format!("must be \"beginning\", \"end\" or a position, got {s:?}"),
            ));
        }
        if self.key_prefix.as_deref() == Some("") {
            problems.push((
                "key_prefix",
                "must not be empty: rebuilding deletes every key under it".to_owned(),
            ));
        }
        if self.max_backoff.is_zero() {
            problems.push(("max_backoff", "must be more than 0".to_owned()));
        }
        problems
    }
}
