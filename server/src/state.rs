//! The server's shared state: who is connected, what they hold, and how the
//! run is going. Locks are held only for short bookkeeping, never across an
//! await.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use astraea_core::export::ModelCard;
use astraea_core::protocol::{ModelSpec, ServerMessage};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::ServeConfig;
use astraea_core::metrics::RoundRecord;

/// Runs `f`, which waits on the run's store (its mutex, its database), so
/// that a slow store never holds one of the runtime's worker threads: on a
/// multi-threaded runtime the worker hands its other tasks on first
/// (`tokio::task::block_in_place`), so sockets, pages and heartbeats go on
/// while joins and records wait. Elsewhere (a current-thread runtime, a
/// plain thread) it runs `f` as it is.
pub fn off_the_workers<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Locks `mutex`, going on past a poisoned lock: a panic in one connection
/// or round must not take every later lock, and so the process, down with
/// it. Every critical section here leaves its data consistent before any
/// call that could panic.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A frame queued for one client's socket.
#[derive(Debug)]
pub enum Outbound {
    /// A JSON text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
    /// Close the socket after what is queued.
    Close,
}

/// A client's answer to one hop.
#[derive(Debug)]
pub struct HopReply {
    /// The weights after training.
    pub weights: Vec<f32>,
    /// Samples the client trained on.
    pub samples: u64,
    /// Mean training loss.
    pub loss: f64,
}

/// What arrived for a hop: its update, or why the guard's outlier rule
/// refused it while keeping its client (`guard::GuardRefusal::drops_client`).
#[derive(Debug)]
pub enum HopAnswer {
    /// An update that passed the guard.
    Update(HopReply),
    /// Refused by the guard's rule 3, for this reason (the `ack` reason).
    Refused(String),
}

/// A hop the coordinator is waiting for.
#[derive(Debug)]
pub struct Pending {
    /// Round of the task.
    pub round: u32,
    /// Hop of the task.
    pub hop: u32,
    /// Where the reply goes.
    pub reply: oneshot::Sender<HopAnswer>,
    /// The weights sent, to measure how far the update moved them.
    pub sent: std::sync::Arc<Vec<f32>>,
    /// The client's last sign of life during the hop: the task sent, then
    /// each `progress`, `update` and chunk for this hop.
    pub alive: std::time::Instant,
    /// The hop answers masked (secure aggregation's last hop of a chain):
    /// the update comes in the `masked` encoding and skips the guard,
    /// which cannot read it.
    pub masked: bool,
}

/// One connected client.
#[derive(Debug)]
pub struct ClientEntry {
    /// Backend the client trains on.
    pub backend: String,
    /// Its socket's outgoing queue.
    pub tx: mpsc::UnboundedSender<Outbound>,
    /// Label counts before any plan: its demo shard's, which the server
    /// knows, or an own-data client's first report.
    pub raw_counts: Option<Vec<usize>>,
    /// The demo shard's true label counts, when it has one: its reports
    /// are checked against them.
    pub shard_counts: Option<Vec<usize>>,
    /// Its demo slot, when it has a demo shard ([`AppState::demo_shard`]).
    pub demo_slot: Option<u64>,
    /// The number of its latest move to this server in the run's feed of
    /// moves ([`AppState::client_moved`]); 0 for a client that joined here
    /// and never moved. A later move elsewhere lets it go.
    pub moved: u64,
    /// Label counts usable for scheduling: post-plan when a plan exists.
    pub counts: Option<Vec<usize>>,
    /// Samples in `counts`, summed: the most an update may claim.
    pub samples: u64,
    /// Whether the plan was sent to it.
    pub plan_sent: bool,
    /// The hop it is working on.
    pub pending: Option<Pending>,
    /// Hops it has answered.
    pub hops_done: u64,
    /// Samples it has trained on, over all its hops and epochs.
    pub samples_trained: u64,
    /// Its standing with the loss rule: refusals in a row, and the round
    /// it sits out until (`astraea_core::engine::draw::Standing`). Kept
    /// when it resumes.
    pub standing: astraea_core::engine::draw::Standing,
    /// Its training speed in samples per second: the `speed` its join
    /// stated (its backend trial), then as the server measured its hops
    /// (samples times epochs over the time from task to update).
    pub speed: Option<f64>,
    /// The secret it may rejoin with as itself (`join.resume`).
    pub resume_token: String,
    /// Its last hop was skipped for silence (stalled or past its deadline)
    /// and it has sent nothing since: a frozen tab or a locked phone is
    /// not drawn again until it speaks (any frame clears this).
    pub silent: bool,
    /// It said it is pausing (`POST /api/lifecycle`: a tab being frozen, a
    /// phone whose screen locked): its hop was skipped at once and it is not
    /// drawn until it says it is active again or sends any frame.
    pub paused: bool,
    /// When it said so: frames sent before the pause can still arrive just
    /// after it (HTTP and the socket are not ordered), so only a frame
    /// [`PAUSE_GRACE`] later says it runs again.
    pub paused_at: Option<std::time::Instant>,
}

