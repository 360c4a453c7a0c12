//! Greedy mediator assignment (docs/METHOD.md step 5): group the round's
//! participants so that each group's combined label mix is near uniform.

use super::scheduler::Scheduler;

/// Assigns participants to mediators of at most `gamma` clients.
///
/// `counts[i]` is participant i's (post-plan) label-count vector. A mediator
/// is opened, then filled one client at a time with the unassigned client
/// that brings the mediator's combined distribution closest to uniform
/// (smallest KL); when it holds `gamma` clients the next one opens. Ties go
/// to the lower index, so the result is deterministic. O(c^2 N).
///
/// Returns the mediators as lists of participant indices, in the order the
/// clients joined them, which is also the order the model travels.
pub fn assign_mediators(counts: &[Vec<usize>], gamma: usize) -> Vec<Vec<usize>> {
    Scheduler::Greedy.assign(counts, &[], gamma, 0)
}

/// Speed-aware assignment: mediators whose label mixes are near uniform
/// *and* whose chains take similar times, so no chain gathers the slow
/// clients (a round waits for its slowest chain).
///
/// `seconds[i]` is participant i's expected hop time (its work over its
/// measured speed; `None` when unknown, then taken as the median of the
/// known ones). All `m = ceil(c / gamma)` mediators open at once; each step,
/// the mediator with the least expected time that has room takes the
/// unassigned client minimising `KL(combined + counts[i]) - weight *
/// seconds[i] / T`, where `T` is the balanced chain time (total seconds over
/// `m`). Slow clients are thus taken early by the least loaded chains and
/// spread out, as in longest-processing-time-first scheduling (Graham
/// 1969), while KL still picks complementary labels. `weight` is the
/// trade-off: 0 balances times only through the order of filling, larger
/// values trade label balance for time balance. With every time 0 (or
/// unknown) it is [`assign_mediators`]: mediator 0 stays least loaded and
/// fills first. Ties go to the lower index. O(c^2 N).
///
/// Returns mediators as [`assign_mediators`] does.
pub fn assign_mediators_timed(
    counts: &[Vec<usize>],
    seconds: &[Option<f64>],
    gamma: usize,
    weight: f64,
) -> Vec<Vec<usize>> {
    Scheduler::SpeedAware { weight }.assign(counts, seconds, gamma, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::kl_to_uniform;

    #[test]
    fn without_times_the_timed_assignment_is_the_papers_greedy() {
        let counts = vec![
            vec![10, 0, 0],
            vec![0, 10, 0],
            vec![0, 0, 10],
            vec![5, 5, 0],
            vec![0, 5, 5],
            vec![3, 3, 4],
            vec![9, 1, 0],
        ];
        let unknown = vec![None; counts.len()];
        assert_eq!(
            assign_mediators_timed(&counts, &unknown, 3, 1.0),
            assign_mediators(&counts, 3)
        );
    }

    #[test]
    fn slow_clients_are_spread_over_the_chains() {
        // Prepare: 8 clients with the same labels, the first two 100x
        // slower; mediators of 4. The paper's greedy puts both slow ones in
        // the first chain (its time 2 x 100 + 2 against 4).
        let counts = vec![vec![5, 5]; 8];
        let mut seconds = vec![Some(100.0), Some(100.0)];
        seconds.extend(vec![Some(1.0); 6]);

        // Execute
        let plain = assign_mediators(&counts, 4);
        let timed = assign_mediators_timed(&counts, &seconds, 4, 1.0);

        // Assert: each chain holds one slow client; everyone is placed once.
        let slowest = |groups: &[Vec<usize>]| {
            groups
                .iter()
                .map(|g| g.iter().map(|&i| seconds[i].unwrap()).sum::<f64>())
                .fold(0.0, f64::max)
        };
        assert_eq!(slowest(&plain), 202.0);
        assert_eq!(slowest(&timed), 103.0);
        let mut all: Vec<usize> = timed.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert!(timed.iter().all(|g| g.len() <= 4));
    }

    #[test]
    fn greedy_pairs_complementary_clients() {
        // Prepare: four one-class clients over two classes, and gamma = 2.
        // The greedy first takes a client (index 0, all ties), then the one
        // that balances it: the first client of the other class.
        let counts = vec![vec![10, 0], vec![10, 0], vec![0, 10], vec![0, 10]];

        // Execute
        let mediators = assign_mediators(&counts, 2);

        // Assert
        assert_eq!(mediators, vec![vec![0, 2], vec![1, 3]]);
        for m in &mediators {
            let combined: Vec<usize> = (0..2)
                .map(|y| m.iter().map(|&i| counts[i][y]).sum())
                .collect();
            assert_eq!(kl_to_uniform(&combined), 0.0);
        }
    }

    #[test]
    fn greedy_matches_a_three_class_case_worked_by_hand() {
        // Prepare: client 3 is balanced alone, so it opens the first mediator;
        // then {0, 1, 2} cover the classes; gamma = 3 gives [3, ?, ?].
        // After 3 ([4, 4, 4]) adding 0 ([8,0,0]) -> [12,4,4]; 1 ([0,8,0]) ->
        // [4,12,4]; 2 ([0,0,8]) -> [4,4,12]: all tie, lowest index 0 wins.
        // Then [12,4,4] + 1 -> [12,12,4] vs + 2 -> [12,4,12]: tie, 1 wins.
        let counts = vec![vec![8, 0, 0], vec![0, 8, 0], vec![0, 0, 8], vec![4, 4, 4]];

        let mediators = assign_mediators(&counts, 3);

        assert_eq!(mediators, vec![vec![3, 0, 1], vec![2]]);
    }

    #[test]
    fn every_participant_lands_in_exactly_one_mediator_of_at_most_gamma() {
        let counts: Vec<Vec<usize>> = (0..23)
            .map(|i| vec![i % 3, (i * 7) % 5, 1 + i % 2])
            .collect();

        let mediators = assign_mediators(&counts, 10);

        assert_eq!(
            mediators.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 3]
        );
        let mut all: Vec<usize> = mediators.concat();
        all.sort_unstable();
        assert_eq!(all, (0..23).collect::<Vec<_>>());
    }
}
