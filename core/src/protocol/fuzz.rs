//! Structure-aware fuzzing of the protocol's decoders, on stable Rust.
//!
//! Four targets, each a property checked on one input:
//!
//! - [`Target::ClientText`]: [`ClientMessage::from_json`], what the server
//!   parses from every client ([`check_client_text`]);
//! - [`Target::ServerText`]: [`ServerMessage::from_json`] ([`check_server_text`]);
//! - [`Target::Assembler`]: [`WeightAssembler`] fed a chunk sequence
//!   ([`check_assembler`]): it never yields a vector of the wrong length or
//!   with a non-finite value, a failed transfer stays failed, and valid,
//!   untouched chunks come back exactly;
//! - [`Target::Session`]: [`ClientSession`] fed server texts, weight frames
//!   and the driver's calls ([`check_session`]): a closed session stays
//!   closed and answers nothing, a call that closes it ends its actions
//!   with [`ClientAction::Close`], `Train` carries the announced number of
//!   finite weights, and what `trained` sends a receiver takes.
//!
//! No input may panic. Inputs are built from structured values (messages,
//! [`encode_chunks`] frames of a weight vector) and then, most of the time,
//! mutated: JSON values replaced, removed or retagged; bytes flipped, cut,
//! inserted or duplicated ([`Edit`]); frames dropped, duplicated, swapped,
//! spliced or given another header ([`FrameEdit`]). So they pass the
//! decoders' first checks and reach the later ones.
//!
//! Design decisions:
//!
//! - [`run`] draws from one seeded [`StdRng`], so a seed replays a run; the
//!   inputs go to the targets in turn.
//! - One set of generators: [`client_message`], [`server_message`],
//!   [`mutated_text`], [`garbage_text`], [`assembler_case`] and
//!   [`session_case`] build every input, for [`run`] (and `astraea bench
//!   fuzz`) and for the property tests (`core/tests/fuzz_protocol.rs`),
//!   which draw a seed per case and build it here.
//! - Each input runs under [`catch_unwind`] ([`FuzzReport::check`]); a
//!   property violation is an assertion, so it is caught and counted the
//!   same way as any other panic. The panic hook is left alone: a caught
//!   panic still prints the default hook's line on stderr.
//! - On wasm32 the crate builds with `panic = "abort"`, so there a crash ends
//!   the run instead of being counted; nothing here needs threads, I/O or
//!   clocks (the caller times [`run`]).
//! - An allocation failure aborts the process, which no `catch_unwind`
//!   stops: the targets must never reserve memory in proportion to a
//!   number a peer sends (a `welcome` announcing 2^40 parameters once did
//!   that). Such inputs are generated on purpose.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use half::f16;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::PROTOCOL_VERSION;
use super::frames::{HEADER_BYTES, WeightAssembler, WeightEncoding, chunk_count, encode_chunks};
use super::messages::{
    AckOutcome, ChainPlace, ClientMessage, DataSource, ErrorCode, ModelSpec, ServerMessage,
    ShardSpec, TaskSpec, UpdateSpec,
};
use super::session::{ClientAction, ClientSession};

/// Characters of [`FuzzReport::first_crash`] kept.
const CRASH_CHARS: usize = 4000;

/// What an input exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// [`ClientMessage::from_json`].
    ClientText,
    /// [`ServerMessage::from_json`].
    ServerText,
    /// [`WeightAssembler::push`] over a chunk sequence.
    Assembler,
    /// [`ClientSession`] over a sequence of frames and driver calls.
    Session,
}

impl Target {
    /// Every target, in the order [`run`] feeds them and
    /// [`FuzzReport::targets`] counts them.
    pub const ALL: [Target; 4] = [
        Target::ClientText,
        Target::ServerText,
        Target::Assembler,
        Target::Session,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::ClientText => "client-text",
            Target::ServerText => "server-text",
            Target::Assembler => "assembler",
            Target::Session => "session",
        }
    }
}

/// Inputs and crashes of one target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetCounts {
    /// Inputs run.
    pub inputs: u64,
    /// Inputs that panicked or broke a property.
    pub crashes: u64,
}

/// The outcome of a fuzzing run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FuzzReport {
    /// Inputs run, over all targets.
    pub inputs: u64,
    /// Inputs that panicked or broke a property.
    pub crashes: u64,
    /// The first crash: target, panic message and the input, debug-printed
    /// and cut to a few thousand characters.
    pub first_crash: Option<String>,
    /// Per target, in the order of [`Target::ALL`].
    pub targets: [TargetCounts; 4],
}

impl FuzzReport {
    /// The counts of one target.
    pub fn target(&self, target: Target) -> &TargetCounts {
        &self.targets[target as usize]
    }

    /// Runs `test` on `input`, counting it for `target`; a panic is counted
    /// as a crash (the first one recorded with its input). Returns whether
    /// the input passed.
    pub fn check<I: fmt::Debug + ?Sized>(
        &mut self,
        target: Target,
        input: &I,
        test: impl FnOnce(&I),
    ) -> bool {
        let outcome = catch_unwind(AssertUnwindSafe(|| test(input)));
        self.inputs += 1;
        self.targets[target as usize].inputs += 1;
        let Err(payload) = outcome else {
            return true;
        };
        self.crashes += 1;
        self.targets[target as usize].crashes += 1;
        if self.first_crash.is_none() {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text panic".into());
            let mut text = format!("{}: {message}; input: {input:?}", target.name());
            if let Some((cut, _)) = text.char_indices().nth(CRASH_CHARS) {
                text.truncate(cut);
                text.push_str(" ...");
            }
            self.first_crash = Some(text);
        }
        false
    }
}

impl fmt::Display for FuzzReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} inputs, {} crashes (", self.inputs, self.crashes)?;
        for (i, target) in Target::ALL.iter().enumerate() {
            let counts = self.target(*target);
            let sep = if i == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}{} {}/{}",
                target.name(),
                counts.crashes,
                counts.inputs
            )?;
        }
        write!(f, " crashed/run)")?;
        if let Some(crash) = &self.first_crash {
            write!(f, "; first crash: {crash}")?;
        }
        Ok(())
    }
}

