//! Shared by the test files: the backends, a bank-account aggregate, projections of
//! it, and the suite of scenarios every backend pair runs ([`suite`]).
#![allow(dead_code)] // each test file uses part of this

pub(crate) mod suite;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use tempfile::TempDir;
use trellis_core::testing::{postgres_url, services_enabled, unique_name};
use trellis_cqrs::{
    Aggregate, Projection, ProjectionError, ProjectionHandle, ProjectionState, ProjectionStatus,
    Source, ViewBatch, async_trait, decode_event, encode_event,
};
use trellis_eventstore::embedded::EmbeddedEventStore;
use trellis_eventstore::postgres::PostgresEventStore;
use trellis_eventstore::{Append, EventStore, ExpectedVersion, RecordedEvent, StreamName};
use trellis_state::{EmbeddedStore, PostgresStore, StateStore};

/// Generates one test per scenario of [`suite`] for the backends `$make` (a future
/// of `Option<Backends>`; `None` skips).
#[allow(unused_macros)] // not by every test file
macro_rules! cqrs_suite {
    ($make:expr) => {
        support::cqrs_suite!(@tests $make;
            commands_decide_append_and_reject,
            concurrent_handlers_both_succeed_by_retrying,
            conflicts_are_bounded_and_retries_see_the_winner,
            snapshots_shorten_loads,
            projection_keeps_balances_and_its_checkpoint,
            a_restarted_runner_applies_each_event_once,
            two_runners_build_the_view_of_one,
            rebuild_gives_the_same_view,
            a_rebuild_fences_runners_elsewhere,
            a_failing_projection_retries_and_recovers,
            sources_all_and_stream,
        );
    };
    (@tests $make:expr; $($scenario:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let Some(backends) = $make.await else { return };
                support::suite::$scenario(&backends).await;
            }
        )+
    };
}
#[allow(unused_imports)]
pub(crate) use cqrs_suite;

// === backends ===

/// An event store and a state store, with what keeps them alive.
pub(crate) struct Backends {
    pub(crate) events: Arc<dyn EventStore>,
    pub(crate) state: Arc<dyn StateStore>,
    _dir: Option<TempDir>,
}

/// Both embedded stores, in a fresh tempdir.
pub(crate) async fn embedded() -> Option<Backends> {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = EmbeddedEventStore::open(dir.path().join("events.redb"))
        .await
        .expect("open the event store");
    let state = EmbeddedStore::open(dir.path().join("state.redb"), Default::default())
        .expect("open the state store");
    Some(Backends {
        events: Arc::new(events),
        state: Arc::new(state),
        _dir: Some(dir),
    })
}

/// Both PostgreSQL stores, each in a schema of its own.
pub(crate) async fn postgres() -> Option<Backends> {
    if !services_enabled("PostgreSQL") {
        return None;
    }
    let mut events = trellis_core::config::PostgresEventStore::new(postgres_url());
    events.schema = Some(unique_name("t_cqrs_events"));
    let mut state = trellis_core::config::PostgresState::new(postgres_url());
    state.schema = unique_name("t_cqrs_state");
    let must_run =
        "PostgreSQL at TRELLIS_TEST_POSTGRES_URL (default 127.0.0.1:5432) must be running";
    let events = PostgresEventStore::connect("cqrs", &events)
        .await
        .expect(must_run);
    let state = PostgresStore::connect("cqrs", &state)
        .await
        .expect(must_run);
    Some(Backends {
        events: Arc::new(events),
        state: Arc::new(state),
        _dir: None,
    })
}

// === the bank account ===

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Account {
    pub(crate) owner: Option<String>,
    pub(crate) balance: u64,
}

#[derive(Debug, Clone)]
pub(crate) enum AccountCommand {
    Open { owner: String },
    Deposit(u64),
    Withdraw(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum AccountEvent {
    Opened { owner: String },
    Deposited { amount: u64 },
    Withdrew { amount: u64 },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AccountError {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds { balance: u64, requested: u64 },
}

impl Aggregate for Account {
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    const CATEGORY: &'static str = "account";

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { .. } if self.owner.is_some() => Err(AccountError::AlreadyOpen),
            AccountCommand::Open { owner } => Ok(vec![AccountEvent::Opened {
                owner: owner.clone(),
            }]),
            _ if self.owner.is_none() => Err(AccountError::NotOpen),
            AccountCommand::Deposit(0) | AccountCommand::Withdraw(0) => Ok(vec![]),
            AccountCommand::Deposit(amount) => {
                Ok(vec![AccountEvent::Deposited { amount: *amount }])
            }
            AccountCommand::Withdraw(amount) if *amount > self.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    requested: *amount,
                })
            }
            AccountCommand::Withdraw(amount) => {
                Ok(vec![AccountEvent::Withdrew { amount: *amount }])
            }
        }
    }

    fn apply(&mut self, event: AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => self.owner = Some(owner),
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrew { amount } => self.balance -= amount,
        }
    }
}

pub(crate) fn account_stream(id: &str) -> StreamName {
    Account::stream_name(id).expect("valid id")
}

/// Appends an account's opening and `deposits` deposits of 1, 2, 3, … in one call
/// (fast history for projection tests); returns the global position after them.
pub(crate) async fn seed_account(events: &Arc<dyn EventStore>, id: &str, deposits: u64) -> u64 {
    let mut batch = vec![
        encode_event(&AccountEvent::Opened {
            owner: format!("owner of {id}"),
        })
        .expect("encode"),
    ];
    for amount in 1..=deposits {
        batch.push(encode_event(&AccountEvent::Deposited { amount }).expect("encode"));
    }
    let appended = events
        .append(vec![Append {
            stream: account_stream(id),
            expected: ExpectedVersion::NoStream,
            events: batch,
        }])
        .await
        .expect("append");
    appended[0].positions.end
}

