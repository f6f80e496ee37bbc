//! The coordination contract against the etcd backend, on a throwaway etcd
//! (`trellis_core::testing::Etcd`, or `TRELLIS_TEST_ETCD_URL`). Skipped — loudly —
//! only with `TRELLIS_TEST_SERVICES=0`.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use trellis_coord::contract::Harness;
use trellis_coord::etcd::{EtcdConfig, EtcdCoordinator};
use trellis_coord::{CoordError, Coordinator, Kind, Name};
use trellis_core::testing::{Etcd, services_enabled, unique_name};

/// The etcd the tests running at the moment share. Each harness holds it, so the
/// server is stopped (and its directory removed) when the last test using it
/// ends — a `static` holding it would never be dropped, leaving the process behind.
static ETCD: Mutex<Weak<Etcd>> = Mutex::new(Weak::new());

async fn shared_etcd() -> Arc<Etcd> {
    tokio::task::spawn_blocking(|| {
        let mut shared = ETCD.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(etcd) = shared.upgrade() {
            return etcd;
        }
        let etcd = Arc::new(Etcd::start());
        *shared = Arc::downgrade(&etcd);
        etcd
    })
    .await
    .expect("start etcd")
}

struct EtcdHarness {
    etcd: Arc<Etcd>,
    /// This test's own keys.
    prefix: String,
}

impl EtcdHarness {
    fn config(&self) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.etcd.url().to_owned()],
            prefix: self.prefix.clone(),
            ..EtcdConfig::default()
        }
    }
}

#[async_trait]
impl Harness for EtcdHarness {
    async fn open(&self) -> Arc<dyn Coordinator> {
        Arc::new(
            EtcdCoordinator::connect(self.config())
                .await
                .expect("connect to etcd"),
        )
    }
}

async fn harness() -> Option<EtcdHarness> {
    if !services_enabled("etcd") {
        return None;
    }
    Some(EtcdHarness {
        etcd: shared_etcd().await,
        prefix: format!("{}/", unique_name("trellis-test/coord")),
    })
}

trellis_coord::coord_contract!(harness());

// === etcd specifics ===

/// TTLs are whole seconds, at least etcd's minimum, and reported as granted; a
/// holder extending to the TTL it was granted keeps its lease (a keep-alive), and
/// extending to another one moves it to a new lease — both keep the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttls_are_granted_in_whole_seconds() {
    let Some(h) = harness().await else { return };
    let c = h.open().await;
    let n = Name::new("whole-seconds").expect("name");
    let a = c
        .acquire(&n, "a", Duration::from_millis(1500), Duration::ZERO)
        .await
        .expect("acquire");
    assert!(a.ttl >= Duration::from_secs(2), "{:?}", a.ttl);
    assert_eq!(a.ttl.subsec_nanos(), 0, "whole seconds");
    let kept = c
        .extend(&n, "a", a.fencing_token, a.ttl)
        .await
        .expect("extend to the granted ttl");
    assert_eq!((kept.ttl, kept.fencing_token), (a.ttl, a.fencing_token));
    let longer = c
        .extend(&n, "a", a.fencing_token, Duration::from_secs(30))
        .await
        .expect("extend to another ttl");
    assert_eq!(longer.ttl, Duration::from_secs(30));
    assert_eq!(longer.fencing_token, a.fencing_token);
    let held = c.lock_holder(&n).await.expect("holder").expect("held");
    assert_eq!(held.ttl, Duration::from_secs(30));
    assert!(held.expires_at <= longer.expires_at + Duration::from_secs(1));
    assert!(
        held.remaining() > Duration::from_secs(25),
        "{:?}",
        held.remaining()
    );
    c.release(&n, "a", a.fencing_token).await.expect("release");
    assert_eq!(
        c.latest_token(Kind::Lock, &n).await.expect("latest"),
        a.fencing_token
    );
    c.close().await.expect("close");
}

/// An unreachable cluster is `Unavailable` (transient), not a hang or a panic; a
/// bad config is refused before connecting.
#[tokio::test]
async fn unreachable_etcd_is_unavailable() {
    let dead = EtcdConfig {
        // Nothing listens on port 9 (discard) on loopback here.
        endpoints: vec!["http://127.0.0.1:9".to_owned()],
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(500),
        ..EtcdConfig::default()
    };
    match EtcdCoordinator::connect(dead).await {
        Err(e @ CoordError::Unavailable { .. }) => assert!(e.is_transient()),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let no_endpoints = EtcdConfig {
        endpoints: Vec::new(),
        ..EtcdConfig::default()
    };
    assert!(matches!(
        EtcdCoordinator::connect(no_endpoints).await,
        Err(CoordError::Backend { .. })
    ));
}
