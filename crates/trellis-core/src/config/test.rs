use std::time::Duration;

use super::resiliency;
use super::*;

fn load(toml: &str) -> Result<Config, ConfigErrors> {
    Config::from_sources(Some(toml), [])
}

fn load_env(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    Config::from_sources(
        Some(toml),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

/// The (key, message) pairs of a config that must be invalid.
fn errors(toml: &str) -> Vec<(String, String)> {
    load(toml)
        .expect_err("config should be invalid")
        .into_iter()
        .map(|e| (e.key, e.message))
        .collect()
}

fn assert_error(toml: &str, key: &str, needle: &str) {
    let errs = errors(toml);
    assert!(
        errs.iter().any(|(k, m)| k == key && m.contains(needle)),
        "expected an error at {key:?} containing {needle:?}, got {errs:#?}"
    );
}

#[test]
fn empty_config_is_embedded_defaults() {
    let config = Config::from_sources(None, []).expect("valid");
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:3700");
    assert_eq!(config.server.data_dir, std::path::PathBuf::from(".trellis"));
    assert_eq!(config.server.max_body_size, ByteSize::mib(4));
    assert_eq!(config.components.state.len(), 1);
    assert!(matches!(
        config.components.state[DEFAULT_COMPONENT],
        StateComponent::Embedded(_)
    ));
}

#[test]
fn full_config_parses() {
    let config = load(
        r#"
        [server]
        listen = "0.0.0.0:8000"
        data_dir = "/var/lib/trellis"
        api_token = "s3cret-token"
        max_body_size = "16MiB"
        drain_timeout = "5s"

        [log]
        format = "json"
        filter = "debug"

        [components.state.default]
        type = "postgres"
        url = "postgres://postgres@127.0.0.1:5432/test"
        pool_size = 4
        schema = "app"
        table = "kv"

        [components.state.cache]
        type = "redis"
        url = "redis://127.0.0.1:6379"
        key_prefix = "app:"

        [components.state.local]
        type = "embedded"
        path = "/tmp/local.redb"
        sweep_interval = "1m"
        "#,
    )
    .expect("valid");
    assert_eq!(config.server.max_body_size.bytes(), 16 << 20);
    assert_eq!(config.server.drain_timeout, Duration::from_secs(5));
    assert_eq!(config.log.format, LogFormat::Json);
    let StateComponent::Postgres(pg) = &config.components.state["default"] else {
        panic!("default was replaced by postgres");
    };
    assert_eq!((pg.pool_size, pg.table_for("default").as_str()), (4, "kv"));
    assert_eq!(config.components.state.len(), 3);
    assert!(
        !format!("{config:?}").contains("s3cret"),
        "token must not appear in Debug"
    );
}

#[test]
fn invalid_toml_is_one_error_with_position() {
    let errs = errors("[server\nlisten = 1");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].1.starts_with("invalid TOML"), "{errs:?}");
    assert!(errs[0].1.contains("line 1"), "{errs:?}");
}

#[test]
fn unknown_keys_are_errors_everywhere() {
    assert_error("[serverr]\n", "serverr", "unknown key");
    assert_error(
        "[server]\nlisten_addr = \"x\"\n",
        "server.listen_addr",
        "unknown key",
    );
    assert_error("[log]\ncolour = true\n", "log.colour", "unknown key");
    assert_error(
        "[components.queue.x]\ntype = \"embedded\"\n",
        "components.queue",
        "unknown key",
    );
    assert_error(
        "[components.state.x]\ntype = \"embedded\"\npaht = \"/tmp\"\n",
        "components.state.x.paht",
        "unknown key",
    );
    // An unknown key that belongs to another backend type is still unknown here.
    assert_error(
        "[components.state.x]\ntype = \"embedded\"\nurl = \"redis://x\"\n",
        "components.state.x.url",
        "unknown key",
    );
}

#[test]
fn wrong_types_name_the_key() {
    assert_error("[server]\nlisten = 5\n", "server.listen", "invalid type");
    assert_error(
        "[server]\nlisten = \"localhost\"\n",
        "server.listen",
        "invalid socket address",
    );
    assert_error(
        "[server]\nmax_body_size = \"lots\"\n",
        "server.max_body_size",
        "invalid size",
    );
    assert_error(
        "[server]\ndrain_timeout = \"soon\"\n",
        "server.drain_timeout",
        "invalid duration",
    );
    assert_error(
        "[server]\ndrain_timeout = -1\n",
        "server.drain_timeout",
        "negative",
    );
    assert_error("[log]\nformat = \"xml\"\n", "log.format", "unknown variant");
    assert_error("server = 3\n", "server", "invalid type");
    assert_error(
        "[components.state.pg]\ntype = \"postgres\"\nurl = \"postgres://x\"\npool_size = \"many\"\n",
        "components.state.pg.pool_size",
        "non-negative integer",
    );
}

