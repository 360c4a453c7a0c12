//! Byzantine-robust aggregation rules (coordinate-wise median and trimmed
//! mean, (multi-)Krum, centered clipping) beside the sample-weighted mean.
//!
//! # Shapes
//! Every rule takes the round's global weights (`[p]`, flat `f32`) and
//! `(weights [p], samples)` updates and returns the next global model `[p]`.
//!
//! # Design decisions
//! - An update is skipped, not fatal, when it has the wrong length, holds a
//!   NaN or an infinity, or declares zero samples (the checks of
//!   [`Aggregator::fold`]; a zero-sample update has no weight under the mean).
//!   No usable update gives [`AggregateError::Empty`].
//! - The robust rules ignore sample counts on purpose: a client declares its
//!   count, so weighting by it would let one attacker buy the round by
//!   claiming many samples. Only [`AggregationRule::Mean`] weights by samples.
//! - A non-finite aggregate is an error ([`AggregateError::NonFiniteResult`]),
//!   never a model.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::aggregate::{AggregateError, Aggregator};

/// How a round's updates are combined into the next global model.
///
/// # Command-line syntax ([`FromStr`] and [`Display`](fmt::Display))
/// `mean`, `median`, `trimmed-mean[:TRIM]` (0.2), `krum[:F]` (F = 1),
/// `multi-krum[:F[:M]]` (F = 1, M = 2) and
/// `centered-clipping[:RADIUS[:ITERATIONS]]` (10, 3); defaults in brackets.
/// `multi-krum:F:1` is `krum:F`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregationRule {
    /// The sample-weighted mean (FedAvg, docs/METHOD.md step 7): the
    /// [`Aggregator`]'s rule.
    #[default]
    Mean,
    /// Coordinate-wise median (Yin et al. 2018, "Byzantine-robust distributed
    /// learning: towards optimal statistical rates"); an even count takes the
    /// mean of the two middle values.
    Median,
    /// Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop
    /// the `floor(trim * n)` largest and smallest of the n values and average
    /// the rest.
    TrimmedMean {
        /// Fraction cut from each end, in [0, 0.5).
        trim: f64,
    },
    /// Krum and multi-Krum (Blanchard et al. 2017, "Machine learning with
    /// adversaries: Byzantine tolerant gradient descent"). An update's score
    /// is the sum of squared L2 distances to its `n - f - 2` nearest other
    /// updates; the `selected` lowest scores are averaged, unweighted.
    ///
    /// When `n - f - 2 < 1` (too few updates for the guarantee, which needs
    /// `n > 2f + 2`) the score uses the single nearest neighbour; a lone
    /// update is chosen as it is. `selected` is capped at `max(n - f, 1)`,
    /// so multi-Krum never averages more updates than are assumed honest.
    /// Ties go to the earlier update.
    Krum {
        /// f: how many updates may be Byzantine.
        byzantine: usize,
        /// m: how many best-scored updates to average (1 is plain Krum).
        selected: usize,
    },
    /// Centered clipping (Karimireddy, He and Jaggi 2021, "Learning from
    /// history for Byzantine robust optimization", Algorithm 1, as in
    /// epfml/disco's `ByzantineRobustAggregator` but centred on the global
    /// model rather than on the mean): `v = global`, then `iterations` times
    /// `v <- v + (1/n) sum_i clip(x_i - v)`, where `clip` scales a vector
    /// down to L2 norm `radius` if it is longer. One update moves `v` by at
    /// most `radius / n` per iteration.
    CenteredClipping {
        /// tau: the L2 radius, in the units of the weights; positive, finite.
        radius: f32,
        /// L: clipping iterations, at least 1.
        iterations: usize,
    },
}

/// `trimmed-mean` without a parameter.
pub const DEFAULT_TRIM: f64 = 0.2;
/// `krum` and `multi-krum` without f.
pub const DEFAULT_BYZANTINE: usize = 1;
/// `multi-krum` without m.
pub const DEFAULT_SELECTED: usize = 2;
/// `centered-clipping` without a radius.
pub const DEFAULT_RADIUS: f32 = 10.0;
/// `centered-clipping` without an iteration count.
pub const DEFAULT_ITERATIONS: usize = 3;

