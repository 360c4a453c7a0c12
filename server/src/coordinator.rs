//! The round loop of a served run. Each round it picks c ready clients, lets
//! the strategy group them, hosts every group's chain itself — the model goes
//! to a client, comes back, goes to the next — with the groups in parallel,
//! then aggregates, evaluates on the test set and records the round.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use astraea_core::asynchronous::Mode;
use astraea_core::data::Dataset;
use astraea_core::engine::buffered::{Ended, Versions};
use astraea_core::engine::chain::Verdict;
use astraea_core::engine::draw::{Candidate, draw};
use astraea_core::engine::hop::{HopTimer, HopWait};
use astraea_core::engine::round::{largest_group, secure_chain};
use astraea_core::engine::seeds;
use astraea_core::engine::{Chain, ChainRules, Closed, Effect, Next, RoundPrivacy};
use astraea_core::model::ModelConfig;
use astraea_core::partition::kl_to_uniform;
use astraea_core::protocol::{
    AckOutcome, ChainPlace, ModelSpec, ServerMessage, TaskSpec, encode_chunks,
};
use astraea_core::strategy::{Group, GroupFailure, GroupResult, Participant, Strategy};
use astraea_core::train::{self, Samples};
use astraea_core::validation::LossCheck;
use astraea_core::weights::Weights;
use burn::prelude::*;
use futures_util::future::join_all;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::oneshot;

use crate::config::ServeConfig;
use crate::secure::SecureRound;
use crate::state::{
    AppState, ClientEntry, HopAnswer, MediatorStatus, Outbound, Pending, Phase, hop_deadline, lock,
};
use crate::store::gateways::GatewaySeen;
use astraea_core::engine::declared::Declared;
use astraea_core::metrics::RoundRecord;

/// What the server holds of the data: the shards' indices and the test set.
pub struct ServerData {
    /// The model trained.
    pub model: ModelSpec,
    /// Its configuration.
    pub model_config: ModelConfig,
    /// Training-set indices per demo shard.
    pub shards: Vec<Vec<usize>>,
    /// The balanced test set the server evaluates on.
    pub test: Arc<Dataset>,
    /// The training set the shards index, served to tabs in demo mode.
    pub train: Arc<Dataset>,
    /// The initial global model (seeded), served until round 1 ends.
    pub initial: Weights,
    /// The guard's loss rule on validation samples drawn from the training
    /// set; `None` when turned off.
    pub loss_check: Option<Arc<LossCheck>>,
}

impl ServerData {
    /// Cuts the training set into shards and keeps the balanced test set.
    pub fn prepare(config: &ServeConfig, train: Dataset, test: Dataset) -> anyhow::Result<Self> {
        let train = match config.max_train {
            Some(n) if n < train.len() => train.subset(&(0..n).collect::<Vec<_>>()),
            _ => train,
        };
        let partition = config
            .partition
            .build(
                &train.labels,
                &test.labels,
                train.num_classes(),
                config.shards,
                config.seed,
            )
            .context("cutting the training set into shards")?;
        let model_config = ModelConfig::for_dataset(&train);
        let initial = Weights::from_model(&model_config.init_seeded(&Device::flex(), config.seed));
        let loss_check = (config.guard.validation_samples > 0 && !train.is_empty()).then(|| {
            let mut rng = StdRng::seed_from_u64(seeds::validation(config.seed));
            let count = config.guard.validation_samples.min(train.len());
            let picked = rand::seq::index::sample(&mut rng, train.len(), count).into_vec();
            Arc::new(LossCheck::new(
                model_config.clone(),
                &train.subset(&picked),
                config.guard.max_loss_increase,
            ))
        });
        Ok(Self {
            loss_check,
            model: ModelSpec::new(&model_config, initial.len()),
            initial,
            model_config,
            shards: partition.clients,
            test: Arc::new(test.subset(&partition.test_indices)),
            train: Arc::new(train),
        })
    }
}

/// Where a run goes on from.
pub struct Resume {
    /// The global model: the initial one, or the last completed round's.
    pub global: Weights,
    /// The first round still to run.
    pub first_round: u32,
    /// Whether the data plan was already sent.
    pub planned: bool,
}

/// Puts a resumed run back (history, plan, counters, the guard's history,
/// the model) before anything is served, so no request sees a resumed run
/// as empty; `None` starts from `initial`.
pub fn restore(
    state: &AppState,
    initial: &Weights,
    resumed: Option<crate::store::Resumed>,
) -> Resume {
    let mut resume = Resume {
        global: initial.clone(),
        first_round: 1,
        planned: false,
    };
    if let Some(resumed) = resumed {
        state.run_id.store(resumed.run_id as u64, Ordering::Relaxed);
        // Ids given before stay theirs (their tokens resume them).
        state
            .next_id
            .fetch_max(resumed.last_client_id.saturating_add(1), Ordering::Relaxed);
        if let Some(weights) = resumed.weights {
            resume.global = weights;
        }
        if let Some(last) = resumed.history.last() {
            resume.first_round = last.round as u32 + 1;
            // The accountant goes on from what the last round kept; a run
            // kept before accountants were saved counts every past round at
            // the noise multiplier configured now, sampling everyone.
            if let Some(privacy) = lock(&state.privacy).as_mut() {
                match &resumed.accountant {
                    Some(kept) => privacy.accountant = kept.clone(),
                    None => privacy.accountant.compose(
                        privacy.q,
                        privacy.mechanism.noise_multiplier,
                        last.round as u64,
                    ),
                }
                // Adaptive clipping goes on from where it had moved the
                // clip; a fixed clip is what is configured now. Any
                // positive clip spends the same epsilon (the noise scales
                // with it), so a lost clip costs accuracy, not privacy.
                if let (Some(_), Some(clip)) = (privacy.mechanism.adaptive, resumed.model_clip) {
                    tracing::info!(
                        clip,
                        "adaptive clipping goes on from the clip it reached (--dp-clip is its start only)"
                    );
                    privacy.clip = clip;
                }
            }
            state.bytes_up.store(last.bytes_up, Ordering::Relaxed);
            state.bytes_down.store(last.bytes_down, Ordering::Relaxed);
            state
                .train_samples
                .store(last.train_samples, Ordering::Relaxed);
            *lock(&state.training) = Duration::try_from_secs_f64(last.train_s).unwrap_or_default();
            let detail = format!("resumed after round {}", last.round);
            tracing::info!("{detail}");
            state.record(|store, run| store.event(run, Some(last.round as u32), "resume", &detail));
        }
        state.guard.restore(&resumed.guard);
        let mut status = state.status();
        resume.planned = resumed.plan.is_some();
        status.plan = resumed.plan;
        status.history = resumed.history;
        status.skipped_hops = resumed.skipped_hops;
        status.round = resume.first_round - 1;
    }
    *lock(&state.global) = Some(Arc::new(resume.global.clone()));
    resume
}

