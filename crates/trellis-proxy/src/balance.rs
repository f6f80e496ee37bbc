//! Choosing an instance for a request.
//!
//! - **Round robin**: in turn, skipping unavailable instances.
//! - **P2C (power of two choices) on peak EWMA**: two random available instances,
//!   the one with the lower `latency × (in-flight + 1)` wins. Nearly as good as
//!   picking the global best, without the herding that causes.
//! - **Consistent hashing with bounded loads**: the key's owner on the ring, unless it
//!   is unavailable or carries more than `⌈1.25 × (in-flight + 1) / n⌉` requests, in
//!   which case the next instance clockwise. A key stays on its instance while that
//!   instance copes; hot keys spill over instead of overloading it.

use std::sync::Arc;

use tokio::time::Instant;
use trellis_core::config::HashKey;
use trellis_shard::Ring;

use crate::endpoint::Endpoint;

/// How much more than its fair share an instance may carry under hashing.
pub(crate) const LOAD_FACTOR: f64 = 1.25;

/// The hashing key of a request, per the configured source.
pub(crate) fn hash_key<'a, B>(source: &HashKey, req: &'a http::Request<B>) -> Option<&'a [u8]> {
    match source {
        HashKey::Header(name) => req.headers().get(name.as_str()).map(|v| v.as_bytes()),
        HashKey::PathSegment(n) => req
            .uri()
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .nth(*n)
            .map(str::as_bytes),
    }
}

pub(crate) fn round_robin(
    endpoints: &[Arc<Endpoint>],
    counter: usize,
    now: Instant,
) -> Option<Arc<Endpoint>> {
    let n = endpoints.len();
    (0..n)
        .map(|i| &endpoints[(counter + i) % n])
        .find(|e| e.is_available(now))
        .cloned()
}

pub(crate) fn p2c(
    endpoints: &[Arc<Endpoint>],
    rng: &mut fastrand::Rng,
    now: Instant,
) -> Option<Arc<Endpoint>> {
    let available: Vec<&Arc<Endpoint>> = endpoints.iter().filter(|e| e.is_available(now)).collect();
    match available.len() {
        0 => None,
        1 => Some(Arc::clone(available[0])),
        n => {
            let a = rng.usize(..n);
            let b = (a + 1 + rng.usize(..n - 1)) % n;
            let (a, b) = (available[a], available[b]);
            Some(Arc::clone(if a.load() <= b.load() { a } else { b }))
        }
    }
}

/// A ring node: the endpoint, named by its URL.
#[derive(Debug, Clone)]
pub(crate) struct Node(pub(crate) Arc<Endpoint>);

impl AsRef<str> for Node {
    fn as_ref(&self) -> &str {
        &self.0.url
    }
}

pub(crate) fn hashed(ring: &Ring<Node>, key: &[u8], now: Instant) -> Option<Arc<Endpoint>> {
    let available: Vec<&Node> = ring
        .nodes()
        .iter()
        .filter(|n| n.0.is_available(now))
        .collect();
    if available.is_empty() {
        return None;
    }
    let total: u64 = available.iter().map(|n| n.0.in_flight()).sum();
    let bound = (LOAD_FACTOR * (total as f64 + 1.0) / available.len() as f64).ceil() as u64;
    ring.pick(key, |n| n.0.is_available(now) && n.0.in_flight() < bound)
        .or_else(|| ring.pick(key, |n| n.0.is_available(now)))
        .map(|n| Arc::clone(&n.0))
}

#[cfg(test)]
mod test {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| Arc::new(Endpoint::new("t", format!("http://10.0.0.{i}:80")).expect("url")))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_skips_unavailable_instances() {
        let eps = endpoints(3);
        let now = Instant::now();
        eps[1].eject(now, Duration::from_secs(10), Duration::from_secs(10));
        let picks: Vec<String> = (0..4)
            .map(|c| round_robin(&eps, c, now).expect("some").url.clone())
            .collect();
        assert_eq!(
            picks,
            [
                "http://10.0.0.0:80",
                "http://10.0.0.2:80",
                "http://10.0.0.2:80",
                "http://10.0.0.0:80"
            ]
        );
        eps[0].set_healthy(false);
        eps[2].set_healthy(false);
        assert!(round_robin(&eps, 0, now).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_faster_less_busy_instance() {
        let eps = endpoints(2);
        let now = Instant::now();
        eps[0].record(Duration::from_millis(100), false, now);
        eps[1].record(Duration::from_millis(1), false, now);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..20 {
            assert_eq!(
                p2c(&eps, &mut rng, now).expect("some").url,
                "http://10.0.0.1:80"
            );
        }
        // Enough requests queued on the fast one make the slow one cheaper.
        let _busy: Vec<_> = (0..200).map(|_| eps[1].start()).collect();
        assert_eq!(
            p2c(&eps, &mut rng, now).expect("some").url,
            "http://10.0.0.0:80"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hashing_is_sticky_and_spills_over_at_the_bound() {
        let eps = endpoints(4);
        let ring = Ring::new(eps.iter().cloned().map(Node), 64);
        let now = Instant::now();
        let owner = hashed(&ring, b"customer-7", now).expect("owner");
        for _ in 0..10 {
            assert_eq!(
                hashed(&ring, b"customer-7", now).expect("owner").url,
                owner.url
            );
        }
        // Load the owner up to the bound: the key spills to another instance.
        let _busy: Vec<_> = (0..5).map(|_| owner.start()).collect();
        let spill = hashed(&ring, b"customer-7", now).expect("spill");
        assert_ne!(spill.url, owner.url);
        // An ejected owner also hands its keys on.
        drop(_busy);
        owner.eject(now, Duration::from_secs(5), Duration::from_secs(5));
        assert_ne!(
            hashed(&ring, b"customer-7", now).expect("other").url,
            owner.url
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_hashing_keeps_every_instance_under_the_bound() {
        let eps = endpoints(4);
        let ring = Ring::new(eps.iter().cloned().map(Node), 64);
        let now = Instant::now();
        // 100 concurrent requests for 3 hot keys.
        let mut in_flight = Vec::new();
        let mut per: HashMap<String, u64> = HashMap::new();
        for i in 0..100u32 {
            let key = format!("hot-{}", i % 3);
            let e = hashed(&ring, key.as_bytes(), now).expect("some");
            *per.entry(e.url.clone()).or_default() += 1;
            let index = eps.iter().position(|x| x.url == e.url).expect("known");
            in_flight.push(eps[index].start());
        }
        assert!(per.values().all(|n| *n <= 32), "{per:?}");
        assert_eq!(
            per.len(),
            4,
            "three hot keys spread over all four instances: {per:?}"
        );
    }

    #[test]
    fn hash_keys_from_headers_and_path_segments() {
        let req = http::Request::builder()
            .uri("/customers/42/orders")
            .header("x-customer-id", "c9")
            .body(())
            .expect("request");
        assert_eq!(
            hash_key(&HashKey::Header("x-customer-id".into()), &req),
            Some(&b"c9"[..])
        );
        assert_eq!(hash_key(&HashKey::PathSegment(1), &req), Some(&b"42"[..]));
        assert_eq!(hash_key(&HashKey::PathSegment(5), &req), None);
    }
}
