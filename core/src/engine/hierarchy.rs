//! Hierarchical aggregation: a round trained by several gateways (several
//! `astraea serve` processes on one run, ARCHITECTURE.md "Several
//! servers"), each running the chains of its own volunteers.
//!
//! - [`shares`]: how many of the round's `c` participants each gateway
//!   draws, in proportion to its ready clients (largest remainder).
//! - [`partial`]: what a gateway gives back — its mediators' results folded
//!   into one: their sample-weighted mean and the samples behind it.
//!
//! The leader folds the partials as it folds mediators. For the
//! sample-weighted mean (FedAvg's and Astraea's rule, docs/METHOD.md step
//! 7) the two levels are the one mean:
//! `Σ_g n_g (Σ_{m∈g} n_m w_m / n_g) / Σ_g n_g = Σ_m n_m w_m / n`
//! (up to f32 rounding). A rule that needs every result (a robust rule,
//! the loss rule) or one place (secure aggregation's unmasking, DP's
//! noise) is not so folded; the server refuses it across gateways at
//! start-up rather than compute something else. Astraea's augmentation
//! plan reads only the clients' label counts summed
//! (`astraea::GlobalStats::from_client_counts`), so each gateway's sum
//! stands for its clients.

use crate::strategy::GroupResult;

/// How many of `c` participants each of the gateways with `ready` ready
/// clients draws: in proportion to `ready`, the remainder given by largest
/// fraction (ties to the earlier gateway), never more than a gateway has.
/// Shape: one share per entry of `ready`; the shares sum to
/// `min(c, Σ ready)`.
pub fn shares(c: usize, ready: &[usize]) -> Vec<usize> {
    let total: usize = ready.iter().fold(0usize, |a, &r| a.saturating_add(r));
    let c = c.min(total);
    if c == 0 {
        return vec![0; ready.len()];
    }
    // In u128: c·r cannot overflow whatever a gateway says.
    let (c128, total128) = (c as u128, total as u128);
    let mut shares: Vec<usize> = ready
        .iter()
        .map(|&r| (c128 * r as u128 / total128) as usize)
        .collect();
    let mut order: Vec<usize> = (0..ready.len()).collect();
    // The remainders' numerators, c·r mod total, rank the fractions.
    order.sort_by_key(|&i| std::cmp::Reverse((c128 * ready[i] as u128) % total128));
    let mut left = c - shares.iter().sum::<usize>();
    for i in order.into_iter().cycle().take(ready.len() * 2) {
        if left == 0 {
            break;
        }
        if shares[i] < ready[i] {
            shares[i] += 1;
            left -= 1;
        }
    }
    shares
}

/// A gateway's mediators' `results` folded into one result (numbered
/// `group`): their sample-weighted mean against `global` and the sum of
/// their samples. Results that do not fit the model or are not finite
/// are left out (as the leader's mean would leave them out); `None` when
/// none is left.
pub fn partial(global: &[f32], results: &[GroupResult], group: usize) -> Option<GroupResult> {
    let mut aggregator = crate::aggregate::Aggregator::new(global);
    for result in results.iter().filter(|r| r.samples > 0) {
        let _ = aggregator.fold(&result.weights, result.samples);
    }
    let samples = aggregator.samples();
    let weights = aggregator.finish().ok()?;
    Some(GroupResult {
        group,
        weights,
        samples,
    })
}

/// Of a gateway's mediators' `results`, those the leader's rule can take,
/// in order: trained on some samples, of the model's length (`global`),
/// every weight finite — the ones [`partial`] would fold. Given back
/// whole where the run's rule needs every result in one place (a robust
/// rule, client-level DP's clipping), rather than folded.
pub fn usable(global: &[f32], results: &[GroupResult]) -> Vec<GroupResult> {
    results
        .iter()
        .filter(|r| {
            r.samples > 0
                && r.weights.len() == global.len()
                && r.weights.iter().all(|w| w.is_finite())
        })
        .cloned()
        .collect()
}

