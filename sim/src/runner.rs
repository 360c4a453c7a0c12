//! The simulated round loop: pick participants, let the strategy group
//! them, run the groups' chains in parallel, aggregate, evaluate, record.

use std::borrow::Cow;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use astraea_core::asynchronous::Mode;
use astraea_core::attack::Attack;
use astraea_core::data::Dataset;
use astraea_core::engine::buffered::Versions;
use astraea_core::engine::chain::{Judgement, Verdict};
use astraea_core::engine::draw::{Candidate, Standing, draw};
use astraea_core::engine::round::{close, largest_group, secure_chain, simulated_unmasking};
use astraea_core::engine::seeds::{self, mix};
use astraea_core::engine::suspects::MaskerSuspects;
use astraea_core::engine::{
    Chain, ChainRules, Closed, Effect, HopTally, Next, RoundPrivacy, SecureChain,
};
use astraea_core::guard::{GuardRefusal, UpdateGuard};
use astraea_core::model::ModelConfig;
use astraea_core::partition::kl_to_uniform;
use astraea_core::privacy::{HopPrivacy, noisy_counts, planned_counts, private_masked_hop};
use astraea_core::protocol::{WeightEncoding, round_as_sent};
use astraea_core::strategy::{Group, GroupFailure, GroupResult, Participant, Strategy};
use astraea_core::train::{self, EvalStats, Samples, TrainConfig};
use astraea_core::validation::LossCheck;
use astraea_core::weights::Weights;
use burn::prelude::*;
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;

use crate::config::{RunSpec, SimConfig};
use crate::federation::{ClientData, Federation, client_id};
use crate::population::Population;
use crate::traffic::{Traffic, plan_exchange_bytes};
use crate::trainer::{Engine, HopJob, Trainer};
use astraea_core::metrics::{RoundRecord, RunHistory};

/// The seeds of one chain's draws (`astraea_core::engine::seeds`): the
/// chain numbered `chain` of round `round` (the global version + 1 it
/// starts from) of the run seeded `run`, as the server numbers them.
#[derive(Debug, Clone, Copy)]
struct ChainSeed {
    run: u64,
    round: u32,
    chain: u64,
}

impl ChainSeed {
    /// The seeds of a synchronous round's `chains` chains, by index.
    fn of_round(run: u64, round: u32, chains: usize) -> Vec<Self> {
        (0..chains)
            .map(|index| Self {
                run,
                round,
                chain: index as u64,
            })
            .collect()
    }

    /// The seed of the hop of the client at index `member` on pass `pass`:
    /// its training, and here its simulated time and freezing too.
    fn hop(self, member: usize, pass: usize) -> u64 {
        seeds::hop(
            self.run,
            self.round,
            self.chain,
            client_id(member),
            pass as u32,
        )
    }

    /// The seed of the chain's per-hop noise (a served chain draws it from
    /// the operating system).
    fn noise(self) -> u64 {
        mix(&[self.run, 0x401e, u64::from(self.round), self.chain])
    }
}

/// A run's clients: their data, what they report to the server and how
/// fast they train.
pub struct RunClients {
    /// Every client's data, the strategy's data plan applied.
    pub federation: Federation,
    /// What each client reports after the plan: the counts it holds, or
    /// under label DP the plan applied to its noisy report.
    pub reported: Vec<Vec<usize>>,
    /// Each client's training speed, samples per second.
    pub speeds: Vec<f64>,
}

/// The clients of `spec`'s run on `partition`: the data plan `strategy`
/// makes from their (possibly noisy) reports applied, their post-plan
/// reports and their speeds, all seeded by the run's seed.
///
/// # Errors
/// Label-DP noise that cannot be drawn, or a plan that cannot be applied.
pub fn clients_for(
    config: &SimConfig,
    spec: &RunSpec,
    train: &Dataset,
    partition: &astraea_core::partition::Partition,
    strategy: &dyn Strategy,
    progress: &ProgressBar,
    start: Instant,
) -> anyhow::Result<RunClients> {
    let raw_counts = Federation::raw_counts(train, partition);
    // What the clients report: their counts, or under label DP noisy ones.
    let reported_raw = match config.label_epsilon {
        Some(epsilon) => raw_counts
            .iter()
            .map(|counts| noisy_counts(counts, epsilon))
            .collect::<Result<Vec<_>, _>>()
            .context("noising the label counts")?,
        None => raw_counts.clone(),
    };
    let plan = strategy.data_plan(&reported_raw);
    let federation = Federation::build(train, partition, plan, spec.seed)?;
    progress.suspend(|| {
        eprintln!(
            "{}: {} clients holding {} samples as index lists, set up in {:.2} s",
            spec.label(),
            federation.clients.len(),
            federation.total_samples(),
            start.elapsed().as_secs_f64()
        )
    });
    // Their post-plan reports: the counts they hold, or under label DP the
    // plan applied to their noisy report.
    let reported: Vec<Vec<usize>> = match (config.label_epsilon, &federation.plan) {
        (None, _) => federation
            .clients
            .iter()
            .map(|c| c.counts.clone())
            .collect(),
        (Some(_), Some(plan)) => reported_raw
            .iter()
            .map(|counts| planned_counts(counts, &plan.ratios))
            .collect(),
        (Some(_), None) => reported_raw,
    };
    if let Some(plan) = &federation.plan {
        let counts = federation.global_counts();
        progress.suspend(|| {
            eprintln!(
                "{}: data plan R = {:.2?}; post-plan global counts {:?}, global KL {:.3}",
                spec.label(),
                plan.ratios,
                counts,
                kl_to_uniform(&counts)
            )
        });
    }

    let speeds = config
        .population
        .speeds
        .draw(federation.clients.len(), mix(&[spec.seed, 0x5eed5]));
    Ok(RunClients {
        federation,
        reported,
        speeds,
    })
}

/// Runs one simulated federation from scratch and returns its history.
pub fn run(
    config: &SimConfig,
    spec: &RunSpec,
    train: &Dataset,
    test: &Dataset,
    progress: &ProgressBar,
) -> anyhow::Result<RunHistory> {
    run_with_model(config, spec, train, test, progress).map(|(history, _)| history)
}

/// [`run`], also returning the global model the run ended with.
pub fn run_with_model(
    config: &SimConfig,
    spec: &RunSpec,
    train: &Dataset,
    test: &Dataset,
    progress: &ProgressBar,
) -> anyhow::Result<(RunHistory, Weights)> {
    run_probed(config, spec, train, test, progress, None)
}

