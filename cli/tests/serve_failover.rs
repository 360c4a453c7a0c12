//! Two `astraea serve` processes on one PostgreSQL run: one leads, the
//! other waits; when the leader is killed (SIGKILL) or paused (SIGSTOP) the
//! other takes over and finishes the run from the last completed round,
//! every round recorded once, and a paused ex-leader that wakes up writes
//! nothing and stops. Behind a real nginx (the shipped configuration), the
//! same volunteers reach whichever server leads. With a gateway
//! (`--gateway`), the leader places a share of every round on it and folds
//! its partial; a gateway that dies costs the rounds nothing but its share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use astraea_native::{ClientOptions, run_swarm};
use astraea_server::testing::{Nginx, PgCluster};

/// Kills the server process when the test ends, however it ends.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // A stopped process must be continued to die of SIGKILL promptly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The failover tests' run: Astraea over 4 long-tailed shards, 8 rounds.
const FAILOVER_RUN: &[&str] = &[
    "--partition",
    "long-tail:10",
    "--participants",
    "4",
    "--min-clients",
    "4",
    "--rounds",
    "8",
    "--strategy",
    "astraea",
    "--gamma",
    "2",
];

fn spawn_server(url: &str, dir: &Path, name: &str) -> Server {
    spawn_serving(url, dir, name, FAILOVER_RUN)
}

/// `astraea serve` on a free port of run `shared` in `url`, with `run`'s
/// flags, logging to `dir/name.log`.
fn spawn_serving(url: &str, dir: &Path, name: &str, run: &[&str]) -> Server {
    spawn_serving_on(free_port(), url, dir, name, run)
}

/// [`spawn_serving`] on `port`.
fn spawn_serving_on(port: u16, url: &str, dir: &Path, name: &str, run: &[&str]) -> Server {
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_astraea"))
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .args(["--dataset", "mnist", "--max-train", "3000", "--shards", "4"])
        .args(run)
        .args(["--hop-deadline", "30"])
        .args(["--run-name", "shared", "--store", url])
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--static-dir")
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Server { child, port, log }
}

/// /api/status of `server`, once it answers.
/// /api/status on `port`, once it answers (a waiting server's 503 body
/// too: its `phase` is `following`).
async fn status(port: u16) -> Option<serde_json::Value> {
    let body = astraea_server::loopback::get(&format!("127.0.0.1:{port}"), "/api/status")
        .await
        .ok()?
        .text();
    serde_json::from_str(&body).ok()
}

async fn wait_for(server: &Server, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    wait_on(server.port, &|| server.log(), what, done).await;
}

async fn wait_on(
    port: u16,
    log: &dyn Fn() -> String,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Some(status) = status(port).await
            && status["phase"] != "following"
            && done(&status)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn swarm_for(server: &Server) -> tokio::task::JoinHandle<()> {
    swarm_at(server.port)
}

fn swarm_at(port: u16) -> tokio::task::JoinHandle<()> {
    swarm_of(port, 4)
}

/// `clients` native clients training with the server on `port`.
fn swarm_of(port: u16, clients: usize) -> tokio::task::JoinHandle<()> {
    let options = ClientOptions {
        max_frame_bytes: 1 << 20,
        ..ClientOptions::new(
            format!("ws://127.0.0.1:{port}/ws"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data"),
        )
    };
    tokio::spawn(async move {
        run_swarm(clients, options).await;
    })
}

/// Clients the run recorded as joining.
fn clients(url: &str) -> i64 {
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        db.query_one("SELECT COUNT(*) FROM clients", &[])
            .unwrap()
            .get(0)
    })
    .join()
    .unwrap()
}

/// (round, term) of every recorded round, and the lease's term.
fn recorded(url: &str) -> (Vec<(i64, i64)>, i64) {
    // On a thread of its own: the blocking client runs a runtime, which
    // must not start inside the test's.
    let url = url.to_string();
    std::thread::spawn(move || recorded_now(&url))
        .join()
        .unwrap()
}

