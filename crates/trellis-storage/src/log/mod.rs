//! An append-only, segmented, checksummed log with group commit.
//!
//! Records are appended to the active segment file; concurrent appends are batched
//! by one writer thread into one `write` and one `fdatasync`, and each append is
//! acknowledged only after the fsync of its batch (with [`Durability::Fsync`], the
//! default). A segment is sealed at `segment_bytes`, with an index file; readers find
//! a record by offset through the sparse index (one entry every
//! `index_interval_bytes`), then scan forward.
//!
//! # Recovery
//! On open, sealed segments are trusted through their index files (rebuilt by a full,
//! checksummed scan if missing) and the active segment is scanned. A torn or corrupt
//! *tail* — bytes after the last valid frame that don't continue the log — is the
//! mark of a crash mid-write: it is truncated, and logged. Damage followed by valid
//! frames is corruption in the middle of the log: [`Log::open`] reports it with its
//! position instead of skipping it. Neither ever panics.
//!
//! # Retention
//! Whole sealed segments are deleted once their newest record is older than
//! `max_age`, or oldest first while the log is bigger than `max_bytes`.
//!
//! ```
//! use trellis_storage::log::{Log, LogOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let log = Log::open(dir.path(), LogOptions::default())?;
//! let appended = log.append(vec!["a".into(), "b".into()]).await?;
//! assert_eq!((appended.first_offset, appended.count, appended.durable), (0, 2, true));
//! let records = log.read(1, 10, 1 << 20).await?;
//! assert_eq!(&records[0].payload[..], b"b");
//! log.close().await?;
//! # Ok(())
//! # }
//! ```

pub mod frame;
mod segment;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

pub use self::frame::Record;
use self::segment::Segment;
use self::writer::{Append, Writer};

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After `fdatasync` of its batch: survives a machine crash.
    Fsync,
    /// After `write` (in the page cache): survives a process crash, not a machine
    /// crash; flushed every `flush_interval`.
    Async {
        /// How often written data is fsynced.
        flush_interval: Duration,
    },
}

/// How long and how big the log may grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete sealed segments whose newest record is older than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest sealed segments while the log is bigger than this.
    pub max_bytes: Option<u64>,
}

/// Log settings.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// A segment is sealed once it reaches this size.
    pub segment_bytes: u64,
    /// One index entry per this many bytes of frames.
    pub index_interval_bytes: u64,
    /// When appends are acknowledged.
    pub durability: Durability,
    /// What is kept.
    pub retention: Retention,
    /// Appends waiting for the writer before `append` itself waits.
    pub queue_capacity: usize,
    /// Most bytes written by one batch (one fsync).
    pub max_batch_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            index_interval_bytes: 4096,
            durability: Durability::Fsync,
            retention: Retention::default(),
            queue_capacity: 4096,
            max_batch_bytes: 8 << 20,
        }
    }
}

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The file system failed.
    #[error("log I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Data on disk is damaged where it can't be a torn tail.
    #[error("log corrupted: {0}")]
    Corrupt(String),
    /// The offset was deleted by retention.
    #[error("offset {requested} was deleted by retention; the log starts at {start}")]
    Trimmed {
        /// What was asked for.
        requested: u64,
        /// The oldest offset still kept.
        start: u64,
    },
    /// A payload over the frame limit.
    #[error("record of {0} bytes exceeds the 64 MiB limit")]
    TooLarge(usize),
    /// The log was closed.
    #[error("log is closed")]
    Closed,
    /// The writer failed earlier and the log refuses writes until reopened.
    #[error("log writer failed: {0}")]
    Failed(String),
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first record appended.
    pub first_offset: u64,
    /// Records appended.
    pub count: u64,
    /// Whether they were fsynced before this returned.
    pub durable: bool,
}