/// Which rounds of a run are played again with other schedulers, and
/// which ([`probe_schedules`]).
#[derive(Debug, Clone, Copy)]
pub struct Probe<'a> {
    /// The schedulers, each with its name for a table.
    pub schedulers: &'a [(String, astraea_core::astraea::Scheduler)],
    /// The rounds (1-based) probed.
    pub rounds: &'a [u32],
}

/// One probed round played with one scheduler: what the round would have
/// come to had that scheduler formed its mediators.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbedSchedule {
    /// The round.
    pub round: u32,
    /// The scheduler's name.
    pub scheduler: String,
    /// Test accuracy of the global model the round starts from, 0..1.
    pub accuracy_before: f64,
    /// Test accuracy after the round with this scheduler's mediators.
    pub accuracy: f64,
    /// Test loss before and after.
    pub loss_before: f64,
    /// Test loss after the round.
    pub loss: f64,
    /// The round's time on the federation's clock (its slowest chain,
    /// freezes included), seconds.
    pub seconds: f64,
    /// The time the participants' expected hop times would take split
    /// evenly over the mediators, seconds.
    pub balanced: f64,
    /// The mediators' sample-weighted KL to uniform of their reported
    /// label mixes, nats.
    pub kl: f64,
}

impl ProbedSchedule {
    /// What the round gained per second of the federation's clock: test
    /// accuracy points (0..1) per second.
    pub fn gain_per_second(&self) -> f64 {
        (self.accuracy - self.accuracy_before) / self.seconds.max(1e-9)
    }

    /// What the round took off the test loss per second of the
    /// federation's clock (nats per second).
    pub fn loss_drop_per_second(&self) -> f64 {
        (self.loss_before - self.loss) / self.seconds.max(1e-9)
    }
}

/// Runs `spec`'s federation as [`run`] does and, in each round of
/// `probe.rounds`, before the round is played as the run's own scheduler
/// plays it, plays it from the same global model with the same
/// participants, chain seeds and freezes once with each of
/// `probe.schedulers` (trained, aggregated, evaluated, then thrown away),
/// so schedules can be ranked by what they gain on the full simulator
/// (the learned scheduler's surrogate reward is checked against these).
/// The probes' hops are judged by the run's defence as the round's own
/// are, each replay starting from the defence as the round found it, and
/// the defence is put back after each (its windows, standings, dropped
/// clients): the run's own rounds, also answered, are the unprobed run's.
///
/// # Errors
/// As [`run`]; also a run with secure aggregation or client-level DP
/// (a probe would spend the privacy budget), or the asynchronous mode
/// (no rounds to play again).
pub fn probe_schedules(
    config: &SimConfig,
    spec: &RunSpec,
    train: &Dataset,
    test: &Dataset,
    probe: Probe<'_>,
) -> anyhow::Result<(RunHistory, Vec<ProbedSchedule>)> {
    anyhow::ensure!(
        !config.secure_aggregation && config.model_privacy.is_none(),
        "probing schedules replays rounds: not with secure aggregation or DP"
    );
    anyhow::ensure!(
        config.schedule.mode == Mode::Sync,
        "probing schedules replays rounds: the synchronous mode only"
    );
    let probed = Mutex::new(Vec::new());
    let (history, _) = run_probed(
        config,
        spec,
        train,
        test,
        &ProgressBar::hidden(),
        Some((probe, &probed)),
    )?;
    Ok((history, probed.into_inner().expect("no probe panicked")))
}

/// [`run_with_model`], probing schedules where asked.
fn run_probed(
    config: &SimConfig,
    spec: &RunSpec,
    train: &Dataset,
    test: &Dataset,
    progress: &ProgressBar,
    probe: Option<(Probe<'_>, &Mutex<Vec<ProbedSchedule>>)>,
) -> anyhow::Result<(RunHistory, Weights)> {
    let start = Instant::now();
    config.policy().validate()?;
    config.numbers().validate()?;
    let partition = crate::federation::partition_for(config, spec, train, test)
        .with_context(|| format!("partitioning for {}", spec.label()))?;
    let report = partition.report(&train.labels, train.num_classes());
    progress.suspend(|| {
        eprintln!(
            "{}: {} samples on {} clients (sizes {}/{}/{} min/median/max), global counts {:?}, \
         global KL {:.3}, mean client KL {:.3}",
            spec.label(),
            partition.num_samples(),
            partition.clients.len(),
            report.client_sizes.min,
            report.client_sizes.median,
            report.client_sizes.max,
            report.global_counts,
            report.global_kl,
            report.mean_client_kl,
        )
    });
    let test = test.subset(&partition.test_indices);
    let strategy = spec.strategy(config);
    let RunClients {
        federation,
        reported,
        speeds,
    } = clients_for(
        config,
        spec,
        train,
        &partition,
        strategy.as_ref(),
        progress,
        start,
    )?;

    let model_config = ModelConfig::for_dataset(train);
    let global = Weights::from_model(&model_config.init_seeded(&Device::flex(), spec.seed));

    // Every client reports its counts once; a planning strategy answers with
    // its plan (and the client reports its post-plan counts again).
    let mut traffic = Traffic::default();
    let exchange = plan_exchange_bytes(train.num_classes());
    let reports = if federation.plan.is_some() { 2 } else { 1 };
    traffic.up += exchange * reports * config.clients as u64;
    if federation.plan.is_some() {
        traffic.down += exchange * config.clients as u64;
    }

    let train_config = TrainConfig {
        epochs: config.epochs,
        batch_size: config.batch_size,
        learning_rate: config.learning_rate,
        prox_mu: 0.0,
        seed: 0,
    };
    let history = RunHistory {
        label: spec.label(),
        strategy: spec.name(),
        seed: spec.seed,
        rounds: Vec::with_capacity(config.rounds as usize),
    };
    let mut rng = StdRng::seed_from_u64(mix(&[spec.seed, 0x5e1ec7]));
    let loss_check = (config.guard.validation_samples > 0).then(|| {
        let mut draw = StdRng::seed_from_u64(seeds::validation(spec.seed));
        let picked = sample(
            &mut draw,
            train.len(),
            config.guard.validation_samples.min(train.len()),
        );
        LossCheck::new(
            model_config.clone(),
            &train.subset(&picked.into_vec()),
            config.guard.max_loss_increase,
        )
    });
    let defence = Defence::new(config, federation.clients.len(), spec.seed, loss_check);
    let setup = Setup {
        config,
        train,
        spec,
        strategy,
        federation,
        reported,
        model_config,
        test,
        train_config,
        speeds,
        defence,
        start,
        progress,
        probe,
    };
    let mut state = RunState {
        global,
        privacy: config.model_privacy.map(|dp| {
            RoundPrivacy::new(
                dp,
                None,
                config.distributed_dp && config.secure_aggregation,
                config.policy().sampling_rate(),
            )
        }),
        traffic,
        history,
        train_samples: 0,
        train_s: 0.0,
        hops: HopTally::default(),
    };
    match config.schedule.mode {
        Mode::Sync => sync_rounds(&setup, &mut state, &mut rng)?,
        Mode::Async => async_rounds(&setup, &mut state, &mut rng)?,
    }
    Ok((state.history, state.global))
}

/// What a run is made of once set up; the round loops only read it.
struct Setup<'a> {
    config: &'a SimConfig,
    /// The training set the clients' indices point into.
    train: &'a Dataset,
    spec: &'a RunSpec,
    strategy: Box<dyn Strategy>,
    federation: Federation,
    /// Each client's post-plan label counts as the server knows them.
    reported: Vec<Vec<usize>>,
    model_config: ModelConfig,
    test: Dataset,
    train_config: TrainConfig,
    /// Each client's training speed, samples per second.
    speeds: Vec<f64>,
    defence: Defence,
    start: Instant,
    progress: &'a ProgressBar,
    /// Rounds to play again with other schedulers, and where their
    /// outcomes go ([`probe_schedules`]).
    probe: Option<(Probe<'a>, &'a Mutex<Vec<ProbedSchedule>>)>,
}

