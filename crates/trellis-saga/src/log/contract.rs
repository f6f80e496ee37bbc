//! The contract every [`SagaLog`] backend must pass.
//!
//! Each check is a public `async fn` taking a [`Harness`] that opens the backend
//! under test (again, over the same storage, to check durability), so a backend's
//! test file is one line with [`saga_log_contract!`](crate::saga_log_contract):
//!
//! ```ignore
//! trellis_saga::saga_log_contract!(async { my_harness_for_tests().await });
//! ```
//!
//! The expression must evaluate to a future of `Option<H>` where `H: Harness`
//! (`None` skips the test, e.g. when `TRELLIS_TEST_SERVICES=0`). It is evaluated once
//! per test, and each harness must use storage no other test uses.
//!
//! # What a backend must do to pass
//! 1. **Durable before return**, and `open()` after `close()` sees every write.
//! 2. **Compare and set** in one atomic step: of concurrent updaters from one
//!    version exactly one wins; the others get [`LogError::Conflict`] with the
//!    version they lost to.
//! 3. **Idempotent creation per kind**: of concurrent creates with one key exactly
//!    one writes; the others get [`Created::Existing`] with that record as it is
//!    now. The key is checked before the id; deleting the record frees its key.
//! 4. **Newest first**: [`SagaLog::list`] in descending byte order of ids, with
//!    every [`Filter`] condition, `before` as an exclusive cursor and the limit
//!    capped at [`MAX_LIST`](super::MAX_LIST).
//! 5. **No panics on odd input**: a create at a version other than 1 is refused, an
//!    update to version 0 is a conflict, a limit of `usize::MAX` is capped.
//! 6. After `close()`, calls fail with [`LogError::Closed`]; `close()` is idempotent.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::{Created, Filter, LogError, MAX_LIST, Record, RecordKind, SagaLog, new_id, now_ms};

/// Opens the backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Opens the log; a second call (after `close`) must see the same durable data.
    async fn open(&self) -> Arc<dyn SagaLog>;
}

/// Generates one `#[tokio::test]` per contract check for the harness built by `$make`.
#[macro_export]
macro_rules! saga_log_contract {
    ($make:expr) => {
        $crate::saga_log_contract!(@tests $make;
            create_then_get_round_trips,
            a_taken_id_is_refused,
            a_new_record_is_at_version_one,
            an_idempotency_key_returns_the_first_record,
            concurrent_creates_with_one_key_have_one_winner,
            update_is_compare_and_set,
            concurrent_updaters_have_one_winner,
            put_overwrites_whatever_is_stored,
            delete_removes_and_frees_id_and_key,
            list_is_newest_first_and_filters,
            list_pages_with_before_and_limit,
            the_unfinished_listing_follows_every_write,
            records_survive_a_reopen,
            health_and_close,
        );
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(harness) = $make.await else { return };
                $crate::log::contract::$check(&harness).await;
            }
        )+
    };
}

const KINDS: [RecordKind; 3] = [
    RecordKind::Saga,
    RecordKind::Transaction,
    RecordKind::Definition,
];

/// How many tasks race in the concurrency checks.
const RACERS: usize = 16;

/// A fresh version-1 record of `kind` with id `id`.
fn record(kind: RecordKind, id: &str) -> Record {
    let now = now_ms();
    Record {
        kind,
        id: id.to_owned(),
        version: 1,
        name: "order".to_owned(),
        status: "running".to_owned(),
        finished: false,
        owner: "sidecar-1".to_owned(),
        created_at_ms: now,
        updated_at_ms: now,
        body: json!({ "step": 0, "id": id }),
    }
}

/// The next version of `r`, with a new status and body.
fn next(r: &Record, status: &str, finished: bool) -> Record {
    Record {
        version: r.version + 1,
        status: status.to_owned(),
        finished,
        updated_at_ms: r.updated_at_ms + 1,
        body: json!({ "step": r.version, "status": status }),
        ..r.clone()
    }
}

async fn create_new(log: &Arc<dyn SagaLog>, r: &Record, key: Option<&str>) {
    let created = log
        .create(r, key)
        .await
        .unwrap_or_else(|e| panic!("create {} {}: {e}", r.kind, r.id));
    assert_eq!(created, Created::New, "create {} {}", r.kind, r.id);
}

