//! Local training (Adam, mini-batches, optional FedProx term) and evaluation
//! on burn's run-time `Device`: `flex` natively, WebGPU or `flex` in a tab.
//!
//! Both take and return [`Weights`] rather than modules, because that is what
//! moves between clients, mediators and the server.
//!
//! A protocol task is trained here too: [`train_task`] (on the CPU) and
//! [`train_task_async`] (on any device) turn the server's [`ModelSpec`] and
//! [`TaskSpec`] into the model, its weights and a [`TrainConfig`], and run
//! the visit, as every client does between `ClientAction::Train` and
//! [`ClientSession::trained`].

use std::borrow::Cow;

use burn::module::{ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::model::{Cnn, ModelConfig};
#[cfg(doc)]
use crate::protocol::ClientSession;
use crate::protocol::{ModelSpec, TaskSpec};
use crate::weights::{Weights, WeightsError};

/// A client's local data, borrowed: images sample-major in `[C, H, W]` order
/// with pixels in `[0, 1]`, and one label per image.
#[derive(Debug, Clone, Copy)]
pub struct Samples<'a> {
    /// `labels.len() * sample_len` values.
    pub images: &'a [f32],
    /// Class index of each image.
    pub labels: &'a [u32],
}

impl Samples<'_> {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// How one client trains on one visit of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Local epochs per visit (E).
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// FedProx proximal weight mu; 0 trains plain FedAvg-style.
    pub prox_mu: f64,
    /// Seed for the shuffling and dropout of this visit.
    pub seed: u64,
}

impl Default for TrainConfig {
    /// The papers' settings: E = 1, batch 20, Adam 1e-3, no proximal term.
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 20,
            learning_rate: 1e-3,
            prox_mu: 0.0,
            seed: 0,
        }
    }
}

/// What a visit did, for progress reports and the server's books.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TrainStats {
    /// Samples processed, over all epochs.
    pub samples: usize,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Mean training loss over the steps (cross-entropy, without the proximal term).
    pub mean_loss: f64,
    /// Replicas of a visit split between threads ([`train_parallel`])
    /// that failed midway, the visit going on without them; 0 otherwise.
    pub replicas_lost: usize,
}

/// Accuracy and loss on a labelled set.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EvalStats {
    /// Top-1 accuracy in `[0, 1]`.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Number of samples evaluated.
    pub samples: usize,
}

/// Images and labels of the given sample indices as tensors.
fn batch_tensors(
    config: &ModelConfig,
    data: Samples<'_>,
    indices: &[usize],
    device: &Device,
) -> (Tensor<4>, Tensor<2, Int>) {
    let len = config.sample_len();
    let mut pixels = Vec::with_capacity(indices.len() * len);
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        pixels.extend_from_slice(&data.images[i * len..(i + 1) * len]);
        labels.push(i64::from(data.labels[i]));
    }
    let b = indices.len();
    let images = Tensor::from_data(
        TensorData::new(pixels, [b, config.channels, config.height, config.width]),
        device,
    );
    let targets = Tensor::from_data(TensorData::new(labels, [b, 1]), device);
    (images, targets)
}

/// Mean cross-entropy of logits `[b, n]` against targets `[b, 1]`.
fn cross_entropy(logits: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<1> {
    log_softmax(logits, 1).gather(1, targets).mean().neg()
}

/// The generator a visit draws its dropout masks from: its own, seeded
/// from the visit's seed apart from the one that shuffles its batches, so
/// a visit trains alike alone, beside others on other threads, or batched
/// with other clients' visits ([`crate::batched`]).
pub(crate) fn dropout_rng(seed: u64) -> StdRng {
    /// Tells the dropout stream from the shuffling one.
    const DROPOUT: u64 = 0xd207;
    StdRng::seed_from_u64(crate::engine::seeds::mix(&[seed, DROPOUT]))
}

/// `len` dropout mask values drawn from `rng`: each 0 with probability
/// `p` (dropped) and `1 / (1 - p)` otherwise (kept and rescaled, as
/// burn's `Dropout` does). A batch's mask is drawn sample after sample,
/// each sample's in `[channel, height, width]` order.
pub fn dropout_keep(rng: &mut StdRng, len: usize, p: f64) -> Vec<f32> {
    use rand::RngCore as _;
    if p <= 0.0 {
        return vec![1.0; len];
    }
    let scale = if p < 1.0 {
        (1.0 / (1.0 - p)) as f32
    } else {
        0.0
    };
    // Dropped where a uniform 32-bit draw falls below p * 2^32: 32 random
    // bits a value rather than a float's 64 (the generator was 3 % of the
    // batched trainer's time).
    let threshold = (p.min(1.0) * 4_294_967_296.0) as u64;
    (0..len)
        .map(|_| {
            if u64::from(rng.next_u32()) < threshold {
                0.0
            } else {
                scale
            }
        })
        .collect()
}

/// Where a visit is, reported after every optimiser step so a page can
/// draw progress bars and a loss curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProgress {
    /// Epoch of this step, from 0.
    pub epoch: usize,
    /// Epochs in the visit.
    pub epochs: usize,
    /// Mini-batch of this step within its epoch, from 0.
    pub batch: usize,
    /// Mini-batches per epoch.
    pub batches: usize,
    /// This step's training loss (cross-entropy).
    pub loss: f32,
}

/// Trains `weights` on `data` for `config.epochs` epochs and returns the new
/// weights. `device` must be an autodiff device (`Device::flex().autodiff()`).
///
/// A fresh Adam state is used on every visit: in a federation the optimiser
/// state does not travel with the model.
pub fn train(
    model_config: &ModelConfig,
    weights: &Weights,
    data: Samples<'_>,
    config: &TrainConfig,
    device: &Device,
) -> Result<(Weights, TrainStats), WeightsError> {
    train_observed(model_config, weights, data, config, device, &mut |_| {})
}

/// [`train`], telling `observe` about every step.
pub fn train_observed(
    model_config: &ModelConfig,
    weights: &Weights,
    data: Samples<'_>,
    config: &TrainConfig,
    device: &Device,
    observe: &mut dyn FnMut(&StepProgress),
) -> Result<(Weights, TrainStats), WeightsError> {
    let mut visit = Visit::new(model_config, weights, data, config, device)?;
    while let Some((loss, progress)) = visit.step() {
        visit.record(loss.into_scalar::<f32>(), progress, observe);
    }
    let (model, stats) = visit.finish();
    Ok((Weights::from_model(&model), stats))
}

/// [`train_observed`] for devices that can only read back asynchronously:
/// WebGPU in a browser. Every read awaits, so the page stays responsive.
pub async fn train_async(
    model_config: &ModelConfig,
    weights: &Weights,
    data: Samples<'_>,
    config: &TrainConfig,
    device: &Device,
    observe: &mut dyn FnMut(&StepProgress),
) -> Result<(Weights, TrainStats), WeightsError> {
    let mut visit = Visit::new(model_config, weights, data, config, device)?;
    while let Some((loss, progress)) = visit.step() {
        let loss = loss
            .into_scalar_async::<f32>()
            .await
            .map_err(|e| WeightsError::Readback(format!("{e:?}")))?;
        visit.record(loss, progress, observe);
    }
    let (model, stats) = visit.finish();
    Ok((Weights::from_model_async(&model).await?, stats))
}

/// One visit of the model, step by step: the loop that [`train_observed`]
/// and [`train_async`] drive, which differ only in how they read back.
struct Visit<'a> {
    model_config: Cow<'a, ModelConfig>,
    /// The weights the visit started from (FedProx's anchor).
    anchor: Cow<'a, [f32]>,
    images: Cow<'a, [f32]>,
    labels: Cow<'a, [u32]>,
    config: Cow<'a, TrainConfig>,
    device: Cow<'a, Device>,
    model: Option<Cnn>,
    optimizer: ModuleOptimizer,
    rng: StdRng,
    dropout: StdRng,
    order: Vec<usize>,
    epoch: usize,
    batch: usize,
    stats: TrainStats,
    loss_sum: f64,
    /// Which slice of every batch this visit computes: `(index, of)`;
    /// `(0, 1)` for all of it ([`Replica`]).
    share: (usize, usize),
    /// A replica's step between [`Replica::gradients`] and
    /// [`Replica::apply`]: its model and its own gradients.
    stepping: Option<(Cnn, GradientsParams)>,
    /// A shared visit's last batch, for [`Replica::alone`] to take its
    /// step again whole: the batch's samples and its whole dropout mask.
    last_batch: Option<(Vec<usize>, Vec<f32>)>,
}

impl<'a> Visit<'a> {
    fn new(
        model_config: &'a ModelConfig,
        anchor: &'a Weights,
        data: Samples<'a>,
        config: &'a TrainConfig,
        device: &'a Device,
    ) -> Result<Self, WeightsError> {
        Self::from_parts(
            Cow::Borrowed(model_config),
            anchor,
            (Cow::Borrowed(data.images), Cow::Borrowed(data.labels)),
            Cow::Borrowed(config),
            Cow::Borrowed(device),
        )
    }

