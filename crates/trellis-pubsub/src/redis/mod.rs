//! The Redis Streams backend: a stream per topic, a consumer group per group, and Lua
//! scripts that keep each group's delivery state next to its stream, so every
//! Trellis process sharing the Redis sees (and changes) the same state atomically.
//!
//! # Keys
//! Under the component's prefix `P` (by default `trellis:pubsub:{<name>}:`, a Cluster
//! hash tag that keeps one component in one slot so its scripts stay atomic; a custom
//! prefix must keep a hash tag to work on a Cluster):
//! - `P s:<topic>` — the topic's stream; each entry has the fields `k` (the ordering
//!   key, `""` if none) and `e` (the event as [`CloudEvent::encode`] writes it). Every
//!   group is a consumer group of it, created from the stream's start (`0`), so a new
//!   group sees every message still kept, as with the embedded backend;
//! - `P d:<topic>:<event id>` — the stream id an event id was stored under, expiring
//!   after the dedupe window;
//! - `P f:<topic>:<group>` — sorted set of in-flight deliveries → ack deadline (ms);
//! - `P r:<topic>:<group>` — sorted set of deliveries waiting for redelivery → when
//!   due (nacked, expired, or next in line for their key);
//! - `P h:<topic>:<group>` — hash of ordering key → the entry holding it (and back);
//! - `P q:<topic>:<group>:<key>` — list of entries waiting for `key`, oldest first;
//! - `P c:<topic>:<group>` — hash of counters: `parked` (entries waiting for their
//!   key) and `dead` (dead-lettered, for stats);
//! - `P cfg:<topic>` — hash of group → its subscription settings as of its latest
//!   pull, so acks and nacks sent to another process follow them.
//!
//! Times are the Redis server's clock (`TIME` in the scripts), shared by every process.
//!
//! # Positions
//! The API's positions are `u64`; stream ids are `ms-seq`. A position is
//! `ms << 20 | seq` ([`position`], and back with [`stream_id`]): injective and
//! monotonic for every id Redis generates (`seq` < 2²⁰ entries per millisecond,
//! `ms` < 2⁴⁴, the year 2527).
//!
//! # Deliveries and acks
//! The group's PEL (pending entries list) is the source of truth for what is
//! unsettled, and its delivery count is the delivery's `attempt`: a new entry is read
//! with `XREADGROUP` (count 1), a redelivery is taken with `XCLAIM … RETRYCOUNT n+1`.
//! All consumers of all processes use the one consumer name `trellis`: ownership
//! within the group plays no part, every redelivery is an explicit `XCLAIM`.
//!
//! An ack id `topic:position:attempt` is checked against the PEL: no such group →
//! `NotFound`; the entry not pending (settled) or its delivery count ≠ `attempt`
//! (superseded by a redelivery) → `Expired`. An ack `XACK`s; a nack moves the entry
//! from `f` to `r` (due after the delay, or the subscription's backoff); `extend`
//! moves its deadline in `f`; a late ack (deadline passed, not yet redelivered) counts.
//!
//! # Redelivery
//! Each pull first moves in-flight deliveries past their deadline to `r`, due after
//! the backoff of their attempt, then hands out due entries of `r` (`XCLAIM`), then new
//! entries, within `max_in_flight` (the size of `f`). A pull that found nothing waits,
//! until the next deadline or due redelivery at the latest, by blocking on `XREAD`
//! after the stream's last id on a connection of its own (pooled; at most 256 such
//! reads at once, further pulls poll every 100 ms) — or, when new entries could not be
//! taken anyway (`max_in_flight` reached), by sleeping. Acks, nacks and rejects of this
//! process wake it early; it looks again at least every second to see those of other
//! processes.
//!
//! # Dead letters
//! A nack of the last allowed delivery (`attempt ≥ max_deliveries`), a deadline
//! expiring on it, or a `reject` dead-letters the message: the event gets the
//! `deadletterreason`, `deliverycount`, `deadlettersource` and `deadlettergroup`
//! attributes and one script appends it to the dead-letter topic's stream (an ordinary
//! topic), acknowledges the original and counts it in `P c:<topic>:<group>` — only if
//! the delivery is still in the state the caller saw. [`PubSub::replay_dead_letters`]
//! reads the dead-letter topic with the group `trellis-replay` and moves each entry
//! back (acknowledged and appended in one script, so each replays once), without those
//! attributes and bypassing dedupe.
//!
//! # Ordering keys
//! Enforced per group in Redis, so across processes: a new entry whose key is held by
//! an earlier unsettled entry is *parked* — left in the PEL with a delivery count of 0,
//! queued in `P q:<topic>:<group>:<key>` — and when the holder is settled (acked or
//! dead-lettered; a nacked or expired holder keeps its key) the next in the queue holds
//! the key and is due at once (delivered with attempt 1). Parked entries are bounded
//! (2 × `max_in_flight`, at least 16) so a hot key does not pull the whole stream in.
//!
//! # Restarts
//! Everything but a process's cache of settings is in Redis: positions, acks,
//! delivery counts, deadlines, nack due times, key holders and dead-letter counts
//! survive a restart of Trellis, and acks sent to any process count. `close` returns
//! the deliveries this process handed out and that are still in flight for redelivery
//! at once (their consumers go away with it, as with the embedded backend); after a
//! crash they come back when their deadlines pass. Durability against a Redis crash
//! is Redis's own (`appendfsync`); a publish is acknowledged once Redis executed it
//! ([`Durability::Broker`]). Should a group's tracking keys be lost (deleted, evicted
//! — use a `noeviction` policy), pulls adopt the pending entries no key tracks, after
//! an ack deadline, for redelivery.
//!
//! # Retention
//! With `retention_max_len`, appends trim each stream to about that many entries
//! (`MAXLEN ~`). An entry trimmed while unsettled is given up on (settled) when it
//! comes up for redelivery.