/// The sum 1 + 2 + … + n.
pub(crate) fn triangle(n: u64) -> u64 {
    n * (n + 1) / 2
}

// === projections ===

/// Balances per account (`accounts/{id}`: owner, balance, events) and totals over
/// all (`totals`: events, deposited). Every write is a read-modify-write increment,
/// so applying an event twice shows in the numbers.
#[derive(Debug, Clone)]
pub(crate) struct Balances {
    pub(crate) name: String,
}

impl Balances {
    pub(crate) fn new() -> Self {
        Self {
            name: "balances".into(),
        }
    }

    pub(crate) fn named(name: &str) -> Self {
        Self { name: name.into() }
    }
}

#[async_trait]
impl Projection for Balances {
    fn name(&self) -> &str {
        &self.name
    }

    fn source(&self) -> Source {
        Source::Category(Account::CATEGORY.into())
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        view: &mut ViewBatch,
    ) -> Result<(), ProjectionError> {
        for recorded in events {
            let event: AccountEvent = decode_event(recorded)?;
            let id = recorded
                .stream
                .as_str()
                .split_once('-')
                .map(|(_, id)| id.to_owned())
                .ok_or_else(|| ProjectionError::custom("an account stream without an id"))?;
            let key = format!("accounts/{id}");
            let mut account: Json = view
                .get(&key)
                .await?
                .unwrap_or_else(|| json!({"owner": null, "balance": 0, "events": 0}));
            let mut totals: Json = view
                .get("totals")
                .await?
                .unwrap_or_else(|| json!({"events": 0, "deposited": 0}));
            let balance = account["balance"].as_u64().unwrap_or(0);
            match event {
                AccountEvent::Opened { owner } => account["owner"] = json!(owner),
                AccountEvent::Deposited { amount } => {
                    account["balance"] = json!(balance + amount);
                    totals["deposited"] = json!(totals["deposited"].as_u64().unwrap_or(0) + amount);
                }
                AccountEvent::Withdrew { amount } => {
                    account["balance"] = json!(balance.checked_sub(amount).ok_or_else(|| {
                        ProjectionError::custom(format!("account {id} goes below zero"))
                    })?);
                }
            }
            account["events"] = json!(account["events"].as_u64().unwrap_or(0) + 1);
            totals["events"] = json!(totals["events"].as_u64().unwrap_or(0) + 1);
            view.put(&key, &account)?;
            view.put("totals", &totals)?;
        }
        Ok(())
    }
}

/// [`Balances`] that fails its first `failures` batches — after writing a "poison"
/// key, which must never reach the view.
#[derive(Debug)]
pub(crate) struct Flaky {
    pub(crate) inner: Balances,
    pub(crate) failures: AtomicU32,
}

impl Flaky {
    pub(crate) fn new(failures: u32) -> Self {
        Self {
            inner: Balances::named("flaky"),
            failures: AtomicU32::new(failures),
        }
    }
}

#[async_trait]
impl Projection for Flaky {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn source(&self) -> Source {
        self.inner.source()
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        view: &mut ViewBatch,
    ) -> Result<(), ProjectionError> {
        self.inner.apply(events, view).await?;
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            view.put("poison", &true)?;
            return Err(ProjectionError::custom(
                "the downstream lookup is unavailable",
            ));
        }
        Ok(())
    }
}

/// Counts events per category (`count/{category}`) of any source.
#[derive(Debug)]
pub(crate) struct Counts {
    pub(crate) name: &'static str,
    pub(crate) source: Source,
}

#[async_trait]
impl Projection for Counts {
    fn name(&self) -> &str {
        self.name
    }

    fn source(&self) -> Source {
        self.source.clone()
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        view: &mut ViewBatch,
    ) -> Result<(), ProjectionError> {
        for event in events {
            let key = format!("count/{}", event.stream.category());
            let n: u64 = view.get(&key).await?.unwrap_or(0);
            view.put(&key, &(n + 1))?;
        }
        Ok(())
    }
}

// === helpers ===

/// How long a test waits for a projection before failing.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);

/// Waits (bounded) until the projection is live at `position` or beyond.
pub(crate) async fn settle(handle: &ProjectionHandle, position: u64) -> ProjectionStatus {
    let mut changes = handle.runner().status_changes();
    let settled =
        changes.wait_for(|s| s.checkpoint >= position && s.state == ProjectionState::Live);
    match tokio::time::timeout(PATIENCE, settled).await {
        Ok(Ok(status)) => status.clone(),
        _ => panic!("projection stuck: {:?}", handle.status()),
    }
}

/// Every key of a view (relative to `prefix`) and its JSON, without the checkpoint.
pub(crate) async fn view_entries(
    state: &Arc<dyn StateStore>,
    prefix: &str,
) -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    let mut after = None;
    loop {
        let page = state.list(prefix, after.as_ref(), 100).await.expect("list");
        for key in &page.keys {
            let relative = key.as_str()[prefix.len()..].to_owned();
            if relative.starts_with('$') {
                continue;
            }
            let item = state.get(key).await.expect("get").expect("listed");
            out.insert(
                relative,
                serde_json::from_slice(&item.value.data).expect("json"),
            );
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return out,
        }
    }
}

/// The store's head: the position the next event gets.
pub(crate) fn head(events: &Arc<dyn EventStore>) -> u64 {
    *events.head().borrow()
}
