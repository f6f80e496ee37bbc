//! The orchestrator over the embedded log, with scripted participants.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use trellis_saga::actions::{Actions, Call, Rendered};
use trellis_saga::log::Filter;
use trellis_saga::log::embedded::EmbeddedLog;
use trellis_saga::machine::{CallKind, Failure, StepStatus};
use trellis_saga::orchestrator::{Options, Orchestrator};
use trellis_saga::{Action, RetryPolicy, SagaDefinition, SagaError, SagaStatus, Step};

/// What a scripted participant does on a call.
#[derive(Debug, Clone)]
enum Script {
    Ok(Value),
    Fail(Failure),
    /// Never answers (a hung participant, or a crash mid-call).
    Hang,
}

/// Answers calls from per-(step, kind) scripts (default: `{}`), recording each.
#[derive(Debug, Default)]
struct Scripted {
    scripts: Mutex<HashMap<(String, CallKind), VecDeque<Script>>>,
    calls: Mutex<Vec<Call>>,
}

impl Scripted {
    fn on(&self, step: &str, kind: CallKind, script: Script) {
        self.scripts
            .lock()
            .expect("lock")
            .entry((step.to_owned(), kind))
            .or_default()
            .push_back(script);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").clone()
    }

    fn trace(&self) -> Vec<String> {
        self.calls()
            .iter()
            .map(|c| format!("{}:{}", c.step, c.kind.as_str()))
            .collect()
    }
}

#[async_trait]
impl Actions for Scripted {
    async fn run(&self, call: &Call) -> Result<Value, Failure> {
        self.calls.lock().expect("lock").push(call.clone());
        let script = self
            .scripts
            .lock()
            .expect("lock")
            .get_mut(&(call.step.clone(), call.kind))
            .and_then(VecDeque::pop_front);
        match script.unwrap_or(Script::Ok(json!({}))) {
            Script::Ok(v) => Ok(v),
            Script::Fail(f) => Err(f),
            Script::Hang => std::future::pending().await,
        }
    }
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        multiplier: 2.0,
    }
}

fn transfer() -> SagaDefinition {
    SagaDefinition::builder("transfer")
        .step(
            Step::new(
                "debit",
                Action::invoke("accounts", "POST", "/accounts/{{input.from}}/debit")
                    .with_body(json!({"amount": "{{input.amount}}"})),
            )
            .compensate(
                Action::invoke("accounts", "POST", "/accounts/{{input.from}}/credit").with_body(
                    json!({"amount": "{{input.amount}}", "undo": "{{steps.debit.output.ref}}"}),
                ),
            )
            .retry(fast()),
        )
        .step(
            Step::new(
                "credit",
                Action::invoke("accounts", "POST", "/accounts/{{input.to}}/credit").with_body(
                    json!({"amount": "{{input.amount}}", "after": "{{steps.debit.output.ref}}"}),
                ),
            )
            .compensate(Action::invoke(
                "accounts",
                "POST",
                "/accounts/{{input.to}}/debit",
            ))
            .retry(fast()),
        )
        .step(
            Step::new(
                "notify",
                Action::publish("default", "transfers", json!({"id": "{{saga.id}}"})),
            )
            .retry(fast()),
        )
        .compensation_retry(RetryPolicy {
            max_attempts: 3,
            ..fast()
        })
        .build()
        .expect("valid")
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    actions: Arc<Scripted>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sagas.redb");
        Self {
            _dir: dir,
            path,
            actions: Arc::new(Scripted::default()),
        }
    }

    async fn open(&self) -> Orchestrator {
        let log = Arc::new(EmbeddedLog::open(&self.path).await.expect("open log"));
        let o = Orchestrator::open(
            log,
            Arc::clone(&self.actions) as Arc<dyn Actions>,
            Options::default(),
        )
        .await
        .expect("open");
        o.define(transfer()).await.expect("define");
        o
    }
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_saga_completes_and_outputs_feed_later_steps() {
    let f = Fixture::new();
    f.actions
        .on("debit", CallKind::Action, Script::Ok(json!({"ref": "d-1"})));
    let o = f.open().await;
    let started = o
        .start(
            "transfer",
            json!({"from": "a/1", "to": "b", "amount": 7}),
            None,
        )
        .await
        .expect("start");
    let saga = o.wait(&started.id, WAIT).await.expect("wait");
    assert_eq!(saga.status, SagaStatus::Completed, "{saga:#?}");
    assert_eq!(
        f.actions.trace(),
        ["debit:action", "credit:action", "notify:action"]
    );
    let calls = f.actions.calls();
    let Rendered::Invoke { path, body, .. } = &calls[0].action else {
        panic!("invoke")
    };
    assert_eq!(path, "/accounts/a%2F1/debit");
    assert_eq!(body.as_ref(), Some(&json!({"amount": 7})));
    let Rendered::Invoke { body, .. } = &calls[1].action else {
        panic!("invoke")
    };
    assert_eq!(body.as_ref(), Some(&json!({"amount": 7, "after": "d-1"})));
    let Rendered::Publish { data, .. } = &calls[2].action else {
        panic!("publish")
    };
    assert_eq!(data, &json!({"id": started.id}));
    assert_eq!(
        calls[1].idempotency_key,
        format!("{}:credit:action", started.id)
    );
    let events: Vec<&str> = saga.history.iter().map(|h| h.event.as_str()).collect();
    assert_eq!(
        events,
        [
            "started",
            "action_started",
            "action_succeeded",
            "action_started",
            "action_succeeded",
            "action_started",
            "action_succeeded",
            "completed"
        ]
    );
    o.close().await;
}

