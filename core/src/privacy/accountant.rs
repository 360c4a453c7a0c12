//! The Rényi DP accountant: the privacy spent by the sampled Gaussian
//! mechanism over rounds, for client-level DP of the model.
//!
//! One step's Rényi DP (Mironov 2017) is Mironov, Talwar and Zhang's
//! (2019, section 3.3; [`sampled_gaussian_rdp`]); steps compose order by
//! order ([`RdpAccountant`]), and the total converts to (epsilon, delta)
//! with Canonne, Kamath and Steinke's bound (2020, proposition 12), as
//! Google's `dp_accounting` and Opacus do. On top of it: the noise
//! multiplier that spends a given budget ([`noise_for_epsilon`]) and what a
//! client's noisy hops spend ([`hop_epsilon`]).

/// Rényi orders the accountant tracks: the integers 2 to 64, then 128 to
/// 1,024 in powers of two (`dp_accounting`'s integer orders).
fn default_orders() -> Vec<u32> {
    (2..=64).chain([128, 256, 512, 1024]).collect()
}

/// `ln(exp(a) + exp(b))` without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// `ln C(n, k)`.
fn log_binomial(n: u32, k: u32) -> f64 {
    let k = k.min(n - k);
    (0..k)
        .map(|i| (f64::from(n - i)).ln() - (f64::from(i + 1)).ln())
        .sum()
}

/// The Rényi DP of order `alpha` (an integer >= 2) of one step of the
/// Poisson-sampled Gaussian mechanism with sampling rate `q` and noise
/// multiplier `sigma` (noise standard deviation over sensitivity):
/// `ln(A_alpha) / (alpha - 1)` with
/// `A_alpha = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))`
/// (Mironov, Talwar and Zhang 2019, section 3.3), computed in log space.
/// `q = 1` is the Gaussian mechanism's `alpha / (2 sigma^2)`.
pub fn sampled_gaussian_rdp(q: f64, sigma: f64, alpha: u32) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if sigma <= 0.0 {
        return f64::INFINITY;
    }
    let a = f64::from(alpha);
    if q >= 1.0 {
        return a / (2.0 * sigma * sigma);
    }
    let mut log_a = f64::NEG_INFINITY;
    for k in 0..=alpha {
        let kf = f64::from(k);
        let term = log_binomial(alpha, k)
            + kf * q.ln()
            + (a - kf) * (-q).ln_1p()
            + (kf * kf - kf) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a / (a - 1.0)
}

/// A Rényi DP accountant for the sampled Gaussian mechanism, composed over
/// rounds (RDP adds up order by order). It serialises as
/// `{"orders": [...], "rdp": [...]}`, so a restarted server goes on from
/// what was spent ([`RdpAccountant::from_json`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RdpAccountant {
    orders: Vec<u32>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        let orders = default_orders();
        Self {
            rdp: vec![0.0; orders.len()],
            orders,
        }
    }
}

impl RdpAccountant {
    /// Nothing spent yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The JSON a server keeps with each round.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("numbers serialise")
    }

    /// An accountant kept by [`RdpAccountant::to_json`]; `None` unless it
    /// has as many spends as orders, every order at least 2 and every spend
    /// finite and non-negative (a damaged record must not lower the spend).
    pub fn from_json(text: &str) -> Option<Self> {
        let accountant: Self = serde_json::from_str(text).ok()?;
        let sound = !accountant.orders.is_empty()
            && accountant.orders.len() == accountant.rdp.len()
            && accountant.orders.iter().all(|&alpha| alpha >= 2)
            && accountant.rdp.iter().all(|r| r.is_finite() && *r >= 0.0);
        sound.then_some(accountant)
    }

    /// Adds `steps` rounds of the sampled Gaussian mechanism: each unit
    /// (client) takes part with probability `q`, and the noise's standard
    /// deviation is `sigma` times the sum's sensitivity.
    pub fn compose(&mut self, q: f64, sigma: f64, steps: u64) {
        for (rdp, &alpha) in self.rdp.iter_mut().zip(&self.orders) {
            *rdp += steps as f64 * sampled_gaussian_rdp(q, sigma, alpha);
        }
    }

    /// The smallest epsilon for which the composition so far is
    /// (epsilon, `delta`)-DP, over the tracked orders, with the conversion
    /// `epsilon = rdp + ln(1 - 1/alpha) - ln(delta * alpha) / (alpha - 1)`
    /// (Canonne, Kamath and Steinke 2020, proposition 12; the rule of
    /// `dp_accounting.rdp.compute_epsilon`); 0 before anything was spent.
    pub fn epsilon(&self, delta: f64) -> f64 {
        if !(delta > 0.0 && delta < 1.0) {
            return f64::INFINITY;
        }
        self.orders
            .iter()
            .zip(&self.rdp)
            .map(|(&alpha, &rdp)| {
                let a = f64::from(alpha);
                if delta * delta + (-rdp).exp_m1() > 0.0 {
                    // delta^2 > 1 - exp(-rdp): nothing to pay at this order.
                    0.0
                } else {
                    rdp + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
                }
            })
            .fold(f64::INFINITY, f64::min)
            .max(0.0)
    }
}

