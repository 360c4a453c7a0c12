//! JSON control messages. Every message is one text frame of the form
//! `{"type": "...", ...}`; weights announced by a message follow it as
//! binary frames.

use serde::{Deserialize, Serialize};

use super::frames::WeightEncoding;
use crate::model::ModelConfig;
use crate::secagg::{AdvertisedKeys, EncryptedShare, RevealedShare};

/// What a run does for its volunteers' privacy, as the welcome announces it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PrivacySpec {
    /// Report label counts with discrete Laplace noise of scale
    /// `1 / label_epsilon` per count (each report `label_epsilon`-DP for any
    /// one sample); the report after the plan is the plan applied to the
    /// noisy one. Absent: exact counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_epsilon: Option<f64>,
    /// The mediators' results are summed under secure aggregation
    /// (`crate::secagg`): a chain's last client sends its result masked,
    /// and the server learns only the round's weighted sum.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secure_aggregation: bool,
    /// The model is trained under client-level DP (DP-FedAvg over
    /// mediators): what the volunteer's page says of it. Absent: no DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelPrivacySpec>,
}

/// Client-level DP on the model, as the server announces it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelPrivacySpec {
    /// C: the most one mediator's (a FedAvg client's) update may move the
    /// model in a round, L2 norm (the first round's, under adaptive
    /// clipping).
    pub clip: f64,
    /// z: the Gaussian noise's standard deviation over the sum's
    /// sensitivity.
    pub noise_multiplier: f64,
    /// delta of the (epsilon, delta) guarantee.
    pub delta: f64,
    /// The epsilon at which the run stops; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<f64>,
    /// The noise is added by the chains' last clients in shares before
    /// masking (distributed DP, `task.secure_noise`), not by the server.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub distributed: bool,
    /// The epsilon the released models had spent when this was sent (a
    /// client joining mid-run); absent: none yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent: Option<f64>,
}

/// The model a federation trains, as the server announces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Output classes.
    pub num_classes: usize,
    /// Input channels.
    pub channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Parameters in the flat weight vector.
    pub params: usize,
}

impl ModelSpec {
    /// The spec of a model configuration with `params` parameters.
    pub fn new(config: &ModelConfig, params: usize) -> Self {
        Self {
            num_classes: config.num_classes,
            channels: config.channels,
            height: config.height,
            width: config.width,
            params,
        }
    }

    /// The model configuration this spec describes.
    pub fn config(&self) -> ModelConfig {
        ModelConfig::new(self.num_classes)
            .with_channels(self.channels)
            .with_height(self.height)
            .with_width(self.width)
    }
}

/// Where a client's training data comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DataSource {
    /// The client trains on its own data and reports its label counts.
    Own {
        /// Samples per class.
        counts: Vec<usize>,
    },
    /// Demo mode: the server assigns a shard of a dataset both sides know.
    Demo,
}

/// The shard of a named dataset the server assigns in demo mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardSpec {
    /// Dataset name (`mnist`, `fashion-mnist`, ...).
    pub dataset: String,
    /// Indices into the dataset's training set.
    pub indices: Vec<usize>,
}

/// One hop of training the server asks of a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Round number, from 1.
    pub round: u32,
    /// Hop within the round: position in the mediator's chain, over all passes.
    pub hop: u32,
    /// Local epochs (E).
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// FedProx proximal weight (0 for none).
    pub prox_mu: f64,
    /// Milliseconds the client has before the hop is skipped (the server
    /// sets it from the client's measured speed, within its bounds).
    pub deadline_ms: u64,
    /// Longest silence, in milliseconds, the server allows during the hop:
    /// a `progress` (or the update) must come within this time of the task
    /// and of each other, or the hop is skipped as stalled. Absent: no
    /// such rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_ms: Option<u64>,
    /// Seed for shuffling and dropout.
    pub seed: u64,
    /// Encoding of the weight chunks that follow.
    pub encoding: WeightEncoding,
    /// Number of binary chunks that follow.
    pub chunks: u32,
    /// Where this hop sits, for the volunteer's page; absent from servers
    /// that do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<ChainPlace>,
    /// Under secure aggregation, on a chain's last hop: the mediator's
    /// weight in the round's sum (its share of the round's samples, in
    /// `[0, 1]`). The client answers with its trained weights times this
    /// weight, masked (`encoding: masked`, `crate::secagg::Masker::mask`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_weight: Option<f64>,
    /// Under secure aggregation with client-level DP, on the masked hop:
    /// the most this hop may move the weights it received, L2 norm. The
    /// client clips its update to it before masking (the server cannot clip
    /// what it cannot see; it clipped the chain's earlier hops itself).
    /// Absent: no clipping. A value that is not a positive finite number
    /// makes the client give the hop up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_clip: Option<f64>,
    /// Under secure aggregation with distributed DP, on the masked hop
    /// (with `secure_clip`): the standard deviation of the Gaussian noise
    /// the client adds to every weight of its clipped result before
    /// masking, so that the server never holds the noise
    /// (`crate::privacy::distributed_noise_share`). Absent: none (the
    /// server adds the round's noise itself). A value that is not a finite
    /// number >= 0 makes the client give the hop up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_noise: Option<f64>,
}

