//! Assembles the Pingora server from a validated configuration.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::ListenerConfig;
use pingora::prelude::*;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use pingora::services::listening::Service;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::broadcast::error::RecvError;

use crate::admin::{Admin, Redirect};
use crate::config::{Config, HttpMode};
use crate::discovery::{self, Discovery};
use crate::health::{self, Checker};
use crate::listener::{CountTls, Frontend, Gate, PlainListener};
use crate::reload::Reloader;
use crate::replicas::ReplicaSync;
use crate::rollout::controller::Controller;
use crate::shared::Shared;
use crate::tls::{self, CertStore};

/// How `run` was asked to start.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Take the listening sockets over from a running instance.
    pub upgrade: bool,
    /// Detach into the background.
    pub daemon: bool,
}

/// Loads `config_path`, builds every service and serves until shutdown.
pub fn run(config_path: &Path, options: RunOptions) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    std::fs::create_dir_all(&config.server.run_dir)
        .with_context(|| format!("creating run_dir {}", config.server.run_dir.display()))?;
    let https = config.listeners.https.clone();
    let pair = tls::load_key_pair(&https.cert, &https.key).map_err(|e| anyhow::anyhow!("{e}"))?;
    let server_conf = server_conf(&config, options);
    raise_fd_limit(config.limits.max_connections);
    let shared = Shared::new(config, config_path.to_path_buf(), CertStore::new(pair));
    discovery::first_lookups(&shared);
    health::warm_up(&shared);

    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();
    close_keepalives_when_stopping(&server, shared.clone());
    add_services(&mut server, &shared);
    tracing::info!(config = %config_path.display(), "switchyard starting");
    server.run_forever()
}

fn server_conf(config: &Config, options: RunOptions) -> ServerConf {
    let s = &config.server;
    let path = |name: &str| s.run_dir.join(name).to_string_lossy().into_owned();
    ServerConf {
        threads: s.threads,
        daemon: options.daemon,
        pid_file: path("switchyard.pid"),
        upgrade_sock: path("upgrade.sock"),
        grace_period_seconds: Some(ceil_secs(s.grace_period)),
        graceful_shutdown_timeout_seconds: Some(ceil_secs(s.shutdown_timeout)),
        // Retries are decided per request in `Switchyard`; this only caps
        // Pingora's loop above the largest allowed `retry.retries`.
        max_retries: 16,
        // Idle upstream connections kept, over all backends together. The
        // default (128) is below a large pool's backend count: least-conn
        // spreads requests over every backend, so connections were evicted
        // and re-opened per request (300 backends: half the req/s of 3).
        upstream_keepalive_pool_size: UPSTREAM_KEEPALIVE_POOL,
        ..ServerConf::default()
    }
}

/// Lifts the open-file soft limit to the hard limit (as nginx's
/// `worker_rlimit_nofile` does) and warns when `max_connections` cannot
/// fit: past the limit, accept fails and Pingora pauses its accept loop.
fn raise_fd_limit(max_connections: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        lim.rlim_cur
    };
    // Each proxied request may also hold an upstream socket.
    let needed = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(256);
    if soft < needed {
        tracing::warn!(
            open_files = soft,
            max_connections,
            "the open-file limit is below 2 x limits.max_connections + 256; raise `ulimit -n` or lower the limit"
        );
    }
}

/// Idle upstream connections kept open; see `server_conf`.
const UPSTREAM_KEEPALIVE_POOL: usize = 4096;

fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn add_services(server: &mut Server, shared: &Arc<Shared>) {
    let conf = server.configuration.clone();
    let active = shared.active();
    let l = &active.config.listeners;

    let mut proxy = Service::new("switchyard proxy".into(), Frontend::tls(shared.clone()));
    // No L4 read buffer: Pingora's 64 KiB per connection was most of an
    // idle connection's 120 KiB; the engines read in their own buffers.
    let https = &l.https;
    let tls = shared.certs.listener_settings(&https.cert, &https.key);
    proxy.add_listener(
        ListenerConfig::tcp(https.address.to_string())
            .tls(tls)
            .l4_buffer(L4BufferSettings::unbuffered()),
    );
    proxy.set_connection_filter(Gate::new(shared.clone()));
    proxy.endpoints().set_pre_tls_callback(Arc::new(CountTls));
    let threads = proxy.threads.unwrap_or(conf.threads);
    server.add_service(proxy);

    if let Some(http) = l.http.as_ref().filter(|h| h.mode == HttpMode::Serve) {
        let app = Arc::new(Frontend::plain(shared.clone()));
        server.add_service(PlainListener::new(http.address.to_string(), app, threads));
    }

    if let Some(http) = l.http.as_ref().filter(|h| h.mode == HttpMode::Redirect) {
        let redirect = Redirect {
            https_port: https.address.port(),
        };
        let mut service = Service::new(
            "switchyard http redirect".into(),
            HttpServer::new_app(redirect),
        );
        service.add_tcp(&http.address.to_string());
        service.threads = Some(1);
        server.add_service(service);
    }

    let mut admin = Service::new(
        "switchyard admin".into(),
        HttpServer::new_app(Admin::new(shared.clone())),
    );
    admin.add_tcp(&active.config.admin.address.to_string());
    admin.threads = Some(1);
    server.add_service(admin);

    server.add_service(background_service(
        "switchyard health",
        Checker::new(shared.clone()),
    ));
    server.add_service(background_service(
        "switchyard discovery",
        Discovery::new(shared.clone()),
    ));
    server.add_service(background_service(
        "switchyard reload",
        Reloader::new(shared.clone()),
    ));
    server.add_service(background_service(
        "switchyard rollouts",
        Controller::new(shared.clone()),
    ));
    server.add_service(background_service(
        "switchyard replicas",
        ReplicaSync::new(shared.clone()),
    ));
    server.add_service(background_service(
        "switchyard drain on exit",
        ExitWhenIdle(shared.clone()),
    ));
}

/// Flags [`Shared::closing`] as soon as Pingora starts an upgrade handover
/// or a graceful shutdown. A plain thread: the phase channel outlives every
/// service runtime, and it waits without polling.
fn close_keepalives_when_stopping(server: &Server, shared: Arc<Shared>) {
    let mut phases = server.watch_execution_phase();
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            Ok(
                ExecutionPhase::GracefulUpgradeTransferringFds | ExecutionPhase::GracefulTerminate,
            ) => {
                shared.closing.store(true, Ordering::Relaxed);
                return;
            }
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    });
}

/// No request may be in flight for this long before a shutting-down
/// process exits: it covers requests between being read and being leased.
const IDLE_BEFORE_EXIT: Duration = Duration::from_millis(300);

/// Pingora sleeps through the whole grace period after SIGTERM (or after
/// handing its sockets over in an upgrade) even when nothing is left to
/// finish. This exits as soon as no request has been in flight for
/// [`IDLE_BEFORE_EXIT`]; `grace_period` stays the upper bound.
struct ExitWhenIdle(Arc<Shared>);

#[async_trait]
impl BackgroundService for ExitWhenIdle {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() {
            return;
        }
        let mut idle_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let busy = self.0.registry.all().iter().any(|b| b.in_flight() > 0);
            if busy {
                idle_since = Instant::now();
            } else if idle_since.elapsed() >= IDLE_BEFORE_EXIT {
                tracing::info!(
                    "shutdown: no request in flight, exiting before the grace period ends"
                );
                std::process::exit(0);
            }
        }
    }
}
