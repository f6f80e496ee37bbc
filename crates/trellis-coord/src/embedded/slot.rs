//! One name's lease and queue of waiters, as a pure state machine.
//!
//! Every method takes the current time and pushes what the runtime must do next —
//! wake a waiter, tell observers, log an expiry — as [`Effect`]s; nothing here
//! sleeps, locks or writes. That keeps the rules of the contract (one holder, FIFO
//! turns, expiry is final, only the holder may extend or release) in one place that
//! tests drive with made-up times.
//!
//! # Invariants
//! 1. `holder` is `None` or a lease whose `expires_at` was in the future when last
//!    looked at; every method expires an overdue lease first.
//! 2. At most one of `holder` and `granting` is set: a name promised to a waiter (while
//!    its token is made durable) is neither free nor held.
//! 3. When the name is free (neither is set) and someone waits, the first waiter has
//!    been sent a [`Effect::Wake`]; only the first waiter may take a free name.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Identifies one blocked call.
pub(crate) type WaiterId = u64;

/// The current lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) owner: String,
    pub(crate) token: u64,
    pub(crate) expires_at: Instant,
    pub(crate) ttl: Duration,
}

/// What the runtime must do after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// The name is free and this waiter is first in line: wake it.
    Wake(WaiterId),
    /// The holder changed (granted, released or expired): tell observers.
    Changed,
    /// This lease expired.
    Expired { owner: String, token: u64 },
}

/// The outcome of [`Slot::poll`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Poll {
    /// The caller already holds the name; its lease was extended.
    Held(Holder),
    /// The name is promised to the caller: make a token durable, then call
    /// [`Slot::granted`] (or [`Slot::abandon`]).
    Reserved,
    /// Someone else holds it (`Some`), or it is promised to another caller.
    Busy { holder: Option<String> },
}

/// One name's state.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    holder: Option<Holder>,
    /// The waiter the name is promised to while its token is made durable.
    granting: Option<WaiterId>,
    /// Blocked calls, oldest first.
    waiters: VecDeque<WaiterId>,
    /// The newest token issued here (0: not known here; ask the durable store).
    last_token: u64,
}

impl Slot {
    /// Frees the name if its lease is overdue.
    pub(crate) fn expire(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        if let Some(h) = self.holder.take_if(|h| h.expires_at <= now) {
            fx.push(Effect::Expired {
                owner: h.owner,
                token: h.token,
            });
            fx.push(Effect::Changed);
            self.wake_next(fx);
        }
    }

    /// The current lease.
    pub(crate) fn holder(&mut self, now: Instant, fx: &mut Vec<Effect>) -> Option<&Holder> {
        self.expire(now, fx);
        self.holder.as_ref()
    }

    /// The current lease as last looked at (without expiring it).
    pub(crate) fn peek(&self) -> Option<&Holder> {
        self.holder.as_ref()
    }

    /// When the current lease expires.
    pub(crate) fn expires_at(&self) -> Option<Instant> {
        self.holder.as_ref().map(|h| h.expires_at)
    }

    /// The newest token issued here, if known.
    pub(crate) fn last_token(&self) -> Option<u64> {
        (self.last_token > 0).then_some(self.last_token)
    }

    /// How many calls wait.
    pub(crate) fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Nothing held, promised or awaited: the slot can be dropped.
    pub(crate) fn is_idle(&self) -> bool {
        self.holder.is_none() && self.granting.is_none() && self.waiters.is_empty()
    }

