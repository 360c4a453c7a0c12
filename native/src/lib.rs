//! `astraea-native`: the native client (`astraea client`) and many of them in one process
//! (`astraea swarm`). It speaks the same protocol as a browser tab, driving
//! `astraea-core`'s [`ClientSession`] and training on burn's `flex` device.
#![warn(missing_docs)]

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use astraea_core::attack::Attack;
use astraea_core::augment::{AugmentConfig, apply_plan, materialise};
use astraea_core::data::Dataset;
use astraea_core::data::catalog::load_named;
use astraea_core::protocol::{
    AckOutcome, ClientAction, ClientMessage, ClientSession, DataSource, TaskSpec, progress_message,
};
use astraea_core::train::{self, Samples, train_task_threads};
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_tungstenite::tungstenite::Message;

pub mod tls;

/// How a native client connects and behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// WebSocket URL, e.g. `ws://127.0.0.1:8080/ws`, or `wss://` over TLS.
    pub url: String,
    /// TLS settings for a `wss://` URL ([`tls::client_config`]); `None`
    /// trusts the web's public roots alone.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Where the demo datasets are.
    pub data_dir: PathBuf,
    /// Largest frame sent or accepted.
    pub max_frame_bytes: usize,
    /// Connection attempts before giving up (reconnecting with back-off
    /// after the server goes away); `None` tries for ever.
    pub max_attempts: Option<u32>,
    /// Answer every task with the weights received, without training: for
    /// benchmarks of the coordination alone.
    pub echo: bool,
    /// Behave as an attacker (robustness runs); `None` is honest.
    pub attack: Option<Attack>,
    /// Probability, per task, of vanishing mid-hop: the socket is dropped
    /// without a close frame (a phone locking its screen, a tab closed) and
    /// the client rejoins after its back-off. For chaos runs; 0 for none.
    pub vanish: f64,
    /// Probability, per task, of freezing mid-hop: after its first
    /// heartbeat the client goes silent for `freeze_for` with its socket
    /// open (a phone whose screen locked, a frozen tab), then trains and
    /// answers late. For chaos runs; 0 for none.
    pub freeze: f64,
    /// How long a freeze lasts.
    pub freeze_for: Duration,
    /// The most samples per second this client trains at: a hop that took
    /// less than its samples over this speed is answered only once that
    /// much time has passed, with heartbeats meanwhile (a slow machine that
    /// keeps reporting progress). For swarms standing in for a population
    /// of uneven devices; `None`: as fast as it can.
    pub speed: Option<f64>,
    /// Threads a hop trains on, every batch split between them
    /// (`train::Replica`); 1 trains on one (burn's own pool still takes
    /// the large matrix products).
    pub threads: usize,
    /// How those threads share a hop (`train::Split`).
    pub split: train::Split,
}

impl ClientOptions {
    /// An honest client of `url` whose datasets are in `data_dir`: the
    /// web's roots for TLS, frames up to the protocol's default
    /// (`DEFAULT_MAX_FRAME_BYTES`), reconnecting for ever, training as fast
    /// as it can, never vanishing or freezing. Change what a use needs with
    /// `ClientOptions { field, ..ClientOptions::new(url, data_dir) }`.
    pub fn new(url: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            tls: None,
            data_dir: data_dir.into(),
            max_frame_bytes: astraea_core::protocol::DEFAULT_MAX_FRAME_BYTES,
            max_attempts: None,
            echo: false,
            attack: None,
            vanish: 0.0,
            freeze: 0.0,
            freeze_for: Duration::ZERO,
            speed: None,
            threads: 1,
            split: train::Split::Slices,
        }
    }
}

/// Seconds between heartbeats (`progress`) while training: well inside
/// any stall timeout a server would set.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Training sets loaded once and shared by every client of a swarm.
#[derive(Debug, Default)]
pub struct DatasetCache {
    train: Mutex<HashMap<String, Arc<Dataset>>>,
}

impl DatasetCache {
    /// The training set of `name`, loading it on first use.
    pub fn train(&self, name: &str, data_dir: &std::path::Path) -> anyhow::Result<Arc<Dataset>> {
        let mut map = self.train.lock().expect("no panic while loading");
        if let Some(data) = map.get(name) {
            return Ok(data.clone());
        }
        let (train, _) = load_named(name, data_dir)?;
        let train = Arc::new(train);
        map.insert(name.to_string(), train.clone());
        Ok(train)
    }
}