/// Runs the configured number of rounds from `resume` (see [`restore`]).
pub async fn run(state: Arc<AppState>, data: ServerData, resume: Resume) -> anyhow::Result<()> {
    let config = &state.config;
    let strategy: Arc<dyn Strategy> = Arc::from(config.strategy.build(&config.settings));
    let Resume {
        mut global,
        first_round,
        mut planned,
    } = resume;
    if config.schedule.mode == Mode::Async {
        return run_async(
            state.clone(),
            data,
            Resume {
                global,
                first_round,
                planned,
            },
            strategy,
        )
        .await;
    }
    let start = Instant::now();
    let mut round = first_round;
    while round <= state.tunable().rounds {
        // Seeded per round, so a resumed run draws as the original would have.
        let mut rng = StdRng::seed_from_u64(seeds::round_draw(config.seed, round));
        if !wait_while_paused(&state).await {
            break;
        }
        if !prepare(&state, strategy.as_ref(), &mut planned).await {
            break;
        }
        // With gateways, this server draws its share of the round's
        // participants and each gateway its own (`engine::hierarchy`).
        let gateways = crate::gateway::live(&state, true).await;
        // A gateway still without the plan (a new one, or the plan's save
        // failed): kept again, so that it finds it.
        let plan = state.status().plan.clone();
        if let Some(plan) = plan
            && gateways.iter().any(|g| !g.planned)
        {
            state.record(|store, run| store.save_plan(run, &plan));
        }
        // The cap on an own-data client's word is the run's: taken over
        // this server's clients and every gateway's, and placed with the
        // work (a liar alone on a gateway would set its own).
        let run_cap = if gateways.is_empty() {
            u64::MAX
        } else {
            let mut totals = AppState::counted_totals(&state.clients());
            totals.extend(gateways.iter().flat_map(|g| g.totals.iter().copied()));
            astraea_core::engine::declared::declared_cap_of(&totals)
        };
        state.run_cap.store(run_cap, Ordering::Relaxed);
        let (own_share, shares) = crate::gateway::split(
            state.tunable().participants,
            ready_clients(&state),
            &gateways,
        );
        let participants = pick_participants(&state, own_share, &mut rng, &HashSet::new(), round);
        if let Some(privacy) = served_privacy(&state)
            && let Err(detail) = privacy.budget_allows(round)
        {
            tracing::warn!("{detail}");
            state.record(|store, run| store.event(run, Some(round), "budget", &detail));
            break;
        }
        let plan = strategy.configure_round(&participants);
        let mediators: Vec<MediatorStatus> = plan
            .groups
            .iter()
            .map(|g| mediator_status(g, &participants))
            .collect();
        let mean_kl = mediators.iter().map(|m| m.kl).sum::<f64>() / mediators.len().max(1) as f64;
        {
            let mut status = state.status();
            status.phase = Phase::Training;
            status.round = round;
            status.mediators = mediators;
            status.round_started = Some(Instant::now());
        }
        let mediator_count = plan.groups.len() as u32;
        let secure = if config.secure_aggregation {
            let started = start_secure_round(
                &state,
                round,
                &plan.groups,
                &participants,
                global.values.len(),
            );
            if started.is_none() {
                // Fail closed: without a secure round no chain may run, or
                // its last hop would go out in the clear.
                close_round(
                    &state,
                    &data,
                    strategy.as_ref(),
                    &mut global,
                    round,
                    (&[], &[]),
                    mean_kl,
                    start,
                    None,
                    Some((
                        Err("the secure round could not start; nothing trained".into()),
                        vec![],
                    )),
                )
                .await?;
                round += 1;
                continue;
            }
            started
        } else {
            None
        };
        let placed = crate::gateway::place(&state, round, &global.values, shares).await?;
        let chains = plan.groups.iter().enumerate().map(|(index, group)| {
            run_chain(
                state.clone(),
                index,
                index as u64,
                group.clone(),
                round,
                mediator_count,
                global.values.clone(),
                plan.prox_mu,
                secure.clone().map(|s| (s, index)),
            )
        });
        let mut results = Vec::new();
        let mut failures = Vec::new();
        let mut training = Training::default();
        training.set(&state, true);
        let (outcomes, gathered) = tokio::join!(
            join_all(chains),
            crate::gateway::gather(&state, placed, (&global.values, plan.groups.len()))
        );
        training.set(&state, false);
        // The gateways' partials fold in as mediators do.
        let gathered = gathered?;
        results.extend(gathered.results);
        failures.extend(gathered.failures);
        for outcome in outcomes {
            match outcome {
                Ok(result) => results.push(result),
                Err(failure) => failures.push(failure),
            }
        }
        // DP's sensitivity: the round's largest mediator, here or on a
        // gateway.
        let largest = largest_group(&plan.groups).max(gathered.largest);
        let secured = match &secure {
            Some(secure) => {
                let outcome = secure.finish(&state).await;
                *lock(&state.secure) = None;
                Some((outcome, secure.masked_clients()))
            }
            None => None,
        };
        let last = close_round(
            &state,
            &data,
            strategy.as_ref(),
            &mut global,
            round,
            (&results, &failures),
            mean_kl,
            start,
            Some(largest),
            secured,
        )
        .await?;
        round += 1;
        if last {
            break;
        }
    }
    state.status().phase = Phase::Finished;
    if !state.control().stopped {
        state.record(|store, run| store.finish(run));
    }
    Ok(())
}

