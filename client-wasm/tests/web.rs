//! The browser client in a real headless Chromium (wasm-bindgen-test): the
//! JavaScript boundary, and real training on the tab's CPU backend.
#![cfg(target_arch = "wasm32")]

use astraea_client::web::{WasmClient, protocol_version};
use astraea_core::model::ModelConfig;
use astraea_core::protocol::{ModelSpec, ServerMessage, TaskSpec, WeightEncoding, encode_chunks};
use astraea_core::weights::Weights;
use burn::prelude::*;
use js_sys::{Array, Float32Array, Reflect};
use wasm_bindgen::JsValue;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn field(object: &JsValue, key: &str) -> JsValue {
    Reflect::get(object, &JsValue::from_str(key)).unwrap()
}

fn kinds(actions: &JsValue) -> Vec<String> {
    Array::from(actions)
        .iter()
        .map(|a| field(&a, "kind").as_string().unwrap())
        .collect()
}

/// Two classes: bright top half or bright bottom half, 28x28.
fn halves(n: usize) -> (Vec<f32>, Vec<u32>) {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let label = (i % 2) as u32;
        for row in 0..28 {
            let bright = (row < 14) == (label == 0);
            images.extend(std::iter::repeat_n(if bright { 0.9 } else { 0.1 }, 28));
        }
        labels.push(label);
    }
    (images, labels)
}

#[wasm_bindgen_test]
fn the_join_crosses_the_js_boundary_as_a_plain_object() {
    // Prepare
    let mut client = WasmClient::new("flex", 1 << 20, true);

    // Execute
    let actions = client.start().unwrap();

    // Assert
    assert_eq!(protocol_version(), 1);
    assert_eq!(kinds(&actions), vec!["send"]);
    let text = field(&Array::from(&actions).get(0), "text")
        .as_string()
        .unwrap();
    assert!(
        text.starts_with(r#"{"type":"join","version":1,"backend":"flex""#),
        "{text}"
    );
}

#[wasm_bindgen_test]
fn a_task_trains_on_the_cpu_backend_and_answers_with_an_update() {
    // Prepare: welcome with a two-class model, local data, then a task.
    let config = ModelConfig::new(2);
    let initial = Weights::from_model(&config.init(&Device::flex()));
    let mut client = WasmClient::new("flex", 1 << 16, false);
    client.start().unwrap();
    let welcome = ServerMessage::Welcome {
        version: 1,
        client_id: 4,
        model: ModelSpec::new(&config, initial.len()),
        shard: None,
    };
    client.on_text(&welcome.to_json()).unwrap();
    let (images, labels) = halves(60);
    let ready = client.set_data(images, labels, 1, 28, 28, 2).unwrap();
    let task = TaskSpec {
        round: 1,
        hop: 1,
        epochs: 2,
        batch_size: 20,
        learning_rate: 1e-3,
        prox_mu: 0.0,
        deadline_ms: 60_000,
        seed: 9,
        encoding: WeightEncoding::F32,
        chunks: 0,
    };
    let frames = encode_chunks(1, 1, &initial.values, WeightEncoding::F32, 1 << 16);
    let task = TaskSpec {
        chunks: frames.len() as u32,
        ..task
    };
    client
        .on_text(&ServerMessage::Task(task).to_json())
        .unwrap();
    let mut train_action = JsValue::UNDEFINED;
    for frame in &frames {
        let actions = client.on_binary(frame).unwrap();
        if let Some(action) = Array::from(&actions).iter().next() {
            train_action = action;
        }
    }

    // Execute: what a page does with a `train` action.
    let weights = Float32Array::from(field(&train_action, "weights")).to_vec();
    let task_text = field(&train_action, "task").as_string().unwrap();
    let answer = client.train(&task_text, weights).unwrap();

    // Assert
    assert_eq!(kinds(&ready), vec!["send"]);
    assert_eq!(field(&train_action, "kind").as_string().unwrap(), "train");
    assert_eq!(kinds(&answer), vec!["send", "send-binary"]);
    let update = field(&Array::from(&answer).get(0), "text")
        .as_string()
        .unwrap();
    assert!(
        update.contains(r#""type":"update""#) && update.contains(r#""samples":60"#),
        "{update}"
    );
    let loss: f64 = update
        .split(r#""loss":"#)
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{update}");
    let sent = Array::from(&field(&Array::from(&answer).get(1), "frames"));
    assert_eq!(sent.length(), frames.len() as u32);
}

#[wasm_bindgen_test]
fn a_demo_shard_fetched_as_bytes_becomes_the_local_data() {
    // Prepare: a shard of three 28x28 images of classes 0, 1, 1.
    let data = astraea_core::data::Dataset::new(
        vec![0.5; 3 * 784],
        vec![0, 1, 1],
        1,
        28,
        28,
        vec!["a".into(), "b".into()],
    )
    .unwrap();
    let bytes = astraea_core::data::shard::encode_shard(&data);
    let mut client = WasmClient::new("flex", 1 << 20, true);

    // Execute
    let ready = client.set_shard(&bytes).unwrap();
    let broken = client.set_shard(&bytes[..10]);

    // Assert
    let text = field(&Array::from(&ready).get(0), "text")
        .as_string()
        .unwrap();
    assert_eq!(text, r#"{"type":"ready","counts":[1,2]}"#);
    assert!(broken.is_err());
}