mod keys;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, RedisError, Script, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use trellis_core::config::RedisPubSub as Config;

use self::keys::{GroupKeys, KeySpace};
pub use self::keys::{position, stream_id};
use crate::api::{
    AckId, AckOutcome, Delivery, Durability, GroupStats, PubSub, PubSubError, Published, Receipt,
    SubscriptionSettings, TopicStats, backoff, check_group, check_topic, dead_letter_topic,
};
use crate::event::{CloudEvent, Stored};

const BACKEND: &str = "redis";
/// The consumer name of every Trellis process in every group.
const CONSUMER: &str = "trellis";
/// The group used to replay dead letters.
const REPLAY_GROUP: &str = "trellis-replay";
/// A waiting pull looks again at least this often (for other processes' acks).
const MAX_SLICE: Duration = Duration::from_secs(1);
/// Blocking connections kept for reuse.
const IDLE_CONNECTIONS: usize = 16;
/// Blocking reads at once; further waiting pulls poll every [`POLL`].
const BLOCKING_READS: usize = 256;
/// How often a pull polls for new entries when no blocking read is free.
const POLL: Duration = Duration::from_millis(100);
/// Events per publish script (a larger batch is several scripts, in order).
const PUBLISH_CHUNK: usize = 1000;
/// Dead letters per replay script.
const REPLAY_BATCH: usize = 500;

const COMMON_LUA: &str = include_str!("lua/common.lua");

#[derive(Debug)]
struct Scripts {
    publish: Script,
    pull: Script,
    settle: Script,
    dead_letter: Script,
    replay: Script,
    stats: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{COMMON_LUA}\n{body}"));
        Self {
            publish: script(include_str!("lua/publish.lua")),
            pull: script(include_str!("lua/pull.lua")),
            settle: script(include_str!("lua/settle.lua")),
            dead_letter: script(include_str!("lua/dead_letter.lua")),
            replay: script(include_str!("lua/replay.lua")),
            stats: script(include_str!("lua/stats.lua")),
        }
    }
}

/// Subscription settings as stored in `P cfg:<topic>`.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSettings {
    ack_deadline_ms: u64,
    max_deliveries: u32,
    min_backoff_ms: u64,
    max_backoff_ms: u64,
    max_in_flight: u32,
    dead_letter_topic: Option<String>,
}

impl From<&SubscriptionSettings> for StoredSettings {
    fn from(s: &SubscriptionSettings) -> Self {
        Self {
            ack_deadline_ms: millis(s.ack_deadline),
            max_deliveries: s.max_deliveries,
            min_backoff_ms: millis(s.min_backoff),
            max_backoff_ms: millis(s.max_backoff),
            max_in_flight: s.max_in_flight,
            dead_letter_topic: s.dead_letter_topic.clone(),
        }
    }
}

impl From<StoredSettings> for SubscriptionSettings {
    fn from(s: StoredSettings) -> Self {
        Self {
            ack_deadline: Duration::from_millis(s.ack_deadline_ms),
            max_deliveries: s.max_deliveries,
            min_backoff: Duration::from_millis(s.min_backoff_ms),
            max_backoff: Duration::from_millis(s.max_backoff_ms),
            max_in_flight: s.max_in_flight,
            dead_letter_topic: s.dead_letter_topic,
        }
    }
}

/// What a settle script is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Ack,
    Nack,
    Extend,
    Reject,
    Release,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Nack => "nack",
            Self::Extend => "extend",
            Self::Reject => "reject",
            Self::Release => "release",
        }
    }
}

/// A delivery to move to the dead-letter topic.
#[derive(Debug)]
struct DeadLetter {
    id: String,
    count: u32,
    event: Vec<u8>,
    reason: String,
    /// The state the delivery must still be in (see `dead_letter.lua`).
    mode: &'static str,
}

/// What one pull script call found.
#[derive(Debug)]
struct Step {
    deliveries: Vec<Delivery>,
    dead: Vec<DeadLetter>,
    /// When time alone may make something deliverable.
    wake: Option<Duration>,
    /// The stream id to wait for entries after, when new entries could be taken.
    watch: Option<String>,
}

type GroupId = (String, String);