/// A hop's place in its mediator's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPlace {
    /// The mediator, from 1, within the round.
    pub mediator: u32,
    /// Mediators in the round.
    pub mediators: u32,
    /// The client's position in the chain, from 1.
    pub position: u32,
    /// Clients in the chain.
    pub members: u32,
    /// The pass over the chain, from 1 (Astraea's E_m passes).
    pub pass: u32,
    /// Passes in all.
    pub passes: u32,
}

/// What a client sends back after a hop; its weights follow as chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateSpec {
    /// Round of the task answered.
    pub round: u32,
    /// Hop of the task answered.
    pub hop: u32,
    /// Training samples the client holds (counted once per hop).
    pub samples: u64,
    /// Mean training loss.
    pub loss: f64,
    /// Seconds the training took.
    pub seconds: f64,
    /// Encoding of the weight chunks that follow.
    pub encoding: WeightEncoding,
    /// Number of binary chunks that follow.
    pub chunks: u32,
}

/// Why a peer is refused or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The text frame is not a known message.
    Malformed,
    /// The protocol versions differ.
    Version,
    /// A frame came that the state does not allow.
    Unexpected,
    /// Weights of the wrong size or shape.
    Shape,
    /// Weights with NaN or infinity.
    NonFinite,
    /// Weights whose norm is far above the others'.
    Outlier,
    /// A frame above the size limit.
    TooLarge,
    /// The client's data does not fit the model, or it claims more
    /// samples than the server knows it holds.
    Data,
    /// A field lies outside the protocol's limits (`protocol::limits`).
    Invalid,
    /// The server takes clients on other machines only over TLS, and this
    /// connection is plain (`serve --allow-insecure` lifts the rule).
    Insecure,
    /// Anything else on the server's side.
    Internal,
}

/// What the server did with an update ([`ServerMessage::Ack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AckOutcome {
    /// The update passed every check and went on in its chain.
    Accepted,
    /// The update answered a hop that is no longer awaited (its deadline
    /// passed, or the round moved on); it was dropped, the connection stays.
    Stale,
    /// The update broke a rule; an `error` frame follows and the connection
    /// closes.
    Refused,
}

