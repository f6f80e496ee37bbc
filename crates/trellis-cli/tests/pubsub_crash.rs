//! Crash test for pub/sub: publishers and two consumer groups under load, `kill -9`
//! the real binary, restart, and check that every message that got a 201 reaches
//! every group, that no message a consumer acknowledged comes back, and that
//! nothing delivered is torn or foreign.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Trellis, client};

const PUBLISHERS: usize = 8;
const GROUPS: [&str; 2] = ["billing", "audit"];
const CONSUMERS_PER_GROUP: usize = 2;
const ROUNDS: usize = 2;
/// Publishes acknowledged per round before the kill, so it lands mid-load.
const PUBLISHED_BEFORE_KILL: usize = 600;

/// What the test saw, shared by its tasks.
#[derive(Debug, Default)]
struct Ledger {
    /// Ids whose publish got a 201.
    published: HashSet<String>,
    /// Ids whose publish was sent (answered or not).
    sent: HashSet<String>,
    /// Per group: every id delivered, and how often.
    delivered: HashMap<&'static str, HashMap<String, u32>>,
    /// Per group: ids whose ack got a 200 `ok`.
    acked: HashMap<&'static str, HashSet<String>>,
    /// Per group: ids delivered again after their ack succeeded.
    redelivered_after_ack: HashMap<&'static str, Vec<String>>,
}

fn payload(id: &str) -> Value {
    // Self-describing, so a torn or mixed-up event can't pass.
    json!({ "id": id, "check": id.bytes().map(u64::from).sum::<u64>(), "pad": "x".repeat(200 + id.len() * 13 % 700) })
}

async fn publisher(
    url: String,
    worker: usize,
    start: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<tokio::sync::Notify>,
) {
    let client = client();
    for seq in start.. {
        let id = format!("p{worker}-{seq}");
        let event = json!({ "specversion": "1.0", "id": id, "source": "/crash", "type": "crash.test", "data": payload(&id) });
        ledger.lock().expect("lock").sent.insert(id.clone());
        let sent = client
            .post(format!("{url}/v1/publish/default/load"))
            .header("content-type", "application/cloudevents+json")
            .json(&event)
            .send();
        let response = tokio::select! {
            r = sent => r,
            () = stop.notified() => return,
        };
        match response {
            Ok(r) if r.status() == 201 => {
                ledger.lock().expect("lock").published.insert(id);
            }
            // The kill: stop; what was in flight may or may not be stored.
            _ => return,
        }
    }
}

async fn consumer(
    url: String,
    group: &'static str,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<tokio::sync::Notify>,
) {
    let client = client();
    loop {
        let pulled = client
            .post(format!(
                "{url}/v1/pubsub/default/subscriptions/{group}/pull"
            ))
            .json(&json!({ "topic": "load", "max": 25, "wait_ms": 200 }))
            .send();
        let response = tokio::select! {
            r = pulled => r,
            () = stop.notified() => return,
        };
        let Ok(response) = response else { return };
        if response.status() != 200 {
            return;
        }
        let Ok(body) = response.json::<Value>().await else {
            return;
        };
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        let mut ids = Vec::new();
        {
            let mut ledger = ledger.lock().expect("lock");
            for m in &messages {
                let data = &m["event"]["data"];
                let id = data["id"]
                    .as_str()
                    .expect("delivered event has data.id")
                    .to_owned();
                assert_eq!(data, &payload(&id), "{group}: torn or foreign event {id}");
                assert_eq!(
                    m["event"]["id"].as_str(),
                    Some(id.as_str()),
                    "event id matches its data"
                );
                if ledger.acked.get(group).is_some_and(|a| a.contains(&id)) {
                    ledger
                        .redelivered_after_ack
                        .entry(group)
                        .or_default()
                        .push(id.clone());
                }
                *ledger
                    .delivered
                    .entry(group)
                    .or_default()
                    .entry(id.clone())
                    .or_default() += 1;
                ids.push((id, m["ack_id"].clone()));
            }
        }
        if ids.is_empty() {
            continue;
        }
        let acks: Vec<&Value> = ids.iter().map(|(_, a)| a).collect();
        let acked = client
            .post(format!("{url}/v1/pubsub/default/subscriptions/{group}/ack"))
            .json(&json!({ "ack_ids": acks }))
            .send()
            .await;
        let Ok(acked) = acked else { return };
        let Ok(body) = acked.json::<Value>().await else {
            return;
        };
        // Only acks confirmed `ok` count; a 410 (deadline passed) lists the others.
        let results = body["results"].as_array().cloned().unwrap_or_default();
        let mut ledger = ledger.lock().expect("lock");
        for ((id, _), result) in ids.into_iter().zip(results) {
            if result["outcome"] == "ok" {
                ledger.acked.entry(group).or_default().insert(id);
            }
        }
    }
}

