//! What a served run is made of.

use std::path::PathBuf;
use std::time::Duration;

use astraea_core::engine::{GuardSettings, Schedule};
use astraea_core::partition::PartitionSpec;
use astraea_core::protocol::WeightEncoding;
use astraea_core::strategy::{StrategyKind, StrategySettings};

/// Default of [`ServeConfig::stall_timeout`]: clients send a heartbeat at
/// least every second while training, so 8 s of silence is a frozen or
/// vanished client, and a frozen tab costs its chain under 10 s.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(8);

/// A value that must never be printed, logged or stored: its `Debug` shows
/// `<redacted>`, so the run's configuration can be recorded as it is.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

/// Client-level DP on a served run: the mechanism, and the budget at which
/// the run stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServedPrivacy {
    /// Clip, noise multiplier and delta.
    pub budget: astraea_core::privacy::ModelPrivacy,
    /// The run stops before a round that would spend more than this
    /// epsilon (at `budget.delta`).
    pub max_epsilon: f64,
    /// Distributed DP, under secure aggregation only: the maskers add the
    /// round's noise in shares before masking
    /// (`astraea_core::privacy::distributed_noise_share`), so the server
    /// never holds the noise and cannot take it off; `false`: the server
    /// adds it to the unmasked mean.
    pub distributed: bool,
}

/// Settings of one served run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Dataset of the demo shards and of the server's test set.
    pub dataset: String,
    /// Folder holding the datasets.
    pub data_dir: PathBuf,
    /// Use only the first this many training samples (small demos, tests).
    pub max_train: Option<usize>,
    /// How the training set is cut into demo shards.
    pub partition: PartitionSpec,
    /// K: demo shards; the run's n-th demo client gets shard (n - 1) mod K
    /// (`AppState::demo_shard`).
    pub shards: usize,
    /// c: participants per round.
    pub participants: usize,
    /// Clients that must be ready before a round starts.
    pub min_clients: usize,
    /// Rounds to run (in the asynchronous mode, global versions).
    pub rounds: u32,
    /// The strategy.
    pub strategy: StrategyKind,
    /// Its knobs.
    pub settings: StrategySettings,
    /// Local epochs per hop (E).
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Most time a client has for one hop before it is skipped; a client
    /// of known speed gets less (`state::hop_deadline`).
    pub hop_deadline: Duration,
    /// Longest silence allowed during a hop: a client that sends no
    /// `progress` (nor its update) for this long is skipped as stalled.
    /// Zero turns the rule off.
    pub stall_timeout: Duration,
    /// Label privacy: clients report their label counts with discrete
    /// Laplace noise for this epsilon per report (`welcome.privacy`);
    /// `None` asks for exact counts.
    pub label_epsilon: Option<f64>,
    /// Client-level DP for the model (DP-FedAvg; DP-Astraea over
    /// mediators), synchronous rounds only; `None` trains without.
    pub model_privacy: Option<ServedPrivacy>,
    /// Per-hop noise on what the next client in a chain sees
    /// (`astraea_core::privacy::noisy_hop`); `None`: none.
    pub hop_privacy: Option<astraea_core::privacy::HopPrivacy>,
    /// Secure aggregation of the mediators' results (`crate::secure`): the
    /// chains' last clients send their results masked and the server
    /// learns only the round's weighted mean. Synchronous rounds and the
    /// sample-weighted mean only; with client-level DP the clip is fixed
    /// (no adaptive clipping), and the maskers may add the noise
    /// ([`ServedPrivacy::distributed`]).
    pub secure_aggregation: bool,
    /// Under secure aggregation, the share of a round's maskers that must
    /// survive for its sum to be unmasked (the Shamir threshold, at least
    /// a majority; `astraea_core::secagg::SecAggParams::quorum`). 0.5
    /// gives the majority.
    pub secure_quorum: f64,
    /// Synchronous rounds, or the asynchronous mode
    /// (`astraea_core::engine::buffered`): groups start when clients are
    /// free and fold into the model as they finish.
    pub schedule: Schedule,
    /// The update guard and its loss rule.
    pub guard: GuardSettings,
    /// Largest WebSocket frame accepted or sent.
    pub max_frame_bytes: usize,
    /// Encoding of the weights the server sends.
    pub encoding: WeightEncoding,
    /// Seed of the partition, the initial model and participant sampling.
    pub seed: u64,
    /// Folder of static files served at `/`.
    pub static_dir: PathBuf,
    /// Bearer token for the admin actions; `None` refuses them all. Never
    /// printed or stored (see [`Secret`]).
    pub admin_token: Option<Secret>,
    /// Folder of the database and checkpoints; `None` keeps nothing.
    pub state_dir: Option<PathBuf>,
    /// A PostgreSQL URL to keep the run in instead (`postgres://…`), so
    /// several servers can share it: the one holding the run's lease leads,
    /// the others wait and take over (see `store::lease`). Redacted in the
    /// stored configuration (it may hold a password). Exclusive with
    /// `state_dir`.
    pub postgres: Option<Secret>,
    /// How the run's lease is held (PostgreSQL only).
    pub lease: crate::store::LeaseSettings,
    /// Name of the run in the database: an unfinished run of this name is
    /// resumed from its last completed round.
    pub run_name: String,
    /// Take clients on other machines over plain HTTP too: without TLS and
    /// without this, only clients on this machine (loopback, a reverse
    /// proxy that terminates TLS) may join.
    pub allow_insecure: bool,
    /// Serve HTTPS with this certificate; `None` serves plain HTTP.
    pub tls: Option<crate::tls::TlsSource>,
    /// The URL volunteers open, when the server cannot know it (behind a
    /// proxy); by default it is made from the bound address.
    pub public_url: Option<String>,
    /// Joins a source may make (`crate::admission`): a burst, then so many
    /// a minute; `per_minute` 0 lifts the limit.
    pub join_rate: crate::admission::JoinRate,
    /// Pace steering: joins a second this server asks a returning
    /// population to arrive at. Its clients hear, in `welcome` and every
    /// `round-done`, a window of (clients held / rate) seconds, at most
    /// `pace::MAX_REJOIN_WINDOW`, over which to spread coming back after
    /// losing it (a gateway or leader that died). 0 asks for no window.
    pub rejoin_rate: f64,
    /// This server is a gateway of a run kept in PostgreSQL: it never
    /// leads; it holds volunteers and runs the chains of the mediators
    /// the run's leader places on it, giving back one partial a round
    /// (`crate::gateway`, `astraea_core::engine::hierarchy`). Needs
    /// `postgres` and a run whose rounds fold across gateways
    /// ([`ServeConfig::across_gateways`]).
    pub gateway: bool,
}

