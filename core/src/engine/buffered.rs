//! The asynchronous mode's rules (`--mode async`, FedBuff-style: Nguyen et
//! al. 2022, with [`crate::asynchronous::Buffer`]'s staleness weights),
//! written once for the server's and the simulator's loops:
//!
//! - **how many groups run at once**: as many as a synchronous round would
//!   form of the ready clients (`c` of them at most) — the driver draws
//!   them, lets the strategy group them and tells [`Versions::size`];
//! - **when a new group may start**: fewer than that many run, and at least
//!   an average group's worth of ready clients are free (so a group is not
//!   started of the one client a finished chain freed);
//! - **what a group's end does**: its result goes into the buffer with its
//!   staleness weight, or is refused as too stale; a failed chain counts
//!   towards the buffer too, so a run whose chains all fail still moves on
//!   (keeping its model) and ends;
//! - **when a version is made**: once the buffer's capacity (`--buffer`, or
//!   [`crate::asynchronous::default_buffer`] of the groups running) of
//!   results and failures is in. Every version is one round: it is
//!   evaluated and recorded, and `rounds` counts versions.
//!
//! The driver keeps the clock, the clients and the chains; this keeps the
//! version, the buffer and the counts. No I/O, no time.

use crate::asynchronous::{Buffer, BufferError, default_buffer};
use crate::strategy::{GroupFailure, GroupResult};

/// What became of a group's end ([`Versions::ended`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// Its result is in the buffer, `staleness` versions behind.
    Folded {
        /// Versions made since it started.
        staleness: u64,
    },
    /// Its result was refused (too stale, or not of the model's shape).
    Refused(BufferError),
    /// It had no result; the failure counts towards the buffer.
    Failed,
}

/// The asynchronous run's versions: the buffer of ended groups and the
/// rules for starting groups and making versions (see the module).
#[derive(Debug, Clone)]
pub struct Versions {
    buffer: Buffer,
    /// `--buffer`: the capacity whatever the groups running; `None`: half
    /// of them, rounded up.
    configured: Option<usize>,
    capacity: usize,
    target: usize,
    enough: usize,
    failures: Vec<GroupFailure>,
    /// KL to uniform of the folded groups' label mixes, summed, and their
    /// number.
    kl: (f64, usize),
    refused: u64,
}

/// What a new version is made of ([`Versions::take`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Made {
    /// The results folded in, staleness-weighted, for `round::close`.
    pub results: Vec<GroupResult>,
    /// The chains that failed meanwhile.
    pub failures: Vec<GroupFailure>,
    /// The mean KL to uniform of the folded groups' label mixes (0 with
    /// none).
    pub mean_kl: f64,
}

impl Versions {
    /// A run at `version` (0 for a new run; a resumed run's last round),
    /// with `--buffer` `configured` and results refused beyond
    /// `max_staleness` versions behind. Until [`Versions::size`], one
    /// group runs and one result makes a version.
    pub fn new(configured: Option<usize>, max_staleness: u64, version: u64) -> Self {
        Self {
            buffer: Buffer::at_version(1, max_staleness, version),
            configured,
            capacity: 1,
            target: 1,
            enough: 1,
            failures: Vec::new(),
            kl: (0.0, 0),
            refused: 0,
        }
    }

    /// Sizes the run to the ready clients: `ready` of them (at most `c`,
    /// drawn as for a synchronous round) form `groups` groups. That many
    /// run at once; a new one needs `ceil(ready / groups)` free clients;
    /// the buffer holds the configured capacity, or half of `groups`
    /// rounded up.
    pub fn size(&mut self, ready: usize, groups: usize) {
        self.target = groups;
        self.enough = ready.div_ceil(groups.max(1)).max(1);
        self.capacity = self
            .configured
            .unwrap_or_else(|| default_buffer(groups))
            .max(1);
        self.buffer.set_capacity(self.capacity);
    }

    /// How many groups run at once.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Results and failures that make a version.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether fewer than [`Versions::target`] groups run: the driver then
    /// draws the free clients and asks [`Versions::may_start`].
    pub fn wants_group(&self, running: usize) -> bool {
        running < self.target
    }

    /// Whether a new group may start while `running` groups run and `free`
    /// ready clients are in none.
    pub fn may_start(&self, running: usize, free: usize) -> bool {
        running < self.target && free >= self.enough
    }

    /// The global model's version: the versions made so far. A group
    /// starting now starts from it; the round it trains is `version + 1`.
    pub fn version(&self) -> u64 {
        self.buffer.version()
    }

