//! What one process knows about one consumer group on one topic: the JetStream
//! messages it fetched and what became of them. A state machine with the time passed
//! in and no I/O; `M` is the handle used to ack a message (a JetStream message, or
//! `()` in tests).
//!
//! Each position this process holds is in one slot:
//! - `Buffered`: fetched, not handed out (its key is held, or nobody took it yet); kept
//!   alive on the server with progress acks;
//! - `InFlight`: handed out, awaiting an ack;
//! - `Away`: nacked (or being dead-lettered after a failure): the server redelivers it;
//! - `Settling`: an ack, or a dead-letter publish, is on its way.
//!
//! Settled positions are remembered (boundedly) so their ack ids report `Expired`.
//! A key is *held* by the position that was handed out for it until that position is
//! settled (acked or dead-lettered); a nacked holder keeps its key.
//!
//! A process that binds to a consumer with deliveries outstanding (from a previous
//! process) doesn't know their keys, so it holds back every keyed message behind a
//! *barrier* until it has seen each of them again (the server redelivers them after
//! their deadline) or the consumer's ack floor has passed them all.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::api::{AckOutcome, SubscriptionSettings};

/// Settled positions remembered for `Expired` answers.
const REMEMBERED: usize = 16_384;
/// How long past its expected redelivery a nacked holder keeps its key before this
/// process assumes another one got the redelivery.
const STALE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    Buffered,
    InFlight,
    Away,
    Settling,
}

#[derive(Debug)]
struct Entry<M> {
    slot: Slot,
    /// The slot to return to if settling fails.
    before: Slot,
    attempt: u32,
    key: Option<String>,
    json: Bytes,
    handle: M,
    /// When the server redelivers it unless acked or kept alive.
    server_deadline: Instant,
    /// `extend`ed until.
    extend_until: Option<Instant>,
    /// When to send the next progress ack.
    next_keepalive: Option<Instant>,
    /// When an `Away` message is due back.
    expect_by: Instant,
}

/// A message leaving for the dead-letter topic.
#[derive(Debug, Clone)]
pub(super) struct DeadLetter<M> {
    pub(super) position: u64,
    pub(super) attempts: u32,
    pub(super) reason: String,
    pub(super) json: Bytes,
    pub(super) handle: M,
    /// Which delivery (the server's count) to settle once stored.
    pub(super) delivery: u32,
}

/// A delivery handed out by [`GroupState::take`].
#[derive(Debug, Clone)]
pub(super) struct Handed<M> {
    pub(super) position: u64,
    pub(super) attempt: u32,
    pub(super) key: Option<String>,
    pub(super) json: Bytes,
    /// Set when the message waited in the buffer long enough that its deadline
    /// should be reset with a progress ack.
    pub(super) refresh: Option<M>,
}

/// What to do about a nack.
#[derive(Debug)]
pub(super) enum Nacked<M> {
    /// Tell the server to redeliver after the delay.
    Nak(M, Duration),
    /// It was the last allowed delivery.
    DeadLetter(DeadLetter<M>),
    /// Already waiting for redelivery.
    AlreadyAway,
}

/// Counts for stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) in_flight: u64,
    pub(super) buffered: u64,
    pub(super) away: u64,
}

/// Deliveries outstanding when this process bound to the consumer.
#[derive(Debug)]
struct Barrier {
    /// The highest position delivered then.
    position: u64,
    /// How many were unacked then.
    outstanding: usize,
    /// Those seen again since.
    seen: HashSet<u64>,
    /// When the ack floor was last checked.
    checked: Instant,
}

/// A group's local state on a topic.
#[derive(Debug)]
pub(super) struct GroupState<M> {
    pub(super) settings: SubscriptionSettings,
    entries: BTreeMap<u64, Entry<M>>,
    barrier: Option<Barrier>,
    /// Recently settled positions → the settled delivery.
    settled: BTreeMap<u64, u32>,
    holders: HashMap<String, u64>,
    pub(super) dead_lettered: u64,
}

