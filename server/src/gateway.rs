//! A gateway (`astraea serve --store postgres://… --gateway`): a server of a
//! run that never leads it. It holds volunteers (page, WebSocket, API,
//! dashboard, as any server) and, each round, trains the share of the
//! participants the leader placed on it: it draws them from its own ready
//! clients, forms their mediators with the run's strategy, runs the chains
//! (the same `coordinator::run_chain` the leader runs, every hop judged by
//! its own update guard) and gives back one partial
//! ([`astraea_core::engine::hierarchy::partial`]) through the store
//! ([`crate::store::gateways`]). When the leader has recorded the round,
//! the gateway tells its clients (`round-done`).
//!
//! A gateway's clients never notice the leader changing: the new leader
//! places the round again, and the gateway takes it. When a gateway dies,
//! the leader stops waiting for it once its heartbeat is 3 s old; its
//! clients come back through the load balancer, spread over the window
//! they were told (pace steering).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use astraea_core::engine::declared::Declared;
use astraea_core::engine::hierarchy;
use astraea_core::engine::seeds;
use astraea_core::protocol::ServerMessage;
use astraea_core::strategy::{GroupFailure, GroupResult, Strategy};
use astraea_core::weights::Weights;
use futures_util::future::join_all;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::state::{AppState, Phase, lock};
use crate::store::PgStore;
use crate::store::gateways::{Answer, GatewaySeen, Heartbeat, Traffic, Work};
use crate::store::outage::Outage;

/// How often a gateway says it is alive (and how many clients it has
/// ready); the leader reads the gateways at most this often while it
/// waits.
pub const GATEWAY_TICK: Duration = Duration::from_millis(250);

/// How long an idle gateway, or the leader waiting for partials, waits
/// for the listener's wake-up ([`crate::store::listen`]: the work placed,
/// a partial given back, a round recorded) before it reads the work again
/// anyway: a wake-up lost with a connection costs at most this.
pub const WORK_FALLBACK: Duration = Duration::from_millis(500);

/// Runs `f` on the store off the async threads.
async fn blocking<R: Send + 'static>(
    link: &Arc<PgStore>,
    f: impl FnOnce(&PgStore) -> Result<R, crate::store::StoreError> + Send + 'static,
) -> Result<R, crate::store::StoreError> {
    let link = link.clone();
    tokio::task::spawn_blocking(move || f(&link))
        .await
        .unwrap_or(Err(crate::store::StoreError::Panicked))
}

/// What this gateway's heartbeat says, read in one go under the
/// clients' lock (a plan adopted and its clients' counts cleared are
/// seen together, `coordinator::adopt_plan`): ready clients (none while
/// its admin pauses it), all clients, whether it holds the run's plan,
/// and, while a run that plans has none, its clients' first reports
/// ([`crate::coordinator::declared_of`]).
/// A gateway's heartbeat, as [`heartbeat_of`] reads it.
struct Beat {
    ready: usize,
    clients: usize,
    planned: bool,
    declared: Option<Declared>,
    /// Its ready clients' totals, counted (`AppState::counted_totals`).
    totals: Vec<(u64, u64)>,
}

fn heartbeat_of(state: &AppState) -> Beat {
    let clients = state.clients();
    let ready = crate::coordinator::ready_among(&clients);
    let planned = state.status().plan.is_some();
    let declared = (!planned && state.config.plans_augmentation())
        .then(|| crate::coordinator::declared_of(&clients));
    Beat {
        ready: if state.control().paused { 0 } else { ready },
        clients: clients.len(),
        planned,
        declared,
        totals: AppState::counted_totals(&clients),
    }
}

