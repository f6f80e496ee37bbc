//! What changes between the request a caller sent and the one forwarded upstream.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use trellis_core::{RequestId, TraceContext};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1); never
/// forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those the `Connection` header names, and
/// `Upgrade` (protocol upgrades are not proxied).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Prepares headers for forwarding: drops hop-by-hop headers and `Host` (the client
/// sets it from the upstream URI), and sets `traceparent` to this hop's span and
/// `X-Request-Id` to the request's id.
pub fn outgoing_headers(headers: &mut HeaderMap, request_id: &RequestId, trace: &TraceContext) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
        headers.insert(HeaderName::from_static("traceparent"), v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id.as_str()) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("host", "sidecar:3700"),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let trace = TraceContext::new_root();
        outgoing_headers(&mut h, &RequestId::from_header("r-1").expect("id"), &trace);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["content-type", "traceparent", "x-custom", "x-request-id"]
        );
        assert_eq!(h["x-request-id"], "r-1");
        assert_eq!(h["traceparent"], trace.to_string().as_str());
    }
}
