//! The embedded backend: events and their indexes in one redb file, written through
//! `trellis-storage`'s group-committing [`KvEngine`].
//!
//! # Why a B-tree and not the segment log
//! An append may cover several streams and must be all or nothing, and its event
//! ids, stream versions and indexes must change with it. One redb write transaction
//! gives exactly that; the pub/sub segment log frames records one by one, so a
//! multi-record batch could be half there after a crash. Group commit keeps the
//! price low: concurrent appends share one fsync.
//!
//! # Layout
//! ```text
//! events        position → encoded RecordedEvent          ($all)
//! streams       name → last version, metadata, deletion
//! stream_index  (name, version) → position
//! category      (category, position) → ()                 ($ce-<category>)
//! event_ids     event id → position                        (idempotence, uniqueness)
//! snapshots     name → version, body
//! checkpoints   name → position
//! meta          "head" → the next position
//! ```
//!
//! # The global order never skips
//! Positions come from `meta.head` inside the write transaction, and the writer
//! thread commits transactions one at a time. A reader sees a committed snapshot, so
//! once it has seen position `p`, everything below `p` was committed with or before
//! it.

mod record;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{ReadTransaction, ReadableTable, TableDefinition, TableError, WriteTransaction};
use tokio::sync::watch;
use trellis_storage::{KvEngine, KvOptions, StorageError};

use self::record::{StreamRecord, decode_snapshot, encode_snapshot};
use crate::api::{
    Append, Appended, AsOf, Deletion, Direction, EventStore, EventStoreError, ExpectedVersion,
    ReadStream, Snapshot, StreamInfo, StreamMetadata, StreamSlice,
};
use crate::event::{Invalid, RecordedEvent, StreamName};

const BACKEND: &str = "embedded";

const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");
const STREAMS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("streams");
const STREAM_INDEX: TableDefinition<'_, (&str, u64), u64> = TableDefinition::new("stream_index");
const CATEGORY: TableDefinition<'_, (&str, u64), ()> = TableDefinition::new("category");
const EVENT_IDS: TableDefinition<'_, u128, u64> = TableDefinition::new("event_ids");
const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
const CHECKPOINTS: TableDefinition<'_, &str, u64> = TableDefinition::new("checkpoints");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const HEAD: &str = "head";

/// An event store in a redb file.
#[derive(Debug)]
pub struct EmbeddedEventStore {
    engine: KvEngine,
    head: watch::Sender<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn storage_error(e: StorageError) -> EventStoreError {
    match e {
        StorageError::Closed => EventStoreError::Unavailable {
            backend: BACKEND,
            reason: e.to_string(),
        },
        e => EventStoreError::Backend {
            backend: BACKEND,
            reason: e.to_string(),
        },
    }
}

fn corrupt(what: impl std::fmt::Display) -> redb::Error {
    redb::Error::Corrupted(what.to_string())
}

/// Opens a table for reading; a table never written reads as empty (`None`).
fn table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<'_, K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, redb::Error> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl EmbeddedEventStore {
    /// Opens (or creates) the store in the file at `path`.
    ///
    /// # Errors
    /// If the file can't be opened (notably: another process has it open).
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, EventStoreError> {
        let engine = KvEngine::open(path, KvOptions::default()).map_err(storage_error)?;
        let head = engine
            .read(|txn| {
                Ok(table(txn, META)?
                    .map(|t| t.get(HEAD).map(|v| v.map(|v| v.value())))
                    .transpose()?
                    .flatten()
                    .unwrap_or(0))
            })
            .await
            .map_err(storage_error)?;
        Ok(Self {
            engine,
            head: watch::Sender::new(head),
        })
    }
}

