//! The publish/subscribe building block: topics of CloudEvents, durable consumer
//! groups with at-least-once delivery, ack deadlines, redelivery with backoff, dead
//! letters, and ordering keys.
//!
//! # Layout
//! - [`event`]: CloudEvents 1.0 in structured and binary modes, and their storage
//!   encoding.
//! - [`PubSub`]: the backend contract, with its types ([`Published`], [`Delivery`],
//!   [`AckOutcome`], [`TopicStats`], [`SubscriptionSettings`]) and [`PubSubError`].
//! - [`client`]: the application API: [`client::Publisher`], [`client::Subscriber`],
//!   and subscriptions as a `Stream` of messages with `ack()` / `nack()`.
//! - [`push`]: push delivery of a subscription to a [`push::Handler`] (the sidecar's
//!   app), with bounded in-flight deliveries.
//! - [`embedded`]: the default backend, on `trellis-storage`'s segment log.
//! - [`nats`]: NATS JetStream streams and durable pull consumers.
//! - [`redis`]: Redis Streams and consumer groups.
//! - `contract` (feature `contract`): the test suite every backend passes.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use trellis_pubsub::embedded::{EmbeddedOptions, EmbeddedPubSub};
//! use trellis_pubsub::event::{CloudEvent, Data};
//! use trellis_pubsub::{PubSub, SubscriptionSettings};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let pubsub = EmbeddedPubSub::open(dir.path(), EmbeddedOptions::default())?;
//! let data = serde_json::value::to_raw_value(&serde_json::json!({"order": 1}))?;
//! let event = CloudEvent::new("/shop", "order.created", Some(Data::Json(data)));
//! pubsub.publish("orders", vec![event]).await?;
//!
//! let settings = SubscriptionSettings::default();
//! let deliveries = pubsub.pull("orders", "billing", &settings, 10, Duration::from_secs(1)).await?;
//! assert_eq!(deliveries.len(), 1);
//! pubsub.ack("billing", &[deliveries[0].ack_id.clone()]).await?;
//! # Ok(())
//! # }
//! ```

mod api;
pub mod client;
pub mod dead_letter;
pub mod embedded;
pub mod event;
pub mod nats;
mod open;
pub mod push;
pub mod redis;

#[cfg(feature = "contract")]
pub mod contract;

pub use api::{
    AckId, AckOutcome, Delivery, Durability, GroupStats, PubSub, PubSubError, Published, Receipt,
    SubscriptionSettings, TopicStats, backoff, check_group, check_topic, dead_letter_topic,
};
pub use open::open;