#[tokio::test]
async fn a_rejected_step_compensates_in_reverse_with_stable_keys() {
    let f = Fixture::new();
    f.actions
        .on("debit", CallKind::Action, Script::Ok(json!({"ref": "d-9"})));
    f.actions.on(
        "credit",
        CallKind::Action,
        Script::Fail(Failure::transient("503")),
    );
    f.actions.on(
        "credit",
        CallKind::Action,
        Script::Fail(Failure::rejected("account closed")),
    );
    let o = f.open().await;
    let id = o
        .start(
            "transfer",
            json!({"from": "a", "to": "b", "amount": 1}),
            None,
        )
        .await
        .expect("start")
        .id;
    let saga = o.wait(&id, WAIT).await.expect("wait");
    assert_eq!(saga.status, SagaStatus::Compensated, "{saga:#?}");
    // credit failed ambiguously once (a 503 may have applied): it is undone too.
    assert_eq!(
        f.actions.trace(),
        [
            "debit:action",
            "credit:action",
            "credit:action",
            "credit:compensate",
            "debit:compensate"
        ]
    );
    let calls = f.actions.calls();
    assert_eq!(calls[1].idempotency_key, calls[2].idempotency_key);
    assert_eq!((calls[1].attempt, calls[2].attempt), (1, 2));
    assert_eq!(calls[4].idempotency_key, format!("{id}:debit:compensate"));
    let Rendered::Invoke { body, .. } = &calls[4].action else {
        panic!("invoke")
    };
    assert_eq!(body.as_ref(), Some(&json!({"amount": 1, "undo": "d-9"})));
    assert!(
        saga.error
            .as_deref()
            .is_some_and(|e| e.contains("account closed"))
    );
    o.close().await;
}

#[tokio::test]
async fn a_compensation_that_keeps_failing_parks_until_an_operator_retries() {
    let f = Fixture::new();
    f.actions
        .on("debit", CallKind::Action, Script::Ok(json!({"ref": "d-1"})));
    f.actions.on(
        "credit",
        CallKind::Action,
        Script::Fail(Failure::rejected("no")),
    );
    for _ in 0..3 {
        f.actions.on(
            "debit",
            CallKind::Compensate,
            Script::Fail(Failure::transient("down")),
        );
    }
    let o = f.open().await;
    let id = o
        .start(
            "transfer",
            json!({"from": "a", "to": "b", "amount": 1}),
            None,
        )
        .await
        .expect("start")
        .id;
    let saga = o.wait(&id, WAIT).await.expect("wait");
    assert_eq!(saga.status, SagaStatus::NeedsAttention, "{saga:#?}");
    assert_eq!(saga.steps[0].compensation_attempts, 3);
    let parked = o
        .list(&Filter {
            status: Some("needs_attention".into()),
            ..Filter::default()
        })
        .await
        .expect("list");
    assert_eq!(parked.len(), 1);
    assert!(matches!(
        o.abort(&id, "x").await,
        Err(SagaError::WrongState(_))
    ));
    let saga = o.retry(&id).await.expect("retry");
    assert_eq!(saga.status, SagaStatus::Compensating);
    let saga = o.wait(&id, WAIT).await.expect("wait");
    assert_eq!(saga.status, SagaStatus::Compensated);
    assert!(matches!(o.retry(&id).await, Err(SagaError::WrongState(_))));
    o.close().await;
}

