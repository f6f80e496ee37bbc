//! Two-phase commit: a coordinator with a durable log and recovery.
//!
//! A 2PC transaction makes several participants — apps over HTTP, state stores,
//! PostgreSQL databases — either all commit or all abort. The coordinator asks each
//! to **prepare** (make its part durable but not visible, and vote), **logs the
//! decision** (commit only if every participant voted commit before the deadline),
//! and then tells each to **commit** or **abort**, retrying until each
//! acknowledges. A crash before the decision is logged aborts the transaction on
//! recovery (*presumed abort*); a crash after it resumes phase two.
//!
//! - [`state`]: the transaction state machine, pure logic with no I/O.
//! - [`participant`]: the [`Participant`] trait and the [`Participants`] factory
//!   that builds them from JSON specs; [`SidecarParticipants`] has three kinds:
//!   `app` (HTTP, through the invoker), `state` (a state store, with keys locked in
//!   [`KeyLocks`] between prepare and commit) and `postgres` (`PREPARE TRANSACTION`).
//! - [`coordinator`]: [`TxCoordinator`], running transactions over the
//!   [`SagaLog`](crate::log::SagaLog) and recovering them on start.
//! - [`locks`]: the key locks of `state` participants.
//!
//! The HTTP protocol of `app` participants is in `docs/two-phase-commit.md`.
//!
//! ```
//! use std::sync::Arc;
//! use async_trait::async_trait;
//! use serde_json::{Value, json};
//! use trellis_saga::log::embedded::EmbeddedLog;
//! use trellis_saga::twopc::{
//!     Participant, ParticipantError, Participants, SpecError, TxContext, TxCoordinator,
//!     TxOptions, TxRequest, TxStatus, Vote,
//! };
//!
//! /// Votes what its spec says.
//! #[derive(Debug)]
//! struct Voter(bool);
//! #[async_trait]
//! impl Participant for Voter {
//!     async fn prepare(&self, _: &TxContext) -> Result<Vote, ParticipantError> {
//!         Ok(if self.0 { Vote::Commit } else { Vote::abort("out of stock") })
//!     }
//!     async fn commit(&self, _: &TxContext) -> Result<(), ParticipantError> { Ok(()) }
//!     async fn abort(&self, _: &TxContext) -> Result<(), ParticipantError> { Ok(()) }
//! }
//!
//! #[derive(Debug)]
//! struct Voters;
//! #[async_trait]
//! impl Participants for Voters {
//!     fn build(&self, _: &str, spec: &Value) -> Result<Arc<dyn Participant>, SpecError> {
//!         Ok(Arc::new(Voter(spec["commit"].as_bool().unwrap_or(false))))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let log = Arc::new(EmbeddedLog::open(dir.path().join("tx.redb")).await?);
//! let coordinator = TxCoordinator::open(log, Arc::new(Voters), TxOptions::default()).await?;
//! coordinator.recover().await?;
//!
//! let request = |stock: bool| TxRequest {
//!     participants: vec![
//!         ("payments".into(), json!({"type": "fake", "commit": true})),
//!         ("stock".into(), json!({"type": "fake", "commit": stock})),
//!     ],
//!     payload: json!({"order": 42}),
//!     timeout: None,
//! };
//! let tx = coordinator.begin(request(true), None).await?;
//! assert_eq!(tx.status, TxStatus::Committed);
//! let tx = coordinator.begin(request(false), None).await?;
//! assert_eq!(tx.status, TxStatus::Aborted, "one abort vote aborts everyone");
//! coordinator.close().await;
//! # Ok(())
//! # }
//! ```

mod app;
pub mod coordinator;
pub mod locks;
pub mod participant;
pub mod postgres;
pub mod state;
mod store;

pub use coordinator::{TxCoordinator, TxError, TxOptions, TxRequest, TxSummary};
pub use locks::KeyLocks;
pub use participant::{
    Participant, ParticipantError, Participants, SidecarParticipants, SpecError, TxContext,
};
pub use state::{Decision, ParticipantStatus, Transaction, TxStatus, Vote};
