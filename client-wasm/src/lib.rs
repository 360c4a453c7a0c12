//! Astraea's browser client. It is thin on purpose: the protocol's state
//! machine, the model and the training step all live in `astraea-core`;
//! this crate moves frames between JavaScript and that state machine and
//! runs the training the server asks for on the tab's backend: WebGPU
//! (burn's `wgpu`) or the CPU (burn's `flex`), chosen by a measured trial.
//!
//! # Layout
//! - [`backend`]: the choice between WebGPU and the CPU, and its reason.
//! - [`web`]: every `#[wasm_bindgen]` item: the [`web::WasmClient`] and the
//!   conversion of its actions to plain JavaScript objects.
#![warn(missing_docs)]

pub mod backend;
pub mod web;