fn start_load(
    t: &Trellis,
    round: usize,
    ledger: &Arc<Mutex<Ledger>>,
    stop: &Arc<tokio::sync::Notify>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for worker in 0..PUBLISHERS {
        tasks.push(tokio::spawn(publisher(
            t.url(""),
            worker,
            round * 1_000_000,
            Arc::clone(ledger),
            Arc::clone(stop),
        )));
    }
    for group in GROUPS {
        for _ in 0..CONSUMERS_PER_GROUP {
            tasks.push(tokio::spawn(consumer(
                t.url(""),
                group,
                Arc::clone(ledger),
                Arc::clone(stop),
            )));
        }
    }
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_no_published_or_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A short ack deadline so unacked deliveries come back quickly after restarts.
    let config = "[components.pubsub.default]\ntype = \"embedded\"\nsubscriptions = { ack_deadline = \"2s\", min_backoff = \"50ms\" }\n";
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut t = Trellis::start_in(dir.path(), config).await;
    for round in 0..ROUNDS {
        let stop = Arc::new(tokio::sync::Notify::new());
        let tasks = start_load(&t, round, &ledger, &stop);
        let target = (round + 1) * PUBLISHED_BEFORE_KILL;
        for _ in 0..1200 {
            if ledger.lock().expect("lock").published.len() >= target {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            ledger.lock().expect("lock").published.len() >= target,
            "load too slow: {}",
            t.stderr()
        );
        t.kill9().await;
        stop.notify_waiters();
        for task in tasks {
            task.await.expect("load task");
        }
        t = Trellis::start_in(dir.path(), config).await;
    }

    // Drain: consumers run until both groups have consumed every published message.
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for group in GROUPS {
        for _ in 0..CONSUMERS_PER_GROUP {
            tasks.push(tokio::spawn(consumer(
                t.url(""),
                group,
                Arc::clone(&ledger),
                Arc::clone(&stop),
            )));
        }
    }
    let published = ledger.lock().expect("lock").published.clone();
    for _ in 0..1200 {
        let done = {
            let l = ledger.lock().expect("lock");
            GROUPS.iter().all(|g| {
                l.delivered
                    .get(g)
                    .is_some_and(|d| published.iter().all(|id| d.contains_key(id)))
            })
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let in-flight acks land, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.notify_waiters();
    for task in tasks {
        task.await.expect("consumer");
    }

    let l = ledger.lock().expect("lock");
    for group in GROUPS {
        let delivered = &l.delivered[group];
        let missing: Vec<&String> = published
            .iter()
            .filter(|id| !delivered.contains_key(*id))
            .collect();
        assert!(
            missing.is_empty(),
            "{group}: {} published (201) messages never delivered, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        let phantom: Vec<&String> = delivered
            .keys()
            .filter(|id| !l.sent.contains(*id))
            .collect();
        assert!(
            phantom.is_empty(),
            "{group}: delivered messages nobody sent: {phantom:?}"
        );
        let again = l
            .redelivered_after_ack
            .get(group)
            .cloned()
            .unwrap_or_default();
        assert!(
            again.is_empty(),
            "{group}: {} acknowledged messages delivered again, e.g. {:?}",
            again.len(),
            &again[..again.len().min(5)]
        );
    }
    let unanswered = l.sent.len() - l.published.len();
    let duplicates: u32 = GROUPS
        .iter()
        .map(|g| l.delivered[g].values().map(|n| n - 1).sum::<u32>())
        .sum();
    eprintln!(
        "pubsub crash test: {} published (201), {unanswered} in flight at kills, {duplicates} redeliveries of unacked deliveries across {} groups, {ROUNDS} kills",
        published.len(),
        GROUPS.len()
    );
}
