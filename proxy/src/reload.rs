//! Reload triggers: changes to the config file or the TLS files (seen
//! through `notify`) and SIGHUP. `POST /admin/reload` calls
//! [`Shared::reload`] directly.
//!
//! The watcher observes the *directories* holding those files, not the
//! files: editors that write a temporary file and rename it over the old
//! one, certbot's symlink swaps and Kubernetes ConfigMap `..data` swaps
//! replace the inode, which a file watch would lose track of.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::shared::Shared;

/// Bursts of events (write, chmod, rename) closer than this are one change.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Kubernetes swaps this symlink to publish a new ConfigMap version.
const CONFIGMAP_SWAP: &str = "..data";

pub struct Reloader {
    shared: Arc<Shared>,
}

impl Reloader {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// The files whose change triggers a reload, and their directories.
#[derive(PartialEq, Eq)]
struct WatchSet {
    dirs: BTreeSet<PathBuf>,
    names: BTreeSet<OsString>,
}

impl WatchSet {
    fn of(shared: &Shared) -> Self {
        let active = shared.active();
        let https = &active.config.listeners.https;
        let files = [shared.config_path.as_path(), &https.cert, &https.key];
        let dir = |p: &Path| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Self {
            dirs: files.iter().map(|f| dir(f)).collect(),
            names: files
                .iter()
                .filter_map(|f| f.file_name().map(OsString::from))
                .chain([OsString::from(CONFIGMAP_SWAP)])
                .collect(),
        }
    }

    fn concerns(&self, event: &notify::Event) -> bool {
        !event.kind.is_access()
            && event
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| self.names.contains(n)))
    }

    /// Starts a watcher that sends `()` on `tx` for every relevant event.
    fn watch(self, tx: mpsc::UnboundedSender<()>) -> Option<RecommendedWatcher> {
        let dirs = self.dirs.clone();
        let handler = move |res: notify::Result<notify::Event>| match res {
            Ok(event) if self.concerns(&event) => {
                let _ = tx.send(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch files; reload with SIGHUP or POST /admin/reload");
                return None;
            }
        };
        for dir in &dirs {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::error!(dir = %dir.display(), error = %e, "cannot watch directory");
            }
        }
        Some(watcher)
    }
}

/// Waits until no event has arrived for [`DEBOUNCE`].
async fn settle(rx: &mut mpsc::UnboundedReceiver<()>) {
    while tokio::time::timeout(DEBOUNCE, rx.recv())
        .await
        .is_ok_and(|e| e.is_some())
    {}
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot handle SIGHUP");
                None
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut watching = WatchSet::of(&self.shared);
        let mut watcher = WatchSet::of(&self.shared).watch(tx.clone());
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                Some(()) = rx.recv() => {
                    settle(&mut rx).await;
                    "file"
                }
                _ = hup => "sighup",
                _ = shutdown.changed() => return,
            };
            // Errors are recorded in the reload status, metrics and log.
            let _ = self.shared.reload(trigger);
            // The TLS files may have moved to another directory.
            let now = WatchSet::of(&self.shared);
            if now != watching {
                drop(watcher);
                watching = WatchSet::of(&self.shared);
                watcher = now.watch(tx.clone());
            }
        }
    }
}
