//! Asynchronous rounds, FedBuff-style (Nguyen et al. 2022, "Federated
//! Learning with Buffered Asynchronous Aggregation", AISTATS): mediators
//! start whenever clients are free, each from the global model of that
//! moment, and fold into the global model as they finish; the server applies
//! the buffer whenever it holds `buffer` results, so the run never waits for
//! the slowest chain.
//!
//! # The rule
//! Every result is a chain's final weights `w_i` trained from the global
//! version `v_i` with weights `g_{v_i}`. When the buffer is applied at
//! version `v`, result `i` has staleness `tau_i = v - v_i` and counts as the
//! rebased update
//!
//! ```text
//! w'_i = g_v + s(tau_i) * (w_i - g_{v_i}),   s(tau) = 1 / sqrt(1 + tau)
//! ```
//!
//! (FedBuff's staleness weight, the polynomial rule of Xie et al. 2019,
//! "Asynchronous Federated Optimization", with a = 1/2). The strategy's own
//! aggregation then combines the rebased results against `g_v`: under the
//! sample-weighted mean that is `g_v + sum_i n_i s(tau_i) (w_i - g_{v_i}) /
//! sum_i n_i`, FedBuff's server step with a server learning rate of 1 and
//! sample weights; a robust rule (median, Krum) sees rebased models it can
//! compare. With no staleness and the whole round in the buffer it is the
//! synchronous round exactly. Results staler than `max_staleness` are
//! refused (their start model is too far behind to help).
//!
//! Label balancing stays Astraea's: a mediator is formed when it starts,
//! greedily from the clients free at that moment (docs/METHOD.md).

use std::fmt;
use std::str::FromStr;

use crate::strategy::GroupResult;

/// Default most staleness (global versions) a result may have.
pub const DEFAULT_MAX_STALENESS: u64 = 16;

/// How rounds are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Every round's groups start together from one global model and the
    /// round ends when the last one finishes (the papers' rounds).
    #[default]
    Sync,
    /// Groups start when clients are free and are folded in as they finish.
    Async,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        })
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(Mode::Sync),
            "async" => Ok(Mode::Async),
            _ => Err(format!("unknown mode {s:?}, expected sync or async")),
        }
    }
}

/// The staleness weight `s(tau) = 1 / sqrt(1 + tau)` (FedBuff; Xie et al.
/// 2019's polynomial rule with a = 1/2): 1 for a fresh result, 1/2 three
/// versions behind.
pub fn staleness_weight(staleness: u64) -> f64 {
    1.0 / (1.0 + staleness as f64).sqrt()
}

/// The buffer's default size for `concurrency` groups running at once:
/// half of them, rounded up. FedBuff (K = 10 of 100 to 1,000 concurrent
/// clients) applies smaller fractions, but an Astraea round has few
/// mediators (5 for c = 50, gamma = 10), each a long chain: on long-tailed
/// MNIST (docs/RESULTS.md) a buffer of 1 of 5 moved the model to one
/// mediator's at a time and reached 84 % in 40 rounds' work against 85 %
/// in 9 to 12 with buffers of 3 to 5.
pub fn default_buffer(concurrency: usize) -> usize {
    concurrency.div_ceil(2).max(1)
}

/// Why a result was not taken into the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BufferError {
    /// The result is more than `max` versions behind.
    TooStale {
        /// Its staleness in versions.
        staleness: u64,
        /// The most allowed.
        max: u64,
    },
    /// It claims to start from a version the server has not made yet.
    FromTheFuture {
        /// The version it claims.
        start: u64,
        /// The server's version.
        current: u64,
    },
    /// Its weights, its start weights and the global model differ in length.
    WrongLength,
}

impl fmt::Display for BufferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BufferError::TooStale { staleness, max } => {
                write!(f, "{staleness} versions stale, more than {max}")
            }
            BufferError::FromTheFuture { start, current } => {
                write!(
                    f,
                    "starts from version {start}, after the current {current}"
                )
            }
            BufferError::WrongLength => f.write_str("weights of the wrong length"),
        }
    }
}

impl std::error::Error for BufferError {}

/// The server's buffer of finished groups and the global model's version.
#[derive(Debug, Clone)]
pub struct Buffer {
    capacity: usize,
    max_staleness: u64,
    version: u64,
    results: Vec<GroupResult>,
}

impl Buffer {
    /// An empty buffer applied every `capacity` results (at least 1), at
    /// version 0.
    pub fn new(capacity: usize, max_staleness: u64) -> Self {
        Self {
            capacity: capacity.max(1),
            max_staleness,
            version: 0,
            results: Vec::new(),
        }
    }

    /// An empty buffer at `version` (a resumed run's last round).
    pub fn at_version(capacity: usize, max_staleness: u64, version: u64) -> Self {
        Self {
            version,
            ..Self::new(capacity, max_staleness)
        }
    }

    /// Applies the buffer every `capacity` results from now on (at least 1;
    /// the groups running at once can change as clients come and go).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    /// The global model's version: how many times the buffer was applied.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Results the buffer holds.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// Whether it holds enough results to be applied.
    pub fn is_full(&self) -> bool {
        self.results.len() >= self.capacity
    }

