//! The judge of one analysis window: the canary's traffic against the
//! baseline's, taken in the same seconds, gives one [`Verdict`].
//!
//! Six checks, each [`Outcome::Pass`], [`Outcome::Fail`] or
//! [`Outcome::Inconclusive`]:
//! - `error_rate_ceiling`: the canary's error rate against the absolute
//!   ceiling;
//! - `error_rate_vs_baseline`: a one-sided two-proportion z-test, canary
//!   worse than baseline;
//! - `latency_p99_ratio`: canary p99 over baseline p99, failing only when
//!   a one-sided binomial test also finds significantly more than 1 % of
//!   the canary's durations past the bound times the baseline's p99;
//! - `latency_shift`: a one-sided Mann–Whitney U test on the duration
//!   samples, failing only when the Hodges–Lehmann shift is also
//!   practically large;
//! - `readiness` and `queue_depth`: the backends' own reports.
//!
//! The window fails when any check fails. Otherwise it is inconclusive when
//! any check lacked evidence (an arm under `min_requests`, so a trickle of
//! traffic never promotes), and passes only when every check passed. The
//! ceiling needs only the canary's evidence, so a bad canary fails even
//! while the baseline is too quiet to compare against. The backends'
//! reports are optional: without them those two checks pass.
//!
//! # Repeated looks
//!
//! A rollout judges many windows, and each is a fresh chance for a
//! statistical test to fire on chance alone. Three tests at α = 0.01 over
//! twelve windows give two identical builds a 1 − 0.99³⁶ ≈ 30 % chance of at
//! least one failing window: enough to stall promotions and, with bad luck
//! twice in a row, to roll back a healthy build.
//!
//! So each test runs at α / (3 · `looks`) (Bonferroni over the three tests
//! and every look; see [`Policy::alpha_per_look`]). When the arms are identical,
//! a window then fails a statistical check with probability at most
//! α / `looks`, and a rollout of at most `looks` windows sees such a failure
//! at all with probability at most α, by the union bound. A rollback needs
//! `max_failed_checks` failing windows in a row, which cannot happen without
//! at least one, so the false-rollback rate the tests cause is at most α
//! too. The union bound holds however the windows are correlated, and they
//! are: the same backends serve every window. Bonferroni rather than Šidák
//! for that reason: Šidák's guarantee needs independence, and its per-test
//! α would be under 1 % larger anyway. Were the windows independent, the rate would be far
//! lower still, about (`looks` − k + 1) · (α / `looks`)^k for
//! k = `max_failed_checks`; the documented bound does not rely on it.
//!
//! What the bound does not cover: the thresholds (ceiling, the backends'
//! reports) have no α; on identical arms they fire only when the
//! fleet itself is past them. And a rollout that judges more than `looks`
//! windows spends another α / `looks` on each extra one.

use std::f64::consts::SQRT_2;

use serde::{Deserialize, Serialize};

/// One arm's traffic in one analysis window.
#[derive(Debug, Clone, Default)]
pub struct Arm {
    /// Requests finished in the window, failed ones included.
    pub requests: u64,
    /// 5xx answers, connect failures and timeouts (what a client sees as a failure).
    pub errors: u64,
    /// A bounded uniform sample of request durations in milliseconds
    /// (reservoir, at most ~2000).
    pub durations_ms: Vec<f64>,
    /// Readiness checks in the window, and how many said not ready (flaps).
    pub readiness_checks: u32,
    pub not_ready_checks: u32,
    /// Mean reported queue depth over the window (0 when no reports).
    pub queue_depth_mean: f64,
    /// Output agreement (canary arm only): mirrored pairs compared, how
    /// many fell below `Policy::min_cosine`, and the lowest cosine seen.
    pub agreement_pairs: u32,
    pub agreement_below: u32,
    pub agreement_min: f64,
}

/// What a window is judged against.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Requests per arm; fewer on either arm makes the comparisons
    /// inconclusive (and on the canary, the ceiling too).
    pub min_requests: u64,
    /// Absolute ceiling on the canary's error rate.
    pub max_error_rate: f64,
    /// Ceiling on canary p99 over baseline p99.
    pub max_latency_ratio: f64,
    /// One-sided α for the three statistical tests over the whole rollout
    /// (default 0.01); see [`Policy::alpha_per_look`].
    pub significance: f64,
    /// How many windows a rollout may judge: the number of looks the
    /// significance is shared between.
    pub looks: u32,
    /// Output agreement's bound, when the rollout compares answers.
    pub min_cosine: Option<f64>,
}

impl Policy {
    /// The α each statistical test uses in one window: `significance`
    /// shared between the three tests and every look (Bonferroni).
    pub fn alpha_per_look(&self) -> f64 {
        self.significance / (f64::from(STATISTICAL_TESTS) * f64::from(self.looks.max(1)))
    }

    /// `min_requests`, at least 1 so that a rate always has a denominator.
    fn min_requests(&self) -> u64 {
        self.min_requests.max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Inconclusive,
}

/// One check's result. An inconclusive check's `value` is what the arm
/// short of evidence had (requests, or sampled durations) and its `bound`
/// what it needed.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    /// What was measured, in the unit of `bound` (each check says which).
    pub value: f64,
    /// The limit `value` was held against.
    pub bound: f64,
    /// One line for the log and the admin API.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub outcome: Outcome,
    pub checks: Vec<Check>,
}

