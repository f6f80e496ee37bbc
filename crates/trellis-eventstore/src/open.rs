//! Opening a configured event store component.

use std::path::Path;
use std::sync::Arc;

use trellis_core::config::EventStoreComponent;

use crate::embedded::EmbeddedEventStore;
use crate::postgres::PostgresEventStore;
use crate::upcast::Upcasting;
use crate::{EventStore, EventStoreError};

/// Opens the event store component `name` as configured. Embedded stores live in
/// `<data_dir>/eventstore/<name>.redb` unless they set `path`; PostgreSQL stores
/// connect and create their schema. Configured upcasting rules wrap the store in
/// [`Upcasting`].
///
/// # Errors
/// If the backend can't be opened or reached.
pub async fn open(
    name: &str,
    component: &EventStoreComponent,
    data_dir: &Path,
) -> Result<Arc<dyn EventStore>, EventStoreError> {
    let store: Arc<dyn EventStore> = match component {
        EventStoreComponent::Embedded(c) => {
            let path = c
                .path
                .clone()
                .unwrap_or_else(|| data_dir.join("eventstore").join(format!("{name}.redb")));
            Arc::new(EmbeddedEventStore::open(path).await?)
        }
        EventStoreComponent::Postgres(c) => Arc::new(PostgresEventStore::connect(name, c).await?),
        other => {
            return Err(EventStoreError::Backend {
                backend: "unknown",
                reason: format!(
                    "event store backend {:?} is not supported by this build",
                    other.type_name()
                ),
            });
        }
    };
    let rules = component.upcasters();
    Ok(if rules.is_empty() {
        store
    } else {
        Arc::new(Upcasting::new(store).with_rules(rules))
    })
}
