//! The contract every [`Coordinator`] backend must pass.
//!
//! Each check is a public `async fn` taking a [`Harness`] that opens the backend
//! under test (again, over the same storage, to check restarts), so a backend's test
//! file is one line with [`coord_contract!`](crate::coord_contract):
//!
//! ```ignore
//! trellis_coord::coord_contract!(async { my_harness_for_tests().await });
//! ```
//!
//! The expression must evaluate to a future of `Option<H>` where `H: Harness`
//! (`None` skips the test, e.g. when `TRELLIS_TEST_SERVICES=0`). It is evaluated once
//! per test, and each harness must use storage no other test uses.
//!
//! # Time, and why nothing here can flake on a slow machine
//! The checks run in real time (a remote backend's leases don't follow a paused tokio
//! clock) with short TTLs. Safety is checked *causally* only: "B got the lock, so A's
//! deadline had passed by the time B's call returned", "an extend was refused, so
//! the lease's deadline had passed by the time the refusal arrived" — statements
//! that hold however late threads are scheduled. Liveness (a blocked call wakes, a
//! guard keeps its lease) is checked with generous bounds ([`PATIENCE`]), and the two
//! checks that need a keep-alive to arrive in time retry their scenario when this
//! process was demonstrably stalled.
//!
//! Checks use a backend's granted TTL and deadline ([`Lease::ttl`],
//! [`Lease::expires_at`]), never the requested ones: a backend may round TTLs up.
//!
//! # Writing a backend that passes
//! What the etcd and PostgreSQL backends must do (the embedded one does it in
//! memory):
//! 1. **Deadlines are computed by the client and err early**: `expires_at` is an
//!    `Instant` taken *before* sending the grant or renewal plus the granted TTL, so
//!    it is never later than the moment the server frees the name. Report the
//!    granted TTL (etcd rounds to whole seconds and has a minimum).
//! 2. **A token is committed before it is returned and grows per (kind, name)
//!    across restarts** (gaps are fine, tokens start above 0). etcd: one transaction
//!    "holder key absent → put the holder key (on the lease) and a lease-less fence
//!    key", the token being that transaction's revision and `latest_token` the fence
//!    key's mod revision — the grant's revision, not a waiter key's (the lock recipe's
//!    waiter revisions would make the current holder's token look stale).
//!    PostgreSQL: a never-deleted row per (kind, name), granted by
//!    `UPDATE … SET owner, token = token + 1, expires_at = clock_timestamp() + ttl
//!    WHERE owner IS NULL OR expires_at <= clock_timestamp() RETURNING token`
//!    (`now()` is the transaction's start, not the database's clock).
//! 3. **Only the holder, and expiry is final**: extend and release compare owner,
//!    token and "not expired" on the server and answer [`CoordError::NotHolder`]
//!    otherwise; a holder re-acquiring gets its lease back, extended.
//! 4. **etcd: a different TTL needs a new lease** (`KeepAlive` renews to the
//!    original TTL): grant one, re-attach the key in a transaction guarded by the
//!    token, revoke the old one; the token doesn't change and `observe` filters on
//!    the token so this is not a new term.
//! 5. **Waiting wakes on release and on expiry nobody triggers**: a watch on the
//!    key's deletion (etcd); `LISTEN`/`NOTIFY` plus a timer at the holder's expiry
//!    (PostgreSQL). A waiter that gives up cleans up (etcd waiter keys on a lease);
//!    [`CoordError::Timeout`] no earlier than `wait`. FIFO is not required.
//! 6. **`observe`** starts from the current leader, then a watch (etcd) or
//!    `NOTIFY` plus an expiry timer (PostgreSQL); it publishes term changes only,
//!    never an older term.
//! 7. **Input is checked before any I/O** with the crate's shared checks (so those
//!    backends live in this crate); connection trouble is
//!    [`CoordError::Unavailable`], so guards retry until the deadline; `close()`
//!    wakes blocked calls and fails later ones.
//! 8. **The harness** gives each test its own key prefix or schema, and `open()`
//!    after `close()` sees the same data.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::{Mutex, oneshot};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::api::{give_up, renew, take};
use crate::{
    CoordError, Coordinator, Kind, LeaderInfo, Leadership, Lease, LeaseLost, LockGuard, MAX_TTL,
    MAX_WAIT, Name,
};

/// Opens the backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Opens the backend; a second call (after `close`) must see the same durable data.
    async fn open(&self) -> Arc<dyn Coordinator>;
}

