//! The papers' imbalance rebuilt on any labelled data: a long-tailed global class mix,
//! heavy-tailed client sizes, a random local mix, no sample on two clients, a balanced test set.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};

use super::{
    Partition, PartitionError, check_alpha, check_clients, check_labels, indices_by_class,
    sample_dirichlet,
};

/// Parameters of [`long_tail`]. The papers give the shape of their EMNIST imbalance (letter
/// frequencies, social-media upload counts) but not these numbers; the defaults are this
/// project's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LongTailConfig {
    /// Largest class size over smallest class size in the training mix (default 10; 20 for a
    /// harsher tail). Class sizes fall geometrically between the two.
    pub ratio: f64,
    /// Concentration of each client's Dirichlet class proportions (default 1.0: uniform over the
    /// simplex, so local mixes range from nearly balanced to dominated by a few classes). With
    /// ratio 10 the default gives a mean client KL to uniform of about 0.64 (10 classes, 100
    /// clients) and 0.79 (47 classes, 500 clients), against the papers' 0.550; alpha 5 gives 0.31
    /// and 0.57, alpha 0.5 gives 0.81 and 1.02.
    pub local_alpha: f64,
    /// Sigma of the lognormal client-size weights (default 1.0: the largest of 100 clients holds
    /// roughly ten times the median, a heavy tail like upload counts without one client owning
    /// the data set).
    pub size_sigma: f64,
    /// Samples every client gets at least (default 5), so every client can train a batch.
    pub min_client_size: usize,
    /// How many clients may hold each sample of the long tail (default 1: the clients' shards
    /// are disjoint). A population larger than the data shares it: each class's pool is
    /// repeated `reuse` times before it is dealt out, so 100,000 clients of at least 5 samples
    /// fit on MNIST's long tail (22,154 samples at ratio 10) with `reuse` 23 or more. The
    /// simulator holds shards as indices, so a shared sample costs no memory; a client may hold
    /// one sample twice where its draws from one class reach two copies of the pool.
    pub reuse: usize,
}

impl Default for LongTailConfig {
    fn default() -> Self {
        Self {
            ratio: 10.0,
            local_alpha: 1.0,
            size_sigma: 1.0,
            min_client_size: 5,
            reuse: 1,
        }
    }
}

