//! One client's WebSocket: a sender task drains the client's queue while
//! this task parses what arrives, checks it, and hands finished hops to the
//! coordinator. Anything malformed gets an error frame and the client is
//! dropped; the global model never sees it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use astraea_core::protocol::{
    ClientMessage, DataSource, ErrorCode, FrameError, PROTOCOL_VERSION, ServerMessage, ShardSpec,
    UpdateSpec, WeightAssembler,
};
use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::guard::delta_norm;
use super::state::{AppState, ClientEntry, HopReply, Outbound};

/// Why a connection is closed by the server.
struct Refusal {
    code: ErrorCode,
    message: String,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

/// Per-connection state.
struct Connection {
    state: Arc<AppState>,
    tx: mpsc::UnboundedSender<Outbound>,
    id: Option<u64>,
    /// An update whose weight chunks are arriving.
    incoming: Option<(UpdateSpec, WeightAssembler)>,
}

/// Serves one WebSocket until it closes, then forgets the client.
pub async fn handle_socket(socket: WebSocket, state: Arc<AppState>) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let counter = state.clone();
    let sender = tokio::spawn(async move {
        while let Some(outbound) = rx.recv().await {
            let message = match outbound {
                Outbound::Text(text) => {
                    counter
                        .bytes_down
                        .fetch_add(text.len() as u64, Ordering::Relaxed);
                    Message::Text(text.into())
                }
                Outbound::Binary(bytes) => {
                    counter
                        .bytes_down
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    Message::Binary(bytes.into())
                }
                Outbound::Close => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
            };
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut connection = Connection {
        state: state.clone(),
        tx,
        id: None,
        incoming: None,
    };
    while let Some(frame) = stream.next().await {
        let outcome = match frame {
            Ok(Message::Text(text)) => {
                state
                    .bytes_up
                    .fetch_add(text.len() as u64, Ordering::Relaxed);
                connection.on_text(text.as_str())
            }
            Ok(Message::Binary(bytes)) => {
                state
                    .bytes_up
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                connection.on_binary(&bytes)
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => Ok(true),
            // Oversized frames are refused by the socket before buffering.
            Err(e) => Err(refuse(ErrorCode::TooLarge, format!("socket error: {e}"))),
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => break,
            Err(refusal) => {
                state.rejections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = ?connection.id, code = ?refusal.code, "{}", refusal.message);
                let detail = format!(
                    "client {:?}: {:?}: {}",
                    connection.id, refusal.code, refusal.message
                );
                state.record(|store, run| store.event(run, None, "rejection", &detail));
                let _ = connection.tx.send(Outbound::Text(
                    ServerMessage::Error {
                        code: refusal.code,
                        message: refusal.message,
                    }
                    .to_json(),
                ));
                let _ = connection.tx.send(Outbound::Close);
                break;
            }
        }
    }
    if let Some(id) = connection.id {
        state.clients().remove(&id);
        state.changed.notify_waiters();
        tracing::info!(client = id, "left");
    }
    drop(connection);
    let _ = tokio::time::timeout(Duration::from_secs(5), sender).await;
}

impl Connection {
    /// Handles a text frame; `Ok(false)` ends the connection quietly.
    fn on_text(&mut self, text: &str) -> Result<bool, Refusal> {
        let message = ClientMessage::from_json(text)
            .map_err(|e| refuse(ErrorCode::Malformed, format!("malformed message: {e}")))?;
        match (self.id, message) {
            (
                None,
                ClientMessage::Join {
                    version,
                    backend,
                    data,
                    ..
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return Err(refuse(
                        ErrorCode::Version,
                        format!("client speaks protocol {version}, server {PROTOCOL_VERSION}"),
                    ));
                }
                self.join(backend, data)?;
                Ok(true)
            }
            (Some(id), ClientMessage::Ready { counts }) => {
                self.ready(id, counts)?;
                Ok(true)
            }
            (Some(_), ClientMessage::Update(update)) => {
                if self.incoming.is_some() {
                    return Err(refuse(
                        ErrorCode::Unexpected,
                        "update before the last one's weights",
                    ));
                }
                let assembler = WeightAssembler::new(
                    update.round,
                    update.hop,
                    update.chunks,
                    self.state.model.params,
                    update.encoding,
                    self.state.config.max_frame_bytes,
                );
                self.incoming = Some((update, assembler));
                Ok(true)
            }
            (Some(_), ClientMessage::Progress { .. }) => Ok(true),
            (Some(id), ClientMessage::Error { code, message }) => {
                tracing::warn!(client = id, ?code, "client reported: {message}");
                // Give up its hop at once instead of waiting for the deadline.
                if let Some(entry) = self.state.clients().get_mut(&id) {
                    entry.pending = None;
                }
                Ok(true)
            }
            (_, ClientMessage::Leave) => Ok(false),
            (id, message) => Err(refuse(
                ErrorCode::Unexpected,
                format!(
                    "unexpected {} {}",
                    message_name(&message),
                    if id.is_some() {
                        "after join"
                    } else {
                        "before join"
                    }
                ),
            )),
        }
    }

    fn join(&mut self, backend: String, data: DataSource) -> Result<(), Refusal> {
        let id = self.state.next_client_id();
        let shard = match data {
            DataSource::Demo => {
                let index = (id as usize - 1) % self.state.shards.len().max(1);
                Some(ShardSpec {
                    dataset: self.state.config.dataset.clone(),
                    indices: self.state.shards[index].clone(),
                })
            }
            DataSource::Own { .. } => None,
        };
        let entry = ClientEntry {
            backend,
            tx: self.tx.clone(),
            raw_counts: None,
            counts: None,
            plan_sent: false,
            pending: None,
            hops_done: 0,
            samples_trained: 0,
        };
        entry.send(&ServerMessage::Welcome {
            version: PROTOCOL_VERSION,
            client_id: id,
            model: self.state.model.clone(),
            shard,
        });
        self.state.clients().insert(id, entry);
        self.id = Some(id);
        if let DataSource::Own { counts } = data {
            self.ready(id, counts)?;
        }
        let backend = self
            .state
            .clients()
            .get(&id)
            .map(|c| c.backend.clone())
            .unwrap_or_default();
        self.state
            .record(|store, run| store.client_joined(run, id, &backend));
        tracing::info!(client = id, "joined");
        self.state.changed.notify_waiters();
        Ok(())
    }

    fn ready(&mut self, id: u64, counts: Vec<usize>) -> Result<(), Refusal> {
        let classes = self.state.model.num_classes;
        if counts.len() != classes {
            return Err(refuse(
                ErrorCode::Data,
                format!(
                    "label counts have {} classes, the model {classes}",
                    counts.len()
                ),
            ));
        }
        let plan = self.state.status().plan.clone();
        let mut clients = self.state.clients();
        let Some(entry) = clients.get_mut(&id) else {
            return Ok(());
        };
        if entry.plan_sent {
            entry.counts = Some(counts);
        } else {
            entry.raw_counts = Some(counts.clone());
            match plan {
                Some(ratios) => {
                    entry.plan_sent = true;
                    entry.send(&ServerMessage::Plan {
                        ratios,
                        seed: self.state.config.seed ^ id,
                    });
                }
                None => entry.counts = Some(counts),
            }
        }
        drop(clients);
        self.state.changed.notify_waiters();
        Ok(())
    }

    /// Handles a binary frame: the next chunk of an announced update.
    fn on_binary(&mut self, frame: &[u8]) -> Result<bool, Refusal> {
        let Some((_, assembler)) = self.incoming.as_mut() else {
            return Err(refuse(
                ErrorCode::Unexpected,
                "binary frame without an update",
            ));
        };
        let weights = match assembler.push(frame) {
            Ok(None) => return Ok(true),
            Ok(Some(weights)) => weights,
            Err(e) => {
                let code = match e {
                    FrameError::NonFinite { .. } => ErrorCode::NonFinite,
                    FrameError::TooLarge { .. } => ErrorCode::TooLarge,
                    _ => ErrorCode::Shape,
                };
                return Err(refuse(code, format!("update rejected: {e}")));
            }
        };
        let (update, _) = self.incoming.take().expect("an update is in flight");
        let id = self.id.expect("updates come after join");
        let mut clients = self.state.clients();
        let Some(entry) = clients.get_mut(&id) else {
            return Ok(true);
        };
        // A reply for an old round or hop is ignored.
        match entry.pending.take() {
            Some(p) if (p.round, p.hop) == (update.round, update.hop) => {
                let norm = delta_norm(&weights, &p.sent);
                if let Err(median) = self
                    .state
                    .guard
                    .lock()
                    .expect("no panic in the guard")
                    .check(norm)
                {
                    // Dropping `p` fails the hop at once; the chain goes on.
                    return Err(refuse(
                        ErrorCode::Outlier,
                        format!(
                            "update rejected: it moved the weights by {norm:.3}, over 10x the median {median:.3} of recent updates"
                        ),
                    ));
                }
                entry.hops_done += 1;
                entry.samples_trained +=
                    update.samples * u64::from(self.state.config.epochs as u32);
                let _ = p.reply.send(HopReply {
                    weights,
                    samples: update.samples,
                    loss: update.loss,
                });
            }
            other => {
                entry.pending = other;
                tracing::debug!(
                    client = id,
                    round = update.round,
                    hop = update.hop,
                    "stale update ignored"
                );
            }
        }
        Ok(true)
    }
}

fn message_name(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::Join { .. } => "join",
        ClientMessage::Ready { .. } => "ready",
        ClientMessage::Progress { .. } => "progress",
        ClientMessage::Update(_) => "update",
        ClientMessage::Error { .. } => "error",
        ClientMessage::Leave => "leave",
    }
}
