//! The two-phase-commit state machine: pure logic, no I/O.
//!
//! A [`Transaction`] is the whole state of one 2PC transaction, as the coordinator
//! logs it. [`Transaction::next`] says what to do: prepare, run phase two, or
//! nothing. The coordinator feeds it the votes ([`Transaction::vote`]), asks it to
//! [`decide`](Transaction::decide), *persists the decision*, and then feeds it the
//! phase-two answers ([`Transaction::acked`], [`Transaction::phase_two_failed`]),
//! persisting each.
//!
//! # Rules
//! - **Commit** only if every participant voted commit before the deadline.
//! - **Abort** on any abort vote, any failed or unreadable prepare, or the deadline
//!   passing first. A transaction whose decision was never logged is aborted:
//!   *presumed abort* ([`Transaction::abort`] on recovery), which is safe because
//!   no participant was told to commit before the decision was logged.
//! - **Phase two** sends the decision to every participant — an abort goes to all of
//!   them, including those that voted abort or never answered, since a lost answer
//!   may hide a prepared participant — and retries each until it acknowledges. The
//!   transaction is final (`committed` / `aborted`) once all have.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most history entries kept per transaction; older ones are dropped (and counted).
pub const MAX_HISTORY: usize = 200;

/// Where a transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxStatus {
    /// Collecting votes; no decision yet.
    Preparing,
    /// Decided commit; telling the participants.
    Committing,
    /// Decided abort; telling the participants.
    Aborting,
    /// Every participant committed.
    Committed,
    /// Every participant aborted.
    Aborted,
}

impl TxStatus {
    /// The status as text (`preparing`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Preparing => "preparing",
            Self::Committing => "committing",
            Self::Aborting => "aborting",
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        }
    }

    /// The status named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "preparing" => Self::Preparing,
            "committing" => Self::Committing,
            "aborting" => Self::Aborting,
            "committed" => Self::Committed,
            "aborted" => Self::Aborted,
            _ => return None,
        })
    }

    /// Committed or aborted: nothing will ever happen to it again.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Committed | Self::Aborted)
    }
}

/// Where one participant is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantStatus {
    /// Not voted (yet).
    Pending,
    /// Voted commit: it is prepared and waits for the decision.
    Prepared,
    /// Voted abort, or its prepare failed.
    VotedAbort,
    /// Acknowledged the commit.
    Committed,
    /// Acknowledged the abort.
    Aborted,
}

impl ParticipantStatus {
    /// The status as text (`voted_abort`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Prepared => "prepared",
            Self::VotedAbort => "voted_abort",
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        }
    }
}

/// The coordinator's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Every participant commits.
    Commit,
    /// Every participant aborts.
    Abort,
}

impl Decision {
    /// `commit` or `abort`, as in idempotency keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Commit => "commit",
            Self::Abort => "abort",
        }
    }
}

/// A participant's answer to prepare: `{"vote":"commit"}` or
/// `{"vote":"abort","reason":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "vote", rename_all = "snake_case")]
pub enum Vote {
    /// Prepared: it can commit, and will until told otherwise.
    Commit,
    /// It can't commit; nothing is held.
    Abort {
        /// Why.
        #[serde(default)]
        reason: String,
    },
}

impl Vote {
    /// An abort vote for `reason`.
    pub fn abort(reason: impl Into<String>) -> Self {
        Self::Abort {
            reason: reason.into(),
        }
    }
}

