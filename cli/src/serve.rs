//! `astraea serve`: its flags, its `--config` file, and the served federation.

use std::path::PathBuf;

use anyhow::{Context, bail};
use astraea_core::astraea::PlanRule;
use astraea_core::partition::PartitionSpec;
use astraea_core::protocol::WeightEncoding;
use astraea_core::robust::AggregationRule;
use astraea_core::strategy::{Rescheduling, StrategyKind, StrategySettings};
use astraea_server::{self as serve, ServeConfig};

use crate::args::{GuardArgs, ScheduleArgs};
use crate::shared::{adaptive_clip, check_count_noise};
use astraea_core::engine::hop::hop_limit;

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
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
    /// Rounds to run (in the asynchronous mode, global versions).
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
    #[command(flatten)]
    scheduler: crate::args::SchedulerArgs,
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
    /// Across --gateway servers each gives back every mediator's result
    /// and the leader clips and noises them (docs/PRIVACY.md); give the
    /// gateways --dp-noise and --dp-budget too (no ASTRAEA_* variable).
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
    /// centered-clipping[:RADIUS[:ITERATIONS]]. Robust rules work across
    /// --gateway servers (each gives back every mediator's result).
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
    /// Keep the run in PostgreSQL instead of a state dir
    /// (postgres://user:password@host:port/database), so several `astraea
    /// serve` processes can share it: the one holding the run's lease
    /// leads, the others wait and take over within seconds when it goes
    /// (or, with --gateway, serve beside the leader without ever leading).
    #[arg(long, env = "ASTRAEA_STORE", conflicts_with = "state_dir", value_parser = postgres_url)]
    store: Option<String>,
    /// Name of the run in the database (1 to 200 bytes: it is the payload
    /// of the run's notifications, which PostgreSQL caps at 8,000). Every
    /// server of a run, gateways included, gives the same name; a
    /// finished run keeps it.
    #[arg(long, env = "ASTRAEA_RUN_NAME", default_value = "default", value_parser = run_name)]
    run_name: String,
    /// Seconds the leader's lease lasts unrenewed (--store; renewed every
    /// third of it), 1 to 600: a paused leader is replaced after this, and
    /// a leader that cannot renew within it (an overloaded machine, a slow
    /// database) stops leading. Every server of a run should use one value.
    #[arg(
        long,
        env = "ASTRAEA_LEASE_TTL",
        default_value_t = 3.0,
        requires = "store"
    )]
    lease_ttl: f64,
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
    /// Joins a minute one source may make after its burst (--join-burst):
    /// a volunteer socket over it is refused with 429 and Retry-After. A
    /// source is the peer's address (an IPv6 /64), or for a reverse proxy
    /// on this machine the address it appends to X-Forwarded-For; this
    /// machine's own clients are not limited. 0 lifts the limit.
    #[arg(long, env = "ASTRAEA_JOIN_RATE", default_value_t = astraea_server::admission::JoinRate::default().per_minute)]
    join_rate: u32,
    /// Joins one source may make at once before --join-rate applies.
    #[arg(long, env = "ASTRAEA_JOIN_BURST", default_value_t = astraea_server::admission::JoinRate::default().burst)]
    join_burst: u32,
    /// Pace steering: joins a second to spread returning volunteers over.
    /// Clients hear a window of (clients held / this) seconds, at most 120,
    /// in their welcome and after every round, and spread coming back over
    /// it when they lose this server, instead of all at once. 0: none.
    #[arg(long, env = "ASTRAEA_REJOIN_RATE", default_value_t = astraea_server::config::DEFAULT_REJOIN_RATE)]
    rejoin_rate: f64,
    /// Serve as a gateway of the run in --store and --run-name: never
    /// lead; hold volunteers and train the mediators the run's leader
    /// places here, giving back their sample-weighted mean a round (each
    /// mediator's result under a robust --aggregation or --dp-noise).
    /// Start it with the leader's training flags, or it gets no share.
    /// Refused at start-up: --secure-aggregation, --mode async and the
    /// loss rule (pass --validation-samples 0; the default is on).
    #[arg(long, env = "ASTRAEA_GATEWAY", requires = "store")]
    gateway: bool,
    /// Secure aggregation of the mediators' results: each chain's last
    /// client sends its result masked (pairwise X25519 masks, Shamir shares
    /// for dropouts), and the server learns only the round's weighted mean
    /// of them. Sync mode, mean aggregation; with --dp-noise (fixed clip
    /// only) the maskers clip their own hop and the server noises the mean.
    /// It still relays, and so sees, the chains' earlier hops
    /// (docs/PRIVACY.md). Not across --gateway servers: a gateway refuses
    /// to start, and a leader leaves its gateways idle.
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

