//! Registry behaviour on paused time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::{advance, sleep};

use super::*;
use crate::detector::{Health, PhiSettings};

const TTL: Duration = Duration::from_secs(10);

fn registry() -> Registry {
    Registry::new(RegistrySettings::default(), None)
}

fn ttl(address: &str) -> Registration {
    Registration::new(address, Check::ttl(TTL)).deregister_after(Duration::from_secs(30))
}

fn health(r: &Registry, id: &str) -> Option<Health> {
    r.instance("orders", id).map(|i| i.health)
}

/// The events received so far.
fn drain(events: &mut tokio::sync::broadcast::Receiver<Event>) -> impl Iterator<Item = Event> {
    std::iter::from_fn(|| events.try_recv().ok())
        .collect::<Vec<_>>()
        .into_iter()
}

/// Lets the driver run after time moved.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeat_loss_goes_suspect_then_dead_then_deregistered() {
    let r = registry();
    let mut events = r.subscribe();
    r.register("orders", "a", ttl("10.0.0.1:80"))
        .expect("register");
    r.register("orders", "b", ttl("10.0.0.2:80"))
        .expect("register");
    // `b` keeps heartbeating; `a` goes silent.
    for _ in 0..5 {
        sleep(Duration::from_secs(5)).await;
        r.heartbeat("orders", "b").expect("heartbeat");
        settle().await;
    }
    // 25 s of silence: suspect at 10 s, dead at 20 s.
    assert_eq!(health(&r, "a"), Some(Health::Dead));
    assert_eq!(health(&r, "b"), Some(Health::Alive));
    let healthy = r.instances("orders", Filter::Healthy);
    assert_eq!(healthy.instances.len(), 1);
    assert_eq!(healthy.instances[0].id, "b");
    let dead = r.instance("orders", "a").expect("still listed while dead");
    assert!(dead.deregister_at.is_some());
    // Deregistered 30 s after it died.
    for _ in 0..7 {
        sleep(Duration::from_secs(5)).await;
        r.heartbeat("orders", "b").expect("heartbeat");
        settle().await;
    }
    assert_eq!(health(&r, "a"), None);
    assert_eq!(
        r.heartbeat("orders", "a"),
        Err(RegistryError::UnknownInstance {
            service: "orders".into(),
            id: "a".into()
        })
    );
    let seen: Vec<_> = drain(&mut events)
        .filter(|e| e.id == "a")
        .map(|e| e.change.label())
        .collect();
    assert_eq!(seen, ["registered", "suspect", "dead", "deregistered"]);
}

