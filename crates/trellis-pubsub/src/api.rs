//! The pub/sub contract every backend implements.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
pub use trellis_core::config::SubscriptionDefaults as SubscriptionSettings;

use crate::event::CloudEvent;

/// Why a pub/sub operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PubSubError {
    /// A topic name that is not 1-249 of `A-Z a-z 0-9 . _ -`.
    #[error("invalid topic name {0:?}: use 1-249 of A-Z, a-z, 0-9, '.', '_' and '-'")]
    InvalidTopic(String),
    /// A group name that is not valid.
    #[error("invalid group name {0:?}: use 1-249 of A-Z, a-z, 0-9, '.', '_' and '-'")]
    InvalidGroup(String),
    /// An event that is not a valid CloudEvent.
    #[error("invalid event: {0}")]
    InvalidEvent(#[from] crate::event::InvalidEvent),
    /// An event too large to store.
    #[error("event of {0} bytes is too large")]
    TooLarge(usize),
    /// The backend could not be reached.
    #[error("{backend} backend unavailable: {reason}")]
    Unavailable {
        /// The backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// Any other backend failure.
    #[error("{backend} backend error: {reason}")]
    Backend {
        /// The backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
}

/// How durable a publish was when it was acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Fsynced to this node's disk.
    Fsync,
    /// Written to the OS, not yet fsynced.
    Async,
    /// Stored by the broker as its own settings make it durable (NATS, Redis).
    Broker,
}

/// One published event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Receipt {
    /// The event id.
    pub id: String,
    /// Its position in the topic.
    pub position: u64,
    /// Whether the id was already published within the dedupe window (stored once).
    pub duplicate: bool,
}

/// The result of a publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    /// Per event, in order.
    pub receipts: Vec<Receipt>,
    /// How durable they were when this returned.
    pub durability: Durability,
}

/// One delivery of a message to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Acknowledges (or nacks) this delivery.
    pub ack_id: String,
    /// 1 for the first delivery, then +1 per redelivery.
    pub attempt: u32,
    /// The message's position in the topic.
    pub position: u64,
    /// Its ordering key, if any.
    pub key: Option<String>,
    /// The structured CloudEvent JSON.
    pub event: Bytes,
}

/// What happened to one ack id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AckOutcome {
    /// Done.
    Ok,
    /// No such delivery (malformed, or never delivered).
    NotFound,
    /// The delivery was settled already, or superseded by a redelivery.
    Expired,
}

/// A consumer group's figures on a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupStats {
    /// The group.
    pub group: String,
    /// Every message before this position is settled.
    pub committed: u64,
    /// Messages not yet settled (head − committed − settled above).
    pub lag: u64,
    /// Delivered and awaiting an ack.
    pub in_flight: u64,
    /// Waiting for a redelivery backoff to pass.
    pub pending_redelivery: u64,
    /// Sent to the dead-letter topic since start.
    pub dead_lettered: u64,
}

/// A topic's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicStats {
    /// The topic.
    pub topic: String,
    /// The position the next message will get.
    pub head: u64,
    /// The oldest position still kept.
    pub start: u64,
    /// Per consumer group.
    pub groups: Vec<GroupStats>,
}