#[tokio::test]
async fn a_saga_cut_off_mid_call_resumes_with_the_same_idempotency_key() {
    let f = Fixture::new();
    f.actions
        .on("debit", CallKind::Action, Script::Ok(json!({"ref": "d-1"})));
    f.actions.on("credit", CallKind::Action, Script::Hang);
    let o = f.open().await;
    let id = o
        .start(
            "transfer",
            json!({"from": "a", "to": "b", "amount": 1}),
            None,
        )
        .await
        .expect("start")
        .id;
    // Wait until the credit call is in flight, then stop as a crash would.
    for _ in 0..1000 {
        if f.actions.trace().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(f.actions.trace(), ["debit:action", "credit:action"]);
    o.close().await;
    let persisted = {
        let o = f.open().await;
        let saga = o.get(&id).await.expect("get").expect("saga");
        o.close().await;
        saga
    };
    assert_eq!(
        persisted.steps[1].status,
        StepStatus::Running,
        "persisted before the call"
    );

    let o = f.open().await;
    assert_eq!(o.resume().await.expect("resume"), 1);
    let saga = o.wait(&id, WAIT).await.expect("wait");
    assert_eq!(saga.status, SagaStatus::Completed, "{saga:#?}");
    let calls = f.actions.calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(
        calls[1].idempotency_key, calls[2].idempotency_key,
        "credit repeated"
    );
    assert_eq!(calls[2].attempt, 2);
    o.close().await;
}

#[tokio::test]
async fn idempotency_keys_start_one_saga() {
    let f = Fixture::new();
    let o = f.open().await;
    let input = json!({"from": "a", "to": "b", "amount": 1});
    let first = o
        .start("transfer", input.clone(), Some("k-1"))
        .await
        .expect("start");
    let again = o
        .start("transfer", input.clone(), Some("k-1"))
        .await
        .expect("start");
    assert!(first.created && !again.created);
    assert_eq!(first.id, again.id);
    let other = o
        .start("transfer", input, Some("k-2"))
        .await
        .expect("start");
    assert_ne!(other.id, first.id);
    assert!(matches!(
        o.start("nope", json!({}), None).await,
        Err(SagaError::UnknownDefinition(_))
    ));
    o.wait(&first.id, WAIT).await.expect("wait");
    o.wait(&other.id, WAIT).await.expect("wait");
    o.close().await;
}

#[tokio::test]
async fn an_abort_during_backoff_compensates() {
    let f = Fixture::new();
    let slow = SagaDefinition::builder("slow")
        .step(
            Step::new("a", Action::invoke("x", "POST", "/a"))
                .compensate(Action::invoke("x", "POST", "/undo-a")),
        )
        .step(
            Step::new("b", Action::invoke("x", "POST", "/b"))
                .compensate(Action::invoke("x", "POST", "/undo-b"))
                .retry(RetryPolicy {
                    max_attempts: 5,
                    initial_backoff: Duration::from_secs(3600),
                    max_backoff: Duration::from_secs(3600),
                    multiplier: 1.0,
                }),
        )
        .build()
        .expect("valid");
    f.actions.on(
        "b",
        CallKind::Action,
        Script::Fail(Failure::refused("circuit open")),
    );
    let o = f.open().await;
    o.define(slow).await.expect("define");
    let id = o.start("slow", json!({}), None).await.expect("start").id;
    for _ in 0..1000 {
        if f.actions.trace().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let saga = o.abort(&id, "customer cancelled").await.expect("abort");
    assert_eq!(saga.status, SagaStatus::Compensating);
    let saga = o.wait(&id, WAIT).await.expect("wait");
    assert_eq!(saga.status, SagaStatus::Compensated, "{saga:#?}");
    // b was refused (never applied): only a is undone.
    assert_eq!(f.actions.trace(), ["a:action", "b:action", "a:compensate"]);
    o.close().await;
}

#[tokio::test]
async fn a_step_timeout_is_a_retryable_failure() {
    let f = Fixture::new();
    let def = SagaDefinition::builder("timed")
        .step(
            Step::new("a", Action::invoke("x", "POST", "/a"))
                .timeout(Duration::from_millis(50))
                .retry(fast()),
        )
        .build()
        .expect("valid");
    f.actions.on("a", CallKind::Action, Script::Hang);
    let o = f.open().await;
    o.define(def).await.expect("define");
    let id = o.start("timed", json!({}), None).await.expect("start").id;
    let saga = o.wait(&id, WAIT).await.expect("wait");
    assert_eq!(saga.status, SagaStatus::Completed, "{saga:#?}");
    assert_eq!(saga.steps[0].attempts, 2);
    assert!(
        saga.history
            .iter()
            .any(|h| h.detail.as_deref().is_some_and(|d| d.contains("timed out")))
    );
    o.close().await;
}

#[tokio::test]
async fn an_unresolvable_template_fails_the_step_without_calling() {
    let f = Fixture::new();
    let o = f.open().await;
    // `from` is missing from the input: debit's path can't be rendered.
    let id = o
        .start("transfer", json!({"to": "b"}), None)
        .await
        .expect("start")
        .id;
    let saga = o.wait(&id, WAIT).await.expect("wait");
    assert_eq!(saga.status, SagaStatus::Compensated, "{saga:#?}");
    assert!(f.actions.calls().is_empty());
    assert!(
        saga.error
            .as_deref()
            .is_some_and(|e| e.contains("input.from")),
        "{:?}",
        saga.error
    );
    o.close().await;
}

#[tokio::test]
async fn definitions_persist_and_bad_ones_are_refused_whole() {
    let f = Fixture::new();
    let o = f.open().await;
    let mut bad = transfer();
    bad.name = "bad".into();
    bad.steps[0].action = Action::invoke("accounts", "POST", "/x/{{steps.credit.output.id}}");
    let Err(SagaError::InvalidDefinition(errors)) = o.define(bad).await else {
        panic!("accepted a forward reference")
    };
    assert_eq!(errors[0].code, "invalid_template");
    assert!(o.definition("bad").is_none());
    o.close().await;
    let o = f.open().await;
    assert!(
        o.definition("transfer").is_some(),
        "definitions are in the log"
    );
    assert!(o.undefine("transfer").await.expect("undefine"));
    o.close().await;
}
