//! The JavaScript boundary. A page (or a Web Worker) owns one
//! [`WasmClient`], feeds it the socket's frames and carries out the actions
//! it returns: each is a plain object with a `kind` field.
//!
//! | kind | fields | the page should |
//! |---|---|---|
//! | `send` | `text` | send a text frame |
//! | `send-binary` | `frames` (array of `Uint8Array`) | send binary frames, in order |
//! | `load-shard` | `dataset`, `indices` | load those samples, then call `set_data` |
//! | `apply-plan` | `ratios`, `seed` | call `apply_plan` (the client keeps the data) |
//! | `train` | `task` (JSON text), `weights` (`Float32Array`) | call `train` |
//! | `round-done` | `round`, `accuracy`, `epsilon` (only under client-level DP: spent so far) | show it |
//! | `ack` | `round`, `hop`, `outcome` (`accepted`, `stale`, `refused`), `reason` (empty when none) | show what became of the hop's update |
//! | `close` | `reason` | close the socket and say why |

use astraea_core::augment::{AugmentConfig, apply_plan, materialise};
use astraea_core::data::shard::decode_shard;
use std::cell::{Cell, RefCell};

use astraea_core::model::ModelConfig;
use astraea_core::protocol::{
    ClientAction, ClientSession, DataSource, PROTOCOL_VERSION, TaskSpec, progress_message,
};
use astraea_core::train::{
    LocalReplica, Replica, Samples, StepProgress, TrainConfig, task_setup, train_async,
    train_observed, train_task, train_task_async,
};
use astraea_core::weights::Weights;
use burn::prelude::Device;
use js_sys::{Array, Float32Array, Function, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;

use crate::backend::{AdapterFacts, BackendKind, Preference, decide, needs_gpu_trial};

/// The protocol version this client speaks.
#[wasm_bindgen]
pub fn protocol_version() -> u32 {
    PROTOCOL_VERSION
}

/// The tab's local data: as loaded, and after the current plan.
struct LocalData {
    images: Vec<f32>,
    labels: Vec<u32>,
    channels: usize,
    height: usize,
    width: usize,
    num_classes: usize,
    planned: Option<(Vec<f32>, Vec<u32>)>,
}

impl LocalData {
    fn training_set(&self) -> (&[f32], &[u32]) {
        match &self.planned {
            Some((images, labels)) => (images, labels),
            None => (&self.images, &self.labels),
        }
    }

    fn counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        self.training_set()
            .1
            .iter()
            .for_each(|&l| counts[l as usize] += 1);
        counts
    }
}

/// The device a tab trains on, with the reason it was chosen and what
/// the trial measured.
#[wasm_bindgen]
pub struct Backend {
    kind: BackendKind,
    device: Device,
    adapter: String,
    reason: String,
    cpu_rate: Option<f64>,
    gpu_rate: Option<f64>,
}

#[wasm_bindgen]
impl Backend {
    /// The CPU (burn `flex`), chosen without a trial.
    pub fn cpu() -> Backend {
        Backend {
            kind: BackendKind::Cpu,
            device: Device::flex(),
            adapter: String::new(),
            reason: "the CPU was asked for".into(),
            cpu_rate: None,
            gpu_rate: None,
        }
    }

    /// `flex` or `webgpu`, as reported to the server.
    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.kind.name().into()
    }

    /// The WebGPU adapter the browser offered, if any.
    #[wasm_bindgen(getter)]
    pub fn adapter(&self) -> String {
        self.adapter.clone()
    }

    /// Why this backend: a sentence for the page.
    #[wasm_bindgen(getter)]
    pub fn reason(&self) -> String {
        self.reason.clone()
    }

    /// Training samples per second the CPU trial measured.
    #[wasm_bindgen(getter)]
    pub fn cpu_rate(&self) -> Option<f64> {
        self.cpu_rate
    }

    /// Training samples per second the WebGPU trial measured.
    #[wasm_bindgen(getter)]
    pub fn gpu_rate(&self) -> Option<f64> {
        self.gpu_rate
    }
}