/// The tests sharing `significance`: `error_rate_vs_baseline`,
/// `latency_shift` and the tail test of `latency_p99_ratio`.
const STATISTICAL_TESTS: u32 = 3;

/// The share of a canary's durations that may lie past the limit
/// (`max_latency_ratio` × the baseline's p99) when the canary's own p99 is
/// at or under that limit: at most 1 %, by the definition of a p99.
const TAIL_SHARE: f64 = 0.01;

/// The smallest latency shift that counts, as a fraction of the baseline's
/// median. 25 % is the tolerance Kayenta's Mann–Whitney classifier uses by
/// default. With a few thousand samples the test finds shifts of a few
/// percent, well inside what a healthy deploy varies by (warm-up, cache
/// fill, another host), so significance alone would roll back good builds.
const SHIFT_TOLERANCE: f64 = 0.25;

/// Each arm's sample is thinned to this many values for the Hodges–Lehmann
/// estimate: 500 × 500 differences bound its work and memory.
const SHIFT_SAMPLE: usize = 500;

/// Durations under this count as this in the p99 ratio: a ratio of two
/// sub-millisecond figures is timer noise, not a regression.
const LATENCY_FLOOR_MS: f64 = 1.0;

/// The canary's not-ready fraction must exceed the baseline's by this much,
/// over at least `READINESS_MIN_FLAPS` not-ready answers, to fail: one
/// flap is a blip, not a pattern.
const READINESS_MARGIN: f64 = 0.2;
const READINESS_MIN_FLAPS: u32 = 2;

/// The canary's mean queue depth fails above `QUEUE_FACTOR` × the
/// baseline's + `QUEUE_SLACK`. A window's mean smooths out bursts, so
/// exceeding it means the canary stayed behind; the slack keeps an idle
/// baseline (depth 0) from turning one queued request into a failure.
const QUEUE_FACTOR: f64 = 2.0;
const QUEUE_SLACK: f64 = 1.0;

/// Judges one window of `canary` against `baseline`.
pub fn judge(baseline: &Arm, canary: &Arm, policy: &Policy) -> Verdict {
    let window = Window::new(baseline, canary, policy);
    let checks = vec![
        error_rate_ceiling(&window),
        error_rate_vs_baseline(&window),
        latency_p99_ratio(&window),
        latency_shift(&window),
        readiness(&window),
        queue_depth(&window),
        agreement(&window),
    ];
    let has = |o| checks.iter().any(|c| c.outcome == o);
    let outcome = if has(Outcome::Fail) {
        Outcome::Fail
    } else if has(Outcome::Inconclusive) {
        Outcome::Inconclusive
    } else {
        Outcome::Pass
    };
    Verdict { outcome, checks }
}

/// One window's inputs, with each arm's finite durations sorted once for
/// the latency checks (a NaN would stall the rank merge).
struct Window<'a> {
    baseline: &'a Arm,
    canary: &'a Arm,
    policy: &'a Policy,
    baseline_ms: Vec<f64>,
    canary_ms: Vec<f64>,
}

impl<'a> Window<'a> {
    fn new(baseline: &'a Arm, canary: &'a Arm, policy: &'a Policy) -> Self {
        let sorted = |arm: &Arm| {
            let mut v: Vec<f64> = arm
                .durations_ms
                .iter()
                .copied()
                .filter(|d| d.is_finite())
                .collect();
            v.sort_unstable_by(f64::total_cmp);
            v
        };
        Window {
            baseline_ms: sorted(baseline),
            canary_ms: sorted(canary),
            baseline,
            canary,
            policy,
        }
    }

    /// The inconclusive `name` check when the canary (or, with
    /// `both`, either arm) has fewer than `min_requests`.
    fn short_of_requests(&self, name: &'static str, both: bool) -> Option<Check> {
        let need = self.policy.min_requests();
        let (arm, count) = if self.canary.requests < need {
            ("canary", self.canary.requests)
        } else if both && self.baseline.requests < need {
            ("baseline", self.baseline.requests)
        } else {
            return None;
        };
        Some(Check {
            name,
            outcome: Outcome::Inconclusive,
            value: count as f64,
            bound: need as f64,
            detail: format!("{arm} had {count} requests, fewer than {need}"),
        })
    }

    /// Like [`Self::short_of_requests`] for both arms, and also inconclusive
    /// when either arm has no duration sample.
    fn short_of_durations(&self, name: &'static str) -> Option<Check> {
        self.short_of_requests(name, true).or_else(|| {
            let empty = [("canary", &self.canary_ms), ("baseline", &self.baseline_ms)]
                .into_iter()
                .find(|(_, v)| v.is_empty())?;
            Some(Check {
                name,
                outcome: Outcome::Inconclusive,
                value: 0.0,
                bound: 1.0,
                detail: format!("no durations sampled on the {}", empty.0),
            })
        })
    }
}

fn outcome(failed: bool) -> Outcome {
    if failed {
        Outcome::Fail
    } else {
        Outcome::Pass
    }
}

/// Errors over requests, errors capped at requests.
fn error_rate(arm: &Arm) -> f64 {
    arm.errors.min(arm.requests) as f64 / arm.requests as f64
}

