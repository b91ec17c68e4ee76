//! State shared by every service: the backend registry, metrics and the
//! TLS key pair, which live as long as the process, and the active
//! configuration snapshot, which a reload swaps whole.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::ratelimit::{Limiters, RouteLimits};
use crate::replicas::store::{Op, Snapshot};
use crate::replicas::{Author, SyncStatus};
use crate::rollout::Rollout;
use crate::routing::{Backend, Overrides, Pool, Registry, RouteWindows, Router};
use crate::state::{self, State};
use crate::tls::{self, CertStore};

/// One configuration, built into routing structures. Requests keep the
/// snapshot they started with, so a swap never changes a request midway.
pub struct Active {
    pub config: Arc<Config>,
    pub router: Router,
    pub pools: BTreeMap<String, Arc<Pool>>,
    /// Every distinct backend of this configuration (health-checked).
    pub backends: Vec<Arc<Backend>>,
    /// Each route's limit rules, by its position in the file.
    pub limits: Vec<Option<Arc<RouteLimits>>>,
}

/// Addresses found in DNS, by pool: the `dns` value asked and its latest
/// good answer (sorted).
pub type Discovered = BTreeMap<String, (String, Vec<SocketAddr>)>;

impl Active {
    /// Builds `config`'s pools, each with the addresses `discovered` holds
    /// for its current `dns` value.
    pub fn build(
        config: Config,
        discovered: &Discovered,
        registry: &Registry,
        metrics: &Metrics,
        overrides: &Overrides,
        limiters: &Arc<Limiters>,
    ) -> Self {
        let ttl = config.health.report_ttl();
        let pools: BTreeMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|(name, spec)| {
                let found = match (discovered.get(name), &spec.dns) {
                    (Some((asked, addrs)), Some(dns)) if asked == dns => addrs.as_slice(),
                    _ => &[],
                };
                let pool = Pool::build(name, spec, found, registry, metrics, ttl);
                (name.clone(), Arc::new(pool))
            })
            .collect();
        let router = Router::build(&config.routes, &pools, metrics, overrides);
        let mut addrs: Vec<SocketAddr> = pools
            .values()
            .flat_map(|p| p.members.iter().map(|m| m.backend.addr))
            .collect();
        addrs.sort();
        addrs.dedup();
        let backends = addrs.iter().filter_map(|addr| registry.get(addr)).collect();
        let limits = limiters.build(&config, metrics);
        Self {
            config: Arc::new(config),
            router,
            pools,
            backends,
            limits,
        }
    }

    /// (route, pool, weight) for every split entry, for metrics and the API.
    pub fn split_weights(&self) -> Vec<(&str, &str, u32)> {
        self.router
            .routes()
            .iter()
            .flat_map(|r| {
                r.split
                    .entries()
                    .iter()
                    .map(move |e| (r.name.as_str(), e.pool.name.as_str(), e.weight))
            })
            .collect()
    }
}

/// The outcome of the latest reload attempt, for `GET /admin/config/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// Unix seconds of the latest attempt (0 before any).
    pub last_attempt: f64,
    /// What asked for it: `file`, `sighup` or `admin`.
    pub trigger: String,
    /// `ok`, `error`, or `none` before any attempt.
    pub result: String,
    pub error: Option<String>,
    /// SHA-256 of the configuration file now in effect.
    pub active_hash: String,
    /// Unix seconds since when it is in effect.
    pub active_since: f64,
}