const SYNTAX: &str = "mean, median, trimmed-mean[:TRIM], krum[:F], multi-krum[:F[:M]], \
                      centered-clipping[:RADIUS[:ITERATIONS]]";

impl AggregationRule {
    /// Checks the parameters: trim in [0, 0.5), at least one Krum selection,
    /// a positive finite radius, at least one clipping iteration.
    pub fn validate(self) -> Result<(), String> {
        match self {
            Self::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => {
                Err(format!("trim must be in [0, 0.5), got {trim}"))
            }
            Self::Krum { selected: 0, .. } => Err("krum must select at least 1 update".into()),
            Self::CenteredClipping { radius, .. } if !(radius.is_finite() && radius > 0.0) => Err(
                format!("clipping radius must be positive and finite, got {radius}"),
            ),
            Self::CenteredClipping { iterations: 0, .. } => {
                Err("centered clipping needs at least 1 iteration".into())
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for AggregationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Mean => f.write_str("mean"),
            Self::Median => f.write_str("median"),
            Self::TrimmedMean { trim } => write!(f, "trimmed-mean:{trim}"),
            Self::Krum {
                byzantine,
                selected: 1,
            } => write!(f, "krum:{byzantine}"),
            Self::Krum {
                byzantine,
                selected,
            } => write!(f, "multi-krum:{byzantine}:{selected}"),
            Self::CenteredClipping { radius, iterations } => {
                write!(f, "centered-clipping:{radius}:{iterations}")
            }
        }
    }
}

impl FromStr for AggregationRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let most = match name {
            "mean" | "median" => 0,
            "trimmed-mean" | "krum" => 1,
            "multi-krum" | "centered-clipping" => 2,
            _ => {
                return Err(format!(
                    "unknown aggregation rule {s:?}, expected one of {SYNTAX}"
                ));
            }
        };
        if args.len() > most {
            return Err(format!(
                "{name} takes at most {most} parameter(s), got {s:?}"
            ));
        }
        let rule = match name {
            "mean" => Self::Mean,
            "median" => Self::Median,
            "trimmed-mean" => Self::TrimmedMean {
                trim: param(&args, 0, DEFAULT_TRIM)?,
            },
            "krum" => Self::Krum {
                byzantine: param(&args, 0, DEFAULT_BYZANTINE)?,
                selected: 1,
            },
            "multi-krum" => Self::Krum {
                byzantine: param(&args, 0, DEFAULT_BYZANTINE)?,
                selected: param(&args, 1, DEFAULT_SELECTED)?,
            },
            _ => Self::CenteredClipping {
                radius: param(&args, 0, DEFAULT_RADIUS)?,
                iterations: param(&args, 1, DEFAULT_ITERATIONS)?,
            },
        };
        rule.validate()?;
        Ok(rule)
    }
}

/// The `i`-th parameter parsed, or `default` when it is absent.
fn param<T: FromStr>(args: &[&str], i: usize, default: T) -> Result<T, String>
where
    T::Err: fmt::Display,
{
    match args.get(i) {
        None => Ok(default),
        Some(a) => a.parse().map_err(|e| format!("bad parameter {a:?}: {e}")),
    }
}

