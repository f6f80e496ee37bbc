//! The embedded backend with paused time: exact deadlines, FIFO turns, the sweeper,
//! limits, and guards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until};

use super::{EmbeddedCoordinator, EmbeddedOptions};
use crate::{
    CoordError, Coordinator, Kind, LeaderInfo, Leadership, Lease, LeaseLost, LockGuard, Name,
};

const TTL: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(1);

fn name(s: &str) -> Name {
    Name::new(s).expect("name")
}

async fn open_with(options: EmbeddedOptions) -> (tempfile::TempDir, Arc<EmbeddedCoordinator>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = EmbeddedCoordinator::open_with(dir.path().join("coord.redb"), options)
        .await
        .expect("open");
    (dir, Arc::new(c))
}

async fn open() -> (tempfile::TempDir, Arc<EmbeddedCoordinator>) {
    open_with(EmbeddedOptions::default()).await
}

/// Spawns a blocking acquire; its lease and when it returned.
fn waiter(
    c: &Arc<EmbeddedCoordinator>,
    n: &Name,
    owner: &'static str,
    wait: Duration,
) -> tokio::task::JoinHandle<Result<(Lease, Instant), CoordError>> {
    let (c, n) = (Arc::clone(c), n.clone());
    tokio::spawn(async move {
        let lease = c.acquire(&n, owner, TTL, wait).await?;
        Ok((lease, Instant::now()))
    })
}