#[test]
fn component_type_problems() {
    assert_error(
        "[components.state.x]\nurl = \"redis://x\"\n",
        "components.state.x.type",
        "required",
    );
    assert_error(
        "[components.state.x]\ntype = \"mongo\"\n",
        "components.state.x.type",
        "unknown type \"mongo\"",
    );
    assert_error(
        "[components.state.x]\ntype = 1\n",
        "components.state.x.type",
        "expected a string",
    );
    assert_error(
        "[components.state]\nx = 1\n",
        "components.state.x",
        "expected a table",
    );
    assert_error(
        "[components.state.pg]\ntype = \"postgres\"\n",
        "components.state.pg.url",
        "required key is missing",
    );
    assert_error(
        "[components.state.Bad_Name]\ntype = \"embedded\"\n",
        "components.state.Bad_Name",
        "invalid component name",
    );
}

#[test]
fn rules_between_fields() {
    assert_error(
        "[server]\nlisten = \"0.0.0.0:3700\"\n",
        "server.listen",
        "API token is required",
    );
    assert!(load("[server]\nlisten = \"0.0.0.0:3700\"\napi_token = \"t\"\n").is_ok());
    assert!(load("[server]\nlisten = \"[::1]:3700\"\n").is_ok());
    assert_error(
        "[server]\napi_token = \"\"\n",
        "server.api_token",
        "non-empty",
    );
    assert_error(
        "[server]\nmax_body_size = 0\n",
        "server.max_body_size",
        "between",
    );
    assert_error(
        "[server]\nmax_body_size = \"2GiB\"\n",
        "server.max_body_size",
        "between",
    );
    assert_error(
        "[components.state.pg]\ntype = \"postgres\"\nurl = \"mysql://u:pw@x\"\n",
        "components.state.pg.url",
        "\"mysql://u:***@x\"",
    );
    assert_error(
        "[components.state.pg]\ntype = \"postgres\"\nurl = \"postgres://x\"\npool_size = 0\n",
        "components.state.pg.pool_size",
        "between 1 and 1000",
    );
    assert_error(
        "[components.state.pg]\ntype = \"postgres\"\nurl = \"postgres://x\"\ntable = \"kv; drop table x\"\n",
        "components.state.pg.table",
        "invalid SQL identifier",
    );
    assert_error(
        "[components.state.r]\ntype = \"redis\"\nurl = \"rediss://x\"\n",
        "components.state.r.url",
        "TLS",
    );
    assert_error(
        "[components.state.r]\ntype = \"redis\"\nurl = \"redis://x\"\nconnect_timeout = \"0s\"\n",
        "components.state.r.connect_timeout",
        "between",
    );
    assert_error(
        "[components.state.e]\ntype = \"embedded\"\nsweep_interval = \"1ms\"\n",
        "components.state.e.sweep_interval",
        "at least 100ms",
    );
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let errs = errors(
        r#"
        bogus = 1
        [server]
        listen = "nope"
        extra = true
        [components.state.a]
        type = "postgres"
        url = "postgres://x"
        pool_size = 0
        [components.state.b]
        type = "nosql"
        "#,
    );
    let keys: Vec<&str> = errs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "bogus",
            "components.state.a.pool_size",
            "components.state.b.type",
            "server.extra",
            "server.listen"
        ],
        "{errs:#?}"
    );
}