/// What one client did before it stopped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientSummary {
    /// Hops trained.
    pub hops: usize,
    /// Samples processed in training.
    pub samples: usize,
    /// Last accuracy the server announced.
    pub last_accuracy: Option<f64>,
    /// Updates the server acknowledged as accepted.
    pub accepted: usize,
    /// Updates the server acknowledged as stale (too late for their hop).
    pub stale: usize,
}

/// How a session ended.
enum Ended {
    /// The socket closed or broke: worth reconnecting.
    Disconnected(String),
    /// Reconnecting would not help: the server refused us, or we refused
    /// its certificate. The reason says which.
    Refused(String),
}

/// The client's local data: the shard as loaded, and the data it trains on
/// after the current plan.
struct LocalData {
    original: Dataset,
    images: Vec<f32>,
    labels: Vec<u32>,
}

/// The seed of a chaos draw (vanish, freeze) for one task of one client:
/// the task's seed, round, hop and the client's id hashed together. A task's
/// seed alone XORs small numbers (hop, member), so tasks of one round
/// shared draws and froze together.
fn chaos_seed(task: &TaskSpec, client_id: Option<u64>, salt: u64) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same draw on every run of this build.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (task.seed, task.round, task.hop, client_id, salt).hash(&mut hasher);
    hasher.finish()
}

/// Runs a client until it is refused or runs out of attempts, reconnecting
/// when the server goes after `pace::rejoin_delay`: a draw over the window
/// the server last asked for (pace steering) or the exponential back-off
/// (0.25 s doubling to 5 s), whichever is longer, after a refusal's
/// `Retry-After` if it gave one. The back-off starts again after a session
/// the server welcomed.
pub async fn run_client(
    options: ClientOptions,
    cache: Arc<DatasetCache>,
) -> anyhow::Result<ClientSummary> {
    let mut summary = ClientSummary::default();
    let mut failures = 0u32;
    let mut attempt = 0u32;
    // The server's resume token (a reconnect comes back as the same
    // client) and the noisy label report (the same data reports the same
    // noise again, spending nothing).
    let mut resume = Carried::default();
    loop {
        attempt += 1;
        let ended = run_session(&options, &cache, &mut summary, &mut resume).await;
        if std::mem::take(&mut resume.welcomed) {
            failures = 0;
        }
        let (reason, retry_after) = match ended {
            Ok(Ended::Refused(reason)) => bail!("{reason}"),
            Ok(Ended::Disconnected(reason)) => (reason, None),
            Err(ReasonError {
                reason,
                retry_after,
            }) => (reason, retry_after),
        };
        if options.max_attempts.is_some_and(|max| attempt >= max) {
            tracing::info!("client stops after {attempt} attempts: {reason}");
            return Ok(summary);
        }
        wait_to_rejoin(&reason, &resume, &mut failures, retry_after).await;
    }
}

/// Sleeps before the next attempt to join ([`run_client`]).
async fn wait_to_rejoin(
    reason: &str,
    resume: &Carried,
    failures: &mut u32,
    retry_after: Option<Duration>,
) {
    let draw: f64 = rand::random();
    let mut wait =
        astraea_core::protocol::pace::rejoin_delay(resume.rejoin_within_ms, *failures, draw);
    // A refusal's Retry-After is a floor, the draw still spreads above it:
    // clients refused together must not all come back at that second.
    if let Some(after) = retry_after {
        wait += after;
    }
    *failures = failures.saturating_add(1);
    tracing::info!("disconnected ({reason}); retrying in {wait:?}");
    tokio::time::sleep(wait).await;
}

/// An error that ends a session but may pass on reconnecting; a refused
/// handshake (429, 503) may say when to come back (`Retry-After`, whole
/// seconds).
struct ReasonError {
    reason: String,
    retry_after: Option<Duration>,
}

impl<E: std::fmt::Display> From<E> for ReasonError {
    fn from(e: E) -> Self {
        ReasonError {
            reason: e.to_string(),
            retry_after: None,
        }
    }
}

