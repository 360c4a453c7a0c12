//! Applying Astraea's per-class plan `R[y]` to a client's own samples (docs/METHOD.md step 4):
//! which originals to keep, which transformed copies to add, and the resulting data set.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{AugmentConfig, Transform};

/// Why a plan could not be applied or a data set materialised; messages carry the numbers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AugmentError {
    /// A label has no entry in the ratio vector.
    #[error("label {label} at index {index} has no ratio among {num_ratios}")]
    LabelOutOfRange {
        /// Position of the sample.
        index: usize,
        /// Its label.
        label: u32,
        /// Length of the ratio vector.
        num_ratios: usize,
    },
    /// A ratio is negative or not finite.
    #[error("ratio for class {class} must be finite and non-negative, got {ratio}")]
    BadRatio {
        /// The class.
        class: usize,
        /// Its ratio.
        ratio: f64,
    },
    /// The buffers do not hold `labels` images of the stated shape.
    #[error("expected {expected} floats ({samples} samples of {sample_len}), got {got}")]
    ShapeMismatch {
        /// Floats expected.
        expected: usize,
        /// Floats given.
        got: usize,
        /// Samples (labels) given.
        samples: usize,
        /// Floats per sample.
        sample_len: usize,
    },
    /// A plan names a sample that is not in the data set.
    #[error("plan refers to sample {index} but the data set has {samples}")]
    IndexOutOfRange {
        /// The index in the plan.
        index: usize,
        /// Samples in the data set.
        samples: usize,
    },
}

/// What a client does to its own samples under the plan: which originals it keeps and which
/// transformed copies it adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanOutcome {
    /// Indices of the original samples kept, ascending.
    pub kept: Vec<usize>,
    /// One entry per added copy: the index of its source sample and the transform to apply.
    pub copies: Vec<(usize, Transform)>,
}

impl PlanOutcome {
    /// Samples in the local data set after the plan (kept originals plus copies).
    pub fn len(&self) -> usize {
        self.kept.len() + self.copies.len()
    }

    /// Whether the plan leaves the client with no data (possible when every class is dropped).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples per class after the plan: the post-plan counts a client reports before mediator
    /// rescheduling (docs/METHOD.md step 4).
    ///
    /// # Panics
    /// If an index is out of range for `labels` or a label not below `num_classes`; an outcome of
    /// [`apply_plan`] on the same labels never is.
    pub fn counts(&self, labels: &[u32], num_classes: usize) -> Vec<usize> {
        let mut counts = vec![0; num_classes];
        let sources = self
            .kept
            .iter()
            .copied()
            .chain(self.copies.iter().map(|&(i, _)| i));
        for i in sources {
            counts[labels[i] as usize] += 1;
        }
        counts
    }
}