/// `weights` laid end to end by a gateway ([`usable`] results, `each`
/// their samples in order) split back into results numbered from
/// `first_group`, each of `len` weights; `None` when they do not make
/// `each.len()` results of `len` weights.
pub fn split_laid(
    weights: Vec<f32>,
    each: &[u64],
    len: usize,
    first_group: usize,
) -> Option<Vec<GroupResult>> {
    if len == 0 || each.is_empty() || weights.len() != len.checked_mul(each.len())? {
        return None;
    }
    Some(
        weights
            .chunks_exact(len)
            .zip(each)
            .enumerate()
            .map(|(i, (chunk, &samples))| GroupResult {
                group: first_group + i,
                weights: chunk.to_vec(),
                samples,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::robust::{AggregationRule, aggregate_with};

    #[test]
    fn shares_follow_the_ready_clients_and_sum_to_what_can_be_drawn() {
        assert_eq!(shares(10, &[10, 10]), vec![5, 5]);
        assert_eq!(shares(10, &[30, 10]), vec![8, 2]); // 7.5, 2.5: ties to the first
        assert_eq!(shares(3, &[1, 1, 1, 1]), vec![1, 1, 1, 0]);
        assert_eq!(shares(10, &[2, 0, 3]), vec![2, 0, 3]); // fewer ready than c
        assert_eq!(shares(0, &[4, 4]), vec![0, 0]);
        assert_eq!(shares(5, &[]), Vec::<usize>::new());
        // Whatever a gateway says, no overflow.
        assert_eq!(shares(10, &[usize::MAX, 1]).iter().sum::<usize>(), 10);
        for c in 0..40 {
            for ready in [[0, 1, 7], [3, 3, 3], [1, 20, 2], [0, 0, 0], [9, 0, 1]] {
                let got = shares(c, &ready);
                let sum: usize = got.iter().sum();
                assert_eq!(sum, c.min(ready.iter().sum()), "{c} {ready:?} {got:?}");
                assert!(got.iter().zip(&ready).all(|(s, r)| s <= r), "{got:?}");
            }
        }
    }

    #[test]
    fn the_partials_folded_are_the_mean_of_every_result() {
        let global = vec![0.5f32; 6];
        let result = |group: usize, seed: f32, samples: u64| GroupResult {
            group,
            weights: (0..6).map(|i| seed * (i as f32 + 1.0) - 0.3).collect(),
            samples,
        };
        let all = [
            result(0, 0.1, 40),
            result(1, -0.7, 13),
            result(2, 1.3, 7),
            result(3, 0.2, 100),
            result(4, 2.0, 1),
        ];
        let pairs = |r: &[GroupResult]| -> Vec<(Vec<f32>, u64)> {
            r.iter().map(|r| (r.weights.clone(), r.samples)).collect()
        };
        let mean = |r: &[GroupResult]| {
            let owned = pairs(r);
            let updates: Vec<(&[f32], u64)> =
                owned.iter().map(|(w, n)| (w.as_slice(), *n)).collect();
            aggregate_with(AggregationRule::Mean, &global, &updates).unwrap()
        };
        // Two gateways (results 0–1 and 2–4) and the leader's mean of them.
        let first = partial(&global, &all[..2], 0).unwrap();
        let second = partial(&global, &all[2..], 1).unwrap();
        assert_eq!((first.samples, second.samples), (53, 108));
        let folded = mean(&[first, second]);
        let direct = mean(&all);
        for (a, b) in folded.iter().zip(&direct) {
            assert!((a - b).abs() < 1e-5, "{folded:?} vs {direct:?}");
        }
    }

    #[test]
    fn results_the_mean_would_leave_out_are_left_out_of_a_partial() {
        let global = vec![0.0f32; 3];
        let good = GroupResult {
            group: 0,
            weights: vec![1.0, 2.0, 3.0],
            samples: 10,
        };
        let short = GroupResult {
            group: 1,
            weights: vec![9.0, 9.0],
            samples: 1000,
        };
        let poisoned = GroupResult {
            group: 2,
            weights: vec![f32::NAN, 0.0, 0.0],
            samples: 1000,
        };
        let empty = GroupResult {
            group: 3,
            weights: vec![7.0, 7.0, 7.0],
            samples: 0,
        };
        let all = [good.clone(), short, poisoned, empty];
        let got = partial(&global, &all, 5).unwrap();
        assert_eq!(got.group, 5);
        assert_eq!(got.samples, 10);
        assert_eq!(got.weights, good.weights);
        assert!(partial(&global, &[], 0).is_none());
        // Given back whole, the same ones are left out.
        assert_eq!(usable(&global, &all), vec![good]);
    }

    #[test]
    fn every_result_laid_end_to_end_comes_back_as_it_went_and_a_robust_rule_sees_them_all() {
        // Three results of a gateway, laid end to end as it gives them
        // back, and the leader's own two.
        let global = vec![0.0f32; 4];
        let result = |group: usize, v: f32, samples: u64| GroupResult {
            group,
            weights: vec![v, -v, 2.0 * v, 0.5],
            samples,
        };
        let gateways = [result(0, 1.0, 5), result(1, 2.0, 6), result(2, 90.0, 7)];
        let laid: Vec<f32> = gateways.iter().flat_map(|r| r.weights.clone()).collect();
        let each: Vec<u64> = gateways.iter().map(|r| r.samples).collect();

        let back = split_laid(laid.clone(), &each, global.len(), 2).unwrap();

        for (i, (got, sent)) in back.iter().zip(&gateways).enumerate() {
            assert_eq!(
                (got.group, &got.weights, got.samples),
                (2 + i, &sent.weights, sent.samples)
            );
        }
        // The median over all five is the one a single server takes; over
        // the leader's two and one partial of the gateway's it is not.
        let own = [result(0, 0.0, 5), result(1, 50.0, 5)];
        let pairs = |r: &[GroupResult]| -> Vec<(Vec<f32>, u64)> {
            r.iter().map(|r| (r.weights.clone(), r.samples)).collect()
        };
        let median = |r: &[GroupResult]| {
            let owned = pairs(r);
            let updates: Vec<(&[f32], u64)> =
                owned.iter().map(|(w, n)| (w.as_slice(), *n)).collect();
            aggregate_with(AggregationRule::Median, &global, &updates).unwrap()
        };
        let mut every = own.to_vec();
        every.extend(back);
        let mut one_server = own.to_vec();
        one_server.extend(gateways.iter().cloned());
        assert_eq!(median(&every), median(&one_server));
        let mut folded = own.to_vec();
        folded.push(partial(&global, &gateways, 2).unwrap());
        assert_ne!(median(&folded), median(&one_server));
        // What does not split into whole results is refused.
        assert!(split_laid(laid.clone(), &each[..2], global.len(), 0).is_none());
        assert!(split_laid(laid[1..].to_vec(), &each, global.len(), 0).is_none());
        assert!(split_laid(laid, &[], global.len(), 0).is_none());
    }
}
