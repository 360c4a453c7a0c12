//! Many clients' visits of the model trained at once: the simulator's
//! batched engine (`astraea simulate --engine batched`).
//!
//! One client's visit is a sequence of tiny operations on a batch of 20,
//! where the cost of an operation, not its arithmetic, sets the pace
//! (docs/RESULTS.md, "Training speed"). Here K clients' models are stacked
//! along a leading client axis (`[K, ...]`) and a step of all K is one
//! forward and one backward pass of the same few dozen operations, each K
//! times larger:
//!
//! - a convolution is an im2col gather and one batched matrix product over
//!   the client axis; activations are `[A * C * H * W, B]`, the batch's
//!   samples innermost, so the gather copies whole rows and no layer needs
//!   a transpose;
//! - the backward pass is written out (matrix products, the gather's
//!   scatter-add, the ReLU and dropout masks, softmax cross-entropy), so it
//!   needs no autodiff graph and runs on any burn device, the CPU or a GPU;
//! - Adam is elementwise, so one update of the stacked tensors is K
//!   clients' updates, each with its own moments, learning rate and FedProx
//!   weight (`[K, 1, 1]` factors).
//!
//! Nothing a client computes changes: it draws its batch order and its
//! dropout masks from its visit's seed exactly as [`crate::train::train`]
//! does, a batch it fills only partly is padded with samples of weight zero
//! (its loss is still the mean over its own samples), and a client whose
//! visit is over leaves the stack: the clients are sorted by how many steps
//! they take, most first, so the ones still training are always a prefix
//! and the stack only ever narrows. A visit trained here equals the same
//! visit trained alone within float rounding (the tests below, and
//! `batched_equals_separate` for FedAvg, FedProx, clipping and attackers).

use std::collections::BTreeMap;

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::{log_softmax, relu};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::model::ModelConfig;
use crate::train::{EvalStats, Samples, TrainConfig, TrainStats, dropout_keep, dropout_rng};
use crate::weights::{Weights, WeightsError, f32_values};

/// One client's visit: the weights it starts from, its data and how it
/// trains (epochs, batch size, learning rate, FedProx weight, seed), as
/// [`crate::train::train`] takes them.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    /// The model the client receives.
    pub weights: &'a Weights,
    /// The client's samples.
    pub data: Samples<'a>,
    /// Its visit's settings.
    pub config: TrainConfig,
}

/// Adam's constants, burn's `AdamConfig` defaults (what the per-client
/// path trains with).
const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;
const EPSILON: f32 = 1e-5;

/// Output channels of the three convolutions and units of the hidden
/// dense layer (docs/METHOD.md; [`crate::model`]).
const CONV_OUT: [usize; 3] = [12, 18, 24];
const CONV_KERNEL: [usize; 3] = [5, 3, 2];
const CONV_STRIDE: [usize; 3] = [2, 2, 1];
const HIDDEN: usize = 150;

/// What training one job gave: its new weights and what the visit did, or
/// why it failed.
pub type Trained = Result<(Weights, TrainStats), WeightsError>;