/// Ends round `round` (in the asynchronous mode, global version `round`):
/// aggregates the groups' `outcomes` (results, failures) against `global`
/// with the strategy's rule, keeps the previous model when the aggregate
/// is out of bounds, panics or does not evaluate to finite figures, then
/// evaluates, checkpoints, records (`mean_kl` of the groups folded in,
/// `start` of the run for its clock) and tells the clients. Under secure
/// aggregation `secured` holds the unmasked mean of the round and how many
/// results are in it (or why there is none), which replaces the
/// strategy's aggregation, with the clients whose masked results are in
/// it (a spoiled mean makes them suspects: `engine::suspects`); under client-level DP too, the server adds the
/// round's noise to that mean (under distributed DP the maskers did).
#[allow(clippy::too_many_arguments)]
async fn close_round(
    state: &AppState,
    data: &ServerData,
    strategy: &dyn Strategy,
    global: &mut Weights,
    round: u32,
    (results, failures): (&[GroupResult], &[GroupFailure]),
    mean_kl: f64,
    start: Instant,
    largest: Option<usize>,
    secured: Option<(astraea_core::engine::round::Unmasked, Vec<u64>)>,
) -> anyhow::Result<bool> {
    let (secured, maskers) = match secured {
        Some((unmasked, maskers)) => (Some(unmasked), maskers),
        None => (None, vec![]),
    };
    // Under client-level DP (synchronous rounds) the round is spent
    // whatever becomes of it; its noise comes from the operating system.
    let mut privacy = largest.and_then(|largest| Some((served_privacy(state)?, largest)));
    let (closed, _) = astraea_core::engine::round::close(
        strategy,
        &global.values,
        (results, failures),
        privacy.as_mut().map(|(p, largest)| (p, *largest)),
        secured,
        (&state.guard, state.loss_check.as_deref()),
        &mut StdRng::from_os_rng(),
    );
    if let Some((privacy, _)) = privacy {
        *lock(&state.privacy) = Some(privacy);
    }
    // Group testing of the maskers (`engine::suspects`): a spoiled mean
    // keeps its maskers under suspicion, an adopted one clears them; the
    // one left is named and sits secure rounds out (not refused: the
    // evidence can be forged).
    let named = lock(&state.suspects).closed(&maskers, &closed, round);
    if let Some(client) = named {
        name_masker(state, client, round, "its unmasked sums were refused");
    }
    let adopted = match closed {
        Closed::Adopted(values) => Some(values),
        Closed::Kept => None,
        Closed::Dropped(reason) | Closed::Spoiled(reason) => {
            drop_round(state, round, &reason);
            None
        }
    };
    let previous = global.values.clone();
    if let Some(values) = adopted {
        global.values = values;
    }
    let mut eval = evaluate(data, global).await;
    if !matches!(&eval, Ok(e) if e.loss.is_finite() && e.accuracy.is_finite()) {
        // The new model cannot be evaluated (a panic, or a non-finite
        // loss): keep the last one.
        drop_round(
            state,
            round,
            "the new model did not evaluate to finite figures",
        );
        global.values = previous;
        eval = evaluate(data, global).await;
    }
    let eval = eval?;
    *lock(&state.global) = Some(Arc::new(global.clone()));
    let (hops, mediators) = {
        let mut status = state.status();
        let mediators = match state.config.schedule.mode {
            Mode::Sync => status.mediators.iter().map(|m| m.members.clone()).collect(),
            Mode::Async => Vec::new(),
        };
        (std::mem::take(&mut status.round_hops), mediators)
    };
    let record = RoundRecord {
        round: round as usize,
        accuracy: eval.accuracy,
        loss: eval.loss,
        bytes_up: state.bytes_up.load(Ordering::Relaxed),
        bytes_down: state.bytes_down.load(Ordering::Relaxed),
        mean_kl,
        wall_s: start.elapsed().as_secs_f64(),
        train_samples: state.train_samples.load(Ordering::Relaxed),
        train_s: lock(&state.training).as_secs_f64(),
        clock_s: start.elapsed().as_secs_f64(),
        epsilon: state.model_epsilon(),
        mediators,
        hops,
    };
    tracing::info!(
        round,
        accuracy = eval.accuracy,
        failures = failures.len(),
        "round done"
    );
    // A round's mediators, kept beside its record (an asynchronous version
    // has none: its groups started from different versions).
    let (skipped, mediators) = {
        let status = state.status();
        let mediators = match state.config.schedule.mode {
            Mode::Sync => status.mediators.clone(),
            Mode::Async => Vec::new(),
        };
        (status.skipped_hops, mediators)
    };
    let guard = state.guard.history();
    let checkpoint = state.model_card(round, Some(eval.accuracy)).export(global);
    let (accountant, model_clip) = lock(&state.privacy)
        .as_ref()
        .map(|p| (p.accountant.clone(), p.clip))
        .unzip();
    // The run's last round: its rounds are done, or the privacy budget
    // allows no more. Decided once, here: the round loops end on it, the
    // store marks the run finished with the round, the clients hear it.
    let last = round >= state.tunable().rounds
        || served_privacy(state).is_some_and(|p| p.budget_allows(round + 1).is_err());
    // A round another server's lease refused is not this server's to
    // announce: it stops here (and the round loop with it).
    state.record_or_refused(|store, run| {
        let kept = crate::store::RoundState {
            skipped_hops: skipped,
            mediators: &mediators,
            checkpoint: &checkpoint,
            guard: &guard,
            accountant: accountant.as_ref(),
            model_clip,
            last,
        };
        store.save_round(run, &record, &kept)
    })?;
    state.status().history.push(record);
    let done = ServerMessage::RoundDone {
        round,
        accuracy: eval.accuracy,
        loss: eval.loss,
        epsilon: state.model_epsilon().filter(|e| e.is_finite()),
        rejoin_within_ms: Some(state.rejoin_within_ms(0)),
        last,
    };
    for entry in state.clients().values() {
        entry.send(&done);
    }
    Ok(last)
}

