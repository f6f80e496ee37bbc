//! A saga participant for black-box tests: accounts with idempotent debits and
//! credits, an idempotent undo of any earlier operation, and fault switches.
//!
//! It runs in the test process, so its state survives `kill -9` of the sidecar: the
//! tests check invariants (money is conserved) against it.
//!
//! - `POST /accounts/{id}/debit` `{amount}` — 409 when the balance is short;
//! - `POST /accounts/{id}/credit` `{amount}`;
//! - `POST /accounts/{id}/undo` `{of: <idempotency key>}` — reverses the operation
//!   made with that key if it was applied, else does nothing (and remembers, so a
//!   late original is refused);
//! - `GET /accounts/{id}` → `{balance}`.
//!
//! Every POST needs an `Idempotency-Key`; a repeated key gets the first answer
//! without applying anything again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// What the bank does with the next operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Fault {
    /// Works.
    #[default]
    None,
    /// Answers 503 without applying.
    Unavailable,
    /// Applies, then answers 503 (the answer is "lost").
    ApplyThenFail,
    /// Answers 200 with a body that is not JSON.
    Garbage,
}

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pub(crate) balances: HashMap<String, i64>,
    /// Answers by idempotency key.
    answers: HashMap<String, (u16, Value)>,
    /// Applied operations by key: (account, signed amount).
    applied: HashMap<String, (String, i64)>,
    /// Keys undone (or refused in advance).
    undone: HashMap<String, bool>,
    /// Operations applied, for tests that count them.
    pub(crate) operations: u64,
    pub(crate) fault: Fault,
    /// Fail this many of the next operations with `fault`, then heal (0: forever).
    pub(crate) fault_budget: u32,
    /// Apply `fault` only to this operation (`debit`, `credit`, `undo`); `None`: all.
    pub(crate) fault_only: Option<String>,
    /// Fail each operation with this probability in [0, 1] (random faults).
    pub(crate) random_fault: f64,
    /// Answer each operation this much later (so crashes land mid-saga).
    pub(crate) latency: std::time::Duration,
    rng: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Bank {
    pub(crate) url: String,
    pub(crate) ledger: Arc<Mutex<Ledger>>,
}

impl Bank {
    pub(crate) async fn start(accounts: &[(&str, i64)]) -> Self {
        let ledger = Arc::new(Mutex::new(Ledger {
            balances: accounts
                .iter()
                .map(|(a, b)| ((*a).to_owned(), *b))
                .collect(),
            rng: 0x9E37_79B9_7F4A_7C15,
            ..Ledger::default()
        }));
        let app = Router::new()
            .route("/accounts/{id}", get(balance))
            .route("/accounts/{id}/{op}", post(operate))
            .with_state(Arc::clone(&ledger));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind bank");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, ledger }
    }

    pub(crate) fn balance(&self, account: &str) -> i64 {
        self.ledger.lock().expect("lock").balances[account]
    }

    pub(crate) fn total(&self) -> i64 {
        self.ledger.lock().expect("lock").balances.values().sum()
    }

    pub(crate) fn set_fault(&self, fault: Fault, budget: u32) {
        let mut l = self.ledger.lock().expect("lock");
        l.fault = fault;
        l.fault_budget = budget;
        l.fault_only = None;
    }

    /// Like [`set_fault`](Self::set_fault), for operation `op` only.
    pub(crate) fn set_fault_on(&self, op: &str, fault: Fault) {
        let mut l = self.ledger.lock().expect("lock");
        l.fault = fault;
        l.fault_budget = 0;
        l.fault_only = Some(op.to_owned());
    }

    pub(crate) fn set_latency(&self, latency: std::time::Duration) {
        self.ledger.lock().expect("lock").latency = latency;
    }

    pub(crate) fn set_random_fault(&self, probability: f64) {
        self.ledger.lock().expect("lock").random_fault = probability;
    }

    /// Whether the operation made with `key` is applied now (and not undone).
    pub(crate) fn is_applied(&self, key: &str) -> bool {
        let l = self.ledger.lock().expect("lock");
        l.applied.contains_key(key) && !l.undone.contains_key(key)
    }
}

async fn balance(
    State(ledger): State<Arc<Mutex<Ledger>>>,
    Path(id): Path<String>,
) -> (StatusCode, axum::Json<Value>) {
    let l = ledger.lock().expect("lock");
    match l.balances.get(&id) {
        Some(b) => (StatusCode::OK, axum::Json(json!({ "balance": b }))),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "no account"})),
        ),
    }
}

async fn operate(
    State(ledger): State<Arc<Mutex<Ledger>>>,
    Path((id, op)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, String) {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return (StatusCode::BAD_REQUEST, "no Idempotency-Key".into());
    };
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let latency = ledger.lock().expect("lock").latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut l = ledger.lock().expect("lock");
    if let Some((status, answer)) = l.answers.get(&key) {
        return (
            StatusCode::from_u16(*status).expect("status"),
            answer.to_string(),
        );
    }
    // Faults.
    let mut fault = if l.fault_only.as_ref().is_none_or(|only| *only == op) {
        l.fault
    } else {
        Fault::None
    };
    if fault != Fault::None && l.fault_budget > 0 {
        l.fault_budget -= 1;
        if l.fault_budget == 0 {
            l.fault = Fault::None;
        }
    }
    if fault == Fault::None && l.random_fault > 0.0 {
        l.rng ^= l.rng << 13;
        l.rng ^= l.rng >> 7;
        l.rng ^= l.rng << 17;
        #[allow(clippy::cast_precision_loss)]
        let draw = (l.rng % 10_000) as f64 / 10_000.0;
        if draw < l.random_fault {
            fault = if l.rng % 2 == 0 {
                Fault::Unavailable
            } else {
                Fault::ApplyThenFail
            };
        }
    }
    if fault == Fault::Unavailable {
        return (StatusCode::SERVICE_UNAVAILABLE, "try later".into());
    }
    let (status, answer) = match op.as_str() {
        "debit" | "credit" => {
            let amount = body.get("amount").and_then(Value::as_i64).unwrap_or(0);
            if l.undone.contains_key(&key) {
                (409, json!({"error": "undone before it was applied"}))
            } else if !l.balances.contains_key(&id) {
                (404, json!({"error": "no account"}))
            } else if op == "debit" && l.balances[&id] < amount {
                (409, json!({"error": "insufficient funds"}))
            } else {
                let delta = if op == "debit" { -amount } else { amount };
                *l.balances.get_mut(&id).expect("account") += delta;
                l.applied.insert(key.clone(), (id.clone(), delta));
                l.operations += 1;
                (200, json!({"ref": key, "balance": l.balances[&id]}))
            }
        }
        "undo" => {
            let of = body
                .get("of")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if l.undone.insert(of.clone(), true).is_none()
                && let Some((account, delta)) = l.applied.get(&of).cloned()
            {
                *l.balances.get_mut(&account).expect("account") -= delta;
                l.operations += 1;
                (200, json!({"undone": of}))
            } else {
                (200, json!({"undone": of, "noop": true}))
            }
        }
        _ => (404, json!({"error": "no such operation"})),
    };
    l.answers.insert(key, (status, answer.clone()));
    match fault {
        Fault::ApplyThenFail => (StatusCode::SERVICE_UNAVAILABLE, "lost answer".into()),
        Fault::Garbage => (StatusCode::OK, "<html>not json</html>".into()),
        _ => (
            StatusCode::from_u16(status).expect("status"),
            answer.to_string(),
        ),
    }
}
