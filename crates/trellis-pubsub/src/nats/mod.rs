//! The NATS JetStream backend: a stream per topic, a durable pull consumer per group.
//!
//! # Mapping
//! - **Topic** → stream `<prefix>_<topic>` (names escaped, see [`stream_name`]) with the
//!   single subject `<prefix>.<topic>` ([`subject`]), created on first use (publish,
//!   pull, stats) with the component's storage, replicas, duplicate window and
//!   retention. A message's **position** is its stream sequence (from 1).
//! - **Publish** stores [`CloudEvent::encode`] bytes with `Nats-Msg-Id` = event id, so
//!   JetStream drops an id seen within its duplicate window and returns the first
//!   copy's sequence. A batch is pipelined: every message is sent, then every ack
//!   awaited. Publishes are durable as the stream's storage and replicas make them
//!   ([`Durability::Broker`]).
//! - **Group** → durable pull consumer [`consumer_name`]`(group)` (the group's name is
//!   also in its description), explicit acks, delivering the whole stream, with
//!   `ack_wait` = the ack deadline, `max_ack_pending` = `max_in_flight` and unlimited
//!   `max_deliver`: JetStream redelivers, Trellis counts and dead-letters. The settings
//!   of the latest pull are applied to the consumer when they change.
//! - **Ack ids** are `<topic>:<sequence>:<delivery count>`. The JetStream messages are
//!   kept in memory per (topic, group), so an ack id works in the process that pulled
//!   it; another process answers `NotFound`. An ack is a JetStream "double ack": `Ok`
//!   means the server has recorded it, so it survives restarts. An id whose message was
//!   redelivered since (to this process), or settled, is `Expired`.
//! - **Nack** is a `-NAK` with the delay (given, else the subscription's backoff).
//!   **Extend** sends progress acks, which restart a full `ack_wait` on the server: a
//!   background task repeats them every third of `ack_wait` until `by` is covered, so
//!   the new deadline is `by` rounded up to the next progress ack. A missed deadline is
//!   redelivered by the server right after `ack_wait`, without Trellis's backoff.
//! - **Dead letters** are published (with `deadletterreason`, `deliverycount`,
//!   `deadlettersource`, `deadlettergroup`) to the dead-letter topic, itself an
//!   ordinary topic, with a `Nats-Msg-Id` unique to the (group, message, delivery), and
//!   the original is then acked. That happens on `reject`, on a nack of the last
//!   allowed delivery, and when the server delivers a message more than
//!   `max_deliveries` times (its last deadline expired). Counts are per process.
//! - **Ordering keys** are enforced here, per process: JetStream has no per-key
//!   ordering with parallelism across keys. A fetched message whose key is held by an
//!   earlier unsettled message stays in a local buffer (kept alive with progress acks)
//!   until the holder is settled, then goes out in stream order. Buffered messages
//!   count against `max_in_flight`, as the server counts them.
//! - **Replay** reads the dead-letter topic with the internal durable consumer
//!   `trellis_replay` and republishes each message to the topic without the
//!   dead-letter attributes, under a new `Nats-Msg-Id`, then acks it.
//!
//! # What survives a restart
//! Streams, consumers, positions, delivery counts and acks are the server's. Lost with
//! the process: the ack ids it handed out (their messages come back once `ack_wait`
//! passes, the delivery counted) and the dead-letter counts in stats. On `close`,
//! buffered messages are nacked so they come back at once (their delivery counted,
//! though never handed out). A process binding to a consumer that has deliveries
//! outstanding doesn't know their keys, so it holds back keyed messages until it has
//! seen those deliveries again or the consumer's ack floor has passed them: keyed
//! messages may wait up to `ack_wait` after a restart, but stay in order.
//!
//! # Limits
//! - Ordering keys are enforced per process. With several processes pulling one group,
//!   the server may hand a later message of a key to one process while an earlier one
//!   is in flight in another. A nacked holder that is not redelivered to this process
//!   within a minute after it was due (another process got it) releases its key.
//! - Ack ids work in the process that pulled them; elsewhere they are `NotFound`.
//! - A pull that is cancelled, or interrupted because a buffered message became
//!   deliverable, leaves its pull request to a background task that buffers whatever
//!   it still brings.
//! - While the consumer is at `max_ack_pending` (nacked messages count there), a
//!   server 2.9 may leave a waiting pull request unanswered as a redelivery falls due,
//!   so pulls then wait here until the nacked messages are due and ask in short polls.
//! - `pending_redelivery` counts the nacked messages this process knows of; `in_flight`
//!   is the consumer's ack-pending count less those and the buffered messages.

mod group;
mod names;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, Batch};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, ReplayPolicy};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind, ErrorCode};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use trellis_core::config::{NatsPubSub as Config, NatsStorage};

use self::group::{DeadLetter, GroupState, Handed, Nacked};
pub use self::names::{consumer_name, stream_name, subject};
use crate::api::{
    AckId, AckOutcome, Delivery, Durability, GroupStats, PubSub, PubSubError, Published, Receipt,
    SubscriptionSettings, TopicStats, check_group, check_topic, dead_letter_topic,
};
use crate::event::{CloudEvent, Stored};

const BACKEND: &str = "nats";
/// The internal group that replays dead letters (not a valid group name, so no user
/// group shares its local state).
const REPLAY_GROUP: &str = "#replay";
/// Its durable consumer (escaped group names never contain `_r`).
const REPLAY_DURABLE: &str = "trellis_replay";
/// Consumer descriptions: this, then the group's name.
const GROUP_DESCRIPTION: &str = "trellis pub/sub group ";
/// When storing a dead letter found on fetch fails, the server redelivers it after this.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);
/// How long a request for what is there now may take, at least (the server holds
/// such requests while the consumer is at `max_ack_pending`)...
const MIN_FETCH_WAIT: Duration = Duration::from_millis(50);
/// ... and at most, else the pull's wait.
const MAX_FETCH_WAIT: Duration = Duration::from_secs(1);
/// How long past its expiry a long poll may take before it is abandoned.
const LONG_POLL_GRACE: Duration = Duration::from_millis(100);
/// Longest poll while the consumer is at `max_ack_pending`.
const FULL_POLL: Duration = Duration::from_millis(100);
/// Room for the headers of a published message, besides its id.
const HEADER_ROOM: usize = 64;
/// Shortest long poll worth a pull request.
const MIN_LONG_POLL: Duration = Duration::from_millis(2);