/// Generates one `#[tokio::test]` per contract check for the harness built by `$make`.
#[macro_export]
macro_rules! coord_contract {
    ($make:expr) => {
        $crate::coord_contract!(@tests $make;
            leases_are_exclusive,
            concurrent_takers_have_one_winner,
            only_the_holder_may_extend_or_give_up,
            the_holder_taking_again_gets_its_lease,
            expiry_frees_the_name,
            extending_keeps_the_lease,
            blocked_takers_wake_on_release,
            blocked_takers_wake_on_expiry,
            blocked_takers_time_out,
            tokens_strictly_increase,
            tokens_survive_a_restart,
            fencing_rejects_stale_tokens,
            locks_and_elections_are_separate,
            the_leader_is_reported,
            observers_see_every_change_of_leader,
            resigning_hands_leadership_over,
            guards_keep_their_lease_alive,
            guards_report_loss,
            dropping_a_guard_gives_the_lease_up,
            lock_history_is_consistent,
            election_history_is_consistent,
            invalid_requests_are_refused,
            health_and_close,
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

const KINDS: [Kind; 2] = [Kind::Lock, Kind::Election];
/// A lease that outlives any check.
const LONG: Duration = Duration::from_secs(120);
/// A lease meant to run out during a check.
const SHORT: Duration = Duration::from_millis(300);
/// A lease that keep-alives must carry through a check.
const KEPT: Duration = Duration::from_secs(1);
/// How long a call that must succeed may take before the check gives up on the
/// backend. Only ever an upper bound on liveness.
pub const PATIENCE: Duration = Duration::from_secs(30);

fn name(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

async fn take_ok(
    c: &Arc<dyn Coordinator>,
    kind: Kind,
    n: &Name,
    owner: &str,
    ttl: Duration,
    wait: Duration,
) -> Lease {
    let lease = take(c.as_ref(), kind, n, owner, ttl, wait)
        .await
        .unwrap_or_else(|e| panic!("{kind} {n}: {owner} should get it: {e}"));
    assert_eq!(
        (lease.kind, &lease.name, lease.owner.as_str()),
        (kind, n, owner)
    );
    assert!(lease.fencing_token > 0, "tokens start above 0");
    assert!(lease.ttl >= ttl, "granted ttl {:?} < {ttl:?}", lease.ttl);
    lease
}

/// The holder's name from a timeout.
fn timed_out<T: std::fmt::Debug>(r: Result<T, CoordError>, what: &str) -> Option<String> {
    match r {
        Err(CoordError::Timeout { holder, .. }) => holder,
        other => panic!("{what}: expected Timeout, got {other:?}"),
    }
}

fn not_holder<T: std::fmt::Debug>(r: Result<T, CoordError>, what: &str) -> Option<String> {
    match r {
        Err(CoordError::NotHolder { holder, .. }) => holder,
        other => panic!("{what}: expected NotHolder, got {other:?}"),
    }
}

/// The current holder and token.
async fn holder_of(c: &Arc<dyn Coordinator>, kind: Kind, n: &Name) -> Option<(String, u64)> {
    match kind {
        Kind::Lock => c
            .lock_holder(n)
            .await
            .expect("lock_holder")
            .map(|l| (l.owner, l.fencing_token)),
        Kind::Election => c
            .leader(n)
            .await
            .expect("leader")
            .map(|l| (l.candidate, l.fencing_token)),
    }
}

async fn close(c: Arc<dyn Coordinator>) {
    c.close().await.expect("close");
}

/// A lease is exclusive: others trying get [`CoordError::Timeout`] naming the holder,
/// and the holder is reported.
pub async fn leases_are_exclusive(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("exclusive");
        let before = Instant::now();
        let a = take_ok(&c, kind, &n, "a", LONG, Duration::ZERO).await;
        assert!(
            a.expires_at > before && a.expires_at <= Instant::now() + a.ttl,
            "{kind}: expires_at is a deadline one ttl after the grant"
        );
        assert!(a.remaining() > Duration::ZERO && a.remaining() <= a.ttl);
        for other in ["b", "c"] {
            let holder = timed_out(
                take(c.as_ref(), kind, &n, other, LONG, Duration::ZERO).await,
                "second taker",
            );
            assert_eq!(
                holder.as_deref(),
                Some("a"),
                "{kind}: the timeout names the holder"
            );
        }
        assert_eq!(
            holder_of(&c, kind, &n).await,
            Some(("a".to_owned(), a.fencing_token))
        );
        if kind == Kind::Lock {
            let held = c.lock_holder(&n).await.expect("lock_holder").expect("held");
            assert_eq!(held.name, n);
            assert_eq!(held.kind, Kind::Lock);
        }
        give_up(c.as_ref(), &a).await.expect("give up");
        assert_eq!(holder_of(&c, kind, &n).await, None);
        assert_eq!(holder_of(&c, kind, &name("never-used")).await, None);
    }
    close(c).await;
}

/// Of eight callers trying at once on a free name, exactly one wins.
pub async fn concurrent_takers_have_one_winner(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("race");
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (c, n) = (Arc::clone(&c), n.clone());
            tasks.push(tokio::spawn(async move {
                take(
                    c.as_ref(),
                    kind,
                    &n,
                    &format!("racer-{i}"),
                    LONG,
                    Duration::ZERO,
                )
                .await
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.expect("racer") {
                Ok(lease) => winners.push(lease),
                Err(CoordError::Timeout { .. }) => {}
                Err(e) => panic!("{kind}: racer failed: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "{kind}: exactly one winner: {winners:?}");
        assert_eq!(
            holder_of(&c, kind, &n).await,
            Some((winners[0].owner.clone(), winners[0].fencing_token))
        );
    }
    close(c).await;
}

/// Extending or giving up a lease needs its owner and its token; anything else is
/// [`CoordError::NotHolder`] naming the holder, and changes nothing.
pub async fn only_the_holder_may_extend_or_give_up(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("holder-only");
        let a = take_ok(&c, kind, &n, "a", LONG, Duration::ZERO).await;
        let by_b = Lease {
            owner: "b".into(),
            ..a.clone()
        };
        let old_token = Lease {
            fencing_token: a.fencing_token - 1,
            ..a.clone()
        };
        let new_token = Lease {
            fencing_token: a.fencing_token + 1,
            ..a.clone()
        };
        for (lease, who) in [
            (&by_b, "b"),
            (&old_token, "old token"),
            (&new_token, "new token"),
        ] {
            let holder = not_holder(give_up(c.as_ref(), lease).await, who);
            assert_eq!(holder.as_deref(), Some("a"), "{kind}: {who}");
            not_holder(renew(c.as_ref(), lease, LONG).await, who);
        }
        assert_eq!(
            holder_of(&c, kind, &n).await,
            Some(("a".to_owned(), a.fencing_token)),
            "{kind}: refused calls changed nothing"
        );
        give_up(c.as_ref(), &a).await.expect("the holder gives up");
        assert_eq!(holder_of(&c, kind, &n).await, None);
        let holder = not_holder(give_up(c.as_ref(), &a).await, "give up twice");
        assert_eq!(holder, None, "{kind}: nobody holds it");
        not_holder(renew(c.as_ref(), &a, LONG).await, "extend after giving up");
        // Never taken at all.
        not_holder(
            give_up(
                c.as_ref(),
                &Lease {
                    name: name("never-held"),
                    ..a.clone()
                },
            )
            .await,
            "never held",
        );
    }
    close(c).await;
}

/// The holder taking its name again (a retried request) gets its lease back, same
/// token, extended.
pub async fn the_holder_taking_again_gets_its_lease(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("again");
        let first = take_ok(&c, kind, &n, "a", SHORT * 10, Duration::ZERO).await;
        let again = take_ok(&c, kind, &n, "a", LONG, Duration::ZERO).await;
        assert_eq!(
            again.fencing_token, first.fencing_token,
            "{kind}: same term"
        );
        assert!(again.expires_at > first.expires_at, "{kind}: extended");
        assert_eq!(
            c.latest_token(kind, &n).await.expect("latest"),
            first.fencing_token
        );
        give_up(c.as_ref(), &again).await.expect("give up");
    }
    close(c).await;
}

/// A lease that is not extended frees its name once its deadline passes — never
/// before — without anyone calling; and expiry is final: the old holder can neither
/// extend nor give it up.
pub async fn expiry_frees_the_name(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("expiry");
        let a = take_ok(&c, kind, &n, "a", SHORT, Duration::ZERO).await;
        loop {
            match holder_of(&c, kind, &n).await {
                Some(held) => {
                    assert_eq!(held, ("a".to_owned(), a.fencing_token));
                    assert!(
                        Instant::now() < a.expires_at + PATIENCE,
                        "{kind}: never expired"
                    );
                    sleep(a.ttl / 10).await;
                }
                None => {
                    assert!(
                        Instant::now() >= a.expires_at,
                        "{kind}: freed before the lease's deadline"
                    );
                    break;
                }
            }
        }
        not_holder(renew(c.as_ref(), &a, LONG).await, "extend after expiry");
        not_holder(give_up(c.as_ref(), &a).await, "give up after expiry");
        let b = take_ok(&c, kind, &n, "b", LONG, Duration::ZERO).await;
        assert!(b.fencing_token > a.fencing_token);
    }
    close(c).await;
}

/// Extending keeps the lease (and its token) past its first deadline, and nobody
/// else gets the name meanwhile. Retried if this process stalls past a deadline.
pub async fn extending_keeps_the_lease(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let mut attempt = 0;
        'attempt: loop {
            attempt += 1;
            assert!(
                attempt <= 5,
                "{kind}: every attempt stalled past a deadline"
            );
            let n = name(&format!("extend-{attempt}"));
            let first = take_ok(&c, kind, &n, "a", KEPT, Duration::ZERO).await;
            let mut lease = first.clone();
            while Instant::now() < first.expires_at + first.ttl / 2 {
                sleep(lease.ttl / 5).await;
                match renew(c.as_ref(), &lease, lease.ttl).await {
                    Ok(renewed) => {
                        assert_eq!(
                            (renewed.fencing_token, renewed.owner.as_str(), renewed.kind),
                            (first.fencing_token, "a", kind),
                            "extending keeps the term"
                        );
                        assert!(renewed.expires_at >= lease.expires_at);
                        lease = renewed;
                    }
                    Err(CoordError::NotHolder { .. }) => {
                        assert!(
                            Instant::now() >= lease.expires_at,
                            "{kind}: extend refused while the lease was valid"
                        );
                        continue 'attempt;
                    }
                    Err(e) => panic!("{kind}: extend: {e}"),
                }
                match take(c.as_ref(), kind, &n, "b", LONG, Duration::ZERO).await {
                    Err(CoordError::Timeout { .. }) => {}
                    Ok(b) => {
                        assert!(
                            Instant::now() >= lease.expires_at,
                            "{kind}: b got it while a's extended lease was valid"
                        );
                        give_up(c.as_ref(), &b).await.expect("give up");
                        continue 'attempt;
                    }
                    Err(e) => panic!("{kind}: second taker: {e}"),
                }
            }
            assert!(lease.expires_at > first.expires_at);
            match give_up(c.as_ref(), &lease).await {
                Ok(()) => {}
                Err(CoordError::NotHolder { .. }) => {
                    assert!(Instant::now() >= lease.expires_at);
                }
                Err(e) => panic!("{kind}: give up: {e}"),
            }
            break;
        }
    }
    close(c).await;
}

/// A call blocked on a held name returns as soon as the holder gives it up (long
/// before the holder's lease would run out), with a newer token.
pub async fn blocked_takers_wake_on_release(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("wake-release");
        let a = take_ok(&c, kind, &n, "a", LONG, Duration::ZERO).await;
        let waiter = {
            let (c, n) = (Arc::clone(&c), n.clone());
            tokio::spawn(async move { take(c.as_ref(), kind, &n, "b", LONG, PATIENCE).await })
        };
        // Not needed for correctness; makes it likely that `b` is really blocked.
        sleep(Duration::from_millis(50)).await;
        give_up(c.as_ref(), &a).await.expect("give up");
        let b = waiter.await.expect("waiter").expect("b wakes");
        assert!(b.fencing_token > a.fencing_token);
        assert!(
            Instant::now() < a.expires_at,
            "{kind}: b waited for a's lease to run out"
        );
        give_up(c.as_ref(), &b).await.expect("give up");
    }
    close(c).await;
}

/// A call blocked on a held name returns once the holder's lease runs out (and not
/// before its deadline), with a newer token.
pub async fn blocked_takers_wake_on_expiry(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("wake-expiry");
        let a = take_ok(&c, kind, &n, "a", SHORT, Duration::ZERO).await;
        let b = take_ok(&c, kind, &n, "b", LONG, PATIENCE).await;
        assert!(
            Instant::now() >= a.expires_at,
            "{kind}: b got it before a's deadline"
        );
        assert!(b.fencing_token > a.fencing_token);
        give_up(c.as_ref(), &b).await.expect("give up");
    }
    close(c).await;
}

