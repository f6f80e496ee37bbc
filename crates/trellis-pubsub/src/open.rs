//! Opening a configured pub/sub component.

use std::path::Path;
use std::sync::Arc;

use trellis_core::config::PubSubComponent;

use crate::embedded::{EmbeddedOptions, EmbeddedPubSub};
use crate::{PubSub, PubSubError};

/// Opens the pub/sub component `name` as configured. Embedded components live in
/// `<data_dir>/pubsub/<name>` unless they set `path`.
///
/// # Errors
/// If the backend can't be opened or reached.
///
/// # Panics
/// Outside a Tokio runtime.
pub async fn open(
    name: &str,
    component: &PubSubComponent,
    data_dir: &Path,
) -> Result<Arc<dyn PubSub>, PubSubError> {
    Ok(match component {
        PubSubComponent::Embedded(c) => {
            let dir = c
                .path
                .clone()
                .unwrap_or_else(|| data_dir.join("pubsub").join(name));
            let options = EmbeddedOptions::from(c);
            tokio::task::spawn_blocking(move || EmbeddedPubSub::open(dir, options))
                .await
                .map_err(|e| PubSubError::Backend {
                    backend: "embedded",
                    reason: e.to_string(),
                })??
        }
        PubSubComponent::Nats(c) => crate::nats::NatsPubSub::connect(c).await?,
        PubSubComponent::Redis(c) => crate::redis::RedisPubSub::connect(name, c).await?,
        other => {
            return Err(PubSubError::Backend {
                backend: "unknown",
                reason: format!(
                    "pub/sub backend {:?} is not supported by this build",
                    other.type_name()
                ),
            });
        }
    })
}
