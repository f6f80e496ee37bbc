//! Durable fencing-token counters in a redb file, with group commit.
//!
//! # Why its own little writer and not `trellis-storage`'s `KvEngine`
//! `KvEngine` commits on a dedicated OS thread. A tokio runtime with paused time
//! (as the expiry tests use) cannot see that thread working, considers itself idle
//! and jumps the clock to the next timer — a lease would expire in the middle of
//! an fsync. `spawn_blocking` work holds the paused clock still, so the writer here
//! is a task that runs each batch on a blocking thread. It owns the database: once
//! it has stopped, the file is closed and can be opened again.
//!
//! # Group commit
//! The task takes every request queued at that moment (up to [`MAX_BATCH`]) into one
//! write transaction committed with [`Durability::Immediate`] (one fsync) and only
//! then answers them, so concurrent grants on different names share an fsync and a
//! token is durable before anyone sees it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::api::{CoordError, Kind};
use crate::name::Name;

use super::BACKEND;

/// `(kind, name) → newest token issued`. Kind: 1 lock, 2 election.
const TOKENS: TableDefinition<'_, (u8, &str), u64> = TableDefinition::new("fencing_tokens");

/// Most requests per transaction.
const MAX_BATCH: usize = 256;
/// Requests that may queue before callers wait (backpressure, bounded memory).
const QUEUE: usize = 4096;

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Lock => 1,
        Kind::Election => 2,
    }
}

fn backend_error(e: impl std::fmt::Display) -> CoordError {
    CoordError::Backend {
        backend: BACKEND,
        reason: e.to_string(),
    }
}

enum Request {
    /// Issue the next token: durable before the answer.
    Issue(Kind, Name, oneshot::Sender<Result<u64, CoordError>>),
    /// The newest token issued (0: none).
    Latest(Kind, Name, oneshot::Sender<Result<u64, CoordError>>),
}

