//! The embedded backend: one [`Log`] per topic, consumer-group state in a redb file.
//!
//! ```text
//! <dir>/topics/<topic>/         the topic's log segments
//! <dir>/groups.redb             every group's committed position, settled offsets and
//!                               delivery counts, written (group-committed) before a
//!                               pull returns or an ack is confirmed
//! ```

mod dedupe;
mod group;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{ReadableTable, TableDefinition};
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use trellis_core::config::{EmbeddedPubSub as Config, PublishDurability};
use trellis_storage::log::{self, Log, LogError, LogOptions, Retention};
use trellis_storage::{KvEngine, KvOptions};

use self::dedupe::{Claim, Dedupe};
use self::group::{DeadLetter, GroupState, Msg, Persisted};
use crate::api::{
    AckId, AckOutcome, Delivery, Durability, PubSub, PubSubError, Published, Receipt,
    SubscriptionSettings, TopicStats, check_group, check_topic, dead_letter_topic,
};
use crate::event::{CloudEvent, Defaults, Stored};

const BACKEND: &str = "embedded";
/// `<topic>/<group>` → (version, persisted state).
const GROUPS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("pubsub_groups");
/// The group used to replay dead letters.
const REPLAY_GROUP: &str = "trellis-replay";

/// Settings of an [`EmbeddedPubSub`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EmbeddedOptions {
    /// Fsync before acknowledging a publish, or not.
    pub durability: PublishDurability,
    /// Publisher dedupe window.
    pub dedupe_window: Duration,
    /// What each topic log keeps.
    pub retention: Retention,
    /// Log segment size.
    pub segment_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self::from(&Config::default())
    }
}

impl From<&Config> for EmbeddedOptions {
    fn from(c: &Config) -> Self {
        Self {
            durability: c.durability,
            dedupe_window: c.dedupe_window,
            retention: Retention {
                max_age: c.retention_max_age,
                max_bytes: c.retention_max_bytes.map(|b| b.bytes()),
            },
            segment_bytes: c.segment_bytes.bytes(),
        }
    }
}

#[derive(Debug)]
struct Topic {
    name: String,
    log: Log,
    dedupe: Dedupe,
    groups: Mutex<HashMap<String, Arc<Group>>>,
}

#[derive(Debug)]
struct Group {
    name: String,
    state: Mutex<GroupState>,
    /// Woken when acks or nacks may make something deliverable.
    changed: Notify,
    /// The newest state version known to be on disk.
    persisted: AtomicU64,
    /// The subscription's settings, as of its latest pull.
    settings: std::sync::Mutex<SubscriptionSettings>,
}

