//! IID splits: the no-imbalance reference, the same data re-spread IID, and the balanced IID
//! baseline of the papers' "FedAvg on IID data".

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::{Partition, PartitionError, check_clients, check_labels, indices_by_class};

/// Deals shuffled `pool` into `num_clients` near-equal, sorted client lists (the first
/// `len % num_clients` clients get one sample more).
fn deal_equally(mut pool: Vec<usize>, num_clients: usize, rng: &mut StdRng) -> Vec<Vec<usize>> {
    pool.shuffle(rng);
    let (base, extra) = (pool.len() / num_clients, pool.len() % num_clients);
    let mut rest = pool.as_slice();
    (0..num_clients)
        .map(|k| {
            let (mine, tail) = rest.split_at(base + usize::from(k < extra));
            rest = tail;
            let mut client = mine.to_vec();
            client.sort_unstable();
            client
        })
        .collect()
}

/// IID split: every training sample, shuffled, dealt into `num_clients` near-equal clients.
///
/// `test_indices` is passed through (usually the whole test set).
///
/// # Errors
/// No clients, or fewer samples than clients.
pub fn iid(
    labels: &[u32],
    num_clients: usize,
    test_indices: Vec<usize>,
    seed: u64,
) -> Result<Partition, PartitionError> {
    check_clients(labels.len(), num_clients, 1)?;
    let mut rng = StdRng::seed_from_u64(seed);
    Ok(Partition {
        clients: deal_equally((0..labels.len()).collect(), num_clients, &mut rng),
        test_indices,
    })
}

/// Re-spreads the samples of `partition` IID over `num_clients` clients, keeping its test set.
///
/// This keeps the *same* global class mix, imbalance included, and removes only the local skew.
/// It is not the papers' "FedAvg on IID data" reference, which has no global imbalance: for that
/// use [`balanced_iid_like`].
///
/// # Errors
/// No clients, or fewer samples than clients.
pub fn iid_of(
    partition: &Partition,
    num_clients: usize,
    seed: u64,
) -> Result<Partition, PartitionError> {
    let pool: Vec<usize> = partition.clients.iter().flatten().copied().collect();
    check_clients(pool.len(), num_clients, 1)?;
    let mut rng = StdRng::seed_from_u64(seed);
    Ok(Partition {
        clients: deal_equally(pool, num_clients, &mut rng),
        test_indices: partition.test_indices.clone(),
    })
}

/// The balanced IID baseline: `total` training samples with an equal number per class (classes
/// picked at random get one more when `total` is not a multiple of `num_classes`), drawn without
/// replacement and dealt IID into `num_clients` clients.
///
/// This is the papers' "FedAvg on IID data": the same amount of data as an imbalanced run but no
/// global imbalance, so the accuracy gap measures what the imbalance costs. `test_indices` is left
/// empty for the caller to set; [`balanced_iid_like`] copies it from the imbalanced partition.
///
/// # Errors
/// Bad labels, no clients, `total` below `num_clients`, or a class with too few samples.
pub fn balanced_iid(
    labels: &[u32],
    num_classes: usize,
    total: usize,
    num_clients: usize,
    seed: u64,
) -> Result<Partition, PartitionError> {
    check_labels(labels, num_classes)?;
    check_clients(total, num_clients, 1)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut by_class = indices_by_class(labels, num_classes);
    let mut order: Vec<usize> = (0..num_classes).collect();
    order.shuffle(&mut rng);
    let mut pool = Vec::with_capacity(total);
    for (rank, &class) in order.iter().enumerate() {
        let needed = total / num_classes + usize::from(rank < total % num_classes);
        let samples = &mut by_class[class];
        if samples.len() < needed {
            return Err(PartitionError::ClassTooSmall {
                class,
                available: samples.len(),
                needed,
            });
        }
        samples.shuffle(&mut rng);
        pool.extend_from_slice(&samples[..needed]);
    }
    Ok(Partition {
        clients: deal_equally(pool, num_clients, &mut rng),
        test_indices: Vec::new(),
    })
}

