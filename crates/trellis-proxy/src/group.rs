//! One app's instances: membership (from discovery), balancing, and the background
//! work that keeps their state current (health checks, latency outlier sweeps).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use trellis_core::config::{AppConfig, HealthCheckConfig, LbPolicy, OutlierConfig};
use trellis_shard::Ring;

use crate::balance::{self, Node};
use crate::endpoint::{Endpoint, EndpointSnapshot};
use crate::error::InstanceUnavailable;
use crate::upstream::HttpClient;

/// Virtual nodes per instance on the hash ring.
const VNODES: u32 = 160;

/// The current members, swapped whole on change.
#[derive(Debug, Default)]
struct Members {
    endpoints: Vec<Arc<Endpoint>>,
    ring: Option<Ring<Node>>,
}

/// An app's instances and how to reach them.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) app: String,
    lb: LbPolicy,
    outlier: OutlierConfig,
    health: Option<HealthCheckConfig>,
    pub(crate) client: HttpClient,
    members: RwLock<Arc<Members>>,
    counter: AtomicUsize,
    rng: Mutex<fastrand::Rng>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The instance list followed, for others that must follow it too.
    source: watch::Receiver<Vec<String>>,
}

/// An app's instances as the API shows them.
#[derive(Debug, Clone, Serialize)]
pub struct GroupSnapshot {
    /// The app.
    pub app: String,
    /// Its load balancing policy.
    pub lb: String,
    /// Its instances.
    pub instances: Vec<EndpointSnapshot>,
}

impl Group {
    /// A group for `app`, following `instances`, with its background tasks started.
    pub(crate) fn start(
        app: &str,
        config: &AppConfig,
        instances: watch::Receiver<Vec<String>>,
        client: HttpClient,
    ) -> Arc<Self> {
        let group = Arc::new(Self {
            app: app.to_owned(),
            lb: config.lb.clone(),
            outlier: config.outlier_detection.clone(),
            health: config.health_check.clone(),
            client,
            members: RwLock::new(Arc::default()),
            counter: AtomicUsize::new(0),
            rng: Mutex::new(fastrand::Rng::new()),
            tasks: Mutex::new(Vec::new()),
            source: instances.clone(),
        });
        group.reconcile(&instances.borrow());
        let mut tasks = vec![tokio::spawn(follow(Arc::downgrade(&group), instances))];
        if group.outlier.latency_factor > 0.0 {
            tasks.push(tokio::spawn(crate::outlier::latency_sweeps(
                Arc::downgrade(&group),
            )));
        }
        if let Some(health) = group.health.clone() {
            tasks.push(tokio::spawn(crate::health::check_loop(
                Arc::downgrade(&group),
                health,
            )));
        }
        *group
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = tasks;
        group
    }

