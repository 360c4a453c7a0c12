//! The update guard: judges every update a client returns against the
//! weights it was sent, from the very first update of a run. The server
//! applies it to every hop; the simulator too, so its robustness figures
//! are the server's.
//!
//! Three rules, in order:
//! 1. every weight is finite and at most [`MAX_ABS_WEIGHT`] in magnitude
//!    (so the model stays finite, and f16 frames never overflow);
//! 2. the update moves the weights it was sent by at most `max_ratio` times
//!    their L2 norm: a bound relative to the model, which needs no history;
//! 3. once `min_history` distances of hops in earlier rounds were seen, its
//!    distance is at most `factor` times their median (the last `window`).
//!
//! Rules 1 and 2 are bounds no honest client comes near: an update that
//! breaks one is hostile or broken, and its client is dropped
//! ([`GuardRefusal::drops_client`]). Rule 3 is a comparison, and an honest
//! client can stand out: on long-tailed shards a client whose classes the
//! model knows least moves it most, and late in a run, when most hops
//! barely move it, such a hop is ten times the median. So rule 3 refuses
//! the hop but keeps the client, as the loss rule does (without benching
//! it: a refusal here costs the chain only the refused hop, judged where
//! it enters, while the loss rule's costs the next member's too), and its
//! median is taken over every hop it judged, refused or not, in earlier
//! rounds ([`crate::settled`]): were refused hops left out, a run whose
//! honest hops grew past ten times the old median would refuse them for
//! ever (it did: a long-tailed run turned five of its six clients away
//! within 1.5 s at round 628, docs/RESULTS.md). An attacking minority
//! cannot move a median far. A hop that leaves the model where it was
//! (an echo, a free rider) is no evidence of how far hops move it and
//! stays out of the window.
//!
//! Rule 3 drops a client only for its record ([`OutlierRecord`]): at least
//! [`MIN_REPEATED`] of its hops and at least a third of those rule 3 judged
//! refused, while the median client's share refused (over the settled
//! rounds) is under a tenth. Scaled updates (x10) stand out in about half
//! their hops and are dropped after a few; the most outlying honest client
//! of a long-tailed run stood out in under a tenth of its hops; and when
//! every client's hops grow at once, the median client's share rises with
//! theirs and nobody is dropped. The median is over the clients judged in
//! the last [`RECORD_ROUNDS`] rounds and not dropped (a dropped client that
//! joins again under a new id does not count twice), and records older
//! than that are forgotten, so memory stays bounded. The records are the
//! server's since it started: a restart forgets them, and a client's
//! evidence starts again.
//!
//! The window is saved with every completed round and restored on resume,
//! so a restart does not open a window without it.

use std::sync::Mutex;

use crate::protocol::limits::{MAX_ABS_WEIGHT, check_weights};
use crate::settled::SettledWindow;

/// Default of rule 2: an update may move the weights by at most twice their
/// norm. Honest hops of the papers' CNN move them by a small fraction of it
/// (docs/RESULTS.md).
pub const DEFAULT_MAX_UPDATE_RATIO: f64 = 2.0;

/// Why the guard refused an update.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuardRefusal {
    /// A weight is non-finite or past [`MAX_ABS_WEIGHT`].
    #[error("weight {index} is {value}, outside ±{MAX_ABS_WEIGHT}")]
    OutOfBounds {
        /// Index of the first bad weight.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// The update moved the weights too far for the model's size.
    #[error("it moved the weights by {norm:.3}, over {max_ratio}x their norm {model_norm:.3}")]
    TooFar {
        /// L2 distance from the weights sent.
        norm: f64,
        /// L2 norm of the weights sent.
        model_norm: f64,
        /// The bound's factor.
        max_ratio: f64,
    },
    /// The client's updates moved the weights far more than recent ones
    /// did, again and again, unlike the others' ([`OutlierRecord`]).
    #[error(
        "it moved the weights over {factor}x the median of recent updates in {refused} of its \
         {judged} hops, while other clients did in under a tenth of theirs"
    )]
    RepeatedOutlier {
        /// Its hops rule 3 refused.
        refused: u32,
        /// Its hops rule 3 judged.
        judged: u32,
        /// The rule's factor.
        factor: f64,
    },
    /// The update moved the weights far more than recent ones did.
    #[error(
        "it moved the weights by {norm:.3}, over {factor}x the median {median:.3} of recent updates"
    )]
    Outlier {
        /// L2 distance from the weights sent.
        norm: f64,
        /// Median distance of recent accepted updates.
        median: f64,
        /// The rule's factor.
        factor: f64,
    },
}

