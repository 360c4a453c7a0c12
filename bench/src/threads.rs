//! A native hop trained data-parallel (`astraea_core::train::Replica`):
//! every step's batch split between threads, the gradients added up, one
//! Adam step in each; against one thread (burn's `flex` alone, which hands
//! only its large matrix products to its own pool). Samples per second of
//! whole hops (model built, every step, weights read back), medians of the
//! repeats, on real MNIST.

use std::time::Instant;

use astraea_core::data::Dataset;
use astraea_core::model::ModelConfig;
use astraea_core::train::{Samples, TrainConfig, train_parallel};
use astraea_core::weights::Weights;
use burn::prelude::Device;

/// One row: a hop of `samples` in batches of `batch` on `threads`.
#[derive(Debug, Clone)]
pub struct ThreadsRow {
    /// Replicas (threads) of the visit.
    pub threads: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Samples in the hop (one epoch).
    pub samples: usize,
    /// Median seconds of a hop.
    pub hop_s: f64,
    /// Samples per second (`samples / hop_s`).
    pub samples_per_s: f64,
}

/// Hops of the first `samples` MNIST training samples, batch `batch`, one
/// epoch, on each of `threads`, `repeats` times each (after one warm-up).
pub fn run(
    train: &Dataset,
    samples: usize,
    batch: usize,
    threads: &[usize],
    repeats: usize,
) -> Vec<ThreadsRow> {
    let samples = samples.min(train.len());
    let config = ModelConfig::for_dataset(train);
    let initial = Weights::from_model(&config.init(&Device::flex()));
    let len = config.sample_len();
    let data = Samples {
        images: &train.images[..samples * len],
        labels: &train.labels[..samples],
    };
    let train_config = TrainConfig {
        batch_size: batch,
        seed: 1,
        ..TrainConfig::default()
    };
    threads
        .iter()
        .map(|&n| {
            let mut times: Vec<f64> = (0..=repeats.max(1))
                .map(|_| {
                    let started = Instant::now();
                    train_parallel(&config, &initial, data, &train_config, n, &mut |_| {})
                        .expect("the hop trains");
                    started.elapsed().as_secs_f64()
                })
                .skip(1)
                .collect();
            times.sort_by(f64::total_cmp);
            let hop_s = times[times.len() / 2];
            ThreadsRow {
                threads: n,
                batch,
                samples,
                hop_s,
                samples_per_s: samples as f64 / hop_s,
            }
        })
        .collect()
}
