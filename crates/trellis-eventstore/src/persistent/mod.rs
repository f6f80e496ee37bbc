//! Persistent subscriptions: server-side consumer groups over `$all`, a category or a
//! stream, with a checkpoint kept in the store, acks and nacks, retries, and parking
//! of events that keep failing (EventStoreDB's "competing consumers").
//!
//! Consumers of a group share its events: each [`read`](PersistentSubscriptions::read)
//! hands out deliveries that no one else holds, each to be acked within the group's
//! `ack_timeout`. A nacked or timed-out delivery is retried after `retry_delay`;
//! after `max_retries` failures (or a nack with [`NackAction::Park`]) the event is
//! copied to the group's parked stream `trellis-parked-<group>` and settled.
//! [`replay_parked`](PersistentSubscriptions::replay_parked) delivers the parked
//! events to the group again.
//!
//! # What survives a restart
//! Definitions are events in the stream `trellis-persistent-subscriptions`, so they
//! come back on open. A group's checkpoint (everything before it is settled) is
//! stored after each ack or nack call that moves it; deliveries above it that were
//! in flight or acked but not yet below the checkpoint are delivered again after a
//! restart (at least once). Retry counts and a replay in progress are in memory.
//!
//! Consumers of a group must use one Trellis process: the shared state is in it.

mod state;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use self::state::{GroupState, Parked};
pub use self::state::{NackAction, Settings, Settled};
use crate::event::Invalid;
use crate::subscription::{Source, Start};
use crate::{
    Append, Direction, EventData, EventStore, EventStoreError, ExpectedVersion, Metadata,
    ReadStream, RecordedEvent, StreamName,
};

/// The stream holding subscription definitions.
const DEFINITIONS: &str = "trellis-persistent-subscriptions";
/// Events read from the store per refill.
const PAGE: usize = 256;
/// Longest a read may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// One delivery to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Acks or nacks this delivery.
    pub ack_id: String,
    /// 1 for the first delivery of the event.
    pub attempt: u32,
    /// Whether it comes from the parked stream (a replay).
    pub replayed: bool,
    /// The event, as in its stream.
    pub event: RecordedEvent,
}

/// What happened to one ack id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Malformed, or of another group.
    NotFound,
    /// Settled already, or superseded by a retry.
    Stale,
}

/// A group's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group.
    pub name: String,
    /// What it follows.
    pub source: Source,
    /// Its settings.
    pub settings: Settings,
    /// Everything before this cursor is settled.
    pub checkpoint: u64,
    /// Deliveries awaiting an ack.
    pub in_flight: usize,
    /// Deliveries waiting to be retried.
    pub retrying: usize,
    /// Events parked since start.
    pub parked: u64,
}

#[derive(Debug)]
struct Group {
    name: String,
    source: Source,
    settings: Settings,
    state: Mutex<GroupState>,
    /// Parked events being delivered again, by their version in the parked stream.
    replay: Mutex<Option<Replay>>,
    /// Woken when acks or nacks may make something deliverable.
    changed: Notify,
    /// Serializes reads from the store into the state, so they are offered in order.
    reading: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Replay {
    state: GroupState,
    /// Parked-stream versions below this are replayed (those parked since, not).
    until: u64,
}

impl Group {
    fn state(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn replay(&self) -> std::sync::MutexGuard<'_, Option<Replay>> {
        self.replay.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checkpoint_name(&self) -> String {
        format!("persistent-subscription:{}", self.name)
    }

    fn parked_stream(&self) -> Result<StreamName, EventStoreError> {
        Ok(StreamName::new(format!("trellis-parked-{}", self.name))?)
    }

    /// The cursor of an event of this group's source.
    fn cursor(&self, event: &RecordedEvent) -> u64 {
        match self.source {
            Source::Stream(_) => event.version,
            Source::All | Source::Category(_) => event.position,
        }
    }
}

/// The persistent subscriptions of one event store.
#[derive(Debug)]
pub struct PersistentSubscriptions {
    store: Arc<dyn EventStore>,
    groups: Mutex<BTreeMap<String, Arc<Group>>>,
}

fn checked_name(name: &str) -> Result<(), EventStoreError> {
    let ok = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Invalid(format!(
            "invalid subscription group name {name:?}: use 1-128 of A-Z, a-z, 0-9, '.', '_' and '-'"
        ))
        .into())
    }
}

fn source_json(source: &Source) -> Value {
    match source {
        Source::All => json!({ "all": true }),
        Source::Stream(s) => json!({ "stream": s.as_str() }),
        Source::Category(c) => json!({ "category": c }),
    }
}