#[test]
fn environment_overrides_any_key() {
    let config = load_env(
        "[server]\nlisten = \"127.0.0.1:1\"\n",
        &[
            ("TRELLIS_SERVER__LISTEN", "127.0.0.1:4000"),
            ("TRELLIS_SERVER__MAX_BODY_SIZE", "1024"),
            ("TRELLIS_COMPONENTS__STATE__CACHE__TYPE", "redis"),
            (
                "TRELLIS_COMPONENTS__STATE__CACHE__URL",
                "redis://127.0.0.1:6379",
            ),
            ("TRELLIS_COMPONENTS__STATE__PG__TYPE", "postgres"),
            (
                "TRELLIS_COMPONENTS__STATE__PG__URL",
                "postgres://localhost/test",
            ),
            ("TRELLIS_COMPONENTS__STATE__PG__POOL_SIZE", "3"),
            ("TRELLIS_TEST_SERVICES", "0"), // not a config override: no `__`
            ("UNRELATED", "x"),
        ],
    )
    .expect("valid");
    assert_eq!(config.server.listen.port(), 4000);
    assert_eq!(config.server.max_body_size.bytes(), 1024);
    assert!(matches!(
        config.components.state["cache"],
        StateComponent::Redis(_)
    ));
    let StateComponent::Postgres(pg) = &config.components.state["pg"] else {
        panic!("pg is postgres")
    };
    assert_eq!(pg.pool_size, 3);
}

#[test]
fn api_token_shorthand_and_precedence() {
    let config = load_env("", &[("TRELLIS_API_TOKEN", "short")]).expect("valid");
    assert_eq!(
        config.server.api_token.as_ref().map(Secret::expose),
        Some("short")
    );
    let config = load_env(
        "",
        &[
            ("TRELLIS_SERVER__API_TOKEN", "explicit"),
            ("TRELLIS_API_TOKEN", "short"),
        ],
    )
    .expect("valid");
    assert_eq!(
        config.server.api_token.as_ref().map(Secret::expose),
        Some("explicit")
    );
}

#[test]
fn environment_errors_name_the_variable() {
    let errs: Vec<_> = load_env("", &[("TRELLIS_SERVER__MAX_BODY_SIZE", "huge")])
        .expect_err("invalid")
        .into_iter()
        .collect();
    assert_eq!(errs[0].key, "server.max_body_size");
    assert!(
        errs[0].message.contains("TRELLIS_SERVER__MAX_BODY_SIZE"),
        "{errs:?}"
    );

    let errs: Vec<_> = load_env(
        "[server]\nlisten = \"127.0.0.1:1\"\n",
        &[("TRELLIS_SERVER__LISTEN__PORT", "1")],
    )
    .expect_err("invalid")
    .into_iter()
    .collect();
    assert_eq!(errs[0].key, "server.listen");
    assert!(errs[0].message.contains("not a table"), "{errs:?}");

    let errs: Vec<_> = load_env("", &[("TRELLIS_SERVER____LISTEN", "x")])
        .expect_err("invalid")
        .into_iter()
        .collect();
    assert!(errs[0].message.contains("empty key segment"), "{errs:?}");
}

#[test]
fn display_lists_every_error() {
    let text = load("[server]\nlisten = 1\nfoo = 2\n")
        .expect_err("invalid")
        .to_string();
    assert!(
        text.starts_with("invalid configuration (2 errors):"),
        "{text}"
    );
    assert!(text.contains("\n  server.foo: unknown key"), "{text}");
    assert!(text.contains("\n  server.listen: "), "{text}");
}

const RESILIENT: &str = r#"
[apps.payments]
instances = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
lb = "hash:header:X-Customer-Id"
protocol = "h2c"
[apps.payments.health_check]
path = "/health"
interval = "2s"
[apps.payments.outlier_detection]
consecutive_errors = 3

[resiliency.policies.timeouts.fast]
attempt = "500ms"
overall = "2s"
[resiliency.policies.retries.standard]
max_attempts = 4
statuses = [502, 503]
[resiliency.policies.retries.standard.backoff]
kind = "exponential"
base = "50ms"
jitter = "decorrelated"
[resiliency.policies.breakers.standard]
window = "time"
window_size = 30
failure_rate = 40
consecutive_failures = 5
[resiliency.policies.bulkheads.small]
max_concurrent = 8
[resiliency.policies.rate_limits.api]
rate = 50
key = "header:x-api-key"
[resiliency.policies.faults.chaos]
abort_percent = 10

[resiliency.targets.apps.payments]
timeout = "fast"
retry = "standard"
breaker = "standard"
bulkhead = "small"
fault = "chaos"
[resiliency.targets.apps.payments.routes."/charge"]
timeout = "fast"
rate_limit = "api"
[resiliency.targets.components."state.default"]
timeout = "fast"
retry = "standard"

[resiliency.global]
bulkhead = "small"

[[listeners]]
name = "edge"
listen = "127.0.0.1:8088"
app = "payments"

