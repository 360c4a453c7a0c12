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

/// Like [`run`] with the loss rule off, but the round split over a leader
/// and `gateways` gateways (`serve --gateway`), in this process, sharing a
/// throw-away PostgreSQL run: `clients` echo clients spread evenly, FedAvg
/// (what folds across gateways). The round's time is the leader's, from
/// placing the gateways' shares to folding their partials.
///
/// # Errors
/// PostgreSQL cannot start, or a server fails.
pub async fn run_with_gateways(
    data_dir: PathBuf,
    clients: usize,
    rounds: u32,
    gateways: usize,
) -> anyhow::Result<RoundsBench> {
    let cluster = astraea_server::testing::PgCluster::start().map_err(anyhow::Error::msg)?;
    let url = cluster
        .create_database("rounds")
        .map_err(anyhow::Error::msg)?;
    let mut config =
        crate::serve_config(data_dir.clone(), clients, rounds + 1, StrategyKind::FedAvg);
    config.guard.validation_samples = 0;
    config.postgres = Some(url.into());
    config.across_gateways().map_err(anyhow::Error::msg)?;
    let servers = gateways + 1;
    let mut swarms = Vec::new();
    let swarm = |address: std::net::SocketAddr, n: usize| {
        let options = ClientOptions {
            max_frame_bytes: 1 << 20,
            max_attempts: Some(1),
            echo: true,
            ..ClientOptions::new(format!("ws://{address}/ws"), data_dir.clone())
        };
        tokio::spawn(async move {
            run_swarm(n, options).await;
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let leader = serve::start(listener, config.clone()).await?;
    let mut running = Vec::new();
    for _ in 0..gateways {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let gateway = serve::start(
            listener,
            serve::ServeConfig {
                gateway: true,
                ..config.clone()
            },
        )
        .await?;
        // Clients spread evenly; the leader takes what is left over.
        swarms.push(swarm(address, clients / servers));
        running.push(gateway);
    }
    swarms.push(swarm(address, clients - gateways * (clients / servers)));
    leader.coordinator.await??;
    for s in swarms {
        s.abort();
    }
    // Every server and its sockets go before the next layout starts (one
    // process's descriptors hold them all).
    for gateway in running {
        gateway.coordinator.abort();
        gateway.server.abort();
    }
    leader.server.abort();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let history = leader.state.status().history.clone();
    let timed = &history[1..];
    let round_s =
        (timed.last().map_or(0.0, |r| r.wall_s) - history[0].wall_s) / timed.len().max(1) as f64;
    Ok(RoundsBench {
        strategy: StrategyKind::FedAvg,
        validation_samples: 0,
        clients,
        rounds: timed.len(),
        round_s,
        // The leader evaluates as a server alone does ([`run`] times it).
        eval_s: f64::NAN,
        transfers: 2 * clients,
    })
}
