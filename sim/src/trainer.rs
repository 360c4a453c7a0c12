//! How the simulator trains its clients' hops: `--engine batched` (the
//! default: [`astraea_core::batched`], several chains' hops stacked into
//! one pass) or `--engine per-client` (burn's autodiff, one hop at a time,
//! what a client runs).
//!
//! The chains of a round run on worker threads and call
//! [`Trainer::train`] for each hop, as a client would train it. With a
//! stack of one, every worker trains its own hop with the batched trainer
//! (on two CPU cores that measures fastest: docs/RESULTS.md, "A simulator
//! that trains many clients at once"). With a larger stack the workers
//! meet: a hop waits until `stack` hops are waiting, or until every chain
//! still running is waiting (none can add another), and then one of the
//! waiting workers trains them all as one stack (a GPU wants thousands of
//! clients a pass). What a chain decides between its hops (the loss rule,
//! the guard, DP) runs on its own worker as before, so the rules of a
//! round are untouched: only where the arithmetic of a hop happens moves.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Condvar, Mutex};

use astraea_core::batched::{Job, train_batched};
use astraea_core::model::ModelConfig;
use astraea_core::train::{self, Samples, TrainConfig, TrainStats};
use astraea_core::weights::{Weights, WeightsError};
use burn::prelude::*;

/// Which trainer the simulator uses (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// [`astraea_core::batched`]: hand-written forward and backward over
    /// stacked clients, on any burn device.
    #[default]
    Batched,
    /// [`astraea_core::train::train`]: one visit at a time through burn's
    /// autodiff, as the clients train.
    PerClient,
}

impl FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "batched" => Ok(Self::Batched),
            "per-client" => Ok(Self::PerClient),
            other => Err(format!("unknown engine {other:?} (batched or per-client)")),
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Batched => "batched",
            Self::PerClient => "per-client",
        })
    }
}

/// Where the batched trainer computes (`--device`): the CPU (burn's
/// `flex`), or a GPU through burn's wgpu backend (Vulkan, Metal or DX12)
/// when built with the `gpu` feature. (burn's CUDA backend downloads an
/// LLVM bundle while it builds, which nothing here may do.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// burn's `flex` CPU backend.
    #[default]
    Cpu,
    /// burn's wgpu backend on the best GPU wgpu finds (the `gpu` feature).
    Gpu,
}

impl FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "gpu" if cfg!(feature = "gpu") => Ok(Self::Gpu),
            "gpu" => Err("this build has no GPU backend: build with --features gpu".into()),
            other => Err(format!("unknown device {other:?} (cpu or gpu)")),
        }
    }
}

impl DeviceKind {
    /// The burn device.
    pub fn device(self) -> Device {
        match self {
            Self::Cpu => Device::flex(),
            #[cfg(feature = "gpu")]
            Self::Gpu => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
            #[cfg(not(feature = "gpu"))]
            Self::Gpu => unreachable!("DeviceKind::Gpu only parses with the gpu feature"),
        }
    }
}

/// How the simulator trains: the engine, how many hops the batched one
/// stacks, and on which device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainerSettings {
    /// Which trainer.
    pub engine: Engine,
    /// Hops the batched engine trains as one stack (1: each worker its
    /// own, the fastest on a CPU; a GPU wants hundreds or more).
    pub stack: usize,
    /// Where the batched engine computes.
    pub device: DeviceKind,
}

impl Default for TrainerSettings {
    /// Batched, a stack of one, on the CPU.
    fn default() -> Self {
        Self {
            engine: Engine::Batched,
            stack: 1,
            device: DeviceKind::Cpu,
        }
    }
}

/// One hop to train: what [`Job`] holds, owned where the chain made it
/// (the weights it received, the images made from the client's index
/// list, labels an attacker poisoned).
pub(crate) struct HopJob<'a> {
    pub weights: Weights,
    /// The client's images, made for this hop from its index list.
    pub images: Vec<f32>,
    pub labels: Cow<'a, [u32]>,
    pub config: TrainConfig,
}

type Trained = Result<(Weights, TrainStats), WeightsError>;