/// A blocked call that is not served gives up with [`CoordError::Timeout`] — not
/// before its wait is over — and leaves the holder alone.
pub async fn blocked_takers_time_out(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("time-out");
        let a = take_ok(&c, kind, &n, "a", LONG, Duration::ZERO).await;
        let wait = Duration::from_millis(200);
        let started = Instant::now();
        let holder = timed_out(
            take(c.as_ref(), kind, &n, "b", LONG, wait).await,
            "blocked taker",
        );
        assert!(started.elapsed() >= wait, "{kind}: gave up early");
        assert_eq!(holder.as_deref(), Some("a"));
        assert_eq!(
            holder_of(&c, kind, &n).await,
            Some(("a".to_owned(), a.fencing_token))
        );
        // The name is still free for the next one in line once `a` is done.
        give_up(c.as_ref(), &a).await.expect("give up");
        take_ok(&c, kind, &n, "c", LONG, Duration::ZERO).await;
    }
    close(c).await;
}

/// Tokens strictly increase with every new lease, whoever takes it and however the
/// previous one ended; [`Coordinator::latest_token`] follows them (0 before any).
pub async fn tokens_strictly_increase(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("tokens");
        assert_eq!(c.latest_token(kind, &n).await.expect("latest"), 0);
        let mut last = 0;
        for i in 0..6 {
            let owner = if i % 2 == 0 { "a" } else { "b" };
            let lease = take_ok(&c, kind, &n, owner, LONG, Duration::ZERO).await;
            assert!(
                lease.fencing_token > last,
                "{kind}: token {} after {last}",
                lease.fencing_token
            );
            last = lease.fencing_token;
            assert_eq!(c.latest_token(kind, &n).await.expect("latest"), last);
            give_up(c.as_ref(), &lease).await.expect("give up");
            assert_eq!(
                c.latest_token(kind, &n).await.expect("latest"),
                last,
                "giving up issues nothing"
            );
        }
    }
    close(c).await;
}

