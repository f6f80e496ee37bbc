//! The registry shared through etcd: two sidecars (two registries, two mirrors,
//! origins "a" and "b") on a throwaway etcd (`trellis_core::testing::Etcd`, or
//! `TRELLIS_TEST_ETCD_URL`), each test under its own prefix. Skipped — loudly —
//! only with `TRELLIS_TEST_SERVICES=0`.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::time::{Instant, sleep};
use trellis_coord::detector::Health;
use trellis_coord::etcd::EtcdConfig;
use trellis_coord::registry::etcd::{EtcdMirror, MirrorSettings};
use trellis_coord::registry::{
    Check, Filter, Instance, Registration, Registry, RegistryError, RegistrySettings,
};
use trellis_core::testing::{Etcd, services_enabled, unique_name};

/// The etcd the tests running at the moment share (see `tests/etcd.rs`).
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

/// One test's etcd and prefix.
struct Cluster {
    _etcd: Arc<Etcd>,
    config: EtcdConfig,
}

async fn cluster() -> Option<Cluster> {
    if !services_enabled("etcd") {
        return None;
    }
    let etcd = shared_etcd().await;
    let config = EtcdConfig {
        endpoints: vec![etcd.url().to_owned()],
        prefix: format!("{}/", unique_name("trellis-test/registry")),
        ..EtcdConfig::default()
    };
    Some(Cluster {
        _etcd: etcd,
        config,
    })
}

/// A sidecar: its registry and its mirror.
struct Sidecar {
    registry: Registry,
    mirror: EtcdMirror,
}

impl Cluster {
    async fn sidecar(&self, origin: &str) -> Sidecar {
        self.sidecar_with(origin, MirrorSettings::default()).await
    }

    async fn sidecar_with(&self, origin: &str, settings: MirrorSettings) -> Sidecar {
        let registry = Registry::new(RegistrySettings::default(), None);
        let mirror =
            EtcdMirror::start_with(registry.clone(), self.config.clone(), origin, settings)
                .await
                .expect("start mirror");
        Sidecar { registry, mirror }
    }
}

/// Waits up to `within` for `check` to hold.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

fn seen(r: &Registry, id: &str) -> Option<Instance> {
    r.instance("orders", id)
}

/// Alive for 300 ms without heartbeats, then suspect for a long while.
fn short_ttl(address: &str) -> Registration {
    Registration::new(
        address,
        Check::Ttl {
            ttl: Duration::from_millis(300),
            grace: Duration::from_secs(60),
        },
    )
    .with_metadata("zone", "a")
}