/// `value`: the canary's error rate; `bound`: `max_error_rate`.
fn error_rate_ceiling(w: &Window) -> Check {
    const NAME: &str = "error_rate_ceiling";
    if let Some(check) = w.short_of_requests(NAME, false) {
        return check;
    }
    let rate = error_rate(w.canary);
    let bound = w.policy.max_error_rate;
    Check {
        name: NAME,
        outcome: outcome(rate > bound),
        value: rate,
        bound,
        detail: format!(
            "canary {:.2}% ({} of {}), ceiling {:.2}%",
            rate * 100.0,
            w.canary.errors,
            w.canary.requests,
            bound * 100.0
        ),
    }
}

/// `value`: the test's one-sided p-value; `bound`: the per-look α.
fn error_rate_vs_baseline(w: &Window) -> Check {
    const NAME: &str = "error_rate_vs_baseline";
    if let Some(check) = w.short_of_requests(NAME, true) {
        return check;
    }
    let p = two_proportion_p(w.baseline, w.canary);
    let alpha = w.policy.alpha_per_look();
    Check {
        name: NAME,
        outcome: outcome(p < alpha),
        value: p,
        bound: alpha,
        detail: format!(
            "canary {:.2}% vs baseline {:.2}%: one-sided p = {p:.2e}, alpha {alpha:.2e}",
            error_rate(w.canary) * 100.0,
            error_rate(w.baseline) * 100.0
        ),
    }
}

/// `value`: canary p99 over baseline p99; `bound`: `max_latency_ratio`.
/// Fails only when the ratio is over the bound **and** the canary has
/// significantly more than 1 % of its durations past bound × the
/// baseline's p99. The second condition is there because a p99 of a few
/// hundred samples is their third or fourth largest: one scheduling stall
/// that holds a few concurrent requests moves it by the stall's length
/// (a CI run saw 11.2 ms against 4.4 ms on two identical upstreams).
fn latency_p99_ratio(w: &Window) -> Check {
    const NAME: &str = "latency_p99_ratio";
    if let Some(check) = w.short_of_durations(NAME) {
        return check;
    }
    let (b, c) = (quantile(&w.baseline_ms, 0.99), quantile(&w.canary_ms, 0.99));
    let ratio = c.max(LATENCY_FLOOR_MS) / b.max(LATENCY_FLOOR_MS);
    let bound = w.policy.max_latency_ratio;
    let limit = bound * b.max(LATENCY_FLOOR_MS);
    let past = w.canary_ms.iter().rev().take_while(|&&d| d > limit).count();
    let p = binomial_upper_tail(w.canary_ms.len(), past, TAIL_SHARE);
    let alpha = w.policy.alpha_per_look();
    Check {
        name: NAME,
        outcome: outcome(ratio > bound && p < alpha),
        value: ratio,
        bound,
        detail: format!(
            "p99 canary {c:.1} ms, baseline {b:.1} ms; {past} of {} canary durations over \
             {limit:.1} ms: one-sided p = {p:.2e}, alpha {alpha:.2e}",
            w.canary_ms.len()
        ),
    }
}

/// `value`: the Hodges–Lehmann shift in ms; `bound`: the tolerance in ms.
/// Fails only when the shift is both significant and beyond the tolerance.
fn latency_shift(w: &Window) -> Check {
    const NAME: &str = "latency_shift";
    if let Some(check) = w.short_of_durations(NAME) {
        return check;
    }
    let p = mann_whitney_p(&w.baseline_ms, &w.canary_ms);
    let alpha = w.policy.alpha_per_look();
    let shift = hodges_lehmann(&w.baseline_ms, &w.canary_ms);
    let median = quantile(&w.baseline_ms, 0.5);
    let tolerance = SHIFT_TOLERANCE * median;
    Check {
        name: NAME,
        outcome: outcome(p < alpha && shift > tolerance),
        value: shift,
        bound: tolerance,
        detail: format!(
            "shift {shift:.1} ms, tolerance {tolerance:.1} ms ({:.0}% of the baseline median \
             {median:.1} ms); Mann-Whitney one-sided p = {p:.2e}, alpha {alpha:.2e}",
            SHIFT_TOLERANCE * 100.0
        ),
    }
}

/// `value`: the canary's not-ready fraction; `bound`: the baseline's plus
/// the margin.
fn readiness(w: &Window) -> Check {
    let not_ready = |arm: &Arm| arm.not_ready_checks.min(arm.readiness_checks);
    let fraction = |arm: &Arm| match arm.readiness_checks {
        0 => 0.0,
        n => f64::from(not_ready(arm)) / f64::from(n),
    };
    let value = fraction(w.canary);
    let bound = fraction(w.baseline) + READINESS_MARGIN;
    Check {
        name: "readiness",
        outcome: outcome(not_ready(w.canary) >= READINESS_MIN_FLAPS && value > bound),
        value,
        bound,
        detail: format!(
            "not ready: canary {} of {}, baseline {} of {}",
            not_ready(w.canary),
            w.canary.readiness_checks,
            not_ready(w.baseline),
            w.baseline.readiness_checks
        ),
    }
}

/// `value`: the canary's mean queue depth; `bound`: twice the baseline's
/// plus one.
fn queue_depth(w: &Window) -> Check {
    let value = w.canary.queue_depth_mean;
    let bound = QUEUE_FACTOR * w.baseline.queue_depth_mean + QUEUE_SLACK;
    Check {
        name: "queue_depth",
        outcome: outcome(value > bound),
        value,
        bound,
        detail: format!(
            "mean queue depth: canary {value:.1}, baseline {:.1}",
            w.baseline.queue_depth_mean
        ),
    }
}

