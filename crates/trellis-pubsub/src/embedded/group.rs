//! One consumer group's delivery state on one topic: a state machine with the time
//! passed in, no I/O. The embedded backend feeds it records from the log and
//! persists [`Persisted`] snapshots.
//!
//! Every message at or after `committed` that is not settled is in exactly one place:
//! unread (at or after `next_read`), `ready` (read, waiting to be delivered), `in_flight`
//! (delivered, awaiting an ack), or `pending` (nacked or expired, waiting out its
//! backoff). A key is *held* by its earliest unsettled message once that one has been
//! delivered; later messages with the key stay in `ready` until it is settled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::api::{AckOutcome, GroupStats, SubscriptionSettings, backoff};

/// A message as the group sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Msg {
    pub(crate) offset: u64,
    pub(crate) key: Option<String>,
    pub(crate) json: Bytes,
}

#[derive(Debug)]
struct InFlight {
    msg: Msg,
    attempt: u32,
    deadline: Instant,
}

#[derive(Debug)]
struct Waiting {
    msg: Msg,
    attempt: u32,
    not_before: Instant,
}

/// A message leaving for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    pub(crate) msg: Msg,
    pub(crate) attempts: u32,
    pub(crate) reason: String,
}

/// What survives a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Persisted {
    pub(crate) committed: u64,
    pub(crate) settled: Vec<u64>,
    /// Deliveries so far of unsettled messages delivered at least once.
    pub(crate) attempts: Vec<(u64, u32)>,
    pub(crate) dead_lettered: u64,
}

impl Persisted {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.settled.len() * 8 + self.attempts.len() * 12);
        out.push(1);
        out.extend_from_slice(&self.committed.to_le_bytes());
        out.extend_from_slice(&self.dead_lettered.to_le_bytes());
        out.extend_from_slice(&(self.settled.len() as u64).to_le_bytes());
        for s in &self.settled {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&(self.attempts.len() as u64).to_le_bytes());
        for (offset, attempt) in &self.attempts {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&attempt.to_le_bytes());
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.first() != Some(&1) {
            return None;
        }
        let mut at = 1;
        let u64_at = |at: &mut usize| -> Option<u64> {
            let v = u64::from_le_bytes(bytes.get(*at..*at + 8)?.try_into().ok()?);
            *at += 8;
            Some(v)
        };
        let committed = u64_at(&mut at)?;
        let dead_lettered = u64_at(&mut at)?;
        let n = usize::try_from(u64_at(&mut at)?).ok()?;
        let mut settled = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            settled.push(u64_at(&mut at)?);
        }
        let n = usize::try_from(u64_at(&mut at)?).ok()?;
        let mut attempts = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            let offset = u64_at(&mut at)?;
            let attempt = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
            at += 4;
            attempts.push((offset, attempt));
        }
        (at == bytes.len()).then_some(Self {
            committed,
            settled,
            attempts,
            dead_lettered,
        })
    }
}

/// One delivery handed out by [`GroupState::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Handed {
    pub(crate) msg: Msg,
    pub(crate) attempt: u32,
}

/// A group's state on a topic.
#[derive(Debug, Default)]
pub(crate) struct GroupState {
    committed: u64,
    settled: BTreeSet<u64>,
    next_read: u64,
    /// Read, not in flight: (message, deliveries so far).
    ready: BTreeMap<u64, (Msg, u32)>,
    in_flight: BTreeMap<u64, InFlight>,
    pending: BTreeMap<u64, Waiting>,
    /// Deliveries so far of messages not yet re-read since a restart.
    restored: BTreeMap<u64, u32>,
    /// Key → the offset holding it.
    holders: HashMap<String, u64>,
    dead_lettered: u64,
    /// Bumped on every change worth persisting.
    pub(crate) version: u64,
}

impl GroupState {
    pub(crate) fn restore(persisted: Persisted) -> Self {
        Self {
            committed: persisted.committed,
            next_read: persisted.committed,
            settled: persisted
                .settled
                .into_iter()
                .filter(|s| *s >= persisted.committed)
                .collect(),
            restored: persisted.attempts.into_iter().collect(),
            dead_lettered: persisted.dead_lettered,
            ..Self::default()
        }
    }