/// Runs `inputs` generated inputs from `seed`, spread evenly over the
/// targets, and reports what crashed.
pub fn run(inputs: u64, seed: u64) -> FuzzReport {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = FuzzReport::default();
    for i in 0..inputs {
        let target = Target::ALL[(i % Target::ALL.len() as u64) as usize];
        match target {
            Target::ClientText => match text_input(&mut rng, client_message) {
                TextInput::Message(m) => report.check(target, &m, check_client_message),
                TextInput::Text(t) => report.check(target, t.as_str(), check_client_text),
            },
            Target::ServerText => match text_input(&mut rng, |r| server_message(r, None)) {
                TextInput::Message(m) => report.check(target, &m, check_server_message),
                TextInput::Text(t) => report.check(target, t.as_str(), check_server_text),
            },
            Target::Assembler => report.check(target, &assembler_case(&mut rng), check_assembler),
            Target::Session => report.check(target, &session_case(&mut rng), check_session),
        };
    }
    report
}

// ---------------------------------------------------------------- checks

/// Parses a client's text frame as the server does, then checks it against
/// the protocol's limits ([`ClientMessage::validate`]). Panics only if a
/// parsed message does not survive being written and parsed again.
pub fn check_client_text(text: &str) {
    let message = match ClientMessage::from_json(text) {
        Ok(message) => message,
        Err(e) => {
            // The server words the refusal from the error.
            let _ = e.to_string();
            return;
        }
    };
    // The server's next step: the protocol's limits (`protocol::limits`).
    let _ = message.validate().map_err(|e| e.to_string());
    let again = message.to_json();
    assert!(
        ClientMessage::from_json(&again).is_ok(),
        "a parsed client message does not parse once written again: {again}"
    );
}

/// A well-formed client message must parse back to itself (floats to
/// within `FLOAT_ULPS` (16) units in the last place: serde_json's default
/// float parsing is not exact); then its text goes through
/// [`check_client_text`].
pub fn check_client_message(message: &ClientMessage) {
    let text = message.to_json();
    let back = ClientMessage::from_json(&text);
    assert!(
        back.as_ref().is_ok_and(|b| same_message(b, message)),
        "{text} parses as {back:?}"
    );
    check_client_text(&text);
}

