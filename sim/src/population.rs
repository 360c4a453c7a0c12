//! Who the simulated clients are as machines: how fast each trains, how
//! often one freezes mid-hop, and what a hop costs besides training. From
//! these the simulator keeps a federation clock: the wall-clock seconds a
//! real run of the same rounds would take, which is what volunteers wait
//! for (rounds alone hide a chain held by its slowest member).
//!
//! The clock of one hop is `overhead_s + samples * epochs / speed`; a
//! frozen hop trains nothing and costs the server's stall timeout (it sees
//! no heartbeat), or the whole hop deadline when the stall rule is off. A
//! chain's time is the sum of its hops, a round's the slowest chain's
//! (mediators run in parallel; a FedAvg client is a chain of one).

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, LogNormal};

/// z of the 95th percentile of a standard normal: a lognormal with
/// `sigma = ln(spread) / (2 * Z95)` has a 95th to 5th percentile ratio of
/// `spread`.
const Z95: f64 = 1.644_853_626_951_472_2;

/// How the clients' training speeds (samples per second) are spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SpeedModel {
    /// Every client at this speed.
    Uniform(f64),
    /// Lognormal around `median`, with the 95th percentile `spread` times
    /// the 5th (`lognormal:200:100` is a 100x spread).
    LogNormal {
        /// Median speed, samples per second.
        median: f64,
        /// Ratio of the 95th to the 5th percentile speed.
        spread: f64,
    },
}

impl SpeedModel {
    /// `count` speeds drawn with `seed` (samples per second, all > 0).
    pub fn draw(&self, count: usize, seed: u64) -> Vec<f64> {
        match *self {
            SpeedModel::Uniform(speed) => vec![speed; count],
            SpeedModel::LogNormal { median, spread } => {
                let sigma = spread.ln() / (2.0 * Z95);
                let dist = LogNormal::new(median.ln(), sigma).expect("checked when parsed");
                let mut rng = StdRng::seed_from_u64(seed);
                (0..count).map(|_| dist.sample(&mut rng)).collect()
            }
        }
    }
}

impl fmt::Display for SpeedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpeedModel::Uniform(speed) => write!(f, "uniform:{speed}"),
            SpeedModel::LogNormal { median, spread } => write!(f, "lognormal:{median}:{spread}"),
        }
    }
}

impl FromStr for SpeedModel {
    type Err = String;

    /// `uniform:SPEED` or `lognormal:MEDIAN:SPREAD` (samples per second;
    /// spread >= 1).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let number = |text: &str| -> Result<f64, String> {
            text.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("{text:?} is not a positive number"))
        };
        match parts.as_slice() {
            ["uniform", speed] => Ok(SpeedModel::Uniform(number(speed)?)),
            ["lognormal", median, spread] => {
                let spread = number(spread)?;
                if spread < 1.0 {
                    return Err(format!("spread {spread} is below 1"));
                }
                Ok(SpeedModel::LogNormal {
                    median: number(median)?,
                    spread,
                })
            }
            _ => Err(format!(
                "unknown speed model {s:?}, expected uniform:SPEED or lognormal:MEDIAN:SPREAD"
            )),
        }
    }
}

/// The simulated clients as machines, and the server's time rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Population {
    /// Training speeds.
    pub speeds: SpeedModel,
    /// Probability, per hop, that the client freezes (stays connected,
    /// silent) instead of training.
    pub freeze: f64,
    /// Seconds every hop costs besides training (two transfers, building
    /// the model and optimiser, warm-up).
    pub overhead_s: f64,
    /// The server's hop deadline, seconds.
    pub hop_deadline_s: f64,
    /// The server's stall timeout, seconds; 0 when the rule is off (a
    /// frozen hop then costs the deadline).
    pub stall_timeout_s: f64,
}

impl Default for Population {
    /// Uniform clients at 200 samples/s (a tab's order of magnitude), 1 s
    /// of overhead per hop, nobody freezing, the server's defaults (60 s
    /// deadline, 8 s stall timeout).
    fn default() -> Self {
        Self {
            speeds: SpeedModel::Uniform(200.0),
            freeze: 0.0,
            overhead_s: 1.0,
            hop_deadline_s: 60.0,
            stall_timeout_s: 8.0,
        }
    }
}

