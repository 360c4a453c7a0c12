//! `astraea bench`: the server's measurements, one subcommand each.

use std::path::PathBuf;

use anyhow::Context;
use astraea_core::protocol::WeightEncoding;
use astraea_core::strategy::StrategyKind;
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Aggregation throughput next to a plain memory copy.
    Aggregate {
        /// Parameters per update.
        #[arg(long, default_value_t = 1_000_000)]
        params: usize,
        /// Updates folded per pass.
        #[arg(long, default_value_t = 100)]
        updates: usize,
    },
    /// Idle clients one server process holds, and its memory per client.
    Idle {
        /// Clients to join.
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Clients joining at once.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
        /// Spread the clients over a leader and this many gateways
        /// (processes of their own sharing a run in a throw-away
        /// PostgreSQL), held by client processes of their own.
        #[arg(long)]
        gateways: Option<usize>,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Holds idle clients for `bench idle --gateways` (one process's file
    /// limit caps how many): joins them, prints `held N`, keeps them until
    /// standard input closes.
    #[command(hide = true)]
    IdleHold {
        /// The server's WebSocket URL.
        #[arg(long)]
        url: String,
        /// Clients to join.
        #[arg(long)]
        clients: usize,
        /// Clients joining at once.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
    },
    /// Crash resilience: the server killed with SIGKILL at random moments
    /// while clients train (rounds lost after each restart); with
    /// --servers N, N servers share the run in PostgreSQL and one of them
    /// (the leader or a follower) is taken out each time (takeover time,
    /// rounds lost or counted twice).
    Kills {
        /// SIGKILLs to deliver.
        #[arg(long, default_value_t = 50)]
        kills: usize,
        /// Servers sharing the run (2 or more: in PostgreSQL, a throw-away
        /// cluster unless --store names one).
        #[arg(long, default_value_t = 1)]
        servers: usize,
        /// Gateways (`serve --gateway`, with clients of their own) beside
        /// the servers (--servers only); the run is then one that folds
        /// across gateways (Astraea's rescheduling, no loss rule).
        #[arg(long, default_value_t = 0)]
        gateways: usize,
        /// Pause with SIGSTOP instead of SIGKILL (--servers only): a paused
        /// leader keeps its session and is replaced when its lease expires.
        #[arg(long)]
        pause: bool,
        /// A PostgreSQL database to use instead of a throw-away cluster.
        #[arg(long)]
        store: Option<String>,
        /// How the shards are cut (--servers only; the single-server run
        /// uses long-tail:10).
        #[arg(long, default_value = "iid")]
        partition: String,
        /// Rounds of the run (more than the kills leave room to finish).
        #[arg(long, default_value_t = 80)]
        rounds: u32,
        /// Seed of the kill times.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// One run served by one server and by a leader with gateways
    /// (`serve --gateway`), same seeds, same data: accuracy and time
    /// side by side (a throw-away PostgreSQL cluster).
    Gateways {
        /// Gateways besides the leader.
        #[arg(long, default_value_t = 1)]
        gateways: usize,
        /// Native clients on each server (a power of two; the single
        /// server holds them all).
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Rounds of each run.
        #[arg(long, default_value_t = 20)]
        rounds: u32,
        /// Seeds, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        seeds: Vec<u64>,
        /// The run's strategy (`serve --strategy`).
        #[arg(long, default_value = "astraea-sched")]
        strategy: String,
        /// The run's aggregation rule (`serve --aggregation`): the mean
        /// folds each gateway's partial, a robust rule takes every
        /// mediator's result.
        #[arg(long, default_value = "mean")]
        aggregation: String,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Clients vanishing mid-chain every round (rounds stalled).
    Vanish {
        /// Rounds to run.
        #[arg(long, default_value_t = 100)]
        rounds: u32,
        /// Probability that a client vanishes on a given task.
        #[arg(long, default_value_t = 0.2)]
        share: f64,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Clients freezing mid-hop (silent, socket open) against a 120 s
    /// deadline: what a frozen client costs its chain.
    Freeze {
        /// Rounds to run.
        #[arg(long, default_value_t = 20)]
        rounds: u32,
        /// Probability that a client freezes on a given task.
        #[arg(long, default_value_t = 0.1)]
        share: f64,
        /// The server's stall timeout in seconds (0: none, the deadline).
        #[arg(long, default_value_t = 8.0)]
        stall_timeout: f64,
        /// sync rounds, or the async mode (then a round is a new model).
        #[arg(long, default_value = "sync")]
        mode: astraea_core::asynchronous::Mode,
        /// Native clients (at least 6).
        #[arg(long, default_value_t = 6)]
        clients: usize,
        /// Test accuracy in % whose first arrival the table times.
        #[arg(long, default_value_t = 80.0)]
        target: f64,
        /// Injected training speeds, as `simulate --speeds` takes them
        /// (uniform:SPEED or lognormal:MEDIAN:SPREAD, samples per second):
        /// a client faster than its draw waits, alive, until a machine of
        /// that speed would have finished. Unset: as fast as they can.
        #[arg(long)]
        speeds: Option<astraea_sim::population::SpeedModel>,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Structure-aware fuzzing of the protocol decoders: crashes found.
    Fuzz {
        /// Inputs to run.
        #[arg(long, default_value_t = 10_000_000)]
        inputs: u64,
        /// Seed of the first thread (thread t uses seed + t).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// A hop's fixed cost stage by stage on the CPU: encode, decode, model
    /// built, the first step beyond a steady one, read back; for hops of a
    /// few batches, weights as f32 and f16.
    Hop {
        /// Batches of 20 per hop.
        #[arg(long, value_delimiter = ',', default_value = "1,2,10")]
        batches: Vec<usize>,
        /// Repeats per row (medians are shown).
        #[arg(long, default_value_t = 7)]
        repeats: usize,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// A native hop trained by several threads at once against one thread:
    /// every batch split between them, the gradients added up (the single
    /// visit's update), or local SGD (batches dealt, weights averaged every
    /// few rounds: another update, so its accuracy is measured too).
    Threads {
        /// Samples in the hop (one epoch), from MNIST's training set.
        #[arg(long, default_value_t = 2000)]
        samples: usize,
        /// Mini-batch sizes, one set of rows each.
        #[arg(long, value_delimiter = ',', default_value = "20,64")]
        batches: Vec<usize>,
        /// Thread counts to compare.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        /// Ways to share a hop: `slices` (the batch split), `local` (local
        /// SGD averaged once a hop) or `local:K` (every K rounds).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "slices,local,local:5,local:1"
        )]
        splits: Vec<astraea_core::train::Split>,
        /// Repeats per row (medians are shown).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// FedAvg rounds of the accuracy table (0: no accuracy table): 10
        /// clients of 600 IID samples, one epoch of batch 20 a hop.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// The simulator's training throughput: one round's local training
    /// of K clients on the per-client and the batched path, next to the
    /// PyTorch anchors (bench/torch_simulate.py) in the same run.
    Simulate {
        /// Clients per round (K), one set of rows each.
        #[arg(long, value_delimiter = ',', default_value = "10,50,500")]
        clients: Vec<usize>,
        /// MNIST samples each client holds (batches of 20, one epoch).
        #[arg(long, default_value_t = 120)]
        samples: usize,
        /// Timed rounds per row, after one warm-up (medians are shown).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Worker threads of the per-client path and PyTorch's threads
        /// (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Astraea's paths to time: per-client, batched (a stack of one per
        /// worker, the simulator's default), "batched, one stack" (all K
        /// clients as one stack).
        #[arg(
            long,
            value_delimiter = ';',
            default_value = "per-client;batched;batched, one stack"
        )]
        paths: Vec<String>,
        /// Where the batched paths compute: cpu, or gpu (the `gpu`
        /// feature); the anchors then run on the GPU too (CUDA).
        #[arg(long, default_value = "cpu")]
        device: astraea_sim::DeviceKind,
        /// Python with torch for the anchors; without torch the table has
        /// Astraea's rows only.
        #[arg(long, default_value = "python3")]
        python: PathBuf,
        /// The anchors' script.
        #[arg(long, default_value = "bench/torch_simulate.py")]
        script: PathBuf,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// The mediator schedulers on simulated wall-clock time to a target
    /// accuracy (--target, default 90 %): full Astraea runs with each
    /// scheduler, each --seeds value and each population setting.
    Schedulers {
        /// The federation: the `simulate` flags (their --speeds and
        /// --freeze are replaced by each setting's).
        #[command(flatten)]
        sim: Box<crate::simulate::SimulateArgs>,
        /// Schedulers to compare, separated by ';' (as --scheduler names
        /// them; learned:PATH for a trained policy).
        #[arg(
            long,
            value_delimiter = ';',
            default_value = "random;greedy;speed-aware:1;oort"
        )]
        schedulers: Vec<String>,
        /// Population settings, comma separated: uniform (200 samples/s
        /// each), spread (lognormal, median 200, 100x p95/p5), freeze
        /// (spread, and 10 % of hops freezing).
        #[arg(long, value_delimiter = ',', default_value = "uniform,spread,freeze")]
        settings: Vec<String>,
    },
    /// Does the learned scheduler's reward rank schedules as the full
    /// simulator does? Full Astraea runs (the `simulate` flags; --seeds
    /// are held out) are stopped at each of --probe-rounds and the round
    /// is played again with every scheduler; the reward's shaping weight
    /// is fitted on the --fit-seeds' rounds and judged by Spearman's rank
    /// correlation with the accuracy gained per simulated second.
    Surrogate {
        /// The federation: the `simulate` flags; its --seeds are the
        /// held-out runs.
        #[command(flatten)]
        sim: Box<crate::simulate::SimulateArgs>,
        /// Schedulers whose schedules are ranked, separated by ';'.
        #[arg(
            long,
            value_delimiter = ';',
            default_value = "random;greedy;speed-aware:0.5;speed-aware:2;speed-aware:8;oort"
        )]
        schedulers: Vec<String>,
        /// Rounds probed in each run.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6")]
        probe_rounds: Vec<u32>,
        /// Seeds whose probed rounds fit the shaping weight.
        #[arg(long, value_delimiter = ',', default_value = "101,102")]
        fit_seeds: Vec<u64>,
        /// Shaping weights tried.
        #[arg(long, value_delimiter = ',', default_value = "0,0.5,1,2,4,8,16")]
        shapings: Vec<f64>,
    },
    /// Milliseconds each mediator scheduler takes to form one round.
    ScheduleTime {
        /// Schedulers, separated by ';' (as --scheduler names them).
        #[arg(
            long,
            value_delimiter = ';',
            default_value = "random;greedy;speed-aware:1;oort"
        )]
        schedulers: Vec<String>,
        /// Participants per round, one row each.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        participants: Vec<usize>,
        /// Rounds timed per row (the median is shown).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Coordination overhead per round with echo clients.
    Rounds {
        /// Clients, all taking part.
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Rounds timed.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Strategy.
        #[arg(long, default_value = "fedavg")]
        strategy: StrategyKind,
        /// Instead, split each round over a leader and these numbers of
        /// gateways (each server a process of its own, on a throw-away
        /// PostgreSQL; FedAvg, the loss rule off; 0: the leader alone),
        /// e.g. `--gateways 0,1,4`.
        #[arg(long, value_delimiter = ',')]
        gateways: Vec<usize>,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// What secure aggregation costs: the protocol in memory for several
    /// numbers of maskers (none or a share dropping after the key
    /// exchange), then live rounds of echo clients with it off, on, and on
    /// with clients vanishing at their masked hop.
    Secagg {
        /// Numbers of maskers for the in-memory table.
        #[arg(long, value_delimiter = ',', default_value = "10,20,50,100,255")]
        maskers: Vec<u32>,
        /// Values in the model (default: the MNIST CNN's).
        #[arg(long, default_value_t = 63_286)]
        params: usize,
        /// Share of maskers that drop after the key exchange.
        #[arg(long, default_value_t = 0.1)]
        dropout: f64,
        /// Live: clients (FedAvg, so every client masks); 0 skips the live
        /// table.
        #[arg(long, default_value_t = 20)]
        clients: usize,
        /// Live: rounds timed per configuration.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
}

/// Runs one measurement and prints its table.
pub(crate) async fn bench_command(bench: BenchCommand) -> anyhow::Result<()> {
    match bench {
        BenchCommand::Aggregate { params, updates } => {
            let b = astraea_bench::aggregate::run(params, updates, 5);
            println!(
                "| params | updates | fold GB/s | copy GB/s | fold / copy | aggregator state |"
            );
            println!("|---:|---:|---:|---:|---:|---:|");
            println!(
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.1} MB |",
                b.params,
                b.updates,
                b.fold_gbps,
                b.copy_gbps,
                b.fold_gbps / b.copy_gbps,
                b.state_bytes as f64 / 1e6
            );
        }
        BenchCommand::IdleHold {
            url,
            clients,
            concurrency,
        } => astraea_bench::idle::hold(&url, clients, concurrency).await?,
        BenchCommand::Idle {
            clients,
            concurrency,
            gateways: Some(gateways),
            data_dir,
        } => {
            let b = astraea_bench::idle::over_gateways(&data_dir, clients, concurrency, gateways)
                .await?;
            let mb = |bytes: u64| bytes as f64 / 1e6;
            let grown: u64 = b
                .rss
                .iter()
                .map(|(before, after)| after.saturating_sub(*before))
                .sum();
            let connected: usize = b.connected.iter().sum();
            println!(
                "| servers | clients asked | held | connected (each server) | leader's view | join s | server RSS after (each) | per client |"
            );
            println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
            println!(
                "| {} | {} | {} | {} ({}) | {} | {:.1} | {} MB | {:.1} KB |",
                b.gateways + 1,
                b.requested,
                b.held,
                connected,
                b.connected
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(" + "),
                b.federation,
                b.join_s,
                b.rss
                    .iter()
                    .map(|(_, after)| format!("{:.0}", mb(*after)))
                    .collect::<Vec<_>>()
                    .join(" + "),
                grown as f64 / connected.max(1) as f64 / 1e3
            );
        }
        BenchCommand::Idle {
            clients,
            concurrency,
            data_dir,
            ..
        } => {
            let b = astraea_bench::idle::run(&data_dir, clients, concurrency).await?;
            let per_client =
                (b.rss_after.saturating_sub(b.rss_before)) as f64 / b.connected.max(1) as f64;
            println!(
                "| clients asked | connected | join s | server RSS before | after | per client |"
            );
            println!("|---:|---:|---:|---:|---:|---:|");
            println!(
                "| {} | {} | {:.1} | {:.1} MB | {:.1} MB | {:.1} KB |",
                b.requested,
                b.connected,
                b.join_s,
                b.rss_before as f64 / 1e6,
                b.rss_after as f64 / 1e6,
                per_client / 1e3
            );
        }
        BenchCommand::Kills {
            kills,
            servers,
            gateways,
            pause,
            store,
            partition,
            rounds,
            seed,
            data_dir,
        } if servers > 1 => {
            use astraea_bench::failover::{Failover, Outage, failover};
            let outage = if pause { Outage::Pause } else { Outage::Kill };
            let settings = Failover {
                servers,
                gateways,
                outages: kills,
                rounds,
                outage,
                seed,
                url: store,
                partition,
            };
            let r = failover(data_dir, settings).await?;
            let mut takeovers = r.takeovers_s.clone();
            takeovers.sort_by(f64::total_cmp);
            let at = |q: f64| {
                takeovers
                    .get(((takeovers.len() as f64 - 1.0) * q).round() as usize)
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            println!(
                "| servers | gateways | outage | outages (of the leader / a gateway) | takeover median / max s | rounds lost | counted twice | partials folded / placed | ex-leaders still running | rounds done / planned | finished | seconds |"
            );
            println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|");
            println!(
                "| {} | {} | {} | {} ({} / {}) | {:.2} / {:.2} | {} | {} | {} / {} | {} | {} / {} | {} | {:.0} |",
                r.servers,
                r.gateways,
                if pause { "SIGSTOP" } else { "SIGKILL" },
                r.outages,
                r.leader_outages,
                r.gateway_outages,
                at(0.5),
                at(1.0),
                r.rounds_lost,
                r.counted_twice,
                r.partials.0,
                r.partials.1,
                r.stale_leaders,
                r.rounds_done,
                r.rounds,
                r.finished,
                r.seconds
            );
        }
        BenchCommand::Kills {
            kills,
            gateways,
            rounds,
            seed,
            data_dir,
            ..
        } => {
            if gateways > 0 {
                anyhow::bail!("--gateways needs --servers 2 or more (one of them leads)");
            }
            let r = astraea_bench::chaos::kills(data_dir, kills, rounds, seed).await?;
            println!("| SIGKILLs | rounds lost | rounds done / planned | finished | seconds |");
            println!("|---:|---:|---:|---|---:|");
            println!(
                "| {} | {} | {} / {} | {} | {:.0} |",
                r.kills, r.rounds_lost, r.rounds_done, r.rounds, r.finished, r.seconds
            );
        }
        BenchCommand::Gateways {
            gateways,
            clients,
            rounds,
            seeds,
            strategy,
            aggregation,
            data_dir,
        } => {
            let rules = astraea_bench::gateways::Rules {
                strategy: &strategy,
                aggregation: &aggregation,
            };
            let runs =
                astraea_bench::gateways::run(data_dir, gateways, clients, rounds, &seeds, rules)
                    .await?;
            println!(
                "| layout | clients | seed | rounds | final accuracy % | best accuracy % | seconds |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|");
            for r in &runs {
                let layout = match r.gateways {
                    0 => "one server".to_string(),
                    g => format!("leader + {g} gateway{}", if g == 1 { "" } else { "s" }),
                };
                println!(
                    "| {layout} | {} | {} | {} | {:.2} | {:.2} | {:.1} |",
                    clients * (gateways + 1),
                    r.seed,
                    r.rounds,
                    100.0 * r.final_accuracy,
                    100.0 * r.best_accuracy,
                    r.seconds
                );
            }
            for layout in [0, gateways] {
                let of: Vec<&_> = runs.iter().filter(|r| r.gateways == layout).collect();
                let mean = |f: fn(&&astraea_bench::gateways::GatewayRun) -> f64| {
                    of.iter().map(f).sum::<f64>() / of.len().max(1) as f64
                };
                println!(
                    "| mean, {} | | | | {:.2} | {:.2} | {:.1} |",
                    if layout == 0 {
                        "one server"
                    } else {
                        "with gateways"
                    },
                    100.0 * mean(|r| r.final_accuracy),
                    100.0 * mean(|r| r.best_accuracy),
                    mean(|r| r.seconds)
                );
            }
        }
        BenchCommand::Vanish {
            rounds,
            share,
            data_dir,
        } => {
            let r = astraea_bench::chaos::vanish(data_dir, rounds, share).await?;
            println!(
                "| rounds | vanish share | rounds stalled | hops skipped | departures | mean round s | longest round s |"
            );
            println!("|---:|---:|---:|---:|---:|---:|---:|");
            println!(
                "| {} | {share} | {} | {} | {} | {:.2} | {:.2} |",
                r.rounds, r.stalled, r.skipped_hops, r.departures, r.mean_round_s, r.max_round_s
            );
        }
        BenchCommand::Freeze {
            rounds,
            share,
            stall_timeout,
            mode,
            clients,
            target,
            speeds,
            data_dir,
        } => {
            let stall = std::time::Duration::try_from_secs_f64(stall_timeout)
                .context("--stall-timeout must be a non-negative number of seconds")?;
            let drawn = speeds.map(|m| m.draw(clients, 1)).unwrap_or_default();
            let r =
                astraea_bench::chaos::freeze(data_dir, rounds, share, stall, mode, clients, &drawn)
                    .await?;
            println!(
                "| mode | rounds | freeze share | stall timeout s | rounds stalled | hops skipped | hops done | mean round s | longest round s | run s | s per 100 hops | best % | final % | s to {target} % |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            let to_target = r
                .seconds_to(target / 100.0)
                .map_or("never".to_string(), |s| format!("{s:.1}"));
            println!(
                "| {mode} | {} | {share} | {stall_timeout} | {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} | {to_target} |",
                r.rounds,
                r.stalled,
                r.skipped_hops,
                r.hops_done,
                r.mean_round_s,
                r.max_round_s,
                r.total_s,
                100.0 * r.total_s / r.hops_done.max(1) as f64,
                100.0 * r.best_accuracy(),
                100.0 * r.accuracy.last().map_or(0.0, |&(_, a)| a),
            );
        }
        BenchCommand::Simulate {
            clients,
            samples,
            repeats,
            threads,
            paths,
            device,
            python,
            script,
            data_dir,
        } => {
            let (train, _) = astraea_core::data::catalog::load_named("mnist", &data_dir)?;
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            });
            println!(
                "| clients | path | round (s) | rounds/s | samples/s | x per-client | x torch per-client | x torch vmap |"
            );
            println!("|---:|---|---:|---:|---:|---:|---:|---:|");
            for &k in &clients {
                let mut rows = astraea_bench::simulate::run_astraea(
                    &train,
                    k,
                    samples,
                    repeats,
                    threads,
                    &paths,
                    &device.device(),
                )?;
                match astraea_bench::simulate::run_torch(
                    &python,
                    &script,
                    k,
                    samples,
                    repeats,
                    threads,
                    device == astraea_sim::DeviceKind::Gpu,
                ) {
                    Ok(torch) => rows.extend(torch),
                    Err(e) => eprintln!("no PyTorch anchors for {k} clients: {e:#}"),
                }
                let rate = |path: &str| {
                    rows.iter()
                        .find(|r| r.path == path)
                        .map(|r| r.samples_per_s)
                };
                let ratio = |r: f64, path: &str| {
                    rate(path).map_or_else(|| "-".to_string(), |base| format!("{:.2}", r / base))
                };
                for row in &rows {
                    println!(
                        "| {} | {} | {:.3} | {:.2} | {:.0} | {} | {} | {} |",
                        row.clients,
                        row.path,
                        row.round_s,
                        1.0 / row.round_s,
                        row.samples_per_s,
                        ratio(row.samples_per_s, "per-client"),
                        ratio(row.samples_per_s, "torch per-client"),
                        ratio(row.samples_per_s, "torch vmap"),
                    );
                }
            }
            let (_, test) = astraea_core::data::catalog::load_named("mnist", &data_dir)?;
            println!();
            println!(
                "| evaluation of the test set | samples | seconds | samples/s | x per-client |"
            );
            println!("|---|---:|---:|---:|---:|");
            let rows = astraea_bench::simulate::run_evaluation(&test, repeats, &device.device())?;
            let base = rows[0].1;
            for (path, seconds) in rows {
                println!(
                    "| {path} | {} | {seconds:.3} | {:.0} | {:.2} |",
                    test.len(),
                    test.len() as f64 / seconds,
                    base / seconds
                );
            }
        }
        BenchCommand::Threads {
            samples,
            batches,
            threads,
            splits,
            repeats,
            rounds,
            data_dir,
        } => {
            anyhow::ensure!(!splits.is_empty(), "--splits names no way to share a hop");
            let (train, test) = astraea_core::data::catalog::load_named("mnist", &data_dir)?;
            println!("| batch | threads | shared as | hop s | samples/s | vs 1 thread |");
            println!("|---:|---:|---|---:|---:|---:|");
            for &batch in &batches {
                let rows = astraea_bench::threads::run(
                    &train,
                    samples,
                    batch,
                    (&threads, &splits),
                    repeats,
                );
                let one = rows
                    .iter()
                    .find(|r| r.threads <= 1)
                    .map(|r| r.samples_per_s);
                for row in rows {
                    let ratio = one.map_or("–".into(), |one| {
                        format!("{:.2}x", row.samples_per_s / one)
                    });
                    let split = match row.threads {
                        0 | 1 => "alone".to_string(),
                        _ => describe(row.split),
                    };
                    println!(
                        "| {} | {} | {split} | {:.2} | {:.0} | {ratio} |",
                        row.batch, row.threads, row.hop_s, row.samples_per_s
                    );
                }
            }
            if rounds > 0 {
                let ways = threads.iter().flat_map(|&n| {
                    let splits = if n <= 1 { &splits[..1] } else { &splits[..] };
                    splits.iter().map(move |&split| (n, split))
                });
                println!();
                println!(
                    "| threads | shared as | test accuracy after round 1 / 3 / 5 / {rounds} |"
                );
                println!("|---:|---|---|");
                for (n, split) in ways {
                    let acc = astraea_bench::threads::accuracy(
                        (&train, &test),
                        (10, 600, 20),
                        rounds,
                        (n, split),
                    );
                    let at = |r: usize| {
                        acc.get(r - 1)
                            .map_or("–".into(), |a| format!("{:.2}", a * 100.0))
                    };
                    let split = if n <= 1 {
                        "alone".to_string()
                    } else {
                        describe(split)
                    };
                    println!(
                        "| {n} | {split} | {} / {} / {} / {} |",
                        at(1),
                        at(3),
                        at(5),
                        at(rounds)
                    );
                }
            }
        }
        BenchCommand::Hop {
            batches,
            repeats,
            data_dir,
        } => {
            let (train, _) = astraea_core::data::catalog::load_named("mnist", &data_dir)?;
            println!(
                "| batches | encoding | server encode | client decode | build model | first step extra | steady step | read back | client encode | server decode | server judge | fixed | hop | fixed share |"
            );
            println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for encoding in [WeightEncoding::F32, WeightEncoding::F16] {
                for &n in &batches {
                    let c = astraea_bench::hop::run(&train, n, encoding, 1 << 20, repeats);
                    println!(
                        "| {n} | {encoding:?} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} % |",
                        c.server_encode_ms,
                        c.client_decode_ms,
                        c.build_ms,
                        c.first_step_extra_ms,
                        c.steady_step_ms,
                        c.read_back_ms,
                        c.client_encode_ms,
                        c.server_decode_ms,
                        c.server_judge_ms,
                        c.fixed_ms(),
                        c.total_ms(),
                        100.0 * c.fixed_ms() / c.total_ms()
                    );
                }
            }
            println!(
                "(milliseconds, medians of {repeats}; CPU, burn flex; network transfer not included)"
            );
        }
        BenchCommand::Fuzz {
            inputs,
            seed,
            threads,
        } => {
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
            let b = astraea_bench::fuzz::run(inputs, seed, threads);
            print!("{}", astraea_bench::fuzz::table(&b));
            if let Some(crash) = &b.report.first_crash {
                println!("first crash: {crash}");
            }
        }
        BenchCommand::Secagg {
            maskers,
            params,
            dropout,
            clients,
            rounds,
            data_dir,
        } => {
            let mut rows = Vec::new();
            for &n in &maskers {
                for gone in [0, (f64::from(n) * dropout).round() as u32] {
                    if gone == 0
                        && rows
                            .last()
                            .is_some_and(|r: &astraea_bench::secagg::ProtocolBench| r.maskers == n)
                    {
                        continue;
                    }
                    rows.push(astraea_bench::secagg::protocol(n, gone, params)?);
                }
            }
            print!("{}", astraea_bench::secagg::protocol_table(&rows));
            if clients > 0 {
                let mut live = Vec::new();
                for (secure, vanish) in
                    [(false, 0.0), (true, 0.0), (false, dropout), (true, dropout)]
                {
                    live.push(
                        astraea_bench::secagg::live(
                            data_dir.clone(),
                            clients,
                            rounds,
                            secure,
                            vanish,
                        )
                        .await?,
                    );
                }
                println!();
                print!("{}", astraea_bench::secagg::live_table(&live));
            }
        }
        BenchCommand::Schedulers {
            sim,
            schedulers,
            settings,
        } => schedulers_command(&sim, &schedulers, &settings)?,
        BenchCommand::Surrogate {
            sim,
            schedulers,
            probe_rounds,
            fit_seeds,
            shapings,
        } => surrogate_command(&sim, &schedulers, &probe_rounds, &fit_seeds, &shapings)?,
        BenchCommand::ScheduleTime {
            schedulers,
            participants,
            repeats,
        } => {
            let schedulers = named_schedulers(&schedulers)?;
            println!("| participants | scheduler | ms per round |");
            println!("|---:|---|---:|");
            for &c in &participants {
                for (name, ms) in
                    astraea_bench::schedulers::time_schedulers(&schedulers, c, repeats)
                {
                    println!("| {c} | {name} | {ms:.2} |");
                }
            }
        }
        BenchCommand::Rounds {
            clients,
            rounds,
            strategy,
            gateways,
            data_dir,
        } if !gateways.is_empty() => {
            println!("| servers | clients | rounds | s/round |");
            println!("|---|---:|---:|---:|");
            for g in gateways {
                let b =
                    astraea_bench::rounds::run_with_gateways(data_dir.clone(), clients, rounds, g)
                        .await?;
                let layout = match g {
                    0 => "1 (leader alone)".to_string(),
                    g => format!("leader + {g} gateway{}", if g == 1 { "" } else { "s" }),
                };
                println!(
                    "| {layout} | {} | {} | {:.2} |",
                    b.clients, b.rounds, b.round_s
                );
            }
            let _ = strategy;
        }
        BenchCommand::Rounds {
            clients,
            rounds,
            strategy,
            data_dir,
            ..
        } => {
            // The loss rule on (the server's default samples) and off:
            // the difference is what judging every update costs.
            println!(
                "| strategy | clients | loss rule | rounds | s/round | evaluation s | coordination s/round | model transfers/round |"
            );
            println!("|---|---:|---|---:|---:|---:|---:|---:|");
            let mut coordination = Vec::new();
            for samples in [astraea_core::validation::DEFAULT_VALIDATION_SAMPLES, 0] {
                let b = astraea_bench::rounds::run(
                    data_dir.clone(),
                    clients,
                    rounds,
                    strategy,
                    samples,
                )
                .await?;
                let rule = match samples {
                    0 => "off".to_string(),
                    n => format!("on ({n} samples)"),
                };
                println!(
                    "| {} | {} | {rule} | {} | {:.2} | {:.2} | {:.2} | {} |",
                    b.strategy.as_str(),
                    b.clients,
                    b.rounds,
                    b.round_s,
                    b.eval_s,
                    b.round_s - b.eval_s,
                    b.transfers
                );
                coordination.push(b.round_s - b.eval_s);
            }
            if let [on, off] = coordination[..] {
                println!(
                    "\nthe loss rule's share of the coordination: {:.2} s a round ({:.0} %)",
                    on - off,
                    100.0 * (on - off) / on.max(1e-9)
                );
            }
        }
    }
    Ok(())
}

/// The schedulers a `--schedulers` list names, each with its name as
/// written (two learned policies are two rows of a table).
fn named_schedulers(
    names: &[String],
) -> anyhow::Result<Vec<(String, astraea_core::astraea::Scheduler)>> {
    names
        .iter()
        .map(|s| {
            let scheduler = crate::args::parse_scheduler(s).map_err(anyhow::Error::msg)?;
            Ok((s.clone(), scheduler))
        })
        .collect()
}

/// `bench surrogate`: probes the fitting and the held-out runs, then the
/// tables.
fn surrogate_command(
    sim: &crate::simulate::SimulateArgs,
    schedulers: &[String],
    rounds: &[u32],
    fit_seeds: &[u64],
    shapings: &[f64],
) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let config = crate::simulate::sim_config(sim, threads)?;
    let (train, test) = crate::simulate::load_data(&config, sim.max_train())?;
    let schedulers = named_schedulers(schedulers)?;
    let held_seeds = sim.seeds();
    anyhow::ensure!(
        !fit_seeds.is_empty() && !held_seeds.is_empty(),
        "give seeds to fit on (--fit-seeds) and to hold out (--seeds)"
    );
    anyhow::ensure!(
        !fit_seeds.iter().any(|s| held_seeds.contains(s)),
        "a held-out seed (--seeds) is also a fitting seed (--fit-seeds)"
    );
    let mut log = |seed: u64, probed: &[astraea_sim::ProbedSchedule]| {
        for p in probed {
            eprintln!(
                "seed {seed} round {} {}: {:.2} -> {:.2} %, {:.1} s ({:.2}x balanced), KL {:.3}",
                p.round,
                p.scheduler,
                p.accuracy_before * 100.0,
                p.accuracy * 100.0,
                p.seconds,
                p.seconds / p.balanced.max(1e-9),
                p.kl
            );
        }
    };
    let mut rounds = rounds.to_vec();
    rounds.sort_unstable();
    rounds.dedup();
    let data = (&train, &test);
    let fit =
        astraea_bench::surrogate::probe(&config, data, &schedulers, &rounds, fit_seeds, &mut log)?;
    let held = astraea_bench::surrogate::probe(
        &config,
        data,
        &schedulers,
        &rounds,
        &held_seeds,
        &mut log,
    )?;
    let (fit_gaining, held_gaining) = (
        astraea_bench::surrogate::gaining(&fit),
        astraea_bench::surrogate::gaining(&held),
    );
    println!(
        "rounds in which every schedule gained accuracy: {} of {} fitting, {} of {} held out \
         (the others are left out of the ranking)\n",
        fit_gaining.len(),
        fit.len(),
        held_gaining.len(),
        held.len()
    );
    let (judged, best) = astraea_bench::surrogate::judge(&fit_gaining, &held_gaining, shapings);
    println!("{}", astraea_bench::surrogate::table(&judged, best));
    let mut all = fit;
    all.extend(held);
    println!("{}", astraea_bench::surrogate::schedules_table(&all));
    Ok(())
}