fn third(d: Duration) -> Duration {
    (d / 3).max(Duration::from_millis(2))
}

impl<M: Clone> GroupState<M> {
    pub(super) fn new(settings: SubscriptionSettings) -> Self {
        Self {
            settings,
            entries: BTreeMap::new(),
            barrier: None,
            settled: BTreeMap::new(),
            holders: HashMap::new(),
            dead_lettered: 0,
        }
    }

    fn count(&self, slots: &[Slot]) -> usize {
        self.entries
            .values()
            .filter(|e| slots.contains(&e.slot))
            .count()
    }

    /// Sets the barrier when binding to a consumer that has `outstanding` unacked
    /// deliveries at or below `delivered`, with its ack floor at `ack_floor`.
    pub(super) fn set_barrier(
        &mut self,
        now: Instant,
        delivered: u64,
        outstanding: u64,
        ack_floor: u64,
    ) {
        if outstanding > 0 && ack_floor < delivered {
            self.barrier = Some(Barrier {
                position: delivered,
                outstanding: usize::try_from(outstanding).unwrap_or(usize::MAX),
                seen: HashSet::new(),
                checked: now,
            });
        }
    }

    /// Whether the ack floor should be checked to lift the barrier (at most once a
    /// second).
    pub(super) fn barrier_check_due(&mut self, now: Instant) -> bool {
        match &mut self.barrier {
            Some(b) if b.checked + Duration::from_secs(1) <= now => {
                b.checked = now;
                true
            }
            _ => false,
        }
    }

    /// The consumer's ack floor is at `ack_floor` with `ack_pending` deliveries
    /// unacked; returns whether that lifted the barrier: it lifts when the floor has
    /// passed it, or every unacked delivery is one this process holds.
    pub(super) fn consumer_state(&mut self, ack_floor: u64, ack_pending: u64) -> bool {
        let held = self.count(&[Slot::Buffered, Slot::InFlight, Slot::Away]) as u64;
        if self
            .barrier
            .as_ref()
            .is_some_and(|b| ack_floor >= b.position || ack_pending <= held)
        {
            self.barrier = None;
            return true;
        }
        false
    }

    /// Counts for stats.
    pub(super) fn counts(&self) -> Counts {
        Counts {
            in_flight: self.count(&[Slot::InFlight, Slot::Settling]) as u64,
            buffered: self.count(&[Slot::Buffered]) as u64,
            away: self.count(&[Slot::Away]) as u64,
        }
    }

    /// How many messages to fetch from the server for a pull wanting `want` more:
    /// bounded by `max_in_flight` less what is in flight or buffered.
    pub(super) fn fetch_room(&self, want: usize) -> usize {
        let held = self.count(&[Slot::InFlight, Slot::Settling, Slot::Buffered]);
        (self.settings.max_in_flight as usize)
            .saturating_sub(held)
            .min(want)
    }

