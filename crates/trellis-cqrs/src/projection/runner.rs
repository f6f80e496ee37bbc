//! Running a projection: follow its source, apply batches, commit each with the
//! checkpoint; report status; rebuild.

use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_eventstore::subscription::{Source, Start};
use trellis_eventstore::{
    Direction, EventStore, EventStoreError, ReadStream, RecordedEvent, StreamName,
};
use trellis_state::{
    ETag, Key, Operation, Precondition, StateError, StateStore, Value, WriteOptions,
};

use super::view::{CHECKPOINT, View, ViewBatch};
use super::{Projection, ProjectionError};

/// Default events per batch.
const DEFAULT_BATCH: usize = 256;
/// Most events per batch: a batch is one state store transaction.
const MAX_BATCH: usize = 10_000;
/// Longest projection name, in bytes.
const MAX_NAME: usize = 200;
/// Keys deleted per transaction by a rebuild.
const DELETE_PAGE: usize = 256;
/// How often a runner looks whether a rebuild it waits for has finished.
const REBUILD_POLL: Duration = Duration::from_millis(200);
/// How often an idle runner checks that its checkpoint is still the one it wrote.
const CHECKPOINT_POLL: Duration = Duration::from_secs(2);
/// Default first pause after a failure; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

// === status ===

/// What a runner is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProjectionState {
    /// Loading its checkpoint.
    Starting,
    /// Applying history: there were more events than one batch.
    CatchingUp,
    /// Caught up with the head; applying events as they are appended.
    Live,
    /// The last attempt failed; retrying with backoff.
    Failing {
        /// The error.
        error: String,
    },
    /// A [`rebuild`](ProjectionRunner::rebuild) of the projection is deleting the
    /// view; waiting for it to finish.
    WaitingForRebuild,
    /// Not running.
    Stopped,
}

/// A runner's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// The next position (for [`Source::All`] and [`Source::Category`]) or stream
    /// version (for [`Source::Stream`]) to apply: everything before it is in the view.
    pub checkpoint: u64,
    /// The source's head when last read, in the same unit: the position the next
    /// event appended to the store will get, or the stream's next version.
    pub head: u64,
    /// `head - checkpoint`: events not yet applied. For a category it counts every
    /// stream's events while catching up (an upper bound), and is 0 once live.
    pub lag: u64,
    /// What the runner is doing.
    pub state: ProjectionState,
    /// The latest failure, kept after recovery.
    pub last_error: Option<String>,
    /// Events applied and committed by this runner since it was built.
    pub applied: u64,
}

// === builder ===

/// Configures a [`ProjectionRunner`]; see [`ProjectionRunner::builder`].
pub struct ProjectionRunnerBuilder {
    projection: Arc<dyn Projection>,
    batch_size: usize,
    prefix: Option<String>,
    start: Start,
    backoff: (Duration, Duration),
}

