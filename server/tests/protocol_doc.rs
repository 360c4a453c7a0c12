//! `docs/PROTOCOL.md` against the code: every ```json block on the page is
//! a message the protocol's types accept, exactly as they write it; every
//! message type has an example; the limits table shows the constants'
//! values; and a real server on 127.0.0.1:0 answers the page's client
//! examples as the page says.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use astraea_core::protocol::limits::{
    ADDED_SAMPLES_ALLOWANCE, MAX_ABS_WEIGHT, MAX_BACKEND_BYTES, MAX_CLASSES, MAX_CLIENT_SAMPLES,
    MAX_LIFECYCLE_BYTES, MAX_MESSAGE_BYTES, MAX_PROGRESS_BATCHES, MAX_RESUME_BYTES, MAX_SPEED,
    MAX_UPDATE_SECONDS,
};
use astraea_core::protocol::{
    AckOutcome, ClientMessage, DEFAULT_MAX_FRAME_BYTES, DataSource, ErrorCode, LifecycleReport,
    PROTOCOL_VERSION, ServerMessage, encode_chunks,
};
use astraea_core::secagg::{SHARE_BYTES, SHARE_CIPHERTEXT_BYTES, SHARE_PLAINTEXT_BYTES};
use astraea_core::strategy::StrategyKind;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::{Socket, config, connect, start};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

const PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");

/// Every `type` a client may send (`ClientMessage::kind` names them).
const CLIENT_KINDS: [&str; 9] = [
    "join",
    "ready",
    "progress",
    "update",
    "error",
    "leave",
    "secure-keys",
    "secure-shares",
    "secure-reveal",
];
/// Every `type` the server may send (`ServerMessage::kind`).
const SERVER_KINDS: [&str; 10] = [
    "welcome",
    "plan",
    "task",
    "ack",
    "round-done",
    "error",
    "secure-setup",
    "secure-roster",
    "secure-inbox",
    "secure-unmask",
];

/// The page's text.
fn page() -> String {
    std::fs::read_to_string(PAGE).unwrap_or_else(|e| panic!("reading {PAGE}: {e}"))
}

