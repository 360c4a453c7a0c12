//! Training the learned mediator scheduler (`astraea train-scheduler`):
//! rounds of the simulated population as a multi-agent environment, and a
//! small MAPPO learner (Yu et al., "The Surprising Effectiveness of PPO in
//! Cooperative Multi-Agent Games", NeurIPS 2022) written here with burn's
//! autodiff — burn's own `burn-rl` (0.21 pre-releases) and the other RL
//! crates do not match our burn 0.22, and none has a variable action set.
//!
//! - **Agents** are the mediators being formed; they act in turn on one
//!   shared pool ([`astraea_core::astraea::formation::Formation`]), each
//!   taking a candidate or closing its chain.
//! - **The actor** is shared by every agent and sees only what the server
//!   knows ([`Formation::observe`]); it is the [`Policy`] the server runs.
//! - **The critic** is centralised: it also sees the simulator's truth (the
//!   hops that will freeze, the chains' true times so far) and is used in
//!   training only.
//! - **The reward** is shared by every agent, one per round: minus the log
//!   of the round's true time (the slowest chain, freezes included) over
//!   the balanced time, minus `shaping` times the chains' sample-weighted
//!   KL to uniform — the log of "accuracy gained per second" if a round's
//!   gain falls as `exp(-shaping * KL)`. `shaping = 0` rewards time alone
//!   (the ablation).
//!
//! Each iteration plays `episodes` rounds with the current actor (actions
//! sampled from its softmax over the legal ones), then takes `epochs` PPO
//! steps on them (clip 0.2, value loss 0.5, entropy bonus 0.01); the
//! advantage of every step is the round's reward minus the critic's value,
//! normalised over the batch. Seeded: the networks' initial weights, the
//! rounds and the actions all come from generators of the run's seed.

use std::sync::Arc;

use anyhow::Context;
use astraea_core::astraea::Scheduler;
use astraea_core::astraea::formation::{Action, FEATURES, Formation};
use astraea_core::astraea::policy::Policy;
use astraea_core::data::Dataset;
use astraea_core::engine::seeds::mix;
use astraea_core::partition::kl_to_uniform;
use astraea_core::strategy::StrategyKind;
use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, relu};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

use crate::config::{RunSpec, SimConfig};
use crate::population::Population;

/// Numbers the critic sees of a board ([`Environment::critic_state`]).
pub const CRITIC_FEATURES: usize = 7;

/// How the learner trains.
#[derive(Debug, Clone, PartialEq)]
pub struct LearnerSettings {
    /// PPO iterations (each: play, then update).
    pub iterations: usize,
    /// Rounds played per iteration.
    pub episodes: usize,
    /// PPO epochs over each iteration's rounds.
    pub epochs: usize,
    /// Units per hidden layer of the actor and the critic.
    pub hidden: usize,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// The reward's weight on the chains' KL to uniform (0: time alone).
    pub shaping: f64,
    /// Seed of the population, the rounds, the actions and the networks.
    pub seed: u64,
}

impl Default for LearnerSettings {
    fn default() -> Self {
        Self {
            iterations: 60,
            episodes: 8,
            epochs: 4,
            hidden: 8,
            learning_rate: 3e-3,
            shaping: 4.0,
            seed: 1,
        }
    }
}

/// The simulated population as the scheduler's environment: every
/// client's reported (post-plan) label counts, its work and its speed, and
/// the server's time rules.
#[derive(Debug, Clone)]
pub struct Environment {
    reported: Vec<Vec<usize>>,
    work: Vec<u64>,
    speeds: Vec<f64>,
    population: Population,
    participants: usize,
    gamma: usize,
    passes: usize,
}

/// One round drawn from the population.
#[derive(Debug, Clone)]
pub struct Round {
    /// The participants' reported counts.
    pub counts: Vec<Vec<usize>>,
    /// Their expected hop times (what the server knows), seconds.
    pub expected: Vec<Option<f64>>,
    /// Their true hop times on each pass (freezes drawn), seconds:
    /// `truth[i][pass]`; the critic's to see, never the actor's.
    pub truth: Vec<Vec<f64>>,
}

