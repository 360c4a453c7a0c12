//! The operator's dashboard: the page (`/dashboard`, built into the binary so
//! it works before `scripts/build-web`), its live feed over a WebSocket
//! (`/ws/dashboard`: a snapshot of the run every second and at once when
//! clients come or go), and the join URL as a QR code (`/api/join-qr.svg`)
//! for people joining from their phones.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use axum::extract::{State, WebSocketUpgrade};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;

use crate::state::{AppState, MediatorStatus, Phase, Tunable};
use astraea_core::metrics::RoundRecord;

/// One connected client as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientStatus {
    /// Its id.
    pub id: u64,
    /// `flex` (CPU), `webgpu`, or what a native client named.
    pub backend: String,
    /// Samples it holds (after the plan), once it said.
    pub samples: Option<usize>,
    /// Whether it is training a hop now.
    pub training: bool,
    /// Whether it said it is pausing (a frozen tab, a locked phone).
    pub paused: bool,
    /// Hops it has answered.
    pub hops: u64,
    /// Samples it has trained on, over all hops and epochs.
    pub samples_trained: u64,
}

/// Clients listed by name; the rest are only counted (a demo may hold
/// thousands).
const LISTED_CLIENTS: usize = 200;

/// What `/api/status` answers and the dashboard shows.
#[derive(Debug, Serialize)]
pub struct StatusBody {
    /// Phase of the run.
    pub phase: Phase,
    /// Strategy.
    pub strategy: String,
    /// Who forms the mediators, as `--scheduler` names it (`learned` for
    /// a trained policy).
    pub scheduler: String,
    /// The term of the run's lease this server leads at: 1 for a run's
    /// first leader, one more at each takeover (PostgreSQL stores only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_term: Option<i64>,
    /// The servers sharing the run, the leader and those waiting to take
    /// over, with their roles and how long ago each said so (PostgreSQL
    /// stores only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub servers: Option<Vec<crate::store::lease::ServerSeen>>,
    /// The run's gateways the leader last heard from, with their ready
    /// clients (leaders of runs with gateways only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<crate::store::gateways::GatewaySeen>,
    /// This server's name as a gateway of the run (`--gateway`); absent on
    /// a leader or a server alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// On a gateway: the last round the run's leader recorded, and its
    /// accuracy (the federation's, where this server's own `round` is the
    /// last it trained a share of).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_round: Option<u32>,
    /// On a gateway: the accuracy of `leader_round`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_accuracy: Option<f64>,
    /// `sync` rounds or the `async` mode (then a round is a global version).
    pub mode: String,
    /// What volunteers' reports reveal: the label epsilon per count
    /// report, when label privacy is on (`{}` when nothing is asked).
    pub privacy: astraea_core::protocol::PrivacySpec,
    /// Client-level DP on the model: epsilon spent so far at
    /// `model_delta` (`None`: the model is not trained under DP).
    pub model_epsilon: Option<f64>,
    /// The budget at which the run stops.
    pub model_budget: Option<f64>,
    /// The delta of the model's guarantee.
    pub model_delta: Option<f64>,
    /// The clip of the next DP round (L2; it moves under adaptive
    /// clipping).
    pub model_clip: Option<f64>,
    /// Current round.
    pub round: u32,
    /// Rounds planned.
    pub rounds: u32,
    /// Connected clients.
    pub clients: usize,
    /// Clients ready to train.
    pub ready: usize,
    /// Connected clients by backend.
    pub backends: BTreeMap<String, usize>,
    /// The first connected clients, by id.
    pub client_list: Vec<ClientStatus>,
    /// The current round's mediators: members, label mix, KL, progress.
    pub mediators: Vec<MediatorStatus>,
    /// The augmentation plan, once computed.
    pub plan: Option<Vec<f64>>,
    /// Accuracy after the last finished round.
    pub accuracy: Option<f64>,
    /// Best accuracy so far.
    pub best_accuracy: Option<f64>,
    /// Hops skipped so far.
    pub skipped_hops: u64,
    /// Frames refused so far.
    pub rejections: u64,
    /// Bytes received from clients.
    pub bytes_up: u64,
    /// Bytes sent to clients.
    pub bytes_down: u64,
    /// Share of the current round's hops done, in `[0, 1]`.
    pub round_progress: f64,
    /// Seconds the current round has run.
    pub round_elapsed_s: f64,
    /// Estimated seconds until the last round ends.
    pub eta_s: Option<f64>,
    /// Whether the admin paused the run.
    pub paused: bool,
    /// Whether the admin stopped the run.
    pub stopped: bool,
    /// The settings in force.
    pub settings: Tunable,
    /// The URL volunteers open.
    pub join_url: String,
    /// Seconds since the server started.
    pub uptime_s: f64,
}