#[derive(Debug)]
pub(crate) struct Shared {
    dir: PathBuf,
    options: LogOptions,
    /// Segments, oldest first; the last one is active. A std `RwLock`: held for
    /// lookups and short updates, never across an `.await`.
    segments: RwLock<Vec<Segment>>,
    /// The offset after the last record readers may see.
    committed: watch::Sender<u64>,
    queue: Mutex<Option<mpsc::Sender<Append>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// An append-only log in a directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Log {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering from a crash as the module docs
    /// describe, and starts its writer thread.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] for damage that is not a torn tail, [`LogError::Io`] if
    /// the directory can't be read or written.
    pub fn open(dir: impl AsRef<Path>, options: LogOptions) -> Result<Self, LogError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let segments = recover(&dir, &options)?;
        let active = segments
            .last()
            .cloned()
            .expect("recovery leaves at least one segment");
        let committed = watch::channel(active.next_offset).0;
        let (tx, rx) = mpsc::channel(options.queue_capacity.max(1));
        let shared = Arc::new(Shared {
            dir,
            options,
            segments: RwLock::new(segments),
            committed,
            queue: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            flusher: Mutex::new(None),
        });
        let writer = Writer::new(Arc::clone(&shared), &active)?;
        let thread = std::thread::Builder::new()
            .name("trellis-log-writer".into())
            .spawn(move || writer.run(rx))?;
        *lock(&shared.writer) = Some(thread);
        if let Durability::Async { flush_interval } = shared.options.durability
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let weak = Arc::downgrade(&shared);
            *lock(&shared.flusher) = Some(handle.spawn(async move {
                let mut ticker = tokio::time::interval(flush_interval);
                loop {
                    ticker.tick().await;
                    let Some(shared) = weak.upgrade() else { return };
                    let file = shared.active_file();
                    drop(shared);
                    let _ = tokio::task::spawn_blocking(move || file.sync_data()).await;
                }
            }));
        }
        Ok(Self { shared })
    }

    /// Appends records; returns once they are durable (or written, with
    /// [`Durability::Async`]).
    ///
    /// # Errors
    /// [`LogError::TooLarge`] for a payload over 64 MiB; I/O errors (nothing of this
    /// append was acknowledged).
    pub async fn append(&self, payloads: Vec<Bytes>) -> Result<Appended, LogError> {
        if let Some(big) = payloads.iter().find(|p| p.len() > frame::MAX_PAYLOAD) {
            return Err(LogError::TooLarge(big.len()));
        }
        let queue = lock(&self.shared.queue).clone().ok_or(LogError::Closed)?;
        let (reply, rx) = oneshot::channel();
        queue
            .send(Append { payloads, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Up to `max_records` records (about `max_bytes`) from `from` on; empty when
    /// `from` is at the end.
    ///
    /// # Errors
    /// [`LogError::Trimmed`] if `from` was deleted by retention; [`LogError::Corrupt`]
    /// if a frame on the way fails its checksum.
    pub async fn read(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, LogError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.read(from, max_records, max_bytes))
            .await
            .map_err(|e| LogError::Failed(e.to_string()))?
    }

    /// The offset after the last record readers can see; watch it to learn of new
    /// records.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    /// The offset after the last record.
    pub fn end(&self) -> u64 {
        *self.shared.committed.borrow()
    }

    /// The oldest offset still kept.
    pub fn start(&self) -> u64 {
        self.shared
            .segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .first()
            .map_or(0, |s| s.base)
    }

    /// Bytes on disk, all segments.
    pub fn size(&self) -> u64 {
        self.shared
            .segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|s| s.size)
            .sum()
    }

    /// Deletes what retention allows, as of `now_ms`; returns the segments deleted.
    ///
    /// # Errors
    /// If a file can't be deleted.
    pub fn enforce_retention(&self, now_ms: u64) -> Result<usize, LogError> {
        self.shared.enforce_retention(now_ms)
    }

    /// Stops accepting appends, writes and fsyncs what is queued, and waits for the
    /// writer. Idempotent.
    ///
    /// # Errors
    /// If the writer thread panicked.
    pub async fn close(&self) -> Result<(), LogError> {
        drop(lock(&self.shared.queue).take());
        if let Some(flusher) = lock(&self.shared.flusher).take() {
            flusher.abort();
        }
        let writer = lock(&self.shared.writer).take();
        if let Some(writer) = writer {
            tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(|e| LogError::Failed(e.to_string()))?
                .map_err(|_| LogError::Failed("writer thread panicked".into()))?;
        }
        Ok(())
    }
}

