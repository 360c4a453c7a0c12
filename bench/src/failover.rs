//! `astraea bench kills --servers N`: several `astraea serve` processes
//! share one run in PostgreSQL; at random moments one of them (seeded:
//! the leader half the time, else a follower) is killed with SIGKILL, or paused with
//! SIGSTOP, while native clients train. A paused leader is continued once
//! another leads (it must notice it lost the lease and exit); whatever went
//! is started again as a follower on its port.
//!
//! With `--gateways G`, G gateways (`serve --gateway`, each with clients
//! of its own) train their shares of every round beside the servers, the
//! run set to what folds across gateways (Astraea's rescheduling, no loss
//! rule), and an outage that misses the leader hits a follower or a
//! gateway; a killed gateway comes back as a new gateway on its port.
//!
//! Measured: how long after the leader went another led (the takeover
//! time), completed rounds missing afterwards (rounds lost), rounds
//! recorded again under a later term (counted twice), gateways' partials
//! folded of those placed, and whether the run finished.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use astraea_native::{ClientOptions, run_swarm};
use astraea_server::testing::PgCluster;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::chaos::{CLIENTS, Keep, Part, RunSettings, Server, get_json, spawn_server_keeping};

/// How a server is taken out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// SIGKILL: the process and its sessions are gone at once.
    Kill,
    /// SIGSTOP: the process keeps its sessions and says nothing; it is
    /// continued once another server leads.
    Pause,
}

/// What the failover run measured.
#[derive(Debug, Clone)]
pub struct FailoverReport {
    /// Servers sharing the run.
    pub servers: usize,
    /// Gateways beside them.
    pub gateways: usize,
    /// Outages delivered.
    pub outages: usize,
    /// Of which hit the leader.
    pub leader_outages: usize,
    /// Of which hit a gateway.
    pub gateway_outages: usize,
    /// Gateways' partials the leaders folded, and those they placed, summed
    /// over rounds (from their logs: a killed gateway's share is one
    /// placed and not folded).
    pub partials: (usize, usize),
    /// Takeover times (seconds from the leader's outage until another
    /// server answered as leader at the next term), one per leader outage.
    pub takeovers_s: Vec<f64>,
    /// Rounds the leader announced as completed before an outage and
    /// missing from the database after it, summed (target 0).
    pub rounds_lost: usize,
    /// Rounds whose row was written more than once (target 0; seen by an
    /// audit trigger, since a rewrite overwrites the row).
    pub counted_twice: usize,
    /// Paused ex-leaders that kept running after they were continued
    /// (target 0: each must notice it lost the lease and exit).
    pub stale_leaders: usize,
    /// Rounds of the run and rounds completed at the end.
    pub rounds: u32,
    /// Rounds completed at the end.
    pub rounds_done: usize,
    /// Whether the run finished.
    pub finished: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Runs `sql` on the database, on a thread of its own (the blocking
/// client runs a runtime of its own: not on this one's).
fn query<T: Send + 'static>(
    url: &str,
    sql: &'static str,
    read: fn(&[postgres::Row]) -> T,
) -> anyhow::Result<T> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut db = postgres::Client::connect(&url, postgres::NoTls)?;
        Ok(read(&db.query(sql, &[])?))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a query panicked"))?
}

/// Every recorded round of the run.
fn recorded(url: &str) -> anyhow::Result<BTreeMap<i64, i64>> {
    query(
        url,
        "SELECT r.round, r.term FROM rounds r JOIN runs ON runs.id = r.run_id WHERE runs.name = 'chaos'",
        |rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
    )
}

/// Rounds written more than once (an audit trigger the bench adds keeps
/// every write of a round's row with its term).
fn written_twice(url: &str) -> anyhow::Result<usize> {
    query(
        url,
        "SELECT round FROM round_writes GROUP BY round HAVING COUNT(*) > 1",
        |rows| rows.len(),
    )
}

/// Makes every insert or update of a round's row leave a line in
/// `round_writes`, so a round written again (by a later leader) is seen
/// even though the row itself is overwritten.
fn audit_round_writes(url: &str) -> anyhow::Result<()> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut db = postgres::Client::connect(&url, postgres::NoTls)?;
        db.batch_execute(AUDIT)?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("setting up the audit panicked"))?
}

/// The audit [`audit_round_writes`] sets up.
const AUDIT: &str = "CREATE TABLE IF NOT EXISTS round_writes (round BIGINT, term BIGINT, at TIMESTAMPTZ DEFAULT now());
         CREATE OR REPLACE FUNCTION audit_round() RETURNS trigger AS $$
         BEGIN INSERT INTO round_writes (round, term) VALUES (NEW.round, NEW.term); RETURN NEW; END
         $$ LANGUAGE plpgsql;
         CREATE OR REPLACE TRIGGER audit_round AFTER INSERT OR UPDATE ON rounds
         FOR EACH ROW EXECUTE FUNCTION audit_round();";