type Handle = Arc<jetstream::Message>;
/// Dead letters with the index of their ack id.
type Letters = Vec<(usize, DeadLetter<Handle>)>;

fn unavailable(reason: impl Into<String>) -> PubSubError {
    PubSubError::Unavailable {
        backend: BACKEND,
        reason: reason.into(),
    }
}

fn backend_error(reason: impl Into<String>) -> PubSubError {
    PubSubError::Backend {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// The durable consumer a group is bound to, with the settings applied to it.
#[derive(Debug, Clone)]
struct Bound {
    consumer: PullConsumer,
    ack_wait: Duration,
    max_ack_pending: i64,
}

/// One group on one topic, in this process.
#[derive(Debug)]
struct Group {
    topic: String,
    name: String,
    stream: String,
    durable: String,
    bound: tokio::sync::Mutex<Option<Bound>>,
    /// Set when a pull request failed oddly: bind the consumer again (it may have been
    /// deleted).
    rebind: AtomicBool,
    state: std::sync::Mutex<GroupState<Handle>>,
    /// Woken when a buffered message may have become deliverable.
    eligible: Notify,
    /// Woken when deliveries were settled or nacked (room under `max_in_flight`).
    room: Notify,
    /// One pull request open on the consumer at a time (see [`Turn`]).
    fetching: Arc<tokio::sync::Mutex<()>>,
}

/// The right to have a pull request open on a group's consumer. One at a time per
/// group in this process: the server hands first deliveries to requests in stream
/// order, so with one request open they are accepted in stream order and each
/// ordering key is held by its earliest message. (With concurrent requests a later
/// message of a key could be accepted, and handed out, before an earlier one.)
struct Turn {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    group: Arc<Group>,
}

impl Turn {
    /// The turn, if no other request is open.
    fn try_take(group: &Arc<Group>) -> Option<Self> {
        let guard = Arc::clone(&group.fetching).try_lock_owned().ok()?;
        Some(Self {
            guard: Some(guard),
            group: Arc::clone(group),
        })
    }
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn")
            .field("group", &self.group.name)
            .finish()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // Unlock first, then wake pullers waiting for their turn.
        drop(self.guard.take());
        self.group.eligible.notify_waiters();
    }
}

impl Group {
    fn state(&self) -> std::sync::MutexGuard<'_, GroupState<Handle>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn settings(&self) -> SubscriptionSettings {
        self.state().settings.clone()
    }

    /// A position was settled; wakes pullers.
    fn settled(&self, position: u64, delivery: u32, dead_lettered: bool) {
        let freed = {
            let mut state = self.state();
            if dead_lettered {
                state.dead_lettered(position, delivery)
            } else {
                state.settled(position, delivery)
            }
        };
        if freed {
            self.eligible.notify_waiters();
        }
        self.room.notify_waiters();
    }
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    config: Config,
    /// Topics whose stream is known to exist.
    streams: std::sync::Mutex<HashSet<String>>,
    /// (topic, group) → its state here.
    groups: std::sync::Mutex<HashMap<(String, String), Arc<Group>>>,
    /// Wakes the keep-alive task (a new deadline to keep).
    wake_keeper: Arc<Notify>,
}

/// Pub/sub on NATS JetStream.
pub struct NatsPubSub {
    inner: Arc<Inner>,
    keeper: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for NatsPubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPubSub")
            .field("url", &self.inner.config.url)
            .field("stream_prefix", &self.inner.config.stream_prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for NatsPubSub {
    fn drop(&mut self) {
        if let Some(keeper) = self
            .keeper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            keeper.abort();
        }
    }
}

impl NatsPubSub {
    /// Connects to NATS and checks that JetStream is enabled. Streams and consumers are
    /// created on first use.
    ///
    /// # Errors
    /// [`PubSubError::Unavailable`] if the server can't be reached, or JetStream
    /// doesn't answer, within `connect_timeout`; [`PubSubError::Backend`] for an
    /// invalid `stream_prefix`.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub async fn connect(config: &Config) -> Result<Arc<Self>, PubSubError> {
        if !names::is_valid_prefix(&config.stream_prefix) {
            return Err(backend_error(format!(
                "invalid stream_prefix {:?}: use A-Z, a-z, 0-9, '_', '-' and single '.' between parts",
                config.stream_prefix
            )));
        }
        let urls: Vec<String> = config
            .url
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        let timeout = config.connect_timeout.max(Duration::from_millis(100));
        let connecting = async_nats::ConnectOptions::new()
            .name("trellis-pubsub")
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            .connect(urls.as_slice());
        let client = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(unavailable(format!("connecting to {}: {e}", config.url))),
            Err(_) => {
                return Err(unavailable(format!(
                    "connecting to {} timed out after {timeout:?}",
                    config.url
                )));
            }
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        account_info(&js).await.map_err(|e| {
            unavailable(format!("JetStream is not available at {}: {e}", config.url))
        })?;
        let wake_keeper = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            client,
            js,
            config: config.clone(),
            streams: std::sync::Mutex::new(HashSet::new()),
            groups: std::sync::Mutex::new(HashMap::new()),
            wake_keeper: Arc::clone(&wake_keeper),
        });
        let keeper = tokio::spawn(keep_alive(Arc::downgrade(&inner), wake_keeper));
        Ok(Arc::new(Self {
            inner,
            keeper: std::sync::Mutex::new(Some(keeper)),
        }))
    }
}

