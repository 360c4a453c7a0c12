//! `astraea-server`: the federation over WebSockets (`astraea serve`). Only
//! serving lives here; the simulator, the native client, the benchmarks and
//! the command line are crates of their own.
//!
//! # Layout
//! - [`config`]: what a served run is made of.
//! - [`state`]: the shared state: connected clients, the run's status.
//! - [`connection`]: one client's WebSocket: parse, validate, forward.
//! - [`guard`]: (re-exported from the core) refuses updates too far from
//!   the model they were sent.
//! - [`coordinator`]: the round loop: pick participants, host the mediators'
//!   chains, aggregate, evaluate.
//! - [`store`]: SQLite records and safetensors checkpoints; resume after a crash.
//! - [`app`]: the HTTP routes (`/ws`, `/api/status`, `/api/rounds`, static files).
//! - [`dashboard`]: the operator's live view (`/dashboard`, `/ws/dashboard`,
//!   the join QR code).
//! - [`tls`]: HTTPS (given or self-signed certificate) and the join URL.
//! - [`loopback`]: a minimal HTTP/1.1 client for tests and benchmarks on
//!   loopback.
#![warn(missing_docs)]

pub mod admission;
pub mod app;
/// The update guard lives in the core, so the simulator judges updates
/// exactly as the server does.
pub use astraea_core::guard;
pub mod config;
pub mod connection;
pub mod coordinator;
pub mod dashboard;
pub mod follower;
pub mod gateway;
pub mod loopback;
pub mod secure;
pub mod state;
pub mod store;
pub mod testing;
pub mod tls;
use std::sync::Arc;

use anyhow::Context;
use astraea_core::data::catalog::load_named;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use config::ServeConfig;
pub use state::AppState;

/// A server started by [`start`].
pub struct Running {
    /// The shared state, for tests and the binary's logs.
    pub state: Arc<AppState>,
    /// The HTTP server.
    pub server: JoinHandle<()>,
    /// The round loop; ends when the run has done its rounds.
    pub coordinator: JoinHandle<anyhow::Result<()>>,
}

/// Opens the run's store, if it is durable: SQLite in the state directory,
/// or PostgreSQL, where this server first waits until it holds the run's
/// lease (while another server leads it) and fences its writes by the
/// lease's term. Answers the store, the run as found, the lease, and
/// (when the run's rounds fold across gateways) the leader's link to its
/// gateways, fenced by the lease too.
async fn open_store(
    config: &ServeConfig,
    shapes: &[astraea_core::weights::ParamShape],
    bound: std::net::SocketAddr,
    seen: Option<follower::LastSeen>,
) -> anyhow::Result<(
    Option<store::Store>,
    Option<store::Resumed>,
    Option<store::Lease>,
    Option<store::PgStore>,
)> {
    let describe = format!("{config:?}");
    match (&config.state_dir, &config.postgres) {
        (Some(_), Some(_)) => anyhow::bail!(
            "a state directory and a PostgreSQL store are two stores for one run: give one"
        ),
        (None, None) => Ok((None, None, None, None)),
        (Some(dir), None) => {
            let mut store: store::Store = Box::new(
                store::SqliteStore::open(dir)
                    .with_context(|| format!("opening the store in {}", dir.display()))?,
            );
            let resumed = store.resume_or_create(&config.run_name, &describe, shapes)?;
            Ok((Some(store), Some(resumed), None, None))
        }
        (None, Some(url)) => {
            let (url, run, settings) = (
                url.expose().to_string(),
                config.run_name.clone(),
                config.lease,
            );
            let shapes = shapes.to_vec();
            let holder = format!("pid {} at {bound}", std::process::id());
            tokio::task::spawn_blocking(move || {
                let mut store =
                    store::PgStore::connect(&url).context("opening the PostgreSQL store")?;
                let mut last = None;
                let lease = store::Lease::acquire(&url, &run, &holder, settings, |current| {
                    if let Some(seen) = &seen {
                        *state::lock(seen) = Some(current.clone());
                    }
                    let now = (current.name.clone(), current.term);
                    if last.as_ref() != Some(&now) {
                        tracing::info!(
                            run = %run,
                            leader = %current.name,
                            term = current.term,
                            "another server leads this run; waiting to take over"
                        );
                        last = Some(now);
                    }
                })?;
                tracing::info!(run = %run, term = lease.term(), "leading this run");
                store.fence(&lease);
                let mut store: store::Store = Box::new(store);
                let resumed = store.resume_or_create(&run, &describe, &shapes)?;
                // Gateways train only runs whose rounds fold across them
                // (`ServeConfig::across_gateways`, which they check too); a
                // leader of another run still looks, to say it leaves them
                // idle.
                let mut link = store::PgStore::connect(&url)
                    .context("opening the link to the run's gateways")?;
                link.fence(&lease);
                let link = Some(link);
                Ok((Some(store), Some(resumed), Some(lease), link))
            })
            .await?
        }
    }
}

