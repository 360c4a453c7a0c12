//! Does the learned scheduler's cheap reward rank schedules as the full
//! simulator does? (`astraea bench surrogate`, issue 25 item 3.)
//!
//! The policy learns from a surrogate of a round's worth, computed from
//! the mediators alone: `-ln(round time / balanced time) - shaping * KL`
//! (`sim::scheduling::Outcome::reward`), the log of the accuracy gained
//! per second if a round's gain falls as `exp(-shaping * KL)`. Here full
//! simulated runs of Astraea are stopped at chosen rounds and each round
//! is played again from the same global model, participants, chain seeds
//! and freezes with every scheduler given (`sim::probe_schedules`); each
//! schedule's true worth is the test accuracy it gained per second of the
//! federation's clock. The shaping weight is fitted (a grid) on the
//! probed rounds of some seeds and the fitted surrogate judged on the
//! rounds of the others by Spearman's rank correlation, per round (how
//! it ranks one round's schedules: what a scheduler's choice needs) and
//! pooled over every round.

use astraea_core::astraea::Scheduler;
use astraea_core::data::Dataset;
use astraea_core::strategy::StrategyKind;
use astraea_sim::scheduling::{Outcome, RankCheck, rank_check};
use astraea_sim::{Probe, ProbedSchedule, RunSpec, SimConfig};

/// Every probed round of every seed: one inner list of schedules per
/// (seed, round).
pub type Probed = Vec<Vec<ProbedSchedule>>;

/// Probes rounds `rounds` of Astraea's run of each seed with each
/// scheduler (the rest of `config` as given), logging each probed round.
///
/// # Errors
/// A run that fails or cannot be probed (`sim::probe_schedules`).
pub fn probe(
    config: &SimConfig,
    (train, test): (&Dataset, &Dataset),
    schedulers: &[(String, Scheduler)],
    rounds: &[u32],
    seeds: &[u64],
    log: &mut dyn FnMut(u64, &[ProbedSchedule]),
) -> anyhow::Result<Probed> {
    let mut probed = Vec::new();
    for &seed in seeds {
        let spec = RunSpec {
            strategy: StrategyKind::Astraea,
            iid_reference: false,
            seed,
        };
        // The run needs no more rounds than the last one probed.
        let mut config = config.clone();
        config.rounds = rounds.iter().copied().max().unwrap_or(1);
        let (_, found) = astraea_sim::probe_schedules(
            &config,
            &spec,
            train,
            test,
            Probe { schedulers, rounds },
        )?;
        for &round in rounds {
            let of_round: Vec<ProbedSchedule> =
                found.iter().filter(|p| p.round == round).cloned().collect();
            log(seed, &of_round);
            probed.push(of_round);
        }
    }
    Ok(probed)
}

/// One surrogate's ranking, on the fitting rounds and the held-out ones.
#[derive(Debug, Clone)]
pub struct Judged {
    /// E.g. `shaping 4` or `KL alone`.
    pub surrogate: String,
    /// Against accuracy gained per second, on the rounds it was fitted on.
    pub fit: RankCheck,
    /// Against accuracy gained per second, on the held-out rounds.
    pub held_out: RankCheck,
    /// Against test loss taken off per second, on the held-out rounds.
    pub held_out_loss: RankCheck,
}

/// `surrogate` judged on `fit` and `held_out`.
fn judged(
    name: String,
    (fit, held_out): (&Probed, &Probed),
    surrogate: impl Fn(&ProbedSchedule) -> f64 + Copy,
) -> Judged {
    Judged {
        surrogate: name,
        fit: rank_check(fit, surrogate, ProbedSchedule::gain_per_second),
        held_out: rank_check(held_out, surrogate, ProbedSchedule::gain_per_second),
        held_out_loss: rank_check(held_out, surrogate, ProbedSchedule::loss_drop_per_second),
    }
}

/// The probed rounds in which every schedule gained accuracy. Per second
/// is a rate of progress only for a gain: of two schedules that lost a
/// point, the slower one would rank above the quicker one (its loss
/// spread over more seconds), so rounds with a loss are left out of the
/// ranking (and counted apart).
pub fn gaining(probed: &Probed) -> Probed {
    probed
        .iter()
        .filter(|round| round.iter().all(|p| p.accuracy > p.accuracy_before))
        .cloned()
        .collect()
}

/// Judges the reward with each weight of `shapings`, and the KL alone, on
/// `fit` and `held_out`; answers them, and the index of the shaping that
/// ranks the fitting rounds best (per round; a shaping no round could
/// judge is never the best).
pub fn judge(fit: &Probed, held_out: &Probed, shapings: &[f64]) -> (Vec<Judged>, usize) {
    let mut judged: Vec<Judged> = shapings
        .iter()
        .map(|&shaping| {
            judged(format!("shaping {shaping}"), (fit, held_out), move |p| {
                Outcome::from(p).reward(shaping)
            })
        })
        .collect();
    let best = (0..judged.len())
        .filter(|&i| judged[i].fit.per_round.is_finite())
        .max_by(|&a, &b| judged[a].fit.per_round.total_cmp(&judged[b].fit.per_round))
        .unwrap_or(0);
    judged.push(self::judged("KL alone".into(), (fit, held_out), |p| -p.kl));
    (judged, best)
}

/// The judgement as a Markdown table, the fitted row marked.
pub fn table(judged: &[Judged], best: usize) -> String {
    let mut out = String::from(
        "| surrogate | fit: ρ per round | fit: ρ pooled | held out: ρ per round | held out: ρ pooled | held out, loss: ρ per round | held out, loss: ρ pooled | held-out rounds |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, j) in judged.iter().enumerate() {
        let mark = if i == best { " (fitted)" } else { "" };
        out.push_str(&format!(
            "| {}{mark} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
            j.surrogate,
            j.fit.per_round,
            j.fit.pooled,
            j.held_out.per_round,
            j.held_out.pooled,
            j.held_out_loss.per_round,
            j.held_out_loss.pooled,
            j.held_out.rounds
        ));
    }
    out
}

/// Each scheduler's mean over `probed`: accuracy gained (points), round
/// time over balanced, KL, and gain per second, as a Markdown table.
pub fn schedules_table(probed: &Probed) -> String {
    let mut names: Vec<String> = Vec::new();
    for p in probed.iter().flatten() {
        if !names.contains(&p.scheduler) {
            names.push(p.scheduler.clone());
        }
    }
    let mut out = String::from(
        "| scheduler | accuracy gained (points) | round time / balanced | chain KL | points per 100 s |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for name in names {
        let of: Vec<&ProbedSchedule> = probed
            .iter()
            .flatten()
            .filter(|p| p.scheduler == name)
            .collect();
        let n = of.len().max(1) as f64;
        let mean = |f: &dyn Fn(&ProbedSchedule) -> f64| of.iter().map(|p| f(p)).sum::<f64>() / n;
        out.push_str(&format!(
            "| {name} | {:.2} | {:.3} | {:.3} | {:.3} |\n",
            mean(&|p| (p.accuracy - p.accuracy_before) * 100.0),
            mean(&|p| p.seconds / p.balanced.max(1e-9)),
            mean(&|p| p.kl),
            mean(&|p| p.gain_per_second() * 100.0 * 100.0),
        ));
    }
    out
}