impl fmt::Debug for ProjectionRunnerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionRunnerBuilder")
            .field("projection", &self.projection.name())
            .field("batch_size", &self.batch_size)
            .field("prefix", &self.prefix)
            .field("start", &self.start)
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl ProjectionRunnerBuilder {
    /// Most events per batch (one state store transaction). Default 256, clamped to
    /// 1..=10000. A batch takes what is available and never waits to fill up.
    pub fn batch_size(&mut self, events: usize) -> &mut Self {
        self.batch_size = events.clamp(1, MAX_BATCH);
        self
    }

    /// The prefix of the view's keys and its checkpoint. Default
    /// `projections/{name}/`. It must not be a prefix of any other data:
    /// [`rebuild`](ProjectionRunner::rebuild) deletes every key under it.
    pub fn key_prefix(&mut self, prefix: impl Into<String>) -> &mut Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Where to start when there is no checkpoint yet (first run, or after a
    /// rebuild): [`Start::Beginning`] (the default), [`Start::End`] (only events
    /// appended from then on), or [`Start::At`] a position (a version for a stream).
    pub fn start_from(&mut self, start: Start) -> &mut Self {
        self.start = start;
        self
    }

    /// The pause after a failure: `min`, doubling up to `max`. Default 100 ms to 30 s.
    pub fn retry_backoff(&mut self, min: Duration, max: Duration) -> &mut Self {
        self.backoff = (min, max.max(min));
        self
    }

    /// Builds the runner, reading from `events` and keeping the view and checkpoint
    /// in `state`.
    ///
    /// # Errors
    /// [`ProjectionError::InvalidName`] or [`ProjectionError::InvalidKey`] if the
    /// projection's name or the key prefix is not usable.
    pub fn build(
        &self,
        events: Arc<dyn EventStore>,
        state: Arc<dyn StateStore>,
    ) -> Result<ProjectionRunner, ProjectionError> {
        let name = self.projection.name().to_owned();
        validate_name(&name)?;
        let prefix = self
            .prefix
            .clone()
            .unwrap_or_else(|| format!("projections/{name}/"));
        if prefix.is_empty() {
            return Err(ProjectionError::invalid_key(
                &prefix,
                "the key prefix must not be empty: a rebuild deletes everything under it",
            ));
        }
        let checkpoint_key = format!("{prefix}{CHECKPOINT}");
        let checkpoint = Key::new(checkpoint_key.clone())
            .map_err(|e| ProjectionError::invalid_key(&checkpoint_key, e))?;
        let status = watch::Sender::new(ProjectionStatus {
            name: name.clone(),
            checkpoint: 0,
            head: 0,
            lag: 0,
            state: ProjectionState::Stopped,
            last_error: None,
            applied: 0,
        });
        let label = name.clone();
        let metrics = Metrics {
            lag: metrics::gauge!("trellis_projection_lag_events", "projection" => label.clone()),
            applied: metrics::counter!("trellis_projection_events_applied_total", "projection" => label.clone()),
            failures: metrics::counter!("trellis_projection_failures_total", "projection" => label.clone()),
            conflicts: metrics::counter!("trellis_projection_checkpoint_conflicts_total", "projection" => label),
        };
        Ok(ProjectionRunner {
            inner: Arc::new(Inner {
                source: self.projection.source(),
                projection: Arc::clone(&self.projection),
                name,
                events,
                state,
                batch_size: self.batch_size,
                prefix: Arc::from(prefix),
                checkpoint,
                start: self.start,
                backoff: self.backoff,
                status,
                metrics,
            }),
        })
    }
}

fn validate_name(name: &str) -> Result<(), ProjectionError> {
    let reason = if name.is_empty() || name.len() > MAX_NAME {
        "a projection name is 1 to 200 bytes"
    } else if name.contains('/') {
        "a projection name contains no '/' (one projection's keys would be under another's prefix)"
    } else if name.starts_with('$') {
        "a projection name does not start with '$'"
    } else if name.chars().any(char::is_control) {
        "a projection name contains no control characters"
    } else {
        return Ok(());
    };
    Err(ProjectionError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

// === runner ===

/// Runs a [`Projection`]: follows its source from the checkpoint (history, then
/// live), applies batches of events, and commits each batch's view writes together
/// with the new checkpoint; see the [module docs](super) for why that gives an
/// exactly-once effect, even with several runners of one projection.
///
/// Failures (the projection's, or a store's) are retried with backoff, forever;
/// [`status`](Self::status) says what is happening. Time comes from `tokio::time`,
/// so tests can pause it.
#[derive(Clone)]
pub struct ProjectionRunner {
    inner: Arc<Inner>,
}

struct Inner {
    projection: Arc<dyn Projection>,
    /// The projection's name and source, asked once.
    name: String,
    source: Source,
    events: Arc<dyn EventStore>,
    state: Arc<dyn StateStore>,
    batch_size: usize,
    prefix: Arc<str>,
    /// `{prefix}$checkpoint`.
    checkpoint: Key,
    start: Start,
    backoff: (Duration, Duration),
    /// The status, watched by handles and waiters.
    status: watch::Sender<ProjectionStatus>,
    metrics: Metrics,
}

struct Metrics {
    lag: metrics::Gauge,
    applied: metrics::Counter,
    failures: metrics::Counter,
    conflicts: metrics::Counter,
}

impl fmt::Debug for ProjectionRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("ProjectionRunner")
            .field("name", &inner.name)
            .field("source", &inner.source)
            .field("prefix", &inner.prefix)
            .field("batch_size", &inner.batch_size)
            .field("start", &inner.start)
            .field("events", &inner.events)
            .field("state", &inner.state)
            .finish_non_exhaustive()
    }
}

/// The stored checkpoint: `{"position": P}`, or `{"rebuilding": true}` while a
/// rebuild deletes the view.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CheckpointDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    position: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    rebuilding: bool,
}

