//! The Rust API for applications: [`Publisher`] and [`Subscriber`], implemented by
//! every backend. A subscription is a [`Stream`] of [`Message`]s, each settled with
//! [`Message::ack`], [`Message::nack`] or [`Message::reject`].
//!
//! # Example
//! ```
//! use futures_util::StreamExt as _;
//! use trellis_pubsub::client::{Publisher, Subscriber};
//! use trellis_pubsub::embedded::{EmbeddedOptions, EmbeddedPubSub};
//! use trellis_pubsub::event::CloudEvent;
//! use trellis_pubsub::SubscriptionSettings;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let pubsub = EmbeddedPubSub::open(dir.path(), EmbeddedOptions::default())?;
//! pubsub.send("orders", CloudEvent::new("/shop", "order.created", None)).await?;
//!
//! let mut orders = pubsub.subscribe("orders", "billing", SubscriptionSettings::default());
//! let message = orders.next().await.expect("a message")?;
//! assert_eq!(message.event()?.ty, "order.created");
//! message.ack().await?;
//! # Ok(())
//! # }
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::event::{CloudEvent, InvalidEvent};
use crate::{AckOutcome, Delivery, PubSub, PubSubError, Receipt, SubscriptionSettings};

/// Publishes events.
#[async_trait]
pub trait Publisher {
    /// Publishes one event; returns once it is stored (see [`crate::Published`]).
    ///
    /// # Errors
    /// As [`PubSub::publish`].
    async fn send(&self, topic: &str, event: CloudEvent) -> Result<Receipt, PubSubError>;
}

/// Subscribes to topics.
pub trait Subscriber {
    /// The messages of `topic` for consumer `group`, as a stream. Consumers of one
    /// group share the messages; every group gets them all.
    fn subscribe(&self, topic: &str, group: &str, settings: SubscriptionSettings) -> Subscription;
}

#[async_trait]
impl<P: PubSub + ?Sized> Publisher for Arc<P> {
    async fn send(&self, topic: &str, event: CloudEvent) -> Result<Receipt, PubSubError> {
        let published = self.publish(topic, vec![event]).await?;
        published
            .receipts
            .into_iter()
            .next()
            .ok_or_else(|| PubSubError::Backend {
                backend: self.backend(),
                reason: "publish returned no receipt".into(),
            })
    }
}

impl<P: PubSub + ?Sized> Subscriber for Arc<P> {
    fn subscribe(&self, topic: &str, group: &str, settings: SubscriptionSettings) -> Subscription {
        let pubsub: Arc<dyn PubSub> = Arc::new(Shared(Arc::clone(self)));
        Subscription::start(pubsub, topic.to_owned(), group.to_owned(), settings)
    }
}

/// Lets an `Arc<P>` for any `P: ?Sized` be used as an `Arc<dyn PubSub>`.
#[derive(Debug)]
struct Shared<P: ?Sized>(Arc<P>);

#[async_trait]
impl<P: PubSub + ?Sized> PubSub for Shared<P> {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    async fn publish(
        &self,
        topic: &str,
        events: Vec<CloudEvent>,
    ) -> Result<crate::Published, PubSubError> {
        self.0.publish(topic, events).await
    }
    async fn pull(
        &self,
        topic: &str,
        group: &str,
        settings: &SubscriptionSettings,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, PubSubError> {
        self.0.pull(topic, group, settings, max, wait).await
    }
    async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<Vec<AckOutcome>, PubSubError> {
        self.0.ack(group, ack_ids).await
    }
    async fn nack(
        &self,
        group: &str,
        ack_ids: &[String],
        delay: Option<Duration>,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        self.0.nack(group, ack_ids, delay).await
    }
    async fn extend(
        &self,
        group: &str,
        ack_ids: &[String],
        by: Duration,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        self.0.extend(group, ack_ids, by).await
    }
    async fn reject(
        &self,
        group: &str,
        ack_ids: &[String],
        reason: &str,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        self.0.reject(group, ack_ids, reason).await
    }
    async fn stats(&self, topic: &str) -> Result<crate::TopicStats, PubSubError> {
        self.0.stats(topic).await
    }
    async fn replay_dead_letters(
        &self,
        topic: &str,
        settings: &SubscriptionSettings,
    ) -> Result<u64, PubSubError> {
        self.0.replay_dead_letters(topic, settings).await
    }
    async fn health(&self) -> Result<(), PubSubError> {
        self.0.health().await
    }
    async fn close(&self) -> Result<(), PubSubError> {
        self.0.close().await
    }
}

/// One delivered message. Settle it with [`ack`](Self::ack), [`nack`](Self::nack) or
/// [`reject`](Self::reject); a message dropped unsettled is redelivered after its
/// ack deadline.
#[derive(Debug)]
pub struct Message {
    delivery: Delivery,
    group: Arc<str>,
    pubsub: Arc<dyn PubSub>,
}

impl Message {
    /// The delivery: ack id, attempt, position, ordering key and the event's JSON.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// The CloudEvent.
    ///
    /// # Errors
    /// If the stored JSON is not a valid event (never for events Trellis stored).
    pub fn event(&self) -> Result<CloudEvent, InvalidEvent> {
        let value = serde_json::from_slice(&self.delivery.event)
            .map_err(|e| InvalidEvent(e.to_string()))?;
        CloudEvent::from_structured(
            value,
            &crate::event::Defaults {
                source: String::new(),
                ty: String::new(),
            },
        )
    }

