//! The learned mediator scheduler's actor: one small network shared by every
//! agent (every mediator being formed), scoring each action open to the
//! agent in turn from what [`super::formation::Formation::observe`] shows.
//! Executed here, in plain Rust, one pass per pick over all the candidates;
//! trained elsewhere (the simulator's `scheduler` trainer, with burn's
//! autodiff), then saved as safetensors with its configuration in the
//! metadata.
//!
//! The network: `FEATURES -> hidden -> 1`, one ReLU layer, weights
//! `l1.weight [FEATURES, hidden]`, `l1.bias [hidden]`, `out.weight [hidden,
//! 1]`, `out.bias [1]` (burn's `Linear` layout: `y = x W + b`). One hidden
//! layer is what lets a pick cost a few operations per candidate: the first
//! layer is linear, so the parts of a row fixed for the round or the turn
//! are summed once ([`super::scheduler`]), and a round of 1,000
//! participants is formed in milliseconds.

use std::collections::BTreeMap;

use super::formation::FEATURES;
use crate::weights::{ParamShape, Weights, WeightsError};

/// The `format` metadata value that marks a scheduler policy file.
pub const POLICY_FORMAT: &str = "astraea-scheduler-policy";

/// Version of the policy file's layout; bumped when a feature's meaning
/// changes (an old policy would then see the wrong inputs).
pub const POLICY_VERSION: u32 = 1;

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not a readable safetensors file, or the tensors do not fit.
    #[error("policy weights: {0}")]
    Weights(#[from] WeightsError),
    /// The metadata is missing or names another format or version.
    #[error("not an Astraea scheduler policy: {0}")]
    Format(String),
}

/// A trained actor, ready to score actions.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    hidden: usize,
    weights: Weights,
    /// Free-form description of how it was trained (stored in the
    /// metadata as `training`, JSON).
    pub training: String,
}

/// The parameter shapes of an actor with `hidden` units a layer.
pub fn policy_shapes(hidden: usize) -> Vec<ParamShape> {
    let shape = |name: &str, dims: Vec<usize>| ParamShape {
        name: name.into(),
        dims,
    };
    vec![
        shape("l1.weight", vec![FEATURES, hidden]),
        shape("l1.bias", vec![hidden]),
        shape("out.weight", vec![hidden, 1]),
        shape("out.bias", vec![1]),
    ]
}

impl Policy {
    /// An actor from flat weights in [`policy_shapes`] order.
    ///
    /// # Errors
    /// A wrong length or a non-finite value.
    pub fn new(hidden: usize, values: Vec<f32>, training: String) -> Result<Self, PolicyError> {
        let shapes = policy_shapes(hidden);
        let weights = Weights { shapes, values };
        weights.check_fits(&weights.shapes)?;
        Ok(Self {
            hidden,
            weights,
            training,
        })
    }

    /// Units per hidden layer.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// The flat weights, in [`policy_shapes`] order.
    pub fn values(&self) -> &[f32] {
        &self.weights.values
    }

    /// The layers: `(l1.weight [FEATURES * hidden, row-major], l1.bias
    /// [hidden], out.weight [hidden], out.bias)`.
    pub fn layers(&self) -> (&[f32], &[f32], &[f32], f32) {
        let h = self.hidden;
        let v = &self.weights.values;
        let (w1, rest) = v.split_at(FEATURES * h);
        let (b1, rest) = rest.split_at(h);
        let (w2, b2) = rest.split_at(h);
        (w1, b1, w2, b2[0])
    }

    /// Scores of `rows` (each [`FEATURES`] numbers), one per row; the agent
    /// takes the highest.
    pub fn scores(&self, rows: &[f32]) -> Vec<f32> {
        let h = self.hidden;
        let (w1, b1, w2, b2) = self.layers();
        let mut a = vec![0.0f32; h];
        rows.chunks_exact(FEATURES)
            .map(|x| {
                a.copy_from_slice(b1);
                for (xi, wrow) in x.iter().zip(w1.chunks_exact(h)) {
                    for (aj, wj) in a.iter_mut().zip(wrow) {
                        *aj += xi * wj;
                    }
                }
                b2 + a
                    .iter()
                    .zip(w2)
                    .map(|(aj, wj)| aj.max(0.0) * wj)
                    .sum::<f32>()
            })
            .collect()
    }