/// Builds the imbalanced split of the papers' experiments.
///
/// 1. **Global mix.** Classes are put in a random (seeded) order; the class at rank r of N keeps
///    `round(n_max * ratio^(-r / (N - 1)))` training samples (at least 1), drawn without
///    replacement. `n_max` is the size of the smallest class in the data, so every class can
///    supply its quota; the rest of the training set is not used.
/// 2. **Client sizes.** Each client gets `min_client_size` samples plus a share of the remainder
///    proportional to a LogNormal(0, `size_sigma`) weight, rounded by largest remainder so the
///    sizes sum exactly to the subsampled total.
/// 3. **Local mix.** Each client draws class proportions from Dirichlet(`local_alpha`). Taken
///    literally these ask for more of the rare classes than exist, and filling clients one after
///    another would leave the last ones only the common classes. So the wishes (proportions times
///    client size) are first fitted by iterative proportional fitting to the global mix: each
///    client keeps its relative preferences, and the clients together ask for exactly the
///    subsampled class counts. Clients are then filled in a random order, one sample at a time,
///    choosing a class with probability proportional to what the client still lacks of its
///    target (among classes with samples left; rounding leftovers go by the samples left) and a
///    random sample of that class. Every subsampled sample goes to exactly one client.
/// 4. **Test set.** [`balanced_test_set`] with the same seed, so runs that differ only in `ratio`
///    evaluate on the same samples.
///
/// # Errors
/// Bad labels or parameters, no clients, an empty class, or fewer subsampled samples than
/// `num_clients * min_client_size`.
pub fn long_tail(
    train_labels: &[u32],
    test_labels: &[u32],
    num_classes: usize,
    num_clients: usize,
    config: &LongTailConfig,
    seed: u64,
) -> Result<Partition, PartitionError> {
    check_labels(train_labels, num_classes)?;
    if !(config.ratio >= 1.0 && config.ratio.is_finite()) {
        return Err(PartitionError::BadParameter {
            name: "long-tail ratio",
            expected: "at least 1",
            got: config.ratio,
        });
    }
    check_alpha("local alpha", config.local_alpha)?;
    let size_weights =
        LogNormal::new(0.0, config.size_sigma).map_err(|_| PartitionError::BadParameter {
            name: "size sigma",
            expected: "non-negative and finite",
            got: config.size_sigma,
        })?;
    let test_indices = balanced_test_set(test_labels, num_classes, seed)?;
    let mut rng = StdRng::seed_from_u64(seed);
    if config.reuse == 0 {
        return Err(PartitionError::BadParameter {
            name: "long-tail reuse",
            expected: "at least 1",
            got: 0.0,
        });
    }
    let mut pools = long_tail_pools(train_labels, num_classes, config.ratio, &mut rng)?;
    for pool in &mut pools {
        let once = pool.len();
        pool.reserve(once * (config.reuse - 1));
        for _ in 1..config.reuse {
            pool.extend_from_within(..once);
        }
    }
    let total: usize = pools.iter().map(Vec::len).sum();
    check_clients(total, num_clients, config.min_client_size)?;
    let weights: Vec<f64> = (0..num_clients)
        .map(|_| size_weights.sample(&mut rng))
        .collect();
    let sizes = client_sizes(&weights, total, config.min_client_size);
    let clients = fill_clients(pools, &sizes, config.local_alpha, &mut rng);
    Ok(Partition {
        clients,
        test_indices,
    })
}

/// The per-class pools of step 1 of [`long_tail`]: shuffled, truncated to each class's quota.
fn long_tail_pools(
    labels: &[u32],
    num_classes: usize,
    ratio: f64,
    rng: &mut StdRng,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let mut by_class = indices_by_class(labels, num_classes);
    let n_max = by_class.iter().map(Vec::len).min().unwrap_or(0);
    if let Some(class) = by_class.iter().position(Vec::is_empty) {
        return Err(PartitionError::EmptyClass {
            class,
            set: "training",
        });
    }
    let mut order: Vec<usize> = (0..num_classes).collect();
    order.shuffle(rng);
    let steps = num_classes.saturating_sub(1).max(1) as f64;
    for (rank, &class) in order.iter().enumerate() {
        let quota = (n_max as f64 * ratio.powf(-(rank as f64) / steps))
            .round()
            .max(1.0) as usize;
        let pool = &mut by_class[class];
        pool.shuffle(rng);
        pool.truncate(quota);
    }
    Ok(by_class)
}

/// Step 2 of [`long_tail`]: `min_size` each plus the rest split in proportion to `weights` by
/// largest remainder (ties to the lower index), so the sizes sum to exactly `total`.
/// The caller guarantees `total >= weights.len() * min_size`.
fn client_sizes(weights: &[f64], total: usize, min_size: usize) -> Vec<usize> {
    let spare = total - weights.len() * min_size;
    let weight_sum: f64 = weights.iter().sum();
    let shares: Vec<f64> = if weight_sum > 0.0 && weight_sum.is_finite() {
        weights
            .iter()
            .map(|w| spare as f64 * w / weight_sum)
            .collect()
    } else {
        vec![spare as f64 / weights.len() as f64; weights.len()]
    };
    let mut sizes: Vec<usize> = shares
        .iter()
        .map(|s| min_size + s.floor() as usize)
        .collect();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by(|&a, &b| {
        (shares[b] - shares[b].floor()).total_cmp(&(shares[a] - shares[a].floor()))
    });
    let assigned: usize = sizes.iter().sum();
    for &k in by_remainder.iter().cycle().take(total - assigned) {
        sizes[k] += 1;
    }
    sizes
}