impl Round {
    /// The combined reported counts of a group of participants.
    pub fn mix(&self, group: &[usize]) -> Vec<usize> {
        mix_of(&self.counts, group)
    }
}

/// The combined counts of `group` (indices into `counts`).
fn mix_of(counts: &[Vec<usize>], group: &[usize]) -> Vec<usize> {
    let mut mix = vec![0usize; counts.first().map_or(0, Vec::len)];
    for &i in group {
        for (m, n) in mix.iter_mut().zip(&counts[i]) {
            *m += n;
        }
    }
    mix
}

/// What a schedule of one round came to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// The round's true time: its slowest chain, freezes included, s.
    pub seconds: f64,
    /// The balanced time the expected hop times allow, s.
    pub balanced: f64,
    /// The chains' sample-weighted KL to uniform, nats.
    pub kl: f64,
}

impl Outcome {
    /// The outcome of a round that took `seconds` with `groups` (lists of
    /// indices into `counts`, the participants' reported label counts):
    /// the balanced time is the participants' `expected` hop seconds
    /// summed, times the `passes`, over the number of groups; the KL is
    /// the groups' mixes' KL to uniform weighted by their samples.
    pub fn of(
        seconds: f64,
        (expected, passes): (f64, usize),
        counts: &[Vec<usize>],
        groups: &[&[usize]],
    ) -> Self {
        let (mut weighted, mut samples) = (0.0, 0.0);
        for group in groups {
            let mix = mix_of(counts, group);
            let n = mix.iter().sum::<usize>() as f64;
            weighted += n * kl_to_uniform(&mix);
            samples += n;
        }
        Self {
            seconds,
            balanced: expected * passes as f64 / groups.len().max(1) as f64,
            kl: if samples > 0.0 {
                weighted / samples
            } else {
                0.0
            },
        }
    }

    /// The shared reward: `-ln(seconds / balanced) - shaping * kl`.
    pub fn reward(&self, shaping: f64) -> f64 {
        -(self.seconds.max(1e-9) / self.balanced.max(1e-9)).ln() - shaping * self.kl
    }
}

impl Environment {
    /// The population of `config` for `seed`: the same clients, data plan
    /// (Astraea's), reports and speeds as `simulate`'s Astraea run of that
    /// seed.
    ///
    /// # Errors
    /// A partition or plan that cannot be built.
    pub fn new(
        config: &SimConfig,
        train: &Dataset,
        test: &Dataset,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let spec = RunSpec {
            strategy: StrategyKind::Astraea,
            iid_reference: false,
            seed,
        };
        let partition = crate::federation::partition_for(config, &spec, train, test)
            .context("partitioning the population")?;
        let strategy = spec.strategy(config);
        let clients = crate::runner::clients_for(
            config,
            &spec,
            train,
            &partition,
            strategy.as_ref(),
            &indicatif::ProgressBar::hidden(),
            std::time::Instant::now(),
        )?;
        let work = clients
            .federation
            .clients
            .iter()
            .map(|c| (c.len() as u64).saturating_mul(config.epochs as u64))
            .collect();
        Ok(Self {
            reported: clients.reported,
            work,
            speeds: clients.speeds,
            population: config.population.clone(),
            participants: config.participants.min(config.clients).max(1),
            gamma: config.gamma.max(1),
            passes: config.mediator_passes.max(1),
        })
    }

    /// An environment from its parts: each client's reported counts,
    /// work (samples times epochs) and speed (samples/s), the population's
    /// time rules, and the round's shape.
    pub fn from_parts(
        reported: Vec<Vec<usize>>,
        work: Vec<u64>,
        speeds: Vec<f64>,
        population: Population,
        participants: usize,
        gamma: usize,
        passes: usize,
    ) -> Self {
        Self {
            participants: participants.min(reported.len()).max(1),
            reported,
            work,
            speeds,
            population,
            gamma: gamma.max(1),
            passes: passes.max(1),
        }
    }