impl Group {
    fn settings(&self) -> SubscriptionSettings {
        self.settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_settings(&self, settings: &SubscriptionSettings) {
        let mut current = self
            .settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *current != *settings {
            *current = settings.clone();
        }
    }
}

/// Pub/sub on segment logs in a directory.
#[derive(Debug)]
pub struct EmbeddedPubSub {
    dir: PathBuf,
    options: EmbeddedOptions,
    state: KvEngine,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    retention: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn backend_error(e: impl std::fmt::Display) -> PubSubError {
    PubSubError::Backend {
        backend: BACKEND,
        reason: e.to_string(),
    }
}

impl EmbeddedPubSub {
    /// Opens (or creates) the pub/sub in `dir`. Topics open on first use.
    ///
    /// # Errors
    /// If the group state file can't be opened.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn open(dir: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Arc<Self>, PubSubError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(dir.join("topics")).map_err(backend_error)?;
        let state =
            KvEngine::open(dir.join("groups.redb"), KvOptions::default()).map_err(backend_error)?;
        let this = Arc::new(Self {
            dir,
            options,
            state,
            topics: Mutex::new(HashMap::new()),
            retention: std::sync::Mutex::new(None),
        });
        if this.options.retention != Retention::default() {
            let weak = Arc::downgrade(&this);
            let task = tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_secs(60));
                loop {
                    ticker.tick().await;
                    let Some(this) = weak.upgrade() else { return };
                    let topics: Vec<Arc<Topic>> =
                        this.topics.lock().await.values().cloned().collect();
                    for topic in topics {
                        if let Err(e) = topic.log.enforce_retention(now_ms()) {
                            tracing::warn!(topic = %topic.name, error = %e, "retention failed");
                        }
                    }
                }
            });
            *this
                .retention
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        }
        Ok(this)
    }

    /// The topic, opening its log (and recovering it) on first use.
    async fn topic(&self, name: &str) -> Result<Arc<Topic>, PubSubError> {
        check_topic(name)?;
        let mut topics = self.topics.lock().await;
        if let Some(topic) = topics.get(name) {
            return Ok(Arc::clone(topic));
        }
        let options = LogOptions {
            segment_bytes: self.options.segment_bytes,
            retention: self.options.retention,
            durability: match self.options.durability {
                PublishDurability::Fsync => log::Durability::Fsync,
                PublishDurability::Async => log::Durability::Async {
                    flush_interval: Duration::from_millis(100),
                },
            },
            ..LogOptions::default()
        };
        let path = self.dir.join("topics").join(name);
        let log = tokio::task::spawn_blocking(move || Log::open(path, options))
            .await
            .map_err(backend_error)?
            .map_err(backend_error)?;
        let dedupe = Dedupe::new(self.options.dedupe_window);
        rebuild_dedupe(&log, &dedupe, self.options.dedupe_window).await?;
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            log,
            dedupe,
            groups: Mutex::new(HashMap::new()),
        });
        // Every group that ever read this topic, so stats see them before they pull.
        let prefix = format!("{name}/");
        let stored: Vec<(String, u64, Persisted)> = self
            .state
            .read(move |txn| {
                let table = match txn.open_table(GROUPS) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                    Err(e) => return Err(e.into()),
                };
                let mut out = Vec::new();
                for entry in table.range::<&str>(prefix.as_str()..)? {
                    let (k, v) = entry?;
                    let Some(group) = k.value().strip_prefix(prefix.as_str()) else {
                        break;
                    };
                    let bytes = v.value();
                    let version = bytes
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_le_bytes);
                    if let Some(p) = bytes.get(8..).and_then(Persisted::decode) {
                        out.push((group.to_owned(), version, p));
                    }
                }
                Ok(out)
            })
            .await
            .map_err(backend_error)?;
        {
            let mut groups = topic.groups.lock().await;
            for (group, version, persisted) in stored {
                // Versions continue from the stored one: a snapshot is written only
                // if it is newer than the one stored.
                let mut state = GroupState::restore(persisted);
                state.version = version;
                groups.insert(group.clone(), Arc::new(new_group(group, state)));
            }
        }
        topics.insert(name.to_owned(), Arc::clone(&topic));
        Ok(topic)
    }

    async fn group(&self, topic: &Topic, name: &str) -> Result<Arc<Group>, PubSubError> {
        check_group(name)?;
        let mut groups = topic.groups.lock().await;
        Ok(Arc::clone(groups.entry(name.to_owned()).or_insert_with(
            || Arc::new(new_group(name.to_owned(), GroupState::default())),
        )))
    }

    /// Writes the group's state if it changed since last written; returns once durable.
    async fn persist(&self, topic: &Topic, group: &Group) -> Result<(), PubSubError> {
        let (version, blob) = {
            let state = group.state.lock().await;
            (state.version, state.persisted().encode())
        };
        if version <= group.persisted.load(Ordering::Acquire) {
            return Ok(());
        }
        let key = format!("{}/{}", topic.name, group.name);
        self.state
            .write(move |txn| {
                let mut table = txn.open_table(GROUPS)?;
                let stored = table
                    .get(key.as_str())?
                    .and_then(|v| {
                        v.value()
                            .get(..8)
                            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                    })
                    .unwrap_or(0);
                // A newer snapshot already written includes everything in this one.
                if stored < version {
                    let mut value = version.to_le_bytes().to_vec();
                    value.extend_from_slice(&blob);
                    table.insert(key.as_str(), value.as_slice())?;
                }
                Ok(())
            })
            .await
            .map_err(backend_error)?;
        group.persisted.fetch_max(version, Ordering::AcqRel);
        Ok(())
    }

    /// Appends events without dedupe (dead letters, replays).
    async fn append(
        &self,
        topic: &Topic,
        events: &[CloudEvent],
    ) -> Result<log::Appended, PubSubError> {
        topic
            .log
            .append(events.iter().map(CloudEvent::encode).collect())
            .await
            .map_err(|e| match e {
                LogError::TooLarge(n) => PubSubError::TooLarge(n),
                e => backend_error(e),
            })
    }

    /// Stores dead letters in the dead-letter topic, then settles them.
    async fn store_dead_letters(
        &self,
        topic: &Topic,
        group: &Group,
        dead: Vec<DeadLetter>,
        settings: &SubscriptionSettings,
    ) {
        if dead.is_empty() {
            return;
        }
        let dlq_name = dead_letter_topic(&topic.name, settings);
        let events: Vec<CloudEvent> = dead
            .iter()
            .map(|d| {
                crate::dead_letter::dead_letter(
                    &d.msg.json,
                    crate::dead_letter::Cause {
                        reason: &d.reason,
                        attempts: d.attempts,
                        topic: &topic.name,
                        group: &group.name,
                    },
                )
            })
            .collect();
        let stored = match self.topic(&dlq_name).await {
            Ok(dlq) => self.append(&dlq, &events).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let mut state = group.state.lock().await;
        match stored {
            Ok(()) => {
                metrics::counter!("trellis_pubsub_dead_lettered_total", "topic" => topic.name.clone(), "group" => group.name.clone())
                    .increment(dead.len() as u64);
                for d in &dead {
                    tracing::warn!(topic = %topic.name, group = %group.name, position = d.msg.offset, attempts = d.attempts, reason = %d.reason, "message dead-lettered");
                    state.dead_lettered(d.msg.offset);
                }
            }
            Err(e) => {
                tracing::error!(topic = %topic.name, error = %e, "storing dead letters failed; they will be retried");
                let now = Instant::now();
                for d in dead {
                    state.dead_letter_failed(d, now);
                }
            }
        }
    }

    /// Applies `f` to each ack id's group state, per topic, then persists and wakes
    /// pullers. Returns outcomes in order and dead letters to store.
    async fn settle<F>(
        &self,
        group: &str,
        ack_ids: &[String],
        mut f: F,
    ) -> Result<Vec<AckOutcome>, PubSubError>
    where
        F: FnMut(
            &mut GroupState,
            &AckId,
            &SubscriptionSettings,
        ) -> (AckOutcome, Option<DeadLetter>),
    {
        let mut outcomes = vec![AckOutcome::NotFound; ack_ids.len()];
        let mut by_topic: HashMap<String, Vec<(usize, AckId)>> = HashMap::new();
        for (i, id) in ack_ids.iter().enumerate() {
            if let Some(parsed) = AckId::parse(id) {
                by_topic
                    .entry(parsed.topic.clone())
                    .or_default()
                    .push((i, parsed));
            }
        }
        for (topic_name, ids) in by_topic {
            let topic = self.topic(&topic_name).await?;
            let handle = self.group(&topic, group).await?;
            let settings = handle.settings();
            let mut dead = Vec::new();
            {
                let mut state = handle.state.lock().await;
                for (i, id) in &ids {
                    let (outcome, dead_letter) = f(&mut state, id, &settings);
                    outcomes[*i] = outcome;
                    dead.extend(dead_letter);
                }
            }
            self.store_dead_letters(&topic, &handle, dead, &settings)
                .await;
            self.persist(&topic, &handle).await?;
            handle.changed.notify_waiters();
        }
        Ok(outcomes)
    }
}

