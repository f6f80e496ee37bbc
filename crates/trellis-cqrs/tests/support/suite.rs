//! The scenarios every pair of backends runs (see `cqrs_suite!`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tokio::sync::watch;
use trellis_cqrs::{
    CommandHandler, CqrsError, ProjectionRunner, ProjectionState, Source, Start, encode_event,
};
use trellis_eventstore::{
    Append, Appended, Body, Deletion, EventStore, EventStoreError, ExpectedVersion, Metadata,
    ReadStream, RecordedEvent, Snapshot, StreamInfo, StreamMetadata, StreamName, StreamSlice,
};
use trellis_state::Key;

use super::*;

fn handler(backends: &Backends) -> CommandHandler<Account> {
    CommandHandler::<Account>::builder().build(Arc::clone(&backends.events))
}

async fn open(handler: &CommandHandler<Account>, id: &str) {
    handler
        .execute(
            id,
            AccountCommand::Open {
                owner: format!("owner of {id}"),
            },
        )
        .await
        .expect("open");
}

async fn read_all_of(events: &Arc<dyn EventStore>, stream: &StreamName) -> Vec<RecordedEvent> {
    let read = ReadStream {
        limit: 10_000,
        ..ReadStream::default()
    };
    events.read_stream(stream, read).await.expect("read").events
}

// === commands ===

pub(crate) async fn commands_decide_append_and_reject(b: &Backends) {
    let accounts = handler(b);
    let refused = accounts.execute("1", AccountCommand::Deposit(5)).await;
    assert!(
        matches!(refused, Err(CqrsError::Rejected(AccountError::NotOpen))),
        "{refused:?}"
    );
    let opened = accounts
        .execute(
            "1",
            AccountCommand::Open {
                owner: "ada".into(),
            },
        )
        .await
        .expect("open");
    assert_eq!(opened.stream.as_str(), "account-1");
    assert_eq!((opened.version, opened.events), (Some(0), 1));
    assert_eq!(opened.positions.end - opened.positions.start, 1);
    let again = accounts
        .execute(
            "1",
            AccountCommand::Open {
                owner: "bob".into(),
            },
        )
        .await;
    assert!(matches!(
        again,
        Err(CqrsError::Rejected(AccountError::AlreadyOpen))
    ));

    let deposited = accounts
        .execute("1", AccountCommand::Deposit(10))
        .await
        .expect("deposit");
    assert_eq!(deposited.version, Some(1));
    let too_much = accounts
        .execute("1", AccountCommand::Withdraw(11))
        .await
        .expect_err("insufficient funds");
    assert_eq!(
        too_much.rejection(),
        Some(&AccountError::InsufficientFunds {
            balance: 10,
            requested: 11
        })
    );
    assert!(
        too_much.to_string().contains("insufficient funds"),
        "{too_much}"
    );
    accounts
        .execute("1", AccountCommand::Withdraw(4))
        .await
        .expect("withdraw");

    // A command with no events appends nothing.
    let head_before = head(&b.events);
    let nothing = accounts
        .execute("1", AccountCommand::Deposit(0))
        .await
        .expect("no-op");
    assert_eq!((nothing.version, nothing.events), (Some(2), 0));
    assert!(nothing.positions.is_empty());
    assert_eq!(head(&b.events), head_before, "nothing appended");

    let (account, version) = accounts.load("1").await.expect("load");
    assert_eq!(
        account,
        Account {
            owner: Some("ada".into()),
            balance: 6
        }
    );
    assert_eq!(version, Some(2));
    let (unknown, version) = accounts.load("nobody").await.expect("load");
    assert_eq!((unknown, version), (Account::default(), None));

    // The stored events: variant names as types, contents as data.
    let stored = read_all_of(&b.events, &account_stream("1")).await;
    let types: Vec<&str> = stored.iter().map(|e| e.ty.as_str()).collect();
    assert_eq!(types, ["Opened", "Deposited", "Withdrew"]);
    assert_eq!(stored[1].data.to_value(), Some(json!({"amount": 10})));

    // Metadata: the builder's, overridden per command.
    let mut base = Metadata::default();
    base.extra.insert("app".into(), json!("bank"));
    let tagged = CommandHandler::<Account>::builder()
        .metadata(base)
        .build(Arc::clone(&b.events));
    let request = Metadata {
        correlation_id: Some("req-1".into()),
        causation_id: Some("cmd-1".into()),
        ..Metadata::default()
    };
    tagged
        .execute_with("1", AccountCommand::Deposit(1), request)
        .await
        .expect("deposit");
    let last = read_all_of(&b.events, &account_stream("1"))
        .await
        .pop()
        .expect("an event");
    assert_eq!(last.metadata.correlation_id.as_deref(), Some("req-1"));
    assert_eq!(last.metadata.causation_id.as_deref(), Some("cmd-1"));
    assert_eq!(last.metadata.extra["app"], json!("bank"));

    let invalid = accounts.execute("", AccountCommand::Deposit(1)).await;
    assert!(
        matches!(invalid, Err(CqrsError::InvalidId(_))),
        "{invalid:?}"
    );
}