impl CheckpointDoc {
    fn value(&self) -> Value {
        // A struct of an integer and a bool always serializes.
        Value::json(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Where a runner is: the next position to apply and the etag of the checkpoint
/// that says so (every commit requires it).
#[derive(Debug)]
struct Cursor {
    next: u64,
    etag: ETag,
}

/// Events read from the source.
#[derive(Debug)]
struct Page {
    events: Vec<RecordedEvent>,
    /// Where the next read starts: after the last event, or further when the read
    /// found everything up to the head (a category's other events are skipped).
    next: u64,
    /// The source's head.
    head: u64,
    /// Whether the read reached the head.
    caught_up: bool,
}

impl ProjectionRunner {
    /// A builder for running `projection`, with the defaults: batches of up to 256
    /// events, keys under `projections/{name}/`, start from the beginning.
    pub fn builder(projection: impl Projection) -> ProjectionRunnerBuilder {
        ProjectionRunnerBuilder {
            projection: Arc::new(projection),
            batch_size: DEFAULT_BATCH,
            prefix: None,
            start: Start::Beginning,
            backoff: (MIN_BACKOFF, MAX_BACKOFF),
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current status.
    pub fn status(&self) -> ProjectionStatus {
        self.inner.status.borrow().clone()
    }

    /// The status, to watch it change.
    pub fn status_changes(&self) -> watch::Receiver<ProjectionStatus> {
        self.inner.status.subscribe()
    }

    /// Waits until the checkpoint reaches `position` (e.g. a command's
    /// [`Committed::positions`](crate::Committed::positions)`.end`, to read one's own
    /// writes), or the runner is stopped; returns the status then.
    pub async fn wait_for_checkpoint(&self, position: u64) -> ProjectionStatus {
        let mut changes = self.inner.status.subscribe();
        let reached = changes
            .wait_for(|s| s.checkpoint >= position || s.state == ProjectionState::Stopped)
            .await
            .map(|s| s.clone());
        // The sender lives as long as `self`: waiting can't fail.
        reached.unwrap_or_else(|_| self.status())
    }

    /// Reads the committed view.
    pub fn view(&self) -> View {
        View::new(
            Arc::clone(&self.inner.state),
            Arc::clone(&self.inner.prefix),
        )
    }

    /// Runs until `shutdown` completes. Several runners of one projection may run at
    /// once (in one process or several): they never apply an event twice, but only
    /// one makes progress at a time, so more than one is only for availability.
    ///
    /// Stopping is safe at any moment: what was not committed is applied again by
    /// the next run. Run one runner once at a time (its status describes one run);
    /// build another runner for a second one.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) {
        let signal = pin!(shutdown);
        let mut shutdown = Shutdown::new(signal);
        self.inner.set_state(ProjectionState::Starting);
        self.inner.run(&mut shutdown).await;
        self.inner.set_state(ProjectionState::Stopped);
    }

    /// Runs on a task of its own until the handle is stopped or dropped.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> ProjectionHandle {
        let (stop, task) = self.start_task();
        ProjectionHandle {
            runner: self,
            stop,
            task: Some(task),
        }
    }

    fn start_task(&self) -> (watch::Sender<bool>, JoinHandle<()>) {
        let (stop, mut stopped) = watch::channel(false);
        // Set before the task starts, so a waiter does not see the old `Stopped`.
        self.inner.set_state(ProjectionState::Starting);
        let runner = self.clone();
        let task = tokio::spawn(async move {
            runner
                .run(async move {
                    // A dropped sender stops the runner too.
                    let _ = stopped.wait_for(|stop| *stop).await;
                })
                .await;
        });
        (stop, task)
    }

    /// Deletes the view and the checkpoint, so that the projection is applied again
    /// from its [start](ProjectionRunnerBuilder::start_from) (re-resolved: from
    /// [`Start::End`] the view starts empty at the current head).
    ///
    /// Readers see an empty, then partial, view until the runners have caught up
    /// again. Runners of this projection, here or in other processes, are fenced
    /// while it runs: the checkpoint key holds a "rebuilding" marker that fails their
    /// commits and makes them wait. If the rebuild itself is interrupted, they keep
    /// waiting until a rebuild is run again and completes.
    ///
    /// A running [`ProjectionHandle`] has its own [`rebuild`](ProjectionHandle::rebuild)
    /// that also restarts its task.
    ///
    /// # Errors
    /// If the state store fails; run it again to finish.
    pub async fn rebuild(&self) -> Result<(), ProjectionError> {
        let inner = &self.inner;
        let rebuilding = CheckpointDoc {
            position: None,
            rebuilding: true,
        };
        let marker = inner
            .state
            .set(
                &inner.checkpoint,
                rebuilding.value(),
                WriteOptions::default(),
            )
            .await?;
        tracing::info!(projection = %inner.name, prefix = %inner.prefix, "rebuilding: deleting the view");
        let mut after: Option<Key> = None;
        let mut deleted = 0usize;
        loop {
            let page = inner
                .state
                .list(&inner.prefix, after.as_ref(), DELETE_PAGE)
                .await?;
            let deletes: Vec<Operation> = page
                .keys
                .iter()
                .filter(|key| **key != inner.checkpoint)
                .map(|key| Operation::Delete {
                    key: key.clone(),
                    precondition: Precondition::None,
                })
                .collect();
            if !deletes.is_empty() {
                deleted += deletes.len();
                inner.state.transact(deletes).await?;
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        match inner
            .state
            .delete(&inner.checkpoint, Precondition::IfMatch(marker))
            .await
        {
            Ok(_) => {
                tracing::info!(projection = %inner.name, deleted, "view deleted; the projection starts again");
            }
            // Another rebuild started meanwhile; it lifts the fence when done.
            Err(StateError::EtagMismatch { .. }) => {
                tracing::info!(projection = %inner.name, deleted, "view deleted; another rebuild is in progress");
            }
            Err(e) => return Err(e.into()),
        }
        inner.status.send_modify(|s| {
            s.checkpoint = 0;
            s.lag = s.head;
        });
        Ok(())
    }
}

impl Inner {
    async fn run<F: Future<Output = ()>>(&self, shutdown: &mut Shutdown<'_, F>) {
        let mut backoff = Backoff::new(self.backoff);
        'resume: loop {
            let Some(resumed) = shutdown.race(self.resume()).await else {
                break;
            };
            let mut cursor = match resumed {
                Ok(Some(cursor)) => cursor,
                Ok(None) => {
                    self.set_state(ProjectionState::WaitingForRebuild);
                    if !shutdown.sleep(REBUILD_POLL).await {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    self.fail(&e);
                    if !shutdown.sleep(backoff.next()).await {
                        break;
                    }
                    continue;
                }
            };
            tracing::debug!(projection = %self.name, checkpoint = cursor.next, "resuming");
            self.status.send_modify(|s| {
                s.checkpoint = cursor.next;
                s.lag = s.head.saturating_sub(cursor.next);
            });
            let mut head = self.events.head();
            loop {
                // Seen before reading, so an append that lands during the read wakes
                // the wait below.
                let head_seen = *head.borrow_and_update();
                let page = match shutdown.race(self.read(cursor.next, head_seen)).await {
                    None => break 'resume,
                    Some(Ok(page)) => page,
                    Some(Err(e)) => {
                        self.fail(&e.into());
                        if !shutdown.sleep(backoff.next()).await {
                            break 'resume;
                        }
                        continue 'resume;
                    }
                };
                self.observe(page.head, cursor.next);
                if page.events.is_empty() {
                    // Nothing to apply: the cursor may move past other categories'
                    // events in memory; the checkpoint follows with the next batch.
                    cursor.next = page.next;
                    self.progress(cursor.next, page.head, page.caught_up, 0);
                    let wake = shutdown.race(async {
                        tokio::select! {
                            changed = head.changed() => Wake::Head(changed.is_ok()),
                            () = tokio::time::sleep(CHECKPOINT_POLL) => Wake::Poll,
                        }
                    });
                    match wake.await {
                        None => break 'resume,
                        Some(Wake::Head(true)) => continue,
                        Some(Wake::Head(false)) => {
                            let e = EventStoreError::Unavailable {
                                backend: self.events.backend(),
                                reason: "the event store stopped publishing its head".into(),
                            };
                            self.fail(&e.into());
                            if !shutdown.sleep(backoff.next()).await {
                                break 'resume;
                            }
                            continue 'resume;
                        }
                        // Idle: is the checkpoint still ours? A rebuild or another
                        // runner would otherwise go unnoticed until the next event.
                        Some(Wake::Poll) => match self.state.get(&self.checkpoint).await {
                            Ok(Some(item)) if item.etag == cursor.etag => continue,
                            Ok(_) => {
                                tracing::debug!(projection = %self.name, "the checkpoint changed while idle; reloading it");
                                continue 'resume;
                            }
                            Err(e) => {
                                self.fail(&e.into());
                                if !shutdown.sleep(backoff.next()).await {
                                    break 'resume;
                                }
                                continue 'resume;
                            }
                        },
                    }
                }
                let mut events = page.events;
                if self.source == Source::All {
                    events.retain(|e| !e.stream.is_internal());
                }
                let mut operations = Vec::new();
                if !events.is_empty() {
                    loop {
                        let mut view =
                            ViewBatch::new(Arc::clone(&self.state), Arc::clone(&self.prefix));
                        match shutdown
                            .race(self.projection.apply(&events, &mut view))
                            .await
                        {
                            None => break 'resume,
                            Some(Ok(())) => {
                                operations = view.into_operations();
                                break;
                            }
                            Some(Err(e)) => {
                                self.fail(&e);
                                if !shutdown.sleep(backoff.next()).await {
                                    break 'resume;
                                }
                            }
                        }
                    }
                }
                // NOTE: the checkpoint goes first, so a failed precondition is always
                // operation 0; view writes have none.
                let position = CheckpointDoc {
                    position: Some(page.next),
                    rebuilding: false,
                };
                let mut transaction = Vec::with_capacity(operations.len() + 1);
                transaction.push(Operation::Upsert {
                    key: self.checkpoint.clone(),
                    value: position.value(),
                    options: WriteOptions {
                        precondition: Precondition::IfMatch(cursor.etag.clone()),
                        ttl: None,
                    },
                });
                let writes = operations.len();
                transaction.extend(operations);
                // Not raced with shutdown: a commit in flight is left to finish.
                match self.state.transact(transaction).await {
                    Ok(etags) => {
                        let Some(Some(etag)) = etags.into_iter().next() else {
                            let e = ProjectionError::Checkpoint {
                                key: self.checkpoint.to_string(),
                                reason: "the state store returned no etag for it".into(),
                            };
                            self.fail(&e);
                            continue 'resume;
                        };
                        tracing::trace!(projection = %self.name, events = events.len(), writes, checkpoint = page.next, "batch committed");
                        cursor = Cursor {
                            next: page.next,
                            etag,
                        };
                        backoff.reset();
                        self.metrics.applied.increment(events.len() as u64);
                        self.progress(cursor.next, page.head, page.caught_up, events.len());
                    }
                    Err(StateError::TransactionConflict { .. }) => {
                        // Another runner committed, or a rebuild began: our batch is
                        // void. Go on from the checkpoint as it is now.
                        self.metrics.conflicts.increment(1);
                        tracing::debug!(projection = %self.name, checkpoint = cursor.next, "the checkpoint moved under us; reloading it");
                        continue 'resume;
                    }
                    Err(e) => {
                        self.fail(&e.into());
                        if !shutdown.sleep(backoff.next()).await {
                            break 'resume;
                        }
                        continue 'resume;
                    }
                }
            }
        }
    }

    /// The stored checkpoint, writing the start position if there is none; `None`
    /// while a rebuild is in progress.
    async fn resume(&self) -> Result<Option<Cursor>, ProjectionError> {
        loop {
            if let Some(item) = self.state.get(&self.checkpoint).await? {
                let malformed = |reason: String| ProjectionError::Checkpoint {
                    key: self.checkpoint.to_string(),
                    reason,
                };
                let doc: CheckpointDoc = serde_json::from_slice(&item.value.data)
                    .map_err(|e| malformed(e.to_string()))?;
                if doc.rebuilding {
                    return Ok(None);
                }
                let next = doc
                    .position
                    .ok_or_else(|| malformed("it has no position".into()))?;
                return Ok(Some(Cursor {
                    next,
                    etag: item.etag,
                }));
            }
            let next = self.start_position().await?;
            let doc = CheckpointDoc {
                position: Some(next),
                rebuilding: false,
            };
            let if_absent = WriteOptions {
                precondition: Precondition::IfAbsent,
                ttl: None,
            };
            match self
                .state
                .set(&self.checkpoint, doc.value(), if_absent)
                .await
            {
                Ok(etag) => {
                    tracing::info!(projection = %self.name, start = next, "no checkpoint: starting");
                    return Ok(Some(Cursor { next, etag }));
                }
                // Another runner wrote it first: use theirs.
                Err(StateError::KeyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn start_position(&self) -> Result<u64, ProjectionError> {
        Ok(match (self.start, &self.source) {
            (Start::Beginning, _) => 0,
            (Start::At(p), _) => p,
            (Start::End, Source::All | Source::Category(_)) => *self.events.head().borrow(),
            (Start::End, Source::Stream(stream)) => self
                .events
                .stream_info(stream)
                .await?
                .and_then(|info| info.version)
                .map_or(0, |v| v + 1),
        })
    }

    /// Up to a batch of events from `from`; `head_seen` is the store's head seen
    /// before reading.
    async fn read(&self, from: u64, head_seen: u64) -> Result<Page, EventStoreError> {
        let limit = self.batch_size;
        match &self.source {
            Source::All | Source::Category(_) => {
                let events = match &self.source {
                    Source::Category(category) => {
                        self.events.read_category(category, from, limit).await?
                    }
                    _ => self.events.read_all(from, limit).await?,
                };
                let caught_up = events.len() < limit;
                let after = events.last().map_or(from, |e| e.position + 1);
                // A short read saw every event below the head seen before it (the
                // store's global order never skips), so there is nothing of ours
                // below it that is not in the page.
                let next = if caught_up {
                    after.max(head_seen)
                } else {
                    after
                };
                Ok(Page {
                    events,
                    next,
                    head: head_seen.max(next),
                    caught_up,
                })
            }
            Source::Stream(stream) => self.read_stream(stream, from).await,
        }
    }

    async fn read_stream(&self, stream: &StreamName, from: u64) -> Result<Page, EventStoreError> {
        let read = ReadStream {
            from: Some(from),
            limit: self.batch_size,
            direction: Direction::Forward,
            as_of: None,
        };
        let slice = match self.events.read_stream(stream, read).await {
            Ok(slice) => slice,
            // Not there yet: it may be created later.
            Err(EventStoreError::StreamNotFound(_)) => {
                return Ok(Page {
                    events: Vec::new(),
                    next: from,
                    head: from,
                    caught_up: true,
                });
            }
            Err(e) => return Err(e),
        };
        let caught_up = slice.next.is_none();
        let after = slice.events.last().map_or(from, |e| e.version + 1);
        let head = slice.version.map_or(0, |v| v + 1);
        // Versions the stream hides (truncated, soft-deleted) are skipped.
        let next = if caught_up { after.max(head) } else { after };
        Ok(Page {
            events: slice.events,
            next,
            head: head.max(next),
            caught_up,
        })
    }

    fn set_state(&self, state: ProjectionState) {
        self.status.send_modify(|s| s.state = state);
    }

    fn progress(&self, checkpoint: u64, head: u64, caught_up: bool, applied: usize) {
        let lag = head.saturating_sub(checkpoint);
        #[allow(clippy::cast_precision_loss)] // a gauge is an f64
        self.metrics.lag.set(lag as f64);
        self.status.send_modify(|s| {
            s.checkpoint = checkpoint;
            s.head = head;
            s.lag = lag;
            s.applied += applied as u64;
            s.state = if caught_up {
                ProjectionState::Live
            } else {
                ProjectionState::CatchingUp
            };
        });
    }

    /// Records the head seen by a read, so the lag shows while a batch is applied
    /// (or keeps failing).
    fn observe(&self, head: u64, checkpoint: u64) {
        let lag = head.saturating_sub(checkpoint);
        #[allow(clippy::cast_precision_loss)] // a gauge is an f64
        self.metrics.lag.set(lag as f64);
        self.status.send_modify(|s| {
            s.head = head;
            s.lag = lag;
        });
    }

    fn fail(&self, error: &ProjectionError) {
        self.metrics.failures.increment(1);
        tracing::warn!(projection = %self.name, %error, "projection failed; retrying");
        let error = error.to_string();
        self.status.send_modify(|s| {
            s.last_error = Some(error.clone());
            s.state = ProjectionState::Failing { error };
        });
    }
}

/// Why an idle runner woke up.
enum Wake {
    /// The store's head moved (`false`: the store stopped publishing it).
    Head(bool),
    /// Time to check the checkpoint.
    Poll,
}

// === handle ===

/// A runner on a task of its own ([`ProjectionRunner::spawn`]); stops when
/// [`stop`](Self::stop) is called or it is dropped.
#[derive(Debug)]
pub struct ProjectionHandle {
    runner: ProjectionRunner,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl ProjectionHandle {
    /// The runner.
    pub fn runner(&self) -> &ProjectionRunner {
        &self.runner
    }

    /// The current status.
    pub fn status(&self) -> ProjectionStatus {
        self.runner.status()
    }

    /// See [`ProjectionRunner::wait_for_checkpoint`].
    pub async fn wait_for_checkpoint(&self, position: u64) -> ProjectionStatus {
        self.runner.wait_for_checkpoint(position).await
    }

    /// Reads the committed view.
    pub fn view(&self) -> View {
        self.runner.view()
    }

    /// Stops the task, [rebuilds](ProjectionRunner::rebuild) the projection and
    /// starts the task again (also when the rebuild failed).
    ///
    /// # Errors
    /// As [`ProjectionRunner::rebuild`].
    pub async fn rebuild(&mut self) -> Result<(), ProjectionError> {
        self.halt().await;
        let rebuilt = self.runner.rebuild().await;
        let (stop, task) = self.runner.start_task();
        self.stop = stop;
        self.task = Some(task);
        rebuilt
    }

    /// Stops the runner and waits for it: a commit in flight finishes, nothing else
    /// is started.
    pub async fn stop(mut self) {
        self.halt().await;
    }

    async fn halt(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::error!(projection = %self.runner.name(), error = %e, "projection task failed");
        }
    }
}

impl Drop for ProjectionHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

// === shutdown and backoff ===

/// A shutdown signal that can be raced against many futures, one after another.
struct Shutdown<'a, F> {
    signal: Pin<&'a mut F>,
    fired: bool,
}

impl<'a, F: Future<Output = ()>> Shutdown<'a, F> {
    fn new(signal: Pin<&'a mut F>) -> Self {
        Self {
            signal,
            fired: false,
        }
    }

    /// `work`'s output, or `None` if shutdown came first (or already had).
    async fn race<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        if self.fired {
            return None;
        }
        let out = tokio::select! {
            biased;
            () = self.signal.as_mut() => None,
            out = work => Some(out),
        };
        self.fired = out.is_none();
        out
    }

    /// Sleeps for `pause`; `false` if shutdown came first.
    async fn sleep(&mut self, pause: Duration) -> bool {
        self.race(tokio::time::sleep(pause)).await.is_some()
    }
}

/// Pauses after consecutive failures: `min`, doubling up to `max`.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new((min, max): (Duration, Duration)) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn next(&mut self) -> Duration {
        let pause = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        pause
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new((Duration::from_millis(100), Duration::from_millis(350)));
        let pauses: Vec<u128> = (0..4).map(|_| b.next().as_millis()).collect();
        assert_eq!(pauses, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }

    #[test]
    fn names() {
        for good in ["balances", "order-totals", "ü.v2"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "$x", "tab\t", &"x".repeat(201)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn checkpoint_documents() {
        let doc = CheckpointDoc {
            position: Some(7),
            rebuilding: false,
        };
        assert_eq!(doc.value().data.as_ref(), br#"{"position":7}"#);
        let marker = CheckpointDoc {
            position: None,
            rebuilding: true,
        };
        assert_eq!(marker.value().data.as_ref(), br#"{"rebuilding":true}"#);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_wins_races_once_fired() {
        let (tx, mut rx) = watch::channel(false);
        let signal = pin!(async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        let mut shutdown = Shutdown::new(signal);
        assert!(shutdown.sleep(Duration::from_secs(1)).await);
        tx.send(true).expect("send");
        assert!(!shutdown.sleep(Duration::from_secs(1)).await);
        assert_eq!(shutdown.race(async { 1 }).await, None, "and stays fired");
    }
}