impl Population {
    /// Seconds a frozen hop of `work` samples (samples times epochs) by a
    /// client of `speed` samples/s holds its chain, as the server's hop
    /// timer (`astraea_core::engine::hop`) decides: the stall timeout, or
    /// the client's deadline (from its speed, within the operator's) when
    /// that comes first or the stall rule is off.
    pub fn frozen_hop_s(&self, speed: f64, work: u64) -> f64 {
        use astraea_core::engine::hop::{HopTimer, hop_deadline};
        use std::time::Duration;
        let seconds = |s: f64| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX);
        let timer = HopTimer {
            deadline: hop_deadline(Some(speed), work, seconds(self.hop_deadline_s)),
            stall: seconds(self.stall_timeout_s),
        };
        timer.frozen_cost().as_secs_f64()
    }

    /// Whether a hop of `work` samples (samples times epochs) at `speed`
    /// ends after the deadline the server gives it (`engine::hop::
    /// hop_deadline`: three times what its speed needs, within the
    /// operator's): the server gives it up and the chain skips it.
    pub fn late(&self, work: u64, speed: f64) -> bool {
        use astraea_core::engine::hop::hop_deadline;
        use std::time::Duration;
        let ceiling =
            Duration::try_from_secs_f64(self.hop_deadline_s.max(0.0)).unwrap_or(Duration::MAX);
        let deadline = hop_deadline(Some(speed), work, ceiling).as_secs_f64();
        self.overhead_s + work as f64 / speed.max(1e-9) > deadline
    }

    /// Seconds a hop of `work` samples (samples times epochs) takes at
    /// `speed`, capped at the deadline (a later update is skipped:
    /// [`Population::late`]).
    pub fn hop_s(&self, work: u64, speed: f64) -> f64 {
        astraea_core::engine::hop::expected_hop_s(work, speed, self.overhead_s, self.hop_deadline_s)
    }

    /// Whether the hop drawn with `seed` freezes.
    pub fn freezes(&self, seed: u64) -> bool {
        self.freeze > 0.0 && StdRng::seed_from_u64(seed).random_bool(self.freeze.min(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lognormal_spread_is_the_ratio_of_its_outer_percentiles() {
        // Prepare
        let model: SpeedModel = "lognormal:200:100".parse().unwrap();

        // Execute
        let mut speeds = model.draw(20_000, 7);
        speeds.sort_by(f64::total_cmp);

        // Assert: median near 200, p95 / p5 near 100.
        let at = |q: f64| speeds[(q * speeds.len() as f64) as usize];
        assert!((at(0.5) / 200.0 - 1.0).abs() < 0.05, "median {}", at(0.5));
        let spread = at(0.95) / at(0.05);
        assert!((spread / 100.0 - 1.0).abs() < 0.1, "spread {spread}");
        assert_eq!(model.to_string().parse::<SpeedModel>(), Ok(model));
    }

    #[test]
    fn speed_models_refuse_what_is_not_a_speed() {
        for bad in [
            "uniform:0",
            "uniform:-3",
            "lognormal:200:0.5",
            "gauss:1",
            "uniform:nan",
        ] {
            assert!(bad.parse::<SpeedModel>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_frozen_hop_costs_the_stall_timeout_or_without_it_the_deadline() {
        let with_stall = Population::default();
        let without = Population {
            stall_timeout_s: 0.0,
            ..Population::default()
        };
        assert_eq!(with_stall.frozen_hop_s(200.0, 400), 8.0);
        // Without the stall rule: a slow client's deadline is the ceiling,
        // a fast one's what its speed earns (3 x 2 s + 5 s).
        assert_eq!(without.frozen_hop_s(1.0, 1_000), 60.0);
        assert_eq!(without.frozen_hop_s(200.0, 400), 11.0);
        assert_eq!(with_stall.hop_s(400, 200.0), 3.0);
        assert_eq!(with_stall.hop_s(1_000_000, 1.0), 60.0);
        assert!(!with_stall.freezes(1));
    }

    #[test]
    fn a_hop_past_the_operators_deadline_is_late_and_a_slow_one_within_it_is_not() {
        let population = Population::default();
        // 100 samples at 2 samples/s: 51 s, within the 60 s ceiling.
        assert!(!population.late(100, 2.0));
        // 1,000 at 2 samples/s: 501 s, past it; the server skips the hop.
        assert!(population.late(1_000, 2.0));
        assert_eq!(population.hop_s(1_000, 2.0), 60.0);
    }
}