    /// Takes in a group's `result`, trained from `start` (`[p]`, the global
    /// weights of version `start_version`), rebased onto `global` (`[p]`,
    /// the current version's weights) with its staleness weight; returns
    /// the staleness.
    ///
    /// # Errors
    /// [`BufferError`] when it is too stale, claims a future version or has
    /// the wrong length; the buffer is left as it was. Non-finite values are
    /// left for the aggregation to refuse.
    pub fn offer(
        &mut self,
        global: &[f32],
        start: &[f32],
        start_version: u64,
        mut result: GroupResult,
    ) -> Result<u64, BufferError> {
        let staleness =
            self.version
                .checked_sub(start_version)
                .ok_or(BufferError::FromTheFuture {
                    start: start_version,
                    current: self.version,
                })?;
        if staleness > self.max_staleness {
            return Err(BufferError::TooStale {
                staleness,
                max: self.max_staleness,
            });
        }
        if result.weights.len() != global.len() || start.len() != global.len() {
            return Err(BufferError::WrongLength);
        }
        if staleness > 0 {
            let s = staleness_weight(staleness) as f32;
            for ((w, g), w0) in result.weights.iter_mut().zip(global).zip(start) {
                *w = g + s * (*w - w0);
            }
        }
        self.results.push(result);
        Ok(staleness)
    }

    /// Takes the buffered results out to be aggregated; call
    /// [`Buffer::advance`] once the new global model is in place.
    pub fn take(&mut self) -> Vec<GroupResult> {
        std::mem::take(&mut self.results)
    }

    /// Moves to the next version (after a new global model was made).
    pub fn advance(&mut self) {
        self.version += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{FedAvg, Strategy};

    fn result(weights: Vec<f32>, samples: u64) -> GroupResult {
        GroupResult {
            group: 0,
            weights,
            samples,
        }
    }

    #[test]
    fn staleness_weighs_by_one_over_the_root() {
        assert_eq!(staleness_weight(0), 1.0);
        assert_eq!(staleness_weight(3), 0.5);
        assert!((staleness_weight(8) - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn fresh_results_make_the_synchronous_round() {
        // Prepare: global [1, 1]; the worked example of `aggregate`.
        let global = [1.0, 1.0];
        let mut buffer = Buffer::new(2, 4);

        // Execute
        buffer
            .offer(&global, &global, 0, result(vec![4.0, 1.0], 30))
            .unwrap();
        buffer
            .offer(&global, &global, 0, result(vec![0.0, 5.0], 10))
            .unwrap();
        let new = FedAvg.aggregate(&global, &buffer.take(), &[]).unwrap();
        buffer.advance();

        // Assert: the synchronous FedAvg result, version 1.
        assert_eq!(new, vec![3.0, 2.0]);
        assert_eq!(buffer.version(), 1);
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_stale_result_moves_the_model_by_its_weighted_update() {
        // Prepare: a chain trained from version 0 ([0, 0]) to [2, -2]; the
        // model has moved on three versions to [10, 10].
        let mut buffer = Buffer::new(1, 4);
        for _ in 0..3 {
            buffer.advance();
        }

        // Execute
        let staleness = buffer
            .offer(&[10.0, 10.0], &[0.0, 0.0], 0, result(vec![2.0, -2.0], 5))
            .unwrap();
        let new = FedAvg
            .aggregate(&[10.0, 10.0], &buffer.take(), &[])
            .unwrap();

        // Assert: 10 + (1/2) * (+-2).
        assert_eq!(staleness, 3);
        assert_eq!(new, vec![11.0, 9.0]);
    }

    #[test]
    fn too_stale_future_and_misfit_results_are_refused() {
        let mut buffer = Buffer::new(1, 2);
        for _ in 0..5 {
            buffer.advance();
        }
        let g = [0.0f32; 2];

        assert_eq!(
            buffer.offer(&g, &g, 2, result(vec![1.0, 1.0], 1)),
            Err(BufferError::TooStale {
                staleness: 3,
                max: 2
            })
        );
        assert_eq!(
            buffer.offer(&g, &g, 6, result(vec![1.0, 1.0], 1)),
            Err(BufferError::FromTheFuture {
                start: 6,
                current: 5
            })
        );
        assert_eq!(
            buffer.offer(&g, &g, 5, result(vec![1.0], 1)),
            Err(BufferError::WrongLength)
        );
        assert!(buffer.is_empty());
        assert_eq!(buffer.offer(&g, &g, 3, result(vec![1.0, 1.0], 1)), Ok(2));
        assert!(buffer.is_full());
    }

    #[test]
    fn modes_parse_and_print_back() {
        for mode in [Mode::Sync, Mode::Async] {
            assert_eq!(mode.to_string().parse::<Mode>(), Ok(mode));
        }
        assert!("fedbuff".parse::<Mode>().is_err());
        assert_eq!(default_buffer(50), 25);
        assert_eq!(default_buffer(5), 3);
        assert_eq!(default_buffer(1), 1);
    }
}
