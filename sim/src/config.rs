//! What a simulated run is made of.

use std::path::PathBuf;

use astraea_core::astraea::PlanRule;
use astraea_core::attack::Attack;
use astraea_core::engine::{GuardSettings, Schedule};
use astraea_core::partition::PartitionSpec;
use astraea_core::robust::AggregationRule;
use astraea_core::strategy::{Rescheduling, Strategy, StrategyKind, StrategySettings};

/// Settings shared by every run of one `simulate` invocation.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Dataset name for `data::catalog::load_named` (`mnist`, `fashion-mnist`, ...).
    pub dataset: String,
    /// Folder the datasets live in (`data/` by default).
    pub data_dir: PathBuf,
    /// How the training set is spread over the clients.
    pub partition: PartitionSpec,
    /// K: clients in the federation.
    pub clients: usize,
    /// c: clients taking part in each round.
    pub participants: usize,
    /// Rounds to run (in the asynchronous mode, global versions).
    pub rounds: u32,
    /// gamma: most clients per mediator.
    pub gamma: usize,
    /// E: local epochs per visit.
    pub epochs: usize,
    /// E_m: passes of a mediator over its clients per round.
    pub mediator_passes: usize,
    /// The augmentation rule Astraea uses.
    pub plan_rule: PlanRule,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// FedProx proximal weight mu.
    pub prox_mu: f64,
    /// How every strategy combines its groups' results (robust rules
    /// against attackers).
    pub aggregation: AggregationRule,
    /// What hostile clients do; `None` runs an honest federation.
    pub attack: Option<Attack>,
    /// Share of the K clients that attack, in 0..=1 (seeded choice).
    pub attackers: f64,
    /// The server's update guard and its loss rule: every hop is judged
    /// as the server would: a client whose update breaks the guard's
    /// bounds is dropped for the rest of the run; one far above the median
    /// of recent hops has that hop refused and stays.
    pub guard: GuardSettings,
    /// Who forms the mediators (`--scheduler`; the papers' greedy by
    /// default).
    pub scheduler: astraea_core::astraea::Scheduler,
    /// Label counts under local DP: every client reports its counts with
    /// discrete Laplace noise for this epsilon (`astraea_core::privacy`);
    /// `None` reports them exactly.
    pub label_epsilon: Option<f64>,
    /// Client-level DP for the model (DP-FedAvg; DP-Astraea over
    /// mediators), synchronous mode only; `None` trains without.
    pub model_privacy: Option<astraea_core::privacy::ModelPrivacy>,
    /// Secure aggregation of the mediators' results, as far as it changes
    /// the model: under client-level DP the server cannot clip the masked
    /// last hop, so the clip is split (the chain before it to C (1 - 1/h),
    /// the hop itself to C / h, h the chain's hops), as `serve
    /// --secure-aggregation --dp-noise` does. Without DP nothing changes
    /// (the masked sum is exact to about 1e-6).
    pub secure_aggregation: bool,
    /// Distributed DP (with `secure_aggregation` and `model_privacy`): each
    /// masker adds its share of the round's noise
    /// (`astraea_core::privacy::distributed_noise_share`, for the quorum
    /// of the round's maskers) to its clipped hop, and the server adds
    /// none, as `serve --distributed-dp` does.
    pub distributed_dp: bool,
    /// Secure aggregation's quorum: the share of a round's maskers needed
    /// to unmask, at least a majority (as `serve --secure-quorum`); under
    /// distributed DP each masker's noise is for that quorum.
    pub secure_quorum: f64,
    /// Per-hop noise on what the next client in a chain sees; `None`: none.
    pub hop_privacy: Option<astraea_core::privacy::HopPrivacy>,
    /// How weights travel: every hop's input and output are rounded as
    /// this encoding would carry them (f16: about three digits).
    pub encoding: astraea_core::protocol::WeightEncoding,
    /// Synchronous rounds, or the asynchronous mode
    /// (`astraea_core::engine::buffered`).
    pub schedule: Schedule,
    /// The clients as machines, for the federation clock.
    pub population: crate::population::Population,
    /// Worker threads that run mediators (and evaluation) in parallel.
    pub threads: usize,
    /// How the clients' hops are trained (`--engine`, `--stack`,
    /// `--device`).
    pub trainer: crate::trainer::TrainerSettings,
    /// Where CSVs, the plot and the summary go.
    pub out_dir: PathBuf,
    /// Accuracy (0..1) whose rounds and bytes to reach the summary reports.
    pub target_accuracy: Option<f64>,
}

