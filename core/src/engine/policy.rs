//! The run's rules as one value, checked in one place: whichever front end
//! built it (serve's flags, simulate's flags, a TOML file), the same
//! settings are refused for the same reasons, and the same value gives the
//! update guard, the chains' rules and the DP accounting.

use crate::asynchronous::Mode;
use crate::guard::UpdateGuard;
use crate::privacy::{HopPrivacy, ModelPrivacy};
use crate::robust::AggregationRule;
use crate::secagg::{MAX_MASKERS, SecAggParams};

/// How a round's participants are chosen, as the DP accountant sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Who trains is known to an observer (the served dashboard shows it,
    /// and the draw is seeded): no amplification by sampling, q = 1.
    Public,
    /// `participants` of `population` drawn in secret each round: the
    /// accountant takes q = c / K, as DP-FedAvg's analysis does (it
    /// assumes Poisson sampling at that rate; clients are drawn without
    /// replacement). What the simulator reports, for comparison with the
    /// papers.
    Secret {
        /// c.
        participants: usize,
        /// K.
        population: usize,
    },
}

impl Sampling {
    /// The sampling rate q in (0, 1].
    pub fn rate(self) -> f64 {
        match self {
            Sampling::Public => 1.0,
            Sampling::Secret {
                participants,
                population,
            } => (participants as f64 / population.max(1) as f64).clamp(f64::MIN_POSITIVE, 1.0),
        }
    }
}

/// The update guard and its loss rule (`--max-update-ratio`,
/// `--validation-samples`, `--max-loss-increase`), in serve and simulate
/// alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardSettings {
    /// The update guard's bound: an update may move the weights it was
    /// sent by at most this many times their L2 norm (or 1, if the norm
    /// is smaller: `guard::UpdateGuard`).
    pub max_update_ratio: f64,
    /// The loss rule (`crate::validation`): samples of the training set
    /// hops are judged on (seeded, `engine::seeds::validation`); 0 turns
    /// the rule off.
    pub validation_samples: usize,
    /// The loss rule's tolerance: a hop may raise the validation loss by
    /// at most this many nats.
    pub max_loss_increase: f64,
}

impl Default for GuardSettings {
    fn default() -> Self {
        Self {
            max_update_ratio: crate::guard::DEFAULT_MAX_UPDATE_RATIO,
            validation_samples: crate::validation::DEFAULT_VALIDATION_SAMPLES,
            max_loss_increase: crate::validation::DEFAULT_MAX_LOSS_INCREASE,
        }
    }
}

/// Synchronous rounds or the asynchronous mode (`--mode`, `--buffer`,
/// `--max-staleness`), in serve and simulate alike; the asynchronous
/// mode's rules are [`super::buffered`]'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Synchronous rounds, or groups that start when clients are free and
    /// fold into the model as they end.
    pub mode: Mode,
    /// The asynchronous mode's buffer: ended groups per new version
    /// (`None`: half the groups running at once, rounded up).
    pub buffer: Option<usize>,
    /// The asynchronous mode's most staleness, in versions.
    pub max_staleness: u64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            mode: Mode::Sync,
            buffer: None,
            max_staleness: crate::asynchronous::DEFAULT_MAX_STALENESS,
        }
    }
}

/// The settings that decide what a round does.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPolicy {
    /// Synchronous rounds or the asynchronous mode.
    pub schedule: Schedule,
    /// c: participants per round (synchronous), or drawn per new group.
    pub participants: usize,
    /// How the groups' results are combined.
    pub aggregation: AggregationRule,
    /// Client-level DP of the model; `None`: none.
    pub model_privacy: Option<ModelPrivacy>,
    /// The run stops before a round that would spend more epsilon.
    pub max_epsilon: Option<f64>,
    /// The maskers add the round's noise (needs secure aggregation).
    pub distributed_dp: bool,
    /// How participants are drawn, for the accountant.
    pub sampling: Sampling,
    /// Per-hop noise.
    pub hop_privacy: Option<HopPrivacy>,
    /// Label counts under local DP, epsilon per report.
    pub label_epsilon: Option<f64>,
    /// Secure aggregation of the mediators' results.
    pub secure_aggregation: bool,
    /// The share of maskers that must survive for a sum to be unmasked.
    pub secure_quorum: f64,
    /// The update guard and the loss rule.
    pub guard: GuardSettings,
}