/// `/api/status` of the server on `port`, if it answers within 500 ms (a
/// paused one does not; a waiting or loading one answers 503, `phase:
/// following`).
async fn status(port: u16) -> Option<serde_json::Value> {
    tokio::time::timeout(Duration::from_millis(500), get_json(port, "/api/status"))
        .await
        .ok()
        .flatten()
}

/// The server answering as leader, with its term (all asked at once).
async fn leader(ports: &[u16]) -> Option<(usize, i64)> {
    let answers = futures_util::future::join_all(ports.iter().map(|&port| status(port))).await;
    answers.into_iter().enumerate().find_map(|(index, status)| {
        let status = status?;
        (status["phase"] != "following")
            .then(|| status["leader_term"].as_i64())
            .flatten()
            .map(|term| (index, term))
    })
}

/// The rounds the server on `port` says it completed.
async fn announced(port: u16) -> Vec<i64> {
    let rounds = tokio::time::timeout(Duration::from_millis(500), get_json(port, "/api/rounds"))
        .await
        .ok()
        .flatten();
    rounds
        .as_ref()
        .and_then(|r| r.as_array())
        .map(|list| list.iter().filter_map(|r| r["round"].as_i64()).collect())
        .unwrap_or_default()
}

/// A failover run's settings.
#[derive(Debug, Clone)]
pub struct Failover {
    /// Servers sharing the run (at least 2).
    pub servers: usize,
    /// Gateways beside them (0: none).
    pub gateways: usize,
    /// Outages to deliver.
    pub outages: usize,
    /// Rounds of the run.
    pub rounds: u32,
    /// How a server is taken out.
    pub outage: Outage,
    /// Seed of the outages' times and victims.
    pub seed: u64,
    /// A database to use instead of a throw-away cluster.
    pub url: Option<String>,
    /// How the shards are cut (`--partition`).
    pub partition: String,
}

