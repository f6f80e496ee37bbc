//! Members: the names (and weights) keys are spread over.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ShardError;

/// One member of a placement: a name every process agrees on (an instance id or
/// URL) and a weight.
///
/// The weight is the member's share relative to the others: a member of weight 2
/// gets about twice the keys of a member of weight 1. Weight 0 keeps the member
/// listed but gives it nothing, which drains it before it leaves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The stable name keys are placed by; renaming a member moves its keys.
    pub name: String,
    /// Relative share of the keys; 1 when omitted.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

impl Member {
    /// A member of weight 1.
    pub fn new(name: impl Into<String>) -> Self {
        Self::weighted(name, 1)
    }

    /// A member of the given weight.
    pub fn weighted(name: impl Into<String>, weight: u32) -> Self {
        Self {
            name: name.into(),
            weight,
        }
    }

    /// Members of weight 1, one per name.
    pub fn all<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Vec<Self> {
        names.into_iter().map(Self::new).collect()
    }
}

impl AsRef<str> for Member {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 {
            f.write_str(&self.name)
        } else {
            write!(f, "{} (weight {})", self.name, self.weight)
        }
    }
}

/// Rejects a list in which a name appears twice.
pub(crate) fn check_unique(members: &[Member]) -> Result<(), ShardError> {
    let mut seen = HashSet::with_capacity(members.len());
    for member in members {
        if !seen.insert(member.name.as_str()) {
            return Err(ShardError::DuplicateMember {
                name: member.name.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn weight_defaults_to_one() {
        let member: Member = serde_json::from_str(r#"{"name": "a"}"#).expect("member");
        assert_eq!(member, Member::new("a"));
        let member: Member = serde_json::from_str(r#"{"name": "b", "weight": 3}"#).expect("member");
        assert_eq!(member, Member::weighted("b", 3));
    }

    #[test]
    fn duplicates_are_refused() {
        assert_eq!(
            check_unique(&Member::all(["a", "b", "a"])),
            Err(ShardError::DuplicateMember { name: "a".into() })
        );
        assert_eq!(check_unique(&Member::all(["a", "b"])), Ok(()));
    }
}