/// How long after a pause a frame from the client is taken as still in
/// flight from before it rather than a sign it runs again.
pub const PAUSE_GRACE: Duration = Duration::from_secs(2);

impl ClientEntry {
    /// Whether it should be left out of the draw while others are free:
    /// silent since a skipped hop, or paused.
    pub fn resting(&self) -> bool {
        self.silent || self.paused
    }
}

/// How long a departed client's place is kept for it to resume.
pub const RESUME_WINDOW: Duration = Duration::from_secs(600);

/// Most departed clients kept at once (each holds its counts and shard
/// indices); beyond it, a departure is not kept.
pub const MAX_PARKED: usize = 10_000;

/// A client that left, kept for [`RESUME_WINDOW`] so that it can come back
/// as itself: same id, same shard, same counts, same measured speed.
#[derive(Debug)]
pub struct Parked {
    /// Its id.
    pub id: u64,
    /// Its entry as it left (no pending hop).
    pub entry: ClientEntry,
    /// When it left.
    pub since: std::time::Instant,
}

/// A fresh resume token: 128 bits from the operating system's random
/// source, as 32 hex digits.
///
/// # Panics
/// If the operating system has no random source (the server could not
/// keep any secret then).
pub fn new_resume_token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    hex::encode(bytes)
}

/// Whether `given` is `token`, in time that does not depend on where they
/// differ (a resume token authenticates a live client).
pub fn token_matches(token: &str, given: &str) -> bool {
    use subtle::ConstantTimeEq;
    token.len() == given.len() && bool::from(token.as_bytes().ct_eq(given.as_bytes()))
}

pub use astraea_core::engine::hop::{MIN_HOP_DEADLINE, hop_deadline};

impl ClientEntry {
    /// Folds one hop's measured speed (samples per second) into
    /// [`ClientEntry::speed`]: an even mix of the old and the new, so a
    /// client that slows down (a throttled phone) is seen within a few hops.
    pub fn observe_speed(&mut self, measured: f64) {
        if !(measured.is_finite() && measured > 0.0) {
            return;
        }
        self.speed = Some(match self.speed {
            Some(old) => 0.5 * old + 0.5 * measured,
            None => measured,
        });
    }

    /// Queues a message; a closed socket is noticed by its own handler.
    pub fn send(&self, message: &ServerMessage) {
        let _ = self.tx.send(Outbound::Text(message.to_json()));
    }
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Waiting for enough ready clients.
    Waiting,
    /// A round is running.
    Training,
    /// The admin paused the run; no round starts.
    Paused,
    /// All rounds done.
    Finished,
}

/// A mediator of the current round, for `/api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct MediatorStatus {
    /// Client ids in chain order.
    pub members: Vec<u64>,
    /// KL to uniform of their combined counts.
    pub kl: f64,
    /// Their combined label counts: the mediator's label mix.
    pub counts: Vec<usize>,
    /// Hops in the chain (members times passes).
    pub hops: u32,
    /// Hops finished or skipped so far.
    pub hops_done: u32,
    /// The client training now, if any.
    pub current: Option<u64>,
}

