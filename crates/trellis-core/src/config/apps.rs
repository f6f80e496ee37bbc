//! `[apps.<id>]`: the applications this sidecar invokes, and `[[listeners]]`: the
//! ambassador proxies it runs.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::units;

/// An application reachable through `/v1/invoke/<id>/...` (and proxies).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// Base URLs of its instances, e.g. `http://127.0.0.1:9001`.
    pub instances: Vec<String>,
    /// Where instances come from: `static` (the `instances` list) or `registry`
    /// (the healthy instances of the registry service named like the app).
    pub discovery: DiscoveryKind,
    /// `http1` or `h2c` (HTTP/2 without TLS).
    pub protocol: Protocol,
    /// How instances are chosen.
    #[serde(deserialize_with = "lb_policy")]
    pub lb: LbPolicy,
    /// Active health checks; off when absent.
    pub health_check: Option<HealthCheckConfig>,
    /// Passive ejection of failing or slow instances.
    pub outlier_detection: OutlierConfig,
    /// How long to wait for a TCP connection.
    #[serde(deserialize_with = "units::duration")]
    pub connect_timeout: Duration,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            instances: Vec::new(),
            discovery: DiscoveryKind::Static,
            protocol: Protocol::Http1,
            lb: LbPolicy::P2c,
            health_check: None,
            outlier_detection: OutlierConfig::default(),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// Where an app's instances come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryKind {
    /// The `instances` list in the config.
    #[default]
    Static,
    /// The service registry: the healthy instances registered under the app's id
    /// (`PUT /v1/registry/services/<id>/instances/...`, or a sidecar's `[app]`).
    Registry,
}

/// The HTTP version spoken to instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 over cleartext (prior knowledge).
    H2c,
}

/// How a request picks an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LbPolicy {
    /// In turn.
    RoundRobin,
    /// The less loaded of two random instances, by in-flight requests × peak-EWMA
    /// latency.
    P2c,
    /// Consistent hashing on a request key, with bounded loads.
    Hash(HashKey),
}

/// Where the hashing key of a request comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HashKey {
    /// A header's value.
    Header(String),
    /// The n-th segment (0-based) of the path after the app, e.g. 0 for
    /// `/customers/42` → `customers`, 1 → `42`.
    PathSegment(usize),
}

impl FromStr for LbPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let expected = "expected round_robin, p2c, hash:header:<name> or hash:path:<segment>";
        match s {
            "round_robin" => Ok(Self::RoundRobin),
            "p2c" => Ok(Self::P2c),
            _ => match s
                .strip_prefix("hash:")
                .and_then(|rest| rest.split_once(':'))
            {
                Some(("header", name)) if super::resiliency::is_header_name(name) => {
                    Ok(Self::Hash(HashKey::Header(name.to_ascii_lowercase())))
                }
                Some(("path", n)) => n
                    .parse()
                    .map(|n| Self::Hash(HashKey::PathSegment(n)))
                    .map_err(|_| format!("invalid path segment {n:?}: {expected}")),
                _ => Err(format!("invalid load balancing policy {s:?}: {expected}")),
            },
        }
    }
}

impl fmt::Display for LbPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RoundRobin => f.write_str("round_robin"),
            Self::P2c => f.write_str("p2c"),
            Self::Hash(HashKey::Header(h)) => write!(f, "hash:header:{h}"),
            Self::Hash(HashKey::PathSegment(n)) => write!(f, "hash:path:{n}"),
        }
    }
}

fn lb_policy<'de, D: Deserializer<'de>>(d: D) -> Result<LbPolicy, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn option_lb_policy<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LbPolicy>, D::Error> {
    lb_policy(d).map(Some)
}

/// Active health checks: `GET <path>` on every instance every `interval`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// The path probed; 2xx is healthy.
    pub path: String,
    /// Between probes.
    #[serde(deserialize_with = "units::duration")]
    pub interval: Duration,
    /// A probe slower than this failed.
    #[serde(deserialize_with = "units::duration")]
    pub timeout: Duration,
    /// Passed probes in a row that make an unhealthy instance healthy.
    pub healthy_threshold: u32,
    /// Failed probes in a row that make a healthy instance unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/healthz".into(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// Passive outlier detection: instances that fail, or are much slower than their
/// peers, are ejected for a while.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// 5xx answers or connection errors in a row that eject an instance (0 = off).
    pub consecutive_errors: u32,
    /// First ejection; each repeat adds this much again.
    #[serde(deserialize_with = "units::duration")]
    pub base_ejection: Duration,
    /// Longest ejection.
    #[serde(deserialize_with = "units::duration")]
    pub max_ejection: Duration,
    /// Never eject more than this percent of instances at once.
    pub max_ejection_percent: u32,
    /// Eject an instance whose mean latency over an interval is above this many times
    /// its peers' median (0 = off).
    pub latency_factor: f64,
    /// Requests an instance needs in an interval for its latency to count.
    pub latency_min_requests: u32,
    /// Latency is compared every interval.
    #[serde(deserialize_with = "units::duration")]
    pub interval: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
            latency_factor: 3.0,
            latency_min_requests: 20,
            interval: Duration::from_secs(10),
        }
    }
}

/// `[[listeners]]`: an ambassador proxy `trellis up` runs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Names the listener in logs and metrics.
    pub name: String,
    /// Address to accept connections on.
    #[serde(deserialize_with = "units::socket_addr")]
    pub listen: SocketAddr,
    /// Forward to this app's instances, with its policies.
    #[serde(default)]
    pub app: Option<String>,
    /// Or forward to these URLs directly.
    #[serde(default)]
    pub upstreams: Vec<String>,
    /// Load balancing for `upstreams`.
    #[serde(default, deserialize_with = "option_lb_policy")]
    pub lb: Option<LbPolicy>,
}

/// Checks an instance URL: `http://host:port` with nothing after the authority but an
/// optional trailing `/`.
pub fn check_instance_url(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("{url:?} must start with http:// (TLS to upstreams is not supported yet)")
    })?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!("{url:?} must be http://host:port with no path"));
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn lb_policies_parse_and_print() {
        for s in [
            "round_robin",
            "p2c",
            "hash:header:x-customer-id",
            "hash:path:1",
        ] {
            assert_eq!(s.parse::<LbPolicy>().expect(s).to_string(), s);
        }
        assert_eq!(
            "hash:header:X-Key".parse::<LbPolicy>(),
            Ok(LbPolicy::Hash(HashKey::Header("x-key".into())))
        );
        for bad in [
            "random",
            "hash",
            "hash:header:",
            "hash:header:bad header",
            "hash:path:x",
            "hash:cookie:a",
        ] {
            assert!(bad.parse::<LbPolicy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_urls() {
        assert!(check_instance_url("http://127.0.0.1:9001").is_ok());
        assert!(check_instance_url("http://payments:80/").is_ok());
        for bad in [
            "https://x",
            "127.0.0.1:9",
            "http://",
            "http://x/path",
            "http://u@x",
        ] {
            assert!(check_instance_url(bad).is_err(), "{bad}");
        }
    }
}
