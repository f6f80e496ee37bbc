//! The saga state machine: pure logic, no I/O.
//!
//! A [`Saga`] is the whole state of one instance. [`Saga::next`] says what to do
//! next (call an action, call a compensation, or nothing); the runtime records that
//! it is starting the call ([`Saga::begin`]), *persists the saga*, makes the call,
//! and records the outcome ([`Saga::succeed`] / [`Saga::fail`]), persisting again.
//! A crash anywhere leaves a persisted state from which `next` repeats the call that
//! may or may not have happened — with the same idempotency key, so participants
//! can dedupe it.
//!
//! # Rules
//! - **Forward**: steps run in order. A failure that is retryable (timeouts,
//!   transport errors, 408/429/5xx) is retried by the step's policy; a final
//!   failure before or at the pivot turns the saga to compensation; after the pivot
//!   it parks the saga as `needs_attention` (it only ever moves forward).
//! - **Compensation**: every step that succeeded — or that failed *ambiguously*
//!   (an attempt may have been applied: a timeout, a 5xx) — is compensated, in
//!   reverse order. A step without a compensation has nothing to undo. Failed
//!   compensations are retried by the saga's `compensation_retry`; when that runs
//!   out the saga parks as `needs_attention`.
//! - **Operators**: `abort` turns a running or parked saga (before its pivot) to
//!   compensation; `retry` resumes a parked one with a fresh attempt budget.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::{Action, SagaDefinition};
use crate::template::Context;

/// Most history entries kept per saga; older ones are dropped (and counted).
pub const MAX_HISTORY: usize = 500;

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Running its steps forward.
    Running,
    /// Undoing completed steps.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every step that ran was undone.
    Compensated,
    /// Parked: a compensation (or a step after the pivot) kept failing; an operator
    /// must `retry` or `abort` it.
    NeedsAttention,
}

impl SagaStatus {
    /// The status as text (`needs_attention`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::NeedsAttention => "needs_attention",
        }
    }

    /// The status named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "compensating" => Self::Compensating,
            "completed" => Self::Completed,
            "compensated" => Self::Compensated,
            "needs_attention" => Self::NeedsAttention,
            _ => return None,
        })
    }

    /// Completed or compensated: nothing will ever happen to it again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated)
    }
}

/// Which way the saga is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Running actions.
    Forward,
    /// Running compensations.
    Backward,
}

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// Its action was started (and may have been applied).
    Running,
    /// An attempt failed; another is scheduled.
    Retrying,
    /// Its action succeeded.
    Succeeded,
    /// Its action failed for good.
    Failed,
    /// Its compensation was started or is being retried.
    Compensating,
    /// Its compensation succeeded.
    Compensated,
    /// It needed undoing but defines no compensation.
    Skipped,
}

/// One step's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    /// The step's name.
    pub name: String,
    /// Where it is.
    pub status: StepStatus,
    /// Action attempts started.
    pub attempts: u32,
    /// Compensation attempts started.
    pub compensation_attempts: u32,
    /// What the action answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether a failed attempt may have been applied (so it must be compensated).
    #[serde(default)]
    pub ambiguous: bool,
    /// When the next attempt is due (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<u64>,
}

/// One entry of a saga's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// What happened: `started`, `action_started`, `action_succeeded`,
    /// `action_failed`, `compensation_started`, `compensation_succeeded`,
    /// `compensation_failed`, `compensation_skipped`, `completed`, `compensating`,
    /// `compensated`, `needs_attention`, `aborted`, `retried`.
    pub event: String,
    /// The step concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The attempt number concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Details: an error, a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Whether a call runs a step's action or its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallKind {
    /// The action.
    Action,
    /// The compensation.
    Compensate,
}

impl CallKind {
    /// `action` or `compensate`, as in idempotency keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Compensate => "compensate",
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Call a step's action or compensation, not before `retry_at_ms` if set.
    Call {
        /// The step's index.
        step: usize,
        /// Action or compensation.
        kind: CallKind,
        /// When the attempt is due, if it is a retry.
        retry_at_ms: Option<u64>,
    },
    /// Nothing: the saga is final or parked.
    Idle,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong.
    pub message: String,
    /// Whether trying again may help (timeouts, transport, 408/429/5xx).
    pub retryable: bool,
    /// Whether the call may have been applied despite failing.
    pub ambiguous: bool,
}