/// Waits for enough ready clients and, the first time, sends the data plan
/// (then waits for the clients' post-plan counts); `false` when the admin
/// stopped the run meanwhile.
async fn prepare(state: &AppState, strategy: &dyn Strategy, planned: &mut bool) -> bool {
    if !wait_for_ready(state, state.tunable().min_clients).await {
        return false;
    }
    if !*planned {
        *planned = true;
        // The gateways' clients count as this server's do.
        let gateways = crate::gateway::live(state, true).await;
        if send_plan(state, strategy, &gateways)
            && !wait_for_ready(state, state.tunable().min_clients).await
        {
            return false;
        }
    }
    true
}

/// What a chain of the asynchronous mode gives back when it ends.
struct Finished {
    /// Its place on the dashboard.
    slot: usize,
    /// The global version it started from, and that version's weights.
    start_version: u64,
    start: Arc<Vec<f32>>,
    /// Its label mix's KL to uniform.
    kl: f64,
    outcome: Result<GroupResult, GroupFailure>,
}

/// The asynchronous mode (`--mode async`, `astraea_core::asynchronous`):
/// as many groups run at once as a synchronous round would make of the
/// ready clients (at most `c`); whenever one ends and enough clients are
/// free (an average group's worth), the strategy forms a new group from up
/// to `c` free ready clients (Astraea: the most balanced mediator it can
/// make of them) and it starts at once from the current global model.
/// Finished groups go into the buffer with their staleness weight; every
/// `buffer` of them make a new global version, which is evaluated,
/// checkpointed and recorded as a round. `rounds` counts versions.
async fn run_async(
    state: Arc<AppState>,
    data: ServerData,
    resume: Resume,
    strategy: Arc<dyn Strategy>,
) -> anyhow::Result<()> {
    let config = &state.config;
    let Resume {
        mut global,
        first_round,
        mut planned,
    } = resume;
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(seeds::async_draw(config.seed, first_round));
    let mut versions = Versions::new(
        config.schedule.buffer,
        config.schedule.max_staleness,
        u64::from(first_round) - 1,
    );
    let mut running = tokio::task::JoinSet::new();
    // The members of the chain in each dashboard slot, `None` when free.
    let mut slots: Vec<Option<Vec<u64>>> = Vec::new();
    let mut chains = 0u64;
    let mut training = Training::default();
    loop {
        let round = u32::try_from(versions.version() + 1).unwrap_or(u32::MAX);
        if round > state.tunable().rounds || state.control().stopped {
            break;
        }
        // Waiting for enough ready clients holds back new chains only:
        // chains already out are folded in as they end.
        if running.is_empty() && !prepare(&state, strategy.as_ref(), &mut planned).await {
            break;
        }
        let c = state.tunable().participants;
        if !state.control().paused {
            // How many groups a synchronous round would run now.
            let everyone = pick_participants(&state, c, &mut rng, &HashSet::new(), round);
            let target = strategy.configure_round(&everyone).groups.len();
            versions.size(everyone.len(), target);
            while versions.wants_group(running.len()) {
                let busy: HashSet<u64> = slots.iter().flatten().flatten().copied().collect();
                let free = pick_participants(&state, c, &mut rng, &busy, round);
                if !versions.may_start(running.len(), free.len()) {
                    break;
                }
                let plan = strategy.configure_round(&free);
                let Some(group) = plan.groups.into_iter().next() else {
                    break;
                };
                let slot = slots.iter().position(Option::is_none).unwrap_or_else(|| {
                    slots.push(None);
                    slots.len() - 1
                });
                slots[slot] = Some(group.members.iter().map(|&m| m as u64).collect());
                let view = mediator_status(&group, &free);
                let kl = view.kl;
                {
                    let mut status = state.status();
                    status.mediators.resize(slots.len(), view.clone());
                    status.mediators[slot] = view;
                }
                let start_version = versions.version();
                let weights = Arc::new(global.values.clone());
                let chain = run_chain(
                    state.clone(),
                    slot,
                    chains,
                    group,
                    round,
                    target as u32,
                    global.values.clone(),
                    plan.prox_mu,
                    None,
                );
                chains += 1;
                running.spawn(async move {
                    Finished {
                        slot,
                        start_version,
                        start: weights,
                        kl,
                        outcome: chain.await,
                    }
                });
            }
        }
        {
            let mut status = state.status();
            status.round = round;
            status.phase = match (running.is_empty(), state.control().paused) {
                (_, true) => Phase::Paused,
                (true, false) => Phase::Waiting,
                (false, false) => Phase::Training,
            };
            if status.round_started.is_none() {
                status.round_started = Some(Instant::now());
            }
        }
        training.set(&state, !running.is_empty());
        let joined = state.changed.notified();
        let controlled = state.control_changed.notified();
        let finished = tokio::select! {
            Some(done) = running.join_next() => Some(done),
            _ = joined => None,
            _ = controlled => None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => None,
        };
        training.set(&state, !running.is_empty());
        let Some(done) = finished else { continue };
        let Finished {
            slot,
            start_version,
            start: from,
            kl,
            outcome,
        } = done.context("a chain panicked")?;
        slots[slot] = None;
        if let Ended::Refused(refusal) =
            versions.ended(&global.values, &from, start_version, outcome, kl)
        {
            state.stale_results.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(slot, "group result refused: {refusal}");
            let detail = format!("mediator {}: {refusal}", slot + 1);
            state.record(|store, run| store.event(run, Some(round), "refused", &detail));
        }
        {
            // The chain is over: the dashboard stops showing a member at work.
            let mut status = state.status();
            if let Some(view) = status.mediators.get_mut(slot) {
                view.current = None;
            }
        }
        if versions.due() {
            let made = versions.take();
            let last = close_round(
                &state,
                &data,
                strategy.as_ref(),
                &mut global,
                round,
                (&made.results, &made.failures),
                made.mean_kl,
                start,
                None,
                None,
            )
            .await?;
            versions.advance();
            state.status().round_started = Some(Instant::now());
            if last {
                break;
            }
        }
    }
    // Chains still out when the run ends are given up.
    running.abort_all();
    for entry in state.clients().values_mut() {
        entry.pending = None;
    }
    if versions.refused() > 0 {
        tracing::info!(
            refused = versions.refused(),
            "group results refused as too stale"
        );
    }
    state.status().phase = Phase::Finished;
    if !state.control().stopped {
        state.record(|store, run| store.finish(run));
    }
    Ok(())
}

