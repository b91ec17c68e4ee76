//! Loading a sentence-transformers model directory and turning token ids into
//! normalised sentence embeddings with candle on the CPU.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationParams};

use crate::bert::{Bert, Pooling, Sequence};

/// What callers need to know about the loaded model, independent of weights.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    /// Changes whenever anything that affects the output vectors changes
    /// (weights, architecture, tokenizer, pooling, truncation), so it can
    /// namespace cache keys.
    pub fingerprint: String,
    pub dimensions: usize,
    pub max_seq_length: usize,
}

/// One tokenised input, already truncated, without padding.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

/// Thread-safe and cheap to call from request handlers, so tokenisation never
/// competes with the matmul thread pool.
pub struct TextTokenizer {
    truncating: Tokenizer,
    /// The same without truncation, to tell a client how long an input it
    /// asked not to have truncated really is. Tokenizing costs the same
    /// either way: truncation only cuts the finished encoding.
    whole: Tokenizer,
}

impl TextTokenizer {
    /// With `truncate` false the result may be longer than the model's
    /// `max_seq_length`; the caller must refuse it.
    pub fn encode(&self, text: &str, truncate: bool) -> Result<Tokens> {
        let tokenizer = if truncate {
            &self.truncating
        } else {
            &self.whole
        };
        let encoding = tokenizer
            .encode_fast(text, true)
            .map_err(anyhow::Error::msg)?;
        Ok(Tokens {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
        })
    }
}

/// The transformer plus pooling. Owned by the inference thread.
pub struct Encoder {
    bert: Bert,
    pooling: Pooling,
}

impl Encoder {
    /// Embeds a batch. Sequences are not padded: each attends only to
    /// itself, so a text's vector does not depend on what it was batched
    /// with.
    pub fn embed(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>> {
        ensure!(!batch.is_empty(), "cannot embed an empty batch");
        let sequences: Vec<Sequence> = batch
            .iter()
            .map(|t| Sequence {
                ids: &t.ids,
                type_ids: &t.type_ids,
            })
            .collect();
        let hidden = self.bert.forward(&sequences)?;
        Ok(hidden
            .sequences()
            .map(|tokens| self.pooling.pool_normalised(tokens, hidden.width()))
            .collect())
    }
}

pub struct Model {
    pub info: ModelInfo,
    pub tokenizer: TextTokenizer,
    pub encoder: Encoder,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

#[derive(Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: Option<usize>,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

impl PoolingConfig {
    /// The one pooling mode asked for; the server implements mean and CLS.
    fn mode(&self, hidden_size: usize) -> Result<Pooling> {
        if let Some(dim) = self.word_embedding_dimension {
            ensure!(
                dim == hidden_size,
                "pooling dimension {dim} does not match hidden_size {hidden_size}"
            );
        }
        match (
            self.pooling_mode_mean_tokens,
            self.pooling_mode_cls_token,
            self.pooling_mode_max_tokens || self.pooling_mode_mean_sqrt_len_tokens,
        ) {
            (true, false, false) => Ok(Pooling::Mean),
            (false, true, false) => Ok(Pooling::Cls),
            _ => bail!("1_Pooling/config.json asks for a pooling other than exactly one of mean or CLS, which this server does not implement"),
        }
    }
}

impl Model {
    /// Loads a directory in Hugging Face layout.
    pub fn load(dir: &Path, name: String) -> Result<Self> {
        let read = |file: &str| {
            std::fs::read(dir.join(file))
                .with_context(|| format!("reading {}", dir.join(file).display()))
        };
        let read_optional = |file: &str| -> Result<Option<Vec<u8>>> {
            match std::fs::read(dir.join(file)) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {}", dir.join(file).display())),
            }
        };

        let config_bytes = read("config.json")?;
        let config: BertConfig =
            serde_json::from_slice(&config_bytes).context("parsing config.json")?;

        let pooling = match read_optional("1_Pooling/config.json")? {
            Some(bytes) => {
                let pooling: PoolingConfig =
                    serde_json::from_slice(&bytes).context("parsing 1_Pooling/config.json")?;
                pooling.mode(config.hidden_size)?
            }
            None => Pooling::Mean,
        };

        // sentence-transformers truncates at max_seq_length, not at whatever
        // the tokenizer file ships with (128 for MiniLM).
        let max_seq_length = match read_optional("sentence_bert_config.json")? {
            Some(bytes) => {
                let st: SentenceBertConfig =
                    serde_json::from_slice(&bytes).context("parsing sentence_bert_config.json")?;
                st.max_seq_length
            }
            None => config.max_position_embeddings,
        }
        .min(config.max_position_embeddings);
        ensure!(
            max_seq_length >= 2,
            "max_seq_length {max_seq_length} is too short"
        );

        let tokenizer_bytes = read("tokenizer.json")?;
        let mut whole = Tokenizer::from_bytes(&tokenizer_bytes).map_err(anyhow::Error::msg)?;
        whole.with_padding(None);
        whole.with_truncation(None).map_err(anyhow::Error::msg)?;
        let mut tokenizer = whole.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                ..TruncationParams::default()
            }))
            .map_err(anyhow::Error::msg)?;

        let weights = read("model.safetensors")?;
        let fingerprint = fingerprint(&[
            &weights,
            &config_bytes,
            &tokenizer_bytes,
            format!(
                "pooling={};normalize=l2;max_seq_length={max_seq_length}",
                pooling.name()
            )
            .as_bytes(),
        ]);

        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)?;
        let bert = Bert::load(vb, &config).context("loading BERT weights")?;

        Ok(Model {
            info: ModelInfo {
                name,
                fingerprint,
                dimensions: config.hidden_size,
                max_seq_length,
            },
            tokenizer: TextTokenizer {
                truncating: tokenizer,
                whole,
            },
            encoder: Encoder { bert, pooling },
        })
    }
}

fn fingerprint(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        // Length-prefixing keeps ("ab","c") and ("a","bc") apart.
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(&hasher.finalize()[..8])
}
