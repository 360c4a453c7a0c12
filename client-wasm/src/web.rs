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
//! | `round-done` | `round`, `accuracy` | show it |
//! | `close` | `reason` | close the socket and say why |

use astraea_core::augment::{AugmentConfig, apply_plan, materialise};
use astraea_core::data::shard::decode_shard;
use astraea_core::protocol::{
    ClientAction, ClientSession, DataSource, PROTOCOL_VERSION, TaskSpec, train_task,
};
use astraea_core::train::Samples;
use js_sys::{Array, Float32Array, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;

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

/// One tab's membership of a federation.
#[wasm_bindgen]
pub struct WasmClient {
    session: ClientSession,
    start: Vec<ClientAction>,
    data: Option<LocalData>,
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
            ClientAction::RoundDone { round, accuracy } => {
                set(&object, "kind", &"round-done".into())?;
                set(&object, "round", &round.into())?;
                set(&object, "accuracy", &accuracy.into())?;
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
    /// A client that will train on `backend` (shown to the server) and
    /// accept frames up to `max_frame_bytes`; `demo` asks for a shard.
    #[wasm_bindgen(constructor)]
    pub fn new(backend: &str, max_frame_bytes: usize, demo: bool) -> WasmClient {
        let data = if demo {
            DataSource::Demo
        } else {
            DataSource::Own { counts: vec![] }
        };
        let (session, start) = ClientSession::start(backend, None, data, max_frame_bytes);
        WasmClient {
            session,
            start,
            data: None,
        }
    }

    /// The first actions (the join), to run once the socket is open.
    pub fn start(&mut self) -> Result<JsValue, JsError> {
        actions_to_js(std::mem::take(&mut self.start))
    }

    /// Handles a text frame from the server.
    pub fn on_text(&mut self, text: &str) -> Result<JsValue, JsError> {
        actions_to_js(self.session.on_text(text))
    }

    /// Handles a binary frame from the server.
    pub fn on_binary(&mut self, frame: &[u8]) -> Result<JsValue, JsError> {
        actions_to_js(self.session.on_binary(frame))
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
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= num_classes) {
            return Err(JsError::new(&format!(
                "label {bad} is not below {num_classes} classes"
            )));
        }
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
        actions_to_js(self.session.data_ready(counts))
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

    /// The id the server gave this client, once welcomed (for the shard URL).
    pub fn client_id(&self) -> Option<f64> {
        self.session.client_id().map(|id| id as f64)
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
        actions_to_js(self.session.data_ready(counts))
    }

    /// Trains one hop on the tab's CPU and returns the update to send.
    pub fn train(&mut self, task: &str, weights: Vec<f32>) -> Result<JsValue, JsError> {
        let task: TaskSpec =
            serde_json::from_str(task).map_err(|e| JsError::new(&e.to_string()))?;
        let model = self
            .session
            .model()
            .ok_or_else(|| JsError::new("a task before the welcome"))?
            .clone();
        let data = self
            .data
            .as_ref()
            .ok_or_else(|| JsError::new("a task before any data"))?;
        let (images, labels) = data.training_set();
        let start = js_sys::Date::now();
        let (trained, stats) = train_task(&model, &task, weights, Samples { images, labels })
            .map_err(|e| JsError::new(&e.to_string()))?;
        let seconds = (js_sys::Date::now() - start) / 1000.0;
        let actions = self.session.trained(
            &task,
            &trained,
            labels.len() as u64,
            stats.mean_loss,
            seconds,
        );
        actions_to_js(actions)
    }
}
