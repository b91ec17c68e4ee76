//! Shared test fixtures: a tiny BERT with seeded random weights, servers run
//! in-process or as the real binary, and a throwaway redis-server.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use switchyard_backend::{Config, Server};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::Tokenizer;

/// No test may hang CI: every async test body runs under this bound.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test ran past its time bound")
}

/// Size of the generated model. The default is small enough to load in
/// milliseconds; `slow()` makes a forward pass take long enough to fill a
/// queue on purpose.
#[derive(Clone, Copy)]
pub struct TinyModel {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub max_seq_length: usize,
}

impl Default for TinyModel {
    fn default() -> Self {
        TinyModel {
            hidden: 32,
            layers: 2,
            heads: 4,
            max_seq_length: 24,
        }
    }
}

impl TinyModel {
    pub fn slow() -> Self {
        TinyModel {
            hidden: 256,
            layers: 4,
            heads: 4,
            max_seq_length: 128,
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "a",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "switchyard",
    "embedding",
    "server",
    "is",
    "fast",
    "and",
    "cache",
    "redis",
    "model",
    "text",
    "sentence",
    "long",
    "short",
    "one",
    "two",
    "three",
    "of",
    "to",
    "in",
    ",",
    ".",
    "!",
    "?",
];

/// Writes config.json, vocab.txt, tokenizer.json, model.safetensors,
/// sentence_bert_config.json and 1_Pooling/config.json into `dir`.
pub fn write_tiny_model(dir: &Path, spec: TinyModel) {
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    vocab.extend(WORDS.iter().map(|s| s.to_string()));
    // Single letters and their continuations make every ASCII word
    // tokenizable, so long made-up texts exercise truncation, not [UNK].
    for c in 'a'..='z' {
        vocab.push(c.to_string());
        vocab.push(format!("##{c}"));
    }
    for d in '0'..='9' {
        vocab.push(d.to_string());
        vocab.push(format!("##{d}"));
    }
    let vocab_path = dir.join("vocab.txt");
    std::fs::write(&vocab_path, vocab.join("\n") + "\n").unwrap();

    let wordpiece = WordPiece::from_file(vocab_path.to_str().unwrap())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tokenizer = Tokenizer::new(wordpiece);
    tokenizer.with_normalizer(Some(BertNormalizer::default()));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), 3),
        ("[CLS]".into(), 2),
    )));
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .expect("save tokenizer");

    let max_positions = spec.max_seq_length.max(64) * 2;
    let config = json!({
        "architectures": ["BertModel"],
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "intermediate_size": spec.hidden * 4,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": max_positions,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "model_type": "bert",
        "vocab_size": vocab.len(),
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        dir.join("sentence_bert_config.json"),
        json!({"max_seq_length": spec.max_seq_length, "do_lower_case": false}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        json!({"word_embedding_dimension": spec.hidden, "pooling_mode_mean_tokens": true})
            .to_string(),
    )
    .unwrap();

    let mut w = Weights {
        rng: StdRng::seed_from_u64(0x5717c4),
        tensors: HashMap::new(),
    };
    let (h, i) = (spec.hidden, spec.hidden * 4);
    w.put(
        "embeddings.word_embeddings.weight",
        &[vocab.len(), h],
        0.0,
        0.5,
    );
    w.put(
        "embeddings.position_embeddings.weight",
        &[max_positions, h],
        0.0,
        0.5,
    );
    w.put("embeddings.token_type_embeddings.weight", &[2, h], 0.0, 0.5);
    w.layer_norm("embeddings", h);
    for l in 0..spec.layers {
        let p = format!("encoder.layer.{l}");
        for part in ["query", "key", "value"] {
            w.put(
                &format!("{p}.attention.self.{part}.weight"),
                &[h, h],
                0.0,
                0.2,
            );
            w.put(&format!("{p}.attention.self.{part}.bias"), &[h], 0.0, 0.1);
        }
        w.put(
            &format!("{p}.attention.output.dense.weight"),
            &[h, h],
            0.0,
            0.2,
        );
        w.put(&format!("{p}.attention.output.dense.bias"), &[h], 0.0, 0.1);
        w.layer_norm(&format!("{p}.attention.output"), h);
        w.put(&format!("{p}.intermediate.dense.weight"), &[i, h], 0.0, 0.2);
        w.put(&format!("{p}.intermediate.dense.bias"), &[i], 0.0, 0.1);
        w.put(&format!("{p}.output.dense.weight"), &[h, i], 0.0, 0.1);
        w.put(&format!("{p}.output.dense.bias"), &[h], 0.0, 0.1);
        w.layer_norm(&format!("{p}.output"), h);
    }
    candle_core::safetensors::save(&w.tensors, dir.join("model.safetensors")).unwrap();
}

/// Seeded random weights: `set_seed` does not work on the CPU device.
struct Weights {
    rng: StdRng,
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    fn put(&mut self, name: &str, shape: &[usize], around: f32, spread: f32) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| around + self.rng.gen_range(-spread..=spread))
            .collect();
        let tensor = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
        self.tensors.insert(name.to_owned(), tensor);
    }

    fn layer_norm(&mut self, prefix: &str, size: usize) {
        self.put(&format!("{prefix}.LayerNorm.weight"), &[size], 1.0, 0.1);
        self.put(&format!("{prefix}.LayerNorm.bias"), &[size], 0.0, 0.1);
    }
}