/// The contents of every ```json block, with the line it starts on.
fn json_blocks(page: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (n, line) in page.lines().enumerate() {
        match &mut open {
            None if line.trim() == "```json" => open = Some((n + 1, String::new())),
            None => {}
            Some(_) if line.trim() == "```" => blocks.push(open.take().expect("open")),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    assert!(open.is_none(), "a ```json block is not closed");
    blocks
}

/// The page's examples, parsed.
struct Examples {
    client: Vec<(String, ClientMessage)>,
    server: Vec<(String, ServerMessage)>,
    lifecycle: Vec<LifecycleReport>,
}

impl Examples {
    fn from_page() -> Self {
        let mut examples = Examples {
            client: Vec::new(),
            server: Vec::new(),
            lifecycle: Vec::new(),
        };
        for (line, text) in json_blocks(&page()) {
            let text = text.trim().to_string();
            // The body of `POST /api/lifecycle` ("Pausing"), beside the
            // socket's messages.
            if let Ok(report) = LifecycleReport::from_json(text.as_bytes()) {
                assert_eq!(report.validate(), Ok(()), "line {line}");
                let written: Value = serde_json::from_str(&text).unwrap();
                let canonical: Value = serde_json::from_str(&report.to_json()).unwrap();
                assert_eq!(canonical, written, "line {line}");
                examples.lifecycle.push(report);
                continue;
            }
            let as_client = ClientMessage::from_json(&text);
            let as_server = ServerMessage::from_json(&text);
            assert!(
                as_client.is_ok() || as_server.is_ok(),
                "the example at line {line} is neither a client message ({:?}) nor a server message ({:?}):\n{text}",
                as_client.err(),
                as_server.err()
            );
            let written: Value = serde_json::from_str(&text).unwrap();
            if let Some(version) = written.get("version") {
                assert_eq!(version, PROTOCOL_VERSION, "line {line}");
            }
            if let Ok(message) = as_client {
                assert_eq!(
                    message.validate(),
                    Ok(()),
                    "the client example at line {line} breaks a limit"
                );
                // Exactly as the code writes it: no field left out or extra.
                let canonical: Value = serde_json::from_str(&message.to_json()).unwrap();
                assert_eq!(canonical, written, "line {line}");
                examples.client.push((text.clone(), message));
            }
            if let Ok(message) = as_server {
                let canonical: Value = serde_json::from_str(&message.to_json()).unwrap();
                assert_eq!(canonical, written, "line {line}");
                examples.server.push((text, message));
            }
        }
        examples
    }

    /// The first client example of `kind` that `pick` accepts.
    fn client(&self, kind: &str, pick: impl Fn(&ClientMessage) -> bool) -> (&str, &ClientMessage) {
        self.client
            .iter()
            .find(|(_, m)| m.kind() == kind && pick(m))
            .map(|(text, m)| (text.as_str(), m))
            .unwrap_or_else(|| panic!("the page has no fitting {kind} example"))
    }
}

/// Groups digits by thousands, as the page writes numbers.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn every_example_on_the_page_is_a_message_and_every_message_has_one() {
    // Prepare and execute: parsing checks each block.
    let examples = Examples::from_page();

    // Assert
    let client: BTreeSet<&str> = examples.client.iter().map(|(_, m)| m.kind()).collect();
    let server: BTreeSet<&str> = examples.server.iter().map(|(_, m)| m.kind()).collect();
    assert_eq!(client, BTreeSet::from(CLIENT_KINDS), "client examples");
    assert_eq!(server, BTreeSet::from(SERVER_KINDS), "server examples");
    assert!(
        !examples.lifecycle.is_empty(),
        "no POST /api/lifecycle example"
    );
    let outcomes: BTreeSet<String> = examples
        .server
        .iter()
        .filter_map(|(_, m)| match m {
            ServerMessage::Ack { outcome, .. } => Some(format!("{outcome:?}")),
            _ => None,
        })
        .collect();
    assert_eq!(
        outcomes.len(),
        3,
        "an ack example per outcome: {outcomes:?}"
    );
    let sources: BTreeSet<&str> = examples
        .client
        .iter()
        .filter_map(|(_, m)| match m {
            ClientMessage::Join {
                data: DataSource::Demo,
                ..
            } => Some("demo"),
            ClientMessage::Join {
                data: DataSource::Own { .. },
                ..
            } => Some("own"),
            _ => None,
        })
        .collect();
    assert_eq!(sources, BTreeSet::from(["demo", "own"]));
}

#[test]
fn the_page_shows_the_version_and_every_limit_with_its_value() {
    let page = page();
    let rows = [
        ("MAX_BACKEND_BYTES", thousands(MAX_BACKEND_BYTES as u64)),
        ("MAX_MESSAGE_BYTES", thousands(MAX_MESSAGE_BYTES as u64)),
        ("MAX_RESUME_BYTES", thousands(MAX_RESUME_BYTES as u64)),
        ("MAX_LIFECYCLE_BYTES", thousands(MAX_LIFECYCLE_BYTES as u64)),
        ("MAX_CLASSES", thousands(MAX_CLASSES as u64)),
        ("MAX_CLIENT_SAMPLES", thousands(MAX_CLIENT_SAMPLES)),
        ("MAX_PROGRESS_BATCHES", thousands(MAX_PROGRESS_BATCHES)),
        ("MAX_SPEED", format!("{MAX_SPEED:e}")),
        ("MAX_UPDATE_SECONDS", thousands(MAX_UPDATE_SECONDS as u64)),
        ("MAX_ABS_WEIGHT", thousands(MAX_ABS_WEIGHT as u64)),
        (
            "ADDED_SAMPLES_ALLOWANCE",
            thousands(ADDED_SAMPLES_ALLOWANCE),
        ),
        (
            "DEFAULT_MAX_FRAME_BYTES",
            thousands(DEFAULT_MAX_FRAME_BYTES as u64),
        ),
        (
            "HEADER_BYTES",
            astraea_core::protocol::frames::HEADER_BYTES.to_string(),
        ),
    ];

    for (name, value) in rows {
        let row = format!("| `{name}` | {value} |");
        assert!(page.contains(&row), "the limits table lacks {row}");
    }
    // The exact byte lengths of the secure-aggregation fields, as the
    // server checks them (`secagg`).
    for (field, bytes) in [
        ("shares[].ciphertext", SHARE_CIPHERTEXT_BYTES),
        ("shares[].share", SHARE_BYTES),
    ] {
        let row = format!("| `{field}` | hex | yes |");
        let line = page
            .lines()
            .find(|l| l.starts_with(&row))
            .unwrap_or_else(|| panic!("no row for {field}"));
        let length = format!("exactly {bytes} bytes ({} hex digits", 2 * bytes);
        assert!(line.contains(&length), "{field}: {line}");
    }
    // The loss rule's default sample count, here and in the README.
    let samples = astraea_core::validation::DEFAULT_VALIDATION_SAMPLES;
    let rule = format!("validation samples ({samples} drawn from its training set");
    assert!(page.contains(&rule), "the page lacks {rule:?}");
    let readme_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(readme_path).unwrap();
    let said = format!("its loss on {samples} samples the server keeps");
    assert!(readme.contains(&said), "README.md lacks {said:?}");
    for length in [
        format!("plaintext ({SHARE_PLAINTEXT_BYTES} bytes)"),
        format!("the ciphertext is {SHARE_CIPHERTEXT_BYTES} bytes"),
    ] {
        assert!(page.contains(&length), "the page lacks {length:?}");
    }
    assert!(
        page.starts_with(&format!(
            "# The Astraea wire protocol, version {PROTOCOL_VERSION}\n"
        )),
        "the title names another version"
    );
}

async fn send_text(socket: &mut Socket, text: &str) {
    socket.send(Message::Text(text.into())).await.unwrap();
}

/// The next message from the server; `None` once the connection ends.
async fn next_message(socket: &mut Socket) -> Option<ServerMessage> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("the server answers within 30 s");
        match frame {
            Some(Ok(Message::Text(text))) => {
                return Some(ServerMessage::from_json(&text).expect("the server's frame parses"));
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// Every message until the server ends the connection.
async fn drain(socket: &mut Socket) -> Vec<ServerMessage> {
    drain_to_close(socket).await.0
}

/// Every message until the server ends the connection, and its close
/// frame: `Some(None)` for a close frame without a status code, `None`
/// when the connection ended without one.
async fn drain_to_close(socket: &mut Socket) -> (Vec<ServerMessage>, Option<Option<CloseFrame>>) {
    let mut messages = Vec::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("the server answers within 30 s");
        match frame {
            Some(Ok(Message::Text(text))) => {
                messages.push(ServerMessage::from_json(&text).expect("the server's frame parses"))
            }
            Some(Ok(Message::Close(frame))) => return (messages, Some(frame)),
            Some(Err(_)) | None => return (messages, None),
            Some(Ok(_)) => {}
        }
    }
}

/// `value` with every string of hex digits (16 or more) in upper case.
fn upper_hex(value: &Value) -> Value {
    match value {
        Value::String(s) if s.len() >= 16 && s.chars().all(|c| c.is_ascii_hexdigit()) => {
            Value::String(s.to_ascii_uppercase())
        }
        Value::Array(items) => Value::Array(items.iter().map(upper_hex).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), upper_hex(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A client's welcome: its id and resume token.
async fn welcomed(socket: &mut Socket) -> (u64, String) {
    match next_message(socket).await {
        Some(ServerMessage::Welcome {
            client_id,
            resume: Some(token),
            ..
        }) => (client_id, token),
        other => panic!("no welcome with a token: {other:?}"),
    }
}

fn is_error(message: &ServerMessage) -> bool {
    matches!(message, ServerMessage::Error { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_server_answers_the_pages_client_examples_as_the_page_says() {
    // Prepare: a server that never starts a round (it waits for 50 ready
    // clients), so no plan or task comes between the examples, and the
    // default frame limit the page's examples assume.
    let examples = Examples::from_page();
    let mut cfg = config(StrategyKind::FedAvg, 5, 1);
    cfg.min_clients = 50;
    cfg.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES;
    let (running, address) = start(cfg).await;
    let params = running.state.model.params;
    let (demo_join, _) = examples.client("join", |m| {
        matches!(
            m,
            ClientMessage::Join {
                data: DataSource::Demo,
                ..
            }
        )
    });
    let (own_join, _) = examples.client("join", |m| {
        matches!(
            m,
            ClientMessage::Join {
                data: DataSource::Own { .. },
                ..
            }
        )
    });
    let (ready, _) = examples.client("ready", |_| true);
    let (progress, _) = examples.client("progress", |_| true);
    let (update_text, update) = examples.client("update", |_| true);
    let (error, _) = examples.client("error", |_| true);
    let (leave, _) = examples.client("leave", |_| true);
    let ClientMessage::Update(update) = update.clone() else {
        unreachable!()
    };
    let page_model = examples
        .server
        .iter()
        .find_map(|(_, m)| match m {
            ServerMessage::Welcome { model, .. } => Some(model.clone()),
            _ => None,
        })
        .expect("a welcome example");

    // Execute, demo client: join, fetch the shard, ready, progress, an
    // update (no task asked for it, so it is stale), error, leave.
    let mut demo = connect(&address).await;
    send_text(&mut demo, demo_join).await;
    let demo_welcome = next_message(&mut demo).await;
    let Some(ServerMessage::Welcome {
        version,
        client_id,
        model,
        shard: Some(shard),
        ..
    }) = demo_welcome
    else {
        panic!("no welcome with a shard: {demo_welcome:?}")
    };
    let fetched = astraea_server::loopback::request(
        &address,
        "GET",
        &format!("/api/shard/{client_id}"),
        "",
        "",
    )
    .await
    .unwrap();
    send_text(&mut demo, ready).await;
    send_text(&mut demo, progress).await;
    send_text(&mut demo, update_text).await;
    let frames = encode_chunks(
        update.round,
        update.hop,
        &vec![0.0; params],
        update.encoding,
        DEFAULT_MAX_FRAME_BYTES,
    );
    for frame in &frames {
        demo.send(Message::Binary(frame.clone().into()))
            .await
            .unwrap();
    }
    send_text(&mut demo, error).await;
    send_text(&mut demo, leave).await;
    let demo_after = drain(&mut demo).await;

    // Execute, own-data client: join, ready, progress, leave.
    let mut own = connect(&address).await;
    send_text(&mut own, own_join).await;
    let own_welcome = next_message(&mut own).await;
    send_text(&mut own, ready).await;
    send_text(&mut own, progress).await;
    send_text(&mut own, leave).await;
    let own_after = drain(&mut own).await;

    // Execute: the own-data join with a field past its limit, and with an
    // older version.
    let mut too_fast: Value = serde_json::from_str(own_join).unwrap();
    too_fast["speed"] = Value::from(MAX_SPEED * 2.0);
    let mut invalid = connect(&address).await;
    send_text(&mut invalid, &too_fast.to_string()).await;
    let invalid_answer = drain(&mut invalid).await;
    let mut old: Value = serde_json::from_str(own_join).unwrap();
    old["version"] = Value::from(PROTOCOL_VERSION - 1);
    let mut older = connect(&address).await;
    send_text(&mut older, &old.to_string()).await;
    let older_answer = drain(&mut older).await;
    // Another version that also breaks a limit hears about the version (it
    // may not know the limits): the version is checked first.
    let mut old_and_fast = too_fast.clone();
    old_and_fast["version"] = Value::from(PROTOCOL_VERSION - 1);
    let mut older_fast = connect(&address).await;
    send_text(&mut older_fast, &old_and_fast.to_string()).await;
    let older_fast_answer = drain(&mut older_fast).await;

    // Assert: the demo client.
    assert_eq!(version, PROTOCOL_VERSION);
    assert_eq!(model, page_model, "the page's welcome shows MNIST's model");
    assert_eq!(fetched.status, 200, "GET /api/shard/{client_id}");
    let samples = astraea_core::data::shard::decode_shard(&fetched.body).unwrap();
    assert_eq!(samples.len(), shard.indices.len());
    assert_eq!(
        frames.len() as u32,
        update.chunks,
        "the page's update announces the chunks MNIST needs at the default limit"
    );
    assert!(!demo_after.iter().any(is_error), "{demo_after:?}");
    assert_eq!(
        demo_after,
        vec![ServerMessage::Ack {
            round: update.round,
            hop: update.hop,
            outcome: AckOutcome::Stale,
            reason: Some("the hop was no longer awaited (late, or the round moved on)".into()),
        }]
    );

    // Assert: the own-data client.
    assert!(
        matches!(
            &own_welcome,
            Some(ServerMessage::Welcome { shard: None, model, .. }) if *model == page_model
        ),
        "{own_welcome:?}"
    );
    assert!(own_after.is_empty(), "{own_after:?}");

    // Assert: the refusals.
    assert!(
        matches!(
            invalid_answer.as_slice(),
            [ServerMessage::Error {
                code: ErrorCode::Invalid,
                ..
            }]
        ),
        "{invalid_answer:?}"
    );
    assert!(
        matches!(
            older_answer.as_slice(),
            [ServerMessage::Error {
                code: ErrorCode::Version,
                ..
            }]
        ),
        "{older_answer:?}"
    );
    assert!(
        matches!(
            older_fast_answer.as_slice(),
            [ServerMessage::Error {
                code: ErrorCode::Version,
                ..
            }]
        ),
        "{older_fast_answer:?}"
    );
    let state = &running.state;
    assert_eq!(state.rejections.load(Ordering::Relaxed), 3);
    assert_eq!(state.stale_updates.load(Ordering::Relaxed), 1);
    let mut departures = 0;
    for _ in 0..50 {
        departures = state.departures.load(Ordering::Relaxed);
        if departures == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(departures, 2, "the two leaves are departures, not refusals");
    assert!(state.status().history.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hex_is_read_in_either_case_and_a_wrong_length_is_refused_with_both_lengths() {
    // Prepare: a server without secure aggregation (it ignores `secure-*`
    // messages that pass the checks, so only a refusal answers them), an
    // own-data client, and the page's secure examples in upper-case hex
    // and with a ciphertext 8 bytes too long.
    let examples = Examples::from_page();
    let mut cfg = config(StrategyKind::FedAvg, 5, 1);
    cfg.min_clients = 50;
    cfg.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES;
    let (running, address) = start(cfg).await;
    let (own_join, _) = examples.client("join", |m| {
        matches!(
            m,
            ClientMessage::Join {
                data: DataSource::Own { .. },
                ..
            }
        )
    });
    let mut upper = Vec::new();
    for kind in ["secure-keys", "secure-shares", "secure-reveal"] {
        let (text, message) = examples.client(kind, |_| true);
        let shouted = upper_hex(&serde_json::from_str(text).unwrap()).to_string();
        assert_ne!(shouted, text, "{kind} has hex to shout");
        let read = ClientMessage::from_json(&shouted)
            .unwrap_or_else(|e| panic!("upper-case {kind} is refused: {e}"));
        assert_eq!(&read, message, "upper-case {kind} reads as lower case");
        upper.push(shouted);
    }
    let (shares, _) = examples.client("secure-shares", |_| true);
    let mut long: Value = serde_json::from_str(shares).unwrap();
    let ciphertext = long["shares"][0]["ciphertext"]
        .as_str()
        .unwrap()
        .to_string();
    long["shares"][0]["ciphertext"] = Value::from(format!("{ciphertext}{}", "00".repeat(8)));

    // Execute
    let mut socket = connect(&address).await;
    send_text(&mut socket, own_join).await;
    welcomed(&mut socket).await;
    for text in &upper {
        send_text(&mut socket, text).await;
    }
    send_text(&mut socket, &long.to_string()).await;
    let (answer, close) = drain_to_close(&mut socket).await;

    // Assert: the upper-case messages passed (the first refusal is the
    // long ciphertext's), which names both lengths; the close frame
    // carries no status code (1005 at the client).
    let expected = format!(
        "secure-shares refused: secure-shares.ciphertext has {} bytes, exactly {SHARE_CIPHERTEXT_BYTES} expected",
        SHARE_CIPHERTEXT_BYTES + 8
    );
    assert_eq!(
        answer,
        vec![ServerMessage::Error {
            code: ErrorCode::Invalid,
            message: expected,
        }]
    );
    assert_eq!(close, Some(None), "a close frame without a status code");
    assert_eq!(running.state.rejections.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_takes_its_client_over_from_an_open_connection_and_only_with_the_same_kind_of_data()
{
    // Prepare
    let examples = Examples::from_page();
    let mut cfg = config(StrategyKind::FedAvg, 5, 1);
    cfg.min_clients = 50;
    let (running, address) = start(cfg).await;
    let (own_join, _) = examples.client("join", |m| {
        matches!(
            m,
            ClientMessage::Join {
                data: DataSource::Own { .. },
                ..
            }
        )
    });
    let (demo_join, _) = examples.client("join", |m| {
        matches!(
            m,
            ClientMessage::Join {
                data: DataSource::Demo,
                ..
            }
        )
    });
    let with_token = |join: &str, token: &str| {
        let mut join: Value = serde_json::from_str(join).unwrap();
        join["resume"] = Value::from(token);
        join.to_string()
    };
    let mut first = connect(&address).await;
    send_text(&mut first, own_join).await;
    let (first_id, token) = welcomed(&mut first).await;

    // Execute: the token while its owner is still connected (a reloaded
    // tab racing its old socket's close); then, once the client has left,
    // with demo data (another kind), then with own data.
    let mut resumed = connect(&address).await;
    send_text(&mut resumed, &with_token(own_join, &token)).await;
    let (resumed_id, resumed_token) = welcomed(&mut resumed).await;
    let (_, old_close) = drain_to_close(&mut first).await;
    let one_client = running.state.clients().len();
    send_text(&mut resumed, r#"{"type": "leave"}"#).await;
    drain(&mut resumed).await;
    for _ in 0..50 {
        if running.state.parked.lock().unwrap().contains_key(&token) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut other_kind = connect(&address).await;
    send_text(&mut other_kind, &with_token(demo_join, &token)).await;
    let (third_id, _) = welcomed(&mut other_kind).await;
    let mut same_kind = connect(&address).await;
    send_text(&mut same_kind, &with_token(own_join, &token)).await;
    let (fourth_id, _) = welcomed(&mut same_kind).await;

    // Assert: the token took the client over from its open connection,
    // which was closed, without a second client; once it had left, the
    // demo join spent the token, so the last join is new too.
    assert_eq!(
        (resumed_id, resumed_token.as_str()),
        (first_id, token.as_str())
    );
    assert_eq!(old_close, Some(None), "the old connection is closed");
    assert_eq!(one_client, 1, "no second client beside the first");
    assert_ne!(third_id, first_id);
    assert!(![first_id, third_id].contains(&fourth_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_downloads_of_the_model_hold_the_same_tensors_and_metadata_in_other_bytes() {
    // Prepare
    let cfg = {
        let mut cfg = config(StrategyKind::FedAvg, 5, 1);
        cfg.min_clients = 50;
        cfg
    };
    let (_running, address) = start(cfg).await;

    // Execute
    let mut files = Vec::new();
    for _ in 0..3 {
        let response = astraea_server::loopback::request(&address, "GET", "/api/model", "", "")
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        files.push(response.body);
    }

    // Assert: the safetensors header (8 bytes of length, then JSON) reads
    // the same and the tensors' bytes are the same; the files' bytes are
    // not (the metadata's order changes, as the page says).
    let parts = |file: &[u8]| {
        let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
        (header, file[8 + n..].to_vec())
    };
    let first = parts(&files[0]);
    assert!(first.0["__metadata__"]["round"].is_string());
    for file in &files[1..] {
        assert_eq!(parts(file), first);
    }
    assert!(
        files.windows(2).any(|w| w[0] != w[1]),
        "three downloads of /api/model are byte for byte the same: PROTOCOL.md says they differ"
    );
}