/// Parses a server's text frame as a client does. Panics only if a parsed
/// message does not survive being written and parsed again.
pub fn check_server_text(text: &str) {
    let message = match ServerMessage::from_json(text) {
        Ok(message) => message,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let again = message.to_json();
    assert!(
        ServerMessage::from_json(&again).is_ok(),
        "a parsed server message does not parse once written again: {again}"
    );
}

/// A well-formed server message must parse back to itself (as in
/// [`check_client_message`]); then its text goes through
/// [`check_server_text`].
pub fn check_server_message(message: &ServerMessage) {
    let text = message.to_json();
    let back = ServerMessage::from_json(&text);
    assert!(
        back.as_ref().is_ok_and(|b| same_message(b, message)),
        "{text} parses as {back:?}"
    );
    check_server_text(&text);
}

/// How far, in units in the last place, a float may come back from its
/// JSON text: serde_json parses without its `float_roundtrip` feature,
/// which is off by a few units now and then (seen: 3).
const FLOAT_ULPS: u64 = 16;

/// Whether two messages are equal, floats to within [`FLOAT_ULPS`].
fn same_message<M: serde::Serialize + PartialEq>(a: &M, b: &M) -> bool {
    let value = |m: &M| serde_json::to_value(m).expect("messages always serialise");
    a == b || same_value(&value(a), &value(b))
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            x == y || (x.to_bits() as i64).abs_diff(y.to_bits() as i64) <= FLOAT_ULPS
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_value(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

/// One transfer for a [`WeightAssembler`]: its settings and the frames
/// that arrive.
#[derive(Debug, Clone, PartialEq)]
pub struct AssemblerCase {
    /// Announced round.
    pub round: u32,
    /// Announced hop.
    pub hop: u32,
    /// Announced chunk count.
    pub count: u32,
    /// Parameters of the model.
    pub expected: usize,
    /// Announced encoding.
    pub encoding: WeightEncoding,
    /// The receiver's frame limit.
    pub max_frame_bytes: usize,
    /// The frames, in arrival order.
    pub frames: Vec<Vec<u8>>,
    /// The weights the assembler must yield, when the frames are the
    /// untouched, valid encoding of them.
    pub yields: Option<Vec<f32>>,
}

impl AssemblerCase {
    /// The untouched transfer of `values` as `encoding` in frames of at most
    /// `max_frame_bytes`, with the assembler set to match; it must yield
    /// the values as the receiver decodes them, when they fit in the frames
    /// and stay finite.
    pub fn valid(
        round: u32,
        hop: u32,
        values: &[f32],
        encoding: WeightEncoding,
        max_frame_bytes: usize,
    ) -> Self {
        let frames = encode_chunks(round, hop, values, encoding, max_frame_bytes);
        let decoded = encoded(values, encoding);
        let fits = max_frame_bytes >= HEADER_BYTES + encoding.value_bytes();
        let yields = (fits && decoded.iter().all(|v| v.is_finite())).then_some(decoded);
        Self {
            round,
            hop,
            count: frames.len() as u32,
            expected: values.len(),
            encoding,
            max_frame_bytes,
            frames,
            yields,
        }
    }
}

/// Pushes all the case's frames: no vector of the wrong length or with a
/// non-finite value may come out, every frame after a refusal is refused
/// too, and [`AssemblerCase::yields`], if set, must come out.
pub fn check_assembler(case: &AssemblerCase) {
    let mut assembler = WeightAssembler::new(
        case.round,
        case.hop,
        case.count,
        case.expected,
        case.encoding,
        case.max_frame_bytes,
    );
    let mut first = None;
    let mut refused = None;
    for (i, frame) in case.frames.iter().enumerate() {
        let outcome = assembler.push(frame);
        if let Some(at) = refused {
            assert!(
                outcome.is_err(),
                "frame {i} taken after frame {at} was refused"
            );
        }
        match outcome {
            Ok(None) => {}
            Ok(Some(weights)) => {
                check_weights(&weights, case.expected, "the assembler");
                first.get_or_insert(weights);
            }
            Err(_) => {
                refused.get_or_insert(i);
            }
        }
    }
    if let Some(expected) = &case.yields {
        assert_eq!(first.as_ref(), Some(expected), "valid frames were refused");
    }
}

fn check_weights(weights: &[f32], expected: usize, who: &str) {
    assert_eq!(
        weights.len(),
        expected,
        "{who} yielded {} weights, expected {expected}",
        weights.len()
    );
    if let Some(i) = weights.iter().position(|v| !v.is_finite()) {
        panic!("{who} yielded the non-finite {} at index {i}", weights[i]);
    }
}

/// A client session's life: how it starts and what happens to it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionCase {
    /// The data the join announces.
    pub data: DataSource,
    /// The session's frame limit.
    pub max_frame_bytes: usize,
    /// What happens, in order.
    pub steps: Vec<SessionStep>,
}

/// One event in a [`SessionCase`].
#[derive(Debug, Clone, PartialEq)]
pub enum SessionStep {
    /// A text frame from the server ([`ClientSession::on_text`]).
    Text(String),
    /// A binary frame from the server ([`ClientSession::on_binary`]).
    Binary(Vec<u8>),
    /// The driver's [`ClientSession::data_ready`].
    DataReady(Vec<usize>),
    /// The driver's [`ClientSession::trained`].
    Trained {
        /// The task answered.
        task: TaskSpec,
        /// The trained weights.
        weights: Vec<f32>,
    },
}

/// Drives a session through the case's steps, checking every call's
/// actions.
pub fn check_session(case: &SessionCase) {
    let (mut session, start) =
        ClientSession::start("fuzz", None, case.data.clone(), case.max_frame_bytes);
    assert!(
        matches!(
            start.as_slice(),
            [ClientAction::Send(ClientMessage::Join { .. })]
        ),
        "start answers {start:?}"
    );
    for step in &case.steps {
        let was_closed = session.is_closed();
        let actions = match step {
            SessionStep::Text(text) => session.on_text(text),
            SessionStep::Binary(frame) => session.on_binary(frame),
            SessionStep::DataReady(counts) => {
                let actions = session.data_ready(counts.clone());
                let ready = ClientMessage::Ready {
                    counts: counts.clone(),
                };
                if !was_closed {
                    assert_eq!(actions, [ClientAction::Send(ready)]);
                }
                actions
            }
            SessionStep::Trained { task, weights } => {
                let actions = session.trained(task, weights, 7, 0.5, 0.25);
                if !was_closed {
                    check_trained(task, weights, case.max_frame_bytes, &actions);
                }
                actions
            }
        };
        check_actions(&session, was_closed, &actions);
    }
}

fn check_actions(session: &ClientSession, was_closed: bool, actions: &[ClientAction]) {
    if was_closed {
        assert!(session.is_closed(), "a closed session opened again");
        assert!(actions.is_empty(), "a closed session answers {actions:?}");
    }
    let closes = actions.iter().any(|a| matches!(a, ClientAction::Close(_)));
    assert!(
        !closes || session.is_closed(),
        "{actions:?} closes but the session is open"
    );
    if !was_closed && session.is_closed() {
        assert!(
            matches!(actions.last(), Some(ClientAction::Close(_))),
            "the session closed with {actions:?}"
        );
    }
    for action in actions {
        if let ClientAction::Train { weights, .. } = action {
            let params = session.model().map(|m| m.params);
            let params = params.expect("weights to train before a welcome");
            check_weights(weights, params, "the session");
        }
    }
}

fn check_trained(task: &TaskSpec, weights: &[f32], limit: usize, actions: &[ClientAction]) {
    // A masked hop without this round's secure-aggregation keys is given
    // up with an error, never answered in the clear.
    if task.secure_weight.is_some() {
        assert!(
            matches!(actions, [ClientAction::Send(ClientMessage::Error { .. })]),
            "a masked hop without keys answered {actions:?}"
        );
        return;
    }
    let [
        ClientAction::Send(ClientMessage::Update(update)),
        ClientAction::SendBinary(frames),
    ] = actions
    else {
        panic!("trained answers {actions:?}");
    };
    assert_eq!(
        (update.round, update.hop, update.encoding),
        (task.round, task.hop, task.encoding)
    );
    assert_eq!(update.chunks as usize, frames.len(), "announced chunks");
    let width = task.encoding.value_bytes();
    let sendable = encoded(weights, task.encoding)
        .iter()
        .all(|v| v.is_finite());
    if limit < HEADER_BYTES + width || !sendable {
        return;
    }
    // What the session sends, a receiver with the same limit takes.
    let mut assembler = WeightAssembler::new(
        task.round,
        task.hop,
        update.chunks,
        weights.len(),
        task.encoding,
        limit,
    );
    let mut out = None;
    for frame in frames {
        out = assembler.push(frame).expect("the session's own frames");
    }
    assert_eq!(
        out.map(|w| w.len()),
        Some(weights.len()),
        "frames of {weights:?}"
    );
}

/// The values a receiver decodes from `values` sent as `encoding`.
fn encoded(values: &[f32], encoding: WeightEncoding) -> Vec<f32> {
    match encoding {
        WeightEncoding::F32 | WeightEncoding::Masked => values.to_vec(),
        WeightEncoding::F16 => values.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
    }
}

// ---------------------------------------------------------------- mutations

/// A byte-level mutation. Positions wrap around the input's length, so any
/// edit applies to any input (edits of an empty input do nothing, except
/// inserts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Flips bit `bit % 8` of byte `at`.
    FlipBit {
        /// Byte.
        at: usize,
        /// Bit.
        bit: u8,
    },
    /// Writes `bytes` from `at`, cut at the end of the input.
    Overwrite {
        /// First byte.
        at: usize,
        /// Bytes written.
        bytes: Vec<u8>,
    },
    /// Inserts `bytes` before byte `at`.
    Insert {
        /// Position.
        at: usize,
        /// Bytes inserted.
        bytes: Vec<u8>,
    },
    /// Removes up to `len` bytes from `at`.
    Remove {
        /// First byte.
        at: usize,
        /// Bytes removed.
        len: usize,
    },
    /// Repeats up to `len` bytes from `at` right after them.
    Duplicate {
        /// First byte.
        at: usize,
        /// Bytes repeated.
        len: usize,
    },
    /// Keeps the first `len % (length + 1)` bytes.
    Truncate {
        /// Bytes kept.
        len: usize,
    },
}

impl Edit {
    /// Applies the edit to `bytes`.
    pub fn apply(&self, bytes: &mut Vec<u8>) {
        let n = bytes.len();
        match self {
            Edit::Insert { at, bytes: new } => {
                let at = at % (n + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Edit::Truncate { len } => bytes.truncate(len % (n + 1)),
            _ if n == 0 => {}
            Edit::FlipBit { at, bit } => bytes[at % n] ^= 1 << (bit % 8),
            Edit::Overwrite { at, bytes: new } => {
                let at = at % n;
                let end = (at + new.len()).min(n);
                bytes[at..end].copy_from_slice(&new[..end - at]);
            }
            Edit::Remove { at, len } => {
                let at = at % n;
                bytes.drain(at..at + (*len).min(n - at));
            }
            Edit::Duplicate { at, len } => {
                let at = at % n;
                let end = at + (*len).min(n - at);
                let copy = bytes[at..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
    }

    /// A random edit of an input of `len` bytes, inserting or writing
    /// pieces of `tokens`.
    fn random(rng: &mut StdRng, len: usize, tokens: &[&[u8]]) -> Edit {
        let at = rng.random_range(0..=len);
        let piece = |rng: &mut StdRng| match rng.random_range(0..3) {
            0 => (0..rng.random_range(1..=4)).map(|_| rng.random()).collect(),
            _ => tokens.choose(rng).map_or(vec![], |t| t.to_vec()),
        };
        match rng.random_range(0..8) {
            0 | 1 => Edit::FlipBit {
                at,
                bit: rng.random(),
            },
            2 => Edit::Overwrite {
                at,
                bytes: piece(rng),
            },
            3 | 4 => Edit::Insert {
                at,
                bytes: piece(rng),
            },
            5 => Edit::Remove {
                at,
                len: rng.random_range(1..=16),
            },
            6 => Edit::Duplicate {
                at,
                len: rng.random_range(1..=16),
            },
            _ => Edit::Truncate { len: at },
        }
    }
}

/// `text` with `edits` applied to its bytes, invalid UTF-8 replaced.
pub fn edit_text(text: &str, edits: &[Edit]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    edits.iter().for_each(|e| e.apply(&mut bytes));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A mutation of a sequence of frames. Frame indices wrap around the
/// sequence's length; edits of an empty sequence do nothing, except `Push`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEdit {
    /// Edits the bytes of one frame.
    Bytes {
        /// Frame.
        frame: usize,
        /// The edit.
        edit: Edit,
    },
    /// Sets header word `word % 4` (round, hop, index, count) of a frame
    /// that has a whole header.
    Header {
        /// Frame.
        frame: usize,
        /// Word.
        word: usize,
        /// New value.
        value: u32,
    },
    /// Removes a frame.
    Drop {
        /// Frame.
        frame: usize,
    },
    /// Sends a frame twice in a row.
    Duplicate {
        /// Frame.
        frame: usize,
    },
    /// Exchanges two frames.
    Swap {
        /// One frame.
        a: usize,
        /// The other.
        b: usize,
    },
    /// Replaces frame `a` by its first `at` bytes followed by frame `b`'s
    /// bytes from `at` on.
    Splice {
        /// Frame whose head is kept.
        a: usize,
        /// Frame whose tail is taken.
        b: usize,
        /// Where they join.
        at: usize,
    },
    /// Appends a frame.
    Push(Vec<u8>),
}

impl FrameEdit {
    /// Applies the edit to `frames`.
    pub fn apply(&self, frames: &mut Vec<Vec<u8>>) {
        let n = frames.len();
        match self {
            FrameEdit::Push(frame) => frames.push(frame.clone()),
            _ if n == 0 => {}
            FrameEdit::Bytes { frame, edit } => edit.apply(&mut frames[frame % n]),
            FrameEdit::Header { frame, word, value } => {
                let frame = &mut frames[frame % n];
                let at = (word % 4) * 4;
                if frame.len() >= HEADER_BYTES {
                    frame[at..at + 4].copy_from_slice(&value.to_le_bytes());
                }
            }
            FrameEdit::Drop { frame } => {
                frames.remove(frame % n);
            }
            FrameEdit::Duplicate { frame } => {
                let copy = frames[frame % n].clone();
                frames.insert(frame % n, copy);
            }
            FrameEdit::Swap { a, b } => frames.swap(a % n, b % n),
            FrameEdit::Splice { a, b, at } => {
                let tail = frames[b % n].get(*at..).unwrap_or(&[]).to_vec();
                let head = &mut frames[a % n];
                head.truncate(*at);
                head.extend(tail);
            }
        }
    }

    /// A random edit of `frames`.
    fn random(rng: &mut StdRng, frames: &[Vec<u8>]) -> FrameEdit {
        let n = frames.len().max(1);
        let frame = rng.random_range(0..n);
        let len = frames.get(frame).map_or(0, Vec::len);
        match rng.random_range(0..10) {
            0..=2 => FrameEdit::Bytes {
                frame,
                edit: Edit::random(rng, len, FRAME_TOKENS),
            },
            3 | 4 => FrameEdit::Header {
                frame,
                word: rng.random_range(0..4),
                value: match rng.random_range(0..3) {
                    0 => any_u32(rng),
                    _ => rng.random_range(0..=n as u32 + 1),
                },
            },
            5 => FrameEdit::Drop { frame },
            6 => FrameEdit::Duplicate { frame },
            7 => FrameEdit::Swap {
                a: frame,
                b: rng.random_range(0..n),
            },
            8 => FrameEdit::Splice {
                a: frame,
                b: rng.random_range(0..n),
                at: rng.random_range(0..=len),
            },
            _ => FrameEdit::Push(random_frame(rng)),
        }
    }
}

/// Bytes worth inserting into JSON.
#[rustfmt::skip]
const TEXT_TOKENS: &[&[u8]] = &[
    b"null", b"true", b"-1", b"0", b"1e999", b"-0.0", b"18446744073709551616", b"4294967296",
    b"\"\"", b"\\u0000", b"\\ud800", b"\"", b"\\", b"{", b"}", b"[", b"]", b",", b":",
    b"\"type\":", b"\"ready\"", b"\"task\"", b"[[[[[[[[", b"\xf0\x9f\x98",
];

/// Byte patterns worth writing into weight frames: NaN and infinities as
/// f32 and as f16, the largest values, all ones.
const FRAME_TOKENS: &[&[u8]] = &[
    &[0x00, 0x00, 0xc0, 0x7f],
    &[0x00, 0x00, 0x80, 0x7f],
    &[0x00, 0x00, 0x80, 0xff],
    &[0x00, 0x7e],
    &[0x00, 0x7c],
    &[0x00, 0xfc],
    &[0xff, 0xff, 0x7f, 0x7f],
    &[0xff, 0x7b],
    &[0xff, 0xff, 0xff, 0xff],
    &[0x00, 0x00, 0x00, 0x00],
];

// ---------------------------------------------------------------- generators

/// A text input: a well-formed message, or a text (mutated or garbage).
#[derive(Debug)]
enum TextInput<M> {
    Message(M),
    Text(String),
}

fn text_input<M: serde::Serialize>(
    rng: &mut StdRng,
    message: impl Fn(&mut StdRng) -> M,
) -> TextInput<M> {
    let m = message(rng);
    match rng.random_range(0..20) {
        0..=5 => TextInput::Message(m),
        6..=17 => TextInput::Text(mutated_text(rng, &m)),
        _ => TextInput::Text(garbage_text(rng)),
    }
}

/// `message` as JSON, mutated as a JSON value (1 to 3 nodes replaced,
/// removed, added, wrapped or nudged) or as bytes (1 to 4 [`Edit`]s).
pub fn mutated_text(rng: &mut StdRng, message: &impl serde::Serialize) -> String {
    if rng.random_bool(0.5) {
        let mut value = serde_json::to_value(message).expect("messages always serialise");
        for _ in 0..rng.random_range(1..=3) {
            mutate_value(rng, &mut value);
        }
        value.to_string()
    } else {
        let text = serde_json::to_string(message).expect("messages always serialise");
        let edits: Vec<Edit> = (0..rng.random_range(1..=4))
            .map(|_| Edit::random(rng, text.len(), TEXT_TOKENS))
            .collect();
        edit_text(&text, &edits)
    }
}

/// Field names and tags of the protocol, for mutations that confuse them.
#[rustfmt::skip]
const NAMES: &[&str] = &[
    "type", "kind", "version", "backend", "speed", "data", "counts", "round", "hop", "done",
    "total", "samples", "loss", "seconds", "encoding", "chunks", "code", "message", "client_id",
    "model", "shard", "dataset", "indices", "ratios", "seed", "epochs", "batch_size",
    "learning_rate", "prox_mu", "deadline_ms", "stall_ms", "place", "mediator", "params", "join", "ready",
    "progress", "update", "error", "leave", "welcome", "plan", "task", "round-done", "own",
    "demo", "f32", "f16", "malformed", "non-finite", "ack", "outcome", "reason", "stale",
];

/// Replaces, removes, adds, wraps or nudges a random node of `value`.
fn mutate_value(rng: &mut StdRng, value: &mut Value) {
    let node = pick(rng, value);
    match (rng.random_range(0..8), node) {
        (0, Value::Object(map)) if !map.is_empty() => {
            let key = map.keys().nth(rng.random_range(0..map.len())).cloned();
            map.remove(&key.expect("in range"));
        }
        (1, Value::Object(map)) => {
            let key = NAMES.choose(rng).expect("names").to_string();
            map.insert(key, random_value(rng));
        }
        (2, node) => *node = Value::Array(vec![node.take()]),
        (3, node) => *node = random_value(rng),
        (_, node) => nudge(rng, node),
    }
}

/// Changes `node` but keeps its JSON type, so the message often still
/// parses and reaches the checks after parsing: another number, string or
/// tag, a list one entry longer or shorter.
fn nudge(rng: &mut StdRng, node: &mut Value) {
    match node {
        Value::Number(n) if n.is_f64() => *node = Value::from(any_f64(rng)),
        Value::Number(_) => *node = Value::from(any_u64(rng)),
        Value::String(_) if rng.random() => *node = Value::from(any_string(rng)),
        Value::String(_) => *node = Value::from(*NAMES.choose(rng).expect("names")),
        Value::Bool(b) => *b = !*b,
        Value::Array(items) if !items.is_empty() && rng.random() => {
            items.remove(rng.random_range(0..items.len()));
        }
        Value::Array(items) => {
            let copy = items.choose(rng).cloned();
            items.push(copy.unwrap_or_else(|| Value::from(small(rng))));
        }
        Value::Object(map) => {
            if let Some(tag) = ["type", "kind"].iter().find(|k| map.contains_key(**k)) {
                let name = *NAMES.choose(rng).expect("names");
                map.insert(tag.to_string(), Value::from(name));
            }
        }
        Value::Null => *node = random_value(rng),
    }
}

/// A random node of `value`, the root included.
fn pick<'a>(rng: &mut StdRng, node: &'a mut Value) -> &'a mut Value {
    let len = match &*node {
        Value::Object(map) => map.len(),
        Value::Array(items) => items.len(),
        _ => 0,
    };
    if len == 0 || rng.random_bool(0.3) {
        return node;
    }
    let i = rng.random_range(0..len);
    match node {
        Value::Object(map) => pick(rng, map.values_mut().nth(i).expect("in range")),
        Value::Array(items) => pick(rng, &mut items[i]),
        other => other,
    }
}

fn random_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..12) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => Value::from(-1),
        3 => Value::from(u64::MAX),
        4 => Value::from(i64::MIN),
        5 => Value::from(any_f64(rng)),
        6 => Value::from(any_u64(rng)),
        7 | 8 => Value::from(*NAMES.choose(rng).expect("names")),
        9 => Value::from(any_string(rng)),
        10 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| Value::from(small(rng)))
                .collect(),
        ),
        _ => Value::Object(serde_json::Map::new()),
    }
}