    /// Draws a round: `participants` clients at random, and whether each
    /// of their hops freezes.
    pub fn round(&self, rng: &mut StdRng) -> Round {
        let picked = sample(rng, self.reported.len(), self.participants).into_vec();
        let mut round = Round {
            counts: Vec::with_capacity(picked.len()),
            expected: Vec::with_capacity(picked.len()),
            truth: Vec::with_capacity(picked.len()),
        };
        for id in picked {
            let (work, speed) = (self.work[id], self.speeds[id]);
            let expected = self.population.hop_s(work, speed);
            let truth = (0..self.passes)
                .map(|_| {
                    if self.population.freeze > 0.0
                        && rng.random_bool(self.population.freeze.min(1.0))
                    {
                        self.population.frozen_hop_s(speed, work)
                    } else {
                        expected
                    }
                })
                .collect();
            round.counts.push(self.reported[id].clone());
            round.expected.push(Some(expected));
            round.truth.push(truth);
        }
        round
    }

    /// What `groups` (lists of participant indices) come to on `round`.
    pub fn outcome(&self, round: &Round, groups: &[Vec<usize>]) -> Outcome {
        let chain =
            |g: &Vec<usize>| -> f64 { g.iter().map(|&i| round.truth[i].iter().sum::<f64>()).sum() };
        let seconds = groups.iter().map(chain).fold(0.0, f64::max);
        let expected: f64 = round.expected.iter().flatten().sum();
        let groups: Vec<&[usize]> = groups.iter().map(Vec::as_slice).collect();
        Outcome::of(seconds, (expected, self.passes), &round.counts, &groups)
    }

    /// The critic's view of a board: 0 progress, 1 the longest expected
    /// chain over the balanced time, 2 the chains' mean KL, 3 candidates
    /// left over room left, 4 the longest true chain so far over the
    /// balanced time (truth), 5 the true over the expected time of the
    /// hops still unplaced (truth: the freezes to come), 6 the share of
    /// mediators closed.
    pub fn critic_state(&self, round: &Round, board: &Formation<'_>) -> [f32; CRITIC_FEATURES] {
        let c = round.counts.len().max(1) as f64;
        let bal = board.balanced_time();
        let members = board.members();
        let times = board.hop_times();
        let expected: Vec<f64> = members
            .iter()
            .map(|g| g.iter().map(|&i| times[i]).sum())
            .collect();
        let truth: Vec<f64> = members
            .iter()
            .map(|g| g.iter().map(|&i| round.truth[i].iter().sum::<f64>()).sum())
            .collect();
        let kls: Vec<f64> = members
            .iter()
            .filter(|g| !g.is_empty())
            .map(|g| kl_to_uniform(&round.mix(g)))
            .collect();
        let left = board.unassigned();
        let room: usize = members
            .iter()
            .enumerate()
            .filter(|&(j, _)| !board.is_closed(j))
            .map(|(_, g)| self.gamma.saturating_sub(g.len()))
            .sum();
        let (true_left, exp_left) = left.iter().fold((0.0, 0.0), |(t, e), &i| {
            (
                t + round.truth[i].iter().sum::<f64>(),
                e + times[i] * self.passes as f64,
            )
        });
        [
            ((c - left.len() as f64) / c) as f32,
            (expected.iter().copied().fold(0.0, f64::max) / bal) as f32,
            (kls.iter().sum::<f64>() / kls.len().max(1) as f64) as f32,
            (left.len() as f64 / room.max(1) as f64) as f32,
            (truth.iter().copied().fold(0.0, f64::max) / (bal * self.passes as f64)) as f32,
            if exp_left > 0.0 {
                (true_left / exp_left) as f32
            } else {
                1.0
            },
            (board.closed() as f64 / members.len().max(1) as f64) as f32,
        ]
    }

    /// Mediators of at most gamma for this environment.
    pub fn gamma(&self) -> usize {
        self.gamma
    }
}

