//! Every seeded draw of a run, derived in one place from the run's seed, so
//! that `astraea serve` and `astraea simulate` given one seed draw the same
//! participants and train the same hops (draw for draw in synchronous
//! rounds; the asynchronous server draws whenever it wakes, so its draws
//! follow timing): the participant draw of a round,
//! the seed a hop's training runs from (its batch order and dropout), the
//! seed a client applies the data plan with, and the loss rule's
//! validation samples.
//!
//! Clients are numbered as the server numbers them: the n-th client to join
//! is client n (1-based), holding demo shard n - 1. The simulator's client
//! at index i is client i + 1 here.
//!
//! What a served run draws from the operating system's entropy stays out of
//! here on purpose: the noise a DP round or a hop adds must not be
//! predictable from a seed anyone can read in the run's settings.

/// Mixes `parts` into one seed (an FNV-1a-like fold with a rotation), so
/// that seeds differing in any one part differ everywhere: each (run,
/// round, chain, client, pass) trains differently but reproducibly.
pub fn mix(parts: &[u64]) -> u64 {
    parts.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &p| {
        (h ^ p).wrapping_mul(0x100_0000_01b3).rotate_left(17)
    })
}

/// The seed of synchronous round `round`'s participant draw
/// ([`super::draw::draw`]). Per round, so a resumed run draws as the
/// original would have.
pub fn round_draw(run: u64, round: u32) -> u64 {
    mix(&[run, 0xd7a3, u64::from(round)])
}

/// The seed of the asynchronous mode's draws, from the first round (global
/// version + 1) a run or its resumption trains.
pub fn async_draw(run: u64, first_round: u32) -> u64 {
    mix(&[run, 0xa5c, u64::from(first_round)])
}

/// The seed client `client` (1-based, see the module) trains one hop with:
/// round `round` (the global version + 1 it started from), the run's
/// `chain`-th chain of that round (a synchronous round numbers its
/// mediators from 0; the asynchronous mode counts every chain it started),
/// pass `pass` (0-based) over the mediator.
pub fn hop(run: u64, round: u32, chain: u64, client: u64, pass: u32) -> u64 {
    mix(&[
        run,
        0x4097,
        u64::from(round),
        chain,
        client,
        u64::from(pass),
    ])
}

/// The seed client `client` (1-based) applies the data plan with (which of
/// its samples are augmented or dropped).
pub fn plan(run: u64, client: u64) -> u64 {
    mix(&[run, 0x91a4, client])
}

/// The seed of the loss rule's draw of validation samples from the
/// training set.
pub fn validation(run: u64) -> u64 {
    mix(&[run, 0x7a11d])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixing_depends_on_every_part_and_its_place() {
        assert_ne!(mix(&[1, 2, 3]), mix(&[1, 2, 4]));
        assert_ne!(mix(&[1, 2]), mix(&[2, 1]));
        assert_eq!(mix(&[5, 6]), mix(&[5, 6]));
    }

    #[test]
    fn each_part_of_a_hop_changes_its_seed() {
        let base = hop(1, 2, 3, 4, 0);
        let others = [
            hop(2, 2, 3, 4, 0),
            hop(1, 3, 3, 4, 0),
            hop(1, 2, 4, 4, 0),
            hop(1, 2, 3, 5, 0),
            hop(1, 2, 3, 4, 1),
            // The same numbers in other roles.
            hop(1, 2, 4, 3, 0),
        ];
        for other in others {
            assert_ne!(base, other);
        }
        assert_eq!(base, hop(1, 2, 3, 4, 0));
    }

    #[test]
    fn the_kinds_of_draw_do_not_share_seeds() {
        let seeds = [
            round_draw(5, 1),
            async_draw(5, 1),
            plan(5, 1),
            validation(5),
            hop(5, 1, 0, 1, 0),
        ];
        for (i, a) in seeds.iter().enumerate() {
            for b in &seeds[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
