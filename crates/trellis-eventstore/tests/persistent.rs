//! Persistent subscriptions on the embedded backend.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use trellis_eventstore::embedded::EmbeddedEventStore;
use trellis_eventstore::persistent::{
    Delivery, NackAction, Outcome, PersistentSubscriptions, Settings,
};
use trellis_eventstore::subscription::{Source, Start};
use trellis_eventstore::{Append, EventData, EventStore, ExpectedVersion, ReadStream, StreamName};

async fn open(dir: &tempfile::TempDir) -> Arc<dyn EventStore> {
    Arc::new(
        EmbeddedEventStore::open(dir.path().join("e.redb"))
            .await
            .expect("open"),
    )
}

async fn put(store: &Arc<dyn EventStore>, stream: &str, n: u64) {
    let stream = StreamName::new(stream).expect("name");
    let event = EventData::json("N", &json!({ "n": n }));
    store
        .append(vec![Append {
            stream,
            expected: ExpectedVersion::Any,
            events: vec![event],
        }])
        .await
        .expect("append");
}

fn n(d: &Delivery) -> u64 {
    d.event
        .data
        .to_value()
        .and_then(|v| v["n"].as_u64())
        .expect("n")
}

fn ids(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(|d| d.ack_id.clone()).collect()
}

fn settings() -> Settings {
    Settings {
        ack_timeout: Duration::from_secs(5),
        max_retries: 2,
        max_in_flight: 10,
        retry_delay: Duration::from_millis(20),
    }
}

const WAIT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn consumers_share_a_group_and_the_checkpoint_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir).await;
    for i in 0..6 {
        put(&store, if i % 2 == 0 { "order-1" } else { "user-1" }, i).await;
    }
    let subs = PersistentSubscriptions::open(Arc::clone(&store))
        .await
        .expect("subs");
    assert!(
        subs.define(
            "billing",
            Source::Category("order".into()),
            Start::Beginning,
            settings()
        )
        .await
        .expect("define")
    );
    assert!(
        !subs
            .define(
                "billing",
                Source::Category("order".into()),
                Start::Beginning,
                settings()
            )
            .await
            .expect("same again")
    );
    assert!(
        subs.define("billing", Source::All, Start::Beginning, settings())
            .await
            .is_err(),
        "the source can't change"
    );
    let a = subs.read("billing", 2, WAIT).await.expect("read");
    let b = subs.read("billing", 2, WAIT).await.expect("read");
    let got: Vec<u64> = a.iter().chain(&b).map(n).collect();
    assert_eq!(
        got,
        [0, 2, 4],
        "the category's events, shared between consumers"
    );
    assert_eq!(
        subs.ack("billing", &ids(&a)).await.expect("ack"),
        vec![Outcome::Ok; a.len()]
    );
    assert_eq!(
        subs.ack("billing", &ids(&a)).await.expect("ack again"),
        vec![Outcome::Stale; a.len()]
    );
    assert_eq!(
        subs.ack("billing", &["nonsense".into(), "other:r:1:1".into()])
            .await
            .expect("ack"),
        [Outcome::NotFound, Outcome::NotFound]
    );
    let checkpoint = subs.info("billing").expect("info").checkpoint;
    assert!(checkpoint > 2, "past the acked events: {checkpoint}");
    store.close().await.expect("close");

    let store = open(&dir).await;
    let subs = PersistentSubscriptions::open(Arc::clone(&store))
        .await
        .expect("subs");
    let info = subs.info("billing").expect("the definition survives");
    assert_eq!(info.checkpoint, checkpoint, "and the checkpoint");
    let again = subs.read("billing", 10, WAIT).await.expect("read");
    assert_eq!(
        again.iter().map(n).collect::<Vec<_>>(),
        [4],
        "what was not acked comes back"
    );
    put(&store, "order-2", 6).await;
    subs.ack("billing", &ids(&again)).await.expect("ack");
    let live = subs.read("billing", 10, WAIT).await.expect("read");
    assert_eq!(
        live.iter().map(n).collect::<Vec<_>>(),
        [6],
        "then new events"
    );
    assert!(subs.delete("billing").await.expect("delete"));
    assert!(subs.info("billing").is_none());
}

