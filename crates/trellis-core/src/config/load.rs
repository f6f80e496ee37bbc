//! Loading: file, then environment overrides, then per-section deserialization and
//! validation, collecting every error on the way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

use super::resiliency::{AppTarget, GlobalPolicies, PolicyRefs, ResiliencyConfig};
use super::{
    AppConfig, Components, Config, ConfigError, ConfigErrors, DiscoveryKind, EmbeddedEventStore,
    EmbeddedPubSub, EmbeddedState, EventStoreComponent, ListenerConfig, LogConfig, NatsPubSub,
    PostgresEventStore, PostgresState, ProjectionConfig, PubSubComponent, RedisPubSub, RedisState,
    ServerConfig, StateComponent, SubscriptionConfig, check_instance_url,
};

/// Prefix of environment variables that override config keys.
pub(crate) const ENV_PREFIX: &str = "TRELLIS_";
/// Separator between key path segments in environment variable names.
pub(crate) const ENV_SEPARATOR: &str = "__";
/// Shorthand for `server.api_token`.
pub(crate) const API_TOKEN_ENV: &str = "TRELLIS_API_TOKEN";

const SECTIONS: [&str; 11] = [
    "app",
    "apps",
    "components",
    "listeners",
    "log",
    "projections",
    "resiliency",
    "sagas",
    "server",
    "shards",
    "subscriptions",
];
const COMPONENT_KINDS: [&str; 5] = ["coord", "eventstore", "pubsub", "sagas", "state"];

impl Config {
    /// Loads `path` (if any) with overrides from this process's environment.
    ///
    /// # Errors
    /// Every problem found, each with its key path; a missing or unreadable file is
    /// one error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigErrors> {
        let text = match path {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                ConfigErrors::new(vec![ConfigError::new(
                    "",
                    format!("cannot read config file {}: {e}", path.display()),
                )])
            })?),
            None => None,
        };
        // `env::vars` panics on non-UTF-8 variables; those can't be ours anyway.
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Self::from_sources(text.as_deref(), env)
    }

    /// Builds a config from TOML text and `(name, value)` environment pairs.
    ///
    /// # Errors
    /// Every problem found, each with its key path.
    pub fn from_sources(
        toml_text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let mut root = match toml_text.map(str::parse::<Table>) {
            None => Table::new(),
            Some(Ok(table)) => table,
            Some(Err(e)) => {
                let msg = format!("invalid TOML: {}", e.to_string().trim_end());
                return Err(ConfigErrors::new(vec![ConfigError::new("", msg)]));
            }
        };
        let origins = apply_env(&mut root, env, &mut errors);

        let mut config = Config::default();
        for (key, value) in root {
            match key.as_str() {
                "server" => {
                    if let Some(server) = section::<ServerConfig>(value, "server", &mut errors) {
                        config.server = server;
                    }
                }
                "log" => {
                    if let Some(log) = section::<LogConfig>(value, "log", &mut errors) {
                        config.log = log;
                    }
                }
                "app" => config.app = section::<super::ServedApp>(value, "app", &mut errors),
                "components" => parse_components(value, &mut config.components, &mut errors),
                "apps" => parse_apps(value, &mut config.apps, &mut errors),
                "resiliency" => parse_resiliency(value, &mut config.resiliency, &mut errors),
                "listeners" => parse_listeners(value, &mut config.listeners, &mut errors),
                "subscriptions" => {
                    named_tables(
                        value,
                        "subscriptions",
                        &mut errors,
                        |name, key, value, errors| {
                            if let Some(s) = section::<SubscriptionConfig>(value, &key, errors) {
                                config.subscriptions.insert(name, s);
                            }
                        },
                    );
                }
                "projections" => {
                    named_tables(
                        value,
                        "projections",
                        &mut errors,
                        |name, key, value, errors| {
                            if let Some(p) = section::<ProjectionConfig>(value, &key, errors) {
                                config.projections.insert(name, p);
                            }
                        },
                    );
                }
                "shards" => {
                    named_tables(value, "shards", &mut errors, |name, key, value, errors| {
                        if let Some(s) = section::<super::ShardMapConfig>(value, &key, errors) {
                            config.shards.insert(name, s);
                        }
                    });
                }
                "sagas" => {
                    named_tables(value, "sagas", &mut errors, |name, key, value, errors| {
                        match serde_json::to_value(value) {
                            Ok(json) => {
                                config.sagas.insert(name, json);
                            }
                            Err(e) => errors.push(ConfigError::new(key, e.to_string())),
                        }
                    });
                }
                other => errors.push(unknown_key(other, &SECTIONS)),
            }
        }
        validate(&config, &mut errors);

        if errors.is_empty() {
            Ok(config)
        } else {
            for e in &mut errors {
                if let Some(var) = origin_of(&origins, &e.key) {
                    e.message
                        .push_str(&format!(" (set by environment variable {var})"));
                }
            }
            Err(ConfigErrors::new(errors))
        }
    }
}

