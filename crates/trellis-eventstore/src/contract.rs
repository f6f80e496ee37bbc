//! The contract every [`EventStore`] backend must pass.
//!
//! Each check is a public `async fn` taking a [`Harness`] that opens the backend
//! under test (again, over the same storage, to check restarts), so a backend's test
//! file is one line with [`event_store_contract!`](crate::event_store_contract):
//!
//! ```ignore
//! trellis_eventstore::event_store_contract!(async { my_harness_for_tests().await });
//! ```
//!
//! The expression must evaluate to a future of `Option<H>` where `H: Harness`
//! (`None` skips the test, e.g. when `TRELLIS_TEST_SERVICES=0`). It is evaluated once
//! per test, and each harness must use storage no other test uses.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use uuid::Uuid;

use crate::{
    Append, AsOf, Body, Deletion, Direction, EventData, EventStore, EventStoreError,
    ExpectedVersion, Metadata, ReadStream, Snapshot, StreamMetadata, StreamName,
};

/// Opens the backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Opens the backend; a second call (after `close`) must see the same data.
    async fn open(&self) -> Arc<dyn EventStore>;
}

/// Generates one `#[tokio::test]` per contract check for the harness built by `$make`.
#[macro_export]
macro_rules! event_store_contract {
    ($make:expr) => {
        $crate::event_store_contract!(@tests $make;
            append_then_read_back,
            expected_versions_are_enforced,
            concurrent_writers_have_one_winner_per_version,
            multi_stream_appends_are_all_or_nothing,
            repeated_appends_are_idempotent,
            event_ids_are_unique,
            the_global_order_is_gap_free,
            categories_collect_their_streams,
            backward_reads_and_paging,
            unknown_and_deleted_streams,
            soft_deleted_streams_are_recreated,
            metadata_limits_what_reads_return,
            reading_the_past,
            snapshots_and_checkpoints,
            head_follows_appends,
            everything_survives_a_restart,
            invalid_appends_are_refused,
            a_reader_of_all_never_skips,
            health_is_ok,
        );
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(harness) = $make.await else { return };
                $crate::contract::$check(&harness).await;
            }
        )+
    };
}

fn stream(name: &str) -> StreamName {
    StreamName::new(name).expect("valid stream name")
}

fn event(n: u64) -> EventData {
    EventData::json("Counted", &json!({ "n": n }))
}

fn n_of(data: &Body) -> u64 {
    data.to_value()
        .and_then(|v| v["n"].as_u64())
        .expect("data.n")
}

async fn append(
    store: &Arc<dyn EventStore>,
    name: &str,
    expected: ExpectedVersion,
    events: Vec<EventData>,
) -> crate::Appended {
    let mut out = store
        .append(vec![Append {
            stream: stream(name),
            expected,
            events,
        }])
        .await
        .unwrap_or_else(|e| panic!("append to {name}: {e}"));
    out.remove(0)
}

async fn read(store: &Arc<dyn EventStore>, name: &str, read: ReadStream) -> crate::StreamSlice {
    store
        .read_stream(&stream(name), read)
        .await
        .unwrap_or_else(|e| panic!("read {name}: {e}"))
}

fn all() -> ReadStream {
    ReadStream {
        limit: 10_000,
        ..ReadStream::default()
    }
}

/// Appended events come back with versions from 0, their ids, types, data and
/// metadata, positions in the global order and a timestamp.
pub async fn append_then_read_back(h: &impl Harness) {
    let store = h.open().await;
    let mut first = event(0);
    first.metadata = Metadata {
        correlation_id: Some("req-1".into()),
        causation_id: Some("cmd-1".into()),
        extra: json!({ "user": "ann" })
            .as_object()
            .cloned()
            .unwrap_or_default(),
    };
    let binary = EventData {
        data: Body::Bytes(bytes::Bytes::from_static(b"\x00\xff")),
        ..EventData::json("Raw", &json!(null))
    };
    let appended = append(
        &store,
        "order-1",
        ExpectedVersion::NoStream,
        vec![first.clone(), event(1), binary.clone()],
    )
    .await;
    assert_eq!(appended.version, Some(2));
    assert_eq!(appended.positions.end - appended.positions.start, 3);
    let slice = read(&store, "order-1", all()).await;
    assert_eq!(slice.version, Some(2));
    let versions: Vec<u64> = slice.events.iter().map(|e| e.version).collect();
    assert_eq!(versions, [0, 1, 2]);
    let positions: Vec<u64> = slice.events.iter().map(|e| e.position).collect();
    assert_eq!(positions, appended.positions.clone().collect::<Vec<_>>());
    let e = &slice.events[0];
    assert_eq!(
        (e.id, e.ty.as_str(), e.stream.as_str()),
        (first.id, "Counted", "order-1")
    );
    assert_eq!(e.metadata, first.metadata);
    assert_eq!(n_of(&e.data), 0);
    assert_eq!(slice.events[2].data, binary.data);
    assert!(
        e.timestamp_ms > 1_600_000_000_000,
        "a real timestamp: {}",
        e.timestamp_ms
    );
    store.close().await.expect("close");
}