/// Loads the data, then serves on `listener` and starts the round loop.
pub async fn start(listener: TcpListener, config: ServeConfig) -> anyhow::Result<Running> {
    config.policy().validate()?;
    config.numbers().validate()?;
    if !(config::MIN_FRAME_BYTES..=config::MAX_FRAME_BYTES).contains(&config.max_frame_bytes) {
        anyhow::bail!(
            "--max-frame-bytes must be {} to {}, not {}",
            config::MIN_FRAME_BYTES,
            config::MAX_FRAME_BYTES,
            config.max_frame_bytes
        );
    }
    if !(config.rejoin_rate.is_finite() && config.rejoin_rate >= 0.0) {
        anyhow::bail!(
            "--rejoin-rate must be a finite number of joins a second, 0 or more, not {}",
            config.rejoin_rate
        );
    }
    use astraea_core::engine::hop::hop_limit;
    hop_limit("the hop deadline", config.hop_deadline.as_secs_f64(), false)
        .map_err(anyhow::Error::msg)?;
    hop_limit(
        "the stall timeout",
        config.stall_timeout.as_secs_f64(),
        true,
    )
    .map_err(anyhow::Error::msg)?;
    let bound = listener.local_addr()?;
    if config.gateway {
        return start_gateway(listener, config, bound).await;
    }
    // A server that may have to wait for its run's lease answers 503 on its
    // port from now on (while it loads its data too) until it leads (plain
    // HTTP only: a TLS one stays silent), so a load balancer passes its
    // volunteers on to the leader.
    let (listener, following) = if config.postgres.is_some() && config.tls.is_none() {
        let socket = listener.into_std()?;
        let answering = TcpListener::from_std(socket.try_clone()?)?;
        let following = follower::answer(answering, config.run_name.clone());
        (TcpListener::from_std(socket)?, Some(following))
    } else {
        (listener, None)
    };
    let (train, test) = load_named(&config.dataset, &config.data_dir)
        .with_context(|| format!("loading {}", config.dataset))?;
    let data = coordinator::ServerData::prepare(&config, train, test)?;
    // The run's row exists before any client can join and be recorded.
    let seen = following.as_ref().map(|f| f.seen.clone());
    let (store, resumed, lease, link) =
        open_store(&config, &data.initial.shapes, bound, seen).await?;
    if let Some(following) = following {
        following.stop().await;
    }
    let (mut state, rustls) = served_state(config, &data, store, bound).await?;
    // Held as long as the server runs, finished or not: a follower that
    // took over a finished run would have nothing to lead.
    state.lease = lease;
    // Woken when its gateways' partials come back: only a leader whose
    // rounds fold across gateways places work on them.
    if link.is_some()
        && state.config.across_gateways().is_ok()
        && let Some(url) = &state.config.postgres
    {
        state.wakes = Some(Arc::new(store::listen::Wakes::start(
            url.expose(),
            &state.config.run_name,
        )?));
    }
    state.hierarchy = link.map(Arc::new);
    state.loss_check = data.loss_check.clone();
    let state = Arc::new(state);
    let resume = coordinator::restore(&state, &data.initial, resumed);
    let server = spawn_server(listener, rustls, app::app(state.clone()))?;
    let round_loop = coordinator::run(state.clone(), data, resume);
    let leading = state.clone();
    let coordinator = tokio::spawn(async move {
        let Some(lease) = &leading.lease else {
            return round_loop.await;
        };
        // Its clients that resume on another server of the run (a gateway)
        // are let go, as long as it leads.
        let _stop_watching =
            gateway::AbortOnDrop(tokio::spawn(state::watch_moves(leading.clone())));
        // A leader that loses its lease stops leading at once; its writes
        // were already refused (fenced) from the moment another took it.
        tokio::select! {
            result = round_loop => result,
            () = lease.lost() => anyhow::bail!(
                "lost the lease of this run (term {}): another server leads it now, or the database could not be reached in time",
                lease.term()
            ),
        }
    });
    Ok(Running {
        state,
        server,
        coordinator,
    })
}

/// `listener` with TCP_NODELAY set on every connection it accepts (see
/// `spawn_server`: small messages go out as they are written).
pub(crate) fn without_nagle(
    listener: TcpListener,
) -> axum::serve::TapIo<TcpListener, impl FnMut(&mut tokio::net::TcpStream) + Send + 'static> {
    axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set: {e}");
        }
    })
}

