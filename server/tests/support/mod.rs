//! Helpers the server's integration tests share: a served MNIST run on
//! 127.0.0.1:0, native client options, and a hand-driven protocol client.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use astraea_core::astraea::PlanRule;
use astraea_core::partition::PartitionSpec;
use astraea_core::protocol::{
    ClientMessage, DataSource, PROTOCOL_VERSION, ServerMessage, WeightEncoding,
};
use astraea_core::strategy::{Rescheduling, StrategyKind, StrategySettings};
use astraea_native::ClientOptions;
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
        dataset: "mnist".into(),
        data_dir: data_dir(),
        max_train: Some(3000),
        partition: "long-tail:10".parse::<PartitionSpec>().unwrap(),
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
            },
            prox_mu: 0.01,
            aggregation: Default::default(),
        },
        epochs: 1,
        batch_size: 20,
        learning_rate: 1e-3,
        hop_deadline: Duration::from_secs(60),
        max_update_ratio: astraea_server::guard::DEFAULT_MAX_UPDATE_RATIO,
        validation_samples: astraea_core::validation::DEFAULT_VALIDATION_SAMPLES,
        max_loss_increase: astraea_core::validation::DEFAULT_MAX_LOSS_INCREASE,
        max_frame_bytes: 64 * 1024,
        encoding: WeightEncoding::F32,
        seed: 3,
        static_dir: std::env::temp_dir(),
        admin_token: Some("s3cret".into()),
        state_dir: None,
        run_name: "test".into(),
        tls: None,
        public_url: None,
    }
}

pub async fn start(config: ServeConfig) -> (Running, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    (serve::start(listener, config).await.unwrap(), address)
}

pub fn options(address: &str) -> ClientOptions {
    ClientOptions {
        url: format!("ws://{address}/ws"),
        data_dir: data_dir(),
        max_frame_bytes: 64 * 1024,
        max_attempts: Some(1),
        echo: false,
        attack: None,
        vanish: 0.0,
    }
}

/// Opens a WebSocket to the server's `/ws`.
pub async fn connect(address: &str) -> Socket {
    tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .unwrap()
        .0
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
    let mut socket = connect(address).await;
    let join = ClientMessage::Join {
        version: PROTOCOL_VERSION,
        backend: "test".into(),
        speed: None,
        data: DataSource::Own {
            counts: vec![5; 10],
        },
    };
    send(&mut socket, &join).await;
    let Some(Ok(Message::Text(welcome))) = socket.next().await else {
        panic!("no welcome")
    };
    assert!(matches!(
        ServerMessage::from_json(&welcome).unwrap(),
        ServerMessage::Welcome { .. }
    ));
    socket
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