/// Starts round `round`'s secure aggregation: the last member of each
/// group masks; the key exchange starts now, beside the chains. `None`
/// when it cannot start (the round then trains nothing: it fails closed).
fn start_secure_round(
    state: &Arc<AppState>,
    round: u32,
    groups: &[Group],
    participants: &[Participant],
    len: usize,
) -> Option<Arc<SecureRound>> {
    let total: u64 = groups
        .iter()
        .map(|g| {
            group_counts(g, participants)
                .iter()
                .map(|&c| c as u64)
                .sum::<u64>()
        })
        .sum::<u64>()
        .max(1);
    let maskers: Vec<u64> = groups
        .iter()
        .map(|g| g.members.last().copied().unwrap_or_default() as u64)
        .collect();
    match SecureRound::new(round, &maskers, total, len, state.config.secure_quorum) {
        Ok(mut secure) => {
            // Its chains' clip and, under distributed DP, the maskers'
            // share of the round's noise, so that any quorum of survivors
            // carries all of it.
            let privacy = served_privacy(state);
            match secure_chain(privacy.as_ref(), groups, secure.min_survivors()) {
                Ok(chain) => secure.set_chain(chain),
                Err(reason) => {
                    drop_round(state, round, &reason);
                    return None;
                }
            }
            let secure = Arc::new(secure);
            *lock(&state.secure) = Some(secure.clone());
            let (task_state, task_secure) = (state.clone(), secure.clone());
            tokio::spawn(async move {
                let _ = task_secure.sharers(&task_state).await;
            });
            Some(secure)
        }
        Err(e) => {
            drop_round(state, round, &format!("secure aggregation: {e}"));
            None
        }
    }
}

/// Adds up the time with at least one chain out ([`AppState::training`]).
#[derive(Debug, Default)]
struct Training {
    since: Option<Instant>,
}

impl Training {
    /// From now on chains are out (`out`) or none is; the time since the
    /// last call counts if chains were out then.
    fn set(&mut self, state: &AppState, out: bool) {
        let now = Instant::now();
        if let Some(since) = self.since.take() {
            *lock(&state.training) += now - since;
        }
        if out {
            self.since = Some(now);
        }
    }
}

/// A copy of the run's client-level DP as it stands ([`AppState::privacy`]);
/// `None` without DP.
fn served_privacy(state: &AppState) -> Option<RoundPrivacy> {
    lock(&state.privacy).clone()
}

/// Evaluates `weights` on the server's balanced test set, off the async
/// threads; a panic in evaluation is an error, not the end of the process.
async fn evaluate(data: &ServerData, weights: &Weights) -> anyhow::Result<train::EvalStats> {
    let (model_config, weights, test) = (
        data.model_config.clone(),
        weights.clone(),
        data.test.clone(),
    );
    let eval = tokio::task::spawn_blocking(move || {
        let samples = Samples {
            images: &test.images,
            labels: &test.labels,
        };
        // The batched trainer's forward pass: a fifth of `train::evaluate`'s
        // time on the CPU (docs/RESULTS.md, issue 23).
        astraea_core::batched::evaluate(&model_config, &weights, samples, 500, &Device::flex())
    })
    .await
    .context("evaluation panicked")??;
    Ok(eval)
}

/// Tells of masker `client`, named in round `round` for `why`, sitting
/// out secure rounds (`engine::suspects`).
pub(crate) fn name_masker(state: &AppState, client: u64, round: u32, why: &str) {
    tracing::warn!(client, round, "masker named, sits out secure rounds: {why}");
    let detail = format!("client {client}: {why}");
    state.record(|store, run| store.event(run, Some(round), "masker-named", &detail));
}

/// Records that round `round`'s aggregate was refused and the previous
/// model kept.
fn drop_round(state: &AppState, round: u32, reason: &str) {
    state.dropped_rounds.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(round, "round dropped, previous model kept: {reason}");
    state.record(|store, run| store.event(run, Some(round), "round-dropped", reason));
}

/// Waits while the admin has paused the run; `false` when it was stopped.
async fn wait_while_paused(state: &AppState) -> bool {
    loop {
        let notified = state.control_changed.notified();
        let control = state.control();
        if control.stopped {
            return false;
        }
        if !control.paused {
            return true;
        }
        state.status().phase = Phase::Paused;
        let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
    }
}