/// The run as `/api/status` and `/api/rounds` show it.
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    /// Phase.
    pub phase: Phase,
    /// Current (or last) round.
    pub round: u32,
    /// Rounds planned.
    pub rounds: u32,
    /// Strategy name.
    pub strategy: String,
    /// The augmentation plan, once computed.
    pub plan: Option<Vec<f64>>,
    /// The current round's mediators (or clients, for FedAvg).
    pub mediators: Vec<MediatorStatus>,
    /// Hops skipped because a client left or missed its deadline.
    pub skipped_hops: u64,
    /// How the hops of the chains that ended since the last round was
    /// recorded ended: the next record's `hops`.
    pub round_hops: astraea_core::engine::HopTally,
    /// The metrics history, one record per finished round.
    pub history: Vec<RoundRecord>,
    /// When the current round started, for its progress and the ETA.
    #[serde(skip)]
    pub round_started: Option<std::time::Instant>,
    /// The run's gateways as this server last saw them: the leader's
    /// view of who trains its rounds' other shares (`crate::gateway`).
    pub gateways: Vec<crate::store::gateways::GatewaySeen>,
    /// When `gateways` was read.
    #[serde(skip)]
    pub gateways_read: Option<std::time::Instant>,
    /// Whether this leader said its run leaves gateways idle.
    #[serde(skip)]
    pub gateways_refused: bool,
    /// Gateways this leader said train by other settings than its own.
    #[serde(skip)]
    pub gateways_mismatched: std::collections::BTreeSet<String>,
    /// The gateway this server is (`--gateway`), by its name in the store.
    pub gateway: Option<String>,
    /// On a gateway: the last round the run's leader recorded (round,
    /// accuracy), as the gateway last read it.
    pub leader_round: Option<(u32, f64)>,
}

/// What the admin has asked of the round loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Control {
    /// No new round starts while paused.
    pub paused: bool,
    /// The run ends after the current round.
    pub stopped: bool,
}

/// Settings the admin may change while the run goes on; the coordinator
/// reads them at the start of every round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Tunable {
    /// Rounds to run in all.
    pub rounds: u32,
    /// c: participants per round.
    pub participants: usize,
    /// Ready clients needed before a round starts.
    pub min_clients: usize,
    /// Seconds a client has for one hop.
    pub hop_deadline_s: f64,
}

/// A partial change of [`Tunable`], as `POST /api/admin/configure` takes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunableChange {
    /// New total of rounds.
    pub rounds: Option<u32>,
    /// New participants per round.
    pub participants: Option<usize>,
    /// New minimum of ready clients.
    pub min_clients: Option<usize>,
    /// New hop deadline in seconds.
    pub hop_deadline_s: Option<f64>,
}

impl Tunable {
    /// Applies a change, refusing values that cannot run.
    pub fn apply(&mut self, change: TunableChange) -> Result<(), String> {
        let mut next = *self;
        if let Some(v) = change.rounds {
            next.rounds = v;
        }
        if let Some(v) = change.participants {
            next.participants = v;
        }
        if let Some(v) = change.min_clients {
            next.min_clients = v;
        }
        if let Some(v) = change.hop_deadline_s {
            next.hop_deadline_s = v;
        }
        astraea_core::engine::RunNumbers::counts(next.rounds, next.participants, next.min_clients)
            .map_err(|e| e.to_string())?;
        astraea_core::engine::hop::hop_limit("hop_deadline_s", next.hop_deadline_s, false)?;
        *self = next;
        Ok(())
    }

    /// The hop deadline as a duration (within
    /// `astraea_core::engine::hop::MAX_HOP_SECONDS`: [`Tunable::apply`] and
    /// `start` refuse more).
    pub fn hop_deadline(&self) -> std::time::Duration {
        astraea_core::engine::hop::hop_limit("hop deadline", self.hop_deadline_s, false)
            .unwrap_or(astraea_core::engine::hop::MIN_HOP_DEADLINE)
    }
}