/// `no_stream`, `exists`, exact versions and `any` are checked; a failed check
/// reports the stream's actual version and stores nothing.
pub async fn expected_versions_are_enforced(h: &impl Harness) {
    let store = h.open().await;
    let wrong = |r: Result<Vec<crate::Appended>, EventStoreError>| match r {
        Err(EventStoreError::WrongExpectedVersion { actual, .. }) => actual,
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    };
    let s = stream("acct-1");
    let try_append = |expected| {
        store.append(vec![Append {
            stream: s.clone(),
            expected,
            events: vec![event(9)],
        }])
    };
    assert_eq!(wrong(try_append(ExpectedVersion::Exists).await), None);
    assert_eq!(wrong(try_append(ExpectedVersion::Exact(0)).await), None);
    append(&store, "acct-1", ExpectedVersion::NoStream, vec![event(0)]).await;
    assert_eq!(wrong(try_append(ExpectedVersion::NoStream).await), Some(0));
    assert_eq!(wrong(try_append(ExpectedVersion::Exact(5)).await), Some(0));
    append(&store, "acct-1", ExpectedVersion::Exact(0), vec![event(1)]).await;
    append(&store, "acct-1", ExpectedVersion::Exists, vec![event(2)]).await;
    let last = append(&store, "acct-1", ExpectedVersion::Any, vec![event(3)]).await;
    assert_eq!(last.version, Some(3));
    let ns: Vec<u64> = read(&store, "acct-1", all())
        .await
        .events
        .iter()
        .map(|e| n_of(&e.data))
        .collect();
    assert_eq!(ns, [0, 1, 2, 3], "failed appends stored nothing");
    store.close().await.expect("close");
}

/// Eight writers race on one stream, each appending at the version it last read:
/// versions stay contiguous, nothing is stored twice, and every expected version
/// has exactly one winner.
pub async fn concurrent_writers_have_one_winner_per_version(h: &impl Harness) {
    let store = h.open().await;
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let s = stream("race-1");
            let mut wins = Vec::new();
            for i in 0..10u64 {
                let current = match store
                    .read_stream(
                        &s,
                        ReadStream {
                            direction: Direction::Backward,
                            limit: 1,
                            ..ReadStream::default()
                        },
                    )
                    .await
                {
                    Ok(slice) => slice.version,
                    Err(EventStoreError::StreamNotFound(_)) => None,
                    Err(e) => panic!("read: {e}"),
                };
                let expected = current.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
                match store
                    .append(vec![Append {
                        stream: s.clone(),
                        expected,
                        events: vec![event(w * 100 + i)],
                    }])
                    .await
                {
                    Ok(a) => wins.push(a[0].version.expect("a version")),
                    Err(EventStoreError::WrongExpectedVersion { .. }) => {}
                    Err(e) => panic!("append: {e}"),
                }
            }
            wins
        }));
    }
    let mut wins = Vec::new();
    for t in tasks {
        wins.extend(t.await.expect("writer"));
    }
    let unique: BTreeSet<u64> = wins.iter().copied().collect();
    assert_eq!(
        unique.len(),
        wins.len(),
        "two writers won the same version: {wins:?}"
    );
    let slice = read(&store, "race-1", all()).await;
    let versions: Vec<u64> = slice.events.iter().map(|e| e.version).collect();
    assert_eq!(
        versions,
        (0..slice.events.len() as u64).collect::<Vec<_>>(),
        "contiguous"
    );
    assert_eq!(
        unique,
        versions.iter().copied().collect(),
        "every stored event was acknowledged to exactly one writer"
    );
    let ids: BTreeSet<Uuid> = slice.events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), slice.events.len(), "no duplicates");
    store.close().await.expect("close");
}

