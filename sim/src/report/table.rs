//! Summary tables of runs: aligned plain text for the terminal, Markdown for the docs.
//!
//! Both renderings share one set of cells ([`summary_rows`]) so the terminal and
//! `docs/RESULTS.md` can never disagree. Accuracies are fractions in the data and percent
//! in the tables; traffic is in decimal megabytes ([`BYTES_PER_MB`]).

use super::{BYTES_PER_MB, RunHistory};

/// What one run achieved, computed once so tables and callers read the same numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The run's label.
    pub label: String,
    /// Highest test accuracy (fraction) and the first round reaching it; `None` for a run
    /// with no usable rounds.
    pub best: Option<(f64, usize)>,
    /// Accuracy after the last round, the number a deployment would actually ship.
    pub final_accuracy: Option<f64>,
    /// First round at or above the target accuracy, with the cumulative traffic (bytes) it
    /// had cost by then; `None` when no target was given or it was never reached.
    pub reached: Option<(usize, u64)>,
    /// Seconds on the federation's clock (`RoundRecord::clock_s`) when the
    /// target was first reached: the wall-clock time to accuracy.
    pub reached_clock_s: Option<f64>,
    /// Mean over rounds of the per-round mean KL divergence; `None` without rounds.
    pub mean_kl: Option<f64>,
    /// Wall-clock seconds per round, evaluation included; `None` without rounds.
    pub seconds_per_round: Option<f64>,
    /// Training throughput in samples per second of training time; `None`
    /// when nothing was timed.
    pub train_samples_per_s: Option<f64>,
}

/// Summarizes one run; `target_accuracy` is a fraction like the records' accuracy.
///
/// NaN accuracies (a diverged round) never count as best or as reaching the target.
pub fn summarize(run: &RunHistory, target_accuracy: Option<f64>) -> RunSummary {
    let best = run
        .rounds
        .iter()
        .filter(|r| !r.accuracy.is_nan())
        // Strictly greater keeps the earliest round among ties.
        .fold(None, |best: Option<(f64, usize)>, r| match best {
            Some((acc, _)) if r.accuracy <= acc => best,
            _ => Some((r.accuracy, r.round)),
        });
    let first = target_accuracy.and_then(|target| run.rounds.iter().find(|r| r.accuracy >= target));
    let reached = first.map(|r| (r.round, r.traffic_bytes()));
    let mean_kl = (!run.rounds.is_empty())
        .then(|| run.rounds.iter().map(|r| r.mean_kl).sum::<f64>() / run.rounds.len() as f64);
    let last = run.rounds.last();
    RunSummary {
        label: run.label.clone(),
        best,
        final_accuracy: last.map(|r| r.accuracy),
        reached,
        reached_clock_s: first.map(|r| r.clock_s),
        mean_kl,
        seconds_per_round: last.map(|r| r.wall_s / run.rounds.len() as f64),
        train_samples_per_s: last
            .filter(|r| r.train_s > 0.0)
            .map(|r| r.train_samples as f64 / r.train_s),
    }
}

/// Mean and sample standard deviation of best accuracy (fractions) per strategy, as
/// `(strategy, mean, std, n)` in order of first appearance.
///
/// The standard deviation divides by n − 1 because seeds are a sample of the runs one
/// could have made; a strategy with a single run reports 0. Runs without any usable
/// round are left out of their group.
pub fn grouped_best(runs: &[RunHistory]) -> Vec<(String, f64, f64, usize)> {
    let mut groups: Vec<(String, Vec<f64>)> = Vec::new();
    for run in runs {
        let Some((best, _)) = summarize(run, None).best else {
            continue;
        };
        match groups.iter_mut().find(|(name, _)| *name == run.strategy) {
            Some((_, values)) => values.push(best),
            None => groups.push((run.strategy.clone(), vec![best])),
        }
    }
    groups
        .into_iter()
        .map(|(name, values)| {
            let n = values.len();
            let mean = values.iter().sum::<f64>() / n as f64;
            let var = if n > 1 {
                values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
            } else {
                0.0
            };
            (name, mean, var.sqrt(), n)
        })
        .collect()
}

/// An aligned plain-text table, one row per run; when several runs share a strategy a
/// second table of mean ± std of best accuracy follows, because one seed alone can mislead.
///
/// `target_accuracy` is a fraction; without it the three "to target" columns are left out.
pub fn summary_table(runs: &[RunHistory], target_accuracy: Option<f64>) -> String {
    let mut out = render_plain(&summary_rows(runs, target_accuracy));
    if let Some(groups) = group_rows(runs) {
        out.push('\n');
        out.push_str(&render_plain(&groups));
    }
    out
}

