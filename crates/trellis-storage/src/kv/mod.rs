//! A group-committing key-value engine on redb.
//!
//! # Why group commit
//! An fsync costs far more than the write it makes durable (about a millisecond on
//! an SSD, more on cloud disks). Committing each write on its own caps a store at
//! roughly one write per fsync. [`KvEngine`] instead runs every write on one writer
//! thread: it takes all writes queued at that moment (up to
//! [`KvOptions::max_batch`]), applies them in a single redb transaction, commits it
//! with [`redb::Durability::Immediate`] — one fsync — and only then completes each
//! write's future. Under load, batches grow by themselves and throughput scales with
//! concurrency; with one writer, latency is that of a plain commit.
//!
//! # Contract for write closures
//! A write closure runs inside a transaction shared with other writes, so it must
//! **either fail without having written anything, or succeed**. Logical failures
//! (a compare-and-set that doesn't match) are therefore *values* — return
//! `Ok(Err(Mismatch))` after checking, before writing. An `Err(redb::Error)` or a
//! panic aborts the whole batch: nothing in it is committed and every write in it
//! fails with [`StorageError::Aborted`], so nothing half-applied is ever
//! acknowledged.
//!
//! ```
//! use redb::{ReadableTable, TableDefinition};
//! use trellis_storage::{KvEngine, KvOptions};
//!
//! const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let engine = KvEngine::open(dir.path().join("db.redb"), KvOptions::default())?;
//!
//! // Acknowledged only after the fsync of the batch it was part of.
//! let n = engine
//!     .write(|txn| {
//!         let mut table = txn.open_table(COUNTERS)?;
//!         let n = table.get("hits")?.map(|v| v.value()).unwrap_or(0) + 1;
//!         table.insert("hits", n)?;
//!         Ok(n)
//!     })
//!     .await?;
//! assert_eq!(n, 1);
//!
//! let read = engine
//!     .read(|txn| Ok(txn.open_table(COUNTERS)?.get("hits")?.map(|v| v.value())))
//!     .await?;
//! assert_eq!(read, Some(1));
//! engine.close().await?;
//! # Ok(())
//! # }
//! ```

mod engine;
mod error;

pub use engine::{KvEngine, KvOptions};
pub use error::StorageError;