/// Adopts the run's augmentation plan once its leader made one
/// (`coordinator::send_plan` keeps it in the store): this gateway's
/// clients are sent it, and report again before they are drawn. A plan
/// that does not fit the model is left (logged).
fn take_plan(state: &AppState, ratios: Option<Vec<f64>>) {
    let Some(ratios) = ratios else {
        return;
    };
    let classes = state.model.num_classes;
    if ratios.len() != classes || ratios.iter().any(|r| !r.is_finite() || *r < 0.0) {
        // Said once: read again every second, it would say it again.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::error!(
                ?ratios,
                "gateway: the run's augmentation plan does not fit the model ({classes} classes); its clients are not drawn until it does"
            )
        });
        return;
    }
    crate::coordinator::adopt_plan(state, &ratios);
    tracing::info!(?ratios, "gateway: data plan received");
}

/// Serves as gateway `name` of the run until the admin stops it:
/// heartbeats, takes the work the leader places on it, trains it, gives
/// back the partial, and forwards the leader's round results to its
/// clients. `initial` is the run's initial model (its shape checks the
/// leader's).
pub async fn run(
    state: Arc<AppState>,
    (link, heartbeat_link): (Arc<PgStore>, Arc<PgStore>),
    (name, block): (String, u64),
    initial: Weights,
) -> anyhow::Result<()> {
    let config = &state.config;
    let strategy: Arc<dyn Strategy> = Arc::from(config.strategy.build(&config.settings));
    let run = config.run_name.clone();
    *lock(&state.global) = Some(Arc::new(initial.clone()));
    state.status().phase = Phase::Waiting;
    // The heartbeat goes on while chains run, on a connection of its own
    // (a model's blob on the other must not make it late): a gateway
    // training a long round is alive. It says no client is ready while
    // its admin pauses it. (Which round it trains, the store keeps with
    // its taking and giving back: `busy_round`.)
    let fingerprint = config.training_fingerprint();
    let heartbeat = {
        let (state, link, run, name) = (state.clone(), heartbeat_link, run.clone(), name.clone());
        let fingerprint = fingerprint.clone();
        tokio::spawn(async move {
            let mut outage = Outage::new("gateway heartbeat");
            // The totals last written: sent again only when they change
            // (the row keeps them).
            let mut sent: Option<Vec<(u64, u64)>> = None;
            let mut sent_declared: Option<Option<Declared>> = None;
            loop {
                let beat = heartbeat_of(&state);
                let (run, name, fingerprint) = (run.clone(), name.clone(), fingerprint.clone());
                let changed = (sent.as_ref() != Some(&beat.totals)).then(|| beat.totals.clone());
                let written = changed.clone();
                let declared_changed = sent_declared.as_ref() != Some(&beat.declared);
                let declared_now = beat.declared.clone();
                let result = blocking(&link, move |l| {
                    let heartbeat = Heartbeat {
                        ready: beat.ready,
                        clients: beat.clients,
                        config: &fingerprint,
                        declared: beat.declared.as_ref(),
                        declared_changed,
                        planned: beat.planned,
                        totals: written.as_deref(),
                    };
                    l.gateway_heartbeat((&run, &name), heartbeat)
                })
                .await;
                if outage.note(result).is_some() {
                    if changed.is_some() {
                        sent = changed;
                    }
                    sent_declared = Some(declared_now);
                }
                tokio::time::sleep(GATEWAY_TICK).await;
            }
        })
    };
    let _stop_heartbeat = AbortOnDrop(heartbeat);
    // Its clients that resume on another server of the run are let go.
    let _stop_watching = AbortOnDrop(tokio::spawn(crate::state::watch_moves(state.clone())));
    // Woken when the run's work moves; made before the first read, so
    // nothing that moves after it is missed.
    let mut waker = state.wakes.as_ref().map(|w| w.waker());
    // Rounds trained here whose outcome the clients have not heard yet.
    let mut awaiting: Vec<u32> = Vec::new();
    let mut looked = std::time::Instant::now() - Duration::from_secs(60);
    let mut run_read = Outage::new("gateway: reading the run");
    let mut outcome_read = Outage::new("gateway: reading the leader's round");
    let mut work_read = Outage::new("gateway: looking for work");
    while !state.control().stopped {
        // Every second: the federation as the store has it (every
        // gateway, the leader's last round), for this gateway's pages.
        if looked.elapsed() >= Duration::from_secs(1) {
            looked = std::time::Instant::now();
            let run = run.clone();
            let known = state.run_id.load(std::sync::atomic::Ordering::Relaxed) != 0;
            let plan_wanted = state.config.plans_augmentation() && state.status().plan.is_none();
            let read = blocking(&link, move |l| {
                let id = if known { None } else { l.run_id(&run)? };
                let plan = if plan_wanted { l.run_plan(&run)? } else { None };
                Ok((l.live_gateways(&run)?, l.last_round(&run)?, id, plan))
            })
            .await;
            if let Some((gateways, last, id, plan)) = run_read.note(read) {
                take_plan(&state, plan);
                // The run's id, once a leader created it: this gateway's
                // clients are recorded under it from then on.
                if let Some(id) = id {
                    state
                        .run_id
                        .store(id as u64, std::sync::atomic::Ordering::Relaxed);
                }
                let mut status = state.status();
                status.gateways = gateways;
                status.leader_round = last;
            }
        }
        if let Some(&round) = awaiting.first() {
            let run = run.clone();
            let read = blocking(&link, move |l| l.round_outcome(&run, round)).await;
            if let Some((outcome, finished)) = outcome_read.note(read) {
                if let Some((accuracy, loss, epsilon)) = outcome {
                    awaiting.remove(0);
                    let done = ServerMessage::RoundDone {
                        round,
                        accuracy,
                        loss,
                        epsilon: epsilon.filter(|e| e.is_finite()),
                        rejoin_within_ms: Some(state.rejoin_within_ms(0)),
                        // The run finished, and no later round is awaited.
                        last: finished && awaiting.is_empty(),
                    };
                    for entry in state.clients().values() {
                        entry.send(&done);
                    }
                } else if finished {
                    awaiting.clear();
                }
                if finished {
                    state.status().phase = Phase::Finished;
                }
            }
        }
        let (run_, name_) = (run.clone(), name.clone());
        let taken = blocking(&link, move |l| l.take_work(&run_, &name_)).await;
        if let Some(Some(work)) = work_read.note(taken) {
            let round = work.round;
            train(
                &state,
                strategy.as_ref(),
                (&link, &name, block),
                work,
                &initial,
            )
            .await;
            awaiting.retain(|&r| r < round);
            awaiting.push(round);
            continue;
        }
        until_moved(&mut waker, WORK_FALLBACK).await;
    }
    Ok(())
}