/// The noise multiplier that spends `epsilon` (at `delta`) over `steps`
/// rounds of the sampled Gaussian mechanism at sampling rate `q`, by
/// bisection on the accountant (to 0.1 %); `None` when even a multiplier of
/// 1,000 spends more.
pub fn noise_for_epsilon(q: f64, steps: u64, delta: f64, epsilon: f64) -> Option<f64> {
    let spent = |sigma: f64| {
        let mut accountant = RdpAccountant::new();
        accountant.compose(q, sigma, steps);
        accountant.epsilon(delta)
    };
    let (mut low, mut high) = (0.05, 1000.0);
    if spent(high) > epsilon {
        return None;
    }
    if spent(low) <= epsilon {
        return Some(low);
    }
    while high / low > 1.001 {
        let mid = (low * high).sqrt();
        if spent(mid) > epsilon {
            low = mid;
        } else {
            high = mid;
        }
    }
    Some(high)
}

/// The epsilon (at `delta`) that `hops` noisy hops of one client spend
/// against whoever sees them all (the next client, the server), by the RDP
/// accountant without sampling: a client's passes in one round, or its
/// hops over a whole run.
pub fn hop_epsilon(noise_multiplier: f64, hops: u64, delta: f64) -> f64 {
    let mut accountant = RdpAccountant::new();
    accountant.compose(1.0, noise_multiplier, hops);
    accountant.epsilon(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epsilon_matches_googles_dp_accounting() {
        // Reference values: `dp_accounting` 0.6.0 (PyPI), `RdpAccountant`
        // with the same orders (2..=64, 128, 256, 512, 1024), composing
        // `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` `steps` times;
        // `get_epsilon(delta)`. The second row is the DP-SGD MNIST setting
        // of TensorFlow Privacy's tutorial (batch 250 of 60,000, noise 1.1,
        // 60 epochs).
        let cases = [
            (0.1, 1.0, 100, 1e-5, 7.972_921_510_380_539),
            (250.0 / 60_000.0, 1.1, 14_400, 1e-5, 2.562_959_698_937_712_4),
            (0.01, 1.0, 1000, 1e-5, 2.107_753_075_451_574_5),
            (0.05, 1.0, 40, 1e-5, 2.996_297_753_108_411_4),
            (1.0, 5.0, 10, 1e-5, 2.814_109_167_845_533),
        ];
        for (q, sigma, steps, delta, expected) in cases {
            let mut accountant = RdpAccountant::new();
            accountant.compose(q, sigma, steps);
            let epsilon = accountant.epsilon(delta);
            assert!(
                (epsilon - expected).abs() < 1e-6 * expected,
                "q {q} sigma {sigma} steps {steps}: {epsilon} against {expected}"
            );
        }
        assert_eq!(RdpAccountant::new().epsilon(1e-5), 0.0);
    }

    #[test]
    fn a_kept_accountant_reads_back_as_it_was_and_a_damaged_one_not_at_all() {
        let mut spent = RdpAccountant::new();
        spent.compose(1.0, 2.0, 3);
        spent.compose(0.1, 1.0, 7);
        let back = RdpAccountant::from_json(&spent.to_json()).expect("reads back");
        assert_eq!(back, spent);
        assert_eq!(back.epsilon(1e-5), spent.epsilon(1e-5));
        for damaged in [
            r#"{"orders":[2,3],"rdp":[0.5]}"#,
            r#"{"orders":[1,3],"rdp":[0.5,0.5]}"#,
            r#"{"orders":[2,3],"rdp":[-0.5,0.5]}"#,
            r#"{"orders":[2,3],"rdp":[0.5,1e999]}"#,
            r#"{"orders":[],"rdp":[]}"#,
            "not json",
        ] {
            assert_eq!(RdpAccountant::from_json(damaged), None, "{damaged}");
        }
    }

    #[test]
    fn the_noise_found_for_a_budget_spends_that_budget() {
        let sigma = noise_for_epsilon(0.05, 40, 1e-5, 2.996_297_753_108_411_4).unwrap();
        assert!((sigma - 1.0).abs() < 0.002, "{sigma}");
        assert!(noise_for_epsilon(1.0, 1_000_000, 1e-5, 1e-6).is_none());
    }

    #[test]
    fn the_gaussian_mechanism_without_sampling_has_its_closed_form() {
        // RDP of the Gaussian mechanism: alpha / (2 sigma^2).
        assert!((sampled_gaussian_rdp(1.0, 2.0, 8) - 1.0).abs() < 1e-12);
        // Sampling at q -> 1 through the series agrees with it.
        let near = sampled_gaussian_rdp(0.999_999, 2.0, 8);
        assert!((near - 1.0).abs() < 1e-4, "{near}");
        // And it is never more than without sampling.
        assert!(sampled_gaussian_rdp(0.01, 1.0, 32) < sampled_gaussian_rdp(1.0, 1.0, 32));
    }
}
