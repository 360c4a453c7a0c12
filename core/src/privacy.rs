//! Differential privacy: what a volunteer's reports reveal, bounded.
//!
//! - **Label counts under local DP** ([`noisy_counts`]): a client adds
//!   discrete Laplace noise of scale `1 / epsilon` to each of its label
//!   counts before they leave it (the geometric mechanism, Ghosh,
//!   Roughgarden and Sundararajan 2012), drawn by OpenDP's exact sampler
//!   (Canonne, Kamath and Steinke 2020), and clamps at zero
//!   (post-processing). Neighbouring datasets differ by one sample added
//!   or removed, which moves one count by one (L1 sensitivity 1), so a
//!   report is `epsilon`-DP for every sample; a sample whose label changes
//!   moves two counts and is `2 epsilon`-DP. The post-plan report is
//!   computed from the noisy report and the plan ([`planned_counts`]),
//!   which is post-processing: it spends nothing more.
//! - **Client-level DP for the model** ([`RdpAccountant`]): the privacy
//!   spent by the sampled Gaussian mechanism over rounds, in Rényi DP
//!   (Mironov 2017; Mironov, Talwar and Zhang 2019), converted to
//!   (epsilon, delta) with Canonne, Kamath and Steinke's bound (2020), as
//!   Google's `dp_accounting` and Opacus do.

#[cfg(not(target_arch = "wasm32"))]
use opendp::domains::{AtomDomain, VectorDomain};
#[cfg(not(target_arch = "wasm32"))]
use opendp::measurements::make_laplace;
#[cfg(not(target_arch = "wasm32"))]
use opendp::measures::MaxDivergence;
#[cfg(not(target_arch = "wasm32"))]
use opendp::metrics::L1Distance;

/// Why noise could not be added.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// Epsilon must be a positive finite number.
    #[error("epsilon {0} is not a positive finite number")]
    BadEpsilon(f64),
    /// A count does not fit the sampler's integers.
    #[error("count {0} is too large")]
    TooLarge(usize),
    /// OpenDP refused (no system entropy, for one).
    #[error("noise: {0}")]
    Sampler(String),
}

/// `counts` with discrete Laplace noise of scale `1 / epsilon` added to each
/// and clamped at zero; the report is `epsilon`-DP for any one sample added
/// or removed (module docs). Noise comes from the operating system's (or
/// the browser's) entropy, so two calls differ.
///
/// # Shapes
/// One entry per class in, one per class out.
///
/// # Errors
/// [`PrivacyError`] for an epsilon that is not positive and finite, a count
/// above `i64::MAX`, or a failing sampler.
///
/// In the browser (wasm32) OpenDP's sampler aborted the tab's WebAssembly
/// ("unreachable"; found by the end-to-end test), so there the same
/// distribution is drawn as the difference of two geometric draws with
/// success probability `1 - exp(-epsilon)` (`rand_distr`, from the browser's
/// crypto API): exact up to the floating-point `p`.
pub fn noisy_counts(counts: &[usize], epsilon: f64) -> Result<Vec<usize>, PrivacyError> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(PrivacyError::BadEpsilon(epsilon));
    }
    let exact = counts
        .iter()
        .map(|&c| i64::try_from(c).map_err(|_| PrivacyError::TooLarge(c)))
        .collect::<Result<Vec<i64>, _>>()?;
    #[cfg(target_arch = "wasm32")]
    let noisy = geometric_difference(&exact, epsilon)?;
    #[cfg(not(target_arch = "wasm32"))]
    let noisy = opendp_laplace(&exact, epsilon)?;
    Ok(noisy
        .into_iter()
        .map(|n| usize::try_from(n.max(0)).unwrap_or(usize::MAX))
        .collect())
}

/// Discrete Laplace noise as the difference of two geometric draws (the
/// browser's sampler, see [`noisy_counts`]).
#[cfg(any(target_arch = "wasm32", test))]
fn geometric_difference(exact: &[i64], epsilon: f64) -> Result<Vec<i64>, PrivacyError> {
    use rand_distr::{Distribution, Geometric};
    let p = -(-epsilon).exp_m1();
    let geometric = Geometric::new(p).map_err(|e| PrivacyError::Sampler(e.to_string()))?;
    let mut rng = entropy_rng()?;
    Ok(exact
        .iter()
        .map(|&c| {
            let up = geometric.sample(&mut rng).min(i64::MAX as u64) as i64;
            let down = geometric.sample(&mut rng).min(i64::MAX as u64) as i64;
            c.saturating_add(up).saturating_sub(down)
        })
        .collect())
}

/// OpenDP's discrete Laplace mechanism over count vectors, L1 distance.
#[cfg(not(target_arch = "wasm32"))]
type LaplaceMechanism = opendp::core::Measurement<
    VectorDomain<AtomDomain<i64>>,
    L1Distance<i64>,
    MaxDivergence,
    Vec<i64>,
>;

/// [`LaplaceMechanism`] of scale `1 / epsilon`.
#[cfg(not(target_arch = "wasm32"))]
fn laplace_mechanism(epsilon: f64) -> Result<LaplaceMechanism, PrivacyError> {
    make_laplace::<_, _, MaxDivergence>(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L1Distance::<i64>::default(),
        1.0 / epsilon,
        None,
    )
    .map_err(|e| PrivacyError::Sampler(e.to_string()))
}

/// Discrete Laplace noise by OpenDP's exact sampler.
#[cfg(not(target_arch = "wasm32"))]
fn opendp_laplace(exact: &[i64], epsilon: f64) -> Result<Vec<i64>, PrivacyError> {
    laplace_mechanism(epsilon)?
        .invoke(&exact.to_vec())
        .map_err(|e| PrivacyError::Sampler(e.to_string()))
}

