//! `astraea client`: one native client joining a server.

use std::path::PathBuf;

use astraea_native as client;

use crate::shared::{client_options, tls_settings};

#[derive(clap::Args)]
pub(crate) struct ClientArgs {
    /// WebSocket URL of the server: ws://, or wss:// over TLS (a server
    /// on another machine refuses plain ws:// unless --allow-insecure).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    server: String,
    /// Also trust the certificates in this PEM file for wss:// (the
    /// self-signed one `serve --tls` keeps in STATE_DIR/tls/cert.pem, or
    /// ./tls/cert.pem without --state-dir);
    /// the web's public roots are always trusted.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Folder holding the datasets (demo shards are loaded from here).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Threads a hop trains on: every batch is split between them and
    /// their gradients added up (the same update as one thread's, up to
    /// float rounding; `astraea bench threads` measures the gain). 0: one
    /// per core.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// How those threads share a hop: `slices` (every batch split, the
    /// one-thread update) or `local[:K]` (local SGD: batches dealt, the
    /// weights averaged every K rounds, once a hop without K; faster, but
    /// another update: docs/RESULTS.md measures its accuracy).
    #[arg(long, default_value = "slices")]
    split: astraea_core::train::Split,
}

/// Joins the server and trains until the run ends.
pub(crate) async fn client_command(args: ClientArgs) -> anyhow::Result<()> {
    let ClientArgs {
        server,
        ca_cert,
        data_dir,
        threads,
        split,
    } = args;
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n.min(astraea_core::train::MAX_REPLICAS),
    };
    let options = client::ClientOptions {
        tls: tls_settings(&server, ca_cert.as_deref())?,
        threads,
        split,
        ..client_options(server, data_dir, None)
    };
    let summary = client::run_client(options, Default::default()).await?;
    println!("client done: {summary:?}");
    Ok(())
}