/// [`balanced_iid`] with the total size, client count and test set of `reference` (typically a
/// [`long_tail`](super::long_tail) partition), so the two runs differ only in the class mix.
///
/// # Errors
/// As [`balanced_iid`].
pub fn balanced_iid_like(
    reference: &Partition,
    labels: &[u32],
    num_classes: usize,
    seed: u64,
) -> Result<Partition, PartitionError> {
    let mut partition = balanced_iid(
        labels,
        num_classes,
        reference.num_samples(),
        reference.clients.len(),
        seed,
    )?;
    partition.test_indices = reference.test_indices.clone();
    Ok(partition)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::tests::{assert_disjoint, test_labels, train_labels};
    use crate::partition::{LongTailConfig, long_tail};

    #[test]
    fn iid_uses_every_sample_once_in_near_equal_clients() {
        // Prepare
        let labels = train_labels();
        // Execute
        let partition = iid(&labels, 7, vec![1, 2], 3).unwrap();
        // Assert
        assert_eq!(assert_disjoint(&partition).len(), labels.len());
        let sizes: Vec<usize> = partition.clients.iter().map(Vec::len).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
        assert_eq!(partition.test_indices, vec![1, 2]);
    }

    #[test]
    fn iid_is_reproducible_and_seed_dependent() {
        // Prepare
        let labels = train_labels();
        // Execute
        let (a, b, c) = (
            iid(&labels, 5, vec![], 1),
            iid(&labels, 5, vec![], 1),
            iid(&labels, 5, vec![], 2),
        );
        // Assert
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn iid_rejects_more_clients_than_samples() {
        // Prepare
        let labels = [0, 1, 2];
        // Execute
        let result = iid(&labels, 4, vec![], 0);
        // Assert
        assert_eq!(
            result,
            Err(PartitionError::TooFewSamples {
                samples: 3,
                clients: 4,
                per_client: 1
            })
        );
    }

    #[test]
    fn iid_of_respreads_the_same_samples_and_keeps_the_test_set() {
        // Prepare
        let (train, test) = (train_labels(), test_labels());
        let tail = long_tail(&train, &test, 10, 12, &LongTailConfig::default(), 4).unwrap();
        // Execute
        let spread = iid_of(&tail, 12, 5).unwrap();
        // Assert
        assert_eq!(assert_disjoint(&spread), assert_disjoint(&tail));
        assert_eq!(spread.test_indices, tail.test_indices);
        assert_eq!(
            spread.global_counts(&train, 10),
            tail.global_counts(&train, 10)
        );
    }

    #[test]
    fn balanced_iid_like_matches_size_and_test_set_with_equal_classes() {
        // Prepare: 10 classes, so a total of 403 gives three classes 41 samples and seven 40.
        let (train, test) = (train_labels(), test_labels());
        let tail = long_tail(&train, &test, 10, 9, &LongTailConfig::default(), 4).unwrap();
        let reference = Partition {
            clients: vec![tail.clients.concat()[..403].to_vec()],
            ..tail
        };
        // Execute
        let balanced = balanced_iid_like(&reference, &train, 10, 6).unwrap();
        // Assert
        assert_eq!(balanced.num_samples(), 403);
        assert_eq!(balanced.clients.len(), 1);
        assert_eq!(balanced.test_indices, reference.test_indices);
        let mut counts = balanced.global_counts(&train, 10);
        counts.sort_unstable();
        assert_eq!(counts, [vec![40; 7], vec![41; 3]].concat());
        assert_eq!(assert_disjoint(&balanced).len(), 403);
    }

    #[test]
    fn balanced_iid_reports_a_class_too_small() {
        // Prepare: class 0 has 100 samples, so 1,010 in all needs 101 of it.
        let labels = train_labels();
        // Execute
        let result = balanced_iid(&labels, 10, 1010, 10, 0);
        // Assert
        assert_eq!(
            result,
            Err(PartitionError::ClassTooSmall {
                class: 0,
                available: 100,
                needed: 101
            })
        );
    }
}
