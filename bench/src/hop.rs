//! A hop's fixed cost, stage by stage, on this machine's CPU (burn `flex`,
//! the native client's path): in Astraea's own setting most clients hold
//! one or two batches, so what a hop costs besides its training steps
//! decides how fast a chain moves.
//!
//! Stages, in the order a hop pays them: the server encodes the model into
//! weight frames; the client reassembles them; it builds the model from the
//! weights (module and parameters; the optimiser is built with the first
//! step); its first step (the first batch through a fresh module and a
//! fresh Adam state, allocations included) beyond a steady step; its steady
//! steps; reading the trained weights back; encoding the update; the server
//! reassembling it; the server judging it (the guard's loss rule). Timed with `Instant` around the same public calls the
//! client and the server make (`encode_chunks`, `WeightAssembler`,
//! `Weights::to_model`, `train_observed`); each figure is the median of the
//! repeats.

use std::time::Instant;

use astraea_core::data::Dataset;
use astraea_core::model::ModelConfig;
use astraea_core::protocol::{WeightAssembler, WeightEncoding, encode_chunks};
use astraea_core::train::{Samples, StepProgress, TrainConfig, train_observed};
use astraea_core::validation::{DEFAULT_MAX_LOSS_INCREASE, DEFAULT_VALIDATION_SAMPLES, LossCheck};
use astraea_core::weights::Weights;
use burn::prelude::Device;

/// One hop's stages, in milliseconds (medians over the repeats).
#[derive(Debug, Clone)]
pub struct HopCost {
    /// Batches of 20 in the hop.
    pub batches: usize,
    /// How the weights travel.
    pub encoding: WeightEncoding,
    /// Server: the global model into weight frames.
    pub server_encode_ms: f64,
    /// Client: the frames back into values.
    pub client_decode_ms: f64,
    /// Client: the model built from the values (`Weights::to_model`).
    pub build_ms: f64,
    /// Client: the first step beyond a steady one (a fresh module's and
    /// optimiser's first pass, allocations included).
    pub first_step_extra_ms: f64,
    /// Client: one steady step (the median of the steps after the first).
    pub steady_step_ms: f64,
    /// Client: reading the trained weights back into a flat vector.
    pub read_back_ms: f64,
    /// Client: the update into weight frames.
    pub client_encode_ms: f64,
    /// Server: the update's frames back into values.
    pub server_decode_ms: f64,
    /// Server: the guard's loss rule, the update's loss on the default
    /// The default validation samples (the input's is cached from the hop
    /// before).
    pub server_judge_ms: f64,
}

impl HopCost {
    /// Everything but the steady steps: what the hop would cost with no
    /// training at all.
    pub fn fixed_ms(&self) -> f64 {
        self.server_encode_ms
            + self.client_decode_ms
            + self.build_ms
            + self.first_step_extra_ms
            + self.read_back_ms
            + self.client_encode_ms
            + self.server_decode_ms
            + self.server_judge_ms
    }

    /// The whole hop on this machine, transfer over the network excluded.
    pub fn total_ms(&self) -> f64 {
        self.fixed_ms() + self.batches as f64 * self.steady_step_ms
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Reassembles `frames` as the client or the server does.
fn decode(frames: &[Vec<u8>], params: usize, encoding: WeightEncoding, max: usize) -> Vec<f32> {
    let mut assembler = WeightAssembler::new(1, 1, frames.len() as u32, params, encoding, max);
    for frame in frames {
        if let Some(values) = assembler.push(frame).expect("frames it encoded") {
            return values;
        }
    }
    panic!("the frames did not complete the weights")
}

/// Measures a hop of `batches` batches of 20 samples of `train` (the MNIST
/// CNN, one epoch), weights travelling as `encoding` in frames of
/// `max_frame_bytes`, `repeats` times.
pub fn run(
    train: &Dataset,
    batches: usize,
    encoding: WeightEncoding,
    max_frame_bytes: usize,
    repeats: usize,
) -> HopCost {
    let config = ModelConfig::new(train.class_names.len());
    let global = Weights::from_model(&config.init(&Device::flex()));
    let params = global.len();
    let samples = batches * 20;
    let sample_len = train.channels * train.height * train.width;
    let data = Samples {
        images: &train.images[..samples * sample_len],
        labels: &train.labels[..samples],
    };
    let device = Device::flex().autodiff();
    let check = LossCheck::new(
        config.clone(),
        &train.subset(&(0..DEFAULT_VALIDATION_SAMPLES).collect::<Vec<_>>()),
        DEFAULT_MAX_LOSS_INCREASE,
    );
    let mut stages: [Vec<f64>; 9] = Default::default();
    for repeat in 0..repeats.max(1) {
        let start = Instant::now();
        let frames = encode_chunks(1, 1, &global.values, encoding, max_frame_bytes);
        stages[0].push(ms(start));

        let start = Instant::now();
        let values = decode(&frames, params, encoding, max_frame_bytes);
        stages[1].push(ms(start));
        let weights = Weights {
            shapes: global.shapes.clone(),
            values,
        };

        let start = Instant::now();
        let built = weights.to_model(&config, &device).expect("its own shapes");
        stages[2].push(ms(start));
        drop(built);

        // Step times from the observer's clock: the first includes building
        // the model and the optimiser, so the building measured above is
        // taken off it.
        let train_config = TrainConfig {
            seed: repeat as u64,
            ..TrainConfig::default()
        };
        let visit = |data: Samples<'_>| {
            let mut marks = Vec::new();
            let start = Instant::now();
            let mut observe = |_: &StepProgress| marks.push(Instant::now());
            let (trained, _) = train_observed(
                &config,
                &weights,
                data,
                &train_config,
                &device,
                &mut observe,
            )
            .expect("its own weights");
            (start, marks, Instant::now(), trained)
        };
        let (start, marks, end, trained) = visit(data);
        let steady_of = |marks: &[Instant]| {
            median(
                marks
                    .windows(2)
                    .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
                    .collect(),
            )
        };
        // A hop of fewer than three batches has too few steady steps to
        // time: a four-batch visit of the same weights gives one.
        let steady = if marks.len() >= 3 {
            steady_of(&marks)
        } else {
            let longer = Samples {
                images: &train.images[..80 * sample_len],
                labels: &train.labels[..80],
            };
            steady_of(&visit(longer).1)
        };
        let first = (marks[0] - start).as_secs_f64() * 1e3;
        stages[3].push(first - stages[2][repeat] - steady);
        stages[4].push(steady);
        // From the last step to the weights in hand: reading back.
        stages[5].push((end - *marks.last().expect("a step")).as_secs_f64() * 1e3);

        let start = Instant::now();
        let update = encode_chunks(1, 1, &trained.values, encoding, max_frame_bytes);
        stages[6].push(ms(start));

        let start = Instant::now();
        let back = decode(&update, params, encoding, max_frame_bytes);
        stages[7].push(ms(start));

        let start = Instant::now();
        let loss = check.loss(&back).expect("its own shapes");
        stages[8].push(ms(start));
        assert!(loss.is_finite());
    }
    let [
        encode,
        decode_ms,
        build,
        first,
        steady,
        read_back,
        client_encode,
        server_decode,
        judge,
    ] = stages.map(median);
    HopCost {
        batches,
        encoding,
        server_encode_ms: encode,
        client_decode_ms: decode_ms,
        build_ms: build,
        first_step_extra_ms: first,
        steady_step_ms: steady,
        read_back_ms: read_back,
        client_encode_ms: client_encode,
        server_decode_ms: server_decode,
        server_judge_ms: judge,
    }
}
