//! Property tests of the protocol's decoders: proptest builds structured
//! inputs (messages, weight transfers, session lives) and mutates them, and
//! `protocol::fuzz` checks each; then a short seeded fuzzing run, proof that
//! the harness notices a crash, and the faults the fuzzing found, each
//! kept as a test naming it.

use std::panic::{AssertUnwindSafe, catch_unwind};

use astraea_core::protocol::frames::HEADER_BYTES;
use astraea_core::protocol::fuzz::{
    self, AssemblerCase, Edit, FrameEdit, FuzzReport, SessionCase, SessionStep, Target,
};
use astraea_core::protocol::{
    AckOutcome, ChainPlace, ClientMessage, ClientSession, DataSource, ErrorCode, ModelSpec,
    PROTOCOL_VERSION, ServerMessage, ShardSpec, TaskSpec, UpdateSpec, WeightAssembler,
    WeightEncoding, chunk_count, encode_chunks,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;

// ---------------------------------------------------------------- strategies

/// A finite float: a short decimal most of the time, any normal one else.
fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => (-4000i32..4000).prop_map(|k| f64::from(k) / 1000.0),
        1 => prop::num::f64::NORMAL | prop::num::f64::ZERO,
    ]
}

fn encoding() -> impl Strategy<Value = WeightEncoding> {
    select(vec![WeightEncoding::F32, WeightEncoding::F16])
}

fn code() -> impl Strategy<Value = ErrorCode> {
    use ErrorCode::*;
    select(vec![
        Malformed, Version, Unexpected, Shape, NonFinite, Outlier, TooLarge, Data, Invalid,
        Internal,
    ])
}

fn text() -> impl Strategy<Value = String> {
    ".{0,12}"
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    let data = prop_oneof![
        Just(DataSource::Demo),
        vec(any::<usize>(), 0..6).prop_map(|counts| DataSource::Own { counts }),
    ];
    let update = (
        any::<(u32, u32, u64)>(),
        number(),
        number(),
        encoding(),
        any::<u32>(),
    )
        .prop_map(
            |((round, hop, samples), loss, seconds, encoding, chunks)| UpdateSpec {
                round,
                hop,
                samples,
                loss,
                seconds,
                encoding,
                chunks,
            },
        );
    prop_oneof![
        (
            any::<u32>(),
            text(),
            option::of(number()),
            data,
            option::of(text())
        )
            .prop_map(
                |(version, backend, speed, data, resume)| ClientMessage::Join {
                    version,
                    backend,
                    speed,
                    data,
                    resume,
                }
            ),
        vec(any::<usize>(), 0..6).prop_map(|counts| ClientMessage::Ready { counts }),
        any::<(u32, u32, usize, usize)>().prop_map(|(round, hop, done, total)| {
            ClientMessage::Progress {
                round,
                hop,
                done,
                total,
            }
        }),
        update.prop_map(ClientMessage::Update),
        (code(), text()).prop_map(|(code, message)| ClientMessage::Error { code, message }),
        Just(ClientMessage::Leave),
    ]
}

