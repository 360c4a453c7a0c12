//! What a server answers while it waits for its run's lease (a follower):
//! `503 Service Unavailable` with `Retry-After: 1` to every request but
//! `/metrics`, and on every path a small JSON body naming the run and who
//! leads it. `/metrics` answers `200` with the follower's view
//! (`astraea_leading 0`, the leader's term and lease as last seen), so a
//! scraper of every server sees a follower up, not a target down. A load
//! balancer in front (deploy/nginx.conf) passes a request it answered so
//! on to the next server, so volunteers reach the leader; a client that
//! reaches no leader (between two) retries, as after any refusal. Without
//! it, a follower's bound port would take connections and answer nothing
//! until it led.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::store::lease::Holder;

/// The body a follower answers.
#[derive(Debug, Clone, Serialize)]
struct Following {
    /// Always `following`.
    phase: &'static str,
    /// The run it waits to lead.
    run: String,
    /// Who leads it, as last seen (`None` before the first look).
    leader: Option<String>,
    /// The leader's term.
    leader_term: Option<i64>,
    /// Seconds until the leader's lease expires unless renewed.
    leader_expires_in_s: Option<f64>,
}

/// The leader a follower last saw, shared with the thread that waits for
/// the lease.
pub type LastSeen = Arc<Mutex<Option<Holder>>>;

/// A follower's answering server; [`Answering::stop`] it before the
/// leader's server takes the listener over.
#[derive(Debug)]
pub struct Answering {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// The leader last seen, for the answers.
    pub seen: LastSeen,
}

/// Answers as a follower of `run` on `listener` until stopped.
pub fn answer(listener: TcpListener, run: String) -> Answering {
    let seen: LastSeen = Arc::default();
    let shared = seen.clone();
    let for_metrics = seen.clone();
    let router = Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let seen = crate::state::lock(&for_metrics).clone();
                async move { metrics(seen.as_ref()) }
            }),
        )
        .fallback(move || {
            let seen = crate::state::lock(&shared).clone();
            let body = Following {
                phase: "following",
                run: run.clone(),
                leader: seen.as_ref().map(|h| h.name.clone()),
                leader_term: seen.as_ref().map(|h| h.term),
                leader_expires_in_s: seen.as_ref().map(|h| h.expires_in_s),
            };
            async move {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(header::RETRY_AFTER, "1")],
                    Json(body),
                )
                    .into_response()
            }
        });
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let serving = axum::serve(crate::without_nagle(listener), router).with_graceful_shutdown(
            async move {
                let _ = stopped.await;
            },
        );
        if let Err(e) = serving.await {
            tracing::error!("the follower's answers stopped: {e}");
        }
    });
    Answering {
        stop: Some(stop),
        task,
        seen,
    }
}

/// A follower's `/metrics`: Prometheus text, as the leader's says it.
fn metrics(seen: Option<&Holder>) -> impl IntoResponse + use<> {
    let mut out = String::new();
    crate::app::metric_line(
        &mut out,
        ("astraea_leading", "gauge"),
        "Whether this server leads its run (1) or follows it (0).",
        0.0,
    );
    if let Some(holder) = seen {
        crate::app::metric_line(
            &mut out,
            ("astraea_leader_term", "gauge"),
            "The term of the run's lease its leader holds (as this server last saw it).",
            holder.term as f64,
        );
        crate::app::metric_line(
            &mut out,
            ("astraea_leader_lease_expires_seconds", "gauge"),
            "Seconds until the leader's lease expires unless renewed, as last seen.",
            holder.expires_in_s,
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

impl Answering {
    /// Stops answering: in-flight answers finish (for at most a second),
    /// then the listener is free for the leader's server.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let abort = self.task.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.task.abort();
    }
}