/// Aggregates `(weights, samples)` updates against `global` with `rule`.
///
/// Misfit updates (wrong length, non-finite, zero samples) are skipped.
/// Errors: [`AggregateError::InvalidRule`] for out-of-range parameters,
/// [`AggregateError::Empty`] when no update is usable,
/// [`AggregateError::NonFiniteResult`] when the aggregate is not finite.
///
/// Cost for n usable updates of p parameters: the checks stream each update
/// once into one `[p]` running sum; median and trimmed mean then gather each
/// coordinate into one reused `[n]` scratch (O(n p)); Krum computes the
/// n (n - 1) / 2 pairwise distances (O(n^2 p)); clipping keeps two `[p]`
/// `f64` vectors (O(L n p)). Sums accumulate in `f64`, except `Mean`, which
/// is the [`Aggregator`] unchanged.
pub fn aggregate_with(
    rule: AggregationRule,
    global: &[f32],
    updates: &[(&[f32], u64)],
) -> Result<Vec<f32>, AggregateError> {
    rule.validate()
        .map_err(|reason| AggregateError::InvalidRule { reason })?;
    let mut aggregator = Aggregator::new(global);
    let usable: Vec<&[f32]> = updates
        .iter()
        .filter(|(weights, samples)| aggregator.fold(weights, *samples).is_ok() && *samples > 0)
        .map(|(weights, _)| *weights)
        .collect();
    let result = match rule {
        AggregationRule::Mean => aggregator.finish()?,
        _ if usable.is_empty() => return Err(AggregateError::Empty),
        AggregationRule::Median => coordinatewise(global.len(), &usable, median),
        AggregationRule::TrimmedMean { trim } => {
            // The tolerance keeps 0.29 * 100 = 28.999... at 29; the cap keeps
            // at least one value whatever the rounding.
            let n = usable.len();
            let cut = ((trim * n as f64 + 1e-9).floor() as usize).min((n - 1) / 2);
            coordinatewise(global.len(), &usable, |v| trimmed_mean(v, cut))
        }
        AggregationRule::Krum {
            byzantine,
            selected,
        } => krum(&usable, byzantine, selected),
        AggregationRule::CenteredClipping { radius, iterations } => {
            centered_clipping(global, &usable, f64::from(radius), iterations)
        }
    };
    match result.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(AggregateError::NonFiniteResult { index }),
        None => Ok(result),
    }
}

/// Reduces each of the `p` coordinates over the updates with `reduce`, which
/// gets the coordinate's n values in a reused scratch it may reorder.
fn coordinatewise(p: usize, updates: &[&[f32]], reduce: impl Fn(&mut [f32]) -> f64) -> Vec<f32> {
    let mut scratch = vec![0.0f32; updates.len()]; // [n]
    (0..p)
        .map(|j| {
            for (s, update) in scratch.iter_mut().zip(updates) {
                *s = update[j];
            }
            reduce(&mut scratch) as f32
        })
        .collect()
}

/// The median of non-empty `values`, found by selection (O(n)).
fn median(values: &mut [f32]) -> f64 {
    let mid = values.len() / 2;
    let even = values.len().is_multiple_of(2);
    let (lower, upper, _) = values.select_nth_unstable_by(mid, f32::total_cmp);
    let upper = f64::from(*upper);
    match lower.iter().copied().max_by(f32::total_cmp) {
        Some(below) if even => (f64::from(below) + upper) / 2.0,
        _ => upper,
    }
}

/// The mean of `values` without its `cut` smallest and `cut` largest, where
/// `2 * cut < values.len()`.
fn trimmed_mean(values: &mut [f32], cut: usize) -> f64 {
    let kept = values.len() - 2 * cut;
    let middle = if cut == 0 {
        values
    } else {
        // values[cut..] holds the n - cut largest; its `kept` smallest are
        // the middle.
        let (_, _, rest) = values.select_nth_unstable_by(cut - 1, f32::total_cmp);
        rest.select_nth_unstable_by(kept, f32::total_cmp).0
    };
    middle.iter().map(|&v| f64::from(v)).sum::<f64>() / kept as f64
}