/// The same tables as [`summary_table`] in GitHub Markdown, for `docs/RESULTS.md`.
pub fn markdown_table(runs: &[RunHistory], target_accuracy: Option<f64>) -> String {
    let mut out = render_markdown(&summary_rows(runs, target_accuracy));
    if let Some(groups) = group_rows(runs) {
        out.push('\n');
        out.push_str(&render_markdown(&groups));
    }
    out
}

/// Header and body cells of a table; column 0 is left-aligned text, the rest numbers.
pub(super) struct Cells {
    pub(super) header: Vec<String>,
    pub(super) rows: Vec<Vec<String>>,
}

/// The per-run table's cells, shared by both renderings.
fn summary_rows(runs: &[RunHistory], target: Option<f64>) -> Cells {
    let mut header: Vec<String> = ["run", "best %", "best round", "final %"]
        .map(String::from)
        .to_vec();
    if let Some(t) = target {
        header.push(format!("rounds to {}%", trim_float(t * 100.0)));
        header.push(format!("MB to {}%", trim_float(t * 100.0)));
        header.push(format!("clock s to {}%", trim_float(t * 100.0)));
    }
    header.push("mean KL".to_string());
    header.push("s/round".to_string());
    header.push("train samples/s".to_string());
    let rows = runs
        .iter()
        .map(|run| {
            let s = summarize(run, target);
            let mut row = vec![
                s.label,
                or_dash(s.best.map(|(acc, _)| percent(acc))),
                or_dash(s.best.map(|(_, round)| round.to_string())),
                or_dash(s.final_accuracy.map(percent)),
            ];
            if target.is_some() {
                row.push(or_dash(s.reached.map(|(round, _)| round.to_string())));
                row.push(or_dash(
                    s.reached
                        .map(|(_, bytes)| format!("{:.1}", bytes as f64 / BYTES_PER_MB)),
                ));
                row.push(or_dash(s.reached_clock_s.map(|t| format!("{t:.0}"))));
            }
            row.push(or_dash(s.mean_kl.map(|kl| format!("{kl:.4}"))));
            row.push(or_dash(s.seconds_per_round.map(|t| format!("{t:.2}"))));
            row.push(or_dash(s.train_samples_per_s.map(|t| format!("{t:.0}"))));
            row
        })
        .collect();
    Cells { header, rows }
}

/// The per-strategy table's cells, or `None` when no strategy has more than one run.
fn group_rows(runs: &[RunHistory]) -> Option<Cells> {
    let groups = grouped_best(runs);
    if groups.iter().all(|&(_, _, _, n)| n < 2) {
        return None;
    }
    let header = ["strategy", "runs", "best % mean", "± std"]
        .map(String::from)
        .to_vec();
    let rows = groups
        .into_iter()
        .map(|(name, mean, std, n)| vec![name, n.to_string(), percent(mean), percent(std)])
        .collect();
    Some(Cells { header, rows })
}

/// Columns padded to their widest cell, a dashed rule under the header.
pub(super) fn render_plain(cells: &Cells) -> String {
    let widths = column_widths(cells);
    let line = |row: &[String]| {
        let padded: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, &w))| {
                if i == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    let mut out = line(&cells.header);
    out.push_str(&line(&rule));
    for row in &cells.rows {
        out.push_str(&line(row));
    }
    out
}

/// A GitHub Markdown table with the numeric columns right-aligned.
pub(super) fn render_markdown(cells: &Cells) -> String {
    let line = |row: &[String]| {
        let escaped: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
        format!("| {} |\n", escaped.join(" | "))
    };
    let align: Vec<String> = (0..cells.header.len())
        .map(|i| if i == 0 { ":---" } else { "---:" }.to_string())
        .collect();
    let mut out = line(&cells.header);
    out.push_str(&line(&align));
    for row in &cells.rows {
        out.push_str(&line(row));
    }
    out
}

/// Width of each column in characters (not bytes, so "±" counts as one).
fn column_widths(cells: &Cells) -> Vec<usize> {
    let mut widths: Vec<usize> = cells.header.iter().map(|h| h.chars().count()).collect();
    for row in &cells.rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    widths
}

