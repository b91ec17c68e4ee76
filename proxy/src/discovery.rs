//! Pool addresses from DNS (`dns` in a pool): each name is looked up
//! again when its answer's TTL runs out, held between `[discovery]`'s
//! `min_ttl` and `max_ttl`, and a changed answer is put in effect the way
//! a reload is (requests in flight keep their snapshot and their lease).
//!
//! A new address is a fresh backend: it takes traffic only once it has
//! passed `rise` checks. An address that left gets no new requests but
//! keeps those in flight, and is forgotten once they are done. A failed or
//! empty lookup keeps the last good answer: a DNS outage, or a moment with
//! no endpoints published, must not empty a pool that is serving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::join_all;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{IntoName, RData};
use hickory_resolver::TokioResolver;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::{Config, DiscoverySection, DnsTarget};
use crate::metrics::PoolDiscovery;
use crate::routing::Backend;
use crate::shared::Shared;

/// How often due lookups and finished drains are looked for: well below
/// the one second a change may take beyond its TTL.
const TICK: Duration = Duration::from_millis(200);

/// The background service that keeps pools' DNS addresses current.
pub struct Discovery {
    shared: Arc<Shared>,
}

impl Discovery {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl BackgroundService for Discovery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut watcher = Watcher::new(self.shared.clone());
        loop {
            watcher.pass().await;
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Looks every pool's name up once, before the health warm-up, so that a
/// fresh process starts with its DNS backends checked like the others.
pub fn first_lookups(shared: &Arc<Shared>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    rt.block_on(Watcher::new(shared.clone()).pass());
}

/// What the service remembers from one pass to the next.
struct Watcher {
    shared: Arc<Shared>,
    /// Rebuilt when `[discovery]` changes in a reload.
    resolver: Option<(DiscoverySection, TokioResolver)>,
    pools: BTreeMap<String, Watch>,
    /// Backends that left every pool, until their requests are done.
    leaving: Vec<Arc<Backend>>,
}

/// One pool's name: its last good answer and when to ask again.
struct Watch {
    dns: String,
    addrs: Vec<SocketAddr>,
    due: Instant,
    metrics: PoolDiscovery,
}

/// What one lookup found.
enum Answer {
    /// Addresses (sorted, distinct) and how long they are valid.
    Found(Vec<SocketAddr>, Duration),
    Empty,
    Failed(String),
}

impl Watcher {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            resolver: None,
            pools: BTreeMap::new(),
            leaving: Vec::new(),
        }
    }

    /// Looks up the names that are due and puts changed answers in effect;
    /// forgets the backends whose drain is over.
    async fn pass(&mut self) {
        let active = self.shared.active();
        let section = &active.config.discovery;
        let due = self.due(&active.config);
        if !due.is_empty() {
            let resolver = self.resolver(section);
            let lookups = due.iter().map(|(_, dns)| lookup(&resolver, dns));
            let answers = join_all(lookups).await;
            for ((pool, dns), answer) in due.into_iter().zip(answers) {
                self.apply(pool, dns, answer, section);
            }
        }
        self.leaving.retain(|b| {
            let gone = self.shared.forget(b);
            if gone {
                tracing::info!(backend = %b.name, "backend left DNS and its requests are done; forgotten");
            }
            !gone
        });
    }

    /// (pool, dns) of every name to look up now: new, changed by a reload,
    /// or past its TTL. Pools that lost their `dns` are no longer watched.
    fn due(&mut self, config: &Config) -> Vec<(String, String)> {
        let named: BTreeMap<&String, &String> = config
            .pools
            .iter()
            .filter_map(|(pool, spec)| Some((pool, spec.dns.as_ref()?)))
            .collect();
        self.pools
            .retain(|pool, w| named.get(pool) == Some(&&w.dns));
        let now = Instant::now();
        named
            .into_iter()
            .filter(|(pool, _)| self.pools.get(*pool).is_none_or(|w| w.due <= now))
            .map(|(pool, dns)| (pool.clone(), dns.clone()))
            .collect()
    }

    /// The resolver for `section`, or why there is none.
    fn resolver(&mut self, section: &DiscoverySection) -> Result<TokioResolver, String> {
        if let Some((built_for, resolver)) = &self.resolver {
            if built_for == section {
                return Ok(resolver.clone());
            }
        }
        let resolver = build_resolver(section).map_err(|e| format!("no DNS resolver: {e}"))?;
        self.resolver = Some((section.clone(), resolver.clone()));
        Ok(resolver)
    }