/// One participant's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantState {
    /// Its name, unique in the transaction.
    pub name: String,
    /// What it is (`{"type":"app",...}`, ...): what the participant is rebuilt from
    /// after a restart.
    pub spec: Value,
    /// Where it is.
    pub status: ParticipantStatus,
    /// Phase-two calls answered so far (successful or not).
    pub attempts: u32,
    /// Why it voted abort, or the last phase-two failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One entry of a transaction's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// What happened: `started`, `voted_commit`, `voted_abort`, `prepare_failed`,
    /// `decided_commit`, `decided_abort`, `committed`, `aborted`,
    /// `phase_two_failed`, `finished`.
    pub event: String,
    /// The participant concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant: Option<String>,
    /// Details: an error, a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Ask every participant to prepare (only the coordinator that created the
    /// transaction does; after a restart it is aborted instead: presumed abort).
    Prepare,
    /// Send `decision` to these participants (by index).
    PhaseTwo {
        /// What to send.
        decision: Decision,
        /// Who has not acknowledged it yet.
        participants: Vec<usize>,
    },
    /// Nothing: the transaction is final.
    Idle,
}

/// The whole state of one 2PC transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    /// Its id (UUIDv7).
    pub id: String,
    /// Where it is.
    pub status: TxStatus,
    /// Per participant, in request order.
    pub participants: Vec<ParticipantState>,
    /// What the caller passed to every participant.
    pub payload: Value,
    /// The decision, once logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Why it aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Votes after this (ms since the epoch) don't count: the transaction aborts.
    pub deadline_ms: u64,
    /// When it started (ms since the epoch).
    pub created_at_ms: u64,
    /// Its last transition (ms since the epoch).
    pub updated_at_ms: u64,
    /// What happened, oldest first (the newest [`MAX_HISTORY`] entries).
    pub history: Vec<HistoryEntry>,
    /// History entries dropped to keep the bound.
    #[serde(default)]
    pub history_dropped: u64,
}

impl Transaction {
    /// A new transaction, `preparing`, every participant `pending`.
    pub fn new(
        id: String,
        participants: Vec<(String, Value)>,
        payload: Value,
        deadline_ms: u64,
        now_ms: u64,
    ) -> Self {
        let participants = participants
            .into_iter()
            .map(|(name, spec)| ParticipantState {
                name,
                spec,
                status: ParticipantStatus::Pending,
                attempts: 0,
                error: None,
            })
            .collect();
        let mut tx = Self {
            id,
            status: TxStatus::Preparing,
            participants,
            payload,
            decision: None,
            reason: None,
            deadline_ms,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            history: Vec::new(),
            history_dropped: 0,
        };
        tx.record(now_ms, "started", None, None);
        tx
    }

    /// What to do next.
    pub fn next(&self) -> Next {
        let (decision, done) = match self.status {
            TxStatus::Preparing => return Next::Prepare,
            TxStatus::Committed | TxStatus::Aborted => return Next::Idle,
            TxStatus::Committing => (Decision::Commit, ParticipantStatus::Committed),
            TxStatus::Aborting => (Decision::Abort, ParticipantStatus::Aborted),
        };
        let participants: Vec<usize> = self
            .participants
            .iter()
            .enumerate()
            .filter(|(_, p)| p.status != done)
            .map(|(i, _)| i)
            .collect();
        if participants.is_empty() {
            Next::Idle
        } else {
            Next::PhaseTwo {
                decision,
                participants,
            }
        }
    }

    /// The idempotency key of a call: `{id}:{participant}:{prepare|commit|abort}`.
    pub fn idempotency_key(&self, index: usize, call: &str) -> String {
        let name = self.participants.get(index).map_or("", |p| p.name.as_str());
        format!("{}:{name}:{call}", self.id)
    }

    /// Records participant `index`'s answer to prepare: a vote, or why there is none
    /// (an error or an unreadable answer, which counts as an abort vote). Ignored
    /// unless the transaction is preparing and the participant has not voted.
    pub fn vote(&mut self, index: usize, answer: Result<Vote, String>, now_ms: u64) {
        if self.status != TxStatus::Preparing {
            return;
        }
        let Some(p) = self.participants.get_mut(index) else {
            return;
        };
        if p.status != ParticipantStatus::Pending {
            return;
        }
        let name = p.name.clone();
        let (event, detail) = match answer {
            Ok(Vote::Commit) => {
                p.status = ParticipantStatus::Prepared;
                ("voted_commit", None)
            }
            Ok(Vote::Abort { reason }) => {
                p.status = ParticipantStatus::VotedAbort;
                p.error = Some(reason.clone());
                ("voted_abort", Some(reason))
            }
            Err(error) => {
                p.status = ParticipantStatus::VotedAbort;
                p.error = Some(format!("prepare failed: {error}"));
                ("prepare_failed", Some(error))
            }
        };
        self.record(now_ms, event, Some(name), detail);
    }

