//! Crash test: `kill -9` the real binary under concurrent PUTs, restart it, and check
//! that every acknowledged write is there — value and etag — and nothing is torn.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use support::{Trellis, client};

const WRITERS: usize = 16;
const KEYS_PER_WRITER: usize = 8;
const ROUNDS: usize = 3;
/// Acknowledged writes per round before the kill, so the kill lands mid-load.
const ACKS_BEFORE_KILL: usize = 400;

/// What a writer knows about one key.
#[derive(Debug, Default, Clone)]
struct KeyLog {
    /// The last write that got a 204: (sequence, etag).
    acked: Option<(u64, String)>,
    /// A write sent after it, whose answer never came (the kill).
    in_flight: Option<u64>,
}

/// The value of write `seq` to `key`: self-describing, 1–17 KiB, with a checksum,
/// so a torn or mixed-up value can't pass for a real one.
fn payload(key: &str, seq: u64) -> Vec<u8> {
    let len = 1024 + (seq as usize * 7919 + key.len() * 104_729) % (16 * 1024);
    let mut body = format!("{key}|{seq}|{len}|").into_bytes();
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ key.len() as u64;
    while body.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.push(b'a' + (x % 26) as u8);
    }
    let sum: u32 = body.iter().map(|&b| u32::from(b)).sum();
    body.extend_from_slice(format!("|{sum:010}").as_bytes());
    body
}

/// The sequence number of a stored value, after checking it is exactly
/// `payload(key, seq)`.
fn verify(key: &str, stored: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(stored);
    let seq: u64 = text
        .split('|')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{key}: unparseable value ({} bytes)", stored.len()));
    assert!(
        stored == payload(key, seq).as_slice(),
        "{key}: torn or foreign value for seq {seq}"
    );
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs: Arc<Mutex<HashMap<String, KeyLog>>> = Arc::default();
    let mut next_seq = 0u64;
    let mut total_acked = 0;

    for round in 0..ROUNDS {
        let mut t = Trellis::start_in(dir.path(), "").await;
        let snapshot = logs.lock().expect("lock").clone();
        check(&t, &snapshot, round).await;

        let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (url, logs, acked) = (t.url.clone(), Arc::clone(&logs), Arc::clone(&acked));
            let first_seq = next_seq + (w as u64) * 1_000_000;
            writers.push(tokio::spawn(async move {
                let client = client();
                for i in 0.. {
                    let seq = first_seq + i;
                    let key = format!("w{w}/k{}", seq % KEYS_PER_WRITER as u64);
                    logs.lock()
                        .expect("lock")
                        .entry(key.clone())
                        .or_default()
                        .in_flight = Some(seq);
                    let sent = client
                        .put(format!("{url}/v1/state/default/{key}"))
                        .body(payload(&key, seq))
                        .send()
                        .await;
                    let Ok(response) = sent else { return };
                    if response.status() != 204 {
                        return;
                    }
                    let etag = response.headers()["etag"]
                        .to_str()
                        .expect("etag")
                        .to_owned();
                    let mut logs = logs.lock().expect("lock");
                    let log = logs.get_mut(&key).expect("logged");
                    log.acked = Some((seq, etag));
                    log.in_flight = None;
                    acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }));
        }
        next_seq += WRITERS as u64 * 1_000_000;

        // Kill once enough writes are acknowledged, with every writer still busy.
        while acked.load(std::sync::atomic::Ordering::SeqCst) < ACKS_BEFORE_KILL {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            assert!(
                !writers.iter().any(|w| w.is_finished()),
                "a writer stopped early:\n{}",
                t.stderr()
            );
        }
        t.kill9().await;
        for w in writers {
            w.await.expect("writer");
        }
        total_acked += acked.load(std::sync::atomic::Ordering::SeqCst);
    }

    let t = Trellis::start_in(dir.path(), "").await;
    let snapshot = logs.lock().expect("lock").clone();
    check(&t, &snapshot, ROUNDS).await;
    assert!(total_acked >= ROUNDS * ACKS_BEFORE_KILL);
}

/// Every key holds its last acknowledged write (same etag) or the write that was in
/// flight at the kill; never anything older, never anything torn.
async fn check(t: &Trellis, logs: &HashMap<String, KeyLog>, round: usize) {
    let client = client();
    for (key, log) in logs {
        let response = client
            .get(t.url(&format!("/v1/state/default/{key}")))
            .send()
            .await
            .expect("get");
        let status = response.status().as_u16();
        let etag = response
            .headers()
            .get("etag")
            .map(|v| v.to_str().expect("etag").to_owned());
        let body = response.bytes().await.expect("body");
        match (&log.acked, status) {
            (None, 404) => {}
            (Some((seq, _)), 404) => panic!("round {round}: {key}: acknowledged write {seq} lost"),
            (_, 200) => {
                let stored = verify(key, &body);
                let matches_ack = log.acked.as_ref().is_some_and(|(seq, acked_etag)| {
                    stored == *seq && etag.as_deref() == Some(acked_etag.as_str())
                });
                let is_in_flight = log.in_flight == Some(stored);
                assert!(
                    matches_ack || is_in_flight,
                    "round {round}: {key}: holds write {stored} (etag {etag:?}); acked {:?}, in flight {:?}",
                    log.acked,
                    log.in_flight
                );
            }
            (_, other) => panic!("round {round}: {key}: status {other}"),
        }
    }
}
