//! The augmentation and downsampling plan (docs/METHOD.md step 3): a ratio R[y]
//! per class that each client applies to its own data.

use serde::{Deserialize, Serialize};

use super::stats::GlobalStats;

/// Which rule turns global statistics into ratios.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum PlanRule {
    /// The TPDS z-score rule: augment classes with Z < -1/tau_d, downsample
    /// classes with Z > tau_d.
    ZScore {
        /// tau_d, 3.5 in the paper.
        tau_d: f64,
    },
    /// The older ICCD rule: every class below the mean gets
    /// `(mu / C_y)^alpha` samples per original; nothing is downsampled.
    Alpha {
        /// alpha, 0.67 in the paper.
        alpha: f64,
    },
}

impl PlanRule {
    /// The rule's threshold: tau_d or alpha.
    pub fn threshold(&self) -> f64 {
        match *self {
            Self::ZScore { tau_d } => tau_d,
            Self::Alpha { alpha } => alpha,
        }
    }
}

impl Default for PlanRule {
    fn default() -> Self {
        PlanRule::ZScore { tau_d: 3.5 }
    }
}

/// R[y] for every class: below 1 keeps a share of the class, above 1 adds
/// augmented copies, 1 leaves it alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentationPlan {
    /// One ratio per class.
    pub ratios: Vec<f64>,
}

impl AugmentationPlan {
    /// The plan that changes nothing.
    pub fn identity(num_classes: usize) -> Self {
        Self {
            ratios: vec![1.0; num_classes],
        }
    }

    /// Computes the plan for `stats` under `rule`.
    ///
    /// A class with no samples anywhere keeps R = 1: there is nothing to
    /// augment it from.
    pub fn compute(stats: &GlobalStats, rule: PlanRule) -> Self {
        let ratios = stats
            .counts
            .iter()
            .zip(&stats.z)
            .map(|(&count, &z)| {
                if count <= 0.0 {
                    return 1.0;
                }
                match rule {
                    PlanRule::ZScore { tau_d } => {
                        let tau_a = -1.0 / tau_d;
                        if z < tau_a {
                            (stats.mean - stats.std * (z * tau_a).sqrt()) / count
                        } else if z > tau_d {
                            (stats.mean + stats.std * (z * tau_d).sqrt()) / count
                        } else {
                            1.0
                        }
                    }
                    PlanRule::Alpha { alpha } => {
                        if count < stats.mean {
                            (stats.mean / count).powf(alpha)
                        } else {
                            1.0
                        }
                    }
                }
            })
            .collect();
        Self { ratios }
    }

    /// Expected class counts after applying the plan to `counts`.
    pub fn expected_counts(&self, counts: &[f64]) -> Vec<f64> {
        counts
            .iter()
            .zip(&self.ratios)
            .map(|(c, r)| c * r)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    #[test]
    fn zscore_rule_downsamples_a_majority_and_spares_a_class_just_above_tau_a() {
        // Prepare: C = [2, 100 x 8, 1000]: mu = 180.2, sigma = 274.824,
        // z = [-0.648, -0.292 x 8, 2.983]; tau_d = 1.5 so tau_a = -0.667.
        let mut counts = vec![100.0; 10];
        counts[0] = 2.0;
        counts[9] = 1000.0;
        let stats = GlobalStats::from_counts(counts);
        close(stats.mean, 180.2);

        // Execute
        let plan = AugmentationPlan::compute(&stats, PlanRule::ZScore { tau_d: 1.5 });

        // Assert: target_9 = 180.2 + 274.824 * sqrt(2.983 * 1.5) = 0.7615 * 1000.
        close(plan.ratios[9], 0.7615358422279014);
        close(plan.ratios[0], 1.0);
        close(plan.ratios[5], 1.0);
    }

    #[test]
    fn zscore_minority_target_lies_between_its_count_and_the_threshold() {
        // Prepare: one rare class among ten; mu = 910, sigma = 270.
        let mut counts = vec![1000.0; 10];
        counts[3] = 100.0;
        let stats = GlobalStats::from_counts(counts);
        close(stats.mean, 910.0);
        close(stats.std, 270.0);
        // z3 = (100 - 910) / 270 = -3; tau_a = -1/3.5.
        let tau_d = 3.5;
        let tau_a = -1.0 / tau_d;

        // Execute
        let plan = AugmentationPlan::compute(&stats, PlanRule::ZScore { tau_d });

        // Assert: target = 910 - 270 * sqrt(3 / 3.5) = 660.03; R = 6.6003.
        let target = 910.0 - 270.0 * (3.0f64 / 3.5).sqrt();
        close(plan.ratios[3], target / 100.0);
        close(plan.ratios[3], 6.600_285_730_614_112);
        assert!(target > 100.0 && target < 910.0 + 270.0 * tau_a);
        // The others have z = 1/3 and stay.
        close(plan.ratios[0], 1.0);
    }

    #[test]
    fn alpha_rule_augments_every_class_below_the_mean() {
        // C = [10, 40, 100]; mu = 50.
        let stats = GlobalStats::from_counts(vec![10.0, 40.0, 100.0]);

        let plan = AugmentationPlan::compute(&stats, PlanRule::Alpha { alpha: 0.67 });

        close(plan.ratios[0], 2.939_746_641_659_326);
        close(plan.ratios[1], 1.161_260_646_661_245_6);
        close(plan.ratios[2], 1.0);
    }

    #[test]
    fn a_class_with_no_samples_is_left_alone() {
        let stats = GlobalStats::from_counts(vec![0.0, 500.0, 500.0, 500.0]);
        let plan = AugmentationPlan::compute(&stats, PlanRule::ZScore { tau_d: 3.5 });
        assert_eq!(plan.ratios[0], 1.0);
    }
}