    /// Whether the votes so far settle the outcome: someone voted abort, or
    /// everyone voted commit.
    pub fn votes_settled(&self) -> bool {
        self.participants
            .iter()
            .any(|p| p.status == ParticipantStatus::VotedAbort)
            || self
                .participants
                .iter()
                .all(|p| p.status == ParticipantStatus::Prepared)
    }

    /// Decides, if the votes or the clock allow: abort on any abort vote or once the
    /// deadline passed with votes missing; commit once all voted commit. Returns the
    /// decision taken now (persist it before phase two), `None` if it is too early
    /// or the transaction was already decided.
    pub fn decide(&mut self, now_ms: u64) -> Option<Decision> {
        if self.status != TxStatus::Preparing {
            return None;
        }
        if let Some(p) = self
            .participants
            .iter()
            .find(|p| p.status == ParticipantStatus::VotedAbort)
        {
            let reason = format!(
                "participant {:?} voted abort: {}",
                p.name,
                p.error.as_deref().unwrap_or("no reason given")
            );
            self.decide_abort(reason, now_ms);
            return Some(Decision::Abort);
        }
        if self
            .participants
            .iter()
            .all(|p| p.status == ParticipantStatus::Prepared)
        {
            self.status = TxStatus::Committing;
            self.decision = Some(Decision::Commit);
            self.record(now_ms, "decided_commit", None, None);
            return Some(Decision::Commit);
        }
        if now_ms >= self.deadline_ms {
            let missing: Vec<String> = self
                .participants
                .iter()
                .filter(|p| p.status == ParticipantStatus::Pending)
                .map(|p| format!("{:?}", p.name))
                .collect();
            self.decide_abort(
                format!("the deadline passed before {} voted", missing.join(", ")),
                now_ms,
            );
            return Some(Decision::Abort);
        }
        None
    }

    /// Decides abort whatever the votes, if not decided yet: the deadline, or
    /// *presumed abort* when a coordinator finds a transaction it never decided.
    /// Returns whether it decided now.
    pub fn abort(&mut self, reason: impl Into<String>, now_ms: u64) -> bool {
        if self.status != TxStatus::Preparing {
            return false;
        }
        self.decide_abort(reason.into(), now_ms);
        true
    }

    fn decide_abort(&mut self, reason: String, now_ms: u64) {
        for p in &mut self.participants {
            if p.status == ParticipantStatus::Pending {
                p.error = Some("no vote before the decision".into());
            }
        }
        self.status = TxStatus::Aborting;
        self.decision = Some(Decision::Abort);
        self.reason = Some(reason.clone());
        self.record(now_ms, "decided_abort", None, Some(reason));
    }

    /// Records that participant `index` acknowledged the decision; the transaction
    /// is final once all have. Ignored unless phase two is running and the
    /// participant has not acknowledged yet.
    pub fn acked(&mut self, index: usize, now_ms: u64) {
        let (done, event) = match self.status {
            TxStatus::Committing => (ParticipantStatus::Committed, "committed"),
            TxStatus::Aborting => (ParticipantStatus::Aborted, "aborted"),
            _ => return,
        };
        let Some(p) = self.participants.get_mut(index) else {
            return;
        };
        if p.status == done {
            return;
        }
        p.status = done;
        p.attempts += 1;
        // A voter's reason stays; a phase-two failure is over.
        if matches!(p.error.as_deref(), Some(e) if e.starts_with(PHASE_TWO_ERROR)) {
            p.error = None;
        }
        let name = p.name.clone();
        self.record(now_ms, event, Some(name), None);
        if self.participants.iter().all(|p| p.status == done) {
            self.status = match self.status {
                TxStatus::Committing => TxStatus::Committed,
                _ => TxStatus::Aborted,
            };
            self.record(now_ms, "finished", None, Some(self.status.as_str().into()));
        }
    }

