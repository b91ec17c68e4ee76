//! Python virtual environments for the tests' Python drivers: one per
//! driver folder and target dir, made again only when the folder's
//! `requirements.txt` changes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The python of `name`'s venv, with `driver_dir/requirements.txt` installed.
pub fn python(name: &str, driver_dir: &Path) -> PathBuf {
    // Tests of one binary run in parallel: one of them makes the venv.
    static MAKING: Mutex<()> = Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let requirements = driver_dir.join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("read requirements");
    let marker = dir.join("installed-requirements.txt");
    let python = dir.join("bin/python");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return python;
    }
    let _ = std::fs::remove_dir_all(&dir);
    run_ok(
        std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir),
    );
    run_ok(
        std::process::Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg("-r")
            .arg(&requirements),
    );
    std::fs::write(&marker, wanted).expect("write venv marker");
    python
}

fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
