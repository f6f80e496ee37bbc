//! The transactional outbox: messages a state transaction commits together with its
//! writes, then relays to pub/sub, at least once.
//!
//! `POST /v1/state/{store}/transaction` with `"publish": [...]` stores each message
//! as an upsert of `__trellis/outbox/<id>` **in the same `StateStore::transact`
//! call** as the caller's operations: the messages exist if and only if the writes
//! committed. The value is the JSON of a [`Message`]; the id is a UUIDv7, so keys
//! sort by creation time.
//!
//! One relay task per state store component then publishes them: it wakes when a
//! transaction of this sidecar stored messages, and at least every second (to pick
//! up messages left by a crash, or stored by another sidecar sharing the store).
//! Each pass lists the outbox keys in order, and for each one reads it, publishes
//! its CloudEvent (whose `id` is the message id) and deletes the key with
//! `If-Match` on the etag it read. A crash between publishing and deleting publishes
//! the message again after the restart; the pub/sub dedupe window (an id published
//! again within it is stored once) removes that duplicate, as it does when two
//! sidecars relay the same message.
//!
//! A publish that fails because the component is unavailable is retried with a
//! backoff; later messages for that component wait for it, so each component gets a
//! store's messages in id order. A message for a component this sidecar doesn't
//! have (the config changed), or one the component refuses, stays where it is and
//! is reported in the log and in `trellis_outbox_relay_errors_total`; messages are
//! never dropped.
//!
//! Keys starting with `__trellis/` are reserved: the state API refuses them
//! (`reserved_key`) and hides them from listings.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use trellis_core::crashpoint;
use trellis_pubsub::event::{CloudEvent, Data, InvalidEvent};
use trellis_pubsub::{PubSub, PubSubError};
use trellis_state::{InvalidKey, Key, Precondition, StateError, StateStore};

/// Keys starting with this belong to Trellis: users can neither read nor write them.
pub(crate) const RESERVED_PREFIX: &str = "__trellis/";
/// Where outbox messages are stored: `__trellis/outbox/<id>`.
pub(crate) const OUTBOX_PREFIX: &str = "__trellis/outbox/";
/// Most messages one transaction may publish.
pub(crate) const MAX_MESSAGES: usize = 100;
/// Largest stored message (its JSON), so every pub/sub backend can take the event.
pub(crate) const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Crash point before a message is published.
pub(crate) const BEFORE_RELAY: &str = "outbox.before_relay";
/// Crash point after a message is published, before its key is deleted.
pub(crate) const AFTER_PUBLISH: &str = "outbox.after_publish";

/// Keys listed per round trip.
const PAGE: usize = 100;
/// A pass runs at least this often.
const TICK: Duration = Duration::from_secs(1);
/// The first pause after a failed pass; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long stopping waits for a relay to finish what it is doing.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Most keys remembered as already reported (so a stuck message is logged at
/// `error` once, not every second).
const MAX_REPORTED: usize = 10_000;

/// Whether `key` is in the reserved key space.
pub(crate) fn is_reserved(key: &str) -> bool {
    key.starts_with(RESERVED_PREFIX)
}

/// A key that sorts after every key Trellis writes under [`RESERVED_PREFIX`] and
/// before every key outside it, for skipping the reserved range in a listing.
pub(crate) fn past_reserved() -> Option<Key> {
    Key::new(format!("{RESERVED_PREFIX}\u{10FFFF}")).ok()
}