/// Checks every append of a call, before anything is written. `Ok(Err(_))` is the
/// logical failure of the whole call; `Ok(Ok(Some(_)))` an idempotent repeat.
fn check(
    txn: &WriteTransaction,
    append: &Append,
) -> Result<Result<Check, EventStoreError>, redb::Error> {
    // NOTE: redb refuses to open a table twice in one transaction, so each handle
    // here is dropped before a helper opens its own.
    let record = txn
        .open_table(STREAMS)?
        .get(append.stream.as_str())?
        .map(|v| StreamRecord::decode(v.value()))
        .transpose()
        .map_err(corrupt)?
        .unwrap_or_default();
    if record.deleted == Some(Deletion::Hard) {
        return Ok(Err(EventStoreError::StreamDeleted(append.stream.clone())));
    }
    let first = match append.events.first() {
        Some(first) => txn
            .open_table(EVENT_IDS)?
            .get(first.id.as_u128())?
            .map(|v| v.value()),
        None => None,
    };
    if let Some(position) = first {
        return repeat(txn, append, &record, position);
    }
    let admitted = match (record.deleted, append.expected) {
        // A soft-deleted stream is recreated by appending, continuing its versions.
        (Some(Deletion::Soft), ExpectedVersion::Any | ExpectedVersion::NoStream) => true,
        (Some(Deletion::Soft), ExpectedVersion::Exact(v)) => record.version == Some(v),
        (Some(Deletion::Soft), ExpectedVersion::Exists) => false,
        (_, expected) => expected.admits(record.version),
    };
    if !admitted {
        return Ok(Err(EventStoreError::WrongExpectedVersion {
            stream: append.stream.clone(),
            expected: append.expected,
            actual: if record.deleted.is_some() {
                None
            } else {
                record.version
            },
        }));
    }
    let duplicate = {
        let ids = txn.open_table(EVENT_IDS)?;
        let mut found = None;
        for event in &append.events {
            if let Some(position) = ids.get(event.id.as_u128())?.map(|v| v.value()) {
                found = Some((event.id, position));
                break;
            }
        }
        found
    };
    if let Some((id, position)) = duplicate {
        let stored = stored_event(txn, position)?;
        return Ok(Err(EventStoreError::DuplicateEventId {
            id,
            stream: stored.stream,
            version: stored.version,
        }));
    }
    Ok(Ok(Check::Fresh(record)))
}

enum Check {
    Fresh(StreamRecord),
    Repeat(Appended),
}

/// The first event's id is stored already: a repeat of an earlier append if every
/// id lines up with the stream's events from there, else a duplicate id.
fn repeat(
    txn: &WriteTransaction,
    append: &Append,
    record: &StreamRecord,
    first: u64,
) -> Result<Result<Check, EventStoreError>, redb::Error> {
    let stored = stored_event(txn, first)?;
    let index = txn.open_table(STREAM_INDEX)?;
    let ids = txn.open_table(EVENT_IDS)?;
    // NOTE: `index` and `ids` are open until this returns: nothing below opens them.
    let mut lines_up = stored.stream == append.stream;
    for (i, event) in append.events.iter().enumerate() {
        if !lines_up {
            break;
        }
        let version = stored.version + i as u64;
        let at = index
            .get((append.stream.as_str(), version))?
            .map(|v| v.value());
        lines_up = at.is_some() && ids.get(event.id.as_u128())?.map(|v| v.value()) == at;
    }
    // The same expectation as the first time: what the stream was before it.
    let before = stored.version.checked_sub(1);
    let same_expectation = match append.expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => before.is_none(),
        ExpectedVersion::Exists => before.is_some(),
        ExpectedVersion::Exact(v) => before == Some(v),
    };
    if lines_up && same_expectation {
        let n = append.events.len() as u64;
        return Ok(Ok(Check::Repeat(Appended {
            stream: append.stream.clone(),
            version: record.version,
            positions: first..first + n,
        })));
    }
    if lines_up {
        return Ok(Err(EventStoreError::WrongExpectedVersion {
            stream: append.stream.clone(),
            expected: append.expected,
            actual: record.version,
        }));
    }
    Ok(Err(EventStoreError::DuplicateEventId {
        id: append.events[0].id,
        stream: stored.stream,
        version: stored.version,
    }))
}

fn stored_event(txn: &WriteTransaction, position: u64) -> Result<RecordedEvent, redb::Error> {
    let events = txn.open_table(EVENTS)?;
    let bytes = events.get(position)?.ok_or_else(|| {
        corrupt(format!(
            "event id index points at missing position {position}"
        ))
    })?;
    RecordedEvent::decode(bytes.value()).map_err(corrupt)
}

