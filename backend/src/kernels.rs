//! The element-wise parts of the encoder, each one pass over a row of f32s.
//!
//! They are our own rather than candle's because candle runs each step as a
//! separate op over a fresh tensor (bias add, residual add, layer norm,
//! GELU, masked softmax: one allocation and one pass over memory apiece) and
//! calls a scalar `erf` per element. Profiling the model path (batch of 32
//! short inputs) put those passes and their page faults at about a third of
//! the time, next to 44% in the matmul kernels. Written without branches or
//! libm calls, the loops below vectorise; `multiversion` compiles each
//! for the SIMD levels the CPU may have (AVX-512, AVX2) and picks one at
//! run time, where the crate's portable baseline would be SSE2. On the GELU,
//! that and an integer conversion done in bits (see `exp_neg`) took it from
//! 13% of a batch of 32 short inputs to 4% (perf samples).

use multiversion::multiversion;

/// The feed-forward activations BERT configs name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// GELU with the exact erf form, 0.5·x·(1 + erf(x/√2)).
    Gelu,
    /// GELU's tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    pub fn apply_in_place(self, values: &mut [f32]) {
        match self {
            Activation::Gelu => gelu_in_place(values),
            Activation::GeluTanh => gelu_tanh_in_place(values),
            Activation::Relu => values.iter_mut().for_each(|x| *x = x.max(0.0)),
        }
    }
}

#[multiversion(targets = "simd")]
fn gelu_in_place(values: &mut [f32]) {
    values.iter_mut().for_each(|x| *x = gelu(*x));
}

#[multiversion(targets = "simd")]
fn gelu_tanh_in_place(values: &mut [f32]) {
    values.iter_mut().for_each(|x| *x = gelu_tanh(*x));
}

/// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), with tanh(u) written as
/// 1 - 2/(e^(2u) + 1) over the polynomial exp below.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    // tanh is odd: work on |u| so exp's argument is never positive.
    let e = exp_neg(2.0 * u.abs());
    let tanh = ((1.0 - e) / (1.0 + e)).copysign(u);
    0.5 * x * (1.0 + tanh)
}

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, i.e. at
/// f32 resolution near 1).
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

/// Below e^-EXP_NEG_MAX (about 1.8e-35) the result is flushed to that
/// value: far under f32 resolution next to the terms it is summed with.
const EXP_NEG_MAX: f32 = 80.0;

/// e^(-y) for y ≥ 0: Cody-Waite range reduction to r in [-ln2/2, ln2/2] and
/// a degree-6 Taylor polynomial (relative error ~1e-7).
#[inline(always)]
fn exp_neg(y: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without
    // a call to roundf.
    const ROUND: f32 = 12_582_912.0;
    let z = -y.min(EXP_NEG_MAX);
    let shifted = z * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = z - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    // n, read from the low mantissa bits of `shifted` rather than by `as
    // i32` (a saturating conversion the compiler leaves scalar), is in
    // [-116, 0], so 2^n is a normal f32 built from its exponent bits.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    p * scale
}

/// Softmax of one row of attention scores, in place.
#[multiversion(targets = "simd")]
pub fn softmax_in_place(row: &mut [f32]) {
    let max = lane_max(row);
    row.iter_mut().for_each(|x| *x = exp_neg(max - *x));
    let inv = 1.0 / lane_sum(row);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Layer normalisation of one row, in place: zero mean, unit variance,
/// then scaled by `gamma` and shifted by `beta`.
#[multiversion(targets = "simd")]
pub fn layer_norm_in_place(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = lane_sum(row) / n;
    // Two passes (mean, then squared deviations) keep the variance accurate
    // where the mean is large next to the spread.
    row.iter_mut().for_each(|x| *x -= mean);
    let var = lane_sum_squares(row) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((x, g), b) in row.iter_mut().zip(gamma).zip(beta) {
        *x = *x * inv * g + b;
    }
}

/// Independent accumulators for reductions. A plain `sum()` over f32 is
/// one dependent chain of additions (the compiler may not reorder them),
/// which profiling showed as most of the softmax's time on long inputs.
const LANES: usize = 16;

#[inline(always)]
fn lane_reduce(
    values: &[f32],
    start: f32,
    step: impl Fn(f32, f32) -> f32,
    finish: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut acc = [start; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = step(*a, x);
        }
    }
    let tail = rest.iter().fold(start, |a, &x| step(a, x));
    acc.into_iter().fold(tail, finish)
}