/// An append to several streams is all or nothing, each stream with its own
/// expectation.
pub async fn multi_stream_appends_are_all_or_nothing(h: &impl Harness) {
    let store = h.open().await;
    append(
        &store,
        "from-1",
        ExpectedVersion::NoStream,
        vec![event(100)],
    )
    .await;
    let transfer = |expected_from| {
        vec![
            Append {
                stream: stream("from-1"),
                expected: expected_from,
                events: vec![event(1)],
            },
            Append {
                stream: stream("to-1"),
                expected: ExpectedVersion::NoStream,
                events: vec![event(2)],
            },
        ]
    };
    let failed = store.append(transfer(ExpectedVersion::Exact(7))).await;
    assert!(
        matches!(failed, Err(EventStoreError::WrongExpectedVersion { .. })),
        "{failed:?}"
    );
    assert!(
        matches!(
            store.read_stream(&stream("to-1"), all()).await,
            Err(EventStoreError::StreamNotFound(_))
        ),
        "nothing of the failed append"
    );
    assert_eq!(read(&store, "from-1", all()).await.events.len(), 1);
    let done = store
        .append(transfer(ExpectedVersion::Exact(0)))
        .await
        .expect("transfer");
    assert_eq!(done.len(), 2);
    assert_eq!((done[0].version, done[1].version), (Some(1), Some(0)));
    assert_eq!(
        done[0].positions.end, done[1].positions.start,
        "one batch, consecutive positions"
    );
    store.close().await.expect("close");
}

/// Appending the same events again with the same expectation succeeds, stores
/// nothing, and returns the first outcome; with another expectation it conflicts.
pub async fn repeated_appends_are_idempotent(h: &impl Harness) {
    let store = h.open().await;
    append(&store, "idem-1", ExpectedVersion::NoStream, vec![event(0)]).await;
    let batch = vec![event(1), event(2)];
    let first = append(&store, "idem-1", ExpectedVersion::Exact(0), batch.clone()).await;
    let again = append(&store, "idem-1", ExpectedVersion::Exact(0), batch.clone()).await;
    assert_eq!(again.positions, first.positions);
    let any = append(&store, "idem-1", ExpectedVersion::Any, batch.clone()).await;
    assert_eq!(any.positions, first.positions);
    assert_eq!(
        read(&store, "idem-1", all()).await.events.len(),
        3,
        "stored once"
    );
    let other = store
        .append(vec![Append {
            stream: stream("idem-1"),
            expected: ExpectedVersion::NoStream,
            events: batch,
        }])
        .await;
    assert!(
        matches!(other, Err(EventStoreError::WrongExpectedVersion { .. })),
        "{other:?}"
    );
    store.close().await.expect("close");
}

/// An event id stored in one place cannot be stored again elsewhere.
pub async fn event_ids_are_unique(h: &impl Harness) {
    let store = h.open().await;
    let e = event(0);
    append(&store, "uniq-1", ExpectedVersion::Any, vec![e.clone()]).await;
    let elsewhere = store
        .append(vec![Append {
            stream: stream("uniq-2"),
            expected: ExpectedVersion::Any,
            events: vec![e.clone()],
        }])
        .await;
    assert!(
        matches!(elsewhere, Err(EventStoreError::DuplicateEventId { .. })),
        "{elsewhere:?}"
    );
    let mixed = store
        .append(vec![Append {
            stream: stream("uniq-1"),
            expected: ExpectedVersion::Any,
            events: vec![event(1), e],
        }])
        .await;
    assert!(
        matches!(mixed, Err(EventStoreError::DuplicateEventId { .. })),
        "{mixed:?}"
    );
    assert_eq!(read(&store, "uniq-1", all()).await.events.len(), 1);
    store.close().await.expect("close");
}