/// A temporary directory holding a freshly generated tiny model.
pub fn tiny_model_dir(spec: TinyModel) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), spec);
    dir
}

/// Config as the binary would parse it from these flags, listening on a
/// free port.
pub fn config(model_dir: &Path, flags: &[&str]) -> Config {
    let mut args = vec![
        "switchyard-backend".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--model-dir".into(),
        model_dir.display().to_string(),
        "--model-name".into(),
        "tiny-test".into(),
    ];
    args.extend(flags.iter().map(|s| s.to_string()));
    Config::try_parse_from(args).expect("valid test flags")
}

/// An in-process server that drains when dropped or told to stop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<Server>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = Server::start(config, async move {
            let _ = stopped.await;
        })
        .await
        .expect("server starts");
        TestServer {
            addr: server.local_addr(),
            client: reqwest::Client::new(),
            stop: Some(stop),
            server: Some(server),
        }
    }

    pub async fn started_ready(config: Config) -> Self {
        let server = Self::start(config).await;
        server.wait_ready().await;
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn ready_report(&self) -> (u16, Value) {
        let response = self
            .client
            .get(self.url("/health/ready"))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    pub async fn wait_ready(&self) {
        wait_until("the server to become ready", || async {
            self.ready_report().await.0 == 200
        })
        .await;
    }

    pub async fn embed(&self, input: Value) -> reqwest::Response {
        self.client
            .post(self.url("/v1/embeddings"))
            .json(&json!({ "input": input }))
            .send()
            .await
            .unwrap()
    }

    /// Embeds and returns the vectors, asserting success.
    pub async fn vectors(&self, input: Value) -> Vec<Vec<f32>> {
        let response = self.embed(input).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        vectors_of(&body)
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one unlabelled (or fully labelled) sample line.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics().await, name)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stop.take());
        self.server.take().unwrap().wait().await
    }
}

pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

pub fn vectors_of(body: &Value) -> Vec<Vec<f32>> {
    body["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

pub fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Polls `check` every 20 ms until it holds, failing after 20 s.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the child on drop, so a failing test leaves no process behind.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// Ports for servers started by address, shared with the proxy's tests
// (that file says why they do not come from binding port 0).
#[path = "../../../proxy/tests/common/ports.rs"]
mod ports;
pub use ports::free_port;

/// A redis-server on a fixed port, without persistence.
pub struct RedisServer {
    pub port: u16,
    child: Option<ChildGuard>,
}

impl RedisServer {
    /// Picks a port but does not start yet.
    pub fn unstarted() -> Self {
        RedisServer {
            port: free_port(),
            child: None,
        }
    }

    pub fn start() -> Self {
        let mut redis = Self::unstarted();
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server)");
        self.child = Some(ChildGuard(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        self.child.take();
    }

    /// Sends a signal, e.g. STOP to make Redis hang with its socket open.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("redis is running").pid();
        send_signal(pid, name);
    }
}

pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The real binary, started with `args`, listening on a free port.
pub struct BinaryServer {
    pub addr: SocketAddr,
    pub child: ChildGuard,
}

impl BinaryServer {
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-backend"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchyard-backend");
        let stderr = child.stderr.take().unwrap();
        let child = ChildGuard(child);
        // The first log line names the bound address; the rest is forwarded
        // so a failing test shows the server's logs.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    if let Some(addr) = event["listen"].as_str() {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                        }
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server logged its listen address");
        BinaryServer { addr, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn signal(&self, name: &str) {
        send_signal(self.child.pid(), name);
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "server did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}