impl Failure {
    /// A transient failure that may have been applied (timeout, 5xx, lost connection).
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            ambiguous: true,
        }
    }

    /// A transient failure known not to have been applied (circuit open, no
    /// instance, rate limited).
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            ambiguous: false,
        }
    }

    /// A final answer from the participant (a 4xx): not applied, not worth retrying.
    pub fn rejected(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            ambiguous: false,
        }
    }
}

/// Why an operator command does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorError {
    /// The saga is not in a state the command applies to.
    #[error("saga is {status}: {reason}")]
    WrongState {
        /// Its status.
        status: &'static str,
        /// Why the command does not apply.
        reason: &'static str,
    },
}

/// The whole state of one saga instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saga {
    /// Its id (UUIDv7).
    pub id: String,
    /// The definition's name.
    pub name: String,
    /// The definition it runs, as it was when the saga started.
    pub definition: SagaDefinition,
    /// What it was started with.
    pub input: Value,
    /// Where it is.
    pub status: SagaStatus,
    /// Which way it is going.
    pub phase: Phase,
    /// Per step, in definition order.
    pub steps: Vec<StepState>,
    /// What happened, oldest first (the newest [`MAX_HISTORY`] entries).
    pub history: Vec<HistoryEntry>,
    /// History entries dropped to keep the bound.
    #[serde(default)]
    pub history_dropped: u64,
    /// Why it compensated or parked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it started (ms since the epoch).
    pub created_at_ms: u64,
    /// Its last transition (ms since the epoch).
    pub updated_at_ms: u64,
}