fn new_group(name: String, state: GroupState) -> Group {
    let version = state.version;
    Group {
        name,
        state: Mutex::new(state),
        changed: Notify::new(),
        persisted: AtomicU64::new(version),
        settings: std::sync::Mutex::new(SubscriptionSettings::default()),
    }
}

/// Remembers the ids published within the window, from the log's recent records.
async fn rebuild_dedupe(log: &Log, dedupe: &Dedupe, window: Duration) -> Result<(), PubSubError> {
    if window.is_zero() {
        return Ok(());
    }
    let horizon = now_ms().saturating_sub(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
    // Bounded look-back: at most the last million records.
    let mut from = log.start().max(log.end().saturating_sub(1_000_000));
    while from < log.end() {
        let records = match log.read(from, 10_000, 16 << 20).await {
            Ok(r) => r,
            Err(LogError::Trimmed { start, .. }) => {
                from = start;
                continue;
            }
            Err(e) => return Err(backend_error(e)),
        };
        let Some(last) = records.last() else { break };
        from = last.offset + 1;
        for record in records {
            if record.timestamp_ms >= horizon
                && let Ok(stored) = Stored::decode(&record.payload)
            {
                dedupe.remember(stored.id, record.offset, record.timestamp_ms);
            }
        }
    }
    Ok(())
}

fn to_msg(record: log::Record) -> Msg {
    match Stored::decode(&record.payload) {
        Ok(stored) => Msg {
            offset: record.offset,
            key: stored.key,
            json: stored.json,
        },
        Err(_) => {
            tracing::error!(
                position = record.offset,
                "undecodable message; delivering its raw bytes"
            );
            Msg {
                offset: record.offset,
                key: None,
                json: record.payload,
            }
        }
    }
}

#[async_trait]
impl PubSub for EmbeddedPubSub {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn publish(
        &self,
        topic: &str,
        events: Vec<CloudEvent>,
    ) -> Result<Published, PubSubError> {
        let topic = self.topic(topic).await?;
        let now = now_ms();
        let mut receipts: Vec<Option<Receipt>> = vec![None; events.len()];
        let mut fresh = Vec::new();
        let mut waits = Vec::new();
        for (i, event) in events.iter().enumerate() {
            event.validate()?;
            match topic.dedupe.claim(&event.id, now) {
                Claim::New(tx) => fresh.push((i, tx)),
                Claim::Duplicate(position) => {
                    receipts[i] = Some(Receipt {
                        id: event.id.clone(),
                        position,
                        duplicate: true,
                    });
                }
                Claim::Wait(rx) => waits.push((i, rx)),
            }
        }
        let mut durability = match self.options.durability {
            PublishDurability::Fsync => Durability::Fsync,
            PublishDurability::Async => Durability::Async,
        };
        if !fresh.is_empty() {
            let payloads: Vec<Bytes> = fresh.iter().map(|(i, _)| events[*i].encode()).collect();
            match topic.log.append(payloads).await {
                Ok(appended) => {
                    if !appended.durable {
                        durability = Durability::Async;
                    }
                    for (k, (i, tx)) in fresh.iter().enumerate() {
                        let position = appended.first_offset + k as u64;
                        topic.dedupe.done(&events[*i].id, position, tx);
                        receipts[*i] = Some(Receipt {
                            id: events[*i].id.clone(),
                            position,
                            duplicate: false,
                        });
                    }
                }
                Err(e) => {
                    for (i, tx) in &fresh {
                        topic.dedupe.failed(&events[*i].id, tx);
                    }
                    return Err(match e {
                        LogError::TooLarge(n) => PubSubError::TooLarge(n),
                        e => backend_error(e),
                    });
                }
            }
            metrics::counter!("trellis_pubsub_published_total", "topic" => topic.name.clone())
                .increment(fresh.len() as u64);
        }
        for (i, mut rx) in waits {
            let position = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| v.flatten())
                .ok_or_else(|| {
                    backend_error("a concurrent publish of the same id failed; publish again")
                })?;
            receipts[i] = Some(Receipt {
                id: events[i].id.clone(),
                position,
                duplicate: true,
            });
        }
        Ok(Published {
            receipts: receipts.into_iter().flatten().collect(),
            durability,
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
        let topic = self.topic(topic).await?;
        let handle = self.group(&topic, group).await?;
        handle.set_settings(settings);
        let deadline = Instant::now() + wait;
        let mut end = topic.log.watch_end();
        loop {
            let changed = handle.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            end.borrow_and_update();
            let now = Instant::now();
            let (handed, dead, next_due) = {
                let mut state = handle.state.lock().await;
                let mut dead = state.expire(now, settings);
                dead.extend(state.overdue_dead_letters(now, settings));
                let want = state.wants(settings);
                if want > 0 && state.next_read() < topic.log.end() {
                    match topic.log.read(state.next_read(), want, 8 << 20).await {
                        Ok(records) => state.offer(records.into_iter().map(to_msg).collect()),
                        Err(LogError::Trimmed { start, .. }) => state.skip_to(start),
                        Err(e) => return Err(backend_error(e)),
                    }
                }
                let handed = state.take(now, settings, max.max(1));
                (handed, dead, state.next_due())
            };
            self.store_dead_letters(&topic, &handle, dead, settings)
                .await;
            if !handed.is_empty() {
                self.persist(&topic, &handle).await?;
                return Ok(handed
                    .into_iter()
                    .map(|h| Delivery {
                        ack_id: AckId {
                            topic: topic.name.clone(),
                            position: h.msg.offset,
                            attempt: h.attempt,
                        }
                        .to_string(),
                        attempt: h.attempt,
                        position: h.msg.offset,
                        key: h.msg.key,
                        event: h.msg.json,
                    })
                    .collect());
            }
            if now >= deadline {
                self.persist(&topic, &handle).await?;
                return Ok(Vec::new());
            }
            let wake = next_due
                .map_or(deadline, |due| due.min(deadline))
                .max(now + Duration::from_millis(1));
            tokio::select! {
                _ = end.changed() => {}
                () = &mut changed => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn ack(&self, group: &str, ack_ids: &[String]) -> Result<Vec<AckOutcome>, PubSubError> {
        self.settle(group, ack_ids, |state, id, _| {
            (state.ack(id.position, id.attempt), None)
        })
        .await
    }

    async fn nack(
        &self,
        group: &str,
        ack_ids: &[String],
        delay: Option<Duration>,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        let now = Instant::now();
        self.settle(group, ack_ids, |state, id, settings| {
            state.nack(id.position, id.attempt, delay, now, settings)
        })
        .await
    }

    async fn extend(
        &self,
        group: &str,
        ack_ids: &[String],
        by: Duration,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        let now = Instant::now();
        self.settle(group, ack_ids, |state, id, _| {
            (state.extend(id.position, id.attempt, by, now), None)
        })
        .await
    }

    async fn reject(
        &self,
        group: &str,
        ack_ids: &[String],
        reason: &str,
    ) -> Result<Vec<AckOutcome>, PubSubError> {
        self.settle(group, ack_ids, |state, id, _| {
            state.reject(id.position, id.attempt, reason)
        })
        .await
    }

    async fn stats(&self, topic: &str) -> Result<TopicStats, PubSubError> {
        let topic = self.topic(topic).await?;
        let head = topic.log.end();
        let groups: Vec<Arc<Group>> = topic.groups.lock().await.values().cloned().collect();
        let mut stats = Vec::with_capacity(groups.len());
        for g in groups {
            stats.push(g.state.lock().await.stats(&g.name, head));
        }
        stats.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(TopicStats {
            topic: topic.name.clone(),
            head,
            start: topic.log.start(),
            groups: stats,
        })
    }

    async fn replay_dead_letters(
        &self,
        topic: &str,
        settings: &SubscriptionSettings,
    ) -> Result<u64, PubSubError> {
        let target = self.topic(topic).await?;
        let dlq = dead_letter_topic(topic, settings);
        let replay = SubscriptionSettings {
            max_in_flight: 10_000,
            ..SubscriptionSettings::default()
        };
        let mut replayed = 0;
        loop {
            let batch = self
                .pull(&dlq, REPLAY_GROUP, &replay, 500, Duration::ZERO)
                .await?;
            if batch.is_empty() {
                return Ok(replayed);
            }
            let mut events = Vec::with_capacity(batch.len());
            for d in &batch {
                let event = crate::dead_letter::revive(&d.event).map_err(backend_error)?;
                events.push(event);
            }
            // Bypasses dedupe: the ids were seen before, on purpose.
            self.append(&target, &events).await?;
            let ids: Vec<String> = batch.iter().map(|d| d.ack_id.clone()).collect();
            self.ack(REPLAY_GROUP, &ids).await?;
            replayed += batch.len() as u64;
        }
    }

    async fn health(&self) -> Result<(), PubSubError> {
        self.state
            .read(|_| Ok(()))
            .await
            .map_err(|e| PubSubError::Unavailable {
                backend: BACKEND,
                reason: e.to_string(),
            })
    }

    async fn close(&self) -> Result<(), PubSubError> {
        if let Some(task) = self
            .retention
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
        let topics: Vec<Arc<Topic>> = self.topics.lock().await.drain().map(|(_, t)| t).collect();
        for topic in topics {
            topic.log.close().await.map_err(backend_error)?;
        }
        self.state.close().await.map_err(backend_error)
    }
}

/// Defaults for events published without `source`/`type`.
pub fn default_attributes() -> Defaults {
    Defaults {
        source: "/trellis".into(),
        ty: "trellis.published".into(),
    }
}