/// Writes `TRELLIS_A__B__C=value` into `root` as `a.b.c = "value"`; returns which
/// key came from which variable, so errors can name it.
fn apply_env(
    root: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, String> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| {
            k == API_TOKEN_ENV || (k.starts_with(ENV_PREFIX) && k.contains(ENV_SEPARATOR))
        })
        .collect();
    // The shorthand first, so an explicit TRELLIS_SERVER__API_TOKEN wins; then by name
    // so the outcome never depends on the environment's order.
    vars.sort_by_key(|(k, _)| (k != API_TOKEN_ENV, k.clone()));

    let mut origins = BTreeMap::new();
    for (var, value) in vars {
        let path: Vec<String> = if var == API_TOKEN_ENV {
            vec!["server".into(), "api_token".into()]
        } else {
            var[ENV_PREFIX.len()..]
                .split(ENV_SEPARATOR)
                .map(str::to_ascii_lowercase)
                .collect()
        };
        if path.iter().any(String::is_empty) {
            errors.push(ConfigError::new(
                "",
                format!("environment variable {var}: empty key segment (use {ENV_SEPARATOR} only between keys)"),
            ));
            continue;
        }
        let key = path.join(".");
        match insert_path(root, &path, Value::String(value)) {
            Ok(()) => {
                origins.insert(key, var);
            }
            Err(blocked) => errors.push(ConfigError::new(
                blocked,
                format!(
                    "cannot set {key} from environment variable {var}: this key is not a table"
                ),
            )),
        }
    }
    origins
}

