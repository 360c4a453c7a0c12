//! The update guard: judges every update a client returns against the
//! weights it was sent, from the very first update of a run. The server
//! applies it to every hop; the simulator too, so its robustness figures
//! are the server's.
//!
//! Three rules, in order:
//! 1. every weight is finite and at most [`MAX_ABS_WEIGHT`] in magnitude
//!    (so the model stays finite, and f16 frames never overflow);
//! 2. the update moves the weights it was sent by at most `max_ratio` times
//!    their L2 norm: a bound relative to the model, which needs no history;
//! 3. once `min_history` updates were accepted, its distance is at most
//!    `factor` times the median of the recent accepted ones.
//!
//! The history of rule 3 is saved with every completed round and restored
//! on resume, so a restart does not open a window without it.

use std::collections::VecDeque;

use crate::protocol::limits::{MAX_ABS_WEIGHT, check_weights};

/// Default of rule 2: an update may move the weights by at most twice their
/// norm. Honest hops of the papers' CNN move them by a small fraction of it
/// (docs/RESULTS.md).
pub const DEFAULT_MAX_UPDATE_RATIO: f64 = 2.0;

/// Why the guard refused an update.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuardRefusal {
    /// A weight is non-finite or past [`MAX_ABS_WEIGHT`].
    #[error("weight {index} is {value}, outside ±{MAX_ABS_WEIGHT}")]
    OutOfBounds {
        /// Index of the first bad weight.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// The update moved the weights too far for the model's size.
    #[error("it moved the weights by {norm:.3}, over {max_ratio}x their norm {model_norm:.3}")]
    TooFar {
        /// L2 distance from the weights sent.
        norm: f64,
        /// L2 norm of the weights sent.
        model_norm: f64,
        /// The bound's factor.
        max_ratio: f64,
    },
    /// The update moved the weights far more than recent ones did.
    #[error(
        "it moved the weights by {norm:.3}, over {factor}x the median {median:.3} of recent updates"
    )]
    Outlier {
        /// L2 distance from the weights sent.
        norm: f64,
        /// Median distance of recent accepted updates.
        median: f64,
        /// The rule's factor.
        factor: f64,
    },
}

/// Recent accepted update distances and the rules that judge a new update.
#[derive(Debug, Clone)]
pub struct UpdateGuard {
    recent: VecDeque<f64>,
    window: usize,
    min_history: usize,
    factor: f64,
    max_ratio: f64,
}

impl UpdateGuard {
    /// Refuses updates farther than `max_ratio` times the sent model's norm,
    /// or than `factor` times the median of the last `window` accepted
    /// distances once `min_history` have been seen.
    pub fn new(max_ratio: f64, factor: f64, window: usize, min_history: usize) -> Self {
        Self {
            recent: VecDeque::with_capacity(window.max(1)),
            window: window.max(1),
            min_history,
            factor,
            max_ratio,
        }
    }

    fn median(&self) -> Option<f64> {
        if self.recent.len() < self.min_history.max(1) {
            return None;
        }
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        Some(sorted[sorted.len() / 2])
    }

    /// Judges the update `new` to the weights `sent` (equal lengths: the
    /// frame checks came first). An accepted update's distance joins the
    /// history; the distance is returned.
    ///
    /// # Errors
    /// The first rule the update breaks.
    pub fn check(&mut self, sent: &[f32], new: &[f32]) -> Result<f64, GuardRefusal> {
        if let Err(index) = check_weights(new) {
            return Err(GuardRefusal::OutOfBounds {
                index,
                value: new[index],
            });
        }
        let norm = delta_norm(new, sent);
        let model_norm = l2_norm(sent);
        // A model near zero (a fresh bias-only layer, a test's toy model)
        // still allows updates of norm up to max_ratio.
        if norm > self.max_ratio * model_norm.max(1.0) {
            return Err(GuardRefusal::TooFar {
                norm,
                model_norm,
                max_ratio: self.max_ratio,
            });
        }
        if let Some(median) = self.median()
            && norm > self.factor * median
        {
            return Err(GuardRefusal::Outlier {
                norm,
                median,
                factor: self.factor,
            });
        }
        if self.recent.len() == self.window {
            self.recent.pop_front();
        }
        self.recent.push_back(norm);
        Ok(norm)
    }

