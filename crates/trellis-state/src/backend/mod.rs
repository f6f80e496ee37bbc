//! The state store backends. Each passes the same `contract` suite.
//!
//! | backend | where the data lives | atomicity | etags | TTL |
//! |---|---|---|---|---|
//! | [`EmbeddedStore`] | a redb file in the data dir | one redb transaction (group-committed, fsynced) | store-wide revision in a meta table | expiry index, filtered on read, swept |
//! | [`PostgresStore`] | a table (created on start) | one SQL statement, or one SQL transaction | a sequence | `expires_at` column, filtered on read, swept |
//! | [`RedisStore`] | a hash per key under a prefix | one Lua script | an `INCR` counter | native `PEXPIRE` |

mod embedded;
mod postgres;
mod redis;
mod sweeper;

pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use postgres::PostgresStore;
pub use redis::RedisStore;

use crate::{ETag, Precondition, StateError};

/// Checks `precondition` against the current revision of `key` (`None` = absent).
/// Shared by backends that check in Rust inside their own transaction.
pub(crate) fn check_precondition(
    precondition: &Precondition,
    key: &str,
    current: Option<u64>,
) -> Result<(), StateError> {
    let mismatch = || StateError::EtagMismatch {
        key: key.to_owned(),
    };
    match (precondition, current) {
        (Precondition::None, _) => Ok(()),
        (Precondition::IfExists, Some(_)) => Ok(()),
        (Precondition::IfExists, None) => Err(mismatch()),
        (Precondition::IfMatch(etag), Some(rev)) if etag.revision() == Some(rev) => Ok(()),
        (Precondition::IfMatch(_), _) => Err(mismatch()),
        (Precondition::IfAbsent, None) => Ok(()),
        (Precondition::IfAbsent, Some(_)) => Err(StateError::KeyExists {
            key: key.to_owned(),
        }),
    }
}

/// `ETag` → revision for backends that store revisions as numbers; an etag that is
/// not one of ours can never match, so it maps to an impossible revision.
pub(crate) fn expected_revision(etag: &ETag) -> i64 {
    etag.revision()
        .and_then(|r| i64::try_from(r).ok())
        .unwrap_or(-1)
}

/// The smallest string greater than every string starting with `prefix`, in byte
/// (code point) order; `None` when no such string exists (empty prefix, or only
/// U+10FFFF). Lets a prefix scan be an index range with an upper bound.
pub(crate) fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last as u32 + 1 {
            0xD800 => Some('\u{E000}'),
            n => char::from_u32(n),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Clamps a TTL to what every backend can represent.
pub(crate) fn ttl_millis(ttl: Option<std::time::Duration>) -> Option<i64> {
    ttl.map(|t| {
        i64::try_from(t.min(crate::MAX_TTL).as_millis())
            .unwrap_or(i64::MAX)
            .max(1)
    })
}

#[cfg(test)]
mod test {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn upper_bounds() {
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(prefix_upper_bound("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("\u{10FFFF}"), None);
        assert_eq!(prefix_upper_bound("\u{D7FF}").as_deref(), Some("\u{E000}"));
    }

    proptest! {
        #[test]
        fn upper_bound_is_above_every_extension_and_tight(prefix in "\\PC{1,6}", suffix in "\\PC{0,6}", other in "\\PC{0,8}") {
            if let Some(upper) = prefix_upper_bound(&prefix) {
                let extended = format!("{prefix}{suffix}");
                prop_assert!(extended.as_bytes() < upper.as_bytes());
                // Anything in [prefix, upper) starts with prefix.
                if other.as_bytes() >= prefix.as_bytes() && other.as_bytes() < upper.as_bytes() {
                    prop_assert!(other.starts_with(&prefix));
                }
            }
        }
    }
}
