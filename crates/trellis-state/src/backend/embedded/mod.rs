//! The embedded backend: one redb file, group-committed by [`KvEngine`].

mod record;

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use trellis_core::{Clock, SystemClock};
use trellis_storage::{KvEngine, KvOptions, StorageError};

use self::record::Record;
use super::check_precondition;
use super::sweeper::Sweeper;
use crate::{
    ETag, Item, Key, Operation, Page, Precondition, StateError, StateStore, Value, WriteOptions,
};

const BACKEND: &str = "embedded";

/// key → encoded [`Record`].
const DATA: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("state_data");
/// (expires_at_ms, key) for every key with a TTL, so the sweeper finds expired keys
/// without a scan.
const EXPIRY: TableDefinition<'_, (u64, &str), ()> = TableDefinition::new("state_expiry");
/// `revision` → the last etag revision issued.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("state_meta");
const REVISION: &str = "revision";

/// Most expired keys deleted per sweep transaction.
const SWEEP_BATCH: usize = 1000;

/// Options of an [`EmbeddedStore`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EmbeddedOptions {
    /// How often expired keys are deleted.
    pub sweep_interval: Duration,
    /// Wall clock for TTLs.
    pub clock: Arc<dyn Clock>,
    /// Engine tuning.
    pub kv: KvOptions,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
            kv: KvOptions::default(),
        }
    }
}

impl EmbeddedOptions {
    /// Sets the wall clock used for TTLs.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the sweep interval.
    pub fn with_sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }
}

