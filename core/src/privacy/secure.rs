//! The glue between client-level DP and secure aggregation
//! ([`crate::secagg`]): the server cannot clip or noise what it cannot see,
//! so the chain's masker does its part before masking.
//!
//! - [`secure_clip_split`]: a chain's clip shared between the server and
//!   the masker, so that by the triangle inequality the chain's update is
//!   within the clip DP-FedAvg's sensitivity assumes (docs/PRIVACY.md).
//! - [`distributed_noise_share`]: the noise each masker adds so that any
//!   quorum of survivors carries the round's noise (distributed DP; Kairouz
//!   et al., "The Distributed Discrete Gaussian Mechanism for Federated
//!   Learning with Secure Aggregation", ICML 2021).
//! - [`private_masked_hop`]: the masker's step: its hop clipped, then its
//!   share of the noise added.

#[cfg(doc)]
use super::model::noise_the_mean;
use super::model::{add_gaussian_noise, clip_update};

/// Secure aggregation under client-level DP: the clip C of a chain of
/// `hops` hops split between the server, which clips the chain before its
/// masked last hop, and the masker, which clips that hop itself: `(C (1 -
/// 1/h), C / h)`. By the triangle inequality the chain's update is then
/// within C, what DP-FedAvg's sensitivity assumes (docs/PRIVACY.md).
pub fn secure_clip_split(clip: f64, hops: usize) -> (f64, f64) {
    let hops = hops.max(1) as f64;
    (clip * (1.0 - 1.0 / hops), clip / hops)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::deviation_from;

    #[test]
    fn the_secure_split_of_a_clip_sums_to_it_and_a_chain_of_one_gives_all_to_its_masker() {
        assert_eq!(secure_clip_split(1.0, 1), (0.0, 1.0));
        assert_eq!(secure_clip_split(1.0, 0), (0.0, 1.0));
        let (chain, hop) = secure_clip_split(2.0, 10);
        assert!((chain - 1.8).abs() < 1e-12 && (hop - 0.2).abs() < 1e-12);
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
}
