//! Pub/sub load benchmark, peers in the same run.
//!
//! 1. Publish throughput and latency — 1 KiB events, `BENCH_CONCURRENCY` concurrent
//!    publishers, each waiting for its acknowledgement:
//!    - Trellis embedded (fsync, group commit) and (async), through the Rust API;
//!    - Trellis embedded (fsync) through the sidecar's HTTP API (`trellis up`);
//!    - NATS JetStream (file storage, running locally) with `async-nats`;
//!    - Trellis over NATS, and over Redis, against `async-nats` / `redis` used directly.
//! 2. End-to-end latency, publish → consumer, at a steady `BENCH_RATE` msgs/s:
//!    Trellis embedded vs NATS JetStream.
//!
//! ```text
//! cargo bench -p trellis-cli --bench pubsub_load
//! BENCH_SECONDS=10 BENCH_CONCURRENCY=64 cargo bench -p trellis-cli --bench pubsub_load
//! ```

#[path = "support/load.rs"]
mod load;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use load::{Outcome, op, start_sidecar};
use tokio::time::Instant;
use trellis_pubsub::event::{CloudEvent, Data};
use trellis_pubsub::{PubSub, SubscriptionSettings};

const BIN: &str = env!("CARGO_BIN_EXE_trellis");
const EVENT_DATA: usize = 1024;

struct Settings {
    seconds: u64,
    concurrency: usize,
    rate: u64,
    nats_url: String,
    redis_url: String,
}

impl Settings {
    fn from_env() -> Self {
        let var = load::knob;
        Self {
            seconds: load::number("BENCH_SECONDS", "5"),
            concurrency: load::number("BENCH_CONCURRENCY", "16"),
            rate: load::number("BENCH_RATE", "1000"),
            nats_url: var("TRELLIS_TEST_NATS_URL", "nats://127.0.0.1:4222"),
            redis_url: var("TRELLIS_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
        }
    }
}

/// 1 KiB of JSON data: `{"pad":"xxx…"}`.
fn data() -> String {
    format!("{{\"pad\":\"{}\"}}", "x".repeat(EVENT_DATA - 10))
}

fn event(data: &str) -> CloudEvent {
    let raw = serde_json::value::RawValue::from_string(data.to_owned()).expect("json");
    CloudEvent::new("/bench", "bench.event", Some(Data::Json(raw)))
}

/// Publish load through the `PubSub` trait.
async fn api_publish(settings: &Settings, pubsub: Arc<dyn PubSub>, topic: &str) -> Outcome {
    let data: Arc<str> = Arc::from(data());
    let topic: Arc<str> = Arc::from(topic);
    load::drive(
        settings.seconds,
        settings.concurrency,
        op(move |_, _| {
            let (pubsub, data, topic) =
                (Arc::clone(&pubsub), Arc::clone(&data), Arc::clone(&topic));
            async move { pubsub.publish(&topic, vec![event(&data)]).await.is_ok() }
        }),
    )
    .await
}

async fn embedded(durability: &str) -> (Arc<dyn PubSub>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config: trellis_core::config::EmbeddedPubSub =
        toml_component(&format!("durability = \"{durability}\""));
    let pubsub = trellis_pubsub::open(
        "bench",
        &trellis_core::config::PubSubComponent::Embedded(config),
        dir.path(),
    )
    .await
    .expect("open embedded");
    (pubsub, dir)
}

fn toml_component<T: serde::de::DeserializeOwned>(text: &str) -> T {
    toml::from_str(text).expect("component config")
}

/// Publish load over the sidecar's HTTP API.
async fn http_publish(settings: &Settings) -> Outcome {
    let sidecar = start_sidecar("").await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(settings.concurrency)
        .build()
        .expect("client");
    let url = format!("{}/v1/publish/default/bench", sidecar.url);
    let body = Bytes::from(data());
    load::drive(
        settings.seconds,
        settings.concurrency,
        op(move |_, _| {
            let request = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send();
            async move { matches!(request.await, Ok(r) if r.status() == 201) }
        }),
    )
    .await
}

async fn nats_context(settings: &Settings) -> async_nats::jetstream::Context {
    let client = async_nats::connect(&settings.nats_url)
        .await
        .expect("connect to NATS");
    async_nats::jetstream::new(client)
}

/// A file-storage stream with one subject, deleted when the benchmark ends.
async fn nats_stream(js: &async_nats::jetstream::Context, name: &str) -> String {
    let subject = format!("bench.{name}");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("create stream");
    subject
}

/// NATS JetStream used directly: publish with a `Nats-Msg-Id` (for dedupe, as
/// Trellis does) and wait for the PubAck.
async fn nats_publish(settings: &Settings) -> Outcome {
    let js = nats_context(settings).await;
    let name = trellis_core::testing::unique_name("BENCH");
    let subject = nats_stream(&js, &name).await;
    let payload = event(&data()).encode();
    let outcome = load::drive(
        settings.seconds,
        settings.concurrency,
        op({
            let js = js.clone();
            move |w, i| {
                let (js, subject, payload) = (js.clone(), subject.clone(), payload.clone());
                async move {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("{w}-{i}").as_str());
                    match js.publish_with_headers(subject, headers, payload).await {
                        Ok(ack) => ack.await.is_ok(),
                        Err(_) => false,
                    }
                }
            }
        }),
    )
    .await;
    let _ = js.delete_stream(&name).await;
    outcome
}