/// Output agreement: one mirrored pair whose embeddings disagree past
/// `min_cosine` fails the window (the same model answers the same input
/// with a cosine of 1 to about 1e-6). No pair sampled is no evidence
/// against the canary; the traffic checks still need theirs.
fn agreement(w: &Window) -> Check {
    let c = w.canary;
    let bound = w.policy.min_cosine.unwrap_or(0.0);
    let checked = w.policy.min_cosine.is_some() && c.agreement_pairs > 0;
    Check {
        name: "agreement",
        outcome: outcome(checked && c.agreement_below > 0),
        value: if checked { c.agreement_min } else { 1.0 },
        bound,
        detail: format!(
            "{} of {} mirrored pairs below cosine {bound}, lowest {:.6}",
            c.agreement_below, c.agreement_pairs, c.agreement_min
        ),
    }
}

/// P(Z > z) for a standard normal Z. libm's `erfc` (the fdlibm algorithm)
/// is accurate to under one unit in the last place, far below what an
/// α of 1e-4 needs.
fn upper_tail(z: f64) -> f64 {
    0.5 * libm::erfc(z / SQRT_2)
}

/// P(K ≥ k) for K ~ Binomial(n, p), 0 < p < 1. Each side of the mean is
/// summed away from it, starting from a probability taken from log-gamma:
/// above the mean, P(K = k) upward; at or below it, 1 − P(K < k), with
/// P(K = k − 1) downward. A starting term that underflows then means its
/// whole sum is below f64's range, so the answer is never a false zero
/// (nor a false one).
fn binomial_upper_tail(n: usize, k: usize, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    let odds = p / (1.0 - p);
    if k as f64 > n as f64 * p {
        let mut term = binomial_pmf(n, k, p);
        let mut tail = 0.0;
        for i in k..=n {
            tail += term;
            term *= (n - i) as f64 / (i + 1) as f64 * odds;
        }
        return tail.min(1.0);
    }
    let mut term = binomial_pmf(n, k - 1, p);
    let mut below = 0.0;
    for i in (0..k).rev() {
        below += term;
        term *= i as f64 / (n - i + 1) as f64 / odds;
    }
    (1.0 - below).max(0.0)
}

/// P(K = k) for K ~ Binomial(n, p), k ≤ n, from log-gamma, so no power of
/// (1 − p) underflows where the probability itself does not.
fn binomial_pmf(n: usize, k: usize, p: f64) -> f64 {
    let (nf, kf) = (n as f64, k as f64);
    let ln_choose = libm::lgamma(nf + 1.0) - libm::lgamma(kf + 1.0) - libm::lgamma(nf - kf + 1.0);
    (ln_choose + kf * p.ln() + (nf - kf) * (1.0 - p).ln()).exp()
}

/// One-sided p-value that the canary's error rate exceeds the baseline's:
/// the pooled two-proportion z-test with Yates's continuity correction.
/// The correction keeps small counts honest: 3 errors in 100 against 0 in
/// 100 gives p ≈ 0.12 (Fisher's exact test: 0.12) instead of 0.04. No
/// errors (or only errors) on both arms is no evidence: p = 1.
fn two_proportion_p(baseline: &Arm, canary: &Arm) -> f64 {
    let (nb, nc) = (baseline.requests as f64, canary.requests as f64);
    let errors =
        (baseline.errors.min(baseline.requests) + canary.errors.min(canary.requests)) as f64;
    let pooled = errors / (nb + nc);
    if pooled <= 0.0 || pooled >= 1.0 {
        return 1.0;
    }
    let diff = error_rate(canary) - error_rate(baseline) - 0.5 * (1.0 / nb + 1.0 / nc);
    let se = (pooled * (1.0 - pooled) * (1.0 / nb + 1.0 / nc)).sqrt();
    upper_tail(diff / se)
}

/// One-sided p-value that the canary's durations are stochastically larger:
/// Mann–Whitney U with average ranks for ties, the normal approximation
/// with the tie-corrected variance and a continuity correction. Takes both
/// samples sorted, non-empty and finite. All values equal: p = 1.
fn mann_whitney_p(baseline: &[f64], canary: &[f64]) -> f64 {
    let (n1, n2) = (baseline.len() as f64, canary.len() as f64);
    let n = n1 + n2;
    let (mut i, mut j) = (0, 0);
    let (mut ranked, mut canary_ranks, mut ties) = (0.0, 0.0, 0.0);
    // Merge the sorted samples one group of equal values at a time.
    loop {
        let v = match (baseline.get(i), canary.get(j)) {
            (Some(&b), Some(&c)) => b.min(c),
            (Some(&b), None) => b,
            (None, Some(&c)) => c,
            (None, None) => break,
        };
        let from_b = baseline[i..].iter().take_while(|&&x| x == v).count();
        let from_c = canary[j..].iter().take_while(|&&x| x == v).count();
        let t = (from_b + from_c) as f64;
        canary_ranks += from_c as f64 * (ranked + (t + 1.0) / 2.0);
        ties += t * t * t - t;
        ranked += t;
        (i, j) = (i + from_b, j + from_c);
    }
    let u = canary_ranks - n2 * (n2 + 1.0) / 2.0;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 {
        return 1.0;
    }
    upper_tail((u - n1 * n2 / 2.0 - 0.5) / variance.sqrt())
}