/// A fraction as a percentage with two decimals, enough to tell seeds apart.
pub(super) fn percent(fraction: f64) -> String {
    format!("{:.2}", fraction * 100.0)
}

/// A number without trailing zeros, so a target of 0.8 reads "80%" and 0.725 "72.5%".
fn trim_float(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The cell text, or "-" for a value that does not exist (never reached, no rounds).
pub(super) fn or_dash(cell: Option<String>) -> String {
    cell.unwrap_or_else(|| "-".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::fixtures::run;

    #[test]
    fn summary_picks_first_best_round_and_first_round_reaching_target() {
        // Prepare: best 0.7 first at round 3 (tied at round 5); 0.6 first reached at round 3.
        let history = run(
            "astraea seed 1",
            "astraea",
            1,
            &[0.2, 0.55, 0.7, 0.65, 0.7, 0.4],
        );

        // Execute
        let s = summarize(&history, Some(0.6));

        // Assert
        assert_eq!(s.best, Some((0.7, 3)));
        assert_eq!(s.final_accuracy, Some(0.4));
        assert_eq!(s.reached, Some((3, 9_000_000)));
    }

    #[test]
    fn table_shows_dash_when_target_never_reached() {
        let runs = [
            run("fedavg seed 1", "fedavg", 1, &[0.3, 0.5]),
            run("astraea seed 1", "astraea", 1, &[0.4, 0.85]),
        ];

        let table = summary_table(&runs, Some(0.8));

        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].contains("rounds to 80%") && lines[0].contains("MB to 80%"),
            "{table}"
        );
        let fedavg: Vec<&str> = lines[2].split_whitespace().collect();
        let astraea: Vec<&str> = lines[3].split_whitespace().collect();
        // label (3 words), best %, best round, final %, rounds to, MB to,
        // clock s to, mean KL, s/round, train samples/s
        assert_eq!(
            fedavg[3..],
            [
                "50.00", "2", "50.00", "-", "-", "-", "0.3750", "0.75", "2000"
            ],
            "{table}"
        );
        assert_eq!(
            astraea[3..],
            [
                "85.00", "2", "85.00", "2", "6.0", "8", "0.3750", "0.75", "2000"
            ],
            "{table}"
        );
        // Every line of the table has its columns aligned to the same width.
        assert!(
            lines[..4]
                .iter()
                .all(|l| l.chars().count() == lines[1].chars().count()),
            "{table}"
        );
    }

    #[test]
    fn table_without_target_omits_target_columns_and_handles_empty_runs() {
        let runs = [run("empty", "fedavg", 1, &[])];

        let table = summary_table(&runs, None);

        assert!(!table.contains("rounds to"), "{table}");
        let row: Vec<&str> = table.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(row, ["empty", "-", "-", "-", "-", "-", "-"]);
    }

    #[test]
    fn grouped_best_reports_sample_std_per_strategy_in_order() {
        let runs = [
            run("astraea seed 1", "astraea", 1, &[0.5, 0.6]),
            run("fedavg seed 1", "fedavg", 1, &[0.4]),
            run("astraea seed 2", "astraea", 2, &[0.8]),
            run("astraea seed 3", "astraea", 3, &[0.7]),
        ];

        let groups = grouped_best(&runs);

        assert_eq!(groups.len(), 2);
        let (name, mean, std, n) = &groups[0];
        assert_eq!((name.as_str(), *n), ("astraea", 3));
        assert!(
            (mean - 0.7).abs() < 1e-12 && (std - 0.1).abs() < 1e-12,
            "{groups:?}"
        );
        assert_eq!(groups[1], ("fedavg".to_string(), 0.4, 0.0, 1));
    }

    #[test]
    fn markdown_has_same_columns_and_group_table_for_seeds() {
        let runs = [
            run("astraea seed 1", "astraea", 1, &[0.5]),
            run("astraea seed 2", "astraea", 2, &[0.7]),
        ];

        let md = markdown_table(&runs, Some(0.6));

        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(
            lines[0],
            "| run | best % | best round | final % | rounds to 60% | MB to 60% | clock s to 60% \
             | mean KL | s/round | train samples/s |"
        );
        assert_eq!(
            lines[1],
            "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        assert_eq!(
            lines[2],
            "| astraea seed 1 | 50.00 | 1 | 50.00 | - | - | - | 0.5000 | 0.75 | 2000 |"
        );
        assert!(md.contains("| astraea | 2 | 60.00 | 14.14 |"), "{md}");
    }
}