/// What a run's rounds change.
struct RunState {
    global: Weights,
    /// Client-level DP: the mechanism, the clip of the next round (moving
    /// under adaptive clipping) and what the run has spent.
    privacy: Option<RoundPrivacy>,
    traffic: Traffic,
    history: RunHistory,
    train_samples: u64,
    train_s: f64,
    /// How the hops of the chains since the last record ended.
    hops: HopTally,
}

impl Setup<'_> {
    /// Client `id` as the strategy sees it, with the hop time a server
    /// would have measured of it.
    fn participant(&self, id: usize) -> Participant {
        let config = self.config;
        Participant {
            id,
            counts: self.reported[id].clone(),
            hop_seconds: Some(config.population.hop_s(
                (self.federation.clients[id].len() as u64).saturating_mul(config.epochs as u64),
                self.speeds[id],
            )),
        }
    }

    /// Up to `c` clients drawn with `rng` by the engine's draw (as the
    /// server draws its ready clients), leaving out those `busy` in a
    /// chain and those dropped for the run (a refused client's socket is
    /// closed: it is no longer among a server's candidates).
    fn draw(&self, busy: &[bool], round: u32, rng: &mut StdRng) -> Vec<Participant> {
        let candidates: Vec<Candidate> = (0..self.federation.clients.len())
            .filter(|&id| !self.defence.is_dropped(id))
            .map(|id| Candidate {
                participant: self.participant(id),
                paused: false,
                silent: false,
                busy: busy[id],
                benched: self.defence.benched(id, round),
            })
            .collect();
        draw(&candidates, self.config.participants, rng)
    }

    /// What every chain shares, starting from `global`.
    fn context<'a>(
        &'a self,
        global: &'a Weights,
        train_config: &'a TrainConfig,
        trainer: &'a Trainer<'a>,
    ) -> RoundContext<'a> {
        RoundContext {
            train: self.train,
            clients: &self.federation.clients,
            model_config: &self.model_config,
            global,
            train_config,
            defence: &self.defence,
            population: &self.config.population,
            speeds: &self.speeds,
            hop_privacy: self.config.hop_privacy,
            encoding: self.config.encoding,
            trainer,
            secure: None,
        }
    }

    /// Evaluates the global model and records round `round`, reached at
    /// `clock_s` on the federation's clock, trained by `mediators` (empty
    /// in the asynchronous mode).
    fn record(
        &self,
        state: &mut RunState,
        round: usize,
        (mean_kl, mediators): (f64, &[Group]),
        clock_s: f64,
    ) -> anyhow::Result<()> {
        let epsilon = state.privacy.as_ref().map(RoundPrivacy::epsilon);
        let eval = evaluate_parallel(
            &self.model_config,
            &state.global,
            &self.test,
            self.config.threads,
            self.config.trainer.engine,
        )?;
        state.history.rounds.push(RoundRecord {
            round,
            accuracy: eval.accuracy,
            loss: eval.loss,
            bytes_up: state.traffic.up,
            bytes_down: state.traffic.down,
            mean_kl,
            wall_s: self.start.elapsed().as_secs_f64(),
            train_samples: state.train_samples,
            train_s: state.train_s,
            clock_s,
            epsilon,
            mediators: mediators
                .iter()
                .map(|g| g.members.iter().map(|&m| client_id(m)).collect())
                .collect(),
            hops: std::mem::take(&mut state.hops),
        });
        let status = format!(
            "{} round {round}: {:.2}%",
            self.spec.label(),
            eval.accuracy * 100.0
        );
        // Without a terminal the bar is hidden; keep a trace in the log.
        if self.progress.is_hidden()
            && (round.is_multiple_of(10) || round == self.config.rounds as usize)
        {
            eprintln!("{status}");
        }
        self.progress.set_message(status);
        self.progress.inc(1);
        Ok(())
    }
}

