//! Secure aggregation against a real server on 127.0.0.1:0: native clients
//! mask their chains' results, a hand-written masker drops out after the
//! key exchange, and the server unmasks the sum without it.

mod support;

use std::sync::atomic::Ordering;

use astraea_core::protocol::{
    ClientMessage, ErrorCode, ServerMessage, UpdateSpec, WeightEncoding, encode_chunks, masked_bits,
};
use astraea_core::secagg::{Masker, SecAggParams};
use astraea_core::strategy::StrategyKind;
use astraea_native::run_swarm;
use futures_util::{SinkExt, StreamExt};
use support::{Socket, config, finishes, join, options, privately, send, start};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_secure_aggregation_astraea_trains_on_the_unmasked_sum() {
    // Prepare: six native clients in mediators of three; the last of each
    // chain masks.
    let mut cfg = config(StrategyKind::Astraea, 6, 2);
    cfg.secure_aggregation = true;
    let (running, address) = start(cfg).await;
    let swarm = tokio::spawn(run_swarm(6, options(&address)));

    // Execute
    finishes(running.coordinator).await;
    swarm.abort();

    // Assert: both rounds adopted an unmasked model that beats chance by
    // far (a sum left masked decodes to noise of magnitude ~1,000 and is
    // refused by the bounds check, dropping the round).
    let state = &running.state;
    assert_eq!(state.dropped_rounds.load(Ordering::Relaxed), 0);
    let history = state.status().history.clone();
    assert_eq!(history.len(), 2);
    let accuracy = history.last().unwrap().accuracy;
    assert!(accuracy > 0.3, "accuracy {accuracy}");
}

