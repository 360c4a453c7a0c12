//! Model weights as one flat `f32` vector with named shapes: what travels on
//! the wire and what the server aggregates, so neither needs tensors.

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::{Cnn, ModelConfig};

/// Errors when weights do not fit a model.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum WeightsError {
    /// The vector has the wrong length for the model.
    #[error("weights have {got} parameters, expected {expected}")]
    WrongLength {
        /// Parameters received.
        got: usize,
        /// Parameters the model has.
        expected: usize,
    },
    /// A value is NaN or infinite.
    #[error("weights contain a non-finite value at index {index}")]
    NonFinite {
        /// Index of the first bad value.
        index: usize,
    },
    /// The device could not hand a tensor back (a lost WebGPU device).
    #[error("the device could not read weights back: {0}")]
    Readback(String),
    /// The bytes are not a readable safetensors file.
    #[error("weights file is unreadable: {0}")]
    Unreadable(String),
    /// The shapes differ from the model's.
    #[error("weight shapes differ from the model's at parameter {index} ({name})")]
    ShapeMismatch {
        /// Position of the first differing parameter.
        index: usize,
        /// Its name in the model.
        name: String,
    },
    /// A replica's place among the replicas of a visit is out of range
    /// (`train::Replica`).
    #[error("replica {index} of {of} does not exist")]
    NoSuchReplica {
        /// The replica asked for (from 0).
        index: usize,
        /// Replicas of the visit.
        of: usize,
    },
    /// A replica was asked for a step out of its turn (`train::Replica`:
    /// stepping alone while still shared).
    #[error("replica asked out of turn: {0}")]
    OutOfTurn(&'static str),
}

/// One parameter tensor's place in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamShape {
    /// Dotted path in the module, e.g. `conv1.weight`.
    pub name: String,
    /// Dimensions of the tensor.
    pub dims: Vec<usize>,
}

impl ParamShape {
    /// Number of values in the tensor.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// A model's parameters, flattened in the module's visiting order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// Shapes of the parameters in order.
    pub shapes: Vec<ParamShape>,
    /// All values, parameter after parameter, each in row-major order.
    pub values: Vec<f32>,
}

impl Weights {
    /// Reads the parameters out of a model.
    pub fn from_model(model: &Cnn) -> Self {
        let (shapes, flat) = Gather::flatten(model);
        let values = flat
            .map(|flat| f32_values(flat.into_data()).expect("float parameters convert to f32"))
            .unwrap_or_default();
        Self { shapes, values }
    }

    /// Reads the parameters out of a model with one asynchronous read:
    /// the only way on WebGPU in a browser, where a synchronous read back
    /// cannot wait for the GPU.
    pub async fn from_model_async(model: &Cnn) -> Result<Self, WeightsError> {
        let (shapes, flat) = Gather::flatten(model);
        let values = match flat {
            Some(flat) => f32_values(
                flat.into_data_async()
                    .await
                    .map_err(|e| WeightsError::Readback(format!("{e:?}")))?,
            )?,
            None => Vec::new(),
        };
        Ok(Self { shapes, values })
    }

    /// Builds a model of `config` on `device` holding these weights.
    pub fn to_model(&self, config: &ModelConfig, device: &Device) -> Result<Cnn, WeightsError> {
        let model = config.init_zeros(device);
        self.check_fits(&Weights::shapes_of(&model))?;
        let mut loader = Loader {
            values: &self.values,
            offset: 0,
        };
        Ok(model.map(&mut loader))
    }

    /// `model` with its parameters' values replaced by `values` (flat, in
    /// parameter order), each parameter keeping its identity: an
    /// optimiser's state, kept by parameter, carries on (local SGD's
    /// averaging, `train::LocalReplica`).
    ///
    /// # Errors
    /// [`WeightsError::WrongLength`] or [`WeightsError::NonFinite`].
    pub fn load_values(model: Cnn, values: &[f32]) -> Result<Cnn, WeightsError> {
        let shapes = Weights::shapes_of(&model);
        check_values_fit(values, &shapes)?;
        let mut loader = Loader { values, offset: 0 };
        Ok(model.map(&mut loader))
    }

