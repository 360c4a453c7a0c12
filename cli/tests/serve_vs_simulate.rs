//! One round engine, two drivers: a small federation with one seed, run by
//! the simulator (`astraea simulate`, in process) and by the server
//! (`astraea serve`) with native clients over a real loopback WebSocket,
//! draws the same participants into the same mediators, ends the same
//! hops the same way (accepted, refused by the loss rule, discarded,
//! skipped) and adopts the same model, round after round, within float
//! tolerance.
//!
//! Both sides train every hop on burn's `flex` device with the hop's seed
//! (`astraea_core::engine::seeds`), its dropout masks drawn from that seed
//! too (`train::dropout_keep`): two mediators' hops train at once on each
//! side and still train as they would alone. (While dropout drew from
//! burn's one process-wide generator, concurrent hops interleaved their
//! draws, and this test had to keep to a single mediator.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use astraea_core::astraea::PlanRule;
use astraea_core::data::catalog::load_named;
use astraea_core::engine::GuardSettings;
use astraea_core::metrics::RoundRecord;
use astraea_core::strategy::{Rescheduling, StrategyKind, StrategySettings};
use astraea_core::weights::Weights;
use astraea_native::{ClientOptions, DatasetCache, run_client};
use astraea_server::ServeConfig;
use astraea_sim::{RunSpec, SimConfig};

const CLIENTS: usize = 6;
const PARTICIPANTS: usize = 4;
const ROUNDS: u32 = 3;
const TRAIN: usize = 3000;

fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

/// The served run: MNIST's first 3,000 training samples in 6 long-tailed
/// shards (about 1,000 samples kept), 4 clients a round in two Astraea
/// mediators of two passes (8 hops a round), the loss rule judging every
/// hop against 32 validation samples and refusing an increase over 5 %
/// (so some hops are refused, and the hops trained on them discarded).
fn served(state_dir: &Path) -> ServeConfig {
    ServeConfig {
        dataset: "mnist".into(),
        data_dir: data_dir(),
        max_train: Some(TRAIN),
        partition: "long-tail:10".parse().unwrap(),
        shards: CLIENTS,
        participants: PARTICIPANTS,
        min_clients: CLIENTS,
        rounds: ROUNDS,
        strategy: StrategyKind::Astraea,
        settings: StrategySettings {
            plan_rule: PlanRule::ZScore { tau_d: 1.0 },
            rescheduling: Rescheduling {
                gamma: PARTICIPANTS / 2,
                passes: 2,
                scheduler: astraea_core::astraea::Scheduler::Greedy,
            },
            prox_mu: 0.0,
            aggregation: Default::default(),
        },
        epochs: 1,
        batch_size: 20,
        learning_rate: 1e-3,
        guard: GuardSettings {
            validation_samples: 32,
            max_loss_increase: 0.05,
            ..GuardSettings::default()
        },
        hop_deadline: Duration::from_secs(120),
        seed: 11,
        static_dir: std::env::temp_dir(),
        state_dir: Some(state_dir.to_path_buf()),
        run_name: "cross-check".into(),
        ..ServeConfig::default()
    }
}

/// The same federation as the simulator takes it: every setting the two
/// share copied from `serve`; a population that never freezes.
fn simulated(serve: &ServeConfig) -> SimConfig {
    let settings = &serve.settings;
    SimConfig {
        dataset: serve.dataset.clone(),
        data_dir: serve.data_dir.clone(),
        partition: serve.partition,
        clients: serve.shards,
        participants: serve.participants,
        rounds: serve.rounds,
        gamma: settings.rescheduling.gamma,
        epochs: serve.epochs,
        mediator_passes: settings.rescheduling.passes,
        plan_rule: settings.plan_rule,
        batch_size: serve.batch_size,
        learning_rate: serve.learning_rate,
        prox_mu: settings.prox_mu,
        aggregation: settings.aggregation,
        attack: None,
        attackers: 0.0,
        guard: serve.guard,
        scheduler: settings.rescheduling.scheduler.clone(),
        label_epsilon: serve.label_epsilon,
        model_privacy: None,
        secure_aggregation: serve.secure_aggregation,
        distributed_dp: false,
        secure_quorum: serve.secure_quorum,
        hop_privacy: serve.hop_privacy,
        encoding: serve.encoding,
        schedule: serve.schedule,
        population: astraea_sim::population::Population::default(),
        threads: 1,
        // The clients' own arithmetic (burn's autodiff), so the models
        // can be held to 1e-4: the batched engine sums in another order,
        // and where that tips a ReLU a client's training drifts apart
        // (sim/tests/engines.rs holds the engines to each other).
        trainer: astraea_sim::TrainerSettings {
            engine: astraea_sim::Engine::PerClient,
            ..astraea_sim::TrainerSettings::default()
        },
        out_dir: std::env::temp_dir(),
        target_accuracy: None,
    }
}

