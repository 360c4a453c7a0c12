//! Label counts under local differential privacy: what a client's label
//! report reveals of its samples, bounded.
//!
//! A client adds discrete Laplace noise of scale `1 / epsilon` to each of
//! its label counts before they leave it ([`noisy_counts`]; the geometric
//! mechanism, Ghosh, Roughgarden and Sundararajan 2012), drawn by OpenDP's
//! exact sampler (Canonne, Kamath and Steinke 2020; in the browser as the
//! difference of two geometric draws), and clamps at zero
//! (post-processing). Neighbouring datasets differ by one sample added or
//! removed, which moves one count by one (L1 sensitivity 1), so a report is
//! `epsilon`-DP for every sample ([`label_report_epsilon`], OpenDP's privacy
//! map); a sample whose label changes moves two counts and is `2 epsilon`-DP.
//! The post-plan report is computed from the noisy report and the plan
//! ([`planned_counts`]), which is post-processing: it spends nothing more.

#[cfg(not(target_arch = "wasm32"))]
use opendp::domains::{AtomDomain, VectorDomain};
#[cfg(not(target_arch = "wasm32"))]
use opendp::measurements::make_laplace;
#[cfg(not(target_arch = "wasm32"))]
use opendp::measures::MaxDivergence;
#[cfg(not(target_arch = "wasm32"))]
use opendp::metrics::L1Distance;

use super::PrivacyError;
#[cfg(any(target_arch = "wasm32", test))]
use super::model::entropy_rng;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