/// Everything the handlers and the coordinator share.
#[derive(Debug)]
pub struct AppState {
    /// The run's settings.
    pub config: ServeConfig,
    /// The model being trained.
    pub model: ModelSpec,
    /// Training-set indices of each demo shard.
    pub shards: Vec<Vec<usize>>,
    /// The training set the shards index.
    pub train: std::sync::Arc<astraea_core::data::Dataset>,
    /// Connected clients by id.
    pub clients: Mutex<BTreeMap<u64, ClientEntry>>,
    /// The run.
    pub status: Mutex<RunStatus>,
    /// Signalled when a client joins, becomes ready or leaves.
    pub changed: Notify,
    /// Next client id.
    pub(crate) next_id: AtomicU64,
    /// Frames refused as malformed, misshapen, non-finite, too large, out
    /// of the protocol's limits, inflated or too far from the model.
    pub rejections: AtomicU64,
    /// Connections that ended without a refusal: a close frame, a leave, or
    /// a socket dropped without closing (a departure, not a rejection).
    pub departures: AtomicU64,
    /// Updates that answered a hop no longer awaited (acknowledged stale).
    pub stale_updates: AtomicU64,
    /// Hops refused by the guard's loss rule (acknowledged refused; the
    /// client stays, the chain goes on without its hop).
    pub loss_refusals: AtomicU64,
    /// Hops refused by the guard's outlier rule (rule 3: far above the
    /// median of recent hops; acknowledged refused, the client stays).
    pub outlier_refusals: AtomicU64,
    /// WebSocket upgrades refused because their source joined too often
    /// (`crate::admission`).
    pub join_refusals: AtomicU64,
    /// The per-source join limit.
    pub joins: crate::admission::JoinLimiter,
    /// Maskers suspected of spoiling secure sums, and those named (group
    /// testing, `engine::suspects`).
    pub suspects: Mutex<astraea_core::engine::suspects::MaskerSuspects>,
    /// Asynchronous groups' results refused as too stale for the buffer
    /// (their hops had been acknowledged as taken into their chain).
    pub stale_results: AtomicU64,
    /// Samples trained by clients in hops the server took delivery of
    /// (each epoch counts), over the run: the records' `train_samples`.
    pub train_samples: AtomicU64,
    /// Time with at least one chain out, over the run: the records'
    /// `train_s`.
    pub training: Mutex<std::time::Duration>,
    /// Departed clients by resume token, for [`RESUME_WINDOW`].
    pub parked: Mutex<std::collections::HashMap<String, Parked>>,
    /// The guard's loss rule, when the server keeps validation samples.
    pub loss_check: Option<std::sync::Arc<astraea_core::validation::LossCheck>>,
    /// Rounds whose aggregate was refused (non-finite, out of bounds, or a
    /// panic while closing the round); the previous model was kept.
    pub dropped_rounds: AtomicU64,
    /// The latest global model, for `/api/model`.
    pub global: Mutex<Option<std::sync::Arc<astraea_core::weights::Weights>>>,
    /// Pause and stop requests.
    pub control: Mutex<Control>,
    /// Settings the admin may change mid-run.
    pub tunable: Mutex<Tunable>,
    /// Signalled when the admin changes `control`.
    pub control_changed: Notify,
    /// The database and checkpoints, when the run is durable.
    pub store: Option<Mutex<crate::store::Store>>,
    /// The run's row in the database.
    pub run_id: AtomicU64,
    /// Judges every update against the weights it was sent; its history
    /// is saved with each completed round.
    pub guard: crate::guard::UpdateGuard,
    /// Client-level DP on the model (`ServeConfig::model_privacy`): the
    /// mechanism, the budget, the clip of the next round (`--dp-clip`, or
    /// where adaptive clipping moved it) and the privacy spent so far;
    /// `None` without model DP. What `engine::round::close` updates.
    pub privacy: Mutex<Option<astraea_core::engine::RoundPrivacy>>,
    /// The round's secure aggregation, while one runs.
    pub secure: Mutex<Option<std::sync::Arc<crate::secure::SecureRound>>>,
    /// Bytes received from clients.
    pub bytes_up: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_down: AtomicU64,
    /// The URL volunteers open (shown on the dashboard and as its QR code).
    pub join_url: String,
    /// This server among the run's, in the feed of moves: 128 random bits
    /// (then its pid and address, for the logs).
    pub server_name: String,
    /// The largest move number this server has read from the run's feed
    /// ([`watch_moves`]): a client that resumes here is newer than every
    /// move read so far, even when its own move could not be recorded.
    pub moves_read: AtomicU64,
    /// The run's cap on an own-data client's word, in samples, where it
    /// has several servers (`u64::MAX`: none, this server's own clients
    /// decide): the leader takes it over every server's clients each
    /// round, a gateway from the work it takes ([`AppState::cap_among`]).
    pub run_cap: AtomicU64,
    /// The run's lease this server leads by (PostgreSQL stores), held
    /// until the server stops; `None` for a server that keeps the run
    /// alone.
    pub lease: Option<crate::store::Lease>,
    /// The leader's link to its run's gateways (a store of its own, fenced
    /// by the lease; `crate::store::gateways`): present on a leader whose
    /// rounds fold across gateways (`ServeConfig::across_gateways`).
    pub hierarchy: Option<std::sync::Arc<crate::store::PgStore>>,
    /// Wake-ups when the run's work moves (LISTEN on a connection of its
    /// own), for a gateway and for a leader with a link to its gateways.
    pub wakes: Option<std::sync::Arc<crate::store::listen::Wakes>>,
    /// The leader's reads of its gateways while the store is away
    /// (`gateway::live`), said once, not at every read.
    pub gateways_read: Mutex<crate::store::outage::Outage>,
    /// Samples in the balanced test set the server evaluates on (for the
    /// exported model's card).
    pub test_samples: usize,
    /// When the server started, for the dashboard's clock.
    pub started: std::time::Instant,
}