fn client(address: &str) -> ClientOptions {
    ClientOptions {
        max_attempts: Some(1),
        ..ClientOptions::new(format!("ws://{address}/ws"), data_dir())
    }
}

/// Runs `config` served to native clients; returns its rounds and model.
async fn serve(config: ServeConfig) -> (Vec<RoundRecord>, Weights) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let running = astraea_server::start(listener, config).await.unwrap();
    let cache = Arc::new(DatasetCache::default());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(run_client(client(&address), cache.clone())))
        .collect();
    tokio::time::timeout(Duration::from_secs(600), running.coordinator)
        .await
        .expect("the served run ends within 10 minutes")
        .unwrap()
        .unwrap();
    for client in clients {
        client.abort();
    }
    let rounds = running.state.status().history.clone();
    let model = running
        .state
        .global
        .lock()
        .unwrap()
        .clone()
        .expect("a model after the rounds");
    running.server.abort();
    (rounds, (*model).clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_simulate_run_the_same_rounds() {
    // Prepare
    let dir = std::env::temp_dir().join(format!("astraea-cross-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let serve_config = served(&dir);
    let sim_config = simulated(&serve_config);
    let (train, test) = load_named("mnist", &data_dir()).expect("run `astraea fetch-data` first");
    let train = train.subset(&(0..TRAIN).collect::<Vec<_>>());
    let spec = RunSpec {
        strategy: StrategyKind::Astraea,
        iid_reference: false,
        seed: serve_config.seed,
    };

    // Execute: the simulation first, then the served run (never both
    // training at once, see the module's note).
    let (simulated, sim_model) = tokio::task::spawn_blocking(move || {
        astraea_sim::run_with_model(
            &sim_config,
            &spec,
            &train,
            &test,
            &indicatif::ProgressBar::hidden(),
        )
        .unwrap()
    })
    .await
    .unwrap();
    let (served, served_model) = serve(serve_config).await;
    let _ = std::fs::remove_dir_all(&dir);

    // Assert
    assert_eq!(served.len(), ROUNDS as usize);
    assert_eq!(simulated.rounds.len(), ROUNDS as usize);
    for (s, m) in served.iter().zip(&simulated.rounds) {
        let round = s.round;
        assert_eq!(s.round, m.round);
        assert_eq!(s.mediators, m.mediators, "round {round}: mediators");
        assert_eq!(s.mediators.len(), 2, "round {round}: two mediators");
        assert!(s.mediators.iter().all(|m| m.len() == PARTICIPANTS / 2));
        assert_eq!(s.hops, m.hops, "round {round}: how the hops ended");
        assert!(
            (s.mean_kl - m.mean_kl).abs() < 1e-9,
            "round {round}: KL {} served, {} simulated",
            s.mean_kl,
            m.mean_kl
        );
        assert!(
            (s.accuracy - m.accuracy).abs() <= 2e-3,
            "round {round}: accuracy {} served, {} simulated",
            s.accuracy,
            m.accuracy
        );
        assert!(
            (s.loss - m.loss).abs() <= 1e-3 * m.loss.abs().max(1.0),
            "round {round}: loss {} served, {} simulated",
            s.loss,
            m.loss
        );
    }
    // Every planned hop ended one way or another, the loss rule refused
    // some (and the pipelined hops trained on them were moved onto the
    // weights before and judged, none discarded; a client refused twice in
    // a row sat a round out, in both drivers), and the model learnt
    // (chance is 0.1).
    let hops: u64 = served.iter().map(|r| r.hops.total()).sum();
    assert_eq!(hops, u64::from(ROUNDS) * 2 * PARTICIPANTS as u64);
    assert!(served.iter().any(|r| r.hops.refused > 0));
    assert!(served.iter().all(|r| r.hops.discarded == 0));
    assert!(served.iter().all(|r| r.hops.accepted > 0));
    assert!(
        served[served.len() - 1].accuracy > 0.3,
        "{:?}",
        served
            .iter()
            .map(|r| (r.accuracy, r.hops))
            .collect::<Vec<_>>()
    );
    assert_eq!(served_model.shapes, sim_model.shapes);
    let largest = served_model
        .values
        .iter()
        .zip(&sim_model.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(largest < 1e-4, "the models differ by up to {largest}");
}
