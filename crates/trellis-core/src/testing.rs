//! Helpers for tests that talk to the real backing services.
//!
//! Backend tests run against real PostgreSQL, Redis and friends. They are skipped
//! only when `TRELLIS_TEST_SERVICES=0` is set, and then loudly, so a skipped suite
//! never passes for a green one by accident. In CI the variable is unset and a
//! missing service fails the test.

/// The variable that turns service-backed tests off.
pub const SERVICES_ENV: &str = "TRELLIS_TEST_SERVICES";

/// Whether tests that need `service` should run.
///
/// Returns `false`, after printing a loud warning to stderr, only when
/// `TRELLIS_TEST_SERVICES=0`.
///
/// ```
/// if !trellis_core::testing::services_enabled("postgres") {
///     return;
/// }
/// // ... talk to PostgreSQL ...
/// ```
pub fn services_enabled(service: &str) -> bool {
    let off = std::env::var(SERVICES_ENV).is_ok_and(|v| v.trim() == "0");
    if off {
        eprintln!(
            "\n!!!!! SKIPPED: this test needs {service}, and {SERVICES_ENV}=0 is set. \
             It proves nothing in this run. !!!!!\n"
        );
    }
    !off
}

/// A name unique to this process and call, for schemas, key prefixes and streams, so
/// that tests can run in parallel and be re-run without cleaning up.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// PostgreSQL for tests: `TRELLIS_TEST_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`.
pub fn postgres_url() -> String {
    std::env::var("TRELLIS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Redis for tests: `TRELLIS_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`.
pub fn redis_url() -> String {
    std::env::var("TRELLIS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// NATS for tests: `TRELLIS_TEST_NATS_URL`, default `nats://127.0.0.1:4222`.
pub fn nats_url() -> String {
    std::env::var("TRELLIS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}