/// `$all` holds every event once, positions 0, 1, 2, … in commit order, and pages.
pub async fn the_global_order_is_gap_free(h: &impl Harness) {
    let store = h.open().await;
    for i in 0..5 {
        append(
            &store,
            &format!("g-{}", i % 2),
            ExpectedVersion::Any,
            vec![event(i * 2), event(i * 2 + 1)],
        )
        .await;
    }
    let everything = store.read_all(0, 1000).await.expect("read all");
    let positions: Vec<u64> = everything.iter().map(|e| e.position).collect();
    assert_eq!(positions, (0..10).collect::<Vec<_>>());
    let ns: Vec<u64> = everything.iter().map(|e| n_of(&e.data)).collect();
    assert_eq!(ns, (0..10).collect::<Vec<_>>(), "commit order");
    let page = store.read_all(4, 3).await.expect("page");
    assert_eq!(
        page.iter().map(|e| e.position).collect::<Vec<_>>(),
        [4, 5, 6]
    );
    assert!(
        store
            .read_all(10, 10)
            .await
            .expect("past the end")
            .is_empty()
    );
    store.close().await.expect("close");
}

/// A category holds the events of its streams, in global order.
pub async fn categories_collect_their_streams(h: &impl Harness) {
    let store = h.open().await;
    append(&store, "order-1", ExpectedVersion::Any, vec![event(0)]).await;
    append(&store, "invoice-1", ExpectedVersion::Any, vec![event(1)]).await;
    append(&store, "order-2", ExpectedVersion::Any, vec![event(2)]).await;
    append(&store, "order-1", ExpectedVersion::Any, vec![event(3)]).await;
    let orders = store
        .read_category("order", 0, 100)
        .await
        .expect("category");
    let ns: Vec<u64> = orders.iter().map(|e| n_of(&e.data)).collect();
    assert_eq!(ns, [0, 2, 3]);
    let from = orders[1].position;
    let later = store
        .read_category("order", from, 100)
        .await
        .expect("category from");
    assert_eq!(
        later.iter().map(|e| n_of(&e.data)).collect::<Vec<_>>(),
        [2, 3]
    );
    assert_eq!(
        store
            .read_category("order", 0, 1)
            .await
            .expect("limit")
            .len(),
        1
    );
    assert!(
        store
            .read_category("nothing", 0, 10)
            .await
            .expect("empty")
            .is_empty()
    );
    store.close().await.expect("close");
}

/// Reads go backward from the end (or a version) and page with `next`.
pub async fn backward_reads_and_paging(h: &impl Harness) {
    let store = h.open().await;
    append(
        &store,
        "page-1",
        ExpectedVersion::NoStream,
        (0..10).map(event).collect(),
    )
    .await;
    let back = read(
        &store,
        "page-1",
        ReadStream {
            direction: Direction::Backward,
            limit: 3,
            ..ReadStream::default()
        },
    )
    .await;
    assert_eq!(
        back.events.iter().map(|e| e.version).collect::<Vec<_>>(),
        [9, 8, 7]
    );
    assert_eq!(back.next, Some(6));
    let from = read(
        &store,
        "page-1",
        ReadStream {
            direction: Direction::Backward,
            from: Some(2),
            limit: 10,
            ..ReadStream::default()
        },
    )
    .await;
    assert_eq!(
        from.events.iter().map(|e| e.version).collect::<Vec<_>>(),
        [2, 1, 0]
    );
    assert_eq!(from.next, None);
    let mut seen = Vec::new();
    let mut next = Some(0);
    while let Some(from) = next {
        let page = read(
            &store,
            "page-1",
            ReadStream {
                from: Some(from),
                limit: 4,
                ..ReadStream::default()
            },
        )
        .await;
        seen.extend(page.events.iter().map(|e| e.version));
        next = page.next;
    }
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert!(
        read(
            &store,
            "page-1",
            ReadStream {
                from: Some(10),
                ..ReadStream::default()
            }
        )
        .await
        .events
        .is_empty()
    );
    store.close().await.expect("close");
}

