//! Active health checks: every interval, `GET <path>` on each instance; an instance
//! is marked unhealthy after `unhealthy_threshold` failed probes in a row and healthy
//! again after `healthy_threshold` passed ones.

use std::collections::HashMap;
use std::sync::Weak;

use trellis_core::config::HealthCheckConfig;

use crate::ProxyBody;
use crate::group::Group;

pub(crate) async fn check_loop(group: Weak<Group>, config: HealthCheckConfig) {
    let mut interval = tokio::time::interval(config.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Passed (positive) or failed (negative) probes in a row, per instance.
    let mut streaks: HashMap<String, i64> = HashMap::new();
    loop {
        interval.tick().await;
        let Some(group) = group.upgrade() else { return };
        let endpoints = group.endpoints();
        let probes = endpoints.iter().map(|e| {
            let client = group.client.clone();
            let uri = format!("{}{}", e.url, config.path);
            async move {
                let request = http::Request::get(uri).body(ProxyBody::empty());
                let Ok(request) = request else { return false };
                matches!(
                    tokio::time::timeout(config.timeout, client.request(request)).await,
                    Ok(Ok(response)) if response.status().is_success()
                )
            }
        });
        let results = futures_util::future::join_all(probes).await;
        streaks.retain(|url, _| endpoints.iter().any(|e| &e.url == url));
        for (endpoint, passed) in endpoints.iter().zip(results) {
            let streak = streaks.entry(endpoint.url.clone()).or_insert(0);
            *streak = match (passed, *streak > 0) {
                (true, true) => *streak + 1,
                (true, false) => 1,
                (false, false) => *streak - 1,
                (false, true) => -1,
            };
            let healthy = if *streak >= i64::from(config.healthy_threshold) {
                Some(true)
            } else if -*streak >= i64::from(config.unhealthy_threshold) {
                Some(false)
            } else {
                None
            };
            if let Some(healthy) = healthy
                && endpoint.set_healthy(healthy)
            {
                let app = group.app.clone();
                metrics::gauge!("trellis_upstream_healthy", "app" => app.clone(), "instance" => endpoint.url.clone())
                    .set(if healthy { 1.0 } else { 0.0 });
                if healthy {
                    tracing::info!(app = %app, instance = %endpoint.url, "instance healthy again");
                } else {
                    tracing::warn!(app = %app, instance = %endpoint.url, path = %config.path, "instance failed its health checks");
                }
            }
        }
    }
}

/// One `GET` health probe at a time, on a pooled HTTP/1.1 client: what the active
/// checks above do per instance, for other callers (the service registry's HTTP
/// checks).
///
/// ```no_run
/// # async fn f() {
/// let probe = trellis_proxy::HealthProbe::new(std::time::Duration::from_secs(1));
/// match probe.get("http://127.0.0.1:8080/health").await {
///     Ok(()) => println!("healthy"),
///     Err(reason) => println!("unhealthy: {reason}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct HealthProbe {
    client: crate::upstream::HttpClient,
}

impl HealthProbe {
    /// A probe that gives up connecting after `connect_timeout`.
    pub fn new(connect_timeout: std::time::Duration) -> Self {
        Self {
            client: crate::upstream::client(trellis_core::config::Protocol::Http1, connect_timeout),
        }
    }

    /// `GET url`: `Ok` on a 2xx answer, the reason otherwise. No timeout of its
    /// own beyond connecting: callers bound it.
    ///
    /// # Errors
    /// An invalid URL, a connection failure, or a non-2xx status.
    pub async fn get(&self, url: &str) -> Result<(), String> {
        let request = http::Request::get(url)
            .body(ProxyBody::empty())
            .map_err(|e| format!("invalid url {url:?}: {e}"))?;
        match self.client.request(request).await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("status {}", response.status())),
            Err(e) => Err(format!("request failed: {e}")),
        }
    }
}
