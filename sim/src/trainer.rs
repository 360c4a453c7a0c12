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

use astraea_core::batched::{BatchedModel, Job};
use astraea_core::model::ModelConfig;
use astraea_core::train::{self, Samples, TrainConfig};
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

use astraea_core::batched::Trained;

/// The hops waiting to be trained and those trained, by ticket.
#[derive(Default)]
struct Meeting<'a> {
    /// Chains running (between [`Trainer::join`] and its guard's drop).
    active: usize,
    /// Hops taken out of `waiting` whose workers have not collected their
    /// results yet (being trained, or trained and not yet woken).
    busy: usize,
    waiting: Vec<(u64, HopJob<'a>)>,
    done: HashMap<u64, Trained>,
    next: u64,
}

impl Meeting<'_> {
    /// Whether the waiting hops should be trained now: a full stack
    /// waits, or every chain is waiting and none is about to come back
    /// with another hop (a stack trained but not yet collected would
    /// bring its chains back; launching before would split the stacks).
    fn ready(&self, stack: usize) -> bool {
        self.waiting.len() >= stack
            || (!self.waiting.is_empty() && self.busy == 0 && self.waiting.len() >= self.active)
    }
}

/// Trains the hops of a round's chains (see the module's documentation).
pub(crate) struct Trainer<'a> {
    engine: Engine,
    stack: usize,
    model_config: &'a ModelConfig,
    /// The batched engine, set up once for the round's hops.
    batched: BatchedModel,
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
            batched: BatchedModel::new(model_config, &settings.device.device()),
            model_config,
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

    /// Trains `jobs` as one stack (a job whose weights do not fit the
    /// model fails alone, as it would trained by itself).
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
        self.batched.train(&stack)
    }

    /// Waits with the other chains' hops; whoever finds a stack ready
    /// trains it. A stack whose training panics gives each of its hops an
    /// error rather than leaving their workers waiting for ever.
    fn meet(&self, job: HopJob<'a>) -> Trained {
        let mut meeting = self.lock();
        let ticket = meeting.next;
        meeting.next += 1;
        meeting.waiting.push((ticket, job));
        self.changed.notify_all();
        loop {
            if let Some(result) = meeting.done.remove(&ticket) {
                meeting.busy -= 1;
                self.changed.notify_all();
                return result;
            }
            if !meeting.ready(self.stack) {
                meeting = self
                    .changed
                    .wait(meeting)
                    .expect("no trainer thread panicked");
                continue;
            }
            let take = meeting.waiting.len().min(self.stack);
            let (tickets, jobs): (Vec<u64>, Vec<HopJob<'a>>) =
                meeting.waiting.drain(..take).unzip();
            meeting.busy += take;
            drop(meeting);
            let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(jobs)))
                .unwrap_or_else(|panic| {
                    let reason = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic");
                    let error =
                        WeightsError::Readback(format!("training the stack failed: {reason}"));
                    tickets.iter().map(|_| Err(error.clone())).collect()
                });
            meeting = self.lock();
            meeting.done.extend(tickets.into_iter().zip(results));
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Two hops of 30 blank samples from `start`; the second's images cut
    /// short when `broken` (training it panics on a slice out of range).
    fn hops(start: &Weights, images: &[f32], broken: bool) -> Vec<HopJob<'static>> {
        (0..2)
            .map(|i| HopJob {
                weights: start.clone(),
                images: if broken && i == 1 {
                    images[..784].to_vec()
                } else {
                    images.to_vec()
                },
                labels: Cow::Owned(vec![(i % 10) as u32; 30]),
                config: TrainConfig {
                    seed: i as u64,
                    ..TrainConfig::default()
                },
            })
            .collect()
    }

    /// Trains `jobs` on one thread each through a meeting of `stack`,
    /// giving up after a minute (a hang fails the test).
    fn meet_all(jobs: Vec<HopJob<'static>>, stack: usize) -> Vec<bool> {
        let config = Box::leak(Box::new(ModelConfig::new(10)));
        let trainer = Trainer::new(
            TrainerSettings {
                stack,
                ..TrainerSettings::default()
            },
            config,
        );
        let (tx, rx) = mpsc::channel();
        // Every chain joins before any trains, so the hops meet.
        let joined = std::sync::Barrier::new(jobs.len());
        std::thread::spawn(move || {
            let oks = std::thread::scope(|scope| {
                let handles: Vec<_> = jobs
                    .into_iter()
                    .map(|job| {
                        let (trainer, joined) = (&trainer, &joined);
                        scope.spawn(move || {
                            let _member = trainer.join();
                            joined.wait();
                            trainer.train(job).is_ok()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            });
            let _ = tx.send(oks);
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the meeting hung")
    }

    #[test]
    fn a_stack_that_panics_gives_its_hops_errors_not_a_hang() {
        let config = ModelConfig::new(10);
        let start = Weights::from_model(&config.init(&Device::flex()));
        let images = vec![0.5f32; 30 * 784];
        assert_eq!(meet_all(hops(&start, &images, false), 2), vec![true, true]);
        assert_eq!(meet_all(hops(&start, &images, true), 2), vec![false, false]);
    }

    #[test]
    fn weights_that_do_not_fit_fail_their_own_hop_only() {
        let config = ModelConfig::new(10);
        let start = Weights::from_model(&config.init(&Device::flex()));
        let images = vec![0.5f32; 30 * 784];
        let mut jobs = hops(&start, &images, false);
        jobs[0].weights.values.pop();
        assert_eq!(meet_all(jobs, 2), vec![false, true]);
    }
}
