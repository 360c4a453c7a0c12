//! The usual non-IID benchmarks: the per-class Dirichlet split and McMahan et al.'s pathological
//! label shards. Both use every training sample and leave the global class mix as the data has it.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::{
    Partition, PartitionError, check_alpha, check_clients, check_labels, indices_by_class,
    sample_dirichlet,
};

/// How many times [`dirichlet`] redraws the whole split before giving up on leaving no client
/// empty; small alphas with many clients can need a few tries.
pub const DIRICHLET_ATTEMPTS: usize = 100;

/// Dirichlet split: for each class, its shuffled samples are cut among clients in proportions
/// drawn from Dirichlet(alpha, ..., alpha) (Hsu et al. 2019). Every training sample is used.
///
/// Small alpha can leave a client with nothing; then the whole split is redrawn, up to
/// [`DIRICHLET_ATTEMPTS`] times.
///
/// # Errors
/// Bad labels or alpha, no clients, fewer samples than clients, or still an empty client after the
/// last attempt.
pub fn dirichlet(
    labels: &[u32],
    num_classes: usize,
    alpha: f64,
    num_clients: usize,
    test_indices: Vec<usize>,
    seed: u64,
) -> Result<Partition, PartitionError> {
    check_labels(labels, num_classes)?;
    check_alpha("dirichlet alpha", alpha)?;
    check_clients(labels.len(), num_clients, 1)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let by_class = indices_by_class(labels, num_classes);
    let mut empty = num_clients;
    for _ in 0..DIRICHLET_ATTEMPTS {
        let mut clients = vec![Vec::new(); num_clients];
        for class_samples in &by_class {
            let mut samples = class_samples.clone();
            samples.shuffle(&mut rng);
            let p = sample_dirichlet(&mut rng, alpha, num_clients);
            let (mut start, mut cumulative) = (0, 0.0);
            for (k, share) in p.iter().enumerate() {
                cumulative += share;
                let end = if k + 1 == num_clients {
                    samples.len()
                } else {
                    ((cumulative * samples.len() as f64).round() as usize)
                        .clamp(start, samples.len())
                };
                clients[k].extend_from_slice(&samples[start..end]);
                start = end;
            }
        }
        empty = clients.iter().filter(|c| c.is_empty()).count();
        if empty == 0 {
            clients.iter_mut().for_each(|c| c.sort_unstable());
            return Ok(Partition {
                clients,
                test_indices,
            });
        }
    }
    Err(PartitionError::EmptyClients {
        empty,
        clients: num_clients,
        attempts: DIRICHLET_ATTEMPTS,
    })
}

/// Pathological split (McMahan et al. 2017): samples sorted by label (random order within a
/// class) are cut into `num_clients * shards_per_client` contiguous shards of near-equal size,
/// and each client gets `shards_per_client` of them at random. A repair pass then swaps shards
/// between clients where that removes a repeated class, so a client's shards mostly cover
/// distinct classes. Every training sample is used.
///
/// # Errors
/// Bad labels, zero shards per client, no clients, or fewer samples than shards.
pub fn pathological(
    labels: &[u32],
    num_classes: usize,
    shards_per_client: usize,
    num_clients: usize,
    test_indices: Vec<usize>,
    seed: u64,
) -> Result<Partition, PartitionError> {
    check_labels(labels, num_classes)?;
    if shards_per_client == 0 {
        return Err(PartitionError::BadParameter {
            name: "shards per client",
            expected: "at least 1",
            got: 0.0,
        });
    }
    check_clients(labels.len(), num_clients, shards_per_client)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sorted: Vec<usize> = (0..labels.len()).collect();
    sorted.shuffle(&mut rng);
    sorted.sort_by_key(|&i| labels[i]);
    let num_shards = num_clients * shards_per_client;
    let (base, extra) = (sorted.len() / num_shards, sorted.len() % num_shards);
    let mut shards = Vec::with_capacity(num_shards);
    let mut rest = sorted.as_slice();
    for s in 0..num_shards {
        let (shard, tail) = rest.split_at(base + usize::from(s < extra));
        shards.push(shard);
        rest = tail;
    }
    let mut order: Vec<usize> = (0..num_shards).collect();
    order.shuffle(&mut rng);
    let class_of = |shard: usize| labels[shards[shard][0]];
    let mut owned: Vec<Vec<usize>> = order
        .chunks(shards_per_client)
        .map(<[usize]>::to_vec)
        .collect();
    repair_repeats(&mut owned, class_of);
    let clients = owned
        .iter()
        .map(|mine| {
            let mut client: Vec<usize> = mine
                .iter()
                .flat_map(|&s| shards[s].iter().copied())
                .collect();
            client.sort_unstable();
            client
        })
        .collect();
    Ok(Partition {
        clients,
        test_indices,
    })
}

