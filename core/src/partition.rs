//! Splitting a labelled training set among simulated clients, and measuring how skewed the split is.
//!
//! Every partitioner sees only the labels (`&[u32]`) and returns indices, so it works for any data
//! set the loaders read. All randomness comes from a `seed: u64` through
//! `StdRng::seed_from_u64`, so a partition is reproducible from its [`PartitionSpec`] and seed.
//! Each client's index list is sorted ascending; the trainer shuffles per epoch, and sorted lists
//! make partitions easy to compare and to log.
//!
//! # Layout
//! - this file: [`Partition`], its [`PartitionReport`], the KL measure;
//! - `spec`: [`PartitionSpec`], the partitioner named in configs and on the command line;
//! - `iid`: [`iid`], [`iid_of`] (same data re-spread) and [`balanced_iid`] /
//!   [`balanced_iid_like`] (the papers' balanced IID baseline on the same amount of data);
//! - `skewed`: the usual non-IID benchmarks, [`dirichlet`] and [`pathological`];
//! - `longtail`: [`long_tail`], which rebuilds the papers' global and local imbalance, and
//!   [`balanced_test_set`].

use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

mod iid;
mod longtail;
mod skewed;
mod spec;

pub use iid::{balanced_iid, balanced_iid_like, iid, iid_of};
pub use longtail::{LongTailConfig, balanced_test_set, long_tail};
pub use skewed::{DIRICHLET_ATTEMPTS, dirichlet, pathological};
pub use spec::PartitionSpec;

/// Why a partition could not be built; each message carries the numbers involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PartitionError {
    /// A partition needs at least one client to give data to.
    #[error("num_clients must be at least 1, got {got}")]
    NoClients {
        /// The client count asked for.
        got: usize,
    },
    /// Every client must get at least `per_client` samples.
    #[error(
        "cannot give {clients} clients at least {per_client} samples each from {samples} samples"
    )]
    TooFewSamples {
        /// Samples available.
        samples: usize,
        /// Clients asked for.
        clients: usize,
        /// Minimum samples per client.
        per_client: usize,
    },
    /// A label is not below `num_classes`.
    #[error("label {label} at index {index} is out of range for {num_classes} classes")]
    LabelOutOfRange {
        /// Position of the label.
        index: usize,
        /// The label.
        label: u32,
        /// Number of classes.
        num_classes: usize,
    },
    /// A class the split needs has no samples.
    #[error("class {class} has no samples in the {set} set")]
    EmptyClass {
        /// The class.
        class: usize,
        /// `"training"` or `"test"`.
        set: &'static str,
    },
    /// A class cannot supply the number of samples the split asks of it.
    #[error("class {class} has {available} samples but {needed} are needed")]
    ClassTooSmall {
        /// The class.
        class: usize,
        /// Samples it has.
        available: usize,
        /// Samples asked for.
        needed: usize,
    },
    /// A numeric parameter is outside its valid range.
    #[error("{name} must be {expected}, got {got}")]
    BadParameter {
        /// Parameter name.
        name: &'static str,
        /// What is valid, in words.
        expected: &'static str,
        /// The value given.
        got: f64,
    },
    /// The Dirichlet split kept leaving clients without data.
    #[error("dirichlet split left {empty} of {clients} clients empty after {attempts} attempts")]
    EmptyClients {
        /// Empty clients in the last attempt.
        empty: usize,
        /// Clients asked for.
        clients: usize,
        /// Attempts made.
        attempts: usize,
    },
    /// A command-line partition string could not be read.
    #[error("cannot parse partition spec {spec:?}: {reason}")]
    Parse {
        /// The string given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Which training samples each client holds, and which test samples to evaluate on.
///
/// Indices, not copies, so one loaded data set serves every partition and the experiment can log
/// exactly which samples went where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Indices into the training set, one sorted list per client; no index appears twice.
    pub clients: Vec<Vec<usize>>,
    /// Indices into the test set to evaluate on (the whole set, or a class-balanced subset).
    pub test_indices: Vec<usize>,
}

/// Client sizes in samples, summarised for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeSummary {
    /// Smallest client.
    pub min: usize,
    /// Lower median client (the middle one, or the lower of the two middle ones).
    pub median: usize,
    /// Largest client.
    pub max: usize,
}

/// How imbalanced a partition is, in the terms the papers report (KL divergence to uniform).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionReport {
    /// Mean over clients of D_KL(client label mix || uniform); the papers quote 0.550 for
    /// FedAvg's clients on imbalanced EMNIST.
    pub mean_client_kl: f64,
    /// D_KL(global label mix || uniform): the global imbalance Astraea corrects.
    pub global_kl: f64,
    /// Client sizes.
    pub client_sizes: SizeSummary,
    /// Training samples per class over all clients.
    pub global_counts: Vec<usize>,
}