/// Appends every checked append; returns the outcomes and the new head.
fn write(
    txn: &WriteTransaction,
    appends: Vec<Append>,
    checks: Vec<Check>,
    now: u64,
) -> Result<(Vec<Appended>, u64), redb::Error> {
    let mut meta = txn.open_table(META)?;
    let mut head = meta.get(HEAD)?.map_or(0, |v| v.value());
    let mut events = txn.open_table(EVENTS)?;
    let mut streams = txn.open_table(STREAMS)?;
    let mut index = txn.open_table(STREAM_INDEX)?;
    let mut category = txn.open_table(CATEGORY)?;
    let mut ids = txn.open_table(EVENT_IDS)?;
    let mut out = Vec::with_capacity(appends.len());
    for (append, check) in appends.into_iter().zip(checks) {
        let mut record = match check {
            Check::Repeat(appended) => {
                out.push(appended);
                continue;
            }
            Check::Fresh(record) => record,
        };
        let first_position = head;
        let first_version = record.version.map_or(0, |v| v + 1);
        for (version, event) in (first_version..).zip(append.events) {
            let recorded = RecordedEvent {
                id: event.id,
                stream: append.stream.clone(),
                version,
                position: head,
                ty: event.ty,
                data: event.data,
                metadata: event.metadata,
                timestamp_ms: now,
            };
            events.insert(head, recorded.encode().as_ref())?;
            index.insert((append.stream.as_str(), version), head)?;
            category.insert((append.stream.category(), head), ())?;
            ids.insert(event.id.as_u128(), head)?;
            record.version = Some(version);
            head += 1;
        }
        if record.deleted == Some(Deletion::Soft) && head > first_position {
            record.deleted = None;
        }
        streams.insert(append.stream.as_str(), record.encode().as_slice())?;
        out.push(Appended {
            stream: append.stream,
            version: record.version,
            positions: first_position..head,
        });
    }
    meta.insert(HEAD, head)?;
    Ok((out, head))
}

/// Reads a stream within a read transaction.
fn read_stream(
    txn: &ReadTransaction,
    stream: &StreamName,
    read: ReadStream,
    now: u64,
) -> Result<Result<StreamSlice, EventStoreError>, redb::Error> {
    let record = match table(txn, STREAMS)?
        .map(|t| t.get(stream.as_str()))
        .transpose()?
        .flatten()
    {
        Some(v) => StreamRecord::decode(v.value()).map_err(corrupt)?,
        None => return Ok(Err(EventStoreError::StreamNotFound(stream.clone()))),
    };
    if record.deleted == Some(Deletion::Hard) {
        return Ok(Err(EventStoreError::StreamDeleted(stream.clone())));
    }
    let Some(last) = record.version else {
        return Ok(Err(EventStoreError::StreamNotFound(stream.clone())));
    };
    let empty = StreamSlice {
        events: Vec::new(),
        version: Some(last),
        next: None,
    };
    let (Some(index), Some(events)) = (table(txn, STREAM_INDEX)?, table(txn, EVENTS)?) else {
        return Ok(Ok(empty));
    };
    let mut upper = last;
    let mut before_ms = None;
    match read.as_of {
        Some(AsOf::Version(v)) => upper = upper.min(v),
        Some(AsOf::Timestamp(t)) => before_ms = Some(t),
        None => {}
    }
    let limit = read.limit.max(1);
    let mut out = Vec::new();
    let mut next = None;
    let mut push = |position: u64, version: u64| -> Result<bool, redb::Error> {
        let Some(bytes) = events.get(position)? else {
            return Ok(true);
        };
        let event = RecordedEvent::decode(bytes.value()).map_err(corrupt)?;
        if before_ms.is_some_and(|t| event.timestamp_ms > t)
            || !record
                .metadata
                .shows(version, event.timestamp_ms, last, now)
        {
            return Ok(true);
        }
        if out.len() == limit {
            next = Some(version);
            return Ok(false);
        }
        out.push(event);
        Ok(true)
    };
    match read.direction {
        Direction::Forward => {
            let from = read.from.unwrap_or(0);
            if from <= upper {
                for entry in index.range((stream.as_str(), from)..=(stream.as_str(), upper))? {
                    let (k, v) = entry?;
                    if !push(v.value(), k.value().1)? {
                        break;
                    }
                }
            }
        }
        Direction::Backward => {
            let from = read.from.unwrap_or(upper).min(upper);
            for entry in index
                .range((stream.as_str(), 0)..=(stream.as_str(), from))?
                .rev()
            {
                let (k, v) = entry?;
                if !push(v.value(), k.value().1)? {
                    break;
                }
            }
        }
    }
    Ok(Ok(StreamSlice {
        events: out,
        version: Some(last),
        next,
    }))
}

