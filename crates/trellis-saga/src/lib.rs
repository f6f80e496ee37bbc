//! Sagas and two-phase commit for Trellis, surviving `kill -9`.
//!
//! - [`definition`]: what a saga does — ordered steps, each an action (an invoke of
//!   an app route, or a publish) and an optional compensation, with retry policies,
//!   timeouts and a pivot.
//! - [`template`]: `{{input.x}}` / `{{steps.debit.output.id}}` placeholders.
//! - [`machine`]: the saga state machine, pure logic with no I/O.
//! - [`orchestrator`]: runs sagas as tasks over the log, resuming them on start.
//! - [`actions`]: the I/O side — invoking app routes and publishing events.
//! - [`log`]: the durable log every transition is written to before the action it
//!   leads to (embedded redb or PostgreSQL).
//! - [`twopc`]: two-phase commit — a coordinator that logs its decision before
//!   phase two and finishes interrupted transactions on start (presumed abort), with
//!   app (HTTP), state-store and PostgreSQL (`PREPARE TRANSACTION`) participants.

pub mod actions;
pub mod definition;
pub mod log;
pub mod machine;
pub mod orchestrator;
mod sync;
pub mod template;
pub mod twopc;

pub use definition::{Action, RetryPolicy, SagaDefinition, Step};
pub use machine::{Saga, SagaStatus};
pub use orchestrator::{Orchestrator, SagaError};
