//! Naming a partitioner in configs and on the command line, and building it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{LongTailConfig, Partition, PartitionError, dirichlet, iid, long_tail, pathological};

/// A partitioner and its parameter, as named in configs and on the command line.
///
/// Strings: `iid`, `dirichlet:ALPHA`, `pathological:SHARDS_PER_CLIENT`,
/// `long-tail:RATIO`, `long-tail:RATIO:LOCAL_ALPHA` or
/// `long-tail:RATIO:LOCAL_ALPHA:REUSE` (each sample held by up to REUSE
/// clients; [`LongTailConfig::reuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PartitionSpec {
    /// Equal-sized random clients: the no-imbalance reference.
    Iid,
    /// Per-class Dirichlet split, the usual non-IID benchmark (local imbalance only).
    Dirichlet {
        /// Concentration; smaller means more skewed clients.
        alpha: f64,
    },
    /// McMahan et al.'s label-sorted shards: each client sees few classes.
    Pathological {
        /// Shards (of mostly distinct classes) per client.
        shards_per_client: usize,
    },
    /// The papers' global and local imbalance; see [`long_tail`].
    LongTail(LongTailConfig),
}

impl PartitionSpec {
    /// Builds the partition this spec names.
    ///
    /// # Errors
    /// As the partitioner named.
    pub fn build(
        &self,
        train_labels: &[u32],
        test_labels: &[u32],
        num_classes: usize,
        num_clients: usize,
        seed: u64,
    ) -> Result<Partition, PartitionError> {
        let whole_test = || (0..test_labels.len()).collect();
        match *self {
            Self::Iid => iid(train_labels, num_clients, whole_test(), seed),
            Self::Dirichlet { alpha } => dirichlet(
                train_labels,
                num_classes,
                alpha,
                num_clients,
                whole_test(),
                seed,
            ),
            Self::Pathological { shards_per_client } => pathological(
                train_labels,
                num_classes,
                shards_per_client,
                num_clients,
                whole_test(),
                seed,
            ),
            Self::LongTail(config) => long_tail(
                train_labels,
                test_labels,
                num_classes,
                num_clients,
                &config,
                seed,
            ),
        }
    }
}

impl fmt::Display for PartitionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Iid => write!(f, "iid"),
            Self::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
            Self::Pathological { shards_per_client } => {
                write!(f, "pathological:{shards_per_client}")
            }
            Self::LongTail(c) if c.reuse == 1 => {
                write!(f, "long-tail:{}:{}", c.ratio, c.local_alpha)
            }
            Self::LongTail(c) => write!(f, "long-tail:{}:{}:{}", c.ratio, c.local_alpha, c.reuse),
        }
    }
}

impl FromStr for PartitionSpec {
    type Err = PartitionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| PartitionError::Parse {
            spec: s.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        let number = |i: usize| -> Result<f64, PartitionError> {
            let text = parts.get(i).ok_or_else(|| fail("missing parameter"))?;
            text.parse::<f64>()
                .map_err(|_| fail("parameter is not a number"))
        };
        let spec = match (parts[0], parts.len()) {
            ("iid", 1) => Self::Iid,
            ("dirichlet", 2) => Self::Dirichlet { alpha: number(1)? },
            ("pathological", 2) => Self::Pathological {
                shards_per_client: parts[1]
                    .parse()
                    .map_err(|_| fail("shards per client is not a whole number"))?,
            },
            ("long-tail", 2..=4) => {
                let mut config = LongTailConfig {
                    ratio: number(1)?,
                    ..LongTailConfig::default()
                };
                if parts.len() >= 3 {
                    config.local_alpha = number(2)?;
                }
                if parts.len() == 4 {
                    config.reuse = parts[3]
                        .parse()
                        .ok()
                        .filter(|&r| r >= 1)
                        .ok_or_else(|| fail("reuse is not a whole number of at least 1"))?;
                }
                Self::LongTail(config)
            }
            ("iid" | "dirichlet" | "pathological" | "long-tail", _) => {
                return Err(fail("wrong number of parameters"));
            }
            _ => {
                return Err(fail(
                    "expected iid, dirichlet:A, pathological:K or long-tail:R[:A[:REUSE]]",
                ));
            }
        };
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::tests::{assert_disjoint, test_labels, train_labels};

    #[test]
    fn spec_strings_parse_and_round_trip() {
        // Prepare
        let cases = [
            "iid",
            "dirichlet:0.5",
            "pathological:2",
            "long-tail:10",
            "long-tail:20:0.3",
            "long-tail:10:1:23",
        ];
        for text in cases {
            // Execute
            let spec: PartitionSpec = text.parse().unwrap();
            // Assert
            assert_eq!(
                spec.to_string().parse::<PartitionSpec>().unwrap(),
                spec,
                "{text}"
            );
        }
        let tail: PartitionSpec = "long-tail:20:0.3".parse().unwrap();
        let expected = LongTailConfig {
            ratio: 20.0,
            local_alpha: 0.3,
            ..LongTailConfig::default()
        };
        assert_eq!(tail, PartitionSpec::LongTail(expected));
        let shared: PartitionSpec = "long-tail:10:1:23".parse().unwrap();
        assert_eq!(
            shared,
            PartitionSpec::LongTail(LongTailConfig {
                reuse: 23,
                ..LongTailConfig::default()
            })
        );
        assert_eq!(shared.to_string(), "long-tail:10:1:23");
        for bad in [
            "",
            "iid:1",
            "dirichlet",
            "dirichlet:x",
            "pathological:1.5",
            "zipf:2",
            "long-tail:1:2:3:4",
            "long-tail:10:1:0",
            "long-tail:10:1:2.5",
        ] {
            assert!(
                matches!(
                    bad.parse::<PartitionSpec>(),
                    Err(PartitionError::Parse { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn spec_builds_the_partitioner_it_names() {
        // Prepare
        let (train, test) = (train_labels(), test_labels());
        let specs: Vec<PartitionSpec> = ["iid", "dirichlet:0.5", "pathological:2", "long-tail:10"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        for spec in specs {
            // Execute
            let partition = spec.build(&train, &test, 10, 20, 1).unwrap();
            // Assert
            assert_eq!(partition.clients.len(), 20, "{spec}");
            assert_disjoint(&partition);
        }
    }

    #[test]
    fn out_of_range_labels_are_an_error_not_a_panic() {
        // Prepare
        let labels = [0, 1, 5];
        // Execute
        let result = PartitionSpec::Dirichlet { alpha: 1.0 }.build(&labels, &[], 3, 2, 0);
        // Assert
        assert_eq!(
            result,
            Err(PartitionError::LabelOutOfRange {
                index: 2,
                label: 5,
                num_classes: 3
            })
        );
    }
}
