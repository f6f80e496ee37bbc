//! The coordinator: runs 2PC transactions over the durable log, and finishes the
//! ones a crash interrupted.
//!
//! [`TxCoordinator::begin`] validates a request, logs the transaction
//! (`preparing`), asks every participant to prepare in parallel under the
//! deadline, **logs the decision** (one update), and then sends it to every
//! participant in parallel, retrying each with capped exponential backoff until it
//! acknowledges, logging each acknowledgement. Each transaction is driven by a task
//! of its own, so phase two goes on after `begin` returns.
//!
//! [`TxCoordinator::recover`], on start, finishes every transaction this owner left
//! unfinished: one still `preparing` was never decided, so it is aborted everywhere
//! (*presumed abort* — nobody was told to commit); one `committing` or `aborting`
//! has its decision sent again to whoever has not acknowledged it.
//!
//! Updates are compare-and-set on the record's version, as in the
//! [orchestrator](crate::orchestrator): if two processes ever drive one
//! transaction, only one can write each transition, and the other stops.
//!
//! Crash points (see [`trellis_core::crashpoint`]): `tx.before_decision` (votes in,
//! nothing logged), `tx.after_decision` (decision logged, phase two not started),
//! `tx.after_phase_two:<participant>` (that participant's acknowledgement logged).

use crate::sync::lock;
use crate::sync::until_closed;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;
use trellis_core::{Clock, SystemClock};

use super::participant::{Participant, Participants, TxContext};
use super::state::{Decision, Next, ParticipantStatus, Transaction, TxStatus};
use crate::log::{Created, Filter, LogError, Record, RecordKind, SagaLog, new_id};

/// Most participants in one transaction.
pub const MAX_PARTICIPANTS: usize = 16;
/// Longest participant name.
pub const MAX_NAME: usize = 64;

/// One problem with a [`TxRequest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct RequestProblem {
    /// Where: `participants[1].name`, `timeout`, ...
    pub at: String,
    /// A stable code: `invalid_body`, `invalid_participant`,
    /// `unknown_participant_target`.
    pub code: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Why a coordinator call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TxError {
    /// The request is invalid; every problem is listed.
    #[error("invalid transaction: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<RequestProblem>),
    /// No transaction with that id.
    #[error("no transaction with id {0:?}")]
    NotFound(String),
    /// The log failed.
    #[error(transparent)]
    Log(LogError),
    /// The coordinator is closed.
    #[error("the transaction coordinator is closed")]
    Closed,
}

impl From<LogError> for TxError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Closed => Self::Closed,
            other => Self::Log(other),
        }
    }
}

/// Settings of a [`TxCoordinator`].
#[derive(Debug, Clone)]
pub struct TxOptions {
    /// Who drives the transactions this coordinator begins; [`TxCoordinator::recover`]
    /// finishes that owner's. Processes sharing a log need distinct, stable owners.
    pub owner: String,
    /// Wall-clock time for timestamps and deadlines.
    pub clock: Arc<dyn Clock>,
    /// The prepare deadline of a request that sets none. Default 10 s.
    pub default_timeout: Duration,
    /// The longest deadline a request may set. Default 5 min.
    pub max_timeout: Duration,
    /// How long past the deadline [`TxCoordinator::begin`] waits for phase two
    /// before answering with the transaction as it is (phase two goes on).
    /// Default 2 s.
    pub answer_grace: Duration,
    /// How long one phase-two call may take before it is retried. Default 10 s.
    pub phase_two_timeout: Duration,
    /// The wait before the first retry of a phase-two call; doubled on each
    /// retry. Default 100 ms.
    pub initial_backoff: Duration,
    /// The longest wait between retries of a phase-two call. Default 10 s.
    pub max_backoff: Duration,
}

