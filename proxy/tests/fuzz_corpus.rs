//! Replays the checked-in fuzz corpora (`fuzz/corpus/<target>/`) through
//! the properties the cargo-fuzz targets assert, on stable: CI keeps every
//! input the long runs kept without a nightly build (docs/fuzzing.md).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use switchyard::fuzzing;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).unwrap();
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(failed.is_empty(), "properties broken by: {failed:#?}");
}

#[test]
fn request_head_corpus_holds() {
    replay("request_head", fuzzing::request_head);
}

#[test]
fn response_head_corpus_holds() {
    replay("response_head", fuzzing::response_head);
}

#[test]
fn chunked_corpus_holds() {
    replay("chunked", fuzzing::chunked);
}

#[test]
fn config_corpus_holds() {
    replay("config", fuzzing::config);
}
