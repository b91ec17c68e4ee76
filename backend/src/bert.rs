//! A BERT encoder for inference on the CPU, reading the same weights and
//! config.json as candle-transformers' `BertModel` but laid out for speed:
//!
//! - query, key and value are one fused matmul, with the 1/sqrt(head_dim)
//!   attention scale folded into the query weights at load time;
//! - weights are stored transposed, which halved the time of a one-input
//!   batch (gemm no longer repacks them on every call);
//! - softmax and layer norm use candle's fused last-dimension kernels;
//! - the exact (erf) GELU runs as a vectorisable kernel split across the
//!   inference pool. candle's version calls a scalar erf per element, which
//!   profiling showed as a large share of a long batch.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

pub struct Bert {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    activation: HiddenAct,
}

struct Layer {
    qkv: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
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
        if !h.is_multiple_of(config.num_attention_heads) {
            candle_core::bail!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                config.num_attention_heads
            );
        }
        let head_dim = h / config.num_attention_heads;
        let norm = |vb: VarBuilder| layer_norm(h, config.layer_norm_eps, vb.pp("LayerNorm"));
        let embeddings = vb.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attention = vb.pp("attention");
                Ok(Layer {
                    qkv: fused_qkv(attention.pp("self"), h, head_dim)?,
                    attention_out: Dense::load(h, h, attention.pp("output.dense"))?,
                    attention_norm: norm(attention.pp("output"))?,
                    intermediate: Dense::load(
                        h,
                        config.intermediate_size,
                        vb.pp("intermediate.dense"),
                    )?,
                    output: Dense::load(config.intermediate_size, h, vb.pp("output.dense"))?,
                    output_norm: norm(vb.pp("output"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            word_embeddings: embedding(config.vocab_size, h, embeddings.pp("word_embeddings"))?,
            position_embeddings: embedding(
                config.max_position_embeddings,
                h,
                embeddings.pp("position_embeddings"),
            )?,
            token_type_embeddings: embedding(
                config.type_vocab_size,
                h,
                embeddings.pp("token_type_embeddings"),
            )?,
            embeddings_norm: norm(embeddings)?,
            layers,
            heads: config.num_attention_heads,
            head_dim,
            activation: config.hidden_act,
        })
    }

    /// `ids` and `type_ids` are (batch, seq) u32; `mask` is (batch, seq) f32
    /// with 1 for real tokens and 0 for padding. Returns (batch, seq, hidden).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let x = self
            .word_embeddings
            .forward(ids)?
            .add(&self.token_type_embeddings.forward(type_ids)?)?
            .broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        let mut x = self.embeddings_norm.forward(&x)?;

        // 0 where attention is allowed, a huge negative number on padding,
        // so padded keys get exactly zero weight after the softmax.
        let mask = ((mask - 1.0)? * 1e30)?.reshape((batch, 1, 1, seq))?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &mask)?;
        }
        Ok(x)
    }

    fn layer(&self, layer: &Layer, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, seq, hidden) = x.dims3()?;
        let qkv = layer
            .qkv
            .forward(x)?
            .reshape((batch, seq, 3, self.heads, self.head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, seq, hidden))?;
        let attended = layer
            .attention_norm
            .forward(&layer.attention_out.forward(&context)?.add(x)?)?;

        let inner = layer.intermediate.forward(&attended)?;
        let inner = match self.activation {
            HiddenAct::Gelu => inner.apply_op1_no_bwd(&GeluErf)?,
            HiddenAct::GeluApproximate => inner.gelu()?,
            HiddenAct::Relu => inner.relu()?,
        };
        layer
            .output_norm
            .forward(&layer.output.forward(&inner)?.add(&attended)?)
    }
}

/// Loads query, key and value as one (3h, h) projection.
fn fused_qkv(vb: VarBuilder, h: usize, head_dim: usize) -> Result<Dense> {
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
    Dense::new(weight, bias)
}

