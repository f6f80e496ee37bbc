//! How topics and groups map to JetStream names.
//!
//! Topic and group names are 1-249 of `A-Z a-z 0-9 . _ -`. JetStream stream and
//! consumer names may not contain `.`, and subjects may not have empty tokens, so:
//!
//! - **names** (streams, consumers) escape `_` as `__` and `.` as `_D`, which is
//!   reversible, so distinct names stay distinct. An escaped name longer than
//!   [`MAX_ESCAPED`] bytes keeps its first 183 bytes followed by `_H` and a 64-bit
//!   hash of the whole (201 bytes: never the length of an unhashed name), so names
//!   stay short enough for the server's file store;
//! - **subjects** are `<prefix>.<topic>`, except that an empty token (from `..`, or a
//!   leading or trailing `.`) is written `~`, a character topics cannot contain.
//!
//! Within one prefix the mappings are injective (up to a hash collision for names over
//! [`MAX_ESCAPED`] bytes).

/// Longest escaped name used as is.
pub(super) const MAX_ESCAPED: usize = 200;
/// Bytes kept of a longer escaped name before its hash.
const KEPT: usize = 183;

/// Escapes `_` as `__` and `.` as `_D`.
pub(super) fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '_' => out.push_str("__"),
            '.' => out.push_str("_D"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`escape`]; `None` if `escaped` is not an escaping.
pub(super) fn unescape(escaped: &str) -> Option<String> {
    let mut out = String::with_capacity(escaped.len());
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        if c == '_' {
            match chars.next()? {
                '_' => out.push('_'),
                'D' => out.push('.'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// FNV-1a, 64 bits: stable across builds and platforms.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The escaped name, shortened with a hash if over [`MAX_ESCAPED`] bytes.
fn fit(escaped: String) -> String {
    if escaped.len() <= MAX_ESCAPED {
        return escaped;
    }
    // Escaped names are ASCII, so any byte index is a char boundary.
    let kept = escaped.get(..KEPT).unwrap_or(&escaped);
    format!("{kept}_H{:016x}", fnv1a(escaped.as_bytes()))
}

/// The stream holding `topic`: `<escaped prefix>_<escaped topic>`.
pub fn stream_name(prefix: &str, topic: &str) -> String {
    format!("{}_{}", fit(escape(prefix)), fit(escape(topic)))
}

/// The single subject of `topic`'s stream: `<prefix>.<topic>`, with empty tokens
/// written `~`.
pub fn subject(prefix: &str, topic: &str) -> String {
    let tokens: Vec<&str> = topic
        .split('.')
        .map(|t| if t.is_empty() { "~" } else { t })
        .collect();
    format!("{prefix}.{}", tokens.join("."))
}

/// The durable consumer of `group`.
pub fn consumer_name(group: &str) -> String {
    fit(escape(group))
}

/// Whether `prefix` works as a stream prefix: a valid topic name whose dots separate
/// non-empty tokens.
pub(super) fn is_valid_prefix(prefix: &str) -> bool {
    trellis_core::config::is_topic_name(prefix) && prefix.split('.').all(|t| !t.is_empty())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn names_escape_reversibly() {
        assert_eq!(escape("orders.v1_x-y"), "orders_Dv1__x-y");
        assert_eq!(
            unescape("orders_Dv1__x-y").as_deref(),
            Some("orders.v1_x-y")
        );
        assert_eq!(unescape("a_b"), None);
        assert_eq!(unescape("a_"), None);
        assert_eq!(stream_name("trellis", "t.dlq"), "trellis_t_Ddlq");
        assert_eq!(consumer_name("g.1"), "g_D1");
    }

    #[test]
    fn subjects_have_no_empty_tokens() {
        assert_eq!(subject("trellis", "orders.v1"), "trellis.orders.v1");
        assert_eq!(subject("p", "a..b"), "p.a.~.b");
        assert_eq!(subject("p", ".a."), "p.~.a.~");
        assert_eq!(subject("p", "."), "p.~.~");
    }

    #[test]
    fn long_names_are_hashed_to_a_fixed_length() {
        let long = "a.".repeat(120);
        let name = consumer_name(&long);
        assert_eq!(name.len(), KEPT + 2 + 16);
        assert_ne!(name, consumer_name(&"a.".repeat(121)));
        assert_eq!(consumer_name(&"x".repeat(200)), "x".repeat(200));
    }

    #[test]
    fn prefixes() {
        assert!(is_valid_prefix("trellis"));
        assert!(is_valid_prefix("a.b-c_d"));
        for bad in ["", "a..b", ".a", "a.", "a b", "a*"] {
            assert!(!is_valid_prefix(bad), "{bad}");
        }
    }
}
