//! The writer thread: batches appends into one write and one fsync, rolls segments.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::segment::{self, Segment};
use super::{Appended, Durability, LogError, Shared};

/// One queued append.
#[derive(Debug)]
pub(crate) struct Append {
    pub(crate) payloads: Vec<Bytes>,
    pub(crate) reply: oneshot::Sender<Result<Appended, LogError>>,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    file: File,
    base: u64,
    size: u64,
    next_offset: u64,
    since_index: u64,
    /// Set when a failed write could not be undone: no more appends until reopened.
    broken: Option<String>,
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, active: &Segment) -> Result<Self, LogError> {
        let file = OpenOptions::new().append(true).open(&active.path)?;
        let since_index = match active.index.last() {
            Some((_, position)) => active.size - position,
            None => shared.options.index_interval_bytes,
        };
        Ok(Self {
            file,
            base: active.base,
            size: active.size,
            next_offset: active.next_offset,
            since_index,
            shared,
            broken: None,
        })
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        let batch_size = metrics::histogram!("trellis_log_batch_records");
        let fsync_seconds = metrics::histogram!("trellis_log_fsync_seconds");
        let max_bytes = self.shared.options.max_batch_bytes;
        let mut batch: Vec<Append> = Vec::new();
        let mut buf = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            let mut bytes: usize = first.payloads.iter().map(|p| p.len()).sum();
            batch.push(first);
            while bytes < max_bytes {
                match rx.try_recv() {
                    Ok(next) => {
                        bytes += next.payloads.iter().map(|p| p.len()).sum::<usize>();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            let records: usize = batch.iter().map(|a| a.payloads.len()).sum();
            batch_size.record(records as f64);
            let started = tokio::time::Instant::now();
            let result = self.commit(&mut batch, &mut buf);
            fsync_seconds.record(started.elapsed().as_secs_f64());
            if let Err(e) = result {
                let reason = e.to_string();
                tracing::error!(error = %reason, appends = batch.len(), "log batch failed; nothing in it was acknowledged");
                for append in batch.drain(..) {
                    let _ = append.reply.send(Err(LogError::Failed(reason.clone())));
                }
            }
            if let Err(e) = self.maybe_roll() {
                tracing::error!(error = %e, "rolling the log segment failed");
                self.broken.get_or_insert(e.to_string());
            }
        }
        // Queue closed: everything queued was written; make it durable.
        let _ = self.file.sync_data();
    }

    /// Writes and syncs one batch, then acknowledges each append in it.
    fn commit(&mut self, batch: &mut Vec<Append>, buf: &mut Vec<u8>) -> Result<(), LogError> {
        if let Some(reason) = &self.broken {
            return Err(LogError::Failed(reason.clone()));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let interval = self.shared.options.index_interval_bytes;
        buf.clear();
        let mut offset = self.next_offset;
        let mut index = Vec::new();
        let mut since_index = self.since_index;
        for append in batch.iter() {
            for payload in &append.payloads {
                if since_index >= interval {
                    index.push((offset, self.size + buf.len() as u64));
                    since_index = 0;
                }
                let before = buf.len();
                super::frame::encode(offset, now, payload, buf);
                since_index += (buf.len() - before) as u64;
                offset += 1;
            }
        }
        if let Err(e) = self.write(buf) {
            // Undo a partial write so the next batch doesn't land after garbage.
            if let Err(undo) = self.file.set_len(self.size) {
                self.broken = Some(format!("{e}; undoing the partial write failed too: {undo}"));
            }
            return Err(e);
        }
        let durable = matches!(self.shared.options.durability, Durability::Fsync);
        self.size += buf.len() as u64;
        self.since_index = since_index;
        let first_offset = self.next_offset;
        self.next_offset = offset;
        {
            let mut segments = self
                .shared
                .segments
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let active = segments.last_mut().expect("at least one segment");
            active.index.extend(index);
            active.size = self.size;
            active.next_offset = self.next_offset;
            active.last_timestamp = now;
        }
        self.shared.committed.send_replace(self.next_offset);
        let mut next = first_offset;
        for append in batch.drain(..) {
            let count = append.payloads.len() as u64;
            let _ = append.reply.send(Ok(Appended {
                first_offset: next,
                count,
                durable,
            }));
            next += count;
        }
        Ok(())
    }

    fn write(&mut self, buf: &[u8]) -> Result<(), LogError> {
        self.file.write_all(buf)?;
        if matches!(self.shared.options.durability, Durability::Fsync) {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Seals the active segment once it is full and starts the next.
    fn maybe_roll(&mut self) -> Result<(), LogError> {
        if self.size < self.shared.options.segment_bytes {
            return Ok(());
        }
        self.file.sync_all()?;
        let dir = &self.shared.dir;
        let sealed = {
            let segments = self
                .shared
                .segments
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            segments.last().expect("at least one segment").clone()
        };
        segment::write_index(dir, &sealed)?;
        let base = self.next_offset;
        let path = segment::log_path(dir, base);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .append(true)
            .open(&path)?;
        file.sync_all()?;
        super::sync_dir(dir)?;
        let reader = OpenOptions::new().read(true).open(&path)?;
        self.shared
            .segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Segment {
                base,
                file: Arc::new(reader),
                path,
                index: Vec::new(),
                size: 0,
                next_offset: base,
                last_timestamp: 0,
            });
        tracing::debug!(dir = %dir.display(), sealed = self.base, next = base, "log segment rolled");
        self.file = file;
        self.base = base;
        self.size = 0;
        self.since_index = self.shared.options.index_interval_bytes;
        Ok(())
    }
}