pub struct Shared {
    pub registry: Registry,
    pub metrics: Metrics,
    /// The file the configuration was loaded from (and is reloaded from).
    pub config_path: PathBuf,
    pub certs: Arc<CertStore>,
    /// Rate-limit state, kept across reloads.
    pub limiters: Arc<Limiters>,
    /// Drains and rollouts shared with other replicas (`[replicas]`).
    pub sync: SyncStatus,
    active: ArcSwap<Active>,
    status: Mutex<ReloadStatus>,
    /// Serializes reloads and state-file writes.
    writer: Mutex<()>,
    /// Rollouts by route name: they own their route's split.
    rollouts: Mutex<BTreeMap<String, Rollout>>,
    /// Each rollout route's traffic windows, kept across rebuilds.
    windows: Mutex<BTreeMap<String, Arc<RouteWindows>>>,
    /// Pool addresses from DNS, kept across reloads.
    discovered: Mutex<Discovered>,
    /// Set when a graceful upgrade or shutdown begins. Pingora drops idle
    /// keep-alive connections when it stops, racing any request a client
    /// sends on them; answering with `Connection: close` from then on moves
    /// clients to fresh connections (the new process) before that.
    pub closing: AtomicBool,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Shared {
    /// Builds the shared state, re-applying drains from the state file.
    pub fn new(config: Config, config_path: PathBuf, certs: Arc<CertStore>) -> Arc<Self> {
        let registry = Registry::default();
        let saved = state::load(&config.server.state_file);
        registry.restore_drains(&saved.drained);
        let metrics = Metrics::new();
        let status = ReloadStatus {
            last_attempt: 0.0,
            trigger: String::new(),
            result: "none".to_string(),
            error: None,
            active_hash: config.source_hash.clone(),
            active_since: unix_now(),
        };
        let windows = Mutex::new(BTreeMap::new());
        let overrides = overrides_for(&config, &saved.rollouts, &windows);
        let limiters = Arc::new(Limiters::default());
        let discovered = Discovered::new();
        let active = Active::build(
            config,
            &discovered,
            &registry,
            &metrics,
            &overrides,
            &limiters,
        );
        metrics.set_split_weights(&active.split_weights());
        metrics.mark_config_loaded();
        Arc::new(Self {
            registry,
            metrics,
            config_path,
            certs,
            limiters,
            sync: SyncStatus::default(),
            active: ArcSwap::from_pointee(active),
            status: Mutex::new(status),
            writer: Mutex::new(()),
            rollouts: Mutex::new(saved.rollouts),
            windows,
            discovered: Mutex::new(discovered),
            closing: AtomicBool::new(false),
        })
    }

    /// The rollout of route `name`, if one runs.
    pub fn rollout(&self, name: &str) -> Option<Rollout> {
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .get(name)
            .cloned()
    }

    /// Routes with a rollout running (or ended, kept until the section goes).
    pub fn rollout_names(&self) -> Vec<String> {
        let rollouts = self.rollouts.lock().expect("rollouts lock");
        rollouts.keys().cloned().collect()
    }

    /// The traffic windows of route `name`'s rollout.
    pub fn windows(&self, name: &str) -> Option<Arc<RouteWindows>> {
        self.windows
            .lock()
            .expect("windows lock")
            .get(name)
            .cloned()
    }

    /// Changes route `name`'s rollout (`None`: it ends), persists it,
    /// rebuilds the routes when the canary's weight moved, and queues the
    /// change for the other replicas.
    pub fn update_rollout(
        &self,
        name: &str,
        author: Author,
        change: impl FnOnce(&mut Option<Rollout>),
    ) -> std::io::Result<()> {
        let _writer = self.writer.lock().expect("writer lock");
        let mut rollouts = self.rollouts.lock().expect("rollouts lock");
        let before = rollouts.remove(name);
        let mut entry = before.clone();
        change(&mut entry);
        let phase = entry.as_ref().map(|r| r.phase.code());
        self.metrics.set_rollout_state(name, phase);
        if entry != before && self.active().config.replicas.redis_url.is_some() {
            let base = before.as_ref().map_or(0, |r| r.revision);
            let base = (author == Author::Judge).then_some(base);
            self.sync.push_rollout(name, entry.clone(), base);
        }
        let moved = before.map(|r| r.weight) != entry.as_ref().map(|r| r.weight);
        if let Some(rollout) = entry {
            rollouts.insert(name.to_string(), rollout);
        }
        let saved = self.save_state(&rollouts);
        if moved {
            self.reweight(rollouts);
        }
        saved
    }

    /// Rebuilds the routes with the canary weights of `rollouts`.
    fn reweight(&self, rollouts: std::sync::MutexGuard<'_, BTreeMap<String, Rollout>>) {
        let config = (*self.active().config).clone();
        let overrides = overrides_for(&config, &rollouts, &self.windows);
        drop(rollouts);
        self.swap_in(config, &overrides);
    }

    fn save_state(&self, rollouts: &BTreeMap<String, Rollout>) -> std::io::Result<()> {
        let state = State {
            drained: self.registry.drained(),
            rollouts: rollouts.clone(),
        };
        state::save(&self.active().config.server.state_file, &state)
    }

    /// The configuration in effect now.
    pub fn active(&self) -> Arc<Active> {
        self.active.load_full()
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.status.lock().expect("status lock").clone()
    }

    /// Re-reads the configuration file (and the TLS key pair it names).
    /// Nothing changes unless the whole file is valid; then it is swapped
    /// in atomically. Returns the error text on failure.
    pub fn reload(&self, trigger: &str) -> Result<(), String> {
        let _writer = self.writer.lock().expect("writer lock");
        let outcome = Config::load(&self.config_path)
            .map_err(|e| e.to_string())
            .and_then(|config| {
                let https = &config.listeners.https;
                let pair =
                    tls::load_key_pair(&https.cert, &https.key).map_err(|e| e.to_string())?;
                Ok((config, pair))
            });
        let mut status = self.status.lock().expect("status lock");
        status.last_attempt = unix_now();
        status.trigger = trigger.to_string();
        self.metrics.record_reload(outcome.is_ok());
        match outcome {
            Ok((config, pair)) => {
                self.certs.replace(pair);
                if config.source_hash != status.active_hash {
                    status.active_hash = config.source_hash.clone();
                    status.active_since = status.last_attempt;
                    self.install(config);
                }
                status.result = "ok".to_string();
                status.error = None;
                tracing::info!(trigger, hash = %status.active_hash, "configuration reloaded");
                Ok(())
            }
            Err(error) => {
                status.result = "error".to_string();
                status.error = Some(error.clone());
                tracing::error!(trigger, %error, "configuration reload rejected; the previous configuration stays in effect");
                Err(error)
            }
        }
    }

    fn install(&self, config: Config) {
        warn_on_restart_only_changes(&self.active().config, &config);
        self.rebuild(config);
    }

    /// Puts `config` in effect with the rollouts' overrides.
    fn rebuild(&self, config: Config) -> Arc<Active> {
        let rollouts = self.rollouts.lock().expect("rollouts lock");
        let overrides = overrides_for(&config, &rollouts, &self.windows);
        drop(rollouts);
        self.swap_in(config, &overrides)
    }

    /// Makes `addrs` pool `pool`'s addresses from DNS (the answer for
    /// `dns`) and rebuilds the routes as a reload does: requests in flight
    /// keep their snapshot. Returns the backends no pool lists any more.
    pub fn set_discovered(
        &self,
        pool: &str,
        dns: &str,
        addrs: Vec<SocketAddr>,
    ) -> Vec<Arc<Backend>> {
        let _writer = self.writer.lock().expect("writer lock");
        let entry = (dns.to_string(), addrs);
        let mut discovered = self.discovered.lock().expect("discovered lock");
        discovered.insert(pool.to_string(), entry);
        drop(discovered);
        let before = self.active();
        let after = self.rebuild((*before.config).clone());
        let kept: HashSet<SocketAddr> = after.backends.iter().map(|b| b.addr).collect();
        before
            .backends
            .iter()
            .filter(|b| !kept.contains(&b.addr))
            .cloned()
            .collect()
    }

    /// Drops `backend` from the registry once no request holds it and no
    /// pool lists it, so that addresses that come and go in DNS do not
    /// pile up. True when it was dropped.
    pub fn forget(&self, backend: &Backend) -> bool {
        let _writer = self.writer.lock().expect("writer lock");
        let listed = self
            .active()
            .backends
            .iter()
            .any(|b| b.addr == backend.addr);
        if listed || backend.in_flight() > 0 {
            return false;
        }
        self.registry.forget(&backend.addr);
        true
    }

    /// Builds the routes of `config` with `overrides` and the addresses
    /// from DNS, and puts them in effect.
    fn swap_in(&self, config: Config, overrides: &Overrides) -> Arc<Active> {
        let known: HashSet<SocketAddr> = self.active().backends.iter().map(|b| b.addr).collect();
        let discovered = self.discovered.lock().expect("discovered lock");
        let active = Arc::new(Active::build(
            config,
            &discovered,
            &self.registry,
            &self.metrics,
            overrides,
            &self.limiters,
        ));
        drop(discovered);
        self.metrics.set_split_weights(&active.split_weights());
        self.active.store(active.clone());
        // A backend coming back into the configuration was not watched
        // meanwhile: it must pass `rise` checks again.
        for b in active.backends.iter().filter(|b| !known.contains(&b.addr)) {
            if b.has_been_healthy() {
                b.reset_health();
            }
        }
        active
    }

    /// Drains (no new requests) or undrains `addr` and persists the set of
    /// drained addresses. `Ok(None)` if the address is unknown.
    pub fn set_drained(
        &self,
        addr: &SocketAddr,
        on: bool,
    ) -> std::io::Result<Option<Arc<Backend>>> {
        let _writer = self.writer.lock().expect("writer lock");
        let Some(backend) = self.registry.set_drained(addr, on) else {
            return Ok(None);
        };
        if self.active().config.replicas.redis_url.is_some() {
            self.sync.push_drain(*addr, on);
        }
        self.save_state(&self.rollouts.lock().expect("rollouts lock"))?;
        tracing::info!(backend = %backend.name, drained = on, "drain state changed");
        Ok(Some(backend))
    }

    /// This replica's state as changes that recreate it, for a Redis that
    /// has none.
    pub fn whole_state(&self) -> Vec<Op> {
        let drains = self
            .registry
            .drained()
            .into_iter()
            .map(|a| Op::Drain(a, true));
        let rollouts = self.rollouts.lock().expect("rollouts lock").clone();
        let rollouts = rollouts.into_iter().map(|(route, r)| Op::Rollout {
            route,
            state: Some(r),
            base: None,
        });
        drains.chain(rollouts).collect()
    }

    /// Applies the state the replicas share, as Redis holds it, and keeps
    /// it in the state file.
    pub fn apply_shared(&self, snapshot: Snapshot) {
        let _writer = self.writer.lock().expect("writer lock");
        let Snapshot {
            version,
            drained,
            rollouts: shared,
        } = snapshot;
        let before: BTreeSet<SocketAddr> = self.registry.drained().into_iter().collect();
        self.registry.replace_drains(&drained);
        self.sync
            .version
            .store(version, std::sync::atomic::Ordering::Relaxed);
        let mut rollouts = self.rollouts.lock().expect("rollouts lock");
        let rollouts_moved = *rollouts != shared;
        let weight = |m: &BTreeMap<String, Rollout>| -> Vec<(String, u32)> {
            m.iter().map(|(k, r)| (k.clone(), r.weight)).collect()
        };
        let weights_moved = weight(&rollouts) != weight(&shared);
        if rollouts_moved {
            for name in rollouts.keys().filter(|k| !shared.contains_key(*k)) {
                self.metrics.set_rollout_state(name, None);
            }
            for (name, r) in &shared {
                self.metrics.set_rollout_state(name, Some(r.phase.code()));
            }
            *rollouts = shared;
        }
        if before != drained || rollouts_moved {
            tracing::info!(target: "switchyard::replicas", version, drained = ?drained, rollouts = ?weight(&rollouts), "state from the other replicas applied");
            if let Err(e) = self.save_state(&rollouts) {
                tracing::error!(error = %e, "cannot write the state file");
            }
        }
        if weights_moved {
            self.reweight(rollouts);
        }
    }

    /// Copies scrape-time values (in-flight counts, tracked rate-limit
    /// keys, saturation) into their gauges.
    pub fn refresh_gauges(&self) {
        for backend in self.registry.all() {
            backend.publish_in_flight();
        }
        let replica = &self.metrics.replica;
        replica.connected.set(i64::from(
            self.sync
                .connected
                .load(std::sync::atomic::Ordering::Relaxed),
        ));
        replica
            .version
            .set(self.sync.version.load(std::sync::atomic::Ordering::Relaxed));
        replica.judge.set(i64::from(self.sync.is_judge()));
        replica.set_config_hash(&self.reload_status().active_hash);
        let edge = &self.metrics.edge;
        for ((route, rule), state) in self.limiters.states() {
            let tracked = i64::try_from(state.tracked()).unwrap_or(i64::MAX);
            edge.keys.with_label_values(&[&route, &rule]).set(tracked);
        }
        let active = self.active();
        for route in active.router.routes() {
            if route.shed.is_some() {
                let saturation = crate::routing::saturation(&route.split);
                edge.saturation
                    .with_label_values(&[&route.name])
                    .set(saturation);
            }
        }
        let members = active.pools.values().flat_map(|p| {
            p.members.iter().map(|m| {
                (
                    p.name.as_str(),
                    m.backend.name.as_str(),
                    m.backend.connecting(),
                )
            })
        });
        self.metrics.set_connecting(members);
    }
}

/// What the rollouts change in `config`'s routes: the weight of each
/// rollout that runs on a route still configured for one, and windows for
/// every such route (made on first sight, or anew when its pools change).
fn overrides_for(
    config: &Config,
    rollouts: &BTreeMap<String, Rollout>,
    windows: &Mutex<BTreeMap<String, Arc<RouteWindows>>>,
) -> Overrides {
    let mut windows = windows.lock().expect("windows lock");
    let mut overrides = Overrides::default();
    for route in &config.routes {
        let (Some(name), Some(spec)) = (&route.name, &route.rollout) else {
            continue;
        };
        let baseline = route
            .effective_split()
            .into_iter()
            .map(|(pool, _)| pool)
            .find(|pool| *pool != spec.canary)
            .unwrap_or_default();
        let compare = spec.compare.as_ref().map(|c| (c.sample, c.min_cosine));
        let fits = |w: &Arc<RouteWindows>| {
            w.pools == [baseline.clone(), spec.canary.clone()]
                && w.compare == compare
                && w.retry_on_baseline == spec.retry_on_baseline
        };
        if !windows.get(name).is_some_and(fits) {
            let fresh = RouteWindows::new(&baseline, &spec.canary, compare, spec.retry_on_baseline);
            let fresh = Arc::new(fresh);
            windows.insert(name.clone(), fresh);
        }
        overrides
            .windows
            .insert(name.clone(), windows[name].clone());
        if let Some(rollout) = rollouts.get(name) {
            overrides.weights.insert(name.clone(), rollout.weight);
        }
    }
    overrides
}

/// Listeners and process settings are bound at start; say so instead of
/// silently ignoring an edit.
fn warn_on_restart_only_changes(old: &Config, new: &Config) {
    let bound = |c: &Config| {
        let l = &c.listeners;
        serde_json::to_value((l.https.address, &l.http, c.admin.address, &c.server)).ok()
    };
    let (before, after) = (bound(old), bound(new));
    if before != after {
        tracing::warn!("listener, admin address or [server] changes take effect only after a restart or upgrade");
    }
}
