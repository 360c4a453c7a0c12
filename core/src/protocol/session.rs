//! The client's side of the protocol as a state machine with no I/O: frames
//! go in, actions come out. The native client and the browser client both
//! drive it, so its logic is tested here once.

use super::PROTOCOL_VERSION;

use super::frames::{WeightAssembler, encode_chunks};
use super::messages::{
    AckOutcome, ClientMessage, DataSource, ErrorCode, ModelSpec, ServerMessage, ShardSpec,
    TaskSpec, UpdateSpec,
};
use crate::train::StepProgress;

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientAction {
    /// Send a text frame.
    Send(ClientMessage),
    /// Send these binary frames, in order.
    SendBinary(Vec<Vec<u8>>),
    /// Load this demo shard, then call [`ClientSession::data_ready`] with its counts.
    LoadShard(ShardSpec),
    /// Apply this plan to the local data, then call [`ClientSession::data_ready`].
    ApplyPlan {
        /// R[y] per class.
        ratios: Vec<f64>,
        /// Seed for the augmentation draws.
        seed: u64,
    },
    /// Train on local data from these weights, then call [`ClientSession::trained`].
    Train {
        /// The task.
        task: TaskSpec,
        /// The weights to start from.
        weights: Vec<f32>,
    },
    /// A round finished (for display).
    RoundDone {
        /// Round number.
        round: u32,
        /// Test accuracy.
        accuracy: f64,
        /// Under client-level DP, the model's epsilon spent so far.
        epsilon: Option<f64>,
        /// The run's last round: the run is over (the client may leave).
        last: bool,
    },
    /// The server said what became of an update (for display and logs).
    Acknowledged {
        /// Round of the update.
        round: u32,
        /// Hop of the update.
        hop: u32,
        /// Whether it was taken.
        outcome: AckOutcome,
        /// Why not, when it was not.
        reason: Option<String>,
    },
    /// Close the connection: the server refused us or broke the protocol.
    Close(String),
}

/// Where the session stands.
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Join sent, waiting for the welcome.
    Joining,
    /// Welcomed; training or waiting for a task.
    Member,
    /// A task header arrived; its weight chunks are coming.
    Receiving(TaskSpec),
    /// Closed.
    Closed,
}

/// The client's protocol state.
#[derive(Debug)]
pub struct ClientSession {
    state: State,
    model: Option<ModelSpec>,
    client_id: Option<u64>,
    assembler: Option<WeightAssembler>,
    max_frame_bytes: usize,
    resume: Option<String>,
    /// Label privacy: the per-report epsilon the server asked for.
    label_epsilon: Option<f64>,
    /// The first (noisy) count report, under label privacy.
    noisy_counts: Option<Vec<usize>>,
    /// The plan's ratios, once a plan came.
    ratios: Option<Vec<f64>>,
    /// Samples in the last count report.
    reported_samples: Option<u64>,
    /// The true counts behind the first noisy report.
    exact_counts: Option<Vec<usize>>,
    /// An earlier session's (true counts, noisy report), reused when the
    /// counts are the same: a reload does not spend epsilon again.
    earlier_report: Option<(Vec<usize>, Vec<usize>)>,
    label_epsilon_spent: f64,
    /// Secure aggregation: this round's masker, once a `secure-setup` came.
    masker: Option<(u32, crate::secagg::Masker)>,
    /// The welcome said the run sums results under secure aggregation.
    secure_aggregation: bool,
    /// The welcome's `privacy.model`: client-level DP on the model.
    model_privacy: Option<super::messages::ModelPrivacySpec>,
    /// The weights a masked hop under `task.secure_clip` started from, to
    /// clip its update against.
    hop_input: Option<Vec<f32>>,
    /// Pace steering: the latest window the server asked returning
    /// clients to spread over (`pace`), in milliseconds.
    rejoin_within_ms: Option<u64>,
}

impl ClientSession {
    /// Starts a session as a new client; the returned actions send the join.
    pub fn start(
        backend: &str,
        speed: Option<f64>,
        data: DataSource,
        max_frame_bytes: usize,
    ) -> (Self, Vec<ClientAction>) {
        Self::resuming(backend, speed, data, max_frame_bytes, None)
    }

    /// Starts a session that asks to be the client of an earlier session
    /// again ([`ClientSession::resume_token`] of that one); `None` joins as a
    /// new client. A server that no longer knows the token welcomes a new
    /// client.
    pub fn resuming(
        backend: &str,
        speed: Option<f64>,
        data: DataSource,
        max_frame_bytes: usize,
        resume: Option<String>,
    ) -> (Self, Vec<ClientAction>) {
        let join = ClientMessage::Join {
            version: PROTOCOL_VERSION,
            backend: backend.to_string(),
            speed,
            data,
            resume: resume.clone(),
        };
        let session = Self {
            state: State::Joining,
            model: None,
            client_id: None,
            assembler: None,
            max_frame_bytes,
            resume,
            label_epsilon: None,
            noisy_counts: None,
            ratios: None,
            reported_samples: None,
            exact_counts: None,
            earlier_report: None,
            label_epsilon_spent: 0.0,
            masker: None,
            secure_aggregation: false,
            model_privacy: None,
            hop_input: None,
            rejoin_within_ms: None,
        };
        (session, vec![ClientAction::Send(join)])
    }

