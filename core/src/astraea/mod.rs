//! The Astraea planner (docs/METHOD.md steps 2, 3 and 5): global label
//! statistics from the clients' reported counts, the augmentation and
//! downsampling plan, and the mediator schedulers (the papers' greedy and
//! its alternatives, learned included).
//!
//! Everything here works on label counts only: clients never send samples.

pub mod formation;
pub mod mediator;
pub mod plan;
pub mod policy;
pub mod scheduler;
pub mod stats;

pub use mediator::{assign_mediators, assign_mediators_timed};
pub use plan::{AugmentationPlan, PlanRule};
pub use policy::Policy;
pub use scheduler::Scheduler;
pub use stats::GlobalStats;