/// The epsilon a noisy count report spends for one sample added or removed,
/// as OpenDP's privacy map states it for noise of scale `1 / epsilon`.
///
/// # Errors
/// As [`noisy_counts`].
pub fn label_report_epsilon(epsilon: f64) -> Result<f64, PrivacyError> {
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(PrivacyError::BadEpsilon(epsilon));
    }
    // In the browser: the discrete Laplace mechanism's map, sensitivity
    // over scale.
    #[cfg(target_arch = "wasm32")]
    {
        Ok(epsilon)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        laplace_mechanism(epsilon)?
            .map(&1)
            .map_err(|e| PrivacyError::Sampler(e.to_string()))
    }
}

/// The post-plan counts a client reports when its first report was noisy:
/// `round(noisy[y] * ratios[y])`, the plan's expected effect on the counts
/// it reported (post-processing of the noisy report, no further privacy
/// cost; reporting its true post-plan counts would give the raw counts
/// away, since the server knows the ratios). A missing ratio counts as 1.
///
/// # Shapes
/// One entry per class in `noisy`; the result has as many.
pub fn planned_counts(noisy: &[usize], ratios: &[f64]) -> Vec<usize> {
    noisy
        .iter()
        .enumerate()
        .map(|(y, &n)| {
            let ratio = ratios
                .get(y)
                .copied()
                .filter(|r| r.is_finite() && *r >= 0.0)
                .unwrap_or(1.0);
            let planned = (n as f64 * ratio).round();
            if planned >= usize::MAX as f64 {
                usize::MAX
            } else {
                planned as usize
            }
        })
        .collect()
}

/// Rényi orders the accountant tracks: the integers 2 to 64, then 128 to
/// 1,024 in powers of two (`dp_accounting`'s integer orders).
fn default_orders() -> Vec<u32> {
    (2..=64).chain([128, 256, 512, 1024]).collect()
}

/// `ln(exp(a) + exp(b))` without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// `ln C(n, k)`.
fn log_binomial(n: u32, k: u32) -> f64 {
    let k = k.min(n - k);
    (0..k)
        .map(|i| (f64::from(n - i)).ln() - (f64::from(i + 1)).ln())
        .sum()
}

/// The Rényi DP of order `alpha` (an integer >= 2) of one step of the
/// Poisson-sampled Gaussian mechanism with sampling rate `q` and noise
/// multiplier `sigma` (noise standard deviation over sensitivity):
/// `ln(A_alpha) / (alpha - 1)` with
/// `A_alpha = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))`
/// (Mironov, Talwar and Zhang 2019, section 3.3), computed in log space.
/// `q = 1` is the Gaussian mechanism's `alpha / (2 sigma^2)`.
pub fn sampled_gaussian_rdp(q: f64, sigma: f64, alpha: u32) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if sigma <= 0.0 {
        return f64::INFINITY;
    }
    let a = f64::from(alpha);
    if q >= 1.0 {
        return a / (2.0 * sigma * sigma);
    }
    let mut log_a = f64::NEG_INFINITY;
    for k in 0..=alpha {
        let kf = f64::from(k);
        let term = log_binomial(alpha, k)
            + kf * q.ln()
            + (a - kf) * (-q).ln_1p()
            + (kf * kf - kf) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a / (a - 1.0)
}

/// A Rényi DP accountant for the sampled Gaussian mechanism, composed over
/// rounds (RDP adds up order by order). It serialises as
/// `{"orders": [...], "rdp": [...]}`, so a restarted server goes on from
/// what was spent ([`RdpAccountant::from_json`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RdpAccountant {
    orders: Vec<u32>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        let orders = default_orders();
        Self {
            rdp: vec![0.0; orders.len()],
            orders,
        }
    }
}

impl RdpAccountant {
    /// Nothing spent yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The JSON a server keeps with each round.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("numbers serialise")
    }

    /// An accountant kept by [`RdpAccountant::to_json`]; `None` unless it
    /// has as many spends as orders, every order at least 2 and every spend
    /// finite and non-negative (a damaged record must not lower the spend).
    pub fn from_json(text: &str) -> Option<Self> {
        let accountant: Self = serde_json::from_str(text).ok()?;
        let sound = !accountant.orders.is_empty()
            && accountant.orders.len() == accountant.rdp.len()
            && accountant.orders.iter().all(|&alpha| alpha >= 2)
            && accountant.rdp.iter().all(|r| r.is_finite() && *r >= 0.0);
        sound.then_some(accountant)
    }

    /// Adds `steps` rounds of the sampled Gaussian mechanism: each unit
    /// (client) takes part with probability `q`, and the noise's standard
    /// deviation is `sigma` times the sum's sensitivity.
    pub fn compose(&mut self, q: f64, sigma: f64, steps: u64) {
        for (rdp, &alpha) in self.rdp.iter_mut().zip(&self.orders) {
            *rdp += steps as f64 * sampled_gaussian_rdp(q, sigma, alpha);
        }
    }

    /// The smallest epsilon for which the composition so far is
    /// (epsilon, `delta`)-DP, over the tracked orders, with the conversion
    /// `epsilon = rdp + ln(1 - 1/alpha) - ln(delta * alpha) / (alpha - 1)`
    /// (Canonne, Kamath and Steinke 2020, proposition 12; the rule of
    /// `dp_accounting.rdp.compute_epsilon`); 0 before anything was spent.
    pub fn epsilon(&self, delta: f64) -> f64 {
        if !(delta > 0.0 && delta < 1.0) {
            return f64::INFINITY;
        }
        self.orders
            .iter()
            .zip(&self.rdp)
            .map(|(&alpha, &rdp)| {
                let a = f64::from(alpha);
                if delta * delta + (-rdp).exp_m1() > 0.0 {
                    // delta^2 > 1 - exp(-rdp): nothing to pay at this order.
                    0.0
                } else {
                    rdp + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
                }
            })
            .fold(f64::INFINITY, f64::min)
            .max(0.0)
    }
}

