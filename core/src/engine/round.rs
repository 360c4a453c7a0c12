//! Closing a round, the same in `serve` and `simulate`: which aggregate
//! the round makes, whether the model adopts it, and what client-level DP
//! spends.
//!
//! - The aggregate is the strategy's rule over the chains' results
//!   ([`crate::strategy::Strategy::aggregate`]); under client-level DP,
//!   DP-FedAvg's clipped noisy mean ([`crate::privacy::private_mean`],
//!   McMahan et al. 2018), the clip moving under adaptive clipping
//!   (Andrew et al. 2021); under secure aggregation, the unmasked mean the
//!   round hands in, noised under DP unless the maskers added the noise
//!   (distributed DP).
//! - A round that cannot be unmasked, an aggregate outside the protocol's
//!   bounds (`limits::check_weights`: finite, within ±1e4) or one whose
//!   computation panics is dropped: the previous model stays.
//! - Every DP round is composed into the Rényi DP accountant (whether or
//!   not a result came back: the clients were asked), at the sampling rate
//!   the [`super::Sampling`] of the run gives — but for a secure round that
//!   could not be unmasked, which releases nothing and spends nothing; a
//!   round that would take the run past its budget does not start.

use std::panic::AssertUnwindSafe;

use rand::Rng;

use super::chain::SecureChain;
use crate::privacy::{
    ModelPrivacy, RdpAccountant, distributed_noise_share, noise_the_mean, private_mean,
};
use crate::protocol::limits::check_weights;
use crate::strategy::{Group, GroupFailure, GroupResult, Strategy};

/// What closing a round decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Closed {
    /// The model becomes these weights.
    Adopted(Vec<f32>),
    /// Nothing to adopt: no result came back, the strategy made no
    /// aggregate, or under DP no noise could be computed or the private
    /// mean failed. The model stays.
    Kept,
    /// The round was refused, for this reason: the model stays.
    Dropped(String),
    /// Under secure aggregation the unmasked mean broke the guard's rules
    /// 1–2 or the loss rule, for this reason: the round is dropped as by
    /// [`Closed::Dropped`], and one of its maskers is to blame
    /// ([`super::suspects::MaskerSuspects`]).
    Spoiled(String),
}

/// A run's client-level DP across rounds: the mechanism, its clip (moving
/// under adaptive clipping), the accountant and the budget.
#[derive(Debug, Clone)]
pub struct RoundPrivacy {
    /// Clip (the starting one, under adaptive clipping), noise multiplier,
    /// delta.
    pub mechanism: ModelPrivacy,
    /// The run stops before a round that would spend more (at `delta`);
    /// `None`: no budget.
    pub max_epsilon: Option<f64>,
    /// The maskers add the noise (distributed DP under secure aggregation).
    pub distributed: bool,
    /// The sampling rate q each round is composed at.
    pub q: f64,
    /// The clip of the next round.
    pub clip: f64,
    /// What the run has spent.
    pub accountant: RdpAccountant,
}

impl RoundPrivacy {
    /// A run that has spent nothing yet, composing rounds at rate `q`.
    pub fn new(
        mechanism: ModelPrivacy,
        max_epsilon: Option<f64>,
        distributed: bool,
        q: f64,
    ) -> Self {
        Self {
            clip: mechanism.clip,
            mechanism,
            max_epsilon,
            distributed,
            q,
            accountant: RdpAccountant::new(),
        }
    }

    /// Epsilon spent so far, at the mechanism's delta.
    pub fn epsilon(&self) -> f64 {
        self.accountant.epsilon(self.mechanism.delta)
    }

    /// `Err` with the reason when one more round would spend more than the
    /// budget (the run then stops before it).
    pub fn budget_allows(&self, round: u32) -> Result<(), String> {
        let Some(max) = self.max_epsilon else {
            return Ok(());
        };
        let mut next = self.accountant.clone();
        next.compose(self.q, self.mechanism.noise_multiplier, 1);
        let would_spend = next.epsilon(self.mechanism.delta);
        if would_spend > max {
            return Err(format!(
                "privacy budget: round {round} would spend epsilon {would_spend:.3} > {max}; the run stops"
            ));
        }
        Ok(())
    }

