//! Client-level differential privacy for the model: the mechanisms that
//! clip the updates and add Gaussian noise to them.
//!
//! - DP-FedAvg (McMahan, Ramage, Talwar and Zhang 2018): [`ModelPrivacy`]
//!   and [`private_mean`], the mean of the clipped updates with Gaussian
//!   noise; [`noise_the_mean`], the same noise on a mean the server did not
//!   compute itself (under secure aggregation).
//! - Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy 2021):
//!   [`AdaptiveClip`], the clip following a quantile of the update norms,
//!   its count's noise paid for by the update's
//!   ([`ModelPrivacy::update_noise_multiplier`], the paper's Theorem 1).
//! - Per-hop noise ([`HopPrivacy`], [`noisy_hop`]): every hop of a chain
//!   clipped and noised, so that what the next client sees is DP for the
//!   client before it (the Gaussian mechanism; its spend is
//!   [`hop_epsilon`]).
//! - Their parts: [`clip_update`], [`add_gaussian_noise`], and
//!   [`entropy_rng`] for noise a client draws itself.

use super::PrivacyError;
#[cfg(doc)]
use super::accountant::hop_epsilon;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::{RdpAccountant, deviation_from, hop_epsilon};

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
}