impl AppState {
    /// Fresh state for a run.
    pub fn new(
        config: ServeConfig,
        model: ModelSpec,
        shards: Vec<Vec<usize>>,
        train: std::sync::Arc<astraea_core::data::Dataset>,
        store: Option<crate::store::Store>,
    ) -> Self {
        // Composed at the served run's sampling rate, q = 1: who trains is
        // drawn with a seeded generator and shown on the public dashboard,
        // so an observer knows whether a client took part, and
        // amplification by sampling assumes it does not.
        let privacy = config.model_privacy.map(|dp| {
            astraea_core::engine::RoundPrivacy::new(
                dp.budget,
                Some(dp.max_epsilon),
                dp.distributed,
                config.policy().sampling_rate(),
            )
        });
        let status = RunStatus {
            phase: Phase::Waiting,
            round: 0,
            rounds: config.rounds,
            strategy: config.strategy.as_str().to_string(),
            plan: None,
            mediators: vec![],
            skipped_hops: 0,
            round_hops: Default::default(),
            history: vec![],
            round_started: None,
            gateways: vec![],
            gateways_read: None,
            gateways_refused: false,
            gateways_mismatched: Default::default(),
            gateway: None,
            leader_round: None,
        };
        let tunable = Tunable {
            rounds: config.rounds,
            participants: config.participants,
            min_clients: config.min_clients,
            hop_deadline_s: config.hop_deadline.as_secs_f64(),
        };
        let guard = config.policy().guard();
        let joins = crate::admission::JoinLimiter::new(config.join_rate);
        Self {
            config,
            model,
            shards,
            train,
            clients: Mutex::new(BTreeMap::new()),
            status: Mutex::new(status),
            changed: Notify::new(),
            next_id: AtomicU64::new(1),
            rejections: AtomicU64::new(0),
            departures: AtomicU64::new(0),
            stale_updates: AtomicU64::new(0),
            stale_results: AtomicU64::new(0),
            train_samples: AtomicU64::new(0),
            training: Mutex::new(std::time::Duration::ZERO),
            loss_refusals: AtomicU64::new(0),
            outlier_refusals: AtomicU64::new(0),
            join_refusals: AtomicU64::new(0),
            joins,
            suspects: Mutex::new(Default::default()),
            loss_check: None,
            parked: Mutex::new(std::collections::HashMap::new()),
            dropped_rounds: AtomicU64::new(0),
            store: store.map(Mutex::new),
            run_id: AtomicU64::new(0),
            guard,
            global: Mutex::new(None),
            control: Mutex::new(Control::default()),
            tunable: Mutex::new(tunable),
            control_changed: Notify::new(),
            privacy: Mutex::new(privacy),
            secure: Mutex::new(None),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            join_url: String::new(),
            server_name: new_resume_token(),
            moves_read: AtomicU64::new(0),
            run_cap: AtomicU64::new(u64::MAX),
            lease: None,
            hierarchy: None,
            wakes: None,
            gateways_read: Mutex::new(crate::store::outage::Outage::new(
                "reading the run's gateways",
            )),
            test_samples: 0,
            started: std::time::Instant::now(),
        }
    }

    /// Epsilon spent on the model so far at the run's delta; `None` when
    /// the model is not trained under DP.
    pub fn model_epsilon(&self) -> Option<f64> {
        lock(&self.privacy).as_ref().map(|p| p.epsilon())
    }

    /// The most samples client `id`'s updates weigh, and the counts the
    /// draw, the mediators and the plan see of it, are bounded by
    /// `astraea_core::engine::declared`: a demo shard's client holds what
    /// the server knows; an own-data client counts for at most twice the
    /// median total the clients declared. The current cap (`u64::MAX` with
    /// no client's counts known).
    pub fn declared_cap(clients: &BTreeMap<u64, ClientEntry>) -> u64 {
        astraea_core::engine::declared::declared_cap_of(&Self::counted_totals(clients))
    }