const SOON: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_and_their_health_travel_between_sidecars() {
    let Some(c) = cluster().await else { return };
    let a = c.sidecar("a").await;
    let b = c.sidecar("b").await;

    a.registry
        .register("orders", "o-1", short_ttl("10.0.0.1:80"))
        .expect("register");
    eventually(SOON, "o-1 alive on b", || async {
        seen(&b.registry, "o-1").is_some_and(|i| i.health == Health::Alive)
    })
    .await;
    let on_b = seen(&b.registry, "o-1").expect("o-1 on b");
    assert_eq!(on_b.origin.as_deref(), Some("a"));
    assert_eq!(on_b.address, "10.0.0.1:80");
    assert_eq!(on_b.metadata.get("zone").map(String::as_str), Some("a"));
    assert_eq!(on_b.check, "ttl");
    assert_eq!(
        b.registry
            .instances("orders", Filter::Healthy)
            .instances
            .len(),
        1
    );
    // A's own view is local.
    assert_eq!(seen(&a.registry, "o-1").expect("on a").origin, None);

    // A judges it: no heartbeats, so suspect on A — and on B.
    eventually(SOON, "o-1 suspect on b", || async {
        seen(&b.registry, "o-1").is_some_and(|i| i.health == Health::Suspect)
    })
    .await;
    assert_eq!(
        seen(&a.registry, "o-1").map(|i| i.health),
        Some(Health::Suspect)
    );
    assert!(
        b.registry
            .instances("orders", Filter::Healthy)
            .instances
            .is_empty()
    );
    // B does not judge it, nor take heartbeats for it.
    assert!(matches!(
        b.registry.heartbeat("orders", "o-1"),
        Err(RegistryError::Remote { origin, .. }) if origin == "a"
    ));
    // A heartbeat on A brings it back everywhere.
    a.registry.heartbeat("orders", "o-1").expect("heartbeat");
    eventually(SOON, "o-1 alive again on b", || async {
        seen(&b.registry, "o-1").is_some_and(|i| i.health == Health::Alive)
    })
    .await;

    // B's own instances go the other way; each side lists both.
    b.registry
        .register(
            "orders",
            "o-2",
            Registration::new("10.0.0.2:80", Check::ttl(Duration::from_secs(30))),
        )
        .expect("register");
    eventually(SOON, "o-2 on a", || async {
        seen(&a.registry, "o-2").is_some_and(|i| i.origin.as_deref() == Some("b"))
    })
    .await;
    let (_, services) = a.registry.services();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].instances, 2);

    // Deregistered on A: gone on B.
    a.registry.deregister("orders", "o-1").expect("deregister");
    eventually(SOON, "o-1 gone from b", || async {
        seen(&b.registry, "o-1").is_none()
    })
    .await;
    assert!(seen(&b.registry, "o-2").is_some());

    a.mirror.stop().await.expect("stop a");
    b.mirror.stop().await.expect("stop b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_query_on_one_sidecar_wakes_when_another_registers() {
    let Some(c) = cluster().await else { return };
    let a = c.sidecar("a").await;
    let b = c.sidecar("b").await;

    let before = b.registry.instances("orders", Filter::Healthy);
    assert!(before.instances.is_empty());
    let waiter = {
        let registry = b.registry.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let answer = registry
                .wait(
                    "orders",
                    before.index,
                    Duration::from_secs(30),
                    Filter::Healthy,
                )
                .await;
            (answer, started.elapsed())
        })
    };
    sleep(Duration::from_millis(200)).await;
    a.registry
        .register(
            "orders",
            "o-1",
            Registration::new("10.0.0.1:80", Check::ttl(Duration::from_secs(30))),
        )
        .expect("register");
    let (answer, waited) = waiter.await.expect("waiter");
    assert!(waited < Duration::from_secs(10), "woke after {waited:?}");
    assert!(answer.index > before.index);
    assert_eq!(answer.instances.len(), 1);
    assert_eq!(answer.instances[0].id, "o-1");
    assert_eq!(answer.instances[0].origin.as_deref(), Some("a"));

    a.mirror.stop().await.expect("stop a");
    b.mirror.stop().await.expect("stop b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_mirror_removes_its_instances_at_once() {
    let Some(c) = cluster().await else { return };
    let a = c.sidecar("a").await;
    let b = c.sidecar("b").await;
    a.registry
        .register(
            "orders",
            "o-1",
            Registration::new("10.0.0.1:80", Check::ttl(Duration::from_secs(30))),
        )
        .expect("register");
    b.registry
        .register(
            "orders",
            "o-2",
            Registration::new("10.0.0.2:80", Check::ttl(Duration::from_secs(30))),
        )
        .expect("register");
    eventually(SOON, "each sees the other's", || async {
        seen(&b.registry, "o-1").is_some() && seen(&a.registry, "o-2").is_some()
    })
    .await;

    // The session lease is 10 s: gone well before that means it was revoked.
    let stopped = Instant::now();
    a.mirror.stop().await.expect("stop a");
    eventually(Duration::from_secs(3), "o-1 gone from b", || async {
        seen(&b.registry, "o-1").is_none()
    })
    .await;
    assert!(stopped.elapsed() < Duration::from_secs(5));
    // A keeps its own instance, and forgets B's (nothing keeps it fresh).
    assert!(seen(&a.registry, "o-1").is_some());
    assert!(seen(&a.registry, "o-2").is_none());
    assert!(seen(&b.registry, "o-2").is_some());

    // A new mirror for A publishes it again.
    let again = EtcdMirror::start(a.registry.clone(), c.config.clone(), "a")
        .await
        .expect("restart a");
    eventually(SOON, "o-1 back on b, o-2 back on a", || async {
        seen(&b.registry, "o-1").is_some() && seen(&a.registry, "o-2").is_some()
    })
    .await;
    again.stop().await.expect("stop a again");
    b.mirror.stop().await.expect("stop b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_sidecar_is_forgotten_after_its_session_ttl() {
    let Some(c) = cluster().await else { return };
    let short = MirrorSettings {
        session_ttl: Duration::from_secs(2),
        ..MirrorSettings::default()
    };
    let a = c.sidecar_with("a", short.clone()).await;
    let b = c.sidecar_with("b", short).await;
    a.registry
        .register(
            "orders",
            "o-1",
            Registration::new("10.0.0.1:80", Check::ttl(Duration::from_secs(60))),
        )
        .expect("register");
    eventually(SOON, "o-1 on b", || async {
        seen(&b.registry, "o-1").is_some()
    })
    .await;

    // Sessions are kept alive: still there after several TTLs.
    sleep(Duration::from_secs(5)).await;
    assert!(seen(&b.registry, "o-1").is_some());

    // A "crashes": its mirror stops without revoking its session.
    let Sidecar { registry, mirror } = a;
    drop(mirror);
    let died = Instant::now();
    eventually(Duration::from_secs(10), "o-1 gone from b", || async {
        seen(&b.registry, "o-1").is_none()
    })
    .await;
    // etcd grants at least what was asked (and checks expiry every 500 ms).
    assert!(
        died.elapsed() >= Duration::from_millis(1000),
        "gone after {:?}",
        died.elapsed()
    );
    drop(registry);
    b.mirror.stop().await.expect("stop b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_on_another_sidecar_takes_an_instance_over() {
    let Some(c) = cluster().await else { return };
    let a = c.sidecar("a").await;
    let b = c.sidecar("b").await;
    let reg = |address: &str| Registration::new(address, Check::ttl(Duration::from_secs(30)));
    a.registry
        .register("orders", "o-1", reg("10.0.0.1:80"))
        .expect("register");
    eventually(SOON, "o-1 on b", || async {
        seen(&b.registry, "o-1").is_some()
    })
    .await;

    // The app moved to B's host and registers there.
    let local = b
        .registry
        .register("orders", "o-1", reg("10.0.0.9:80"))
        .expect("take over");
    assert_eq!(local.origin, None);
    eventually(SOON, "a sees b's o-1", || async {
        seen(&a.registry, "o-1")
            .is_some_and(|i| i.origin.as_deref() == Some("b") && i.address == "10.0.0.9:80")
    })
    .await;
    // A no longer judges it: its old app's heartbeats are refused.
    assert!(matches!(
        a.registry.heartbeat("orders", "o-1"),
        Err(RegistryError::Remote { origin, .. }) if origin == "b"
    ));
    // And B keeps it (A did not write over it, nor delete it).
    sleep(Duration::from_millis(500)).await;
    let on_b = seen(&b.registry, "o-1").expect("on b");
    assert_eq!(on_b.origin, None);
    assert_eq!(on_b.address, "10.0.0.9:80");

    // Deregistered on B: gone on A too.
    b.registry.deregister("orders", "o-1").expect("deregister");
    eventually(SOON, "o-1 gone from a", || async {
        seen(&a.registry, "o-1").is_none()
    })
    .await;

    a.mirror.stop().await.expect("stop a");
    b.mirror.stop().await.expect("stop b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_is_replaced_and_everything_published_again() {
    let Some(c) = cluster().await else { return };
    let a = c.sidecar("a").await;
    let b = c.sidecar("b").await;
    for id in ["o-1", "o-2"] {
        a.registry
            .register(
                "orders",
                id,
                Registration::new("10.0.0.1:80", Check::ttl(Duration::from_secs(60))),
            )
            .expect("register");
    }
    eventually(SOON, "both on b", || async {
        seen(&b.registry, "o-1").is_some() && seen(&b.registry, "o-2").is_some()
    })
    .await;

    // Revoke A's session lease behind its back: etcd deletes its keys.
    let mut etcd = etcd_client::Client::connect(&c.config.endpoints, None)
        .await
        .expect("connect");
    let key = format!("{}orders/o-1", a.mirror.prefix());
    let lease = etcd.get(key.as_str(), None).await.expect("get").kvs()[0].lease();
    assert_ne!(lease, 0);
    etcd.lease_revoke(lease).await.expect("revoke");

    // A notices, takes a new session and publishes both again.
    eventually(SOON, "republished on a new lease", || {
        let mut etcd = etcd.clone();
        let key = key.clone();
        async move {
            etcd.get(key.as_str(), None)
                .await
                .ok()
                .and_then(|r| r.kvs().first().map(|kv| kv.lease()))
                .is_some_and(|l| l != 0 && l != lease)
        }
    })
    .await;
    eventually(SOON, "both on b again", || async {
        seen(&b.registry, "o-1").is_some() && seen(&b.registry, "o-2").is_some()
    })
    .await;
    // Still judged by A and published by it: a change travels.
    a.registry.deregister("orders", "o-2").expect("deregister");
    eventually(SOON, "o-2 gone from b", || async {
        seen(&b.registry, "o-2").is_none()
    })
    .await;
    assert!(seen(&b.registry, "o-1").is_some());

    a.mirror.stop().await.expect("stop a");
    b.mirror.stop().await.expect("stop b");
}