impl GuardRefusal {
    /// Whether the client that sent it is dropped (rules 1 and 2, bounds
    /// no honest update comes near; rule 3 for a record that stands out)
    /// rather than kept with its hop refused (rule 3, a comparison an
    /// honest client can fail now and then).
    pub fn drops_client(&self) -> bool {
        !matches!(self, Self::Outlier { .. })
    }
}

/// Refusals by rule 3 a client needs before its record can drop it.
pub const MIN_REPEATED: u32 = 3;

/// Rounds a client's record is kept without a hop judged, and counts in
/// the median client's share.
pub const RECORD_ROUNDS: u64 = 100;

/// A move below this share of the model's norm (at least 1) leaves the
/// model where it was: no evidence for rule 3.
const STILL: f64 = 1e-7;

/// A client's record with rule 3, kept by the driver across its
/// reconnections: its hops the rule judged (once a median existed) and
/// refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutlierRecord {
    /// Hops rule 3 judged.
    pub judged: u32,
    /// Of those, refused.
    pub refused: u32,
    /// The guard's settled-round count when it last judged one.
    pub last_round: u64,
}

impl OutlierRecord {
    /// The share of its judged hops refused (0 with none judged).
    pub fn share(&self) -> f64 {
        if self.judged == 0 {
            0.0
        } else {
            f64::from(self.refused) / f64::from(self.judged)
        }
    }

    /// Whether this record stands out when the median client's share
    /// refused is `median_share`: at least [`MIN_REPEATED`] refusals and a
    /// third of its hops, while the median client's share is under a
    /// tenth.
    pub fn stands_out(&self, median_share: f64) -> bool {
        self.refused >= MIN_REPEATED && 3 * self.refused >= self.judged && median_share < 0.1
    }
}

/// Rule 3's state: the window of distances, each client's record, and the
/// median client's share refused as of the last settled round (1 before
/// any: nobody stands out yet).
#[derive(Debug, Clone)]
struct Rule3 {
    window: SettledWindow,
    records: std::collections::HashMap<u64, OutlierRecord>,
    median_share: f64,
    /// Rounds settled so far.
    rounds: u64,
}

/// What an [`UpdateGuard`] remembers, taken by [`UpdateGuard::memory`].
#[derive(Debug, Clone)]
pub struct GuardMemory(Rule3);

/// The three rules, and the distances of recent hops rule 3 judges against.
/// Shared by the threads judging a round's hops (`&self`).
#[derive(Debug)]
pub struct UpdateGuard {
    recent: Mutex<Rule3>,
    factor: f64,
    max_ratio: f64,
}

impl UpdateGuard {
    /// Refuses updates farther than `max_ratio` times the sent model's norm,
    /// or than `factor` times the median of the distances of the last
    /// `window` hops judged in earlier rounds once `min_history` were.
    pub fn new(max_ratio: f64, factor: f64, window: usize, min_history: usize) -> Self {
        Self {
            recent: Mutex::new(Rule3 {
                window: SettledWindow::new(window, min_history),
                records: std::collections::HashMap::new(),
                median_share: 1.0,
                rounds: 0,
            }),
            factor,
            max_ratio,
        }
    }

