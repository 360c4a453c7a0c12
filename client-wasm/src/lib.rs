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

/// Runs the module's static constructors once, when the page instantiates
/// it (`#[wasm_bindgen(start)]`); later calls do nothing.
///
/// burn's WebGPU stack (cubecl's IR dialects, pliron) registers itself
/// with `inventory`, whose constructors `wasm-ld` gathers into
/// `__wasm_call_ctors`. A module whose exports never call that function
/// counts as "command-style" to the linker, which then calls it at the
/// start of *every* export: each call from JavaScript into the module (a
/// few per training step) re-ran every registration. A profile of a tab
/// training on the CPU (V8 `--prof`, docs/RESULTS.md "Training speed")
/// found a quarter of its time there. Calling it here, from an exported
/// function, makes the module a reactor: the constructors run once. A
/// host that does not run wasm-bindgen's start function (the
/// `wasm-bindgen-test` runner) calls this before using the WebGPU backend.
#[cfg(target_arch = "wasm32")]
#[wasm_bindgen::prelude::wasm_bindgen(start)]
pub fn run_constructors() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[allow(unsafe_code)]
        // SAFETY: `__wasm_call_ctors` is the linker's own function, taking
        // no arguments; `ONCE` makes this its only call in the instance,
        // and with this call in an export the linker inserts no others, so
        // no constructor runs twice.
        unsafe {
            __wasm_call_ctors();
        }
    });
}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
unsafe extern "C" {
    fn __wasm_call_ctors();
}
