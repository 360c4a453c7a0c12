//! The experiment's verdict against FedAvg, seed by seed: accuracy gained,
//! the share of the imbalance loss recovered, how close to uniform the
//! training groups were, and the traffic needed to reach FedAvg's best.

use super::RunHistory;
use super::table::{Cells, or_dash, percent, render_markdown, render_plain, summarize};

/// One strategy's standing against the baseline, averaged over the seeds
/// that have a baseline run.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Strategy name.
    pub strategy: String,
    /// Seeds averaged.
    pub seeds: usize,
    /// Mean best accuracy (fraction).
    pub best: f64,
    /// Mean best accuracy minus the baseline's, in percentage points.
    pub gain_points: f64,
    /// Gain over the imbalance loss (reference best minus baseline best):
    /// 1.0 recovers all of it. `None` without a reference run.
    pub recovery: Option<f64>,
    /// Mean over rounds of the training groups' KL to uniform.
    pub mean_kl: f64,
    /// Bytes to first reach the baseline's best accuracy over the bytes the
    /// baseline needed for it; `None` when some seed never reached it.
    pub traffic_ratio: Option<f64>,
    /// Rounds to first reach the baseline's best accuracy (mean over seeds).
    pub rounds_to_baseline_best: Option<f64>,
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Compares every strategy in `runs` with `baseline` (e.g. `fedavg`), using
/// `reference` (e.g. `fedavg-iid`) for the size of the imbalance loss. Runs
/// are paired by seed; strategies appear in order of first appearance.
pub fn compare(runs: &[RunHistory], baseline: &str, reference: &str) -> Vec<Comparison> {
    let mut order: Vec<&str> = Vec::new();
    for run in runs {
        if !order.contains(&run.strategy.as_str()) {
            order.push(&run.strategy);
        }
    }
    let find = |strategy: &str, seed: u64| {
        runs.iter()
            .find(|r| r.strategy == strategy && r.seed == seed)
    };
    order
        .into_iter()
        .filter_map(|strategy| {
            let (mut best, mut gain, mut recovery, mut kl) = (vec![], vec![], vec![], vec![]);
            let (mut ratios, mut rounds) = (Some(vec![]), Some(vec![]));
            for run in runs.iter().filter(|r| r.strategy == strategy) {
                let Some(base) = find(baseline, run.seed) else {
                    continue;
                };
                let (Some((run_best, _)), Some((base_best, base_round))) =
                    (summarize(run, None).best, summarize(base, None).best)
                else {
                    continue;
                };
                best.push(run_best);
                gain.push((run_best - base_best) * 100.0);
                if let Some((ref_best, _)) =
                    find(reference, run.seed).and_then(|r| summarize(r, None).best)
                    && ref_best > base_best
                {
                    recovery.push((run_best - base_best) / (ref_best - base_best));
                }
                kl.push(mean(
                    &run.rounds.iter().map(|r| r.mean_kl).collect::<Vec<_>>(),
                ));
                let base_bytes = base.rounds[base_round - 1].traffic_bytes() as f64;
                match run.rounds.iter().find(|r| r.accuracy >= base_best) {
                    Some(r) => {
                        if let Some(v) = ratios.as_mut() {
                            v.push(r.traffic_bytes() as f64 / base_bytes);
                        }
                        if let Some(v) = rounds.as_mut() {
                            v.push(r.round as f64);
                        }
                    }
                    None => {
                        ratios = None;
                        rounds = None;
                    }
                }
            }
            (!best.is_empty()).then(|| Comparison {
                strategy: strategy.to_string(),
                seeds: best.len(),
                best: mean(&best),
                gain_points: mean(&gain),
                recovery: (!recovery.is_empty()).then(|| mean(&recovery)),
                mean_kl: mean(&kl),
                traffic_ratio: ratios.map(|v| mean(&v)),
                rounds_to_baseline_best: rounds.map(|v| mean(&v)),
            })
        })
        .collect()
}

fn cells(rows: &[Comparison], baseline: &str) -> Cells {
    let header = [
        "strategy",
        "seeds",
        "best %",
        &format!("gain vs {baseline} (pts)"),
        "imbalance loss recovered",
        "mean KL",
        &format!("rounds to {baseline} best"),
        &format!("traffic to {baseline} best (x)"),
    ]
    .map(String::from)
    .to_vec();
    let rows = rows
        .iter()
        .map(|c| {
            vec![
                c.strategy.clone(),
                c.seeds.to_string(),
                percent(c.best),
                format!("{:+.2}", c.gain_points),
                or_dash(c.recovery.map(|r| format!("{:.0}%", r * 100.0))),
                format!("{:.3}", c.mean_kl),
                or_dash(c.rounds_to_baseline_best.map(|r| format!("{r:.0}"))),
                or_dash(c.traffic_ratio.map(|r| format!("{r:.3}"))),
            ]
        })
        .collect();
    Cells { header, rows }
}

/// The comparison as an aligned plain-text table.
pub fn comparison_table(rows: &[Comparison], baseline: &str) -> String {
    render_plain(&cells(rows, baseline))
}

/// The comparison as a Markdown table.
pub fn comparison_markdown(rows: &[Comparison], baseline: &str) -> String {
    render_markdown(&cells(rows, baseline))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::run;
    use super::*;

    #[test]
    fn gain_recovery_and_traffic_match_a_case_worked_by_hand() {
        // Prepare: seed 1; fedavg peaks at 0.6 in round 3 (9 MB by then),
        // the IID reference at 0.8, astraea passes 0.6 in round 2 (6 MB) and
        // peaks at 0.75.
        let runs = [
            run("iid", "fedavg-iid", 1, &[0.5, 0.7, 0.8]),
            run("fedavg", "fedavg", 1, &[0.3, 0.5, 0.6]),
            run("astraea", "astraea", 1, &[0.4, 0.65, 0.75]),
        ];

        // Execute
        let rows = compare(&runs, "fedavg", "fedavg-iid");

        // Assert: gain 15 points of a 20-point loss = 75 %; 6 MB / 9 MB.
        let astraea = rows.iter().find(|c| c.strategy == "astraea").unwrap();
        assert!((astraea.gain_points - 15.0).abs() < 1e-9);
        assert!((astraea.recovery.unwrap() - 0.75).abs() < 1e-9);
        assert!((astraea.traffic_ratio.unwrap() - 6.0 / 9.0).abs() < 1e-9);
        assert_eq!(astraea.rounds_to_baseline_best, Some(2.0));
        let fedavg = rows.iter().find(|c| c.strategy == "fedavg").unwrap();
        assert_eq!(fedavg.gain_points, 0.0);
        assert_eq!(fedavg.traffic_ratio, Some(1.0));
        assert!(comparison_table(&rows, "fedavg").contains("75%"));
    }

    #[test]
    fn a_run_that_never_reaches_the_baseline_best_has_no_traffic_ratio() {
        let runs = [
            run("fedavg", "fedavg", 2, &[0.3, 0.6]),
            run("slow", "slow", 2, &[0.2, 0.4]),
            run("other seed", "slow", 9, &[0.9]),
        ];

        let rows = compare(&runs, "fedavg", "fedavg-iid");

        let slow = rows.iter().find(|c| c.strategy == "slow").unwrap();
        assert_eq!(slow.seeds, 1, "the seed without a baseline is left out");
        assert_eq!(slow.traffic_ratio, None);
        assert_eq!(slow.recovery, None);
        assert!((slow.gain_points + 20.0).abs() < 1e-9);
    }
}