    fn rule3(&self) -> std::sync::MutexGuard<'_, Rule3> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the guard remembers (rule 3's window, records and medians),
    /// to put back with [`UpdateGuard::put_back`]: a simulator that plays
    /// a round again with other schedules leaves the guard as it was.
    pub fn memory(&self) -> GuardMemory {
        GuardMemory(self.rule3().clone())
    }

    /// Puts back what [`UpdateGuard::memory`] took.
    pub fn put_back(&self, memory: GuardMemory) {
        *self.rule3() = memory.0;
    }

    /// Judges the update `new` to the weights `sent` (equal lengths: the
    /// frame checks came first). An update that reaches rule 3 has its
    /// distance kept for rule 3's median from the next
    /// [`UpdateGuard::settle`], refused or not; the distance is returned.
    ///
    /// # Errors
    /// The first rule the update breaks.
    pub fn check(&self, sent: &[f32], new: &[f32]) -> Result<f64, GuardRefusal> {
        self.judge(sent, new, None)
    }

    /// [`UpdateGuard::check`] of client `client`'s update: rule 3 keeps its
    /// record, and drops the client ([`GuardRefusal::RepeatedOutlier`])
    /// once the record stands out ([`OutlierRecord::stands_out`]).
    ///
    /// # Errors
    /// The first rule the update breaks.
    pub fn check_client(
        &self,
        sent: &[f32],
        new: &[f32],
        client: u64,
    ) -> Result<f64, GuardRefusal> {
        self.judge(sent, new, Some(client))
    }

    /// Rules 1 and 2 on a round's aggregate that no hop check saw: the
    /// unmasked mean of secure aggregation, whose masked results the
    /// server could not judge one by one. A masker that adds a constant to
    /// its masked input moves every weight (by 1 at 4 maskers of weight 1
    /// adding 4: a move of about 355 in a model of norm 30), far past
    /// rule 2. Rule 3 is left out: its median is of single hops, not of
    /// rounds, and the aggregate's distance does not join it. A mean that
    /// carries noise of its own (distributed DP: the maskers noised it)
    /// may move `noise_allowance` further (the noise's norm, at most).
    ///
    /// # Errors
    /// [`GuardRefusal::OutOfBounds`] or [`GuardRefusal::TooFar`].
    pub fn check_aggregate(
        &self,
        sent: &[f32],
        new: &[f32],
        noise_allowance: f64,
    ) -> Result<f64, GuardRefusal> {
        if sent.len() != new.len() {
            return Err(GuardRefusal::OutOfBounds {
                index: sent.len().min(new.len()),
                value: f32::NAN,
            });
        }
        if let Err(index) = check_weights(new) {
            return Err(GuardRefusal::OutOfBounds {
                index,
                value: new[index],
            });
        }
        let norm = delta_norm(new, sent);
        let model_norm = l2_norm(sent);
        let allowance = if noise_allowance.is_finite() {
            noise_allowance.max(0.0)
        } else {
            0.0
        };
        if norm > self.max_ratio * model_norm.max(1.0) + allowance {
            return Err(GuardRefusal::TooFar {
                norm,
                model_norm,
                max_ratio: self.max_ratio,
            });
        }
        Ok(norm)
    }

    fn judge(&self, sent: &[f32], new: &[f32], client: Option<u64>) -> Result<f64, GuardRefusal> {
        let verdict = self.rules(sent, new, client);
        // A dropped client's record no longer counts (it may come back
        // under a new id, with a record of its own).
        if let (Err(refusal), Some(client)) = (&verdict, client)
            && refusal.drops_client()
        {
            self.rule3().records.remove(&client);
        }
        verdict
    }

    fn rules(&self, sent: &[f32], new: &[f32], client: Option<u64>) -> Result<f64, GuardRefusal> {
        let Norms {
            within,
            delta: norm,
            sent: model_norm,
        } = norms(new, sent);
        if !within {
            let index = check_weights(new).err().unwrap_or(0);
            return Err(GuardRefusal::OutOfBounds {
                index,
                value: new[index],
            });
        }
        // A model near zero (a fresh bias-only layer, a test's toy model)
        // still allows updates of norm up to max_ratio.
        if norm > self.max_ratio * model_norm.max(1.0) {
            return Err(GuardRefusal::TooFar {
                norm,
                model_norm,
                max_ratio: self.max_ratio,
            });
        }
        if norm <= STILL * model_norm.max(1.0) {
            return Ok(norm);
        }
        let mut rule3 = self.rule3();
        rule3.window.push(norm);
        let Some(median) = rule3.window.median() else {
            return Ok(norm);
        };
        let refused = norm > self.factor * median;
        let median_share = rule3.median_share;
        let rounds = rule3.rounds;
        let mut record = OutlierRecord::default();
        if let Some(client) = client {
            let kept = rule3.records.entry(client).or_default();
            kept.judged = kept.judged.saturating_add(1);
            kept.refused = kept.refused.saturating_add(u32::from(refused));
            kept.last_round = rounds;
            record = *kept;
        }
        if !refused {
            return Ok(norm);
        }
        if record.stands_out(median_share) {
            return Err(GuardRefusal::RepeatedOutlier {
                refused: record.refused,
                judged: record.judged,
                factor: self.factor,
            });
        }
        Err(GuardRefusal::Outlier {
            norm,
            median,
            factor: self.factor,
        })
    }

    /// Closes a round for rule 3: the distances judged since the last call
    /// join its window ([`SettledWindow::settle`]), and the median client's
    /// share refused is taken again.
    pub fn settle(&self) {
        let mut rule3 = self.rule3();
        rule3.window.settle();
        rule3.rounds += 1;
        let oldest = rule3.rounds.saturating_sub(RECORD_ROUNDS);
        rule3.records.retain(|_, r| r.last_round >= oldest);
        let mut shares: Vec<f64> = rule3.records.values().map(OutlierRecord::share).collect();
        if !shares.is_empty() {
            shares.sort_by(f64::total_cmp);
            rule3.median_share = shares[shares.len() / 2];
        }
    }

    /// Clients whose records rule 3 keeps (at most those judged in the last
    /// [`RECORD_ROUNDS`] rounds).
    pub fn records(&self) -> usize {
        self.rule3().records.len()
    }

    /// The settled distances it remembers, oldest first, to be saved.
    pub fn history(&self) -> Vec<f64> {
        self.rule3().window.settled()
    }

    /// Takes back a saved history (the newest `window` finite,
    /// non-negative entries); distances of an open round are dropped.
    pub fn restore(&self, history: &[f64]) {
        self.rule3().window.restore(history, |n| n >= 0.0);
    }
}

