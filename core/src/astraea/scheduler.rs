//! Who forms a round's mediators (docs/METHOD.md step 5 and its
//! alternatives): the papers' greedy KL rule, the speed-aware greedy, random
//! groups, an Oort-style utility rule and a learned policy. Every one is
//! called the same way by the strategy, in `simulate` and in `serve` alike,
//! and every one places each participant in exactly one mediator of at most
//! `gamma` clients.

use std::fmt;
use std::sync::Arc;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::formation::{Action, Formation};
use super::policy::Policy;

/// Oort's straggler penalty exponent (Lai et al., OSDI 2021, alpha = 2).
const OORT_ALPHA: f64 = 2.0;

/// How mediators are formed. Parsed from `greedy`, `speed-aware:WEIGHT`,
/// `random` and `oort`; a learned policy comes from a file, so the caller
/// reads it ([`Scheduler::parse`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Scheduler {
    /// The papers' greedy: mediators filled one after another, each time
    /// with the candidate whose labels bring the mix closest to uniform.
    Greedy,
    /// The speed-aware greedy (`astraea::assign_mediators_timed`): the
    /// least loaded mediator takes the candidate minimising `KL - weight *
    /// t / T`.
    SpeedAware {
        /// lambda: the weight of chain-time balance against label balance.
        weight: f64,
    },
    /// Random groups of `gamma` (a seeded shuffle of the participants).
    Random,
    /// Oort-style (Lai et al., OSDI 2021): the least loaded mediator takes
    /// the candidate of highest utility, statistical utility (its samples,
    /// rare labels weighted up by the round's label mix, standing in for
    /// Oort's loss-based utility, which needs losses the server does not
    /// have) times Oort's speed factor `(T / t)^alpha` for candidates slower
    /// than the preferred time `T` (the median hop time).
    Oort,
    /// A trained actor ([`Policy`]) picks each action.
    Learned(Arc<Policy>),
}

impl Scheduler {
    /// Parses a scheduler name; `learned:PATH` calls `load(PATH)` for the
    /// file's bytes (the core does no I/O).
    ///
    /// # Errors
    /// An unknown name, a speed-aware weight that is not a finite number
    /// >= 0, or a policy file that cannot be read or is refused.
    pub fn parse(
        text: &str,
        load: impl FnOnce(&str) -> Result<Vec<u8>, String>,
    ) -> Result<Self, String> {
        match text.split_once(':') {
            None if text == "greedy" => Ok(Self::Greedy),
            None if text == "random" => Ok(Self::Random),
            None if text == "oort" => Ok(Self::Oort),
            Some(("speed-aware", weight)) => weight
                .parse::<f64>()
                .ok()
                .filter(|w| w.is_finite() && *w >= 0.0)
                .map(|weight| Self::SpeedAware { weight })
                .ok_or_else(|| format!("speed-aware weight {weight:?} is not a number >= 0")),
            Some(("learned", path)) => {
                let bytes = load(path)?;
                let policy =
                    Policy::from_safetensors(&bytes).map_err(|e| format!("{path}: {e}"))?;
                Ok(Self::Learned(Arc::new(policy)))
            }
            _ => Err(format!(
                "unknown scheduler {text:?}, expected greedy, speed-aware:WEIGHT, random, oort or learned:PATH"
            )),
        }
    }

    /// Splits participants into mediators of at most `gamma`.
    ///
    /// `counts[i]` is participant i's label counts (all of one length),
    /// `seconds[i]` its expected hop time (`None` when unknown), `seed`
    /// makes the random scheduler reproducible (the strategy derives it from
    /// the round's participants). Returns mediators as lists of participant
    /// indices in the order the model travels; every index appears once.
    pub fn assign(
        &self,
        counts: &[Vec<usize>],
        seconds: &[Option<f64>],
        gamma: usize,
        seed: u64,
    ) -> Vec<Vec<usize>> {
        let gamma = gamma.max(1);
        match self {
            Self::Greedy => play(Formation::new(counts, &[], gamma), |board, agent| {
                pick_min(board, |board, i| board.kl_with(agent, i))
            }),
            Self::SpeedAware { weight } => {
                let weight = if weight.is_finite() { *weight } else { 0.0 };
                play(Formation::new(counts, seconds, gamma), |board, agent| {
                    pick_min(board, |board, i| {
                        board.kl_with(agent, i)
                            - weight * board.hop_times()[i] / board.balanced_time()
                    })
                })
            }
            Self::Random => {
                let mut order: Vec<usize> = (0..counts.len()).collect();
                order.shuffle(&mut StdRng::seed_from_u64(seed));
                order.chunks(gamma).map(<[usize]>::to_vec).collect()
            }
            Self::Oort => {
                let utility = oort_utility(counts, seconds);
                play(Formation::new(counts, seconds, gamma), |board, _| {
                    pick_min(board, |_, i| -utility[i])
                })
            }
            Self::Learned(policy) => {
                let board = Formation::new(counts, seconds, gamma);
                let mut picker = LearnedPicker::new(policy, &board);
                play(board, |board, agent| picker.pick(board, agent))
            }
        }
    }
}

