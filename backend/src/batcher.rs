//! The bounded queue in front of the model and the OS thread that drains it in
//! batches. The forward pass is CPU-bound for milliseconds at a time, so it
//! must never run on a tokio worker.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::model::{Encoder, Model, ModelInfo, TextTokenizer, Tokens};

pub struct BatcherConfig {
    pub model_dir: PathBuf,
    pub model_name: String,
    pub capacity: usize,
    pub max_batch: usize,
    pub max_wait: Duration,
    /// 0 leaves the pool size to rayon.
    pub threads: usize,
}

/// Handed back by the inference thread once the model is loaded and warm.
pub struct Loaded {
    pub info: ModelInfo,
    /// Shared, not cloned per request: a clone copies the whole vocabulary,
    /// which cost milliseconds per request.
    pub tokenizer: Arc<TextTokenizer>,
}

pub type Embedding = Vec<f32>;

const ARRIVAL_POLL: Duration = Duration::from_micros(200);
pub type Reply = oneshot::Receiver<Result<Embedding, Arc<str>>>;

/// The queue refused the work; the caller should answer 503.
#[derive(Debug)]
pub struct QueueFull;

struct Item {
    tokens: Tokens,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Embedding, Arc<str>>>,
}

/// Submitting side of the queue. Dropping it stops the inference thread once
/// the queue is empty.
pub struct Batcher {
    tx: mpsc::Sender<Item>,
    depth: Arc<AtomicUsize>,
    arriving: Arc<AtomicUsize>,
    capacity: usize,
}

/// Held by a request from the moment it will need the model until its
/// inputs are queued. While any request holds one, the batcher waits (up to
/// max-wait) for more inputs; when none does, waiting could only add
/// latency, so a lone request is dispatched at once.
pub struct Arrival(Arc<AtomicUsize>);

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Batcher {
    /// Starts the inference thread. It loads the model and runs a warm-up
    /// batch first; `loaded` resolves when that is done (or failed).
    pub fn spawn(
        config: BatcherConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, oneshot::Receiver<Result<Loaded>>)> {
        let (tx, rx) = mpsc::channel();
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let arriving = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher {
            tx,
            depth: depth.clone(),
            arriving: arriving.clone(),
            capacity: config.capacity,
        };
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                let warm = build_pool(config.threads).and_then(|pool| {
                    let model = Model::load(&config.model_dir, config.model_name.clone())?;
                    warm_up(&pool, &model)?;
                    Ok((pool, model))
                });
                let (pool, model) = match warm {
                    Ok(ok) => ok,
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                let Model {
                    info,
                    tokenizer,
                    encoder,
                } = model;
                let tokenizer = Arc::new(tokenizer);
                if loaded_tx.send(Ok(Loaded { info, tokenizer })).is_err() {
                    return;
                }
                let worker = Worker {
                    rx,
                    depth,
                    arriving,
                    pool,
                    encoder,
                    metrics,
                    max_batch: config.max_batch,
                    max_wait: config.max_wait,
                };
                worker.run();
            })
            .context("spawning the inference thread")?;
        Ok((batcher, loaded_rx))
    }

    /// Inputs waiting for a batch slot.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn arrival(&self) -> Arrival {
        self.arriving.fetch_add(1, Ordering::AcqRel);
        Arrival(self.arriving.clone())
    }

    /// Queues every input of one request, or none of them: a request is
    /// refused whole rather than half-served. The arrival ends only after
    /// the last input is in the queue.
    pub fn submit(&self, arrival: Arrival, inputs: Vec<Tokens>) -> Result<Vec<Reply>, QueueFull> {
        let n = inputs.len();
        self.depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d + n <= self.capacity).then_some(d + n)
            })
            .map_err(|_| QueueFull)?;
        let now = Instant::now();
        let replies = inputs
            .into_iter()
            .map(|tokens| {
                let (reply, rx) = oneshot::channel();
                // A send only fails when the inference thread is gone; the
                // dropped reply then surfaces as an error to the caller.
                let _ = self.tx.send(Item {
                    tokens,
                    enqueued: now,
                    reply,
                });
                rx
            })
            .collect();
        drop(arrival);
        Ok(replies)
    }
}

fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("matmul-{i}"))
        .build()
        .context("building the inference thread pool")
}

fn warm_up(pool: &rayon::ThreadPool, model: &Model) -> Result<()> {
    let short = model.tokenizer.encode("warm up")?;
    let long = model
        .tokenizer
        .encode(&"the quick brown fox jumps over the lazy dog ".repeat(8))?;
    pool.install(|| model.encoder.embed(&[&short, &long]))?;
    Ok(())
}

struct Worker {
    rx: mpsc::Receiver<Item>,
    depth: Arc<AtomicUsize>,
    arriving: Arc<AtomicUsize>,
    pool: rayon::ThreadPool,
    encoder: Encoder,
    metrics: Arc<Metrics>,
    max_batch: usize,
    max_wait: Duration,
}

impl Worker {
    fn run(self) {
        while let Some(batch) = self.next_batch() {
            self.process(batch);
        }
    }

    /// Blocks for the first item, then gathers more until the batch is full,
    /// `max_wait` has passed since the first one arrived, or no request is on
    /// its way. Returns None once every submitter is gone and the queue is
    /// empty.
    fn next_batch(&self) -> Option<Vec<Item>> {
        let first = self.rx.recv().ok()?;
        let deadline = Instant::now() + self.max_wait;
        let mut batch = vec![first];
        while batch.len() < self.max_batch {
            let item = match self.rx.try_recv() {
                Ok(item) => item,
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    if self.arriving.load(Ordering::Acquire) == 0 {
                        // Inputs queued just before the count dropped still
                        // make this batch.
                        match self.rx.try_recv() {
                            Ok(item) => {
                                batch.push(item);
                                continue;
                            }
                            Err(_) => break,
                        }
                    }
                    // Short naps, so a request that turns out to need no
                    // inference (all cache hits) does not hold the batch.
                    match self.rx.recv_timeout(left.min(ARRIVAL_POLL)) {
                        Ok(item) => item,
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            batch.push(item);
        }
        self.depth.fetch_sub(batch.len(), Ordering::AcqRel);
        Some(batch)
    }

    fn process(&self, batch: Vec<Item>) {
        let started = Instant::now();
        for item in &batch {
            self.metrics
                .queue_wait
                .observe((started - item.enqueued).as_secs_f64());
        }
        self.metrics.batch_size.observe(batch.len() as f64);

        let tokens: Vec<&Tokens> = batch.iter().map(|item| &item.tokens).collect();
        let encoder = &self.encoder;
        // A panic in the maths must cost this batch, not the thread: without
        // the thread every later request would hang in the queue.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.pool.install(|| encoder.embed(&tokens))
        }))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the forward pass panicked")));
        self.metrics
            .inference_duration
            .observe(started.elapsed().as_secs_f64());

        match result {
            Ok(vectors) => {
                for (item, vector) in batch.into_iter().zip(vectors) {
                    let _ = item.reply.send(Ok(vector));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, size = batch.len(), "inference failed");
                let message: Arc<str> = format!("inference failed: {e}").into();
                for item in batch {
                    let _ = item.reply.send(Err(message.clone()));
                }
            }
        }
    }
}