/// Inserts `value` at `path`, creating tables; `Err` names the non-table in the way.
fn insert_path(root: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = path
        .split_last()
        .expect("env paths have at least one segment");
    let mut table = root;
    for (i, segment) in parents.iter().enumerate() {
        let entry = table
            .entry(segment.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        table = match entry {
            Value::Table(t) => t,
            _ => return Err(path[..=i].join(".")),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

fn origin_of<'a>(origins: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    origins
        .iter()
        .find(|(k, _)| key == k.as_str() || key.starts_with(&format!("{k}.")))
        .map(|(_, var)| var.as_str())
}

/// Deserializes one section, reporting each unknown key and the first type error,
/// all prefixed with the section's key path.
fn section<T: DeserializeOwned>(
    value: Value,
    prefix: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let mut unknown: Vec<String> = Vec::new();
    let result: Result<T, _> = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let de = serde_ignored::Deserializer::new(value, &mut record);
        serde_path_to_error::deserialize(de)
    };
    for path in unknown {
        errors.push(ConfigError::new(join(prefix, &path), "unknown key"));
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let mut key = join(prefix, &e.path().to_string());
            let mut message = e.inner().to_string().trim_end().to_owned();
            // In a nested table toml adds "\nin `<table>`": the key path says it already.
            if let Some(at) = message.find("\nin `") {
                message.truncate(at);
            }
            // "missing field `url`" is reported at the table; point at the key instead.
            if let Some(field) = message
                .strip_prefix("missing field `")
                .and_then(|m| m.strip_suffix('`'))
            {
                key = join(&key, field);
                message = "required key is missing".to_owned();
            }
            errors.push(ConfigError::new(key, message));
            None
        }
    }
}

fn parse_components(value: Value, components: &mut Components, errors: &mut Vec<ConfigError>) {
    let Value::Table(kinds) = value else {
        errors.push(ConfigError::new("components", "expected a table"));
        return;
    };
    for (kind, named) in kinds {
        let prefix = format!("components.{kind}");
        if !COMPONENT_KINDS.contains(&kind.as_str()) {
            errors.push(unknown_key(&prefix, &COMPONENT_KINDS));
            continue;
        }
        let Value::Table(named) = named else {
            errors.push(ConfigError::new(
                prefix,
                "expected a table of named components",
            ));
            continue;
        };
        for (name, value) in named {
            let key = format!("{prefix}.{name}");
            if !valid_component_name(&name) {
                errors.push(ConfigError::new(
                    &key,
                    format!(
                        "invalid component name {name:?}: use 1-63 of a-z, 0-9, '_' and '-', \
                         starting with a letter or digit"
                    ),
                ));
                continue;
            }
            match kind.as_str() {
                "state" => {
                    if let Some(component) = parse_state_component(&key, value, errors) {
                        components.state.insert(name, component);
                    }
                }
                "coord" => {
                    if let Some(component) = parse_coord_component(&key, &name, value, errors) {
                        components.coord.insert(name, component);
                    }
                }
                "sagas" => {
                    if let Some(component) = parse_saga_log_component(&key, &name, value, errors) {
                        components.sagas.insert(name, component);
                    }
                }
                "eventstore" => {
                    let Some((ty, rest)) =
                        component_type(&key, value, &EventStoreComponent::TYPES, errors)
                    else {
                        continue;
                    };
                    let component = match ty.as_str() {
                        "embedded" => section::<EmbeddedEventStore>(rest, &key, errors)
                            .map(EventStoreComponent::Embedded),
                        _ => section::<PostgresEventStore>(rest, &key, errors)
                            .map(EventStoreComponent::Postgres),
                    };
                    if let Some(component) = component {
                        components.eventstore.insert(name, component);
                    }
                }
                _ => {
                    if let Some(component) = parse_pubsub_component(&key, value, errors) {
                        components.pubsub.insert(name, component);
                    }
                }
            }
        }
    }
}

/// Takes `type` out of a component table: `(type, the other keys)`.
fn component_type(
    key: &str,
    value: Value,
    types: &[&str],
    errors: &mut Vec<ConfigError>,
) -> Option<(String, Value)> {
    let Value::Table(mut table) = value else {
        errors.push(ConfigError::new(key, "expected a table"));
        return None;
    };
    let listed = types
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let type_key = format!("{key}.type");
    match table.remove("type") {
        Some(Value::String(s)) if types.contains(&s.as_str()) => Some((s, Value::Table(table))),
        Some(Value::String(other)) => {
            errors.push(ConfigError::new(
                type_key,
                format!("unknown type {other:?}; expected one of {listed}"),
            ));
            None
        }
        Some(other) => {
            errors.push(ConfigError::new(
                type_key,
                format!(
                    "expected a string (one of {listed}), got {}",
                    other.type_str()
                ),
            ));
            None
        }
        None => {
            errors.push(ConfigError::new(
                type_key,
                format!("required key is missing; one of {listed}"),
            ));
            None
        }
    }
}

fn parse_coord_component(
    key: &str,
    name: &str,
    value: Value,
    errors: &mut Vec<ConfigError>,
) -> Option<super::CoordComponent> {
    use super::{CoordComponent, EmbeddedCoord, EtcdCoord, PostgresCoord};
    if name != super::DEFAULT_COMPONENT {
        errors.push(ConfigError::new(
            key,
            "the coordination API uses one backend: name it `default` ([components.coord.default])",
        ));
        return None;
    }
    let (ty, rest) = component_type(key, value, &CoordComponent::TYPES, errors)?;
    let component = match ty.as_str() {
        "embedded" => section::<EmbeddedCoord>(rest, key, errors).map(CoordComponent::Embedded),
        "etcd" => section::<EtcdCoord>(rest, key, errors).map(CoordComponent::Etcd),
        _ => section::<PostgresCoord>(rest, key, errors).map(CoordComponent::Postgres),
    }?;
    match &component {
        CoordComponent::Etcd(etcd) => {
            if etcd.endpoints.is_empty() {
                errors.push(ConfigError::new(
                    format!("{key}.endpoints"),
                    "list at least one etcd client URL",
                ));
            }
            for (i, url) in etcd.endpoints.iter().enumerate() {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    errors.push(ConfigError::new(
                        format!("{key}.endpoints[{i}]"),
                        format!("expected an http:// or https:// URL, got {url:?}"),
                    ));
                }
            }
            if etcd.prefix.is_empty() {
                errors.push(ConfigError::new(
                    format!("{key}.prefix"),
                    "must not be empty",
                ));
            }
            check_timeout(key, "connect_timeout", etcd.connect_timeout, errors);
        }
        CoordComponent::Postgres(pg) => {
            check_identifier(&format!("{key}.schema"), &pg.schema, errors);
            if pg.max_connections == 0 {
                errors.push(ConfigError::new(
                    format!("{key}.max_connections"),
                    "must be at least 1",
                ));
            }
        }
        CoordComponent::Embedded(_) => {}
    }
    Some(component)
}

