//! The model path alone, without HTTP or the queue: `Encoder::embed` on
//! the embeddings bench's short (~12 token) and long (~116 token) inputs,
//! one at a time and 16 or 32 per batch, on a rayon pool of `--threads`.
//! Prints the median and fastest time per batch. It is a measurement for
//! profiling (`perf record` it), not a test; the anchors are in
//! `loadtest/bench/embeddings`.
//!
//! cargo run --release -p switchyard-backend --example model_path -- [--threads N] [--iterations N] [--only NAME]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use switchyard_backend::linear::Kernel;
use switchyard_backend::model::Model;

/// The texts of loadtest/bench/embeddings.py, with i = 7.
const SHORT: &str = "request 7 asks for a short embedding";
const LONG: &str = "Request 7 carries a longer passage. A load balancer spreads incoming \
requests across a pool of servers, and when one of them slows down a least-connections policy \
sends new work to the others. Health checks take a failing server out of the pool until it \
recovers, and draining lets an operator remove a server without dropping the requests it is \
still serving. Canary releases shift a small share of traffic to a new version first and watch \
its error rate and latency before going further, rolling back on their own when the new \
version misbehaves in production.";

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    model_dir: PathBuf,
    /// The rayon pool's size, as the backend's --threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Inputs embedded per case (at least 3 batches).
    #[arg(long, default_value_t = 320)]
    iterations: usize,
    /// Run one case only: 1short, 16short, 32short, 1long or 32long.
    #[arg(long)]
    only: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // As the server does: a misspelt cap must not quietly time another kernel.
    let kernel = Kernel::configured().map_err(anyhow::Error::msg)?;
    let model = Model::load(&args.model_dir, "bench".into())
        .with_context(|| format!("loading {} (scripts/fetch-model)", args.model_dir.display()))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()?;
    println!("threads {}, matmul kernel {}", args.threads, kernel.name());
    let cases = [
        ("1short", 1, SHORT),
        ("16short", 16, SHORT),
        ("32short", 32, SHORT),
        ("1long", 1, LONG),
        ("32long", 32, LONG),
    ];
    for (name, size, text) in cases {
        if args.only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        let tokens = model.tokenizer.encode(text, true)?;
        let batch = vec![&tokens; size];
        pool.install(|| model.encoder.embed(&batch))?;
        let mut times = (0..(args.iterations / size).max(3))
            .map(|_| {
                let started = Instant::now();
                pool.install(|| model.encoder.embed(&batch))?;
                Ok(started.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        println!(
            "{name:>8} ({} tokens each): median {:.3} ms, fastest {:.3} ms per batch, {} batches",
            tokens.ids.len(),
            times[times.len() / 2],
            times[0],
            times.len()
        );
    }
    Ok(())
}
