//! The strategy contract, in the spirit of Flower's: a strategy decides who
//! trains what (the data plan once, then each round's training groups) and
//! combines the replies. Time, retries, transport and storage belong to the
//! runner (the simulator or the server), not to the strategy.

mod astraea;
mod fedavg;
mod robust;

pub use astraea::{Astraea, Rescheduling};
pub use fedavg::{FedAvg, FedProx};
pub use robust::Robust;

use serde::{Deserialize, Serialize};

use crate::astraea::AugmentationPlan;
use crate::robust::AggregationRule;

/// A client taking part in a round, as the strategy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Participant {
    /// The runner's id for the client.
    pub id: usize,
    /// Its label counts after the data plan was applied.
    pub counts: Vec<usize>,
    /// Its expected hop time in seconds (its work over its measured speed),
    /// for speed-aware mediators; `None` when unknown.
    pub hop_seconds: Option<f64>,
}

/// A chain of clients that the model travels through in order, `passes`
/// times, starting from the global model. A FedAvg client is a chain of one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Client ids in the order the model visits them.
    pub members: Vec<usize>,
    /// How many times the model goes round the chain (E_m).
    pub passes: usize,
}

/// What a round asks of the runner.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPlan {
    /// Training groups; they run in parallel with each other.
    pub groups: Vec<Group>,
    /// FedProx proximal weight for local training (0 for none).
    pub prox_mu: f64,
}

/// A group that finished: its final weights and the samples its clients hold
/// (counted once, however many passes were made).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupResult {
    /// Index of the group in the round plan.
    pub group: usize,
    /// Weights after the last hop.
    pub weights: Vec<f32>,
    /// n_m: the training samples of the group's clients.
    pub samples: u64,
}

/// A group that produced no usable update, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupFailure {
    /// Index of the group in the round plan.
    pub group: usize,
    /// What went wrong, for the logs.
    pub reason: String,
}

/// A federated-learning strategy.
pub trait Strategy: Send + Sync {
    /// A short name for tables and file names, e.g. `astraea`.
    fn name(&self) -> String;

    /// The data plan every client applies once before training, computed
    /// from all known clients' label counts (one vector per client, or
    /// several clients' summed into one: a plan reads only their sum,
    /// `engine::declared::Declared::plan_input`); `None` leaves data as it
    /// is.
    fn data_plan(&self, client_counts: &[Vec<usize>]) -> Option<AugmentationPlan>;

    /// Splits the round's participants into training groups.
    fn configure_round(&self, participants: &[Participant]) -> RoundPlan;

    /// Combines the groups' results into the next global model; `None` when
    /// nothing usable came back (the runner keeps the old model).
    ///
    /// The default is the sample-weighted average of docs/METHOD.md step 7, which
    /// is FedAvg's rule too; results that do not fit are skipped.
    fn aggregate(
        &self,
        global: &[f32],
        results: &[GroupResult],
        _failures: &[GroupFailure],
    ) -> Option<Vec<f32>> {
        aggregate_results(AggregationRule::Mean, global, results)
    }
}

/// The groups' results combined by `rule`; misfit results are skipped, and
/// `None` comes back when none is usable or the aggregate is not finite.
pub(crate) fn aggregate_results(
    rule: AggregationRule,
    global: &[f32],
    results: &[GroupResult],
) -> Option<Vec<f32>> {
    let updates: Vec<(&[f32], u64)> = results
        .iter()
        .map(|r| (r.weights.as_slice(), r.samples))
        .collect();
    crate::robust::aggregate_with(rule, global, &updates).ok()
}

/// Every participant trains alone, from the global model, once.
pub(crate) fn singleton_groups(participants: &[Participant]) -> Vec<Group> {
    participants
        .iter()
        .map(|p| Group {
            members: vec![p.id],
            passes: 1,
        })
        .collect()
}

/// The strategies a run can name, parsed from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrategyKind {
    /// Plain FedAvg.
    FedAvg,
    /// FedAvg with a proximal term.
    FedProx,
    /// Augmentation plan and mediator rescheduling.
    Astraea,
    /// Ablation: the augmentation plan only, clients train alone.
    AstraeaAugmentation,
    /// Ablation: mediator rescheduling only, data left as it is.
    AstraeaRescheduling,
}

impl StrategyKind {
    /// Every kind, in the order tables list them.
    pub const ALL: [StrategyKind; 5] = [
        StrategyKind::FedAvg,
        StrategyKind::FedProx,
        StrategyKind::Astraea,
        StrategyKind::AstraeaAugmentation,
        StrategyKind::AstraeaRescheduling,
    ];

    /// The name used on the command line and in file names.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::FedAvg => "fedavg",
            StrategyKind::FedProx => "fedprox",
            StrategyKind::Astraea => "astraea",
            StrategyKind::AstraeaAugmentation => "astraea-aug",
            StrategyKind::AstraeaRescheduling => "astraea-sched",
        }
    }
}

/// The knobs every strategy kind may read when it is built.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategySettings {
    /// The augmentation rule (Astraea and its augmentation ablation).
    pub plan_rule: crate::astraea::PlanRule,
    /// Mediator size and passes (Astraea and its rescheduling ablation).
    pub rescheduling: Rescheduling,
    /// FedProx mu.
    pub prox_mu: f64,
    /// How every kind combines its groups' results; anything but
    /// [`AggregationRule::Mean`] wraps the strategy in [`Robust`].
    pub aggregation: AggregationRule,
}

impl StrategyKind {
    /// Builds the strategy this kind names, wrapped in [`Robust`] unless
    /// `settings.aggregation` is the plain mean.
    pub fn build(self, settings: &StrategySettings) -> Box<dyn Strategy> {
        let strategy = self.build_plain(settings);
        match settings.aggregation {
            AggregationRule::Mean => strategy,
            rule => Box::new(Robust {
                inner: strategy,
                rule,
            }),
        }
    }

    /// The strategy alone, with its own (sample-weighted) aggregation.
    fn build_plain(self, settings: &StrategySettings) -> Box<dyn Strategy> {
        match self {
            StrategyKind::FedAvg => Box::new(FedAvg),
            StrategyKind::FedProx => Box::new(FedProx {
                mu: settings.prox_mu,
            }),
            StrategyKind::Astraea => Box::new(Astraea::full(
                settings.plan_rule,
                settings.rescheduling.clone(),
            )),
            StrategyKind::AstraeaAugmentation => Box::new(Astraea {
                augmentation: Some(settings.plan_rule),
                rescheduling: None,
            }),
            StrategyKind::AstraeaRescheduling => Box::new(Astraea {
                augmentation: None,
                rescheduling: Some(settings.rescheduling.clone()),
            }),
        }
    }
}

impl std::str::FromStr for StrategyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StrategyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = StrategyKind::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown strategy {s:?}, expected one of {}",
                    names.join(", ")
                )
            })
    }
}