/// A text that is no message: random bytes, deep nesting, any characters,
/// or a soup of JSON tokens and the protocol's names.
pub fn garbage_text(rng: &mut StdRng) -> String {
    match rng.random_range(0..5) {
        0 => {
            let bytes: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        1 => {
            let depth = rng.random_range(100..160);
            let open = if rng.random() { "[" } else { "{\"a\":" };
            open.repeat(depth)
        }
        2 => (0..rng.random_range(0..64))
            .map(|_| any_char(rng))
            .collect(),
        _ => {
            let mut text = Vec::new();
            for _ in 0..rng.random_range(0..24) {
                let token: &[u8] = match rng.random_range(0..3) {
                    0 => NAMES.choose(rng).expect("names").as_bytes(),
                    _ => TEXT_TOKENS.choose(rng).expect("tokens"),
                };
                text.extend_from_slice(token);
            }
            String::from_utf8_lossy(&text).into_owned()
        }
    }
}

fn small(rng: &mut StdRng) -> u64 {
    rng.random_range(0..=8)
}

fn any_u64(rng: &mut StdRng) -> u64 {
    match rng.random_range(0..8) {
        0..=3 => small(rng),
        4 => [0, 1, u64::MAX, u64::MAX - 1, 1 << 32, 1 << 53]
            .choose(rng)
            .copied()
            .expect("edges"),
        5 => rng.random_range(0..1000),
        _ => rng.random(),
    }
}

fn any_u32(rng: &mut StdRng) -> u32 {
    match rng.random_range(0..8) {
        0..=4 => small(rng) as u32,
        5 => [u32::MAX, u32::MAX - 1, 1 << 31]
            .choose(rng)
            .copied()
            .expect("edges"),
        _ => rng.random(),
    }
}

fn any_usize(rng: &mut StdRng) -> usize {
    any_u64(rng) as usize
}

/// A finite float: mostly short decimals, sometimes extremes or any bits.
fn any_f64(rng: &mut StdRng) -> f64 {
    match rng.random_range(0..10) {
        0..=5 => rng.random_range(-4000i32..4000) as f64 / 1000.0,
        6 => [0.0, -0.0, 1.0, f64::MAX, f64::MIN_POSITIVE, 5e-324, 1e300]
            .choose(rng)
            .copied()
            .expect("edges"),
        _ => {
            let v = f64::from_bits(rng.random());
            if v.is_finite() { v } else { 0.5 }
        }
    }
}

/// A short string: mostly of characters JSON escapes or writes in several
/// bytes, a quarter of the time of any characters ([`any_char`]).
fn any_string(rng: &mut StdRng) -> String {
    const CHARS: &[char] = &[
        'a', 'z', 'M', '0', ' ', '"', '\\', '/', '\n', '\u{0}', '\u{7f}', 'é', '\u{2028}', '😀',
    ];
    let wide = rng.random_bool(0.25);
    (0..rng.random_range(0..10))
        .map(|_| {
            if wide {
                any_char(rng)
            } else {
                *CHARS.choose(rng).expect("chars")
            }
        })
        .collect()
}

/// Any character: ASCII (controls included), the rest of the basic plane,
/// or any scalar value (mostly the astral planes).
fn any_char(rng: &mut StdRng) -> char {
    match rng.random_range(0..3) {
        0 => rng.random_range('\u{0}'..='\u{7f}'),
        1 => rng.random_range('\u{80}'..='\u{ffff}'),
        _ => rng.random(),
    }
}

fn any_counts(rng: &mut StdRng) -> Vec<usize> {
    (0..rng.random_range(0..8))
        .map(|_| any_usize(rng))
        .collect()
}

fn any_encoding(rng: &mut StdRng) -> WeightEncoding {
    if rng.random() {
        WeightEncoding::F32
    } else {
        WeightEncoding::F16
    }
}

fn any_code(rng: &mut StdRng) -> ErrorCode {
    use ErrorCode::*;
    let codes = [
        Malformed, Version, Unexpected, Shape, NonFinite, Outlier, TooLarge, Data, Invalid,
        Internal,
    ];
    *codes.choose(rng).expect("codes")
}

fn any_data(rng: &mut StdRng) -> DataSource {
    if rng.random() {
        DataSource::Demo
    } else {
        DataSource::Own {
            counts: any_counts(rng),
        }
    }
}

/// A client message of the kinds a client sends outside secure
/// aggregation, well formed (it need not pass the protocol's limits): a
/// join (mostly of this protocol's version, sometimes resuming), ready,
/// progress, update, error or leave; numbers mostly small, sometimes at
/// their edges or anything.
pub fn client_message(rng: &mut StdRng) -> ClientMessage {
    match rng.random_range(0..6) {
        0 => ClientMessage::Join {
            version: if rng.random_bool(0.8) {
                PROTOCOL_VERSION
            } else {
                any_u32(rng)
            },
            backend: any_string(rng),
            speed: rng.random_bool(0.5).then(|| any_f64(rng)),
            data: any_data(rng),
            resume: rng.random_bool(0.2).then(|| any_string(rng)),
        },
        1 => ClientMessage::Ready {
            counts: any_counts(rng),
        },
        2 => ClientMessage::Progress {
            round: any_u32(rng),
            hop: any_u32(rng),
            done: any_usize(rng),
            total: any_usize(rng),
        },
        3 => ClientMessage::Update(UpdateSpec {
            round: any_u32(rng),
            hop: any_u32(rng),
            samples: any_u64(rng),
            loss: any_f64(rng),
            seconds: any_f64(rng),
            encoding: any_encoding(rng),
            chunks: any_u32(rng),
        }),
        4 => ClientMessage::Error {
            code: any_code(rng),
            message: any_string(rng),
        },
        _ => ClientMessage::Leave,
    }
}

/// A task; with `fit` = (params, frame limit), one whose chunk count fits
/// that model (most of the time).
fn task_spec(rng: &mut StdRng, fit: Option<(usize, usize)>) -> TaskSpec {
    let encoding = any_encoding(rng);
    let chunks = match fit {
        Some((params, limit)) if rng.random_bool(0.9) => chunk_count(params, encoding, limit),
        _ => any_u32(rng),
    };
    let place = rng.random_bool(0.3).then(|| ChainPlace {
        mediator: any_u32(rng),
        mediators: any_u32(rng),
        position: any_u32(rng),
        members: any_u32(rng),
        pass: any_u32(rng),
        passes: any_u32(rng),
    });
    TaskSpec {
        round: any_u32(rng),
        hop: any_u32(rng),
        epochs: any_usize(rng),
        batch_size: any_usize(rng),
        learning_rate: any_f64(rng),
        prox_mu: any_f64(rng),
        deadline_ms: any_u64(rng),
        stall_ms: rng.random_bool(0.5).then(|| any_u64(rng)),
        seed: any_u64(rng),
        encoding,
        chunks,
        place,
        secure_weight: rng.random_bool(0.1).then(|| any_f64(rng)),
        secure_clip: rng.random_bool(0.1).then(|| any_f64(rng)),
        secure_noise: rng.random_bool(0.1).then(|| any_f64(rng)),
    }
}

/// Parameters a welcome announces: mostly small, rarely huge.
fn any_params(rng: &mut StdRng) -> usize {
    match rng.random_range(0..100) {
        // 2^40 does not fit a 32-bit usize (wasm32): it saturates there.
        0 => *[
            usize::MAX,
            usize::try_from(1u64 << 40).unwrap_or(usize::MAX),
            1 << 30,
        ]
        .choose(rng)
        .expect("edges"),
        1..=10 => small(rng) as usize,
        _ => rng.random_range(0..=300),
    }
}

/// A server message of the kinds a server sends outside secure aggregation,
/// well formed: a welcome (sometimes with a shard or a resume token), plan,
/// task, round end, ack or error. With `fit` = (parameters, frame limit),
/// a welcome announces that model and a task's chunk count mostly fits it;
/// with `None` a welcome announces any number of parameters (mostly up to
/// 300, rarely an impossible one: 2^30, 2^40, `usize::MAX`).
pub fn server_message(rng: &mut StdRng, fit: Option<(usize, usize)>) -> ServerMessage {
    match rng.random_range(0..6) {
        0 => ServerMessage::Welcome {
            version: if rng.random_bool(0.9) {
                PROTOCOL_VERSION
            } else {
                any_u32(rng)
            },
            client_id: any_u64(rng),
            model: ModelSpec {
                num_classes: any_usize(rng),
                channels: any_usize(rng),
                height: any_usize(rng),
                width: any_usize(rng),
                params: fit.map_or_else(|| any_params(rng), |(params, _)| params),
            },
            shard: rng.random_bool(0.5).then(|| ShardSpec {
                dataset: any_string(rng),
                indices: any_counts(rng),
            }),
            resume: rng.random_bool(0.2).then(|| any_string(rng)),
            privacy: None,
            rejoin_within_ms: rng.random_bool(0.5).then(|| any_u64(rng)),
        },
        1 => ServerMessage::Plan {
            ratios: (0..rng.random_range(0..8)).map(|_| any_f64(rng)).collect(),
            seed: any_u64(rng),
        },
        2 => ServerMessage::Task(task_spec(rng, fit)),
        3 => ServerMessage::RoundDone {
            round: any_u32(rng),
            accuracy: any_f64(rng),
            loss: any_f64(rng),
            epsilon: rng.random_bool(0.5).then(|| any_f64(rng)),
            rejoin_within_ms: rng.random_bool(0.5).then(|| any_u64(rng)),
            last: rng.random_bool(0.5),
        },
        4 => ServerMessage::Ack {
            round: any_u32(rng),
            hop: any_u32(rng),
            outcome: *[AckOutcome::Accepted, AckOutcome::Stale, AckOutcome::Refused]
                .choose(rng)
                .expect("outcomes"),
            reason: rng.random_bool(0.5).then(|| any_string(rng)),
        },
        _ => ServerMessage::Error {
            code: any_code(rng),
            message: any_string(rng),
        },
    }
}

/// A weight in [-1, 1), or with probability `special` NaN, an infinity, a
/// subnormal or a value past f16's range.
fn weight(rng: &mut StdRng, special: f64) -> f32 {
    if !rng.random_bool(special) {
        return rng.random_range(-1.0..1.0);
    }
    let specials = [
        f32::NAN,
        f32::INFINITY,
        -0.0,
        1e-40,
        f32::MAX,
        65504.0,
        65520.0,
        -7e4,
    ];
    *specials.choose(rng).expect("specials")
}

/// `n` weights; a quarter of the vectors hold about one special value, one
/// in ten holds one in ten (in several chunks, most likely).
fn weights(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let special = match rng.random_range(0..20) {
        0..=4 => 1.0 / n.max(1) as f64,
        5 | 6 => 0.1,
        _ => 0.0,
    };
    (0..n).map(|_| weight(rng, special)).collect()
}

/// A frame limit: mostly a whole number of values after the header.
fn frame_limit(rng: &mut StdRng, encoding: WeightEncoding) -> usize {
    if rng.random_bool(0.9) {
        HEADER_BYTES + encoding.value_bytes() * rng.random_range(1..=64)
    } else {
        rng.random_range(0..=HEADER_BYTES + 64)
    }
}

/// A frame that is no chunk of the transfer: random bytes (mostly a header
/// and more, its round and hop half the time small like most tasks'), or a
/// bare header of small or zero words (the all-zero header among them).
fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.random_range(0..4) {
        0 => rng.random_range(0..HEADER_BYTES),
        1 => {
            return (0..HEADER_BYTES / 4)
                .flat_map(|_| {
                    let word = if rng.random() { 0 } else { small(rng) as u32 };
                    word.to_le_bytes()
                })
                .collect();
        }
        _ => HEADER_BYTES + rng.random_range(0..64),
    };
    let mut frame: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    if len >= 8 && rng.random() {
        // Round and hop from the small range tasks use, so it may be taken.
        frame[..8].copy_from_slice(&[small(rng) as u8, 0, 0, 0, small(rng) as u8, 0, 0, 0]);
    }
    frame
}