/// The run as it is now.
pub fn status_body(state: &AppState) -> StatusBody {
    let (clients, ready, backends, client_list) = {
        let clients = state.clients();
        let mut backends = BTreeMap::new();
        for entry in clients.values() {
            *backends.entry(entry.backend.clone()).or_insert(0) += 1;
        }
        let list = clients
            .iter()
            .take(LISTED_CLIENTS)
            .map(|(&id, entry)| ClientStatus {
                id,
                backend: entry.backend.clone(),
                samples: entry.counts.as_ref().map(|c| c.iter().sum()),
                training: entry.pending.is_some(),
                paused: entry.paused,
                hops: entry.hops_done,
                samples_trained: entry.samples_trained,
            })
            .collect();
        (
            clients.len(),
            clients.values().filter(|c| c.counts.is_some()).count(),
            backends,
            list,
        )
    };
    let status = state.status().clone();
    let control = state.control();
    let settings = state.tunable();
    let training = status.phase == Phase::Training;
    let (hops, done) = status
        .mediators
        .iter()
        .fold((0u32, 0u32), |(h, d), m| (h + m.hops, d + m.hops_done));
    let round_progress = match (training, hops) {
        (true, hops) if hops > 0 => f64::from(done) / f64::from(hops),
        _ => 0.0,
    };
    let round_elapsed_s = match (training, status.round_started) {
        (true, Some(started)) => started.elapsed().as_secs_f64(),
        _ => 0.0,
    };
    let finished = status.history.len() as u32;
    let eta_s = estimate_eta(
        &status.history,
        training.then_some((round_progress, round_elapsed_s)),
        settings.rounds.saturating_sub(finished),
    );
    let privacy = state.privacy_spec().unwrap_or_default();
    // As the welcome says it (JSON has no infinity: no limit is no budget).
    let model_budget = privacy.model.and_then(|m| m.budget);
    StatusBody {
        phase: status.phase,
        strategy: status.strategy,
        scheduler: state.config.settings.rescheduling.scheduler.to_string(),
        leader_term: state.lease.as_ref().map(crate::store::Lease::term),
        servers: state.lease.as_ref().map(crate::store::Lease::servers),
        gateways: status.gateways.clone(),
        gateway: status.gateway.clone(),
        leader_round: status.leader_round.map(|(round, _)| round),
        leader_accuracy: status.leader_round.map(|(_, accuracy)| accuracy),
        mode: state.config.schedule.mode.to_string(),
        privacy,
        model_epsilon: state.model_epsilon(),
        model_budget,
        model_delta: state.config.model_privacy.map(|dp| dp.budget.delta),
        model_clip: state.model_clip(),
        round: status.round,
        rounds: settings.rounds,
        clients,
        ready,
        backends,
        client_list,
        mediators: status.mediators,
        plan: status.plan,
        accuracy: status.history.last().map(|r| r.accuracy),
        best_accuracy: status.history.iter().map(|r| r.accuracy).reduce(f64::max),
        skipped_hops: status.skipped_hops,
        rejections: state.rejections.load(Ordering::Relaxed),
        bytes_up: state.bytes_up.load(Ordering::Relaxed),
        bytes_down: state.bytes_down.load(Ordering::Relaxed),
        round_progress,
        round_elapsed_s,
        eta_s,
        paused: control.paused,
        stopped: control.stopped,
        settings,
        join_url: state.join_url.clone(),
        uptime_s: state.started.elapsed().as_secs_f64(),
    }
}

