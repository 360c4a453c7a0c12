//! Weighted aggregation of mediator (or client) updates (docs/METHOD.md step 7):
//! `w_{r+1} = w_r + sum_m (n_m / n) * (w_m - w_r)`.
//!
//! The [`Aggregator`] folds one update at a time into a single running sum,
//! so memory stays one model's worth however many updates arrive. Because
//! the weights n_m / n sum to one, the rule equals the sample-weighted mean
//! of the updates, which is what the sum accumulates.

/// Errors while folding an update.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// The update has the wrong number of parameters.
    #[error("update has {got} parameters, expected {expected}")]
    WrongLength {
        /// Parameters received.
        got: usize,
        /// Parameters of the global model.
        expected: usize,
    },
    /// The update contains NaN or infinity.
    #[error("update has a non-finite value at index {index}")]
    NonFinite {
        /// Index of the first bad value.
        index: usize,
    },
    /// No update carried any samples.
    #[error("no update to aggregate (0 samples in total)")]
    Empty,
    /// A robust aggregation rule's parameters are out of range.
    #[error("invalid aggregation rule: {reason}")]
    InvalidRule {
        /// Which parameter, and its value.
        reason: String,
    },
    /// The aggregate itself came out NaN or infinite (a weighted sum
    /// overflowed, say); such a model is never returned.
    #[error("aggregate has a non-finite value at index {index}")]
    NonFiniteResult {
        /// Index of the first bad value.
        index: usize,
    },
}

/// A running sample-weighted sum of updates to one global model.
#[derive(Debug, Clone)]
pub struct Aggregator<'a> {
    global: &'a [f32],
    sum: Vec<f32>,
    samples: u64,
}

impl<'a> Aggregator<'a> {
    /// Starts an aggregation against the round's global weights.
    pub fn new(global: &'a [f32]) -> Self {
        Self {
            global,
            sum: vec![0.0; global.len()],
            samples: 0,
        }
    }

    /// Folds in one update trained on `samples` samples. A rejected update
    /// leaves the running sum untouched.
    pub fn fold(&mut self, weights: &[f32], samples: u64) -> Result<(), AggregateError> {
        if weights.len() != self.global.len() {
            return Err(AggregateError::WrongLength {
                got: weights.len(),
                expected: self.global.len(),
            });
        }
        // NaN and infinities are the values whose exponent bits are all
        // set. OR-ing that test over the update has no early exit and no
        // ordering constraint, so it vectorises and streams at memory speed;
        // only a bad update pays for finding the index.
        const EXPONENT: u32 = 0x7f80_0000;
        let bad = weights.iter().fold(0u32, |acc, v| {
            acc | u32::from(v.to_bits() & EXPONENT == EXPONENT)
        });
        if bad != 0 {
            let index = weights.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(AggregateError::NonFinite { index });
        }
        // Since the sample weights sum to 1, w + sum (n_m / n)(w_m - w) is
        // sum (n_m / n) w_m: the running sum needs only the update itself.
        let n = samples as f32;
        for (acc, w) in self.sum.iter_mut().zip(weights) {
            *acc += n * w;
        }
        self.samples += samples;
        Ok(())
    }

    /// Total samples folded so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The new global weights: the sample-weighted mean of the updates.
    pub fn finish(self) -> Result<Vec<f32>, AggregateError> {
        if self.samples == 0 {
            return Err(AggregateError::Empty);
        }
        let inv = 1.0 / self.samples as f32;
        Ok(self.sum.into_iter().map(|s| s * inv).collect())
    }
}

/// Aggregates `(weights, samples)` updates against `global` in one call.
pub fn aggregate(global: &[f32], updates: &[(&[f32], u64)]) -> Result<Vec<f32>, AggregateError> {
    let mut aggregator = Aggregator::new(global);
    for (weights, samples) in updates {
        aggregator.fold(weights, *samples)?;
    }
    aggregator.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_follow_sample_counts_as_worked_by_hand() {
        // Prepare: global [1, 1]; mediator A (30 samples) -> [4, 1],
        // mediator B (10 samples) -> [0, 5].
        let global = [1.0, 1.0];

        // Execute
        let new = aggregate(&global, &[(&[4.0, 1.0], 30), (&[0.0, 5.0], 10)]).unwrap();

        // Assert: 1 + 0.75 * 3 + 0.25 * -1 = 3; 1 + 0.75 * 0 + 0.25 * 4 = 2.
        assert_eq!(new, vec![3.0, 2.0]);
    }

    #[test]
    fn bad_updates_are_refused_and_leave_the_sum_untouched() {
        let global = [0.0, 0.0, 0.0];
        let mut aggregator = Aggregator::new(&global);

        let short = aggregator.fold(&[1.0, 1.0], 5);
        let nan = aggregator.fold(&[1.0, f32::INFINITY, 1.0], 5);
        aggregator.fold(&[2.0, 2.0, 2.0], 5).unwrap();

        assert_eq!(
            short,
            Err(AggregateError::WrongLength {
                got: 2,
                expected: 3
            })
        );
        assert_eq!(nan, Err(AggregateError::NonFinite { index: 1 }));
        assert_eq!(aggregator.finish().unwrap(), vec![2.0, 2.0, 2.0]);
    }

    #[test]
    fn nothing_to_aggregate_is_an_error() {
        assert_eq!(aggregate(&[1.0], &[]), Err(AggregateError::Empty));
    }
}