/// Tokens keep increasing across a restart of the backend: the newest token is
/// durable before it is handed out.
pub async fn tokens_survive_a_restart(h: &impl Harness) {
    let n = name("restart");
    let mut issued = Vec::new();
    let c = h.open().await;
    for kind in KINDS {
        let a = take_ok(&c, kind, &n, "a", LONG, Duration::ZERO).await;
        give_up(c.as_ref(), &a).await.expect("give up");
        issued.push(a.fencing_token);
    }
    close(c).await;

    let c = h.open().await;
    for (kind, before) in KINDS.into_iter().zip(&mut issued) {
        assert!(
            c.latest_token(kind, &n).await.expect("latest") >= *before,
            "{kind}: the newest token was forgotten"
        );
        let b = take_ok(&c, kind, &n, "b", LONG, Duration::ZERO).await;
        assert!(
            b.fencing_token > *before,
            "{kind}: token {} after a restart, {before} before",
            b.fencing_token
        );
        assert_eq!(
            c.latest_token(kind, &n).await.expect("latest"),
            b.fencing_token
        );
        give_up(c.as_ref(), &b).await.expect("give up");
        *before = b.fencing_token;
    }
    close(c).await;

    let c = h.open().await;
    for (kind, before) in KINDS.into_iter().zip(&issued) {
        assert!(c.latest_token(kind, &n).await.expect("latest") >= *before);
    }
    close(c).await;
}

/// A store that refuses writes carrying a token older than the newest issued — what
/// the `Trellis-Fencing` check does with [`Coordinator::latest_token`].
async fn fenced_write(c: &Arc<dyn Coordinator>, kind: Kind, n: &Name, token: u64) -> bool {
    token >= c.latest_token(kind, n).await.expect("latest")
}

/// A holder whose lease ran out and was taken over can no longer pass the fencing
/// check; its successor can.
pub async fn fencing_rejects_stale_tokens(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("fenced");
        assert!(fenced_write(&c, kind, &n, 0).await, "nothing issued yet");
        let a = take_ok(&c, kind, &n, "a", SHORT, Duration::ZERO).await;
        assert!(fenced_write(&c, kind, &n, a.fencing_token).await);
        // `a` pauses past its lease; `b` takes over.
        let b = take_ok(&c, kind, &n, "b", LONG, PATIENCE).await;
        assert!(
            !fenced_write(&c, kind, &n, a.fencing_token).await,
            "{kind}: the stale holder's write passed"
        );
        assert!(fenced_write(&c, kind, &n, b.fencing_token).await);
        give_up(c.as_ref(), &b).await.expect("give up");
        assert!(
            !fenced_write(&c, kind, &n, a.fencing_token).await,
            "{kind}: still stale after b gave up"
        );
    }
    close(c).await;
}

/// A lock and an election of the same name share nothing.
pub async fn locks_and_elections_are_separate(h: &impl Harness) {
    let c = h.open().await;
    let n = name("shared-name");
    let lock = take_ok(&c, Kind::Lock, &n, "a", LONG, Duration::ZERO).await;
    assert_eq!(c.leader(&n).await.expect("leader"), None);
    let term = take_ok(&c, Kind::Election, &n, "b", LONG, Duration::ZERO).await;
    assert_eq!(
        c.lock_holder(&n)
            .await
            .expect("lock_holder")
            .map(|l| l.owner),
        Some("a".into())
    );
    not_holder(
        c.resign(&n, "a", lock.fencing_token).await,
        "resign with the lock's lease",
    );
    c.release(&n, "a", lock.fencing_token)
        .await
        .expect("release");
    assert_eq!(
        c.leader(&n).await.expect("leader").map(|l| l.candidate),
        Some("b".into())
    );
    c.resign(&n, "b", term.fencing_token).await.expect("resign");
    close(c).await;
}

