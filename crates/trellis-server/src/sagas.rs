//! Wiring of the saga orchestrator: `[components.sagas.default]` (the log),
//! `[sagas.<name>]` (definitions from config), resumption of in-flight sagas.

use std::sync::Arc;

use trellis_core::Config;
use trellis_core::config::{ConfigError, SagaLogComponent};
use trellis_saga::SagaDefinition;
use trellis_saga::actions::SidecarActions;
use trellis_saga::log::SagaLog;
use trellis_saga::orchestrator::{Options, Orchestrator};
use trellis_saga::twopc::{SidecarParticipants, TxCoordinator, TxOptions};

use crate::routes::AppState;

/// Parses and checks every `[sagas.<name>]`, reporting problems with their key
/// paths (`sagas.transfer.steps[0].action.path: ...`). Names of apps and pub/sub
/// components are checked when the sidecar starts.
pub fn check_definitions(config: &Config) -> Result<Vec<SagaDefinition>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut definitions = Vec::new();
    for (name, value) in &config.sagas {
        let key = format!("sagas.{name}");
        let mut value = value.clone();
        if let Some(object) = value.as_object_mut() {
            match object.get("name") {
                Some(serde_json::Value::String(n)) if n != name => {
                    errors.push(ConfigError::new(
                        format!("{key}.name"),
                        format!("must be {name:?} (the table's name) or absent"),
                    ));
                    continue;
                }
                _ => {
                    object.insert("name".into(), serde_json::Value::String(name.clone()));
                }
            }
        }
        let definition: SagaDefinition = match serde_path_to_error::deserialize(value) {
            Ok(d) => d,
            Err(e) => {
                let path = e.path().to_string();
                let at = if path == "." {
                    key.clone()
                } else {
                    format!("{key}.{path}")
                };
                errors.push(ConfigError::new(at, e.inner().to_string()));
                continue;
            }
        };
        match definition.validate() {
            Ok(()) => definitions.push(definition),
            Err(problems) => errors.extend(
                problems
                    .into_iter()
                    .map(|p| ConfigError::new(format!("{key}.{}", p.at), p.reason)),
            ),
        }
    }
    if errors.is_empty() {
        Ok(definitions)
    } else {
        Err(errors)
    }
}

/// Who drives the sagas this sidecar starts.
fn owner(config: &Config) -> String {
    if let Some(SagaLogComponent::Postgres(pg)) = config.components.sagas.get("default")
        && let Some(owner) = &pg.owner
    {
        return owner.clone();
    }
    let port = config.server.listen.port();
    if let Some(app) = &config.app {
        return app
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{}-{port}", app.id));
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "trellis".into());
    format!("{host}-{port}")
}

/// The orchestrator and the 2PC coordinator, on one log.
type Started = (Option<Arc<Orchestrator>>, Option<Arc<TxCoordinator>>);

/// Opens the log, registers the config's definitions, resumes in-flight sagas, and
/// opens the 2PC coordinator on the same log, recovering in-flight transactions.
pub(crate) async fn start(
    config: &Config,
    data_dir: &std::path::Path,
    state: &AppState,
) -> Result<Started, String> {
    let definitions = check_definitions(config).map_err(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let (log, owner): (Arc<dyn SagaLog>, String) = match config.components.sagas.get("default") {
        None => return Ok((None, None)),
        Some(SagaLogComponent::Embedded(_)) => (
            Arc::new(
                trellis_saga::log::embedded::EmbeddedLog::open(data_dir.join("sagas.redb"))
                    .await
                    .map_err(|e| format!("components.sagas.default: {e}"))?,
            ),
            "local".to_owned(),
        ),
        Some(SagaLogComponent::Postgres(pg)) => {
            let settings = trellis_saga::log::postgres::PostgresLogConfig {
                url: pg.url.clone(),
                schema: pg.schema.clone(),
                max_connections: pg.max_connections,
                ..Default::default()
            };
            (
                Arc::new(
                    trellis_saga::log::postgres::PostgresLog::connect(settings)
                        .await
                        .map_err(|e| format!("components.sagas.default: {e}"))?,
                ),
                owner(config),
            )
        }
        Some(_) => return Err("components.sagas.default: unsupported backend".into()),
    };
    let actions = Arc::new(SidecarActions::new(
        Arc::clone(&state.invoker),
        Arc::clone(&state.pubsubs),
    ));
    let tx_log = Arc::clone(&log);
    let tx_owner = owner.clone();
    let orchestrator = Orchestrator::open(
        log,
        actions,
        Options {
            owner,
            ..Options::default()
        },
    )
    .await
    .map_err(|e| format!("components.sagas.default: {e}"))?;
    for definition in definitions {
        let name = definition.name.clone();
        if let Err(e) = orchestrator.define(definition).await {
            orchestrator.close().await;
            return Err(format!("sagas.{name}: {e}"));
        }
    }
    match orchestrator.resume().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(sagas = n, "resumed in-flight sagas"),
        Err(e) => {
            orchestrator.close().await;
            return Err(format!("components.sagas.default: {e}"));
        }
    }
    match open_transactions(tx_log, tx_owner, config, state).await {
        Ok(transactions) => Ok((Some(Arc::new(orchestrator)), Some(transactions))),
        Err(e) => {
            // Closes the shared log too.
            orchestrator.close().await;
            Err(e)
        }
    }
}

/// Opens the 2PC coordinator on `log` and recovers the transactions `owner` left
/// unfinished (before the sidecar serves: `state` participants re-take their locks).
async fn open_transactions(
    log: Arc<dyn SagaLog>,
    owner: String,
    config: &Config,
    state: &AppState,
) -> Result<Arc<TxCoordinator>, String> {
    let participants = Arc::new(SidecarParticipants::new(
        Arc::clone(&state.invoker),
        Arc::clone(&state.stores),
        state.key_locks.clone(),
        &config.components.state,
    ));
    let coordinator = TxCoordinator::open(
        log,
        participants,
        TxOptions {
            owner,
            ..TxOptions::default()
        },
    )
    .await
    .map_err(|e| format!("components.sagas.default: {e}"))?;
    match coordinator.recover().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(transactions = n, "recovering in-flight transactions"),
        Err(e) => {
            coordinator.close().await;
            return Err(format!("components.sagas.default: {e}"));
        }
    }
    Ok(Arc::new(coordinator))
}
