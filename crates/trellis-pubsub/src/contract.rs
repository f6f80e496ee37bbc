//! The contract every [`PubSub`] backend must pass.
//!
//! Each check is a public `async fn` taking a [`Harness`] that opens the backend under
//! test (again, over the same storage, to check restarts), so a backend's test file is
//! one line with [`pubsub_contract!`](crate::pubsub_contract):
//!
//! ```ignore
//! trellis_pubsub::pubsub_contract!(async { my_harness_for_tests().await });
//! ```
//!
//! The expression must evaluate to a future of `Option<H>` where `H: Harness`
//! (`None` skips the test, e.g. when `TRELLIS_TEST_SERVICES=0`). It is evaluated once
//! per test; each harness must use storage (topics, streams, keys) no other test uses.
//!
//! The checks use real time with short deadlines, as brokers keep their own clocks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::event::{CloudEvent, Data};
use crate::{AckOutcome, Delivery, PubSub, PubSubError, SubscriptionSettings};

/// Opens the backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Opens the backend; a second call (after `close`) must see the same data.
    async fn open(&self) -> Arc<dyn PubSub>;
}

/// Generates one `#[tokio::test]` per contract check for the harness built by `$make`.
#[macro_export]
macro_rules! pubsub_contract {
    ($make:expr) => {
        $crate::pubsub_contract!(@tests $make;
            publish_then_pull_then_ack,
            every_group_gets_every_message,
            consumers_of_a_group_share_the_work,
            repeated_ids_are_stored_once,
            ordering_keys_serialize_per_key,
            ordering_keys_hold_across_concurrent_consumers,
            nack_redelivers_after_the_delay,
            missed_deadlines_redeliver_and_extend_postpones,
            max_deliveries_dead_letters_with_reason_and_count,
            reject_dead_letters_at_once,
            dead_letters_replay_to_the_topic,
            stale_and_unknown_ack_ids,
            max_in_flight_bounds_deliveries,
            long_poll_wakes_on_publish,
            acks_and_positions_survive_a_restart,
            acks_after_a_restart_survive_the_next,
            stats_report_lag_and_in_flight,
            invalid_names_are_rejected,
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

/// The subscription settings of the checks: deadlines long enough not to expire in
/// checks that don't test expiry, backoffs short so redelivery checks finish quickly.
pub fn settings() -> SubscriptionSettings {
    SubscriptionSettings {
        ack_deadline: Duration::from_secs(3),
        max_deliveries: 3,
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_in_flight: 100,
        dead_letter_topic: None,
    }
}

/// The test event number `n` (its data is `{"n": n}`), with ordering key `key`.
pub fn event(n: u64, key: Option<&str>) -> CloudEvent {
    let data = serde_json::value::to_raw_value(&serde_json::json!({ "n": n })).expect("json");
    let mut e = CloudEvent::new("/contract", "contract.test", Some(Data::Json(data)));
    if let Some(key) = key {
        e.set_extension("partitionkey", key.into())
            .expect("valid key");
    }
    e
}

fn json(d: &Delivery) -> serde_json::Map<String, Value> {
    serde_json::from_slice(&d.event).expect("deliveries are structured CloudEvents")
}

fn n_of(d: &Delivery) -> u64 {
    number(&d.event)
}

/// The number of a test [`event`], from its structured JSON.
pub fn number(event: &[u8]) -> u64 {
    let value: Value =
        serde_json::from_slice(event).expect("deliveries are structured CloudEvents");
    value["data"]["n"].as_u64().expect("data.n")
}

async fn publish(ps: &Arc<dyn PubSub>, topic: &str, events: Vec<CloudEvent>) {
    let published = ps.publish(topic, events).await.expect("publish");
    assert!(published.receipts.iter().all(|r| !r.duplicate));
}

async fn publish_n(ps: &Arc<dyn PubSub>, topic: &str, range: std::ops::Range<u64>) {
    publish(ps, topic, range.map(|n| event(n, None)).collect()).await;
}

/// Pulls until `count` deliveries arrived or `within` passed.
async fn pull_n(
    ps: &Arc<dyn PubSub>,
    topic: &str,
    group: &str,
    s: &SubscriptionSettings,
    count: usize,
    within: Duration,
) -> Vec<Delivery> {
    let until = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < count {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        out.extend(
            ps.pull(topic, group, s, count - out.len(), left)
                .await
                .expect("pull"),
        );
    }
    out
}

async fn ack_all(ps: &Arc<dyn PubSub>, group: &str, deliveries: &[Delivery]) {
    let ids: Vec<String> = deliveries.iter().map(|d| d.ack_id.clone()).collect();
    let outcomes = ps.ack(group, &ids).await.expect("ack");
    assert!(
        outcomes.iter().all(|o| *o == AckOutcome::Ok),
        "{outcomes:?}"
    );
}

fn ns(deliveries: &[Delivery]) -> Vec<u64> {
    deliveries.iter().map(n_of).collect()
}

const SECOND: Duration = Duration::from_secs(1);

/// Published events come back, in order, as structured CloudEvents with their
/// attributes; once acked they are not delivered again.
pub async fn publish_then_pull_then_ack(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    let mut sent = event(0, None);
    sent.subject = Some("order-7".into());
    sent.set_extension("tenant", "acme".into()).expect("ext");
    let id = sent.id.clone();
    let published = ps
        .publish("t", vec![sent, event(1, None), event(2, None)])
        .await
        .expect("publish");
    assert_eq!(published.receipts.len(), 3);
    assert_eq!(published.receipts[0].id, id);
    assert!(
        published
            .receipts
            .windows(2)
            .all(|w| w[0].position < w[1].position)
    );

    let got = pull_n(&ps, "t", "g", &s, 3, 5 * SECOND).await;
    assert_eq!(ns(&got), [0, 1, 2]);
    let first = json(&got[0]);
    assert_eq!(first["id"], Value::from(id));
    assert_eq!(first["specversion"], "1.0");
    assert_eq!(first["source"], "/contract");
    assert_eq!(first["type"], "contract.test");
    assert_eq!(first["subject"], "order-7");
    assert_eq!(first["tenant"], "acme");
    assert!(got.iter().all(|d| d.attempt == 1));
    ack_all(&ps, "g", &got).await;
    let again = ps
        .pull("t", "g", &s, 10, s.ack_deadline * 2)
        .await
        .expect("pull");
    assert!(
        again.is_empty(),
        "acked messages came back: {:?}",
        ns(&again)
    );
    ps.close().await.expect("close");
}

/// Each group sees every message, independently of the others' acks.
pub async fn every_group_gets_every_message(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    publish_n(&ps, "t", 0..5).await;
    let a = pull_n(&ps, "t", "a", &s, 5, 5 * SECOND).await;
    ack_all(&ps, "a", &a).await;
    let b = pull_n(&ps, "t", "b", &s, 5, 5 * SECOND).await;
    assert_eq!(ns(&a), [0, 1, 2, 3, 4]);
    assert_eq!(ns(&b), [0, 1, 2, 3, 4]);
    assert!(
        b.iter().all(|d| d.attempt == 1),
        "group b is not affected by group a"
    );
    // An ack id of one group means nothing to another.
    let outcomes = ps.ack("c", &[a[0].ack_id.clone()]).await.expect("ack");
    assert_ne!(outcomes[0], AckOutcome::Ok);
    ps.close().await.expect("close");
}

/// Concurrent consumers of one group get disjoint messages that add up to all.
pub async fn consumers_of_a_group_share_the_work(h: &impl Harness) {
    let ps = h.open().await;
    publish_n(&ps, "t", 0..40).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let ps = Arc::clone(&ps);
        tasks.push(tokio::spawn(async move {
            let s = settings();
            let mut mine = Vec::new();
            loop {
                let got = ps
                    .pull("t", "g", &s, 3, Duration::from_millis(300))
                    .await
                    .expect("pull");
                if got.is_empty() {
                    return mine;
                }
                ack_all(&ps, "g", &got).await;
                mine.extend(ns(&got));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("consumer"));
    }
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(unique, (0..40).collect(), "every message delivered");
    assert_eq!(all.len(), 40, "none delivered twice while acked in time");
    ps.close().await.expect("close");
}

/// An id published again within the dedupe window is accepted and stored once.
pub async fn repeated_ids_are_stored_once(h: &impl Harness) {
    let ps = h.open().await;
    let e = event(7, None);
    let first = ps.publish("t", vec![e.clone()]).await.expect("publish");
    let again = ps
        .publish("t", vec![e.clone(), event(8, None)])
        .await
        .expect("publish again");
    assert!(!first.receipts[0].duplicate);
    assert!(again.receipts[0].duplicate);
    assert_eq!(again.receipts[0].position, first.receipts[0].position);
    assert!(!again.receipts[1].duplicate);
    let s = settings();
    let mut got = pull_n(&ps, "t", "g", &s, 2, 5 * SECOND).await;
    got.extend(
        ps.pull("t", "g", &s, 10, Duration::from_millis(300))
            .await
            .expect("pull"),
    );
    assert_eq!(ns(&got), [7, 8]);
    ps.close().await.expect("close");
}

/// Within a group, a keyed message waits for the previous one with its key to be
/// settled; other keys flow meanwhile.
pub async fn ordering_keys_serialize_per_key(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    publish(
        &ps,
        "t",
        vec![
            event(0, Some("a")),
            event(1, Some("a")),
            event(2, Some("b")),
            event(3, None),
            event(4, Some("a")),
        ],
    )
    .await;
    let mut first = pull_n(&ps, "t", "g", &s, 3, 5 * SECOND).await;
    first.extend(
        ps.pull("t", "g", &s, 10, Duration::from_millis(300))
            .await
            .expect("pull"),
    );
    let mut firsts = ns(&first);
    firsts.sort_unstable();
    assert_eq!(firsts, [0, 2, 3], "one in flight per key, unkeyed free");
    let a0: Vec<Delivery> = first.iter().filter(|d| n_of(d) == 0).cloned().collect();
    ack_all(&ps, "g", &a0).await;
    let next = pull_n(&ps, "t", "g", &s, 1, 3 * SECOND).await;
    assert_eq!(ns(&next), [1], "the next of key a once the first is acked");
    // A nacked keyed message is redelivered before anything later with its key.
    let nacked = ps
        .nack(
            "g",
            &[next[0].ack_id.clone()],
            Some(Duration::from_millis(50)),
        )
        .await
        .expect("nack");
    assert_eq!(nacked, [AckOutcome::Ok]);
    let redelivered = pull_n(&ps, "t", "g", &s, 1, 3 * SECOND).await;
    assert_eq!(ns(&redelivered), [1]);
    assert_eq!(redelivered[0].attempt, 2);
    ack_all(&ps, "g", &redelivered).await;
    let last = pull_n(&ps, "t", "g", &s, 1, 3 * SECOND).await;
    assert_eq!(ns(&last), [4]);
    ps.close().await.expect("close");
}

/// Four consumers of one group share keyed messages: each key's messages are
/// processed one at a time and in publish order, while keys proceed in parallel.
pub async fn ordering_keys_hold_across_concurrent_consumers(h: &impl Harness) {
    use std::sync::Mutex;
    const KEYS: u64 = 3;
    const PER_KEY: u64 = 12;
    let ps = h.open().await;
    let events = (0..KEYS * PER_KEY)
        .map(|n| event(n, Some(["red", "green", "blue"][(n % KEYS) as usize])))
        .collect();
    publish(&ps, "t", events).await;
    // Per key: the one being processed, and the order they were processed in.
    let busy: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
    let order: Arc<Mutex<BTreeMap<u64, Vec<u64>>>> = Arc::default();
    let overlaps = Arc::new(Mutex::new(Vec::new()));
    let mut consumers = Vec::new();
    for c in 0..4u64 {
        let (ps, busy, order, overlaps) = (
            Arc::clone(&ps),
            Arc::clone(&busy),
            Arc::clone(&order),
            Arc::clone(&overlaps),
        );
        consumers.push(tokio::spawn(async move {
            let s = settings();
            let mut idle = 0;
            while idle < 3 {
                let got = ps
                    .pull("t", "g", &s, 2, Duration::from_millis(300))
                    .await
                    .expect("pull");
                if got.is_empty() {
                    idle += 1;
                    continue;
                }
                idle = 0;
                for d in got {
                    let n = n_of(&d);
                    let key = n % KEYS;
                    if let Some(other) = busy.lock().expect("lock").insert(key, n) {
                        overlaps.lock().expect("lock").push((key, other, n));
                    }
                    tokio::time::sleep(Duration::from_millis(1 + (n * 7 + c) % 5)).await;
                    order.lock().expect("lock").entry(key).or_default().push(n);
                    busy.lock().expect("lock").remove(&key);
                    ack_all(&ps, "g", std::slice::from_ref(&d)).await;
                }
            }
        }));
    }
    for c in consumers {
        c.await.expect("consumer");
    }
    let overlaps = overlaps.lock().expect("lock").clone();
    assert!(
        overlaps.is_empty(),
        "two messages of one key in process at once: {overlaps:?}"
    );
    let order = order.lock().expect("lock").clone();
    for key in 0..KEYS {
        let expected: Vec<u64> = (0..PER_KEY).map(|i| i * KEYS + key).collect();
        assert_eq!(
            order.get(&key),
            Some(&expected),
            "key {key} processed out of order"
        );
    }
    ps.close().await.expect("close");
}

/// A nack returns the message after the given delay, with the attempt counted.
pub async fn nack_redelivers_after_the_delay(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    publish_n(&ps, "t", 0..1).await;
    let got = pull_n(&ps, "t", "g", &s, 1, 5 * SECOND).await;
    let started = tokio::time::Instant::now();
    assert_eq!(
        ps.nack(
            "g",
            &[got[0].ack_id.clone()],
            Some(Duration::from_millis(300))
        )
        .await
        .expect("nack"),
        [AckOutcome::Ok]
    );
    let again = pull_n(&ps, "t", "g", &s, 1, 5 * SECOND).await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "redelivered after {:?}",
        started.elapsed()
    );
    assert_eq!((ns(&again), again[0].attempt), (vec![0], 2));
    ps.close().await.expect("close");
}

/// A delivery not acked within its deadline comes back; `extend` postpones that.
pub async fn missed_deadlines_redeliver_and_extend_postpones(h: &impl Harness) {
    let ps = h.open().await;
    let s = SubscriptionSettings {
        ack_deadline: Duration::from_millis(500),
        ..settings()
    };
    publish_n(&ps, "t", 0..2).await;
    let got = pull_n(&ps, "t", "g", &s, 2, 5 * SECOND).await;
    assert_eq!(ns(&got), [0, 1]);
    let extended = got.iter().find(|d| n_of(d) == 1).expect("1");
    assert_eq!(
        ps.extend("g", std::slice::from_ref(&extended.ack_id), 5 * SECOND)
            .await
            .expect("extend"),
        [AckOutcome::Ok]
    );
    let again = pull_n(&ps, "t", "g", &s, 1, 4 * SECOND).await;
    assert_eq!(ns(&again), [0], "only the one not extended comes back");
    assert_eq!(again[0].attempt, 2);
    // The extended delivery's ack id still works; the expired one's does not.
    assert_eq!(
        ps.ack("g", std::slice::from_ref(&extended.ack_id))
            .await
            .expect("ack"),
        [AckOutcome::Ok]
    );
    let old = got.iter().find(|d| n_of(d) == 0).expect("0");
    assert_ne!(
        ps.ack("g", std::slice::from_ref(&old.ack_id))
            .await
            .expect("ack"),
        [AckOutcome::Ok]
    );
    ps.close().await.expect("close");
}

/// After `max_deliveries`, a message goes to `<topic>.dlq` with `deliverycount` and
/// `deadletterreason`, and is settled.
pub async fn max_deliveries_dead_letters_with_reason_and_count(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    publish_n(&ps, "t", 0..2).await;
    let mut attempts = Vec::new();
    for round in 0..s.max_deliveries {
        let got = pull_n(
            &ps,
            "t",
            "g",
            &s,
            if round == 0 { 2 } else { 1 },
            5 * SECOND,
        )
        .await;
        let poison: Vec<&Delivery> = got.iter().filter(|d| n_of(d) == 0).collect();
        let good: Vec<Delivery> = got.iter().filter(|d| n_of(d) == 1).cloned().collect();
        ack_all(&ps, "g", &good).await;
        assert_eq!(poison.len(), 1, "{:?}", ns(&got));
        attempts.push(poison[0].attempt);
        ps.nack("g", &[poison[0].ack_id.clone()], Some(Duration::ZERO))
            .await
            .expect("nack");
    }
    assert_eq!(attempts, [1, 2, 3]);
    let more = ps
        .pull("t", "g", &s, 10, Duration::from_millis(500))
        .await
        .expect("pull");
    assert!(
        more.is_empty(),
        "dead-lettered message delivered again: {:?}",
        ns(&more)
    );
    let dead = pull_n(&ps, "t.dlq", "ops", &s, 1, 5 * SECOND).await;
    assert_eq!(ns(&dead), [0]);
    let dead = json(&dead[0]);
    assert_eq!(dead["deliverycount"], Value::from(3));
    assert!(
        dead["deadletterreason"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    assert_eq!(dead["deadlettersource"], "t");
    let stats = ps.stats("t").await.expect("stats");
    let g = stats
        .groups
        .iter()
        .find(|g| g.group == "g")
        .expect("group g");
    assert_eq!((g.dead_lettered, g.lag), (1, 0));
    ps.close().await.expect("close");
}

/// `reject` sends a message straight to the dead-letter topic with the given reason.
pub async fn reject_dead_letters_at_once(h: &impl Harness) {
    let ps = h.open().await;
    let s = SubscriptionSettings {
        dead_letter_topic: Some("poison".into()),
        ..settings()
    };
    publish_n(&ps, "t", 0..1).await;
    let got = pull_n(&ps, "t", "g", &s, 1, 5 * SECOND).await;
    assert_eq!(
        ps.reject("g", &[got[0].ack_id.clone()], "cannot parse")
            .await
            .expect("reject"),
        [AckOutcome::Ok]
    );
    let dead = pull_n(&ps, "poison", "ops", &s, 1, 5 * SECOND).await;
    let dead = json(&dead[0]);
    assert_eq!(dead["deadletterreason"], "cannot parse");
    assert_eq!(dead["deliverycount"], Value::from(1));
    assert!(
        ps.pull("t", "g", &s, 1, Duration::from_millis(300))
            .await
            .expect("pull")
            .is_empty()
    );
    ps.close().await.expect("close");
}

/// Replaying dead letters republishes them to the topic without the dead-letter
/// attributes; every group receives them again.
pub async fn dead_letters_replay_to_the_topic(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    publish_n(&ps, "t", 0..2).await;
    let got = pull_n(&ps, "t", "g", &s, 2, 5 * SECOND).await;
    let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
    ps.reject("g", &ids, "bug").await.expect("reject");
    assert_eq!(ps.replay_dead_letters("t", &s).await.expect("replay"), 2);
    assert_eq!(
        ps.replay_dead_letters("t", &s).await.expect("replay again"),
        0,
        "each dead letter replays once"
    );
    let again = pull_n(&ps, "t", "g", &s, 2, 5 * SECOND).await;
    let mut replayed = ns(&again);
    replayed.sort_unstable();
    assert_eq!(replayed, [0, 1]);
    assert!(
        again
            .iter()
            .all(|d| !json(d).contains_key("deadletterreason"))
    );
    assert!(again.iter().all(|d| d.attempt == 1));
    ps.close().await.expect("close");
}

/// Malformed ack ids are `NotFound`; settled or superseded deliveries are `Expired`.
pub async fn stale_and_unknown_ack_ids(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    publish_n(&ps, "t", 0..1).await;
    let got = pull_n(&ps, "t", "g", &s, 1, 5 * SECOND).await;
    let id = got[0].ack_id.clone();
    let outcomes = ps
        .ack("g", &["garbage".into(), id.clone()])
        .await
        .expect("ack");
    assert_eq!(outcomes, [AckOutcome::NotFound, AckOutcome::Ok]);
    assert_eq!(
        ps.ack("g", std::slice::from_ref(&id))
            .await
            .expect("ack twice"),
        [AckOutcome::Expired]
    );
    assert_eq!(
        ps.nack("g", std::slice::from_ref(&id), None)
            .await
            .expect("nack settled"),
        [AckOutcome::Expired]
    );
    ps.close().await.expect("close");
}

/// No more than `max_in_flight` unacked deliveries per group.
pub async fn max_in_flight_bounds_deliveries(h: &impl Harness) {
    let ps = h.open().await;
    let s = SubscriptionSettings {
        max_in_flight: 3,
        ..settings()
    };
    publish_n(&ps, "t", 0..10).await;
    let first = pull_n(&ps, "t", "g", &s, 10, SECOND).await;
    assert_eq!(first.len(), 3);
    ack_all(&ps, "g", &first[..1]).await;
    let more = pull_n(&ps, "t", "g", &s, 10, SECOND).await;
    assert_eq!(more.len(), 1, "one slot freed by one ack");
    ps.close().await.expect("close");
}

/// A waiting pull returns as soon as something is published.
pub async fn long_poll_wakes_on_publish(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    // Create the group first (some brokers deliver only what is published after).
    assert!(
        ps.pull("t", "g", &s, 1, Duration::from_millis(10))
            .await
            .expect("pull")
            .is_empty()
    );
    let publisher = Arc::clone(&ps);
    let task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        publish_n(&publisher, "t", 0..1).await;
    });
    let started = tokio::time::Instant::now();
    let got = ps.pull("t", "g", &s, 1, 10 * SECOND).await.expect("pull");
    assert_eq!(ns(&got), [0]);
    assert!(
        started.elapsed() < 5 * SECOND,
        "woke after {:?}",
        started.elapsed()
    );
    task.await.expect("publisher");
    ps.close().await.expect("close");
}

/// Acked messages stay acked after a restart; unacked ones come back, counted.
pub async fn acks_and_positions_survive_a_restart(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    publish_n(&ps, "t", 0..6).await;
    let got = pull_n(&ps, "t", "g", &s, 4, 5 * SECOND).await;
    assert_eq!(ns(&got), [0, 1, 2, 3]);
    let acked: Vec<Delivery> = got
        .iter()
        .filter(|d| n_of(d).is_multiple_of(2))
        .cloned()
        .collect();
    ack_all(&ps, "g", &acked).await;
    ps.close().await.expect("close");

    let ps = h.open().await;
    let got = pull_n(&ps, "t", "g", &s, 4, 10 * SECOND).await;
    let by_n: BTreeMap<u64, u32> = got.iter().map(|d| (n_of(d), d.attempt)).collect();
    assert_eq!(
        by_n.keys().copied().collect::<Vec<_>>(),
        [1, 3, 4, 5],
        "acked 0 and 2 stay acked"
    );
    assert_eq!(
        (by_n[&1], by_n[&3], by_n[&4]),
        (2, 2, 1),
        "delivery counts survive"
    );
    // Ack the redeliveries: 4 and 5 may have been handed out a full ack deadline
    // before 1 and 3 came back, and must not be redelivered ahead of 6.
    ack_all(&ps, "g", &got).await;
    publish_n(&ps, "t", 6..7).await;
    let next = pull_n(&ps, "t", "g", &s, 1, 5 * SECOND).await;
    assert_eq!(ns(&next), [6]);
    ps.close().await.expect("close");
}

/// Acks made after a restart are as durable as those before it (state written by
/// one process must not shadow the next one's).
pub async fn acks_after_a_restart_survive_the_next(h: &impl Harness) {
    let s = settings();
    let ps = h.open().await;
    publish_n(&ps, "t", 0..6).await;
    for _ in 0..3 {
        let got = pull_n(&ps, "t", "g", &s, 2, 10 * SECOND).await;
        assert_eq!(got.len(), 2);
        ack_all(&ps, "g", &got).await;
    }
    ps.close().await.expect("close");
    let ps = h.open().await;
    publish_n(&ps, "t", 6..9).await;
    let got = pull_n(&ps, "t", "g", &s, 3, 10 * SECOND).await;
    assert_eq!(ns(&got), [6, 7, 8]);
    ack_all(&ps, "g", &got).await;
    ps.close().await.expect("close");
    let ps = h.open().await;
    let again = ps
        .pull("t", "g", &s, 10, Duration::from_millis(500))
        .await
        .expect("pull");
    assert!(
        again.is_empty(),
        "acked before the second restart, delivered again: {:?}",
        ns(&again)
    );
    ps.close().await.expect("close");
}

/// Stats count what is unsettled and in flight per group.
pub async fn stats_report_lag_and_in_flight(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    publish_n(&ps, "t", 0..5).await;
    let got = pull_n(&ps, "t", "g", &s, 2, 5 * SECOND).await;
    ack_all(&ps, "g", &got[..1]).await;
    let stats = ps.stats("t").await.expect("stats");
    assert_eq!(stats.topic, "t");
    assert!(stats.head >= 5);
    let g = stats
        .groups
        .iter()
        .find(|g| g.group == "g")
        .expect("group g listed");
    assert_eq!((g.lag, g.in_flight, g.dead_lettered), (4, 1, 0), "{g:?}");
    ps.close().await.expect("close");
}

/// Names outside `A-Z a-z 0-9 . _ -` are refused with a clear error.
pub async fn invalid_names_are_rejected(h: &impl Harness) {
    let ps = h.open().await;
    let s = settings();
    assert!(matches!(
        ps.publish("bad topic", vec![event(0, None)]).await,
        Err(PubSubError::InvalidTopic(_))
    ));
    assert!(matches!(
        ps.publish("", vec![event(0, None)]).await,
        Err(PubSubError::InvalidTopic(_))
    ));
    assert!(matches!(
        ps.pull("t", "bad/group", &s, 1, Duration::ZERO).await,
        Err(PubSubError::InvalidGroup(_))
    ));
    let mut empty_id = event(0, None);
    empty_id.id.clear();
    assert!(matches!(
        ps.publish("t", vec![empty_id]).await,
        Err(PubSubError::InvalidEvent(_))
    ));
    ps.close().await.expect("close");
}

/// `health` succeeds against a reachable backend.
pub async fn health_is_ok(h: &impl Harness) {
    let ps = h.open().await;
    ps.health().await.expect("healthy");
    ps.close().await.expect("close");
}
