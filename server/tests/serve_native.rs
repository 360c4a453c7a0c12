//! A real server on 127.0.0.1:0 with real native clients over WebSockets,
//! training on real MNIST shards.

mod support;

use std::time::Duration;

use astraea_core::protocol::{
    ClientMessage, DataSource, ServerMessage, UpdateSpec, WeightEncoding, encode_chunks,
};
use astraea_core::strategy::{Rescheduling, StrategyKind};
use astraea_native::run_swarm;
use astraea_server::state::Phase;
use futures_util::{SinkExt, StreamExt};
use support::{
    config, connect, connect_as_demo, finishes, join, next_error, options, privately, send, start,
};
use tokio_tungstenite::tungstenite::Message;

/// A plain HTTP/1.1 request over loopback; returns the status and body.
async fn http(address: &str, method: &str, path: &str, extra_header: &str) -> (u16, Vec<u8>) {
    http_with_body(address, method, path, extra_header, "").await
}

/// A request with a body.
async fn http_with_body(
    address: &str,
    method: &str,
    path: &str,
    extra_header: &str,
    body: &str,
) -> (u16, Vec<u8>) {
    let response = astraea_server::loopback::request(address, method, path, extra_header, body)
        .await
        .unwrap();
    (response.status, response.body)
}

/// A GET that must succeed; returns the body as text.
async fn http_get(address: &str, path: &str) -> String {
    let (status, body) = http(address, "GET", path, "").await;
    assert_eq!(status, 200, "GET {path}");
    String::from_utf8(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_native_clients_finish_three_astraea_rounds_and_accuracy_rises() {
    // Prepare: a durable run, so the database can be checked too.
    let state_dir = std::env::temp_dir().join(format!("astraea-six-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let mut cfg = config(StrategyKind::Astraea, 6, 3);
    cfg.state_dir = Some(state_dir.clone());
    let (running, address) = start(cfg).await;
    let swarm = tokio::spawn(run_swarm(6, options(&address)));

    // Execute
    finishes(running.coordinator).await;
    let status = http_get(&address, "/api/status").await;
    let rounds = http_get(&address, "/api/rounds").await;
    swarm.abort();

    // Assert
    let history = running.state.status().history.clone();
    assert_eq!(history.len(), 3);
    assert!(
        history[2].accuracy > history[0].accuracy && history[2].accuracy > 0.3,
        "accuracy by round: {:?}",
        history.iter().map(|r| r.accuracy).collect::<Vec<_>>()
    );
    assert!(history[2].bytes_down > history[0].bytes_down);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["phase"], "finished");
    assert_eq!(status["round"], 3);
    assert_eq!(status["strategy"], "astraea");
    assert_eq!(status["scheduler"], "greedy");
    assert_eq!(status["mediators"].as_array().unwrap().len(), 2);
    assert!(status["plan"].as_array().is_some(), "{status}");
    let rounds: serde_json::Value = serde_json::from_str(&rounds).unwrap();
    assert_eq!(rounds.as_array().unwrap().len(), 3);
    assert_eq!(running.state.status().phase, Phase::Finished);
    let db = rusqlite::Connection::open(state_dir.join("astraea.db")).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |row| row.get(0)).unwrap() };
    assert_eq!(count("SELECT COUNT(*) FROM rounds"), 3);
    assert_eq!(
        count("SELECT COUNT(*) FROM mediators"),
        6,
        "two mediators a round"
    );
    assert_eq!(count("SELECT COUNT(*) FROM clients"), 6);
    assert_eq!(count("SELECT finished FROM runs"), 1);
    // Each record says what trained (it said 0 samples in 0 s) and how the
    // round's hops ended.
    let mut previous = (0, 0.0);
    for record in &history {
        assert!(
            record.train_samples > previous.0 && record.train_s > previous.1,
            "round {}: {} samples in {} s after {previous:?}",
            record.round,
            record.train_samples,
            record.train_s
        );
        previous = (record.train_samples, record.train_s);
        // Two mediators of three, or of fewer when the loss rule benched a
        // client (two refusals in a row); every planned hop ends once.
        assert_eq!(record.mediators.len(), 2);
        let members: usize = record.mediators.iter().map(Vec::len).sum();
        assert_eq!(record.hops.total(), 2 * members as u64, "{:?}", record.hops);
        assert!(record.hops.accepted > 0);
    }
    assert_eq!(
        count("SELECT train_samples FROM rounds WHERE round = 3"),
        history[2].train_samples as i64
    );
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// Native clients train each hop on two threads shared as `split`: the
/// run of three rounds finishes, every hop judged, and the model's
/// accuracy rises (long-tailed shards of 1,000 samples: local SGD, half
/// the sequential steps a hop, rises slower).
async fn clients_on_two_threads_finish_a_run_that_learns(split: astraea_core::train::Split) {
    // Prepare
    let (running, address) = start(config(StrategyKind::FedAvg, 3, 3)).await;
    let options = astraea_native::ClientOptions {
        threads: 2,
        split,
        ..options(&address)
    };
    let swarm = tokio::spawn(run_swarm(3, options));

    // Execute
    finishes(running.coordinator).await;
    swarm.abort();

    // Assert: every hop came back (none skipped) and was judged; the
    // model learnt (the slices' update is one thread's: core's tests).
    let history = running.state.status().history.clone();
    assert_eq!(history.len(), 3);
    for round in &history {
        assert_eq!(round.hops.skipped, 0, "{history:?}");
        assert_eq!(round.hops.accepted + round.hops.refused, 3, "{history:?}");
    }
    assert!(history[2].accuracy > history[0].accuracy, "{history:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_clients_training_each_hop_on_two_threads_finish_a_run_that_learns() {
    clients_on_two_threads_finish_a_run_that_learns(astraea_core::train::Split::Slices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_clients_training_each_hop_by_local_sgd_finish_a_run_that_learns() {
    clients_on_two_threads_finish_a_run_that_learns(astraea_core::train::Split::Local { sync: 5 })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_frame_and_a_drop() {
    // Prepare: a server that never starts a round (it waits for 50 clients).
    let mut cfg = config(StrategyKind::FedAvg, 50, 1);
    cfg.min_clients = 50;
    let (running, address) = start(cfg).await;
    let params = running.state.model.params;
    let update = |chunks: u32| {
        ClientMessage::Update(UpdateSpec {
            round: 1,
            hop: 1,
            samples: 5,
            loss: 0.1,
            seconds: 0.1,
            encoding: WeightEncoding::F32,
            chunks,
        })
        .to_json()
    };

    // Execute and assert, one kind of bad input after another.
    let mut malformed = join(&address).await;
    malformed
        .send(Message::Text("{\"type\":\"teleport\"}".into()))
        .await
        .unwrap();
    let ServerMessage::Error { code, .. } = next_error(&mut malformed).await else {
        unreachable!()
    };
    assert_eq!(code, astraea_core::protocol::ErrorCode::Malformed);

    let mut short = join(&address).await;
    let frames = encode_chunks(1, 1, &vec![0.5; params - 1], WeightEncoding::F32, 64 * 1024);
    short
        .send(Message::Text(update(frames.len() as u32).into()))
        .await
        .unwrap();
    for frame in frames {
        short.send(Message::Binary(frame.into())).await.unwrap();
    }
    let ServerMessage::Error { code, message } = next_error(&mut short).await else {
        unreachable!()
    };
    assert_eq!(code, astraea_core::protocol::ErrorCode::Shape, "{message}");
    assert!(message.contains(&format!("expected {params}")), "{message}");

    let mut nan = join(&address).await;
    let mut values = vec![0.5; params];
    values[10] = f32::NAN;
    let frames = encode_chunks(1, 1, &values, WeightEncoding::F32, 64 * 1024);
    nan.send(Message::Text(update(frames.len() as u32).into()))
        .await
        .unwrap();
    // The server drops the client at the first bad chunk, so later sends
    // may find the socket closed.
    for frame in frames {
        let _ = nan.send(Message::Binary(frame.into())).await;
    }
    let ServerMessage::Error { code, .. } = next_error(&mut nan).await else {
        unreachable!()
    };
    assert_eq!(code, astraea_core::protocol::ErrorCode::NonFinite);

    // Dropped clients are gone, and every refusal was counted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(running.state.clients().len(), 0);
    assert_eq!(
        running
            .state
            .rejections
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert!(running.state.status().history.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_with_another_protocol_version_is_refused() {
    let (_running, address) = start(config(StrategyKind::FedAvg, 2, 1)).await;
    let mut socket = connect(&address).await;
    let join = ClientMessage::Join {
        version: 99,
        backend: "test".into(),
        speed: None,
        data: DataSource::Demo,
        resume: None,
    };

    send(&mut socket, &join).await;
    let error = next_error(&mut socket).await;

    assert!(matches!(
        error,
        ServerMessage::Error {
            code: astraea_core::protocol::ErrorCode::Version,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_in_the_middle_of_a_chain_is_skipped_and_the_round_completes() {
    // Prepare: one mediator of four (three real clients and one that dies
    // as soon as its task arrives), rescheduling only so no plan intervenes.
    let mut cfg = config(StrategyKind::AstraeaRescheduling, 4, 1);
    cfg.settings.rescheduling = Rescheduling {
        gamma: 4,
        passes: 2,
        scheduler: astraea_core::astraea::Scheduler::Greedy,
    };
    let (running, address) = start(cfg).await;
    let swarm = tokio::spawn(run_swarm(3, options(&address)));
    let mut doomed = join(&address).await;

    // Execute: wait for the doomed client's task, then vanish mid-chain.
    loop {
        match doomed.next().await {
            Some(Ok(Message::Text(text)))
                if matches!(ServerMessage::from_json(&text), Ok(ServerMessage::Task(_))) =>
            {
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended before a task: {other:?}"),
        }
    }
    drop(doomed);
    tokio::time::timeout(Duration::from_secs(120), running.coordinator)
        .await
        .expect("the round completes without the vanished client")
        .unwrap()
        .unwrap();
    swarm.abort();

    // Assert
    let status = running.state.status().clone();
    assert_eq!(status.history.len(), 1);
    assert!(status.skipped_hops >= 1, "skipped {}", status.skipped_hops);
    assert_eq!(status.mediators.len(), 1);
    assert_eq!(status.mediators[0].members.len(), 4);
    // The three live clients answered both passes: six updates came back.
    let params = running.state.model.params as u64;
    assert!(
        status.history[0].bytes_up >= 6 * 4 * params,
        "{:?}",
        status.history[0]
    );
}

/// What a hostile client saw until its socket ended or `rounds` rounds
/// of tasks were answered: the rounds it was given tasks in, the reasons
/// of its `refused` acks, and the error frame that ended it, if any.
#[derive(Debug, Default)]
struct Seen {
    task_rounds: Vec<u32>,
    refusals: Vec<String>,
    error: Option<ServerMessage>,
}

/// Answers every task on `hostile` with the weights it was sent, changed by
/// `tamper(round, values)`, until an error frame, the socket's end, or the
/// end of the run's last round (`rounds`).
async fn answer_tasks(
    hostile: &mut support::Socket,
    params: usize,
    rounds: u32,
    tamper: impl Fn(u32, &mut [f32]),
) -> Seen {
    let mut seen = Seen::default();
    while let Some(Ok(frame)) = hostile.next().await {
        let Message::Text(text) = frame else { continue };
        match ServerMessage::from_json(&text).unwrap() {
            ServerMessage::Task(task) => {
                seen.task_rounds.push(task.round);
                let mut values = support::task_weights(hostile, &task, params).await;
                tamper(task.round, &mut values);
                let frames = encode_chunks(
                    task.round,
                    task.hop,
                    &values,
                    WeightEncoding::F32,
                    64 * 1024,
                );
                let update = ClientMessage::Update(UpdateSpec {
                    round: task.round,
                    hop: task.hop,
                    samples: 50,
                    loss: 0.1,
                    seconds: 0.1,
                    encoding: WeightEncoding::F32,
                    chunks: frames.len() as u32,
                });
                send(hostile, &update).await;
                for frame in frames {
                    hostile.send(Message::Binary(frame.into())).await.unwrap();
                }
            }
            ServerMessage::Ack {
                outcome: astraea_core::protocol::AckOutcome::Refused,
                reason,
                ..
            } => seen.refusals.push(reason.unwrap_or_default()),
            ServerMessage::RoundDone { round, .. } if round == rounds => break,
            error @ ServerMessage::Error { .. } => {
                seen.error = Some(error);
                break;
            }
            _ => {}
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_far_larger_than_the_others_is_refused_and_the_round_goes_on() {
    // Prepare: five honest clients and one that answers round 1 by echoing
    // the weights and round 2 by pushing them 100 away in every coordinate.
    let (running, address) = start(config(StrategyKind::FedAvg, 6, 2)).await;
    let swarm = tokio::spawn(run_swarm(5, options(&address)));
    let mut hostile = join(&address).await;
    let params = running.state.model.params;

    // Execute
    let seen = answer_tasks(&mut hostile, params, 2, |round, values| {
        if round == 2 {
            values.iter_mut().for_each(|v| *v += 100.0);
        }
    })
    .await;
    tokio::time::timeout(Duration::from_secs(120), running.coordinator)
        .await
        .expect("round 2 completes without the hostile update")
        .unwrap()
        .unwrap();
    swarm.abort();

    // Assert
    let Some(ServerMessage::Error { code, message }) = seen.error else {
        panic!("no error frame: {seen:?}")
    };
    assert_eq!(code, astraea_core::protocol::ErrorCode::Outlier);
    assert!(message.contains("moved the weights"), "{message}");
    assert_eq!(
        running
            .state
            .rejections
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let history = running.state.status().history.clone();
    assert_eq!(history.len(), 2);
    // Had the +100 update been averaged in (50 of about 1,000 samples), every
    // weight would have moved by about 5 and the test loss would explode.
    assert!(
        history[1].loss < 10.0,
        "the global model stayed sane: {history:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_far_above_the_median_of_recent_hops_is_refused_and_its_client_stays() {
    // Prepare: five honest clients and one that answers round 1 honestly
    // sized (the weights echoed) and every later round by moving the
    // weights 20x the median of the hops before (within the guard's bound
    // of 2x their norm). An honest client on skewed data can stand out
    // like this; it was dropped for good.
    let (running, address) = start(config(StrategyKind::FedAvg, 6, 3)).await;
    let swarm = tokio::spawn(run_swarm(5, options(&address)));
    let mut hostile = join(&address).await;
    let params = running.state.model.params;
    let state = running.state.clone();

    // Execute
    let seen = answer_tasks(&mut hostile, params, 3, |round, values| {
        if round >= 2 {
            let mut history = state.guard.history();
            history.sort_by(f64::total_cmp);
            let median = history[history.len() / 2];
            let distance = (20.0 * median).min(astraea_core::guard::l2_norm(values));
            let step = (distance / (values.len() as f64).sqrt()) as f32;
            values.iter_mut().for_each(|v| *v += step);
        }
    })
    .await;
    tokio::time::timeout(Duration::from_secs(120), running.coordinator)
        .await
        .expect("the run completes")
        .unwrap()
        .unwrap();
    swarm.abort();

    // Assert: refused in rounds 2 and 3, never closed, drawn again.
    assert!(seen.error.is_none(), "{seen:?}");
    assert_eq!(seen.task_rounds, vec![1, 2, 3], "{seen:?}");
    assert_eq!(seen.refusals.len(), 2, "{seen:?}");
    assert!(
        seen.refusals.iter().all(|r| r.contains("median")),
        "{seen:?}"
    );
    let count =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(count(&running.state.rejections), 0);
    assert_eq!(count(&running.state.outlier_refusals), 2);
    let metrics = http_get(&address, "/metrics").await;
    assert!(
        metrics.contains("astraea_outlier_refusals_total 2"),
        "{metrics}"
    );
    let history = running.state.status().history.clone();
    assert_eq!(history.len(), 3);
    assert!(history[2].loss < 10.0, "{history:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_need_the_token_and_model_and_metrics_are_served() {
    // Prepare: a server waiting for clients that never come.
    let (running, address) = start(config(StrategyKind::FedAvg, 50, 1)).await;

    // Execute
    let (anonymous, _) = http(&address, "POST", "/api/admin/pause", "").await;
    let (wrong, _) = http(
        &address,
        "POST",
        "/api/admin/pause",
        "Authorization: Bearer guess\r\n",
    )
    .await;
    let (paused, body) = http(
        &address,
        "POST",
        "/api/admin/pause",
        "Authorization: Bearer s3cret\r\n",
    )
    .await;
    let control_after_pause = running.state.control();
    let (stopped, _) = http(
        &address,
        "POST",
        "/api/admin/stop",
        "Authorization: Bearer s3cret\r\n",
    )
    .await;
    let auth = "Authorization: Bearer s3cret\r\nContent-Type: application/json\r\n";
    let configure = |header: &'static str, body: &'static str| {
        http_with_body(&address, "POST", "/api/admin/configure", header, body)
    };
    let (configure_anonymous, _) = configure("", r#"{"rounds":5}"#).await;
    let (configured, settings) = configure(auth, r#"{"rounds":5,"min_clients":2}"#).await;
    let (nonsense, _) = configure(auth, r#"{"participants":0}"#).await;
    let (unknown, _) = configure(auth, r#"{"colour":"red"}"#).await;
    // A finite deadline no clock can hold (the server panicked and exited
    // on it), and one longer than a day.
    let (endless, why) = configure(auth, r#"{"hop_deadline_s":1e308}"#).await;
    let (two_days, _) = configure(auth, r#"{"hop_deadline_s":172800}"#).await;
    let (model_status, model) = http(&address, "GET", "/api/model", "").await;
    let metrics = http_get(&address, "/metrics").await;
    let dashboard_page = http_get(&address, "/dashboard").await;
    let qr = http_get(&address, "/api/join-qr.svg").await;
    let (mut feed, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws/dashboard"))
        .await
        .unwrap();
    let snapshot = match feed.next().await {
        Some(Ok(Message::Text(text))) => text.to_string(),
        other => panic!("no dashboard snapshot: {other:?}"),
    };

    // Assert
    assert_eq!(anonymous, 401);
    assert_eq!(wrong, 401);
    assert_eq!(paused, 200, "{}", String::from_utf8_lossy(&body));
    assert!(control_after_pause.paused && !control_after_pause.stopped);
    assert_eq!(stopped, 200);
    tokio::time::timeout(Duration::from_secs(10), running.coordinator)
        .await
        .expect("a stopped run ends")
        .unwrap()
        .unwrap();
    assert_eq!(configure_anonymous, 401);
    assert_eq!(configured, 200, "{}", String::from_utf8_lossy(&settings));
    let settings: serde_json::Value = serde_json::from_slice(&settings).unwrap();
    assert_eq!(settings["rounds"], 5);
    assert_eq!(settings["min_clients"], 2);
    assert_eq!(settings["participants"], 50, "untouched settings stay");
    assert_eq!((nonsense, unknown), (400, 400));
    assert_eq!((endless, two_days), (400, 400));
    let why = String::from_utf8_lossy(&why);
    assert!(why.contains("hop_deadline_s"), "{why}");
    assert_eq!(running.state.tunable().rounds, 5);
    assert_eq!(model_status, 200);
    let shapes = running
        .state
        .global
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .shapes
        .clone();
    let weights = astraea_core::weights::Weights::from_safetensors(&model, &shapes).unwrap();
    assert_eq!(weights.len(), running.state.model.params);
    // The file says what it is (safetensors: an 8-byte length, then a JSON
    // header whose `__metadata__` holds the card).
    let header_len = u64::from_le_bytes(model[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&model[8..8 + header_len]).unwrap();
    let card = &header["__metadata__"];
    assert_eq!(card["round"], "0", "{card}");
    assert_eq!(card["dataset"], "mnist");
    assert!(card["evaluated_on"].as_str().unwrap().contains("samples"));
    let classes: Vec<String> = serde_json::from_str(card["class_names"].as_str().unwrap()).unwrap();
    assert_eq!(classes.len(), running.state.model.num_classes);
    assert!(
        card["linear_layout"]
            .as_str()
            .unwrap()
            .contains("transpose")
    );
    assert!(
        metrics.contains("# TYPE astraea_rejections_total counter\nastraea_rejections_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains("astraea_clients_connected 0"), "{metrics}");
    assert!(dashboard_page.contains("/dashboard.js"), "{dashboard_page}");
    assert!(qr.contains("<svg"), "{qr}");
    let snapshot: serde_json::Value = serde_json::from_str(&snapshot).unwrap();
    assert_eq!(snapshot["status"]["join_url"], format!("http://{address}/"));
    assert_eq!(snapshot["status"]["settings"]["rounds"], 5);
    assert_eq!(snapshot["status"]["stopped"], true);
    assert!(snapshot["history"].is_array(), "{snapshot}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_round_done_says_the_run_is_over() {
    // Prepare: a run of two rounds, two native clients, and a listener
    // that joins and never says it is ready (never drawn; it hears what
    // every connected client hears).
    let (_running, address) = start(config(StrategyKind::FedAvg, 2, 2)).await;
    let heard = round_dones_heard(&address).await;
    let swarm = tokio::spawn(run_swarm(2, options(&address)));

    // Execute: the listener hears every round-done.
    let lasts = tokio::time::timeout(Duration::from_secs(60), heard).await;
    swarm.abort();

    // Assert: only round 2's says `last` (the bug: nothing said the run
    // was over; a third-party client needed its own count of rounds).
    let lasts = lasts.expect("the last round-done came").unwrap();
    assert_eq!(lasts, vec![(1, false), (2, true)]);
}

/// A listener that joins `address` for a demo shard and never says it is
/// ready (never drawn; it hears what every connected client hears): each
/// `round-done`'s round and `last`, up to the one that says `last`.
async fn round_dones_heard(address: &str) -> tokio::task::JoinHandle<Vec<(u32, bool)>> {
    let mut listener = connect_as_demo(address).await;
    tokio::spawn(async move {
        let mut lasts = Vec::new();
        while let Some(Ok(frame)) = listener.next().await {
            if let Message::Text(text) = frame
                && let Ok(ServerMessage::RoundDone { round, last, .. }) =
                    ServerMessage::from_json(&text)
            {
                lasts.push((round, last));
                if last {
                    break;
                }
            }
        }
        lasts
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_above_the_limit_is_refused_with_an_error_and_a_close() {
    // Prepare: the test server's limit is 64 KiB.
    let (running, address) = start(config(StrategyKind::FedAvg, 50, 1)).await;
    let mut socket = join(&address).await;

    // Execute
    let _ = socket
        .send(Message::Binary(vec![0u8; 200 * 1024].into()))
        .await;
    let error = next_error(&mut socket).await;
    let after = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;

    // Assert: the error, then the close frame the protocol promises
    // (PROTOCOL.md, "Closing and departures"). The bug: the close was
    // held back by Nagle's algorithm behind the error frame and lost to
    // the reset of a socket closed with the frame's rest unread.
    let ServerMessage::Error { code, message } = error else {
        unreachable!()
    };
    assert_eq!(
        code,
        astraea_core::protocol::ErrorCode::TooLarge,
        "{message}"
    );
    assert!(
        matches!(after, Ok(Some(Ok(Message::Close(_))))),
        "after the error: {after:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(running.state.clients().len(), 0);
    assert_eq!(
        running
            .state
            .rejections
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tab_can_fetch_its_demo_shard_as_compact_binary() {
    let (running, address) = start(config(StrategyKind::FedAvg, 5, 1)).await;
    let mut socket = connect_as_demo(&address).await;
    let Some(Ok(Message::Text(welcome))) = socket.next().await else {
        panic!("no welcome")
    };
    let ServerMessage::Welcome { client_id, .. } = ServerMessage::from_json(&welcome).unwrap()
    else {
        panic!("not a welcome: {welcome}")
    };

    let (status, bytes) = http(&address, "GET", &format!("/api/shard/{client_id}"), "").await;
    let (missing, _) = http(&address, "GET", "/api/shard/0", "").await;
    // An id never issued (the bug: any id got a shard).
    let (never_issued, _) = http(&address, "GET", "/api/shard/77", "").await;

    assert_eq!(status, 200);
    assert_eq!(missing, 404);
    assert_eq!(never_issued, 404);
    let shard = astraea_core::data::shard::decode_shard(&bytes).unwrap();
    let indices = &running.state.shards[(client_id as usize - 1) % running.state.shards.len()];
    assert_eq!(shard.len(), indices.len());
    let expected: Vec<u32> = indices
        .iter()
        .map(|&i| running.state.train.labels[i])
        .collect();
    assert_eq!(shard.labels, expected);
    assert!(
        bytes.len() < 4 * shard.images.len(),
        "a byte a pixel, not four"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_label_privacy_clients_report_noisy_counts_and_the_run_trains() {
    // Prepare: the server asks for label counts at epsilon 1 per report.
    let mut cfg = config(StrategyKind::Astraea, 6, 1);
    cfg.label_epsilon = Some(1.0);
    let (running, address) = start(cfg).await;
    let swarm = tokio::spawn(run_swarm(6, options(&address)));

    // Execute
    finishes(running.coordinator).await;
    let status = http_get(&address, "/api/status").await;

    // Assert: the round trained; what the clients reported before the
    // plan is not what the server dealt them; the status says so.
    assert_eq!(running.state.status().history.len(), 1);
    let differing = running
        .state
        .clients()
        .values()
        .filter(|c| c.raw_counts.is_some() && c.raw_counts != c.shard_counts)
        .count();
    swarm.abort();
    assert!(differing > 0, "every client reported its exact counts");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["privacy"]["label_epsilon"], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_run_reports_its_spend_every_round_and_stops_at_its_budget() {
    use astraea_core::privacy::RdpAccountant;
    // Prepare: four clients, all of them in every round (q = 1), noise
    // multiplier 2: a budget between what two and three rounds spend.
    let spent = |rounds: u64| {
        let mut accountant = RdpAccountant::new();
        accountant.compose(1.0, 2.0, rounds);
        accountant.epsilon(1e-5)
    };
    let mut cfg = config(StrategyKind::FedAvg, 4, 5);
    privately(&mut cfg, 0.5, 2.0, (spent(2) + spent(3)) / 2.0, None);
    let (running, address) = start(cfg).await;
    let heard = round_dones_heard(&address).await;
    let swarm = tokio::spawn(run_swarm(4, options(&address)));

    // Execute
    finishes(running.coordinator).await;
    let status = http_get(&address, "/api/status").await;
    swarm.abort();
    let lasts = tokio::time::timeout(Duration::from_secs(10), heard).await;

    // Assert: two rounds of the five, each with its spend.
    let history = running.state.status().history.clone();
    assert_eq!(history.len(), 2, "the budget did not stop the run");
    for (record, rounds) in history.iter().zip([1, 2]) {
        let epsilon = record.epsilon.expect("a private round records its epsilon");
        assert!((epsilon - spent(rounds)).abs() < 1e-9, "{epsilon}");
        assert!(record.loss.is_finite());
    }
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!((status["model_epsilon"].as_f64().unwrap() - spent(2)).abs() < 1e-9);
    // The round the budget ended the run after said it was the last.
    let lasts = lasts.expect("the last round-done came").unwrap();
    assert_eq!(lasts, vec![(1, false), (2, true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_private_run_goes_on_from_the_privacy_it_spent() {
    use astraea_core::privacy::RdpAccountant;
    // The bug: the accountant was not kept; a restarted run counted its
    // past rounds at the noise multiplier configured at the restart, so an
    // operator who raised it after two rounds at sigma 2 was told the run
    // had spent less than it had (and the history lost its epsilons).
    let state_dir = std::env::temp_dir().join(format!("astraea-dp-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let private = |sigma: f64| {
        let mut cfg = config(StrategyKind::FedAvg, 4, 3);
        cfg.state_dir = Some(state_dir.clone());
        privately(&mut cfg, 0.5, sigma, 1e3, None);
        cfg
    };
    let spent = |sigmas: &[f64]| {
        let mut accountant = RdpAccountant::new();
        for &sigma in sigmas {
            accountant.compose(1.0, sigma, 1);
        }
        accountant.epsilon(1e-5)
    };

    // Execute: two rounds at sigma 2, then the server dies; it restarts
    // with sigma 4 and runs the third.
    let (first, address) = start(private(2.0)).await;
    let swarm = tokio::spawn(run_swarm(4, options(&address)));
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while first.state.status().history.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "two rounds within 4 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.coordinator.abort();
    first.server.abort();
    swarm.abort();
    let (second, address) = start(private(4.0)).await;
    let swarm = tokio::spawn(run_swarm(4, options(&address)));
    tokio::time::timeout(Duration::from_secs(240), second.coordinator)
        .await
        .expect("the resumed run finishes")
        .unwrap()
        .unwrap();
    swarm.abort();

    // Assert: the history keeps its epsilons, and round 3 adds one round
    // at sigma 4 to two at sigma 2.
    let history = second.state.status().history.clone();
    assert_eq!(history.len(), 3);
    // The kept records keep what trained, who and how their hops ended;
    // the count of samples goes on from them.
    for record in &history[..2] {
        assert!(
            record.train_samples > 0 && record.train_s > 0.0,
            "{record:?}"
        );
        assert!(
            record.hops.total() > 0 && !record.mediators.is_empty(),
            "{record:?}"
        );
    }
    assert!(history[2].train_samples > history[1].train_samples);
    let expected = [spent(&[2.0]), spent(&[2.0, 2.0]), spent(&[2.0, 2.0, 4.0])];
    for (record, expected) in history.iter().zip(expected) {
        let epsilon = record.epsilon.expect("a private round keeps its epsilon");
        assert!(
            (epsilon - expected).abs() < 1e-9,
            "round {}: epsilon {epsilon}, spent {expected}",
            record.round
        );
    }
    let _ = std::fs::remove_dir_all(&state_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_run_under_adaptive_clipping_goes_on_from_the_clip_it_reached() {
    use astraea_core::privacy::AdaptiveClip;
    // The gap: the clip adaptive clipping had moved to was not kept, so a
    // restarted run started again from the configured clip.
    let state_dir =
        std::env::temp_dir().join(format!("astraea-clip-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let adaptive = || {
        let mut cfg = config(StrategyKind::FedAvg, 4, 3);
        cfg.state_dir = Some(state_dir.clone());
        let adaptive = AdaptiveClip {
            quantile: 0.5,
            learning_rate: 0.2,
            count_noise: 4.0,
        };
        privately(&mut cfg, 0.5, 2.0, 1e3, Some(adaptive));
        cfg
    };

    // Execute: two rounds, then the server dies and restarts.
    let (first, address) = start(adaptive()).await;
    let swarm = tokio::spawn(run_swarm(4, options(&address)));
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while first.state.status().history.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "two rounds within 4 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The clients go first: round 3 moves the clip only with their
    // results, so between this read and the abort only results already in
    // flight could (round 3's hops take far longer than this window).
    swarm.abort();
    let reached = first.state.model_clip().unwrap();
    first.coordinator.abort();
    first.server.abort();
    let (second, _address) = start(adaptive()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while second.state.status().history.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the run resumes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Assert: the clip moved in the first life, and the second goes on
    // from there rather than from 0.5.
    assert!((reached - 0.5).abs() > 1e-9, "the clip moved: {reached}");
    let resumed = second.state.model_clip().unwrap();
    assert_eq!(resumed, reached);
    second.coordinator.abort();
    second.server.abort();
    let _ = std::fs::remove_dir_all(&state_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_adaptive_clipping_the_clip_moves_and_the_spend_is_a_fixed_clips() {
    use astraea_core::privacy::{AdaptiveClip, RdpAccountant};
    // Prepare: four clients in every round, noise multiplier 2, the clip
    // starting at 0.5 and following the median update norm.
    let mut cfg = config(StrategyKind::FedAvg, 4, 3);
    let adaptive = AdaptiveClip {
        quantile: 0.5,
        learning_rate: 0.2,
        count_noise: 4.0,
    };
    privately(&mut cfg, 0.5, 2.0, 1e3, Some(adaptive));
    let (running, address) = start(cfg).await;
    let swarm = tokio::spawn(run_swarm(4, options(&address)));

    // Execute
    finishes(running.coordinator).await;
    let status = http_get(&address, "/api/status").await;
    swarm.abort();

    // Assert: the clip moved; each round spent what a fixed clip at
    // multiplier 2 spends (the count's noise is paid for by the update's).
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let clip = status["model_clip"]
        .as_f64()
        .expect("the status shows the clip");
    assert!(clip > 0.0 && (clip - 0.5).abs() > 1e-9, "clip {clip}");
    let history = running.state.status().history.clone();
    assert_eq!(history.len(), 3);
    for (record, rounds) in history.iter().zip(1..) {
        let mut fixed = RdpAccountant::new();
        fixed.compose(1.0, 2.0, rounds);
        let epsilon = record.epsilon.expect("a private round records its epsilon");
        assert!((epsilon - fixed.epsilon(1e-5)).abs() < 1e-9, "{epsilon}");
        assert!(record.loss.is_finite());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_clients_join_over_tls_when_they_trust_the_servers_certificate() {
    // Prepare: a server on TLS with its self-signed certificate (as
    // `serve --tls` makes), two clients trusting it, one trusting only the
    // web's public roots.
    let dir = std::env::temp_dir().join(format!("astraea-wss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = config(StrategyKind::FedAvg, 2, 1);
    cfg.tls = Some(astraea_server::tls::TlsSource::SelfSigned { dir: dir.clone() });
    let (running, address) = start(cfg).await;
    let url = format!("wss://{address}/ws");
    let stranger = astraea_native::ClientOptions {
        url: url.clone(),
        max_attempts: None,
        ..options(&address)
    };
    let trusting = astraea_native::ClientOptions {
        url,
        tls: Some(astraea_native::tls::client_config(Some(&dir.join("cert.pem"))).unwrap()),
        ..options(&address)
    };

    // Execute
    let refused = ends_with_an_error(stranger).await;
    let swarm = tokio::spawn(run_swarm(2, trusting));
    finishes(running.coordinator).await;
    swarm.abort();

    // Assert
    assert!(
        refused.contains("certificate is not trusted") && refused.contains("--ca-cert"),
        "{refused}"
    );
    let status = running.state.status().clone();
    assert_eq!(status.history.len(), 1);
    assert_eq!(status.mediators.len(), 2, "{:?}", status.mediators);
    let params = running.state.model.params as u64;
    assert!(
        status.history[0].bytes_up >= 2 * 4 * params,
        "both clients trained over wss: {:?}",
        status.history[0]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_client_speaking_tls_to_a_plain_server_stops_and_says_why() {
    // Prepare: a server without TLS; a client told to use wss:// and to
    // retry for ever.
    let (running, address) = start(config(StrategyKind::FedAvg, 2, 1)).await;
    let confused = astraea_native::ClientOptions {
        url: format!("wss://{address}/ws"),
        max_attempts: None,
        ..options(&address)
    };

    // Execute
    let error = ends_with_an_error(confused).await;

    // Assert
    assert!(error.contains("serving TLS"), "{error}");
    running.coordinator.abort();
}

/// Runs a native client told to retry for ever; it must end by itself
/// within 30 s, with an error (returned as text).
async fn ends_with_an_error(options: astraea_native::ClientOptions) -> String {
    tokio::time::timeout(
        Duration::from_secs(30),
        astraea_native::run_client(options, Default::default()),
    )
    .await
    .expect("a connection that cannot succeed ends the client instead of retrying for ever")
    .unwrap_err()
    .to_string()
}
