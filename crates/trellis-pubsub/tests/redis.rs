//! The pub/sub contract against Redis Streams, and checks of its own.
//!
//! Needs Redis at `TRELLIS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); skipped,
//! loudly, with `TRELLIS_TEST_SERVICES=0`. Each test uses a key prefix of its own.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use trellis_core::config::RedisPubSub as Config;
use trellis_pubsub::contract::Harness;
use trellis_pubsub::redis::{RedisPubSub, position, stream_id};
use trellis_pubsub::{AckOutcome, PubSub, PubSubError, SubscriptionSettings};

struct Redis {
    prefix: String,
}

impl Redis {
    fn config(&self) -> Config {
        Config {
            url: trellis_core::testing::redis_url(),
            key_prefix: Some(self.prefix.clone()),
            ..Config::default()
        }
    }

    async fn connect(&self) -> Arc<RedisPubSub> {
        RedisPubSub::connect("test", &self.config())
            .await
            .expect("connect")
    }
}

/// Deletes every key of the harness when the test ends (passed or not).
impl Drop for Redis {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(trellis_core::testing::redis_url()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let Ok((next, batch)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", self.prefix))
                .arg("COUNT")
                .arg(10_000)
                .query(&mut conn)
            else {
                return;
            };
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

#[async_trait]
impl Harness for Redis {
    async fn open(&self) -> Arc<dyn PubSub> {
        self.connect().await
    }
}

async fn harness() -> Option<Redis> {
    if !trellis_core::testing::services_enabled("Redis") {
        return None;
    }
    Some(Redis {
        prefix: format!("{}:", trellis_core::testing::unique_name("t")),
    })
}

trellis_pubsub::pubsub_contract!(harness());

use trellis_pubsub::contract::{event, number as n_of, settings};

#[test]
fn positions_of_real_ids() {
    assert_eq!(position("0-0"), Some(0));
    assert_eq!(position("0-1"), Some(1));
    assert_eq!(position("1-0"), Some(1 << 20));
    assert_eq!(
        position("1795458676916-7"),
        Some(1_795_458_676_916 << 20 | 7)
    );
    assert_eq!(stream_id(1_795_458_676_916 << 20 | 7), "1795458676916-7");
    for bad in [
        "",
        "1",
        "-1",
        "1-",
        "a-1",
        "1-a",
        "1-2-3",
        "+1-2",
        "1-1048576",
        "17592186044416-0",
    ] {
        assert_eq!(position(bad), None, "{bad}");
    }
    assert_eq!(position("17592186044415-1048575"), Some(u64::MAX));
}

proptest! {
    /// Positions round-trip, and order ids as Redis does (by ms, then seq).
    #[test]
    fn positions_round_trip_and_keep_order(
        a in (0u64..1 << 44, 0u64..1 << 20),
        b in (0u64..1 << 44, 0u64..1 << 20),
    ) {
        let (ia, ib) = (format!("{}-{}", a.0, a.1), format!("{}-{}", b.0, b.1));
        let (pa, pb) = (position(&ia).expect("a"), position(&ib).expect("b"));
        prop_assert_eq!(stream_id(pa), ia);
        prop_assert_eq!(stream_id(pb), ib);
        prop_assert_eq!(pa.cmp(&pb), a.cmp(&b));
    }

    #[test]
    fn any_position_round_trips(p: u64) {
        prop_assert_eq!(position(&stream_id(p)), Some(p));
    }
}

/// Two processes sharing a Redis share the groups: what one delivers the other does
/// not, an ack sent to the other counts, and ordering keys hold across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_groups_and_ordering_keys() {
    let Some(h) = harness().await else { return };
    let (a, b) = (h.connect().await, h.connect().await);
    let s = settings();
    a.publish(
        "t",
        vec![event(0, Some("k")), event(1, Some("k")), event(2, None)],
    )
    .await
    .expect("publish");
    let first = a
        .pull("t", "g", &s, 10, Duration::from_secs(2))
        .await
        .expect("pull");
    let mut got: Vec<u64> = first.iter().map(|d| n_of(&d.event)).collect();
    got.sort_unstable();
    assert_eq!(got, [0, 2]);
    assert!(
        b.pull("t", "g", &s, 10, Duration::from_millis(300))
            .await
            .expect("pull")
            .is_empty(),
        "1 waits for 0, even in another process"
    );
    let zero = first.iter().find(|d| n_of(&d.event) == 0).expect("0");
    assert_eq!(zero.key.as_deref(), Some("k"));
    assert_eq!(
        b.ack("g", std::slice::from_ref(&zero.ack_id))
            .await
            .expect("ack"),
        [AckOutcome::Ok]
    );
    let next = b
        .pull("t", "g", &s, 10, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(
        next.iter()
            .map(|d| (n_of(&d.event), d.attempt))
            .collect::<Vec<_>>(),
        [(1, 1)]
    );
}

/// A waiting pull wakes when this process acks the holder of a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_wakes_a_pull_waiting_for_its_key() {
    let Some(h) = harness().await else { return };
    let ps = h.connect().await;
    let s = settings();
    ps.publish("t", vec![event(0, Some("k")), event(1, Some("k"))])
        .await
        .expect("publish");
    let first = ps
        .pull("t", "g", &s, 10, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(first.len(), 1);
    let acker = Arc::clone(&ps);
    let ack_id = first[0].ack_id.clone();
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        acker.ack("g", &[ack_id]).await.expect("ack")
    });
    let started = tokio::time::Instant::now();
    let next = ps
        .pull("t", "g", &s, 10, Duration::from_secs(10))
        .await
        .expect("pull");
    assert_eq!(next.iter().map(|d| n_of(&d.event)).collect::<Vec<_>>(), [1]);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(task.await.expect("acker"), [AckOutcome::Ok]);
}

/// A delivery whose deadline expires on its last allowed attempt is dead-lettered
/// with the reason, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_on_the_last_delivery_dead_letters() {
    let Some(h) = harness().await else { return };
    let ps = h.connect().await;
    let s = SubscriptionSettings {
        ack_deadline: Duration::from_millis(200),
        max_deliveries: 2,
        ..settings()
    };
    ps.publish("t", vec![event(0, Some("k")), event(1, Some("k"))])
        .await
        .expect("publish");
    let mut attempts = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while attempts.len() < 3 && tokio::time::Instant::now() < until {
        for d in ps
            .pull("t", "g", &s, 10, Duration::from_millis(500))
            .await
            .expect("pull")
        {
            attempts.push((n_of(&d.event), d.attempt));
        }
    }
    assert_eq!(
        attempts,
        [(0, 1), (0, 2), (1, 1)],
        "1 is delivered once 0 is dead-lettered"
    );
    let dead = ps
        .pull("t.dlq", "ops", &s, 10, Duration::from_secs(2))
        .await
        .expect("pull dlq");
    let json: serde_json::Value = serde_json::from_slice(&dead[0].event).expect("json");
    assert_eq!(
        json["deadletterreason"],
        "ack deadline expired on the last allowed delivery"
    );
    assert_eq!(json["deliverycount"], 2);
    assert_eq!(json["deadlettergroup"], "g");
    assert_eq!(dead[0].key.as_deref(), Some("k"));
    let stats = ps.stats("t").await.expect("stats");
    let g = stats.groups.iter().find(|g| g.group == "g").expect("g");
    assert_eq!((g.dead_lettered, g.in_flight, g.lag), (1, 1, 1));
}

