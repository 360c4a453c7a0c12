//! Greedy mediator assignment (docs/METHOD.md step 5): group the round's
//! participants so that each group's combined label mix is near uniform.

use crate::partition::kl_to_uniform;

/// KL to uniform of `base + extra`, summed into `scratch`.
fn kl_of_sum(base: &[usize], extra: &[usize], scratch: &mut Vec<usize>) -> f64 {
    scratch.clear();
    scratch.extend(base.iter().zip(extra).map(|(a, b)| a + b));
    kl_to_uniform(scratch)
}

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
    let gamma = gamma.max(1);
    let num_classes = counts.first().map_or(0, Vec::len);
    let mut unassigned: Vec<usize> = (0..counts.len()).collect();
    let mut mediators = Vec::new();
    while !unassigned.is_empty() {
        let mut members = Vec::with_capacity(gamma);
        let mut combined = vec![0usize; num_classes];
        let mut scratch = Vec::with_capacity(num_classes);
        while members.len() < gamma && !unassigned.is_empty() {
            let (slot, _) = unassigned
                .iter()
                .enumerate()
                .map(|(slot, &i)| (slot, kl_of_sum(&combined, &counts[i], &mut scratch)))
                .fold((0, f64::INFINITY), |best, cand| {
                    if cand.1 < best.1 { cand } else { best }
                });
            let chosen = unassigned.remove(slot);
            for (c, n) in combined.iter_mut().zip(&counts[chosen]) {
                *c += n;
            }
            members.push(chosen);
        }
        mediators.push(members);
    }
    mediators
}

#[cfg(test)]
mod tests {
    use super::*;

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