    pub(crate) fn next_read(&self) -> u64 {
        self.next_read
    }

    /// Records the log no longer has (deleted by retention) are given up on.
    pub(crate) fn skip_to(&mut self, start: u64) {
        if self.next_read < start {
            tracing::warn!(
                from = self.next_read,
                to = start,
                "messages deleted by retention before this group read them"
            );
            self.next_read = start;
            self.settle_below(start);
        }
    }

    fn settle_below(&mut self, start: u64) {
        if self.committed < start {
            self.committed = start;
            self.settled = self.settled.split_off(&start);
            self.restored = self.restored.split_off(&start);
            self.version += 1;
        }
    }

    /// How many more records it wants read: room in flight plus look-ahead past
    /// blocked keys, bounded.
    pub(crate) fn wants(&self, settings: &SubscriptionSettings) -> usize {
        let cap = (settings.max_in_flight as usize).saturating_mul(2).max(16);
        cap.saturating_sub(self.ready.len() + self.in_flight.len())
    }

    /// Takes records read from the log at `next_read` and after, in order.
    pub(crate) fn offer(&mut self, msgs: Vec<Msg>) {
        for msg in msgs {
            if msg.offset < self.next_read {
                continue;
            }
            self.next_read = msg.offset + 1;
            if msg.offset < self.committed || self.settled.contains(&msg.offset) {
                continue;
            }
            let attempts = self.restored.remove(&msg.offset).unwrap_or(0);
            self.ready.insert(msg.offset, (msg, attempts));
        }
    }