impl Default for UpdateGuard {
    /// [`DEFAULT_MAX_UPDATE_RATIO`]; 10x the median of the last 100, after 5
    /// updates.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_UPDATE_RATIO, 10.0, 100, 5)
    }
}

/// Independent partial sums [`sum_squares`] keeps: one running sum is a
/// chain of dependent additions the compiler may not reorder (a float
/// sum is not associative); eight let it vectorise. The guard judges every
/// hop with these (`astraea bench rounds`: 7 % of a 1,000-client round
/// with one sum).
const LANES: usize = 8;

/// The sum of `f(x)` squared over `xs`, in f64, in [`LANES`] partial sums
/// added at the end.
#[inline]
fn sum_squares<T: Copy>(xs: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (sum, &x) in lanes.iter_mut().zip(chunk) {
            let v = f(x);
            *sum += v * v;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| f(x) * f(x)).sum();
    lanes.iter().sum::<f64>() + tail
}

/// Euclidean distance between two weight vectors (over the shorter's
/// length; callers pass equal lengths).
pub fn delta_norm(new: &[f32], old: &[f32]) -> f64 {
    let len = new.len().min(old.len());
    let mut lanes = [0.0f64; LANES];
    let (new, old) = (&new[..len], &old[..len]);
    let (mut a, mut b) = (new.chunks_exact(LANES), old.chunks_exact(LANES));
    for (x, y) in (&mut a).zip(&mut b) {
        for ((sum, &x), &y) in lanes.iter_mut().zip(x).zip(y) {
            let d = f64::from(x) - f64::from(y);
            *sum += d * d;
        }
    }
    let tail: f64 = a
        .remainder()
        .iter()
        .zip(b.remainder())
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    (lanes.iter().sum::<f64>() + tail).sqrt()
}