[[listeners]]
name = "direct"
listen = "127.0.0.1:8089"
upstreams = ["http://127.0.0.1:9003"]
lb = "round_robin"
"#;

#[test]
fn apps_resiliency_and_listeners_parse() {
    let config = load(RESILIENT).expect("valid");
    let app = &config.apps["payments"];
    assert_eq!(
        app.lb,
        LbPolicy::Hash(HashKey::Header("x-customer-id".into()))
    );
    assert_eq!(app.protocol, Protocol::H2c);
    assert_eq!(
        app.health_check.as_ref().map(|h| h.interval),
        Some(Duration::from_secs(2))
    );
    let p = &config.resiliency.policies;
    assert_eq!(p.retries["standard"].max_attempts, 4);
    assert_eq!(
        p.retries["standard"].backoff.base,
        Duration::from_millis(50)
    );
    assert_eq!(p.breakers["standard"].window, resiliency::WindowKind::Time);
    assert_eq!(p.timeouts["fast"].overall, Some(Duration::from_secs(2)));
    let target = &config.resiliency.targets.apps["payments"];
    assert_eq!(target.policies.breaker.as_deref(), Some("standard"));
    assert_eq!(target.routes["/charge"].rate_limit.as_deref(), Some("api"));
    assert!(
        config
            .resiliency
            .targets
            .components
            .contains_key("state.default")
    );
    assert_eq!(config.listeners.len(), 2);
    assert_eq!(config.listeners[1].lb, Some(LbPolicy::RoundRobin));
}

#[test]
fn resiliency_errors_name_the_key() {
    let with = |extra: &str| format!("{RESILIENT}\n{extra}");
    assert_error(
        &RESILIENT.replace("breaker = \"standard\"", "breaker = \"nope\""),
        "resiliency.targets.apps.payments.breaker",
        "unknown breaker policy \"nope\"; defined: standard",
    );
    assert_error(
        &RESILIENT.replace("failure_rate = 40", "failure_rate = 140"),
        "resiliency.policies.breakers.standard.failure_rate",
        "percentage",
    );
    assert_error(
        &RESILIENT.replace("statuses = [502, 503]", "statuses = [404]"),
        "resiliency.policies.retries.standard.statuses",
        "404 can't be retried",
    );
    assert_error(
        &RESILIENT.replace("max_attempts = 4", "max_attempts = \"many\""),
        "resiliency.policies.retries.standard.max_attempts",
        "invalid type",
    );
    assert_error(
        &with("[resiliency.policies.breakers.other]\nwindo = \"count\"\n"),
        "resiliency.policies.breakers.other.windo",
        "unknown field `windo`, expected one of `window`",
    );
    assert_error(
        &with("[resiliency.policies.circuit.x]\n"),
        "resiliency.policies.circuit",
        "unknown key",
    );
    assert_error(
        &with("[resiliency.targets.apps.ghost]\ntimeout = \"fast\"\n"),
        "resiliency.targets.apps.ghost",
        "no app \"ghost\"",
    );
    assert_error(
        &with("[resiliency.targets.apps.payments.routes.charge]\ntimeout = \"fast\"\n"),
        "resiliency.targets.apps.payments.routes.\"charge\"",
        "path prefix",
    );
    assert_error(
        &with("[resiliency.targets.components.\"state.nope\"]\ntimeout = \"fast\"\n"),
        "resiliency.targets.components.\"state.nope\"",
        "configured state store",
    );
    assert_error(
        &RESILIENT.replace(
            "[resiliency.targets.components.\"state.default\"]\n",
            "[resiliency.targets.components.\"state.default\"]\nhedge = \"x\"\n",
        ),
        "resiliency.targets.components.\"state.default\".hedge",
        "not supported for components",
    );
    assert_error(
        &RESILIENT.replace(
            "bulkhead = \"small\"\n\n[[listeners]]",
            "bulkhead = \"huge\"\n\n[[listeners]]",
        ),
        "resiliency.global.bulkhead",
        "unknown bulkhead policy",
    );
}

