//! HTTP routes: the WebSocket endpoint, the JSON API and the static files.
//! `app` is apart from serving so tests can call it directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::ws::{Message, WebSocket};
use axum::extract::{ConnectInfo, Path, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tower_http::services::ServeDir;

use crate::config::Secret;
use crate::connection::handle_socket;
use crate::dashboard::{self, StatusBody, status_body};
use crate::state::{AppState, TunableChange};
use astraea_core::metrics::RoundRecord;
use astraea_core::protocol::{ErrorCode, LifecycleReport, ServerMessage, limits};

/// The server's routes over `state`.
pub fn app(state: Arc<AppState>) -> Router {
    let static_dir = state.config.static_dir.clone();
    Router::new()
        .route("/ws", get(websocket))
        .route(
            "/status",
            get(|| async { Redirect::permanent("/dashboard") }),
        )
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .route("/chart.js", get(dashboard::chart_script))
        .route("/ws/dashboard", get(dashboard::feed))
        .route("/api/join-qr.svg", get(dashboard::join_qr))
        .route("/api/status", get(status))
        .route("/api/rounds", get(rounds))
        .route("/api/model", get(model))
        .route("/api/shard/{client}", get(shard))
        .route("/metrics", get(metrics))
        .route(
            "/api/lifecycle",
            // Read no more of an unauthenticated body than a report can be.
            post(lifecycle).layer(axum::extract::DefaultBodyLimit::max(
                limits::MAX_LIFECYCLE_BYTES,
            )),
        )
        .route("/api/admin/configure", post(configure))
        .route("/api/admin/{action}", post(admin))
        // Files built by scripts/build-web have gzipped twins: sent to
        // browsers that accept gzip (the wasm shrinks from 14 MB to 2.7).
        .fallback_service(ServeDir::new(static_dir).precompressed_gzip())
        .with_state(state)
}

/// Whether a volunteer at `peer` may train over this transport: over TLS
/// always; over plain HTTP only from this machine (loopback, which covers
/// a reverse proxy terminating TLS here) unless the operator allowed it.
/// Weights and label counts crossing a network in clear text are for
/// anyone on it to read (docs/PRIVACY.md).
pub fn transport_allowed(tls: bool, allow_insecure: bool, peer: std::net::IpAddr) -> bool {
    tls || allow_insecure || peer.to_canonical().is_loopback()
}

async fn websocket(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    State(state): State<Arc<AppState>>,
) -> Response {
    // Before the upgrade: a source over its join rate costs one HTTP
    // exchange, not a socket (`crate::admission`).
    let source = crate::admission::Source::of(peer, &headers);
    if let Err(wait) = state.joins.admit(source) {
        state.join_refusals.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, ?source, "refused a join: its source joins too often");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, wait.as_secs().to_string())],
            format!(
                "too many joins from this address; retry in {} s\n",
                wait.as_secs()
            ),
        )
            .into_response();
    }
    let limit = state.config.max_frame_bytes;
    let allowed = transport_allowed(
        state.config.tls.is_some(),
        state.config.allow_insecure,
        peer.ip(),
    );
    // Small socket buffers: an idle volunteer costs the server kilobytes,
    // not the 128 KiB a buffer holds by default; big frames still pass, the
    // buffers grow while one is read or written.
    ws.max_frame_size(limit)
        .max_message_size(limit)
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .on_upgrade(move |socket| async move {
            if allowed {
                handle_socket(socket, state).await;
            } else {
                refuse_insecure(socket, &state, peer).await;
            }
        })
        .into_response()
}