    /// When the earliest nacked message is due back.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.slot == Slot::Away)
            .map(|e| e.expect_by)
            .min()
    }

    /// Whether the server's `max_ack_pending` is reached by what this process holds,
    /// nacked messages included.
    pub(super) fn server_full(&self) -> bool {
        self.entries.len() >= self.settings.max_in_flight as usize
    }

    /// Takes a message the server delivered (delivery number `attempt`). Returns a
    /// dead letter if it is past `max_deliveries` (its last deadline expired), else
    /// buffers it and says whether it can be handed out at once.
    pub(super) fn accept(
        &mut self,
        now: Instant,
        position: u64,
        attempt: u32,
        key: Option<String>,
        json: Bytes,
        handle: M,
    ) -> Result<bool, DeadLetter<M>> {
        let ack_wait = self.settings.ack_deadline;
        self.settled.remove(&position);
        let mut lifted = false;
        if let Some(b) = &mut self.barrier
            && position <= b.position
        {
            b.seen.insert(position);
            if b.seen.len() >= b.outstanding {
                self.barrier = None;
                lifted = true;
            }
        }
        if attempt > self.settings.max_deliveries {
            let attempts = attempt - 1;
            self.entries.insert(
                position,
                Entry {
                    slot: Slot::Settling,
                    before: Slot::Away,
                    attempt,
                    key: key.clone(),
                    json: json.clone(),
                    handle: handle.clone(),
                    server_deadline: now + ack_wait,
                    extend_until: None,
                    next_keepalive: None,
                    expect_by: now,
                },
            );
            return Err(DeadLetter {
                position,
                attempts,
                reason: "ack deadline expired on the last allowed delivery".into(),
                json,
                handle,
                delivery: attempt,
            });
        }
        let eligible = lifted
            || key.as_ref().is_none_or(|k| {
                self.barrier.is_none() && self.holders.get(k).is_none_or(|h| *h == position)
            });
        self.entries.insert(
            position,
            Entry {
                slot: Slot::Buffered,
                before: Slot::Buffered,
                attempt,
                key,
                json,
                handle,
                server_deadline: now + ack_wait,
                extend_until: None,
                next_keepalive: Some(now + third(ack_wait)),
                expect_by: now,
            },
        );
        Ok(eligible)
    }

    /// How many buffered messages [`take`](Self::take) could hand out now (ignoring
    /// `max_in_flight`).
    pub(super) fn ready(&self) -> usize {
        if self.barrier.is_some() {
            return self
                .entries
                .values()
                .filter(|e| e.slot == Slot::Buffered && e.key.is_none())
                .count();
        }
        let mut claimed: HashSet<&str> = HashSet::new();
        self.entries
            .iter()
            .filter(|(position, e)| {
                e.slot == Slot::Buffered
                    && e.key.as_deref().is_none_or(|key| {
                        self.holders
                            .get(key)
                            .map_or_else(|| claimed.insert(key), |holder| holder == *position)
                    })
            })
            .count()
    }

    /// Up to `max` deliveries, oldest first, respecting ordering keys and
    /// `max_in_flight`.
    pub(super) fn take(&mut self, now: Instant, max: usize) -> Vec<Handed<M>> {
        let ack_wait = self.settings.ack_deadline;
        let in_flight = self.count(&[Slot::InFlight, Slot::Settling]);
        let limit = (self.settings.max_in_flight as usize)
            .saturating_sub(in_flight)
            .min(max);
        let mut out = Vec::new();
        if limit == 0 {
            return out;
        }
        let barrier = self.barrier.is_some();
        for (position, e) in &mut self.entries {
            if out.len() >= limit {
                break;
            }
            if e.slot != Slot::Buffered {
                continue;
            }
            if let Some(key) = &e.key {
                if barrier {
                    continue;
                }
                match self.holders.get(key) {
                    Some(holder) if holder != position => continue,
                    Some(_) => {}
                    None => {
                        self.holders.insert(key.clone(), *position);
                    }
                }
            }
            e.slot = Slot::InFlight;
            e.next_keepalive = None;
            e.extend_until = None;
            // Waited a tenth of its deadline or more: reset the server's clock.
            let refresh = (e.server_deadline < now + ack_wait - ack_wait / 10).then(|| {
                e.server_deadline = now + ack_wait;
                e.handle.clone()
            });
            out.push(Handed {
                position: *position,
                attempt: e.attempt,
                key: e.key.clone(),
                json: e.json.clone(),
                refresh,
            });
        }
        out
    }

    /// Whether delivery `attempt` of `position` is in flight.
    pub(super) fn is_in_flight(&self, position: u64, attempt: u32) -> bool {
        self.entries
            .get(&position)
            .is_some_and(|e| e.attempt == attempt && e.slot == Slot::InFlight)
    }

    fn outcome(&self, position: u64, attempt: u32) -> AckOutcome {
        match self.entries.get(&position) {
            // Never handed out in this delivery.
            Some(e) if e.slot == Slot::Buffered && attempt >= e.attempt => AckOutcome::NotFound,
            Some(_) => AckOutcome::Expired,
            None if self.settled.contains_key(&position) => AckOutcome::Expired,
            None => AckOutcome::NotFound,
        }
    }

    fn current(&mut self, position: u64, attempt: u32, slots: &[Slot]) -> Option<&mut Entry<M>> {
        self.entries
            .get_mut(&position)
            .filter(|e| e.attempt == attempt && slots.contains(&e.slot))
    }

    fn begin_settling(&mut self, position: u64, attempt: u32, slots: &[Slot]) -> Option<&Entry<M>> {
        let e = self.current(position, attempt, slots)?;
        e.before = e.slot;
        e.slot = Slot::Settling;
        e.next_keepalive = None;
        Some(e)
    }

    /// Starts acking delivery `attempt` of `position`: the handle to ack with, or why
    /// not. A late ack (deadline passed, not redelivered here) still counts.
    pub(super) fn begin_ack(&mut self, position: u64, attempt: u32) -> Result<M, AckOutcome> {
        match self.begin_settling(position, attempt, &[Slot::InFlight, Slot::Away]) {
            Some(e) => Ok(e.handle.clone()),
            None => Err(self.outcome(position, attempt)),
        }
    }

    /// The server confirmed the ack (or the dead letter is stored and acked): the
    /// position is settled. Returns whether a buffered message may have become
    /// deliverable.
    pub(super) fn settled(&mut self, position: u64, attempt: u32) -> bool {
        let Some(e) = self.current(position, attempt, &[Slot::Settling]) else {
            return false;
        };
        let key = e.key.clone();
        self.entries.remove(&position);
        self.settled.insert(position, attempt);
        while self.settled.len() > REMEMBERED {
            self.settled.pop_first();
        }
        match key {
            Some(key) if self.holders.get(&key) == Some(&position) => {
                self.holders.remove(&key);
                self.entries
                    .values()
                    .any(|e| e.slot == Slot::Buffered && e.key.as_deref() == Some(key.as_str()))
            }
            _ => false,
        }
    }

    /// Settling failed: back to where it was.
    pub(super) fn unsettled(&mut self, position: u64, attempt: u32) {
        if let Some(e) = self.current(position, attempt, &[Slot::Settling]) {
            e.slot = e.before;
        }
    }

    /// A dead letter is stored and its message acked.
    pub(super) fn dead_lettered(&mut self, position: u64, delivery: u32) -> bool {
        self.dead_lettered += 1;
        self.settled(position, delivery)
    }

    /// A dead letter found on fetch could not be stored: it waits for the server to
    /// redeliver it (after `retry`), when it is tried again.
    pub(super) fn dead_letter_postponed(
        &mut self,
        now: Instant,
        position: u64,
        delivery: u32,
        retry: Duration,
    ) {
        if let Some(e) = self.current(position, delivery, &[Slot::Settling, Slot::Away]) {
            e.slot = Slot::Away;
            e.expect_by = now + retry;
        }
    }

    /// Returns a delivery for redelivery after `delay` (else the backoff), or to the
    /// dead-letter topic if it was the last allowed delivery.
    pub(super) fn nack(
        &mut self,
        now: Instant,
        position: u64,
        attempt: u32,
        delay: Option<Duration>,
    ) -> Result<Nacked<M>, AckOutcome> {
        let max_deliveries = self.settings.max_deliveries;
        let delay = delay.unwrap_or_else(|| crate::api::backoff(&self.settings, attempt));
        let Some(e) = self.current(position, attempt, &[Slot::InFlight, Slot::Away]) else {
            return Err(self.outcome(position, attempt));
        };
        if e.slot == Slot::Away {
            return Ok(Nacked::AlreadyAway);
        }
        if attempt >= max_deliveries {
            e.before = e.slot;
            e.slot = Slot::Settling;
            return Ok(Nacked::DeadLetter(DeadLetter {
                position,
                attempts: attempt,
                reason: "nacked on the last allowed delivery".into(),
                json: e.json.clone(),
                handle: e.handle.clone(),
                delivery: attempt,
            }));
        }
        e.slot = Slot::Away;
        e.expect_by = now + delay;
        e.extend_until = None;
        e.next_keepalive = None;
        Ok(Nacked::Nak(e.handle.clone(), delay))
    }

    /// A nak could not be sent: the delivery is in flight again.
    pub(super) fn nak_failed(&mut self, position: u64, attempt: u32) {
        if let Some(e) = self.current(position, attempt, &[Slot::Away]) {
            e.slot = Slot::InFlight;
        }
    }

    /// Moves a delivery's deadline to `by` from `now`: the handle to send a progress
    /// ack with (the keep-alive sends more until then).
    pub(super) fn extend(
        &mut self,
        now: Instant,
        position: u64,
        attempt: u32,
        by: Duration,
    ) -> Result<M, AckOutcome> {
        let ack_wait = self.settings.ack_deadline;
        let Some(e) = self.current(position, attempt, &[Slot::InFlight]) else {
            return Err(match self.outcome(position, attempt) {
                AckOutcome::Ok => AckOutcome::Expired,
                other => other,
            });
        };
        let until = now + by;
        e.extend_until = Some(until);
        e.server_deadline = now + ack_wait;
        e.next_keepalive = (e.server_deadline < until).then(|| now + third(ack_wait));
        Ok(e.handle.clone())
    }

    /// Takes a delivery out for dead-lettering with `reason`.
    pub(super) fn reject(
        &mut self,
        position: u64,
        attempt: u32,
        reason: &str,
    ) -> Result<DeadLetter<M>, AckOutcome> {
        match self.begin_settling(position, attempt, &[Slot::InFlight, Slot::Away]) {
            Some(e) => Ok(DeadLetter {
                position,
                attempts: attempt,
                reason: reason.to_owned(),
                json: e.json.clone(),
                handle: e.handle.clone(),
                delivery: attempt,
            }),
            None => Err(self.outcome(position, attempt)),
        }
    }

    /// Handles due for a progress ack (buffered messages, extended deliveries), and
    /// when to look again.
    pub(super) fn keepalive(&mut self, now: Instant) -> (Vec<M>, Option<Instant>) {
        let ack_wait = self.settings.ack_deadline;
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for e in self.entries.values_mut() {
            let Some(at) = e.next_keepalive else { continue };
            if at <= now {
                let keep = match e.slot {
                    Slot::Buffered => true,
                    Slot::InFlight => e.extend_until.is_some_and(|u| e.server_deadline < u),
                    _ => false,
                };
                if keep {
                    due.push(e.handle.clone());
                    e.server_deadline = now + ack_wait;
                }
                let more = match e.slot {
                    Slot::Buffered => true,
                    Slot::InFlight => e.extend_until.is_some_and(|u| e.server_deadline < u),
                    _ => false,
                };
                e.next_keepalive = more.then(|| now + third(ack_wait));
            }
            if let Some(at) = e.next_keepalive {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (due, next)
    }

    /// Forgets nacked holders long overdue (another process got their redelivery), so
    /// their keys don't stay held forever. Call after the server had nothing more to
    /// give: a due redelivery comes before new messages. Returns whether a buffered
    /// message may have become deliverable.
    pub(super) fn forget_stale(&mut self, now: Instant) -> bool {
        let grace = self.settings.ack_deadline + STALE_AFTER;
        let stale: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.slot == Slot::Away && e.expect_by + grace < now)
            .map(|(p, _)| *p)
            .collect();
        let mut freed = false;
        for position in stale {
            if let Some(e) = self.entries.remove(&position) {
                tracing::warn!(
                    position,
                    "a nacked message was not redelivered to this process; releasing its ordering key"
                );
                if let Some(key) = e.key
                    && self.holders.get(&key) == Some(&position)
                {
                    self.holders.remove(&key);
                    freed = true;
                }
            }
        }
        freed
    }

    /// The longest the keep-alive may sleep without missing a newly buffered message.
    pub(super) fn keepalive_period(&self) -> Duration {
        third(self.settings.ack_deadline)
    }

    /// Removes every buffered message (on close), returning their handles to nak.
    pub(super) fn release_buffered(&mut self) -> Vec<M> {
        let buffered: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.slot == Slot::Buffered)
            .map(|(p, _)| *p)
            .collect();
        buffered
            .into_iter()
            .filter_map(|p| self.entries.remove(&p))
            .map(|e| e.handle)
            .collect()
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn settings() -> SubscriptionSettings {
        SubscriptionSettings {
            ack_deadline: Duration::from_secs(3),
            max_deliveries: 3,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_in_flight: 10,
            dead_letter_topic: None,
        }
    }

    fn offer(g: &mut GroupState<()>, now: Instant, position: u64, attempt: u32, key: Option<&str>) {
        let _ = g.accept(
            now,
            position,
            attempt,
            key.map(str::to_owned),
            Bytes::new(),
            (),
        );
    }

    fn positions(h: &[Handed<()>]) -> Vec<u64> {
        h.iter().map(|h| h.position).collect()
    }

    #[test]
    fn keys_are_held_until_settled_and_kept_through_a_nack() {
        let now = Instant::now();
        let mut g = GroupState::new(settings());
        for (p, k) in [
            (1, Some("a")),
            (2, Some("a")),
            (3, Some("b")),
            (4, None),
            (5, Some("a")),
        ] {
            offer(&mut g, now, p, 1, k);
        }
        assert_eq!(g.ready(), 3, "1, 3 and 4; 2 and 5 wait for 1");
        assert_eq!(positions(&g.take(now, 10)), [1, 3, 4]);
        assert!(g.is_in_flight(1, 1));
        assert_eq!(g.ready(), 0);
        assert!(g.take(now, 10).is_empty());
        assert!(g.begin_ack(1, 1).is_ok());
        assert!(g.settled(1, 1), "2 may go now");
        assert_eq!(positions(&g.take(now, 10)), [2]);
        assert!(matches!(g.nack(now, 2, 1, None), Ok(Nacked::Nak((), _))));
        assert!(g.take(now, 10).is_empty(), "5 waits for 2's redelivery");
        offer(&mut g, now, 2, 2, Some("a"));
        let again = g.take(now, 10);
        assert_eq!((positions(&again), again[0].attempt), (vec![2], 2));
        assert_eq!(g.begin_ack(2, 1).err(), Some(AckOutcome::Expired));
        assert!(g.begin_ack(2, 2).is_ok());
        g.settled(2, 2);
        assert_eq!(positions(&g.take(now, 10)), [5]);
    }

    #[test]
    fn outcomes_of_stale_and_unknown_ids() {
        let now = Instant::now();
        let mut g = GroupState::new(settings());
        offer(&mut g, now, 1, 1, None);
        assert_eq!(
            g.begin_ack(1, 1).err(),
            Some(AckOutcome::NotFound),
            "not handed out"
        );
        g.take(now, 1);
        assert_eq!(g.begin_ack(9, 1).err(), Some(AckOutcome::NotFound));
        assert_eq!(g.begin_ack(1, 2).err(), Some(AckOutcome::Expired));
        assert!(g.begin_ack(1, 1).is_ok());
        assert_eq!(
            g.begin_ack(1, 1).err(),
            Some(AckOutcome::Expired),
            "settling"
        );
        g.settled(1, 1);
        assert_eq!(
            g.begin_ack(1, 1).err(),
            Some(AckOutcome::Expired),
            "settled"
        );
        assert_eq!(
            g.nack(now, 1, 1, None).err(),
            Some(AckOutcome::Expired),
            "settled"
        );
    }

    #[test]
    fn the_last_delivery_dead_letters() {
        let now = Instant::now();
        let mut g = GroupState::new(settings());
        offer(&mut g, now, 1, 3, None);
        g.take(now, 1);
        let Ok(Nacked::DeadLetter(d)) = g.nack(now, 1, 3, None) else {
            panic!("dead letter expected");
        };
        assert_eq!(d.attempts, 3);
        g.dead_lettered(1, 3);
        assert_eq!(g.dead_lettered, 1);
        let over = g.accept(now, 2, 4, None, Bytes::new(), ());
        assert!(
            matches!(over, Err(DeadLetter { attempts: 3, .. })),
            "expired on its last delivery"
        );
    }

    #[test]
    fn keyed_messages_wait_for_deliveries_outstanding_at_bind() {
        let now = Instant::now();
        let mut g = GroupState::new(settings());
        // Positions 1 and 2 (key k) were in flight in a previous process.
        g.set_barrier(now, 2, 2, 0);
        offer(&mut g, now, 3, 1, Some("j"));
        offer(&mut g, now, 4, 1, None);
        offer(&mut g, now, 2, 2, Some("k"));
        assert_eq!(positions(&g.take(now, 10)), [4], "keyed messages wait");
        assert!(
            g.accept(now, 1, 2, Some("k".into()), Bytes::new(), ())
                .expect("buffered")
        );
        assert_eq!(
            positions(&g.take(now, 10)),
            [1, 3],
            "in order once all are back"
        );
        let mut g = GroupState::<()>::new(settings());
        g.set_barrier(now, 5, 1, 0);
        assert!(!g.barrier_check_due(now));
        assert!(g.barrier_check_due(now + Duration::from_secs(1)));
        assert!(!g.consumer_state(4, 1));
        assert!(g.consumer_state(5, 1), "the floor passed it");
        g.set_barrier(now, 5, 2, 0);
        offer(&mut g, now, 6, 1, Some("k"));
        assert!(!g.consumer_state(0, 2));
        assert!(g.consumer_state(0, 1), "all that is pending is held here");
    }

    #[test]
    fn max_in_flight_counts_buffered_messages() {
        let now = Instant::now();
        let mut g = GroupState::new(SubscriptionSettings {
            max_in_flight: 3,
            ..settings()
        });
        assert_eq!(g.fetch_room(10), 3);
        offer(&mut g, now, 1, 1, Some("k"));
        offer(&mut g, now, 2, 1, Some("k"));
        assert_eq!(g.take(now, 10).len(), 1);
        assert_eq!(g.fetch_room(10), 1);
    }

    #[test]
    fn extended_and_buffered_messages_are_kept_alive() {
        let now = Instant::now();
        let mut g = GroupState::new(SubscriptionSettings {
            ack_deadline: Duration::from_millis(300),
            ..settings()
        });
        offer(&mut g, now, 1, 1, Some("k"));
        offer(&mut g, now, 2, 1, Some("k"));
        offer(&mut g, now, 3, 1, None);
        g.take(now, 10);
        assert!(g.extend(now, 3, 1, Duration::from_secs(1)).is_ok());
        let mut t = now;
        let mut sent = 0;
        for _ in 0..20 {
            t += Duration::from_millis(100);
            sent += g.keepalive(t).0.len();
        }
        // Buffered 2 every 100 ms for 2 s; extended 3 until its deadline covers 1 s.
        assert!((20..=30).contains(&sent), "{sent}");
        assert_eq!(
            g.extend(now, 2, 1, Duration::from_secs(1)).err(),
            Some(AckOutcome::NotFound)
        );
    }
}