/// Waits until the run's work moves (the listener's wake-up), or
/// [`WORK_FALLBACK`] or `at_most` passes; the caller reads the work again
/// either way.
async fn until_moved(waker: &mut Option<crate::store::listen::Waker>, at_most: Duration) {
    let at_most = at_most.min(WORK_FALLBACK);
    match waker {
        Some(waker) => {
            waker.wait(at_most).await;
        }
        None => tokio::time::sleep(at_most).await,
    }
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a gateway gives back, owned (see [`Answer`]).
#[derive(Debug, Default)]
struct Owed {
    partial: Option<(Vec<f32>, u64)>,
    each: Vec<u64>,
    largest: u64,
    mediators: u64,
    failures: u64,
    detail: Option<String>,
}

impl Owed {
    /// Nothing given back, for `detail`.
    fn nothing(detail: String) -> Self {
        Self {
            detail: Some(detail),
            ..Self::default()
        }
    }
}

/// What this gateway gives back of its mediators' `results` (and
/// `failures`) from `model`: their partial where the run's rounds fold
/// ([`hierarchy::partial`]), or, where the run's rule needs every result
/// in one place (a robust rule, client-level DP:
/// `ServeConfig::gateways_give_back_every_result`), each usable result
/// ([`hierarchy::usable`]) laid end to end with its samples. `largest`:
/// its largest mediator.
fn owed(
    every: bool,
    model: &[f32],
    (results, failures): (&[GroupResult], &[GroupFailure]),
    largest: usize,
) -> Owed {
    let (partial, each) = if every {
        let usable = hierarchy::usable(model, results);
        let each: Vec<u64> = usable.iter().map(|r| r.samples).collect();
        let laid: Vec<f32> = usable
            .iter()
            .flat_map(|r| r.weights.iter().copied())
            .collect();
        let partial = (!usable.is_empty()).then(|| (laid, each.iter().sum()));
        (partial, each)
    } else {
        let partial = hierarchy::partial(model, results, 0).map(|p| (p.weights, p.samples));
        (partial, Vec::new())
    };
    let detail = match (&partial, failures.first()) {
        (Some(_), _) => None,
        (None, Some(failure)) => Some(format!("no mediator came back: {}", failure.reason)),
        (None, None) if results.is_empty() => Some("no client drawn".to_string()),
        (None, None) => Some("no mediator's result fits the model".to_string()),
    };
    Owed {
        partial,
        each,
        largest: largest as u64,
        mediators: results.len() as u64,
        failures: failures.len() as u64,
        detail,
    }
}

/// This server's running totals: samples trained, bytes received, bytes
/// sent.
fn totals(state: &AppState) -> Traffic {
    use std::sync::atomic::Ordering::Relaxed;
    Traffic {
        trained: state.train_samples.load(Relaxed),
        bytes_up: state.bytes_up.load(Relaxed),
        bytes_down: state.bytes_down.load(Relaxed),
    }
}

/// Trains `work` on this gateway's clients and gives back its partial.
async fn train(
    state: &Arc<AppState>,
    strategy: &dyn Strategy,
    (link, name, block): (&Arc<PgStore>, &str, u64),
    work: Work,
    initial: &Weights,
) {
    let Work {
        round,
        term,
        participants,
        model,
        config,
        hop_deadline_s,
        cap,
    } = work;
    // The run's cap on an own-data client's word, as the leader took it
    // over every server's clients: this gateway's draw and weights take
    // it instead of its own clients' (None from a leader that places
    // none: its own).
    state.run_cap.store(
        cap.unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
    // The leader's hop deadline now (its admin may have moved it), within
    // the bounds any deadline keeps.
    if astraea_core::engine::hop::hop_limit("the leader's hop deadline", hop_deadline_s, false)
        .is_ok()
    {
        lock(&state.tunable).hop_deadline_s = hop_deadline_s;
    }
    // What this share costs: the totals' growth from taking the work to
    // giving it back.
    let before = totals(state);
    let give_back = |answer: Owed| {
        let (link, run, name) = (
            link.clone(),
            state.config.run_name.clone(),
            name.to_string(),
        );
        let now = totals(state);
        let traffic = Traffic {
            trained: now.trained.saturating_sub(before.trained),
            bytes_up: now.bytes_up.saturating_sub(before.bytes_up),
            bytes_down: now.bytes_down.saturating_sub(before.bytes_down),
        };
        async move {
            let with_partial = answer.partial.is_some();
            let (mediators, failures) = (answer.mediators, answer.failures);
            // Tried three times, a second apart (the store's call also
            // reconnects once): the same answer again is taken once.
            let answer = Arc::new(answer);
            let mut given = Err(crate::store::StoreError::Closed);
            for attempt in 0..3 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let (run, name) = (run.clone(), name.clone());
                let owed = answer.clone();
                given = blocking(&link, move |l| {
                    let answer = Answer {
                        partial: owed.partial.as_ref().map(|(w, n)| (w.as_slice(), *n)),
                        each: &owed.each,
                        largest: owed.largest,
                        mediators: owed.mediators,
                        failures: owed.failures,
                        detail: owed.detail.as_deref(),
                        traffic,
                    };
                    l.give_back_work(&run, &name, (round, term), answer)
                })
                .await;
                if given.is_ok() {
                    break;
                }
            }
            match given {
                Ok(true) if with_partial => {
                    tracing::info!(round, mediators, failures, "gateway: partial given back")
                }
                Ok(true) => tracing::warn!(round, "gateway: gave back no partial"),
                Ok(false) => tracing::warn!(
                    round,
                    "gateway: the leader no longer waits for this round (closed, or placed again by a new leader); the partial does not count"
                ),
                Err(e) => tracing::error!(round, "gateway: giving back the partial: {e}"),
            }
        }
    };
    let ours = state.config.training_fingerprint();
    let differs = if config != ours {
        Some(format!(
            "this gateway's training settings differ from the leader's (fingerprint {} against {}): start it with the leader's flags",
            &ours[..12.min(ours.len())],
            &config[..12.min(config.len())]
        ))
    } else if model.len() != initial.values.len() {
        Some(format!(
            "the leader's model has {} weights, this gateway's {}",
            model.len(),
            initial.values.len()
        ))
    } else {
        None
    };
    if let Some(detail) = differs {
        tracing::error!("{detail}");
        give_back(Owed::nothing(detail)).await;
        return;
    }
    *lock(&state.global) = Some(Arc::new(Weights {
        shapes: initial.shapes.clone(),
        values: model.clone(),
    }));
    // Seeded per round and gateway, as the leader's draw is per round.
    // Seeded by its block of ids, not its pid or port: a run repeats.
    let mut rng = StdRng::seed_from_u64(seeds::round_draw(
        state.config.seed ^ block.rotate_left(32),
        round,
    ));
    let drawn = crate::coordinator::pick_participants(
        state,
        participants,
        &mut rng,
        &HashSet::new(),
        round,
    );
    let plan = strategy.configure_round(&drawn);
    {
        let mut status = state.status();
        status.phase = Phase::Training;
        status.round = round;
        status.mediators = plan
            .groups
            .iter()
            .map(|g| crate::coordinator::mediator_status(g, &drawn))
            .collect();
        status.round_started = Some(std::time::Instant::now());
    }
    let mediators = plan.groups.len() as u32;
    let chains = plan.groups.iter().enumerate().map(|(index, group)| {
        crate::coordinator::run_chain(
            state.clone(),
            index,
            index as u64,
            group.clone(),
            round,
            mediators,
            model.clone(),
            plan.prox_mu,
            None,
        )
    });
    let (mut results, mut failures) = (Vec::new(), Vec::new());
    for outcome in join_all(chains).await {
        match outcome {
            Ok(result) => results.push(result),
            Err(failure) => failures.push(failure),
        }
    }
    // The guard's median moves between rounds, as the leader's does.
    state.guard.settle();
    {
        let mut status = state.status();
        status.phase = Phase::Waiting;
        let _ = std::mem::take(&mut status.round_hops);
    }
    let every = state.config.gateways_give_back_every_result();
    let largest = astraea_core::engine::round::largest_group(&plan.groups);
    give_back(owed(every, &model, (&results, &failures), largest)).await;
}

/// The leader's side: the gateways it can place work on this round (none
/// without a link to them), as the dashboard shows them too.
pub(crate) async fn live(state: &AppState, fresh: bool) -> Vec<GatewaySeen> {
    let Some(link) = &state.hierarchy else {
        return Vec::new();
    };
    // Unless `fresh` (a round about to be split), read at most every
    // GATEWAY_TICK (a burst of joins wakes the leader's wait once per
    // join).
    if !fresh {
        let status = state.status();
        if status
            .gateways_read
            .is_some_and(|at| at.elapsed() < GATEWAY_TICK)
        {
            return without_unplanned(&status, status.gateways.clone());
        }
    }
    let run = state.config.run_name.clone();
    let read = blocking(link, move |l| l.live_gateways(&run)).await;
    let Some(mut seen) = lock(&state.gateways_read).note(read) else {
        // The store away: the last view stands (a round is not closed on
        // the gateways for want of a read).
        let status = state.status();
        return without_unplanned(&status, status.gateways.clone());
    };
    let mut status = state.status();
    status.gateways_read = Some(std::time::Instant::now());
    // A run whose rounds do not fold across gateways places nothing on
    // them; said once, loudly, rather than silently leaving them idle.
    if let Err(why) = state.config.across_gateways() {
        if !seen.is_empty() && !status.gateways_refused {
            status.gateways_refused = true;
            tracing::error!(
                gateways = seen.len(),
                "gateways of this run are left idle: {why}"
            );
        }
        seen.clear();
    }
    // A gateway started with other training flags gets no share (said
    // once for each); the work it would refuse is not placed.
    let ours = state.config.training_fingerprint();
    seen.retain(|g| {
        let same = g.config == ours;
        if !same && status.gateways_mismatched.insert(g.name.clone()) {
            tracing::error!(
                gateway = %g.name,
                "this gateway's training settings differ from the leader's: it gets no share; start it with the leader's flags"
            );
        }
        same
    });
    let seen = without_unplanned(&status, seen);
    status.gateways = seen.clone();
    seen
}

/// `seen` with no ready client on a gateway that does not hold the run's
/// augmentation plan yet, once this leader made one: its clients have
/// not been sent the plan (they would train without it). Applied to every
/// view the leader counts by, fresh or kept.
fn without_unplanned(
    status: &crate::state::RunStatus,
    mut seen: Vec<GatewaySeen>,
) -> Vec<GatewaySeen> {
    if status.plan.is_some() {
        for gateway in seen.iter_mut().filter(|g| !g.planned) {
            gateway.ready = 0;
        }
    }
    seen
}

/// How long a gateway heard from has to take the work placed on it before
/// the leader stops waiting for it.
pub const UNTAKEN_WAIT: Duration = Duration::from_secs(2);

/// Work placed on gateways for one round, to gather.
pub(crate) struct Placed {
    round: u32,
    term: i64,
    /// When the leader stops waiting for a partial.
    deadline: std::time::Instant,
}

/// The clients the leader may draw on gateway `g` this round: what it
/// says is ready, bounded by what it holds and by a million; none while it
/// still trains an earlier round (late: its partial will be refused),
/// rather than more work it cannot start. The one count both the wait for
/// enough clients and the split go by.
pub(crate) fn drawable(g: &GatewaySeen) -> usize {
    match g.busy_round {
        Some(_) => 0,
        None => g.ready.min(g.clients).min(1 << 20) as usize,
    }
}

/// Splits the round's `c` participants between this leader (`own_ready`
/// ready clients) and `gateways` by [`hierarchy::shares`]: the leader's
/// share, and each gateway's (gateways with none left out).
pub(crate) fn split(
    c: usize,
    own_ready: usize,
    gateways: &[GatewaySeen],
) -> (usize, Vec<(String, usize)>) {
    if gateways.is_empty() {
        return (c, Vec::new());
    }
    let mut ready = vec![own_ready];
    ready.extend(gateways.iter().map(drawable));
    let shares = hierarchy::shares(c, &ready);
    let placed = gateways
        .iter()
        .zip(&shares[1..])
        .filter(|(_, share)| **share > 0)
        .map(|(g, share)| (g.name.clone(), *share))
        .collect();
    (shares[0], placed)
}

/// Places round `round`'s `shares` on the gateways, to train from
/// `global`; `None` when there is nothing to place.
///
/// # Errors
/// The lease was taken: this server leads no more and must stop.
pub(crate) async fn place(
    state: &AppState,
    round: u32,
    global: &[f32],
    shares: Vec<(String, usize)>,
) -> anyhow::Result<Option<Placed>> {
    let (Some(link), Some(lease)) = (&state.hierarchy, &state.lease) else {
        return Ok(None);
    };
    if shares.is_empty() {
        return Ok(None);
    }
    let term = lease.term();
    let tunable = state.tunable();
    let rescheduling = &state.config.settings.rescheduling;
    let most = shares.iter().map(|(_, s)| *s).max().unwrap_or(1);
    // The longest chain a gateway can form, each hop at the deadline.
    let hops = most.min(rescheduling.gamma.max(1)) * rescheduling.passes.max(1);
    let deadline = std::time::Instant::now()
        + tunable.hop_deadline().mul_f64(hops as f64)
        + Duration::from_secs(10);
    let (run, model) = (state.config.run_name.clone(), global.to_vec());
    let config = state.config.training_fingerprint();
    let hop_deadline_s = tunable.hop_deadline_s;
    let cap = match state.run_cap.load(std::sync::atomic::Ordering::Relaxed) {
        u64::MAX => None,
        cap => Some(cap),
    };
    let placing = shares.clone();
    match blocking(link, move |l| {
        let placement = crate::store::gateways::Placement {
            model: &model,
            config: &config,
            hop_deadline_s,
            cap,
        };
        l.place_work(&run, (round, term), placement, &placing)
    })
    .await
    {
        Ok(()) => {
            tracing::info!(round, gateways = ?shares, "round placed on gateways");
            Ok(Some(Placed {
                round,
                term,
                deadline,
            }))
        }
        Err(refused @ crate::store::StoreError::Fenced { .. }) => Err(refused.into()),
        Err(e) => {
            tracing::error!(
                round,
                "placing the round on gateways: {e}; trained here only"
            );
            Ok(None)
        }
    }
}

/// A gateway's results (`given`, from `global`), each judged on its own
/// as a hop would be (the guard's bounds and its largest move): one
/// result's fault costs that result, not the gateway's others (under DP,
/// one client moves the noised sum by its own clipped result only) nor
/// the model. The kept ones, and one failure for each refused one.
fn judged(
    guard: &astraea_core::guard::UpdateGuard,
    global: &[f32],
    gateway: &str,
    given: Vec<GroupResult>,
) -> (Vec<GroupResult>, Vec<GroupFailure>) {
    let (mut kept, mut refused) = (Vec::new(), Vec::new());
    for result in given {
        match guard.check_aggregate(global, &result.weights, 0.0) {
            Ok(_) => kept.push(result),
            Err(refusal) => refused.push(GroupFailure {
                group: result.group,
                reason: format!(
                    "gateway {gateway}: its result {} was refused: {refusal}",
                    result.group
                ),
            }),
        }
    }
    (kept, refused)
}

/// The gateways' part of a round, as [`gather`] folds it.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    /// Their results: one partial each, or each of their mediators'
    /// results where the run's rule needs every result.
    pub results: Vec<GroupResult>,
    /// One failure per gateway that gave back nothing usable, and one
    /// per result refused.
    pub failures: Vec<GroupFailure>,
    /// The most clients in one of their mediators (0: none).
    pub largest: usize,
}

