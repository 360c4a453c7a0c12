//! The simulated clients' data: the training set split by the partition,
//! then each client's share reshaped by the strategy's data plan on the
//! client's side (ASTRAEA.md step 4).

use anyhow::Context;
use astraea_core::astraea::AugmentationPlan;
use astraea_core::augment::{AugmentConfig, apply_plan, materialise};
use astraea_core::data::Dataset;
use astraea_core::partition::{Partition, balanced_iid_like};
use astraea_core::train::Samples;

use super::config::{RunSpec, SimConfig};

/// The partition a run trains on: the configured one, or for the IID
/// reference a balanced IID spread of as many samples over as many clients,
/// with the same test set.
pub fn partition_for(
    config: &SimConfig,
    spec: &RunSpec,
    train: &Dataset,
    test: &Dataset,
) -> anyhow::Result<Partition> {
    let partition = config.partition.build(
        &train.labels,
        &test.labels,
        train.num_classes(),
        config.clients,
        spec.seed,
    )?;
    if spec.iid_reference {
        return balanced_iid_like(&partition, &train.labels, train.num_classes(), spec.seed)
            .context("building the balanced IID reference");
    }
    Ok(partition)
}

/// One simulated client's local data.
#[derive(Debug, Clone)]
pub struct ClientData {
    /// Images, sample-major, `[C, H, W]` each.
    pub images: Vec<f32>,
    /// Labels.
    pub labels: Vec<u32>,
    /// Label counts of this data: what the client reports.
    pub counts: Vec<usize>,
}

impl ClientData {
    /// The data as training input.
    pub fn samples(&self) -> Samples<'_> {
        Samples {
            images: &self.images,
            labels: &self.labels,
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the client has no data.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Every client's data, ready for the round loop.
#[derive(Debug, Clone)]
pub struct Federation {
    /// Clients in id order.
    pub clients: Vec<ClientData>,
    /// The plan the clients applied, if any.
    pub plan: Option<AugmentationPlan>,
}

fn counts_of(labels: &[u32], num_classes: usize) -> Vec<usize> {
    let mut counts = vec![0; num_classes];
    for &l in labels {
        counts[l as usize] += 1;
    }
    counts
}

impl Federation {
    /// Label counts each client of `partition` holds before any plan: what
    /// clients report first (ASTRAEA.md step 1).
    pub fn raw_counts(train: &Dataset, partition: &Partition) -> Vec<Vec<usize>> {
        partition.client_counts(&train.labels, train.num_classes())
    }

    /// Gives each client its share of `train` and lets it apply `plan`,
    /// seeded per client from `seed`.
    pub fn build(
        train: &Dataset,
        partition: &Partition,
        plan: Option<AugmentationPlan>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let augment = AugmentConfig::default();
        let sample_len = train.sample_len();
        let clients = partition
            .clients
            .iter()
            .enumerate()
            .map(|(id, indices)| {
                let local = train.subset(indices);
                let (images, labels) = match &plan {
                    None => (local.images, local.labels),
                    Some(plan) => {
                        let client_seed =
                            seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(id as u64 + 1));
                        let outcome =
                            apply_plan(&local.labels, &plan.ratios, &augment, client_seed)?;
                        materialise(
                            &local.images,
                            &local.labels,
                            sample_len,
                            train.channels,
                            train.height,
                            train.width,
                            &outcome,
                        )?
                    }
                };
                let counts = counts_of(&labels, train.num_classes());
                Ok(ClientData {
                    images,
                    labels,
                    counts,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { clients, plan })
    }

    /// Total training samples over all clients.
    pub fn total_samples(&self) -> usize {
        self.clients.iter().map(ClientData::len).sum()
    }
}
