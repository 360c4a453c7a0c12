//! `astraea simulate`: its flags and the simulated runs they describe.

use std::path::PathBuf;

use anyhow::{Context, bail};
use astraea_core::astraea::PlanRule;
use astraea_core::attack::Attack;
use astraea_core::data::catalog::load_named;
use astraea_core::partition::PartitionSpec;
use astraea_core::protocol::WeightEncoding;
use astraea_core::robust::AggregationRule;
use astraea_sim::report;
use astraea_sim::{self as simulate, RunSpec, SimConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{GuardArgs, ScheduleArgs};
use crate::shared::{adaptive_clip, check_count_noise, print_tables};
use astraea_core::engine::hop::hop_limit;

#[derive(clap::Args)]
pub(crate) struct SimulateArgs {
    #[command(flatten)]
    guard: GuardArgs,
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// Dataset: mnist, fashion-mnist, emnist-balanced, emnist-letters.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Folder holding the datasets.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Use only the first N training samples (as `serve --max-train`):
    /// with --clients K, the federation of K demo shards of a served run.
    #[arg(long)]
    max_train: Option<usize>,
    /// Partition: iid, dirichlet:ALPHA, pathological:K,
    /// long-tail:RATIO[:LOCAL_ALPHA[:REUSE]] (REUSE: clients that may hold
    /// each sample, for populations larger than the data).
    #[arg(long, default_value = "long-tail:10")]
    partition: PartitionSpec,
    /// K: clients in the federation.
    #[arg(long, default_value_t = 500)]
    clients: usize,
    /// c: participants per round.
    #[arg(long, default_value_t = 50)]
    participants: usize,
    /// Rounds per run (in the asynchronous mode, global versions).
    #[arg(long, default_value_t = 50)]
    rounds: u32,
    /// Runs, comma separated: fedavg-iid, fedavg, fedprox, astraea, astraea-aug, astraea-sched.
    #[arg(long, value_delimiter = ',', default_value = "fedavg,astraea")]
    strategies: Vec<String>,
    /// Seeds, comma separated; every strategy runs once per seed.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    seeds: Vec<u64>,
    /// gamma: most clients per mediator.
    #[arg(long, default_value_t = 10)]
    gamma: usize,
    /// E: local epochs per visit.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// E_m: passes of a mediator over its clients per round.
    #[arg(long, default_value_t = 2)]
    mediator_passes: usize,
    #[command(flatten)]
    scheduler: crate::args::SchedulerArgs,
    /// tau_d of the z-score plan.
    #[arg(long, default_value_t = 3.5)]
    tau_d: f64,
    /// Use the older ICCD plan with this alpha instead of the z-score plan.
    #[arg(long)]
    alpha: Option<f64>,
    /// Mini-batch size.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// FedProx mu.
    #[arg(long, default_value_t = 0.01)]
    prox_mu: f64,
    /// How strategies combine results: mean (FedAvg's weighted mean),
    /// median, trimmed-mean[:TRIM], krum[:F], multi-krum[:F[:M]],
    /// centered-clipping[:RADIUS[:ITERATIONS]].
    #[arg(long, env = "ASTRAEA_AGGREGATION", default_value = "mean")]
    aggregation: AggregationRule,
    /// Hostile clients' attack: sign-flip[:SCALE], scale[:FACTOR],
    /// noise[:STD], label-flip, inflate-samples[:FACTOR].
    #[arg(long)]
    attack: Option<Attack>,
    /// Percent of the clients that attack (with --attack).
    #[arg(long, default_value_t = 0.0)]
    attackers: f64,
    /// Label counts under local differential privacy: each client adds
    /// discrete Laplace noise of scale 1/EPSILON to each count it reports
    /// (OpenDP); the plan and the mediators use the noisy counts. Noise
    /// comes from the system's entropy: such runs do not repeat exactly.
    #[arg(long)]
    label_epsilon: Option<f64>,
    /// Secure aggregation's effect on the model under --dp-epsilon: the
    /// clip is split as `serve --secure-aggregation` splits it (the chain
    /// before its masked last hop clipped to C (1 - 1/h) by the server,
    /// that hop to C / h by its client). Without DP it changes nothing.
    #[arg(long)]
    secure_aggregation: bool,
    /// Secure aggregation's quorum: the share of a round's maskers that
    /// must survive for its sum to be unmasked (at least a majority, the
    /// default). Higher tolerates fewer dropouts, takes more colluding
    /// maskers to break, and under --distributed-dp needs less noise (each
    /// masker's share is for the quorum: sqrt(1 / quorum) times the
    /// round's noise when all survive).
    #[arg(long, default_value_t = 0.5, requires = "secure_aggregation")]
    secure_quorum: f64,
    /// Distributed DP, with --secure-aggregation and --dp-epsilon: the
    /// maskers add the round's noise in shares (for the quorum that can
    /// unmask), the server none, as `serve --distributed-dp` does.
    #[arg(long, requires_all = ["secure_aggregation", "dp_epsilon"])]
    distributed_dp: bool,
    /// Per-hop noise: every hop's update is clipped to --hop-clip and
    /// Gaussian noise of this multiplier times the clip is added before the
    /// next client in the chain sees it (each hop the Gaussian mechanism).
    #[arg(long)]
    hop_noise: Option<f64>,
    /// Per-hop noise: the most one hop may move the model, L2 norm.
    #[arg(long, default_value_t = 0.5)]
    hop_clip: f64,
    /// Client-level differential privacy for the model (DP-FedAvg; for
    /// Astraea over mediators): the noise is calibrated so that the whole
    /// run spends this epsilon at --dp-delta (Renyi DP accountant; sync
    /// mode only).
    #[arg(long)]
    dp_epsilon: Option<f64>,
    /// DP: the most a group's update (a client's in FedAvg, a mediator's
    /// in Astraea) may move the model, L2 norm.
    #[arg(long, default_value_t = 1.0)]
    dp_clip: f64,
    /// DP: delta of the (epsilon, delta) guarantee.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// DP: adaptive clipping (Andrew et al. 2021): the clip follows this
    /// quantile of the groups' update norms (0.5: the median), starting
    /// from --dp-clip; the run spends what a fixed clip would.
    #[arg(long)]
    dp_adaptive_quantile: Option<f64>,
    /// DP, adaptive clipping: the standard deviation of the noise on the
    /// count of unclipped updates (default: the groups expected a round,
    /// participants over gamma, divided by 20, as the paper).
    #[arg(long)]
    dp_count_noise: Option<f64>,
    /// Weights travel as f16, as `serve --f16` sends them: every hop's
    /// input and output are rounded to f16 (half the traffic).
    #[arg(long)]
    f16: bool,
    /// The clients' training speeds for the federation clock (samples/s):
    /// uniform:SPEED or lognormal:MEDIAN:SPREAD (95th over 5th percentile;
    /// lognormal:200:100 is a 100x spread).
    #[arg(long, default_value = "uniform:200")]
    speeds: astraea_sim::population::SpeedModel,
    /// Probability, per hop, that a client freezes mid-hop (connected,
    /// silent): it trains nothing and holds its chain for the stall
    /// timeout (or the deadline).
    #[arg(long, default_value_t = 0.0)]
    freeze: f64,
    /// Seconds every hop costs besides training (transfers, model set-up).
    #[arg(long, default_value_t = 1.0)]
    hop_overhead: f64,
    /// The server's hop deadline, seconds, for the clock.
    #[arg(long, default_value_t = 60.0)]
    hop_deadline: f64,
    /// The server's stall timeout, seconds, for the clock (0: no stall
    /// rule; a frozen hop costs the deadline).
    #[arg(long, default_value_t = 8.0)]
    stall_timeout: f64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// How hops are trained: batched (hand-written forward and backward
    /// over stacked clients; the default) or per-client (burn's autodiff,
    /// as the clients train). They train the same within float rounding.
    #[arg(long, default_value = "batched")]
    engine: astraea_sim::Engine,
    /// Hops the batched engine trains as one stack: 1 lets each worker
    /// train its own (fastest on a CPU); a GPU wants hundreds or more
    /// (the round's chains then meet, up to this many).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    stack: u32,
    /// Where the batched engine computes: cpu, or gpu (burn's wgpu
    /// backend; builds with the `gpu` feature only).
    #[arg(long, default_value = "cpu")]
    device: astraea_sim::DeviceKind,
    /// Output folder for CSVs, the plot and the summary.
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Accuracy target in percent for "rounds / bytes to reach"; default: the best accuracy of the first run.
    #[arg(long)]
    target: Option<f64>,
}

/// Runs every strategy once per seed, then writes the CSVs, the plot and
/// the summary.
pub(crate) fn simulate_command(args: SimulateArgs) -> anyhow::Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = sim_config(&args, threads)?;
    let mut specs = Vec::new();
    for &seed in &args.seeds {
        for name in &args.strategies {
            specs.push(RunSpec::parse(name, seed).map_err(anyhow::Error::msg)?);
        }
    }
    if specs.is_empty() {
        bail!("no runs: give at least one strategy and one seed");
    }
    let (train, test) = load_data(&config, args.max_train)?;
    std::fs::create_dir_all(&config.out_dir)
        .with_context(|| format!("creating {}", config.out_dir.display()))?;
    eprintln!(
        "{}: {} training / {} test samples, {} classes; {} runs of {} rounds, K = {}, c = {}, {} threads",
        config.dataset,
        train.len(),
        test.len(),
        train.num_classes(),
        specs.len(),
        config.rounds,
        config.clients,
        config.participants,
        threads
    );
    let progress = ProgressBar::new(specs.len() as u64 * u64::from(config.rounds));
    progress.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} rounds, eta {eta} {msg}",
        )
        .expect("template is valid")
        .progress_chars("=> "),
    );
    let mut runs = Vec::new();
    for spec in &specs {
        let history = simulate::run(&config, spec, &train, &test, &progress)?;
        let csv = config
            .out_dir
            .join(format!("{}-s{}.csv", spec.name(), spec.seed));
        report::write_csv(&csv, &history)?;
        runs.push(history);
    }
    progress.finish();
    let title = format!(
        "{} {} (K={}, c={})",
        config.dataset, args.partition, config.clients, config.participants
    );
    let plot = config.out_dir.join("accuracy.png");
    report::plot_runs(&plot, &runs, &title)?;
    let target = config
        .target_accuracy
        .or_else(|| runs[0].rounds.iter().map(|r| r.accuracy).reduce(f64::max));
    let summary = config.out_dir.join("summary.md");
    print_tables(&runs, target, Some(&summary))?;
    println!("wrote {} and {}", plot.display(), summary.display());
    Ok(())
}