/// Acks, nacks and rejects sent to a process that never pulled follow the settings
/// of the process that did (stored in Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_shared_between_processes() {
    let Some(h) = harness().await else { return };
    let (a, b) = (h.connect().await, h.connect().await);
    let s = SubscriptionSettings {
        max_deliveries: 1,
        dead_letter_topic: Some("graveyard".into()),
        ..settings()
    };
    a.publish("t", vec![event(0, None)]).await.expect("publish");
    let got = a
        .pull("t", "g", &s, 1, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(
        b.nack("g", &[got[0].ack_id.clone()], None)
            .await
            .expect("nack"),
        [AckOutcome::Ok]
    );
    let dead = b
        .pull("graveyard", "ops", &s, 1, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(dead.len(), 1, "the last allowed delivery was nacked");
}

/// The dedupe window and unreachable Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_dedupe_window_stores_every_copy_and_errors_are_typed() {
    let Some(h) = harness().await else { return };
    let ps = RedisPubSub::connect(
        "test",
        &Config {
            dedupe_window: Duration::ZERO,
            ..h.config()
        },
    )
    .await
    .expect("connect");
    let e = event(0, None);
    let published = ps.publish("t", vec![e.clone(), e]).await.expect("publish");
    assert!(published.receipts.iter().all(|r| !r.duplicate));
    assert!(published.receipts[0].position < published.receipts[1].position);
    let stats = ps.stats("t").await.expect("stats");
    assert_eq!(stats.start, published.receipts[0].position);
    assert_eq!(stats.head, published.receipts[1].position + 1);
    assert_eq!(
        ps.stats("never").await.expect("stats").head,
        0,
        "a topic never published to"
    );

    let unreachable = RedisPubSub::connect(
        "test",
        &Config {
            url: "redis://127.0.0.1:1".into(),
            connect_timeout: Duration::from_millis(200),
            ..Config::default()
        },
    )
    .await;
    assert!(
        matches!(unreachable, Err(PubSubError::Unavailable { .. })),
        "{unreachable:?}"
    );
}