/// The papers' rounds: `c` participants drawn, grouped, their chains run
/// from one global model, the round ends with its slowest chain.
fn sync_rounds(setup: &Setup<'_>, state: &mut RunState, rng: &mut StdRng) -> anyhow::Result<()> {
    let Setup {
        config,
        spec,
        strategy,
        federation,
        ..
    } = setup;
    let num_params = state.global.len();
    let mut clock_s = 0.0;
    for round in 1..=config.rounds as usize {
        let mut draw_rng = StdRng::seed_from_u64(seeds::round_draw(spec.seed, round as u32));
        let participants = setup.draw(
            &vec![false; federation.clients.len()],
            round as u32,
            &mut draw_rng,
        );
        // As on the server, a round that would spend more than the budget
        // does not start (the simulator's DP has none: its noise is
        // calibrated to spend its epsilon over the rounds asked for).
        if let Some(Err(detail)) = state
            .privacy
            .as_ref()
            .map(|p| p.budget_allows(round as u32))
        {
            setup
                .progress
                .suspend(|| eprintln!("{}: {detail}", spec.label()));
            break;
        }
        if let Some((probe, probed)) = setup.probe
            && probe.rounds.contains(&(round as u32))
        {
            let found = probe_round(setup, state, &participants, round as u32, probe)?;
            probed.lock().expect("no probe panicked").extend(found);
        }
        let round_plan = strategy.configure_round(&participants);
        let mean_kl = mean_group_kl(&round_plan.groups, &federation.clients);
        for group in &round_plan.groups {
            for _ in 0..group.passes * group.members.len() {
                state.traffic.add_hop(num_params, config.encoding);
            }
        }
        let round_train = TrainConfig {
            prox_mu: round_plan.prox_mu,
            ..setup.train_config.clone()
        };
        let training = Instant::now();
        let starts = vec![&state.global; round_plan.groups.len()];
        let seeds = ChainSeed::of_round(spec.seed, round as u32, round_plan.groups.len());
        let quorum = secure_quorum(config, &round_plan.groups, round)?;
        let largest = largest_group(&round_plan.groups);
        // As on the server, a secure round whose chains' settings cannot
        // be made trains nothing, and is dropped.
        let secure = quorum
            .map(|quorum| secure_chain(state.privacy.as_ref(), &round_plan.groups, quorum))
            .transpose();
        let groups = match &secure {
            Ok(_) => &round_plan.groups[..],
            Err(_) => &[],
        };
        let trainer = Trainer::new(config.trainer, &setup.model_config);
        let context = RoundContext {
            secure: secure.clone().ok().flatten(),
            ..setup.context(&state.global, &round_train, &trainer)
        };
        let (results, failures, processed, round_clock) = run_chains(
            groups,
            &starts,
            &seeds,
            &context,
            config.threads,
            &mut state.hops,
        );
        // The simulator stands in for the masking protocol: what the
        // server would unmask (every result weighs the same under DP).
        let unmasked = match secure {
            Err(reason) => Some(Err(reason)),
            Ok(_) => {
                quorum.map(|quorum| simulated_unmasking(&results, quorum, state.privacy.is_some()))
            }
        };
        let clip = state.privacy.as_ref().map(|p| p.clip);
        let (closed, norms) = close(
            strategy.as_ref(),
            &state.global.values,
            (&results, &failures),
            state.privacy.as_mut().map(|p| (p, largest)),
            unmasked,
            (&setup.defence.guard, setup.defence.loss_check.as_ref()),
            rng,
        );
        if let (Some(clip), Some(median)) = (clip, norms.get(norms.len() / 2))
            && (round == 1 || round.is_multiple_of(10))
        {
            setup.progress.suspend(|| {
                eprintln!(
                    "{} round {round}: median group update norm {median:.3}, clip {clip:.3}",
                    spec.label(),
                )
            });
        }
        if quorum.is_some() {
            // The maskers whose results the (simulated) sum holds: each
            // group's last member, as on the server.
            let maskers: Vec<u64> = results
                .iter()
                .filter_map(|r| groups.get(r.group)?.members.last().map(|&m| m as u64))
                .collect();
            setup
                .defence
                .secure_round_closed(&maskers, &closed, round as u32);
        }
        if let Closed::Adopted(values) = closed {
            state.global.values = values;
        }
        state.train_samples += processed;
        clock_s += round_clock;
        state.train_s += training.elapsed().as_secs_f64();
        setup.record(state, round, (mean_kl, &round_plan.groups), clock_s)?;
    }
    Ok(())
}

/// Plays round `round` from the run's global model with `participants`
/// once with each of `probe`'s schedulers ([`probe_schedules`]).
fn probe_round(
    setup: &Setup<'_>,
    state: &RunState,
    participants: &[Participant],
    round: u32,
    probe: Probe<'_>,
) -> anyhow::Result<Vec<ProbedSchedule>> {
    let config = setup.config;
    let evaluate = |weights: &Weights| {
        evaluate_parallel(
            &setup.model_config,
            weights,
            &setup.test,
            config.threads,
            config.trainer.engine,
        )
    };
    let before = evaluate(&state.global)?;
    let expected: f64 = participants.iter().filter_map(|p| p.hop_seconds).sum();
    let mut found = Vec::with_capacity(probe.schedulers.len());
    for (name, scheduler) in probe.schedulers {
        // Every replay starts from the defence as the round finds it, and
        // leaves it so: the run goes on as if never probed.
        let memory = setup.defence.snapshot();
        let replayed = replay(setup, state, participants, round, scheduler);
        setup.defence.restore(memory);
        let (plan, seconds, after) = replayed;
        let eval = evaluate(&after)?;
        // The mediators as the policy's reward sees them: their label
        // mixes as the server knows them, their expected times.
        let members: Vec<&[usize]> = plan.groups.iter().map(|g| g.members.as_slice()).collect();
        let passes = plan.groups.first().map_or(1, |g| g.passes.max(1));
        let outcome =
            crate::scheduling::Outcome::of(seconds, (expected, passes), &setup.reported, &members);
        found.push(ProbedSchedule {
            round,
            scheduler: name.clone(),
            accuracy_before: before.accuracy,
            accuracy: eval.accuracy,
            loss_before: before.loss,
            loss: eval.loss,
            seconds,
            balanced: outcome.balanced,
            kl: outcome.kl,
        });
    }
    Ok(found)
}

/// Round `round` played from the run's global model with `participants`
/// and `scheduler`'s mediators (the run's chain seeds and freezes): the
/// round's plan, its time on the federation's clock and the model it
/// makes (the global model again if there is no aggregate or it breaks
/// the bounds `engine::round::close` drops a round for, as a round that is
/// not adopted).
fn replay(
    setup: &Setup<'_>,
    state: &RunState,
    participants: &[Participant],
    round: u32,
    scheduler: &astraea_core::astraea::Scheduler,
) -> (astraea_core::strategy::RoundPlan, f64, Weights) {
    let mut config = setup.config.clone();
    config.scheduler = scheduler.clone();
    let strategy = setup.spec.strategy(&config);
    let plan = strategy.configure_round(participants);
    let train_config = TrainConfig {
        prox_mu: plan.prox_mu,
        ..setup.train_config.clone()
    };
    let trainer = Trainer::new(config.trainer, &setup.model_config);
    let context = setup.context(&state.global, &train_config, &trainer);
    let starts = vec![&state.global; plan.groups.len()];
    let seeds = ChainSeed::of_round(setup.spec.seed, round, plan.groups.len());
    let (results, failures, _, seconds) = run_chains(
        &plan.groups,
        &starts,
        &seeds,
        &context,
        config.threads,
        &mut HopTally::default(),
    );
    let after = match strategy.aggregate(&state.global.values, &results, &failures) {
        Some(values) if astraea_core::protocol::limits::check_weights(&values).is_ok() => Weights {
            values,
            ..state.global.clone()
        },
        _ => state.global.clone(),
    };
    (plan, seconds, after)
}