impl Default for TxOptions {
    fn default() -> Self {
        Self {
            owner: "local".into(),
            clock: Arc::new(SystemClock),
            default_timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(300),
            answer_grace: Duration::from_secs(2),
            phase_two_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// A transaction to run.
#[derive(Debug, Clone, PartialEq)]
pub struct TxRequest {
    /// 1 to [`MAX_PARTICIPANTS`] participants: unique names (1 to 64 ASCII letters,
    /// digits, `_`, `-`, `.`) and specs (`{"type": ...}`).
    pub participants: Vec<(String, Value)>,
    /// Passed to every participant's prepare.
    pub payload: Value,
    /// How long participants have to vote; [`TxOptions::default_timeout`] if
    /// `None`.
    pub timeout: Option<Duration>,
}

/// A transaction's summary, for lists.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TxSummary {
    /// Its id.
    pub id: String,
    /// Its status.
    pub status: String,
    /// Its decision, once logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Why it aborted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Each participant's name and status.
    pub participants: Vec<ParticipantSummary>,
    /// When it started (ms since the epoch).
    pub created_at_ms: u64,
    /// Its last transition (ms since the epoch).
    pub updated_at_ms: u64,
}

/// A participant in a [`TxSummary`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParticipantSummary {
    /// Its name.
    pub name: String,
    /// Its status.
    pub status: ParticipantStatus,
}

struct Inner {
    log: Arc<dyn SagaLog>,
    participants: Arc<dyn Participants>,
    options: TxOptions,
    /// Transactions a task drives now.
    live: Mutex<HashSet<String>>,
    /// Bumped after every persisted transition (waiters re-read).
    changes: watch::Sender<u64>,
    closed: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxCoordinator")
            .field("log", &self.log.backend())
            .field("owner", &self.options.owner)
            .field("participants", &self.participants)
            .finish_non_exhaustive()
    }
}

/// Runs two-phase-commit transactions. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TxCoordinator {
    inner: Arc<Inner>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A participant slot: built when the transaction began, or on first use after a
/// restart.
type Slot = Option<Arc<dyn Participant>>;