fn parse_saga_log_component(
    key: &str,
    name: &str,
    value: Value,
    errors: &mut Vec<ConfigError>,
) -> Option<super::SagaLogComponent> {
    use super::{EmbeddedSagaLog, PostgresSagaLog, SagaLogComponent};
    if name != super::DEFAULT_COMPONENT {
        errors.push(ConfigError::new(
            key,
            "sagas and transactions use one log: name it `default` ([components.sagas.default])",
        ));
        return None;
    }
    let (ty, rest) = component_type(key, value, &SagaLogComponent::TYPES, errors)?;
    let component = match ty.as_str() {
        "embedded" => section::<EmbeddedSagaLog>(rest, key, errors).map(SagaLogComponent::Embedded),
        _ => section::<PostgresSagaLog>(rest, key, errors).map(SagaLogComponent::Postgres),
    }?;
    if let SagaLogComponent::Postgres(pg) = &component {
        check_identifier(&format!("{key}.schema"), &pg.schema, errors);
        if pg.max_connections == 0 {
            errors.push(ConfigError::new(
                format!("{key}.max_connections"),
                "must be at least 1",
            ));
        }
        if pg.owner.as_deref().is_some_and(str::is_empty) {
            errors.push(ConfigError::new(
                format!("{key}.owner"),
                "must not be empty",
            ));
        }
    }
    Some(component)
}

fn parse_state_component(
    key: &str,
    value: Value,
    errors: &mut Vec<ConfigError>,
) -> Option<StateComponent> {
    let (ty, rest) = component_type(key, value, &StateComponent::TYPES, errors)?;
    match ty.as_str() {
        "embedded" => section::<EmbeddedState>(rest, key, errors).map(StateComponent::Embedded),
        "postgres" => section::<PostgresState>(rest, key, errors).map(StateComponent::Postgres),
        _ => section::<RedisState>(rest, key, errors).map(StateComponent::Redis),
    }
}

fn parse_pubsub_component(
    key: &str,
    value: Value,
    errors: &mut Vec<ConfigError>,
) -> Option<PubSubComponent> {
    let (ty, rest) = component_type(key, value, &PubSubComponent::TYPES, errors)?;
    let component = match ty.as_str() {
        "embedded" => section::<EmbeddedPubSub>(rest, key, errors).map(PubSubComponent::Embedded),
        "nats" => section::<NatsPubSub>(rest, key, errors).map(PubSubComponent::Nats),
        _ => section::<RedisPubSub>(rest, key, errors).map(PubSubComponent::Redis),
    }?;
    if let Err((field, message)) = component.defaults().validate() {
        errors.push(ConfigError::new(
            format!("{key}.subscriptions.{field}"),
            message,
        ));
    }
    Some(component)
}

/// A table of named entries, each checked for a valid name and handed to `each`.
fn named_tables(
    value: Value,
    prefix: &str,
    errors: &mut Vec<ConfigError>,
    mut each: impl FnMut(String, String, Value, &mut Vec<ConfigError>),
) {
    let Value::Table(table) = value else {
        errors.push(ConfigError::new(
            prefix,
            "expected a table of named entries",
        ));
        return;
    };
    for (name, value) in table {
        let key = format!("{prefix}.{name}");
        if !valid_component_name(&name) {
            errors.push(ConfigError::new(
                &key,
                format!("invalid name {name:?}: use 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit"),
            ));
            continue;
        }
        each(name, key, value, errors);
    }
}

fn parse_apps(value: Value, apps: &mut BTreeMap<String, AppConfig>, errors: &mut Vec<ConfigError>) {
    named_tables(value, "apps", errors, |name, key, value, errors| {
        if let Some(app) = section::<AppConfig>(value, &key, errors) {
            apps.insert(name, app);
        }
    });
}

fn parse_listeners(
    value: Value,
    listeners: &mut Vec<ListenerConfig>,
    errors: &mut Vec<ConfigError>,
) {
    let Value::Array(items) = value else {
        errors.push(ConfigError::new(
            "listeners",
            "expected an array of tables ([[listeners]])",
        ));
        return;
    };
    for (i, item) in items.into_iter().enumerate() {
        if let Some(listener) = section::<ListenerConfig>(item, &format!("listeners[{i}]"), errors)
        {
            listeners.push(listener);
        }
    }
}