/// A new outbox id: a UUIDv7, so ids (and keys) sort by creation within a process.
pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// One outbox message, as stored (JSON) under `__trellis/outbox/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Message {
    /// The stable id: the CloudEvent `id` of every publish of this message.
    pub(crate) id: String,
    /// The pub/sub component.
    pub(crate) pubsub: String,
    /// The topic.
    pub(crate) topic: String,
    /// The CloudEvent `type`.
    #[serde(rename = "type")]
    pub(crate) ty: String,
    /// The CloudEvent `source`.
    pub(crate) source: String,
    /// JSON data (`null` included).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub(crate) data: Option<Box<RawValue>>,
    /// Binary data, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) data_base64: Option<String>,
    /// The CloudEvent `datacontenttype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) datacontenttype: Option<String>,
    /// The CloudEvent `dataschema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dataschema: Option<String>,
    /// The CloudEvent `subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) subject: Option<String>,
    /// The ordering key (`partitionkey` extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ordering_key: Option<String>,
    /// The `correlationid` extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) correlation_id: Option<String>,
    /// The trace of the request that stored it (`traceparent` extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) traceparent: Option<String>,
    /// When the transaction stored it (RFC 3339); the CloudEvent `time`.
    pub(crate) created: String,
}

/// Deserializes a present field, `null` included, as `Some`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

impl Message {
    /// Its key: `__trellis/outbox/<id>`.
    pub(crate) fn key(&self) -> Result<Key, InvalidKey> {
        Key::new(format!("{OUTBOX_PREFIX}{}", self.id))
    }

    /// The stored form.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Reads a stored message.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The CloudEvent the relay publishes: built the same way every time, with the
    /// message id as its id.
    pub(crate) fn event(&self) -> Result<CloudEvent, InvalidEvent> {
        let data = match (&self.data, &self.data_base64) {
            (Some(_), Some(_)) => {
                return Err(InvalidEvent(
                    "a message has data or data_base64, not both".into(),
                ));
            }
            (Some(raw), None) => Some(Data::Json(raw.clone())),
            (None, Some(b64)) => Some(Data::Binary(
                STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| InvalidEvent(format!("data_base64 is not base64: {e}")))?
                    .into(),
            )),
            (None, None) => None,
        };
        let mut event = CloudEvent {
            id: self.id.clone(),
            source: self.source.clone(),
            ty: self.ty.clone(),
            datacontenttype: self.datacontenttype.clone(),
            dataschema: self.dataschema.clone(),
            subject: self.subject.clone(),
            time: Some(self.created.clone()),
            data,
            extensions: std::collections::BTreeMap::new(),
        };
        for (name, value) in [
            ("partitionkey", &self.ordering_key),
            ("correlationid", &self.correlation_id),
            ("traceparent", &self.traceparent),
        ] {
            if let Some(value) = value {
                event.set_extension(name, serde_json::Value::from(value.clone()))?;
            }
        }
        event.validate()?;
        Ok(event)
    }
}

/// The relays of every state store, and the wake-ups transactions send them.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    relays: BTreeMap<String, Relay>,
}

#[derive(Debug)]
struct Relay {
    notify: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Outbox {
    /// Starts one relay per state store.
    pub(crate) fn start(
        stores: &BTreeMap<String, Arc<dyn StateStore>>,
        pubsubs: &Arc<BTreeMap<String, Arc<dyn PubSub>>>,
    ) -> Self {
        let relays = stores
            .iter()
            .map(|(name, store)| {
                let notify = Arc::new(Notify::new());
                let (stop, stopped) = watch::channel(false);
                let runner = Runner::new(
                    name,
                    Arc::clone(store),
                    Arc::clone(pubsubs),
                    Arc::clone(&notify),
                    stopped,
                );
                let task = tokio::spawn(runner.run());
                let relay = Relay {
                    notify,
                    stop,
                    task: std::sync::Mutex::new(Some(task)),
                };
                (name.clone(), relay)
            })
            .collect();
        Self { relays }
    }

    /// Wakes the relay of `store`: a transaction stored messages.
    pub(crate) fn notify(&self, store: &str) {
        if let Some(relay) = self.relays.get(store) {
            relay.notify.notify_one();
        }
    }

    /// Stops every relay, letting each finish the message in hand (up to a few
    /// seconds; anything unfinished is relayed again after the restart).
    pub(crate) async fn stop_all(&self) {
        let tasks: Vec<_> = self
            .relays
            .values()
            .filter_map(|relay| {
                let _ = relay.stop.send(true);
                relay
                    .task
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
            })
            .collect();
        for mut task in tasks {
            if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
                tracing::warn!(
                    "an outbox relay did not stop in time; its messages are relayed after the restart"
                );
                task.abort();
            }
        }
    }
}