    /// The round's mechanism (its clip where adaptive clipping moved it)
    /// and the standard deviation of the noise on the sum of clipped
    /// updates from groups of at most `largest` clients; `None` when no
    /// valid noise multiplier exists.
    pub fn round_mechanism(&self, largest: usize) -> Option<(ModelPrivacy, f64)> {
        let dp = ModelPrivacy {
            clip: self.clip,
            ..self.mechanism
        };
        Some((dp, dp.noise_std(largest)?))
    }

    /// Under distributed DP, the noise each masker adds to its clipped hop
    /// so that any `quorum` of them that can be unmasked carries the
    /// round's noise ([`distributed_noise_share`]); `None` without
    /// distributed DP, or when the noise is not a finite number (JSON
    /// would carry it as null: no noise at all).
    pub fn masker_noise(&self, largest: usize, quorum: usize) -> Option<f64> {
        if !self.distributed {
            return None;
        }
        let (_, noise_std) = self
            .round_mechanism(largest)
            .filter(|(_, s)| s.is_finite())?;
        Some(distributed_noise_share(noise_std, quorum))
    }

    /// Composes one round into the accountant and gives its mechanism.
    fn compose(&mut self, largest: usize) -> Option<(ModelPrivacy, f64)> {
        self.accountant
            .compose(self.q, self.mechanism.noise_multiplier, 1);
        self.round_mechanism(largest)
    }
}

/// The most clients in one of `groups` (1 when there are none): what DP's
/// sensitivity is taken over.
pub fn largest_group(groups: &[Group]) -> usize {
    groups.iter().map(|g| g.members.len()).max().unwrap_or(1)
}

/// What a secure round's chains are held to: under client-level DP
/// (`privacy`) the round's clip, split between each chain and its masker,
/// and under distributed DP the noise each masker adds so that any
/// `quorum` of them that can be unmasked carries the round's noise.
///
/// # Errors
/// Under distributed DP, when no finite noise exists for `groups`: the
/// round must not train (a masker would send its hop without noise).
pub fn secure_chain(
    privacy: Option<&RoundPrivacy>,
    groups: &[Group],
    quorum: usize,
) -> Result<SecureChain, String> {
    let Some(privacy) = privacy else {
        return Ok(SecureChain::default());
    };
    let masker_noise = if privacy.distributed {
        let share = privacy.masker_noise(largest_group(groups), quorum);
        Some(share.ok_or("distributed DP: no valid noise multiplier")?)
    } else {
        None
    };
    Ok(SecureChain {
        dp_clip: Some(privacy.clip),
        masker_noise,
    })
}

/// The round's aggregate under secure aggregation: the unmasked mean and
/// how many results are in it, or why it could not be unmasked.
pub type Unmasked = Result<(Vec<f32>, usize), String>;

