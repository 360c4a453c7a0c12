//! Astraea's browser client. It is thin on purpose: the protocol's state
//! machine, the model and the training step all live in `astraea-core`;
//! this crate moves frames between JavaScript and that state machine and
//! runs the training the server asks for on the tab's CPU (burn's `flex`
//! device compiled to WebAssembly).
//!
//! # Layout
//! - [`web`]: every `#[wasm_bindgen]` item: the [`web::WasmClient`] and the
//!   conversion of its actions to plain JavaScript objects.
#![warn(missing_docs)]

pub mod web;
