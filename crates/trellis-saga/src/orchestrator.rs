//! The orchestrator: runs sagas from their definitions over a durable log.
//!
//! Each running saga is one task driving the [`machine`](crate::machine): it
//! persists every transition to the [`SagaLog`] *before* the call it leads to,
//! makes the call through [`Actions`] under the step's timeout, persists the
//! outcome, and so on until the saga completes, is compensated or parks. On start,
//! [`Orchestrator::resume`] picks up every unfinished saga this owner was driving;
//! a call that was in flight at the crash is made again with the same idempotency
//! key.
//!
//! Updates are compare-and-set on the record's version, so if two processes ever
//! drive one saga, only one can write each transition: the other stops.
//!
//! ```
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use serde_json::{Value, json};
//! use trellis_saga::actions::{Actions, Call};
//! use trellis_saga::log::embedded::EmbeddedLog;
//! use trellis_saga::machine::Failure;
//! use trellis_saga::orchestrator::{Orchestrator, Options};
//! use trellis_saga::{Action, SagaDefinition, SagaStatus, Step};
//!
//! #[derive(Debug)]
//! struct Echo;
//! #[async_trait]
//! impl Actions for Echo {
//!     async fn run(&self, call: &Call) -> Result<Value, Failure> {
//!         Ok(json!({"step": call.step}))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let log = Arc::new(EmbeddedLog::open(dir.path().join("sagas.redb")).await?);
//! let orchestrator = Orchestrator::open(log, Arc::new(Echo), Options::default()).await?;
//! orchestrator
//!     .define(
//!         SagaDefinition::builder("order")
//!             .step(Step::new("reserve", Action::invoke("stock", "POST", "/reserve"))
//!                 .compensate(Action::invoke("stock", "POST", "/release")))
//!             .step(Step::new("charge", Action::invoke("payments", "POST", "/charge")))
//!             .build()
//!             .map_err(|e| format!("{e:?}"))?,
//!     )
//!     .await?;
//! let started = orchestrator.start("order", json!({"sku": "a"}), None).await?;
//! let saga = orchestrator.wait(&started.id, std::time::Duration::from_secs(5)).await?;
//! assert_eq!(saga.status, SagaStatus::Completed);
//! orchestrator.close().await;
//! # Ok(())
//! # }
//! ```

use crate::sync::lock;
use crate::sync::until_closed;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;
use trellis_core::{Clock, SystemClock};

use crate::actions::{Actions, Call, Rendered};
use crate::definition::{Action, DefinitionError, SagaDefinition};
use crate::log::{Created, Filter, LogError, Record, RecordKind, SagaLog, new_id};
use crate::machine::{CallKind, Failure, Next, OperatorError, Saga, SagaStatus};
use crate::template;

/// Why an orchestrator call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// No definition by that name.
    #[error("no saga definition named {0:?}")]
    UnknownDefinition(String),
    /// The definition is invalid; every problem is listed.
    #[error("invalid saga definition: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    InvalidDefinition(Vec<DefinitionError>),
    /// No saga with that id.
    #[error("no saga with id {0:?}")]
    NotFound(String),
    /// The saga is not in a state the command applies to.
    #[error(transparent)]
    WrongState(#[from] OperatorError),
    /// The saga changed concurrently (another process drives it); try again.
    #[error("saga {0} was changed concurrently; try again")]
    Conflict(String),
    /// The log failed.
    #[error(transparent)]
    Log(LogError),
    /// The orchestrator is closed.
    #[error("the saga orchestrator is closed")]
    Closed,
}

impl From<LogError> for SagaError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Closed => Self::Closed,
            LogError::Conflict { id, .. } => Self::Conflict(id),
            other => Self::Log(other),
        }
    }
}

/// Settings of an [`Orchestrator`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Who drives the sagas this orchestrator starts; [`Orchestrator::resume`]
    /// resumes that owner's. Processes sharing a log need distinct, stable owners.
    pub owner: String,
    /// Wall-clock time for timestamps and retry deadlines.
    pub clock: Arc<dyn Clock>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            owner: "local".into(),
            clock: Arc::new(SystemClock),
        }
    }
}

/// What [`Orchestrator::start`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The saga's id.
    pub id: String,
    /// `false` when the idempotency key had already started this saga.
    pub created: bool,
}