/// Closes a round: the aggregate of `results` (with `failures`) from
/// `global` — the strategy's rule; under `privacy` (a synchronous DP
/// round whose groups have at most `largest` clients) DP-FedAvg's step;
/// under secure aggregation the `unmasked` mean, noised under DP unless
/// distributed — then the bounds check. The unmasked mean, which no hop
/// check saw, is first judged by the `guard`'s rules 1 and 2 and the
/// `loss_rule` against `global` ([`crate::guard::UpdateGuard::check_aggregate`],
/// [`crate::validation::LossCheck::judge_aggregate`]); breaking one drops
/// the round ([`Closed::Dropped`]). `rng` draws DP's noise and the
/// adaptive clip's count noise. Also returns the update norms before
/// clipping (DP, not secure; sorted) for the run's log. The update
/// `guard`'s outlier rule and the `loss_rule`, when on, are settled first
/// ([`crate::settled`]): their medians move between rounds, never within
/// one.
pub fn close(
    strategy: &dyn Strategy,
    global: &[f32],
    (results, failures): (&[GroupResult], &[GroupFailure]),
    privacy: Option<(&mut RoundPrivacy, usize)>,
    unmasked: Option<Unmasked>,
    (guard, loss_rule): (
        &crate::guard::UpdateGuard,
        Option<&crate::validation::LossCheck>,
    ),
    rng: &mut impl Rng,
) -> (Closed, Vec<f64>) {
    // The rules' medians move between rounds only, whatever becomes of
    // this one: the next round's hops are judged against this round's.
    guard.settle();
    if let Some(check) = loss_rule {
        check.settle();
    }
    let mut norms = Vec::new();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        if let Some(unmasked) = unmasked {
            let (mut mean, groups) = match unmasked {
                Ok(unmasked) => unmasked,
                Err(reason) => {
                    return Err(Closed::Dropped(format!("secure aggregation: {reason}")));
                }
            };
            // The round is spent whatever becomes of it, and judged as it
            // is released: noised first (by the maskers under distributed
            // DP, by the server here otherwise), so that whether it is
            // adopted is a function of the noised mean alone.
            let mut noised = 0.0;
            if let Some((privacy, largest)) = privacy {
                let Some((_, noise_std)) = privacy.compose(largest) else {
                    return Ok(None);
                };
                let per_weight = if privacy.distributed {
                    distributed_noise_std(noise_std, groups)
                } else {
                    if noise_the_mean(&mut mean, noise_std, groups, rng).is_none() {
                        return Ok(None);
                    }
                    noise_std / groups.max(1) as f64
                };
                noised = noise_norm(per_weight, mean.len());
            }
            // No hop check saw the maskers' results: the mean they make
            // is judged as a hop would be (rules 1 and 2, the loss rule).
            // A masker that adds to its masked input loses the round, not
            // the model. A noised mean may move as far as its noise more,
            // and the loss rule does not judge it (the noise raises the
            // loss of an honest round as much); what hides in that noise
            // is docs/PRIVACY.md's.
            if let Err(refusal) = guard.check_aggregate(global, &mean, noised) {
                return Err(Closed::Spoiled(format!(
                    "secure aggregation: the unmasked mean: {refusal}"
                )));
            }
            if let Some(Err(raised)) = loss_rule
                .filter(|_| noised == 0.0)
                .map(|check| check.judge_aggregate(global, &mean))
            {
                return Err(Closed::Spoiled(format!(
                    "secure aggregation: the unmasked mean: {raised}"
                )));
            }
            return Ok(Some(mean));
        }
        match privacy {
            Some((privacy, largest)) => {
                let Some((dp, noise_std)) = privacy.compose(largest) else {
                    return Ok(None);
                };
                let updates: Vec<&[f32]> = results.iter().map(|r| r.weights.as_slice()).collect();
                let Some((values, found)) = private_mean(global, &updates, dp.clip, noise_std, rng)
                else {
                    return Ok(None);
                };
                if let Some(adaptive) = dp.adaptive {
                    privacy.clip = adaptive.next_clip(dp.clip, &found, rng);
                }
                norms = found;
                Ok(Some(values))
            }
            None => Ok(strategy.aggregate(global, results, failures)),
        }
    }));
    norms.sort_by(f64::total_cmp);
    let closed = match outcome {
        Err(_) => Closed::Dropped("aggregation panicked".into()),
        Ok(Err(closed)) => closed,
        Ok(Ok(None)) => Closed::Kept,
        Ok(Ok(Some(values))) => match check_weights(&values) {
            Ok(()) => Closed::Adopted(values),
            Err(index) => Closed::Dropped(format!(
                "the aggregate's weight {index} is {}, outside the bounds",
                values[index]
            )),
        },
    };
    (closed, norms)
}

/// The most deviation the maskers' noise leaves on each weight of a mean
/// of `groups` results under distributed DP, `noise_std` being the round's
/// deviation on the sum: each of S maskers adds `noise_std / sqrt(t)` (t
/// the quorum, at least 1), so a weight of the mean carries
/// `noise_std / sqrt(S t)`, at most `noise_std / sqrt(S)`.
fn distributed_noise_std(noise_std: f64, groups: usize) -> f64 {
    noise_std / (groups.max(1) as f64).sqrt()
}

/// The most a Gaussian noise of deviation `per_weight` on each of `len`
/// weights moves them: its norm lies within five of its standard
/// deviations (`1 / sqrt(2 len)` relative) of `sqrt(len)` times the
/// deviation. 0 for no noise.
fn noise_norm(per_weight: f64, len: usize) -> f64 {
    if len == 0 || !per_weight.is_finite() || per_weight <= 0.0 {
        return 0.0;
    }
    per_weight * (len as f64).sqrt() * (1.0 + 5.0 / (2.0 * len as f64).sqrt())
}

