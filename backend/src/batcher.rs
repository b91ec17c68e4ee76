//! The bounded queue in front of the model and the OS thread that drains it in
//! batches. The forward pass is CPU-bound for milliseconds at a time, so it
//! must never run on a tokio worker.
//!
//! The queue has two lanes, interactive and bulk. Inputs are served in order
//! of arrival, except that a bulk input counts as having arrived
//! `bulk_promote_after` later than it did: interactive work overtakes bulk
//! work that is younger than that, and bulk work older than that is served
//! like interactive work of the same age, so it cannot starve.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
    pub bulk_promote_after: Duration,
    /// 0 leaves the pool size to rayon.
    pub threads: usize,
}

/// A request's priority, from the x-switchyard-priority header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Interactive,
    Bulk,
}

impl Class {
    pub const ALL: [Class; 2] = [Class::Interactive, Class::Bulk];

    pub fn name(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Bulk => "bulk",
        }
    }

    pub fn parse(name: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|class| class.name() == name)
    }
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
    class: Class,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Embedding, Arc<str>>>,
}

#[derive(Default)]
struct Lanes {
    /// Indexed by `Class`, each in arrival order.
    lanes: [VecDeque<Item>; 2],
    /// Set once the batcher is dropped: the worker stops when the lanes are
    /// empty.
    closed: bool,
}

impl Lanes {
    fn lane(&mut self, class: Class) -> &mut VecDeque<Item> {
        &mut self.lanes[class as usize]
    }

    fn len(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    /// The next input to serve, and whether it is a bulk input served ahead
    /// of waiting interactive ones. Each lane is in arrival order, so
    /// comparing the two fronts is enough.
    fn pop(&mut self, promote_after: Duration) -> Option<(Item, bool)> {
        let [interactive, bulk] = &mut self.lanes;
        let bulk_first = match (interactive.front(), bulk.front()) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(i), Some(b)) => b.enqueued + promote_after <= i.enqueued,
        };
        if bulk_first {
            let promoted = !interactive.is_empty();
            bulk.pop_front().map(|item| (item, promoted))
        } else {
            interactive.pop_front().map(|item| (item, false))
        }
    }
}

/// The lanes plus lock-free copies of their lengths for readiness, metrics
/// and load headers, which must not contend with the worker.
#[derive(Default)]
struct Queue {
    lanes: Mutex<Lanes>,
    wake: Condvar,
    depth: [AtomicUsize; 2],
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Lanes> {
        // Nothing panics while holding the lock, and the lanes stay
        // consistent even if something did.
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_depth(&self, lanes: &Lanes) {
        for (depth, lane) in self.depth.iter().zip(&lanes.lanes) {
            depth.store(lane.len(), Ordering::Relaxed);
        }
    }
}

/// Submitting side of the queue. Dropping it stops the inference thread once
/// the queue is empty.
pub struct Batcher {
    queue: Arc<Queue>,
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
        let (loaded_tx, loaded_rx) = oneshot::channel();
        let queue = Arc::new(Queue::default());
        let arriving = Arc::new(AtomicUsize::new(0));
        let batcher = Batcher {
            queue: queue.clone(),
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
                    queue,
                    arriving,
                    encoder,
                    metrics,
                    max_batch: config.max_batch,
                    max_wait: config.max_wait,
                    bulk_promote_after: config.bulk_promote_after,
                };
                // The loop itself runs on a pool thread, so a batch starts
                // its forward pass without handing it to the pool and
                // waking this thread again when it is done.
                pool.install(|| worker.run());
            })
            .context("spawning the inference thread")?;
        Ok((batcher, loaded_rx))
    }

    /// Inputs waiting for a batch slot.
    pub fn depth(&self) -> usize {
        Class::ALL.into_iter().map(|c| self.class_depth(c)).sum()
    }

    /// Inputs of one class waiting for a batch slot.
    pub fn class_depth(&self, class: Class) -> usize {
        self.queue.depth[class as usize].load(Ordering::Relaxed)
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
    pub fn submit(
        &self,
        arrival: Arrival,
        class: Class,
        inputs: Vec<Tokens>,
    ) -> Result<Vec<Reply>, QueueFull> {
        let mut lanes = self.queue.lock();
        if lanes.len() + inputs.len() > self.capacity {
            return Err(QueueFull);
        }
        let now = Instant::now();
        let lane = lanes.lane(class);
        let replies = inputs
            .into_iter()
            .map(|tokens| {
                let (reply, rx) = oneshot::channel();
                lane.push_back(Item {
                    tokens,
                    class,
                    enqueued: now,
                    reply,
                });
                rx
            })
            .collect();
        self.queue.publish_depth(&lanes);
        drop(lanes);
        self.queue.wake.notify_one();
        drop(arrival);
        Ok(replies)
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.wake.notify_one();
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
    let short = model.tokenizer.encode("warm up", true)?;
    let long = model.tokenizer.encode(
        &"the quick brown fox jumps over the lazy dog ".repeat(8),
        true,
    )?;
    pool.install(|| model.encoder.embed(&[&short, &long]))?;
    Ok(())
}

struct Worker {
    queue: Arc<Queue>,
    arriving: Arc<AtomicUsize>,
    encoder: Encoder,
    metrics: Arc<Metrics>,
    max_batch: usize,
    max_wait: Duration,
    bulk_promote_after: Duration,
}

impl Worker {
    fn run(self) {
        while let Some(batch) = self.next_batch() {
            self.process(batch);
        }
    }

    /// Blocks for the first item, then gathers more until the batch is full,
    /// `max_wait` has passed since the first one arrived, or no request is on
    /// its way. Returns None once the batcher is gone and the queue is empty.
    fn next_batch(&self) -> Option<Vec<Item>> {
        let mut lanes = self.queue.lock();
        let first = loop {
            if let Some(item) = self.pop(&mut lanes) {
                break item;
            }
            if lanes.closed {
                return None;
            }
            lanes = self
                .queue
                .wake
                .wait(lanes)
                .unwrap_or_else(|e| e.into_inner());
        };
        let deadline = Instant::now() + self.max_wait;
        let mut batch = vec![first];
        while batch.len() < self.max_batch {
            if let Some(item) = self.pop(&mut lanes) {
                batch.push(item);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // Submitters queue under the lock and only then stop counting as
            // arriving, so with the lanes empty and nobody arriving, waiting
            // could only add latency.
            if left.is_zero() || lanes.closed || self.arriving.load(Ordering::Acquire) == 0 {
                break;
            }
            // Short naps, so a request that turns out to need no inference
            // (all cache hits) does not hold the batch.
            lanes = self
                .queue
                .wake
                .wait_timeout(lanes, left.min(ARRIVAL_POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        self.queue.publish_depth(&lanes);
        Some(batch)
    }

    fn pop(&self, lanes: &mut Lanes) -> Option<Item> {
        let (item, promoted) = lanes.pop(self.bulk_promote_after)?;
        if promoted {
            self.metrics.bulk_promoted.inc();
        }
        Some(item)
    }

    fn process(&self, batch: Vec<Item>) {
        let started = Instant::now();
        for item in &batch {
            self.metrics
                .queue_wait
                .with_label_values(&[item.class.name()])
                .observe((started - item.enqueued).as_secs_f64());
        }
        self.metrics.batch_size.observe(batch.len() as f64);

        let tokens: Vec<&Tokens> = batch.iter().map(|item| &item.tokens).collect();
        let encoder = &self.encoder;
        // A panic in the maths must cost this batch, not the thread: without
        // the thread every later request would hang in the queue.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| encoder.embed(&tokens)))
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