    /// A visit owning its inputs (a replica a tab's Web Worker keeps
    /// between calls from JavaScript: `Replica::owned`,
    /// `LocalReplica::owned`).
    fn owned(
        model_config: ModelConfig,
        anchor: &Weights,
        (images, labels): (Vec<f32>, Vec<u32>),
        config: TrainConfig,
        device: Device,
    ) -> Result<Visit<'static>, WeightsError> {
        Visit::from_parts(
            Cow::Owned(model_config),
            anchor,
            (Cow::Owned(images), Cow::Owned(labels)),
            Cow::Owned(config),
            Cow::Owned(device),
        )
    }

    /// A visit of its own inputs, borrowed or owned (`Visit::owned`).
    fn from_parts(
        model_config: Cow<'a, ModelConfig>,
        anchor: &Weights,
        (images, labels): (Cow<'a, [f32]>, Cow<'a, [u32]>),
        config: Cow<'a, TrainConfig>,
        device: Cow<'a, Device>,
    ) -> Result<Self, WeightsError> {
        let model = anchor.to_model(&model_config, &device)?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.shuffle(&mut rng);
        Ok(Self {
            model_config,
            anchor: Cow::Owned(anchor.values.clone()),
            images,
            labels,
            dropout: dropout_rng(config.seed),
            config,
            device,
            model: Some(model),
            optimizer: AdamConfig::new().init(),
            rng,
            order,
            epoch: 0,
            batch: 0,
            stats: TrainStats::default(),
            loss_sum: 0.0,
            share: (0, 1),
            stepping: None,
            last_batch: None,
        })
    }

    fn batches(&self) -> usize {
        self.labels.len().div_ceil(self.config.batch_size.max(1))
    }

    /// Takes the next optimiser step; returns its (detached) loss and where
    /// it was, or `None` once every epoch is done.
    fn step(&mut self) -> Option<(Tensor<1>, StepProgress)> {
        let (model, grads, reported, progress) = self.backward()?;
        self.model = Some(self.optimizer.step(self.config.learning_rate, model, grads));
        Some((reported.expect("a whole batch is never empty"), progress))
    }

    /// The next batch's gradients (of this visit's share of it, weighted by
    /// the share's part of the batch, so that the shares' gradients add up
    /// to the batch's): the model, its gradients, the share's weighted loss
    /// (detached; `None` for an empty share) and where it was; `None` once
    /// every epoch is done.
    #[allow(clippy::type_complexity)]
    fn backward(&mut self) -> Option<(Cnn, GradientsParams, Option<Tensor<1>>, StepProgress)> {
        let batches = self.batches();
        if batches == 0 || self.epoch >= self.config.epochs {
            return None;
        }
        let size = self.config.batch_size.max(1);
        let start = self.batch * size;
        let chunk = &self.order[start..(start + size).min(self.order.len())];
        let [h, w] = self.model_config.feature_maps()[1];
        // The whole batch's mask is drawn, whatever the share: every
        // replica draws alike and takes its own part.
        let per_sample = self.model_config.dropout_len();
        let keep = dropout_keep(
            &mut self.dropout,
            chunk.len() * per_sample,
            self.model_config.dropout,
        );
        let model = self
            .model
            .take()
            .expect("a visit holds its model between steps");
        let (model, grads, reported) = self.share_gradients(model, chunk, &keep, [h, w]);
        if self.share.1 > 1 {
            self.last_batch = Some((chunk.to_vec(), keep));
        }
        self.stats.steps += 1;
        self.stats.samples += chunk.len();
        let progress = StepProgress {
            epoch: self.epoch,
            epochs: self.config.epochs,
            batch: self.batch,
            batches,
            loss: 0.0,
        };
        self.advance();
        Some((model, grads, reported, progress))
    }

    /// `model`'s gradients on this visit's share of the batch `chunk`
    /// (samples' places) with the batch's whole dropout mask `keep`
    /// (`[h, w]`: the masked feature maps), weighted by the share's part
    /// of the batch; the share's weighted loss, detached (`None` for an
    /// empty share).
    fn share_gradients(
        &self,
        model: Cnn,
        chunk: &[usize],
        keep: &[f32],
        [h, w]: [usize; 2],
    ) -> (Cnn, GradientsParams, Option<Tensor<1>>) {
        let per_sample = self.model_config.dropout_len();
        let (index, of) = self.share;
        let (lo, hi) = (chunk.len() * index / of, chunk.len() * (index + 1) / of);
        if lo == hi {
            return (model, GradientsParams::new(), None);
        }
        let part = &chunk[lo..hi];
        let data = Samples {
            images: &self.images,
            labels: &self.labels,
        };
        let (images, targets) = batch_tensors(&self.model_config, data, part, &self.device);
        let keep = TensorData::new(
            keep[lo * per_sample..hi * per_sample].to_vec(),
            [part.len(), 18, h, w],
        );
        let keep = Tensor::from_data(keep, &*self.device);
        let mut loss = cross_entropy(model.forward_masked(images, keep), targets);
        if of > 1 {
            loss = loss.mul_scalar(part.len() as f64 / chunk.len() as f64);
        }
        let reported = loss.clone().detach();
        let objective = self.with_prox(&model, loss);
        let grads = GradientsParams::from_grads(objective.backward(), &model);
        (model, grads, Some(reported))
    }

    /// Moves on to the next batch (the next epoch's first, reshuffled, after
    /// an epoch's last).
    fn advance(&mut self) {
        self.batch += 1;
        if self.batch == self.batches() {
            self.batch = 0;
            self.epoch += 1;
            self.order.shuffle(&mut self.rng);
        }
    }

    /// The next batch's place in the whole visit (`epoch * batches +
    /// batch`), and the visit's batch count: the place equals the count
    /// once every epoch is done.
    fn position(&self) -> (usize, usize) {
        let batches = self.batches();
        let total = batches * self.config.epochs;
        ((self.epoch * batches + self.batch).min(total), total)
    }

    /// `loss` plus FedProx's term (`mu / 2` times the squared distance to
    /// the anchor) when `prox_mu` is on, in the last share only (the
    /// batch has it once, and the last share is never empty).
    fn with_prox(&self, model: &Cnn, loss: Tensor<1>) -> Tensor<1> {
        if self.config.prox_mu <= 0.0 || self.share.0 + 1 != self.share.1 {
            return loss;
        }
        let mut prox = ProxTerm {
            anchor: &self.anchor,
            offset: 0,
            device: &self.device,
            total: None,
        };
        model.visit(&mut prox);
        match prox.total {
            Some(term) => loss + term.mul_scalar(self.config.prox_mu / 2.0),
            None => loss,
        }
    }

    /// Counts a step's loss, read back, and tells the observer.
    fn record(
        &mut self,
        loss: f32,
        progress: StepProgress,
        observe: &mut dyn FnMut(&StepProgress),
    ) {
        self.loss_sum += f64::from(loss);
        observe(&StepProgress { loss, ..progress });
    }

    /// The trained model and what the visit did.
    fn finish(mut self) -> (Cnn, TrainStats) {
        if self.stats.steps > 0 {
            self.stats.mean_loss = self.loss_sum / self.stats.steps as f64;
        }
        let model = self.model.take().expect("a visit holds its model");
        (model, self.stats)
    }
}

/// The most replicas a visit is split between: a batch of the papers' 20
/// has a sample or more in each.
pub const MAX_REPLICAS: usize = 16;

/// One of `of` replicas of a visit trained data-parallel: every optimiser
/// step's batch is split between them in contiguous slices; each computes
/// the gradients of its slice ([`Replica::gradients`], weighted by the
/// slice's part of the batch), the driver adds the replicas' gradients up,
/// and every replica takes the same Adam step with the sum
/// ([`Replica::apply`]). So all of them hold one model, the one a single
/// visit reaches (up to the order of float sums). Each replica holds the
/// whole shard and draws the same shuffles and dropout masks from the
/// visit's seed: only gradients travel, `Weights::values`-long vectors in
/// the model's parameter order. FedProx's term is the last replica's (its
/// slice is never empty).
///
/// The drivers: [`train_parallel`] (threads, natively) and the tab's Web
/// Workers (`client-wasm`). Gradients are read back synchronously: a
/// replica trains on the CPU (`flex`). At most [`MAX_REPLICAS`].
pub struct Replica<'a> {
    visit: Visit<'a>,
    /// The share's loss of the step [`Replica::gradients`] began (counted
    /// in the visit's loss; [`Replica::alone`] counts the whole batch's
    /// instead).
    in_flight_loss: f32,
}

