//! Command line and environment configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Parser;

/// Sentence-embedding server for all-MiniLM-L6-v2 (or any BERT model in
/// Hugging Face layout) with an OpenAI-compatible API, request batching and
/// an optional Redis cache.
///
/// Every flag can also be set through the environment variable shown with it.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "switchyard-backend",
    disable_version_flag = true,
    args_override_self = true
)]
pub struct Config {
    /// Address and port to serve HTTP on (port 0 picks a free one).
    #[arg(
        long,
        env = "SWITCHYARD_BACKEND_LISTEN",
        default_value = "127.0.0.1:9100"
    )]
    pub listen: SocketAddr,

    /// Model directory in Hugging Face layout: config.json, tokenizer.json,
    /// model.safetensors, and optionally sentence_bert_config.json
    /// (max_seq_length) and 1_Pooling/config.json. Fetch it with
    /// scripts/fetch-model.
    #[arg(
        long,
        env = "SWITCHYARD_BACKEND_MODEL_DIR",
        default_value = "models/all-MiniLM-L6-v2"
    )]
    pub model_dir: PathBuf,

    /// Model name reported in responses and readiness [default: the model
    /// directory's name, e.g. all-MiniLM-L6-v2].
    #[arg(long, env = "SWITCHYARD_BACKEND_MODEL_NAME")]
    pub model_name: Option<String>,

    /// Redis URL for the embedding cache, e.g. redis://127.0.0.1:6379.
    /// Without it the cache is disabled.
    #[arg(long, env = "SWITCHYARD_BACKEND_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Deployment label (e.g. blue-v1, canary) sent in the
    /// x-switchyard-version header and in readiness.
    #[arg(
        long = "version",
        env = "SWITCHYARD_BACKEND_VERSION",
        default_value = "dev"
    )]
    pub version_label: String,

    /// Instance name sent in the x-switchyard-instance header [default: the
    /// bound listen address].
    #[arg(long, env = "SWITCHYARD_BACKEND_INSTANCE")]
    pub instance: Option<String>,

    /// Inputs that may wait for inference at once; past this, requests get
    /// 503 with Retry-After.
    #[arg(long, env = "SWITCHYARD_BACKEND_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,

    /// Most inputs in one forward pass.
    #[arg(long, env = "SWITCHYARD_BACKEND_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,

    /// How long a batch may wait for more inputs after its first one arrived
    /// (e.g. 2ms, 0s). It waits only while other requests are on their way to
    /// the queue, so a lone request never pays it.
    #[arg(long, env = "SWITCHYARD_BACKEND_MAX_WAIT", default_value = "2ms", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,

    /// How long bulk work yields to interactive work (requests sent with
    /// `x-switchyard-priority: bulk`). A bulk input is served as if it had
    /// arrived this much later, so interactive inputs overtake it only while
    /// it is younger than this; an older one is served like interactive work
    /// of its age, so a stream of interactive requests cannot starve it.
    #[arg(long, env = "SWITCHYARD_BACKEND_BULK_PROMOTE_AFTER", default_value = "1s", value_parser = humantime::parse_duration)]
    pub bulk_promote_after: Duration,

    /// Most inputs in one request; more gets 400. Must not exceed
    /// --queue-capacity.
    #[arg(long, env = "SWITCHYARD_BACKEND_MAX_INPUTS", default_value_t = 256)]
    pub max_inputs: usize,

    /// Largest request body accepted (e.g. 2MiB, 512KiB, 100000); larger gets
    /// 413.
    #[arg(long, env = "SWITCHYARD_BACKEND_MAX_BODY", default_value = "2MiB", value_parser = parse_bytes)]
    pub max_body: usize,

    /// How long cached embeddings live in Redis (e.g. 1h, 30m).
    #[arg(long, env = "SWITCHYARD_BACKEND_CACHE_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,

    /// Time budget for each Redis call; a slower answer counts as a miss.
    #[arg(long, env = "SWITCHYARD_BACKEND_CACHE_TIMEOUT", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub cache_timeout: Duration,

    /// After SIGTERM, how long to wait for accepted requests to finish before
    /// exiting anyway (with status 1).
    #[arg(long, env = "SWITCHYARD_BACKEND_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Fault injection: extra latency added to every embedding request
    /// (e.g. 200ms). Off by default.
    #[arg(long, env = "SWITCHYARD_BACKEND_FAULT_LATENCY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub fault_latency: Duration,

    /// Fault injection: fraction of embedding requests (0.0 to 1.0) answered
    /// with 500. Off by default.
    #[arg(
        long,
        env = "SWITCHYARD_BACKEND_FAULT_ERROR_RATE",
        default_value_t = 0.0
    )]
    pub fault_error_rate: f64,

    /// Threads for the forward pass (matrix products, attention heads and
    /// row-wise steps); 0 uses one per CPU.
    #[arg(long, env = "SWITCHYARD_BACKEND_THREADS", default_value_t = 0)]
    pub threads: usize,
}

impl Config {
    pub fn effective_model_name(&self) -> String {
        self.model_name.clone().unwrap_or_else(|| {
            self.model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".to_owned())
        })
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.queue_capacity > 0,
            "--queue-capacity must be at least 1"
        );
        ensure!(self.max_batch > 0, "--max-batch must be at least 1");
        ensure!(self.max_inputs > 0, "--max-inputs must be at least 1");
        ensure!(
            self.max_inputs <= self.queue_capacity,
            "--max-inputs ({}) must not exceed --queue-capacity ({}), or a full-size request could never be queued",
            self.max_inputs,
            self.queue_capacity
        );
        ensure!(
            (0.0..=1.0).contains(&self.fault_error_rate),
            "--fault-error-rate must be between 0 and 1"
        );
        crate::linear::Kernel::configured().map_err(anyhow::Error::msg)?;
        Ok(())
    }
}

/// Accepts a plain byte count or one with a KiB/MiB/GiB (or KB/MB/GB) suffix.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte size"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("unknown byte unit {other:?}")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("2MiB"), Ok(2 << 20));
        assert_eq!(parse_bytes("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("3kb"), Ok(3000));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("2 parsecs").is_err());
    }

    #[test]
    fn defaults_are_valid_and_every_flag_has_an_env_var() {
        let config = Config::try_parse_from(["switchyard-backend"]).unwrap();
        config.validate().unwrap();
        assert_eq!(config.max_wait, Duration::from_millis(2));
        use clap::CommandFactory;
        for arg in Config::command().get_arguments() {
            if arg.get_id() == "help" {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let expected = format!(
                "SWITCHYARD_BACKEND_{}",
                arg.get_long().unwrap().to_uppercase().replace('-', "_")
            );
            assert_eq!(env.as_deref(), Some(expected.as_str()), "{}", arg.get_id());
        }
    }

    #[test]
    fn oversized_requests_must_fit_the_queue() {
        let config =
            Config::try_parse_from(["x", "--queue-capacity", "4", "--max-inputs", "8"]).unwrap();
        assert!(config.validate().is_err());
    }
}