impl Saga {
    /// A new saga, `running`, at its first step.
    pub fn new(id: String, definition: SagaDefinition, input: Value, now_ms: u64) -> Self {
        let steps = definition
            .steps
            .iter()
            .map(|s| StepState {
                name: s.name.clone(),
                status: StepStatus::Pending,
                attempts: 0,
                compensation_attempts: 0,
                output: None,
                error: None,
                ambiguous: false,
                retry_at_ms: None,
            })
            .collect();
        let mut saga = Self {
            id,
            name: definition.name.clone(),
            definition,
            input,
            status: SagaStatus::Running,
            phase: Phase::Forward,
            steps,
            history: Vec::new(),
            history_dropped: 0,
            error: None,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        saga.record(now_ms, "started", None, None, None);
        saga
    }

    /// What to do next.
    pub fn next(&self) -> Next {
        match self.status {
            SagaStatus::Running => self
                .steps
                .iter()
                .position(|s| s.status != StepStatus::Succeeded)
                .map_or(Next::Idle, |i| Next::Call {
                    step: i,
                    kind: CallKind::Action,
                    retry_at_ms: self.steps[i].retry_at_ms,
                }),
            SagaStatus::Compensating => self.to_compensate().map_or(Next::Idle, |i| Next::Call {
                step: i,
                kind: CallKind::Compensate,
                retry_at_ms: self.steps[i].retry_at_ms,
            }),
            _ => Next::Idle,
        }
    }

    /// The last step that still needs undoing (and has a compensation).
    fn to_compensate(&self) -> Option<usize> {
        (0..self.steps.len()).rev().find(|&i| self.needs_undo(i))
    }

    fn needs_undo(&self, i: usize) -> bool {
        let s = &self.steps[i];
        match s.status {
            StepStatus::Succeeded | StepStatus::Compensating => true,
            StepStatus::Failed | StepStatus::Running | StepStatus::Retrying => {
                s.ambiguous || s.status == StepStatus::Running
            }
            StepStatus::Pending | StepStatus::Compensated | StepStatus::Skipped => false,
        }
    }

    /// The action or compensation a call runs.
    pub fn action(&self, step: usize, kind: CallKind) -> Option<&Action> {
        let def = self.definition.steps.get(step)?;
        match kind {
            CallKind::Action => Some(&def.action),
            CallKind::Compensate => def.compensation.as_ref(),
        }
    }

    /// The per-attempt timeout of a step.
    pub fn timeout(&self, step: usize) -> Duration {
        self.definition
            .steps
            .get(step)
            .map_or(Duration::from_secs(10), |s| s.timeout)
    }

    /// The idempotency key of a call: `{saga id}:{step}:{action|compensate}`, the
    /// same for every attempt.
    pub fn idempotency_key(&self, step: usize, kind: CallKind) -> String {
        format!("{}:{}:{}", self.id, self.steps[step].name, kind.as_str())
    }

    /// The values templates of the next calls see: the input and every output so far.
    pub fn context(&self) -> Context {
        self.steps.iter().fold(
            Context::new(&self.id, &self.name, self.input.clone()),
            |ctx, s| match &s.output {
                Some(output) => ctx.with_output(&s.name, output.clone()),
                None => ctx,
            },
        )
    }

    /// Records that a call is starting (persist before making it).
    pub fn begin(&mut self, step: usize, kind: CallKind, now_ms: u64) {
        let s = &mut self.steps[step];
        s.retry_at_ms = None;
        let (event, attempt) = match kind {
            CallKind::Action => {
                s.status = StepStatus::Running;
                s.attempts += 1;
                ("action_started", s.attempts)
            }
            CallKind::Compensate => {
                s.status = StepStatus::Compensating;
                s.compensation_attempts += 1;
                ("compensation_started", s.compensation_attempts)
            }
        };
        let name = s.name.clone();
        self.record(now_ms, event, Some(name), Some(attempt), None);
    }

    /// Records a successful call with its output.
    pub fn succeed(&mut self, step: usize, kind: CallKind, output: Value, now_ms: u64) {
        let name = self.steps[step].name.clone();
        match kind {
            CallKind::Action => {
                let s = &mut self.steps[step];
                s.status = StepStatus::Succeeded;
                s.error = None;
                s.output = Some(output);
                let attempt = s.attempts;
                self.record(now_ms, "action_succeeded", Some(name), Some(attempt), None);
                if step + 1 == self.steps.len() {
                    self.status = SagaStatus::Completed;
                    self.record(now_ms, "completed", None, None, None);
                }
            }
            CallKind::Compensate => {
                let s = &mut self.steps[step];
                s.status = StepStatus::Compensated;
                s.error = None;
                let attempt = s.compensation_attempts;
                self.record(
                    now_ms,
                    "compensation_succeeded",
                    Some(name),
                    Some(attempt),
                    None,
                );
                self.settle_compensation(now_ms);
            }
        }
    }

    /// Records a failed call; returns the wait before the next attempt, if one is
    /// scheduled.
    pub fn fail(
        &mut self,
        step: usize,
        kind: CallKind,
        failure: &Failure,
        now_ms: u64,
    ) -> Option<Duration> {
        let name = self.steps[step].name.clone();
        match kind {
            CallKind::Action => {
                let policy = self.definition.steps[step].retry.clone();
                let past_pivot = self.definition.pivot_index().is_some_and(|p| step > p);
                let s = &mut self.steps[step];
                s.error = Some(failure.message.clone());
                s.ambiguous |= failure.ambiguous;
                let attempt = s.attempts;
                self.record(
                    now_ms,
                    "action_failed",
                    Some(name.clone()),
                    Some(attempt),
                    Some(failure.message.clone()),
                );
                if failure.retryable && attempt < policy.max_attempts {
                    return Some(self.schedule(step, policy.backoff(attempt), now_ms));
                }
                if past_pivot {
                    // Only forward from here: keep the step ready for an operator's retry.
                    self.steps[step].status = StepStatus::Retrying;
                    self.park(
                        now_ms,
                        format!(
                            "step {name:?} failed after the pivot ({attempt} attempts): {}",
                            failure.message
                        ),
                    );
                    return None;
                }
                self.steps[step].status = StepStatus::Failed;
                self.start_compensation(
                    now_ms,
                    format!("step {name:?} failed: {}", failure.message),
                );
                None
            }
            CallKind::Compensate => {
                let policy = self.definition.compensation_retry.clone();
                let s = &mut self.steps[step];
                s.error = Some(failure.message.clone());
                let attempt = s.compensation_attempts;
                self.record(
                    now_ms,
                    "compensation_failed",
                    Some(name.clone()),
                    Some(attempt),
                    Some(failure.message.clone()),
                );
                if attempt < policy.max_attempts {
                    return Some(self.schedule(step, policy.backoff(attempt), now_ms));
                }
                self.park(
                    now_ms,
                    format!(
                        "compensation of step {name:?} failed {attempt} times: {}",
                        failure.message
                    ),
                );
                None
            }
        }
    }

    fn schedule(&mut self, step: usize, wait: Duration, now_ms: u64) -> Duration {
        let s = &mut self.steps[step];
        if s.status == StepStatus::Running {
            s.status = StepStatus::Retrying;
        }
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        s.retry_at_ms = Some(now_ms.saturating_add(wait_ms));
        wait
    }

    fn park(&mut self, now_ms: u64, reason: String) {
        self.status = SagaStatus::NeedsAttention;
        self.error = Some(reason.clone());
        self.record(now_ms, "needs_attention", None, None, Some(reason));
    }

    fn start_compensation(&mut self, now_ms: u64, reason: String) {
        self.phase = Phase::Backward;
        self.status = SagaStatus::Compensating;
        self.error = Some(reason.clone());
        self.record(now_ms, "compensating", None, None, Some(reason));
        self.settle_compensation(now_ms);
    }

    /// Marks steps without a compensation as skipped, down to the next one that has
    /// one; with none left, the saga is compensated.
    fn settle_compensation(&mut self, now_ms: u64) {
        while let Some(i) = self.to_compensate() {
            if self.definition.steps[i].compensation.is_some() {
                return;
            }
            self.steps[i].status = StepStatus::Skipped;
            self.steps[i].retry_at_ms = None;
            let name = self.steps[i].name.clone();
            self.record(
                now_ms,
                "compensation_skipped",
                Some(name),
                None,
                Some("no compensation defined".into()),
            );
        }
        self.status = SagaStatus::Compensated;
        self.record(now_ms, "compensated", None, None, None);
    }

    /// Whether the pivot step has succeeded.
    pub fn past_pivot(&self) -> bool {
        self.definition
            .pivot_index()
            .is_some_and(|p| self.steps[p].status == StepStatus::Succeeded)
    }

    /// An operator's abort: stop going forward and compensate what ran.
    ///
    /// # Errors
    /// [`OperatorError::WrongState`] unless the saga is running or parked going
    /// forward, before its pivot.
    pub fn abort(&mut self, reason: &str, now_ms: u64) -> Result<(), OperatorError> {
        let forward = matches!(self.status, SagaStatus::Running)
            || (self.status == SagaStatus::NeedsAttention && self.phase == Phase::Forward);
        if !forward {
            return Err(OperatorError::WrongState {
                status: self.status.as_str(),
                reason: "only a saga going forward (running, or parked before compensating) can be aborted",
            });
        }
        if self.past_pivot() {
            return Err(OperatorError::WrongState {
                status: self.status.as_str(),
                reason: "the saga is past its pivot step and can only go forward",
            });
        }
        for s in &mut self.steps {
            if matches!(s.status, StepStatus::Running | StepStatus::Retrying) {
                // An attempt in flight may have been applied: undo it to be safe.
                // Failed attempts were classified when they failed.
                s.ambiguous |= s.status == StepStatus::Running;
                s.status = StepStatus::Failed;
                s.retry_at_ms = None;
            }
        }
        let reason = format!("aborted by an operator: {reason}");
        self.record(now_ms, "aborted", None, None, Some(reason.clone()));
        self.start_compensation(now_ms, reason);
        Ok(())
    }

    /// An operator's retry of a parked saga, with a fresh attempt budget.
    ///
    /// # Errors
    /// [`OperatorError::WrongState`] unless the saga is `needs_attention`.
    pub fn retry(&mut self, now_ms: u64) -> Result<(), OperatorError> {
        if self.status != SagaStatus::NeedsAttention {
            return Err(OperatorError::WrongState {
                status: self.status.as_str(),
                reason: "only a saga that needs attention can be retried",
            });
        }
        self.status = match self.phase {
            Phase::Forward => SagaStatus::Running,
            Phase::Backward => SagaStatus::Compensating,
        };
        if let Next::Call { step, kind, .. } = self.next() {
            let s = &mut self.steps[step];
            s.retry_at_ms = None;
            match kind {
                CallKind::Action => s.attempts = 0,
                CallKind::Compensate => s.compensation_attempts = 0,
            }
        }
        self.record(now_ms, "retried", None, None, None);
        Ok(())
    }

    fn record(
        &mut self,
        now_ms: u64,
        event: &str,
        step: Option<String>,
        attempt: Option<u32>,
        detail: Option<String>,
    ) {
        self.updated_at_ms = now_ms;
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(0);
            self.history_dropped += 1;
        }
        self.history.push(HistoryEntry {
            at_ms: now_ms,
            event: event.to_owned(),
            step,
            attempt,
            detail,
        });
    }
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;
    use crate::definition::{Action, RetryPolicy, SagaDefinition, Step};

