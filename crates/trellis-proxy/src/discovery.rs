//! Where an app's instances come from.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Mutex;

use tokio::sync::watch;

/// A source of instance lists, one watch channel per app: the current list, and a
/// new one whenever it changes. Config-defined instances are [`StaticDiscovery`];
/// the service registry implements this trait too.
pub trait Discovery: Debug + Send + Sync + 'static {
    /// The instances of `app` (base URLs such as `http://10.0.0.5:8080`), or `None` if
    /// this source knows nothing of it.
    fn subscribe(&self, app: &str) -> Option<watch::Receiver<Vec<String>>>;
}

/// Instance lists set by hand: from config at start, and [`set`](Self::set) later.
///
/// ```
/// use trellis_proxy::{Discovery, StaticDiscovery};
///
/// let discovery = StaticDiscovery::default();
/// discovery.set("payments", vec!["http://127.0.0.1:9001".into()]);
/// let mut watch = discovery.subscribe("payments").expect("known app");
/// assert_eq!(watch.borrow_and_update().len(), 1);
/// discovery.set("payments", vec!["http://127.0.0.1:9001".into(), "http://127.0.0.1:9002".into()]);
/// assert!(watch.has_changed().unwrap());
/// ```
#[derive(Debug, Default)]
pub struct StaticDiscovery {
    apps: Mutex<HashMap<String, watch::Sender<Vec<String>>>>,
}

impl StaticDiscovery {
    /// Sets (or replaces) the instances of `app`; subscribers see the change.
    pub fn set(&self, app: &str, instances: Vec<String>) {
        let mut apps = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match apps.get(app) {
            Some(sender) => {
                sender.send_replace(instances);
            }
            None => {
                apps.insert(app.to_owned(), watch::channel(instances).0);
            }
        }
    }
}

impl Discovery for StaticDiscovery {
    fn subscribe(&self, app: &str) -> Option<watch::Receiver<Vec<String>>> {
        self.apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(app)
            .map(watch::Sender::subscribe)
    }
}