impl Partition {
    /// Samples per class for each client, the vector n_k a client reports in Astraea's step 1.
    ///
    /// # Panics
    /// If an index or label is out of range; partitions built here from the same labels never are.
    pub fn client_counts(&self, labels: &[u32], num_classes: usize) -> Vec<Vec<usize>> {
        self.clients
            .iter()
            .map(|c| class_counts(labels, c, num_classes))
            .collect()
    }

    /// Samples per class over all clients together (C in Astraea's step 2).
    ///
    /// # Panics
    /// As [`Partition::client_counts`].
    pub fn global_counts(&self, labels: &[u32], num_classes: usize) -> Vec<usize> {
        let mut total = vec![0; num_classes];
        for counts in self.client_counts(labels, num_classes) {
            total.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
        }
        total
    }

    /// Training samples held by all clients together.
    pub fn num_samples(&self) -> usize {
        self.clients.iter().map(Vec::len).sum()
    }

    /// The imbalance figures logged for every experiment.
    ///
    /// # Panics
    /// As [`Partition::client_counts`].
    pub fn report(&self, labels: &[u32], num_classes: usize) -> PartitionReport {
        let per_client = self.client_counts(labels, num_classes);
        let mean_client_kl = if per_client.is_empty() {
            0.0
        } else {
            per_client.iter().map(|c| kl_to_uniform(c)).sum::<f64>() / per_client.len() as f64
        };
        let global_counts = self.global_counts(labels, num_classes);
        let mut sizes: Vec<usize> = self.clients.iter().map(Vec::len).collect();
        sizes.sort_unstable();
        let client_sizes = SizeSummary {
            min: sizes.first().copied().unwrap_or(0),
            median: sizes
                .get(sizes.len().saturating_sub(1) / 2)
                .copied()
                .unwrap_or(0),
            max: sizes.last().copied().unwrap_or(0),
        };
        PartitionReport {
            mean_client_kl,
            global_kl: kl_to_uniform(&global_counts),
            client_sizes,
            global_counts,
        }
    }
}

/// Counts the labels of `indices` per class.
///
/// # Panics
/// If an index is out of range for `labels` or a label is not below `num_classes`.
pub fn class_counts(labels: &[u32], indices: &[usize], num_classes: usize) -> Vec<usize> {
    let mut counts = vec![0; num_classes];
    for &i in indices {
        counts[labels[i] as usize] += 1;
    }
    counts
}

/// D_KL(p || uniform) with p the normalised `counts`, in nats.
///
/// This is the imbalance measure of the papers and of Astraea's mediator rescheduling. An all-zero
/// vector (an empty client) counts as balanced and gives 0; a one-hot vector over N classes gives
/// ln N, the maximum.
pub fn kl_to_uniform(counts: &[usize]) -> f64 {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let p: Vec<f64> = counts.iter().map(|&c| c as f64 / total as f64).collect();
    kl_to_uniform_probs(&p)
}

/// D_KL(p || uniform) for a probability vector `p` (already summing to 1), in nats, with
/// 0 * ln 0 = 0; for callers that hold fractional counts (for example planned, not yet applied,
/// augmentation).
pub fn kl_to_uniform_probs(p: &[f64]) -> f64 {
    let n = p.len() as f64;
    p.iter()
        .filter(|&&q| q > 0.0)
        .map(|&q| q * (q * n).ln())
        .sum()
}

/// Checks that every label is below `num_classes`, so later indexing cannot panic.
fn check_labels(labels: &[u32], num_classes: usize) -> Result<(), PartitionError> {
    match labels.iter().position(|&l| l as usize >= num_classes) {
        Some(index) => Err(PartitionError::LabelOutOfRange {
            index,
            label: labels[index],
            num_classes,
        }),
        None => Ok(()),
    }
}

/// Checks for at least one client and `per_client` samples for each.
fn check_clients(
    samples: usize,
    num_clients: usize,
    per_client: usize,
) -> Result<(), PartitionError> {
    if num_clients == 0 {
        return Err(PartitionError::NoClients { got: 0 });
    }
    if samples < num_clients * per_client {
        return Err(PartitionError::TooFewSamples {
            samples,
            clients: num_clients,
            per_client,
        });
    }
    Ok(())
}

/// Training indices grouped by class.
fn indices_by_class(labels: &[u32], num_classes: usize) -> Vec<Vec<usize>> {
    let mut by_class = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    by_class
}