    /// Tries to take the name for `owner` (call `id`).
    pub(crate) fn poll(
        &mut self,
        id: WaiterId,
        owner: &str,
        ttl: Duration,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> Poll {
        self.expire(now, fx);
        if let Some(h) = &mut self.holder {
            if h.owner != owner {
                return Poll::Busy {
                    holder: Some(h.owner.clone()),
                };
            }
            h.expires_at = now + ttl;
            h.ttl = ttl;
            let h = h.clone();
            self.leave(id, fx);
            return Poll::Held(h);
        }
        if self.granting.is_some() {
            return Poll::Busy { holder: None };
        }
        match self.waiters.front() {
            Some(&front) if front == id => {
                self.waiters.pop_front();
            }
            Some(_) => return Poll::Busy { holder: None },
            None => {}
        }
        self.granting = Some(id);
        Poll::Reserved
    }

    /// Puts call `id` at the back of the line.
    pub(crate) fn enqueue(&mut self, id: WaiterId) {
        if !self.waiters.contains(&id) {
            self.waiters.push_back(id);
        }
    }

    /// Call `id` stops waiting (timed out, cancelled). If it was first in line, the
    /// next one gets its turn.
    pub(crate) fn leave(&mut self, id: WaiterId, fx: &mut Vec<Effect>) {
        if let Some(at) = self.waiters.iter().position(|w| *w == id) {
            self.waiters.remove(at);
            if at == 0 {
                self.wake_next(fx);
            }
        }
    }

    /// Completes a [`Poll::Reserved`] once `token` is durable. `None` if the name is no
    /// longer promised to `id`.
    pub(crate) fn granted(
        &mut self,
        id: WaiterId,
        owner: &str,
        token: u64,
        ttl: Duration,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> Option<Holder> {
        if self.granting != Some(id) || self.holder.is_some() {
            return None;
        }
        debug_assert!(token > self.last_token, "tokens strictly increase");
        self.granting = None;
        self.last_token = self.last_token.max(token);
        let h = Holder {
            owner: owner.to_owned(),
            token,
            expires_at: now + ttl,
            ttl,
        };
        self.holder = Some(h.clone());
        fx.push(Effect::Changed);
        Some(h)
    }

    /// A [`Poll::Reserved`] that will not complete (no durable token, or the caller
    /// went away): the next waiter gets its turn.
    pub(crate) fn abandon(&mut self, id: WaiterId, fx: &mut Vec<Effect>) {
        if self.granting == Some(id) {
            self.granting = None;
            self.wake_next(fx);
        }
    }

    /// Extends the holder's lease to `ttl` from `now`. `Err` carries the current holder.
    pub(crate) fn renew(
        &mut self,
        owner: &str,
        token: u64,
        ttl: Duration,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> Result<Holder, Option<String>> {
        self.expire(now, fx);
        match &mut self.holder {
            Some(h) if h.owner == owner && h.token == token => {
                h.expires_at = now + ttl;
                h.ttl = ttl;
                Ok(h.clone())
            }
            other => Err(other.as_ref().map(|h| h.owner.clone())),
        }
    }

    /// Frees the name if `owner` holds it with `token`. `Err` carries the current holder.
    pub(crate) fn revoke(
        &mut self,
        owner: &str,
        token: u64,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) -> Result<Holder, Option<String>> {
        self.expire(now, fx);
        match self
            .holder
            .take_if(|h| h.owner == owner && h.token == token)
        {
            Some(h) => {
                fx.push(Effect::Changed);
                self.wake_next(fx);
                Ok(h)
            }
            None => Err(self.holder.as_ref().map(|h| h.owner.clone())),
        }
    }

    /// Remembers a token read from the durable store.
    pub(crate) fn note_token(&mut self, token: u64) {
        self.last_token = self.last_token.max(token);
    }

    fn wake_next(&self, fx: &mut Vec<Effect>) {
        if self.holder.is_none()
            && self.granting.is_none()
            && let Some(&front) = self.waiters.front()
        {
            fx.push(Effect::Wake(front));
        }
    }
}

#[cfg(test)]
mod test {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn grant(slot: &mut Slot, id: WaiterId, owner: &str, token: u64, now: Instant) -> Holder {
        let mut fx = Vec::new();
        assert_eq!(slot.poll(id, owner, TTL, now, &mut fx), Poll::Reserved);
        let h = slot
            .granted(id, owner, token, TTL, now, &mut fx)
            .expect("granted");
        assert_eq!(fx, [Effect::Changed]);
        h
    }

    #[test]
    fn one_holder_then_the_first_waiter() {
        let t0 = Instant::now();
        let mut slot = Slot::default();
        grant(&mut slot, 1, "a", 1, t0);
        let mut fx = Vec::new();
        assert_eq!(
            slot.poll(2, "b", TTL, t0, &mut fx),
            Poll::Busy {
                holder: Some("a".into())
            }
        );
        slot.enqueue(2);
        slot.enqueue(3);
        assert!(fx.is_empty());
        assert_eq!(slot.revoke("a", 1, t0, &mut fx).map(|h| h.token), Ok(1));
        assert_eq!(fx, [Effect::Changed, Effect::Wake(2)]);
        fx.clear();
        // Free, but 2 is first in line: 3 (and newcomers) must wait.
        assert_eq!(
            slot.poll(3, "c", TTL, t0, &mut fx),
            Poll::Busy { holder: None }
        );
        assert_eq!(
            slot.poll(9, "z", TTL, t0, &mut fx),
            Poll::Busy { holder: None }
        );
        assert_eq!(slot.poll(2, "b", TTL, t0, &mut fx), Poll::Reserved);
        // Promised to 2 while its token is made durable.
        assert_eq!(
            slot.poll(3, "c", TTL, t0, &mut fx),
            Poll::Busy { holder: None }
        );
        assert!(slot.granted(2, "b", 2, TTL, t0, &mut fx).is_some());
        assert_eq!(slot.waiting(), 1);
    }

    #[test]
    fn expiry_is_final_and_wakes_the_next() {
        let t0 = Instant::now();
        let mut slot = Slot::default();
        grant(&mut slot, 1, "a", 5, t0);
        slot.enqueue(2);
        let mut fx = Vec::new();
        let almost = t0 + TTL - Duration::from_nanos(1);
        assert!(slot.holder(almost, &mut fx).is_some());
        assert!(fx.is_empty());
        let at = t0 + TTL;
        assert_eq!(slot.renew("a", 5, TTL, at, &mut fx), Err(None));
        assert_eq!(
            fx,
            [
                Effect::Expired {
                    owner: "a".into(),
                    token: 5
                },
                Effect::Changed,
                Effect::Wake(2)
            ]
        );
        assert_eq!(slot.revoke("a", 5, at, &mut fx), Err(None));
    }

    #[test]
    fn only_the_holder_with_its_token() {
        let t0 = Instant::now();
        let mut slot = Slot::default();
        grant(&mut slot, 1, "a", 3, t0);
        let mut fx = Vec::new();
        assert_eq!(slot.revoke("b", 3, t0, &mut fx), Err(Some("a".into())));
        assert_eq!(slot.revoke("a", 2, t0, &mut fx), Err(Some("a".into())));
        assert_eq!(slot.renew("b", 3, TTL, t0, &mut fx), Err(Some("a".into())));
        let later = t0 + Duration::from_secs(5);
        let h = slot.renew("a", 3, TTL, later, &mut fx).expect("renew");
        assert_eq!((h.token, h.expires_at), (3, later + TTL));
        // The holder acquiring again gets its lease back, extended.
        assert!(
            matches!(slot.poll(7, "a", TTL, later + TTL / 2, &mut fx), Poll::Held(h) if h.token == 3 && h.expires_at == later + TTL / 2 + TTL)
        );
        assert!(fx.is_empty());
    }

    #[test]
    fn leaving_and_abandoning_pass_the_turn_on() {
        let t0 = Instant::now();
        let mut slot = Slot::default();
        grant(&mut slot, 1, "a", 1, t0);
        for id in [2, 3, 4] {
            slot.enqueue(id);
        }
        let mut fx = Vec::new();
        slot.leave(3, &mut fx);
        assert!(fx.is_empty(), "not first in line, held anyway");
        assert!(slot.revoke("a", 1, t0, &mut fx).is_ok());
        fx.clear();
        slot.leave(2, &mut fx);
        assert_eq!(fx, [Effect::Wake(4)]);
        fx.clear();
        assert_eq!(slot.poll(4, "d", TTL, t0, &mut fx), Poll::Reserved);
        slot.enqueue(5);
        slot.abandon(4, &mut fx);
        assert_eq!(fx, [Effect::Wake(5)]);
        assert!(slot.granted(4, "d", 2, TTL, t0, &mut fx).is_none());
        fx.clear();
        assert_eq!(slot.poll(5, "e", TTL, t0, &mut fx), Poll::Reserved);
        assert!(slot.granted(5, "e", 2, TTL, t0, &mut fx).is_some());
        assert!(!slot.is_idle());
        assert!(slot.revoke("e", 2, t0, &mut fx).is_ok());
        assert!(slot.is_idle());
        assert_eq!(slot.last_token(), Some(2));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Poll(u8),
        Leave(u8),
        Renew(u8),
        Revoke(u8),
        Abandon,
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4u8).prop_map(Op::Poll),
            (0..4u8).prop_map(Op::Leave),
            (0..4u8).prop_map(Op::Renew),
            (0..4u8).prop_map(Op::Revoke),
            Just(Op::Abandon),
            (0..3000u16).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against random calls: never a live lease past its expiry, tokens strictly
        /// increase, a free name with waiters always has its first waiter woken, and
        /// only the first waiter takes a free name.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..200)) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut slot = Slot::default();
            let mut next_token = 1;
            let mut last_granted = 0;
            let mut woken: BTreeMap<WaiterId, ()> = BTreeMap::new();
            let ttl = Duration::from_millis(1000);
            for op in ops {
                let mut fx = Vec::new();
                let before_front = slot.waiters.front().copied();
                match op {
                    Op::Poll(w) => {
                        let id = WaiterId::from(w);
                        let owner = format!("o{w}");
                        match slot.poll(id, &owner, ttl, now, &mut fx) {
                            Poll::Reserved => {
                                prop_assert!(before_front.is_none() || before_front == Some(id));
                                // Complete it at once (the durable store said yes).
                                let h = slot.granted(id, &owner, next_token, ttl, now, &mut fx);
                                prop_assert!(h.is_some());
                                prop_assert!(next_token > last_granted);
                                last_granted = next_token;
                                next_token += 1 + u64::from(w);
                            }
                            Poll::Held(h) => prop_assert_eq!(h.owner, owner),
                            Poll::Busy { .. } => slot.enqueue(id),
                        }
                    }
                    Op::Leave(w) => slot.leave(WaiterId::from(w), &mut fx),
                    Op::Renew(w) => {
                        let _ = slot.renew(&format!("o{w}"), last_granted, ttl, now, &mut fx);
                    }
                    Op::Revoke(w) => {
                        let _ = slot.revoke(&format!("o{w}"), last_granted, now, &mut fx);
                    }
                    Op::Abandon => {
                        if let Some(id) = slot.granting {
                            slot.abandon(id, &mut fx);
                        }
                    }
                    Op::Advance(ms) => {
                        now += Duration::from_millis(u64::from(ms));
                        slot.expire(now, &mut fx);
                    }
                }
                for e in &fx {
                    if let Effect::Wake(id) = e {
                        woken.insert(*id, ());
                    }
                }
                prop_assert!(slot.holder.is_none() || slot.granting.is_none());
                if let Some(h) = &slot.holder {
                    prop_assert!(h.expires_at > now);
                }
                if slot.holder.is_none() && slot.granting.is_none()
                    && let Some(front) = slot.waiters.front()
                {
                    prop_assert!(woken.contains_key(front), "first waiter {} never woken", front);
                }
            }
        }
    }
}
