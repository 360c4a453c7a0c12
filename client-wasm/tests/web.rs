//! The browser client in a real headless Chromium (wasm-bindgen-test): the
//! JavaScript boundary, real training on the tab's CPU backend and on
//! WebGPU (Chromium started with `--enable-unsafe-webgpu`, see
//! webdriver.json: on a GPU-less machine a software adapter), and the two
//! backends agreeing.
#![cfg(target_arch = "wasm32")]

use astraea_client::web::{Backend, WasmClient, protocol_version, webgpu_device};
use astraea_core::model::ModelConfig;
use astraea_core::protocol::{
    ModelSpec, PROTOCOL_VERSION, ServerMessage, TaskSpec, WeightEncoding, encode_chunks,
};
use astraea_core::train::{Samples, StepProgress, TrainConfig, train_async, train_observed};
use astraea_core::weights::Weights;
use burn::prelude::*;
use js_sys::{Array, Float32Array, Function, Reflect};
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
    let mut client = WasmClient::new(&Backend::cpu(), 1 << 20, true, None);

    // Execute
    let actions = client.start().unwrap();

    // Assert
    assert_eq!(protocol_version(), PROTOCOL_VERSION);
    assert_eq!(kinds(&actions), vec!["send"]);
    let text = field(&Array::from(&actions).get(0), "text")
        .as_string()
        .unwrap();
    assert!(
        text.starts_with(&format!(
            r#"{{"type":"join","version":{PROTOCOL_VERSION},"backend":"flex""#
        )),
        "{text}"
    );
}