    /// Records a failed phase-two call of participant `index` (it will be retried).
    /// Returns how many calls it has now answered.
    pub fn phase_two_failed(&mut self, index: usize, error: &str, now_ms: u64) -> u32 {
        if !matches!(self.status, TxStatus::Committing | TxStatus::Aborting) {
            return 0;
        }
        let Some(p) = self.participants.get_mut(index) else {
            return 0;
        };
        p.attempts += 1;
        p.error = Some(format!("{PHASE_TWO_ERROR}{error}"));
        let (name, attempts) = (p.name.clone(), p.attempts);
        self.record(
            now_ms,
            "phase_two_failed",
            Some(name),
            Some(error.to_owned()),
        );
        attempts
    }

    fn record(
        &mut self,
        now_ms: u64,
        event: &str,
        participant: Option<String>,
        detail: Option<String>,
    ) {
        self.updated_at_ms = now_ms;
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(0);
            self.history_dropped += 1;
        }
        self.history.push(HistoryEntry {
            at_ms: now_ms,
            event: event.to_owned(),
            participant,
            detail,
        });
    }
}

/// How a phase-two failure is marked in a participant's `error`.
const PHASE_TWO_ERROR: &str = "phase two: ";

#[cfg(test)]
mod test {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn tx(n: usize) -> Transaction {
        let participants = (0..n)
            .map(|i| (format!("p{i}"), json!({"type": "fake"})))
            .collect();
        Transaction::new("t".into(), participants, json!({"x": 1}), 100, 0)
    }

    fn phase_two(t: &Transaction) -> (Decision, Vec<usize>) {
        match t.next() {
            Next::PhaseTwo {
                decision,
                participants,
            } => (decision, participants),
            other => panic!("not in phase two: {other:?}"),
        }
    }

    #[test]
    fn all_commit_votes_commit() {
        let mut t = tx(2);
        assert_eq!(t.next(), Next::Prepare);
        t.vote(0, Ok(Vote::Commit), 1);
        assert!(!t.votes_settled());
        assert_eq!(t.decide(2), None, "still waiting for p1");
        t.vote(1, Ok(Vote::Commit), 3);
        assert!(t.votes_settled());
        assert_eq!(t.decide(4), Some(Decision::Commit));
        assert_eq!(t.decide(5), None, "decided once");
        assert_eq!(phase_two(&t), (Decision::Commit, vec![0, 1]));
        t.phase_two_failed(1, "down", 6);
        t.acked(0, 7);
        assert_eq!(t.status, TxStatus::Committing);
        assert_eq!(phase_two(&t), (Decision::Commit, vec![1]));
        t.acked(1, 8);
        assert_eq!(t.status, TxStatus::Committed);
        assert_eq!(t.participants[1].attempts, 2);
        assert_eq!(t.participants[1].error, None);
        assert_eq!(t.next(), Next::Idle);
        assert_eq!(t.idempotency_key(1, "commit"), "t:p1:commit");
    }

