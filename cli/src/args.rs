//! The `#[command(flatten)]` argument groups that `serve` and `simulate` share.

/// The update guard and its loss rule, the same flags (and `ASTRAEA_*`
/// variables) for `serve` and `simulate`: an
/// `astraea_core::engine::GuardSettings`.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct GuardArgs {
    /// Update guard: an update may move the weights it was sent by at most
    /// this many times their L2 norm.
    #[arg(long, env = "ASTRAEA_MAX_UPDATE_RATIO", default_value_t = astraea_core::guard::DEFAULT_MAX_UPDATE_RATIO)]
    pub(crate) max_update_ratio: f64,
    /// The guard's loss rule: samples of the training set a hop is judged
    /// on (seeded; 0 turns the rule off, which a run with --gateway servers
    /// needs).
    #[arg(long, env = "ASTRAEA_VALIDATION_SAMPLES", default_value_t = astraea_core::validation::DEFAULT_VALIDATION_SAMPLES)]
    pub(crate) validation_samples: usize,
    /// The loss rule's tolerance: a hop may raise the validation loss by at
    /// most this many nats.
    #[arg(long, env = "ASTRAEA_MAX_LOSS_INCREASE", default_value_t = astraea_core::validation::DEFAULT_MAX_LOSS_INCREASE)]
    pub(crate) max_loss_increase: f64,
}

/// Synchronous rounds or the asynchronous mode, the same flags (and
/// `ASTRAEA_*` variables) for `serve` and `simulate`: an
/// `astraea_core::engine::Schedule`.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct ScheduleArgs {
    /// sync: the papers' rounds; async: a group starts whenever clients are
    /// free and is folded in when it finishes, with a staleness weight
    /// (FedBuff-style; every B ended groups make a version, and --rounds
    /// counts versions: B groups of work where a round is m, for m groups
    /// running and buffer B). async: not across --gateway servers.
    #[arg(long, env = "ASTRAEA_MODE", default_value = "sync")]
    pub(crate) mode: astraea_core::asynchronous::Mode,
    /// Async mode: finished groups per new global model (default: half
    /// the groups running at once, rounded up).
    #[arg(long, env = "ASTRAEA_BUFFER")]
    pub(crate) buffer: Option<usize>,
    /// Async mode: a result more than this many global versions stale is
    /// refused.
    #[arg(long, env = "ASTRAEA_MAX_STALENESS", default_value_t = astraea_core::asynchronous::DEFAULT_MAX_STALENESS)]
    pub(crate) max_staleness: u64,
}

impl From<GuardArgs> for astraea_core::engine::GuardSettings {
    fn from(args: GuardArgs) -> Self {
        Self {
            max_update_ratio: args.max_update_ratio,
            validation_samples: args.validation_samples,
            max_loss_increase: args.max_loss_increase,
        }
    }
}

impl From<ScheduleArgs> for astraea_core::engine::Schedule {
    /// A buffer of 0 is taken as 1.
    fn from(args: ScheduleArgs) -> Self {
        Self {
            mode: args.mode,
            buffer: args.buffer.map(|b| b.max(1)),
            max_staleness: args.max_staleness,
        }
    }
}

/// Who forms the mediators, the same flags (and `ASTRAEA_*` variables) for
/// `serve` and `simulate`: an `astraea_core::astraea::Scheduler`.
#[derive(clap::Args, Clone)]
pub(crate) struct SchedulerArgs {
    /// Who forms the mediators: greedy (the papers' KL rule),
    /// speed-aware:WEIGHT (label balance against chain-time balance),
    /// random, oort (utility times speed, Oort-style) or learned:PATH (a
    /// policy written by `astraea train-scheduler`).
    #[arg(long, env = "ASTRAEA_SCHEDULER", default_value = "greedy", value_parser = parse_scheduler, conflicts_with = "speed_weight")]
    pub(crate) scheduler: astraea_core::astraea::Scheduler,
    /// Shorthand for --scheduler speed-aware:WEIGHT.
    #[arg(long)]
    pub(crate) speed_weight: Option<f64>,
}

impl SchedulerArgs {
    /// The scheduler the flags name, for a run in `mode`: a learned policy
    /// in the asynchronous mode is run, with a warning on stderr, since
    /// policies are trained on synchronous rounds and one did worse there
    /// than the greedy (docs/RESULTS.md).
    pub(crate) fn scheduler(
        &self,
        mode: astraea_core::asynchronous::Mode,
    ) -> anyhow::Result<astraea_core::astraea::Scheduler> {
        let scheduler = match self.speed_weight {
            Some(weight) => {
                parse_scheduler(&format!("speed-aware:{weight}")).map_err(anyhow::Error::msg)?
            }
            None => self.scheduler.clone(),
        };
        if matches!(scheduler, astraea_core::astraea::Scheduler::Learned(_))
            && mode == astraea_core::asynchronous::Mode::Async
        {
            eprintln!(
                "warning: --scheduler learned in --mode async: policies are trained on \
                 synchronous rounds, and one formed worse groups than the greedy in the \
                 asynchronous mode (docs/RESULTS.md); --scheduler greedy is the safe choice"
            );
        }
        Ok(scheduler)
    }
}

/// `--scheduler`'s parser: `learned:PATH` reads the policy file.
pub(crate) fn parse_scheduler(text: &str) -> Result<astraea_core::astraea::Scheduler, String> {
    astraea_core::astraea::Scheduler::parse(text, |path| {
        std::fs::read(path).map_err(|e| format!("cannot read the policy {path}: {e}"))
    })
}