/// A transfer from valid frames of a random weight vector (up to 400
/// values, some of them NaN, infinite or past f16's range), mutated most of
/// the time: the assembler's settings no longer matching the frames (count,
/// length, encoding or frame limit), and the frames edited ([`FrameEdit`]).
/// Untouched ones must come back ([`AssemblerCase::yields`]).
pub fn assembler_case(rng: &mut StdRng) -> AssemblerCase {
    let encoding = any_encoding(rng);
    let n = match rng.random_range(0..4) {
        0 => small(rng) as usize,
        1 | 2 => rng.random_range(0..=64),
        _ => rng.random_range(0..=400),
    };
    let values = weights(rng, n);
    let limit = frame_limit(rng, encoding);
    let mut case = AssemblerCase::valid(any_u32(rng), any_u32(rng), &values, encoding, limit);
    if rng.random_bool(0.3) {
        case.yields = None;
        match rng.random_range(0..6) {
            0 => case.count = any_u32(rng),
            1 => {
                case.count = case
                    .count
                    .wrapping_add(if rng.random() { 1 } else { u32::MAX })
            }
            2 => case.expected = any_usize(rng) % 1000,
            3 => case.expected = (n + rng.random_range(0..3)).saturating_sub(1),
            4 => case.encoding = any_encoding(rng),
            _ => case.max_frame_bytes = frame_limit(rng, encoding),
        }
    }
    if rng.random_bool(0.6) {
        case.yields = None;
        for _ in 0..rng.random_range(1..=4) {
            FrameEdit::random(rng, &case.frames).apply(&mut case.frames);
        }
    }
    case
}