/// Serves `router` on `listener` (HTTPS under `rustls`) until the process
/// ends.
fn spawn_server(
    listener: TcpListener,
    rustls: Option<axum_server::tls_rustls::RustlsConfig>,
    router: axum::Router,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // TCP_NODELAY on every connection: a refusal's error frame and the
    // close after it are two small writes, and Nagle's algorithm held the
    // close back for the first's delayed ACK, long enough for the reset of
    // a socket closed with the client's unread bytes to lose it (and the
    // same wait slowed every small message that followed another: acks,
    // round-done, plans).
    let server = match rustls {
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(
                without_nagle(listener),
                router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .await
            {
                tracing::error!("http server stopped: {e}");
            }
        }),
        Some(rustls) => {
            let listener = listener.into_std()?;
            tokio::spawn(async move {
                let server = axum_server::from_tcp(listener).acceptor(
                    axum_server::tls_rustls::RustlsAcceptor::new(rustls)
                        .acceptor(axum_server::accept::NoDelayAcceptor::new()),
                );
                if let Err(e) = server
                    .serve(router.into_make_service_with_connect_info::<std::net::SocketAddr>())
                    .await
                {
                    tracing::error!("https server stopped: {e}");
                }
            })
        }
    };
    Ok(server)
}

/// Starts a gateway (`ServeConfig::gateway`): loads the data, takes a block
/// of client ids from the run's store, serves volunteers on `listener` and
/// trains what the run's leader places on it (`gateway::run`); it never
/// leads.
async fn start_gateway(
    listener: TcpListener,
    config: ServeConfig,
    bound: std::net::SocketAddr,
) -> anyhow::Result<Running> {
    let Some(url) = config.postgres.as_ref().map(|u| u.expose().to_string()) else {
        anyhow::bail!("--gateway serves a run kept in PostgreSQL: give --store postgres://…");
    };
    config.across_gateways().map_err(anyhow::Error::msg)?;
    let (train, test) = load_named(&config.dataset, &config.data_dir)
        .with_context(|| format!("loading {}", config.dataset))?;
    let data = coordinator::ServerData::prepare(&config, train, test)?;
    let (run, listen_url) = (config.run_name.clone(), url.clone());
    let (link, heartbeat, records, block, run_id) = tokio::task::spawn_blocking(move || {
        let link = store::PgStore::connect(&url).context("opening the PostgreSQL store")?;
        let heartbeat = store::PgStore::connect(&url).context("opening the PostgreSQL store")?;
        let records = store::PgStore::connect(&url).context("opening the PostgreSQL store")?;
        let block = link.client_id_block()?;
        let run_id = link.run_id(&run)?;
        anyhow::Ok((link, heartbeat, records, block, run_id))
    })
    .await??;
    // Named by its block of ids, which no other process of the database
    // takes: a restarted gateway is a new one, whatever its pid and port.
    let name = format!("gateway {block} (pid {} at {bound})", std::process::id());
    // The run's store, unfenced: a gateway writes only its own clients'
    // rows and events (their joins with their tokens' hashes, forgotten
    // tokens, rejections, its chains' skips and refusals), so a volunteer
    // resumes as itself on whichever server of the run it reaches next;
    // never a round's.
    let records: store::Store = Box::new(records);
    let (mut state, rustls) = served_state(config, &data, Some(records), bound).await?;
    // Until a leader created the run, `gateway::run` looks again.
    if let Some(id) = run_id {
        state
            .run_id
            .store(id as u64, std::sync::atomic::Ordering::Relaxed);
    }
    // Ids no other server of the run gives (`PgStore::client_id_block`).
    state.next_id.store(
        (block << store::gateways::BLOCK_BITS) | 1,
        std::sync::atomic::Ordering::Relaxed,
    );
    state.status().gateway = Some(name.clone());
    state.wakes = Some(Arc::new(store::listen::Wakes::start(
        &listen_url,
        &state.config.run_name,
    )?));
    let state = Arc::new(state);
    let server = spawn_server(listener, rustls, app::app(state.clone()))?;
    tracing::info!(%name, "serving as a gateway of run {}", state.config.run_name);
    let coordinator = tokio::spawn(gateway::run(
        state.clone(),
        (Arc::new(link), Arc::new(heartbeat)),
        (name, block),
        data.initial.clone(),
    ));
    Ok(Running {
        state,
        server,
        coordinator,
    })
}

/// A server's state for `config` and its `data` (with `store`, if any), its
/// join URL made from `bound` unless the config names one, and its TLS
/// configuration, if it serves HTTPS.
async fn served_state(
    config: ServeConfig,
    data: &coordinator::ServerData,
    store: Option<store::Store>,
    bound: std::net::SocketAddr,
) -> anyhow::Result<(AppState, Option<axum_server::tls_rustls::RustlsConfig>)> {
    let join_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| tls::join_url(config.tls.is_some(), bound));
    let rustls = match &config.tls {
        Some(source) => Some(tls::rustls_config(source).await?),
        None => None,
    };
    let mut state = AppState::new(
        config,
        data.model.clone(),
        data.shards.clone(),
        data.train.clone(),
        store,
    );
    state.join_url = join_url;
    state.test_samples = data.test.len();
    // Unique whatever the host: two containers may both be pid 1 on
    // 0.0.0.0:8080. The pid and address are for the logs only.
    state.server_name = format!(
        "{} (pid {} at {bound})",
        state::new_resume_token(),
        std::process::id()
    );
    Ok((state, rustls))
}
