//! What an exported model says about itself: the safetensors metadata of
//! `/api/model` and of every checkpoint, so a file found on its own can be
//! loaded, fed and judged correctly (docs/MODEL.md shows how, in PyTorch
//! and in burn).

use std::collections::BTreeMap;

use crate::model::ModelConfig;
use crate::weights::Weights;

/// Version of the metadata layout below; bumped when a key changes meaning.
pub const MODEL_CARD_VERSION: u32 = 1;

/// How the model reads its input, as every loader must feed it.
pub const INPUT_SCALING: &str = "float32 pixels in [0, 1] (byte / 255), one sample [channels, height, width] row-major, batch first";

/// How linear layers are stored: burn keeps `x @ W + b` with `W` as
/// `[in, out]`; PyTorch's `nn.Linear` wants `[out, in]`.
pub const LINEAR_LAYOUT: &str =
    "fc*.weight is [in_features, out_features] (y = x @ W + b); transpose for torch.nn.Linear";

/// The facts an exported model carries beside its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCard {
    /// The round whose aggregate these weights are; 0 for the initial model.
    pub round: u32,
    /// Top-1 accuracy on `evaluated_on`, a fraction in 0..=1; `None` before
    /// any evaluation.
    pub accuracy: Option<f64>,
    /// The set the accuracy was measured on, in words (e.g. `mnist
    /// balanced test set, 10000 samples`).
    pub evaluated_on: String,
    /// The dataset trained on.
    pub dataset: String,
    /// Class names, in label order.
    pub class_names: Vec<String>,
    /// The model's configuration.
    pub model: ModelConfig,
    /// The strategy that trained it (e.g. `astraea`, `fedavg+median`).
    pub strategy: String,
}

impl ModelCard {
    /// The safetensors metadata: every value a string, lists and the model
    /// configuration as JSON.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let model = serde_json::json!({
            "architecture": "astraea-cnn (conv 12@5x5 s2, conv 18@3x3 s2, dropout, conv 24@2x2, dense 150 relu, dense classes)",
            "num_classes": self.model.num_classes,
            "channels": self.model.channels,
            "height": self.model.height,
            "width": self.model.width,
            "dropout": self.model.dropout,
        });
        let entries = [
            ("format", "astraea-model".to_string()),
            ("card_version", MODEL_CARD_VERSION.to_string()),
            ("round", self.round.to_string()),
            (
                "accuracy",
                self.accuracy
                    .map_or_else(String::new, |a| format!("{a:.6}")),
            ),
            ("evaluated_on", self.evaluated_on.clone()),
            ("dataset", self.dataset.clone()),
            (
                "class_names",
                serde_json::to_string(&self.class_names).expect("strings serialise"),
            ),
            ("model", model.to_string()),
            ("strategy", self.strategy.clone()),
            ("input_scaling", INPUT_SCALING.to_string()),
            ("linear_layout", LINEAR_LAYOUT.to_string()),
        ];
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// A file name that names the dataset and the round, e.g.
    /// `astraea-mnist-round0012.safetensors`.
    pub fn file_name(&self) -> String {
        let dataset: String = self
            .dataset
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("astraea-{dataset}-round{:04}.safetensors", self.round)
    }

    /// `weights` as a safetensors file carrying this card.
    pub fn export(&self, weights: &Weights) -> Vec<u8> {
        weights.to_safetensors_with(Some(self.metadata()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::prelude::*;

    fn card() -> ModelCard {
        ModelCard {
            round: 12,
            accuracy: Some(0.9123),
            evaluated_on: "mnist balanced test set, 1000 samples".into(),
            dataset: "mnist".into(),
            class_names: (0..10).map(|d| d.to_string()).collect(),
            model: ModelConfig::new(10),
            strategy: "astraea".into(),
        }
    }

    #[test]
    fn an_exported_model_carries_its_card_and_loads_back() {
        // Prepare
        let weights = Weights::from_model(&ModelConfig::new(10).init(&Device::flex()));

        // Execute
        let bytes = card().export(&weights);

        // Assert: the tensors are untouched, the metadata readable.
        let back = Weights::from_safetensors(&bytes, &weights.shapes).unwrap();
        assert_eq!(back, weights);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = header.metadata().clone().unwrap();
        assert_eq!(metadata["round"], "12");
        assert_eq!(metadata["accuracy"], "0.912300");
        assert_eq!(metadata["dataset"], "mnist");
        let names: Vec<String> = serde_json::from_str(&metadata["class_names"]).unwrap();
        assert_eq!(names.len(), 10);
        let model: serde_json::Value = serde_json::from_str(&metadata["model"]).unwrap();
        assert_eq!(model["num_classes"], 10);
        assert!(metadata["linear_layout"].contains("transpose"));
        assert!(metadata["input_scaling"].contains("[0, 1]"));
    }

    #[test]
    fn the_file_name_names_the_dataset_and_round() {
        let mut odd = card();
        odd.dataset = "emnist/letters".into();
        assert_eq!(card().file_name(), "astraea-mnist-round0012.safetensors");
        assert_eq!(
            odd.file_name(),
            "astraea-emnist-letters-round0012.safetensors"
        );
    }
}
