//! FedAvg and FedProx: the baselines every run is compared with.

use super::{Participant, RoundPlan, Strategy, singleton_groups};
use crate::astraea::AugmentationPlan;

/// McMahan et al.'s FedAvg: every participant trains from the global model
/// and the server averages by sample count.
#[derive(Debug, Clone, Copy, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> String {
        "fedavg".into()
    }

    fn data_plan(&self, _client_counts: &[Vec<usize>]) -> Option<AugmentationPlan> {
        None
    }

    fn configure_round(&self, participants: &[Participant]) -> RoundPlan {
        RoundPlan {
            groups: singleton_groups(participants),
            prox_mu: 0.0,
        }
    }
}

/// Li et al.'s FedProx: FedAvg whose local objective adds
/// `mu / 2 * ||w - w_global||^2`, holding drifting clients near the global model.
#[derive(Debug, Clone, Copy)]
pub struct FedProx {
    /// Proximal weight mu.
    pub mu: f64,
}

impl Strategy for FedProx {
    fn name(&self) -> String {
        "fedprox".into()
    }

    fn data_plan(&self, _client_counts: &[Vec<usize>]) -> Option<AugmentationPlan> {
        None
    }

    fn configure_round(&self, participants: &[Participant]) -> RoundPlan {
        RoundPlan {
            groups: singleton_groups(participants),
            prox_mu: self.mu,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_trains_every_participant_alone_once() {
        let participants = vec![
            Participant {
                id: 7,
                counts: vec![1, 0],
                hop_seconds: None,
            },
            Participant {
                id: 3,
                counts: vec![0, 1],
                hop_seconds: None,
            },
        ];

        let plan = FedAvg.configure_round(&participants);
        let prox = FedProx { mu: 0.01 }.configure_round(&participants);

        assert_eq!(plan.groups.len(), 2);
        assert_eq!(plan.groups[0].members, vec![7]);
        assert_eq!(plan.groups[1].passes, 1);
        assert_eq!(plan.prox_mu, 0.0);
        assert_eq!(prox.prox_mu, 0.01);
        assert!(FedAvg.data_plan(&[vec![1, 100]]).is_none());
    }
}
