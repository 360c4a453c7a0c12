//! The simulator's training throughput: K clients each train one visit of
//! the papers' CNN from the same global model (a FedAvg round's training),
//! on today's per-client path (one visit after another on `threads`
//! workers, as `astraea simulate --engine per-client` runs them) and on
//! the batched path ([`astraea_core::batched`], `--engine batched`), next
//! to the PyTorch anchors of `bench/torch_simulate.py` run by the same
//! command on the same machine: a per-client PyTorch loop and a
//! `torch.func` (`stack_module_state` + `vmap`) loop, same CNN, batch
//! size, optimiser (Adam 1e-3) and clients (K shards of `samples` MNIST
//! samples each; the anchors train on random data of the same shapes,
//! which costs what MNIST costs).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use astraea_core::batched::{BatchedModel, Job};
use astraea_core::data::Dataset;
use astraea_core::model::ModelConfig;
use astraea_core::train::{self, Samples, TrainConfig};
use astraea_core::weights::Weights;
use burn::prelude::*;

/// One row of the table: one way of training K clients' visits.
#[derive(Debug, Clone)]
pub struct SimulateRow {
    /// Clients training in the round (K).
    pub clients: usize,
    /// Which path: `per-client`, `batched`, `torch per-client`, `torch vmap`.
    pub path: String,
    /// Seconds for one round's training (median of the repeats).
    pub round_s: f64,
    /// Training samples processed per second.
    pub samples_per_s: f64,
}

/// The K clients' data: shard i is `samples` consecutive training samples.
fn shards(
    train: &Dataset,
    clients: usize,
    samples: usize,
) -> anyhow::Result<Vec<(&[f32], &[u32])>> {
    let len = train.sample_len();
    anyhow::ensure!(
        clients * samples <= train.labels.len(),
        "{clients} clients of {samples} samples need more than the {} training samples",
        train.labels.len()
    );
    Ok((0..clients)
        .map(|i| {
            let (a, b) = (i * samples, (i + 1) * samples);
            (&train.images[a * len..b * len], &train.labels[a..b])
        })
        .collect())
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Times one round's training of `clients` clients on Astraea's `paths`
/// (`per-client`; `batched`: each of `threads` workers training one client
/// at a time; `batched, one stack`: all K clients as one stack, on
/// `device`), `repeats` times each (after one warm-up), `threads` workers for
/// the per-client path (the batched path is one call; burn's CPU backend
/// spreads its operations over the cores itself).
pub fn run_astraea(
    train_set: &Dataset,
    clients: usize,
    samples: usize,
    repeats: usize,
    threads: usize,
    paths: &[String],
    device: &Device,
) -> anyhow::Result<Vec<SimulateRow>> {
    let model_config = ModelConfig::for_dataset(train_set);
    let global = Weights::from_model(&model_config.init(&Device::flex()));
    let data = shards(train_set, clients, samples)?;
    let config = |i: usize| TrainConfig {
        seed: i as u64,
        ..TrainConfig::default()
    };
    let per_client = || -> anyhow::Result<()> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    scope.spawn(|| -> anyhow::Result<()> {
                        let device = Device::flex().autodiff();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&(images, labels)) = data.get(i) else {
                                return Ok(());
                            };
                            let samples = Samples { images, labels };
                            train::train(&model_config, &global, samples, &config(i), &device)?;
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("a training thread panicked"))
        })
    };
    let jobs: Vec<Job<'_>> = data
        .iter()
        .enumerate()
        .map(|(i, &(images, labels))| Job {
            weights: &global,
            data: Samples { images, labels },
            config: config(i),
        })
        .collect();
    // As `simulate --engine batched --stack N` trains a round: one model
    // set up for the round, stacks of `stack` clients, each worker training
    // one stack after another.
    let batched = |stack: usize| -> anyhow::Result<()> {
        let model = BatchedModel::new(&model_config, device);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let stacks: Vec<&[Job<'_>]> = jobs.chunks(stack.max(1)).collect();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1).min(stacks.len()))
                .map(|_| {
                    scope.spawn(|| -> anyhow::Result<()> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(stack) = stacks.get(i) else {
                                return Ok(());
                            };
                            for trained in model.train(stack) {
                                trained?;
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("a training thread panicked"))
        })
    };
    let one = || batched(1);
    let all = || batched(clients);
    let mut rows = Vec::new();
    for (path, round) in [
        ("per-client", &per_client as &dyn Fn() -> anyhow::Result<()>),
        ("batched", &one),
        ("batched, one stack", &all),
    ] {
        if !paths.iter().any(|p| p == path) {
            continue;
        }
        round()?;
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            round()?;
            times.push(start.elapsed().as_secs_f64());
        }
        let round_s = median(times);
        rows.push(SimulateRow {
            clients,
            path: path.into(),
            round_s,
            samples_per_s: (clients * samples) as f64 / round_s,
        });
    }
    Ok(rows)
}

/// Runs the PyTorch anchors (`script`, with `python`) for the same
/// clients, on the GPU where `cuda`; their rows, or why there are none.
pub fn run_torch(
    python: &Path,
    script: &Path,
    clients: usize,
    samples: usize,
    repeats: usize,
    threads: usize,
    cuda: bool,
) -> anyhow::Result<Vec<SimulateRow>> {
    let output = Command::new(python)
        .arg(script)
        .args(["--clients", &clients.to_string()])
        .args(["--samples", &samples.to_string()])
        .args(["--repeats", &repeats.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--device", if cuda { "cuda" } else { "cpu" }])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the PyTorch anchor failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut rows = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let row: serde_json::Value = serde_json::from_str(line)?;
        let round_s = row["round_s"].as_f64().context("round_s")?;
        rows.push(SimulateRow {
            clients,
            path: row["path"].as_str().context("path")?.to_string(),
            round_s,
            samples_per_s: (clients * samples) as f64 / round_s,
        });
    }
    Ok(rows)
}

/// Seconds one evaluation of `test` takes (median of `repeats`, batches of
/// 500, one thread): `train::evaluate` (burn's modules, per-client) and
/// `batched::evaluate` (the batched engine's forward pass, on `device`).
pub fn run_evaluation(
    test: &Dataset,
    repeats: usize,
    device: &Device,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let model_config = ModelConfig::for_dataset(test);
    let weights = Weights::from_model(&model_config.init(&Device::flex()));
    let data = Samples {
        images: &test.images,
        labels: &test.labels,
    };
    let time = |f: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        f()?;
        let mut times = Vec::new();
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            f()?;
            times.push(start.elapsed().as_secs_f64());
        }
        Ok(median(times))
    };
    let per_client = time(&|| {
        train::evaluate(&model_config, &weights, data, 500, &Device::flex())?;
        Ok(())
    })?;
    let batched = time(&|| {
        astraea_core::batched::evaluate(&model_config, &weights, data, 500, device)?;
        Ok(())
    })?;
    Ok(vec![("per-client", per_client), ("batched", batched)])
}
