//! Astraea's server crate: the `astraea` binary's commands as a library, so
//! tests drive them directly.
//!
//! # Layout
//! - [`simulate`]: the whole federation in one process (`astraea simulate`).
//! - [`serve`]: the federation over WebSockets (`astraea serve`).
//! - [`bench`]: performance figures (`astraea bench`).
//! - [`client`]: the native client and the swarm (`astraea client`, `astraea swarm`).
//! - [`report`]: per-run CSVs, the comparison plot and the summary tables.
//! - [`fetch_data`]: puts the datasets that ship offline into `data/`
//!   (`astraea fetch-data`).
#![warn(missing_docs)]

pub mod bench;
pub mod client;
pub mod fetch_data;
pub mod loopback;
pub mod report;
pub mod serve;
pub mod simulate;
