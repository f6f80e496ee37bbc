//! The pub/sub contract against NATS JetStream (`TRELLIS_TEST_NATS_URL`, default
//! `nats://127.0.0.1:4222`), plus NATS-specific checks.
//!
//! Each test uses its own stream prefix, so tests run in parallel and can be re-run;
//! the harness deletes its streams when dropped.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use proptest::prelude::*;
use trellis_core::config::{NatsPubSub as Config, NatsStorage};
use trellis_pubsub::contract::Harness;
use trellis_pubsub::event::{CloudEvent, Data};
use trellis_pubsub::nats::{NatsPubSub, consumer_name, stream_name, subject};
use trellis_pubsub::{AckOutcome, PubSub, PubSubError, SubscriptionSettings};

struct Nats {
    config: Config,
}

#[async_trait]
impl Harness for Nats {
    async fn open(&self) -> Arc<dyn PubSub> {
        NatsPubSub::connect(&self.config).await.expect("connect")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        // Best effort: delete this test's streams, on a thread and runtime of its own
        // (drop can't await, and can't block the test's runtime with `block_on`).
        let url = self.config.url.clone();
        let prefix = format!("{}_", self.config.stream_prefix.replace('_', "__"));
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                let Ok(client) = async_nats::connect(url).await else {
                    return;
                };
                let js = async_nats::jetstream::new(client);
                let mut names = js.stream_names();
                let mut ours = Vec::new();
                while let Some(Ok(name)) = futures_util::StreamExt::next(&mut names).await {
                    if name.starts_with(&prefix) {
                        ours.push(name);
                    }
                }
                for name in ours {
                    let _ = js.delete_stream(&name).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

fn config() -> Config {
    Config {
        url: trellis_core::testing::nats_url(),
        stream_prefix: trellis_core::testing::unique_name("t"),
        storage: NatsStorage::File,
        connect_timeout: Duration::from_secs(3),
        ..Config::default()
    }
}

async fn harness() -> Option<Nats> {
    if !trellis_core::testing::services_enabled("NATS JetStream") {
        return None;
    }
    Some(Nats { config: config() })
}

trellis_pubsub::pubsub_contract!(harness());

use trellis_pubsub::contract::{event, number as n_of, settings};

/// Topics that need escaping (dots, underscores, empty subject tokens) work and stay
/// apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_topic_names_stay_apart() {
    let Some(h) = harness().await else { return };
    let ps = h.open().await;
    let s = settings();
    let topics = ["a.b", "a_b", "a__b", "a..b", ".a", "a.", "a_Db"];
    for (n, topic) in topics.iter().enumerate() {
        ps.publish(topic, vec![event(n as u64, None)])
            .await
            .unwrap_or_else(|e| panic!("publish to {topic}: {e}"));
    }
    for (n, topic) in topics.iter().enumerate() {
        let got = ps
            .pull(topic, "g.x_y", &s, 10, Duration::from_secs(2))
            .await
            .expect("pull");
        let ns: Vec<u64> = got.iter().map(|d| n_of(&d.event)).collect();
        assert_eq!(ns, [n as u64], "{topic}");
        let stats = ps.stats(topic).await.expect("stats");
        assert_eq!(stats.groups.len(), 1);
        assert_eq!(stats.groups[0].group, "g.x_y");
    }
    ps.close().await.expect("close");
}

/// Changed settings are applied to the consumer: a shorter deadline redelivers sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_changes_update_the_consumer() {
    let Some(h) = harness().await else { return };
    let ps = h.open().await;
    let slow = SubscriptionSettings {
        ack_deadline: Duration::from_secs(30),
        ..settings()
    };
    ps.publish("t", vec![event(0, None)])
        .await
        .expect("publish");
    let got = ps
        .pull("t", "g", &slow, 1, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(got.len(), 1);
    let fast = SubscriptionSettings {
        ack_deadline: Duration::from_millis(300),
        ..settings()
    };
    // The change applies to deliveries from now on; this one still has 30 s, so nack it
    // and check the next one expires quickly.
    ps.nack("g", &[got[0].ack_id.clone()], Some(Duration::ZERO))
        .await
        .expect("nack");
    let again = ps
        .pull("t", "g", &fast, 1, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    let started = tokio::time::Instant::now();
    let third = ps
        .pull("t", "g", &fast, 1, Duration::from_secs(5))
        .await
        .expect("pull");
    assert_eq!(third.len(), 1, "redelivered after the new 300 ms deadline");
    assert_eq!(third[0].attempt, 3);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    ps.close().await.expect("close");
}

/// A message delivered past `max_deliveries` because its deadlines expired goes to the
/// dead-letter topic, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadlines_dead_letter() {
    let Some(h) = harness().await else { return };
    let ps = h.open().await;
    let s = SubscriptionSettings {
        ack_deadline: Duration::from_millis(200),
        max_deliveries: 2,
        ..settings()
    };
    ps.publish("t", vec![event(0, None)])
        .await
        .expect("publish");
    let mut attempts = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until && attempts.len() < 3 {
        let got = ps
            .pull("t", "g", &s, 1, Duration::from_millis(500))
            .await
            .expect("pull");
        attempts.extend(got.iter().map(|d| d.attempt));
    }
    assert_eq!(attempts, [1, 2], "never a third delivery");
    let dead = ps
        .pull("t.dlq", "ops", &s, 1, Duration::from_secs(3))
        .await
        .expect("pull dlq");
    assert_eq!(dead.len(), 1);
    let json: serde_json::Value = serde_json::from_slice(&dead[0].event).expect("json");
    assert_eq!(json["deliverycount"], 2);
    assert_eq!(json["deadlettergroup"], "g");
    assert!(
        json["deadletterreason"]
            .as_str()
            .is_some_and(|r| r.contains("deadline"))
    );
    let stats = ps.stats("t").await.expect("stats");
    assert_eq!((stats.groups[0].dead_lettered, stats.groups[0].lag), (1, 0));
    ps.close().await.expect("close");
}

/// A long poll waiting for a key wakes when the key's holder is acked, and buffered
/// messages stay alive (not redelivered) while they wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_pull_wakes_when_a_key_is_released() {
    let Some(h) = harness().await else { return };
    let ps = h.open().await;
    let s = SubscriptionSettings {
        ack_deadline: Duration::from_millis(400),
        ..settings()
    };
    ps.publish("t", vec![event(0, Some("k")), event(1, Some("k"))])
        .await
        .expect("publish");
    let first = ps
        .pull("t", "g", &s, 10, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(first.len(), 1);
    // Keep the holder alive past several deadlines of the buffered message.
    ps.extend("g", &[first[0].ack_id.clone()], Duration::from_secs(10))
        .await
        .expect("extend");
    let waiter = {
        let ps = Arc::clone(&ps);
        let s = s.clone();
        tokio::spawn(async move { ps.pull("t", "g", &s, 10, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = tokio::time::Instant::now();
    assert_eq!(
        ps.ack("g", &[first[0].ack_id.clone()]).await.expect("ack"),
        [AckOutcome::Ok]
    );
    let next = waiter.await.expect("task").expect("pull");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(next.len(), 1);
    assert_eq!(
        (n_of(&next[0].event), next[0].attempt),
        (1, 1),
        "kept alive, not redelivered"
    );
    ps.close().await.expect("close");
}

/// Cancelled pulls lose nothing: a message published as a pull is cancelled (taken by
/// the server for the cancelled pull or not) goes to the next pull, first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_pulls_lose_nothing() {
    let Some(h) = harness().await else { return };
    let ps = h.open().await;
    let s = settings();
    // Create the group.
    assert!(
        ps.pull("t", "g", &s, 1, Duration::ZERO)
            .await
            .expect("pull")
            .is_empty()
    );
    for n in 0..5 {
        let puller = {
            let ps = Arc::clone(&ps);
            let s = s.clone();
            tokio::spawn(async move { ps.pull("t", "g", &s, 1, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The server delivers to the waiting pull as it stores the message; the pull is
        // cancelled before it returns.
        ps.publish("t", vec![event(n, None)])
            .await
            .expect("publish");
        puller.abort();
        let got = match puller.await {
            Ok(result) => result.expect("pull"),
            Err(_) => ps
                .pull("t", "g", &s, 1, Duration::from_secs(2))
                .await
                .expect("pull"),
        };
        assert_eq!(got.len(), 1, "message {n}");
        assert_eq!(
            (n_of(&got[0].event), got[0].attempt),
            (n, 1),
            "delivered once, not after an ack deadline"
        );
        ps.ack("g", &[got[0].ack_id.clone()]).await.expect("ack");
    }
    ps.close().await.expect("close");
}

/// Events too large for the server are refused as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_events_are_refused() {
    let Some(h) = harness().await else { return };
    let ps = h.open().await;
    let big = CloudEvent::new(
        "/nats-test",
        "nats.test",
        Some(Data::Binary(vec![0u8; 2 << 20].into())),
    );
    assert!(matches!(
        ps.publish("t", vec![big]).await,
        Err(PubSubError::TooLarge(_))
    ));
    ps.close().await.expect("close");
}

/// An unreachable server is reported as unavailable, promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable() {
    let config = Config {
        url: "nats://127.0.0.1:1".into(),
        connect_timeout: Duration::from_millis(500),
        ..config()
    };
    let started = tokio::time::Instant::now();
    let result = NatsPubSub::connect(&config).await;
    assert!(
        matches!(result, Err(PubSubError::Unavailable { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A restarted process does not hand out a keyed message before an earlier one with
/// its key that was in flight in the previous process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stay_ordered_across_a_restart() {
    let Some(h) = harness().await else { return };
    let s = SubscriptionSettings {
        ack_deadline: Duration::from_secs(1),
        ..settings()
    };
    let ps = h.open().await;
    ps.publish(
        "t",
        vec![event(0, Some("k")), event(1, Some("k")), event(2, None)],
    )
    .await
    .expect("publish");
    let first = ps
        .pull("t", "g", &s, 10, Duration::from_secs(2))
        .await
        .expect("pull");
    let mut ns: Vec<u64> = first.iter().map(|d| n_of(&d.event)).collect();
    ns.sort_unstable();
    assert_eq!(ns, [0, 2]);
    let unkeyed: Vec<String> = first
        .iter()
        .filter(|d| d.key.is_none())
        .map(|d| d.ack_id.clone())
        .collect();
    ps.ack("g", &unkeyed).await.expect("ack");
    // 0 stays unacked: in flight when the process goes away.
    ps.close().await.expect("close");
    drop(ps);

    let ps = h.open().await;
    let mut order = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while order.len() < 2 && tokio::time::Instant::now() < until {
        let got = ps
            .pull("t", "g", &s, 10, Duration::from_millis(500))
            .await
            .expect("pull");
        for d in &got {
            order.push(n_of(&d.event));
        }
        ps.ack(
            "g",
            &got.iter().map(|d| d.ack_id.clone()).collect::<Vec<_>>(),
        )
        .await
        .expect("ack");
    }
    assert_eq!(order, [0, 1], "0 comes back before 1 goes out");
    ps.close().await.expect("close");
}

/// Nacked messages count on the server until redelivered; pulls meanwhile return
/// within their wait, and the redeliveries come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_messages_at_max_in_flight() {
    let Some(h) = harness().await else { return };
    let ps = h.open().await;
    let s = SubscriptionSettings {
        max_in_flight: 3,
        ..settings()
    };
    ps.publish("t", (0..6).map(|n| event(n, None)).collect())
        .await
        .expect("publish");
    let got = ps
        .pull("t", "g", &s, 3, Duration::from_secs(2))
        .await
        .expect("pull");
    assert_eq!(got.len(), 3);
    let ids: Vec<String> = got[1..].iter().map(|d| d.ack_id.clone()).collect();
    ps.nack("g", &ids, Some(Duration::from_millis(800)))
        .await
        .expect("nack");
    let started = tokio::time::Instant::now();
    let during = ps
        .pull("t", "g", &s, 3, Duration::from_millis(300))
        .await
        .expect("pull");
    assert!(during.is_empty(), "the server is at max_ack_pending");
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    let mut later = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    while later.len() < 2 && tokio::time::Instant::now() < until {
        later.extend(
            ps.pull("t", "g", &s, 3, Duration::from_millis(500))
                .await
                .expect("pull"),
        );
    }
    let mut back: Vec<(u64, u32)> = later.iter().map(|d| (n_of(&d.event), d.attempt)).collect();
    back.sort_unstable();
    assert_eq!(back, [(1, 2), (2, 2)]);
    ps.close().await.expect("close");
}

/// A few thousand messages go through two consumers promptly, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_throughput() {
    let Some(h) = harness().await else { return };
    let ps = h.open().await;
    let started = tokio::time::Instant::now();
    for chunk in 0..4u64 {
        ps.publish(
            "t",
            (chunk * 500..(chunk + 1) * 500)
                .map(|n| event(n, None))
                .collect(),
        )
        .await
        .expect("publish");
    }
    let published = started.elapsed();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let ps = Arc::clone(&ps);
        tasks.push(tokio::spawn(async move {
            let s = settings();
            let mut seen = Vec::new();
            loop {
                let got = ps
                    .pull("t", "g", &s, 100, Duration::from_millis(300))
                    .await
                    .expect("pull");
                if got.is_empty() {
                    return seen;
                }
                let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
                let outcomes = ps.ack("g", &ids).await.expect("ack");
                assert!(outcomes.iter().all(|o| *o == AckOutcome::Ok));
                seen.extend(got.iter().map(|d| n_of(&d.event)));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("consumer"));
    }
    all.sort_unstable();
    assert_eq!(all, (0..2000).collect::<Vec<_>>());
    eprintln!(
        "published 2000 in {published:?}; consumed in {:?}",
        started.elapsed() - published
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    ps.close().await.expect("close");
}

proptest! {
    /// Distinct topics get distinct streams and subjects; distinct groups distinct
    /// consumers.
    #[test]
    fn names_are_injective(names in proptest::collection::hash_set("[a-zA-Z0-9._-]{1,12}", 1..40)) {
        let names: Vec<String> = names.into_iter().collect();
        let streams: HashSet<String> = names.iter().map(|t| stream_name("p", t)).collect();
        let subjects: HashSet<String> = names.iter().map(|t| subject("p", t)).collect();
        let consumers: HashSet<String> = names.iter().map(|g| consumer_name(g)).collect();
        prop_assert_eq!(streams.len(), names.len());
        prop_assert_eq!(subjects.len(), names.len());
        prop_assert_eq!(consumers.len(), names.len());
        for name in &names {
            let s = subject("p", name);
            prop_assert!(s.split('.').all(|t| !t.is_empty()), "{}", s);
            let stream = stream_name("p", name);
            prop_assert!(!stream.contains('.'), "{}", stream);
            prop_assert!(!consumer_name(name).contains('.'));
        }
    }

    /// Escaping is reversible even with the characters it uses.
    #[test]
    fn escaping_tricky_names(a in "[._D]{1,10}", b in "[._D]{1,10}") {
        prop_assume!(a != b);
        prop_assert_ne!(consumer_name(&a), consumer_name(&b));
        prop_assert_ne!(stream_name("p", &a), stream_name("p", &b));
    }
}