/// What rules 1 and 2 read of an update, in one pass over both vectors.
struct Norms {
    /// Every new weight is finite and within ±[`MAX_ABS_WEIGHT`].
    within: bool,
    /// [`delta_norm`] of the update.
    delta: f64,
    /// [`l2_norm`] of the weights sent.
    sent: f64,
}

/// [`Norms`] of `new` against `sent` (equal lengths; over the shorter's):
/// one read of each instead of three passes (the guard judges every hop:
/// 7 % of a 1,000-client round, `astraea bench rounds`, before).
fn norms(new: &[f32], sent: &[f32]) -> Norms {
    let len = new.len().min(sent.len());
    let (beyond, new, sent) = (&new[len..], &new[..len], &sent[..len]);
    let mut delta = [0.0f64; LANES];
    let mut norm = [0.0f64; LANES];
    let mut within = true;
    let (mut a, mut b) = (new.chunks_exact(LANES), sent.chunks_exact(LANES));
    for (x, y) in (&mut a).zip(&mut b) {
        // Fixed-size arrays: no bounds checks in the loop, so it vectorises.
        let (x, y): (&[f32; LANES], &[f32; LANES]) = (
            x.try_into().expect("chunks_exact"),
            y.try_into().expect("chunks_exact"),
        );
        for i in 0..LANES {
            let (x, y) = (x[i], y[i]);
            within &= x.abs() <= MAX_ABS_WEIGHT;
            let d = f64::from(x) - f64::from(y);
            delta[i] += d * d;
            norm[i] += f64::from(y) * f64::from(y);
        }
    }
    let (mut delta, mut norm) = (delta.iter().sum::<f64>(), norm.iter().sum::<f64>());
    for (&x, &y) in a.remainder().iter().zip(b.remainder()) {
        within &= x.abs() <= MAX_ABS_WEIGHT;
        delta += (f64::from(x) - f64::from(y)).powi(2);
        norm += f64::from(y).powi(2);
    }
    // A longer `new` is out of bounds past `sent`'s end (the frame checks
    // make them equal; this keeps the rule whole without them).
    within &= check_weights(beyond).is_ok();
    Norms {
        within,
        delta: delta.sqrt(),
        sent: norm.sqrt(),
    }
}