    /// The accepted distances it remembers, oldest first, to be saved.
    pub fn history(&self) -> Vec<f64> {
        self.recent.iter().copied().collect()
    }

    /// Takes back a saved history (the newest `window` finite entries).
    pub fn restore(&mut self, history: &[f64]) {
        self.recent.clear();
        let finite: Vec<f64> = history
            .iter()
            .copied()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .collect();
        let skip = finite.len().saturating_sub(self.window);
        self.recent.extend(&finite[skip..]);
    }
}

impl Default for UpdateGuard {
    /// [`DEFAULT_MAX_UPDATE_RATIO`]; 10x the median of the last 100, after 5
    /// updates.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_UPDATE_RATIO, 10.0, 100, 5)
    }
}

/// Euclidean distance between two weight vectors of equal length.
pub fn delta_norm(new: &[f32], old: &[f32]) -> f64 {
    new.iter()
        .zip(old)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Euclidean norm of a weight vector.
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(base: &[f32], by: f32) -> Vec<f32> {
        base.iter().map(|v| v + by).collect()
    }

    #[test]
    fn the_first_update_of_a_run_is_judged_against_the_model() {
        // Prepare: a fresh guard, no history at all (the bug: the first
        // update with one weight of 1e35 was accepted and the aggregate
        // became non-finite).
        let sent = vec![0.5f32; 100];
        let mut huge = sent.clone();
        huge[7] = 1e35;
        let mut far = sent.clone();
        far[3] = 500.0;

        // Execute
        let huge_outcome = UpdateGuard::default().check(&sent, &huge);
        let far_outcome = UpdateGuard::default().check(&sent, &far);
        let fine_outcome = UpdateGuard::default().check(&sent, &moved(&sent, 0.01));

        // Assert: the model's norm is 5, so 2x allows a move of 10.
        assert_eq!(
            huge_outcome,
            Err(GuardRefusal::OutOfBounds {
                index: 7,
                value: 1e35
            })
        );
        assert!(matches!(far_outcome, Err(GuardRefusal::TooFar { .. })));
        assert!(fine_outcome.is_ok());
    }

    #[test]
    fn a_distance_far_above_the_median_is_refused_once_history_exists() {
        // Prepare: a ratio bound loose enough to leave the median rule alone.
        let sent = vec![0.0f32; 4];
        let mut guard = UpdateGuard::new(1e9, 10.0, 100, 3);
        let update = |norm: f32| moved(&sent, norm / 2.0);

        // Execute: the first distances build history.
        let early = guard.check(&sent, &update(500.0));
        let normal: Vec<_> = [1.0, 1.2, 0.9, 1.1]
            .iter()
            .map(|&n| guard.check(&sent, &update(n)))
            .collect();
        let outlier = guard.check(&sent, &update(50.0));
        let borderline = guard.check(&sent, &update(9.0));

        // Assert: history [500, 1, 1.2, 0.9, 1.1] has median 1.1.
        assert!(early.is_ok());
        assert!(normal.iter().all(Result::is_ok));
        assert!(
            matches!(outlier, Err(GuardRefusal::Outlier { median, .. }) if (median - 1.1).abs() < 1e-6)
        );
        assert!(borderline.is_ok());
    }

    #[test]
    fn a_restored_history_judges_like_the_original() {
        // Prepare
        let sent = vec![0.0f32; 4];
        let mut original = UpdateGuard::new(1e9, 10.0, 3, 3);
        for n in [2.0, 4.0, 1.0, 1.0] {
            original.check(&sent, &moved(&sent, n / 2.0)).unwrap();
        }

        // Execute: restore what it saved, plus junk that must be ignored.
        let mut saved = original.history();
        saved.insert(0, f64::NAN);
        let mut restored = UpdateGuard::new(1e9, 10.0, 3, 3);
        restored.restore(&saved);

        // Assert: the window kept the newest three.
        assert_eq!(restored.history(), vec![4.0, 1.0, 1.0]);
        assert!(restored.check(&sent, &moved(&sent, 15.0)).is_err());
    }

    #[test]
    fn norms_are_euclidean() {
        assert_eq!(delta_norm(&[3.0, 4.0, 1.0], &[0.0, 0.0, 1.0]), 5.0);
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
    }
}
