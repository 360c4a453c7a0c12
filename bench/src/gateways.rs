//! `astraea bench gateways`: one run served by one server, and the same run
//! by a leader with gateways (`serve --gateway`), on the same seeds and the
//! same data: does splitting the work change what the model sees?
//!
//! Both layouts train `clients × (gateways + 1)` native clients on demo
//! shards of a power-of-two count, `clients` of them: the run's demo
//! clients take the shards in turn, whichever server they join, so each
//! shard is trained `gateways + 1` times in both. Rounds draw every client
//! (`--participants` is all of them), mediators of 2 and two passes, no
//! loss rule; the strategy (Astraea's rescheduling by default, or full
//! Astraea with its augmentation plan) and the aggregation rule (the mean
//! folds gateways' partials; a robust rule takes every mediator's result)
//! are the caller's. Both are kept in a throw-away PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use astraea_native::{ClientOptions, run_swarm};
use astraea_server::testing::PgCluster;

use crate::chaos::{Server, get_json, serve_command};
use crate::failover::wait_until;

/// One run of one layout.
#[derive(Debug, Clone)]
pub struct GatewayRun {
    /// Gateways besides the leader (0: one server holds every client).
    pub gateways: usize,
    /// The run's seed.
    pub seed: u64,
    /// Test accuracy after the last round.
    pub final_accuracy: f64,
    /// Best test accuracy of any round.
    pub best_accuracy: f64,
    /// Rounds completed.
    pub rounds: usize,
    /// The run's clock at its last round (seconds since the leader began).
    pub seconds: f64,
}

/// A port nothing listens on now.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits (at most 2 minutes) until the server on `port` leads its run, at
/// its first term.
pub(crate) async fn first_leader(port: u16) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(120), || async {
        get_json(port, "/api/status")
            .await
            .is_some_and(|s| s["leader_term"] == 1)
    })
    .await
    .context("the leader")
}

/// The run's strategy and aggregation rule, as `serve` names them.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// `--strategy`.
    pub strategy: &'a str,
    /// `--aggregation`.
    pub aggregation: &'a str,
}

#[allow(clippy::too_many_arguments)]
fn spawn(
    port: u16,
    url: &str,
    (seed, rounds, shards, total): (u64, u32, usize, usize),
    (gateway, rules): (bool, Rules<'_>),
    data_dir: &Path,
    work: &Path,
    log: &str,
) -> anyhow::Result<Server> {
    let log = std::fs::File::create(work.join(log))?;
    let (shards, total) = (shards.to_string(), total.to_string());
    let mut command = serve_command(port, data_dir, work)?;
    command
        .args(["--dataset", "mnist", "--max-train", "6000"])
        .args(["--partition", "long-tail:10", "--shards", &shards])
        .args(["--participants", &total, "--min-clients", &total])
        .args(["--rounds", &rounds.to_string(), "--seed", &seed.to_string()])
        .args(["--strategy", rules.strategy, "--gamma", "2"])
        .args(["--aggregation", rules.aggregation])
        .args(["--validation-samples", "0", "--hop-deadline", "60"])
        .args(["--run-name", "gateways", "--store", url])
        .env("RUST_LOG", "info")
        .stderr(log);
    if gateway {
        command.arg("--gateway");
    }
    Ok(Server(command.spawn().context("starting a server")?))
}

fn swarm(port: u16, clients: usize, data_dir: &Path) -> tokio::task::JoinHandle<()> {
    let options = ClientOptions::new(format!("ws://127.0.0.1:{port}/ws"), data_dir.to_path_buf());
    tokio::spawn(async move {
        run_swarm(clients, options).await;
    })
}

/// Runs one layout: `gateways` gateways (0: one server) with `clients`
/// clients on every server, for `rounds` rounds of seed `seed`, in a new
/// database of `cluster`.
async fn one(
    cluster: &PgCluster,
    data_dir: &Path,
    (gateways, clients, rounds, seed): (usize, usize, u32, u64),
    rules: Rules<'_>,
) -> anyhow::Result<GatewayRun> {
    let database = format!("g{gateways}s{seed}");
    let url = cluster
        .create_database(&database)
        .map_err(anyhow::Error::msg)?;
    let work = std::env::temp_dir().join(format!(
        "astraea-gateways-{}-{database}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let total = clients * (gateways + 1);
    let settings = (seed, rounds, clients, total);
    let leader_port = free_port()?;
    let _leader = spawn(
        leader_port,
        &url,
        settings,
        (false, rules),
        data_dir,
        &work,
        "leader.log",
    )?;
    first_leader(leader_port).await?;
    let mut servers = Vec::new();
    let mut swarms = Vec::new();
    for g in 0..gateways {
        let port = free_port()?;
        servers.push(spawn(
            port,
            &url,
            settings,
            (true, rules),
            data_dir,
            &work,
            &format!("gateway{g}.log"),
        )?);
        swarms.push(swarm(port, clients, data_dir));
    }
    // The gateways' clients first, so each server's n-th client is the
    // n-th to join it whatever the timing.
    wait_until(Duration::from_secs(120), || async {
        get_json(leader_port, "/api/status").await.is_some_and(|s| {
            let ready: u64 = s["gateways"]
                .as_array()
                .map(|g| g.iter().filter_map(|g| g["ready"].as_u64()).sum())
                .unwrap_or(0);
            ready as usize == clients * gateways
        })
    })
    .await
    .context("the gateways' clients")?;
    let leader_clients = if gateways == 0 { total } else { clients };
    swarms.push(swarm(leader_port, leader_clients, data_dir));
    wait_until(Duration::from_secs(3600), || async {
        get_json(leader_port, "/api/status")
            .await
            .is_some_and(|s| s["phase"] == "finished")
    })
    .await
    .context("the run to finish")?;
    for s in swarms {
        s.abort();
    }
    let history = get_json(leader_port, "/api/rounds")
        .await
        .context("the leader's rounds")?;
    let records = history
        .as_array()
        .or_else(|| history["history"].as_array())
        .cloned()
        .unwrap_or_default();
    let accuracy = |r: &serde_json::Value| r["accuracy"].as_f64().unwrap_or(f64::NAN);
    let last = records.last().context("no round recorded")?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(GatewayRun {
        gateways,
        seed,
        final_accuracy: accuracy(last),
        best_accuracy: records.iter().map(accuracy).fold(0.0, f64::max),
        rounds: records.len(),
        seconds: last["wall_s"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Both layouts (one server; a leader with `gateways` gateways), `clients`
/// clients a server (a power of two), `rounds` rounds, for each of
/// `seeds`, under `rules`, in a throw-away PostgreSQL cluster.
///
/// # Errors
/// `clients` is not a power of two, PostgreSQL cannot start, or a run
/// does not finish within an hour.
pub async fn run(
    data_dir: PathBuf,
    gateways: usize,
    clients: usize,
    rounds: u32,
    seeds: &[u64],
    rules: Rules<'_>,
) -> anyhow::Result<Vec<GatewayRun>> {
    if !clients.is_power_of_two() || gateways == 0 {
        bail!("--clients must be a power of two and --gateways at least 1");
    }
    let cluster = PgCluster::start().map_err(anyhow::Error::msg)?;
    let mut runs = Vec::new();
    for &seed in seeds {
        for layout in [0, gateways] {
            runs.push(one(&cluster, &data_dir, (layout, clients, rounds, seed), rules).await?);
        }
    }
    Ok(runs)
}
