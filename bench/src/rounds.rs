//! Coordination overhead per round: a real server on loopback with many
//! echo clients (they answer each task with the weights they got), so a
//! round's time is the server's own work: scheduling, sending and receiving
//! every model, validating, aggregating, plus one evaluation, timed apart.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use astraea_core::data::catalog::load_named;
use astraea_core::strategy::StrategyKind;
use astraea_core::train::Samples;
use burn::prelude::*;

use astraea_core::model::ModelConfig;
use astraea_native::{ClientOptions, run_swarm};
use astraea_server as serve;

/// What the rounds benchmark measured.
#[derive(Debug, Clone)]
pub struct RoundsBench {
    /// Strategy.
    pub strategy: StrategyKind,
    /// The loss rule's validation samples (0: the rule off).
    pub validation_samples: usize,
    /// Clients, all taking part in every round.
    pub clients: usize,
    /// Rounds timed (the first, which waits for joins, is left out).
    pub rounds: usize,
    /// Mean seconds per round.
    pub round_s: f64,
    /// Seconds one evaluation of the test set takes.
    pub eval_s: f64,
    /// Model transfers (down and up) per round.
    pub transfers: usize,
}

/// Runs `rounds + 1` rounds with `clients` echo clients, the loss rule
/// judging every update on `validation_samples` samples (0: off).
pub async fn run(
    data_dir: PathBuf,
    clients: usize,
    rounds: u32,
    strategy: StrategyKind,
    validation_samples: usize,
) -> anyhow::Result<RoundsBench> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (train_set, test) = load_named("mnist", &data_dir).context("loading mnist")?;
    let model_config = ModelConfig::for_dataset(&train_set);
    let mut config = crate::serve_config(data_dir.clone(), clients, rounds + 1, strategy);
    config.guard.validation_samples = validation_samples;
    let running = serve::start(listener, config).await?;
    let options = ClientOptions {
        max_frame_bytes: 1 << 20,
        max_attempts: Some(1),
        echo: true,
        ..ClientOptions::new(format!("ws://{address}/ws"), data_dir)
    };
    let swarm = tokio::spawn(run_swarm(clients, options));
    running.coordinator.await??;
    swarm.abort();
    let history = running.state.status().history.clone();
    let timed = &history[1..];
    let round_s =
        (timed.last().map_or(0.0, |r| r.wall_s) - history[0].wall_s) / timed.len().max(1) as f64;
    let weights = running
        .state
        .global
        .lock()
        .expect("no panic")
        .clone()
        .expect("a model");
    // An IID partition keeps the whole test set, as the server evaluates it.
    let start = Instant::now();
    tokio::task::spawn_blocking(move || {
        let samples = Samples {
            images: &test.images,
            labels: &test.labels,
        };
        astraea_core::batched::evaluate(&model_config, &weights, samples, 500, &Device::flex())
    })
    .await??;
    let eval_s = start.elapsed().as_secs_f64();
    let transfers = match strategy {
        StrategyKind::FedAvg | StrategyKind::FedProx | StrategyKind::AstraeaAugmentation => {
            2 * clients
        }
        _ => 2 * 2 * clients,
    };
    Ok(RoundsBench {
        strategy,
        validation_samples,
        clients,
        rounds: timed.len(),
        round_s,
        eval_s,
        transfers,
    })
}

