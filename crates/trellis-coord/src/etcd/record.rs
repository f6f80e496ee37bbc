//! What the etcd backend stores: the two keys of a name and the holder key's value.
//!
//! ```text
//! {prefix}{kind}/{name}/holder   "{granted ttl in seconds} {owner}", on the holder's lease
//! {prefix}{kind}/{name}/fence    the owner of the newest grant, on no lease
//! ```
//! The holder key exists exactly while the name is held: etcd deletes it when its
//! lease runs out. Its *create revision* is the term's fencing token (the revision of
//! the transaction that granted it, which also wrote the fence key), so it survives
//! re-attaching the key to a lease with another TTL. The fence key is never deleted,
//! and its *mod revision* is the newest token ever issued — the revision counter is
//! durable and never goes back, so tokens grow across restarts without a counter of
//! our own.

use std::time::Duration;

use etcd_client::KeyValue;

use crate::api::{CoordError, Kind};
use crate::name::Name;

use super::BACKEND;

/// The keys of one (kind, name).
#[derive(Debug, Clone)]
pub(super) struct Keys {
    /// Exists while held; on the holder's lease.
    pub(super) holder: String,
    /// Written with every grant; never deleted.
    pub(super) fence: String,
}

impl Keys {
    pub(super) fn new(prefix: &str, kind: Kind, name: &Name) -> Self {
        // NOTE: names cannot contain '/' (see `name.rs`), so no name's keys are a
        // prefix of another's.
        let base = format!("{prefix}{}/{name}/", kind.as_str());
        Self {
            holder: format!("{base}holder"),
            fence: format!("{base}fence"),
        }
    }
}

/// The holder key's value.
pub(super) fn holder_value(ttl_secs: i64, owner: &str) -> String {
    format!("{ttl_secs} {owner}")
}

/// A held name, as read from its holder key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Held {
    pub(super) owner: String,
    /// The key's create revision: the term's fencing token.
    pub(super) token: u64,
    /// The lease the key is attached to.
    pub(super) lease: i64,
    /// The TTL that lease was granted, in whole seconds.
    pub(super) ttl_secs: i64,
    /// The key's mod revision: unchanged means "same lease, same value".
    pub(super) mod_revision: i64,
}

impl Held {
    /// Parses a holder key.
    ///
    /// # Errors
    /// [`CoordError::Backend`] if the key was not written by this backend.
    pub(super) fn parse(kv: &KeyValue) -> Result<Self, CoordError> {
        Self::decode(
            kv.value(),
            kv.create_revision(),
            kv.lease(),
            kv.mod_revision(),
        )
        .map_err(|why| CoordError::Backend {
            backend: BACKEND,
            reason: format!(
                "key {:?} is not a holder record: {why}",
                String::from_utf8_lossy(kv.key())
            ),
        })
    }

    fn decode(
        value: &[u8],
        create_revision: i64,
        lease: i64,
        mod_revision: i64,
    ) -> Result<Self, &'static str> {
        let value = std::str::from_utf8(value).map_err(|_| "not UTF-8")?;
        let (ttl, owner) = value.split_once(' ').ok_or("no owner")?;
        let ttl_secs = ttl
            .parse::<i64>()
            .ok()
            .filter(|t| *t > 0)
            .ok_or("bad ttl")?;
        let token = u64::try_from(create_revision)
            .ok()
            .filter(|t| *t > 0)
            .ok_or("bad create revision")?;
        if owner.is_empty() {
            return Err("empty owner");
        }
        if lease == 0 {
            return Err("no lease");
        }
        Ok(Self {
            owner: owner.to_owned(),
            token,
            lease,
            ttl_secs,
            mod_revision,
        })
    }

    /// The granted TTL.
    pub(super) fn ttl(&self) -> Duration {
        secs(self.ttl_secs)
    }
}

/// Whole seconds (etcd's TTL unit) as a duration; zero for negative ones.
pub(super) fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

/// A requested TTL in etcd's unit: whole seconds, rounded up.
pub(super) fn ceil_secs(ttl: Duration) -> i64 {
    let whole = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(whole.max(1)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn keys_live_under_the_prefix() {
        let k = Keys::new("app/coord/", Kind::Election, &Name::internal("jobs.1"));
        assert_eq!(k.holder, "app/coord/election/jobs.1/holder");
        assert_eq!(k.fence, "app/coord/election/jobs.1/fence");
    }

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ceil_secs(Duration::from_millis(10)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::from_secs(86_400)), 86_400);
        assert_eq!(secs(-1), Duration::ZERO);
    }

    #[test]
    fn holder_values_round_trip() {
        let value = holder_value(2, "worker 1 (pid 7)");
        assert_eq!(value, "2 worker 1 (pid 7)");
        let held = Held::decode(value.as_bytes(), 41, 7, 45).expect("decodes");
        assert_eq!(
            held,
            Held {
                owner: "worker 1 (pid 7)".into(),
                token: 41,
                lease: 7,
                ttl_secs: 2,
                mod_revision: 45,
            }
        );
        assert_eq!(held.ttl(), Duration::from_secs(2));
        let bad: [&[u8]; 6] = [b"2", b"x a", b"0 a", b"-1 a", b"2 ", b"\xff a"];
        for bad in bad {
            assert!(Held::decode(bad, 41, 7, 45).is_err(), "{bad:?}");
        }
        assert!(Held::decode(b"2 a", 41, 0, 45).is_err(), "no lease");
        assert!(Held::decode(b"2 a", 0, 7, 45).is_err(), "no revision");
    }
}