/// A client written from the protocol that shares its keys and then
/// leaves when its (masked) task comes, without answering. Returns the
/// steps it went through and the threshold the server set.
fn masker_that_leaves_at_its_task(
    mut socket: Socket,
) -> tokio::task::JoinHandle<(Vec<&'static str>, u32)> {
    tokio::spawn(async move {
        let mut masker: Option<Masker> = None;
        let mut steps = Vec::new();
        let mut set_threshold = 0;
        while let Some(Ok(frame)) = socket.next().await {
            let Message::Text(text) = frame else { continue };
            match ServerMessage::from_json(&text).unwrap() {
                ServerMessage::SecureSetup {
                    round,
                    slot,
                    maskers,
                    threshold,
                } => {
                    let params = SecAggParams::new(round, maskers, threshold).unwrap();
                    let m = Masker::from_entropy(params, slot).unwrap();
                    let keys = m.keys();
                    masker = Some(m);
                    set_threshold = threshold;
                    send(&mut socket, &ClientMessage::SecureKeys { round, keys }).await;
                    steps.push("keys");
                }
                ServerMessage::SecureRoster { round, keys } => {
                    let shares = masker.as_mut().unwrap().share_keys(&keys).unwrap();
                    send(&mut socket, &ClientMessage::SecureShares { round, shares }).await;
                    steps.push("shares");
                }
                ServerMessage::SecureInbox { shares, .. } => {
                    masker.as_mut().unwrap().receive_shares(&shares).unwrap();
                    steps.push("inbox");
                }
                ServerMessage::Task(task) => {
                    assert!(task.secure_weight.is_some(), "a FedAvg hop is masked");
                    steps.push("task");
                    break;
                }
                // The round ended without its task: the steps say so.
                ServerMessage::RoundDone { .. } => break,
                _ => {}
            }
        }
        // Leaves without answering: its mask must come off through the
        // others' shares of its key.
        drop(socket);
        (steps, set_threshold)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masker_that_drops_after_the_key_exchange_is_unmasked_from_the_others_shares() {
    // Prepare: FedAvg, so every client masks its own result: three native
    // clients and one that leaves at its masked task. IID shards, so one
    // FedAvg round beats chance (0.55-0.6 measured with and without
    // masking).
    let mut cfg = config(StrategyKind::FedAvg, 4, 1);
    cfg.secure_aggregation = true;
    cfg.partition = astraea_core::partition::PartitionSpec::Iid;
    let (running, address) = start(cfg).await;
    let swarm = tokio::spawn(run_swarm(3, options(&address)));
    let dropper = masker_that_leaves_at_its_task(join(&address).await);

    // Execute
    finishes(running.coordinator).await;
    let (steps, threshold) = dropper.await.unwrap();
    swarm.abort();

    // Assert: the dropper went through the exchange (a majority of 4 is
    // 3), and the round still adopted a model from the three others'
    // unmasked sum.
    assert_eq!(steps, ["keys", "shares", "inbox", "task"]);
    assert_eq!(threshold, 3);
    let state = &running.state;
    assert_eq!(state.dropped_rounds.load(Ordering::Relaxed), 0);
    let history = state.status().history.clone();
    assert_eq!(history.len(), 1);
    // Which shard the dropper holds, and so which three are averaged,
    // depends on the order the four join: most runs give 0.55-0.6, and
    // 3 runs in about 35 (session 11; none in 29 of the commit before it)
    // gave 0.36. A sum unmasked wrong is noise (chance, 0.1) or out of
    // bounds (dropped, asserted above).
    assert!(
        history[0].accuracy > 0.25,
        "accuracy {}",
        history[0].accuracy
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_quorum_of_every_masker_one_that_drops_loses_the_round() {
    // Prepare: as above, with --secure-quorum 1: all four must survive.
    let mut cfg = config(StrategyKind::FedAvg, 4, 1);
    cfg.secure_aggregation = true;
    cfg.secure_quorum = 1.0;
    cfg.partition = astraea_core::partition::PartitionSpec::Iid;
    let (running, address) = start(cfg).await;
    let swarm = tokio::spawn(run_swarm(3, options(&address)));
    let dropper = masker_that_leaves_at_its_task(join(&address).await);

    // Execute
    finishes(running.coordinator).await;
    let (steps, threshold) = dropper.await.unwrap();
    swarm.abort();

    // Assert: the threshold was all four, so the round could not be
    // unmasked: dropped, the model unchanged.
    assert_eq!(steps, ["keys", "shares", "inbox", "task"]);
    assert_eq!(threshold, 4);
    assert_eq!(running.state.dropped_rounds.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masker_that_garbles_a_share_pushes_nobody_out_and_the_round_unmasks() {
    // Prepare: FedAvg, three native clients and one masker written from
    // the protocol that sends one of the others a share that does not
    // decrypt, then plays the rest honestly (its masked result is the
    // model it was sent).
    // Execute
    let Hostile {
        running,
        played: Played {
            revealed,
            socket: _socket,
            ..
        },
        swarm,
        ..
    } = with_a_hostile_masker(4, 1, 4, Hostility::GarbleOne).await;
    let state = &running.state;
    let connected = state.clients().len();
    swarm.abort();

    // Assert: nobody was pushed out or refused, and the round adopted the
    // unmasked mean of all four.
    assert!(revealed, "the garbler was never asked to reveal");
    assert_eq!(connected, 4);
    assert_eq!(state.rejections.load(Ordering::Relaxed), 0);
    assert_eq!(state.dropped_rounds.load(Ordering::Relaxed), 0);
    // One round of three honest IID clients: 0.28 to 0.8 seen (which of
    // their first hops the loss rule refuses varies run to run); a sum
    // unmasked wrongly is noise, at chance (0.1) or below.
    let accuracy = state.status().history[0].accuracy;
    assert!(accuracy > 0.2, "accuracy {accuracy}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masker_whose_shares_decrypt_for_no_one_is_named_and_the_next_round_goes_on_without_it() {
    // The bug: a masker that sent garbage shares made every secure round
    // fail, for ever, and was never identified.
    // Execute
    let Hostile {
        running,
        played,
        swarm,
        ..
    } = with_a_hostile_masker(4, 2, 3, Hostility::GarbleAll { rounds: 2 }).await;
    let state = &running.state;
    let connected = state.clients().len();
    let dropped = state.dropped_rounds.load(Ordering::Relaxed);
    let history = state.status().history.clone();
    swarm.abort();

    // Assert: the first round is lost and its culprit named: it sits the
    // second out (kept, not refused: shares can be made to look so), which
    // unmasks the three others' sum.
    assert_eq!(played.refused, None);
    assert_eq!(connected, 4);
    assert_eq!(state.rejections.load(Ordering::Relaxed), 0);
    assert_eq!(dropped, 1);
    assert_eq!(history.len(), 2);
    let named = state.suspects.lock().unwrap().sitting_out(3);
    assert_eq!(named.len(), 1, "{named:?}");
    let second: Vec<u64> = history[1].mediators.concat();
    assert_eq!(second.len(), 3, "{second:?}");
    assert!(!second.iter().any(|id| named.contains(id)));
    assert!(
        history[1].accuracy > 0.2,
        "accuracy {}",
        history[1].accuracy
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masker_that_adds_a_constant_loses_the_round_not_the_model() {
    // The bug: a masker adding a constant to its masked input moved every
    // weight by it each round, and the rounds were adopted (test loss
    // 2.5e7, then 2e9).
    // Execute
    let Hostile {
        running,
        played,
        swarm,
        initial: before,
    } = with_a_hostile_masker(
        4,
        1,
        4,
        Hostility::AddConstant {
            value: 4.0,
            rounds: 1,
        },
    )
    .await;
    let state = &running.state;
    let after = astraea_server::state::lock(&state.global).clone().unwrap();
    swarm.abort();

    // Assert: the round is dropped, the model is the one it started from
    // and finite; nobody is refused (a constant in a masked sum names no
    // masker).
    assert!(played.revealed);
    assert_eq!(played.refused, None);
    assert_eq!(state.dropped_rounds.load(Ordering::Relaxed), 1);
    assert!(after.values.iter().all(|w| w.is_finite() && w.abs() < 10.0));
    if let Some(before) = before {
        assert_eq!(before, after.values);
    }
    let loss = state.status().history[0].loss;
    assert!(loss < 5.0, "test loss {loss}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masker_that_spoils_every_sum_it_is_in_is_narrowed_down_and_sits_out() {
    // The bug: a sum spoiled by one of its maskers names none of them, so
    // a masker adding a constant every round made every secure round fail
    // for ever. Group testing (half the suspects sit each round out)
    // narrows it down.
    // Named within 4 rounds, it sits the next 4 out: rounds 5 and 6
    // without it.
    let rounds = 6;

    // Execute
    let Hostile {
        running,
        played,
        swarm,
        ..
    } = with_a_hostile_masker(
        6,
        rounds,
        3,
        Hostility::AddConstant {
            value: 4.0,
            rounds: rounds as usize,
        },
    )
    .await;
    let state = &running.state;
    let dropped = state.dropped_rounds.load(Ordering::Relaxed);
    let connected = state.clients().len();
    let history = state.status().history.clone();
    swarm.abort();

    // Assert: named within 1 + log2(6) spoiled rounds, then it sits out
    // and the rounds are adopted; nobody refused.
    assert_eq!(played.refused, None);
    assert_eq!(state.rejections.load(Ordering::Relaxed), 0);
    assert_eq!(connected, 6);
    assert!((1..=4).contains(&dropped), "{dropped} rounds dropped");
    assert_eq!(history.len(), rounds as usize);
    let named = state.suspects.lock().unwrap().sitting_out(rounds + 1);
    assert_eq!(named.len(), 1, "{named:?}");
    let last = history.last().unwrap();
    let members: Vec<u64> = last.mediators.concat();
    assert_eq!(members.len(), 5, "{members:?}");
    assert!(!members.iter().any(|id| named.contains(id)));
    assert!(last.accuracy > 0.2, "accuracy {}", last.accuracy);
}

/// A finished FedAvg run under secure aggregation with one hostile masker.
struct Hostile {
    running: astraea_server::Running,
    played: Played,
    /// The native clients: abort once the run's state is read.
    swarm: tokio::task::JoinHandle<Vec<anyhow::Result<astraea_native::ClientSummary>>>,
    /// The model the run started from, when there was one before it began.
    initial: Option<Vec<f32>>,
}

/// Runs `rounds` FedAvg rounds under secure aggregation on IID shards,
/// each waiting for `min_clients`: `clients - 1` native clients and one
/// masker that breaks the protocol as `hostility` says.
async fn with_a_hostile_masker(
    clients: usize,
    rounds: u32,
    min_clients: usize,
    hostility: Hostility,
) -> Hostile {
    let mut cfg = config(StrategyKind::FedAvg, clients, rounds);
    cfg.secure_aggregation = true;
    cfg.partition = astraea_core::partition::PartitionSpec::Iid;
    cfg.min_clients = min_clients;
    let (mut running, address) = start(cfg).await;
    let params = running.state.model.params;
    let initial = {
        let global = astraea_server::state::lock(&running.state.global).clone();
        global.map(|w| w.values.clone())
    };
    // The masker joins first: with `min_clients` below `clients`, a
    // first round could otherwise start before it is there.
    let socket = join(&address).await;
    let swarm = tokio::spawn(run_swarm(clients - 1, options(&address)));
    let masker = tokio::spawn(hostile_masker(socket, params, hostility));
    finishes(&mut running.coordinator).await;
    let played = masker.await.unwrap();
    Hostile {
        running,
        played,
        swarm,
        initial,
    }
}

/// How a hand-written masker breaks the protocol.
#[derive(Clone, Copy)]
enum Hostility {
    /// One of its shares does not decrypt.
    GarbleOne,
    /// None of its shares decrypts, for `rounds` rounds.
    GarbleAll { rounds: usize },
    /// It masks the model it was sent plus `value`, for `rounds` rounds.
    AddConstant { value: f32, rounds: usize },
}

/// What became of a hostile masker.
struct Played {
    /// It was asked to reveal shares.
    revealed: bool,
    /// The error code it was refused with, if it was.
    refused: Option<ErrorCode>,
    /// Its socket, kept until the verdicts are read (dropped earlier, it
    /// would race the count of who is still connected).
    socket: Socket,
}

/// A masker written from the protocol, FedAvg's masked hop being the model
/// it was sent, that misbehaves as `hostility` says and plays the rest
/// honestly; it stops after the rounds it was given (at its refusal, if
/// it is refused).
async fn hostile_masker(mut socket: Socket, params: usize, hostility: Hostility) -> Played {
    let mut masker: Option<Masker> = None;
    let mut revealed = false;
    let mut refused = None;
    // The rounds it plays before it stops reading (a masker refused
    // stops at its `error`).
    let mut rounds_left = match hostility {
        Hostility::GarbleOne => 1,
        Hostility::GarbleAll { rounds } => rounds,
        Hostility::AddConstant { rounds, .. } => rounds,
    };
    while let Some(Ok(frame)) = socket.next().await {
        let Message::Text(text) = frame else { continue };
        match ServerMessage::from_json(&text).unwrap() {
            ServerMessage::SecureSetup {
                round,
                slot,
                maskers,
                threshold,
            } => {
                let params = SecAggParams::new(round, maskers, threshold).unwrap();
                let m = Masker::from_entropy(params, slot).unwrap();
                let keys = m.keys();
                masker = Some(m);
                send(&mut socket, &ClientMessage::SecureKeys { round, keys }).await;
            }
            ServerMessage::SecureRoster { round, keys } => {
                let mut shares = masker.as_mut().unwrap().share_keys(&keys).unwrap();
                let garbled = match hostility {
                    Hostility::GarbleOne => 1,
                    Hostility::GarbleAll { .. } => shares.len(),
                    Hostility::AddConstant { .. } => 0,
                };
                for share in &mut shares[..garbled] {
                    share.ciphertext[7] ^= 0xff;
                }
                send(&mut socket, &ClientMessage::SecureShares { round, shares }).await;
            }
            ServerMessage::SecureInbox { shares, .. } => {
                masker.as_mut().unwrap().receive_shares(&shares).unwrap();
            }
            ServerMessage::Task(task) => {
                let weights = support::task_weights(&mut socket, &task, params).await;
                let weight = task.secure_weight.expect("a FedAvg hop is masked");
                let input: Vec<f32> = match hostility {
                    Hostility::AddConstant { value, .. } => {
                        weights.iter().map(|w| w + value).collect()
                    }
                    _ => weights,
                };
                let masked = masker.as_ref().unwrap().mask(&input, weight).unwrap();
                let frames = encode_chunks(
                    task.round,
                    task.hop,
                    &masked_bits(&masked),
                    WeightEncoding::Masked,
                    64 * 1024,
                );
                let update = ClientMessage::Update(UpdateSpec {
                    round: task.round,
                    hop: task.hop,
                    samples: 50,
                    loss: 0.1,
                    seconds: 0.1,
                    encoding: WeightEncoding::Masked,
                    chunks: frames.len() as u32,
                });
                send(&mut socket, &update).await;
                for frame in frames {
                    socket.send(Message::Binary(frame.into())).await.unwrap();
                }
            }
            ServerMessage::SecureUnmask {
                round,
                survivors,
                dropped,
            } => {
                let shares = masker
                    .as_mut()
                    .unwrap()
                    .reveal(&survivors, &dropped)
                    .unwrap();
                send(&mut socket, &ClientMessage::SecureReveal { round, shares }).await;
                revealed = true;
            }
            ServerMessage::RoundDone { .. } => {
                rounds_left = rounds_left.saturating_sub(1);
                if rounds_left == 0 {
                    break;
                }
            }
            ServerMessage::Error { code, .. } => {
                refused = Some(code);
                break;
            }
            _ => {}
        }
    }
    // The socket goes back with the verdict: dropped here, it would
    // race the count of who is still connected.
    Played {
        revealed,
        refused,
        socket,
    }
}

/// Runs `cfg` (one DP round under secure aggregation) with six native
/// clients and checks that the round was adopted and spent a finite
/// epsilon. Returns the squared L2 distance the round moved the model and
/// the model's number of weights.
async fn one_private_round_of_six(cfg: astraea_server::ServeConfig) -> (f64, usize) {
    let (running, address) = start(cfg).await;
    let initial = loop {
        if let Some(global) = running.state.global.lock().unwrap().clone() {
            break global.values.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let swarm = tokio::spawn(run_swarm(6, options(&address)));
    finishes(running.coordinator).await;
    swarm.abort();
    let state = &running.state;
    assert_eq!(state.dropped_rounds.load(Ordering::Relaxed), 0);
    let history = state.status().history.clone();
    assert_eq!(history.len(), 1);
    assert!(history[0].epsilon.is_some_and(f64::is_finite));
    let adopted = state.global.lock().unwrap().clone().unwrap().values.clone();
    let squared = adopted
        .iter()
        .zip(&initial)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>();
    (squared, initial.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_secure_aggregation_with_dp_a_round_moves_the_model_at_most_the_clip() {
    // Prepare: Astraea, six native clients in two mediators of three, two
    // passes (six hops a chain): the server clips each chain's first five
    // hops to C (1 - 1/6), its masker clips its own masked hop to C / 6.
    // C = 0.05 where a mediator's update here is about 1; the noise
    // multiplier is tiny (1e-4: a noise vector of norm ~1e-3 on the mean)
    // so that the clip is what the test sees.
    let clip = 0.05;
    let mut cfg = config(StrategyKind::Astraea, 6, 1);
    cfg.secure_aggregation = true;
    privately(&mut cfg, clip, 1e-4, f64::INFINITY, None);

    // Execute
    let (squared, _) = one_private_round_of_six(cfg).await;

    // Assert: the round moved the model by at most the clip (the mean of
    // two updates within C, plus the noise).
    let moved = squared.sqrt();
    assert!(moved > 0.0, "the round changed nothing");
    assert!(
        moved <= clip + 0.005,
        "the model moved {moved}, the clip is {clip}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_distributed_dp_the_maskers_noise_is_the_rounds_noise_and_the_server_adds_none() {
    // Prepare: as above, two mediators of three, so two maskers, both
    // needed to unmask. Noise multiplier 10 on clip 0.05 with mediators
    // of several clients (sensitivity 2C): noise of deviation 1 on the
    // sum, 0.5 per weight on the mean of two. Each masker adds its share,
    // 1 / sqrt(2); the server adds nothing. The clipped updates (norm at
    // most 0.05 over 63,286 weights) are lost in it.
    let (clip, sigma) = (0.05, 10.0);
    let mut cfg = config(StrategyKind::Astraea, 6, 1);
    cfg.secure_aggregation = true;
    privately(&mut cfg, clip, sigma, f64::INFINITY, None);
    if let Some(dp) = cfg.model_privacy.as_mut() {
        dp.distributed = true;
    }

    // Execute
    let (squared, weights) = one_private_round_of_six(cfg).await;

    // Assert: the model moved by the round's noise: 0.5 per weight (the
    // maskers' shares summed), not ~0 (no share added) nor 0.71 (the
    // server adding its own too).
    let per_weight = (squared / weights as f64).sqrt();
    assert!(
        (per_weight - 0.5).abs() < 0.03,
        "the model moved {per_weight} per weight, the round's noise is 0.5"
    );
}

#[tokio::test]
async fn secure_aggregation_is_refused_where_the_server_would_need_each_result() {
    use astraea_core::robust::AggregationRule;
    let listener = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let mut robust = config(StrategyKind::FedAvg, 4, 1);
    robust.secure_aggregation = true;
    robust.settings.aggregation = AggregationRule::Median;
    let mut asynchronous = config(StrategyKind::Astraea, 4, 1);
    asynchronous.secure_aggregation = true;
    asynchronous.schedule.mode = astraea_core::asynchronous::Mode::Async;
    let mut too_many = config(StrategyKind::FedAvg, 4, 1);
    too_many.secure_aggregation = true;
    too_many.participants = 256;
    // Adaptive clipping follows the results' norms, which the server
    // cannot see.
    let mut adaptive = config(StrategyKind::FedAvg, 4, 1);
    adaptive.secure_aggregation = true;
    let quantile = astraea_core::privacy::AdaptiveClip {
        quantile: 0.5,
        learning_rate: 0.2,
        count_noise: 5.0,
    };
    privately(&mut adaptive, 1.0, 1.0, 8.0, Some(quantile));
    // A clip that is not a number would reach the maskers as JSON null.
    let mut infinite_clip = config(StrategyKind::FedAvg, 4, 1);
    infinite_clip.secure_aggregation = true;
    privately(&mut infinite_clip, f64::INFINITY, 1.0, 8.0, None);
    // Distributed DP without masks would hand the server each share.
    let mut unmasked_shares = config(StrategyKind::FedAvg, 4, 1);
    privately(&mut unmasked_shares, 1.0, 1.0, 8.0, None);
    if let Some(dp) = unmasked_shares.model_privacy.as_mut() {
        dp.distributed = true;
    }
    for cfg in [
        robust,
        asynchronous,
        too_many,
        adaptive,
        infinite_clip,
        unmasked_shares,
    ] {
        let refused = astraea_server::start(listener().await, cfg).await;
        assert!(refused.is_err());
    }
}