/// Why a pass ended early or left messages to retry.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("listing the outbox failed: {0}")]
    List(#[source] StateError),
    #[error("{0}")]
    Retry(String),
}

/// What became of one key.
#[derive(Debug)]
enum Outcome {
    /// Published and deleted.
    Relayed,
    /// Gone before we read it (relayed by another sidecar).
    Gone,
    /// Left for later: a permanent problem (reported) or its component is blocked.
    Left,
    /// Left for later after a failure worth a backoff.
    Failed(String),
}

/// One store's relay loop.
struct Runner {
    store_name: String,
    store: Arc<dyn StateStore>,
    pubsubs: Arc<BTreeMap<String, Arc<dyn PubSub>>>,
    notify: Arc<Notify>,
    stop: watch::Receiver<bool>,
    /// Keys whose problem was already logged at `error`.
    reported: HashSet<Key>,
    relayed: metrics::Counter,
    pending: metrics::Gauge,
}

impl Runner {
    fn new(
        store_name: &str,
        store: Arc<dyn StateStore>,
        pubsubs: Arc<BTreeMap<String, Arc<dyn PubSub>>>,
        notify: Arc<Notify>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store_name: store_name.to_owned(),
            store,
            pubsubs,
            notify,
            stop,
            reported: HashSet::new(),
            relayed: metrics::counter!("trellis_outbox_relayed_total", "store" => store_name.to_owned()),
            pending: metrics::gauge!("trellis_outbox_pending", "store" => store_name.to_owned()),
        }
    }

    fn error(&self, reason: &'static str) {
        metrics::counter!("trellis_outbox_relay_errors_total", "store" => self.store_name.clone(), "reason" => reason).increment(1);
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            if self.stopping() {
                return;
            }
            let pause = match self.pass().await {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    None
                }
                Err(e) => {
                    tracing::warn!(store = %self.store_name, error = %e, retry_in = ?backoff, "outbox relay pass failed; retrying");
                    let pause = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    Some(pause)
                }
            };
            let mut stop = self.stop.clone();
            match pause {
                None => tokio::select! {
                    () = self.notify.notified() => {}
                    () = tokio::time::sleep(TICK) => {}
                    _ = stop.wait_for(|s| *s) => return,
                },
                Some(pause) => tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|s| *s) => return,
                },
            }
        }
    }

    /// Relays every message in the outbox, in key (id) order.
    async fn pass(&mut self) -> Result<(), PassError> {
        let mut after: Option<Key> = None;
        // Components whose publish failed in this pass: their later messages wait,
        // so each component gets this store's messages in order.
        let mut blocked = BTreeSet::new();
        let mut left = 0u64;
        let mut failure = None;
        loop {
            let page = self
                .store
                .list(OUTBOX_PREFIX, after.as_ref(), PAGE)
                .await
                .map_err(|e| {
                    self.error("store");
                    PassError::List(e)
                })?;
            for key in &page.keys {
                if self.stopping() {
                    return Ok(());
                }
                match self.relay_one(key, &mut blocked).await {
                    Outcome::Relayed | Outcome::Gone => {}
                    Outcome::Left => left += 1,
                    Outcome::Failed(e) => {
                        left += 1;
                        failure.get_or_insert(e);
                    }
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        self.pending.set(left as f64);
        failure.map_or(Ok(()), |e| Err(PassError::Retry(e)))
    }

    async fn relay_one(&mut self, key: &Key, blocked: &mut BTreeSet<String>) -> Outcome {
        let item = match self.store.get(key).await {
            Ok(Some(item)) => item,
            Ok(None) => return Outcome::Gone,
            Err(e) => {
                self.error("store");
                return Outcome::Failed(format!("reading {key} failed: {e}"));
            }
        };
        let message = match Message::decode(&item.value.data) {
            Ok(message) => message,
            Err(e) => {
                self.report(key, "invalid", &format!("not an outbox message: {e}"));
                return Outcome::Left;
            }
        };
        if blocked.contains(&message.pubsub) {
            return Outcome::Left;
        }
        let Some(pubsub) = self.pubsubs.get(&message.pubsub).cloned() else {
            self.report(
                key,
                "unknown_pubsub",
                &format!(
                    "no pub/sub component named {:?}; the message stays in the outbox until one is configured",
                    message.pubsub
                ),
            );
            return Outcome::Left;
        };
        let event = match message.event() {
            Ok(event) => event,
            Err(e) => {
                self.report(key, "invalid", &format!("not a valid event: {e}"));
                return Outcome::Left;
            }
        };
        crashpoint::reach(BEFORE_RELAY).await;
        match pubsub.publish(&message.topic, vec![event]).await {
            Ok(published) => {
                let duplicate = published.receipts.first().is_some_and(|r| r.duplicate);
                tracing::debug!(store = %self.store_name, id = %message.id, pubsub = %message.pubsub, topic = %message.topic, duplicate, "outbox message published");
            }
            Err(
                e @ (PubSubError::InvalidTopic(_)
                | PubSubError::InvalidEvent(_)
                | PubSubError::TooLarge(_)),
            ) => {
                self.report(
                    key,
                    "rejected",
                    &format!("pub/sub component {:?} refused it: {e}", message.pubsub),
                );
                return Outcome::Left;
            }
            Err(e) => {
                self.error("publish");
                blocked.insert(message.pubsub.clone());
                return Outcome::Failed(format!(
                    "publishing {} to {}/{} failed: {e}",
                    message.id, message.pubsub, message.topic
                ));
            }
        }
        crashpoint::reach(AFTER_PUBLISH).await;
        match self
            .store
            .delete(key, Precondition::IfMatch(item.etag))
            .await
        {
            // Already deleted by another sidecar that relayed it too.
            Ok(_) | Err(StateError::EtagMismatch { .. }) => {
                self.relayed.increment(1);
                self.reported.remove(key);
                Outcome::Relayed
            }
            Err(e) => {
                // Published, not deleted: published again later, and deduped.
                self.error("store");
                Outcome::Failed(format!("deleting {key} after publishing it failed: {e}"))
            }
        }
    }

    /// Logs a message that cannot be relayed: at `error` the first time, then at
    /// `debug`, so a stuck message doesn't flood the log every second.
    fn report(&mut self, key: &Key, reason: &'static str, detail: &str) {
        self.error(reason);
        if self.reported.contains(key) {
            tracing::debug!(store = %self.store_name, key = %key, error = %detail, "outbox message still cannot be relayed");
            return;
        }
        if self.reported.len() >= MAX_REPORTED {
            self.reported.clear();
        }
        self.reported.insert(key.clone());
        tracing::error!(store = %self.store_name, key = %key, error = %detail, "outbox message cannot be relayed; it stays in the outbox");
    }
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("store", &self.store_name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn message() -> Message {
        Message {
            id: new_id(),
            pubsub: "default".into(),
            topic: "orders".into(),
            ty: "order.created".into(),
            source: "/trellis/outbox/default".into(),
            data: Some(RawValue::from_string(r#"{"total":5}"#.into()).expect("raw")),
            data_base64: None,
            datacontenttype: None,
            dataschema: None,
            subject: Some("o-1".into()),
            ordering_key: Some("c-7".into()),
            correlation_id: Some("req-1".into()),
            traceparent: None,
            created: "2025-01-02T03:04:05.678Z".into(),
        }
    }

    #[test]
    fn reserved_keys() {
        assert!(is_reserved("__trellis/outbox/1"));
        assert!(is_reserved("__trellis/"));
        assert!(!is_reserved("__trellis"));
        assert!(!is_reserved("trellis/fence/x"));
        assert!(!is_reserved("_trellis/x"));
        let past = past_reserved().expect("valid key");
        let outbox = Key::new(format!("{OUTBOX_PREFIX}{}", new_id())).expect("key");
        assert!(outbox < past);
        assert!(past < Key::new("__trellis0").expect("key"));
        assert!(past < Key::new("__trellit").expect("key"));
    }

    #[test]
    fn ids_and_keys_sort_by_creation() {
        let ids: Vec<String> = (0..1000).map(|_| new_id()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        let mut m = message();
        m.id.clone_from(&ids[0]);
        let key = m.key().expect("key");
        assert_eq!(key.as_str(), format!("__trellis/outbox/{}", ids[0]));
        assert!(is_reserved(key.as_str()));
    }

    #[test]
    fn messages_round_trip_and_become_events() {
        let m = message();
        let decoded = Message::decode(&m.encode().expect("encode")).expect("decode");
        let event = decoded.event().expect("event");
        assert_eq!(event.id, m.id);
        assert_eq!(
            (event.source.as_str(), event.ty.as_str()),
            ("/trellis/outbox/default", "order.created")
        );
        assert_eq!(event.time.as_deref(), Some("2025-01-02T03:04:05.678Z"));
        assert_eq!(event.subject.as_deref(), Some("o-1"));
        assert_eq!(event.ordering_key(), Some("c-7"));
        assert_eq!(
            event.extensions.get("correlationid"),
            Some(&serde_json::Value::from("req-1"))
        );
        assert!(matches!(&event.data, Some(Data::Json(raw)) if raw.get() == r#"{"total":5}"#));
        // The same message always gives the same event.
        assert_eq!(decoded.event().expect("again"), event);
    }

    #[test]
    fn null_and_binary_data_survive_storage() {
        let mut m = message();
        m.data = Some(RawValue::from_string("null".into()).expect("raw"));
        let decoded = Message::decode(&m.encode().expect("encode")).expect("decode");
        assert!(
            matches!(decoded.event().expect("event").data, Some(Data::Json(raw)) if raw.get() == "null")
        );

        m.data = None;
        m.data_base64 = Some("AP8=".into());
        let decoded = Message::decode(&m.encode().expect("encode")).expect("decode");
        assert!(
            matches!(decoded.event().expect("event").data, Some(Data::Binary(b)) if b[..] == [0u8, 255])
        );

        m.data_base64 = None;
        assert!(m.event().expect("no data").data.is_none());
    }

    async fn put(store: &Arc<dyn StateStore>, message: &Message) {
        let value = trellis_state::Value::json(message.encode().expect("encode"));
        store
            .set(&message.key().expect("key"), value, Default::default())
            .await
            .expect("set");
    }

    async fn delivered_ids(pubsub: &Arc<dyn PubSub>, topic: &str) -> Vec<String> {
        let settings = trellis_pubsub::SubscriptionSettings::default();
        let deliveries = pubsub
            .pull(topic, "g", &settings, 100, Duration::ZERO)
            .await
            .expect("pull");
        let ids = deliveries
            .iter()
            .map(|d| {
                let event: serde_json::Value = serde_json::from_slice(&d.event).expect("json");
                event["id"].as_str().expect("id").to_owned()
            })
            .collect();
        let ack_ids: Vec<String> = deliveries.into_iter().map(|d| d.ack_id).collect();
        if !ack_ids.is_empty() {
            pubsub.ack("g", &ack_ids).await.expect("ack");
        }
        ids
    }

    #[tokio::test]
    async fn a_pass_relays_in_order_keeps_what_it_cannot_and_dedupes_repeats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(
            trellis_state::EmbeddedStore::open(dir.path().join("s.redb"), Default::default())
                .expect("store"),
        );
        let pubsub: Arc<dyn PubSub> = trellis_pubsub::embedded::EmbeddedPubSub::open(
            dir.path().join("pubsub"),
            Default::default(),
        )
        .expect("pubsub");
        let pubsubs = Arc::new(BTreeMap::from([(
            "default".to_owned(),
            Arc::clone(&pubsub),
        )]));
        // No ordering key: the consumer gets both in one pull.
        let unordered = || Message {
            ordering_key: None,
            ..message()
        };
        let first = unordered();
        let mut lost = unordered();
        lost.pubsub = "gone".into();
        let second = unordered();
        for m in [&second, &lost, &first] {
            put(&store, m).await;
        }
        let (_stop, stopped) = watch::channel(false);
        let mut runner = Runner::new(
            "default",
            Arc::clone(&store),
            pubsubs,
            Arc::new(Notify::new()),
            stopped,
        );
        runner.pass().await.expect("pass");
        // In id order, whatever the write order; the message for a component this
        // sidecar doesn't have stays in the outbox.
        assert_eq!(
            delivered_ids(&pubsub, "orders").await,
            [first.id.clone(), second.id.clone()]
        );
        let left = store.list(OUTBOX_PREFIX, None, 10).await.expect("list");
        assert_eq!(left.keys, [lost.key().expect("key")]);

        // Nothing is published twice by later passes ...
        runner.pass().await.expect("pass");
        // ... and a message published again (a crash before its delete) is deduped.
        put(&store, &first).await;
        runner.pass().await.expect("pass");
        assert!(delivered_ids(&pubsub, "orders").await.is_empty());
        assert_eq!(pubsub.stats("orders").await.expect("stats").head, 2);
        let left = store.list(OUTBOX_PREFIX, None, 10).await.expect("list");
        assert_eq!(left.keys, [lost.key().expect("key")]);
    }

    /// A pub/sub that is down (every publish fails) until `up` is set.
    #[derive(Debug)]
    struct Flaky {
        inner: Arc<dyn PubSub>,
        up: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl PubSub for Flaky {
        fn backend(&self) -> &'static str {
            "flaky"
        }
        async fn publish(
            &self,
            topic: &str,
            events: Vec<CloudEvent>,
        ) -> Result<trellis_pubsub::Published, PubSubError> {
            if self.up.load(std::sync::atomic::Ordering::SeqCst) {
                self.inner.publish(topic, events).await
            } else {
                Err(PubSubError::Unavailable {
                    backend: "flaky",
                    reason: "down".into(),
                })
            }
        }
        async fn pull(
            &self,
            topic: &str,
            group: &str,
            settings: &trellis_pubsub::SubscriptionSettings,
            max: usize,
            wait: Duration,
        ) -> Result<Vec<trellis_pubsub::Delivery>, PubSubError> {
            self.inner.pull(topic, group, settings, max, wait).await
        }
        async fn ack(
            &self,
            group: &str,
            ack_ids: &[String],
        ) -> Result<Vec<trellis_pubsub::AckOutcome>, PubSubError> {
            self.inner.ack(group, ack_ids).await
        }
        async fn nack(
            &self,
            group: &str,
            ack_ids: &[String],
            delay: Option<Duration>,
        ) -> Result<Vec<trellis_pubsub::AckOutcome>, PubSubError> {
            self.inner.nack(group, ack_ids, delay).await
        }
        async fn extend(
            &self,
            group: &str,
            ack_ids: &[String],
            by: Duration,
        ) -> Result<Vec<trellis_pubsub::AckOutcome>, PubSubError> {
            self.inner.extend(group, ack_ids, by).await
        }
        async fn reject(
            &self,
            group: &str,
            ack_ids: &[String],
            reason: &str,
        ) -> Result<Vec<trellis_pubsub::AckOutcome>, PubSubError> {
            self.inner.reject(group, ack_ids, reason).await
        }
        async fn stats(&self, topic: &str) -> Result<trellis_pubsub::TopicStats, PubSubError> {
            self.inner.stats(topic).await
        }
        async fn replay_dead_letters(
            &self,
            topic: &str,
            settings: &trellis_pubsub::SubscriptionSettings,
        ) -> Result<u64, PubSubError> {
            self.inner.replay_dead_letters(topic, settings).await
        }
        async fn health(&self) -> Result<(), PubSubError> {
            self.inner.health().await
        }
        async fn close(&self) -> Result<(), PubSubError> {
            self.inner.close().await
        }
    }

    #[tokio::test]
    async fn a_component_that_is_down_delays_its_messages_and_never_drops_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> = Arc::new(
            trellis_state::EmbeddedStore::open(dir.path().join("s.redb"), Default::default())
                .expect("store"),
        );
        let open = |name: &str| -> Arc<dyn PubSub> {
            trellis_pubsub::embedded::EmbeddedPubSub::open(
                dir.path().join(name),
                Default::default(),
            )
            .expect("pubsub")
        };
        let flaky = Arc::new(Flaky {
            inner: open("flaky"),
            up: std::sync::atomic::AtomicBool::new(false),
        });
        let healthy = open("healthy");
        let pubsubs = Arc::new(BTreeMap::from([
            ("flaky".to_owned(), Arc::clone(&flaky) as Arc<dyn PubSub>),
            ("healthy".to_owned(), Arc::clone(&healthy)),
        ]));
        let to = |pubsub: &str| Message {
            pubsub: pubsub.into(),
            ordering_key: None,
            ..message()
        };
        let messages = [to("flaky"), to("healthy"), to("flaky")];
        for m in &messages {
            put(&store, m).await;
        }
        let (_stop, stopped) = watch::channel(false);
        let mut runner = Runner::new(
            "default",
            Arc::clone(&store),
            pubsubs,
            Arc::new(Notify::new()),
            stopped,
        );
        // Down: the pass fails (so the loop backs off), the other component's
        // message goes out, and the down component's stay.
        assert!(matches!(runner.pass().await, Err(PassError::Retry(_))));
        assert_eq!(
            delivered_ids(&healthy, "orders").await,
            [messages[1].id.clone()]
        );
        let left = store.list(OUTBOX_PREFIX, None, 10).await.expect("list");
        assert_eq!(
            left.keys,
            [
                messages[0].key().expect("key"),
                messages[2].key().expect("key")
            ]
        );
        // Up again: both, in order.
        flaky.up.store(true, std::sync::atomic::Ordering::SeqCst);
        runner.pass().await.expect("pass");
        let inner: Arc<dyn PubSub> = Arc::clone(&flaky) as Arc<dyn PubSub>;
        assert_eq!(
            delivered_ids(&inner, "orders").await,
            [messages[0].id.clone(), messages[2].id.clone()]
        );
        let left = store.list(OUTBOX_PREFIX, None, 10).await.expect("list");
        assert!(left.keys.is_empty());
    }

    #[test]
    fn invalid_messages_are_refused() {
        let mut m = message();
        m.data_base64 = Some("AP8=".into());
        assert!(m.event().is_err(), "data and data_base64");
        let mut m = message();
        m.data = None;
        m.data_base64 = Some("!!".into());
        assert!(m.event().is_err(), "bad base64");
        let mut m = message();
        m.ty = String::new();
        assert!(m.event().is_err(), "empty type");
        let mut m = message();
        m.ordering_key = Some("k".repeat(5000));
        assert!(m.event().is_err(), "long ordering key");
        assert!(Message::decode(b"{\"id\": 1}").is_err());
    }
}
