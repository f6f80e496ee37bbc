use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use redb::{Database, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use super::StorageError;

/// Tuning knobs of a [`KvEngine`]; the defaults suit a sidecar.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KvOptions {
    /// Most writes committed by one fsync.
    pub max_batch: usize,
    /// Writes that may wait for the writer thread before `write` itself waits
    /// (backpressure instead of unbounded memory).
    pub queue_capacity: usize,
    /// redb's page cache, in bytes.
    pub cache_size: usize,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self {
            max_batch: 1024,
            queue_capacity: 8192,
            cache_size: 64 << 20,
        }
    }
}

/// An ordered key-value engine on redb with group commit. Cheap to clone; clones
/// share the database and its writer thread.
///
/// See the [module docs](super) for the write contract and an example.
#[derive(Debug, Clone)]
pub struct KvEngine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `None` once closed, so the file lock is released and the database can be
    /// opened again in this process.
    db: Mutex<Option<Arc<Database>>>,
    path: PathBuf,
    /// `None` once closed. A std `Mutex`: held only to clone the sender, never across
    /// an `.await`.
    queue: Mutex<Option<mpsc::Sender<Box<dyn PendingWrite>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl KvEngine {
    /// Opens the database at `path`, creating it (and its parent directories) if
    /// needed, and starts the writer thread. A database left by a crash is repaired
    /// by redb on open.
    ///
    /// # Errors
    /// [`StorageError::Open`] if the file can't be created or opened — notably when
    /// another process has it open.
    pub fn open(path: impl AsRef<Path>, options: KvOptions) -> Result<Self, StorageError> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| StorageError::Open {
                path: path.clone(),
                source: redb::DatabaseError::Storage(redb::StorageError::Io(e)),
            })?;
        }
        let db = Database::builder()
            .set_cache_size(options.cache_size)
            .create(&path)
            .map_err(|source| StorageError::Open {
                path: path.clone(),
                source,
            })?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let label = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let writer = {
            let db = Arc::clone(&db);
            let max_batch = options.max_batch.max(1);
            std::thread::Builder::new()
                .name("trellis-kv-writer".into())
                .spawn(move || writer_loop(&db, rx, max_batch, &label))
                .map_err(|e| StorageError::Open {
                    path: path.clone(),
                    source: redb::DatabaseError::Storage(redb::StorageError::Io(e)),
                })?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db: Mutex::new(Some(db)),
                path,
                queue: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in a write transaction shared with other concurrent writes and returns
    /// its value once the transaction is durably committed.
    ///
    /// `f` must fail without writing, or succeed (see the [module docs](super)).
    ///
    /// # Errors
    /// [`StorageError::Aborted`] if the batch failed (nothing in it was committed),
    /// [`StorageError::Closed`] after [`close`](Self::close).
    pub async fn write<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&WriteTransaction) -> Result<T, redb::Error> + Send + 'static,
        T: Send + 'static,
    {
        let queue = self
            .inner
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(StorageError::Closed)?;
        let (tx, rx) = oneshot::channel();
        let pending = Box::new(Pending {
            f: Some(f),
            value: None,
            tx,
        });
        queue
            .send(pending)
            .await
            .map_err(|_| StorageError::Closed)?;
        rx.await
            .unwrap_or_else(|_| Err(StorageError::Aborted("writer thread stopped".into())))
    }

    /// Runs `f` in a read transaction on a blocking thread. It sees every write whose
    /// [`write`](Self::write) has returned.
    ///
    /// # Errors
    /// What `f` returns, [`StorageError::Closed`] after [`close`](Self::close), or
    /// [`StorageError::Task`] if the blocking task panicked.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&ReadTransaction) -> Result<T, redb::Error> + Send + 'static,
        T: Send + 'static,
    {
        let db = self
            .inner
            .db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(StorageError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            f(&txn).map_err(StorageError::from)
        })
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
    }

    /// Stops accepting reads and writes, lets the writer thread commit everything already
    /// queued, and waits for it. Every acknowledged write was already fsynced, so
    /// this only drains the queue. Idempotent.
    ///
    /// # Errors
    /// [`StorageError::Task`] if the writer thread panicked.
    pub async fn close(&self) -> Result<(), StorageError> {
        drop(
            self.inner
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        let writer = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(|e| StorageError::Task(e.to_string()))?
                .map_err(|_| StorageError::Task("writer thread panicked".into()))?;
        }
        drop(
            self.inner
                .db
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
        Ok(())
    }
}

// === writer thread ===

/// A queued write: applied inside the batch's transaction, then finished with the
/// batch's outcome.
trait PendingWrite: Send {
    /// Runs the write closure, keeping its value until the commit.
    fn apply(&mut self, txn: &WriteTransaction) -> Result<(), redb::Error>;
    /// Completes the caller's future: its value if the batch committed, else why not.
    fn finish(self: Box<Self>, outcome: Result<(), Arc<str>>);
}

struct Pending<F, T> {
    f: Option<F>,
    value: Option<T>,
    tx: oneshot::Sender<Result<T, StorageError>>,
}

impl<F, T> PendingWrite for Pending<F, T>
where
    F: FnOnce(&WriteTransaction) -> Result<T, redb::Error> + Send,
    T: Send,
{
    fn apply(&mut self, txn: &WriteTransaction) -> Result<(), redb::Error> {
        let f = self
            .f
            .take()
            .expect("each pending write is applied at most once");
        self.value = Some(f(txn)?);
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: Result<(), Arc<str>>) {
        let result = match (outcome, self.value) {
            (Ok(()), Some(value)) => Ok(value),
            (Ok(()), None) => Err(StorageError::Aborted("write was not applied".into())),
            (Err(reason), _) => Err(StorageError::Aborted(reason.to_string())),
        };
        // The caller may have gone away (request cancelled); its write stands anyway.
        let _ = self.tx.send(result);
    }
}