    /// Shapes of a model's parameters. Reads no values: on WebGPU a synchronous read would fail.
    pub fn shapes_of(model: &Cnn) -> Vec<ParamShape> {
        let mut gather = Gather::default();
        model.visit(&mut gather);
        gather.shapes
    }

    /// Checks that these weights fit `shapes` and hold only finite values.
    pub fn check_fits(&self, shapes: &[ParamShape]) -> Result<(), WeightsError> {
        check_values_fit(&self.values, shapes)?;
        if let Some(index) = self.shapes.iter().zip(shapes).position(|(a, b)| a != b) {
            return Err(WeightsError::ShapeMismatch {
                index,
                name: shapes[index].name.clone(),
            });
        }
        Ok(())
    }

    /// The weights as a safetensors file: one F32 tensor per parameter,
    /// named by its path in the module.
    pub fn to_safetensors(&self) -> Vec<u8> {
        self.to_safetensors_with(None)
    }

    /// [`Self::to_safetensors`] with string metadata in the file's header
    /// (see `export::ModelCard`).
    pub fn to_safetensors_with(
        &self,
        metadata: Option<std::collections::BTreeMap<String, String>>,
    ) -> Vec<u8> {
        let mut offset = 0;
        let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(self.shapes.len());
        for shape in &self.shapes {
            let n = shape.numel();
            let data = self.values[offset..offset + n]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            offset += n;
            bytes.push((shape.name.clone(), shape.dims.clone(), data));
        }
        let views = bytes.iter().map(|(name, dims, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, dims.clone(), data)
                    .expect("shape and byte length agree");
            (name.clone(), view)
        });
        let metadata = metadata.map(|m| m.into_iter().collect());
        safetensors::serialize(views, metadata).expect("f32 tensors always serialise")
    }

    /// Reads weights for a model with `shapes` from a safetensors file.
    pub fn from_safetensors(bytes: &[u8], shapes: &[ParamShape]) -> Result<Self, WeightsError> {
        let file = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| WeightsError::Unreadable(e.to_string()))?;
        let mut values = Vec::with_capacity(shapes.iter().map(ParamShape::numel).sum());
        for (index, shape) in shapes.iter().enumerate() {
            let mismatch = || WeightsError::ShapeMismatch {
                index,
                name: shape.name.clone(),
            };
            let tensor = file.tensor(&shape.name).map_err(|_| mismatch())?;
            if tensor.dtype() != safetensors::Dtype::F32 || tensor.shape() != shape.dims.as_slice()
            {
                return Err(mismatch());
            }
            values.extend(
                tensor
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        let weights = Self {
            shapes: shapes.to_vec(),
            values,
        };
        weights.check_fits(shapes)?;
        Ok(weights)
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Visitor that flattens every float parameter onto the device, so that
/// [`Weights::from_model`] and [`Weights::from_model_async`] read them
/// back in one go.
#[derive(Default)]
struct Gather {
    path: Vec<String>,
    shapes: Vec<ParamShape>,
    flat: Vec<Tensor<1>>,
}

impl Gather {
    /// The model's parameter shapes, and all its values as one tensor on
    /// its device (`None` for a model without parameters).
    fn flatten(model: &Cnn) -> (Vec<ParamShape>, Option<Tensor<1>>) {
        let mut gather = Gather::default();
        model.visit(&mut gather);
        let flat = (!gather.flat.is_empty()).then(|| Tensor::cat(gather.flat, 0));
        (gather.shapes, flat)
    }
}

/// Parameter values read back from the device, as `f32`.
pub(crate) fn f32_values(data: TensorData) -> Result<Vec<f32>, WeightsError> {
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| WeightsError::Readback(format!("{e:?}")))
}

impl ModuleVisitor for Gather {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let dims = tensor.dims().to_vec();
        let numel = dims.iter().product::<usize>();
        self.flat.push(tensor.reshape([numel]));
        self.shapes.push(ParamShape {
            name: self.path.join("."),
            dims,
        });
    }
}