/// Under secure aggregation, the fewest of the round's maskers (one per
/// group) whose results can be unmasked (`SecAggParams::quorum` of
/// `secure_quorum`); `None` without secure aggregation.
///
/// # Errors
/// No groups, or more than `secagg::MAX_MASKERS` (as the server refuses
/// them).
fn secure_quorum(
    config: &SimConfig,
    groups: &[Group],
    round: usize,
) -> anyhow::Result<Option<usize>> {
    if !config.secure_aggregation {
        return Ok(None);
    }
    let params = astraea_core::secagg::SecAggParams::quorum(
        round as u32,
        groups.len() as u32,
        config.secure_quorum,
    )
    .with_context(|| format!("secure aggregation of {} groups", groups.len()))?;
    Ok(Some(params.min_survivors()))
}

/// A mediator running in the asynchronous mode.
struct Running {
    /// When it finishes on the federation's clock.
    finish: f64,
    /// The order it started in (ties on `finish` go to the earlier).
    order: u64,
    group: Group,
    /// The global version it started from.
    start_version: u64,
}

impl PartialEq for Running {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for Running {}
impl PartialOrd for Running {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Running {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.finish
            .total_cmp(&other.finish)
            .then(self.order.cmp(&other.order))
    }
}

/// The asynchronous mode (`astraea_core::asynchronous`, FedBuff-style),
/// by the engine's rules as the server runs it (`engine::buffered`): as
/// many groups run at once as a synchronous round would form of the ready
/// clients; whenever one ends and an average group's worth of clients is
/// free, the strategy forms a new group of up to `c` drawn among the free
/// ones (so Astraea still balances labels, with the pick of `c` clients
/// for every mediator) and it starts from the global model of that moment.
/// Ended groups fill the buffer (results with their staleness weight,
/// failures counting too); every `buffer` of them make a new version,
/// evaluated and recorded as a round: `rounds` counts versions.
///
/// Times come from the population model (a group's time does not depend
/// on its weights): each group's end is known when it starts, and groups
/// end in that order on the federation's clock; each is trained as it
/// ends, from the version it started from.
fn async_rounds(setup: &Setup<'_>, state: &mut RunState, rng: &mut StdRng) -> anyhow::Result<()> {
    use std::cmp::Reverse;
    use std::collections::{BTreeMap, BinaryHeap};

    let Setup {
        config,
        spec,
        strategy,
        federation,
        ..
    } = setup;
    let clients = federation.clients.len();
    let num_params = state.global.len();
    let mut busy = vec![false; clients];
    // As the server: one generator for the run's draws.
    let mut draw_rng = StdRng::seed_from_u64(seeds::async_draw(spec.seed, 1));
    let mut versions = Versions::new(config.schedule.buffer, config.schedule.max_staleness, 0);
    // The weights of each version a running group started from.
    let mut starts: BTreeMap<u64, Weights> = BTreeMap::from([(0, state.global.clone())]);
    let mut running: BinaryHeap<Reverse<Running>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut now = 0.0;
    let mut prox_mu = None;
    while versions.version() < u64::from(config.rounds) {
        // Size the run to the ready clients and start the groups it wants.
        let round = u32::try_from(versions.version() + 1).unwrap_or(u32::MAX);
        let everyone = setup.draw(&vec![false; clients], round, &mut draw_rng);
        let plan = strategy.configure_round(&everyone);
        let prox_mu = *prox_mu.get_or_insert(plan.prox_mu);
        versions.size(everyone.len(), plan.groups.len());
        while versions.wants_group(running.len()) {
            let free = setup.draw(&busy, round, &mut draw_rng);
            if !versions.may_start(running.len(), free.len()) {
                break;
            }
            let Some(group) = strategy.configure_round(&free).groups.into_iter().next() else {
                break;
            };
            for &m in &group.members {
                busy[m] = true;
            }
            for _ in 0..group.passes * group.members.len() {
                state.traffic.add_hop(num_params, config.encoding);
            }
            let seed = ChainSeed {
                run: spec.seed,
                round: u32::try_from(versions.version() + 1).unwrap_or(u32::MAX),
                chain: order,
            };
            running.push(Reverse(Running {
                finish: now + chain_seconds(&group, setup, seed),
                order,
                group,
                start_version: versions.version(),
            }));
            order += 1;
        }
        // The next group to end; none running and none startable ends the
        // run.
        let Some(Reverse(done)) = running.pop() else {
            break;
        };
        now = done.finish;
        for &m in &done.group.members {
            busy[m] = false;
        }
        let round_train = TrainConfig {
            prox_mu,
            ..setup.train_config.clone()
        };
        let start = &starts[&done.start_version];
        let training = Instant::now();
        let trainer = Trainer::new(config.trainer, &setup.model_config);
        let seed = ChainSeed {
            run: spec.seed,
            round: u32::try_from(done.start_version + 1).unwrap_or(u32::MAX),
            chain: done.order,
        };
        let (mut results, mut failures, processed, _) = run_chains(
            std::slice::from_ref(&done.group),
            &[start],
            &[seed],
            &setup.context(&state.global, &round_train, &trainer),
            1,
            &mut state.hops,
        );
        state.train_samples += processed;
        state.train_s += training.elapsed().as_secs_f64();
        let outcome = match (results.pop(), failures.pop()) {
            (Some(result), _) => Ok(result),
            (None, Some(failure)) => Err(failure),
            (None, None) => continue,
        };
        let kl = mean_group_kl(std::slice::from_ref(&done.group), &federation.clients);
        let start = start.values.clone();
        versions.ended(
            &state.global.values,
            &start,
            done.start_version,
            outcome,
            kl,
        );
        if !versions.due() {
            continue;
        }
        let made = versions.take();
        let (closed, _) = close(
            strategy.as_ref(),
            &state.global.values,
            (&made.results, &made.failures),
            None,
            None,
            (&setup.defence.guard, setup.defence.loss_check.as_ref()),
            rng,
        );
        if let Closed::Adopted(values) = closed {
            state.global.values = values;
        }
        versions.advance();
        starts.insert(versions.version(), state.global.clone());
        // Keep only the versions a running group started from.
        let oldest = running
            .iter()
            .map(|Reverse(r)| r.start_version)
            .min()
            .unwrap_or(versions.version());
        starts.retain(|&v, _| v >= oldest.min(versions.version()));
        setup.record(state, versions.version() as usize, (made.mean_kl, &[]), now)?;
    }
    if versions.refused() > 0 {
        setup.progress.suspend(|| {
            eprintln!(
                "{}: {} results refused as too stale",
                spec.label(),
                versions.refused()
            )
        });
    }
    Ok(())
}

/// Mean over groups of the KL to uniform of the group's combined counts.
pub fn mean_group_kl(groups: &[Group], clients: &[ClientData]) -> f64 {
    if groups.is_empty() {
        return 0.0;
    }
    let total: f64 = groups
        .iter()
        .map(|g| {
            let mut combined = vec![0usize; clients[g.members[0]].counts.len()];
            for &m in &g.members {
                for (c, n) in combined.iter_mut().zip(&clients[m].counts) {
                    *c += n;
                }
            }
            kl_to_uniform(&combined)
        })
        .sum();
    total / groups.len() as f64
}

/// What every chain of a round shares.
#[derive(Clone, Copy)]
struct RoundContext<'a> {
    /// The training set the clients' indices point into.
    train: &'a Dataset,
    clients: &'a [ClientData],
    model_config: &'a ModelConfig,
    global: &'a Weights,
    train_config: &'a TrainConfig,
    defence: &'a Defence,
    population: &'a Population,
    /// Each client's training speed, samples per second.
    speeds: &'a [f64],
    /// Per-hop noise, when on.
    hop_privacy: Option<HopPrivacy>,
    /// How weights travel to and from each hop.
    encoding: WeightEncoding,
    /// Trains every hop.
    trainer: &'a Trainer<'a>,
    /// Secure aggregation: the chains' masked last hops (under DP, the
    /// round's clip split as the server splits it, and the maskers' noise
    /// under distributed DP).
    secure: Option<SecureChain>,
}

