//! Resilient calls as tower middleware.
//!
//! Each policy is a tower [`Layer`](tower::Layer) with a config struct (serde, with
//! defaults) and can be used on its own around any `Service`. [`stack`] composes a
//! set of them for HTTP in one fixed, documented order.
//!
//! # Layout
//! - [`breaker`]: circuit breaker — closed / open / half-open (plus disabled and
//!   forced-open), count- or time-based sliding window, failure-rate, slow-call-rate
//!   and consecutive-failure trips, growing open waits, transition events.
//! - [`bulkhead`]: bounded concurrency with a bounded, time-limited wait queue.
//! - [`rate_limit`]: GCRA, optionally keyed; a Redis variant shares one limit across
//!   sidecars and falls back to local limiting.
//! - [`retry`]: backoff with jitter, `Retry-After`, idempotency rules, and a retry
//!   budget that counts retries still waiting in backoff.
//! - [`timeout`], [`hedge`], [`fallback`], [`fault`]: per-attempt and overall
//!   timeouts, hedged requests, fallback responses, fault injection.
//! - [`classify`]: what counts as a failure (default for HTTP: 5xx, 429, timeouts
//!   and connection errors).
//! - [`error`]: the rejection errors, each downcastable from a [`BoxError`].
//! - [`stack`]: [`HttpPolicies`](stack::HttpPolicies) composes one target's policies
//!   in the order below; [`Registry`](stack::Registry) snapshots every instance.
//!
//! # Order
//! When several policies guard one target they compose, outermost first:
//!
//! ```text
//! fallback → overall timeout → rate limit → retry → hedge → circuit breaker
//!          → bulkhead (target, then global) → attempt timeout → fault injection → call
//! ```
//!
//! - *Fallback* outermost, so it can replace any failure, including the overall timeout.
//! - *Overall timeout* bounds everything the call may take, retries and backoff included.
//! - *Rate limit* before retry: a rejected call is refused at once, not retried into
//!   the limit.
//! - *Retry* and *hedge* outside the *breaker*: every attempt is seen by the breaker, and
//!   an open breaker stops the attempts instead of them piling up.
//! - *Bulkhead* inside the breaker, so calls the breaker refuses never take a slot.
//! - *Attempt timeout* bounds a single attempt; *faults* are injected innermost, where
//!   they look to every policy like the upstream misbehaving.

pub mod breaker;
pub mod bulkhead;
pub mod classify;
pub mod error;
pub mod fallback;
pub mod fault;
pub mod hedge;
pub mod rate_limit;
pub mod retry;
pub mod stack;
pub mod timeout;

pub use error::BoxError;