#[tokio::test]
async fn failures_retry_then_park_and_parked_events_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir).await;
    let stream = StreamName::new("job-1").expect("name");
    let subs = PersistentSubscriptions::open(Arc::clone(&store))
        .await
        .expect("subs");
    subs.define(
        "workers",
        Source::Stream(stream.clone()),
        Start::Beginning,
        settings(),
    )
    .await
    .expect("define");
    put(&store, "job-1", 0).await;
    put(&store, "job-1", 1).await;
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let got = subs.read("workers", 10, WAIT).await.expect("read");
        let poison: Vec<Delivery> = got.iter().filter(|d| n(d) == 0).cloned().collect();
        let good: Vec<Delivery> = got.iter().filter(|d| n(d) == 1).cloned().collect();
        subs.ack("workers", &ids(&good)).await.expect("ack");
        attempts.push(poison[0].attempt);
        subs.nack("workers", &ids(&poison), NackAction::Retry)
            .await
            .expect("nack");
    }
    assert_eq!(attempts, [1, 2, 3]);
    let info = subs.info("workers").expect("info");
    assert_eq!(
        (info.parked, info.checkpoint),
        (1, 2),
        "parked after max_retries, and settled"
    );
    assert!(
        subs.read("workers", 10, Duration::from_millis(200))
            .await
            .expect("read")
            .is_empty()
    );

    let parked = store
        .read_stream(
            &StreamName::new("trellis-parked-workers").expect("name"),
            ReadStream::default(),
        )
        .await
        .expect("parked stream");
    let copy = &parked.events[0];
    assert_eq!(copy.metadata.extra["$parked"]["stream"], "job-1");
    assert!(
        copy.metadata.extra["$parked"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("nacked"))
    );

    assert_eq!(subs.replay_parked("workers").await.expect("replay"), 1);
    let replayed = subs.read("workers", 10, WAIT).await.expect("read");
    assert_eq!(replayed.len(), 1);
    assert!(replayed[0].replayed);
    assert_eq!(
        (
            replayed[0].event.stream.as_str(),
            replayed[0].event.version,
            n(&replayed[0])
        ),
        ("job-1", 0, 0),
        "the original event"
    );
    assert_eq!(
        subs.ack("workers", &ids(&replayed)).await.expect("ack"),
        [Outcome::Ok]
    );
    assert_eq!(
        subs.replay_parked("workers").await.expect("replay again"),
        0
    );

    // Skip and park settle at once; a timeout counts as a failure.
    put(&store, "job-1", 2).await;
    put(&store, "job-1", 3).await;
    let got = subs.read("workers", 10, WAIT).await.expect("read");
    let (skip, park): (Vec<Delivery>, Vec<Delivery>) = got.into_iter().partition(|d| n(d) == 2);
    subs.nack("workers", &ids(&skip), NackAction::Skip)
        .await
        .expect("skip");
    subs.nack("workers", &ids(&park), NackAction::Park)
        .await
        .expect("park");
    assert_eq!(subs.info("workers").expect("info").parked, 2);
}

#[tokio::test]
async fn unacked_deliveries_time_out_and_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir).await;
    let subs = PersistentSubscriptions::open(Arc::clone(&store))
        .await
        .expect("subs");
    let quick = Settings {
        ack_timeout: Duration::from_millis(200),
        ..settings()
    };
    put(&store, "t-1", 0).await;
    subs.define("g", Source::All, Start::End, quick.clone())
        .await
        .expect("define");
    assert!(
        subs.read("g", 10, Duration::from_millis(100))
            .await
            .expect("read")
            .is_empty(),
        "from the end: nothing old"
    );
    put(&store, "t-1", 1).await;
    let first = subs.read("g", 10, WAIT).await.expect("read");
    assert_eq!((first.len(), first[0].attempt), (1, 1));
    let second = subs.read("g", 10, WAIT).await.expect("read");
    assert_eq!(
        (n(&second[0]), second[0].attempt),
        (1, 2),
        "redelivered after the ack timeout"
    );
    assert_eq!(
        subs.ack("g", &ids(&first)).await.expect("ack"),
        [Outcome::Stale],
        "the first delivery was superseded"
    );
    let all: BTreeSet<u64> = second.iter().map(n).collect();
    assert_eq!(all, BTreeSet::from([1]));
}
