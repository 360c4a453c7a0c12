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

/// The most rounds a run may ask for.
pub const MAX_ROUNDS: u32 = 1_000_000;
/// The most participants a round may draw (and ready clients a round may
/// wait for): past what one server holds (`astraea bench idle`: 19,000
/// sockets on this machine's file limit).
pub const MAX_PARTICIPANTS: usize = 100_000;
/// The most local epochs of one hop.
pub const MAX_EPOCHS: usize = 100;
/// The largest local batch.
pub const MAX_BATCH_SIZE: usize = 4_096;
/// The largest learning rate (Adam's is 1e-3 by default).
pub const MAX_LEARNING_RATE: f64 = 10.0;
/// The largest FedProx mu.
pub const MAX_PROX_MU: f64 = 1_000.0;
/// The most clients in one mediator (gamma).
pub const MAX_MEDIATOR_SIZE: usize = 1_000;
/// The most passes of a mediator's chain (E_m).
pub const MAX_MEDIATOR_PASSES: usize = 100;
/// The most validation samples the loss rule judges every hop on.
pub const MAX_VALIDATION_SAMPLES: usize = 100_000;

/// The run's numbers the operator gives beyond [`RunPolicy`] — from the
/// command line, a TOML file, the environment or the admin API, in serve
/// and simulate alike — each bounded ([`RunNumbers::validate`]): a number
/// past its bound is refused with its name and the bound, before anything
/// runs, rather than running a model that cannot train or a server that
/// waits for ever.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunNumbers {
    /// Rounds (1 to [`MAX_ROUNDS`]).
    pub rounds: u32,
    /// Participants a round (1 to [`MAX_PARTICIPANTS`]).
    pub participants: usize,
    /// Ready clients a round waits for (1 to [`MAX_PARTICIPANTS`]; the
    /// simulator passes 1).
    pub min_clients: usize,
    /// Local epochs (1 to [`MAX_EPOCHS`]).
    pub epochs: usize,
    /// Local batch size (1 to [`MAX_BATCH_SIZE`]).
    pub batch_size: usize,
    /// Learning rate (positive, at most [`MAX_LEARNING_RATE`]).
    pub learning_rate: f64,
    /// FedProx mu (0 to [`MAX_PROX_MU`]).
    pub prox_mu: f64,
    /// Clients a mediator takes (gamma, 1 to [`MAX_MEDIATOR_SIZE`]).
    pub mediator_size: usize,
    /// Passes of a mediator's chain (1 to [`MAX_MEDIATOR_PASSES`]).
    pub mediator_passes: usize,
    /// The augmentation plan's threshold (z-score tau_d, or alpha): a
    /// finite number above 0.
    pub plan_threshold: f64,
}

impl RunNumbers {
    /// Checks every number against its bound.
    ///
    /// # Errors
    /// The first number out of bounds, by its flag's name.
    pub fn validate(&self) -> Result<(), PolicyError> {
        Self::counts(self.rounds, self.participants, self.min_clients)?;
        within("--epochs", self.epochs, 1, MAX_EPOCHS)?;
        within("--batch", self.batch_size, 1, MAX_BATCH_SIZE)?;
        within("--gamma", self.mediator_size, 1, MAX_MEDIATOR_SIZE)?;
        within(
            "--mediator-passes",
            self.mediator_passes,
            1,
            MAX_MEDIATOR_PASSES,
        )?;
        if !(self.learning_rate.is_finite()
            && self.learning_rate > 0.0
            && self.learning_rate <= MAX_LEARNING_RATE)
        {
            return refuse(format!(
                "--lr must be a number above 0 and at most {MAX_LEARNING_RATE}, not {}",
                self.learning_rate
            ));
        }
        if !(self.prox_mu.is_finite() && (0.0..=MAX_PROX_MU).contains(&self.prox_mu)) {
            return refuse(format!(
                "--prox-mu must be a number from 0 to {MAX_PROX_MU}, not {}",
                self.prox_mu
            ));
        }
        if !(self.plan_threshold.is_finite() && self.plan_threshold > 0.0) {
            return refuse(format!(
                "the plan's threshold (--tau-d or --alpha) must be a number above 0, not {}",
                self.plan_threshold
            ));
        }
        Ok(())
    }