pub(crate) async fn concurrent_handlers_both_succeed_by_retrying(b: &Backends) {
    const PER_HANDLER: u64 = 25;
    // Two handlers, as in two processes: nothing shared but the store.
    let make = || {
        CommandHandler::<Account>::builder()
            .max_retries(50)
            .build(Arc::clone(&b.events))
    };
    let (first, second) = (make(), make());
    open(&first, "shared").await;
    let run = |handler: CommandHandler<Account>, base: u64| {
        tokio::spawn(async move {
            for i in 0..PER_HANDLER {
                handler
                    .execute("shared", AccountCommand::Deposit(base + i))
                    .await
                    .expect("every deposit succeeds, retrying if it must");
            }
        })
    };
    let (a, b2) = tokio::join!(run(first.clone(), 1), run(second, 1000));
    a.expect("first");
    b2.expect("second");
    let expected: u64 = (0..PER_HANDLER).map(|i| (1 + i) + (1000 + i)).sum();
    let (account, version) = first.load("shared").await.expect("load");
    assert_eq!(account.balance, expected);
    assert_eq!(version, Some(2 * PER_HANDLER));
    let versions: Vec<u64> = read_all_of(&b.events, &account_stream("shared"))
        .await
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(
        versions,
        (0..=2 * PER_HANDLER).collect::<Vec<_>>(),
        "contiguous"
    );
}

/// An event store that lets a "concurrent writer" append `event` to the stream
/// just before each of the next `interfere` appends.
#[derive(Debug)]
struct Interfering {
    inner: Arc<dyn EventStore>,
    event: AccountEvent,
    interfere: AtomicU32,
}

#[async_trait]
impl EventStore for Interfering {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn append(&self, appends: Vec<Append>) -> Result<Vec<Appended>, EventStoreError> {
        let interfere = self
            .interfere
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if interfere {
            let event = encode_event(&self.event).expect("encode");
            self.inner
                .append(vec![Append {
                    stream: appends[0].stream.clone(),
                    expected: ExpectedVersion::Any,
                    events: vec![event],
                }])
                .await?;
        }
        self.inner.append(appends).await
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        read: ReadStream,
    ) -> Result<StreamSlice, EventStoreError> {
        self.inner.read_stream(stream, read).await
    }

    async fn read_all(
        &self,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        self.inner.read_all(position, limit).await
    }