fn parse_resiliency(value: Value, out: &mut ResiliencyConfig, errors: &mut Vec<ConfigError>) {
    let Value::Table(table) = value else {
        errors.push(ConfigError::new("resiliency", "expected a table"));
        return;
    };
    for (key, value) in table {
        match key.as_str() {
            "policies" => parse_policies(value, out, errors),
            "targets" => {
                let Value::Table(targets) = value else {
                    errors.push(ConfigError::new("resiliency.targets", "expected a table"));
                    continue;
                };
                for (kind, value) in targets {
                    let prefix = format!("resiliency.targets.{kind}");
                    match kind.as_str() {
                        "apps" => {
                            named_tables(value, &prefix, errors, |name, key, value, errors| {
                                if let Some(t) = parse_app_target(value, &key, errors) {
                                    out.targets.apps.insert(name, t);
                                }
                            })
                        }
                        "components" => {
                            let Value::Table(components) = value else {
                                errors.push(ConfigError::new(prefix, "expected a table"));
                                continue;
                            };
                            for (name, value) in components {
                                let key = format!("{prefix}.{name:?}");
                                if let Some(t) = section::<PolicyRefs>(value, &key, errors) {
                                    out.targets.components.insert(name, t);
                                }
                            }
                        }
                        _ => errors.push(unknown_key(&prefix, &["apps", "components"])),
                    }
                }
            }
            "global" => {
                if let Some(g) = section::<GlobalPolicies>(value, "resiliency.global", errors) {
                    out.global = g;
                }
            }
            _ => errors.push(unknown_key(
                &format!("resiliency.{key}"),
                &["global", "policies", "targets"],
            )),
        }
    }
}

/// An app target: the policy keys, plus `routes` of prefix → policy keys.
fn parse_app_target(value: Value, key: &str, errors: &mut Vec<ConfigError>) -> Option<AppTarget> {
    let Value::Table(mut table) = value else {
        errors.push(ConfigError::new(key, "expected a table"));
        return None;
    };
    let mut routes = BTreeMap::new();
    match table.remove("routes") {
        None => {}
        Some(Value::Table(prefixes)) => {
            for (prefix, value) in prefixes {
                if let Some(refs) =
                    section::<PolicyRefs>(value, &format!("{key}.routes.{prefix:?}"), errors)
                {
                    routes.insert(prefix, refs);
                }
            }
        }
        Some(_) => errors.push(ConfigError::new(
            format!("{key}.routes"),
            "expected a table of path prefixes",
        )),
    }
    let policies = section::<PolicyRefs>(Value::Table(table), key, errors)?;
    Some(AppTarget { policies, routes })
}

/// Each named policy is deserialized and validated on its own, so every broken one is
/// reported.
fn parse_policies(value: Value, out: &mut ResiliencyConfig, errors: &mut Vec<ConfigError>) {
    let Value::Table(kinds) = value else {
        errors.push(ConfigError::new("resiliency.policies", "expected a table"));
        return;
    };
    let p = &mut out.policies;
    for (kind, value) in kinds {
        let prefix = format!("resiliency.policies.{kind}");
        macro_rules! kind {
            ($map:expr) => {
                named_tables(value, &prefix, errors, |name, key, value, errors| {
                    if let Some(policy) = section(value, &key, errors) {
                        check_policy(&key, &policy, errors);
                        $map.insert(name, policy);
                    }
                })
            };
        }
        match kind.as_str() {
            "timeouts" => kind!(p.timeouts),
            "retries" => kind!(p.retries),
            "breakers" => kind!(p.breakers),
            "bulkheads" => kind!(p.bulkheads),
            "rate_limits" => kind!(p.rate_limits),
            "hedges" => kind!(p.hedges),
            "fallbacks" => kind!(p.fallbacks),
            "faults" => kind!(p.faults),
            _ => errors.push(unknown_key(
                &prefix,
                &[
                    "breakers",
                    "bulkheads",
                    "fallbacks",
                    "faults",
                    "hedges",
                    "rate_limits",
                    "retries",
                    "timeouts",
                ],
            )),
        }
    }
}

/// A policy's own rules, reported at `<key>.<field>`.
fn check_policy<P: Validate>(key: &str, policy: &P, errors: &mut Vec<ConfigError>) {
    if let Err((field, message)) = policy.check() {
        errors.push(ConfigError::new(format!("{key}.{field}"), message));
    }
}