/// Pub/sub on Redis Streams.
#[derive(Debug)]
pub struct RedisPubSub {
    client: redis::Client,
    conn: ConnectionManager,
    keys: KeySpace,
    scripts: Scripts,
    dedupe_window: Duration,
    max_len: Option<u64>,
    timeout: Duration,
    /// Settings of groups without stored ones.
    defaults: SubscriptionSettings,
    /// Settings of (topic, group) as of this process's latest pull.
    settings: std::sync::Mutex<HashMap<GroupId, SubscriptionSettings>>,
    /// Woken when this process settles something of (topic, group).
    wakers: std::sync::Mutex<HashMap<GroupId, Arc<Notify>>>,
    /// Connections for blocking reads, idle.
    idle: std::sync::Mutex<Vec<MultiplexedConnection>>,
    /// Bounds the blocking reads (each holds a connection).
    blocking: tokio::sync::Semaphore,
    /// Deliveries this process handed out, not yet settled: (topic, group) →
    /// position → delivery.
    outstanding: std::sync::Mutex<HashMap<GroupId, HashMap<u64, Outstanding>>>,
}

/// A delivery handed out by this process.
#[derive(Debug)]
struct Outstanding {
    attempt: u32,
    deadline: Instant,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn backend_error(e: impl std::fmt::Display) -> PubSubError {
    PubSubError::Backend {
        backend: BACKEND,
        reason: e.to_string(),
    }
}

fn redis_error(e: RedisError) -> PubSubError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() || e.is_connection_dropped() {
        PubSubError::Unavailable {
            backend: BACKEND,
            reason: e.to_string(),
        }
    } else {
        backend_error(e)
    }
}

fn bad_reply(what: &str) -> PubSubError {
    backend_error(format!("unexpected reply from Redis: {what}"))
}

fn array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(items) | Value::Set(items) => Some(items),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn position_of(id: &str) -> Result<u64, PubSubError> {
    position(id).ok_or_else(|| backend_error(format!("stream id {id:?} has no position")))
}

/// The event to store in the dead-letter topic.
fn dead_letter_event(
    stored: &[u8],
    reason: &str,
    attempts: u32,
    topic: &str,
    group: &str,
) -> CloudEvent {
    let payload = Bytes::copy_from_slice(stored);
    // The structured JSON, or (not decodable) the bytes as they are.
    let json = Stored::decode(&payload).map_or(payload, |s| s.json);
    crate::dead_letter::dead_letter(
        &json,
        crate::dead_letter::Cause {
            reason,
            attempts,
            topic,
            group,
        },
    )
}

