//! One persistent subscription's delivery state: a state machine with the time
//! passed in, no I/O. The runtime feeds it events read from the store and persists
//! its checkpoint.
//!
//! Cursors are global positions (`$all`, categories) or versions (a stream). Every
//! unsettled event is in exactly one place: unread (at or after `next_read`),
//! `ready`, `in_flight` (awaiting an ack until its deadline), `retry` (waiting out
//! its delay) or `parking` (being written to the parked stream). The checkpoint is
//! the lowest of those: everything below it is settled, or was never there (cursors
//! of a category or a truncated stream have gaps).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::RecordedEvent;

/// Settings of a persistent subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// A delivery not acked within this is retried.
    pub ack_timeout: Duration,
    /// Failed deliveries (nacks and timeouts) before the event is parked.
    pub max_retries: u32,
    /// Deliveries awaiting an ack at most.
    pub max_in_flight: usize,
    /// Delay before a retry.
    pub retry_delay: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(30),
            max_retries: 10,
            max_in_flight: 100,
            retry_delay: Duration::from_millis(500),
        }
    }
}

/// What a consumer says about a delivery it could not process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackAction {
    /// Deliver it again later (parked after `max_retries`).
    Retry,
    /// Park it now.
    Park,
    /// Settle it without processing.
    Skip,
}

/// The result of settling one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Done.
    Ok,
    /// No such delivery in flight: settled already, or superseded by a retry.
    Stale,
}

/// An event leaving for the parked stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parked {
    pub(crate) event: RecordedEvent,
    pub(crate) attempts: u32,
    pub(crate) reason: String,
}

#[derive(Debug)]
struct InFlight {
    event: RecordedEvent,
    attempt: u32,
    deadline: Instant,
}

#[derive(Debug)]
struct Waiting {
    event: RecordedEvent,
    attempt: u32,
    not_before: Instant,
}

/// A subscription group's state.
#[derive(Debug)]
pub(crate) struct GroupState {
    checkpoint: u64,
    next_read: u64,
    ready: BTreeMap<u64, RecordedEvent>,
    parking: BTreeSet<u64>,
    in_flight: BTreeMap<u64, InFlight>,
    retry: BTreeMap<u64, Waiting>,
    /// Events parked since start.
    pub(crate) parked: u64,
}

impl GroupState {
    /// A group that has settled everything before `checkpoint`.
    pub(crate) fn new(checkpoint: u64) -> Self {
        Self {
            checkpoint,
            next_read: checkpoint,
            ready: BTreeMap::new(),
            parking: BTreeSet::new(),
            in_flight: BTreeMap::new(),
            retry: BTreeMap::new(),
            parked: 0,
        }
    }

    /// Everything before this is settled.
    pub(crate) fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Where to read next.
    pub(crate) fn next_read(&self) -> u64 {
        self.next_read
    }

    /// How many more events it wants read (bounded look-ahead).
    pub(crate) fn wants(&self, settings: &Settings) -> usize {
        settings
            .max_in_flight
            .saturating_mul(2)
            .max(16)
            .saturating_sub(self.ready.len() + self.in_flight.len() + self.retry.len())
    }

    /// Takes events read from `next_read` on; `cursor` says where each one is.
    /// Events that `keep` refuses are passed over (read, never delivered).
    pub(crate) fn offer(
        &mut self,
        events: Vec<RecordedEvent>,
        cursor: impl Fn(&RecordedEvent) -> u64,
        keep: impl Fn(&RecordedEvent) -> bool,
    ) {
        for event in events {
            let at = cursor(&event);
            if at < self.next_read {
                continue;
            }
            self.next_read = at + 1;
            if !keep(&event) {
                continue;
            }
            self.ready.insert(at, event);
        }
    }

    /// Takes one event at `cursor` (at or after `next_read`).
    pub(crate) fn offer_at(&mut self, cursor: u64, event: RecordedEvent) {
        if cursor >= self.next_read {
            self.next_read = cursor + 1;
            self.ready.insert(cursor, event);
        }
    }