/// One run: a strategy on a partition with a seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSpec {
    /// The strategy.
    pub strategy: StrategyKind,
    /// Run FedAvg-style baseline on a balanced IID spread of the same number
    /// of samples instead of the configured partition (the "no imbalance"
    /// reference).
    pub iid_reference: bool,
    /// Seed for the partition, the model's initial weights, client sampling
    /// and training.
    pub seed: u64,
}

impl RunSpec {
    /// Parses a run name: a strategy name, or `fedavg-iid` for the balanced
    /// IID reference.
    pub fn parse(name: &str, seed: u64) -> Result<Self, String> {
        if name == "fedavg-iid" {
            return Ok(Self {
                strategy: StrategyKind::FedAvg,
                iid_reference: true,
                seed,
            });
        }
        Ok(Self {
            strategy: name.parse()?,
            iid_reference: false,
            seed,
        })
    }

    /// The run's name, as parsed.
    pub fn name(&self) -> String {
        if self.iid_reference {
            "fedavg-iid".into()
        } else {
            self.strategy.as_str().into()
        }
    }

    /// A label for tables and legends, e.g. `astraea s1`.
    pub fn label(&self) -> String {
        format!("{} s{}", self.name(), self.seed)
    }

    /// Builds the strategy object for this run.
    pub fn strategy(&self, config: &SimConfig) -> Box<dyn Strategy> {
        self.strategy.build(&config.strategy_settings())
    }
}

impl SimConfig {
    /// The run's numbers as the engine bounds them
    /// ([`astraea_core::engine::RunNumbers::validate`], as serve's are).
    pub fn numbers(&self) -> astraea_core::engine::RunNumbers {
        astraea_core::engine::RunNumbers {
            rounds: self.rounds,
            participants: self.participants,
            min_clients: 1,
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            prox_mu: self.prox_mu,
            mediator_size: self.gamma,
            mediator_passes: self.mediator_passes,
            plan_threshold: self.plan_rule.threshold(),
        }
    }

    /// The run's rules as the round engine takes them (validated by
    /// [`astraea_core::engine::RunPolicy::validate`], as serve's are).
    /// The simulator's participants are drawn in secret: its DP rounds are
    /// composed at q = c / K, as DP-FedAvg's analysis (and the papers'
    /// figures) take them.
    pub fn policy(&self) -> astraea_core::engine::RunPolicy {
        astraea_core::engine::RunPolicy {
            schedule: self.schedule,
            participants: self.participants,
            aggregation: self.aggregation,
            model_privacy: self.model_privacy,
            max_epsilon: None,
            distributed_dp: self.distributed_dp,
            sampling: astraea_core::engine::Sampling::Secret {
                participants: self.participants,
                population: self.clients,
            },
            hop_privacy: self.hop_privacy,
            label_epsilon: self.label_epsilon,
            secure_aggregation: self.secure_aggregation,
            secure_quorum: self.secure_quorum,
            guard: self.guard,
        }
    }

    /// The strategy knobs of this configuration.
    pub fn strategy_settings(&self) -> StrategySettings {
        StrategySettings {
            plan_rule: self.plan_rule,
            rescheduling: Rescheduling {
                gamma: self.gamma,
                passes: self.mediator_passes,
                scheduler: self.scheduler.clone(),
            },
            prox_mu: self.prox_mu,
            aggregation: self.aggregation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_parse_and_print_back() {
        let iid = RunSpec::parse("fedavg-iid", 2).unwrap();
        let astraea = RunSpec::parse("astraea-sched", 1).unwrap();

        assert!(iid.iid_reference);
        assert_eq!(iid.label(), "fedavg-iid s2");
        assert_eq!(astraea.strategy, StrategyKind::AstraeaRescheduling);
        assert!(
            RunSpec::parse("fedsgd", 1)
                .unwrap_err()
                .contains("unknown strategy")
        );
    }
}
