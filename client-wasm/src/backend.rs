//! Which device the tab trains on, and why.
//!
//! A WebGPU adapter is not always faster than the tab's CPU: on the papers'
//! CNN at batch 20, burn `flex` in a wasm tab trains about 3,300 samples/s
//! on this project's CI machine while Chromium's software adapter
//! (SwiftShader) trains 23, after a 27 s shader warm-up. So a software or
//! fallback adapter is never picked over the CPU, and a hardware adapter is
//! picked only when a short measured trial says it trains faster.
//!
//! The decision is plain Rust ([`needs_gpu_trial`], [`decide`]) and tested
//! natively; the trial itself and WebGPU exist only in the wasm32 build.

/// What the page asked for (`?backend=` in its URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preference {
    /// Measure and pick the faster.
    Auto,
    /// The CPU, whatever the adapter.
    Cpu,
    /// WebGPU whenever an adapter exists, even a software one.
    WebGpu,
}

impl Preference {
    /// Reads `auto`, `cpu`/`flex` or `webgpu`/`gpu`; anything else is `Auto`.
    pub fn parse(text: &str) -> Self {
        match text.trim().to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Self::Cpu,
            "webgpu" | "gpu" | "wgpu" => Self::WebGpu,
            _ => Self::Auto,
        }
    }
}

/// What the browser says about its WebGPU adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterFacts {
    /// A name to show: vendor, architecture, description.
    pub label: String,
    /// A fallback adapter, or one whose name says it renders in software.
    pub software: bool,
}

impl AdapterFacts {
    /// Facts from the adapter's description and its fallback flag.
    pub fn new(label: &str, fallback: bool) -> Self {
        let lower = label.to_ascii_lowercase();
        let software_name = [
            "swiftshader",
            "llvmpipe",
            "lavapipe",
            "software",
            "basic render",
        ]
        .iter()
        .any(|name| lower.contains(name));
        Self {
            label: label.trim().to_string(),
            software: fallback || software_name,
        }
    }
}

/// The device the tab trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// burn `flex` in WebAssembly.
    Cpu,
    /// burn `wgpu` on the browser's WebGPU adapter.
    WebGpu,
}

impl BackendKind {
    /// The name reported to the server in `join`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "flex",
            Self::WebGpu => "webgpu",
        }
    }
}

/// Whether the GPU is worth a trial run: only a hardware adapter, or any
/// adapter when the page insists on WebGPU.
pub fn needs_gpu_trial(preference: Preference, adapter: &Result<AdapterFacts, String>) -> bool {
    match (preference, adapter) {
        (Preference::Cpu, _) | (_, Err(_)) => false,
        (Preference::WebGpu, Ok(_)) => true,
        (Preference::Auto, Ok(facts)) => !facts.software,
    }
}

/// The choice and a sentence for the page saying why. `cpu_rate` and
/// `gpu_rate` are measured training samples per second (`gpu_rate` only
/// when [`needs_gpu_trial`] said so and the trial ran).
pub fn decide(
    preference: Preference,
    adapter: &Result<AdapterFacts, String>,
    cpu_rate: Option<f64>,
    gpu_rate: Option<f64>,
) -> (BackendKind, String) {
    let rates = |gpu: f64| match cpu_rate {
        Some(cpu) => format!("{gpu:.0} samples/s on WebGPU vs {cpu:.0} on the CPU"),
        None => format!("{gpu:.0} samples/s on WebGPU"),
    };
    match (preference, adapter, gpu_rate) {
        (Preference::Cpu, _, _) => (BackendKind::Cpu, "the CPU was asked for".into()),
        (_, Err(why), _) => (BackendKind::Cpu, format!("no WebGPU adapter: {why}")),
        (Preference::WebGpu, Ok(facts), gpu) => (
            BackendKind::WebGpu,
            match gpu {
                Some(gpu) => format!("WebGPU was asked for ({}; {})", facts.label, rates(gpu)),
                None => format!("WebGPU was asked for ({})", facts.label),
            },
        ),
        (Preference::Auto, Ok(facts), _) if facts.software => (
            BackendKind::Cpu,
            format!(
                "the WebGPU adapter ({}) renders in software, slower than the CPU",
                facts.label
            ),
        ),
        (Preference::Auto, Ok(facts), Some(gpu)) => match cpu_rate {
            Some(cpu) if cpu >= gpu => (
                BackendKind::Cpu,
                format!("the CPU trained faster ({}; {})", facts.label, rates(gpu)),
            ),
            _ => (
                BackendKind::WebGpu,
                format!("WebGPU trained faster ({}; {})", facts.label, rates(gpu)),
            ),
        },
        (Preference::Auto, Ok(facts), None) => (
            BackendKind::Cpu,
            format!("the WebGPU trial on {} did not finish", facts.label),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hardware() -> Result<AdapterFacts, String> {
        Ok(AdapterFacts::new("nvidia ampere", false))
    }

    #[test]
    fn software_and_fallback_adapters_are_recognised() {
        assert!(AdapterFacts::new("google swiftshader", false).software);
        assert!(AdapterFacts::new("mesa llvmpipe", false).software);
        assert!(AdapterFacts::new("intel gen-12lp", true).software);
        assert!(!AdapterFacts::new("intel gen-12lp", false).software);
    }

    #[test]
    fn a_software_adapter_is_not_even_tried_unless_webgpu_is_forced() {
        let software = Ok(AdapterFacts::new("google swiftshader", false));
        assert!(!needs_gpu_trial(Preference::Auto, &software));
        assert!(needs_gpu_trial(Preference::WebGpu, &software));
        assert!(needs_gpu_trial(Preference::Auto, &hardware()));
        assert!(!needs_gpu_trial(Preference::Cpu, &hardware()));
        assert!(!needs_gpu_trial(Preference::Auto, &Err("none".into())));

        let (kind, why) = decide(Preference::Auto, &software, Some(3300.0), None);
        assert_eq!(kind, BackendKind::Cpu);
        assert!(why.contains("software"), "{why}");
    }

    #[test]
    fn the_measured_faster_backend_wins() {
        let (kind, why) = decide(Preference::Auto, &hardware(), Some(3300.0), Some(9000.0));
        assert_eq!(kind, BackendKind::WebGpu);
        assert!(why.contains("9000 samples/s on WebGPU vs 3300"), "{why}");
        let (kind, _) = decide(Preference::Auto, &hardware(), Some(3300.0), Some(23.0));
        assert_eq!(kind, BackendKind::Cpu);
    }

    #[test]
    fn preferences_are_obeyed_and_a_missing_adapter_falls_back_with_a_reason() {
        assert_eq!(Preference::parse("WebGPU"), Preference::WebGpu);
        assert_eq!(Preference::parse("cpu"), Preference::Cpu);
        assert_eq!(Preference::parse(""), Preference::Auto);
        let (kind, _) = decide(Preference::Cpu, &hardware(), None, None);
        assert_eq!(kind, BackendKind::Cpu);
        let (kind, why) = decide(
            Preference::WebGpu,
            &Err("not a secure context".into()),
            None,
            None,
        );
        assert_eq!(kind, BackendKind::Cpu);
        assert!(why.contains("not a secure context"), "{why}");
    }
}