    /// Moves expired deliveries to `pending`, and messages out of deliveries to the
    /// dead-letter list.
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        settings: &SubscriptionSettings,
    ) -> Vec<DeadLetter> {
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(o, _)| *o)
            .collect();
        let mut dead = Vec::new();
        for offset in expired {
            if let Some(f) = self.in_flight.remove(&offset) {
                self.version += 1;
                if f.attempt >= settings.max_deliveries {
                    dead.push(DeadLetter {
                        msg: f.msg,
                        attempts: f.attempt,
                        reason: "ack deadline expired on the last allowed delivery".into(),
                    });
                } else {
                    let not_before = now + backoff(settings, f.attempt);
                    self.pending.insert(
                        offset,
                        Waiting {
                            msg: f.msg,
                            attempt: f.attempt,
                            not_before,
                        },
                    );
                }
            }
        }
        dead
    }

    /// Up to `max` deliveries, oldest first, respecting ordering keys and
    /// `max_in_flight`.
    pub(crate) fn take(
        &mut self,
        now: Instant,
        settings: &SubscriptionSettings,
        max: usize,
    ) -> Vec<Handed> {
        let room = (settings.max_in_flight as usize)
            .saturating_sub(self.in_flight.len())
            .min(max);
        let mut out = Vec::new();
        if room == 0 {
            return out;
        }
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, w)| w.not_before <= now)
            .map(|(o, _)| *o)
            .collect();
        let candidates: BTreeSet<u64> = due.into_iter().chain(self.ready.keys().copied()).collect();
        for offset in candidates {
            if out.len() >= room {
                break;
            }
            let (msg, attempts) = if let Some(w) = self.pending.remove(&offset) {
                (w.msg, w.attempt)
            } else {
                let Some((msg, _)) = self.ready.get(&offset) else {
                    continue;
                };
                if let Some(key) = &msg.key
                    && self
                        .holders
                        .get(key)
                        .is_some_and(|holder| *holder != offset)
                {
                    continue;
                }
                let Some((msg, attempts)) = self.ready.remove(&offset) else {
                    continue;
                };
                (msg, attempts)
            };
            if let Some(key) = &msg.key {
                self.holders.insert(key.clone(), offset);
            }
            let attempt = attempts + 1;
            self.in_flight.insert(
                offset,
                InFlight {
                    msg: msg.clone(),
                    attempt,
                    deadline: now + settings.ack_deadline,
                },
            );
            out.push(Handed { msg, attempt });
        }
        if !out.is_empty() {
            self.version += 1;
        }
        out
    }

    /// When something may next become deliverable by time alone.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let pending = self.pending.values().map(|w| w.not_before).min();
        let deadline = self.in_flight.values().map(|f| f.deadline).min();
        pending.into_iter().chain(deadline).min()
    }

    fn matches(&self, offset: u64, attempt: u32) -> Option<AckOutcome> {
        if offset < self.committed || self.settled.contains(&offset) {
            return Some(AckOutcome::Expired);
        }
        let current = self
            .in_flight
            .get(&offset)
            .map(|f| f.attempt)
            .or_else(|| self.pending.get(&offset).map(|w| w.attempt))
            .or_else(|| self.ready.get(&offset).map(|r| r.1))
            .or_else(|| self.restored.get(&offset).copied());
        match current {
            Some(a) if a == attempt => None,
            Some(_) => Some(AckOutcome::Expired),
            None => Some(AckOutcome::NotFound),
        }
    }

    /// Settles delivery `attempt` of `offset`. A late ack (deadline passed, not yet
    /// redelivered) still counts.
    pub(crate) fn ack(&mut self, offset: u64, attempt: u32) -> AckOutcome {
        if let Some(outcome) = self.matches(offset, attempt) {
            return outcome;
        }
        self.settle(offset);
        AckOutcome::Ok
    }

    /// Returns a delivery for redelivery after `delay` (else the backoff); dead-letters
    /// it if that was its last allowed delivery.
    pub(crate) fn nack(
        &mut self,
        offset: u64,
        attempt: u32,
        delay: Option<Duration>,
        now: Instant,
        settings: &SubscriptionSettings,
    ) -> (AckOutcome, Option<DeadLetter>) {
        if let Some(outcome) = self.matches(offset, attempt) {
            return (outcome, None);
        }
        let Some(f) = self.in_flight.remove(&offset) else {
            // Already pending or ready again: nothing more to do.
            return (AckOutcome::Ok, None);
        };
        self.version += 1;
        if f.attempt >= settings.max_deliveries {
            let reason = "nacked on the last allowed delivery".to_owned();
            return (
                AckOutcome::Ok,
                Some(DeadLetter {
                    msg: f.msg,
                    attempts: f.attempt,
                    reason,
                }),
            );
        }
        let not_before = now + delay.unwrap_or_else(|| backoff(settings, f.attempt));
        self.pending.insert(
            offset,
            Waiting {
                msg: f.msg,
                attempt: f.attempt,
                not_before,
            },
        );
        (AckOutcome::Ok, None)
    }

    /// Moves a delivery's deadline to `by` from `now`.
    pub(crate) fn extend(
        &mut self,
        offset: u64,
        attempt: u32,
        by: Duration,
        now: Instant,
    ) -> AckOutcome {
        match self.in_flight.get_mut(&offset) {
            Some(f) if f.attempt == attempt => {
                f.deadline = now + by;
                AckOutcome::Ok
            }
            _ => self.matches(offset, attempt).unwrap_or(AckOutcome::Expired),
        }
    }

    /// Takes a delivery out for dead-lettering (the caller settles it once the dead
    /// letter is stored).
    pub(crate) fn reject(
        &mut self,
        offset: u64,
        attempt: u32,
        reason: &str,
    ) -> (AckOutcome, Option<DeadLetter>) {
        if let Some(outcome) = self.matches(offset, attempt) {
            return (outcome, None);
        }
        let taken = self
            .in_flight
            .remove(&offset)
            .map(|f| (f.msg, f.attempt))
            .or_else(|| self.pending.remove(&offset).map(|w| (w.msg, w.attempt)));
        match taken {
            Some((msg, attempts)) => {
                self.version += 1;
                (
                    AckOutcome::Ok,
                    Some(DeadLetter {
                        msg,
                        attempts,
                        reason: reason.to_owned(),
                    }),
                )
            }
            None => (AckOutcome::Expired, None),
        }
    }

    /// A dead letter could not be stored: it waits in `pending` and is tried again.
    pub(crate) fn dead_letter_failed(&mut self, dead: DeadLetter, now: Instant) {
        self.pending.insert(
            dead.msg.offset,
            Waiting {
                msg: dead.msg,
                attempt: dead.attempts,
                not_before: now + Duration::from_secs(1),
            },
        );
    }

    /// A dead letter is stored: the message is settled.
    pub(crate) fn dead_lettered(&mut self, offset: u64) {
        self.dead_lettered += 1;
        self.settle(offset);
    }

    /// Pending messages already past their last delivery (after a failed dead-letter
    /// attempt): back to the dead-letter list.
    pub(crate) fn overdue_dead_letters(
        &mut self,
        now: Instant,
        settings: &SubscriptionSettings,
    ) -> Vec<DeadLetter> {
        let over: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, w)| w.attempt >= settings.max_deliveries && w.not_before <= now)
            .map(|(o, _)| *o)
            .collect();
        over.into_iter()
            .filter_map(|o| self.pending.remove(&o))
            .map(|w| DeadLetter {
                msg: w.msg,
                attempts: w.attempt,
                reason: "delivered the maximum number of times".into(),
            })
            .collect()
    }

    fn settle(&mut self, offset: u64) {
        let msg = self
            .in_flight
            .remove(&offset)
            .map(|f| f.msg)
            .or_else(|| self.pending.remove(&offset).map(|w| w.msg))
            .or_else(|| self.ready.remove(&offset).map(|r| r.0));
        self.restored.remove(&offset);
        if let Some(key) = msg.and_then(|m| m.key)
            && self.holders.get(&key) == Some(&offset)
        {
            self.holders.remove(&key);
        }
        if offset == self.committed {
            self.committed += 1;
            while self.settled.remove(&self.committed) {
                self.committed += 1;
            }
        } else if offset > self.committed {
            self.settled.insert(offset);
        }
        self.version += 1;
    }

    pub(crate) fn persisted(&self) -> Persisted {
        let attempts = self
            .in_flight
            .iter()
            .map(|(o, f)| (*o, f.attempt))
            .chain(self.pending.iter().map(|(o, w)| (*o, w.attempt)))
            .chain(
                self.ready
                    .iter()
                    .filter(|(_, r)| r.1 > 0)
                    .map(|(o, r)| (*o, r.1)),
            )
            .chain(self.restored.iter().map(|(o, a)| (*o, *a)))
            .collect();
        Persisted {
            committed: self.committed,
            settled: self.settled.iter().copied().collect(),
            attempts,
            dead_lettered: self.dead_lettered,
        }
    }

    pub(crate) fn stats(&self, group: &str, head: u64) -> GroupStats {
        GroupStats {
            group: group.to_owned(),
            committed: self.committed,
            lag: head
                .saturating_sub(self.committed)
                .saturating_sub(self.settled.len() as u64),
            in_flight: self.in_flight.len() as u64,
            pending_redelivery: self.pending.len() as u64,
            dead_lettered: self.dead_lettered,
        }
    }
}