    #[test]
    fn one_abort_vote_aborts_everyone() {
        let mut t = tx(3);
        t.vote(0, Ok(Vote::Commit), 1);
        t.vote(1, Ok(Vote::abort("insufficient funds")), 2);
        assert!(t.votes_settled());
        assert_eq!(t.decide(3), Some(Decision::Abort));
        assert!(
            t.reason
                .as_deref()
                .unwrap_or("")
                .contains("insufficient funds")
        );
        // The abort goes to every participant, p2 (no vote) included.
        assert_eq!(phase_two(&t), (Decision::Abort, vec![0, 1, 2]));
        t.vote(2, Ok(Vote::Commit), 4);
        assert_eq!(
            t.participants[2].status,
            ParticipantStatus::Pending,
            "late votes don't count"
        );
        for i in 0..3 {
            t.acked(i, 5);
        }
        assert_eq!(t.status, TxStatus::Aborted);
        assert_eq!(
            t.participants[1].error.as_deref(),
            Some("insufficient funds"),
            "the voter's reason stays"
        );
    }

    #[test]
    fn a_failed_prepare_is_an_abort_vote() {
        let mut t = tx(2);
        t.vote(0, Err("500 Internal Server Error".into()), 1);
        assert_eq!(t.participants[0].status, ParticipantStatus::VotedAbort);
        assert_eq!(t.decide(2), Some(Decision::Abort));
    }

    #[test]
    fn the_deadline_aborts() {
        let mut t = tx(2);
        t.vote(0, Ok(Vote::Commit), 1);
        assert_eq!(t.decide(99), None);
        assert_eq!(t.decide(100), Some(Decision::Abort));
        assert!(t.reason.as_deref().unwrap_or("").contains("\"p1\""));
        assert!(t.participants[1].error.is_some());
    }

    #[test]
    fn presumed_abort_after_a_restart() {
        let mut t = tx(2);
        t.vote(0, Ok(Vote::Commit), 1);
        // The votes were never logged: the stored record is still the first one.
        let mut stored: Transaction =
            serde_json::from_value(serde_json::to_value(tx(2)).expect("ser")).expect("de");
        assert_eq!(stored.next(), Next::Prepare);
        assert!(stored.abort("presumed abort", 5));
        assert!(!stored.abort("again", 6));
        assert_eq!(phase_two(&stored), (Decision::Abort, vec![0, 1]));
        // Once decided, an abort changes nothing.
        assert_eq!(t.decide(2), None);
        t.vote(1, Ok(Vote::Commit), 3);
        assert_eq!(t.decide(4), Some(Decision::Commit));
        assert!(!t.abort("too late", 5));
        assert_eq!(t.status, TxStatus::Committing);
    }

    #[test]
    fn serde_shapes() {
        assert_eq!(
            serde_json::from_value::<Vote>(json!({"vote": "commit"})).expect("commit"),
            Vote::Commit
        );
        assert_eq!(
            serde_json::from_value::<Vote>(json!({"vote": "abort"})).expect("abort"),
            Vote::abort("")
        );
        assert!(serde_json::from_value::<Vote>(json!({"vote": "maybe"})).is_err());
        let t = tx(1);
        let v = serde_json::to_value(&t).expect("ser");
        assert_eq!(v["status"], "preparing");
        assert_eq!(v["participants"][0]["status"], "pending");
        assert_eq!(
            serde_json::from_value::<Transaction>(v).expect("de"),
            t,
            "round trip"
        );
        for s in [
            "preparing",
            "committing",
            "aborting",
            "committed",
            "aborted",
        ] {
            assert_eq!(TxStatus::parse(s).map(TxStatus::as_str), Some(s));
        }
    }

    #[test]
    fn history_is_bounded() {
        let mut t = tx(1);
        t.vote(0, Ok(Vote::Commit), 1);
        t.decide(2);
        for i in 0..(MAX_HISTORY as u64 + 10) {
            t.phase_two_failed(0, "down", 3 + i);
        }
        assert_eq!(t.history.len(), MAX_HISTORY);
        assert!(t.history_dropped > 0);
    }