/// What secure aggregation would unmask from `results` when every masker
/// weighs its chain's samples (or each weighs the same, under DP): the
/// weighted mean, and how many results are in it; `Err` when fewer than
/// `quorum` results came (the sum cannot be unmasked). For a driver that
/// stands in for the masking protocol (the simulator); the server unmasks
/// the real sum (`crate::secagg::Unmasker`).
pub fn simulated_unmasking(results: &[GroupResult], quorum: usize, uniform: bool) -> Unmasked {
    if results.len() < quorum.max(1) {
        return Err(format!(
            "{} of the round's results came, fewer than the quorum of {quorum}",
            results.len()
        ));
    }
    let weight = |r: &GroupResult| if uniform { 1.0 } else { r.samples as f64 };
    let total: f64 = results.iter().map(weight).sum();
    if total <= 0.0 {
        return Err("the results weigh nothing".into());
    }
    let len = results[0].weights.len();
    let mut mean = vec![0.0f64; len];
    for result in results {
        let w = weight(result) / total;
        for (m, v) in mean.iter_mut().zip(&result.weights) {
            *m += w * f64::from(*v);
        }
    }
    Ok((mean.into_iter().map(|m| m as f32).collect(), results.len()))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::guard::UpdateGuard;
    use crate::strategy::FedAvg;

    fn result(group: usize, value: f32, samples: u64) -> GroupResult {
        GroupResult {
            group,
            weights: vec![value; 3],
            samples,
        }
    }

    use crate::engine::tests::dp;

    /// Closes a round of plain results (no DP, not secure) from zeros.
    fn close_plain(results: &[GroupResult]) -> Closed {
        let mut rng = StdRng::seed_from_u64(1);
        close(
            &FedAvg,
            &[0.0; 3],
            (results, &[]),
            None,
            None,
            (&UpdateGuard::default(), None),
            &mut rng,
        )
        .0
    }

    #[test]
    fn the_strategy_aggregates_and_the_model_adopts_it() {
        let results = [result(0, 1.0, 1), result(1, 4.0, 3)];
        assert_eq!(close_plain(&results), Closed::Adopted(vec![3.25; 3]));
    }

    #[test]
    fn an_aggregate_out_of_bounds_is_dropped() {
        let closed = close_plain(&[result(0, 1e6, 1)]);
        assert!(matches!(closed, Closed::Dropped(r) if r.contains("outside the bounds")));
    }

    #[test]
    fn a_secure_round_below_its_quorum_is_dropped_and_spends_nothing() {
        let results = [result(0, 1.0, 1)];
        let mut privacy = RoundPrivacy::new(dp(), Some(10.0), false, 1.0);
        let unmasked = simulated_unmasking(&results, 2, true);
        let (closed, _) = close(
            &FedAvg,
            &[0.0; 3],
            (&results, &[]),
            Some((&mut privacy, 1)),
            Some(unmasked),
            (&UpdateGuard::default(), None),
            &mut StdRng::seed_from_u64(1),
        );
        assert!(matches!(closed, Closed::Dropped(r) if r.contains("quorum")));
        assert_eq!(privacy.epsilon(), 0.0);
    }

    #[test]
    fn the_unmasked_mean_weighs_samples_or_every_result_the_same_under_dp() {
        let results = [result(0, 1.0, 1), result(1, 4.0, 3)];
        assert_eq!(
            simulated_unmasking(&results, 1, false),
            Ok((vec![3.25; 3], 2))
        );
        assert_eq!(
            simulated_unmasking(&results, 1, true),
            Ok((vec![2.5; 3], 2))
        );
    }

    #[test]
    fn an_unmasked_mean_moved_far_by_a_masker_is_dropped_and_the_round_still_spent() {
        // The bug: a masker that added a constant to its masked input moved
        // every weight by it and the round was adopted (test loss 2.5e7,
        // then 2e9): no check saw the maskers' results.
        let global = vec![0.1f32; 400];
        let results = [GroupResult {
            group: 0,
            weights: global.clone(),
            samples: 1,
        }];
        let moved: Vec<f32> = global.iter().map(|v| v + 1.0).collect();
        let mut privacy = RoundPrivacy::new(dp(), None, true, 1.0);

        let (closed, _) = close(
            &FedAvg,
            &global,
            (&results, &[]),
            Some((&mut privacy, 1)),
            Some(Ok((moved, 4))),
            (&UpdateGuard::default(), None),
            &mut StdRng::seed_from_u64(1),
        );

        assert!(
            matches!(&closed, Closed::Spoiled(r) if r.contains("unmasked mean")),
            "{closed:?}"
        );
        assert!(privacy.epsilon() > 0.0, "the round is spent all the same");
        // A mean that moves as honest rounds do is adopted.
        let near: Vec<f32> = global.iter().map(|v| v + 0.01).collect();
        let (closed, _) = close(
            &FedAvg,
            &global,
            (&results, &[]),
            None,
            Some(Ok((near.clone(), 4))),
            (&UpdateGuard::default(), None),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(closed, Closed::Adopted(near));
    }

    #[test]
    fn under_distributed_dp_the_server_adds_no_noise_but_spends_the_round() {
        let results = [result(0, 1.0, 1), result(1, 4.0, 3)];
        let mut privacy = RoundPrivacy::new(dp(), None, true, 1.0);
        let (closed, _) = close(
            &FedAvg,
            &[2.0; 3],
            (&results, &[]),
            Some((&mut privacy, 2)),
            Some(Ok((vec![2.5; 3], 2))),
            (&UpdateGuard::default(), None),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(closed, Closed::Adopted(vec![2.5; 3]));
        assert!(privacy.epsilon() > 0.0);
        // Without distributed DP the server noises the mean itself.
        privacy.distributed = false;
        let (closed, _) = close(
            &FedAvg,
            &[2.0; 3],
            (&results, &[]),
            Some((&mut privacy, 2)),
            Some(Ok((vec![2.5; 3], 2))),
            (&UpdateGuard::default(), None),
            &mut StdRng::seed_from_u64(1),
        );
        assert!(matches!(closed, Closed::Adopted(v) if v != vec![2.5; 3]));
    }

    #[test]
    fn a_dp_round_is_spent_even_when_no_result_came_and_the_budget_stops_the_run() {
        let mut privacy = RoundPrivacy::new(dp(), Some(30.0), false, 1.0);
        let mut round = 1;
        while privacy.budget_allows(round).is_ok() {
            let (closed, _) = close(
                &FedAvg,
                &[0.0; 3],
                (&[], &[]),
                Some((&mut privacy, 1)),
                None,
                (&UpdateGuard::default(), None),
                &mut StdRng::seed_from_u64(round.into()),
            );
            assert_eq!(closed, Closed::Kept);
            round += 1;
            assert!(round < 1_000, "the budget never ran out");
        }
        // Every round that ran stayed within the budget; the next would not.
        assert!(privacy.epsilon() <= 30.0);
        assert!(round > 1);
        let mut next = privacy.accountant.clone();
        next.compose(1.0, 1.0, 1);
        assert!(next.epsilon(1e-5) > 30.0);
    }

    #[test]
    fn a_secure_round_under_distributed_dp_without_valid_noise_does_not_train() {
        let groups = [Group {
            members: vec![1, 2],
            passes: 1,
        }];
        let plain = secure_chain(None, &groups, 2);
        assert_eq!(plain, Ok(SecureChain::default()));
        let mut privacy = RoundPrivacy::new(dp(), None, true, 1.0);
        let chain = secure_chain(Some(&privacy), &groups, 2).expect("valid noise");
        assert_eq!(chain.dp_clip, Some(1.0));
        assert!(chain.masker_noise.is_some_and(|n| n > 0.0));
        privacy.mechanism.noise_multiplier = f64::NAN;
        assert!(secure_chain(Some(&privacy), &groups, 2).is_err());
    }

    #[test]
    fn a_dp_round_clips_each_update_and_reports_the_norms() {
        let results = [result(0, 10.0, 1), result(1, 0.1, 1)];
        let mut privacy = RoundPrivacy::new(
            ModelPrivacy {
                noise_multiplier: 1e-9,
                ..dp()
            },
            None,
            false,
            0.1,
        );
        let (closed, norms) = close(
            &FedAvg,
            &[0.0; 3],
            (&results, &[]),
            Some((&mut privacy, 1)),
            None,
            (&UpdateGuard::default(), None),
            &mut StdRng::seed_from_u64(1),
        );
        let Closed::Adopted(values) = closed else {
            panic!("{closed:?}");
        };
        // (1/sqrt(3) + 0.1) / 2 per weight: the first update clipped to 1.
        let expected = (1.0 / 3f32.sqrt() + 0.1) / 2.0;
        assert!(
            values.iter().all(|v| (v - expected).abs() < 1e-4),
            "{values:?}"
        );
        assert_eq!(norms.len(), 2);
        assert!(norms[0] < norms[1]);
    }
}
