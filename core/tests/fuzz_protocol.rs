//! Property tests of the protocol's decoders: each property runs 256 cases,
//! a seed each, from which `protocol::fuzz`'s generators (the ones its
//! fuzzing runs use) build the input (messages, weight transfers, session
//! lives, most of them mutated), and `protocol::fuzz` checks it; then a
//! short seeded fuzzing run, proof that the harness notices a crash, and
//! the faults the fuzzing found, each kept as a test naming it.
//!
//! A failing case reports its input and its seed: `fuzz::session_case(&mut
//! StdRng::seed_from_u64(seed))` (or the target's generator) builds it
//! again. The seeds are fixed, so a run is the same run everywhere;
//! `ASTRAEA_FUZZ_SEED=N` moves them to look elsewhere, and `astraea bench
//! fuzz` runs millions of inputs.
//!
//! No property-testing crate: proptest only drew the seed here, and as a
//! dev-dependency it gave `regex-syntax` (under burn) other features than a
//! plain build, so `cargo test` and `cargo run` each compiled burn anew.

use std::panic::{AssertUnwindSafe, catch_unwind};

use astraea_core::protocol::frames::HEADER_BYTES;
use astraea_core::protocol::fuzz::{self, AssemblerCase, FuzzReport, Target};
use astraea_core::protocol::{
    ClientSession, DataSource, ModelSpec, PROTOCOL_VERSION, ServerMessage, TaskSpec,
    WeightAssembler, WeightEncoding, encode_chunks,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

// ---------------------------------------------------------------- properties

/// Cases each property runs.
const CASES: u64 = 256;

/// Runs `case` on `CASES` seeds (from `ASTRAEA_FUZZ_SEED`, 0 by default):
/// it builds its inputs from the generator it is given and checks each
/// through the report, as a fuzzing run does. Fails on the first case that
/// panics or breaks its property, with the harness's report (message and
/// input) and the seed.
fn holds(case: impl Fn(&mut StdRng, &mut FuzzReport)) {
    let base: u64 = std::env::var("ASTRAEA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for seed in base..base.saturating_add(CASES) {
        let mut report = FuzzReport::default();
        case(&mut StdRng::seed_from_u64(seed), &mut report);
        assert_eq!(report.crashes, 0, "seed {seed}: {report}");
    }
}

#[test]
fn client_texts_parse_or_are_refused_without_panicking() {
    holds(|rng, report| {
        // A message, its text mutated, and a text that is none.
        let message = fuzz::client_message(rng);
        let mutated = fuzz::mutated_text(rng, &message);
        let garbage = fuzz::garbage_text(rng);
        let target = Target::ClientText;
        report.check(target, &message, fuzz::check_client_message);
        report.check(target, mutated.as_str(), fuzz::check_client_text);
        report.check(target, garbage.as_str(), fuzz::check_client_text);
    });
}

#[test]
fn server_texts_parse_or_are_refused_without_panicking() {
    holds(|rng, report| {
        let message = fuzz::server_message(rng, None);
        let mutated = fuzz::mutated_text(rng, &message);
        let garbage = fuzz::garbage_text(rng);
        let target = Target::ServerText;
        report.check(target, &message, fuzz::check_server_message);
        report.check(target, mutated.as_str(), fuzz::check_server_text);
        report.check(target, garbage.as_str(), fuzz::check_server_text);
    });
}

#[test]
fn the_assembler_yields_whole_finite_weights_or_refuses() {
    holds(|rng, report| {
        let case = fuzz::assembler_case(rng);
        report.check(Target::Assembler, &case, fuzz::check_assembler);
    });
}

#[test]
fn a_session_stays_consistent_whatever_the_server_sends() {
    holds(|rng, report| {
        let case = fuzz::session_case(rng);
        report.check(Target::Session, &case, fuzz::check_session);
    });
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
        rejoin_within_ms: None,
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
        rejoin_within_ms: None,
        last: false,
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