    /// What a participant does when asked to prepare.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Commit,
        Abort,
        Error,
        /// Prepares, but the answer is lost (counts as an error).
        PreparedButLost,
        /// No answer before the deadline.
        Silent,
    }

    fn answer() -> impl Strategy<Value = Answer> {
        prop_oneof![
            4 => Just(Answer::Commit),
            1 => Just(Answer::Abort),
            1 => Just(Answer::Error),
            1 => Just(Answer::PreparedButLost),
            1 => Just(Answer::Silent),
        ]
    }

    /// A participant's own view.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Local {
        Idle,
        Prepared,
        Committed,
        Aborted,
    }

    fn persist(t: &Transaction) -> Transaction {
        serde_json::from_value(serde_json::to_value(t).expect("ser")).expect("de")
    }

    proptest! {
        /// Whatever the votes, failures and crashes of the coordinator, every
        /// participant ends agreeing with the logged decision; a commit happens only
        /// if everyone voted commit, and a transaction whose decision was never
        /// logged aborts (presumed abort).
        #[test]
        fn participants_always_agree(
            answers in proptest::collection::vec(answer(), 1..6),
            crash_at in proptest::option::of(0usize..40),
            failures in proptest::collection::vec(any::<bool>(), 0..40),
        ) {
            let n = answers.len();
            let mut local = vec![Local::Idle; n];
            let mut stored = persist(&tx(n));
            let mut t = stored.clone();
            let mut failures = failures.into_iter();
            let mut steps = 0usize;
            let mut crashed = false;
            let mut all_voted_commit = false;
            let mut decision_logged_before_crash = false;
            // Runs until idle; a crash drops the in-memory state and resumes from the
            // last persisted one.
            loop {
                if crash_at == Some(steps) && !crashed {
                    crashed = true;
                    decision_logged_before_crash = stored.decision.is_some();
                    t = stored.clone();
                    if t.status == TxStatus::Preparing {
                        prop_assert!(t.abort("presumed abort", 50));
                        stored = persist(&t);
                    }
                }
                steps += 1;
                match t.next() {
                    Next::Prepare => {
                        for (i, a) in answers.iter().enumerate() {
                            match a {
                                Answer::Commit => { local[i] = Local::Prepared; t.vote(i, Ok(Vote::Commit), 1); }
                                Answer::Abort => t.vote(i, Ok(Vote::abort("no")), 1),
                                Answer::Error => t.vote(i, Err("boom".into()), 1),
                                Answer::PreparedButLost => { local[i] = Local::Prepared; t.vote(i, Err("lost".into()), 1); }
                                Answer::Silent => {}
                            }
                        }
                        all_voted_commit = answers.iter().all(|a| matches!(a, Answer::Commit));
                        let now = if t.votes_settled() { 2 } else { 100 };
                        prop_assert!(t.decide(now).is_some());
                        stored = persist(&t);
                    }
                    Next::PhaseTwo { decision, participants } => {
                        for i in participants {
                            if failures.next().unwrap_or(false) {
                                t.phase_two_failed(i, "down", 60);
                            } else {
                                local[i] = match decision {
                                    Decision::Commit => {
                                        prop_assert_eq!(local[i], Local::Prepared, "commit of an unprepared participant");
                                        Local::Committed
                                    }
                                    Decision::Abort => {
                                        prop_assert_ne!(local[i], Local::Committed);
                                        Local::Aborted
                                    }
                                };
                                t.acked(i, 61);
                            }
                            stored = persist(&t);
                            if crash_at == Some(steps) { break; }
                        }
                    }
                    Next::Idle => break,
                }
                prop_assert!(steps < 200, "stuck");
            }
            prop_assert!(t.status.is_final());
            let expected = match t.status {
                TxStatus::Committed => {
                    prop_assert!(all_voted_commit);
                    prop_assert!(!crashed || decision_logged_before_crash, "presumed abort");
                    Local::Committed
                }
                _ => Local::Aborted,
            };
            for (i, l) in local.iter().enumerate() {
                prop_assert_eq!(*l, expected, "participant {} disagrees", i);
            }
        }
    }
}