/// Messages a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClientMessage {
    /// First message: who the client is and what it trains on.
    Join {
        /// Protocol version the client speaks.
        version: u32,
        /// Compute backend (`flex`, `wgpu`, ...), for the dashboard.
        backend: String,
        /// Rough training speed in samples per second, if measured.
        speed: Option<f64>,
        /// Own data or a demo shard.
        data: DataSource,
        /// The `resume` token of an earlier welcome: a client that
        /// reconnects (a reloaded tab, a dropped network) gets its id, its
        /// shard and its counts back. Absent: a new client.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<String>,
    },
    /// The client's label counts after applying the current plan.
    Ready {
        /// Samples per class.
        counts: Vec<usize>,
    },
    /// Progress within a hop: the client's heartbeat (the server skips a
    /// hop silent for longer than `task.stall_ms`) and the dashboard's bar.
    Progress {
        /// Round.
        round: u32,
        /// Hop.
        hop: u32,
        /// Batches done.
        done: usize,
        /// Batches in the hop.
        total: usize,
    },
    /// A finished hop; weights follow.
    Update(UpdateSpec),
    /// The client gives up on a task or hit an error.
    Error {
        /// What kind.
        code: ErrorCode,
        /// Details.
        message: String,
    },
    /// The client leaves on purpose.
    Leave,
    /// Secure aggregation, step 1: a masker's public keys.
    SecureKeys {
        /// Round of the `secure-setup` answered.
        round: u32,
        /// Its keys, in its slot.
        keys: AdvertisedKeys,
    },
    /// Secure aggregation, step 2: one encrypted share for every other
    /// masker of the roster.
    SecureShares {
        /// Round.
        round: u32,
        /// The shares.
        shares: Vec<EncryptedShare>,
    },
    /// Secure aggregation, step 4: the shares `secure-unmask` asked for.
    SecureReveal {
        /// Round.
        round: u32,
        /// The shares.
        shares: Vec<RevealedShare>,
    },
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMessage {
    /// Answer to `join`.
    Welcome {
        /// Protocol version of the server.
        version: u32,
        /// The id the server gave the client.
        client_id: u64,
        /// The model.
        model: ModelSpec,
        /// The shard to load, in demo mode.
        shard: Option<ShardSpec>,
        /// A secret to send as `join.resume` when reconnecting, to be this
        /// client again (kept by the server for `RESUME_WINDOW`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<String>,
        /// What the run does for the volunteers' privacy; absent: nothing
        /// asked of the client (counts are reported exactly).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        privacy: Option<PrivacySpec>,
        /// Pace steering: milliseconds over which to spread coming back
        /// after losing this connection (`pace::rejoin_delay`); absent:
        /// the client's own back-off.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rejoin_within_ms: Option<u64>,
    },
    /// The augmentation plan to apply to local data (R per class), then
    /// answer with `ready`.
    Plan {
        /// R[y] per class.
        ratios: Vec<f64>,
        /// Seed for the client's augmentation draws.
        seed: u64,
    },
    /// A hop to train; the weights follow.
    Task(TaskSpec),
    /// A round finished.
    RoundDone {
        /// Round number.
        round: u32,
        /// Test accuracy of the new global model.
        accuracy: f64,
        /// Test loss.
        loss: f64,
        /// Under client-level DP: the epsilon (at the announced delta) the
        /// released models have spent so far. Absent: no DP.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epsilon: Option<f64>,
        /// Pace steering, as in `welcome`, for the server's clients now.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rejoin_within_ms: Option<u64>,
        /// The run's last round: it is over, no task will follow. Absent
        /// (false) otherwise.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        last: bool,
    },
    /// What became of an update: sent once its last chunk has been judged.
    Ack {
        /// Round of the update.
        round: u32,
        /// Hop of the update.
        hop: u32,
        /// Whether it was taken.
        outcome: AckOutcome,
        /// Why not, when it was not taken.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The peer did something wrong; the connection closes after it.
    Error {
        /// What kind.
        code: ErrorCode,
        /// Details.
        message: String,
    },
    /// Secure aggregation, step 1: the client is this round's masker in
    /// `slot` (the last client of mediator `slot`); answer `secure-keys`.
    SecureSetup {
        /// Round.
        round: u32,
        /// The masker's slot, `1..=maskers`.
        slot: u32,
        /// Maskers in the round.
        maskers: u32,
        /// Shares needed to rebuild a secret.
        threshold: u32,
    },
    /// Secure aggregation, step 2: every masker's keys; answer
    /// `secure-shares`.
    SecureRoster {
        /// Round.
        round: u32,
        /// The keys, one entry per masker that advertised.
        keys: Vec<AdvertisedKeys>,
    },
    /// Secure aggregation, step 2 delivered: the shares addressed to this
    /// masker, one from every other masker that shared.
    SecureInbox {
        /// Round.
        round: u32,
        /// The shares.
        shares: Vec<EncryptedShare>,
    },
    /// Secure aggregation, step 4: who sent a masked result (survivors)
    /// and who shared keys but did not (dropped); answer `secure-reveal`.
    SecureUnmask {
        /// Round.
        round: u32,
        /// Slots whose masked result arrived.
        survivors: Vec<u32>,
        /// Slots that shared keys and sent no result.
        dropped: Vec<u32>,
    },
}

/// What a client says of its own lifecycle, out of band: `POST
/// /api/lifecycle` with this JSON as the body (`docs/PROTOCOL.md`,
/// "Pausing"). A tab sends it with `navigator.sendBeacon` as the browser
/// freezes it, when its socket's worker may already be stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleReport {
    /// The client's `welcome.resume` token: who is speaking (at most
    /// [`super::limits::MAX_RESUME_BYTES`] bytes).
    pub resume: String,
    /// What it is about to be.
    pub state: LifecycleState,
}