fn read_all(
    txn: &ReadTransaction,
    position: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, redb::Error> {
    let Some(events) = table(txn, EVENTS)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in events.range(position..)?.take(limit) {
        let (_, v) = entry?;
        out.push(RecordedEvent::decode(v.value()).map_err(corrupt)?);
    }
    Ok(out)
}

fn read_category(
    txn: &ReadTransaction,
    name: &str,
    position: u64,
    limit: usize,
    now: u64,
) -> Result<Vec<RecordedEvent>, redb::Error> {
    let (Some(category), Some(events), Some(streams)) = (
        table(txn, CATEGORY)?,
        table(txn, EVENTS)?,
        table(txn, STREAMS)?,
    ) else {
        return Ok(Vec::new());
    };
    let mut records: HashMap<StreamName, StreamRecord> = HashMap::new();
    let mut out = Vec::new();
    for entry in category.range((name, position)..=(name, u64::MAX))? {
        if out.len() >= limit {
            break;
        }
        let (k, _) = entry?;
        let Some(bytes) = events.get(k.value().1)? else {
            continue;
        };
        let event = RecordedEvent::decode(bytes.value()).map_err(corrupt)?;
        if !records.contains_key(&event.stream) {
            let record = streams
                .get(event.stream.as_str())?
                .map(|v| StreamRecord::decode(v.value()))
                .transpose()
                .map_err(corrupt)?
                .unwrap_or_default();
            records.insert(event.stream.clone(), record);
        }
        let visible = records.get(&event.stream).is_some_and(|r| {
            r.deleted != Some(Deletion::Hard)
                && r.metadata.shows(
                    event.version,
                    event.timestamp_ms,
                    r.version.unwrap_or(0),
                    now,
                )
        });
        if visible {
            out.push(event);
        }
    }
    Ok(out)
}

fn stream_record(txn: &ReadTransaction, stream: &str) -> Result<Option<StreamRecord>, redb::Error> {
    table(txn, STREAMS)?
        .map(|t| t.get(stream))
        .transpose()?
        .flatten()
        .map(|v| StreamRecord::decode(v.value()))
        .transpose()
        .map_err(corrupt)
}

#[async_trait]
impl EventStore for EmbeddedEventStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn append(&self, appends: Vec<Append>) -> Result<Vec<Appended>, EventStoreError> {
        let mut seen = HashSet::new();
        let mut ids = HashSet::new();
        for append in &appends {
            if !seen.insert(append.stream.clone()) {
                return Err(Invalid(format!(
                    "stream {} appears twice in one append",
                    append.stream
                ))
                .into());
            }
            for event in &append.events {
                event.validate()?;
                if !ids.insert(event.id) {
                    return Err(Invalid(format!(
                        "event id {} appears twice in one append",
                        event.id
                    ))
                    .into());
                }
            }
        }
        let now = now_ms();
        let outcome = self
            .engine
            .write(move |txn| {
                let mut checks = Vec::with_capacity(appends.len());
                for append in &appends {
                    match check(txn, append)? {
                        Ok(c) => checks.push(c),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Ok(Ok(write(txn, appends, checks, now)?))
            })
            .await
            .map_err(storage_error)?;
        let (appended, head) = outcome?;
        self.head.send_if_modified(|h| {
            let moved = head > *h;
            *h = (*h).max(head);
            moved
        });
        Ok(appended)
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        read: ReadStream,
    ) -> Result<StreamSlice, EventStoreError> {
        let stream = stream.clone();
        let now = now_ms();
        self.engine
            .read(move |txn| read_stream(txn, &stream, read, now))
            .await
            .map_err(storage_error)?
    }

    async fn read_all(
        &self,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        self.engine
            .read(move |txn| read_all(txn, position, limit))
            .await
            .map_err(storage_error)
    }

    async fn read_category(
        &self,
        category: &str,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        let category = category.to_owned();
        let now = now_ms();
        self.engine
            .read(move |txn| read_category(txn, &category, position, limit, now))
            .await
            .map_err(storage_error)
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    async fn stream_info(
        &self,
        stream: &StreamName,
    ) -> Result<Option<StreamInfo>, EventStoreError> {
        let name = stream.clone();
        let record = self
            .engine
            .read(move |txn| stream_record(txn, name.as_str()))
            .await
            .map_err(storage_error)?;
        Ok(record.map(|r| StreamInfo {
            stream: stream.clone(),
            version: r.version,
            metadata: r.metadata,
            deleted: r.deleted,
        }))
    }

    async fn set_metadata(
        &self,
        stream: &StreamName,
        metadata: StreamMetadata,
    ) -> Result<(), EventStoreError> {
        let stream = stream.clone();
        self.engine
            .write(move |txn| {
                let mut streams = txn.open_table(STREAMS)?;
                let mut record = streams
                    .get(stream.as_str())?
                    .map(|v| StreamRecord::decode(v.value()))
                    .transpose()
                    .map_err(corrupt)?
                    .unwrap_or_default();
                if record.deleted == Some(Deletion::Hard) {
                    return Ok(Err(EventStoreError::StreamDeleted(stream)));
                }
                // A soft delete's truncation stays in force.
                let deleted_before = if record.deleted == Some(Deletion::Soft) {
                    record.metadata.truncate_before
                } else {
                    None
                };
                record.metadata = StreamMetadata {
                    truncate_before: match (metadata.truncate_before, deleted_before) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    },
                    ..metadata
                };
                streams.insert(stream.as_str(), record.encode().as_slice())?;
                Ok(Ok(()))
            })
            .await
            .map_err(storage_error)?
    }

    async fn delete(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        how: Deletion,
    ) -> Result<(), EventStoreError> {
        let stream = stream.clone();
        self.engine
            .write(move |txn| {
                let mut streams = txn.open_table(STREAMS)?;
                let Some(mut record) = streams
                    .get(stream.as_str())?
                    .map(|v| StreamRecord::decode(v.value()))
                    .transpose()
                    .map_err(corrupt)?
                else {
                    return Ok(Err(EventStoreError::StreamNotFound(stream)));
                };
                if record.deleted == Some(Deletion::Hard) {
                    return Ok(Err(EventStoreError::StreamDeleted(stream)));
                }
                let current = if record.deleted.is_some() {
                    None
                } else {
                    record.version
                };
                if !expected.admits(current) {
                    return Ok(Err(EventStoreError::WrongExpectedVersion {
                        stream,
                        expected,
                        actual: current,
                    }));
                }
                record.deleted = Some(how);
                if how == Deletion::Soft {
                    record.metadata.truncate_before = record.version.map(|v| v + 1);
                }
                streams.insert(stream.as_str(), record.encode().as_slice())?;
                Ok(Ok(()))
            })
            .await
            .map_err(storage_error)?
    }

    async fn save_snapshot(
        &self,
        stream: &StreamName,
        snapshot: Snapshot,
    ) -> Result<(), EventStoreError> {
        let stream = stream.clone();
        let bytes = encode_snapshot(&snapshot);
        self.engine
            .write(move |txn| {
                txn.open_table(SNAPSHOTS)?
                    .insert(stream.as_str(), bytes.as_slice())?;
                Ok(())
            })
            .await
            .map_err(storage_error)
    }

    async fn load_snapshot(
        &self,
        stream: &StreamName,
    ) -> Result<Option<Snapshot>, EventStoreError> {
        let stream = stream.clone();
        self.engine
            .read(move |txn| {
                table(txn, SNAPSHOTS)?
                    .map(|t| t.get(stream.as_str()))
                    .transpose()?
                    .flatten()
                    .map(|v| decode_snapshot(v.value()))
                    .transpose()
                    .map_err(corrupt)
            })
            .await
            .map_err(storage_error)
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, EventStoreError> {
        let name = name.to_owned();
        self.engine
            .read(move |txn| {
                Ok(table(txn, CHECKPOINTS)?
                    .map(|t| t.get(name.as_str()))
                    .transpose()?
                    .flatten()
                    .map(|v| v.value()))
            })
            .await
            .map_err(storage_error)
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), EventStoreError> {
        let name = name.to_owned();
        self.engine
            .write(move |txn| {
                txn.open_table(CHECKPOINTS)?
                    .insert(name.as_str(), position)?;
                Ok(())
            })
            .await
            .map_err(storage_error)
    }

    async fn health(&self) -> Result<(), EventStoreError> {
        self.engine.read(|_| Ok(())).await.map_err(storage_error)
    }

    async fn close(&self) -> Result<(), EventStoreError> {
        self.engine.close().await.map_err(storage_error)
    }
}