/// Why a run's settings are refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

fn refuse<T>(reason: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError(reason.into()))
}

/// The update guard's factor over the median of recent moves.
pub const GUARD_MEDIAN_FACTOR: f64 = 10.0;
/// Recent moves the guard's median is taken over.
pub const GUARD_WINDOW: usize = 100;
/// Moves seen before the guard's median rule applies.
pub const GUARD_MIN_HISTORY: usize = 5;

impl RunPolicy {
    /// Checks that the settings make sense together.
    ///
    /// # Errors
    /// [`PolicyError`], saying which setting and why: client-level DP in
    /// the asynchronous mode; a DP clip, delta, noise multiplier or
    /// adaptive clipping's settings out of range; a budget that is not
    /// positive; distributed DP without secure aggregation; a secure
    /// quorum outside (0, 1]; secure aggregation in the asynchronous
    /// mode, with adaptive clipping, with more than
    /// [`MAX_MASKERS`] participants or with a robust rule; a label epsilon
    /// or per-hop noise that is not a positive number; an update ratio or
    /// loss tolerance that is not a non-negative number.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(dp) = self.model_privacy {
            if self.schedule.mode == Mode::Async {
                return refuse("client-level DP needs synchronous rounds (--mode sync)");
            }
            if !(dp.clip.is_finite() && dp.clip > 0.0) {
                // An infinite clip clips nothing (and would reach the
                // maskers as JSON null: no clip at all).
                return refuse(format!(
                    "client-level DP: the clip must be a positive number, not {}",
                    dp.clip
                ));
            }
            if !(dp.delta > 0.0 && dp.delta < 1.0) {
                return refuse(format!(
                    "client-level DP: delta must lie between 0 and 1, not {}",
                    dp.delta
                ));
            }
            if !dp.noise_std(2).is_some_and(f64::is_finite) {
                return refuse(format!(
                    "client-level DP: the noise multiplier must be positive and adaptive \
                     clipping's settings valid, its count noise above the multiplier {}",
                    dp.noise_multiplier
                ));
            }
            if let Some(max) = self.max_epsilon
                && (max.is_nan() || max <= 0.0)
            {
                return refuse(format!(
                    "client-level DP: the budget must be a positive epsilon, not {max}"
                ));
            }
        }
        if self.distributed_dp && self.model_privacy.is_some() && !self.secure_aggregation {
            return refuse(
                "distributed DP needs secure aggregation: without masks the maskers' noise \
                 shares would reach the server one by one",
            );
        }
        if !SecAggParams::is_quorum(self.secure_quorum) {
            return refuse(format!(
                "the secure quorum is a share of the maskers, in (0, 1], not {}",
                self.secure_quorum
            ));
        }
        if self.secure_aggregation {
            if self.schedule.mode == Mode::Async {
                return refuse("secure aggregation needs synchronous rounds");
            }
            if self.model_privacy.is_some_and(|dp| dp.adaptive.is_some()) {
                return refuse(
                    "secure aggregation and adaptive clipping do not combine (the clip follows \
                     the results' norms, which the server cannot see): give a fixed clip",
                );
            }
            let max = MAX_MASKERS as usize;
            if self.participants > max {
                return refuse(format!(
                    "secure aggregation sums at most {max} results a round: participants <= {max}"
                ));
            }
            if self.aggregation != AggregationRule::default() {
                return refuse(
                    "secure aggregation gives the server only the sum: robust aggregation rules \
                     need each result",
                );
            }
        }
        if let Some(epsilon) = self.label_epsilon
            && !(epsilon.is_finite() && epsilon > 0.0)
        {
            return refuse(format!(
                "the label epsilon must be a positive number, not {epsilon}"
            ));
        }
        if let Some(hop) = self.hop_privacy
            && !(hop.clip.is_finite()
                && hop.clip > 0.0
                && hop.noise_multiplier.is_finite()
                && hop.noise_multiplier >= 0.0)
        {
            return refuse(format!(
                "per-hop noise: the clip must be positive and the multiplier non-negative, not \
                 {} and {}",
                hop.clip, hop.noise_multiplier
            ));
        }
        if self.guard.max_update_ratio.is_nan() || self.guard.max_update_ratio < 0.0 {
            return refuse(format!(
                "the update guard's ratio must be a non-negative number, not {}",
                self.guard.max_update_ratio
            ));
        }
        if self.guard.max_loss_increase.is_nan() || self.guard.max_loss_increase < 0.0 {
            return refuse(format!(
                "the loss rule's tolerance must be a non-negative number, not {}",
                self.guard.max_loss_increase
            ));
        }
        Ok(())
    }

    /// The update guard every hop's update passes, with this run's bound.
    pub fn guard(&self) -> UpdateGuard {
        UpdateGuard::new(
            self.guard.max_update_ratio,
            GUARD_MEDIAN_FACTOR,
            GUARD_WINDOW,
            GUARD_MIN_HISTORY,
        )
    }

    /// The sampling rate every DP round is composed at.
    pub fn sampling_rate(&self) -> f64 {
        self.sampling.rate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RunPolicy {
        RunPolicy {
            schedule: Schedule::default(),
            participants: 10,
            aggregation: AggregationRule::default(),
            model_privacy: None,
            max_epsilon: None,
            distributed_dp: false,
            sampling: Sampling::Public,
            hop_privacy: None,
            label_epsilon: None,
            secure_aggregation: false,
            secure_quorum: 0.5,
            guard: GuardSettings {
                max_update_ratio: 2.0,
                validation_samples: 64,
                max_loss_increase: 0.5,
            },
        }
    }

    use crate::engine::tests::dp;

    #[test]
    fn plain_settings_pass() {
        assert_eq!(policy().validate(), Ok(()));
    }

    #[test]
    fn each_contradiction_is_refused_with_its_reason() {
        let cases: Vec<(RunPolicy, &str)> = vec![
            (
                RunPolicy {
                    schedule: Schedule {
                        mode: Mode::Async,
                        ..Schedule::default()
                    },
                    model_privacy: Some(dp()),
                    ..policy()
                },
                "synchronous",
            ),
            (
                RunPolicy {
                    model_privacy: Some(ModelPrivacy {
                        clip: f64::INFINITY,
                        ..dp()
                    }),
                    ..policy()
                },
                "clip",
            ),
            (
                RunPolicy {
                    model_privacy: Some(ModelPrivacy { delta: 1.0, ..dp() }),
                    ..policy()
                },
                "delta",
            ),
            (
                RunPolicy {
                    model_privacy: Some(ModelPrivacy {
                        noise_multiplier: 0.0,
                        ..dp()
                    }),
                    ..policy()
                },
                "noise multiplier",
            ),
            (
                RunPolicy {
                    model_privacy: Some(dp()),
                    distributed_dp: true,
                    ..policy()
                },
                "distributed DP needs secure aggregation",
            ),
            (
                RunPolicy {
                    secure_quorum: 1.5,
                    ..policy()
                },
                "quorum",
            ),
            (
                RunPolicy {
                    secure_aggregation: true,
                    schedule: Schedule {
                        mode: Mode::Async,
                        ..Schedule::default()
                    },
                    ..policy()
                },
                "secure aggregation needs synchronous",
            ),
            (
                RunPolicy {
                    secure_aggregation: true,
                    participants: 256,
                    ..policy()
                },
                "at most 255",
            ),
            (
                RunPolicy {
                    secure_aggregation: true,
                    aggregation: AggregationRule::Median,
                    ..policy()
                },
                "robust",
            ),
            (
                RunPolicy {
                    label_epsilon: Some(f64::NAN),
                    ..policy()
                },
                "label epsilon",
            ),
            (
                RunPolicy {
                    guard: GuardSettings {
                        max_update_ratio: f64::NAN,
                        ..GuardSettings::default()
                    },
                    ..policy()
                },
                "guard",
            ),
        ];
        for (settings, reason) in cases {
            match settings.validate() {
                Err(PolicyError(said)) => assert!(said.contains(reason), "{said} / {reason}"),
                Ok(()) => panic!("accepted {settings:?}, expected a refusal naming {reason}"),
            }
        }
    }

    #[test]
    fn the_served_run_takes_no_credit_for_sampling_and_the_simulated_one_does() {
        assert_eq!(Sampling::Public.rate(), 1.0);
        let secret = Sampling::Secret {
            participants: 50,
            population: 1000,
        };
        assert_eq!(secret.rate(), 0.05);
        let everyone = Sampling::Secret {
            participants: 50,
            population: 20,
        };
        assert_eq!(everyone.rate(), 1.0);
    }
}
