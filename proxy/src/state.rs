//! Runtime state that must outlive the process: drained backends and
//! rollouts. Written
//! atomically (temporary file, fsync, rename), so a crash leaves either
//! the old or the new file, never half of one.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rollout::Rollout;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Addresses drained through the admin API.
    pub drained: Vec<SocketAddr>,
    /// Rollouts by route name (absent in files written before them).
    #[serde(default)]
    pub rollouts: BTreeMap<String, Rollout>,
}

/// Reads `path`; a missing file is an empty state. An unreadable one is
/// logged and treated as empty, so a corrupt file cannot stop the proxy.
pub fn load(path: &Path) -> State {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!(file = %path.display(), error = %e, "ignoring unreadable state file");
            State::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot read state file");
            State::default()
        }
    }
}

pub fn save(path: &Path, state: &State) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_missing_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/state.json");
        assert!(load(&path).drained.is_empty());
        let state = State {
            drained: vec!["127.0.0.1:9101".parse().expect("addr")],
            rollouts: BTreeMap::new(),
        };
        save(&path, &state).expect("save");
        assert_eq!(load(&path).drained, state.drained);
        // A file from before rollouts existed still loads.
        std::fs::write(&path, r#"{"drained":["127.0.0.1:9101"]}"#).expect("write");
        assert_eq!(load(&path).drained, state.drained);
        std::fs::write(&path, "{broken").expect("write");
        assert!(load(&path).drained.is_empty());
    }
}