impl<'a> Replica<'a> {
    /// Replica `index` (from 0) of `of` of the visit of `weights` on
    /// `data` with `config`, on `device` (an autodiff device).
    ///
    /// # Errors
    /// If `weights` do not fit `model_config`.
    pub fn new(
        model_config: &'a ModelConfig,
        weights: &'a Weights,
        data: Samples<'a>,
        config: &'a TrainConfig,
        device: &'a Device,
        (index, of): (usize, usize),
    ) -> Result<Self, WeightsError> {
        check_share(index, of)?;
        let mut visit = Visit::new(model_config, weights, data, config, device)?;
        visit.share = (index, of);
        Ok(Self {
            visit,
            in_flight_loss: 0.0,
        })
    }

    /// [`Replica::new`] owning its inputs (a tab's Web Worker keeps one
    /// between calls from JavaScript): `images` and `labels` as
    /// [`Samples`] holds them.
    ///
    /// # Errors
    /// If `weights` do not fit `model_config`.
    pub fn owned(
        model_config: ModelConfig,
        weights: &Weights,
        (images, labels): (Vec<f32>, Vec<u32>),
        config: TrainConfig,
        device: Device,
        (index, of): (usize, usize),
    ) -> Result<Replica<'static>, WeightsError> {
        check_share(index, of)?;
        let mut visit = Visit::owned(model_config, weights, (images, labels), config, device)?;
        visit.share = (index, of);
        Ok(Replica {
            visit,
            in_flight_loss: 0.0,
        })
    }

    /// The next step's gradients of this replica's slice, flat, with its
    /// part of the batch's mean loss (0 for an empty slice) and where the
    /// step is; `None` once every epoch is done. [`Replica::apply`] must
    /// follow before the next call.
    ///
    /// # Errors
    /// If the gradients cannot be read back.
    pub fn gradients(&mut self) -> Result<Option<(Vec<f32>, f32, StepProgress)>, WeightsError> {
        let Some((model, grads, loss, progress)) = self.visit.backward() else {
            return Ok(None);
        };
        let mut flatten = FlatGradients {
            grads: &grads,
            device: (*self.visit.device).clone().inner(),
            flat: Vec::new(),
        };
        model.visit(&mut flatten);
        let values = match flatten.flat.is_empty() {
            true => Vec::new(),
            false => crate::weights::f32_values(Tensor::cat(flatten.flat, 0).into_data())?,
        };
        let loss = match loss {
            Some(loss) => loss.into_scalar::<f32>(),
            None => 0.0,
        };
        self.visit.loss_sum += f64::from(loss);
        self.in_flight_loss = loss;
        self.visit.stepping = Some((model, grads));
        Ok(Some((values, loss, progress)))
    }

    /// Takes the step [`Replica::gradients`] began, with `summed`: every
    /// replica's gradients of this step added up (the parameter count
    /// long). Without a step begun it does nothing.
    ///
    /// # Errors
    /// If `summed` is not the model's parameter count long.
    pub fn apply(&mut self, summed: &[f32]) -> Result<(), WeightsError> {
        let Some((model, mut grads)) = self.visit.stepping.take() else {
            return Ok(());
        };
        let expected = self.visit.anchor.len();
        if summed.len() != expected {
            self.visit.stepping = Some((model, grads));
            return Err(WeightsError::WrongLength {
                expected,
                got: summed.len(),
            });
        }
        let flat = Tensor::<1>::from_data(
            TensorData::new(summed.to_vec(), [summed.len()]),
            &(*self.visit.device).clone().inner(),
        );
        let mut replace = ReplaceGradients {
            grads: &mut grads,
            flat,
            offset: 0,
        };
        model.visit(&mut replace);
        self.visit.model = Some(self.visit.optimizer.step(
            self.visit.config.learning_rate,
            model,
            grads,
        ));
        Ok(())
    }

    /// Goes on alone: from the next step this replica computes whole
    /// batches (the replicas it shared the visit with are gone, or were
    /// slower together), and the visit ends with the update one replica
    /// alone would have made (within float rounding). A step begun by
    /// [`Replica::gradients`] and not applied is taken again here on the
    /// whole batch (the same samples and dropout mask), so a peer lost
    /// mid-step costs nothing; its whole-batch loss is returned (`None`
    /// when no step was in flight). Then [`Replica::step`] takes the rest.
    ///
    /// # Errors
    /// If the step's gradients cannot be computed again (its batch was not
    /// kept: a replica that was never shared).
    pub fn alone(&mut self) -> Result<Option<f32>, WeightsError> {
        if self.visit.stepping.is_some() && self.visit.last_batch.is_none() {
            // Nothing changed: the replica can still apply its step.
            return Err(WeightsError::OutOfTurn(
                "a step in flight without its batch",
            ));
        }
        self.visit.share = (0, 1);
        let last_batch = self.visit.last_batch.take();
        let (Some((model, _)), Some((chunk, keep))) = (self.visit.stepping.take(), last_batch)
        else {
            return Ok(None);
        };
        let maps = self.visit.model_config.feature_maps()[1];
        let (model, grads, loss) = self.visit.share_gradients(model, &chunk, &keep, maps);
        self.visit.model = Some(self.visit.optimizer.step(
            self.visit.config.learning_rate,
            model,
            grads,
        ));
        let loss = loss.map(|l| l.into_scalar::<f32>());
        // The step's loss is the whole batch's now, not this share's.
        self.visit.loss_sum += f64::from(loss.unwrap_or(0.0) - self.in_flight_loss);
        Ok(loss)
    }

    /// The next whole step of a replica gone [`Replica::alone`] (as one
    /// visit steps: no gradients read out): its loss and where it was,
    /// `None` once every epoch is done.
    ///
    /// # Errors
    /// If the replica still shares the visit (call `alone` first).
    pub fn step(&mut self) -> Result<Option<StepProgress>, WeightsError> {
        if self.visit.share != (0, 1) || self.visit.stepping.is_some() {
            return Err(WeightsError::OutOfTurn(
                "a replica steps alone only after Replica::alone",
            ));
        }
        let Some((loss, progress)) = self.visit.step() else {
            return Ok(None);
        };
        let loss = loss.into_scalar::<f32>();
        self.visit.loss_sum += f64::from(loss);
        Ok(Some(StepProgress { loss, ..progress }))
    }

    /// The trained weights and what the visit did (its loss: this
    /// replica's part of each shared step, the driver adds the parts up,
    /// and the whole batch's of each step after [`Replica::alone`]).
    pub fn finish(self) -> (Weights, TrainStats) {
        let (model, stats) = self.visit.finish();
        (Weights::from_model(&model), stats)
    }
}

/// One of `of` replicas of a visit trained by local SGD with periodic
/// averaging (Stich, "Local SGD converges fast and communicates little",
/// ICLR 2019; Lin et al., "Don't use large mini-batches, use local SGD",
/// ICLR 2020). The visit's batches, shuffled as one visit shuffles them,
/// are dealt round-robin: batch `g` of the whole visit (counted across
/// epochs) is replica `g % of`'s. Each replica takes whole-batch Adam
/// steps on its own, with its own Adam state and dropout stream; at the
/// end of every stretch of `sync` rounds of `of` batches (`sync` 0: one
/// stretch, the whole visit) the driver averages the replicas' weights,
/// weighted by the samples each trained in the stretch
/// ([`average_replicas`]), and every replica goes on from the average
/// ([`LocalReplica::load`]); the last average is the visit's result.
///
/// This is **not** the single visit's update: `of` replicas take `1 / of`
/// of its sequential steps each, so a hop moves less far per epoch (what
/// that costs in accuracy: docs/RESULTS.md, `astraea bench threads`). In
/// exchange replicas exchange weights once a stretch instead of gradients
/// once a step, and each computes whole batches, where a small batch's
/// per-operation overhead is not divided by splitting it ([`Replica`]
/// keeps the single visit's update). With `of == 1` it is the single
/// visit, step for step. On the CPU (`flex`), like [`Replica`].
pub struct LocalReplica<'a> {
    visit: Visit<'a>,
    index: usize,
    of: usize,
    /// Batch places a stretch spans: `sync * of` (`usize::MAX` for one
    /// stretch).
    span: usize,
    /// Where the current stretch ends (a batch place, exclusive).
    stretch_end: usize,
    /// Samples this replica trained in the current stretch.
    stretch_samples: usize,
}

impl<'a> LocalReplica<'a> {
    /// Replica `index` (from 0) of `of` of the visit of `weights` on
    /// `data` with `config`, on `device` (an autodiff device), averaged
    /// every `sync` rounds (0: once, at the end).
    ///
    /// # Errors
    /// If `weights` do not fit `model_config`, or there is no such replica.
    pub fn new(
        model_config: &'a ModelConfig,
        weights: &'a Weights,
        data: Samples<'a>,
        config: &'a TrainConfig,
        device: &'a Device,
        (index, of): (usize, usize),
        sync: usize,
    ) -> Result<Self, WeightsError> {
        check_share(index, of)?;
        let visit = Visit::new(model_config, weights, data, config, device)?;
        Ok(Self::dealt(visit, (index, of), sync))
    }