    /// The token to resume this client with after a reconnect: the one the
    /// welcome gave (or the one this session was started with).
    pub fn resume_token(&self) -> Option<&str> {
        self.resume.as_deref()
    }

    /// The latest window (milliseconds) the server asked its clients to
    /// spread coming back over after losing it (`welcome` or
    /// `round-done`); `None` until it said one. For
    /// [`super::pace::rejoin_delay`].
    pub fn rejoin_within_ms(&self) -> Option<u64> {
        self.rejoin_within_ms
    }

    /// Whether the server welcomed this session (it held a session: a
    /// client's back-off starts again).
    pub fn welcomed(&self) -> bool {
        self.client_id.is_some()
    }

    /// The id the server gave us, once welcomed.
    pub fn client_id(&self) -> Option<u64> {
        self.client_id
    }

    /// The model announced by the server, once welcomed.
    pub fn model(&self) -> Option<&ModelSpec> {
        self.model.as_ref()
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    fn fail(&mut self, code: ErrorCode, mut message: String) -> Vec<ClientAction> {
        self.state = State::Closed;
        // The server refuses longer messages; cut at a character boundary.
        if message.len() > super::limits::MAX_MESSAGE_BYTES {
            let mut end = super::limits::MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        vec![
            ClientAction::Send(ClientMessage::Error {
                code,
                message: message.clone(),
            }),
            ClientAction::Close(message),
        ]
    }

    /// Handles a text frame from the server.
    pub fn on_text(&mut self, text: &str) -> Vec<ClientAction> {
        // A closed session says nothing more, whatever arrives.
        if self.is_closed() {
            return vec![];
        }
        let message = match ServerMessage::from_json(text) {
            Ok(m) => m,
            Err(e) => {
                return self.fail(
                    ErrorCode::Malformed,
                    format!("malformed server message: {e}"),
                );
            }
        };
        match (&self.state, message) {
            (_, ServerMessage::Error { code, message }) => {
                self.state = State::Closed;
                vec![ClientAction::Close(format!(
                    "server error ({code:?}): {message}"
                ))]
            }
            (
                State::Joining,
                ServerMessage::Welcome {
                    version,
                    client_id,
                    model,
                    shard,
                    resume,
                    privacy,
                    rejoin_within_ms,
                },
            ) => {
                if resume.is_some() {
                    self.resume = resume;
                }
                if rejoin_within_ms.is_some() {
                    self.rejoin_within_ms = rejoin_within_ms;
                }
                if version != PROTOCOL_VERSION {
                    return self.fail(
                        ErrorCode::Version,
                        format!("server speaks protocol {version}, this client {PROTOCOL_VERSION}"),
                    );
                }
                if let Some(epsilon) = privacy.as_ref().and_then(|p| p.label_epsilon)
                    && !(epsilon.is_finite() && epsilon > 0.0)
                {
                    return self.fail(
                        ErrorCode::Invalid,
                        format!("label epsilon {epsilon} is not a positive finite number"),
                    );
                }
                self.secure_aggregation = privacy.as_ref().is_some_and(|p| p.secure_aggregation);
                self.model_privacy = privacy.as_ref().and_then(|p| p.model);
                self.label_epsilon = privacy.and_then(|p| p.label_epsilon);
                self.client_id = Some(client_id);
                self.model = Some(model);
                self.state = State::Member;
                shard.map(ClientAction::LoadShard).into_iter().collect()
            }
            (State::Member, ServerMessage::Plan { ratios, seed }) => {
                self.ratios = Some(ratios.clone());
                vec![ClientAction::ApplyPlan { ratios, seed }]
            }
            (State::Member, ServerMessage::Task(task)) => {
                let params = self.model.as_ref().map_or(0, |m| m.params);
                self.assembler = Some(WeightAssembler::new(
                    task.round,
                    task.hop,
                    task.chunks,
                    params,
                    task.encoding,
                    self.max_frame_bytes,
                ));
                self.state = State::Receiving(task);
                vec![]
            }
            (
                _,
                ServerMessage::RoundDone {
                    round,
                    accuracy,
                    epsilon,
                    rejoin_within_ms,
                    last,
                    ..
                },
            ) => {
                if rejoin_within_ms.is_some() {
                    self.rejoin_within_ms = rejoin_within_ms;
                }
                vec![ClientAction::RoundDone {
                    round,
                    accuracy,
                    epsilon,
                    last,
                }]
            }
            // Secure aggregation runs beside the chain: its messages may
            // come between a task and its weights.
            (
                State::Member | State::Receiving(_),
                message @ (ServerMessage::SecureSetup { .. }
                | ServerMessage::SecureRoster { .. }
                | ServerMessage::SecureInbox { .. }
                | ServerMessage::SecureUnmask { .. }),
            ) => self.on_secure(message),
            (
                State::Member | State::Receiving(_),
                ServerMessage::Ack {
                    round,
                    hop,
                    outcome,
                    reason,
                },
            ) => vec![ClientAction::Acknowledged {
                round,
                hop,
                outcome,
                reason,
            }],
            (state, message) => self.fail(
                ErrorCode::Unexpected,
                format!("unexpected {message:?} while {state:?}"),
            ),
        }
    }

    /// A step of secure aggregation (`crate::secagg`): the masker's answer.
    fn on_secure(&mut self, message: ServerMessage) -> Vec<ClientAction> {
        use crate::secagg::{Masker, SecAggParams};
        let round = match &message {
            ServerMessage::SecureSetup { round, .. }
            | ServerMessage::SecureRoster { round, .. }
            | ServerMessage::SecureInbox { round, .. }
            | ServerMessage::SecureUnmask { round, .. } => *round,
            _ => return vec![],
        };
        if let ServerMessage::SecureSetup {
            slot,
            maskers,
            threshold,
            ..
        } = message
        {
            // The guarantees (no result unmasked by a lying server, the
            // collusion bound) need a majority threshold or more (a larger
            // one takes more colluders: `--secure-quorum`).
            let outcome = if threshold < maskers / 2 + 1 {
                Err(crate::secagg::SecAggError::Parameters { maskers, threshold })
            } else {
                SecAggParams::new(round, maskers, threshold)
                    .and_then(|params| Masker::from_entropy(params, slot))
            };
            return match outcome {
                Ok(masker) => {
                    let keys = masker.keys();
                    self.masker = Some((round, masker));
                    vec![ClientAction::Send(ClientMessage::SecureKeys {
                        round,
                        keys,
                    })]
                }
                Err(e) => self.drop_out(round, e.to_string()),
            };
        }
        let masker = match &mut self.masker {
            Some((r, masker)) if *r == round => masker,
            // A late step of an earlier round: nothing to say.
            Some((r, _)) if *r > round => return vec![],
            // No keys for this round (a reconnect since its setup): say so,
            // so the server need not wait for this masker.
            _ => return self.drop_out(round, "no keys for this round".into()),
        };
        let outcome = match message {
            ServerMessage::SecureRoster { keys, .. } => masker.share_keys(&keys).map(|shares| {
                vec![ClientAction::Send(ClientMessage::SecureShares {
                    round,
                    shares,
                })]
            }),
            // Shares that do not check out are left out (their senders
            // still count as sharers, see `Masker::receive_shares`).
            ServerMessage::SecureInbox { shares, .. } => {
                masker.receive_shares(&shares).map(|_| vec![])
            }
            ServerMessage::SecureUnmask {
                survivors, dropped, ..
            } => masker.reveal(&survivors, &dropped).map(|shares| {
                vec![ClientAction::Send(ClientMessage::SecureReveal {
                    round,
                    shares,
                })]
            }),
            _ => Ok(vec![]),
        };
        outcome.unwrap_or_else(|e| self.drop_out(round, e.to_string()))
    }

    /// A step that does not check out (too few sharers, a server asking
    /// for too much, no keys) is not answered: this client drops out of
    /// the round's secure aggregation, says why (`error` `invalid`) and
    /// stays connected. Its masked hop, if one comes, is given up.
    fn drop_out(&mut self, round: u32, reason: String) -> Vec<ClientAction> {
        self.masker = None;
        vec![ClientAction::Send(ClientMessage::Error {
            code: ErrorCode::Invalid,
            message: format!("secure aggregation, round {round}: {reason}"),
        })]
    }

    /// Handles a binary frame from the server.
    pub fn on_binary(&mut self, frame: &[u8]) -> Vec<ClientAction> {
        if self.is_closed() {
            return vec![];
        }
        let State::Receiving(task) = &self.state else {
            return self.fail(ErrorCode::Unexpected, "binary frame without a task".into());
        };
        let task = task.clone();
        let assembler = self.assembler.as_mut().expect("receiving has an assembler");
        match assembler.push(frame) {
            Ok(None) => vec![],
            Ok(Some(weights)) => {
                self.assembler = None;
                self.state = State::Member;
                self.hop_input = task.secure_clip.is_some().then(|| weights.clone());
                // The first heartbeat of the hop: the weights arrived and
                // training starts.
                vec![
                    ClientAction::Send(starting_progress(&task)),
                    ClientAction::Train { task, weights },
                ]
            }
            Err(e) => self.fail(ErrorCode::Shape, format!("task weights: {e}")),
        }
    }

    /// The local data is loaded or re-planned: report its label counts.
    ///
    /// When the server's welcome asked for label privacy
    /// (`privacy.label_epsilon`), the first report carries the counts with
    /// discrete Laplace noise for that epsilon (`crate::privacy`), and the
    /// report after the plan is the plan applied to that noisy report
    /// ([`crate::privacy::planned_counts`]), which spends nothing more.
    pub fn data_ready(&mut self, counts: Vec<usize>) -> Vec<ClientAction> {
        if self.is_closed() {
            return vec![];
        }
        let counts = match (self.label_epsilon, &self.noisy_counts, &self.ratios) {
            (None, _, _) => counts,
            (Some(_), Some(noisy), Some(ratios)) => crate::privacy::planned_counts(noisy, ratios),
            // The same data as an earlier session's noisy report: the
            // same report again (a fresh draw would spend epsilon again).
            (Some(_), _, _)
                if self.earlier_report.as_ref().is_some_and(|(exact, noisy)| {
                    *exact == counts && noisy.len() == counts.len()
                }) =>
            {
                let (exact, noisy) = self.earlier_report.take().expect("checked above");
                self.exact_counts = Some(exact);
                self.noisy_counts = Some(noisy.clone());
                noisy
            }
            (Some(epsilon), _, _) => match crate::privacy::noisy_counts(&counts, epsilon) {
                Ok(noisy) => {
                    self.label_epsilon_spent += epsilon;
                    self.exact_counts = Some(counts);
                    self.noisy_counts = Some(noisy.clone());
                    noisy
                }
                Err(e) => return self.fail(ErrorCode::Data, format!("label privacy: {e}")),
            },
        };
        self.reported_samples = Some(
            counts
                .iter()
                .fold(0u64, |total, &c| total.saturating_add(c as u64)),
        );
        vec![ClientAction::Send(ClientMessage::Ready { counts })]
    }

    /// This session's first noisy report and the true counts behind it, to
    /// keep where the client keeps its resume token (the tab: in
    /// `sessionStorage`) and give to [`ClientSession::reuse_label_report`]
    /// after a reload. `None` without label privacy.
    pub fn label_report(&self) -> Option<(Vec<usize>, Vec<usize>)> {
        Some((self.exact_counts.clone()?, self.noisy_counts.clone()?))
    }

    /// Reports `noisy` again, instead of a fresh draw, if this session's
    /// first counts are `exact` (an earlier session's
    /// [`ClientSession::label_report`]): re-reporting the same noisy counts
    /// for the same data spends nothing, a new draw would spend epsilon
    /// again. Call before the data is ready.
    pub fn reuse_label_report(&mut self, exact: Vec<usize>, noisy: Vec<usize>) {
        self.earlier_report = Some((exact, noisy));
    }

    /// The label epsilon this session's count reports have spent (0 without
    /// label privacy): the per-report epsilon times the noisy reports made.
    pub fn label_epsilon_spent(&self) -> f64 {
        self.label_epsilon_spent
    }

    /// Whether the run sums the mediators' results under secure aggregation
    /// (the welcome's `privacy.secure_aggregation`).
    pub fn secure_aggregation(&self) -> bool {
        self.secure_aggregation
    }

    /// Client-level DP on the model, as the welcome announced it.
    pub fn model_privacy(&self) -> Option<super::messages::ModelPrivacySpec> {
        self.model_privacy
    }

    /// The per-report label epsilon the server asked for, once welcomed.
    pub fn label_epsilon(&self) -> Option<f64> {
        self.label_epsilon
    }

    /// A task finished: send the update header, then its weights.
    pub fn trained(
        &mut self,
        task: &TaskSpec,
        weights: &[f32],
        samples: u64,
        loss: f64,
        seconds: f64,
    ) -> Vec<ClientAction> {
        if self.is_closed() {
            return vec![];
        }
        // Under secure aggregation a chain's last hop answers masked; a
        // last hop the server did not ask to be masked is given up rather
        // than answered in the clear (the welcome promised the sum only).
        let masked;
        let last_hop = task
            .place
            .is_some_and(|p| p.pass == p.passes && p.position == p.members);
        if self.secure_aggregation && task.secure_weight.is_none() && last_hop {
            return vec![ClientAction::Send(ClientMessage::Error {
                code: ErrorCode::Unexpected,
                message: format!(
                    "round {}: a chain's last hop in the clear under secure aggregation, given up",
                    task.round
                ),
            })];
        }
        let (weights, encoding) = match task.secure_weight {
            None => (weights, task.encoding),
            Some(weight) => {
                let masker = self
                    .masker
                    .as_ref()
                    .filter(|(round, _)| *round == task.round)
                    .map(|(_, m)| m);
                // Without this round's keys (it dropped out of the exchange,
                // or reconnected since) the hop is given up, never answered
                // in the clear; the server skips it at once.
                // Under client-level DP the hop's update is clipped first
                // (the server clipped the chain before it); a clip that
                // cannot be applied gives the hop up, never masks it whole.
                // Under distributed DP it adds its share of the round's
                // noise too, so the server never holds the noise.
                // And under the DP the welcome announced, the server is held
                // to it: a task that asks for less is given up.
                let announced = match (self.model_privacy, masker) {
                    (Some(dp), Some(masker)) => check_announced_dp(
                        &dp,
                        masker.params(),
                        weight,
                        task.secure_clip,
                        task.secure_noise,
                    ),
                    _ => Ok(()),
                };
                let clipped = match (announced, task.secure_clip, task.secure_noise) {
                    (Err(e), _, _) => Err(e),
                    (Ok(()), None, None) => Ok(None),
                    (Ok(()), None, Some(_)) => Err("secure_noise without secure_clip".into()),
                    (Ok(()), Some(clip), noise) => match self.hop_input.take() {
                        Some(input) => {
                            let mut clipped = weights.to_vec();
                            // Entropy only for noise: a clip draws nothing.
                            let rng = match noise {
                                Some(_) => crate::privacy::entropy_rng().map_err(|e| e.to_string()),
                                None => Ok(rand::SeedableRng::seed_from_u64(0)),
                            };
                            rng.and_then(|mut rng: rand::rngs::StdRng| {
                                crate::privacy::private_masked_hop(
                                    &input,
                                    &mut clipped,
                                    clip,
                                    noise,
                                    &mut rng,
                                )
                            })
                            .map(|()| Some(clipped))
                        }
                        None => Err("no received weights to clip the update against".into()),
                    },
                };
                let masked_values = match (masker, clipped) {
                    (_, Err(e)) => Err(e),
                    (Some(masker), Ok(clipped)) => masker
                        .mask(clipped.as_deref().unwrap_or(weights), weight)
                        .map_err(|e| e.to_string()),
                    (None, Ok(_)) => Err(format!(
                        "no secure-aggregation keys for round {}",
                        task.round
                    )),
                };
                match masked_values {
                    Ok(values) => masked = super::frames::masked_bits(&values),
                    Err(e) => {
                        return vec![ClientAction::Send(ClientMessage::Error {
                            code: ErrorCode::Unexpected,
                            message: format!("masked hop given up: {e}"),
                        })];
                    }
                }
                (masked.as_slice(), super::frames::WeightEncoding::Masked)
            }
        };
        let frames = encode_chunks(
            task.round,
            task.hop,
            weights,
            encoding,
            self.max_frame_bytes,
        );
        // Under label privacy the update claims the total of its last
        // (noisy) report: the exact number trained on would give the true
        // total away. Its weight is then as noisy as its counts.
        let samples = match (self.label_epsilon, self.reported_samples) {
            (Some(_), Some(reported)) => reported,
            _ => samples,
        };
        let update = UpdateSpec {
            round: task.round,
            hop: task.hop,
            samples,
            loss,
            seconds,
            encoding,
            chunks: frames.len() as u32,
        };
        vec![
            ClientAction::Send(ClientMessage::Update(update)),
            ClientAction::SendBinary(frames),
        ]
    }
}

/// The `progress` message for `task` after `step`: batches done over the
/// whole hop (all epochs, this step included) out of the hop's total. A
/// session sends one as the hop starts; the driver sends these after
/// steps, often enough to stay under `task.stall_ms` (every second, say).
///
/// Progress goes out in thousandths of the hop (`total` 1,000), not in
/// batches: batches times the batch size would tell the server how many
/// samples the client holds, which label privacy keeps noisy.
pub fn progress_message(task: &TaskSpec, step: &StepProgress) -> ClientMessage {
    let batches = step.epochs.saturating_mul(step.batches);
    let done = step
        .epoch
        .saturating_mul(step.batches)
        .saturating_add(step.batch)
        .saturating_add(1)
        .min(batches);
    let thousandths = if batches == 0 {
        0
    } else {
        (done as u128 * PROGRESS_SCALE as u128 / batches as u128) as usize
    };
    ClientMessage::Progress {
        round: task.round,
        hop: task.hop,
        done: thousandths,
        total: PROGRESS_SCALE,
    }
}

/// The `total` of every progress report: thousandths.
pub const PROGRESS_SCALE: usize = 1000;

/// The `progress` message a session sends as its client starts `task` (0
/// batches done; the total is not known yet, so 0).
fn starting_progress(task: &TaskSpec) -> ClientMessage {
    ClientMessage::Progress {
        round: task.round,
        hop: task.hop,
        done: 0,
        total: 0,
    }
}

/// Holds a masked hop's settings to the client-level DP the welcome
/// announced (`privacy.model`), so that a server cannot announce DP and
/// then ask a masker for less: the hop must be clipped (`secure_clip` at
/// most the announced C), weighted 1/n like every masker (`secure_weight`;
/// a server that weighted the others 0 would leave this result alone in
/// the mean), and under distributed DP noised at least as the announced
/// multiplier needs for the round's quorum t (`secure_noise >= z C /
/// sqrt(t)`, the least the round's share can be: the sensitivity is C or
/// 2C). Checks with a relative tolerance of 1e-9 for float rounding.
///
/// # Errors
/// A message saying which setting falls short.
fn check_announced_dp(
    announced: &super::messages::ModelPrivacySpec,
    params: crate::secagg::SecAggParams,
    weight: f64,
    clip: Option<f64>,
    noise: Option<f64>,
) -> Result<(), String> {
    const TOLERANCE: f64 = 1e-9;
    if !clip.is_some_and(|c| c <= announced.clip * (1.0 + TOLERANCE)) {
        return Err(format!(
            "the run announced DP with clip {}, the masked hop asks for clip {clip:?}",
            announced.clip
        ));
    }
    let uniform = 1.0 / f64::from(params.maskers.max(1));
    if (weight - uniform).abs() > uniform * TOLERANCE {
        return Err(format!(
            "the run announced DP, which weighs each of the {} maskers {uniform}; this hop is weighted {weight}",
            params.maskers
        ));
    }
    if announced.distributed {
        let least = crate::privacy::distributed_noise_share(
            announced.noise_multiplier * announced.clip,
            params.min_survivors(),
        );
        if !noise.is_some_and(|s| s >= least * (1.0 - TOLERANCE)) {
            return Err(format!(
                "the run announced distributed DP, which needs noise of at least {least} from each masker; the hop asks for {noise:?}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_masked_hop_asking_for_less_than_the_announced_dp_is_refused() {
        use super::super::messages::ModelPrivacySpec;
        // Prepare: announced clip 1, multiplier 2, distributed; 4 maskers,
        // quorum 3: each masker's noise at least 2 / sqrt(3).
        let announced = ModelPrivacySpec {
            clip: 1.0,
            noise_multiplier: 2.0,
            delta: 1e-5,
            budget: Some(8.0),
            distributed: true,
            spent: None,
        };
        let params = crate::secagg::SecAggParams::new(1, 4, 3).unwrap();
        let least = 2.0 / 3f64.sqrt();
        let check =
            |weight, clip, noise| check_announced_dp(&announced, params, weight, clip, noise);

        // Execute / assert: what the server sets passes (the share for a
        // sensitivity of 2C is twice the least), and so does more.
        assert_eq!(check(0.25, Some(0.1), Some(2.0 * least)), Ok(()));
        assert_eq!(check(0.25, Some(1.0), Some(least)), Ok(()));
        // Less noise, none, a larger clip, no clip, or a weight that is not
        // 1/n: refused.
        assert!(check(0.25, Some(0.1), Some(least * 0.99)).is_err());
        assert!(check(0.25, Some(0.1), None).is_err());
        assert!(check(0.25, Some(1.5), Some(least)).is_err());
        assert!(check(0.25, None, Some(least)).is_err());
        assert!(check(0.25, Some(f64::NAN), Some(least)).is_err());
        assert!(check(0.9, Some(0.1), Some(least)).is_err());
        assert!(check(0.0, Some(0.1), Some(least)).is_err());
        // Central DP asks for no noise from the masker.
        let central = ModelPrivacySpec {
            distributed: false,
            ..announced
        };
        assert_eq!(
            check_announced_dp(&central, params, 0.25, Some(0.5), None),
            Ok(())
        );
    }
    use crate::protocol::frames::WeightEncoding;

    fn welcome(shard: Option<ShardSpec>) -> String {
        ServerMessage::Welcome {
            version: PROTOCOL_VERSION,
            client_id: 9,
            model: ModelSpec {
                num_classes: 2,
                channels: 1,
                height: 28,
                width: 28,
                params: 5,
            },
            shard,
            resume: None,
            privacy: None,
            rejoin_within_ms: Some(3000),
        }
        .to_json()
    }

    #[test]
    fn a_session_keeps_the_latest_window_its_server_asked_for() {
        let (mut session, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
        assert_eq!(
            (session.rejoin_within_ms(), session.welcomed()),
            (None, false)
        );
        session.on_text(&welcome(None));
        assert_eq!(
            (session.rejoin_within_ms(), session.welcomed()),
            (Some(3000), true)
        );
        let done = |window: Option<u64>| {
            ServerMessage::RoundDone {
                round: 1,
                accuracy: 0.5,
                loss: 1.0,
                epsilon: None,
                rejoin_within_ms: window,
                last: false,
            }
            .to_json()
        };
        session.on_text(&done(Some(9000)));
        assert_eq!(session.rejoin_within_ms(), Some(9000));
        // A server that says nothing leaves the last window in place.
        session.on_text(&done(None));
        assert_eq!(session.rejoin_within_ms(), Some(9000));
    }

    fn welcome_with_label_epsilon(epsilon: f64) -> String {
        let mut message = ServerMessage::from_json(&welcome(None)).unwrap();
        if let ServerMessage::Welcome { privacy, .. } = &mut message {
            *privacy = Some(super::super::messages::PrivacySpec {
                label_epsilon: Some(epsilon),
                ..Default::default()
            });
        }
        message.to_json()
    }

    /// The counts a `ready` action carries.
    fn ready_counts(actions: &[ClientAction]) -> Vec<usize> {
        match actions {
            [ClientAction::Send(ClientMessage::Ready { counts })] => counts.clone(),
            other => panic!("expected one ready, got {other:?}"),
        }
    }

    #[test]
    fn under_label_privacy_the_counts_leave_noisy_and_the_plan_adds_no_leak() {
        // Prepare: 20 sessions of a client holding [500, 0, 200] (own data),
        // the server asking for epsilon 0.5 per report.
        let mut first_reports = Vec::new();
        for _ in 0..20 {
            let (mut session, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
            session.on_text(&welcome_with_label_epsilon(0.5));

            // Execute: the first report; a plan; the report after it, from
            // (different) true post-plan counts.
            let first = ready_counts(&session.data_ready(vec![500, 0, 200]));
            session.on_text(
                &ServerMessage::Plan {
                    ratios: vec![1.0, 3.0, 0.5],
                    seed: 1,
                }
                .to_json(),
            );
            let second = ready_counts(&session.data_ready(vec![501, 0, 97]));

            // Assert: the second is the plan applied to the first, not the
            // data; an update claims no more than that report; one report
            // spent.
            assert_eq!(
                second,
                crate::privacy::planned_counts(&first, &[1.0, 3.0, 0.5])
            );
            let reported: u64 = second.iter().map(|&c| c as u64).sum();
            let actions = session.trained(&task(), &[0.0; 5], 10_000, 0.1, 1.0);
            let Some(ClientAction::Send(ClientMessage::Update(update))) = actions.first() else {
                panic!("no update: {actions:?}");
            };
            assert_eq!(update.samples, reported);
            assert_eq!(session.label_epsilon_spent(), 0.5);
            first_reports.push(first);
        }
        assert!(
            first_reports.iter().any(|r| r != &vec![500, 0, 200]),
            "twenty reports without noise"
        );
    }

    #[test]
    fn progress_is_sent_in_thousandths_not_in_batches() {
        // 3 of 7 batches of one epoch: the batch count would tell the
        // server the client's size.
        let step = StepProgress {
            epoch: 0,
            epochs: 1,
            batch: 2,
            batches: 7,
            loss: 0.5,
        };
        let ClientMessage::Progress { done, total, .. } = progress_message(&task(), &step) else {
            panic!("not a progress message");
        };
        assert_eq!((done, total), (428, 1000));
    }

    #[test]
    fn a_reloaded_client_with_the_same_data_reports_the_same_noise_and_spends_nothing() {
        // Prepare: a first session's noisy report of [40, 2, 9].
        let (mut first, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
        first.on_text(&welcome_with_label_epsilon(0.5));
        let reported = ready_counts(&first.data_ready(vec![40, 2, 9]));
        let (exact, noisy) = first.label_report().unwrap();

        // Execute: a second session (the reload) given it; a third whose
        // data changed.
        let (mut again, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
        again.on_text(&welcome_with_label_epsilon(0.5));
        again.reuse_label_report(exact.clone(), noisy.clone());
        let repeated = ready_counts(&again.data_ready(vec![40, 2, 9]));
        let (mut changed, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
        changed.on_text(&welcome_with_label_epsilon(0.5));
        changed.reuse_label_report(exact, noisy);
        changed.data_ready(vec![41, 2, 9]);

        // Assert
        assert_eq!(repeated, reported);
        assert_eq!(again.label_epsilon_spent(), 0.0);
        assert_eq!(changed.label_epsilon_spent(), 0.5);
    }

    #[test]
    fn a_welcome_asking_for_a_broken_epsilon_closes_the_session() {
        // (JSON has no infinity: serde_json writes it as null, no privacy asked.)
        for epsilon in [0.0, -1.0, -1e300] {
            let (mut session, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
            let actions = session.on_text(&welcome_with_label_epsilon(epsilon));
            assert!(session.is_closed(), "{epsilon}: {actions:?}");
        }
    }

    fn task() -> TaskSpec {
        TaskSpec {
            round: 3,
            hop: 1,
            epochs: 1,
            batch_size: 20,
            learning_rate: 1e-3,
            prox_mu: 0.0,
            deadline_ms: 1000,
            stall_ms: None,
            seed: 4,
            encoding: WeightEncoding::F32,
            chunks: 2,
            place: None,
            secure_weight: None,
            secure_clip: None,
            secure_noise: None,
        }
    }

    #[test]
    fn a_demo_client_joins_loads_its_shard_trains_and_answers() {
        // Prepare
        let (mut session, start) = ClientSession::start("flex", None, DataSource::Demo, 16 + 12);
        let shard = ShardSpec {
            dataset: "mnist".into(),
            indices: vec![4, 8],
        };

        // Execute
        let on_welcome = session.on_text(&welcome(Some(shard.clone())));
        let on_ready = session.data_ready(vec![1, 1]);
        let on_task = session.on_text(&ServerMessage::Task(task()).to_json());
        let frames = encode_chunks(3, 1, &[0.1, 0.2, 0.3, 0.4, 0.5], WeightEncoding::F32, 28);
        let first = session.on_binary(&frames[0]);
        let second = session.on_binary(&frames[1]);
        let answer = session.trained(&task(), &[1.0; 5], 2, 0.7, 0.1);

        // Assert
        assert!(matches!(
            &start[0],
            ClientAction::Send(ClientMessage::Join {
                version: PROTOCOL_VERSION,
                ..
            })
        ));
        assert_eq!(on_welcome, vec![ClientAction::LoadShard(shard)]);
        assert_eq!(session.client_id(), Some(9));
        assert_eq!(
            on_ready,
            vec![ClientAction::Send(ClientMessage::Ready {
                counts: vec![1, 1]
            })]
        );
        assert!(on_task.is_empty() && first.is_empty());
        assert_eq!(
            second,
            vec![
                ClientAction::Send(ClientMessage::Progress {
                    round: 3,
                    hop: 1,
                    done: 0,
                    total: 0
                }),
                ClientAction::Train {
                    task: task(),
                    weights: vec![0.1, 0.2, 0.3, 0.4, 0.5]
                }
            ]
        );
        let ClientAction::Send(ClientMessage::Update(update)) = &answer[0] else {
            panic!("{answer:?}")
        };
        assert_eq!(
            (update.round, update.hop, update.samples, update.chunks),
            (3, 1, 2, 2)
        );
        assert!(matches!(&answer[1], ClientAction::SendBinary(f) if f.len() == 2));
    }

    #[test]
    fn a_plan_asks_the_client_to_rebuild_its_data() {
        let (mut session, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
        session.on_text(&welcome(None));

        let actions = session.on_text(
            &ServerMessage::Plan {
                ratios: vec![1.0, 2.5],
                seed: 7,
            }
            .to_json(),
        );

        assert_eq!(
            actions,
            vec![ClientAction::ApplyPlan {
                ratios: vec![1.0, 2.5],
                seed: 7
            }]
        );
    }

    #[test]
    fn protocol_violations_close_the_session_with_an_error_frame() {
        let (mut garbage, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
        let (mut early, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
        let (mut refused, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);

        let garbage = garbage.on_text("{nope");
        let early = early.on_binary(&[0; 20]);
        let refused_actions = refused.on_text(
            &ServerMessage::Error {
                code: ErrorCode::Version,
                message: "old".into(),
            }
            .to_json(),
        );

        assert!(matches!(
            &garbage[0],
            ClientAction::Send(ClientMessage::Error {
                code: ErrorCode::Malformed,
                ..
            })
        ));
        assert!(matches!(garbage.last(), Some(ClientAction::Close(_))));
        assert!(matches!(
            &early[0],
            ClientAction::Send(ClientMessage::Error {
                code: ErrorCode::Unexpected,
                ..
            })
        ));
        assert!(
            matches!(refused_actions.as_slice(), [ClientAction::Close(m)] if m.contains("old"))
        );
        assert!(refused.is_closed());
    }

    /// The session answered with one `error` frame and nothing else: the
    /// step (a masked hop, a roster) is given up, not answered.
    fn given_up(actions: &[ClientAction]) -> bool {
        matches!(actions, [ClientAction::Send(ClientMessage::Error { .. })])
    }

    #[test]
    fn a_masker_takes_any_threshold_from_a_majority_to_all_and_refuses_less() {
        for (threshold, accepted) in [(2, false), (3, true), (4, true), (5, false)] {
            let (mut session, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
            session.on_text(&welcome(None));
            let setup = ServerMessage::SecureSetup {
                round: 1,
                slot: 1,
                maskers: 4,
                threshold,
            };
            let actions = session.on_text(&setup.to_json());
            let keys = matches!(
                &actions[..],
                [ClientAction::Send(ClientMessage::SecureKeys { .. })]
            );
            assert_eq!(keys, accepted, "threshold {threshold}: {actions:?}");
        }
    }

    #[test]
    fn a_masker_masks_its_last_hop_and_drops_out_of_a_round_it_cannot_check() {
        use crate::secagg::{Masker, SecAggParams};
        let (mut session, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
        session.on_text(&welcome(None));
        // Round 4: this client holds slot 1 of two; slot 2 is a masker
        // written here.
        let setup = ServerMessage::SecureSetup {
            round: 4,
            slot: 1,
            maskers: 2,
            threshold: 2,
        };
        let actions = session.on_text(&setup.to_json());
        let [ClientAction::Send(ClientMessage::SecureKeys { keys, .. })] = &actions[..] else {
            panic!("{actions:?}")
        };
        let keys = *keys;
        let params = SecAggParams::new(4, 2, 2).unwrap();
        let mut other = Masker::new(params, 2, [9; 32]).unwrap();
        let roster = vec![keys, other.keys()];
        let actions = session.on_text(
            &ServerMessage::SecureRoster {
                round: 4,
                keys: roster.clone(),
            }
            .to_json(),
        );
        let [ClientAction::Send(ClientMessage::SecureShares { shares, .. })] = &actions[..] else {
            panic!("{actions:?}")
        };
        let to_session = other.share_keys(&roster).unwrap();
        other.receive_shares(shares).unwrap();
        assert!(
            session
                .on_text(
                    &ServerMessage::SecureInbox {
                        round: 4,
                        shares: to_session
                    }
                    .to_json()
                )
                .is_empty()
        );
        // The masked hop answers in the masked encoding.
        let mut masked_task = task();
        masked_task.round = 4;
        masked_task.secure_weight = Some(0.5);
        let actions = session.trained(&masked_task, &[0.25; 5], 10, 0.1, 1.0);
        let ClientAction::Send(ClientMessage::Update(update)) = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(
            update.encoding,
            super::super::frames::WeightEncoding::Masked
        );
        // Under DP a clip it cannot apply (not a positive number, or no
        // received weights to clip against) gives the hop up: an unclipped
        // result never goes into the sum.
        for clip in [f64::NAN, 0.0, -1.0, 0.5] {
            let mut clipped_task = masked_task.clone();
            clipped_task.secure_clip = Some(clip);
            let actions = session.trained(&clipped_task, &[0.25; 5], 10, 0.1, 1.0);
            assert!(given_up(&actions), "clip {clip}: {actions:?}");
        }
        // So does distributed DP's noise without a clip to apply first.
        let mut noised_task = masked_task.clone();
        noised_task.secure_noise = Some(0.1);
        let actions = session.trained(&noised_task, &[0.25; 5], 10, 0.1, 1.0);
        assert!(given_up(&actions), "{actions:?}");

        // Round 5: a roster that leaves this client out is refused with an
        // error, the connection stays, and the masked hop is given up.
        let setup = ServerMessage::SecureSetup {
            round: 5,
            slot: 1,
            maskers: 2,
            threshold: 2,
        };
        session.on_text(&setup.to_json());
        let stranger = Masker::new(SecAggParams::new(5, 2, 2).unwrap(), 2, [3; 32]).unwrap();
        let actions = session.on_text(
            &ServerMessage::SecureRoster {
                round: 5,
                keys: vec![stranger.keys()],
            }
            .to_json(),
        );
        assert!(given_up(&actions), "{actions:?}");
        assert!(!session.is_closed());
        masked_task.round = 5;
        let actions = session.trained(&masked_task, &[0.25; 5], 10, 0.1, 1.0);
        assert!(given_up(&actions), "{actions:?}");
        assert!(!session.is_closed());
    }
}
