//! The simulated clients' data: the training set split by the partition,
//! then each client's share reshaped by the strategy's data plan on the
//! client's side (docs/METHOD.md step 4).

use anyhow::Context;
use astraea_core::astraea::AugmentationPlan;
use astraea_core::augment::{AugmentConfig, Transform, apply_plan};
use astraea_core::data::Dataset;
use astraea_core::engine::seeds;
use astraea_core::partition::{Partition, balanced_iid_like};

use crate::config::{RunSpec, SimConfig};

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

/// The id a server gives the simulated client at `index`: the n-th client
/// to join is client n and holds shard n - 1, so the seeds a client draws
/// with (`astraea_core::engine::seeds`) are those of the served client.
pub fn client_id(index: usize) -> u64 {
    index as u64 + 1
}

/// One simulated client's local data, held as indices into the run's
/// training set (no copy of any image: a population of 100,000 clients
/// sharing MNIST's long tail holds a few bytes a sample), its images made
/// for each hop ([`ClientData::images`]).
#[derive(Debug, Clone)]
pub struct ClientData {
    /// Each sample: its index in the training set and, for a copy the
    /// data plan made, the transform that made it.
    pub held: Vec<(u32, Option<Transform>)>,
    /// Labels, one per held sample.
    pub labels: Vec<u32>,
    /// Label counts of this data: what the client reports.
    pub counts: Vec<usize>,
}

impl ClientData {
    /// The client's images, sample-major, `[C, H, W]` each, made from
    /// `train` (the set its indices point into), a data-plan copy
    /// transformed as the client transformed it.
    pub fn images(&self, train: &Dataset) -> Vec<f32> {
        let len = train.sample_len();
        let mut images = Vec::with_capacity(self.held.len() * len);
        for &(index, transform) in &self.held {
            let image = &train.images[index as usize * len..(index as usize + 1) * len];
            match transform {
                None => images.extend_from_slice(image),
                Some(t) => images.extend(t.apply(image, train.channels, train.height, train.width)),
            }
        }
        images
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
    /// clients report first (docs/METHOD.md step 1).
    pub fn raw_counts(train: &Dataset, partition: &Partition) -> Vec<Vec<usize>> {
        partition.client_counts(&train.labels, train.num_classes())
    }

    /// Gives each client its share of `train` (as indices) and lets it
    /// apply `plan`, seeded per client from `seed`.
    ///
    /// # Errors
    /// A sample index beyond `u32` or outside `train`, or a plan that
    /// cannot be applied.
    pub fn build(
        train: &Dataset,
        partition: &Partition,
        plan: Option<AugmentationPlan>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let augment = AugmentConfig::default();
        let index = |i: usize| -> anyhow::Result<u32> {
            anyhow::ensure!(i < train.len(), "sample {i} is outside the training set");
            u32::try_from(i).context("a sample index beyond u32")
        };
        let clients = partition
            .clients
            .iter()
            .enumerate()
            .map(|(id, indices)| {
                let local_labels: Vec<u32> = indices.iter().map(|&i| train.labels[i]).collect();
                let held: Vec<(u32, Option<Transform>)> = match &plan {
                    None => indices
                        .iter()
                        .map(|&i| Ok((index(i)?, None)))
                        .collect::<anyhow::Result<_>>()?,
                    Some(plan) => {
                        let client_seed = seeds::plan(seed, client_id(id));
                        let outcome =
                            apply_plan(&local_labels, &plan.ratios, &augment, client_seed)?;
                        // Kept originals, then the copies: the order
                        // `augment::materialise` gives a client's data.
                        let kept = outcome.kept.iter().map(|&k| Ok((index(indices[k])?, None)));
                        let copies = outcome
                            .copies
                            .iter()
                            .map(|&(k, t)| Ok((index(indices[k])?, Some(t))));
                        kept.chain(copies).collect::<anyhow::Result<_>>()?
                    }
                };
                let labels: Vec<u32> = held
                    .iter()
                    .map(|&(i, _)| train.labels[i as usize])
                    .collect();
                let counts = counts_of(&labels, train.num_classes());
                Ok(ClientData {
                    held,
                    labels,
                    counts,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { clients, plan })
    }

    /// Label counts summed over all clients.
    pub fn global_counts(&self) -> Vec<usize> {
        let mut total = vec![0; self.clients.first().map_or(0, |c| c.counts.len())];
        for client in &self.clients {
            for (t, c) in total.iter_mut().zip(&client.counts) {
                *t += c;
            }
        }
        total
    }

    /// Total training samples over all clients.
    pub fn total_samples(&self) -> usize {
        self.clients.iter().map(ClientData::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40 blank 2x2 images: 30 of class 0, 10 of class 1.
    fn skewed() -> Dataset {
        let labels: Vec<u32> = (0..40).map(|i| u32::from(i >= 30)).collect();
        Dataset::new(
            vec![0.5; 40 * 4],
            labels,
            1,
            2,
            2,
            vec!["a".into(), "b".into()],
        )
        .unwrap()
    }

    #[test]
    fn clients_apply_the_plan_to_their_own_share_only() {
        // Prepare: two clients; the plan doubles class 1 and keeps class 0.
        let train = skewed();
        let partition = Partition {
            clients: vec![(0..20).collect(), (20..40).collect()],
            test_indices: vec![],
        };
        let plan = AugmentationPlan {
            ratios: vec![1.0, 2.0],
        };

        // Execute
        let raw = Federation::raw_counts(&train, &partition);
        let federation = Federation::build(&train, &partition, Some(plan), 7).unwrap();

        // Assert: R = 2 adds exactly one copy per class-1 sample.
        assert_eq!(raw, vec![vec![20, 0], vec![10, 10]]);
        assert_eq!(federation.clients[0].counts, vec![20, 0]);
        assert_eq!(federation.clients[1].counts, vec![10, 20]);
        assert_eq!(federation.clients[1].images(&train).len(), 30 * 4);
        assert_eq!(federation.global_counts(), vec![30, 20]);
        assert_eq!(federation.total_samples(), 50);
    }

    #[test]
    fn a_client_makes_the_images_the_plan_materialises() {
        // Prepare: 60 varied 3x3 images of three classes; the plan drops
        // some of class 0, keeps class 1 and triples class 2.
        let labels: Vec<u32> = (0..60).map(|i| i % 3).collect();
        let images: Vec<f32> = (0..60 * 9)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect();
        let train = Dataset::new(
            images,
            labels,
            1,
            3,
            3,
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap();
        let indices: Vec<usize> = (10..50).collect();
        let partition = Partition {
            clients: vec![indices.clone()],
            test_indices: vec![],
        };
        let ratios = vec![0.5, 1.0, 3.0];
        let plan = AugmentationPlan {
            ratios: ratios.clone(),
        };

        // Execute
        let federation = Federation::build(&train, &partition, Some(plan), 9).unwrap();

        // Assert: what `materialise` gives the client, image for image.
        let local = train.subset(&indices);
        let outcome = apply_plan(
            &local.labels,
            &ratios,
            &AugmentConfig::default(),
            seeds::plan(9, client_id(0)),
        )
        .unwrap();
        let (expected, expected_labels) =
            astraea_core::augment::materialise(&local.images, &local.labels, 9, 1, 3, 3, &outcome)
                .unwrap();
        let client = &federation.clients[0];
        assert!(client.held.iter().any(|(_, t)| t.is_some()));
        assert_eq!(client.labels, expected_labels);
        assert_eq!(client.images(&train), expected);
    }
}