/// The learned policy's pick: the action [`Policy::scores`] would rank
/// first over [`Formation::observe`]'s rows, computed without the rows.
/// The first layer is linear, so a row's pre-activation is the sum of a
/// part fixed for the round (the candidate's time and size: features 3, 5
/// and the candidate's share of 4), a part fixed for the turn (features 6
/// to 9, the chain's own time in 4 and its KL in 1) and `kl * (W1[1] +
/// W1[2])`: three operations a hidden unit per candidate.
struct LearnedPicker<'p> {
    policy: &'p Policy,
    /// `statics[i * padded + k]`: candidate i's fixed part for unit k.
    statics: Vec<f32>,
    /// `W1[1] + W1[2]`: a unit's weight on the candidate's KL.
    kl_weight: Vec<f32>,
    turn: Vec<f32>,
    /// `out.weight`, padded.
    out: Vec<f32>,
    /// Hidden units padded to a multiple of [`LANES`].
    padded: usize,
}

impl<'p> LearnedPicker<'p> {
    fn new(policy: &'p Policy, board: &Formation<'_>) -> Self {
        let h = policy.hidden();
        let padded = h.div_ceil(LANES) * LANES;
        let (w1, _, w2, _) = policy.layers();
        let row = |f: usize| &w1[f * h..(f + 1) * h];
        let pad = |units: &mut Vec<f32>| units.resize(units.len() + padded - h, 0.0);
        let participants = board.hop_times().len();
        let mut statics = Vec::with_capacity(participants * padded);
        for i in 0..participants {
            let (time, size) = board.candidate(i);
            let (time, size) = (time as f32, size as f32);
            statics.extend((0..h).map(|k| row(3)[k] * time + row(4)[k] * time + row(5)[k] * size));
            pad(&mut statics);
        }
        let mut kl_weight: Vec<f32> = (0..h).map(|k| row(1)[k] + row(2)[k]).collect();
        pad(&mut kl_weight);
        let mut out = w2.to_vec();
        pad(&mut out);
        Self {
            policy,
            statics,
            kl_weight,
            turn: vec![0.0; padded],
            out,
            padded,
        }
    }

    fn pick(&mut self, board: &mut Formation<'_>, agent: usize) -> Action {
        let h = self.policy.hidden();
        let hp = self.padded;
        let (w1, b1, _, b2) = self.policy.layers();
        let row = |f: usize| &w1[f * h..(f + 1) * h];
        let context = board.context(agent);
        let turn_inputs = [
            (4, context.load),
            (6, context.fill),
            (7, context.progress),
            (8, context.longest),
            (9, context.pressure),
            (1, -context.kl_now),
        ];
        self.turn[..h].copy_from_slice(b1);
        for (f, x) in turn_inputs {
            let x = x as f32;
            for (t, w) in self.turn.iter_mut().zip(row(f)) {
                *t += w * x;
            }
        }
        let mut best = None;
        let mut top = f32::NEG_INFINITY;
        for &i in board.unassigned() {
            let kl = board.kl_with(agent, i) as f32;
            let fixed = &self.statics[i * hp..(i + 1) * hp];
            let score = b2 + unit_sum(&self.turn, fixed, &self.kl_weight, &self.out, kl);
            if best.is_none() || score > top {
                best = Some(Action::Take(i));
                top = score;
            }
        }
        if board.can_close(agent) {
            let close = self.policy.scores(&board.close_row(&context))[0];
            if best.is_none() || close > top {
                best = Some(Action::Close);
            }
        }
        best.unwrap_or(Action::Close)
    }
}

/// Lanes of [`unit_sum`]: hidden units are padded to a multiple with
/// zero weights (a padded unit adds `relu(0) * 0`).
const LANES: usize = 8;

/// `sum_k relu(turn_k + fixed_k + kl_weight_k * kl) * out_k` over slices
/// of a multiple of [`LANES`], in lanes so the compiler can use vector
/// instructions (the float sums in another order than the rows': scores
/// agree to rounding).
#[inline]
fn unit_sum(turn: &[f32], fixed: &[f32], kl_weight: &[f32], out: &[f32], kl: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    for (((t, f), u), w) in turn
        .chunks_exact(LANES)
        .zip(fixed.chunks_exact(LANES))
        .zip(kl_weight.chunks_exact(LANES))
        .zip(out.chunks_exact(LANES))
    {
        for j in 0..LANES {
            acc[j] += (t[j] + f[j] + u[j] * kl).max(0.0) * w[j];
        }
    }
    // A tree, not a chain of eight dependent additions.
    let half = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (half[0] + half[2]) + (half[1] + half[3])
}