impl Default for ServeConfig {
    /// `astraea serve`'s defaults (its flags without arguments), but for
    /// the encoding (f32 here; the command line sends f16 unless `--f32`):
    /// tests, benchmarks and embedders change what they need with
    /// `ServeConfig { field, ..ServeConfig::default() }`.
    fn default() -> Self {
        use astraea_core::astraea::PlanRule;
        use astraea_core::strategy::Rescheduling;
        Self {
            dataset: "mnist".into(),
            data_dir: PathBuf::from("data"),
            max_train: None,
            partition: "long-tail:10".parse().expect("a valid partition"),
            shards: 100,
            participants: 20,
            min_clients: 2,
            rounds: 50,
            strategy: StrategyKind::Astraea,
            settings: StrategySettings {
                plan_rule: PlanRule::ZScore { tau_d: 3.5 },
                rescheduling: Rescheduling {
                    gamma: 10,
                    passes: 2,
                    scheduler: astraea_core::astraea::Scheduler::Greedy,
                },
                prox_mu: 0.01,
                aggregation: Default::default(),
            },
            epochs: 1,
            batch_size: 20,
            learning_rate: 1e-3,
            hop_deadline: Duration::from_secs(60),
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            label_epsilon: None,
            model_privacy: None,
            hop_privacy: None,
            secure_aggregation: false,
            secure_quorum: 0.5,
            schedule: Schedule::default(),
            guard: GuardSettings::default(),
            max_frame_bytes: astraea_core::protocol::DEFAULT_MAX_FRAME_BYTES,
            encoding: WeightEncoding::F32,
            seed: 1,
            static_dir: PathBuf::from("static"),
            admin_token: None,
            state_dir: None,
            postgres: None,
            lease: crate::store::LeaseSettings::default(),
            run_name: "default".into(),
            allow_insecure: false,
            tls: None,
            public_url: None,
            join_rate: crate::admission::JoinRate::default(),
            rejoin_rate: DEFAULT_REJOIN_RATE,
            gateway: false,
        }
    }
}

/// `--rejoin-rate`'s default, joins a second: 10,000 volunteers come back
/// over 50 s, the demo's handful at once.
pub const DEFAULT_REJOIN_RATE: f64 = 200.0;

/// The smallest frame limit `--max-frame-bytes` takes (a chunk header and
/// a thousand weights; a `join` of many classes may need more).
pub const MIN_FRAME_BYTES: usize = 4 * 1024;
/// The largest frame limit `--max-frame-bytes` takes.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