/// Trains every job's visit and returns, per job in order, the new weights
/// and what the visit did: what [`crate::train::train`] returns for each,
/// computed side by side ([`BatchedModel::train`], set up for this call).
///
/// `device` is any burn device (no autodiff needed).
pub fn train_batched(
    model_config: &ModelConfig,
    jobs: &[Job<'_>],
    device: &Device,
) -> Vec<Trained> {
    BatchedModel::new(model_config, device).train(jobs)
}

/// The model's sizes, and the gathers that turn each convolution's input
/// into its columns.
///
/// Layout: an activation is `[A * C * H * W, B]` (rows client, channel,
/// row, column; the samples of the batch innermost), so a convolution's
/// im2col is a gather of whole rows (`select` on dim 0, a copy of B values
/// a row) and, reshaped for free to `[A, K, P * B]` (K: input channel and
/// kernel offset, P: output position), one matrix product with the
/// weights as the module holds them, `[A, out, K]`.
struct Geometry {
    config: ModelConfig,
    device: Device,
    classes: usize,
    /// Values in one input sample (`[C, H, W]`).
    sample: usize,
    /// Input values of each convolution, per sample (`C * H * W`).
    inputs: [usize; 3],
    /// Output positions of each convolution.
    positions: [usize; 3],
    /// Column length K of each convolution (input channels times kernel
    /// area).
    columns: [usize; 3],
    /// Each convolution's im2col for one client: for column row `k * P +
    /// p`, the input row it copies.
    index: [Vec<i64>; 3],
    /// The gathers for the widest stack yet (each client's rows offset),
    /// and that width.
    gathers: std::sync::Mutex<Option<(usize, [Tensor<1, Int>; 3])>>,
    /// Whether Adam's moments live on the host ([`Adam`]): on the CPU.
    host_optimiser: bool,
}

impl Geometry {
    fn new(config: &ModelConfig, device: &Device) -> Self {
        let maps = config.feature_maps();
        let sides = [[config.height, config.width], maps[0], maps[1]];
        let channels = [config.channels, CONV_OUT[0], CONV_OUT[1]];
        let index = |l: usize| im2col_index(sides[l], channels[l], CONV_KERNEL[l], CONV_STRIDE[l]);
        Self {
            config: config.clone(),
            device: device.clone(),
            classes: config.num_classes,
            sample: config.sample_len(),
            inputs: [0, 1, 2].map(|l| channels[l] * sides[l][0] * sides[l][1]),
            positions: [0, 1, 2].map(|l| maps[l][0] * maps[l][1]),
            columns: [0, 1, 2].map(|l| CONV_KERNEL[l] * CONV_KERNEL[l] * channels[l]),
            index: [index(0), index(1), index(2)],
            gathers: std::sync::Mutex::new(None),
            host_optimiser: *device == Device::flex(),
        }
    }

    /// The three gathers for a stack of `a` clients: the client-major
    /// gather of a wider stack, cut to its first `a` clients (a stack only
    /// narrows), or made anew for a wider one.
    fn gathers(&self, a: usize) -> [Tensor<1, Int>; 3] {
        let mut widest = self.gathers.lock().expect("no gather panicked");
        if widest.as_ref().is_none_or(|(width, _)| *width < a) {
            let made = std::array::from_fn(|l| {
                let one = &self.index[l];
                let rows = self.inputs[l] as i64;
                let index: Vec<i64> = (0..a as i64)
                    .flat_map(|client| one.iter().map(move |&i| client * rows + i))
                    .collect();
                let n = index.len();
                Tensor::<1, Int>::from_data(TensorData::new(index, [n]), &self.device)
            });
            *widest = Some((a, made));
        }
        let (_, made) = widest.as_ref().expect("made above");
        std::array::from_fn(|l| made[l].clone().narrow(0, 0, a * self.index[l].len()))
    }

    /// Rows and columns of each stacked parameter (the client axis comes
    /// first): conv weights `[out, K]` and dense weights `[out, in]`
    /// (outputs first, as the products above take them), biases `[out, 1]`.
    fn param_dims(&self) -> [[usize; 2]; 10] {
        let flat = self.positions[2] * CONV_OUT[2];
        [
            [CONV_OUT[0], self.columns[0]],
            [CONV_OUT[0], 1],
            [CONV_OUT[1], self.columns[1]],
            [CONV_OUT[1], 1],
            [CONV_OUT[2], self.columns[2]],
            [CONV_OUT[2], 1],
            [HIDDEN, flat],
            [HIDDEN, 1],
            [self.classes, HIDDEN],
            [self.classes, 1],
        ]
    }

    /// A client's weights (the module's layout) as the ten stacked
    /// parameters' rows, appended to `out`: the module's conv weights
    /// `[out, in, k, k]` are already `[out, K]`; its dense weights
    /// `[in, out]` are transposed.
    fn stack_rows(&self, values: &[f32], out: &mut [Vec<f32>; 10]) {
        let mut offset = 0;
        for (j, [rows, cols]) in self.param_dims().into_iter().enumerate() {
            let part = &values[offset..offset + rows * cols];
            offset += rows * cols;
            match j {
                6 | 8 => transpose(part, cols, rows, &mut out[j]),
                _ => out[j].extend_from_slice(part),
            }
        }
    }

    /// The inverse of [`Self::stack_rows`]: one client's ten parameters, in
    /// the stacked layout, as the module's flat weights.
    fn unstack(&self, parts: [&[f32]; 10]) -> Vec<f32> {
        let dims = self.param_dims();
        let mut values = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for (j, part) in parts.into_iter().enumerate() {
            match j {
                6 | 8 => transpose(part, dims[j][0], dims[j][1], &mut values),
                _ => values.extend_from_slice(part),
            }
        }
        values
    }
}

/// Appends the transpose of the row-major `[rows, cols]` matrix `m`.
fn transpose(m: &[f32], rows: usize, cols: usize, dst: &mut Vec<f32>) {
    for c in 0..cols {
        dst.extend((0..rows).map(|r| m[r * cols + c]));
    }
}

/// The im2col of a valid convolution over a `[C, H, W]` input: for each
/// input channel, kernel row and kernel column (the order of the module's
/// conv weight), and each output position (row-major), the index of the
/// input value it reads.
fn im2col_index(
    [height, width]: [usize; 2],
    channels: usize,
    kernel: usize,
    stride: usize,
) -> Vec<i64> {
    if height < kernel || width < kernel {
        return Vec::new();
    }
    let out_h = (height - kernel) / stride + 1;
    let out_w = (width - kernel) / stride + 1;
    let mut index = Vec::with_capacity(channels * kernel * kernel * out_h * out_w);
    for c in 0..channels {
        for ky in 0..kernel {
            for kx in 0..kernel {
                for oy in 0..out_h {
                    for ox in 0..out_w {
                        let (y, x) = (oy * stride + ky, ox * stride + kx);
                        index.push(((c * height + y) * width + x) as i64);
                    }
                }
            }
        }
    }
    index
}

/// One client's place in the stack: its data, batch order and generators.
struct Lane<'a> {
    /// Index of the job in the stack's input.
    job: usize,
    data: Samples<'a>,
    order: Vec<usize>,
    shuffle: StdRng,
    dropout: StdRng,
    batch: usize,
    batches: usize,
    steps: usize,
    samples: usize,
}

impl<'a> Lane<'a> {
    fn new(job: usize, data: Samples<'a>, config: &TrainConfig, batch_size: usize) -> Self {
        // As `train::Visit` does: the order shuffled once, then again after
        // every epoch; dropout from its own stream.
        let mut shuffle = StdRng::seed_from_u64(config.seed);
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.shuffle(&mut shuffle);
        let batches = data.len().div_ceil(batch_size);
        Self {
            job,
            data,
            order,
            shuffle,
            dropout: dropout_rng(config.seed),
            batch: 0,
            batches,
            steps: batches * config.epochs,
            samples: 0,
        }
    }

    /// This step's sample indices; moves on to the next batch.
    fn next_chunk(&mut self, batch_size: usize) -> Vec<usize> {
        let start = self.batch * batch_size;
        let chunk = self.order[start..(start + batch_size).min(self.order.len())].to_vec();
        self.batch += 1;
        if self.batch == self.batches {
            self.batch = 0;
            self.order.shuffle(&mut self.shuffle);
        }
        self.samples += chunk.len();
        chunk
    }
}

/// The state every stacked client carries from step to step.
struct Stack {
    params: [Tensor<3>; 10],
    adam: Adam,
    /// The starting weights, for the FedProx term (`None` when no client
    /// has one).
    anchor: Option<[Tensor<3>; 10]>,
    /// `[A, 1, 1]`.
    prox_mu: Tensor<3>,
    /// Summed training loss per client, `[A]`.
    loss: Tensor<1>,
}

impl Stack {
    /// Keeps only the first `active` clients.
    fn narrow(self, active: usize) -> Self {
        let keep = |t: Tensor<3>| t.narrow(0, 0, active);
        Self {
            params: self.params.map(keep),
            adam: self.adam.narrow(active),
            anchor: self.anchor.map(|a| a.map(keep)),
            prox_mu: keep(self.prox_mu),
            loss: self.loss.narrow(0, 0, active),
        }
    }
}

