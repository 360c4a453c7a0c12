//! What a server answers while it waits for its run's lease (a follower):
//! `503 Service Unavailable` with `Retry-After: 1` to every request, and on
//! every path a small JSON body naming the run and who leads it. A load
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
    let router = Router::new().fallback(move || {
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
        let serving = axum::serve(listener, router).with_graceful_shutdown(async move {
            let _ = stopped.await;
        });
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