/// A refused handshake's `Retry-After` (whole seconds, at most the
/// longest rejoin window), if it said one.
fn retry_after(e: &tokio_tungstenite::tungstenite::Error) -> Option<Duration> {
    let tokio_tungstenite::tungstenite::Error::Http(response) = e else {
        return None;
    };
    let seconds: u64 = response
        .headers()
        .get(tokio_tungstenite::tungstenite::http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(astraea_core::protocol::pace::MAX_REJOIN_WINDOW))
}

async fn run_session(
    options: &ClientOptions,
    cache: &DatasetCache,
    summary: &mut ClientSummary,
    resume: &mut Carried,
) -> Result<Ended, ReasonError> {
    let connector = options.url.starts_with("wss://").then(|| {
        tokio_tungstenite::Connector::Rustls(options.tls.clone().unwrap_or_else(tls::public_roots))
    });
    let socket = tokio_tungstenite::connect_async_tls_with_config(
        options.url.as_str(),
        None,
        false,
        connector,
    )
    .await;
    let socket = match socket {
        Ok((socket, _)) => socket,
        // Not a passing fault: retrying would fail the same way.
        Err(e) => match tls::tls_refusal(&e) {
            Some(why) => return Ok(Ended::Refused(why)),
            None => {
                return Err(ReasonError {
                    retry_after: retry_after(&e),
                    reason: e.to_string(),
                });
            }
        },
    };
    let (mut sink, mut stream) = socket.split();
    let (mut session, first) = ClientSession::resuming(
        "flex",
        None,
        DataSource::Demo,
        options.max_frame_bytes,
        resume.token.clone(),
    );
    if let Some((exact, noisy)) = resume.label_report.clone() {
        session.reuse_label_report(exact, noisy);
    }
    let mut session = Resumable { session, resume };
    let mut queue: VecDeque<ClientAction> = first.into();
    let mut local: Option<LocalData> = None;
    loop {
        while let Some(action) = queue.pop_front() {
            match action {
                ClientAction::Send(message) => {
                    sink.send(Message::Text(message.to_json().into())).await?
                }
                ClientAction::SendBinary(frames) => {
                    for frame in frames {
                        sink.send(Message::Binary(frame.into())).await?;
                    }
                }
                ClientAction::LoadShard(shard) => {
                    let train = cache.train(&shard.dataset, &options.data_dir)?;
                    let original = train.subset(&shard.indices);
                    let counts = original.label_counts();
                    local = Some(LocalData {
                        images: original.images.clone(),
                        labels: original.labels.clone(),
                        original,
                    });
                    queue.extend(session.data_ready(counts));
                }
                ClientAction::ApplyPlan { ratios, seed } => {
                    let data = local.as_mut().ok_or("a plan before any data")?;
                    let d = &data.original;
                    let outcome = apply_plan(&d.labels, &ratios, &AugmentConfig::default(), seed)?;
                    let (images, labels) = materialise(
                        &d.images,
                        &d.labels,
                        d.sample_len(),
                        d.channels,
                        d.height,
                        d.width,
                        &outcome,
                    )?;
                    data.images = images;
                    data.labels = labels;
                    let mut counts = vec![0; d.num_classes()];
                    data.labels.iter().for_each(|&l| counts[l as usize] += 1);
                    queue.extend(session.data_ready(counts));
                }
                ClientAction::Train { task, weights } => {
                    if options.vanish > 0.0
                        && StdRng::seed_from_u64(chaos_seed(&task, session.client_id(), 0x7a15))
                            .random_bool(options.vanish.min(1.0))
                    {
                        return Ok(Ended::Disconnected("vanished mid-hop".into()));
                    }
                    if options.freeze > 0.0
                        && StdRng::seed_from_u64(chaos_seed(&task, session.client_id(), 0xf7ee2e))
                            .random_bool(options.freeze.min(1.0))
                    {
                        tracing::info!(round = task.round, hop = task.hop, "frozen mid-hop");
                        tokio::time::sleep(options.freeze_for).await;
                    }
                    let data = local.as_ref().ok_or("a task before any data")?;
                    let model = session.model().ok_or("a task before the welcome")?.clone();
                    let (images, mut labels) = (data.images.clone(), data.labels.clone());
                    let attack = options.attack;
                    let lent = if session.resume.one_thread {
                        1
                    } else {
                        options.threads.max(1)
                    };
                    let threads = (lent, options.split);
                    if let Some(attack) = &attack {
                        attack.poison_labels(&mut labels, model.num_classes);
                    }
                    let started = Instant::now();
                    let task_for_training = task.clone();
                    let sent = attack.map(|_| weights.clone());
                    let trains = attack.is_none_or(|a| a.trains());
                    let (mut trained, stats) = if options.echo || !trains {
                        let stats = train::TrainStats {
                            samples: labels.len(),
                            ..Default::default()
                        };
                        (weights, stats)
                    } else {
                        // Training runs on a blocking thread; its heartbeats
                        // come back here to be sent while it runs.
                        let (beat_tx, mut beats) = tokio::sync::mpsc::unbounded_channel();
                        let mut training = tokio::task::spawn_blocking(move || {
                            // The first step beats at once: model set-up
                            // and a first batch are the longest silence.
                            let mut last: Option<Instant> = None;
                            train_task_threads(
                                &model,
                                &task_for_training,
                                weights,
                                Samples {
                                    images: &images,
                                    labels: &labels,
                                },
                                threads,
                                &mut |step| {
                                    if last.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
                                        last = Some(Instant::now());
                                        let _ = beat_tx
                                            .send(progress_message(&task_for_training, step));
                                    }
                                },
                            )
                        });
                        loop {
                            tokio::select! {
                                done = &mut training => break done??,
                                Some(beat) = beats.recv() => {
                                    sink.send(Message::Text(beat.to_json().into())).await?;
                                }
                            }
                        }
                    };
                    if stats.replicas_lost > 0 {
                        // As the tab gives up the cores of a worker that failed.
                        session.resume.one_thread = true;
                        tracing::warn!(
                            round = task.round,
                            hop = task.hop,
                            lost = stats.replicas_lost,
                            "a training thread failed; the hop went on on one thread, and so will the next"
                        );
                    }
                    // An injected speed: wait out the rest of the time a
                    // machine of that speed would have taken, alive.
                    if let Some(speed) = options.speed.filter(|s| *s > 0.0 && s.is_finite()) {
                        let work = stats.samples.max(1) as f64;
                        let due = started + Duration::from_secs_f64((work / speed).min(86_400.0));
                        while Instant::now() < due {
                            let pause =
                                HEARTBEAT.min(due.saturating_duration_since(Instant::now()));
                            tokio::time::sleep(pause).await;
                            let beat = ClientMessage::Progress {
                                round: task.round,
                                hop: task.hop,
                                done: astraea_core::protocol::session::PROGRESS_SCALE - 1,
                                total: astraea_core::protocol::session::PROGRESS_SCALE,
                            };
                            sink.send(Message::Text(beat.to_json().into())).await?;
                        }
                    }
                    let mut samples = data.labels.len() as u64;
                    if let (Some(attack), Some(sent)) = (attack, sent) {
                        let mut rng = StdRng::seed_from_u64(task.seed);
                        attack.poison_weights(&sent, &mut trained, &mut rng);
                        samples = attack.claimed_samples(samples);
                    }
                    summary.hops += 1;
                    summary.samples += stats.samples;
                    queue.extend(session.trained(
                        &task,
                        &trained,
                        samples,
                        stats.mean_loss,
                        started.elapsed().as_secs_f64(),
                    ));
                }
                ClientAction::RoundDone {
                    round,
                    accuracy,
                    last,
                    ..
                } => {
                    summary.last_accuracy = Some(accuracy);
                    if last {
                        tracing::info!(round, accuracy, "the run is over: that was its last round");
                    }
                }
                ClientAction::Acknowledged {
                    round,
                    hop,
                    outcome,
                    reason,
                } => {
                    match outcome {
                        AckOutcome::Accepted => summary.accepted += 1,
                        AckOutcome::Stale => summary.stale += 1,
                        AckOutcome::Refused => {}
                    }
                    tracing::debug!(round, hop, ?outcome, ?reason, "update acknowledged");
                }
                ClientAction::Close(reason) => {
                    let _ = sink.close().await;
                    return Ok(Ended::Refused(format!("refused by the server: {reason}")));
                }
            }
        }
        let Some(frame) = stream.next().await else {
            return Ok(Ended::Disconnected(
                "the server closed the connection".into(),
            ));
        };
        match frame? {
            Message::Text(text) => queue.extend(session.on_text(text.as_str())),
            Message::Binary(bytes) => queue.extend(session.on_binary(&bytes)),
            Message::Close(_) => {
                return Ok(Ended::Disconnected(
                    "the server closed the connection".into(),
                ));
            }
            _ => {}
        }
    }
}

