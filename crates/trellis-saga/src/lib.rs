//! Sagas and two-phase commit for Trellis, surviving `kill -9`.
//!
//! - [`log`]: the durable log every transition is written to before the action it
//!   leads to (embedded redb or PostgreSQL).

pub mod log;
