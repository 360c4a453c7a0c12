//! `astraea bench chaos`: crash resilience, measured.
//!
//! - [`kills`]: the real server process is killed with SIGKILL at random
//!   moments while native clients train, and started again on the same
//!   state folder; after each restart no completed round may be missing,
//!   and the run must still finish.
//! - [`vanish`]: a share of the clients vanish mid-chain (socket dropped
//!   without a close frame) every round and rejoin; no round may stall
//!   waiting for them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use astraea_core::asynchronous::Mode;
use astraea_core::strategy::StrategyKind;
use astraea_native::{ClientOptions, run_swarm, run_swarm_with_speeds};
use astraea_server::{self as serve, ServeConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Clients in both chaos runs, and the server's shards.
pub(crate) const CLIENTS: usize = 6;

/// What the SIGKILL run measured.
#[derive(Debug, Clone)]
pub struct KillReport {
    /// SIGKILLs delivered (each followed by a restart).
    pub kills: usize,
    /// Completed rounds visible before a kill and missing after the restart,
    /// summed over kills (target 0).
    pub rounds_lost: usize,
    /// Rounds the run was configured for.
    pub rounds: u32,
    /// Rounds completed at the end.
    pub rounds_done: usize,
    /// Whether the run finished.
    pub finished: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The server process; killed when dropped (continued first, in case it
/// was paused).
pub(crate) struct Server(pub(crate) Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where a chaos run's server keeps the run.
pub(crate) enum Keep<'a> {
    /// SQLite in this folder.
    Dir(&'a Path),
    /// PostgreSQL at this URL (several servers may share it).
    Postgres(&'a str),
}

fn spawn_server(
    port: u16,
    rounds: u32,
    data_dir: &Path,
    state_dir: &Path,
) -> anyhow::Result<Server> {
    spawn_server_keeping(
        port,
        RunSettings {
            rounds,
            min_clients: CLIENTS,
            participants: CLIENTS,
            partition: "long-tail:10",
            part: Part::Server,
        },
        data_dir,
        state_dir,
        Keep::Dir(state_dir),
        "server.log",
    )
}

/// The part a chaos run's server plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// A server of a run without gateways: Astraea (augmentation and
    /// rescheduling, mediators of 3), the loss rule on.
    Server,
    /// A leader-capable server of a run with gateways: what folds across
    /// them (`ServeConfig::across_gateways`): Astraea's rescheduling,
    /// mediators of 3, no loss rule.
    Leader,
    /// A gateway (`serve --gateway`) of such a run: never leads.
    Gateway,
}

/// A chaos run's settings, as every server of it is started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunSettings<'a> {
    /// Rounds of the run.
    pub(crate) rounds: u32,
    /// Ready clients a round waits for.
    pub(crate) min_clients: usize,
    /// Participants a round draws (`--participants`).
    pub(crate) participants: usize,
    /// How the shards are cut (`--partition`).
    pub(crate) partition: &'a str,
    /// The part this server plays.
    pub(crate) part: Part,
}

/// `astraea serve` (this binary) on 127.0.0.1:`port`, its datasets in
/// `data_dir`, serving `static_dir`, its standard output discarded: how
/// every bench starts a server process, before the flags of its run.
///
/// # Errors
/// This binary's path cannot be read.
pub(crate) fn serve_command(
    port: u16,
    data_dir: &Path,
    static_dir: &Path,
) -> anyhow::Result<Command> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--static-dir")
        .arg(static_dir)
        .stdout(Stdio::null());
    Ok(command)
}

/// A chaos run's server on `port`, started as `run` says, logging to
/// `work_dir/log`, its run kept as `keep` says.
pub(crate) fn spawn_server_keeping(
    port: u16,
    run: RunSettings<'_>,
    data_dir: &Path,
    work_dir: &Path,
    keep: Keep<'_>,
    log: &str,
) -> anyhow::Result<Server> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work_dir.join(log))?;
    let keep: [&std::ffi::OsStr; 2] = match keep {
        Keep::Dir(dir) => ["--state-dir".as_ref(), dir.as_os_str()],
        Keep::Postgres(url) => ["--store".as_ref(), url.as_ref()],
    };
    let shards = CLIENTS.to_string();
    let (rounds, min_clients) = (run.rounds.to_string(), run.min_clients.to_string());
    let participants = run.participants.to_string();
    let strategy: &[&str] = match run.part {
        Part::Server => &["--strategy", "astraea"],
        Part::Leader => &["--strategy", "astraea-sched", "--validation-samples", "0"],
        Part::Gateway => &[
            "--strategy",
            "astraea-sched",
            "--validation-samples",
            "0",
            "--gateway",
        ],
    };
    let child = serve_command(port, data_dir, work_dir)?
        .args(["--dataset", "mnist", "--max-train", "3000"])
        .args(["--partition", run.partition, "--shards", &shards])
        .args([
            "--participants",
            &participants,
            "--min-clients",
            &min_clients,
        ])
        .args(["--rounds", &rounds, "--gamma", "3"])
        .args(strategy)
        .args(["--hop-deadline", "30", "--run-name", "chaos"])
        .args(keep)
        .env("RUST_LOG", "info")
        .stderr(log)
        .spawn()
        .context("starting the server")?;
    Ok(Server(child))
}

