//! Idle clients: how many joined WebSocket clients one server process holds
//! and what each costs it in memory. The server runs as its own process
//! (this binary's `serve`), so its resident memory is measured alone.
//!
//! [`over_gateways`] does the same for a leader and gateways sharing a run
//! in PostgreSQL, each its own process, the clients held by processes of
//! their own ([`hold`], `astraea bench idle-hold`): one process's file
//! limit (20,000 here, each side of a socket holding one) caps neither.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use astraea_core::protocol::{ClientMessage, DataSource, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt, stream};
use tokio_tungstenite::tungstenite::Message;

use crate::chaos::{Server, serve_command};
use crate::failover::wait_until;
use crate::gateways::free_port;

/// Waits (at most `within`) until the server on `port` answers.
async fn listening(port: u16, within: Duration) -> anyhow::Result<()> {
    wait_until(within, || async move {
        get(port, "/api/status").await.is_some()
    })
    .await
}

/// `--min-clients` of the idle servers: the most `serve` accepts, more
/// than a bench joins, so no round ever begins.
const NEVER_ENOUGH: &str = "100000";

/// What the idle benchmark measured.
#[derive(Debug, Clone)]
pub struct IdleBench {
    /// Clients asked to join.
    pub requested: usize,
    /// Clients the server reported connected at the end.
    pub connected: usize,
    /// Server resident memory before any client, in bytes.
    pub rss_before: u64,
    /// Server resident memory with every client joined, in bytes.
    pub rss_after: u64,
    /// Seconds to connect and join them all.
    pub join_s: f64,
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("no number")?
        .parse()?;
    Ok(kb * 1024)
}

/// The body of `GET path` from the server on `port`; `None` while nothing
/// listens.
async fn get(port: u16, path: &str) -> Option<String> {
    astraea_server::loopback::get(&format!("127.0.0.1:{port}"), path)
        .await
        .ok()
        .map(|r| r.text())
}