/// The hops waiting to be trained and those trained, by ticket.
#[derive(Default)]
struct Meeting<'a> {
    /// Chains running (between [`Trainer::join`] and its guard's drop).
    active: usize,
    /// Workers inside [`Trainer::train`], waiting or being trained.
    blocked: usize,
    waiting: Vec<(u64, HopJob<'a>)>,
    done: HashMap<u64, Trained>,
    next: u64,
}

/// Trains the hops of a round's chains (see the module's documentation).
pub(crate) struct Trainer<'a> {
    engine: Engine,
    stack: usize,
    model_config: &'a ModelConfig,
    device: Device,
    meeting: Mutex<Meeting<'a>>,
    changed: Condvar,
}

/// A running chain's membership of the meeting; dropping it leaves.
pub(crate) struct Member<'t, 'a> {
    trainer: &'t Trainer<'a>,
}

impl Drop for Member<'_, '_> {
    fn drop(&mut self) {
        let mut meeting = self.trainer.lock();
        meeting.active -= 1;
        self.trainer.changed.notify_all();
    }
}

impl<'a> Trainer<'a> {
    /// A trainer as `settings` say (the per-client engine always trains
    /// on the CPU).
    pub fn new(settings: TrainerSettings, model_config: &'a ModelConfig) -> Self {
        Self {
            engine: settings.engine,
            stack: settings.stack.max(1),
            model_config,
            device: settings.device.device(),
            meeting: Mutex::new(Meeting::default()),
            changed: Condvar::new(),
        }
    }

    /// Workers the round's `chains` should run on, given `threads`: with a
    /// stack, enough that `stack` chains can wait together.
    pub fn workers(&self, chains: usize, threads: usize) -> usize {
        let wanted = match (self.engine, self.stack) {
            (Engine::Batched, stack) if stack > 1 => stack.max(threads),
            _ => threads,
        };
        wanted.max(1).min(chains.max(1))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Meeting<'a>> {
        self.meeting.lock().expect("no trainer thread panicked")
    }

    /// A chain starts; it trains through [`Self::train`] until the guard
    /// drops.
    pub fn join(&self) -> Member<'_, 'a> {
        self.lock().active += 1;
        Member { trainer: self }
    }

    /// Trains one hop and returns what [`train::train`] would.
    pub fn train(&self, job: HopJob<'a>) -> Trained {
        match (self.engine, self.stack) {
            (Engine::PerClient, _) => {
                let data = Samples {
                    images: &job.images,
                    labels: &job.labels,
                };
                let device = Device::flex().autodiff();
                train::train(self.model_config, &job.weights, data, &job.config, &device)
            }
            (Engine::Batched, 1) => self.run(vec![job]).pop().expect("one result a job"),
            (Engine::Batched, _) => self.meet(job),
        }
    }

    /// Trains `jobs` as one stack.
    fn run(&self, jobs: Vec<HopJob<'a>>) -> Vec<Trained> {
        let stack: Vec<Job<'_>> = jobs
            .iter()
            .map(|job| Job {
                weights: &job.weights,
                data: Samples {
                    images: &job.images,
                    labels: &job.labels,
                },
                config: job.config.clone(),
            })
            .collect();
        match train_batched(self.model_config, &stack, &self.device) {
            Ok(results) => results.into_iter().map(Ok).collect(),
            Err(e) => jobs.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Waits with the other chains' hops; whoever finds a stack ready
    /// trains it.
    fn meet(&self, job: HopJob<'a>) -> Trained {
        let mut meeting = self.lock();
        let ticket = meeting.next;
        meeting.next += 1;
        meeting.waiting.push((ticket, job));
        meeting.blocked += 1;
        loop {
            if let Some(result) = meeting.done.remove(&ticket) {
                meeting.blocked -= 1;
                return result;
            }
            let ready = meeting.waiting.len() >= self.stack
                || (!meeting.waiting.is_empty() && meeting.blocked >= meeting.active);
            if !ready {
                meeting = self
                    .changed
                    .wait(meeting)
                    .expect("no trainer thread panicked");
                continue;
            }
            let take = meeting.waiting.len().min(self.stack);
            let (tickets, jobs): (Vec<u64>, Vec<HopJob<'a>>) =
                meeting.waiting.drain(..take).unzip();
            drop(meeting);
            let results = self.run(jobs);
            meeting = self.lock();
            meeting.done.extend(tickets.into_iter().zip(results));
            self.changed.notify_all();
        }
    }
}
