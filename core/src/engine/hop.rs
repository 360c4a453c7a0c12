//! How long a hop may take, the same in `serve` and `simulate`: a hop's
//! deadline from its client's measured speed, and when the server gives a
//! hop up — at its deadline, or once the client has been silent for the
//! stall timeout (no `progress` heartbeat, no update, no chunk of one), so
//! a frozen client costs its chain seconds while a slow one that keeps
//! reporting progress gets its time. Times are offsets from the moment the
//! task went out; the driver owns the clock.

use std::time::Duration;

/// The shortest hop deadline the server gives, whatever a client's speed.
pub const MIN_HOP_DEADLINE: Duration = Duration::from_secs(10);

/// The longest hop deadline or stall timeout an operator may set, in
/// seconds: a day. No volunteer keeps a tab open that long for one hop,
/// and far longer values overflow the clock.
pub const MAX_HOP_SECONDS: f64 = 86_400.0;

/// An operator's time limit on hops (`what` names the setting, for the
/// refusal) as a duration: a finite number of seconds in
/// (0, [`MAX_HOP_SECONDS`]], or 0 where `zero_turns_off` (the stall
/// timeout: no stall rule).
///
/// # Errors
/// The reason, naming `what` and the value: not a number, negative, zero
/// where zero means nothing, or above a day. Every front end (the command
/// line, the TOML file, the environment, `POST /api/admin/configure`, an
/// embedder's `ServeConfig`) goes through here.
pub fn hop_limit(what: &str, seconds: f64, zero_turns_off: bool) -> Result<Duration, String> {
    let least = if zero_turns_off { "0 (off)" } else { "above 0" };
    if seconds.is_nan()
        || seconds < 0.0
        || (seconds == 0.0 && !zero_turns_off)
        || seconds > MAX_HOP_SECONDS
    {
        return Err(format!(
            "{what} must be a number of seconds from {least} to {MAX_HOP_SECONDS} (a day), not {seconds}"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A hop's deadline from the client's speed (samples a second): three
/// times the time its measured speed needs for `work` samples (its samples
/// times the epochs), plus 5 s for transfer and warm-up, within
/// [`MIN_HOP_DEADLINE`] and `ceiling` (the operator's hop deadline). A
/// client of unknown speed gets `ceiling`.
pub fn hop_deadline(speed: Option<f64>, work: u64, ceiling: Duration) -> Duration {
    let Some(speed) = speed.filter(|s| s.is_finite() && *s > 0.0) else {
        return ceiling;
    };
    let seconds = 3.0 * work as f64 / speed + 5.0;
    let deadline = Duration::try_from_secs_f64(seconds).unwrap_or(ceiling);
    deadline.clamp(MIN_HOP_DEADLINE.min(ceiling), ceiling)
}

/// The seconds a hop of `work` samples (samples times epochs) is expected
/// to hold its chain at `speed` samples a second: `overhead_s` (what a hop
/// costs besides training) plus `work / speed`, at most `ceiling_s` (the
/// operator's hop deadline: a later hop is given up). What the mediator
/// schedulers are told of a client, in `serve` (no overhead term: the
/// server does not measure one) and in the simulator's population model
/// alike, so one client claiming a crawl costs its chain a deadline, not
/// more. A speed at or below 1e-9 is taken as 1e-9.
pub fn expected_hop_s(work: u64, speed: f64, overhead_s: f64, ceiling_s: f64) -> f64 {
    (overhead_s + work as f64 / speed.max(1e-9)).min(ceiling_s)
}

/// The rules a hop out is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopTimer {
    /// The hop's deadline ([`hop_deadline`]).
    pub deadline: Duration,
    /// The longest silence allowed; zero turns the rule off.
    pub stall: Duration,
}

/// What to do about a hop still out.
#[derive(Debug, Clone, PartialEq)]
pub enum HopWait {
    /// Wait for its update until this offset, then ask again.
    Until(Duration),
    /// Give it up (the chain skips it).
    GiveUp {
        /// Why, for the record.
        reason: String,
        /// The client said nothing for the stall timeout (or, without that
        /// rule, for the whole deadline): it is not drawn again until it
        /// speaks. A client that was still sending (a late, half-sent
        /// update) is only late.
        silent: bool,
    },
}

impl HopTimer {
    /// What to do at `now`, the client's last sign of life at `last`
    /// (offsets from the task; `None` when the hop is no longer pending
    /// at the client's end, e.g. its update is being delivered).
    pub fn poll(&self, now: Duration, last: Option<Duration>) -> HopWait {
        let stalling = !self.stall.is_zero();
        let quiet_for = last.map_or(self.deadline, |last| now.saturating_sub(last));
        let silent = quiet_for >= if stalling { self.stall } else { self.deadline };
        if now >= self.deadline {
            return HopWait::GiveUp {
                reason: format!("no update within {:?}", self.deadline),
                silent,
            };
        }
        match last {
            Some(last) if stalling && now >= last + self.stall => HopWait::GiveUp {
                reason: format!(
                    "stalled: no progress for {:.1} s",
                    now.saturating_sub(last).as_secs_f64()
                ),
                silent,
            },
            Some(last) if stalling => HopWait::Until((last + self.stall).min(self.deadline)),
            _ => HopWait::Until(self.deadline),
        }
    }

    /// How long a client that never speaks after its task holds its
    /// chain: the stall timeout, or the deadline when that comes first or
    /// the stall rule is off.
    pub fn frozen_cost(&self) -> Duration {
        if self.stall.is_zero() {
            self.deadline
        } else {
            self.stall.min(self.deadline)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operators_time_limit_is_a_day_at_most_and_never_nonsense() {
        assert_eq!(
            hop_limit("hop deadline", 60.0, false),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(hop_limit("stall timeout", 0.0, true), Ok(Duration::ZERO));
        assert_eq!(
            hop_limit("hop deadline", MAX_HOP_SECONDS, false),
            Ok(Duration::from_secs(86_400))
        );
        for bad in [1e308, f64::INFINITY, f64::NAN, -1.0, MAX_HOP_SECONDS + 1.0] {
            let refusal = hop_limit("hop deadline", bad, false).unwrap_err();
            assert!(refusal.contains("hop deadline"), "{refusal}");
        }
        assert!(hop_limit("hop deadline", 0.0, false).is_err());
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn timer() -> HopTimer {
        HopTimer {
            deadline: S(60),
            stall: S(8),
        }
    }

    /// Runs the timer as a driver would with a scripted clock: the client
    /// speaks at `heartbeats` (offsets), the driver wakes when told to.
    fn run(timer: HopTimer, heartbeats: &[Duration]) -> (Duration, HopWait) {
        let mut now = Duration::ZERO;
        loop {
            let last = heartbeats.iter().copied().filter(|&h| h <= now).max();
            match timer.poll(now, Some(last.unwrap_or(Duration::ZERO))) {
                HopWait::Until(at) => {
                    // A heartbeat before `at` does not wake the driver; the
                    // next wake-up sees it.
                    assert!(at > now, "the timer must move on: {at:?} at {now:?}");
                    now = at;
                }
                give_up => return (now, give_up),
            }
        }
    }

    #[test]
    fn a_frozen_client_is_given_up_after_the_stall_timeout_as_silent() {
        let (at, outcome) = run(timer(), &[]);
        assert_eq!(at, S(8));
        assert!(
            matches!(outcome, HopWait::GiveUp { silent: true, ref reason } if reason.starts_with("stalled"))
        );
        assert_eq!(timer().frozen_cost(), S(8));
    }

    #[test]
    fn a_slow_client_that_keeps_reporting_gets_its_deadline_and_is_only_late() {
        let beats: Vec<Duration> = (1..=59).map(S).collect();
        let (at, outcome) = run(timer(), &beats);
        assert_eq!(at, S(60));
        assert!(
            matches!(outcome, HopWait::GiveUp { silent: false, ref reason } if reason.starts_with("no update within"))
        );
    }

    #[test]
    fn a_client_that_freezes_mid_hop_costs_the_stall_after_its_last_heartbeat() {
        let (at, outcome) = run(timer(), &[S(1), S(2), S(3)]);
        assert_eq!(at, S(11));
        assert!(matches!(outcome, HopWait::GiveUp { silent: true, .. }));
    }

    #[test]
    fn without_the_stall_rule_only_the_deadline_counts() {
        let off = HopTimer {
            stall: Duration::ZERO,
            ..timer()
        };
        let (at, outcome) = run(off, &[]);
        assert_eq!(at, S(60));
        assert!(matches!(outcome, HopWait::GiveUp { silent: true, .. }));
        assert_eq!(off.frozen_cost(), S(60));
        // A deadline shorter than the stall timeout comes first.
        let short = HopTimer {
            deadline: S(5),
            ..timer()
        };
        assert_eq!(run(short, &[]).0, S(5));
        assert_eq!(short.frozen_cost(), S(5));
    }

    #[test]
    fn an_update_being_delivered_waits_for_the_deadline() {
        assert_eq!(timer().poll(S(30), None), HopWait::Until(S(60)));
    }

    #[test]
    fn the_deadline_follows_the_measured_speed_within_its_bounds() {
        // 1,000 samples at 100 a second: 3 x 10 s + 5 s.
        assert_eq!(hop_deadline(Some(100.0), 1_000, S(120)), S(35));
        // Fast clients still get the minimum; slow ones the ceiling.
        assert_eq!(hop_deadline(Some(1e6), 10, S(120)), MIN_HOP_DEADLINE);
        assert_eq!(hop_deadline(Some(1.0), 1_000, S(120)), S(120));
        // Unknown or nonsense speeds get the ceiling.
        for speed in [None, Some(0.0), Some(f64::NAN), Some(-1.0)] {
            assert_eq!(hop_deadline(speed, 1_000, S(120)), S(120));
        }
        // A ceiling below the minimum wins.
        assert_eq!(hop_deadline(Some(1e6), 10, S(3)), S(3));
    }
}
