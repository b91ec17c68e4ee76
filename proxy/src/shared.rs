//! State shared by every service: the backend registry and metrics, which
//! live as long as the process, and the active configuration snapshot,
//! which is swapped whole.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::routing::{Backend, Pool, Registry, Router};

/// One configuration, built into routing structures. Requests keep the
/// snapshot they started with, so a swap never changes a request midway.
pub struct Active {
    pub config: Arc<Config>,
    pub router: Router,
    pub pools: BTreeMap<String, Arc<Pool>>,
    /// Every distinct backend of this configuration (health-checked).
    pub backends: Vec<Arc<Backend>>,
}

impl Active {
    pub fn build(config: Config, registry: &Registry, metrics: &Metrics) -> Self {
        let ttl = config.health.report_ttl();
        let pools: BTreeMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|(name, spec)| {
                let pool = Pool::build(name, spec, registry, metrics, ttl);
                (name.clone(), Arc::new(pool))
            })
            .collect();
        let router = Router::build(&config.routes, &pools);
        let backends = config
            .backend_addrs()
            .iter()
            .filter_map(|addr| registry.get(addr))
            .collect();
        Self {
            config: Arc::new(config),
            router,
            pools,
            backends,
        }
    }
}

pub struct Shared {
    pub registry: Registry,
    pub metrics: Metrics,
    /// The file the configuration was loaded from.
    pub config_path: PathBuf,
    active: ArcSwap<Active>,
}

impl Shared {
    pub fn new(config: Config, config_path: PathBuf) -> Arc<Self> {
        let registry = Registry::default();
        let metrics = Metrics::new();
        let active = Active::build(config, &registry, &metrics);
        Arc::new(Self {
            registry,
            metrics,
            config_path,
            active: ArcSwap::from_pointee(active),
        })
    }

    /// The configuration in effect now.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Copies scrape-time values (in-flight counts) into their gauges.
    pub fn refresh_gauges(&self) {
        for backend in self.registry.all() {
            backend.publish_in_flight();
        }
    }
}
