//! `astraea-bench`: the figures behind `astraea bench`, printed as tables
//! (benchmarks measure; tests only assert behaviour).
//!
//! - [`aggregate`]: aggregation throughput next to a plain memory copy.
//! - [`fuzz`]: random structured inputs through the protocol decoders;
//!   crashes found and inputs per second.
//! - [`idle`]: idle WebSocket clients one server process holds, and its
//!   memory per client.
//! - [`rounds`]: coordination overhead per round with many clients that
//!   answer at once (echo clients: no training time to hide behind).
#![warn(missing_docs)]

pub mod aggregate;
pub mod fuzz;
pub mod idle;
pub mod rounds;