#[inline(always)]
fn lane_sum(values: &[f32]) -> f32 {
    lane_reduce(values, 0.0, |a, x| a + x, |a, b| a + b)
}

#[inline(always)]
fn lane_sum_squares(values: &[f32]) -> f32 {
    lane_reduce(values, 0.0, |a, x| a + x * x, |a, b| a + b)
}

#[inline(always)]
fn lane_max(values: &[f32]) -> f32 {
    let max = |a: f32, b: f32| if b > a { b } else { a };
    lane_reduce(values, f32::NEG_INFINITY, max, max)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn activations_match_their_formulas() {
        let xs: Vec<f32> = (-800..=800).map(|i| i as f32 / 100.0).collect();
        let mut tanh = xs.clone();
        Activation::GeluTanh.apply_in_place(&mut tanh);
        let mut relu = xs.clone();
        Activation::Relu.apply_in_place(&mut relu);
        for ((x, t), r) in xs.iter().zip(&tanh).zip(&relu) {
            let x64 = *x as f64;
            let want = 0.5
                * x64
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3)))
                        .tanh());
            assert!(
                (*t as f64 - want).abs() < 1e-5 * want.abs().max(1.0),
                "{x}: {t} vs {want}"
            );
            assert_eq!(*r, x.max(0.0));
        }
    }

    #[test]
    fn exp_neg_is_accurate() {
        for i in 0..=8000 {
            let y = i as f32 / 100.0;
            let exact = (-(y as f64)).exp();
            let rel = ((exp_neg(y) as f64 - exact) / exact).abs();
            assert!(rel < 5e-7, "e^-{y}: relative error {rel}");
        }
        assert!(exp_neg(1e4) > 0.0 && exp_neg(1e4) < 1e-34);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut row = [1.0f32, 3.0, -200.0, 2.0];
        softmax_in_place(&mut row);
        let exact: Vec<f64> = [1.0f64, 3.0, -200.0, 2.0].iter().map(|x| x.exp()).collect();
        let total: f64 = exact.iter().sum();
        for (got, want) in row.iter().zip(&exact) {
            assert!((*got as f64 - want / total).abs() < 1e-6, "{row:?}");
        }
    }

    #[test]
    fn lane_reductions_cover_every_element() {
        for len in [0, 1, 15, 16, 17, 40] {
            let values: Vec<f32> = (0..len).map(|i| (i as f32 - 7.0) * 0.5).collect();
            let sum: f32 = values.iter().sum();
            let squares: f32 = values.iter().map(|x| x * x).sum();
            assert!((lane_sum(&values) - sum).abs() < 1e-4, "{len}");
            assert!((lane_sum_squares(&values) - squares).abs() < 1e-3, "{len}");
            let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(lane_max(&values), max, "{len}");
        }
    }

    #[test]
    fn layer_norm_centres_and_scales() {
        let mut row = [1000.0f32, 1001.0, 1002.0, 1003.0];
        layer_norm_in_place(&mut row, &[2.0; 4], &[0.5; 4], 1e-12);
        // mean 1001.5, variance 1.25
        let sd = 1.25f32.sqrt();
        for (got, x) in row.iter().zip([1000.0f32, 1001.0, 1002.0, 1003.0]) {
            let want = (x - 1001.5) / sd * 2.0 + 0.5;
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
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
