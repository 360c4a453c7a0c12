//! The round engine: what a round decides, written once, without I/O, and
//! driven by the server (`astraea serve`, over sockets and real time) and
//! by the simulator (`astraea simulate`, over simulated clients and its
//! own clock) alike.
//!
//! In the spirit of the client's [`crate::protocol::ClientSession`] (and of
//! quinn-proto): each part is a state machine or a pure function fed what
//! happened — an update came back, a hop was skipped, the loss rule gave
//! its verdict — that answers what to do next. No tokio, no sockets, no
//! clock, no threads: randomness comes in as a seeded generator, time and
//! storage stay with the driver. It builds for `wasm32-unknown-unknown`
//! like the rest of the core.
//!
//! - [`buffered`]: the asynchronous mode's rules — how many groups run at
//!   once, when a new one starts, when ended groups make a new version.
//! - [`chain`]: one mediator's chain — the model travels member to member;
//!   the loss rule's verdicts (pipelined or not), per-hop noise, the
//!   secure chain's masked last hop and its clip split, the chain's
//!   result or failure.
//! - [`declared`]: what a client's unproven label counts can weigh — at
//!   most twice the median declared total, in the draw, the plan and the
//!   aggregate.
//! - [`draw`]: who trains: the ready clients drawn for a round or a new
//!   group, leaving out those pausing and, while others are free, those
//!   gone silent.
//! - [`hierarchy`]: a round trained by several gateways — each one's
//!   share of the participants, and the partial it gives back (its
//!   mediators' sample-weighted mean, exact for the mean of them all).
//! - [`hop`]: a hop's deadline from its client's speed, and when a hop
//!   out is given up (deadline, stall timeout) and its client deemed
//!   silent.
//! - [`round`]: closing a round — the aggregate (the strategy's rule,
//!   DP-FedAvg's noisy mean, or the secure round's unmasked mean), its
//!   bounds, the privacy accountant and the budget.
//! - [`policy`]: the run's rules as one validated value, whichever front
//!   end (serve's flags, simulate's flags, a TOML file) built it.
//! - [`seeds`]: every seeded draw of a run (participants, a hop's
//!   training, the data plan, the validation samples) from the run's seed,
//!   so a served and a simulated run of one seed draw alike.

pub mod buffered;
pub mod chain;
pub mod declared;
pub mod draw;
pub mod hierarchy;
pub mod hop;
pub mod policy;
pub mod round;
pub mod seeds;
pub mod suspects;

pub use chain::{
    Chain, ChainRules, Effect, HopOrder, HopTally, Judgement, MaskedHop, Next, SecureChain,
};
pub use policy::{GuardSettings, PolicyError, RunNumbers, RunPolicy, Sampling, Schedule};
pub use round::{Closed, RoundPrivacy};

#[cfg(test)]
mod tests {
    use crate::privacy::ModelPrivacy;

    /// A DP mechanism for the engine's tests: clip 1, multiplier 1, delta
    /// 1e-5, a fixed clip.
    pub(crate) fn dp() -> ModelPrivacy {
        ModelPrivacy {
            clip: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-5,
            adaptive: None,
        }
    }
}
