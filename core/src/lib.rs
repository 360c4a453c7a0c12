//! Astraea's platform-free core, shared by the server, native clients and
//! the browser client. It does no I/O beyond the dataset loaders.
//!
//! # Layout
//! - [`data`]: the dataset type and its loaders (IDX, CIFAR binary, image
//!   folders) and the catalogue of named datasets.
//! - [`partition`]: seeded partitioners (IID, Dirichlet, pathological,
//!   long-tail) and KL divergence to uniform.
//! - [`augment`]: image transforms and the client side of the data plan.
//! - [`model`]: the papers' CNN and its configuration.
//! - [`weights`]: model weights as a flat `f32` vector with shapes.
//! - [`train`]: local training (Adam, FedProx term) and evaluation.
//! - [`astraea`]: the planner: global statistics, the augmentation plan,
//!   greedy mediator assignment.
//! - [`aggregate`]: the sample-weighted aggregation of updates.
//! - [`asynchronous`]: FedBuff-style asynchronous rounds: the buffer and
//!   the staleness weight.
//! - `attack` (feature `attacks`): attacks a hostile client can mount, for
//!   robustness runs (the simulator, the native swarm).
//! - [`robust`]: Byzantine-robust aggregation rules (median, trimmed mean,
//!   Krum, centered clipping) any strategy can use.
//! - [`export`]: the metadata an exported model carries (round, accuracy,
//!   dataset, classes, configuration, input scaling, layouts).
//! - [`guard`]: the update guard: judges an update against the weights it
//!   was sent (bounds, distance relative to the model, recent median).
//! - [`validation`]: the guard's loss rule: a hop may not raise the loss
//!   on the server's validation samples by more than a tolerance (Zeno).
//! - [`settled`]: the median both rules judge a round's hops against,
//!   moved between rounds only.
//! - [`privacy`]: label counts under local differential privacy (OpenDP's
//!   discrete Laplace) and the Rényi DP accountant of the model's noise.
//! - [`secagg`]: secure aggregation of the mediators' results (pairwise
//!   masks over X25519, Shamir shares for dropouts; Bonawitz et al. 2017).
//! - [`metrics`]: what a run records each round, for every runner and report.
//! - [`strategy`]: the `Strategy` contract with FedAvg, FedProx and Astraea.
//! - [`protocol`]: the messages and weight frames between server and clients.
//! - [`engine`]: the round engine without I/O, driven by the server and the
//!   simulator: chains, closing a round, the run's validated policy.
#![warn(missing_docs)]

pub mod aggregate;
pub mod astraea;
pub mod asynchronous;
#[cfg(feature = "attacks")]
pub mod attack;
pub mod augment;
pub mod batched;
pub mod data;
pub mod engine;
pub mod export;
pub mod guard;
pub mod metrics;
pub mod model;
pub mod partition;
pub mod privacy;
pub mod protocol;
pub mod robust;
pub mod secagg;
pub mod settled;
pub mod strategy;
pub mod train;
pub mod validation;
pub mod weights;