    fn def(steps: &[(&str, bool)], pivot: Option<&str>) -> SagaDefinition {
        let mut b = SagaDefinition::builder("t");
        for (name, compensable) in steps {
            let mut step = Step::new(*name, Action::invoke("a", "POST", "/x")).retry(RetryPolicy {
                max_attempts: 2,
                ..RetryPolicy::default()
            });
            if *compensable {
                step = step.compensate(Action::invoke("a", "POST", "/undo"));
            }
            b = b.step(step);
        }
        if let Some(p) = pivot {
            b = b.pivot(p);
        }
        b.compensation_retry(RetryPolicy {
            max_attempts: 2,
            ..RetryPolicy::compensation()
        })
        .build()
        .expect("valid")
    }

    fn call(s: &Saga) -> (usize, CallKind) {
        match s.next() {
            Next::Call { step, kind, .. } => (step, kind),
            Next::Idle => panic!("idle in {:?}", s.status),
        }
    }

    fn run_ok(s: &mut Saga) {
        let (step, kind) = call(s);
        s.begin(step, kind, 1);
        s.succeed(step, kind, Value::Null, 2);
    }

    fn run_fail(s: &mut Saga, failure: &Failure) -> Option<Duration> {
        let (step, kind) = call(s);
        s.begin(step, kind, 1);
        s.fail(step, kind, failure, 2)
    }

