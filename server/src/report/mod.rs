//! Turns a simulation's per-round history into files people read: CSV, PNG and text tables.
//!
//! # Layout
//! - [`csv`]: one run's rounds to and from a CSV file, so results can be re-plotted later
//!   without re-running the simulation.
//! - [`plot`]: a PNG comparing runs, accuracy against rounds and against traffic.
//! - [`table`]: aligned plain-text and Markdown summaries, plus a per-strategy mean ± std.
//! - [`compare`]: each strategy against FedAvg: gain, imbalance loss recovered, KL, traffic.
//!
//! Architecture invariant: nothing here runs or changes a simulation; every function takes
//! finished histories, so the reports can be rebuilt from CSV files alone.

mod compare;
mod csv;
mod plot;
mod table;

pub use compare::{Comparison, compare, comparison_markdown, comparison_table};
pub use csv::{CSV_HEADER, read_csv, write_csv};
pub use plot::{FONT_PACKAGE, FONT_PATH, plot_runs};
pub use table::{RunSummary, grouped_best, markdown_table, summarize, summary_table};

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

#[cfg(test)]
pub(crate) mod fixtures {
    //! Small made-up histories shared by the tests of every report file.

    use super::{RoundRecord, RunHistory};

    /// A run whose accuracy follows `accuracies`, with traffic growing 1 MB up and
    /// 2 MB down per round.
    pub fn run(label: &str, strategy: &str, seed: u64, accuracies: &[f64]) -> RunHistory {
        let rounds = accuracies
            .iter()
            .enumerate()
            .map(|(i, &accuracy)| {
                let round = i + 1;
                RoundRecord {
                    round,
                    accuracy,
                    loss: 2.3 * (1.0 - accuracy) + 0.1,
                    bytes_up: 1_000_000 * round as u64,
                    bytes_down: 2_000_000 * round as u64,
                    mean_kl: 0.5 / round as f64,
                    wall_s: 0.75 * round as f64,
                    train_samples: 1000 * round as u64,
                    train_s: 0.5 * round as f64,
                }
            })
            .collect();
        RunHistory {
            label: label.to_string(),
            strategy: strategy.to_string(),
            seed,
            rounds,
        }
    }
}