impl RedisPubSub {
    /// Connects to Redis. `name` is the component name, used for the default key
    /// prefix.
    ///
    /// # Errors
    /// [`PubSubError::Unavailable`] if Redis can't be reached within
    /// `connect_timeout`; [`PubSubError::Backend`] for a bad URL.
    pub async fn connect(name: &str, config: &Config) -> Result<Arc<Self>, PubSubError> {
        let client = redis::Client::open(config.url.as_str()).map_err(backend_error)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.connect_timeout))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config)
            .await
            .map_err(redis_error)?;
        let prefix = config
            .key_prefix
            .clone()
            .unwrap_or_else(|| format!("trellis:pubsub:{{{name}}}:"));
        let this = Self {
            client,
            conn,
            keys: KeySpace::new(prefix),
            scripts: Scripts::new(),
            dedupe_window: config.dedupe_window,
            max_len: config.retention_max_len,
            timeout: config.connect_timeout,
            defaults: config.subscriptions.clone(),
            settings: std::sync::Mutex::new(HashMap::new()),
            wakers: std::sync::Mutex::new(HashMap::new()),
            idle: std::sync::Mutex::new(Vec::new()),
            blocking: tokio::sync::Semaphore::new(BLOCKING_READS),
            outstanding: std::sync::Mutex::new(HashMap::new()),
        };
        this.health().await?;
        Ok(Arc::new(this))
    }

    fn max_len_arg(&self) -> u64 {
        self.max_len.unwrap_or(0)
    }

    fn waker(&self, topic: &str, group: &str) -> Arc<Notify> {
        let mut wakers = self
            .wakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            wakers
                .entry((topic.to_owned(), group.to_owned()))
                .or_default(),
        )
    }

    fn wake(&self, topic: &str, group: &str) {
        let wakers = self
            .wakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(waker) = wakers.get(&(topic.to_owned(), group.to_owned())) {
            waker.notify_waiters();
        }
    }

    /// Makes `settings` the subscription's, here and in Redis for other processes.
    async fn remember(
        &self,
        topic: &str,
        group: &str,
        settings: &SubscriptionSettings,
    ) -> Result<(), PubSubError> {
        let id = (topic.to_owned(), group.to_owned());
        let known = self
            .settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            == Some(settings);
        if known {
            return Ok(());
        }
        let json = serde_json::to_string(&StoredSettings::from(settings)).map_err(backend_error)?;
        let _: i64 = redis::cmd("HSET")
            .arg(self.keys.settings(topic))
            .arg(group)
            .arg(json)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        self.settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, settings.clone());
        Ok(())
    }

    /// The subscription's settings: this process's latest pull's, else those stored
    /// by another process's, else the component's defaults.
    async fn settings_of(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<SubscriptionSettings, PubSubError> {
        let id = (topic.to_owned(), group.to_owned());
        if let Some(s) = self
            .settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
        {
            return Ok(s.clone());
        }
        let stored: Option<String> = redis::cmd("HGET")
            .arg(self.keys.settings(topic))
            .arg(group)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        Ok(stored
            .and_then(|json| serde_json::from_str::<StoredSettings>(&json).ok())
            .map_or_else(|| self.defaults.clone(), SubscriptionSettings::from))
    }

    /// One pull script call.
    async fn pull_step(
        &self,
        topic: &str,
        group: &str,
        keys: &GroupKeys,
        settings: &SubscriptionSettings,
        max: usize,
    ) -> Result<Step, PubSubError> {
        let park_cap = (u64::from(settings.max_in_flight) * 2).max(16);
        let mut invocation = self.scripts.pull.prepare_invoke();
        invocation
            .key(&keys.stream)
            .key(&keys.inflight)
            .key(&keys.retry)
            .key(&keys.holders)
            .key(&keys.counters)
            .arg(group)
            .arg(CONSUMER)
            .arg(&keys.queue_prefix)
            .arg(millis(settings.ack_deadline))
            .arg(settings.max_deliveries)
            .arg(millis(settings.min_backoff))
            .arg(millis(settings.max_backoff))
            .arg(settings.max_in_flight)
            .arg(max)
            .arg(park_cap);
        let reply: Value = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        let mut parts = array(reply).ok_or_else(|| bad_reply("pull"))?.into_iter();
        let (Some(handed), Some(dead), Some(wake), Some(watch)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad_reply("pull"));
        };

        let mut deliveries = Vec::new();
        let mut handed = array(handed)
            .ok_or_else(|| bad_reply("pull deliveries"))?
            .into_iter();
        while let (Some(id), Some(attempt), Some(event)) =
            (handed.next(), handed.next(), handed.next())
        {
            let id = text(&id).ok_or_else(|| bad_reply("delivery id"))?;
            let attempt = int(&attempt)
                .and_then(|a| u32::try_from(a).ok())
                .ok_or_else(|| bad_reply("delivery attempt"))?;
            let payload = Bytes::from(bytes(event).ok_or_else(|| bad_reply("delivery event"))?);
            let position = position_of(&id)?;
            let (key, event) = match Stored::decode(&payload) {
                Ok(stored) => (stored.key, stored.json),
                Err(_) => {
                    tracing::error!(
                        topic,
                        group,
                        id,
                        "undecodable message; delivering its raw bytes"
                    );
                    (None, payload)
                }
            };
            deliveries.push(Delivery {
                ack_id: AckId {
                    topic: topic.to_owned(),
                    position,
                    attempt,
                }
                .to_string(),
                attempt,
                position,
                key,
                event,
            });
        }

        let mut dead_letters = Vec::new();
        let mut dead = array(dead)
            .ok_or_else(|| bad_reply("pull dead"))?
            .into_iter();
        while let (Some(id), Some(count), Some(event), Some(why)) =
            (dead.next(), dead.next(), dead.next(), dead.next())
        {
            let expired = text(&why).as_deref() == Some("expired");
            dead_letters.push(DeadLetter {
                id: text(&id).ok_or_else(|| bad_reply("dead id"))?,
                count: int(&count)
                    .and_then(|c| u32::try_from(c).ok())
                    .ok_or_else(|| bad_reply("dead count"))?,
                event: bytes(event).ok_or_else(|| bad_reply("dead event"))?,
                reason: if expired {
                    "ack deadline expired on the last allowed delivery".into()
                } else {
                    "delivered the maximum number of times".into()
                },
                mode: if expired { "expired" } else { "any" },
            });
        }

        let wake = int(&wake)
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis);
        let watch = text(&watch).filter(|w| !w.is_empty());
        Ok(Step {
            deliveries,
            dead: dead_letters,
            wake,
            watch,
        })
    }

    /// Moves a delivery to the dead-letter topic if it is still as the caller saw it;
    /// `false` if it changed meanwhile.
    async fn dead_letter(
        &self,
        topic: &str,
        group: &str,
        keys: &GroupKeys,
        settings: &SubscriptionSettings,
        dead: &DeadLetter,
    ) -> Result<bool, PubSubError> {
        let dlq = dead_letter_topic(topic, settings);
        check_topic(&dlq)?;
        let event = dead_letter_event(&dead.event, &dead.reason, dead.count, topic, group);
        let mut invocation = self.scripts.dead_letter.prepare_invoke();
        invocation
            .key(&keys.stream)
            .key(&keys.inflight)
            .key(&keys.retry)
            .key(&keys.holders)
            .key(&keys.counters)
            .key(self.keys.stream(&dlq))
            .arg(group)
            .arg(&keys.queue_prefix)
            .arg(&dead.id)
            .arg(dead.count)
            .arg(dead.mode)
            .arg(event.ordering_key().unwrap_or(""))
            .arg(event.encode().as_ref())
            .arg(self.max_len_arg());
        let done: i64 = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        if done == 1 {
            metrics::counter!("trellis_pubsub_dead_lettered_total", "topic" => topic.to_owned(), "group" => group.to_owned())
                .increment(1);
            tracing::warn!(topic, group, id = %dead.id, attempts = dead.count, reason = %dead.reason, dead_letter_topic = %dlq, "message dead-lettered");
        }
        Ok(done == 1)
    }

    /// Dead-letters what a pull found; returns how many were.
    async fn dead_letter_all(
        &self,
        topic: &str,
        group: &str,
        keys: &GroupKeys,
        settings: &SubscriptionSettings,
        dead: &[DeadLetter],
    ) -> Result<usize, PubSubError> {
        let mut n = 0;
        for d in dead {
            if self.dead_letter(topic, group, keys, settings, d).await? {
                n += 1;
            }
        }
        if n > 0 {
            self.wake(topic, group);
        }
        Ok(n)
    }

    /// A connection of its own for a blocking read.
    async fn blocking_connection(&self) -> Result<MultiplexedConnection, PubSubError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        if let Some(conn) = idle {
            return Ok(conn);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(MAX_SLICE + self.timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(redis_error)
    }

    /// Returns once `stream` has an entry after `after`, or `block` passed. If this is
    /// cancelled, its connection is dropped (Redis unblocks a closed client). A failed
    /// blocking read just waits out `block`: the next script call reports an
    /// unreachable Redis.
    async fn wait_for_entries(&self, stream: &str, after: &str, block: Duration) {
        let block = block.min(MAX_SLICE);
        let Ok(_permit) = self.blocking.try_acquire() else {
            tokio::time::sleep(block.min(POLL)).await;
            return;
        };
        let mut conn = match self.blocking_connection().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "no connection for a blocking read");
                tokio::time::sleep(block).await;
                return;
            }
        };
        let read: Result<Value, RedisError> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(millis(block).max(1))
            .arg("STREAMS")
            .arg(stream)
            .arg(after)
            .query_async(&mut conn)
            .await;
        match read {
            Ok(_) => {
                let mut idle = self
                    .idle
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if idle.len() < IDLE_CONNECTIONS {
                    idle.push(conn);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "blocking read failed");
                drop(conn);
                tokio::time::sleep(block).await;
            }
        }
    }

    /// Runs a settle script per topic of `ack_ids`, then dead-letters what it says.
    async fn settle(
        &self,
        op: Op,
        group: &str,
        ack_ids: &[String],
        ms: impl Fn(&AckId, &SubscriptionSettings) -> u64,
        reason: &str,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        check_group(group)?;
        let mut outcomes = vec![AckOutcome::NotFound; ack_ids.len()];
        let mut by_topic: HashMap<String, (Vec<usize>, Vec<AckId>)> = HashMap::new();
        for (i, id) in ack_ids.iter().enumerate() {
            if let Some(parsed) = AckId::parse(id).filter(|a| a.attempt > 0) {
                let (at, ids) = by_topic.entry(parsed.topic.clone()).or_default();
                at.push(i);
                ids.push(parsed);
            }
        }
        for (topic, (at, ids)) in by_topic {
            let settings = self.settings_of(&topic, group).await?;
            let ids: Vec<(AckId, u64)> = ids
                .into_iter()
                .map(|id| {
                    let ms = ms(&id, &settings);
                    (id, ms)
                })
                .collect();
            let settled = self
                .settle_topic(op, &topic, group, &settings, &ids, reason)
                .await?;
            self.track_settled(op, &topic, group, &ids, &settled);
            if op != Op::Extend && settled.contains(&AckOutcome::Ok) {
                self.wake(&topic, group);
            }
            for (i, outcome) in at.into_iter().zip(settled) {
                outcomes[i] = outcome;
            }
        }
        Ok(outcomes)
    }

    /// Runs the settle script for deliveries of one topic (each with its delay or
    /// extension in ms), then dead-letters what it says; returns their outcomes in
    /// order.
    async fn settle_topic(
        &self,
        op: Op,
        topic: &str,
        group: &str,
        settings: &SubscriptionSettings,
        ids: &[(AckId, u64)],
        reason: &str,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        let keys = self.keys.group(topic, group);
        let mut invocation = self.scripts.settle.prepare_invoke();
        invocation
            .key(&keys.stream)
            .key(&keys.inflight)
            .key(&keys.retry)
            .key(&keys.holders)
            .key(&keys.counters)
            .arg(op.name())
            .arg(group)
            .arg(&keys.queue_prefix)
            .arg(settings.max_deliveries);
        for (id, ms) in ids {
            invocation
                .arg(stream_id(id.position))
                .arg(id.attempt)
                .arg(ms);
        }
        let reply: Vec<Value> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        if reply.len() != ids.len() * 2 {
            return Err(bad_reply("settle"));
        }
        let mut reply = reply.into_iter();
        let mut outcomes = Vec::with_capacity(ids.len());
        for (id, _) in ids {
            let (Some(code), Some(event)) = (reply.next(), reply.next()) else {
                return Err(bad_reply("settle"));
            };
            outcomes.push(match int(&code) {
                Some(0) => AckOutcome::Ok,
                Some(1) => AckOutcome::NotFound,
                Some(2) => AckOutcome::Expired,
                Some(3) => {
                    let dead = DeadLetter {
                        id: stream_id(id.position),
                        count: id.attempt,
                        event: bytes(event).ok_or_else(|| bad_reply("settle event"))?,
                        reason: reason.to_owned(),
                        mode: if op == Op::Nack { "inflight" } else { "any" },
                    };
                    if self
                        .dead_letter(topic, group, &keys, settings, &dead)
                        .await?
                    {
                        AckOutcome::Ok
                    } else {
                        AckOutcome::Expired
                    }
                }
                _ => return Err(bad_reply("settle code")),
            });
        }
        Ok(outcomes)
    }

    /// Remembers deliveries this process handed out, to return them on `close`.
    fn track_delivered(
        &self,
        topic: &str,
        group: &str,
        settings: &SubscriptionSettings,
        deliveries: &[Delivery],
    ) {
        let now = Instant::now();
        let mut outstanding = self
            .outstanding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = outstanding
            .entry((topic.to_owned(), group.to_owned()))
            .or_default();
        // Those past their deadline are redelivered anyway: forget them.
        if mine.len() >= 64 {
            mine.retain(|_, o| o.deadline > now);
        }
        for d in deliveries {
            mine.insert(
                d.position,
                Outstanding {
                    attempt: d.attempt,
                    deadline: now + settings.ack_deadline,
                },
            );
        }
    }

    /// Forgets settled deliveries; moves extended deadlines.
    fn track_settled(
        &self,
        op: Op,
        topic: &str,
        group: &str,
        ids: &[(AckId, u64)],
        outcomes: &[AckOutcome],
    ) {
        let now = Instant::now();
        let mut outstanding = self
            .outstanding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(mine) = outstanding.get_mut(&(topic.to_owned(), group.to_owned())) else {
            return;
        };
        for ((id, ms), outcome) in ids.iter().zip(outcomes) {
            match mine.get_mut(&id.position) {
                Some(o) if o.attempt == id.attempt => {
                    if op == Op::Extend && *outcome == AckOutcome::Ok {
                        o.deadline = now + Duration::from_millis(*ms);
                    } else if op != Op::Extend {
                        mine.remove(&id.position);
                    }
                }
                _ => {}
            }
        }
    }

    /// Appends one chunk of events (with dedupe).
    async fn publish_chunk(
        &self,
        topic: &str,
        events: &[CloudEvent],
    ) -> Result<Vec<Receipt>, PubSubError> {
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation.key(self.keys.stream(topic));
        for event in events {
            invocation.key(self.keys.dedupe(topic, &event.id));
        }
        invocation
            .arg(millis(self.dedupe_window))
            .arg(self.max_len_arg());
        for event in events {
            invocation
                .arg(event.ordering_key().unwrap_or(""))
                .arg(event.encode().as_ref());
        }
        let reply: Vec<Value> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        if reply.len() != events.len() * 2 {
            return Err(bad_reply("publish"));
        }
        let mut reply = reply.into_iter();
        let mut receipts = Vec::with_capacity(events.len());
        for event in events {
            let (Some(id), Some(duplicate)) = (reply.next(), reply.next()) else {
                return Err(bad_reply("publish"));
            };
            let id = text(&id).ok_or_else(|| bad_reply("publish id"))?;
            receipts.push(Receipt {
                id: event.id.clone(),
                position: position_of(&id)?,
                duplicate: int(&duplicate) == Some(1),
            });
        }
        Ok(receipts)
    }

    /// Reads entries of the replay group on `stream`: its own unacknowledged ones
    /// (`from = "0"`, after a replay cut short) or new ones (`">"`).
    async fn read_dead_letters(
        &self,
        stream: &str,
        from: &str,
    ) -> Result<Vec<(String, Option<(Vec<u8>, Vec<u8>)>)>, PubSubError> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(REPLAY_GROUP)
            .arg(CONSUMER)
            .arg("COUNT")
            .arg(REPLAY_BATCH)
            .arg("STREAMS")
            .arg(stream)
            .arg(from)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        let mut out = Vec::new();
        let streams = array(reply).ok_or_else(|| bad_reply("replay read"))?;
        for s in streams {
            let mut s = array(s)
                .ok_or_else(|| bad_reply("replay stream"))?
                .into_iter();
            let entries = s.nth(1).and_then(array).unwrap_or_default();
            for entry in entries {
                let mut entry = array(entry)
                    .ok_or_else(|| bad_reply("replay entry"))?
                    .into_iter();
                let id = entry
                    .next()
                    .as_ref()
                    .and_then(text)
                    .ok_or_else(|| bad_reply("replay entry id"))?;
                // A deleted entry comes back without fields.
                let fields = entry.next().and_then(array).unwrap_or_default();
                let mut key = Vec::new();
                let mut event = None;
                let mut fields = fields.into_iter();
                while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    match text(&name).as_deref() {
                        Some("k") => key = bytes(value).unwrap_or_default(),
                        Some("e") => event = bytes(value),
                        _ => {}
                    }
                }
                out.push((id, event.map(|e| (key, e))));
            }
        }
        Ok(out)
    }
}

