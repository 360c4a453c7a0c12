//! `astraea-sim`: the whole federation in one process, no network
//! (`astraea simulate`), and the reports made from its runs.
//!
//! The simulator plays both sides with the same pieces the server and the
//! clients use: `astraea-core`'s strategies choose the training groups and
//! aggregate, its training step runs each hop, and the bytes a real run would
//! send are counted with the protocol's sizes.
//!
//! - [`config`]: what a run is made of (dataset, partition, strategy, knobs).
//! - [`federation`]: the clients' data after partitioning and the data plan.
//! - [`runner`]: the round loop, with mediators in parallel on the cores.
//! - [`trainer`]: how a hop is trained: batched (several chains' hops as
//!   one stack, on the CPU or a GPU) or per client.
//! - [`traffic`]: bytes per hop as the protocol would send them.
//! - [`population`]: the clients as machines (speeds, freezes, overhead)
//!   and the federation clock they give.
//! - [`report`]: per-run CSVs, the comparison plot and the summary tables.
//! - [`fetch_data`]: puts the datasets that ship offline into `data/`
//!   (`astraea fetch-data`).
#![warn(missing_docs)]

pub mod config;
pub mod federation;
pub mod fetch_data;
pub mod population;
pub mod report;
pub mod runner;
pub mod scheduling;
pub mod traffic;
pub mod trainer;

pub use config::{RunSpec, SimConfig};
pub use federation::Federation;
pub use runner::{Probe, ProbedSchedule, probe_schedules, run, run_with_model};
pub use trainer::{DeviceKind, Engine, TrainerSettings};
