//! A native hop trained by several threads at once, two ways: every
//! step's batch split between threads, the gradients added up and one
//! Adam step in each (`astraea_core::train::Replica`: the single visit's
//! update), or the batches dealt between threads that average their
//! weights every few rounds (`astraea_core::train::LocalReplica`: local
//! SGD, a different update). Against one thread (burn's `flex` alone,
//! which hands only its large matrix products to its own pool). Samples
//! per second of whole hops (model built, every step, weights read back),
//! medians of the repeats, on real MNIST; and, since local SGD is not the
//! single visit's update, the test accuracy a small FedAvg federation
//! reaches round by round with each way of training its hops.

use std::time::Instant;

use astraea_core::data::Dataset;
use astraea_core::model::ModelConfig;
use astraea_core::train::{
    Samples, Split, TrainConfig, evaluate, train_local, train_observed, train_parallel,
};
use astraea_core::weights::Weights;
use burn::prelude::Device;

/// One hop of `config` from `initial` on `data` with `threads` shared as
/// `split` (one thread: the single visit either way).
fn hop(
    model: &ModelConfig,
    initial: &Weights,
    data: Samples<'_>,
    config: &TrainConfig,
    (threads, split): (usize, Split),
) -> Weights {
    let trained = match split {
        _ if threads <= 1 => train_observed(
            model,
            initial,
            data,
            config,
            &Device::flex().autodiff(),
            &mut |_| {},
        ),
        Split::Slices => train_parallel(model, initial, data, config, threads, &mut |_| {}),
        Split::Local { sync } => {
            train_local(model, initial, data, config, (threads, sync), &mut |_| {})
        }
    };
    let (weights, stats) = trained.expect("the hop trains");
    // A row for N threads measures N threads, not one gone on alone.
    assert_eq!(stats.replicas_lost, 0, "a training thread failed");
    weights
}

/// One row: a hop of `samples` in batches of `batch` on `threads`.
#[derive(Debug, Clone)]
pub struct ThreadsRow {
    /// Replicas (threads) of the visit.
    pub threads: usize,
    /// How they shared it.
    pub split: Split,
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
/// epoch, on each of `threads` shared each way of `splits` (one thread
/// once), `repeats` times each (after one warm-up).
pub fn run(
    train: &Dataset,
    samples: usize,
    batch: usize,
    (threads, splits): (&[usize], &[Split]),
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
    let ways = threads.iter().flat_map(|&n| {
        let splits: &[Split] = if n <= 1 { &splits[..1] } else { splits };
        splits.iter().map(move |&split| (n, split))
    });
    ways.map(|(n, split)| {
        let mut times: Vec<f64> = (0..=repeats.max(1))
            .map(|_| {
                let started = Instant::now();
                hop(&config, &initial, data, &train_config, (n, split));
                started.elapsed().as_secs_f64()
            })
            .skip(1)
            .collect();
        times.sort_by(f64::total_cmp);
        let hop_s = times[times.len() / 2];
        ThreadsRow {
            threads: n,
            split,
            batch,
            samples,
            hop_s,
            samples_per_s: samples as f64 / hop_s,
        }
    })
    .collect()
}

/// Test accuracy after each of `rounds` FedAvg rounds of `clients` clients
/// (IID shards of `per_client` MNIST training samples, one epoch of batch
/// `batch` a hop, every client every round), each hop trained on
/// `threads` shared as `split`; on the first 2,000 test samples.
pub fn accuracy(
    (train, test): (&Dataset, &Dataset),
    (clients, per_client, batch): (usize, usize, usize),
    rounds: usize,
    way: (usize, Split),
) -> Vec<f64> {
    let config = ModelConfig::for_dataset(train);
    let len = config.sample_len();
    let mut global = Weights::from_model(&config.init_seeded(&Device::flex(), 1));
    let tested = test.len().min(2000);
    let test_data = Samples {
        images: &test.images[..tested * len],
        labels: &test.labels[..tested],
    };
    (0..rounds)
        .map(|round| {
            let updates: Vec<(Weights, u64)> = (0..clients)
                .map(|c| {
                    let (lo, hi) = (c * per_client, ((c + 1) * per_client).min(train.len()));
                    let data = Samples {
                        images: &train.images[lo * len..hi * len],
                        labels: &train.labels[lo..hi],
                    };
                    let train_config = TrainConfig {
                        batch_size: batch,
                        seed: (round * clients + c) as u64,
                        ..TrainConfig::default()
                    };
                    (
                        hop(&config, &global, data, &train_config, way),
                        (hi - lo) as u64,
                    )
                })
                .collect();
            let views: Vec<(&[f32], u64)> =
                updates.iter().map(|(w, n)| (&w.values[..], *n)).collect();
            global.values = astraea_core::aggregate::aggregate(&global.values, &views)
                .expect("the updates fit the model");
            evaluate(&config, &global, test_data, 500, &Device::flex())
                .expect("the model evaluates")
                .accuracy
        })
        .collect()
}