fn source_of(value: &Value) -> Option<Source> {
    if value["all"].as_bool() == Some(true) {
        return Some(Source::All);
    }
    if let Some(s) = value["stream"].as_str() {
        return StreamName::new(s).ok().map(Source::Stream);
    }
    value["category"]
        .as_str()
        .map(|c| Source::Category(c.to_owned()))
}

fn settings_json(s: &Settings) -> Value {
    json!({
        "ack_timeout_ms": s.ack_timeout.as_millis() as u64,
        "max_retries": s.max_retries,
        "max_in_flight": s.max_in_flight,
        "retry_delay_ms": s.retry_delay.as_millis() as u64,
    })
}

fn settings_of(value: &Value) -> Settings {
    let d = Settings::default();
    let ms =
        |name: &str, default: Duration| value[name].as_u64().map_or(default, Duration::from_millis);
    Settings {
        ack_timeout: ms("ack_timeout_ms", d.ack_timeout),
        max_retries: value["max_retries"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(d.max_retries),
        max_in_flight: value["max_in_flight"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(d.max_in_flight),
        retry_delay: ms("retry_delay_ms", d.retry_delay),
    }
}

/// `<group>:<r|p>:<cursor>:<attempt>` (`p`: a replayed parked event).
fn ack_id(group: &str, replayed: bool, cursor: u64, attempt: u32) -> String {
    format!(
        "{group}:{}:{cursor}:{attempt}",
        if replayed { 'p' } else { 'r' }
    )
}

fn parse_ack_id(id: &str) -> Option<(&str, bool, u64, u32)> {
    let mut parts = id.rsplitn(4, ':');
    let attempt = parts.next()?.parse().ok()?;
    let cursor = parts.next()?.parse().ok()?;
    let replayed = match parts.next()? {
        "p" => true,
        "r" => false,
        _ => return None,
    };
    Some((parts.next()?, replayed, cursor, attempt))
}

impl PersistentSubscriptions {
    /// Loads every defined group of `store`.
    ///
    /// # Errors
    /// If the definitions can't be read.
    pub async fn open(store: Arc<dyn EventStore>) -> Result<Self, EventStoreError> {
        let this = Self {
            store,
            groups: Mutex::new(BTreeMap::new()),
        };
        let definitions = StreamName::new(DEFINITIONS)?;
        let mut defined: BTreeMap<String, (Source, Settings, u64)> = BTreeMap::new();
        let mut from = 0;
        loop {
            let read = ReadStream {
                from: Some(from),
                limit: 1000,
                ..ReadStream::default()
            };
            let slice = match this.store.read_stream(&definitions, read).await {
                Ok(slice) => slice,
                Err(EventStoreError::StreamNotFound(_)) => break,
                Err(e) => return Err(e),
            };
            for event in &slice.events {
                let Some(value) = event.data.to_value() else {
                    continue;
                };
                let Some(name) = value["name"].as_str() else {
                    continue;
                };
                match event.ty.as_str() {
                    "SubscriptionDefined" => {
                        if let Some(source) = source_of(&value["source"]) {
                            let start = value["start"].as_u64().unwrap_or(0);
                            defined.insert(
                                name.to_owned(),
                                (source, settings_of(&value["settings"]), start),
                            );
                        }
                    }
                    "SubscriptionDeleted" => {
                        defined.remove(name);
                    }
                    _ => {}
                }
            }
            match slice.next {
                Some(next) => from = next,
                None => break,
            }
        }
        for (name, (source, settings, start)) in defined {
            let group = this.load(name.clone(), source, settings, start).await?;
            this.groups().insert(name, group);
        }
        Ok(this)
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Group>>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn load(
        &self,
        name: String,
        source: Source,
        settings: Settings,
        start: u64,
    ) -> Result<Arc<Group>, EventStoreError> {
        let checkpoint = self
            .store
            .load_checkpoint(&format!("persistent-subscription:{name}"))
            .await?
            .unwrap_or(start);
        Ok(Arc::new(Group {
            name,
            source,
            settings,
            state: Mutex::new(GroupState::new(checkpoint)),
            replay: Mutex::new(None),
            changed: Notify::new(),
            reading: tokio::sync::Mutex::new(()),
        }))
    }

    /// Defines a group (or changes its settings); `true` if it is new. A group's
    /// source can't change: delete it and define it anew.
    ///
    /// # Errors
    /// An invalid name, a different source for an existing group, or a store failure.
    pub async fn define(
        &self,
        name: &str,
        source: Source,
        start: Start,
        settings: Settings,
    ) -> Result<bool, EventStoreError> {
        checked_name(name)?;
        let existing = self.groups().get(name).cloned();
        if let Some(group) = &existing {
            if group.source != source {
                return Err(Invalid(format!(
                    "subscription group {name:?} follows another source; delete it first"
                ))
                .into());
            }
            if group.settings == settings {
                return Ok(false);
            }
        }
        let start = match (&existing, start) {
            (Some(group), _) => group.state().checkpoint(),
            (None, Start::Beginning) => 0,
            (None, Start::At(at)) => at,
            (None, Start::End) => match &source {
                Source::All | Source::Category(_) => *self.store.head().borrow(),
                Source::Stream(stream) => match self.store.stream_info(stream).await? {
                    Some(info) => info.version.map_or(0, |v| v + 1),
                    None => 0,
                },
            },
        };
        let event = EventData::json(
            "SubscriptionDefined",
            &json!({ "name": name, "source": source_json(&source), "start": start, "settings": settings_json(&settings) }),
        );
        self.store
            .append(vec![Append {
                stream: StreamName::new(DEFINITIONS)?,
                expected: ExpectedVersion::Any,
                events: vec![event],
            }])
            .await?;
        let group = self.load(name.to_owned(), source, settings, start).await?;
        self.groups().insert(name.to_owned(), group);
        Ok(existing.is_none())
    }

    /// Deletes a group; `false` if there was none. Its checkpoint and parked stream
    /// stay (defining it again resumes from the checkpoint).
    ///
    /// # Errors
    /// If the deletion can't be stored.
    pub async fn delete(&self, name: &str) -> Result<bool, EventStoreError> {
        if !self.groups().contains_key(name) {
            return Ok(false);
        }
        let event = EventData::json("SubscriptionDeleted", &json!({ "name": name }));
        self.store
            .append(vec![Append {
                stream: StreamName::new(DEFINITIONS)?,
                expected: ExpectedVersion::Any,
                events: vec![event],
            }])
            .await?;
        Ok(self.groups().remove(name).is_some())
    }

    /// Every group's figures.
    pub fn list(&self) -> Vec<GroupInfo> {
        self.groups().values().map(|g| info(g)).collect()
    }

    /// One group's figures.
    pub fn info(&self, name: &str) -> Option<GroupInfo> {
        self.groups().get(name).map(|g| info(g))
    }

    fn group(&self, name: &str) -> Result<Arc<Group>, EventStoreError> {
        self.groups()
            .get(name)
            .cloned()
            .ok_or_else(|| EventStoreError::SubscriptionNotFound(name.to_owned()))
    }

    /// Whether a group exists.
    pub fn exists(&self, name: &str) -> bool {
        self.groups().contains_key(name)
    }

    /// Up to `max` deliveries for a consumer of group `name`, waiting up to `wait`
    /// for the first.
    ///
    /// # Errors
    /// An unknown group, or a store failure.
    pub async fn read(
        &self,
        name: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, EventStoreError> {
        let group = self.group(name)?;
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        let mut head = self.store.head();
        loop {
            let changed = group.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            head.borrow_and_update();
            let now = Instant::now();
            let parked = group.state().expire(now, &group.settings);
            self.park(&group, parked, false).await;
            let replay_parked = group
                .replay()
                .as_mut()
                .map(|r| r.state.expire(now, &group.settings))
                .unwrap_or_default();
            self.park(&group, replay_parked, true).await;
            self.refill(&group).await?;
            let mut out = Vec::new();
            if let Some(replay) = group.replay().as_mut() {
                for (cursor, event, attempt) in replay.state.take(now, &group.settings, max) {
                    out.push(Delivery {
                        ack_id: ack_id(name, true, cursor, attempt),
                        attempt,
                        replayed: true,
                        event,
                    });
                }
            }
            let room = max.saturating_sub(out.len());
            for (cursor, event, attempt) in group.state().take(now, &group.settings, room) {
                out.push(Delivery {
                    ack_id: ack_id(name, false, cursor, attempt),
                    attempt,
                    replayed: false,
                    event,
                });
            }
            if !out.is_empty() || now >= deadline {
                return Ok(out);
            }
            let due = [
                group.state().next_due(),
                group.replay().as_ref().and_then(|r| r.state.next_due()),
            ]
            .into_iter()
            .flatten()
            .min();
            let wake = due
                .map_or(deadline, |d| d.min(deadline))
                .max(now + Duration::from_millis(1));
            tokio::select! {
                _ = head.changed() => {}
                () = &mut changed => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Reads more events from the store into the group (and the replay), if it wants.
    async fn refill(&self, group: &Group) -> Result<(), EventStoreError> {
        let _reading = group.reading.lock().await;
        let (want, from) = {
            let state = group.state();
            (state.wants(&group.settings).min(PAGE), state.next_read())
        };
        if want > 0 {
            let events = match &group.source {
                Source::All => self.store.read_all(from, want).await?,
                Source::Category(c) => self.store.read_category(c, from, want).await?,
                Source::Stream(stream) => {
                    let read = ReadStream {
                        from: Some(from),
                        limit: want,
                        direction: Direction::Forward,
                        as_of: None,
                    };
                    match self.store.read_stream(stream, read).await {
                        Ok(slice) => slice.events,
                        Err(EventStoreError::StreamNotFound(_)) => Vec::new(),
                        Err(e) => return Err(e),
                    }
                }
            };
            // A group on `$all` doesn't see Trellis's own streams (its definitions
            // and parked copies), as EventStoreDB's filter hides `$` streams.
            let internal = matches!(group.source, Source::All);
            group.state().offer(
                events,
                |e| group.cursor(e),
                |e| !(internal && e.stream.is_internal()),
            );
        }
        let replay_from = group
            .replay()
            .as_ref()
            .filter(|r| r.state.next_read() < r.until)
            .map(|r| {
                (
                    r.state.wants(&group.settings).min(PAGE),
                    r.state.next_read(),
                    r.until,
                )
            });
        if let Some((want, from, until)) = replay_from
            && want > 0
        {
            let read = ReadStream {
                from: Some(from),
                limit: want,
                direction: Direction::Forward,
                as_of: None,
            };
            let events = match self.store.read_stream(&group.parked_stream()?, read).await {
                Ok(slice) => slice.events,
                Err(EventStoreError::StreamNotFound(_)) => Vec::new(),
                Err(e) => return Err(e),
            };
            let events: Vec<RecordedEvent> =
                events.into_iter().filter(|e| e.version < until).collect();
            if let Some(replay) = group.replay().as_mut() {
                // Parked copies are delivered as the original events, keyed by their
                // version in the parked stream.
                let originals: Vec<(u64, RecordedEvent)> =
                    events.into_iter().map(|e| (e.version, unpark(e))).collect();
                for (cursor, original) in originals {
                    replay.state.offer_at(cursor, original);
                }
            }
        }
        Ok(())
    }

    /// Stores parked events in the parked stream, then settles them.
    async fn park(&self, group: &Group, parked: Vec<(u64, Parked)>, replayed: bool) {
        if parked.is_empty() {
            return;
        }
        let events: Vec<EventData> = parked.iter().map(|(_, p)| to_parked(p)).collect();
        let stored = match group.parked_stream() {
            Ok(stream) => self
                .store
                .append(vec![Append {
                    stream,
                    expected: ExpectedVersion::Any,
                    events,
                }])
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        let now = Instant::now();
        for (cursor, p) in parked {
            let ok = stored.is_ok();
            if !ok {
                tracing::error!(group = %group.name, cursor, "storing a parked event failed; it will be retried");
            } else {
                tracing::warn!(group = %group.name, cursor, attempts = p.attempts, reason = %p.reason, "event parked");
            }
            let apply = |state: &mut GroupState| {
                if ok {
                    state.parked(cursor)
                } else {
                    state.park_failed(cursor, p, now, &group.settings)
                }
            };
            if replayed {
                if let Some(replay) = group.replay().as_mut() {
                    apply(&mut replay.state);
                }
            } else {
                apply(&mut group.state());
            }
        }
    }

    /// Acknowledges deliveries of group `name`.
    ///
    /// # Errors
    /// An unknown group, or a failure to store the checkpoint.
    pub async fn ack(
        &self,
        name: &str,
        ack_ids: &[String],
    ) -> Result<Vec<Outcome>, EventStoreError> {
        self.settle(name, ack_ids, |state, cursor, attempt, _| {
            (state.ack(cursor, attempt), None)
        })
        .await
    }

    /// Nacks deliveries of group `name`: retry, park or skip them.
    ///
    /// # Errors
    /// An unknown group, or a failure to store the checkpoint.
    pub async fn nack(
        &self,
        name: &str,
        ack_ids: &[String],
        action: NackAction,
    ) -> Result<Vec<Outcome>, EventStoreError> {
        let now = Instant::now();
        self.settle(name, ack_ids, |state, cursor, attempt, settings| {
            state.nack(cursor, attempt, action, now, settings)
        })
        .await
    }

    async fn settle<F>(
        &self,
        name: &str,
        ack_ids: &[String],
        mut f: F,
    ) -> Result<Vec<Outcome>, EventStoreError>
    where
        F: FnMut(&mut GroupState, u64, u32, &Settings) -> (Settled, Option<Parked>),
    {
        let group = self.group(name)?;
        let before = group.state().checkpoint();
        let mut outcomes = Vec::with_capacity(ack_ids.len());
        let (mut parked, mut parked_replayed) = (Vec::new(), Vec::new());
        for id in ack_ids {
            let Some((of, replayed, cursor, attempt)) =
                parse_ack_id(id).filter(|(of, ..)| *of == name)
            else {
                outcomes.push(Outcome::NotFound);
                continue;
            };
            debug_assert_eq!(of, name);
            let (settled, p) = if replayed {
                match group.replay().as_mut() {
                    Some(replay) => f(&mut replay.state, cursor, attempt, &group.settings),
                    None => (Settled::Stale, None),
                }
            } else {
                f(&mut group.state(), cursor, attempt, &group.settings)
            };
            if let Some(p) = p {
                if replayed {
                    parked_replayed.push((cursor, p))
                } else {
                    parked.push((cursor, p))
                }
            }
            outcomes.push(match settled {
                Settled::Ok => Outcome::Ok,
                Settled::Stale => Outcome::Stale,
            });
        }
        self.park(&group, parked, false).await;
        self.park(&group, parked_replayed, true).await;
        let after = group.state().checkpoint();
        if after > before {
            self.store
                .save_checkpoint(&group.checkpoint_name(), after)
                .await?;
        }
        group.changed.notify_waiters();
        Ok(outcomes)
    }

    /// Delivers every event parked so far to group `name` again; returns how many
    /// are queued.
    ///
    /// # Errors
    /// An unknown group, or a store failure.
    pub async fn replay_parked(&self, name: &str) -> Result<u64, EventStoreError> {
        let group = self.group(name)?;
        let until = match self.store.stream_info(&group.parked_stream()?).await? {
            Some(info) => info.version.map_or(0, |v| v + 1),
            None => 0,
        };
        let mut replay = group.replay();
        let from = replay
            .as_ref()
            .map_or(0, |r| r.until.min(r.state.next_read()));
        let queued = until.saturating_sub(from);
        match replay.as_mut() {
            Some(r) => r.until = until,
            None => {
                *replay = Some(Replay {
                    state: GroupState::new(0),
                    until,
                })
            }
        }
        drop(replay);
        group.changed.notify_waiters();
        Ok(queued)
    }
}

fn info(g: &Group) -> GroupInfo {
    let state = g.state();
    GroupInfo {
        name: g.name.clone(),
        source: g.source.clone(),
        settings: g.settings.clone(),
        checkpoint: state.checkpoint(),
        in_flight: state.in_flight(),
        retrying: state.retrying(),
        parked: state.parked,
    }
}

/// The copy of an event stored in a parked stream: the same type, data and
/// metadata, plus where it came from and why it was parked.
fn to_parked(p: &Parked) -> EventData {
    let e = &p.event;
    let mut metadata = e.metadata.clone();
    metadata.extra.insert(
        "$parked".into(),
        json!({
            "id": e.id.to_string(), "stream": e.stream.as_str(), "version": e.version, "position": e.position,
            "timestamp_ms": e.timestamp_ms, "reason": p.reason, "attempts": p.attempts,
        }),
    );
    EventData {
        id: Uuid::new_v4(),
        ty: e.ty.clone(),
        data: e.data.clone(),
        metadata,
    }
}

/// The original event of a parked copy.
fn unpark(copy: RecordedEvent) -> RecordedEvent {
    let mut metadata: Metadata = copy.metadata.clone();
    let Some(origin) = metadata.extra.remove("$parked") else {
        return copy;
    };
    let stream = origin["stream"]
        .as_str()
        .and_then(|s| StreamName::new(s).ok());
    match (
        stream,
        origin["id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok()),
    ) {
        (Some(stream), Some(id)) => RecordedEvent {
            id,
            stream,
            version: origin["version"].as_u64().unwrap_or_default(),
            position: origin["position"].as_u64().unwrap_or_default(),
            ty: copy.ty,
            data: copy.data,
            metadata,
            timestamp_ms: origin["timestamp_ms"].as_u64().unwrap_or(copy.timestamp_ms),
        },
        _ => copy,
    }
}