fn task(chunks: impl Strategy<Value = u32>) -> impl Strategy<Value = TaskSpec> {
    let place = any::<[u32; 6]>().prop_map(|p| ChainPlace {
        mediator: p[0],
        mediators: p[1],
        position: p[2],
        members: p[3],
        pass: p[4],
        passes: p[5],
    });
    (
        any::<(u32, u32, usize, usize, u64, u64)>(),
        number(),
        number(),
        encoding(),
        chunks,
        option::of(place),
    )
        .prop_map(
            |(
                (round, hop, epochs, batch_size, deadline_ms, seed),
                lr,
                mu,
                encoding,
                chunks,
                place,
            )| {
                TaskSpec {
                    round,
                    hop,
                    epochs,
                    batch_size,
                    learning_rate: lr,
                    prox_mu: mu,
                    deadline_ms,
                    stall_ms: None,
                    seed,
                    encoding,
                    chunks,
                    place,
                    secure_weight: None,
                    secure_clip: None,
                    secure_noise: None,
                }
            },
        )
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    let model = any::<[usize; 5]>().prop_map(|m| ModelSpec {
        num_classes: m[0],
        channels: m[1],
        height: m[2],
        width: m[3],
        params: m[4],
    });
    let shard = (text(), vec(any::<usize>(), 0..6))
        .prop_map(|(dataset, indices)| ShardSpec { dataset, indices });
    let outcome = select(vec![
        AckOutcome::Accepted,
        AckOutcome::Stale,
        AckOutcome::Refused,
    ]);
    prop_oneof![
        (
            any::<(u32, u64)>(),
            model,
            option::of(shard),
            option::of(text())
        )
            .prop_map(|((version, client_id), model, shard, resume)| {
                ServerMessage::Welcome {
                    version,
                    client_id,
                    model,
                    shard,
                    resume,
                    privacy: None,
                }
            }),
        (vec(number(), 0..6), any::<u64>())
            .prop_map(|(ratios, seed)| ServerMessage::Plan { ratios, seed }),
        task(any::<u32>()).prop_map(ServerMessage::Task),
        (
            any::<u32>(),
            number(),
            number(),
            proptest::option::of(number())
        )
            .prop_map(
                |(round, accuracy, loss, epsilon)| ServerMessage::RoundDone {
                    round,
                    accuracy,
                    loss,
                    epsilon,
                }
            ),
        (any::<(u32, u32)>(), outcome, option::of(text())).prop_map(
            |((round, hop), outcome, reason)| ServerMessage::Ack {
                round,
                hop,
                outcome,
                reason,
            }
        ),
        (code(), text()).prop_map(|(code, message)| ServerMessage::Error { code, message }),
    ]
}

/// Bytes to write or insert: random ones, JSON's tokens, or NaN and
/// infinity as f32 and f16.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    let tokens: Vec<Vec<u8>> = [
        &b"null"[..],
        b"-1",
        b"1e999",
        b"18446744073709551616",
        b"\"",
        b"{",
        b"]",
        b",",
        b"\\u0000",
        &[0, 0, 0xc0, 0x7f],
        &[0, 0, 0x80, 0x7f],
        &[0, 0x7e],
        &[0, 0x7c],
    ]
    .iter()
    .map(|t| t.to_vec())
    .collect();
    prop_oneof![vec(any::<u8>(), 1..5), select(tokens)]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<(usize, u8)>().prop_map(|(at, bit)| Edit::FlipBit { at, bit }),
        (any::<usize>(), piece()).prop_map(|(at, bytes)| Edit::Overwrite { at, bytes }),
        (any::<usize>(), piece()).prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (any::<usize>(), 1..16usize).prop_map(|(at, len)| Edit::Remove { at, len }),
        (any::<usize>(), 1..16usize).prop_map(|(at, len)| Edit::Duplicate { at, len }),
        any::<usize>().prop_map(|len| Edit::Truncate { len }),
    ]
}

fn frame_edit() -> impl Strategy<Value = FrameEdit> {
    let index = any::<usize>();
    prop_oneof![
        (index, edit()).prop_map(|(frame, edit)| FrameEdit::Bytes { frame, edit }),
        (index, 0..4usize, prop_oneof![0..4u32, any::<u32>()])
            .prop_map(|(frame, word, value)| FrameEdit::Header { frame, word, value }),
        index.prop_map(|frame| FrameEdit::Drop { frame }),
        index.prop_map(|frame| FrameEdit::Duplicate { frame }),
        (index, index).prop_map(|(a, b)| FrameEdit::Swap { a, b }),
        (index, index, 0..48usize).prop_map(|(a, b, at)| FrameEdit::Splice { a, b, at }),
        vec(any::<u8>(), 0..40).prop_map(FrameEdit::Push),
    ]
}

/// A weight: in [-1, 1) most of the time, else NaN, an infinity, a
/// subnormal or past f16's range.
fn weight() -> impl Strategy<Value = f32> {
    prop_oneof![
        9 => -1.0f32..1.0,
        1 => select(vec![f32::NAN, f32::INFINITY, -0.0, 1e-40, f32::MAX, 65504.0, 65520.0]),
    ]
}