    /// Moves expired deliveries to retry, or parks them; returns those to park.
    pub(crate) fn expire(&mut self, now: Instant, settings: &Settings) -> Vec<(u64, Parked)> {
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(c, _)| *c)
            .collect();
        let mut parked = Vec::new();
        for cursor in expired {
            if let Some(f) = self.in_flight.remove(&cursor) {
                parked.extend(
                    self.failed(cursor, f.event, f.attempt, now, settings, "ack timeout")
                        .map(|p| (cursor, p)),
                );
            }
        }
        parked
    }

    fn failed(
        &mut self,
        cursor: u64,
        event: RecordedEvent,
        attempt: u32,
        now: Instant,
        settings: &Settings,
        why: &str,
    ) -> Option<Parked> {
        if attempt > settings.max_retries {
            return Some(self.park(
                cursor,
                event,
                attempt,
                format!("{why} after {attempt} deliveries"),
            ));
        }
        self.retry.insert(
            cursor,
            Waiting {
                event,
                attempt,
                not_before: now + settings.retry_delay,
            },
        );
        None
    }

    fn park(&mut self, cursor: u64, event: RecordedEvent, attempts: u32, reason: String) -> Parked {
        self.parking.insert(cursor);
        Parked {
            event,
            attempts,
            reason,
        }
    }

    /// Up to `max` deliveries, oldest first (due retries before new events).
    pub(crate) fn take(
        &mut self,
        now: Instant,
        settings: &Settings,
        max: usize,
    ) -> Vec<(u64, RecordedEvent, u32)> {
        let room = settings
            .max_in_flight
            .saturating_sub(self.in_flight.len())
            .min(max);
        let due: Vec<u64> = self
            .retry
            .iter()
            .filter(|(_, w)| w.not_before <= now)
            .map(|(c, _)| *c)
            .take(room)
            .collect();
        let mut out = Vec::new();
        for cursor in due {
            if let Some(w) = self.retry.remove(&cursor) {
                out.push((cursor, w.event, w.attempt + 1));
            }
        }
        while out.len() < room {
            let Some((cursor, event)) = self.ready.pop_first() else {
                break;
            };
            out.push((cursor, event, 1));
        }
        for (cursor, event, attempt) in &out {
            self.in_flight.insert(
                *cursor,
                InFlight {
                    event: event.clone(),
                    attempt: *attempt,
                    deadline: now + settings.ack_timeout,
                },
            );
        }
        out
    }

    /// When something may next become deliverable or expire by time alone.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let retry = self.retry.values().map(|w| w.not_before).min();
        let deadline = self.in_flight.values().map(|f| f.deadline).min();
        retry.into_iter().chain(deadline).min()
    }

    fn current(&self, cursor: u64, attempt: u32) -> bool {
        self.in_flight
            .get(&cursor)
            .is_some_and(|f| f.attempt == attempt)
    }

    /// Acknowledges a delivery.
    pub(crate) fn ack(&mut self, cursor: u64, attempt: u32) -> Settled {
        if !self.current(cursor, attempt) {
            return Settled::Stale;
        }
        self.in_flight.remove(&cursor);
        self.settle();
        Settled::Ok
    }

    /// A consumer could not process a delivery.
    pub(crate) fn nack(
        &mut self,
        cursor: u64,
        attempt: u32,
        action: NackAction,
        now: Instant,
        settings: &Settings,
    ) -> (Settled, Option<Parked>) {
        if !self.current(cursor, attempt) {
            return (Settled::Stale, None);
        }
        let Some(f) = self.in_flight.remove(&cursor) else {
            return (Settled::Stale, None);
        };
        let parked = match action {
            NackAction::Retry => self.failed(cursor, f.event, f.attempt, now, settings, "nacked"),
            NackAction::Park => {
                Some(self.park(cursor, f.event, f.attempt, "parked by the consumer".into()))
            }
            NackAction::Skip => {
                self.settle();
                None
            }
        };
        (Settled::Ok, parked)
    }

    /// The parked event at `cursor` is stored in the parked stream: settled.
    pub(crate) fn parked(&mut self, cursor: u64) {
        if self.parking.remove(&cursor) {
            self.parked += 1;
            self.settle();
        }
    }

    /// The parked event at `cursor` could not be stored: keep it for another try.
    pub(crate) fn park_failed(
        &mut self,
        cursor: u64,
        parked: Parked,
        now: Instant,
        settings: &Settings,
    ) {
        self.parking.remove(&cursor);
        self.retry.insert(
            cursor,
            Waiting {
                event: parked.event,
                attempt: parked.attempts,
                not_before: now + settings.retry_delay,
            },
        );
    }

    /// Moves the checkpoint up to the lowest unsettled cursor.
    fn settle(&mut self) {
        let lowest_open = [
            self.ready.keys().next(),
            self.in_flight.keys().next(),
            self.retry.keys().next(),
            self.parking.iter().next(),
        ]
        .into_iter()
        .flatten()
        .min()
        .copied()
        .unwrap_or(self.next_read);
        self.checkpoint = self.checkpoint.max(lowest_open);
    }

    /// Deliveries in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Deliveries waiting for a retry.
    pub(crate) fn retrying(&self) -> usize {
        self.retry.len()
    }
}