/// The token store. Requests go to the writer task.
#[derive(Debug)]
pub(crate) struct Tokens {
    path: PathBuf,
    /// `None` once closed. A std `Mutex`: only held to clone the sender.
    queue: Mutex<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Tokens {
    /// Opens (or creates) the file and starts the writer task.
    pub(crate) async fn open(path: &Path) -> Result<Self, CoordError> {
        let owned = path.to_path_buf();
        let db = tokio::task::spawn_blocking(move || -> Result<Database, CoordError> {
            if let Some(parent) = owned.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    backend_error(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            let db = Database::create(&owned)
                .map_err(|e| backend_error(format!("cannot open {}: {e}", owned.display())))?;
            // Create the table now, so reads never meet a missing one.
            let txn = db.begin_write().map_err(backend_error)?;
            txn.open_table(TOKENS).map_err(backend_error)?;
            txn.commit().map_err(backend_error)?;
            Ok(db)
        })
        .await
        .map_err(backend_error)??;
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(run(Arc::new(db), rx));
        Ok(Self {
            path: path.to_path_buf(),
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<u64, CoordError>>) -> Request,
    ) -> Result<u64, CoordError> {
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(CoordError::Closed)?;
        let (tx, rx) = oneshot::channel();
        queue.send(make(tx)).await.map_err(|_| CoordError::Closed)?;
        // The writer answers everything queued before it stops; no answer means its
        // batch failed outright (nothing in it was committed).
        rx.await
            .unwrap_or_else(|_| Err(backend_error("fencing token writer failed")))
    }

    /// Issues the next token for `(kind, name)`; it is fsynced when this returns. A
    /// caller that goes away meanwhile burns the token (it is never issued again).
    pub(crate) async fn issue(&self, kind: Kind, name: &Name) -> Result<u64, CoordError> {
        self.ask(|tx| Request::Issue(kind, name.clone(), tx)).await
    }

    /// The newest token issued for `(kind, name)`, 0 if none.
    pub(crate) async fn latest(&self, kind: Kind, name: &Name) -> Result<u64, CoordError> {
        self.ask(|tx| Request::Latest(kind, name.clone(), tx)).await
    }

    /// Answers what is queued, stops the writer and closes the file. Idempotent.
    pub(crate) async fn close(&self) -> Result<(), CoordError> {
        drop(
            self.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            writer.await.map_err(backend_error)?;
        }
        Ok(())
    }
}

/// The writer task: one transaction per batch of queued requests.
async fn run(db: Arc<Database>, mut rx: mpsc::Receiver<Request>) {
    let fsync_seconds =
        metrics::histogram!("trellis_coord_token_commit_seconds", "backend" => BACKEND);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let db = Arc::clone(&db);
        let started = tokio::time::Instant::now();
        let done = tokio::task::spawn_blocking(move || {
            let outcome = apply(&db, &batch);
            (batch, outcome)
        })
        .await;
        fsync_seconds.record(started.elapsed().as_secs_f64());
        let (batch, outcome) = match done {
            Ok(done) => done,
            Err(e) => {
                // The batch's requests went down with the task (their callers see
                // an error); nothing was committed.
                tracing::error!(error = %e, "token writer task failed");
                continue;
            }
        };
        match outcome {
            Ok(values) => {
                for (request, value) in batch.into_iter().zip(values) {
                    let (Request::Issue(_, _, tx) | Request::Latest(_, _, tx)) = request;
                    let _ = tx.send(Ok(value));
                }
            }
            Err(reason) => {
                tracing::warn!(%reason, "fencing token batch not committed");
                for request in batch {
                    let (Request::Issue(_, _, tx) | Request::Latest(_, _, tx)) = request;
                    let _ = tx.send(Err(CoordError::Backend {
                        backend: BACKEND,
                        reason: format!("fencing token not stored: {reason}"),
                    }));
                }
            }
        }
    }
    // `db` drops here: the file is closed once the last batch is answered.
}

/// Runs one batch; each request's value, in order, once committed.
fn apply(db: &Database, batch: &[Request]) -> Result<Vec<u64>, String> {
    let writes = batch.iter().any(|r| matches!(r, Request::Issue(..)));
    if !writes {
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let table = match txn.open_table(TOKENS) {
            Ok(t) => Some(t),
            Err(TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.to_string()),
        };
        return batch
            .iter()
            .map(|r| {
                let (Request::Issue(kind, name, _) | Request::Latest(kind, name, _)) = r;
                match &table {
                    Some(t) => t
                        .get((kind_byte(*kind), name.as_str()))
                        .map(|v| v.map_or(0, |v| v.value()))
                        .map_err(|e| e.to_string()),
                    None => Ok(0),
                }
            })
            .collect();
    }
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| e.to_string())?;
    let mut values = Vec::with_capacity(batch.len());
    {
        let mut table = txn.open_table(TOKENS).map_err(|e| e.to_string())?;
        for request in batch {
            let (Request::Issue(kind, name, _) | Request::Latest(kind, name, _)) = request;
            let key = (kind_byte(*kind), name.as_str());
            let current = table
                .get(key)
                .map_err(|e| e.to_string())?
                .map_or(0, |v| v.value());
            if let Request::Issue(..) = request {
                let next = current
                    .checked_add(1)
                    .ok_or_else(|| format!("fencing tokens of {kind} {name} exhausted"))?;
                table.insert(key, next).map_err(|e| e.to_string())?;
                values.push(next);
            } else {
                values.push(current);
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
    Ok(values)
}

#[cfg(test)]
mod test {
    use super::*;

    #[tokio::test]
    async fn tokens_are_durable_and_increase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested").join("coord.redb");
        let name = Name::new("n").expect("name");
        let tokens = Arc::new(Tokens::open(&path).await.expect("open"));
        assert_eq!(tokens.path(), path);
        assert_eq!(tokens.latest(Kind::Lock, &name).await.expect("latest"), 0);
        // Concurrent issues share batches.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (tokens, name) = (Arc::clone(&tokens), name.clone());
            set.spawn(async move { tokens.issue(Kind::Lock, &name).await.expect("issue") });
        }
        let mut issued = set.join_all().await;
        issued.sort_unstable();
        assert_eq!(issued, (1..=20).collect::<Vec<u64>>(), "unique, no holes");
        assert_eq!(tokens.issue(Kind::Election, &name).await.expect("issue"), 1);
        tokens.close().await.expect("close");
        assert!(matches!(
            tokens.issue(Kind::Lock, &name).await,
            Err(CoordError::Closed)
        ));

        let tokens = Tokens::open(&path).await.expect("reopen");
        assert_eq!(tokens.latest(Kind::Lock, &name).await.expect("latest"), 20);
        assert_eq!(tokens.issue(Kind::Lock, &name).await.expect("issue"), 21);
        assert_eq!(
            tokens.latest(Kind::Election, &name).await.expect("latest"),
            1
        );
        tokens.close().await.expect("close");
    }
}