/// [`Coordinator::leader`] reports the leader's candidate, token and deadline.
pub async fn the_leader_is_reported(h: &impl Harness) {
    let c = h.open().await;
    let n = name("leader");
    assert_eq!(c.leader(&n).await.expect("leader"), None);
    let a = take_ok(&c, Kind::Election, &n, "node-a", LONG, Duration::ZERO).await;
    let info = c.leader(&n).await.expect("leader").expect("a leads");
    assert_eq!(
        (info.candidate.as_str(), info.fencing_token, info.ttl),
        ("node-a", a.fencing_token, a.ttl)
    );
    assert!(info.remaining() > Duration::ZERO);
    assert_eq!(LeaderInfo::from(&a).fencing_token, a.fencing_token);
    c.resign(&n, "node-a", a.fencing_token)
        .await
        .expect("resign");
    assert_eq!(c.leader(&n).await.expect("leader"), None);
    close(c).await;
}

async fn wait_leader(
    rx: &mut tokio::sync::watch::Receiver<Option<LeaderInfo>>,
    what: &str,
    f: impl FnMut(&Option<LeaderInfo>) -> bool,
) -> Option<LeaderInfo> {
    timeout(PATIENCE, rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("observer never saw {what}"))
        .unwrap_or_else(|_| panic!("observer closed before {what}"))
        .clone()
}

/// An observer starts at the current leader and sees each new term and the loss of
/// the leader (expiry included, without anyone calling); keep-alives don't notify.
pub async fn observers_see_every_change_of_leader(h: &impl Harness) {
    let c = h.open().await;
    let n = name("observed");
    let mut rx = c.observe(&n).await.expect("observe");
    assert_eq!(*rx.borrow_and_update(), None);
    let a = take_ok(&c, Kind::Election, &n, "a", LONG, Duration::ZERO).await;
    wait_leader(&mut rx, "a elected", |l| {
        l.as_ref()
            .is_some_and(|l| l.fencing_token == a.fencing_token)
    })
    .await;
    let late = c.observe(&n).await.expect("observe");
    assert_eq!(
        late.borrow()
            .as_ref()
            .map(|l| (l.candidate.clone(), l.fencing_token)),
        Some(("a".to_owned(), a.fencing_token)),
        "a new observer starts at the current leader"
    );
    c.keep_alive(&n, "a", a.fencing_token, LONG)
        .await
        .expect("keep alive");
    assert!(
        !rx.has_changed().expect("open"),
        "a keep-alive is not a change of leader"
    );
    let b = {
        let (c, n) = (Arc::clone(&c), n.clone());
        tokio::spawn(async move { c.campaign(&n, "b", SHORT, PATIENCE).await })
    };
    c.resign(&n, "a", a.fencing_token).await.expect("resign");
    let seen = wait_leader(&mut rx, "b elected", |l| {
        l.as_ref().is_some_and(|l| l.candidate == "b")
    })
    .await
    .expect("a leader");
    let b = b.await.expect("campaign").expect("b elected");
    assert_eq!(seen.fencing_token, b.fencing_token);
    assert!(b.fencing_token > a.fencing_token);
    // `b` never keeps its short lease alive.
    wait_leader(&mut rx, "b's lease expire", Option::is_none).await;
    assert!(
        Instant::now() >= b.expires_at,
        "leader dropped before its deadline"
    );
    close(c).await;
}

/// Resigning elects the next waiting candidate at once; the old leader's term is
/// over.
pub async fn resigning_hands_leadership_over(h: &impl Harness) {
    let c = h.open().await;
    let n = name("handover");
    let a = take_ok(&c, Kind::Election, &n, "a", LONG, Duration::ZERO).await;
    let waiter = {
        let (c, n) = (Arc::clone(&c), n.clone());
        tokio::spawn(async move { c.campaign(&n, "b", LONG, PATIENCE).await })
    };
    sleep(Duration::from_millis(50)).await;
    c.resign(&n, "a", a.fencing_token).await.expect("resign");
    let b = waiter.await.expect("waiter").expect("b elected");
    assert!(b.fencing_token > a.fencing_token);
    assert!(
        Instant::now() < a.expires_at,
        "b waited for a's lease to run out"
    );
    let holder = not_holder(
        c.keep_alive(&n, "a", a.fencing_token, LONG).await,
        "old leader keep-alive",
    );
    assert_eq!(holder.as_deref(), Some("b"));
    assert_eq!(
        c.leader(&n).await.expect("leader").map(|l| l.fencing_token),
        Some(b.fencing_token)
    );
    close(c).await;
}

/// Both guard types, for checks that treat them alike.
#[derive(Debug)]
enum AnyGuard {
    Lock(LockGuard),
    Leader(Leadership),
}

impl AnyGuard {
    async fn take(
        c: &Arc<dyn Coordinator>,
        kind: Kind,
        n: &Name,
        owner: &str,
        ttl: Duration,
    ) -> Self {
        let c = Arc::clone(c);
        match kind {
            Kind::Lock => Self::Lock(
                LockGuard::acquire(c, n, owner, ttl, Duration::ZERO)
                    .await
                    .expect("lock guard"),
            ),
            Kind::Election => Self::Leader(
                Leadership::campaign(c, n, owner, ttl, Duration::ZERO)
                    .await
                    .expect("leadership"),
            ),
        }
    }

    fn lease(&self) -> Lease {
        match self {
            Self::Lock(g) => g.lease(),
            Self::Leader(g) => g.lease(),
        }
    }

    fn token(&self) -> u64 {
        match self {
            Self::Lock(g) => g.fencing_token(),
            Self::Leader(g) => g.fencing_token(),
        }
    }

    fn is_held(&self) -> bool {
        match self {
            Self::Lock(g) => g.is_held(),
            Self::Leader(g) => g.is_leader(),
        }
    }

