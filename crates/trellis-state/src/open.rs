use std::path::Path;
use std::sync::Arc;

use trellis_core::config::StateComponent;

use crate::{
    EmbeddedOptions, EmbeddedStore, Instrumented, PostgresStore, RedisStore, StateError, StateStore,
};

/// Opens the state store a `[components.state.<name>]` section describes, wrapped in
/// [`Instrumented`]. Embedded stores live at `<data_dir>/state/<name>.redb` unless
/// the config gives a `path`.
///
/// # Errors
/// If the backend can't be opened or reached.
///
/// # Panics
/// Outside a Tokio runtime.
pub async fn open(
    name: &str,
    component: &StateComponent,
    data_dir: &Path,
) -> Result<Arc<dyn StateStore>, StateError> {
    let store: Arc<dyn StateStore> = match component {
        StateComponent::Embedded(c) => {
            let path = c
                .path
                .clone()
                .unwrap_or_else(|| data_dir.join("state").join(format!("{name}.redb")));
            let options = EmbeddedOptions::default().with_sweep_interval(c.sweep_interval);
            Arc::new(EmbeddedStore::open(path, options)?)
        }
        StateComponent::Postgres(c) => Arc::new(PostgresStore::connect(name, c).await?),
        StateComponent::Redis(c) => Arc::new(RedisStore::connect(name, c).await?),
        other => {
            return Err(StateError::backend(
                "unknown",
                format!(
                    "state backend {:?} is not supported by this build",
                    other.type_name()
                ),
            ));
        }
    };
    Ok(Arc::new(Instrumented::new(name, store)))
}