/// Krum's choice: the unweighted mean of the `selected` best-scored updates.
fn krum(updates: &[&[f32]], byzantine: usize, selected: usize) -> Vec<f32> {
    let n = updates.len();
    let mut distances = vec![0.0f64; n * n]; // [n, n], squared L2
    for i in 0..n {
        for j in i + 1..n {
            let d = squared_distance(updates[i], updates[j]);
            distances[i * n + j] = d;
            distances[j * n + i] = d;
        }
    }
    let neighbours = n.saturating_sub(byzantine + 2).max(1).min(n - 1);
    let mut scratch = Vec::with_capacity(n);
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            scratch.clear();
            scratch.extend((0..n).filter(|&j| j != i).map(|j| distances[i * n + j]));
            if neighbours < scratch.len() {
                scratch.select_nth_unstable_by(neighbours, f64::total_cmp);
            }
            scratch[..neighbours].iter().sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b])); // stable: ties by index
    let chosen = &order[..selected.min(n.saturating_sub(byzantine).max(1))];
    let mut sum = vec![0.0f64; updates[0].len()];
    for &i in chosen {
        for (s, &w) in sum.iter_mut().zip(updates[i]) {
            *s += f64::from(w);
        }
    }
    let inv = 1.0 / chosen.len() as f64;
    sum.into_iter().map(|s| (s * inv) as f32).collect()
}

/// Squared L2 distance, accumulated in `f64`.
fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum()
}

