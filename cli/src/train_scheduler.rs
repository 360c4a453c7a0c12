//! `astraea train-scheduler`: trains the learned mediator scheduler on a
//! simulated population (the `simulate` flags describe it) and writes the
//! policy, then judges it beside the heuristics on held-out rounds.

use std::path::PathBuf;

use anyhow::Context;
use astraea_core::astraea::Scheduler;
use astraea_sim::scheduling::{self, Environment, LearnerSettings};

use crate::simulate::{SimulateArgs, load_data, sim_config};

#[derive(clap::Args)]
pub(crate) struct TrainSchedulerArgs {
    /// The population: the `simulate` flags (dataset, partition, clients,
    /// participants, gamma, speeds, freeze, ...); the first --seeds value
    /// seeds the population and the learner.
    #[command(flatten)]
    sim: SimulateArgs,
    /// Where the policy goes (safetensors, its training in the metadata).
    #[arg(long, default_value = "scheduler.safetensors")]
    policy: PathBuf,
    /// PPO iterations (each plays --episodes rounds, then learns).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    iterations: u32,
    /// Rounds played per iteration.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    episodes: u32,
    /// Units in the actor's hidden layer (and in each of the critic's
    /// two): 8 forms a round of 1,000 in under 10 ms, 16 in about 10.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    hidden: u32,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 3e-3)]
    learning_rate: f64,
    /// The reward's weight on the chains' KL to uniform (0: time alone).
    #[arg(long, default_value_t = 4.0)]
    shaping: f64,
    /// Judge this policy on the population instead of training one (a
    /// policy trained elsewhere, on held-out seeds, other speeds or sizes).
    #[arg(long)]
    judge: Option<PathBuf>,
    /// Held-out rounds each scheduler is judged on after training.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    judge_rounds: u32,
}

pub(crate) fn train_scheduler_command(args: TrainSchedulerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.learning_rate.is_finite() && args.learning_rate > 0.0,
        "--learning-rate must be a positive number"
    );
    anyhow::ensure!(
        args.shaping.is_finite() && args.shaping >= 0.0,
        "--shaping must be a number >= 0"
    );
    let config = sim_config(&args.sim, 1)?;
    let (train, test) = load_data(&config, args.sim.max_train())?;
    let seed = args.sim.first_seed();
    let env = Environment::new(&config, &train, &test, seed)?;
    let settings = LearnerSettings {
        iterations: args.iterations as usize,
        episodes: args.episodes as usize,
        hidden: args.hidden as usize,
        learning_rate: args.learning_rate,
        shaping: args.shaping,
        seed,
        ..LearnerSettings::default()
    };
    let policy = match &args.judge {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let policy = astraea_core::astraea::Policy::from_safetensors(&bytes)
                .with_context(|| format!("reading {}", path.display()))?;
            println!("judging {} (trained: {})", path.display(), policy.training);
            policy
        }
        None => {
            let start = std::time::Instant::now();
            let policy = scheduling::train_policy(&env, &settings, &mut |i, stats| {
                if i % 10 == 0 || i + 1 == settings.iterations {
                    eprintln!(
                        "iteration {i:>5}: reward {:+.4}, round time {:.3}x balanced, KL {:.4}",
                        stats.reward, stats.time_ratio, stats.kl
                    );
                }
            })?;
            let seconds = start.elapsed().as_secs_f64();
            let rounds = settings.iterations * settings.episodes;
            std::fs::write(&args.policy, policy.to_safetensors())
                .with_context(|| format!("writing {}", args.policy.display()))?;
            println!(
                "trained in {seconds:.1} s ({rounds} rounds played); wrote {}",
                args.policy.display()
            );
            policy
        }
    };
    println!(
        "\nheld-out rounds ({}, seed {}): mean reward, true round time over balanced, chain KL",
        args.judge_rounds as usize,
        seed + 1000
    );
    // The speed-aware greedy's lambda, tuned on the training rounds'
    // seed with the quick judge (a grid of 9 values x --judge-rounds
    // rounds: far less than the policy's training played).
    let (lambda, _) = [0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
        .into_iter()
        .map(|weight| {
            let s = scheduling::judge(
                &env,
                &Scheduler::SpeedAware { weight },
                args.judge_rounds as usize,
                args.shaping,
                seed,
            );
            (weight, s.reward)
        })
        .fold((1.0, f64::NEG_INFINITY), |best, c| {
            if c.1 > best.1 { c } else { best }
        });
    println!("speed-aware lambda tuned on the training seed's rounds: {lambda}");
    println!("| scheduler | reward | round time / balanced | KL |");
    println!("|---|---:|---:|---:|");
    for scheduler in [
        Scheduler::Greedy,
        Scheduler::SpeedAware { weight: 1.0 },
        Scheduler::SpeedAware { weight: lambda },
        Scheduler::Random,
        Scheduler::Oort,
        scheduling::learned(policy),
    ] {
        let s = scheduling::judge(
            &env,
            &scheduler,
            args.judge_rounds as usize,
            args.shaping,
            seed + 1000,
        );
        println!(
            "| {scheduler} | {:+.4} | {:.3} | {:.4} |",
            s.reward, s.time_ratio, s.kl
        );
    }
    Ok(())
}