    fn lost(&self) -> std::pin::Pin<Box<dyn Future<Output = LeaseLost> + Send>> {
        match self {
            Self::Lock(g) => Box::pin(g.lost()),
            Self::Leader(g) => Box::pin(g.lost()),
        }
    }

    async fn give_up(self) -> Result<(), CoordError> {
        match self {
            Self::Lock(g) => g.release().await,
            Self::Leader(g) => g.resign().await,
        }
    }
}

/// A guard keeps its lease alive through several TTLs; nobody else gets the name
/// meanwhile; giving it up frees the name. Retried if this process stalls so long
/// that keep-alives could not be sent in time.
pub async fn guards_keep_their_lease_alive(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let mut attempt = 0;
        'attempt: loop {
            attempt += 1;
            assert!(attempt <= 5, "{kind}: every attempt lost its lease");
            let n = name(&format!("guarded-{attempt}"));
            let guard = AnyGuard::take(&c, kind, &n, "a", KEPT).await;
            let first = guard.lease();
            let until = first.expires_at + first.ttl * 2;
            while Instant::now() < until {
                sleep(first.ttl / 4).await;
                if !guard.is_held() {
                    // Allowed only as the result of a stall: the guard reports why.
                    let reason = timeout(PATIENCE, guard.lost())
                        .await
                        .expect("lost resolves");
                    assert_eq!(reason, LeaseLost::Expired, "{kind}: lost without a stall");
                    let _ = guard.give_up().await;
                    continue 'attempt;
                }
                match take(c.as_ref(), kind, &n, "b", LONG, Duration::ZERO).await {
                    Err(CoordError::Timeout { .. }) => {}
                    Ok(b) => {
                        assert!(
                            Instant::now() >= guard.lease().expires_at,
                            "{kind}: b got it while the guard's lease was valid"
                        );
                        give_up(c.as_ref(), &b).await.expect("give up");
                        continue 'attempt;
                    }
                    Err(e) => panic!("{kind}: second taker: {e}"),
                }
            }
            let lease = guard.lease();
            assert_eq!(lease.fencing_token, guard.token());
            assert!(lease.expires_at > first.expires_at, "{kind}: never renewed");
            let lost = guard.lost();
            guard.give_up().await.expect("give up");
            assert_eq!(
                timeout(PATIENCE, lost).await.expect("lost resolves"),
                LeaseLost::Released
            );
            take_ok(&c, kind, &n, "b", LONG, Duration::ZERO).await;
            break;
        }
    }
    close(c).await;
}

/// A guard whose lease is given up behind its back (an operator, a confused peer
/// with the token) reports [`LeaseLost::Revoked`] and stops claiming it.
pub async fn guards_report_loss(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("revoked");
        let guard = AnyGuard::take(&c, kind, &n, "a", KEPT).await;
        let lost = guard.lost();
        give_up(c.as_ref(), &guard.lease())
            .await
            .expect("give up behind the guard's back");
        let b = take_ok(&c, kind, &n, "b", LONG, Duration::ZERO).await;
        let reason = timeout(PATIENCE, lost).await.expect("lost resolves");
        assert!(
            matches!(reason, LeaseLost::Revoked { .. }),
            "{kind}: {reason:?}"
        );
        assert!(!guard.is_held());
        not_holder(guard.give_up().await, "giving up a lost lease");
        assert_eq!(
            holder_of(&c, kind, &n).await,
            Some(("b".to_owned(), b.fencing_token)),
            "the lost guard left b alone"
        );
    }
    close(c).await;
}

/// Dropping a guard gives its lease up in the background.
pub async fn dropping_a_guard_gives_the_lease_up(h: &impl Harness) {
    let c = h.open().await;
    for kind in KINDS {
        let n = name("dropped");
        let guard = AnyGuard::take(&c, kind, &n, "a", LONG).await;
        let lease = guard.lease();
        drop(guard);
        let b = take_ok(&c, kind, &n, "b", LONG, PATIENCE).await;
        assert!(b.fencing_token > lease.fencing_token);
        assert!(
            Instant::now() < lease.expires_at,
            "{kind}: b waited for the dropped guard's lease to run out"
        );
    }
    close(c).await;
}

// === the randomized history checker ===

/// One holder's belief that it held a name: from the moment its acquire (campaign)
/// returned until it decided to give the lease up or the lease's deadline passed,
/// whichever came first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    /// The holder.
    pub owner: String,
    /// Its lease's fencing token.
    pub token: u64,
    /// When the grant reached the holder.
    pub start: Instant,
    /// When it stopped believing it held the name.
    pub end: Instant,
}

/// Checks a history of [`Interval`]s of one name: tokens are unique, no two
/// non-empty intervals overlap, and in time order their tokens increase.
///
/// Sound for any scheduling: if the backend keeps its contract, a lease's deadline
/// is no later than the moment the name is freed, and the next grant reaches its
/// holder only after that.
///
/// # Errors
/// A description of the first violation.
pub fn check_history(intervals: &[Interval]) -> Result<(), String> {
    let mut tokens = BTreeSet::new();
    for i in intervals {
        if !tokens.insert(i.token) {
            return Err(format!("token {} was issued twice", i.token));
        }
    }
    let Some(origin) = intervals.iter().map(|i| i.start).min() else {
        return Ok(());
    };
    let at = |t: Instant| format!("{:?}", t.saturating_duration_since(origin));
    let mut held: Vec<&Interval> = intervals.iter().filter(|i| i.end > i.start).collect();
    held.sort_by_key(|i| i.start);
    for pair in held.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.start < a.end {
            return Err(format!(
                "{} (token {}) held it from {} to {}, and {} (token {}) from {} to {}",
                a.owner,
                a.token,
                at(a.start),
                at(a.end),
                b.owner,
                b.token,
                at(b.start),
                at(b.end)
            ));
        }
        if b.token <= a.token {
            return Err(format!(
                "{} got token {} at {}, after {} had token {} at {}",
                b.owner,
                b.token,
                at(b.start),
                a.owner,
                a.token,
                at(a.start)
            ));
        }
    }
    Ok(())
}