/// Centered clipping from `global`, `iterations` times.
fn centered_clipping(
    global: &[f32],
    updates: &[&[f32]],
    radius: f64,
    iterations: usize,
) -> Vec<f32> {
    let mut center: Vec<f64> = global.iter().map(|&w| f64::from(w)).collect(); // [p]
    let mut step = vec![0.0f64; global.len()]; // [p]
    let inv_n = 1.0 / updates.len() as f64;
    for _ in 0..iterations {
        step.fill(0.0);
        for update in updates {
            let norm = update
                .iter()
                .zip(&center)
                .map(|(&x, &c)| (f64::from(x) - c).powi(2))
                .sum::<f64>()
                .sqrt();
            let scale = if norm > radius { radius / norm } else { 1.0 } * inv_n;
            for ((s, &x), &c) in step.iter_mut().zip(*update).zip(&center) {
                *s += scale * (f64::from(x) - c);
            }
        }
        for (c, s) in center.iter_mut().zip(&step) {
            *c += s;
        }
    }
    center.into_iter().map(|c| c as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::AggregationRule::{Mean, Median, TrimmedMean};
    use super::*;
    use crate::aggregate::aggregate;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, Normal};

    const EVERY_RULE: [AggregationRule; 6] = [
        Mean,
        Median,
        TrimmedMean { trim: 0.2 },
        krum(1, 1),
        krum(1, 3),
        clipping(1.0, 3),
    ];

    const fn krum(byzantine: usize, selected: usize) -> AggregationRule {
        AggregationRule::Krum {
            byzantine,
            selected,
        }
    }

    const fn clipping(radius: f32, iterations: usize) -> AggregationRule {
        AggregationRule::CenteredClipping { radius, iterations }
    }

    /// Aggregates `updates` (10 samples each) against a zero global model.
    fn run(rule: AggregationRule, updates: &[Vec<f32>]) -> Vec<f32> {
        let global = vec![0.0; updates[0].len()];
        let pairs: Vec<(&[f32], u64)> = updates.iter().map(|u| (u.as_slice(), 10)).collect();
        aggregate_with(rule, &global, &pairs).unwrap()
    }

    fn assert_close(got: &[f32], expected: &[f32]) {
        let far = got.iter().zip(expected).any(|(g, e)| (g - e).abs() > 1e-6);
        assert!(
            !far && got.len() == expected.len(),
            "got {got:?}, expected {expected:?}"
        );
    }

    #[test]
    fn median_and_trimmed_mean_ignore_one_huge_outlier() {
        // Prepare: four honest updates near 1 and one at +-1e30.
        let updates = vec![
            vec![0.9, 1.0],
            vec![1.0, 1.1],
            vec![1.1, 0.9],
            vec![1.0, 1.0],
            vec![1e30, -1e30],
        ];

        // Execute
        let median = run(Median, &updates);
        let trimmed = run(TrimmedMean { trim: 0.2 }, &updates);

        // Assert: trim 0.2 of 5 cuts one value from each end per coordinate.
        assert_eq!(median, vec![1.0, 1.0]);
        assert_close(
            &trimmed,
            &[(1.0 + 1.1 + 1.0) / 3.0, (1.0 + 0.9 + 1.0) / 3.0],
        );
    }

    /// An attacker at [10, 10] and four honest updates. Squared distances
    /// give Krum scores (two nearest): x1 0.02, x2 0.03, x3 0.03, x4 3.62,
    /// attacker 360.01.
    fn krum_updates() -> Vec<Vec<f32>> {
        vec![
            vec![10.0, 10.0],
            vec![0.0, 0.0],
            vec![0.0, 0.1],
            vec![0.1, 0.0],
            vec![1.0, 1.0],
        ]
    }

    #[test]
    fn krum_picks_an_honest_update_when_one_of_five_is_far() {
        let chosen = run(krum(1, 1), &krum_updates());

        assert_eq!(chosen, vec![0.0, 0.0]);
    }

    #[test]
    fn multi_krum_averages_the_selected_unweighted_and_caps_at_n_minus_f() {
        let three = run(krum(1, 3), &krum_updates());
        let capped = run(krum(1, 10), &krum_updates());

        assert_close(&three, &[0.1 / 3.0, 0.1 / 3.0]);
        // n - f = 4: every honest update, never the attacker.
        assert_close(&capped, &[1.1 / 4.0, 1.1 / 4.0]);
    }

    #[test]
    fn centered_clipping_moves_at_most_radius_over_n_per_iteration() {
        // Prepare: four updates at the global model, one at distance 500.
        let mut updates = vec![vec![0.0, 0.0]; 4];
        updates.push(vec![300.0, 400.0]);
        let rule = |iterations| clipping(1.0, iterations);

        // Execute
        let once = run(rule(1), &updates);
        let thrice = run(rule(3), &updates);

        // Assert: one iteration moves v by clip(x) / 5 = [0.6, 0.8] / 5.
        assert_close(&once, &[0.12, 0.16]);
        let norm = thrice.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(norm <= 3.0 * 1.0 / 5.0 + 1e-6, "moved {norm}");
    }

    #[test]
    fn every_rule_skips_misfit_updates_and_refuses_an_empty_round() {
        // Prepare: a short, a NaN, an infinite and a zero-sample update.
        let global = [0.0, 0.0];
        let good = [0.3f32, 0.4];
        let bad: Vec<(&[f32], u64)> = vec![
            (&[1.0], 5),
            (&[f32::NAN, 1.0], 5),
            (&[1.0, f32::INFINITY], 5),
            (&[9.0, 9.0], 0),
        ];
        let mut with_good = bad.clone();
        with_good.push((&good, 5));

        for rule in EVERY_RULE {
            // Execute
            let none = aggregate_with(rule, &global, &[]);
            let only_bad = aggregate_with(rule, &global, &bad);
            let one_good = aggregate_with(rule, &global, &with_good);

            // Assert
            assert_eq!(none, Err(AggregateError::Empty), "{rule}");
            assert_eq!(only_bad, Err(AggregateError::Empty), "{rule}");
            assert_eq!(one_good, Ok(good.to_vec()), "{rule}");
        }
    }

    #[test]
    fn mean_equals_the_existing_aggregator() {
        let mut rng = StdRng::seed_from_u64(11);
        let noise = Normal::new(0.0f32, 1.0).unwrap();
        let global: Vec<f32> = (0..64).map(|_| noise.sample(&mut rng)).collect();
        let updates: Vec<(Vec<f32>, u64)> = (1..=5)
            .map(|k| ((0..64).map(|_| noise.sample(&mut rng)).collect(), 7 * k))
            .collect();
        let pairs: Vec<(&[f32], u64)> = updates.iter().map(|(w, n)| (w.as_slice(), *n)).collect();

        let ours = aggregate_with(Mean, &global, &pairs).unwrap();
        let theirs = aggregate(&global, &pairs).unwrap();

        assert_eq!(ours, theirs);
    }

    #[test]
    fn sign_flipped_attackers_cannot_move_the_median_far() {
        // Prepare: seven honest updates within 0.01 of a centre, two
        // attackers sending the centre flipped and scaled by 10.
        let mut rng = StdRng::seed_from_u64(7);
        let unit = Normal::new(0.0f32, 1.0).unwrap();
        let centre: Vec<f32> = (0..50).map(|_| unit.sample(&mut rng)).collect();
        let mut updates: Vec<Vec<f32>> = (0..7)
            .map(|_| {
                centre
                    .iter()
                    .map(|c| c + 0.01 * unit.sample(&mut rng))
                    .collect()
            })
            .collect();
        updates.extend((0..2).map(|_| centre.iter().map(|c| -10.0 * c).collect()));
        let error = |got: &[f32]| {
            got.iter()
                .zip(&centre)
                .map(|(g, c)| (g - c).abs())
                .fold(0.0, f32::max)
        };

        // Execute
        let median = run(Median, &updates);
        let mean = run(Mean, &updates);

        // Assert
        assert!(error(&median) < 0.05, "median moved {}", error(&median));
        assert!(error(&mean) > 0.5, "the mean should have moved");
    }

    #[test]
    fn a_non_finite_aggregate_or_an_invalid_rule_is_an_error() {
        // 10 * 3e38 overflows the mean's f32 running sum.
        let huge: &[f32] = &[3e38];
        let overflow = aggregate_with(Mean, &[0.0], &[(huge, 10), (huge, 10)]);
        let invalid = aggregate_with(TrimmedMean { trim: 0.5 }, &[0.0], &[(&[1.0], 1)]);

        assert_eq!(overflow, Err(AggregateError::NonFiniteResult { index: 0 }));
        assert!(matches!(invalid, Err(AggregateError::InvalidRule { .. })));
    }

    #[test]
    fn every_rule_survives_display_parse_and_serde() {
        let rules = EVERY_RULE.into_iter().chain([
            TrimmedMean { trim: 0.25 },
            krum(2, 3),
            clipping(2.5, 4),
        ]);

        for rule in rules {
            let text = rule.to_string();
            let json = serde_json::to_string(&rule).unwrap();

            assert_eq!(text.parse::<AggregationRule>(), Ok(rule), "{text}");
            assert_eq!(
                serde_json::from_str::<AggregationRule>(&json).unwrap(),
                rule
            );
        }
        let multi = krum(2, 3);
        assert_eq!(multi.to_string(), "multi-krum:2:3");
        assert_eq!(serde_json::to_string(&Mean).unwrap(), r#""mean""#);
        let trimmed = serde_json::to_string(&TrimmedMean { trim: 0.2 }).unwrap();
        assert_eq!(trimmed, r#"{"trimmed-mean":{"trim":0.2}}"#);
    }

    #[test]
    fn omitted_parameters_take_the_documented_defaults() {
        let parse = |s: &str| s.parse::<AggregationRule>().unwrap();

        assert_eq!(parse("mean"), AggregationRule::default());
        assert_eq!(parse("trimmed-mean"), TrimmedMean { trim: 0.2 });
        assert_eq!(parse("krum"), parse("krum:1"));
        assert_eq!(parse("multi-krum"), parse("multi-krum:1:2"));
        assert_eq!(parse("multi-krum:3:1"), parse("krum:3"));
        assert_eq!(parse("centered-clipping"), parse("centered-clipping:10:3"));
        assert_eq!(parse("centered-clipping:5"), parse("centered-clipping:5:3"));
    }

    #[test]
    fn invalid_parameters_and_unknown_names_are_refused() {
        let refused = [
            "trimmed-mean:0.6",
            "trimmed-mean:-0.1",
            "trimmed-mean:NaN",
            "centered-clipping:-1",
            "centered-clipping:0",
            "centered-clipping:inf",
            "centered-clipping:10:0",
            "multi-krum:1:0",
            "krum:-1",
            "krum:two",
            "median:3",
            "krum:1:1",
        ];

        for text in refused {
            assert!(
                text.parse::<AggregationRule>().is_err(),
                "{text} was accepted"
            );
        }
        let unknown = "geomed".parse::<AggregationRule>().unwrap_err();
        assert!(unknown.contains("multi-krum[:F[:M]]"), "{unknown}");
    }
}