    async fn read_category(
        &self,
        category: &str,
        position: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, EventStoreError> {
        self.inner.read_category(category, position, limit).await
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.inner.head()
    }

    async fn stream_info(
        &self,
        stream: &StreamName,
    ) -> Result<Option<StreamInfo>, EventStoreError> {
        self.inner.stream_info(stream).await
    }

    async fn set_metadata(
        &self,
        stream: &StreamName,
        metadata: StreamMetadata,
    ) -> Result<(), EventStoreError> {
        self.inner.set_metadata(stream, metadata).await
    }

    async fn delete(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        how: Deletion,
    ) -> Result<(), EventStoreError> {
        self.inner.delete(stream, expected, how).await
    }

    async fn save_snapshot(
        &self,
        stream: &StreamName,
        snapshot: Snapshot,
    ) -> Result<(), EventStoreError> {
        self.inner.save_snapshot(stream, snapshot).await
    }

    async fn load_snapshot(
        &self,
        stream: &StreamName,
    ) -> Result<Option<Snapshot>, EventStoreError> {
        self.inner.load_snapshot(stream).await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>, EventStoreError> {
        self.inner.load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<(), EventStoreError> {
        self.inner.save_checkpoint(name, position).await
    }

    async fn health(&self) -> Result<(), EventStoreError> {
        self.inner.health().await
    }

    async fn close(&self) -> Result<(), EventStoreError> {
        self.inner.close().await
    }
}

pub(crate) async fn conflicts_are_bounded_and_retries_see_the_winner(b: &Backends) {
    let plain = handler(b);
    open(&plain, "raced").await;
    let depositor = Arc::new(Interfering {
        inner: Arc::clone(&b.events),
        event: AccountEvent::Deposited { amount: 5 },
        interfere: AtomicU32::new(u32::MAX),
    });
    let always_loses = CommandHandler::<Account>::builder()
        .max_retries(2)
        .build(depositor as Arc<dyn EventStore>);
    let conflict = always_loses
        .execute("raced", AccountCommand::Deposit(1))
        .await;
    match conflict {
        Err(CqrsError::Conflict { stream, attempts }) => {
            assert_eq!((stream.as_str(), attempts), ("account-raced", 3));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let (account, version) = plain.load("raced").await.expect("load");
    assert_eq!(
        (account.balance, version),
        (15, Some(3)),
        "only the three interfering deposits landed"
    );

    // Withdrawing 10 of 15 is fine, but a concurrent withdrawal of 10 lands first:
    // the retry decides again, on the balance of 5, and refuses.
    let withdrawer = Arc::new(Interfering {
        inner: Arc::clone(&b.events),
        event: AccountEvent::Withdrew { amount: 10 },
        interfere: AtomicU32::new(1),
    });
    let refused = CommandHandler::<Account>::builder()
        .build(withdrawer as Arc<dyn EventStore>)
        .execute("raced", AccountCommand::Withdraw(10))
        .await
        .expect_err("refused on the second attempt");
    assert_eq!(
        refused.rejection(),
        Some(&AccountError::InsufficientFunds {
            balance: 5,
            requested: 10
        })
    );
    let (account, version) = plain.load("raced").await.expect("load");
    assert_eq!((account.balance, version), (5, Some(4)));
}

pub(crate) async fn snapshots_shorten_loads(b: &Backends) {
    let snapshotting = CommandHandler::<Account>::builder()
        .snapshot_every(5)
        .build(Arc::clone(&b.events));
    let stream = account_stream("snap");
    open(&snapshotting, "snap").await;
    for amount in 1..=11 {
        snapshotting
            .execute("snap", AccountCommand::Deposit(amount))
            .await
            .expect("deposit");
    }
    // Versions 0..=11; snapshots at 4 and 9 (every 5 events), the latest kept.
    let snapshot = b
        .events
        .load_snapshot(&stream)
        .await
        .expect("load snapshot")
        .expect("a snapshot");
    assert_eq!(snapshot.version, 9);
    let at_9: Account =
        serde_json::from_value(snapshot.data.to_value().expect("json")).expect("state");
    assert_eq!(
        at_9,
        Account {
            owner: Some("owner of snap".into()),
            balance: triangle(9)
        }
    );
    let (account, version) = snapshotting.load("snap").await.expect("load");
    assert_eq!((account.balance, version), (triangle(11), Some(11)));

    // Loads start from the snapshot: doctor it, and the doctored state shows.
    let doctored = Account {
        owner: Some("doctored".into()),
        balance: 1_000_000,
    };
    b.events
        .save_snapshot(
            &stream,
            Snapshot {
                version: 11,
                data: Body::json(&serde_json::to_value(&doctored).expect("json")),
            },
        )
        .await
        .expect("save");
    let (loaded, version) = snapshotting.load("snap").await.expect("load");
    assert_eq!((loaded, version), (doctored, Some(11)));
    // A handler without snapshots replays the stream.
    let (replayed, _) = handler(b).load("snap").await.expect("load");
    assert_eq!(replayed.balance, triangle(11));

    // A snapshot that no longer deserializes is ignored: full replay.
    b.events
        .save_snapshot(
            &stream,
            Snapshot {
                version: 11,
                data: Body::json(&json!({"balance": "not a number"})),
            },
        )
        .await
        .expect("save");
    let (loaded, version) = snapshotting.load("snap").await.expect("load");
    assert_eq!((loaded.balance, version), (triangle(11), Some(11)));
    // And commands still work from there.
    snapshotting
        .execute("snap", AccountCommand::Withdraw(triangle(11)))
        .await
        .expect("withdraw all");
}

// === projections ===

pub(crate) async fn projection_keeps_balances_and_its_checkpoint(b: &Backends) {
    let accounts = handler(b);
    open(&accounts, "a").await;
    open(&accounts, "b").await;
    accounts
        .execute("a", AccountCommand::Deposit(30))
        .await
        .expect("deposit");
    accounts
        .execute("b", AccountCommand::Deposit(7))
        .await
        .expect("deposit");
    let last = accounts
        .execute("a", AccountCommand::Withdraw(12))
        .await
        .expect("withdraw");

    let handle = ProjectionRunner::builder(Balances::new())
        .build(Arc::clone(&b.events), Arc::clone(&b.state))
        .expect("build")
        .spawn();
    let status = settle(&handle, last.positions.end).await;
    assert_eq!((status.lag, &status.state), (0, &ProjectionState::Live));
    assert_eq!(status.applied, 5);
    assert_eq!(status.last_error, None);
    let view = handle.view();
    assert_eq!(
        view.get::<Json>("accounts/a").await.expect("get"),
        Some(json!({"owner": "owner of a", "balance": 18, "events": 3}))
    );
    assert_eq!(
        view.get::<Json>("accounts/b").await.expect("get"),
        Some(json!({"owner": "owner of b", "balance": 7, "events": 2}))
    );
    // The checkpoint is in the state store, next to the view.
    let checkpoint = b
        .state
        .get(&Key::new("projections/balances/$checkpoint").expect("key"))
        .await
        .expect("get")
        .expect("a checkpoint");
    let stored: Json = serde_json::from_slice(&checkpoint.value.data).expect("json");
    assert_eq!(stored, json!({"position": last.positions.end}));

    // Live: new commands show up.
    let more = accounts
        .execute("b", AccountCommand::Deposit(1))
        .await
        .expect("deposit");
    settle(&handle, more.positions.end).await;
    assert_eq!(
        view.get::<Json>("accounts/b")
            .await
            .expect("get")
            .expect("b")["balance"],
        json!(8)
    );

    // Events of other categories move the head; the lag still returns to 0.
    for i in 0..5 {
        seed_other(&b.events, i).await;
    }
    let end = head(&b.events);
    let status = settle(&handle, end).await;
    assert_eq!((status.checkpoint, status.head, status.lag), (end, end, 0));
    assert_eq!(status.state, ProjectionState::Live);
    assert_eq!(
        view.get::<Json>("totals").await.expect("get"),
        Some(json!({"events": 6, "deposited": 38}))
    );
    handle.stop().await;
}

async fn seed_other(events: &Arc<dyn EventStore>, i: u64) {
    events
        .append(vec![Append {
            stream: StreamName::new(format!("other-{i}")).expect("name"),
            expected: ExpectedVersion::Any,
            events: vec![trellis_eventstore::EventData::json(
                "Noise",
                &json!({ "i": i }),
            )],
        }])
        .await
        .expect("append");
}

pub(crate) async fn a_restarted_runner_applies_each_event_once(b: &Backends) {
    seed_account(&b.events, "x", 499).await;
    let end = seed_account(&b.events, "y", 499).await;
    let runner = || {
        ProjectionRunner::builder(Balances::new())
            .batch_size(16)
            .build(Arc::clone(&b.events), Arc::clone(&b.state))
            .expect("build")
    };
    // Stop part-way.
    let first = runner().spawn();
    tokio::time::timeout(PATIENCE, first.wait_for_checkpoint(60))
        .await
        .expect("progress");
    first.stop().await;
    let partial = view_entries(&b.state, "projections/balances/").await;
    let applied = partial["totals"]["events"].as_u64().expect("events");
    assert!((60..1000).contains(&applied), "stopped part-way: {applied}");

    // A new runner continues from the checkpoint.
    let second = runner().spawn();
    let status = settle(&second, end).await;
    assert_eq!(
        status.applied,
        1000 - applied,
        "only what the first did not"
    );
    // Dropped (not stopped) while a third one starts: overlapping runners.
    let more = seed_account(&b.events, "z", 99).await;
    drop(second);
    let third = runner().spawn();
    settle(&third, more).await;
    let view = view_entries(&b.state, "projections/balances/").await;
    assert_eq!(
        view["totals"],
        json!({"events": 1100, "deposited": 2 * triangle(499) + triangle(99)})
    );
    for (id, deposits) in [("x", 499), ("y", 499), ("z", 99)] {
        assert_eq!(
            view[&format!("accounts/{id}")],
            json!({"owner": format!("owner of {id}"), "balance": triangle(deposits), "events": deposits + 1})
        );
    }
    third.stop().await;
}

pub(crate) async fn two_runners_build_the_view_of_one(b: &Backends) {
    let mut end = 0;
    for id in 0..5 {
        end = seed_account(&b.events, &id.to_string(), 79).await;
    }
    let runner = |name: &str| {
        ProjectionRunner::builder(Balances::named(name))
            .batch_size(8)
            .build(Arc::clone(&b.events), Arc::clone(&b.state))
            .expect("build")
    };
    let (one, two) = (runner("shared").spawn(), runner("shared").spawn());
    let alone = runner("alone").spawn();
    // More events while they run.
    let more = seed_account(&b.events, "late", 19).await;
    assert!(more > end);
    let (s1, s2) = tokio::join!(settle(&one, more), settle(&two, more));
    settle(&alone, more).await;
    assert_eq!(
        s1.applied + s2.applied,
        420,
        "each event applied by exactly one runner"
    );
    let shared = view_entries(&b.state, "projections/shared/").await;
    let single = view_entries(&b.state, "projections/alone/").await;
    assert_eq!(shared["totals"]["events"], json!(420));
    assert_eq!(shared, single);
    tokio::join!(one.stop(), two.stop(), alone.stop());
}

pub(crate) async fn rebuild_gives_the_same_view(b: &Backends) {
    seed_account(&b.events, "r1", 30).await;
    let end = seed_account(&b.events, "r2", 30).await;
    let mut handle = ProjectionRunner::builder(Balances::new())
        .batch_size(10)
        .build(Arc::clone(&b.events), Arc::clone(&b.state))
        .expect("build")
        .spawn();
    settle(&handle, end).await;
    let before = view_entries(&b.state, "projections/balances/").await;
    assert_eq!(before["totals"]["events"], json!(62));
    // A stray key under the prefix goes too.
    b.state
        .set(
            &Key::new("projections/balances/stray").expect("key"),
            trellis_state::Value::json("1"),
            Default::default(),
        )
        .await
        .expect("set");

    handle.rebuild().await.expect("rebuild");
    let status = settle(&handle, end).await;
    assert_eq!(status.lag, 0);
    let after = view_entries(&b.state, "projections/balances/").await;
    assert_eq!(after, before, "no stray key, nothing counted twice");
    handle.stop().await;
}

pub(crate) async fn a_rebuild_fences_runners_elsewhere(b: &Backends) {
    let end = seed_account(&b.events, "f", 150).await;
    // "Another process" runs the projection...
    let elsewhere = ProjectionRunner::builder(Balances::new())
        .batch_size(4)
        .build(Arc::clone(&b.events), Arc::clone(&b.state))
        .expect("build")
        .spawn();
    settle(&elsewhere, 40).await;
    // ... while this one rebuilds it mid-way.
    let here = ProjectionRunner::builder(Balances::new())
        .build(Arc::clone(&b.events), Arc::clone(&b.state))
        .expect("build");
    here.rebuild().await.expect("rebuild");
    // The other runner starts over and ends with the right view.
    let view = elsewhere.view();
    tokio::time::timeout(PATIENCE, async {
        loop {
            let totals: Option<Json> = view.get("totals").await.expect("get");
            let status = elsewhere.status();
            if status.checkpoint >= end && status.state == ProjectionState::Live && totals.is_some()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("caught up after the rebuild");
    let entries = view_entries(&b.state, "projections/balances/").await;
    assert_eq!(
        entries["totals"],
        json!({"events": 151, "deposited": triangle(150)})
    );
    elsewhere.stop().await;
}

pub(crate) async fn a_failing_projection_retries_and_recovers(b: &Backends) {
    let end = seed_account(&b.events, "flaky", 20).await;
    let handle = ProjectionRunner::builder(Flaky::new(3))
        .retry_backoff(Duration::from_millis(5), Duration::from_millis(20))
        .build(Arc::clone(&b.events), Arc::clone(&b.state))
        .expect("build")
        .spawn();
    let status = settle(&handle, end).await;
    assert_eq!(status.state, ProjectionState::Live);
    assert_eq!(
        status.last_error.as_deref(),
        Some("the downstream lookup is unavailable")
    );
    let view = view_entries(&b.state, "projections/flaky/").await;
    assert!(
        !view.contains_key("poison"),
        "a failed batch writes nothing"
    );
    assert_eq!(
        view["totals"],
        json!({"events": 21, "deposited": triangle(20)})
    );
    handle.stop().await;
}

pub(crate) async fn sources_all_and_stream(b: &Backends) {
    seed_account(&b.events, "s", 3).await;
    seed_other(&b.events, 1).await;
    // One of Trellis's own streams, which `$all` projections pass over.
    b.events
        .append(vec![Append {
            stream: StreamName::new("trellis-internal").expect("name"),
            expected: ExpectedVersion::Any,
            events: vec![trellis_eventstore::EventData::json("Internal", &json!({}))],
        }])
        .await
        .expect("append");
    let end = head(&b.events);
    let all = ProjectionRunner::builder(Counts {
        name: "all",
        source: Source::All,
    })
    .build(Arc::clone(&b.events), Arc::clone(&b.state))
    .expect("build")
    .spawn();
    let status = settle(&all, end).await;
    assert_eq!((status.checkpoint, status.lag, status.applied), (end, 0, 5));
    let counts = view_entries(&b.state, "projections/all/").await;
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(
        (&counts["count/account"], &counts["count/other"]),
        (&json!(4), &json!(1))
    );

    // A stream source counts in versions, from the end when asked to.
    let stream = account_stream("s");
    let one = ProjectionRunner::builder(Counts {
        name: "one-stream",
        source: Source::Stream(stream.clone()),
    })
    .start_from(Start::End)
    .build(Arc::clone(&b.events), Arc::clone(&b.state))
    .expect("build")
    .spawn();
    let status = settle(&one, 4).await;
    assert_eq!(
        (status.checkpoint, status.head, status.applied),
        (4, 4, 0),
        "history skipped"
    );
    let accounts = handler(b);
    accounts
        .execute("s", AccountCommand::Deposit(1))
        .await
        .expect("deposit");
    let status = settle(&one, 5).await;
    assert_eq!((status.checkpoint, status.lag, status.applied), (5, 0, 1));
    assert_eq!(
        one.view().get::<u64>("count/account").await.expect("get"),
        Some(1)
    );
    tokio::join!(all.stop(), one.stop());
}