/// The Hodges–Lehmann shift, canary − baseline: the median of pairwise
/// differences, over evenly spaced order statistics of each sorted sample
/// (at most `SHIFT_SAMPLE` each), so the result is deterministic.
fn hodges_lehmann(baseline: &[f64], canary: &[f64]) -> f64 {
    let b = thin(baseline);
    let mut diffs: Vec<f64> = thin(canary)
        .iter()
        .flat_map(|c| b.iter().map(move |x| c - x))
        .collect();
    let k = rank_index(diffs.len(), 0.5);
    *diffs.select_nth_unstable_by(k, f64::total_cmp).1
}

/// At most `SHIFT_SAMPLE` values of `sorted`, one from the middle of each
/// of as many equal slices.
fn thin(sorted: &[f64]) -> Vec<f64> {
    let (n, m) = (sorted.len(), SHIFT_SAMPLE);
    if n <= m {
        return sorted.to_vec();
    }
    (0..m).map(|i| sorted[(2 * i + 1) * n / (2 * m)]).collect()
}

/// The `q` quantile of a sorted, non-empty sample by nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[rank_index(sorted.len(), q)]
}

/// The index of the nearest-rank `q` quantile among `n > 0` sorted values:
/// the smallest with at least q·n values at or below it.
fn rank_index(n: usize, q: f64) -> usize {
    ((q * n as f64).ceil() as usize).clamp(1, n) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marsaglia's xorshift64: a fixed seed gives the same samples on every run.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// Uniform in [0, 1).
        fn uniform(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }

        fn bernoulli(&mut self, p: f64) -> bool {
            self.uniform() < p
        }

        /// Log-normal durations, the usual shape of service latency
        /// (Box–Muller for the normal).
        fn duration_ms(&mut self, median: f64, sigma: f64) -> f64 {
            let (u1, u2) = (1.0 - self.uniform(), self.uniform());
            let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            median * (sigma * normal).exp()
        }
    }

    /// A window of `requests` with error probability `error_p` and
    /// log-normal durations around `median_ms`; occasional readiness flaps
    /// and a queue depth of 2–4, as a healthy pool reports.
    fn arm(rng: &mut XorShift, requests: u64, error_p: f64, median_ms: f64) -> Arm {
        Arm {
            requests,
            errors: (0..requests).filter(|_| rng.bernoulli(error_p)).count() as u64,
            durations_ms: (0..requests.min(2000))
                .map(|_| rng.duration_ms(median_ms, 0.5))
                .collect(),
            readiness_checks: 10,
            not_ready_checks: (0..10).filter(|_| rng.bernoulli(0.01)).count() as u32,
            queue_depth_mean: 2.0 + 2.0 * rng.uniform(),
            ..Arm::default()
        }
    }

    #[test]
    fn one_disagreeing_pair_fails_the_window_and_none_sampled_does_not() {
        let base = arm(&mut XorShift(11), 1000, 0.01, 50.0);
        let compared = |pairs, below, min_cosine| {
            let canary = Arm {
                agreement_pairs: pairs,
                agreement_below: below,
                agreement_min: if below > 0 { 0.93 } else { 0.999_999 },
                ..base.clone()
            };
            let policy = Policy {
                min_cosine,
                ..policy(1)
            };
            outcome_of("agreement", &base, &canary, &policy)
        };
        assert_eq!(compared(5, 1, Some(0.999)), Outcome::Fail);
        assert_eq!(compared(5, 0, Some(0.999)), Outcome::Pass);
        assert_eq!(compared(0, 0, Some(0.999)), Outcome::Pass);
        assert_eq!(compared(5, 1, None), Outcome::Pass, "not configured");
    }

    fn policy(looks: u32) -> Policy {
        Policy {
            min_requests: 100,
            max_error_rate: 0.05,
            max_latency_ratio: 1.5,
            significance: 0.01,
            looks,
            min_cosine: None,
        }
    }

    fn check<'a>(verdict: &'a Verdict, name: &str) -> &'a Check {
        verdict
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name} in {verdict:?}"))
    }

    /// The outcome of check `name` in one window.
    fn outcome_of(name: &str, baseline: &Arm, canary: &Arm, policy: &Policy) -> Outcome {
        check(&judge(baseline, canary, policy), name).outcome
    }

    /// The outcome of check `name` in a window of `arm(b)` against
    /// `arm(c)`, for each pair `(b, c)`.
    fn outcomes<T, const N: usize>(
        name: &str,
        arm: impl Fn(T) -> Arm,
        pairs: [(T, T); N],
    ) -> [Outcome; N] {
        pairs.map(|(b, c)| outcome_of(name, &arm(b), &arm(c), &policy(1)))
    }

    fn strict_ceiling() -> Policy {
        Policy {
            max_error_rate: 0.01,
            ..policy(1)
        }
    }

    /// The window's outcome, the ceiling's and the comparison's.
    fn error_outcomes(verdict: &Verdict) -> (Outcome, Outcome, Outcome) {
        let outcome = |name| check(verdict, name).outcome;
        (
            verdict.outcome,
            outcome("error_rate_ceiling"),
            outcome("error_rate_vs_baseline"),
        )
    }

    fn counts(requests: u64, errors: u64) -> Arm {
        Arm {
            requests,
            errors,
            durations_ms: vec![50.0; 10],
            ..Arm::default()
        }
    }

    #[test]
    fn identical_arms_pass_every_check() {
        let a = arm(&mut XorShift(7), 1000, 0.01, 50.0);
        let verdict = judge(&a, &a, &policy(1));
        for c in &verdict.checks {
            assert_eq!(c.outcome, Outcome::Pass, "{c:?}");
        }
        assert_eq!(verdict.outcome, Outcome::Pass);
        assert_eq!(verdict.checks.len(), 7);
    }

    #[test]
    fn a_a_windows_fail_within_alpha() {
        let (windows, alpha) = (1000, 0.01);
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut fails, mut by_check) = (0, std::collections::BTreeMap::new());
        for _ in 0..windows {
            let baseline = arm(&mut rng, 1000, 0.01, 50.0);
            let canary = arm(&mut rng, 1000, 0.01, 50.0);
            let verdict = judge(&baseline, &canary, &policy(1));
            assert_ne!(verdict.outcome, Outcome::Inconclusive, "{verdict:?}");
            fails += usize::from(verdict.outcome == Outcome::Fail);
            for c in verdict.checks.iter().filter(|c| c.outcome == Outcome::Fail) {
                *by_check.entry(c.name).or_insert(0) += 1;
            }
        }
        // Three binomial standard deviations above the expected count.
        let expected = windows as f64 * alpha;
        let limit = expected + 3.0 * (expected * (1.0 - alpha)).sqrt();
        println!(
            "A/A: {fails} of {windows} windows failed ({:.2}%), limit {limit:.1} (alpha {alpha}); \
             by check: {by_check:?}",
            100.0 * fails as f64 / windows as f64
        );
        assert!(fails as f64 <= limit, "{fails} A/A failures > {limit}");
    }

    /// Whole rollouts of identical arms through the states of
    /// `status::Rollout`, with the controller's looks: 2,000 requests a
    /// window split by the canary's weight, 0.2 % errors, log-normal
    /// durations. The goal is at most 1 false rollback in 20.
    #[test]
    fn a_a_rollouts_rarely_roll_back() {
        use crate::config::{Rollback, RolloutSpec};
        use crate::rollout::status::{Phase, Rollout, WindowRecord};
        let spec = RolloutSpec {
            canary: "green".into(),
            steps: vec![5, 25, 50, 100],
            interval: std::time::Duration::from_secs(30),
            min_requests: 100,
            max_failed_checks: 2,
            max_error_rate: 0.01,
            max_latency_ratio: 1.5,
            significance: 0.01,
            rollback: Rollback::Immediate,
            compare: None,
            retry_on_baseline: true,
        };
        let policy = Policy {
            min_requests: spec.min_requests,
            max_error_rate: spec.max_error_rate,
            max_latency_ratio: spec.max_latency_ratio,
            significance: spec.significance,
            looks: 4 * spec.steps.len() as u32,
            min_cosine: None,
        };
        let (rollouts, mut rolled_back, mut failed_windows) = (200, 0, 0);
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..rollouts {
            let mut rollout = Rollout::start(&spec);
            for _ in 0..40 {
                if !rollout.phase.judging() {
                    break;
                }
                let canary_n = 2000 * u64::from(rollout.weight) / 100;
                let baseline = arm(&mut rng, 2000 - canary_n, 0.002, 50.0);
                let canary = arm(&mut rng, canary_n, 0.002, 50.0);
                let outcome = judge(&baseline, &canary, &policy).outcome;
                failed_windows += usize::from(outcome == Outcome::Fail);
                let record = WindowRecord {
                    at: 0.0,
                    weight: rollout.weight,
                    baseline_requests: baseline.requests,
                    baseline_errors: baseline.errors,
                    canary_requests: canary.requests,
                    canary_errors: canary.errors,
                    outcome,
                    checks: Vec::new(),
                };
                rollout.after_window(&spec, record);
            }
            rolled_back += usize::from(rollout.phase == Phase::RolledBack);
        }
        println!(
            "A/A rollouts: {rolled_back} of {rollouts} rolled back, \
             {failed_windows} failed windows"
        );
        // 1 in 20 is 10 in 200.
        assert!(
            rolled_back <= rollouts / 20,
            "{rolled_back} false rollbacks"
        );
    }

    #[test]
    fn five_percent_errors_against_half_a_percent_fail() {
        let verdict = judge(&counts(500, 3), &counts(500, 25), &policy(10));
        let test = check(&verdict, "error_rate_vs_baseline");
        assert_eq!(test.outcome, Outcome::Fail, "{test:?}");
        // Hand-computed: z = (0.05 - 0.006 - 0.002) / sqrt(0.028 · 0.972 · 0.004) = 4.025.
        assert!((test.value - 2.844e-5).abs() < 1e-8, "{test:?}");
        assert_eq!(check(&verdict, "error_rate_ceiling").outcome, Outcome::Pass);
        assert_eq!(verdict.outcome, Outcome::Fail);
    }

    #[test]
    fn more_looks_need_stronger_evidence() {
        // p ≈ 0.0024: under 0.01 / 3, over 0.01 / 30.
        let (baseline, canary) = (counts(1000, 5), counts(1000, 20));
        let outcome =
            |looks| outcome_of("error_rate_vs_baseline", &baseline, &canary, &policy(looks));
        assert_eq!(outcome(1), Outcome::Fail);
        assert_eq!(outcome(10), Outcome::Pass);
    }

    #[test]
    fn few_or_no_errors_are_no_evidence() {
        let verdict = judge(&counts(100, 0), &counts(100, 3), &policy(1));
        let test = check(&verdict, "error_rate_vs_baseline");
        assert!((test.value - 0.1223).abs() < 1e-3, "{test:?}");
        assert_eq!(test.outcome, Outcome::Pass);
        let verdict = judge(&counts(100, 0), &counts(100, 0), &policy(1));
        assert_eq!(check(&verdict, "error_rate_vs_baseline").value, 1.0);
        assert_eq!(verdict.outcome, Outcome::Pass);
    }

    #[test]
    fn ceiling_fails_even_when_the_baseline_is_as_bad() {
        let verdict = judge(&counts(1000, 30), &counts(1000, 30), &strict_ceiling());
        use Outcome::{Fail, Pass};
        assert_eq!(error_outcomes(&verdict), (Fail, Fail, Pass), "{verdict:?}");
    }

    #[test]
    fn under_min_requests_is_inconclusive_even_without_errors() {
        let verdict = judge(&counts(50, 0), &counts(50, 0), &policy(1));
        assert_eq!(verdict.outcome, Outcome::Inconclusive);
        for name in [
            "error_rate_ceiling",
            "error_rate_vs_baseline",
            "latency_p99_ratio",
            "latency_shift",
        ] {
            let c = check(&verdict, name);
            assert_eq!(
                (c.outcome, c.value, c.bound),
                (Outcome::Inconclusive, 50.0, 100.0),
                "{c:?}"
            );
        }
    }

    #[test]
    fn ceiling_applies_while_only_the_baseline_is_quiet() {
        use Outcome::{Fail, Inconclusive, Pass};
        let verdict = judge(&counts(20, 0), &counts(200, 10), &strict_ceiling());
        assert_eq!(error_outcomes(&verdict), (Fail, Fail, Inconclusive));
        let verdict = judge(&counts(20, 0), &counts(200, 0), &strict_ceiling());
        assert_eq!(error_outcomes(&verdict), (Inconclusive, Pass, Inconclusive));
    }

    #[test]
    fn no_durations_is_no_evidence() {
        let silent = Arm {
            durations_ms: Vec::new(),
            ..counts(1000, 0)
        };
        let verdict = judge(&counts(1000, 0), &silent, &policy(1));
        assert_eq!(
            check(&verdict, "latency_shift").outcome,
            Outcome::Inconclusive
        );
        assert_eq!(verdict.outcome, Outcome::Inconclusive);
    }

    #[test]
    fn half_again_slower_canary_fails_latency() {
        let baseline = arm(&mut XorShift(11), 1000, 0.0, 50.0);
        let canary = arm(&mut XorShift(12), 1000, 0.0, 75.0);
        let verdict = judge(&baseline, &canary, &policy(20));
        let shift = check(&verdict, "latency_shift");
        assert_eq!(shift.outcome, Outcome::Fail, "{shift:?}");
        assert!(shift.value > 20.0, "{shift:?}");
        assert_eq!(verdict.outcome, Outcome::Fail);
    }

    #[test]
    fn ten_percent_slower_is_significant_but_within_tolerance() {
        let baseline = arm(&mut XorShift(21), 1000, 0.0, 50.0);
        let canary = arm(&mut XorShift(22), 1000, 0.0, 55.0);
        let p = policy(1);
        let (mut b, mut c) = (baseline.durations_ms.clone(), canary.durations_ms.clone());
        b.sort_unstable_by(f64::total_cmp);
        c.sort_unstable_by(f64::total_cmp);
        // The test alone would fail it: only the tolerance lets it pass.
        assert!(mann_whitney_p(&b, &c) < p.alpha_per_look());
        let verdict = judge(&baseline, &canary, &p);
        let shift = check(&verdict, "latency_shift");
        assert_eq!(shift.outcome, Outcome::Pass, "{shift:?}");
        assert!(shift.value > 0.0 && shift.value < shift.bound, "{shift:?}");
        assert_eq!(verdict.outcome, Outcome::Pass);
    }

    #[test]
    fn a_slow_tail_fails_the_p99_ratio_alone() {
        let baseline = arm(&mut XorShift(31), 1000, 0.0, 50.0);
        let mut canary = arm(&mut XorShift(32), 1000, 0.0, 50.0);
        for d in canary.durations_ms.iter_mut().step_by(40) {
            *d *= 10.0;
        }
        let verdict = judge(&baseline, &canary, &policy(1));
        let ratio = check(&verdict, "latency_p99_ratio");
        assert_eq!(ratio.outcome, Outcome::Fail, "{ratio:?}");
        assert!(ratio.value > 2.0, "{ratio:?}");
        assert_eq!(check(&verdict, "latency_shift").outcome, Outcome::Pass);
    }

    /// The CI window that once failed on two identical upstreams: ~280
    /// requests a side, a stall holding four of the canary's past 11 ms.
    /// The ratio is over the bound; four in 280 is not a heavy tail.
    #[test]
    fn a_few_stalled_requests_do_not_fail_the_p99_ratio() {
        let baseline = arm(&mut XorShift(33), 280, 0.0, 2.0);
        let mut canary = arm(&mut XorShift(34), 280, 0.0, 2.0);
        canary.durations_ms[..4].fill(11.2);
        let ratio = check(&judge(&baseline, &canary, &policy(6)), "latency_p99_ratio").clone();
        assert!(ratio.value > ratio.bound, "{ratio:?}");
        assert_eq!(ratio.outcome, Outcome::Pass, "{ratio:?}");
        // Forty of them is: 14 % past the limit where 1 % is allowed.
        canary.durations_ms[..40].fill(11.2);
        let ratio = check(&judge(&baseline, &canary, &policy(6)), "latency_p99_ratio").clone();
        assert_eq!(ratio.outcome, Outcome::Fail, "{ratio:?}");
    }

    #[test]
    fn binomial_tail_matches_hand_computed_values() {
        // P(K ≥ 8), K ~ Bin(10, ½) = (45 + 10 + 1) / 1024.
        assert!((binomial_upper_tail(10, 8, 0.5) - 56.0 / 1024.0).abs() < 1e-12);
        // P(K ≥ 1) = 1 − 0.99²⁸⁰.
        let one = binomial_upper_tail(280, 1, 0.01);
        assert!((one - (1.0 - 0.99f64.powi(280))).abs() < 1e-12, "{one}");
        assert_eq!(binomial_upper_tail(280, 0, 0.01), 1.0);
        // Far past the mean of a large sample: tiny but not a false zero.
        let far = binomial_upper_tail(100_000, 1_300, 0.01);
        assert!(far > 0.0 && far < 1e-15, "{far}");
        // Below the mean of a large sample, where P(K = k) itself
        // underflows: nearly certain, not a false zero.
        assert_eq!(binomial_upper_tail(1_000_000, 5_000, 0.01), 1.0);
        assert_eq!(binomial_upper_tail(75_000, 1, 0.01), 1.0);
        // Either side of the mean agrees with the other's complement.
        let (up, down) = (
            binomial_upper_tail(2000, 21, 0.01),
            binomial_upper_tail(2000, 20, 0.01),
        );
        let at_20 = binomial_pmf(2000, 20, 0.01);
        assert!(
            (down - up - at_20).abs() < 1e-12,
            "{down} - {up} != {at_20}"
        );
        assert_eq!(binomial_upper_tail(10, 11, 0.5), 0.0);
    }

    #[test]
    fn mann_whitney_matches_a_hand_computed_example() {
        // Ranks of 1 2 3 | 3 4 | 5 6 (canary 3, 5, 6): 1 2 3.5 3.5 5 6 7.
        // Canary rank sum 16.5, U = 16.5 − 3·4/2 = 10.5, mean 12/2 = 6.
        // One tie of two: variance = 12/12 · (8 − 6/42) = 55/7.
        // z = (10.5 − 6 − 0.5) / √(55/7) = 1.42701, P(Z > z) = 0.0767882.
        let p = mann_whitney_p(&[1.0, 2.0, 3.0, 4.0], &[3.0, 5.0, 6.0]);
        assert!((p - 0.076_788_2).abs() < 1e-6, "p = {p}");
        let reverse = mann_whitney_p(&[3.0, 5.0, 6.0], &[1.0, 2.0, 3.0, 4.0]);
        assert!(reverse > 0.9, "p = {reverse}");
        assert_eq!(mann_whitney_p(&[2.0; 5], &[2.0; 3]), 1.0);
    }

    #[test]
    fn hodges_lehmann_finds_a_known_shift() {
        // Differences of [2, 4, 9] − [1, 2, 3]: −1 0 1 1 2 3 6 7 8, median 2.
        assert_eq!(hodges_lehmann(&[1.0, 2.0, 3.0], &[2.0, 4.0, 9.0]), 2.0);
        // A shift of 7 ms, through the thinned path (2000 > 500 values).
        let mut rng = XorShift(41);
        let mut b: Vec<f64> = (0..2000).map(|_| rng.duration_ms(50.0, 0.5)).collect();
        b.sort_unstable_by(f64::total_cmp);
        let c: Vec<f64> = b.iter().map(|x| x + 7.0).collect();
        assert!((hodges_lehmann(&b, &c) - 7.0).abs() < 1e-9);
    }

    #[test]
    fn readiness_flaps_fail_past_the_baseline_margin() {
        let flapping = |not_ready| Arm {
            readiness_checks: 10,
            not_ready_checks: not_ready,
            ..counts(1000, 0)
        };
        let got = outcomes("readiness", flapping, [(0, 4), (3, 4), (0, 1)]);
        assert_eq!(got, [Outcome::Fail, Outcome::Pass, Outcome::Pass]);
    }

    #[test]
    fn a_persistent_queue_fails() {
        let queued = |depth| Arm {
            queue_depth_mean: depth,
            ..counts(1000, 0)
        };
        let got = outcomes("queue_depth", queued, [(3.0, 9.0), (3.0, 6.0), (0.0, 0.9)]);
        assert_eq!(got, [Outcome::Fail, Outcome::Pass, Outcome::Pass]);
    }

    #[test]
    fn verdicts_serialize_lowercase() {
        let verdict = judge(&counts(50, 0), &counts(50, 0), &policy(1));
        let json = serde_json::to_value(&verdict).unwrap();
        assert_eq!(json["outcome"], "inconclusive");
        assert_eq!(json["checks"][0]["name"], "error_rate_ceiling");
        assert_eq!(json["checks"][0]["outcome"], "inconclusive");
    }
}