#[cfg(test)]
mod test {
    use proptest::prelude::*;

    use super::*;

    fn settings() -> SubscriptionSettings {
        SubscriptionSettings {
            ack_deadline: Duration::from_secs(10),
            max_deliveries: 3,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            max_in_flight: 100,
            dead_letter_topic: None,
        }
    }

    fn msg(offset: u64, key: Option<&str>) -> Msg {
        Msg {
            offset,
            key: key.map(str::to_owned),
            json: Bytes::from(format!("m{offset}")),
        }
    }

    fn offsets(handed: &[Handed]) -> Vec<u64> {
        handed.iter().map(|h| h.msg.offset).collect()
    }

    #[test]
    fn ordering_keys_serialize_per_key_and_parallelize_across_keys() {
        let s = settings();
        let now = Instant::now();
        let mut g = GroupState::default();
        g.offer(vec![
            msg(0, Some("a")),
            msg(1, Some("b")),
            msg(2, Some("a")),
            msg(3, None),
            msg(4, Some("b")),
        ]);
        assert_eq!(
            offsets(&g.take(now, &s, 10)),
            [0, 1, 3],
            "2 and 4 wait for their keys"
        );
        assert_eq!(g.ack(1, 1), AckOutcome::Ok);
        assert_eq!(offsets(&g.take(now, &s, 10)), [4]);
        assert_eq!(g.ack(0, 1), AckOutcome::Ok);
        assert_eq!(offsets(&g.take(now, &s, 10)), [2]);
    }

