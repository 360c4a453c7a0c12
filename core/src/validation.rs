//! The update guard's loss rule: a hop may not make the model much worse on
//! a small validation set the server holds.
//!
//! The norm rules of [`crate::guard`] cannot see an update that has an
//! honest size but a harmful direction: a reversed (sign-flipped) update a
//! few times an honest one passes both. Its effect on a loss can be seen.
//! Zeno (Xie, Koyejo & Gupta, "Zeno: Distributed Stochastic Gradient Descent
//! with Suspicion-based Fault-tolerance", ICML 2019) scores each update by
//! the loss decrease it brings on a batch the server holds; Fang et al.
//! ("Local Model Poisoning Attacks to Byzantine-Robust Federated Learning",
//! USENIX Security 2020, "loss function based rejection") remove the updates
//! that raise a validation loss most. We judge every hop alone, as the norm
//! rules do: a hop whose model has a validation loss more than
//! `max_increase` above the loss of the weights it was sent, plus the
//! median change of the last 100 hops judged in earlier rounds (once 5
//! were), is refused.
//!
//! The baseline moves only between rounds ([`LossCheck::settle`], which
//! `engine::round::close` calls for serve and simulate alike): a round's
//! hops, judged on several threads in whatever order their chains run,
//! are all judged against the same baseline, and their changes join the
//! window at the round's close in an order of their own values, not of
//! arrival. So a verdict depends on the hops, never on thread timing.
//!
//! An honest hop on a client with one or two classes may raise the loss on
//! a balanced set too (it drifts towards its classes), so the bound is a
//! tolerance, measured in docs/RESULTS.md, not zero; and where every
//! honest hop raises it (long local training on skewed shards, as FedAvg
//! does from the global model) the median follows them, so the rule
//! refuses what stands out from the hops around it, not honest drift.

use std::sync::Mutex;

use burn::prelude::*;

use crate::data::Dataset;
use crate::model::ModelConfig;
use crate::settled::SettledWindow;
use crate::train::Samples;
use crate::weights::WeightsError;

/// Default tolerance: a hop may raise the mean validation cross-entropy by
/// at most this many nats.
pub const DEFAULT_MAX_LOSS_INCREASE: f64 = 0.5;

/// Default size of the validation set: the rule compares two losses on
/// the same samples, whose difference is far less noisy than either loss.
/// 64 guarded as well as 256 against 20 % sign-flipping (three seeds) and
/// label-flipping (two seeds) attackers on long-tailed MNIST, judging a hop
/// in a quarter of the time (docs/RESULTS.md, "Cheap hops").
pub const DEFAULT_VALIDATION_SAMPLES: usize = 64;

/// A hop the loss rule refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "it raised the validation loss from {before:.3} to {after:.3}, more than {max_increase} nats \
     over the recent median change {baseline:.3}"
)]
pub struct LossIncrease {
    /// Mean cross-entropy (nats) of the weights sent.
    pub before: f64,
    /// Mean cross-entropy (nats) of the weights returned.
    pub after: f64,
    /// The rule's tolerance.
    pub max_increase: f64,
    /// The median change (nats, at least 0) of the recent hops judged.
    pub baseline: f64,
}

/// Hops whose loss change the baseline remembers.
const WINDOW: usize = 100;
/// Hops judged before the baseline counts (0 until then).
const MIN_HISTORY: usize = 5;

/// The server's validation samples and the rule's tolerance.
#[derive(Debug)]
pub struct LossCheck {
    /// The validation samples, made ready once for every judgement.
    probe: crate::batched::Probe,
    max_increase: f64,
    /// Loss changes of the hops judged, refused or not: the baseline is
    /// their median (at least 0; 0 under [`MIN_HISTORY`] settled).
    recent: Mutex<SettledWindow>,
    /// The last weights a hop was sent and their loss
    /// ([`LossCheck::sent_loss`]).
    last_sent: Mutex<Option<(Vec<f32>, f64)>>,
    /// The batched forward pass, set up once for every hop judged.
    evaluator: crate::batched::BatchedModel,
}