/// Decides, for each of a client's samples, what Astraea's plan `ratios` (`R[y]` per class) does to
/// it.
///
/// - `R[y] < 1` (downsampled class): the sample is kept with probability `R[y]`.
/// - `R[y] = 1`: kept, nothing added.
/// - `R[y] > 1` (augmented class): kept, plus `floor(R[y] - 1)` copies and one more with
///   probability equal to the fractional part of `R[y] - 1`, so `R[y] - 1` copies on average.
///   Each copy gets its own [`Transform::random`].
///
/// # Errors
/// A label without a ratio, or a negative or non-finite ratio.
pub fn apply_plan(
    labels: &[u32],
    ratios: &[f64],
    config: &AugmentConfig,
    seed: u64,
) -> Result<PlanOutcome, AugmentError> {
    if let Some((class, &ratio)) = ratios
        .iter()
        .enumerate()
        .find(|(_, r)| !(r.is_finite() && **r >= 0.0))
    {
        return Err(AugmentError::BadRatio { class, ratio });
    }
    if let Some(index) = labels.iter().position(|&l| l as usize >= ratios.len()) {
        return Err(AugmentError::LabelOutOfRange {
            index,
            label: labels[index],
            num_ratios: ratios.len(),
        });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut outcome = PlanOutcome {
        kept: Vec::new(),
        copies: Vec::new(),
    };
    for (i, &label) in labels.iter().enumerate() {
        let ratio = ratios[label as usize];
        if ratio < 1.0 {
            if rng.random_bool(ratio) {
                outcome.kept.push(i);
            }
            continue;
        }
        outcome.kept.push(i);
        let extra = ratio - 1.0;
        let copies = extra.floor() as usize + usize::from(rng.random_bool(extra.fract()));
        for _ in 0..copies {
            outcome
                .copies
                .push((i, Transform::random(config, &mut rng)));
        }
    }
    Ok(outcome)
}

/// Builds the client's new local data set from `plan`: kept originals in order, then the
/// transformed copies, each with its source's label.
///
/// # Errors
/// `sample_len` differing from `channels * height * width`, `images` not holding `labels.len()`
/// samples, or a plan index out of range.
pub fn materialise(
    images: &[f32],
    labels: &[u32],
    sample_len: usize,
    channels: usize,
    height: usize,
    width: usize,
    plan: &PlanOutcome,
) -> Result<(Vec<f32>, Vec<u32>), AugmentError> {
    let samples = labels.len();
    let shape_error = |expected, got| AugmentError::ShapeMismatch {
        expected,
        got,
        samples,
        sample_len,
    };
    if sample_len != channels * height * width {
        return Err(shape_error(channels * height * width, sample_len));
    }
    if images.len() != samples * sample_len {
        return Err(shape_error(samples * sample_len, images.len()));
    }
    let sources = plan
        .kept
        .iter()
        .copied()
        .chain(plan.copies.iter().map(|&(i, _)| i));
    if let Some(index) = sources.clone().find(|&i| i >= samples) {
        return Err(AugmentError::IndexOutOfRange { index, samples });
    }
    let image = |i: usize| &images[i * sample_len..(i + 1) * sample_len];
    let mut out_images = Vec::with_capacity(plan.len() * sample_len);
    for &i in &plan.kept {
        out_images.extend_from_slice(image(i));
    }
    for (i, transform) in &plan.copies {
        out_images.extend(transform.apply(image(*i), channels, height, width));
    }
    Ok((out_images, sources.map(|i| labels[i]).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_one_keeps_everything_and_adds_nothing() {
        // Prepare
        let labels = vec![0, 1, 0, 1, 1];
        // Execute
        let plan = apply_plan(&labels, &[1.0, 1.0], &AugmentConfig::default(), 1).unwrap();
        // Assert
        assert_eq!(plan.kept, vec![0, 1, 2, 3, 4]);
        assert!(plan.copies.is_empty());
    }

    #[test]
    fn downsampling_keeps_about_the_ratio() {
        // Prepare: 10,000 samples kept with p = 0.5; the standard deviation of the count is 50.
        let labels = vec![0u32; 10_000];
        // Execute
        let plan = apply_plan(&labels, &[0.5], &AugmentConfig::default(), 2).unwrap();
        // Assert
        assert!(
            plan.kept.len().abs_diff(5_000) < 250,
            "kept {}",
            plan.kept.len()
        );
        assert!(plan.copies.is_empty());
        assert_eq!(plan.counts(&labels, 1), vec![plan.kept.len()]);
    }

    #[test]
    fn augmentation_adds_ratio_minus_one_copies_on_average() {
        // Prepare: class 1 has R = 2.5, so each sample gets 1 copy plus 1 more half the time
        // (15,000 expected of 10,000, standard deviation 50); class 0 is untouched.
        let labels: Vec<u32> = (0..20_000).map(|i| (i % 2) as u32).collect();
        // Execute
        let plan = apply_plan(&labels, &[1.0, 2.5], &AugmentConfig::default(), 3).unwrap();
        // Assert
        assert_eq!(plan.kept.len(), 20_000);
        assert!(
            plan.copies.len().abs_diff(15_000) < 250,
            "copies {}",
            plan.copies.len()
        );
        assert!(plan.copies.iter().all(|&(i, _)| labels[i] == 1));
        assert_eq!(
            plan.counts(&labels, 2),
            vec![10_000, 10_000 + plan.copies.len()]
        );
    }

    #[test]
    fn plan_is_reproducible_and_seed_dependent() {
        // Prepare
        let labels: Vec<u32> = (0..100).map(|i| (i % 3) as u32).collect();
        let ratios = [0.5, 1.0, 1.7];
        // Execute
        let a = apply_plan(&labels, &ratios, &AugmentConfig::default(), 4).unwrap();
        let b = apply_plan(&labels, &ratios, &AugmentConfig::default(), 4).unwrap();
        let c = apply_plan(&labels, &ratios, &AugmentConfig::default(), 5).unwrap();
        // Assert
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn materialise_builds_kept_then_copies_with_source_labels() {
        // Prepare: three 1x2x2 images; keep 0 and 2, add a shifted copy of 2.
        let images: Vec<f32> = (0..12).map(|i| i as f32 / 12.0).collect();
        let labels = vec![5, 6, 7];
        let shift = Transform::Shift { dx: 1.0, dy: 0.0 };
        let plan = PlanOutcome {
            kept: vec![0, 2],
            copies: vec![(2, shift)],
        };
        // Execute
        let (out, out_labels) = materialise(&images, &labels, 4, 1, 2, 2, &plan).unwrap();
        // Assert
        assert_eq!(out_labels, vec![5, 7, 7]);
        assert_eq!(out.len(), 12);
        assert_eq!(out[..8], [&images[..4], &images[8..]].concat()[..]);
        assert_eq!(out[8..], [0.0, images[8], 0.0, images[10]]);
    }

    #[test]
    fn bad_inputs_are_errors_with_numbers() {
        // Prepare
        let plan = PlanOutcome {
            kept: vec![3],
            copies: vec![],
        };
        // Execute, Assert
        let config = AugmentConfig::default();
        assert_eq!(
            apply_plan(&[0, 2], &[1.0, 1.0], &config, 0),
            Err(AugmentError::LabelOutOfRange {
                index: 1,
                label: 2,
                num_ratios: 2
            })
        );
        assert!(matches!(
            apply_plan(&[0], &[-1.0], &config, 0),
            Err(AugmentError::BadRatio { class: 0, .. })
        ));
        assert!(matches!(
            materialise(&[0.0; 7], &[0, 1], 4, 1, 2, 2, &plan),
            Err(AugmentError::ShapeMismatch { got: 7, .. })
        ));
        assert_eq!(
            materialise(&[0.0; 8], &[0, 1], 4, 1, 2, 2, &plan),
            Err(AugmentError::IndexOutOfRange {
                index: 3,
                samples: 2
            })
        );
        assert_eq!(
            AugmentError::ShapeMismatch {
                expected: 8,
                got: 7,
                samples: 2,
                sample_len: 4
            }
            .to_string(),
            "expected 8 floats (2 samples of 4), got 7"
        );
    }
}
