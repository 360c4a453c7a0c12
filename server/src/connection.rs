//! One client's WebSocket: a sender task drains the client's queue while
//! this task parses what arrives, checks it, and hands finished hops to the
//! coordinator. Anything malformed gets an error frame and the client is
//! dropped; the global model never sees it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use astraea_core::protocol::{
    AckOutcome, ClientMessage, DataSource, ErrorCode, FrameError, LifecycleReport, LifecycleState,
    PROTOCOL_VERSION, ServerMessage, ShardSpec, UpdateSpec, WeightAssembler, WeightEncoding,
    limits,
};
use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::state::{
    AppState, ClientEntry, HopAnswer, HopReply, MAX_PARKED, Outbound, Parked, RESUME_WINDOW, lock,
    new_resume_token,
};

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

/// How often the server pings a client's socket (every client answers by
/// itself: browsers and WebSocket libraries do).
pub const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// Serves one WebSocket until it closes, then forgets the client.
pub async fn handle_socket(socket: WebSocket, state: Arc<AppState>) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let counter = state.clone();
    let sender = tokio::spawn(async move {
        // A ping now and then: a proxy in front (deploy/nginx.conf) closes
        // a tunnel that carried nothing for its read timeout, and a client
        // between rounds may have nothing to say for longer.
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            let outbound = tokio::select! {
                outbound = rx.recv() => outbound,
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            let Some(outbound) = outbound else { break };
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
    // A connection ends refused, or as a departure: a close frame, a
    // leave, or a socket dropped without closing.
    let mut refused = false;
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
            Ok(Message::Close(_)) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => match socket_error(e) {
                // Oversized frames are refused by the socket before buffering.
                Some(refusal) => Err(refusal),
                // Anything else (a reset, a connection dropped without a
                // close frame) is the client leaving.
                None => Ok(false),
            },
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => break,
            Err(refusal) => {
                refused = true;
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
    if !refused {
        state.departures.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(id) = connection.id {
        // Kept a while, so that it can come back as itself — unless it was
        // refused: a refused client is forgotten, as the simulator drops
        // it for the run (it may join again, as a stranger). Its hop (if
        // any) is skipped at once as the pending reply is dropped.
        if refused {
            // A refused client's token brings nothing back from the run's
            // store either, whichever server it tries next (forgotten
            // before the client is, so no rejoin can come between).
            state.record(|store, run| store.forget_token(run, id));
        }
        let left = {
            let mut clients = state.clients();
            // Taken over by a resuming connection: the client is not ours.
            match clients.get(&id) {
                Some(entry) if entry.tx.same_channel(&connection.tx) => clients.remove(&id),
                _ => None,
            }
        };
        if let Some(mut entry) = left.filter(|_| !refused) {
            entry.pending = None;
            // Its socket's queue must go with the socket: a parked sender
            // would keep the writer task, and so the socket, open.
            entry.tx = tokio::sync::mpsc::unbounded_channel().0;
            let mut parked = lock(&state.parked);
            parked.retain(|_, p| p.since.elapsed() < RESUME_WINDOW);
            if parked.len() < MAX_PARKED {
                parked.insert(
                    entry.resume_token.clone(),
                    Parked {
                        id,
                        entry,
                        since: std::time::Instant::now(),
                    },
                );
            }
        }
        state.changed.notify_waiters();
        tracing::info!(client = id, "left");
    }
    drop(connection);
    let _ = tokio::time::timeout(Duration::from_secs(5), sender).await;
    if refused {
        // The closing handshake (RFC 6455, 7.1.1): read on until the
        // client's close, so that what it was still sending does not meet a
        // closed socket, whose reset would discard the error frame unread
        // on the client's side. Bounded: a refused client gets 2 s.
        let _ = tokio::time::timeout(LINGER, async {
            while let Some(Ok(frame)) = stream.next().await {
                if matches!(frame, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Gives up client `id`'s hop at once instead of waiting for its deadline
/// (the chain goes on without it), and takes it out of the round's secure
/// aggregation, so that no step waits for it.
fn give_up_hop(state: &AppState, id: u64) {
    if let Some(entry) = state.clients().get_mut(&id) {
        entry.pending = None;
    }
    if let Some(secure) = lock(&state.secure).clone() {
        secure.withdraw(id);
    }
}

/// A client's `POST /api/lifecycle`: the connected client holding the
/// report's token pauses (its hop is given up at once, it is not drawn
/// until it is active again or speaks) or is active again. Returns its id,
/// or `None` when no connected client holds the token.
pub fn on_lifecycle(state: &AppState, report: &LifecycleReport) -> Option<u64> {
    let id = {
        let mut clients = state.clients();
        let (&id, entry) = clients
            .iter_mut()
            .find(|(_, e)| crate::state::token_matches(&e.resume_token, &report.resume))?;
        entry.paused = report.state == LifecycleState::Paused;
        entry.paused_at = entry.paused.then(std::time::Instant::now);
        id
    };
    match report.state {
        LifecycleState::Paused => {
            give_up_hop(state, id);
            tracing::info!(client = id, "paused");
        }
        LifecycleState::Active => tracing::info!(client = id, "active again"),
    }
    state.changed.notify_waiters();
    Some(id)
}

/// How long the server keeps reading a refused client's socket for its
/// close frame before it drops the connection.
pub const LINGER: Duration = Duration::from_secs(2);

impl Connection {
    /// Handles a text frame; `Ok(false)` ends the connection quietly.
    fn on_text(&mut self, text: &str) -> Result<bool, Refusal> {
        if self.superseded() {
            return Ok(false);
        }
        self.spoke();
        let message = ClientMessage::from_json(text)
            .map_err(|e| refuse(ErrorCode::Malformed, format!("malformed message: {e}")))?;
        // The version first: a client of another version may break limits
        // it does not know, and should hear why it cannot join.
        if let ClientMessage::Join { version, .. } = &message
            && *version != PROTOCOL_VERSION
        {
            return Err(refuse(
                ErrorCode::Version,
                format!("client speaks protocol {version}, server {PROTOCOL_VERSION}"),
            ));
        }
        message.validate().map_err(|e| {
            refuse(
                ErrorCode::Invalid,
                format!("{} refused: {e}", message.kind()),
            )
        })?;
        match (self.id, message) {
            (
                None,
                ClientMessage::Join {
                    backend,
                    data,
                    speed,
                    resume,
                    ..
                },
            ) => {
                self.join(backend, speed, data, resume)?;
                Ok(true)
            }
            (Some(id), ClientMessage::Ready { counts }) => {
                self.ready(id, counts)?;
                Ok(true)
            }
            (Some(id), ClientMessage::Update(update)) => {
                self.announce(id, update)?;
                Ok(true)
            }
            (Some(id), ClientMessage::Progress { round, hop, .. }) => {
                self.alive(id, round, hop);
                Ok(true)
            }
            (Some(id), ClientMessage::Error { code, message }) => {
                tracing::warn!(client = id, ?code, "client reported: {message}");
                give_up_hop(&self.state, id);
                Ok(true)
            }
            (Some(id), ClientMessage::SecureKeys { round, keys }) => {
                self.secure(|s| s.on_keys(id, round, keys))?;
                Ok(true)
            }
            (Some(id), ClientMessage::SecureShares { round, shares }) => {
                self.secure(|s| s.on_shares(id, round, shares))?;
                Ok(true)
            }
            (Some(id), ClientMessage::SecureReveal { round, shares }) => {
                self.secure(|s| s.on_reveal(id, round, shares))?;
                Ok(true)
            }
            (_, ClientMessage::Leave) => Ok(false),
            (id, message) => Err(refuse(
                ErrorCode::Unexpected,
                format!(
                    "unexpected {} {}",
                    message.kind(),
                    if id.is_some() {
                        "after join"
                    } else {
                        "before join"
                    }
                ),
            )),
        }
    }

    fn join(
        &mut self,
        backend: String,
        speed: Option<f64>,
        data: DataSource,
        resume: Option<String>,
    ) -> Result<(), Refusal> {
        // A known token within its window: the same client again, with
        // its id, shard, counts and speed (its data must be of the same
        // kind: a demo client comes back as a demo client).
        // Its old connection may not have ended yet (a reloaded tab's new
        // socket can join before the old one's close arrives): the token
        // wins, the old connection is closed and its end leaves the client
        // alone ([`Connection::superseded`]). Either order ends the same.
        let live = resume.as_ref().and_then(|token| {
            let mut clients = self.state.clients();
            let (&id, entry) = clients
                .iter()
                .find(|(_, entry)| crate::state::token_matches(&entry.resume_token, token))?;
            if matches!(data, DataSource::Demo) != entry.shard_counts.is_some() {
                return None;
            }
            let entry = clients.remove(&id)?;
            let _ = entry.tx.send(Outbound::Close);
            tracing::info!(client = id, "taken over by a resuming connection");
            Some(Parked {
                id,
                entry,
                since: std::time::Instant::now(),
            })
        });
        let parked = live.or_else(|| {
            let token = resume.as_ref()?;
            let mut parked = lock(&self.state.parked);
            parked.retain(|_, p| p.since.elapsed() < RESUME_WINDOW);
            parked.remove(token)
        });
        if let Some(Parked { id, mut entry, .. }) = parked
            && matches!(data, DataSource::Demo) == entry.shard_counts.is_some()
        {
            // A hop still out at the old connection is skipped at once.
            entry.pending = None;
            entry.backend = backend.clone();
            entry.tx = self.tx.clone();
            // Joining again is running again.
            entry.paused = false;
            entry.paused_at = None;
            // It reloads its data and reports again, as at its first join
            // (and hears the plan again); until then it is not scheduled.
            entry.counts = None;
            entry.samples = 0;
            entry.plan_sent = false;
            // Any other server of the run still holding it lets it go.
            entry.moved = self.state.client_moved(id);
            let shard = entry.demo_slot.map(|slot| ShardSpec {
                dataset: self.state.config.dataset.clone(),
                indices: self.state.demo_shard(slot).clone(),
            });
            self.admit(id, entry, shard, data)?;
            tracing::info!(client = id, "resumed");
            return Ok(());
        }
        // A token this server did not give: one the run gave before a
        // restart, or on the server that led it before this one. The
        // client comes back as itself (its id, and its demo slot so its
        // shard), with its standing and speed to learn again.
        let stored = resume.as_ref().and_then(|token| {
            let (id, slot) = self.state.stored_client(token)?;
            (slot.is_some() == matches!(data, DataSource::Demo)).then(|| (id, slot, token.clone()))
        });
        let (id, stored_slot, token) = match stored {
            Some((id, slot, token)) => {
                // Two joins with one token: the later wins, as above.
                if let Some(old) = self.state.clients().remove(&id) {
                    let _ = old.tx.send(Outbound::Close);
                }
                (id, slot, Some(token))
            }
            None => (self.state.next_client_id(), None, None),
        };
        let (shard, shard_counts, demo_slot) = match data {
            DataSource::Demo if !self.state.shards.is_empty() => {
                let slot = stored_slot.unwrap_or_else(|| self.state.take_demo_slot(id));
                let indices = self.state.demo_shard(slot).clone();
                // The server knows what a demo shard holds: its reports are
                // checked against this.
                let mut counts = vec![0; self.state.model.num_classes];
                for &i in &indices {
                    if let Some(c) = counts.get_mut(self.state.train.labels[i] as usize) {
                        *c += 1;
                    }
                }
                let spec = ShardSpec {
                    dataset: self.state.config.dataset.clone(),
                    indices,
                };
                (Some(spec), Some(counts), Some(slot))
            }
            DataSource::Demo => {
                return Err(refuse(ErrorCode::Data, "this server has no demo shards"));
            }
            DataSource::Own { .. } => (None, None, None),
        };
        let mut entry = ClientEntry {
            backend: backend.clone(),
            tx: self.tx.clone(),
            raw_counts: None,
            shard_counts,
            demo_slot,
            // Resumed by a token of the run's store: any other server of
            // the run still holding it lets it go.
            moved: if token.is_some() {
                self.state.client_moved(id)
            } else {
                0
            },
            counts: None,
            samples: 0,
            plan_sent: false,
            pending: None,
            hops_done: 0,
            samples_trained: 0,
            standing: Default::default(),
            speed: None,
            resume_token: token.clone().unwrap_or_else(new_resume_token),
            silent: false,
            paused: false,
            paused_at: None,
        };
        // The join's speed (validated: finite, within the limits) is the
        // prior until the server has timed a hop of its own.
        if let Some(speed) = speed {
            entry.observe_speed(speed);
        }
        let (demo, new_token) = (entry.demo_slot, entry.resume_token.clone());
        if token.is_some() {
            self.admit(id, entry, shard, data)?;
            tracing::info!(client = id, "resumed by a token of the run's store");
            return Ok(());
        }
        // Recorded before its welcome hands the token out: a volunteer that
        // takes it straight to another server of the run is found there.
        self.state.record(|store, run| {
            let joined = crate::store::Joined {
                id,
                backend: &backend,
                demo,
                token: &new_token,
            };
            store.client_joined(run, &joined)
        });
        self.admit(id, entry, shard, data)?;
        tracing::info!(client = id, "joined");
        Ok(())
    }

    /// Welcomes client `id` (new or resumed) with its shard and resume
    /// token, registers `entry`, and takes the counts an own-data client
    /// may give with its join (or, an empty list, in its first `ready`).
    fn admit(
        &mut self,
        id: u64,
        entry: ClientEntry,
        shard: Option<ShardSpec>,
        data: DataSource,
    ) -> Result<(), Refusal> {
        let welcome = ServerMessage::Welcome {
            version: PROTOCOL_VERSION,
            client_id: id,
            model: self.state.model.clone(),
            shard,
            resume: Some(entry.resume_token.clone()),
            privacy: self.state.privacy_spec(),
            // This client is counted: it is about to be held.
            rejoin_within_ms: Some(self.state.rejoin_within_ms(1)),
        };
        // Sent under the clients' lock, with the client held before the
        // lock is let go: whatever the client does with its welcome (a
        // `POST /api/lifecycle` with its token, straight away) finds it
        // held, and nothing else is sent to it before its welcome.
        {
            let mut clients = self.state.clients();
            entry.send(&welcome);
            clients.insert(id, entry);
        }
        self.id = Some(id);
        // Under label privacy, counts sent before the welcome (which asks
        // for noise) are exact: they are dropped unused, and the client's
        // noisy `ready` is awaited.
        if let DataSource::Own { counts } = data
            && !counts.is_empty()
            && self.state.config.label_epsilon.is_none()
        {
            self.ready(id, counts)?;
        }
        self.state.changed.notify_waiters();
        Ok(())
    }

    /// A label-count report: the raw counts before the plan, post-plan
    /// counts after it. Refused when it claims more samples than the client
    /// can hold: its demo shard, or its first report, grown by the plan
    /// (`limits::planned_upper_bounds`), plus a small allowance for
    /// samples the volunteer adds.
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
        let samples = limits::checked_total(&counts)
            .map_err(|e| refuse(ErrorCode::Invalid, format!("ready refused: {e}")))?;
        let mut clients = self.state.clients();
        // Read under the clients' lock (clients before status, as
        // `coordinator::adopt_plan` takes them): a plan adopted after this
        // report is sent to it there.
        let plan = self.state.status().plan.clone();
        let Some(entry) = clients.get_mut(&id) else {
            return Ok(());
        };
        // What the client is known to hold before any plan.
        let known = entry.shard_counts.as_ref().or(entry.raw_counts.as_ref());
        if let Some(known) = known {
            let ratios = if entry.plan_sent {
                plan.as_deref()
            } else {
                None
            };
            let upper = limits::planned_upper_bounds(known, ratios);
            let excess = limits::excess_over(&counts, &upper);
            if excess > limits::ADDED_SAMPLES_ALLOWANCE {
                return Err(refuse(
                    ErrorCode::Data,
                    format!(
                        "label counts claim {excess} samples more than this client can hold (at most {} may be added)",
                        limits::ADDED_SAMPLES_ALLOWANCE
                    ),
                ));
            }
        }
        if entry.plan_sent {
            entry.counts = Some(counts);
            entry.samples = samples;
        } else {
            // The first report fixes what the client holds before the plan;
            // later ones are judged against it, so counts cannot creep up
            // report by report.
            if entry.raw_counts.is_none() {
                entry.raw_counts = Some(counts.clone());
            }
            match plan {
                Some(ratios) => {
                    entry.plan_sent = true;
                    entry.send(&ServerMessage::Plan {
                        ratios,
                        seed: astraea_core::engine::seeds::plan(self.state.config.seed, id),
                    });
                }
                None => {
                    entry.counts = Some(counts);
                    entry.samples = samples;
                }
            }
        }
        drop(clients);
        self.state.changed.notify_waiters();
        Ok(())
    }

    /// Hands a secure-aggregation message to the round's
    /// [`crate::secure::SecureRound`]; one that breaks its rules refuses
    /// the client, one that comes late (no secure round now, or another
    /// round) is dropped.
    fn secure(
        &self,
        step: impl FnOnce(&crate::secure::SecureRound) -> Result<(), String>,
    ) -> Result<(), Refusal> {
        let round = lock(&self.state.secure).clone();
        match round {
            Some(round) => step(&round).map_err(|e| refuse(ErrorCode::Unexpected, e)),
            None => Ok(()),
        }
    }

    /// Whether another connection has taken this one's client over (it
    /// resumed with the token while this one was still open): whatever
    /// this one still says is not the client's, and its end changes
    /// nothing.
    fn superseded(&self) -> bool {
        self.id.is_some_and(|id| {
            self.state
                .clients()
                .get(&id)
                .is_none_or(|entry| !entry.tx.same_channel(&self.tx))
        })
    }

    /// The client sent a frame: it is no longer silent (it may be drawn
    /// into mediators again).
    fn spoke(&self) {
        if let Some(id) = self.id
            && let Some(entry) = self.state.clients().get_mut(&id)
        {
            entry.silent = false;
            if entry
                .paused_at
                .is_some_and(|at| at.elapsed() >= crate::state::PAUSE_GRACE)
            {
                entry.paused = false;
                entry.paused_at = None;
            }
        }
    }

    /// Notes a sign of life for the hop (`round`, `hop`) if it is the one
    /// awaited from client `id`; any other is ignored.
    fn alive(&self, id: u64, round: u32, hop: u32) {
        if let Some(pending) = self
            .state
            .clients()
            .get_mut(&id)
            .and_then(|e| e.pending.as_mut())
            .filter(|p| (p.round, p.hop) == (round, hop))
        {
            pending.alive = std::time::Instant::now();
        }
    }

    /// An update's header: its weights follow as binary chunks.
    fn announce(&mut self, id: u64, update: UpdateSpec) -> Result<(), Refusal> {
        self.alive(id, update.round, update.hop);
        let params = self.state.model.params;
        {
            let clients = self.state.clients();
            let entry = clients.get(&id);
            let awaited = entry
                .and_then(|e| e.pending.as_ref())
                .map(|p| (p.round, p.hop));
            // A masked hop answers masked, and only a masked hop does.
            let masked = entry
                .and_then(|e| e.pending.as_ref())
                .filter(|p| (p.round, p.hop) == (update.round, update.hop))
                .map(|p| p.masked);
            if let Some(masked) = masked
                && masked != (update.encoding == WeightEncoding::Masked)
            {
                return Err(refuse(
                    ErrorCode::Shape,
                    format!(
                        "update in the {:?} encoding; the hop asked for {}",
                        update.encoding,
                        if masked { "a masked result" } else { "weights" }
                    ),
                ));
            }
            if let Some((previous, _)) = &self.incoming {
                // Chunks of an earlier update never finished. If its hop is
                // still awaited the client broke the protocol; otherwise the
                // hop was given up and its half is dropped, so the client
                // can answer its next task.
                if awaited == Some((previous.round, previous.hop)) {
                    return Err(refuse(
                        ErrorCode::Unexpected,
                        "update before the last one's weights",
                    ));
                }
                tracing::debug!(
                    client = id,
                    round = previous.round,
                    hop = previous.hop,
                    "unfinished update dropped"
                );
            }
            let holds = entry.map_or(0, |e| e.samples);
            if update.samples > holds {
                return Err(refuse(
                    ErrorCode::Data,
                    format!(
                        "update claims {} samples, the client reported {holds}",
                        update.samples
                    ),
                ));
            }
        }
        if update.chunks == 0 || update.chunks as usize > params.max(1) {
            return Err(refuse(
                ErrorCode::Shape,
                format!(
                    "update announces {} chunks for {params} weights",
                    update.chunks
                ),
            ));
        }
        let assembler = WeightAssembler::new(
            update.round,
            update.hop,
            update.chunks,
            params,
            update.encoding,
            self.state.config.max_frame_bytes,
        );
        self.incoming = Some((update, assembler));
        Ok(())
    }

    /// Tells the client what became of its update.
    fn acknowledge(&self, update: &UpdateSpec, outcome: AckOutcome, reason: Option<String>) {
        let ack = ServerMessage::Ack {
            round: update.round,
            hop: update.hop,
            outcome,
            reason,
        };
        let _ = self.tx.send(Outbound::Text(ack.to_json()));
    }

    /// Handles a binary frame: the next chunk of an announced update.
    fn on_binary(&mut self, frame: &[u8]) -> Result<bool, Refusal> {
        if self.superseded() {
            return Ok(false);
        }
        self.spoke();
        let Some((round, hop)) = self.incoming.as_ref().map(|(u, _)| (u.round, u.hop)) else {
            return Err(refuse(
                ErrorCode::Unexpected,
                "binary frame without an update",
            ));
        };
        if let Some(id) = self.id {
            self.alive(id, round, hop);
        }
        let Some((update, assembler)) = self.incoming.as_mut() else {
            return Ok(true);
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
                let reason = format!("update rejected: {e}");
                let update = update.clone();
                self.incoming = None;
                self.acknowledge(&update, AckOutcome::Refused, Some(reason.clone()));
                return Err(refuse(code, reason));
            }
        };
        let Some((update, _)) = self.incoming.take() else {
            return Ok(true);
        };
        let Some(id) = self.id else {
            return Ok(true);
        };
        let mut clients = self.state.clients();
        let Some(entry) = clients.get_mut(&id) else {
            return Ok(true);
        };
        // A reply for a hop no longer awaited is stale: dropped, said, kept
        // apart from refusals.
        let pending = match entry.pending.take() {
            Some(p) if (p.round, p.hop) == (update.round, update.hop) => p,
            other => {
                entry.pending = other;
                drop(clients);
                self.state.stale_updates.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    client = id,
                    round = update.round,
                    hop = update.hop,
                    "stale update dropped"
                );
                let detail = format!("client {id} round {} hop {}", update.round, update.hop);
                self.state
                    .record(|store, run| store.event(run, Some(update.round), "stale", &detail));
                self.acknowledge(
                    &update,
                    AckOutcome::Stale,
                    Some("the hop was no longer awaited (late, or the round moved on)".into()),
                );
                return Ok(true);
            }
        };
        // A masked result is no model: the guard cannot read it (the
        // secure sum is checked as a whole, `coordinator::close_round`).
        let checked = if pending.masked {
            Ok(())
        } else {
            self.state
                .guard
                .check_client(&pending.sent, &weights, id)
                .map(drop)
        };
        let answer = match checked {
            Ok(()) => {
                entry.hops_done = entry.hops_done.saturating_add(1);
                let trained = update
                    .samples
                    .saturating_mul(self.state.config.epochs as u64);
                entry.samples_trained = entry.samples_trained.saturating_add(trained);
                self.state
                    .train_samples
                    .fetch_add(trained, Ordering::Relaxed);
                HopAnswer::Update(HopReply {
                    weights,
                    samples: update.samples,
                    loss: update.loss,
                })
            }
            // Far above the median of recent hops: the hop is refused (the
            // chain acknowledges it) and the client kept.
            Err(refusal) if !refusal.drops_client() => {
                self.state.outlier_refusals.fetch_add(1, Ordering::Relaxed);
                HopAnswer::Refused(format!("update rejected: {refusal}"))
            }
            Err(refusal) => {
                // Dropping `pending` fails the hop at once; the chain goes
                // on. Non-finite values never get here (the frame checks
                // refuse them as `non-finite`); a finite value past the
                // bound, a move too far for the model, or a client whose
                // moves stand out again and again is an outlier.
                let code = ErrorCode::Outlier;
                let reason = format!("update rejected: {refusal}");
                self.acknowledge(&update, AckOutcome::Refused, Some(reason.clone()));
                return Err(refuse(code, reason));
            }
        };
        // The chain acknowledges it once judged (the loss rule comes
        // after these checks); a chain that has just given the hop up
        // makes it stale.
        let given_up = pending.reply.send(answer).is_err();
        drop(clients);
        if given_up {
            self.state.stale_updates.fetch_add(1, Ordering::Relaxed);
            self.acknowledge(
                &update,
                AckOutcome::Stale,
                Some("the hop was given up as it arrived".into()),
            );
        }
        Ok(true)
    }
}

/// The refusal a socket error deserves: only an oversized frame is the
/// client's fault; `None` for a connection that simply went away.
fn socket_error(error: axum::Error) -> Option<Refusal> {
    use tokio_tungstenite::tungstenite::Error;
    let inner = error.into_inner();
    match inner.downcast_ref::<Error>() {
        Some(Error::Capacity(e)) => {
            Some(refuse(ErrorCode::TooLarge, format!("frame refused: {e}")))
        }
        _ => {
            tracing::debug!("socket ended: {inner}");
            None
        }
    }
}