    /// [`LocalReplica::new`] owning its inputs (a tab's Web Worker keeps
    /// one between calls from JavaScript).
    ///
    /// # Errors
    /// As [`LocalReplica::new`].
    pub fn owned(
        model_config: ModelConfig,
        weights: &Weights,
        (images, labels): (Vec<f32>, Vec<u32>),
        config: TrainConfig,
        device: Device,
        (index, of): (usize, usize),
        sync: usize,
    ) -> Result<LocalReplica<'static>, WeightsError> {
        check_share(index, of)?;
        let visit = Visit::owned(model_config, weights, (images, labels), config, device)?;
        Ok(LocalReplica::dealt(visit, (index, of), sync))
    }

    fn dealt(mut visit: Visit<'a>, (index, of): (usize, usize), sync: usize) -> Self {
        // Replica 0 draws from the single visit's dropout stream (the same
        // masks only when it is alone: it draws for its own batches only);
        // the others from streams of their own.
        if index > 0 {
            visit.dropout = dropout_rng(crate::engine::seeds::mix(&[
                visit.config.seed,
                index as u64,
            ]));
        }
        let span = if sync == 0 {
            usize::MAX
        } else {
            sync.saturating_mul(of)
        };
        Self {
            visit,
            index,
            of,
            span,
            stretch_end: span,
            stretch_samples: 0,
        }
    }

    /// Trains this replica's next batch of the current stretch: its loss
    /// (read back) and where it was; `None` once the stretch (or the
    /// visit) has no more batches of this replica's. Then
    /// [`LocalReplica::weights`] and [`LocalReplica::load`].
    ///
    /// # Errors
    /// None today; a read back that fails would be one.
    pub fn step(&mut self) -> Result<Option<(f32, StepProgress)>, WeightsError> {
        loop {
            let (place, total) = self.visit.position();
            if place >= self.stretch_end.min(total) {
                return Ok(None);
            }
            if place % self.of != self.index {
                self.visit.advance();
                continue;
            }
            let before = self.visit.stats.samples;
            let Some((loss, progress)) = self.visit.step() else {
                return Ok(None);
            };
            self.stretch_samples += self.visit.stats.samples - before;
            let loss = loss.into_scalar::<f32>();
            self.visit.loss_sum += f64::from(loss);
            return Ok(Some((loss, StepProgress { loss, ..progress })));
        }
    }

    /// This replica's weights at the end of a stretch (flat, in parameter
    /// order) and the samples it trained in the stretch: its part of the
    /// average.
    pub fn weights(&self) -> (Vec<f32>, usize) {
        let model = self
            .visit
            .model
            .as_ref()
            .expect("a visit holds its model between steps");
        (Weights::from_model(model).values, self.stretch_samples)
    }

    /// Goes on from `averaged` (every replica's stretch averaged,
    /// [`average_replicas`]), keeping this replica's Adam state; whether
    /// another stretch follows (`false`: the visit is done and `averaged`
    /// its result).
    ///
    /// # Errors
    /// If `averaged` is not the model's parameter count long or is not
    /// finite; the replica is unchanged.
    pub fn load(&mut self, averaged: &[f32]) -> Result<bool, WeightsError> {
        let model = self
            .visit
            .model
            .take()
            .expect("a visit holds its model between steps");
        if let Err(e) = crate::weights::check_values_fit(averaged, &Weights::shapes_of(&model)) {
            self.visit.model = Some(model);
            return Err(e);
        }
        self.visit.model = Some(Weights::load_values(model, averaged)?);
        self.stretch_samples = 0;
        self.stretch_end = self.stretch_end.saturating_add(self.span);
        let (place, total) = self.visit.position();
        Ok(place < total)
    }

    /// The weights (the last average, once the visit is done) and this
    /// replica's part of what the visit did: its steps, samples and mean
    /// loss.
    pub fn finish(self) -> (Weights, TrainStats) {
        let (model, stats) = self.visit.finish();
        (Weights::from_model(&model), stats)
    }
}

/// The replicas' stretch averaged ([`LocalReplica`]): each replica's
/// weights (flat, equal lengths) weighted by the samples it trained in
/// the stretch; a plain mean if none trained (they all hold the last
/// average then). Sums in `f64`.
///
/// # Errors
/// [`WeightsError::WrongLength`] if the lengths differ; nothing to average
/// is an empty vector.
pub fn average_replicas(parts: &[(&[f32], usize)]) -> Result<Vec<f32>, WeightsError> {
    let Some(((first, _), rest)) = parts.split_first() else {
        return Ok(Vec::new());
    };
    if let Some((other, _)) = rest.iter().find(|(w, _)| w.len() != first.len()) {
        return Err(WeightsError::WrongLength {
            expected: first.len(),
            got: other.len(),
        });
    }
    let samples: usize = parts.iter().map(|(_, n)| n).sum();
    let weight = |n: usize| match samples {
        0 => 1.0 / parts.len() as f64,
        _ => n as f64 / samples as f64,
    };
    let mut sum = vec![0.0f64; first.len()];
    for (values, n) in parts {
        let w = weight(*n);
        sum.iter_mut()
            .zip(values.iter())
            .for_each(|(s, v)| *s += w * f64::from(*v));
    }
    Ok(sum.into_iter().map(|s| s as f32).collect())
}

/// Replica `index` of `of` exists: two replicas computing one slice would
/// count it twice.
fn check_share(index: usize, of: usize) -> Result<(), WeightsError> {
    if index < of && of <= MAX_REPLICAS {
        Ok(())
    } else {
        Err(WeightsError::NoSuchReplica { index, of })
    }
}

/// A model's gradients as one flat tensor, in parameter order (zeros for a
/// parameter without a gradient).
struct FlatGradients<'g> {
    grads: &'g GradientsParams,
    device: Device,
    flat: Vec<Tensor<1>>,
}

impl ModuleVisitor for FlatGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let numel = param.shape().num_elements();
        self.flat.push(match self.grads.get::<D>(param.id) {
            Some(grad) => grad.reshape([numel]),
            None => Tensor::zeros([numel], &self.device),
        });
    }
}

/// Puts a flat gradient vector in place of a model's gradients.
struct ReplaceGradients<'g> {
    grads: &'g mut GradientsParams,
    flat: Tensor<1>,
    offset: usize,
}

impl ModuleVisitor for ReplaceGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.shape();
        let numel = shape.num_elements();
        let grad = self
            .flat
            .clone()
            .narrow(0, self.offset, numel)
            .reshape(shape);
        self.offset += numel;
        self.grads.register::<D>(param.id, grad);
    }
}

/// [`train_observed`] with `threads` replicas of the visit, one a thread
/// ([`Replica`]): the same weights within float rounding, each step's
/// batch computed in parallel. Natively only (a tab's replicas are Web
/// Workers). `threads` 0 or 1 is [`train_observed`].
///
/// A thread that fails (an error, a panic, or it ends) costs the visit
/// nothing but its speed: the calling thread's replica goes on alone from
/// the step in flight ([`Replica::alone`], the same update), the other
/// threads are stopped (the batches' shares are fixed), and
/// [`TrainStats::replicas_lost`] says how many replicas the visit lost.
/// A thread that is alive but never answers is waited for (the threads
/// share this process: there is no freezing peer to time out).
///
/// # Errors
/// As [`train_observed`] (the calling thread's own replica).
#[cfg(not(target_arch = "wasm32"))]
pub fn train_parallel(
    model_config: &ModelConfig,
    weights: &Weights,
    data: Samples<'_>,
    config: &TrainConfig,
    threads: usize,
    observe: &mut dyn FnMut(&StepProgress),
) -> Result<(Weights, TrainStats), WeightsError> {
    train_parallel_losing(
        model_config,
        weights,
        data,
        config,
        threads,
        observe,
        &|_, _| false,
    )
}

