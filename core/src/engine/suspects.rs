//! Narrowing down a masker that spoils secure aggregation's sum, without
//! I/O, for any driver of secure rounds.
//!
//! Under secure aggregation the server never sees a masker's result, only
//! the round's unmasked mean; when the mean breaks the guard or the loss
//! rule ([`super::round::Closed::Spoiled`]) the round is dropped, and one
//! of its maskers is to blame but the sum does not say which. Group
//! testing narrows it down: after a spoiled round its maskers are the
//! suspects; while there are suspects, half of them sit the next round out
//! ([`MaskerSuspects::sitting_out`]); a spoiled round keeps the suspects
//! that masked in it, an adopted one clears those that masked in it. When
//! one suspect is left it is named ([`MaskerSuspects::closed`]), after
//! about log2 of the first round's maskers rounds, and sits out secure
//! rounds for a while: 4 rounds the first time, twice as many each time
//! it is named again (at most 1,024).
//!
//! Named is not refused: the evidence can be forged. A spoiler that
//! masks honestly now and then, or rejoins under a new id, can steer the
//! narrowing onto an honest client, and colluding revealers can make an
//! honest masker's shares look undecryptable
//! ([`crate::secagg::SecAggError::suspect`]). So a named client loses
//! secure rounds, not its place: an honest one wrongly named misses a few
//! rounds, a spoiler that keeps spoiling sits out ever longer.

use std::collections::{BTreeMap, BTreeSet};

use super::round::Closed;

/// Rounds a client named `times` times sits out: 4, 8, 16, … up to 1,024.
pub fn named_rounds(times: u32) -> u32 {
    1 << (times.saturating_add(1)).clamp(2, 10)
}

/// The suspects of spoiled secure rounds and the clients named (ids).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskerSuspects {
    suspects: BTreeSet<u64>,
    /// Each named client: times named, and the last round it sits out.
    named: BTreeMap<u64, (u32, u32)>,
}

impl MaskerSuspects {
    /// No suspects.
    pub fn new() -> Self {
        Self::default()
    }

    /// The suspects, in id order.
    pub fn suspects(&self) -> Vec<u64> {
        self.suspects.iter().copied().collect()
    }

    /// The clients that sit round `round` out: the later half of the
    /// suspects in id order (none while there is one or none; the earlier
    /// half may be drawn, and what becomes of the round tells the halves
    /// apart), and those named whose time has not run out.
    pub fn sitting_out(&self, round: u32) -> BTreeSet<u64> {
        let tested = self.suspects.len().div_ceil(2);
        let mut out: BTreeSet<u64> = self.suspects.iter().skip(tested).copied().collect();
        out.extend(
            self.named
                .iter()
                .filter(|(_, (_, until))| round <= *until)
                .map(|(&id, _)| id),
        );
        out
    }

    /// Secure round `round` closed as `closed` with `maskers` (the
    /// clients whose masked results were in its sum): an adopted round
    /// clears them, a spoiled one ([`Closed::Spoiled`]) narrows the
    /// suspects to them; a round kept or dropped for another reason says
    /// nothing of its maskers. Returns the client named when a spoiled
    /// round leaves one suspect; it sits out the next [`named_rounds`]
    /// rounds. What both drivers call after `round::close`.
    pub fn closed(&mut self, maskers: &[u64], closed: &Closed, round: u32) -> Option<u64> {
        match closed {
            _ if maskers.is_empty() => None,
            Closed::Adopted(_) => self.on_round(maskers, false, round),
            Closed::Spoiled(_) => self.on_round(maskers, true, round),
            Closed::Kept | Closed::Dropped(_) => None,
        }
    }

    fn on_round(&mut self, maskers: &[u64], spoiled: bool, round: u32) -> Option<u64> {
        let masked: BTreeSet<u64> = maskers.iter().copied().collect();
        if !spoiled {
            self.suspects.retain(|id| !masked.contains(id));
            return None;
        }
        let kept: BTreeSet<u64> = self.suspects.intersection(&masked).copied().collect();
        // No suspect masked in a spoiled round: the culprit was not among
        // them (another, or a first spoiled round): start from this one.
        self.suspects = if kept.is_empty() { masked } else { kept };
        if self.suspects.len() != 1 {
            return None;
        }
        let id = self.suspects.pop_first()?;
        self.name(id, round);
        Some(id)
    }

    /// Names client `id` at round `round` directly (an unmasking failure
    /// that points at it, [`crate::secagg::SecAggError::suspect`]): it sits
    /// out the next [`named_rounds`] rounds.
    pub fn name(&mut self, id: u64, round: u32) {
        self.suspects.remove(&id);
        let (times, until) = self.named.entry(id).or_insert((0, 0));
        *times = times.saturating_add(1);
        *until = round.saturating_add(named_rounds(*times));
    }