/// A pub/sub backend.
///
/// # To ensure correctness
/// Every implementation must guarantee, and `contract` checks:
/// 1. **Durable before return**: a published event is stored as [`Published::durability`] says.
/// 2. **Dedupe**: an id published again within the dedupe window is stored once.
/// 3. **Every group gets every message**, at least once; consumers of one group share it.
/// 4. **Ordering keys**: within a group, a message is delivered only after every earlier
///    message with its key is settled (acked or dead-lettered).
/// 5. **Redelivery**: a delivery not acked within its deadline, or nacked, is delivered
///    again after a backoff; after `max_deliveries` it goes to the dead-letter topic
///    with its delivery count and reason, and is settled.
/// 6. **Acks are durable**: an ack that returned `Ok` is never undone by a restart.
#[async_trait]
pub trait PubSub: Debug + Send + Sync + 'static {
    /// The backend's name.
    fn backend(&self) -> &'static str;

    /// Publishes events to `topic`, in order.
    async fn publish(&self, topic: &str, events: Vec<CloudEvent>)
    -> Result<Published, PubSubError>;

    /// Up to `max` deliveries for `group` on `topic`, waiting up to `wait` for the first.
    ///
    /// `settings` become the subscription's: later acks, nacks and deadline expiries
    /// of this group on this topic follow them.
    async fn pull(
        &self,
        topic: &str,
        group: &str,
        settings: &SubscriptionSettings,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, PubSubError>;

    /// Settles deliveries.
    async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<Vec<AckOutcome>, PubSubError>;

    /// Returns deliveries for redelivery, after `delay` (else the subscription's backoff).
    async fn nack(
        &self,
        group: &str,
        ack_ids: &[String],
        delay: Option<Duration>,
    ) -> Result<Vec<AckOutcome>, PubSubError>;

    /// Moves deliveries' ack deadlines to `by` from now.
    async fn extend(
        &self,
        group: &str,
        ack_ids: &[String],
        by: Duration,
    ) -> Result<Vec<AckOutcome>, PubSubError>;

    /// Sends deliveries straight to the dead-letter topic (the consumer can never handle them).
    async fn reject(
        &self,
        group: &str,
        ack_ids: &[String],
        reason: &str,
    ) -> Result<Vec<AckOutcome>, PubSubError>;

    /// The topic's figures.
    async fn stats(&self, topic: &str) -> Result<TopicStats, PubSubError>;

    /// Republishes every message of `topic`'s dead-letter topic back to `topic`;
    /// returns how many.
    async fn replay_dead_letters(
        &self,
        topic: &str,
        settings: &SubscriptionSettings,
    ) -> Result<u64, PubSubError>;

    /// Checks the backend is reachable.
    async fn health(&self) -> Result<(), PubSubError>;

    /// Stops background work; acknowledged work is already durable.
    async fn close(&self) -> Result<(), PubSubError>;
}

/// Checks a topic name.
///
/// # Errors
/// [`PubSubError::InvalidTopic`].
pub fn check_topic(topic: &str) -> Result<(), PubSubError> {
    if trellis_core::config::is_topic_name(topic) {
        Ok(())
    } else {
        Err(PubSubError::InvalidTopic(topic.to_owned()))
    }
}

/// Checks a group name (same rules as topics).
///
/// # Errors
/// [`PubSubError::InvalidGroup`].
pub fn check_group(group: &str) -> Result<(), PubSubError> {
    if trellis_core::config::is_topic_name(group) {
        Ok(())
    } else {
        Err(PubSubError::InvalidGroup(group.to_owned()))
    }
}

/// The dead-letter topic of `topic` under `settings`.
pub fn dead_letter_topic(topic: &str, settings: &SubscriptionSettings) -> String {
    settings
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{topic}.dlq"))
}

/// An ack id: `<topic>:<position>:<attempt>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckId {
    /// The topic.
    pub topic: String,
    /// The message's position.
    pub position: u64,
    /// Which delivery.
    pub attempt: u32,
}

impl AckId {
    /// Parses an ack id; `None` if malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.rsplitn(3, ':');
        let attempt = parts.next()?.parse().ok()?;
        let position = parts.next()?.parse().ok()?;
        let topic = parts.next()?;
        trellis_core::config::is_topic_name(topic).then(|| Self {
            topic: topic.to_owned(),
            position,
            attempt,
        })
    }
}

impl std::fmt::Display for AckId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.topic, self.position, self.attempt)
    }
}

/// The redelivery delay after `attempt` deliveries: `min_backoff × 2^(attempt−1)`,
/// capped at `max_backoff`.
pub fn backoff(settings: &SubscriptionSettings, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
    settings
        .min_backoff
        .saturating_mul(factor)
        .min(settings.max_backoff)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn ack_ids() {
        let id = AckId {
            topic: "orders.v1".into(),
            position: 42,
            attempt: 3,
        };
        assert_eq!(AckId::parse(&id.to_string()), Some(id));
        for bad in ["", "x", "t:1", "t:a:1", "t:1:b", "bad topic:1:1", ":1:1"] {
            assert_eq!(AckId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let s = SubscriptionSettings {
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            ..Default::default()
        };
        let d: Vec<u64> = (1..=6).map(|a| backoff(&s, a).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 10, 10]);
        assert_eq!(backoff(&s, 1000), Duration::from_secs(10));
    }
}