    /// Records `answer` for `pool`, puts a changed address set in effect,
    /// and schedules the next lookup.
    fn apply(&mut self, pool: String, dns: String, answer: Answer, section: &DiscoverySection) {
        let metrics = &self.shared.metrics.discovery;
        let watch = self.pools.entry(pool.clone()).or_insert_with(|| Watch {
            dns: dns.clone(),
            addrs: Vec::new(),
            due: Instant::now(),
            metrics: metrics.pool(&pool),
        });
        let wait = match answer {
            Answer::Found(addrs, ttl) => {
                watch.metrics.ok.inc();
                if addrs != watch.addrs {
                    log_change(&pool, &dns, &watch.addrs, &addrs);
                    watch.metrics.addresses.set(addrs.len() as i64);
                    watch.addrs.clone_from(&addrs);
                    let left = self.shared.set_discovered(&pool, &dns, addrs);
                    self.leaving.extend(left);
                }
                ttl
            }
            Answer::Empty => {
                watch.metrics.empty.inc();
                tracing::warn!(
                    pool,
                    dns,
                    "DNS lookup gave no address; the last good set stays"
                );
                section.min_ttl
            }
            Answer::Failed(error) => {
                watch.metrics.error.inc();
                tracing::warn!(pool, dns, %error, "DNS lookup failed; the last good set stays");
                section.min_ttl
            }
        };
        watch.due = Instant::now() + wait.clamp(section.min_ttl, section.max_ttl);
    }
}

fn log_change(pool: &str, dns: &str, before: &[SocketAddr], after: &[SocketAddr]) {
    let added: Vec<&SocketAddr> = after.iter().filter(|a| !before.contains(a)).collect();
    let removed: Vec<&SocketAddr> = before.iter().filter(|a| !after.contains(a)).collect();
    tracing::info!(
        pool,
        dns,
        ?added,
        ?removed,
        "DNS answer changed: new addresses wait for their health checks, removed ones drain"
    );
}

/// A resolver asking `section.nameservers`, or the system's, without a
/// cache: each scheduled lookup must reach the server to see a change.
fn build_resolver(section: &DiscoverySection) -> Result<TokioResolver, NetError> {
    let mut builder = if section.nameservers.is_empty() {
        TokioResolver::builder_tokio()?
    } else {
        let servers = section
            .nameservers
            .iter()
            .map(|a| name_server(*a))
            .collect();
        let config = ResolverConfig::from_name_servers(servers);
        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
    };
    builder.options_mut().cache_size = 0;
    builder.build()
}

/// UDP, and TCP for truncated answers, on `addr`'s port.
fn name_server(addr: SocketAddr) -> NameServerConfig {
    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
    for connection in &mut server.connections {
        connection.port = addr.port();
    }
    server
}

async fn lookup(resolver: &Result<TokioResolver, String>, dns: &str) -> Answer {
    let resolver = match resolver {
        Ok(r) => r,
        Err(e) => return Answer::Failed(e.clone()),
    };
    let found = match DnsTarget::parse(dns) {
        Ok(DnsTarget::Host { name, port }) => host(resolver, name.as_str(), port).await,
        Ok(DnsTarget::Srv(name)) => srv(resolver, &name).await,
        Err(e) => return Answer::Failed(e),
    };
    match found {
        Ok((mut addrs, until)) if !addrs.is_empty() => {
            addrs.sort();
            addrs.dedup();
            Answer::Found(addrs, until.saturating_duration_since(Instant::now()))
        }
        Ok(_) => Answer::Empty,
        Err(e) if e.is_no_records_found() => Answer::Empty,
        Err(e) => Answer::Failed(e.to_string()),
    }
}

/// `name`'s A and AAAA addresses on `port`, and until when they are valid.
async fn host(
    resolver: &TokioResolver,
    name: impl IntoName,
    port: u16,
) -> Result<(Vec<SocketAddr>, Instant), NetError> {
    let ips = resolver.lookup_ip(name).await?;
    let addrs = ips.iter().map(|ip| SocketAddr::new(ip, port)).collect();
    Ok((addrs, ips.valid_until()))
}

/// The addresses of `name`'s SRV targets, each on its port. A target with
/// no address is skipped (its record may outlive it); any other failure
/// fails the lookup.
async fn srv(resolver: &TokioResolver, name: &str) -> Result<(Vec<SocketAddr>, Instant), NetError> {
    let answer = resolver.srv_lookup(name).await?;
    let (mut addrs, mut until) = (Vec::new(), answer.valid_until());
    for record in answer.answers() {
        let RData::SRV(target) = &record.data else {
            continue;
        };
        match host(resolver, target.target.clone(), target.port).await {
            Ok((found, valid)) => {
                addrs.extend(found);
                until = until.min(valid);
            }
            Err(e) if e.is_no_records_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok((addrs, until))
}