/// [`train_parallel`], where replica `index` (from 1) ends before its
/// step `step` (from 0) when `lose(index, step)` (a panic in `lose` is a
/// panic in training): how the tests lose a thread.
#[cfg(not(target_arch = "wasm32"))]
fn train_parallel_losing(
    model_config: &ModelConfig,
    weights: &Weights,
    data: Samples<'_>,
    config: &TrainConfig,
    threads: usize,
    observe: &mut dyn FnMut(&StepProgress),
    lose: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Result<(Weights, TrainStats), WeightsError> {
    use std::sync::mpsc::channel;
    let device = Device::flex().autodiff();
    let threads = threads.min(MAX_REPLICAS);
    if threads <= 1 {
        return train_observed(model_config, weights, data, config, &device, observe);
    }
    let mut first = Replica::new(model_config, weights, data, config, &device, (0, threads))?;
    std::thread::scope(|scope| {
        let mut helpers = Vec::new();
        for index in 1..threads {
            let (to_helper, steps) = channel::<std::sync::Arc<Vec<f32>>>();
            let (to_driver, from_helper) =
                channel::<Result<Option<(Vec<f32>, f32)>, WeightsError>>();
            scope.spawn(move || {
                // A panic in training is this replica's error, not the
                // driver's: it hears of it as an error and stops.
                let crashed = to_driver.clone();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    let device = Device::flex().autodiff();
                    let mut replica = match Replica::new(
                        model_config,
                        weights,
                        data,
                        config,
                        &device,
                        (index, threads),
                    ) {
                        Ok(replica) => replica,
                        Err(e) => return drop(to_driver.send(Err(e))),
                    };
                    for taken in 0.. {
                        if lose(index, taken) {
                            return;
                        }
                        let step = replica.gradients().map(|s| s.map(|(g, loss, _)| (g, loss)));
                        let done = !matches!(step, Ok(Some(_)));
                        if to_driver.send(step).is_err() || done {
                            return;
                        }
                        let Ok(summed) = steps.recv() else { return };
                        if replica.apply(&summed).is_err() {
                            return;
                        }
                    }
                }));
                if outcome.is_err() {
                    let _ = crashed.send(Err(WeightsError::Readback(
                        "a training thread panicked".into(),
                    )));
                }
            });
            helpers.push((to_helper, from_helper));
        }
        let mut loss_sum = 0.0;
        let mut lost = 0;
        while let Some((mut summed, mut loss, progress)) = first.gradients()? {
            // Every helper's share of this step, or none: a helper that
            // failed (an error, a panic, gone, or gradients that do not
            // fit) leaves this replica to take the step alone.
            let whole = helpers.iter().all(|(_, from_helper)| {
                let Ok(Ok(Some((grads, part)))) = from_helper.recv() else {
                    return false;
                };
                if grads.len() != summed.len() {
                    return false;
                }
                summed.iter_mut().zip(&grads).for_each(|(s, g)| *s += g);
                loss += part;
                true
            });
            if !whole {
                // The others stop at their next wait (their channels close).
                lost = helpers.len();
                helpers.clear();
                let redone = first.alone()?.unwrap_or(0.0);
                observe(&StepProgress {
                    loss: redone,
                    ..progress
                });
                loss_sum += f64::from(redone);
                break;
            }
            let summed = std::sync::Arc::new(summed);
            for (to_helper, _) in &helpers {
                // A helper gone since its gradients is found at the next step.
                let _ = to_helper.send(summed.clone());
            }
            first.apply(&summed)?;
            observe(&StepProgress { loss, ..progress });
            loss_sum += f64::from(loss);
        }
        if lost > 0 {
            while let Some(step) = first.step()? {
                observe(&step);
                loss_sum += f64::from(step.loss);
            }
        }
        let (trained, mut stats) = first.finish();
        if stats.steps > 0 {
            stats.mean_loss = loss_sum / stats.steps as f64;
        }
        stats.replicas_lost = lost;
        Ok((trained, stats))
    })
}

/// [`train_observed`] by local SGD with `threads` replicas, one a thread,
/// averaged every `sync` rounds (0: once, at the end): [`LocalReplica`],
/// which says what it is (not the single visit's update). `observe` hears
/// replica 0's steps. The stats are the whole visit's: every replica's
/// samples and steps, the mean loss over all their steps. Natively only.
/// `threads` 0 or 1 is [`train_observed`].
///
/// A thread that fails (an error, a panic, it ends, or weights that do
/// not fit) costs the time, not the visit: the visit is trained again
/// alone from its start ([`train_observed`], `observe` hearing its steps
/// from the first again), as a tab's worker does, and
/// [`TrainStats::replicas_lost`] is `threads - 1`.
///
/// # Errors
/// As [`train_observed`].
#[cfg(not(target_arch = "wasm32"))]
pub fn train_local(
    model_config: &ModelConfig,
    weights: &Weights,
    data: Samples<'_>,
    config: &TrainConfig,
    (threads, sync): (usize, usize),
    observe: &mut dyn FnMut(&StepProgress),
) -> Result<(Weights, TrainStats), WeightsError> {
    train_local_losing(
        model_config,
        weights,
        data,
        config,
        (threads, sync),
        observe,
        &|_, _| false,
    )
}

/// [`train_local`], where replica `index` (from 1) ends before its step
/// `step` (from 0, counted over the visit) when `lose(index, step)`: how
/// the tests lose a thread.
#[cfg(not(target_arch = "wasm32"))]
fn train_local_losing(
    model_config: &ModelConfig,
    weights: &Weights,
    data: Samples<'_>,
    config: &TrainConfig,
    (threads, sync): (usize, usize),
    observe: &mut dyn FnMut(&StepProgress),
    lose: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Result<(Weights, TrainStats), WeightsError> {
    let device = Device::flex().autodiff();
    let threads = threads.min(MAX_REPLICAS);
    if threads <= 1 {
        return train_observed(model_config, weights, data, config, &device, observe);
    }
    let shared = LocalThreads {
        model_config,
        weights,
        data,
        config,
        device: &device,
        threads,
        sync,
        lose,
    };
    match shared.train(observe) {
        Ok(trained) => Ok(trained),
        // Whatever failed, alone from the start (the replicas' stretches
        // cannot be taken up by one): if this replica's own training was
        // what failed, it fails again here and says why.
        Err(_) => {
            let (trained, mut stats) =
                train_observed(model_config, weights, data, config, &device, observe)?;
            stats.replicas_lost = threads - 1;
            Ok((trained, stats))
        }
    }
}

/// A local-SGD visit on threads ([`train_local`]), before any fallback.
#[cfg(not(target_arch = "wasm32"))]
struct LocalThreads<'a, 'd> {
    model_config: &'a ModelConfig,
    weights: &'a Weights,
    data: Samples<'d>,
    config: &'a TrainConfig,
    device: &'a Device,
    threads: usize,
    sync: usize,
    lose: &'a (dyn Fn(usize, usize) -> bool + Sync),
}

#[cfg(not(target_arch = "wasm32"))]
impl LocalThreads<'_, '_> {
    fn train(
        &self,
        observe: &mut dyn FnMut(&StepProgress),
    ) -> Result<(Weights, TrainStats), WeightsError> {
        use std::sync::Arc;
        use std::sync::mpsc::channel;
        let Self {
            model_config,
            weights,
            data,
            config,
            device,
            threads,
            sync,
            lose,
        } = *self;
        let mut first = LocalReplica::new(
            model_config,
            weights,
            data,
            config,
            device,
            (0, threads),
            sync,
        )?;
        /// A helper's word: a stretch's weights and samples, or its stats at the end.
        enum Word {
            Stretch(Vec<f32>, usize),
            Done(TrainStats),
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        let stop = &stop;
        std::thread::scope(|scope| {
            let mut helpers = Vec::new();
            for index in 1..threads {
                let (to_helper, averages) = channel::<Arc<Vec<f32>>>();
                let (to_driver, from_helper) = channel::<Result<Word, WeightsError>>();
                scope.spawn(move || {
                    let crashed = to_driver.clone();
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                            let device = Device::flex().autodiff();
                            let run = || -> Result<(), WeightsError> {
                                let mut replica = LocalReplica::new(
                                    model_config,
                                    weights,
                                    data,
                                    config,
                                    &device,
                                    (index, threads),
                                    sync,
                                )?;
                                let mut taken = 0;
                                loop {
                                    loop {
                                        if lose(index, taken)
                                            || stop.load(std::sync::atomic::Ordering::Relaxed)
                                        {
                                            return Ok(());
                                        }
                                        if replica.step()?.is_none() {
                                            break;
                                        }
                                        taken += 1;
                                    }
                                    let (values, samples) = replica.weights();
                                    if to_driver.send(Ok(Word::Stretch(values, samples))).is_err() {
                                        return Ok(());
                                    }
                                    let Ok(averaged) = averages.recv() else {
                                        return Ok(());
                                    };
                                    if !replica.load(&averaged)? {
                                        let _ = to_driver.send(Ok(Word::Done(replica.finish().1)));
                                        return Ok(());
                                    }
                                }
                            };
                            if let Err(e) = run() {
                                let _ = to_driver.send(Err(e));
                            }
                        }));
                    if outcome.is_err() {
                        let _ = crashed.send(Err(WeightsError::Readback(
                            "a training thread panicked".into(),
                        )));
                    }
                });
                helpers.push((to_helper, from_helper));
            }
            // Whatever ends the visit early stops the helpers at their next
            // step, not at the end of their stretch (the fallback alone
            // then starts at once, and beats meanwhile).
            let drive = || -> Result<(Weights, TrainStats), WeightsError> {
                let gone = || WeightsError::Readback("a training thread ended early".into());
                let mut last = None;
                loop {
                    while let Some((_, progress)) = first.step()? {
                        observe(&progress);
                        last = Some(progress);
                    }
                    let mut parts = vec![first.weights()];
                    for (_, from_helper) in &helpers {
                        // A slower helper's stretch is awaited with replica 0's
                        // last step told again every second: the observer's
                        // heartbeats must not stop while the hop goes on.
                        let word = loop {
                            match from_helper.recv_timeout(std::time::Duration::from_secs(1)) {
                                Ok(word) => break word,
                                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                    if let Some(progress) = &last {
                                        observe(progress);
                                    }
                                }
                                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                                    return Err(gone());
                                }
                            }
                        };
                        match word? {
                            Word::Stretch(values, samples) => parts.push((values, samples)),
                            Word::Done(_) => return Err(gone()),
                        }
                    }
                    let views: Vec<(&[f32], usize)> =
                        parts.iter().map(|(v, n)| (&v[..], *n)).collect();
                    let averaged = Arc::new(average_replicas(&views)?);
                    for (to_helper, _) in &helpers {
                        to_helper.send(averaged.clone()).map_err(|_| gone())?;
                    }
                    if !first.load(&averaged)? {
                        break;
                    }
                }
                let (trained, mut stats) = first.finish();
                let mut loss_sum = stats.mean_loss * stats.steps as f64;
                for (_, from_helper) in &helpers {
                    match from_helper.recv().map_err(|_| gone())?? {
                        Word::Done(part) => {
                            stats.samples += part.samples;
                            stats.steps += part.steps;
                            loss_sum += part.mean_loss * part.steps as f64;
                        }
                        Word::Stretch(..) => return Err(gone()),
                    }
                }
                stats.mean_loss = if stats.steps > 0 {
                    loss_sum / stats.steps as f64
                } else {
                    0.0
                };
                Ok((trained, stats))
            };
            let outcome = drive();
            if outcome.is_err() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            outcome
        })
    }
}

