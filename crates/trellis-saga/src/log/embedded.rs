//! The embedded backend: one redb file, group-committed by [`KvEngine`].
//!
//! # Tables
//! ```text
//! saga_records       "{kind}/{id}"  → the record as JSON
//! saga_unfinished    "{kind}/{id}"  → ()    (only records with finished = false)
//! saga_idempotency   "{kind}/{key}" → id    (the record an idempotency key created)
//! saga_record_keys   "{kind}/{id}"  → key   (the key a record was created with)
//! ```
//! Every write keeps the four tables consistent in one closure (so one
//! transaction): `saga_unfinished` lets [`SagaLog::list`] of unfinished records skip
//! the finished ones without reading them, and `saga_record_keys` lets a delete free
//! the record's idempotency key, as the PostgreSQL backend does.
//!
//! Keys are compared as bytes, so records of a kind are one contiguous range in id
//! order (the PostgreSQL backend sorts ids with `COLLATE "C"`, the same order).
//!
//! # Checks and writes
//! A write closure runs in a transaction shared with other writes: the checks
//! (idempotency key, taken id, expected version) are made first, and a failed check
//! is returned as a value without writing anything, so it never aborts the batch.

use std::ops::Bound;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde::Deserialize;
use trellis_storage::{KvEngine, KvOptions, StorageError};

use super::{Created, Filter, LogError, Record, RecordKind, SagaLog, not_version_one};

const BACKEND: &str = "embedded";

/// `"{kind}/{id}"` → the record as JSON.
const RECORDS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("saga_records");
/// `"{kind}/{id}"` of every unfinished record.
const UNFINISHED: TableDefinition<'_, &str, ()> = TableDefinition::new("saga_unfinished");
/// `"{kind}/{idempotency key}"` → the id of the record it created.
const IDEMPOTENCY: TableDefinition<'_, &str, &str> = TableDefinition::new("saga_idempotency");
/// `"{kind}/{id}"` → the idempotency key the record was created with.
const RECORD_KEYS: TableDefinition<'_, &str, &str> = TableDefinition::new("saga_record_keys");

/// A [`SagaLog`] in a redb file: every write is fsynced before it returns, and
/// concurrent writes share fsyncs (group commit). One process at a time may open a
/// file.
///
/// ```
/// use trellis_saga::log::embedded::EmbeddedLog;
/// use trellis_saga::log::{Created, Filter, Record, RecordKind, SagaLog, new_id, now_ms};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let log = EmbeddedLog::open(dir.path().join("saga.redb")).await?;
/// let mut record = Record {
///     kind: RecordKind::Saga,
///     id: new_id(),
///     version: 1,
///     name: "order".into(),
///     status: "running".into(),
///     finished: false,
///     owner: "sidecar-1".into(),
///     created_at_ms: now_ms(),
///     updated_at_ms: now_ms(),
///     body: serde_json::json!({ "step": 0 }),
/// };
/// assert_eq!(log.create(&record, Some("request-42")).await?, Created::New);
///
/// // The next transition replaces version 1, and only version 1.
/// record.version = 2;
/// record.body = serde_json::json!({ "step": 1 });
/// log.update(&record).await?;
/// assert!(log.update(&record).await.is_err(), "version 1 is gone");
///
/// let running = log.list(RecordKind::Saga, &Filter { unfinished: true, ..Filter::default() }).await?;
/// assert_eq!(running, vec![record]);
/// log.close().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct EmbeddedLog {
    engine: KvEngine,
}

impl EmbeddedLog {
    /// Opens the log at `path`, creating the file (and its parent directories) and
    /// its tables if needed. A file left by a crash is repaired by redb on open.
    ///
    /// # Errors
    /// [`LogError::Backend`] if the file can't be opened — notably while another
    /// [`EmbeddedLog`] (in this process or another) has it open.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, LogError> {
        let path: PathBuf = path.as_ref().to_path_buf();
        // Opening may repair the file after a crash: keep it off the async threads.
        let engine =
            tokio::task::spawn_blocking(move || KvEngine::open(path, KvOptions::default()))
                .await
                .map_err(|e| LogError::Backend(format!("opening the saga log failed: {e}")))?
                .map_err(storage_error)?;
        // Create the tables now, so that reads never meet a missing one.
        let created = engine
            .write(|txn| {
                Tables::open(txn)?;
                Ok(())
            })
            .await;
        if let Err(e) = created {
            // Release the file before reporting, so it can be opened again.
            if let Err(close) = engine.close().await {
                tracing::warn!(error = %close, "closing the saga log after a failed open also failed");
            }
            return Err(storage_error(e));
        }
        tracing::info!(path = %engine.path().display(), "embedded saga log opened");
        Ok(Self { engine })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        self.engine.path()
    }

    /// Runs `f` on the tables in a shared write transaction; its inner `Err` is a
    /// failed check (nothing written).
    async fn write<T, F>(&self, f: F) -> Result<T, LogError>
    where
        F: FnOnce(&mut Tables<'_>) -> Result<Result<T, LogError>, redb::Error> + Send + 'static,
        T: Send + 'static,
    {
        self.engine
            .write(move |txn| f(&mut Tables::open(txn)?))
            .await
            .map_err(storage_error)?
    }
}

