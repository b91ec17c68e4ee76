//! Switchyard's inference backend: sentence embeddings over HTTP.
//!
//! The library form exists so tests can run servers in-process; the binary
//! only adds flags, logging and signals.

pub mod api;
pub mod batcher;
pub mod bert;
pub mod cache;
pub mod config;
pub mod health;
pub mod kernels;
pub mod linear;
pub mod metrics;
pub mod model;
pub mod state;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::batcher::{Batcher, BatcherConfig};
use crate::cache::{Cache, CacheConfig};
pub use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::AppState;

/// How often draining checks whether the last request has finished.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// A running server. It is live as soon as this exists; it turns ready once
/// the model has loaded and a warm-up batch has run.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    task: JoinHandle<Result<()>>,
}

impl Server {
    /// Binds, starts serving and starts loading the model in the background.
    /// When `shutdown` resolves the server drains: readiness says so at once,
    /// every accepted request is finished, then [`Server::wait`] returns.
    pub async fn start(
        config: Config,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Server> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let instance = config.instance.clone().unwrap_or_else(|| addr.to_string());

        let metrics = Arc::new(Metrics::new());
        let cache = match &config.redis_url {
            Some(url) => Cache::connect(
                url,
                CacheConfig {
                    ttl: config.cache_ttl,
                    timeout: config.cache_timeout,
                },
                metrics.clone(),
            )?,
            None => Cache::disabled(metrics.clone()),
        };
        let (batcher, loaded) = Batcher::spawn(
            BatcherConfig {
                model_dir: config.model_dir.clone(),
                model_name: config.effective_model_name(),
                capacity: config.queue_capacity,
                max_batch: config.max_batch,
                max_wait: config.max_wait,
                bulk_promote_after: config.bulk_promote_after,
                threads: config.threads,
            },
            metrics.clone(),
        )?;
        let state = Arc::new(AppState::new(config, instance, metrics, cache, batcher));
        tracing::info!(
            listen = %addr,
            instance = %state.instance,
            version = %state.config.version_label,
            "serving; loading model from {}",
            state.config.model_dir.display()
        );

        // A failed model load stops the server: a backend that can never be
        // ready is better restarted than left live.
        let (failed_tx, failed_rx) = watch::channel(None::<String>);
        let loader_state = state.clone();
        tokio::spawn(async move {
            let outcome = match loaded.await {
                Ok(Ok(loaded)) => Ok(loaded),
                Ok(Err(e)) => Err(format!("loading the model failed: {e:#}")),
                Err(_) => Err("the inference thread died while loading".to_owned()),
            };
            match outcome {
                Ok(loaded) => {
                    tracing::info!(
                        model = %loaded.info.name,
                        fingerprint = %loaded.info.fingerprint,
                        max_seq_length = loaded.info.max_seq_length,
                        matmul_kernel = linear::Kernel::selected().name(),
                        "model loaded and warmed up"
                    );
                    let _ = loader_state.loaded.set(loaded);
                    if loader_state.lifecycle.mark_ready() {
                        loader_state.metrics.ready.set(1);
                        tracing::info!("ready");
                    }
                }
                Err(message) => {
                    let _ = failed_tx.send(Some(message));
                }
            }
        });

        let task = tokio::spawn(serve(listener, state.clone(), shutdown, failed_rx));
        Ok(Server { addr, state, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Resolves once the server has stopped: Ok after a complete drain, Err
    /// when the model failed to load or requests outlived
    /// --shutdown-timeout.
    pub async fn wait(self) -> Result<()> {
        self.task.await.context("server task panicked")?
    }
}

async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
    mut failed: watch::Receiver<Option<String>>,
) -> Result<()> {
    let (close_tx, mut close_rx) = watch::channel(false);
    let app = api::router(state.clone());
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = close_rx.wait_for(|close| *close).await;
            })
            .into_future(),
    );

    let failure = tokio::select! {
        () = shutdown => None,
        Ok(message) = failed.wait_for(Option::is_some) => message.clone(),
    };
    state.lifecycle.begin_draining();
    state.metrics.ready.set(0);
    let deadline = Instant::now() + state.config.shutdown_timeout;
    match &failure {
        Some(message) => tracing::error!(error = %message, "stopping"),
        None => tracing::info!(
            in_flight = state.metrics.in_flight.get(),
            "draining: finishing accepted requests"
        ),
    }

    // Keep accepting until the last request is done, so health checks see
    // "draining" rather than a refused connection while work finishes.
    while state.metrics.in_flight.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let _ = close_tx.send(true);
    let finished = tokio::time::timeout_at(deadline, server).await;
    if let Some(message) = failure {
        bail!(message);
    }
    match finished {
        Ok(joined) => {
            joined
                .map_err(|e| anyhow!("http server task failed: {e}"))?
                .context("http server failed")?;
            tracing::info!("drained; exiting");
            Ok(())
        }
        Err(_) => bail!(
            "{} requests were still in flight after --shutdown-timeout ({:?})",
            state.metrics.in_flight.get(),
            state.config.shutdown_timeout
        ),
    }
}
