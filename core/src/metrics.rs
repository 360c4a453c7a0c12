//! What a run records each round (accuracy, loss, traffic, time), shared by
//! the simulator, the server and the reports.

/// Bytes in one megabyte as the reports print it (decimal, 10^6), so traffic figures match
/// what network tools and papers usually quote.
pub const BYTES_PER_MB: f64 = 1e6;

/// One row of a run's history.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundRecord {
    /// Round number, 1-based, so the first row is the model after one round of training.
    pub round: usize,
    /// Top-1 accuracy on the balanced test set, a fraction in 0..1.
    pub accuracy: f64,
    /// Mean cross-entropy on the test set.
    pub loss: f64,
    /// Cumulative bytes sent clients -> server so far; cumulative so traffic is an x axis.
    pub bytes_up: u64,
    /// Cumulative bytes sent server -> clients so far.
    pub bytes_down: u64,
    /// Mean KL divergence to uniform of this round's training groups; how skewed the data
    /// each aggregated update saw, the quantity Astraea's rescheduling tries to lower.
    pub mean_kl: f64,
    /// Cumulative wall-clock seconds.
    pub wall_s: f64,
    /// Cumulative samples processed by local training (each epoch and each
    /// mediator pass counts), for the simulator's throughput.
    pub train_samples: u64,
    /// Cumulative seconds the round loop spent training (evaluation excluded).
    pub train_s: f64,
    /// Cumulative seconds on the federation's clock: what volunteers wait.
    /// A served run's wall clock (as `wall_s`); in the simulator, the time
    /// its population of clients would take (`astraea-sim`'s population
    /// model), not the time the simulation took.
    #[serde(default)]
    pub clock_s: f64,
    /// Client-level differential privacy spent on the model so far: epsilon
    /// at the run's delta (`astraea_core::privacy::RdpAccountant`); `None`
    /// when the model is not trained under DP (no bound at all).
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// The round's mediators, each its members in chain order, as client
    /// ids a server gives them (the n-th client to join is client n; see
    /// `astraea_core::engine::seeds`). Synchronous rounds only: empty in
    /// the asynchronous mode, and in records kept before it was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mediators: Vec<Vec<u64>>,
    /// How this round's hops ended (accepted, refused, discarded,
    /// skipped), added up over its chains; in the asynchronous mode, over
    /// the chains this version folded in (the simulator) or that ended
    /// while it was made (the server). Zero in records kept before it was.
    #[serde(default)]
    pub hops: crate::engine::HopTally,
}

impl RoundRecord {
    /// Cumulative traffic in both directions, the cost a run pays for its accuracy.
    pub fn traffic_bytes(&self) -> u64 {
        self.bytes_up.saturating_add(self.bytes_down)
    }

    /// [`Self::traffic_bytes`] in megabytes ([`BYTES_PER_MB`]), as plots and tables show it.
    pub fn traffic_mb(&self) -> f64 {
        self.traffic_bytes() as f64 / BYTES_PER_MB
    }
}

/// One simulation run: which strategy and seed, and what happened each round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunHistory {
    /// Name shown in legends and tables, e.g. "astraea seed 1".
    pub label: String,
    /// Strategy name; runs sharing it are grouped as seeds of one experiment.
    pub strategy: String,
    /// Seed the run used, kept so a table row can be reproduced.
    pub seed: u64,
    /// Rounds in order, one record per evaluated round.
    pub rounds: Vec<RoundRecord>,
}