/// Trellis's NATS backend on the same server.
async fn trellis_nats_publish(settings: &Settings) -> Outcome {
    let config = trellis_core::config::NatsPubSub {
        url: settings.nats_url.clone(),
        stream_prefix: trellis_core::testing::unique_name("bench"),
        ..Default::default()
    };
    let pubsub: Arc<dyn PubSub> = trellis_pubsub::nats::NatsPubSub::connect(&config)
        .await
        .expect("connect");
    let outcome = api_publish(settings, Arc::clone(&pubsub), "bench").await;
    let _ = pubsub.close().await;
    outcome
}

/// Redis Streams used directly: XADD of the encoded event.
async fn redis_publish(settings: &Settings) -> Outcome {
    let client = redis::Client::open(settings.redis_url.as_str()).expect("redis url");
    let conn = client
        .get_connection_manager()
        .await
        .expect("connect to Redis");
    let key = trellis_core::testing::unique_name("bench:raw");
    let payload = event(&data()).encode().to_vec();
    let outcome = load::drive(
        settings.seconds,
        settings.concurrency,
        op({
            let key = key.clone();
            move |_, _| {
                let (mut conn, key, payload) = (conn.clone(), key.clone(), payload.clone());
                async move {
                    redis::cmd("XADD")
                        .arg(&key)
                        .arg("*")
                        .arg("e")
                        .arg(payload)
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok()
                }
            }
        }),
    )
    .await;
    let mut conn = client.get_connection_manager().await.expect("connect");
    let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
    outcome
}

/// Trellis's Redis backend on the same server.
async fn trellis_redis_publish(settings: &Settings) -> Outcome {
    let prefix = trellis_core::testing::unique_name("bench");
    let config = trellis_core::config::RedisPubSub {
        url: settings.redis_url.clone(),
        key_prefix: Some(format!("{prefix}:")),
        ..Default::default()
    };
    let pubsub: Arc<dyn PubSub> = trellis_pubsub::redis::RedisPubSub::connect("bench", &config)
        .await
        .expect("connect");
    let outcome = api_publish(settings, Arc::clone(&pubsub), "bench").await;
    let _ = pubsub.close().await;
    let client = redis::Client::open(settings.redis_url.as_str()).expect("redis url");
    let mut conn = client.get_connection_manager().await.expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    for key in keys {
        let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
    }
    outcome
}

// === end-to-end latency ===

/// Publishes at `rate` for `seconds`, stamping each event with the time since `epoch`;
/// the consumer records `now - stamp`.
struct E2e {
    p50_us: u64,
    p99_us: u64,
    received: u64,
}

fn stamp(epoch: Instant) -> String {
    format!(
        "{{\"t\":{},\"pad\":\"{}\"}}",
        epoch.elapsed().as_nanos(),
        "x".repeat(EVENT_DATA - 40)
    )
}

fn latency_of(json: &[u8], epoch: Instant) -> u64 {
    let event: serde_json::Value = serde_json::from_slice(json).expect("event json");
    let data = event.get("data").cloned().unwrap_or(event);
    let t = data["t"].as_u64().expect("stamp") as u128;
    ((epoch.elapsed().as_nanos() - t) / 1000).max(1) as u64
}

async fn paced(
    settings: &Settings,
    mut publish: impl FnMut(String) -> futures_util::future::BoxFuture<'static, ()>,
    epoch: Instant,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / settings.rate.max(1) as u32);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let until = Instant::now() + Duration::from_secs(settings.seconds);
    while Instant::now() < until {
        ticker.tick().await;
        tokio::spawn(publish(stamp(epoch)));
    }
}

async fn e2e_embedded(settings: &Settings) -> E2e {
    let (pubsub, _dir) = embedded("fsync").await;
    let epoch = Instant::now();
    let consumer = {
        let pubsub = Arc::clone(&pubsub);
        tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let s = SubscriptionSettings::default();
            loop {
                let batch = pubsub
                    .pull("e2e", "g", &s, 100, Duration::from_millis(500))
                    .await
                    .expect("pull");
                if batch.is_empty() {
                    return hist;
                }
                for d in &batch {
                    hist.record(latency_of(&d.event, epoch)).expect("record");
                }
                let ids: Vec<String> = batch.into_iter().map(|d| d.ack_id).collect();
                pubsub.ack("g", &ids).await.expect("ack");
            }
        })
    };
    let publisher = Arc::clone(&pubsub);
    paced(
        settings,
        move |data| {
            let p = Arc::clone(&publisher);
            Box::pin(async move {
                let raw = serde_json::value::RawValue::from_string(data).expect("json");
                let _ = p
                    .publish(
                        "e2e",
                        vec![CloudEvent::new("/bench", "bench", Some(Data::Json(raw)))],
                    )
                    .await;
            })
        },
        epoch,
    )
    .await;
    let hist = consumer.await.expect("consumer");
    let _ = pubsub.close().await;
    E2e {
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        received: hist.len(),
    }
}