/// What a client carries from one session to the next.
#[derive(Default)]
struct Carried {
    /// The server's resume token.
    token: Option<String>,
    /// The true counts and the noisy report of the first labelled report.
    label_report: Option<(Vec<usize>, Vec<usize>)>,
    /// The latest pace-steering window the server asked for, in ms.
    rejoin_within_ms: u64,
    /// The session that ended was welcomed (the back-off starts again).
    welcomed: bool,
    /// A training thread failed: hops train on one thread from then on.
    one_thread: bool,
}

/// A session that hands its resume token (and label report) back to the
/// client when it ends, whichever way it ends.
struct Resumable<'a> {
    session: ClientSession,
    resume: &'a mut Carried,
}

impl std::ops::Deref for Resumable<'_> {
    type Target = ClientSession;
    fn deref(&self) -> &ClientSession {
        &self.session
    }
}

impl std::ops::DerefMut for Resumable<'_> {
    fn deref_mut(&mut self) -> &mut ClientSession {
        &mut self.session
    }
}

impl Drop for Resumable<'_> {
    fn drop(&mut self) {
        if let Some(token) = self.session.resume_token() {
            self.resume.token = Some(token.to_string());
        }
        if let Some(report) = self.session.label_report() {
            self.resume.label_report = Some(report);
        }
        // A welcomed session's server speaks for the window (none said:
        // the client's own back-off); an unwelcomed one leaves it.
        if self.session.welcomed() {
            self.resume.rejoin_within_ms = self.session.rejoin_within_ms().unwrap_or(0);
            self.resume.welcomed = true;
        }
    }
}

