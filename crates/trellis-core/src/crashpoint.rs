//! Crash points: named places where a test can stop the process to `kill -9` it.
//!
//! Code that must survive a crash at a boundary (a saga between persisting a step
//! and calling it, a 2PC coordinator between logging its decision and phase two, an
//! outbox between commit and relay) calls [`reach`] there. Normally that does
//! nothing. When the environment variable `TRELLIS_CRASH_POINTS` lists the point
//! (comma-separated; a trailing `*` matches any suffix), the process prints
//! `trellis: crash point <name> reached` on stderr and the task holds there forever,
//! so a black-box test can wait for the line and `kill -9` the real binary at
//! exactly that boundary.
//!
//! ```
//! # async fn demo() {
//! // Nothing happens unless TRELLIS_CRASH_POINTS names the point.
//! trellis_core::crashpoint::reach("saga.before_action:debit").await;
//! # }
//! ```

use std::sync::OnceLock;

/// The environment variable listing the armed points.
pub const ENV: &str = "TRELLIS_CRASH_POINTS";

fn armed_points() -> &'static [String] {
    static POINTS: OnceLock<Vec<String>> = OnceLock::new();
    POINTS.get_or_init(|| parse(&std::env::var(ENV).unwrap_or_default()))
}

fn parse(spec: &str) -> Vec<String> {
    spec.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

fn matches(points: &[String], point: &str) -> bool {
    points.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => point.starts_with(prefix),
        None => p == point,
    })
}

/// Whether `point` is armed in this process.
pub fn is_armed(point: &str) -> bool {
    let points = armed_points();
    !points.is_empty() && matches(points, point)
}

/// Holds the calling task forever if `point` is armed (after saying so on stderr);
/// returns at once otherwise.
pub async fn reach(point: &str) {
    if is_armed(point) {
        eprintln!("trellis: crash point {point} reached");
        std::future::pending::<()>().await;
    }
}

/// The stderr line [`reach`] prints for `point`, for tests waiting on it.
pub fn marker(point: &str) -> String {
    format!("trellis: crash point {point} reached")
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn exact_and_prefix_matches() {
        let points = parse(" saga.before_action:debit , tx.after_decision*,,");
        assert_eq!(points.len(), 2);
        assert!(matches(&points, "saga.before_action:debit"));
        assert!(!matches(&points, "saga.before_action:debit2"));
        assert!(matches(&points, "tx.after_decision"));
        assert!(matches(&points, "tx.after_decision:1"));
        assert!(!matches(&points, "saga.after_action:debit"));
        assert!(!matches(&parse(""), "anything"));
    }
}