/// Sinkhorn iterations used to fit the clients' class targets to the global class mix.
const FIT_ITERATIONS: usize = 200;

/// Step 3 of [`long_tail`]: deals every sample of `pools` to the clients, `sizes[k]` to client k,
/// following each client's Dirichlet class proportions fitted to the global mix.
fn fill_clients(
    mut pools: Vec<Vec<usize>>,
    sizes: &[usize],
    local_alpha: f64,
    rng: &mut StdRng,
) -> Vec<Vec<usize>> {
    let num_classes = pools.len();
    let supply: Vec<f64> = pools.iter().map(|p| p.len() as f64).collect();
    let wishes: Vec<Vec<f64>> = sizes
        .iter()
        .map(|&size| {
            let p = sample_dirichlet(rng, local_alpha, num_classes);
            // A small floor keeps every class reachable, so the fit below always converges.
            p.iter().map(|q| size as f64 * (q + 1e-6)).collect()
        })
        .collect();
    let targets = fit_margins(wishes, sizes, &supply);
    let mut clients = vec![Vec::new(); sizes.len()];
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.shuffle(rng);
    for k in order {
        let mut taken = vec![0.0; num_classes];
        for _ in 0..sizes[k] {
            let open = |c: usize| !pools[c].is_empty();
            let mut weights: Vec<f64> = (0..num_classes)
                .map(|c| {
                    if open(c) {
                        (targets[k][c] - taken[c]).max(0.0)
                    } else {
                        0.0
                    }
                })
                .collect();
            if weights.iter().sum::<f64>() <= 0.0 {
                weights = pools.iter().map(|p| p.len() as f64).collect();
            }
            let class = pick_weighted(&weights, rng);
            taken[class] += 1.0;
            let pool = &mut pools[class];
            let at = rng.random_range(0..pool.len());
            clients[k].push(pool.swap_remove(at));
        }
        clients[k].sort_unstable();
    }
    clients
}

/// Scales `matrix` (clients x classes, positive) alternately by column and by row so its column
/// sums approach `supply` and its row sums equal `sizes` (iterative proportional fitting). The
/// result keeps each client's relative preferences while the clients together ask for exactly
/// the long-tailed global mix.
fn fit_margins(mut matrix: Vec<Vec<f64>>, sizes: &[usize], supply: &[f64]) -> Vec<Vec<f64>> {
    for _ in 0..FIT_ITERATIONS {
        for (c, &wanted) in supply.iter().enumerate() {
            let column: f64 = matrix.iter().map(|row| row[c]).sum();
            let scale = if column > 0.0 { wanted / column } else { 0.0 };
            matrix.iter_mut().for_each(|row| row[c] *= scale);
        }
        for (row, &size) in matrix.iter_mut().zip(sizes) {
            let sum: f64 = row.iter().sum();
            if sum > 0.0 {
                row.iter_mut().for_each(|x| *x *= size as f64 / sum);
            }
        }
    }
    matrix
}

/// An index drawn with probability proportional to `weights` (non-negative, positive sum); the
/// last index with positive weight absorbs rounding.
fn pick_weighted(weights: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut target = rng.random::<f64>() * total;
    let last = weights.iter().rposition(|&w| w > 0.0).unwrap_or(0);
    for (i, &w) in weights.iter().enumerate().take(last) {
        if target < w {
            return i;
        }
        target -= w;
    }
    last
}