async fn get(log: &Arc<dyn SagaLog>, kind: RecordKind, id: &str) -> Option<Record> {
    log.get(kind, id)
        .await
        .unwrap_or_else(|e| panic!("get {kind} {id}: {e}"))
}

async fn list(log: &Arc<dyn SagaLog>, kind: RecordKind, filter: &Filter) -> Vec<Record> {
    log.list(kind, filter)
        .await
        .unwrap_or_else(|e| panic!("list {kind} {filter:?}: {e}"))
}

fn ids(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

async fn close(log: Arc<dyn SagaLog>) {
    log.close().await.expect("close");
}

fn conflict(r: Result<(), LogError>, what: &str) -> (u64, Option<u64>) {
    match r {
        Err(LogError::Conflict {
            expected, found, ..
        }) => (expected, found),
        other => panic!("{what}: expected Conflict, got {other:?}"),
    }
}

/// A created record reads back exactly as written, in every kind, and only in its
/// kind; a missing one is `None`.
pub async fn create_then_get_round_trips(h: &impl Harness) {
    let log = h.open().await;
    assert!(!log.backend().is_empty());
    assert_eq!(get(&log, RecordKind::Saga, "nope").await, None);
    for kind in KINDS {
        let mut r = record(kind, &format!("{kind}-{}", new_id()));
        r.name = "naïve ✓ name".to_owned();
        r.status = "compensating".to_owned();
        r.owner = "sidecar-ü".to_owned();
        r.body = json!({
            "steps": [{ "name": "reserve", "done": true }, { "name": "charge", "amount": 12.5 }],
            "big": u64::MAX,
            "negative": -7,
            "text": "quotes \" and \\ and ✓",
            "nothing": null,
            "nested": { "a": { "b": [1, 2, 3] } },
        });
        create_new(&log, &r, None).await;
        assert_eq!(get(&log, kind, &r.id).await, Some(r.clone()), "{kind}");
        for other in KINDS.into_iter().filter(|k| *k != kind) {
            assert_eq!(get(&log, other, &r.id).await, None, "{kind} id in {other}");
        }
    }
    // A finished record, and odd but valid ids.
    for id in ["", "with/slash", "ünïcødé", "x".repeat(300).as_str()] {
        let mut r = record(RecordKind::Transaction, id);
        r.finished = true;
        r.body = json!([]);
        create_new(&log, &r, None).await;
        assert_eq!(get(&log, RecordKind::Transaction, id).await, Some(r));
    }
    close(log).await;
}

/// Creating a record whose id is taken is [`LogError::Exists`] and changes nothing,
/// with or without an (unused) idempotency key; the same id in another kind is free.
pub async fn a_taken_id_is_refused(h: &impl Harness) {
    let log = h.open().await;
    let first = record(RecordKind::Saga, &new_id());
    create_new(&log, &first, None).await;
    let mut again = first.clone();
    again.body = json!({ "second": true });
    for key in [None, Some("unused-key")] {
        let r = log.create(&again, key).await;
        assert!(
            matches!(&r, Err(LogError::Exists { kind: RecordKind::Saga, id }) if *id == first.id),
            "{key:?}: {r:?}"
        );
    }
    assert_eq!(
        get(&log, RecordKind::Saga, &first.id).await,
        Some(first.clone())
    );
    // The refused create did not claim its key.
    let other = record(RecordKind::Saga, &new_id());
    create_new(&log, &other, Some("unused-key")).await;
    // Kinds are separate.
    create_new(&log, &record(RecordKind::Transaction, &first.id), None).await;
    close(log).await;
}

/// `create` writes version 1 only: another version is refused, writes nothing, and
/// claims no key.
pub async fn a_new_record_is_at_version_one(h: &impl Harness) {
    let log = h.open().await;
    for version in [0, 2, u64::MAX] {
        let mut r = record(RecordKind::Saga, &new_id());
        r.version = version;
        let refused = log.create(&r, Some("v-key")).await;
        assert!(refused.is_err(), "version {version}: {refused:?}");
        assert_eq!(get(&log, RecordKind::Saga, &r.id).await, None);
    }
    create_new(&log, &record(RecordKind::Saga, &new_id()), Some("v-key")).await;
    close(log).await;
}

/// A key used before returns the record it created, as it is now, and writes
/// nothing — even when the new record's id is taken too. Keys are per kind.
pub async fn an_idempotency_key_returns_the_first_record(h: &impl Harness) {
    let log = h.open().await;
    let first = record(RecordKind::Saga, &new_id());
    create_new(&log, &first, Some("request-1")).await;

    let retry = record(RecordKind::Saga, &new_id());
    let got = log.create(&retry, Some("request-1")).await.expect("retry");
    assert_eq!(got, Created::Existing(Box::new(first.clone())));
    assert_eq!(
        get(&log, RecordKind::Saga, &retry.id).await,
        None,
        "nothing written"
    );

    // As it is now, after an update.
    let second = next(&first, "compensating", false);
    log.update(&second).await.expect("update");
    let got = log.create(&retry, Some("request-1")).await.expect("retry");
    assert_eq!(got, Created::Existing(Box::new(second.clone())));

    // The same request retried verbatim (its id is taken, by itself).
    let got = log.create(&first, Some("request-1")).await.expect("retry");
    assert_eq!(got, Created::Existing(Box::new(second.clone())));

    // Another key is another record; the same key in another kind is independent.
    create_new(
        &log,
        &record(RecordKind::Saga, &new_id()),
        Some("request-2"),
    )
    .await;
    let tx = record(RecordKind::Transaction, &new_id());
    create_new(&log, &tx, Some("request-1")).await;
    let got = log
        .create(
            &record(RecordKind::Transaction, &new_id()),
            Some("request-1"),
        )
        .await
        .expect("retry in the other kind");
    assert_eq!(got, Created::Existing(Box::new(tx)));
    assert_eq!(
        list(&log, RecordKind::Saga, &Filter::default()).await.len(),
        2,
        "two sagas: request-1's and request-2's"
    );
    close(log).await;
}

/// Of concurrent creates with one key (and distinct ids), exactly one writes; every
/// other gets that record.
pub async fn concurrent_creates_with_one_key_have_one_winner(h: &impl Harness) {
    let log = h.open().await;
    for kind in [RecordKind::Saga, RecordKind::Transaction] {
        let mut tasks = Vec::new();
        for i in 0..RACERS {
            let log = Arc::clone(&log);
            let mut r = record(kind, &format!("racer-{i:02}-{}", new_id()));
            r.body = json!({ "racer": i });
            tasks.push(tokio::spawn(async move {
                let created = log.create(&r, Some("the-one-key")).await;
                (r, created)
            }));
        }
        let mut winners = Vec::new();
        let mut seen = Vec::new();
        for task in tasks {
            let (r, created) = task.await.expect("join");
            match created.unwrap_or_else(|e| panic!("create {}: {e}", r.id)) {
                Created::New => winners.push(r),
                Created::Existing(first) => seen.push(*first),
            }
        }
        assert_eq!(winners.len(), 1, "{kind}: exactly one create writes");
        let winner = &winners[0];
        assert!(
            seen.iter().all(|r| r == winner),
            "{kind}: every other create sees the winner's record"
        );
        assert_eq!(
            list(&log, kind, &Filter::default()).await,
            vec![winner.clone()]
        );
    }
    close(log).await;
}

/// `update` writes version `v` over version `v - 1` only: a stale version is a
/// conflict naming the version found, a missing record a conflict with none, and a
/// refused update changes nothing.
pub async fn update_is_compare_and_set(h: &impl Harness) {
    let log = h.open().await;
    let v1 = record(RecordKind::Saga, &new_id());
    create_new(&log, &v1, None).await;
    let v2 = next(&v1, "step-1", false);
    log.update(&v2).await.expect("v2 over v1");
    let v3 = next(&v2, "done", true);
    log.update(&v3).await.expect("v3 over v2");
    assert_eq!(get(&log, RecordKind::Saga, &v1.id).await, Some(v3.clone()));

    // Stale: computed from v1 again.
    let mut stale = next(&v1, "stale", false);
    let found = conflict(log.update(&stale).await, "stale update");
    assert_eq!(found, (1, Some(3)));
    // From the future.
    stale.version = 9;
    assert_eq!(conflict(log.update(&stale).await, "future"), (8, Some(3)));
    // Version 0 replaces nothing, and must not underflow.
    stale.version = 0;
    assert_eq!(conflict(log.update(&stale).await, "version 0").1, Some(3));
    stale.version = u64::MAX;
    let r = log.update(&stale).await;
    assert!(r.is_err(), "version u64::MAX: {r:?}");
    assert_eq!(get(&log, RecordKind::Saga, &v1.id).await, Some(v3.clone()));

    // Missing, in this kind or any.
    let missing = next(&record(RecordKind::Saga, &new_id()), "x", false);
    assert_eq!(conflict(log.update(&missing).await, "missing"), (1, None));
    let other_kind = Record {
        kind: RecordKind::Transaction,
        ..v3.clone()
    };
    assert_eq!(
        conflict(
            log.update(&next(&other_kind, "x", false)).await,
            "other kind"
        ),
        (3, None)
    );
    assert_eq!(get(&log, RecordKind::Transaction, &v1.id).await, None);
    close(log).await;
}

/// Of concurrent updaters from one version, exactly one succeeds; the others learn
/// the version they lost to, and the winner's record is what is stored.
pub async fn concurrent_updaters_have_one_winner(h: &impl Harness) {
    let log = h.open().await;
    for round in 0..3 {
        let v1 = record(RecordKind::Transaction, &new_id());
        create_new(&log, &v1, None).await;
        let mut tasks = Vec::new();
        for i in 0..RACERS {
            let log = Arc::clone(&log);
            let mut mine = next(&v1, &format!("by-{i}"), false);
            mine.owner = format!("sidecar-{i}");
            tasks.push(tokio::spawn(async move {
                let r = log.update(&mine).await;
                (mine, r)
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            let (mine, r) = task.await.expect("join");
            match r {
                Ok(()) => winners.push(mine),
                Err(LogError::Conflict {
                    expected: 1,
                    found: Some(2),
                    ..
                }) => {}
                Err(e) => panic!("round {round}: a loser must see version 2: {e:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one updater wins");
        assert_eq!(
            get(&log, RecordKind::Transaction, &v1.id).await,
            Some(winners[0].clone())
        );
    }
    close(log).await;
}

/// `put` writes whatever is stored (or nothing), at the version it carries; later
/// updates go on from that version.
pub async fn put_overwrites_whatever_is_stored(h: &impl Harness) {
    let log = h.open().await;
    let mut def = record(RecordKind::Definition, "order-saga");
    def.version = 4;
    def.status = "active".to_owned();
    log.put(&def).await.expect("put over nothing");
    assert_eq!(
        get(&log, RecordKind::Definition, "order-saga").await,
        Some(def.clone())
    );

    let mut replaced = def.clone();
    replaced.version = 2;
    replaced.finished = true;
    replaced.body = json!({ "steps": ["a", "b"] });
    log.put(&replaced).await.expect("put over a record");
    assert_eq!(
        get(&log, RecordKind::Definition, "order-saga").await,
        Some(replaced.clone())
    );
    assert_eq!(
        conflict(
            log.update(&next(&def, "x", false)).await,
            "update from before the put"
        ),
        (4, Some(2))
    );
    let after = next(&replaced, "active", false);
    log.update(&after)
        .await
        .expect("update from the put's version");
    assert_eq!(
        get(&log, RecordKind::Definition, "order-saga").await,
        Some(after)
    );

    // A put keeps the key the record was created with.
    let created = record(RecordKind::Saga, &new_id());
    create_new(&log, &created, Some("put-key")).await;
    let put = next(&created, "rewritten", false);
    log.put(&put).await.expect("put over a created record");
    let got = log
        .create(&record(RecordKind::Saga, &new_id()), Some("put-key"))
        .await
        .expect("retry");
    assert_eq!(got, Created::Existing(Box::new(put)));
    close(log).await;
}

/// `delete` says whether the record existed, removes it from reads and listings,
/// and frees its id and its idempotency key.
pub async fn delete_removes_and_frees_id_and_key(h: &impl Harness) {
    let log = h.open().await;
    let r = record(RecordKind::Saga, &new_id());
    create_new(&log, &r, Some("delete-key")).await;
    assert!(
        !log.delete(RecordKind::Transaction, &r.id)
            .await
            .expect("delete"),
        "other kind"
    );
    assert_eq!(get(&log, RecordKind::Saga, &r.id).await, Some(r.clone()));

    assert!(log.delete(RecordKind::Saga, &r.id).await.expect("delete"));
    assert_eq!(get(&log, RecordKind::Saga, &r.id).await, None);
    assert!(
        !log.delete(RecordKind::Saga, &r.id)
            .await
            .expect("delete again")
    );
    let everything = Filter::default();
    let unfinished = Filter {
        unfinished: true,
        ..Filter::default()
    };
    assert!(list(&log, RecordKind::Saga, &everything).await.is_empty());
    assert!(list(&log, RecordKind::Saga, &unfinished).await.is_empty());
    assert!(
        conflict(log.update(&next(&r, "x", false)).await, "update deleted")
            .1
            .is_none()
    );

    // The id can be created again (without the key), and the key creates anew: it
    // no longer leads to the deleted record, nor to the one now at its id.
    create_new(&log, &r, None).await;
    let fresh = record(RecordKind::Saga, &new_id());
    create_new(&log, &fresh, Some("delete-key")).await;
    let got = log
        .create(&record(RecordKind::Saga, &new_id()), Some("delete-key"))
        .await
        .expect("retry");
    assert_eq!(got, Created::Existing(Box::new(fresh)));
    close(log).await;
}

/// The records of the listing tests: ids `r00` to `r19` of `kind`, with names,
/// statuses, owners and finished flags mixed so that every filter selects a
/// different subset.
fn population(kind: RecordKind) -> Vec<Record> {
    (0..20)
        .map(|i| {
            let mut r = record(kind, &format!("r{i:02}"));
            r.name = ["order", "refund", "payout"][i % 3].to_owned();
            r.status = ["running", "compensating", "committed", "aborted"][i % 4].to_owned();
            r.finished = i % 4 >= 2;
            r.owner = format!("sidecar-{}", i % 2);
            r
        })
        .collect()
}

/// What `list` must return: the matching records, greatest id first, before the
/// cursor, up to the (capped) limit.
fn expected(all: &[Record], filter: &Filter) -> Vec<Record> {
    let mut matching: Vec<Record> = all
        .iter()
        .filter(|r| filter.matches(r))
        .filter(|r| filter.before.as_ref().is_none_or(|b| r.id < *b))
        .cloned()
        .collect();
    matching.sort_by(|a, b| b.id.cmp(&a.id));
    matching.truncate(filter.capped_limit());
    matching
}

/// Every filter and combination of them, as the listing tests use them.
fn filters() -> Vec<Filter> {
    let base = Filter::default();
    let mut filters = vec![
        base.clone(),
        Filter {
            name: Some("refund".into()),
            ..base.clone()
        },
        Filter {
            status: Some("compensating".into()),
            ..base.clone()
        },
        Filter {
            unfinished: true,
            ..base.clone()
        },
        Filter {
            owner: Some("sidecar-1".into()),
            ..base.clone()
        },
        Filter {
            name: Some("order".into()),
            unfinished: true,
            owner: Some("sidecar-0".into()),
            ..base.clone()
        },
        Filter {
            status: Some("committed".into()),
            unfinished: true,
            ..base.clone()
        },
        Filter {
            name: Some("nobody".into()),
            ..base.clone()
        },
    ];
    let cursored: Vec<Filter> = filters
        .iter()
        .flat_map(|f| {
            [
                Filter {
                    before: Some("r13".into()),
                    ..f.clone()
                },
                Filter {
                    before: Some("r105".into()),
                    limit: 2,
                    ..f.clone()
                },
            ]
        })
        .collect();
    filters.extend(cursored);
    filters
}

/// `list` returns the records of one kind passing every filter condition, greatest
/// id first.
pub async fn list_is_newest_first_and_filters(h: &impl Harness) {
    let log = h.open().await;
    let all = population(RecordKind::Saga);
    // Created out of order, so that order can only come from the ids.
    for r in all.iter().rev().step_by(2).chain(all.iter().step_by(2)) {
        create_new(&log, r, None).await;
    }
    // Same ids in another kind, which the listing of sagas must not show.
    for r in population(RecordKind::Transaction).iter().take(5) {
        create_new(&log, r, None).await;
    }
    for filter in filters() {
        let want = expected(&all, &filter);
        let got = list(&log, RecordKind::Saga, &filter).await;
        assert_eq!(ids(&got), ids(&want), "{filter:?}");
        assert_eq!(got, want, "{filter:?}");
    }
    assert_eq!(
        ids(&list(&log, RecordKind::Transaction, &Filter::default()).await),
        ["r04", "r03", "r02", "r01", "r00"]
    );
    assert!(
        list(&log, RecordKind::Definition, &Filter::default())
            .await
            .is_empty()
    );

    // Time-ordered ids list newest first.
    let newer: Vec<String> = (0..5).map(|_| new_id()).collect();
    for id in &newer {
        create_new(&log, &record(RecordKind::Definition, id), None).await;
    }
    let listed = list(&log, RecordKind::Definition, &Filter::default()).await;
    let mut sorted = newer.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(
        ids(&listed),
        sorted.iter().map(String::as_str).collect::<Vec<_>>()
    );
    close(log).await;
}

/// `before` is an exclusive cursor: paging with each page's last id visits every
/// matching record once, in order; the limit is honoured and capped.
pub async fn list_pages_with_before_and_limit(h: &impl Harness) {
    let log = h.open().await;
    let all = population(RecordKind::Saga);
    for r in &all {
        create_new(&log, r, None).await;
    }
    for base in [
        Filter::default(),
        Filter {
            unfinished: true,
            ..Filter::default()
        },
        Filter {
            owner: Some("sidecar-0".into()),
            ..Filter::default()
        },
    ] {
        for page_size in [1, 3, 7, 50] {
            let mut filter = Filter {
                limit: page_size,
                ..base.clone()
            };
            let mut paged = Vec::new();
            loop {
                let page = list(&log, RecordKind::Saga, &filter).await;
                assert!(page.len() <= page_size, "{filter:?}");
                let Some(last) = page.last() else { break };
                filter.before = Some(last.id.clone());
                paged.extend(page);
                // A cursor that is not exclusive would page forever.
                assert!(
                    paged.len() <= all.len(),
                    "paging repeats records: {filter:?}"
                );
            }
            let whole = Filter {
                limit: MAX_LIST,
                ..base.clone()
            };
            assert_eq!(
                paged,
                expected(&all, &whole),
                "pages of {page_size}, {base:?}"
            );
        }
    }
    let nothing = Filter {
        limit: 0,
        ..Filter::default()
    };
    assert!(list(&log, RecordKind::Saga, &nothing).await.is_empty());
    let huge = Filter {
        limit: usize::MAX,
        ..Filter::default()
    };
    assert_eq!(list(&log, RecordKind::Saga, &huge).await.len(), all.len());
    // Cursors outside the ids.
    for (before, n) in [
        ("", 0),
        ("r", 0),
        ("r00", 0),
        ("r000", 1),
        ("s", 20),
        ("~", 20),
    ] {
        let filter = Filter {
            before: Some(before.into()),
            ..Filter::default()
        };
        assert_eq!(
            list(&log, RecordKind::Saga, &filter).await.len(),
            n,
            "before {before:?}"
        );
    }
    close(log).await;
}

/// The unfinished listing stays right through creates, updates, puts and deletes
/// in both directions.
pub async fn the_unfinished_listing_follows_every_write(h: &impl Harness) {
    let log = h.open().await;
    let unfinished = Filter {
        unfinished: true,
        ..Filter::default()
    };
    let kind = RecordKind::Saga;
    let a = record(kind, "a");
    let mut b = record(kind, "b");
    b.finished = true;
    create_new(&log, &a, None).await;
    create_new(&log, &b, None).await;
    assert_eq!(ids(&list(&log, kind, &unfinished).await), ["a"]);

    let a2 = next(&a, "committed", true);
    log.update(&a2).await.expect("finish a");
    assert!(list(&log, kind, &unfinished).await.is_empty());

    let b2 = next(&b, "running", false);
    log.update(&b2).await.expect("unfinish b");
    assert_eq!(ids(&list(&log, kind, &unfinished).await), ["b"]);

    let a3 = next(&a2, "running", false);
    log.put(&a3).await.expect("put a unfinished");
    assert_eq!(ids(&list(&log, kind, &unfinished).await), ["b", "a"]);

    let b3 = next(&b2, "aborted", true);
    log.put(&b3).await.expect("put b finished");
    assert_eq!(list(&log, kind, &unfinished).await, vec![a3.clone()]);

    // Refused writes leave it alone.
    let stale = next(&a, "committed", true);
    assert!(log.update(&stale).await.is_err());
    assert_eq!(ids(&list(&log, kind, &unfinished).await), ["a"]);

    assert!(log.delete(kind, "a").await.expect("delete"));
    assert!(list(&log, kind, &unfinished).await.is_empty());
    assert_eq!(ids(&list(&log, kind, &Filter::default()).await), ["b"]);
    close(log).await;
}

/// Everything written survives closing and opening the log again: creates, updates,
/// puts, deletes, idempotency keys and the unfinished listing.
pub async fn records_survive_a_reopen(h: &impl Harness) {
    let log = h.open().await;
    let mut want: BTreeMap<(RecordKind, String), Record> = BTreeMap::new();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let log = Arc::clone(&log);
        let kind = KINDS[i % 3];
        let mut r = record(kind, &format!("d{i:02}"));
        r.finished = i % 5 == 0;
        tasks.push(tokio::spawn(async move {
            log.create(&r, Some(&format!("key-{i}")))
                .await
                .map(|c| (c, r))
        }));
    }
    for task in tasks {
        let (created, r) = task.await.expect("join").expect("create");
        assert_eq!(created, Created::New);
        want.insert((r.kind, r.id.clone()), r);
    }
    let (kind, id) = (KINDS[0], "d00".to_owned());
    let updated = next(&want[&(kind, id.clone())], "step", false);
    log.update(&updated).await.expect("update");
    want.insert((kind, id), updated.clone());
    let mut def = record(RecordKind::Definition, "def");
    def.version = 7;
    log.put(&def).await.expect("put");
    want.insert((def.kind, def.id.clone()), def);
    assert!(log.delete(KINDS[1], "d01").await.expect("delete"));
    want.remove(&(KINDS[1], "d01".to_owned()));
    log.close().await.expect("close");

    let log = h.open().await;
    for kind in KINDS {
        let mut stored = list(&log, kind, &Filter::default()).await;
        stored.reverse();
        let expected: Vec<Record> = want
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, r)| r.clone())
            .collect();
        assert_eq!(stored, expected, "{kind} after reopen");
        let unfinished = Filter {
            unfinished: true,
            ..Filter::default()
        };
        let mut still = list(&log, kind, &unfinished).await;
        still.reverse();
        let expected: Vec<Record> = expected.into_iter().filter(|r| !r.finished).collect();
        assert_eq!(still, expected, "unfinished {kind} after reopen");
    }
    // Keys survive, and so does compare-and-set.
    let got = log
        .create(&record(KINDS[0], "retry"), Some("key-0"))
        .await
        .expect("retry");
    assert_eq!(got, Created::Existing(Box::new(updated.clone())));
    create_new(&log, &record(KINDS[1], "d01-again"), Some("key-1")).await;
    assert_eq!(
        conflict(log.update(&updated).await, "stale after reopen"),
        (1, Some(2))
    );
    log.update(&next(&updated, "done", true))
        .await
        .expect("update after reopen");
    close(log).await;
}

/// `health` answers while open; after `close` (idempotent) every call fails with
/// [`LogError::Closed`].
pub async fn health_and_close(h: &impl Harness) {
    let log = h.open().await;
    log.health().await.expect("health");
    let r = record(RecordKind::Saga, &new_id());
    create_new(&log, &r, None).await;
    log.close().await.expect("close");
    log.close().await.expect("close twice");
    let closed = |what: &str, e: Option<LogError>| {
        assert!(
            matches!(e, Some(LogError::Closed)),
            "{what} after close: {e:?}"
        );
    };
    closed("health", log.health().await.err());
    closed("get", log.get(RecordKind::Saga, &r.id).await.err());
    closed(
        "list",
        log.list(RecordKind::Saga, &Filter::default()).await.err(),
    );
    closed(
        "create",
        log.create(&record(RecordKind::Saga, &new_id()), None)
            .await
            .err(),
    );
    closed("update", log.update(&next(&r, "x", false)).await.err());
    closed("put", log.put(&r).await.err());
    closed("delete", log.delete(RecordKind::Saga, &r.id).await.err());
    drop(log);
    let log = h.open().await;
    assert_eq!(get(&log, RecordKind::Saga, &r.id).await, Some(r));
    close(log).await;
}