/// Client-level differential privacy for the model (DP-FedAvg, McMahan,
/// Ramage, Talwar and Zhang 2018): every group's update (its final weights
/// less the global model it started from) is clipped to L2 norm `clip`, the
/// clipped updates are averaged without sample weights, and Gaussian noise
/// of standard deviation `noise_multiplier * sensitivity / groups` is added
/// to the mean. For Astraea a group is a mediator (DP-Astraea).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelPrivacy {
    /// C: the most a group's update may move the model, L2 (the first
    /// round's under adaptive clipping).
    pub clip: f64,
    /// z: the noise's standard deviation over the sum's sensitivity (with
    /// adaptive clipping, of the round as a whole: see
    /// [`ModelPrivacy::update_noise_multiplier`]).
    pub noise_multiplier: f64,
    /// delta of the (epsilon, delta) reported.
    pub delta: f64,
    /// Let C follow a quantile of the update norms instead of staying put.
    pub adaptive: Option<AdaptiveClip>,
}

/// Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021,
/// "Differentially Private Learning with Adaptive Clipping", NeurIPS):
/// after each round the clip moves geometrically towards the `quantile`
/// of the groups' update norms, estimated privately from a noisy count of
/// the updates it left unclipped. The count's noise is paid for by raising
/// the update noise a little ([`ModelPrivacy::update_noise_multiplier`]),
/// so a round still spends what a Gaussian of multiplier z does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClip {
    /// gamma: the share of updates the clip should leave unclipped, in
    /// (0, 1) (0.5 in the paper: the median norm).
    pub quantile: f64,
    /// eta_C: the geometric step, `C <- C exp(-eta_C (b - gamma))` (0.2 in
    /// the paper).
    pub learning_rate: f64,
    /// sigma_b: the standard deviation of the Gaussian noise on the count
    /// of unclipped updates (the paper takes the expected number of
    /// updates a round over 20).
    pub count_noise: f64,
}

impl AdaptiveClip {
    /// The clip for the next round, from this round's `clip` and the
    /// groups' update `norms` (L2, before clipping): with `b` the noisy
    /// share of norms at most `clip`, `(#{norm <= clip} + N(0,
    /// sigma_b^2)) / m`, the paper's geometric update `clip exp(-eta_C (b -
    /// gamma))` (its Algorithm 1). `clip` unchanged without norms.
    pub fn next_clip(&self, clip: f64, norms: &[f64], rng: &mut impl rand::Rng) -> f64 {
        use rand_distr::{Distribution, Normal};
        // Fail closed: without valid settings nothing is released (the
        // exact count would leak through the clip).
        if norms.is_empty() || self.check().is_err() {
            return clip;
        }
        let unclipped = norms.iter().filter(|&&n| n <= clip).count() as f64;
        let Ok(noise) = Normal::new(0.0, self.count_noise) else {
            return clip;
        };
        let share = (unclipped + noise.sample(rng)) / norms.len() as f64;
        let next = clip * (-self.learning_rate * (share - self.quantile)).exp();
        if next.is_finite() && next > 0.0 {
            next
        } else {
            clip
        }
    }

    /// Checks the settings: `quantile` in (0, 1), `learning_rate` and
    /// `count_noise` finite and positive.
    ///
    /// # Errors
    /// Which setting is out of range.
    pub fn check(&self) -> Result<(), String> {
        if !(self.quantile > 0.0 && self.quantile < 1.0) {
            return Err(format!("quantile {} is not in (0, 1)", self.quantile));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!(
                "learning rate {} is not positive",
                self.learning_rate
            ));
        }
        if !(self.count_noise.is_finite() && self.count_noise > 0.0) {
            return Err(format!("count noise {} is not positive", self.count_noise));
        }
        Ok(())
    }
}

impl ModelPrivacy {
    /// The multiplier of the noise added to the sum of clipped updates. z
    /// itself with a fixed clip. With adaptive clipping, z_Delta such that
    /// the update sum and the unclipped count together spend what one
    /// Gaussian of multiplier z does: `z_Delta = (z^-2 -
    /// sigma_b^-2)^(-1/2)` (the paper's Theorem 1). The count's
    /// sensitivity is taken as 1: one client adds or removes at most one
    /// unclipped update, its own or its mediator's (the paper's 1/2, its
    /// `(2 sigma_b)^-2`, needs bits centred on 1/2 over a fixed expected
    /// count, which this count, over the groups that answered, is not).
    /// `None` when the count's noise is not above z (the count alone would
    /// spend more) or the settings are invalid ([`AdaptiveClip::check`]).
    pub fn update_noise_multiplier(&self) -> Option<f64> {
        let z = self.noise_multiplier;
        if !(z.is_finite() && z > 0.0) {
            return None;
        }
        let Some(adaptive) = self.adaptive else {
            return Some(z);
        };
        adaptive.check().ok()?;
        let left = z.powi(-2) - adaptive.count_noise.powi(-2);
        (left > 0.0).then(|| left.powf(-0.5))
    }

    /// The standard deviation of the round's Gaussian noise on the sum of
    /// clipped group updates from groups of at most `largest_group`
    /// clients: `z * sensitivity` (with adaptive clipping, the update's
    /// share of z). `None` as [`ModelPrivacy::update_noise_multiplier`].
    pub fn noise_std(&self, largest_group: usize) -> Option<f64> {
        Some(self.update_noise_multiplier()? * self.sensitivity(largest_group))
    }

    /// The L2 sensitivity of the sum of clipped group updates to one client:
    /// C when every group is one client (its update is in the sum or not),
    /// 2C when groups hold several clients (without one of them, its
    /// mediator's clipped update can be anywhere in the ball of radius C).
    pub fn sensitivity(&self, largest_group: usize) -> f64 {
        if largest_group > 1 {
            2.0 * self.clip
        } else {
            self.clip
        }
    }
}