/// The actor and the centralised critic, as burn modules.
#[derive(Module, Debug)]
struct ActorCritic {
    a1: Linear,
    a2: Linear,
    c1: Linear,
    c2: Linear,
    c3: Linear,
}

impl ActorCritic {
    /// Layers initialised as burn's `Linear` is (`U(-k, k)`, `k = 1 /
    /// sqrt(inputs)`), drawn from `rng` rather than burn's process-wide
    /// generator, which other threads of the same process draw from too.
    fn new(hidden: usize, rng: &mut StdRng, device: &Device) -> Self {
        let mut linear = |i: usize, o: usize| {
            let k = 1.0 / (i as f32).sqrt();
            let mut draw =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-k..=k)).collect() };
            let weight = Tensor::<2>::from_data(TensorData::new(draw(i * o), [i, o]), device);
            let bias = Tensor::<1>::from_data(TensorData::new(draw(o), [o]), device);
            let mut layer: Linear = LinearConfig::new(i, o).init(device);
            layer.weight = Param::from_tensor(weight);
            layer.bias = Some(Param::from_tensor(bias));
            layer
        };
        Self {
            a1: linear(FEATURES, hidden),
            a2: linear(hidden, 1),
            c1: linear(CRITIC_FEATURES, hidden),
            c2: linear(hidden, hidden),
            c3: linear(hidden, 1),
        }
    }

    /// Scores `[steps, actions, FEATURES] -> [steps, actions]`.
    fn scores(&self, rows: Tensor<3>) -> Tensor<2> {
        let x = relu(self.a1.forward(rows));
        self.a2.forward(x).squeeze_dim(2)
    }

    /// Values `[steps, CRITIC_FEATURES] -> [steps]`.
    fn values(&self, state: Tensor<2>) -> Tensor<1> {
        let x = relu(self.c1.forward(state));
        let x = relu(self.c2.forward(x));
        self.c3.forward(x).squeeze_dim(1)
    }

    /// The actor as the plain-Rust policy the server runs.
    fn policy(&self, hidden: usize, training: String) -> anyhow::Result<Policy> {
        let mut values = Vec::new();
        for linear in [&self.a1, &self.a2] {
            values.extend(read(linear.weight.val())?);
            let bias = linear
                .bias
                .as_ref()
                .context("a linear layer without bias")?;
            values.extend(read(bias.val())?);
        }
        Policy::new(hidden, values, training).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

fn read<const D: usize>(t: Tensor<D>) -> anyhow::Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// One decision in a played round.
struct Step {
    rows: Vec<f32>,
    chosen: usize,
    old_logp: f32,
    state: [f32; CRITIC_FEATURES],
    episode: usize,
}

/// One iteration's progress, for the log and the report.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct IterationStats {
    /// Mean reward of the rounds played.
    pub reward: f64,
    /// Mean true round time over balanced time.
    pub time_ratio: f64,
    /// Mean chain KL.
    pub kl: f64,
}

impl IterationStats {
    /// Adds one of `rounds` rounds' `outcome` to the means.
    fn add(&mut self, outcome: &Outcome, shaping: f64, rounds: usize) {
        let n = rounds.max(1) as f64;
        self.reward += outcome.reward(shaping) / n;
        self.time_ratio += outcome.seconds / outcome.balanced / n;
        self.kl += outcome.kl / n;
    }
}

