//! Embedded durable storage engines for Trellis's building blocks.
//!
//! Embedded backends are the default: no infrastructure, one data directory, and a
//! write is acknowledged only once it is fsynced. This crate holds the engines they
//! share, so each building block's embedded backend is a thin mapping of its own
//! semantics onto them.
//!
//! # Layout
//! - [`kv`]: [`KvEngine`], an ordered key-value engine on [redb] whose writer thread
//!   *group-commits* concurrent writes: many writes, one fsync, each acknowledged only
//!   after that fsync.
//! - [`log`]: [`Log`](log::Log), an append-only segmented log of checksummed records
//!   with group commit, a sparse index, retention, and crash recovery that truncates a
//!   torn tail but reports corruption in the middle.
//!
//! [redb]: https://docs.rs/redb

pub mod kv;
pub mod log;

pub use kv::{KvEngine, KvOptions, StorageError};