/// Waits for the gateways' partials of `placed` — until every gateway has
/// given back, or those that have not are no longer heard from, or the
/// deadline — then folds them: their results numbered from `first_group`
/// (one per partial, or each mediator's where the run's rule needs every
/// result), one failure per gateway without one and one per result
/// refused ([`judged`]).
///
/// # Errors
/// The lease was taken: this server leads no more and must stop.
pub(crate) async fn gather(
    state: &AppState,
    placed: Option<Placed>,
    (global, first_group): (&[f32], usize),
) -> anyhow::Result<Gathered> {
    let (Some(placed), Some(link)) = (placed, &state.hierarchy) else {
        return Ok(Gathered::default());
    };
    let key = (placed.round, placed.term);
    let run = state.config.run_name.clone();
    let mut waker = state.wakes.as_ref().map(|w| w.waker());
    // The database away: wait on, until the deadline.
    let mut outage = Outage::new("reading the gateways' work");
    while std::time::Instant::now() < placed.deadline {
        let r = run.clone();
        let read = blocking(link, move |l| l.work_outstanding(&r, key)).await;
        if let Some(outstanding) = outage.note(read) {
            let alive = live(state, false).await;
            // Waited for: a live gateway that took its work, or one
            // that has had under 2 s to take it (it is woken when the
            // work is placed, and looks at least every 500 ms).
            let awaited = |o: &crate::store::gateways::Outstanding| {
                alive.iter().any(|seen| seen.name == o.gateway)
                    && (o.taken || o.waiting_s < UNTAKEN_WAIT.as_secs_f64())
            };
            if !outstanding.iter().any(awaited) {
                break;
            }
        }
        // Never past the deadline, nor past a gateway's 3 s of silence by
        // more than the fallback.
        let left = placed
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        until_moved(&mut waker, left).await;
    }
    let folded = match blocking(link, move |l| l.fold_work(&run, key)).await {
        Ok(folded) => folded,
        Err(refused @ crate::store::StoreError::Fenced { .. }) => return Err(refused.into()),
        Err(e) => {
            tracing::error!(round = placed.round, "folding the gateways' partials: {e}");
            Vec::new()
        }
    };
    let (mut results, mut failures) = (Vec::new(), Vec::new());
    let (mut largest, mut answered) = (0usize, 0usize);
    let mut group = first_group;
    let placed_on = folded.len();
    for folded in folded {
        // What the gateway's share cost joins this server's totals, so
        // the round's record counts the whole federation's training and
        // traffic.
        {
            use std::sync::atomic::Ordering::Relaxed;
            state
                .train_samples
                .fetch_add(folded.traffic.trained, Relaxed);
            state.bytes_up.fetch_add(folded.traffic.bytes_up, Relaxed);
            state
                .bytes_down
                .fetch_add(folded.traffic.bytes_down, Relaxed);
        }
        // One partial, or every result of the gateway's mediators laid
        // end to end (a run whose rule needs them all: a bare partial is
        // not what it asked for).
        let every = state.config.gateways_give_back_every_result();
        let given: Result<Vec<GroupResult>, String> = match folded.partial {
            None => Err(folded.detail.unwrap_or_default()),
            Some(_) if every && folded.each.is_empty() => {
                Err("it gave back one partial where the run's rule needs every result".into())
            }
            Some((weights, samples)) if folded.each.is_empty() => Ok(vec![GroupResult {
                group,
                weights,
                samples,
            }]),
            Some((weights, _)) => hierarchy::split_laid(weights, &folded.each, global.len(), group)
                .ok_or_else(|| {
                    format!(
                        "its {} results do not fit the model's {} weights",
                        folded.each.len(),
                        global.len()
                    )
                }),
        };
        let given = match given {
            Ok(given) => given,
            Err(detail) => {
                let reason = format!("gateway {}: {detail}", folded.gateway);
                tracing::warn!(round = placed.round, "{reason}");
                failures.push(GroupFailure { group, reason });
                group = first_group + results.len() + failures.len();
                continue;
            }
        };
        answered += 1;
        largest = largest.max(usize::try_from(folded.largest).unwrap_or(usize::MAX));
        let (kept, refused) = judged(&state.guard, global, &folded.gateway, given);
        for failure in &refused {
            tracing::warn!(round = placed.round, "{}", failure.reason);
        }
        results.extend(kept);
        failures.extend(refused);
        // Each result and each failure holds one number.
        group = first_group + results.len() + failures.len();
    }
    tracing::info!(
        round = placed.round,
        "gateways' partials folded: {answered} of {placed_on} ({} results)",
        results.len()
    );
    Ok(Gathered {
        results,
        failures,
        largest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_result_of_a_gateway_costs_itself_not_the_gateways_others() {
        // The bug: one result past the guard's bounds dropped every result
        // the gateway gave back (under DP, one client then moved the sum
        // by its whole gateway's share).
        let guard = astraea_core::guard::UpdateGuard::new(2.0, 3.0, 10, 3);
        let global = vec![1.0f32; 4];
        let result = |group: usize, v: f32| GroupResult {
            group,
            weights: vec![v; 4],
            samples: 10,
        };
        let given = vec![result(7, 1.1), result(8, 1.0e9), result(9, 0.9)];

        let (kept, refused) = judged(&guard, &global, "g", given);

        assert_eq!(kept.iter().map(|r| r.group).collect::<Vec<_>>(), vec![7, 9]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].group, 8);
        assert!(
            refused[0].reason.starts_with("gateway g: its result 8"),
            "{}",
            refused[0].reason
        );
    }
}