/// A class-balanced test set: for every class, `m` test indices drawn without replacement, with
/// `m` the size of the smallest test class; returned sorted.
///
/// Top-1 accuracy on it is the papers' balanced accuracy, so a model cannot score by favouring
/// the classes that are common in training. It depends only on the test labels and the seed.
///
/// # Errors
/// A label out of range, or a class with no test samples.
pub fn balanced_test_set(
    test_labels: &[u32],
    num_classes: usize,
    seed: u64,
) -> Result<Vec<usize>, PartitionError> {
    check_labels(test_labels, num_classes)?;
    let mut by_class = indices_by_class(test_labels, num_classes);
    if let Some(class) = by_class.iter().position(Vec::is_empty) {
        return Err(PartitionError::EmptyClass { class, set: "test" });
    }
    let per_class = by_class.iter().map(Vec::len).min().unwrap_or(0);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut chosen = Vec::with_capacity(per_class * num_classes);
    for samples in &mut by_class {
        samples.shuffle(&mut rng);
        chosen.extend_from_slice(&samples[..per_class]);
    }
    chosen.sort_unstable();
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::tests::{assert_disjoint, test_labels, train_labels};

    #[test]
    fn reuse_lets_more_clients_share_the_tail_each_sample_at_most_reuse_times() {
        // Prepare: disjoint shards of 5 cannot serve 1,000 clients from the fixture's tail.
        let config = |reuse| LongTailConfig {
            reuse,
            ..LongTailConfig::default()
        };
        let (train, test) = (train_labels(), test_labels());
        let once = long_tail(&train, &test, 10, 10, &config(1), 3).unwrap();
        let pool: usize = once.clients.iter().map(Vec::len).sum();
        let clients = pool / 5 + 1;
        assert!(long_tail(&train, &test, 10, clients, &config(1), 3).is_err());

        // Execute
        let shared = long_tail(&train, &test, 10, clients, &config(4), 3).unwrap();

        // Assert: four times the pool dealt out, every client at least 5, no sample more
        // than four times, and only samples of the tail.
        assert_eq!(shared.clients.len(), clients);
        assert!(shared.clients.iter().all(|c| c.len() >= 5));
        assert_eq!(shared.clients.iter().map(Vec::len).sum::<usize>(), 4 * pool);
        let mut times = std::collections::HashMap::new();
        for &i in shared.clients.iter().flatten() {
            *times.entry(i).or_insert(0) += 1;
        }
        assert!(times.values().all(|&t| t <= 4));
        assert!(times.len() <= pool);
        assert!(long_tail(&train, &test, 10, clients, &config(0), 3).is_err());
    }

    /// The fixture's smallest class has 100 samples, so the long tail runs from 100 down to
    /// 100 / ratio.
    fn build(ratio: f64, num_clients: usize, seed: u64) -> Result<Partition, PartitionError> {
        let config = LongTailConfig {
            ratio,
            ..LongTailConfig::default()
        };
        long_tail(
            &train_labels(),
            &test_labels(),
            10,
            num_clients,
            &config,
            seed,
        )
    }

    /// The class quotas of step 1, largest first: 100 * ratio^(-r/9).
    fn quotas(ratio: f64) -> Vec<usize> {
        (0..10)
            .map(|r| (100.0 * ratio.powf(-(r as f64) / 9.0)).round() as usize)
            .collect()
    }

    #[test]
    fn long_tail_uses_each_subsampled_sample_exactly_once() {
        // Prepare
        let labels = train_labels();
        // Execute
        let partition = build(10.0, 20, 1).unwrap();
        // Assert: disjoint, and complete: the clients hold exactly the quotas, all of them.
        let union = assert_disjoint(&partition);
        assert_eq!(union.len(), quotas(10.0).iter().sum::<usize>());
        let mut counts = partition.global_counts(&labels, 10);
        counts.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(counts, quotas(10.0));
    }

    #[test]
    fn long_tail_class_ratio_is_close_to_the_requested_one() {
        for ratio in [10.0, 20.0] {
            // Prepare
            let labels = train_labels();
            // Execute
            let counts = build(ratio, 10, 2).unwrap().global_counts(&labels, 10);
            // Assert
            let (max, min) = (
                *counts.iter().max().unwrap() as f64,
                *counts.iter().min().unwrap() as f64,
            );
            assert!(
                (max / min - ratio).abs() / ratio < 0.05,
                "ratio {ratio}: counts {counts:?}"
            );
            assert_eq!(max, 100.0);
        }
    }

    #[test]
    fn long_tail_is_reproducible_and_seed_dependent() {
        // Prepare, Execute
        let (a, b, c) = (
            build(10.0, 15, 3).unwrap(),
            build(10.0, 15, 3).unwrap(),
            build(10.0, 15, 4).unwrap(),
        );
        // Assert
        assert_eq!(a, b);
        assert_ne!(a.clients, c.clients);
    }

    #[test]
    fn long_tail_client_sizes_are_heavy_tailed_with_a_floor() {
        // Prepare: 1,000 samples, ratio 1 (no global tail), 50 clients.
        let config = LongTailConfig {
            ratio: 1.0,
            ..LongTailConfig::default()
        };
        // Execute
        let partition = long_tail(&train_labels(), &test_labels(), 10, 50, &config, 5).unwrap();
        // Assert
        let report = partition.report(&train_labels(), 10);
        assert_eq!(partition.num_samples(), 1000);
        assert!(
            report.client_sizes.min >= config.min_client_size,
            "{report:?}"
        );
        assert!(
            report.client_sizes.max > 3 * report.client_sizes.median,
            "{report:?}"
        );
        assert!(
            report.global_kl < 1e-12 && report.mean_client_kl > 0.2,
            "{report:?}"
        );
    }

    #[test]
    fn long_tail_test_set_is_balanced() {
        // Prepare: the smallest test class (class 0) has 30 samples.
        let test = test_labels();
        // Execute
        let partition = build(10.0, 10, 6).unwrap();
        // Assert
        let counts = Partition {
            clients: vec![partition.test_indices.clone()],
            test_indices: vec![],
        }
        .global_counts(&test, 10);
        assert_eq!(counts, vec![30; 10]);
        assert_eq!(
            partition.test_indices,
            balanced_test_set(&test, 10, 6).unwrap()
        );
    }

    #[test]
    fn long_tail_rejects_impossible_requests() {
        // Prepare: ratio 10 leaves 409 samples, fewer than 100 clients * 5.
        let labels = train_labels();
        // Execute
        let too_many = build(10.0, 100, 0);
        let bad_ratio = build(0.5, 10, 0);
        let empty_test = long_tail(&labels, &[0, 1], 10, 10, &LongTailConfig::default(), 0);
        // Assert
        assert_eq!(
            too_many,
            Err(PartitionError::TooFewSamples {
                samples: 409,
                clients: 100,
                per_client: 5
            })
        );
        assert!(
            matches!(
                bad_ratio,
                Err(PartitionError::BadParameter { got: 0.5, .. })
            ),
            "{bad_ratio:?}"
        );
        assert_eq!(
            empty_test,
            Err(PartitionError::EmptyClass {
                class: 2,
                set: "test"
            })
        );
    }

    #[test]
    fn fitted_local_mix_leaves_late_clients_no_worse_off() {
        // Prepare: near-uniform wishes (alpha 1000); filling clients in turn without fitting
        // would leave the last ones only the common classes and a mean client KL near 1.
        let config = LongTailConfig {
            local_alpha: 1000.0,
            ..LongTailConfig::default()
        };
        // Execute
        let partition = long_tail(&train_labels(), &test_labels(), 10, 8, &config, 7).unwrap();
        // Assert: clients look like the global mix, up to sampling noise of about 50 samples.
        let report = partition.report(&train_labels(), 10);
        assert!(
            report.mean_client_kl < report.global_kl + 0.15,
            "{report:?}"
        );
    }

    #[test]
    fn client_sizes_sum_exactly_and_respect_the_floor() {
        // Prepare
        let weights = [0.1, 3.0, 1.0, 0.0, 2.5];
        // Execute
        let sizes = client_sizes(&weights, 103, 5);
        // Assert
        assert_eq!(sizes.iter().sum::<usize>(), 103);
        assert_eq!(sizes[3], 5);
        assert!(
            sizes.iter().all(|&s| s >= 5) && sizes[1] > sizes[4] && sizes[4] > sizes[2],
            "{sizes:?}"
        );
    }
}