#[test]
fn app_and_listener_errors_name_the_key() {
    assert_error("[apps.a]\n", "apps.a.instances", "at least one");
    assert_error(
        "[apps.a]\ninstances = [\"https://x:1\"]\n",
        "apps.a.instances[0]",
        "http://",
    );
    assert_error(
        "[apps.a]\ninstances = [\"http://x:1\"]\nlb = \"random\"\n",
        "apps.a.lb",
        "invalid load balancing policy",
    );
    assert_error(
        "[apps.a]\ninstances = [\"http://x:1\"]\nprotocol = \"h3\"\n",
        "apps.a.protocol",
        "unknown variant",
    );
    assert_error(
        "[apps.a]\ninstances = [\"http://x:1\"]\n[apps.a.health_check]\npath = \"health\"\n",
        "apps.a.health_check.path",
        "must start with '/'",
    );
    assert_error(
        "[apps.a]\ninstances = [\"http://x:1\"]\n[apps.a.outlier_detection]\nmax_ejection_percent = 150\n",
        "apps.a.outlier_detection.max_ejection_percent",
        "0 to 100",
    );
    assert_error(
        "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\n",
        "listeners[0]",
        "exactly one of app or upstreams",
    );
    assert_error(
        "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\napp = \"ghost\"\n",
        "listeners[0].app",
        "no app",
    );
    assert_error(
        "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\nupstreams = [\"x\"]\n",
        "listeners[0].upstreams[0]",
        "http://",
    );
    assert_error(
        "[[listeners]]\nname = \"l\"\nlisten = \"nowhere\"\nupstreams = [\"http://x:1\"]\n",
        "listeners[0].listen",
        "invalid socket address",
    );
    assert_error("listeners = 3\n", "listeners", "array of tables");
}

#[test]
fn pubsub_components_parse_per_type() {
    let config = load(
        r#"
        [components.pubsub.local]
        type = "embedded"
        durability = "async"
        dedupe_window = "30s"
        retention_max_bytes = "1GiB"
        subscriptions = { ack_deadline = "10s", max_deliveries = 7 }

        [components.pubsub.events]
        type = "nats"
        url = "nats://10.0.0.1:4222"
        storage = "memory"

        [components.pubsub.jobs]
        type = "redis"
        url = "redis://10.0.0.2:6379"
        retention_max_len = 100000
        "#,
    )
    .expect("valid");
    let pubsub = &config.components.pubsub;
    let PubSubComponent::Embedded(local) = &pubsub["local"] else {
        panic!("embedded")
    };
    assert_eq!(local.durability, PublishDurability::Async);
    assert_eq!(local.subscriptions.ack_deadline, Duration::from_secs(10));
    assert_eq!(local.subscriptions.max_deliveries, 7);
    let PubSubComponent::Nats(events) = &pubsub["events"] else {
        panic!("nats")
    };
    assert_eq!(
        (events.url.as_str(), events.storage),
        ("nats://10.0.0.1:4222", NatsStorage::Memory)
    );
    let PubSubComponent::Redis(jobs) = &pubsub["jobs"] else {
        panic!("redis")
    };
    assert_eq!(jobs.retention_max_len, Some(100_000));
    assert_eq!(pubsub["jobs"].type_name(), "redis");
}

#[test]
fn pubsub_component_problems_name_the_key() {
    assert_error(
        "[components.pubsub.x]\ntype = \"kafka\"\n",
        "components.pubsub.x.type",
        "unknown type \"kafka\"",
    );
    assert_error(
        "[components.pubsub.x]\ntype = \"nats\"\ndurability = \"async\"\n",
        "components.pubsub.x.durability",
        "unknown field `durability`",
    );
    assert_error(
        "[components.pubsub.x]\ntype = \"redis\"\nsubscriptions = { max_deliveries = 0 }\n",
        "components.pubsub.x.subscriptions.max_deliveries",
        "1 to 1000",
    );
    assert_error(
        "[components.pubsub.x]\ntype = \"embedded\"\nsubscriptions = { dead_letter_topic = \"a b\" }\n",
        "components.pubsub.x.subscriptions.dead_letter_topic",
        "invalid topic name",
    );
}