/// `GET path` as JSON; `None` while nothing answers.
pub(crate) async fn get_json(port: u16, path: &str) -> Option<serde_json::Value> {
    let response = astraea_server::loopback::get(&format!("127.0.0.1:{port}"), path)
        .await
        .ok()?;
    serde_json::from_str(&response.text()).ok()
}

/// The completed rounds the server reports, once it answers.
async fn completed_rounds(port: u16) -> anyhow::Result<Vec<u64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(rounds) = get_json(port, "/api/rounds").await
            && let Some(list) = rounds.as_array()
        {
            return Ok(list.iter().filter_map(|r| r["round"].as_u64()).collect());
        }
        if Instant::now() > deadline {
            bail!("the server did not answer within a minute");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Kills and restarts the server `kills` times at random moments (0.3 to
/// 3 s apart, seeded), then lets the run of `rounds` rounds finish.
pub async fn kills(
    data_dir: PathBuf,
    kills: usize,
    rounds: u32,
    seed: u64,
) -> anyhow::Result<KillReport> {
    let started = Instant::now();
    let state_dir = std::env::temp_dir().join(format!("astraea-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    std::fs::create_dir_all(&state_dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = spawn_server(port, rounds, &data_dir, &state_dir)?;
    let options = ClientOptions::new(format!("ws://127.0.0.1:{port}/ws"), data_dir.clone());
    let swarm = tokio::spawn(run_swarm(CLIENTS, options));
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut delivered, mut lost) = (0, 0);
    while delivered < kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..3000))).await;
        let before = completed_rounds(port).await?;
        if before.len() as u32 >= rounds {
            break; // A finished run is not killed: a restart would begin anew.
        }
        drop(server); // SIGKILL, then wait for the process.
        delivered += 1;
        server = spawn_server(port, rounds, &data_dir, &state_dir)?;
        let after = completed_rounds(port).await?;
        lost += before.iter().filter(|r| !after.contains(r)).count();
    }
    let deadline = Instant::now() + Duration::from_secs(60 * 30);
    let mut finished = false;
    let mut done = 0;
    while Instant::now() < deadline {
        if let Some(status) = get_json(port, "/api/status").await {
            done = status["round"].as_u64().unwrap_or(0) as usize;
            if status["phase"] == "finished" {
                finished = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rounds_done = completed_rounds(port).await.map_or(done, |r| r.len());
    swarm.abort();
    drop(server);
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(KillReport {
        kills: delivered,
        rounds_lost: lost,
        rounds,
        rounds_done,
        finished,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What the vanishing-clients run measured.
#[derive(Debug, Clone)]
pub struct VanishReport {
    /// Rounds run.
    pub rounds: usize,
    /// Rounds that took longer than the hop deadline, i.e. waited on a
    /// client that was gone (target 0).
    pub stalled: usize,
    /// Hops skipped because their client vanished.
    pub skipped_hops: u64,
    /// Connections that ended as departures.
    pub departures: u64,
    /// Mean and longest round, in seconds.
    pub mean_round_s: f64,
    /// Longest round, in seconds.
    pub max_round_s: f64,
    /// The whole run, seconds.
    pub total_s: f64,
    /// Hops trained and taken into chains (the run's work).
    pub hops_done: u64,
    /// Each round's (seconds since the run started, test accuracy as a
    /// fraction in 0..1), from the server's history.
    pub accuracy: Vec<(f64, f64)>,
}

impl VanishReport {
    /// Seconds since the run started until the test accuracy (a fraction)
    /// first reached `target`; `None` if it never did.
    pub fn seconds_to(&self, target: f64) -> Option<f64> {
        self.accuracy
            .iter()
            .find(|&&(_, accuracy)| accuracy >= target)
            .map(|&(seconds, _)| seconds)
    }

    /// The best test accuracy of any round (0 without rounds).
    pub fn best_accuracy(&self) -> f64 {
        self.accuracy.iter().map(|&(_, a)| a).fold(0.0, f64::max)
    }
}

/// Runs `rounds` Astraea rounds (mediators of 3, two passes) with [`CLIENTS`] native
/// clients, each vanishing mid-hop with probability `share` per task.
pub async fn vanish(data_dir: PathBuf, rounds: u32, share: f64) -> anyhow::Result<VanishReport> {
    let hop_deadline = Duration::from_secs(10);
    let stall =
        crate::serve_config(data_dir.clone(), CLIENTS, rounds, StrategyKind::Astraea).stall_timeout;
    unreliable(
        data_dir,
        rounds,
        hop_deadline,
        stall,
        Mode::Sync,
        (CLIENTS, &[]),
        |options| {
            options.vanish = share;
        },
    )
    .await
}

/// Runs `rounds` Astraea rounds (mediators of 3, two passes) with [`CLIENTS`] native
/// clients, each freezing mid-hop with probability `share` per task (silent for 150 s,
/// socket open, then answering late), against a 120 s hop deadline and the stall
/// timeout `stall` (zero: none, so a frozen hop costs the deadline). A round counts as
/// stalled when it took longer than the stall timeout plus 30 s of honest work, i.e. it
/// waited on a frozen client past the stall rule.
///
/// `speeds` (samples per second, one per client; empty: none) are the
/// clients' injected speeds ([`ClientOptions::speed`]), and there are
/// `clients` of them (at least [`CLIENTS`]).
pub async fn freeze(
    data_dir: PathBuf,
    rounds: u32,
    share: f64,
    stall: Duration,
    mode: Mode,
    clients: usize,
    speeds: &[f64],
) -> anyhow::Result<VanishReport> {
    unreliable(
        data_dir,
        rounds,
        Duration::from_secs(120),
        stall,
        mode,
        (clients.max(CLIENTS), speeds),
        |options| {
            options.freeze = share;
            options.freeze_for = Duration::from_secs(150);
        },
    )
    .await
}

/// A served run with unreliable native clients (`unreliable` sets how), its rounds
/// timed from the server's history. A round is stalled when it took longer than the
/// hop deadline, or with a stall timeout, longer than it plus 30 s.
async fn unreliable(
    data_dir: PathBuf,
    rounds: u32,
    hop_deadline: Duration,
    stall: Duration,
    mode: Mode,
    (clients, speeds): (usize, &[f64]),
    unreliable: impl FnOnce(&mut ClientOptions),
) -> anyhow::Result<VanishReport> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let mut config = ServeConfig {
        max_train: Some(3000),
        partition: "long-tail:10".parse().map_err(anyhow::Error::msg)?,
        min_clients: clients / 2,
        hop_deadline,
        stall_timeout: stall,
        label_epsilon: None,
        model_privacy: None,
        hop_privacy: None,
        schedule: astraea_core::engine::Schedule {
            mode,
            ..Default::default()
        },
        run_name: "chaos".into(),
        ..crate::serve_config(data_dir.clone(), clients, rounds, StrategyKind::Astraea)
    };
    config.settings.rescheduling.gamma = 3;
    let running = serve::start(listener, config).await?;
    let mut options = ClientOptions {
        max_frame_bytes: 1 << 20,
        ..ClientOptions::new(format!("ws://{address}/ws"), data_dir)
    };
    unreliable(&mut options);
    let speeds = speeds.to_vec();
    let swarm = tokio::spawn(async move { run_swarm_with_speeds(clients, options, &speeds).await });
    running.coordinator.await??;
    swarm.abort();
    let history = running.state.status().history.clone();
    let mut previous = 0.0;
    let durations: Vec<f64> = history
        .iter()
        .map(|r| {
            let d = r.wall_s - previous;
            previous = r.wall_s;
            d
        })
        .collect();
    let skipped_hops = running.state.status().skipped_hops;
    let limit = if stall.is_zero() || stall >= hop_deadline {
        hop_deadline.as_secs_f64()
    } else {
        stall.as_secs_f64() + 30.0
    };
    Ok(VanishReport {
        rounds: history.len(),
        stalled: durations.iter().filter(|&&d| d > limit).count(),
        skipped_hops,
        departures: running
            .state
            .departures
            .load(std::sync::atomic::Ordering::Relaxed),
        mean_round_s: durations.iter().sum::<f64>() / durations.len().max(1) as f64,
        max_round_s: durations.iter().copied().fold(0.0, f64::max),
        total_s: history.last().map_or(0.0, |r| r.wall_s),
        hops_done: running.state.clients().values().map(|c| c.hops_done).sum(),
        accuracy: history.iter().map(|r| (r.wall_s, r.accuracy)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(accuracy: Vec<(f64, f64)>) -> VanishReport {
        VanishReport {
            rounds: accuracy.len(),
            stalled: 0,
            skipped_hops: 0,
            departures: 0,
            mean_round_s: 0.0,
            max_round_s: 0.0,
            total_s: accuracy.last().map_or(0.0, |&(s, _)| s),
            hops_done: 0,
            accuracy,
        }
    }

    #[test]
    fn the_time_to_a_target_is_its_first_arrival_and_never_is_none() {
        let r = report(vec![(10.0, 0.5), (20.0, 0.82), (30.0, 0.79), (40.0, 0.9)]);

        assert_eq!(r.seconds_to(0.8), Some(20.0));
        assert_eq!(r.seconds_to(0.9), Some(40.0));
        assert_eq!(r.seconds_to(0.95), None);
        assert_eq!(r.best_accuracy(), 0.9);
        assert_eq!(report(vec![]).best_accuracy(), 0.0);
    }
}
