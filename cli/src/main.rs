//! The `astraea` command line: parses arguments and calls the library.
//!
//! One module per command holds its flags and what it runs; this file holds
//! the command list and the dispatch.

mod args;
mod bench;
mod client;
mod fetch_data;
mod report;
mod serve;
mod shared;
mod simulate;
mod swarm;
mod train_scheduler;

use clap::{Parser, Subcommand};

use crate::bench::BenchCommand;
use crate::client::ClientArgs;
use crate::fetch_data::FetchDataArgs;
use crate::report::ReportArgs;
use crate::serve::ServeArgs;
use crate::simulate::SimulateArgs;
use crate::swarm::SwarmArgs;
use crate::train_scheduler::TrainSchedulerArgs;

#[derive(Parser)]
#[command(
    name = "astraea",
    version,
    about = "Self-balancing federated learning: simulate, serve, join"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs strategies side by side on a simulated federation.
    Simulate(SimulateArgs),
    /// Puts the datasets that ship offline (MNIST, Fashion-MNIST) into the data folder.
    FetchData(FetchDataArgs),
    /// Serves a federation: clients join over WebSockets at /ws.
    Serve(ServeArgs),
    /// Joins a server as one native client (reconnects if the server restarts).
    Client(ClientArgs),
    /// Runs many native clients in one process.
    Swarm(SwarmArgs),
    /// Measures the server: aggregation, idle clients, coordination overhead.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Re-draws the plot and tables from CSVs written by earlier runs.
    Report(ReportArgs),
    /// Trains the learned mediator scheduler on a simulated population
    /// (for --scheduler learned:PATH).
    TrainScheduler(TrainSchedulerArgs),
}

fn main() -> anyhow::Result<()> {
    let args = serve::args_with_config_file(std::env::args().collect())?;
    match Cli::parse_from(args).command {
        Command::Simulate(args) => simulate::simulate_command(args),
        Command::Bench(bench) => runtime()?.block_on(bench::bench_command(bench)),
        Command::Serve(args) => runtime()?.block_on(serve::serve_command(args)),
        Command::Client(args) => runtime()?.block_on(client::client_command(args)),
        Command::Swarm(args) => runtime()?.block_on(swarm::swarm_command(args)),
        Command::FetchData(args) => fetch_data::fetch_data_command(args),
        Command::Report(args) => report::report_command(args),
        Command::TrainScheduler(args) => train_scheduler::train_scheduler_command(args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