    /// This server's ready clients' totals (samples), counted: how many
    /// declared each (what a gateway tells the leader, and the leader adds
    /// up, for the run's cap).
    pub fn counted_totals(clients: &BTreeMap<u64, ClientEntry>) -> Vec<(u64, u64)> {
        let mut counted = BTreeMap::<u64, u64>::new();
        for entry in clients.values().filter(|e| e.counts.is_some()) {
            *counted.entry(entry.samples).or_insert(0) += 1;
        }
        counted.into_iter().collect()
    }

    /// The cap on an own-data client's word among `clients`: the run's
    /// ([`AppState::run_cap`]) where it has several servers, else
    /// [`AppState::declared_cap`] of this server's clients.
    pub fn cap_among(&self, clients: &BTreeMap<u64, ClientEntry>) -> u64 {
        match self.run_cap.load(std::sync::atomic::Ordering::Relaxed) {
            u64::MAX => Self::declared_cap(clients),
            run => run,
        }
    }

    /// What client `id`'s updates may weigh: its samples, within
    /// [`AppState::cap_among`] unless its counts are a demo shard's.
    pub fn weighable_samples(&self, id: u64) -> u64 {
        let clients = self.clients();
        let Some(entry) = clients.get(&id) else {
            return 0;
        };
        if entry.shard_counts.is_some() {
            entry.samples
        } else {
            entry.samples.min(self.cap_among(&clients))
        }
    }

    /// The clip of the next DP round; `None` without model DP.
    pub fn model_clip(&self) -> Option<f64> {
        lock(&self.privacy).as_ref().map(|p| p.clip)
    }

    /// The card an exported model of `round` with `accuracy` carries.
    pub fn model_card(&self, round: u32, accuracy: Option<f64>) -> ModelCard {
        ModelCard {
            round,
            accuracy,
            evaluated_on: format!(
                "{} balanced test set, {} samples",
                self.config.dataset, self.test_samples
            ),
            dataset: self.config.dataset.clone(),
            class_names: self.train.class_names.clone(),
            model: self.model.config(),
            strategy: self.status().strategy.clone(),
        }
    }

    /// The card of the current global model: the last completed round's.
    pub fn current_model_card(&self) -> ModelCard {
        let last = self.status().history.last().map(|r| (r.round, r.accuracy));
        match last {
            Some((round, accuracy)) => self.model_card(round as u32, Some(accuracy)),
            None => self.model_card(0, None),
        }
    }

    /// A new client id.
    pub fn next_client_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Pace steering's window for this server's clients now and
    /// `joining` more not yet among them, in milliseconds
    /// (`ServeConfig::rejoin_rate`, `pace::rejoin_window`).
    pub fn rejoin_within_ms(&self, joining: usize) -> u64 {
        let clients = self.clients().len() + joining;
        astraea_core::protocol::pace::rejoin_window(clients, self.config.rejoin_rate)
    }

    /// What the run does for its volunteers' privacy, as the welcome and
    /// `/api/status` say it; `None` when nothing.
    pub fn privacy_spec(&self) -> Option<astraea_core::protocol::PrivacySpec> {
        let spec = astraea_core::protocol::PrivacySpec {
            label_epsilon: self.config.label_epsilon,
            secure_aggregation: self.config.secure_aggregation,
            model: self
                .config
                .model_privacy
                .map(|dp| astraea_core::protocol::ModelPrivacySpec {
                    clip: dp.budget.clip,
                    noise_multiplier: dp.budget.noise_multiplier,
                    delta: dp.budget.delta,
                    // JSON has no infinity: no limit is no budget.
                    budget: Some(dp.max_epsilon).filter(|e| e.is_finite()),
                    distributed: dp.distributed,
                    spent: self.model_epsilon().filter(|e| e.is_finite()),
                }),
        };
        (spec != Default::default()).then_some(spec)
    }