/// What one chain gives: its result and the samples it trained (or why it
/// failed), the seconds it took on the federation's clock, and how its
/// hops ended.
type ChainOutcome = (Result<(GroupResult, u64), String>, f64, HopTally);

/// Runs one group's chain: the model visits each member in order, `passes`
/// times, starting from the global weights (docs/METHOD.md, step 6).
fn run_chain(group: &Group, context: &RoundContext<'_>, seed: ChainSeed) -> ChainOutcome {
    let rules = ChainRules {
        loss_rule: context.defence.loss_check.is_some(),
        hop_privacy: context.hop_privacy,
        secure: context.secure,
    };
    let noise = StdRng::seed_from_u64(seed.noise());
    let mut chain = Chain::new(0, group, context.global.values.clone(), rules, noise);
    let mut clock = 0.0;
    let outcome = walk_chain(&mut chain, context, seed, &mut clock);
    (outcome, clock, chain.tally())
}

/// [`run_chain`]'s walk: the simulated clients answer the engine's
/// [`Chain`], which decides every rule of the chain as on the server; the
/// simulated server checks each update where it would enter (the claim
/// cap, the update guard: a client refused there is dropped for the run)
/// and gives each loss-rule verdict once the next hop has gone out, as the
/// server's arrives while the next member trains. Adds each hop's seconds
/// to `clock`.
fn walk_chain(
    chain: &mut Chain,
    context: &RoundContext<'_>,
    seed: ChainSeed,
    clock: &mut f64,
) -> Result<(GroupResult, u64), String> {
    let RoundContext {
        train,
        clients,
        model_config,
        global,
        train_config,
        defence,
        population,
        speeds,
        encoding,
        trainer,
        ..
    } = *context;
    let mut processed = 0u64;
    // The loss rule at work on the last hop taken. As on the server, its
    // verdict comes once the next hop has gone out: the rule judges while
    // the next member trains (a verdict takes milliseconds, a hop
    // seconds), so the next hop trained on the judged update and is
    // discarded if the verdict refuses it.
    let mut judging: Option<Judgement> = None;
    let round = seed.round;
    let judge = |chain: &mut Chain, judgement: Judgement| -> Option<Judgement> {
        let verdict = defence.judge(&judgement);
        next_judgement(defence.note(chain.verdict(judgement.ordinal, verdict), round))
    };
    loop {
        let hop = match chain.poll() {
            Next::Train(hop) => hop,
            Next::Done(outcome) => {
                return outcome.map(|r| (r, processed)).map_err(|f| f.reason);
            }
            Next::Verdict => match judging.take() {
                Some(judgement) => {
                    judging = judge(chain, judgement);
                    continue;
                }
                None => return Err("a verdict was due with none being judged".into()),
            },
            // Every hop's outcome is given as it is trained (below).
            Next::Outcome => return Err("a hop's outcome was lost".into()),
        };
        if let Some(judgement) = judging.take() {
            judging = judge(chain, judgement);
        }
        let (member, ordinal) = (hop.member, hop.ordinal);
        if defence.is_dropped(member) {
            chain.skipped(ordinal, "refused earlier in the run".into());
            continue;
        }
        let data = &clients[member];
        let seed = seed.hop(member, hop.pass);
        let (skip, seconds) = hop_time(population, data, speeds[member], train_config.epochs, seed);
        *clock += seconds;
        if let Some(skip) = skip {
            if skip == Skip::Late {
                defence.late(member, round);
            }
            chain.skipped(ordinal, skip.to_string());
            continue;
        }
        let config = TrainConfig {
            seed,
            ..train_config.clone()
        };
        // The member gets the weights as the wire carries them (a masked
        // hop under DP travels in f32, as the server sends it).
        let mut sent = Weights {
            shapes: global.shapes.clone(),
            values: hop.weights,
        };
        let dp_masked = hop.masked.and_then(|m| m.clip.map(|clip| (clip, m.noise)));
        if dp_masked.is_none() {
            round_as_sent(&mut sent.values, encoding);
        }
        let attack = defence.attack_of(member);
        let labels = match &attack {
            Some(attack) => {
                let mut labels = data.labels.clone();
                attack.poison_labels(&mut labels, model_config.num_classes);
                Cow::Owned(labels)
            }
            None => Cow::Borrowed(&data.labels[..]),
        };
        // FedProx anchors on the round's global model; its groups are
        // single clients, so the incoming weights are the global ones.
        let mut next = if attack.is_none_or(|a| a.trains()) {
            let job = HopJob {
                weights: sent.clone(),
                images: data.images(train),
                labels,
                config,
            };
            let (next, stats) = trainer
                .train(job)
                .map_err(|e| format!("client {member}: {e}"))?;
            processed += stats.samples as u64;
            next
        } else {
            sent.clone()
        };
        // The masker clips its own hop before masking it, and under
        // distributed DP adds its share of the round's noise.
        if let Some((clip, noise)) = dp_masked {
            let mut rng = StdRng::seed_from_u64(mix(&[seed, 0xd15c]));
            private_masked_hop(&sent.values, &mut next.values, clip, noise, &mut rng)?;
        }
        // And sends its update back the same way (a masked one is summed
        // in fixed point, not rounded).
        if hop.masked.is_none() {
            round_as_sent(&mut next.values, encoding);
        }
        let mut claimed = data.len() as u64;
        if let Some(attack) = attack {
            let mut rng = StdRng::seed_from_u64(seed);
            attack.poison_weights(&sent.values, &mut next.values, &mut rng);
            claimed = attack.claimed_samples(claimed);
        }
        // The server's checks where the update enters: a claim above the
        // client's reported samples, or an update past the guard's bounds
        // (it cannot read a masked one), drops the client and skips its
        // hop; one far above the median of recent hops is refused, its
        // client kept.
        let dropped = claimed > data.len() as u64
            || match hop.masked {
                Some(_) => false,
                None => match defence.check(member, &sent.values, &next.values) {
                    Ok(_) => false,
                    Err(refusal) if !refusal.drops_client() => {
                        let reason = format!("update rejected: {refusal}");
                        judging =
                            next_judgement(defence.note(chain.refused(ordinal, reason), round));
                        continue;
                    }
                    Err(_) => true,
                },
            };
        if dropped {
            defence.drop_client(member);
            chain.skipped(ordinal, "refused: the client is dropped".into());
            continue;
        }
        judging =
            next_judgement(defence.note(chain.returned(ordinal, next.values, claimed), round));
    }
}

