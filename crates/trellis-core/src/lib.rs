//! The shared vocabulary of Trellis.
//!
//! Every other Trellis crate builds on these types; this crate depends on no other
//! Trellis crate and does no I/O beyond reading a config file.
//!
//! # Layout
//! - [`config`]: the `trellis.toml` schema, loading with environment overrides, and
//!   validation that reports *every* error with its key path.
//! - [`clock`]: injectable wall-clock time, for TTLs and anything persisted.
//! - [`crashpoint`]: named places where crash tests stop the process to `kill -9` it.
//! - [`trace`]: request ids and W3C trace context (`traceparent`).
//! - [`testing`]: helpers for tests that need the real backing services.

pub mod clock;
pub mod config;
pub mod crashpoint;
pub mod testing;
pub mod trace;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Config, ConfigError, ConfigErrors};
pub use trace::{RequestId, TraceContext};
