//! The Astraea planner (docs/METHOD.md steps 2, 3 and 5): global label
//! statistics from the clients' reported counts, the augmentation and
//! downsampling plan, and the greedy mediator assignment.
//!
//! Everything here works on label counts only: clients never send samples.

pub mod mediator;
pub mod plan;
pub mod stats;

pub use mediator::{assign_mediators, assign_mediators_timed};
pub use plan::{AugmentationPlan, PlanRule};
pub use stats::GlobalStats;