/// splitmix64: small, seedable, good enough to pick behaviours.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A random part (0 to `max_permille`‰) of `d`.
    fn part(&mut self, d: Duration, max_permille: u64) -> Duration {
        d * u32::try_from(self.below(max_permille + 1)).unwrap_or(0) / 1000
    }
}

/// `TRELLIS_CONTRACT_SEED`, or the clock.
fn seed() -> u64 {
    std::env::var("TRELLIS_CONTRACT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
                u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0)
            })
        })
}

const WORKERS: u64 = 5;
const ROUNDS: u64 = 6;
const HISTORY_TTL: Duration = Duration::from_millis(150);

/// Gives the lease up (it was decided at `decided`); when the holder stopped
/// believing it held it.
async fn finish(c: &dyn Coordinator, lease: &Lease) -> Instant {
    let decided = Instant::now();
    match give_up(c, lease).await {
        Ok(()) => {}
        Err(CoordError::NotHolder { .. }) => assert!(
            Instant::now() >= lease.expires_at,
            "{} {}: giving up refused while the lease was valid",
            lease.kind,
            lease.name
        ),
        Err(e) => panic!("give up: {e}"),
    }
    decided.min(lease.expires_at)
}

/// One contender: takes the name, then holds and gives up, or extends a few times,
/// or stops caring and lets the lease run out.
async fn contender(
    c: Arc<dyn Coordinator>,
    kind: Kind,
    n: Name,
    owner: String,
    mut rng: Rng,
) -> Vec<Interval> {
    let mut history = Vec::new();
    for _ in 0..ROUNDS {
        sleep(rng.part(HISTORY_TTL, 500)).await;
        let mut lease = match take(c.as_ref(), kind, &n, &owner, HISTORY_TTL, PATIENCE).await {
            Ok(lease) => lease,
            Err(CoordError::Timeout { .. }) => continue,
            Err(e) => panic!("{kind} {n}: {owner}: {e}"),
        };
        let start = Instant::now();
        let end = match rng.below(3) {
            0 => {
                sleep(rng.part(lease.ttl, 800)).await;
                finish(c.as_ref(), &lease).await
            }
            1 => {
                let mut lost = None;
                for _ in 0..=rng.below(3) {
                    sleep(lease.ttl / 3).await;
                    if Instant::now() >= lease.expires_at {
                        lost = Some(lease.expires_at);
                        break;
                    }
                    match renew(c.as_ref(), &lease, lease.ttl).await {
                        Ok(renewed) => {
                            assert_eq!(renewed.fencing_token, lease.fencing_token);
                            lease = renewed;
                        }
                        Err(CoordError::NotHolder { .. }) => {
                            assert!(
                                Instant::now() >= lease.expires_at,
                                "{kind} {n}: extend refused while the lease was valid"
                            );
                            lost = Some(lease.expires_at);
                            break;
                        }
                        Err(e) => panic!("{kind} {n}: extend: {e}"),
                    }
                }
                match lost {
                    Some(end) => end,
                    None => finish(c.as_ref(), &lease).await,
                }
            }
            _ => {
                // Stops extending (a paused or dead holder): the lease runs out.
                sleep_until(lease.expires_at + lease.ttl / 4).await;
                lease.expires_at
            }
        };
        history.push(Interval {
            owner: owner.clone(),
            token: lease.fencing_token,
            start,
            end,
        });
    }
    history
}

async fn history_is_consistent(h: &impl Harness, kind: Kind) {
    let c = h.open().await;
    let n = name(&format!("history-{kind}"));
    let seed = seed();
    eprintln!("{kind} history: TRELLIS_CONTRACT_SEED={seed}");
    let mut rng = Rng(seed);

    // For elections, an observer checks terms only ever move forward.
    let (stop, stopped) = oneshot::channel::<()>();
    let observed = Arc::new(Mutex::new(Vec::new()));
    let observer = if kind == Kind::Election {
        let mut rx = c.observe(&n).await.expect("observe");
        let observed = Arc::clone(&observed);
        Some(tokio::spawn(async move {
            let mut stopped = stopped;
            loop {
                let current = rx.borrow_and_update().as_ref().map(|l| l.fencing_token);
                if let Some(token) = current {
                    let mut seen = observed.lock().await;
                    if seen.last() != Some(&token) {
                        seen.push(token);
                    }
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    _ = &mut stopped => break,
                }
            }
        }))
    } else {
        None
    };

    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        tasks.push(tokio::spawn(contender(
            Arc::clone(&c),
            kind,
            n.clone(),
            format!("contender-{w}"),
            Rng(rng.next()),
        )));
    }
    let mut history = Vec::new();
    for t in tasks {
        history.extend(t.await.expect("contender"));
    }
    let _ = stop.send(());
    if let Some(observer) = observer {
        observer.await.expect("observer");
    }
    check_history(&history).unwrap_or_else(|e| panic!("{kind}, seed {seed}: {e}"));
    let held = history.iter().filter(|i| i.end > i.start).count();
    assert!(
        history.len() as u64 >= WORKERS * ROUNDS / 2 && held > 0,
        "{kind}, seed {seed}: only {} leases granted, {held} held",
        history.len()
    );
    let observed = observed.lock().await;
    if kind == Kind::Election {
        assert!(
            observed.windows(2).all(|w| w[0] < w[1]),
            "{kind}, seed {seed}: an observer saw terms go backwards: {observed:?}"
        );
        let granted: BTreeSet<u64> = history.iter().map(|i| i.token).collect();
        assert!(
            observed.iter().all(|t| granted.contains(t)),
            "{kind}, seed {seed}: an observer saw a term nobody was granted"
        );
        assert!(!observed.is_empty(), "the observer saw no leader at all");
    }
    close(c).await;
}