    fn members(&self) -> Arc<Members> {
        Arc::clone(
            &self
                .members
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The instance list this group follows (as discovery gives it).
    pub(crate) fn source(&self) -> watch::Receiver<Vec<String>> {
        self.source.clone()
    }

    pub(crate) fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.members().endpoints.clone()
    }

    /// Applies a new instance list, keeping the state of instances that stay.
    fn reconcile(&self, urls: &[String]) {
        let current = self.members();
        let mut by_url: HashMap<&str, &Arc<Endpoint>> = current
            .endpoints
            .iter()
            .map(|e| (e.url.as_str(), e))
            .collect();
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in urls {
            let url = url.trim_end_matches('/');
            if let Some(existing) = by_url.remove(url) {
                endpoints.push(Arc::clone(existing));
                continue;
            }
            match Endpoint::new(&self.app, url.to_owned()) {
                Ok(e) => endpoints.push(Arc::new(e)),
                Err(reason) => tracing::warn!(app = %self.app, %reason, "ignoring instance"),
            }
        }
        let ring = matches!(self.lb, LbPolicy::Hash(_))
            .then(|| Ring::new(endpoints.iter().cloned().map(Node), VNODES));
        let added = endpoints
            .len()
            .saturating_sub(current.endpoints.len() - by_url.len());
        tracing::info!(app = %self.app, instances = endpoints.len(), added, removed = by_url.len(), "instances updated");
        *self
            .members
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Arc::new(Members { endpoints, ring });
    }

    /// Picks an available instance for `req`.
    pub(crate) fn pick<B>(&self, req: &http::Request<B>, now: Instant) -> Option<Arc<Endpoint>> {
        let members = self.members();
        match &self.lb {
            LbPolicy::RoundRobin => {
                let counter = self.counter.fetch_add(1, Ordering::Relaxed);
                balance::round_robin(&members.endpoints, counter, now)
            }
            LbPolicy::Hash(source) => match (balance::hash_key(source, req), &members.ring) {
                (Some(key), Some(ring)) => balance::hashed(ring, key, now),
                // No key on this request: balance it like any other.
                _ => self.p2c(&members, now),
            },
            LbPolicy::P2c => self.p2c(&members, now),
        }
    }

    /// The instance at `url` (a [`PinnedInstance`](crate::PinnedInstance)), if it may
    /// take requests now.
    pub(crate) fn pinned(
        &self,
        url: &str,
        now: Instant,
    ) -> Result<Arc<Endpoint>, InstanceUnavailable> {
        let url = url.trim_end_matches('/');
        let unavailable = |reason| InstanceUnavailable {
            app: self.app.clone(),
            instance: url.to_owned(),
            reason,
        };
        let members = self.members();
        let endpoint = members
            .endpoints
            .iter()
            .find(|e| e.url == url)
            .ok_or_else(|| unavailable("not an instance of the app"))?;
        if endpoint.is_ejected(now) {
            Err(unavailable("ejected"))
        } else if !endpoint.is_available(now) {
            Err(unavailable("failing health checks"))
        } else {
            Ok(Arc::clone(endpoint))
        }
    }

    fn p2c(&self, members: &Members, now: Instant) -> Option<Arc<Endpoint>> {
        let mut rng = self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        balance::p2c(&members.endpoints, &mut rng, now)
    }

    /// Records a finished request; ejects the instance after too many errors in a row.
    pub(crate) fn record(&self, endpoint: &Endpoint, latency: Duration, failed: bool) {
        let now = Instant::now();
        let errors = endpoint.record(latency, failed, now);
        let threshold = self.outlier.consecutive_errors;
        if threshold > 0 && errors >= threshold && !endpoint.is_ejected(now) {
            self.try_eject(endpoint, now, "consecutive_errors");
        }
    }

    /// Ejects `endpoint` unless that would eject more than `max_ejection_percent`.
    pub(crate) fn try_eject(
        &self,
        endpoint: &Endpoint,
        now: Instant,
        reason: &'static str,
    ) -> bool {
        let endpoints = self.endpoints();
        let ejected = endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let allowed = endpoints.len() * self.outlier.max_ejection_percent as usize / 100;
        if ejected >= allowed {
            tracing::debug!(app = %self.app, instance = %endpoint.url, reason, "not ejecting: max_ejection_percent reached");
            return false;
        }
        let duration = endpoint.eject(now, self.outlier.base_ejection, self.outlier.max_ejection);
        tracing::warn!(app = %self.app, instance = %endpoint.url, reason, ?duration, "instance ejected");
        metrics::counter!("trellis_upstream_ejections_total", "app" => self.app.clone(), "instance" => endpoint.url.clone(), "reason" => reason)
            .increment(1);
        true
    }

    pub(crate) fn outlier(&self) -> &OutlierConfig {
        &self.outlier
    }

    pub(crate) fn snapshot(&self) -> GroupSnapshot {
        let now = Instant::now();
        GroupSnapshot {
            app: self.app.clone(),
            lb: self.lb.to_string(),
            instances: self
                .members()
                .endpoints
                .iter()
                .map(|e| e.snapshot(now))
                .collect(),
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }
}

/// Applies every change of the instance list until the group or the source is gone.
async fn follow(group: Weak<Group>, mut instances: watch::Receiver<Vec<String>>) {
    while instances.changed().await.is_ok() {
        let Some(group) = group.upgrade() else { return };
        let urls = instances.borrow_and_update().clone();
        group.reconcile(&urls);
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pinned_requests_get_their_instance_or_an_error() {
        let config = AppConfig {
            instances: vec!["http://10.0.0.1:80".into(), "http://10.0.0.2:80/".into()],
            ..AppConfig::default()
        };
        let (_tx, rx) = watch::channel(config.instances.clone());
        let group = Group::start(
            "orders",
            &config,
            rx,
            crate::upstream::client(config.protocol, config.connect_timeout),
        );
        let now = Instant::now();
        let url = |r: Result<Arc<Endpoint>, InstanceUnavailable>| r.map(|e| e.url.clone());
        assert_eq!(
            url(group.pinned("http://10.0.0.2:80/", now)).expect("available"),
            "http://10.0.0.2:80"
        );
        let reason = |r: Result<Arc<Endpoint>, InstanceUnavailable>| {
            r.map(|_| ()).expect_err("unavailable").reason
        };
        assert_eq!(
            reason(group.pinned("http://10.0.0.9:80", now)),
            "not an instance of the app"
        );
        let endpoints = group.endpoints();
        endpoints[0].set_healthy(false);
        assert_eq!(
            reason(group.pinned("http://10.0.0.1:80", now)),
            "failing health checks"
        );
        endpoints[1].eject(now, Duration::from_secs(5), Duration::from_secs(5));
        assert_eq!(reason(group.pinned("http://10.0.0.2:80", now)), "ejected");
        assert_eq!(
            url(group.pinned("http://10.0.0.2:80", now + Duration::from_secs(6)))
                .expect("back after the ejection"),
            "http://10.0.0.2:80"
        );
    }
}
