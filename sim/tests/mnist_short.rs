//! A short simulation on real MNIST (fetched by `astraea fetch-data`, which
//! `scripts/test` runs first): every strategy learns well above chance, and
//! Astraea's mediators are closer to uniform than FedAvg's clients.

use std::path::Path;

use astraea_core::astraea::PlanRule;
use astraea_core::data::catalog::load_named;
use astraea_core::engine::{GuardSettings, Schedule};
use astraea_core::partition::PartitionSpec;
use astraea_sim::{self as simulate, RunSpec, SimConfig};
use indicatif::ProgressBar;

#[test]
fn strategies_learn_on_a_long_tail_slice_of_mnist() {
    // Prepare: 6,000 training and 1,000 test samples of the real data; three
    // local epochs so that FedAvg's few samples per client get off the ground
    // within five rounds.
    let (train, test, config) = slice();
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

/// 6,000 training and 1,000 test samples of real MNIST, spread long-tailed
/// over 30 clients, 20 taking part in each of 5 rounds.
fn slice() -> (
    astraea_core::data::Dataset,
    astraea_core::data::Dataset,
    SimConfig,
) {
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
        epochs: 3,
        mediator_passes: 2,
        plan_rule: PlanRule::ZScore { tau_d: 3.5 },
        batch_size: 20,
        learning_rate: 1e-3,
        prox_mu: 0.01,
        aggregation: Default::default(),
        attack: None,
        attackers: 0.0,
        guard: GuardSettings {
            validation_samples: 0,
            ..GuardSettings::default()
        },
        population: astraea_sim::population::Population::default(),
        scheduler: astraea_core::astraea::Scheduler::Greedy,
        label_epsilon: None,
        model_privacy: None,
        hop_privacy: None,
        secure_aggregation: false,
        distributed_dp: false,
        secure_quorum: 0.5,
        encoding: astraea_core::protocol::WeightEncoding::F32,
        schedule: Schedule::default(),
        threads: 2,
        trainer: astraea_sim::TrainerSettings::default(),
        out_dir: std::env::temp_dir(),
        target_accuracy: None,
    };
    (train, test, config)
}

#[test]
fn the_asynchronous_mode_learns_and_does_not_wait_for_the_slowest_chain() {
    // Prepare: speeds spread 100x (the 95th percentile over the 5th), so a
    // synchronous round waits for a chain of slow clients.
    let (train, test, config) = slice();
    let config = SimConfig {
        population: astraea_sim::population::Population {
            speeds: "lognormal:200:100".parse().unwrap(),
            ..Default::default()
        },
        ..config
    };
    let spec = RunSpec::parse("astraea", 5).unwrap();
    let progress = ProgressBar::hidden();

    // Execute: the asynchronous run's rounds are versions, each made of a
    // buffer of 2 of the 4 groups running (c = 20, gamma = 5): twice as many
    // versions train as many groups as the synchronous rounds.
    let sync = simulate::run(&config, &spec, &train, &test, &progress).unwrap();
    let asynchronous = simulate::run(
        &SimConfig {
            schedule: Schedule {
                mode: astraea_core::asynchronous::Mode::Async,
                ..Schedule::default()
            },
            rounds: 2 * config.rounds,
            ..config.clone()
        },
        &spec,
        &train,
        &test,
        &progress,
    )
    .unwrap();

    // Assert: a record a version and as much training, sooner on the
    // clock, and it learns.
    assert_eq!(asynchronous.rounds.len(), 10);
    let (a, s) = (
        asynchronous.rounds.last().unwrap(),
        sync.rounds.last().unwrap(),
    );
    assert!(
        a.clock_s < 0.8 * s.clock_s,
        "async clock {} s against sync {} s",
        a.clock_s,
        s.clock_s
    );
    assert!(a.train_samples > s.train_samples / 2);
    let best = asynchronous
        .rounds
        .iter()
        .map(|r| r.accuracy)
        .fold(0.0, f64::max);
    assert!(best > 0.6, "async astraea best accuracy {best}");
}

#[test]
fn a_round_probed_with_the_runs_own_scheduler_gains_what_the_round_gained() {
    // Prepare: Astraea's run on the slice, one thread (chains in order),
    // speeds spread so schedules differ in time too.
    let (train, test, mut config) = slice();
    config.rounds = 3;
    config.threads = 1;
    config.population.speeds = "lognormal:200:100".parse().unwrap();
    // A deadline the slowest clients miss: each miss is a strike in the
    // client's standing, which benches it from later draws — a replay
    // must not add strikes of its own.
    config.population.hop_deadline_s = 8.0;
    let spec = RunSpec::parse("astraea", 7).unwrap();
    let history = simulate::run(&config, &spec, &train, &test, &ProgressBar::hidden()).unwrap();
    let schedulers = [
        ("own".to_string(), config.scheduler.clone()),
        (
            "random".to_string(),
            astraea_core::astraea::Scheduler::Random,
        ),
    ];

    // Execute: rounds 1 and 2 played again with the run's own scheduler
    // and with random groups.
    let (probed_history, probed) = simulate::probe_schedules(
        &config,
        &spec,
        &train,
        &test,
        simulate::Probe {
            schedulers: &schedulers,
            rounds: &[1, 2],
        },
    )
    .unwrap();

    // Assert: the probed run is the unprobed run, round for round (the
    // replays left its defence as they found it); round 2's probes start
    // from round 1's model; the run's own scheduler replays round 2 as the
    // run played it; random groups make another round; every probe took
    // time on the federation's clock.
    let accuracies = |h: &astraea_core::metrics::RunHistory| -> Vec<f64> {
        h.rounds.iter().map(|r| r.accuracy).collect()
    };
    assert_eq!(accuracies(&probed_history), accuracies(&history));
    assert_eq!(probed.len(), 4);
    let (own, random) = (&probed[2], &probed[3]);
    for p in &probed[2..] {
        assert_eq!(p.round, 2);
        assert!((p.accuracy_before - history.rounds[0].accuracy).abs() < 1e-12);
        assert!(p.seconds > 0.0 && p.balanced > 0.0, "{p:?}");
    }
    assert!(
        (own.accuracy - history.rounds[1].accuracy).abs() < 1e-12,
        "the replay {} against the round {}",
        own.accuracy,
        history.rounds[1].accuracy
    );
    assert!(
        (random.kl - own.kl).abs() > 1e-9 && random.accuracy != own.accuracy,
        "random groups replayed the same round: {random:?}"
    );
}