/// Plays a round with `policy`, sampling each action from its softmax
/// over the legal ones (`rng`); returns the groups and appends the steps
/// taken to `steps`.
fn play(
    env: &Environment,
    round: &Round,
    policy: &Policy,
    rng: &mut StdRng,
    episode: usize,
    steps: &mut Vec<Step>,
) -> Vec<Vec<usize>> {
    let mut board = Formation::new(&round.counts, &round.expected, env.gamma);
    let mut rows = Vec::new();
    while let Some(agent) = board.turn() {
        let state = env.critic_state(round, &board);
        rows.clear();
        let actions = board.observe(agent, &mut rows);
        let scores = policy.scores(&rows);
        let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = scores.iter().map(|s| f64::from(s - top).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut draw = rng.random::<f64>() * total;
        // Rounding can leave the draw past the last weight: then the last
        // action of any weight (the best has weight 1).
        let mut chosen = weights.iter().rposition(|w| *w > 0.0).unwrap_or(0);
        for (k, w) in weights.iter().enumerate() {
            if draw < *w {
                chosen = k;
                break;
            }
            draw -= w;
        }
        let old_logp = ((weights[chosen] / total).max(1e-30)).ln() as f32;
        let action: Action = actions[chosen];
        board.play(agent, action);
        steps.push(Step {
            rows: rows.clone(),
            chosen,
            old_logp,
            state,
            episode,
        });
    }
    board.finish()
}

/// Trains a policy on `env`; `log` hears each iteration's statistics.
///
/// # Errors
/// A network whose weights turn non-finite.
pub fn train_policy(
    env: &Environment,
    settings: &LearnerSettings,
    log: &mut dyn FnMut(usize, &IterationStats),
) -> anyhow::Result<Policy> {
    let device = Device::flex().autodiff();
    let hidden = settings.hidden.max(1);
    let mut rng = StdRng::seed_from_u64(mix(&[settings.seed, 0x5c4ed]));
    let mut model = ActorCritic::new(hidden, &mut rng, &device);
    let mut optimizer = AdamConfig::new().init();
    let training = serde_json::json!({
        "algorithm": "MAPPO (shared actor, centralised critic)",
        "iterations": settings.iterations,
        "episodes": settings.episodes,
        "epochs": settings.epochs,
        "hidden": hidden,
        "learning_rate": settings.learning_rate,
        "shaping": settings.shaping,
        "seed": settings.seed,
        "participants": env.participants,
        "gamma": env.gamma,
        "passes": env.passes,
        "population": format!("{:?}", env.population),
    })
    .to_string();
    for iteration in 0..settings.iterations {
        let policy = model.policy(hidden, training.clone())?;
        let mut steps = Vec::new();
        let mut returns = Vec::with_capacity(settings.episodes);
        let mut stats = IterationStats::default();
        for episode in 0..settings.episodes {
            let round = env.round(&mut rng);
            let groups = play(env, &round, &policy, &mut rng, episode, &mut steps);
            let outcome = env.outcome(&round, &groups);
            returns.push(outcome.reward(settings.shaping) as f32);
            stats.add(&outcome, settings.shaping, settings.episodes);
        }
        log(iteration, &stats);
        if steps.is_empty() {
            continue;
        }
        let batch = Batch::new(&steps, &returns, &device);
        for _ in 0..settings.epochs {
            let loss = batch.loss(&model);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optimizer.step(settings.learning_rate, model, grads);
        }
    }
    model.policy(hidden, training)
}

/// An iteration's steps as padded tensors.
struct Batch {
    rows: Tensor<3>,
    mask: Tensor<2>,
    chosen: Tensor<2, Int>,
    old_logp: Tensor<1>,
    state: Tensor<2>,
    returns: Tensor<1>,
}

impl Batch {
    fn new(steps: &[Step], returns: &[f32], device: &Device) -> Self {
        let s = steps.len();
        let widest = steps
            .iter()
            .map(|st| st.rows.len() / FEATURES)
            .max()
            .unwrap_or(1);
        let mut rows = vec![0.0f32; s * widest * FEATURES];
        let mut mask = vec![-1e9f32; s * widest];
        for (k, st) in steps.iter().enumerate() {
            let n = st.rows.len() / FEATURES;
            rows[k * widest * FEATURES..k * widest * FEATURES + st.rows.len()]
                .copy_from_slice(&st.rows);
            mask[k * widest..k * widest + n].fill(0.0);
        }
        let chosen: Vec<i64> = steps.iter().map(|st| st.chosen as i64).collect();
        let old: Vec<f32> = steps.iter().map(|st| st.old_logp).collect();
        let state: Vec<f32> = steps.iter().flat_map(|st| st.state).collect();
        let ret: Vec<f32> = steps.iter().map(|st| returns[st.episode]).collect();
        Self {
            rows: Tensor::from_data(TensorData::new(rows, [s, widest, FEATURES]), device),
            mask: Tensor::from_data(TensorData::new(mask, [s, widest]), device),
            chosen: Tensor::from_data(TensorData::new(chosen, [s, 1]), device),
            old_logp: Tensor::from_data(TensorData::new(old, [s]), device),
            state: Tensor::from_data(TensorData::new(state, [s, CRITIC_FEATURES]), device),
            returns: Tensor::from_data(TensorData::new(ret, [s]), device),
        }
    }

    /// PPO's clipped objective, the critic's squared error and an entropy
    /// bonus: `-min(r A, clip(r, 0.8, 1.2) A) + 0.5 (V - R)^2 - 0.01 H`,
    /// with `A = R - V` from the critic as it is at this epoch, normalised
    /// over the batch (zero mean, unit variance).
    fn loss(&self, model: &ActorCritic) -> Tensor<1> {
        let logp = log_softmax(model.scores(self.rows.clone()) + self.mask.clone(), 1);
        let entropy = (logp.clone().exp() * logp.clone()).sum_dim(1).neg().mean();
        let chosen = logp.gather(1, self.chosen.clone()).squeeze_dim(1);
        let values = model.values(self.state.clone());
        let advantage = (self.returns.clone() - values.clone().detach()).detach();
        // The population variance: a batch of one step has 0, not 0 / 0.
        let std = advantage.clone().var_bias(0).sqrt().add_scalar(1e-6);
        let advantage = (advantage.clone() - advantage.mean()) / std;
        let ratio = (chosen - self.old_logp.clone()).exp();
        let clipped = ratio.clone().clamp(0.8, 1.2);
        let policy_loss = (ratio * advantage.clone())
            .min_pair(clipped * advantage)
            .mean()
            .neg();
        let value_loss = (values - self.returns.clone()).powi_scalar(2).mean();
        policy_loss + value_loss.mul_scalar(0.5) - entropy.mul_scalar(0.01)
    }
}

/// The policy's scheduler, for the harness.
pub fn learned(policy: Policy) -> Scheduler {
    Scheduler::Learned(Arc::new(policy))
}

/// Mean outcome of `scheduler` over `rounds` rounds drawn with `seed`:
/// (reward, true time over balanced time, KL) — the harness's quick judge
/// before the full simulator.
pub fn judge(
    env: &Environment,
    scheduler: &Scheduler,
    rounds: usize,
    shaping: f64,
    seed: u64,
) -> IterationStats {
    let mut rng = StdRng::seed_from_u64(mix(&[seed, 0x1d9e]));
    let mut stats = IterationStats::default();
    for r in 0..rounds {
        let round = env.round(&mut rng);
        let groups = scheduler.assign(&round.counts, &round.expected, env.gamma, r as u64);
        let outcome = env.outcome(&round, &groups);
        stats.add(&outcome, shaping, rounds);
    }
    stats
}

impl From<&crate::runner::ProbedSchedule> for Outcome {
    fn from(probed: &crate::runner::ProbedSchedule) -> Self {
        Self {
            seconds: probed.seconds,
            balanced: probed.balanced,
            kl: probed.kl,
        }
    }
}

/// Spearman's rank correlation of `a` and `b` (equal lengths): Pearson's
/// correlation of their ranks, tied values taking the mean of their ranks
/// (Spearman 1904; the tie rule as in SciPy's `spearmanr`). `None` for
/// fewer than two pairs or when either side is constant.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

/// Ranks (1-based) of `values`, ties sharing their mean rank.
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Ranks start+1 ..= end share their mean.
        let mean = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = mean;
        }
        start = end;
    }
    ranks
}