    /// Forgets the suspects `present` says are gone (they would sit out
    /// for nothing, and hold the others out with them); the named keep
    /// their record.
    pub fn keep_only(&mut self, present: impl Fn(u64) -> bool) {
        self.suspects.retain(|&id| present(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rounds of a federation with one spoiler among `clients`: each round
    /// every client not sitting out masks; returns the round the spoiler
    /// was named in, and whom.
    fn narrow(clients: u64, spoiler: u64) -> (u32, u64) {
        let mut suspects = MaskerSuspects::new();
        for round in 1..=64 {
            let out = suspects.sitting_out(round);
            let maskers: Vec<u64> = (1..=clients).filter(|id| !out.contains(id)).collect();
            let spoiled = maskers.contains(&spoiler);
            if let Some(named) = suspects.on_round(&maskers, spoiled, round) {
                return (round, named);
            }
        }
        panic!("never named");
    }

    #[test]
    fn one_spoiler_among_many_is_named_in_about_log2_rounds() {
        for clients in [2u64, 3, 8, 20, 100] {
            for spoiler in 1..=clients {
                let (round, named) = narrow(clients, spoiler);
                assert_eq!(named, spoiler, "{clients} clients");
                let bound = 2 + (clients as f64).log2().ceil() as u32;
                assert!(round <= bound, "{clients} clients: round {round}");
            }
        }
    }

    #[test]
    fn adopted_rounds_clear_their_maskers_and_spoiled_ones_keep_theirs() {
        let mut suspects = MaskerSuspects::new();
        assert!(suspects.sitting_out(1).is_empty());
        assert_eq!(suspects.on_round(&[1, 2, 3, 4], false, 1), None);
        assert!(suspects.suspects().is_empty());
        assert_eq!(suspects.on_round(&[1, 2, 3, 4], true, 2), None);
        assert_eq!(suspects.suspects(), vec![1, 2, 3, 4]);
        assert_eq!(suspects.sitting_out(3), BTreeSet::from([3, 4]));
        // 1 and 2 masked and the round was adopted: it is 3 or 4.
        assert_eq!(suspects.on_round(&[1, 2, 5], false, 3), None);
        assert_eq!(suspects.suspects(), vec![3, 4]);
        assert_eq!(suspects.on_round(&[3, 5, 6], true, 4), Some(3));
        assert!(suspects.suspects().is_empty());
    }

    #[test]
    fn only_adopted_and_spoiled_rounds_speak_of_their_maskers() {
        let mut suspects = MaskerSuspects::new();
        let spoiled = Closed::Spoiled("moved too far".into());
        assert_eq!(suspects.closed(&[1, 2], &Closed::Kept, 1), None);
        assert_eq!(
            suspects.closed(&[1, 2], &Closed::Dropped("quorum".into()), 1),
            None
        );
        assert_eq!(suspects.closed(&[], &spoiled, 1), None);
        assert!(suspects.suspects().is_empty());
        assert_eq!(suspects.closed(&[1, 2], &spoiled, 2), None);
        assert_eq!(suspects.suspects(), vec![1, 2]);
        assert_eq!(suspects.closed(&[1], &Closed::Adopted(vec![]), 3), None);
        assert_eq!(suspects.suspects(), vec![2]);
    }

    #[test]
    fn a_named_client_sits_out_four_rounds_then_twice_as_many_each_time() {
        let mut suspects = MaskerSuspects::new();
        suspects.name(7, 10);
        assert!(suspects.sitting_out(14).contains(&7));
        assert!(!suspects.sitting_out(15).contains(&7));
        suspects.name(7, 20);
        assert!(suspects.sitting_out(28).contains(&7));
        assert!(!suspects.sitting_out(29).contains(&7));
        assert_eq!(named_rounds(1), 4);
        assert_eq!(named_rounds(2), 8);
        assert_eq!(named_rounds(50), 1_024);
    }

    #[test]
    fn a_spoiled_round_without_a_suspect_among_its_maskers_starts_again() {
        let mut suspects = MaskerSuspects::new();
        suspects.on_round(&[1, 2, 3, 4], true, 1);
        suspects.on_round(&[1, 2], false, 2);
        assert_eq!(suspects.on_round(&[7, 8, 9], true, 3), None);
        assert_eq!(suspects.suspects(), vec![7, 8, 9]);
        // A suspect that left no longer holds the others out with it.
        suspects.keep_only(|id| id != 8);
        assert_eq!(suspects.suspects(), vec![7, 9]);
        assert_eq!(suspects.sitting_out(4), BTreeSet::from([9]));
    }
}
