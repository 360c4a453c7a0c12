//! Idle clients: how many joined WebSocket clients one server process holds
//! and what each costs it in memory. The server runs as its own process
//! (this binary's `serve`), so its resident memory is measured alone.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use astraea_core::protocol::{ClientMessage, DataSource, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt, stream};
use tokio_tungstenite::tungstenite::Message;

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

/// Kills the server process when dropped.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe: PathBuf = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
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
            "100000000",
            "--rounds",
            "1",
            "--strategy",
            "fedavg",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--static-dir")
        .arg(std::env::temp_dir())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting the server")?;
    let server = ServerProcess(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(port, "/api/status").await.is_none() {
        if Instant::now() > deadline {
            bail!("the server did not start listening");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = server.0.id();
    let rss_before = rss_bytes(pid)?;
    let url = format!("ws://127.0.0.1:{port}/ws");
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
    let start = Instant::now();
    let sockets: Vec<_> = stream::iter(0..clients)
        .map(|_| {
            let (url, join) = (url.clone(), join.clone());
            async move {
                let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.ok()?;
                socket.send(Message::Text(join.into())).await.ok()?;
                match socket.next().await {
                    Some(Ok(Message::Text(_))) => Some(socket),
                    _ => None,
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let join_s = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_bytes(pid)?;
    let status = get(port, "/api/status")
        .await
        .context("status after joining")?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    let connected = status["clients"].as_u64().unwrap_or(0) as usize;
    let held = sockets.iter().filter(|s| s.is_some()).count();
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
