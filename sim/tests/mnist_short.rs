//! A short simulation on real MNIST (fetched by `astraea fetch-data`, which
//! `scripts/test` runs first): every strategy learns well above chance, and
//! Astraea's mediators are closer to uniform than FedAvg's clients.

use std::path::Path;

use astraea_core::astraea::PlanRule;
use astraea_core::data::catalog::load_named;
use astraea_core::partition::PartitionSpec;
use astraea_sim::{self as simulate, RunSpec, SimConfig};
use indicatif::ProgressBar;

#[test]
fn strategies_learn_on_a_long_tail_slice_of_mnist() {
    // Prepare: 6,000 training and 1,000 test samples of the real data; three
    // local epochs so that FedAvg's few samples per client get off the ground
    // within five rounds.
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let (train, test) = load_named("mnist", &data_dir).expect("run `astraea fetch-data` first");
    let train = train.subset(&(0..6000).collect::<Vec<_>>());
    let test = test.subset(&(0..1000).collect::<Vec<_>>());
    let config = SimConfig {
        dataset: "mnist".into(),
        data_dir,
        partition: "long-tail:10".parse::<PartitionSpec>().unwrap(),
        clients: 30,
        participants: 20,
        rounds: 5,
        gamma: 5,
        local_epochs: 3,
        mediator_passes: 2,
        plan_rule: PlanRule::ZScore { tau_d: 3.5 },
        batch_size: 20,
        learning_rate: 1e-3,
        prox_mu: 0.01,
        aggregation: Default::default(),
        attack: None,
        attackers: 0.0,
        max_update_ratio: astraea_core::guard::DEFAULT_MAX_UPDATE_RATIO,
        validation_samples: 0,
        population: astraea_sim::population::Population::default(),
        speed_weight: None,
        max_loss_increase: astraea_core::validation::DEFAULT_MAX_LOSS_INCREASE,
        threads: 2,
        out_dir: std::env::temp_dir(),
        target_accuracy: None,
    };
    let progress = ProgressBar::hidden();

    // Execute
    let mut histories = Vec::new();
    for name in [
        "fedavg",
        "fedprox",
        "astraea",
        "astraea-aug",
        "astraea-sched",
    ] {
        let spec = RunSpec::parse(name, 5).unwrap();
        histories.push(simulate::run(&config, &spec, &train, &test, &progress).unwrap());
    }

    // Assert
    for history in &histories {
        assert_eq!(history.rounds.len(), 5);
        let best = history
            .rounds
            .iter()
            .map(|r| r.accuracy)
            .fold(0.0, f64::max);
        assert!(best > 0.3, "{} best accuracy {best}", history.label);
        let last = history.rounds.last().unwrap();
        assert!(last.bytes_up > 0 && last.bytes_down > 0);
    }
    let kl = |i: usize| histories[i].rounds[0].mean_kl;
    assert!(
        kl(2) < kl(0),
        "astraea mediators KL {} not below fedavg clients KL {}",
        kl(2),
        kl(0)
    );
    let astraea_best = histories[2]
        .rounds
        .iter()
        .map(|r| r.accuracy)
        .fold(0.0, f64::max);
    assert!(astraea_best > 0.6, "astraea best accuracy {astraea_best}");
}
