//! The simulated round loop: pick participants, let the strategy group
//! them, run the groups' chains in parallel, aggregate, evaluate, record.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use astraea_core::attack::Attack;
use astraea_core::data::Dataset;
use astraea_core::guard::UpdateGuard;
use astraea_core::model::ModelConfig;
use astraea_core::partition::kl_to_uniform;
use astraea_core::protocol::limits::check_weights;
use astraea_core::strategy::{Group, GroupFailure, GroupResult, Participant};
use astraea_core::train::{self, EvalStats, Samples, TrainConfig};
use astraea_core::validation::LossCheck;
use astraea_core::weights::Weights;
use burn::prelude::*;
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::index::sample;

use crate::config::{RunSpec, SimConfig};
use crate::federation::{ClientData, Federation};
use crate::population::Population;
use crate::traffic::{Traffic, plan_exchange_bytes};
use astraea_core::metrics::{RoundRecord, RunHistory};

/// Mixes seeds so that each (run, round, client, pass) trains differently
/// but reproducibly.
fn mix(parts: &[u64]) -> u64 {
    parts.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &p| {
        (h ^ p).wrapping_mul(0x100_0000_01b3).rotate_left(17)
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
    let start = Instant::now();
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
    let raw_counts = Federation::raw_counts(train, &partition);
    let plan = strategy.data_plan(&raw_counts);
    let federation = Federation::build(train, &partition, plan, spec.seed)?;
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

    let model_config = ModelConfig::for_dataset(train);
    let device = Device::flex();
    device.seed(spec.seed);
    let mut global = Weights::from_model(&model_config.init(&device));
    let num_params = global.len();

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
        epochs: config.local_epochs,
        batch_size: config.batch_size,
        learning_rate: config.learning_rate,
        prox_mu: 0.0,
        seed: 0,
    };
    let mut history = RunHistory {
        label: spec.label(),
        strategy: spec.name(),
        seed: spec.seed,
        rounds: Vec::with_capacity(config.rounds),
    };
    let mut rng = StdRng::seed_from_u64(mix(&[spec.seed, 0x5e1ec7]));
    let (mut train_samples, mut train_s, mut clock_s) = (0u64, 0.0f64, 0.0f64);
    let speeds = config
        .population
        .speeds
        .draw(federation.clients.len(), mix(&[spec.seed, 0x5eed5]));
    let loss_check = (config.validation_samples > 0).then(|| {
        let mut draw = StdRng::seed_from_u64(mix(&[spec.seed, 0x7a11d]));
        let picked = sample(
            &mut draw,
            train.len(),
            config.validation_samples.min(train.len()),
        );
        LossCheck::new(
            model_config.clone(),
            global.shapes.clone(),
            &train.subset(&picked.into_vec()),
            config.max_loss_increase,
        )
    });
    let defence = Defence::new(config, federation.clients.len(), spec.seed, loss_check);
    for round in 1..=config.rounds {
        let chosen = sample(
            &mut rng,
            federation.clients.len(),
            config.participants.min(federation.clients.len()),
        );
        let participants: Vec<Participant> = chosen
            .iter()
            .map(|id| Participant {
                id,
                counts: federation.clients[id].counts.clone(),
                // What a server would have measured of it.
                hop_seconds: Some(
                    config.population.hop_s(
                        (federation.clients[id].len() as u64)
                            .saturating_mul(config.local_epochs as u64),
                        speeds[id],
                    ),
                ),
            })
            .collect();
        let round_plan = strategy.configure_round(&participants);
        let mean_kl = mean_group_kl(&round_plan.groups, &federation.clients);
        for group in &round_plan.groups {
            for _ in 0..group.passes * group.members.len() {
                traffic.add_hop(num_params);
            }
        }
        let round_train = TrainConfig {
            prox_mu: round_plan.prox_mu,
            ..train_config.clone()
        };
        let training = Instant::now();
        let context = RoundContext {
            clients: &federation.clients,
            model_config: &model_config,
            global: &global,
            train_config: &round_train,
            defence: &defence,
            population: &config.population,
            speeds: &speeds,
        };
        let (results, failures, processed, round_clock) = run_groups(
            &round_plan.groups,
            &context,
            config.threads,
            mix(&[spec.seed, round as u64]),
        );
        // As the server does: an aggregate outside the bounds is dropped
        // and the previous model kept.
        if let Some(values) = strategy.aggregate(&global.values, &results, &failures)
            && check_weights(&values).is_ok()
        {
            global.values = values;
        }
        train_samples += processed;
        clock_s += round_clock;
        train_s += training.elapsed().as_secs_f64();
        let eval = evaluate_parallel(&model_config, &global, &test, config.threads)?;
        history.rounds.push(RoundRecord {
            round,
            accuracy: eval.accuracy,
            loss: eval.loss,
            bytes_up: traffic.up,
            bytes_down: traffic.down,
            mean_kl,
            wall_s: start.elapsed().as_secs_f64(),
            train_samples,
            train_s,
            clock_s,
        });
        let status = format!(
            "{} round {round}: {:.2}%",
            spec.label(),
            eval.accuracy * 100.0
        );
        // Without a terminal the bar is hidden; keep a trace in the log.
        if progress.is_hidden() && (round % 10 == 0 || round == config.rounds) {
            eprintln!("{status}");
        }
        progress.set_message(status);
        progress.inc(1);
    }
    Ok(history)
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
    clients: &'a [ClientData],
    model_config: &'a ModelConfig,
    global: &'a Weights,
    train_config: &'a TrainConfig,
    defence: &'a Defence,
    population: &'a Population,
    /// Each client's training speed, samples per second.
    speeds: &'a [f64],
}