    #[test]
    fn a_nacked_message_keeps_its_key_until_settled() {
        let s = settings();
        let now = Instant::now();
        let mut g = GroupState::default();
        g.offer(vec![msg(0, Some("a")), msg(1, Some("a"))]);
        assert_eq!(offsets(&g.take(now, &s, 10)), [0]);
        assert_eq!(g.nack(0, 1, None, now, &s), (AckOutcome::Ok, None));
        assert!(
            g.take(now, &s, 10).is_empty(),
            "0 waits out its backoff; 1 waits for 0"
        );
        let later = now + Duration::from_secs(1);
        let again = g.take(later, &s, 10);
        assert_eq!((offsets(&again), again[0].attempt), (vec![0], 2));
        g.ack(0, 2);
        assert_eq!(offsets(&g.take(later, &s, 10)), [1]);
    }

    #[test]
    fn deadlines_expire_into_backoff_then_the_dead_letter_list() {
        let s = settings();
        let mut now = Instant::now();
        let mut g = GroupState::default();
        g.offer(vec![msg(0, None)]);
        for attempt in 1..=3u32 {
            let handed = g.take(now, &s, 1);
            assert_eq!((offsets(&handed), handed[0].attempt), (vec![0], attempt));
            now += s.ack_deadline;
            let dead = g.expire(now, &s);
            if attempt < 3 {
                assert!(dead.is_empty());
                assert!(g.take(now, &s, 1).is_empty(), "backoff first");
                now += backoff(&s, attempt);
            } else {
                assert_eq!(dead.len(), 1);
                assert_eq!(dead[0].attempts, 3);
                g.dead_lettered(0);
            }
        }
        assert_eq!(
            g.stats("g", 1),
            GroupStats {
                group: "g".into(),
                committed: 1,
                lag: 0,
                in_flight: 0,
                pending_redelivery: 0,
                dead_lettered: 1
            }
        );
    }

    #[test]
    fn acks_of_stale_or_unknown_deliveries() {
        let s = settings();
        let now = Instant::now();
        let mut g = GroupState::default();
        g.offer(vec![msg(0, None), msg(1, None)]);
        g.take(now, &s, 10);
        assert_eq!(g.ack(0, 2), AckOutcome::Expired, "not that delivery");
        assert_eq!(g.ack(7, 1), AckOutcome::NotFound);
        assert_eq!(g.ack(0, 1), AckOutcome::Ok);
        assert_eq!(g.ack(0, 1), AckOutcome::Expired, "already settled");
        // Late ack: the deadline passed but it wasn't redelivered yet.
        let late = now + s.ack_deadline;
        g.expire(late, &s);
        assert_eq!(g.ack(1, 1), AckOutcome::Ok);
        assert_eq!(g.stats("g", 2).committed, 2);
    }

    #[test]
    fn max_in_flight_is_backpressure() {
        let s = SubscriptionSettings {
            max_in_flight: 2,
            ..settings()
        };
        let now = Instant::now();
        let mut g = GroupState::default();
        assert_eq!(g.wants(&s), 16);
        g.offer((0..5).map(|o| msg(o, None)).collect());
        assert_eq!(offsets(&g.take(now, &s, 10)), [0, 1]);
        assert!(g.take(now, &s, 10).is_empty());
        g.ack(0, 1);
        assert_eq!(offsets(&g.take(now, &s, 10)), [2]);
    }