/// A linear layer that keeps its weight transposed to (in, out) row-major,
/// the layout gemm reads without repacking for small batches.
struct Dense {
    weight_t: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        Ok(Dense {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    fn load(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(
            vb.get((outputs, inputs), "weight")?,
            vb.get(outputs, "bias")?,
        )
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, seq, inputs) = x.dims3()?;
        x.reshape((batch * seq, inputs))?
            .matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?
            .reshape((batch, seq, ()))
    }
}

/// GELU with the exact erf form, 0.5·x·(1 + erf(x/√2)).
struct GeluErf;

/// Elements per parallel task: enough to amortise the hand-off.
const GELU_CHUNK: usize = 16 * 1024;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-fast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("gelu-erf-fast supports f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-erf-fast needs a contiguous input");
        };
        let src = &data[start..end];
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(GELU_CHUNK)
            .zip(src.par_chunks(GELU_CHUNK))
            .for_each(|(out, input)| {
                for (o, &x) in out.iter_mut().zip(input) {
                    *o = gelu(x);
                }
            });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, i.e. at
/// f32 resolution near 1), written without branches or libm calls so the
/// compiler can vectorise the loop above.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    // Past 4, erf is 1 in f32; clamping keeps exp's argument in range.
    let a = x.abs().min(4.0);
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * exp_neg(a * a)).copysign(x)
}

/// e^(-y) for y in [0, 16]: Cody-Waite range reduction to r in
/// [-ln2/2, ln2/2] and a degree-6 Taylor polynomial (relative error ~1e-7).
#[inline(always)]
fn exp_neg(y: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without
    // a call to roundf.
    const ROUND: f32 = 12_582_912.0;
    let z = -y;
    let n = (z * LOG2E + ROUND) - ROUND;
    let r = z - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// How token vectors become one sentence vector, as the model directory's
/// `1_Pooling/config.json` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over real tokens (padding masked out).
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

    /// Pools `hidden` (batch, seq, dim) and L2-normalises, as
    /// sentence-transformers' Pooling + Normalize do. `mask` is (batch, seq)
    /// f32.
    pub fn pool_normalised(self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let pooled = match self {
            Pooling::Mean => {
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                // The clamps mirror sentence-transformers (mean pooling,
                // F.normalize) so degenerate inputs give zeros rather than NaN.
                let counts = mask.sum(1)?.maximum(1e-9)?;
                summed.broadcast_div(&counts)?
            }
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let norms = pooled
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .maximum(1e-12)?;
        pooled.broadcast_div(&norms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes_normalise_what_they_pick() {
        let dev = candle_core::Device::Cpu;
        // One sentence, two real tokens and one padding token.
        let hidden = Tensor::new(&[[[3f32, 4.], [0., 2.], [100., 100.]]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 0.]], &dev).unwrap();
        let pooled = |p: Pooling| {
            p.pool_normalised(&hidden, &mask)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        assert_eq!(pooled(Pooling::Cls), vec![vec![0.6, 0.8]]);
        // mean of (3,4) and (0,2) = (1.5,3), norm 3.354...; padding ignored
        let mean = pooled(Pooling::Mean);
        let n = (1.5f32 * 1.5 + 9.).sqrt();
        assert!((mean[0][0] - 1.5 / n).abs() < 1e-6 && (mean[0][1] - 3. / n).abs() < 1e-6);
    }

    #[test]
    fn fast_gelu_matches_the_exact_one() {
        let mut worst = 0f32;
        for i in -20_000..=20_000 {
            let x = i as f32 / 1000.0;
            let exact = (0.5 * x as f64 * (1.0 + libm_erf(x as f64 / 2f64.sqrt()))) as f32;
            worst = worst.max((gelu(x) - exact).abs() / exact.abs().max(1.0));
        }
        assert!(worst < 1e-6, "worst error {worst}");
    }

    #[test]
    fn exp_neg_is_accurate() {
        for i in 0..=1600 {
            let y = i as f32 / 100.0;
            let exact = (-(y as f64)).exp();
            let rel = ((exp_neg(y) as f64 - exact) / exact).abs();
            assert!(rel < 5e-7, "e^-{y}: relative error {rel}");
        }
    }

    /// A slow but precise reference: erf by its Taylor series (fine for
    /// |x| < 3) and the continued fraction of erfc beyond.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let value = if a < 3.0 {
            let mut term = a;
            let mut sum = a;
            for n in 1..200 {
                term *= -a * a / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * (a + f))
        };
        value.copysign(x)
    }
}
