//! Helpers more than one command uses: the DP flags' adaptive clipping
//! (`serve`, `simulate`), the result tables (`simulate`, `report`) and a
//! native client's options (`client`, `swarm`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use astraea_native as client;
use astraea_sim::report;

/// Adaptive clipping from the DP flags: the paper's step (eta_C 0.2) and,
/// unless given, its count noise (the groups expected a round over 20:
/// `participants` clients, in mediators of `gamma` when `chains`).
pub(crate) fn adaptive_clip(
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
pub(crate) fn check_count_noise(dp: &astraea_core::privacy::ModelPrivacy) -> anyhow::Result<()> {
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

/// Prints the per-run summary and, when a FedAvg run is among them, the
/// comparison against it; optionally writes both as Markdown.
pub(crate) fn print_tables(
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

/// The TLS settings for `--ca-cert`: `None` (the public roots) without one;
/// an error when one is given for a plain ws:// URL, where it would be
/// silently unused.
pub(crate) fn tls_settings(
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

/// A native client's options for `server` with the defaults (no TLS
/// settings, no attack, no injected faults).
pub(crate) fn client_options(
    server: String,
    data_dir: PathBuf,
    max_attempts: Option<u32>,
) -> client::ClientOptions {
    client::ClientOptions {
        max_attempts,
        ..client::ClientOptions::new(server, data_dir)
    }
}
