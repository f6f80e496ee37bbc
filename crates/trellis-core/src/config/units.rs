//! Sizes and durations as people write them (`"4MiB"`, `"30s"`), and lenient number
//! parsing so that values from environment variables — always strings — work for
//! numeric keys too.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// A number of bytes, written as an integer or with a unit: `4096`, `"512KiB"`,
/// `"4MiB"`, `"1GiB"`, `"10MB"`.
///
/// ```
/// use trellis_core::config::ByteSize;
///
/// assert_eq!("4MiB".parse::<ByteSize>().unwrap().bytes(), 4 * 1024 * 1024);
/// assert_eq!("1kb".parse::<ByteSize>().unwrap().bytes(), 1000);
/// assert!("4 parsecs".parse::<ByteSize>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(u64);

impl ByteSize {
    /// `n` bytes.
    pub const fn new(n: u64) -> Self {
        Self(n)
    }

    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| {
            format!("invalid size {s:?}: expected e.g. 4096, \"512KiB\" or \"4MiB\"")
        })?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1_000,
            "kib" | "k" => 1 << 10,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}: use B, KB, KiB, MB, MiB, GB or GiB"
                ));
            }
        };
        n.checked_mul(multiplier)
            .map(Self)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor::<ByteSize>::new(
            "a size such as 4096 or \"4MiB\"",
        ))
    }
}

/// Deserializes a duration from `"30s"`, `"500ms"`, `"1m 30s"` or an integer number of
/// seconds.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(LenientVisitor::<HumanDuration>::new(
        "a duration such as \"30s\", \"500ms\" or an integer number of seconds",
    ))
    .map(|h| h.0)
}

/// Deserializes an optional duration (present means `Some`).
pub fn option_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Deserializes a `u32` from an integer or a string holding one.
pub fn lenient_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    d.deserialize_any(LenientVisitor::<u32>::new("a non-negative integer"))
}

/// Deserializes a socket address such as `"127.0.0.1:3700"` or `"[::1]:3700"`.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        de::Error::custom(format!(
            "invalid socket address {s:?}: expected host:port such as \"127.0.0.1:3700\""
        ))
    })
}

struct HumanDuration(Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<u64>() {
            return Ok(Self(Duration::from_secs(secs)));
        }
        humantime::parse_duration(s).map(Self).map_err(|e| {
            format!("invalid duration {s:?} ({e}): expected e.g. \"30s\" or \"500ms\"")
        })
    }
}

/// Accepts a value either natively (an integer) or as a string to parse, since
/// environment overrides are always strings.
struct LenientVisitor<T> {
    expecting: &'static str,
    _marker: std::marker::PhantomData<T>,
}

impl<T> LenientVisitor<T> {
    fn new(expecting: &'static str) -> Self {
        Self {
            expecting,
            _marker: std::marker::PhantomData,
        }
    }
}

impl<T> Visitor<'_> for LenientVisitor<T>
where
    T: FromStr<Err: fmt::Display>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        if v < 0 {
            return Err(E::custom(format!("must not be negative, got {v}")));
        }
        self.visit_str(&v.to_string())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.trim().parse::<T>().map_err(|e| {
            let detail = e.to_string();
            // Integer parse errors are terse ("invalid digit found in string"); say what
            // was expected and what we got.
            if detail.contains(v.trim()) {
                E::custom(detail)
            } else {
                E::custom(format!("expected {}, got {v:?}", self.expecting))
            }
        })
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        for (s, n) in [
            ("0", 0),
            ("4096", 4096),
            ("4MiB", 4 << 20),
            ("4 MiB", 4 << 20),
            ("4m", 4 << 20),
            ("2GB", 2_000_000_000),
            ("1KiB", 1024),
        ] {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(n)), "{s}");
        }
        for s in ["", "MiB", "-1", "4 parsecs", "99999999999999999999GiB"] {
            assert!(s.parse::<ByteSize>().is_err(), "{s}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            "30".parse::<HumanDuration>().map(|d| d.0),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(
            "1m 30s".parse::<HumanDuration>().map(|d| d.0),
            Ok(Duration::from_secs(90))
        );
        assert_eq!(
            "250ms".parse::<HumanDuration>().map(|d| d.0),
            Ok(Duration::from_millis(250))
        );
        assert!("soon".parse::<HumanDuration>().is_err());
    }

    proptest! {
        #[test]
        fn byte_size_display_round_trips(n in 0u64..(1 << 50)) {
            let size = ByteSize(n);
            prop_assert_eq!(size.to_string().parse::<ByteSize>(), Ok(size));
        }

        #[test]
        fn byte_size_parse_never_panics(s in "\\PC{0,24}") {
            let _ = s.parse::<ByteSize>();
        }
    }
}