    /// The policy as a safetensors file: the tensors of [`policy_shapes`]
    /// and metadata `format`, `version`, `features`, `hidden`, `training`.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let metadata = BTreeMap::from([
            ("format".to_string(), POLICY_FORMAT.to_string()),
            ("version".to_string(), POLICY_VERSION.to_string()),
            ("features".to_string(), FEATURES.to_string()),
            ("hidden".to_string(), self.hidden.to_string()),
            ("training".to_string(), self.training.clone()),
        ]);
        self.weights.to_safetensors_with(Some(metadata))
    }

    /// Reads a policy written by [`Policy::to_safetensors`].
    ///
    /// # Errors
    /// Unreadable bytes, another format or version, a feature count other
    /// than [`FEATURES`], tensors of the wrong shape or non-finite values.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, PolicyError> {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| WeightsError::Unreadable(e.to_string()))?;
        let metadata = header
            .metadata()
            .clone()
            .ok_or_else(|| PolicyError::Format("no metadata".into()))?;
        let field = |key: &str| {
            metadata
                .get(key)
                .cloned()
                .ok_or_else(|| PolicyError::Format(format!("no {key:?} in the metadata")))
        };
        if field("format")? != POLICY_FORMAT {
            return Err(PolicyError::Format(format!(
                "format is {:?}, expected {POLICY_FORMAT:?}",
                field("format")?
            )));
        }
        if field("version")? != POLICY_VERSION.to_string() {
            return Err(PolicyError::Format(format!(
                "version {}, this build reads {POLICY_VERSION}",
                field("version")?
            )));
        }
        if field("features")? != FEATURES.to_string() {
            return Err(PolicyError::Format(format!(
                "{} features, this build has {FEATURES}",
                field("features")?
            )));
        }
        let hidden: usize = field("hidden")?
            .parse()
            .ok()
            .filter(|h| (1..=1024).contains(h))
            .ok_or_else(|| PolicyError::Format("hidden is not a size in 1..=1024".into()))?;
        let weights = Weights::from_safetensors(bytes, &policy_shapes(hidden))?;
        Ok(Self {
            hidden,
            weights,
            training: metadata.get("training").cloned().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hidden: usize, seed: u32) -> Policy {
        let n: usize = policy_shapes(hidden).iter().map(ParamShape::numel).sum();
        let values = (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Policy::new(hidden, values, "{\"test\":true}".into()).unwrap()
    }

    #[test]
    fn scores_follow_the_layers_as_written() {
        // A 1-unit network written out by hand: relu(x W1 + b1) W2 + b2.
        let mut values = vec![0.0f32; FEATURES];
        values[1] = 2.0; // feature 1 -> unit
        values.extend([-1.0, 4.0, 1.5]); // b1, w2, b2
        let p = Policy::new(1, values, String::new()).unwrap();
        let mut rows = vec![0.0f32; 2 * FEATURES];
        rows[1] = 2.0; // relu(4 - 1) = 3; out 12 + 1.5
        rows[FEATURES + 1] = 0.25; // relu(0.5 - 1) = 0; out 1.5

        let scores = p.scores(&rows);

        assert_eq!(scores, vec![13.5, 1.5]);
    }

    #[test]
    fn a_saved_policy_reads_back_the_same() {
        let p = policy(8, 7);
        let back = Policy::from_safetensors(&p.to_safetensors()).unwrap();
        assert_eq!(back, p);
        let rows: Vec<f32> = (0..3 * FEATURES).map(|i| i as f32 / 10.0).collect();
        assert_eq!(back.scores(&rows), p.scores(&rows));
    }

    #[test]
    fn other_files_are_refused_by_name() {
        // A model export is a safetensors file too, without our format.
        let other = Weights {
            shapes: policy_shapes(4),
            values: policy(4, 1).values().to_vec(),
        }
        .to_safetensors_with(None);
        let err = Policy::from_safetensors(&other).unwrap_err().to_string();
        assert!(err.contains("no metadata"), "{err}");
        assert!(Policy::from_safetensors(b"not a file").is_err());
        let mut bad = policy(4, 1).values().to_vec();
        bad[3] = f32::NAN;
        assert!(Policy::new(4, bad, String::new()).is_err());
    }
}