impl TxCoordinator {
    /// A coordinator over `log` (which it shares: [`close`](Self::close) leaves it
    /// open), making participants with `participants`. Call
    /// [`recover`](Self::recover) before serving requests.
    ///
    /// # Errors
    /// If the log is not reachable.
    pub async fn open(
        log: Arc<dyn SagaLog>,
        participants: Arc<dyn Participants>,
        options: TxOptions,
    ) -> Result<Self, TxError> {
        log.health().await?;
        Ok(Self {
            inner: Arc::new(Inner {
                log,
                participants,
                options,
                live: Mutex::new(HashSet::new()),
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

    /// Checks `request` and builds its participants.
    ///
    /// # Errors
    /// [`TxError::Invalid`] listing every problem.
    pub fn validate(&self, request: &TxRequest) -> Result<Vec<Arc<dyn Participant>>, TxError> {
        let mut problems = Vec::new();
        let n = request.participants.len();
        if n == 0 || n > MAX_PARTICIPANTS {
            problems.push(RequestProblem {
                at: "participants".into(),
                code: "invalid_body",
                reason: format!("a transaction has 1 to {MAX_PARTICIPANTS} participants, got {n}"),
            });
        }
        if let Some(timeout) = request.timeout
            && (timeout.is_zero() || timeout > self.inner.options.max_timeout)
        {
            problems.push(RequestProblem {
                at: "timeout".into(),
                code: "invalid_body",
                reason: format!(
                    "must be more than 0 and at most {}",
                    humantime::format_duration(self.inner.options.max_timeout)
                ),
            });
        }
        let mut seen = HashSet::new();
        let mut built = Vec::with_capacity(n);
        for (i, (name, spec)) in request.participants.iter().enumerate() {
            let valid_name = !name.is_empty()
                && name.len() <= MAX_NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !valid_name {
                problems.push(RequestProblem {
                    at: format!("participants[{i}].name"),
                    code: "invalid_participant",
                    reason: format!(
                        "a name is 1 to {MAX_NAME} ASCII letters, digits, '_', '-' or '.'; got {name:?}"
                    ),
                });
            } else if !seen.insert(name.as_str()) {
                problems.push(RequestProblem {
                    at: format!("participants[{i}].name"),
                    code: "invalid_participant",
                    reason: format!("two participants are named {name:?}"),
                });
            }
            match self.inner.participants.build(name, spec) {
                Ok(p) => built.push(p),
                Err(e) => problems.push(RequestProblem {
                    at: format!("participants[{i}]"),
                    code: e.code,
                    reason: e.message,
                }),
            }
        }
        if problems.is_empty() {
            Ok(built)
        } else {
            Err(TxError::Invalid(problems))
        }
    }

    /// Runs a transaction: logs it, prepares every participant, logs the decision,
    /// and sends it to every participant. Returns once every participant
    /// acknowledged the decision, or — if phase two is still retrying — at the
    /// deadline plus [`TxOptions::answer_grace`], with the transaction as it is
    /// then (phase two goes on in the background, and after a restart).
    ///
    /// With an `idempotency_key` used before, runs nothing and returns (after the
    /// same wait) the transaction that key began.
    ///
    /// # Errors
    /// [`TxError::Invalid`], or the log's error (nothing was begun).
    pub async fn begin(
        &self,
        request: TxRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Transaction, TxError> {
        if *self.inner.closed.borrow() {
            return Err(TxError::Closed);
        }
        let built = self.validate(&request)?;
        let timeout = request
            .timeout
            .unwrap_or(self.inner.options.default_timeout);
        let now = self.now();
        let tx = Transaction::new(
            new_id(),
            request.participants,
            request.payload,
            now.saturating_add(millis(timeout)),
            now,
        );
        let record = self.record(&tx, 1)?;
        let (id, deadline_ms) = match self.inner.log.create(&record, idempotency_key).await? {
            Created::Existing(existing) => {
                let deadline = existing
                    .body
                    .get("deadline_ms")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                (existing.id, deadline)
            }
            Created::New => {
                metrics::counter!("trellis_transactions_started_total").increment(1);
                tracing::info!(
                    transaction = tx.id,
                    participants = tx.participants.len(),
                    "transaction started"
                );
                let (id, deadline) = (tx.id.clone(), tx.deadline_ms);
                self.spawn(tx, 1, built.into_iter().map(Some).collect(), true);
                self.after_transition();
                (id, deadline)
            }
        };
        let left = Duration::from_millis(deadline_ms.saturating_sub(self.now()));
        self.wait(&id, left + self.inner.options.answer_grace).await
    }

    /// The transaction with id `id`, as last logged.
    ///
    /// # Errors
    /// The log's error.
    pub async fn get(&self, id: &str) -> Result<Option<Transaction>, TxError> {
        let Some(record) = self.inner.log.get(RecordKind::Transaction, id).await? else {
            return Ok(None);
        };
        let tx = serde_json::from_value(record.body)
            .map_err(|e| TxError::Log(LogError::Backend(format!("transaction {id}: {e}"))))?;
        Ok(Some(tx))
    }

    /// Waits until transaction `id` is committed or aborted (or `timeout` passes),
    /// and returns it as it is then.
    ///
    /// # Errors
    /// [`TxError::NotFound`], or the log's error.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Transaction, TxError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.inner.changes.subscribe();
        loop {
            changes.mark_unchanged();
            let tx = self
                .get(id)
                .await?
                .ok_or_else(|| TxError::NotFound(id.to_owned()))?;
            if tx.status.is_final() || *self.inner.closed.borrow() {
                return Ok(tx);
            }
            // Another process may drive it: look again at least every second.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            if tokio::time::timeout_at(wake, changes.changed())
                .await
                .is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Ok(tx);
            }
        }
    }

    /// Transactions passing `filter` (its `name` is ignored), newest first.
    ///
    /// # Errors
    /// The log's error.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<TxSummary>, TxError> {
        let filter = Filter {
            name: None,
            ..filter.clone()
        };
        let records = self
            .inner
            .log
            .list(RecordKind::Transaction, &filter)
            .await?;
        Ok(records
            .into_iter()
            .map(|r| match serde_json::from_value::<Transaction>(r.body) {
                Ok(tx) => TxSummary {
                    id: r.id,
                    status: r.status,
                    decision: tx.decision,
                    reason: tx.reason,
                    participants: tx
                        .participants
                        .into_iter()
                        .map(|p| ParticipantSummary {
                            name: p.name,
                            status: p.status,
                        })
                        .collect(),
                    created_at_ms: r.created_at_ms,
                    updated_at_ms: r.updated_at_ms,
                },
                Err(e) => TxSummary {
                    id: r.id,
                    status: r.status,
                    decision: None,
                    reason: Some(format!("unreadable record: {e}")),
                    participants: Vec::new(),
                    created_at_ms: r.created_at_ms,
                    updated_at_ms: r.updated_at_ms,
                },
            })
            .collect())
    }

    /// Finishes every unfinished transaction of this owner: aborts the undecided
    /// ones (presumed abort) and sends the others' decision again. Before it
    /// returns, the participants of transactions to commit get
    /// [`Participant::recover`] (re-taking key locks). Returns how many it resumed.
    ///
    /// # Errors
    /// The log's error.
    pub async fn recover(&self) -> Result<usize, TxError> {
        let mut resumed = 0;
        let mut before = None;
        loop {
            let page = self
                .inner
                .log
                .list(
                    RecordKind::Transaction,
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
                if lock(&self.inner.live).contains(&record.id) {
                    continue;
                }
                let tx: Transaction = match serde_json::from_value(record.body.clone()) {
                    Ok(tx) => tx,
                    Err(e) => {
                        tracing::error!(transaction = record.id, error = %e, "unreadable transaction in the log; not recovered");
                        continue;
                    }
                };
                let mut slots: Vec<Slot> = vec![None; tx.participants.len()];
                if tx.status == TxStatus::Committing {
                    for (i, p) in tx.participants.iter().enumerate() {
                        if p.status == ParticipantStatus::Committed {
                            continue;
                        }
                        match self.inner.participants.build(&p.name, &p.spec) {
                            Ok(built) => {
                                if let Err(e) = built.recover(&self.context(&tx, i, None)).await {
                                    tracing::warn!(transaction = tx.id, participant = p.name, error = %e, "recovering a participant failed");
                                }
                                slots[i] = Some(built);
                            }
                            Err(e) => {
                                tracing::warn!(transaction = tx.id, participant = p.name, error = %e, "participant can't be rebuilt; retrying in phase two");
                            }
                        }
                    }
                }
                tracing::info!(
                    transaction = tx.id,
                    status = tx.status.as_str(),
                    "recovering transaction"
                );
                resumed += 1;
                self.spawn(tx, record.version, slots, false);
            }
            match page.last() {
                Some(last) if page.len() == crate::log::MAX_LIST => before = Some(last.id.clone()),
                _ => break,
            }
        }
        Ok(resumed)
    }

    /// Stops every task (unfinished transactions are finished by
    /// [`recover`](Self::recover) on the next start) and releases the participants'
    /// resources. The log stays open: close it after.
    pub async fn close(&self) {
        self.inner.closed.send_replace(true);
        self.after_transition();
        let mut tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        while tasks.join_next().await.is_some() {}
        self.inner.participants.close().await;
    }

    fn record(&self, tx: &Transaction, version: u64) -> Result<Record, TxError> {
        Ok(Record {
            kind: RecordKind::Transaction,
            id: tx.id.clone(),
            version,
            name: String::new(),
            status: tx.status.as_str().to_owned(),
            finished: tx.status.is_final(),
            owner: self.inner.options.owner.clone(),
            created_at_ms: tx.created_at_ms,
            updated_at_ms: tx.updated_at_ms,
            body: serde_json::to_value(tx)
                .map_err(|e| TxError::Log(LogError::Backend(e.to_string())))?,
        })
    }

    fn context(&self, tx: &Transaction, index: usize, time_left: Option<Duration>) -> TxContext {
        TxContext {
            transaction_id: tx.id.clone(),
            participant: tx
                .participants
                .get(index)
                .map(|p| p.name.clone())
                .unwrap_or_default(),
            index,
            payload: tx.payload.clone(),
            time_left,
        }
    }

    /// Wakes [`wait`](Self::wait)ers.
    fn after_transition(&self) {
        self.inner.changes.send_modify(|n| *n += 1);
    }

    /// Starts the task driving `tx` (stored at `version`) unless one runs. `fresh`:
    /// begun by this call, so its participants may be asked to prepare.
    fn spawn(&self, tx: Transaction, version: u64, slots: Vec<Slot>, fresh: bool) {
        if tx.next() == Next::Idle || *self.inner.closed.borrow() {
            return;
        }
        if !lock(&self.inner.live).insert(tx.id.clone()) {
            return;
        }
        let span = tracing::info_span!("transaction", id = %tx.id);
        let this = self.clone();
        let mut tasks = lock(&self.inner.tasks);
        // Reap finished drivers so the set stays bounded.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(this.drive(tx, version, slots, fresh).instrument(span));
    }

    /// Drives one transaction until it is final, the coordinator closes, or another
    /// process took it over.
    async fn drive(self, mut tx: Transaction, mut version: u64, mut slots: Vec<Slot>, fresh: bool) {
        let mut closed = self.inner.closed.subscribe();
        let id = tx.id.clone();
        if tx.status == TxStatus::Preparing {
            if fresh {
                if !self.prepare(&mut tx, &slots, &mut closed).await {
                    return self.retire(&id);
                }
            } else {
                tx.abort(
                    "presumed abort: the coordinator restarted before deciding",
                    self.now(),
                );
            }
            if !crash_point("tx.before_decision", &mut closed).await {
                return self.retire(&id);
            }
            if !self.persist(&tx, &mut version).await {
                return self.retire(&id);
            }
            let decision = tx.decision.map_or("none", Decision::as_str);
            match tx.decision {
                Some(Decision::Commit) => tracing::info!(decision, "transaction decided"),
                _ => tracing::warn!(
                    decision,
                    reason = tx.reason.as_deref().unwrap_or(""),
                    "transaction decided"
                ),
            }
            if !crash_point("tx.after_decision", &mut closed).await {
                return self.retire(&id);
            }
        }
        self.phase_two(&mut tx, &mut version, &mut slots, &mut closed)
            .await;
        self.retire(&id);
    }

    fn retire(&self, id: &str) {
        lock(&self.inner.live).remove(id);
    }

    /// Phase one: collects votes until they settle the outcome or the deadline, and
    /// decides. `false` if the coordinator closed first (nothing decided).
    async fn prepare(
        &self,
        tx: &mut Transaction,
        slots: &[Slot],
        closed: &mut watch::Receiver<bool>,
    ) -> bool {
        let left = Duration::from_millis(tx.deadline_ms.saturating_sub(self.now()));
        let deadline = tokio::time::Instant::now() + left;
        let mut set = JoinSet::new();
        let mut ids = HashMap::new();
        for (i, slot) in slots.iter().enumerate() {
            let Some(participant) = slot.clone() else {
                tx.vote(i, Err("participant unavailable".into()), self.now());
                continue;
            };
            let ctx = self.context(tx, i, Some(left));
            let handle = set.spawn(
                async move {
                    let answer = match tokio::time::timeout(left, participant.prepare(&ctx)).await {
                        Ok(Ok(vote)) => Ok(vote),
                        Ok(Err(e)) => Err(e.message),
                        Err(_) => Err(format!(
                            "no vote within {}",
                            humantime::format_duration(left)
                        )),
                    };
                    (i, answer)
                }
                .in_current_span(),
            );
            ids.insert(handle.id(), i);
        }
        let mut stopped = false;
        while !tx.votes_settled() {
            tokio::select! {
                joined = set.join_next_with_id() => match joined {
                    Some(Ok((_, (i, answer)))) => {
                        if let Err(e) = &answer {
                            tracing::warn!(participant = tx.participants[i].name, error = %e, "prepare failed");
                        }
                        tx.vote(i, answer, self.now());
                    }
                    Some(Err(e)) => {
                        if let Some(&i) = ids.get(&e.id()) {
                            tx.vote(i, Err(format!("prepare task failed: {e}")), self.now());
                        }
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
                () = until_closed(closed) => {
                    stopped = true;
                    break;
                }
            }
        }
        // Prepares still running are cancelled: their participants get the abort.
        set.abort_all();
        while set.join_next().await.is_some() {}
        if stopped {
            return false;
        }
        if tx.decide(self.now()).is_none() {
            // The timer fired a hair before the wall clock reached the deadline.
            tx.abort(
                "the deadline passed before every participant voted",
                self.now(),
            );
        }
        true
    }

    /// Phase two: sends the decision to every participant that has not
    /// acknowledged it, retrying each until it does.
    async fn phase_two(
        &self,
        tx: &mut Transaction,
        version: &mut u64,
        slots: &mut [Slot],
        closed: &mut watch::Receiver<bool>,
    ) {
        let Next::PhaseTwo {
            decision,
            participants,
        } = tx.next()
        else {
            return;
        };
        let mut set = JoinSet::new();
        let mut ids = HashMap::new();
        for i in participants {
            let handle = set.spawn(self.attempt(tx, i, slots[i].clone(), decision, Duration::ZERO));
            ids.insert(handle.id(), i);
        }
        loop {
            let joined = tokio::select! {
                joined = set.join_next_with_id() => joined,
                () = until_closed(closed) => return,
            };
            let (i, built, result) = match joined {
                None => break,
                Some(Ok((id, (i, built, result)))) => {
                    ids.remove(&id);
                    (i, built, result)
                }
                Some(Err(e)) => match ids.remove(&e.id()) {
                    Some(i) => (i, None, Err(format!("phase-two task failed: {e}"))),
                    None => continue,
                },
            };
            if built.is_some() {
                slots[i] = built;
            }
            let name = tx.participants[i].name.clone();
            match result {
                Ok(()) => {
                    tx.acked(i, self.now());
                    if !self.persist(tx, version).await {
                        return;
                    }
                    if !crash_point(&format!("tx.after_phase_two:{name}"), closed).await {
                        return;
                    }
                }
                Err(error) => {
                    metrics::counter!("trellis_transaction_phase_two_retries_total").increment(1);
                    let attempts = tx.phase_two_failed(i, &error, self.now());
                    let wait = self.backoff(attempts);
                    tracing::warn!(
                        participant = name,
                        decision = decision.as_str(),
                        attempts,
                        retry_in = ?wait,
                        error,
                        "phase-two call failed; retrying"
                    );
                    if !self.persist(tx, version).await {
                        return;
                    }
                    let handle = set.spawn(self.attempt(tx, i, slots[i].clone(), decision, wait));
                    ids.insert(handle.id(), i);
                }
            }
        }
        if tx.status.is_final() {
            let outcome = tx.status.as_str();
            tracing::info!(outcome, "transaction finished");
            metrics::counter!("trellis_transactions_total", "outcome" => outcome).increment(1);
        }
    }

    /// One phase-two call of participant `index` after `wait`, building it first
    /// if needed: (index, the participant if built now, the outcome).
    fn attempt(
        &self,
        tx: &Transaction,
        index: usize,
        slot: Slot,
        decision: Decision,
        wait: Duration,
    ) -> impl std::future::Future<Output = (usize, Slot, Result<(), String>)> + Send + 'static {
        let ctx = self.context(tx, index, None);
        let spec = tx.participants[index].spec.clone();
        let factory = Arc::clone(&self.inner.participants);
        let timeout = self.inner.options.phase_two_timeout;
        async move {
            tokio::time::sleep(wait).await;
            let (participant, built) = match slot {
                Some(p) => (p, None),
                None => match factory.build(&ctx.participant, &spec) {
                    Ok(p) => (Arc::clone(&p), Some(p)),
                    Err(e) => {
                        return (
                            index,
                            None,
                            Err(format!("can't build the participant: {e}")),
                        );
                    }
                },
            };
            let call = async {
                match decision {
                    Decision::Commit => participant.commit(&ctx).await,
                    Decision::Abort => participant.abort(&ctx).await,
                }
            };
            let result = match tokio::time::timeout(timeout, call).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.message),
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                )),
            };
            (index, built, result)
        }
        .in_current_span()
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let o = &self.inner.options;
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1).min(20));
        o.initial_backoff.saturating_mul(factor).min(o.max_backoff)
    }

    /// Writes the next version of `tx`, retrying while the log is unavailable.
    /// `false` if another writer got there first (or the coordinator closed).
    async fn persist(&self, tx: &Transaction, version: &mut u64) -> bool {
        let Ok(record) = self.record(tx, *version + 1) else {
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
}

/// Holds at `point` if it is armed; `false` if the coordinator closed meanwhile.
async fn crash_point(point: &str, closed: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        biased;
        () = trellis_core::crashpoint::reach(point) => true,
        () = until_closed(closed) => false,
    }
}
