//! The real all-MiniLM-L6-v2 against vectors recorded from sentence-transformers
//! (scripts/record-reference wrote tests/data/reference.json).

mod common;

use std::path::PathBuf;

use common::*;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Reference {
    max_seq_length: usize,
    sentences: Vec<Sentence>,
}

#[derive(Deserialize)]
struct Sentence {
    text: String,
    tokens: usize,
    embedding: Vec<f32>,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Deliberately fails rather than skips: CI fetches the model first, so a
/// missing model is a broken setup, not a reason to pass.
fn model_dir() -> PathBuf {
    let dir = std::env::var_os("SWITCHYARD_TEST_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "the real model is missing from {}: run scripts/fetch-model first",
        dir.display()
    );
    dir
}

fn reference() -> Reference {
    let path = workspace_root().join("backend/tests/data/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_sentence_transformers() {
    bounded(async {
        let reference = reference();
        let dir = model_dir();
        let server =
            TestServer::started_ready(config(&dir, &["--model-name", "all-MiniLM-L6-v2"])).await;
        let (_, report) = server.ready_report().await;
        assert_eq!(report["model"], "all-MiniLM-L6-v2");

        let mut worst = f64::MAX;
        for sentence in &reference.sentences {
            let response = server.embed(json!(sentence.text)).await;
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            let ours = &vectors_of(&body)[0];
            assert_eq!(ours.len(), 384);
            let similarity = cosine(ours, &sentence.embedding);
            worst = worst.min(similarity);
            assert!(
                similarity >= 0.9999,
                "cosine {similarity} for {:.40}",
                sentence.text
            );
            assert_eq!(
                body["usage"]["prompt_tokens"], sentence.tokens,
                "token count for {:.40}",
                sentence.text
            );
            assert!(sentence.tokens <= reference.max_seq_length);
        }

        // All at once: padding to the longest (256 tokens) must not move the
        // short ones.
        let texts: Vec<&str> = reference
            .sentences
            .iter()
            .map(|s| s.text.as_str())
            .collect();
        let batched = server.vectors(json!(texts)).await;
        for (ours, sentence) in batched.iter().zip(&reference.sentences) {
            let similarity = cosine(ours, &sentence.embedding);
            assert!(
                similarity >= 0.9999,
                "batched cosine {similarity} for {:.40}",
                sentence.text
            );
        }
        eprintln!("lowest cosine against sentence-transformers: {worst:.7}");
        server.stop().await.unwrap();
    })
    .await
}
