//! A BERT encoder for inference on the CPU. It reads the same weights and
//! config.json as candle-transformers' `BertModel` (through candle's
//! safetensors loader), but runs its own forward pass on plain f32 rows:
//! the linear layers on weights packed at load time (`linear`), attention's
//! small per-head products on the `gemm` crate (candle's own matmul engine).
//!
//! - **No padding.** A batch's sequences are laid end to end as one
//!   (tokens, hidden) matrix: the dense layers multiply only real tokens, and
//!   attention runs per sequence and head. A padded batch multiplies its
//!   longest member's length by its size, whatever the others' lengths.
//! - **Fused steps.** A linear layer writes bias (plus the residual, where
//!   there is one) plus its product in one go, so bias and residual adds
//!   cost no pass of their own; layer norm, GELU and softmax are one
//!   in-place pass each (see `kernels`). Candle ran each step as an op over
//!   a fresh tensor, single-threaded on the inference thread.
//! - query, key and value are one fused product, with the 1/sqrt(head_dim)
//!   attention scale folded into the query weights at load time.
//!
//! Everything runs on the calling rayon pool: the linear layers are split
//! across it, the row-wise passes and the attention heads are spread over it.

use std::sync::Mutex;

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::kernels::{layer_norm_in_place, softmax_in_place, Activation};
use crate::linear::{Linear, SharedOut};

/// Rows per parallel task in the row-wise passes, in elements: enough to
/// amortise rayon's hand-off, small enough to split a short batch.
const PAR_CHUNK_ELEMENTS: usize = 16 * 1024;

fn rows_per_task(width: usize) -> usize {
    (PAR_CHUNK_ELEMENTS / width).max(1)
}

pub struct Bert {
    scratch: Mutex<Scratch>,
    word_embeddings: Vec<f32>,
    position_embeddings: Vec<f32>,
    token_type_embeddings: Vec<f32>,
    embeddings_norm: Norm,
    layers: Vec<Layer>,
    vocab: usize,
    positions: usize,
    token_types: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
    activation: Activation,
}

/// The buffers a forward pass works in, kept from layer to layer and from
/// batch to batch: fresh ones were fresh pages, about 1,150 page faults per
/// batch of 32 short inputs (perf stat), and the kernel's faulting and
/// zeroing showed as a few per cent of its samples. The price: they stay at
/// the largest batch's size, which the forward pass reached anyway (113 MB
/// for 32 inputs of 256 tokens).
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    context: Vec<f32>,
    attended: Vec<f32>,
    inner: Vec<f32>,
}

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

/// One sequence of a batch: its token ids and segment ids.
pub struct Sequence<'a> {
    pub ids: &'a [u32],
    pub type_ids: &'a [u32],
}

/// The last layer's token vectors of a batch, sequences end to end.
pub struct Hidden {
    data: Vec<f32>,
    /// Sequence `i` is rows `starts[i]..starts[i + 1]`.
    starts: Vec<usize>,
    width: usize,
}

impl Hidden {
    pub fn sequences(&self) -> impl Iterator<Item = &[f32]> {
        self.starts
            .windows(2)
            .map(|w| &self.data[w[0] * self.width..w[1] * self.width])
    }

    pub fn width(&self) -> usize {
        self.width
    }
}