/// A group whose tracking keys were lost (deleted, evicted) still gets its pending
/// messages redelivered: pulls adopt what the PEL holds and nothing tracks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_entries_nothing_tracks_are_adopted() {
    let Some(h) = harness().await else { return };
    let ps = h.connect().await;
    let s = SubscriptionSettings {
        ack_deadline: Duration::from_millis(200),
        ..settings()
    };
    ps.publish("t", vec![event(0, None)])
        .await
        .expect("publish");
    let got = ps
        .pull("t", "g", &s, 1, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(got.len(), 1);
    let client = redis::Client::open(trellis_core::testing::redis_url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{}f:t:g", h.prefix))
        .query_async(&mut conn)
        .await
        .expect("del");
    let again = ps
        .pull("t", "g", &s, 1, Duration::from_secs(3))
        .await
        .expect("pull");
    assert_eq!(
        again
            .iter()
            .map(|d| (n_of(&d.event), d.attempt))
            .collect::<Vec<_>>(),
        [(0, 2)]
    );
    assert_eq!(
        ps.ack("g", &[again[0].ack_id.clone()]).await.expect("ack"),
        [AckOutcome::Ok]
    );
}

/// Entries trimmed by `retention_max_len` while unsettled are given up on; the rest
/// flow, and stats start at the oldest entry kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_entries_are_given_up_on() {
    let Some(h) = harness().await else { return };
    let ps = RedisPubSub::connect(
        "test",
        &Config {
            retention_max_len: Some(10),
            ..h.config()
        },
    )
    .await
    .expect("connect");
    let s = SubscriptionSettings {
        ack_deadline: Duration::from_millis(200),
        ..settings()
    };
    let first = ps
        .publish("t", vec![event(0, None)])
        .await
        .expect("publish");
    let got = ps
        .pull("t", "g", &s, 1, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(got.len(), 1);
    // `MAXLEN ~` trims whole stream nodes (100 entries by default).
    for batch in 0..5u64 {
        ps.publish(
            "t",
            (1..=100).map(|n| event(batch * 100 + n, None)).collect(),
        )
        .await
        .expect("publish");
    }
    let stats = ps.stats("t").await.expect("stats");
    assert!(stats.start > first.receipts[0].position, "{stats:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = Vec::new();
    loop {
        let batch = ps
            .pull("t", "g", &s, 100, Duration::from_millis(300))
            .await
            .expect("pull");
        if batch.is_empty() {
            break;
        }
        seen.extend(batch.iter().map(|d| n_of(&d.event)));
        ps.ack(
            "g",
            &batch.iter().map(|d| d.ack_id.clone()).collect::<Vec<_>>(),
        )
        .await
        .expect("ack");
    }
    assert!(!seen.contains(&0), "the trimmed entry is not redelivered");
    assert!(seen.contains(&500), "the newest entries are delivered");
    let stats = ps.stats("t").await.expect("stats");
    let g = stats.groups.iter().find(|g| g.group == "g").expect("g");
    assert_eq!(
        (g.lag, g.in_flight, g.pending_redelivery),
        (0, 0, 0),
        "{g:?}"
    );
}

/// Ack ids that can't name a delivery are `NotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ack_ids() {
    let Some(h) = harness().await else { return };
    let ps = h.connect().await;
    ps.publish("t", vec![event(0, None)])
        .await
        .expect("publish");
    let got = ps
        .pull("t", "g", &settings(), 1, Duration::from_secs(2))
        .await
        .expect("pull");
    let zeroth = format!("t:{}:0", got[0].position);
    let outcomes = ps
        .ack(
            "g",
            &[zeroth, "t:1:1".into(), "nope:1:1".into(), "t:x:1".into()],
        )
        .await
        .expect("ack");
    assert_eq!(
        outcomes[0],
        AckOutcome::NotFound,
        "attempt 0 is never delivered"
    );
    assert_ne!(outcomes[1], AckOutcome::Ok);
    assert_eq!(
        outcomes[2],
        AckOutcome::NotFound,
        "a topic the group never read"
    );
    assert_eq!(outcomes[3], AckOutcome::NotFound);
    assert!(matches!(
        ps.ack("bad group", &[got[0].ack_id.clone()]).await,
        Err(PubSubError::InvalidGroup(_))
    ));
}
