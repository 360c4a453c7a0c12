//! Helpers the server's integration tests share: a served MNIST run on
//! 127.0.0.1:0, native client options, and a hand-driven protocol client.

#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use astraea_core::astraea::PlanRule;
use astraea_core::protocol::{
    AckOutcome, ClientMessage, DataSource, ErrorCode, PROTOCOL_VERSION, ServerMessage, TaskSpec,
    UpdateSpec, WeightAssembler, WeightEncoding, encode_chunks,
};
use astraea_core::strategy::{Rescheduling, StrategyKind, StrategySettings};
use astraea_native::ClientOptions;
use astraea_native::run_swarm;
use astraea_server::{self as serve, Running, ServeConfig};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A client socket as the tests hold it.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

pub fn config(strategy: StrategyKind, clients: usize, rounds: u32) -> ServeConfig {
    ServeConfig {
        data_dir: data_dir(),
        max_train: Some(3000),
        shards: clients,
        participants: clients,
        min_clients: clients,
        rounds,
        strategy,
        settings: StrategySettings {
            plan_rule: PlanRule::ZScore { tau_d: 3.5 },
            rescheduling: Rescheduling {
                gamma: 3,
                passes: 2,
                scheduler: astraea_core::astraea::Scheduler::Greedy,
            },
            prox_mu: 0.01,
            aggregation: Default::default(),
        },
        max_frame_bytes: 64 * 1024,
        seed: 3,
        static_dir: std::env::temp_dir(),
        admin_token: Some("s3cret".into()),
        run_name: "test".into(),
        ..ServeConfig::default()
    }
}

pub async fn start(config: ServeConfig) -> (Running, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    (serve::start(listener, config).await.unwrap(), address)
}

/// Waits for a run's round loop to end: it must within 5 minutes, and
/// without an error.
pub async fn finishes(
    coordinator: impl std::future::Future<Output = Result<anyhow::Result<()>, tokio::task::JoinError>>,
) {
    tokio::time::timeout(Duration::from_secs(300), coordinator)
        .await
        .expect("the run finishes within 5 minutes")
        .unwrap()
        .unwrap();
}

pub fn options(address: &str) -> ClientOptions {
    ClientOptions {
        max_frame_bytes: 64 * 1024,
        max_attempts: Some(1),
        ..ClientOptions::new(format!("ws://{address}/ws"), data_dir())
    }
}

/// Opens a WebSocket to the server's `/ws`.
pub async fn connect(address: &str) -> Socket {
    tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .unwrap()
        .0
}

/// Opens a WebSocket to the server's `/ws` and sends a plain demo `join`
/// (this protocol version); the welcome is left to the caller to read.
pub async fn connect_as_demo(address: &str) -> Socket {
    let mut socket = connect(address).await;
    let join = ClientMessage::Join {
        version: PROTOCOL_VERSION,
        backend: "test".into(),
        speed: None,
        data: DataSource::Demo,
        resume: None,
    };
    send(&mut socket, &join).await;
    socket
}

/// Sends one client message as a text frame.
pub async fn send(socket: &mut Socket, message: &ClientMessage) {
    socket
        .send(Message::Text(message.to_json().into()))
        .await
        .unwrap();
}

/// Joins by hand and returns the socket after the welcome.
pub async fn join(address: &str) -> Socket {
    join_with_token(address).await.0
}

/// Joins by hand as an own-data client; returns the socket after the
/// welcome and the welcome's resume token.
pub async fn join_with_token(address: &str) -> (Socket, String) {
    join_declaring(address, vec![5; 10]).await
}

/// Joins by hand as an own-data client declaring `counts`; returns the
/// socket after the welcome and the welcome's resume token.
pub async fn join_declaring(address: &str, counts: Vec<usize>) -> (Socket, String) {
    let mut socket = connect(address).await;
    let join = ClientMessage::Join {
        version: PROTOCOL_VERSION,
        backend: "test".into(),
        speed: None,
        data: DataSource::Own { counts },
        resume: None,
    };
    send(&mut socket, &join).await;
    let Some(Ok(Message::Text(welcome))) = socket.next().await else {
        panic!("no welcome")
    };
    let ServerMessage::Welcome {
        resume: Some(token),
        ..
    } = ServerMessage::from_json(&welcome).unwrap()
    else {
        panic!("not a welcome with a resume token: {welcome}")
    };
    (socket, token)
}

/// POSTs `body` to `path` over plain HTTP/1.1, as `navigator.sendBeacon`
/// would (a text body); returns the response's status code.
pub async fn post(address: &str, path: &str, body: &str) -> u16 {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: text/plain;charset=UTF-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    status_of(address, &request).await
}

/// GETs `path` over plain HTTP/1.0; returns the response's status code.
pub async fn get(address: &str, path: &str) -> u16 {
    status_of(
        address,
        &format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n"),
    )
    .await
}

/// Sends `request` to `address` and reads the response to its end;
/// returns its status code.
async fn status_of(address: &str, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"))
}

/// Reads frames until the server's error message; returns it.
pub async fn next_error(socket: &mut Socket) -> ServerMessage {
    while let Some(Ok(frame)) = socket.next().await {
        if let Message::Text(text) = frame {
            let message = ServerMessage::from_json(&text).unwrap();
            if matches!(message, ServerMessage::Error { .. }) {
                return message;
            }
        }
    }
    panic!("the server closed without an error frame");
}

/// What a scripted client does with a task's weights.
#[derive(Default)]
pub struct Answer {
    /// The weights to send back.
    pub values: Vec<f32>,
    /// The samples to claim.
    pub samples: u64,
    /// Send only this many of the chunks (all when `None`).
    pub chunks_sent: Option<usize>,
    /// Wait this long before answering: a slow client, or with no
    /// heartbeat a frozen one.
    pub delay: Duration,
    /// While waiting, send a `progress` every 500 ms (alive but slow).
    pub heartbeat: bool,
}

