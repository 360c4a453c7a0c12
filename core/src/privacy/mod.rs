//! Differential privacy: what a volunteer's reports reveal, bounded.
//!
//! - **Label counts under local DP** ([`noisy_counts`]): a client adds
//!   discrete Laplace noise of scale `1 / epsilon` to each of its label
//!   counts before they leave it (the geometric mechanism, Ghosh,
//!   Roughgarden and Sundararajan 2012), drawn by OpenDP's exact sampler
//!   (Canonne, Kamath and Steinke 2020), and clamps at zero
//!   (post-processing). Neighbouring datasets differ by one sample added
//!   or removed, which moves one count by one (L1 sensitivity 1), so a
//!   report is `epsilon`-DP for every sample; a sample whose label changes
//!   moves two counts and is `2 epsilon`-DP. The post-plan report is
//!   computed from the noisy report and the plan ([`planned_counts`]),
//!   which is post-processing: it spends nothing more.
//! - **Client-level DP for the model** ([`RdpAccountant`]): the privacy
//!   spent by the sampled Gaussian mechanism over rounds, in Rényi DP
//!   (Mironov 2017; Mironov, Talwar and Zhang 2019), converted to
//!   (epsilon, delta) with Canonne, Kamath and Steinke's bound (2020), as
//!   Google's `dp_accounting` and Opacus do.
//!
//! The parts, each re-exported here (`privacy::noisy_counts` is the path):
//! - `label.rs`: label counts under local DP.
//! - `accountant.rs`: the Rényi DP accountant.
//! - `model.rs`: the mechanisms on the model's updates: DP-FedAvg's clipped
//!   noisy mean, adaptive clipping, per-hop noise.
//! - `secure.rs`: their glue with secure aggregation: the clip split
//!   between server and masker, distributed noise, the masker's step.

mod accountant;
mod label;
mod model;
mod secure;

pub use accountant::{RdpAccountant, hop_epsilon, noise_for_epsilon, sampled_gaussian_rdp};
pub use label::{label_report_epsilon, noisy_counts, planned_counts};
pub use model::{
    AdaptiveClip, HopPrivacy, ModelPrivacy, add_gaussian_noise, clip_update, entropy_rng,
    noise_the_mean, noisy_hop, private_mean,
};
pub use secure::{distributed_noise_share, private_masked_hop, secure_clip_split};

/// Why noise could not be added.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// Epsilon must be a positive finite number.
    #[error("epsilon {0} is not a positive finite number")]
    BadEpsilon(f64),
    /// A count does not fit the sampler's integers.
    #[error("count {0} is too large")]
    TooLarge(usize),
    /// OpenDP refused (no system entropy, for one).
    #[error("noise: {0}")]
    Sampler(String),
}

/// The root mean square distance of `values` from `centre`: the noise's
/// standard deviation when `values` are `centre` plus noise.
#[cfg(test)]
fn deviation_from(values: &[f32], centre: f32) -> f64 {
    (values
        .iter()
        .map(|w| f64::from(w - centre).powi(2))
        .sum::<f64>()
        / values.len() as f64)
        .sqrt()
}