impl Bert {
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        // Checkpoints saved from BertFor* models nest everything under "bert".
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let h = config.hidden_size;
        ensure!(
            h.is_multiple_of(config.num_attention_heads),
            "hidden_size {h} is not a multiple of num_attention_heads {}",
            config.num_attention_heads
        );
        let head_dim = h / config.num_attention_heads;
        let eps = config.layer_norm_eps as f32;
        let norm = |vb: VarBuilder| Norm::load(h, eps, vb.pp("LayerNorm"));
        let embeddings = vb.pp("embeddings");
        let table = |name: &str, rows: usize| -> Result<Vec<f32>> {
            flat(embeddings.pp(name).get((rows, h), "weight")?)
        };
        let mut layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attention = vb.pp("attention");
                let intermediate = config.intermediate_size;
                Ok(Layer {
                    qkv: fused_qkv(attention.pp("self"), h, head_dim)?,
                    attention_out: linear(h, h, attention.pp("output.dense"))?,
                    attention_norm: norm(attention.pp("output"))?,
                    intermediate: linear(h, intermediate, vb.pp("intermediate.dense"))?,
                    output: linear(intermediate, h, vb.pp("output.dense"))?,
                    output_norm: norm(vb.pp("output"))?,
                })
            })
            .collect::<Result<Vec<Layer>>>()?;
        Linear::share_huge_pages(layers.iter_mut().flat_map(|l| {
            [
                &mut l.qkv,
                &mut l.attention_out,
                &mut l.intermediate,
                &mut l.output,
            ]
        }));
        Ok(Bert {
            scratch: Mutex::default(),
            word_embeddings: table("word_embeddings", config.vocab_size)?,
            position_embeddings: table("position_embeddings", config.max_position_embeddings)?,
            token_type_embeddings: table("token_type_embeddings", config.type_vocab_size)?,
            embeddings_norm: norm(embeddings)?,
            layers,
            vocab: config.vocab_size,
            positions: config.max_position_embeddings,
            token_types: config.type_vocab_size,
            hidden: h,
            heads: config.num_attention_heads,
            head_dim,
            activation: match config.hidden_act {
                HiddenAct::Gelu => Activation::Gelu,
                HiddenAct::GeluApproximate => Activation::GeluTanh,
                HiddenAct::Relu => Activation::Relu,
            },
        })
    }

    /// Runs the encoder over `batch`. Each sequence attends only to itself,
    /// so its vectors do not depend on what it was batched with.
    pub fn forward(&self, batch: &[Sequence]) -> Result<Hidden> {
        let mut starts = Vec::with_capacity(batch.len() + 1);
        starts.push(0);
        for seq in batch {
            ensure!(!seq.ids.is_empty(), "cannot embed an empty sequence");
            ensure!(
                seq.type_ids.len() == seq.ids.len(),
                "a sequence has {} token ids but {} token types",
                seq.ids.len(),
                seq.type_ids.len()
            );
            ensure!(
                seq.ids.len() <= self.positions,
                "a sequence of {} tokens is longer than the model's {} positions",
                seq.ids.len(),
                self.positions
            );
            starts.push(starts.last().copied().unwrap_or(0) + seq.ids.len());
        }
        let mut x = self.embed(batch, &starts)?;
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        for layer in &self.layers {
            self.layer(layer, &mut x, &starts, &mut scratch);
        }
        Ok(Hidden {
            data: x,
            starts,
            width: self.hidden,
        })
    }

    /// Word + position + segment embeddings, layer-normalised.
    fn embed(&self, batch: &[Sequence], starts: &[usize]) -> Result<Vec<f32>> {
        let h = self.hidden;
        let mut rows: Vec<(u32, usize, u32)> = Vec::with_capacity(*starts.last().unwrap_or(&0));
        for seq in batch {
            for (position, (&id, &type_id)) in seq.ids.iter().zip(seq.type_ids).enumerate() {
                ensure!(
                    (id as usize) < self.vocab,
                    "token id {id} is outside the vocabulary"
                );
                ensure!(
                    (type_id as usize) < self.token_types,
                    "token type {type_id} is outside the model's {}",
                    self.token_types
                );
                rows.push((id, position, type_id));
            }
        }
        let mut x = vec![0f32; rows.len() * h];
        x.par_chunks_mut(h)
            .with_min_len(rows_per_task(h))
            .zip(rows.par_iter())
            .for_each(|(out, &(id, position, type_id))| {
                let word = &self.word_embeddings[id as usize * h..][..h];
                let pos = &self.position_embeddings[position * h..][..h];
                let kind = &self.token_type_embeddings[type_id as usize * h..][..h];
                for (((o, w), p), k) in out.iter_mut().zip(word).zip(pos).zip(kind) {
                    *o = w + p + k;
                }
                self.embeddings_norm.apply(out);
            });
        Ok(x)
    }

    /// One encoder layer, x in place.
    fn layer(&self, layer: &Layer, x: &mut Vec<f32>, starts: &[usize], s: &mut Scratch) {
        layer.qkv.forward(x, None, &mut s.qkv);
        self.attention(&s.qkv, starts, &mut s.context);
        layer
            .attention_out
            .forward(&s.context, Some(x), &mut s.attended);
        layer.attention_norm.apply_rows(&mut s.attended);

        layer.intermediate.forward(&s.attended, None, &mut s.inner);
        let activation = self.activation;
        let width = layer.intermediate.outputs();
        s.inner
            .par_chunks_mut(rows_per_task(width) * width)
            .for_each(|rows| activation.apply_in_place(rows));
        layer.output.forward(&s.inner, Some(&s.attended), x);
        layer.output_norm.apply_rows(x);
    }

    /// Scaled dot-product attention of every sequence with itself, one task
    /// per (sequence, head). `qkv` is (tokens, 3·hidden): each row holds the
    /// token's query, key and value, heads side by side.
    fn attention(&self, qkv: &[f32], starts: &[usize], context: &mut Vec<f32>) {
        let (h, d) = (self.hidden, self.head_dim);
        let stride = 3 * h;
        let tokens = *starts.last().unwrap_or(&0);
        context.clear();
        // Not zero-filled: every (sequence, head) task writes all of its block.
        context.reserve(tokens * h);
        let out = SharedOut(context.as_mut_ptr());
        let tasks: Vec<(usize, usize)> = (0..starts.len() - 1)
            .flat_map(|s| (0..self.heads).map(move |head| (s, head)))
            .collect();
        tasks.into_par_iter().for_each(|(s, head)| {
            let (start, len) = (starts[s], starts[s + 1] - starts[s]);
            let base = start * stride + head * d;
            let q = &qkv[base..];
            let k = &qkv[base + h..];
            let v = &qkv[base + 2 * h..];
            let mut scores = vec![0f32; len * len];
            let rows = |ptr: *const f32, cols| View::rows(ptr, len, cols, stride);
            // SAFETY: q, k and v are rows start..start+len of the (tokens, 3h)
            // `qkv`, and `scores` is len×len. Kᵀ is K's view with the strides
            // swapped.
            unsafe {
                matmul(
                    scores.as_mut_ptr(),
                    len,
                    rows(q.as_ptr(), d),
                    rows(k.as_ptr(), d).transposed(),
                );
            }
            scores.chunks_mut(len).for_each(softmax_in_place);
            // SAFETY: this task alone writes columns head·d..(head+1)·d of
            // rows start..start+len of `context` (tokens × h), which outlives
            // the parallel loop; `v` is read within `qkv` as above.
            unsafe {
                matmul(
                    out.at(start * h + head * d),
                    h,
                    View::rows(scores.as_ptr(), len, len, len),
                    rows(v.as_ptr(), d),
                );
            }
        });
        // SAFETY: the tasks cover every sequence's rows and every head's
        // columns, and each product above writes every element of its block.
        unsafe { context.set_len(tokens * h) };
    }
}