/// Tells a remote client on plain HTTP why it may not join, and closes.
async fn refuse_insecure(mut socket: WebSocket, state: &AppState, peer: SocketAddr) {
    state.rejections.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(%peer, "refused a plain-HTTP volunteer from another machine");
    let refusal = ServerMessage::Error {
        code: ErrorCode::Insecure,
        message: "this server takes volunteers on other machines only over TLS (https://); \
                  the operator can serve with --tls, or allow plain HTTP with --allow-insecure"
            .into(),
    };
    let _ = socket.send(Message::Text(refusal.to_json().into())).await;
    let _ = socket.send(Message::Close(None)).await;
    // As for any refusal: wait for the client's close (see `LINGER`).
    let _ = tokio::time::timeout(crate::connection::LINGER, async {
        while let Some(Ok(frame)) = socket.recv().await {
            if matches!(frame, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn status(State(state): State<Arc<AppState>>) -> Json<StatusBody> {
    Json(status_body(&state))
}

async fn rounds(State(state): State<Arc<AppState>>) -> Json<Vec<RoundRecord>> {
    Json(state.status().history.clone())
}

/// The latest global model as a safetensors file whose metadata says what
/// it is (`export::ModelCard`); the file name and the `X-Astraea-Round`
/// header name its round.
async fn model(State(state): State<Arc<AppState>>) -> Response {
    let global = crate::state::lock(&state.global).clone();
    match global {
        Some(weights) => {
            let card = state.current_model_card();
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{}\"", card.file_name()),
                    ),
                    (
                        header::HeaderName::from_static("x-astraea-round"),
                        card.round.to_string(),
                    ),
                ],
                card.export(&weights),
            )
                .into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "no model yet").into_response(),
    }
}

/// Prometheus text exposition of the run's counters and gauges.
async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let (clients, ready) = {
        let clients = state.clients();
        (
            clients.len(),
            clients.values().filter(|c| c.counts.is_some()).count(),
        )
    };
    let status = state.status().clone();
    let last = status.history.last();
    let best = status.history.iter().map(|r| r.accuracy).reduce(f64::max);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        metric_line(&mut out, (name, kind), help, value);
    };
    let (gateway, gateways) = {
        let status = state.status();
        (status.gateway.is_some(), status.gateways.clone())
    };
    metric(
        "astraea_leading",
        "gauge",
        "Whether this server leads its run (1) or follows it (0).",
        if gateway { 0.0 } else { 1.0 },
    );
    metric(
        "astraea_gateway",
        "gauge",
        "Whether this server is a gateway of its run (serve --gateway): it never leads.",
        if gateway { 1.0 } else { 0.0 },
    );
    if state.hierarchy.is_some() {
        metric(
            "astraea_gateways",
            "gauge",
            "The run's gateways this leader heard from in the last 3 s.",
            gateways.len() as f64,
        );
        metric(
            "astraea_gateway_ready_clients",
            "gauge",
            "Ready clients on the run's gateways, as they last said.",
            gateways.iter().map(|g| g.ready as f64).sum(),
        );
    }
    if let Some(lease) = &state.lease {
        metric(
            "astraea_leader_term",
            "gauge",
            "The term of the run's lease its leader holds (as this server last saw it).",
            lease.term() as f64,
        );
    }
    metric(
        "astraea_round",
        "gauge",
        "Current round.",
        f64::from(status.round),
    );
    metric(
        "astraea_clients_connected",
        "gauge",
        "Connected clients.",
        clients as f64,
    );
    metric(
        "astraea_clients_ready",
        "gauge",
        "Clients ready to train.",
        ready as f64,
    );
    metric(
        "astraea_mediators",
        "gauge",
        "Training groups of the current round.",
        status.mediators.len() as f64,
    );
    metric(
        "astraea_accuracy",
        "gauge",
        "Test accuracy after the last round.",
        last.map_or(0.0, |r| r.accuracy),
    );
    metric(
        "astraea_best_accuracy",
        "gauge",
        "Best test accuracy so far.",
        best.unwrap_or(0.0),
    );
    metric(
        "astraea_skipped_hops_total",
        "counter",
        "Hops skipped (client gone or late).",
        status.skipped_hops as f64,
    );
    metric(
        "astraea_rejections_total",
        "counter",
        "Frames refused as bad input.",
        state.rejections.load(Ordering::Relaxed) as f64,
    );
    metric(
        "astraea_departures_total",
        "counter",
        "Connections that ended without a refusal (closed, left or dropped).",
        state.departures.load(Ordering::Relaxed) as f64,
    );
    metric(
        "astraea_stale_updates_total",
        "counter",
        "Updates that came after their hop was given up.",
        state.stale_updates.load(Ordering::Relaxed) as f64,
    );
    metric(
        "astraea_stale_results_total",
        "counter",
        "Asynchronous groups' results refused as too many versions stale.",
        state.stale_results.load(Ordering::Relaxed) as f64,
    );
    metric(
        "astraea_loss_refusals_total",
        "counter",
        "Hops refused for raising the validation loss past the tolerance.",
        state.loss_refusals.load(Ordering::Relaxed) as f64,
    );
    metric(
        "astraea_outlier_refusals_total",
        "counter",
        "Hops refused for moving the model over 10x the median of recent hops.",
        state.outlier_refusals.load(Ordering::Relaxed) as f64,
    );
    metric(
        "astraea_join_refusals_total",
        "counter",
        "Volunteer sockets refused (429) because their source joined too often.",
        state.join_refusals.load(Ordering::Relaxed) as f64,
    );
    metric(
        "astraea_dropped_rounds_total",
        "counter",
        "Rounds whose aggregate was refused; the previous model was kept.",
        state.dropped_rounds.load(Ordering::Relaxed) as f64,
    );
    metric(
        "astraea_bytes_received_total",
        "counter",
        "Bytes received from clients.",
        state.bytes_up.load(Ordering::Relaxed) as f64,
    );
    metric(
        "astraea_bytes_sent_total",
        "counter",
        "Bytes sent to clients.",
        state.bytes_down.load(Ordering::Relaxed) as f64,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// One Prometheus metric, `(name, kind)` with its help, appended to `out`.
pub(crate) fn metric_line(out: &mut String, (name, kind): (&str, &str), help: &str, value: f64) {
    out.push_str(&format!(
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    ));
}

/// Whether the request carries the admin token; the refusal otherwise.
fn authorise(state: &AppState, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let Some(token) = state.config.admin_token.as_ref().map(Secret::expose) else {
        return Err((
            StatusCode::FORBIDDEN,
            "admin actions are disabled: start the server with --admin-token",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented != Some(token) {
        return Err((StatusCode::UNAUTHORIZED, "missing or wrong admin token"));
    }
    Ok(())
}

/// `POST /api/admin/configure` with a JSON body changing any of `rounds`,
/// `participants`, `min_clients`, `hop_deadline_s`; answers the settings now
/// in force. They apply from the next round.
async fn configure(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(refusal) = authorise(&state, &headers) {
        return refusal.into_response();
    }
    let change: TunableChange = match serde_json::from_slice(&body) {
        Ok(change) => change,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad settings: {e}")).into_response(),
    };
    let max = astraea_core::secagg::MAX_MASKERS as usize;
    if state.config.secure_aggregation && change.participants.is_some_and(|c| c > max) {
        return (
            StatusCode::BAD_REQUEST,
            format!("secure aggregation sums at most {max} results a round: participants <= {max}"),
        )
            .into_response();
    }
    let outcome = crate::state::lock(&state.tunable).apply(change);
    match outcome {
        Ok(()) => {
            state.control_changed.notify_waiters();
            tracing::info!(?change, "run reconfigured");
            Json(state.tunable()).into_response()
        }
        Err(reason) => (StatusCode::BAD_REQUEST, reason).into_response(),
    }
}

/// `POST /api/lifecycle`: a client says it is pausing or active again
/// ([`LifecycleReport`], `docs/PROTOCOL.md` "Pausing"). 204 when a connected
/// client holds the token; 404 when none does; 400 for a body that is not
/// the report or breaks its limits, 413 above
/// [`limits::MAX_LIFECYCLE_BYTES`] (refusals are counted in `rejections`).
async fn lifecycle(
    State(state): State<Arc<AppState>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let refuse = |status: StatusCode, reason: String| {
        state.rejections.fetch_add(1, Ordering::Relaxed);
        (status, reason).into_response()
    };
    let body = match body {
        Ok(body) if body.len() <= limits::MAX_LIFECYCLE_BYTES => body,
        Ok(body) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "lifecycle report of {} bytes, at most {} allowed",
                    body.len(),
                    limits::MAX_LIFECYCLE_BYTES
                ),
            );
        }
        Err(e) => return refuse(e.status(), e.body_text()),
    };
    let report = match LifecycleReport::from_json(&body) {
        Ok(report) => report,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("malformed report: {e}")),
    };
    if let Err(e) = report.validate() {
        return refuse(StatusCode::BAD_REQUEST, format!("report refused: {e}"));
    }
    match crate::connection::on_lifecycle(&state, &report) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => refuse(
            StatusCode::NOT_FOUND,
            "no connected client holds this token".into(),
        ),
    }
}