/// The weights of `task` for a model of `params` values: its chunks, the
/// next binary frames on `socket` (64 KiB frames at most).
pub async fn task_weights(socket: &mut Socket, task: &TaskSpec, params: usize) -> Vec<f32> {
    let mut assembler = WeightAssembler::new(
        task.round,
        task.hop,
        task.chunks,
        params,
        task.encoding,
        64 * 1024,
    );
    loop {
        let Some(Ok(Message::Binary(chunk))) = socket.next().await else {
            panic!("the task's chunks did not come")
        };
        if let Some(done) = assembler.push(&chunk).unwrap() {
            return done;
        }
    }
}

/// Answers tasks with `answer` until the server sends an error frame or
/// closes; returns the error. The acks it gets go to `acks`, in order, as
/// they come (the socket may stay open after the run).
pub async fn play(
    socket: &mut Socket,
    params: usize,
    acks: Arc<Mutex<Vec<AckOutcome>>>,
    mut answer: impl FnMut(&TaskSpec, Vec<f32>) -> Answer,
) -> Option<ServerMessage> {
    while let Some(Ok(frame)) = socket.next().await {
        let Message::Text(text) = frame else { continue };
        match ServerMessage::from_json(&text).unwrap() {
            ServerMessage::Task(task) => {
                let weights = task_weights(socket, &task, params).await;
                let reply = answer(&task, weights);
                let waited = std::time::Instant::now();
                while waited.elapsed() < reply.delay {
                    let pause = Duration::from_millis(500).min(reply.delay - waited.elapsed());
                    tokio::time::sleep(pause).await;
                    if reply.heartbeat {
                        let beat = ClientMessage::Progress {
                            round: task.round,
                            hop: task.hop,
                            done: 0,
                            total: 1,
                        };
                        let _ = socket.send(Message::Text(beat.to_json().into())).await;
                    }
                }
                let frames = encode_chunks(
                    task.round,
                    task.hop,
                    &reply.values,
                    WeightEncoding::F32,
                    64 * 1024,
                );
                let update = ClientMessage::Update(UpdateSpec {
                    round: task.round,
                    hop: task.hop,
                    samples: reply.samples,
                    loss: 0.1,
                    seconds: 0.1,
                    encoding: WeightEncoding::F32,
                    chunks: frames.len() as u32,
                });
                let _ = socket.send(Message::Text(update.to_json().into())).await;
                let sent = reply.chunks_sent.unwrap_or(frames.len());
                for frame in frames.into_iter().take(sent) {
                    let _ = socket.send(Message::Binary(frame.into())).await;
                }
            }
            ServerMessage::Ack { outcome, .. } => acks.lock().unwrap().push(outcome),
            error @ ServerMessage::Error { .. } => return Some(error),
            _ => {}
        }
    }
    None
}

pub fn error_code(error: Option<ServerMessage>) -> ErrorCode {
    match error {
        Some(ServerMessage::Error { code, .. }) => code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// Runs a FedAvg federation of three honest clients and one scripted one
/// for `rounds` rounds; returns what the scripted one heard and the server.
pub async fn with_three_honest(
    rounds: u32,
    configure: impl FnOnce(&mut ServeConfig),
    answer: impl FnMut(&TaskSpec, Vec<f32>) -> Answer + Send + 'static,
) -> (
    Option<ServerMessage>,
    Vec<AckOutcome>,
    astraea_server::Running,
) {
    with_three_honest_declaring(vec![5; 10], rounds, configure, answer).await
}

/// [`with_three_honest`], the scripted client declaring `counts` at join.
pub async fn with_three_honest_declaring(
    counts: Vec<usize>,
    rounds: u32,
    configure: impl FnOnce(&mut ServeConfig),
    answer: impl FnMut(&TaskSpec, Vec<f32>) -> Answer + Send + 'static,
) -> (
    Option<ServerMessage>,
    Vec<AckOutcome>,
    astraea_server::Running,
) {
    let mut cfg = config(StrategyKind::FedAvg, 4, rounds);
    configure(&mut cfg);
    let (mut running, address) = start(cfg).await;
    let params = running.state.model.params;
    let swarm = tokio::spawn(run_swarm(3, options(&address)));
    let (mut scripted, _) = join_declaring(&address, counts).await;
    let acks = Arc::new(Mutex::new(Vec::new()));
    let heard = acks.clone();
    let played = tokio::spawn(async move { play(&mut scripted, params, heard, answer).await });
    tokio::time::timeout(Duration::from_secs(240), &mut running.coordinator)
        .await
        .expect("the run finishes despite the scripted client")
        .unwrap()
        .unwrap();
    swarm.abort();
    // An error frame ends `play` at once; without one the socket stays open.
    let error = tokio::time::timeout(Duration::from_secs(2), played)
        .await
        .map(Result::unwrap)
        .unwrap_or(None);
    let acks = acks.lock().unwrap().clone();
    (error, acks, running)
}

/// `cfg` under client-level DP: noise multiplier `sigma`, clip `clip`,
/// delta 1e-5, the run stopping past `max_epsilon`.
pub fn privately(
    cfg: &mut astraea_server::ServeConfig,
    clip: f64,
    sigma: f64,
    max_epsilon: f64,
    adaptive: Option<astraea_core::privacy::AdaptiveClip>,
) {
    cfg.model_privacy = Some(astraea_server::config::ServedPrivacy {
        budget: astraea_core::privacy::ModelPrivacy {
            clip,
            noise_multiplier: sigma,
            delta: 1e-5,
            adaptive,
        },
        max_epsilon,
        distributed: false,
    });
}