/// Plays the board to the end with `choose`. A choice the board refuses
/// (never made by the rules here) falls back to the first unassigned
/// candidate, so the loop always ends.
fn play(
    mut board: Formation<'_>,
    mut choose: impl FnMut(&mut Formation<'_>, usize) -> Action,
) -> Vec<Vec<usize>> {
    while let Some(agent) = board.turn() {
        let action = choose(&mut board, agent);
        if !board.play(agent, action) {
            let first = board.unassigned()[0];
            board.play(agent, Action::Take(first));
        }
    }
    board.finish()
}

/// The unassigned candidate of least `cost` (ties to the earliest in the
/// pool's order, which is participant order).
fn pick_min(
    board: &mut Formation<'_>,
    mut cost: impl FnMut(&mut Formation<'_>, usize) -> f64,
) -> Action {
    let mut best = (usize::MAX, f64::INFINITY);
    for slot in 0..board.unassigned().len() {
        let i = board.unassigned()[slot];
        let c = cost(board, i);
        if best.0 == usize::MAX || c < best.1 {
            best = (i, c);
        }
    }
    Action::Take(best.0)
}

/// Oort-style utility of each participant: `sum_k n_ik * r_k` with `r_k =
/// mean class total / (class total + 1)` over the round (rare labels count
/// more), times `(T / t_i)^alpha` when `t_i > T`, `T` the median known hop
/// time.
fn oort_utility(counts: &[Vec<usize>], seconds: &[Option<f64>]) -> Vec<f64> {
    let classes = counts.first().map_or(0, Vec::len);
    let mut totals = vec![0f64; classes];
    for row in counts {
        for (t, &n) in totals.iter_mut().zip(row) {
            *t += n as f64;
        }
    }
    let mean = totals.iter().sum::<f64>() / classes.max(1) as f64;
    let rarity: Vec<f64> = totals.iter().map(|t| mean / (t + 1.0)).collect();
    let mut known: Vec<f64> = seconds
        .iter()
        .flatten()
        .copied()
        .filter(|s| s.is_finite() && *s > 0.0)
        .collect();
    known.sort_by(f64::total_cmp);
    let preferred = known.get(known.len() / 2).copied();
    counts
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let statistical: f64 = row.iter().zip(&rarity).map(|(&n, r)| n as f64 * r).sum();
            let t = seconds.get(i).copied().flatten();
            let speed = match (t, preferred) {
                (Some(t), Some(pref)) if t.is_finite() && t > pref => (pref / t).powf(OORT_ALPHA),
                _ => 1.0,
            };
            statistical * speed
        })
        .collect()
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Greedy => write!(f, "greedy"),
            Self::SpeedAware { weight } => write!(f, "speed-aware:{weight}"),
            Self::Random => write!(f, "random"),
            Self::Oort => write!(f, "oort"),
            Self::Learned(_) => write!(f, "learned"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::astraea::formation::FEATURES;
    use crate::astraea::policy::policy_shapes;
    use crate::weights::ParamShape;

    /// 24 clients over 4 classes, each holding one or two classes, with
    /// hop times spread 1..=60 s.
    fn round() -> (Vec<Vec<usize>>, Vec<Option<f64>>) {
        let counts = (0..24)
            .map(|i| {
                let mut row = vec![0; 4];
                row[i % 4] = 10 + i;
                row[(i / 4) % 4] += 5;
                row
            })
            .collect();
        let seconds = (0..24)
            .map(|i| Some(1.0 + ((i * 37) % 60) as f64))
            .collect();
        (counts, seconds)
    }

    fn every_one_once(groups: &[Vec<usize>], c: usize, gamma: usize) {
        let mut all: Vec<usize> = groups.concat();
        all.sort_unstable();
        assert_eq!(all, (0..c).collect::<Vec<_>>());
        assert!(groups.iter().all(|g| !g.is_empty() && g.len() <= gamma));
    }

    #[test]
    fn every_scheduler_places_each_participant_once() {
        let (counts, seconds) = round();
        for scheduler in [
            Scheduler::Greedy,
            Scheduler::SpeedAware { weight: 1.0 },
            Scheduler::Random,
            Scheduler::Oort,
            Scheduler::Learned(Arc::new(kl_after_policy())),
        ] {
            for gamma in [1, 5, 7, 24, 100] {
                let groups = scheduler.assign(&counts, &seconds, gamma, 3);
                every_one_once(&groups, counts.len(), gamma);
            }
            assert!(scheduler.assign(&[], &[], 5, 0).is_empty());
        }
    }

    #[test]
    fn random_groups_follow_the_seed() {
        let (counts, seconds) = round();
        let a = Scheduler::Random.assign(&counts, &seconds, 5, 1);
        assert_eq!(a, Scheduler::Random.assign(&counts, &seconds, 5, 1));
        assert_ne!(a, Scheduler::Random.assign(&counts, &seconds, 5, 2));
    }

    #[test]
    fn oort_takes_fast_clients_with_rare_labels_first() {
        // Class 1 is rare (20 of 200 samples): clients 3 and 4 hold half
        // of it each, clients 0-2 a third of class 0 each, so 3 and 4 are
        // worth more than their sample counts say; client 4 is 10x slower
        // than the preferred (median) time, so it goes last.
        let counts = vec![
            vec![60, 0],
            vec![60, 0],
            vec![60, 0],
            vec![0, 10],
            vec![0, 10],
        ];
        let seconds = [Some(1.0), Some(1.0), Some(1.0), Some(1.0), Some(10.0)];
        let groups = Scheduler::Oort.assign(&counts, &seconds, 5, 0);
        assert_eq!(groups, vec![vec![3, 0, 1, 2, 4]]);
    }

    /// A policy scoring each action by minus the chain's KL after it: a
    /// ReLU network can pass a non-negative feature through unchanged.
    fn kl_after_policy() -> Policy {
        let n: usize = policy_shapes(1).iter().map(ParamShape::numel).sum();
        let mut values = vec![0.0f32; n];
        values[2] = 1.0; // l1: feature 2 (KL after, >= 0) -> unit
        values[FEATURES + 1] = -1.0; // out.weight
        Policy::new(1, values, String::new()).unwrap()
    }

    #[test]
    fn a_learned_policy_plays_the_same_board_as_the_heuristics() {
        // With c a multiple of gamma no chain may close early, so a policy
        // that takes the least KL is the speed-aware greedy at weight 0.
        let (counts, seconds) = round();
        let learned = Scheduler::Learned(Arc::new(kl_after_policy()));
        for gamma in [4, 6] {
            assert_eq!(
                learned.assign(&counts, &seconds, gamma, 0),
                Scheduler::SpeedAware { weight: 0.0 }.assign(&counts, &seconds, gamma, 0)
            );
        }
    }

    #[test]
    fn the_learned_fast_path_picks_what_the_rows_rank_first() {
        // A policy of random weights, on boards at several stages: the
        // pick without rows is the best action over observe()'s rows.
        let (counts, seconds) = round();
        let n: usize = policy_shapes(8).iter().map(ParamShape::numel).sum();
        for seed in 0..5u32 {
            let values = (0..n)
                .map(|i| {
                    (((i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(97)) % 2000) as f32
                        / 1000.0
                        - 1.0
                })
                .collect();
            let policy = Policy::new(8, values, String::new()).unwrap();
            let mut board = Formation::new(&counts, &seconds, 5);
            let mut picker = LearnedPicker::new(&policy, &board);
            let mut rows = Vec::new();
            while let Some(agent) = board.turn() {
                rows.clear();
                let actions = board.observe(agent, &mut rows);
                let scores = policy.scores(&rows);
                let fast = picker.pick(&mut board, agent);
                let at = actions.iter().position(|a| *a == fast).unwrap();
                let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert!(
                    top - scores[at] < 1e-4,
                    "seed {seed}: {fast:?} scored {} against {top}",
                    scores[at]
                );
                board.play(agent, fast);
            }
        }
    }

    #[test]
    fn names_parse_and_print_back() {
        let none = |_: &str| -> Result<Vec<u8>, String> { Err("no file".into()) };
        for name in ["greedy", "speed-aware:0.5", "random", "oort"] {
            assert_eq!(Scheduler::parse(name, none).unwrap().to_string(), name);
        }
        for bad in ["speed-aware:-1", "speed-aware:nan", "fastest", "learned:x"] {
            assert!(Scheduler::parse(bad, none).is_err(), "{bad}");
        }
        let bytes = kl_after_policy().to_safetensors();
        let learned = Scheduler::parse("learned:p.safetensors", |path| {
            assert_eq!(path, "p.safetensors");
            Ok(bytes)
        })
        .unwrap();
        assert_eq!(learned, Scheduler::Learned(Arc::new(kl_after_policy())));
    }
}