/// `--run-name`: 1 to 200 bytes.
fn run_name(text: &str) -> Result<String, String> {
    if (1..=200).contains(&text.len()) {
        Ok(text.to_string())
    } else {
        Err(format!("1 to 200 bytes, not {}", text.len()))
    }
}

/// `--store`: a PostgreSQL URL (the embedded SQLite store is --state-dir).
fn postgres_url(text: &str) -> Result<String, String> {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        Ok(text.to_string())
    } else {
        Err("a PostgreSQL URL, postgres://user:password@host:port/database (for the embedded SQLite store, give --state-dir DIR instead)".into())
    }
}

/// Adds `--key=value` for each setting of a `serve --config FILE` that is
/// neither given as a flag nor set in the environment, so the precedence is
/// flags, then ASTRAEA_* variables, then the file, then the defaults.
pub(crate) fn args_with_config_file(mut args: Vec<String>) -> anyhow::Result<Vec<String>> {
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

/// Binds the address, starts the server and serves until the run ends
/// (then until Ctrl-C).
pub(crate) async fn serve_command(args: ServeArgs) -> anyhow::Result<()> {
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
                scheduler: args.scheduler.scheduler(args.schedule.mode)?,
            },
            prox_mu: args.prox_mu,
            aggregation: args.aggregation,
        },
        epochs: args.epochs,
        batch_size: args.batch,
        learning_rate: args.lr,
        hop_deadline: hop_limit("--hop-deadline", args.hop_deadline, false)
            .map_err(anyhow::Error::msg)?,
        stall_timeout: hop_limit("--stall-timeout", args.stall_timeout, true)
            .map_err(anyhow::Error::msg)?,
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
        schedule: args.schedule.into(),
        guard: args.guard.into(),
        max_frame_bytes: args.max_frame_bytes,
        encoding: if args.f32 {
            WeightEncoding::F32
        } else {
            WeightEncoding::F16
        },
        seed: args.seed,
        static_dir: args.static_dir,
        allow_insecure: args.allow_insecure,
        join_rate: astraea_server::admission::JoinRate {
            per_minute: args.join_rate,
            burst: args.join_burst,
        }
        .validate()
        .map_err(anyhow::Error::msg)?,
        rejoin_rate: args.rejoin_rate,
        gateway: args.gateway,
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
        postgres: args.store.map(Into::into),
        lease: serve::store::LeaseSettings {
            ttl: lease_ttl(args.lease_ttl)?,
            ..serve::store::LeaseSettings::default()
        },
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

/// `--lease-ttl`, checked: finite, 1 to 600 seconds.
fn lease_ttl(seconds: f64) -> anyhow::Result<std::time::Duration> {
    if !(1.0..=600.0).contains(&seconds) {
        anyhow::bail!("--lease-ttl must be 1 to 600 seconds, not {seconds}");
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    #[test]
    fn the_store_takes_a_postgres_url_and_not_beside_a_state_dir() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["astraea", "serve"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(parse(&["--store", "postgres://u@127.0.0.1:5432/astraea"]).is_ok());
        assert!(parse(&["--store", "postgresql://u@db/astraea"]).is_ok());
        let path = parse(&["--store", "state/astraea.db"]).unwrap_err();
        assert!(path.contains("--state-dir"), "{path}");
        let both = parse(&["--store", "postgres://u@db/a", "--state-dir", "s"]).unwrap_err();
        assert!(both.contains("cannot be used with"), "{both}");
    }

    #[test]
    fn a_run_name_longer_than_a_notification_may_carry_is_refused() {
        let parse = |name: &str| {
            Cli::try_parse_from(["astraea", "serve", "--run-name", name])
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(parse("course-2026").is_ok());
        assert!(parse(&"r".repeat(200)).is_ok());
        let long = parse(&"r".repeat(9000)).unwrap_err();
        assert!(long.contains("1 to 200 bytes"), "{long}");
        assert!(parse("").is_err());
    }

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
