//! Who trains: a round's participant draw, without I/O, in `serve` and
//! `simulate` alike (the simulator's clients never pause nor go silent:
//! it has no sockets to hear that from). Up to c
//! of the ready clients not already busy in a chain are drawn (seeded by
//! the driver): never one that said it is pausing (its tab is being frozen
//! or put to sleep), and one that has been silent since a skipped hop
//! (frozen, locked) only when no other client is free, so a frozen tab
//! does not cost every round a stall timeout while live ones wait; and
//! never one the loss rule has benched ([`Standing`]).

use rand::Rng;
use rand::seq::index::sample;

use crate::strategy::Participant;

/// A ready client as the draw sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its id, label counts and expected hop time.
    pub participant: Participant,
    /// It said it is pausing: never drawn until it is back.
    pub paused: bool,
    /// Silent since its last hop was skipped for silence: drawn only when
    /// no other client is free.
    pub silent: bool,
    /// Already in a running chain (the asynchronous mode): not drawn.
    pub busy: bool,
    /// Sitting out after the loss rule refused its updates
    /// ([`Standing::benched`]): not drawn.
    pub benched: bool,
}

/// How many rounds a client sits out after the loss rule refused its
/// updates `streak` times in a row: none after one refusal, then 1, 2, 4,
/// … up to 1,024. An accepted hop ends the streak. An honest client on
/// skewed data, which the rule refuses now and then (most often in a
/// run's first rounds), keeps taking part; one refused every time it is
/// drawn takes part in about log2 of the rounds, and its refusals no
/// longer cost every round the hop trained on its update.
pub fn bench_rounds(streak: u32) -> u32 {
    match streak {
        0 | 1 => 0,
        n => 1 << (n - 2).min(10),
    }
}

/// A client's standing with the loss rule (kept by the driver per client,
/// across its reconnections).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    /// Refusals since its last accepted hop.
    pub streak: u32,
    /// The last round it sits out.
    pub benched_until: u32,
}

impl Standing {
    /// Its hop in round `round` ended past its deadline while it kept
    /// saying it was at work (heartbeats, no update): counted as a refusal,
    /// so a client that never delivers is not drawn round after round to
    /// hold a chain for its whole deadline. A silent (frozen) client is
    /// the draw's `silent` rule's, not this.
    pub fn late(&mut self, round: u32) {
        self.refused(round);
    }

    /// The loss rule refused its update in round `round` (the global
    /// version + 1 its chain started from).
    pub fn refused(&mut self, round: u32) {
        self.streak = self.streak.saturating_add(1);
        self.benched_until = round.saturating_add(bench_rounds(self.streak));
    }

    /// One of its hops was taken into its chain.
    pub fn accepted(&mut self) {
        self.streak = 0;
    }

    /// Whether it sits out round `round`.
    pub fn benched(&self, round: u32) -> bool {
        self.streak > 0 && round <= self.benched_until
    }

    /// Takes `effect`, about this client in round `round`, into its
    /// standing: a hop taken into its chain ends a streak, a refusal by
    /// the loss rule adds to it; nothing else changes it.
    pub fn note(&mut self, effect: &super::Effect, round: u32) {
        match effect {
            super::Effect::Refused {
                loss_rule: true, ..
            } => self.refused(round),
            super::Effect::Accepted { .. } => self.accepted(),
            _ => {}
        }
    }
}

/// Draws up to `c` of `candidates` with `rng` (the rules above), in the
/// candidates' order.
pub fn draw(candidates: &[Candidate], c: usize, rng: &mut impl Rng) -> Vec<Participant> {
    let any_live = candidates
        .iter()
        .any(|x| !x.busy && !x.paused && !x.benched && !x.silent);
    let ready: Vec<&Candidate> = candidates
        .iter()
        .filter(|x| !(x.busy || x.paused || x.benched || any_live && x.silent))
        .collect();
    let mut chosen = sample(rng, ready.len(), c.min(ready.len())).into_vec();
    chosen.sort_unstable();
    chosen
        .into_iter()
        .map(|i| ready[i].participant.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn candidate(id: usize) -> Candidate {
        Candidate {
            participant: Participant {
                id,
                counts: vec![1, 1],
                hop_seconds: None,
            },
            paused: false,
            silent: false,
            busy: false,
            benched: false,
        }
    }

    fn ids(drawn: &[Participant]) -> Vec<usize> {
        drawn.iter().map(|p| p.id).collect()
    }

    #[test]
    fn a_paused_client_is_never_drawn_even_when_no_other_is_free() {
        let mut all: Vec<Candidate> = (0..3).map(candidate).collect();
        all[1].paused = true;
        let drawn = draw(&all, 3, &mut StdRng::seed_from_u64(1));
        assert_eq!(ids(&drawn), vec![0, 2]);
        let alone = [Candidate {
            paused: true,
            ..candidate(9)
        }];
        assert!(draw(&alone, 3, &mut StdRng::seed_from_u64(1)).is_empty());
    }

    #[test]
    fn a_silent_client_waits_while_a_live_one_is_free_and_is_drawn_when_none_is() {
        let mut all: Vec<Candidate> = (0..3).map(candidate).collect();
        all[0].silent = true;
        assert_eq!(
            ids(&draw(&all, 3, &mut StdRng::seed_from_u64(1))),
            vec![1, 2]
        );
        // The live ones are busy in chains: the silent one is drawn.
        all[1].busy = true;
        all[2].busy = true;
        assert_eq!(ids(&draw(&all, 3, &mut StdRng::seed_from_u64(1))), vec![0]);
    }

    #[test]
    fn a_benched_client_is_never_drawn() {
        let mut all: Vec<Candidate> = (0..3).map(candidate).collect();
        all[2].benched = true;
        assert_eq!(
            ids(&draw(&all, 3, &mut StdRng::seed_from_u64(1))),
            vec![0, 1]
        );
        all[0].busy = true;
        all[1].busy = true;
        assert!(draw(&all, 3, &mut StdRng::seed_from_u64(1)).is_empty());
    }

    #[test]
    fn refusals_in_a_row_double_the_rounds_sat_out_and_an_accepted_hop_ends_them() {
        let mut standing = Standing::default();
        assert!(!standing.benched(1));
        // Refused once, in round 1: not benched.
        standing.refused(1);
        assert!(!standing.benched(2));
        // Again in round 2: sits out round 3.
        standing.refused(2);
        assert!(standing.benched(3) && !standing.benched(4));
        // Again in round 4: sits out 5 and 6.
        standing.refused(4);
        assert!(standing.benched(6) && !standing.benched(7));
        standing.refused(7);
        assert_eq!(standing.benched_until, 11);
        // Accepted: drawn again at once.
        standing.accepted();
        assert!(!standing.benched(8));
        assert_eq!(bench_rounds(1), 0);
        assert_eq!(bench_rounds(40), 1024);
    }

    #[test]
    fn the_draw_is_seeded_and_takes_at_most_c() {
        let all: Vec<Candidate> = (0..50).map(candidate).collect();
        let once = draw(&all, 10, &mut StdRng::seed_from_u64(42));
        let again = draw(&all, 10, &mut StdRng::seed_from_u64(42));
        assert_eq!(once, again);
        assert_eq!(once.len(), 10);
        let other = draw(&all, 10, &mut StdRng::seed_from_u64(43));
        assert_ne!(ids(&once), ids(&other));
    }
}