/// `bench schedulers`: every scheduler, seed and setting as a full
/// simulated Astraea run, then the table.
fn schedulers_command(
    sim: &crate::simulate::SimulateArgs,
    schedulers: &[String],
    settings: &[String],
) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let config = crate::simulate::sim_config(sim, threads)?;
    let (train, test) = crate::simulate::load_data(&config, sim.max_train())?;
    let schedulers = named_schedulers(schedulers)?;
    let settings = settings
        .iter()
        .map(|name| {
            let spread = astraea_sim::population::SpeedModel::LogNormal {
                median: 200.0,
                spread: 100.0,
            };
            let (speeds, freeze) = match name.as_str() {
                "uniform" => (astraea_sim::population::SpeedModel::Uniform(200.0), 0.0),
                "spread" => (spread, 0.0),
                "freeze" => (spread, 0.1),
                other => anyhow::bail!(
                    "unknown setting {other:?} in --settings, expected uniform, spread or freeze"
                ),
            };
            Ok(astraea_bench::schedulers::Setting {
                name: name.clone(),
                population: astraea_sim::population::Population {
                    speeds,
                    freeze,
                    ..config.population.clone()
                },
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = config.target_accuracy.unwrap_or(0.9);
    let seeds = sim.seeds();
    eprintln!(
        "{} runs of up to {} rounds: {} settings x {} schedulers x {} seeds, K = {}, c = {}, target {:.0} %",
        settings.len() * schedulers.len() * seeds.len(),
        config.rounds,
        settings.len(),
        schedulers.len(),
        seeds.len(),
        config.clients,
        config.participants,
        target * 100.0
    );
    let runs = astraea_bench::schedulers::run(
        &config,
        &train,
        &test,
        astraea_bench::schedulers::Grid {
            settings: &settings,
            schedulers: &schedulers,
            seeds: &seeds,
            target,
        },
        &mut |run| {
            eprintln!(
                "{} {} s{}: {} (round {}), final {:.2} %, worst class {:.2} %, {:.1} s here",
                run.setting,
                run.scheduler,
                run.seed,
                run.to_target_s
                    .map_or("never".into(), |t| format!("{t:.0} s to target")),
                run.rounds_to_target.map_or("-".into(), |r| r.to_string()),
                run.final_accuracy * 100.0,
                run.per_class.iter().copied().fold(f64::INFINITY, f64::min) * 100.0,
                run.machine_s
            )
        },
    )?;
    println!("{}", astraea_bench::schedulers::table(&runs, target));
    Ok(())
}

/// A way of sharing a hop, in words for a table.
fn describe(split: astraea_core::train::Split) -> String {
    use astraea_core::train::Split;
    match split {
        Split::Slices => "batch split, gradients every step".into(),
        Split::Local { sync: 0 } => "local SGD, averaged once a hop".into(),
        Split::Local { sync } => format!("local SGD, averaged every {sync} rounds"),
    }
}
