//! Crash test for the event store: writers append batches (single- and
//! multi-stream) under load, the real binary is `kill -9`ed mid-load and restarted,
//! and then: every batch that got a 201 is stored, whole and in place; a batch whose
//! answer never came is stored whole or not at all; stream versions are contiguous;
//! `$all` is gap-free and holds exactly the stored events. Runs on the embedded
//! backend and on PostgreSQL.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Trellis, client};
use trellis_core::testing::{postgres_url, services_enabled, unique_name};
use uuid::Uuid;

const WRITERS: usize = 8;
/// Acknowledged batches per round before the kill, so it lands mid-load.
const ACKED_BEFORE_KILL: usize = 300;
const ROUNDS: usize = 2;

/// One batch a writer sent.
#[derive(Debug, Clone)]
struct Batch {
    /// (stream, event id, payload check) per event, in order.
    events: Vec<(String, Uuid, String)>,
    /// Whether it got a 201.
    acked: bool,
}

#[derive(Debug, Default)]
struct Ledger {
    batches: Vec<Batch>,
    acked: usize,
}

fn body_of(id: Uuid) -> String {
    // Self-describing, so a torn or mixed-up event can't pass.
    format!("{id}:{}", "x".repeat(100 + (id.as_u128() % 400) as usize))
}

async fn writer(url: String, worker: usize, ledger: Arc<Mutex<Ledger>>) {
    let client = client();
    for seq in 0usize.. {
        // Most batches go to the writer's own streams, some span a shared one too.
        let own = format!("acct-w{worker}x{}", seq % 3);
        let n = 1 + seq % 4;
        let mut events: Vec<(String, Uuid, String)> = (0..n)
            .map(|_| {
                let id = Uuid::new_v4();
                (own.clone(), id, body_of(id))
            })
            .collect();
        let multi = seq % 5 == 0;
        if multi {
            let id = Uuid::new_v4();
            events.push((format!("ledger-{}", seq % 2), id, body_of(id)));
        }
        let index = {
            let mut l = ledger.lock().expect("lock");
            l.batches.push(Batch {
                events: events.clone(),
                acked: false,
            });
            l.batches.len() - 1
        };
        let event = |(_, id, body): &(String, Uuid, String)| json!({"id": id.to_string(), "type": "Posted", "data": {"body": body}});
        let request = if multi {
            let mut by_stream: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
            for e in &events {
                by_stream.entry(e.0.as_str()).or_default().push(event(e));
            }
            let appends: Vec<Value> = by_stream
                .into_iter()
                .map(|(stream, events)| json!({"stream": stream, "events": events}))
                .collect();
            client
                .post(format!("{url}/v1/streams"))
                .json(&json!({ "appends": appends }))
        } else {
            let events: Vec<Value> = events.iter().map(event).collect();
            client
                .post(format!("{url}/v1/streams/{own}"))
                .json(&json!({ "events": events }))
        };
        match request.send().await {
            Ok(r) if r.status().as_u16() == 201 => {
                let mut l = ledger.lock().expect("lock");
                l.batches[index].acked = true;
                l.acked += 1;
            }
            Ok(r) => panic!("append refused: {}", r.status()),
            // The process died with the request in flight.
            Err(_) => return,
        }
    }
}

async fn read_all(t: &Trellis) -> Vec<Value> {
    let mut events = Vec::new();
    let mut from = 0u64;
    loop {
        let r: Value = client()
            .get(t.url(&format!("/v1/streams/$all?from_position={from}&limit=1000")))
            .send()
            .await
            .expect("read")
            .json()
            .await
            .expect("json");
        let page = r["events"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return events;
        }
        from = page
            .last()
            .and_then(|e| e["position"].as_u64())
            .expect("position")
            + 1;
        events.extend(page);
    }
}

async fn check(t: &Trellis, ledger: &Ledger) {
    let all = read_all(t).await;
    // $all: gap-free positions, ids unique, bodies intact.
    let mut stored: HashMap<Uuid, (String, u64, u64)> = HashMap::new();
    let mut versions: HashMap<String, Vec<u64>> = HashMap::new();
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["position"].as_u64(), Some(i as u64), "a gap in $all");
        if e["stream"]
            .as_str()
            .is_some_and(|s| s.starts_with("trellis-"))
        {
            continue;
        }
        let id: Uuid = e["id"].as_str().and_then(|s| s.parse().ok()).expect("id");
        let stream = e["stream"].as_str().expect("stream").to_owned();
        assert_eq!(
            e["data"]["body"].as_str(),
            Some(body_of(id).as_str()),
            "torn event {id}"
        );
        let version = e["version"].as_u64().expect("version");
        versions.entry(stream.clone()).or_default().push(version);
        assert!(
            stored.insert(id, (stream, version, i as u64)).is_none(),
            "{id} stored twice"
        );
    }
    for (stream, vs) in &versions {
        let expected: Vec<u64> = (0..vs.len() as u64).collect();
        assert_eq!(vs, &expected, "versions of {stream} not contiguous");
    }
    let mut in_batches = 0;
    for batch in &ledger.batches {
        let present: Vec<bool> = batch
            .events
            .iter()
            .map(|(_, id, _)| stored.contains_key(id))
            .collect();
        if batch.acked {
            assert!(
                present.iter().all(|p| *p),
                "an acknowledged batch lost events"
            );
        } else {
            assert!(
                present.iter().all(|p| *p) || present.iter().all(|p| !*p),
                "a partial batch: {present:?}"
            );
        }
        if present[0] {
            in_batches += batch.events.len();
            // Each stream's part of the batch is contiguous and in order.
            for pair in batch.events.windows(2) {
                let (a, b) = (&stored[&pair[0].1], &stored[&pair[1].1]);
                if a.0 == b.0 {
                    assert_eq!(a.1 + 1, b.1, "a batch's events not consecutive");
                }
            }
        }
    }
    assert_eq!(in_batches, stored.len(), "events stored that no batch sent");
}

async fn crash_rounds(config: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..ROUNDS {
        let mut t = Trellis::start_in(dir.path(), config).await;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                tokio::spawn(writer(
                    t.url.clone(),
                    w + round * WRITERS,
                    Arc::clone(&ledger),
                ))
            })
            .collect();
        let target = ACKED_BEFORE_KILL * (round + 1);
        tokio::time::timeout(Duration::from_secs(120), async {
            while ledger.lock().expect("lock").acked < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("appends make progress");
        t.kill9().await;
        for w in writers {
            w.await.expect("writer");
        }
        let t = Trellis::start_in(dir.path(), config).await;
        let snapshot = {
            let l = ledger.lock().expect("lock");
            Ledger {
                batches: l.batches.clone(),
                acked: l.acked,
            }
        };
        check(&t, &snapshot).await;
        drop(t);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_append_embedded() {
    crash_rounds("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_append_postgres() {
    if !services_enabled("PostgreSQL") {
        return;
    }
    let config = format!(
        "[components.eventstore.default]\ntype = \"postgres\"\nurl = \"{}\"\nschema = \"{}\"\n",
        postgres_url(),
        unique_name("t_crash")
    );
    crash_rounds(&config).await;
}