    /// The counts the admin API may change while a run goes on: rounds,
    /// participants and the ready clients a round waits for.
    ///
    /// # Errors
    /// The first count out of bounds, by name.
    pub fn counts(rounds: u32, participants: usize, min_clients: usize) -> Result<(), PolicyError> {
        within("rounds", rounds as usize, 1, MAX_ROUNDS as usize)?;
        within("participants", participants, 1, MAX_PARTICIPANTS)?;
        within("min_clients", min_clients, 1, MAX_PARTICIPANTS)
    }
}

/// `value` of `name` within `low..=high`, or why not.
fn within(name: &str, value: usize, low: usize, high: usize) -> Result<(), PolicyError> {
    if (low..=high).contains(&value) {
        Ok(())
    } else {
        refuse(format!("{name} must be {low} to {high}, not {value}"))
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
        within(
            "--validation-samples",
            self.guard.validation_samples,
            0,
            MAX_VALIDATION_SAMPLES,
        )?;
        if let Some(buffer) = self.schedule.buffer {
            within("--buffer", buffer, 1, MAX_PARTICIPANTS)?;
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

    fn numbers() -> RunNumbers {
        RunNumbers {
            rounds: 50,
            participants: 20,
            min_clients: 2,
            epochs: 1,
            batch_size: 20,
            learning_rate: 1e-3,
            prox_mu: 0.01,
            mediator_size: 10,
            mediator_passes: 2,
            plan_threshold: 3.5,
        }
    }

    #[test]
    fn every_number_the_operator_gives_is_bounded_and_named_when_refused() {
        // The bug: `--epochs 100000000`, `--batch 0`, `--lr nan`,
        // `--participants 0`, `--rounds 0` and more started a server that
        // could not train or waited for ever.
        assert_eq!(numbers().validate(), Ok(()));
        let refused = |n: RunNumbers, flag: &str| {
            let error = n.validate().unwrap_err().0;
            assert!(error.contains(flag), "{error}");
        };
        refused(
            RunNumbers {
                rounds: 0,
                ..numbers()
            },
            "rounds",
        );
        refused(
            RunNumbers {
                participants: 0,
                ..numbers()
            },
            "participants",
        );
        refused(
            RunNumbers {
                participants: MAX_PARTICIPANTS + 1,
                ..numbers()
            },
            "participants",
        );
        refused(
            RunNumbers {
                min_clients: 0,
                ..numbers()
            },
            "min_clients",
        );
        refused(
            RunNumbers {
                epochs: 0,
                ..numbers()
            },
            "--epochs",
        );
        refused(
            RunNumbers {
                epochs: 100_000_000,
                ..numbers()
            },
            "--epochs",
        );
        refused(
            RunNumbers {
                batch_size: 0,
                ..numbers()
            },
            "--batch",
        );
        refused(
            RunNumbers {
                learning_rate: f64::NAN,
                ..numbers()
            },
            "--lr",
        );
        refused(
            RunNumbers {
                learning_rate: 0.0,
                ..numbers()
            },
            "--lr",
        );
        refused(
            RunNumbers {
                prox_mu: -1.0,
                ..numbers()
            },
            "--prox-mu",
        );
        refused(
            RunNumbers {
                mediator_size: 0,
                ..numbers()
            },
            "--gamma",
        );
        refused(
            RunNumbers {
                mediator_passes: 1_000_000,
                ..numbers()
            },
            "--mediator-passes",
        );
        refused(
            RunNumbers {
                plan_threshold: f64::NAN,
                ..numbers()
            },
            "--tau-d",
        );
        let mut p = policy();
        p.guard.validation_samples = MAX_VALIDATION_SAMPLES + 1;
        assert!(p.validate().unwrap_err().0.contains("--validation-samples"));
        let mut p = policy();
        p.schedule.buffer = Some(0);
        assert!(p.validate().unwrap_err().0.contains("--buffer"));
    }

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