/// One change to the assembler's settings, so they no longer match the
/// frames.
#[derive(Debug, Clone)]
enum Mismatch {
    Count(u32),
    CountPlusOne,
    Expected(usize),
    OtherEncoding,
    Limit(usize),
}

fn mismatch() -> impl Strategy<Value = Mismatch> {
    prop_oneof![
        any::<u32>().prop_map(Mismatch::Count),
        Just(Mismatch::CountPlusOne),
        (0..200usize).prop_map(Mismatch::Expected),
        Just(Mismatch::OtherEncoding),
        (0..100usize).prop_map(Mismatch::Limit),
    ]
}

fn assembler_case() -> impl Strategy<Value = AssemblerCase> {
    (
        vec(weight(), 0..120),
        encoding(),
        1..24usize,
        any::<(u32, u32)>(),
        option::weighted(0.3, mismatch()),
        vec(frame_edit(), 0..4),
    )
        .prop_map(|(values, encoding, per, (round, hop), mismatch, edits)| {
            let limit = HEADER_BYTES + per * encoding.value_bytes();
            let mut case = AssemblerCase::valid(round, hop, &values, encoding, limit);
            if let Some(mismatch) = mismatch {
                case.yields = None;
                match mismatch {
                    Mismatch::Count(count) => case.count = count,
                    Mismatch::CountPlusOne => case.count = case.count.wrapping_add(1),
                    Mismatch::Expected(expected) => case.expected = expected,
                    Mismatch::OtherEncoding => {
                        case.encoding = match encoding {
                            WeightEncoding::F32 | WeightEncoding::Masked => WeightEncoding::F16,
                            WeightEncoding::F16 => WeightEncoding::F32,
                        }
                    }
                    Mismatch::Limit(limit) => case.max_frame_bytes = limit,
                }
            }
            if !edits.is_empty() {
                case.yields = None;
                edits.iter().for_each(|e| e.apply(&mut case.frames));
            }
            case
        })
}

/// What happens to a session, before it becomes frames and calls.
#[derive(Debug, Clone)]
enum Event {
    /// A task fitting the welcomed model; its frames wait for `Frame`.
    Task(WeightEncoding),
    /// The next waiting frame, perhaps edited.
    Frame(Option<Edit>),
    /// Any server message, perhaps edited.
    Message(ServerMessage, Vec<Edit>),
    /// Any text.
    Garbage(String),
    /// Any bytes.
    Binary(Vec<u8>),
    /// The driver's `data_ready`.
    Ready(Vec<usize>),
    /// The driver's `trained`.
    Trained(TaskSpec, Vec<f32>),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => encoding().prop_map(Event::Task),
        6 => option::weighted(0.1, edit()).prop_map(Event::Frame),
        2 => (server_message(), vec(edit(), 0..2)).prop_map(|(m, e)| Event::Message(m, e)),
        1 => ".{0,40}".prop_map(Event::Garbage),
        1 => vec(any::<u8>(), 0..40).prop_map(Event::Binary),
        1 => vec(any::<usize>(), 0..6).prop_map(Event::Ready),
        1 => (task(any::<u32>()), vec(weight(), 0..20)).prop_map(|(t, w)| Event::Trained(t, w)),
    ]
}