#[test]
fn subscriptions_parse_and_check_their_references() {
    let config = load(
        r#"
        [apps.billing]
        instances = ["http://127.0.0.1:9000"]

        [subscriptions.invoices]
        topic = "orders"
        app = "billing"
        route = "/events/orders"
        max_in_flight = 4
        ack_deadline = "5s"
        "#,
    )
    .expect("valid");
    let s = &config.subscriptions["invoices"];
    assert_eq!(
        (s.pubsub.as_str(), s.group("invoices")),
        ("default", "invoices")
    );
    let settings = s.settings(config.components.pubsub["default"].defaults());
    assert_eq!(settings.max_in_flight, 4);
    assert_eq!(settings.ack_deadline, Duration::from_secs(5));
    assert_eq!(settings.max_deliveries, 5, "the component's default");

    let bad = r#"
        [subscriptions.x]
        pubsub = "kafka"
        topic = "a b"
        app = "nobody"
        route = "events"
        "#;
    assert_error(
        bad,
        "subscriptions.x.pubsub",
        "no pub/sub component \"kafka\"",
    );
    assert_error(bad, "subscriptions.x.topic", "invalid topic name");
    assert_error(bad, "subscriptions.x.app", "no app \"nobody\"");
    assert_error(bad, "subscriptions.x.route", "starting with '/'");
    assert_error(
        "[subscriptions.x]\napp = \"a\"\nroute = \"/\"\n",
        "subscriptions.x.topic",
        "required key is missing",
    );
}

#[test]
fn eventstore_components_parse() {
    let config = load(
        r#"
        [components.eventstore.ledger]
        type = "postgres"
        url = "postgres://postgres@127.0.0.1:5432/test"
        pool_size = 4
        "#,
    )
    .expect("valid");
    let EventStoreComponent::Postgres(pg) = &config.components.eventstore["ledger"] else {
        panic!("postgres")
    };
    assert_eq!(
        (pg.pool_size, pg.schema_for("ledger").as_str()),
        (4, "trellis_events_ledger")
    );
    assert!(matches!(
        config.components.eventstore["default"],
        EventStoreComponent::Embedded(_)
    ));
    assert_error(
        "[components.eventstore.x]\ntype = \"postgres\"\n",
        "components.eventstore.x.url",
        "missing",
    );
    assert_error(
        "[components.eventstore.x]\ntype = \"kurrent\"\n",
        "components.eventstore.x.type",
        "unknown type",
    );
}

#[test]
fn upcasting_rules_parse_and_are_checked() {
    let config = load(
        r#"
        [components.eventstore.default]
        type = "embedded"

        [[components.eventstore.default.upcasters]]
        event_type = "OrderPlaced"
        before_version = 2
        rename = { "total" = "amount.value" }
        defaults = { "amount.currency" = "EUR" }
        remove = ["legacy"]
        set_version = 2
        "#,
    )
    .expect("valid");
    let rules = config.components.eventstore["default"].upcasters();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].rename["total"], "amount.value");
    assert_eq!(
        rules[0].defaults["amount.currency"],
        serde_json::json!("EUR")
    );
    assert_error(
        "[components.eventstore.default]\ntype = \"embedded\"\n[[components.eventstore.default.upcasters]]\nevent_type = \"A\"\nrename = { \"a..b\" = \"c\" }\n",
        "components.eventstore.default.upcasters[0].rename.a..b",
        "dot-separated",
    );
    assert_error(
        "[components.eventstore.default]\ntype = \"embedded\"\n[[components.eventstore.default.upcasters]]\nevent_type = \"A\"\nbefore_version = 3\nset_version = 2\n",
        "components.eventstore.default.upcasters[0].set_version",
        "at least before_version",
    );
    assert_error(
        "[components.eventstore.default]\ntype = \"embedded\"\n[[components.eventstore.default.upcasters]]\nevent_type = \"A\"\nrenam = {}\n",
        "components.eventstore.default.upcasters[0].renam",
        "unknown field",
    );
}

#[test]
fn projections_parse_and_are_checked() {
    let config = load(
        r#"
        [apps.orders]
        instances = ["http://127.0.0.1:8080"]

        [projections.order-list]
        source = "$ce-order"
        app = "orders"
        route = "/projections/order-list"
        start = "end"
        "#,
    )
    .expect("valid");
    let p = &config.projections["order-list"];
    assert_eq!(
        (p.eventstore.as_str(), p.state.as_str(), p.batch_size),
        ("default", "default", 100)
    );
    assert_eq!(p.prefix("order-list"), "order-list/");
    let base =
        "[apps.orders]\ninstances = [\"http://127.0.0.1:8080\"]\n[projections.p]\nroute = \"/x\"\n";
    assert_error(
        &format!("{base}source = \"$al\"\napp = \"orders\"\n"),
        "projections.p.source",
        "$ce-<category>",
    );
    assert_error(
        &format!("{base}source = \"$all\"\napp = \"nobody\"\n"),
        "projections.p.app",
        "no app",
    );
    assert_error(
        &format!("{base}source = \"$all\"\napp = \"orders\"\nstate = \"cache\"\n"),
        "projections.p.state",
        "no state store",
    );
    assert_error(
        &format!("{base}source = \"$all\"\napp = \"orders\"\nstart = \"middle\"\n"),
        "projections.p.start",
        "beginning",
    );
    assert_error(
        &format!("{base}source = \"$all\"\napp = \"orders\"\nbatch_size = 0\n"),
        "projections.p.batch_size",
        "must be 1 to",
    );
}

