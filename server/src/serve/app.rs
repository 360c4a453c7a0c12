//! HTTP routes: the WebSocket endpoint, the JSON API and the static files.
//! `app` is apart from serving so tests can call it directly.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use tower_http::services::ServeDir;

use super::connection::handle_socket;
use super::state::{AppState, Phase};
use crate::report::RoundRecord;

/// The server's routes over `state`.
pub fn app(state: Arc<AppState>) -> Router {
    let static_dir = state.config.static_dir.clone();
    Router::new()
        .route("/ws", get(websocket))
        .route("/api/status", get(status))
        .route("/api/rounds", get(rounds))
        .fallback_service(ServeDir::new(static_dir))
        .with_state(state)
}

async fn websocket(ws: WebSocketUpgrade, State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let limit = state.config.max_frame_bytes;
    ws.max_frame_size(limit)
        .max_message_size(limit)
        .on_upgrade(move |socket| handle_socket(socket, state))
}

/// What `/api/status` answers.
#[derive(Debug, Serialize)]
pub struct StatusBody {
    /// Phase of the run.
    pub phase: Phase,
    /// Strategy.
    pub strategy: String,
    /// Current round.
    pub round: u32,
    /// Rounds planned.
    pub rounds: u32,
    /// Connected clients.
    pub clients: usize,
    /// Clients ready to train.
    pub ready: usize,
    /// The current round's mediators with their KL to uniform.
    pub mediators: Vec<super::state::MediatorStatus>,
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
}

async fn status(State(state): State<Arc<AppState>>) -> Json<StatusBody> {
    let (clients, ready) = {
        let clients = state.clients();
        (
            clients.len(),
            clients.values().filter(|c| c.counts.is_some()).count(),
        )
    };
    let status = state.status().clone();
    Json(StatusBody {
        phase: status.phase,
        strategy: status.strategy,
        round: status.round,
        rounds: status.rounds,
        clients,
        ready,
        mediators: status.mediators,
        plan: status.plan,
        accuracy: status.history.last().map(|r| r.accuracy),
        best_accuracy: status.history.iter().map(|r| r.accuracy).reduce(f64::max),
        skipped_hops: status.skipped_hops,
        rejections: state.rejections.load(Ordering::Relaxed),
    })
}

async fn rounds(State(state): State<Arc<AppState>>) -> Json<Vec<RoundRecord>> {
    Json(state.status().history.clone())
}