/// How well a surrogate ranks schedules as the full simulator does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankCheck {
    /// The mean over probed rounds of each round's Spearman correlation
    /// between the surrogate and the truth (rounds where either side is
    /// constant are left out).
    pub per_round: f64,
    /// The rounds that counted.
    pub rounds: usize,
    /// Spearman's correlation over every probed schedule of every round
    /// at once.
    pub pooled: f64,
}

/// Checks `surrogate` (a score per probed schedule) against `truth` (what
/// the full simulator says the schedule was worth, e.g.
/// [`ProbedSchedule::gain_per_second`](crate::runner::ProbedSchedule::gain_per_second)),
/// each inner slice of `rounds` being one probed round's schedules.
pub fn rank_check(
    rounds: &[Vec<crate::runner::ProbedSchedule>],
    surrogate: impl Fn(&crate::runner::ProbedSchedule) -> f64,
    truth: impl Fn(&crate::runner::ProbedSchedule) -> f64,
) -> RankCheck {
    let (mut sum, mut counted) = (0.0, 0);
    let (mut all_s, mut all_g) = (Vec::new(), Vec::new());
    for round in rounds {
        let s: Vec<f64> = round.iter().map(&surrogate).collect();
        let g: Vec<f64> = round.iter().map(&truth).collect();
        if let Some(rho) = spearman(&s, &g) {
            sum += rho;
            counted += 1;
        }
        all_s.extend(s);
        all_g.extend(g);
    }
    RankCheck {
        per_round: if counted > 0 {
            sum / counted as f64
        } else {
            f64::NAN
        },
        rounds: counted,
        pooled: spearman(&all_s, &all_g).unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_ranks_with_ties_as_scipy_does() {
        // scipy.stats.spearmanr([1, 2, 2, 5], [10, 20, 30, 40]) = 0.9486833
        let rho = spearman(&[1.0, 2.0, 2.0, 5.0], &[10.0, 20.0, 30.0, 40.0]).unwrap();
        assert!((rho - 0.948_683_3).abs() < 1e-6, "{rho}");
        // Monotone, either way; constant: none.
        let x = [0.3, -1.0, 7.0, 2.0];
        let cubed: Vec<f64> = x.iter().map(|v: &f64| v.powi(3)).collect();
        assert_eq!(spearman(&x, &cubed), Some(1.0));
        let negated: Vec<f64> = x.iter().map(|v| -v).collect();
        assert_eq!(spearman(&x, &negated), Some(-1.0));
        assert_eq!(spearman(&x, &[1.0; 4]), None);
        assert_eq!(spearman(&[1.0], &[2.0]), None);
    }

    #[test]
    fn the_actor_exports_to_the_policy_the_server_runs() {
        // The burn actor and the plain-Rust policy score alike.
        let device = Device::flex();
        let model = ActorCritic::new(8, &mut StdRng::seed_from_u64(3), &device);
        let policy = model.policy(8, String::new()).unwrap();
        let rows: Vec<f32> = (0..5 * FEATURES).map(|i| (i as f32 * 0.37).sin()).collect();
        let burn_scores = read(model.scores(Tensor::from_data(
            TensorData::new(rows.clone(), [1, 5, FEATURES]),
            &device,
        )))
        .unwrap();
        let plain = policy.scores(&rows);
        for (a, b) in burn_scores.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-5, "{burn_scores:?} vs {plain:?}");
        }
        assert_eq!(astraea_core::astraea::policy::policy_shapes(8).len(), 4);
    }
    /// 60 clients of 2 classes each over 6, speeds spread 100x.
    fn synthetic(freeze: f64) -> Environment {
        let reported = (0..60)
            .map(|i| {
                let mut row = vec![0usize; 6];
                row[i % 6] = 30;
                row[(i + 1) % 6] = 10;
                row
            })
            .collect();
        let speeds = crate::population::SpeedModel::LogNormal {
            median: 200.0,
            spread: 100.0,
        }
        .draw(60, 5);
        let population = Population {
            freeze,
            ..Population::default()
        };
        Environment::from_parts(reported, vec![40; 60], speeds, population, 20, 5, 2)
    }

    #[test]
    fn an_outcome_is_the_slowest_chain_and_the_weighted_kl() {
        let env = synthetic(0.0);
        let round = Round {
            counts: vec![vec![10, 0], vec![0, 10], vec![30, 0]],
            expected: vec![Some(1.0), Some(2.0), Some(3.0)],
            truth: vec![vec![1.0, 1.0], vec![2.0, 8.0], vec![3.0, 3.0]],
        };
        let outcome = env.outcome(&round, &[vec![0, 1], vec![2]]);
        // Chains: 1 + 1 + 2 + 8 = 12 s and 6 s; balanced: 6 s x 2 passes
        // over 2 chains = 6 s. KL: the first chain is uniform (0), the
        // second all one class (ln 2), weighted 20 : 30.
        assert_eq!(outcome.seconds, 12.0);
        assert_eq!(outcome.balanced, 6.0);
        assert!((outcome.kl - 0.6 * std::f64::consts::LN_2).abs() < 1e-12);
        assert!((outcome.reward(1.0) + 2f64.ln() + outcome.kl).abs() < 1e-12);
    }

    #[test]
    fn the_learner_is_reproducible_and_beats_random_groups() {
        // Prepare: a population where chain times matter (100x spread).
        let env = synthetic(0.0);
        let settings = LearnerSettings {
            iterations: 150,
            episodes: 8,
            seed: 7,
            ..LearnerSettings::default()
        };

        // Execute
        let mut first_rewards = Vec::new();
        let policy =
            train_policy(&env, &settings, &mut |_, s| first_rewards.push(s.reward)).unwrap();
        let again = train_policy(&env, &settings, &mut |_, _| {}).unwrap();

        // Assert: the same seed trains the same policy; on held-out rounds
        // it schedules better than random groups and than it did untrained.
        assert_eq!(policy, again);
        let learned = judge(&env, &learned(policy), 100, settings.shaping, 99);
        let random = judge(&env, &Scheduler::Random, 100, settings.shaping, 99);
        assert!(
            learned.reward > random.reward + 0.1,
            "learned {learned:?} against random {random:?}"
        );
        assert!(
            learned.time_ratio < random.time_ratio,
            "learned {learned:?} against random {random:?}"
        );
        let start: f64 = first_rewards[..5].iter().sum::<f64>() / 5.0;
        assert!(
            learned.reward > start,
            "{learned:?} against {start} at the start"
        );
    }

    #[test]
    fn a_round_of_one_decision_trains_a_finite_policy() {
        // One participant, one round an iteration: a batch of one step,
        // whose advantage's sample variance was 0 / 0.
        let env = Environment::from_parts(
            vec![vec![3, 4]; 5],
            vec![10; 5],
            vec![100.0; 5],
            Population::default(),
            1,
            2,
            1,
        );
        let settings = LearnerSettings {
            iterations: 3,
            episodes: 1,
            ..LearnerSettings::default()
        };
        let policy = train_policy(&env, &settings, &mut |_, _| {});
        assert!(policy.is_ok(), "{:?}", policy.err());
    }

    #[test]
    fn the_critic_sees_freezes_to_come_the_actor_does_not() {
        let env = synthetic(0.0);
        let round = Round {
            counts: vec![vec![10, 0], vec![0, 10]],
            expected: vec![Some(2.0), Some(2.0)],
            truth: vec![vec![2.0, 2.0], vec![2.0, 10.0]],
        };
        let mut board = Formation::new(&round.counts, &round.expected, 2);
        let state = env.critic_state(&round, &board);
        // Unplaced: true 16 s against 8 s expected (passes 2).
        assert_eq!(state[5], 2.0);
        let mut rows = Vec::new();
        board.observe(0, &mut rows);
        let frozen_twin = Round {
            truth: vec![vec![2.0, 2.0], vec![2.0, 2.0]],
            ..round.clone()
        };
        let mut twin = Formation::new(&frozen_twin.counts, &frozen_twin.expected, 2);
        let mut twin_rows = Vec::new();
        twin.observe(0, &mut twin_rows);
        assert_eq!(
            rows, twin_rows,
            "the actor's view does not depend on the truth"
        );
    }
}