/// A client's lifecycle state in a [`LifecycleReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LifecycleState {
    /// It may stop answering (its page is being frozen, its phone's
    /// screen locked): the server skips the hop it holds at once and does
    /// not draw it until it is active again or sends any frame.
    Paused,
    /// It is running again.
    Active,
}

impl LifecycleReport {
    /// Parses a request body (any content type: `sendBeacon` sends text).
    ///
    /// # Errors
    /// Not this JSON object.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("reports always serialise")
    }
}

impl ClientMessage {
    /// Its `type` tag on the wire. The match names every variant, so a new
    /// one does not compile until it has a tag here.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::Join { .. } => "join",
            ClientMessage::Ready { .. } => "ready",
            ClientMessage::Progress { .. } => "progress",
            ClientMessage::Update(_) => "update",
            ClientMessage::Error { .. } => "error",
            ClientMessage::Leave => "leave",
            ClientMessage::SecureKeys { .. } => "secure-keys",
            ClientMessage::SecureShares { .. } => "secure-shares",
            ClientMessage::SecureReveal { .. } => "secure-reveal",
        }
    }

    /// The JSON text frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("messages always serialise")
    }

    /// Parses a text frame.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

impl ServerMessage {
    /// Its `type` tag on the wire (see [`ClientMessage::kind`]).
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMessage::Welcome { .. } => "welcome",
            ServerMessage::Plan { .. } => "plan",
            ServerMessage::Task(_) => "task",
            ServerMessage::Ack { .. } => "ack",
            ServerMessage::RoundDone { .. } => "round-done",
            ServerMessage::Error { .. } => "error",
            ServerMessage::SecureSetup { .. } => "secure-setup",
            ServerMessage::SecureRoster { .. } => "secure-roster",
            ServerMessage::SecureInbox { .. } => "secure-inbox",
            ServerMessage::SecureUnmask { .. } => "secure-unmask",
        }
    }

    /// The JSON text frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("messages always serialise")
    }

    /// Parses a text frame.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_json_with_a_type_tag() {
        let join = ClientMessage::Join {
            version: 1,
            backend: "flex".into(),
            speed: Some(1200.0),
            data: DataSource::Own { counts: vec![3, 4] },
            resume: None,
        };
        let error = ServerMessage::Error {
            code: ErrorCode::NonFinite,
            message: "update has a non-finite value at index 3".into(),
        };

        let join_text = join.to_json();
        let error_text = error.to_json();

        assert!(
            join_text.starts_with(r#"{"type":"join","version":1"#),
            "{join_text}"
        );
        assert!(
            join_text.contains(r#""data":{"kind":"own","counts":[3,4]}"#),
            "{join_text}"
        );
        assert!(
            error_text.contains(r#""code":"non-finite""#),
            "{error_text}"
        );
        assert_eq!(ClientMessage::from_json(&join_text).unwrap(), join);
        assert_eq!(ServerMessage::from_json(&error_text).unwrap(), error);
    }

    #[test]
    fn unknown_and_malformed_messages_are_errors() {
        assert!(ClientMessage::from_json(r#"{"type":"teleport"}"#).is_err());
        assert!(ClientMessage::from_json("not json").is_err());
        assert!(ClientMessage::from_json(r#"{"type":"ready"}"#).is_err());
    }

    #[test]
    fn model_spec_gives_back_its_configuration() {
        let config = ModelConfig::new(47);
        let spec = ModelSpec::new(&config, 68_873);
        assert_eq!(spec.config(), config);
    }
}