/// Waits until at least `min` clients have usable counts; `false` when the
/// admin stopped the run meanwhile.
async fn wait_for_ready(state: &AppState, min: usize) -> bool {
    loop {
        let joined = state.changed.notified();
        let controlled = state.control_changed.notified();
        if state.control().stopped {
            return false;
        }
        // The gateways' ready clients count too (none without gateways).
        let elsewhere: usize = crate::gateway::live(state, false)
            .await
            .iter()
            .map(crate::gateway::drawable)
            .sum();
        let ready = ready_clients(state) + elsewhere;
        if ready >= min.max(1) {
            return true;
        }
        state.status().phase = Phase::Waiting;
        tokio::select! {
            _ = joined => {}
            _ = controlled => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// This server's ready clients: reported their label counts and not
/// pausing (a paused client is not drawn, so it does not count).
pub(crate) fn ready_clients(state: &AppState) -> usize {
    ready_among(&state.clients())
}

/// Of `clients`, the ready ones (see [`ready_clients`]).
pub(crate) fn ready_among(clients: &BTreeMap<u64, ClientEntry>) -> usize {
    clients
        .values()
        .filter(|c| c.counts.is_some() && !c.paused)
        .count()
}

/// This server's clients' first label-count reports (before any plan),
/// as the augmentation plan reads them ([`Declared`]: a demo shard's
/// proven, an own-data client's not).
pub(crate) fn declared_of(clients: &BTreeMap<u64, ClientEntry>) -> Declared {
    let mut declared = Declared::default();
    for client in clients.values() {
        if let Some(counts) = &client.raw_counts {
            declared.add(counts, client.shard_counts.is_some());
        }
    }
    declared
}

/// Takes `ratios` as the run's augmentation plan on this server: shown
/// on its dashboard, and sent to each of its clients that reported its
/// counts and has not had it (they report again, augmented, before they
/// are drawn). Set under the clients' lock, so a report either sees the
/// plan or is here to be sent it (`Connection::ready`).
pub(crate) fn adopt_plan(state: &AppState, ratios: &[f64]) {
    let mut clients = state.clients();
    state.status().plan = Some(ratios.to_vec());
    for (&id, entry) in clients.iter_mut() {
        if entry.raw_counts.is_some() && !entry.plan_sent {
            entry.plan_sent = true;
            entry.counts = None;
            entry.send(&ServerMessage::Plan {
                ratios: ratios.to_vec(),
                seed: seeds::plan(state.config.seed, id),
            });
        }
    }
}

/// Computes the strategy's data plan from the label counts of this
/// server's clients and of the run's `gateways`' ([`GatewaySeen::declared`],
/// added up: the cap on an own-data client's word is the run's), keeps it
/// in the store and sends it to this server's clients (the gateways read
/// it from the store and send it to theirs, `gateway::run`); returns
/// whether a plan was made. Clients joining later get it on their first
/// `ready`.
fn send_plan(state: &AppState, strategy: &dyn Strategy, gateways: &[GatewaySeen]) -> bool {
    let mut declared = declared_of(&state.clients());
    let classes = state.model.num_classes;
    for gateway in gateways {
        match &gateway.declared {
            Some(theirs) if theirs.fits(classes) => declared.merge(theirs),
            Some(_) => tracing::warn!(
                gateway = %gateway.name,
                "the gateway's label counts do not have the model's {classes} classes: left out of the plan"
            ),
            None => {}
        }
    }
    let Some(plan) = strategy.data_plan(&declared.plan_input()) else {
        return false;
    };
    // Kept before it is sent: a gateway, or a leader after this one,
    // finds the plan its clients were sent. Never waiting on the store
    // holding the clients' lock (every socket's task takes it).
    state.record(|store, run| store.save_plan(run, &plan.ratios));
    adopt_plan(state, &plan.ratios);
    // The gateways' view read before the plan counted their clients
    // ready; the next wait reads them again.
    state.status().gateways_read = None;
    tracing::info!(ratios = ?plan.ratios, "data plan sent");
    true
}

/// Why a paused client's hop was skipped.
const PAUSED: &str = "paused: the client said it is being frozen or put to sleep";

/// Draws up to `c` of the ready clients not in `busy` for round `round`,
/// by the engine's rule ([`astraea_core::engine::draw`]): never one that
/// said it is pausing, that the loss rule benched for the round or that
/// sits it out as a suspect of spoiled secure sums, and one
/// silent since a skipped hop only when no other is free.
pub(crate) fn pick_participants(
    state: &AppState,
    c: usize,
    rng: &mut StdRng,
    busy: &HashSet<u64>,
    round: u32,
) -> Vec<Participant> {
    let clients = state.clients();
    let sitting_out = {
        let mut suspects = lock(&state.suspects);
        // A suspect that left would hold the others out with it.
        suspects.keep_only(|id| clients.contains_key(&id));
        suspects.sitting_out(round)
    };
    // An own-data client's counts as the cap bounds them (engine::declared).
    let cap = state.cap_among(&clients);
    let candidates: Vec<Candidate> = clients
        .iter()
        .filter_map(|(&id, entry)| {
            entry.counts.as_ref().map(|counts| Candidate {
                participant: Participant {
                    id: id as usize,
                    counts: match entry.shard_counts {
                        Some(_) => counts.clone(),
                        None => astraea_core::engine::declared::bounded(counts, cap),
                    },
                    // Its expected hop from its measured speed, at most the
                    // operator's deadline.
                    hop_seconds: entry.speed.map(|speed| {
                        astraea_core::engine::hop::expected_hop_s(
                            entry.samples.saturating_mul(state.config.epochs as u64),
                            speed,
                            0.0,
                            state.tunable().hop_deadline().as_secs_f64(),
                        )
                    }),
                },
                paused: entry.paused,
                silent: entry.silent,
                busy: busy.contains(&id),
                // Under suspicion of spoiling secure sums, half the
                // suspects sit each round out (`engine::suspects`).
                benched: entry.standing.benched(round) || sitting_out.contains(&id),
            })
        })
        .collect();
    draw(&candidates, c, rng)
}

/// The dashboard's view of a group about to start.
pub(crate) fn mediator_status(group: &Group, participants: &[Participant]) -> MediatorStatus {
    let counts = group_counts(group, participants);
    MediatorStatus {
        members: group.members.iter().map(|&m| m as u64).collect(),
        kl: kl_to_uniform(&counts),
        counts,
        hops: (group.members.len() * group.passes) as u32,
        hops_done: 0,
        current: None,
    }
}

/// The combined label counts of a group: its label mix.
fn group_counts(group: &Group, participants: &[Participant]) -> Vec<usize> {
    let mut combined: Vec<usize> = Vec::new();
    for p in participants
        .iter()
        .filter(|p| group.members.contains(&p.id))
    {
        combined.resize(p.counts.len(), 0);
        for (c, n) in combined.iter_mut().zip(&p.counts) {
            *c += n;
        }
    }
    combined
}

/// Runs one group's chain, driving the engine's [`Chain`] (which decides
/// every rule of it) with real sockets and time: a member that leaves or
/// misses its deadline is skipped and the chain goes on with the weights
/// it had; the loss rule judges a hop off the async threads while the next
/// member already trains on it. `index` is its place on the dashboard
/// (`RunStatus::mediators`), `chain` numbers it among the run's chains for
/// the hop numbers its tasks carry.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_chain(
    state: Arc<AppState>,
    index: usize,
    chain: u64,
    group: Group,
    round: u32,
    mediators: u32,
    global: Vec<f32>,
    prox_mu: f64,
    secure: Option<(Arc<SecureRound>, usize)>,
) -> Result<GroupResult, GroupFailure> {
    let rules = ChainRules {
        loss_rule: state.loss_check.is_some(),
        hop_privacy: state.config.hop_privacy,
        secure: secure.as_ref().map(|(secure, _)| secure.chain()),
    };
    // Per-hop noise from the operating system's entropy.
    let mut walk = Chain::new(index, &group, global, rules, StdRng::from_os_rng());
    // Unique per chain for 200,000 chains (u32) of up to 10,000 planned
    // hops (20,000 with every other one sent again).
    let wire = |ordinal: u32| (chain % 200_000) as u32 * 20_000 + ordinal;
    // The loss rule at work on one hop: (its ordinal, the verdict to come).
    let mut judging: Option<(u32, tokio::task::JoinHandle<Verdict>)> = None;
    let outcome = loop {
        let hop = match walk.poll() {
            Next::Train(hop) => hop,
            Next::Verdict => {
                let Some((ordinal, verdict)) = judging.take() else {
                    // The engine's contract: a verdict is due only while
                    // one is being judged.
                    break Err(GroupFailure {
                        group: index,
                        reason: "a verdict was due with none being judged".into(),
                    });
                };
                let verdict = verdict
                    .await
                    .unwrap_or_else(|e| Verdict::Failed(e.to_string()));
                let effects = walk.verdict(ordinal, verdict);
                carry_out(&state, round, effects, &wire, &mut judging);
                continue;
            }
            // Every hop's outcome is fed as it comes (below).
            Next::Outcome => {
                break Err(GroupFailure {
                    group: index,
                    reason: "a hop's outcome was lost".into(),
                });
            }
            Next::Done(outcome) => break outcome,
        };
        let member = hop.member as u64;
        state.set_hop(index, Some(member), hop.slot as u32);
        let mut task = TaskSpec {
            round,
            hop: wire(hop.ordinal),
            epochs: state.config.epochs,
            batch_size: state.config.batch_size,
            learning_rate: state.config.learning_rate,
            prox_mu,
            // Both set per client as the task goes out (`run_hop`).
            deadline_ms: 0,
            stall_ms: None,
            // The chain's number too: in the asynchronous mode two
            // chains of one version share round and hop.
            seed: seeds::hop(state.config.seed, round, chain, member, hop.pass as u32),
            encoding: state.config.encoding,
            chunks: 0,
            place: Some(ChainPlace {
                mediator: index as u32 + 1,
                mediators,
                position: hop.position as u32 + 1,
                members: group.members.len() as u32,
                pass: hop.pass as u32 + 1,
                passes: group.passes as u32,
            }),
            secure_weight: None,
            secure_clip: None,
            secure_noise: None,
        };
        // Under secure aggregation the masker (the chain's last member)
        // trains only once the key exchange is over, so it answers the
        // exchange while idle; the chain is over if it is not a sharer
        // (its result could not be summed). Its last hop answers masked,
        // weighted by the samples the chain really trained.
        let mut masker = None;
        if let (Some((secure, mediator)), true) = (&secure, hop.masker) {
            let slot = secure.slot(*mediator);
            match secure.sharers(&state).await {
                Ok(sharers) if sharers.contains(&slot) => {}
                outcome => {
                    walk.abort(match outcome {
                        Err(e) => format!("secure aggregation failed: {e}"),
                        Ok(_) => format!("masker {slot} left the key exchange"),
                    });
                    continue;
                }
            }
            if let Some(masked) = hop.masked {
                task.secure_weight = Some(match masked.clip {
                    // DP: the masker clips its own hop (the engine clipped
                    // the rest of the chain); every masker weighs the same.
                    Some(clip) => {
                        task.secure_clip = Some(clip);
                        task.secure_noise = masked.noise;
                        // Exactly the clipped weights: f16 would round the
                        // masker's start off the clipped prefix.
                        task.encoding = astraea_core::protocol::WeightEncoding::F32;
                        secure.set_uniform_weight(slot)
                    }
                    None => {
                        let own = state.weighable_samples(member);
                        secure.set_weight(slot, masked.others.saturating_add(own))
                    }
                });
                masker = Some((secure.clone(), slot));
            }
        }
        let sent_at = Instant::now();
        let effects = match run_hop(&state, member, task, &hop.weights).await {
            // Refused by the guard's outlier rule: the client stays.
            Ok(HopAnswer::Refused(reason)) => walk.refused(hop.ordinal, reason),
            Ok(HopAnswer::Update(reply)) => {
                // The server's own timing of the hop, transfer included:
                // the speed its next deadline comes from.
                let work = reply.samples.saturating_mul(state.config.epochs as u64);
                let measured = work as f64 / sent_at.elapsed().as_secs_f64().max(1e-3);
                if let Some(entry) = state.clients().get_mut(&member) {
                    entry.observe_speed(measured);
                }
                // A masked result goes into the secure sum.
                let summed = match &masker {
                    Some((secure, slot)) => secure.add_masked(*slot, &reply.weights),
                    None => Ok(()),
                };
                match summed {
                    Ok(()) => {
                        // An own-data client's word weighs within its cap.
                        let samples = reply.samples.min(state.weighable_samples(member));
                        walk.returned(hop.ordinal, reply.weights, samples)
                    }
                    Err(reason) => walk.refused(hop.ordinal, reason),
                }
            }
            Err(reason) => walk.skipped(hop.ordinal, reason),
        };
        carry_out(&state, round, effects, &wire, &mut judging);
    };
    state.set_hop(index, None, walk.planned() as u32);
    state.status().round_hops += walk.tally();
    outcome
}

/// Carries out what the chain's engine said: acknowledgements, counters and
/// records, and the loss rule's judgements (off the async threads).
fn carry_out(
    state: &Arc<AppState>,
    round: u32,
    effects: Vec<Effect>,
    wire: &impl Fn(u32) -> u32,
    judging: &mut Option<(u32, tokio::task::JoinHandle<Verdict>)>,
) {
    {
        // The loss rule's verdicts, into each member's standing.
        let mut clients = state.clients();
        for effect in &effects {
            if let Some(entry) = effect.member().and_then(|m| clients.get_mut(&(m as u64))) {
                entry.standing.note(effect, round);
            }
        }
    }
    for effect in effects {
        match effect {
            Effect::Accepted { member, ordinal } => send_ack(
                state,
                member as u64,
                round,
                wire(ordinal),
                AckOutcome::Accepted,
                None,
            ),
            Effect::Refused {
                member,
                ordinal,
                reason,
                loss_rule,
            } => {
                if loss_rule {
                    state.loss_refusals.fetch_add(1, Ordering::Relaxed);
                }
                let hop = wire(ordinal);
                send_ack(
                    state,
                    member as u64,
                    round,
                    hop,
                    AckOutcome::Refused,
                    Some(reason.clone()),
                );
                tracing::warn!(client = member, round, hop, "hop refused: {reason}");
                let detail = format!("client {member} hop {hop}: {reason}");
                let kind = if loss_rule { "loss-refusal" } else { "refusal" };
                state.record(|store, run| store.event(run, Some(round), kind, &detail));
            }
            Effect::Discarded { member, ordinal } => {
                send_ack(
                    state,
                    member as u64,
                    round,
                    wire(ordinal),
                    AckOutcome::Stale,
                    Some("trained on an update the loss rule then refused".into()),
                );
                state.stale_updates.fetch_add(1, Ordering::Relaxed);
                let detail = format!(
                    "client {member} hop {}: trained on a refused update",
                    wire(ordinal)
                );
                state.record(|store, run| store.event(run, Some(round), "discard", &detail));
            }
            Effect::Skipped {
                member,
                ordinal,
                reason,
            } => {
                state.status().skipped_hops += 1;
                tracing::warn!(
                    client = member,
                    round,
                    hop = ordinal,
                    "hop skipped: {reason}"
                );
                let detail = format!("client {member} hop {}: {reason}", wire(ordinal));
                state.record(|store, run| store.event(run, Some(round), "skip", &detail));
            }
            Effect::Judge(judgement) => {
                let Some(check) = state.loss_check.clone() else {
                    continue;
                };
                let ordinal = judgement.ordinal;
                let verdict = tokio::task::spawn_blocking(move || judgement.judge(&check));
                *judging = Some((ordinal, verdict));
            }
        }
    }
}

/// Tells `member` what became of its update for `hop`.
fn send_ack(
    state: &AppState,
    member: u64,
    round: u32,
    hop: u32,
    outcome: AckOutcome,
    reason: Option<String>,
) {
    if let Some(entry) = state.clients().get_mut(&member) {
        entry.send(&ServerMessage::Ack {
            round,
            hop,
            outcome,
            reason,
        });
    }
}

/// Sends one task and waits for its update: at most the client's hop
/// deadline (from its speed, see [`hop_deadline`]), and at most the stall
/// timeout after its last sign of life (the task, a `progress`, the update
/// or one of its chunks), so a frozen client costs its chain seconds, not
/// the whole deadline, while a slow one that keeps reporting progress gets
/// its time.
async fn run_hop(
    state: &AppState,
    client: u64,
    mut task: TaskSpec,
    weights: &[f32],
) -> Result<HopAnswer, String> {
    let frames = encode_chunks(
        task.round,
        task.hop,
        weights,
        task.encoding,
        state.config.max_frame_bytes,
    );
    task.chunks = frames.len() as u32;
    let stall = state.config.stall_timeout;
    task.stall_ms = (!stall.is_zero()).then_some(stall.as_millis() as u64);
    let (reply_tx, mut reply_rx) = oneshot::channel();
    let started = Instant::now();
    let deadline = {
        let mut clients = state.clients();
        let entry = clients
            .get_mut(&client)
            .ok_or("client left before its hop")?;
        // It said it is pausing since it was drawn (or this is its next
        // pass): skipped without waiting.
        if entry.paused {
            return Err(PAUSED.into());
        }
        let work = entry.samples.saturating_mul(task.epochs as u64);
        let deadline = hop_deadline(entry.speed, work, state.tunable().hop_deadline());
        task.deadline_ms = deadline.as_millis() as u64;
        entry.pending = Some(Pending {
            round: task.round,
            hop: task.hop,
            reply: reply_tx,
            sent: Arc::new(weights.to_vec()),
            alive: started,
            masked: task.secure_weight.is_some(),
        });
        entry.send(&ServerMessage::Task(task.clone()));
        for frame in frames {
            let _ = entry.tx.send(Outbound::Binary(frame));
        }
        deadline
    };
    let timer = HopTimer { deadline, stall };
    // The last sign of life of this hop, as an offset from the task;
    // `None` once the pending hop is gone (the update arrived, or the
    // client left).
    let alive = || {
        state
            .clients()
            .get(&client)
            .and_then(|e| e.pending.as_ref())
            .filter(|p| (p.round, p.hop) == (task.round, task.hop))
            .map(|p| p.alive.saturating_duration_since(started))
    };
    loop {
        match timer.poll(started.elapsed(), alive()) {
            HopWait::Until(at) => {
                match tokio::time::timeout_at((started + at).into(), &mut reply_rx).await {
                    Ok(Ok(reply)) => return Ok(reply),
                    Ok(Err(_)) => {
                        let paused = state.clients().get(&client).is_some_and(|e| e.paused);
                        return Err(if paused {
                            PAUSED.into()
                        } else {
                            "client left or gave up during its hop".into()
                        });
                    }
                    // Time to ask the timer again.
                    Err(_) => {}
                }
            }
            HopWait::GiveUp { reason, silent } => {
                // Silent: not drawn again until it speaks. Late while at
                // work: a strike in its standing (engine::draw::Standing).
                if let Some(entry) = state.clients().get_mut(&client) {
                    entry.pending = None;
                    entry.silent |= silent;
                    if !silent {
                        entry.standing.late(task.round);
                    }
                }
                return Err(reason);
            }
        }
    }
}