/// The policy settings' `validate`, under one name.
trait Validate {
    fn check(&self) -> Result<(), (&'static str, String)>;
}

macro_rules! validate_via {
    ($($t:ty),+) => {
        $(impl Validate for $t {
            fn check(&self) -> Result<(), (&'static str, String)> {
                self.validate()
            }
        })+
    };
}

validate_via!(
    super::resiliency::TimeoutConfig,
    super::resiliency::RetryConfig,
    super::resiliency::BreakerConfig,
    super::resiliency::BulkheadConfig,
    super::resiliency::RateLimitConfig,
    super::resiliency::HedgeConfig,
    super::resiliency::FallbackConfig,
    super::resiliency::FaultConfig
);

fn validate_apps(config: &Config, errors: &mut Vec<ConfigError>) {
    if let Some(app) = &config.app {
        for (field, message) in app.problems() {
            errors.push(ConfigError::new(format!("app.{field}"), message));
        }
    }
    for (name, app) in &config.apps {
        let key = format!("apps.{name}");
        match app.discovery {
            DiscoveryKind::Static if app.instances.is_empty() => errors.push(ConfigError::new(
                format!("{key}.instances"),
                "list at least one instance URL (or set discovery = \"registry\")",
            )),
            DiscoveryKind::Registry if !app.instances.is_empty() => errors.push(ConfigError::new(
                format!("{key}.instances"),
                "instances come from the registry with discovery = \"registry\"; remove the list",
            )),
            DiscoveryKind::Registry => {
                if let Some(reason) = super::served::registry_name_problem(name) {
                    errors.push(ConfigError::new(
                        format!("{key}.discovery"),
                        format!("the app id is the registry service name: {reason}"),
                    ));
                }
            }
            DiscoveryKind::Static => {}
        }
        for (i, url) in app.instances.iter().enumerate() {
            if let Err(e) = check_instance_url(url) {
                errors.push(ConfigError::new(format!("{key}.instances[{i}]"), e));
            }
        }
        check_timeout(&key, "connect_timeout", app.connect_timeout, errors);
        if let Some(h) = &app.health_check {
            let hk = format!("{key}.health_check");
            if !h.path.starts_with('/') {
                errors.push(ConfigError::new(
                    format!("{hk}.path"),
                    format!("must start with '/', got {:?}", h.path),
                ));
            }
            check_interval(&hk, "interval", h.interval, errors);
            check_timeout(&hk, "timeout", h.timeout, errors);
            for (field, n) in [
                ("healthy_threshold", h.healthy_threshold),
                ("unhealthy_threshold", h.unhealthy_threshold),
            ] {
                if !(1..=100).contains(&n) {
                    errors.push(ConfigError::new(
                        format!("{hk}.{field}"),
                        format!("must be 1 to 100, got {n}"),
                    ));
                }
            }
        }
        let o = &app.outlier_detection;
        let ok = format!("{key}.outlier_detection");
        if o.max_ejection_percent > 100 {
            errors.push(ConfigError::new(
                format!("{ok}.max_ejection_percent"),
                format!("must be 0 to 100, got {}", o.max_ejection_percent),
            ));
        }
        if o.latency_factor != 0.0 && !(1.1..=1000.0).contains(&o.latency_factor) {
            errors.push(ConfigError::new(
                format!("{ok}.latency_factor"),
                format!("must be 0 (off) or 1.1 to 1000, got {}", o.latency_factor),
            ));
        }
        if o.max_ejection < o.base_ejection {
            errors.push(ConfigError::new(
                format!("{ok}.max_ejection"),
                "must be at least base_ejection",
            ));
        }
        check_interval(&ok, "interval", o.interval, errors);
    }

    let policies = &config.resiliency.policies;
    let check_refs = |key: &str, refs: &PolicyRefs, errors: &mut Vec<ConfigError>| {
        let lookups: [(&str, &Option<String>, Vec<&String>); 8] = [
            ("timeout", &refs.timeout, policies.timeouts.keys().collect()),
            ("retry", &refs.retry, policies.retries.keys().collect()),
            ("breaker", &refs.breaker, policies.breakers.keys().collect()),
            (
                "bulkhead",
                &refs.bulkhead,
                policies.bulkheads.keys().collect(),
            ),
            (
                "rate_limit",
                &refs.rate_limit,
                policies.rate_limits.keys().collect(),
            ),
            ("hedge", &refs.hedge, policies.hedges.keys().collect()),
            (
                "fallback",
                &refs.fallback,
                policies.fallbacks.keys().collect(),
            ),
            ("fault", &refs.fault, policies.faults.keys().collect()),
        ];
        for (field, name, defined) in lookups {
            if let Some(name) = name
                && !defined.contains(&name)
            {
                let defined: Vec<&str> = defined.iter().map(|d| d.as_str()).collect();
                errors.push(ConfigError::new(
                    format!("{key}.{field}"),
                    format!(
                        "unknown {field} policy {name:?}; defined: {}",
                        if defined.is_empty() {
                            "none".to_owned()
                        } else {
                            defined.join(", ")
                        }
                    ),
                ));
            }
        }
    };
    for (app, target) in &config.resiliency.targets.apps {
        let key = format!("resiliency.targets.apps.{app}");
        let is_listener = config
            .listeners
            .iter()
            .any(|l| &l.name == app && !l.upstreams.is_empty());
        if !config.apps.contains_key(app) && !is_listener {
            errors.push(ConfigError::new(
                &key,
                format!(
                    "no app {app:?} in [apps] (nor a [[listeners]] entry with upstreams named so)"
                ),
            ));
        }
        check_refs(&key, &target.policies, errors);
        for (prefix, refs) in &target.routes {
            let rk = format!("{key}.routes.{prefix:?}");
            if !prefix.starts_with('/') {
                errors.push(ConfigError::new(
                    &rk,
                    "a route is a path prefix starting with '/'",
                ));
            }
            check_refs(&rk, refs, errors);
        }
    }
    for (component, refs) in &config.resiliency.targets.components {
        let key = format!("resiliency.targets.components.{component:?}");
        match component.split_once('.') {
            Some(("state", name)) if config.components.state.contains_key(name) => {}
            _ => errors.push(ConfigError::new(
                &key,
                format!(
                    "expected \"state.<name>\" naming a configured state store, got {component:?}"
                ),
            )),
        }
        for (field, set) in [
            ("rate_limit", &refs.rate_limit),
            ("hedge", &refs.hedge),
            ("fallback", &refs.fallback),
        ] {
            if set.is_some() {
                errors.push(ConfigError::new(format!("{key}.{field}"), "not supported for components (only timeout, retry, breaker, bulkhead and fault)"));
            }
        }
        check_refs(&key, refs, errors);
    }
    if let Some(name) = &config.resiliency.global.bulkhead
        && !policies.bulkheads.contains_key(name)
    {
        errors.push(ConfigError::new(
            "resiliency.global.bulkhead",
            format!("unknown bulkhead policy {name:?}"),
        ));
    }

    let mut seen = std::collections::BTreeSet::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let key = format!("listeners[{i}]");
        if !valid_component_name(&l.name) {
            errors.push(ConfigError::new(
                format!("{key}.name"),
                format!("invalid name {:?}", l.name),
            ));
        } else if !seen.insert(l.name.as_str()) {
            errors.push(ConfigError::new(
                format!("{key}.name"),
                format!("listener {:?} is defined twice", l.name),
            ));
        }
        match (&l.app, l.upstreams.is_empty()) {
            (Some(_), false) | (None, true) => errors.push(ConfigError::new(
                &key,
                "set exactly one of app or upstreams",
            )),
            (Some(app), true) if !config.apps.contains_key(app) => {
                errors.push(ConfigError::new(
                    format!("{key}.app"),
                    format!("no app {app:?} in [apps]"),
                ));
            }
            _ => {}
        }
        if l.app.is_some() && l.lb.is_some() {
            errors.push(ConfigError::new(
                format!("{key}.lb"),
                "with app, the app's lb applies; set lb in [apps] instead",
            ));
        }
        for (j, url) in l.upstreams.iter().enumerate() {
            if let Err(e) = check_instance_url(url) {
                errors.push(ConfigError::new(format!("{key}.upstreams[{j}]"), e));
            }
        }
        if l.listen == config.server.listen && l.listen.port() != 0 {
            errors.push(ConfigError::new(
                format!("{key}.listen"),
                "is the API's own address (server.listen)",
            ));
        }
    }
}