/// The judgement among `effects`, if any (a chain hands out one at a time).
fn next_judgement(effects: Vec<Effect>) -> Option<Judgement> {
    effects.into_iter().find_map(|effect| match effect {
        Effect::Judge(judgement) => Some(judgement),
        _ => None,
    })
}

/// What a [`Defence`] remembers ([`Defence::snapshot`]).
struct DefenceMemory {
    dropped: Vec<bool>,
    standing: Vec<Standing>,
    suspects: MaskerSuspects,
    guard: astraea_core::guard::GuardMemory,
    loss: Option<astraea_core::validation::LossMemory>,
}

/// What the simulated server knows of its clients' hostility: which clients
/// attack (chosen once, seeded) and how, the update guard every hop passes
/// (with its loss rule when there is a validation set), and the clients
/// refused so far (dropped for the rest of the run, as the server drops a
/// refused connection).
pub struct Defence {
    attack: Option<Attack>,
    attackers: Vec<bool>,
    guard: UpdateGuard,
    loss_check: Option<LossCheck>,
    dropped: Mutex<Vec<bool>>,
    /// Each client's standing with the loss rule, as the server keeps it.
    standing: Mutex<Vec<Standing>>,
    /// Maskers suspected of spoiling secure sums, as the server narrows
    /// them down (`engine::suspects`).
    suspects: Mutex<MaskerSuspects>,
}

impl Defence {
    /// `round(attackers * clients)` attackers drawn with `seed`.
    pub fn new(
        config: &SimConfig,
        clients: usize,
        seed: u64,
        loss_check: Option<LossCheck>,
    ) -> Self {
        let count = match config.attack {
            Some(_) => {
                ((config.attackers.clamp(0.0, 1.0) * clients as f64).round() as usize).min(clients)
            }
            None => 0,
        };
        let mut attackers = vec![false; clients];
        let mut rng = StdRng::seed_from_u64(mix(&[seed, 0xbad]));
        for i in sample(&mut rng, clients, count) {
            attackers[i] = true;
        }
        Self {
            attack: config.attack,
            attackers,
            guard: config.policy().guard(),
            loss_check,
            dropped: Mutex::new(vec![false; clients]),
            standing: Mutex::new(vec![Standing::default(); clients]),
            suspects: Mutex::new(MaskerSuspects::new()),
        }
    }

    /// Secure round `round` closed as `closed` with the results of
    /// `maskers` in its sum: the suspects narrow as on the server.
    fn secure_round_closed(&self, maskers: &[u64], closed: &Closed, round: u32) {
        let mut suspects = self.suspects.lock().expect("no worker panicked");
        suspects.keep_only(|id| !self.is_dropped(id as usize));
        // The one named sits secure rounds out (`sitting_out`), as on the
        // server.
        suspects.closed(maskers, closed, round);
    }

    /// Everything the defence remembers of the run's hops (dropped
    /// clients, standings, suspects, the guard's and the loss rule's
    /// windows), to put back with [`Defence::restore`].
    fn snapshot(&self) -> DefenceMemory {
        DefenceMemory {
            dropped: self.dropped.lock().expect("no judge panicked").clone(),
            standing: self.standing.lock().expect("no judge panicked").clone(),
            suspects: self.suspects.lock().expect("no judge panicked").clone(),
            guard: self.guard.memory(),
            loss: self.loss_check.as_ref().map(LossCheck::memory),
        }
    }

    /// Puts back what [`Defence::snapshot`] took.
    fn restore(&self, memory: DefenceMemory) {
        *self.dropped.lock().expect("no judge panicked") = memory.dropped;
        *self.standing.lock().expect("no judge panicked") = memory.standing;
        *self.suspects.lock().expect("no judge panicked") = memory.suspects;
        self.guard.put_back(memory.guard);
        if let (Some(check), Some(loss)) = (&self.loss_check, memory.loss) {
            check.put_back(loss);
        }
    }

    /// Client `id`'s hop in round `round` was given up as late.
    fn late(&self, id: usize, round: u32) {
        if let Some(standing) = self
            .standing
            .lock()
            .expect("no worker panicked")
            .get_mut(id)
        {
            standing.late(round);
        }
    }

    /// Whether the loss rule has benched client `id` for round `round`, or
    /// it sits the round out as a suspect of spoiled secure sums.
    fn benched(&self, id: usize, round: u32) -> bool {
        self.standing.lock().expect("no worker panicked")[id].benched(round)
            || self
                .suspects
                .lock()
                .expect("no worker panicked")
                .sitting_out(round)
                .contains(&(id as u64))
    }

    /// Takes a chain's `effects` in round `round` into its members'
    /// standing, as the server does; hands them on.
    fn note(&self, effects: Vec<Effect>, round: u32) -> Vec<Effect> {
        let mut standing = self.standing.lock().expect("no worker panicked");
        for effect in &effects {
            if let Some(s) = effect.member().and_then(|m| standing.get_mut(m)) {
                s.note(effect, round);
            }
        }
        effects
    }

    /// The attack client `id` mounts, if it is an attacker.
    pub fn attack_of(&self, id: usize) -> Option<Attack> {
        self.attack
            .filter(|_| self.attackers.get(id).copied().unwrap_or(false))
    }

    pub(crate) fn is_dropped(&self, id: usize) -> bool {
        self.dropped.lock().expect("no worker panicked")[id]
    }

    fn drop_client(&self, id: usize) {
        self.dropped.lock().expect("no worker panicked")[id] = true;
    }