#[test]
fn app_section_registers_the_served_app() {
    let config = load(
        r#"
        [app]
        id = "orders"
        url = "http://127.0.0.1:8080"
        health_path = "/health"
        metadata = { zone = "a" }
        "#,
    )
    .expect("valid");
    let app = config.app.expect("[app]");
    assert_eq!(app.id, "orders");
    assert_eq!(app.instance_id(3700), "orders-3700");
    assert_eq!(app.ttl, Duration::from_secs(10));
    assert_eq!(app.heartbeat_interval, Duration::from_secs(3));
    assert!(app.register);
    assert_eq!(app.metadata["zone"], "a");
    assert!(Config::from_sources(None, []).expect("valid").app.is_none());
}

#[test]
fn app_section_errors_name_the_key() {
    assert_error(
        "[app]\nurl = \"http://x:1\"\n",
        "app.id",
        "required key is missing",
    );
    assert_error(
        "[app]\nid = \"a/b\"\nurl = \"http://x:1\"\n",
        "app.id",
        "invalid name",
    );
    assert_error("[app]\nid = \"a\"\nurl = \"ftp://x\"\n", "app.url", "");
    assert_error(
        "[app]\nid = \"a\"\nurl = \"http://x:1\"\nttl = \"2s\"\nheartbeat_interval = \"5s\"\n",
        "app.heartbeat_interval",
        "below ttl",
    );
    assert_error(
        "[app]\nid = \"a\"\nurl = \"http://x:1\"\nhealth_path = \"health\"\n",
        "app.health_path",
        "must start with '/'",
    );
    assert_error(
        "[app]\nid = \"a\"\nurl = \"http://x:1\"\nbogus = 1\n",
        "app.bogus",
        "unknown key",
    );
}

#[test]
fn apps_may_discover_instances_in_the_registry() {
    let config = load("[apps.orders]\ndiscovery = \"registry\"\n").expect("valid");
    assert_eq!(config.apps["orders"].discovery, DiscoveryKind::Registry);
    assert_error(
        "[apps.orders]\ndiscovery = \"registry\"\ninstances = [\"http://x:1\"]\n",
        "apps.orders.instances",
        "come from the registry",
    );
    assert_error(
        "[apps.orders]\n",
        "apps.orders.instances",
        "discovery = \"registry\"",
    );
    assert_error(
        "[apps.orders]\ndiscovery = \"dns\"\n",
        "apps.orders.discovery",
        "unknown variant",
    );
}

#[test]
fn coordination_backend_is_chosen_by_components_coord_default() {
    let config = Config::from_sources(None, []).expect("valid");
    assert!(matches!(
        config.components.coord["default"],
        CoordComponent::Embedded(_)
    ));
    let config = load(
        "[components.coord.default]\ntype = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n",
    )
    .expect("valid");
    let CoordComponent::Etcd(etcd) = &config.components.coord["default"] else {
        panic!("etcd expected");
    };
    assert_eq!(etcd.prefix, "trellis/coord/");
    let config = load("[components.coord.default]\ntype = \"postgres\"\nschema = \"locks\"\n")
        .expect("valid");
    assert!(matches!(
        config.components.coord["default"],
        CoordComponent::Postgres(_)
    ));
    assert_error(
        "[components.coord.other]\ntype = \"etcd\"\n",
        "components.coord.other",
        "name it `default`",
    );
    assert_error(
        "[components.coord.default]\ntype = \"zookeeper\"\n",
        "components.coord.default.type",
        "unknown type \"zookeeper\"",
    );
    assert_error(
        "[components.coord.default]\ntype = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]\n",
        "components.coord.default.endpoints[0]",
        "http://",
    );
    assert_error(
        "[components.coord.default]\ntype = \"postgres\"\nschema = \"bad-name\"\n",
        "components.coord.default.schema",
        "invalid SQL identifier",
    );
}