#[async_trait]
impl SagaLog for EmbeddedLog {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn create(
        &self,
        record: &Record,
        idempotency_key: Option<&str>,
    ) -> Result<Created, LogError> {
        if record.version != 1 {
            return Err(not_version_one(record));
        }
        let json = encode(record)?;
        let (kind, id, finished) = (record.kind, record.id.clone(), record.finished);
        // The key as stored in the idempotency table, and as given.
        let key = idempotency_key.map(|k| (record_key(kind, k), k.to_owned()));
        let created = self
            .write(move |t| {
                let rkey = record_key(kind, &id);
                if let Some((key, _)) = &key {
                    let first = t
                        .idempotency
                        .get(key.as_str())?
                        .map(|v| v.value().to_owned());
                    // A key whose record is gone (deleted) is free again.
                    if let Some(first) = first
                        && let Some(raw) = t.records.get(record_key(kind, &first).as_str())?
                    {
                        return Ok(decode(raw.value()).map(|r| Created::Existing(Box::new(r))));
                    }
                }
                if t.records.get(rkey.as_str())?.is_some() {
                    return Ok(Err(LogError::Exists { kind, id }));
                }
                t.records.insert(rkey.as_str(), json.as_slice())?;
                if !finished {
                    t.unfinished.insert(rkey.as_str(), ())?;
                }
                if let Some((key, given)) = &key {
                    t.idempotency.insert(key.as_str(), id.as_str())?;
                    t.record_keys.insert(rkey.as_str(), given.as_str())?;
                }
                Ok(Ok(Created::New))
            })
            .await?;
        match &created {
            Created::New => {
                tracing::debug!(kind = %record.kind, id = %record.id, "record created");
            }
            Created::Existing(first) => {
                tracing::debug!(kind = %record.kind, id = %first.id, "idempotency key used before; nothing created");
            }
        }
        Ok(created)
    }

    async fn update(&self, record: &Record) -> Result<(), LogError> {
        let json = encode(record)?;
        let (kind, id, version, finished) = (
            record.kind,
            record.id.clone(),
            record.version,
            record.finished,
        );
        let expected = version.saturating_sub(1);
        self.write(move |t| {
            let rkey = record_key(kind, &id);
            let found = match t.records.get(rkey.as_str())? {
                Some(raw) => match stored_version(raw.value()) {
                    Ok(v) => Some(v),
                    Err(e) => return Ok(Err(e)),
                },
                None => None,
            };
            // Version 0 replaces nothing: no record is ever at version -1.
            if version == 0 || found != Some(expected) {
                return Ok(Err(LogError::Conflict {
                    kind,
                    id,
                    expected,
                    found,
                }));
            }
            t.store(&rkey, &json, finished)?;
            Ok(Ok(()))
        })
        .await
        .inspect_err(|e| {
            if matches!(e, LogError::Conflict { .. }) {
                tracing::debug!(kind = %record.kind, id = %record.id, error = %e, "update refused");
            }
        })
    }