/// A session's life of up to 15 steps: usually a welcome (sometimes with a
/// resume token, rarely of an impossible model), then plans, tasks with
/// their frames (edited now and then), other server messages (as they are
/// or mutated), round ends, garbage texts and frames and the driver's
/// calls, in random order.
pub fn session_case(rng: &mut StdRng) -> SessionCase {
    let limit = frame_limit(rng, WeightEncoding::F32);
    let params = any_params(rng).min(300);
    let mut steps = Vec::new();
    if rng.random_bool(0.85) {
        let welcome = ServerMessage::Welcome {
            version: if rng.random_bool(0.95) {
                PROTOCOL_VERSION
            } else {
                any_u32(rng)
            },
            client_id: any_u64(rng),
            model: ModelSpec {
                num_classes: 10,
                channels: 1,
                height: 28,
                width: 28,
                params: if rng.random_bool(0.01) {
                    any_params(rng)
                } else {
                    params
                },
            },
            shard: None,
            resume: rng.random_bool(0.3).then(|| any_string(rng)),
            privacy: None,
            rejoin_within_ms: None,
        };
        steps.push(SessionStep::Text(welcome.to_json()));
    }
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let total = rng.random_range(0..=15);
    while steps.len() < total {
        if !pending.is_empty() && rng.random_bool(0.8) {
            let mut frame = pending.remove(0);
            if rng.random_bool(0.05) {
                Edit::random(rng, frame.len(), FRAME_TOKENS).apply(&mut frame);
            }
            steps.push(SessionStep::Binary(frame));
            continue;
        }
        let step = match rng.random_range(0..100) {
            0..=34 => {
                let task = task_spec(rng, Some((params, limit)));
                let values = weights(rng, params);
                pending = encode_chunks(task.round, task.hop, &values, task.encoding, limit);
                SessionStep::Text(ServerMessage::Task(task).to_json())
            }
            35..=59 => {
                let message = server_message(rng, Some((params, limit)));
                // Errors and second welcomes close the session: fewer of them.
                if matches!(
                    message,
                    ServerMessage::Error { .. } | ServerMessage::Welcome { .. }
                ) && rng.random_bool(0.7)
                {
                    continue;
                }
                if rng.random_bool(0.7) {
                    SessionStep::Text(message.to_json())
                } else {
                    SessionStep::Text(mutated_text(rng, &message))
                }
            }
            60..=63 => SessionStep::Text(garbage_text(rng)),
            64..=67 => SessionStep::Binary(random_frame(rng)),
            68..=84 => SessionStep::DataReady(any_counts(rng)),
            _ => {
                let n = rng.random_range(0..=40);
                SessionStep::Trained {
                    task: task_spec(rng, None),
                    weights: weights(rng, n),
                }
            }
        };
        steps.push(step);
    }
    SessionCase {
        data: any_data(rng),
        max_frame_bytes: limit,
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_wrap_around_and_never_panic_on_short_inputs() {
        let edits = [
            Edit::FlipBit { at: 9, bit: 9 },
            Edit::Overwrite {
                at: 2,
                bytes: vec![1, 2, 3, 4],
            },
            Edit::Insert {
                at: 99,
                bytes: vec![7],
            },
            Edit::Remove { at: 1, len: 99 },
            Edit::Duplicate { at: 0, len: 99 },
            Edit::Truncate { len: 99 },
        ];
        let mut empty = Vec::new();
        let mut three = vec![0u8, 0, 0];

        for edit in &edits {
            edit.apply(&mut empty);
        }
        edits[0].apply(&mut three);
        edits[1].apply(&mut three);
        edits[2].apply(&mut three);
        edits[4].apply(&mut three);

        assert!(empty.is_empty(), "{empty:?}");
        assert_eq!(three, [2, 0, 1, 7, 2, 0, 1, 7]);
    }

    #[test]
    fn a_seed_replays_the_same_run() {
        let a = run(400, 9);
        let b = run(400, 9);

        assert_eq!(a, b);
        assert_eq!(a.crashes, 0, "{a}");
        assert!(a.targets.iter().all(|t| t.inputs == 100), "{a}");
    }

    #[test]
    fn the_generators_reach_resume_tokens_any_characters_and_long_lives() {
        // What the property tests' own generators covered before they drew
        // from these.
        let mut rng = StdRng::seed_from_u64(4);
        let mut texts: Vec<String> = (0..300)
            .map(|_| client_message(&mut rng).to_json())
            .collect();
        texts.extend((0..300).map(|_| server_message(&mut rng, None).to_json()));
        let lives: Vec<usize> = (0..100)
            .map(|_| session_case(&mut rng).steps.len())
            .collect();

        let resumed = |kind: &str| {
            texts
                .iter()
                .any(|t| t.contains(kind) && t.contains("\"resume\":\""))
        };
        assert!(resumed("\"join\"") && resumed("\"welcome\""));
        assert!(texts.iter().any(|t| t.chars().any(|c| c > '\u{ffff}')));
        assert!(lives.iter().any(|n| *n > 10), "{lives:?}");
    }

    #[test]
    fn untouched_frames_are_expected_back_and_checked() {
        let mut rng = StdRng::seed_from_u64(3);
        let cases: Vec<AssemblerCase> = (0..200).map(|_| assembler_case(&mut rng)).collect();

        let exact = cases.iter().filter(|c| c.yields.is_some()).count();
        cases.iter().for_each(check_assembler);

        assert!(exact > 20, "{exact} of 200 cases are exact");
    }
}
