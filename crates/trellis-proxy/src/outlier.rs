//! Latency outlier detection: every interval, an instance whose mean latency is more
//! than `latency_factor` times the median of its peers' is ejected — slow is the new
//! down. (Envoy ejects only on errors; latency ejection has been asked for since
//! 2016, envoy#288.)

use std::sync::Weak;
use std::time::Duration;

use tokio::time::Instant;

use crate::group::Group;

pub(crate) async fn latency_sweeps(group: Weak<Group>) {
    let every = match group.upgrade() {
        Some(g) => g.outlier().interval,
        None => return,
    };
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        let Some(group) = group.upgrade() else { return };
        sweep(&group, Instant::now());
    }
}

/// One comparison over the interval that just ended.
pub(crate) fn sweep(group: &Group, now: Instant) {
    let config = group.outlier().clone();
    let endpoints = group.endpoints();
    let means: Vec<(usize, Duration)> = endpoints
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let (requests, mean) = e.take_interval();
            (requests >= config.latency_min_requests).then_some((i, mean))
        })
        .collect();
    for &(i, mean) in &means {
        let mut peers: Vec<Duration> = means
            .iter()
            .filter(|(j, _)| *j != i)
            .map(|(_, m)| *m)
            .collect();
        if peers.is_empty() {
            continue;
        }
        peers.sort_unstable();
        let median = peers[peers.len() / 2];
        let endpoint = &endpoints[i];
        if mean > median.mul_f64(config.latency_factor) && !endpoint.is_ejected(now) {
            tracing::debug!(app = %group.app, instance = %endpoint.url, ?mean, ?median, "latency outlier");
            group.try_eject(endpoint, now, "latency");
        }
    }
}