fn writer_loop(
    db: &Database,
    mut rx: mpsc::Receiver<Box<dyn PendingWrite>>,
    max_batch: usize,
    label: &str,
) {
    let batch_size =
        metrics::histogram!("trellis_storage_commit_batch_size", "db" => label.to_owned());
    let commit_seconds =
        metrics::histogram!("trellis_storage_commit_seconds", "db" => label.to_owned());
    let mut batch: Vec<Box<dyn PendingWrite>> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let started = tokio::time::Instant::now();
        let outcome = commit_batch(db, &mut batch);
        if let Err(reason) = &outcome {
            tracing::error!(db = label, writes = batch.len(), %reason, "write batch aborted; nothing in it was committed");
        }
        batch_size.record(batch.len() as f64);
        commit_seconds.record(started.elapsed().as_secs_f64());
        for pending in batch.drain(..) {
            pending.finish(outcome.clone());
        }
    }
}

/// Applies every write of the batch in one transaction and commits it durably.
fn commit_batch(db: &Database, batch: &mut [Box<dyn PendingWrite>]) -> Result<(), Arc<str>> {
    let txn = db.begin_write().map_err(|e| format!("begin: {e}"))?;
    for pending in batch.iter_mut() {
        let applied = catch_unwind(AssertUnwindSafe(|| pending.apply(&txn)));
        let failure = match applied {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("a write failed: {e}"),
            Err(_) => "a write closure panicked".to_owned(),
        };
        if let Err(e) = txn.abort() {
            tracing::warn!(error = %e, "aborting the failed batch also failed");
        }
        return Err(failure.into());
    }
    // redb's default durability is Immediate: commit returns after fsync.
    txn.commit().map_err(|e| Arc::from(format!("commit: {e}")))
}

#[cfg(test)]
mod test {
    use redb::{ReadableTableMetadata, TableDefinition};

    use super::*;

    const T: TableDefinition<'_, u64, u64> = TableDefinition::new("t");

    fn engine() -> (tempfile::TempDir, KvEngine) {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = KvEngine::open(dir.path().join("nested/dir/db.redb"), KvOptions::default())
            .expect("open");
        (dir, engine)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_all_committed() {
        let (_dir, engine) = engine();
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                engine
                    .write(move |txn| {
                        txn.open_table(T)?.insert(i, i * 2)?;
                        Ok(i)
                    })
                    .await
            }));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.expect("join").expect("write"), i as u64);
        }
        let count = engine
            .read(|txn| Ok(txn.open_table(T)?.len()?))
            .await
            .expect("read");
        assert_eq!(count, 200);
    }

    #[tokio::test]
    async fn a_failing_write_aborts_its_batch_and_nothing_is_half_applied() {
        let (_dir, engine) = engine();
        // Queue a good write and a bad one before the writer can take either, so
        // they share a batch: the good one must not be committed either.
        let good = engine.write(|txn| {
            txn.open_table(T)?.insert(1, 1)?;
            Ok(())
        });
        let bad = engine.write(|txn| {
            txn.open_table(T)?.insert(2, 2)?;
            Err::<(), _>(redb::Error::Corrupted("injected".into()))
        });
        let (good, bad) = tokio::join!(good, bad);
        assert!(
            matches!(bad, Err(StorageError::Aborted(ref m)) if m.contains("injected")),
            "{bad:?}"
        );
        let two = engine
            .read(|txn| match txn.open_table(T) {
                Ok(t) => Ok(t.get(2)?.map(|v| v.value())),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(e.into()),
            })
            .await
            .expect("read");
        assert_eq!(two, None, "the failed write must not be committed");
        if good.is_err() {
            // It shared the aborted batch; a retry succeeds.
            engine
                .write(|txn| {
                    txn.open_table(T)?.insert(1, 1)?;
                    Ok(())
                })
                .await
                .expect("retry");
        }
    }

    #[tokio::test]
    async fn a_panicking_write_does_not_kill_the_engine() {
        let (_dir, engine) = engine();
        let r = engine
            .write(|_txn| -> Result<(), redb::Error> { panic!("boom") })
            .await;
        assert!(matches!(r, Err(StorageError::Aborted(_))));
        engine
            .write(|txn| {
                txn.open_table(T)?.insert(1, 1)?;
                Ok(())
            })
            .await
            .expect("engine still works");
    }

    #[tokio::test]
    async fn data_survives_reopen_and_close_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        {
            let engine = KvEngine::open(&path, KvOptions::default()).expect("open");
            engine
                .write(|txn| {
                    txn.open_table(T)?.insert(7, 49)?;
                    Ok(())
                })
                .await
                .expect("write");
            engine.close().await.expect("close");
            engine.close().await.expect("close twice");
            assert!(matches!(
                engine.write(|_| Ok(())).await,
                Err(StorageError::Closed)
            ));
        }
        let engine = KvEngine::open(&path, KvOptions::default()).expect("reopen");
        let v = engine
            .read(|txn| Ok(txn.open_table(T)?.get(7)?.map(|v| v.value())))
            .await
            .expect("read");
        assert_eq!(v, Some(49));
    }

    #[tokio::test]
    async fn a_second_open_of_the_same_file_is_refused() {
        let (dir, _engine) = engine();
        let again = KvEngine::open(dir.path().join("nested/dir/db.redb"), KvOptions::default());
        assert!(matches!(again, Err(StorageError::Open { .. })), "{again:?}");
    }
}