/// Asks JetStream for the account's information (its answer is not parsed: the
/// client's `Account` type expects fields older servers don't send).
async fn account_info(js: &jetstream::Context) -> Result<(), String> {
    let response: jetstream::response::Response<serde_json::Value> = js
        .request("INFO", &serde_json::json!({}))
        .await
        .map_err(|e| e.to_string())?;
    match response {
        jetstream::response::Response::Ok(_) => Ok(()),
        jetstream::response::Response::Err { error } => Err(error.to_string()),
    }
}

/// Sends progress acks for buffered and extended deliveries, as they fall due.
async fn keep_alive(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let next = {
            let Some(inner) = inner.upgrade() else { return };
            inner.keep_alive_round().await
        };
        let until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            () = &mut woken => {}
        }
    }
}

/// A pull request in progress. Dropped before the server finished it, it hands the
/// request to a background task that buffers whatever still arrives, so no delivery is
/// lost to an inbox nobody reads.
struct Fetch {
    batch: Option<Batch>,
    /// Held until the request is finished, by the background task if abandoned.
    turn: Option<Turn>,
    left: usize,
    inner: Arc<Inner>,
    group: Arc<Group>,
    /// How long the background task waits for the rest.
    limit: Duration,
}

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetch")
            .field("open", &self.batch.is_some())
            .field("left", &self.left)
            .field("group", &self.group.name)
            .finish_non_exhaustive()
    }
}

impl Fetch {
    async fn next(&mut self) -> Option<jetstream::Message> {
        let batch = self.batch.as_mut()?;
        match batch.next().await {
            Some(Ok(message)) => {
                self.left = self.left.saturating_sub(1);
                if self.left == 0 {
                    self.batch = None;
                }
                Some(message)
            }
            Some(Err(e)) => {
                tracing::debug!(topic = %self.group.topic, group = %self.group.name, error = %e, "pull request ended");
                self.group.rebind.store(true, Ordering::Release);
                self.batch = None;
                None
            }
            None => {
                self.batch = None;
                None
            }
        }
    }
}

impl Drop for Fetch {
    fn drop(&mut self) {
        let Some(batch) = self.batch.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let rest = Self {
            batch: Some(batch),
            turn: self.turn.take(),
            left: self.left,
            inner: Arc::clone(&self.inner),
            group: Arc::clone(&self.group),
            limit: self.limit,
        };
        runtime.spawn(drain(rest));
    }
}

/// Buffers what an abandoned pull request still brings.
async fn drain(mut fetch: Fetch) {
    let until = Instant::now() + fetch.limit;
    let (inner, group) = (Arc::clone(&fetch.inner), Arc::clone(&fetch.group));
    while let Ok(Some(message)) = tokio::time::timeout_at(until, fetch.next()).await {
        match inner.accept(&group, message) {
            Ok(true) => group.eligible.notify_waiters(),
            Ok(false) => {}
            Err(dead) => inner.dead_letter_fetched(&group, vec![dead]).await,
        }
    }
    // Past the limit: give up on the request (its messages come back after ack_wait).
    fetch.batch = None;
}

