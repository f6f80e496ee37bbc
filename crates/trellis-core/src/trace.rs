//! Request ids and W3C trace context.
//!
//! Every request through the sidecar carries an [`RequestId`] (from the caller's
//! `X-Request-Id`, or generated) and a [`TraceContext`] (from the caller's
//! `traceparent`, or a new trace). Both end up in every log line of the request and
//! travel on to whatever the request calls.
//!
//! ```
//! use trellis_core::TraceContext;
//!
//! let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
//! let ctx = TraceContext::parse(incoming).expect("valid traceparent");
//! assert_eq!(ctx.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! assert!(ctx.sampled());
//!
//! // Our own span within the same trace, to send downstream.
//! let child = ctx.child();
//! assert_eq!(child.trace_id(), ctx.trace_id());
//! assert_ne!(child.span_id(), ctx.span_id());
//! ```

use std::fmt;

/// Longest accepted `X-Request-Id`; longer ones are replaced by a generated id.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A correlation id for one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// A fresh random id (a UUID v4 in its hyphenated form).
    pub fn generate() -> Self {
        // A v4 UUID from a fast thread-local generator (seeded once per thread from
        // the OS): ids must be unique, not unpredictable, and a getrandom syscall per
        // request is measurable on a proxy's hot path.
        let bytes = fastrand::u128(..).to_le_bytes();
        Self(
            uuid::Builder::from_random_bytes(bytes)
                .into_uuid()
                .to_string(),
        )
    }

    /// Accepts a caller's id if it is 1–128 visible ASCII characters; `None` otherwise,
    /// so a hostile header can't inject newlines or megabytes into logs.
    pub fn from_header(value: &str) -> Option<Self> {
        let ok = !value.is_empty()
            && value.len() <= MAX_REQUEST_ID_LEN
            && value.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Self(value.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A W3C trace context (`traceparent`, version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceContext {
    /// Starts a new, sampled trace.
    pub fn new_root() -> Self {
        let (trace_id, span_id) = random_ids();
        Self {
            trace_id,
            span_id,
            flags: 0x01,
        }
    }

    /// Parses a `traceparent` header. Returns `None` when it is invalid, in which case
    /// the W3C spec says to start a new trace.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let version = u8::from_str_radix(version, 16).ok()?;
        // Version ff is forbidden; version 00 has exactly four fields, later versions may
        // append more, which we ignore as the spec asks.
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        let lowercase_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !(lowercase_hex(trace) && lowercase_hex(span) && lowercase_hex(flags)) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A new span in the same trace, with the same flags.
    pub fn child(&self) -> Self {
        let (_, span_id) = random_ids();
        Self { span_id, ..*self }
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The 16-hex-digit span (parent) id.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// Whether the caller asked for this trace to be recorded.
    pub fn sampled(&self) -> bool {
        self.flags & 0x01 == 0x01
    }
}

impl fmt::Display for TraceContext {
    /// Formats as a `traceparent` header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

fn random_ids() -> (u128, u64) {
    // W3C asks for random ids, not secret ones: a thread-local generator seeded from
    // the OS is enough and costs no syscall.
    (fastrand::u128(1..), fastrand::u64(1..))
}

#[cfg(test)]
mod test {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_invalid_traceparents() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn future_versions_may_append_fields() {
        let ctx =
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-xyz")
                .expect("valid");
        assert!(!ctx.sampled());
    }

    #[test]
    fn request_ids_are_sanitised() {
        assert!(RequestId::from_header("abc-123").is_some());
        assert!(RequestId::from_header("").is_none());
        assert!(RequestId::from_header("a b").is_none());
        assert!(RequestId::from_header("a\nb").is_none());
        assert!(RequestId::from_header(&"x".repeat(129)).is_none());
        assert_ne!(RequestId::generate(), RequestId::generate());
    }

    proptest! {
        #[test]
        fn traceparent_round_trips(trace in 1u128.., span in 1u64.., flags: u8) {
            let ctx = TraceContext { trace_id: trace, span_id: span, flags };
            prop_assert_eq!(TraceContext::parse(&ctx.to_string()), Some(ctx));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = TraceContext::parse(&s);
        }
    }
}