/// Runs `count` clients in this process, sharing the loaded datasets.
pub async fn run_swarm(count: usize, options: ClientOptions) -> Vec<anyhow::Result<ClientSummary>> {
    run_swarm_with_speeds(count, options, &[]).await
}

/// [`run_swarm`] where client `i` trains at most at `speeds[i]` samples
/// per second ([`ClientOptions::speed`]; clients past the list's end keep
/// the options' speed): a population of uneven machines on one host.
pub async fn run_swarm_with_speeds(
    count: usize,
    options: ClientOptions,
    speeds: &[f64],
) -> Vec<anyhow::Result<ClientSummary>> {
    let cache = Arc::new(DatasetCache::default());
    let handles: Vec<_> = (0..count)
        .map(|i| {
            let options = ClientOptions {
                speed: speeds.get(i).copied().or(options.speed),
                ..options.clone()
            };
            tokio::spawn(run_client(options, cache.clone()))
        })
        .collect();
    let mut results = Vec::with_capacity(count);
    for handle in handles {
        results.push(
            handle
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("client task failed: {e}"))),
        );
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use astraea_core::protocol::WeightEncoding;

    #[test]
    fn chaos_draws_of_one_round_are_independent() {
        // The bug: draws seeded by the task's seed alone (an XOR of the
        // round, the chain-local hop and the member) repeated within a
        // round, so a 10 % freeze froze most of a round's hops at once.
        let task = |hop: u32, seed: u64| TaskSpec {
            round: 3,
            hop,
            epochs: 1,
            batch_size: 20,
            learning_rate: 1e-3,
            prox_mu: 0.0,
            deadline_ms: 60_000,
            stall_ms: None,
            seed,
            encoding: WeightEncoding::F32,
            chunks: 1,
            place: None,
            secure_weight: None,
            secure_clip: None,
            secure_noise: None,
        };
        let mut frozen = 0;
        let mut seeds = std::collections::HashSet::new();
        for client in 1..=40u64 {
            for hop in 1..=6u32 {
                // Seeds as the server makes them: small XORs that collide.
                let seed = (3u64 << 32) ^ u64::from(hop) ^ (client % 4);
                let t = task(hop + 10_000 * (client as u32 % 3), seed);
                let draw = chaos_seed(&t, Some(client), 0xf7ee2e);
                seeds.insert(draw);
                frozen += usize::from(StdRng::seed_from_u64(draw).random_bool(0.1));
            }
        }
        assert_eq!(seeds.len(), 240);
        assert!((10..=40).contains(&frozen), "{frozen} of 240 froze");
    }
}