/// Training samples per second of a few batches of the papers' CNN (batch
/// 20), timed after warm-up steps that are not counted: on WebGPU one (it
/// compiles the shaders); on the CPU sixteen, because V8 first runs a
/// module's functions in its baseline compiler and moves the hot ones to
/// its optimising tier only after some use. Timed from the start, the CPU
/// trial read half the tab's real speed (docs/RESULTS.md, "Training
/// speed": the first trial of a page 1,045-1,505 samples/s, later ones
/// 2,600-4,200), which could make auto mode prefer a GPU slower than the
/// CPU it then runs beside. The CPU's warm-up costs about 0.2 s at page
/// open.
async fn trial_rate(device: &Device, kind: BackendKind) -> Result<f64, String> {
    const BATCH: usize = 20;
    // Steps not timed, then timed.
    let (warmup, timed) = match kind {
        BackendKind::Cpu => (16, 8),
        // A software adapter takes seconds a step: as few as will do.
        BackendKind::WebGpu => (1, 7),
    };
    let total = warmup + timed;
    let config = ModelConfig::new(10);
    let weights = Weights::from_model(&config.init(&Device::flex()));
    let images: Vec<f32> = (0..BATCH * total * config.sample_len())
        .map(|i| ((i * 7919) % 255) as f32 / 255.0)
        .collect();
    let labels: Vec<u32> = (0..BATCH * total).map(|i| (i % 10) as u32).collect();
    let data = Samples {
        images: &images,
        labels: &labels,
    };
    let train_config = TrainConfig {
        batch_size: BATCH,
        ..TrainConfig::default()
    };
    let mut stamps = Vec::new();
    let mut stamp = |_: &StepProgress| stamps.push(js_sys::Date::now());
    let device = device.clone().autodiff();
    match kind {
        BackendKind::Cpu => {
            train_observed(&config, &weights, data, &train_config, &device, &mut stamp)
                .map_err(|e| e.to_string())?;
        }
        BackendKind::WebGpu => {
            train_async(&config, &weights, data, &train_config, &device, &mut stamp)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    // stamps[i] is the end of step i: the timed steps are warmup..total.
    let elapsed = (stamps[total - 1] - stamps[warmup - 1]).max(1.0) / 1000.0;
    Ok((timed * BATCH) as f64 / elapsed)
}

#[cfg(target_arch = "wasm32")]
thread_local! {
    static WEBGPU: RefCell<Option<Result<Device, String>>> = const { RefCell::new(None) };
}

/// After WebGPU failed mid-hop, the page's device is not offered again.
fn forget_webgpu(why: &str) {
    #[cfg(target_arch = "wasm32")]
    WEBGPU.with(|cell| *cell.borrow_mut() = Some(Err(why.to_string())));
    #[cfg(not(target_arch = "wasm32"))]
    let _ = why;
}

/// The page's WebGPU device, set up once (burn's runtime cannot be set up
/// twice in one page), or why there is none.
#[cfg(target_arch = "wasm32")]
pub async fn webgpu_device() -> Result<Device, String> {
    if let Some(known) = WEBGPU.with(|cell| cell.borrow().clone()) {
        return known;
    }
    let device = Device::wgpu_options()
        .init_async()
        .await
        .map_err(|e| format!("WebGPU could not start: {e}"));
    WEBGPU.with(|cell| *cell.borrow_mut() = Some(device.clone()));
    device
}

/// Natively there is no WebGPU here: the native client trains on `flex`.
#[cfg(not(target_arch = "wasm32"))]
pub async fn webgpu_device() -> Result<Device, String> {
    Err("WebGPU exists only in the browser build".into())
}

/// Chooses the tab's backend. `preference` is `auto`, `cpu` or `webgpu`;
/// the adapter is what `navigator.gpu.requestAdapter()` gave the page
/// (its vendor, architecture and description, and its fallback flag), or
/// `adapter_error` says why there is none (not a secure context, no
/// WebGPU in this browser, no adapter).
#[wasm_bindgen]
pub async fn choose_backend(
    preference: String,
    adapter_label: String,
    adapter_fallback: bool,
    adapter_error: Option<String>,
) -> Backend {
    let preference = Preference::parse(&preference);
    let mut adapter = match adapter_error {
        Some(why) => Err(why),
        None => Ok(AdapterFacts::new(&adapter_label, adapter_fallback)),
    };
    let cpu_device = Device::flex();
    let cpu_rate = match preference {
        Preference::Cpu => None,
        _ => trial_rate(&cpu_device, BackendKind::Cpu).await.ok(),
    };
    let mut gpu = None;
    if needs_gpu_trial(preference, &adapter) {
        match webgpu_device().await {
            Ok(device) => {
                gpu = trial_rate(&device, BackendKind::WebGpu)
                    .await
                    .ok()
                    .map(|rate| (device, rate));
            }
            Err(why) => adapter = Err(why),
        }
    }
    let (kind, reason) = decide(
        preference,
        &adapter,
        cpu_rate,
        gpu.as_ref().map(|(_, rate)| *rate),
    );
    let gpu_rate = gpu.as_ref().map(|(_, rate)| *rate);
    let device = match (kind, gpu) {
        (BackendKind::WebGpu, Some((device, _))) => device,
        (BackendKind::WebGpu, None) => match webgpu_device().await {
            Ok(device) => device,
            Err(why) => {
                return Backend {
                    kind: BackendKind::Cpu,
                    device: cpu_device,
                    adapter: adapter_label,
                    reason: why,
                    cpu_rate,
                    gpu_rate,
                };
            }
        },
        (BackendKind::Cpu, _) => cpu_device,
    };
    Backend {
        kind,
        device,
        adapter: adapter_label,
        reason,
        cpu_rate,
        gpu_rate,
    }
}

/// Refuses a label that names no class.
fn check_labels(labels: &[u32], num_classes: usize) -> Result<(), JsError> {
    match labels.iter().find(|&&l| l as usize >= num_classes) {
        Some(bad) => Err(JsError::new(&format!(
            "label {bad} is not below {num_classes} classes"
        ))),
        None => Ok(()),
    }
}

/// One tab's membership of a federation.
#[wasm_bindgen]
pub struct WasmClient {
    session: RefCell<ClientSession>,
    start: Vec<ClientAction>,
    data: Option<LocalData>,
    /// Where it trains: WebGPU until a hop fails there, then the CPU.
    kind: Cell<BackendKind>,
    device: RefCell<Device>,
    /// The CPU backend it fell back to in its last hop, until the page
    /// takes it ([`WasmClient::take_fallback`]).
    fallback: RefCell<Option<Backend>>,
}

fn set(object: &Object, key: &str, value: &JsValue) -> Result<(), JsError> {
    Reflect::set(object, &JsValue::from_str(key), value)
        .map(|_| ())
        .map_err(|_| JsError::new("cannot build an action object"))
}

/// The actions as an array of plain objects.
fn actions_to_js(actions: Vec<ClientAction>) -> Result<JsValue, JsError> {
    let out = Array::new();
    for action in actions {
        let object = Object::new();
        match action {
            ClientAction::Send(message) => {
                set(&object, "kind", &"send".into())?;
                set(&object, "text", &message.to_json().into())?;
            }
            ClientAction::SendBinary(frames) => {
                set(&object, "kind", &"send-binary".into())?;
                let list = Array::new();
                for frame in frames {
                    list.push(&Uint8Array::from(frame.as_slice()));
                }
                set(&object, "frames", &list)?;
            }
            ClientAction::LoadShard(shard) => {
                set(&object, "kind", &"load-shard".into())?;
                set(&object, "dataset", &shard.dataset.into())?;
                let indices: Vec<u32> = shard.indices.iter().map(|&i| i as u32).collect();
                set(
                    &object,
                    "indices",
                    &js_sys::Uint32Array::from(indices.as_slice()),
                )?;
            }
            ClientAction::ApplyPlan { ratios, seed } => {
                set(&object, "kind", &"apply-plan".into())?;
                set(
                    &object,
                    "ratios",
                    &js_sys::Float64Array::from(ratios.as_slice()),
                )?;
                set(&object, "seed", &JsValue::from(seed.to_string()))?;
            }
            ClientAction::Train { task, weights } => {
                set(&object, "kind", &"train".into())?;
                let task =
                    serde_json::to_string(&task).map_err(|e| JsError::new(&e.to_string()))?;
                set(&object, "task", &task.into())?;
                set(&object, "weights", &Float32Array::from(weights.as_slice()))?;
            }
            ClientAction::RoundDone {
                round,
                accuracy,
                epsilon,
                last,
            } => {
                set(&object, "kind", &"round-done".into())?;
                set(&object, "round", &round.into())?;
                set(&object, "accuracy", &accuracy.into())?;
                set(&object, "last", &last.into())?;
                if let Some(epsilon) = epsilon {
                    set(&object, "epsilon", &epsilon.into())?;
                }
            }
            ClientAction::Acknowledged {
                round,
                hop,
                outcome,
                reason,
            } => {
                set(&object, "kind", &"ack".into())?;
                set(&object, "round", &round.into())?;
                set(&object, "hop", &hop.into())?;
                let outcome = serde_json::to_value(outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                set(&object, "outcome", &outcome.into())?;
                set(&object, "reason", &reason.unwrap_or_default().into())?;
            }
            ClientAction::Close(reason) => {
                set(&object, "kind", &"close".into())?;
                set(&object, "reason", &reason.into())?;
            }
        }
        out.push(&object);
    }
    Ok(out.into())
}

#[wasm_bindgen]
impl WasmClient {
    /// A client that will train on `backend` (named to the server) and
    /// accept frames up to `max_frame_bytes`; `demo` asks for a shard;
    /// `resume` is the token of an earlier welcome (a reloaded tab keeps it
    /// in `sessionStorage`), to come back as the same client.
    #[wasm_bindgen(constructor)]
    pub fn new(
        backend: &Backend,
        max_frame_bytes: usize,
        demo: bool,
        resume: Option<String>,
    ) -> WasmClient {
        let data = if demo {
            DataSource::Demo
        } else {
            DataSource::Own { counts: vec![] }
        };
        let (session, start) =
            ClientSession::resuming(backend.kind.name(), None, data, max_frame_bytes, resume);
        WasmClient {
            session: RefCell::new(session),
            start,
            data: None,
            kind: Cell::new(backend.kind),
            device: RefCell::new(backend.device.clone()),
            fallback: RefCell::new(None),
        }
    }

    /// The CPU backend this client fell back to when WebGPU failed in its
    /// last hop, once (later calls give `undefined`): the worker keeps it
    /// for its next connections and tells the page why.
    pub fn take_fallback(&self) -> Option<Backend> {
        self.fallback.borrow_mut().take()
    }

    /// The first actions (the join), to run once the socket is open.
    pub fn start(&mut self) -> Result<JsValue, JsError> {
        actions_to_js(std::mem::take(&mut self.start))
    }

    /// Handles a text frame from the server.
    pub fn on_text(&mut self, text: &str) -> Result<JsValue, JsError> {
        actions_to_js(self.session.get_mut().on_text(text))
    }

    /// Handles a binary frame from the server.
    pub fn on_binary(&mut self, frame: &[u8]) -> Result<JsValue, JsError> {
        actions_to_js(self.session.get_mut().on_binary(frame))
    }

    /// Gives the client its local data (images `[C, H, W]` in `[0, 1]`,
    /// sample-major); returns the `ready` report.
    #[allow(clippy::too_many_arguments)]
    pub fn set_data(
        &mut self,
        images: Vec<f32>,
        labels: Vec<u32>,
        channels: usize,
        height: usize,
        width: usize,
        num_classes: usize,
    ) -> Result<JsValue, JsError> {
        if images.len() != labels.len() * channels * height * width {
            return Err(JsError::new(&format!(
                "{} image values for {} labels of {channels}x{height}x{width}",
                images.len(),
                labels.len()
            )));
        }
        check_labels(&labels, num_classes)?;
        let data = LocalData {
            images,
            labels,
            channels,
            height,
            width,
            num_classes,
            planned: None,
        };
        let counts = data.counts();
        self.data = Some(data);
        actions_to_js(self.session.get_mut().data_ready(counts))
    }

    /// Gives the client its demo shard as fetched from `/api/shard/{id}`
    /// (the compact binary of `astraea_core::data::shard`); returns the
    /// `ready` report.
    pub fn set_shard(&mut self, bytes: &[u8]) -> Result<JsValue, JsError> {
        let shard = decode_shard(bytes).map_err(|e| JsError::new(&e.to_string()))?;
        let (channels, height, width, classes) = (
            shard.channels,
            shard.height,
            shard.width,
            shard.num_classes(),
        );
        self.set_data(shard.images, shard.labels, channels, height, width, classes)
    }

    /// Adds samples the volunteer made (digits drawn on the page) to the
    /// local data, each with its label; returns the new `ready` report.
    /// They must have the shape of the data already loaded, and stay in the
    /// tab like the rest.
    pub fn add_samples(&mut self, images: Vec<f32>, labels: Vec<u32>) -> Result<JsValue, JsError> {
        let data = self
            .data
            .as_mut()
            .ok_or_else(|| JsError::new("samples added before any data"))?;
        let sample_len = data.channels * data.height * data.width;
        if labels.is_empty() || images.len() != labels.len() * sample_len {
            return Err(JsError::new(&format!(
                "{} values for {} labels; samples here are {}x{}x{}",
                images.len(),
                labels.len(),
                data.channels,
                data.height,
                data.width
            )));
        }
        check_labels(&labels, data.num_classes)?;
        if images.iter().any(|v| !(0.0..=1.0).contains(v)) {
            return Err(JsError::new("pixel values must lie in [0, 1]"));
        }
        data.images.extend_from_slice(&images);
        data.labels.extend_from_slice(&labels);
        if let Some((planned_images, planned_labels)) = &mut data.planned {
            planned_images.extend_from_slice(&images);
            planned_labels.extend_from_slice(&labels);
        }
        let counts = data.counts();
        actions_to_js(self.session.get_mut().data_ready(counts))
    }

    /// Samples the tab trains on now, per class (after the plan).
    pub fn label_counts(&self) -> Vec<u32> {
        self.data
            .as_ref()
            .map(|d| d.counts().into_iter().map(|c| c as u32).collect())
            .unwrap_or_default()
    }

    /// The id the server gave this client, once welcomed (for the shard URL).
    pub fn client_id(&self) -> Option<f64> {
        self.session.borrow().client_id().map(|id| id as f64)
    }

    /// The label epsilon per count report the server asked for, once
    /// welcomed (`None`: the counts leave exactly).
    pub fn label_epsilon(&self) -> Option<f64> {
        self.session.borrow().label_epsilon()
    }

    /// Whether the run sums the mediators' results under secure aggregation:
    /// this tab's result, when it ends a chain, leaves masked.
    pub fn secure_aggregation(&self) -> bool {
        self.session.borrow().secure_aggregation()
    }

    /// This tab's noisy label report and the counts behind it, as JSON
    /// `{"exact": [...], "noisy": [...]}`, for the page to keep in
    /// `sessionStorage`; `None` without label privacy.
    pub fn label_report(&self) -> Option<String> {
        let (exact, noisy) = self.session.borrow().label_report()?;
        Some(serde_json::json!({ "exact": exact, "noisy": noisy }).to_string())
    }

    /// Reuses an earlier session's [`WasmClient::label_report`] if this tab's
    /// data is the same (a reload then spends no epsilon); malformed text
    /// is ignored.
    pub fn reuse_label_report(&self, json: &str) {
        let Ok(report) = serde_json::from_str::<serde_json::Value>(json) else {
            return;
        };
        let counts = |key: &str| -> Option<Vec<usize>> {
            report[key]
                .as_array()?
                .iter()
                .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect()
        };
        if let (Some(exact), Some(noisy)) = (counts("exact"), counts("noisy")) {
            self.session.borrow_mut().reuse_label_report(exact, noisy);
        }
    }

    /// Client-level DP on the model, as the welcome announced it: a JSON
    /// object (`clip`, `noise_multiplier`, `delta`, optional `budget`,
    /// `distributed`, docs/PROTOCOL.md), or `undefined` without DP.
    pub fn model_privacy(&self) -> Option<String> {
        self.session
            .borrow()
            .model_privacy()
            .and_then(|spec| serde_json::to_string(&spec).ok())
    }

    /// The label epsilon this tab's count reports have spent so far.
    pub fn label_epsilon_spent(&self) -> f64 {
        self.session.borrow().label_epsilon_spent()
    }

    /// The token to come back with as this client after a reload or a
    /// reconnect, once welcomed.
    pub fn resume_token(&self) -> Option<String> {
        self.session.borrow().resume_token().map(str::to_string)
    }

    /// The latest window (ms) the server asked its clients to spread
    /// coming back over (pace steering); `null` until it said one.
    pub fn rejoin_within_ms(&self) -> Option<f64> {
        self.session.borrow().rejoin_within_ms().map(|ms| ms as f64)
    }

    /// Applies the server's augmentation plan to the local data (seed as a
    /// decimal string, since JavaScript numbers cannot hold every u64).
    pub fn apply_plan(&mut self, ratios: Vec<f64>, seed: &str) -> Result<JsValue, JsError> {
        let seed: u64 = seed
            .parse()
            .map_err(|_| JsError::new("the plan's seed is not a u64"))?;
        let data = self
            .data
            .as_mut()
            .ok_or_else(|| JsError::new("a plan before any data"))?;
        let outcome = apply_plan(&data.labels, &ratios, &AugmentConfig::default(), seed)
            .map_err(|e| JsError::new(&e.to_string()))?;
        let sample_len = data.channels * data.height * data.width;
        let planned = materialise(
            &data.images,
            &data.labels,
            sample_len,
            data.channels,
            data.height,
            data.width,
            &outcome,
        )
        .map_err(|e| JsError::new(&e.to_string()))?;
        data.planned = Some(planned);
        let counts = data.counts();
        actions_to_js(self.session.get_mut().data_ready(counts))
    }

    /// The model the server announced, as JSON (`ModelSpec`), for the
    /// replicas of a hop ([`WasmReplica`]); `None` before the welcome.
    pub fn model_json(&self) -> Option<String> {
        let session = self.session.borrow();
        session
            .model()
            .map(|m| serde_json::to_string(m).expect("a model spec serialises"))
    }

    /// The samples a hop trains on (the shard, the plan's additions and
    /// the drawn digits), copied: `{images: Float32Array, labels:
    /// Uint32Array}` for the replicas of a hop; `null` before any data.
    pub fn training_data(&self) -> JsValue {
        let Some(data) = self.data.as_ref() else {
            return JsValue::NULL;
        };
        let (images, labels) = data.training_set();
        let object = Object::new();
        let _ = Reflect::set(
            &object,
            &"images".into(),
            &Float32Array::from(images).into(),
        );
        let _ = Reflect::set(
            &object,
            &"labels".into(),
            &js_sys::Uint32Array::from(labels).into(),
        );
        object.into()
    }

    /// The update to send for a hop its replicas trained
    /// ([`WasmReplica::finish`]): `weights` after the hop, its mean
    /// training loss and the seconds it took; the actions, as
    /// [`WasmClient::train`] returns them.
    pub fn finish_hop(
        &self,
        task: String,
        weights: Vec<f32>,
        mean_loss: f64,
        seconds: f64,
    ) -> Result<JsValue, JsError> {
        let task: TaskSpec = from_json(&task)?;
        let samples = self
            .data
            .as_ref()
            .ok_or_else(|| JsError::new("a hop before any data"))?
            .training_set()
            .1
            .len() as u64;
        let actions = self
            .session
            .borrow_mut()
            .trained(&task, &weights, samples, mean_loss, seconds);
        actions_to_js(actions)
    }

    /// Trains one hop on the tab's backend and returns the update to
    /// send. `on_step` is called after every optimiser step with
    /// `{epoch, epochs, batch, batches, loss, progress}`, for progress bars
    /// and the loss curve; `progress` is the `progress` message's text, the
    /// heartbeat the worker sends the server at least every second.
    pub async fn train(
        &self,
        task: String,
        weights: Vec<f32>,
        on_step: Function,
    ) -> Result<JsValue, JsError> {
        let task: TaskSpec = from_json(&task)?;
        let model = self
            .session
            .borrow()
            .model()
            .ok_or_else(|| JsError::new("a task before the welcome"))?
            .clone();
        let data = self
            .data
            .as_ref()
            .ok_or_else(|| JsError::new("a task before any data"))?;
        let (images, labels) = data.training_set();
        let samples = Samples { images, labels };
        let mut report = |step: &StepProgress| {
            let object = Object::new();
            let fields = [
                ("epoch", step.epoch as f64),
                ("epochs", step.epochs as f64),
                ("batch", step.batch as f64),
                ("batches", step.batches as f64),
                ("loss", f64::from(step.loss)),
            ];
            for (key, value) in fields {
                let _ = Reflect::set(&object, &key.into(), &value.into());
            }
            // The heartbeat to send when the page decides to (see worker.js).
            let progress = progress_message(&task, step).to_json();
            let _ = Reflect::set(&object, &"progress".into(), &progress.into());
            // A failing progress callback must not fail the training.
            let _ = on_step.call1(&JsValue::NULL, &object);
        };
        let start = js_sys::Date::now();
        let device = self.device.borrow().clone();
        let (trained, stats) = match self.kind.get() {
            BackendKind::Cpu => train_task(&model, &task, weights, samples, &mut report),
            BackendKind::WebGpu => {
                let kept = weights.clone();
                match train_task_async(&model, &task, weights, samples, &device, &mut report).await
                {
                    Ok(done) => Ok(done),
                    // The GPU failed mid-hop (a lost device: the GPU process
                    // crashed, the driver reset, the system reclaimed it):
                    // the hop starts again from the task's weights on the
                    // CPU, and the tab stays there.
                    Err(e) => {
                        let why = format!(
                            "WebGPU failed mid-hop ({e}); the hop was trained again on the CPU, which this tab now uses"
                        );
                        forget_webgpu(&why);
                        self.kind.set(BackendKind::Cpu);
                        *self.device.borrow_mut() = Device::flex();
                        *self.fallback.borrow_mut() = Some(Backend {
                            reason: why,
                            ..Backend::cpu()
                        });
                        let samples = Samples { images, labels };
                        train_task(&model, &task, kept, samples, &mut report)
                    }
                }
            }
        }
        .map_err(|e| JsError::new(&e.to_string()))?;
        let seconds = (js_sys::Date::now() - start) / 1000.0;
        let actions = self.session.borrow_mut().trained(
            &task,
            &trained,
            labels.len() as u64,
            stats.mean_loss,
            seconds,
        );
        actions_to_js(actions)
    }
}

/// `json` read as a `T`, or the parser's error for JavaScript.
fn from_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, JsError> {
    serde_json::from_str(json).map_err(|e| JsError::new(&e.to_string()))
}

/// One replica of a hop trained by several Web Workers at once
/// (`astraea_core::train::Replica`): the tab's worker holds replica 0 and
/// each helper worker one other; every step each computes the gradients
/// of its slice of the batch ([`WasmReplica::gradients`]), the tab's
/// worker adds them up and every replica takes the same step with the sum
/// ([`WasmReplica::apply`]). On the CPU (`flex`) only.
#[wasm_bindgen]
pub struct WasmReplica {
    replica: Option<Replica<'static>>,
    task: TaskSpec,
}

#[wasm_bindgen]
impl WasmReplica {
    /// Replica `index` of `of` of the hop `task` (JSON) of `model` (JSON,
    /// [`WasmClient::model_json`]) from `weights`, on `images` and
    /// `labels` ([`WasmClient::training_data`]).
    #[wasm_bindgen(constructor)]
    pub fn new(
        model: &str,
        task: &str,
        weights: Vec<f32>,
        images: Vec<f32>,
        labels: Vec<u32>,
        index: usize,
        of: usize,
    ) -> Result<WasmReplica, JsError> {
        let (task, (config, weights, train_config)) = replica_setup(model, task, weights)?;
        let replica = Replica::owned(
            config,
            &weights,
            (images, labels),
            train_config,
            Device::flex().autodiff(),
            (index, of),
        )
        .map_err(|e| JsError::new(&e.to_string()))?;
        Ok(Self {
            replica: Some(replica),
            task,
        })
    }

    fn replica(&mut self) -> Result<&mut Replica<'static>, JsError> {
        self.replica
            .as_mut()
            .ok_or_else(|| JsError::new("the replica has finished"))
    }

    /// The next step: `{grads: Float32Array, loss, epoch, epochs, batch,
    /// batches, progress}` (`loss`: this slice's part of the batch's mean;
    /// `progress`: the heartbeat's text), or `null` once the hop is done.
    pub fn gradients(&mut self) -> Result<JsValue, JsError> {
        let replica = self.replica()?;
        let Some((grads, loss, step)) = replica
            .gradients()
            .map_err(|e| JsError::new(&e.to_string()))?
        else {
            return Ok(JsValue::NULL);
        };
        let object = step_object(&self.task, &StepProgress { loss, ..step });
        let _ = Reflect::set(
            &object,
            &"grads".into(),
            &Float32Array::from(&grads[..]).into(),
        );
        Ok(object.into())
    }

    /// Takes the step begun with `summed`, every replica's gradients of
    /// it added up.
    pub fn apply(&mut self, summed: &[f32]) -> Result<(), JsError> {
        self.replica()?
            .apply(summed)
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// Goes on alone ([`Replica::alone`]): the helpers are gone or slower
    /// together. A step begun and not applied is taken again on the whole
    /// batch; its loss, or `undefined` when none was in flight. Then
    /// [`WasmReplica::step`] takes the rest of the hop.
    pub fn alone(&mut self) -> Result<Option<f32>, JsError> {
        self.replica()?
            .alone()
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// The next whole step of a replica gone alone: `{loss, epoch, epochs,
    /// batch, batches, progress}` as [`WasmReplica::gradients`] without
    /// `grads`, or `null` once the hop is done.
    pub fn step(&mut self) -> Result<JsValue, JsError> {
        let replica = self.replica()?;
        let Some(step) = replica.step().map_err(|e| JsError::new(&e.to_string()))? else {
            return Ok(JsValue::NULL);
        };
        Ok(step_object(&self.task, &step).into())
    }

    /// The weights after the hop (a `Float32Array`); the replica is spent.
    pub fn finish(&mut self) -> Result<Float32Array, JsError> {
        let replica = self
            .replica
            .take()
            .ok_or_else(|| JsError::new("the replica has finished"))?;
        let (weights, _) = replica.finish();
        Ok(Float32Array::from(&weights.values[..]))
    }
}

/// A replica's hop from JavaScript's arguments: the task (JSON) and what
/// `task_setup` makes of it with the model (JSON) and `weights`.
fn replica_setup(
    model: &str,
    task: &str,
    weights: Vec<f32>,
) -> Result<(TaskSpec, (ModelConfig, Weights, TrainConfig)), JsError> {
    let model: astraea_core::protocol::ModelSpec = from_json(model)?;
    let task: TaskSpec = from_json(task)?;
    let setup = task_setup(&model, &task, weights);
    Ok((task, setup))
}

/// A replica's step for JavaScript: `{epoch, epochs, batch, batches, loss,
/// progress}` (`progress`: the heartbeat's text).
fn step_object(task: &TaskSpec, step: &StepProgress) -> Object {
    let object = Object::new();
    let fields = [
        ("epoch", step.epoch as f64),
        ("epochs", step.epochs as f64),
        ("batch", step.batch as f64),
        ("batches", step.batches as f64),
        ("loss", f64::from(step.loss)),
    ];
    for (key, value) in fields {
        let _ = Reflect::set(&object, &key.into(), &value.into());
    }
    let progress = progress_message(task, step).to_json();
    let _ = Reflect::set(&object, &"progress".into(), &progress.into());
    object
}

/// One replica of a hop trained by local SGD in a Web Worker
/// ([`LocalReplica`]: the hop's batches dealt between the workers, their
/// weights averaged every `sync` rounds; not the single hop's update, see
/// there). The tab's worker drives: `step` until `null`, `weights`, the
/// average of every replica's, `load`, until `load` says the hop is done.
/// On the CPU (`flex`) only.
#[wasm_bindgen]
pub struct WasmLocalReplica {
    replica: Option<LocalReplica<'static>>,
    task: TaskSpec,
}

#[wasm_bindgen]
impl WasmLocalReplica {
    /// Replica `index` of `of` of the hop `task` (JSON) of `model` (JSON,
    /// [`WasmClient::model_json`]) from `weights`, on `images` and
    /// `labels` ([`WasmClient::training_data`]), averaged every `sync`
    /// rounds (0: once, at the end).
    #[wasm_bindgen(constructor)]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &str,
        task: &str,
        weights: Vec<f32>,
        images: Vec<f32>,
        labels: Vec<u32>,
        index: usize,
        of: usize,
        sync: usize,
    ) -> Result<WasmLocalReplica, JsError> {
        let (task, (config, weights, train_config)) = replica_setup(model, task, weights)?;
        let replica = LocalReplica::owned(
            config,
            &weights,
            (images, labels),
            train_config,
            Device::flex().autodiff(),
            (index, of),
            sync,
        )
        .map_err(|e| JsError::new(&e.to_string()))?;
        Ok(Self {
            replica: Some(replica),
            task,
        })
    }

    fn replica(&mut self) -> Result<&mut LocalReplica<'static>, JsError> {
        self.replica
            .as_mut()
            .ok_or_else(|| JsError::new("the replica has finished"))
    }

    /// Trains this replica's next batch of the stretch: `{epoch, epochs,
    /// batch, batches, loss, progress}`, or `null` once the stretch has
    /// no more of its batches.
    pub fn step(&mut self) -> Result<JsValue, JsError> {
        let step = self
            .replica()?
            .step()
            .map_err(|e| JsError::new(&e.to_string()))?;
        Ok(match step {
            Some((_, progress)) => step_object(&self.task, &progress).into(),
            None => JsValue::NULL,
        })
    }

    /// The stretch's end: `{weights: Float32Array, samples}`, this
    /// replica's part of the average.
    pub fn weights(&mut self) -> Result<JsValue, JsError> {
        let (values, samples) = self.replica()?.weights();
        let object = Object::new();
        let _ = Reflect::set(
            &object,
            &"weights".into(),
            &Float32Array::from(&values[..]).into(),
        );
        let _ = Reflect::set(&object, &"samples".into(), &(samples as f64).into());
        Ok(object.into())
    }

    /// Goes on from `averaged`; whether another stretch follows (`false`:
    /// the hop is done, `averaged` its weights).
    pub fn load(&mut self, averaged: &[f32]) -> Result<bool, JsError> {
        self.replica()?
            .load(averaged)
            .map_err(|e| JsError::new(&e.to_string()))
    }

    /// This replica's part of the hop, `{steps, samples, lossSum}`; the
    /// replica is spent.
    pub fn finish(&mut self) -> Result<JsValue, JsError> {
        let replica = self
            .replica
            .take()
            .ok_or_else(|| JsError::new("the replica has finished"))?;
        let (_, stats) = replica.finish();
        let object = Object::new();
        let fields = [
            ("steps", stats.steps as f64),
            ("samples", stats.samples as f64),
            ("lossSum", stats.mean_loss * stats.steps as f64),
        ];
        for (key, value) in fields {
            let _ = Reflect::set(&object, &key.into(), &value.into());
        }
        Ok(object.into())
    }
}

/// Milliseconds to wait before the next attempt to join after `failures`
/// failed ones since the tab last held a session (0: the first after
/// losing one), given the server's latest window `window_ms` (0: none)
/// and `draw`, uniform in `[0, 1)`: `astraea_core::protocol::pace::rejoin_delay`,
/// the native client's rule.
#[wasm_bindgen]
pub fn rejoin_delay_ms(window_ms: f64, failures: u32, draw: f64) -> f64 {
    let window = if window_ms.is_finite() && window_ms > 0.0 {
        window_ms as u64
    } else {
        0
    };
    astraea_core::protocol::pace::rejoin_delay(window, failures, draw).as_secs_f64() * 1000.0
}