/// Runs `servers` servers and `gateways` gateways on one throw-away
/// PostgreSQL cluster (or `url`) and takes one out `outages` times at
/// random moments (0.3 to 3 s apart, seeded), then lets the run of
/// `rounds` rounds finish. Each server and gateway has [`CLIENTS`] native
/// clients of its own (a waiting server's answer 503 and they retry).
pub async fn failover(data_dir: PathBuf, settings: Failover) -> anyhow::Result<FailoverReport> {
    let Failover {
        servers,
        gateways,
        outages,
        rounds,
        outage,
        seed,
        url,
        partition,
    } = settings;
    if servers < 2 {
        bail!("a failover needs at least 2 servers");
    }
    let started = Instant::now();
    let (_cluster, url) = match url {
        Some(url) => (None, url),
        None => {
            let cluster = PgCluster::start().map_err(anyhow::Error::msg)?;
            let url = cluster
                .create_database("astraea")
                .map_err(anyhow::Error::msg)?;
            (Some(cluster), url)
        }
    };
    let work = std::env::temp_dir().join(format!("astraea-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let processes = servers + gateways;
    let ports: Vec<u16> = (0..processes)
        .map(|_| {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        })
        .collect::<anyhow::Result<_>>()?;
    // Processes 0..servers may lead; the rest are gateways.
    let log = |index: usize| {
        if index < servers {
            format!("server{index}.log")
        } else {
            format!("gateway{index}.log")
        }
    };
    let spawn = |index: usize| {
        let part = match (index < servers, gateways) {
            (true, 0) => Part::Server,
            (true, _) => Part::Leader,
            (false, _) => Part::Gateway,
        };
        // Rounds go on with two of the six: the update guard may turn an
        // honest client away for good, and the run would stall for want
        // of clients, which is not what this measures. Every client ready
        // (the leader's and the gateways') is drawn.
        let run = RunSettings {
            rounds,
            min_clients: 2,
            participants: CLIENTS * (1 + gateways),
            partition: &partition,
            part,
        };
        spawn_server_keeping(
            ports[index],
            run,
            &data_dir,
            &work,
            Keep::Postgres(&url),
            &log(index),
        )
    };
    // The first leads; the others start once it does, and wait.
    let mut running: Vec<Server> = vec![spawn(0)?];
    wait_until(Duration::from_secs(120), || async {
        leader(&ports[..1]).await.is_some()
    })
    .await
    .context("the first server never led")?;
    // The schema exists once the first server leads.
    audit_round_writes(&url)?;
    for index in 1..processes {
        running.push(spawn(index)?);
    }
    let swarms: Vec<_> = ports
        .iter()
        .map(|port| {
            let options = ClientOptions::new(format!("ws://127.0.0.1:{port}/ws"), data_dir.clone());
            tokio::spawn(run_swarm(CLIENTS, options))
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = FailoverReport {
        servers,
        gateways,
        outages: 0,
        leader_outages: 0,
        gateway_outages: 0,
        partials: (0, 0),
        takeovers_s: Vec::new(),
        rounds_lost: 0,
        counted_twice: 0,
        stale_leaders: 0,
        rounds,
        rounds_done: 0,
        finished: false,
        seconds: 0.0,
    };
    while report.outages < outages {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..3000))).await;
        let Some((leading, term)) = leader(&ports[..servers]).await else {
            continue; // Between leaders: the next outage waits for one.
        };
        // What the leader announced as done: none of it may go missing.
        let before = announced(ports[leading]).await;
        if before.len() as u32 >= rounds {
            break; // A finished run is not taken out: a restart begins anew.
        }
        // Half the outages hit the leader, the rest a follower or a
        // gateway at random.
        let victim = if rng.random_bool(0.5) {
            leading
        } else {
            (leading + rng.random_range(1..processes)) % processes
        };
        let pid = running[victim].0.id().to_string();
        let signal = match outage {
            Outage::Kill => "-KILL",
            Outage::Pause => "-STOP",
        };
        Command::new("kill").args([signal, &pid]).status()?;
        let out_at = Instant::now();
        report.outages += 1;
        if victim >= servers {
            report.gateway_outages += 1;
        }
        if victim == leading {
            report.leader_outages += 1;
            let others: Vec<u16> = (0..servers)
                .filter(|&i| i != victim)
                .map(|i| ports[i])
                .collect();
            wait_until(Duration::from_secs(60), || async {
                leader(&others).await.is_some_and(|(_, t)| t > term)
            })
            .await
            .context("no server took over within a minute")?;
            report.takeovers_s.push(out_at.elapsed().as_secs_f64());
            if outage == Outage::Pause {
                // Woken after it was replaced: it must see that and exit.
                Command::new("kill").args(["-CONT", &pid]).status()?;
                let deadline = Instant::now() + Duration::from_secs(20);
                while running[victim].0.try_wait()?.is_none() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if running[victim].0.try_wait()?.is_none() {
                    report.stale_leaders += 1;
                }
            }
        }
        // Whatever went comes back as a follower on its port, once the old
        // process (a paused follower too) is gone and the port free.
        let old = &mut running[victim].0;
        Command::new("kill").args(["-CONT", &pid]).status()?;
        let _ = old.kill();
        old.wait()?;
        running[victim] = spawn(victim)?;
        // Back as a follower (answering 503) before the next outage.
        let port = ports[victim];
        wait_until(Duration::from_secs(60), || async move {
            status(port).await.is_some()
        })
        .await
        .context("a restarted server never answered")?;
        let after = recorded(&url)?;
        report.rounds_lost += before.iter().filter(|r| !after.contains_key(r)).count();
    }
    let deadline = Instant::now() + Duration::from_secs(60 * 30);
    while Instant::now() < deadline {
        let mut finished = false;
        for &port in &ports {
            if let Some(status) = status(port).await
                && status["phase"] == "finished"
            {
                finished = true;
            }
        }
        if finished {
            report.finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.rounds_done = recorded(&url)?.len();
    report.counted_twice = written_twice(&url)?;
    for swarm in swarms {
        swarm.abort();
    }
    drop(running);
    for index in 0..servers {
        let text = std::fs::read_to_string(work.join(log(index))).unwrap_or_default();
        let (folded, placed) = partials_in(&text);
        report.partials.0 += folded;
        report.partials.1 += placed;
    }
    let _ = std::fs::remove_dir_all(&work);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Gateways' partials folded and placed, summed over a leader's log lines
/// "gateways' partials folded: X of Y".
fn partials_in(log: &str) -> (usize, usize) {
    const SAID: &str = "gateways' partials folded: ";
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find(SAID)? + SAID.len()..];
            let mut words = rest.split_whitespace();
            let folded = words.next()?.parse::<usize>().ok()?;
            // Only its leading digits: colour codes or fields may follow.
            let placed = words.nth(1)?;
            let digits = placed
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(placed.len());
            Some((folded, placed[..digits].parse::<usize>().ok()?))
        })
        .fold((0, 0), |(f, p), (folded, placed)| (f + folded, p + placed))
}

/// Polls `done` every 50 ms for at most `within`.
pub(crate) async fn wait_until<F: std::future::Future<Output = bool>>(
    within: Duration,
    done: impl Fn() -> F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done().await {
        if Instant::now() > deadline {
            bail!("timed out after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::partials_in;

    #[test]
    fn partials_are_summed_from_the_leaders_lines_with_or_without_colour() {
        let log = "2026-12-07T01:00:00Z  INFO astraea_server::gateway: gateways' partials folded: 2 of 3 round=4\n\
                   some other line: folded: 9 of 9\n\
                   \x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m gateways' partials folded: 1 of 1\x1b[3mround\x1b[0m=5\n\
                   INFO gateways' partials folded: 0 of 2 round=6";
        assert_eq!(partials_in(log), (3, 6));
        assert_eq!(partials_in(""), (0, 0));
    }
}
