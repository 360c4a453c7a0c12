//! Astraea: the augmentation plan (docs/METHOD.md steps 2-4) and mediator
//! rescheduling (steps 5-6), each of which can be switched off for the
//! ablations.

use super::{Group, Participant, RoundPlan, Strategy, singleton_groups};
use crate::astraea::{AugmentationPlan, GlobalStats, PlanRule, Scheduler};

/// Astraea and its two ablations.
#[derive(Debug, Clone, PartialEq)]
pub struct Astraea {
    /// The augmentation rule, or `None` to leave data alone.
    pub augmentation: Option<PlanRule>,
    /// Mediator settings, or `None` for clients training alone (FedAvg-style).
    pub rescheduling: Option<Rescheduling>,
}

/// How mediators are formed and run.
#[derive(Debug, Clone, PartialEq)]
pub struct Rescheduling {
    /// gamma: the most clients in one mediator (10 in the papers).
    pub gamma: usize,
    /// E_m: passes of the model over a mediator's clients per round (2).
    pub passes: usize,
    /// Who forms the mediators: the papers' greedy by default.
    pub scheduler: Scheduler,
}

impl Default for Rescheduling {
    fn default() -> Self {
        Self {
            gamma: 10,
            passes: 2,
            scheduler: Scheduler::Greedy,
        }
    }
}

impl Astraea {
    /// The full method.
    pub fn full(rule: PlanRule, rescheduling: Rescheduling) -> Self {
        Self {
            augmentation: Some(rule),
            rescheduling: Some(rescheduling),
        }
    }
}

impl Strategy for Astraea {
    fn name(&self) -> String {
        match (self.augmentation.is_some(), self.rescheduling.is_some()) {
            (true, true) => "astraea",
            (true, false) => "astraea-aug",
            (false, true) => "astraea-sched",
            (false, false) => "astraea-none",
        }
        .into()
    }

    fn data_plan(&self, client_counts: &[Vec<usize>]) -> Option<AugmentationPlan> {
        let rule = self.augmentation?;
        Some(AugmentationPlan::compute(
            &GlobalStats::from_client_counts(client_counts),
            rule,
        ))
    }

    fn configure_round(&self, participants: &[Participant]) -> RoundPlan {
        let groups = match &self.rescheduling {
            None => singleton_groups(participants),
            Some(r) => {
                let counts: Vec<Vec<usize>> =
                    participants.iter().map(|p| p.counts.clone()).collect();
                let seconds: Vec<Option<f64>> =
                    participants.iter().map(|p| p.hop_seconds).collect();
                r.scheduler
                    .assign(&counts, &seconds, r.gamma, round_seed(participants))
                    .into_iter()
                    .map(|members| Group {
                        members: members.into_iter().map(|i| participants[i].id).collect(),
                        passes: r.passes,
                    })
                    .collect()
            }
        };
        RoundPlan {
            groups,
            prox_mu: 0.0,
        }
    }
}

/// A seed for the random scheduler from the round's participants (their
/// ids, in order; SplitMix64's finaliser over a running sum), so a run is
/// reproducible and every round draws anew.
fn round_seed(participants: &[Participant]) -> u64 {
    participants.iter().fold(0x9E37_79B9_7F4A_7C15, |acc, p| {
        let mut z = acc
            .wrapping_add(p.id as u64)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescheduling_groups_by_mediator_and_keeps_client_ids() {
        // Prepare: ids differ from positions to catch a mix-up.
        let participants = vec![
            Participant {
                id: 40,
                counts: vec![10, 0],
                hop_seconds: None,
            },
            Participant {
                id: 41,
                counts: vec![10, 0],
                hop_seconds: None,
            },
            Participant {
                id: 42,
                counts: vec![0, 10],
                hop_seconds: None,
            },
            Participant {
                id: 43,
                counts: vec![0, 10],
                hop_seconds: None,
            },
        ];
        let strategy = Astraea {
            augmentation: None,
            rescheduling: Some(Rescheduling {
                gamma: 2,
                passes: 2,
                scheduler: Scheduler::Greedy,
            }),
        };

        // Execute
        let plan = strategy.configure_round(&participants);

        // Assert
        assert_eq!(strategy.name(), "astraea-sched");
        assert_eq!(
            plan.groups[0],
            Group {
                members: vec![40, 42],
                passes: 2
            }
        );
        assert_eq!(
            plan.groups[1],
            Group {
                members: vec![41, 43],
                passes: 2
            }
        );
    }

    #[test]
    fn augmentation_only_plans_data_and_trains_clients_alone() {
        let strategy = Astraea {
            augmentation: Some(PlanRule::Alpha { alpha: 0.67 }),
            rescheduling: None,
        };
        let participants = vec![Participant {
            id: 1,
            counts: vec![1, 1],
            hop_seconds: None,
        }];

        let plan = strategy.data_plan(&[vec![10, 40], vec![0, 50]]).unwrap();
        let round = strategy.configure_round(&participants);

        assert_eq!(strategy.name(), "astraea-aug");
        // C = [10, 90], mu = 50: class 0 gets (50 / 10)^0.67.
        assert!((plan.ratios[0] - 5f64.powf(0.67)).abs() < 1e-12);
        assert_eq!(plan.ratios[1], 1.0);
        assert_eq!(round.groups.len(), 1);
        assert_eq!(round.groups[0].passes, 1);
    }
}