/// Reading a stream that never existed is `StreamNotFound`; a hard-deleted stream is
/// `StreamDeleted` for reads and appends alike.
pub async fn unknown_and_deleted_streams(h: &impl Harness) {
    let store = h.open().await;
    assert!(matches!(
        store.read_stream(&stream("ghost-1"), all()).await,
        Err(EventStoreError::StreamNotFound(_))
    ));
    assert_eq!(
        store.stream_info(&stream("ghost-1")).await.expect("info"),
        None
    );
    append(
        &store,
        "gone-1",
        ExpectedVersion::NoStream,
        vec![event(0), event(1)],
    )
    .await;
    let wrong = store
        .delete(&stream("gone-1"), ExpectedVersion::Exact(0), Deletion::Hard)
        .await;
    assert!(
        matches!(
            wrong,
            Err(EventStoreError::WrongExpectedVersion {
                actual: Some(1),
                ..
            })
        ),
        "{wrong:?}"
    );
    store
        .delete(&stream("gone-1"), ExpectedVersion::Exact(1), Deletion::Hard)
        .await
        .expect("delete");
    assert!(matches!(
        store.read_stream(&stream("gone-1"), all()).await,
        Err(EventStoreError::StreamDeleted(_))
    ));
    let append_after = store
        .append(vec![Append {
            stream: stream("gone-1"),
            expected: ExpectedVersion::Any,
            events: vec![event(2)],
        }])
        .await;
    assert!(
        matches!(append_after, Err(EventStoreError::StreamDeleted(_))),
        "{append_after:?}"
    );
    let info = store
        .stream_info(&stream("gone-1"))
        .await
        .expect("info")
        .expect("known");
    assert_eq!(
        (info.deleted, info.version),
        (Some(Deletion::Hard), Some(1))
    );
    assert!(
        store
            .read_category("gone", 0, 10)
            .await
            .expect("category")
            .is_empty(),
        "hidden from its category"
    );
    store.close().await.expect("close");
}

/// A soft-deleted stream reads as empty; appending recreates it, continuing its
/// versions and showing only the new events.
pub async fn soft_deleted_streams_are_recreated(h: &impl Harness) {
    let store = h.open().await;
    append(
        &store,
        "soft-1",
        ExpectedVersion::NoStream,
        vec![event(0), event(1)],
    )
    .await;
    store
        .delete(&stream("soft-1"), ExpectedVersion::Any, Deletion::Soft)
        .await
        .expect("soft delete");
    assert!(read(&store, "soft-1", all()).await.events.is_empty());
    let again = append(&store, "soft-1", ExpectedVersion::NoStream, vec![event(2)]).await;
    assert_eq!(again.version, Some(2), "versions continue");
    let slice = read(&store, "soft-1", all()).await;
    assert_eq!(
        slice
            .events
            .iter()
            .map(|e| n_of(&e.data))
            .collect::<Vec<_>>(),
        [2]
    );
    assert_eq!(
        store
            .stream_info(&stream("soft-1"))
            .await
            .expect("info")
            .expect("known")
            .deleted,
        None
    );
    store.close().await.expect("close");
}

/// `max_count`, `truncate_before` and `max_age` limit what stream reads return.
pub async fn metadata_limits_what_reads_return(h: &impl Harness) {
    let store = h.open().await;
    append(
        &store,
        "meta-1",
        ExpectedVersion::NoStream,
        (0..6).map(event).collect(),
    )
    .await;
    let s = stream("meta-1");
    store
        .set_metadata(
            &s,
            StreamMetadata {
                max_count: Some(2),
                ..StreamMetadata::default()
            },
        )
        .await
        .expect("meta");
    assert_eq!(
        read(&store, "meta-1", all())
            .await
            .events
            .iter()
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        [4, 5]
    );
    store
        .set_metadata(
            &s,
            StreamMetadata {
                truncate_before: Some(3),
                ..StreamMetadata::default()
            },
        )
        .await
        .expect("meta");
    assert_eq!(
        read(&store, "meta-1", all())
            .await
            .events
            .iter()
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        [3, 4, 5]
    );
    let info = store.stream_info(&s).await.expect("info").expect("known");
    assert_eq!(info.metadata.truncate_before, Some(3));
    store
        .set_metadata(
            &s,
            StreamMetadata {
                max_age: Some(Duration::from_millis(500)),
                ..StreamMetadata::default()
            },
        )
        .await
        .expect("meta");
    tokio::time::sleep(Duration::from_millis(700)).await;
    append(&store, "meta-1", ExpectedVersion::Any, vec![event(6)]).await;
    assert_eq!(
        read(&store, "meta-1", all())
            .await
            .events
            .iter()
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        [6],
        "older ones aged out"
    );
    assert_eq!(
        store.read_all(0, 100).await.expect("all").len(),
        7,
        "$all still has them"
    );
    store.close().await.expect("close");
}

