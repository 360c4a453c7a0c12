//! What a periodic store call says when the store is away: once when its
//! calls start failing, then at most every [`OUTAGE_REMINDER`] with how
//! many failed, and once when they succeed again. A server's loops call
//! the store every 250 ms to every second (a gateway's heartbeat, its look
//! for work, the feed of moves, the leader's read of its gateways); without
//! this a minute's outage was hundreds of identical lines per server.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How often a store call that keeps failing says so again.
pub const OUTAGE_REMINDER: Duration = Duration::from_secs(30);

/// One periodic call's failures (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Outage {
    /// What the call does, for the log ("gateway heartbeat").
    what: &'static str,
    /// When the current run of failures began, and when it was last said.
    since: Option<(Instant, Instant)>,
    /// Failures since it began.
    failures: u64,
}

impl Outage {
    /// No failure yet, of the call that does `what`.
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            since: None,
            failures: 0,
        }
    }

    /// Whether the call is failing now.
    pub fn failing(&self) -> bool {
        self.since.is_some()
    }

    /// The call failed with `error` at `now`: what to say, if anything —
    /// the first failure, or a reminder [`OUTAGE_REMINDER`] after the
    /// last thing said, with the count.
    pub fn failed_at(&mut self, now: Instant, error: &dyn Display) -> Option<String> {
        self.failures += 1;
        match &mut self.since {
            None => {
                self.since = Some((now, now));
                Some(format!("{}: {error}", self.what))
            }
            Some((began, said)) if now.duration_since(*said) >= OUTAGE_REMINDER => {
                *said = now;
                Some(format!(
                    "{}: still failing, {} times in {:.0} s: {error}",
                    self.what,
                    self.failures,
                    now.duration_since(*began).as_secs_f64()
                ))
            }
            Some(_) => None,
        }
    }

    /// The call succeeded at `now`: what to say, if it was failing.
    pub fn succeeded_at(&mut self, now: Instant) -> Option<String> {
        let (began, _) = self.since.take()?;
        let failures = std::mem::take(&mut self.failures);
        Some(format!(
            "{}: the store answers again, after {failures} failures over {:.1} s",
            self.what,
            now.duration_since(began).as_secs_f64()
        ))
    }

    /// [`Outage::failed_at`] now, said as a warning.
    pub fn failed(&mut self, error: &dyn Display) {
        if let Some(said) = self.failed_at(Instant::now(), error) {
            tracing::warn!("{said}");
        }
    }

    /// [`Outage::succeeded_at`] now, said as news.
    pub fn succeeded(&mut self) {
        if let Some(said) = self.succeeded_at(Instant::now()) {
            tracing::info!("{said}");
        }
    }

    /// Says how `result` went ([`Outage::failed`] or
    /// [`Outage::succeeded`]) and gives its value, if any.
    pub fn note<T, E: Display>(&mut self, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(value) => {
                self.succeeded();
                Some(value)
            }
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_said_when_it_starts_every_reminder_and_when_it_ends() {
        let mut outage = Outage::new("gateway heartbeat");
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(outage.succeeded_at(at(0)), None, "nothing to say when well");

        // 250 ms apart for a minute: said at the start, then at 30 s and
        // 60 s.
        let said: Vec<(u64, String)> = (0..=240u64)
            .filter_map(|i| {
                let ms = i * 250;
                outage
                    .failed_at(at(ms), &"connection refused")
                    .map(|s| (ms, s))
            })
            .collect();
        assert!(outage.failing());
        assert_eq!(
            said.iter().map(|(ms, _)| *ms).collect::<Vec<_>>(),
            vec![0, 30_000, 60_000]
        );
        assert_eq!(said[0].1, "gateway heartbeat: connection refused");
        assert!(
            said[1].1.contains("still failing, 121 times in 30 s"),
            "{}",
            said[1].1
        );

        // Back: said once, with the whole outage; then quiet again, and
        // a new outage counts from one.
        let back = outage.succeeded_at(at(60_500)).unwrap();
        assert!(back.contains("after 241 failures over 60.5 s"), "{back}");
        assert!(!outage.failing());
        assert_eq!(outage.succeeded_at(at(61_000)), None);
        assert_eq!(
            outage.failed_at(at(62_000), &"timed out").as_deref(),
            Some("gateway heartbeat: timed out")
        );
        assert_eq!(outage.failed_at(at(62_250), &"timed out"), None);
        assert!(
            outage
                .succeeded_at(at(63_000))
                .unwrap()
                .contains("after 2 failures")
        );
    }
}