/// Sum of squared distances of the model's parameters to an anchor (the
/// global model), the FedProx term before its `mu / 2` factor.
struct ProxTerm<'a> {
    anchor: &'a [f32],
    offset: usize,
    device: &'a Device,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for ProxTerm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let shape = value.shape();
        let numel = shape.num_elements();
        let anchor = &self.anchor[self.offset..self.offset + numel];
        self.offset += numel;
        let anchor = Tensor::<D>::from_data(TensorData::new(anchor.to_vec(), shape), self.device);
        let diff = value - anchor;
        let term = (diff.clone() * diff).sum();
        self.total = Some(match self.total.take() {
            Some(acc) => acc + term,
            None => term,
        });
    }
}

/// Top-1 accuracy and mean loss of `weights` on `data`, in batches of
/// `batch_size`. Dropout is off (`valid()`), whatever the device.
pub fn evaluate(
    model_config: &ModelConfig,
    weights: &Weights,
    data: Samples<'_>,
    batch_size: usize,
    device: &Device,
) -> Result<EvalStats, WeightsError> {
    let model: Cnn = weights.to_model(model_config, device)?.valid();
    let mut correct = 0i64;
    let mut loss_sum = 0.0;
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (images, targets) = batch_tensors(model_config, data, chunk, device);
        let logits = model.forward(images);
        let predicted = logits.clone().argmax(1);
        correct += predicted
            .equal(targets.clone())
            .int()
            .sum()
            .into_scalar::<i64>();
        loss_sum +=
            f64::from(cross_entropy(logits, targets).into_scalar::<f32>()) * chunk.len() as f64;
    }
    let n = data.len().max(1) as f64;
    Ok(EvalStats {
        accuracy: correct as f64 / n,
        loss: loss_sum / n,
        samples: data.len(),
    })
}

/// What a task trains: the model's architecture, the weights it starts
/// from (`values`, laid out as the model's parameters), and the visit's
/// settings.
pub fn task_setup(
    model: &ModelSpec,
    task: &TaskSpec,
    values: Vec<f32>,
) -> (crate::model::ModelConfig, Weights, TrainConfig) {
    let config = model.config();
    let weights = Weights {
        shapes: Weights::shapes_of(&config.init_zeros(&Device::flex())),
        values,
    };
    let train_config = TrainConfig {
        epochs: task.epochs,
        batch_size: task.batch_size,
        learning_rate: task.learning_rate,
        prox_mu: task.prox_mu,
        seed: task.seed,
    };
    (config, weights, train_config)
}

/// Runs a task on `data` on the CPU (burn `flex`): the training every
/// client does between `ClientAction::Train` and
/// [`ClientSession::trained`]. `observe` hears of every step.
pub fn train_task(
    model: &ModelSpec,
    task: &TaskSpec,
    values: Vec<f32>,
    data: Samples<'_>,
    observe: &mut dyn FnMut(&StepProgress),
) -> Result<(Vec<f32>, TrainStats), WeightsError> {
    let (config, weights, train_config) = task_setup(model, task, values);
    let device = Device::flex().autodiff();
    let (trained, stats) =
        train_observed(&config, &weights, data, &train_config, &device, observe)?;
    Ok((trained.values, stats))
}

/// How a hop is shared between replicas (threads or Web Workers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Split {
    /// Every batch sliced between them, the gradients summed every step
    /// ([`Replica`]): the single visit's update.
    #[default]
    Slices,
    /// Local SGD ([`LocalReplica`]): batches dealt, weights averaged every
    /// `sync` rounds (0: once, at the end). Another update.
    Local {
        /// Rounds of one batch a replica between averages; 0: once.
        sync: usize,
    },
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Split::Slices => write!(f, "slices"),
            Split::Local { sync: 0 } => write!(f, "local"),
            Split::Local { sync } => write!(f, "local:{sync}"),
        }
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    /// `slices`, `local` (averaged once a hop) or `local:K` (every K rounds).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "slices" => Ok(Split::Slices),
            None if s == "local" => Ok(Split::Local { sync: 0 }),
            Some(("local", k)) => k
                .parse()
                .map(|sync| Split::Local { sync })
                .map_err(|_| format!("{s:?}: the rounds between averages are a whole number")),
            _ => Err(format!("{s:?}: `slices`, `local` or `local:K`")),
        }
    }
}

/// [`train_task`] with `threads` replicas of the visit, one a thread,
/// shared as `split` ([`train_parallel`]: the same weights within float
/// rounding; or [`train_local`]: local SGD). Natively only.
///
/// # Errors
/// As [`train_parallel`].
#[cfg(not(target_arch = "wasm32"))]
pub fn train_task_threads(
    model: &ModelSpec,
    task: &TaskSpec,
    values: Vec<f32>,
    data: Samples<'_>,
    (threads, split): (usize, Split),
    observe: &mut dyn FnMut(&StepProgress),
) -> Result<(Vec<f32>, TrainStats), WeightsError> {
    let (config, weights, train_config) = task_setup(model, task, values);
    let (trained, stats) = match split {
        Split::Slices => train_parallel(&config, &weights, data, &train_config, threads, observe)?,
        Split::Local { sync } => train_local(
            &config,
            &weights,
            data,
            &train_config,
            (threads, sync),
            observe,
        )?,
    };
    Ok((trained.values, stats))
}

