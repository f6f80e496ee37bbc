use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::units::{self, ByteSize};

/// `[components.pubsub.<name>]`: one pub/sub component, selected by `type`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PubSubComponent {
    /// `type = "embedded"`: segment logs in the data directory.
    Embedded(EmbeddedPubSub),
    /// `type = "nats"`: NATS JetStream streams and durable pull consumers.
    Nats(NatsPubSub),
    /// `type = "redis"`: Redis Streams and consumer groups.
    Redis(RedisPubSub),
}

impl PubSubComponent {
    /// The accepted values of `type`.
    pub const TYPES: [&'static str; 3] = ["embedded", "nats", "redis"];

    /// The value of `type` for this component.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Embedded(_) => "embedded",
            Self::Nats(_) => "nats",
            Self::Redis(_) => "redis",
        }
    }

    /// Its subscription defaults.
    pub fn defaults(&self) -> &SubscriptionDefaults {
        match self {
            Self::Embedded(c) => &c.subscriptions,
            Self::Nats(c) => &c.subscriptions,
            Self::Redis(c) => &c.subscriptions,
        }
    }
}

/// NATS JetStream storage of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatsStorage {
    /// On disk (the default).
    File,
    /// In memory.
    Memory,
}

/// Settings of a NATS JetStream pub/sub: one stream per topic, one durable pull
/// consumer per group.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsPubSub {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Streams are named `<stream_prefix>_<topic>` (dots become `_`) and their
    /// subject is `<stream_prefix>.<topic>`.
    pub stream_prefix: String,
    /// Where JetStream stores streams.
    pub storage: NatsStorage,
    /// Stream replicas (clustered servers).
    pub replicas: usize,
    /// JetStream's duplicate window (`Nats-Msg-Id` dedupe).
    #[serde(deserialize_with = "units::duration")]
    pub dedupe_window: Duration,
    /// Messages older than this are deleted by the server.
    #[serde(deserialize_with = "units::option_duration")]
    pub retention_max_age: Option<Duration>,
    /// Each stream is trimmed to about this size.
    pub retention_max_bytes: Option<ByteSize>,
    /// How long to wait for a connection and for each request.
    #[serde(deserialize_with = "units::duration")]
    pub connect_timeout: Duration,
    /// Defaults of every subscription on this component.
    pub subscriptions: SubscriptionDefaults,
}

impl Default for NatsPubSub {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream_prefix: "trellis".into(),
            storage: NatsStorage::File,
            replicas: 1,
            dedupe_window: Duration::from_secs(120),
            retention_max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_max_bytes: None,
            connect_timeout: Duration::from_secs(5),
            subscriptions: SubscriptionDefaults::default(),
        }
    }
}

/// Settings of a Redis Streams pub/sub: one stream per topic, one consumer group per
/// group.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisPubSub {
    /// Connection URL, e.g. `redis://127.0.0.1:6379/0`.
    pub url: String,
    /// Prefix of every key; defaults to `trellis:pubsub:{<name>}:`.
    pub key_prefix: Option<String>,
    /// A message id seen again within this window is accepted but stored once.
    #[serde(deserialize_with = "units::duration")]
    pub dedupe_window: Duration,
    /// Each stream is trimmed (approximately) to this many entries.
    pub retention_max_len: Option<u64>,
    /// How long to wait for a connection and for each command.
    #[serde(deserialize_with = "units::duration")]
    pub connect_timeout: Duration,
    /// Defaults of every subscription on this component.
    pub subscriptions: SubscriptionDefaults,
}

impl Default for RedisPubSub {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: None,
            dedupe_window: Duration::from_secs(120),
            retention_max_len: None,
            connect_timeout: Duration::from_secs(5),
            subscriptions: SubscriptionDefaults::default(),
        }
    }
}

/// When a publish is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishDurability {
    /// After fsync (group-committed): survives a machine crash. The default.
    Fsync,
    /// After the write reached the OS: survives a process crash only.
    Async,
}

/// Settings of an embedded pub/sub.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedPubSub {
    /// Directory; defaults to `<data_dir>/pubsub/<name>`.
    pub path: Option<PathBuf>,
    /// When publishes are acknowledged.
    pub durability: PublishDurability,
    /// A message id seen again within this window is accepted but stored once.
    #[serde(deserialize_with = "units::duration")]
    pub dedupe_window: Duration,
    /// Messages older than this may be deleted (whole segments at a time).
    #[serde(deserialize_with = "units::option_duration")]
    pub retention_max_age: Option<Duration>,
    /// Each topic's log is trimmed to about this size.
    pub retention_max_bytes: Option<ByteSize>,
    /// Size of each log segment file.
    pub segment_bytes: ByteSize,
    /// Defaults of every subscription on this component.
    pub subscriptions: SubscriptionDefaults,
}

impl Default for EmbeddedPubSub {
    fn default() -> Self {
        Self {
            path: None,
            durability: PublishDurability::Fsync,
            dedupe_window: Duration::from_secs(120),
            retention_max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_max_bytes: None,
            segment_bytes: ByteSize::mib(64),
            subscriptions: SubscriptionDefaults::default(),
        }
    }
}

/// Delivery settings of a subscription (consumer group on a topic).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubscriptionDefaults {
    /// A delivery not acked within this is redelivered (extendable per delivery).
    #[serde(deserialize_with = "units::duration")]
    pub ack_deadline: Duration,
    /// Deliveries of one message before it goes to the dead-letter topic.
    pub max_deliveries: u32,
    /// First redelivery delay; doubles per attempt.
    #[serde(deserialize_with = "units::duration")]
    pub min_backoff: Duration,
    /// Longest redelivery delay.
    #[serde(deserialize_with = "units::duration")]
    pub max_backoff: Duration,
    /// Deliveries awaiting an ack at most (backpressure).
    pub max_in_flight: u32,
    /// Dead-letter topic; defaults to `<topic>.dlq`.
    pub dead_letter_topic: Option<String>,
}

