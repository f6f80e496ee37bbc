//! Names of locks and elections, and the checks every backend applies to owners,
//! TTLs and waits before touching any state.
//!
//! # Why so strict
//! A name ends up in an HTTP path (`/v1/locks/{name}`), an etcd key
//! (`…/locks/{name}/…`, where a `/` inside the name would make one lock's prefix
//! contain another's), a PostgreSQL row and the `Trellis-Fencing: <name>:<token>`
//! header (where a `:` would be ambiguous). One small alphabet works everywhere.

use std::fmt;
use std::time::Duration;

use crate::api::Invalid;

/// Longest [`Name`], in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest owner or candidate id, in bytes.
pub const MAX_OWNER_LEN: usize = 256;
/// Shortest lease a backend grants.
pub const MIN_TTL: Duration = Duration::from_millis(10);
/// Longest lease a backend grants.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest a blocking acquire or campaign may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The name of a lock or an election: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters,
/// digits, `-`, `_` and `.`.
///
/// ```
/// use trellis_coord::Name;
///
/// assert!(Name::new("orders.leader").is_ok());
/// assert!(Name::new("a/b").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Checks and wraps `name`.
    ///
    /// # Errors
    /// [`Invalid::Name`] if it is empty, too long, or has other characters.
    pub fn new(name: impl Into<String>) -> Result<Self, Invalid> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("is empty")
        } else if name.len() > MAX_NAME_LEN {
            Some("is longer than 128 bytes")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            Some("may only contain ASCII letters, digits, '-', '_' and '.'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Invalid::Name { name, reason }),
            None => Ok(Self(name)),
        }
    }

    /// A name known to be valid (internal keys).
    pub(crate) fn internal(name: &str) -> Self {
        debug_assert!(Self::new(name).is_ok(), "{name:?} is a valid name");
        Self(name.to_owned())
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Name {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<&str> for Name {
    type Error = Invalid;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

/// Checks an owner (lock) or candidate (election) id: 1 to [`MAX_OWNER_LEN`] bytes,
/// no control characters.
pub(crate) fn check_owner(owner: &str) -> Result<(), Invalid> {
    let reason = if owner.is_empty() {
        "is empty"
    } else if owner.len() > MAX_OWNER_LEN {
        "is longer than 256 bytes"
    } else if owner.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(Invalid::Owner {
        owner: owner.chars().take(64).collect(),
        reason,
    })
}

/// Checks a requested lease duration.
pub(crate) fn check_ttl(ttl: Duration) -> Result<(), Invalid> {
    if (MIN_TTL..=MAX_TTL).contains(&ttl) {
        Ok(())
    } else {
        Err(Invalid::Ttl { ttl })
    }
}

/// Checks how long a blocking call may wait.
pub(crate) fn check_wait(wait: Duration) -> Result<(), Invalid> {
    if wait <= MAX_WAIT {
        Ok(())
    } else {
        Err(Invalid::Wait { wait })
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "orders.leader", "shard-7_primary", &"x".repeat(128)] {
            assert!(Name::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a:b", "a b", "é", "a\n", &"x".repeat(129)] {
            assert!(Name::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            "job.1".parse::<Name>().map(|n| n.to_string()).ok(),
            Some("job.1".into())
        );
    }

    #[test]
    fn owners_ttls_and_waits() {
        assert!(check_owner("worker-1@host:80 (pid 7)").is_ok());
        assert!(check_owner("").is_err());
        assert!(check_owner("a\tb").is_err());
        assert!(check_owner(&"o".repeat(257)).is_err());
        assert!(check_ttl(MIN_TTL).is_ok() && check_ttl(MAX_TTL).is_ok());
        assert!(check_ttl(Duration::ZERO).is_err());
        assert!(check_ttl(MAX_TTL + Duration::from_millis(1)).is_err());
        assert!(check_wait(Duration::ZERO).is_ok() && check_wait(MAX_WAIT).is_ok());
        assert!(check_wait(MAX_WAIT + Duration::from_secs(1)).is_err());
    }
}