/// Starts a server that never begins a round, joins `clients` idle clients
/// (`concurrency` joining at once) and measures the server.
pub async fn run(data_dir: &Path, clients: usize, concurrency: usize) -> anyhow::Result<IdleBench> {
    let port = free_port()?;
    let child = serve_command(port, data_dir, &std::env::temp_dir())?
        .args([
            "--dataset",
            "mnist",
            "--max-train",
            "1000",
            "--shards",
            "10",
        ])
        .args([
            "--min-clients",
            NEVER_ENOUGH,
            "--rounds",
            "1",
            "--strategy",
            "fedavg",
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting the server")?;
    let server = Server(child);
    listening(port, Duration::from_secs(60))
        .await
        .context("the server did not start listening")?;
    let pid = server.0.id();
    let rss_before = rss_bytes(pid)?;
    let url = format!("ws://127.0.0.1:{port}/ws");
    let start = Instant::now();
    let sockets = join_idle(&url, clients, concurrency).await;
    let join_s = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_bytes(pid)?;
    let status = get(port, "/api/status")
        .await
        .context("status after joining")?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    let connected = status["clients"].as_u64().unwrap_or(0) as usize;
    let held = sockets.len();
    drop(sockets);
    tracing::info!(held, "sockets held by the bench");
    Ok(IdleBench {
        requested: clients,
        connected,
        rss_before,
        rss_after,
        join_s,
    })
}

/// A joined client's socket.
type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Joins `clients` idle clients to the server at `url` (a WebSocket URL),
/// `concurrency` joining at once; the sockets of those the server
/// welcomed (a refused or failed join is left out).
async fn join_idle(url: &str, clients: usize, concurrency: usize) -> Vec<Socket> {
    let join = ClientMessage::Join {
        version: PROTOCOL_VERSION,
        backend: "idle".into(),
        speed: None,
        data: DataSource::Own {
            counts: vec![1; 10],
        },
        resume: None,
    }
    .to_json();
    stream::iter(0..clients)
        .map(|_| {
            let join = join.clone();
            async move {
                let (mut socket, _) = tokio_tungstenite::connect_async(url).await.ok()?;
                socket.send(Message::Text(join.into())).await.ok()?;
                match socket.next().await {
                    Some(Ok(Message::Text(_))) => Some(socket),
                    _ => None,
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .filter_map(|socket| async move { socket })
        .collect()
        .await
}

/// The line [`hold`] prints once its clients joined: `held N`.
const HELD: &str = "held ";

/// Joins `clients` idle clients to `url` (`concurrency` at once), prints
/// `held N` (those welcomed) on standard output, and keeps them until
/// standard input closes (its parent went). The body of
/// `astraea bench idle-hold`.
///
/// # Errors
/// Reading standard input fails.
pub async fn hold(url: &str, clients: usize, concurrency: usize) -> anyhow::Result<()> {
    let sockets = join_idle(url, clients, concurrency).await;
    println!("{HELD}{}", sockets.len());
    use std::io::Write;
    std::io::stdout().flush()?;
    // Idle until the parent goes: its end of our stdin closes then. The
    // sockets answer nothing meanwhile (the server never starts a round).
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
    })
    .await??;
    drop(sockets);
    Ok(())
}

/// Clients one holder process keeps (below the 20,000 files a process may
/// open here, with room for the runtime's own).
const PER_HOLDER: usize = 15_000;

/// What [`over_gateways`] measured, server by server (the leader first).
#[derive(Debug, Clone)]
pub struct SpreadIdle {
    /// Gateways besides the leader.
    pub gateways: usize,
    /// Clients asked to join, over all servers.
    pub requested: usize,
    /// Clients the holders say the servers welcomed.
    pub held: usize,
    /// Each server's own count of its connected clients (`/api/status`
    /// `clients`), the leader first.
    pub connected: Vec<usize>,
    /// Clients the leader's `/api/status` shows over the federation: its
    /// own and every gateway's (their heartbeats).
    pub federation: usize,
    /// Each server's resident memory before any client and after, bytes.
    pub rss: Vec<(u64, u64)>,
    /// Seconds to connect and join them all (the holders at once).
    pub join_s: f64,
}

/// Starts a leader and `gateways` gateways (each `astraea serve` of its
/// own, FedAvg, never beginning a round) sharing a run in a throw-away
/// PostgreSQL cluster, spreads `clients` idle clients evenly over them,
/// held by processes of their own (at most [`PER_HOLDER`] each; each
/// server below its file limit as the one-server bench is), and measures
/// every server.
///
/// # Errors
/// PostgreSQL or a server does not start, or a holder says nothing.
pub async fn over_gateways(
    data_dir: &Path,
    clients: usize,
    concurrency: usize,
    gateways: usize,
) -> anyhow::Result<SpreadIdle> {
    let cluster = astraea_server::testing::PgCluster::start().map_err(anyhow::Error::msg)?;
    let store = cluster
        .create_database("idle")
        .map_err(anyhow::Error::msg)?;
    let exe: PathBuf = std::env::current_exe()?;
    let servers = gateways + 1;
    let mut ports = Vec::new();
    let mut running = Vec::new();
    for index in 0..servers {
        let port = free_port()?;
        let mut command = serve_command(port, data_dir, &std::env::temp_dir())?;
        command
            .args(["--dataset", "mnist", "--max-train", "1000"])
            .args(["--shards", "10", "--min-clients", NEVER_ENOUGH])
            .args(["--rounds", "1", "--strategy", "fedavg"])
            .args(["--validation-samples", "0", "--run-name", "idle"])
            .args(["--store", &store])
            .env("RUST_LOG", "warn");
        if index > 0 {
            command.arg("--gateway");
        }
        running.push(Server(command.spawn().context("starting a server")?));
        ports.push(port);
        // The leader creates the run the gateways join.
        listening(port, Duration::from_secs(120))
            .await
            .with_context(|| format!("server {index} did not start listening"))?;
    }
    let rss_before: Vec<u64> = running
        .iter()
        .map(|c| rss_bytes(c.0.id()))
        .collect::<anyhow::Result<_>>()?;
    // Clients spread evenly over the servers, each server's over holders.
    let mut holders = Vec::new();
    let start = Instant::now();
    for (index, &port) in ports.iter().enumerate() {
        let mine = clients / servers + usize::from(index < clients % servers);
        let mut left = mine;
        while left > 0 {
            let n = left.min(PER_HOLDER);
            left -= n;
            let child = Command::new(&exe)
                .args(["bench", "idle-hold", "--url"])
                .arg(format!("ws://127.0.0.1:{port}/ws"))
                .args(["--clients", &n.to_string()])
                .args(["--concurrency", &concurrency.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a holder")?;
            holders.push(Server(child));
        }
    }
    let mut held = 0;
    for holder in &mut holders {
        let stdout = holder.0.stdout.take().context("a holder's output")?;
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        })
        .await??;
        held += line
            .trim()
            .strip_prefix(HELD)
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("a holder said {line:?}"))?;
    }
    let join_s = start.elapsed().as_secs_f64();
    // Two heartbeats, so the leader's view has every gateway's count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut connected = Vec::new();
    let mut federation = 0;
    for (index, &port) in ports.iter().enumerate() {
        let status = get(port, "/api/status")
            .await
            .with_context(|| format!("server {index}'s status"))?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        let own = status["clients"].as_u64().unwrap_or(0) as usize;
        connected.push(own);
        if index == 0 {
            let others: u64 = status["gateways"]
                .as_array()
                .map(|g| g.iter().filter_map(|g| g["clients"].as_u64()).sum())
                .unwrap_or(0);
            federation = own + others as usize;
        }
    }
    let rss: Vec<(u64, u64)> = running
        .iter()
        .zip(rss_before)
        .map(|(c, before)| Ok((before, rss_bytes(c.0.id())?)))
        .collect::<anyhow::Result<_>>()?;
    drop(holders);
    drop(running);
    Ok(SpreadIdle {
        gateways,
        requested: clients,
        held,
        connected,
        federation,
        rss,
        join_s,
    })
}
