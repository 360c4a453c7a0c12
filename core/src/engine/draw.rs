//! Who trains: the served round's participant draw, without I/O. Up to c
//! of the ready clients not already busy in a chain are drawn (seeded by
//! the driver): never one that said it is pausing (its tab is being frozen
//! or put to sleep), and one that has been silent since a skipped hop
//! (frozen, locked) only when no other client is free, so a frozen tab
//! does not cost every round a stall timeout while live ones wait.

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
}

/// Draws up to `c` of `candidates` with `rng` (the rules above), in the
/// candidates' order.
pub fn draw(candidates: &[Candidate], c: usize, rng: &mut impl Rng) -> Vec<Participant> {
    let any_live = candidates.iter().any(|x| !x.busy && !x.paused && !x.silent);
    let ready: Vec<&Candidate> = candidates
        .iter()
        .filter(|x| !(x.busy || x.paused || any_live && x.silent))
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