/// A welcome for a model of `params` (when `welcomed`), then `events`.
fn session_case(params: usize, per: usize, welcomed: bool, events: &[Event]) -> SessionCase {
    let limit = HEADER_BYTES + 4 * per;
    let mut steps = Vec::new();
    if welcomed {
        let welcome = ServerMessage::Welcome {
            version: PROTOCOL_VERSION,
            client_id: 1,
            model: ModelSpec {
                num_classes: 10,
                channels: 1,
                height: 28,
                width: 28,
                params,
            },
            shard: None,
            resume: None,
            privacy: None,
        };
        steps.push(SessionStep::Text(welcome.to_json()));
    }
    let mut waiting: Vec<Vec<u8>> = Vec::new();
    for (hop, event) in (1..).zip(events) {
        let step = match event {
            Event::Task(encoding) => {
                let chunks = chunk_count(params, *encoding, limit);
                let task = ServerMessage::Task(TaskSpec {
                    round: 1,
                    hop,
                    epochs: 1,
                    batch_size: 8,
                    learning_rate: 1e-3,
                    prox_mu: 0.0,
                    deadline_ms: 1000,
                    stall_ms: None,
                    seed: 3,
                    encoding: *encoding,
                    chunks,
                    place: None,
                    secure_weight: None,
                    secure_clip: None,
                    secure_noise: None,
                });
                waiting = encode_chunks(1, hop, &vec![0.25; params], *encoding, limit);
                SessionStep::Text(task.to_json())
            }
            Event::Frame(edit) => {
                let mut frame = if waiting.is_empty() {
                    vec![0; HEADER_BYTES]
                } else {
                    waiting.remove(0)
                };
                edit.iter().for_each(|e| e.apply(&mut frame));
                SessionStep::Binary(frame)
            }
            Event::Message(message, edits) => {
                SessionStep::Text(fuzz::edit_text(&message.to_json(), edits))
            }
            Event::Garbage(text) => SessionStep::Text(text.clone()),
            Event::Binary(bytes) => SessionStep::Binary(bytes.clone()),
            Event::Ready(counts) => SessionStep::DataReady(counts.clone()),
            Event::Trained(task, weights) => SessionStep::Trained {
                task: task.clone(),
                weights: weights.clone(),
            },
        };
        steps.push(step);
    }
    SessionCase {
        data: DataSource::Demo,
        max_frame_bytes: limit,
        steps,
    }
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn client_texts_parse_or_are_refused_without_panicking(
        message in client_message(),
        edits in vec(edit(), 1..4),
        raw in ".{0,64}",
    ) {
        fuzz::check_client_message(&message);
        fuzz::check_client_text(&fuzz::edit_text(&message.to_json(), &edits));
        fuzz::check_client_text(&raw);
    }

    #[test]
    fn server_texts_parse_or_are_refused_without_panicking(
        message in server_message(),
        edits in vec(edit(), 1..4),
        raw in ".{0,64}",
    ) {
        fuzz::check_server_message(&message);
        fuzz::check_server_text(&fuzz::edit_text(&message.to_json(), &edits));
        fuzz::check_server_text(&raw);
    }

    #[test]
    fn the_assembler_yields_whole_finite_weights_or_refuses(case in assembler_case()) {
        fuzz::check_assembler(&case);
    }

    #[test]
    fn a_session_stays_consistent_whatever_the_server_sends(
        params in 0..60usize,
        per in 1..16usize,
        welcomed in prop::bool::weighted(0.9),
        events in vec(event(), 0..14),
    ) {
        // Prepare
        let case = session_case(params, per, welcomed, &events);

        // Execute, Assert: `check_session` panics on a broken property.
        fuzz::check_session(&case);
    }
}

#[test]
fn a_seeded_run_finds_no_crash_and_feeds_every_target() {
    let report = fuzz::run(20_000, 1);

    assert_eq!(report.crashes, 0, "{report}");
    assert_eq!(report.inputs, 20_000);
    for target in Target::ALL {
        assert!(
            report.target(target).inputs >= 4_000,
            "{target:?}: {report}"
        );
    }
}

#[test]
fn the_harness_counts_a_panic_and_keeps_its_input() {
    let mut report = FuzzReport::default();

    let passed = report.check(Target::Assembler, "fine", |_| {});
    let failed = report.check(Target::Session, "the input", |input| {
        panic!("boom on {input}")
    });

    assert!(passed && !failed);
    assert_eq!((report.inputs, report.crashes), (2, 1));
    assert_eq!(report.target(Target::Session).crashes, 1);
    assert_eq!(report.target(Target::Assembler).crashes, 0);
    let first = report.first_crash.as_deref().unwrap_or_default();
    assert!(
        first.starts_with("session: boom on the input; input: \"the input\""),
        "{first}"
    );
}