async fn e2e_nats(settings: &Settings) -> E2e {
    let js = nats_context(settings).await;
    let name = trellis_core::testing::unique_name("E2E");
    let subject = nats_stream(&js, &name).await;
    let stream = js.get_stream(&name).await.expect("stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("g".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let epoch = Instant::now();
    let received = tokio::spawn(async move {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        let mut messages = consumer.messages().await.expect("messages");
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(500), messages.next()).await
        {
            let message = message.expect("message");
            hist.record(latency_of(&message.payload, epoch))
                .expect("record");
            message.ack().await.expect("ack");
        }
        hist
    });
    let publisher = js.clone();
    paced(
        settings,
        move |data| {
            let (js, subject) = (publisher.clone(), subject.clone());
            Box::pin(async move {
                if let Ok(ack) = js.publish(subject, Bytes::from(data)).await {
                    let _ = ack.await;
                }
            })
        },
        epoch,
    )
    .await;
    let hist = received.await.expect("consumer");
    let _ = js.delete_stream(&name).await;
    E2e {
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        received: hist.len(),
    }
}

// === report ===

fn cells(o: &Outcome) -> String {
    format!(
        "{:>10.0} {:>9} {:>9} {:>6}",
        o.ops_per_sec, o.p50_us, o.p99_us, o.errors
    )
}

fn row(name: &str, o: &Outcome, peer: Option<(&str, &Outcome)>) {
    let ratio = peer.map_or(String::new(), |(peer, p)| {
        format!("  {:.2}x {peer}", o.ops_per_sec / p.ops_per_sec)
    });
    println!("{name:<38} {}{ratio}", cells(o));
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let settings = Settings::from_env();
    println!(
        "pub/sub publish: 1 KiB events, {} concurrent publishers, {}s per scenario, each publish acknowledged",
        settings.concurrency, settings.seconds
    );
    println!(
        "{:<38} {:>10} {:>9} {:>9} {:>6}",
        "scenario", "msgs/s", "p50 µs", "p99 µs", "errors"
    );

    let nats = nats_publish(&settings).await;
    row("NATS JetStream (file), async-nats", &nats, None);
    let (pubsub, _dir) = embedded("fsync").await;
    let fsync = api_publish(&settings, Arc::clone(&pubsub), "bench").await;
    let _ = pubsub.close().await;
    row(
        "Trellis embedded, fsync (Rust API)",
        &fsync,
        Some(("NATS", &nats)),
    );
    let (pubsub, _dir) = embedded("async").await;
    let not_synced = api_publish(&settings, Arc::clone(&pubsub), "bench").await;
    let _ = pubsub.close().await;
    row(
        "Trellis embedded, async (Rust API)",
        &not_synced,
        Some(("NATS", &nats)),
    );
    let http = http_publish(&settings).await;
    row(
        "Trellis embedded, fsync (HTTP sidecar)",
        &http,
        Some(("NATS", &nats)),
    );
    let over_nats = trellis_nats_publish(&settings).await;
    row(
        "Trellis over NATS (Rust API)",
        &over_nats,
        Some(("async-nats", &nats)),
    );
    let redis = redis_publish(&settings).await;
    row("Redis Streams XADD, redis-rs", &redis, None);
    let over_redis = trellis_redis_publish(&settings).await;
    row(
        "Trellis over Redis (Rust API)",
        &over_redis,
        Some(("redis-rs", &redis)),
    );

    println!();
    println!(
        "end-to-end latency, publish → consumer, {} msgs/s for {}s",
        settings.rate, settings.seconds
    );
    println!(
        "{:<38} {:>10} {:>9} {:>9}",
        "scenario", "received", "p50 µs", "p99 µs"
    );
    let e = e2e_nats(&settings).await;
    println!(
        "{:<38} {:>10} {:>9} {:>9}",
        "NATS JetStream (file), async-nats", e.received, e.p50_us, e.p99_us
    );
    let t = e2e_embedded(&settings).await;
    println!(
        "{:<38} {:>10} {:>9} {:>9}  p50 {:.2}x NATS",
        "Trellis embedded, fsync (Rust API)",
        t.received,
        t.p50_us,
        t.p99_us,
        t.p50_us as f64 / e.p50_us.max(1) as f64
    );
}
