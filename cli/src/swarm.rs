//! `astraea swarm`: many native clients, honest and hostile, in one process.

use std::path::PathBuf;

use anyhow::{Context, bail};
use astraea_core::attack::Attack;
use astraea_native as client;

use crate::shared::{client_options, tls_settings};

#[derive(clap::Args)]
pub(crate) struct SwarmArgs {
    /// WebSocket URL of the server: ws://, or wss:// over TLS.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    server: String,
    /// Also trust the certificates in this PEM file for wss://.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Number of clients, attackers included.
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Folder holding the datasets.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// What the attackers do: sign-flip[:SCALE], scale[:FACTOR],
    /// noise[:STD], label-flip, inflate-samples[:FACTOR].
    #[arg(long)]
    attack: Option<Attack>,
    /// How many of the clients attack.
    #[arg(long, default_value_t = 0)]
    attackers: usize,
    /// Probability, per task, that a client freezes mid-hop: silent,
    /// socket open (a locked phone, a frozen tab), for --freeze-for.
    #[arg(long, default_value_t = 0.0)]
    freeze: f64,
    /// Seconds a freeze lasts; the client then answers, late.
    #[arg(long, default_value_t = 30.0)]
    freeze_for: f64,
    /// Injected training speeds of the honest clients (uniform:SPEED or
    /// lognormal:MEDIAN:SPREAD, samples per second, drawn with
    /// --speed-seed): a client faster than its draw waits, sending
    /// heartbeats, until a machine of that speed would have finished.
    #[arg(long)]
    speeds: Option<astraea_sim::population::SpeedModel>,
    /// Seed of the speed draws.
    #[arg(long, default_value_t = 1)]
    speed_seed: u64,
}

/// Runs the swarm and prints each client's outcome.
pub(crate) async fn swarm_command(args: SwarmArgs) -> anyhow::Result<()> {
    let SwarmArgs {
        server,
        ca_cert,
        clients,
        data_dir,
        attack,
        attackers,
        freeze,
        freeze_for,
        speeds,
        speed_seed,
    } = args;
    if attackers > clients || (attackers > 0 && attack.is_none()) {
        bail!("--attackers {attackers} needs --attack and at most --clients {clients}");
    }
    let honest = client::ClientOptions {
        tls: tls_settings(&server, ca_cert.as_deref())?,
        freeze: freeze.clamp(0.0, 1.0),
        freeze_for: std::time::Duration::try_from_secs_f64(freeze_for)
            .context("--freeze-for must be a non-negative number of seconds")?,
        ..client_options(server, data_dir, None)
    };
    let hostile = client::ClientOptions {
        attack,
        ..honest.clone()
    };
    let drawn = speeds
        .map(|m| m.draw(clients - attackers, speed_seed))
        .unwrap_or_default();
    let (mut results, hostile_results) = tokio::join!(
        client::run_swarm_with_speeds(clients - attackers, honest, &drawn),
        client::run_swarm(attackers, hostile),
    );
    results.extend(hostile_results);
    for (i, result) in results.iter().enumerate() {
        match result {
            Ok(summary) => println!("client {i}: {summary:?}"),
            Err(e) => println!("client {i}: {e:#}"),
        }
    }
    Ok(())
}