#[test]
fn a_broken_property_counts_as_a_crash() {
    // Prepare: a valid transfer whose promised result is wrong on purpose,
    // and a session that trains on weights it never got.
    let mut wrong = AssemblerCase::valid(1, 2, &[0.5, 0.25], WeightEncoding::F32, 64);
    wrong.yields = Some(vec![0.5]);
    let right = AssemblerCase::valid(1, 2, &[0.5, 0.25], WeightEncoding::F32, 64);
    let mut report = FuzzReport::default();

    // Execute
    let wrong_passed = report.check(Target::Assembler, &wrong, fuzz::check_assembler);
    let right_passed = report.check(Target::Assembler, &right, fuzz::check_assembler);

    // Assert
    assert!(!wrong_passed && right_passed, "{report}");
    let first = report.first_crash.unwrap_or_default();
    assert!(first.contains("valid frames were refused"), "{first}");
}

// ---------------------------------------------------------------- found faults

fn welcome(params: usize) -> String {
    ServerMessage::Welcome {
        version: PROTOCOL_VERSION,
        client_id: 1,
        model: ModelSpec {
            num_classes: 10,
            channels: 1,
            height: 28,
            width: 28,
            params,
        },
        shard: None,
        resume: None,
        privacy: None,
    }
    .to_json()
}

/// Found by fuzzing: a welcome announcing usize::MAX parameters made the
/// next task panic (capacity overflow) in `WeightAssembler::new`, which
/// reserved every announced value; 2^40 aborted on allocation failure.
#[test]
fn a_welcome_with_an_impossible_model_does_not_crash_the_client() {
    // Prepare
    let task = ServerMessage::Task(TaskSpec {
        round: 1,
        hop: 1,
        epochs: 1,
        batch_size: 8,
        learning_rate: 1e-3,
        prox_mu: 0.0,
        deadline_ms: 1000,
        stall_ms: None,
        seed: 3,
        encoding: WeightEncoding::F32,
        chunks: 1,
        place: None,
        secure_weight: None,
        secure_clip: None,
        secure_noise: None,
    });

    // Execute: the second size would abort the test binary, not panic.
    let outcomes = [usize::MAX, 1 << 40].map(|params| {
        let (mut session, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
        session.on_text(&welcome(params));
        catch_unwind(AssertUnwindSafe(|| session.on_text(&task.to_json())))
    });

    // Assert
    assert!(outcomes.iter().all(Result::is_ok), "a task panicked");
}

/// Found by fuzzing: after refusing a non-finite chunk, the assembler kept
/// its values, so pushing on could complete a vector holding the NaN (both
/// callers dropped it at the first error, so it was latent).
#[test]
fn an_assembler_never_yields_a_value_it_refused() {
    // Prepare: 4 values in 2 chunks of 2; the first chunk holds a NaN.
    let limit = HEADER_BYTES + 8;
    let bad = encode_chunks(1, 1, &[f32::NAN, 1.0, 1.0, 1.0], WeightEncoding::F32, limit);
    let good = encode_chunks(1, 1, &[1.0; 4], WeightEncoding::F32, limit);
    let empty_last: Vec<u8> = [1u32, 1, 1, 2]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let mut assembler = WeightAssembler::new(1, 1, 2, 4, WeightEncoding::F32, limit);

    // Execute: the refused chunk, then the good first chunk, then an empty last one.
    let outcomes = [&bad[0], &good[0], &empty_last].map(|frame| assembler.push(frame));

    // Assert
    assert!(outcomes[0].is_err(), "{outcomes:?}");
    for outcome in &outcomes {
        if let Ok(Some(weights)) = outcome {
            assert!(weights.iter().all(|v| v.is_finite()), "yielded {weights:?}");
        }
    }
}

/// Found by fuzzing: a closed session still answered round-done, error and
/// every other frame (with `Send(error)` and `Close` again).
#[test]
fn a_closed_session_answers_nothing() {
    // Prepare: a session closed by a malformed frame.
    let (mut session, _) = ClientSession::start("flex", None, DataSource::Demo, 1 << 20);
    session.on_text("{nope");
    assert!(session.is_closed());
    let round_done = ServerMessage::RoundDone {
        round: 1,
        accuracy: 0.5,
        loss: 0.1,
        epsilon: None,
    };

    // Execute
    let after = [
        session.on_text(&round_done.to_json()),
        session.on_text(&welcome(5)),
        session.on_binary(&[0; 20]),
    ];

    // Assert
    assert!(after.iter().all(Vec::is_empty), "{after:?}");
}