/// A stream can be read as of a version or a time.
pub async fn reading_the_past(h: &impl Harness) {
    let store = h.open().await;
    append(
        &store,
        "past-1",
        ExpectedVersion::NoStream,
        vec![event(0), event(1)],
    )
    .await;
    let then = read(&store, "past-1", all()).await.events[1].timestamp_ms;
    tokio::time::sleep(Duration::from_millis(20)).await;
    append(&store, "past-1", ExpectedVersion::Exact(1), vec![event(2)]).await;
    let as_of_version = read(
        &store,
        "past-1",
        ReadStream {
            as_of: Some(AsOf::Version(0)),
            ..all()
        },
    )
    .await;
    assert_eq!(
        as_of_version
            .events
            .iter()
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        [0]
    );
    let as_of_time = read(
        &store,
        "past-1",
        ReadStream {
            as_of: Some(AsOf::Timestamp(then)),
            ..all()
        },
    )
    .await;
    assert_eq!(
        as_of_time
            .events
            .iter()
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        [0, 1]
    );
    let backward = read(
        &store,
        "past-1",
        ReadStream {
            as_of: Some(AsOf::Version(1)),
            direction: Direction::Backward,
            ..all()
        },
    )
    .await;
    assert_eq!(
        backward
            .events
            .iter()
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        [1, 0]
    );
    store.close().await.expect("close");
}

/// The latest snapshot of a stream is returned; checkpoints are kept by name.
pub async fn snapshots_and_checkpoints(h: &impl Harness) {
    let store = h.open().await;
    let s = stream("snap-1");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), None);
    store
        .save_snapshot(
            &s,
            Snapshot {
                version: 3,
                data: Body::json(&json!({"balance": 30})),
            },
        )
        .await
        .expect("save");
    store
        .save_snapshot(
            &s,
            Snapshot {
                version: 7,
                data: Body::json(&json!({"balance": 70})),
            },
        )
        .await
        .expect("save");
    let snapshot = store
        .load_snapshot(&s)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(snapshot.version, 7);
    assert_eq!(snapshot.data.to_value(), Some(json!({"balance": 70})));
    assert_eq!(
        store.load_checkpoint("projection-a").await.expect("load"),
        None
    );
    store
        .save_checkpoint("projection-a", 41)
        .await
        .expect("save");
    store
        .save_checkpoint("projection-b", 3)
        .await
        .expect("save");
    store
        .save_checkpoint("projection-a", 42)
        .await
        .expect("save");
    assert_eq!(
        store.load_checkpoint("projection-a").await.expect("load"),
        Some(42)
    );
    assert_eq!(
        store.load_checkpoint("projection-b").await.expect("load"),
        Some(3)
    );
    store.close().await.expect("close");
}

/// `head` is the next position, and changes as appends commit.
pub async fn head_follows_appends(h: &impl Harness) {
    let store = h.open().await;
    let mut head = store.head();
    let start = *head.borrow_and_update();
    let appended = append(
        &store,
        "head-1",
        ExpectedVersion::Any,
        vec![event(0), event(1)],
    )
    .await;
    assert_eq!(start, appended.positions.start);
    tokio::time::timeout(
        Duration::from_secs(5),
        head.wait_for(|h| *h >= appended.positions.end),
    )
    .await
    .expect("head advanced in time")
    .expect("head open");
    store.close().await.expect("close");
}

/// Events, versions, positions, metadata, deletions, snapshots and checkpoints
/// survive closing and reopening; positions continue without a gap.
pub async fn everything_survives_a_restart(h: &impl Harness) {
    let store = h.open().await;
    append(
        &store,
        "keep-1",
        ExpectedVersion::NoStream,
        vec![event(0), event(1)],
    )
    .await;
    append(&store, "keep-2", ExpectedVersion::NoStream, vec![event(2)]).await;
    store
        .delete(&stream("keep-2"), ExpectedVersion::Any, Deletion::Hard)
        .await
        .expect("delete");
    store
        .set_metadata(
            &stream("keep-1"),
            StreamMetadata {
                max_count: Some(10),
                ..StreamMetadata::default()
            },
        )
        .await
        .expect("meta");
    store
        .save_snapshot(
            &stream("keep-1"),
            Snapshot {
                version: 1,
                data: Body::json(&json!(1)),
            },
        )
        .await
        .expect("snapshot");
    store.save_checkpoint("c", 2).await.expect("checkpoint");
    store.close().await.expect("close");

    let store = h.open().await;
    assert_eq!(read(&store, "keep-1", all()).await.events.len(), 2);
    assert!(matches!(
        store.read_stream(&stream("keep-2"), all()).await,
        Err(EventStoreError::StreamDeleted(_))
    ));
    assert_eq!(
        store
            .stream_info(&stream("keep-1"))
            .await
            .expect("info")
            .expect("known")
            .metadata
            .max_count,
        Some(10)
    );
    assert!(
        store
            .load_snapshot(&stream("keep-1"))
            .await
            .expect("snapshot")
            .is_some()
    );
    assert_eq!(
        store.load_checkpoint("c").await.expect("checkpoint"),
        Some(2)
    );
    assert_eq!(*store.head().borrow(), 3);
    let next = append(&store, "keep-1", ExpectedVersion::Exact(1), vec![event(3)]).await;
    assert_eq!(next.positions, 3..4, "positions continue");
    store.close().await.expect("close");
}