/// The noise multiplier that spends `epsilon` (at `delta`) over `steps`
/// rounds of the sampled Gaussian mechanism at sampling rate `q`, by
/// bisection on the accountant (to 0.1 %); `None` when even a multiplier of
/// 1,000 spends more.
pub fn noise_for_epsilon(q: f64, steps: u64, delta: f64, epsilon: f64) -> Option<f64> {
    let spent = |sigma: f64| {
        let mut accountant = RdpAccountant::new();
        accountant.compose(q, sigma, steps);
        accountant.epsilon(delta)
    };
    let (mut low, mut high) = (0.05, 1000.0);
    if spent(high) > epsilon {
        return None;
    }
    if spent(low) <= epsilon {
        return Some(low);
    }
    while high / low > 1.001 {
        let mid = (low * high).sqrt();
        if spent(mid) > epsilon {
            low = mid;
        } else {
            high = mid;
        }
    }
    Some(high)
}

/// The global model after one DP round: `global + (sum_g clip(u_g) + N(0,
/// noise_std^2 I)) / G`, where `u_g = updates[g] - global` and `clip(u)`
/// scales `u` down to L2 norm at most `clip`. Returns the new weights and
/// the updates' norms before clipping (for choosing `clip`); `None` when
/// there is no update, one has the wrong length, or `clip` is not positive
/// or `noise_std` not finite and non-negative. Floating-point Gaussian
/// noise from `rng`, as DP-SGD implementations draw it.
///
/// # Shapes
/// `global` and every update are `[p]`; the result is `[p]`.
pub fn private_mean(
    global: &[f32],
    updates: &[&[f32]],
    clip: f64,
    noise_std: f64,
    rng: &mut impl rand::Rng,
) -> Option<(Vec<f32>, Vec<f64>)> {
    use rand_distr::{Distribution, Normal};
    if updates.is_empty() || updates.iter().any(|u| u.len() != global.len()) {
        return None;
    }
    // Fail closed: a clip that is not a positive number clips nothing (NaN
    // compares false), and a NaN noise would be dropped.
    if !(clip.is_finite() && clip > 0.0 && noise_std.is_finite() && noise_std >= 0.0) {
        return None;
    }
    let mut sum = vec![0.0f64; global.len()];
    let mut norms = Vec::with_capacity(updates.len());
    for update in updates {
        let norm = update
            .iter()
            .zip(global)
            .map(|(w, g)| f64::from(w - g).powi(2))
            .sum::<f64>()
            .sqrt();
        norms.push(norm);
        let scale = if norm > clip { clip / norm } else { 1.0 };
        for ((acc, w), g) in sum.iter_mut().zip(*update).zip(global) {
            *acc += scale * f64::from(w - g);
        }
    }
    let noise = Normal::new(0.0, noise_std).ok()?;
    let groups = updates.len() as f64;
    let values = sum
        .iter()
        .zip(global)
        .map(|(acc, g)| g + ((acc + noise.sample(rng)) / groups) as f32)
        .collect();
    Some((values, norms))
}

/// Per-hop noise settings ([`noisy_hop`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HopPrivacy {
    /// The most one hop's update may move the model, L2.
    pub clip: f64,
    /// The noise's standard deviation over `clip`.
    pub noise_multiplier: f64,
}

/// Per-hop noise, so that what the next client in a chain sees is itself
/// DP for the client before it: the hop's update `new - sent` is clipped
/// to L2 norm `clip` and Gaussian noise of standard deviation
/// `noise_multiplier * clip` is added to every weight. Without the client
/// the hop would have passed `sent` on (with noise), so the release's L2
/// sensitivity is `clip` and each hop is the Gaussian mechanism with that
/// multiplier ([`hop_epsilon`]). Returns the update's norm before clipping.
///
/// # Shapes
/// `sent` and `new` are `[p]`; `new` is changed in place.
pub fn noisy_hop(
    sent: &[f32],
    new: &mut [f32],
    clip: f64,
    noise_multiplier: f64,
    rng: &mut impl rand::Rng,
) -> f64 {
    let norm = clip_update(sent, new, clip);
    add_gaussian_noise(new, (noise_multiplier * clip).max(0.0), rng);
    norm
}

/// Adds Gaussian noise of standard deviation `std` to every value of
/// `values` (drawn in f64, rounded to f32); `None`, and `values`
/// unchanged, when `std` is not finite and non-negative.
///
/// # Shapes
/// `values` is `[p]`.
pub fn add_gaussian_noise(values: &mut [f32], std: f64, rng: &mut impl rand::Rng) -> Option<()> {
    use rand_distr::{Distribution, Normal};
    if !(std.is_finite() && std >= 0.0) {
        return None;
    }
    let noise = Normal::new(0.0, std).ok()?;
    for w in values.iter_mut() {
        *w = (f64::from(*w) + noise.sample(rng)) as f32;
    }
    Some(())
}

/// Clips the update `new - sent` to L2 norm `clip` in place (`new` becomes
/// `sent + u * min(1, clip / |u|)`); returns `|u|` before clipping. A
/// `clip` that is not a positive number (NaN, 0, negative) takes the whole
/// update away (`new` becomes `sent`): fail closed.
///
/// # Shapes
/// `sent` and `new` are `[p]`.
pub fn clip_update(sent: &[f32], new: &mut [f32], clip: f64) -> f64 {
    let norm = new
        .iter()
        .zip(sent)
        .map(|(w, s)| f64::from(w - s).powi(2))
        .sum::<f64>()
        .sqrt();
    let scale = if clip.is_nan() || clip <= 0.0 || !norm.is_finite() {
        0.0
    } else if norm > clip {
        clip / norm
    } else {
        1.0
    };
    for (w, s) in new.iter_mut().zip(sent) {
        // 0 times an infinite update is NaN: a taken-away update is `sent`.
        *w = if scale == 0.0 {
            *s
        } else {
            s + (scale * f64::from(*w - s)) as f32
        };
    }
    norm
}