    /// Acknowledges the message: done.
    ///
    /// # Errors
    /// If the backend failed, or the delivery is no longer current (its deadline
    /// passed and it was redelivered).
    pub async fn ack(self) -> Result<(), PubSubError> {
        let outcome = self
            .pubsub
            .ack(&self.group, std::slice::from_ref(&self.delivery.ack_id))
            .await?;
        settled(&self, &outcome)
    }

    /// Returns the message for redelivery after `delay` (else the backoff).
    ///
    /// # Errors
    /// As [`ack`](Self::ack).
    pub async fn nack(self, delay: Option<Duration>) -> Result<(), PubSubError> {
        let outcome = self
            .pubsub
            .nack(
                &self.group,
                std::slice::from_ref(&self.delivery.ack_id),
                delay,
            )
            .await?;
        settled(&self, &outcome)
    }

    /// Sends the message to the dead-letter topic with `reason`.
    ///
    /// # Errors
    /// As [`ack`](Self::ack).
    pub async fn reject(self, reason: &str) -> Result<(), PubSubError> {
        let outcome = self
            .pubsub
            .reject(
                &self.group,
                std::slice::from_ref(&self.delivery.ack_id),
                reason,
            )
            .await?;
        settled(&self, &outcome)
    }

    /// Moves the ack deadline to `by` from now, for long processing.
    ///
    /// # Errors
    /// As [`ack`](Self::ack).
    pub async fn extend(&self, by: Duration) -> Result<(), PubSubError> {
        let outcome = self
            .pubsub
            .extend(&self.group, std::slice::from_ref(&self.delivery.ack_id), by)
            .await?;
        settled(self, &outcome)
    }
}

fn settled(message: &Message, outcome: &[AckOutcome]) -> Result<(), PubSubError> {
    match outcome.first() {
        Some(AckOutcome::Ok) => Ok(()),
        other => Err(PubSubError::Backend {
            backend: message.pubsub.backend(),
            reason: format!(
                "delivery {} is no longer current ({other:?}); it will be or was redelivered",
                message.delivery.ack_id
            ),
        }),
    }
}

/// A stream of messages of one consumer group on one topic. Messages are pulled
/// ahead in small batches (at most `max_in_flight`, and at most 32 unread at once);
/// dropping the stream stops pulling, and unread messages are redelivered after
/// their deadline.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Result<Message, PubSubError>>,
    task: tokio::task::JoinHandle<()>,
}

/// Messages pulled ahead of the consumer.
const READ_AHEAD: usize = 32;

impl Subscription {
    fn start(
        pubsub: Arc<dyn PubSub>,
        topic: String,
        group: String,
        settings: SubscriptionSettings,
    ) -> Self {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let group: Arc<str> = Arc::from(group);
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                // Pull only when there is room, so read-ahead stays bounded.
                let Ok(permit) = tx.reserve().await else {
                    return;
                };
                let room = tx.capacity() + 1;
                let want = room.min(settings.max_in_flight.max(1) as usize);
                match pubsub
                    .pull(&topic, &group, &settings, want, Duration::from_secs(5))
                    .await
                {
                    Ok(batch) => {
                        pause = Duration::from_millis(100);
                        let mut batch = batch.into_iter().map(|delivery| Message {
                            delivery,
                            group: Arc::clone(&group),
                            pubsub: Arc::clone(&pubsub),
                        });
                        let Some(first) = batch.next() else {
                            drop(permit);
                            continue;
                        };
                        permit.send(Ok(first));
                        for message in batch {
                            if tx.send(Ok(message)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        permit.send(Err(e));
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
        Self { rx, task }
    }
}

impl Stream for Subscription {
    type Item = Result<Message, PubSubError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}