impl Shared {
    fn active_file(&self) -> Arc<std::fs::File> {
        let segments = self
            .segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&segments.last().expect("at least one segment").file)
    }

    fn read(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, LogError> {
        let committed = *self.committed.borrow();
        let segments = self
            .segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let start = segments.first().map_or(0, |s| s.base);
        if from < start {
            return Err(LogError::Trimmed {
                requested: from,
                start,
            });
        }
        let mut out = Vec::new();
        if from >= committed || max_records == 0 {
            return Ok(out);
        }
        let first = segments
            .partition_point(|s| s.base <= from)
            .saturating_sub(1);
        let mut bytes = 0;
        let mut next = from;
        for segment in &segments[first..] {
            if out.len() >= max_records || bytes >= max_bytes || next >= committed {
                break;
            }
            bytes += segment::read(
                segment,
                next,
                committed,
                max_records,
                max_bytes.saturating_sub(bytes),
                &mut out,
            )?;
            next = out
                .last()
                .map_or(next, |r| r.offset + 1)
                .max(segment.next_offset.min(committed));
        }
        Ok(out)
    }

    fn enforce_retention(&self, now_ms: u64) -> Result<usize, LogError> {
        let Retention { max_age, max_bytes } = self.options.retention;
        let mut segments = self
            .segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut total: u64 = segments.iter().map(|s| s.size).sum();
        let mut deleted = 0;
        // Never the active (last) segment.
        while segments.len() > 1 {
            let oldest = &segments[0];
            let too_old = max_age.is_some_and(|age| {
                oldest
                    .last_timestamp
                    .saturating_add(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
                    < now_ms
            });
            let too_big = max_bytes.is_some_and(|max| total > max);
            if !(too_old || too_big) {
                break;
            }
            let oldest = segments.remove(0);
            total -= oldest.size;
            std::fs::remove_file(&oldest.path)?;
            let _ = std::fs::remove_file(segment::index_path(&self.dir, oldest.base));
            tracing::info!(dir = %self.dir.display(), base = oldest.base, next = oldest.next_offset, "retention deleted a segment");
            deleted += 1;
        }
        Ok(deleted)
    }
}

/// Lists, checks and repairs the segments of `dir`; creates the first if none.
fn recover(dir: &Path, options: &LogOptions) -> Result<Vec<Segment>, LogError> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".log")
                .filter(|n| n.len() == 20)
                .and_then(|n| n.parse().ok())
        })
        .collect();
    bases.sort_unstable();
    if bases.is_empty() {
        std::fs::File::create(segment::log_path(dir, 0))?.sync_all()?;
        sync_dir(dir)?;
        bases.push(0);
    }
    let mut segments = Vec::with_capacity(bases.len());
    let last = bases.len() - 1;
    for (i, &base) in bases.iter().enumerate() {
        let path = segment::log_path(dir, base);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let (index, next_offset, last_timestamp, size) = match (i < last)
            .then(|| segment::read_index(dir, base))
            .flatten()
        {
            Some(indexed) if indexed.size == file.metadata()?.len() => (
                indexed.index,
                indexed.next_offset,
                indexed.last_timestamp,
                indexed.size,
            ),
            _ => {
                let scan = segment::scan(&file, base, options.index_interval_bytes)?;
                if let Some((position, why)) = &scan.damage {
                    let middle = i < last
                        || segment::valid_frame_after(&file, *position, scan.next_offset)?
                            .is_some();
                    if middle {
                        return Err(LogError::Corrupt(format!(
                            "{}: position {position}: {why}; valid records follow, so this is not a torn write (refusing to drop them)",
                            path.display()
                        )));
                    }
                    tracing::warn!(
                        segment = %path.display(),
                        position,
                        dropped_bytes = scan.file_size - scan.valid_size,
                        reason = %why,
                        "truncating a torn tail left by a crash"
                    );
                    file.set_len(scan.valid_size)?;
                    file.sync_all()?;
                }
                (
                    scan.index,
                    scan.next_offset,
                    scan.last_timestamp,
                    scan.valid_size,
                )
            }
        };
        if let Some(previous) = segments.last().map(|s: &Segment| s.next_offset)
            && previous != base
        {
            return Err(LogError::Corrupt(format!(
                "{}: starts at offset {base}, but the previous segment ends at {previous}",
                path.display()
            )));
        }
        segments.push(Segment {
            base,
            file: Arc::new(file),
            path,
            index,
            size,
            next_offset,
            last_timestamp,
        });
    }
    Ok(segments)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod test;