/// Swaps shards between clients so fewer clients hold two shards of the same (leading) class.
/// A swap is made only when neither client ends up with a repeat it did not have, so the pass
/// never makes things worse; it is one sweep, O(shards^2), deterministic given its input.
fn repair_repeats(owned: &mut [Vec<usize>], class_of: impl Fn(usize) -> u32) {
    let has = |client: &[usize], skip: usize, class: u32| {
        client
            .iter()
            .enumerate()
            .any(|(i, &s)| i != skip && class_of(s) == class)
    };
    for a in 0..owned.len() {
        for i in 0..owned[a].len() {
            if !has(&owned[a], i, class_of(owned[a][i])) {
                continue;
            }
            'search: for b in 0..owned.len() {
                if b == a {
                    continue;
                }
                for j in 0..owned[b].len() {
                    let (mine, theirs) = (owned[a][i], owned[b][j]);
                    if !has(&owned[a], i, class_of(theirs)) && !has(&owned[b], j, class_of(mine)) {
                        owned[a][i] = theirs;
                        owned[b][j] = mine;
                        break 'search;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::tests::{assert_disjoint, train_labels};

    #[test]
    fn dirichlet_uses_every_sample_once_and_leaves_no_client_empty() {
        // Prepare
        let labels = train_labels();
        // Execute
        let partition = dirichlet(&labels, 10, 0.3, 30, vec![], 11).unwrap();
        // Assert
        assert_eq!(assert_disjoint(&partition).len(), labels.len());
        assert!(partition.clients.iter().all(|c| !c.is_empty()));
    }

    #[test]
    fn dirichlet_is_reproducible_and_seed_dependent() {
        // Prepare
        let labels = train_labels();
        // Execute
        let a = dirichlet(&labels, 10, 0.5, 10, vec![], 1).unwrap();
        let b = dirichlet(&labels, 10, 0.5, 10, vec![], 1).unwrap();
        let c = dirichlet(&labels, 10, 0.5, 10, vec![], 2).unwrap();
        // Assert
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn smaller_dirichlet_alpha_skews_clients_more() {
        // Prepare
        let labels = train_labels();
        // Execute
        let skewed = dirichlet(&labels, 10, 0.1, 10, vec![], 3)
            .unwrap()
            .report(&labels, 10);
        let mild = dirichlet(&labels, 10, 100.0, 10, vec![], 3)
            .unwrap()
            .report(&labels, 10);
        // Assert
        assert!(
            skewed.mean_client_kl > 0.5 && mild.mean_client_kl < 0.1,
            "{skewed:?} {mild:?}"
        );
    }

    #[test]
    fn dirichlet_rejects_bad_alpha() {
        // Prepare
        let labels = train_labels();
        // Execute
        let result = dirichlet(&labels, 10, 0.0, 10, vec![], 3);
        // Assert
        assert!(
            matches!(result, Err(PartitionError::BadParameter { got: 0.0, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn pathological_uses_every_sample_and_gives_few_classes_per_client() {
        // Prepare: 40 shards of about 36 samples over 10 classes of 100..280 samples.
        let labels = train_labels();
        // Execute
        let partition = pathological(&labels, 10, 2, 20, vec![], 5).unwrap();
        // Assert
        assert_eq!(assert_disjoint(&partition).len(), labels.len());
        let classes: Vec<usize> = partition
            .client_counts(&labels, 10)
            .iter()
            .map(|c| c.iter().filter(|&&n| n > 0).count())
            .collect();
        // A shard can straddle two classes, so a client sees at most 2 * 2 classes, and after the
        // repair pass at least 2 (its two shards lead with distinct classes).
        assert!(classes.iter().all(|&n| (2..=4).contains(&n)), "{classes:?}");
    }

    #[test]
    fn pathological_is_reproducible_and_seed_dependent() {
        // Prepare
        let labels = train_labels();
        // Execute
        let a = pathological(&labels, 10, 2, 20, vec![], 1).unwrap();
        let b = pathological(&labels, 10, 2, 20, vec![], 1).unwrap();
        let c = pathological(&labels, 10, 2, 20, vec![], 2).unwrap();
        // Assert
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