#[wasm_bindgen_test]
async fn a_task_trains_on_the_cpu_backend_reports_its_steps_and_answers_with_an_update() {
    // Prepare: welcome with a two-class model, local data, then a task.
    let config = ModelConfig::new(2);
    let initial = Weights::from_model(&config.init(&Device::flex()));
    let mut client = WasmClient::new(&Backend::cpu(), 1 << 16, false, None);
    client.start().unwrap();
    let welcome = ServerMessage::Welcome {
        version: PROTOCOL_VERSION,
        client_id: 4,
        model: ModelSpec::new(&config, initial.len()),
        shard: None,
        resume: None,
        privacy: None,
        rejoin_within_ms: None,
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
        stall_ms: None,
        seed: 9,
        encoding: WeightEncoding::F32,
        chunks: 0,
        place: None,
        secure_weight: None,
        secure_clip: None,
        secure_noise: None,
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
    let mut last_actions = JsValue::UNDEFINED;
    for frame in &frames {
        let actions = client.on_binary(frame).unwrap();
        for action in Array::from(&actions).iter() {
            if field(&action, "kind").as_string().as_deref() == Some("train") {
                train_action = action;
            }
        }
        last_actions = actions;
    }

    // Execute: what a page does with a `train` action.
    let weights = Float32Array::from(field(&train_action, "weights")).to_vec();
    let task_text = field(&train_action, "task").as_string().unwrap();
    let on_step = Function::new_with_args(
        "p",
        "globalThis.steps = (globalThis.steps || []).concat([[p.epoch, p.batch, p.batches, p.loss]])",
    );
    let answer = client.train(task_text, weights, on_step).await.unwrap();

    // Assert
    assert_eq!(kinds(&ready), vec!["send"]);
    // The first heartbeat of the hop goes out before training starts.
    assert_eq!(kinds(&last_actions), vec!["send", "train"]);
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
    // 60 samples in batches of 20 over 2 epochs: 6 steps, each reported.
    let steps = Array::from(&field(&js_sys::global(), "steps"));
    assert_eq!(steps.length(), 6);
    let last = Array::from(&steps.get(5));
    assert_eq!(last.get(0).as_f64(), Some(1.0));
    assert_eq!(last.get(1).as_f64(), Some(2.0));
    assert_eq!(last.get(2).as_f64(), Some(3.0));
    assert!(last.get(3).as_f64().unwrap() > 0.0);
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
    let mut client = WasmClient::new(&Backend::cpu(), 1 << 20, true, None);

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

#[wasm_bindgen_test]
fn a_drawn_digit_joins_the_local_data_and_the_counts_report_it() {
    // Prepare: a shard of one class-0 image, and a drawn class-1 image.
    let data = astraea_core::data::Dataset::new(
        vec![0.5; 784],
        vec![0],
        1,
        28,
        28,
        vec!["a".into(), "b".into()],
    )
    .unwrap();
    let mut client = WasmClient::new(&Backend::cpu(), 1 << 20, true, None);
    client
        .set_shard(&astraea_core::data::shard::encode_shard(&data))
        .unwrap();

    // Execute
    let ready = client.add_samples(vec![1.0; 784], vec![1]).unwrap();
    let wrong_shape = client.add_samples(vec![1.0; 100], vec![1]);
    let wrong_label = client.add_samples(vec![1.0; 784], vec![7]);

    // Assert
    let text = field(&Array::from(&ready).get(0), "text")
        .as_string()
        .unwrap();
    assert_eq!(text, r#"{"type":"ready","counts":[1,1]}"#);
    assert_eq!(client.label_counts(), vec![1, 1]);
    assert!(wrong_shape.is_err() && wrong_label.is_err());
}

/// The two-class model without dropout: dropout draws its masks from each
/// device's own random stream, so with it the backends could not agree.
fn deterministic_model() -> ModelConfig {
    ModelConfig {
        dropout: 0.0,
        ..ModelConfig::new(2)
    }
}

#[wasm_bindgen_test]
async fn a_training_step_runs_on_webgpu_and_agrees_with_the_cpu() {
    // The page runs the module's constructors at instantiation (its start
    // function); this runner does not, and burn's WebGPU backend needs
    // what they register.
    astraea_client::run_constructors();
    // Prepare: the page's WebGPU device. No adapter fails the test: CI
    // starts Chromium with --enable-unsafe-webgpu, which gives one.
    let gpu = webgpu_device()
        .await
        .expect("a WebGPU adapter (Chromium with --enable-unsafe-webgpu)");
    let config = deterministic_model();
    let initial = Weights::from_model(&config.init(&Device::flex()));
    let (images, labels) = halves(40);
    let data = Samples {
        images: &images,
        labels: &labels,
    };
    let train_config = TrainConfig {
        batch_size: 20,
        seed: 3,
        ..TrainConfig::default()
    };
    let mut cpu_steps = Vec::new();
    let mut gpu_steps = Vec::new();

    // Execute: the same two steps on each backend.
    let (cpu_weights, cpu_stats) = train_observed(
        &config,
        &initial,
        data,
        &train_config,
        &Device::flex().autodiff(),
        &mut |p: &StepProgress| cpu_steps.push(p.loss),
    )
    .unwrap();
    let (gpu_weights, gpu_stats) = train_async(
        &config,
        &initial,
        data,
        &train_config,
        &gpu.autodiff(),
        &mut |p: &StepProgress| gpu_steps.push(p.loss),
    )
    .await
    .unwrap();

    // Assert: WebGPU really trained, and to the same losses. Tolerance:
    // 1e-3 on each step's cross-entropy (about 0.7 here): float sums run in
    // a different order on each backend, and Adam's first steps move every
    // weight by about the learning rate whatever the gradient's size.
    assert_eq!(gpu_stats.steps, 2);
    assert_ne!(gpu_weights, initial);
    assert!(gpu_weights.values.iter().all(|v| v.is_finite()));
    assert_eq!(cpu_steps.len(), gpu_steps.len());
    for (cpu, gpu) in cpu_steps.iter().zip(&gpu_steps) {
        assert!((cpu - gpu).abs() < 1e-3, "CPU loss {cpu} vs WebGPU {gpu}");
    }
    assert!((cpu_stats.mean_loss - gpu_stats.mean_loss).abs() < 1e-3);
    let largest_gap = cpu_weights
        .values
        .iter()
        .zip(&gpu_weights.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(largest_gap < 5e-3, "weights differ by up to {largest_gap}");
}

#[wasm_bindgen_test]
fn a_tab_keeps_its_servers_window_and_waits_as_the_native_client_does() {
    use astraea_client::web::rejoin_delay_ms;
    let config = ModelConfig::new(2);
    let mut client = WasmClient::new(&Backend::cpu(), 1 << 16, false, None);
    client.start().unwrap();
    assert_eq!(client.rejoin_within_ms(), None);
    let welcome = ServerMessage::Welcome {
        version: PROTOCOL_VERSION,
        client_id: 4,
        model: ModelSpec::new(&config, 10),
        shard: None,
        resume: None,
        privacy: None,
        rejoin_within_ms: Some(4000),
    };
    client.on_text(&welcome.to_json()).unwrap();
    assert_eq!(client.rejoin_within_ms(), Some(4000.0));
    // core's pace::rejoin_delay: a draw over the window, or the back-off.
    assert_eq!(rejoin_delay_ms(4000.0, 0, 0.5), 2000.0);
    assert_eq!(rejoin_delay_ms(0.0, 2, 1.0), 1000.0);
    assert_eq!(rejoin_delay_ms(f64::NAN, 0, 0.5), 125.0);
}