    async fn put(&self, record: &Record) -> Result<(), LogError> {
        let json = encode(record)?;
        let (kind, id, finished) = (record.kind, record.id.clone(), record.finished);
        self.write(move |t| {
            t.store(&record_key(kind, &id), &json, finished)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn delete(&self, kind: RecordKind, id: &str) -> Result<bool, LogError> {
        let rkey = record_key(kind, id);
        let id = id.to_owned();
        self.write(move |t| {
            let existed = t.records.remove(rkey.as_str())?.is_some();
            t.unfinished.remove(rkey.as_str())?;
            let key = t
                .record_keys
                .remove(rkey.as_str())?
                .map(|k| k.value().to_owned());
            if let Some(key) = key {
                let ikey = record_key(kind, &key);
                let points_here = t
                    .idempotency
                    .get(ikey.as_str())?
                    .is_some_and(|v| v.value() == id);
                if points_here {
                    t.idempotency.remove(ikey.as_str())?;
                }
            }
            Ok(Ok(existed))
        })
        .await
    }

    async fn get(&self, kind: RecordKind, id: &str) -> Result<Option<Record>, LogError> {
        let rkey = record_key(kind, id);
        self.engine
            .read(move |txn| {
                let records = txn.open_table(RECORDS)?;
                Ok(records.get(rkey.as_str())?.map(|raw| decode(raw.value())))
            })
            .await
            .map_err(storage_error)?
            .transpose()
    }

    async fn list(&self, kind: RecordKind, filter: &Filter) -> Result<Vec<Record>, LogError> {
        let limit = filter.capped_limit();
        if limit == 0 {
            return Ok(Vec::new());
        }
        let filter = filter.clone();
        self.engine
            .read(move |txn| {
                let records = txn.open_table(RECORDS)?;
                // Every key of the kind is in ["{kind}/", "{kind}0"): '0' follows '/'.
                let low = format!("{kind}/");
                let high = match &filter.before {
                    Some(before) => Bound::Excluded(record_key(kind, before)),
                    None => Bound::Excluded(format!("{kind}0")),
                };
                let range = (Bound::Included(low.as_str()), as_str(&high));
                let mut found = Vec::new();
                let mut keep = |record: Record| {
                    if filter.matches(&record) {
                        found.push(record);
                    }
                    found.len() >= limit
                };
                if filter.unfinished {
                    let unfinished = txn.open_table(UNFINISHED)?;
                    for entry in unfinished.range::<&str>(range)?.rev() {
                        let (key, _) = entry?;
                        // Both tables are written together; a miss would be a bug,
                        // and the record is then simply not listed.
                        let Some(raw) = records.get(key.value())? else {
                            tracing::warn!(
                                key = key.value(),
                                "unfinished index names a missing record"
                            );
                            continue;
                        };
                        let record = match decode(raw.value()) {
                            Ok(record) => record,
                            Err(e) => return Ok(Err(e)),
                        };
                        if keep(record) {
                            break;
                        }
                    }
                } else {
                    for entry in records.range::<&str>(range)?.rev() {
                        let (_, raw) = entry?;
                        let record = match decode(raw.value()) {
                            Ok(record) => record,
                            Err(e) => return Ok(Err(e)),
                        };
                        if keep(record) {
                            break;
                        }
                    }
                }
                Ok(Ok(found))
            })
            .await
            .map_err(storage_error)?
    }

    async fn health(&self) -> Result<(), LogError> {
        self.engine
            .read(|txn| {
                txn.open_table(RECORDS)?;
                Ok(())
            })
            .await
            .map_err(storage_error)
    }

    async fn close(&self) -> Result<(), LogError> {
        self.engine.close().await.map_err(storage_error)
    }
}

// === tables ===

/// The log's tables, open in one write transaction.
struct Tables<'txn> {
    records: Table<'txn, &'static str, &'static [u8]>,
    unfinished: Table<'txn, &'static str, ()>,
    idempotency: Table<'txn, &'static str, &'static str>,
    record_keys: Table<'txn, &'static str, &'static str>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            records: txn.open_table(RECORDS)?,
            unfinished: txn.open_table(UNFINISHED)?,
            idempotency: txn.open_table(IDEMPOTENCY)?,
            record_keys: txn.open_table(RECORD_KEYS)?,
        })
    }

    /// Writes a record over whatever is stored, keeping the unfinished index right.
    fn store(&mut self, rkey: &str, json: &[u8], finished: bool) -> Result<(), redb::Error> {
        self.records.insert(rkey, json)?;
        if finished {
            self.unfinished.remove(rkey)?;
        } else {
            self.unfinished.insert(rkey, ())?;
        }
        Ok(())
    }
}

// === helpers ===

/// `"{kind}/{s}"`: the key of a record (s = id) or of an idempotency key.
fn record_key(kind: RecordKind, s: &str) -> String {
    format!("{kind}/{s}")
}

fn as_str(bound: &Bound<String>) -> Bound<&str> {
    match bound {
        Bound::Included(s) => Bound::Included(s.as_str()),
        Bound::Excluded(s) => Bound::Excluded(s.as_str()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn encode(record: &Record) -> Result<Vec<u8>, LogError> {
    serde_json::to_vec(record)
        .map_err(|e| LogError::Backend(format!("cannot encode {} {}: {e}", record.kind, record.id)))
}

fn decode(raw: &[u8]) -> Result<Record, LogError> {
    serde_json::from_slice(raw)
        .map_err(|e| LogError::Backend(format!("unreadable stored record: {e}")))
}

/// The version of a stored record, without decoding its body into a value.
fn stored_version(raw: &[u8]) -> Result<u64, LogError> {
    #[derive(Deserialize)]
    struct Header {
        version: u64,
    }
    serde_json::from_slice::<Header>(raw)
        .map(|h| h.version)
        .map_err(|e| LogError::Backend(format!("unreadable stored record: {e}")))
}

/// A closed engine is [`LogError::Closed`]; an aborted batch (nothing in it was
/// committed, retrying is safe) is [`LogError::Unavailable`]; anything else is
/// [`LogError::Backend`].
fn storage_error(e: StorageError) -> LogError {
    match e {
        StorageError::Closed => LogError::Closed,
        StorageError::Aborted(reason) => {
            LogError::Unavailable(format!("write not committed (retrying is safe): {reason}"))
        }
        e => LogError::Backend(e.to_string()),
    }
}
