//! `astraea report`: the plot and tables re-drawn from earlier runs' CSVs.

use std::path::PathBuf;

use anyhow::Context;
use astraea_sim::report;

use crate::shared::print_tables;

#[derive(clap::Args)]
pub(crate) struct ReportArgs {
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
}

/// Reads the CSVs back, draws the plot and prints the tables.
pub(crate) fn report_command(args: ReportArgs) -> anyhow::Result<()> {
    let ReportArgs {
        csv,
        plot,
        title,
        target,
        markdown,
    } = args;
    let runs = csv
        .iter()
        .map(|path| history_from_csv(path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    report::plot_runs(&plot, &runs, &title)?;
    print_tables(&runs, target.map(|t| t / 100.0), markdown.as_deref())?;
    println!("plot: {}", plot.display());
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