/// Randomized: five contenders take a lock with a short TTL, hold it for random
/// times, extend it, or stop extending so it expires. From each holder's point of
/// view (its lease's deadlines, the backend's clock), no two holders ever held it
/// at once, and tokens increase from holder to holder ([`check_history`]).
/// `TRELLIS_CONTRACT_SEED` replays a run's choices.
pub async fn lock_history_is_consistent(h: &impl Harness) {
    history_is_consistent(h, Kind::Lock).await;
}

/// As [`lock_history_is_consistent`], for leadership; an observer also checks that
/// terms only move forward and are ones actually granted.
pub async fn election_history_is_consistent(h: &impl Harness) {
    history_is_consistent(h, Kind::Election).await;
}

/// Invalid owners, TTLs and waits are [`CoordError::Invalid`] and change nothing.
pub async fn invalid_requests_are_refused(h: &impl Harness) {
    let c = h.open().await;
    let invalid = |r: Result<(), CoordError>, what: &str| match r {
        Err(CoordError::Invalid(_)) => {}
        other => panic!("{what}: expected Invalid, got {other:?}"),
    };
    for kind in KINDS {
        let n = name("invalid");
        for owner in ["", "a\nb", &"o".repeat(257)] {
            invalid(
                take(c.as_ref(), kind, &n, owner, LONG, Duration::ZERO)
                    .await
                    .map(drop),
                "bad owner",
            );
        }
        for ttl in [
            Duration::ZERO,
            Duration::from_millis(1),
            MAX_TTL + Duration::from_secs(1),
        ] {
            invalid(
                take(c.as_ref(), kind, &n, "a", ttl, Duration::ZERO)
                    .await
                    .map(drop),
                "bad ttl",
            );
        }
        invalid(
            take(
                c.as_ref(),
                kind,
                &n,
                "a",
                LONG,
                MAX_WAIT + Duration::from_secs(1),
            )
            .await
            .map(drop),
            "bad wait",
        );
        assert_eq!(holder_of(&c, kind, &n).await, None, "{kind}: nothing taken");
        let a = take_ok(&c, kind, &n, "a", LONG, Duration::ZERO).await;
        invalid(
            renew(c.as_ref(), &a, Duration::ZERO).await.map(drop),
            "extend with a bad ttl",
        );
        let nobody = Lease {
            owner: String::new(),
            ..a.clone()
        };
        invalid(
            give_up(c.as_ref(), &nobody).await,
            "give up with a bad owner",
        );
        invalid(
            renew(c.as_ref(), &nobody, LONG).await.map(drop),
            "extend with a bad owner",
        );
        let held = holder_of(&c, kind, &n).await;
        assert_eq!(
            held,
            Some(("a".to_owned(), a.fencing_token)),
            "{kind}: unchanged"
        );
        give_up(c.as_ref(), &a).await.expect("give up");
    }
    assert!(Name::new("a/b").is_err() && Name::new("").is_err());
    close(c).await;
}

/// A fresh backend is healthy; once closed, calls fail (and blocked ones return).
pub async fn health_and_close(h: &impl Harness) {
    let c = h.open().await;
    c.health().await.expect("healthy");
    assert!(!c.backend().is_empty());
    let n = name("closing");
    let a = take_ok(&c, Kind::Lock, &n, "a", LONG, Duration::ZERO).await;
    let waiter = {
        let (c, n) = (Arc::clone(&c), n.clone());
        tokio::spawn(async move { c.acquire(&n, "b", LONG, PATIENCE).await })
    };
    sleep(Duration::from_millis(50)).await;
    c.close().await.expect("close");
    let blocked = timeout(PATIENCE, waiter)
        .await
        .expect("a blocked call returns on close")
        .expect("waiter");
    assert!(
        blocked.is_err(),
        "b acquired from a closed backend: {blocked:?}"
    );
    assert!(c.acquire(&n, "c", LONG, Duration::ZERO).await.is_err());
    assert!(c.release(&n, "a", a.fencing_token).await.is_err());
    assert!(c.health().await.is_err());
}

#[cfg(test)]
mod test {
    use super::*;

    fn interval(owner: &str, token: u64, start_ms: u64, end_ms: u64, origin: Instant) -> Interval {
        Interval {
            owner: owner.into(),
            token,
            start: origin + Duration::from_millis(start_ms),
            end: origin + Duration::from_millis(end_ms),
        }
    }

    #[test]
    fn the_history_checker_finds_overlaps_and_old_tokens() {
        let o = Instant::now();
        let good = [
            interval("a", 1, 0, 100, o),
            interval("b", 2, 100, 150, o),
            // Got its lease after its deadline (a stall): never held it.
            interval("c", 3, 400, 300, o),
            interval("d", 5, 200, 250, o),
        ];
        assert_eq!(check_history(&good), Ok(()));
        assert_eq!(check_history(&[]), Ok(()));

        let overlap = [interval("a", 1, 0, 100, o), interval("b", 2, 99, 150, o)];
        let e = check_history(&overlap).expect_err("overlap");
        assert!(e.contains("a (token 1) held it from 0ns to 100ms"), "{e}");
        let backwards = [interval("a", 2, 0, 100, o), interval("b", 1, 100, 150, o)];
        assert!(check_history(&backwards).is_err_and(|e| e.contains("after a had token 2")));
        let twice = [interval("a", 1, 0, 10, o), interval("b", 1, 20, 30, o)];
        assert!(check_history(&twice).is_err_and(|e| e.contains("issued twice")));
    }

    #[test]
    fn rng_parts_stay_in_range() {
        let mut rng = Rng(7);
        for _ in 0..1000 {
            assert!(rng.part(Duration::from_millis(150), 500) <= Duration::from_millis(75));
            assert!(rng.below(3) < 3);
        }
    }
}