/// What one chain gives: its result and the samples it trained (or why it
/// failed), and the seconds it took on the federation's clock.
type ChainOutcome = (Result<(GroupResult, u64), String>, f64);

/// Runs one group's chain: the model visits each member in order, `passes`
/// times, starting from the global weights (docs/METHOD.md, step 6).
fn run_chain(
    group: &Group,
    context: &RoundContext<'_>,
    seed: u64,
    device: &Device,
) -> ChainOutcome {
    let mut clock = 0.0;
    let outcome = walk_chain(group, context, seed, device, &mut clock);
    (outcome, clock)
}

/// [`run_chain`]'s walk; adds each hop's seconds to `clock`.
fn walk_chain(
    group: &Group,
    context: &RoundContext<'_>,
    seed: u64,
    device: &Device,
    clock: &mut f64,
) -> Result<(GroupResult, u64), String> {
    let RoundContext {
        clients,
        model_config,
        global,
        train_config,
        defence,
        population,
        speeds,
    } = *context;
    let mut weights = global.clone();
    // The validation loss of `weights`, once the loss rule has computed it.
    let mut weights_loss = None;
    let eval_device = Device::flex();
    let mut processed = 0u64;
    let mut taken = vec![None; group.members.len()];
    for pass in 0..group.passes {
        for (position, &member) in group.members.iter().enumerate() {
            if defence.is_dropped(member) {
                continue;
            }
            let data = &clients[member];
            let seed = mix(&[seed, member as u64, pass as u64]);
            // A frozen client trains nothing and holds the chain until the
            // server gives up on it (the stall timeout, or the deadline).
            if population.freezes(mix(&[seed, 0xf7ee2e])) {
                *clock += population.frozen_hop_s();
                continue;
            }
            let work = (data.len() as u64).saturating_mul(train_config.epochs as u64);
            *clock += population.hop_s(work, speeds[member]);
            let config = TrainConfig {
                seed,
                ..train_config.clone()
            };
            let attack = defence.attack_of(member);
            let mut labels = data.labels.clone();
            if let Some(attack) = &attack {
                attack.poison_labels(&mut labels, model_config.num_classes);
            }
            let samples = Samples {
                images: &data.images,
                labels: &labels,
            };
            // FedProx anchors on the round's global model; its groups are
            // single clients, so the incoming weights are the global ones.
            let mut next = if attack.is_none_or(|a| a.trains()) {
                let (next, stats) = train::train(model_config, &weights, samples, &config, device)
                    .map_err(|e| format!("client {member}: {e}"))?;
                processed += stats.samples as u64;
                next
            } else {
                weights.clone()
            };
            let mut claimed = data.len() as u64;
            if let Some(attack) = attack {
                let mut rng = StdRng::seed_from_u64(seed);
                attack.poison_weights(&weights.values, &mut next.values, &mut rng);
                claimed = attack.claimed_samples(claimed);
            }
            // The server's checks: a claim above the client's reported
            // samples, or an update the guard refuses, drops the client.
            if claimed > data.len() as u64 || !defence.accepts(&weights.values, &next.values) {
                defence.drop_client(member);
                continue;
            }
            // The loss rule refuses the hop only: an honest client's hop can
            // fail it, so the client is not dropped (the server keeps its
            // connection); the chain goes on from the weights it sent.
            if !defence.loss_accepts(&weights, &mut weights_loss, &next, &eval_device) {
                continue;
            }
            weights = next;
            taken[position] = Some(claimed);
        }
    }
    if taken.iter().all(Option::is_none) {
        return Err("every hop was refused or skipped".into());
    }
    let result = GroupResult {
        group: 0,
        weights: weights.values,
        samples: taken.iter().flatten().sum(),
    };
    Ok((result, processed))
}