/// A saga's summary, for lists.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Its id.
    pub id: String,
    /// The definition's name.
    pub name: String,
    /// Its status.
    pub status: String,
    /// Why it compensated or parked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it started (ms since the epoch).
    pub created_at_ms: u64,
    /// Its last transition (ms since the epoch).
    pub updated_at_ms: u64,
}

enum Control {
    Abort {
        reason: String,
        reply: oneshot::Sender<Result<Saga, SagaError>>,
    },
    Retry {
        reply: oneshot::Sender<Result<Saga, SagaError>>,
    },
}

struct Inner {
    log: Arc<dyn SagaLog>,
    actions: Arc<dyn Actions>,
    options: Options,
    definitions: RwLock<BTreeMap<String, Arc<SagaDefinition>>>,
    /// The control channel of every saga a task drives now.
    live: Mutex<HashMap<String, mpsc::UnboundedSender<Control>>>,
    /// Bumped after every persisted transition (waiters re-read).
    changes: watch::Sender<u64>,
    closed: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("log", &self.log.backend())
            .field("owner", &self.options.owner)
            .finish_non_exhaustive()
    }
}

/// Runs sagas. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

impl Orchestrator {
    /// Opens an orchestrator over `log`, loading the definitions stored there. Call
    /// [`resume`](Self::resume) once definitions from config are registered.
    ///
    /// # Errors
    /// If the log can't be read.
    pub async fn open(
        log: Arc<dyn SagaLog>,
        actions: Arc<dyn Actions>,
        options: Options,
    ) -> Result<Self, SagaError> {
        let mut definitions = BTreeMap::new();
        let mut before = None;
        loop {
            let page = log
                .list(
                    RecordKind::Definition,
                    &Filter {
                        before: before.clone(),
                        limit: crate::log::MAX_LIST,
                        ..Filter::default()
                    },
                )
                .await?;
            for record in &page {
                match serde_json::from_value::<SagaDefinition>(record.body.clone()) {
                    Ok(def) => {
                        definitions.insert(def.name.clone(), Arc::new(def));
                    }
                    Err(e) => {
                        tracing::error!(definition = record.id, error = %e, "unreadable saga definition in the log; skipped")
                    }
                }
            }
            match page.last() {
                Some(last) if page.len() == crate::log::MAX_LIST => before = Some(last.id.clone()),
                _ => break,
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                log,
                actions,
                options,
                definitions: RwLock::new(definitions),
                live: Mutex::new(HashMap::new()),
                changes: watch::Sender::new(0),
                closed: watch::Sender::new(false),
                tasks: Mutex::new(JoinSet::new()),
            }),
        })
    }

    /// The log's backend: `embedded` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.inner.log.backend()
    }

    fn now(&self) -> u64 {
        self.inner.options.clock.now_millis()
    }

    /// Validates `definition` (and that its apps and components exist) and stores
    /// it, replacing one of the same name. Sagas already started keep the
    /// definition they started with. Returns whether it is new.
    ///
    /// # Errors
    /// [`SagaError::InvalidDefinition`] listing every problem.
    pub async fn define(&self, definition: SagaDefinition) -> Result<bool, SagaError> {
        let mut errors = definition.validate().err().unwrap_or_default();
        for (i, step) in definition.steps.iter().enumerate() {
            let actions = [
                ("action", Some(&step.action)),
                ("compensation", step.compensation.as_ref()),
            ];
            for (what, action) in actions {
                if let Some(Err(reason)) = action.map(|a| self.inner.actions.check(a)) {
                    errors.push(DefinitionError {
                        at: format!("steps[{i}].{what}"),
                        reason,
                        code: "unknown_target",
                    });
                }
            }
        }
        if !errors.is_empty() {
            return Err(SagaError::InvalidDefinition(errors));
        }
        let now = self.now();
        let existing = self
            .inner
            .log
            .get(RecordKind::Definition, &definition.name)
            .await?;
        let record = Record {
            kind: RecordKind::Definition,
            id: definition.name.clone(),
            version: existing.as_ref().map_or(1, |r| r.version + 1),
            name: definition.name.clone(),
            status: "active".into(),
            finished: true,
            owner: String::new(),
            created_at_ms: existing.as_ref().map_or(now, |r| r.created_at_ms),
            updated_at_ms: now,
            body: serde_json::to_value(&definition)
                .map_err(|e| SagaError::Log(LogError::Backend(e.to_string())))?,
        };
        self.inner.log.put(&record).await?;
        let created = self
            .inner
            .definitions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(definition.name.clone(), Arc::new(definition))
            .is_none();
        Ok(created)
    }

    /// Removes a definition (running sagas keep theirs). Returns whether it existed.
    ///
    /// # Errors
    /// If the log fails.
    pub async fn undefine(&self, name: &str) -> Result<bool, SagaError> {
        let existed = self.inner.log.delete(RecordKind::Definition, name).await?;
        let removed = self
            .inner
            .definitions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
            .is_some();
        Ok(existed || removed)
    }

    /// The definition named `name`.
    pub fn definition(&self, name: &str) -> Option<Arc<SagaDefinition>> {
        self.inner
            .definitions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Every definition, by name.
    pub fn definitions(&self) -> Vec<Arc<SagaDefinition>> {
        self.inner
            .definitions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Starts a saga of definition `name` with `input`. The saga is persisted before
    /// this returns, so it runs to its end even if the process dies now. With an
    /// `idempotency_key` used before for this definition, starts nothing and returns
    /// the first saga's id.
    ///
    /// # Errors
    /// [`SagaError::UnknownDefinition`], or the log's error.
    pub async fn start(
        &self,
        name: &str,
        input: Value,
        idempotency_key: Option<&str>,
    ) -> Result<Started, SagaError> {
        if *self.inner.closed.borrow() {
            return Err(SagaError::Closed);
        }
        let definition = self
            .definition(name)
            .ok_or_else(|| SagaError::UnknownDefinition(name.to_owned()))?;
        let saga = Saga::new(new_id(), (*definition).clone(), input, self.now());
        let record = self.record(&saga, 1)?;
        let key = idempotency_key.map(|k| format!("{name}/{k}"));
        match self.inner.log.create(&record, key.as_deref()).await? {
            Created::Existing(existing) => Ok(Started {
                id: existing.id,
                created: false,
            }),
            Created::New => {
                metrics::counter!("trellis_sagas_started_total", "saga" => name.to_owned())
                    .increment(1);
                tracing::info!(saga = saga.id, definition = name, "saga started");
                let id = saga.id.clone();
                self.spawn(saga, 1);
                self.after_transition();
                Ok(Started { id, created: true })
            }
        }
    }

    /// The saga with id `id`, as last persisted.
    ///
    /// # Errors
    /// The log's error.
    pub async fn get(&self, id: &str) -> Result<Option<Saga>, SagaError> {
        Ok(self.load(id).await?.map(|(saga, _)| saga))
    }

    async fn load(&self, id: &str) -> Result<Option<(Saga, u64)>, SagaError> {
        let Some(record) = self.inner.log.get(RecordKind::Saga, id).await? else {
            return Ok(None);
        };
        let saga = serde_json::from_value(record.body)
            .map_err(|e| SagaError::Log(LogError::Backend(format!("saga {id}: {e}"))))?;
        Ok(Some((saga, record.version)))
    }

    /// Sagas passing `filter`, newest first.
    ///
    /// # Errors
    /// The log's error.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<Summary>, SagaError> {
        let records = self.inner.log.list(RecordKind::Saga, filter).await?;
        Ok(records
            .into_iter()
            .map(|r| Summary {
                error: r
                    .body
                    .get("error")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                id: r.id,
                name: r.name,
                status: r.status,
                created_at_ms: r.created_at_ms,
                updated_at_ms: r.updated_at_ms,
            })
            .collect())
    }

    /// Waits until saga `id` is completed, compensated or parked (or `timeout`
    /// passes), and returns it as it is then.
    ///
    /// # Errors
    /// [`SagaError::NotFound`], or the log's error.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Saga, SagaError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.inner.changes.subscribe();
        loop {
            changes.mark_unchanged();
            let saga = self
                .get(id)
                .await?
                .ok_or_else(|| SagaError::NotFound(id.to_owned()))?;
            if !matches!(saga.status, SagaStatus::Running | SagaStatus::Compensating) {
                return Ok(saga);
            }
            // Another process may drive it: look again at least every second.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            if tokio::time::timeout_at(wake, changes.changed())
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Ok(saga);
            }
        }
    }

    /// An operator's abort: a running (or parked, before compensating) saga stops
    /// going forward and compensates what ran.
    ///
    /// # Errors
    /// [`SagaError::NotFound`], [`SagaError::WrongState`] (after the pivot, or
    /// already finished), [`SagaError::Conflict`].
    pub async fn abort(&self, id: &str, reason: &str) -> Result<Saga, SagaError> {
        let reason = reason.to_owned();
        self.command(
            id,
            |reply| Control::Abort {
                reason: reason.clone(),
                reply,
            },
            |saga, now| saga.abort(&reason, now),
        )
        .await
    }

    /// An operator's retry of a parked saga, with a fresh attempt budget.
    ///
    /// # Errors
    /// [`SagaError::NotFound`], [`SagaError::WrongState`] unless it needs attention,
    /// [`SagaError::Conflict`].
    pub async fn retry(&self, id: &str) -> Result<Saga, SagaError> {
        self.command(
            id,
            |reply| Control::Retry { reply },
            |saga, now| saga.retry(now),
        )
        .await
    }

    /// Sends a command to the task driving the saga, or — when none does — applies
    /// it to the stored saga and starts a task if it became active.
    async fn command(
        &self,
        id: &str,
        message: impl Fn(oneshot::Sender<Result<Saga, SagaError>>) -> Control,
        apply: impl Fn(&mut Saga, u64) -> Result<(), OperatorError>,
    ) -> Result<Saga, SagaError> {
        for _ in 0..3 {
            let sender = lock(&self.inner.live).get(id).cloned();
            let Some(sender) = sender else { break };
            let (reply, answer) = oneshot::channel();
            if sender.send(message(reply)).is_err() {
                continue;
            }
            match answer.await {
                Ok(Err(SagaError::Closed)) | Err(_) => {}
                Ok(result) => return result,
            }
        }
        let (mut saga, version) = self
            .load(id)
            .await?
            .ok_or_else(|| SagaError::NotFound(id.to_owned()))?;
        let before = saga.status;
        apply(&mut saga, self.now())?;
        let record = self.record(&saga, version + 1)?;
        self.inner.log.update(&record).await?;
        self.after_transition();
        if before == SagaStatus::NeedsAttention {
            metrics::gauge!("trellis_sagas_needs_attention", "saga" => saga.name.clone())
                .decrement(1.0);
        }
        self.spawn(saga.clone(), version + 1);
        Ok(saga)
    }

    /// Starts a task for every unfinished saga of this owner. Returns how many run.
    ///
    /// # Errors
    /// The log's error.
    pub async fn resume(&self) -> Result<usize, SagaError> {
        let mut resumed = 0;
        let mut parked: BTreeMap<String, u64> = BTreeMap::new();
        let mut before = None;
        loop {
            let page = self
                .inner
                .log
                .list(
                    RecordKind::Saga,
                    &Filter {
                        unfinished: true,
                        owner: Some(self.inner.options.owner.clone()),
                        before: before.clone(),
                        limit: crate::log::MAX_LIST,
                        ..Filter::default()
                    },
                )
                .await?;
            for record in &page {
                let saga: Saga = match serde_json::from_value(record.body.clone()) {
                    Ok(saga) => saga,
                    Err(e) => {
                        tracing::error!(saga = record.id, error = %e, "unreadable saga in the log; not resumed");
                        continue;
                    }
                };
                if saga.status == SagaStatus::NeedsAttention {
                    *parked.entry(saga.name.clone()).or_default() += 1;
                } else if saga.next() != Next::Idle {
                    tracing::info!(
                        saga = saga.id,
                        status = saga.status.as_str(),
                        "resuming saga"
                    );
                    resumed += 1;
                    self.spawn(saga, record.version);
                }
            }
            match page.last() {
                Some(last) if page.len() == crate::log::MAX_LIST => before = Some(last.id.clone()),
                _ => break,
            }
        }
        for (name, n) in parked {
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!("trellis_sagas_needs_attention", "saga" => name).set(n as f64);
        }
        Ok(resumed)
    }

    /// Stops every task (sagas resume on the next start) and closes the log.
    pub async fn close(&self) {
        self.inner.closed.send_replace(true);
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        while tasks.join_next().await.is_some() {}
        if let Err(e) = self.inner.log.close().await {
            tracing::warn!(error = %e, "closing the saga log failed");
        }
    }

    fn record(&self, saga: &Saga, version: u64) -> Result<Record, SagaError> {
        Ok(Record {
            kind: RecordKind::Saga,
            id: saga.id.clone(),
            version,
            name: saga.name.clone(),
            status: saga.status.as_str().to_owned(),
            finished: saga.status.is_final(),
            owner: self.inner.options.owner.clone(),
            created_at_ms: saga.created_at_ms,
            updated_at_ms: saga.updated_at_ms,
            body: serde_json::to_value(saga)
                .map_err(|e| SagaError::Log(LogError::Backend(e.to_string())))?,
        })
    }

    /// Wakes [`wait`](Self::wait)ers.
    fn after_transition(&self) {
        self.inner.changes.send_modify(|n| *n += 1);
    }

    /// Starts the task driving `saga` (stored at `version`) unless one runs.
    fn spawn(&self, saga: Saga, version: u64) {
        if saga.next() == Next::Idle || *self.inner.closed.borrow() {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut live = lock(&self.inner.live);
            if live.contains_key(&saga.id) {
                return;
            }
            live.insert(saga.id.clone(), tx);
        }
        let this = self.clone();
        let span = tracing::info_span!("saga", id = saga.id, definition = saga.name);
        lock(&self.inner.tasks).spawn(this.drive(saga, version, rx).instrument(span));
    }

    /// Drives one saga until it is idle (final or parked), the process closes, or
    /// another process took it over.
    async fn drive(
        self,
        mut saga: Saga,
        mut version: u64,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut closed = self.inner.closed.subscribe();
        loop {
            while let Ok(c) = control.try_recv() {
                if !self.handle(&mut saga, &mut version, c).await {
                    return self.retire(&saga.id, control);
                }
            }
            let Next::Call {
                step,
                kind,
                retry_at_ms,
            } = saga.next()
            else {
                break;
            };
            if let Some(at) = retry_at_ms {
                let wait = Duration::from_millis(at.saturating_sub(self.now()));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    Some(c) = control.recv() => {
                        if !self.handle(&mut saga, &mut version, c).await {
                            return self.retire(&saga.id, control);
                        }
                        continue;
                    }
                    () = until_closed(&mut closed) => return self.retire(&saga.id, control),
                }
            }
            saga.begin(step, kind, self.now());
            if !self.persist(&saga, &mut version).await {
                return self.retire(&saga.id, control);
            }
            let name = saga.steps[step].name.clone();
            let when = match kind {
                CallKind::Action => "action",
                CallKind::Compensate => "compensation",
            };
            let outcome = tokio::select! {
                outcome = async {
                    trellis_core::crashpoint::reach(&format!("saga.before_{when}:{name}")).await;
                    let outcome = self.call(&saga, step, kind).await;
                    trellis_core::crashpoint::reach(&format!("saga.after_{when}:{name}")).await;
                    outcome
                } => outcome,
                () = until_closed(&mut closed) => return self.retire(&saga.id, control),
            };
            let result = match &outcome {
                Ok(_) => "succeeded",
                Err(f) if f.retryable => "failed_retryable",
                Err(_) => "failed",
            };
            metrics::counter!(
                "trellis_saga_calls_total",
                "saga" => saga.name.clone(),
                "step" => name.clone(),
                "kind" => kind.as_str(),
                "outcome" => result
            )
            .increment(1);
            let before = saga.status;
            match outcome {
                Ok(output) => saga.succeed(step, kind, output, self.now()),
                Err(failure) => {
                    tracing::warn!(
                        step = name,
                        kind = kind.as_str(),
                        error = failure.message,
                        "saga call failed"
                    );
                    saga.fail(step, kind, &failure, self.now());
                }
            }
            if !self.persist(&saga, &mut version).await {
                return self.retire(&saga.id, control);
            }
            self.count_transition(&saga, before);
        }
        self.retire(&saga.id, control);
    }

    fn count_transition(&self, saga: &Saga, before: SagaStatus) {
        if before == saga.status {
            return;
        }
        let name = saga.name.clone();
        match saga.status {
            SagaStatus::Completed | SagaStatus::Compensated => {
                tracing::info!(status = saga.status.as_str(), "saga finished");
                metrics::counter!("trellis_sagas_finished_total", "saga" => name, "status" => saga.status.as_str()).increment(1);
            }
            SagaStatus::NeedsAttention => {
                tracing::error!(
                    error = saga.error.as_deref().unwrap_or(""),
                    "saga needs attention"
                );
                metrics::gauge!("trellis_sagas_needs_attention", "saga" => name).increment(1.0);
            }
            SagaStatus::Compensating => {
                tracing::warn!(
                    error = saga.error.as_deref().unwrap_or(""),
                    "saga compensating"
                );
            }
            SagaStatus::Running => {}
        }
    }

    /// Applies an operator command in the driving task; `false` if the task must stop.
    async fn handle(&self, saga: &mut Saga, version: &mut u64, control: Control) -> bool {
        let (reply, applied) = match control {
            Control::Abort { reason, reply } => {
                let mut next = saga.clone();
                let r = next.abort(&reason, self.now()).map(|()| next);
                (reply, r)
            }
            Control::Retry { reply } => {
                let mut next = saga.clone();
                let r = next.retry(self.now()).map(|()| next);
                (reply, r)
            }
        };
        match applied {
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                true
            }
            Ok(next) => {
                let before = saga.status;
                *saga = next;
                let ok = self.persist(saga, version).await;
                if ok {
                    if before == SagaStatus::NeedsAttention {
                        metrics::gauge!("trellis_sagas_needs_attention", "saga" => saga.name.clone()).decrement(1.0);
                    }
                    let _ = reply.send(Ok(saga.clone()));
                } else {
                    let _ = reply.send(Err(SagaError::Conflict(saga.id.clone())));
                }
                ok
            }
        }
    }

    /// Unregisters the task; commands that raced with its end are answered so their
    /// callers apply them to the stored saga.
    fn retire(&self, id: &str, mut control: mpsc::UnboundedReceiver<Control>) {
        lock(&self.inner.live).remove(id);
        control.close();
        while let Ok(c) = control.try_recv() {
            let reply = match c {
                Control::Abort { reply, .. } | Control::Retry { reply } => reply,
            };
            let _ = reply.send(Err(SagaError::Closed));
        }
    }

    /// Writes the next version of `saga`, retrying while the log is unavailable.
    /// `false` if another writer got there first (or the orchestrator closed).
    async fn persist(&self, saga: &Saga, version: &mut u64) -> bool {
        let Ok(record) = self.record(saga, *version + 1) else {
            return false;
        };
        let closed = &self.inner.closed;
        if crate::log::write_next(&*self.inner.log, &record, || *closed.borrow()).await {
            *version += 1;
            self.after_transition();
            true
        } else {
            false
        }
    }

    /// Renders and runs one call under the step's timeout.
    async fn call(&self, saga: &Saga, step: usize, kind: CallKind) -> Result<Value, Failure> {
        let Some(action) = saga.action(step, kind) else {
            return Err(Failure::rejected("the step has no such action"));
        };
        let rendered = render(action, &saga.context())
            .map_err(|e| Failure::rejected(format!("template: {e}")))?;
        let s = &saga.steps[step];
        let call = Call {
            saga_id: saga.id.clone(),
            saga: saga.name.clone(),
            step: s.name.clone(),
            kind,
            attempt: match kind {
                CallKind::Action => s.attempts,
                CallKind::Compensate => s.compensation_attempts,
            },
            idempotency_key: saga.idempotency_key(step, kind),
            action: rendered,
        };
        let timeout = saga.timeout(step);
        tokio::time::timeout(timeout, self.inner.actions.run(&call))
            .await
            .unwrap_or_else(|_| {
                Err(Failure::transient(format!(
                    "timed out after {}",
                    humantime::format_duration(timeout)
                )))
            })
    }
}

/// Fills an action's templates.
///
/// # Errors
/// The first template that can't be filled.
pub fn render(
    action: &Action,
    ctx: &template::Context,
) -> Result<Rendered, template::TemplateError> {
    Ok(match action {
        Action::Invoke {
            app,
            method,
            path,
            body,
            headers,
        } => Rendered::Invoke {
            app: app.clone(),
            method: http::Method::from_bytes(method.as_bytes()).unwrap_or(http::Method::POST),
            path: template::render_path(path, ctx)?,
            body: body
                .as_ref()
                .map(|b| template::render(b, ctx))
                .transpose()?,
            headers: headers
                .iter()
                .map(|(k, v)| Ok((k.clone(), template::render_str(v, ctx)?)))
                .collect::<Result<_, template::TemplateError>>()?,
        },
        Action::Publish {
            pubsub,
            topic,
            data,
            event_type,
        } => Rendered::Publish {
            pubsub: pubsub.clone(),
            topic: topic.clone(),
            data: template::render(data, ctx)?,
            event_type: event_type
                .clone()
                .unwrap_or_else(|| "trellis.saga.step".into()),
        },
    })
}