    /// The clients, locked. Taken before [`AppState::status`] where both
    /// are held.
    pub fn clients(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ClientEntry>> {
        lock(&self.clients)
    }

    /// The admin's current requests.
    pub fn control(&self) -> Control {
        *lock(&self.control)
    }

    /// Runs `f` on the store, if the run is durable; a failure is logged,
    /// not fatal, for bookkeeping that must not stop training.
    pub fn record(
        &self,
        f: impl FnOnce(&mut crate::store::Store, i64) -> Result<(), crate::store::StoreError>,
    ) {
        if let Err(e) = self.record_or_refused(f) {
            tracing::error!("store: {e}");
        }
    }

    /// Like [`AppState::record`], but a write refused because another
    /// server took the run's lease ([`crate::store::StoreError::Fenced`])
    /// is an error for the caller to stop on: this server leads no more,
    /// and must not announce what it could not record.
    ///
    /// # Errors
    /// The refusal; other store errors are logged, as `record` does.
    pub fn record_or_refused(
        &self,
        f: impl FnOnce(&mut crate::store::Store, i64) -> Result<(), crate::store::StoreError>,
    ) -> Result<(), crate::store::StoreError> {
        // A gateway before its leader created the run: nothing to record
        // it under (a leader knows its run before it serves).
        let run_id = self.run_id.load(Ordering::Relaxed) as i64;
        if self.config.gateway && run_id == 0 {
            return Ok(());
        }
        if let Some(store) = &self.store {
            let result = off_the_workers(|| f(&mut lock(store), run_id));
            match result {
                Err(refused @ crate::store::StoreError::Fenced { .. }) => return Err(refused),
                Err(e) => tracing::error!("store: {e}"),
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// Records that client `id` resumed here ([`crate::store::RunStore::client_moved`]),
    /// so that another server of the run still holding it (a half-open
    /// socket) lets it go ([`watch_moves`]). Answers the number this
    /// resume stands at in the feed: its move's, and at least the largest
    /// read so far (so a move it could not record, the store down, is
    /// still newer than every move this server has read; logged); 0
    /// where the store is this server's alone.
    pub fn client_moved(&self, id: u64) -> u64 {
        let (run, me) = (&self.config.run_name, &self.server_name);
        let recorded = self.ask_store(|store| store.client_moved(run, id, me));
        recorded
            .flatten()
            .unwrap_or(0)
            .max(self.moves_read.load(Ordering::Relaxed))
    }

    /// Lets go of every client of `moves` that resumed on another server
    /// after it last came here: closes its socket, skips its hop (the
    /// pending reply dropped, as a departure does) and forgets it, parked
    /// or held. Answers how many it let go.
    pub fn let_go_of_moved(&self, moves: &[crate::store::Move]) -> usize {
        // Each client's latest move elsewhere.
        let mut elsewhere: std::collections::HashMap<u64, u64> = Default::default();
        for m in moves.iter().filter(|m| m.server != self.server_name) {
            let seq = elsewhere.entry(m.client_id).or_default();
            *seq = (*seq).max(m.seq);
        }
        if let Some(last) = moves.iter().map(|m| m.seq).max() {
            self.moves_read.fetch_max(last, Ordering::Relaxed);
        }
        if elsewhere.is_empty() {
            return 0;
        }
        let held: Vec<(u64, ClientEntry)> = {
            let mut clients = self.clients();
            let gone: Vec<u64> = elsewhere
                .iter()
                .filter(|(id, seq)| clients.get(id).is_some_and(|e| e.moved < **seq))
                .map(|(id, _)| *id)
                .collect();
            gone.into_iter()
                .filter_map(|id| clients.remove(&id).map(|entry| (id, entry)))
                .collect()
        };
        lock(&self.parked)
            .retain(|_, p| elsewhere.get(&p.id).is_none_or(|&seq| p.entry.moved >= seq));
        for (id, entry) in &held {
            let _ = entry.tx.send(Outbound::Close);
            tracing::info!(client = id, "resumed on another server of the run: let go");
        }
        if !held.is_empty() {
            self.changed.notify_waiters();
        }
        held.len()
    }

    /// A demo slot for client `id`, joining now: the run's next across
    /// its servers where they share a store
    /// ([`crate::store::RunStore::take_demo_slot`]), else `id` (this
    /// server's clients numbered in turn). A store that cannot answer
    /// costs the slot, never the join: `id`, logged.
    pub fn take_demo_slot(&self, id: u64) -> u64 {
        let run = &self.config.run_name;
        let slot = self.ask_store(|store| store.take_demo_slot(run));
        slot.flatten().unwrap_or(id)
    }

    /// The demo shard of demo slot `slot` (from 1): shard (slot - 1) mod
    /// K, so the run's first K demo clients hold K different shards.
    ///
    /// # Panics
    /// When the server has no demo shards (callers check first).
    pub fn demo_shard(&self, slot: u64) -> &Vec<usize> {
        let k = self.shards.len() as u64;
        &self.shards[(slot.saturating_sub(1) % k) as usize]
    }

    /// The client the run's store knows by resume token `token` (given
    /// before a restart, or by the server that led the run before): its
    /// id and whether it trains a demo shard. `None` without a store, for
    /// an unknown token, or when the store fails (logged).
    pub fn stored_client(&self, token: &str) -> Option<(u64, Option<u64>)> {
        let run_id = self.run_id.load(Ordering::Relaxed) as i64;
        self.ask_store(|store| store.client_by_token(run_id, token))
            .flatten()
    }

    /// What `ask` reads or writes in the run's store, off the runtime's
    /// workers ([`off_the_workers`]) on a join's path; `None` without a
    /// store, or when the store fails (logged: a join goes on without
    /// it).
    fn ask_store<R>(
        &self,
        ask: impl FnOnce(&mut crate::store::Store) -> Result<R, crate::store::StoreError>,
    ) -> Option<R> {
        let store = self.store.as_ref()?;
        match off_the_workers(|| ask(&mut lock(store))) {
            Ok(answer) => Some(answer),
            Err(e) => {
                tracing::error!("store: {e}");
                None
            }
        }
    }

    /// The settings in force now.
    pub fn tunable(&self) -> Tunable {
        *lock(&self.tunable)
    }

    /// Records that mediator `index` has finished `done` hops and is now
    /// waiting on `current`.
    pub fn set_hop(&self, index: usize, current: Option<u64>, done: u32) {
        if let Some(mediator) = self.status().mediators.get_mut(index) {
            mediator.current = current;
            mediator.hops_done = done;
        }
    }

    /// Locks the run status.
    pub fn status(&self) -> std::sync::MutexGuard<'_, RunStatus> {
        lock(&self.status)
    }
}

/// How often a server of a shared store reads the run's feed of moves.
pub const MOVES_EVERY: Duration = Duration::from_secs(1);

/// Reads the run's feed of moves every [`MOVES_EVERY`] and lets go of the
/// clients that resumed on another server of the run
/// ([`AppState::let_go_of_moved`]): so a volunteer whose socket here is
/// half-open, and who came back elsewhere with its token, is held (and
/// counted, and drawn) by one server, not two, within a second or two
/// instead of when the old socket times out. Each read takes the moves
/// after the last one read and again those of the last
/// [`crate::store::MOVES_OVERLAP`]: a move whose number was given before
/// another's but committed after it, or one that found its client between
/// this server's maps (being resumed here), is seen again. Runs until the
/// server stops; a store that cannot answer is tried again next time
/// (logged).
pub async fn watch_moves(state: std::sync::Arc<AppState>) {
    let mut after: Option<u64> = None;
    let mut outage = crate::store::outage::Outage::new("reading the run's moves");
    // The feed is pruned by its readers, about once a minute each.
    let mut pruned = std::time::Instant::now();
    loop {
        if pruned.elapsed() >= Duration::from_secs(60) {
            pruned = std::time::Instant::now();
            let state = state.clone();
            let done = tokio::task::spawn_blocking(move || {
                let store = state.store.as_ref()?;
                let kept = crate::store::MOVES_KEPT;
                Some(lock(store).prune_moves(&state.config.run_name, kept))
            })
            .await;
            if let Ok(Some(Err(e))) = done {
                tracing::warn!("pruning the run's moves: {e}");
            }
        }
        let read = {
            let state = state.clone();
            tokio::task::spawn_blocking(move || {
                let store = state.store.as_ref()?;
                Some(lock(store).moves_since(&state.config.run_name, after, 1_000))
            })
            .await
        };
        let read = match read {
            Ok(Some(read)) => read,
            Ok(None) => return,
            // Its task panicked: counted as the store failing.
            Err(_) => Err(crate::store::StoreError::Panicked),
        };
        if let Some((moves, last)) = outage.note(read) {
            state.let_go_of_moved(&moves);
            // A full page of new moves: the next at once.
            let full = after.is_some_and(|a| moves.iter().filter(|m| m.seq > a).count() == 1_000);
            after = Some(last);
            if full {
                continue;
            }
        }
        tokio::time::sleep(MOVES_EVERY).await;
    }
}