    /// The update guard on one hop, as the server judges it where the
    /// update enters.
    fn check(&self, id: usize, sent: &[f32], new: &[f32]) -> Result<f64, GuardRefusal> {
        self.guard.check_client(sent, new, id as u64)
    }

    /// The loss rule's verdict on one hop (accepted when the run has
    /// no validation set).
    fn judge(&self, judgement: &Judgement) -> Verdict {
        match &self.loss_check {
            Some(check) => judgement.judge(check),
            None => Verdict::Accepted { after: f64::NAN },
        }
    }

    /// Clients refused so far.
    pub fn dropped(&self) -> usize {
        self.dropped
            .lock()
            .expect("no worker panicked")
            .iter()
            .filter(|d| **d)
            .count()
    }
}

/// Whether the hop seeded `seed` of a client holding `data` at `speed` is
/// skipped, and why (it freezes, or ends past its deadline), and the
/// seconds it holds its chain: a frozen client trains nothing and holds
/// the chain until the server gives up on it (the stall timeout, or the
/// deadline); a late one holds it until its deadline.
fn hop_time(
    population: &Population,
    data: &ClientData,
    speed: f64,
    epochs: usize,
    seed: u64,
) -> (Option<Skip>, f64) {
    let work = (data.len() as u64).saturating_mul(epochs as u64);
    if population.freezes(mix(&[seed, 0xf7ee2e])) {
        return (Some(Skip::Frozen), population.frozen_hop_s(speed, work));
    }
    // A hop past its deadline is given up, as on the server.
    let late = population.late(work, speed).then_some(Skip::Late);
    (late, population.hop_s(work, speed))
}

/// Why a simulated hop is skipped before it trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// The client froze: silent until the server gives up.
    Frozen,
    /// Its update would come after its deadline; it kept reporting
    /// progress (a strike in its standing, as on the server).
    Late,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::Frozen => "frozen",
            Skip::Late => "late: past its deadline",
        })
    }
}

/// The seconds `group`'s chain seeded `seed` will take, as [`walk_chain`]
/// will clock it, known before it trains (clients dropped by then cost
/// nothing).
fn chain_seconds(group: &Group, setup: &Setup<'_>, seed: ChainSeed) -> f64 {
    let mut clock = 0.0;
    for pass in 0..group.passes {
        for &member in &group.members {
            if setup.defence.is_dropped(member) {
                continue;
            }
            let (_, seconds) = hop_time(
                &setup.config.population,
                &setup.federation.clients[member],
                setup.speeds[member],
                setup.train_config.epochs,
                seed.hop(member, pass),
            );
            clock += seconds;
        }
    }
    clock
}

/// Runs the groups' chains on `threads` workers, each taking the next
/// group not yet started; groups are independent, like mediators on
/// separate machines. Group `i` starts from `starts[i]` with seed
/// `seeds[i]`. Returns the results (`GroupResult::group` is the index in
/// `groups`), the failures, the samples processed in training and the
/// seconds of the slowest chain on the federation's clock, and adds how
/// their hops ended to `hops`.
fn run_chains<'a>(
    groups: &[Group],
    starts: &[&'a Weights],
    seeds: &[ChainSeed],
    context: &RoundContext<'a>,
    threads: usize,
    hops: &mut HopTally,
) -> (Vec<GroupResult>, Vec<GroupFailure>, u64, f64) {
    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<(usize, ChainOutcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..context.trainer.workers(groups.len(), threads) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(group) = groups.get(index) else {
                        break;
                    };
                    let context = RoundContext {
                        global: starts[index],
                        ..*context
                    };
                    let member = context.trainer.join();
                    let outcome = run_chain(group, &context, seeds[index]);
                    drop(member);
                    outcomes
                        .lock()
                        .expect("no worker panicked")
                        .push((index, outcome));
                }
            });
        }
    });
    let mut outcomes = outcomes.into_inner().expect("no worker panicked");
    outcomes.sort_by_key(|(index, _)| *index);
    let mut results = Vec::new();
    let mut failures = Vec::new();
    let mut processed = 0;
    let mut slowest = 0.0f64;
    for (group, (outcome, clock, tally)) in outcomes {
        slowest = slowest.max(clock);
        *hops += tally;
        match outcome {
            Ok((result, samples)) => {
                results.push(GroupResult { group, ..result });
                processed += samples;
            }
            Err(reason) => failures.push(GroupFailure { group, reason }),
        }
    }
    (results, failures, processed, slowest)
}

/// Evaluates on `threads` slices of the test set at once and combines them,
/// with the engine's forward pass (the batched one's is about three times
/// as fast on the CPU).
pub fn evaluate_parallel(
    model_config: &ModelConfig,
    weights: &Weights,
    test: &Dataset,
    threads: usize,
    engine: Engine,
) -> anyhow::Result<EvalStats> {
    let n = test.len();
    let per = n.div_ceil(threads.max(1)).max(1);
    let len = test.sample_len();
    let parts: Vec<anyhow::Result<EvalStats>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|lo| {
                let hi = (lo + per).min(n);
                scope.spawn(move || {
                    let data = Samples {
                        images: &test.images[lo * len..hi * len],
                        labels: &test.labels[lo..hi],
                    };
                    Ok(match engine {
                        Engine::Batched => astraea_core::batched::evaluate(
                            model_config,
                            weights,
                            data,
                            500,
                            &Device::flex(),
                        )?,
                        Engine::PerClient => {
                            train::evaluate(model_config, weights, data, 500, &Device::flex())?
                        }
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("evaluation thread panicked"))
            .collect()
    });
    let mut correct = 0.0;
    let mut loss = 0.0;
    let mut samples = 0;
    for part in parts {
        let part = part?;
        correct += part.accuracy * part.samples as f64;
        loss += part.loss * part.samples as f64;
        samples += part.samples;
    }
    let denom = samples.max(1) as f64;
    Ok(EvalStats {
        accuracy: correct / denom,
        loss: loss / denom,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(counts: Vec<usize>) -> ClientData {
        ClientData {
            held: vec![],
            labels: vec![],
            counts,
        }
    }

    #[test]
    fn group_kl_is_taken_over_the_combined_counts() {
        // Prepare: clients 0 and 1 balance each other; client 2 is 3:1.
        let clients = vec![client(vec![10, 0]), client(vec![0, 10]), client(vec![3, 1])];
        let groups = vec![
            Group {
                members: vec![0, 1],
                passes: 2,
            },
            Group {
                members: vec![2],
                passes: 1,
            },
        ];

        // Execute
        let kl = mean_group_kl(&groups, &clients);

        // Assert: (0 + 0.130812) / 2.
        assert!((kl - 0.130_812_035_941_137 / 2.0).abs() < 1e-12, "{kl}");
    }
}