/// Admin actions (`pause`, `resume`, `stop`), for holders of the token.
async fn admin(
    State(state): State<Arc<AppState>>,
    Path(action): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorise(&state, &headers) {
        return refusal.into_response();
    }
    {
        let mut control = crate::state::lock(&state.control);
        match action.as_str() {
            "pause" => control.paused = true,
            "resume" | "start" => control.paused = false,
            "stop" => control.stopped = true,
            other => {
                return (
                    StatusCode::NOT_FOUND,
                    format!("unknown admin action {other:?}"),
                )
                    .into_response();
            }
        }
    }
    state.control_changed.notify_waiters();
    tracing::info!(action, "admin action");
    Json(state.control()).into_response()
}

/// A demo shard's samples in the compact binary of
/// `astraea_core::data::shard`, for a tab that cannot read the dataset files.
/// A client gets the shard of its demo slot (`AppState::demo_shard`), as
/// its `welcome` said; only while it is connected.
async fn shard(State(state): State<Arc<AppState>>, Path(client): Path<u64>) -> Response {
    // Only a connected client that was assigned a demo shard may fetch
    // it: ids never issued, or of clients gone or on their own data, are
    // refused.
    let slot = state
        .clients()
        .get(&client)
        .and_then(|entry| entry.demo_slot);
    let Some(slot) = slot.filter(|_| !state.shards.is_empty()) else {
        return (StatusCode::NOT_FOUND, "no such shard").into_response();
    };
    let indices = state.demo_shard(slot);
    let bytes = astraea_core::data::shard::encode_shard(&state.train.subset(indices));
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

#[cfg(test)]
mod transport_tests {
    use super::transport_allowed;

    #[test]
    fn plain_http_is_for_this_machine_unless_the_operator_allows_it() {
        let lan: std::net::IpAddr = "192.168.1.20".parse().unwrap();
        let mapped_loopback: std::net::IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        for local in ["127.0.0.1", "::1"] {
            assert!(transport_allowed(false, false, local.parse().unwrap()));
        }
        assert!(transport_allowed(false, false, mapped_loopback));
        assert!(!transport_allowed(false, false, lan));
        assert!(transport_allowed(true, false, lan));
        assert!(transport_allowed(false, true, lan));
    }
}