    #[test]
    fn happy_path_completes() {
        let mut s = Saga::new(
            "i".into(),
            def(&[("a", true), ("b", true)], None),
            Value::Null,
            0,
        );
        run_ok(&mut s);
        run_ok(&mut s);
        assert_eq!(s.status, SagaStatus::Completed);
        assert_eq!(s.next(), Next::Idle);
        assert_eq!(s.idempotency_key(1, CallKind::Action), "i:b:action");
    }

    #[test]
    fn rejection_compensates_completed_steps_in_reverse() {
        let d = def(&[("a", true), ("b", false), ("c", true), ("d", true)], None);
        let mut s = Saga::new("i".into(), d, Value::Null, 0);
        run_ok(&mut s);
        run_ok(&mut s);
        run_ok(&mut s);
        assert_eq!(run_fail(&mut s, &Failure::rejected("no")), None);
        assert_eq!(s.status, SagaStatus::Compensating);
        // d was rejected (not applied): c is undone first, b has nothing to undo.
        assert_eq!(call(&s), (2, CallKind::Compensate));
        run_ok(&mut s);
        assert_eq!(s.steps[1].status, StepStatus::Skipped);
        assert_eq!(call(&s), (0, CallKind::Compensate));
        run_ok(&mut s);
        assert_eq!(s.status, SagaStatus::Compensated);
        assert_eq!(s.steps[3].status, StepStatus::Failed);
    }

    #[test]
    fn ambiguous_failures_are_retried_then_undone_too() {
        let mut s = Saga::new(
            "i".into(),
            def(&[("a", true), ("b", true)], None),
            Value::Null,
            0,
        );
        run_ok(&mut s);
        assert!(run_fail(&mut s, &Failure::transient("timeout")).is_some());
        assert_eq!(s.steps[1].status, StepStatus::Retrying);
        assert_eq!(run_fail(&mut s, &Failure::transient("timeout")), None);
        assert_eq!(call(&s), (1, CallKind::Compensate), "b may have applied");
        run_ok(&mut s);
        assert_eq!(call(&s), (0, CallKind::Compensate));
    }