/// The simulated federation the flags describe, with `threads` workers.
pub(crate) fn sim_config(args: &SimulateArgs, threads: usize) -> anyhow::Result<SimConfig> {
    Ok(SimConfig {
        dataset: args.dataset.clone(),
        data_dir: args.data_dir.clone(),
        partition: args.partition,
        clients: args.clients,
        participants: args.participants,
        rounds: args.rounds,
        gamma: args.gamma,
        epochs: args.epochs,
        mediator_passes: args.mediator_passes,
        plan_rule: match args.alpha {
            Some(alpha) => PlanRule::Alpha { alpha },
            None => PlanRule::ZScore { tau_d: args.tau_d },
        },
        batch_size: args.batch,
        learning_rate: args.lr,
        prox_mu: args.prox_mu,
        aggregation: args.aggregation,
        attack: args.attack,
        attackers: args.attackers / 100.0,
        guard: args.guard.into(),
        scheduler: args.scheduler.scheduler(args.schedule.mode)?,
        label_epsilon: args.label_epsilon,
        secure_aggregation: args.secure_aggregation,
        secure_quorum: args.secure_quorum,
        distributed_dp: args.distributed_dp,
        hop_privacy: args
            .hop_noise
            .map(|noise_multiplier| astraea_core::privacy::HopPrivacy {
                clip: args.hop_clip,
                noise_multiplier,
            }),
        encoding: if args.f16 {
            WeightEncoding::F16
        } else {
            WeightEncoding::F32
        },
        model_privacy: match args.dp_epsilon {
            None => None,
            Some(epsilon) => {
                // The calibration below needs a valid delta; every other
                // rule is the run policy's (`RunPolicy::validate`).
                if !(args.dp_delta > 0.0 && args.dp_delta < 1.0) {
                    bail!("--dp-delta must lie between 0 and 1");
                }
                // The rate the simulator's accountant composes at (c / K).
                let q = astraea_core::engine::Sampling::Secret {
                    participants: args.participants,
                    population: args.clients,
                }
                .rate();
                let sigma = astraea_core::privacy::noise_for_epsilon(
                    q,
                    args.rounds as u64,
                    args.dp_delta,
                    epsilon,
                )
                .with_context(|| format!("no noise spends only epsilon {epsilon}"))?;
                eprintln!(
                    "dp: epsilon {epsilon} at delta {} over {} rounds at q = {q}: noise multiplier {sigma:.3}, clip {}",
                    args.dp_delta, args.rounds, args.dp_clip
                );
                let dp = astraea_core::privacy::ModelPrivacy {
                    clip: args.dp_clip,
                    noise_multiplier: sigma,
                    delta: args.dp_delta,
                    adaptive: adaptive_clip(
                        args.dp_adaptive_quantile,
                        args.dp_count_noise,
                        args.participants,
                        args.gamma,
                        // Mediators' count when any strategy run chains.
                        !args
                            .strategies
                            .iter()
                            .all(|s| s.starts_with("fedavg") || s == "fedprox"),
                    )?,
                };
                check_count_noise(&dp)?;
                Some(dp)
            }
        },
        schedule: args.schedule.into(),
        population: astraea_sim::population::Population {
            speeds: args.speeds,
            freeze: args.freeze.clamp(0.0, 1.0),
            overhead_s: args.hop_overhead.max(0.0),
            hop_deadline_s: hop_limit("--hop-deadline", args.hop_deadline, false)
                .map_err(anyhow::Error::msg)?
                .as_secs_f64(),
            stall_timeout_s: hop_limit("--stall-timeout", args.stall_timeout, true)
                .map_err(anyhow::Error::msg)?
                .as_secs_f64(),
        },
        threads,
        trainer: astraea_sim::TrainerSettings {
            engine: args.engine,
            stack: args.stack as usize,
            device: args.device,
        },
        out_dir: args.out.clone(),
        target_accuracy: args.target.map(|t| t / 100.0),
    })
}

/// The run's training and test sets, the training set cut to `max_train`.
pub(crate) fn load_data(
    config: &SimConfig,
    max_train: Option<usize>,
) -> anyhow::Result<(astraea_core::data::Dataset, astraea_core::data::Dataset)> {
    let (train, test) = load_named(&config.dataset, &config.data_dir)
        .with_context(|| format!("loading {}", config.dataset))?;
    let train = match max_train {
        Some(n) if n < train.len() => train.subset(&(0..n).collect::<Vec<_>>()),
        _ => train,
    };
    Ok((train, test))
}

impl SimulateArgs {
    /// `--max-train`.
    pub(crate) fn max_train(&self) -> Option<usize> {
        self.max_train
    }

    /// `--seeds`.
    pub(crate) fn seeds(&self) -> Vec<u64> {
        self.seeds.clone()
    }

    /// The first of `--seeds` (1 when none is given).
    pub(crate) fn first_seed(&self) -> u64 {
        self.seeds.first().copied().unwrap_or(1)
    }
}