/// Mapper that replaces every float parameter with the next slice of a flat
/// vector, in the same order [`Gather`] read them.
struct Loader<'a> {
    values: &'a [f32],
    offset: usize,
}

impl ModuleMapper for Loader<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        // A tensor made from data is a constant; marking the parameter as
        // requiring gradients makes it a trainable leaf again on an autodiff
        // device (and is only recorded on a plain one).
        param
            .map(|tensor| {
                let shape = tensor.shape();
                let numel = shape.num_elements();
                let slice = &self.values[self.offset..self.offset + numel];
                self.offset += numel;
                Tensor::from_data(TensorData::new(slice.to_vec(), shape), &tensor.device())
            })
            .set_require_grad(true)
    }
}

/// Whether flat `values` fit parameters of `shapes` (their lengths add up
/// to `values.len()`) and are all finite: what [`Weights::check_fits`]
/// checks of the values, for a caller that holds them without shapes
/// (one branch-free pass; only a bad vector pays for finding the index).
///
/// # Errors
/// [`WeightsError::WrongLength`] or [`WeightsError::NonFinite`].
pub fn check_values_fit(values: &[f32], shapes: &[ParamShape]) -> Result<(), WeightsError> {
    let expected: usize = shapes.iter().map(ParamShape::numel).sum();
    if values.len() != expected {
        return Err(WeightsError::WrongLength {
            got: values.len(),
            expected,
        });
    }
    if !values.iter().fold(true, |all, v| all & v.is_finite()) {
        let index = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(WeightsError::NonFinite { index });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_round_trip_through_a_fresh_model() {
        // Prepare
        let device = Device::flex();
        let config = ModelConfig::new(10);
        let original = Weights::from_model(&config.init(&device));

        // Execute
        let reloaded = Weights::from_model(&original.to_model(&config, &device).unwrap());

        // Assert
        assert_eq!(original, reloaded);
        assert_eq!(original.shapes[0].name, "conv1.weight");
        assert_eq!(original.shapes[0].dims, vec![12, 1, 5, 5]);
    }

    #[test]
    fn weights_round_trip_through_safetensors_and_misfits_are_refused() {
        // Prepare
        let device = Device::flex();
        let weights = Weights::from_model(&ModelConfig::new(10).init(&device));
        let other = Weights::shapes_of(&ModelConfig::new(47).init(&device));

        // Execute
        let bytes = weights.to_safetensors();
        let back = Weights::from_safetensors(&bytes, &weights.shapes).unwrap();
        let misfit = Weights::from_safetensors(&bytes, &other).unwrap_err();
        let garbage = Weights::from_safetensors(b"not a file", &weights.shapes).unwrap_err();

        // Assert
        assert_eq!(back, weights);
        assert!(
            matches!(misfit, WeightsError::ShapeMismatch { index: 8, .. }),
            "{misfit}"
        );
        assert!(matches!(garbage, WeightsError::Unreadable(_)));
    }

    #[test]
    fn wrong_length_and_non_finite_weights_are_refused() {
        let device = Device::flex();
        let config = ModelConfig::new(10);
        let good = Weights::from_model(&config.init(&device));
        let mut short = good.clone();
        short.values.pop();
        let mut nan = good.clone();
        nan.values[7] = f32::NAN;

        let short_err = short.to_model(&config, &device).unwrap_err();
        let nan_err = nan.to_model(&config, &device).unwrap_err();

        assert_eq!(
            short_err,
            WeightsError::WrongLength {
                got: good.len() - 1,
                expected: good.len()
            }
        );
        assert_eq!(nan_err, WeightsError::NonFinite { index: 7 });
        assert_eq!(
            short_err.to_string(),
            format!(
                "weights have {} parameters, expected {}",
                good.len() - 1,
                good.len()
            )
        );
    }
}
