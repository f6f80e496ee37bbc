//! Every configured app, with its instances and per-route policies.

use std::collections::HashMap;
use std::sync::Arc;

use tower::ServiceExt as _;
use trellis_core::Config;
use trellis_core::config::resiliency::PolicyRefs;
use trellis_core::config::{AppConfig, LbPolicy};
use trellis_resilience::breaker::Breaker;
use trellis_resilience::bulkhead::Bulkhead;
use trellis_resilience::fallback::HttpFallback;
use trellis_resilience::fault::Faults;
use trellis_resilience::hedge::HedgeLayer;
use trellis_resilience::rate_limit::RateLimiter;
use trellis_resilience::retry::{HttpRetryPolicy, RetryBudget, RetryLayer};
use trellis_resilience::stack::{HttpPolicies, HttpService, Registry};

use crate::group::{Group, GroupSnapshot};
use crate::upstream::{Upstream, client};
use crate::{Discovery, InvokeError, ProxyBody, StaticDiscovery, forward};

/// A policy could not be built from config.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{key}: {message}")]
pub struct BuildError {
    /// The config key at fault.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl BuildError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The policies of one app or route, around the app's upstream.
#[derive(Debug, Clone)]
struct Route {
    service: HttpService<ProxyBody, ProxyBody>,
    /// The same policies without retries, hedges and fallbacks, for message
    /// deliveries: the broker redelivers, so policy retries must not stack on its
    /// own, and a fallback answer must never acknowledge a message.
    delivery: HttpService<ProxyBody, ProxyBody>,
    /// Whether bodies must be buffered so retries or hedges can resend them.
    replays: bool,
}

#[derive(Debug)]
struct App {
    group: Arc<Group>,
    default: Route,
    /// (path prefix, route), longest prefix first.
    routes: Vec<(String, Route)>,
    replay_limit: usize,
}

impl App {
    fn route(&self, path: &str) -> &Route {
        self.routes
            .iter()
            .find(|(prefix, _)| {
                path == prefix
                    || (path.starts_with(prefix.as_str())
                        && (prefix.ends_with('/')
                            || path.as_bytes().get(prefix.len()) == Some(&b'/')))
            })
            .map_or(&self.default, |(_, route)| route)
    }
}

/// A handle on one app (or listener upstream group) for repeated calls.
#[derive(Debug, Clone)]
pub struct Target(Arc<App>);

impl Target {
    /// Forwards `req` — whose URI is the path (and query) on the app — to an instance
    /// under the matching route's policies. Headers should already be prepared with
    /// [`forward::outgoing_headers`].
    ///
    /// # Errors
    /// [`InvokeError`] if no answer came from the app; the app's own error answers are
    /// `Ok` responses.
    pub async fn call(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, InvokeError> {
        let app = &self.0;
        let route = app.route(req.uri().path());
        let req = if route.replays {
            let (parts, body) = req.into_parts();
            let body = body
                .buffer(app.replay_limit)
                .await
                .map_err(InvokeError::Failed)?;
            http::Request::from_parts(parts, body)
        } else {
            req
        };
        send(&route.service, req).await
    }

    /// Delivers a message: like [`call`](Self::call) under the route's timeouts,
    /// breaker, bulkheads, rate limit and faults, but never retried, hedged or
    /// answered by a fallback: redelivery is the broker's job, and only the app may
    /// acknowledge a message.
    ///
    /// # Errors
    /// [`InvokeError`] if no answer came from the app.
    pub async fn deliver(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, InvokeError> {
        send(&self.0.route(req.uri().path()).delivery, req).await
    }

    /// The app's instances.
    pub fn snapshot(&self) -> GroupSnapshot {
        self.0.group.snapshot()
    }

    /// The instance URLs the app follows (from config or discovery), now and on every
    /// change, for those that must follow them too (shard maps over an app).
    pub fn instances(&self) -> tokio::sync::watch::Receiver<Vec<String>> {
        self.0.group.source()
    }
}

/// One call through `service`; the answer's hop-by-hop headers are dropped.
async fn send(
    service: &HttpService<ProxyBody, ProxyBody>,
    req: http::Request<ProxyBody>,
) -> Result<http::Response<ProxyBody>, InvokeError> {
    let mut response = service
        .clone()
        .oneshot(req)
        .await
        .map_err(InvokeError::Failed)?;
    forward::strip_hop_by_hop(response.headers_mut());
    Ok(response)
}

/// Every app this sidecar can invoke, and the upstream groups of its listeners.
#[derive(Debug, Default)]
pub struct Invoker {
    apps: HashMap<String, Target>,
    listeners: HashMap<String, Target>,
    registry: Registry,
}

impl Invoker {
    /// Builds every `[apps.*]` entry (instances from `discovery`, falling back to the
    /// config's list) with its `[resiliency.targets.apps.*]` policies, and the upstream
    /// groups of `[[listeners]]` with `upstreams`. Bodies of calls that may be replayed
    /// are buffered up to `replay_limit` bytes (larger ones are streamed, unretried).
    ///
    /// # Errors
    /// If a policy can't be built (a validated config always can).
    ///
    /// # Panics
    /// Outside a Tokio runtime (groups run background tasks).
    pub fn new(
        config: &Config,
        discovery: Option<Arc<dyn Discovery>>,
        replay_limit: usize,
    ) -> Result<Self, BuildError> {
        let fallback = StaticDiscovery::default();
        for (name, app) in &config.apps {
            fallback.set(name, app.instances.clone());
        }
        let mut invoker = Self::default();
        let global = match &config.resiliency.global.bulkhead {
            Some(name) => {
                let settings = config
                    .resiliency
                    .policies
                    .bulkheads
                    .get(name)
                    .ok_or_else(|| {
                        BuildError::new(
                            "resiliency.global.bulkhead",
                            format!("unknown bulkhead policy {name:?}"),
                        )
                    })?;
                Some(Bulkhead::new("global", settings.clone()).map_err(|(f, m)| {
                    BuildError::new(format!("resiliency.policies.bulkheads.{name}.{f}"), m)
                })?)
            }
            None => None,
        };
        for (name, app) in &config.apps {
            let instances = discovery
                .as_ref()
                .and_then(|d| d.subscribe(name))
                .or_else(|| fallback.subscribe(name))
                .ok_or_else(|| BuildError::new(format!("apps.{name}"), "no instances"))?;
            let group = Group::start(
                name,
                app,
                instances,
                client(app.protocol, app.connect_timeout),
            );
            let upstream = Upstream::new(Arc::clone(&group), app.protocol);
            let target = config.resiliency.targets.apps.get(name);
            let refs = target.map(|t| t.policies.clone()).unwrap_or_default();
            let default = invoker.route(name, &refs, config, global.as_ref(), &upstream)?;
            let mut routes = Vec::new();
            for (prefix, refs) in target.map(|t| &t.routes).into_iter().flatten() {
                let route = invoker.route(
                    &format!("{name}{prefix}"),
                    refs,
                    config,
                    global.as_ref(),
                    &upstream,
                )?;
                routes.push((prefix.clone(), route));
            }
            routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
            invoker.apps.insert(
                name.clone(),
                Target(Arc::new(App {
                    group,
                    default,
                    routes,
                    replay_limit,
                })),
            );
        }
        for listener in config.listeners.iter().filter(|l| !l.upstreams.is_empty()) {
            let app = AppConfig {
                instances: listener.upstreams.clone(),
                lb: listener.lb.clone().unwrap_or(LbPolicy::P2c),
                ..AppConfig::default()
            };
            let name = format!("listener:{}", listener.name);
            let group = Group::start(
                &name,
                &app,
                tokio::sync::watch::channel(app.instances.clone()).1,
                client(app.protocol, app.connect_timeout),
            );
            let upstream = Upstream::new(Arc::clone(&group), app.protocol);
            // Policies of `[resiliency.targets.apps.<listener name>]`, if any.
            let refs = config
                .resiliency
                .targets
                .apps
                .get(&listener.name)
                .map(|t| t.policies.clone())
                .unwrap_or_default();
            let default =
                invoker.route(&listener.name, &refs, config, global.as_ref(), &upstream)?;
            invoker.listeners.insert(
                listener.name.clone(),
                Target(Arc::new(App {
                    group,
                    default,
                    routes: Vec::new(),
                    replay_limit,
                })),
            );
        }
        Ok(invoker)
    }

    fn route(
        &mut self,
        name: &str,
        refs: &PolicyRefs,
        config: &Config,
        global: Option<&Bulkhead>,
        upstream: &Upstream,
    ) -> Result<Route, BuildError> {
        let policies = build_policies(name, refs, config, global)?;
        self.registry.register(name, &policies);
        let once = HttpPolicies {
            retry: None,
            hedge: None,
            fallback: None,
            ..policies.clone()
        };
        Ok(Route {
            replays: policies.replays(),
            service: policies.layer(upstream.clone()),
            delivery: once.layer(upstream.clone()),
        })
    }

    /// The app named `app`.
    pub fn target(&self, app: &str) -> Option<Target> {
        self.apps.get(app).cloned()
    }

    /// The upstream group of the listener named `name` (for listeners with
    /// `upstreams`; listeners with `app` use [`target`](Self::target)).
    pub fn listener(&self, name: &str) -> Option<Target> {
        self.listeners.get(name).cloned()
    }

    /// Forwards `req` to `app`; see [`Target::call`].
    ///
    /// # Errors
    /// [`InvokeError::AppNotFound`] for an unknown app, else as [`Target::call`].
    pub async fn invoke(
        &self,
        app: &str,
        req: http::Request<ProxyBody>,
    ) -> Result<http::Response<ProxyBody>, InvokeError> {
        let target = self
            .apps
            .get(app)
            .ok_or_else(|| InvokeError::AppNotFound(app.to_owned()))?;
        target.call(req).await
    }

    /// Every policy instance.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every app's instances, by name.
    pub fn snapshot(&self) -> Vec<GroupSnapshot> {
        let mut groups: Vec<GroupSnapshot> = self
            .apps
            .values()
            .chain(self.listeners.values())
            .map(Target::snapshot)
            .collect();
        groups.sort_by(|a, b| a.app.cmp(&b.app));
        groups
    }

    /// The configured app names.
    pub fn apps(&self) -> impl Iterator<Item = &str> {
        self.apps.keys().map(String::as_str)
    }
}

/// Instantiates the policies `refs` names, for the target `name`.
fn build_policies(
    name: &str,
    refs: &PolicyRefs,
    config: &Config,
    global: Option<&Bulkhead>,
) -> Result<HttpPolicies, BuildError> {
    let p = &config.resiliency.policies;
    fn get<'a, T>(
        map: &'a std::collections::BTreeMap<String, T>,
        kind: &str,
        name: &str,
    ) -> Result<&'a T, BuildError> {
        map.get(name).ok_or_else(|| {
            BuildError::new(
                format!("resiliency.policies.{kind}"),
                format!("no policy named {name:?}"),
            )
        })
    }
    let invalid = |kind: &str, policy: &str| {
        let key = format!("resiliency.policies.{kind}.{policy}");
        move |(field, message): (&'static str, String)| {
            BuildError::new(format!("{key}.{field}"), message)
        }
    };
    let mut out = HttpPolicies::default();
    if let Some(t) = &refs.timeout {
        let t = get(&p.timeouts, "timeouts", t)?;
        out.attempt_timeout = t.attempt;
        out.overall_timeout = t.overall;
    }
    let mut budget = None;
    if let Some(r) = &refs.retry {
        let settings = get(&p.retries, "retries", r)?.clone();
        budget = settings.budget.map(|b| Arc::new(RetryBudget::new(name, b)));
        let policy = HttpRetryPolicy::new(settings.statuses.clone(), settings.retry_non_idempotent);
        out.retry = Some(
            RetryLayer::with_budget(name, settings, policy, budget.clone(), fastrand::u64(..))
                .map_err(invalid("retries", r))?,
        );
    }
    if let Some(h) = &refs.hedge {
        let settings = *get(&p.hedges, "hedges", h)?;
        out.hedge = Some(
            HedgeLayer::new(name, settings, HttpRetryPolicy::default(), budget)
                .map_err(invalid("hedges", h))?,
        );
    }
    if let Some(b) = &refs.breaker {
        out.breaker = Some(
            Breaker::new(name, get(&p.breakers, "breakers", b)?.clone())
                .map_err(invalid("breakers", b))?,
        );
    }
    if let Some(b) = &refs.bulkhead {
        out.bulkheads.push(
            Bulkhead::new(name, get(&p.bulkheads, "bulkheads", b)?.clone())
                .map_err(invalid("bulkheads", b))?,
        );
    }
    out.bulkheads.extend(global.cloned());
    if let Some(l) = &refs.rate_limit {
        out.rate_limit = Some(
            RateLimiter::new(name, get(&p.rate_limits, "rate_limits", l)?.clone())
                .map_err(invalid("rate_limits", l))?,
        );
    }
    if let Some(f) = &refs.fallback {
        let settings = get(&p.fallbacks, "fallbacks", f)?;
        settings.validate().map_err(invalid("fallbacks", f))?;
        out.fallback = Some(HttpFallback::new(name, settings.clone()));
    }
    if let Some(f) = &refs.fault {
        out.faults =
            Some(Faults::new(name, *get(&p.faults, "faults", f)?).map_err(invalid("faults", f))?);
    }
    Ok(out)
}
