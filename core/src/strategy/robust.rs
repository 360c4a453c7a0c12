//! [`Robust`]: any strategy with its aggregation replaced by a
//! Byzantine-robust [`AggregationRule`].

use super::{GroupFailure, GroupResult, Participant, RoundPlan, Strategy};
use crate::astraea::AugmentationPlan;
use crate::robust::AggregationRule;

/// A strategy that plans data and rounds as `inner` does but combines the
/// groups' results with `rule` ([`crate::robust::aggregate_with`]) instead of `inner`'s own
/// `aggregate`. [`StrategyKind::build`](super::StrategyKind::build) wraps a
/// strategy in it for every rule but [`AggregationRule::Mean`].
pub struct Robust {
    /// The strategy whose data plan and round plans are used.
    pub inner: Box<dyn Strategy>,
    /// The rule that combines the groups' results.
    pub rule: AggregationRule,
}

impl Strategy for Robust {
    /// `inner`'s name, `+`, the rule's command-line form, e.g. `fedavg+median`.
    fn name(&self) -> String {
        format!("{}+{}", self.inner.name(), self.rule)
    }

    fn data_plan(&self, client_counts: &[Vec<usize>]) -> Option<AugmentationPlan> {
        self.inner.data_plan(client_counts)
    }

    fn configure_round(&self, participants: &[Participant]) -> RoundPlan {
        self.inner.configure_round(participants)
    }

    /// `rule` over the results; misfit results are skipped, and `None` comes
    /// back when none is usable or the rule's aggregate is not finite.
    fn aggregate(
        &self,
        global: &[f32],
        results: &[GroupResult],
        _failures: &[GroupFailure],
    ) -> Option<Vec<f32>> {
        super::aggregate_results(self.rule, global, results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::astraea::PlanRule;
    use crate::strategy::{Rescheduling, StrategyKind, StrategySettings};

    fn fedavg(aggregation: AggregationRule) -> Box<dyn Strategy> {
        StrategyKind::FedAvg.build(&StrategySettings {
            plan_rule: PlanRule::default(),
            rescheduling: Rescheduling::default(),
            prox_mu: 0.0,
            aggregation,
        })
    }

    #[test]
    fn fedavg_with_median_resists_an_outlier_group_that_the_mean_follows() {
        // Prepare: four honest groups near 1 and one outlier claiming many
        // samples.
        let global = [0.0, 0.0];
        let mut results: Vec<GroupResult> = [[0.9, 1.1], [1.0, 1.0], [1.1, 0.9], [1.0, 1.0]]
            .into_iter()
            .enumerate()
            .map(|(group, w)| GroupResult {
                group,
                weights: w.to_vec(),
                samples: 10,
            })
            .collect();
        results.push(GroupResult {
            group: 4,
            weights: vec![-1e6, 1e6],
            samples: 1000,
        });
        let median = fedavg(AggregationRule::Median);
        let mean = fedavg(AggregationRule::Mean);

        // Execute
        let robust = median.aggregate(&global, &results, &[]).unwrap();
        let plain = mean.aggregate(&global, &results, &[]).unwrap();

        // Assert
        assert_eq!(median.name(), "fedavg+median");
        assert_eq!(mean.name(), "fedavg");
        assert_eq!(robust, vec![1.0, 1.0]);
        assert!(
            plain[0] < -1e5 && plain[1] > 1e5,
            "the mean stayed at {plain:?}"
        );
    }

    #[test]
    fn the_wrapper_plans_like_its_inner_strategy() {
        let settings = StrategySettings {
            plan_rule: PlanRule::default(),
            rescheduling: Rescheduling::default(),
            prox_mu: 0.01,
            aggregation: "krum:1".parse().unwrap(),
        };
        let participants = vec![Participant {
            id: 5,
            counts: vec![3, 1],
            hop_seconds: None,
        }];

        let strategy = StrategyKind::FedProx.build(&settings);
        let plan = strategy.configure_round(&participants);

        assert_eq!(strategy.name(), "fedprox+krum:1");
        assert_eq!(plan.prox_mu, 0.01);
        assert_eq!(plan.groups[0].members, vec![5]);
        assert!(strategy.data_plan(&[vec![3, 1]]).is_none());
    }
}