#[tokio::test(start_paused = true)]
async fn a_lease_expires_exactly_at_its_deadline() {
    let (_dir, c) = open().await;
    let n = name("exact");
    let t0 = Instant::now();
    let a = c.acquire(&n, "a", TTL, Duration::ZERO).await.expect("a");
    assert_eq!(
        a.expires_at,
        t0 + TTL,
        "the fsync does not move paused time"
    );
    assert_eq!(a.remaining(), TTL);
    sleep_until(a.expires_at - TICK).await;
    assert!(c.lock_holder(&n).await.expect("holder").is_some());
    assert!(c.extend(&n, "a", a.fencing_token, TTL).await.is_ok());
    let extended = c.lock_holder(&n).await.expect("holder").expect("held");
    assert_eq!(extended.expires_at, a.expires_at - TICK + TTL);
    sleep_until(extended.expires_at).await;
    assert_eq!(c.lock_holder(&n).await.expect("holder"), None);
    assert!(matches!(
        c.extend(&n, "a", a.fencing_token, TTL).await,
        Err(CoordError::NotHolder { holder: None, .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_order_at_the_holders_deadline() {
    let (_dir, c) = open().await;
    let n = name("fifo");
    let a = c.acquire(&n, "a", TTL, Duration::ZERO).await.expect("a");
    let b = waiter(&c, &n, "b", WAIT);
    sleep(TICK).await; // `b` is queued once the runtime idles
    let cc = waiter(&c, &n, "c", WAIT);
    sleep(TICK).await;
    let d = waiter(&c, &n, "d", WAIT);
    sleep(TICK).await;
    let (b, b_at) = b.await.expect("b").expect("b acquires");
    assert_eq!(b_at, a.expires_at, "woken by the sweeper at the deadline");
    assert!(b.fencing_token > a.fencing_token);
    assert!(!cc.is_finished() && !d.is_finished());
    c.release(&n, "b", b.fencing_token).await.expect("release");
    let released_at = Instant::now();
    let (cl, c_at) = cc.await.expect("c").expect("c acquires");
    assert_eq!(c_at, released_at);
    assert!(cl.fencing_token > b.fencing_token);
    assert!(!d.is_finished());
    // `c` never releases: `d` gets the name when c's lease runs out.
    let (dl, d_at) = d.await.expect("d").expect("d acquires");
    assert_eq!(d_at, cl.expires_at);
    assert!(dl.fencing_token > cl.fencing_token);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_or_timed_out_waiter_passes_its_turn_on() {
    let (_dir, c) = open().await;
    let n = name("cancel");
    let a = c.acquire(&n, "a", TTL, Duration::ZERO).await.expect("a");
    let b = waiter(&c, &n, "b", WAIT);
    sleep(TICK).await;
    let short = waiter(&c, &n, "s", Duration::from_secs(2));
    sleep(TICK).await;
    let d = waiter(&c, &n, "d", WAIT);
    sleep(TICK).await;
    b.abort();
    assert!(b.await.is_err_and(|e| e.is_cancelled()));
    let started = Instant::now() - TICK * 2;
    match short.await.expect("s") {
        Err(CoordError::Timeout { waited, holder, .. }) => {
            assert_eq!(waited, Duration::from_secs(2));
            assert_eq!(holder.as_deref(), Some("a"));
        }
        other => panic!("expected a timeout: {other:?}"),
    }
    assert_eq!(Instant::now(), started + Duration::from_secs(2));
    c.release(&n, "a", a.fencing_token).await.expect("release");
    let (dl, _) = d.await.expect("d").expect("d acquires");
    assert_eq!(dl.owner, "d");
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_tells_observers_without_calls() {
    let (_dir, c) = open().await;
    let n = name("swept");
    let mut rx = c.observe(&n).await.expect("observe");
    let t0 = Instant::now();
    let a = c.campaign(&n, "a", TTL, Duration::ZERO).await.expect("a");
    rx.changed().await.expect("elected");
    // A keep-alive with a longer ttl: the old deadline passes quietly.
    sleep(Duration::from_secs(5)).await;
    let kept = c
        .keep_alive(&n, "a", a.fencing_token, TTL * 2)
        .await
        .expect("keep alive");
    assert!(!rx.has_changed().expect("open"));
    assert_eq!(
        rx.borrow().as_ref().map(|l| l.expires_at),
        Some(kept.expires_at),
        "the observed expiry follows keep-alives without notifying"
    );
    rx.changed().await.expect("expired");
    assert_eq!(*rx.borrow(), None);
    assert_eq!(Instant::now(), kept.expires_at);
    assert_eq!(kept.expires_at, t0 + Duration::from_secs(25));

    // A keep-alive with a shorter ttl moves the deadline earlier.
    let b = c.campaign(&n, "b", TTL, Duration::ZERO).await.expect("b");
    rx.changed().await.expect("elected");
    let short = c
        .keep_alive(&n, "b", b.fencing_token, Duration::from_secs(1))
        .await
        .expect("keep alive");
    rx.changed().await.expect("expired");
    assert_eq!(Instant::now(), short.expires_at);
}

#[tokio::test(start_paused = true)]
async fn close_fails_waiters_and_later_calls() {
    let (_dir, c) = open().await;
    let n = name("closing");
    c.acquire(&n, "a", TTL, Duration::ZERO).await.expect("a");
    let b = waiter(&c, &n, "b", WAIT);
    let rx = c.observe(&n).await.expect("observe");
    sleep(TICK).await;
    c.close().await.expect("close");
    assert!(matches!(b.await.expect("b"), Err(CoordError::Closed)));
    assert!(rx.has_changed().is_err(), "observers see the channel close");
    assert!(matches!(
        c.latest_token(Kind::Lock, &n).await,
        Err(CoordError::Closed)
    ));
    assert!(matches!(c.observe(&n).await, Err(CoordError::Closed)));
    c.close().await.expect("close twice");
}

#[tokio::test(start_paused = true)]
async fn limits_are_enforced() {
    let options = EmbeddedOptions {
        max_waiters: 1,
        max_names: 2,
    };
    let (_dir, c) = open_with(options).await;
    let (x, y, z) = (name("x"), name("y"), name("z"));
    c.acquire(&x, "a", TTL, Duration::ZERO).await.expect("x");
    let queued = waiter(&c, &x, "b", WAIT);
    sleep(TICK).await;
    assert!(matches!(
        c.acquire(&x, "c", TTL, WAIT).await,
        Err(CoordError::Overloaded {
            what: "waiters",
            limit: 1,
            ..
        })
    ));
    c.campaign(&y, "a", TTL, Duration::ZERO).await.expect("y");
    let e = c.acquire(&z, "a", TTL, Duration::ZERO).await;
    assert!(
        matches!(&e, Err(e @ CoordError::Overloaded { what: "names in use", .. }) if e.is_transient()),
        "{e:?}"
    );
    queued.abort();
}

#[tokio::test(start_paused = true)]
async fn latest_token_survives_an_idle_name_being_dropped() {
    let (_dir, c) = open().await;
    let n = name("idle");
    let a = c.acquire(&n, "a", TTL, Duration::ZERO).await.expect("a");
    c.release(&n, "a", a.fencing_token).await.expect("release");
    // The name's state is gone from memory; the token is read back from the file.
    assert!(c.shared.lock().entries.is_empty());
    assert_eq!(
        c.latest_token(Kind::Lock, &n).await.expect("latest"),
        a.fencing_token
    );
    assert_eq!(c.latest_token(Kind::Election, &n).await.expect("latest"), 0);
    c.health().await.expect("health");
}

#[tokio::test(start_paused = true)]
async fn a_guard_keeps_its_lock_for_as_long_as_it_lives() {
    let (_dir, c) = open().await;
    let coord: Arc<dyn Coordinator> = c.clone();
    let n = name("guarded");
    let guard = LockGuard::acquire(Arc::clone(&coord), &n, "a", TTL, Duration::ZERO)
        .await
        .expect("guard");
    let lost = tokio::spawn(guard.lost());
    sleep(TTL * 100).await;
    assert!(guard.is_held());
    assert!(!lost.is_finished());
    let held = c.lock_holder(&n).await.expect("holder").expect("held");
    assert_eq!(held.fencing_token, guard.fencing_token());
    assert!(guard.lease().expires_at > Instant::now() + TTL / 2);
    assert!(matches!(
        c.acquire(&n, "b", TTL, Duration::ZERO).await,
        Err(CoordError::Timeout { .. })
    ));
    guard.release().await.expect("release");
    assert_eq!(lost.await.expect("lost"), LeaseLost::Released);
    assert_eq!(c.lock_holder(&n).await.expect("holder"), None);
}

/// Fails keep-alives on demand.
#[derive(Debug)]
struct Flaky {
    inner: Arc<EmbeddedCoordinator>,
    fail: AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<(), CoordError> {
        if self.fail.load(Ordering::SeqCst) {
            Err(CoordError::Unavailable {
                backend: "flaky",
                reason: "injected".into(),
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Coordinator for Flaky {
    fn backend(&self) -> &'static str {
        "flaky"
    }
    async fn acquire(
        &self,
        name: &Name,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError> {
        self.inner.acquire(name, owner, ttl, wait).await
    }
    async fn extend(
        &self,
        name: &Name,
        owner: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError> {
        self.check()?;
        self.inner.extend(name, owner, token, ttl).await
    }
    async fn release(&self, name: &Name, owner: &str, token: u64) -> Result<(), CoordError> {
        self.inner.release(name, owner, token).await
    }
    async fn lock_holder(&self, name: &Name) -> Result<Option<Lease>, CoordError> {
        self.inner.lock_holder(name).await
    }
    async fn campaign(
        &self,
        name: &Name,
        candidate: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, CoordError> {
        self.inner.campaign(name, candidate, ttl, wait).await
    }
    async fn keep_alive(
        &self,
        name: &Name,
        candidate: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<Lease, CoordError> {
        self.check()?;
        self.inner.keep_alive(name, candidate, token, ttl).await
    }
    async fn resign(&self, name: &Name, candidate: &str, token: u64) -> Result<(), CoordError> {
        self.inner.resign(name, candidate, token).await
    }
    async fn leader(&self, name: &Name) -> Result<Option<LeaderInfo>, CoordError> {
        self.inner.leader(name).await
    }
    async fn observe(
        &self,
        name: &Name,
    ) -> Result<watch::Receiver<Option<LeaderInfo>>, CoordError> {
        self.inner.observe(name).await
    }
    async fn latest_token(&self, kind: Kind, name: &Name) -> Result<u64, CoordError> {
        self.inner.latest_token(kind, name).await
    }
    async fn health(&self) -> Result<(), CoordError> {
        self.inner.health().await
    }
    async fn close(&self) -> Result<(), CoordError> {
        self.inner.close().await
    }
}

#[tokio::test(start_paused = true)]
async fn failing_keep_alives_lose_the_lease_at_its_deadline() {
    let (_dir, c) = open().await;
    let flaky = Arc::new(Flaky {
        inner: Arc::clone(&c),
        fail: AtomicBool::new(false),
    });
    let n = name("flaky");
    let guard = LockGuard::acquire(flaky.clone(), &n, "a", TTL, Duration::ZERO)
        .await
        .expect("guard");
    sleep(TTL * 3).await;
    assert!(guard.is_held());
    flaky.fail.store(true, Ordering::SeqCst);
    let deadline = guard.lease().expires_at;
    assert_eq!(guard.lost().await, LeaseLost::Expired);
    assert_eq!(Instant::now(), deadline, "lost exactly at the deadline");
    assert!(!guard.is_held());
    // Transient errors were retried, not taken as loss: the backend let it expire.
    assert_eq!(c.lock_holder(&n).await.expect("holder"), None);
}

#[tokio::test(start_paused = true)]
async fn leadership_notices_a_new_term_at_once() {
    let (_dir, c) = open().await;
    let coord: Arc<dyn Coordinator> = c.clone();
    let n = name("term");
    let leadership = Leadership::campaign(Arc::clone(&coord), &n, "a", TTL, Duration::ZERO)
        .await
        .expect("elected");
    assert!(leadership.is_leader());
    let token = leadership.fencing_token();
    let started = Instant::now();
    // Someone with the token resigns it, and b is elected.
    c.resign(&n, "a", token).await.expect("resign");
    c.campaign(&n, "b", TTL, Duration::ZERO).await.expect("b");
    assert_eq!(
        leadership.lost().await,
        LeaseLost::Revoked { holder: None },
        "the observer saw the leader go"
    );
    assert_eq!(
        Instant::now(),
        started,
        "no keep-alive was needed to notice"
    );
    assert!(!leadership.is_leader());
    assert!(matches!(
        leadership.resign().await,
        Err(CoordError::NotHolder { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn tokens_of_names_and_kinds_are_separate_and_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coord.redb");
    let (x, y) = (name("x"), name("y"));
    let c = EmbeddedCoordinator::open(&path).await.expect("open");
    assert_eq!(c.path(), path);
    for _ in 0..3 {
        let l = c.acquire(&x, "a", TTL, Duration::ZERO).await.expect("x");
        c.release(&x, "a", l.fencing_token).await.expect("release");
    }
    let y1 = c.acquire(&y, "a", TTL, Duration::ZERO).await.expect("y");
    assert_eq!(y1.fencing_token, 1, "each name counts on its own");
    let e1 = c.campaign(&x, "a", TTL, Duration::ZERO).await.expect("e");
    assert_eq!(e1.fencing_token, 1, "locks and elections count apart");
    c.close().await.expect("close");
    drop(c);
    let c = EmbeddedCoordinator::open(&path).await.expect("reopen");
    assert_eq!(
        c.lock_holder(&y).await.expect("holder"),
        None,
        "leases are not kept"
    );
    assert_eq!(c.latest_token(Kind::Lock, &x).await.expect("latest"), 3);
    let l = c.acquire(&x, "b", TTL, Duration::ZERO).await.expect("x");
    assert_eq!(l.fencing_token, 4);
    c.close().await.expect("close");
}