    #[test]
    fn restart_restores_positions_and_delivery_counts() {
        let s = settings();
        let now = Instant::now();
        let mut g = GroupState::default();
        g.offer((0..4).map(|o| msg(o, Some("k"))).collect());
        g.take(now, &s, 10);
        g.ack(0, 1);
        g.offer(vec![]);
        let handed = g.take(now, &s, 10);
        assert_eq!(offsets(&handed), [1]);
        let bytes = g.persisted().encode();
        let mut r = GroupState::restore(Persisted::decode(&bytes).expect("decodes"));
        assert_eq!(r.next_read(), 1);
        r.offer((1..4).map(|o| msg(o, Some("k"))).collect());
        let again = r.take(now, &s, 10);
        assert_eq!(
            (offsets(&again), again[0].attempt),
            (vec![1], 2),
            "redelivered with its count"
        );
        // An ack of the delivery made before the restart still works.
        let mut r2 = GroupState::restore(Persisted::decode(&bytes).expect("decodes"));
        assert_eq!(r2.ack(1, 1), AckOutcome::Ok);
        r2.offer((1..4).map(|o| msg(o, Some("k"))).collect());
        assert_eq!(offsets(&r2.take(now, &s, 10)), [2]);
    }

    proptest! {
        /// Under any sequence of takes, acks, nacks and expiries: every message is
        /// delivered until settled, keys never have two messages in flight, and a key's
        /// messages are first delivered in offset order.
        #[test]
        fn the_invariants_hold(ops in proptest::collection::vec((0u8..4, 0u64..12, 1u64..3), 1..200)) {
            let s = SubscriptionSettings { max_deliveries: 1000, ..settings() };
            let mut now = Instant::now();
            let mut g = GroupState::default();
            let n = 12u64;
            g.offer((0..n).map(|o| msg(o, Some(["a", "b", "c"][(o % 3) as usize]))).collect());
            let mut in_flight: HashMap<u64, u32> = HashMap::new();
            let mut first_delivered: Vec<u64> = Vec::new();
            let mut settled = BTreeSet::new();
            for (op, target, step) in ops {
                match op {
                    0 => {
                        for h in g.take(now, &s, 5) {
                            let key = h.msg.key.clone().expect("keyed");
                            for o in in_flight.keys() {
                                prop_assert_ne!(Some(key.as_str()), ["a", "b", "c"].get((*o % 3) as usize).copied(), "two in flight for key {}", key);
                            }
                            if h.attempt == 1 { first_delivered.push(h.msg.offset); }
                            in_flight.insert(h.msg.offset, h.attempt);
                        }
                    }
                    1 => if let Some(a) = in_flight.remove(&target) {
                        prop_assert_eq!(g.ack(target, a), AckOutcome::Ok);
                        settled.insert(target);
                    },
                    2 => if let Some(a) = in_flight.remove(&target) {
                        g.nack(target, a, Some(Duration::ZERO), now, &s);
                    },
                    _ => {
                        now += Duration::from_secs(step * 10);
                        g.expire(now, &s);
                        in_flight.clear();
                    }
                }
            }
            for key in 0..3u64 {
                let order: Vec<u64> = first_delivered.iter().copied().filter(|o| o % 3 == key).collect();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                prop_assert_eq!(order, sorted, "key order");
            }
            // Drain: everything unsettled is still deliverable.
            for _ in 0..200 {
                now += Duration::from_secs(100);
                g.expire(now, &s);
                for h in g.take(now, &s, 100) {
                    g.ack(h.msg.offset, h.attempt);
                    settled.insert(h.msg.offset);
                }
            }
            prop_assert_eq!(settled.len() as u64, n, "every message gets settled");
            prop_assert_eq!(g.stats("g", n).committed, n);
        }

        #[test]
        fn persisted_state_round_trips(committed: u64, settled in proptest::collection::vec(any::<u64>(), 0..20), attempts in proptest::collection::vec((any::<u64>(), any::<u32>()), 0..20), dead: u64) {
            let p = Persisted { committed, settled, attempts, dead_lettered: dead };
            prop_assert_eq!(Persisted::decode(&p.encode()), Some(p));
        }
    }
}
