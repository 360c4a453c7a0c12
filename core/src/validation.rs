//! The update guard's loss rule: a hop may not make the model much worse on
//! a small validation set the server holds.
//!
//! The norm rules of [`crate::guard`] cannot see an update that has an
//! honest size but a harmful direction: a reversed (sign-flipped) update a
//! few times an honest one passes both. Its effect on a loss can be seen.
//! Zeno (Xie, Koyejo & Gupta, "Zeno: Distributed Stochastic Gradient Descent
//! with Suspicion-based Fault-tolerance", ICML 2019) scores each update by
//! the loss decrease it brings on a batch the server holds; Fang et al.
//! ("Local Model Poisoning Attacks to Byzantine-Robust Federated Learning",
//! USENIX Security 2020, "loss function based rejection") remove the updates
//! that raise a validation loss most. We judge every hop alone, as the norm
//! rules do: a hop whose model has a validation loss more than
//! `max_increase` above the loss of the weights it was sent is refused.
//!
//! An honest hop on a client with one or two classes may raise the loss on
//! a balanced set too (it drifts towards its classes), so the bound is a
//! tolerance, measured in docs/RESULTS.md, not zero.

use burn::prelude::*;

use crate::data::Dataset;
use crate::model::ModelConfig;
use crate::train::{self, Samples};
use crate::weights::{ParamShape, Weights, WeightsError};

/// Default tolerance: a hop may raise the mean validation cross-entropy by
/// at most this many nats.
pub const DEFAULT_MAX_LOSS_INCREASE: f64 = 0.5;

/// Default size of the validation set: enough for a loss estimate whose
/// noise is far below the tolerance, small enough to judge a hop in a few
/// milliseconds.
pub const DEFAULT_VALIDATION_SAMPLES: usize = 256;

/// A hop the loss rule refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "it raised the validation loss from {before:.3} to {after:.3}, more than {max_increase} nats"
)]
pub struct LossIncrease {
    /// Mean cross-entropy (nats) of the weights sent.
    pub before: f64,
    /// Mean cross-entropy (nats) of the weights returned.
    pub after: f64,
    /// The rule's tolerance.
    pub max_increase: f64,
}

/// The server's validation samples and the rule's tolerance.
#[derive(Debug, Clone)]
pub struct LossCheck {
    model_config: ModelConfig,
    shapes: Vec<ParamShape>,
    images: Vec<f32>,
    labels: Vec<u32>,
    max_increase: f64,
}

impl LossCheck {
    /// Judges hops of the model `model_config` makes (its parameters laid
    /// out as `shapes`) on every sample of `set` (a few hundred suffice),
    /// with tolerance `max_increase` nats (non-finite or negative is taken
    /// as 0).
    pub fn new(
        model_config: ModelConfig,
        shapes: Vec<ParamShape>,
        set: &Dataset,
        max_increase: f64,
    ) -> Self {
        Self {
            model_config,
            shapes,
            images: set.images.clone(),
            labels: set.labels.clone(),
            max_increase: if max_increase.is_finite() {
                max_increase.max(0.0)
            } else {
                0.0
            },
        }
    }

    /// Samples it judges on.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether it has no samples (then every hop passes).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Mean cross-entropy (nats) of the flat weight vector `values` on the
    /// validation samples; a non-finite loss is returned as infinity.
    ///
    /// # Errors
    /// If `values` do not fit the model's shapes.
    pub fn loss(&self, values: &[f32], device: &Device) -> Result<f64, WeightsError> {
        let weights = Weights {
            shapes: self.shapes.clone(),
            values: values.to_vec(),
        };
        let samples = Samples {
            images: &self.images,
            labels: &self.labels,
        };
        let stats = train::evaluate(&self.model_config, &weights, samples, 256, device)?;
        Ok(if stats.loss.is_finite() {
            stats.loss
        } else {
            f64::INFINITY
        })
    }

    /// The rule on two losses (nats) already computed.
    ///
    /// # Errors
    /// [`LossIncrease`] when `after` exceeds `before` by more than the
    /// tolerance, or `after` is not finite.
    pub fn judge(&self, before: f64, after: f64) -> Result<(), LossIncrease> {
        let refused =
            !after.is_finite() || (before.is_finite() && after - before > self.max_increase);
        if refused && !self.is_empty() {
            return Err(LossIncrease {
                before,
                after,
                max_increase: self.max_increase,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;

    /// A check on `n` blank 28x28 images of class 0, with tolerance 0.5.
    fn check(n: usize) -> (LossCheck, Vec<f32>) {
        let classes: Vec<String> = (0..10).map(|c| c.to_string()).collect();
        let set = Dataset::new(vec![0.0; n * 784], vec![0; n], 1, 28, 28, classes).unwrap();
        let config = ModelConfig::for_dataset(&set);
        let device = Device::flex();
        let weights = Weights::from_model(&config.init(&device));
        let shapes = weights.shapes.clone();
        (LossCheck::new(config, shapes, &set, 0.5), weights.values)
    }

    #[test]
    fn a_hop_is_refused_only_past_the_tolerance() {
        let (check, _) = check(4);
        assert_eq!(check.judge(1.0, 1.5), Ok(()));
        assert_eq!(check.judge(1.0, 0.2), Ok(()));
        assert!(check.judge(1.0, 1.51).is_err());
        assert!(check.judge(1.0, f64::INFINITY).is_err());
        assert!(check.judge(1.0, f64::NAN).is_err());
        // A sent model that does not evaluate cannot be made worse.
        assert_eq!(check.judge(f64::INFINITY, 3.0), Ok(()));
    }

    #[test]
    fn a_model_pushed_towards_a_wrong_class_has_a_higher_loss() {
        // Prepare: every validation sample is class 0; the last 10 values
        // of the flat vector are the output layer's biases.
        let (check, values) = check(8);
        let device = Device::flex();
        let mut wrong = values.clone();
        let biases = wrong.len() - 10;
        wrong[biases + 3] += 8.0;

        // Execute
        let before = check.loss(&values, &device).unwrap();
        let after = check.loss(&wrong, &device).unwrap();

        // Assert: about 8 nats worse, refused; the untouched model passes.
        assert!(after - before > 5.0, "{before} -> {after}");
        assert!(check.judge(before, after).is_err());
        assert_eq!(
            check.judge(before, check.loss(&values, &device).unwrap()),
            Ok(())
        );
        assert!(check.loss(&values[1..], &device).is_err());
    }

    #[test]
    fn a_negative_or_non_finite_tolerance_is_zero() {
        let classes: Vec<String> = (0..2).map(|c| c.to_string()).collect();
        let set = Dataset::new(vec![0.0; 784], vec![0], 1, 28, 28, classes).unwrap();
        let config = ModelConfig::for_dataset(&set);
        for tolerance in [-1.0, f64::NAN] {
            let check = LossCheck::new(config.clone(), vec![], &set, tolerance);
            assert!(check.judge(1.0, 1.001).is_err());
            assert_eq!(check.judge(1.0, 1.0), Ok(()));
        }
    }
}