/// What the simulated server knows of its clients' hostility: which clients
/// attack (chosen once, seeded) and how, the update guard every hop passes
/// (with its loss rule when there is a validation set), and the clients
/// refused so far (dropped for the rest of the run, as the server drops a
/// refused connection).
pub struct Defence {
    attack: Option<Attack>,
    attackers: Vec<bool>,
    guard: Mutex<UpdateGuard>,
    loss_check: Option<LossCheck>,
    dropped: Mutex<Vec<bool>>,
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
            guard: Mutex::new(UpdateGuard::new(config.max_update_ratio, 10.0, 100, 5)),
            loss_check,
            dropped: Mutex::new(vec![false; clients]),
        }
    }

    /// The attack client `id` mounts, if it is an attacker.
    pub fn attack_of(&self, id: usize) -> Option<Attack> {
        self.attack
            .filter(|_| self.attackers.get(id).copied().unwrap_or(false))
    }

    fn is_dropped(&self, id: usize) -> bool {
        self.dropped.lock().expect("no worker panicked")[id]
    }

    fn drop_client(&self, id: usize) {
        self.dropped.lock().expect("no worker panicked")[id] = true;
    }

    fn accepts(&self, sent: &[f32], new: &[f32]) -> bool {
        self.guard
            .lock()
            .expect("no worker panicked")
            .check(sent, new)
            .is_ok()
    }

    /// The loss rule on one hop from `sent` to `new`. `sent_loss` holds the
    /// validation loss of `sent` once computed, and that of `new` after an
    /// accepted hop (the chain's next `sent`).
    fn loss_accepts(
        &self,
        sent: &Weights,
        sent_loss: &mut Option<f64>,
        new: &Weights,
        device: &Device,
    ) -> bool {
        let Some(check) = &self.loss_check else {
            return true;
        };
        let before = *sent_loss
            .get_or_insert_with(|| check.loss(&sent.values, device).unwrap_or(f64::INFINITY));
        let after = check.loss(&new.values, device).unwrap_or(f64::INFINITY);
        let accepted = check.judge(before, after).is_ok();
        if accepted {
            *sent_loss = Some(after);
        }
        accepted
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

/// Runs the groups on `threads` workers, each taking the next group not yet
/// started; groups are independent, like mediators on separate machines.
/// Returns the results, the failures, the samples processed in training
/// and the round's seconds on the federation's clock (its slowest chain).
fn run_groups(
    groups: &[Group],
    context: &RoundContext<'_>,
    threads: usize,
    seed: u64,
) -> (Vec<GroupResult>, Vec<GroupFailure>, u64, f64) {
    let next = AtomicUsize::new(0);
    let outcomes: Mutex<Vec<(usize, ChainOutcome)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let device = Device::flex().autodiff();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(group) = groups.get(index) else {
                        break;
                    };
                    let outcome = run_chain(group, context, mix(&[seed, index as u64]), &device);
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
    for (group, (outcome, clock)) in outcomes {
        slowest = slowest.max(clock);
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

/// Evaluates on `threads` slices of the test set at once and combines them.
pub fn evaluate_parallel(
    model_config: &ModelConfig,
    weights: &Weights,
    test: &Dataset,
    threads: usize,
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
                    Ok(train::evaluate(
                        model_config,
                        weights,
                        data,
                        500,
                        &Device::flex(),
                    )?)
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
            images: vec![],
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

    #[test]
    fn seeds_differ_by_every_part() {
        assert_ne!(mix(&[1, 2, 3]), mix(&[1, 2, 4]));
        assert_ne!(mix(&[1, 2]), mix(&[2, 1]));
        assert_eq!(mix(&[5, 6]), mix(&[5, 6]));
    }
}