/// A matrix of f32s as gemm reads it: element (i, j) at
/// `ptr + i·row_stride + j·col_stride`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl View {
    /// Row-major rows `row_stride` apart.
    fn rows(ptr: *const f32, rows: usize, cols: usize, row_stride: usize) -> Self {
        View {
            ptr,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    fn transposed(self) -> Self {
        View {
            ptr: self.ptr,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// dst = lhs·rhs on the calling thread (each attention task is one rayon
/// task already), dst row-major with rows `dst_row_stride` apart; dst's old
/// contents are never read.
///
/// # Safety
/// Every element of both views and of the (lhs.rows, rhs.cols) destination
/// must lie in a live allocation, and the destination must not overlap
/// either view or be written by anyone else meanwhile.
unsafe fn matmul(dst: *mut f32, dst_row_stride: usize, lhs: View, rhs: View) {
    debug_assert_eq!(lhs.cols, rhs.rows);
    // SAFETY: the caller's contract is gemm's.
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
            dst,
            1,
            dst_row_stride as isize,
            false,
            lhs.ptr,
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr,
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            // dst = alpha·dst + beta·lhs·rhs; alpha is unused when dst is not read
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Loads query, key and value as one (3h, h) projection.
fn fused_qkv(vb: VarBuilder, h: usize, head_dim: usize) -> Result<Linear> {
    let part = |name: &str| -> Result<(Tensor, Tensor)> {
        let vb = vb.pp(name);
        Ok((vb.get((h, h), "weight")?, vb.get(h, "bias")?))
    };
    let (qw, qb) = part("query")?;
    let (kw, kb) = part("key")?;
    let (vw, vb_) = part("value")?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let weight = Tensor::cat(&[(qw * scale)?, kw, vw], 0)?;
    let bias = Tensor::cat(&[(qb * scale)?, kb, vb_], 0)?;
    linear_from(weight, bias)
}

fn flat(tensor: Tensor) -> Result<Vec<f32>> {
    Ok(tensor.flatten_all()?.to_vec1::<f32>()?)
}

/// Loads a linear layer stored as PyTorch does, weight (outputs, inputs).
fn linear(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Linear> {
    linear_from(
        vb.get((outputs, inputs), "weight")
            .context("dense weight")?,
        vb.get(outputs, "bias").context("dense bias")?,
    )
}

fn linear_from(weight: Tensor, bias: Tensor) -> Result<Linear> {
    let (outputs, inputs) = weight.dims2()?;
    let weight_t = flat(weight.t()?.contiguous()?)?;
    Ok(Linear::new(&weight_t, flat(bias)?, inputs, outputs))
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    eps: f32,
}

impl Norm {
    /// Reads `weight`/`bias`, or the older `gamma`/`beta` names.
    fn load(size: usize, eps: f32, vb: VarBuilder) -> Result<Self> {
        let pick = |names: [&str; 2]| -> Result<Vec<f32>> {
            let name = names
                .into_iter()
                .find(|name| vb.contains_tensor(name))
                .unwrap_or(names[0]);
            flat(vb.get(size, name)?)
        };
        Ok(Norm {
            gamma: pick(["weight", "gamma"])?,
            beta: pick(["bias", "beta"])?,
            eps,
        })
    }

    fn apply(&self, row: &mut [f32]) {
        layer_norm_in_place(row, &self.gamma, &self.beta, self.eps);
    }

    fn apply_rows(&self, x: &mut [f32]) {
        let width = self.gamma.len();
        x.par_chunks_mut(width)
            .with_min_len(rows_per_task(width))
            .for_each(|row| self.apply(row));
    }
}

/// How token vectors become one sentence vector, as the model directory's
/// `1_Pooling/config.json` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the sequence's tokens.
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
        }
    }

    /// Pools one sequence's token vectors (`width` wide, end to end) and
    /// L2-normalises, as sentence-transformers' Pooling + Normalize do.
    pub fn pool_normalised(self, tokens: &[f32], width: usize) -> Vec<f32> {
        let mut pooled = match self {
            Pooling::Mean => {
                let mut sum = vec![0f32; width];
                for row in tokens.chunks(width) {
                    sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                }
                let count = (tokens.len() / width).max(1) as f32;
                sum.iter_mut().for_each(|s| *s /= count);
                sum
            }
            Pooling::Cls => tokens[..width].to_vec(),
        };
        // The clamp mirrors F.normalize, so a zero vector stays zero rather
        // than turning into NaN.
        let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        pooled.iter_mut().for_each(|x| *x /= norm);
        pooled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes_normalise_what_they_pick() {
        // One sentence of two tokens.
        let tokens = [3f32, 4., 0., 2.];
        assert_eq!(Pooling::Cls.pool_normalised(&tokens, 2), vec![0.6, 0.8]);
        // mean of (3,4) and (0,2) = (1.5,3), norm 3.354...
        let mean = Pooling::Mean.pool_normalised(&tokens, 2);
        let n = (1.5f32 * 1.5 + 9.).sqrt();
        assert!((mean[0] - 1.5 / n).abs() < 1e-6 && (mean[1] - 3. / n).abs() < 1e-6);
        assert_eq!(Pooling::Mean.pool_normalised(&[0., 0.], 2), vec![0., 0.]);
    }
}