/// Adam's state for the stacked clients (burn's `AdamConfig` defaults, as
/// the per-client path trains), kept where its update is cheapest.
///
/// The update is elementwise, so on the device it is a dozen tensor
/// operations a parameter, 130 a step, most of them on a few dozen values
/// (the biases), where an operation's cost is its overhead; on the CPU
/// (`flex`) one pass over the host's values does the same arithmetic in
/// about half the time, the gradients read and the parameters written once
/// each (`astraea bench simulate`; docs/RESULTS.md). A GPU keeps the
/// moments on the device, where reading gradients back every step would
/// cost more than it saves. Both give the same update, in the same order of
/// operations (`host_and_device_adam_agree`).
// One a stack, moved once a step beside its parameters: the size of a
// tensor (256 bytes) is not worth a box.
#[allow(clippy::large_enum_variant)]
enum Adam {
    /// The moments as stacked tensors `[A, rows, cols]`; the learning rates
    /// `[A, 1, 1]`.
    Device {
        moment_1: [Tensor<3>; 10],
        moment_2: [Tensor<3>; 10],
        learning_rate: Tensor<3>,
    },
    /// The moments as the same tensors' values (client-major); the
    /// learning rates one a client.
    Host {
        moment_1: [Vec<f32>; 10],
        moment_2: [Vec<f32>; 10],
        learning_rate: Vec<f32>,
    },
}

impl Adam {
    /// Zero moments for `params`, each client with its learning rate; on
    /// the host where `host`.
    fn new(params: &[Tensor<3>; 10], learning_rate: Vec<f32>, host: bool) -> Self {
        if host {
            Self::Host {
                moment_1: params
                    .each_ref()
                    .map(|p| vec![0.0; p.shape().num_elements()]),
                moment_2: params
                    .each_ref()
                    .map(|p| vec![0.0; p.shape().num_elements()]),
                learning_rate,
            }
        } else {
            let a = learning_rate.len();
            let device = params[0].device();
            let zeros = params.each_ref().map(|p| p.zeros_like());
            Self::Device {
                moment_1: zeros.clone(),
                moment_2: zeros,
                learning_rate: Tensor::from_data(
                    TensorData::new(learning_rate, [a, 1, 1]),
                    &device,
                ),
            }
        }
    }

    /// Keeps only the first `active` clients.
    fn narrow(self, active: usize) -> Self {
        match self {
            Self::Device {
                moment_1,
                moment_2,
                learning_rate,
            } => {
                let keep = |t: Tensor<3>| t.narrow(0, 0, active);
                Self::Device {
                    moment_1: moment_1.map(keep),
                    moment_2: moment_2.map(keep),
                    learning_rate: keep(learning_rate),
                }
            }
            Self::Host {
                mut moment_1,
                mut moment_2,
                mut learning_rate,
            } => {
                // Client-major: the first clients' values are a prefix.
                let a = learning_rate.len().max(1);
                for m in moment_1.iter_mut().chain(moment_2.iter_mut()) {
                    m.truncate(m.len() / a * active);
                }
                learning_rate.truncate(active);
                Self::Host {
                    moment_1,
                    moment_2,
                    learning_rate,
                }
            }
        }
    }

    /// One update of every client's `params` by its `grads` (the same
    /// shapes), its `time`-th (from 1). Bias corrections as burn's Adam
    /// applies them: folded into one factor and into epsilon.
    ///
    /// # Errors
    /// [`WeightsError::Readback`] if the host cannot read a tensor.
    fn step(
        &mut self,
        params: [Tensor<3>; 10],
        grads: [Tensor<3>; 10],
        time: usize,
    ) -> Result<[Tensor<3>; 10], WeightsError> {
        let t = time as i32;
        let correction_2 = (1.0 - BETA_2.powi(t)).sqrt();
        let factor = correction_2 / (1.0 - BETA_1.powi(t));
        let epsilon = EPSILON * correction_2;
        let mut updated = Vec::with_capacity(10);
        for (j, (param, grad)) in params.into_iter().zip(grads).enumerate() {
            updated.push(match self {
                Self::Device {
                    moment_1,
                    moment_2,
                    learning_rate,
                } => {
                    let m = moment_1[j].clone().mul_scalar(BETA_1)
                        + grad.clone().mul_scalar(1.0 - BETA_1);
                    let v = moment_2[j].clone().mul_scalar(BETA_2)
                        + grad.square().mul_scalar(1.0 - BETA_2);
                    let update = m
                        .clone()
                        .mul_scalar(factor)
                        .div(v.clone().sqrt().add_scalar(epsilon));
                    moment_1[j] = m;
                    moment_2[j] = v;
                    param - update * learning_rate.clone()
                }
                Self::Host {
                    moment_1,
                    moment_2,
                    learning_rate,
                } => {
                    let shape = param.shape();
                    let device = param.device();
                    let g = f32_values(grad.into_data())?;
                    let mut p = f32_values(param.into_data())?;
                    let per = p.len() / learning_rate.len().max(1);
                    debug_assert_eq!(per * learning_rate.len(), p.len());
                    debug_assert_eq!((g.len(), moment_1[j].len()), (p.len(), p.len()));
                    let clients = p
                        .chunks_mut(per)
                        .zip(g.chunks(per))
                        .zip(moment_1[j].chunks_mut(per))
                        .zip(moment_2[j].chunks_mut(per))
                        .zip(learning_rate.iter());
                    for ((((p, g), m), v), &rate) in clients {
                        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                            *m = *m * BETA_1 + g * (1.0 - BETA_1);
                            *v = *v * BETA_2 + g * g * (1.0 - BETA_2);
                            *p -= *m * factor / (v.sqrt() + epsilon) * rate;
                        }
                    }
                    Tensor::from_data(TensorData::new(p, shape), &device)
                }
            });
        }
        Ok(updated.try_into().expect("ten parameters"))
    }
}