#[cfg(test)]
mod test {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::{Body, Metadata, StreamName};

    fn event(position: u64) -> RecordedEvent {
        RecordedEvent {
            id: Uuid::new_v4(),
            stream: StreamName::new("s-1").expect("name"),
            version: position,
            position,
            ty: "T".into(),
            data: Body::json(&json!(position)),
            metadata: Metadata::default(),
            timestamp_ms: 0,
        }
    }

    fn settings() -> Settings {
        Settings {
            ack_timeout: Duration::from_secs(10),
            max_retries: 2,
            max_in_flight: 3,
            retry_delay: Duration::from_secs(1),
        }
    }

    fn cursors(taken: &[(u64, RecordedEvent, u32)]) -> Vec<(u64, u32)> {
        taken.iter().map(|(c, _, a)| (*c, *a)).collect()
    }

    #[test]
    fn the_checkpoint_follows_the_settled_prefix() {
        let (now, s) = (Instant::now(), settings());
        let mut g = GroupState::new(0);
        g.offer((0..5).map(event).collect(), |e| e.position, |_| true);
        assert_eq!(
            cursors(&g.take(now, &s, 10)),
            [(0, 1), (1, 1), (2, 1)],
            "max_in_flight"
        );
        assert_eq!(g.ack(1, 1), Settled::Ok);
        assert_eq!(g.checkpoint(), 0);
        assert_eq!(g.ack(0, 1), Settled::Ok);
        assert_eq!(g.checkpoint(), 2);
        assert_eq!(g.ack(0, 1), Settled::Stale);
    }

    #[test]
    fn failures_retry_then_park() {
        let (now, s) = (Instant::now(), settings());
        let mut g = GroupState::new(0);
        g.offer(vec![event(0)], |e| e.position, |_| true);
        g.take(now, &s, 1);
        assert_eq!(
            g.nack(0, 1, NackAction::Retry, now, &s),
            (Settled::Ok, None)
        );
        assert!(g.take(now, &s, 1).is_empty(), "not before the retry delay");
        let later = now + Duration::from_secs(1);
        assert_eq!(cursors(&g.take(later, &s, 1)), [(0, 2)]);
        assert!(
            g.expire(later + Duration::from_secs(10), &s).is_empty(),
            "the timeout is a failure too: retried"
        );
        let much_later = later + Duration::from_secs(20);
        assert_eq!(cursors(&g.take(much_later, &s, 1)), [(0, 3)]);
        let (outcome, parked) = g.nack(0, 3, NackAction::Retry, much_later, &s);
        assert_eq!(outcome, Settled::Ok);
        assert_eq!(
            parked.map(|p| p.attempts),
            Some(3),
            "parked after max_retries"
        );
        assert_eq!(g.checkpoint(), 0, "held until the parked copy is stored");
        g.parked(0);
        assert_eq!((g.checkpoint(), g.parked), (1, 1));
    }

    #[test]
    fn skip_and_park_settle_at_once_and_gaps_are_passed() {
        let (now, s) = (Instant::now(), settings());
        let mut g = GroupState::new(10);
        g.offer(vec![event(12), event(15)], |e| e.position, |_| true);
        let taken = g.take(now, &s, 5);
        assert_eq!(cursors(&taken), [(12, 1), (15, 1)]);
        assert_eq!(g.nack(12, 1, NackAction::Skip, now, &s).0, Settled::Ok);
        assert_eq!(
            g.checkpoint(),
            15,
            "nothing between 10 and 12 or 13 and 14 was ever there"
        );
        let parked = g.nack(15, 1, NackAction::Park, now, &s).1.expect("parked");
        g.park_failed(15, parked, now, &s);
        assert_eq!(g.checkpoint(), 15, "a failed park is retried, not lost");
        assert_eq!(
            cursors(&g.take(now + Duration::from_secs(1), &s, 5)),
            [(15, 2)]
        );
        assert_eq!(g.ack(15, 2), Settled::Ok);
        assert_eq!(g.checkpoint(), 16);
    }
}
