//! `astraea bench`: the server's performance figures, printed as tables
//! (benchmarks measure; tests only assert behaviour).
//!
//! - [`aggregate`]: aggregation throughput next to a plain memory copy.
//! - [`idle`]: idle WebSocket clients one server process holds, and its
//!   memory per client.
//! - [`rounds`]: coordination overhead per round with many clients that
//!   answer at once (echo clients: no training time to hide behind).

pub mod aggregate;
pub mod idle;
pub mod rounds;