/// A draw from the symmetric Dirichlet(alpha, ..., alpha) over `n` categories, through
/// normalised Gamma(alpha, 1) draws (rand_distr 0.5's `Dirichlet` needs a compile-time size).
/// If every Gamma draw underflows to 0 (possible for tiny alpha) the result is one-hot on a random
/// category, the limit the distribution approaches.
fn sample_dirichlet(rng: &mut StdRng, alpha: f64, n: usize) -> Vec<f64> {
    let gamma = Gamma::new(alpha, 1.0).expect("alpha was checked positive and finite");
    let mut p: Vec<f64> = (0..n).map(|_| gamma.sample(rng)).collect();
    let sum: f64 = p.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        p.iter_mut().for_each(|q| *q /= sum);
    } else {
        p = vec![0.0; n];
        p[rng.random_range(0..n)] = 1.0;
    }
    p
}

/// Checks that a concentration parameter is positive and finite.
fn check_alpha(name: &'static str, alpha: f64) -> Result<(), PartitionError> {
    if alpha > 0.0 && alpha.is_finite() {
        Ok(())
    } else {
        Err(PartitionError::BadParameter {
            name,
            expected: "positive and finite",
            got: alpha,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    use std::collections::HashSet;

    /// Training labels of 10 uneven classes (class c has 100 + 20c samples), shuffled; the
    /// fixture shared by the partitioner tests.
    pub(crate) fn train_labels() -> Vec<u32> {
        let mut labels: Vec<u32> = (0..10u32)
            .flat_map(|c| std::iter::repeat_n(c, 100 + 20 * c as usize))
            .collect();
        labels.shuffle(&mut StdRng::seed_from_u64(7));
        labels
    }

    /// Test labels of 10 uneven classes (class c has 30 + c samples), shuffled.
    pub(crate) fn test_labels() -> Vec<u32> {
        let mut labels: Vec<u32> = (0..10u32)
            .flat_map(|c| std::iter::repeat_n(c, 30 + c as usize))
            .collect();
        labels.shuffle(&mut StdRng::seed_from_u64(8));
        labels
    }

    /// Asserts that no index is on two clients and returns the union of all clients.
    pub(crate) fn assert_disjoint(partition: &Partition) -> HashSet<usize> {
        let union: HashSet<usize> = partition.clients.iter().flatten().copied().collect();
        assert_eq!(
            union.len(),
            partition.num_samples(),
            "some sample is on two clients"
        );
        union
    }

    #[test]
    fn kl_of_uniform_counts_is_zero() {
        // Prepare
        let counts = [7, 7, 7, 7];
        // Execute
        let kl = kl_to_uniform(&counts);
        // Assert
        assert!(kl.abs() < 1e-12, "kl {kl}");
    }

    #[test]
    fn kl_of_one_hot_is_ln_n_and_of_empty_is_zero() {
        // Prepare
        let one_hot = [0, 0, 12, 0, 0];
        // Execute
        let (kl, empty) = (kl_to_uniform(&one_hot), kl_to_uniform(&[0, 0, 0]));
        // Assert
        assert!((kl - 5f64.ln()).abs() < 1e-12, "kl {kl}");
        assert_eq!(empty, 0.0);
    }

    #[test]
    fn kl_matches_hand_worked_case() {
        // Prepare: p = (3/4, 1/4); KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812...
        let counts = [3, 1];
        // Execute
        let (kl, from_probs) = (kl_to_uniform(&counts), kl_to_uniform_probs(&[0.75, 0.25]));
        // Assert
        let expected = 0.75 * 1.5f64.ln() + 0.25 * 0.5f64.ln();
        assert!(
            (kl - expected).abs() < 1e-12 && (kl - 0.130_812).abs() < 1e-6,
            "kl {kl}"
        );
        assert!((from_probs - expected).abs() < 1e-12);
    }

    #[test]
    fn report_summarises_a_hand_made_partition() {
        // Prepare: two one-class clients of a balanced two-class set.
        let labels = [0, 0, 1, 1, 1, 0];
        let partition = Partition {
            clients: vec![vec![0, 1, 5], vec![2, 3, 4]],
            test_indices: vec![],
        };
        // Execute
        let report = partition.report(&labels, 2);
        // Assert
        assert!((report.mean_client_kl - 2f64.ln()).abs() < 1e-12);
        assert!(report.global_kl.abs() < 1e-12);
        assert_eq!(report.global_counts, vec![3, 3]);
        assert_eq!(
            report.client_sizes,
            SizeSummary {
                min: 3,
                median: 3,
                max: 3
            }
        );
    }
}
