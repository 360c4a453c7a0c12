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

pub use astraea_core::metrics::{BYTES_PER_MB, RoundRecord, RunHistory};

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
                    clock_s: 4.0 * round as f64,
                    epsilon: None,
                    mediators: Vec::new(),
                    hops: Default::default(),
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