/// A state store in a redb file. Writes are acknowledged after fsync; concurrent
/// writes share fsyncs (group commit).
#[derive(Debug)]
pub struct EmbeddedStore {
    engine: KvEngine,
    clock: Arc<dyn Clock>,
    sweeper: Sweeper,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path` and starts its TTL sweeper.
    ///
    /// # Errors
    /// If the file can't be opened, e.g. because another process holds it.
    ///
    /// # Panics
    /// Outside a Tokio runtime (the sweeper is a task).
    pub fn open(path: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self, StateError> {
        let engine =
            KvEngine::open(path, options.kv).map_err(|e| StateError::backend(BACKEND, e))?;
        let sweeper = {
            let (engine, clock) = (engine.clone(), Arc::clone(&options.clock));
            Sweeper::spawn(BACKEND, options.sweep_interval, move || {
                let (engine, now) = (engine.clone(), clock.now_millis());
                async move { sweep(&engine, now).await }
            })
        };
        Ok(Self {
            engine,
            clock: options.clock,
            sweeper,
        })
    }

    /// Deletes every key expired by now; returns how many. Runs in the background
    /// every `sweep_interval`; public so tests and tools can force it.
    ///
    /// # Errors
    /// If the engine fails.
    pub async fn sweep(&self) -> Result<u64, StateError> {
        sweep(&self.engine, self.clock.now_millis())
            .await
            .map_err(storage_error)
    }

    async fn write<T, F>(&self, f: F) -> Result<T, StateError>
    where
        F: FnOnce(&mut Tables<'_>) -> Result<Result<T, StateError>, redb::Error> + Send + 'static,
        T: Send + 'static,
    {
        self.engine
            .write(move |txn| f(&mut Tables::open(txn)?))
            .await
            .map_err(storage_error)?
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn get(&self, key: &Key) -> Result<Option<Item>, StateError> {
        let mut items = self.bulk_get(std::slice::from_ref(key)).await?;
        Ok(items.pop().flatten())
    }

    async fn bulk_get(&self, keys: &[Key]) -> Result<Vec<Option<Item>>, StateError> {
        let keys = keys.to_vec();
        let now = self.clock.now_millis();
        self.engine
            .read(move |txn| {
                let table = match txn.open_table(DATA) {
                    Ok(table) => table,
                    Err(redb::TableError::TableDoesNotExist(_)) => {
                        return Ok(vec![None; keys.len()]);
                    }
                    Err(e) => return Err(e.into()),
                };
                keys.iter()
                    .map(|key| {
                        let Some(raw) = table.get(key.as_str())? else {
                            return Ok(None);
                        };
                        let record = Record::decode(raw.value()).map_err(redb::Error::Corrupted)?;
                        Ok(record.is_live(now).then(|| Item {
                            etag: ETag::from_revision(record.revision),
                            value: Value::new(record.data, record.content_type),
                        }))
                    })
                    .collect()
            })
            .await
            .map_err(storage_error)
    }

    async fn set(
        &self,
        key: &Key,
        value: Value,
        options: WriteOptions,
    ) -> Result<ETag, StateError> {
        let key = key.clone();
        let now = self.clock.now_millis();
        self.write(move |t| {
            let current = t.live_revision(key.as_str(), now)?;
            if let Err(e) = check_precondition(&options.precondition, key.as_str(), current) {
                return Ok(Err(e));
            }
            let revision = t.upsert(key.as_str(), &value, expiry(now, options.ttl))?;
            Ok(Ok(ETag::from_revision(revision)))
        })
        .await
    }

    async fn delete(&self, key: &Key, precondition: Precondition) -> Result<bool, StateError> {
        let key = key.clone();
        let now = self.clock.now_millis();
        self.write(move |t| {
            let current = t.live_revision(key.as_str(), now)?;
            if let Err(e) = check_precondition(&precondition, key.as_str(), current) {
                return Ok(Err(e));
            }
            t.remove(key.as_str())?;
            Ok(Ok(current.is_some()))
        })
        .await
    }

    async fn transact(&self, operations: Vec<Operation>) -> Result<Vec<Option<ETag>>, StateError> {
        let now = self.clock.now_millis();
        self.write(move |t| {
            // Check every precondition first, against the state as earlier operations
            // of this transaction leave it, so a failure writes nothing.
            let mut overlay: HashMap<&str, Option<u64>> = HashMap::new();
            for (index, op) in operations.iter().enumerate() {
                let key = op.key().as_str();
                let current = match overlay.get(key) {
                    Some(rev) => *rev,
                    None => t.live_revision(key, now)?,
                };
                let (precondition, after) = match op {
                    // u64::MAX stands for "written in this transaction": no etag
                    // the caller holds can match it.
                    Operation::Upsert { options, .. } => (&options.precondition, Some(u64::MAX)),
                    Operation::Delete { precondition, .. } => (precondition, None),
                };
                if let Err(e) = check_precondition(precondition, key, current) {
                    return Ok(Err(e.in_transaction(index)));
                }
                overlay.insert(key, after);
            }
            let mut etags = Vec::with_capacity(operations.len());
            for op in &operations {
                etags.push(match op {
                    Operation::Upsert {
                        key,
                        value,
                        options,
                    } => Some(ETag::from_revision(t.upsert(
                        key.as_str(),
                        value,
                        expiry(now, options.ttl),
                    )?)),
                    Operation::Delete { key, .. } => {
                        t.remove(key.as_str())?;
                        None
                    }
                });
            }
            Ok(Ok(etags))
        })
        .await
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Page, StateError> {
        let prefix = prefix.to_owned();
        let after = after.map(|k| k.as_str().to_owned());
        let now = self.clock.now_millis();
        self.engine
            .read(move |txn| {
                let table = match txn.open_table(DATA) {
                    Ok(table) => table,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Page::default()),
                    Err(e) => return Err(e.into()),
                };
                let start = match &after {
                    Some(after) if after.as_str() >= prefix.as_str() => {
                        Bound::Excluded(after.as_str())
                    }
                    _ => Bound::Included(prefix.as_str()),
                };
                let mut keys = Vec::new();
                for entry in table.range::<&str>((start, Bound::Unbounded))? {
                    let (k, v) = entry?;
                    let k = k.value();
                    if !k.starts_with(prefix.as_str()) {
                        break;
                    }
                    let (_, expires_at) =
                        Record::decode_header(v.value()).map_err(redb::Error::Corrupted)?;
                    if expires_at.is_some_and(|at| at <= now) {
                        continue;
                    }
                    // Stored keys were validated on the way in.
                    keys.push(
                        Key::new(k).map_err(|e| {
                            redb::Error::Corrupted(format!("stored key {k:?}: {e}"))
                        })?,
                    );
                    if keys.len() > limit {
                        break;
                    }
                }
                Ok(Page::from_overfetch(keys, limit))
            })
            .await
            .map_err(storage_error)
    }

    async fn health(&self) -> Result<(), StateError> {
        self.engine.read(|_txn| Ok(())).await.map_err(storage_error)
    }

    async fn close(&self) -> Result<(), StateError> {
        self.sweeper.stop();
        self.engine.close().await.map_err(storage_error)
    }
}

// === tables ===

/// The store's tables, open in one write transaction.
struct Tables<'txn> {
    data: Table<'txn, &'static str, &'static [u8]>,
    expiry: Table<'txn, (u64, &'static str), ()>,
    meta: Table<'txn, &'static str, u64>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            data: txn.open_table(DATA)?,
            expiry: txn.open_table(EXPIRY)?,
            meta: txn.open_table(META)?,
        })
    }

    /// The revision and expiry of the key's record, expired or not.
    fn header(&self, key: &str) -> Result<Option<(u64, Option<u64>)>, redb::Error> {
        match self.data.get(key)? {
            Some(raw) => Ok(Some(
                Record::decode_header(raw.value()).map_err(redb::Error::Corrupted)?,
            )),
            None => Ok(None),
        }
    }

    /// The key's revision if it exists and has not expired.
    fn live_revision(&self, key: &str, now: u64) -> Result<Option<u64>, redb::Error> {
        Ok(self.header(key)?.and_then(|(revision, expires_at)| {
            expires_at.is_none_or(|at| at > now).then_some(revision)
        }))
    }

    fn upsert(
        &mut self,
        key: &str,
        value: &Value,
        expires_at: Option<u64>,
    ) -> Result<u64, redb::Error> {
        let revision = self.meta.get(REVISION)?.map_or(0, |v| v.value()) + 1;
        self.meta.insert(REVISION, revision)?;
        self.forget_expiry(key)?;
        let record = Record::encode(revision, expires_at, &value.content_type, &value.data);
        self.data.insert(key, record.as_slice())?;
        if let Some(at) = expires_at {
            self.expiry.insert((at, key), ())?;
        }
        Ok(revision)
    }

    fn remove(&mut self, key: &str) -> Result<(), redb::Error> {
        self.forget_expiry(key)?;
        self.data.remove(key)?;
        Ok(())
    }

    /// Drops the expiry index entry of the key's current record, if any.
    fn forget_expiry(&mut self, key: &str) -> Result<(), redb::Error> {
        if let Some((_, Some(at))) = self.header(key)? {
            self.expiry.remove((at, key))?;
        }
        Ok(())
    }
}

fn expiry(now: u64, ttl: Option<Duration>) -> Option<u64> {
    super::ttl_millis(ttl).map(|ms| now.saturating_add(ms.unsigned_abs()))
}

fn storage_error(e: StorageError) -> StateError {
    match e {
        StorageError::Closed => StateError::unavailable(BACKEND, e),
        e => StateError::backend(BACKEND, e),
    }
}

// === TTL sweeping ===

async fn sweep(engine: &KvEngine, now: u64) -> Result<u64, StorageError> {
    let mut total = 0;
    loop {
        let n = engine
            .write(move |txn| {
                let mut t = Tables::open(txn)?;
                let mut due = Vec::new();
                for entry in t
                    .expiry
                    .range(..(now.saturating_add(1), ""))?
                    .take(SWEEP_BATCH)
                {
                    let (k, _) = entry?;
                    let (at, key) = k.value();
                    due.push((at, key.to_owned()));
                }
                for (at, key) in &due {
                    t.expiry.remove((*at, key.as_str()))?;
                    // Only if the record still carries this expiry: a rewrite moved it.
                    if let Some((_, Some(current))) = t.header(key)?
                        && current == *at
                    {
                        t.data.remove(key.as_str())?;
                    }
                }
                Ok(due.len())
            })
            .await?;
        total += n as u64;
        if n < SWEEP_BATCH {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod test {
    use trellis_core::ManualClock;

    use super::*;

    fn store_at(millis: u64) -> (tempfile::TempDir, EmbeddedStore, ManualClock) {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(millis);
        let store = EmbeddedStore::open(
            dir.path().join("s.redb"),
            EmbeddedOptions::default().with_clock(Arc::new(clock.clone())),
        )
        .expect("open");
        (dir, store, clock)
    }

    #[tokio::test]
    async fn ttl_follows_the_injected_clock_and_the_sweeper_deletes() {
        let (_dir, store, clock) = store_at(1_000_000);
        let key = Key::new("k").expect("valid");
        let ttl = WriteOptions {
            ttl: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        store.set(&key, Value::bytes("v"), ttl).await.expect("set");
        store
            .set(
                &Key::new("forever").expect("valid"),
                Value::bytes("v"),
                WriteOptions::default(),
            )
            .await
            .expect("set");

        clock.advance(Duration::from_millis(9_999));
        assert!(store.get(&key).await.expect("get").is_some());
        assert_eq!(store.sweep().await.expect("sweep"), 0);

        clock.advance(Duration::from_millis(1));
        assert!(
            store.get(&key).await.expect("get").is_none(),
            "expired at exactly its TTL"
        );
        assert_eq!(store.list("", None, 10).await.expect("list").keys.len(), 1);
        assert_eq!(store.sweep().await.expect("sweep"), 1);
        assert_eq!(store.sweep().await.expect("sweep"), 0);
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn rewriting_without_ttl_clears_the_expiry() {
        let (_dir, store, clock) = store_at(1_000);
        let key = Key::new("k").expect("valid");
        let ttl = WriteOptions {
            ttl: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        store.set(&key, Value::bytes("1"), ttl).await.expect("set");
        store
            .set(&key, Value::bytes("2"), WriteOptions::default())
            .await
            .expect("set");
        clock.advance(Duration::from_secs(60));
        assert_eq!(store.sweep().await.expect("sweep"), 0);
        assert_eq!(
            store.get(&key).await.expect("get").map(|i| i.value.data),
            Some("2".into())
        );
    }
}