/// [`train_task`] on any device, reading back asynchronously (WebGPU in a
/// browser); `device` is the plain device, made autodiff here.
pub async fn train_task_async(
    model: &ModelSpec,
    task: &TaskSpec,
    values: Vec<f32>,
    data: Samples<'_>,
    device: &Device,
    observe: &mut dyn FnMut(&StepProgress),
) -> Result<(Vec<f32>, TrainStats), WeightsError> {
    let (config, weights, train_config) = task_setup(model, task, values);
    let device = device.clone().autodiff();
    let (trained, stats) =
        train_async(&config, &weights, data, &train_config, &device, observe).await?;
    Ok((trained.values, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes a network can tell apart at once: bright top half or
    /// bright bottom half.
    fn halves(n: usize) -> (Vec<f32>, Vec<u32>) {
        let mut images = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let label = (i % 2) as u32;
            for row in 0..28 {
                let bright = (row < 14) == (label == 0);
                images.extend(std::iter::repeat_n(if bright { 0.9 } else { 0.1 }, 28));
            }
            labels.push(label);
        }
        (images, labels)
    }

    #[test]
    fn training_learns_a_separable_task_and_evaluation_sees_it() {
        // Prepare
        let config = ModelConfig::new(2);
        let device = Device::flex();
        let initial = Weights::from_model(&config.init(&device));
        let (images, labels) = halves(200);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let train_config = TrainConfig {
            epochs: 2,
            ..TrainConfig::default()
        };

        // Execute
        let (trained, stats) = train(
            &config,
            &initial,
            data,
            &train_config,
            &device.clone().autodiff(),
        )
        .unwrap();
        let eval = evaluate(&config, &trained, data, 64, &device).unwrap();

        // Assert
        assert_eq!(stats.steps, 20);
        assert_eq!(stats.samples, 400);
        assert_ne!(trained, initial);
        assert!(eval.accuracy > 0.95, "accuracy {}", eval.accuracy);
        assert_eq!(eval.samples, 200);
    }

    /// Polls a future to completion on this thread: enough for `flex`,
    /// whose reads are ready at once.
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut context) {
                return out;
            }
        }
    }

    #[test]
    fn the_async_and_the_sync_visit_train_the_same_and_report_every_step() {
        // No dropout: its masks come from the device's random stream, which
        // tests running in parallel share.
        let config = ModelConfig {
            dropout: 0.0,
            ..ModelConfig::new(2)
        };
        let device = Device::flex();
        let initial = Weights::from_model(&config.init(&device));
        let (images, labels) = halves(50);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let train_config = TrainConfig {
            epochs: 2,
            seed: 7,
            ..TrainConfig::default()
        };
        let ad = device.autodiff();
        let mut seen = Vec::new();

        let (sync, sync_stats) =
            train_observed(&config, &initial, data, &train_config, &ad, &mut |p| {
                seen.push(*p)
            })
            .unwrap();
        let (asynced, async_stats) = block_on(train_async(
            &config,
            &initial,
            data,
            &train_config,
            &ad,
            &mut |_| {},
        ))
        .unwrap();

        assert_eq!(sync, asynced);
        assert_eq!(sync_stats, async_stats);
        // 50 samples in batches of 20: 3 steps an epoch, over 2 epochs.
        let places: Vec<(usize, usize, usize)> =
            seen.iter().map(|p| (p.epoch, p.batch, p.batches)).collect();
        assert_eq!(
            places,
            vec![
                (0, 0, 3),
                (0, 1, 3),
                (0, 2, 3),
                (1, 0, 3),
                (1, 1, 3),
                (1, 2, 3)
            ]
        );
        let mean = seen.iter().map(|p| f64::from(p.loss)).sum::<f64>() / 6.0;
        assert!(
            (mean - sync_stats.mean_loss).abs() < 1e-6,
            "{mean} vs {}",
            sync_stats.mean_loss
        );
        assert!(
            seen.iter()
                .all(|p| p.epochs == 2 && p.loss.is_finite() && p.loss > 0.0)
        );
    }

    #[test]
    fn a_large_proximal_term_keeps_the_model_near_its_anchor() {
        let config = ModelConfig::new(2);
        let device = Device::flex();
        let initial = Weights::from_model(&config.init(&device));
        let (images, labels) = halves(100);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let distance = |w: &Weights| -> f64 {
            w.values
                .iter()
                .zip(&initial.values)
                .map(|(a, b)| f64::from(a - b).powi(2))
                .sum()
        };
        let ad = device.clone().autodiff();

        let (free, _) = train(&config, &initial, data, &TrainConfig::default(), &ad).unwrap();
        let prox_config = TrainConfig {
            prox_mu: 100.0,
            ..TrainConfig::default()
        };
        let (held, _) = train(&config, &initial, data, &prox_config, &ad).unwrap();

        assert!(
            distance(&held) < distance(&free),
            "{} !< {}",
            distance(&held),
            distance(&free)
        );
    }

    /// Trains `config` from `initial` on `n` samples with 1 thread and with
    /// `threads` replicas; returns both results, having checked that every
    /// step's loss agreed.
    fn alone_and_replicated(
        initial: &Weights,
        n: usize,
        config: &TrainConfig,
        threads: usize,
    ) -> ((Weights, TrainStats), (Weights, TrainStats)) {
        let model = ModelConfig::new(2);
        let (images, labels) = halves(n);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let ad = Device::flex().autodiff();
        let mut losses = Vec::new();
        let alone = train_observed(&model, initial, data, config, &ad, &mut |p| {
            losses.push(p.loss)
        })
        .unwrap();
        let mut parallel_losses = Vec::new();
        let replicated = train_parallel(&model, initial, data, config, threads, &mut |p| {
            parallel_losses.push(p.loss)
        })
        .unwrap();
        // Shared to the end: not one replica gone on alone.
        assert_eq!(replicated.1.replicas_lost, 0);
        assert_eq!(losses.len(), parallel_losses.len());
        for (a, b) in losses.iter().zip(&parallel_losses) {
            assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "{a} against {b}");
        }
        (alone, replicated)
    }

    fn initial() -> Weights {
        Weights::from_model(&ModelConfig::new(2).init(&Device::flex()))
    }

    fn assert_same_weights(a: &Weights, b: &Weights, initial: &Weights) {
        let moved = crate::guard::delta_norm(&a.values, &initial.values);
        let apart = crate::guard::delta_norm(&a.values, &b.values);
        assert!(moved > 0.1, "the visit trained: moved {moved}");
        assert!(apart <= 1e-3 * moved, "{apart} apart after moving {moved}");
    }

    #[test]
    fn replicas_splitting_every_batch_reach_the_weights_of_one_visit() {
        // Prepare: 21 steps of batch 10 (the last of 3 samples, split
        // unevenly).
        let config = TrainConfig {
            batch_size: 10,
            seed: 7,
            ..TrainConfig::default()
        };
        let initial = initial();

        // Execute
        let ((alone, alone_stats), (two, two_stats)) =
            alone_and_replicated(&initial, 203, &config, 2);
        let (_, (three, _)) = alone_and_replicated(&initial, 203, &config, 3);

        // Assert
        assert_eq!(alone_stats.steps, 21);
        assert_eq!((two_stats.steps, two_stats.samples), (21, 203));
        assert!((alone_stats.mean_loss - two_stats.mean_loss).abs() < 1e-4);
        assert_same_weights(&alone, &two, &initial);
        assert_same_weights(&alone, &three, &initial);
    }

    #[test]
    fn replicas_keep_fedproxs_term_once_and_a_slice_may_be_empty() {
        // Prepare: batch 4 over 5 replicas (one slice empty every step),
        // the proximal term on, 20 steps over two epochs.
        let config = TrainConfig {
            batch_size: 4,
            prox_mu: 0.5,
            epochs: 2,
            seed: 3,
            ..TrainConfig::default()
        };
        let initial = initial();

        // Execute
        let ((alone, _), (five, _)) = alone_and_replicated(&initial, 40, &config, 5);

        // Assert
        assert_same_weights(&alone, &five, &initial);
    }

    #[test]
    fn a_thread_lost_mid_visit_leaves_the_visit_to_go_on_alone_to_the_same_weights() {
        // Prepare: 21 steps of batch 10 split between three threads; one
        // thread ends before its 6th step, or before its last, or panics
        // before its 10th, or ends before its first.
        let model = ModelConfig::new(2);
        let initial = initial();
        let (images, labels) = halves(203);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let config = TrainConfig {
            batch_size: 10,
            seed: 7,
            ..TrainConfig::default()
        };
        let ad = Device::flex().autodiff();
        let (one, one_stats) = train(&model, &initial, data, &config, &ad).unwrap();
        let losing = |lose: &(dyn Fn(usize, usize) -> bool + Sync)| {
            let mut observed = 0;
            let (weights, stats) = train_parallel_losing(
                &model,
                &initial,
                data,
                &config,
                3,
                &mut |_| observed += 1,
                lose,
            )
            .unwrap();
            assert_eq!((observed, stats.steps, stats.samples), (21, 21, 203));
            assert!((stats.mean_loss - one_stats.mean_loss).abs() < 1e-3);
            (weights, stats.replicas_lost)
        };

        // Execute
        let ended = losing(&|index, step| index == 2 && step == 5);
        let ended_last = losing(&|index, step| index == 2 && step == 20);
        let panicked = losing(&|index, step| {
            assert!(!(index == 1 && step == 9), "a training thread's fault");
            false
        });
        let never_began = losing(&|index, _| index == 1);
        let whole = losing(&|_, _| false);

        // Assert: the stopped thread counts as lost with the failed one.
        for (weights, lost) in [&ended, &ended_last, &panicked, &never_began] {
            assert_eq!(*lost, 2);
            assert_same_weights(&one, weights, &initial);
        }
        assert_eq!(whole.1, 0);
        assert_same_weights(&one, &whole.0, &initial);
    }

    #[test]
    fn a_replica_whose_peer_is_lost_goes_on_alone_to_the_weights_of_one_visit() {
        // Prepare: 26 steps of batch 10 over two epochs of 13 (reshuffled
        // between), FedProx on (its term is in the last share only: the
        // replica going on alone must take it up); two replicas share the
        // first steps, and the peer is lost after a step's gradients (in
        // flight: the 8th, and the 13th, an epoch's last, whose batch must
        // be the one before the reshuffle) or between steps.
        let model = ModelConfig::new(2);
        let initial = initial();
        let (images, labels) = halves(130);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let config = TrainConfig {
            batch_size: 10,
            epochs: 2,
            prox_mu: 0.5,
            seed: 5,
            ..TrainConfig::default()
        };
        let ad = Device::flex().autodiff();
        let (one, _) = train(&model, &initial, data, &config, &ad).unwrap();
        let shared_then_alone = |shared: usize, in_flight: bool| {
            let mut replicas: Vec<Replica> = (0..2)
                .map(|i| Replica::new(&model, &initial, data, &config, &ad, (i, 2)).unwrap())
                .collect();
            for _ in 0..shared {
                let parts: Vec<Vec<f32>> = replicas
                    .iter_mut()
                    .map(|r| r.gradients().unwrap().unwrap().0)
                    .collect();
                let sum: Vec<f32> = (0..parts[0].len())
                    .map(|k| parts[0][k] + parts[1][k])
                    .collect();
                for r in &mut replicas {
                    r.apply(&sum).unwrap();
                }
            }
            let mut own = replicas.swap_remove(0);
            // Still shared: stepping alone is refused.
            assert!(own.step().is_err());
            if in_flight {
                own.gradients().unwrap().unwrap();
            }
            let redone = own.alone().unwrap();
            assert_eq!(redone.is_some(), in_flight);
            assert!(redone.is_none_or(|l| l.is_finite() && l > 0.0));
            let mut steps = shared + usize::from(in_flight);
            while own.step().unwrap().is_some() {
                steps += 1;
            }
            assert_eq!(steps, 26);
            own.finish().0
        };

        // Execute
        let lost_mid_step = shared_then_alone(7, true);
        let lost_on_an_epochs_last_step = shared_then_alone(12, true);
        let lost_between_steps = shared_then_alone(7, false);

        // Assert
        assert_same_weights(&one, &lost_mid_step, &initial);
        assert_same_weights(&one, &lost_on_an_epochs_last_step, &initial);
        assert_same_weights(&one, &lost_between_steps, &initial);
    }

    #[test]
    fn a_replica_refuses_a_sum_of_the_wrong_length_and_a_place_that_does_not_exist() {
        let model = ModelConfig::new(2);
        let initial = Weights::from_model(&model.init(&Device::flex()));
        let (images, labels) = halves(8);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let config = TrainConfig::default();
        let ad = Device::flex().autodiff();
        // Two replicas computing one slice would count it twice.
        assert!(Replica::new(&model, &initial, data, &config, &ad, (2, 2)).is_err());
        let mut replica = Replica::new(&model, &initial, data, &config, &ad, (0, 2)).unwrap();
        let (grads, _, _) = replica.gradients().unwrap().unwrap();
        assert_eq!(grads.len(), initial.values.len());
        assert!(replica.apply(&grads[1..]).is_err());
        assert!(replica.apply(&grads).is_ok());
    }

    #[test]
    fn one_local_replica_reloading_its_own_weights_every_round_is_the_single_visit() {
        // Prepare: 21 steps of batch 10 over an epoch and a bit, FedProx
        // on: a reload that lost Adam's state (kept by parameter) or the
        // anchor would move the weights elsewhere.
        let model = ModelConfig::new(2);
        let config = TrainConfig {
            batch_size: 10,
            prox_mu: 0.1,
            epochs: 2,
            seed: 5,
            ..TrainConfig::default()
        };
        let initial = initial();
        let (images, labels) = halves(105);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let ad = Device::flex().autodiff();
        let (alone, alone_stats) = train(&model, &initial, data, &config, &ad).unwrap();

        // Execute
        let mut replica =
            LocalReplica::new(&model, &initial, data, &config, &ad, (0, 1), 1).unwrap();
        let mut stretches = 0;
        loop {
            while replica.step().unwrap().is_some() {}
            let (values, samples) = replica.weights();
            assert!(samples > 0);
            stretches += 1;
            if !replica.load(&values).unwrap() {
                break;
            }
        }
        let (local, stats) = replica.finish();

        // Assert: a stretch a batch, and the very same visit.
        assert_eq!(stretches, 22);
        assert_eq!(
            (stats.steps, stats.samples),
            (alone_stats.steps, alone_stats.samples)
        );
        assert_eq!(local.values, alone.values);
    }

    /// The local-SGD tests' visit: 203 samples in batches of 10 (21 an
    /// epoch, the last of 3), two epochs: 42 batches; a seeded first model
    /// (from an unseeded one, three replicas averaged once fell short of
    /// halving the loss in 1 run of 6). The model, its configuration, the
    /// first weights and the samples (images, labels).
    fn local_visit() -> (ModelConfig, TrainConfig, Weights, (Vec<f32>, Vec<u32>)) {
        let model = ModelConfig::new(2);
        let config = TrainConfig {
            batch_size: 10,
            epochs: 2,
            seed: 9,
            ..TrainConfig::default()
        };
        let initial = Weights::from_model(&model.init_seeded(&Device::flex(), 3));
        (model, config, initial, halves(203))
    }

    #[test]
    fn local_replicas_deal_every_batch_once_and_the_average_learns() {
        // Prepare: the 42 batches dealt between 2 or 3 replicas.
        let (model, config, initial, (images, labels)) = local_visit();
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let device = Device::flex();
        let before = evaluate(&model, &initial, data, 64, &device).unwrap();

        for (threads, sync) in [(2, 1), (2, 5), (3, 0)] {
            // Execute
            let (trained, stats) = train_local(
                &model,
                &initial,
                data,
                &config,
                (threads, sync),
                &mut |_| {},
            )
            .unwrap();
            let again = train_local(
                &model,
                &initial,
                data,
                &config,
                (threads, sync),
                &mut |_| {},
            )
            .unwrap();

            // Assert: every sample of both epochs trained once, one step a
            // batch; the same seed, the same result; the average learnt
            // the task.
            assert_eq!(
                (stats.steps, stats.samples, stats.replicas_lost),
                (42, 406, 0),
                "{threads} threads, sync {sync}"
            );
            assert_eq!(trained.values, again.0.values);
            let after = evaluate(&model, &trained, data, 64, &device).unwrap();
            assert!(
                after.loss < before.loss * 0.5 && after.accuracy > 0.95,
                "{threads} threads, sync {sync}: {before:?} -> {after:?}"
            );
        }
    }

    #[test]
    fn a_thread_lost_in_a_local_sgd_visit_leaves_it_to_be_trained_again_alone() {
        // Prepare: the 42 batches dealt between 3 threads, averaged every
        // round; one thread ends before its 5th step, or panics before its
        // first.
        let (model, config, initial, (images, labels)) = local_visit();
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let ad = Device::flex().autodiff();
        let (one, _) = train(&model, &initial, data, &config, &ad).unwrap();
        let losing = |lose: &(dyn Fn(usize, usize) -> bool + Sync)| {
            let mut observed = 0;
            let (weights, stats) = train_local_losing(
                &model,
                &initial,
                data,
                &config,
                (3, 1),
                &mut |_| observed += 1,
                lose,
            )
            .unwrap();
            assert_eq!((stats.steps, stats.samples), (42, 406));
            (weights, stats.replicas_lost, observed)
        };

        // Execute
        let ended = losing(&|index, step| index == 2 && step == 4);
        let panicked = losing(&|index, step| {
            assert!(!(index == 1 && step == 0), "a training thread's fault");
            false
        });
        let whole = losing(&|_, _| false);

        // Assert: trained again alone, the one visit's update, every one
        // of its steps heard (after the shared ones before the loss).
        for (weights, lost, observed) in [&ended, &panicked] {
            assert_eq!(*lost, 2);
            assert!(*observed >= 42, "{observed} steps heard");
            assert_same_weights(&one, weights, &initial);
        }
        assert_eq!(whole.1, 0);
        assert!(crate::guard::delta_norm(&whole.0.values, &one.values) > 1e-3);
    }

    #[test]
    fn replicas_average_by_their_samples_and_refuse_what_does_not_fit() {
        let a = [0.0f32, 0.0];
        let b = [3.0f32, 6.0];
        assert_eq!(
            average_replicas(&[(&a, 1), (&b, 2)]).unwrap(),
            vec![2.0, 4.0]
        );
        // Nobody trained in the stretch: a plain mean.
        assert_eq!(
            average_replicas(&[(&a, 0), (&b, 0)]).unwrap(),
            vec![1.5, 3.0]
        );
        assert!(average_replicas(&[(&a, 1), (&b[..1], 1)]).is_err());

        let model = ModelConfig::new(2);
        let initial = initial();
        let (images, labels) = halves(8);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let config = TrainConfig::default();
        let ad = Device::flex().autodiff();
        assert!(LocalReplica::new(&model, &initial, data, &config, &ad, (1, 1), 0).is_err());
        let mut replica =
            LocalReplica::new(&model, &initial, data, &config, &ad, (0, 2), 0).unwrap();
        while replica.step().unwrap().is_some() {}
        let (values, _) = replica.weights();
        assert!(replica.load(&values[1..]).is_err());
        let mut poisoned = values.clone();
        poisoned[3] = f32::NAN;
        assert!(replica.load(&poisoned).is_err());
        // Refused loads left the replica as it was.
        assert!(!replica.load(&values).unwrap());
        assert_eq!(replica.finish().0.values, values);
    }
}
