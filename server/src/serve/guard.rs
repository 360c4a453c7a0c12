//! The outlier guard: an update whose distance from the weights it was
//! trained from is far above the recent ones is refused, so one hostile or
//! broken client cannot drag the global model away.

use std::collections::VecDeque;

/// Recent accepted update norms and the rule that judges a new one.
#[derive(Debug, Clone)]
pub struct NormGuard {
    recent: VecDeque<f64>,
    window: usize,
    min_history: usize,
    factor: f64,
}

impl NormGuard {
    /// Refuses norms above `factor` times the median of the last `window`
    /// accepted ones, once `min_history` have been seen.
    pub fn new(factor: f64, window: usize, min_history: usize) -> Self {
        Self {
            recent: VecDeque::with_capacity(window),
            window: window.max(1),
            min_history,
            factor,
        }
    }

    /// How many medians make an outlier.
    pub fn factor(&self) -> f64 {
        self.factor
    }

    fn median(&self) -> Option<f64> {
        if self.recent.len() < self.min_history.max(1) {
            return None;
        }
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        Some(sorted[sorted.len() / 2])
    }

    /// Judges an update's norm: `Err(median)` when it is an outlier, else it
    /// is remembered and `Ok`.
    pub fn check(&mut self, norm: f64) -> Result<(), f64> {
        if let Some(median) = self.median()
            && norm > self.factor * median
        {
            return Err(median);
        }
        if self.recent.len() == self.window {
            self.recent.pop_front();
        }
        self.recent.push_back(norm);
        Ok(())
    }
}

impl Default for NormGuard {
    /// 10x the median of the last 100, after 5 updates.
    fn default() -> Self {
        Self::new(10.0, 100, 5)
    }
}

/// Euclidean distance between two weight vectors of equal length.
pub fn delta_norm(new: &[f32], old: &[f32]) -> f64 {
    new.iter()
        .zip(old)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_norm_far_above_the_median_is_refused_once_history_exists() {
        // Prepare
        let mut guard = NormGuard::new(10.0, 100, 3);

        // Execute: the first norms build history; nothing is refused before.
        let early = guard.check(500.0);
        let normal: Vec<_> = [1.0, 1.2, 0.9, 1.1]
            .iter()
            .map(|&n| guard.check(n))
            .collect();
        let outlier = guard.check(50.0);
        let borderline = guard.check(9.0);

        // Assert: history [500, 1, 1.2, 0.9, 1.1] has median 1.1.
        assert_eq!(early, Ok(()));
        assert!(normal.iter().all(Result::is_ok));
        assert_eq!(outlier, Err(1.1));
        assert_eq!(borderline, Ok(()));
    }

    #[test]
    fn delta_norm_is_euclidean() {
        assert_eq!(delta_norm(&[3.0, 4.0, 1.0], &[0.0, 0.0, 1.0]), 5.0);
    }
}