#[tokio::test(start_paused = true)]
async fn a_suspect_instance_that_heartbeats_is_alive_again() {
    let r = registry();
    r.register("orders", "a", ttl("x:1")).expect("register");
    sleep(TTL + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(health(&r, "a"), Some(Health::Suspect));
    let i = r.heartbeat("orders", "a").expect("heartbeat");
    assert_eq!(i.health, Health::Alive);
}

#[tokio::test(start_paused = true)]
async fn blocking_queries_wake_on_change_and_time_out_otherwise() {
    let r = registry();
    let first = r.register("orders", "a", ttl("x:1")).expect("register");
    let index = r.instances("orders", Filter::All).index;
    assert_eq!(first.modify_index, index);

    // Nothing changes: the query returns after `wait` with the same index.
    let start = tokio::time::Instant::now();
    r.heartbeat("orders", "a").expect("heartbeat");
    let same = r
        .wait("orders", index, Duration::from_secs(3), Filter::All)
        .await;
    assert_eq!(same.index, index);
    assert!(start.elapsed() >= Duration::from_secs(3));

    // A registration 2 s later wakes it at once.
    let r2 = r.clone();
    let writer = tokio::spawn(async move {
        sleep(Duration::from_secs(2)).await;
        r2.register("orders", "b", ttl("x:2")).expect("register");
    });
    let start = tokio::time::Instant::now();
    let changed = r
        .wait("orders", index, Duration::from_secs(60), Filter::All)
        .await;
    assert!(changed.index > index);
    assert_eq!(changed.instances.len(), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    writer.await.expect("writer");

    // A service nobody registered yet: the query wakes when it appears.
    let none = r.instances("billing", Filter::All);
    assert!(none.instances.is_empty() && none.index >= changed.index);
    let r3 = r.clone();
    let writer = tokio::spawn(async move {
        sleep(Duration::from_secs(1)).await;
        r3.register("billing", "b1", ttl("x:9")).expect("register");
    });
    let appeared = r
        .wait("billing", none.index, Duration::from_secs(60), Filter::All)
        .await;
    assert_eq!(appeared.instances.len(), 1);
    writer.await.expect("writer");

    // A change to another service does not wake it.
    let index = changed.index;
    r.register("payments", "p", ttl("x:3")).expect("register");
    let same = r
        .wait("orders", index, Duration::from_secs(1), Filter::All)
        .await;
    assert_eq!(same.index, index);

    // Index 0, or one above anything handed out (the registry restarted), answers
    // at once.
    let start = tokio::time::Instant::now();
    r.wait("orders", 0, Duration::from_secs(60), Filter::All)
        .await;
    r.wait("orders", 1_000_000, Duration::from_secs(60), Filter::All)
        .await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn registering_again_is_a_heartbeat_and_changing_details_replaces() {
    let r = registry();
    let a = r.register("orders", "a", ttl("x:1")).expect("register");
    sleep(Duration::from_secs(8)).await;
    let again = r.register("orders", "a", ttl("x:1")).expect("register");
    assert_eq!(
        again.modify_index, a.modify_index,
        "no change, no new index"
    );
    sleep(Duration::from_secs(8)).await;
    settle().await;
    assert_eq!(
        health(&r, "a"),
        Some(Health::Alive),
        "the re-registration counted"
    );
    let moved = r
        .register("orders", "a", ttl("x:2").with_metadata("zone", "b"))
        .expect("register");
    assert!(moved.modify_index > a.modify_index);
    assert_eq!(moved.address, "x:2");
    assert_eq!(moved.metadata["zone"], "b");
    assert_eq!(r.instances("orders", Filter::All).instances.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn phi_accrual_marks_an_instance_suspect_before_dead() {
    let r = registry();
    let settings = PhiSettings {
        acceptable_pause: Duration::ZERO,
        ..PhiSettings::default()
    };
    r.register(
        "orders",
        "a",
        Registration::new("x:1", Check::Phi(settings)),
    )
    .expect("register");
    for _ in 0..30 {
        sleep(Duration::from_secs(1)).await;
        r.heartbeat("orders", "a").expect("heartbeat");
    }
    let mut events = r.subscribe();
    // Silence: phi grows; the instance passes through suspect to dead.
    for _ in 0..100 {
        sleep(Duration::from_millis(100)).await;
        settle().await;
        if health(&r, "a") == Some(Health::Dead) {
            break;
        }
    }
    assert_eq!(health(&r, "a"), Some(Health::Dead));
    let labels: Vec<_> = drain(&mut events).map(|e| e.change.label()).collect();
    assert_eq!(labels, ["suspect", "dead"]);
    let phi = r.instance("orders", "a").and_then(|i| i.phi).expect("phi");
    assert!(phi >= 10.0, "phi {phi}");
}

/// Answers probes from a script, then with the last answer.
#[derive(Debug)]
struct Scripted(Mutex<VecDeque<bool>>);

#[async_trait]
impl Prober for Scripted {
    async fn probe(&self, url: &str) -> Result<(), String> {
        assert_eq!(url, "http://x:1/health");
        let mut script = self.0.lock().expect("script");
        let ok = if script.len() > 1 {
            script.pop_front()
        } else {
            script.front().copied()
        };
        if ok.unwrap_or(false) {
            Ok(())
        } else {
            Err("503".into())
        }
    }
}

#[tokio::test(start_paused = true)]
async fn http_checks_need_consecutive_failures_to_kill_and_successes_to_revive() {
    // ok, fail, ok (suspect then alive again), fail x3 (dead), ok (still dead),
    // ok (alive: rise 2).
    let script = [true, false, true, false, false, false, true, true];
    let prober = Arc::new(Scripted(Mutex::new(script.into_iter().collect())));
    let r = Registry::new(RegistrySettings::default(), Some(prober));
    let check = Check::Http {
        url: "http://x:1/health".into(),
        interval: Duration::from_secs(1),
        timeout: Duration::from_millis(500),
        healthy_threshold: 2,
        unhealthy_threshold: 3,
    };
    let mut events = r.subscribe();
    let first = r
        .register("orders", "a", Registration::new("x:1", check))
        .expect("register");
    assert_eq!(first.health, Health::Suspect, "unchecked yet");
    assert_eq!(
        r.heartbeat("orders", "a"),
        Err(RegistryError::NotPush {
            service: "orders".into(),
            id: "a".into()
        })
    );
    let mut healths = Vec::new();
    for _ in 0..script.len() {
        settle().await;
        healths.push(health(&r, "a").expect("registered"));
        advance(Duration::from_secs(1)).await;
    }
    use Health::*;
    assert_eq!(
        healths,
        [Alive, Suspect, Alive, Suspect, Suspect, Dead, Dead, Alive]
    );
    let labels: Vec<_> = drain(&mut events).map(|e| e.change.label()).collect();
    assert_eq!(
        labels,
        [
            "registered",
            "alive",
            "suspect",
            "alive",
            "suspect",
            "dead",
            "alive"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_keeps_flapping_is_held_out_for_a_while() {
    let r = registry();
    r.register("orders", "a", ttl("x:1")).expect("register");
    let mut events = r.subscribe();
    // Three crashes in a row, each followed by a restart that re-registers.
    for _ in 0..3 {
        sleep(TTL + Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(health(&r, "a"), Some(Health::Suspect));
        r.heartbeat("orders", "a").expect("heartbeat");
    }
    let a = r.instance("orders", "a").expect("registered");
    assert_eq!(a.health, Health::Alive);
    let until = a.held_out_until.expect("held out");
    assert!(!a.is_healthy());
    assert!(r.instances("orders", Filter::Healthy).instances.is_empty());
    assert!(drain(&mut events).any(|e| matches!(e.change, Change::HeldOut { .. })));
    // It stays alive (heartbeating) and comes back once the penalty decays.
    while tokio::time::Instant::now() < until {
        sleep(Duration::from_secs(5)).await;
        r.heartbeat("orders", "a").expect("heartbeat");
    }
    sleep(Duration::from_secs(1)).await;
    r.heartbeat("orders", "a").expect("heartbeat");
    settle().await;
    let a = r.instance("orders", "a").expect("registered");
    assert!(a.is_healthy(), "{a:?}");
    assert!(drain(&mut events).any(|e| matches!(e.change, Change::Released)));

    // A deregistered and re-registered flapper is still damped.
    for _ in 0..3 {
        sleep(TTL + Duration::from_secs(1)).await;
        settle().await;
        r.deregister("orders", "a").expect("deregister");
        r.register("orders", "a", ttl("x:1")).expect("register");
    }
    assert!(
        r.instance("orders", "a")
            .expect("registered")
            .held_out_until
            .is_some()
    );
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_refused_and_changes_nothing() {
    let r = registry();
    let bad = |e: Result<Instance, RegistryError>| match e {
        Err(RegistryError::InvalidName { .. } | RegistryError::InvalidRegistration(_)) => {}
        other => panic!("{other:?}"),
    };
    bad(r.register("a/b", "x", ttl("x:1")));
    bad(r.register("orders", "", ttl("x:1")));
    bad(r.register("orders", "a", ttl("")));
    bad(r.register(
        "orders",
        "a",
        Registration::new("x:1", Check::ttl(Duration::from_millis(1))),
    ));
    bad(r.register(
        "orders",
        "a",
        Registration::new("x:1", Check::http("ftp://x")),
    ));
    // No prober: HTTP checks are refused.
    bad(r.register(
        "orders",
        "a",
        Registration::new("x:1", Check::http("http://x/h")),
    ));
    assert_eq!(r.instances("orders", Filter::All).instances.len(), 0);
    assert!(r.services().1.is_empty());
    assert!(matches!(
        r.deregister("orders", "nope"),
        Err(RegistryError::UnknownInstance { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn the_registry_is_bounded() {
    let r = Registry::new(
        RegistrySettings {
            max_instances: 2,
            ..RegistrySettings::default()
        },
        None,
    );
    r.register("s", "a", ttl("x:1")).expect("a");
    r.register("s", "b", ttl("x:1")).expect("b");
    assert_eq!(
        r.register("s", "c", ttl("x:1")),
        Err(RegistryError::Full { limit: 2 })
    );
    // Replacing an existing one is fine.
    r.register("s", "b", ttl("x:2")).expect("b again");
    r.deregister("s", "a").expect("deregister");
    r.register("s", "c", ttl("x:1")).expect("c");
}

// === remote instances ===

fn remote(address: &str, health: Health) -> RemoteInstance {
    RemoteInstance {
        address: address.into(),
        metadata: BTreeMap::from([("zone".to_owned(), "b".to_owned())]),
        health,
        held_out: None,
        check_kind: "ttl".into(),
        origin: "sidecar-b".into(),
    }
}

fn labels(events: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<&'static str> {
    drain(events).map(|e| e.change.label()).collect()
}

#[tokio::test(start_paused = true)]
async fn remote_instances_are_listed_and_only_changes_bump_the_index() {
    let r = registry();
    let mut events = r.subscribe();
    let before = r.instances("orders", Filter::All);
    let waiter = {
        let r = r.clone();
        tokio::spawn(async move {
            r.wait("orders", before.index, Duration::from_secs(60), Filter::All)
                .await
        })
    };
    settle().await;
    let got = r
        .apply_remote("orders", "x", remote("10.0.0.9:80", Health::Alive))
        .expect("apply");
    assert_eq!(got.origin.as_deref(), Some("sidecar-b"));
    assert_eq!(got.check, "ttl");
    assert!(got.is_healthy());
    // A blocking query wakes.
    let woke = waiter.await.expect("waiter");
    assert_eq!(woke.instances.len(), 1);
    assert_eq!(woke.instances[0].address, "10.0.0.9:80");
    assert_eq!(labels(&mut events), ["registered"]);
    let index = r.instances("orders", Filter::All).index;

    // The same again changes nothing.
    r.apply_remote("orders", "x", remote("10.0.0.9:80", Health::Alive))
        .expect("apply");
    assert_eq!(r.instances("orders", Filter::All).index, index);
    assert!(labels(&mut events).is_empty());

    // Health and hold-out as the origin says.
    r.apply_remote("orders", "x", remote("10.0.0.9:80", Health::Suspect))
        .expect("apply");
    assert_eq!(labels(&mut events), ["suspect"]);
    assert!(r.instances("orders", Filter::Healthy).instances.is_empty());
    let held = RemoteInstance {
        held_out: Some(Duration::from_secs(30)),
        ..remote("10.0.0.9:80", Health::Alive)
    };
    r.apply_remote("orders", "x", held.clone()).expect("apply");
    assert_eq!(labels(&mut events), ["alive", "held_out"]);
    let x = r.instance("orders", "x").expect("listed");
    assert!(x.held_out_until.is_some());
    assert!(!x.is_healthy());
    // Another remaining time for the same hold-out is no change.
    r.apply_remote(
        "orders",
        "x",
        RemoteInstance {
            held_out: Some(Duration::from_secs(20)),
            ..held
        },
    )
    .expect("apply");
    assert!(labels(&mut events).is_empty());
    r.apply_remote("orders", "x", remote("10.0.0.9:80", Health::Alive))
        .expect("apply");
    assert_eq!(labels(&mut events), ["released"]);
    // New details are a registration.
    r.apply_remote("orders", "x", remote("10.0.0.10:80", Health::Alive))
        .expect("apply");
    assert_eq!(labels(&mut events), ["registered"]);

    let (_, services) = r.services();
    assert_eq!(
        services,
        vec![ServiceSummary {
            service: "orders".into(),
            index: r.instances("orders", Filter::All).index,
            instances: 1,
            healthy: 1,
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn the_driver_never_judges_remote_instances() {
    let r = registry();
    r.apply_remote("orders", "x", remote("10.0.0.9:80", Health::Dead))
        .expect("apply");
    let index = r.instances("orders", Filter::All).index;
    // Far beyond any TTL and deregister_after.
    for _ in 0..10 {
        sleep(Duration::from_secs(60)).await;
        settle().await;
    }
    let x = r.instance("orders", "x").expect("still there");
    assert_eq!(x.health, Health::Dead);
    assert_eq!(x.deregister_at, None);
    assert_eq!(x.last_heartbeat, None);
    assert_eq!(r.instances("orders", Filter::All).index, index);
}

#[tokio::test(start_paused = true)]
async fn remote_instances_take_no_heartbeats_and_are_removed_by_the_mirror_only() {
    let r = registry();
    let mut events = r.subscribe();
    r.apply_remote("orders", "x", remote("10.0.0.9:80", Health::Alive))
        .expect("apply");
    let remote_error = RegistryError::Remote {
        service: "orders".into(),
        id: "x".into(),
        origin: "sidecar-b".into(),
    };
    assert_eq!(r.heartbeat("orders", "x"), Err(remote_error.clone()));
    assert_eq!(r.deregister("orders", "x"), Err(remote_error));
    assert!(r.instance("orders", "x").is_some());

    // remove_remote leaves local instances alone.
    r.register("orders", "a", ttl("10.0.0.1:80"))
        .expect("register");
    assert!(!r.remove_remote("orders", "a"));
    assert!(r.instance("orders", "a").is_some());
    assert!(!r.remove_remote("orders", "nope"));

    drain(&mut events).for_each(drop);
    assert!(r.remove_remote("orders", "x"));
    assert!(r.instance("orders", "x").is_none());
    let seen: Vec<_> = drain(&mut events).map(|e| (e.id, e.change)).collect();
    assert_eq!(
        seen,
        vec![("x".to_owned(), Change::Deregistered { dead: false })]
    );
    assert!(!r.remove_remote("orders", "x"));
}

#[tokio::test(start_paused = true)]
async fn registering_locally_takes_a_remote_instance_over_and_back() {
    let r = registry();
    r.apply_remote("orders", "x", remote("10.0.0.9:80", Health::Suspect))
        .expect("apply");
    // The app moved to this sidecar: registering here takes it over.
    let got = r
        .register("orders", "x", ttl("10.0.0.1:80"))
        .expect("register");
    assert_eq!(got.origin, None);
    assert_eq!(got.health, Health::Alive);
    r.heartbeat("orders", "x").expect("heartbeat");
    // Judged here now: without heartbeats it goes suspect.
    sleep(TTL + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(health(&r, "x"), Some(Health::Suspect));
    assert_eq!(r.services().1[0].instances, 1);

    // ...and a newer registration elsewhere replaces the local one.
    let got = r
        .apply_remote("orders", "x", remote("10.0.0.9:80", Health::Alive))
        .expect("apply");
    assert_eq!(got.origin.as_deref(), Some("sidecar-b"));
    // Not judged here any more: it stays alive.
    sleep(TTL * 5).await;
    settle().await;
    assert_eq!(health(&r, "x"), Some(Health::Alive));
    assert_eq!(r.services().1[0].instances, 1);
}

#[tokio::test(start_paused = true)]
async fn bad_remote_instances_are_refused_and_count_towards_the_limit() {
    let r = Registry::new(
        RegistrySettings {
            max_instances: 1,
            ..RegistrySettings::default()
        },
        None,
    );
    let bad = |f: fn(&mut RemoteInstance)| {
        let mut i = remote("10.0.0.9:80", Health::Alive);
        f(&mut i);
        i
    };
    for i in [
        bad(|i| i.address.clear()),
        bad(|i| i.origin.clear()),
        bad(|i| {
            i.metadata.insert(String::new(), "v".into());
        }),
    ] {
        assert!(matches!(
            r.apply_remote("orders", "x", i),
            Err(RegistryError::InvalidRegistration(_))
        ));
    }
    assert!(matches!(
        r.apply_remote("or/ders", "x", remote("10.0.0.9:80", Health::Alive)),
        Err(RegistryError::InvalidName { .. })
    ));
    assert!(r.services().1.is_empty());
    r.apply_remote("orders", "x", remote("10.0.0.9:80", Health::Alive))
        .expect("apply");
    assert_eq!(
        r.apply_remote("orders", "y", remote("10.0.0.9:80", Health::Alive)),
        Err(RegistryError::Full { limit: 1 })
    );
    assert_eq!(
        r.register("orders", "a", ttl("10.0.0.1:80")),
        Err(RegistryError::Full { limit: 1 })
    );
    // Updating or taking over is not growing.
    r.apply_remote("orders", "x", remote("10.0.0.9:80", Health::Dead))
        .expect("apply");
    r.register("orders", "x", ttl("10.0.0.1:80"))
        .expect("take over");
    // An unknown check kind shows as "remote".
    assert!(!r.remove_remote("orders", "x"));
    r.deregister("orders", "x").expect("deregister");
    let odd = RemoteInstance {
        check_kind: "grpc".into(),
        ..remote("10.0.0.9:80", Health::Alive)
    };
    assert_eq!(
        r.apply_remote("orders", "z", odd).expect("apply").check,
        "remote"
    );
}