/// Secure aggregation under client-level DP: the clip C of a chain of
/// `hops` hops split between the server, which clips the chain before its
/// masked last hop, and the masker, which clips that hop itself: `(C (1 -
/// 1/h), C / h)`. By the triangle inequality the chain's update is then
/// within C, what DP-FedAvg's sensitivity assumes (docs/PRIVACY.md).
pub fn secure_clip_split(clip: f64, hops: usize) -> (f64, f64) {
    let hops = hops.max(1) as f64;
    (clip * (1.0 - 1.0 / hops), clip / hops)
}

/// DP-FedAvg's noise on a mean the server did not compute itself (under
/// secure aggregation it learns only the unmasked mean of `groups` clipped
/// results): adds Gaussian noise of standard deviation `noise_std /
/// groups` to every value, the same as [`private_mean`] adds to its mean.
/// `None`, and `mean` unchanged, when `groups` is 0 or `noise_std` not
/// finite and non-negative.
///
/// # Shapes
/// `mean` is `[p]`.
pub fn noise_the_mean(
    mean: &mut [f32],
    noise_std: f64,
    groups: usize,
    rng: &mut impl rand::Rng,
) -> Option<()> {
    if groups == 0 {
        return None;
    }
    add_gaussian_noise(mean, noise_std / groups as f64, rng)
}

/// A generator seeded from the operating system's (or the browser's)
/// entropy, for noise a client draws itself.
///
/// # Errors
/// [`PrivacyError::Sampler`] when the system has no entropy to give.
pub fn entropy_rng() -> Result<rand::rngs::StdRng, PrivacyError> {
    use rand::SeedableRng;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| PrivacyError::Sampler(e.to_string()))?;
    Ok(rand::rngs::StdRng::from_seed(seed))
}

/// Distributed DP under secure aggregation: the standard deviation of the
/// Gaussian noise each masker adds to its own clipped result so that the
/// unmasked mean carries at least the round's noise without the server
/// adding any. The server releases the unweighted mean of the `S`
/// survivors' results, so the round's mechanism needs noise `noise_std /
/// S` on it ([`noise_the_mean`]); `S` independent shares of deviation
/// `sigma` give `sigma / sqrt(S)` there. `S` is not known when the
/// maskers draw, but unmasking needs at least `min_survivors` of them
/// (`crate::secagg::SecAggParams::min_survivors`), so `sigma = noise_std /
/// sqrt(min_survivors)` is enough for every `S >= min_survivors`: with `S`
/// survivors the mean's noise is `sqrt(S / min_survivors)` times the
/// round's (the price of not trusting the server with the noise, and of
/// tolerating dropouts; Kairouz et al., "The Distributed Discrete Gaussian
/// Mechanism for Federated Learning with Secure Aggregation", ICML 2021,
/// who also round in the integers, where this project adds continuous
/// noise before the fixed-point encoding).
pub fn distributed_noise_share(noise_std: f64, min_survivors: usize) -> f64 {
    noise_std / (min_survivors.max(1) as f64).sqrt()
}

/// The masker's step under secure aggregation with client-level DP: its
/// hop's update `trained - received` clipped to L2 norm `clip`
/// ([`clip_update`]), then, under distributed DP, Gaussian noise of
/// standard deviation `noise_std` ([`distributed_noise_share`]) added to
/// every weight; `trained` is changed in place, before masking.
///
/// # Errors
/// A message, and nothing to mask, when `clip` is not a positive finite
/// number, `noise_std` not finite and non-negative, or the two vectors'
/// lengths differ: the masker gives its hop up rather than mask an update
/// that is not clipped or not noised as the round needs.
///
/// # Shapes
/// `received` and `trained` are `[p]`.
pub fn private_masked_hop(
    received: &[f32],
    trained: &mut [f32],
    clip: f64,
    noise_std: Option<f64>,
    rng: &mut impl rand::Rng,
) -> Result<(), String> {
    if !(clip.is_finite() && clip > 0.0) {
        return Err(format!("secure_clip {clip} is not a positive number"));
    }
    if let Some(std) = noise_std
        && !(std.is_finite() && std >= 0.0)
    {
        return Err(format!("secure_noise {std} is not a non-negative number"));
    }
    if received.len() != trained.len() {
        return Err(format!(
            "received {} weights, trained {}",
            received.len(),
            trained.len()
        ));
    }
    clip_update(received, trained, clip);
    if let Some(std) = noise_std {
        add_gaussian_noise(trained, std, rng);
    }
    Ok(())
}