/// A dead letter as it goes back to its topic: without the dead-letter attributes.
fn replayed_event(key: Vec<u8>, stored: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let payload = Bytes::from(stored);
    match Stored::decode(&payload).and_then(|s| crate::dead_letter::revive(&s.json)) {
        Ok(event) => (
            event.ordering_key().unwrap_or("").as_bytes().to_vec(),
            event.encode().to_vec(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "undecodable dead letter; replaying it unchanged");
            (key, payload.to_vec())
        }
    }
}

#[async_trait]
impl PubSub for RedisPubSub {
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
        let mut receipts = Vec::with_capacity(events.len());
        for chunk in events.chunks(PUBLISH_CHUNK) {
            receipts.extend(self.publish_chunk(topic, chunk).await?);
        }
        let fresh = receipts.iter().filter(|r| !r.duplicate).count();
        if fresh > 0 {
            metrics::counter!("trellis_pubsub_published_total", "topic" => topic.to_owned())
                .increment(fresh as u64);
        }
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
        self.remember(topic, group, settings).await?;
        let keys = self.keys.group(topic, group);
        let waker = self.waker(topic, group);
        let deadline = Instant::now() + wait;
        loop {
            let changed = waker.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let step = self
                .pull_step(topic, group, &keys, settings, max.max(1))
                .await?;
            let dead = self
                .dead_letter_all(topic, group, &keys, settings, &step.dead)
                .await;
            if !step.deliveries.is_empty() {
                if let Err(e) = dead {
                    tracing::error!(topic, group, error = %e, "dead-lettering failed; it will be retried");
                }
                self.track_delivered(topic, group, settings, &step.deliveries);
                return Ok(step.deliveries);
            }
            let dead = dead?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            if dead > 0 {
                continue;
            }
            let mut wake = deadline.min(now + MAX_SLICE);
            if let Some(due) = step.wake {
                wake = wake.min(now + due.max(Duration::from_millis(1)));
            }
            match step.watch {
                Some(after) => {
                    tokio::select! {
                        () = self.wait_for_entries(&keys.stream, &after, wake - now) => {}
                        () = &mut changed => {}
                    }
                }
                None => {
                    tokio::select! {
                        () = tokio::time::sleep_until(wake) => {}
                        () = &mut changed => {}
                    }
                }
            }
        }
    }

    async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<Vec<AckOutcome>, PubSubError> {
        self.settle(Op::Ack, group, ack_ids, |_, _| 0, "").await
    }

    async fn nack(
        &self,
        group: &str,
        ack_ids: &[String],
        delay: Option<Duration>,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        self.settle(
            Op::Nack,
            group,
            ack_ids,
            |id, settings| millis(delay.unwrap_or_else(|| backoff(settings, id.attempt))),
            "nacked on the last allowed delivery",
        )
        .await
    }

    async fn extend(
        &self,
        group: &str,
        ack_ids: &[String],
        by: Duration,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        self.settle(Op::Extend, group, ack_ids, |_, _| millis(by), "")
            .await
    }

    async fn reject(
        &self,
        group: &str,
        ack_ids: &[String],
        reason: &str,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        self.settle(Op::Reject, group, ack_ids, |_, _| 0, reason)
            .await
    }

    async fn stats(&self, topic: &str) -> Result<TopicStats, PubSubError> {
        check_topic(topic)?;
        let mut invocation = self.scripts.stats.prepare_invoke();
        invocation
            .key(self.keys.stream(topic))
            .arg(self.keys.inflight_prefix(topic))
            .arg(self.keys.retry_prefix(topic))
            .arg(self.keys.counters_prefix(topic));
        let reply: Vec<Value> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_error)?;
        let mut reply = reply.into_iter();
        let (Some(last), Some(first), Some(groups)) = (reply.next(), reply.next(), reply.next())
        else {
            return Ok(TopicStats {
                topic: topic.to_owned(),
                head: 0,
                start: 0,
                groups: Vec::new(),
            });
        };
        let last = text(&last).ok_or_else(|| bad_reply("stats last id"))?;
        let head = match position_of(&last)? {
            0 => 0,
            p => p.saturating_add(1),
        };
        let first = text(&first).ok_or_else(|| bad_reply("stats first id"))?;
        let start = if first.is_empty() {
            head
        } else {
            position_of(&first)?
        };
        let mut stats = Vec::new();
        for g in array(groups).ok_or_else(|| bad_reply("stats groups"))? {
            let g = array(g).ok_or_else(|| bad_reply("stats group"))?;
            let [
                name,
                pending,
                lag,
                last_delivered,
                smallest,
                in_flight,
                waiting,
                dead,
            ] = <[Value; 8]>::try_from(g).map_err(|_| bad_reply("stats group"))?;
            let count = |v: &Value| int(v).and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
            let last_delivered =
                text(&last_delivered).ok_or_else(|| bad_reply("stats last delivered"))?;
            let mut committed = match position_of(&last_delivered)? {
                0 => 0,
                p => p.saturating_add(1),
            };
            if let Some(smallest) = text(&smallest).filter(|s| !s.is_empty()) {
                committed = committed.min(position_of(&smallest)?);
            }
            stats.push(GroupStats {
                group: text(&name).ok_or_else(|| bad_reply("stats group name"))?,
                committed,
                lag: count(&lag).saturating_add(count(&pending)),
                in_flight: count(&in_flight),
                pending_redelivery: count(&waiting),
                dead_lettered: count(&dead),
            });
        }
        stats.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(TopicStats {
            topic: topic.to_owned(),
            head,
            start,
            groups: stats,
        })
    }

    async fn replay_dead_letters(
        &self,
        topic: &str,
        settings: &SubscriptionSettings,
    ) -> Result<u64, PubSubError> {
        check_topic(topic)?;
        let dlq = dead_letter_topic(topic, settings);
        check_topic(&dlq)?;
        let dlq_stream = self.keys.stream(&dlq);
        let target = self.keys.stream(topic);
        let created: Result<Value, RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&dlq_stream)
            .arg(REPLAY_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => return Err(redis_error(e)),
            _ => {}
        }
        let mut replayed = 0;
        // First what an earlier replay read but did not finish, then the rest.
        let mut from = "0";
        loop {
            let batch = self.read_dead_letters(&dlq_stream, from).await?;
            if batch.is_empty() {
                if from == ">" {
                    return Ok(replayed);
                }
                from = ">";
                continue;
            }
            let mut invocation = self.scripts.replay.prepare_invoke();
            invocation
                .key(&dlq_stream)
                .key(&target)
                .arg(REPLAY_GROUP)
                .arg(self.max_len_arg());
            let mut gone = Vec::new();
            for (id, entry) in batch {
                match entry {
                    Some((key, event)) => {
                        let (key, event) = replayed_event(key, event);
                        invocation.arg(id).arg(key).arg(event);
                    }
                    None => gone.push(id),
                }
            }
            let n: u64 = invocation
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(redis_error)?;
            replayed += n;
            if !gone.is_empty() {
                let _: i64 = redis::cmd("XACK")
                    .arg(&dlq_stream)
                    .arg(REPLAY_GROUP)
                    .arg(&gone)
                    .query_async(&mut self.conn.clone())
                    .await
                    .map_err(redis_error)?;
            }
        }
    }

    async fn health(&self) -> Result<(), PubSubError> {
        let pong = tokio::time::timeout(
            self.timeout,
            redis::cmd("PING").query_async::<String>(&mut self.conn.clone()),
        )
        .await;
        match pong {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(PubSubError::Unavailable {
                backend: BACKEND,
                reason: e.to_string(),
            }),
            Err(_) => Err(PubSubError::Unavailable {
                backend: BACKEND,
                reason: format!("no reply to PING within {:?}", self.timeout),
            }),
        }
    }

    /// Returns the deliveries this process handed out and that are still in flight
    /// for redelivery at once (their consumers go away with it), as the embedded
    /// backend does on a restart.
    async fn close(&self) -> Result<(), PubSubError> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        let outstanding = std::mem::take(
            &mut *self
                .outstanding
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let now = Instant::now();
        let mut result = Ok(());
        for ((topic, group), mine) in outstanding {
            let ids: Vec<(AckId, u64)> = mine
                .into_iter()
                .filter(|(_, o)| o.deadline > now)
                .map(|(position, o)| {
                    let id = AckId {
                        topic: topic.clone(),
                        position,
                        attempt: o.attempt,
                    };
                    (id, 0)
                })
                .collect();
            if ids.is_empty() {
                continue;
            }
            let released = match self.settings_of(&topic, &group).await {
                Ok(settings) => {
                    self.settle_topic(Op::Release, &topic, &group, &settings, &ids, "")
                        .await
                }
                Err(e) => Err(e),
            };
            match released {
                Ok(outcomes) => {
                    let n = outcomes.iter().filter(|o| **o == AckOutcome::Ok).count();
                    tracing::debug!(
                        topic,
                        group,
                        released = n,
                        "in-flight deliveries returned for redelivery"
                    );
                }
                Err(e) => {
                    tracing::warn!(topic, group, error = %e, "returning in-flight deliveries failed; they are redelivered after their deadlines");
                    result = Err(e);
                }
            }
        }
        result
    }
}