impl Default for SubscriptionDefaults {
    fn default() -> Self {
        Self {
            ack_deadline: Duration::from_secs(30),
            max_deliveries: 5,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_in_flight: 1000,
            dead_letter_topic: None,
        }
    }
}

impl SubscriptionDefaults {
    /// Checks the rules between fields.
    ///
    /// # Errors
    /// `(field, message)` for the first rule broken.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.ack_deadline < Duration::from_millis(10)
            || self.ack_deadline > Duration::from_secs(3600)
        {
            return Err(("ack_deadline", "must be 10ms to 1h".into()));
        }
        if !(1..=1000).contains(&self.max_deliveries) {
            return Err((
                "max_deliveries",
                format!("must be 1 to 1000, got {}", self.max_deliveries),
            ));
        }
        if self.max_backoff < self.min_backoff {
            return Err(("max_backoff", "must be at least min_backoff".into()));
        }
        if !(1..=100_000).contains(&self.max_in_flight) {
            return Err((
                "max_in_flight",
                format!("must be 1 to 100000, got {}", self.max_in_flight),
            ));
        }
        if let Some(topic) = &self.dead_letter_topic
            && !is_topic_name(topic)
        {
            return Err(("dead_letter_topic", format!("invalid topic name {topic:?}")));
        }
        Ok(())
    }
}

/// A topic name: 1-249 of `A-Z a-z 0-9 . _ -`.
pub fn is_topic_name(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `[subscriptions.<name>]` (or `PUT /v1/subscriptions/{name}`): push delivery of a
/// topic's messages to a route on an app. Unset delivery settings come from the
/// pub/sub component's `subscriptions` defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// The pub/sub component; `default` if unset.
    #[serde(default = "default_pubsub")]
    pub pubsub: String,
    /// The topic.
    pub topic: String,
    /// The consumer group; defaults to the subscription's name.
    #[serde(default)]
    pub group: Option<String>,
    /// The `[apps.<id>]` to deliver to.
    pub app: String,
    /// The path on the app that receives each message (`POST`).
    pub route: String,
    /// Overrides `ack_deadline`: also the time the app has to answer.
    #[serde(default, deserialize_with = "units::option_duration")]
    pub ack_deadline: Option<Duration>,
    /// Overrides `max_deliveries`.
    #[serde(default)]
    pub max_deliveries: Option<u32>,
    /// Overrides `min_backoff`.
    #[serde(default, deserialize_with = "units::option_duration")]
    pub min_backoff: Option<Duration>,
    /// Overrides `max_backoff`.
    #[serde(default, deserialize_with = "units::option_duration")]
    pub max_backoff: Option<Duration>,
    /// Overrides `max_in_flight`: deliveries to the app at once.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Overrides `dead_letter_topic`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
}

fn default_pubsub() -> String {
    super::DEFAULT_COMPONENT.to_owned()
}

impl SubscriptionConfig {
    /// The consumer group: `group`, else the subscription's `name`.
    pub fn group<'a>(&'a self, name: &'a str) -> &'a str {
        self.group.as_deref().unwrap_or(name)
    }

    /// The delivery settings: these overrides on top of `defaults`.
    pub fn settings(&self, defaults: &SubscriptionDefaults) -> SubscriptionDefaults {
        SubscriptionDefaults {
            ack_deadline: self.ack_deadline.unwrap_or(defaults.ack_deadline),
            max_deliveries: self.max_deliveries.unwrap_or(defaults.max_deliveries),
            min_backoff: self.min_backoff.unwrap_or(defaults.min_backoff),
            max_backoff: self.max_backoff.unwrap_or(defaults.max_backoff),
            max_in_flight: self.max_in_flight.unwrap_or(defaults.max_in_flight),
            dead_letter_topic: self
                .dead_letter_topic
                .clone()
                .or_else(|| defaults.dead_letter_topic.clone()),
        }
    }

    /// Checks the subscription against the components and apps of `config`.
    ///
    /// # Errors
    /// `(field, message)` for every problem.
    pub fn validate(&self, name: &str, config: &super::Config) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !is_topic_name(name) {
            problems.push(("", format!("invalid subscription name {name:?}: use 1-249 of A-Z, a-z, 0-9, '.', '_' and '-'")));
        }
        match config.components.pubsub.get(&self.pubsub) {
            None => {
                let known: Vec<&str> = config
                    .components
                    .pubsub
                    .keys()
                    .map(String::as_str)
                    .collect();
                problems.push((
                    "pubsub",
                    format!(
                        "no pub/sub component {:?}; configured: {}",
                        self.pubsub,
                        known.join(", ")
                    ),
                ));
            }
            Some(component) => {
                if let Err((field, message)) = self.settings(component.defaults()).validate() {
                    problems.push((field, message));
                }
            }
        }
        if !is_topic_name(&self.topic) {
            problems.push(("topic", format!("invalid topic name {:?}", self.topic)));
        }
        if self.group.as_deref().is_some_and(|g| !is_topic_name(g)) {
            problems.push((
                "group",
                format!(
                    "invalid group name {:?}",
                    self.group.as_deref().unwrap_or_default()
                ),
            ));
        }
        if !config.apps.contains_key(&self.app) {
            let known: Vec<&str> = config.apps.keys().map(String::as_str).collect();
            problems.push((
                "app",
                format!(
                    "no app {:?} in [apps]; configured: {}",
                    self.app,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        if !self.route.starts_with('/')
            || self
                .route
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            problems.push((
                "route",
                format!("must be a path starting with '/', got {:?}", self.route),
            ));
        }
        problems
    }
}
