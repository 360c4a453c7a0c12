//! `astraea-bench`: the figures behind `astraea bench`, printed as tables
//! (benchmarks measure; tests only assert behaviour).
//!
//! - [`aggregate`]: aggregation throughput next to a plain memory copy.
//! - [`chaos`]: SIGKILLs of the server while clients train (rounds lost),
//!   and clients vanishing mid-chain (rounds stalled).
//! - [`failover`]: several servers sharing one run in PostgreSQL, the
//!   leader killed or paused while clients train (takeover time, rounds
//!   lost or counted twice).
//! - [`gateways`]: one run served by one server and by a leader with
//!   gateways, same seeds and data (accuracy and time side by side).
//! - [`fuzz`]: random structured inputs through the protocol decoders;
//!   crashes found and inputs per second.
//! - [`hop`]: a hop's fixed cost, stage by stage (encode, decode, build,
//!   first step, read back, the server's judging), on the CPU.
//! - [`idle`]: idle WebSocket clients one server process holds, and its
//!   memory per client.
//! - [`rounds`]: coordination overhead per round with many clients that
//!   answer at once (echo clients: no training time to hide behind).
//! - [`secagg`]: what secure aggregation costs, in memory and live.
//! - [`threads`]: a native hop trained by several threads at once (every
//!   batch split, gradients added up) against one.
//! - [`simulate`]: the simulator's training throughput, per-client and
//!   batched, next to PyTorch's per-client and `torch.func` loops.
#![warn(missing_docs)]

pub mod aggregate;
pub mod chaos;
pub mod failover;
pub mod fuzz;
pub mod gateways;
pub mod hop;
pub mod idle;
pub mod rounds;
pub mod schedulers;
pub mod secagg;
pub mod simulate;
pub mod surrogate;
pub mod threads;

use std::path::PathBuf;
use std::time::Duration;

use astraea_core::strategy::{StrategyKind, StrategySettings};
use astraea_server::ServeConfig;

/// A served MNIST run for the benchmarks: `shards` shards of an IID split,
/// every shard taking part, mediators of 10 with two passes, nothing kept
/// on disk; each benchmark changes what it measures.
pub(crate) fn serve_config(
    data_dir: PathBuf,
    shards: usize,
    rounds: u32,
    strategy: StrategyKind,
) -> ServeConfig {
    ServeConfig {
        data_dir,
        max_train: Some(20 * shards),
        partition: astraea_core::partition::PartitionSpec::Iid,
        shards,
        participants: shards,
        min_clients: shards,
        rounds,
        strategy,
        settings: StrategySettings {
            prox_mu: 0.0,
            ..ServeConfig::default().settings
        },
        hop_deadline: Duration::from_secs(120),
        max_frame_bytes: 1 << 20,
        static_dir: std::env::temp_dir(),
        run_name: "bench".into(),
        ..ServeConfig::default()
    }
}