impl Inner {
    fn groups(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Group>>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn timeout(&self) -> Duration {
        self.config.connect_timeout.max(Duration::from_millis(100))
    }

    /// Maps a NATS error: `Unavailable` when disconnected or timed out, else `Backend`.
    fn error(&self, what: &str, e: impl std::fmt::Display) -> PubSubError {
        let reason = format!("{what}: {e}");
        let lower = reason.to_ascii_lowercase();
        let connected = matches!(
            self.client.connection_state(),
            async_nats::connection::State::Connected
        );
        if !connected
            || [
                "timed out",
                "timeout",
                "no responders",
                "broken pipe",
                "disconnected",
            ]
            .iter()
            .any(|s| lower.contains(s))
        {
            unavailable(reason)
        } else {
            backend_error(reason)
        }
    }

    fn check_connected(&self) -> Result<(), PubSubError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(unavailable(format!(
                "not connected to {} ({state:?})",
                self.config.url
            ))),
        }
    }

    async fn keep_alive_round(&self) -> Option<Instant> {
        let now = Instant::now();
        let groups: Vec<Arc<Group>> = self.groups().values().cloned().collect();
        let mut next: Option<Instant> = None;
        let mut due = Vec::new();
        for group in groups {
            let (handles, at, period) = {
                let mut state = group.state();
                let (handles, at) = state.keepalive(now);
                (handles, at, state.keepalive_period())
            };
            due.extend(handles);
            // Wake within a period anyway, to catch messages buffered meanwhile.
            let at = at.map_or(now + period, |at| at.min(now + period));
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        for handle in due {
            if let Err(e) = handle.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %e, "progress ack failed");
            }
        }
        next
    }

    /// The topic's stream name, creating the stream if this process hasn't seen it.
    async fn stream(&self, topic: &str) -> Result<String, PubSubError> {
        check_topic(topic)?;
        let prefix = &self.config.stream_prefix;
        let name = stream_name(prefix, topic);
        if self.streams().contains(topic) {
            return Ok(name);
        }
        let max_age = self.config.retention_max_age.unwrap_or(Duration::ZERO);
        let mut duplicate_window = self.config.dedupe_window;
        if !max_age.is_zero() {
            duplicate_window = duplicate_window.min(max_age);
        }
        let config = jetstream::stream::Config {
            name: name.clone(),
            description: Some(format!("trellis pub/sub topic {topic}")),
            subjects: vec![subject(prefix, topic)],
            storage: match self.config.storage {
                NatsStorage::File => StorageType::File,
                NatsStorage::Memory => StorageType::Memory,
            },
            num_replicas: self.config.replicas.max(1),
            duplicate_window,
            max_age,
            max_bytes: self
                .config
                .retention_max_bytes
                .map_or(-1, |b| i64::try_from(b.bytes()).unwrap_or(i64::MAX)),
            max_messages: -1,
            max_messages_per_subject: -1,
            max_consumers: -1,
            discard: DiscardPolicy::Old,
            retention: RetentionPolicy::Limits,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| self.error(&format!("creating stream {name}"), e))?;
        self.streams().insert(topic.to_owned());
        Ok(name)
    }

    fn find_group(&self, topic: &str, group: &str) -> Option<Arc<Group>> {
        self.groups()
            .get(&(topic.to_owned(), group.to_owned()))
            .cloned()
    }

    /// The group's state here and its consumer, created or updated to `settings`.
    async fn group(
        &self,
        topic: &str,
        name: &str,
        durable: &str,
        settings: &SubscriptionSettings,
    ) -> Result<(Arc<Group>, PullConsumer), PubSubError> {
        let stream = self.stream(topic).await?;
        let group = {
            let mut groups = self.groups();
            Arc::clone(
                groups
                    .entry((topic.to_owned(), name.to_owned()))
                    .or_insert_with(|| {
                        Arc::new(Group {
                            topic: topic.to_owned(),
                            name: name.to_owned(),
                            stream: stream.clone(),
                            durable: durable.to_owned(),
                            bound: tokio::sync::Mutex::new(None),
                            rebind: AtomicBool::new(false),
                            state: std::sync::Mutex::new(GroupState::new(settings.clone())),
                            eligible: Notify::new(),
                            room: Notify::new(),
                            fetching: Arc::default(),
                        })
                    }),
            )
        };
        {
            let mut state = group.state();
            if state.settings != *settings {
                state.settings = settings.clone();
            }
        }
        let ack_wait = settings.ack_deadline;
        let max_ack_pending = i64::from(settings.max_in_flight);
        let mut bound = group.bound.lock().await;
        let rebind = group.rebind.swap(false, Ordering::AcqRel);
        if rebind {
            self.streams().remove(topic);
            self.stream(topic).await?;
        }
        if let Some(b) = bound.as_ref()
            && !rebind
            && b.ack_wait == ack_wait
            && b.max_ack_pending == max_ack_pending
        {
            return Ok((Arc::clone(&group), b.consumer.clone()));
        }
        let config = pull::Config {
            durable_name: Some(group.durable.clone()),
            description: Some(format!("{GROUP_DESCRIPTION}{name}")),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            max_deliver: -1,
            max_ack_pending,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        };
        let consumer: PullConsumer = self
            .js
            .create_consumer_on_stream(config, group.stream.as_str())
            .await
            .map_err(|e| {
                self.error(
                    &format!(
                        "creating consumer {} on stream {}",
                        group.durable, group.stream
                    ),
                    e,
                )
            })?;
        if bound.is_none() {
            // Deliveries outstanding from a previous process: their keys are unknown.
            let info = consumer.cached_info();
            group.state().set_barrier(
                Instant::now(),
                info.delivered.stream_sequence,
                info.num_ack_pending as u64,
                info.ack_floor.stream_sequence,
            );
        }
        *bound = Some(Bound {
            consumer: consumer.clone(),
            ack_wait,
            max_ack_pending,
        });
        Ok((Arc::clone(&group), consumer))
    }

    /// Buffers a delivered message; a dead letter if it is past `max_deliveries`.
    fn accept(
        &self,
        group: &Group,
        message: jetstream::Message,
    ) -> Result<bool, DeadLetter<Handle>> {
        let (position, attempt) = match message.info() {
            Ok(info) => (
                info.stream_sequence,
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
            ),
            Err(e) => {
                tracing::error!(topic = %group.topic, error = %e, "delivery without JetStream metadata; ignored");
                return Ok(false);
            }
        };
        let (key, json) = match Stored::decode(&message.payload) {
            Ok(stored) => (stored.key, stored.json),
            Err(_) => {
                tracing::error!(
                    topic = %group.topic,
                    position,
                    "undecodable message; delivering its raw bytes"
                );
                (None, message.payload.clone())
            }
        };
        group.state().accept(
            Instant::now(),
            position,
            attempt,
            key,
            json,
            Arc::new(message),
        )
    }

    /// Sends a pull request for up to `n` messages: `expires` `None` for only what is
    /// there now, else waiting up to `expires` for them.
    async fn start_fetch(
        self: &Arc<Self>,
        turn: Turn,
        group: &Arc<Group>,
        consumer: &PullConsumer,
        n: usize,
        expires: Option<Duration>,
    ) -> Result<Fetch, PubSubError> {
        self.check_connected()?;
        let batch = match expires {
            None => consumer.fetch().max_messages(n).messages().await,
            Some(expires) => {
                consumer
                    .batch()
                    .max_messages(n)
                    .expires(expires)
                    .messages()
                    .await
            }
        }
        .map_err(|e| self.error("pull request", e))?;
        Ok(Fetch {
            batch: Some(batch),
            turn: Some(turn),
            left: n,
            inner: Arc::clone(self),
            group: Arc::clone(group),
            limit: expires.unwrap_or(Duration::ZERO) + self.timeout(),
        })
    }

    /// Fetches what is there now (up to `n`) into the buffer, waiting at most `cap`
    /// for the server to finish the request; returns how many came.
    async fn fetch_now(
        self: &Arc<Self>,
        turn: Turn,
        group: &Arc<Group>,
        consumer: &PullConsumer,
        n: usize,
        cap: Duration,
    ) -> Result<usize, PubSubError> {
        let mut fetch = self.start_fetch(turn, group, consumer, n, None).await?;
        let until = Instant::now() + cap;
        let mut got = 0;
        let mut dead = Vec::new();
        while let Ok(Some(message)) = tokio::time::timeout_at(until, fetch.next()).await {
            got += 1;
            if let Err(d) = self.accept(group, message) {
                dead.push(d);
            }
        }
        // Unfinished (the server holds a request for what is there now while the
        // consumer is at max_ack_pending): the rest goes to the buffer.
        drop(fetch);
        self.dead_letter_fetched(group, dead).await;
        Ok(got)
    }

    async fn pull_group(
        self: &Arc<Self>,
        topic: &str,
        name: &str,
        durable: &str,
        settings: &SubscriptionSettings,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, PubSubError> {
        let (group, consumer) = self.group(topic, name, durable, settings).await?;
        let deadline = Instant::now() + wait;
        let max = max.max(1);
        loop {
            let eligible = group.eligible.notified();
            tokio::pin!(eligible);
            eligible.as_mut().enable();
            let room = group.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();

            let check = group.state().barrier_check_due(Instant::now());
            if check {
                match consumer.get_info().await {
                    Ok(info) => {
                        let lifted = group.state().consumer_state(
                            info.ack_floor.stream_sequence,
                            info.num_ack_pending as u64,
                        );
                        if lifted {
                            tracing::debug!(topic, group = name, "ordering-key barrier lifted");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "consumer info failed"),
                }
            }
            // Fetch first, then take: a pull cancelled while fetching has taken nothing.
            let want = {
                let state = group.state();
                state.fetch_room(max.saturating_sub(state.ready()))
            };
            // At max_ack_pending (counting nacked messages), the server would only hold
            // a request for what is there now: long-poll for redeliveries instead.
            let full = group.state().server_full();
            // Another pull's request is open: take what is buffered, else wait for it.
            let mut turn = if want > 0 && !full {
                Turn::try_take(&group)
            } else {
                None
            };
            let waiting_for_turn = want > 0 && !full && turn.is_none();
            let drained = match turn.take() {
                Some(turn) => {
                    let cap = deadline
                        .saturating_duration_since(Instant::now())
                        .clamp(MIN_FETCH_WAIT, MAX_FETCH_WAIT);
                    self.fetch_now(turn, &group, &consumer, want, cap).await? < want
                }
                None => want == 0,
            };
            if drained {
                // The server had nothing more: nothing nacked is due back here.
                group.state().forget_stale(Instant::now());
            }
            let handed = group.state().take(Instant::now(), max);
            if !handed.is_empty() {
                let out = self.deliveries(&group, handed).await;
                if !out.is_empty() {
                    return Ok(out);
                }
            }
            let now = Instant::now();
            if deadline.saturating_duration_since(now) < MIN_LONG_POLL {
                return Ok(Vec::new());
            }
            if waiting_for_turn {
                tokio::select! {
                    () = &mut eligible => {}
                    () = &mut room => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
                continue;
            }
            if group.state().fetch_room(1) == 0 {
                // No room: wait for an ack, or a buffered message to become deliverable.
                tokio::select! {
                    () = &mut eligible => {}
                    () = &mut room => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
                continue;
            }
            let mut expires = deadline - now;
            if group.state().server_full() {
                // At max_ack_pending the server is unreliable with waiting pull
                // requests (2.9 may leave one unanswered as a redelivery falls due): wait
                // here for the nacked messages to be due, then ask in short polls.
                let due = group.state().next_due();
                if let Some(due) = due
                    && due > now
                {
                    tokio::select! {
                        () = &mut eligible => {}
                        () = &mut room => {}
                        () = tokio::time::sleep_until(due.min(deadline)) => {}
                    }
                    continue;
                }
                expires = expires.min(FULL_POLL);
            }
            // Long poll for one message; then the loop takes it and fetches more.
            let Some(turn) = Turn::try_take(&group) else {
                tokio::select! {
                    () = &mut eligible => {}
                    () = &mut room => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
                continue;
            };
            let mut fetch = self
                .start_fetch(turn, &group, &consumer, 1, Some(expires))
                .await?;
            // Bounded here too: a server at max_ack_pending may never expire it.
            let dead = tokio::select! {
                message = fetch.next() => match message {
                    Some(message) => self.accept(&group, message).err(),
                    None => {
                        // Expired: nothing nacked was due back here either.
                        group.state().forget_stale(Instant::now());
                        None
                    }
                },
                () = &mut eligible => None,
                () = tokio::time::sleep_until(now + expires + LONG_POLL_GRACE) => None,
            };
            drop(fetch);
            if let Some(dead) = dead {
                self.dead_letter_fetched(&group, vec![dead]).await;
            }
        }
    }

    async fn deliveries(&self, group: &Group, handed: Vec<Handed<Handle>>) -> Vec<Delivery> {
        // A delivery redelivered while this pull was still fetching is superseded.
        let handed: Vec<Handed<Handle>> = {
            let state = group.state();
            handed
                .into_iter()
                .filter(|h| state.is_in_flight(h.position, h.attempt))
                .collect()
        };
        let mut out = Vec::with_capacity(handed.len());
        for h in handed {
            if let Some(handle) = h.refresh
                && let Err(e) = handle.ack_with(AckKind::Progress).await
            {
                tracing::debug!(error = %e, "progress ack failed");
            }
            out.push(Delivery {
                ack_id: AckId {
                    topic: group.topic.clone(),
                    position: h.position,
                    attempt: h.attempt,
                }
                .to_string(),
                attempt: h.attempt,
                position: h.position,
                key: h.key,
                event: h.json,
            });
        }
        out
    }

    /// Publishes encoded events with the given `Nats-Msg-Id`s, pipelined.
    async fn publish_raw(
        &self,
        topic: &str,
        messages: &[(Bytes, String)],
    ) -> Result<Vec<PublishAck>, PubSubError> {
        let mut retried = false;
        loop {
            self.stream(topic).await?;
            match self.try_publish(topic, messages).await {
                Err(Retry::StreamMissing) if !retried => {
                    // Deleted behind our back: create it again; ids make this safe.
                    retried = true;
                    self.streams().remove(topic);
                }
                Err(Retry::StreamMissing) => {
                    return Err(backend_error(format!("no stream for topic {topic}")));
                }
                Err(Retry::Failed(e)) => return Err(e),
                Ok(acks) => return Ok(acks),
            }
        }
    }

    async fn try_publish(
        &self,
        topic: &str,
        messages: &[(Bytes, String)],
    ) -> Result<Vec<PublishAck>, Retry> {
        let subject = subject(&self.config.stream_prefix, topic);
        // Refuse a batch with a message over the server's limit before sending any.
        let max_payload = self.client.server_info().max_payload;
        if let Some((payload, _)) = messages.iter().find(|(payload, id)| {
            max_payload > 0 && payload.len() + id.len() + HEADER_ROOM > max_payload
        }) {
            return Err(Retry::Failed(PubSubError::TooLarge(payload.len())));
        }
        let mut pending = Vec::with_capacity(messages.len());
        for (payload, id) in messages {
            let publish = PublishMessage::build()
                .payload(payload.clone())
                .message_id(id);
            let ack = self
                .js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|e| self.publish_error(e, payload.len()))?;
            pending.push((ack, payload.len()));
        }
        let mut acks = Vec::with_capacity(pending.len());
        for (ack, len) in pending {
            acks.push(ack.await.map_err(|e| self.publish_error(e, len))?);
        }
        Ok(acks)
    }

    fn publish_error(&self, e: jetstream::context::PublishError, len: usize) -> Retry {
        let too_large = matches!(e.kind(), PublishErrorKind::MaxPayloadExceeded)
            || std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .is_some_and(|js| js.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM);
        match e.kind() {
            _ if too_large => Retry::Failed(PubSubError::TooLarge(len)),
            PublishErrorKind::StreamNotFound => Retry::StreamMissing,
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                Retry::Failed(unavailable(format!("publishing: {e}")))
            }
            _ => Retry::Failed(self.error("publishing", e)),
        }
    }

    /// Confirms an ack (or another ack kind) with the server.
    async fn confirm(&self, handle: &jetstream::Message, kind: AckKind) -> Result<(), PubSubError> {
        let Some(reply) = handle.reply.clone() else {
            return Err(backend_error("not a JetStream message"));
        };
        self.client
            .request(reply, Bytes::from(kind))
            .await
            .map(|_| ())
            .map_err(|e| self.error("acknowledging", e))
    }

    /// Stores dead letters in the group's dead-letter topic.
    async fn store_dead_letters(
        &self,
        group: &Group,
        dead: &[DeadLetter<Handle>],
    ) -> Result<(), PubSubError> {
        if dead.is_empty() {
            return Ok(());
        }
        let settings = group.settings();
        let dlq = dead_letter_topic(&group.topic, &settings);
        let messages: Vec<(Bytes, String)> = dead
            .iter()
            .map(|d| {
                let event = crate::dead_letter::dead_letter(
                    &d.json,
                    crate::dead_letter::Cause {
                        reason: &d.reason,
                        attempts: d.attempts,
                        topic: &group.topic,
                        group: &group.name,
                    },
                );
                // Unique per group, message and delivery: a retry is stored once, a
                // later dead-lettering of a replayed copy again.
                let id = format!(
                    "trellis-dead-letter:{}:{}:{}:{}",
                    group.topic, group.name, d.position, d.delivery
                );
                (event.encode(), id)
            })
            .collect();
        self.publish_raw(&dlq, &messages).await?;
        metrics::counter!("trellis_pubsub_dead_lettered_total", "topic" => group.topic.clone(), "group" => group.name.clone())
            .increment(dead.len() as u64);
        for d in dead {
            tracing::warn!(topic = %group.topic, group = %group.name, position = d.position, attempts = d.attempts, reason = %d.reason, dead_letter_topic = %dlq, "message dead-lettered");
        }
        Ok(())
    }

    /// Dead-letters deliveries being settled (nack, reject): stores them, then acks
    /// the originals. On failure they are back in flight and the error is returned.
    async fn dead_letter_now(
        &self,
        group: &Group,
        dead: Vec<DeadLetter<Handle>>,
    ) -> Result<(), PubSubError> {
        if let Err(e) = self.store_dead_letters(group, &dead).await {
            let mut state = group.state();
            for d in &dead {
                state.unsettled(d.position, d.delivery);
            }
            return Err(e);
        }
        let confirmed = futures_util::future::join_all(
            dead.iter().map(|d| self.confirm(&d.handle, AckKind::Ack)),
        )
        .await;
        let mut failure = None;
        for (d, result) in dead.iter().zip(confirmed) {
            match result {
                Ok(()) => group.settled(d.position, d.delivery, true),
                Err(e) => {
                    group.state().unsettled(d.position, d.delivery);
                    failure.get_or_insert(e);
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Dead-letters messages the server delivered past `max_deliveries`; on failure
    /// they are naked to come back and be tried again.
    async fn dead_letter_fetched(&self, group: &Group, dead: Vec<DeadLetter<Handle>>) {
        if dead.is_empty() {
            return;
        }
        let handles: Vec<(u64, u32, Handle)> = dead
            .iter()
            .map(|d| (d.position, d.delivery, Arc::clone(&d.handle)))
            .collect();
        if let Err(e) = self.dead_letter_now(group, dead).await {
            tracing::error!(topic = %group.topic, group = %group.name, error = %e, "storing dead letters failed; they will be retried");
            let now = Instant::now();
            for (position, delivery, handle) in handles {
                group
                    .state()
                    .dead_letter_postponed(now, position, delivery, DEAD_LETTER_RETRY);
                let _ = handle.ack_with(AckKind::Nak(Some(DEAD_LETTER_RETRY))).await;
            }
        }
    }

    /// Parses ack ids of `group`; unparsable or unknown ones stay `NotFound`.
    fn resolve(&self, group: &str, ack_ids: &[String]) -> Vec<Option<(Arc<Group>, AckId)>> {
        ack_ids
            .iter()
            .map(|text| {
                let id = AckId::parse(text)?;
                let group = self.find_group(&id.topic, group)?;
                Some((group, id))
            })
            .collect()
    }

    async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<Vec<AckOutcome>, PubSubError> {
        let mut outcomes = vec![AckOutcome::NotFound; ack_ids.len()];
        let mut pending = Vec::new();
        for (i, resolved) in self.resolve(group, ack_ids).into_iter().enumerate() {
            let Some((g, id)) = resolved else { continue };
            let begun = g.state().begin_ack(id.position, id.attempt);
            match begun {
                Ok(handle) => pending.push((i, g, id, handle)),
                Err(outcome) => outcomes[i] = outcome,
            }
        }
        let confirmed = futures_util::future::join_all(
            pending
                .iter()
                .map(|(_, _, _, handle)| self.confirm(handle, AckKind::Ack)),
        )
        .await;
        let mut failure = None;
        for ((i, g, id, _), result) in pending.into_iter().zip(confirmed) {
            match result {
                Ok(()) => {
                    g.settled(id.position, id.attempt, false);
                    outcomes[i] = AckOutcome::Ok;
                }
                Err(e) => {
                    g.state().unsettled(id.position, id.attempt);
                    failure.get_or_insert(e);
                }
            }
        }
        failure.map_or(Ok(outcomes), Err)
    }

    /// Runs the dead letters of several groups; the first error, if any.
    async fn dead_letter_groups(
        &self,
        dead: Vec<(usize, Arc<Group>, DeadLetter<Handle>)>,
        outcomes: &mut [AckOutcome],
    ) -> Option<PubSubError> {
        let mut by_group: Vec<(Arc<Group>, Letters)> = Vec::new();
        for (i, g, d) in dead {
            match by_group.iter_mut().find(|(h, _)| Arc::ptr_eq(h, &g)) {
                Some((_, list)) => list.push((i, d)),
                None => by_group.push((g, vec![(i, d)])),
            }
        }
        let mut failure = None;
        for (g, list) in by_group {
            let (indexes, letters): (Vec<usize>, Vec<DeadLetter<Handle>>) =
                list.into_iter().unzip();
            match self.dead_letter_now(&g, letters).await {
                Ok(()) => {
                    for i in indexes {
                        outcomes[i] = AckOutcome::Ok;
                    }
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        failure
    }
}

/// Why a publish failed.
#[derive(Debug)]
enum Retry {
    /// The stream is gone: create it and publish again.
    StreamMissing,
    Failed(PubSubError),
}

#[async_trait]
impl PubSub for NatsPubSub {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn publish(
        &self,
        topic: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Published, PubSubError> {
        check_topic(topic)?;
        for event in &events {
            event.validate()?;
        }
        let messages: Vec<(Bytes, String)> =
            events.iter().map(|e| (e.encode(), e.id.clone())).collect();
        let acks = self.inner.publish_raw(topic, &messages).await?;
        let receipts: Vec<Receipt> = events
            .into_iter()
            .zip(acks)
            .map(|(event, ack)| Receipt {
                id: event.id,
                position: ack.sequence,
                duplicate: ack.duplicate,
            })
            .collect();
        let fresh = receipts.iter().filter(|r| !r.duplicate).count();
        metrics::counter!("trellis_pubsub_published_total", "topic" => topic.to_owned())
            .increment(fresh as u64);
        Ok(Published {
            receipts,
            durability: Durability::Broker,
        })
    }

    async fn pull(
        &self,
        topic: &str,
        group: &str,
        settings: &SubscriptionSettings,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, PubSubError> {
        check_topic(topic)?;
        check_group(group)?;
        self.inner
            .pull_group(topic, group, &consumer_name(group), settings, max, wait)
            .await
    }

    async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<Vec<AckOutcome>, PubSubError> {
        self.inner.ack(group, ack_ids).await
    }

    async fn nack(
        &self,
        group: &str,
        ack_ids: &[String],
        delay: Option<Duration>,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        let now = Instant::now();
        let mut outcomes = vec![AckOutcome::NotFound; ack_ids.len()];
        let mut naks = Vec::new();
        let mut dead = Vec::new();
        for (i, resolved) in self.inner.resolve(group, ack_ids).into_iter().enumerate() {
            let Some((g, id)) = resolved else { continue };
            let nacked = g.state().nack(now, id.position, id.attempt, delay);
            match nacked {
                Ok(Nacked::Nak(handle, delay)) => naks.push((i, g, id, handle, delay)),
                Ok(Nacked::DeadLetter(d)) => dead.push((i, g, d)),
                Ok(Nacked::AlreadyAway) => outcomes[i] = AckOutcome::Ok,
                Err(outcome) => outcomes[i] = outcome,
            }
        }
        let mut failure = None;
        for (i, g, id, handle, delay) in naks {
            let kind = AckKind::Nak((!delay.is_zero()).then_some(delay));
            match handle.ack_with(kind).await {
                Ok(()) => {
                    outcomes[i] = AckOutcome::Ok;
                    g.room.notify_waiters();
                }
                Err(e) => {
                    g.state().nak_failed(id.position, id.attempt);
                    failure.get_or_insert(self.inner.error("nacking", e));
                }
            }
        }
        if let Some(e) = self.inner.dead_letter_groups(dead, &mut outcomes).await {
            failure.get_or_insert(e);
        }
        failure.map_or(Ok(outcomes), Err)
    }

    async fn extend(
        &self,
        group: &str,
        ack_ids: &[String],
        by: Duration,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        let now = Instant::now();
        let mut outcomes = vec![AckOutcome::NotFound; ack_ids.len()];
        let mut failure = None;
        for (i, resolved) in self.inner.resolve(group, ack_ids).into_iter().enumerate() {
            let Some((g, id)) = resolved else { continue };
            let extended = g.state().extend(now, id.position, id.attempt, by);
            match extended {
                Ok(handle) => match handle.ack_with(AckKind::Progress).await {
                    Ok(()) => outcomes[i] = AckOutcome::Ok,
                    Err(e) => {
                        failure.get_or_insert(self.inner.error("extending", e));
                    }
                },
                Err(outcome) => outcomes[i] = outcome,
            }
        }
        self.inner.wake_keeper.notify_one();
        failure.map_or(Ok(outcomes), Err)
    }

    async fn reject(
        &self,
        group: &str,
        ack_ids: &[String],
        reason: &str,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        let mut outcomes = vec![AckOutcome::NotFound; ack_ids.len()];
        let mut dead = Vec::new();
        for (i, resolved) in self.inner.resolve(group, ack_ids).into_iter().enumerate() {
            let Some((g, id)) = resolved else { continue };
            let rejected = g.state().reject(id.position, id.attempt, reason);
            match rejected {
                Ok(d) => dead.push((i, g, d)),
                Err(outcome) => outcomes[i] = outcome,
            }
        }
        match self.inner.dead_letter_groups(dead, &mut outcomes).await {
            Some(e) => Err(e),
            None => Ok(outcomes),
        }
    }

    async fn stats(&self, topic: &str) -> Result<TopicStats, PubSubError> {
        let inner = &self.inner;
        let name = inner.stream(topic).await?;
        let stream = inner
            .js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| inner.error(&format!("stream {name}"), e))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| inner.error(&format!("stream {name}"), e))?;
        let head = info.state.last_sequence + 1;
        let start = info.state.first_sequence.max(1);
        let mut consumers = stream.consumers();
        let mut groups = Vec::new();
        while let Some(consumer) = consumers.next().await {
            let consumer = consumer.map_err(|e| inner.error(&format!("consumers of {name}"), e))?;
            if consumer.name == REPLAY_DURABLE {
                continue;
            }
            let group = consumer
                .config
                .description
                .as_deref()
                .and_then(|d| d.strip_prefix(GROUP_DESCRIPTION))
                .map(str::to_owned)
                .or_else(|| names::unescape(&consumer.name))
                .unwrap_or_else(|| consumer.name.clone());
            let (counts, dead_lettered) =
                inner
                    .find_group(topic, &group)
                    .map_or_else(Default::default, |g| {
                        let state = g.state();
                        (state.counts(), state.dead_lettered)
                    });
            let ack_pending = consumer.num_ack_pending as u64;
            groups.push(GroupStats {
                group,
                committed: (consumer.ack_floor.stream_sequence + 1).max(start),
                lag: consumer.num_pending + ack_pending,
                in_flight: ack_pending.saturating_sub(counts.buffered + counts.away),
                pending_redelivery: counts.away,
                dead_lettered,
            });
        }
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(TopicStats {
            topic: topic.to_owned(),
            head,
            start,
            groups,
        })
    }

    async fn replay_dead_letters(
        &self,
        topic: &str,
        settings: &SubscriptionSettings,
    ) -> Result<u64, PubSubError> {
        check_topic(topic)?;
        let dlq = dead_letter_topic(topic, settings);
        let replay = SubscriptionSettings {
            max_in_flight: 10_000,
            max_deliveries: 1000,
            ..SubscriptionSettings::default()
        };
        let dlq_stream = stream_name(&self.inner.config.stream_prefix, &dlq);
        let mut replayed = 0;
        loop {
            let batch = self
                .inner
                .pull_group(
                    &dlq,
                    REPLAY_GROUP,
                    REPLAY_DURABLE,
                    &replay,
                    500,
                    Duration::ZERO,
                )
                .await?;
            if batch.is_empty() {
                return Ok(replayed);
            }
            let mut messages = Vec::with_capacity(batch.len());
            for d in &batch {
                let event = crate::dead_letter::revive(&d.event)
                    .map_err(|e| backend_error(format!("dead letter {}: {e}", d.position)))?;
                // The event id was seen before, on purpose: a new Nats-Msg-Id, the same
                // for a retry of this replay.
                let id = format!("trellis-replay:{dlq_stream}:{}:{}", d.position, event.id);
                messages.push((event.encode(), id));
            }
            self.inner.publish_raw(topic, &messages).await?;
            let ids: Vec<String> = batch.iter().map(|d| d.ack_id.clone()).collect();
            self.inner.ack(REPLAY_GROUP, &ids).await?;
            replayed += batch.len() as u64;
        }
    }

    async fn health(&self) -> Result<(), PubSubError> {
        account_info(&self.inner.js)
            .await
            .map_err(|e| unavailable(format!("JetStream at {}: {e}", self.inner.config.url)))
    }

    async fn close(&self) -> Result<(), PubSubError> {
        if let Some(keeper) = self
            .keeper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            keeper.abort();
        }
        let groups: Vec<Arc<Group>> = self.inner.groups().drain().map(|(_, g)| g).collect();
        for group in groups {
            // Buffered messages go back to the server now rather than after ack_wait.
            let buffered = group.state().release_buffered();
            for handle in buffered {
                let _ = handle.ack_with(AckKind::Nak(None)).await;
            }
        }
        self.inner
            .client
            .flush()
            .await
            .map_err(|e| unavailable(format!("flushing: {e}")))
    }
}
