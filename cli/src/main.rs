//! The `astraea` command line: parses arguments and calls the library.

use std::path::PathBuf;

use anyhow::{Context, bail};
use astraea_core::astraea::PlanRule;
use astraea_core::attack::Attack;
use astraea_core::data::catalog::load_named;
use astraea_core::partition::PartitionSpec;
use astraea_core::protocol::WeightEncoding;
use astraea_core::robust::AggregationRule;
use astraea_core::strategy::{Rescheduling, StrategyKind, StrategySettings};
use astraea_native as client;
use astraea_server::{self as serve, ServeConfig};
use astraea_sim::report;
use astraea_sim::{self as simulate, RunSpec, SimConfig};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "astraea",
    version,
    about = "Self-balancing federated learning: simulate, serve, join"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs strategies side by side on a simulated federation.
    Simulate(SimulateArgs),
    /// Puts the datasets that ship offline (MNIST, Fashion-MNIST) into the data folder.
    FetchData {
        /// Where to put them.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Which datasets (mnist, fashion-mnist); all when empty.
        datasets: Vec<String>,
    },
    /// Serves a federation: clients join over WebSockets at /ws.
    Serve(ServeArgs),
    /// Joins a server as one native client (reconnects if the server restarts).
    Client {
        /// WebSocket URL of the server: ws://, or wss:// over TLS (a server
        /// on another machine refuses plain ws:// unless --allow-insecure).
        #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
        server: String,
        /// Also trust the certificates in this PEM file for wss:// (the
        /// self-signed one `serve --tls` keeps in STATE_DIR/tls/cert.pem, or
        /// ./tls/cert.pem without --state-dir);
        /// the web's public roots are always trusted.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Folder holding the datasets (demo shards are loaded from here).
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Runs many native clients in one process.
    Swarm {
        /// WebSocket URL of the server: ws://, or wss:// over TLS.
        #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
        server: String,
        /// Also trust the certificates in this PEM file for wss://.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Number of clients, attackers included.
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// What the attackers do: sign-flip[:SCALE], scale[:FACTOR],
        /// noise[:STD], label-flip, inflate-samples[:FACTOR].
        #[arg(long)]
        attack: Option<Attack>,
        /// How many of the clients attack.
        #[arg(long, default_value_t = 0)]
        attackers: usize,
        /// Probability, per task, that a client freezes mid-hop: silent,
        /// socket open (a locked phone, a frozen tab), for --freeze-for.
        #[arg(long, default_value_t = 0.0)]
        freeze: f64,
        /// Seconds a freeze lasts; the client then answers, late.
        #[arg(long, default_value_t = 30.0)]
        freeze_for: f64,
        /// Injected training speeds of the honest clients (uniform:SPEED or
        /// lognormal:MEDIAN:SPREAD, samples per second, drawn with
        /// --speed-seed): a client faster than its draw waits, sending
        /// heartbeats, until a machine of that speed would have finished.
        #[arg(long)]
        speeds: Option<astraea_sim::population::SpeedModel>,
        /// Seed of the speed draws.
        #[arg(long, default_value_t = 1)]
        speed_seed: u64,
    },
    /// Measures the server: aggregation, idle clients, coordination overhead.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Re-draws the plot and tables from CSVs written by earlier runs.
    Report {
        /// CSV files (one per run) to include.
        #[arg(required = true)]
        csv: Vec<PathBuf>,
        /// Output PNG.
        #[arg(long, default_value = "runs/comparison.png")]
        plot: PathBuf,
        /// Plot title.
        #[arg(long, default_value = "Astraea vs baselines")]
        title: String,
        /// Accuracy target (percent) for rounds and bytes to reach it.
        #[arg(long)]
        target: Option<f64>,
        /// Also write the tables as Markdown here.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
        /// Folder holding the datasets.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Crash resilience: the server killed with SIGKILL at random moments
    /// while clients train (rounds lost after each restart).
    Kills {
        /// SIGKILLs to deliver.
        #[arg(long, default_value_t = 50)]
        kills: usize,
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

/// The update guard and its loss rule, the same flags (and `ASTRAEA_*`
/// variables) for `serve` and `simulate`.
#[derive(clap::Args)]
struct GuardArgs {
    /// Update guard: an update may move the weights it was sent by at most
    /// this many times their L2 norm.
    #[arg(long, env = "ASTRAEA_MAX_UPDATE_RATIO", default_value_t = astraea_core::guard::DEFAULT_MAX_UPDATE_RATIO)]
    max_update_ratio: f64,
    /// The guard's loss rule: samples of the training set a hop is judged
    /// on (seeded; 0 turns the rule off).
    #[arg(long, env = "ASTRAEA_VALIDATION_SAMPLES", default_value_t = astraea_core::validation::DEFAULT_VALIDATION_SAMPLES)]
    validation_samples: usize,
    /// The loss rule's tolerance: a hop may raise the validation loss by at
    /// most this many nats.
    #[arg(long, env = "ASTRAEA_MAX_LOSS_INCREASE", default_value_t = astraea_core::validation::DEFAULT_MAX_LOSS_INCREASE)]
    max_loss_increase: f64,
}

/// Synchronous rounds or the asynchronous mode, the same flags (and
/// `ASTRAEA_*` variables) for `serve` and `simulate`.
#[derive(clap::Args)]
struct ScheduleArgs {
    /// sync: the papers' rounds; async: a group starts whenever clients are
    /// free and is folded in when it finishes, with a staleness weight
    /// (FedBuff-style; in simulate a recorded round is ceil(m/B)*B groups
    /// of work for m groups running and buffer B, m in sync).
    #[arg(long, env = "ASTRAEA_MODE", default_value = "sync")]
    mode: astraea_core::asynchronous::Mode,
    /// Async mode: finished groups per new global model (default: half
    /// the groups running at once, rounded up).
    #[arg(long, env = "ASTRAEA_BUFFER")]
    buffer: Option<usize>,
    /// Async mode: a result more than this many global versions stale is
    /// refused.
    #[arg(long, env = "ASTRAEA_MAX_STALENESS", default_value_t = astraea_core::asynchronous::DEFAULT_MAX_STALENESS)]
    max_staleness: u64,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    guard: GuardArgs,
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// A TOML file of these settings (keys as the flags without `--`, e.g.
    /// `rounds = 100`); flags and ASTRAEA_* variables take precedence.
    #[arg(long, env = "ASTRAEA_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (0.0.0.0:8080 to accept other machines).
    #[arg(long, env = "ASTRAEA_BIND", default_value = "127.0.0.1:8080")]
    bind: String,
    /// Dataset of the demo shards and the test set.
    #[arg(long, env = "ASTRAEA_DATASET", default_value = "mnist")]
    dataset: String,
    /// Folder holding the datasets.
    #[arg(long, env = "ASTRAEA_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Use only the first N training samples.
    #[arg(long, env = "ASTRAEA_MAX_TRAIN")]
    max_train: Option<usize>,
    /// How the training set is cut into demo shards.
    #[arg(long, env = "ASTRAEA_PARTITION", default_value = "long-tail:10")]
    partition: PartitionSpec,
    /// K: demo shards.
    #[arg(long, env = "ASTRAEA_SHARDS", default_value_t = 100)]
    shards: usize,
    /// c: participants per round.
    #[arg(long, env = "ASTRAEA_PARTICIPANTS", default_value_t = 20)]
    participants: usize,
    /// Ready clients needed before a round starts.
    #[arg(long, env = "ASTRAEA_MIN_CLIENTS", default_value_t = 2)]
    min_clients: usize,
    /// Rounds to run.
    #[arg(long, env = "ASTRAEA_ROUNDS", default_value_t = 50)]
    rounds: u32,
    /// fedavg, fedprox, astraea, astraea-aug or astraea-sched.
    #[arg(long, env = "ASTRAEA_STRATEGY", default_value = "astraea")]
    strategy: StrategyKind,
    /// gamma: most clients per mediator.
    #[arg(long, env = "ASTRAEA_GAMMA", default_value_t = 10)]
    gamma: usize,
    /// E_m: passes of a mediator over its clients per round.
    #[arg(long, env = "ASTRAEA_MEDIATOR_PASSES", default_value_t = 2)]
    mediator_passes: usize,
    /// Speed-aware mediators: balance the chains' expected times (measured
    /// speeds times data sizes) against their label mix with this weight;
    /// unset, mediators are the papers' greedy, blind to speed.
    #[arg(long)]
    speed_weight: Option<f64>,
    /// Label counts under local differential privacy: clients report each
    /// count with discrete Laplace noise of scale 1/EPSILON (each report
    /// EPSILON-DP for any one sample); the plan and the mediators use the
    /// noisy counts.
    #[arg(long, env = "ASTRAEA_LABEL_EPSILON")]
    label_epsilon: Option<f64>,
    /// Per-hop noise: every hop's update is clipped to --hop-clip and
    /// Gaussian noise of this multiplier times the clip is added before the
    /// next client in the chain sees it (each hop the Gaussian mechanism).
    #[arg(long)]
    hop_noise: Option<f64>,
    /// Per-hop noise: the most one hop may move the model, L2 norm.
    #[arg(long, default_value_t = 0.5)]
    hop_clip: f64,
    /// Client-level differential privacy for the model (DP-FedAvg; for
    /// Astraea over mediators): Gaussian noise of this multiplier (its
    /// standard deviation over the sum's sensitivity) on every round's
    /// mean of clipped group updates; sync mode only. Needs --dp-budget.
    #[arg(long, requires = "dp_budget")]
    dp_noise: Option<f64>,
    /// DP: the epsilon (at --dp-delta) the run may spend; it stops before a
    /// round that would spend more.
    #[arg(long, requires = "dp_noise")]
    dp_budget: Option<f64>,
    /// DP: the most a group's update may move the model, L2 norm.
    #[arg(long, default_value_t = 1.0)]
    dp_clip: f64,
    /// DP: delta of the (epsilon, delta) guarantee.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// Distributed DP, with --secure-aggregation and --dp-noise: the
    /// maskers add the round's noise in shares before masking, so the
    /// server never holds it (any quorum of survivors carries all of it:
    /// more noise when more survive; docs/PRIVACY.md).
    #[arg(long, requires_all = ["secure_aggregation", "dp_noise"])]
    distributed_dp: bool,
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
    /// tau_d of the z-score plan.
    #[arg(long, env = "ASTRAEA_TAU_D", default_value_t = 3.5)]
    tau_d: f64,
    /// Use the ICCD plan with this alpha instead.
    #[arg(long, env = "ASTRAEA_ALPHA")]
    alpha: Option<f64>,
    /// E: local epochs per hop.
    #[arg(long, env = "ASTRAEA_EPOCHS", default_value_t = 1)]
    epochs: usize,
    /// Mini-batch size.
    #[arg(long, env = "ASTRAEA_BATCH", default_value_t = 20)]
    batch: usize,
    /// Adam learning rate.
    #[arg(long, env = "ASTRAEA_LR", default_value_t = 1e-3)]
    lr: f64,
    /// FedProx mu.
    #[arg(long, env = "ASTRAEA_PROX_MU", default_value_t = 0.01)]
    prox_mu: f64,
    /// How strategies combine results: mean (FedAvg's weighted mean),
    /// median, trimmed-mean[:TRIM], krum[:F], multi-krum[:F[:M]],
    /// centered-clipping[:RADIUS[:ITERATIONS]].
    #[arg(long, env = "ASTRAEA_AGGREGATION", default_value = "mean")]
    aggregation: AggregationRule,
    /// Most seconds a client has for one hop before it is skipped; a client
    /// of measured speed gets three times what its work needs, plus 5 s
    /// (at least 10 s).
    #[arg(long, env = "ASTRAEA_HOP_DEADLINE", default_value_t = 60.0)]
    hop_deadline: f64,
    /// Seconds without a heartbeat (`progress`) after which a training
    /// client is skipped as stalled; 0 turns the rule off.
    #[arg(long, env = "ASTRAEA_STALL_TIMEOUT", default_value_t = astraea_server::config::DEFAULT_STALL_TIMEOUT.as_secs_f64())]
    stall_timeout: f64,
    /// Largest WebSocket frame in bytes.
    #[arg(long, env = "ASTRAEA_MAX_FRAME_BYTES", default_value_t = astraea_core::protocol::DEFAULT_MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Send weights as f32 (twice the traffic). The default is f16, which
    /// cost no accuracy in three seeds on MNIST and one on Fashion-MNIST
    /// (docs/RESULTS.md, "f16 costs no accuracy").
    #[arg(long, env = "ASTRAEA_F32", conflicts_with = "f16")]
    f32: bool,
    /// Send weights as f16: the default; kept so that configurations
    /// written when f32 was the default still parse.
    #[arg(long, env = "ASTRAEA_F16", hide = true)]
    f16: bool,
    /// Seed of the shards, the initial model and participant sampling.
    #[arg(long, env = "ASTRAEA_SEED", default_value_t = 1)]
    seed: u64,
    /// Folder of static files served at /.
    #[arg(long, env = "ASTRAEA_STATIC_DIR", default_value = "static")]
    static_dir: PathBuf,
    /// Token for the admin actions (POST /api/admin/{pause,resume,stop}
    /// with "Authorization: Bearer TOKEN"); without one they are refused.
    #[arg(long, env = "ASTRAEA_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Folder for the SQLite database and the checkpoints; an unfinished run
    /// found there is resumed from its last completed round.
    #[arg(long, env = "ASTRAEA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Name of the run in the database.
    #[arg(long, env = "ASTRAEA_RUN_NAME", default_value = "default")]
    run_name: String,
    /// Serve HTTPS, so tabs on other machines get WebGPU (browsers give it
    /// only to secure contexts): with --tls-cert/--tls-key, or a self-signed
    /// certificate kept in the state dir (or ./tls).
    #[arg(long, env = "ASTRAEA_TLS")]
    tls: bool,
    /// Take volunteers on other machines over plain HTTP too. Without --tls
    /// and without this, only this machine's clients (and a reverse proxy
    /// here that terminates TLS) may join: weights and label counts in
    /// clear text are for anyone on the network to read.
    #[arg(long, env = "ASTRAEA_ALLOW_INSECURE")]
    allow_insecure: bool,
    /// Secure aggregation of the mediators' results: each chain's last
    /// client sends its result masked (pairwise X25519 masks, Shamir shares
    /// for dropouts), and the server learns only the round's weighted mean
    /// of them. Sync mode, mean aggregation; with --dp-noise (fixed clip
    /// only) the maskers clip their own hop and the server noises the mean.
    /// It still relays, and so sees, the chains' earlier hops
    /// (docs/PRIVACY.md).
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
    /// PEM certificate chain for --tls.
    #[arg(long, env = "ASTRAEA_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls.
    #[arg(long, env = "ASTRAEA_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The URL volunteers open, when behind a proxy (shown on the dashboard
    /// and in its QR code).
    #[arg(long, env = "ASTRAEA_PUBLIC_URL")]
    public_url: Option<String>,
}

#[derive(clap::Args)]
struct SimulateArgs {
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
    /// Partition: iid, dirichlet:ALPHA, pathological:K, long-tail:RATIO.
    #[arg(long, default_value = "long-tail:10")]
    partition: PartitionSpec,
    /// K: clients in the federation.
    #[arg(long, default_value_t = 500)]
    clients: usize,
    /// c: participants per round.
    #[arg(long, default_value_t = 50)]
    participants: usize,
    /// Rounds per run.
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
    /// Speed-aware mediators: balance the chains' expected times (measured
    /// speeds times data sizes) against their label mix with this weight;
    /// unset, mediators are the papers' greedy, blind to speed.
    #[arg(long)]
    speed_weight: Option<f64>,
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
    /// Output folder for CSVs, the plot and the summary.
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
    /// Accuracy target in percent for "rounds / bytes to reach"; default: the best accuracy of the first run.
    #[arg(long)]
    target: Option<f64>,
}

/// Adds `--key=value` for each setting of a `serve --config FILE` that is
/// neither given as a flag nor set in the environment, so the precedence is
/// flags, then ASTRAEA_* variables, then the file, then the defaults.
fn args_with_config_file(mut args: Vec<String>) -> anyhow::Result<Vec<String>> {
    if args.get(1).map(String::as_str) != Some("serve") {
        return Ok(args);
    }
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config=").map(String::from))
        })
        .or_else(|| std::env::var("ASTRAEA_CONFIG").ok());
    let Some(path) = path else { return Ok(args) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let table: toml::Table = text.parse().with_context(|| format!("parsing {path}"))?;
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let env = format!("ASTRAEA_{}", key.replace('-', "_").to_uppercase());
        let given = args
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        if given || std::env::var_os(&env).is_some() {
            continue;
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Boolean(true) => {
                args.insert(2, flag);
                continue;
            }
            toml::Value::Boolean(false) => continue,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => anyhow::bail!(
                "{path}: setting {key} = {other:?} is not a string, number or boolean"
            ),
        };
        args.insert(2, format!("{flag}={value}"));
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = args_with_config_file(std::env::args().collect())?;
    match Cli::parse_from(args).command {
        Command::Simulate(args) => simulate_command(args),
        Command::Bench(bench) => runtime()?.block_on(bench_command(bench)),
        Command::Serve(args) => runtime()?.block_on(serve_command(args)),
        Command::Client {
            server,
            ca_cert,
            data_dir,
        } => runtime()?.block_on(async {
            let options = client::ClientOptions {
                tls: tls_settings(&server, ca_cert.as_deref())?,
                ..client_options(server, data_dir, None)
            };
            let summary = client::run_client(options, Default::default()).await?;
            println!("client done: {summary:?}");
            Ok(())
        }),
        Command::Swarm {
            server,
            ca_cert,
            clients,
            data_dir,
            attack,
            attackers,
            freeze,
            freeze_for,
            speeds,
            speed_seed,
        } => runtime()?.block_on(async {
            if attackers > clients || (attackers > 0 && attack.is_none()) {
                bail!("--attackers {attackers} needs --attack and at most --clients {clients}");
            }
            let honest = client::ClientOptions {
                tls: tls_settings(&server, ca_cert.as_deref())?,
                freeze: freeze.clamp(0.0, 1.0),
                freeze_for: std::time::Duration::try_from_secs_f64(freeze_for)
                    .context("--freeze-for must be a non-negative number of seconds")?,
                ..client_options(server, data_dir, None)
            };
            let hostile = client::ClientOptions {
                attack,
                ..honest.clone()
            };
            let drawn = speeds
                .map(|m| m.draw(clients - attackers, speed_seed))
                .unwrap_or_default();
            let (mut results, hostile_results) = tokio::join!(
                client::run_swarm_with_speeds(clients - attackers, honest, &drawn),
                client::run_swarm(attackers, hostile),
            );
            results.extend(hostile_results);
            for (i, result) in results.iter().enumerate() {
                match result {
                    Ok(summary) => println!("client {i}: {summary:?}"),
                    Err(e) => println!("client {i}: {e:#}"),
                }
            }
            Ok(())
        }),
        Command::FetchData { data_dir, datasets } => {
            astraea_sim::fetch_data::fetch_data(&data_dir, &datasets)
        }
        Command::Report {
            csv,
            plot,
            title,
            target,
            markdown,
        } => {
            let runs = csv
                .iter()
                .map(|path| history_from_csv(path))
                .collect::<anyhow::Result<Vec<_>>>()?;
            report::plot_runs(&plot, &runs, &title)?;
            print_tables(&runs, target.map(|t| t / 100.0), markdown.as_deref())?;
            println!("plot: {}", plot.display());
            Ok(())
        }
    }
}

async fn bench_command(bench: BenchCommand) -> anyhow::Result<()> {
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
        BenchCommand::Idle {
            clients,
            concurrency,
            data_dir,
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
            rounds,
            seed,
            data_dir,
        } => {
            let r = astraea_bench::chaos::kills(data_dir, kills, rounds, seed).await?;
            println!("| SIGKILLs | rounds lost | rounds done / planned | finished | seconds |");
            println!("|---:|---:|---:|---|---:|");
            println!(
                "| {} | {} | {} / {} | {} | {:.0} |",
                r.kills, r.rounds_lost, r.rounds_done, r.rounds, r.finished, r.seconds
            );
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
        BenchCommand::Rounds {
            clients,
            rounds,
            strategy,
            data_dir,
        } => {
            let b = astraea_bench::rounds::run(data_dir, clients, rounds, strategy).await?;
            println!(
                "| strategy | clients | rounds | s/round | evaluation s | coordination s/round | model transfers/round |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|");
            println!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {} |",
                b.strategy.as_str(),
                b.clients,
                b.rounds,
                b.round_s,
                b.eval_s,
                b.round_s - b.eval_s,
                b.transfers
            );
        }
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The TLS settings for `--ca-cert`: `None` (the public roots) without one;
/// an error when one is given for a plain ws:// URL, where it would be
/// silently unused.
fn tls_settings(
    server: &str,
    ca_cert: Option<&std::path::Path>,
) -> anyhow::Result<Option<std::sync::Arc<client::tls::ClientConfig>>> {
    match ca_cert {
        None => Ok(None),
        Some(_) if !server.starts_with("wss://") => {
            bail!("--ca-cert is for a wss:// server; {server} is not encrypted")
        }
        Some(path) => Ok(Some(client::tls::client_config(Some(path))?)),
    }
}

fn client_options(
    server: String,
    data_dir: PathBuf,
    max_attempts: Option<u32>,
) -> client::ClientOptions {
    client::ClientOptions {
        url: server,
        tls: None,
        data_dir,
        max_frame_bytes: astraea_core::protocol::DEFAULT_MAX_FRAME_BYTES,
        max_attempts,
        echo: false,
        attack: None,
        vanish: 0.0,
        freeze: 0.0,
        freeze_for: std::time::Duration::ZERO,
        speed: None,
    }
}

async fn serve_command(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig {
        dataset: args.dataset,
        data_dir: args.data_dir,
        max_train: args.max_train,
        partition: args.partition,
        shards: args.shards,
        participants: args.participants,
        min_clients: args.min_clients,
        rounds: args.rounds,
        strategy: args.strategy,
        settings: StrategySettings {
            plan_rule: match args.alpha {
                Some(alpha) => PlanRule::Alpha { alpha },
                None => PlanRule::ZScore { tau_d: args.tau_d },
            },
            rescheduling: Rescheduling {
                gamma: args.gamma,
                passes: args.mediator_passes,
                speed_weight: args.speed_weight,
            },
            prox_mu: args.prox_mu,
            aggregation: args.aggregation,
        },
        epochs: args.epochs,
        batch_size: args.batch,
        learning_rate: args.lr,
        hop_deadline: std::time::Duration::from_secs_f64(args.hop_deadline),
        stall_timeout: std::time::Duration::try_from_secs_f64(args.stall_timeout)
            .context("--stall-timeout must be a finite, non-negative number of seconds")?,
        hop_privacy: args
            .hop_noise
            .map(|noise_multiplier| astraea_core::privacy::HopPrivacy {
                clip: args.hop_clip,
                noise_multiplier,
            }),
        model_privacy: match (args.dp_noise, args.dp_budget) {
            (Some(noise), Some(budget)) => {
                if !(noise > 0.0 && budget > 0.0 && args.dp_clip.is_finite() && args.dp_clip > 0.0)
                {
                    bail!("--dp-noise, --dp-budget and --dp-clip must be positive");
                }
                let budget_spec = astraea_core::privacy::ModelPrivacy {
                    clip: args.dp_clip,
                    noise_multiplier: noise,
                    delta: args.dp_delta,
                    adaptive: adaptive_clip(
                        args.dp_adaptive_quantile,
                        args.dp_count_noise,
                        args.participants,
                        args.gamma,
                        !matches!(args.strategy, StrategyKind::FedAvg | StrategyKind::FedProx),
                    )?,
                };
                check_count_noise(&budget_spec)?;
                Some(serve::config::ServedPrivacy {
                    budget: budget_spec,
                    max_epsilon: budget,
                    distributed: args.distributed_dp,
                })
            }
            _ => None,
        },
        label_epsilon: args.label_epsilon,
        mode: args.schedule.mode,
        buffer: args.schedule.buffer.map(|b| b.max(1)),
        max_staleness: args.schedule.max_staleness,
        max_update_ratio: args.guard.max_update_ratio,
        validation_samples: args.guard.validation_samples,
        max_loss_increase: args.guard.max_loss_increase,
        max_frame_bytes: args.max_frame_bytes,
        encoding: if args.f32 {
            WeightEncoding::F32
        } else {
            WeightEncoding::F16
        },
        seed: args.seed,
        static_dir: args.static_dir,
        allow_insecure: args.allow_insecure,
        secure_aggregation: args.secure_aggregation,
        secure_quorum: args.secure_quorum,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some(serve::tls::TlsSource::Files { cert, key }),
            _ if args.tls => Some(serve::tls::TlsSource::SelfSigned {
                dir: args
                    .state_dir
                    .as_ref()
                    .map_or_else(|| PathBuf::from("tls"), |d| d.join("tls")),
            }),
            _ => None,
        },
        admin_token: args.admin_token.map(Into::into),
        state_dir: args.state_dir,
        run_name: args.run_name,
        public_url: args.public_url,
    };
    let listener = tokio::net::TcpListener::bind(&args.bind)
        .await
        .with_context(|| format!("binding {}", args.bind))?;
    let address = listener.local_addr()?;
    let running = serve::start(listener, config).await?;
    let url = running.state.join_url.clone();
    println!("astraea serving on {address}");
    println!("  volunteers open   {url}");
    println!("  the dashboard is  {url}dashboard");
    if address.ip().is_loopback() {
        println!(
            "  (only this machine can join: --bind 0.0.0.0:{} accepts the LAN)",
            address.port()
        );
    } else if let Some(serve::tls::TlsSource::SelfSigned { dir }) = &running.state.config.tls {
        println!(
            "  native clients    astraea client --server wss://{}/ws --ca-cert {}",
            // The address the self-signed certificate names, not a
            // --public-url's host (a proxy's, which it does not).
            serve::tls::join_url(true, address)
                .trim_start_matches("https://")
                .trim_end_matches('/'),
            dir.join("cert.pem").display()
        );
    } else if !serve::tls::is_secure_origin(&url) {
        println!(
            "  (without --tls, volunteers on other machines are refused unless --allow-insecure; their tabs would train on the CPU: browsers give WebGPU only to HTTPS pages)"
        );
    }
    tokio::select! {
        outcome = running.coordinator => {
            outcome??;
            println!("run finished; still serving the results, Ctrl-C to stop");
            tokio::signal::ctrl_c().await?;
        }
        _ = tokio::signal::ctrl_c() => println!("stopping"),
    }
    Ok(())
}

fn simulate_command(args: SimulateArgs) -> anyhow::Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = SimConfig {
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
        max_update_ratio: args.guard.max_update_ratio,
        validation_samples: args.guard.validation_samples,
        max_loss_increase: args.guard.max_loss_increase,
        speed_weight: args.speed_weight,
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
        mode: args.schedule.mode,
        buffer: args.schedule.buffer.map(|b| b.max(1)),
        max_staleness: args.schedule.max_staleness,
        population: astraea_sim::population::Population {
            speeds: args.speeds,
            freeze: args.freeze.clamp(0.0, 1.0),
            overhead_s: args.hop_overhead.max(0.0),
            hop_deadline_s: args.hop_deadline.max(0.0),
            stall_timeout_s: args.stall_timeout.max(0.0),
        },
        threads,
        out_dir: args.out.clone(),
        target_accuracy: args.target.map(|t| t / 100.0),
    };
    let mut specs = Vec::new();
    for &seed in &args.seeds {
        for name in &args.strategies {
            specs.push(RunSpec::parse(name, seed).map_err(anyhow::Error::msg)?);
        }
    }
    if specs.is_empty() {
        bail!("no runs: give at least one strategy and one seed");
    }
    let (train, test) = load_named(&config.dataset, &config.data_dir)
        .with_context(|| format!("loading {}", config.dataset))?;
    let train = match args.max_train {
        Some(n) if n < train.len() => train.subset(&(0..n).collect::<Vec<_>>()),
        _ => train,
    };
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

/// Prints the per-run summary and, when a FedAvg run is among them, the
/// comparison against it; optionally writes both as Markdown.
/// Adaptive clipping from the DP flags: the paper's step (eta_C 0.2) and,
/// unless given, its count noise (the groups expected a round over 20:
/// `participants` clients, in mediators of `gamma` when `chains`).
fn adaptive_clip(
    quantile: Option<f64>,
    count_noise: Option<f64>,
    participants: usize,
    gamma: usize,
    chains: bool,
) -> anyhow::Result<Option<astraea_core::privacy::AdaptiveClip>> {
    let Some(quantile) = quantile else {
        if count_noise.is_some() {
            bail!("--dp-count-noise needs --dp-adaptive-quantile");
        }
        return Ok(None);
    };
    if !(quantile > 0.0 && quantile < 1.0) {
        bail!("--dp-adaptive-quantile must lie between 0 and 1, got {quantile}");
    }
    let per_group = if chains { gamma.max(1) } else { 1 };
    let groups = (participants as f64 / per_group as f64).max(1.0);
    let count_noise = count_noise.unwrap_or(groups / 20.0);
    if !(count_noise.is_finite() && count_noise > 0.0) {
        bail!("--dp-count-noise must be positive, got {count_noise}");
    }
    let adaptive = astraea_core::privacy::AdaptiveClip {
        quantile,
        learning_rate: 0.2,
        count_noise,
    };
    adaptive.check().map_err(anyhow::Error::msg)?;
    Ok(Some(adaptive))
}

/// Refuses adaptive clipping whose count noise alone would spend more than
/// the run's noise multiplier allows.
fn check_count_noise(dp: &astraea_core::privacy::ModelPrivacy) -> anyhow::Result<()> {
    if dp.update_noise_multiplier().is_none() {
        bail!(
            "adaptive clipping: count noise {} is too small for noise multiplier {:.3} (it must exceed it); \
             raise --dp-count-noise or take more participants a round",
            dp.adaptive.map_or(0.0, |a| a.count_noise),
            dp.noise_multiplier
        );
    }
    Ok(())
}

fn print_tables(
    runs: &[report::RunHistory],
    target: Option<f64>,
    markdown: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    println!("{}", report::summary_table(runs, target));
    let comparison = report::compare(runs, "fedavg", "fedavg-iid");
    if !comparison.is_empty() {
        println!("{}", report::comparison_table(&comparison, "fedavg"));
    }
    if let Some(path) = markdown {
        let mut text = report::markdown_table(runs, target);
        if !comparison.is_empty() {
            text.push('\n');
            text.push_str(&report::comparison_markdown(&comparison, "fedavg"));
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A run's history read back from its CSV; the label is the file name
/// (`astraea-s1`), the strategy and seed come from it.
fn history_from_csv(path: &std::path::Path) -> anyhow::Result<report::RunHistory> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{} has no usable file name", path.display()))?;
    let (strategy, seed) = match stem.rsplit_once("-s") {
        Some((name, seed)) => (name.to_string(), seed.parse().unwrap_or(0)),
        None => (stem.to_string(), 0),
    };
    Ok(report::RunHistory {
        label: format!("{strategy} s{seed}"),
        strategy,
        seed,
        rounds: report::read_csv(path)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_fills_in_what_the_flags_leave_out() {
        // Prepare
        let path = std::env::temp_dir().join(format!("astraea-config-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "rounds = 7\nmin_clients = 4\nf16 = true\nstrategy = \"fedavg\"\n",
        )
        .unwrap();
        let args: Vec<String> = [
            "astraea",
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--rounds",
            "3",
        ]
        .map(String::from)
        .to_vec();

        // Execute
        let args = args_with_config_file(args).unwrap();
        let Command::Serve(serve) = Cli::parse_from(&args).command else {
            panic!("not serve: {args:?}")
        };

        // Assert: the flag wins, the file fills the rest.
        assert_eq!(serve.rounds, 3);
        assert_eq!(serve.min_clients, 4);
        assert!(serve.f16);
        assert_eq!(serve.strategy, StrategyKind::FedAvg);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn serve_sends_f16_unless_told_f32() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["astraea", "serve"];
            args.extend_from_slice(extra);
            let Command::Serve(serve) = Cli::try_parse_from(args)?.command else {
                panic!("not serve")
            };
            Ok::<_, clap::Error>(serve.f32)
        };
        assert!(!parse(&[]).unwrap(), "f16 by default");
        assert!(parse(&["--f32"]).unwrap());
        assert!(!parse(&["--f16"]).unwrap(), "the old flag still parses");
        assert!(
            parse(&["--f16", "--f32"]).is_err(),
            "both is a contradiction"
        );
    }
}