    /// A group that started from version `start_version` (whose weights
    /// are `start`) ended with `outcome`; `global` is the current version's
    /// weights (the result is rebased onto them) and `kl` the group's
    /// label mix's KL to uniform.
    pub fn ended(
        &mut self,
        global: &[f32],
        start: &[f32],
        start_version: u64,
        outcome: Result<GroupResult, GroupFailure>,
        kl: f64,
    ) -> Ended {
        match outcome {
            Ok(result) => match self.buffer.offer(global, start, start_version, result) {
                Ok(staleness) => {
                    self.kl.0 += kl;
                    self.kl.1 += 1;
                    Ended::Folded { staleness }
                }
                Err(refusal) => {
                    self.refused += 1;
                    Ended::Refused(refusal)
                }
            },
            Err(failure) => {
                self.failures.push(failure);
                Ended::Failed
            }
        }
    }

    /// Whether enough groups have ended (results and failures) to make a
    /// new version.
    pub fn due(&self) -> bool {
        self.buffer.len() + self.failures.len() >= self.capacity
    }

    /// Takes out what the new version is made of. Call
    /// [`Versions::advance`] once it is in place (adopted or not).
    pub fn take(&mut self) -> Made {
        let (sum, count) = std::mem::take(&mut self.kl);
        Made {
            results: self.buffer.take(),
            failures: std::mem::take(&mut self.failures),
            mean_kl: if count == 0 { 0.0 } else { sum / count as f64 },
        }
    }

    /// The new version is made.
    pub fn advance(&mut self) {
        self.buffer.advance();
    }

    /// Results refused so far (too stale, or misshapen).
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(value: f32) -> GroupResult {
        GroupResult {
            group: 0,
            weights: vec![value; 2],
            samples: 10,
        }
    }

    fn failure() -> GroupFailure {
        GroupFailure {
            group: 0,
            reason: "every hop was skipped".into(),
        }
    }

    #[test]
    fn as_many_groups_run_as_a_round_would_form_and_each_needs_a_groups_worth_of_free_clients() {
        let mut versions = Versions::new(None, 4, 0);
        // 20 ready clients in 4 groups of 5.
        versions.size(20, 4);
        assert_eq!(versions.target(), 4);
        assert_eq!(versions.capacity(), 2);
        assert!(versions.may_start(3, 5));
        assert!(!versions.may_start(3, 4), "fewer free than a group's worth");
        assert!(!versions.may_start(4, 20), "as many running as a round has");
        // A configured buffer holds whatever the groups.
        let mut versions = Versions::new(Some(3), 4, 0);
        versions.size(7, 2);
        assert_eq!((versions.capacity(), versions.target()), (3, 2));
        assert!(versions.may_start(1, 4) && !versions.may_start(1, 3));
    }

    #[test]
    fn results_and_failures_fill_the_buffer_and_a_version_is_made_of_the_results() {
        let mut versions = Versions::new(Some(2), 4, 0);
        versions.size(10, 2);
        let global = [0.0; 2];
        let ended = versions.ended(&global, &global, 0, Ok(result(1.0)), 0.2);
        assert_eq!(ended, Ended::Folded { staleness: 0 });
        assert!(!versions.due());
        assert_eq!(
            versions.ended(&global, &global, 0, Err(failure()), 0.9),
            Ended::Failed
        );
        assert!(versions.due(), "a failure counts towards the buffer");
        let made = versions.take();
        assert_eq!(made.results.len(), 1);
        assert_eq!(made.failures.len(), 1);
        assert!((made.mean_kl - 0.2).abs() < 1e-12, "failures add no KL");
        versions.advance();
        assert_eq!(versions.version(), 1);
        assert!(!versions.due());
    }

    #[test]
    fn a_stale_result_is_weighted_and_one_too_stale_is_refused_without_counting() {
        let mut versions = Versions::new(Some(1), 1, 0);
        versions.size(4, 1);
        // Two versions made while two groups trained from version 0.
        for _ in 0..2 {
            versions.advance();
        }
        let start = [0.0; 2];
        let global = [1.0; 2];
        let ended = versions.ended(&global, &start, 0, Ok(result(2.0)), 0.0);
        assert!(matches!(
            ended,
            Ended::Refused(BufferError::TooStale {
                staleness: 2,
                max: 1
            })
        ));
        assert!(!versions.due());
        assert_eq!(versions.refused(), 1);
        // One version behind: rebased onto the global model with weight
        // 1/sqrt(2).
        let ended = versions.ended(&global, &start, 1, Ok(result(2.0)), 0.0);
        assert_eq!(ended, Ended::Folded { staleness: 1 });
        let made = versions.take();
        let expected = 1.0 + 2.0 / 2f32.sqrt();
        assert!((made.results[0].weights[0] - expected).abs() < 1e-6);
    }

    #[test]
    fn a_resumed_run_goes_on_from_its_version() {
        let versions = Versions::new(None, 4, 7);
        assert_eq!(versions.version(), 7);
    }
}