    #[test]
    fn failing_compensation_parks_and_retry_resumes() {
        let mut s = Saga::new(
            "i".into(),
            def(&[("a", true), ("b", true)], None),
            Value::Null,
            0,
        );
        run_ok(&mut s);
        run_fail(&mut s, &Failure::rejected("no"));
        assert!(run_fail(&mut s, &Failure::transient("down")).is_some());
        assert_eq!(run_fail(&mut s, &Failure::transient("down")), None);
        assert_eq!(s.status, SagaStatus::NeedsAttention);
        assert_eq!(s.next(), Next::Idle);
        assert!(s.abort("x", 3).is_err(), "already compensating");
        s.retry(4).expect("retry");
        assert_eq!(s.status, SagaStatus::Compensating);
        run_ok(&mut s);
        assert_eq!(s.status, SagaStatus::Compensated);
    }

    #[test]
    fn after_the_pivot_only_forward() {
        let mut s = Saga::new(
            "i".into(),
            def(&[("a", true), ("p", false), ("c", true)], Some("p")),
            Value::Null,
            0,
        );
        run_ok(&mut s);
        run_ok(&mut s);
        assert_eq!(run_fail(&mut s, &Failure::rejected("no")), None);
        assert_eq!(s.status, SagaStatus::NeedsAttention);
        assert!(s.abort("x", 3).is_err());
        s.retry(4).expect("retry");
        assert_eq!(call(&s), (2, CallKind::Action));
        run_ok(&mut s);
        assert_eq!(s.status, SagaStatus::Completed);
    }

    #[test]
    fn abort_undoes_an_attempt_in_flight() {
        let mut s = Saga::new(
            "i".into(),
            def(&[("a", true), ("b", true)], None),
            Value::Null,
            0,
        );
        run_ok(&mut s);
        s.begin(1, CallKind::Action, 1);
        s.abort("operator", 2).expect("abort");
        assert_eq!(call(&s), (1, CallKind::Compensate));
        assert!(s.retry(3).is_err());
    }

    #[test]
    fn a_crash_after_begin_repeats_the_call() {
        let mut s = Saga::new("i".into(), def(&[("a", true)], None), Value::Null, 0);
        s.begin(0, CallKind::Action, 1);
        let persisted: Saga =
            serde_json::from_value(serde_json::to_value(&s).expect("ser")).expect("de");
        assert_eq!(persisted, s);
        assert_eq!(call(&persisted), (0, CallKind::Action));
    }

    proptest! {
        /// Whatever the outcomes, a saga never gets stuck: it ends completed,
        /// compensated or parked; compensated sagas undid exactly the steps that
        /// succeeded or failed ambiguously and have a compensation.
        #[test]
        fn every_run_ends_and_undoes_what_it_must(
            shape in proptest::collection::vec(any::<bool>(), 1..6),
            outcomes in proptest::collection::vec(0u8..4, 0..64),
        ) {
            let names: Vec<String> = (0..shape.len()).map(|i| format!("s{i}")).collect();
            let steps: Vec<(&str, bool)> = names.iter().map(String::as_str).zip(shape.iter().copied()).collect();
            let mut s = Saga::new("i".into(), def(&steps, None), Value::Null, 0);
            let mut outcomes = outcomes.into_iter();
            let mut applied = vec![false; shape.len()];
            let mut undone = vec![false; shape.len()];
            for _ in 0..200 {
                let Next::Call { step, kind, .. } = s.next() else { break };
                s.begin(step, kind, 1);
                match (outcomes.next().unwrap_or(0), kind) {
                    (0 | 1, CallKind::Action) => { applied[step] = true; s.succeed(step, kind, Value::Null, 2); }
                    (0 | 1, CallKind::Compensate) => { undone[step] = true; s.succeed(step, kind, Value::Null, 2); }
                    (2, _) => { s.fail(step, kind, &Failure::rejected("no"), 2); }
                    _ => {
                        // Applied, but the answer was lost.
                        if kind == CallKind::Action { applied[step] = true; }
                        s.fail(step, kind, &Failure::transient("lost"), 2);
                    }
                }
            }
            prop_assert!(s.next() == Next::Idle);
            match s.status {
                SagaStatus::Completed => prop_assert!(applied.iter().all(|a| *a)),
                SagaStatus::Compensated => {
                    for i in 0..shape.len() {
                        if applied[i] && shape[i] {
                            prop_assert!(undone[i], "step {} applied but not undone", i);
                        }
                    }
                }
                SagaStatus::NeedsAttention => prop_assert!(s.error.is_some()),
                other => prop_assert!(false, "ended {:?}", other),
            }
        }
    }
}