/// Malformed appends are refused before anything is stored.
pub async fn invalid_appends_are_refused(h: &impl Harness) {
    let store = h.open().await;
    let empty_type = EventData {
        ty: String::new(),
        ..event(0)
    };
    let r = store
        .append(vec![Append {
            stream: stream("bad-1"),
            expected: ExpectedVersion::Any,
            events: vec![event(1), empty_type],
        }])
        .await;
    assert!(matches!(r, Err(EventStoreError::Invalid(_))), "{r:?}");
    let twice = vec![
        Append {
            stream: stream("bad-1"),
            expected: ExpectedVersion::Any,
            events: vec![event(2)],
        },
        Append {
            stream: stream("bad-1"),
            expected: ExpectedVersion::Any,
            events: vec![event(3)],
        },
    ];
    assert!(matches!(
        store.append(twice).await,
        Err(EventStoreError::Invalid(_))
    ));
    let e = event(4);
    let same_id = store
        .append(vec![Append {
            stream: stream("bad-1"),
            expected: ExpectedVersion::Any,
            events: vec![e.clone(), e],
        }])
        .await;
    assert!(
        matches!(same_id, Err(EventStoreError::Invalid(_))),
        "{same_id:?}"
    );
    assert!(matches!(
        store.read_stream(&stream("bad-1"), all()).await,
        Err(EventStoreError::StreamNotFound(_))
    ));
    store.close().await.expect("close");
}

/// While eight writers append concurrently to their own streams, a reader of `$all`
/// that always continues after the last position it saw sees every event exactly
/// once, in position order: the global order never skips.
pub async fn a_reader_of_all_never_skips(h: &impl Harness) {
    const WRITERS: u64 = 8;
    const EACH: u64 = 40;
    let store = h.open().await;
    let start = *store.head().borrow();
    let reader = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut seen: Vec<u64> = Vec::new();
            let mut next = start;
            let until = tokio::time::Instant::now() + Duration::from_secs(60);
            while (seen.len() as u64) < WRITERS * EACH && tokio::time::Instant::now() < until {
                let page = store.read_all(next, 50).await.expect("read all");
                for e in &page {
                    assert_eq!(e.position, next, "positions are read in order without gaps");
                    next += 1;
                    seen.push(n_of(&e.data));
                }
                if page.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            seen
        })
    };
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = Arc::clone(&store);
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let n = w * 1000 + i;
                store
                    .append(vec![Append {
                        stream: stream(&format!("skip-{w}")),
                        expected: ExpectedVersion::Any,
                        events: vec![event(n)],
                    }])
                    .await
                    .expect("append");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let seen = reader.await.expect("reader");
    let mut by_writer: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for n in &seen {
        by_writer.entry(n / 1000).or_default().push(n % 1000);
    }
    assert_eq!(
        seen.len() as u64,
        WRITERS * EACH,
        "every event seen exactly once"
    );
    for (w, ns) in by_writer {
        assert_eq!(
            ns,
            (0..EACH).collect::<Vec<_>>(),
            "writer {w}'s events in its order"
        );
    }
    store.close().await.expect("close");
}

/// `health` succeeds against a reachable backend.
pub async fn health_is_ok(h: &impl Harness) {
    let store = h.open().await;
    store.health().await.expect("healthy");
    store.close().await.expect("close");
}