/// Reports `(field, message)` problems of `[section.name]` (an empty field is the
/// table itself).
fn push_problems(
    errors: &mut Vec<ConfigError>,
    section: &str,
    name: &str,
    problems: Vec<(&'static str, String)>,
) {
    for (field, message) in problems {
        let key = if field.is_empty() {
            format!("{section}.{name}")
        } else {
            format!("{section}.{name}.{field}")
        };
        errors.push(ConfigError::new(key, message));
    }
}

fn validate(config: &Config, errors: &mut Vec<ConfigError>) {
    validate_apps(config, errors);
    super::shards::validate(config, errors);
    for (name, projection) in &config.projections {
        push_problems(
            errors,
            "projections",
            name,
            projection.validate(name, config),
        );
    }
    for (name, component) in &config.components.eventstore {
        for (i, rule) in component.upcasters().iter().enumerate() {
            for (field, message) in rule.validate() {
                errors.push(ConfigError::new(
                    format!("components.eventstore.{name}.upcasters[{i}].{field}"),
                    message,
                ));
            }
        }
    }
    for (name, subscription) in &config.subscriptions {
        push_problems(
            errors,
            "subscriptions",
            name,
            subscription.validate(name, config),
        );
    }
    let server = &config.server;
    if !is_loopback(server.listen) && server.api_token.is_none() {
        errors.push(ConfigError::new(
            "server.listen",
            format!(
                "{} is reachable from other machines, so an API token is required: set \
                 server.api_token or {API_TOKEN_ENV}",
                server.listen
            ),
        ));
    }
    if let Some(token) = &server.api_token {
        let t = token.expose(); // checked for shape only, never printed
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
            errors.push(ConfigError::new(
                "server.api_token",
                "must be non-empty visible ASCII (it is sent in an HTTP header)",
            ));
        }
    }
    if server.data_dir.as_os_str().is_empty() {
        errors.push(ConfigError::new("server.data_dir", "must not be empty"));
    }
    let size = server.max_body_size;
    if size.bytes() == 0 || size > ServerConfig::MAX_MAX_BODY_SIZE {
        errors.push(ConfigError::new(
            "server.max_body_size",
            format!(
                "must be between 1B and {}, got {size}",
                ServerConfig::MAX_MAX_BODY_SIZE
            ),
        ));
    }

    for (name, component) in &config.components.state {
        let key = format!("components.state.{name}");
        match component {
            StateComponent::Embedded(c) => {
                check_interval(&key, "sweep_interval", c.sweep_interval, errors);
                if c.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                    errors.push(ConfigError::new(format!("{key}.path"), "must not be empty"));
                }
            }
            StateComponent::Postgres(c) => {
                if !(c.url.starts_with("postgres://") || c.url.starts_with("postgresql://")) {
                    errors.push(ConfigError::new(
                        format!("{key}.url"),
                        format!("expected a postgres:// URL, got {:?}", redact_url(&c.url)),
                    ));
                }
                if !(1..=1000).contains(&c.pool_size) {
                    errors.push(ConfigError::new(
                        format!("{key}.pool_size"),
                        format!("must be between 1 and 1000, got {}", c.pool_size),
                    ));
                }
                check_identifier(&format!("{key}.schema"), &c.schema, errors);
                let table = c.table_for(name);
                check_identifier(&format!("{key}.table"), &table, errors);
                if table.len() > 56 {
                    errors.push(ConfigError::new(
                        format!("{key}.table"),
                        format!("{table:?} is too long: at most 56 characters, as the sequence and index names add a suffix"),
                    ));
                }
                check_timeout(&key, "connect_timeout", c.connect_timeout, errors);
                check_interval(&key, "sweep_interval", c.sweep_interval, errors);
            }
            StateComponent::Redis(c) => {
                if c.url.starts_with("rediss://") {
                    errors.push(ConfigError::new(
                        format!("{key}.url"),
                        "TLS (rediss://) is not supported by this build; use redis://",
                    ));
                } else if !c.url.starts_with("redis://") {
                    errors.push(ConfigError::new(
                        format!("{key}.url"),
                        format!("expected a redis:// URL, got {:?}", redact_url(&c.url)),
                    ));
                }
                let prefix = c.key_prefix_for(name);
                if prefix.is_empty() || prefix.len() > 256 {
                    errors.push(ConfigError::new(
                        format!("{key}.key_prefix"),
                        "must be 1-256 bytes long",
                    ));
                }
                check_timeout(&key, "connect_timeout", c.connect_timeout, errors);
                check_interval(&key, "sweep_interval", c.sweep_interval, errors);
            }
        }
    }
}

fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

fn valid_component_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn check_identifier(key: &str, ident: &str, errors: &mut Vec<ConfigError>) {
    let mut chars = ident.chars();
    let ok = ident.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        errors.push(ConfigError::new(
            key,
            format!("invalid SQL identifier {ident:?}: use 1-63 of A-Z, a-z, 0-9 and '_', not starting with a digit"),
        ));
    }
}

fn check_timeout(key: &str, field: &str, d: std::time::Duration, errors: &mut Vec<ConfigError>) {
    if d.is_zero() || d > std::time::Duration::from_secs(300) {
        errors.push(ConfigError::new(
            format!("{key}.{field}"),
            format!(
                "must be between 1ms and 5m, got {}",
                humantime::format_duration(d)
            ),
        ));
    }
}

fn check_interval(key: &str, field: &str, d: std::time::Duration, errors: &mut Vec<ConfigError>) {
    if d < std::time::Duration::from_millis(100) {
        errors.push(ConfigError::new(
            format!("{key}.{field}"),
            format!(
                "must be at least 100ms, got {}",
                humantime::format_duration(d)
            ),
        ));
    }
}

/// Hides a password in `scheme://user:password@host`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn unknown_key(key: &str, expected: &[&str]) -> ConfigError {
    ConfigError::new(
        key,
        format!("unknown key; expected one of: {}", expected.join(", ")),
    )
}

fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty() || path == ".") {
        (_, true) => prefix.to_owned(),
        (true, false) => path.to_owned(),
        (false, false) => format!("{prefix}.{path}"),
    }
}
