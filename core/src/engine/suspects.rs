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
//! about log2 of the first round's maskers rounds. It assumes one culprit
//! that spoils every round it masks in; with several, or one that spoils
//! now and then, the suspects start again from a spoiled round's maskers
//! whenever none of them masked in it, so the rounds keep being tested
//! rather than failing for ever (docs/PRIVACY.md).

use std::collections::BTreeSet;

/// The suspects of spoiled secure rounds (client ids).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskerSuspects {
    suspects: BTreeSet<u64>,
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

    /// The suspects that sit the next round out: the later half in id
    /// order (none while there are none or one). The earlier half may be
    /// drawn; what becomes of the round then tells the halves apart.
    pub fn sitting_out(&self) -> BTreeSet<u64> {
        let tested = self.suspects.len().div_ceil(2);
        self.suspects.iter().skip(tested).copied().collect()
    }

    /// A secure round closed with `maskers` (the clients whose masked
    /// results were in its sum): `spoiled` when its unmasked mean was
    /// refused, else adopted. Returns the client named when a spoiled
    /// round leaves one suspect; it is no longer a suspect (the driver
    /// refuses it).
    pub fn closed(&mut self, maskers: &[u64], spoiled: bool) -> Option<u64> {
        let masked: BTreeSet<u64> = maskers.iter().copied().collect();
        if !spoiled {
            self.suspects.retain(|id| !masked.contains(id));
            return None;
        }
        let kept: BTreeSet<u64> = self.suspects.intersection(&masked).copied().collect();
        // No suspect masked in a spoiled round: the culprit was not among
        // them (another, or a first spoiled round): start from this one.
        self.suspects = if kept.is_empty() { masked } else { kept };
        if self.suspects.len() == 1 {
            return self.suspects.pop_first();
        }
        None
    }

    /// Client `id` left: it is no longer tested (should it come back under
    /// a new id, the next spoiled round makes it a suspect again).
    pub fn forget(&mut self, id: u64) {
        self.suspects.remove(&id);
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
            let out = suspects.sitting_out();
            let maskers: Vec<u64> = (1..=clients).filter(|id| !out.contains(id)).collect();
            let spoiled = maskers.contains(&spoiler);
            if let Some(named) = suspects.closed(&maskers, spoiled) {
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
        assert!(suspects.sitting_out().is_empty());
        assert_eq!(suspects.closed(&[1, 2, 3, 4], false), None);
        assert!(suspects.suspects().is_empty());
        assert_eq!(suspects.closed(&[1, 2, 3, 4], true), None);
        assert_eq!(suspects.suspects(), vec![1, 2, 3, 4]);
        assert_eq!(suspects.sitting_out(), BTreeSet::from([3, 4]));
        // 1 and 2 masked and the round was adopted: it is 3 or 4.
        assert_eq!(suspects.closed(&[1, 2, 5], false), None);
        assert_eq!(suspects.suspects(), vec![3, 4]);
        assert_eq!(suspects.closed(&[3, 5, 6], true), Some(3));
        assert!(suspects.suspects().is_empty());
    }

    #[test]
    fn a_spoiled_round_without_a_suspect_among_its_maskers_starts_again() {
        let mut suspects = MaskerSuspects::new();
        suspects.closed(&[1, 2, 3, 4], true);
        suspects.closed(&[1, 2], false);
        assert_eq!(suspects.closed(&[7, 8, 9], true), None);
        assert_eq!(suspects.suspects(), vec![7, 8, 9]);
        suspects.forget(8);
        assert_eq!(suspects.suspects(), vec![7, 9]);
    }
}