/// The epsilon (at `delta`) that `hops` noisy hops of one client spend
/// against whoever sees them all (the next client, the server), by the RDP
/// accountant without sampling: a client's passes in one round, or its
/// hops over a whole run.
pub fn hop_epsilon(noise_multiplier: f64, hops: u64, delta: f64) -> f64 {
    let mut accountant = RdpAccountant::new();
    accountant.compose(1.0, noise_multiplier, hops);
    accountant.epsilon(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The root mean square distance of `values` from `centre`: the noise's
    /// standard deviation when `values` are `centre` plus noise.
    fn deviation_from(values: &[f32], centre: f32) -> f64 {
        (values
            .iter()
            .map(|w| f64::from(w - centre).powi(2))
            .sum::<f64>()
            / values.len() as f64)
            .sqrt()
    }

    #[test]
    fn noisy_counts_stay_counts_and_vary_about_the_truth() {
        // Prepare: 2,000 reports of the same counts at epsilon 1 (noise of
        // scale 1: variance 2 e / (e - 1)^2 = 1.84 per count).
        let counts = [100usize, 0, 40];

        // Execute
        let reports: Vec<Vec<usize>> = (0..2000)
            .map(|_| noisy_counts(&counts, 1.0).unwrap())
            .collect();

        // Assert: three counts each; the first's mean and variance match
        // the discrete Laplace's; a zero count is never negative.
        assert!(reports.iter().all(|r| r.len() == 3));
        let first: Vec<f64> = reports.iter().map(|r| r[0] as f64).collect();
        let mean = first.iter().sum::<f64>() / first.len() as f64;
        let var = first.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / first.len() as f64;
        assert!((mean - 100.0).abs() < 0.2, "mean {mean}");
        assert!((var - 1.84).abs() < 0.35, "variance {var}");
        assert!(reports.iter().any(|r| r[0] != 100), "no noise was added");
    }

    #[test]
    fn the_browsers_sampler_has_the_same_distribution() {
        // The difference of two geometric draws at epsilon 1: variance
        // 2 e / (e - 1)^2 = 1.84, as OpenDP's discrete Laplace.
        let draws: Vec<f64> = (0..4000)
            .map(|_| geometric_difference(&[0], 1.0).unwrap()[0] as f64)
            .collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!(mean.abs() < 0.15, "mean {mean}");
        assert!((var - 1.84).abs() < 0.3, "variance {var}");
    }

    #[test]
    fn the_report_spends_the_epsilon_it_was_made_for() {
        for epsilon in [0.5, 1.0, 4.0] {
            let spent = label_report_epsilon(epsilon).unwrap();
            assert!((spent - epsilon).abs() < 1e-9, "{epsilon}: {spent}");
        }
        assert!(noisy_counts(&[1], 0.0).is_err());
        assert!(noisy_counts(&[1], f64::NAN).is_err());
    }

    #[test]
    fn post_plan_counts_follow_the_noisy_report_not_the_data() {
        assert_eq!(
            planned_counts(&[10, 3, 0, 7], &[1.0, 2.5, 4.0, 0.5]),
            vec![10, 8, 0, 4]
        );
        // A missing or broken ratio leaves the count alone.
        assert_eq!(planned_counts(&[5, 5], &[f64::NAN]), vec![5, 5]);
    }

    #[test]
    fn epsilon_matches_googles_dp_accounting() {
        // Reference values: `dp_accounting` 0.6.0 (PyPI), `RdpAccountant`
        // with the same orders (2..=64, 128, 256, 512, 1024), composing
        // `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` `steps` times;
        // `get_epsilon(delta)`. The second row is the DP-SGD MNIST setting
        // of TensorFlow Privacy's tutorial (batch 250 of 60,000, noise 1.1,
        // 60 epochs).
        let cases = [
            (0.1, 1.0, 100, 1e-5, 7.972_921_510_380_539),
            (250.0 / 60_000.0, 1.1, 14_400, 1e-5, 2.562_959_698_937_712_4),
            (0.01, 1.0, 1000, 1e-5, 2.107_753_075_451_574_5),
            (0.05, 1.0, 40, 1e-5, 2.996_297_753_108_411_4),
            (1.0, 5.0, 10, 1e-5, 2.814_109_167_845_533),
        ];
        for (q, sigma, steps, delta, expected) in cases {
            let mut accountant = RdpAccountant::new();
            accountant.compose(q, sigma, steps);
            let epsilon = accountant.epsilon(delta);
            assert!(
                (epsilon - expected).abs() < 1e-6 * expected,
                "q {q} sigma {sigma} steps {steps}: {epsilon} against {expected}"
            );
        }
        assert_eq!(RdpAccountant::new().epsilon(1e-5), 0.0);
    }

    #[test]
    fn a_kept_accountant_reads_back_as_it_was_and_a_damaged_one_not_at_all() {
        let mut spent = RdpAccountant::new();
        spent.compose(1.0, 2.0, 3);
        spent.compose(0.1, 1.0, 7);
        let back = RdpAccountant::from_json(&spent.to_json()).expect("reads back");
        assert_eq!(back, spent);
        assert_eq!(back.epsilon(1e-5), spent.epsilon(1e-5));
        for damaged in [
            r#"{"orders":[2,3],"rdp":[0.5]}"#,
            r#"{"orders":[1,3],"rdp":[0.5,0.5]}"#,
            r#"{"orders":[2,3],"rdp":[-0.5,0.5]}"#,
            r#"{"orders":[2,3],"rdp":[0.5,1e999]}"#,
            r#"{"orders":[],"rdp":[]}"#,
            "not json",
        ] {
            assert_eq!(RdpAccountant::from_json(damaged), None, "{damaged}");
        }
    }

    #[test]
    fn updates_are_clipped_then_averaged_and_noise_is_calibrated() {
        use rand::SeedableRng;
        // Prepare: global 0; one update of norm 5 ([3, 4]) and one of norm
        // 0.5 ([0.3, 0.4]); clip 1.
        let global = [0.0f32, 0.0];
        let (big, small) = ([3.0f32, 4.0], [0.3f32, 0.4]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);

        // Execute: without noise, then with.
        let (clean, norms) = private_mean(&global, &[&big, &small], 1.0, 0.0, &mut rng).unwrap();
        let draws: Vec<f32> = (0..4000)
            .map(|_| {
                private_mean(&global, &[&small], 1.0, 2.0, &mut rng)
                    .unwrap()
                    .0[0]
                    - 0.3
            })
            .collect();

        // Assert: (0.6 + 0.3) / 2 and (0.8 + 0.4) / 2; the noise's standard
        // deviation is noise_std over the groups (2 / 1).
        assert!(
            (clean[0] - 0.45).abs() < 1e-6 && (clean[1] - 0.6).abs() < 1e-6,
            "{clean:?}"
        );
        assert!((norms[0] - 5.0).abs() < 1e-6);
        let std = (draws.iter().map(|d| d * d).sum::<f32>() / draws.len() as f32).sqrt();
        assert!((std - 2.0).abs() < 0.1, "{std}");
        assert_eq!(
            ModelPrivacy {
                clip: 1.5,
                noise_multiplier: 1.0,
                delta: 1e-5,
                adaptive: None,
            }
            .sensitivity(10),
            3.0
        );
    }

    #[test]
    fn adaptive_clipping_spends_what_its_noise_multiplier_says() {
        use rand::SeedableRng;
        // The update sum at z_Delta and the count at sigma_b (sensitivity
        // 1) compose to exactly one Gaussian at z (Rényi divergences of
        // Gaussians add as 1 / z^2).
        for count_noise in [2.5, 5.0] {
            let dp = ModelPrivacy {
                clip: 1.0,
                noise_multiplier: 1.1,
                delta: 1e-5,
                adaptive: Some(AdaptiveClip {
                    quantile: 0.5,
                    learning_rate: 0.2,
                    count_noise,
                }),
            };
            let z_delta = dp.update_noise_multiplier().expect("enough count noise");
            assert!(z_delta > dp.noise_multiplier);
            let mut both = RdpAccountant::new();
            both.compose(1.0, z_delta, 30);
            both.compose(1.0, count_noise, 30);
            let mut one = RdpAccountant::new();
            one.compose(1.0, dp.noise_multiplier, 30);
            let (a, b) = (both.epsilon(1e-5), one.epsilon(1e-5));
            assert!((a - b).abs() < 1e-9 * b, "{a} against {b}");
        }
        // Too little count noise for z: refused, not silently overspent.
        let thin = ModelPrivacy {
            clip: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
            adaptive: Some(AdaptiveClip {
                quantile: 0.5,
                learning_rate: 0.2,
                count_noise: 0.5,
            }),
        };
        assert_eq!(thin.update_noise_multiplier(), None);
        // Invalid settings fail closed, and release no exact count.
        for broken in [
            AdaptiveClip {
                count_noise: -5.0,
                quantile: 0.5,
                learning_rate: 0.2,
            },
            AdaptiveClip {
                count_noise: 5.0,
                quantile: f64::NAN,
                learning_rate: 0.2,
            },
            AdaptiveClip {
                count_noise: 5.0,
                quantile: 0.5,
                learning_rate: f64::INFINITY,
            },
        ] {
            let dp = ModelPrivacy {
                adaptive: Some(broken),
                ..thin
            };
            assert_eq!(dp.update_noise_multiplier(), None, "{broken:?}");
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            assert_eq!(broken.next_clip(2.0, &[1.0, 3.0], &mut rng), 2.0);
        }
        assert_eq!(
            ModelPrivacy {
                adaptive: None,
                ..thin
            }
            .update_noise_multiplier(),
            Some(1.0)
        );
    }

    #[test]
    fn an_adaptive_clip_settles_near_the_target_quantile_of_the_norms() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // 100 groups a round whose update norms are 1, 2, ..., 100: the
        // median is 50.5. From a clip far below and one far above.
        let norms: Vec<f64> = (1..=100).map(f64::from).collect();
        let adaptive = AdaptiveClip {
            quantile: 0.5,
            learning_rate: 0.2,
            count_noise: 100.0 / 20.0,
        };
        for start in [0.1, 1000.0] {
            let mut clip = start;
            for _ in 0..300 {
                clip = adaptive.next_clip(clip, &norms, &mut rng);
            }
            assert!((35.0..70.0).contains(&clip), "from {start}: {clip}");
        }
        // All under the clip: it shrinks; all over: it grows; none: kept.
        let exact = AdaptiveClip {
            count_noise: 1e-9,
            ..adaptive
        };
        assert!(exact.next_clip(10.0, &[1.0, 2.0], &mut rng) < 10.0);
        assert!(exact.next_clip(0.5, &[1.0, 2.0], &mut rng) > 0.5);
        assert_eq!(exact.next_clip(3.0, &[], &mut rng), 3.0);
    }

    #[test]
    fn a_noisy_hop_clips_the_update_and_adds_noise_of_the_stated_size() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let sent = vec![1.0f32; 4000];
        // An update of norm 10 in the first weight, clipped to 0.5, no noise.
        let mut clean = sent.clone();
        clean[0] += 10.0;
        let norm = noisy_hop(&sent, &mut clean, 0.5, 0.0, &mut rng);
        assert!((norm - 10.0).abs() < 1e-6);
        assert!(
            (clean[0] - 1.5).abs() < 1e-6 && clean[1] == 1.0,
            "{}",
            clean[0]
        );
        // No update, noise multiplier 2 at clip 0.5: deviation 1.
        let mut noisy = sent.clone();
        noisy_hop(&sent, &mut noisy, 0.5, 2.0, &mut rng);
        let deviation = deviation_from(&noisy, 1.0);
        assert!((deviation - 1.0).abs() < 0.05, "{deviation}");
        // Two hops at multiplier 5 spend as one Gaussian of multiplier 5/sqrt(2).
        assert!((hop_epsilon(5.0, 2, 1e-5) - hop_epsilon(5.0 / 2f64.sqrt(), 1, 1e-5)).abs() < 1e-9);
    }

    #[test]
    fn the_secure_split_of_a_clip_sums_to_it_and_a_chain_of_one_gives_all_to_its_masker() {
        assert_eq!(secure_clip_split(1.0, 1), (0.0, 1.0));
        assert_eq!(secure_clip_split(1.0, 0), (0.0, 1.0));
        let (chain, hop) = secure_clip_split(2.0, 10);
        assert!((chain - 1.8).abs() < 1e-12 && (hop - 0.2).abs() < 1e-12);
    }

    #[test]
    fn an_update_is_clipped_to_its_norm_and_a_broken_clip_takes_it_away() {
        let sent = [1.0f32, 1.0];
        let mut long = [4.0f32, 5.0]; // update (3, 4): norm 5
        assert_eq!(clip_update(&sent, &mut long, 1.0), 5.0);
        assert!((long[0] - 1.6).abs() < 1e-6 && (long[1] - 1.8).abs() < 1e-6);
        let mut short = [1.3f32, 1.4];
        clip_update(&sent, &mut short, 1.0);
        assert_eq!(short, [1.3, 1.4], "inside the ball: unchanged");
        for broken in [0.0, -1.0, f64::NAN] {
            let mut new = [4.0f32, 5.0];
            clip_update(&sent, &mut new, broken);
            assert_eq!(new, sent, "clip {broken}");
        }
        let mut infinite = [f32::INFINITY, 1.0];
        clip_update(&sent, &mut infinite, 1.0);
        assert_eq!(infinite, sent, "a non-finite update is taken away");
    }

    #[test]
    fn noise_on_a_given_mean_has_the_deviation_private_mean_gives_it() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut mean = vec![0.5f32; 20_000];
        noise_the_mean(&mut mean, 4.0, 2, &mut rng).unwrap();
        let deviation = deviation_from(&mean, 0.5);
        assert!((deviation - 2.0).abs() < 0.05, "{deviation}");
        // Same noise through private_mean over two unclipped updates at the mean.
        let global = vec![0.5f32; 20_000];
        let (values, _) = private_mean(&global, &[&global, &global], 1.0, 4.0, &mut rng).unwrap();
        let theirs = deviation_from(&values, 0.5);
        assert!(
            (theirs - deviation).abs() < 0.05,
            "{theirs} against {deviation}"
        );
        assert!(noise_the_mean(&mut mean, 1.0, 0, &mut rng).is_none());
        assert!(noise_the_mean(&mut mean, f64::NAN, 3, &mut rng).is_none());
    }

    #[test]
    fn shares_of_distributed_noise_give_any_quorum_of_survivors_the_rounds_noise() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Prepare: 4 maskers, unmasking needs 3; the round's noise on the
        // sum is 6, so on the mean of S results 6 / S.
        let (noise_std, quorum) = (6.0, 3);
        let share = distributed_noise_share(noise_std, quorum);
        assert!((share - 6.0 / 3f64.sqrt()).abs() < 1e-12);
        let received = vec![0.0f32; 20_000];
        for survivors in [3usize, 4] {
            // Execute: each survivor clips (a zero update) and adds its share;
            // the server sees only their unweighted mean.
            let mut mean = vec![0.0f64; received.len()];
            for _ in 0..survivors {
                let mut trained = received.clone();
                private_masked_hop(&received, &mut trained, 1.0, Some(share), &mut rng).unwrap();
                for (m, t) in mean.iter_mut().zip(&trained) {
                    *m += f64::from(*t) / survivors as f64;
                }
            }
            let released: Vec<f32> = mean.iter().map(|&m| m as f32).collect();

            // Assert: the quorum carries exactly the round's noise, more
            // survivors more than it (never less).
            let deviation = deviation_from(&released, 0.0);
            let expected = noise_std / survivors as f64 * (survivors as f64 / quorum as f64).sqrt();
            assert!(
                (deviation / expected - 1.0).abs() < 0.03,
                "{survivors} survivors: {deviation} against {expected}"
            );
            assert!(deviation >= 0.97 * noise_std / survivors as f64);
        }
    }

    #[test]
    fn the_masker_clips_before_it_noises_and_refuses_what_it_cannot_apply() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let received = [1.0f32, 1.0];
        let mut trained = [4.0f32, 5.0]; // update (3, 4): norm 5
        private_masked_hop(&received, &mut trained, 1.0, None, &mut rng).unwrap();
        assert!((trained[0] - 1.6).abs() < 1e-6 && (trained[1] - 1.8).abs() < 1e-6);
        let mut noised = [4.0f32, 5.0];
        private_masked_hop(&received, &mut noised, 1.0, Some(0.0), &mut rng).unwrap();
        assert_eq!(noised, trained, "no noise: the clipped hop");
        for (clip, noise) in [
            (f64::NAN, None),
            (0.0, None),
            (f64::INFINITY, None),
            (1.0, Some(f64::NAN)),
            (1.0, Some(-1.0)),
            (1.0, Some(f64::INFINITY)),
        ] {
            let mut untouched = [4.0f32, 5.0];
            assert!(
                private_masked_hop(&received, &mut untouched, clip, noise, &mut rng).is_err(),
                "clip {clip}, noise {noise:?}"
            );
            assert_eq!(untouched, [4.0, 5.0]);
        }
        assert!(private_masked_hop(&received, &mut [1.0], 1.0, None, &mut rng).is_err());
    }

    #[test]
    fn the_noise_found_for_a_budget_spends_that_budget() {
        let sigma = noise_for_epsilon(0.05, 40, 1e-5, 2.996_297_753_108_411_4).unwrap();
        assert!((sigma - 1.0).abs() < 0.002, "{sigma}");
        assert!(noise_for_epsilon(1.0, 1_000_000, 1e-5, 1e-6).is_none());
    }

    #[test]
    fn the_gaussian_mechanism_without_sampling_has_its_closed_form() {
        // RDP of the Gaussian mechanism: alpha / (2 sigma^2).
        assert!((sampled_gaussian_rdp(1.0, 2.0, 8) - 1.0).abs() < 1e-12);
        // Sampling at q -> 1 through the series agrees with it.
        let near = sampled_gaussian_rdp(0.999_999, 2.0, 8);
        assert!((near - 1.0).abs() < 1e-4, "{near}");
        // And it is never more than without sampling.
        assert!(sampled_gaussian_rdp(0.01, 1.0, 32) < sampled_gaussian_rdp(1.0, 1.0, 32));
    }
}