/// Euclidean norm of a weight vector.
pub fn l2_norm(values: &[f32]) -> f64 {
    sum_squares(values, f64::from).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_norms_are_the_naive_sums_and_see_every_weight() {
        // Lengths around the lanes' width, so the tail is exercised.
        for len in [0usize, 1, 7, 8, 9, 1001] {
            let new: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let sent: Vec<f32> = (0..len)
                .map(|i| ((i * 53 % 89) as f32 - 44.0) / 5.0)
                .collect();
            let naive_delta = new
                .iter()
                .zip(&sent)
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                .sum::<f64>()
                .sqrt();
            let naive_norm = sent
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            let found = norms(&new, &sent);
            assert!(found.within);
            assert!((found.delta - naive_delta).abs() <= 1e-9 * naive_delta.max(1.0));
            assert!((found.sent - naive_norm).abs() <= 1e-9 * naive_norm.max(1.0));
            assert!((delta_norm(&new, &sent) - naive_delta).abs() <= 1e-9 * naive_delta.max(1.0));
            assert!((l2_norm(&sent) - naive_norm).abs() <= 1e-9 * naive_norm.max(1.0));
            if len > 0 {
                let mut bad = new.clone();
                bad[len - 1] = f32::NAN;
                assert!(!norms(&bad, &sent).within, "NaN at the tail, length {len}");
                bad[len - 1] = 2.0 * MAX_ABS_WEIGHT;
                assert!(!norms(&bad, &sent).within);
            }
        }
        // A longer update is judged past the weights sent too.
        assert!(!norms(&[0.0, f32::INFINITY], &[0.0]).within);
    }

    fn moved(base: &[f32], by: f32) -> Vec<f32> {
        base.iter().map(|v| v + by).collect()
    }

    #[test]
    fn the_first_update_of_a_run_is_judged_against_the_model() {
        // Prepare: a fresh guard, no history at all (the bug: the first
        // update with one weight of 1e35 was accepted and the aggregate
        // became non-finite).
        let sent = vec![0.5f32; 100];
        let mut huge = sent.clone();
        huge[7] = 1e35;
        let mut far = sent.clone();
        far[3] = 500.0;

        // Execute
        let huge_outcome = UpdateGuard::default().check(&sent, &huge);
        let far_outcome = UpdateGuard::default().check(&sent, &far);
        let fine_outcome = UpdateGuard::default().check(&sent, &moved(&sent, 0.01));

        // Assert: the model's norm is 5, so 2x allows a move of 10.
        assert_eq!(
            huge_outcome,
            Err(GuardRefusal::OutOfBounds {
                index: 7,
                value: 1e35
            })
        );
        assert!(matches!(far_outcome, Err(GuardRefusal::TooFar { .. })));
        assert!(fine_outcome.is_ok());
    }

    /// Rule 3 alone (a ratio bound too loose to matter), on a 4-weight
    /// model at zero, and the update that moves it by `norm`.
    fn median_rule(window: usize, min_history: usize) -> (UpdateGuard, Vec<f32>) {
        (
            UpdateGuard::new(1e9, 10.0, window, min_history),
            vec![0.0f32; 4],
        )
    }

    fn by(sent: &[f32], norm: f64) -> Vec<f32> {
        moved(sent, (norm / 2.0) as f32)
    }

    #[test]
    fn a_distance_far_above_the_median_of_earlier_rounds_is_refused_and_the_client_kept() {
        // Prepare
        let (guard, sent) = median_rule(100, 3);

        // Execute: a first round builds the median; the next is judged.
        let first: Vec<_> = [500.0, 1.0, 1.2, 0.9, 1.1]
            .iter()
            .map(|&n| guard.check(&sent, &by(&sent, n)))
            .collect();
        guard.settle();
        let outlier = guard.check(&sent, &by(&sent, 50.0));
        let borderline = guard.check(&sent, &by(&sent, 9.0));

        // Assert: nothing settled during the first round, so all of it
        // passed (rule 2 bounds it); then [500, 1, 1.2, 0.9, 1.1] has
        // median 1.1.
        assert!(first.iter().all(Result::is_ok), "{first:?}");
        let Err(refusal) = outlier else {
            panic!("{outlier:?}")
        };
        assert!(
            matches!(refusal, GuardRefusal::Outlier { median, .. } if (median - 1.1).abs() < 1e-6)
        );
        assert!(!refusal.drops_client());
        assert!(borderline.is_ok());
    }

    #[test]
    fn only_the_bounds_drop_a_client() {
        let sent = vec![0.5f32; 100];
        let mut huge = sent.clone();
        huge[0] = 1e35;
        let guard = UpdateGuard::default();
        assert!(guard.check(&sent, &huge).unwrap_err().drops_client());
        assert!(
            guard
                .check(&sent, &moved(&sent, 50.0))
                .unwrap_err()
                .drops_client()
        );
    }

    #[test]
    fn honest_hops_that_grow_past_ten_times_the_old_median_are_accepted_again() {
        // Prepare: 20 rounds of 5 hops moving the model by about 0.05,
        // then every hop moves it by about 0.6 (late in a long-tailed run,
        // the bug: the median of accepted hops only never moved, and every
        // client was turned away).
        let (guard, sent) = median_rule(100, 5);
        let noise = |i: usize| 1.0 + 0.02 * (i % 7) as f64;
        for round in 0..20 {
            for i in 0..5 {
                let norm = 0.05 * noise(round * 5 + i);
                guard
                    .check_client(&sent, &by(&sent, norm), i as u64)
                    .unwrap();
            }
            guard.settle();
        }

        // Execute: rounds of the larger hops.
        let mut first_accepted = None;
        let mut refused_dropping = 0;
        for round in 0..30 {
            let verdicts: Vec<_> = (0..5)
                .map(|i| {
                    let norm = 0.6 * noise(round * 5 + i);
                    guard.check_client(&sent, &by(&sent, norm), i as u64)
                })
                .collect();
            refused_dropping += verdicts
                .iter()
                .filter(|v| v.as_ref().is_err_and(GuardRefusal::drops_client))
                .count();
            if first_accepted.is_none() && verdicts.iter().all(Result::is_ok) {
                first_accepted = Some(round);
            }
            guard.settle();
        }

        // Assert: refused (not dropped) until they are half the window,
        // then accepted.
        assert_eq!(refused_dropping, 0);
        assert_eq!(first_accepted, Some(10), "{:?}", guard.history());
    }

    #[test]
    fn a_minority_of_scaled_hops_is_refused_round_after_round() {
        // Prepare: 20 % of each round's hops scaled 20x.
        let (guard, sent) = median_rule(100, 5);
        let mut refused = [0usize; 2];

        // Execute
        for round in 0..40 {
            for i in 0..10 {
                let honest = 1.0 + 0.1 * ((round + i) % 5) as f64;
                let attacker = i < 2;
                let norm = if attacker { 20.0 * honest } else { honest };
                if guard.check(&sent, &by(&sent, norm)).is_err() {
                    refused[usize::from(attacker)] += 1;
                }
            }
            guard.settle();
        }

        // Assert: every scaled hop after the first round, no honest one.
        assert_eq!(refused, [0, 39 * 2]);
    }

    #[test]
    fn a_client_standing_out_again_and_again_is_dropped_and_an_occasional_outlier_is_not() {
        // Prepare: ten clients a round; client 0 moves the model 20x as
        // far as the others every hop, client 1 in every eighth of its
        // hops (the most outlying honest client of a long-tailed run stood
        // out in about one hop of twelve).
        let (guard, sent) = median_rule(100, 5);
        let mut outcomes: Vec<Vec<Result<f64, GuardRefusal>>> = vec![Vec::new(); 10];

        // Execute
        for round in 0..40 {
            for client in 0..10u64 {
                let honest = 1.0 + 0.05 * ((round + client as usize) % 4) as f64;
                let norm = match client {
                    0 => 20.0 * honest,
                    1 if round % 8 == 7 => 20.0 * honest,
                    _ => honest,
                };
                let outcome = guard.check_client(&sent, &by(&sent, norm), client);
                outcomes[client as usize].push(outcome);
            }
            guard.settle();
        }

        // Assert: client 0 passes the first round (no median yet), is
        // refused in rounds 2 and 3, dropped at its third refusal; client
        // 1 is refused five times and never dropped.
        let dropping =
            |o: &Result<f64, GuardRefusal>| o.as_ref().is_err_and(GuardRefusal::drops_client);
        let first_drop = outcomes[0].iter().position(dropping);
        assert_eq!(first_drop, Some(3), "{:?}", &outcomes[0][..5]);
        assert!(matches!(
            outcomes[0][3],
            Err(GuardRefusal::RepeatedOutlier {
                refused: 3,
                judged: 3,
                ..
            })
        ));
        assert!(!outcomes[1].iter().any(dropping));
        assert_eq!(outcomes[1].iter().filter(|o| o.is_err()).count(), 5);
        assert!(outcomes[2..].iter().flatten().all(Result::is_ok));
    }

    #[test]
    fn an_attacker_joining_again_under_new_ids_is_dropped_every_time() {
        // Prepare: six honest clients a round, and one scaled attacker
        // that joins again under a new id whenever it is dropped (the
        // bug: the dropped identities' records kept counting, their share
        // of refusals lifted the median client's past a tenth, and nobody
        // was dropped again).
        let (guard, sent) = median_rule(100, 5);
        let mut attacker = 100u64;
        let mut drops = 0;

        // Execute
        for round in 0..80 {
            for client in 0..6u64 {
                let honest = 1.0 + 0.05 * ((round + client as usize) % 4) as f64;
                guard
                    .check_client(&sent, &by(&sent, honest), client)
                    .unwrap();
            }
            let outcome = guard.check_client(&sent, &by(&sent, 20.0), attacker);
            if outcome.is_err_and(|r| r.drops_client()) {
                drops += 1;
                attacker += 1;
            }
            guard.settle();
        }

        // Assert: after the first round (no median), each identity lasts
        // three refusals: 79 judged hops, 26 drops.
        assert_eq!(drops, 26);
    }

    #[test]
    fn hops_that_leave_the_model_where_it_was_do_not_pull_the_median_down() {
        // Prepare: a majority of echoes (distance 0) beside honest hops.
        let (guard, sent) = median_rule(100, 5);
        let mut refused = 0;

        // Execute
        for round in 0..20 {
            for client in 0..10u64 {
                let norm = if client < 7 {
                    0.0
                } else {
                    1.0 + 0.1 * (round % 3) as f64
                };
                if guard.check_client(&sent, &by(&sent, norm), client).is_err() {
                    refused += 1;
                }
            }
            guard.settle();
        }

        // Assert
        assert_eq!(refused, 0);
    }

    #[test]
    fn records_of_clients_gone_for_long_are_forgotten() {
        let (guard, sent) = median_rule(100, 1);
        for round in 0..300u64 {
            // A new client every round, each judged once.
            guard.check_client(&sent, &by(&sent, 1.0), round).unwrap();
            guard.settle();
        }
        assert!(
            guard.records() <= RECORD_ROUNDS as usize + 1,
            "{}",
            guard.records()
        );
    }

    #[test]
    fn a_rounds_verdicts_do_not_depend_on_the_order_its_hops_are_judged_in() {
        // Prepare: a settled round, then one with hops either side of 10x.
        let judge_in = |order: &[f64]| {
            let (guard, sent) = median_rule(100, 3);
            for n in [1.0, 1.0, 1.0] {
                guard.check(&sent, &by(&sent, n)).unwrap();
            }
            guard.settle();
            let mut verdicts: Vec<(u64, bool)> = order
                .iter()
                .map(|&n| (n.to_bits(), guard.check(&sent, &by(&sent, n)).is_ok()))
                .collect();
            verdicts.sort_unstable();
            guard.settle();
            (verdicts, guard.history())
        };
        let round = [12.0, 0.5, 30.0, 9.5, 11.0, 2.0];
        let mut reversed = round;
        reversed.reverse();

        // Execute
        let forward = judge_in(&round);
        let backward = judge_in(&reversed);

        // Assert
        assert_eq!(forward, backward);
        assert_eq!(forward.0.iter().filter(|(_, ok)| *ok).count(), 3);
    }

    #[test]
    fn a_restored_history_judges_like_the_original() {
        // Prepare
        let (original, sent) = median_rule(3, 3);
        for n in [2.0, 4.0, 1.0, 1.0] {
            original.check(&sent, &by(&sent, n)).unwrap();
        }
        original.settle();

        // Execute: restore what it saved, plus junk that must be ignored.
        let mut saved = original.history();
        saved.insert(0, f64::NAN);
        saved.insert(1, -3.0);
        let (restored, _) = median_rule(3, 3);
        restored.restore(&saved);

        // Assert: the window kept the newest three (in an order of their
        // values within the round).
        assert_eq!(restored.history(), original.history());
        assert_eq!(restored.history().len(), 3);
        assert!(restored.check(&sent, &by(&sent, 15.0)).is_err());
        assert!(restored.check(&sent, &by(&sent, 5.0)).is_ok());
    }

    #[test]
    fn norms_are_euclidean() {
        assert_eq!(delta_norm(&[3.0, 4.0, 1.0], &[0.0, 0.0, 1.0]), 5.0);
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
    }
}
