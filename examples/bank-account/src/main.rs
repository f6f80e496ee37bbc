//! A worked CQRS example: an event-sourced bank account.
//!
//! - **Write side**: the `Account` aggregate decides commands (open, deposit,
//!   withdraw) into events; a `CommandHandler` loads it from its stream (and
//!   snapshots), appends with the expected version and retries when another writer
//!   won the race.
//! - **Read side**: the `balances` projection keeps one document per account and a
//!   bank-wide total in a state store, committed with its checkpoint in one
//!   transaction, so a crash never double-counts a deposit.
//! - **Queries**: the read model, an account loaded from its events, and the
//!   account's stream read as it was at an earlier version (time travel).
//!
//! Run it with `cargo run -p trellis-example-bank`; its data lives in
//! `target/bank-account-data` (delete it to start over; a second run shows the
//! projection resuming from its checkpoint).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use trellis_cqrs::{
    Aggregate, CommandHandler, CqrsError, Projection, ProjectionError, ProjectionRunner, Source,
    ViewBatch, async_trait, decode_event,
};
use trellis_eventstore::embedded::EmbeddedEventStore;
use trellis_eventstore::{AsOf, EventStore, ReadStream, RecordedEvent, StreamName};
use trellis_state::{EmbeddedStore, StateStore};

// === the write model ===

/// An account, as its events made it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    owner: Option<String>,
    balance: i64,
}

/// What can be asked of an account.
#[derive(Debug)]
enum Command {
    Open { owner: String },
    Deposit { amount: i64 },
    Withdraw { amount: i64 },
}

/// What happened to an account; a variant's name is its stored event type.
#[derive(Debug, Serialize, Deserialize)]
enum Event {
    Opened { owner: String },
    Deposited { amount: i64 },
    Withdrawn { amount: i64 },
}

/// Why an account refused a command.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("amounts are positive")]
    NotPositive,
    #[error("insufficient funds: balance {balance}, asked {asked}")]
    InsufficientFunds { balance: i64, asked: i64 },
}

impl Aggregate for Account {
    type Command = Command;
    type Event = Event;
    type Error = Refused;
    const CATEGORY: &'static str = "account";

    fn handle(&self, command: &Command) -> Result<Vec<Event>, Refused> {
        match command {
            Command::Open { owner } if self.owner.is_none() => Ok(vec![Event::Opened {
                owner: owner.clone(),
            }]),
            Command::Open { .. } => Err(Refused::AlreadyOpen),
            _ if self.owner.is_none() => Err(Refused::NotOpen),
            Command::Deposit { amount } | Command::Withdraw { amount } if *amount <= 0 => {
                Err(Refused::NotPositive)
            }
            Command::Deposit { amount } => Ok(vec![Event::Deposited { amount: *amount }]),
            Command::Withdraw { amount } if *amount > self.balance => {
                Err(Refused::InsufficientFunds {
                    balance: self.balance,
                    asked: *amount,
                })
            }
            Command::Withdraw { amount } => Ok(vec![Event::Withdrawn { amount: *amount }]),
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Opened { owner } => self.owner = Some(owner),
            Event::Deposited { amount } => self.balance += amount,
            Event::Withdrawn { amount } => self.balance -= amount,
        }
    }
}

// === the read model ===

/// One account's row in the read model.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Row {
    owner: String,
    balance: i64,
    transactions: u64,
}

/// Keeps `account/<id>` rows and a `total` of every balance.
struct Balances;

#[async_trait]
impl Projection for Balances {
    fn name(&self) -> &str {
        "balances"
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
            let id = recorded
                .stream
                .as_str()
                .trim_start_matches("account-")
                .to_owned();
            let key = format!("account/{id}");
            let mut row: Row = view.get(&key).await?.unwrap_or_default();
            let mut total: i64 = view.get("total").await?.unwrap_or(0);
            match decode_event::<Event>(recorded)? {
                Event::Opened { owner } => row.owner = owner,
                Event::Deposited { amount } => {
                    row.balance += amount;
                    row.transactions += 1;
                    total += amount;
                }
                Event::Withdrawn { amount } => {
                    row.balance -= amount;
                    row.transactions += 1;
                    total -= amount;
                }
            }
            view.put(&key, &row)?;
            view.put("total", &total)?;
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bank-account-data");
    std::fs::create_dir_all(&dir)?;
    let events: Arc<dyn EventStore> =
        Arc::new(EmbeddedEventStore::open(dir.join("events.redb")).await?);
    let state: Arc<dyn StateStore> = Arc::new(EmbeddedStore::open(
        dir.join("state.redb"),
        Default::default(),
    )?);

    // The projection runs on its own task from its checkpoint (zero on a first run).
    let balances = ProjectionRunner::builder(Balances)
        .build(Arc::clone(&events), Arc::clone(&state))?
        .spawn();

    // --- commands ---
    let accounts = CommandHandler::<Account>::builder()
        .snapshot_every(50)
        .build(Arc::clone(&events));
    let run = std::process::id(); // fresh accounts on every run
    let (alice, bob) = (format!("alice-{run}"), format!("bob-{run}"));
    accounts
        .execute(
            &alice,
            Command::Open {
                owner: "Alice".into(),
            },
        )
        .await?;
    accounts
        .execute(
            &bob,
            Command::Open {
                owner: "Bob".into(),
            },
        )
        .await?;
    accounts
        .execute(&alice, Command::Deposit { amount: 100 })
        .await?;
    accounts
        .execute(&bob, Command::Deposit { amount: 40 })
        .await?;
    println!("opened {alice} and {bob}; deposited 100 and 40");

    // The aggregate guards its invariants: an overdraft is refused, nothing stored.
    match accounts
        .execute(&bob, Command::Withdraw { amount: 500 })
        .await
    {
        Err(CqrsError::Rejected(why)) => println!("bob withdraws 500: refused ({why})"),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }

    // Two tellers withdraw from Alice at once: both load version 1, one append wins,
    // the other is refused with wrong_expected_version, reloads and decides again.
    let (a, b) = tokio::join!(
        accounts.execute(&alice, Command::Withdraw { amount: 30 }),
        accounts.execute(&alice, Command::Withdraw { amount: 50 }),
    );
    a?;
    let last = b?;
    println!("two concurrent withdrawals from alice (30 and 50): both applied, in turn");

    // --- queries ---
    // The write model, from its events.
    let (account, version) = accounts.load(&alice).await?;
    println!(
        "alice from her stream: balance {} at version {version:?}",
        account.balance
    );
    // Time travel: the stream as it was after the deposit (version 1).
    let stream = StreamName::new(format!("account-{alice}"))?;
    let past = events
        .read_stream(
            &stream,
            ReadStream {
                as_of: Some(AsOf::Version(1)),
                ..ReadStream::default()
            },
        )
        .await?;
    let types: Vec<&str> = past.events.iter().map(|e| e.ty.as_str()).collect();
    println!("alice as of version 1: {types:?}");

    // The read model, once the projection has seen the last command.
    let status = balances.wait_for_checkpoint(last.positions.end).await;
    let view = balances.view();
    let row: Option<Row> = view.get(&format!("account/{alice}")).await?;
    let total: Option<i64> = view.get("total").await?;
    println!(
        "read model: alice {row:?}; bank total {total:?} (projection checkpoint {}, lag {})",
        status.checkpoint, status.lag
    );
    anyhow::ensure!(row.map(|r| r.balance) == Some(20), "alice's balance is 20");

    balances.stop().await;
    events.close().await?;
    state.close().await?;
    Ok(())
}