impl ServeConfig {
    /// Whether this run's rounds can be trained across gateways
    /// (`astraea_core::engine::hierarchy`), mediators planned from the
    /// clients of one gateway at a time: the sample-weighted mean folds
    /// (each gateway gives back its partial); a robust rule and
    /// client-level DP take every mediator's result in one place (each
    /// gateway gives back each result,
    /// [`ServeConfig::gateways_give_back_every_result`]); the augmentation
    /// plan reads the counts summed (the leader plans from its clients'
    /// and each gateway's sum, `coordinator::send_plan`). What needs the
    /// clients themselves in one place is refused, never computed
    /// otherwise: secure aggregation (and distributed DP on it) unmasks
    /// one sum of every client's masked result, the loss rule judges
    /// every hop against one history, the asynchronous mode folds groups
    /// one by one as they end.
    ///
    /// # Errors
    /// What is refused, and what to run instead.
    pub fn across_gateways(&self) -> Result<(), String> {
        let why: String = if self.secure_aggregation {
            "secure aggregation unmasks one sum of the clients' masked results in one place".into()
        } else if self.model_privacy.is_some_and(|dp| dp.distributed) {
            "distributed DP rides on secure aggregation".into()
        } else if self.guard.validation_samples > 0 {
            "the loss rule judges every hop against one window of them; \
             pass --validation-samples 0"
                .into()
        } else if self.schedule.mode == astraea_core::asynchronous::Mode::Async {
            "the asynchronous mode folds each group as it ends, in one place".into()
        } else {
            return Ok(());
        };
        Err(format!("not across gateways: {why}"))
    }

    /// Whether a gateway of this run gives back each of its mediators'
    /// results rather than their partial (their sample-weighted mean):
    /// where the leader's rule needs every result — a robust rule
    /// (`--aggregation`), client-level DP (each result clipped, one noise
    /// on the sum: DP-FedAvg). The leader then takes the round as one
    /// server would, at the cost of a model's weights per mediator through
    /// the store.
    pub fn gateways_give_back_every_result(&self) -> bool {
        self.settings.aggregation != Default::default() || self.model_privacy.is_some()
    }

    /// Whether the run's strategy plans augmentation from the clients'
    /// label counts (Astraea and its augmentation ablation).
    pub fn plans_augmentation(&self) -> bool {
        matches!(
            self.strategy,
            StrategyKind::Astraea | StrategyKind::AstraeaAugmentation
        )
    }

    /// A fingerprint (SHA-256, hex) of what decides a hop and a chain:
    /// the data and its shards, the strategy and its knobs, the local
    /// training, the deadlines, the guard, the privacy of hops and counts,
    /// whether the model is trained under DP, the encoding and the seed. The leader sends it with the work it
    /// places; a gateway whose own differs refuses the work (a gateway
    /// started with other flags would change the run silently). What
    /// only the leader decides (rounds, participants, the store) is left
    /// out.
    pub fn training_fingerprint(&self) -> String {
        use sha2::Digest;
        let decides = format!(
            "{:?}",
            (
                (&self.dataset, self.max_train, &self.partition, self.shards),
                (self.strategy, &self.settings),
                (self.epochs, self.batch_size, self.learning_rate.to_bits()),
                (self.hop_deadline, self.stall_timeout),
                (
                    &self.guard,
                    self.hop_privacy,
                    self.label_epsilon.map(f64::to_bits)
                ),
                // Under client-level DP a gateway gives back every result
                // for the leader to clip: a gateway without it would fold
                // them unclipped. (The mechanism and budget are the
                // leader's alone.)
                self.model_privacy.is_some(),
                (self.encoding, self.max_frame_bytes, self.seed),
            )
        );
        hex::encode(sha2::Sha256::digest(decides.as_bytes()))
    }

    /// The run's numbers as the engine bounds them
    /// ([`astraea_core::engine::RunNumbers::validate`], as simulate's are).
    pub fn numbers(&self) -> astraea_core::engine::RunNumbers {
        astraea_core::engine::RunNumbers {
            rounds: self.rounds,
            participants: self.participants,
            min_clients: self.min_clients,
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            prox_mu: self.settings.prox_mu,
            mediator_size: self.settings.rescheduling.gamma,
            mediator_passes: self.settings.rescheduling.passes,
            plan_threshold: self.settings.plan_rule.threshold(),
        }
    }

    /// The run's rules as the round engine takes them (validated by
    /// [`astraea_core::engine::RunPolicy::validate`], as simulate's are).
    /// A served run's participants are drawn in the open (the dashboard
    /// shows them): the accountant takes no credit for sampling.
    pub fn policy(&self) -> astraea_core::engine::RunPolicy {
        astraea_core::engine::RunPolicy {
            schedule: self.schedule,
            participants: self.participants,
            aggregation: self.settings.aggregation,
            model_privacy: self.model_privacy.map(|dp| dp.budget),
            max_epsilon: self.model_privacy.map(|dp| dp.max_epsilon),
            distributed_dp: self.model_privacy.is_some_and(|dp| dp.distributed),
            sampling: astraea_core::engine::Sampling::Public,
            hop_privacy: self.hop_privacy,
            label_epsilon: self.label_epsilon,
            secure_aggregation: self.secure_aggregation,
            secure_quorum: self.secure_quorum,
            guard: self.guard,
        }
    }
}