/// Like [`run`] with the loss rule off, but every server a process of its
/// own sharing a throw-away PostgreSQL run (FedAvg, what folds across
/// gateways): a leader and `gateways` gateways (`serve --gateway`; 0: the
/// leader alone), `clients` echo clients (in this process) spread evenly.
/// Separate processes, so that no process holds more than 10,000 client
/// and server sockets together at 10,000 clients (one process may open
/// 20,000 files here). The round's time is the leader's (`/api/rounds`),
/// from placing the gateways' shares to folding their partials.
///
/// # Errors
/// PostgreSQL cannot start, a server fails to start, or the run does not
/// finish within an hour.
pub async fn run_with_gateways(
    data_dir: PathBuf,
    clients: usize,
    rounds: u32,
    gateways: usize,
) -> anyhow::Result<RoundsBench> {
    use crate::chaos::{Server, get_json, serve_command};
    use crate::failover::wait_until;
    use crate::gateways::{first_leader, free_port};
    use std::time::Duration;

    let cluster = astraea_server::testing::PgCluster::start().map_err(anyhow::Error::msg)?;
    let url = cluster
        .create_database("rounds")
        .map_err(anyhow::Error::msg)?;
    let work = std::env::temp_dir().join(format!("astraea-rounds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // `serve_config`'s run, as flags.
    let (n, samples) = (clients.to_string(), (20 * clients).to_string());
    let spawn = |port: u16, gateway: bool, log: &str| -> anyhow::Result<Server> {
        let mut command = serve_command(port, &data_dir, &work)?;
        command
            .args(["--dataset", "mnist", "--max-train", &samples])
            .args(["--partition", "iid", "--shards", &n])
            .args(["--participants", &n, "--min-clients", &n])
            .args(["--rounds", &(rounds + 1).to_string()])
            .args(["--strategy", "fedavg", "--prox-mu", "0"])
            .args(["--validation-samples", "0", "--hop-deadline", "120"])
            .args(["--max-frame-bytes", &(1 << 20).to_string()])
            .args(["--run-name", "bench", "--store", &url])
            // 10,000 clients and five servers on 2 cores starve the lease's
            // renewal of its 3 s (the leader then stops): this measures
            // coordination, not takeover.
            .args(["--lease-ttl", "60"])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(work.join(log))?);
        if gateway {
            command.arg("--gateway");
        }
        Ok(Server(command.spawn().context("starting a server")?))
    };
    let swarm = |port: u16, n: usize| {
        let options = ClientOptions {
            max_frame_bytes: 1 << 20,
            max_attempts: Some(1),
            echo: true,
            ..ClientOptions::new(format!("ws://127.0.0.1:{port}/ws"), data_dir.clone())
        };
        tokio::spawn(async move {
            run_swarm(n, options).await;
        })
    };
    let leader_port = free_port()?;
    let mut leader = spawn(leader_port, false, "leader.log")?;
    first_leader(leader_port).await?;
    let servers = gateways + 1;
    let mut running = Vec::new();
    let mut swarms = Vec::new();
    for g in 0..gateways {
        let port = free_port()?;
        running.push(spawn(port, true, &format!("gateway{g}.log"))?);
        wait_until(Duration::from_secs(120), || async {
            get_json(port, "/api/status").await.is_some()
        })
        .await
        .context("a gateway")?;
        // Clients spread evenly; the leader takes what is left over.
        swarms.push(swarm(port, clients / servers));
    }
    swarms.push(swarm(leader_port, clients - gateways * (clients / servers)));
    // Until the run finishes, or its leader stops (its log says why).
    let deadline = std::time::Instant::now() + Duration::from_secs(3600);
    while !get_json(leader_port, "/api/status")
        .await
        .is_some_and(|s| s["phase"] == "finished")
    {
        if let Some(exit) = leader.0.try_wait()? {
            let log = std::fs::read_to_string(work.join("leader.log")).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(20).collect();
            anyhow::bail!(
                "the leader stopped ({exit}); the last of its log:\n{}",
                last.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the run did not finish within an hour");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let history = get_json(leader_port, "/api/rounds")
        .await
        .context("the leader's rounds")?;
    for s in swarms {
        s.abort();
    }
    drop(running);
    let _ = std::fs::remove_dir_all(&work);
    let wall: Vec<f64> = history
        .as_array()
        .context("rounds as a list")?
        .iter()
        .filter_map(|r| r["wall_s"].as_f64())
        .collect();
    // The first round, which waits for joins, is left out.
    let timed = wall.len().saturating_sub(1);
    let round_s = (wall.last().copied().unwrap_or(0.0) - wall.first().copied().unwrap_or(0.0))
        / timed.max(1) as f64;
    Ok(RoundsBench {
        strategy: StrategyKind::FedAvg,
        validation_samples: 0,
        clients,
        rounds: timed,
        round_s,
        // The leader evaluates as a server alone does ([`run`] times it).
        eval_s: f64::NAN,
        transfers: 2 * clients,
    })
}