fn recorded_now(url: &str) -> (Vec<(i64, i64)>, i64) {
    let mut db = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let rounds = db
        .query(
            "SELECT round, term FROM rounds ORDER BY finished_at, round",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let term = db
        .query_one("SELECT term FROM leases WHERE run = 'shared'", &[])
        .unwrap()
        .get(0);
    (rounds, term)
}

/// A throw-away database with two servers on one run: `a` leading (term
/// 1), `b` waiting to take over. Dropped in reverse order: the servers go
/// before the cluster.
async fn leader_and_follower() -> (PgCluster, String, Server, Server) {
    let (cluster, url) = PgCluster::with_database();
    let dir = cluster.dir().join("servers");
    std::fs::create_dir_all(&dir).unwrap();
    let a = spawn_server(&url, &dir, "a");
    wait_for(&a, "the first server to lead", |s| s["leader_term"] == 1).await;
    let b = spawn_server(&url, &dir, "b");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !b.log().contains("waiting to take over") {
        assert!(Instant::now() < deadline, "b never waited:\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (cluster, url, a, b)
}

/// The leader (a) is taken out by `signal` once two rounds are done; the
/// follower (b) must finish the run. Answers the follower's takeover time.
async fn fail_over(signal: &str) {
    // Prepare: a database, a leader with its clients, a follower with its.
    let (_cluster, url, a, b) = leader_and_follower().await;
    let swarms = [swarm_for(&a), swarm_for(&b)];

    // Execute: take the leader out after two completed rounds.
    wait_for(&a, "two rounds", |s| s["round"].as_u64() >= Some(3)).await;
    a.signal(signal);
    let taken_out = Instant::now();
    wait_for(&b, "the follower to lead", |s| s["leader_term"] == 2).await;
    let takeover = taken_out.elapsed();
    if signal == "-STOP" {
        // The paused ex-leader wakes up after it was replaced: it must
        // notice and stop, having written nothing.
        tokio::time::sleep(Duration::from_secs(1)).await;
        a.signal("-CONT");
    }
    wait_for(&b, "the run to finish", |s| s["phase"] == "finished").await;
    for swarm in swarms {
        swarm.abort();
    }

    // Assert: every round once, the first leader's at term 1 and the
    // follower's at term 2, in that order; the follower resumed.
    let (rounds, term) = recorded(&url);
    let logs = format!("--- a\n{}\n--- b\n{}", a.log(), b.log());
    assert_eq!(term, 2, "{logs}");
    let mut numbers: Vec<i64> = rounds.iter().map(|(r, _)| *r).collect();
    numbers.sort();
    assert_eq!(numbers, (1..=8).collect::<Vec<_>>(), "{rounds:?}\n{logs}");
    let handed_over = rounds.iter().position(|(_, t)| *t == 2).unwrap();
    assert!(handed_over >= 2, "{rounds:?}");
    assert!(
        rounds[..handed_over].iter().all(|(_, t)| *t == 1)
            && rounds[handed_over..].iter().all(|(_, t)| *t == 2),
        "{rounds:?}"
    );
    assert!(b.log().contains("resumed after round"), "{logs}");
    if signal == "-STOP" {
        let mut a = a;
        let deadline = Instant::now() + Duration::from_secs(30);
        let exited = loop {
            if let Some(status) = a.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the ex-leader kept going\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!exited.success(), "{logs}");
        assert!(a.log().contains("lost the lease"), "{logs}");
    }
    eprintln!("{signal}: the follower led {takeover:.2?} after the leader was taken out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_the_run_finishes_with_every_round_once() {
    fail_over("-KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_replaced_and_when_it_wakes_it_writes_nothing_and_stops() {
    fail_over("-STOP").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_the_same_volunteers_reach_whichever_server_leads() {
    // Prepare: two servers on one run behind nginx, one swarm through it.
    let (_cluster, url, a, b) = leader_and_follower().await;
    let nginx = Nginx::start(&[b.port, a.port]).unwrap_or_else(|e| panic!("{e}"));
    // The follower answers 503 and says who leads; through nginx (which
    // tries the follower first) the leader answers.
    let direct = astraea_server::loopback::get(&format!("127.0.0.1:{}", b.port), "/api/status")
        .await
        .unwrap();
    let following: serde_json::Value = serde_json::from_str(&direct.text()).unwrap();
    assert_eq!(following["phase"], "following", "{following}");
    assert_eq!(following["leader_term"], 1, "{following}");
    // A scraper of every server sees the follower up, and who leads.
    let metrics = |port: u16| async move {
        let answer = astraea_server::loopback::get(&format!("127.0.0.1:{port}"), "/metrics")
            .await
            .unwrap();
        (answer.status, answer.text())
    };
    let (code, text) = metrics(b.port).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\nastraea_leading 0\n"), "{text}");
    assert!(text.contains("\nastraea_leader_term 1\n"), "{text}");
    let (code, text) = metrics(a.port).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\nastraea_leading 1\n"), "{text}");
    assert!(text.contains("\nastraea_leader_term 1\n"), "{text}");
    let logs = || {
        format!(
            "--- a\n{}\n--- b\n{}\n--- nginx\n{}",
            a.log(),
            b.log(),
            nginx.log()
        )
    };
    wait_on(nginx.port(), &logs, "the leader through nginx", |s| {
        s["leader_term"] == 1
    })
    .await;
    // Every request through nginx reaches the leader: those sent to the
    // follower first (round robin) are passed on after its 503.
    for _ in 0..6 {
        let answer = status(nginx.port()).await.expect("nginx answers");
        assert_eq!(answer["leader_term"], 1, "{answer}\n{}", nginx.log());
        assert_ne!(answer["phase"], "following", "{answer}");
    }
    let swarm = swarm_at(nginx.port());

    // Execute: kill the leader once two rounds are done.
    wait_for(&a, "two rounds", |s| s["round"].as_u64() >= Some(3)).await;
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();

    // Assert: the swarm, reconnecting through nginx, trains with b, which
    // finishes the run (it needs all four clients every round).
    let logs = || format!("--- b\n{}\n--- nginx\n{}", b.log(), nginx.log());
    wait_on(
        nginx.port(),
        &logs,
        "the run to finish through nginx",
        |s| s["phase"] == "finished" && s["leader_term"] == 2,
    )
    .await;
    // Operators see the run's servers: b leading at term 2.
    wait_on(nginx.port(), &logs, "b listed as the leader", |s| {
        s["servers"].as_array().is_some_and(|list| {
            list.iter()
                .any(|server| server["role"] == "leading" && server["term"] == 2)
        })
    })
    .await;
    swarm.abort();
    let (rounds, term) = recorded(&url);
    assert_eq!(term, 2);
    assert_eq!(rounds.len(), 8, "{rounds:?}\n{}", nginx.log());
    // The four came back to b as themselves, by the tokens a gave them
    // (a new join would be a fifth client).
    assert_eq!(clients(&url), 4, "{}", b.log());
}

/// A run whose rounds fold across gateways
/// (`ServeConfig::across_gateways`): Astraea, its augmentation plan made
/// from the clients of every server, no loss rule.
const GATEWAY_RUN: &[&str] = &[
    "--partition",
    "long-tail:10",
    "--participants",
    "4",
    "--min-clients",
    "2",
    "--rounds",
    "12",
    "--strategy",
    "astraea",
    "--gamma",
    "2",
    "--validation-samples",
    "0",
];

/// A throw-away database with a leader of `run` leading it (term 1), and
/// the folder the servers log to. Dropped in reverse order: the servers
/// go before the cluster.
async fn a_leader_of(run: &[&str]) -> (PgCluster, String, PathBuf, Server) {
    let (cluster, url) = PgCluster::with_database();
    let dir = cluster.dir().join("servers");
    std::fs::create_dir_all(&dir).unwrap();
    let leader = spawn_serving(&url, &dir, "leader", run);
    wait_for(&leader, "the leader", |s| s["leader_term"] == 1).await;
    (cluster, url, dir, leader)
}

/// `run` with the value after `flag` replaced by `value`.
fn with_flag<'a>(run: &[&'a str], flag: &str, value: &'a str) -> Vec<&'a str> {
    let mut run = run.to_vec();
    let at = run.iter().position(|f| *f == flag).unwrap() + 1;
    run[at] = value;
    run
}

/// A throw-away database with a leader of [`GATEWAY_RUN`] and a gateway of
/// it started with `extra` flags too, two clients training with the
/// gateway. Dropped in reverse order: the servers go before the cluster.
async fn leader_and_gateway(
    extra: &[&str],
) -> (
    PgCluster,
    String,
    Server,
    Server,
    tokio::task::JoinHandle<()>,
) {
    let (cluster, url, dir, leader) = a_leader_of(GATEWAY_RUN).await;
    let mut gateway_run = GATEWAY_RUN.to_vec();
    gateway_run.push("--gateway");
    gateway_run.extend(extra);
    let gateway = spawn_serving(&url, &dir, "gateway", &gateway_run);
    let gateway_swarm = swarm_of(gateway.port, 2);
    (cluster, url, leader, gateway, gateway_swarm)
}

/// The (round, accuracy) of every `round-done` a [`listener`] heard.
type Heard = std::sync::Arc<std::sync::Mutex<Vec<(u64, f64)>>>;

/// A volunteer of the server on `port` that joins, says it is pausing
/// (`POST /api/lifecycle`: it is never drawn) and collects the `round-done`
/// messages it is sent, as (round, accuracy), until aborted.
fn listener(port: u16) -> (tokio::task::JoinHandle<()>, Heard) {
    use futures_util::StreamExt;
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = heard.clone();
    let task = tokio::spawn(async move {
        let own = astraea_core::protocol::DataSource::Own {
            counts: vec![1; 10],
        };
        let mut socket = joining(port, "listener", own, None).await;
        while let Some(Ok(frame)) = socket.next().await {
            let Ok(message) =
                serde_json::from_str::<serde_json::Value>(frame.to_text().unwrap_or(""))
            else {
                continue;
            };
            match message["type"].as_str() {
                Some("welcome") => {
                    let pause = serde_json::json!({"resume": message["resume"], "state": "paused"});
                    let answer = astraea_server::loopback::request(
                        &format!("127.0.0.1:{port}"),
                        "POST",
                        "/api/lifecycle",
                        "Content-Type: application/json\r\n",
                        &pause.to_string(),
                    )
                    .await
                    .unwrap();
                    assert!(answer.status < 300, "{}", answer.text());
                }
                Some("round-done") => sink.lock().unwrap().push((
                    message["round"].as_u64().unwrap(),
                    message["accuracy"].as_f64().unwrap(),
                )),
                _ => {}
            }
        }
    });
    (task, heard)
}

/// (round, state, samples) of the gateways' work left in the store.
fn gateway_work(url: &str) -> Vec<(i64, String, Option<i64>)> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        db.query(
            "SELECT round, state, samples FROM gateway_work ORDER BY round",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_trains_its_share_of_every_round_and_when_it_dies_the_run_goes_on() {
    // Prepare: a leader and a gateway on one run, two clients each; the
    // gateway's ready before the leader's, so every round has both.
    let (_cluster, url, leader, gateway, gateway_swarm) = leader_and_gateway(&[]).await;
    wait_for(&leader, "the gateway's two ready clients", |s| {
        s["gateways"][0]["ready"] == 2
    })
    .await;
    let leader_swarm = swarm_of(leader.port, 2);
    let (listening, heard) = listener(gateway.port);
    let gateway_log = gateway.log.clone();
    let logs = || {
        format!(
            "--- leader\n{}\n--- gateway\n{}",
            leader.log(),
            std::fs::read_to_string(&gateway_log).unwrap_or_default()
        )
    };

    // Execute: four rounds with the gateway, then it dies (SIGKILL).
    wait_for(&leader, "four rounds", |s| s["round"].as_u64() >= Some(5)).await;
    let folded_while_alive = gateway_work(&url);
    wait_on(
        gateway.port,
        &logs,
        "the gateway's view of the leader",
        |s| s["leader_round"].as_u64() >= Some(3),
    )
    .await;
    let gateway_status = status(gateway.port).await.expect("the gateway answers");
    let metrics = |port: u16| async move {
        astraea_server::loopback::get(&format!("127.0.0.1:{port}"), "/metrics")
            .await
            .unwrap()
            .text()
    };
    let (gateway_metrics, leader_metrics) =
        (metrics(gateway.port).await, metrics(leader.port).await);
    let heard = heard.lock().unwrap().clone();
    listening.abort();
    let mut gateway = gateway;
    gateway.child.kill().unwrap();
    gateway.child.wait().unwrap();
    wait_for(&leader, "the run to finish", |s| s["phase"] == "finished").await;
    gateway_swarm.abort();
    leader_swarm.abort();

    // Assert: the gateway took its share (2 of 4) and its partial of the
    // last round folded, with samples; it says it is a gateway and trained
    // rounds the leader placed.
    // (Rows of rounds before the last folded one are deleted.)
    assert!(
        folded_while_alive
            .iter()
            .any(|(r, state, n)| *r >= 4 && state == "folded" && n.is_some_and(|n| n > 0)),
        "{folded_while_alive:?}\n{}",
        logs()
    );
    assert!(
        gateway_status["gateway"]
            .as_str()
            .is_some_and(|g| g.starts_with("gateway ") && g.contains("(pid ")),
        "{gateway_status}"
    );
    assert!(
        gateway_status["round"].as_u64() >= Some(4),
        "{gateway_status}"
    );
    // From the gateway's own page, one federation: every gateway, and the
    // leader's last round.
    assert!(
        gateway_status["leader_round"].as_u64() >= Some(3)
            && gateway_status["leader_accuracy"].as_f64() > Some(0.0),
        "{gateway_status}"
    );
    assert_eq!(
        gateway_status["gateways"][0]["ready"], 2,
        "{gateway_status}"
    );
    // Operators see which is which: the gateway does not lead, the
    // leader counts its gateway and the clients ready there.
    assert!(
        gateway_metrics.contains("\nastraea_leading 0\n")
            && gateway_metrics.contains("\nastraea_gateway 1\n"),
        "{gateway_metrics}"
    );
    assert!(
        leader_metrics.contains("\nastraea_leading 1\n")
            && leader_metrics.contains("\nastraea_gateways 1\n")
            && leader_metrics.contains("\nastraea_gateway_ready_clients 2\n"),
        "{leader_metrics}"
    );
    assert!(
        leader.log().contains("round placed on gateways"),
        "{}",
        logs()
    );
    // The gateway's clients trained with the run's augmentation plan:
    // the gateway took it from the store and sent it to them.
    assert!(
        gateway_status["plan"]
            .as_array()
            .is_some_and(|p| p.len() == 10)
            && std::fs::read_to_string(&gateway_log)
                .unwrap()
                .contains("gateway: data plan received"),
        "{gateway_status}\n{}",
        logs()
    );
    // Its partials reached the rounds' aggregates (one a round while it
    // lived).
    assert!(
        leader.log().contains("gateways' partials folded: 1 of 1"),
        "{}",
        logs()
    );
    // The run finished every round once, after the gateway died too, and
    // learned.
    let (rounds, _) = recorded(&url);
    let mut numbers: Vec<i64> = rounds.iter().map(|(r, _)| *r).collect();
    numbers.sort();
    assert_eq!(numbers, (1..=12).collect::<Vec<_>>(), "{}", logs());
    let finished = status(leader.port).await.unwrap();
    assert!(finished["best_accuracy"].as_f64() > Some(0.5), "{finished}");
    // The records count the gateway's training too: more samples than the
    // leader's own clients trained.
    let own: u64 = finished["client_list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["samples_trained"].as_u64())
        .sum();
    let history =
        astraea_server::loopback::get(&format!("127.0.0.1:{}", leader.port), "/api/rounds")
            .await
            .unwrap()
            .text();
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    let recorded = history.as_array().and_then(|r| r.last()).unwrap()["train_samples"]
        .as_u64()
        .unwrap();
    assert!(recorded > own, "{recorded} against the leader's own {own}");
    // The gateway passed the leader's round results on to its volunteers
    // (one that trains nothing hears them too), each as recorded.
    assert!(!heard.is_empty(), "{}", logs());
    for (round, accuracy) in &heard {
        let record = history
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["round"].as_u64() == Some(*round))
            .unwrap_or_else(|| panic!("round {round} is not recorded"));
        assert_eq!(
            record["accuracy"].as_f64(),
            Some(*accuracy),
            "round {round}"
        );
    }
    assert!(leader.log().contains("not back in time"), "{}", logs());
    // Nothing of the dead gateway is waiting in the store.
    let after = gateway_work(&url);
    assert!(
        after
            .iter()
            .all(|(_, state, _)| state == "folded" || state == "closed"),
        "{after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_a_dead_gateways_volunteers_resume_on_another_gateway_as_themselves() {
    // Prepare: a leader with no clients of its own, gateway a, and nginx
    // in front of a and of b's port, where nothing listens yet: the four
    // volunteers joining through nginx all reach a.
    // Rounds enough that b starts and a dies well before the last.
    let run = with_flag(GATEWAY_RUN, "--rounds", "30");
    let (_cluster, url, dir, leader) = a_leader_of(&run).await;
    let mut gateway_run = run.clone();
    gateway_run.push("--gateway");
    let a = spawn_serving(&url, &dir, "a", &gateway_run);
    let b_port = free_port();
    let nginx = Nginx::start(&[a.port, b_port]).unwrap_or_else(|e| panic!("{e}"));
    let (a_log, b_log) = (a.log.clone(), dir.join("b.log"));
    let logs = || {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- leader\n{}\n--- a\n{}\n--- b\n{}\n--- nginx\n{}",
            leader.log(),
            read(&a_log),
            read(&b_log),
            nginx.log()
        )
    };
    let swarm = swarm_of(nginx.port(), 4);
    wait_on(leader.port, &logs, "two rounds trained on a", |s| {
        s["round"].as_u64() >= Some(3) && s["gateways"][0]["clients"] == 4
    })
    .await;
    let b = spawn_serving_on(b_port, &url, &dir, "b", &gateway_run);
    wait_for(&leader, "b heard from", |s| {
        s["gateways"].as_array().is_some_and(|g| g.len() == 2)
    })
    .await;

    // Execute: a dies (SIGKILL) mid-run.
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();

    // Assert: the four come back through nginx to b, as themselves (the
    // run knows four clients: a new join would be a fifth), and b trains
    // the rest of the run: it finishes, every round once.
    wait_on(b.port, &logs, "the four on b", |s| s["clients"] == 4).await;
    let back_at = status(leader.port).await.unwrap()["round"].as_u64();
    wait_on(leader.port, &logs, "the run to finish", |s| {
        s["phase"] == "finished"
    })
    .await;
    swarm.abort();
    assert!(
        b.log().contains("resumed by a token of the run's store"),
        "{}",
        logs()
    );
    assert_eq!(clients(&url), 4, "{}", logs());
    let (rounds, _) = recorded(&url);
    let mut numbers: Vec<i64> = rounds.iter().map(|(r, _)| *r).collect();
    numbers.sort();
    assert_eq!(numbers, (1..=30).collect::<Vec<_>>(), "{}", logs());
    assert!(
        back_at < Some(29),
        "{back_at:?}: back too late to train a round on b"
    );
    // b's partials reached the rounds after a died.
    let given_back = b.log().matches("gateway: partial given back").count();
    assert!(given_back > 0, "{}", logs());
}

#[test]
fn a_gateway_refuses_a_run_whose_rounds_do_not_fold_across_gateways() {
    let (_cluster, url) = PgCluster::with_database();
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    for (flags, why) in [
        (
            &["--mode", "async", "--validation-samples", "0"][..],
            "the asynchronous mode",
        ),
        (
            &["--secure-aggregation", "--validation-samples", "0"][..],
            "secure aggregation unmasks",
        ),
        (&["--strategy", "fedavg"][..], "--validation-samples 0"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_astraea"))
            .args(["serve", "--bind", "127.0.0.1:0", "--gateway"])
            .args(["--dataset", "mnist", "--max-train", "300"])
            .args(["--run-name", "shared", "--store", &url])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(flags)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}: {said}");
        assert!(said.contains(why), "{flags:?}: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_with_other_training_flags_trains_nothing_of_the_run() {
    // Prepare: a gateway that would train two local epochs where the
    // leader's run trains one.
    let (_cluster, url, leader, gateway, gateway_swarm) =
        leader_and_gateway(&["--epochs", "2"]).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !leader.log().contains("it gets no share") {
        assert!(Instant::now() < deadline, "{}", leader.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Execute
    let leader_swarm = swarm_of(leader.port, 2);
    wait_for(&leader, "the run to finish", |s| s["phase"] == "finished").await;
    gateway_swarm.abort();
    leader_swarm.abort();

    // Assert: it got no share (the leader saw its settings differ and
    // said so) and trained nothing: the run finished on the leader's
    // clients alone.
    let logs = format!(
        "--- leader\n{}\n--- gateway\n{}",
        leader.log(),
        gateway.log()
    );
    assert!(
        leader
            .log()
            .contains("training settings differ from the leader's: it gets no share"),
        "{logs}"
    );
    assert!(!leader.log().contains("round placed on gateways"), "{logs}");
    assert!(!gateway.log().contains("partial given back"), "{logs}");
    let (rounds, _) = recorded(&url);
    assert_eq!(rounds.len(), 12, "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_run_does_not_fold_across_gateways_says_it_leaves_them_idle() {
    // The leader runs secure aggregation; the gateway was started without
    // (its own start-up refuses it).
    let mut leader_run = GATEWAY_RUN.to_vec();
    leader_run.push("--secure-aggregation");
    let (_cluster, url, dir, leader) = a_leader_of(&leader_run).await;
    let mut gateway_run = GATEWAY_RUN.to_vec();
    gateway_run.push("--gateway");
    let _gateway = spawn_serving(&url, &dir, "gateway", &gateway_run);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !leader.log().contains("gateways of this run are left idle") {
        assert!(Instant::now() < deadline, "{}", leader.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        leader.log().contains("secure aggregation unmasks"),
        "{}",
        leader.log()
    );
}

/// A leader and a gateway of a run of [`GATEWAY_RUN`] with `extra` flags
/// and mediators of one client, two native clients on each, trained to
/// the end; the leader's and the gateway's logs, and the round records'
/// epsilon spent.
async fn trained_across_gateways(extra: &[&str]) -> (String, Vec<Option<f64>>) {
    let mut run = with_flag(GATEWAY_RUN, "--gamma", "1");
    run = with_flag(&run, "--rounds", "6");
    run.extend(extra);
    let (_cluster, url, dir, leader) = a_leader_of(&run).await;
    let mut gateway_run = run.clone();
    gateway_run.push("--gateway");
    let gateway = spawn_serving(&url, &dir, "gateway", &gateway_run);
    let gateway_swarm = swarm_of(gateway.port, 2);
    wait_on(
        leader.port,
        &|| logs_of(&leader, &gateway),
        "the gateway's two ready clients",
        |s| s["gateways"][0]["ready"] == 2,
    )
    .await;
    let leader_swarm = swarm_of(leader.port, 2);
    wait_for(&leader, "the run to finish", |s| s["phase"] == "finished").await;
    gateway_swarm.abort();
    leader_swarm.abort();
    let history =
        astraea_server::loopback::get(&format!("127.0.0.1:{}", leader.port), "/api/rounds")
            .await
            .unwrap()
            .text();
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    let spent = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["epsilon"].as_f64())
        .collect();
    (logs_of(&leader, &gateway), spent)
}

/// Whether the leader folded a round with the gateway's `results`
/// results (the gateway's two clients, one mediator each), given back
/// one by one rather than as one partial.
fn folded_every_result(logs: &str, results: usize) -> bool {
    logs.lines().any(|line| {
        line.contains(&format!(
            "gateways' partials folded: 1 of 1 ({results} results)"
        ))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_robust_rule_takes_every_mediators_result_from_the_gateways() {
    // Before, a gateway refused a robust rule (its partial, one mean of
    // its mediators, is not what the median of them all would take).
    let (logs, _) = trained_across_gateways(&["--aggregation", "median"]).await;
    assert!(folded_every_result(&logs, 2), "{logs}");
    assert!(logs.contains("gateway: partial given back"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_level_dp_clips_every_mediators_result_from_the_gateways_in_one_place() {
    // Before, a gateway refused client-level DP. Now each gateway gives
    // back its mediators' results, and the leader clips each and noises
    // their sum once, as one server would.
    let dp = ["--dp-noise", "0.5", "--dp-budget", "1000", "--dp-clip", "5"];
    let (logs, spent) = trained_across_gateways(&dp).await;
    assert!(folded_every_result(&logs, 2), "{logs}");
    assert_eq!(spent.len(), 6, "{logs}");
    assert!(
        spent.windows(2).all(|w| w[0] < w[1]) && spent[0] > Some(0.0),
        "every round spends: {spent:?}"
    );
}

/// The first message of type `kind` the server sends `socket` within
/// `limit`; panics (with `logs()`) when the socket closes first or the
/// time runs out.
async fn first_of_kind(
    socket: &mut Socket,
    kind: &str,
    limit: Duration,
    logs: &dyn Fn() -> String,
) -> serde_json::Value {
    use futures_util::StreamExt;
    tokio::time::timeout(limit, async {
        while let Some(Ok(frame)) = socket.next().await {
            let Ok(message) =
                serde_json::from_str::<serde_json::Value>(frame.to_text().unwrap_or(""))
            else {
                continue;
            };
            if message["type"] == kind {
                return message;
            }
        }
        panic!("the socket closed before a {kind}\n{}", logs());
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} within {limit:?}\n{}", logs()))
}

/// The first `plan` message the server sends `socket`: its ratios.
async fn plan_heard(socket: &mut Socket, logs: &dyn Fn() -> String) -> Vec<f64> {
    first_of_kind(socket, "plan", Duration::from_secs(60), logs).await["ratios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_augmentation_plan_is_made_from_the_clients_of_every_server_of_the_run() {
    // Before, a gateway refused Astraea's augmentation plan (the leader
    // saw only its own clients' label counts). Prepare: a leader and a
    // gateway of one Astraea run that waits for four clients; two
    // own-data clients on the gateway short of class 9, then two on the
    // leader short of class 8.
    let mut run = with_flag(GATEWAY_RUN, "--min-clients", "4");
    run.extend(["--tau-d", "3.5"]);
    let (_cluster, url, dir, leader) = a_leader_of(&run).await;
    let mut gateway_run = run.clone();
    gateway_run.push("--gateway");
    let gateway = spawn_serving(&url, &dir, "gateway", &gateway_run);
    let logs = || logs_of(&leader, &gateway);
    wait_on(gateway.port, &logs, "the gateway", |s| {
        s["gateway"].is_string()
    })
    .await;
    let short_of = |class: usize| {
        let mut counts = vec![100usize; 10];
        counts[class] = 5;
        counts
    };
    let own = |class| astraea_core::protocol::DataSource::Own {
        counts: short_of(class),
    };
    let mut sockets = Vec::new();
    for _ in 0..2 {
        sockets.push(joining(gateway.port, "plan", own(9), None).await);
    }
    wait_on(leader.port, &logs, "the gateway's two ready clients", |s| {
        s["gateways"][0]["ready"] == 2
    })
    .await;

    // Execute
    for _ in 0..2 {
        sockets.push(joining(leader.port, "plan", own(8), None).await);
    }
    let mut heard = Vec::new();
    for socket in &mut sockets {
        heard.push(plan_heard(socket, &logs).await);
    }

    // Verify: every client, on either server, was sent the plan made from
    // all four clients' counts, not the one the leader's alone make.
    use astraea_core::astraea::stats::GlobalStats;
    use astraea_core::astraea::{AugmentationPlan, PlanRule};
    let plan_of = |counts: &[Vec<usize>]| {
        AugmentationPlan::compute(
            &GlobalStats::from_client_counts(counts),
            PlanRule::ZScore { tau_d: 3.5 },
        )
        .ratios
    };
    let every = plan_of(&[short_of(9), short_of(9), short_of(8), short_of(8)]);
    let leaders_alone = plan_of(&[short_of(8), short_of(8)]);
    assert_ne!(every, leaders_alone);
    for ratios in &heard {
        assert_eq!(ratios.len(), 10);
        for (got, want) in ratios.iter().zip(&every) {
            assert!(
                (got - want).abs() < 1e-9,
                "{ratios:?} against {every:?}\n{}",
                logs()
            );
        }
    }
    // Both servers show it.
    for port in [leader.port, gateway.port] {
        let shown = status(port).await.unwrap();
        assert_eq!(shown["plan"].as_array().map(Vec::len), Some(10), "{shown}");
    }
}

/// A client's socket to the server on `port`.
type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A socket to the server on `port` that has sent its `join` (as
/// `backend`, with `data`, and `resume` if any).
async fn joining(
    port: u16,
    backend: &str,
    data: astraea_core::protocol::DataSource,
    resume: Option<String>,
) -> Socket {
    use futures_util::SinkExt;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    let join = astraea_core::protocol::ClientMessage::Join {
        version: astraea_core::protocol::PROTOCOL_VERSION,
        backend: backend.into(),
        speed: None,
        data,
        resume,
    }
    .to_json();
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(join.into()))
        .await
        .unwrap();
    socket
}

/// A demo volunteer joining the server on `port` (with `resume`, a token
/// of the run, if any): its welcome's shard indices and resume token, and
/// its socket, kept open so that it stays joined.
async fn demo_join(port: u16, resume: Option<String>) -> (Vec<u64>, String, Socket) {
    let demo = astraea_core::protocol::DataSource::Demo;
    let mut socket = joining(port, "demo-join", demo, resume).await;
    let welcome = first_of_kind(
        &mut socket,
        "welcome",
        Duration::from_secs(30),
        &String::new,
    )
    .await;
    let indices = welcome["shard"]["indices"]
        .as_array()
        .expect("a demo shard")
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect();
    let token = welcome["resume"].as_str().unwrap().to_string();
    (indices, token, socket)
}

/// A throw-away database with a leader of [`GATEWAY_RUN`] and a gateway
/// of it, the gateway answering, no clients. Dropped in reverse order.
async fn leader_and_answering_gateway() -> (PgCluster, Server, Server) {
    let (cluster, url, dir, leader) = a_leader_of(GATEWAY_RUN).await;
    let mut gateway_run = GATEWAY_RUN.to_vec();
    gateway_run.push("--gateway");
    let gateway = spawn_serving(&url, &dir, "gateway", &gateway_run);
    wait_on(
        gateway.port,
        &|| logs_of(&leader, &gateway),
        "the gateway",
        |s| s["gateway"].is_string(),
    )
    .await;
    (cluster, leader, gateway)
}

/// The logs of a leader and its gateway, for a failure's message.
fn logs_of(leader: &Server, gateway: &Server) -> String {
    format!(
        "--- leader\n{}\n--- gateway\n{}",
        leader.log(),
        gateway.log()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_volunteers_take_the_shards_in_turn_across_the_runs_servers() {
    // The bug: each server numbered its demo shards by its own ids
    // ((id - 1) mod K), and a gateway's ids are `block << 32 | n`: with K
    // a power of two (4 here) a gateway's n-th volunteer took the shard
    // of the leader's n-th, and half the shards went untrained.
    // Prepare: a leader and a gateway of one run, both answering.
    let (_cluster, leader, gateway) = leader_and_answering_gateway().await;
    let logs = || logs_of(&leader, &gateway);

    // Execute: four demo volunteers, in turn on the leader and the
    // gateway; then the gateway's first leaves and comes back with its
    // token through the leader.
    let mut joined = Vec::new();
    for port in [leader.port, gateway.port, leader.port, gateway.port] {
        joined.push(demo_join(port, None).await);
    }
    let shards: Vec<Vec<u64>> = joined.iter().map(|(s, _, _)| s.clone()).collect();
    let (first_on_gateway, token, socket) = joined.remove(1);
    drop(socket);
    let (resumed, _, _kept) = demo_join(leader.port, Some(token)).await;

    // Verify: the run's K = 4 shards, one each, and the same shard for
    // the volunteer wherever it resumes.
    for (i, a) in shards.iter().enumerate() {
        assert!(!a.is_empty());
        for b in &shards[i + 1..] {
            assert_ne!(a, b, "two volunteers share a shard\n{}", logs());
        }
    }
    assert_eq!(resumed, first_on_gateway, "{}", logs());
}

/// Whether the server closes `socket` within `within`.
async fn closed_within(socket: &mut Socket, within: Duration) -> bool {
    use futures_util::StreamExt;
    tokio::time::timeout(within, async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volunteer_resumed_on_another_server_is_let_go_by_the_one_it_left_half_open() {
    // The race: a volunteer's socket on one server is half-open (the
    // server does not know it left) when it comes back on another server
    // of the run with its token. Before, both held it (counted it, could
    // draw it) until the old socket timed out. Both ways round: gateway
    // to leader, then back to the gateway.
    // Prepare: a leader and a gateway of one run; a demo volunteer on the
    // gateway.
    let (_cluster, leader, gateway) = leader_and_answering_gateway().await;
    let logs = || logs_of(&leader, &gateway);
    let (shard, token, on_gateway) = demo_join(gateway.port, None).await;
    wait_on(gateway.port, &logs, "the volunteer on the gateway", |s| {
        s["clients"] == 1
    })
    .await;

    // Execute and verify: it resumes on the leader, its socket on the
    // gateway left open; the gateway closes that socket and holds it no
    // more, the leader holds it, with its shard. And back again.
    let (on_leader_shard, on_leader) = resumes_elsewhere(
        (&gateway, "gateway"),
        on_gateway,
        (&leader, "leader"),
        &token,
        &logs,
    )
    .await;
    assert_eq!(on_leader_shard, shard);
    let _back = resumes_elsewhere(
        (&leader, "leader"),
        on_leader,
        (&gateway, "gateway"),
        &token,
        &logs,
    )
    .await;
}

/// A demo volunteer held by `from` on `old` resumes on `to` with `token`,
/// leaving `old` open: asserts that `from` closes it within 15 s and
/// lets the volunteer go, and that `to` holds it. Its shard there, and its
/// new socket.
async fn resumes_elsewhere(
    (from, from_name): (&Server, &str),
    mut old: Socket,
    (to, to_name): (&Server, &str),
    token: &str,
    logs: &dyn Fn() -> String,
) -> (Vec<u64>, Socket) {
    let (shard, _, socket) = demo_join(to.port, Some(token.to_string())).await;
    assert!(
        closed_within(&mut old, Duration::from_secs(15)).await,
        "the {from_name} kept the socket of a volunteer that resumed on the {to_name}\n{}",
        logs()
    );
    wait_on(
        from.port,
        logs,
        &format!("the {from_name} letting it go"),
        |s| s["clients"] == 0,
    )
    .await;
    wait_on(to.port, logs, &format!("the {to_name} holding it"), |s| {
        s["clients"] == 1
    })
    .await;
    (shard, socket)
}

/// Runs `sql` on the cluster's `postgres` database (on a thread of its
/// own: the blocking client runs a runtime).
fn as_admin(cluster: &PgCluster, sql: &str) {
    let (url, sql) = (cluster.url("postgres"), sql.to_string());
    std::thread::spawn(move || {
        let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        db.batch_execute(&sql).unwrap();
    })
    .join()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_said_once_when_it_starts_and_once_when_it_ends() {
    // Before, every failed call of a gateway's loops said so: four
    // heartbeats a second, two looks for work, one read of the moves.
    // Prepare: a gateway of a run (no leader: nothing else to lose).
    let (cluster, url) = PgCluster::with_database();
    let dir = cluster.dir().join("servers");
    std::fs::create_dir_all(&dir).unwrap();
    let mut run = GATEWAY_RUN.to_vec();
    run.push("--gateway");
    let gateway = spawn_serving(&url, &dir, "gateway", &run);
    wait_on(gateway.port, &|| gateway.log(), "the gateway", |s| {
        s["gateway"].is_string()
    })
    .await;

    // Execute: its database refuses every connection for 4 s (its
    // sessions cut), then takes them again.
    as_admin(
        &cluster,
        "ALTER DATABASE astraea ALLOW_CONNECTIONS false;
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = 'astraea' AND pid <> pg_backend_pid();",
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    as_admin(&cluster, "ALTER DATABASE astraea ALLOW_CONNECTIONS true;");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gateway
        .log()
        .contains("gateway heartbeat: the store answers again")
    {
        assert!(Instant::now() < deadline, "{}", gateway.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Verify: about 16 heartbeats failed, and the log says so twice.
    let log = gateway.log();
    let said = log
        .lines()
        .filter(|l| l.contains("gateway heartbeat: "))
        .count();
    assert_eq!(said, 2, "{log}");
    for what in ["gateway: looking for work: ", "reading the run's moves: "] {
        assert!(
            log.lines().filter(|l| l.contains(what)).count() <= 2,
            "{what}\n{log}"
        );
    }
}