/// Trains one stack of jobs of one batch size.
fn train_stack(
    geometry: &Geometry,
    jobs: &[&Job<'_>],
    batch_size: usize,
) -> Result<Vec<(Weights, TrainStats)>, WeightsError> {
    let device = &geometry.device;
    let mut lanes: Vec<Lane<'_>> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| Lane::new(i, job.data, &job.config, batch_size))
        .collect();
    // Longest visits first, so the clients still training are a prefix.
    lanes.sort_by_key(|lane| std::cmp::Reverse(lane.steps));
    let mut results: Vec<Option<(Weights, TrainStats)>> = vec![None; jobs.len()];
    let mut active = lanes.iter().filter(|lane| lane.steps > 0).count();
    for lane in &lanes[active..] {
        results[lane.job] = Some((jobs[lane.job].weights.clone(), TrainStats::default()));
    }
    if active == 0 {
        return Ok(results.into_iter().map(Option::unwrap).collect());
    }

    let values = |f: &dyn Fn(&TrainConfig) -> f64| -> Vec<f32> {
        lanes[..active]
            .iter()
            .map(|lane| f(&jobs[lane.job].config) as f32)
            .collect()
    };
    let models: Vec<&[f32]> = lanes[..active]
        .iter()
        .map(|lane| &jobs[lane.job].weights.values[..])
        .collect();
    let params = upload(geometry, &models);
    let proximal = lanes[..active]
        .iter()
        .any(|lane| jobs[lane.job].config.prox_mu > 0.0);
    let mut stack = Stack {
        anchor: proximal.then(|| params.clone()),
        adam: Adam::new(
            &params,
            values(&|c| c.learning_rate),
            geometry.host_optimiser,
        ),
        params,
        // `train::train` adds the term only for a positive mu.
        prox_mu: Tensor::from_data(
            TensorData::new(values(&|c| c.prox_mu.max(0.0)), [active, 1, 1]),
            device,
        ),
        loss: Tensor::zeros([active], device),
    };

    let mut step = 0;
    while active > 0 {
        let still = lanes[..active].iter().filter(|l| l.steps > step).count();
        if still < active {
            finish(
                geometry,
                jobs,
                &lanes[still..active],
                &stack,
                still,
                &mut results,
            )?;
            active = still;
            if active == 0 {
                break;
            }
            stack = stack.narrow(active);
        }
        step += 1;
        let batch = Batch::gather(geometry, &mut lanes[..active], batch_size);
        stack = train_step(geometry, stack, batch, step)?;
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every lane finishes"))
        .collect())
}

/// Reads the clients `finished` (stack rows `from..`) back as weights.
fn finish(
    geometry: &Geometry,
    jobs: &[&Job<'_>],
    finished: &[Lane<'_>],
    stack: &Stack,
    from: usize,
    results: &mut [Option<(Weights, TrainStats)>],
) -> Result<(), WeightsError> {
    let n = finished.len();
    let read = |t: Tensor<3>| f32_values(t.narrow(0, from, n).into_data());
    let mut host: Vec<Vec<f32>> = Vec::with_capacity(10);
    for p in &stack.params {
        host.push(read(p.clone())?);
    }
    let losses = f32_values(stack.loss.clone().narrow(0, from, n).into_data())?;
    for (k, lane) in finished.iter().enumerate() {
        let parts: [&[f32]; 10] = std::array::from_fn(|j| {
            let per = host[j].len() / n;
            &host[j][k * per..(k + 1) * per]
        });
        let weights = Weights {
            shapes: jobs[lane.job].weights.shapes.clone(),
            values: geometry.unstack(parts),
        };
        let stats = TrainStats {
            samples: lane.samples,
            steps: lane.steps,
            mean_loss: f64::from(losses[k]) / lane.steps as f64,
            replicas_lost: 0,
        };
        results[lane.job] = Some((weights, stats));
    }
    Ok(())
}

/// One step's inputs for the `A` clients still training.
struct Batch {
    /// The images, `[A * C * H * W, B]` (samples innermost), padded
    /// samples zero.
    images: Tensor<2>,
    /// Each sample's one-hot target times its weight (1 / the client's
    /// samples in this batch, 0 for padding), `[A, classes, B]`.
    targets: Tensor<3>,
    /// Each sample's weight, `[A, 1, B]`.
    weights: Tensor<3>,
    /// Dropout keep-mask of conv2's output, `[A, 18, P2 * B]`.
    keep: Tensor<3>,
}

impl Batch {
    fn gather(geometry: &Geometry, lanes: &mut [Lane<'_>], b: usize) -> Self {
        let a = lanes.len();
        let (classes, sample) = (geometry.classes, geometry.sample);
        let p2 = geometry.positions[1];
        let per_mask = geometry.config.dropout_len();
        let mut images = vec![0.0f32; a * sample * b];
        let mut targets = vec![0.0f32; a * classes * b];
        let mut weights = vec![0.0f32; a * b];
        let mut keep = vec![0.0f32; a * per_mask * b];
        for (k, lane) in lanes.iter_mut().enumerate() {
            let chunk = lane.next_chunk(b);
            let weight = 1.0 / chunk.len() as f32;
            // The client's own masks, drawn as its lone visit draws them
            // (sample after sample, `[C, H, W]` each).
            let mask = dropout_keep(
                &mut lane.dropout,
                chunk.len() * per_mask,
                geometry.config.dropout,
            );
            let client_images = &mut images[k * sample * b..(k + 1) * sample * b];
            let client_keep = &mut keep[k * per_mask * b..(k + 1) * per_mask * b];
            for (s, &i) in chunk.iter().enumerate() {
                let image = &lane.data.images[i * sample..(i + 1) * sample];
                for (f, &v) in image.iter().enumerate() {
                    client_images[f * b + s] = v;
                }
                let label = lane.data.labels[i] as usize;
                if label < classes {
                    targets[(k * classes + label) * b + s] = weight;
                }
                weights[k * b + s] = weight;
                let drawn = &mask[s * per_mask..(s + 1) * per_mask];
                for (f, &v) in drawn.iter().enumerate() {
                    client_keep[f * b + s] = v;
                }
            }
        }
        let device = &geometry.device;
        Self {
            images: Tensor::from_data(TensorData::new(images, [a * sample, b]), device),
            targets: Tensor::from_data(TensorData::new(targets, [a, classes, b]), device),
            weights: Tensor::from_data(TensorData::new(weights, [a, 1, b]), device),
            keep: Tensor::from_data(TensorData::new(keep, [a, CONV_OUT[1], p2 * b]), device),
        }
    }
}

/// `dy` through a ReLU whose output was `y`.
fn relu_back<const D: usize>(dy: Tensor<D>, y: Tensor<D>) -> Tensor<D> {
    // A multiply by the float mask: on flex five times faster than
    // `mask_fill`.
    dy * y.greater_elem(0.0).float()
}

/// `dy x^T` per client: the gradient of a weight `[out, in]` whose layer
/// took `x` (`[A, in, n]`) and gave `dy` (`[A, out, n]`).
fn weight_grad(dy: Tensor<3>, x: Tensor<3>) -> Tensor<3> {
    dy.matmul(x.swap_dims(1, 2))
}

/// [`weight_grad`] of a convolution, whose columns `x` (`[A, K, P * B]`)
/// outnumber its output channels (25, 108 and 72 columns against 12, 18
/// and 24 channels): computed as `(x dy^T)^T`, so that the operand the
/// product reads transposed is the smaller one. The CPU's matrix products
/// pack a transposed right-hand operand value by value, and packing the
/// columns cost more than the product itself (conv1's gradient 119 µs
/// against 85 µs, conv2's 96 against 60, conv3's 45 against 29). The
/// result is a transposed view of a gradient of a few thousand values
/// (the host's optimiser reads it into a contiguous copy). Not for the
/// dense layers: there the gradient is the large operand (fc1's 57,600
/// values), and the optimiser would read it strided. On a GPU the order
/// of the product is not measured either way.
fn conv_weight_grad(dy: Tensor<3>, x: Tensor<3>) -> Tensor<3> {
    x.matmul(dy.swap_dims(1, 2)).swap_dims(1, 2)
}

/// A forward pass's activations, kept for the backward pass: the columns
/// `x` of each convolution (`[A, K, P * B]`), the layers' outputs `h`
/// (`[A, channels, P * B]`, dense `[A, units, B]`).
struct Forward {
    x1: Tensor<3>,
    h1: Tensor<3>,
    x2: Tensor<3>,
    h2: Tensor<3>,
    x3: Tensor<3>,
    h3: Tensor<3>,
    /// conv3's output as the dense layer's input, `[A, 24 * P3, B]`.
    flat: Tensor<3>,
    h4: Tensor<3>,
    /// `[A, classes, B]`.
    logits: Tensor<3>,
}

/// The forward pass of `a` stacked models over `b` samples each: `images`
/// is `[A * C * H * W, B]`, `keep` conv2's dropout mask (`None`: no
/// dropout, as in evaluation).
fn forward(
    geometry: &Geometry,
    params: &[Tensor<3>; 10],
    images: Tensor<2>,
    a: usize,
    b: usize,
    keep: Option<Tensor<3>>,
) -> Forward {
    let x1 = first_columns(geometry, images, a, b);
    forward_from(geometry, params, x1, a, b, keep)
}

/// The first convolution's input columns of `images` (`[sample, b]`) for
/// `a` stacked models: `[a, c1, p1 * b]`. The same images give the same
/// columns whatever the weights, so a [`Probe`] keeps them.
fn first_columns(geometry: &Geometry, images: Tensor<2>, a: usize, b: usize) -> Tensor<3> {
    let [p1, _, _] = geometry.positions;
    let [c1, _, _] = geometry.columns;
    let [g1, _, _] = geometry.gathers(a);
    images.select(0, g1).reshape([a, c1, p1 * b])
}

/// [`forward`] from the first convolution's columns `x1`.
fn forward_from(
    geometry: &Geometry,
    params: &[Tensor<3>; 10],
    x1: Tensor<3>,
    a: usize,
    b: usize,
    keep: Option<Tensor<3>>,
) -> Forward {
    let [p1, p2, p3] = geometry.positions;
    let [_, c2, c3] = geometry.columns;
    let [_, g2, g3] = geometry.gathers(a);
    let [w1, b1, w2, b2, w3, b3, w4, b4, w5, b5] = params.clone();
    let h1 = relu(w1.matmul(x1.clone()) + b1);
    let x2 = h1
        .clone()
        .reshape([a * CONV_OUT[0] * p1, b])
        .select(0, g2)
        .reshape([a, c2, p2 * b]);
    let h2 = relu(w2.matmul(x2.clone()) + b2);
    let h2 = match keep {
        Some(keep) => h2 * keep,
        None => h2,
    };
    let x3 = h2
        .clone()
        .reshape([a * CONV_OUT[1] * p2, b])
        .select(0, g3)
        .reshape([a, c3, p3 * b]);
    let h3 = relu(w3.matmul(x3.clone()) + b3);
    // `[A, 24, P3 * B]` is `[A, 24 * P3, B]`: channel-major features, the
    // order the module flattens in.
    let flat = h3.clone().reshape([a, CONV_OUT[2] * p3, b]);
    let h4 = relu(w4.matmul(flat.clone()) + b4);
    let logits = w5.matmul(h4.clone()) + b5;
    Forward {
        x1,
        h1,
        x2,
        h2,
        x3,
        h3,
        flat,
        h4,
        logits,
    }
}

/// The ten stacked parameters of `models` (flat weights in the module's
/// layout), one client after another.
fn upload(geometry: &Geometry, models: &[&[f32]]) -> [Tensor<3>; 10] {
    let dims = geometry.param_dims();
    let mut host: [Vec<f32>; 10] = Default::default();
    for values in models {
        geometry.stack_rows(values, &mut host);
    }
    let mut j = 0;
    host.map(|values| {
        let [rows, cols] = dims[j];
        j += 1;
        Tensor::from_data(
            TensorData::new(values, [models.len(), rows, cols]),
            &geometry.device,
        )
    })
}

/// Top-1 accuracy and mean loss of `weights` on `data`, in batches of
/// `batch_size`: what [`crate::train::evaluate`] gives (within float
/// rounding), through the batched trainer's forward pass, which on the
/// CPU takes about a fifth of the time (`astraea bench simulate`).
///
/// # Errors
/// [`WeightsError`] if the weights do not fit `model_config`, or reading
/// back fails.
pub fn evaluate(
    model_config: &ModelConfig,
    weights: &Weights,
    data: Samples<'_>,
    batch_size: usize,
    device: &Device,
) -> Result<EvalStats, WeightsError> {
    BatchedModel::new(model_config, device).evaluate(weights, data, batch_size)
}

/// The batched trainer and evaluator for one model shape on one device,
/// made once and kept: what thousands of small hops or judgements (the
/// loss rule, 64 samples each) would otherwise build each time, the
/// model's parameter shapes and the convolutions' gathers.
#[derive(Debug)]
pub struct BatchedModel {
    shapes: Vec<crate::weights::ParamShape>,
    geometry: Geometry,
}

impl std::fmt::Debug for Geometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Geometry")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl BatchedModel {
    /// `model_config`'s models on `device`.
    pub fn new(model_config: &ModelConfig, device: &Device) -> Self {
        Self {
            shapes: Weights::shapes_of(&model_config.init_zeros(&Device::flex())),
            geometry: Geometry::new(model_config, device),
        }
    }

    /// Trains every job's visit, as [`train_batched`]: jobs of one batch
    /// size as one stack, the stacks one after the other. A job whose
    /// weights do not fit the model fails alone; a stack whose result
    /// cannot be read back fails each of its jobs.
    pub fn train(&self, jobs: &[Job<'_>]) -> Vec<Trained> {
        let mut results: Vec<Option<Trained>> = jobs
            .iter()
            .map(|job| job.weights.check_fits(&self.shapes).err().map(Err))
            .collect();
        let mut by_batch: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, job) in jobs.iter().enumerate() {
            if results[i].is_none() {
                by_batch
                    .entry(job.config.batch_size.max(1))
                    .or_default()
                    .push(i);
            }
        }
        for (batch, members) in by_batch {
            let stack: Vec<&Job<'_>> = members.iter().map(|&i| &jobs[i]).collect();
            match train_stack(&self.geometry, &stack, batch) {
                Ok(trained) => {
                    for (i, result) in members.into_iter().zip(trained) {
                        results[i] = Some(Ok(result));
                    }
                }
                Err(e) => {
                    for i in members {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every job fails its fit or belongs to one stack"))
            .collect()
    }

    /// [`evaluate`] of `weights` on `data`.
    ///
    /// # Errors
    /// As [`evaluate`].
    pub fn evaluate(
        &self,
        weights: &Weights,
        data: Samples<'_>,
        batch_size: usize,
    ) -> Result<EvalStats, WeightsError> {
        weights.check_fits(&self.shapes)?;
        self.evaluate_values(&weights.values, data, batch_size)
    }

    /// [`BatchedModel::evaluate`] of flat `values` laid out as this model's
    /// parameters (the loss rule judges thousands of hops a round: no copy
    /// into a [`Weights`] for each).
    ///
    /// # Errors
    /// As [`evaluate`]: values of the wrong length or not finite.
    pub fn evaluate_values(
        &self,
        values: &[f32],
        data: Samples<'_>,
        batch_size: usize,
    ) -> Result<EvalStats, WeightsError> {
        crate::weights::check_values_fit(values, &self.shapes)?;
        let geometry = &self.geometry;
        let params = upload(geometry, &[values]);
        let mut correct = 0i64;
        let mut loss_sum = 0.0;
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(batch_size.max(1)) {
            let b = chunk.len();
            let (images, targets) = batch_inputs(geometry, data, chunk);
            let logits = forward(geometry, &params, images, 1, b, None)
                .logits
                .reshape([geometry.classes, b])
                .swap_dims(0, 1);
            correct += logits
                .clone()
                .argmax(1)
                .equal(targets.clone())
                .int()
                .sum()
                .into_scalar::<i64>();
            let loss = log_softmax(logits, 1).gather(1, targets).sum().neg();
            loss_sum += f64::from(loss.into_scalar::<f32>());
        }
        let n = data.len().max(1) as f64;
        Ok(EvalStats {
            accuracy: correct as f64 / n,
            loss: loss_sum / n,
            samples: data.len(),
        })
    }
}

/// The samples `chunk` of `data` as one batch: the images feature-major
/// (`[sample, b]`, as [`forward`] takes them) and the targets (`[b, 1]`).
fn batch_inputs(
    geometry: &Geometry,
    data: Samples<'_>,
    chunk: &[usize],
) -> (Tensor<2>, Tensor<2, Int>) {
    let (sample, b) = (geometry.sample, chunk.len());
    let mut pixels = vec![0.0f32; sample * b];
    let mut labels = Vec::with_capacity(b);
    for (s, &i) in chunk.iter().enumerate() {
        for (f, &v) in data.images[i * sample..(i + 1) * sample].iter().enumerate() {
            pixels[f * b + s] = v;
        }
        labels.push(i64::from(data.labels[i]));
    }
    let device = &geometry.device;
    (
        Tensor::from_data(TensorData::new(pixels, [sample, b]), device),
        Tensor::from_data(TensorData::new(labels, [b, 1]), device),
    )
}

/// Fixed samples made ready to judge many models on ([`BatchedModel::probe`]):
/// each batch's first-layer columns and targets, built once. The loss rule
/// judges every hop of a round on the same 64 samples (2,000 judgements a
/// round at 1,000 Astraea clients).
#[derive(Debug)]
pub struct Probe {
    batches: Vec<(Tensor<3>, Tensor<2, Int>, usize)>,
    samples: usize,
}

impl Probe {
    /// Samples it holds.
    pub fn len(&self) -> usize {
        self.samples
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }
}

impl BatchedModel {
    /// `data` made ready for [`BatchedModel::loss_on`], in batches of
    /// `batch_size`.
    pub fn probe(&self, data: Samples<'_>, batch_size: usize) -> Probe {
        let geometry = &self.geometry;
        let indices: Vec<usize> = (0..data.len()).collect();
        let batches = indices
            .chunks(batch_size.max(1))
            .map(|chunk| {
                let b = chunk.len();
                let (images, targets) = batch_inputs(geometry, data, chunk);
                (first_columns(geometry, images, 1, b), targets, b)
            })
            .collect();
        Probe {
            batches,
            samples: data.len(),
        }
    }

    /// Mean cross-entropy (nats) of flat `values` on `probe`'s samples:
    /// [`BatchedModel::evaluate_values`]'s loss (the same operations) without
    /// its accuracy, from the columns the probe keeps.
    ///
    /// # Errors
    /// Values of the wrong length or not finite.
    pub fn loss_on(&self, values: &[f32], probe: &Probe) -> Result<f64, WeightsError> {
        crate::weights::check_values_fit(values, &self.shapes)?;
        let geometry = &self.geometry;
        let params = upload(geometry, &[values]);
        let mut loss_sum = 0.0;
        for (x1, targets, b) in &probe.batches {
            let logits = forward_from(geometry, &params, x1.clone(), 1, *b, None)
                .logits
                .reshape([geometry.classes, *b])
                .swap_dims(0, 1);
            let loss = log_softmax(logits, 1)
                .gather(1, targets.clone())
                .sum()
                .neg();
            loss_sum += f64::from(loss.into_scalar::<f32>());
        }
        Ok(loss_sum / probe.samples.max(1) as f64)
    }
}

/// One step of every stacked client: forward, backward, Adam.
///
/// # Errors
/// [`WeightsError::Readback`] if the optimiser cannot read the host's copy.
fn train_step(
    geometry: &Geometry,
    mut stack: Stack,
    batch: Batch,
    time: usize,
) -> Result<Stack, WeightsError> {
    let [a, _, b] = batch.targets.dims();
    let [p1, p2, p3] = geometry.positions;
    let [c1, c2, c3] = geometry.columns;
    let [_, g2, g3] = geometry.gathers(a);
    let [_, _, w2, _, w3, _, w4, _, w5, _] = stack.params.clone();
    let Forward {
        x1,
        h1,
        x2,
        h2,
        x3,
        h3,
        flat,
        h4,
        logits,
    } = forward(
        geometry,
        &stack.params,
        batch.images,
        a,
        b,
        Some(batch.keep.clone()),
    );

    // Softmax cross-entropy, each sample weighted (1 / the client's
    // samples in the batch, 0 for padding): the client's mean loss.
    let log_p = log_softmax(logits, 1);
    let loss = (log_p.clone() * batch.targets.clone())
        .sum_dim(1)
        .sum_dim(2)
        .neg()
        .reshape([a]);
    let dz5 = log_p.exp() * batch.weights - batch.targets;

    // Backward.
    let gw5 = weight_grad(dz5.clone(), h4.clone());
    let gb5 = dz5.clone().sum_dim(2);
    let dz4 = relu_back(w5.swap_dims(1, 2).matmul(dz5), h4);
    let gw4 = weight_grad(dz4.clone(), flat);
    let gb4 = dz4.clone().sum_dim(2);
    let dz3 = relu_back(
        w4.swap_dims(1, 2)
            .matmul(dz4)
            .reshape([a, CONV_OUT[2], p3 * b]),
        h3,
    );
    let gw3 = conv_weight_grad(dz3.clone(), x3);
    let gb3 = dz3.clone().sum_dim(2);
    let dx3 = w3.swap_dims(1, 2).matmul(dz3).reshape([a * c3 * p3, b]);
    let dh2 = Tensor::<2>::zeros([a * CONV_OUT[1] * p2, b], &geometry.device)
        .select_assign(0, g3, dx3, IndexingUpdateOp::Add)
        .reshape([a, CONV_OUT[1], p2 * b]);
    // h2 = relu(z2) * keep: zero where either the ReLU or dropout was.
    let dz2 = relu_back(dh2 * batch.keep, h2);
    let gw2 = conv_weight_grad(dz2.clone(), x2);
    let gb2 = dz2.clone().sum_dim(2);
    let dx2 = w2.swap_dims(1, 2).matmul(dz2).reshape([a * c2 * p2, b]);
    let dh1 = Tensor::<2>::zeros([a * CONV_OUT[0] * p1, b], &geometry.device)
        .select_assign(0, g2, dx2, IndexingUpdateOp::Add)
        .reshape([a, CONV_OUT[0], p1 * b]);
    let dz1 = relu_back(dh1, h1);
    let gw1 = conv_weight_grad(dz1.clone(), x1);
    let gb1 = dz1.sum_dim(2);
    debug_assert_eq!(gw1.dims(), [a, CONV_OUT[0], c1]);
    let grads = [gw1, gb1, gw2, gb2, gw3, gb3, gw4, gb4, gw5, gb5];

    // FedProx: the gradient of mu / 2 * |w - anchor|^2 is mu (w - anchor).
    let grads: [Tensor<3>; 10] = match &stack.anchor {
        Some(anchor) => {
            let mut j = 0;
            grads.map(|g| {
                let prox = (stack.params[j].clone() - anchor[j].clone()) * stack.prox_mu.clone();
                j += 1;
                g + prox
            })
        }
        None => grads,
    };

    let params = stack.adam.step(stack.params, grads, time)?;
    Ok(Stack {
        params,
        adam: stack.adam,
        anchor: stack.anchor,
        prox_mu: stack.prox_mu,
        loss: stack.loss + loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::train;

    fn synthetic(n: usize, seed: u64, config: &ModelConfig) -> (Vec<f32>, Vec<u32>) {
        use rand::Rng as _;
        let mut rng = StdRng::seed_from_u64(seed);
        let images = (0..n * config.sample_len())
            .map(|_| rng.random::<f32>())
            .collect();
        let labels = (0..n)
            .map(|_| rng.random_range(0..config.num_classes as u32))
            .collect();
        (images, labels)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn batched_evaluation_equals_evaluation() {
        let config = ModelConfig::new(10);
        let device = Device::flex();
        let weights = Weights::from_model(&config.init(&device));
        let (images, labels) = synthetic(130, 4, &config);
        let data = Samples {
            images: &images,
            labels: &labels,
        };

        let batched = evaluate(&config, &weights, data, 50, &device).unwrap();
        let alone = crate::train::evaluate(&config, &weights, data, 50, &device).unwrap();

        assert_eq!(batched.samples, 130);
        assert!((batched.accuracy - alone.accuracy).abs() < 1e-9);
        assert!(
            (batched.loss - alone.loss).abs() < 1e-5,
            "{batched:?} {alone:?}"
        );
    }

    #[test]
    fn a_probes_loss_is_the_evaluations_loss_for_any_weights() {
        let config = ModelConfig::new(10);
        let device = Device::flex();
        let model = BatchedModel::new(&config, &device);
        let (images, labels) = synthetic(130, 5, &config);
        let data = Samples {
            images: &images,
            labels: &labels,
        };
        let probe = model.probe(data, 50);

        for seed in [1u64, 2] {
            let weights = Weights::from_model(&config.init_seeded(&device, seed));
            let judged = model.loss_on(&weights.values, &probe).unwrap();
            let evaluated = model.evaluate_values(&weights.values, data, 50).unwrap();
            assert!(
                (judged - evaluated.loss).abs() < 1e-9,
                "{judged} {evaluated:?}"
            );
        }
        assert_eq!(probe.len(), 130);
        assert!(model.loss_on(&[0.0; 3], &probe).is_err());
    }

    #[test]
    fn stacked_layout_round_trips_the_module_layout() {
        let config = ModelConfig::new(10)
            .with_channels(3)
            .with_height(32)
            .with_width(32);
        let device = Device::flex();
        let values = Weights::from_model(&config.init(&device)).values;
        let geometry = Geometry::new(&config, &device);
        let mut host: [Vec<f32>; 10] = Default::default();
        geometry.stack_rows(&values, &mut host);
        let back = geometry.unstack(std::array::from_fn(|j| host[j].as_slice()));
        assert_eq!(back, values);
    }

    /// A client's images and labels.
    type Shard = (Vec<f32>, Vec<u32>);

    /// Three clients of 45, 7 and 20 samples (3, 1 and 1 batches: a
    /// partly filled batch, and clients leaving the stack at different
    /// steps): their data and settings (two epochs, different learning
    /// rates and one FedProx).
    fn three_clients(config: &ModelConfig) -> (Vec<Shard>, [TrainConfig; 3]) {
        let data = [45, 7, 20]
            .iter()
            .enumerate()
            .map(|(i, &n)| synthetic(n, i as u64, config))
            .collect();
        let configs = [
            // The one still training after the others left: its own
            // learning rate and FedProx weight, so narrowing the stack
            // keeps the right ones.
            TrainConfig {
                epochs: 2,
                seed: 11,
                learning_rate: 2e-3,
                prox_mu: 0.1,
                ..TrainConfig::default()
            },
            TrainConfig {
                epochs: 2,
                seed: 12,
                learning_rate: 3e-3,
                ..TrainConfig::default()
            },
            TrainConfig {
                epochs: 2,
                seed: 13,
                prox_mu: 0.5,
                ..TrainConfig::default()
            },
        ];
        (data, configs)
    }

    /// Visits of `start` on each client's data with its settings.
    fn jobs_of<'a>(data: &'a [Shard], configs: &[TrainConfig], start: &'a Weights) -> Vec<Job<'a>> {
        data.iter()
            .zip(configs)
            .map(|((images, labels), c)| Job {
                weights: start,
                data: Samples { images, labels },
                config: c.clone(),
            })
            .collect()
    }

    #[test]
    fn a_batched_visit_equals_separate_visits() {
        let config = ModelConfig::new(10);
        let device = Device::flex();
        let start = Weights::from_model(&config.init(&device));
        let (data, configs) = three_clients(&config);
        let jobs = jobs_of(&data, &configs, &start);

        let batched: Vec<(Weights, TrainStats)> = train_batched(&config, &jobs, &device)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();

        let autodiff = Device::flex().autodiff();
        for (job, (weights, stats)) in jobs.iter().zip(&batched) {
            let (alone, alone_stats) =
                train(&config, job.weights, job.data, &job.config, &autodiff).unwrap();
            assert_eq!(stats.steps, alone_stats.steps);
            assert_eq!(stats.samples, alone_stats.samples);
            assert!((stats.mean_loss - alone_stats.mean_loss).abs() < 1e-4);
            let moved = max_diff(&alone.values, &start.values);
            let off = max_diff(&weights.values, &alone.values);
            assert!(moved > 1e-3, "the visit trained ({moved})");
            assert!(
                off < 1e-4,
                "batched is off by {off} (training moved {moved})"
            );
        }
    }

    #[test]
    fn host_and_device_adam_agree() {
        // The CPU keeps Adam on the host; the same visits with the moments
        // as tensors (a GPU's placement, here on the CPU) give the same
        // weights and losses.
        let config = ModelConfig::new(10);
        let device = Device::flex();
        let start = Weights::from_model(&config.init(&device));
        let (data, configs) = three_clients(&config);
        let jobs = jobs_of(&data, &configs, &start);
        let host = BatchedModel::new(&config, &device);
        assert!(host.geometry.host_optimiser, "the CPU updates on the host");
        let mut on_device = BatchedModel::new(&config, &device);
        on_device.geometry.host_optimiser = false;
        let trained = |model: &BatchedModel| -> Vec<(Weights, TrainStats)> {
            model
                .train(&jobs)
                .into_iter()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        for ((h, hs), (d, ds)) in trained(&host).iter().zip(&trained(&on_device)) {
            let moved = max_diff(&h.values, &start.values);
            let off = max_diff(&h.values, &d.values);
            assert!(moved > 1e-3, "the visit trained ({moved})");
            // The same operations in the same order: the same floats.
            assert_eq!(off, 0.0, "host and device Adam differ by {off}");
            assert_eq!(hs.mean_loss, ds.mean_loss);
        }
    }
}
