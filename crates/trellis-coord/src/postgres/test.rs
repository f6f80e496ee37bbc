use serde::de::IntoDeserializer;
use serde::de::value::{Error as DeError, MapDeserializer};

use super::*;

fn parse(fields: &[(&'static str, &'static str)]) -> Result<PostgresConfig, DeError> {
    let map = MapDeserializer::<_, DeError>::new(
        fields
            .iter()
            .map(|(k, v)| (k.into_deserializer(), v.into_deserializer())),
    );
    PostgresConfig::deserialize(map)
}

#[test]
fn config_defaults_and_unknown_fields() {
    let config = parse(&[]).expect("empty config");
    assert_eq!(config, PostgresConfig::default());
    assert_eq!(config.url, "postgres://postgres@127.0.0.1:5432/test");
    assert_eq!(config.schema, "trellis_coord");
    assert!(config.max_connections > 0);
    let config = parse(&[("schema", "coord_b")]).expect("schema");
    assert_eq!(config.schema, "coord_b");
    assert!(
        parse(&[("shema", "typo")]).is_err(),
        "unknown fields are refused"
    );
}

#[test]
fn schema_names_are_checked() {
    for ok in [
        "trellis_coord",
        "t_coord_0123456789ab",
        "A_b",
        &"x".repeat(63),
    ] {
        assert!(check_schema(ok).is_ok(), "{ok}");
    }
    for bad in ["", "1abc", "a-b", "a\"b", "a'b", "a b", &"x".repeat(64)] {
        assert!(check_schema(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn ttls_round_up_to_microseconds() {
    assert_eq!(
        granted_ttl(Duration::from_millis(10)),
        (10_000, Duration::from_millis(10))
    );
    assert_eq!(
        granted_ttl(Duration::from_nanos(10_000_001)),
        (10_001, Duration::from_micros(10_001))
    );
    assert_eq!(micros(Some(-5)), Duration::ZERO);
    assert_eq!(micros(None), Duration::ZERO);
}

#[test]
fn tokens_are_positive() {
    assert_eq!(token(7).ok(), Some(7));
    assert!(token(0).is_err() && token(-1).is_err());
    assert_eq!(token_param(u64::MAX), 0, "matches no lease");
    assert_eq!(key(Kind::Election, &Name::internal("a.b")), "election/a.b");
}

#[tokio::test]
async fn connect_checks_the_config_before_any_io() {
    let bad_schema = PostgresCoordinator::connect(PostgresConfig {
        schema: "no-dashes".into(),
        ..PostgresConfig::default()
    })
    .await;
    assert!(matches!(bad_schema, Err(CoordError::Backend { .. })));
    let bad_url = PostgresCoordinator::connect(PostgresConfig {
        url: "postgres://127.0.0.1:notaport/test".into(),
        ..PostgresConfig::default()
    })
    .await;
    assert!(
        matches!(bad_url, Err(CoordError::Backend { .. })),
        "{bad_url:?}"
    );
}