/// Locks `mutex`, going on past a poisoned lock.
fn relock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a [`LossCheck`] remembers (its window of loss changes and the
/// last sent weights' loss), taken by [`LossCheck::memory`].
#[derive(Debug, Clone)]
pub struct LossMemory {
    recent: SettledWindow,
    last_sent: Option<(Vec<f32>, f64)>,
}

impl LossCheck {
    /// What the rule remembers, to put back with [`LossCheck::put_back`].
    pub fn memory(&self) -> LossMemory {
        LossMemory {
            recent: relock(&self.recent).clone(),
            last_sent: relock(&self.last_sent).clone(),
        }
    }

    /// Puts back what [`LossCheck::memory`] took.
    pub fn put_back(&self, memory: LossMemory) {
        *relock(&self.recent) = memory.recent;
        *relock(&self.last_sent) = memory.last_sent;
    }

    /// Judges hops of the model `model_config` makes (flat weights laid
    /// out as its parameters) on every sample of `set` (64 by default,
    /// [`DEFAULT_VALIDATION_SAMPLES`]),
    /// with tolerance `max_increase` nats (non-finite or negative is taken
    /// as 0).
    pub fn new(model_config: ModelConfig, set: &Dataset, max_increase: f64) -> Self {
        let evaluator = crate::batched::BatchedModel::new(&model_config, &Device::flex());
        Self {
            probe: evaluator.probe(
                Samples {
                    images: &set.images,
                    labels: &set.labels,
                },
                256,
            ),
            max_increase: if max_increase.is_finite() {
                max_increase.max(0.0)
            } else {
                0.0
            },
            recent: Mutex::new(SettledWindow::new(WINDOW, MIN_HISTORY)),
            last_sent: Mutex::new(None),
            evaluator,
        }
    }

    /// Samples it judges on.
    pub fn len(&self) -> usize {
        self.probe.len()
    }

    /// Whether it has no samples (then every hop passes).
    pub fn is_empty(&self) -> bool {
        self.probe.is_empty()
    }

    /// [`LossCheck::loss`] of weights a hop was sent, computed once for
    /// the same weights sent again: a round sends every chain's first hop
    /// the same global model (a FedAvg round of 1,000 clients asked for
    /// its loss 1,000 times), so the last one sent and its loss are kept
    /// and compared value for value (a copy compare, about a
    /// hundredth of an evaluation).
    ///
    /// # Errors
    /// As [`LossCheck::loss`].
    pub fn sent_loss(&self, values: &[f32]) -> Result<f64, WeightsError> {
        let cached = |last: &Option<(Vec<f32>, f64)>| {
            last.as_ref()
                .filter(|(weights, _)| weights.as_slice() == values)
                .map(|&(_, loss)| loss)
        };
        if let Some(loss) = cached(&self.last_sent.lock().expect("no judge panicked")) {
            return Ok(loss);
        }
        let loss = self.loss(values)?;
        *self.last_sent.lock().expect("no judge panicked") = Some((values.to_vec(), loss));
        Ok(loss)
    }

    /// Mean cross-entropy (nats) of the flat weight vector `values` on the
    /// validation samples, computed on the CPU (burn's `flex`: a judge's
    /// 64 samples are no work for a GPU); a non-finite loss is returned as
    /// infinity.
    ///
    /// # Errors
    /// If `values` do not fit the model's shapes.
    pub fn loss(&self, values: &[f32]) -> Result<f64, WeightsError> {
        // The batched trainer's forward pass (a third of `train::evaluate`'s
        // time on the CPU; what the server and the simulator both judge
        // with), from the samples' first-layer columns made once.
        let loss = self.evaluator.loss_on(values, &self.probe)?;
        Ok(if loss.is_finite() {
            loss
        } else {
            f64::INFINITY
        })
    }

    /// The rule on two losses (nats) already computed: the hop's change
    /// `after - before` joins the round's changes whatever the verdict (an
    /// honest majority of hops sets their median; refused ones included,
    /// so a run whose honest hops all raise the loss is not refused for
    /// ever), to count from the next [`LossCheck::settle`].
    ///
    /// # Errors
    /// [`LossIncrease`] when `after` exceeds `before` by more than the
    /// tolerance plus the baseline (the median of the settled changes, at
    /// least 0, once [`MIN_HISTORY`] were settled), or `after` is not
    /// finite.
    pub fn judge(&self, before: f64, after: f64) -> Result<(), LossIncrease> {
        if self.is_empty() {
            return Ok(());
        }
        let mut window = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let baseline = window.median().unwrap_or(0.0).max(0.0);
        window.push(after - before);
        self.rule(before, after, baseline)
    }

    /// The rule itself: `after` refused when it is not finite, or exceeds
    /// a finite `before` by more than `baseline` plus the tolerance.
    fn rule(&self, before: f64, after: f64, baseline: f64) -> Result<(), LossIncrease> {
        let refused = !after.is_finite()
            || (before.is_finite() && after - before > baseline + self.max_increase);
        if refused {
            return Err(LossIncrease {
                before,
                after,
                max_increase: self.max_increase,
                baseline,
            });
        }
        Ok(())
    }

    /// The rule on a round's aggregate that no hop check saw (the unmasked
    /// mean of secure aggregation): the loss of `aggregate` against that
    /// of `global`, the model the round started from, with the tolerance
    /// and the settled baseline of [`LossCheck::judge`]. The change does
    /// not join the window (it is a round's, not a hop's).
    ///
    /// # Errors
    /// [`LossIncrease`] as [`LossCheck::judge`]; a `global` or `aggregate`
    /// that does not fit the model is judged as infinite loss (refused).
    pub fn judge_aggregate(&self, global: &[f32], aggregate: &[f32]) -> Result<(), LossIncrease> {
        if self.is_empty() {
            return Ok(());
        }
        let before = self.sent_loss(global).unwrap_or(f64::INFINITY);
        let after = self.loss(aggregate).unwrap_or(f64::INFINITY);
        let baseline = self
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .median()
            .unwrap_or(0.0)
            .max(0.0);
        self.rule(before, after, baseline)
    }

    /// Closes a round for the rule: the changes judged since the last call
    /// join the window (in an order of their values, so the same hops
    /// leave the same window whatever order they were judged in), the
    /// oldest beyond [`WINDOW`] leave it, and the baseline becomes the
    /// window's median (at least 0; 0 under [`MIN_HISTORY`] changes).
    pub fn settle(&self) {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::weights::Weights;

    /// A check on `n` blank 28x28 images of class 0, with tolerance 0.5.
    fn check(n: usize) -> (LossCheck, Vec<f32>) {
        let classes: Vec<String> = (0..10).map(|c| c.to_string()).collect();
        let set = Dataset::new(vec![0.0; n * 784], vec![0; n], 1, 28, 28, classes).unwrap();
        let config = ModelConfig::for_dataset(&set);
        let device = Device::flex();
        let weights = Weights::from_model(&config.init(&device));
        (LossCheck::new(config, &set, 0.5), weights.values)
    }

    #[test]
    fn a_hop_is_refused_only_past_the_tolerance() {
        let (check, _) = check(4);
        assert_eq!(check.judge(1.0, 1.5), Ok(()));
        assert_eq!(check.judge(1.0, 0.2), Ok(()));
        assert!(check.judge(1.0, 1.51).is_err());
        assert!(check.judge(1.0, f64::INFINITY).is_err());
        assert!(check.judge(1.0, f64::NAN).is_err());
        // A sent model that does not evaluate cannot be made worse.
        assert_eq!(check.judge(f64::INFINITY, 3.0), Ok(()));
    }

    #[test]
    fn an_aggregate_that_ruins_the_loss_is_refused_and_leaves_the_window_alone() {
        let (check, weights) = check(8);
        // Every validation sample is class 0: a large bias for class 3
        // ruins the loss without moving the model far.
        let mut ruined = weights.clone();
        let bias3 = ruined.len() - 10 + 3;
        ruined[bias3] += 50.0;

        let same = check.judge_aggregate(&weights, &weights);
        let worse = check.judge_aggregate(&weights, &ruined);
        let short = check.judge_aggregate(&weights, &weights[1..]);

        assert_eq!(same, Ok(()));
        assert!(worse.is_err(), "{worse:?}");
        assert!(short.is_err());
        check.settle();
        assert_eq!(check.recent.lock().unwrap().settled(), Vec::<f64>::new());
    }

    #[test]
    fn where_honest_hops_all_raise_the_loss_the_baseline_follows_them() {
        // Prepare: FedAvg-like hops, each raising the loss by about 2 nats
        // (long local training on skewed shards); a fresh check refuses
        // them, as it has no history.
        let (check, _) = check(4);
        assert!(check.judge(2.3, 4.3).is_err());
        for change in [2.0, 1.9, 2.1, 2.2] {
            let _ = check.judge(2.3, 2.3 + change);
        }
        // Within the round the baseline has not moved...
        assert!(check.judge(2.3, 4.4).is_err());
        // ...it moves when the round closes.
        check.settle();

        // Execute
        let honest = check.judge(2.3, 4.4);
        let outlier = check.judge(2.3, 2.3 + 2.0 + 0.8);
        let reversed = check.judge(2.3, 9.0);

        // Assert: the median (2.0 to 2.1) plus the tolerance (0.5) is the
        // bound.
        assert_eq!(honest, Ok(()));
        assert!(outlier.is_err(), "{outlier:?}");
        assert!(reversed.is_err());
    }

    #[test]
    fn a_minority_of_harmful_hops_does_not_move_the_baseline() {
        let (check, _) = check(4);
        for i in 0..100 {
            // 30 % of the hops raise the loss by 5 nats, the rest lower it.
            let change = if i % 10 < 3 { 5.0 } else { -0.05 };
            let _ = check.judge(1.0, 1.0 + change);
            if i % 7 == 6 {
                check.settle();
            }
        }
        check.settle();
        assert!(check.judge(1.0, 1.6).is_err());
        assert_eq!(check.judge(1.0, 1.4), Ok(()));
    }

    #[test]
    fn a_rounds_verdicts_do_not_depend_on_the_order_its_hops_are_judged_in() {
        // The bug: the window was filled in judging order, so a hop judged
        // after a round's other hops met another baseline than one judged
        // before them, and repeated runs differed with thread timing.
        let rounds: Vec<Vec<f64>> = (0..6)
            .map(|r| {
                (0..5)
                    .map(|h| 0.9 + 0.3 * ((r * 5 + h) % 7) as f64)
                    .collect()
            })
            .collect();
        let verdicts = |reversed: bool| {
            let (check, _) = check(4);
            let mut all = Vec::new();
            for hops in &rounds {
                let mut order: Vec<usize> = (0..hops.len()).collect();
                if reversed {
                    order.reverse();
                }
                let mut round = vec![false; hops.len()];
                for i in order {
                    round[i] = check.judge(1.0, 1.0 + hops[i]).is_ok();
                }
                all.push(round);
                check.settle();
            }
            all
        };
        let (forward, backward) = (verdicts(false), verdicts(true));
        assert_eq!(forward, backward);
        // The rule did decide something: the first round (no baseline)
        // refuses every change over the tolerance, later rounds accept
        // some of the same size.
        assert!(forward[0].iter().all(|ok| !ok), "{forward:?}");
        assert!(forward[5].iter().any(|ok| *ok), "{forward:?}");
    }

    #[test]
    fn a_sent_models_loss_is_kept_for_the_same_weights_and_never_for_others() {
        let (check, values) = check(8);
        let mut other = values.clone();
        let biases = other.len() - 10;
        other[biases + 3] += 8.0;

        let first = check.sent_loss(&values).unwrap();
        let kept = check.last_sent.lock().unwrap().clone();
        let again = check.sent_loss(&values).unwrap();
        let changed = check.sent_loss(&other).unwrap();

        assert_eq!(first, check.loss(&values).unwrap());
        assert_eq!(kept, Some((values.clone(), first)));
        assert_eq!(again, first);
        assert_eq!(changed, check.loss(&other).unwrap());
        assert!(changed - first > 5.0);
        assert!(check.sent_loss(&values[1..]).is_err());
    }

    #[test]
    fn a_model_pushed_towards_a_wrong_class_has_a_higher_loss() {
        // Prepare: every validation sample is class 0; the last 10 values
        // of the flat vector are the output layer's biases.
        let (check, values) = check(8);
        let mut wrong = values.clone();
        let biases = wrong.len() - 10;
        wrong[biases + 3] += 8.0;

        // Execute
        let before = check.loss(&values).unwrap();
        let after = check.loss(&wrong).unwrap();

        // Assert: about 8 nats worse, refused; the untouched model passes.
        assert!(after - before > 5.0, "{before} -> {after}");
        assert!(check.judge(before, after).is_err());
        assert_eq!(check.judge(before, check.loss(&values).unwrap()), Ok(()));
        assert!(check.loss(&values[1..]).is_err());
    }

    #[test]
    fn a_negative_or_non_finite_tolerance_is_zero() {
        let classes: Vec<String> = (0..2).map(|c| c.to_string()).collect();
        let set = Dataset::new(vec![0.0; 784], vec![0], 1, 28, 28, classes).unwrap();
        let config = ModelConfig::for_dataset(&set);
        for tolerance in [-1.0, f64::NAN] {
            let check = LossCheck::new(config.clone(), &set, tolerance);
            assert!(check.judge(1.0, 1.001).is_err());
            assert_eq!(check.judge(1.0, 1.0), Ok(()));
        }
    }
}