/// Seconds until the run's last round ends: rounds left times the mean
/// round so far (or, before any round has finished, the current round's
/// pace), less what the current round has done. `None` with nothing to go
/// on.
pub fn estimate_eta(
    history: &[RoundRecord],
    current: Option<(f64, f64)>,
    rounds_left: u32,
) -> Option<f64> {
    if rounds_left == 0 {
        return Some(0.0);
    }
    let durations: Vec<f64> = history
        .windows(2)
        .map(|w| w[1].wall_s - w[0].wall_s)
        .filter(|d| *d > 0.0)
        .chain(history.first().map(|r| r.wall_s).filter(|d| *d > 0.0))
        .collect();
    let mean = match (durations.is_empty(), current) {
        (false, _) => durations.iter().sum::<f64>() / durations.len() as f64,
        (true, Some((progress, elapsed))) if progress > 0.0 => elapsed / progress,
        _ => return None,
    };
    let (progress, elapsed) = current.unwrap_or((0.0, 0.0));
    let current_left = (mean * (1.0 - progress)).max(mean - elapsed).max(0.0);
    Some(current_left + mean * f64::from(rounds_left.saturating_sub(1)))
}

/// What the dashboard's socket sends: the status and the curves.
#[derive(Serialize)]
struct Snapshot {
    status: StatusBody,
    history: Vec<RoundRecord>,
}

fn snapshot(state: &AppState) -> String {
    let snapshot = Snapshot {
        status: status_body(state),
        history: state.status().history.clone(),
    };
    serde_json::to_string(&snapshot).expect("the snapshot serialises")
}

/// `GET /dashboard`.
pub async fn page() -> Html<&'static str> {
    Html(include_str!("../../web/dashboard.html"))
}

/// `GET /dashboard.js`.
pub async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../web/dashboard.js"),
    )
        .into_response()
}

/// `GET /chart.js`: the charts both pages draw with.
pub async fn chart_script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../web/chart.js"),
    )
        .into_response()
}

/// `GET /ws/dashboard`: the live feed.
pub async fn feed(ws: WebSocketUpgrade, State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ws.on_upgrade(move |socket| push(socket, state))
}

/// Sends a snapshot every second, and at once when clients join, become
/// ready or leave; ends when the dashboard closes.
async fn push(mut socket: WebSocket, state: Arc<AppState>) {
    loop {
        let changed = state.changed.notified();
        if socket
            .send(Message::Text(snapshot(&state).into()))
            .await
            .is_err()
        {
            return;
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// `GET /api/join-qr.svg`: the join URL as a QR code.
pub async fn join_qr(State(state): State<Arc<AppState>>) -> Response {
    match qrcode::QrCode::new(state.join_url.as_bytes()) {
        Ok(code) => {
            let svg = code
                .render::<qrcode::render::svg::Color<'_>>()
                .min_dimensions(240, 240)
                .quiet_zone(true)
                .build();
            ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
        }
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("no QR code for {}: {e}", state.join_url),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: usize, wall_s: f64) -> RoundRecord {
        RoundRecord {
            round,
            accuracy: 0.5,
            loss: 1.0,
            bytes_up: 0,
            bytes_down: 0,
            mean_kl: 0.1,
            wall_s,
            train_samples: 0,
            train_s: 0.0,
            clock_s: wall_s,
            epsilon: None,
            mediators: Vec::new(),
            hops: Default::default(),
        }
    }

    #[test]
    fn the_eta_is_rounds_left_at_the_mean_pace() {
        let history = vec![record(1, 10.0), record(2, 22.0), record(3, 30.0)];
        // Mean round 10 s; the current round is half done after 5 s, and
        // two more follow it.
        let eta = estimate_eta(&history, Some((0.5, 5.0)), 3).unwrap();
        assert!((eta - 25.0).abs() < 1e-9, "{eta}");
        assert_eq!(estimate_eta(&history, None, 0), Some(0.0));
    }

    #[test]
    fn before_any_round_the_eta_follows_the_current_rounds_pace_or_is_unknown() {
        let eta = estimate_eta(&[], Some((0.25, 5.0)), 2).unwrap();
        // 20 s a round: 15 s left of this one, 20 s for the next.
        assert!((eta - 35.0).abs() < 1e-9, "{eta}");
        assert_eq!(estimate_eta(&[], Some((0.0, 1.0)), 2), None);
        assert_eq!(estimate_eta(&[], None, 2), None);
    }
}
